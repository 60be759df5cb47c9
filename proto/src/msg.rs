//! Message kinds, the header, and encoding and decoding of whole frames.

use core::fmt;

use crate::error::{DecodeError, EncodeError};
use crate::list::{ClientList, NodeList, NodeStatusList, Ranges, SnapList, TargetKind, Targets};
use crate::wire::{get_i8, get_u16, get_u32, get_u64, put_i8, put_u16, put_u32, put_u64, zero};
use crate::{
    ADDR_MAX_BYTES, ERROR_TEXT_MAX_BYTES, FRAME_MAX_BYTES, HEADER_BYTES, IDENTIFY_CACHING, MAGIC,
    PROTOCOL_VERSION, QUERY_CHUNKS_MAX,
};

// ---------------------------------------------------------------------------
// Kinds.
// ---------------------------------------------------------------------------

/// Message kind: the `kind` field of the header.
///
/// Three groups by the top two bits of the code:
///
/// - bit 15 clear, bit 14 clear: server requests, sent by clients and tools
///   to the server ([`Kind::is_request`]);
/// - bit 15 clear, bit 14 set (`0x4000..=0x7FFF`): the agent protocol,
///   spoken on the agent and controller sockets, never to or by a server's
///   client port ([`Kind::is_agent`]; these also count as requests);
/// - bit 15 set: sent only by the server ([`Kind::is_reply`]): replies and
///   the two notifications `Revoke` and `ReleaseLocks`
///   ([`Kind::is_notification`]).
///
/// A server request's success reply, where it has its own, is its code with
/// bit 15 set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// Handshake: versions spoken and role. Request.
    Hello = 0x0001,
    /// Attach a client to a volume. Request.
    Identify = 0x0002,
    /// May these origin chunks be written? Request.
    QueryOriginWrite = 0x0010,
    /// Where are these snapshot chunks? Request.
    QuerySnapshotRead = 0x0011,
    /// Release the read locks of origin targets. Request, no reply.
    FinishSnapshotRead = 0x0012,
    /// Where do these snapshot chunks go? Request.
    QuerySnapshotWrite = 0x0013,
    /// Re-declare read locks held across a failover. Request, no reply.
    UploadLocks = 0x0014,
    /// All locks uploaded. Request.
    FinishUpload = 0x0015,
    /// A `Revoke` is carried out (its request id echoed). Request, no reply.
    RevokeDone = 0x0016,
    /// Create a snapshot. Request.
    CreateSnapshot = 0x0020,
    /// Delete a snapshot. Request.
    DeleteSnapshot = 0x0021,
    /// Set a snapshot's store-full priority. Request.
    SetPriority = 0x0022,
    /// List the snapshots. Request.
    ListSnapshots = 0x0023,
    /// Server and store status. Request.
    Status = 0x0024,
    /// Which chunks of a volume differ from a snapshot (control).
    QueryDelta = 0x0025,
    /// Where is the server? Client or tool to its agent. Agent protocol.
    NeedServer = 0x4001,
    /// The serving server's address. Agent to client. Agent protocol.
    ServerAddress = 0x4002,
    /// A standby server is ready to start. Standby to its agent. Agent
    /// protocol.
    ServerReady = 0x4003,
    /// Start serving. Agent to its standby. Agent protocol.
    StartServer = 0x4004,
    /// The server serves. Server to its agent. Agent protocol.
    Serving = 0x4005,
    /// A node joined the cluster. Agent to its server. Agent protocol.
    NodeJoined = 0x4006,
    /// A node left the cluster. Agent to its server. Agent protocol.
    NodeLeft = 0x4007,
    /// A client of a departed incarnation will not come back. Agent
    /// protocol.
    ClientGone = 0x4008,
    /// An agent joins the controller. Agent protocol.
    Join = 0x4010,
    /// The cluster members. Controller to agents. Agent protocol.
    Members = 0x4011,
    /// An agent's standby and server state. Agent to controller. Agent
    /// protocol.
    AgentState = 0x4012,
    /// A client needs a server. Agent to controller. Agent protocol.
    WantServer = 0x4013,
    /// Start the server on this node. Controller to agent. Agent protocol.
    StartHere = 0x4014,
    /// Which volume clients run on your node? Agent protocol.
    NeedClients = 0x4015,
    /// The volume clients of one node. Agent protocol.
    Clients = 0x4016,
    /// A server serves. Agent to controller, controller to agents. Agent
    /// protocol.
    ServerUp = 0x4017,
    /// A server is gone. Controller to agents. Agent protocol.
    ServerDown = 0x4018,
    /// Stop serving. Controller to agent. Agent protocol.
    Fence = 0x4019,
    /// A `csnap cluster` command. Tool to controller. Agent protocol.
    ClusterCommand = 0x4020,
    /// Ask for the cluster status. Tool to controller. Agent protocol.
    ClusterStatus = 0x4021,
    /// The cluster status. Controller to tool. Agent protocol.
    ClusterStatusReply = 0x4022,
    /// A request failed, or a frame could not be decoded. Reply.
    Error = 0x8000,
    /// Answer to `Hello`. Reply.
    HelloOk = 0x8001,
    /// Answer to `Identify`. Reply.
    IdentifyOk = 0x8002,
    /// The origin write may proceed. Reply.
    OriginWriteOk = 0x8010,
    /// Where to read snapshot chunks. Reply.
    SnapshotReadReply = 0x8011,
    /// Where to write snapshot chunks. Reply.
    SnapshotWriteOk = 0x8013,
    /// Lock upload complete. Reply.
    UploadOk = 0x8015,
    /// Generic success of a control request. Reply.
    Ok = 0x8020,
    /// The snapshot list. Reply.
    SnapshotList = 0x8023,
    /// Status. Reply.
    StatusReply = 0x8024,
    /// The answer to `QueryDelta`: a bitmap of changed chunks.
    DeltaMap = 0x8025,
    /// Forget cached origin grants or snapshot mappings, then answer
    /// `RevokeDone`. Server notification: answers no request.
    Revoke = 0x8030,
    /// Give back the read locks of these chunks once their reads are done.
    /// Server notification: answers no request.
    ReleaseLocks = 0x8031,
}

/// Bit 15 of a kind code: set for kinds only the server sends.
const REPLY_BIT: u16 = 0x8000;
/// Bit 14 of a kind code: set (with bit 15 clear) for the agent protocol.
const AGENT_BIT: u16 = 0x4000;

