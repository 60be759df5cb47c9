//! The server process: a mio loop over the listeners and connections that
//! drives the sans-IO `Server` FSM, and the store worker thread behind two
//! fixed rings.
//!
//! Threads:
//! - the network thread (the caller of `ServerLoop::run`): sockets only; its
//!   step is bounded by socket reads and writes and ring hand-offs;
//! - the store worker thread: store operations, copy-outs, commits (disk
//!   I/O), in batches (group commit); it wakes the network thread through a
//!   mio `Waker` when replies are ready.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use csnap_fsm::server::{Server, ServerConfig, ServerEvent};
use csnap_fsm::store_ops::{StoreReply, StoreRequest};
use csnap_proto::{FrameReader, FRAME_MAX_BYTES};
use csnap_store::disk::Disk;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::conns::{ConnTable, LISTENERS_MAX, LISTENER_BASE};
use crate::net::{Addr, MioListener};
use crate::ring::{PopError, Ring};
use crate::store_worker::StoreWorker;

const WAKER: Token = Token(usize::MAX - 1);
const AGENT: Token = Token(usize::MAX - 2);
/// The metrics endpoint's tokens (`--metrics`), below the listeners'.
const METRICS_BASE: usize = usize::MAX - 128;
const _: () = assert!(csnap_pools::CLIENTS_MAX < METRICS_BASE);
const _: () = assert!(METRICS_BASE + crate::metrics::METRICS_TOKENS <= LISTENER_BASE);

/// Token of the standby's start request.
const START_TOKEN: u32 = u32::MAX - 2;

/// What a standby start did.
#[derive(Debug, Clone, Copy)]
pub struct StartInfo {
    /// The new incarnation (committed).
    pub incarnation: u64,
    /// Journal commits replayed.
    pub replayed: u64,
}

/// Readiness events handled per loop turn.
const EVENTS_MAX: usize = csnap_pools::EVENTS_PER_TURN_MAX;

/// Stack the store worker may use, touched when it starts.
const WORKER_STACK_BUDGET_BYTES: usize = csnap_pools::THREAD_STACK_BUDGET_BYTES;

/// A batch reads the on-disk incarnation first when the last such check is
/// older than this (see `StoreWorker::request_fence_check`).
const FENCE_RECHECK_MS: u64 = csnap_pools::SERVER_FENCE_RECHECK_MS;
/// Room in the store reply ring for notifications (auto-deleted snapshots,
/// corrupt blocks) beyond one reply per request: one per snapshot slot, as
/// the store worker's reply vector reserves.
const SNAPSHOTS_MAX: usize = csnap_pools::SNAPSHOTS_MAX;

/// Requests the store worker takes in one batch (one commit).
pub const BATCH_MAX: usize = csnap_pools::STORE_BATCH_MAX;

/// `start_standby`'s error when the store's metadata is corrupt (the block
/// was logged): a standby passes it on to its agent.
pub const START_CORRUPT: &str =
    "the store could not be started: its metadata is corrupt (this server's log names the block)";

/// The running server.
pub struct ServerLoop {
    poll: Poll,
    events: Events,
    /// The listeners and client connections (the table every process
    /// loop shares).
    conns: ConnTable,
    fsm: Server,
    requests: Ring<StoreRequest>,
    replies: Ring<StoreReply>,
    /// Replies the store worker could not queue (`replies` full; sized so
    /// that it cannot happen): the loop stops on the first one rather than
    /// leave a request unanswered.
    lost_replies: Arc<AtomicU64>,
    worker: Option<JoinHandle<()>>,
    ready: Vec<(Token, bool, bool, bool)>,
    agent: Option<(mio::net::UnixStream, FrameReader<Box<[u8]>>)>,
    agent_frame: Option<Box<[u8]>>,
    _worker_ready: std::sync::mpsc::Receiver<Result<(), String>>,
    /// Published by the store worker after each batch.
    figures: Arc<crate::metrics::WorkerFigures>,
    /// `--metrics`: the Prometheus endpoint, on this (network) thread.
    metrics: Option<crate::metrics::MetricsEndpoint>,
}

impl std::fmt::Debug for ServerLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLoop").finish_non_exhaustive()
    }
}

/// Why the loop stopped.
#[derive(Debug)]
pub enum Stop {
    /// The store failed (I/O error or corruption); the journal is intact and a
    /// restart replays it.
    StoreFailed,
    /// A newer server incarnation took the store over.
    Fenced,
    /// An I/O error of the event loop itself.
    Io(io::Error),
    /// The link to the node's agent closed: the agent is gone, or stopped
    /// this server (fencing, a move, a newer incarnation elsewhere).
    AgentGone,
}

