//! The server's sans-IO state machine: connection sessions, request routing to
//! the store worker, the read-lock table, and replies.
//!
//! # Call order (what the I/O loop does)
//!
//! 1. `handle_accept` for a new connection; a `None` means the client table is
//!    full: send `too_many_clients_frame` best effort and close.
//! 2. For every complete frame of a connection, while `wants_read(conn)`:
//!    `handle_frame(conn, frame)`. A framing error from the frame reader goes to
//!    `handle_bad_stream(conn, err)`.
//! 3. `handle_disconnect(conn)` when the socket closes or fails.
//! 4. Every store-worker reply, in the order the worker produced them:
//!    `handle_store_reply(reply)`.
//! 5. After any of the above: drain `poll_store_request` into the worker's ring,
//!    then for each `poll_output` connection write `output(conn)` and
//!    `consume_output(conn, n)`; close connections from `poll_close` once their
//!    output is written; log `poll_event`s.
//!
//! Nothing here blocks, allocates after `new`, reads a clock or touches a
//! socket or disk.
//!
//! # Session states
//!
//! | state | entered on | accepts |
//! |---|---|---|
//! | `ExpectHello` | accept | `Hello` |
//! | `ExpectIdentify` | `Hello` with role Client | `Identify`, control requests |
//! | `Identifying(tag)` | `Identify` of a snapshot (store checks the tag) | nothing new until the store answers (frames wait: `wants_read` is false) |
//! | `Origin` | `Identify` of the origin | `QueryOriginWrite`, control requests |
//! | `Snapshot(tag)` | the store confirmed the snapshot | `QuerySnapshotRead`, `FinishSnapshotRead`, `QuerySnapshotWrite`, `UploadLocks`, `FinishUpload`, control requests |
//! | `Control` | `Hello` with role Control or Agent | control requests (create, delete, priority, list, status) |
//! | `Closing` | a fatal framing error or a failed handshake | nothing; closed once its output is written |
//!
//! # Requests in flight
//!
//! Each request that needs the store takes a slot (`Inflight`) from a slab of
//! `clients × requests_per_client`; the slot index is the token the store
//! worker echoes. An origin write whose copy-out has committed waits in its
//! slot for the read locks that cover its chunks (`Waiting`). A slot whose
//! connection went away while the store worked on it is orphaned and dropped
//! when the reply comes back.

use core::fmt::Write as _;

use csnap_pools::slab::Slab;
use csnap_pools::CHUNKS_PER_REQUEST_MAX;
use csnap_proto::{
    self as proto, encode, negotiate, DecodeError, ErrorCode, ErrorText, Header, Kind, Msg, Range,
    Role, ServerState, SnapInfo, Target, TargetKind, Volume,
};

use crate::conns::{self, ConnTable, SlotState};
use crate::fixed::FixedRing;
use crate::locks::{LockLimits, LockTable};
use crate::store_ops::{
    StoreFailure, StoreOp, StoreReply, StoreRequest, StoreResult, Target as StoreTarget,
    DELTA_BITMAP_BYTES,
};

/// A connection handle (index into the session table).
pub type ConnId = u32;

/// Token of store replies that answer no request (notifications).
pub const NOTIFY_TOKEN: u32 = u32::MAX;
/// Token of store requests whose reply nobody waits for.
pub const DETACHED_TOKEN: u32 = u32::MAX - 1;

/// Bytes of the largest reply the server sends: a snapshot read reply naming
/// every chunk of a maximal query as its own target.
pub const REPLY_MAX_BYTES: usize =
    proto::HEADER_BYTES + proto::LIST_HEADER_BYTES + CHUNKS_PER_REQUEST_MAX * 24;

// A delta reply fits the reply bound, and the protocol's delta bound is
// the pools'.
const _: () =
    assert!(proto::HEADER_BYTES + 16 + csnap_pools::DELTA_QUERY_CHUNKS_MAX / 8 <= REPLY_MAX_BYTES);
const _: () = assert!(proto::DELTA_CHUNKS_MAX == csnap_pools::DELTA_QUERY_CHUNKS_MAX);

/// Configuration, fixed at init.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// Connections served at once.
    pub clients: usize,
    /// Requests one connection may have in flight.
    pub requests_per_client: usize,
    /// Read locks held at once.
    pub read_locks: usize,
    /// This server's incarnation (in every reply).
    pub incarnation: u64,
    /// The store's id.
    pub server_id: u64,
    /// Chunk size.
    pub chunk_size_bytes: u32,
    /// Origin size.
    pub origin_size_bytes: u64,
    /// The origin's id, which clients must present.
    pub origin_uuid: [u8; 16],
}

impl ServerConfig {
    fn origin_chunks(&self) -> u64 {
        self.origin_size_bytes / u64::from(self.chunk_size_bytes)
    }
}

/// What the server wants logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// The store-full policy deleted this snapshot.
    AutoDeleted {
        /// Its tag.
        tag: u32,
    },
    /// The store failed; the server must stop serving.
    StoreFailed,
    /// A newer incarnation took the store over; the server must stop.
    Fenced,
    /// A corrupt metadata block failed the request that met it.
    Corrupt {
        /// Block address.
        addr: u64,
        /// What the block was expected to be.
        kind: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Slot unused.
    Free,
    /// Waiting for `Hello`.
    ExpectHello,
    /// A client that has not identified yet.
    ExpectIdentify,
    /// The store is checking the snapshot a client identified with.
    Identifying(u32),
    /// Attached to the origin.
    Origin,
    /// Attached to a snapshot.
    Snapshot(u32),
    /// A control or agent connection.
    Control,
    /// Closed once its output is written.
    Closing,
}

#[derive(Debug)]
struct Session {
    state: SessionState,
    client_id: u64,
    node_id: u32,
    inflight: u32,
    snapshot_open: Option<u32>,
    /// The client caches grants and mappings (Identify flag): it answers
    /// `Revoke` and `ReleaseLocks`, and its snapshot reads lock every chunk.
    caching: bool,
    /// A `Revoke` of its origin grants awaits its `RevokeDone`.
    revoke_owed: bool,
    /// Its agent said its process is gone (`handle_client_gone`) while the
    /// connection was still open: when it closes, nothing is kept for it.
    gone: bool,
}

impl Session {
    const FREE: Session = Session {
        state: SessionState::Free,
        client_id: 0,
        node_id: 0,
        inflight: 0,
        snapshot_open: None,
        caching: false,
        revoke_owed: false,
        gone: false,
    };
}

