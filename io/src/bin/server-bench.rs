//! `server-bench`: metadata requests per second and p50/p99 latency of the
//! csnap server for 1, 4 and 16 clients over unix and TCP sockets, beside a
//! trivial echo server over the same transport in the same run (the
//! transport's limit), as a ratio.
//!
//! Set-up: a unique temp dir holding a sparse origin file and a store file,
//! formatted with 16 KiB chunks and opened; a `StoreWorker` and a
//! `ServerLoop` (in a thread) listening on a unix socket and 127.0.0.1:0; one
//! snapshot created through a control connection. The origin is split into
//! three regions:
//!
//! - A: written once by an untimed warm-up, so every chunk is unique (its
//!   copy-out is done) and an origin write query needs no copy-out;
//! - B: never written, so every snapshot chunk is still on the origin;
//! - C: fresh chunks, one per timed first write (copy-out + commit).
//!
//! Workloads, each one request at a time per client (queue depth 1), every
//! latency measured with `Instant` around send → reply:
//!
//! - `echo`: a frame of the size of a csnap request, echoed back by a trivial
//!   server (a single-threaded mio loop by default, like the csnap network
//!   thread; `--echo threads` for a thread per connection with blocking std
//!   sockets);
//! - (a) `QueryOriginWrite` of a unique chunk (region A): the metadata round
//!   trip through the server FSM, the store worker ring and a commit that has
//!   nothing to write;
//! - (b) `QuerySnapshotRead` of a chunk on the origin (region B): reply = an
//!   origin target + a read lock, followed by `FinishSnapshotRead` (no reply;
//!   the pair counts as one request, timed to the read reply);
//! - (c) `QueryOriginWrite` of a fresh chunk (region C): includes the 16 KiB
//!   copy-out and a group commit with fdatasync.
//!
//! Clients speak the protocol raw (`csnap_proto` encode/decode over std
//! sockets through `csnap_io::net::BlockingStream`), so the only client-side
//! work inside the timed section is one write and one read system call.
//!
//! Usage: `server-bench [--quick] [--requests N] [--copyout N] [--echo mio|threads]`

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use csnap_fsm::client::Request;
use csnap_fsm::server::ServerConfig;
use csnap_io::client::{control, Connection};
use csnap_io::net::{Addr, BlockingStream, MioListener, MioStream};
use csnap_io::server::{ServerLoop, Stop, BATCH_MAX};
use csnap_io::store_worker::StoreWorker;
use csnap_proto::{
    decode, encode, FrameReader, Header, Msg, Range, Ranges, Role, TargetKind, Volume,
    FRAME_MAX_BYTES, HEADER_BYTES, LIST_HEADER_BYTES, PROTOCOL_VERSION,
};
use csnap_store::disk::FileDisk;
use csnap_store::{FormatOptions, OpenOptions, Store};

// ---------------------------------------------------------------------------
// Fixed configuration.
// ---------------------------------------------------------------------------

const CHUNK_BYTES: u32 = 16 * 1024;
/// Origin size: 16384 chunks (sparse file).
const ORIGIN_BYTES: u64 = 256 << 20;
/// Store size (sparse file).
const STORE_BYTES: u64 = 512 << 20;
/// Region A: unique chunks (pre-written in the warm-up).
const REGION_A: (u64, u64) = (0, 1024);
/// Region B: chunks never written on the origin.
const REGION_B: (u64, u64) = (1024, 1024);
/// Region C: fresh chunks for first writes; the rest of the origin.
const REGION_C: (u64, u64) = (2048, ORIGIN_BYTES / CHUNK_BYTES as u64 - 2048);
/// Chunks per query in the untimed pre-write of region A.
const PREWRITE_CHUNKS: u32 = 16;
const SNAP_TAG: u32 = 1;
const SERVER_CLIENTS: usize = 64;
const SERVER_REQUESTS_PER_CLIENT: usize = 4;
const SERVER_READ_LOCKS: usize = 4096;
const ORIGIN_UUID: [u8; 16] = *b"csnap-bench-orig";
/// Socket read timeout: a stuck server is an error, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CLIENT_COUNTS: [usize; 3] = [1, 4, 16];
const COPYOUT_CLIENT_COUNTS: [usize; 2] = [1, 4];
/// Linux `USER_HZ`: the unit of utime/stime in /proc/*/stat.
const USER_HZ: f64 = 100.0;

// ---------------------------------------------------------------------------
// Options.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum EchoMode {
    Mio,
    Threads,
}

impl EchoMode {
    fn describe(self) -> &'static str {
        match self {
            EchoMode::Mio => {
                "one thread, mio (epoll, edge-triggered), non-blocking csnap_io::net MioStream, \
                 like the csnap network thread"
            }
            EchoMode::Threads => "a thread per connection, blocking std sockets",
        }
    }
}

