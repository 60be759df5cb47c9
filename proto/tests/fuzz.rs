//! Properties over arbitrary and mutated input: decoding and framing never
//! panic, truncation is always "need more", corruption is always an error or
//! another canonical frame, and streams split anywhere reassemble exactly.

use csnap_proto::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Arbitrary valid messages.
// ---------------------------------------------------------------------------

/// Owned description of a message; `build` turns it into a `Msg` over
/// scratch buffers.
#[derive(Debug, Clone)]
struct Spec {
    kind: Kind,
    n: [u64; 14],
    role: Role,
    volume_snapshot: bool,
    uuid: [u8; 16],
    ranges: Vec<Range>,
    targets: Vec<Target>,
    snaps: Vec<SnapInfo>,
    code: u32,
    text: String,
    nodes: Vec<Node>,
    clients: Vec<ClientEntry>,
    statuses: Vec<NodeStatus>,
    addr: String,
}

struct Bufs {
    ranges: Vec<u8>,
    targets: Vec<u8>,
    snaps: Vec<u8>,
    text: String,
    nodes: Vec<u8>,
    clients: Vec<u8>,
    statuses: Vec<u8>,
    /// The spec's address cut to `ADDR_MAX_BYTES`; may be empty.
    addr: String,
    /// A delta bitmap of `delta_chunks(n)` chunks.
    delta: Vec<u8>,
}

/// The chunk count of a sample `DeltaMap` (1..=64).
fn delta_chunks(n: &[u64; 14]) -> u32 {
    1 + low32(n[4] % 64)
}

/// The longest prefix of `s` within `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

fn max_u32() -> u32 {
    u32::try_from(FRAME_MAX_BYTES).unwrap()
}
fn header_u32() -> u32 {
    u32::try_from(HEADER_BYTES).unwrap()
}
fn low16(x: u64) -> u16 {
    u16::try_from(x & 0xffff).unwrap()
}
fn low32(x: u64) -> u32 {
    u32::try_from(x & 0xffff_ffff).unwrap()
}
fn low8(x: u64) -> u8 {
    u8::try_from(x & 0xff).unwrap()
}

impl Spec {
    fn bufs(&self) -> Bufs {
        Bufs {
            ranges: vec![0; RANGES_BYTES_MAX],
            targets: vec![0; TARGETS_BYTES_MAX],
            snaps: vec![0; SNAP_LIST_BYTES_MAX],
            text: cut(&self.text, ERROR_TEXT_MAX_BYTES),
            nodes: vec![0; NODE_LIST_BYTES_MAX],
            clients: vec![0; CLIENT_LIST_BYTES_MAX],
            statuses: vec![0; NODE_STATUS_LIST_BYTES_MAX],
            addr: cut(&self.addr, ADDR_MAX_BYTES),
            delta: {
                let c = delta_chunks(&self.n) as usize;
                let mut d = self.n[5].to_le_bytes()[..c.div_ceil(8)].to_vec();
                if !c.is_multiple_of(8) {
                    if let Some(last) = d.last_mut() {
                        *last &= (1u8 << (c % 8)) - 1;
                    }
                }
                d
            },
        }
    }

