//! Message kinds: the one table of codes and names ([`kinds!`]), the
//! groups a code's top bits give, the families encode and decode dispatch
//! on, and each kind's largest body.
//!
//! A new message kind is one line in the `kinds!` table below (doc, name,
//! code, log name); its code picks its [`Family`].

use core::fmt;

use super::layout::*;
use crate::{ADDR_MAX_BYTES, ERROR_TEXT_MAX_BYTES};

/// Declares [`Kind`] from one table: each row is a kind's doc comment, its
/// name, its wire code and its name in logs. Generates the enum,
/// `Kind::ALL` (in table order, which is code order), `Kind::from_u16` and
/// `Kind::name`, so a code or a name is written once.
macro_rules! kinds {
    ($($(#[$doc:meta])* $kind:ident = $code:literal, $name:literal;)*) => {
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
            $($(#[$doc])* $kind = $code,)*
        }

        impl Kind {
            /// Every kind, in code order.
            pub const ALL: [Kind; [$($code),*].len()] = [$(Kind::$kind),*];

            /// Decodes a kind code.
            #[must_use]
            pub const fn from_u16(code: u16) -> Option<Kind> {
                Some(match code {
                    $($code => Kind::$kind,)*
                    _ => return None,
                })
            }

            /// Name for logs and error messages.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Kind::$kind => $name,)*
                }
            }
        }
    };
}

kinds! {
    /// Handshake: versions spoken and role. Request.
    Hello = 0x0001, "hello";
    /// Attach a client to a volume. Request.
    Identify = 0x0002, "identify";
    /// May these origin chunks be written? Request.
    QueryOriginWrite = 0x0010, "query-origin-write";
    /// Where are these snapshot chunks? Request.
    QuerySnapshotRead = 0x0011, "query-snapshot-read";
    /// Release the read locks of origin targets. Request, no reply.
    FinishSnapshotRead = 0x0012, "finish-snapshot-read";
    /// Where do these snapshot chunks go? Request.
    QuerySnapshotWrite = 0x0013, "query-snapshot-write";
    /// Re-declare read locks held across a failover. Request, no reply.
    UploadLocks = 0x0014, "upload-locks";
    /// All locks uploaded. Request.
    FinishUpload = 0x0015, "finish-upload";
    /// A `Revoke` is carried out (its request id echoed). Request, no reply.
    RevokeDone = 0x0016, "revoke-done";
    /// Create a snapshot. Request.
    CreateSnapshot = 0x0020, "create-snapshot";
    /// Delete a snapshot. Request.
    DeleteSnapshot = 0x0021, "delete-snapshot";
    /// Set a snapshot's store-full priority. Request.
    SetPriority = 0x0022, "set-priority";
    /// List the snapshots. Request.
    ListSnapshots = 0x0023, "list-snapshots";
    /// Server and store status. Request.
    Status = 0x0024, "status";
    /// Which chunks of a volume differ from a snapshot (control).
    QueryDelta = 0x0025, "query-delta";
    /// Where is the server? Client or tool to its agent. Agent protocol.
    NeedServer = 0x4001, "need-server";
    /// The serving server's address. Agent to client. Agent protocol.
    ServerAddress = 0x4002, "server-address";
    /// A standby server is ready to start. Standby to its agent. Agent
    /// protocol.
    ServerReady = 0x4003, "server-ready";
    /// Start serving. Agent to its standby. Agent protocol.
    StartServer = 0x4004, "start-server";
    /// The server serves. Server to its agent. Agent protocol.
    Serving = 0x4005, "serving";
    /// A node joined the cluster. Agent to its server. Agent protocol.
    NodeJoined = 0x4006, "node-joined";
    /// A node left the cluster. Agent to its server. Agent protocol.
    NodeLeft = 0x4007, "node-left";
    /// A client of a departed incarnation will not come back. Agent
    /// protocol.
    ClientGone = 0x4008, "client-gone";
    /// Every live volume client of one node, complete (a restarted agent's
    /// list, once its clients had the time to reconnect). Agent protocol.
    ClientsOf = 0x4009, "clients-of";
    /// An agent joins the controller. Agent protocol.
    Join = 0x4010, "join";
    /// The cluster members. Controller to agents. Agent protocol.
    Members = 0x4011, "members";
    /// An agent's standby and server state. Agent to controller. Agent
    /// protocol.
    AgentState = 0x4012, "agent-state";
    /// A client needs a server. Agent to controller. Agent protocol.
    WantServer = 0x4013, "want-server";
    /// Start the server on this node. Controller to agent. Agent protocol.
    StartHere = 0x4014, "start-here";
    /// Which volume clients run on your node? Agent protocol.
    NeedClients = 0x4015, "need-clients";
    /// The volume clients of one node. Agent protocol.
    Clients = 0x4016, "clients";
    /// A server serves. Agent to controller, controller to agents. Agent
    /// protocol.
    ServerUp = 0x4017, "server-up";
    /// A server is gone. Controller to agents. Agent protocol.
    ServerDown = 0x4018, "server-down";
    /// Stop serving. Controller to agent. Agent protocol.
    Fence = 0x4019, "fence";
    /// A `csnap cluster` command. Tool to controller. Agent protocol.
    ClusterCommand = 0x4020, "cluster-command";
    /// Ask for the cluster status. Tool to controller. Agent protocol.
    ClusterStatus = 0x4021, "cluster-status";
    /// The cluster status. Controller to tool. Agent protocol.
    ClusterStatusReply = 0x4022, "cluster-status-reply";
    /// A request failed, or a frame could not be decoded. Reply.
    Error = 0x8000, "error";
    /// Answer to `Hello`. Reply.
    HelloOk = 0x8001, "hello-ok";
    /// Answer to `Identify`. Reply.
    IdentifyOk = 0x8002, "identify-ok";
    /// The origin write may proceed. Reply.
    OriginWriteOk = 0x8010, "origin-write-ok";
    /// Where to read snapshot chunks. Reply.
    SnapshotReadReply = 0x8011, "snapshot-read-reply";
    /// Where to write snapshot chunks. Reply.
    SnapshotWriteOk = 0x8013, "snapshot-write-ok";
    /// Lock upload complete. Reply.
    UploadOk = 0x8015, "upload-ok";
    /// Generic success of a control request. Reply.
    Ok = 0x8020, "ok";
    /// The snapshot list. Reply.
    SnapshotList = 0x8023, "snapshot-list";
    /// Status. Reply.
    StatusReply = 0x8024, "status-reply";
    /// The answer to `QueryDelta`: a bitmap of changed chunks.
    DeltaMap = 0x8025, "delta-map";
    /// Forget cached origin grants or snapshot mappings, then answer
    /// `RevokeDone`. Server notification: answers no request.
    Revoke = 0x8030, "revoke";
    /// Give back the read locks of these chunks once their reads are done.
    /// Server notification: answers no request.
    ReleaseLocks = 0x8031, "release-locks";
}

/// Bit 15 of a kind code: set for kinds only the server sends.
const REPLY_BIT: u16 = 0x8000;
/// Bit 14 of a kind code: set (with bit 15 clear) for the agent protocol.
const AGENT_BIT: u16 = 0x4000;

impl Kind {
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
            Kind::CreateSnapshot | Kind::DeleteSnapshot | Kind::ListSnapshots => TAG_BYTES,
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
            Kind::ClientsOf => CLIENTS_OF_FIXED_BYTES + crate::CLIENT_LIST_BYTES_MAX,
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
            | Kind::Status
            | Kind::Ok
            | Kind::RevokeDone
            | Kind::ClusterStatus => 0,
        }
    }

    /// The family of the kind: where its body is written
    /// (`encoding.rs`, `write_<family>`) and read (`decoding.rs`,
    /// `read_<family>`). Given by the code with the reply bit cleared, so a
    /// request and its reply share a family.
    #[must_use]
    pub(crate) const fn family(self) -> Family {
        match self.code() & !REPLY_BIT {
            0x0000..=0x000F => Family::Session,
            0x0010..=0x001F => Family::Locks,
            0x0020..=0x0023 => Family::Snapshots,
            0x0024..=0x002F => Family::Status,
            0x0030..=0x003F => Family::Notice,
            0x4000..=0x4003 => Family::Locate,
            0x4004..=0x400F => Family::Hosting,
            0x4010..=0x4012 => Family::Membership,
            0x4013..=0x401F => Family::Placement,
            0x4020..=0x402F => Family::Control,
            _ => panic!("kind code outside every family"),
        }
    }
}