struct Params {
    quick: bool,
    /// Timed requests per (transport, clients, workload), split evenly over
    /// the clients.
    requests: usize,
    /// Untimed requests per client before each timed run.
    warmup: usize,
    /// Timed first writes per copy-out configuration.
    copyout: usize,
    /// Time cap of one copy-out configuration.
    copyout_deadline: Duration,
    echo: EchoMode,
    /// `--only` filter: transports, client counts, workloads (empty = all).
    only: Vec<String>,
}

impl Params {
    /// Whether a run passes the `--only` filter: in each category named in
    /// the filter (transport, client count, workload) the run's value must be
    /// named.
    fn selected(&self, t: Transport, clients: usize, w: Workload) -> bool {
        let cats: [(&[&str], String); 3] = [
            (&["unix", "tcp"], t.name().to_string()),
            (&["1", "4", "16"], clients.to_string()),
            (&["echo", "a", "b", "c"], w.short().to_string()),
        ];
        cats.iter().all(|(names, v)| {
            let named = self.only.iter().any(|o| names.contains(&o.as_str()));
            !named || self.only.iter().any(|o| o == v)
        })
    }
}

const USAGE: &str =
    "usage: server-bench [--quick] [--requests N] [--copyout N] [--echo mio|threads] [--only LIST]

  --quick          short run (~10 s): 8000 requests per configuration, 300 first writes
  --requests N     timed requests per configuration, split over its clients (default 40000)
  --copyout N      timed first writes (copy-out + commit) per configuration (default 1000)
  --echo MODE      echo server: mio (default, one thread like the csnap network loop)
                   or threads (a thread per connection, blocking sockets)
  --only LIST      run only some configurations: a comma list of transports (unix, tcp),
                   client counts (1, 4, 16) and workloads (echo, a, b, c); a category
                   not named runs in full";

fn parse_args() -> Result<Option<Params>, String> {
    let mut p = Params {
        quick: false,
        requests: 40_000,
        warmup: 200,
        copyout: 1000,
        copyout_deadline: Duration::from_secs(8),
        echo: EchoMode::Mio,
        only: Vec::new(),
    };
    let mut requests = None;
    let mut copyout = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--quick" => p.quick = true,
            "--requests" => {
                let v = value("--requests")?;
                requests = Some(parse_count(&v, "--requests")?);
            }
            "--copyout" => {
                let v = value("--copyout")?;
                copyout = Some(parse_count(&v, "--copyout")?);
            }
            "--echo" => {
                p.echo = match value("--echo")?.as_str() {
                    "mio" => EchoMode::Mio,
                    "threads" => EchoMode::Threads,
                    other => {
                        return Err(format!(
                            "--echo takes mio or threads, not {other:?}\n{USAGE}"
                        ))
                    }
                }
            }
            "--only" => {
                for o in value("--only")?.split(',') {
                    if !["unix", "tcp", "1", "4", "16", "echo", "a", "b", "c"].contains(&o) {
                        return Err(format!("--only: unknown item {o:?}\n{USAGE}"));
                    }
                    p.only.push(o.to_string());
                }
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if p.quick {
        p.requests = 8000;
        p.warmup = 50;
        p.copyout = 300;
        p.copyout_deadline = Duration::from_secs(2);
    }
    if let Some(r) = requests {
        p.requests = r;
    }
    if let Some(c) = copyout {
        p.copyout = c;
    }
    let per_config_max = REGION_C.1 / COPYOUT_CLIENT_COUNTS.len() as u64 / 2;
    if u64::try_from(p.copyout).map_or(true, |c| c > per_config_max) {
        return Err(format!(
            "--copyout {} is more than the {per_config_max} fresh chunks each copy-out \
             configuration has",
            p.copyout
        ));
    }
    Ok(Some(p))
}

fn parse_count(v: &str, name: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n >= 16 => Ok(n),
        _ => Err(format!("{name} takes a count of at least 16, not {v:?}")),
    }
}

// ---------------------------------------------------------------------------
// Workloads and results.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Echo,
    OriginUnique,
    SnapRead,
    CopyOut,
}

impl Workload {
    fn short(self) -> &'static str {
        match self {
            Workload::Echo => "echo",
            Workload::OriginUnique => "a",
            Workload::SnapRead => "b",
            Workload::CopyOut => "c",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Workload::Echo => "echo",
            Workload::OriginUnique => "(a) origin write, unique",
            Workload::SnapRead => "(b) snapshot read+finish",
            Workload::CopyOut => "(c) with copy-out + commit",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Unix,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }
}

struct RunResult {
    transport: Transport,
    clients: usize,
    workload: Workload,
    done: usize,
    wall: Duration,
    p50_ns: u64,
    p99_ns: u64,
    mean_ns: u64,
    /// Journal commits during the run (csnap workloads).
    commits: Option<u64>,
    /// Stopped by the time cap before the count.
    capped: bool,
    cpu: CpuUse,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.done as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// CPU used during a run, in CPUs (1.0 = one CPU busy the whole run).
#[derive(Clone, Copy, Default)]
struct CpuUse {
    net: f64,
    store: f64,
    echo: f64,
    /// This process.
    total: f64,
    /// The whole machine (user, nice, system, irq, softirq), from /proc/stat.
    machine: f64,
    /// Stolen by the hypervisor.
    steal: f64,
}

// ---------------------------------------------------------------------------
// A raw protocol connection.
// ---------------------------------------------------------------------------

struct Wire {
    stream: BlockingStream,
    reader: FrameReader<Box<[u8]>>,
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl Wire {
    fn connect(addr: &Addr) -> Result<Wire, String> {
        let stream = BlockingStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| format!("set a read timeout on {addr}: {e}"))?;
        Ok(Wire {
            stream,
            reader: FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice()),
            tx: vec![0u8; 1024],
            rx: Vec::with_capacity(FRAME_MAX_BYTES),
        })
    }

