//! A local cluster of real processes for the failover tests: a controller
//! (`csnap cluster run`), one agent per node (`csnap agent`, each with its
//! spawner and standby servers), `csnap io --agent` volume clients driven
//! through their standard input and output, and the control commands.
//!
//! Every process is killed on drop; on a failed test the logs of the
//! controller and agents (their servers write to the same stderr) are
//! printed.

// Test code: offsets and sizes are a few MiB at most and move freely between
// u64 and usize.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_csnap");
pub const CHUNK: u64 = 16 * 1024;
/// Generous: the tests run beside others on 2 cores.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// One cluster test at a time in a test binary: each runs a dozen
/// processes, and the timing assertions (a write that must not be granted
/// within a second, one that must be granted promptly) are kinder to a
/// machine that is not also running three other clusters.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Data.
// ---------------------------------------------------------------------------

#[allow(unused_imports)] // Not every test binary uses every helper.
pub use csnap_testkit::{seed, wait_for, Rng};

/// Asserts `got == want`, reporting the first and last differing bytes and
/// their chunks instead of megabytes of dump.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    csnap_testkit::assert_same_bytes(what, got, want, CHUNK);
}

// ---------------------------------------------------------------------------
// Processes.
// ---------------------------------------------------------------------------

/// Lines of a child's output, collected by a thread.
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Log {
    pub fn capture<R: Read + Send + 'static>(r: R) -> Log {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&lines);
        let thread = std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut g) = l.lock() {
                    g.push(line);
                }
            }
        });
        Log {
            lines,
            thread: Some(thread),
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn text(&self) -> String {
        let mut s = self.lines().join("\n");
        s.push('\n');
        s
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let l = self.lines();
        let from = l.len().saturating_sub(n);
        l[from..].join("\n")
    }

    /// The first line (from index `from` on) containing `needle`, waiting up
    /// to `t`.
    pub fn wait_line(&self, from: usize, needle: &str, t: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines().iter().skip(from).find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            if start.elapsed() >= t {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn len(&self) -> usize {
        self.lines.lock().map(|g| g.len()).unwrap_or(0)
    }

    /// Waits for the writer to close (the process exited).
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A long-running child (controller, agent, server) whose stderr is
/// collected; killed and reaped on drop.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: Log,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command) -> Daemon {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let log = Log::capture(child.stderr.take().expect("stderr"));
        Daemon {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, waiting up to `t`.
    pub fn wait_exit(&mut self, t: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.log.join();
                return Some(st);
            }
            if start.elapsed() >= t {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `BIN ARGS` to completion; panics after `TIMEOUT`.
pub fn run(args: &[OsString]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run csnap");
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for csnap") {
            break st;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`csnap {args:?}` did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// `run` with string arguments.
pub fn csnap(args: &[&str]) -> Output {
    run(&args.iter().map(OsString::from).collect::<Vec<_>>())
}

#[allow(unused_imports)] // Not every test binary uses every helper.
pub use csnap_testkit::text;

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The argument vector of process `pid` (empty once it is gone).
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Live `csnap` processes (argv[0] named csnap) whose arguments contain
/// every one of `pairs` as consecutive arguments.
pub fn csnap_pids(pairs: &[[&str; 2]]) -> Vec<u32> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let args = cmdline(pid);
        let is_csnap = args
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "csnap"));
        if !is_csnap {
            continue;
        }
        if pairs
            .iter()
            .all(|p| args.windows(2).any(|w| w[0] == p[0] && w[1] == p[1]))
        {
            v.push(pid);
        }
    }
    v.sort_unstable();
    v
}

/// Minor and major page faults of process `pid` (all its threads).
pub fn faults(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    let rest = &s[s.rfind(')').expect("stat comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state(3) ... minflt(10) cminflt majflt(12).
    (f[7].parse().expect("minflt"), f[9].parse().expect("majflt"))
}

pub fn kill(pid: u32, sig: i32) {
    csnap_sys::send_signal(pid, sig).unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

// ---------------------------------------------------------------------------
// Volume clients.
// ---------------------------------------------------------------------------

/// What a command sent to a `csnap io` must answer.
#[derive(Debug)]
pub enum Expect {
    /// `ok wrote N`.
    Write,
    /// `ok read N` and these bytes.
    Read(Vec<u8>),
    /// `ok read N`; the bytes are returned, not checked.
    ReadAny,
    /// Any reply (returned as is).
    Any,
}

#[derive(Debug)]
struct Cmd {
    cmd: String,
    path: PathBuf,
    expect: Expect,
}

/// A `csnap io` volume client process: commands on its stdin, one reply line
/// each on its stdout; killed and reaped on drop.
pub struct Io {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<(Instant, String)>,
    pub err: Log,
    pub size: u64,
    scratch: PathBuf,
    pending: VecDeque<Cmd>,
}

impl Io {
    /// Starts `csnap ARGS` (an `io` command line) and waits for `ready SIZE`.
    /// Every later reply line bumps `replies` (if given) as it arrives.
    pub fn start(
        name: &str,
        args: &[OsString],
        scratch: &Path,
        replies: Option<Arc<AtomicUsize>>,
    ) -> Io {
        Io::start_wrapped(name, &[], args, scratch, replies)
    }

    /// `start` under a command prefix (`ip netns exec NS` on the test bed).
    pub fn start_wrapped(
        name: &str,
        wrapper: &[&str],
        args: &[OsString],
        scratch: &Path,
        replies: Option<Arc<AtomicUsize>>,
    ) -> Io {
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn csnap io");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut first = true;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if !first {
                    if let Some(r) = &replies {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                }
                first = false;
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let err = Log::capture(child.stderr.take().expect("stderr"));
        let mut io = Io {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            lines,
            err,
            size: 0,
            scratch: scratch.to_path_buf(),
            pending: VecDeque::new(),
        };
        match io.lines.recv_timeout(TIMEOUT) {
            Ok((_, l)) => match l.strip_prefix("ready ").map(str::parse::<u64>) {
                Some(Ok(size)) => io.size = size,
                _ => panic!("{name}: unexpected first line {l:?}"),
            },
            Err(e) => {
                let _ = io.child.kill();
                let _ = io.child.wait();
                io.err.join();
                panic!(
                    "{name}: no `ready` line ({e:?}); stderr:\n{}",
                    io.err.text()
                );
            }
        }
        io
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn scratch_file(&self) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.scratch.join(format!("io-{n}"))
    }

    fn push(&mut self, cmd: String, path: PathBuf, expect: Expect) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {cmd:?}: {e}", self.name));
        self.pending.push_back(Cmd { cmd, path, expect });
    }

    /// Sends `write OFF FILE` (data in a fresh scratch file).
    pub fn send_write(&mut self, off: u64, data: &[u8]) {
        let path = self.scratch_file();
        std::fs::write(&path, data).expect("write scratch file");
        self.push(format!("write {off} {}", s(&path)), path, Expect::Write);
    }

    /// Sends `read OFF LEN FILE`; `want`: the bytes it must return.
    pub fn send_read(&mut self, off: u64, len: u64, want: Option<Vec<u8>>) {
        let path = self.scratch_file();
        let expect = match want {
            Some(w) => {
                assert_eq!(w.len() as u64, len);
                Expect::Read(w)
            }
            None => Expect::ReadAny,
        };
        self.push(format!("read {off} {len} {}", s(&path)), path, expect);
    }

    /// Sends any other command (`hold OFF LEN`, `unhold`, `flush`).
    pub fn send(&mut self, cmd: &str) {
        self.push(cmd.to_string(), PathBuf::new(), Expect::Any);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The reply to the oldest pending command if it comes within `t`
    /// (`None`: still pending).
    pub fn try_reply(&mut self, t: Duration) -> Option<(Instant, String)> {
        match self.lines.recv_timeout(t) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let cmd = self.pending.front().map(|c| c.cmd.clone());
                let _ = self.child.wait();
                self.err.join();
                panic!(
                    "{}: exited with {cmd:?} pending; stderr:\n{}",
                    self.name,
                    self.err.text()
                );
            }
        }
    }

    /// The reply to the oldest pending command within `t` (taken off the
    /// pending list), `Pending`, or `Exited` when the process ended first
    /// (for a client that is expected to be killed, such as a fenced
    /// node's).
    pub fn reply_or_exit(&mut self, t: Duration) -> Outcome {
        match self.lines.recv_timeout(t) {
            Ok((at, line)) => {
                self.pending.pop_front();
                Outcome::Reply(at, line)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Outcome::Pending,
            Err(mpsc::RecvTimeoutError::Disconnected) => Outcome::Exited,
        }
    }

    /// Waits for the reply to the oldest pending command and checks it:
    /// `ok ...` (no I/O error reached the user), and for reads, the data.
    /// Returns the time the reply arrived, the line, and any bytes read.
    pub fn finish(&mut self) -> (Instant, String, Vec<u8>) {
        let Some((at, line)) = self.try_reply(TIMEOUT) else {
            panic!(
                "{}: no reply to {:?} within {TIMEOUT:?}; stderr:\n{}",
                self.name,
                self.pending.front().map(|c| &c.cmd),
                self.err.text()
            );
        };
        let c = self.pending.pop_front().expect("a pending command");
        assert!(
            line.starts_with("ok"),
            "{}: {:?} answered {line:?} (an I/O error reached the volume's user); stderr:\n{}",
            self.name,
            c.cmd,
            self.err.text()
        );
        let mut data = Vec::new();
        match c.expect {
            Expect::Write => {
                assert!(line.starts_with("ok wrote "), "{}: {line}", self.name);
                let _ = std::fs::remove_file(&c.path);
            }
            Expect::Read(want) => {
                data = std::fs::read(&c.path).expect("read scratch file");
                let _ = std::fs::remove_file(&c.path);
                assert_same(&format!("{}: {}", self.name, c.cmd), &data, &want);
            }
            Expect::ReadAny => {
                data = std::fs::read(&c.path).expect("read scratch file");
                let _ = std::fs::remove_file(&c.path);
            }
            Expect::Any => {}
        }
        (at, line, data)
    }

    /// Finishes every pending command.
    pub fn finish_all(&mut self) {
        while !self.pending.is_empty() {
            self.finish();
        }
    }

    pub fn write(&mut self, off: u64, data: &[u8]) {
        self.send_write(off, data);
        self.finish();
    }

    pub fn read(&mut self, off: u64, len: u64) -> Vec<u8> {
        self.send_read(off, len, None);
        self.finish().2
    }

    /// A command and its reply line (checked to be `ok ...`).
    pub fn call(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.finish().1
    }

    /// `quit`, and a clean exit.
    pub fn quit(mut self) {
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
            if let Ok(Some(st)) = self.child.try_wait() {
                self.err.join();
                assert!(
                    st.success(),
                    "{}: exit {st}: {}",
                    self.name,
                    self.err.text()
                );
                return;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "{}: did not exit after quit",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} stderr\n{}", self.name, self.err.tail(40));
        }
        for c in &self.pending {
            let _ = std::fs::remove_file(&c.path);
        }
    }
}

// ---------------------------------------------------------------------------
// Lock-window checks of an `Io` (shared by the failover and test-bed tests).
// ---------------------------------------------------------------------------

/// The number in a `ok held K` reply.
pub fn held(reply: &str) -> u64 {
    reply
        .strip_prefix("ok held ")
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("not a hold reply: {reply:?}"))
}

/// An origin write of a whole chunk, sent; returns what was written.
pub fn send_chunk_write(w: &mut Io, rng: &mut Rng, chunk: u64) -> Vec<u8> {
    let data = rng.bytes(CHUNK as usize);
    w.send_write(chunk * CHUNK, &data);
    data
}

/// How long a write that must wait is watched.
pub const QUIET: Duration = Duration::from_secs(1);
/// A write that may go must be answered within this (generous: 2 cores,
/// other tests).
pub const PROMPT: Duration = Duration::from_secs(5);

/// Asserts the write `w` has pending is not answered within `QUIET`.
pub fn assert_waits(w: &mut Io, why: &str) {
    if let Some((_, line)) = w.try_reply(QUIET) {
        panic!("{}: the origin write was answered ({line:?}) {why}", w.name);
    }
}

/// Waits for the pending write's reply; asserts it came within `PROMPT` of
/// `since`; returns the latency.
pub fn assert_granted(w: &mut Io, since: Instant, why: &str) -> Duration {
    let (at, _, _) = w.finish();
    let d = at.saturating_duration_since(since);
    assert!(d < PROMPT, "{}: the origin write took {d:?} {why}", w.name);
    d
}

// ---------------------------------------------------------------------------
// The cluster.
// ---------------------------------------------------------------------------

/// One node's line of `csnap cluster status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub node: u32,
    pub member: bool,
    pub connected: bool,
    pub standby: bool,
    /// The incarnation it serves, 0 if none.
    pub serving: u64,
}

/// `csnap cluster status`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Non-zero: the store is marked failed after this many server deaths
    /// (the crash-loop breaker).
    pub failed: u32,
    /// The serving incarnation, 0 if none.
    pub incarnation: u64,
    pub node: u32,
    pub addr: String,
    pub nodes: Vec<NodeState>,
}

