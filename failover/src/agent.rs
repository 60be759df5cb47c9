//! The agent process: a mio loop over the agent's socket (volume clients,
//! control tools, its standby and serving server), the bus link to the
//! membership backend, and the pipe to its spawner, driving the sans-IO
//! `AgentFsm`.
//!
//! The spawner is a child process started at init, before the agent locks
//! its memory and seals its heap: starting a new standby forks and execs,
//! which the confined agent never does itself. The agent only writes
//! `spawn` to the spawner's pipe. The spawner (and every server it starts)
//! dies with the agent (`PR_SET_PDEATHSIG`), and every server also exits
//! when its agent link closes: no server outlives the agent that fences it.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use csnap_fsm::agent::{AgentAction, AgentConfig, AgentEvent, AgentFsm};
use csnap_io::metrics::{render_agent, IncarnationSeen, MetricsEndpoint};
use csnap_io::net::{Addr, MioListener, MioStream};
use csnap_proto::{FrameReader, FRAME_MAX_BYTES};
use mio::{Events, Interest, Poll, Token};

use crate::conns::ConnTable;
use crate::Confinement;

const BUS: Token = Token(usize::MAX - 2);
/// The metrics endpoint's tokens (`--metrics`), below the listeners'.
const METRICS_BASE: usize = usize::MAX - 128;
const _: () = assert!(csnap_pools::AGENT_CONNS_MAX < METRICS_BASE);
const _: () =
    assert!(METRICS_BASE + csnap_io::metrics::METRICS_TOKENS <= crate::conns::LISTENER_BASE);

/// Pause between attempts to reach the membership backend.
const BUS_RETRY_MS: u64 = csnap_pools::AGENT_BUS_RETRY_MS;

/// Readiness events handled per loop turn.
const EVENTS_MAX: usize = csnap_pools::EVENTS_PER_TURN_MAX;

/// How an agent runs.
#[derive(Debug)]
pub struct AgentOptions {
    /// This node.
    pub node_id: u32,
    /// The agent's socket.
    pub socket: PathBuf,
    /// The controller's address (the `local` membership backend): its
    /// unix socket on the controller's host, or `host:port` over TCP.
    pub controller: Addr,
    /// Connections on the agent's socket at once.
    pub conns: usize,
    /// The crash-loop breaker's window (`AgentConfig::death_window_ms`).
    pub death_window_ms: u64,
    /// The spawner process to start at init (its standard input is the
    /// spawn pipe).
    pub spawner: std::process::Command,
    /// Memory locking, heap seal and syscall filter.
    pub confinement: Confinement,
    /// `--metrics ADDR`: the Prometheus endpoint, in the agent's loop.
    pub metrics: Option<Addr>,
}

struct Bus {
    stream: MioStream,
}