    fn build<'a>(&self, b: &'a mut Bufs) -> Msg<'a> {
        let n = &self.n;
        let query = matches!(
            self.kind,
            Kind::QuerySnapshotRead | Kind::QuerySnapshotWrite
        );
        let ranges = {
            let mut rb = RangesBuilder::new(&mut b.ranges).unwrap();
            for r in &self.ranges {
                let mut r = *r;
                if query {
                    // Keep within QUERY_CHUNKS_MAX: at most 16 chunks each.
                    r.chunks = r.chunks.min(16);
                }
                rb.push(r).unwrap();
            }
            rb.finish()
        };
        let targets = {
            let mut tb = TargetsBuilder::new(&mut b.targets).unwrap();
            for t in &self.targets {
                let mut t = *t;
                if self.kind == Kind::SnapshotWriteOk {
                    t.kind = TargetKind::Store;
                }
                tb.push(t).unwrap();
            }
            tb.finish()
        };
        let snaps = {
            let mut sb = SnapListBuilder::new(&mut b.snaps).unwrap();
            for s in &self.snaps {
                sb.push(*s).unwrap();
            }
            sb.finish()
        };
        let nodes = NodeList::from_entries(&self.nodes, &mut b.nodes).unwrap();
        let clients = ClientList::from_entries(&self.clients, &mut b.clients).unwrap();
        let statuses = NodeStatusList::from_entries(&self.statuses, &mut b.statuses).unwrap();
        let text: &'a str = &b.text;
        let any_addr: &'a str = &b.addr;
        let addr: &'a str = if any_addr.is_empty() { "/" } else { any_addr };
        match self.kind {
            Kind::Hello => {
                let lo = low16(n[0]).max(1);
                let hi = lo.saturating_add(low16(n[1]) % 4);
                Msg::Hello {
                    version_min: lo,
                    version_max: hi,
                    role: self.role,
                }
            }
            Kind::HelloOk => Msg::HelloOk {
                version: low16(n[0]).max(1),
                server_id: n[1],
            },
            Kind::Identify => Msg::Identify {
                client_id: n[0],
                node_id: low32(n[1]),
                volume: if self.volume_snapshot {
                    Volume::Snapshot(low32(n[2]))
                } else {
                    Volume::Origin
                },
                origin_uuid: self.uuid,
                volume_size_bytes: n[3],
                chunk_size_bytes: low32(n[4]),
                flags: if n[5] & 1 == 0 { 0 } else { IDENTIFY_CACHING },
            },
            Kind::IdentifyOk => Msg::IdentifyOk {
                chunk_size_bytes: low32(n[0]),
                origin_size_bytes: n[1],
                volume_size_bytes: n[2],
            },
            Kind::QueryOriginWrite => Msg::QueryOriginWrite(ranges),
            Kind::OriginWriteOk => Msg::OriginWriteOk(ranges),
            Kind::QuerySnapshotRead => Msg::QuerySnapshotRead(ranges),
            Kind::FinishSnapshotRead => Msg::FinishSnapshotRead(ranges),
            Kind::QuerySnapshotWrite => Msg::QuerySnapshotWrite(ranges),
            Kind::UploadLocks => Msg::UploadLocks(ranges),
            Kind::SnapshotReadReply => Msg::SnapshotReadReply(targets),
            Kind::SnapshotWriteOk => Msg::SnapshotWriteOk(targets),
            Kind::SnapshotList => Msg::SnapshotList(snaps),
            Kind::FinishUpload => Msg::FinishUpload,
            Kind::UploadOk => Msg::UploadOk,
            Kind::CreateSnapshot => Msg::CreateSnapshot { tag: low32(n[0]) },
            Kind::DeleteSnapshot => Msg::DeleteSnapshot { tag: low32(n[0]) },
            Kind::SetPriority => Msg::SetPriority {
                tag: low32(n[0]),
                priority: i8::from_le_bytes([low8(n[1])]),
            },
            Kind::ListSnapshots => Msg::ListSnapshots { from: low32(n[0]) },
            Kind::Status => Msg::Status,
            Kind::QueryDelta => Msg::QueryDelta {
                volume: if n[2] & 1 == 0 {
                    Volume::Origin
                } else {
                    Volume::Snapshot(low32(n[3]))
                },
                base: low32(n[0]),
                chunk: n[1] >> 1,
                chunks: 1 + low32(n[4] % csnap_proto::DELTA_CHUNKS_MAX as u64),
            },
            Kind::DeltaMap => Msg::DeltaMap {
                chunk: n[1] >> 1,
                chunks: delta_chunks(n),
                bits: &b.delta,
            },
            Kind::Ok => Msg::Ok,
            Kind::StatusReply => Msg::StatusReply {
                incarnation: n[0],
                chunk_size_bytes: low32(n[1]),
                origin_chunks: n[2],
                data_chunks: n[3],
                data_free: n[4],
                meta_blocks: n[5],
                meta_free: n[6],
                snapshots: low32(n[7]),
                deleting: low32(n[8]),
                clients: low32(n[9]),
                read_locks: low32(n[10]),
                waiting_writes: low32(n[11]),
                commits: n[12],
                state: if n[13] & 1 == 0 {
                    ServerState::Recovering
                } else {
                    ServerState::Serving
                },
                copyouts: n[12].rotate_left(7),
            },
            Kind::Error => Msg::Error {
                code: ErrorCode::from_u32(self.code).unwrap(),
                culprit: low16(n[0]),
                text,
            },
            Kind::RevokeDone => Msg::RevokeDone,
            Kind::Revoke => {
                if ranges.is_empty() || n[0] & 1 == 0 {
                    Msg::Revoke {
                        what: RevokeWhat::OriginGrants,
                        ranges: Ranges::empty(),
                    }
                } else {
                    Msg::Revoke {
                        what: RevokeWhat::SnapshotMappings,
                        ranges,
                    }
                }
            }
            Kind::ReleaseLocks => Msg::ReleaseLocks(ranges),
            Kind::NeedServer => {
                let volume = match n[2] % 3 {
                    0 => None,
                    1 => Some(Volume::Origin),
                    _ => Some(Volume::Snapshot(low32(n[3]))),
                };
                Msg::NeedServer {
                    client_id: if volume.is_some() { n[0].max(1) } else { n[0] },
                    failed_incarnation: n[1],
                    node_id: low32(n[4]),
                    volume,
                }
            }
            Kind::ServerAddress => Msg::ServerAddress {
                incarnation: n[0].max(1),
                node_id: low32(n[1]),
                addr,
            },
            Kind::ServerReady => Msg::ServerReady {
                pid: low32(n[0]),
                node_id: low32(n[1]),
                addr,
            },
            Kind::StartServer => Msg::StartServer {
                claim: false,
                members: nodes,
                expected: clients,
            },
            Kind::Serving => Msg::Serving {
                incarnation: n[0],
                start_micros: n[1],
                replayed_commits: n[2],
            },
            Kind::NodeJoined => Msg::NodeJoined {
                node_id: low32(n[0]).max(1),
            },
            Kind::NodeLeft => Msg::NodeLeft {
                node_id: low32(n[0]).max(1),
            },
            Kind::ClientsOf => Msg::ClientsOf {
                node_id: low32(n[0]).max(1),
                clients,
            },
            Kind::ClientGone => Msg::ClientGone {
                client_id: n[0].max(1),
                node_id: low32(n[1]).max(1),
            },
            Kind::Join => Msg::Join {
                node_id: low32(n[0]).max(1),
                addr,
            },
            Kind::Members => Msg::Members {
                epoch: n[0],
                members: nodes,
            },
            Kind::AgentState => Msg::AgentState {
                node_id: low32(n[0]),
                standby_ready: n[1] & 1 == 1,
                recent_deaths: low32(n[4]).to_le_bytes()[0].into(),
                serving_incarnation: n[2],
                died_incarnation: n[3],
            },
            Kind::WantServer => Msg::WantServer {
                failed_incarnation: n[0],
            },
            Kind::StartHere => Msg::StartHere {
                attempt: n[0].max(1),
                former_incarnation: n[1],
                claim: n[2] & 1 == 1,
            },
            Kind::NeedClients => Msg::NeedClients {
                gather_id: n[0].max(1),
                starter: low32(n[1]).max(1),
            },
            Kind::Clients => Msg::Clients {
                gather_id: n[0],
                from: low32(n[1]),
                to: low32(n[2]),
                clients,
            },
            Kind::ServerUp => Msg::ServerUp {
                incarnation: n[0].max(1),
                node_id: low32(n[1]),
                addr,
            },
            Kind::ServerDown => Msg::ServerDown {
                incarnation: n[0],
                node_id: low32(n[1]),
            },
            Kind::Fence => Msg::Fence {
                reason: if n[0] & 1 == 0 {
                    FenceReason::LeftCluster
                } else {
                    FenceReason::ServerMoved
                },
            },
            Kind::ClusterCommand => Msg::ClusterCommand {
                op: match n[0] % 3 {
                    0 => ClusterOp::Join,
                    1 => ClusterOp::Leave,
                    _ => ClusterOp::Start,
                },
                node_id: low32(n[1]).max(1),
            },
            Kind::ClusterStatus => Msg::ClusterStatus,
            Kind::ClusterStatusReply => {
                // No server (often): any address, even none.
                let none = n[0] & 3 == 0;
                Msg::ClusterStatusReply {
                    server_incarnation: if none { 0 } else { n[0] },
                    server_node: low32(n[1]),
                    failed_deaths: u16::try_from(n[2] & 0xffff).unwrap_or(0),
                    server_addr: if none { any_addr } else { addr },
                    nodes: statuses,
                }
            }
        }
    }
}