// Body sizes of the fixed-size kinds, and of the fixed parts of the others.
const HELLO_BYTES: usize = 8;
const HELLO_OK_BYTES: usize = 16;
const IDENTIFY_BYTES: usize = 48;
const IDENTIFY_OK_BYTES: usize = 24;
const TAG_BYTES: usize = 4;
const SET_PRIORITY_BYTES: usize = 8;
const STATUS_REPLY_BYTES: usize = 96;
const QUERY_DELTA_BYTES: usize = 24;
const DELTA_MAP_FIXED_BYTES: usize = 16;
const ERROR_FIXED_BYTES: usize = 8;
const REVOKE_FIXED_BYTES: usize = 4;
const NEED_SERVER_BYTES: usize = 32;
const SERVER_ADDRESS_FIXED_BYTES: usize = 16;
const SERVER_READY_FIXED_BYTES: usize = 12;
const SERVING_BYTES: usize = 24;
const NODE_BYTES: usize = 4;
const CLIENT_GONE_BYTES: usize = 16;
const JOIN_FIXED_BYTES: usize = 8;
const MEMBERS_FIXED_BYTES: usize = 8;
const AGENT_STATE_BYTES: usize = 24;
const WANT_SERVER_BYTES: usize = 8;
const START_HERE_BYTES: usize = 24;
/// The fixed part of `StartServer` before its lists: the flags byte and 7
/// reserved bytes.
pub(crate) const START_SERVER_FIXED_BYTES: usize = 8;
/// `StartServer` / `StartHere` flag: the former server may still be running
/// (its death was not seen by its own agent): claim the store and wait out
/// its lease before reading (`Standby::claim`).
const START_FLAG_CLAIM: u8 = 1;
const NEED_CLIENTS_BYTES: usize = 16;
const CLIENTS_FIXED_BYTES: usize = 16;
const SERVER_UP_FIXED_BYTES: usize = 16;
const SERVER_DOWN_BYTES: usize = 16;
const FENCE_BYTES: usize = 8;
const CLUSTER_COMMAND_BYTES: usize = 8;
const CLUSTER_STATUS_REPLY_FIXED_BYTES: usize = 16;

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 49] = [
        Kind::Hello,
        Kind::Identify,
        Kind::QueryOriginWrite,
        Kind::QuerySnapshotRead,
        Kind::FinishSnapshotRead,
        Kind::QuerySnapshotWrite,
        Kind::UploadLocks,
        Kind::FinishUpload,
        Kind::RevokeDone,
        Kind::CreateSnapshot,
        Kind::DeleteSnapshot,
        Kind::SetPriority,
        Kind::ListSnapshots,
        Kind::Status,
        Kind::QueryDelta,
        Kind::NeedServer,
        Kind::ServerAddress,
        Kind::ServerReady,
        Kind::StartServer,
        Kind::Serving,
        Kind::NodeJoined,
        Kind::NodeLeft,
        Kind::ClientGone,
        Kind::Join,
        Kind::Members,
        Kind::AgentState,
        Kind::WantServer,
        Kind::StartHere,
        Kind::NeedClients,
        Kind::Clients,
        Kind::ServerUp,
        Kind::ServerDown,
        Kind::Fence,
        Kind::ClusterCommand,
        Kind::ClusterStatus,
        Kind::ClusterStatusReply,
        Kind::Error,
        Kind::HelloOk,
        Kind::IdentifyOk,
        Kind::OriginWriteOk,
        Kind::SnapshotReadReply,
        Kind::SnapshotWriteOk,
        Kind::UploadOk,
        Kind::Ok,
        Kind::SnapshotList,
        Kind::StatusReply,
        Kind::DeltaMap,
        Kind::Revoke,
        Kind::ReleaseLocks,
    ];

    /// Decodes a kind code.
    #[must_use]
    pub const fn from_u16(code: u16) -> Option<Kind> {
        Some(match code {
            0x0001 => Kind::Hello,
            0x0002 => Kind::Identify,
            0x0010 => Kind::QueryOriginWrite,
            0x0011 => Kind::QuerySnapshotRead,
            0x0012 => Kind::FinishSnapshotRead,
            0x0013 => Kind::QuerySnapshotWrite,
            0x0014 => Kind::UploadLocks,
            0x0015 => Kind::FinishUpload,
            0x0016 => Kind::RevokeDone,
            0x0020 => Kind::CreateSnapshot,
            0x0021 => Kind::DeleteSnapshot,
            0x0022 => Kind::SetPriority,
            0x0023 => Kind::ListSnapshots,
            0x0024 => Kind::Status,
            0x0025 => Kind::QueryDelta,
            0x4001 => Kind::NeedServer,
            0x4002 => Kind::ServerAddress,
            0x4003 => Kind::ServerReady,
            0x4004 => Kind::StartServer,
            0x4005 => Kind::Serving,
            0x4006 => Kind::NodeJoined,
            0x4007 => Kind::NodeLeft,
            0x4008 => Kind::ClientGone,
            0x4010 => Kind::Join,
            0x4011 => Kind::Members,
            0x4012 => Kind::AgentState,
            0x4013 => Kind::WantServer,
            0x4014 => Kind::StartHere,
            0x4015 => Kind::NeedClients,
            0x4016 => Kind::Clients,
            0x4017 => Kind::ServerUp,
            0x4018 => Kind::ServerDown,
            0x4019 => Kind::Fence,
            0x4020 => Kind::ClusterCommand,
            0x4021 => Kind::ClusterStatus,
            0x4022 => Kind::ClusterStatusReply,
            0x8000 => Kind::Error,
            0x8001 => Kind::HelloOk,
            0x8002 => Kind::IdentifyOk,
            0x8010 => Kind::OriginWriteOk,
            0x8011 => Kind::SnapshotReadReply,
            0x8013 => Kind::SnapshotWriteOk,
            0x8015 => Kind::UploadOk,
            0x8020 => Kind::Ok,
            0x8023 => Kind::SnapshotList,
            0x8024 => Kind::StatusReply,
            0x8025 => Kind::DeltaMap,
            0x8030 => Kind::Revoke,
            0x8031 => Kind::ReleaseLocks,
            _ => return None,
        })
    }

    /// The wire code.
    #[must_use]
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// True for kinds with bit 15 clear: those a client (or control tool)
    /// sends to the server, and the agent-protocol kinds
    /// ([`Kind::is_agent`]), which a server answers with
    /// `Error(Unsupported)`.
    #[must_use]
    pub const fn is_request(self) -> bool {
        self.code() & REPLY_BIT == 0
    }

    /// True for kinds only the server sends (bit 15 set): its replies and its
    /// notifications ([`Kind::is_notification`]). A server receiving one
    /// rejects it as out of order.
    #[must_use]
    pub const fn is_reply(self) -> bool {
        !self.is_request()
    }

    /// True for the agent protocol (bit 14 set, bit 15 clear): messages on
    /// the agent and controller sockets, neither server requests nor server
    /// replies.
    #[must_use]
    pub const fn is_agent(self) -> bool {
        self.code() & (REPLY_BIT | AGENT_BIT) == AGENT_BIT
    }

    /// True for the server's unsolicited messages, `Revoke` and
    /// `ReleaseLocks`: they have bit 15 set but answer no request, so a
    /// client must not match their request id against its outstanding
    /// requests.
    #[must_use]
    pub const fn is_notification(self) -> bool {
        matches!(self, Kind::Revoke | Kind::ReleaseLocks)
    }

    /// The message a request gets on success, `None` for requests that are
    /// not answered on success (`FinishSnapshotRead`, `UploadLocks`,
    /// `RevokeDone`, and the agent protocol's announcements), for replies and
    /// for notifications. Any request may instead be answered with `Error`.
    ///
    /// A `Revoke` is answered with `RevokeDone` (a request of the client's
    /// own, not a reply); `ReleaseLocks` by `FinishSnapshotRead` once the
    /// reads are done. In the agent protocol, answers are agent kinds too
    /// (`ClusterCommand` is answered with `Ok`).
    #[must_use]
    pub const fn success_reply(self) -> Option<Kind> {
        match self {
            Kind::Hello => Some(Kind::HelloOk),
            Kind::Identify => Some(Kind::IdentifyOk),
            Kind::QueryOriginWrite => Some(Kind::OriginWriteOk),
            Kind::QuerySnapshotRead => Some(Kind::SnapshotReadReply),
            Kind::QuerySnapshotWrite => Some(Kind::SnapshotWriteOk),
            Kind::FinishUpload => Some(Kind::UploadOk),
            Kind::CreateSnapshot | Kind::DeleteSnapshot | Kind::SetPriority => Some(Kind::Ok),
            Kind::ListSnapshots => Some(Kind::SnapshotList),
            Kind::Status => Some(Kind::StatusReply),
            Kind::QueryDelta => Some(Kind::DeltaMap),
            Kind::NeedServer => Some(Kind::ServerAddress),
            Kind::StartServer => Some(Kind::Serving),
            Kind::NeedClients => Some(Kind::Clients),
            Kind::ClusterCommand => Some(Kind::Ok),
            Kind::ClusterStatus => Some(Kind::ClusterStatusReply),
            _ => None,
        }
    }

    /// Largest body of this kind, in bytes.
    #[must_use]
    pub const fn body_max_bytes(self) -> usize {
        match self {
            Kind::Hello => HELLO_BYTES,
            Kind::HelloOk => HELLO_OK_BYTES,
            Kind::Identify => IDENTIFY_BYTES,
            Kind::IdentifyOk => IDENTIFY_OK_BYTES,
            Kind::QueryOriginWrite
            | Kind::OriginWriteOk
            | Kind::QuerySnapshotRead
            | Kind::FinishSnapshotRead
            | Kind::QuerySnapshotWrite
            | Kind::UploadLocks
            | Kind::ReleaseLocks => crate::RANGES_BYTES_MAX,
            Kind::SnapshotReadReply | Kind::SnapshotWriteOk => crate::TARGETS_BYTES_MAX,
            Kind::SnapshotList => crate::SNAP_LIST_BYTES_MAX,
            Kind::CreateSnapshot | Kind::DeleteSnapshot => TAG_BYTES,
            Kind::SetPriority => SET_PRIORITY_BYTES,
            Kind::StatusReply => STATUS_REPLY_BYTES,
            Kind::QueryDelta => QUERY_DELTA_BYTES,
            Kind::DeltaMap => DELTA_MAP_FIXED_BYTES + crate::DELTA_CHUNKS_MAX / 8,
            Kind::Error => ERROR_FIXED_BYTES + ERROR_TEXT_MAX_BYTES,
            Kind::Revoke => REVOKE_FIXED_BYTES + crate::RANGES_BYTES_MAX,
            Kind::NeedServer => NEED_SERVER_BYTES,
            Kind::ServerAddress => SERVER_ADDRESS_FIXED_BYTES + ADDR_MAX_BYTES,
            Kind::ServerReady => SERVER_READY_FIXED_BYTES + ADDR_MAX_BYTES,
            Kind::StartServer => {
                START_SERVER_FIXED_BYTES + crate::NODE_LIST_BYTES_MAX + crate::CLIENT_LIST_BYTES_MAX
            }
            Kind::Serving => SERVING_BYTES,
            Kind::NodeJoined | Kind::NodeLeft => NODE_BYTES,
            Kind::ClientGone => CLIENT_GONE_BYTES,
            Kind::Join => JOIN_FIXED_BYTES + ADDR_MAX_BYTES,
            Kind::Members => MEMBERS_FIXED_BYTES + crate::NODE_LIST_BYTES_MAX,
            Kind::AgentState => AGENT_STATE_BYTES,
            Kind::WantServer => WANT_SERVER_BYTES,
            Kind::StartHere => START_HERE_BYTES,
            Kind::NeedClients => NEED_CLIENTS_BYTES,
            Kind::Clients => CLIENTS_FIXED_BYTES + crate::CLIENT_LIST_BYTES_MAX,
            Kind::ServerUp => SERVER_UP_FIXED_BYTES + ADDR_MAX_BYTES,
            Kind::ServerDown => SERVER_DOWN_BYTES,
            Kind::Fence => FENCE_BYTES,
            Kind::ClusterCommand => CLUSTER_COMMAND_BYTES,
            Kind::ClusterStatusReply => {
                CLUSTER_STATUS_REPLY_FIXED_BYTES
                    + ADDR_MAX_BYTES
                    + crate::NODE_STATUS_LIST_BYTES_MAX
            }
            Kind::FinishUpload
            | Kind::UploadOk
            | Kind::ListSnapshots
            | Kind::Status
            | Kind::Ok
            | Kind::RevokeDone
            | Kind::ClusterStatus => 0,
        }
    }

    /// Name for logs and error messages.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Identify => "identify",
            Kind::QueryOriginWrite => "query-origin-write",
            Kind::QuerySnapshotRead => "query-snapshot-read",
            Kind::FinishSnapshotRead => "finish-snapshot-read",
            Kind::QuerySnapshotWrite => "query-snapshot-write",
            Kind::UploadLocks => "upload-locks",
            Kind::FinishUpload => "finish-upload",
            Kind::RevokeDone => "revoke-done",
            Kind::CreateSnapshot => "create-snapshot",
            Kind::DeleteSnapshot => "delete-snapshot",
            Kind::SetPriority => "set-priority",
            Kind::ListSnapshots => "list-snapshots",
            Kind::Status => "status",
            Kind::QueryDelta => "query-delta",
            Kind::NeedServer => "need-server",
            Kind::ServerAddress => "server-address",
            Kind::ServerReady => "server-ready",
            Kind::StartServer => "start-server",
            Kind::Serving => "serving",
            Kind::NodeJoined => "node-joined",
            Kind::NodeLeft => "node-left",
            Kind::ClientGone => "client-gone",
            Kind::Join => "join",
            Kind::Members => "members",
            Kind::AgentState => "agent-state",
            Kind::WantServer => "want-server",
            Kind::StartHere => "start-here",
            Kind::NeedClients => "need-clients",
            Kind::Clients => "clients",
            Kind::ServerUp => "server-up",
            Kind::ServerDown => "server-down",
            Kind::Fence => "fence",
            Kind::ClusterCommand => "cluster-command",
            Kind::ClusterStatus => "cluster-status",
            Kind::ClusterStatusReply => "cluster-status-reply",
            Kind::Error => "error",
            Kind::HelloOk => "hello-ok",
            Kind::IdentifyOk => "identify-ok",
            Kind::OriginWriteOk => "origin-write-ok",
            Kind::SnapshotReadReply => "snapshot-read-reply",
            Kind::SnapshotWriteOk => "snapshot-write-ok",
            Kind::UploadOk => "upload-ok",
            Kind::Ok => "ok",
            Kind::SnapshotList => "snapshot-list",
            Kind::StatusReply => "status-reply",
            Kind::DeltaMap => "delta-map",
            Kind::Revoke => "revoke",
            Kind::ReleaseLocks => "release-locks",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a connecting peer is, declared in `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Role {
    /// A block-device client doing data I/O on one volume.
    Client = 1,
    /// The command-line control tool.
    Control = 2,
    /// The cluster agent.
    Agent = 3,
    /// A standby server connecting to its node's agent.
    Server = 4,
}

impl Role {
    /// Decodes the wire value.
    #[must_use]
    pub fn from_u16(v: u16) -> Option<Role> {
        match v {
            1 => Some(Role::Client),
            2 => Some(Role::Control),
            3 => Some(Role::Agent),
            4 => Some(Role::Server),
            _ => None,
        }
    }
}

/// Which volume a client attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Volume {
    /// The origin.
    Origin,
    /// The snapshot with this tag.
    Snapshot(u32),
}

/// Server state in `StatusReply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ServerState {
    /// Waiting for clients of the previous incarnation to upload their locks.
    Recovering = 0,
    /// Serving requests.
    Serving = 1,
}