/// Kinds grouped by the job they do, requests with their replies; each has
/// one body writer in `encoding.rs` and one body reader in `decoding.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// `Hello`, `Identify`, their replies, and `Error`.
    Session,
    /// The chunk-lock requests of data I/O and their replies.
    Locks,
    /// Creating, deleting, prioritising and listing snapshots; `Ok`.
    Snapshots,
    /// `Status` and `QueryDelta` and their replies.
    Status,
    /// The server's notifications, `Revoke` and `ReleaseLocks`.
    Notice,
    /// Agent protocol: finding the server (`NeedServer`, `ServerAddress`,
    /// `ServerReady`).
    Locate,
    /// Agent protocol: starting and running a local server (`StartServer`,
    /// `Serving`, node and client notices).
    Hosting,
    /// Agent protocol: cluster membership (`Join`, `Members`, `AgentState`).
    Membership,
    /// Agent protocol: where the server runs (`WantServer` to `Fence`).
    Placement,
    /// The control tool and the controller (`ClusterCommand`,
    /// `ClusterStatus` and its reply).
    Control,
}

// Every kind has a family (`family` panics at compile time otherwise).
const _: () = {
    let mut i = 0;
    while i < Kind::ALL.len() {
        let _ = Kind::ALL[i].family();
        i += 1;
    }
};

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