/// Runs the agent until its loop fails. Returns the reason.
pub fn run(mut opts: AgentOptions) -> Result<String, String> {
    let listener = MioListener::bind(&Addr::Unix(opts.socket.clone()))
        .map_err(|e| format!("cannot listen on {}: {e}", opts.socket.display()))?;
    let agent_addr = csnap_fsm::agent::AddrBuf::new(&opts.socket.to_string_lossy())
        .ok_or("the agent socket path is too long")?;
    let cfg = AgentConfig {
        node_id: opts.node_id,
        agent_addr,
        conns: opts.conns,
        suspect_hold_ms: csnap_pools::AGENT_SUSPECT_HOLD_MS,
        respawn_backoff_ms: csnap_pools::AGENT_RESPAWN_BACKOFF_MS,
        spawn_timeout_ms: csnap_pools::AGENT_SPAWN_TIMEOUT_MS,
        standby_after_start_ms: csnap_pools::AGENT_STANDBY_AFTER_START_MS,
        relist_grace_ms: csnap_pools::AGENT_RELIST_GRACE_MS,
        death_window_ms: opts.death_window_ms,
    };
    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut events = Events::with_capacity(EVENTS_MAX);
    let mut table = crate::conns::table(vec![listener], cfg.conns, poll.registry())
        .map_err(|e| format!("cannot register the agent socket: {e}"))?;
    let mut fsm = AgentFsm::new(cfg);
    let mut metrics = match &opts.metrics {
        Some(a) => Some(MetricsEndpoint::new(a, poll.registry(), METRICS_BASE)?),
        None => None,
    };
    let mut seen = IncarnationSeen::default();
    let mut bus_reader = FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice());
    let mut ready: Vec<(Token, bool, bool, bool)> = Vec::with_capacity(EVENTS_MAX);
    opts.spawner.stdin(std::process::Stdio::piped());
    let mut spawner = csnap_sys::spawn_tied(&mut opts.spawner)
        .map_err(|e| format!("cannot start the spawner: {e}"))?;
    let mut spawn_pipe = spawner
        .stdin
        .take()
        .ok_or("the spawner has no input pipe")?;
    let node = opts.node_id;
    let mut reserved = ConnTable::reserved_bytes(cfg.conns) + FRAME_MAX_BYTES;
    if let Some(m) = &metrics {
        eprintln!(
            "csnap agent {node}: pool metrics endpoint: {} bytes",
            MetricsEndpoint::reserved_bytes()
        );
        reserved += MetricsEndpoint::reserved_bytes();
        if let Ok(a) = m.local_addr() {
            eprintln!("csnap agent {node}: metrics at http://{a}/metrics");
        }
    }
    for (what, bytes) in AgentFsm::reserved_items(&cfg) {
        eprintln!("csnap agent {node}: pool {what}: {bytes} bytes");
        reserved += bytes;
    }
    eprintln!(
        "csnap agent {node}: pool connection frame readers: {} bytes",
        ConnTable::reserved_bytes(cfg.conns) + FRAME_MAX_BYTES
    );
    eprintln!(
        "csnap agent {node}: listening on {}, {} connections, {reserved} bytes reserved",
        opts.socket.display(),
        cfg.conns
    );
    let t0 = Instant::now();
    let now_ms = |t0: Instant| u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut bus: Option<Bus> = None;
    let mut bus_retry_at = 0u64;
    // Lives as long as the loop: nothing is freed once the heap is sealed.
    let who = format!("csnap agent {node}");
    opts.confinement.enter(&who)?;
    eprintln!("csnap agent {node}: serving");
    loop {
        let now = now_ms(t0);
        fsm.set_now(now);
        fsm.handle_tick();
        // The bus: connect when down, drop when it stalled.
        if bus.is_some() && fsm.bus_stalled() {
            if let Some(mut b) = bus.take() {
                let _ = poll.registry().deregister(&mut b.stream);
            }
            fsm.handle_bus_disconnected();
            bus_retry_at = now + BUS_RETRY_MS;
        }
        if bus.is_none() && now >= bus_retry_at {
            match connect_bus(&opts.controller, &poll) {
                Ok(b) => {
                    bus_reader.clear();
                    bus = Some(b);
                    fsm.handle_bus_connected();
                }
                Err(_) => bus_retry_at = now + BUS_RETRY_MS,
            }
        }
        while let Some(a) = fsm.poll_action() {
            match a {
                AgentAction::SpawnStandby => {
                    if spawn_pipe.write_all(b"spawn\n").is_err() {
                        eprintln!("csnap agent {node}: the spawner is gone; no new standby");
                    }
                }
                AgentAction::Log(e) => log(node, &e),
            }
        }
        table.pump(&mut fsm, poll.registry());
        if let Some(b) = bus.as_mut() {
            if !write_bus(&mut fsm, b) {
                let mut b = bus.take().expect("bus present");
                let _ = poll.registry().deregister(&mut b.stream);
                fsm.handle_bus_disconnected();
                bus_retry_at = now + BUS_RETRY_MS;
            }
        }
        // Metrics: the incarnations the agent learns, and scrapes.
        let st = fsm.status();
        if let Some((inc, _)) = st.cluster_server {
            seen.saw(inc);
        }
        let mut metrics_deadline = None;
        if let Some(ep) = metrics.as_mut() {
            ep.pump(poll.registry(), now);
            if ep.waiting() {
                ep.respond(poll.registry(), &mut |t| render_agent(t, &st, &seen));
            }
            metrics_deadline = ep.next_deadline_ms();
        }
        let mut timeout = fsm.next_deadline_ms().map(|d| d.saturating_sub(now));
        if let Some(d) = metrics_deadline {
            let t = d.saturating_sub(now);
            timeout = Some(timeout.map_or(t, |x| x.min(t)));
        }
        if bus.is_none() {
            let t = bus_retry_at.saturating_sub(now);
            timeout = Some(timeout.map_or(t, |x| x.min(t)));
        }
        if let Err(e) = poll.poll(&mut events, timeout.map(Duration::from_millis)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // After the seal: a heap-free line and `_exit`, nothing freed.
            csnap_sys::fail_stop(&who, "event loop failed", &e, crate::LOOP_FAILED_EXIT);
        }
        fsm.set_now(now_ms(t0));
        ready.clear();
        for ev in events.iter() {
            ready.push((
                ev.token(),
                ev.is_readable(),
                ev.is_writable(),
                ev.is_read_closed() || ev.is_error(),
            ));
        }
        for &(token, readable, writable, closed) in &ready {
            if token == BUS {
                let alive = match bus.as_mut() {
                    Some(b) => {
                        (!(readable || closed) || read_bus(&mut fsm, b, &mut bus_reader))
                            && (!writable || write_bus(&mut fsm, b))
                    }
                    None => true,
                };
                if !alive {
                    if let Some(mut b) = bus.take() {
                        let _ = poll.registry().deregister(&mut b.stream);
                    }
                    fsm.handle_bus_disconnected();
                    bus_retry_at = fsm_now(&t0) + BUS_RETRY_MS;
                }
            } else if let Some(m) = metrics.as_mut().filter(|m| m.owns(token)) {
                m.on_event(token, readable || closed, writable);
            } else {
                table.on_event(&mut fsm, poll.registry(), token, readable, writable, closed);
            }
        }
    }
}