fn arb_range() -> impl Strategy<Value = Range> {
    (1..=u32::MAX, any::<u64>(), any::<bool>()).prop_map(|(chunks, c, small)| {
        let room = u64::MAX - u64::from(chunks);
        let chunk = if small {
            c % 1_000_000
        } else {
            c % room.saturating_add(1)
        };
        Range {
            chunk: chunk.min(room),
            chunks,
        }
    })
}

fn arb_target() -> impl Strategy<Value = Target> {
    (arb_range(), any::<bool>(), any::<u64>()).prop_map(|(r, origin, s)| {
        let room = u64::MAX - u64::from(r.chunks);
        Target {
            chunk: r.chunk,
            chunks: r.chunks,
            kind: if origin {
                TargetKind::Origin
            } else {
                TargetKind::Store
            },
            store_chunk: if origin { 0 } else { s.min(room) },
        }
    })
}

fn arb_snap() -> impl Strategy<Value = SnapInfo> {
    (any::<u32>(), any::<i8>(), 0u8..4, any::<[u64; 3]>()).prop_map(|(tag, priority, flags, v)| {
        SnapInfo {
            tag,
            priority,
            flags,
            ctime_secs: v[0],
            chunks: v[1],
            unique_chunks: v[2],
        }
    })
}

fn arb_node() -> impl Strategy<Value = Node> {
    (1..=u32::MAX).prop_map(|id| Node { id })
}

