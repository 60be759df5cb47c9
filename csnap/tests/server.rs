//! The real `csnap` binary as separate processes: a `csnap server`, `csnap
//! io` volume clients (each its own process doing its own data I/O on the
//! shared origin and store files), raw protocol clients written here with
//! `csnap_proto`, and the control commands.
//!
//! - cbtb-style scenarios (ddsnap's `snapshot-microtests.sh`): a shadow copy
//!   of every device is kept in memory and after every step each device is
//!   read in full through its own client process and compared with it;
//! - clients that die holding read locks or with a write waiting;
//! - malformed and hostile input beside a well-behaved client;
//! - error paths of the control commands.
//!
//! Every server and client process is killed when its guard is dropped, and
//! every test works in its own temporary directory, removed at the end.

// Test code: offsets and sizes are a few MiB at most and move freely between
// u64 and usize.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use csnap_proto::{
    self as proto, ErrorCode, Header, Kind, Msg, Range, Ranges, Role, Target, TargetKind, Volume,
};

const BIN: &str = env!("CARGO_BIN_EXE_csnap");
const CHUNK: u64 = 16 * 1024;
/// Generous: the tests run beside others on 2 cores.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long a blocked request must stay unanswered.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Data.
// ---------------------------------------------------------------------------

/// xorshift64: deterministic data, never a zero byte (so a stray read of
/// zeroes, or of another region, shows up, like cbtb's DEADBEEF fill).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = csnap_testkit::XorShift64::new(seed.wrapping_mul(csnap_testkit::GOLDEN_GAMMA) | 1);
    (0..len).map(|_| (x.next_u64() >> 24) as u8 | 1).collect()
}

use common::cluster::assert_same;

// ---------------------------------------------------------------------------
// Files and processes.
// ---------------------------------------------------------------------------

use csnap_testkit::TempDir;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// `csnap ARGS` to completion; it panics past its timeout (a server that
// stops answering must fail the test, not hang it).
use common::cluster::csnap;

use csnap_testkit::{stderr, stdout, text};

/// Asserts a failed command: exit `code`, a `csnap: ` line on stderr
/// containing `word`, nothing on stdout.
fn assert_error(o: &Output, code: i32, word: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    let err = stderr(o);
    assert!(err.contains("csnap: "), "{}", text(o));
    assert!(err.contains(word), "expected {word:?}: {}", text(o));
    assert!(o.stdout.is_empty(), "{}", text(o));
}

/// Polls `f` until it is true; panics with `what` after `TIMEOUT`.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `csnap server` process, killed (SIGKILL) and reaped on drop.
struct Server {
    child: Child,
    log: Arc<Mutex<String>>,
    log_thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts the server, waits for its `listening on` line, and makes one
    /// `csnap status` round trip (through the store worker).
    ///
    /// A server that does not answer fails the test with its log (the
    /// start-up race of the heap seal that once needed a retry here is fixed:
    /// `a_sealed_server_survives_its_start`).
    fn start(origin: &Path, store: &Path, sock: &Path, extra: &[String]) -> Server {
        let mut server = Server::spawn(origin, store, sock, extra);
        let o = csnap(&["status", "--server", s(sock)]);
        if o.status.success() {
            return server;
        }
        server.wait_exit(Duration::from_secs(5));
        let log = server.log();
        server.kill();
        panic!(
            "the server does not answer `csnap status`: {}\n--- server log\n{log}",
            text(&o)
        );
    }

