//! Failover benchmark: a 3-node local cluster (controller, three agents
//! with their standbys, confinement on) and 4 volume clients in threads
//! (`VolumeClient::open_via_agent`: two origin writers, two snapshot
//! readers, on three nodes) doing I/O continuously; the serving server is
//! SIGKILLed `--failovers` times (default 120), each time once every node
//! has its standby ready again.
//!
//! Per failover, on `CLOCK_MONOTONIC` (one clock for every process:
//! `csnap_sys::monotonic_micros`, and the `[t=MICROS]` prefix of the agent
//! and controller event lines):
//! - detection: kill to the agent of the killed server logging "server
//!   incarnation N died" (the broken local socket);
//! - start to serving: the new server's own figure ("started in X us");
//! - kill to every client served again: to the last of the clients' first
//!   completed I/O answered by the new incarnation;
//! - the path in between: the controller placing the server, the starting
//!   agent gathering and sending StartServer, its Serving, the controller
//!   hearing ServerUp, and the first and last client served;
//! - the disk's floor in the same run: one `O_DSYNC` 8 KiB write on the same
//!   file system just before each kill, the least a durable incarnation
//!   commit costs under this load, and how much of the start is beyond it;
//!   and the same write on the quiet disk, before the clients start.
//!
//! The store is a thick (zero-written) file, as the shared block device it
//! stands for: no file-system block allocation inside the measured flushes.
//!
//! Run: `cargo build --release -p csnap && target/release/failover-bench [--failovers N]`
//! (as root: mlock; `cargo run --release -p csnap --bin failover-bench -- --failovers N`).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

mod common;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csnap_io::client::VolumeClient;
use csnap_proto::Volume;
use csnap_sys::monotonic_micros;

const NODES: u32 = 3;
const ORIGIN_BYTES: u64 = 16 << 20;
const CHUNK: u64 = 16 * 1024;
const CHUNK_BYTES: usize = 16 * 1024;
const ORIGIN_LEN: usize = 16 << 20;
const STORE_LEN: usize = 256 << 20;

/// A child killed on drop, with its stderr lines collected.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Result<Proc, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let err = child.stderr.take().ok_or("no stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut g) = l.lock() {
                    g.push(line);
                }
            }
        });
        Ok(Proc { child, lines })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `csnap cluster status`, parsed: (incarnation, node, address, nodes with
/// a standby ready).
fn status(bin: &Path, cdir: &Path) -> Result<(u64, u32, String, u32), String> {
    let o = Command::new(bin)
        .args(["cluster", "status", "--dir"])
        .arg(cdir)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (mut inc, mut node, mut addr, mut ready) = (0, 0, String::new(), 0);
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("server: incarnation ") {
            let (i, rest) = rest.split_once(" on node ").ok_or("status")?;
            let (n, a) = rest.split_once(" at ").ok_or("status")?;
            inc = i.parse().map_err(|_| "status")?;
            node = n.parse().map_err(|_| "status")?;
            addr = a.to_string();
        } else if l.starts_with("node ") && l.contains(" member connected standby-ready") {
            ready += 1;
        }
    }
    Ok((inc, node, addr, ready))
}