    /// Encodes `msg` into the send buffer; returns its length.
    fn encode(&mut self, id: u64, msg: &Msg<'_>) -> Result<usize, String> {
        encode(&Header::new(id, 0), msg, &mut self.tx).map_err(|e| format!("encode: {e:?}"))
    }

    fn send(&mut self, n: usize) -> Result<(), String> {
        self.stream
            .write_all(&self.tx[..n])
            .map_err(|e| format!("send: {e}"))
    }

    /// Reads one whole frame into `rx`.
    fn recv(&mut self) -> Result<&[u8], String> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => {
                    self.rx.clear();
                    self.rx.extend_from_slice(f);
                    return Ok(&self.rx);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("bad frame from the server: {e}")),
            }
            match self.stream.read(self.reader.spare()) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => self.reader.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!(
                        "no reply within {} s (server stuck?)",
                        IO_TIMEOUT.as_secs()
                    ))
                }
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
    }

    fn call(&mut self, id: u64, msg: &Msg<'_>) -> Result<(), String> {
        let n = self.encode(id, msg)?;
        self.send(n)?;
        self.recv()?;
        Ok(())
    }
}

fn unexpected(what: &str, frame: &[u8]) -> String {
    match decode(frame) {
        Ok((_, Msg::Error { code, text, .. })) => {
            format!(
                "{what}: server error {} ({}): {text}",
                code.name(),
                code.code()
            )
        }
        Ok((h, m)) => format!(
            "{what}: unexpected {} (request id {})",
            m.kind().name(),
            h.request_id
        ),
        Err(e) => format!("{what}: undecodable reply: {e}"),
    }
}

/// `Hello` + `Identify` as a block-device client of `volume`.
fn handshake(w: &mut Wire, client_id: u64, volume: Volume) -> Result<(), String> {
    w.call(
        0,
        &Msg::Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            role: Role::Client,
        },
    )?;
    if !matches!(decode(&w.rx), Ok((_, Msg::HelloOk { .. }))) {
        return Err(unexpected("Hello", &w.rx));
    }
    w.call(
        0,
        &Msg::Identify {
            client_id,
            node_id: 1,
            volume,
            origin_uuid: ORIGIN_UUID,
            volume_size_bytes: 0,
            chunk_size_bytes: 0,
            flags: 0,
        },
    )?;
    if !matches!(decode(&w.rx), Ok((_, Msg::IdentifyOk { .. }))) {
        return Err(unexpected("Identify", &w.rx));
    }
    Ok(())
}

/// One request at queue depth 1; returns its latency in ns (send → reply).
fn one_request(w: &mut Wire, workload: Workload, id: u64, chunk: u64) -> Result<u64, String> {
    let range = Range { chunk, chunks: 1 };
    let mut lb = [0u8; LIST_HEADER_BYTES + 16];
    let ranges =
        Ranges::from_entries(&[range], &mut lb).map_err(|e| format!("range list: {e:?}"))?;
    let msg = match workload {
        Workload::SnapRead => Msg::QuerySnapshotRead(ranges),
        _ => Msg::QueryOriginWrite(ranges),
    };
    let n = w.encode(id, &msg)?;
    let t0 = Instant::now();
    w.send(n)?;
    w.recv()?;
    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    match workload {
        Workload::Echo => {
            if w.rx[..] != w.tx[..n] {
                return Err("the echo differs from the frame sent".into());
            }
        }
        Workload::OriginUnique | Workload::CopyOut => match decode(&w.rx) {
            Ok((h, Msg::OriginWriteOk(r))) if h.request_id == id && r.get(0) == Some(range) => {}
            _ => return Err(unexpected("QueryOriginWrite", &w.rx)),
        },
        Workload::SnapRead => {
            let ok = match decode(&w.rx) {
                Ok((h, Msg::SnapshotReadReply(t))) if h.request_id == id && t.len() == 1 => t
                    .get(0)
                    .is_some_and(|t| t.kind == TargetKind::Origin && t.range() == range),
                _ => return Err(unexpected("QuerySnapshotRead", &w.rx)),
            };
            if !ok {
                return Err(format!(
                    "QuerySnapshotRead of chunk {chunk}: expected one origin target, got {:?}",
                    decode(&w.rx).map(|(_, m)| m)
                ));
            }
            let n = w.encode(0, &Msg::FinishSnapshotRead(ranges))?;
            w.send(n)?;
        }
    }
    Ok(ns)
}