impl ServerState {
    /// Decodes the wire value.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<ServerState> {
        match v {
            0 => Some(ServerState::Recovering),
            1 => Some(ServerState::Serving),
            _ => None,
        }
    }
}

/// What a `Revoke` takes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum RevokeWhat {
    /// Forget every origin chunk learnt to need no copy-out (the ranges are
    /// empty).
    OriginGrants = 1,
    /// Forget the store mappings of the ranges (at least one range).
    SnapshotMappings = 2,
}

impl RevokeWhat {
    /// Decodes the wire value.
    #[must_use]
    pub fn from_u16(v: u16) -> Option<RevokeWhat> {
        match v {
            1 => Some(RevokeWhat::OriginGrants),
            2 => Some(RevokeWhat::SnapshotMappings),
            _ => None,
        }
    }
}

/// Why the controller fences an agent (`Fence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum FenceReason {
    /// The node left the cluster: stop the server and refuse clients until
    /// the node is a member again.
    LeftCluster = 1,
    /// Stop the serving server: it is being started elsewhere.
    ServerMoved = 2,
}

impl FenceReason {
    /// Decodes the wire value.
    #[must_use]
    pub fn from_u32(v: u32) -> Option<FenceReason> {
        match v {
            1 => Some(FenceReason::LeftCluster),
            2 => Some(FenceReason::ServerMoved),
            _ => None,
        }
    }
}

/// What a `csnap cluster` command asks of the controller (`ClusterCommand`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ClusterOp {
    /// The node joins the cluster.
    Join = 1,
    /// The node leaves the cluster.
    Leave = 2,
    /// Start the server on the node (answered once it serves).
    Start = 3,
    /// Clear the store's failed mark (the crash-loop breaker); node ignored.
    ClearFailed = 4,
}

impl ClusterOp {
    /// Decodes the wire value.
    #[must_use]
    pub fn from_u32(v: u32) -> Option<ClusterOp> {
        match v {
            1 => Some(ClusterOp::Join),
            2 => Some(ClusterOp::Leave),
            3 => Some(ClusterOp::Start),
            4 => Some(ClusterOp::ClearFailed),
            _ => None,
        }
    }
}

/// The `code` of an `Error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// The frame did not start with the magic.
    BadMagic = 1,
    /// No common protocol version.
    BadVersion = 2,
    /// Malformed header flags or body.
    BadFrame = 3,
    /// Frame length over the maximum.
    TooLarge = 4,
    /// Unknown message kind.
    UnknownKind = 5,
    /// The request needs a completed `Identify` (or `Hello`) first.
    NotIdentified = 6,
    /// A second `Hello` or `Identify` on one connection.
    AlreadyIdentified = 7,
    /// No snapshot with that tag.
    NoSuchSnapshot = 8,
    /// A snapshot with that tag exists already.
    SnapshotExists = 9,
    /// The store holds its maximum number of snapshots.
    TooManySnapshots = 10,
    /// Volume size, chunk size or origin identity does not match the store.
    GeometryMismatch = 11,
    /// A chunk beyond the volume.
    OutOfRange = 12,
    /// No space left in the store.
    StoreFull = 13,
    /// Backpressure: a pool is exhausted; retry later.
    Busy = 14,
    /// The server serves its maximum number of clients.
    TooManyClients = 15,
    /// The server is recovering; only identify and lock upload are served.
    Recovering = 16,
    /// The request belongs to an earlier server incarnation.
    StaleIncarnation = 17,
    /// An internal server error.
    Internal = 18,
    /// The volume or store is read-only.
    ReadOnly = 19,
    /// The request is valid but this server does not support it (or not for
    /// this role).
    Unsupported = 20,
    /// The store's metadata is corrupt at a block this request needs (the
    /// server log names it); clients map it to an I/O error.
    Corrupt = 21,
}

