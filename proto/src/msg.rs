//! Message kinds, the header, and encoding and decoding of whole frames.

use core::fmt;

use crate::error::{DecodeError, EncodeError};
use crate::list::{Ranges, SnapList, TargetKind, Targets};
use crate::wire::{get_i8, get_u16, get_u32, get_u64, put_i8, put_u16, put_u32, put_u64, zero};
use crate::{
    ERROR_TEXT_MAX_BYTES, FRAME_MAX_BYTES, HEADER_BYTES, MAGIC, PROTOCOL_VERSION, QUERY_CHUNKS_MAX,
};

// ---------------------------------------------------------------------------
// Kinds.
// ---------------------------------------------------------------------------

/// Message kind: the `kind` field of the header. Requests have bit 15 clear,
/// replies have it set; a request's success reply, where it has its own, is
/// its code with bit 15 set.
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
}

/// Bit 15 of a kind code: set for replies.
const REPLY_BIT: u16 = 0x8000;

// Body sizes of the fixed-size kinds.
const HELLO_BYTES: usize = 8;
const HELLO_OK_BYTES: usize = 16;
const IDENTIFY_BYTES: usize = 48;
const IDENTIFY_OK_BYTES: usize = 24;
const TAG_BYTES: usize = 4;
const SET_PRIORITY_BYTES: usize = 8;
const STATUS_REPLY_BYTES: usize = 88;
const ERROR_FIXED_BYTES: usize = 8;

impl Kind {
    /// Every kind, in code order within requests and replies.
    pub const ALL: [Kind; 23] = [
        Kind::Hello,
        Kind::Identify,
        Kind::QueryOriginWrite,
        Kind::QuerySnapshotRead,
        Kind::FinishSnapshotRead,
        Kind::QuerySnapshotWrite,
        Kind::UploadLocks,
        Kind::FinishUpload,
        Kind::CreateSnapshot,
        Kind::DeleteSnapshot,
        Kind::SetPriority,
        Kind::ListSnapshots,
        Kind::Status,
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
            0x0020 => Kind::CreateSnapshot,
            0x0021 => Kind::DeleteSnapshot,
            0x0022 => Kind::SetPriority,
            0x0023 => Kind::ListSnapshots,
            0x0024 => Kind::Status,
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
            _ => return None,
        })
    }

    /// The wire code.
    #[must_use]
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// True for kinds a client (or control tool) sends to the server.
    #[must_use]
    pub const fn is_request(self) -> bool {
        self.code() & REPLY_BIT == 0
    }

    /// True for kinds only the server sends. A server receiving one rejects
    /// it as out of order.
    #[must_use]
    pub const fn is_reply(self) -> bool {
        !self.is_request()
    }

    /// The reply a request gets on success, `None` for requests that are not
    /// answered on success (`FinishSnapshotRead`, `UploadLocks`) and for
    /// replies. Any request may instead be answered with `Error`.
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
            | Kind::UploadLocks => crate::RANGES_BYTES_MAX,
            Kind::SnapshotReadReply | Kind::SnapshotWriteOk => crate::TARGETS_BYTES_MAX,
            Kind::SnapshotList => crate::SNAP_LIST_BYTES_MAX,
            Kind::CreateSnapshot | Kind::DeleteSnapshot => TAG_BYTES,
            Kind::SetPriority => SET_PRIORITY_BYTES,
            Kind::StatusReply => STATUS_REPLY_BYTES,
            Kind::Error => ERROR_FIXED_BYTES + ERROR_TEXT_MAX_BYTES,
            Kind::FinishUpload | Kind::UploadOk | Kind::ListSnapshots | Kind::Status | Kind::Ok => {
                0
            }
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
            Kind::CreateSnapshot => "create-snapshot",
            Kind::DeleteSnapshot => "delete-snapshot",
            Kind::SetPriority => "set-priority",
            Kind::ListSnapshots => "list-snapshots",
            Kind::Status => "status",
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
}

impl Role {
    /// Decodes the wire value.
    #[must_use]
    pub fn from_u16(v: u16) -> Option<Role> {
        match v {
            1 => Some(Role::Client),
            2 => Some(Role::Control),
            3 => Some(Role::Agent),
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

/// A decoded message, or one to encode. List bodies and the error text borrow
/// from the frame (decoding) or from caller buffers (encoding).
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
            Msg::Ok => Kind::Ok,
            Msg::SnapshotList(_) => Kind::SnapshotList,
            Msg::StatusReply { .. } => Kind::StatusReply,
            Msg::Error { .. } => Kind::Error,
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
            Msg::Error { text, .. } => ERROR_FIXED_BYTES + text.len(),
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
            Msg::FinishUpload | Msg::UploadOk | Msg::ListSnapshots | Msg::Status | Msg::Ok => {}
        }
    }
}

impl fmt::Display for Msg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().name())
    }
}

const VOLUME_ORIGIN: u16 = 1;
const VOLUME_SNAPSHOT: u16 = 2;

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
        _ => Ok(()),
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
            reserved(b, 42, 2)?;
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
/// borrows list bodies and error text from `frame`.
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