// ---------------------------------------------------------------------------
// Client threads.
// ---------------------------------------------------------------------------

struct Job {
    workload: Workload,
    /// Chunks this client uses: `base .. base + len`.
    base: u64,
    len: u64,
    /// Untimed warm-up requests (origin clients of (c) warm up on region A).
    warmup: usize,
    count: usize,
    deadline: Option<Duration>,
}

struct ThreadOut {
    /// Kept open until the CPU figures are read: a per-connection echo
    /// thread's CPU time goes with it when the connection closes.
    wire: Wire,
    lat: Vec<u64>,
    end: Instant,
    capped: bool,
}

fn client_thread(mut w: Wire, job: &Job, barrier: &Barrier) -> Result<ThreadOut, String> {
    let mut id = 1u64;
    let warm = (|| {
        let (wl, base, len) = match job.workload {
            Workload::CopyOut => (Workload::OriginUnique, REGION_A.0, REGION_A.1),
            wl => (wl, job.base, job.len),
        };
        for k in 0..job.warmup {
            let c = base + u64::try_from(k).unwrap_or(0) % len;
            one_request(&mut w, wl, id, c)?;
            id += 1;
        }
        Ok::<(), String>(())
    })();
    let mut lat = Vec::with_capacity(job.count);
    // Every thread passes the barrier exactly once, even after an error.
    barrier.wait();
    warm.map_err(|e| format!("warm-up: {e}"))?;
    let start = Instant::now();
    let mut capped = false;
    for k in 0..job.count {
        if let Some(d) = job.deadline {
            if start.elapsed() > d {
                capped = true;
                break;
            }
        }
        let c = job.base + u64::try_from(k).unwrap_or(0) % job.len;
        lat.push(one_request(&mut w, job.workload, id, c)?);
        id += 1;
    }
    Ok(ThreadOut {
        wire: w,
        lat,
        end: Instant::now(),
        capped,
    })
}

// ---------------------------------------------------------------------------
// Echo servers.
// ---------------------------------------------------------------------------

struct EchoServer {
    unix: Addr,
    tcp: Addr,
    stop: Box<dyn FnOnce()>,
}

/// Length of the frame at the front of `buf`, once its header is in.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ()> {
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

struct EchoConn {
    stream: MioStream,
    buf: Vec<u8>,
    have: usize,
    out: Vec<u8>,
    out_at: usize,
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

const ECHO_WAKE: mio::Token = mio::Token(usize::MAX);
const ECHO_LISTEN: usize = usize::MAX - 8;

fn echo_mio_loop(
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

fn accept_echo(
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

fn start_echo_mio(dir: &Path) -> Result<EchoServer, String> {
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

fn echo_blocking<S: Read + Write>(mut s: S) {
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

fn start_echo_threads(dir: &Path) -> Result<EchoServer, String> {
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

// ---------------------------------------------------------------------------
// The csnap server.
// ---------------------------------------------------------------------------

struct Csnap {
    unix: Addr,
    tcp: Addr,
    stopped: Arc<Mutex<Option<String>>>,
}

fn start_csnap(dir: &Path) -> Result<Csnap, String> {
    let origin = dir.join("origin");
    let store = dir.join("store");
    let mk = |p: &Path, len: u64| {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(len))
            .map_err(|e| format!("create {}: {e}", p.display()))
    };
    mk(&origin, ORIGIN_BYTES)?;
    mk(&store, STORE_BYTES)?;
    let mut o = FormatOptions::new(ORIGIN_BYTES);
    o.chunk_size_bytes = CHUNK_BYTES;
    o.origin_uuid = ORIGIN_UUID;
    o.store_uuid = *b"csnap-bench-stor";
    let mut sd = FileDisk::open(&store).map_err(|e| format!("open the store: {e}"))?;
    csnap_store::format(&mut sd, &o).map_err(|e| format!("format the store: {e}"))?;
    let mut st =
        Store::open(sd, &OpenOptions::default()).map_err(|e| format!("open the store: {e}"))?;
    let incarnation = st
        .bump_incarnation()
        .map_err(|e| format!("bump the incarnation: {e}"))?;
    st.commit().map_err(|e| format!("commit: {e}"))?;
    let label = *st.label();
    let od = FileDisk::open(&origin).map_err(|e| format!("open the origin: {e}"))?;
    let worker = StoreWorker::new(st, od, BATCH_MAX);
    let cfg = ServerConfig {
        clients: SERVER_CLIENTS,
        requests_per_client: SERVER_REQUESTS_PER_CLIENT,
        read_locks: SERVER_READ_LOCKS,
        incarnation,
        server_id: 1,
        chunk_size_bytes: label.chunk_size_bytes,
        origin_size_bytes: label.origin_size_bytes,
        origin_uuid: label.origin_uuid,
    };
    let listen = vec![
        Addr::Unix(dir.join("csnap.sock")),
        Addr::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
    ];
    let stopped = Arc::new(Mutex::new(None));
    let stopped2 = stopped.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("csnap-net".into())
        .spawn(move || {
            let mut l = match ServerLoop::new(cfg, &listen, worker) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("start the server: {e}")));
                    return;
                }
            };
            let _ = tx.send(Ok(l.local_addrs()));
            let why = match l.run() {
                Stop::StoreFailed => "the store failed".to_string(),
                Stop::Fenced => "fenced by a newer incarnation".to_string(),
                Stop::Io(e) => format!("event loop I/O error: {e}"),
                Stop::AgentGone => "the agent link closed".to_string(),
            };
            if let Ok(mut s) = stopped2.lock() {
                *s = Some(why);
            }
        })
        .map_err(|e| format!("spawn the server: {e}"))?;
    let addrs = rx
        .recv()
        .map_err(|_| "the server thread died during start-up".to_string())??;
    let [unix, tcp] = addrs.as_slice() else {
        return Err(format!(
            "the server listens on {addrs:?}, expected two addresses"
        ));
    };
    Ok(Csnap {
        unix: unix.clone(),
        tcp: tcp.clone(),
        stopped,
    })
}

impl Csnap {
    fn addr(&self, t: Transport) -> &Addr {
        match t {
            Transport::Unix => &self.unix,
            Transport::Tcp => &self.tcp,
        }
    }