/// Polls the status until `f` holds.
fn wait_status(
    bin: &Path,
    cdir: &Path,
    what: &str,
    f: impl Fn(&(u64, u32, String, u32)) -> bool,
) -> Result<(u64, u32, String, u32), String> {
    let start = Instant::now();
    loop {
        let st = status(bin, cdir)?;
        if f(&st) {
            return Ok(st);
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("timed out waiting until {what}: {st:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pid of the process listening on `addr` (`--listen ADDR`).
fn server_pid(addr: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(b) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = b.split(|&c| c == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--listen" && w[1] == addr.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// The `[t=MICROS]` of an event line.
fn stamp(line: &str) -> Option<u64> {
    line.strip_prefix("[t=")?.split(']').next()?.parse().ok()
}

/// The first line (stamped at or after `since`) containing `needle`.
fn find(lines: &[String], since: u64, needle: &str) -> Option<(u64, String)> {
    lines.iter().find_map(|l| {
        let t = stamp(l)?;
        (t >= since && l.contains(needle)).then(|| (t, l.clone()))
    })
}

/// A client thread's figures.
#[derive(Default)]
struct ClientState {
    /// When its first I/O answered by an incarnation above `killed` (the
    /// shared one) completed; 0 until then.
    served_at: AtomicU64,
    ios: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    killed: AtomicU64,
    stop: AtomicBool,
    clients: Vec<ClientState>,
    last_error: Mutex<String>,
}

/// What one client thread attaches to.
impl Shared {
    /// A counter of every client, summed.
    fn total(&self, counter: impl Fn(&ClientState) -> &AtomicU64) -> u64 {
        self.clients
            .iter()
            .map(|c| counter(c).load(Ordering::Relaxed))
            .sum()
    }
}

struct ClientPlan {
    agent: PathBuf,
    origin: PathBuf,
    store: PathBuf,
    volume: Volume,
    id: u64,
    node: u32,
    /// Its index in `Shared::clients`.
    k: usize,
}

fn run_client(p: &ClientPlan, shared: &Shared) -> Result<(), String> {
    let (volume, id, k) = (p.volume, p.id, p.k);
    let mut v = VolumeClient::open_via_agent(
        &p.agent,
        &p.origin,
        &p.store,
        volume,
        id,
        p.node,
        Duration::from_secs(5),
    )
    .map_err(|e| format!("client {id}: {e}"))?;
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let chunks = ORIGIN_BYTES / CHUNK;
    while !shared.stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % chunks) * CHUNK + (x >> 40) % 512;
        let r = match volume {
            Volume::Origin => {
                buf[..4096].fill(x.to_le_bytes()[0]);
                v.write_at(&buf[..4096], off)
            }
            Volume::Snapshot(_) => v.read_at(&mut buf, off.min(ORIGIN_BYTES - CHUNK)),
        };
        let t = monotonic_micros();
        let c = &shared.clients[k];
        match r {
            Ok(()) => {
                c.ios.fetch_add(1, Ordering::Relaxed);
                let inc = v.connection().incarnation();
                if inc > shared.killed.load(Ordering::SeqCst)
                    && c.served_at.load(Ordering::SeqCst) == 0
                {
                    c.served_at.store(t, Ordering::SeqCst);
                }
            }
            Err(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut g) = shared.last_error.lock() {
                    *g = format!("client {id}: {e}");
                }
            }
        }
    }
    Ok(())
}

/// p50, p99 and max of `v` (sorted here), in the unit given.
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    // Nearest rank: an index below the length (q in 0..=1), so the cast
    // is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let at = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i.min(v.len() - 1)]
    };
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// One failover's time line, milliseconds after the kill (NaN: no line).
#[derive(Clone, Copy)]
struct Timeline {
    detect: f64,
    placing: f64,
    starting: f64,
    serving: f64,
    server_up: f64,
    first_client: f64,
    all_clients: f64,
    start: f64,
    lock_wait: f64,
}

#[derive(Default)]
struct Row {
    timelines: Vec<Timeline>,
    lock_waits: Vec<f64>,
    detect: Vec<f64>,
    placing: Vec<f64>,
    gathering: Vec<f64>,
    starting: Vec<f64>,
    serving: Vec<f64>,
    server_up: Vec<f64>,
    first_client: Vec<f64>,
    all_clients: Vec<f64>,
    start_us: Vec<f64>,
    /// One O_DSYNC 8 KiB write just before each kill.
    floor: Vec<f64>,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("failover-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if !common::check_args(
        &args,
        &["--failovers"],
        "usage: failover-bench [--failovers N]   (default 120; 3 nodes, 4 clients doing I/O, \
         the serving server SIGKILLed N times; exits non-zero on any I/O error)",
    )? {
        return Ok(());
    }
    let failovers: u32 = common::flag(&args, "--failovers", 120)?;
    let bin = common::csnap_bin()?;
    common::in_scratch_dir("failover-bench", |d| bench(&bin, d, failovers, &args))
}

/// The controller (crash-loop breaker off) and one agent per node, each
/// with a standby ready.
fn start_cluster(
    bin: &Path,
    cdir: &Path,
    origin: &Path,
    store: &Path,
) -> Result<(Proc, Vec<Proc>), String> {
    let controller = Proc::spawn(
        Command::new(bin)
            // It kills the serving server on purpose, once every few
            // milliseconds: the crash-loop breaker is off.
            .args(["cluster", "run", "--max-server-deaths", "0", "--dir"])
            .arg(cdir),
    )?;
    let sock = cdir.join("controller.sock");
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the controller did not start".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut agents = Vec::new();
    for n in 1..=NODES {
        agents.push(Proc::spawn(
            Command::new(bin)
                .args(["agent", "--dir"])
                .arg(cdir)
                .args(["--node", &n.to_string(), "--origin"])
                .arg(origin)
                .arg("--store")
                .arg(store),
        )?);
    }
    wait_status(bin, cdir, "every node has a standby", |s| s.3 == NODES)?;
    Ok((controller, agents))
}

/// 50 durable writes of `buf` to `probe`, 10 ms apart: milliseconds each.
fn quiet_floor(probe: &std::fs::File, buf: &[u8]) -> Result<Vec<f64>, String> {
    let mut idle_floor = Vec::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(10));
        let t = Instant::now();
        probe
            .write_all_at(buf, 0)
            .map_err(|e| format!("durable probe write: {e}"))?;
        idle_floor.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(idle_floor)
}

/// The four clients, started one after the other (each attached before the
/// next: the placement is deterministic); snapshot 1 is created once the
/// first has placed the server.
fn start_clients(
    bin: &Path,
    cdir: &Path,
    (origin, store): (&Path, &Path),
    shared: &Arc<Shared>,
) -> Result<Vec<std::thread::JoinHandle<()>>, String> {
    let agent_sock = |n: u32| cdir.join(format!("node-{n}")).join("agent.sock");
    let plan = [
        (Volume::Origin, 101u64, 1u32),
        (Volume::Origin, 102, 2),
        (Volume::Snapshot(1), 201, 2),
        (Volume::Snapshot(1), 202, 3),
    ];
    let mut threads = Vec::new();
    for (k, &(volume, id, node)) in plan.iter().enumerate() {
        if k == 2 {
            let (_, _, addr, _) = wait_status(bin, cdir, "a server serves", |s| s.0 > 0)?;
            let o = Command::new(bin)
                .args(["snapshot", "create", "--server", &addr, "1"])
                .output()
                .map_err(|e| e.to_string())?;
            if !o.status.success() {
                return Err(String::from_utf8_lossy(&o.stderr).into_owned());
            }
        }
        let sh = Arc::clone(shared);
        let p = ClientPlan {
            agent: agent_sock(node),
            origin: origin.to_path_buf(),
            store: store.to_path_buf(),
            volume,
            id,
            node,
            k,
        };
        threads.push(std::thread::spawn(move || {
            if let Err(e) = run_client(&p, &sh) {
                if let Ok(mut g) = sh.last_error.lock() {
                    *g = e;
                }
                sh.clients[k].errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
        // Attached before the next one (the placement is deterministic).
        let t = Instant::now();
        while shared.clients[k].ios.load(Ordering::Relaxed) == 0 {
            if t.elapsed() > Duration::from_secs(30)
                || shared.clients[k].errors.load(Ordering::Relaxed) > 0
            {
                return Err(format!(
                    "client {id} does no I/O: {}",
                    shared
                        .last_error
                        .lock()
                        .map(|g| g.clone())
                        .unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(threads)
}

/// The agents' event lines of the failover of incarnation `inc` killed at
/// `kill_at` (they may trail the I/O a bit; up to 5 s): died, serving
/// (of `inc + 1`), gathering and starting, each with its stamp.
type Event = Option<(u64, String)>;
fn agent_events(agents: &[Proc], kill_at: u64, inc: u64) -> (Event, Event, Event, Event) {
    let new = inc + 1;
    let (mut died, mut serving) = (None, None);
    let (mut gathering, mut starting) = (None, None);
    let t = Instant::now();
    while (died.is_none() || serving.is_none()) && t.elapsed() < Duration::from_secs(5) {
        for a in agents {
            let lines = a.lines();
            if died.is_none() {
                died = find(&lines, kill_at, &format!("server incarnation {inc} died"));
            }
            if serving.is_none() {
                if let Some(s) = find(
                    &lines,
                    kill_at,
                    &format!("server incarnation {new} serving"),
                ) {
                    gathering = find(&lines, kill_at, "snapshot clients")
                        .filter(|g| g.1.contains("asking"));
                    starting = find(&lines, kill_at, "starting the standby");
                    serving = Some(s);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    (died, serving, gathering, starting)
}

/// The store lock wait (ms) before the start that logged `serving`: a
/// start that waited for the lock of the server it replaces (same host:
/// the dying one still held it); 0 if none.
fn lock_wait_ms(agents: &[Proc], serving: &str) -> f64 {
    let mut lock_wait = 0.0;
    for a in agents {
        let lines = a.lines();
        let Some(at) = lines.iter().position(|l| l.contains(serving)) else {
            continue;
        };
        if let Some(w) = lines[..at].iter().rev().take(4).find_map(|l| {
            l.split("waited ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        }) {
            lock_wait = w / 1000.0;
        }
    }
    lock_wait
}

/// The servers' own breakdown of their starts (their stderr reaches their
/// agent's): "(command A, store lock B, takeover C, recovery and filter
/// D)", in milliseconds.
fn start_parts(agents: &[Proc]) -> [Vec<f64>; 4] {
    let mut parts: [Vec<f64>; 4] = Default::default();
    for a in agents {
        for l in a.lines() {
            if !l.contains("csnap server: started incarnation") {
                continue;
            }
            let Some(tail) = l.split("(command ").nth(1) else {
                continue;
            };
            let nums: Vec<f64> = tail
                .split(|c: char| !c.is_ascii_digit())
                .filter(|t| !t.is_empty())
                .filter_map(|t| t.parse().ok())
                .collect();
            if nums.len() >= 4 {
                for (k, v) in parts.iter_mut().enumerate() {
                    v.push(nums[k] / 1000.0);
                }
            }
        }
    }
    parts
}

/// The figures: one line per step (p50, p99, max), the start's parts, the
/// disk floor, the lock waits, the slowest failovers and the targets.
fn print_figures(
    row: &mut Row,
    parts: &mut [Vec<f64>; 4],
    idle_floor: &mut Vec<f64>,
    failovers: u32,
) {
    println!("  milliseconds (n = failovers)               p50       p99       max");
    let line = |name: &str, v: &mut Vec<f64>| {
        let (a, b, c) = stats(v);
        println!("  {name:<40} {a:>9.3} {b:>9.3} {c:>9.3}   (n={})", v.len());
    };
    line("kill -> detected (agent: died)", &mut row.detect);
    line("kill -> controller places the server", &mut row.placing);
    line("kill -> starting agent gathers", &mut row.gathering);
    line("kill -> StartServer sent", &mut row.starting);
    line("kill -> agent has Serving", &mut row.serving);
    line("kill -> controller has ServerUp", &mut row.server_up);
    line("kill -> first client served", &mut row.first_client);
    line("kill -> every client served", &mut row.all_clients);
    line("start to serving (server's own)", &mut row.start_us);
    let names = [
        "  of it: the start command",
        "  of it: the store lock",
        "  of it: takeover (replay, commit)",
        "  of it: recovery set-up, serving filter",
    ];
    for (name, v) in names.iter().zip(parts.iter_mut()) {
        if !v.is_empty() {
            line(name, v);
        }
    }
    line("disk floor: one durable 8 KiB write", &mut row.floor);
    line("  the same on the quiet disk (no client)", idle_floor);
    let (f50, f99, _) = stats(&mut row.floor);
    let (s50, s99_, _) = stats(&mut row.start_us);
    println!(
        "  start to serving beyond one durable write: p50 {:.3} ms, p99 {:.3} ms (ratio to it: p50 {:.2}, p99 {:.2})",
        s50 - f50,
        s99_ - f99,
        s50 / f50,
        s99_ / f99
    );
    println!(
        "  starts that waited for the dying server's store lock: {} of {failovers}",
        row.lock_waits.len()
    );
    if !row.lock_waits.is_empty() {
        line("  store lock wait in those starts", &mut row.lock_waits);
    }
    let mut worst = row.timelines.clone();
    worst.sort_by(|a, b| b.all_clients.total_cmp(&a.all_clients));
    println!("  slowest failovers, ms after the kill: detected, placed, StartServer, Serving (start, of it lock wait), ServerUp, first client, every client");
    for w in worst.iter().take(5) {
        println!(
            "    {:>7.3} {:>7.3} {:>7.3} {:>7.3} ({:.3}, {:.3}) {:>7.3} {:>7.3} {:>7.3}",
            w.detect,
            w.placing,
            w.starting,
            w.serving,
            w.start,
            w.lock_wait,
            w.server_up,
            w.first_client,
            w.all_clients
        );
    }
    let (_, s99, smax) = stats(&mut row.start_us);
    let (_, a99, amax) = stats(&mut row.all_clients);
    println!(
        "  targets (issue #5): start to serving < 1 ms: p99 {s99:.3} ms, max {smax:.3} ms ({}); kill to every client served < 10 ms: p99 {a99:.3} ms, max {amax:.3} ms ({})",
        if smax < 1.0 { "met" } else if s99 < 1.0 { "met at p99, not at max" } else { "missed" },
        if amax < 10.0 { "met" } else if a99 < 10.0 { "met at p99, not at max" } else { "missed" }
    );
}

/// What one failover needs of the bench: the binary, the cluster, the
/// clients' shared state and the durable-write probe.
struct Bed<'a> {
    bin: &'a Path,
    cdir: &'a Path,
    shared: &'a Shared,
    probe: &'a std::fs::File,
    probe_b: &'a [u8],
    controller: &'a Proc,
    agents: &'a [Proc],
}

/// Failover `i`: in steady state, the disk floor probed, the serving
/// server SIGKILLed; waits until every client is served again, then
/// records the failover's timeline from the event lines in `row` (and the
/// node it went to in `nodes_seen`).
fn one_failover(
    b: &Bed<'_>,
    i: u32,
    row: &mut Row,
    nodes_seen: &mut [u32; NODES as usize + 1],
) -> Result<(), String> {
    let (inc, _, addr, _) = wait_status(b.bin, b.cdir, "every node has a standby", |s| {
        s.3 == NODES && s.0 > 0
    })?;
    // Steady state: every client on this incarnation.
    std::thread::sleep(Duration::from_millis(50));
    let pid = server_pid(&addr).ok_or_else(|| format!("no process listens on {addr}"))?;
    b.shared.killed.store(inc, Ordering::SeqCst);
    for c in &b.shared.clients {
        c.served_at.store(0, Ordering::SeqCst);
    }
    // The disk's floor under this load: one durable 8 KiB write on the
    // same file system, as the incarnation commit is, just before the
    // kill (not during the start, which it would slow).
    let t_probe = Instant::now();
    b.probe
        .write_all_at(b.probe_b, 0)
        .map_err(|e| format!("durable probe write: {e}"))?;
    row.floor.push(t_probe.elapsed().as_secs_f64() * 1000.0);
    let kill_at = monotonic_micros();
    csnap_sys::send_signal(pid, libc::SIGKILL).map_err(|e| format!("kill {pid}: {e}"))?;
    let t = Instant::now();
    while b
        .shared
        .clients
        .iter()
        .any(|c| c.served_at.load(Ordering::SeqCst) == 0)
    {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "failover {i}: not every client was served within 10 s; last error: {}",
                b.shared
                    .last_error
                    .lock()
                    .map(|g| g.clone())
                    .unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let served: Vec<u64> = b
        .shared
        .clients
        .iter()
        .map(|c| c.served_at.load(Ordering::SeqCst))
        .collect();
    // The event lines of this failover (they may trail the I/O a bit).
    let new = inc + 1;
    let (died, serving, gathering, starting) = agent_events(b.agents, kill_at, inc);
    let ctl = b.controller.lines();
    let placing = find(&ctl, kill_at, "placing the server");
    let up = find(
        &ctl,
        kill_at,
        &format!("server incarnation {new} serves on node"),
    );
    let (Some(died), Some(serving)) = (died, serving) else {
        return Err(format!("failover {i}: the agents' event lines are missing"));
    };
    let us = |t: u64| t.saturating_sub(kill_at) as f64;
    let ms = |t: u64| us(t) / 1000.0;
    row.detect.push(ms(died.0));
    if let Some(p) = &placing {
        row.placing.push(ms(p.0));
    }
    if let Some(g) = gathering {
        row.gathering.push(ms(g.0));
    }
    if let Some(s) = &starting {
        row.starting.push(ms(s.0));
    }
    row.serving.push(ms(serving.0));
    if let Some(u) = &up {
        row.server_up.push(ms(u.0));
        if let Some(n) = u.1.rsplit(' ').next().and_then(|n| n.parse::<usize>().ok()) {
            if n <= NODES as usize {
                nodes_seen[n] += 1;
            }
        }
    }
    let start_us = serving
        .1
        .split("started in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    row.start_us.push(start_us / 1000.0);
    row.first_client
        .push(ms(*served.iter().min().unwrap_or(&kill_at)));
    row.all_clients
        .push(ms(*served.iter().max().unwrap_or(&kill_at)));
    // A start that waited for the store lock of the server it replaces
    // (same host: the dying one still held it).
    let lock_wait = lock_wait_ms(b.agents, &serving.1);
    if lock_wait > 0.0 {
        row.lock_waits.push(lock_wait);
    }
    let nan = f64::NAN;
    row.timelines.push(Timeline {
        detect: ms(died.0),
        placing: placing.map_or(nan, |p| ms(p.0)),
        starting: starting.map_or(nan, |s| ms(s.0)),
        serving: ms(serving.0),
        server_up: up.as_ref().map_or(nan, |u| ms(u.0)),
        first_client: ms(*served.iter().min().unwrap_or(&kill_at)),
        all_clients: ms(*served.iter().max().unwrap_or(&kill_at)),
        start: start_us / 1000.0,
        lock_wait,
    });
    Ok(())
}

/// The origin, a thick store (as the block device it stands for: no
/// file-system block allocation, and journal commit, inside the flushes
/// measured) and the durable-write probe file, opened direct and durable
/// as the servers' store writes are.
fn make_files(d: &Path, origin: &Path, store: &Path) -> Result<std::fs::File, String> {
    std::fs::write(origin, vec![7u8; ORIGIN_LEN]).map_err(|e| e.to_string())?;
    std::fs::write(store, vec![0u8; STORE_LEN]).map_err(|e| e.to_string())?;
    let probe_path = d.join("durable-probe");
    std::fs::write(&probe_path, vec![0u8; 8192]).map_err(|e| e.to_string())?;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC | libc::O_DIRECT)
        .open(&probe_path)
        .map_err(|e| e.to_string())
}

/// `csnap format` of the store for the origin.
fn format_store(bin: &Path, origin: &Path, store: &Path) -> Result<(), String> {
    let o = Command::new(bin)
        .args(["format", "--origin"])
        .arg(origin)
        .arg("--store")
        .arg(store)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(())
}

/// The run's I/O count and rate, errors (and the last one), and where the
/// servers were placed.
fn print_totals(shared: &Shared, (ios, secs): (u64, f64), errors: u64, nodes_seen: &[u32]) {
    println!(
        "  {} I/Os during the run ({:.0}/s), {errors} I/O errors; servers placed on node 1: {}, node 2: {}, node 3: {}",
        ios,
        ios as f64 / secs,
        nodes_seen[1],
        nodes_seen[2],
        nodes_seen[3]
    );
    if errors > 0 {
        println!(
            "  last error: {}",
            shared
                .last_error
                .lock()
                .map(|g| g.clone())
                .unwrap_or_default()
        );
    }
}

fn bench(bin: &Path, d: &Path, failovers: u32, args: &[String]) -> Result<(), String> {
    let (origin, store, cdir) = (d.join("origin"), d.join("store"), d.join("cluster"));
    let probe = make_files(d, &origin, &store)?;
    // Direct and durable, as the servers' store writes are.
    let mut probe_a = csnap_sys::dio::AlignedBuf::zeroed(8192, 4096);
    probe_a.fill(0xa5);
    let mut probe_b = csnap_sys::dio::AlignedBuf::zeroed(8192, 4096);
    probe_b.fill(0x5a);
    format_store(bin, &origin, &store)?;
    println!("failover-bench: {}", args.join(" "));
    println!(
        "  {failovers} failovers; {NODES}-node local cluster (controller, agents, standbys; mlock, sealed heap, seccomp on); 4 client threads (VolumeClient::open_via_agent): origin writers on nodes 1 and 2 (4 KiB), snapshot readers on nodes 2 and 3 (16 KiB), I/O back to back; nproc {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (controller, agents) = start_cluster(bin, &cdir, &origin, &store)?;
    // The floor on a quiet disk, for comparison: the same durable write,
    // 50 times 10 ms apart, before any client does I/O.
    let mut idle_floor = quiet_floor(&probe, &probe_a)?;
    // The first client places the server; then the snapshot the readers use.
    let shared = Arc::new(Shared {
        killed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        clients: (0..4).map(|_| ClientState::default()).collect(),
        last_error: Mutex::new(String::new()),
    });
    let threads = start_clients(bin, &cdir, (&origin, &store), &shared)?;

    let mut row = Row::default();
    let mut nodes_seen = [0u32; NODES as usize + 1];
    let ios_before = shared.total(|c| &c.ios);
    let bench_start = Instant::now();
    let bed = Bed {
        bin,
        cdir: &cdir,
        shared: &shared,
        probe: &probe,
        probe_b: &probe_b,
        controller: &controller,
        agents: &agents,
    };
    for i in 0..failovers {
        one_failover(&bed, i, &mut row, &mut nodes_seen)?;
    }
    let secs = bench_start.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::SeqCst);
    let ios = shared.total(|c| &c.ios);
    let errors = shared.total(|c| &c.errors);
    // The servers' own breakdown of their starts (their stderr reaches
    // their agent's): "(command A, store lock B, takeover C, recovery and
    // filter D)", microseconds.
    let mut parts = start_parts(&agents);
    drop(agents);
    drop(controller);
    for t in threads {
        let _ = t.join();
    }
    print_totals(&shared, (ios - ios_before, secs), errors, &nodes_seen);
    print_figures(&mut row, &mut parts, &mut idle_floor, failovers);
    if errors > 0 {
        // A benchmark that saw an I/O error failed, whatever its figures.
        return Err(format!("{errors} I/O errors during the run (see above)"));
    }
    Ok(())
}
