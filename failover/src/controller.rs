//! The controller process of the `local` membership and resource-manager
//! backend: a mio loop over its socket driving `csnap_fsm::cluster::Controller`.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use csnap_fsm::cluster::{Controller, ControllerConfig, ControllerEvent, Policy};
use csnap_io::net::{Addr, MioListener};
use mio::{Events, Poll, Token};

use crate::conns::ConnTable;
use crate::Confinement;

/// Readiness events handled per loop turn.
const EVENTS_MAX: usize = csnap_pools::EVENTS_PER_TURN_MAX;

/// How the controller runs.
#[derive(Debug)]
pub struct ControllerOptions {
    /// Its socket in the cluster directory (tools and agents of its host).
    pub socket: PathBuf,
    /// More addresses to listen on: TCP for agents on other hosts.
    pub listen: Vec<Addr>,
    /// Connections at once.
    pub conns: usize,
    /// Placement policy.
    pub policy: Policy,
    /// The crash-loop breaker: server deaths within `death_window_ms` that
    /// mark the store failed (0: never).
    pub max_server_deaths: u32,
    /// The breaker's window.
    pub death_window_ms: u64,
    /// Memory locking, heap seal and syscall filter.
    pub confinement: Confinement,
}

/// Runs the controller until its loop fails; returns the reason.
pub fn run(opts: &ControllerOptions) -> Result<String, String> {
    let mut listeners = vec![MioListener::bind(&Addr::Unix(opts.socket.clone()))
        .map_err(|e| format!("cannot listen on {}: {e}", opts.socket.display()))?];
    for a in &opts.listen {
        listeners.push(MioListener::bind(a).map_err(|e| format!("cannot listen on {a}: {e}"))?);
    }
    let cfg = ControllerConfig {
        conns: opts.conns,
        policy: opts.policy,
        start_timeout_ms: csnap_pools::CONTROLLER_START_TIMEOUT_MS,
        max_server_deaths: opts.max_server_deaths,
        death_window_ms: opts.death_window_ms,
    };
    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut events = Events::with_capacity(EVENTS_MAX);
    let mut table = crate::conns::table(listeners, cfg.conns, poll.registry())
        .map_err(|e| format!("cannot register the controller's listeners: {e}"))?;
    let mut fsm = Controller::new(cfg);
    let mut ready: Vec<(Token, bool, bool, bool)> = Vec::with_capacity(EVENTS_MAX);
    let reserved =
        ConnTable::reserved_bytes(cfg.conns) + cfg.conns * csnap_fsm::cluster::CONN_OUT_BYTES;
    for a in table.local_addrs() {
        eprintln!("csnap cluster: controller listening on {a}");
    }
    eprintln!(
        "csnap cluster: controller ready ({:?} placement, {} connections, {reserved} bytes reserved)",
        opts.policy, cfg.conns
    );
    let t0 = Instant::now();
    let now_ms = |t0: Instant| u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    opts.confinement.enter("csnap cluster")?;
    eprintln!("csnap cluster: serving");
    loop {
        let now = now_ms(t0);
        fsm.set_now(now);
        fsm.handle_tick();
        while let Some(e) = fsm.poll_event() {
            log(&e);
        }
        table.pump(&mut fsm, poll.registry());
        let timeout = fsm
            .next_deadline_ms()
            .map(|d| Duration::from_millis(d.saturating_sub(now)));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // After the seal: a heap-free line and `_exit`, nothing freed.
            csnap_sys::fail_stop(
                "csnap cluster",
                "event loop failed",
                &e,
                crate::LOOP_FAILED_EXIT,
            );
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
            table.on_event(&mut fsm, poll.registry(), token, readable, writable, closed);
        }
    }
}

/// Writes an event line, prefixed with `[t=MICROS]` (`CLOCK_MONOTONIC`,
/// as the agents' lines).
fn log(e: &ControllerEvent) {
    let t = csnap_sys::monotonic_micros();
    match e {
        ControllerEvent::Joined { node } => eprintln!("[t={t}] csnap cluster: node {node} joined"),
        ControllerEvent::Disconnected { node } => {
            eprintln!("[t={t}] csnap cluster: node {node}'s agent disconnected");
        }
        ControllerEvent::Placing { node, attempt } => {
            eprintln!("[t={t}] csnap cluster: start {attempt}: placing the server on node {node}");
        }
        ControllerEvent::Running { node, incarnation } => {
            eprintln!(
                "[t={t}] csnap cluster: server incarnation {incarnation} serves on node {node}"
            )
        }
        ControllerEvent::ServerDown { node, incarnation } => {
            eprintln!(
                "[t={t}] csnap cluster: server incarnation {incarnation} on node {node} is down"
            )
        }
        ControllerEvent::StartFailed { node } => {
            eprintln!("[t={t}] csnap cluster: the start on node {node} failed");
        }
        ControllerEvent::NoCandidate => {
            eprintln!("[t={t}] csnap cluster: a server is wanted but no member has a standby ready")
        }
        ControllerEvent::StoreFailed { deaths, window_ms } => {
            eprintln!(
                "[t={t}] csnap cluster: STORE FAILED: {deaths} server deaths within {window_ms} ms; \
                 no server is started until `csnap cluster clear-failed` (see the servers' logs for why they died)"
            )
        }
        ControllerEvent::FailedCleared => {
            eprintln!(
                "[t={t}] csnap cluster: the store's failed mark is cleared; placement resumes"
            )
        }
    }
}