impl Status {
    pub fn node(&self, n: u32) -> Option<&NodeState> {
        self.nodes.iter().find(|x| x.node == n)
    }
}

pub fn parse_status(out: &str) -> Status {
    let mut st = Status {
        failed: 0,
        incarnation: 0,
        node: 0,
        addr: String::new(),
        nodes: Vec::new(),
    };
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("store: FAILED after ") {
            st.failed = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .expect("FAILED after N");
        } else if let Some(rest) = l.strip_prefix("server: incarnation ") {
            // "I on node N at ADDR"
            let (inc, rest) = rest.split_once(" on node ").expect("I on node N");
            let (node, addr) = rest.split_once(" at ").expect("N at ADDR");
            st.incarnation = inc.parse().expect("incarnation");
            st.node = node.parse().expect("node");
            st.addr = addr.to_string();
        } else if let Some(rest) = l.strip_prefix("node ") {
            let (n, flags) = rest.split_once(": ").expect("node N: ...");
            let w: Vec<&str> = flags.split_whitespace().collect();
            st.nodes.push(NodeState {
                node: n.parse().expect("node id"),
                member: w.first() == Some(&"member"),
                connected: w.get(1) == Some(&"connected"),
                standby: w.get(2) == Some(&"standby-ready"),
                serving: if w.get(3) == Some(&"serving") {
                    w.get(5).and_then(|v| v.parse().ok()).unwrap_or(0)
                } else {
                    0
                },
            });
        }
    }
    st.nodes.sort_by_key(|n| n.node);
    st
}