    /// Starts the server and waits for its `listening on` line.
    fn spawn(origin: &Path, store: &Path, sock: &Path, extra: &[String]) -> Server {
        let mut child = Command::new(BIN)
            .args(["server", "--origin", s(origin), "--store", s(store)])
            .args(["--listen", s(sock)])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn csnap server");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().expect("server stderr");
        let l = Arc::clone(&log);
        let log_thread = std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let ready = line.contains("listening on");
                if let Ok(mut g) = l.lock() {
                    g.push_str(&line);
                    g.push('\n');
                }
                if ready {
                    let _ = tx.send(());
                }
            }
        });
        let mut server = Server {
            child,
            log,
            log_thread: Some(log_thread),
        };
        if rx.recv_timeout(TIMEOUT).is_err() {
            server.kill();
            panic!("the server did not start:\n{}", server.log());
        }
        server
    }

    fn log(&self) -> String {
        self.log.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Waits up to `t` for the process to exit; once it has, its whole log
    /// is in.
    fn wait_exit(&mut self, t: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < t {
            if let Ok(Some(_)) = self.child.try_wait() {
                if let Some(h) = self.log_thread.take() {
                    let _ = h.join();
                }
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Panics if the server process has exited.
    fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("the server exited ({st}):\n{}", self.log());
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One command sent to a `csnap io` process and not yet answered.
struct Pending {
    cmd: String,
    path: PathBuf,
}

/// A `csnap io` volume client process, killed and reaped on drop.
struct Io {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    err: Arc<Mutex<String>>,
    err_thread: Option<JoinHandle<()>>,
    scratch: PathBuf,
    pending: VecDeque<Pending>,
    size: u64,
}

impl Io {
    /// Starts `csnap io` on `volume` and waits for `ready SIZE`; on failure
    /// returns its stderr.
    fn attach(fx: &Fixture, volume: &str, client_id: u64) -> Result<Io, String> {
        let id = client_id.to_string();
        let mut child = Command::new(BIN)
            .args(["io", "--server", s(&fx.sock), "--origin", s(&fx.origin)])
            .args(["--store", s(&fx.store), "--volume", volume])
            .args(["--client-id", &id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn csnap io");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("io stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = Arc::new(Mutex::new(String::new()));
        let e = Arc::clone(&err);
        let mut pipe = child.stderr.take().expect("io stderr");
        let err_thread = std::thread::spawn(move || {
            let mut t = String::new();
            let _ = pipe.read_to_string(&mut t);
            if let Ok(mut g) = e.lock() {
                g.push_str(&t);
            }
        });
        let mut io = Io {
            name: format!("io[{volume}#{client_id}]"),
            stdin: child.stdin.take(),
            child,
            lines,
            err,
            err_thread: Some(err_thread),
            scratch: fx.dir.0.clone(),
            pending: VecDeque::new(),
            size: 0,
        };
        match io.lines.recv_timeout(TIMEOUT) {
            Ok(l) => match l.strip_prefix("ready ").map(str::parse::<u64>) {
                Some(Ok(size)) => {
                    io.size = size;
                    Ok(io)
                }
                _ => panic!("{}: unexpected first line {l:?}", io.name),
            },
            Err(RecvTimeoutError::Disconnected) => {
                let _ = io.child.wait();
                Err(io.stderr())
            }
            Err(RecvTimeoutError::Timeout) => panic!("{}: no `ready` line", io.name),
        }
    }

    /// Its stderr so far (all of it once the process has exited).
    fn stderr(&mut self) -> String {
        if let Ok(Some(_)) = self.child.try_wait() {
            if let Some(t) = self.err_thread.take() {
                let _ = t.join();
            }
        }
        self.err.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn send(&mut self, cmd: String, path: PathBuf) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {cmd:?}: {e}", self.name));
        self.pending.push_back(Pending { cmd, path });
    }

    fn scratch_file(&self) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.scratch.join(format!("buf-{n}"))
    }

    /// Sends `write OFF PATH` without waiting for the answer.
    fn start_write(&mut self, off: u64, data: &[u8]) {
        let path = self.scratch_file();
        fs::write(&path, data).expect("write scratch file");
        self.send(format!("write {off} {}", s(&path)), path);
    }

    /// Sends `read OFF LEN PATH` without waiting for the answer.
    fn start_read(&mut self, off: u64, len: u64) {
        let path = self.scratch_file();
        self.send(format!("read {off} {len} {}", s(&path)), path);
    }

    /// The answer to the oldest pending command, within `t`.
    fn try_answer(&mut self, t: Duration) -> Result<String, RecvTimeoutError> {
        let line = self.lines.recv_timeout(t)?;
        if let Some(p) = self.pending.front() {
            if !p.cmd.starts_with("read ") {
                let _ = fs::remove_file(&p.path);
            }
        }
        Ok(line)
    }

    /// The answer to the oldest pending command; panics on timeout or exit.
    fn answer(&mut self) -> (Pending, String) {
        match self.try_answer(TIMEOUT) {
            Ok(line) => (self.pending.pop_front().expect("a pending command"), line),
            Err(e) => {
                let cmd = self.pending.front().map(|p| p.cmd.clone());
                let err = self.stderr();
                panic!(
                    "{}: no answer to {cmd:?} ({e:?}); stderr:\n{err}",
                    self.name
                );
            }
        }
    }

    /// Waits for `ok wrote N`.
    fn finish_write(&mut self) {
        let (p, line) = self.answer();
        assert!(
            line.starts_with("ok wrote "),
            "{}: {:?} answered {line:?}",
            self.name,
            p.cmd
        );
    }

    /// Waits for `ok read N` and returns the data.
    fn finish_read(&mut self) -> Vec<u8> {
        let (p, line) = self.answer();
        assert!(
            line.starts_with("ok read "),
            "{}: {:?} answered {line:?}",
            self.name,
            p.cmd
        );
        let data = fs::read(&p.path).expect("read scratch file");
        let _ = fs::remove_file(&p.path);
        data
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        self.start_write(off, data);
        self.finish_write();
    }

    fn read(&mut self, off: u64, len: u64) -> Vec<u8> {
        self.start_read(off, len);
        self.finish_read()
    }

    /// Sends `quit` and waits for a clean exit.
    fn quit(mut self) {
        assert!(
            self.pending.is_empty(),
            "{}: quit with commands pending",
            self.name
        );
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    let err = self.stderr();
                    assert!(st.success(), "{}: exit {st}: {err}", self.name);
                    return;
                }
                Ok(None) if start.elapsed() < TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => panic!("{}: did not exit after quit", self.name),
            }
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.pending {
            let _ = fs::remove_file(&p.path);
        }
    }
}

/// Files, a formatted store and a running server, in a temp dir. On drop the
/// server is killed (and its log printed if the test failed), then the
/// directory goes.
struct Fixture {
    server: Option<Server>,
    origin: PathBuf,
    store: PathBuf,
    sock: PathBuf,
    origin_bytes: u64,
    server_args: Vec<String>,
    dir: TempDir,
}

impl Fixture {
    /// An origin of `origin_bytes` random non-zero bytes, a 64 MiB store
    /// with 16 KiB chunks and a 128-block journal, and a server started with
    /// `server_args`.
    fn new(name: &str, origin_bytes: u64, server_args: &[&str]) -> Fixture {
        let dir = TempDir::new("srv", name);
        let origin = dir.0.join("origin");
        let store = dir.0.join("store");
        let sock = dir.0.join("sock");
        fs::write(&origin, pattern(0xdead_beef, origin_bytes as usize)).expect("write origin");
        let out = csnap(&[
            "format",
            "--origin",
            s(&origin),
            "--store",
            s(&store),
            "--store-size",
            "64M",
            "--chunk-size",
            "16K",
            "--journal-blocks",
            "128",
        ]);
        assert_eq!(out.status.code(), Some(0), "format: {}", text(&out));
        let mut fx = Fixture {
            server: None,
            origin,
            store,
            sock,
            origin_bytes,
            server_args: server_args.iter().map(|a| (*a).to_string()).collect(),
            dir,
        };
        fx.start_server();
        fx
    }

    fn start_server(&mut self) {
        assert!(self.server.is_none());
        self.server = Some(Server::start(
            &self.origin,
            &self.store,
            &self.sock,
            &self.server_args,
        ));
    }

    fn kill_server(&mut self) {
        if let Some(mut srv) = self.server.take() {
            srv.kill();
        }
    }

    fn assert_alive(&mut self) {
        if let Some(srv) = self.server.as_mut() {
            srv.assert_alive();
        }
    }

    fn attach(&self, volume: &str, client_id: u64) -> Io {
        Io::attach(self, volume, client_id)
            .unwrap_or_else(|e| panic!("csnap io --volume {volume} failed to attach:\n{e}"))
    }

    /// `csnap snapshot ACTION --server SOCK REST...`.
    fn snapshot(&self, action: &str, rest: &[&str]) -> Output {
        let mut args = vec!["snapshot", action, "--server", s(&self.sock)];
        args.extend_from_slice(rest);
        csnap(&args)
    }

    /// `csnap status`, which must succeed.
    fn status(&self) -> String {
        let o = csnap(&["status", "--server", s(&self.sock)]);
        assert_eq!(o.status.code(), Some(0), "status: {}", text(&o));
        stdout(&o)
    }

    /// The first number after `name: ` in the status.
    fn status_field(&self, name: &str) -> u64 {
        status_field(&self.status(), name)
    }

    /// `csnap snapshot list`, parsed: (tag, priority, chunks, unique, state).
    fn list(&self) -> Vec<SnapRow> {
        let o = self.snapshot("list", &[]);
        assert_eq!(o.status.code(), Some(0), "list: {}", text(&o));
        let out = stdout(&o);
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some("tag\tpriority\tchunks\tunique\tctime\tstate"),
            "{out}"
        );
        lines
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                assert_eq!(f.len(), 6, "list row {l:?}");
                let num = |s: &str| s.parse::<i64>().unwrap_or_else(|_| panic!("row {l:?}"));
                SnapRow {
                    tag: num(f[0]) as u32,
                    priority: num(f[1]),
                    chunks: num(f[2]) as u64,
                    unique: num(f[3]) as u64,
                    state: f[5].to_string(),
                }
            })
            .collect()
    }

    fn row(&self, tag: u32) -> Option<SnapRow> {
        self.list().into_iter().find(|r| r.tag == tag)
    }

    fn origin_uuid(&self) -> [u8; 16] {
        let mut d = csnap_store::disk::FileDisk::open_read_only(&self.store).expect("open store");
        csnap_store::read_label(&mut d)
            .expect("store label")
            .origin_uuid
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut srv) = self.server.take() {
            srv.kill();
            if std::thread::panicking() {
                eprintln!("--- server log\n{}", srv.log());
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapRow {
    tag: u32,
    priority: i64,
    chunks: u64,
    unique: u64,
    state: String,
}

fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name:?} in the status:\n{status}"))
}

// ---------------------------------------------------------------------------
// A raw protocol client.
// ---------------------------------------------------------------------------

enum Recv {
    Frame(Vec<u8>),
    Closed,
    Timeout,
}

/// A connection speaking the wire protocol by hand.
struct Raw {
    s: UnixStream,
    buf: Vec<u8>,
}

fn frame(rid: u64, msg: &Msg<'_>) -> Vec<u8> {
    let mut f = vec![0u8; proto::FRAME_MAX_BYTES];
    let n = proto::encode(&Header::new(rid, 0), msg, &mut f).expect("encode");
    f.truncate(n);
    f
}

fn ranges(chunk: u64, chunks: u32, scratch: &mut [u8]) -> Ranges<'_> {
    Ranges::from_entries(&[Range { chunk, chunks }], scratch).expect("range list")
}