fn arb_client() -> impl Strategy<Value = ClientEntry> {
    (1..=u64::MAX, 1..=u32::MAX).prop_map(|(client_id, node_id)| ClientEntry { client_id, node_id })
}

fn arb_status() -> impl Strategy<Value = NodeStatus> {
    (1..=u32::MAX, 0u8..16, any::<u64>()).prop_map(|(node, flags, serving_incarnation)| {
        NodeStatus {
            node,
            flags,
            serving_incarnation,
        }
    })
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    (
        (
            prop::sample::select(Kind::ALL.to_vec()),
            any::<[u64; 14]>(),
            prop::sample::select(vec![Role::Client, Role::Control, Role::Agent, Role::Server]),
            any::<bool>(),
            any::<[u8; 16]>(),
            prop::collection::vec(arb_range(), 0..=RANGES_MAX),
            prop::collection::vec(arb_target(), 0..=80),
            prop::collection::vec(arb_snap(), 0..=SNAP_LIST_PAGE_MAX),
            1u32..=20,
            "\\PC{0,80}",
        ),
        (
            prop::collection::vec(arb_node(), 0..=80),
            prop::collection::vec(arb_client(), 0..=80),
            prop::collection::vec(arb_status(), 0..=80),
            prop_oneof![3 => "\\PC{0,60}", 1 => "\\PC{190,210}"],
        ),
    )
        .prop_map(
            |(
                (kind, n, role, volume_snapshot, uuid, ranges, targets, snaps, code, text),
                (nodes, clients, statuses, addr),
            )| Spec {
                kind,
                n,
                role,
                volume_snapshot,
                uuid,
                ranges,
                targets,
                snaps,
                code,
                text,
                nodes,
                clients,
                statuses,
                addr,
            },
        )
}

fn encode_spec(spec: &Spec, request_id: u64, incarnation: u64) -> Vec<u8> {
    let mut b = spec.bufs();
    let msg = spec.build(&mut b);
    let mut out = vec![0u8; FRAME_MAX_BYTES];
    let n = encode(&Header::new(request_id, incarnation), &msg, &mut out).unwrap();
    out.truncate(n);
    out
}

/// If `frame` decodes, encoding the result gives `frame` back: every accepted
/// frame is the one encoding of its message.
fn assert_canonical(frame: &[u8]) -> Result<(), TestCaseError> {
    if let Ok((h, m)) = decode(frame) {
        let mut out = vec![0u8; FRAME_MAX_BYTES];
        let n = encode(&Header::new(h.request_id, h.incarnation), &m, &mut out).unwrap();
        prop_assert_eq!(&out[..n], frame);
    }
    Ok(())
}

