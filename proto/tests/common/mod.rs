//! Sample messages of every kind, built into caller buffers (no allocation),
//! shared by the test binaries.

#![allow(dead_code)]

use csnap_proto::*;

/// Scratch space for the list bodies of the samples.
pub struct Scratch {
    pub ranges: [u8; RANGES_BYTES_MAX],
    pub targets: [u8; TARGETS_BYTES_MAX],
    pub snaps: [u8; SNAP_LIST_BYTES_MAX],
    pub nodes: [u8; NODE_LIST_BYTES_MAX],
    pub clients: [u8; CLIENT_LIST_BYTES_MAX],
    pub statuses: [u8; NODE_STATUS_LIST_BYTES_MAX],
    pub delta: [u8; DELTA_CHUNKS_MAX / 8],
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            ranges: [0; RANGES_BYTES_MAX],
            targets: [0; TARGETS_BYTES_MAX],
            snaps: [0; SNAP_LIST_BYTES_MAX],
            nodes: [0; NODE_LIST_BYTES_MAX],
            clients: [0; CLIENT_LIST_BYTES_MAX],
            statuses: [0; NODE_STATUS_LIST_BYTES_MAX],
            delta: [0; DELTA_CHUNKS_MAX / 8],
        }
    }
}

/// 200 bytes of UTF-8 with multi-byte characters.
pub const LONG_TEXT: &str = "é—ü snapshot store full: every snapshot has priority 127, \
no snapshot can be chosen for deletion; origin write refused until space is freed or a \
priority is lowered. ☃ end.......................";

/// 200 bytes of UTF-8 (`ADDR_MAX_BYTES`) with multi-byte characters: the
/// longest address.
pub const LONG_ADDR: &str = concat!(
    "/run/csnap/agents/nœud-3/€/",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "/server.sock"
);

/// The nodes of a sample node list: `n` of them, extreme ids when `big`.
fn node_list(big: bool, buf: &mut [u8]) -> NodeList<'_> {
    let mut b = NodeListBuilder::new(buf).unwrap();
    let n = if big { NODES_MAX } else { 3 };
    for i in 0..u32::try_from(n).unwrap() {
        b.push(Node {
            id: if big { u32::MAX - i } else { i + 1 },
        })
        .unwrap();
    }
    b.finish()
}

/// A sample client list: full and extreme when `big`.
fn client_list(big: bool, buf: &mut [u8]) -> ClientList<'_> {
    let mut b = ClientListBuilder::new(buf).unwrap();
    let n = if big { CLIENT_ENTRIES_MAX } else { 2 };
    for i in 0..n as u64 {
        b.push(ClientEntry {
            client_id: if big { u64::MAX - i } else { 77 + i },
            node_id: if big && i == 0 {
                u32::MAX
            } else {
                u32::try_from(i % 7).unwrap() + 1
            },
        })
        .unwrap();
    }
    b.finish()
}