    /// The error, with the server's stop reason when it stopped.
    fn explain(&self, e: String) -> String {
        match self.stopped.lock().ok().and_then(|s| s.clone()) {
            Some(why) => format!("{e} (the server stopped: {why})"),
            None => e,
        }
    }
}

fn commits(ctl: &mut Connection) -> Result<u64, String> {
    match ctl.call(Request::Status) {
        Ok(Msg::StatusReply { commits, .. }) => Ok(commits),
        Ok(m) => Err(format!("Status: unexpected {}", m.kind().name())),
        Err(e) => Err(format!("Status: {e}")),
    }
}

// ---------------------------------------------------------------------------
// CPU accounting from /proc.
// ---------------------------------------------------------------------------

/// utime + stime ticks of this process's threads, by thread name.
#[derive(Default)]
struct CpuSnap {
    net: u64,
    store: u64,
    echo: u64,
    total: u64,
    machine: u64,
    steal: u64,
}

/// Busy and steal ticks of the whole machine.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    Some((busy, *f.get(7)?))
}

fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn cpu_snap() -> CpuSnap {
    let mut s = CpuSnap::default();
    if let Some((busy, steal)) = machine_ticks() {
        s.machine = busy;
        s.steal = steal;
    }
    if let Some(t) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|st| stat_ticks(&st))
    {
        s.total = t;
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return s;
    };
    for e in dir.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let Some(t) = std::fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|st| stat_ticks(&st))
        else {
            continue;
        };
        match comm.trim() {
            "csnap-net" => s.net += t,
            "csnap-store" => s.store += t,
            c if c.starts_with("echo-") => s.echo += t,
            _ => {}
        }
    }
    s
}

fn cpu_use(a: &CpuSnap, b: &CpuSnap, wall: Duration) -> CpuUse {
    let w = wall.as_secs_f64().max(1e-9) * USER_HZ;
    // Threads that exited during the run (echo connection threads) drop out
    // of the per-thread sums; the process total keeps them.
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / w;
    CpuUse {
        net: d(a.net, b.net),
        store: d(a.store, b.store),
        echo: d(a.echo, b.echo),
        total: d(a.total, b.total),
        machine: d(a.machine, b.machine),
        steal: d(a.steal, b.steal),
    }
}

// ---------------------------------------------------------------------------
// One configuration.
// ---------------------------------------------------------------------------

struct Run<'a> {
    transport: Transport,
    clients: usize,
    workload: Workload,
    addr: &'a Addr,
    /// Chunks of the configuration, split over its clients.
    region: (u64, u64),
    count: usize,
    warmup: usize,
    deadline: Option<Duration>,
}

