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
//! slot for the read locks that cover its chunks (`WaitingFor::Locks`; the path of
//! a request and its states are the table on `WaitingFor`). A slot whose
//! connection went away while the store worked on it is orphaned and dropped
//! when the reply comes back.

use core::fmt::Write as _;

use csnap_pools::slab::Slab;
use csnap_pools::CHUNKS_PER_REQUEST_MAX;
use csnap_proto::{
    self as proto, encode, ErrorCode, ErrorText, Header, Kind, Msg, Range, Role, ServerState,
    SnapInfo, Target, TargetKind, Volume,
};

use crate::conns::{self, ConnTable, SlotState};
use crate::fixed::FixedRing;
use crate::locks::{LockLimits, LockTable};
use crate::store_ops::{
    StoreFailure, StoreOp, StoreReply, StoreRequest, StoreResult, Target as StoreTarget,
    DELTA_BITMAP_BYTES,
};

// The server's work by job; each adds to `impl Server`.
mod replies;
mod requests;
mod sessions;
mod snapshots;
mod waits;

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

/// What a request in flight waits for: the path of a request through the
/// server. Every move goes through `Server::set_inflight_state`, which
/// asserts the state it leaves and keeps the per-state counts
/// (`waiting_writes`, `barrier_writes`, `held_writes`).
///
/// | state | entered on | left on |
/// |---|---|---|
/// | `WaitingFor::Store` | dispatch; an origin write copied out again (older create epoch) | the store's answer (the reply, or one of the waits below) |
/// | `WaitingFor::Locks` | an origin write's copy-out committed, read locks on its chunks held by others | the last of those locks released (`unwait`) → `WaitingFor::Store` |
/// | `WaitingFor::Barrier` | a write's copy-out committed while recovering | the recovery barrier lifts → `WaitingFor::Store` (locks checked) |
/// | `WaitingFor::Create` | an origin write granted while a snapshot is being created | the create committed or failed → `WaitingFor::Store` (granted, or copied out again) |
///
/// A request whose connection goes leaves its slot from any state
/// (`handle_disconnect`: the waits are dropped, a `WaitingFor::Store` slot is
/// orphaned until the store answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitingFor {
    Store,
    Locks,
    /// Copy-out committed; held until the recovery barrier lifts.
    Barrier,
    /// Copy-out committed; held until the snapshot being created is
    /// committed (then copied out again for it).
    Create,
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
    state: WaitingFor,
    range: Range,
    tag: u32,
    /// For origin writes: the create epoch its copy-out ran in.
    epoch: u64,
    /// For snapshot writes: the read locks on its chunks were drained once
    /// after its mapping change; the next store answer is the reply.
    rechecked: bool,
    /// For origin writes of a caching client: which chunks right after its
    /// range the store found need no copy-out (bit `k`: `range.end() + k`,
    /// as of `epoch`), for a write-ahead grant.
    ahead: u64,
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

    /// Drops the parked clients `gone` picks and releases their locks; the
    /// waits those locks held are pushed to `woken` for the caller to clear.
    fn release_parked(&mut self, gone: impl Fn(Parked) -> bool, woken: &mut Vec<u32>) {
        let clients = self.cfg.clients;
        for p in 0..self.parked.len() {
            if self.parked[p].is_some_and(&gone) {
                self.parked[p] = None;
                let owner = u32::try_from(clients + p).unwrap_or(u32::MAX);
                self.locks.release_owner(owner, &mut |w| woken.push(w));
            }
        }
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
        let mut woken = core::mem::take(&mut self.woken);
        self.release_parked(|x| x.node_id == node, &mut woken);
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
        let mut woken = core::mem::take(&mut self.woken);
        self.release_parked(
            |x| x.client_id == client_id && x.node_id == node,
            &mut woken,
        );
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

    /// `node`'s complete client list, from its agent once that agent (new,
    /// or restarted) gave its clients the time to reconnect: a client of
    /// that node this server still waits for (expected and not done) or
    /// keeps locks parked for, and that is not listed, died while no agent
    /// ran there to see it go; it is gone (`handle_client_gone`).
    pub fn handle_clients_of(&mut self, node: u32, live: proto::ClientList<'_>) {
        let listed = |id: u64| live.iter().any(|c| c.client_id == id && c.node_id == node);
        // `handle_client_gone` marks expected entries done (the list is
        // emptied when the barrier lifts) and empties parked slots, never
        // reordering either table: one pass over each.
        let mut i = 0;
        while let Some(e) = self.expected.get(i).copied() {
            if e.node_id == node && !e.done && !listed(e.client_id) {
                self.handle_client_gone(e.client_id, node);
            }
            i += 1;
        }
        for p in 0..self.parked.len() {
            let gone = self.parked[p].filter(|x| x.node_id == node && !listed(x.client_id));
            if let Some(x) = gone {
                self.handle_client_gone(x.client_id, node);
            }
        }
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
                if f.state == WaitingFor::Barrier {
                    self.set_inflight_state(token, WaitingFor::Barrier, WaitingFor::Store);
                    if let Some(conn) = f.conn {
                        self.check_locks_and_grant(token, conn, f);
                    }
                }
            }
        }
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