impl ErrorCode {
    /// Decodes the wire value.
    #[must_use]
    pub fn from_u32(v: u32) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::BadMagic,
            2 => ErrorCode::BadVersion,
            3 => ErrorCode::BadFrame,
            4 => ErrorCode::TooLarge,
            5 => ErrorCode::UnknownKind,
            6 => ErrorCode::NotIdentified,
            7 => ErrorCode::AlreadyIdentified,
            8 => ErrorCode::NoSuchSnapshot,
            9 => ErrorCode::SnapshotExists,
            10 => ErrorCode::TooManySnapshots,
            11 => ErrorCode::GeometryMismatch,
            12 => ErrorCode::OutOfRange,
            13 => ErrorCode::StoreFull,
            14 => ErrorCode::Busy,
            15 => ErrorCode::TooManyClients,
            16 => ErrorCode::Recovering,
            17 => ErrorCode::StaleIncarnation,
            18 => ErrorCode::Internal,
            19 => ErrorCode::ReadOnly,
            20 => ErrorCode::Unsupported,
            21 => ErrorCode::Corrupt,
            _ => return None,
        })
    }

    /// The wire value.
    #[must_use]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Short description.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::BadMagic => "bad magic",
            ErrorCode::BadVersion => "no common protocol version",
            ErrorCode::BadFrame => "malformed frame",
            ErrorCode::TooLarge => "frame too large",
            ErrorCode::UnknownKind => "unknown message kind",
            ErrorCode::NotIdentified => "not identified",
            ErrorCode::AlreadyIdentified => "already identified",
            ErrorCode::NoSuchSnapshot => "no such snapshot",
            ErrorCode::SnapshotExists => "snapshot exists",
            ErrorCode::TooManySnapshots => "too many snapshots",
            ErrorCode::GeometryMismatch => "geometry mismatch",
            ErrorCode::OutOfRange => "chunk out of range",
            ErrorCode::StoreFull => "snapshot store full",
            ErrorCode::Busy => "busy, retry",
            ErrorCode::TooManyClients => "too many clients",
            ErrorCode::Recovering => "server recovering",
            ErrorCode::StaleIncarnation => "stale server incarnation",
            ErrorCode::Internal => "internal server error",
            ErrorCode::ReadOnly => "read-only",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Corrupt => "store metadata corrupt",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The protocol version both ends speak, given the peer's `Hello` range:
/// the highest version this end speaks within `version_min..=version_max`.
#[must_use]
pub fn negotiate(version_min: u16, version_max: u16) -> Option<u16> {
    (version_min..=version_max)
        .contains(&PROTOCOL_VERSION)
        .then_some(PROTOCOL_VERSION)
}

// ---------------------------------------------------------------------------
// Messages.
// ---------------------------------------------------------------------------

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
    /// List the snapshots.
    ListSnapshots,
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
            Msg::ListSnapshots => Kind::ListSnapshots,
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

    /// Encoded body size.
    #[must_use]
    pub fn body_bytes(&self) -> usize {
        match self {
            Msg::QueryOriginWrite(r)
            | Msg::OriginWriteOk(r)
            | Msg::QuerySnapshotRead(r)
            | Msg::FinishSnapshotRead(r)
            | Msg::QuerySnapshotWrite(r)
            | Msg::UploadLocks(r) => r.as_bytes().len(),
            Msg::SnapshotReadReply(t) | Msg::SnapshotWriteOk(t) => t.as_bytes().len(),
            Msg::SnapshotList(s) => s.as_bytes().len(),
            Msg::DeltaMap { bits, .. } => DELTA_MAP_FIXED_BYTES + bits.len(),
            Msg::Error { text, .. } => ERROR_FIXED_BYTES + text.len(),
            Msg::Revoke { ranges, .. } => REVOKE_FIXED_BYTES + ranges.as_bytes().len(),
            Msg::ReleaseLocks(r) => r.as_bytes().len(),
            Msg::ServerAddress { addr, .. } => SERVER_ADDRESS_FIXED_BYTES + addr.len(),
            Msg::ServerReady { addr, .. } => SERVER_READY_FIXED_BYTES + addr.len(),
            Msg::StartServer {
                members, expected, ..
            } => START_SERVER_FIXED_BYTES + members.as_bytes().len() + expected.as_bytes().len(),
            Msg::Join { addr, .. } => JOIN_FIXED_BYTES + addr.len(),
            Msg::Members { members, .. } => MEMBERS_FIXED_BYTES + members.as_bytes().len(),
            Msg::Clients { clients, .. } => CLIENTS_FIXED_BYTES + clients.as_bytes().len(),
            Msg::ServerUp { addr, .. } => SERVER_UP_FIXED_BYTES + addr.len(),
            Msg::ClusterStatusReply {
                server_addr, nodes, ..
            } => CLUSTER_STATUS_REPLY_FIXED_BYTES + server_addr.len() + nodes.as_bytes().len(),
            _ => self.kind().body_max_bytes(),
        }
    }

    /// Encoded frame size (header and body).
    #[must_use]
    pub fn frame_bytes(&self) -> usize {
        HEADER_BYTES + self.body_bytes()
    }

    /// Writes the body into `b`, exactly `body_bytes()` long.
    fn write_body(&self, b: &mut [u8]) {
        b.fill(0);
        match *self {
            Msg::Hello {
                version_min,
                version_max,
                role,
            } => {
                put_u16(b, 0, version_min);
                put_u16(b, 2, version_max);
                put_u16(b, 4, role as u16);
            }
            Msg::HelloOk { version, server_id } => {
                put_u16(b, 0, version);
                put_u64(b, 8, server_id);
            }
            Msg::Identify {
                client_id,
                node_id,
                volume,
                origin_uuid,
                volume_size_bytes,
                chunk_size_bytes,
                flags,
            } => {
                put_u64(b, 0, client_id);
                put_u64(b, 8, volume_size_bytes);
                b[16..32].copy_from_slice(&origin_uuid);
                put_u32(b, 32, node_id);
                put_u32(b, 36, chunk_size_bytes);
                let (code, tag) = match volume {
                    Volume::Origin => (VOLUME_ORIGIN, 0),
                    Volume::Snapshot(tag) => (VOLUME_SNAPSHOT, tag),
                };
                put_u16(b, 40, code);
                put_u16(b, 42, flags);
                put_u32(b, 44, tag);
            }
            Msg::IdentifyOk {
                chunk_size_bytes,
                origin_size_bytes,
                volume_size_bytes,
            } => {
                put_u64(b, 0, origin_size_bytes);
                put_u64(b, 8, volume_size_bytes);
                put_u32(b, 16, chunk_size_bytes);
            }
            Msg::QueryOriginWrite(r)
            | Msg::OriginWriteOk(r)
            | Msg::QuerySnapshotRead(r)
            | Msg::FinishSnapshotRead(r)
            | Msg::QuerySnapshotWrite(r)
            | Msg::UploadLocks(r) => b.copy_from_slice(r.as_bytes()),
            Msg::SnapshotReadReply(t) | Msg::SnapshotWriteOk(t) => b.copy_from_slice(t.as_bytes()),
            Msg::SnapshotList(s) => b.copy_from_slice(s.as_bytes()),
            Msg::CreateSnapshot { tag } | Msg::DeleteSnapshot { tag } => put_u32(b, 0, tag),
            Msg::SetPriority { tag, priority } => {
                put_u32(b, 0, tag);
                put_i8(b, 4, priority);
            }
            Msg::QueryDelta {
                volume,
                base,
                chunk,
                chunks,
            } => {
                put_u64(b, 0, chunk);
                put_u32(b, 8, chunks);
                put_u32(b, 12, base);
                let (code, tag) = match volume {
                    Volume::Origin => (VOLUME_ORIGIN, 0),
                    Volume::Snapshot(tag) => (VOLUME_SNAPSHOT, tag),
                };
                put_u16(b, 16, code);
                put_u32(b, 20, tag);
            }
            Msg::DeltaMap {
                chunk,
                chunks,
                bits,
            } => {
                put_u64(b, 0, chunk);
                put_u32(b, 8, chunks);
                b[DELTA_MAP_FIXED_BYTES..].copy_from_slice(bits);
            }
            Msg::StatusReply {
                incarnation,
                chunk_size_bytes,
                origin_chunks,
                data_chunks,
                data_free,
                meta_blocks,
                meta_free,
                snapshots,
                deleting,
                clients,
                read_locks,
                waiting_writes,
                commits,
                state,
                copyouts,
            } => {
                put_u64(b, 0, incarnation);
                put_u64(b, 8, origin_chunks);
                put_u64(b, 16, data_chunks);
                put_u64(b, 24, data_free);
                put_u64(b, 32, meta_blocks);
                put_u64(b, 40, meta_free);
                put_u64(b, 48, commits);
                put_u32(b, 56, chunk_size_bytes);
                put_u32(b, 60, snapshots);
                put_u32(b, 64, deleting);
                put_u32(b, 68, clients);
                put_u32(b, 72, read_locks);
                put_u32(b, 76, waiting_writes);
                b[80] = state as u8;
                put_u64(b, 88, copyouts);
            }
            Msg::Error {
                code,
                culprit,
                text,
            } => {
                put_u32(b, 0, code.code());
                put_u16(b, 4, culprit);
                // check() bounded the text to ERROR_TEXT_MAX_BYTES.
                put_u16(b, 6, u16::try_from(text.len()).unwrap_or(u16::MAX));
                b[ERROR_FIXED_BYTES..].copy_from_slice(text.as_bytes());
            }
            Msg::Revoke { what, ranges } => {
                put_u16(b, 0, what as u16);
                b[REVOKE_FIXED_BYTES..].copy_from_slice(ranges.as_bytes());
            }
            Msg::ReleaseLocks(r) => b.copy_from_slice(r.as_bytes()),
            Msg::NeedServer {
                client_id,
                failed_incarnation,
                node_id,
                volume,
            } => {
                put_u64(b, 0, client_id);
                put_u64(b, 8, failed_incarnation);
                put_u32(b, 16, node_id);
                let (code, tag) = match volume {
                    None => (VOLUME_NONE, 0),
                    Some(Volume::Origin) => (VOLUME_ORIGIN, 0),
                    Some(Volume::Snapshot(tag)) => (VOLUME_SNAPSHOT, tag),
                };
                put_u16(b, 20, code);
                put_u32(b, 24, tag);
            }
            Msg::ServerAddress {
                incarnation,
                node_id,
                addr,
            }
            | Msg::ServerUp {
                incarnation,
                node_id,
                addr,
            } => {
                put_u64(b, 0, incarnation);
                put_u32(b, 8, node_id);
                put_addr(b, 14, SERVER_ADDRESS_FIXED_BYTES, addr);
            }
            Msg::ServerReady { pid, node_id, addr } => {
                put_u32(b, 0, pid);
                put_u32(b, 4, node_id);
                put_addr(b, 10, SERVER_READY_FIXED_BYTES, addr);
            }
            Msg::StartServer {
                claim,
                members,
                expected,
            } => {
                b[0] = if claim { START_FLAG_CLAIM } else { 0 };
                let (m, e) = b[START_SERVER_FIXED_BYTES..].split_at_mut(members.as_bytes().len());
                m.copy_from_slice(members.as_bytes());
                e.copy_from_slice(expected.as_bytes());
            }
            Msg::Serving {
                incarnation,
                start_micros,
                replayed_commits,
            } => {
                put_u64(b, 0, incarnation);
                put_u64(b, 8, start_micros);
                put_u64(b, 16, replayed_commits);
            }
            Msg::NodeJoined { node_id } | Msg::NodeLeft { node_id } => put_u32(b, 0, node_id),
            Msg::ClientGone { client_id, node_id } => {
                put_u64(b, 0, client_id);
                put_u32(b, 8, node_id);
            }
            Msg::Join { node_id, addr } => {
                put_u32(b, 0, node_id);
                put_addr(b, 6, JOIN_FIXED_BYTES, addr);
            }
            Msg::Members { epoch, members } => {
                put_u64(b, 0, epoch);
                b[MEMBERS_FIXED_BYTES..].copy_from_slice(members.as_bytes());
            }
            Msg::AgentState {
                node_id,
                standby_ready,
                serving_incarnation,
                died_incarnation,
            } => {
                put_u32(b, 0, node_id);
                b[4] = u8::from(standby_ready);
                put_u64(b, 8, serving_incarnation);
                put_u64(b, 16, died_incarnation);
            }
            Msg::WantServer { failed_incarnation } => put_u64(b, 0, failed_incarnation),
            Msg::StartHere {
                attempt,
                former_incarnation,
                claim,
            } => {
                put_u64(b, 0, attempt);
                put_u64(b, 8, former_incarnation);
                b[16] = if claim { START_FLAG_CLAIM } else { 0 };
            }
            Msg::NeedClients { gather_id, starter } => {
                put_u64(b, 0, gather_id);
                put_u32(b, 8, starter);
            }
            Msg::Clients {
                gather_id,
                from,
                to,
                clients,
            } => {
                put_u64(b, 0, gather_id);
                put_u32(b, 8, from);
                put_u32(b, 12, to);
                b[CLIENTS_FIXED_BYTES..].copy_from_slice(clients.as_bytes());
            }
            Msg::ServerDown {
                incarnation,
                node_id,
            } => {
                put_u64(b, 0, incarnation);
                put_u32(b, 8, node_id);
            }
            Msg::Fence { reason } => put_u32(b, 0, reason as u32),
            Msg::ClusterCommand { op, node_id } => {
                put_u32(b, 0, op as u32);
                put_u32(b, 4, node_id);
            }
            Msg::ClusterStatusReply {
                server_incarnation,
                server_node,
                failed_deaths,
                server_addr,
                nodes,
            } => {
                put_u64(b, 0, server_incarnation);
                put_u32(b, 8, server_node);
                b[12..14].copy_from_slice(&failed_deaths.to_le_bytes());
                put_addr(b, 14, CLUSTER_STATUS_REPLY_FIXED_BYTES, server_addr);
                b[CLUSTER_STATUS_REPLY_FIXED_BYTES + server_addr.len()..]
                    .copy_from_slice(nodes.as_bytes());
            }
            Msg::FinishUpload
            | Msg::UploadOk
            | Msg::ListSnapshots
            | Msg::Status
            | Msg::Ok
            | Msg::RevokeDone
            | Msg::ClusterStatus => {}
        }
    }
}