impl SlotState for Session {
    const FREE: Self = Session::FREE;
    const EXPECT_HELLO: Self = Session {
        state: SessionState::ExpectHello,
        ..Session::FREE
    };
    fn is_free(&self) -> bool {
        self.state == SessionState::Free
    }
    fn is_closing(&self) -> bool {
        self.state == SessionState::Closing
    }
    fn set_closing(&mut self) {
        self.state = SessionState::Closing;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InflightKind {
    OriginWrite,
    SnapshotRead,
    SnapshotWrite,
    Identify,
    Control(Kind),
    Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InflightState {
    AtStore,
    Waiting,
    /// Copy-out committed; held until the recovery barrier lifts.
    Barrier,
    /// Copy-out committed; held until the snapshot being created is
    /// committed (then copied out again for it).
    HeldForCreate,
}

/// A snapshot creation under way: caching origin clients are told to forget
/// their grants and to finish the writes made under them; the create goes
/// to the store once every one has answered (or left), and origin writes
/// are not granted until it has committed.
#[derive(Debug, Clone, Copy)]
struct PendingCreate {
    conn: ConnId,
    request_id: u64,
    tag: u32,
    revoke_id: u64,
    /// Answers still owed (connected sessions and parked `owed` entries).
    waiting: u32,
    /// The store request's token once dispatched.
    token: Option<u32>,
}

/// A disconnected client whose read locks are kept (its node is still a
/// member): it may come back and adopt them.
#[derive(Debug, Clone, Copy)]
struct Parked {
    client_id: u64,
    node_id: u32,
}

/// A client of the former incarnation that the recovery barrier waits for.
#[derive(Debug, Clone, Copy)]
struct Expected {
    client_id: u64,
    node_id: u32,
    done: bool,
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    conn: Option<ConnId>,
    request_id: u64,
    kind: InflightKind,
    state: InflightState,
    range: Range,
    tag: u32,
    /// For origin writes: the create epoch its copy-out ran in.
    epoch: u64,
    /// For snapshot writes: the read locks on its chunks were drained once
    /// after its mapping change; the next store answer is the reply.
    rechecked: bool,
}

/// The server state machine.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    state: ServerState,
    sessions: ConnTable<Session>,
    inflight: Slab<Inflight>,
    locks: LockTable,
    store_q: FixedRing<StoreRequest>,
    events: FixedRing<ServerEvent>,
    scratch: Vec<u8>,
    woken: Vec<u32>,
    identified: u32,
    waiting_writes: u32,
    failed: bool,
    now_secs: u64,
    parked: Vec<Option<Parked>>,
    members: Vec<u32>,
    membership_known: bool,
    expected: Vec<Expected>,
    barrier_writes: u32,
    /// Snapshot creations committed (origin write grants of an older epoch
    /// are copied out again before they go out).
    epoch: u64,
    create: Option<PendingCreate>,
    next_revoke_id: u64,
    held_writes: u32,
    last_dispatched: u32,
    end_create_after_reply: Option<bool>,
    /// An origin session that must get the pending creation's `Revoke`
    /// right after its `IdentifyOk`.
    revoke_after_identify: Option<ConnId>,
    /// `ReleaseLocks` to send once the current reply is out.
    release_requests: Vec<(ConnId, u64)>,
    /// Caching origin clients that disconnected owing a `RevokeDone` while
    /// their node is a member: (client id, node).
    owed: Vec<(u64, u32)>,
}

/// Whether a request kind is a control request any session may send.
fn is_control(k: Kind) -> bool {
    matches!(
        k,
        Kind::CreateSnapshot
            | Kind::DeleteSnapshot
            | Kind::SetPriority
            | Kind::ListSnapshots
            | Kind::Status
            | Kind::QueryDelta
    )
}

fn error_code(f: StoreFailure) -> ErrorCode {
    match f {
        StoreFailure::NoSuchSnapshot => ErrorCode::NoSuchSnapshot,
        StoreFailure::SnapshotExists => ErrorCode::SnapshotExists,
        StoreFailure::TooManySnapshots => ErrorCode::TooManySnapshots,
        StoreFailure::OutOfRange => ErrorCode::OutOfRange,
        StoreFailure::StoreFull => ErrorCode::StoreFull,
        StoreFailure::InUse => ErrorCode::Busy,
        StoreFailure::Internal => ErrorCode::Internal,
        StoreFailure::Fenced => ErrorCode::StaleIncarnation,
        StoreFailure::Corrupt => ErrorCode::Corrupt,
    }
}

fn failure_text(f: StoreFailure) -> &'static str {
    match f {
        StoreFailure::NoSuchSnapshot => "no such snapshot",
        StoreFailure::SnapshotExists => "a snapshot with this tag exists",
        StoreFailure::TooManySnapshots => "the snapshot table is full (live and deleting snapshots count)",
        StoreFailure::OutOfRange => "chunk past the end of the origin",
        StoreFailure::StoreFull => {
            "snapshot store full: the copy-out was refused, the origin write must fail"
        }
        StoreFailure::InUse => "the snapshot is in use by a client; detach it first",
        StoreFailure::Internal => "the snapshot store failed; the server stops",
        StoreFailure::Fenced => {
            "this server was fenced: a newer incarnation serves the store; reconnect through your agent"
        }
        StoreFailure::Corrupt => {
            "the snapshot store's metadata is corrupt at a block this request needs (the server log names it)"
        }
    }
}

impl Server {
    /// Reserves every table. The only allocation.
    pub fn new(cfg: ServerConfig) -> Server {
        assert!(cfg.clients > 0 && cfg.clients <= csnap_pools::CLIENTS_MAX);
        assert!(
            cfg.requests_per_client > 0
                && cfg.requests_per_client <= csnap_pools::REQUESTS_PER_CLIENT_MAX
        );
        assert!(cfg.chunk_size_bytes.is_power_of_two());
        let slots = cfg.clients * cfg.requests_per_client;
        let out_cap = (cfg.requests_per_client + 4) * REPLY_MAX_BYTES;
        let sessions = ConnTable::new(cfg.clients, out_cap);
        Server {
            cfg,
            state: ServerState::Serving,
            sessions,
            inflight: Slab::with_capacity(slots),
            // Owners 0..clients are connections; clients..2*clients hold
            // the locks of parked (disconnected, still member) clients.
            locks: LockTable::new(LockLimits {
                locks: cfg.read_locks,
                waits: cfg.read_locks,
                owners: 2 * cfg.clients,
                pendings: slots,
            }),
            // Every slot, plus one identify and one detach per connection.
            store_q: FixedRing::new(slots + 2 * cfg.clients + 1),
            events: FixedRing::new(64),
            scratch: vec![0u8; REPLY_MAX_BYTES],
            woken: Vec::with_capacity(slots),
            identified: 0,
            waiting_writes: 0,
            failed: false,
            now_secs: 0,
            parked: vec![None; cfg.clients],
            members: Vec::with_capacity(csnap_pools::CLIENTS_MAX),
            membership_known: false,
            expected: Vec::with_capacity(Self::expected_capacity(&cfg)),
            barrier_writes: 0,
            epoch: 0,
            create: None,
            next_revoke_id: 1,
            held_writes: 0,
            last_dispatched: 0,
            end_create_after_reply: None,
            revoke_after_identify: None,
            release_requests: Vec::with_capacity(CHUNKS_PER_REQUEST_MAX),
            owed: Vec::with_capacity(Self::owed_capacity(&cfg)),
        }
    }

    /// Bytes reserved by `new` for this configuration, one line per pool.
    /// Entries of the recovery barrier's list: a start names at most
    /// `START_LIST_MAX` clients (the agent refuses more), so none is ever
    /// dropped.
    fn expected_capacity(cfg: &ServerConfig) -> usize {
        csnap_pools::START_LIST_MAX.max(2 * cfg.clients)
    }

    /// Absent caching writers: every client a start lists, plus one per
    /// session that can disconnect owing answers.
    fn owed_capacity(cfg: &ServerConfig) -> usize {
        csnap_pools::START_LIST_MAX + cfg.clients
    }

