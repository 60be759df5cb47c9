//! `csnap server`: opens the store (replaying its journal), takes the next
//! incarnation durably, and serves on every `--listen` address until the
//! store fails.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use csnap_fsm::server::{Server, ServerConfig};
use csnap_io::net::Addr;
use csnap_io::server::{ServerLoop, Stop, BATCH_MAX};
use csnap_io::store_worker::StoreWorker;
use csnap_store::disk::FileDisk;
use csnap_store::OpenOptions;

use crate::device::require_device;
use crate::{error, EXIT_FAILED, EXIT_USAGE};

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Origin volume (regular file or block device).
    #[arg(long, value_name = "PATH")]
    pub origin: PathBuf,
    /// Snapshot store formatted for that origin.
    #[arg(long, value_name = "PATH")]
    pub store: PathBuf,
    /// Address to listen on: a unix socket path, or host:port. Repeatable.
    #[arg(long, value_name = "ADDR", required = true)]
    pub listen: Vec<String>,
    /// Client connections served at once.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::CLIENTS_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=csnap_pools::CLIENTS_MAX as u64))]
    pub clients: u64,
    /// Requests one client may have in flight.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::REQUESTS_PER_CLIENT_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=csnap_pools::REQUESTS_PER_CLIENT_MAX as u64))]
    pub requests_per_client: u64,
    /// Read locks held at once.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::READ_LOCKS_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=csnap_pools::READ_LOCKS_MAX as u64))]
    pub read_locks: u64,
    /// Do not lock memory (development only: page faults, and so memory
    /// inversion, become possible).
    #[arg(long)]
    pub no_mlock: bool,
    /// What an allocation in the serving phase does: abort (production),
    /// count, report (print its backtrace), or off.
    #[arg(long, value_enum, default_value_t = SealMode::Abort)]
    pub seal: SealMode,
    /// Do not install the seccomp whitelist (for tools such as valgrind that
    /// cannot run under a filter).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Start as a standby: reserve everything, lock memory, seal the heap,
    /// install the standby filter, read nothing from the store, and wait for
    /// `start [member=NODE ...] [expect=CLIENT:NODE ...]` on standard input.
    /// Start then takes the store lock, replays the journal, commits the
    /// next incarnation, enters recovery (waiting for the expected clients)
    /// and serves.
    #[arg(long)]
    pub standby: bool,
    /// With --standby: the node's agent socket. The standby connects to it,
    /// announces itself (`ServerReady`), takes its start command from it
    /// instead of standard input, reports `Serving`, then takes membership
    /// from it; it exits when the link closes.
    #[arg(long, value_name = "PATH", requires = "standby")]
    pub agent: Option<PathBuf>,
    /// This server's cluster node (with --agent).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub node: u32,
    /// Test hook: skip the host-local store lock, as a server on another
    /// host would (for split-brain tests of the incarnation fencing).
    #[arg(long, hide = true)]
    pub no_host_lock: bool,
    /// Test hook: make a forbidden syscall (open) once serving.
    #[arg(long, hide = true)]
    pub test_forbidden_syscall: bool,
    /// Metadata cache, in 4 KiB blocks.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::CACHE_DEFAULT_BLOCKS as u64,
          value_parser = clap::value_parser!(u64).range(csnap_pools::CACHE_MIN_BLOCKS as u64..=(1 << 24)))]
    pub cache_blocks: u64,
    /// Serve Prometheus metrics (text format 0.0.4) at `GET /metrics` on
    /// ADDR (host:port, or a unix socket path), from the network thread.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// `--seal` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SealMode {
    /// Abort the server with a message naming the phase.
    Abort,
    /// Count (reported at exit and by tests).
    Count,
    /// Print a backtrace of every offending call site and go on.
    Report,
    /// Do not seal the heap.
    Off,
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