/// Writes an address: its length (u16) at `len_off`, its bytes at `at`.
/// `check` bounded it to [`ADDR_MAX_BYTES`].
fn put_addr(b: &mut [u8], len_off: usize, at: usize, addr: &str) {
    put_u16(b, len_off, u16::try_from(addr.len()).unwrap_or(u16::MAX));
    b[at..at + addr.len()].copy_from_slice(addr.as_bytes());
}

impl fmt::Display for Msg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().name())
    }
}

const VOLUME_NONE: u16 = 0;
const VOLUME_ORIGIN: u16 = 1;
const VOLUME_SNAPSHOT: u16 = 2;

/// Every defined `Identify` flag bit.
const IDENTIFY_FLAGS_ALL: u16 = IDENTIFY_CACHING;

/// Rules beyond the layout, shared by encode and decode so that whatever
/// encodes also decodes.
fn check(msg: &Msg<'_>) -> Result<(), &'static str> {
    match msg {
        Msg::Hello {
            version_min,
            version_max,
            ..
        } if *version_min == 0 || version_min > version_max => {
            Err("version range must satisfy 1 <= version_min <= version_max")
        }
        Msg::HelloOk { version: 0, .. } => Err("version 0"),
        Msg::QueryDelta { chunk, chunks, .. } => check_delta_range(*chunk, *chunks),
        Msg::DeltaMap {
            chunk,
            chunks,
            bits,
        } => {
            check_delta_range(*chunk, *chunks)?;
            let n = *chunks as usize;
            if bits.len() != n.div_ceil(8) {
                return Err("delta bitmap length does not match its chunk count");
            }
            let tail = n % 8;
            if tail != 0 && bits.last().is_some_and(|b| b >> tail != 0) {
                return Err("delta bitmap bits past its chunk count");
            }
            Ok(())
        }
        Msg::QuerySnapshotRead(r) | Msg::QuerySnapshotWrite(r)
            if r.total_chunks() > QUERY_CHUNKS_MAX as u64 =>
        {
            Err("query covers more than QUERY_CHUNKS_MAX chunks")
        }
        Msg::SnapshotWriteOk(t) if t.iter().any(|t| t.kind != TargetKind::Store) => {
            Err("origin target in a snapshot write reply")
        }
        Msg::Error { text, .. } if text.len() > ERROR_TEXT_MAX_BYTES => {
            Err("error text over ERROR_TEXT_MAX_BYTES")
        }
        Msg::Identify { flags, .. } if flags & !IDENTIFY_FLAGS_ALL != 0 => {
            Err("undefined identify flag bits")
        }
        Msg::Revoke { what, ranges } => match what {
            RevokeWhat::OriginGrants if !ranges.is_empty() => {
                Err("origin-grants revoke carries ranges")
            }
            RevokeWhat::SnapshotMappings if ranges.is_empty() => {
                Err("snapshot-mappings revoke without ranges")
            }
            _ => Ok(()),
        },
        Msg::NeedServer {
            client_id: 0,
            volume: Some(_),
            ..
        } => Err("client id 0 with a volume"),
        Msg::ServerAddress {
            incarnation, addr, ..
        }
        | Msg::ServerUp {
            incarnation, addr, ..
        } => {
            if *incarnation == 0 {
                return Err("server incarnation 0");
            }
            check_addr(addr)
        }
        Msg::ServerReady { addr, .. } => check_addr(addr),
        Msg::Join { node_id, addr } => {
            check_node(*node_id)?;
            check_addr(addr)
        }
        Msg::NodeJoined { node_id }
        | Msg::NodeLeft { node_id }
        | Msg::ClusterCommand { node_id, .. } => check_node(*node_id),
        Msg::ClientGone { client_id, node_id } => {
            if *client_id == 0 {
                return Err("client id 0");
            }
            check_node(*node_id)
        }
        Msg::StartHere { attempt: 0, .. } => Err("start attempt 0"),
        Msg::NeedClients { gather_id, starter } => {
            if *gather_id == 0 {
                return Err("gather id 0");
            }
            if *starter == 0 {
                return Err("starter node id 0");
            }
            Ok(())
        }
        Msg::ClusterStatusReply {
            server_incarnation,
            server_addr,
            ..
        } => {
            if server_addr.len() > ADDR_MAX_BYTES {
                return Err("address over ADDR_MAX_BYTES");
            }
            if server_addr.is_empty() && *server_incarnation != 0 {
                return Err("empty address for a server incarnation");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A delta range: `1..=DELTA_CHUNKS_MAX` chunks whose end does not
/// overflow.
fn check_delta_range(chunk: u64, chunks: u32) -> Result<(), &'static str> {
    if chunks == 0 || chunks as usize > crate::DELTA_CHUNKS_MAX {
        return Err("delta chunk count outside 1..=DELTA_CHUNKS_MAX");
    }
    if chunk.checked_add(u64::from(chunks)).is_none() {
        return Err("delta range end overflows");
    }
    Ok(())
}

/// An address that must not be empty.
fn check_addr(addr: &str) -> Result<(), &'static str> {
    if addr.len() > ADDR_MAX_BYTES {
        return Err("address over ADDR_MAX_BYTES");
    }
    if addr.is_empty() {
        return Err("empty address");
    }
    Ok(())
}

/// A node id that must name a node.
fn check_node(node_id: u32) -> Result<(), &'static str> {
    if node_id == 0 {
        return Err("node id 0");
    }
    Ok(())
}

/// The flags byte of `StartServer` and `StartHere`.
fn start_flags(f: u8) -> Result<bool, &'static str> {
    match f {
        0 => Ok(false),
        START_FLAG_CLAIM => Ok(true),
        _ => Err("unknown start flags"),
    }
}

fn exact(body: &[u8], n: usize) -> Result<(), &'static str> {
    if body.len() == n {
        Ok(())
    } else {
        Err("body length does not match the kind")
    }
}