/// A valid header with an arbitrary kind code and body.
fn arb_framed_body() -> impl Strategy<Value = Vec<u8>> {
    let kinds: Vec<u16> = Kind::ALL.iter().map(|k| k.code()).collect();
    (
        prop_oneof![4 => prop::sample::select(kinds), 1 => any::<u16>()],
        prop::collection::vec(any::<u8>(), 0..400),
        any::<u64>(),
        any::<u8>(),
    )
        .prop_map(|(kind, mut body, id, small)| {
            // Often make list counts and error text lengths plausible.
            if small % 2 == 0 && body.len() >= 4 {
                body[1] = 0;
                body[0] %= 24;
                body[2] = 0;
                body[3] = 0;
            }
            let mut f = Vec::new();
            f.extend_from_slice(&MAGIC.to_le_bytes());
            f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            f.extend_from_slice(&kind.to_le_bytes());
            let len = u32::try_from(HEADER_BYTES + body.len()).unwrap();
            f.extend_from_slice(&len.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(&id.to_le_bytes());
            f.extend_from_slice(&0u64.to_le_bytes());
            f.extend_from_slice(&body);
            f
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = peek_header(&bytes);
        let r = decode(&bytes);
        // Random bytes essentially never carry the magic.
        if bytes.len() >= 4 && bytes[..4] != MAGIC.to_le_bytes() {
            prop_assert_eq!(r, Err(DecodeError::BadMagic));
        }
        assert_canonical(&bytes)?;
    }

    #[test]
    fn framed_garbage_never_panics_and_is_canonical(frame in arb_framed_body()) {
        let r = decode(&frame);
        if let Err(e) = r {
            // The header is fine, so the error keeps the stream usable.
            prop_assert!(!e.is_fatal(), "{}", e);
        }
        assert_canonical(&frame)?;
    }

    #[test]
    fn frame_reader_survives_arbitrary_streams(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in prop::collection::vec(1usize..700, 1..20),
        valid_prefix in any::<bool>(),
    ) {
        let mut stream = Vec::new();
        if valid_prefix {
            let mut out = [0u8; 64];
            let n = encode(&Header::new(1, 0), &Msg::Status, &mut out).unwrap();
            stream.extend_from_slice(&out[..n]);
        }
        stream.extend_from_slice(&bytes);
        let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES]);
        let mut fed = 0;
        let mut popped = 0;
        let mut failed = None;
        let mut i = 0;
        while fed < stream.len() && failed.is_none() {
            let want = cuts[i % cuts.len()].min(stream.len() - fed);
            i += 1;
            let spare = r.spare();
            let n = want.min(spare.len());
            spare[..n].copy_from_slice(&stream[fed..fed + n]);
            r.advance(n);
            fed += n;
            loop {
                match r.next_frame() {
                    Ok(Some(f)) => {
                        prop_assert!(f.len() >= HEADER_BYTES);
                        prop_assert!(matches!(peek_header(f), Ok(Some(h)) if h.length as usize == f.len()));
                        let _ = decode(f);
                        popped += f.len();
                    }
                    Ok(None) => break,
                    Err(e) => {
                        prop_assert!(e.is_fatal());
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        prop_assert!(popped + r.buffered() <= stream.len());
        if valid_prefix {
            prop_assert!(popped >= HEADER_BYTES);
        }
        if let Some(e) = failed {
            // The reader sticks to the error.
            prop_assert_eq!(r.next_frame(), Err(e));
        } else {
            prop_assert_eq!(popped + r.buffered(), stream.len());
        }
    }

    #[test]
    fn valid_streams_split_anywhere_reassemble(
        specs in prop::collection::vec(arb_spec(), 1..8),
        cuts in prop::collection::vec(1usize..3000, 1..16),
    ) {
        let frames: Vec<Vec<u8>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| encode_spec(s, i as u64, 7))
            .collect();
        let stream: Vec<u8> = frames.concat();
        let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice());
        let mut got = Vec::new();
        let mut fed = 0;
        let mut i = 0;
        while fed < stream.len() {
            let spare = r.spare();
            let n = cuts[i % cuts.len()].min(stream.len() - fed).min(spare.len());
            i += 1;
            spare[..n].copy_from_slice(&stream[fed..fed + n]);
            r.advance(n);
            fed += n;
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f.to_vec());
            }
        }
        prop_assert_eq!(r.buffered(), 0);
        prop_assert_eq!(&got, &frames);
        for (i, (f, s)) in got.iter().zip(&specs).enumerate() {
            let mut b = s.bufs();
            let want = s.build(&mut b);
            let (h, m) = decode(f).unwrap();
            prop_assert_eq!(m, want);
            prop_assert_eq!(h.request_id, i as u64);
            prop_assert_eq!(h.incarnation, 7);
        }
    }

    #[test]
    fn every_prefix_is_truncated(spec in arb_spec(), id in any::<u64>()) {
        let f = encode_spec(&spec, id, 3);
        let full = peek_header(&f).unwrap().unwrap();
        let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES]);
        for n in 0..f.len() {
            let p = &f[..n];
            prop_assert_eq!(decode(p), Err(DecodeError::Truncated), "prefix {}", n);
            match peek_header(p) {
                Ok(None) => prop_assert!(n < HEADER_BYTES),
                Ok(Some(h)) => prop_assert_eq!(h, full),
                Err(e) => prop_assert!(false, "prefix {} rejected: {}", n, e),
            }
            r.clear();
            r.spare()[..n].copy_from_slice(p);
            r.advance(n);
            prop_assert_eq!(r.next_frame(), Ok(None));
        }
        prop_assert_eq!(decode(&f).map(|(h, _)| h), Ok(full));
    }

    #[test]
    fn header_byte_flips_are_errors_or_other_headers(
        spec in arb_spec(),
        at in 0usize..HEADER_BYTES,
        x in 1u8..=255,
    ) {
        let f = encode_spec(&spec, 0x1111_2222_3333_4444, 9);
        let (orig, _) = decode(&f).unwrap();
        let mut g = f.clone();
        g[at] ^= x;
        match decode(&g) {
            Ok((h, _)) => {
                prop_assert_ne!(h, orig);
                // Only request id, incarnation or a kind with the same body
                // layout can change without an error.
                prop_assert!(at >= 16 || (6..8).contains(&at), "byte {} flipped silently", at);
            }
            Err(e) => {
                if at < 4 {
                    prop_assert_eq!(e, DecodeError::BadMagic);
                }
                if (4..6).contains(&at) {
                    prop_assert!(matches!(e, DecodeError::BadVersion { .. }), "got {:?}", e);
                }
                if (12..16).contains(&at) {
                    prop_assert_eq!(e, DecodeError::BadFlags);
                }
            }
        }
        let _ = peek_header(&g);
        assert_canonical(&g)?;
    }

    #[test]
    fn any_byte_flip_is_an_error_or_canonical(
        spec in arb_spec(),
        at in any::<prop::sample::Index>(),
        x in 1u8..=255,
    ) {
        let f = encode_spec(&spec, 5, 5);
        let mut g = f.clone();
        let i = at.index(g.len());
        g[i] ^= x;
        assert_canonical(&g)?;
    }

    #[test]
    fn oversized_lengths_are_rejected_from_the_header(len in (max_u32() + 1)..=u32::MAX, have in 12usize..=HEADER_BYTES) {
        let mut f = [0u8; HEADER_BYTES];
        let mut out = [0u8; 64];
        let n = encode(&Header::new(1, 0), &Msg::Ok, &mut out).unwrap();
        f.copy_from_slice(&out[..n]);
        f[8..12].copy_from_slice(&len.to_le_bytes());
        prop_assert_eq!(peek_header(&f[..have]), Err(DecodeError::TooLarge { len }));
        let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES]);
        r.spare()[..have].copy_from_slice(&f[..have]);
        r.advance(have);
        prop_assert_eq!(r.next_frame(), Err(DecodeError::TooLarge { len }));
    }

    #[test]
    fn undersized_lengths_are_rejected_from_the_header(len in 0u32..header_u32()) {
        let mut out = [0u8; 64];
        let n = encode(&Header::new(1, 0), &Msg::Ok, &mut out).unwrap();
        out[8..12].copy_from_slice(&len.to_le_bytes());
        prop_assert_eq!(peek_header(&out[..12]), Err(DecodeError::TooShort { len }));
        prop_assert_eq!(decode(&out[..n]), Err(DecodeError::TooShort { len }));
    }
}