/// A server's link to its node's agent (a standby connects at init,
/// announces itself, waits for its start command on it, and after the start
/// takes membership from it). Blocking until `ServerLoop::run_with_agent`
/// puts it in the event loop.
pub struct AgentLink {
    stream: std::os::unix::net::UnixStream,
    reader: FrameReader<Box<[u8]>>,
    frame: Box<[u8]>,
    frame_len: usize,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink").finish_non_exhaustive()
    }
}

impl AgentLink {
    /// Connects to the agent's socket (init: it allocates its buffers).
    pub fn connect(path: &std::path::Path) -> io::Result<AgentLink> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        Ok(AgentLink {
            stream,
            reader: FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice()),
            frame: vec![0u8; FRAME_MAX_BYTES].into_boxed_slice(),
            frame_len: 0,
        })
    }

    /// Sends one message (blocking), encoded in the link's own buffer.
    pub fn send(&mut self, msg: &csnap_proto::Msg<'_>) -> io::Result<()> {
        let n = csnap_proto::encode(&csnap_proto::Header::new(0, 0), msg, &mut self.frame)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.stream.write_all(&self.frame[..n])
    }

    /// Turns the link non-blocking, for the serving loop (call before the
    /// serving filter is installed: it is an ioctl).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        self.stream.set_nonblocking(true)
    }

    /// Waits for the next frame (blocking) and returns it; end of stream is
    /// `UnexpectedEof`.
    pub fn recv(&mut self) -> io::Result<&[u8]> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => {
                    let n = f.len();
                    self.frame[..n].copy_from_slice(f);
                    self.frame_len = n;
                    return Ok(&self.frame[..self.frame_len]);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let n = self.stream.read(self.reader.spare())?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.reader.advance(n);
        }
    }
}

impl ServerLoop {
    /// Binds the listeners, reserves every buffer, and starts the store worker
    /// thread over `worker`.
    pub fn new<D, O>(
        cfg: ServerConfig,
        listen: &[Addr],
        worker: StoreWorker<D, O>,
    ) -> io::Result<ServerLoop>
    where
        D: Disk + Send + 'static,
        O: Disk + Send + 'static,
    {
        Self::with_worker_filter(cfg, listen, worker, None)
    }

    /// As `new`, and the store worker installs `filter` (its serving-phase
    /// syscall whitelist) before it takes its first request.
    pub fn with_worker_filter<D, O>(
        cfg: ServerConfig,
        listen: &[Addr],
        worker: StoreWorker<D, O>,
        filter: Option<csnap_sys::seccomp::Filter>,
    ) -> io::Result<ServerLoop>
    where
        D: Disk + Send + 'static,
        O: Disk + Send + 'static,
    {
        let mut listeners = Vec::with_capacity(listen.len());
        for a in listen {
            listeners.push(MioListener::bind(a)?);
        }
        Self::with_listeners(cfg, listeners, worker, filter)
    }