fn reserved(body: &[u8], off: usize, n: usize) -> Result<(), &'static str> {
    if zero(body, off, n) {
        Ok(())
    } else {
        Err("nonzero reserved bytes")
    }
}

fn list<T>(r: Result<T, crate::Malformed>) -> Result<T, &'static str> {
    r.map_err(|m| m.what)
}

/// At least the fixed part of a variable-size body.
fn at_least(body: &[u8], n: usize) -> Result<(), &'static str> {
    if body.len() >= n {
        Ok(())
    } else {
        Err("body length does not match the kind")
    }
}

/// The address of a body whose fixed part, at least `fixed` bytes long (the
/// caller checked), holds the address length (u16) at `len_off`; the address
/// follows the fixed part. Returns it and the bytes after it.
fn get_addr(b: &[u8], len_off: usize, fixed: usize) -> Result<(&str, &[u8]), &'static str> {
    let n = usize::from(get_u16(b, len_off));
    if n > ADDR_MAX_BYTES {
        return Err("address over ADDR_MAX_BYTES");
    }
    let rest = &b[fixed..];
    if rest.len() < n {
        return Err("address length runs past the body");
    }
    let (a, rest) = rest.split_at(n);
    let addr = core::str::from_utf8(a).map_err(|_| "address is not UTF-8")?;
    Ok((addr, rest))
}

/// The address of a body that ends with it (see [`get_addr`]).
fn get_last_addr(b: &[u8], len_off: usize, fixed: usize) -> Result<&str, &'static str> {
    at_least(b, fixed)?;
    let (addr, rest) = get_addr(b, len_off, fixed)?;
    exact(rest, 0)?;
    Ok(addr)
}