    pub fn reserved_items(cfg: &ServerConfig) -> [(&'static str, usize); 8] {
        let slots = cfg.clients * cfg.requests_per_client;
        [
            (
                "server sessions",
                cfg.clients * core::mem::size_of::<Session>(),
            ),
            (
                "reply output buffers",
                cfg.clients * (cfg.requests_per_client + 4) * REPLY_MAX_BYTES,
            ),
            (
                "in-flight request slots",
                slots * (core::mem::size_of::<Option<Inflight>>() + 4),
            ),
            (
                "read locks, holds and waits",
                cfg.read_locks * 2 * (48 + 8 + 12),
            ),
            (
                "store request queue",
                (slots + 2 * cfg.clients + 1) * core::mem::size_of::<Option<StoreRequest>>(),
            ),
            ("list scratch", REPLY_MAX_BYTES),
            ("woken-writes list", slots * 4),
            (
                "recovery list and absent writers",
                Self::expected_capacity(cfg) * core::mem::size_of::<Expected>()
                    + Self::owed_capacity(cfg) * 12,
            ),
        ]
    }

    /// Total of `reserved_items`.
    pub fn reserved_bytes(cfg: &ServerConfig) -> usize {
        Self::reserved_items(cfg).iter().map(|(_, b)| b).sum()
    }

    /// The state of a connection.
    pub fn session_state(&self, conn: ConnId) -> SessionState {
        self.sessions[conn as usize].state
    }

    /// Identified client connections.
    pub fn clients(&self) -> u32 {
        self.identified
    }

    /// Chunks read-locked now.
    pub fn read_locks(&self) -> usize {
        self.locks.locked_chunks()
    }

    /// The client ids holding read locks on `chunk` (a parked client's id
    /// too), for diagnostics.
    pub fn lock_holders(&self, chunk: u64, f: &mut dyn FnMut(u64, bool)) {
        let clients = self.cfg.clients;
        self.locks.for_each_holder(chunk, &mut |o| {
            let o = o as usize;
            if o < clients {
                f(self.sessions[o].client_id, false);
            } else if let Some(p) = self.parked.get(o - clients).copied().flatten() {
                f(p.client_id, true);
            }
        });
    }

    /// Writes waiting for read locks.
    pub fn waiting_writes(&self) -> u32 {
        self.waiting_writes
    }

    /// Whether the store failed (the server must stop).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Sets what a standby learns only when it starts (the store's geometry
    /// and the new incarnation). Allocates nothing.
    pub fn configure(
        &mut self,
        incarnation: u64,
        server_id: u64,
        chunk_size_bytes: u32,
        origin_size_bytes: u64,
        origin_uuid: [u8; 16],
    ) {
        assert!(chunk_size_bytes.is_power_of_two());
        self.cfg.incarnation = incarnation;
        self.cfg.server_id = server_id;
        self.cfg.chunk_size_bytes = chunk_size_bytes;
        self.cfg.origin_size_bytes = origin_size_bytes;
        self.cfg.origin_uuid = origin_uuid;
    }

    /// Whether the server is serving or waiting at the recovery barrier.
    pub fn state(&self) -> ServerState {
        self.state
    }

    /// Origin writes held at the recovery barrier.
    pub fn barrier_writes(&self) -> u32 {
        self.barrier_writes
    }

    /// Clients whose read locks are kept while they are away.
    pub fn parked_clients(&self) -> usize {
        self.parked.iter().flatten().count()
    }

    // -- membership and recovery ---------------------------------------------

    /// Membership says `node` is in the cluster. From the first membership
    /// event on, a client that disconnects while its node is a member keeps
    /// its read locks until it comes back or its node leaves; before any, a
    /// disconnect releases them at once.
    pub fn handle_node_joined(&mut self, node: u32) {
        self.membership_known = true;
        if !self.members.contains(&node) && self.members.len() < self.members.capacity() {
            self.members.push(node);
        }
        self.assert_invariants();
    }

    /// Membership says `node` left the cluster (and was fenced): the read
    /// locks of its snapshot clients are released, parked or connected, and
    /// the connected ones are closed (their locks are no longer honoured; a
    /// client there that asks its agent again is refused); writes that
    /// waited for those locks proceed. The recovery barrier stops waiting
    /// for its clients.
    pub fn handle_node_left(&mut self, node: u32) {
        self.membership_known = true;
        self.members.retain(|&m| m != node);
        let clients = self.cfg.clients;
        let mut woken = core::mem::take(&mut self.woken);
        for p in 0..self.parked.len() {
            if self.parked[p].is_some_and(|x| x.node_id == node) {
                self.parked[p] = None;
                let owner = u32::try_from(clients + p).unwrap_or(u32::MAX);
                self.locks.release_owner(owner, &mut |w| woken.push(w));
            }
        }
        for i in 0..self.sessions.len() {
            let s = &self.sessions[i];
            let snapshot_client = matches!(
                s.state,
                SessionState::Snapshot(_) | SessionState::Identifying(_)
            );
            if !snapshot_client || s.node_id != node {
                continue;
            }
            let Ok(conn) = ConnId::try_from(i) else {
                continue;
            };
            self.locks.release_owner(conn, &mut |w| woken.push(w));
            self.close(conn);
        }
        // A closed client's own waiting writes (snapshot writes) are not
        // granted: they are dropped when its connection closes.
        let sessions = &self.sessions;
        let inflight = &self.inflight;
        woken.retain(|&w| {
            inflight
                .get(w)
                .and_then(|f| f.conn)
                .is_none_or(|c| sessions[c as usize].state != SessionState::Closing)
        });
        for w in woken.drain(..) {
            self.locks_clear(w);
        }
        self.woken = woken;
        for e in &mut self.expected {
            if e.node_id == node {
                e.done = true;
            }
        }
        self.maybe_end_recovery();
        self.settle_owed(|&(_, n)| n == node);
        self.assert_invariants();
    }

    /// The agent of `node` says client `client_id` is gone for good (its
    /// process closed its agent link): locks parked for it are released and
    /// the recovery barrier stops waiting for it.
    pub fn handle_client_gone(&mut self, client_id: u64, node: u32) {
        let clients = self.cfg.clients;
        let mut woken = core::mem::take(&mut self.woken);
        for p in 0..self.parked.len() {
            if self.parked[p].is_some_and(|x| x.client_id == client_id && x.node_id == node) {
                self.parked[p] = None;
                let owner = u32::try_from(clients + p).unwrap_or(u32::MAX);
                self.locks.release_owner(owner, &mut |w| woken.push(w));
            }
        }
        for w in woken.drain(..) {
            self.locks_clear(w);
        }
        self.woken = woken;
        self.settle_owed(|&(c, n)| c == client_id && n == node);
        // Its connection may not have closed yet (the agent's word can
        // come first): then it keeps its locks until it closes, and then
        // nothing is parked or owed for it.
        for s in &mut self.sessions {
            if s.client_id == client_id
                && s.node_id == node
                && matches!(
                    s.state,
                    SessionState::Origin | SessionState::Snapshot(_) | SessionState::Identifying(_)
                )
            {
                s.gone = true;
            }
        }
        // Its process is gone (or going): the barrier stops waiting for it.
        // Locks it already uploaded on a live connection stay until that
        // connection closes.
        for e in &mut self.expected {
            if e.client_id == client_id && e.node_id == node {
                e.done = true;
            }
        }
        self.maybe_end_recovery();
        self.assert_invariants();
    }

    /// A new incarnation starts: until every listed snapshot client of the
    /// former incarnation has reconnected and finished its lock upload, or
    /// its node has left, no origin write is granted (its copy-out may
    /// proceed). Identify, lock uploads and snapshot reads are served at once.
    pub fn begin_recovery(&mut self, expected: &[(u64, u32)]) {
        // The start list is bounded by the protocol (`START_LIST_MAX`) and
        // both tables are sized for all of it: dropping an entry would
        // open the barrier early.
        assert!(
            expected.len() <= self.expected.capacity()
                && expected.len() <= self.owed.capacity().saturating_sub(self.owed.len()),
            "a start lists {} clients, more than the recovery tables hold",
            expected.len()
        );
        // Every listed client may be a caching origin client of the former
        // incarnation with writes it acknowledged: snapshot creations wait
        // for it to identify again (or leave).
        for &(c, n) in expected {
            if !self.owed.contains(&(c, n)) && self.owed.len() < self.owed.capacity() {
                self.owed.push((c, n));
            }
        }
        self.expected.clear();
        for &(client_id, node_id) in expected.iter().take(self.expected.capacity()) {
            self.expected.push(Expected {
                client_id,
                node_id,
                done: false,
            });
        }
        self.state = ServerState::Recovering;
        self.maybe_end_recovery();
        self.assert_invariants();
    }

    fn maybe_end_recovery(&mut self) {
        if self.state != ServerState::Recovering || self.expected.iter().any(|e| !e.done) {
            return;
        }
        self.state = ServerState::Serving;
        self.expected.clear();
        // Writes held at the barrier now check the (uploaded) locks.
        for k in 0..self.inflight.capacity() {
            let Ok(token) = u32::try_from(k) else { break };
            if let Some(f) = self.inflight.get(token).copied() {
                if f.state == InflightState::Barrier {
                    self.barrier_writes -= 1;
                    if let Some(x) = self.inflight.get_mut(token) {
                        x.state = InflightState::AtStore;
                    }
                    if let Some(conn) = f.conn {
                        self.check_locks_and_grant(token, conn, f);
                    }
                }
            }
        }
    }

    // -- inputs ----------------------------------------------------------------

    /// A new connection. `None`: the client table is full.
    pub fn handle_accept(&mut self) -> Option<ConnId> {
        let conn = self.sessions.accept()?;
        self.assert_invariants();
        Some(conn)
    }

    /// The frame to send to a connection refused by `handle_accept`.
    pub fn too_many_clients_frame(&self, out: &mut [u8]) -> usize {
        let msg = Msg::Error {
            code: ErrorCode::TooManyClients,
            culprit: 0,
            text: "the server serves its maximum number of clients; try again later",
        };
        encode(&Header::new(0, self.cfg.incarnation), &msg, out).unwrap_or(0)
    }

    /// Whether the loop should read and hand over more frames of `conn`.
    pub fn wants_read(&self, conn: ConnId) -> bool {
        let s = &self.sessions[conn as usize];
        match s.state {
            SessionState::Free | SessionState::Closing | SessionState::Identifying(_) => false,
            _ => {
                let free = self.sessions.out_free(conn);
                (s.inflight as usize) < self.cfg.requests_per_client
                    && free >= (s.inflight as usize + 2) * REPLY_MAX_BYTES
            }
        }
    }

    /// The frame reader of `conn` failed: garbage, a bad version, or a
    /// frame over the maximum. Answers with an error and closes.
    pub fn handle_bad_stream(&mut self, conn: ConnId, err: &DecodeError) {
        let t = conns::bad_stream_text(err);
        self.send_error(conn, 0, err.code(), err.culprit(), t.as_str());
        self.close(conn);
        self.assert_invariants();
    }

    /// A complete frame from `conn`.
    pub fn handle_frame(&mut self, conn: ConnId, frame: &[u8]) {
        if self.sessions.is_gone(conn) {
            return;
        }
        match proto::decode(frame) {
            Ok((hdr, msg)) => self.on_msg(conn, &hdr, &msg),
            Err(e) => {
                let (request_id, t) = conns::decode_error_reply(frame, &e);
                self.send_error(conn, request_id, e.code(), e.culprit(), t.as_str());
                if e.is_fatal() {
                    self.close(conn);
                }
            }
        }
        self.assert_invariants();
    }

    fn on_msg(&mut self, conn: ConnId, hdr: &Header, msg: &Msg<'_>) {
        let rid = hdr.request_id;
        let kind = msg.kind();
        let st = self.sessions[conn as usize].state;
        if kind.is_reply() {
            let mut t = ErrorText::new();
            let _ = write!(t, "{} is a reply; clients send requests", kind.name());
            self.send_error(conn, rid, ErrorCode::BadFrame, kind.code(), t.as_str());
            return;
        }
        match (st, msg) {
            (
                SessionState::ExpectHello,
                Msg::Hello {
                    version_min,
                    version_max,
                    role,
                },
            ) => match negotiate(*version_min, *version_max) {
                Some(version) => {
                    self.sessions[conn as usize].state = match role {
                        Role::Client => SessionState::ExpectIdentify,
                        Role::Control | Role::Agent | Role::Server => SessionState::Control,
                    };
                    self.send(
                        conn,
                        rid,
                        &Msg::HelloOk {
                            version,
                            server_id: self.cfg.server_id,
                        },
                    );
                }
                None => {
                    let mut t = ErrorText::new();
                    let _ = write!(
                        t,
                        "no common protocol version: client speaks {version_min}..={version_max}, server speaks {}",
                        proto::PROTOCOL_VERSION
                    );
                    self.send_error(conn, rid, ErrorCode::BadVersion, kind.code(), t.as_str());
                    self.close(conn);
                }
            },
            (SessionState::ExpectHello, _) => self.send_error(
                conn,
                rid,
                ErrorCode::NotIdentified,
                kind.code(),
                "send Hello first",
            ),
            (_, Msg::Hello { .. }) => self.send_error(
                conn,
                rid,
                ErrorCode::AlreadyIdentified,
                kind.code(),
                "Hello was already received on this connection",
            ),
            (
                SessionState::ExpectIdentify,
                Msg::Identify {
                    client_id,
                    node_id,
                    volume,
                    origin_uuid,
                    volume_size_bytes,
                    chunk_size_bytes,
                    flags,
                },
            ) => {
                self.sessions[conn as usize].caching = flags & proto::IDENTIFY_CACHING != 0;
                self.on_identify(
                    conn,
                    rid,
                    *client_id,
                    *node_id,
                    *volume,
                    origin_uuid,
                    *volume_size_bytes,
                    *chunk_size_bytes,
                );
            }
            (_, Msg::Identify { .. }) => {
                let (code, text) = if st == SessionState::Control {
                    (
                        ErrorCode::Unsupported,
                        "control connections do not attach to volumes",
                    )
                } else {
                    (
                        ErrorCode::AlreadyIdentified,
                        "this connection is already attached to a volume",
                    )
                };
                self.send_error(conn, rid, code, kind.code(), text);
            }
            (_, m) if is_control(kind) => self.on_control(conn, rid, m),
            (SessionState::ExpectIdentify, _) => self.send_error(
                conn,
                rid,
                ErrorCode::NotIdentified,
                kind.code(),
                "send Identify before data requests",
            ),
            (SessionState::Control, _) => self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                kind.code(),
                "control connections send only control requests",
            ),
            (SessionState::Origin, Msg::QueryOriginWrite(r)) => {
                if let Some(range) = self.one_range(conn, rid, kind, r) {
                    self.dispatch(
                        conn,
                        rid,
                        InflightKind::OriginWrite,
                        range,
                        StoreOp::OriginWrite {
                            chunk: range.chunk,
                            chunks: range.chunks,
                        },
                    );
                }
            }
            (SessionState::Snapshot(tag), Msg::QuerySnapshotRead(r)) => {
                if let Some(range) = self.one_range(conn, rid, kind, r) {
                    self.dispatch(
                        conn,
                        rid,
                        InflightKind::SnapshotRead,
                        range,
                        StoreOp::SnapshotRead {
                            tag,
                            chunk: range.chunk,
                            chunks: range.chunks,
                        },
                    );
                }
            }
            (SessionState::Snapshot(tag), Msg::QuerySnapshotWrite(r)) => {
                if let Some(range) = self.one_range(conn, rid, kind, r) {
                    self.dispatch(
                        conn,
                        rid,
                        InflightKind::SnapshotWrite,
                        range,
                        StoreOp::SnapshotWrite {
                            tag,
                            chunk: range.chunk,
                            chunks: range.chunks,
                        },
                    );
                }
            }
            (SessionState::Snapshot(_), Msg::FinishSnapshotRead(ranges)) => {
                // Every listed hold is released; one not held is reported
                // once, after the rest of the list was processed.
                let mut not_held: Option<u64> = None;
                for r in ranges.iter() {
                    for c in r.chunk..r.end() {
                        let mut woken = core::mem::take(&mut self.woken);
                        let res = self.locks.release(c, conn, &mut |p| woken.push(p));
                        for p in woken.drain(..) {
                            self.locks_clear(p);
                        }
                        self.woken = woken;
                        if res.is_err() && not_held.is_none() {
                            not_held = Some(c);
                        }
                    }
                }
                if let Some(c) = not_held {
                    let mut t = ErrorText::new();
                    let _ = write!(t, "no read lock held on chunk {c}");
                    self.send_error(conn, rid, ErrorCode::BadFrame, kind.code(), t.as_str());
                }
            }
            (SessionState::Snapshot(_), Msg::UploadLocks(ranges)) => {
                let n: u64 = ranges.total_chunks();
                if !self
                    .locks
                    .has_room(usize::try_from(n).unwrap_or(usize::MAX))
                {
                    self.send_error(
                        conn,
                        rid,
                        ErrorCode::Busy,
                        kind.code(),
                        "read-lock table full",
                    );
                    return;
                }
                // One hold per listed chunk (a chunk held twice is listed
                // twice). Room was checked above. Locks parked for this
                // client from an earlier connection are released at its
                // FinishUpload, so nothing is counted twice for long.
                for r in ranges.iter() {
                    for c in r.chunk..r.end() {
                        let _ = self.locks.acquire(c, conn);
                    }
                }
            }
            (SessionState::Snapshot(_), Msg::FinishUpload) => {
                let id = self.sessions[conn as usize].client_id;
                // What was parked for this client is replaced by its upload.
                let clients = self.cfg.clients;
                let mut woken = core::mem::take(&mut self.woken);
                for p in 0..self.parked.len() {
                    if self.parked[p].is_some_and(|x| x.client_id == id) {
                        self.parked[p] = None;
                        let owner = u32::try_from(clients + p).unwrap_or(u32::MAX);
                        self.locks.release_owner(owner, &mut |w| woken.push(w));
                    }
                }
                for w in woken.drain(..) {
                    self.locks_clear(w);
                }
                self.woken = woken;
                for e in &mut self.expected {
                    if e.client_id == id {
                        e.done = true;
                    }
                }
                self.send(conn, rid, &Msg::UploadOk);
                self.maybe_end_recovery();
            }
            (SessionState::Origin, Msg::RevokeDone) => {
                let s = &mut self.sessions[conn as usize];
                if s.revoke_owed && self.create.is_some_and(|c| c.revoke_id == rid) {
                    s.revoke_owed = false;
                    if let Some(c) = self.create.as_mut() {
                        c.waiting -= 1;
                    }
                    self.maybe_dispatch_create();
                }
            }
            (SessionState::Origin, _) => self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                kind.code(),
                "an origin client sends QueryOriginWrite and control requests",
            ),
            (SessionState::Snapshot(_), _) => self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                kind.code(),
                "a snapshot client sends snapshot reads, writes, releases and lock uploads",
            ),
            _ => self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                kind.code(),
                "not accepted in this connection state",
            ),
        }
    }

    /// Data queries name one range of at most `CHUNKS_PER_REQUEST_MAX` chunks
    /// inside the origin.
    fn one_range(
        &mut self,
        conn: ConnId,
        rid: u64,
        kind: Kind,
        ranges: &proto::Ranges<'_>,
    ) -> Option<Range> {
        let r = match (ranges.len(), ranges.get(0)) {
            (1, Some(r)) => r,
            _ => {
                self.send_error(
                    conn,
                    rid,
                    ErrorCode::Unsupported,
                    kind.code(),
                    "a data query names exactly one range",
                );
                return None;
            }
        };
        if r.chunks as usize > CHUNKS_PER_REQUEST_MAX {
            let mut t = ErrorText::new();
            let _ = write!(t, "a query covers at most {CHUNKS_PER_REQUEST_MAX} chunks");
            self.send_error(conn, rid, ErrorCode::TooLarge, kind.code(), t.as_str());
            return None;
        }
        if r.end() > self.cfg.origin_chunks() {
            let mut t = ErrorText::new();
            let _ = write!(
                t,
                "chunks {}..{} are past the end of the volume ({} chunks)",
                r.chunk,
                r.end(),
                self.cfg.origin_chunks()
            );
            self.send_error(conn, rid, ErrorCode::OutOfRange, kind.code(), t.as_str());
            return None;
        }
        Some(r)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_identify(
        &mut self,
        conn: ConnId,
        rid: u64,
        client_id: u64,
        node_id: u32,
        volume: Volume,
        origin_uuid: &[u8; 16],
        volume_size_bytes: u64,
        chunk_size_bytes: u32,
    ) {
        let code = Kind::Identify.code();
        if *origin_uuid != self.cfg.origin_uuid {
            self.send_error(
                conn,
                rid,
                ErrorCode::GeometryMismatch,
                code,
                "the client's origin is not the origin of this store (origin UUID differs)",
            );
            return;
        }
        if chunk_size_bytes != 0 && chunk_size_bytes != self.cfg.chunk_size_bytes {
            let mut t = ErrorText::new();
            let _ = write!(
                t,
                "chunk size {chunk_size_bytes} differs from the store's {}",
                self.cfg.chunk_size_bytes
            );
            self.send_error(conn, rid, ErrorCode::GeometryMismatch, code, t.as_str());
            return;
        }
        if volume_size_bytes != 0 && volume_size_bytes != self.cfg.origin_size_bytes {
            let mut t = ErrorText::new();
            let _ = write!(
                t,
                "volume size {volume_size_bytes} differs from the origin's {}",
                self.cfg.origin_size_bytes
            );
            self.send_error(conn, rid, ErrorCode::GeometryMismatch, code, t.as_str());
            return;
        }
        let s = &mut self.sessions[conn as usize];
        s.client_id = client_id;
        s.node_id = node_id;
        match volume {
            Volume::Origin => {
                s.state = SessionState::Origin;
                self.identified += 1;
                // An absent caching writer is back. It reconnects only after
                // the writes it had on the disk have landed; writes it
                // acknowledged but had not sent yet come again now. With a
                // creation pending it is asked to answer like everyone
                // else (its owed entry becomes its revoke); otherwise it
                // is simply no longer absent.
                let was_owed = self.owed.contains(&(client_id, node_id));
                if was_owed && self.create.is_some() && self.sessions[conn as usize].caching {
                    self.owed.retain(|&e| e != (client_id, node_id));
                    self.sessions[conn as usize].revoke_owed = true;
                    self.revoke_after_identify = Some(conn);
                } else {
                    self.settle_owed(|&(c, n)| c == client_id && n == node_id);
                }
                // An origin client of the former incarnation is back: it has
                // no read locks to upload.
                for e in &mut self.expected {
                    if e.client_id == client_id && e.node_id == node_id {
                        e.done = true;
                    }
                }
                self.maybe_end_recovery();
                self.send_identify_ok(conn, rid);
                if self.revoke_after_identify.take() == Some(conn) {
                    if let Some(c) = self.create {
                        self.send(
                            conn,
                            c.revoke_id,
                            &Msg::Revoke {
                                what: proto::RevokeWhat::OriginGrants,
                                ranges: proto::Ranges::empty(),
                            },
                        );
                    }
                }
            }
            Volume::Snapshot(tag) => {
                s.state = SessionState::Identifying(tag);
                let range = Range {
                    chunk: 0,
                    chunks: 1,
                };
                self.dispatch(
                    conn,
                    rid,
                    InflightKind::Identify,
                    range,
                    StoreOp::Use { tag, open: true },
                );
            }
        }
    }

    fn send_identify_ok(&mut self, conn: ConnId, rid: u64) {
        self.send(
            conn,
            rid,
            &Msg::IdentifyOk {
                chunk_size_bytes: self.cfg.chunk_size_bytes,
                origin_size_bytes: self.cfg.origin_size_bytes,
                volume_size_bytes: self.cfg.origin_size_bytes,
            },
        );
    }

    fn on_control(&mut self, conn: ConnId, rid: u64, m: &Msg<'_>) {
        let kind = m.kind();
        if let Msg::CreateSnapshot { tag } = *m {
            self.begin_create(conn, rid, tag);
            return;
        }
        let op = match *m {
            Msg::CreateSnapshot { tag } => StoreOp::Create { tag, now_secs: 0 },
            Msg::DeleteSnapshot { tag } => StoreOp::Delete { tag },
            Msg::SetPriority { tag, priority } => StoreOp::Priority { tag, priority },
            Msg::ListSnapshots => StoreOp::List,
            Msg::Status => StoreOp::Status,
            Msg::QueryDelta {
                volume,
                base,
                chunk,
                chunks,
            } => StoreOp::Delta {
                volume: match volume {
                    proto::Volume::Origin => None,
                    proto::Volume::Snapshot(t) => Some(t),
                },
                base,
                chunk,
                chunks,
            },
            _ => return,
        };
        let ik = if kind == Kind::Status {
            InflightKind::Status
        } else {
            InflightKind::Control(kind)
        };
        self.dispatch(
            conn,
            rid,
            ik,
            Range {
                chunk: 0,
                chunks: 1,
            },
            op,
        );
    }

    /// Sets the creation time stamped on snapshots created from now on (the
    /// loop passes its clock in; the FSM reads none).
    pub fn set_now(&mut self, now_secs: u64) {
        self.now_secs = now_secs;
    }

    /// A snapshot creation: caching origin clients first forget their
    /// grants and finish their writes (`Revoke` -> `RevokeDone`), then the
    /// create goes to the store; no origin write is granted until it has
    /// committed, and writes whose copy-out predates it are copied out
    /// again.
    fn begin_create(&mut self, conn: ConnId, rid: u64, tag: u32) {
        if self.create.is_some() {
            self.send_error(
                conn,
                rid,
                ErrorCode::Busy,
                Kind::CreateSnapshot.code(),
                "a snapshot creation is under way; retry",
            );
            return;
        }
        let revoke_id = self.next_revoke_id;
        self.next_revoke_id += 1;
        self.create = Some(PendingCreate {
            conn,
            request_id: rid,
            tag,
            revoke_id,
            waiting: 0,
            token: None,
        });
        let mut waiting = 0u32;
        for i in 0..self.sessions.len() {
            let s = &self.sessions[i];
            if s.state == SessionState::Origin && s.caching {
                self.sessions[i].revoke_owed = true;
                waiting += 1;
                let c = ConnId::try_from(i).unwrap_or(u32::MAX);
                self.send(
                    c,
                    revoke_id,
                    &Msg::Revoke {
                        what: proto::RevokeWhat::OriginGrants,
                        ranges: proto::Ranges::empty(),
                    },
                );
            }
        }
        // Caching origin clients away (disconnected on a member node, or of
        // the former incarnation and not back yet) may hold writes they
        // acknowledged: the creation waits for each to come back (its
        // identify is its answer) or leave.
        waiting += u32::try_from(self.owed.len()).unwrap_or(u32::MAX);
        if let Some(c) = self.create.as_mut() {
            c.waiting = waiting;
        }
        self.maybe_dispatch_create();
    }

    /// Drops `owed` entries matching `f`: each was one answer a pending
    /// create waited for.
    fn settle_owed(&mut self, f: impl Fn(&(u64, u32)) -> bool) {
        let before = self.owed.len();
        self.owed.retain(|e| !f(e));
        let settled = u32::try_from(before - self.owed.len()).unwrap_or(0);
        if settled > 0 {
            if let Some(c) = self.create.as_mut() {
                c.waiting -= settled;
            }
            self.maybe_dispatch_create();
        }
    }

    fn maybe_dispatch_create(&mut self) {
        let Some(c) = self.create else { return };
        if c.waiting > 0 || c.token.is_some() {
            return;
        }
        if self.sessions[c.conn as usize].state == SessionState::Free {
            // The control client went away: nothing to create.
            self.end_create(false);
            return;
        }
        let before = self.sessions[c.conn as usize].inflight;
        self.dispatch(
            c.conn,
            c.request_id,
            InflightKind::Control(Kind::CreateSnapshot),
            Range {
                chunk: 0,
                chunks: 1,
            },
            StoreOp::Create {
                tag: c.tag,
                now_secs: 0,
            },
        );
        if self.sessions[c.conn as usize].inflight == before {
            // Refused (Busy was sent): nothing is pending any more.
            self.end_create(false);
            return;
        }
        let token = self.last_dispatched;
        if let Some(p) = self.create.as_mut() {
            p.token = Some(token);
        }
    }

    /// The create committed (`created`) or will not happen: writes held for
    /// it go on; after a commit they are copied out again for the new
    /// snapshot first.
    fn end_create(&mut self, created: bool) {
        self.create = None;
        for s in &mut self.sessions {
            s.revoke_owed = false;
        }
        if created {
            self.epoch += 1;
        }
        for k in 0..self.inflight.capacity() {
            let Ok(token) = u32::try_from(k) else { break };
            let Some(f) = self.inflight.get(token).copied() else {
                continue;
            };
            if f.state != InflightState::HeldForCreate {
                continue;
            }
            self.held_writes -= 1;
            if let Some(x) = self.inflight.get_mut(token) {
                x.state = InflightState::AtStore;
            }
            self.grant_origin_write(token);
        }
    }

    fn dispatch(&mut self, conn: ConnId, rid: u64, kind: InflightKind, range: Range, op: StoreOp) {
        let s = &self.sessions[conn as usize];
        if s.inflight as usize >= self.cfg.requests_per_client {
            self.send_error(
                conn,
                rid,
                ErrorCode::Busy,
                0,
                "too many requests in flight on this connection",
            );
            return;
        }
        let tag = match op {
            StoreOp::Use { tag, .. } => tag,
            _ => 0,
        };
        let Some(token) = self.inflight.insert(Inflight {
            conn: Some(conn),
            request_id: rid,
            kind,
            state: InflightState::AtStore,
            range,
            tag,
            epoch: self.epoch,
            rechecked: false,
        }) else {
            self.send_error(conn, rid, ErrorCode::Busy, 0, "server request table full");
            return;
        };
        let op = match op {
            StoreOp::Create { tag, .. } => StoreOp::Create {
                tag,
                now_secs: self.now_secs,
            },
            other => other,
        };
        let pushed = self.store_q.push(StoreRequest { token, op });
        assert!(pushed, "store queue sized for every slot");
        self.sessions[conn as usize].inflight += 1;
        self.last_dispatched = token;
    }

    /// The connection closed or failed. Its read locks are released (a
    /// client that comes back after a disconnect re-uploads what it still
    /// holds); its waiting writes and pending requests are dropped.
    pub fn handle_disconnect(&mut self, conn: ConnId) {
        let st = self.sessions[conn as usize].state;
        if st == SessionState::Free {
            return;
        }
        let mut woken = core::mem::take(&mut self.woken);
        // Membership decides: a client whose node is still a member keeps
        // its locks (parked) until it comes back or its node leaves.
        let (client_id, node_id, gone) = {
            let s = &self.sessions[conn as usize];
            (s.client_id, s.node_id, s.gone)
        };
        let keep = self.membership_known
            && !gone
            && matches!(st, SessionState::Snapshot(_))
            && self.locks.holds_of(conn) > 0
            && self.members.contains(&node_id);
        let slot = if keep {
            self.parked.iter().position(Option::is_none)
        } else {
            None
        };
        if let Some(p) = slot {
            self.parked[p] = Some(Parked { client_id, node_id });
            let owner = u32::try_from(self.cfg.clients + p).unwrap_or(u32::MAX);
            self.locks.transfer_owner(conn, owner);
        } else {
            self.locks.release_owner(conn, &mut |p| woken.push(p));
        }
        // Slots of this connection: waiting ones are cancelled, ones at the
        // store are orphaned.
        let mut k = 0u32;
        while (k as usize) < self.inflight.capacity() {
            if let Some(f) = self.inflight.get(k).copied() {
                if f.conn == Some(conn) {
                    if f.state == InflightState::Waiting {
                        self.locks.cancel_pending(k);
                        self.waiting_writes -= 1;
                        self.inflight.remove(k);
                    } else if f.state == InflightState::Barrier {
                        self.barrier_writes -= 1;
                        self.inflight.remove(k);
                    } else if f.state == InflightState::HeldForCreate {
                        self.held_writes -= 1;
                        self.inflight.remove(k);
                    } else if let Some(f) = self.inflight.get_mut(k) {
                        f.conn = None;
                    }
                }
            }
            k += 1;
        }
        woken.retain(|&p| self.inflight.get(p).is_some_and(|f| f.conn != Some(conn)));
        for p in woken.drain(..) {
            self.locks_clear(p);
        }
        self.woken = woken;
        if let Some(tag) = self.sessions[conn as usize].snapshot_open {
            let pushed = self.store_q.push(StoreRequest {
                token: DETACHED_TOKEN,
                op: StoreOp::Use { tag, open: false },
            });
            assert!(pushed, "store queue holds one detach per connection");
        }
        if matches!(st, SessionState::Origin | SessionState::Snapshot(_)) {
            self.identified -= 1;
        }
        let s = &self.sessions[conn as usize];
        if st == SessionState::Origin && s.caching {
            // A caching origin client gone. If its node is still a member
            // it may be alive, with writes it acknowledged and has not
            // finished: every snapshot creation waits for it until it
            // identifies again (it reconnects only after finishing them) or
            // its node leaves. Otherwise (standalone server, its node gone,
            // its agent said it is gone) nothing of it is left to wait for.
            let owed_answer = s.revoke_owed;
            let keep = self.membership_known
                && !gone
                && self.members.contains(&node_id)
                && !self.owed.contains(&(client_id, node_id))
                && self.owed.len() < self.owed.capacity();
            if keep {
                self.owed.push((client_id, node_id));
            }
            if owed_answer && !keep {
                if let Some(c) = self.create.as_mut() {
                    c.waiting -= 1;
                }
            }
        }
        let s = &mut self.sessions[conn as usize];
        s.role = Session::FREE;
        s.out.clear();
        if self
            .create
            .is_some_and(|c| c.conn == conn && c.token.is_none())
        {
            // Its control client went away before the create was sent to
            // the store (it still waited for answers): nothing to create.
            // Kept, it would answer whatever session reuses the id.
            self.end_create(false);
        }
        self.maybe_dispatch_create();
        self.assert_invariants();
    }

    /// A reply from the store worker.
    pub fn handle_store_reply(&mut self, reply: &StoreReply) {
        match reply.token {
            NOTIFY_TOKEN => {
                match reply.result {
                    StoreResult::AutoDeleted { tag } => {
                        self.events.push(ServerEvent::AutoDeleted { tag });
                    }
                    StoreResult::Corrupt { addr, kind, reason } => {
                        self.events
                            .push(ServerEvent::Corrupt { addr, kind, reason });
                    }
                    _ => {}
                }
                return;
            }
            DETACHED_TOKEN => return,
            _ => {}
        }
        if let StoreResult::Failed(f @ (StoreFailure::Internal | StoreFailure::Fenced)) =
            reply.result
        {
            if !self.failed {
                self.failed = true;
                self.events.push(if f == StoreFailure::Fenced {
                    ServerEvent::Fenced
                } else {
                    ServerEvent::StoreFailed
                });
            }
        }
        let token = reply.token;
        let Some(f) = self.inflight.get(token).copied() else {
            return;
        };
        if self.create.is_some_and(|c| c.token == Some(token)) {
            let created = matches!(reply.result, StoreResult::Done);
            // The reply (Ok or the error) goes out below, before any held
            // write is granted again.
            self.end_create_after_reply = Some(created);
        }
        let Some(conn) = f.conn else {
            // Orphaned: its connection went away. A snapshot open the store
            // granted is closed again.
            self.inflight.remove(token);
            if let Some(created) = self.end_create_after_reply.take() {
                self.end_create(created);
            }
            if let (InflightKind::Identify, StoreResult::Done) = (f.kind, &reply.result) {
                let pushed = self.store_q.push(StoreRequest {
                    token: DETACHED_TOKEN,
                    op: StoreOp::Use {
                        tag: f.tag,
                        open: false,
                    },
                });
                assert!(pushed, "store queue holds one detach per connection");
            }
            return;
        };
        let rid = f.request_id;
        match (&reply.result, f.kind) {
            (StoreResult::Failed(fl), kind) => {
                self.finish(token, conn);
                if kind == InflightKind::Identify {
                    self.sessions[conn as usize].state = SessionState::ExpectIdentify;
                }
                let culprit = match kind {
                    InflightKind::OriginWrite => Kind::QueryOriginWrite.code(),
                    InflightKind::SnapshotRead => Kind::QuerySnapshotRead.code(),
                    InflightKind::SnapshotWrite => Kind::QuerySnapshotWrite.code(),
                    InflightKind::Identify => Kind::Identify.code(),
                    InflightKind::Control(k) => k.code(),
                    InflightKind::Status => Kind::Status.code(),
                };
                self.send_error(conn, rid, error_code(*fl), culprit, failure_text(*fl));
            }
            (StoreResult::Done, InflightKind::OriginWrite) => {
                if self.state == ServerState::Recovering {
                    // Held at the recovery barrier.
                    if let Some(x) = self.inflight.get_mut(token) {
                        x.state = InflightState::Barrier;
                    }
                    self.barrier_writes += 1;
                } else {
                    self.check_locks_and_grant(token, conn, f);
                }
            }
            (StoreResult::Targets { len, targets }, InflightKind::SnapshotRead) => {
                let n = *len as usize;
                // Every chunk read is locked, store-mapped ones too: a store
                // chunk shared with another snapshot may be moved off by
                // this snapshot's own write and then overwritten in place
                // by the other snapshot's writer, so every write waits for
                // the locks on its chunks. A blocking client releases them
                // after its read; a caching client keeps them as leases on
                // the mappings it caches.
                let caching = self.sessions[conn as usize].caching;
                if !self.locks.has_room(n) {
                    self.finish(token, conn);
                    self.send_error(
                        conn,
                        rid,
                        ErrorCode::Busy,
                        Kind::QuerySnapshotRead.code(),
                        "read-lock table full; retry",
                    );
                    return;
                }
                for i in 0..n {
                    let c = f.range.chunk + i as u64;
                    let _ = self.locks.acquire(c, conn);
                    // A write already waits for this chunk (it waits until
                    // no one holds it): a caching reader is asked at once to
                    // give it back after this read.
                    if caching && self.locks.has_waiters(c) {
                        self.release_requests.push((conn, c));
                    }
                }
                self.finish(token, conn);
                self.send_targets(conn, rid, f.range.chunk, &targets[..n], true);
                // After the reply: the lease exists at the client when it
                // reads the request to give it back.
                while let Some((o, c)) = self.release_requests.pop() {
                    self.send_release(o, c);
                }
            }
            (StoreResult::Targets { len, targets }, InflightKind::SnapshotWrite) => {
                // The mapping change is committed. Readers that may still
                // read the old mapping hold read locks on these chunks (a
                // caching one as its lease): drain them once, then ask the
                // store again (now a plain lookup) and answer.
                if !f.rechecked && self.state == ServerState::Recovering {
                    // A lease of the former incarnation on these chunks may
                    // not be uploaded yet: held at the barrier like origin
                    // writes, then drained and answered.
                    if let Some(x) = self.inflight.get_mut(token) {
                        x.rechecked = true;
                        x.state = InflightState::Barrier;
                    }
                    self.barrier_writes += 1;
                    self.assert_invariants();
                    return;
                }
                if !f.rechecked && self.locks_on(f.range) {
                    if let Some(x) = self.inflight.get_mut(token) {
                        x.rechecked = true;
                    }
                    self.check_locks_and_grant(token, conn, f);
                    self.assert_invariants();
                    return;
                }
                self.finish(token, conn);
                let n = *len as usize;
                self.send_targets(conn, rid, f.range.chunk, &targets[..n], false);
            }
            (StoreResult::Done, InflightKind::Identify) => {
                self.finish(token, conn);
                if let SessionState::Identifying(tag) = self.sessions[conn as usize].state {
                    // Locks kept for a client coming back stay parked until
                    // it has uploaded what it still holds (FinishUpload):
                    // its upload is the truth, and nothing is released in
                    // between. It is not an absent origin writer either.
                    let (cid, nid) = {
                        let s = &self.sessions[conn as usize];
                        (s.client_id, s.node_id)
                    };
                    self.settle_owed(|&(c, n)| c == cid && n == nid);
                    let s = &mut self.sessions[conn as usize];
                    s.state = SessionState::Snapshot(tag);
                    s.snapshot_open = Some(tag);
                    self.identified += 1;
                    self.send_identify_ok(conn, rid);
                }
            }
            (StoreResult::Done, InflightKind::Control(_)) => {
                self.finish(token, conn);
                self.send(conn, rid, &Msg::Ok);
            }
            (StoreResult::List { len, rows }, _) => {
                self.finish(token, conn);
                let mut b = proto::SnapListBuilder::new(&mut self.scratch[..])
                    .expect("scratch holds a full list");
                for r in &rows[..*len as usize] {
                    let mut flags = 0;
                    if r.deleting {
                        flags |= SnapInfo::DELETING;
                    }
                    if r.in_use {
                        flags |= SnapInfo::IN_USE;
                    }
                    let _ = b.push(SnapInfo {
                        tag: r.tag,
                        priority: r.priority,
                        flags,
                        ctime_secs: r.ctime_secs,
                        chunks: r.chunks,
                        unique_chunks: r.unique_chunks,
                    });
                }
                let list = b.finish();
                let mut buf = [0u8; proto::SNAP_LIST_BYTES_MAX + proto::HEADER_BYTES];
                let n = encode(
                    &Header::new(rid, self.cfg.incarnation),
                    &Msg::SnapshotList(list),
                    &mut buf,
                )
                .unwrap_or(0);
                self.push_out(conn, &buf[..n]);
            }
            (
                StoreResult::Delta {
                    chunk,
                    chunks,
                    bits,
                },
                _,
            ) => {
                self.finish(token, conn);
                let n = (*chunks as usize).div_ceil(8).min(bits.len());
                let msg = Msg::DeltaMap {
                    chunk: *chunk,
                    chunks: *chunks,
                    bits: &bits[..n],
                };
                let mut buf = [0u8; proto::HEADER_BYTES + 16 + DELTA_BITMAP_BYTES];
                match encode(&Header::new(rid, self.cfg.incarnation), &msg, &mut buf) {
                    Ok(n) => self.push_out(conn, &buf[..n]),
                    Err(_) => self.send_error(
                        conn,
                        rid,
                        ErrorCode::Internal,
                        Kind::QueryDelta.code(),
                        "the store answered a malformed delta",
                    ),
                }
            }
            (StoreResult::Status(fig), _) => {
                self.finish(token, conn);
                let msg = Msg::StatusReply {
                    incarnation: self.cfg.incarnation,
                    chunk_size_bytes: fig.chunk_size_bytes,
                    origin_chunks: fig.origin_chunks,
                    data_chunks: fig.data_chunks,
                    data_free: fig.data_free,
                    meta_blocks: fig.meta_blocks,
                    meta_free: fig.meta_free,
                    snapshots: fig.snapshots,
                    deleting: fig.deleting,
                    clients: self.identified,
                    read_locks: u32::try_from(self.locks.locked_chunks()).unwrap_or(u32::MAX),
                    waiting_writes: self.waiting_writes,
                    commits: fig.commits,
                    state: self.state,
                    copyouts: fig.copyouts,
                };
                self.send(conn, rid, &msg);
            }
            _ => {
                self.finish(token, conn);
                self.send_error(
                    conn,
                    rid,
                    ErrorCode::Internal,
                    0,
                    "unexpected store result for this request",
                );
            }
        }
        if let Some(created) = self.end_create_after_reply.take() {
            self.end_create(created);
        }
        self.assert_invariants();
    }

    /// Whether any chunk of `r` is read-locked.
    fn locks_on(&self, r: Range) -> bool {
        (r.chunk..r.end()).any(|c| self.locks.is_locked(c))
    }

    /// Copy-out (or a snapshot write's mapping change) committed; now every
    /// chunk of the write waits for the read locks taken before it (ddsnap
    /// b54143d: all chunks, not only freshly copied ones). Caching holders
    /// are asked to let go of those locks (`ReleaseLocks`): they hold them
    /// as leases, not for a read in progress.
    fn check_locks_and_grant(&mut self, token: u32, conn: ConnId, f: Inflight) {
        let mut waiting = false;
        let culprit = match f.kind {
            InflightKind::SnapshotWrite => Kind::QuerySnapshotWrite.code(),
            _ => Kind::QueryOriginWrite.code(),
        };
        for c in f.range.chunk..f.range.end() {
            match self.locks.wait_if_locked(c, token) {
                Ok(w) => {
                    if w {
                        self.ask_release(c);
                    }
                    waiting |= w;
                }
                Err(_) => {
                    self.locks.cancel_pending(token);
                    self.finish(token, conn);
                    self.send_error(
                        conn,
                        f.request_id,
                        ErrorCode::Busy,
                        culprit,
                        "read-lock wait table full; retry",
                    );
                    return;
                }
            }
        }
        if waiting {
            if let Some(x) = self.inflight.get_mut(token) {
                x.state = InflightState::Waiting;
            }
            self.waiting_writes += 1;
        } else {
            self.locks_clear(token);
        }
    }

    /// Sends `ReleaseLocks` for `chunk` to every caching session holding it.
    fn ask_release(&mut self, chunk: u64) {
        let clients = self.cfg.clients;
        let mut holders = [0u32; 8];
        let mut n = 0usize;
        let mut more = false;
        self.locks.for_each_holder(chunk, &mut |o| {
            if (o as usize) < clients {
                if n < holders.len() {
                    holders[n] = o;
                    n += 1;
                } else {
                    more = true;
                }
            }
        });
        let mut lb = [0u8; proto::LIST_HEADER_BYTES + 16];
        let Ok(list) = proto::Ranges::from_entries(&[Range { chunk, chunks: 1 }], &mut lb) else {
            return;
        };
        let msg = Msg::ReleaseLocks(list);
        for &o in &holders[..n] {
            if self.sessions[o as usize].caching {
                self.send(o, 0, &msg);
            }
        }
        if more {
            // More holders than one pass names: ask every caching session
            // attached to a snapshot (rare: a chunk read by many caching
            // clients at once).
            for i in 0..self.sessions.len() {
                let s = &self.sessions[i];
                if s.caching && matches!(s.state, SessionState::Snapshot(_)) {
                    let o = ConnId::try_from(i).unwrap_or(u32::MAX);
                    if self.locks.hold_count(chunk, o) > 0 && !holders[..n].contains(&o) {
                        self.send(o, 0, &msg);
                    }
                }
            }
        }
    }

    /// Sends `ReleaseLocks` for `chunk` to `conn`.
    fn send_release(&mut self, conn: ConnId, chunk: u64) {
        let mut lb = [0u8; proto::LIST_HEADER_BYTES + 16];
        if let Ok(list) = proto::Ranges::from_entries(&[Range { chunk, chunks: 1 }], &mut lb) {
            self.send(conn, 0, &Msg::ReleaseLocks(list));
        }
    }

    /// No read lock stands in the way of the write in slot `token` any more.
    fn locks_clear(&mut self, token: u32) {
        match self.inflight.get(token).map(|f| f.kind) {
            Some(InflightKind::SnapshotWrite) => self.redispatch_snapshot_write(token),
            Some(_) => self.grant_origin_write(token),
            None => {}
        }
    }

    fn finish(&mut self, token: u32, conn: ConnId) {
        self.inflight.remove(token);
        let s = &mut self.sessions[conn as usize];
        s.inflight -= 1;
    }

    /// Leaves the Waiting state (counted once).
    fn unwait(&mut self, token: u32) {
        if let Some(x) = self.inflight.get_mut(token) {
            if x.state == InflightState::Waiting {
                x.state = InflightState::AtStore;
                self.waiting_writes -= 1;
            }
        }
    }

    fn redispatch_snapshot_write(&mut self, token: u32) {
        self.unwait(token);
        let Some(f) = self.inflight.get(token).copied() else {
            return;
        };
        let Some(conn) = f.conn else {
            self.inflight.remove(token);
            return;
        };
        let SessionState::Snapshot(tag) = self.sessions[conn as usize].state else {
            self.finish(token, conn);
            return;
        };
        let pushed = self.store_q.push(StoreRequest {
            token,
            op: StoreOp::SnapshotWrite {
                tag,
                chunk: f.range.chunk,
                chunks: f.range.chunks,
            },
        });
        assert!(pushed, "store queue sized for every slot");
    }

    fn grant_origin_write(&mut self, token: u32) {
        self.unwait(token);
        let Some(f) = self.inflight.get(token).copied() else {
            return;
        };
        let Some(conn) = f.conn else {
            self.inflight.remove(token);
            return;
        };
        if self.create.is_some() && !self.sessions[conn as usize].revoke_owed {
            // Not granted while a snapshot is being created; except to a
            // caching session that has not answered its revoke yet: what it
            // sent before its answer belongs before the snapshot (it may
            // have acknowledged those writes to its user already), and it
            // answers only once they have landed.
            if let Some(x) = self.inflight.get_mut(token) {
                x.state = InflightState::HeldForCreate;
            }
            self.held_writes += 1;
            return;
        }
        if f.epoch != self.epoch {
            // Its copy-out predates a snapshot created since: copy out
            // again (for the new snapshot) before the grant.
            if let Some(x) = self.inflight.get_mut(token) {
                x.epoch = self.epoch;
                x.state = InflightState::AtStore;
            }
            let pushed = self.store_q.push(StoreRequest {
                token,
                op: StoreOp::OriginWrite {
                    chunk: f.range.chunk,
                    chunks: f.range.chunks,
                },
            });
            assert!(pushed, "store queue sized for every slot");
            return;
        }
        self.finish(token, conn);
        let mut buf = [0u8; proto::HEADER_BYTES + proto::LIST_HEADER_BYTES + 16];
        let mut lb = [0u8; proto::LIST_HEADER_BYTES + 16];
        let Ok(list) = proto::Ranges::from_entries(&[f.range], &mut lb) else {
            return;
        };
        let n = encode(
            &Header::new(f.request_id, self.cfg.incarnation),
            &Msg::OriginWriteOk(list),
            &mut buf,
        )
        .unwrap_or(0);
        self.push_out(conn, &buf[..n]);
    }

    fn send_targets(
        &mut self,
        conn: ConnId,
        rid: u64,
        first: u64,
        targets: &[StoreTarget],
        read: bool,
    ) {
        // Coalesce runs: consecutive origin chunks, or consecutive chunks in
        // consecutive store chunks.
        let mut scratch = core::mem::take(&mut self.scratch);
        let mut b = proto::TargetsBuilder::new(&mut scratch[..]).expect("scratch holds targets");
        let mut i = 0;
        while i < targets.len() {
            let start = i;
            let t0 = targets[i];
            i += 1;
            while i < targets.len() {
                let next_ok = match (t0, targets[i]) {
                    (StoreTarget::Origin, StoreTarget::Origin) => true,
                    (StoreTarget::Store(a), StoreTarget::Store(b)) => b == a + (i - start) as u64,
                    _ => false,
                };
                if !next_ok {
                    break;
                }
                i += 1;
            }
            let (kind, store_chunk) = match t0 {
                StoreTarget::Origin => (TargetKind::Origin, 0),
                StoreTarget::Store(s) => (TargetKind::Store, s),
            };
            let _ = b.push(Target {
                chunk: first + start as u64,
                chunks: u32::try_from(i - start).unwrap_or(u32::MAX),
                kind,
                store_chunk,
            });
        }
        let list = b.finish();
        let msg = if read {
            Msg::SnapshotReadReply(list)
        } else {
            Msg::SnapshotWriteOk(list)
        };
        let mut frame = [0u8; REPLY_MAX_BYTES];
        let n = encode(&Header::new(rid, self.cfg.incarnation), &msg, &mut frame).unwrap_or(0);
        self.scratch = scratch;
        self.push_out(conn, &frame[..n]);
    }

    // -- output ------------------------------------------------------------------

    fn send(&mut self, conn: ConnId, rid: u64, msg: &Msg<'_>) {
        let mut frame = [0u8; 512];
        match encode(&Header::new(rid, self.cfg.incarnation), msg, &mut frame) {
            Ok(n) => self.push_out(conn, &frame[..n]),
            Err(_) => self.close(conn),
        }
    }

    fn send_error(&mut self, conn: ConnId, rid: u64, code: ErrorCode, culprit: u16, text: &str) {
        self.send(
            conn,
            rid,
            &Msg::Error {
                code,
                culprit,
                text,
            },
        );
    }

    fn push_out(&mut self, conn: ConnId, bytes: &[u8]) {
        if self.sessions[conn as usize].state == SessionState::Free {
            return;
        }
        if !self.sessions.push_bytes(conn, bytes) {
            // The client does not read its replies: drop it.
            self.close(conn);
        }
    }

    fn close(&mut self, conn: ConnId) {
        let s = &mut self.sessions[conn as usize];
        if s.state == SessionState::Free {
            return;
        }
        if matches!(s.state, SessionState::Origin | SessionState::Snapshot(_)) {
            // No longer an attached client (`handle_disconnect` sees
            // `Closing` and does not count it again).
            self.identified -= 1;
        }
        self.sessions.close(conn);
    }

    /// The next connection with output to write.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<ConnId> {
        self.sessions.poll_output()
    }

    /// Bytes waiting to be written to `conn`.
    pub fn output(&self, conn: ConnId) -> &[u8] {
        self.sessions.output(conn)
    }

    /// `n` bytes of `output(conn)` were written. If some remain, the
    /// connection is queued again for `poll_output`.
    pub fn consume_output(&mut self, conn: ConnId, n: usize) {
        self.sessions.consume_output(conn, n);
    }

    /// Whether `conn` has unwritten output.
    pub fn has_output(&self, conn: ConnId) -> bool {
        self.sessions.has_output(conn)
    }

    /// The next connection to close once its output is written.
    #[must_use]
    pub fn poll_close(&mut self) -> Option<ConnId> {
        self.sessions.poll_close()
    }

    /// The next request for the store worker.
    #[must_use]
    pub fn poll_store_request(&mut self) -> Option<StoreRequest> {
        self.store_q.pop()
    }

    /// The next event to log.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop()
    }

    /// Checks the cheap invariants (counts), after every input, in release
    /// builds too.
    pub fn assert_invariants(&self) {
        let mut per_conn_total = 0u32;
        let mut identified = 0u32;
        for s in &self.sessions {
            per_conn_total += s.inflight;
            assert!(s.out.pending().len() <= s.out.capacity());
            if matches!(s.state, SessionState::Origin | SessionState::Snapshot(_)) {
                identified += 1;
            }
            if s.state == SessionState::Free {
                assert_eq!(s.inflight, 0, "a free session has requests in flight");
            }
        }
        assert_eq!(
            identified, self.identified,
            "identified-client count drifted"
        );
        assert!(per_conn_total as usize <= self.inflight.len());
        assert!(self.waiting_writes as usize <= self.inflight.len());
        assert!(self.barrier_writes == 0 || self.state == ServerState::Recovering);
        assert!(
            self.held_writes == 0 || self.create.is_some(),
            "writes held for a create that is not pending"
        );
        assert!(self.held_writes as usize <= self.inflight.len());
        if let Some(c) = self.create {
            let owed_sessions = self.sessions.iter().filter(|s| s.revoke_owed).count();
            assert_eq!(
                c.waiting as usize,
                owed_sessions + self.owed.len(),
                "create waits for a different number of answers than are owed"
            );
        }
    }

    /// Checks everything, including the lock table's lists (O(table)).
    pub fn assert_invariants_full(&self) {
        self.assert_invariants();
        self.locks.assert_invariants();
        let live: u32 = self
            .inflight
            .iter()
            .filter(|(_, f)| f.conn.is_some())
            .count()
            .try_into()
            .unwrap_or(u32::MAX);
        let per_conn: u32 = self.sessions.iter().map(|s| s.inflight).sum();
        assert_eq!(
            live, per_conn,
            "in-flight slots and per-connection counts differ"
        );
    }
}
