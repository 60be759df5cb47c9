//! The echo servers, the transport's limit: a single-threaded mio loop
//! (the default, like the csnap network thread) or a thread per connection.

use super::*;

pub(crate) struct EchoServer {
    pub(crate) unix: Addr,
    pub(crate) tcp: Addr,
    pub(crate) stop: Box<dyn FnOnce()>,
}

/// Length of the frame at the front of `buf`, once its header is in.
pub(crate) fn frame_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    let len = usize::try_from(len).map_err(|_| ())?;
    if !(HEADER_BYTES..=FRAME_MAX_BYTES).contains(&len) {
        return Err(());
    }
    Ok(Some(len))
}

pub(crate) struct EchoConn {
    pub(crate) stream: MioStream,
    pub(crate) buf: Vec<u8>,
    pub(crate) have: usize,
    pub(crate) out: Vec<u8>,
    pub(crate) out_at: usize,
}

impl EchoConn {
    /// Reads all it can, queues every whole frame back, writes all it can.
    /// `false` when the connection is done.
    fn service(&mut self) -> bool {
        loop {
            match self.stream.read(&mut self.buf[self.have..]) {
                Ok(0) => return false,
                Ok(n) => {
                    self.have += n;
                    loop {
                        match frame_len(&self.buf[..self.have]) {
                            Ok(Some(len)) if len <= self.have => {
                                self.out.extend_from_slice(&self.buf[..len]);
                                self.buf.copy_within(len..self.have, 0);
                                self.have -= len;
                            }
                            Ok(_) => break,
                            Err(()) => return false,
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        while self.out_at < self.out.len() {
            match self.stream.write(&self.out[self.out_at..]) {
                Ok(0) => return false,
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.out.clear();
        self.out_at = 0;
        true
    }
}

pub(crate) const ECHO_WAKE: mio::Token = mio::Token(usize::MAX);
pub(crate) const ECHO_LISTEN: usize = usize::MAX - 8;

pub(crate) fn echo_mio_loop(
    mut poll: mio::Poll,
    listeners: &[MioListener],
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut events = mio::Events::with_capacity(256);
    let mut conns: Vec<Option<EchoConn>> = Vec::new();
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("echo poll: {e}"));
        }
        for ev in &events {
            match ev.token() {
                ECHO_WAKE => {
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                }
                mio::Token(t) if t >= ECHO_LISTEN => {
                    let Some(l) = listeners.get(t - ECHO_LISTEN) else {
                        continue;
                    };
                    accept_echo(&poll, l, &mut conns)?;
                }
                mio::Token(t) => {
                    let done = conns
                        .get_mut(t)
                        .and_then(Option::as_mut)
                        .is_some_and(|c| !c.service());
                    if done {
                        if let Some(mut c) = conns[t].take() {
                            let _ = poll.registry().deregister(&mut c.stream);
                        }
                    }
                }
            }
        }
    }
}

pub(crate) fn accept_echo(
    poll: &mio::Poll,
    l: &MioListener,
    conns: &mut Vec<Option<EchoConn>>,
) -> Result<(), String> {
    loop {
        let mut stream = match l.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("echo accept: {e}")),
        };
        let slot = match conns.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                conns.push(None);
                conns.len() - 1
            }
        };
        poll.registry()
            .register(
                &mut stream,
                mio::Token(slot),
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            )
            .map_err(|e| format!("echo register: {e}"))?;
        conns[slot] = Some(EchoConn {
            stream,
            buf: vec![0u8; FRAME_MAX_BYTES],
            have: 0,
            out: Vec::with_capacity(FRAME_MAX_BYTES),
            out_at: 0,
        });
    }
}

pub(crate) fn start_echo_mio(dir: &Path) -> Result<EchoServer, String> {
    let poll = mio::Poll::new().map_err(|e| format!("echo poll: {e}"))?;
    let addrs = [
        Addr::Unix(dir.join("echo.sock")),
        Addr::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
    ];
    let mut listeners = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let mut l = MioListener::bind(a).map_err(|e| format!("echo bind {a}: {e}"))?;
        poll.registry()
            .register(&mut l, mio::Token(ECHO_LISTEN + i), mio::Interest::READABLE)
            .map_err(|e| format!("echo register: {e}"))?;
        listeners.push(l);
    }
    let unix = listeners[0]
        .local_addr()
        .map_err(|e| format!("echo address: {e}"))?;
    let tcp = listeners[1]
        .local_addr()
        .map_err(|e| format!("echo address: {e}"))?;
    let waker = mio::Waker::new(poll.registry(), ECHO_WAKE).map_err(|e| format!("waker: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::Builder::new()
        .name("echo-mio".into())
        .spawn(move || {
            if let Err(e) = echo_mio_loop(poll, &listeners, &stop2) {
                eprintln!("server-bench: echo server: {e}");
            }
        })
        .map_err(|e| format!("spawn the echo server: {e}"))?;
    Ok(EchoServer {
        unix,
        tcp,
        stop: Box::new(move || {
            stop.store(true, Ordering::Release);
            let _ = waker.wake();
            let _ = handle.join();
        }),
    })
}

pub(crate) fn echo_blocking<S: Read + Write>(mut s: S) {
    let mut buf = vec![0u8; FRAME_MAX_BYTES];
    loop {
        if s.read_exact(&mut buf[..HEADER_BYTES]).is_err() {
            return;
        }
        let Ok(Some(len)) = frame_len(&buf[..HEADER_BYTES]) else {
            return;
        };
        if s.read_exact(&mut buf[HEADER_BYTES..len]).is_err() {
            return;
        }
        if s.write_all(&buf[..len]).is_err() {
            return;
        }
    }
}

pub(crate) fn start_echo_threads(dir: &Path) -> Result<EchoServer, String> {
    let path = dir.join("echo-threads.sock");
    let ul = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| format!("echo bind {}: {e}", path.display()))?;
    let tl = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("echo bind: {e}"))?;
    let tcp_addr = tl.local_addr().map_err(|e| format!("echo address: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (s1, s2) = (stop.clone(), stop.clone());
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| format!("spawn the echo server: {e}"))
    };
    let hu = spawn(
        "echo-accept-u",
        Box::new(move || {
            for s in ul.incoming() {
                if s1.load(Ordering::Acquire) {
                    return;
                }
                if let Ok(s) = s {
                    let _ = std::thread::Builder::new()
                        .name("echo-conn".into())
                        .spawn(move || echo_blocking(s));
                }
            }
        }),
    )?;
    let ht = spawn(
        "echo-accept-t",
        Box::new(move || {
            for s in tl.incoming() {
                if s2.load(Ordering::Acquire) {
                    return;
                }
                if let Ok(s) = s {
                    let _ = s.set_nodelay(true);
                    let _ = std::thread::Builder::new()
                        .name("echo-conn".into())
                        .spawn(move || echo_blocking(s));
                }
            }
        }),
    )?;
    let (pu, pt) = (path.clone(), tcp_addr);
    Ok(EchoServer {
        unix: Addr::Unix(path),
        tcp: Addr::Tcp(tcp_addr),
        stop: Box::new(move || {
            stop.store(true, Ordering::Release);
            let _ = std::os::unix::net::UnixStream::connect(&pu);
            let _ = std::net::TcpStream::connect(pt);
            let _ = hu.join();
            let _ = ht.join();
        }),
    })
}
