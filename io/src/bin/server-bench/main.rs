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

mod client;
mod cpu;
mod echo;
mod report;
mod server;

use client::*;
use cpu::*;
use echo::*;
use report::*;
use server::*;

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

    /// Whether any run over transport `t` passes the filter.
    fn transport_selected(&self, t: Transport) -> bool {
        CLIENT_COUNTS.iter().any(|&n| {
            [
                Workload::Echo,
                Workload::OriginUnique,
                Workload::SnapRead,
                Workload::CopyOut,
            ]
            .iter()
            .any(|&w| self.selected(t, n, w))
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
            "--echo" => p.echo = parse_echo(&value("--echo")?)?,
            "--only" => p.only.extend(parse_only(&value("--only")?)?),
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

fn parse_echo(v: &str) -> Result<EchoMode, String> {
    match v {
        "mio" => Ok(EchoMode::Mio),
        "threads" => Ok(EchoMode::Threads),
        other => Err(format!(
            "--echo takes mio or threads, not {other:?}\n{USAGE}"
        )),
    }
}

/// The items of `--only`, each checked.
fn parse_only(v: &str) -> Result<Vec<String>, String> {
    let mut only = Vec::new();
    for o in v.split(',') {
        if !["unix", "tcp", "1", "4", "16", "echo", "a", "b", "c"].contains(&o) {
            return Err(format!("--only: unknown item {o:?}\n{USAGE}"));
        }
        only.push(o.to_string());
    }
    Ok(only)
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

/// One connection per client of `run`, identified (but for the echo
/// server) with the next client ids.
fn connect_clients(run: &Run<'_>, next_client_id: &mut u64) -> Result<Vec<Wire>, String> {
    let mut wires = Vec::with_capacity(run.clients);
    for _ in 0..run.clients {
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
    Ok(wires)
}

/// One thread per client, each with its `slice` of the region and
/// `per_client` requests, all waiting at `barrier`.
fn spawn_clients(
    run: &Run<'_>,
    wires: Vec<Wire>,
    (slice, per_client): (u64, usize),
    barrier: &Arc<Barrier>,
) -> Result<Vec<JoinHandle<Result<ThreadOut, String>>>, String> {
    let mut handles = Vec::with_capacity(wires.len());
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
    Ok(handles)
}

/// What the client threads of one run measured, joined.
struct Joined {
    /// Every timed latency, in nanoseconds.
    lat: Vec<u64>,
    /// When the last client finished (`start` if none did).
    end: Instant,
    /// Whether a client stopped at its deadline.
    capped: bool,
    /// The clients' connections, still open.
    open: Vec<Wire>,
    /// The first client's failure.
    first_err: Option<String>,
}

/// Joins the client threads of a run started at `start`.
fn join_clients(
    handles: Vec<JoinHandle<Result<ThreadOut, String>>>,
    start: Instant,
    requests: usize,
) -> Joined {
    let mut j = Joined {
        lat: Vec::with_capacity(requests),
        end: start,
        capped: false,
        open: Vec::with_capacity(handles.len()),
        first_err: None,
    };
    for h in handles {
        match h.join() {
            Ok(Ok(out)) => {
                j.lat.extend_from_slice(&out.lat);
                j.end = j.end.max(out.end);
                j.capped |= out.capped;
                j.open.push(out.wire);
            }
            Ok(Err(e)) => {
                j.first_err.get_or_insert(e);
            }
            Err(_) => {
                j.first_err
                    .get_or_insert_with(|| "a client thread panicked".to_string());
            }
        }
    }
    j
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
    let wires = connect_clients(run, next_client_id)?;
    let commits_before = if run.workload == Workload::Echo {
        None
    } else {
        Some(commits(ctl)?)
    };
    let barrier = Arc::new(Barrier::new(n + 1));
    let handles = spawn_clients(run, wires, (slice, per_client), &barrier)?;
    barrier.wait();
    let cpu0 = cpu_snap();
    let start = Instant::now();
    let j = join_clients(handles, start, per_client * n);
    let cpu1 = cpu_snap();
    drop(j.open);
    if let Some(e) = j.first_err {
        return Err(e);
    }
    let (mut lat, end, capped) = (j.lat, j.end, j.capped);
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

/// The control connection, with snapshot `SNAP_TAG` created and region A
/// pre-written; returns it and the next free client id.
fn set_up(csnap: &Csnap) -> Result<(Connection, u64), String> {
    let mut ctl = control(&csnap.unix).map_err(|e| format!("control connection: {e}"))?;
    match ctl.call(Request::Create(SNAP_TAG)) {
        Ok(Msg::Ok) => {}
        Ok(m) => return Err(format!("create snapshot: unexpected {}", m.kind().name())),
        Err(e) => return Err(format!("create snapshot: {e}")),
    }
    let next_client_id = 100u64;
    let t0 = Instant::now();
    prewrite(&csnap.unix, next_client_id)?;
    println!(
        "setup:   snapshot {SNAP_TAG} created; region A pre-written ({} chunks copied out) in \
         {:.2} s",
        REGION_A.1,
        t0.elapsed().as_secs_f64()
    );
    println!();
    Ok((ctl, next_client_id + 1))
}

/// The echo, origin-write and snapshot-read runs of `n` clients over
/// transport `t` (those selected), each printed beside the echo run.
fn metadata_runs(
    p: &Params,
    (t, n): (Transport, usize),
    (echo_addr, csnap_addr): (&Addr, &Addr),
    (next_client_id, ctl): (&mut u64, &mut Connection),
    results: &mut Vec<RunResult>,
) -> Result<(), String> {
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
                csnap_addr
            },
            region: match w {
                Workload::SnapRead => REGION_B,
                _ => REGION_A,
            },
            count: p.requests,
            warmup: p.warmup,
            deadline: None,
        };
        let r = run_config(&run, next_client_id, ctl)
            .map_err(|e| format!("{} {n} clients {}: {e}", t.name(), w.label()))?;
        print_run(&r, echo_idx.map(|i: usize| &results[i]));
        if w == Workload::Echo {
            echo_idx = Some(results.len());
        }
        results.push(r);
    }
    Ok(())
}

fn bench_with(p: &Params, csnap: &Csnap, echo: &EchoServer) -> Result<Vec<RunResult>, String> {
    let (mut ctl, mut next_client_id) = set_up(csnap)?;
    let mut results: Vec<RunResult> = Vec::new();
    let mut c_slice = 0u64;
    let c_len = u64::try_from(p.copyout).map_err(|_| "copy-out count".to_string())?;
    for t in [Transport::Unix, Transport::Tcp] {
        if !p.transport_selected(t) {
            continue;
        }
        println!("{}:", t.name());
        let echo_addr = match t {
            Transport::Unix => &echo.unix,
            Transport::Tcp => &echo.tcp,
        };
        let addrs = (echo_addr, csnap.addr(t));
        for &n in &CLIENT_COUNTS {
            metadata_runs(
                p,
                (t, n),
                addrs,
                (&mut next_client_id, &mut ctl),
                &mut results,
            )?;
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
