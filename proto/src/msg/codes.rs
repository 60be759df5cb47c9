//! The small enumerations carried in message fields (roles, volumes,
//! states, reasons, error codes), each with its wire value, and version
//! negotiation.

use core::fmt;

use crate::PROTOCOL_VERSION;

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