    /// As `with_worker_filter`, over listeners bound by the caller.
    pub fn with_listeners<D, O>(
        cfg: ServerConfig,
        listeners: Vec<MioListener>,
        worker: StoreWorker<D, O>,
        filter: Option<csnap_sys::seccomp::Filter>,
    ) -> io::Result<ServerLoop>
    where
        D: Disk + Send + 'static,
        O: Disk + Send + 'static,
    {
        let poll = Poll::new()?;
        let conns = ConnTable::new(listeners, cfg.clients, poll.registry(), 0..=LISTENERS_MAX)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let slots = cfg.clients * cfg.requests_per_client;
        let ring_cap = slots + 2 * cfg.clients + 1;
        let requests: Ring<StoreRequest> = Ring::with_capacity(ring_cap);
        let replies: Ring<StoreReply> = Ring::with_capacity(ring_cap + SNAPSHOTS_MAX);
        let figures = Arc::new(crate::metrics::WorkerFigures::default());
        let lost_replies = Arc::new(AtomicU64::new(0));
        let (rq, rp, wk, fg) = (
            requests.clone(),
            ReplySink {
                ring: replies.clone(),
                lost: lost_replies.clone(),
            },
            waker.clone(),
            figures.clone(),
        );
        let batch: Vec<StoreRequest> = Vec::with_capacity(BATCH_MAX);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        let handle = std::thread::Builder::new()
            .name("csnap-store".into())
            .spawn(move || store_thread(worker, rq, rp, wk, fg, filter, batch, ready_tx))?;
        // The worker finishes its own init (stack prefault, filter) before
        // the caller seals the heap and enters the serving phase.
        // `ready_rx` lives as long as the loop: the worker drops its sender
        // after the seal, which must not free the channel.
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Err(_) => return Err(io::Error::other("the store worker died at start")),
        }
        Ok(ServerLoop {
            poll,
            events: Events::with_capacity(EVENTS_MAX),
            conns,
            fsm: Server::new(cfg),
            requests,
            replies,
            lost_replies,
            worker: Some(handle),
            ready: Vec::with_capacity(EVENTS_MAX),
            agent: None,
            agent_frame: None,
            _worker_ready: ready_rx,
            figures,
            metrics: None,
        })
    }

    /// Serves Prometheus metrics at `GET /metrics` on `addr` from this
    /// loop (init: it reserves the endpoint's buffers).
    pub fn serve_metrics(&mut self, addr: &Addr) -> Result<Addr, String> {
        let ep = crate::metrics::MetricsEndpoint::new(addr, self.poll.registry(), METRICS_BASE)?;
        let a = ep
            .local_addr()
            .map_err(|e| format!("metrics address: {e}"))?;
        self.metrics = Some(ep);
        Ok(a)
    }

    /// The metrics endpoint's turn: connections moved on, scrapes answered
    /// from the FSM and the worker's published figures.
    fn metrics_turn(&mut self) -> Option<std::time::Duration> {
        let ep = self.metrics.as_mut()?;
        let now = csnap_sys::monotonic_micros() / 1000;
        let reg = self.poll.registry();
        ep.pump(reg, now);
        if ep.waiting() {
            let f = self.figures.load(
                self.fsm.read_locks() as u64,
                u64::from(self.fsm.waiting_writes()),
            );
            let clients = u64::from(self.fsm.clients());
            ep.respond(reg, &mut |t| crate::metrics::render_server(t, &f, clients));
        }
        ep.next_deadline_ms()
            .map(|d| std::time::Duration::from_millis(d.saturating_sub(now)))
    }

    /// Bytes `new` reserves for `cfg`, one line per pool.
    pub fn reserved_items(cfg: &ServerConfig) -> [(&'static str, usize); 4] {
        let slots = cfg.clients * cfg.requests_per_client;
        let ring = slots + 2 * cfg.clients + 1;
        [
            (
                "connection frame readers",
                ConnTable::reserved_bytes(cfg.clients),
            ),
            ("readiness events", EVENTS_MAX * 64),
            (
                "store request and reply rings",
                ring * core::mem::size_of::<Option<StoreRequest>>()
                    + (ring + SNAPSHOTS_MAX) * core::mem::size_of::<Option<StoreReply>>(),
            ),
            (
                "store worker batch",
                BATCH_MAX * core::mem::size_of::<StoreRequest>(),
            ),
        ]
    }

    /// Starts a standby (a loop built over `StoreWorker::standby`): the
    /// worker reads the store, replays its journal and commits the next
    /// incarnation; the FSM learns the geometry. Then `begin_recovery`, and
    /// `run`. Allocates nothing.
    pub fn start_standby(&mut self, claim: bool) -> Result<StartInfo, &'static str> {
        let mut corrupt = false;
        self.requests
            .push(StoreRequest {
                token: START_TOKEN,
                op: csnap_fsm::store_ops::StoreOp::Start { claim },
            })
            .map_err(|_| "the store worker is gone")?;
        loop {
            let r = self
                .replies
                .pop_blocking()
                .map_err(|_| "the store worker is gone")?;
            if let csnap_fsm::store_ops::StoreResult::Corrupt { addr, kind, reason } = r.result {
                eprintln!("csnap server: problem: {kind} at block {addr}: {reason}; the store cannot be served");
                corrupt = true;
                continue;
            }
            if r.token != START_TOKEN {
                continue;
            }
            return match r.result {
                csnap_fsm::store_ops::StoreResult::Started {
                    incarnation,
                    server_id,
                    chunk_size_bytes,
                    origin_size_bytes,
                    origin_uuid,
                    replayed,
                } => {
                    self.fsm.configure(
                        incarnation,
                        server_id,
                        chunk_size_bytes,
                        origin_size_bytes,
                        origin_uuid,
                    );
                    Ok(StartInfo {
                        incarnation,
                        replayed,
                    })
                }
                _ if corrupt => Err(START_CORRUPT),
                _ => Err("the store could not be started (unreadable, or its journal could not be replayed)"),
            };
        }
    }

    /// The FSM, for membership and recovery inputs before `run`.
    pub fn fsm_mut(&mut self) -> &mut Server {
        &mut self.fsm
    }

    /// The bound addresses (TCP ports resolved).
    pub fn local_addrs(&self) -> Vec<Addr> {
        self.conns.local_addrs().collect()
    }

    /// Serves until the store fails or the loop itself fails.
    pub fn run(&mut self) -> Stop {
        self.run_with(&mut || {})
    }

    /// Serves with membership from the node's agent: `NodeJoined`,
    /// `NodeLeft` and `ClientGone` on `link` go to the FSM; the loop stops
    /// when the link closes (the server must not outlive its agent).
    /// Frames already buffered in the link are handled first. The link must
    /// be non-blocking (`AgentLink::set_nonblocking`). Allocates nothing.
    pub fn run_with_agent(&mut self, link: AgentLink) -> Stop {
        // Every part of the link lives as long as the loop: nothing is
        // freed while the heap is sealed.
        let AgentLink {
            stream,
            reader,
            frame,
            ..
        } = link;
        self.agent_frame = Some(frame);
        let mut stream = mio::net::UnixStream::from_std(stream);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, AGENT, Interest::READABLE)
        {
            return Stop::Io(e);
        }
        self.agent = Some((stream, reader));
        if !self.read_agent() {
            return Stop::AgentGone;
        }
        self.run_with(&mut || {})
    }

    /// Handles the agent's frames; `false` when the link is gone.
    fn read_agent(&mut self) -> bool {
        let Some((stream, reader)) = self.agent.as_mut() else {
            return true;
        };
        loop {
            loop {
                match reader.next_frame() {
                    Ok(Some(frame)) => match csnap_proto::decode(frame) {
                        Ok((_, csnap_proto::Msg::NodeJoined { node_id })) => {
                            self.fsm.handle_node_joined(node_id);
                        }
                        Ok((_, csnap_proto::Msg::NodeLeft { node_id })) => {
                            self.fsm.handle_node_left(node_id);
                        }
                        Ok((_, csnap_proto::Msg::ClientGone { client_id, node_id })) => {
                            self.fsm.handle_client_gone(client_id, node_id);
                        }
                        Ok((_, csnap_proto::Msg::ClientsOf { node_id, clients })) => {
                            self.fsm.handle_clients_of(node_id, clients);
                        }
                        // Anything else from the agent is not for a
                        // serving server; ignored.
                        _ => {}
                    },
                    Ok(None) => break,
                    Err(_) => return false,
                }
            }
            match stream.read(reader.spare()) {
                Ok(0) => return false,
                Ok(n) => reader.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// As `run`, calling `on_turn` once per loop turn (test hooks).
    pub fn run_with(&mut self, on_turn: &mut dyn FnMut()) -> Stop {
        let mut timeout = None;
        loop {
            on_turn();
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Stop::Io(e);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.fsm.set_now(now);
            self.ready.clear();
            for ev in self.events.iter() {
                self.ready.push((
                    ev.token(),
                    ev.is_readable(),
                    ev.is_writable(),
                    ev.is_read_closed() || ev.is_error(),
                ));
            }
            for k in 0..self.ready.len() {
                let (token, readable, writable, closed) = self.ready[k];
                match token {
                    WAKER => self.drain_replies(),
                    AGENT => {
                        if !self.read_agent() {
                            return Stop::AgentGone;
                        }
                    }
                    Token(t) if (METRICS_BASE..LISTENER_BASE).contains(&t) => {
                        if let Some(m) = self.metrics.as_mut() {
                            m.on_event(token, readable || closed, writable);
                        }
                    }
                    _ => self.conns.on_event(
                        &mut self.fsm,
                        self.poll.registry(),
                        token,
                        readable,
                        writable,
                        closed,
                    ),
                }
            }
            self.drain_replies();
            self.conns
                .resume_paused(&mut self.fsm, self.poll.registry());
            if let Some(stop) = self.pump() {
                return stop;
            }
            timeout = self.metrics_turn();
        }
    }

    fn drain_replies(&mut self) {
        while let Ok(r) = self.replies.try_pop() {
            self.fsm.handle_store_reply(&r);
        }
    }

    /// Moves FSM output to the worker and the sockets.
    fn pump(&mut self) -> Option<Stop> {
        if self.lost_replies.load(Ordering::Relaxed) > 0 {
            eprintln!("csnap server: a store reply was lost (the reply ring was full); stopping (a restart replays the journal)");
            return Some(Stop::StoreFailed);
        }
        while let Some(req) = self.fsm.poll_store_request() {
            if self.requests.push(req).is_err() {
                // Sized for every slot: cannot happen unless the worker died.
                return Some(Stop::StoreFailed);
            }
        }
        self.conns.write_queued(&mut self.fsm, self.poll.registry());
        while let Some(ev) = self.fsm.poll_event() {
            match ev {
                ServerEvent::AutoDeleted { tag } => {
                    eprintln!("csnap server: store full: deleted snapshot {tag} (lowest priority, not in use) to make room");
                }
                ServerEvent::Fenced => {
                    eprintln!(
                        "csnap server: fenced: a newer incarnation serves this store; stopping"
                    );
                    return Some(Stop::Fenced);
                }
                ServerEvent::Corrupt { addr, kind, reason } => {
                    // Heap-free: integers and static strings only.
                    eprintln!("csnap server: problem: {kind} at block {addr}: {reason}; requests that need it fail with an I/O error, the rest are served");
                }
                ServerEvent::StoreFailed => {
                    eprintln!("csnap server: the snapshot store failed; stopping (a restart replays the journal)");
                    return Some(Stop::StoreFailed);
                }
            }
        }
        None
    }
}

impl Drop for ServerLoop {
    fn drop(&mut self) {
        self.requests.close();
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

/// The store worker's end of the reply ring. The ring is sized for every
/// request plus notifications; a reply it refuses all the same is counted,
/// never dropped silently, and the network thread stops on it.
struct ReplySink {
    ring: Ring<StoreReply>,
    lost: Arc<AtomicU64>,
}

impl ReplySink {
    fn push(&self, r: StoreReply) {
        if self.ring.push(r).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// The thread's whole equipment, moved in once.
#[allow(clippy::too_many_arguments)]
fn store_thread<D: Disk, O: Disk>(
    mut worker: StoreWorker<D, O>,
    requests: Ring<StoreRequest>,
    replies: ReplySink,
    waker: Arc<Waker>,
    figures: Arc<crate::metrics::WorkerFigures>,
    filter: Option<csnap_sys::seccomp::Filter>,
    mut batch: Vec<StoreRequest>,
    ready: std::sync::mpsc::SyncSender<Result<(), String>>,
) {
    // Touch this thread's stack budget before serving (with mlockall, the
    // pages stay resident).
    csnap_sys::mem::prefault_stack(WORKER_STACK_BUDGET_BYTES);
    if let Some(f) = filter {
        if let Err(e) = f.install() {
            let _ = ready.send(Err(format!(
                "cannot install the store worker's seccomp filter: {e}"
            )));
            return;
        }
    }
    worker.publish(&figures);
    let _ = ready.send(Ok(()));
    drop(ready);
    let period = std::time::Duration::from_millis(FENCE_RECHECK_MS);
    let mut last_check = std::time::Instant::now();
    loop {
        let first = if worker.has_background_work() {
            match requests.try_pop() {
                Ok(r) => r,
                Err(PopError::Empty) => {
                    worker.background_step();
                    let notified = worker.take_notifications(&mut |r| replies.push(r));
                    if worker.write_home(&mut |r| replies.push(r)) || notified {
                        let _ = waker.wake();
                    }
                    continue;
                }
                Err(PopError::Closed) => return,
            }
        } else {
            match requests.pop_blocking() {
                Ok(r) => r,
                Err(_) => return,
            }
        };
        if last_check.elapsed() >= period {
            // At least once a period, and first thing after an idle gap
            // (a pause, a SIGSTOP): a server taken over stops answering
            // within one period even if it commits nothing.
            worker.request_fence_check();
            last_check = std::time::Instant::now();
        }
        batch.clear();
        batch.push(first);
        while batch.len() < BATCH_MAX {
            let Ok(r) = requests.try_pop() else { break };
            batch.push(r);
        }
        worker.run_batch(&batch, &mut |r| replies.push(r));
        worker.publish(&figures);
        let _ = waker.wake();
        // After the replies are out: the commit's home writes.
        if worker.write_home(&mut |r| replies.push(r)) {
            let _ = waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csnap_fsm::store_ops::StoreResult;

    #[test]
    fn a_reply_the_full_ring_refuses_is_counted_not_dropped_silently() {
        let sink = ReplySink {
            ring: Ring::with_capacity(1),
            lost: Arc::new(AtomicU64::new(0)),
        };
        let reply = |token| StoreReply {
            token,
            result: StoreResult::Done,
        };
        sink.push(reply(1));
        assert_eq!(sink.lost.load(Ordering::Relaxed), 0);
        sink.push(reply(2));
        assert_eq!(
            sink.lost.load(Ordering::Relaxed),
            1,
            "the refused reply is counted"
        );
        assert_eq!(sink.ring.len(), 1);
    }
}
