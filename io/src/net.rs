//! Listen addresses and streams over TCP or unix sockets, for mio and for
//! blocking clients.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where a server listens or a client connects: a unix socket path, or
/// `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl Addr {
    /// Parses `ADDR`: anything with a `/` or no `:` is a unix path, otherwise
    /// `host:port` (resolved once, here).
    pub fn parse(s: &str) -> Result<Addr, String> {
        if s.is_empty() {
            return Err("empty address".into());
        }
        if s.contains('/') || !s.contains(':') {
            return Ok(Addr::Unix(PathBuf::from(s)));
        }
        use std::net::ToSocketAddrs;
        let mut it = s
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {s:?}: {e}"))?;
        it.next()
            .map(Addr::Tcp)
            .ok_or_else(|| format!("{s:?} resolves to no address"))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "{}", p.display()),
            Addr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A blocking stream for clients.
#[derive(Debug)]
pub enum BlockingStream {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// Unix.
    Unix(std::os::unix::net::UnixStream),
}

impl BlockingStream {
    /// Connects.
    pub fn connect(addr: &Addr) -> io::Result<BlockingStream> {
        Ok(match addr {
            Addr::Unix(p) => BlockingStream::Unix(std::os::unix::net::UnixStream::connect(p)?),
            Addr::Tcp(a) => {
                let s = std::net::TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                BlockingStream::Tcp(s)
            }
        })
    }

    /// Sets a read timeout.
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            BlockingStream::Tcp(s) => s.set_read_timeout(t),
            BlockingStream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            BlockingStream::Tcp(s) => s.set_nonblocking(on),
            BlockingStream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Shuts both directions down.
    pub fn shutdown(&self) {
        let _ = match self {
            BlockingStream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            BlockingStream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.read(buf),
            BlockingStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for BlockingStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.write(buf),
            BlockingStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A non-blocking stream registered with mio.
#[derive(Debug)]
pub enum MioStream {
    /// TCP.
    Tcp(mio::net::TcpStream),
    /// Unix.
    Unix(mio::net::UnixStream),
}

impl Read for MioStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            MioStream::Tcp(s) => s.read(buf),
            MioStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for MioStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MioStream::Tcp(s) => s.write(buf),
            MioStream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            MioStream::Tcp(s) => s.write_vectored(bufs),
            MioStream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl mio::event::Source for MioStream {
    fn register(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        match self {
            MioStream::Tcp(s) => s.register(r, t, i),
            MioStream::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        match self {
            MioStream::Tcp(s) => s.reregister(r, t, i),
            MioStream::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        match self {
            MioStream::Tcp(s) => s.deregister(r),
            MioStream::Unix(s) => s.deregister(r),
        }
    }
}

/// A listener registered with mio.
#[derive(Debug)]
pub enum MioListener {
    /// TCP.
    Tcp(mio::net::TcpListener),
    /// Unix, with the path to remove on drop.
    Unix(mio::net::UnixListener, PathBuf),
}

impl MioListener {
    /// Binds. A unix path whose socket no server answers is taken over; one
    /// that a server answers is refused.
    pub fn bind(addr: &Addr) -> io::Result<MioListener> {
        match addr {
            Addr::Tcp(a) => Ok(MioListener::Tcp(mio::net::TcpListener::bind(*a)?)),
            Addr::Unix(p) => {
                if p.exists() {
                    if std::os::unix::net::UnixStream::connect(p).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("a server is already listening on {}", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?;
                }
                Ok(MioListener::Unix(
                    mio::net::UnixListener::bind(p)?,
                    p.clone(),
                ))
            }
        }
    }

    /// The bound address (TCP port resolved).
    pub fn local_addr(&self) -> io::Result<Addr> {
        match self {
            MioListener::Tcp(l) => Ok(Addr::Tcp(l.local_addr()?)),
            MioListener::Unix(_, p) => Ok(Addr::Unix(p.clone())),
        }
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<MioStream> {
        match self {
            MioListener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok(MioStream::Tcp(s))
            }
            MioListener::Unix(l, _) => Ok(MioStream::Unix(l.accept()?.0)),
        }
    }
}

impl MioListener {
    /// Removes a unix listener's socket file now (a confined process that
    /// stops by `_exit` drops nothing; the descriptor goes with it).
    pub fn remove_socket_file(&self) {
        if let MioListener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for MioListener {
    fn drop(&mut self) {
        if let MioListener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl mio::event::Source for MioListener {
    fn register(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        match self {
            MioListener::Tcp(l) => l.register(r, t, i),
            MioListener::Unix(l, _) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        match self {
            MioListener::Tcp(l) => l.reregister(r, t, i),
            MioListener::Unix(l, _) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        match self {
            MioListener::Tcp(l) => l.deregister(r),
            MioListener::Unix(l, _) => l.deregister(r),
        }
    }
}