/// Nearest-rank percentile `p` (in percent) of sorted samples.
fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn run_config(
    run: &Run<'_>,
    next_client_id: &mut u64,
    ctl: &mut Connection,
) -> Result<RunResult, String> {
    let n = run.clients;
    let per_client = run.count / n;
    let n64 = u64::try_from(n).map_err(|_| "client count".to_string())?;
    let slice = run.region.1 / n64;
    if slice == 0
        || (run.workload == Workload::CopyOut
            && u64::try_from(per_client).map_or(true, |c| slice < c))
    {
        return Err(format!(
            "region of {} chunks too small for {n} clients",
            run.region.1
        ));
    }
    // Connect (and identify) every client before timing.
    let mut wires = Vec::with_capacity(n);
    for _ in 0..n {
        let mut w = Wire::connect(run.addr)?;
        if run.workload != Workload::Echo {
            let volume = if run.workload == Workload::SnapRead {
                Volume::Snapshot(SNAP_TAG)
            } else {
                Volume::Origin
            };
            handshake(&mut w, *next_client_id, volume)?;
            *next_client_id += 1;
        }
        wires.push(w);
    }
    let commits_before = if run.workload == Workload::Echo {
        None
    } else {
        Some(commits(ctl)?)
    };
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut handles: Vec<JoinHandle<Result<ThreadOut, String>>> = Vec::with_capacity(n);
    for (i, w) in wires.into_iter().enumerate() {
        let job = Job {
            workload: run.workload,
            base: run.region.0 + u64::try_from(i).unwrap_or(0) * slice,
            len: slice,
            warmup: run.warmup,
            count: per_client,
            deadline: run.deadline,
        };
        let b = barrier.clone();
        let h = std::thread::Builder::new()
            .name(format!("client-{i}"))
            .spawn(move || client_thread(w, &job, &b));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                // The threads already started wait at the barrier: this
                // process cannot go on.
                return Err(format!("spawn a client thread: {e}"));
            }
        }
    }
    barrier.wait();
    let cpu0 = cpu_snap();
    let start = Instant::now();
    let mut lat = Vec::with_capacity(per_client * n);
    let mut end = start;
    let mut capped = false;
    let mut first_err = None;
    let mut open = Vec::with_capacity(n);
    for h in handles {
        match h.join() {
            Ok(Ok(out)) => {
                lat.extend_from_slice(&out.lat);
                end = end.max(out.end);
                capped |= out.capped;
                open.push(out.wire);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert_with(|| "a client thread panicked".to_string());
            }
        }
    }
    let cpu1 = cpu_snap();
    drop(open);
    if let Some(e) = first_err {
        return Err(e);
    }
    let wall = end.duration_since(start);
    let commits = match commits_before {
        Some(c0) => Some(commits(ctl)?.saturating_sub(c0)),
        None => None,
    };
    lat.sort_unstable();
    let sum: u128 = lat.iter().map(|&x| u128::from(x)).sum();
    let mean = u64::try_from(sum / u128::from(u64::try_from(lat.len().max(1)).unwrap_or(1)))
        .unwrap_or(u64::MAX);
    Ok(RunResult {
        transport: run.transport,
        clients: n,
        workload: run.workload,
        done: lat.len(),
        wall,
        p50_ns: percentile(&lat, 50),
        p99_ns: percentile(&lat, 99),
        mean_ns: mean,
        commits,
        capped,
        cpu: cpu_use(&cpu0, &cpu1, wall),
    })
}

// ---------------------------------------------------------------------------
// Output.
// ---------------------------------------------------------------------------

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn print_run(r: &RunResult, echo: Option<&RunResult>) {
    let line = format!(
        "  {:<4} {:>2} cl  {:<27} {:>6} req {:>6.2} s {:>9.0} req/s  p50 {:>8.1} us  p99 {:>8.1} us  mean {:>8.1} us",
        r.transport.name(),
        r.clients,
        r.workload.label(),
        r.done,
        r.wall.as_secs_f64(),
        r.rate(),
        us(r.p50_ns),
        us(r.p99_ns),
        us(r.mean_ns),
    );
    println!("{line}");
    let c = r.cpu;
    let mut cpu = String::from("        ");
    if let (Some(e), true) = (echo, r.workload != Workload::Echo) {
        cpu.push_str(&format!(
            "csnap/echo: req/s {}, p50 {}; ",
            ratio(r.rate(), e.rate()),
            ratio(r.p50_ns as f64, e.p50_ns as f64)
        ));
    }
    cpu.push_str(&format!("cpu (CPUs busy): process {:.2}", c.total));
    if r.workload == Workload::Echo {
        cpu.push_str(&format!(", echo server {:.2}", c.echo));
    } else {
        cpu.push_str(&format!(
            ", csnap net thread {:.2}, store worker {:.2}",
            c.net, c.store
        ));
    }
    cpu.push_str(&format!(
        "; machine {:.2} (other processes ~{:.2}, steal {:.2})",
        c.machine,
        (c.machine - c.total).max(0.0),
        c.steal
    ));
    if let Some(k) = r.commits {
        cpu.push_str(&format!("; journal commits {k}"));
    }
    if r.capped {
        cpu.push_str("; stopped by the time cap");
    }
    println!("{cpu}");
}

fn machine_facts(dir: &Path) {
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_string());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let (fs, dev) = mount_of(dir).unwrap_or_else(|| ("?".into(), "?".into()));
    println!(
        "machine: nproc {nproc}; kernel {kernel}; cpu {cpu}; {}",
        loadavg()
    );
    println!(
        "files:   {} ({fs} on {dev}); build {}",
        dir.display(),
        if cfg!(debug_assertions) {
            "debug (use --release for figures)"
        } else {
            "release"
        }
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "load average ?".into(),
        |s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            format!("load average {}", f.join(" "))
        },
    )
}

/// File system type and device of the mount holding `p`.
fn mount_of(p: &Path) -> Option<(String, String)> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let p = p.canonicalize().ok()?;
    let mut best: Option<(usize, String, String)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [dev, at, fs, ..] = f.as_slice() else {
            continue;
        };
        if p.starts_with(at) && best.as_ref().is_none_or(|b| at.len() >= b.0) {
            best = Some((at.len(), (*fs).to_string(), (*dev).to_string()));
        }
    }
    best.map(|b| (b.1, b.2))
}

