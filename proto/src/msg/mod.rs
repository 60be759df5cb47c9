//! Messages: the [`Msg`] enum, one variant per kind, and where each job
//! lives:
//!
//! - `kind.rs`: the kinds table (code, name, doc; one line per kind), the
//!   families and the largest body of each kind;
//! - `codes.rs`: the small enumerations inside messages (roles, error
//!   codes...);
//! - `layout.rs`: body sizes and field values shared by both directions;
//! - `encoding.rs`: [`encode`] and one body writer per family;
//! - `decoding.rs`: [`decode`] and one body reader per family;
//! - `check.rs`: the value rules both directions apply;
//! - `header.rs`: the frame header; `error_text.rs`: [`ErrorText`].
//!
//! Adding a message: a row in the `kinds!` table, a variant here and its
//! arm in [`Msg::kind`], its layout constant, an arm in its family's writer
//! and reader (and in `Msg::body_bytes` when its size varies, in `check`
//! when it has value rules).

use core::fmt;

use crate::list::{ClientList, NodeList, NodeStatusList, Ranges, SnapList, Targets};

mod check;
mod codes;
mod decoding;
mod encoding;
mod error_text;
mod header;
mod kind;
mod layout;

pub use codes::{
    negotiate, ClusterOp, ErrorCode, FenceReason, RevokeWhat, Role, ServerState, Volume,
};
pub use decoding::decode;
pub use encoding::encode;
pub use error_text::ErrorText;
pub use header::{peek_header, Header};
pub use kind::Kind;
pub(crate) use layout::START_SERVER_FIXED_BYTES;