/// A sample message of `kind`. `big` fills lists to their maxima and uses
/// extreme field values; otherwise a small typical message.
pub fn sample(kind: Kind, big: bool, s: &mut Scratch) -> Msg<'_> {
    let Scratch {
        ranges,
        targets,
        snaps,
        nodes,
        clients,
        statuses,
        delta,
    } = s;
    match kind {
        Kind::Hello => Msg::Hello {
            version_min: 1,
            version_max: if big { u16::MAX } else { 1 },
            role: if big { Role::Agent } else { Role::Client },
        },
        Kind::HelloOk => Msg::HelloOk {
            version: 1,
            server_id: if big { u64::MAX } else { 0x5eed },
        },
        Kind::Identify => Msg::Identify {
            client_id: if big { u64::MAX } else { 77 },
            node_id: if big { u32::MAX } else { 3 },
            volume: if big {
                Volume::Snapshot(u32::MAX)
            } else {
                Volume::Origin
            },
            origin_uuid: core::array::from_fn(|i| u8::try_from(i * 17 % 256).unwrap_or(0)),
            volume_size_bytes: if big { u64::MAX } else { 1 << 30 },
            chunk_size_bytes: if big { u32::MAX } else { 16384 },
            flags: if big { IDENTIFY_CACHING } else { 0 },
        },
        Kind::IdentifyOk => Msg::IdentifyOk {
            chunk_size_bytes: 16384,
            origin_size_bytes: if big { u64::MAX } else { 1 << 30 },
            volume_size_bytes: if big { u64::MAX - 1 } else { 1 << 29 },
        },
        Kind::QueryOriginWrite
        | Kind::OriginWriteOk
        | Kind::FinishSnapshotRead
        | Kind::UploadLocks
        | Kind::QuerySnapshotRead
        | Kind::QuerySnapshotWrite
        | Kind::Revoke
        | Kind::ReleaseLocks => {
            let query = matches!(kind, Kind::QuerySnapshotRead | Kind::QuerySnapshotWrite);
            let mut b = RangesBuilder::new(ranges).unwrap();
            if big {
                for i in 0..RANGES_MAX as u64 {
                    let r = if query {
                        // QUERY_CHUNKS_MAX / RANGES_MAX chunks each: the full budget.
                        Range {
                            chunk: i * 1000,
                            chunks: u32::try_from(QUERY_CHUNKS_MAX / RANGES_MAX).unwrap(),
                        }
                    } else {
                        // Extreme runs ending exactly at u64::MAX.
                        Range {
                            chunk: u64::MAX - u64::from(u32::MAX) - i,
                            chunks: u32::MAX,
                        }
                    };
                    b.push(r).unwrap();
                }
            } else {
                b.push(Range {
                    chunk: 12,
                    chunks: 1,
                })
                .unwrap();
                b.push(Range {
                    chunk: 900,
                    chunks: 3,
                })
                .unwrap();
            }
            let r = b.finish();
            match kind {
                Kind::QueryOriginWrite => Msg::QueryOriginWrite(r),
                Kind::OriginWriteOk => Msg::OriginWriteOk(r),
                Kind::FinishSnapshotRead => Msg::FinishSnapshotRead(r),
                Kind::UploadLocks => Msg::UploadLocks(r),
                Kind::QuerySnapshotRead => Msg::QuerySnapshotRead(r),
                Kind::Revoke => Msg::Revoke {
                    what: RevokeWhat::SnapshotMappings,
                    ranges: r,
                },
                Kind::ReleaseLocks => Msg::ReleaseLocks(r),
                _ => Msg::QuerySnapshotWrite(r),
            }
        }
        Kind::SnapshotReadReply | Kind::SnapshotWriteOk => {
            let write = kind == Kind::SnapshotWriteOk;
            let mut b = TargetsBuilder::new(targets).unwrap();
            let n = if big { TARGETS_MAX } else { 3 };
            for i in 0..n as u64 {
                let origin = !write && i % 3 == 1;
                b.push(Target {
                    chunk: i * 7,
                    chunks: if big && i == 0 {
                        u32::MAX
                    } else {
                        1 + (i % 5) as u32
                    },
                    kind: if origin {
                        TargetKind::Origin
                    } else {
                        TargetKind::Store
                    },
                    store_chunk: if origin {
                        0
                    } else if big && i == 5 {
                        u64::MAX - 5
                    } else {
                        1000 + i
                    },
                })
                .unwrap();
            }
            let t = b.finish();
            if write {
                Msg::SnapshotWriteOk(t)
            } else {
                Msg::SnapshotReadReply(t)
            }
        }
        Kind::FinishUpload => Msg::FinishUpload,
        Kind::UploadOk => Msg::UploadOk,
        Kind::CreateSnapshot => Msg::CreateSnapshot {
            tag: if big { u32::MAX } else { 4 },
        },
        Kind::DeleteSnapshot => Msg::DeleteSnapshot {
            tag: if big { u32::MAX } else { 4 },
        },
        Kind::SetPriority => Msg::SetPriority {
            tag: if big { u32::MAX } else { 7 },
            priority: if big { i8::MIN } else { -3 },
        },
        Kind::ListSnapshots => Msg::ListSnapshots {
            from: if big { u32::MAX } else { 5 },
        },
        Kind::Status => Msg::Status,
        Kind::QueryDelta => Msg::QueryDelta {
            volume: if big {
                Volume::Snapshot(u32::MAX)
            } else {
                Volume::Origin
            },
            base: if big { u32::MAX } else { 3 },
            chunk: if big {
                u64::MAX - DELTA_CHUNKS_MAX as u64
            } else {
                10
            },
            chunks: if big {
                u32::try_from(DELTA_CHUNKS_MAX).unwrap()
            } else {
                20
            },
        },
        Kind::DeltaMap => {
            let chunks = if big { DELTA_CHUNKS_MAX } else { 20 };
            for (i, b) in delta.iter_mut().enumerate() {
                *b = [0xa5, 0x5a, 0x0f][i % 3];
            }
            Msg::DeltaMap {
                chunk: if big { u64::MAX - chunks as u64 } else { 10 },
                chunks: u32::try_from(chunks).unwrap(),
                bits: &delta[..chunks.div_ceil(8)],
            }
        }
        Kind::Ok => Msg::Ok,
        Kind::SnapshotList => {
            let mut b = SnapListBuilder::new(snaps).unwrap();
            let n = if big { SNAP_LIST_PAGE_MAX } else { 2 };
            for i in 0..n {
                let i64v = i as u64;
                b.push(SnapInfo {
                    tag: if big {
                        u32::MAX - u32::try_from(i).unwrap()
                    } else {
                        u32::try_from(i).unwrap() + 1
                    },
                    priority: if i % 2 == 0 { 127 } else { -128 },
                    flags: u8::try_from(i % 4).unwrap(),
                    ctime_secs: 1_700_000_000 + i64v,
                    chunks: if big { u64::MAX } else { 10 * i64v },
                    unique_chunks: if big { u64::MAX - 1 } else { i64v },
                })
                .unwrap();
            }
            Msg::SnapshotList(b.finish())
        }
        Kind::StatusReply => {
            let v = |x: u64| if big { u64::MAX - x } else { x };
            let w = |x: u32| if big { u32::MAX - x } else { x };
            Msg::StatusReply {
                incarnation: v(9),
                chunk_size_bytes: w(16384),
                origin_chunks: v(1),
                data_chunks: v(2),
                data_free: v(3),
                meta_blocks: v(4),
                meta_free: v(5),
                snapshots: w(6),
                deleting: w(7),
                clients: w(8),
                read_locks: w(10),
                waiting_writes: w(11),
                commits: v(12),
                state: if big {
                    ServerState::Serving
                } else {
                    ServerState::Recovering
                },
                copyouts: v(13),
            }
        }
        Kind::Error => Msg::Error {
            code: if big {
                ErrorCode::StoreFull
            } else {
                ErrorCode::NoSuchSnapshot
            },
            culprit: if big {
                0xffff
            } else {
                Kind::DeleteSnapshot.code()
            },
            text: if big { LONG_TEXT } else { "no snapshot 4" },
        },
        Kind::RevokeDone => Msg::RevokeDone,
        Kind::NeedServer => Msg::NeedServer {
            client_id: if big { u64::MAX } else { 77 },
            failed_incarnation: if big { u64::MAX } else { 0 },
            node_id: if big { u32::MAX } else { 3 },
            volume: Some(if big {
                Volume::Snapshot(u32::MAX)
            } else {
                Volume::Origin
            }),
        },
        Kind::ServerAddress => Msg::ServerAddress {
            incarnation: if big { u64::MAX } else { 5 },
            node_id: if big { u32::MAX } else { 2 },
            addr: if big {
                LONG_ADDR
            } else {
                "/run/csnap/server.sock"
            },
        },
        Kind::ServerReady => Msg::ServerReady {
            pid: if big { u32::MAX } else { 4242 },
            node_id: if big { u32::MAX } else { 2 },
            addr: if big { LONG_ADDR } else { "10.0.0.2:7070" },
        },
        Kind::StartServer => Msg::StartServer {
            claim: big,
            members: node_list(big, nodes),
            expected: client_list(big, clients),
        },
        Kind::Serving => Msg::Serving {
            incarnation: if big { u64::MAX } else { 5 },
            start_micros: if big { u64::MAX } else { 812 },
            replayed_commits: if big { u64::MAX } else { 3 },
        },
        Kind::NodeJoined => Msg::NodeJoined {
            node_id: if big { u32::MAX } else { 2 },
        },
        Kind::NodeLeft => Msg::NodeLeft {
            node_id: if big { u32::MAX } else { 3 },
        },
        Kind::ClientsOf => Msg::ClientsOf {
            node_id: if big { u32::MAX } else { 2 },
            clients: client_list(big, clients),
        },
        Kind::ClientGone => Msg::ClientGone {
            client_id: if big { u64::MAX } else { 77 },
            node_id: if big { u32::MAX } else { 1 },
        },
        Kind::Join => Msg::Join {
            node_id: if big { u32::MAX } else { 1 },
            addr: if big {
                LONG_ADDR
            } else {
                "/run/csnap/agent.sock"
            },
        },
        Kind::Members => Msg::Members {
            epoch: if big { u64::MAX } else { 7 },
            members: node_list(big, nodes),
        },
        Kind::AgentState => Msg::AgentState {
            node_id: if big { u32::MAX } else { 2 },
            standby_ready: big,
            recent_deaths: if big { u16::MAX } else { 2 },
            serving_incarnation: if big { u64::MAX } else { 0 },
            died_incarnation: if big { u64::MAX } else { 4 },
        },
        Kind::WantServer => Msg::WantServer {
            failed_incarnation: if big { u64::MAX } else { 4 },
        },
        Kind::StartHere => Msg::StartHere {
            attempt: if big { u64::MAX } else { 1 },
            former_incarnation: if big { u64::MAX } else { 4 },
            claim: big,
        },
        Kind::NeedClients => Msg::NeedClients {
            gather_id: if big { u64::MAX } else { 9 },
            starter: if big { u32::MAX } else { 2 },
        },
        Kind::Clients => Msg::Clients {
            gather_id: if big { u64::MAX } else { 9 },
            from: if big { u32::MAX } else { 3 },
            to: if big { u32::MAX - 1 } else { 2 },
            clients: client_list(big, clients),
        },
        Kind::ServerUp => Msg::ServerUp {
            incarnation: if big { u64::MAX } else { 6 },
            node_id: if big { u32::MAX } else { 3 },
            addr: if big { LONG_ADDR } else { "10.0.0.3:7070" },
        },
        Kind::ServerDown => Msg::ServerDown {
            incarnation: if big { u64::MAX } else { 5 },
            node_id: if big { u32::MAX } else { 2 },
        },
        Kind::Fence => Msg::Fence {
            reason: if big {
                FenceReason::ServerMoved
            } else {
                FenceReason::LeftCluster
            },
        },
        Kind::ClusterCommand => Msg::ClusterCommand {
            op: if big {
                ClusterOp::Start
            } else {
                ClusterOp::Join
            },
            node_id: if big { u32::MAX } else { 2 },
        },
        Kind::ClusterStatus => Msg::ClusterStatus,
        Kind::ClusterStatusReply => {
            let mut b = NodeStatusListBuilder::new(statuses).unwrap();
            let n = if big { NODES_MAX } else { 2 };
            for i in 0..u32::try_from(n).unwrap() {
                b.push(NodeStatus {
                    node: if big { u32::MAX - i } else { i + 1 },
                    flags: u8::try_from(i % 16).unwrap(),
                    serving_incarnation: if big { u64::MAX - u64::from(i) } else { 0 },
                })
                .unwrap();
            }
            Msg::ClusterStatusReply {
                server_incarnation: if big { u64::MAX } else { 5 },
                failed_deaths: if big { u16::MAX } else { 0 },
                server_node: if big { u32::MAX } else { 2 },
                server_addr: if big {
                    LONG_ADDR
                } else {
                    "/run/csnap/server.sock"
                },
                nodes: b.finish(),
            }
        }
    }
}