fn print_config(p: &Params) {
    let chunks = ORIGIN_BYTES / u64::from(CHUNK_BYTES);
    println!(
        "config:  chunk {} KiB; origin {} MiB ({chunks} chunks, sparse); store {} MiB (sparse); \
         one snapshot (tag {SNAP_TAG})",
        CHUNK_BYTES / 1024,
        ORIGIN_BYTES >> 20,
        STORE_BYTES >> 20
    );
    println!(
        "         server: clients {SERVER_CLIENTS}, requests/client {SERVER_REQUESTS_PER_CLIENT}, \
         read locks {SERVER_READ_LOCKS}, store batch max {BATCH_MAX}; net thread + store \
         worker thread"
    );
    println!(
        "         regions: A chunks {}..{} pre-written (unique), B {}..{} never written \
         (on the origin), C {}..{} fresh",
        REGION_A.0,
        REGION_A.0 + REGION_A.1,
        REGION_B.0,
        REGION_B.0 + REGION_B.1,
        REGION_C.0,
        REGION_C.0 + REGION_C.1
    );
    println!(
        "         each run: {} timed requests split over the clients (queue depth 1 each), \
         after {} untimed per client; (c): {} timed first writes, cap {} s, clients {:?}",
        p.requests,
        p.warmup,
        p.copyout,
        p.copyout_deadline.as_secs(),
        COPYOUT_CLIENT_COUNTS
    );
    println!(
        "         clients: raw protocol over std sockets (TCP_NODELAY), a thread each; request \
         frames {} B (one range); replies: (a)/(c) {} B, (b) {} B + a {} B FinishSnapshotRead sent \
         after the reply",
        HEADER_BYTES + LIST_HEADER_BYTES + 16,
        HEADER_BYTES + LIST_HEADER_BYTES + 16,
        HEADER_BYTES + LIST_HEADER_BYTES + 24,
        HEADER_BYTES + LIST_HEADER_BYTES + 16
    );
    println!(
        "         echo: {}; echoes {} B frames",
        p.echo.describe(),
        HEADER_BYTES + LIST_HEADER_BYTES + 16
    );
    if !p.only.is_empty() {
        println!("         only: {}", p.only.join(","));
    }
    println!(
        "         percentiles: nearest rank over every timed request; req/s = requests / wall \
         time from the start barrier to the last client's end; cpu from /proc (10 ms ticks)"
    );
}

fn print_table(results: &[RunResult]) {
    println!();
    println!("summary (ratios: csnap / echo, same transport and client count)");
    println!(
        "{:<5} {:>7}  {:<27} {:>10} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "trans",
        "clients",
        "workload",
        "req/s",
        "p50 us",
        "p99 us",
        "req/s rat",
        "p50 rat",
        "commits"
    );
    for r in results {
        let echo = results.iter().find(|e| {
            e.workload == Workload::Echo && e.transport == r.transport && e.clients == r.clients
        });
        let (rt, pt) = match (echo, r.workload) {
            (Some(e), w) if w != Workload::Echo => (
                ratio(r.rate(), e.rate()),
                ratio(r.p50_ns as f64, e.p50_ns as f64),
            ),
            _ => ("".into(), "".into()),
        };
        println!(
            "{:<5} {:>7}  {:<27} {:>10.0} {:>9.1} {:>9.1} {:>10} {:>10} {:>8}",
            r.transport.name(),
            r.clients,
            r.workload.label(),
            r.rate(),
            us(r.p50_ns),
            us(r.p99_ns),
            rt,
            pt,
            r.commits.map_or_else(String::new, |c| c.to_string())
        );
    }
}

// ---------------------------------------------------------------------------
// Main.
// ---------------------------------------------------------------------------

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> Result<TempDir, String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let d = std::env::temp_dir().join(format!(
        "csnap-server-bench-{}-{nanos:x}",
        std::process::id()
    ));
    // create_dir (not _all): fails if the name is taken.
    std::fs::create_dir(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
    Ok(TempDir(d))
}

/// Makes every chunk of region A unique: one untimed first write each.
fn prewrite(addr: &Addr, client_id: u64) -> Result<(), String> {
    let mut w = Wire::connect(addr)?;
    handshake(&mut w, client_id, Volume::Origin)?;
    let mut id = 1;
    let mut c = REGION_A.0;
    while c < REGION_A.0 + REGION_A.1 {
        let range = Range {
            chunk: c,
            chunks: PREWRITE_CHUNKS,
        };
        let mut lb = [0u8; LIST_HEADER_BYTES + 16];
        let ranges =
            Ranges::from_entries(&[range], &mut lb).map_err(|e| format!("range list: {e:?}"))?;
        w.call(id, &Msg::QueryOriginWrite(ranges))?;
        if !matches!(decode(&w.rx), Ok((h, Msg::OriginWriteOk(_))) if h.request_id == id) {
            return Err(unexpected("pre-write QueryOriginWrite", &w.rx));
        }
        id += 1;
        c += u64::from(PREWRITE_CHUNKS);
    }
    Ok(())
}