/// A decoded message, or one to encode. List bodies, the error text and
/// addresses borrow from the frame (decoding) or from caller buffers
/// (encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg<'a> {
    /// Handshake, first frame of every connection.
    Hello {
        /// Lowest version the sender speaks (at least 1).
        version_min: u16,
        /// Highest version the sender speaks (at least `version_min`).
        version_max: u16,
        /// What the sender is.
        role: Role,
    },
    /// Handshake answer; the server's incarnation is in the header.
    HelloOk {
        /// The version chosen for the connection.
        version: u16,
        /// Identifies the server (store) across incarnations.
        server_id: u64,
    },
    /// Attach to a volume (role `Client`).
    Identify {
        /// The client's cluster-unique id, stable across reconnects.
        client_id: u64,
        /// The cluster node the client runs on.
        node_id: u32,
        /// Origin or a snapshot.
        volume: Volume,
        /// The origin device the client sees, to catch a wrong pairing.
        origin_uuid: [u8; 16],
        /// The size of the client's device, 0 when it takes the server's.
        volume_size_bytes: u64,
        /// The chunk size the client expects, 0 when it takes the server's.
        chunk_size_bytes: u32,
        /// Feature bits: [`IDENTIFY_CACHING`](crate::IDENTIFY_CACHING); other
        /// bits are invalid.
        flags: u16,
    },
    /// Identify answer: the volume's geometry.
    IdentifyOk {
        /// The store's chunk size.
        chunk_size_bytes: u32,
        /// The origin's size.
        origin_size_bytes: u64,
        /// The attached volume's size (the snapshot's size at creation).
        volume_size_bytes: u64,
    },
    /// May the origin chunks be written? Answered once every chunk has been
    /// copied out and no read lock covers it.
    QueryOriginWrite(Ranges<'a>),
    /// The origin write may proceed (echo of the query's ranges).
    OriginWriteOk(Ranges<'a>),
    /// Where to read snapshot chunks.
    QuerySnapshotRead(Ranges<'a>),
    /// Targets covering the query; origin targets are read-locked.
    SnapshotReadReply(Targets<'a>),
    /// Release the read locks of origin targets. No reply.
    FinishSnapshotRead(Ranges<'a>),
    /// Where to write snapshot chunks.
    QuerySnapshotWrite(Ranges<'a>),
    /// Store targets covering the query.
    SnapshotWriteOk(Targets<'a>),
    /// Read locks the client held under the previous incarnation. No reply.
    UploadLocks(Ranges<'a>),
    /// End of the lock upload.
    FinishUpload,
    /// The lock upload is accepted.
    UploadOk,
    /// Create a snapshot.
    CreateSnapshot {
        /// Its tag.
        tag: u32,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        /// Its tag.
        tag: u32,
    },
    /// Set a snapshot's store-full priority.
    SetPriority {
        /// The snapshot.
        tag: u32,
        /// The priority (127 = never chosen for deletion).
        priority: i8,
    },
    /// One page of the snapshot list: the snapshots whose tag is at least
    /// `from`, in tag order (`SNAP_LIST_PAGE_MAX`).
    ListSnapshots {
        /// The first tag the page may hold.
        from: u32,
    },
    /// Ask for the server status.
    Status,
    /// Which of `chunks` chunks from `chunk` of `volume` differ from
    /// snapshot `base` (control): for a snapshot volume, where the two
    /// snapshots map the chunk to different places; for the origin, where
    /// `base` holds an exception for it.
    QueryDelta {
        /// The volume compared (origin or a snapshot).
        volume: Volume,
        /// The snapshot it is compared with.
        base: u32,
        /// First chunk.
        chunk: u64,
        /// Chunk count, `1..=DELTA_CHUNKS_MAX`.
        chunks: u32,
    },
    /// The answer to `QueryDelta`: bit `i` (byte `i / 8`, bit `i % 8`) set
    /// when chunk `chunk + i` differs.
    DeltaMap {
        /// First chunk (the query's).
        chunk: u64,
        /// Chunk count (the query's).
        chunks: u32,
        /// `ceil(chunks / 8)` bytes; bits past `chunks` are zero.
        bits: &'a [u8],
    },
    /// Success of create, delete, set-priority.
    Ok,
    /// The snapshots.
    SnapshotList(SnapList<'a>),
    /// The server status.
    StatusReply {
        /// The server incarnation (as in the header).
        incarnation: u64,
        /// Chunk size.
        chunk_size_bytes: u32,
        /// Origin size in chunks.
        origin_chunks: u64,
        /// Data area size in chunks.
        data_chunks: u64,
        /// Free data chunks.
        data_free: u64,
        /// Metadata area size in blocks.
        meta_blocks: u64,
        /// Free metadata blocks.
        meta_free: u64,
        /// Live snapshots.
        snapshots: u32,
        /// Snapshots being deleted.
        deleting: u32,
        /// Connected, identified clients.
        clients: u32,
        /// Read locks held.
        read_locks: u32,
        /// Origin writes waiting for read locks.
        waiting_writes: u32,
        /// Journal commits since the store was formatted.
        commits: u64,
        /// Recovering or serving.
        state: ServerState,
        /// Copy-outs (origin to store, and shared store chunk to a new one)
        /// this server process made since it started.
        copyouts: u64,
    },
    /// A request failed or a frame was rejected.
    Error {
        /// Why.
        code: ErrorCode,
        /// The kind code it answers (raw: may be an unknown code), 0 if none.
        culprit: u16,
        /// Human-readable detail, at most [`ERROR_TEXT_MAX_BYTES`] of UTF-8.
        text: &'a str,
    },

    // Data-path cache coherence.
    /// A `Revoke` is carried out: the header's `request_id` is the
    /// `Revoke`'s. No reply.
    RevokeDone,
    /// Server notification to a caching client: forget what it learnt, then
    /// answer `RevokeDone` with this frame's `request_id` (a nonzero revoke
    /// id chosen by the server, not a request of the client's).
    Revoke {
        /// What to forget.
        what: RevokeWhat,
        /// Empty for [`RevokeWhat::OriginGrants`], the chunks whose mappings
        /// to forget for [`RevokeWhat::SnapshotMappings`].
        ranges: Ranges<'a>,
    },
    /// Server notification to a caching client (`request_id` 0): an origin
    /// write waits for its read locks on these chunks; send
    /// `FinishSnapshotRead` for them once their reads are done.
    ReleaseLocks(Ranges<'a>),

    // Agent socket.
    /// Where is the server? A volume client (or a control tool, with no
    /// volume) asks its node's agent. Answered with `ServerAddress`.
    NeedServer {
        /// The client's id, at least 1 for a volume client; 0 is allowed only
        /// with no volume.
        client_id: u64,
        /// The incarnation that failed the client, 0 when any serving
        /// incarnation will do.
        failed_incarnation: u64,
        /// The node the client runs on.
        node_id: u32,
        /// The volume the client serves, `None` for a control tool.
        volume: Option<Volume>,
    },
    /// The serving server's address, from the agent.
    ServerAddress {
        /// The server's incarnation, at least 1.
        incarnation: u64,
        /// The node it runs on.
        node_id: u32,
        /// Where it listens for clients (a unix socket path or `host:port`),
        /// 1 to [`ADDR_MAX_BYTES`] of UTF-8.
        addr: &'a str,
    },
    /// A standby server (role `Server`) tells its agent it is ready to start.
    ServerReady {
        /// Its process id.
        pid: u32,
        /// Its node.
        node_id: u32,
        /// Where it will listen for clients, 1 to [`ADDR_MAX_BYTES`] of
        /// UTF-8.
        addr: &'a str,
    },
    /// The agent tells its standby to start serving. Answered with
    /// `Serving`.
    StartServer {
        /// Claim the store and wait out the former server's lease before
        /// reading it: that server's death was not seen by its own agent.
        claim: bool,
        /// The cluster members.
        members: NodeList<'a>,
        /// The snapshot clients of the former incarnation the recovery
        /// barrier waits for (may be empty).
        expected: ClientList<'a>,
    },
    /// The server serves (to its agent).
    Serving {
        /// Its incarnation.
        incarnation: u64,
        /// How long the start took, in microseconds.
        start_micros: u64,
        /// Journal commits replayed by the start.
        replayed_commits: u64,
    },
    /// A node joined the cluster (agent to its server).
    NodeJoined {
        /// The node, at least 1.
        node_id: u32,
    },
    /// A node left the cluster (agent to its server).
    NodeLeft {
        /// The node, at least 1.
        node_id: u32,
    },
    /// A client of a former incarnation is gone and will not come back: the
    /// recovery barrier stops waiting for it (agent to controller, controller
    /// to the serving agent, agent to its server).
    ClientGone {
        /// The client, at least 1.
        client_id: u64,
        /// Its node, at least 1.
        node_id: u32,
    },
    /// Every live volume client of `node_id`, complete: sent by an agent
    /// that started (or restarted) once its clients had the time to
    /// reconnect (`AGENT_RELIST_GRACE_MS`); any client of that node a new
    /// server still waits for and not listed here died unseen (while no
    /// agent ran there) and is gone (agent to controller, controller to the
    /// serving or starting agent, agent to its server).
    ClientsOf {
        /// The node, at least 1.
        node_id: u32,
        /// Its clients (entries of other nodes are ignored).
        clients: ClientList<'a>,
    },

    // Controller socket.
    /// An agent joins the controller (first message after `Hello` with role
    /// `Agent`); the controller answers with `Members`.
    Join {
        /// The agent's node, at least 1.
        node_id: u32,
        /// The agent's socket, 1 to [`ADDR_MAX_BYTES`] of UTF-8.
        addr: &'a str,
    },
    /// The cluster members (controller to agents).
    Members {
        /// The membership epoch.
        epoch: u64,
        /// The members (may be empty).
        members: NodeList<'a>,
    },
    /// An agent's state (agent to controller).
    AgentState {
        /// The agent's node.
        node_id: u32,
        /// Whether its standby server is ready to start.
        standby_ready: bool,
        /// Its own servers' deaths (crashes and failed starts) within the
        /// death window, by its clock: what a restarted controller's
        /// crash-loop breaker starts from.
        recent_deaths: u16,
        /// The incarnation of its serving server, 0 if none.
        serving_incarnation: u64,
        /// Nonzero: this node's server of that incarnation died; 0 if none.
        died_incarnation: u64,
    },
    /// A client needs a server (agent to controller).
    WantServer {
        /// The incarnation that failed the client, 0 if none.
        failed_incarnation: u64,
    },
    /// Start the server on this node (controller to agent).
    StartHere {
        /// The start attempt, at least 1.
        attempt: u64,
        /// The incarnation being replaced, 0 if none.
        former_incarnation: u64,
        /// The former server may still be running (its death was not seen
        /// by its own agent): the start claims the store and waits.
        claim: bool,
    },
    /// Which volume clients run on your node? From the starting agent, via
    /// the controller, to every other connected member agent. Answered with
    /// `Clients`.
    NeedClients {
        /// Identifies the gathering, at least 1.
        gather_id: u64,
        /// The starting agent's node, at least 1.
        starter: u32,
    },
    /// The volume clients of one node (member agent, via the controller, to
    /// the starter).
    Clients {
        /// The `NeedClients` answered.
        gather_id: u64,
        /// The answering node.
        from: u32,
        /// The starter.
        to: u32,
        /// The clients.
        clients: ClientList<'a>,
    },
    /// A server serves (agent to controller, controller to every agent).
    ServerUp {
        /// Its incarnation, at least 1.
        incarnation: u64,
        /// Its node.
        node_id: u32,
        /// Where it listens for clients, 1 to [`ADDR_MAX_BYTES`] of UTF-8.
        addr: &'a str,
    },
    /// A server is gone (controller to every agent).
    ServerDown {
        /// Its incarnation.
        incarnation: u64,
        /// Its node.
        node_id: u32,
    },
    /// Stop serving (controller to agent).
    Fence {
        /// Why.
        reason: FenceReason,
    },
    /// A `csnap cluster` command (tool with role `Control` to controller).
    /// Answered with `Ok`; for [`ClusterOp::Start`], once the node's server
    /// serves.
    ClusterCommand {
        /// What to do.
        op: ClusterOp,
        /// The node, at least 1.
        node_id: u32,
    },
    /// Ask for the cluster status (tool to controller). Answered with
    /// `ClusterStatusReply`.
    ClusterStatus,
    /// The cluster status (controller to tool).
    ClusterStatusReply {
        /// The serving server's incarnation, 0 when no server serves.
        server_incarnation: u64,
        /// The serving server's node, 0 if none.
        server_node: u32,
        /// Non-zero when the store is marked failed (the crash-loop
        /// breaker): the server deaths counted within the window.
        failed_deaths: u16,
        /// The serving server's address, at most [`ADDR_MAX_BYTES`] of UTF-8;
        /// empty only when `server_incarnation` is 0.
        server_addr: &'a str,
        /// Every node the controller knows.
        nodes: NodeStatusList<'a>,
    },
}

impl Msg<'_> {
    /// The message's kind.
    #[must_use]
    pub fn kind(&self) -> Kind {
        match self {
            Msg::Hello { .. } => Kind::Hello,
            Msg::HelloOk { .. } => Kind::HelloOk,
            Msg::Identify { .. } => Kind::Identify,
            Msg::IdentifyOk { .. } => Kind::IdentifyOk,
            Msg::QueryOriginWrite(_) => Kind::QueryOriginWrite,
            Msg::OriginWriteOk(_) => Kind::OriginWriteOk,
            Msg::QuerySnapshotRead(_) => Kind::QuerySnapshotRead,
            Msg::SnapshotReadReply(_) => Kind::SnapshotReadReply,
            Msg::FinishSnapshotRead(_) => Kind::FinishSnapshotRead,
            Msg::QuerySnapshotWrite(_) => Kind::QuerySnapshotWrite,
            Msg::SnapshotWriteOk(_) => Kind::SnapshotWriteOk,
            Msg::UploadLocks(_) => Kind::UploadLocks,
            Msg::FinishUpload => Kind::FinishUpload,
            Msg::UploadOk => Kind::UploadOk,
            Msg::CreateSnapshot { .. } => Kind::CreateSnapshot,
            Msg::DeleteSnapshot { .. } => Kind::DeleteSnapshot,
            Msg::SetPriority { .. } => Kind::SetPriority,
            Msg::ListSnapshots { .. } => Kind::ListSnapshots,
            Msg::Status => Kind::Status,
            Msg::QueryDelta { .. } => Kind::QueryDelta,
            Msg::DeltaMap { .. } => Kind::DeltaMap,
            Msg::Ok => Kind::Ok,
            Msg::SnapshotList(_) => Kind::SnapshotList,
            Msg::StatusReply { .. } => Kind::StatusReply,
            Msg::Error { .. } => Kind::Error,
            Msg::RevokeDone => Kind::RevokeDone,
            Msg::Revoke { .. } => Kind::Revoke,
            Msg::ReleaseLocks(_) => Kind::ReleaseLocks,
            Msg::NeedServer { .. } => Kind::NeedServer,
            Msg::ServerAddress { .. } => Kind::ServerAddress,
            Msg::ServerReady { .. } => Kind::ServerReady,
            Msg::StartServer { .. } => Kind::StartServer,
            Msg::Serving { .. } => Kind::Serving,
            Msg::NodeJoined { .. } => Kind::NodeJoined,
            Msg::NodeLeft { .. } => Kind::NodeLeft,
            Msg::ClientGone { .. } => Kind::ClientGone,
            Msg::ClientsOf { .. } => Kind::ClientsOf,
            Msg::Join { .. } => Kind::Join,
            Msg::Members { .. } => Kind::Members,
            Msg::AgentState { .. } => Kind::AgentState,
            Msg::WantServer { .. } => Kind::WantServer,
            Msg::StartHere { .. } => Kind::StartHere,
            Msg::NeedClients { .. } => Kind::NeedClients,
            Msg::Clients { .. } => Kind::Clients,
            Msg::ServerUp { .. } => Kind::ServerUp,
            Msg::ServerDown { .. } => Kind::ServerDown,
            Msg::Fence { .. } => Kind::Fence,
            Msg::ClusterCommand { .. } => Kind::ClusterCommand,
            Msg::ClusterStatus => Kind::ClusterStatus,
            Msg::ClusterStatusReply { .. } => Kind::ClusterStatusReply,
        }
    }
}

impl fmt::Display for Msg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().name())
    }
}