fn fsm_now(t0: &Instant) -> u64 {
    u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Connects the bus link without blocking: a unix connect completes at
/// once; a TCP connect is still in progress, and the link's first frames
/// wait in the FSM's bus output until the socket turns writable. A connect
/// that fails shows as an error on the link (dropped, retried after
/// `AGENT_BUS_RETRY_MS`); one that hangs (a dead host) stalls the link,
/// which `bus_stalled` drops.
fn connect_bus(addr: &Addr, poll: &Poll) -> io::Result<Bus> {
    let mut stream = match addr {
        Addr::Unix(p) => MioStream::Unix(mio::net::UnixStream::connect(p)?),
        Addr::Tcp(a) => {
            let s = mio::net::TcpStream::connect(*a)?;
            // Frames are small and latency-bound (a failover waits on
            // them): no Nagle delay.
            let _ = s.set_nodelay(true);
            MioStream::Tcp(s)
        }
    };
    poll.registry()
        .register(&mut stream, BUS, Interest::READABLE | Interest::WRITABLE)?;
    Ok(Bus { stream })
}

/// Reads and handles the bus's frames; `false` when the link is gone.
fn read_bus(fsm: &mut AgentFsm, b: &mut Bus, reader: &mut FrameReader<Box<[u8]>>) -> bool {
    loop {
        loop {
            match reader.next_frame() {
                Ok(Some(f)) => fsm.handle_bus_frame(f),
                Ok(None) => break,
                Err(_) => return false,
            }
        }
        match b.stream.read(reader.spare()) {
            Ok(0) => return false,
            Ok(n) => reader.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Writes what the FSM queued for the bus; `false` when the link is gone.
fn write_bus(fsm: &mut AgentFsm, b: &mut Bus) -> bool {
    while !fsm.bus_output().is_empty() {
        match b.stream.write(fsm.bus_output()) {
            Ok(0) => return false,
            Ok(n) => fsm.consume_bus_output(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Writes an event line, prefixed with `[t=MICROS]`: `CLOCK_MONOTONIC` in
/// microseconds, one clock for every process of the machine, so the lines
/// of agents, servers and clients can be put on one time line (the failover
/// benchmark does).
fn log(node: u32, e: &AgentEvent) {
    let t = csnap_sys::monotonic_micros();
    match e {
        AgentEvent::StandbyReady { pid } => {
            eprintln!("[t={t}] csnap agent {node}: standby ready (pid {pid})");
        }
        AgentEvent::StandbyLost { pid } => {
            eprintln!("[t={t}] csnap agent {node}: standby lost (pid {pid}); a new one follows");
        }
        AgentEvent::Gathering { attempt, waiting } => eprintln!(
            "[t={t}] csnap agent {node}: start {attempt}: asking {waiting} other member(s) for their snapshot clients"
        ),
        AgentEvent::Starting { attempt, expected } => eprintln!(
            "[t={t}] csnap agent {node}: start {attempt}: starting the standby ({expected} snapshot client(s) expected)"
        ),
        AgentEvent::Serving {
            incarnation,
            start_micros,
        } => eprintln!(
            "[t={t}] csnap agent {node}: server incarnation {incarnation} serving (started in {start_micros} us)"
        ),
        AgentEvent::ServerDied { incarnation } => eprintln!(
            "[t={t}] csnap agent {node}: server incarnation {incarnation} died"
        ),
        AgentEvent::StartFailed { attempt } => {
            eprintln!("[t={t}] csnap agent {node}: start {attempt} failed");
        }
        AgentEvent::TooManyExpected => eprintln!(
            "[t={t}] csnap agent {node}: start refused: more snapshot clients than one start can carry"
        ),
        AgentEvent::StaleServerStopped { incarnation } => eprintln!(
            "[t={t}] csnap agent {node}: stopped server incarnation {incarnation}: a newer one serves"
        ),
        AgentEvent::Fenced { reason } => {
            eprintln!("[t={t}] csnap agent {node}: fenced by the controller ({reason:?})");
        }
        AgentEvent::BusError { code } => {
            eprintln!("[t={t}] csnap agent {node}: the membership backend said {code:?}; ignored");
        }
    }
}