fn bench(p: &Params, dir: &Path) -> Result<Vec<RunResult>, String> {
    let csnap = start_csnap(dir)?;
    let echo = match p.echo {
        EchoMode::Mio => start_echo_mio(dir)?,
        EchoMode::Threads => start_echo_threads(dir)?,
    };
    let r = bench_with(p, &csnap, &echo).map_err(|e| csnap.explain(e));
    (echo.stop)();
    r
}

fn bench_with(p: &Params, csnap: &Csnap, echo: &EchoServer) -> Result<Vec<RunResult>, String> {
    let mut ctl = control(&csnap.unix).map_err(|e| format!("control connection: {e}"))?;
    match ctl.call(Request::Create(SNAP_TAG)) {
        Ok(Msg::Ok) => {}
        Ok(m) => return Err(format!("create snapshot: unexpected {}", m.kind().name())),
        Err(e) => return Err(format!("create snapshot: {e}")),
    }
    let mut next_client_id = 100u64;
    let t0 = Instant::now();
    prewrite(&csnap.unix, next_client_id)?;
    next_client_id += 1;
    println!(
        "setup:   snapshot {SNAP_TAG} created; region A pre-written ({} chunks copied out) in \
         {:.2} s",
        REGION_A.1,
        t0.elapsed().as_secs_f64()
    );
    println!();
    let mut results: Vec<RunResult> = Vec::new();
    let mut c_slice = 0u64;
    let c_len = u64::try_from(p.copyout).map_err(|_| "copy-out count".to_string())?;
    for t in [Transport::Unix, Transport::Tcp] {
        let any = CLIENT_COUNTS.iter().any(|&n| {
            [
                Workload::Echo,
                Workload::OriginUnique,
                Workload::SnapRead,
                Workload::CopyOut,
            ]
            .iter()
            .any(|&w| p.selected(t, n, w))
        });
        if !any {
            continue;
        }
        println!("{}:", t.name());
        let echo_addr = match t {
            Transport::Unix => &echo.unix,
            Transport::Tcp => &echo.tcp,
        };
        for &n in &CLIENT_COUNTS {
            let mut echo_idx = None;
            for w in [Workload::Echo, Workload::OriginUnique, Workload::SnapRead] {
                if !p.selected(t, n, w) {
                    continue;
                }
                let run = Run {
                    transport: t,
                    clients: n,
                    workload: w,
                    addr: if w == Workload::Echo {
                        echo_addr
                    } else {
                        csnap.addr(t)
                    },
                    region: match w {
                        Workload::SnapRead => REGION_B,
                        _ => REGION_A,
                    },
                    count: p.requests,
                    warmup: p.warmup,
                    deadline: None,
                };
                let r = run_config(&run, &mut next_client_id, &mut ctl)
                    .map_err(|e| format!("{} {n} clients {}: {e}", t.name(), w.label()))?;
                print_run(&r, echo_idx.map(|i: usize| &results[i]));
                if w == Workload::Echo {
                    echo_idx = Some(results.len());
                }
                results.push(r);
            }
        }
        for &n in &COPYOUT_CLIENT_COUNTS {
            if !p.selected(t, n, Workload::CopyOut) {
                c_slice += 1;
                continue;
            }
            let run = Run {
                transport: t,
                clients: n,
                workload: Workload::CopyOut,
                addr: csnap.addr(t),
                region: (REGION_C.0 + c_slice * c_len, c_len),
                count: p.copyout,
                warmup: p.warmup,
                deadline: Some(p.copyout_deadline),
            };
            c_slice += 1;
            let r = run_config(&run, &mut next_client_id, &mut ctl).map_err(|e| {
                format!(
                    "{} {n} clients {}: {e}",
                    t.name(),
                    Workload::CopyOut.label()
                )
            })?;
            let echo = results
                .iter()
                .find(|e| e.workload == Workload::Echo && e.transport == t && e.clients == n);
            print_run(&r, echo);
            results.push(r);
        }
        println!();
    }
    Ok(results)
}

fn main() -> ExitCode {
    let p = match parse_args() {
        Ok(Some(p)) => p,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("server-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = match temp_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("server-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let began = Instant::now();
    println!(
        "csnap server-bench{}: metadata requests/s and p50/p99 latency vs an echo server",
        if p.quick { " --quick" } else { "" }
    );
    machine_facts(&dir.0);
    print_config(&p);
    let r = bench(&p, &dir.0);
    match r {
        Ok(results) => {
            print_table(&results);
            println!();
            println!(
                "total time {:.1} s; {} at the end",
                began.elapsed().as_secs_f64(),
                loadavg()
            );
            // The csnap server thread has no stop call: it ends with the
            // process. The temp dir goes now.
            drop(dir);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("server-bench: {e}");
            drop(dir);
            ExitCode::FAILURE
        }
    }
}