/// A test directory with a random origin and a store formatted for it;
/// removed on drop (kept with `CSNAP_KEEP`).
pub struct Disks {
    pub dir: PathBuf,
    pub origin: PathBuf,
    pub store: PathBuf,
    /// The origin as formatted.
    pub initial: Vec<u8>,
}

impl Disks {
    pub fn new(name: &str, origin_bytes: usize, store_size: &str, rng: &mut Rng) -> Disks {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("csnap-fo-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let origin = dir.join("origin");
        let store = dir.join("store");
        let initial = rng.bytes(origin_bytes);
        std::fs::write(&origin, &initial).expect("origin");
        let o = csnap(&[
            "format",
            "--origin",
            s(&origin),
            "--store",
            s(&store),
            "--store-size",
            store_size,
            "--chunk-size",
            "16K",
        ]);
        assert!(o.status.success(), "format: {}", text(&o));
        Disks {
            dir,
            origin,
            store,
            initial,
        }
    }

    /// `csnap io --server ADDR` on `volume`.
    pub fn io_server(&self, addr: &Path, volume: &str, client_id: u64) -> Io {
        let args: Vec<OsString> = [
            "io",
            "--server",
            s(addr),
            "--origin",
            s(&self.origin),
            "--store",
            s(&self.store),
            "--volume",
            volume,
            "--client-id",
            &client_id.to_string(),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        Io::start(
            &format!("io[{volume} #{client_id} at {}]", addr.display()),
            &args,
            &self.dir,
            None,
        )
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        if std::env::var_os("CSNAP_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub nodes: u32,
    pub origin_bytes: usize,
    pub store_size: &'static str,
    /// Extra arguments of every agent (`--seal count`, `--server-arg=...`).
    pub agent_args: Vec<String>,
    /// Node N's agent runs under this command prefix (e.g. `strace -f ...`).
    pub agent_wrapper: Option<(u32, Vec<String>)>,
    /// The controller runs under this command prefix.
    pub controller_wrapper: Option<Vec<String>>,
    /// Extra arguments of the controller. By default the crash-loop
    /// breaker is off (`--max-server-deaths 0`): these tests kill servers
    /// on purpose, several within seconds; the breaker's own test clears
    /// this.
    pub controller_args: Vec<String>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            nodes: 3,
            origin_bytes: 4 << 20,
            store_size: "128M",
            agent_args: Vec::new(),
            agent_wrapper: None,
            controller_wrapper: None,
            controller_args: vec!["--max-server-deaths".into(), "0".into()],
        }
    }
}

/// `csnap cluster ACTION --dir CDIR REST`.
pub fn cluster_cmd_in(cdir: &Path, action: &str, rest: &[&str]) -> Output {
    let mut a = vec!["cluster", action, "--dir", s(cdir)];
    a.extend_from_slice(rest);
    csnap(&a)
}

/// The parsed `csnap cluster status` of the cluster in `cdir`.
pub fn status_in(cdir: &Path) -> Status {
    let o = cluster_cmd_in(cdir, "status", &[]);
    assert!(o.status.success(), "cluster status: {}", text(&o));
    parse_status(&String::from_utf8_lossy(&o.stdout))
}

/// Polls the status of the cluster in `cdir` until `f` holds; returns it.
/// A timeout names `what`, the last status and `context()` (logs).
pub fn wait_status_in(
    cdir: &Path,
    what: &str,
    mut f: impl FnMut(&Status) -> bool,
    context: impl Fn() -> String,
) -> Status {
    let start = Instant::now();
    loop {
        let st = status_in(cdir);
        if f(&st) {
            return st;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out waiting until {what}; last status {st:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Fencing: `client` (of server `a`, paused while `b` took the store over
/// and continued since) writes `data` at `off`; the write must be refused
/// as stale, not acknowledged.
pub fn assert_write_refused_as_stale(
    client: &mut Io,
    off: u64,
    data: &[u8],
    a: &Daemon,
    b: &Daemon,
) {
    client.send_write(off, data);
    let (_, reply) = client
        .try_reply(TIMEOUT)
        .expect("the old server's client gets an answer");
    assert!(
        !reply.starts_with("ok") && reply.contains("stale server incarnation"),
        "the old server's client must be refused as stale: {reply:?}\n--- old server\n{}\n--- new server\n{}",
        a.log.text(),
        b.log.text()
    );
}

/// Fencing: the old server `a` exits with status 1, names the fence and
/// leaves without a heap violation.
pub fn assert_exits_fenced(a: &mut Daemon) {
    let st = a
        .wait_exit(TIMEOUT)
        .expect("the old server exits once fenced");
    let log = a.log.text();
    assert_eq!(st.code(), Some(1), "the old server's exit: {st}\n{log}");
    assert!(
        log.contains("fenced"),
        "the old server names the reason:\n{log}"
    );
    assert!(
        !log.contains("heap violation"),
        "the old server's exit path:\n{log}"
    );
}

/// What [`Io::reply_or_exit`] saw.
#[derive(Debug)]
pub enum Outcome {
    Reply(Instant, String),
    Pending,
    Exited,
}

pub struct Cluster {
    /// The test's directory (origin, store, scratch files).
    pub dir: PathBuf,
    /// The cluster directory (`--dir`).
    pub cdir: PathBuf,
    pub origin: PathBuf,
    pub store: PathBuf,
    /// The origin as formatted.
    pub initial: Vec<u8>,
    pub controller: Option<Daemon>,
    /// Node N's agent at index N-1.
    pub agents: Vec<Option<Daemon>>,
    opts: ClusterOpts,
    disks: Disks,
}

impl Cluster {
    /// Formats a store for a random origin and starts the controller and
    /// `opts.nodes` agents; returns once every node is a connected member
    /// with a standby ready.
    pub fn start(name: &str, opts: ClusterOpts, rng: &mut Rng) -> Cluster {
        let disks = Disks::new(name, opts.origin_bytes, opts.store_size, rng);
        let mut c = Cluster {
            dir: disks.dir.clone(),
            cdir: disks.dir.join("cluster"),
            origin: disks.origin.clone(),
            store: disks.store.clone(),
            initial: disks.initial.clone(),
            controller: None,
            agents: Vec::new(),
            opts,
            disks,
        };
        c.start_controller();
        for node in 1..=c.opts.nodes {
            let a = c.spawn_agent(node);
            c.agents.push(Some(a));
        }
        c.wait_all_ready();
        c
    }

    pub fn start_controller(&mut self) {
        assert!(self.controller.is_none());
        let mut cmd = match &self.opts.controller_wrapper {
            Some(w) => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let d = Daemon::spawn(
            "controller",
            cmd.args(["cluster", "run", "--dir", s(&self.cdir)])
                .args(&self.opts.controller_args),
        );
        self.controller = Some(d);
        let sock = self.cdir.join("controller.sock");
        wait_for("the controller listens", TIMEOUT, || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        });
    }

    /// SIGKILLs the controller (the csnap process itself: killing a tracer
    /// would only detach it) and reaps it.
    pub fn kill_controller(&mut self) {
        for p in csnap_pids(&[["cluster", "run"], ["--dir", s(&self.cdir)]]) {
            let _ = csnap_sys::send_signal(p, libc::SIGKILL);
        }
        if let Some(mut c) = self.controller.take() {
            if c.wait_exit(TIMEOUT).is_none() {
                c.kill();
            }
        }
    }

    fn spawn_agent(&self, node: u32) -> Daemon {
        let wrapper = self
            .opts
            .agent_wrapper
            .as_ref()
            .filter(|(n, _)| *n == node)
            .map(|(_, w)| w.clone());
        let mut cmd = match &wrapper {
            Some(w) => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["agent", "--dir", s(&self.cdir), "--node", &node.to_string()])
            .args(["--origin", s(&self.origin), "--store", s(&self.store)])
            .args(&self.opts.agent_args);
        Daemon::spawn(&format!("agent {node}"), &mut cmd)
    }

    /// Waits until every node is a connected member with a standby ready.
    pub fn wait_all_ready(&self) -> Status {
        let n = self.opts.nodes as usize;
        self.wait("every node is a member with a standby ready", |st| {
            st.nodes.len() == n
                && st
                    .nodes
                    .iter()
                    .all(|x| x.member && x.connected && x.standby)
        })
    }

    pub fn agent_sock(&self, node: u32) -> PathBuf {
        self.cdir.join(format!("node-{node}")).join("agent.sock")
    }

    /// `csnap cluster ARGS --dir D`.
    pub fn cluster_cmd(&self, action: &str, rest: &[&str]) -> Output {
        cluster_cmd_in(&self.cdir, action, rest)
    }

    pub fn status(&self) -> Status {
        status_in(&self.cdir)
    }

    /// Polls the status until `f` holds; returns it.
    pub fn wait(&self, what: &str, f: impl FnMut(&Status) -> bool) -> Status {
        wait_status_in(&self.cdir, what, f, String::new)
    }

    /// Waits until an incarnation above `than` serves.
    pub fn wait_serving_above(&self, than: u64) -> Status {
        self.wait(&format!("an incarnation above {than} serves"), |st| {
            st.incarnation > than
        })
    }

    /// The pid of the server listening on `addr`.
    pub fn server_pid(addr: &str) -> u32 {
        let v = csnap_pids(&[["--listen", addr]]);
        assert_eq!(v.len(), 1, "one server process on {addr}: {v:?}");
        v[0]
    }

    /// The pid of node `node`'s agent process (not a wrapper's).
    pub fn agent_pid(&self, node: u32) -> u32 {
        let n = node.to_string();
        let v = csnap_pids(&[["--dir", s(&self.cdir)], ["--node", &n], ["agent", "--dir"]]);
        assert_eq!(v.len(), 1, "one agent process for node {node}: {v:?}");
        v[0]
    }

    /// The pid of node `node`'s standby server (the one its agent spawned
    /// and has not started): the node's server process other than `except`.
    pub fn standby_pids(&self, node: u32) -> Vec<u32> {
        let dir = self.cdir.join(format!("node-{node}"));
        let n = node.to_string();
        csnap_pids(&[["--standby", "--agent"], ["--node", &n]])
            .into_iter()
            .filter(|&p| cmdline(p).iter().any(|a| a.starts_with(s(&dir))))
            .collect()
    }

    /// SIGKILLs the serving server; returns (its incarnation, node, pid).
    pub fn kill_server(&self) -> (u64, u32, u32) {
        let st = self.wait("a server serves", |st| st.incarnation > 0);
        let pid = Self::server_pid(&st.addr);
        kill(pid, libc::SIGKILL);
        (st.incarnation, st.node, pid)
    }

    /// `csnap snapshot ACTION --server ADDR TAG` at the serving server.
    pub fn snapshot(&self, action: &str, tag: u32) -> Output {
        let st = self.wait("a server serves", |st| st.incarnation > 0);
        csnap(&["snapshot", action, "--server", &st.addr, &tag.to_string()])
    }

    /// `snapshot create`, which must succeed.
    pub fn create(&self, tag: u32) {
        let o = self.snapshot("create", tag);
        assert!(o.status.success(), "snapshot create {tag}: {}", text(&o));
    }

    /// The argument vector of a `csnap io --agent` client of node `node`.
    pub fn io_args(&self, volume: &str, client_id: u64, node: u32) -> Vec<OsString> {
        [
            "io",
            "--agent",
            s(&self.agent_sock(node)),
            "--origin",
            s(&self.origin),
            "--store",
            s(&self.store),
            "--volume",
            volume,
            "--client-id",
            &client_id.to_string(),
            "--node-id",
            &node.to_string(),
        ]
        .iter()
        .map(OsString::from)
        .collect()
    }

    /// A `csnap io --agent` client of node `node`.
    pub fn io(&self, volume: &str, client_id: u64, node: u32) -> Io {
        self.io_counted(volume, client_id, node, None)
    }

    pub fn io_counted(
        &self,
        volume: &str,
        client_id: u64,
        node: u32,
        replies: Option<Arc<AtomicUsize>>,
    ) -> Io {
        Io::start(
            &format!("io[{volume} #{client_id} node {node}]"),
            &self.io_args(volume, client_id, node),
            &self.dir,
            replies,
        )
    }

    pub fn agent(&self, node: u32) -> &Daemon {
        self.agents[node as usize - 1]
            .as_ref()
            .expect("agent running")
    }

    /// Stops every agent (and so every server) and the controller.
    pub fn stop(&mut self) {
        for n in 0..self.agents.len() {
            if self
                .opts
                .agent_wrapper
                .as_ref()
                .is_some_and(|(w, _)| *w as usize == n + 1)
            {
                // Killing a tracer detaches its tracee: kill the agent.
                let pids = csnap_pids(&[
                    ["--dir", s(&self.cdir)],
                    ["--node", &(n + 1).to_string()],
                    ["agent", "--dir"],
                ]);
                for p in pids {
                    let _ = csnap_sys::send_signal(p, libc::SIGKILL);
                }
            }
            if let Some(mut a) = self.agents[n].take() {
                if a.wait_exit(Duration::ZERO).is_none() {
                    a.kill();
                }
                a.log.join();
                self.agents[n] = Some(a);
            }
        }
        self.kill_controller();
        // Servers die with their agents (PR_SET_PDEATHSIG): wait until no
        // server of this cluster is left, so the store is quiet. (No panic
        // here: this also runs in `drop` while a test panics.)
        let cdir = s(&self.cdir).to_string();
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            let left = csnap_pids(&[["server", "--standby"]])
                .into_iter()
                .any(|p| cmdline(p).iter().any(|a| a.starts_with(&cdir)));
            if !left {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!("cluster stop: servers of {cdir} are still running");
    }

    /// The logs of the controller and every agent (with its servers).
    pub fn logs(&self, lines: usize) -> String {
        let mut t = String::new();
        if let Some(c) = &self.controller {
            t.push_str(&format!("--- controller\n{}\n", c.log.tail(lines)));
        }
        for a in self.agents.iter().flatten() {
            t.push_str(&format!("--- {}\n{}\n", a.name, a.log.tail(lines)));
        }
        t
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs(60));
        }
        self.stop();
        if std::env::var_os("CSNAP_LOGS").is_some() {
            eprintln!("{}", self.logs(100_000));
        }
        // The directory goes with `disks`, after this.
        let _ = &self.disks;
    }
}

// ---------------------------------------------------------------------------
// strace -ff output.
// ---------------------------------------------------------------------------

/// One traced thread (`strace -f -ff -o PREFIX` writes `PREFIX.TID`).
#[derive(Debug, Clone)]
pub struct Traced {
    pub tid: u32,
    /// The tid that created it.
    pub parent: Option<u32>,
    /// Created as a thread (`CLONE_THREAD`), not a process.
    pub thread: bool,
    /// The command it runs: its own `execve`, else its creator's.
    pub argv: Vec<String>,
    /// Its name, if it set one (`PR_SET_NAME`).
    pub name: String,
    pub lines: Vec<String>,
}

impl Traced {
    /// The syscalls made after its `n`-th seccomp filter install (1-based)
    /// and before the next install: `(phase, names)`, phase 1 after the
    /// first install.
    pub fn phases(&self) -> Vec<BTreeSet<String>> {
        let mut v: Vec<BTreeSet<String>> = Vec::new();
        for l in &self.lines {
            if l.contains("seccomp(SECCOMP_SET_MODE_FILTER") {
                if let Some(last) = v.last_mut() {
                    // The next table's install counts in the phase before.
                    last.insert("seccomp".to_string());
                }
                v.push(BTreeSet::new());
                continue;
            }
            if let (Some(last), Some(n)) = (v.last_mut(), syscall_name(l)) {
                last.insert(n.to_string());
            }
        }
        v
    }

    /// Whether it is a `csnap SUB ...` process's thread.
    pub fn runs(&self, sub: &str) -> bool {
        self.argv.get(1).is_some_and(|a| a == sub)
    }
}

/// The syscall a strace line starts, if any (a `resumed` line counts at
/// its start; signals and exits are not syscalls).
pub fn syscall_name(line: &str) -> Option<&str> {
    let rest = line.trim_start();
    if rest.starts_with("<...") || rest.starts_with("---") || rest.starts_with("+++") {
        return None;
    }
    let name = rest.split('(').next()?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then_some(name)
}

/// The quoted strings of an `execve("...", ["a", "b"], ...)` argument list.
fn exec_argv(line: &str) -> Vec<String> {
    let Some(open) = line.find('[') else {
        return Vec::new();
    };
    let Some(close) = line[open..].find(']') else {
        return Vec::new();
    };
    line[open + 1..open + close]
        .split("\", \"")
        .map(|a| a.trim_matches('"').to_string())
        .collect()
}

/// Panics unless strace runs (the test command installs it).
pub fn require_strace() {
    let ok = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "strace is required for the syscall audit (the test command installs it)"
    );
}

/// `strace -f -ff -qq -s 512 -v -o PREFIX` as a command prefix: one trace
/// file per thread, `PREFIX.TID` (see `read_traces`).
pub fn strace_wrapper(prefix: &Path) -> Vec<String> {
    ["strace", "-f", "-ff", "-qq", "-s", "512", "-v", "-o"]
        .iter()
        .map(ToString::to_string)
        .chain([s(prefix).to_string()])
        .collect()
}

/// Reads every `PREFIX.TID` file and links threads and processes to their
/// creators.
pub fn read_traces(prefix: &Path) -> BTreeMap<u32, Traced> {
    let dir = prefix.parent().expect("trace dir");
    let stem = format!(
        "{}.",
        prefix
            .file_name()
            .and_then(|n| n.to_str())
            .expect("trace name")
    );
    let mut out: BTreeMap<u32, Traced> = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("trace dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(tid) = name.strip_prefix(&stem).and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let mut argv = Vec::new();
        let mut tname = String::new();
        for l in &lines {
            if l.starts_with("execve(") && l.trim_end().ends_with("= 0") {
                argv = exec_argv(l);
            }
            if let Some(r) = l.split_once("PR_SET_NAME, \"") {
                tname = r.1.split('"').next().unwrap_or("").to_string();
            }
        }
        out.insert(
            tid,
            Traced {
                tid,
                parent: None,
                thread: false,
                argv,
                name: tname,
                lines,
            },
        );
    }
    // Creators: `clone(...) = N`, `clone3(...) = N`, `fork() = N`, `vfork() = N`.
    let mut links = Vec::new();
    for t in out.values() {
        for l in &t.lines {
            let Some(n) = syscall_name(l) else { continue };
            if !matches!(n, "clone" | "clone3" | "fork" | "vfork") {
                continue;
            }
            let Some(child) = l
                .rsplit_once("= ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|r| r.parse::<u32>().ok())
            else {
                continue;
            };
            links.push((child, t.tid, l.contains("CLONE_THREAD")));
        }
    }
    for (child, parent, thread) in links {
        if let Some(c) = out.get_mut(&child) {
            c.parent = Some(parent);
            c.thread = thread;
        }
    }
    // Commands: inherited from the creator until an execve of its own.
    let tids: Vec<u32> = out.keys().copied().collect();
    for _ in 0..8 {
        for &t in &tids {
            if out[&t].argv.is_empty() {
                if let Some(p) = out[&t].parent {
                    let a = out.get(&p).map(|p| p.argv.clone()).unwrap_or_default();
                    if let Some(c) = out.get_mut(&t) {
                        c.argv = a;
                    }
                }
            }
        }
    }
    out
}

/// Audits the single-filter `csnap SUB` processes traced under `prefix`
/// against `table`: there must be `runs` of them that installed a filter,
/// each exactly one; each run's confined syscalls must be in the table, and
/// every rule not marked as an exit path must be used by one of the runs.
/// Panics with the problems.
pub fn audit_confined_runs(prefix: &Path, sub: &str, runs: usize, table: &[csnap_audit::Rule]) {
    let traces = read_traces(prefix);
    let confined: Vec<_> = traces
        .values()
        .filter(|t| t.runs(sub) && !t.phases().is_empty())
        .collect();
    assert_eq!(
        confined.len(),
        runs,
        "confined `csnap {sub}` runs in the trace"
    );
    let mut union = BTreeSet::new();
    let mut problems = Vec::new();
    for t in confined {
        let phases = t.phases();
        assert_eq!(phases.len(), 1, "`csnap {sub}` installs one filter");
        eprintln!("{sub}, confined: {:?}", phases[0]);
        problems.extend(audit(sub, &phases[0], table, false));
        union.extend(phases[0].iter().cloned());
    }
    problems.extend(audit(sub, &union, table, true));
    assert!(
        problems.is_empty(),
        "`csnap {sub}` syscall audit failed:\n{}",
        problems.join("\n")
    );
}

/// Checks `seen` against `table`: the syscalls it lacks, and (when
/// `unused` is asked for) the exercised rules never seen.
pub fn audit(
    phase: &str,
    seen: &BTreeSet<String>,
    table: &[csnap_audit::Rule],
    unused: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for s in seen {
        if !table.iter().any(|r| r.name == s) {
            problems.push(format!("{phase}: {s} is not in the whitelist"));
        }
    }
    if unused {
        for r in table {
            if r.exercised && !seen.contains(r.name) {
                problems.push(format!(
                    "{phase}: whitelisted {} was never used ({})",
                    r.name, r.why
                ));
            }
        }
    }
    problems
}