/// The code, culprit, text and request id of an `Error` frame.
fn error_of(f: &[u8]) -> (ErrorCode, u16, String, u64) {
    match proto::decode(f) {
        Ok((
            h,
            Msg::Error {
                code,
                culprit,
                text,
            },
        )) => (code, culprit, text.to_string(), h.request_id),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).expect("connect to the server");
        Raw { s, buf: Vec::new() }
    }

    fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the server");
    }

    fn send(&mut self, rid: u64, msg: &Msg<'_>) {
        let f = frame(rid, msg);
        self.send_bytes(&f);
    }

    /// The next frame from the server within `t`, or why there is none.
    fn recv_within(&mut self, t: Duration) -> Recv {
        let deadline = Instant::now() + t;
        let mut tmp = vec![0u8; proto::FRAME_MAX_BYTES];
        loop {
            match proto::peek_header(&self.buf) {
                Ok(Some(h)) if self.buf.len() >= h.length as usize => {
                    let rest = self.buf.split_off(h.length as usize);
                    return Recv::Frame(std::mem::replace(&mut self.buf, rest));
                }
                Ok(_) => {}
                Err(e) => panic!("the server sent a bad frame: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Recv::Timeout;
            }
            self.s.set_read_timeout(Some(left)).expect("set timeout");
            match self.s.read(&mut tmp) {
                Ok(0) => return Recv::Closed,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Recv::Timeout;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    return Recv::Closed;
                }
                Err(e) => panic!("read from the server: {e}"),
            }
        }
    }

    fn recv(&mut self) -> Vec<u8> {
        match self.recv_within(TIMEOUT) {
            Recv::Frame(f) => f,
            Recv::Closed => panic!("the server closed the connection instead of answering"),
            Recv::Timeout => panic!("no answer from the server"),
        }
    }

    /// The next frame must be an `Error`; returns its code, culprit and text
    /// and checks the request id.
    fn expect_error(&mut self, rid: u64) -> (ErrorCode, u16, String) {
        let (code, culprit, text, got) = error_of(&self.recv());
        assert_eq!(got, rid, "request id of the error {code:?} {text:?}");
        (code, culprit, text)
    }

    /// The server must close the connection (after any frames already read).
    fn expect_closed(&mut self) {
        match self.recv_within(TIMEOUT) {
            Recv::Closed => {}
            Recv::Frame(f) => panic!(
                "expected the connection closed, got {:?}",
                proto::decode(&f)
            ),
            Recv::Timeout => panic!("the server did not close the connection"),
        }
    }

    /// Nothing may arrive for `QUIET`.
    fn expect_quiet(&mut self) {
        match self.recv_within(QUIET) {
            Recv::Timeout => {}
            Recv::Frame(f) => panic!("expected no answer, got {:?}", proto::decode(&f)),
            Recv::Closed => panic!("expected no answer, the connection closed"),
        }
    }

    /// Hello with `role`; expects `HelloOk` for version 1.
    fn hello(&mut self, role: Role) {
        self.send(
            1,
            &Msg::Hello {
                version_min: 1,
                version_max: 1,
                role,
            },
        );
        let f = self.recv();
        match proto::decode(&f) {
            Ok((h, Msg::HelloOk { version: 1, .. })) => {
                assert_eq!(h.request_id, 1);
                assert!(h.incarnation >= 1, "incarnation in the header");
            }
            other => panic!("expected HelloOk, got {other:?}"),
        }
    }

    fn send_identify(&mut self, rid: u64, volume: Volume, uuid: [u8; 16], chunk: u32, size: u64) {
        self.send(
            rid,
            &Msg::Identify {
                client_id: 900 + rid,
                node_id: 9,
                volume,
                origin_uuid: uuid,
                volume_size_bytes: size,
                chunk_size_bytes: chunk,
                flags: 0,
            },
        );
    }

    /// Hello and Identify of `volume`, expecting success.
    fn attach(sock: &Path, volume: Volume, uuid: [u8; 16]) -> Raw {
        let mut r = Raw::connect(sock);
        r.hello(Role::Client);
        r.send_identify(2, volume, uuid, CHUNK as u32, 0);
        match proto::decode(&r.recv()) {
            Ok((
                h,
                Msg::IdentifyOk {
                    chunk_size_bytes, ..
                },
            )) => {
                assert_eq!(h.request_id, 2);
                assert_eq!(u64::from(chunk_size_bytes), CHUNK);
            }
            other => panic!("expected IdentifyOk, got {other:?}"),
        }
        r
    }

    /// `QuerySnapshotRead` of one range; returns the targets.
    fn snapshot_read(&mut self, rid: u64, chunk: u64, chunks: u32) -> Vec<Target> {
        let mut sc = [0u8; proto::RANGES_BYTES_MAX];
        let r = ranges(chunk, chunks, &mut sc);
        self.send(rid, &Msg::QuerySnapshotRead(r));
        let f = self.recv();
        match proto::decode(&f) {
            Ok((h, Msg::SnapshotReadReply(t))) => {
                assert_eq!(h.request_id, rid);
                t.iter().collect()
            }
            other => panic!("expected SnapshotReadReply, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The cbtb-style model: devices, shadows, client processes.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dev {
    Origin,
    Snap(u32),
}

impl Dev {
    fn volume(self) -> String {
        match self {
            Dev::Origin => "origin".into(),
            Dev::Snap(t) => t.to_string(),
        }
    }
}

struct Device {
    shadow: Vec<u8>,
    clients: Vec<Io>,
}

enum OpKind {
    Write(u64, Vec<u8>),
    /// Read the whole device and compare with its shadow.
    Check,
}

/// One command for one client process of one device.
struct Op {
    dev: Dev,
    client: usize,
    kind: OpKind,
}

fn w(dev: Dev, client: usize, off: u64, data: Vec<u8>) -> Op {
    Op {
        dev,
        client,
        kind: OpKind::Write(off, data),
    }
}

fn check(dev: Dev, client: usize) -> Op {
    Op {
        dev,
        client,
        kind: OpKind::Check,
    }
}

struct Cluster {
    devs: BTreeMap<Dev, Device>,
    next_client: u64,
    seed: u64,
    fx: Fixture,
}

impl Cluster {
    fn new(name: &str, origin_bytes: u64) -> Cluster {
        let fx = Fixture::new(name, origin_bytes, &[]);
        let shadow = pattern(0xdead_beef, origin_bytes as usize);
        let mut c = Cluster {
            devs: BTreeMap::new(),
            next_client: 1,
            seed: 1,
            fx,
        };
        c.devs.insert(
            Dev::Origin,
            Device {
                shadow,
                clients: Vec::new(),
            },
        );
        c
    }

    fn size(&self) -> u64 {
        self.fx.origin_bytes
    }

    /// Fresh data for a write.
    fn data(&mut self, len: u64) -> Vec<u8> {
        self.seed += 1;
        pattern(self.seed, len as usize)
    }

    fn dev(&mut self, d: Dev) -> &mut Device {
        self.devs
            .get_mut(&d)
            .unwrap_or_else(|| panic!("test bug: no device {d:?}"))
    }

    /// Starts one more `csnap io` process on `d`; returns its index.
    fn attach(&mut self, d: Dev) -> usize {
        let id = self.next_client;
        self.next_client += 1;
        let io = self.fx.attach(&d.volume(), id);
        assert_eq!(io.size, self.size(), "{d:?}: volume size");
        let dev = self.dev(d);
        dev.clients.push(io);
        dev.clients.len() - 1
    }

    /// Quits every client of `d`.
    fn detach_all(&mut self, d: Dev) {
        for io in std::mem::take(&mut self.dev(d).clients) {
            io.quit();
        }
    }

    /// `csnap snapshot create`; the snapshot's shadow is the origin's now.
    fn create(&mut self, tag: u32) {
        let t = tag.to_string();
        let o = self.fx.snapshot("create", &[&t]);
        assert_eq!(o.status.code(), Some(0), "create {tag}: {}", text(&o));
        assert_eq!(stdout(&o), format!("created snapshot {tag}\n"));
        let shadow = self.dev(Dev::Origin).shadow.clone();
        let old = self.devs.insert(
            Dev::Snap(tag),
            Device {
                shadow,
                clients: Vec::new(),
            },
        );
        assert!(old.is_none(), "test bug: snapshot {tag} exists");
    }

    /// Waits until no client holds `tag` open, deletes it, and checks that
    /// it can no longer be attached.
    fn delete(&mut self, tag: u32) {
        assert!(
            self.dev(Dev::Snap(tag)).clients.is_empty(),
            "test bug: detach first"
        );
        wait_until(&format!("snapshot {tag} is idle"), || {
            self.fx.row(tag).is_some_and(|r| r.state == "idle")
        });
        let t = tag.to_string();
        let o = self.fx.snapshot("delete", &[&t]);
        assert_eq!(o.status.code(), Some(0), "delete {tag}: {}", text(&o));
        assert_eq!(stdout(&o), format!("deleted snapshot {tag}\n"));
        self.devs.remove(&Dev::Snap(tag));
        let r = self.fx.row(tag);
        assert!(
            r.as_ref().is_none_or(|r| r.state == "deleting"),
            "deleted snapshot {tag} still listed: {r:?}"
        );
        match Io::attach(&self.fx, &t, 999) {
            Ok(_) => panic!("attached to deleted snapshot {tag}"),
            Err(e) => assert!(e.contains("no such snapshot"), "{e}"),
        }
    }

    /// Starts every op at once (each client process runs its own in order),
    /// runs `during` while they are in flight, waits for all, checks every
    /// full read against its shadow, applies the writes to the shadows, and
    /// verifies every device.
    ///
    /// Writes of one phase to one device must not overlap, and a device read
    /// in a phase is not written in it, so the outcome is fixed whatever the
    /// interleaving: a snapshot read beside origin writes must still see the
    /// snapshot exactly.
    fn phase_during(&mut self, step: &str, ops: Vec<Op>, during: impl FnOnce(&mut Cluster)) {
        for (i, a) in ops.iter().enumerate() {
            for b in ops[i + 1..].iter().filter(|b| b.dev == a.dev) {
                match (&a.kind, &b.kind) {
                    (OpKind::Write(o1, d1), OpKind::Write(o2, d2)) => assert!(
                        o1 + d1.len() as u64 <= *o2 || o2 + d2.len() as u64 <= *o1,
                        "test bug: overlapping writes to {:?} in one phase",
                        a.dev
                    ),
                    (OpKind::Check, OpKind::Check) => {}
                    _ => panic!("test bug: {:?} read and written in one phase", a.dev),
                }
            }
        }
        let size = self.size();
        for op in &ops {
            let io = &mut self.dev(op.dev).clients[op.client];
            match &op.kind {
                OpKind::Write(off, data) => io.start_write(*off, data),
                OpKind::Check => io.start_read(0, size),
            }
        }
        during(self);
        for op in &ops {
            let dev = self.dev(op.dev);
            match &op.kind {
                OpKind::Write(..) => dev.clients[op.client].finish_write(),
                OpKind::Check => {
                    let got = dev.clients[op.client].finish_read();
                    assert_same(
                        &format!("{step}: {:?} read during the step", op.dev),
                        &got,
                        &dev.shadow,
                    );
                }
            }
        }
        for op in ops {
            if let OpKind::Write(off, data) = op.kind {
                let off = off as usize;
                self.dev(op.dev).shadow[off..off + data.len()].copy_from_slice(&data);
            }
        }
        self.verify(step);
    }

    fn phase(&mut self, step: &str, ops: Vec<Op>) {
        self.phase_during(step, ops, |_| {});
    }

    /// Reads every device in full through its first client process (all at
    /// once) and compares each with its shadow.
    fn verify(&mut self, step: &str) {
        let size = self.size();
        for (d, dev) in &mut self.devs {
            let io = dev
                .clients
                .first_mut()
                .unwrap_or_else(|| panic!("test bug: {d:?} has no client"));
            io.start_read(0, size);
        }
        for (d, dev) in &mut self.devs {
            let got = dev.clients[0].finish_read();
            assert_same(&format!("{step}: {d:?}"), &got, &dev.shadow);
        }
        self.fx.assert_alive();
    }

    fn used(&self) -> u64 {
        self.fx.status_field("store data")
    }
}

// ---------------------------------------------------------------------------
// 1. cbtb-style scenarios.
// ---------------------------------------------------------------------------

#[test]
fn cbtb_microtests_with_concurrent_client_processes() {
    const O: Dev = Dev::Origin;
    let c = CHUNK;
    let mut k = Cluster::new("cbtb", 8 << 20);
    let size = k.size();
    k.attach(O);
    k.attach(O);
    k.verify("initial");

    // -- origin writes leave the snapshot unchanged.
    k.create(1);
    k.attach(Dev::Snap(1));
    let (a, b) = (k.data(c), k.data(3000));
    k.phase(
        "origin writes, snapshot 1 unchanged",
        vec![
            w(O, 0, 0, a),
            w(O, 1, 5 * c + 100, b),
            check(Dev::Snap(1), 0),
        ],
    );
    assert_eq!(k.used(), 2, "one copy-out for each of chunks 0 and 5");
    let a = k.data(c / 2);
    k.phase(
        "origin rewrites a copied chunk",
        vec![w(O, 1, c / 4, a), check(Dev::Snap(1), 0)],
    );
    assert_eq!(k.used(), 2, "a chunk is copied out once");

    // -- snapshot writes stay in the snapshot.
    k.create(2);
    k.attach(Dev::Snap(2)); // reader
    k.attach(Dev::Snap(2)); // writer
    let (a, b) = (k.data(c), k.data(1000));
    k.phase(
        "snapshot 2 writes stay in snapshot 2",
        vec![
            w(Dev::Snap(2), 1, c, a),
            w(Dev::Snap(2), 1, 200, b),
            check(Dev::Snap(1), 0),
            check(O, 0),
        ],
    );

    // -- interleaved origin and snapshot writes on one chunk.
    let (a, b, d) = (k.data(4096), k.data(4096), k.data(4096));
    k.phase(
        "origin and snapshot write one chunk at once",
        vec![
            w(O, 0, 7 * c, a),
            w(Dev::Snap(2), 1, 7 * c + 4096, b),
            w(O, 1, 7 * c + 8192, d),
            check(Dev::Snap(1), 0),
        ],
    );
    for (i, (dev, cl, off, len)) in [
        (O, 0, 9 * c, c / 2),
        (Dev::Snap(2), 1, 9 * c + c / 4, c / 2),
        (O, 1, 9 * c + c / 2, c / 2),
        (Dev::Snap(2), 1, 9 * c, c / 3),
        (O, 0, 9 * c + 10, 10),
    ]
    .into_iter()
    .enumerate()
    {
        let a = k.data(len);
        k.phase(
            &format!("interleaved writes on chunk 9, #{i} {dev:?}"),
            vec![w(dev, cl, off, a)],
        );
    }

    // -- a write to a later snapshot when an earlier one was written.
    k.create(3);
    k.attach(Dev::Snap(3));
    k.attach(Dev::Snap(1)); // snapshot 1's writer
    let a = k.data(c);
    k.phase(
        "earlier snapshot 1 writes chunk 11",
        vec![w(Dev::Snap(1), 1, 11 * c, a), check(Dev::Snap(3), 0)],
    );
    let a = k.data(2000);
    k.phase(
        "later snapshot 3 writes chunk 11",
        vec![w(Dev::Snap(3), 0, 11 * c + 500, a), check(Dev::Snap(1), 0)],
    );
    let a = k.data(c);
    k.phase(
        "origin writes chunk 11 after both",
        vec![
            w(O, 0, 11 * c, a),
            check(Dev::Snap(1), 0),
            check(Dev::Snap(2), 0),
            check(Dev::Snap(3), 0),
        ],
    );

    // -- several snapshots share one copy-out.
    k.create(4);
    k.create(5);
    k.attach(Dev::Snap(4));
    k.attach(Dev::Snap(5));
    let before_rows = k.fx.list();
    let used = k.used();
    let a = k.data(c);
    k.phase(
        "origin writes chunk 13, which five snapshots share",
        vec![
            w(O, 1, 13 * c, a),
            check(Dev::Snap(1), 0),
            check(Dev::Snap(5), 0),
        ],
    );
    assert_eq!(k.used(), used + 1, "one copy-out serves five snapshots");
    for r in k.fx.list() {
        let b = before_rows.iter().find(|b| b.tag == r.tag).expect("row");
        assert_eq!(r.chunks, b.chunks + 1, "snapshot {}: {r:?} {b:?}", r.tag);
        assert_eq!(r.unique, b.unique, "snapshot {}: shared chunk", r.tag);
    }
    let a = k.data(100);
    k.phase(
        "1st shared: snapshot 4 writes chunk 13",
        vec![w(Dev::Snap(4), 0, 13 * c + 50, a), check(Dev::Snap(5), 0)],
    );
    assert_eq!(k.used(), used + 2, "snapshot 4 unshares chunk 13");
    let a = k.data(100);
    k.phase(
        "2nd shared: snapshot 5 writes chunk 13",
        vec![w(Dev::Snap(5), 0, 13 * c + 9000, a), check(Dev::Snap(4), 0)],
    );
    assert_eq!(k.used(), used + 3, "snapshot 5 unshares chunk 13");
    let a = k.data(c);
    k.phase(
        "origin shared: origin rewrites chunk 13",
        vec![w(O, 0, 13 * c, a), check(Dev::Snap(4), 0)],
    );
    assert_eq!(k.used(), used + 3, "no snapshot needs chunk 13 any more");
    let a = k.data(c);
    k.phase("origin writes chunk 14", vec![w(O, 0, 14 * c, a)]);
    let (a, b) = (k.data(7), k.data(c));
    k.phase(
        "2nd then 1st: snapshot 5 then 4 write chunk 14",
        vec![
            w(Dev::Snap(5), 0, 14 * c + 3, a),
            w(Dev::Snap(4), 0, 14 * c, b),
        ],
    );

    // -- unaligned offsets and lengths across chunk boundaries.
    let (a, b, d) = (k.data(40_000), k.data(5), k.data(20_001));
    k.phase(
        "unaligned writes across chunk boundaries",
        vec![
            w(O, 0, 20 * c - 777, a),
            w(O, 1, 30 * c + 123, b),
            w(Dev::Snap(2), 1, 20 * c - 1000, d),
            check(Dev::Snap(1), 0),
            check(Dev::Snap(4), 0),
        ],
    );
    // Over 256 chunks: each is split into two queries by the client.
    let (a, b) = (k.data(300 * c + 1), k.data(270 * c));
    k.phase(
        "unaligned writes of more chunks than one query carries",
        vec![
            w(O, 1, 100 * c + 4321, a),
            w(Dev::Snap(2), 1, 3 * c + 77, b),
            check(Dev::Snap(3), 0),
            check(Dev::Snap(5), 0),
        ],
    );
    let (a, b) = (k.data(1), k.data(1));
    k.phase(
        "the last byte",
        vec![w(O, 0, size - 1, a), w(Dev::Snap(3), 0, size - 1, b)],
    );
    let io = &mut k.dev(O).clients[0];
    io.start_write(size - 10, &[7; 20]);
    let (_, line) = io.answer();
    assert!(
        line.starts_with("error: ") && line.contains("past the end"),
        "{line}"
    );
    k.verify("a write past the end is refused");

    // -- deleting a snapshot in use is refused.
    let o = k.fx.snapshot("delete", &["4"]);
    assert_error(&o, 1, "in use");
    assert_eq!(k.fx.row(4).map(|r| r.state), Some("in use".to_string()));
    k.verify("refused delete of snapshot 4");

    // -- snapshots deleted and created during writes.
    k.detach_all(Dev::Snap(3));
    wait_until("snapshot 3 is idle", || {
        k.fx.row(3).is_some_and(|r| r.state == "idle")
    });
    let (a, b, d) = (k.data(5 * c), k.data(3 * c + 5), k.data(c));
    k.phase_during(
        "snapshot 3 deleted while writes are in flight",
        vec![
            w(O, 0, 40 * c, a),
            w(O, 1, 60 * c - 5, b),
            w(Dev::Snap(2), 1, 40 * c, d),
            check(Dev::Snap(5), 0),
        ],
        |k| {
            let o = k.fx.snapshot("delete", &["3"]);
            assert_eq!(o.status.code(), Some(0), "delete 3: {}", text(&o));
            k.devs.remove(&Dev::Snap(3));
        },
    );
    let r = k.fx.row(3);
    assert!(r.as_ref().is_none_or(|r| r.state == "deleting"), "{r:?}");
    match Io::attach(&k.fx, "3", 999) {
        Ok(_) => panic!("attached to deleted snapshot 3"),
        Err(e) => assert!(e.contains("no such snapshot"), "{e}"),
    }
    // Writers are between commands: take a snapshot, write on.
    let a = k.data(2 * c);
    k.phase("origin writes before snapshot 6", vec![w(O, 0, 70 * c, a)]);
    k.create(6);
    k.attach(Dev::Snap(6));
    let (a, b) = (k.data(2 * c), k.data(c));
    k.phase(
        "origin writes after snapshot 6",
        vec![
            w(O, 0, 70 * c + 100, a),
            w(O, 1, 75 * c, b),
            check(Dev::Snap(6), 0),
        ],
    );
    // A tag used again is a new snapshot: nothing of the old one shows.
    k.create(3);
    k.attach(Dev::Snap(3));
    let a = k.data(c);
    k.phase(
        "tag 3 reused",
        vec![w(O, 1, 40 * c, a), check(Dev::Snap(3), 0)],
    );
    k.detach_all(Dev::Snap(4));
    k.delete(4);
    k.verify("snapshot 4 deleted after its clients left");

    // -- disk image is consistent after a shutdown: SIGKILL with writes in
    // flight, one of them surely so: its chunks are read-locked by a raw
    // snapshot client, so its copy-out is committed and it waits.
    let incarnation = k.fx.status_field("incarnation");
    let mut locker = Raw::attach(&k.fx.sock, Volume::Snapshot(6), k.fx.origin_uuid());
    let t = locker.snapshot_read(10, 80, 3);
    assert!(t.iter().all(|t| t.kind == TargetKind::Origin), "{t:?}");
    let blocked = k.data(2 * c);
    k.dev(O).clients[0].start_write(80 * c + 1, &blocked);
    wait_until("the origin write waits for the read lock", || {
        k.fx.status_field("waiting writes") == 1
    });
    let writes = [
        (O, 1, 90 * c, 3 * c),
        (Dev::Snap(2), 1, 85 * c + 7, c),
        (Dev::Snap(5), 0, 95 * c, 2 * c),
    ];
    let mut sent = Vec::new();
    for (dev, cl, off, len) in writes {
        let data = k.data(len);
        k.dev(dev).clients[cl].start_write(off, &data);
        sent.push((dev, cl, off, data));
    }
    k.fx.kill_server();
    drop(locker);
    let (_, line) = k.dev(O).clients[0].answer();
    assert!(line.starts_with("error: "), "the blocked write: {line}");
    for (dev, cl, off, data) in sent {
        let d = k.dev(dev);
        let (_, line) = d.clients[cl].answer();
        if line.starts_with("ok wrote ") {
            let off = off as usize;
            d.shadow[off..off + data.len()].copy_from_slice(&data);
        } else {
            // Refused before any data was written (one query per write).
            assert!(line.starts_with("error: "), "{line}");
        }
    }
    let mut counts = Vec::new();
    for (d, dev) in &mut k.devs {
        counts.push((*d, dev.clients.len()));
        dev.clients.clear(); // killed
    }
    let o = csnap(&["check", "--store", s(&k.fx.store)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "check after SIGKILL: {}",
        text(&o)
    );
    k.fx.start_server();
    assert!(
        k.fx.status_field("incarnation") > incarnation,
        "a restart takes a new incarnation"
    );
    for (d, n) in counts {
        for _ in 0..n {
            k.attach(d);
        }
    }
    k.verify("disk image is consistent after a shutdown");
    let (a, b, d) = (k.data(c), k.data(c), k.data(c));
    k.phase(
        "writes after the restart",
        vec![
            w(O, 0, 100 * c, a),
            w(Dev::Snap(2), 1, 101 * c, b),
            w(Dev::Snap(6), 0, 102 * c, d),
            check(Dev::Snap(1), 0),
        ],
    );

    // -- delete old, new, and all snapshots; the space comes back.
    k.detach_all(Dev::Snap(1));
    k.delete(1);
    k.verify("oldest snapshot deleted");
    k.detach_all(Dev::Snap(6));
    k.delete(6);
    k.verify("newest snapshot deleted");
    for t in [2, 3, 5] {
        k.detach_all(Dev::Snap(t));
        k.delete(t);
    }
    k.verify("every snapshot deleted");
    wait_until("every store chunk is free again", || {
        let st = k.fx.status();
        status_field(&st, "store data") == 0 && st.contains("snapshots: 0 (0 being deleted)")
    });
    assert!(k.fx.list().is_empty());
    let a = k.data(3 * c);
    k.phase("origin writes with no snapshot", vec![w(O, 1, 0, a)]);
    assert_eq!(k.used(), 0, "no snapshot, no copy-out");
    k.detach_all(O);
    k.fx.kill_server();
    let o = csnap(&["check", "--store", s(&k.fx.store)]);
    assert_eq!(o.status.code(), Some(0), "final check: {}", text(&o));
}

// ---------------------------------------------------------------------------
// 2. Clients that die holding read locks or with a write waiting.
// ---------------------------------------------------------------------------

/// A raw snapshot client read-locks an origin chunk and dies without
/// releasing it: the origin write behind the lock waits exactly until then,
/// and other clients work throughout. Then a raw origin client dies with its
/// write waiting, and one dies right after sending its query: the server
/// drops both writes.
#[test]
fn client_dies_holding_read_locks_and_with_a_write_waiting() {
    let c = CHUNK;
    let fx = Fixture::new("disconnect", 4 << 20, &[]);
    let size = fx.origin_bytes;
    let o = fx.snapshot("create", &["1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let uuid = fx.origin_uuid();
    let mut origin = pattern(0xdead_beef, size as usize);
    let snap = origin.clone();
    let mut w1 = fx.attach("origin", 1);
    let mut w2 = fx.attach("origin", 2);
    let mut r = fx.attach("1", 3);

    // The raw reader takes a read lock on chunk 3, still on the origin.
    let mut locker = Raw::attach(&fx.sock, Volume::Snapshot(1), uuid);
    let t = locker.snapshot_read(10, 3, 1);
    assert_eq!(
        t,
        vec![Target {
            chunk: 3,
            chunks: 1,
            kind: TargetKind::Origin,
            store_chunk: 0
        }]
    );
    assert_eq!(fx.status_field("read locks"), 1);

    // The origin write of chunk 3 waits for that lock.
    let data = pattern(11, 5000);
    w1.start_write(3 * c + 100, &data);
    assert!(
        matches!(w1.try_answer(QUIET), Err(RecvTimeoutError::Timeout)),
        "the origin write completed under a read lock"
    );
    wait_until("the write waits", || fx.status_field("waiting writes") == 1);

    // Others keep working meanwhile.
    let other = pattern(12, 2 * c as usize);
    w2.write(10 * c - 1, &other);
    origin[(10 * c - 1) as usize..(12 * c - 1) as usize].copy_from_slice(&other);
    assert_same(
        "origin beside the blocked write",
        &w2.read(0, size),
        &origin,
    );
    assert_same("snapshot beside the blocked write", &r.read(0, size), &snap);
    assert!(
        matches!(
            w1.try_answer(Duration::ZERO),
            Err(RecvTimeoutError::Timeout)
        ),
        "the origin write completed under a read lock"
    );

    // The lock holder dies: the write goes through at once.
    let t0 = Instant::now();
    drop(locker);
    w1.finish_write();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    origin[(3 * c + 100) as usize..(3 * c + 100) as usize + data.len()].copy_from_slice(&data);
    wait_until("the dead client's lock is gone", || {
        let st = fx.status();
        status_field(&st, "read locks") == 0 && status_field(&st, "waiting writes") == 0
    });
    assert_same("origin after the disconnect", &w2.read(0, size), &origin);
    assert_same("snapshot after the disconnect", &r.read(0, size), &snap);

    // A writer dies while its write waits, and another right after sending
    // its query; both on chunk 20, read-locked by a raw reader.
    let mut locker = Raw::attach(&fx.sock, Volume::Snapshot(1), uuid);
    let t = locker.snapshot_read(10, 20, 2);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(
        (t[0].kind, t[0].chunk, t[0].chunks),
        (TargetKind::Origin, 20, 2)
    );
    let mut sc = [0u8; proto::RANGES_BYTES_MAX];
    let mut waiter = Raw::attach(&fx.sock, Volume::Origin, uuid);
    waiter.send(7, &Msg::QueryOriginWrite(ranges(20, 1, &mut sc)));
    waiter.expect_quiet();
    wait_until("the raw write waits", || {
        fx.status_field("waiting writes") == 1
    });
    drop(waiter);
    let mut hasty = Raw::attach(&fx.sock, Volume::Origin, uuid);
    hasty.send(8, &Msg::QueryOriginWrite(ranges(21, 1, &mut sc)));
    drop(hasty);
    wait_until("the dead writers' writes are dropped", || {
        let st = fx.status();
        status_field(&st, "waiting writes") == 0 && status_field(&st, "clients") == 4
    });
    assert_eq!(
        fx.status_field("read locks"),
        2,
        "the reader still holds its locks"
    );
    let other = pattern(13, 100);
    w2.write(22 * c, &other);
    origin[(22 * c) as usize..(22 * c) as usize + 100].copy_from_slice(&other);
    assert_same("snapshot beside the dead writers", &r.read(0, size), &snap);

    // The reader releases; nothing is left waiting and chunk 20 is writable.
    locker.send(11, &Msg::FinishSnapshotRead(ranges(20, 2, &mut sc)));
    locker.expect_quiet();
    wait_until("the locks are released", || {
        let st = fx.status();
        status_field(&st, "read locks") == 0 && status_field(&st, "waiting writes") == 0
    });
    let d = pattern(14, 2 * c as usize);
    let t0 = Instant::now();
    w1.write(20 * c, &d);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    origin[(20 * c) as usize..(22 * c) as usize].copy_from_slice(&d);
    assert_same("origin at the end", &w1.read(0, size), &origin);
    assert_same("snapshot at the end", &r.read(0, size), &snap);
    drop(locker);
    for io in [w1, w2, r] {
        io.quit();
    }
}

// ---------------------------------------------------------------------------
// 3. Bad input beside a well-behaved client.
// ---------------------------------------------------------------------------

/// Well-behaved `csnap io` clients of the origin and of snapshot 1, with
/// their shadows: they must see no failure, whatever the others send.
struct Bystanders {
    origin: Io,
    snap: Io,
    origin_shadow: Vec<u8>,
    snap_shadow: Vec<u8>,
    round: u64,
}

impl Bystanders {
    fn new(fx: &Fixture) -> Bystanders {
        let o = fx.snapshot("create", &["1"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let shadow = pattern(0xdead_beef, fx.origin_bytes as usize);
        Bystanders {
            origin: fx.attach("origin", 1),
            snap: fx.attach("1", 2),
            origin_shadow: shadow.clone(),
            snap_shadow: shadow,
            round: 0,
        }
    }

    /// A write to each volume (unaligned, across a chunk boundary, on chunks
    /// not written before), then both read in full and compared.
    fn round(&mut self, fx: &mut Fixture, what: &str) {
        self.round += 1;
        let off = self.round * 3 * CHUNK - 999;
        let a = pattern(100 + self.round, 2000);
        let b = pattern(200 + self.round, 3000);
        self.origin.start_write(off, &a);
        self.snap.start_write(off + CHUNK, &b);
        self.origin.finish_write();
        self.snap.finish_write();
        let (o, s) = (off as usize, (off + CHUNK) as usize);
        self.origin_shadow[o..o + a.len()].copy_from_slice(&a);
        self.snap_shadow[s..s + b.len()].copy_from_slice(&b);
        let size = fx.origin_bytes;
        self.origin.start_read(0, size);
        self.snap.start_read(0, size);
        let got = self.origin.finish_read();
        assert_same(&format!("origin after {what}"), &got, &self.origin_shadow);
        let got = self.snap.finish_read();
        assert_same(&format!("snapshot after {what}"), &got, &self.snap_shadow);
        fx.assert_alive();
    }
}

#[test]
fn bad_input_is_refused_clearly_and_harms_no_one_else() {
    let mut fx = Fixture::new("badinput", 4 << 20, &[]);
    let uuid = fx.origin_uuid();
    let mut by = Bystanders::new(&fx);
    by.round(&mut fx, "start");
    let hello = Msg::Hello {
        version_min: 1,
        version_max: 1,
        role: Role::Client,
    };

    // Garbage: BadMagic, then the server closes.
    let mut r = Raw::connect(&fx.sock);
    r.send_bytes(b"GET / HTTP/1.1\r\nHost: csnap\r\n\r\n");
    let (code, _, text) = r.expect_error(0);
    assert_eq!(code, ErrorCode::BadMagic, "{text}");
    assert!(text.contains("magic"), "{text}");
    r.expect_closed();
    by.round(&mut fx, "garbage");

    // Header version 2.
    let mut r = Raw::connect(&fx.sock);
    let mut f = frame(1, &hello);
    f[4..6].copy_from_slice(&2u16.to_le_bytes());
    r.send_bytes(&f);
    let (code, _, text) = r.expect_error(0);
    assert_eq!(code, ErrorCode::BadVersion, "{text}");
    assert!(text.contains("version 2"), "{text}");
    r.expect_closed();
    by.round(&mut fx, "header version 2");

    // A Hello whose version range excludes 1.
    let mut r = Raw::connect(&fx.sock);
    r.send(
        5,
        &Msg::Hello {
            version_min: 2,
            version_max: 3,
            role: Role::Client,
        },
    );
    let (code, culprit, text) = r.expect_error(5);
    assert_eq!(
        (code, culprit),
        (ErrorCode::BadVersion, Kind::Hello.code()),
        "{text}"
    );
    assert!(text.contains("2..=3"), "{text}");
    r.expect_closed();
    by.round(&mut fx, "hello for versions 2..=3");

    // Oversized length: refused from the header alone.
    let mut r = Raw::connect(&fx.sock);
    let mut f = frame(6, &Msg::Status);
    let len = u32::try_from(proto::FRAME_MAX_BYTES + 1).expect("u32");
    f[8..12].copy_from_slice(&len.to_le_bytes());
    r.send_bytes(&f);
    let (code, _, text) = r.expect_error(0);
    assert_eq!(code, ErrorCode::TooLarge, "{text}");
    assert!(text.contains("65537"), "{text}");
    r.expect_closed();
    by.round(&mut fx, "oversized frame");

    // A truncated frame, then the client goes away; and a header whose body
    // never comes.
    let mut r = Raw::connect(&fx.sock);
    r.send_bytes(&frame(1, &hello)[..20]);
    drop(r);
    let mut r = Raw::connect(&fx.sock);
    r.hello(Role::Client);
    let f = frame(
        2,
        &Msg::Identify {
            client_id: 5,
            node_id: 1,
            volume: Volume::Origin,
            origin_uuid: uuid,
            volume_size_bytes: 0,
            chunk_size_bytes: 0,
            flags: 0,
        },
    );
    r.send_bytes(&f[..f.len() - 5]);
    r.expect_quiet();
    drop(r);
    by.round(&mut fx, "truncated frames");
    wait_until("only the two bystanders are attached", || {
        fx.status_field("clients") == 2
    });

    // Unknown snapshot; the connection can identify again afterwards.
    let mut r = Raw::connect(&fx.sock);
    r.hello(Role::Client);
    r.send_identify(3, Volume::Snapshot(4242), uuid, 0, 0);
    let (code, culprit, text) = r.expect_error(3);
    assert_eq!(
        (code, culprit),
        (ErrorCode::NoSuchSnapshot, Kind::Identify.code()),
        "{text}"
    );
    assert!(text.contains("no such snapshot"), "{text}");
    r.send_identify(4, Volume::Snapshot(1), uuid, 0, 0);
    assert!(matches!(
        proto::decode(&r.recv()),
        Ok((_, Msg::IdentifyOk { .. }))
    ));
    drop(r);
    by.round(&mut fx, "unknown snapshot");

    // Wrong geometry and wrong origin: refused, the connection stays.
    let mut r = Raw::connect(&fx.sock);
    r.hello(Role::Client);
    r.send_identify(3, Volume::Origin, uuid, 4096, 0);
    let (code, _, text) = r.expect_error(3);
    assert_eq!(code, ErrorCode::GeometryMismatch, "{text}");
    assert!(text.contains("chunk size 4096"), "{text}");
    r.send_identify(4, Volume::Origin, uuid, 0, fx.origin_bytes + CHUNK);
    let (code, _, text) = r.expect_error(4);
    assert_eq!(code, ErrorCode::GeometryMismatch, "{text}");
    assert!(text.contains("volume size"), "{text}");
    let mut other = uuid;
    other[0] ^= 0xff;
    r.send_identify(5, Volume::Origin, other, CHUNK as u32, 0);
    let (code, _, text) = r.expect_error(5);
    assert_eq!(code, ErrorCode::GeometryMismatch, "{text}");
    assert!(text.contains("origin UUID"), "{text}");
    drop(r);
    by.round(&mut fx, "wrong geometry and origin");

    // Data requests before Identify and before Hello.
    let mut sc = [0u8; proto::RANGES_BYTES_MAX];
    let q = Msg::QueryOriginWrite(ranges(2, 1, &mut sc));
    let mut r = Raw::connect(&fx.sock);
    r.send(3, &q);
    let (code, culprit, text) = r.expect_error(3);
    assert_eq!(
        (code, culprit),
        (ErrorCode::NotIdentified, Kind::QueryOriginWrite.code()),
        "{text}"
    );
    assert!(text.contains("Hello"), "{text}");
    r.hello(Role::Client);
    r.send(4, &q);
    let (code, _, text) = r.expect_error(4);
    assert_eq!(code, ErrorCode::NotIdentified, "{text}");
    assert!(text.contains("Identify"), "{text}");
    drop(r);
    by.round(&mut fx, "data requests before Hello and Identify");

    // An unknown kind: answered, and the connection goes on.
    let mut r = Raw::connect(&fx.sock);
    r.hello(Role::Control);
    let mut f = frame(9, &Msg::Status);
    f[6..8].copy_from_slice(&0x0077u16.to_le_bytes());
    r.send_bytes(&f);
    let (code, culprit, text) = r.expect_error(9);
    assert_eq!((code, culprit), (ErrorCode::UnknownKind, 0x0077), "{text}");
    r.send(10, &Msg::Status);
    match proto::decode(&r.recv()) {
        Ok((h, Msg::StatusReply { clients, .. })) => {
            assert_eq!(h.request_id, 10);
            assert_eq!(clients, 2);
        }
        other => panic!("expected StatusReply, got {other:?}"),
    }
    drop(r);
    by.round(&mut fx, "unknown kind");

    // Nonzero flags, a reply kind from a client, a second Hello: answered,
    // and the connection goes on. A length under the header: closed.
    let mut r = Raw::connect(&fx.sock);
    r.hello(Role::Client);
    let mut f = frame(11, &Msg::Status);
    f[12] = 1;
    r.send_bytes(&f);
    let (code, _, text) = r.expect_error(11);
    assert_eq!(code, ErrorCode::BadFrame, "{text}");
    assert!(text.contains("flags"), "{text}");
    r.send(12, &Msg::Ok);
    let (code, culprit, text) = r.expect_error(12);
    assert_eq!(
        (code, culprit),
        (ErrorCode::BadFrame, Kind::Ok.code()),
        "{text}"
    );
    r.send(13, &hello);
    let (code, _, text) = r.expect_error(13);
    assert_eq!(code, ErrorCode::AlreadyIdentified, "{text}");
    let mut f = frame(14, &Msg::Status);
    f[8..12].copy_from_slice(&16u32.to_le_bytes());
    r.send_bytes(&f);
    let (code, _, text) = r.expect_error(0);
    assert_eq!(code, ErrorCode::BadFrame, "{text}");
    assert!(text.contains("under the 32-byte header"), "{text}");
    r.expect_closed();
    by.round(
        &mut fx,
        "bad flags, a reply kind, a second hello, a short length",
    );

    // Queries out of bounds, and a release of a lock never taken.
    let chunks = fx.origin_bytes / CHUNK;
    let mut r = Raw::attach(&fx.sock, Volume::Snapshot(1), uuid);
    r.send(20, &Msg::QuerySnapshotRead(ranges(chunks - 1, 2, &mut sc)));
    let (code, _, text) = r.expect_error(20);
    assert_eq!(code, ErrorCode::OutOfRange, "{text}");
    r.send(21, &Msg::QuerySnapshotWrite(ranges(0, 257, &mut sc)));
    let (code, _, text) = r.expect_error(21);
    assert_eq!(code, ErrorCode::TooLarge, "{text}");
    r.send(22, &Msg::FinishSnapshotRead(ranges(7, 1, &mut sc)));
    let (code, _, text) = r.expect_error(22);
    assert_eq!(code, ErrorCode::BadFrame, "{text}");
    assert!(text.contains("no read lock"), "{text}");
    r.send(23, &Msg::QueryOriginWrite(ranges(0, 1, &mut sc)));
    let (code, _, text) = r.expect_error(23);
    assert_eq!(code, ErrorCode::Unsupported, "{text}");
    assert_eq!(r.snapshot_read(24, chunks - 1, 1).len(), 1);
    drop(r);
    let mut r = Raw::attach(&fx.sock, Volume::Origin, uuid);
    r.send(30, &Msg::QueryOriginWrite(ranges(chunks, 1, &mut sc)));
    let (code, _, text) = r.expect_error(30);
    assert_eq!(code, ErrorCode::OutOfRange, "{text}");
    r.send(31, &Msg::QuerySnapshotRead(ranges(0, 1, &mut sc)));
    let (code, _, text) = r.expect_error(31);
    assert_eq!(code, ErrorCode::Unsupported, "{text}");
    drop(r);
    by.round(&mut fx, "queries out of bounds");

    // Delta queries: past the origin, of a snapshot that does not exist, a
    // malformed one (zero chunks); the connection goes on and a good one
    // is answered with a bitmap of the query's size.
    let mut r = Raw::connect(&fx.sock);
    r.hello(Role::Control);
    let delta = |volume, base, chunk, chunks| Msg::QueryDelta {
        volume,
        base,
        chunk,
        chunks,
    };
    r.send(40, &delta(Volume::Origin, 1, chunks - 1, 2));
    let (code, _, text) = r.expect_error(40);
    assert_eq!(code, ErrorCode::OutOfRange, "{text}");
    r.send(41, &delta(Volume::Snapshot(77), 1, 0, 8));
    let (code, _, text) = r.expect_error(41);
    assert_eq!(code, ErrorCode::NoSuchSnapshot, "{text}");
    r.send(42, &delta(Volume::Origin, 77, 0, 8));
    let (code, _, text) = r.expect_error(42);
    assert_eq!(code, ErrorCode::NoSuchSnapshot, "{text}");
    let mut f = frame(43, &delta(Volume::Origin, 1, 0, 8));
    f[proto::HEADER_BYTES + 8..proto::HEADER_BYTES + 12].copy_from_slice(&0u32.to_le_bytes());
    r.send_bytes(&f);
    let (code, culprit, text) = r.expect_error(43);
    assert_eq!(
        (code, culprit),
        (ErrorCode::BadFrame, Kind::QueryDelta.code()),
        "{text}"
    );
    let n = u32::try_from(chunks).expect("u32").min(1000);
    r.send(44, &delta(Volume::Snapshot(1), 1, 0, n));
    match proto::decode(&r.recv()) {
        Ok((
            h,
            Msg::DeltaMap {
                chunk,
                chunks: c,
                bits,
            },
        )) => {
            assert_eq!((h.request_id, chunk, c), (44, 0, n));
            assert_eq!(bits.len(), (n as usize).div_ceil(8));
            assert!(bits.iter().all(|&b| b == 0), "a snapshot equals itself");
        }
        other => panic!("expected a delta map, got {other:?}"),
    }
    drop(r);
    by.round(&mut fx, "delta queries");

    wait_until("no lock or waiting write is left behind", || {
        let st = fx.status();
        status_field(&st, "read locks") == 0
            && status_field(&st, "waiting writes") == 0
            && status_field(&st, "clients") == 2
    });
    by.origin.quit();
    by.snap.quit();
}

/// More connections than `--clients`: the extra ones are told so and closed;
/// the clients already served do not notice; once the flood ends, new
/// connections are served again.
#[test]
fn connections_past_the_client_limit_are_refused_then_served_again() {
    let mut fx = Fixture::new("flood", 4 << 20, &["--clients", "4"]);
    let size = fx.origin_bytes;
    let mut origin = pattern(0xdead_beef, size as usize);
    let mut io = fx.attach("origin", 1);
    let mut step = |io: &mut Io, i: u64| {
        let d = pattern(300 + i, 5000);
        let off = i * CHUNK + 77;
        io.write(off, &d);
        origin[off as usize..off as usize + d.len()].copy_from_slice(&d);
        assert_same("origin beside the flood", &io.read(0, size), &origin);
    };
    step(&mut io, 1);

    // Three more fill the table (the origin client is the fourth).
    let mut held: Vec<Raw> = (0..3)
        .map(|_| {
            let mut r = Raw::connect(&fx.sock);
            r.hello(Role::Control);
            r
        })
        .collect();
    for _ in 0..5 {
        let mut r = Raw::connect(&fx.sock);
        let (code, _, text) = r.expect_error(0);
        assert_eq!(code, ErrorCode::TooManyClients, "{text}");
        assert!(text.contains("maximum number of clients"), "{text}");
        r.expect_closed();
    }
    step(&mut io, 2);
    // A control command is refused too (its wording is racy: see
    // `a_control_command_during_a_flood_says_too_many_clients`).
    let o = csnap(&["status", "--server", s(&fx.sock)]);
    assert_error(&o, 1, "cannot reach the server");
    step(&mut io, 3);
    fx.assert_alive();

    // The held connections still work, then go away.
    for (i, r) in held.iter_mut().enumerate() {
        r.send(20 + i as u64, &Msg::ListSnapshots { from: 0 });
        assert!(matches!(
            proto::decode(&r.recv()),
            Ok((_, Msg::SnapshotList(_)))
        ));
    }
    held.clear();
    wait_until("a control connection is served again", || {
        csnap(&["status", "--server", s(&fx.sock)]).status.success()
    });
    let rs: Vec<Raw> = (0..3)
        .map(|_| {
            let mut r = Raw::connect(&fx.sock);
            r.hello(Role::Control);
            r
        })
        .collect();
    step(&mut io, 4);
    drop(rs);
    io.quit();
}

// ---------------------------------------------------------------------------
// 4. Control command errors.
// ---------------------------------------------------------------------------

#[test]
fn control_commands_report_errors_clearly() {
    let fx = Fixture::new("cli", 4 << 20, &[]);

    let o = fx.snapshot("create", &["1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = fx.snapshot("create", &["1"]);
    assert_error(&o, 1, "exists");
    let o = fx.snapshot("delete", &["9"]);
    assert_error(&o, 1, "no such snapshot");
    let o = fx.snapshot("priority", &["9", "5"]);
    assert_error(&o, 1, "no such snapshot");
    let o = fx.snapshot("priority", &["1", "-5"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(stdout(&o), "snapshot 1: priority -5\n");
    let o = fx.snapshot("create", &["70000"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows = fx.list();
    let tags: Vec<(u32, i64, &str)> = rows
        .iter()
        .map(|r| (r.tag, r.priority, r.state.as_str()))
        .collect();
    assert_eq!(tags, vec![(1, -5, "idle"), (70000, 0, "idle")]);

    // Deleting a snapshot in use, then after its client left.
    let io = fx.attach("70000", 5);
    assert_eq!(fx.row(70000).map(|r| r.state), Some("in use".to_string()));
    let o = fx.snapshot("delete", &["70000"]);
    assert_error(&o, 1, "in use");
    io.quit();
    wait_until("snapshot 70000 is idle", || {
        fx.row(70000).is_some_and(|r| r.state == "idle")
    });
    let o = fx.snapshot("delete", &["70000"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(stdout(&o), "deleted snapshot 70000\n");
    let o = fx.snapshot("delete", &["70000"]);
    assert_error(&o, 1, "no such snapshot");

    // No server there.
    let nowhere = fx.dir.0.join("nowhere");
    let o = csnap(&["status", "--server", s(&nowhere)]);
    assert_error(&o, 1, "cannot reach the server");
    let o = csnap(&["snapshot", "list", "--server", s(&nowhere)]);
    assert_error(&o, 1, "cannot reach the server");

    // A server on a store that is not formatted, or for another origin.
    let blank = fx.dir.0.join("blank");
    fs::write(&blank, vec![0u8; 1 << 20]).expect("blank store");
    let junk = fx.dir.0.join("junk");
    fs::write(&junk, pattern(5, 1 << 20)).expect("junk store");
    let small = fx.dir.0.join("small-origin");
    fs::write(&small, pattern(6, 1 << 20)).expect("small origin");
    let other_sock = fx.dir.0.join("other-sock");
    for (origin, store, word) in [
        (&fx.origin, &blank, "not a csnap store"),
        (&fx.origin, &junk, "not a csnap store"),
        (&small, &fx.store, "formatted for an origin of"),
        (&fx.origin, &fx.dir.0.join("missing"), "missing"),
    ] {
        let o = csnap(&[
            "server",
            "--origin",
            s(origin),
            "--store",
            s(store),
            "--listen",
            s(&other_sock),
        ]);
        assert_error(&o, 2, word);
        assert!(!other_sock.exists(), "a refused server left its socket");
    }
}

/// Two servers on one store each replay and write its journal and serve
/// their own diverging copy of the snapshot table: the second must be
/// refused before it writes anything.
#[test]
fn a_second_server_on_the_same_store_is_refused() {
    let fx = Fixture::new("twoservers", 4 << 20, &[]);
    let incarnation = fx.status_field("incarnation");
    let other = fx.dir.0.join("sock2");
    let mut child = Command::new(BIN)
        .args(["server", "--origin", s(&fx.origin), "--store", s(&fx.store)])
        .args(["--listen", s(&other)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the second server");
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(3) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(
        status.and_then(|st| st.code()),
        Some(2),
        "the second server on the same store kept running; stderr:\n{err}"
    );
    assert!(err.contains("in use") || err.contains("locked"), "{err}");
    // The first server's store was not touched.
    let o = fx.snapshot("create", &["1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fx.status_field("incarnation"), incarnation);
}

/// A server that cannot listen (the socket is served by another server on
/// the same store) must fail before it writes to the store: today it
/// replays, takes and commits the next incarnation, then fails to bind, and
/// the running server's next commit overwrites that incarnation, so the
/// number is handed out twice.
#[test]
fn a_server_that_cannot_listen_writes_nothing() {
    let fx = Fixture::new("nolisten", 4 << 20, &[]);
    let head = |p: &Path| {
        let mut b = vec![0u8; 1 << 20];
        fs::File::open(p)
            .and_then(|mut f| f.read_exact(&mut b))
            .expect("read the store");
        b
    };
    let before = head(&fx.store);
    let o = csnap(&[
        "server",
        "--origin",
        s(&fx.origin),
        "--store",
        s(&fx.store),
        "--listen",
        s(&fx.sock),
    ]);
    assert_error(&o, 2, "already listening");
    assert!(
        head(&fx.store) == before,
        "the refused server wrote to the store; stderr:\n{}",
        stderr(&o)
    );
}

/// A control command refused for a full client table must say so. Today the
/// server writes its TooManyClients frame and closes at once, the command's
/// Hello then fails with EPIPE, and it reports "Broken pipe" without reading
/// the frame waiting in its socket (most runs on a 2-core machine).
#[test]
fn a_control_command_during_a_flood_says_too_many_clients() {
    let fx = Fixture::new("floodcli", 1 << 20, &["--clients", "1"]);
    let mut held = Raw::connect(&fx.sock);
    held.hello(Role::Control);
    for _ in 0..10 {
        let o = csnap(&["status", "--server", s(&fx.sock)]);
        assert_error(&o, 1, "too many clients");
    }
}

/// The server seals its heap (`--seal abort`, the default) once it is set
/// up; it must then run without allocating. Started without any client, it
/// sometimes aborts at once with "heap violation: allocation of 11 bytes in
/// the sealed phase": the store worker thread (named `csnap-store`, 11
/// bytes) may still be starting when the main thread seals the heap.
#[test]
fn a_sealed_server_survives_its_start() {
    let mut fx = Fixture::new("sealstart", 1 << 20, &[]);
    fx.kill_server();
    for i in 0..20 {
        let mut srv = Server::spawn(&fx.origin, &fx.store, &fx.sock, &[]);
        std::thread::sleep(Duration::from_millis(300));
        if let Ok(Some(st)) = srv.child.try_wait() {
            srv.wait_exit(Duration::from_secs(1));
            panic!(
                "start {i}: the server died without a client ({st}):\n{}",
                srv.log()
            );
        }
    }
}