/// Decodes a body of a known kind (layout and per-field rules; `check` runs
/// after).
fn read_body(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::Hello => {
            exact(b, HELLO_BYTES)?;
            reserved(b, 6, 2)?;
            let role = Role::from_u16(get_u16(b, 4)).ok_or("unknown role")?;
            Msg::Hello {
                version_min: get_u16(b, 0),
                version_max: get_u16(b, 2),
                role,
            }
        }
        Kind::HelloOk => {
            exact(b, HELLO_OK_BYTES)?;
            reserved(b, 2, 6)?;
            Msg::HelloOk {
                version: get_u16(b, 0),
                server_id: get_u64(b, 8),
            }
        }
        Kind::Identify => {
            exact(b, IDENTIFY_BYTES)?;
            let tag = get_u32(b, 44);
            let volume = match get_u16(b, 40) {
                VOLUME_ORIGIN if tag == 0 => Volume::Origin,
                VOLUME_ORIGIN => return Err("snapshot tag given for the origin"),
                VOLUME_SNAPSHOT => Volume::Snapshot(tag),
                _ => return Err("unknown volume kind"),
            };
            let mut origin_uuid = [0u8; 16];
            origin_uuid.copy_from_slice(&b[16..32]);
            Msg::Identify {
                client_id: get_u64(b, 0),
                volume_size_bytes: get_u64(b, 8),
                origin_uuid,
                node_id: get_u32(b, 32),
                chunk_size_bytes: get_u32(b, 36),
                volume,
                flags: get_u16(b, 42),
            }
        }
        Kind::IdentifyOk => {
            exact(b, IDENTIFY_OK_BYTES)?;
            reserved(b, 20, 4)?;
            Msg::IdentifyOk {
                origin_size_bytes: get_u64(b, 0),
                volume_size_bytes: get_u64(b, 8),
                chunk_size_bytes: get_u32(b, 16),
            }
        }
        Kind::QueryOriginWrite => Msg::QueryOriginWrite(list(Ranges::parse(b))?),
        Kind::OriginWriteOk => Msg::OriginWriteOk(list(Ranges::parse(b))?),
        Kind::QuerySnapshotRead => Msg::QuerySnapshotRead(list(Ranges::parse(b))?),
        Kind::SnapshotReadReply => Msg::SnapshotReadReply(list(Targets::parse(b))?),
        Kind::FinishSnapshotRead => Msg::FinishSnapshotRead(list(Ranges::parse(b))?),
        Kind::QuerySnapshotWrite => Msg::QuerySnapshotWrite(list(Ranges::parse(b))?),
        Kind::SnapshotWriteOk => Msg::SnapshotWriteOk(list(Targets::parse(b))?),
        Kind::UploadLocks => Msg::UploadLocks(list(Ranges::parse(b))?),
        Kind::SnapshotList => Msg::SnapshotList(list(SnapList::parse(b))?),
        Kind::CreateSnapshot => {
            exact(b, TAG_BYTES)?;
            Msg::CreateSnapshot { tag: get_u32(b, 0) }
        }
        Kind::DeleteSnapshot => {
            exact(b, TAG_BYTES)?;
            Msg::DeleteSnapshot { tag: get_u32(b, 0) }
        }
        Kind::SetPriority => {
            exact(b, SET_PRIORITY_BYTES)?;
            reserved(b, 5, 3)?;
            Msg::SetPriority {
                tag: get_u32(b, 0),
                priority: get_i8(b, 4),
            }
        }
        Kind::QueryDelta => {
            exact(b, QUERY_DELTA_BYTES)?;
            reserved(b, 18, 2)?;
            let tag = get_u32(b, 20);
            let volume = match get_u16(b, 16) {
                VOLUME_ORIGIN if tag == 0 => Volume::Origin,
                VOLUME_ORIGIN => return Err("snapshot tag given for the origin"),
                VOLUME_SNAPSHOT => Volume::Snapshot(tag),
                _ => return Err("unknown volume kind"),
            };
            Msg::QueryDelta {
                volume,
                base: get_u32(b, 12),
                chunk: get_u64(b, 0),
                chunks: get_u32(b, 8),
            }
        }
        Kind::DeltaMap => {
            at_least(b, DELTA_MAP_FIXED_BYTES)?;
            reserved(b, 12, 4)?;
            Msg::DeltaMap {
                chunk: get_u64(b, 0),
                chunks: get_u32(b, 8),
                bits: &b[DELTA_MAP_FIXED_BYTES..],
            }
        }
        Kind::StatusReply => {
            exact(b, STATUS_REPLY_BYTES)?;
            reserved(b, 81, 7)?;
            Msg::StatusReply {
                incarnation: get_u64(b, 0),
                origin_chunks: get_u64(b, 8),
                data_chunks: get_u64(b, 16),
                data_free: get_u64(b, 24),
                meta_blocks: get_u64(b, 32),
                meta_free: get_u64(b, 40),
                commits: get_u64(b, 48),
                chunk_size_bytes: get_u32(b, 56),
                snapshots: get_u32(b, 60),
                deleting: get_u32(b, 64),
                clients: get_u32(b, 68),
                read_locks: get_u32(b, 72),
                waiting_writes: get_u32(b, 76),
                state: ServerState::from_u8(b[80]).ok_or("unknown server state")?,
                copyouts: get_u64(b, 88),
            }
        }
        Kind::Error => {
            if b.len() < ERROR_FIXED_BYTES {
                return Err("body length does not match the kind");
            }
            let code = ErrorCode::from_u32(get_u32(b, 0)).ok_or("unknown error code")?;
            let text_len = usize::from(get_u16(b, 6));
            if text_len > ERROR_TEXT_MAX_BYTES {
                return Err("error text over ERROR_TEXT_MAX_BYTES");
            }
            exact(b, ERROR_FIXED_BYTES + text_len)?;
            let text = core::str::from_utf8(&b[ERROR_FIXED_BYTES..])
                .map_err(|_| "error text is not UTF-8")?;
            Msg::Error {
                code,
                culprit: get_u16(b, 4),
                text,
            }
        }
        Kind::FinishUpload => {
            exact(b, 0)?;
            Msg::FinishUpload
        }
        Kind::UploadOk => {
            exact(b, 0)?;
            Msg::UploadOk
        }
        Kind::ListSnapshots => {
            exact(b, 0)?;
            Msg::ListSnapshots
        }
        Kind::Status => {
            exact(b, 0)?;
            Msg::Status
        }
        Kind::Ok => {
            exact(b, 0)?;
            Msg::Ok
        }
        Kind::RevokeDone => {
            exact(b, 0)?;
            Msg::RevokeDone
        }
        Kind::Revoke => {
            at_least(b, REVOKE_FIXED_BYTES)?;
            reserved(b, 2, 2)?;
            let what = RevokeWhat::from_u16(get_u16(b, 0)).ok_or("unknown revoke kind")?;
            Msg::Revoke {
                what,
                ranges: list(Ranges::parse(&b[REVOKE_FIXED_BYTES..]))?,
            }
        }
        Kind::ReleaseLocks => Msg::ReleaseLocks(list(Ranges::parse(b))?),
        Kind::NeedServer => {
            exact(b, NEED_SERVER_BYTES)?;
            reserved(b, 22, 2)?;
            reserved(b, 28, 4)?;
            let tag = get_u32(b, 24);
            let volume = match get_u16(b, 20) {
                VOLUME_NONE if tag == 0 => None,
                VOLUME_NONE => return Err("snapshot tag given without a volume"),
                VOLUME_ORIGIN if tag == 0 => Some(Volume::Origin),
                VOLUME_ORIGIN => return Err("snapshot tag given for the origin"),
                VOLUME_SNAPSHOT => Some(Volume::Snapshot(tag)),
                _ => return Err("unknown volume kind"),
            };
            Msg::NeedServer {
                client_id: get_u64(b, 0),
                failed_incarnation: get_u64(b, 8),
                node_id: get_u32(b, 16),
                volume,
            }
        }
        Kind::ServerAddress => {
            at_least(b, SERVER_ADDRESS_FIXED_BYTES)?;
            reserved(b, 12, 2)?;
            Msg::ServerAddress {
                incarnation: get_u64(b, 0),
                node_id: get_u32(b, 8),
                addr: get_last_addr(b, 14, SERVER_ADDRESS_FIXED_BYTES)?,
            }
        }
        Kind::ServerReady => {
            at_least(b, SERVER_READY_FIXED_BYTES)?;
            reserved(b, 8, 2)?;
            Msg::ServerReady {
                pid: get_u32(b, 0),
                node_id: get_u32(b, 4),
                addr: get_last_addr(b, 10, SERVER_READY_FIXED_BYTES)?,
            }
        }
        Kind::StartServer => {
            if b.len() < START_SERVER_FIXED_BYTES {
                return Err("body length does not match the kind");
            }
            let claim = start_flags(b[0])?;
            reserved(b, 1, START_SERVER_FIXED_BYTES - 1)?;
            let (members, rest) = list(NodeList::parse_prefix(&b[START_SERVER_FIXED_BYTES..]))?;
            Msg::StartServer {
                claim,
                members,
                expected: list(ClientList::parse(rest))?,
            }
        }
        Kind::Serving => {
            exact(b, SERVING_BYTES)?;
            Msg::Serving {
                incarnation: get_u64(b, 0),
                start_micros: get_u64(b, 8),
                replayed_commits: get_u64(b, 16),
            }
        }
        Kind::NodeJoined => {
            exact(b, NODE_BYTES)?;
            Msg::NodeJoined {
                node_id: get_u32(b, 0),
            }
        }
        Kind::NodeLeft => {
            exact(b, NODE_BYTES)?;
            Msg::NodeLeft {
                node_id: get_u32(b, 0),
            }
        }
        Kind::ClientGone => {
            exact(b, CLIENT_GONE_BYTES)?;
            reserved(b, 12, 4)?;
            Msg::ClientGone {
                client_id: get_u64(b, 0),
                node_id: get_u32(b, 8),
            }
        }
        Kind::Join => {
            at_least(b, JOIN_FIXED_BYTES)?;
            reserved(b, 4, 2)?;
            Msg::Join {
                node_id: get_u32(b, 0),
                addr: get_last_addr(b, 6, JOIN_FIXED_BYTES)?,
            }
        }
        Kind::Members => {
            at_least(b, MEMBERS_FIXED_BYTES)?;
            Msg::Members {
                epoch: get_u64(b, 0),
                members: list(NodeList::parse(&b[MEMBERS_FIXED_BYTES..]))?,
            }
        }
        Kind::AgentState => {
            exact(b, AGENT_STATE_BYTES)?;
            reserved(b, 5, 3)?;
            let standby_ready = match b[4] {
                0 => false,
                1 => true,
                _ => return Err("standby flag is neither 0 nor 1"),
            };
            Msg::AgentState {
                node_id: get_u32(b, 0),
                standby_ready,
                serving_incarnation: get_u64(b, 8),
                died_incarnation: get_u64(b, 16),
            }
        }
        Kind::WantServer => {
            exact(b, WANT_SERVER_BYTES)?;
            Msg::WantServer {
                failed_incarnation: get_u64(b, 0),
            }
        }
        Kind::StartHere => {
            exact(b, START_HERE_BYTES)?;
            reserved(b, 17, 7)?;
            Msg::StartHere {
                attempt: get_u64(b, 0),
                former_incarnation: get_u64(b, 8),
                claim: start_flags(b[16])?,
            }
        }
        Kind::NeedClients => {
            exact(b, NEED_CLIENTS_BYTES)?;
            reserved(b, 12, 4)?;
            Msg::NeedClients {
                gather_id: get_u64(b, 0),
                starter: get_u32(b, 8),
            }
        }
        Kind::Clients => {
            at_least(b, CLIENTS_FIXED_BYTES)?;
            Msg::Clients {
                gather_id: get_u64(b, 0),
                from: get_u32(b, 8),
                to: get_u32(b, 12),
                clients: list(ClientList::parse(&b[CLIENTS_FIXED_BYTES..]))?,
            }
        }
        Kind::ServerUp => {
            at_least(b, SERVER_UP_FIXED_BYTES)?;
            reserved(b, 12, 2)?;
            Msg::ServerUp {
                incarnation: get_u64(b, 0),
                node_id: get_u32(b, 8),
                addr: get_last_addr(b, 14, SERVER_UP_FIXED_BYTES)?,
            }
        }
        Kind::ServerDown => {
            exact(b, SERVER_DOWN_BYTES)?;
            reserved(b, 12, 4)?;
            Msg::ServerDown {
                incarnation: get_u64(b, 0),
                node_id: get_u32(b, 8),
            }
        }
        Kind::Fence => {
            exact(b, FENCE_BYTES)?;
            reserved(b, 4, 4)?;
            Msg::Fence {
                reason: FenceReason::from_u32(get_u32(b, 0)).ok_or("unknown fence reason")?,
            }
        }
        Kind::ClusterCommand => {
            exact(b, CLUSTER_COMMAND_BYTES)?;
            Msg::ClusterCommand {
                op: ClusterOp::from_u32(get_u32(b, 0)).ok_or("unknown cluster op")?,
                node_id: get_u32(b, 4),
            }
        }
        Kind::ClusterStatus => {
            exact(b, 0)?;
            Msg::ClusterStatus
        }
        Kind::ClusterStatusReply => {
            at_least(b, CLUSTER_STATUS_REPLY_FIXED_BYTES)?;
            let (server_addr, rest) = get_addr(b, 14, CLUSTER_STATUS_REPLY_FIXED_BYTES)?;
            Msg::ClusterStatusReply {
                server_incarnation: get_u64(b, 0),
                server_node: get_u32(b, 8),
                failed_deaths: u16::from_le_bytes([b[12], b[13]]),
                server_addr,
                nodes: list(NodeStatusList::parse(rest))?,
            }
        }
    })
}