pub fn run(args: &ServerArgs) -> ExitCode {
    let r = if args.standby {
        serve_standby(args)
    } else {
        serve(args)
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            error(&e);
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn serve(args: &ServerArgs) -> Result<ExitCode, String> {
    require_device(&args.origin, "origin")?;
    require_device(&args.store, "store")?;
    // Listen first: a server that cannot listen writes nothing to the store.
    let listeners = bind_listeners(args)?;
    let (mut store, od) = take_store(args)?;
    let label = *store.label();
    let incarnation = store
        .bump_incarnation()
        .and_then(|i| store.commit().map(|_| i))
        .map_err(|e| format!("cannot take the next incarnation: {e}"))?;
    let cfg = ServerConfig {
        clients: usize_of(args.clients),
        requests_per_client: usize_of(args.requests_per_client),
        read_locks: usize_of(args.read_locks),
        incarnation,
        server_id: u64::from_le_bytes(label.store_uuid[..8].try_into().unwrap_or([0; 8])),
        chunk_size_bytes: label.chunk_size_bytes,
        origin_size_bytes: label.origin_size_bytes,
        origin_uuid: label.origin_uuid,
    };
    let reserved = print_budget(args, &cfg, label.chunk_size_bytes as usize);
    let filters = compile_filters(args, false)?;
    let worker = StoreWorker::new(store, od, BATCH_MAX).with_lease(
        std::time::Duration::from_millis(csnap_pools::SERVER_LEASE_MS),
    );
    let mut lp = start_loop(args, cfg, listeners, worker, filters.as_ref(), "listening")?;
    eprintln!(
        "csnap server: incarnation {incarnation}, chunk {} bytes, origin {} bytes, {} clients x {} requests, {} read locks, {} bytes reserved",
        label.chunk_size_bytes,
        label.origin_size_bytes,
        cfg.clients,
        cfg.requests_per_client,
        cfg.read_locks,
        reserved
    );
    confine_memory(args)?;
    seal_heap(args);
    if let Some(f) = &filters {
        if let Err(e) = f.net.install() {
            // After the seal: a heap-free line and `_exit`, nothing freed.
            csnap_sys::fail_stop(
                "csnap server",
                "cannot install the seccomp filter",
                &e,
                csnap_sys::confine::CONFINE_FAILED_EXIT,
            );
        }
    }
    eprintln!("csnap server: serving");
    let mut forbidden = args.test_forbidden_syscall;
    let mut hook = move || {
        if forbidden {
            forbidden = false;
            csnap_sys::seccomp::forbidden_open_for_tests();
        }
    };
    stopped(lp.run_with(&mut hook))
}

/// The store of a server started by hand: the label checked against the
/// origin, the host lock taken, the store claimed (its lease waited out)
/// and its journal replayed. Returns it and the origin.
fn take_store(args: &ServerArgs) -> Result<(csnap_store::Store<FileDisk>, FileDisk), String> {
    let mut sd = FileDisk::open(&args.store)
        .map_err(|e| format!("cannot open store {}: {e}", args.store.display()))?;
    // Configuration errors first: the label (read only) against the origin.
    let label = csnap_store::read_label(&mut sd)
        .map_err(|e| format!("store {}: {e}", args.store.display()))?;
    let origin_size = csnap_store::disk::device_size_bytes(
        &std::fs::File::open(&args.origin)
            .map_err(|e| format!("cannot open origin {}: {e}", args.origin.display()))?,
    )
    .map_err(|e| format!("origin {}: {e}", args.origin.display()))?;
    if origin_size < label.origin_size_bytes {
        return Err(format!(
            "origin {} is {origin_size} bytes; the store was formatted for an origin of {} bytes",
            args.origin.display(),
            label.origin_size_bytes
        ));
    }
    // One server per store on this host: an exclusive lock before the
    // journal replay touches anything. (Cluster-wide fencing is the
    // incarnation, see the failover issue.)
    match lock_store(args, sd.file()) {
        Ok(true) => {}
        Ok(false) => {
            return Err(format!(
                "store {} is in use by another server on this host (locked)",
                args.store.display()
            ))
        }
        Err(e) => return Err(format!("cannot lock store {}: {e}", args.store.display())),
    }
    let od = FileDisk::open(&args.origin)
        .map_err(|e| format!("cannot open origin {}: {e}", args.origin.display()))?;
    no_readahead(&sd, &od);
    let mut standby = csnap_store::Standby::reserve(
        sd,
        &OpenOptions {
            cache_blocks: usize_of(args.cache_blocks),
        },
    )
    .map_err(|e| format!("store {}: {e}", args.store.display()))?;
    // Started by hand: nobody saw the former server die, so the store is
    // claimed and its lease waited out before anything is read
    // (ARCHITECTURE 5.5).
    csnap_io::store_worker::claim_logged(
        &mut standby,
        std::time::Duration::from_millis(csnap_pools::SERVER_TAKEOVER_WAIT_MS),
    )
    .map_err(|e| format!("store {}: {e}", args.store.display()))?;
    let store = standby
        .start()
        .map_err(|e| format!("store {}: {e}", args.store.display()))?;
    let r = store.replay_report();
    if r.commits > 0 {
        eprintln!(
            "csnap server: replayed {} journal commit(s), {} block(s)",
            r.commits, r.blocks
        );
    }
    Ok((store, od))
}

/// Prints the memory budget, one line per pool; returns the total.
fn print_budget(args: &ServerArgs, cfg: &ServerConfig, chunk_buf: usize) -> usize {
    let net_items = csnap_io::server::ServerLoop::reserved_items(cfg);
    let mut reserved = 0usize;
    for (what, bytes) in Server::reserved_items(cfg)
        .iter()
        .chain(csnap_pools::store_reserved_items(usize_of(args.cache_blocks)).iter())
        .chain(net_items.iter())
        .chain([("store worker chunk buffer", chunk_buf)].iter())
    {
        eprintln!("csnap server: pool {what}: {bytes} bytes");
        reserved += bytes;
    }
    reserved
}

/// The server loop on `listeners` with `worker` (its thread confined by
/// the store filter), and its metrics endpoint when `--metrics` asks;
/// prints where it listens (`what`: "listening", "standby listening").
fn start_loop(
    args: &ServerArgs,
    cfg: ServerConfig,
    listeners: Vec<csnap_io::net::MioListener>,
    worker: StoreWorker<FileDisk, FileDisk>,
    filters: Option<&Filters>,
    what: &str,
) -> Result<ServerLoop, String> {
    let worker_filter = filters.map(|f| f.store.clone());
    let mut lp = ServerLoop::with_listeners(cfg, listeners, worker, worker_filter)
        .map_err(|e| format!("cannot start the server loop: {e}"))?;
    if let Some(m) = &args.metrics {
        let a = Addr::parse(m).map_err(|e| format!("--metrics {m}: {e}"))?;
        let a = lp.serve_metrics(&a)?;
        eprintln!(
            "csnap server: pool metrics endpoint: {} bytes",
            csnap_io::metrics::MetricsEndpoint::reserved_bytes()
        );
        eprintln!("csnap server: metrics at http://{a}/metrics");
    }
    for a in lp.local_addrs() {
        eprintln!("csnap server: {what} on {a}");
    }
    Ok(lp)
}

/// The host-local store lock (skipped with the `--no-host-lock` test hook).
fn lock_store(args: &ServerArgs, f: &std::fs::File) -> std::io::Result<bool> {
    if args.no_host_lock {
        return Ok(true);
    }
    csnap_sys::lock_exclusive(f)
}

/// The store worker reads chunks and blocks at random: no readahead (it
/// would only fill the page cache, and zero pages of a sparse file, for
/// nothing). Advice only: a failure is not an error.
fn no_readahead(sd: &FileDisk, od: &FileDisk) {
    let _ = csnap_sys::fadvise_random(sd.file());
    let _ = csnap_sys::fadvise_random(od.file());
}

/// The store lock at a standby's start: a server killed on this host may
/// still hold it for a moment after its sockets closed (the kernel releases
/// a dying process's files one by one), so a held lock is retried for up to
/// `STANDBY_LOCK_WAIT_MS`. Returns the microseconds waited; `Err(Some(()))`
/// if it is still held then, `Err(None)` on an error. Allocation-free.
fn lock_store_at_start(args: &ServerArgs, f: &std::fs::File) -> Result<u64, Option<()>> {
    let t0 = std::time::Instant::now();
    let limit = std::time::Duration::from_millis(csnap_pools::STANDBY_LOCK_WAIT_MS);
    let mut first = true;
    loop {
        match lock_store(args, f) {
            Ok(true) if first => return Ok(0),
            Ok(true) => {
                return Ok(u64::try_from(t0.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1))
            }
            Ok(false) if t0.elapsed() < limit => std::thread::sleep(
                std::time::Duration::from_micros(csnap_pools::STANDBY_LOCK_RETRY_US),
            ),
            Ok(false) => return Err(Some(())),
            Err(_) => return Err(None),
        }
        first = false;
    }
}

/// Binds every `--listen` address.
fn bind_listeners(args: &ServerArgs) -> Result<Vec<csnap_io::net::MioListener>, String> {
    let mut listeners = Vec::new();
    for a in &args.listen {
        let addr = Addr::parse(a).map_err(|e| format!("--listen {a}: {e}"))?;
        listeners.push(
            csnap_io::net::MioListener::bind(&addr)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        );
    }
    Ok(listeners)
}

/// The seccomp filters of a server, compiled at init (it allocates) and
/// installed per thread as each enters its confined phase.
struct Filters {
    /// The main thread's standby and failover-start filter (standby only).
    standby: Option<csnap_sys::seccomp::Filter>,
    /// The network thread's serving filter.
    net: csnap_sys::seccomp::Filter,
    /// The store worker's filter.
    store: csnap_sys::seccomp::Filter,
}

fn compile_filters(args: &ServerArgs, standby: bool) -> Result<Option<Filters>, String> {
    if args.seal == SealMode::Report && !args.no_seccomp {
        eprintln!("csnap server: --seal report symbolises backtraces (it opens files): seccomp is off in this mode");
    }
    if args.no_seccomp || args.seal == SealMode::Report {
        eprintln!(
            "csnap server: WARNING: the syscall whitelist is not enforced. Development use only."
        );
        return Ok(None);
    }
    csnap_sys::seccomp::install_sigsys_reporter()
        .map_err(|e| format!("cannot install the SIGSYS reporter: {e}"))?;
    let compile =
        |rules: &[csnap_audit::Rule]| csnap_sys::seccomp::compile(&csnap_audit::numbers(rules));
    Ok(Some(Filters {
        standby: if standby {
            Some(compile(&csnap_audit::standby_network())?)
        } else {
            None
        },
        net: compile(csnap_audit::SERVING_NETWORK)?,
        store: compile(csnap_audit::SERVING_STORE)?,
    }))
}

/// Locks memory (unless `--no-mlock`), touches the main thread's stack
/// budget, and asks to be an I/O flusher out of the OOM killer's reach
/// (the shared sequence's memory steps).
fn confine_memory(args: &ServerArgs) -> Result<(), String> {
    csnap_sys::confine::confine_memory("csnap server", !args.no_mlock)
}

/// Seals the heap as `--seal` says.
fn seal_heap(args: &ServerArgs) {
    let mode = match args.seal {
        SealMode::Abort => csnap_sys::alloc::Mode::Abort,
        SealMode::Count => csnap_sys::alloc::Mode::Count,
        SealMode::Report => csnap_sys::alloc::Mode::Report,
        SealMode::Off => return,
    };
    csnap_sys::confine::seal_heap("csnap server", Some(mode));
}

/// Says why the loop stopped and ends the process (`exit_now`: a confined
/// server frees nothing and makes no syscall outside its whitelist on the
/// way out).
fn stopped(stop: Stop) -> ! {
    match stop {
        Stop::StoreFailed => {
            error("the snapshot store failed; restart the server to replay the journal")
        }
        Stop::Fenced => {
            error("fenced: a newer server incarnation took this store over; this server stops")
        }
        // Heap-free: the loop failed after the seal.
        Stop::Io(e) => csnap_sys::fail_stop("csnap: server", "event loop failed", &e, EXIT_FAILED),
        Stop::AgentGone => error(
            "the agent link closed (the agent is gone, or it stopped this server); this server stops",
        ),
    }
    csnap_sys::exit_now(EXIT_FAILED)
}

fn serve_standby(args: &ServerArgs) -> Result<ExitCode, String> {
    require_device(&args.origin, "origin")?;
    require_device(&args.store, "store")?;
    let listeners = bind_listeners(args)?;
    // Devices open, nothing read.
    let sd = FileDisk::open(&args.store)
        .map_err(|e| format!("cannot open store {}: {e}", args.store.display()))?;
    let od = FileDisk::open(&args.origin)
        .map_err(|e| format!("cannot open origin {}: {e}", args.origin.display()))?;
    no_readahead(&sd, &od);
    let lock_file = sd
        .file()
        .try_clone()
        .map_err(|e| format!("store {}: {e}", args.store.display()))?;
    let standby = csnap_store::Standby::reserve(
        sd,
        &OpenOptions {
            cache_blocks: usize_of(args.cache_blocks),
        },
    )
    .map_err(|e| format!("store {}: {e}", args.store.display()))?;
    let cfg = standby_config(args);
    let filters = compile_filters(args, true)?;
    let worker = StoreWorker::standby(standby, od, BATCH_MAX).with_lease(
        std::time::Duration::from_millis(csnap_pools::SERVER_LEASE_MS),
    );
    let mut lp = start_loop(
        args,
        cfg,
        listeners,
        worker,
        filters.as_ref(),
        "standby listening",
    )?;
    let (mut link, ready_addr) = match &args.agent {
        Some(path) => {
            let (l, a) = connect_agent(path, &lp)?;
            (Some(l), a)
        }
        None => (None, String::new()),
    };
    // getpid is a syscall the standby table does not allow: asked now.
    let pid = std::process::id();
    confine_memory(args)?;
    let mut cmd = [0u8; csnap_pools::STANDBY_START_LINE_MAX_BYTES];
    seal_heap(args);
    // From here on nothing allocates: errors are static strings, printed by
    // `error` (it formats straight into stderr), and the process ends with
    // `exit_now` (nothing freed, no syscall outside the whitelist).
    match standby_confined(
        args,
        &mut lp,
        &mut link,
        (pid, &ready_addr),
        filters.as_ref(),
        &lock_file,
        &mut cmd,
    ) {
        Ok(code) => csnap_sys::exit_now(code),
        Err(e) => {
            error(e);
            csnap_sys::exit_now(EXIT_USAGE)
        }
    }
}

/// A standby's server configuration: its pools as the flags say; the
/// geometry is learnt at start (the pools do not depend on it).
fn standby_config(args: &ServerArgs) -> ServerConfig {
    ServerConfig {
        clients: usize_of(args.clients),
        requests_per_client: usize_of(args.requests_per_client),
        read_locks: usize_of(args.read_locks),
        incarnation: 0,
        server_id: 0,
        chunk_size_bytes: csnap_pools::CHUNK_SIZE_MIN_BYTES,
        origin_size_bytes: 0,
        origin_uuid: [0; 16],
    }
}

/// The sealed part of a standby: waits for its start, starts, serves.
/// Allocation-free, so its errors are `&'static str`; the caller owns
/// everything that must not be dropped (freed) before the process ends.
fn standby_confined(
    args: &ServerArgs,
    lp: &mut ServerLoop,
    link: &mut Option<csnap_io::server::AgentLink>,
    ready: (u32, &str),
    filters: Option<&Filters>,
    lock_file: &std::fs::File,
    cmd: &mut [u8; csnap_pools::STANDBY_START_LINE_MAX_BYTES],
) -> Result<u8, &'static str> {
    if let Some(f) = filters.and_then(|f| f.standby.as_ref()) {
        f.install()
            .map_err(|_| "cannot install the standby seccomp filter")?;
    }
    eprintln!("csnap server: standby ready (heap sealed, memory locked, store not read)");
    if let Some(l) = link.as_mut() {
        // Now, not at init: the agent offers this node for a start once
        // the standby can start without faulting or allocating.
        l.send(&csnap_proto::Msg::ServerReady {
            pid: ready.0,
            node_id: args.node,
            addr: ready.1,
        })
        .map_err(|_| "standby: cannot announce itself to the agent")?;
    }
    // Wait for the start command: allocation-free from here on.
    const START_LIST_MAX: usize = csnap_pools::START_LIST_MAX;
    let mut members = [0u32; START_LIST_MAX];
    let mut n_members = 0;
    let mut expected = [(0u64, 0u32); START_LIST_MAX];
    let mut n_expected = 0;
    // Without an agent nobody saw the former server die: claim.
    let mut claim = true;
    let t0;
    if let Some(link) = link.as_mut() {
        let frame = match link.recv() {
            Ok(f) => f,
            Err(_) => {
                eprintln!("csnap server: standby: the agent link closed before a start; exiting");
                return Ok(0);
            }
        };
        t0 = std::time::Instant::now();
        match csnap_proto::decode(frame) {
            Ok((
                _,
                csnap_proto::Msg::StartServer {
                    claim: c,
                    members: m,
                    expected: e,
                },
            )) => {
                claim = c;
                if m.len() > START_LIST_MAX || e.len() > START_LIST_MAX {
                    return Err(
                        "start refused: more members or expected clients than START_LIST_MAX",
                    );
                }
                for n in m.iter() {
                    members[n_members] = n.id;
                    n_members += 1;
                }
                for c in e.iter() {
                    expected[n_expected] = (c.client_id, c.node_id);
                    n_expected += 1;
                }
            }
            _ => return Err("standby: expected a StartServer message from the agent"),
        }
    } else {
        let mut len = 0usize;
        loop {
            let n = csnap_sys::read_stdin(&mut cmd[len..]).map_err(|_| "standard input failed")?;
            if n == 0 {
                return Err("standard input closed before a start command");
            }
            len += n;
            if cmd[..len].contains(&b'\n') || len == cmd.len() {
                break;
            }
        }
        t0 = std::time::Instant::now();
        let parsed =
            csnap_fsm::start_line::parse_start_line(&cmd[..len], &mut members, &mut expected)?;
        n_members = parsed.members;
        n_expected = parsed.expected;
    }
    // Failover start: the store lock, then read, replay, next incarnation.
    let t_lock = t0.elapsed().as_micros();
    match lock_store_at_start(args, lock_file) {
        Ok(0) => {}
        Ok(waited) => eprintln!(
            "csnap server: waited {waited} us for the store lock (the server this one replaces on this host was still exiting)"
        ),
        Err(Some(())) => return Err("start refused: another server holds this store (locked)"),
        Err(None) => return Err("start failed: cannot lock the store"),
    }
    let t_store = t0.elapsed().as_micros();
    let info = match lp.start_standby(claim) {
        Ok(info) => info,
        Err(e) => {
            // The agent hears why before the link closes (heap-free).
            if let Some(l) = link.as_mut() {
                let code = if e == csnap_io::server::START_CORRUPT {
                    csnap_proto::ErrorCode::Corrupt
                } else {
                    csnap_proto::ErrorCode::Internal
                };
                let _ = l.send(&csnap_proto::Msg::Error {
                    code,
                    culprit: csnap_proto::Kind::StartServer.code(),
                    text: e,
                });
            }
            return Err(e);
        }
    };
    let t_started = t0.elapsed().as_micros();
    for &m in &members[..n_members] {
        lp.fsm_mut().handle_node_joined(m);
    }
    lp.fsm_mut().begin_recovery(&expected[..n_expected]);
    if let Some(l) = &link {
        l.set_nonblocking()
            .map_err(|_| "cannot make the agent link non-blocking")?;
    }
    if let Some(f) = filters {
        f.net
            .install()
            .map_err(|_| "cannot install the serving seccomp filter")?;
    }
    let us = t0.elapsed().as_micros();
    // Where the start went: the command, the store lock, the takeover by
    // the store worker (superblock, replay, the incarnation commit and its
    // flush), then recovery set-up and the serving filter.
    eprintln!(
        "csnap server: started incarnation {} ({} journal commit(s) replayed) in {us} us \
         (command {t_lock}, store lock {}, takeover {}, recovery and filter {}); serving",
        info.incarnation,
        info.replayed,
        t_store - t_lock,
        t_started - t_store,
        us - t_started
    );
    match link.take() {
        Some(mut link) => {
            let serving = csnap_proto::Msg::Serving {
                incarnation: info.incarnation,
                start_micros: u64::try_from(us).unwrap_or(u64::MAX),
                replayed_commits: info.replayed,
            };
            if link.send(&serving).is_err() {
                stopped(csnap_io::server::Stop::AgentGone);
            }
            stopped(lp.run_with_agent(link))
        }
        None => stopped(lp.run()),
    }
}

/// Connects to the node's agent and says Hello (init: it allocates). The
/// agent answers `HelloOk`; a refusal is an error. The standby announces
/// itself (`ServerReady`, with the address returned here) once it is
/// confined: "standby ready" means memory locked, heap sealed, filter on.
fn connect_agent(
    path: &std::path::Path,
    lp: &ServerLoop,
) -> Result<(csnap_io::server::AgentLink, String), String> {
    use csnap_proto::{Msg, Role};
    let mut link = csnap_io::server::AgentLink::connect(path)
        .map_err(|e| format!("cannot reach the agent at {}: {e}", path.display()))?;
    link.send(&Msg::Hello {
        version_min: csnap_proto::PROTOCOL_VERSION,
        version_max: csnap_proto::PROTOCOL_VERSION,
        role: Role::Server,
    })
    .map_err(|e| format!("agent {}: {e}", path.display()))?;
    match link.recv().map(csnap_proto::decode) {
        Ok(Ok((_, Msg::HelloOk { .. }))) => {}
        Ok(Ok((_, Msg::Error { text, .. }))) => {
            return Err(format!("the agent refused this server: {text}"))
        }
        _ => return Err(format!("agent {}: no HelloOk", path.display())),
    }
    let addr = lp
        .local_addrs()
        .first()
        .map(ToString::to_string)
        .ok_or("a standby needs a --listen address")?;
    Ok((link, addr))
}
