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
use csnap_store::{OpenOptions, Store};

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
    /// Test hook: make a forbidden syscall (open) once serving.
    #[arg(long, hide = true)]
    pub test_forbidden_syscall: bool,
    /// Metadata cache, in 4 KiB blocks.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::CACHE_DEFAULT_BLOCKS as u64,
          value_parser = clap::value_parser!(u64).range(csnap_pools::CACHE_MIN_BLOCKS as u64..=(1 << 24)))]
    pub cache_blocks: u64,
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
    let mut listen = Vec::new();
    for a in &args.listen {
        listen.push(Addr::parse(a).map_err(|e| format!("--listen {a}: {e}"))?);
    }
    // Listen first: a server that cannot listen writes nothing to the store.
    let mut listeners = Vec::new();
    for a in &listen {
        listeners.push(
            csnap_io::net::MioListener::bind(a)
                .map_err(|e| format!("cannot listen on {a}: {e}"))?,
        );
    }
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
    match csnap_sys::lock_exclusive(sd.file()) {
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
    let mut store = Store::open(
        sd,
        &OpenOptions {
            cache_blocks: usize_of(args.cache_blocks),
        },
    )
    .map_err(|e| format!("store {}: {e}", args.store.display()))?;
    let label = *store.label();
    let r = store.replay_report();
    if r.commits > 0 {
        eprintln!(
            "csnap server: replayed {} journal commit(s), {} block(s)",
            r.commits, r.blocks
        );
    }
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
    // The memory budget, one line per pool.
    let chunk_buf = label.chunk_size_bytes as usize;
    let net_items = csnap_io::server::ServerLoop::reserved_items(&cfg);
    let mut reserved = 0usize;
    for (what, bytes) in Server::reserved_items(&cfg)
        .iter()
        .chain(csnap_pools::store_reserved_items(usize_of(args.cache_blocks)).iter())
        .chain(net_items.iter())
        .chain([("store worker chunk buffer", chunk_buf)].iter())
    {
        eprintln!("csnap server: pool {what}: {bytes} bytes");
        reserved += bytes;
    }
    // Seccomp: compiled now (it allocates), installed per thread as each
    // enters the serving phase.
    if args.seal == SealMode::Report && !args.no_seccomp {
        eprintln!("csnap server: --seal report symbolises backtraces (it opens files): seccomp is off in this mode");
    }
    let filters = if args.no_seccomp || args.seal == SealMode::Report {
        eprintln!("csnap server: WARNING: --no-seccomp: the syscall whitelist is not enforced. Development use only.");
        None
    } else {
        csnap_sys::seccomp::install_sigsys_reporter()
            .map_err(|e| format!("cannot install the SIGSYS reporter: {e}"))?;
        let net = csnap_sys::seccomp::compile(&csnap_audit::numbers(csnap_audit::SERVING_NETWORK))?;
        let st = csnap_sys::seccomp::compile(&csnap_audit::numbers(csnap_audit::SERVING_STORE))?;
        Some((net, st))
    };
    let worker = StoreWorker::new(store, od, BATCH_MAX);
    let worker_filter = filters.as_ref().map(|f| f.1.clone());
    let mut lp = ServerLoop::with_listeners(cfg, listeners, worker, worker_filter)
        .map_err(|e| format!("cannot start the server loop: {e}"))?;
    for a in lp.local_addrs() {
        eprintln!("csnap server: listening on {a}");
    }
    eprintln!(
        "csnap server: incarnation {incarnation}, chunk {} bytes, origin {} bytes, {} clients x {} requests, {} read locks, {} bytes reserved",
        label.chunk_size_bytes,
        label.origin_size_bytes,
        cfg.clients,
        cfg.requests_per_client,
        cfg.read_locks,
        reserved
    );
    if args.no_mlock {
        eprintln!("csnap server: WARNING: --no-mlock: memory is not locked; page faults (and memory inversion under pressure) are possible. Development use only.");
    } else if let Err(e) = csnap_sys::mem::lock_all() {
        return Err(format!(
            "cannot lock memory (mlockall): {e}; run as root or with CAP_IPC_LOCK, or pass --no-mlock for development"
        ));
    }
    csnap_sys::mem::prefault_stack(STACK_BUDGET_BYTES);
    if let Err(e) = csnap_sys::mem::set_io_flusher() {
        eprintln!("csnap server: note: PR_SET_IO_FLUSHER not set ({e})");
    }
    if let Err(e) = csnap_sys::mem::set_oom_score_adj(-1000) {
        eprintln!("csnap server: note: oom_score_adj not set ({e})");
    }
    let mode = match args.seal {
        SealMode::Abort => Some(csnap_sys::alloc::Mode::Abort),
        SealMode::Count => Some(csnap_sys::alloc::Mode::Count),
        SealMode::Report => Some(csnap_sys::alloc::Mode::Report),
        SealMode::Off => None,
    };
    if let Some(m) = mode {
        csnap_sys::alloc::seal(m);
        eprintln!("csnap server: heap sealed ({:?} on allocation)", args.seal);
    }
    if let Some((net, _)) = &filters {
        net.install()
            .map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
    }
    eprintln!("csnap server: serving");
    let mut forbidden = args.test_forbidden_syscall;
    let mut hook = move || {
        if forbidden {
            forbidden = false;
            csnap_sys::seccomp::forbidden_open_for_tests();
        }
    };
    match lp.run_with(&mut hook) {
        Stop::StoreFailed => {
            error("the snapshot store failed; restart the server to replay the journal");
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Stop::Fenced => {
            error("fenced: a newer server incarnation took this store over; this server stops");
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Stop::Io(e) => {
            error(&format!("event loop failed: {e}"));
            Ok(ExitCode::from(EXIT_FAILED))
        }
    }
}

/// Stack the serving thread may use, touched before the seal.
const STACK_BUDGET_BYTES: usize = 256 * 1024;

/// Expected clients and members a start command may name.
const START_LIST_MAX: usize = 256;

fn serve_standby(args: &ServerArgs) -> Result<ExitCode, String> {
    require_device(&args.origin, "origin")?;
    require_device(&args.store, "store")?;
    let mut listeners = Vec::new();
    for a in &args.listen {
        let addr = Addr::parse(a).map_err(|e| format!("--listen {a}: {e}"))?;
        listeners.push(
            csnap_io::net::MioListener::bind(&addr)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        );
    }
    // Devices open, nothing read.
    let sd = FileDisk::open(&args.store)
        .map_err(|e| format!("cannot open store {}: {e}", args.store.display()))?;
    let od = FileDisk::open(&args.origin)
        .map_err(|e| format!("cannot open origin {}: {e}", args.origin.display()))?;
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
    // Geometry is learnt at start; the pools do not depend on it.
    let cfg = ServerConfig {
        clients: usize_of(args.clients),
        requests_per_client: usize_of(args.requests_per_client),
        read_locks: usize_of(args.read_locks),
        incarnation: 0,
        server_id: 0,
        chunk_size_bytes: csnap_pools::CHUNK_SIZE_MIN_BYTES,
        origin_size_bytes: 0,
        origin_uuid: [0; 16],
    };
    let seccomp = !(args.no_seccomp || args.seal == SealMode::Report);
    let filters = if seccomp {
        csnap_sys::seccomp::install_sigsys_reporter()
            .map_err(|e| format!("cannot install the SIGSYS reporter: {e}"))?;
        let standby_f =
            csnap_sys::seccomp::compile(&csnap_audit::numbers(csnap_audit::STANDBY_NETWORK))?;
        let net = csnap_sys::seccomp::compile(&csnap_audit::numbers(csnap_audit::SERVING_NETWORK))?;
        let st = csnap_sys::seccomp::compile(&csnap_audit::numbers(csnap_audit::SERVING_STORE))?;
        Some((standby_f, net, st))
    } else {
        eprintln!(
            "csnap server: WARNING: the syscall whitelist is not enforced. Development use only."
        );
        None
    };
    let worker = StoreWorker::standby(standby, od, BATCH_MAX);
    let worker_filter = filters.as_ref().map(|f| f.2.clone());
    let mut lp = ServerLoop::with_listeners(cfg, listeners, worker, worker_filter)
        .map_err(|e| format!("cannot start the server loop: {e}"))?;
    for a in lp.local_addrs() {
        eprintln!("csnap server: standby listening on {a}");
    }
    if args.no_mlock {
        eprintln!("csnap server: WARNING: --no-mlock: memory is not locked. Development use only.");
    } else if let Err(e) = csnap_sys::mem::lock_all() {
        return Err(format!("cannot lock memory (mlockall): {e}"));
    }
    csnap_sys::mem::prefault_stack(STACK_BUDGET_BYTES);
    let mut cmd = [0u8; 4096];
    let mode = match args.seal {
        SealMode::Abort => Some(csnap_sys::alloc::Mode::Abort),
        SealMode::Count => Some(csnap_sys::alloc::Mode::Count),
        SealMode::Report => Some(csnap_sys::alloc::Mode::Report),
        SealMode::Off => None,
    };
    if let Some(m) = mode {
        csnap_sys::alloc::seal(m);
    }
    if let Some((standby_f, _, _)) = &filters {
        standby_f
            .install()
            .map_err(|_| "cannot install the standby seccomp filter")?;
    }
    eprintln!("csnap server: standby ready (heap sealed, memory locked, store not read)");
    // Wait for the start command: allocation-free from here on.
    let mut len = 0usize;
    loop {
        let n = csnap_sys::read_stdin(&mut cmd[len..]).map_err(|_| "standard input failed")?;
        if n == 0 {
            return Err("standard input closed before a start command".into());
        }
        len += n;
        if cmd[..len].contains(&b'\n') || len == cmd.len() {
            break;
        }
    }
    let t0 = std::time::Instant::now();
    let line = core::str::from_utf8(&cmd[..len]).map_err(|_| "start command is not UTF-8")?;
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some("start") {
        return Err("expected `start [member=NODE ...] [expect=CLIENT:NODE ...]`".into());
    }
    let mut members = [0u32; START_LIST_MAX];
    let mut n_members = 0;
    let mut expected = [(0u64, 0u32); START_LIST_MAX];
    let mut n_expected = 0;
    for w in words {
        if let Some(v) = w.strip_prefix("member=") {
            if n_members < START_LIST_MAX {
                members[n_members] = v.parse().map_err(|_| "bad member")?;
                n_members += 1;
            }
        } else if let Some(v) = w.strip_prefix("expect=") {
            let (c, n) = v.split_once(':').ok_or("bad expect (CLIENT:NODE)")?;
            if n_expected < START_LIST_MAX {
                expected[n_expected] = (
                    c.parse().map_err(|_| "bad expect client")?,
                    n.parse().map_err(|_| "bad expect node")?,
                );
                n_expected += 1;
            }
        } else {
            return Err("unknown word in the start command".into());
        }
    }
    // Failover start: the store lock, then read, replay, next incarnation.
    match csnap_sys::lock_exclusive(&lock_file) {
        Ok(true) => {}
        Ok(false) => return Err("start refused: another server holds this store (locked)".into()),
        Err(_) => return Err("start failed: cannot lock the store".into()),
    }
    let info = lp.start_standby()?;
    for &m in &members[..n_members] {
        lp.fsm_mut().handle_node_joined(m);
    }
    lp.fsm_mut().begin_recovery(&expected[..n_expected]);
    if let Some((_, net, _)) = &filters {
        net.install()
            .map_err(|_| "cannot install the serving seccomp filter")?;
    }
    let us = t0.elapsed().as_micros();
    eprintln!(
        "csnap server: started incarnation {} ({} journal commit(s) replayed) in {us} us; serving",
        info.incarnation, info.replayed
    );
    match lp.run() {
        Stop::StoreFailed => {
            error("the snapshot store failed; restart the server to replay the journal");
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Stop::Fenced => {
            error("fenced: a newer server incarnation took this store over; this server stops");
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Stop::Io(e) => {
            error(&format!("event loop failed: {e}"));
            Ok(ExitCode::from(EXIT_FAILED))
        }
    }
}