// ---------------------------------------------------------------------------
// Header and frames.
// ---------------------------------------------------------------------------

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_KIND: usize = 6;
const OFF_LENGTH: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_REQUEST_ID: usize = 16;
const OFF_INCARNATION: usize = 24;

/// The 32-byte frame header.
///
/// On decode every field is as found (`kind` raw, so an unknown kind can be
/// answered with its code). On encode `kind` and `length` are ignored (taken
/// from the message and computed), `version` must be [`PROTOCOL_VERSION`] and
/// `flags` 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Protocol version.
    pub version: u16,
    /// Raw kind code; see [`Header::known_kind`].
    pub kind: u16,
    /// Whole frame length, header included.
    pub length: u32,
    /// Flags; none defined, must be 0.
    pub flags: u32,
    /// Chosen by the requester, echoed by the reply.
    pub request_id: u64,
    /// The server's incarnation in server frames, 0 in client frames.
    pub incarnation: u64,
}

impl Header {
    /// A header to encode with: current version, no flags. Clients pass
    /// incarnation 0.
    #[must_use]
    pub const fn new(request_id: u64, incarnation: u64) -> Header {
        Header {
            version: PROTOCOL_VERSION,
            kind: 0,
            length: 0,
            flags: 0,
            request_id,
            incarnation,
        }
    }

    /// The kind, when this version defines the code.
    #[must_use]
    pub const fn known_kind(&self) -> Option<Kind> {
        Kind::from_u16(self.kind)
    }
}

/// Validates as much of a header as `buf` holds and returns it once all 32
/// bytes are there.
///
/// Checked as soon as present: the magic (byte by byte), the version (6
/// bytes), the length bounds (12 bytes). So garbage or an oversized frame is
/// rejected before its body (or even its whole header) arrives. `Ok(None)`
/// means "valid so far, need more bytes". Kind, flags and body are checked
/// by [`decode`].
pub fn peek_header(buf: &[u8]) -> Result<Option<Header>, DecodeError> {
    let magic = MAGIC.to_le_bytes();
    let n = buf.len().min(magic.len());
    if buf[..n] != magic[..n] {
        return Err(DecodeError::BadMagic);
    }
    if buf.len() >= OFF_VERSION + 2 {
        let version = get_u16(buf, OFF_VERSION);
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::BadVersion { found: version });
        }
    }
    if buf.len() >= OFF_LENGTH + 4 {
        let len = get_u32(buf, OFF_LENGTH);
        if (len as usize) < HEADER_BYTES {
            return Err(DecodeError::TooShort { len });
        }
        if len as usize > FRAME_MAX_BYTES {
            return Err(DecodeError::TooLarge { len });
        }
    }
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    Ok(Some(Header {
        version: get_u16(buf, OFF_VERSION),
        kind: get_u16(buf, OFF_KIND),
        length: get_u32(buf, OFF_LENGTH),
        flags: get_u32(buf, OFF_FLAGS),
        request_id: get_u64(buf, OFF_REQUEST_ID),
        incarnation: get_u64(buf, OFF_INCARNATION),
    }))
}

/// Decodes exactly one frame (`frame.len()` equal to its length field).
///
/// Checks in order: header ([`peek_header`]), completeness (`Truncated`),
/// no trailing bytes, flags, kind, body layout and values. The message
/// borrows list bodies, error text and addresses from `frame`.
pub fn decode(frame: &[u8]) -> Result<(Header, Msg<'_>), DecodeError> {
    let hdr = peek_header(frame)?.ok_or(DecodeError::Truncated)?;
    let len = hdr.length as usize;
    if frame.len() < len {
        return Err(DecodeError::Truncated);
    }
    if frame.len() > len {
        return Err(DecodeError::TrailingBytes {
            len: hdr.length,
            have: frame.len(),
        });
    }
    if hdr.flags != 0 {
        return Err(DecodeError::BadFlags);
    }
    let kind = Kind::from_u16(hdr.kind).ok_or(DecodeError::UnknownKind { code: hdr.kind })?;
    let body = &frame[HEADER_BYTES..];
    let msg = read_body(kind, body)
        .and_then(|m| check(&m).map(|()| m))
        .map_err(|what| DecodeError::BadBody { kind, what })?;
    Ok((hdr, msg))
}

/// Encodes one frame into the front of `out` and returns its length.
///
/// Takes `version`, `flags`, `request_id` and `incarnation` from `hdr`;
/// writes the message's kind and the computed length. Writes nothing when it
/// fails. Everything `encode` accepts, [`decode`] accepts and returns equal.
pub fn encode(hdr: &Header, msg: &Msg<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    if hdr.version != PROTOCOL_VERSION {
        return Err(EncodeError::Invalid {
            what: "header version is not PROTOCOL_VERSION",
        });
    }
    if hdr.flags != 0 {
        return Err(EncodeError::Invalid {
            what: "nonzero header flags",
        });
    }
    check(msg).map_err(|what| EncodeError::Invalid { what })?;
    let n = msg.frame_bytes();
    if n > FRAME_MAX_BYTES {
        return Err(EncodeError::Invalid {
            what: "frame over FRAME_MAX_BYTES",
        });
    }
    if out.len() < n {
        return Err(EncodeError::BufferTooSmall {
            need: n,
            have: out.len(),
        });
    }
    let length = u32::try_from(n).map_err(|_| EncodeError::Invalid {
        what: "frame over FRAME_MAX_BYTES",
    })?;
    let frame = &mut out[..n];
    put_u32(frame, OFF_MAGIC, MAGIC);
    put_u16(frame, OFF_VERSION, PROTOCOL_VERSION);
    put_u16(frame, OFF_KIND, msg.kind().code());
    put_u32(frame, OFF_LENGTH, length);
    put_u32(frame, OFF_FLAGS, 0);
    put_u64(frame, OFF_REQUEST_ID, hdr.request_id);
    put_u64(frame, OFF_INCARNATION, hdr.incarnation);
    msg.write_body(&mut frame[HEADER_BYTES..]);
    Ok(n)
}

// ---------------------------------------------------------------------------
// Error text without allocation.
// ---------------------------------------------------------------------------

/// A fixed buffer for an `Error` message's text, written with `write!`.
/// Text past [`ERROR_TEXT_MAX_BYTES`] is dropped at a character boundary, so
/// formatting never fails and never allocates.
///
/// ```
/// use core::fmt::Write;
/// use csnap_proto::{DecodeError, ErrorText};
/// let mut t = ErrorText::new();
/// write!(t, "{}", DecodeError::UnknownKind { code: 0x77 }).unwrap();
/// assert_eq!(t.as_str(), "unknown message kind 0x0077");
/// ```
#[derive(Clone)]
pub struct ErrorText {
    buf: [u8; ERROR_TEXT_MAX_BYTES],
    len: usize,
    truncated: bool,
}

impl ErrorText {
    /// Empty text.
    #[must_use]
    pub const fn new() -> ErrorText {
        ErrorText {
            buf: [0; ERROR_TEXT_MAX_BYTES],
            len: 0,
            truncated: false,
        }
    }

    /// The text so far.
    #[must_use]
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// True when some text was dropped for lack of room.
    #[must_use]
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Empties the text.
    pub fn clear(&mut self) {
        self.len = 0;
        self.truncated = false;
    }
}

impl Default for ErrorText {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for ErrorText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = ERROR_TEXT_MAX_BYTES - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.truncated = true;
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ErrorText").field(&self.as_str()).finish()
    }
}
