//! Round trips of every kind, known-answer frames, and the rejection of each
//! malformation the format rules out.

mod common;

use common::{sample, Scratch, LONG_ADDR, LONG_TEXT};
use core::fmt::Write;
use csnap_proto::*;

fn frame_of(hdr: &Header, msg: &Msg<'_>) -> Vec<u8> {
    let mut out = vec![0u8; FRAME_MAX_BYTES];
    let n = encode(hdr, msg, &mut out).unwrap();
    out.truncate(n);
    out
}

fn round_trip(msg: &Msg<'_>, request_id: u64, incarnation: u64) {
    let hdr = Header::new(request_id, incarnation);
    let mut out = vec![0xAAu8; FRAME_MAX_BYTES];
    let n = encode(&hdr, msg, &mut out).unwrap();
    assert_eq!(n, msg.frame_bytes());
    assert!(n <= FRAME_MAX_BYTES);
    let (h, m) = decode(&out[..n]).unwrap();
    assert_eq!(m, *msg, "{}", msg.kind());
    assert_eq!(h.kind, msg.kind().code());
    assert_eq!(h.known_kind(), Some(msg.kind()));
    assert_eq!(h.length as usize, n);
    assert_eq!(h.version, PROTOCOL_VERSION);
    assert_eq!(h.flags, 0);
    assert_eq!(h.request_id, request_id);
    assert_eq!(h.incarnation, incarnation);
    assert_eq!(peek_header(&out[..HEADER_BYTES]), Ok(Some(h)));
    // Bytes past the frame were not touched.
    assert!(out[n..].iter().all(|&b| b == 0xAA));
    // Decoding then encoding gives the same bytes.
    let mut again = vec![0u8; n];
    assert_eq!(
        encode(&Header::new(request_id, incarnation), &m, &mut again),
        Ok(n)
    );
    assert_eq!(again, out[..n]);
    // An exact buffer suffices; one byte less fails and writes nothing.
    let mut exact = vec![0u8; n];
    assert_eq!(encode(&hdr, msg, &mut exact), Ok(n));
    let mut short = vec![0x55u8; n - 1];
    assert_eq!(
        encode(&hdr, msg, &mut short),
        Err(EncodeError::BufferTooSmall {
            need: n,
            have: n - 1
        })
    );
    assert!(short.iter().all(|&b| b == 0x55));
}

#[test]
fn every_kind_round_trips_small_and_max() {
    for big in [false, true] {
        for kind in Kind::ALL {
            let mut s = Scratch::new();
            let msg = sample(kind, big, &mut s);
            assert_eq!(msg.kind(), kind);
            round_trip(&msg, 0x0123_4567_89ab_cdef, 42);
            round_trip(&msg, u64::MAX, u64::MAX);
            round_trip(&msg, 0, 0);
        }
    }
}

#[test]
fn max_lists_are_full_and_fit() {
    let mut s = Scratch::new();
    let Msg::SnapshotReadReply(t) = sample(Kind::SnapshotReadReply, true, &mut s) else {
        panic!("wrong sample")
    };
    assert_eq!(t.len(), TARGETS_MAX);
    assert_eq!(t.as_bytes().len(), TARGETS_BYTES_MAX);
    let mut s = Scratch::new();
    let Msg::QueryOriginWrite(r) = sample(Kind::QueryOriginWrite, true, &mut s) else {
        panic!("wrong sample")
    };
    assert_eq!(r.len(), RANGES_MAX);
    assert_eq!(r.get(RANGES_MAX - 1).map(|r| r.end()), Some(u64::MAX - 63));
    let mut s = Scratch::new();
    let Msg::QuerySnapshotRead(r) = sample(Kind::QuerySnapshotRead, true, &mut s) else {
        panic!("wrong sample")
    };
    assert_eq!(r.total_chunks(), QUERY_CHUNKS_MAX as u64);
    let mut s = Scratch::new();
    let Msg::SnapshotList(l) = sample(Kind::SnapshotList, true, &mut s) else {
        panic!("wrong sample")
    };
    assert_eq!(l.len(), SNAP_LIST_PAGE_MAX);
    assert_eq!(LONG_TEXT.len(), ERROR_TEXT_MAX_BYTES);
    assert_eq!(LONG_ADDR.len(), ADDR_MAX_BYTES);
    let mut s = Scratch::new();
    let Msg::StartServer {
        members, expected, ..
    } = sample(Kind::StartServer, true, &mut s)
    else {
        panic!("wrong sample")
    };
    assert_eq!(members.len(), NODES_MAX);
    assert_eq!(expected.len(), CLIENT_ENTRIES_MAX);
    assert_eq!(
        Kind::StartServer.body_max_bytes(),
        8 + NODE_LIST_BYTES_MAX + CLIENT_LIST_BYTES_MAX
    );
    let mut s = Scratch::new();
    let Msg::ClusterStatusReply { nodes, .. } = sample(Kind::ClusterStatusReply, true, &mut s)
    else {
        panic!("wrong sample")
    };
    assert_eq!(nodes.len(), NODES_MAX);
    assert_eq!(nodes.as_bytes().len(), NODE_STATUS_LIST_BYTES_MAX);
    let mut s = Scratch::new();
    let Msg::Revoke { ranges, .. } = sample(Kind::Revoke, true, &mut s) else {
        panic!("wrong sample")
    };
    assert_eq!(ranges.len(), RANGES_MAX);
    for kind in Kind::ALL {
        let mut s = Scratch::new();
        let m = sample(kind, true, &mut s);
        assert_eq!(
            m.body_bytes(),
            kind.body_max_bytes(),
            "{kind} big sample is not the largest"
        );
    }
}

// ---------------------------------------------------------------------------
// Known answers: the format must not drift.
// ---------------------------------------------------------------------------

#[test]
fn known_answer_set_priority() {
    let f = frame_of(
        &Header::new(0x0102_0304_0506_0708, 0),
        &Msg::SetPriority {
            tag: 7,
            priority: -3,
        },
    );
    #[rustfmt::skip]
    let want: [u8; 40] = [
        b'c', b's', b'n', b'w', // magic
        0x01, 0x00,             // version 1
        0x22, 0x00,             // kind SetPriority
        0x28, 0x00, 0x00, 0x00, // length 40
        0x00, 0x00, 0x00, 0x00, // flags
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // request id
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // incarnation
        0x07, 0x00, 0x00, 0x00, // tag 7
        0xfd, 0x00, 0x00, 0x00, // priority -3, reserved
    ];
    assert_eq!(f, want);
    assert_eq!(MAGIC, 0x776e_7363);
}

#[test]
fn known_answer_query_and_reply() {
    let mut rb = [0u8; 64];
    let r = Ranges::from_entries(
        &[Range {
            chunk: 0x1_0000_0002,
            chunks: 3,
        }],
        &mut rb,
    )
    .unwrap();
    let f = frame_of(&Header::new(9, 0), &Msg::QuerySnapshotRead(r));
    #[rustfmt::skip]
    let want: [u8; 52] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x11, 0x00, 0x34, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x01, 0x00, 0x00, 0x00,                         // count 1, reserved
        0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // chunk
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // chunks, reserved
    ];
    assert_eq!(f, want);

    let mut tb = [0u8; 64];
    let t = Targets::from_entries(
        &[
            Target {
                chunk: 5,
                chunks: 1,
                kind: TargetKind::Store,
                store_chunk: 0x99,
            },
            Target {
                chunk: 6,
                chunks: 2,
                kind: TargetKind::Origin,
                store_chunk: 0,
            },
        ],
        &mut tb,
    )
    .unwrap();
    let f = frame_of(&Header::new(9, 0xabcd), &Msg::SnapshotReadReply(t));
    #[rustfmt::skip]
    let want: [u8; 84] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x11, 0x80, 0x54, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x09, 0, 0, 0, 0, 0, 0, 0, 0xcd, 0xab, 0, 0, 0, 0, 0, 0,
        0x02, 0x00, 0x00, 0x00,
        0x05, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0x01, 0, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0,
        0x06, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0x02, 0, 0, 0, 0x00, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(f, want);
}

#[test]
fn known_answer_error() {
    let f = frame_of(
        &Header::new(3, 1),
        &Msg::Error {
            code: ErrorCode::Busy,
            culprit: 0x0010,
            text: "busy",
        },
    );
    #[rustfmt::skip]
    let want: [u8; 44] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x00, 0x80, 0x2c, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x03, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0,
        0x0e, 0x00, 0x00, 0x00, // code Busy = 14
        0x10, 0x00,             // culprit QueryOriginWrite
        0x04, 0x00,             // text length
        b'b', b'u', b's', b'y',
    ];
    assert_eq!(f, want);
}

#[test]
fn kind_and_error_codes_are_pinned() {
    let codes: Vec<(Kind, u16)> = Kind::ALL.iter().map(|k| (*k, k.code())).collect();
    assert_eq!(
        codes,
        vec![
            (Kind::Hello, 0x0001),
            (Kind::Identify, 0x0002),
            (Kind::QueryOriginWrite, 0x0010),
            (Kind::QuerySnapshotRead, 0x0011),
            (Kind::FinishSnapshotRead, 0x0012),
            (Kind::QuerySnapshotWrite, 0x0013),
            (Kind::UploadLocks, 0x0014),
            (Kind::FinishUpload, 0x0015),
            (Kind::RevokeDone, 0x0016),
            (Kind::CreateSnapshot, 0x0020),
            (Kind::DeleteSnapshot, 0x0021),
            (Kind::SetPriority, 0x0022),
            (Kind::ListSnapshots, 0x0023),
            (Kind::Status, 0x0024),
            (Kind::QueryDelta, 0x0025),
            (Kind::NeedServer, 0x4001),
            (Kind::ServerAddress, 0x4002),
            (Kind::ServerReady, 0x4003),
            (Kind::StartServer, 0x4004),
            (Kind::Serving, 0x4005),
            (Kind::NodeJoined, 0x4006),
            (Kind::NodeLeft, 0x4007),
            (Kind::ClientGone, 0x4008),
            (Kind::ClientsOf, 0x4009),
            (Kind::Join, 0x4010),
            (Kind::Members, 0x4011),
            (Kind::AgentState, 0x4012),
            (Kind::WantServer, 0x4013),
            (Kind::StartHere, 0x4014),
            (Kind::NeedClients, 0x4015),
            (Kind::Clients, 0x4016),
            (Kind::ServerUp, 0x4017),
            (Kind::ServerDown, 0x4018),
            (Kind::Fence, 0x4019),
            (Kind::ClusterCommand, 0x4020),
            (Kind::ClusterStatus, 0x4021),
            (Kind::ClusterStatusReply, 0x4022),
            (Kind::Error, 0x8000),
            (Kind::HelloOk, 0x8001),
            (Kind::IdentifyOk, 0x8002),
            (Kind::OriginWriteOk, 0x8010),
            (Kind::SnapshotReadReply, 0x8011),
            (Kind::SnapshotWriteOk, 0x8013),
            (Kind::UploadOk, 0x8015),
            (Kind::Ok, 0x8020),
            (Kind::SnapshotList, 0x8023),
            (Kind::StatusReply, 0x8024),
            (Kind::DeltaMap, 0x8025),
            (Kind::Revoke, 0x8030),
            (Kind::ReleaseLocks, 0x8031),
        ]
    );
    // In code order.
    assert!(Kind::ALL.windows(2).all(|w| w[0].code() < w[1].code()));
    for v in 0..=u16::MAX {
        match Kind::from_u16(v) {
            Some(k) => assert_eq!(k.code(), v),
            None => assert!(!Kind::ALL.iter().any(|k| k.code() == v)),
        }
    }
    let mut names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Kind::ALL.len());
    assert_eq!(ErrorCode::from_u32(0), None);
    assert_eq!(ErrorCode::from_u32(22), None);
    for v in 1..=21u32 {
        let c = ErrorCode::from_u32(v).unwrap();
        assert_eq!(c.code(), v);
        assert!(!c.to_string().is_empty());
    }
    assert_eq!(ErrorCode::BadMagic.code(), 1);
    assert_eq!(ErrorCode::Busy.code(), 14);
    assert_eq!(ErrorCode::Unsupported.code(), 20);
    assert_eq!(ErrorCode::Corrupt.code(), 21);
}

#[test]
fn directions_and_replies() {
    let count = |f: fn(&Kind) -> bool| Kind::ALL.iter().filter(|k| f(k)).count();
    assert_eq!(count(|k| k.is_request()), 15 + 22);
    assert_eq!(count(|k| k.is_agent()), 22);
    assert_eq!(count(|k| k.is_reply()), 13);
    let notifications: Vec<Kind> = Kind::ALL
        .iter()
        .copied()
        .filter(|k| k.is_notification())
        .collect();
    assert_eq!(notifications, [Kind::Revoke, Kind::ReleaseLocks]);
    for k in Kind::ALL {
        assert_ne!(k.is_request(), k.is_reply());
        // The agent protocol is exactly the codes with bit 14 set.
        assert_eq!(k.is_agent(), (0x4000..0x8000).contains(&k.code()), "{k}");
        if k.is_notification() {
            assert!(k.is_reply() && k.success_reply().is_none(), "{k}");
        }
        if let Some(r) = k.success_reply() {
            assert!(k.is_request(), "{k}");
            if k.is_agent() {
                // Agent answers are agent kinds, or the generic Ok.
                assert!(r.is_agent() || r == Kind::Ok, "{k} -> {r}");
            } else {
                assert!(r.is_reply() && !r.is_notification(), "{k} -> {r}");
                if r != Kind::Ok {
                    assert_eq!(r.code(), k.code() | 0x8000);
                }
            }
        }
    }
    let replies: Vec<(Kind, Option<Kind>)> = [
        Kind::RevokeDone,
        Kind::Revoke,
        Kind::ReleaseLocks,
        Kind::NeedServer,
        Kind::ServerReady,
        Kind::StartServer,
        Kind::NeedClients,
        Kind::ClusterCommand,
        Kind::ClusterStatus,
        Kind::Join,
    ]
    .iter()
    .map(|k| (*k, k.success_reply()))
    .collect();
    assert_eq!(
        replies,
        [
            (Kind::RevokeDone, None),
            (Kind::Revoke, None),
            (Kind::ReleaseLocks, None),
            (Kind::NeedServer, Some(Kind::ServerAddress)),
            (Kind::ServerReady, None),
            (Kind::StartServer, Some(Kind::Serving)),
            (Kind::NeedClients, Some(Kind::Clients)),
            (Kind::ClusterCommand, Some(Kind::Ok)),
            (Kind::ClusterStatus, Some(Kind::ClusterStatusReply)),
            (Kind::Join, None),
        ]
    );
    // Of the agent protocol, exactly these five kinds have a success reply.
    assert_eq!(
        Kind::ALL
            .iter()
            .filter(|k| k.is_agent() && k.success_reply().is_some())
            .count(),
        5
    );
    assert_eq!(Kind::FinishSnapshotRead.success_reply(), None);
    assert_eq!(Kind::UploadLocks.success_reply(), None);
    assert_eq!(Kind::FinishUpload.success_reply(), Some(Kind::UploadOk));
    assert_eq!(Kind::SetPriority.success_reply(), Some(Kind::Ok));
    assert!(Kind::Error.is_reply());
    assert!(Kind::Hello.is_request());
    assert_eq!(Kind::QuerySnapshotRead.to_string(), "query-snapshot-read");
    assert_eq!(Msg::Status.to_string(), "status");
}

#[test]
fn negotiation() {
    assert_eq!(negotiate(1, 1), Some(1));
    assert_eq!(negotiate(1, 9), Some(1));
    assert_eq!(negotiate(2, 9), None);
}

// ---------------------------------------------------------------------------
// Header rejection.
// ---------------------------------------------------------------------------

fn status_frame() -> Vec<u8> {
    frame_of(&Header::new(5, 0), &Msg::Status)
}

#[test]
fn peek_header_checks_fields_as_they_arrive() {
    let f = status_frame();
    for n in 0..HEADER_BYTES {
        assert_eq!(peek_header(&f[..n]), Ok(None), "prefix {n}");
    }
    // Wrong first byte: rejected with one byte.
    assert_eq!(peek_header(b"x"), Err(DecodeError::BadMagic));
    assert_eq!(peek_header(b"csnX"), Err(DecodeError::BadMagic));
    // Wrong version: rejected with 6 bytes.
    let mut g = f.clone();
    g[4] = 2;
    assert_eq!(
        peek_header(&g[..6]),
        Err(DecodeError::BadVersion { found: 2 })
    );
    assert_eq!(decode(&g), Err(DecodeError::BadVersion { found: 2 }));
    // Oversized: rejected with 12 bytes, long before the body.
    let mut g = f.clone();
    g[8..12].copy_from_slice(&(u32::try_from(FRAME_MAX_BYTES).unwrap() + 1).to_le_bytes());
    assert_eq!(
        peek_header(&g[..12]),
        Err(DecodeError::TooLarge { len: 65537 })
    );
    assert_eq!(
        peek_header(&g[..32]),
        Err(DecodeError::TooLarge { len: 65537 })
    );
    g[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(decode(&g), Err(DecodeError::TooLarge { len: u32::MAX }));
    // The largest legal length is accepted by the header check.
    g[8..12].copy_from_slice(&u32::try_from(FRAME_MAX_BYTES).unwrap().to_le_bytes());
    assert!(matches!(peek_header(&g), Ok(Some(h)) if h.length as usize == FRAME_MAX_BYTES));
    assert_eq!(decode(&g), Err(DecodeError::Truncated));
    // Shorter than a header.
    g[8..12].copy_from_slice(&31u32.to_le_bytes());
    assert_eq!(
        peek_header(&g[..12]),
        Err(DecodeError::TooShort { len: 31 })
    );
}

#[test]
fn decode_rejects_flags_unknown_kinds_and_extra_bytes() {
    let f = status_frame();
    let mut g = f.clone();
    g[12] = 1;
    assert_eq!(decode(&g), Err(DecodeError::BadFlags));
    let mut g = f.clone();
    g[6..8].copy_from_slice(&0x0777u16.to_le_bytes());
    let e = decode(&g).unwrap_err();
    assert_eq!(e, DecodeError::UnknownKind { code: 0x0777 });
    assert!(!e.is_fatal());
    assert_eq!(e.culprit(), 0x0777);
    assert_eq!(e.code(), ErrorCode::UnknownKind);
    let mut g = f.clone();
    g[6..8].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(decode(&g), Err(DecodeError::UnknownKind { code: 0 }));
    let mut g = f.clone();
    g.push(0);
    assert_eq!(
        decode(&g),
        Err(DecodeError::TrailingBytes { len: 32, have: 33 })
    );
    assert_eq!(decode(&f[..31]), Err(DecodeError::Truncated));
    assert_eq!(decode(&[]), Err(DecodeError::Truncated));
    // A body on a kind that has none.
    let mut g = f.clone();
    g.extend_from_slice(&[0; 4]);
    g[8] = 36;
    assert!(matches!(
        decode(&g),
        Err(DecodeError::BadBody {
            kind: Kind::Status,
            ..
        })
    ));
}

#[test]
fn error_classification_and_display() {
    let all = [
        DecodeError::BadMagic,
        DecodeError::BadVersion { found: 9 },
        DecodeError::Truncated,
        DecodeError::TooLarge { len: 70000 },
        DecodeError::TooShort { len: 3 },
        DecodeError::BadFlags,
        DecodeError::UnknownKind { code: 0x42 },
        DecodeError::BadBody {
            kind: Kind::Identify,
            what: "unknown volume kind",
        },
        DecodeError::TrailingBytes { len: 32, have: 40 },
    ];
    let fatal: Vec<bool> = all.iter().map(DecodeError::is_fatal).collect();
    assert_eq!(
        fatal,
        [true, true, false, true, true, false, false, false, false]
    );
    for e in all {
        let s = e.to_string();
        assert!(!s.is_empty() && !s.contains('\n'), "{s:?}");
    }
    assert_eq!(
        all[7].to_string(),
        "malformed identify body: unknown volume kind"
    );
    assert_eq!(all[7].culprit(), Kind::Identify.code());
    assert_eq!(all[7].code(), ErrorCode::BadFrame);
    assert_eq!(all[3].code(), ErrorCode::TooLarge);
    assert_eq!(
        all[3].to_string(),
        "frame length 70000 is over the 65536-byte maximum"
    );
    for e in [
        EncodeError::BufferTooSmall { need: 40, have: 2 },
        EncodeError::ListFull { max: 64 },
        EncodeError::Invalid { what: "x" },
    ] {
        let s = e.to_string();
        assert!(!s.is_empty() && !s.contains('\n'));
    }
}

// ---------------------------------------------------------------------------
// Body rejection.
// ---------------------------------------------------------------------------

/// Encodes `msg`, lets `edit` change body bytes (offsets relative to the body)
/// and decodes.
fn decode_edited(msg: &Msg<'_>, edit: impl FnOnce(&mut Vec<u8>)) -> Result<Kind, DecodeError> {
    let mut f = frame_of(&Header::new(1, 0), msg);
    let mut body = f.split_off(HEADER_BYTES);
    edit(&mut body);
    let len = u32::try_from(HEADER_BYTES + body.len()).unwrap();
    f[8..12].copy_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&body);
    decode(&f).map(|(_, m)| m.kind())
}

fn bad_body(r: Result<Kind, DecodeError>, kind: Kind, what_part: &str) {
    match r {
        Err(DecodeError::BadBody { kind: k, what }) => {
            assert_eq!(k, kind);
            assert!(what.contains(what_part), "{what:?} lacks {what_part:?}");
        }
        other => panic!("expected a bad {kind} body ({what_part}), got {other:?}"),
    }
}

#[test]
fn reserved_bytes_must_be_zero() {
    // (kind, reserved offsets in the small sample body)
    let cases: [(Kind, &[usize]); 25] = [
        (Kind::Hello, &[6, 7]),
        (Kind::QueryDelta, &[18, 19]),
        (Kind::DeltaMap, &[12, 13, 14, 15]),
        (Kind::HelloOk, &[2, 3, 4, 5, 6, 7]),
        (Kind::IdentifyOk, &[20, 21, 22, 23]),
        (Kind::SetPriority, &[5, 6, 7]),
        (Kind::StatusReply, &[81, 82, 83, 84, 85, 86, 87]),
        // List header reserved, and the first entry's reserved bytes.
        (Kind::QueryOriginWrite, &[2, 3, 16, 17, 18, 19]),
        (Kind::SnapshotReadReply, &[2, 3, 17, 18, 19]),
        (Kind::Revoke, &[2, 3, 6, 7, 20, 21, 22, 23]),
        (Kind::ReleaseLocks, &[2, 3, 16, 17, 18, 19]),
        (Kind::NeedServer, &[22, 23, 28, 29, 30, 31]),
        (Kind::ServerAddress, &[12, 13]),
        (Kind::ServerReady, &[8, 9]),
        (Kind::ServerUp, &[12, 13]),
        (Kind::ClientGone, &[12, 13, 14, 15]),
        (Kind::ClientsOf, &[4, 5, 6, 7]),
        (Kind::Join, &[4, 5]),
        (Kind::AgentState, &[5]),
        (Kind::NeedClients, &[12, 13, 14, 15]),
        (Kind::ServerDown, &[12, 13, 14, 15]),
        (Kind::Fence, &[4, 5, 6, 7]),
        (
            Kind::ClusterStatusReply,
            // (12 and 13 are `failed_deaths` now.)
            &[16 + 22 + 2, 16 + 22 + 3, 16 + 22 + 4 + 5],
        ),
        // The flags' reserved bytes, the node list's header, the client
        // list's header and first entry.
        (
            Kind::StartServer,
            &[1, 7, 8 + 2, 8 + 3, 24 + 2, 24 + 3, 24 + 4 + 12, 24 + 4 + 15],
        ),
        (Kind::Clients, &[16 + 2, 16 + 3, 16 + 4 + 12, 16 + 4 + 13]),
    ];
    for (kind, offs) in cases {
        for &off in offs {
            let mut s = Scratch::new();
            let msg = sample(kind, false, &mut s);
            bad_body(decode_edited(&msg, |b| b[off] = 0x80), kind, "reserved");
        }
    }
    let mut s = Scratch::new();
    let msg = sample(Kind::SnapshotList, false, &mut s);
    bad_body(
        decode_edited(&msg, |b| b[4 + 6] = 1),
        Kind::SnapshotList,
        "reserved",
    );
}

#[test]
fn fixed_bodies_must_have_their_exact_length() {
    for kind in Kind::ALL {
        let mut s = Scratch::new();
        let msg = sample(kind, false, &mut s);
        bad_body(decode_edited(&msg, |b| b.push(0)), kind, "length");
        if msg.body_bytes() > 0 {
            bad_body(
                decode_edited(&msg, |b| {
                    b.pop();
                }),
                kind,
                "length",
            );
        }
    }
}

#[test]
fn delta_messages_are_validated() {
    let mut s = Scratch::new();
    let q = sample(Kind::QueryDelta, false, &mut s);
    // Zero chunks, more than DELTA_CHUNKS_MAX, an end past u64::MAX, an
    // unknown volume kind, a tag given for the origin.
    bad_body(
        decode_edited(&q, |b| b[8..12].copy_from_slice(&0u32.to_le_bytes())),
        Kind::QueryDelta,
        "1..=DELTA_CHUNKS_MAX",
    );
    let over = u32::try_from(DELTA_CHUNKS_MAX + 1).unwrap();
    bad_body(
        decode_edited(&q, |b| b[8..12].copy_from_slice(&over.to_le_bytes())),
        Kind::QueryDelta,
        "1..=DELTA_CHUNKS_MAX",
    );
    bad_body(
        decode_edited(&q, |b| {
            b[0..8].copy_from_slice(&(u64::MAX - 3).to_le_bytes())
        }),
        Kind::QueryDelta,
        "overflows",
    );
    bad_body(
        decode_edited(&q, |b| b[16] = 7),
        Kind::QueryDelta,
        "unknown volume kind",
    );
    bad_body(
        decode_edited(&q, |b| b[20] = 1),
        Kind::QueryDelta,
        "snapshot tag given for the origin",
    );
    let mut s = Scratch::new();
    let m = sample(Kind::DeltaMap, false, &mut s);
    // 20 chunks: 3 bytes, the last with 4 bits in use.
    assert_eq!(m.body_bytes(), 16 + 3);
    bad_body(
        decode_edited(&m, |b| b[16 + 2] |= 0x10),
        Kind::DeltaMap,
        "bits past its chunk count",
    );
    bad_body(
        decode_edited(&m, |b| b[8..12].copy_from_slice(&30u32.to_le_bytes())),
        Kind::DeltaMap,
        "length does not match its chunk count",
    );
    bad_body(
        decode_edited(&m, |b| b[8..12].copy_from_slice(&0u32.to_le_bytes())),
        Kind::DeltaMap,
        "1..=DELTA_CHUNKS_MAX",
    );
    // The encoder refuses what the decoder would.
    let bits = [0u8; 2];
    let bad = Msg::DeltaMap {
        chunk: 0,
        chunks: 20,
        bits: &bits,
    };
    let mut out = [0u8; 256];
    assert!(matches!(
        encode(&Header::new(1, 0), &bad, &mut out),
        Err(EncodeError::Invalid { .. })
    ));
    let bad = Msg::QueryDelta {
        volume: Volume::Origin,
        base: 1,
        chunk: 0,
        chunks: 0,
    };
    assert!(matches!(
        encode(&Header::new(1, 0), &bad, &mut out),
        Err(EncodeError::Invalid { .. })
    ));
}

#[test]
fn ranges_are_validated() {
    let mut rb = [0u8; RANGES_BYTES_MAX];
    let mut b = RangesBuilder::new(&mut rb).unwrap();
    assert!(matches!(
        b.push(Range {
            chunk: 1,
            chunks: 0
        }),
        Err(EncodeError::Invalid { .. })
    ));
    assert!(matches!(
        b.push(Range {
            chunk: u64::MAX,
            chunks: 1
        }),
        Err(EncodeError::Invalid { .. })
    ));
    b.push(Range {
        chunk: u64::MAX - 1,
        chunks: 1,
    })
    .unwrap();
    assert_eq!(b.len(), 1);
    for i in 1..RANGES_MAX as u64 {
        b.push(Range {
            chunk: i,
            chunks: 1,
        })
        .unwrap();
    }
    assert_eq!(b.remaining(), 0);
    assert_eq!(
        b.push(Range {
            chunk: 0,
            chunks: 1
        }),
        Err(EncodeError::ListFull { max: RANGES_MAX })
    );
    assert_eq!(b.finish().len(), RANGES_MAX);

    let mut small = [0u8; 4 + 16 + 3];
    let mut b = RangesBuilder::new(&mut small).unwrap();
    assert_eq!(b.remaining(), 1);
    b.push(Range {
        chunk: 0,
        chunks: 1,
    })
    .unwrap();
    assert_eq!(
        b.push(Range {
            chunk: 1,
            chunks: 1
        }),
        Err(EncodeError::BufferTooSmall { need: 36, have: 23 })
    );
    assert_eq!(b.finish().len(), 1);
    assert!(RangesBuilder::new(&mut [0u8; 3]).is_err());

    let mut s = Scratch::new();
    let msg = sample(Kind::FinishSnapshotRead, false, &mut s);
    let k = Kind::FinishSnapshotRead;
    bad_body(decode_edited(&msg, |b| b[12..16].fill(0)), k, "zero chunks");
    bad_body(
        decode_edited(&msg, |b| b[4..12].fill(0xff)),
        k,
        "past the last",
    );
    bad_body(decode_edited(&msg, |b| b[0] = 3), k, "count");
    bad_body(decode_edited(&msg, |b| b[0] = 1), k, "count");
    bad_body(decode_edited(&msg, |b| b.truncate(3)), k, "count");
    // A count over RANGES_MAX with a matching length is still rejected.
    bad_body(
        decode_edited(&msg, |b| {
            let n = RANGES_MAX + 1;
            b.clear();
            b.extend_from_slice(&u16::try_from(n).unwrap().to_le_bytes());
            b.extend_from_slice(&[0, 0]);
            for i in 0..n as u64 {
                b.extend_from_slice(&i.to_le_bytes());
                b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
            }
        }),
        k,
        "maximum",
    );
    assert!(Ranges::parse(&[1, 0, 0, 0]).is_err());
    assert_eq!(Ranges::parse(&[0, 0, 0, 0]), Ok(Ranges::empty()));
}

#[test]
fn targets_are_validated() {
    let mut tb = [0u8; 256];
    let mut b = TargetsBuilder::new(&mut tb).unwrap();
    for bad in [
        Target {
            chunk: 0,
            chunks: 0,
            kind: TargetKind::Store,
            store_chunk: 1,
        },
        Target {
            chunk: 0,
            chunks: 1,
            kind: TargetKind::Origin,
            store_chunk: 1,
        },
        Target {
            chunk: 0,
            chunks: 2,
            kind: TargetKind::Store,
            store_chunk: u64::MAX - 1,
        },
    ] {
        assert!(
            matches!(b.push(bad), Err(EncodeError::Invalid { .. })),
            "{bad:?}"
        );
    }
    assert!(b.is_empty());

    let mut s = Scratch::new();
    let msg = sample(Kind::SnapshotReadReply, false, &mut s);
    let k = Kind::SnapshotReadReply;
    // Entry 0 is a store target, entry 1 an origin target.
    bad_body(decode_edited(&msg, |b| b[4 + 12] = 3), k, "target kind");
    bad_body(decode_edited(&msg, |b| b[4 + 12] = 0), k, "target kind");
    bad_body(decode_edited(&msg, |b| b[28 + 16] = 1), k, "store chunk");
    bad_body(
        decode_edited(&msg, |b| b[4 + 16..4 + 24].fill(0xff)),
        k,
        "past the last",
    );

    // A snapshot write reply never points at the origin.
    let mut tb = [0u8; 64];
    let t = Targets::from_entries(
        &[Target {
            chunk: 1,
            chunks: 1,
            kind: TargetKind::Origin,
            store_chunk: 0,
        }],
        &mut tb,
    )
    .unwrap();
    let mut out = [0u8; 128];
    assert!(matches!(
        encode(&Header::new(1, 1), &Msg::SnapshotWriteOk(t), &mut out),
        Err(EncodeError::Invalid { .. })
    ));
    let f = frame_of(&Header::new(1, 1), &Msg::SnapshotReadReply(t));
    let mut g = f.clone();
    g[6..8].copy_from_slice(&Kind::SnapshotWriteOk.code().to_le_bytes());
    bad_body(
        decode(&g).map(|(_, m)| m.kind()),
        Kind::SnapshotWriteOk,
        "origin target",
    );
}

#[test]
fn snapshot_queries_are_bounded_by_their_reply() {
    let mut rb = [0u8; 64];
    let over = Ranges::from_entries(
        &[
            Range {
                chunk: 0,
                chunks: u32::try_from(QUERY_CHUNKS_MAX).unwrap(),
            },
            Range {
                chunk: 9,
                chunks: 1,
            },
        ],
        &mut rb,
    )
    .unwrap();
    let mut out = [0u8; 128];
    for msg in [Msg::QuerySnapshotRead(over), Msg::QuerySnapshotWrite(over)] {
        assert!(matches!(
            encode(&Header::new(1, 0), &msg, &mut out),
            Err(EncodeError::Invalid { .. })
        ));
    }
    // The same ranges are fine for an origin write, and rejected on decode
    // when relabelled as a snapshot query.
    let f = frame_of(&Header::new(1, 0), &Msg::QueryOriginWrite(over));
    let mut g = f.clone();
    g[6..8].copy_from_slice(&Kind::QuerySnapshotWrite.code().to_le_bytes());
    bad_body(
        decode(&g).map(|(_, m)| m.kind()),
        Kind::QuerySnapshotWrite,
        "QUERY_CHUNKS_MAX",
    );
}

#[test]
fn scalar_fields_are_validated() {
    let mut out = [0u8; 512];
    let h = Header::new(1, 0);
    for (min, max) in [(0, 1), (2, 1), (0, 0)] {
        let m = Msg::Hello {
            version_min: min,
            version_max: max,
            role: Role::Control,
        };
        assert!(matches!(
            encode(&h, &m, &mut out),
            Err(EncodeError::Invalid { .. })
        ));
    }
    assert!(matches!(
        encode(
            &h,
            &Msg::HelloOk {
                version: 0,
                server_id: 1
            },
            &mut out
        ),
        Err(EncodeError::Invalid { .. })
    ));
    let hello = Msg::Hello {
        version_min: 1,
        version_max: 1,
        role: Role::Control,
    };
    bad_body(decode_edited(&hello, |b| b[4] = 5), Kind::Hello, "role");
    bad_body(decode_edited(&hello, |b| b[4] = 0), Kind::Hello, "role");
    assert_eq!(Role::from_u16(4), Some(Role::Server));
    assert_eq!(Role::from_u16(5), None);
    let server = Msg::Hello {
        version_min: 1,
        version_max: 1,
        role: Role::Server,
    };
    let f = frame_of(&h, &server);
    assert_eq!(f[HEADER_BYTES + 4], 4);
    assert_eq!(decode(&f).unwrap().1, server);
    bad_body(decode_edited(&hello, |b| b[0] = 2), Kind::Hello, "version");
    bad_body(
        decode_edited(&hello, |b| b[0..2].fill(0)),
        Kind::Hello,
        "version",
    );

    let mut s = Scratch::new();
    let id = sample(Kind::Identify, false, &mut s); // origin
    bad_body(
        decode_edited(&id, |b| b[44] = 1),
        Kind::Identify,
        "tag given for the origin",
    );
    bad_body(
        decode_edited(&id, |b| b[40] = 3),
        Kind::Identify,
        "volume kind",
    );
    bad_body(
        decode_edited(&id, |b| b[40] = 0),
        Kind::Identify,
        "volume kind",
    );

    let mut s = Scratch::new();
    let st = sample(Kind::StatusReply, false, &mut s);
    bad_body(
        decode_edited(&st, |b| b[80] = 2),
        Kind::StatusReply,
        "state",
    );

    let mut s = Scratch::new();
    let sl = sample(Kind::SnapshotList, false, &mut s);
    bad_body(
        decode_edited(&sl, |b| b[4 + 5] = 4),
        Kind::SnapshotList,
        "flag",
    );
    let mut sb = [0u8; 64];
    let mut b = SnapListBuilder::new(&mut sb).unwrap();
    let info = SnapInfo {
        tag: 1,
        priority: 0,
        flags: 0x80,
        ctime_secs: 0,
        chunks: 0,
        unique_chunks: 0,
    };
    assert!(matches!(b.push(info), Err(EncodeError::Invalid { .. })));
    let ok = SnapInfo {
        flags: SnapInfo::DELETING | SnapInfo::IN_USE,
        ..info
    };
    b.push(ok).unwrap();
    let l = b.finish();
    assert!(l.get(0).unwrap().deleting() && l.get(0).unwrap().in_use());
    assert_eq!(l.get(1), None);
}

#[test]
fn error_text_is_bounded_and_utf8() {
    let mut out = [0u8; 512];
    let h = Header::new(1, 1);
    let long = "x".repeat(ERROR_TEXT_MAX_BYTES + 1);
    let m = Msg::Error {
        code: ErrorCode::Internal,
        culprit: 0,
        text: &long,
    };
    assert!(matches!(
        encode(&h, &m, &mut out),
        Err(EncodeError::Invalid { .. })
    ));
    let m = Msg::Error {
        code: ErrorCode::Internal,
        culprit: 0,
        text: "héllo",
    };
    bad_body(decode_edited(&m, |b| b[9] = 0xff), Kind::Error, "UTF-8");
    bad_body(decode_edited(&m, |b| b[0] = 0), Kind::Error, "error code");
    bad_body(decode_edited(&m, |b| b[0] = 22), Kind::Error, "error code");
    bad_body(decode_edited(&m, |b| b[6] = 5), Kind::Error, "length");
    bad_body(
        decode_edited(&m, |b| {
            b[6..8].copy_from_slice(&201u16.to_le_bytes());
            b.resize(8 + 201, b'a');
        }),
        Kind::Error,
        "ERROR_TEXT_MAX_BYTES",
    );
    bad_body(decode_edited(&m, |b| b.truncate(7)), Kind::Error, "length");
    // The culprit is raw: an unknown kind code is carried as is.
    let m = Msg::Error {
        code: ErrorCode::UnknownKind,
        culprit: 0x7777,
        text: "",
    };
    let f = frame_of(&h, &m);
    assert_eq!(decode(&f).unwrap().1, m);
}

#[test]
fn error_text_formats_without_overflow() {
    let mut t = ErrorText::new();
    write!(
        t,
        "{}",
        DecodeError::BadBody {
            kind: Kind::Hello,
            what: "unknown role"
        }
    )
    .unwrap();
    assert_eq!(t.as_str(), "malformed hello body: unknown role");
    assert!(!t.is_truncated());
    t.clear();
    // 199 ASCII bytes, then a 2-byte character that does not fit: dropped whole.
    for _ in 0..199 {
        t.write_char('a').unwrap();
    }
    write!(t, "é and more").unwrap();
    assert_eq!(t.as_str().len(), 199);
    assert!(t.is_truncated());
    t.clear();
    write!(t, "{LONG_TEXT}{LONG_TEXT}").unwrap();
    assert_eq!(t.as_str(), LONG_TEXT);
    let m = Msg::Error {
        code: ErrorCode::Busy,
        culprit: 0,
        text: t.as_str(),
    };
    let f = frame_of(&Header::new(1, 1), &m);
    assert_eq!(decode(&f).unwrap().1, m);
}

#[test]
fn encode_rejects_bad_headers() {
    let mut out = [0u8; 64];
    let mut h = Header::new(1, 0);
    h.version = 2;
    assert!(matches!(
        encode(&h, &Msg::Status, &mut out),
        Err(EncodeError::Invalid { .. })
    ));
    let mut h = Header::new(1, 0);
    h.flags = 1;
    assert!(matches!(
        encode(&h, &Msg::Status, &mut out),
        Err(EncodeError::Invalid { .. })
    ));
    // kind and length of the header given are ignored.
    let mut h = Header::new(1, 0);
    h.kind = Kind::Hello.code();
    h.length = 9999;
    let n = encode(&h, &Msg::Status, &mut out).unwrap();
    let (d, m) = decode(&out[..n]).unwrap();
    assert_eq!(
        (d.kind, d.length, m),
        (Kind::Status.code(), 32, Msg::Status)
    );
}

#[test]
fn list_views_behave_like_lists() {
    let items = [
        Range {
            chunk: 1,
            chunks: 2,
        },
        Range {
            chunk: 10,
            chunks: 1,
        },
        Range {
            chunk: 100,
            chunks: 7,
        },
    ];
    let mut rb = [0u8; 128];
    let r = Ranges::from_entries(&items, &mut rb).unwrap();
    assert_eq!(r.len(), 3);
    assert!(!r.is_empty());
    assert_eq!(r.iter().collect::<Vec<_>>(), items);
    assert_eq!(r.iter().len(), 3);
    assert_eq!(
        (0..4).map(|i| r.get(i)).collect::<Vec<_>>(),
        [Some(items[0]), Some(items[1]), Some(items[2]), None]
    );
    assert_eq!(r.total_chunks(), 10);
    assert_eq!(r.as_bytes().len(), Ranges::bytes_for(3));
    // A copy of the bytes parses back to an equal view.
    let copy = r.as_bytes().to_vec();
    assert_eq!(Ranges::parse(&copy), Ok(r));
    assert_eq!(format!("{r:?}").matches("Range").count(), 3);
    assert!(Ranges::empty().is_empty());
    let mut n = 0;
    for x in &r {
        assert_eq!(x, items[n]);
        n += 1;
    }
    assert_eq!(n, 3);
}

// ---------------------------------------------------------------------------
// Cache coherence and the agent protocol: known answers.
// ---------------------------------------------------------------------------

#[test]
fn known_answer_identify_with_flags() {
    let f = frame_of(
        &Header::new(2, 0),
        &Msg::Identify {
            client_id: 5,
            node_id: 1,
            volume: Volume::Snapshot(7),
            origin_uuid: [0xab; 16],
            volume_size_bytes: 0x1000,
            chunk_size_bytes: 0x4000,
            flags: IDENTIFY_CACHING,
        },
    );
    #[rustfmt::skip]
    let want: [u8; 80] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x02, 0x00, 0x50, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x05, 0, 0, 0, 0, 0, 0, 0,          // client id
        0x00, 0x10, 0, 0, 0, 0, 0, 0,       // volume size
        0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab,
        0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, // origin uuid
        0x01, 0x00, 0x00, 0x00,             // node id
        0x00, 0x40, 0x00, 0x00,             // chunk size
        0x02, 0x00,                         // volume: snapshot
        0x01, 0x00,                         // flags: caching
        0x07, 0x00, 0x00, 0x00,             // tag
    ];
    assert_eq!(f, want);
    assert_eq!(IDENTIFY_CACHING, 1);
}

#[test]
fn known_answer_revoke() {
    let mut rb = [0u8; 64];
    let r = Ranges::from_entries(
        &[Range {
            chunk: 0x10,
            chunks: 2,
        }],
        &mut rb,
    )
    .unwrap();
    let f = frame_of(
        &Header::new(0x77, 5),
        &Msg::Revoke {
            what: RevokeWhat::SnapshotMappings,
            ranges: r,
        },
    );
    #[rustfmt::skip]
    let want: [u8; 56] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x30, 0x80, 0x38, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x77, 0, 0, 0, 0, 0, 0, 0, 0x05, 0, 0, 0, 0, 0, 0, 0,
        0x02, 0x00, 0x00, 0x00,             // what: snapshot mappings, reserved
        0x01, 0x00, 0x00, 0x00,             // count 1, reserved
        0x10, 0, 0, 0, 0, 0, 0, 0,          // chunk
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // chunks, reserved
    ];
    assert_eq!(f, want);

    let f = frame_of(
        &Header::new(0x78, 5),
        &Msg::Revoke {
            what: RevokeWhat::OriginGrants,
            ranges: Ranges::empty(),
        },
    );
    #[rustfmt::skip]
    let want: [u8; 40] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x30, 0x80, 0x28, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x78, 0, 0, 0, 0, 0, 0, 0, 0x05, 0, 0, 0, 0, 0, 0, 0,
        0x01, 0x00, 0x00, 0x00,             // what: origin grants, reserved
        0x00, 0x00, 0x00, 0x00,             // count 0, reserved
    ];
    assert_eq!(f, want);
    assert_eq!(
        decode(&f).unwrap().1,
        Msg::Revoke {
            what: RevokeWhat::OriginGrants,
            ranges: Ranges::empty()
        }
    );
}

#[test]
fn known_answer_need_server_and_server_address() {
    let f = frame_of(
        &Header::new(0x11, 0),
        &Msg::NeedServer {
            client_id: 0x0102_0304_0506_0708,
            failed_incarnation: 3,
            node_id: 2,
            volume: Some(Volume::Snapshot(9)),
        },
    );
    #[rustfmt::skip]
    let want: [u8; 64] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x01, 0x40, 0x40, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // client id
        0x03, 0, 0, 0, 0, 0, 0, 0,          // failed incarnation
        0x02, 0x00, 0x00, 0x00,             // node id
        0x02, 0x00, 0x00, 0x00,             // volume: snapshot, reserved
        0x09, 0x00, 0x00, 0x00,             // tag
        0x00, 0x00, 0x00, 0x00,             // reserved
    ];
    assert_eq!(f, want);

    // A control tool: no volume, client id 0.
    let f = frame_of(
        &Header::new(0x12, 0),
        &Msg::NeedServer {
            client_id: 0,
            failed_incarnation: 0,
            node_id: 4,
            volume: None,
        },
    );
    assert_eq!(&f[6..8], &[0x01, 0x40]);
    #[rustfmt::skip]
    let body: [u8; 32] = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x04, 0, 0, 0, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(f[HEADER_BYTES..], body);

    let f = frame_of(
        &Header::new(0x11, 0),
        &Msg::ServerAddress {
            incarnation: 6,
            node_id: 3,
            addr: "/run/s",
        },
    );
    #[rustfmt::skip]
    let want: [u8; 54] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x02, 0x40, 0x36, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x06, 0, 0, 0, 0, 0, 0, 0,          // incarnation
        0x03, 0x00, 0x00, 0x00,             // node id
        0x00, 0x00,                         // reserved
        0x06, 0x00,                         // addr_len
        b'/', b'r', b'u', b'n', b'/', b's', // addr
    ];
    assert_eq!(f, want);
}

#[test]
fn known_answer_start_server() {
    let mut nb = [0u8; 64];
    let members = NodeList::from_entries(&[Node { id: 1 }, Node { id: 2 }], &mut nb).unwrap();
    let mut cb = [0u8; 64];
    let expected = ClientList::from_entries(
        &[ClientEntry {
            client_id: 0x77,
            node_id: 2,
        }],
        &mut cb,
    )
    .unwrap();
    let f = frame_of(
        &Header::new(1, 0),
        &Msg::StartServer {
            claim: false,
            members,
            expected,
        },
    );
    #[rustfmt::skip]
    let want: [u8; 72] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x04, 0x40, 0x48, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x00, 0, 0, 0, 0, 0, 0, 0,          // flags (claim: no), reserved
        0x02, 0x00, 0x00, 0x00,             // node count 2, reserved
        0x01, 0x00, 0x00, 0x00,             // node 1
        0x02, 0x00, 0x00, 0x00,             // node 2
        0x01, 0x00, 0x00, 0x00,             // client count 1, reserved
        0x77, 0, 0, 0, 0, 0, 0, 0,          // client id
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // node id, reserved
    ];
    assert_eq!(f, want);
    assert_eq!(
        Msg::StartServer {
            claim: false,
            members,
            expected,
        }
        .body_bytes(),
        8 + NodeList::bytes_for(2) + ClientList::bytes_for(1)
    );
    // With `claim`, only the flags byte differs.
    let g = frame_of(
        &Header::new(1, 0),
        &Msg::StartServer {
            claim: true,
            members,
            expected,
        },
    );
    assert_eq!(g[HEADER_BYTES], 1);
    assert_eq!(g[HEADER_BYTES + 1..], f[HEADER_BYTES + 1..]);
    // Both lists empty: two list headers.
    let f = frame_of(
        &Header::new(1, 0),
        &Msg::StartServer {
            claim: false,
            members: NodeList::empty(),
            expected: ClientList::empty(),
        },
    );
    assert_eq!(f[HEADER_BYTES..], [0u8; 16]);
}

#[test]
fn known_answer_cluster_status_reply() {
    let mut sb = [0u8; 64];
    let nodes = NodeStatusList::from_entries(
        &[
            NodeStatus {
                node: 1,
                flags: NodeStatus::CONNECTED | NodeStatus::MEMBER,
                serving_incarnation: 0,
            },
            NodeStatus {
                node: 2,
                flags: NodeStatus::FLAGS_ALL,
                serving_incarnation: 5,
            },
        ],
        &mut sb,
    )
    .unwrap();
    let msg = Msg::ClusterStatusReply {
        server_incarnation: 5,
        server_node: 2,
        failed_deaths: 0,
        server_addr: "a:1",
        nodes,
    };
    let f = frame_of(&Header::new(3, 0), &msg);
    #[rustfmt::skip]
    let want: [u8; 87] = [
        0x63, 0x73, 0x6e, 0x77, 0x01, 0x00, 0x22, 0x40, 0x57, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x05, 0, 0, 0, 0, 0, 0, 0,          // server incarnation
        0x02, 0x00, 0x00, 0x00,             // server node
        0x00, 0x00,                         // failed_deaths
        0x03, 0x00,                         // addr_len
        b'a', b':', b'1',                   // addr
        0x02, 0x00, 0x00, 0x00,             // count 2, reserved
        0x01, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0,
        0x02, 0x00, 0x00, 0x00, 0x0f, 0x00, 0x00, 0x00, 5, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(f, want);
    let (_, m) = decode(&f).unwrap();
    assert_eq!(m, msg);
    let Msg::ClusterStatusReply { nodes, .. } = m else {
        panic!("wrong kind")
    };
    let n1 = nodes.get(0).unwrap();
    assert!(n1.connected() && n1.member() && !n1.standby_ready() && !n1.serving());
    let n2 = nodes.get(1).unwrap();
    assert!(n2.connected() && n2.member() && n2.standby_ready() && n2.serving());
}

#[test]
fn known_answer_small_agent_bodies() {
    // (message, expected body)
    let cases: [(Msg<'_>, &[u8]); 10] = [
        (Msg::RevokeDone, &[]),
        (Msg::ClusterStatus, &[]),
        (Msg::NodeJoined { node_id: 0x0102 }, &[0x02, 0x01, 0, 0]),
        (Msg::NodeLeft { node_id: 3 }, &[3, 0, 0, 0]),
        (
            Msg::ClientGone {
                client_id: 9,
                node_id: 2,
            },
            &[9, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            Msg::Join {
                node_id: 1,
                addr: "/a",
            },
            &[1, 0, 0, 0, 0, 0, 2, 0, b'/', b'a'],
        ),
        (
            Msg::AgentState {
                node_id: 2,
                standby_ready: true,
                recent_deaths: 3,
                serving_incarnation: 0,
                died_incarnation: 4,
            },
            &[
                2, 0, 0, 0, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        (
            Msg::Fence {
                reason: FenceReason::ServerMoved,
            },
            &[2, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            Msg::ClusterCommand {
                op: ClusterOp::Start,
                node_id: 3,
            },
            &[3, 0, 0, 0, 3, 0, 0, 0],
        ),
        (
            Msg::ServerReady {
                pid: 0x1234,
                node_id: 2,
                addr: "h:1",
            },
            &[0x34, 0x12, 0, 0, 2, 0, 0, 0, 0, 0, 3, 0, b'h', b':', b'1'],
        ),
    ];
    for (msg, body) in cases {
        let f = frame_of(&Header::new(1, 0), &msg);
        assert_eq!(&f[HEADER_BYTES..], body, "{msg}");
        assert_eq!(decode(&f).unwrap().1, msg);
    }
}

// ---------------------------------------------------------------------------
// Cache coherence and the agent protocol: rejection.
// ---------------------------------------------------------------------------

fn encode_invalid(msg: &Msg<'_>) {
    let mut out = vec![0u8; FRAME_MAX_BYTES];
    assert!(
        matches!(
            encode(&Header::new(1, 0), msg, &mut out),
            Err(EncodeError::Invalid { .. })
        ),
        "{msg:?} encoded"
    );
}

#[test]
fn identify_flags_are_validated() {
    let mut s = Scratch::new();
    let good = sample(Kind::Identify, false, &mut s);
    let mut id = good;
    for bit in 1..16 {
        let bad = 1u16 << bit;
        bad_body(
            decode_edited(&good, |b| b[42..44].copy_from_slice(&bad.to_le_bytes())),
            Kind::Identify,
            "identify flag",
        );
        if let Msg::Identify { flags, .. } = &mut id {
            *flags = bad | IDENTIFY_CACHING;
        }
        encode_invalid(&id);
    }
    if let Msg::Identify { flags, .. } = &mut id {
        *flags = IDENTIFY_CACHING;
    }
    let f = frame_of(&Header::new(1, 0), &id);
    assert_eq!(f[HEADER_BYTES + 42], 1);
    assert_eq!(decode(&f).unwrap().1, id);
}

#[test]
fn revoke_is_validated() {
    let mut s = Scratch::new();
    let msg = sample(Kind::Revoke, false, &mut s); // snapshot mappings, 2 ranges
    let k = Kind::Revoke;
    bad_body(decode_edited(&msg, |b| b[0] = 0), k, "revoke kind");
    bad_body(decode_edited(&msg, |b| b[0] = 3), k, "revoke kind");
    bad_body(decode_edited(&msg, |b| b[1] = 1), k, "revoke kind");
    // Origin grants carry no ranges; snapshot mappings at least one.
    bad_body(decode_edited(&msg, |b| b[0] = 1), k, "origin-grants");
    let Msg::Revoke { ranges, .. } = msg else {
        panic!("wrong sample")
    };
    encode_invalid(&Msg::Revoke {
        what: RevokeWhat::OriginGrants,
        ranges,
    });
    let empty = Msg::Revoke {
        what: RevokeWhat::OriginGrants,
        ranges: Ranges::empty(),
    };
    bad_body(decode_edited(&empty, |b| b[0] = 2), k, "without ranges");
    encode_invalid(&Msg::Revoke {
        what: RevokeWhat::SnapshotMappings,
        ranges: Ranges::empty(),
    });
    // The list is validated like any range list, and must fill the body.
    bad_body(decode_edited(&msg, |b| b[4] = 3), k, "length");
    bad_body(
        decode_edited(&msg, |b| b[4 + 4 + 8..4 + 4 + 12].fill(0)),
        k,
        "zero chunks",
    );
    bad_body(decode_edited(&msg, |b| b.truncate(3)), k, "length");
    bad_body(decode_edited(&msg, |b| b.truncate(4)), k, "list");
    assert_eq!(RevokeWhat::from_u16(1), Some(RevokeWhat::OriginGrants));
    assert_eq!(RevokeWhat::from_u16(2), Some(RevokeWhat::SnapshotMappings));
    assert_eq!(RevokeWhat::from_u16(0), None);
    assert_eq!(RevokeWhat::from_u16(3), None);
    // ReleaseLocks is a plain range list.
    let mut s = Scratch::new();
    let rl = sample(Kind::ReleaseLocks, false, &mut s);
    bad_body(
        decode_edited(&rl, |b| b[12..16].fill(0)),
        Kind::ReleaseLocks,
        "zero chunks",
    );
}

#[test]
fn enum_fields_are_validated() {
    let mut s = Scratch::new();
    let ns = sample(Kind::NeedServer, false, &mut s); // origin, client 77
    let k = Kind::NeedServer;
    bad_body(decode_edited(&ns, |b| b[20] = 3), k, "volume kind");
    bad_body(decode_edited(&ns, |b| b[21] = 1), k, "volume kind");
    bad_body(
        decode_edited(&ns, |b| b[24] = 1),
        k,
        "tag given for the origin",
    );
    bad_body(
        decode_edited(&ns, |b| {
            b[20] = 0;
            b[24] = 1;
        }),
        k,
        "tag given without a volume",
    );
    // Volume none (a control tool) decodes, with any client id.
    let tool = decode_edited(&ns, |b| b[20] = 0);
    assert_eq!(tool, Ok(Kind::NeedServer));
    let tool = Msg::NeedServer {
        client_id: 0,
        failed_incarnation: 0,
        node_id: 1,
        volume: None,
    };
    assert_eq!(
        decode(&frame_of(&Header::new(1, 0), &tool)).unwrap().1,
        tool
    );

    let mut s = Scratch::new();
    let fence = sample(Kind::Fence, false, &mut s);
    for v in [0u8, 3, 0xff] {
        bad_body(
            decode_edited(&fence, |b| b[0] = v),
            Kind::Fence,
            "fence reason",
        );
    }
    bad_body(
        decode_edited(&fence, |b| b[3] = 1),
        Kind::Fence,
        "fence reason",
    );
    assert_eq!(FenceReason::from_u32(1), Some(FenceReason::LeftCluster));
    assert_eq!(FenceReason::from_u32(2), Some(FenceReason::ServerMoved));
    assert_eq!(FenceReason::from_u32(0), None);
    assert_eq!(FenceReason::from_u32(3), None);

    let mut s = Scratch::new();
    let cmd = sample(Kind::ClusterCommand, false, &mut s);
    let k = Kind::ClusterCommand;
    for v in [0u8, 5, 0xff] {
        bad_body(decode_edited(&cmd, |b| b[0] = v), k, "cluster op");
    }
    bad_body(decode_edited(&cmd, |b| b[2] = 1), k, "cluster op");
    for (v, op) in [
        (1, ClusterOp::Join),
        (2, ClusterOp::Leave),
        (3, ClusterOp::Start),
        (4, ClusterOp::ClearFailed),
    ] {
        assert_eq!(ClusterOp::from_u32(v), Some(op));
        assert_eq!(op as u32, v);
    }
    assert_eq!(ClusterOp::from_u32(5), None);

    let mut s = Scratch::new();
    let st = sample(Kind::AgentState, false, &mut s);
    for v in [2u8, 0x80, 0xff] {
        bad_body(
            decode_edited(&st, |b| b[4] = v),
            Kind::AgentState,
            "standby",
        );
    }
    assert_eq!(decode_edited(&st, |b| b[4] = 1), Ok(Kind::AgentState));

    // Node-status flags: bits 4..8 are undefined.
    let mut s = Scratch::new();
    let csr = sample(Kind::ClusterStatusReply, false, &mut s);
    let flags_at = 16 + "/run/csnap/server.sock".len() + 4 + 4;
    for bit in 4..8 {
        bad_body(
            decode_edited(&csr, |b| b[flags_at] = 1 << bit),
            Kind::ClusterStatusReply,
            "node-status flag",
        );
    }
    assert_eq!(
        decode_edited(&csr, |b| b[flags_at] = NodeStatus::FLAGS_ALL),
        Ok(Kind::ClusterStatusReply)
    );
    let mut sb = [0u8; 64];
    let mut b = NodeStatusListBuilder::new(&mut sb).unwrap();
    assert!(matches!(
        b.push(NodeStatus {
            node: 1,
            flags: 0x10,
            serving_incarnation: 0
        }),
        Err(EncodeError::Invalid { .. })
    ));
    assert!(b.is_empty());
}

#[test]
fn ids_that_must_name_something_are_validated() {
    // (kind, body bytes to zero in the small sample, expected complaint)
    let ns = "/run/csnap/server.sock".len();
    let cases: [(Kind, core::ops::Range<usize>, &str); 20] = [
        (Kind::NodeJoined, 0..4, "node id 0"),
        (Kind::NodeLeft, 0..4, "node id 0"),
        (Kind::ClientGone, 0..8, "client id 0"),
        (Kind::ClientGone, 8..12, "node id 0"),
        (Kind::Join, 0..4, "node id 0"),
        (Kind::ClusterCommand, 4..8, "node id 0"),
        (Kind::NeedClients, 0..8, "gather id 0"),
        (Kind::NeedClients, 8..12, "starter node id 0"),
        (Kind::StartHere, 0..8, "attempt 0"),
        (Kind::ServerAddress, 0..8, "incarnation 0"),
        (Kind::ServerUp, 0..8, "incarnation 0"),
        (Kind::NeedServer, 0..8, "client id 0"),
        // List entries: node list at 8 in Members and in StartServer.
        (Kind::Members, 12..16, "node id 0"),
        (Kind::StartServer, 12..16, "node id 0"),
        // The client list after StartServer's three nodes, and in Clients.
        (Kind::StartServer, 28..36, "client id 0"),
        (Kind::StartServer, 36..40, "node id 0"),
        (Kind::Clients, 20..28, "client id 0"),
        (Kind::Clients, 28..32, "node id 0"),
        // The node-status list after the address.
        (
            Kind::ClusterStatusReply,
            16 + ns + 4..16 + ns + 8,
            "node id 0",
        ),
        (
            Kind::ClusterStatusReply,
            16 + ns + 20..16 + ns + 24,
            "node id 0",
        ),
    ];
    for (kind, at, what) in cases {
        let mut s = Scratch::new();
        let msg = sample(kind, false, &mut s);
        bad_body(decode_edited(&msg, |b| b[at].fill(0)), kind, what);
    }
    // Fields without a rule may be 0.
    for (kind, at) in [
        (Kind::NeedServer, 16..20),
        (Kind::ServerAddress, 8..12),
        (Kind::ServerReady, 0..8),
        (Kind::Serving, 0..24),
        (Kind::AgentState, 0..4),
        (Kind::WantServer, 0..8),
        (Kind::StartHere, 8..16),
        (Kind::Clients, 0..16),
        (Kind::ServerDown, 0..12),
        (Kind::Members, 0..8),
        (Kind::ClusterStatusReply, 8..12),
    ] {
        let mut s = Scratch::new();
        let msg = sample(kind, false, &mut s);
        assert_eq!(decode_edited(&msg, |b| b[at].fill(0)), Ok(kind), "{kind}");
    }
    // Encoding checks the same rules.
    for bad in [
        Msg::NodeJoined { node_id: 0 },
        Msg::NodeLeft { node_id: 0 },
        Msg::ClientGone {
            client_id: 0,
            node_id: 1,
        },
        Msg::ClientGone {
            client_id: 1,
            node_id: 0,
        },
        Msg::Join {
            node_id: 0,
            addr: "/a",
        },
        Msg::ClusterCommand {
            op: ClusterOp::Leave,
            node_id: 0,
        },
        Msg::NeedClients {
            gather_id: 0,
            starter: 1,
        },
        Msg::NeedClients {
            gather_id: 1,
            starter: 0,
        },
        Msg::StartHere {
            attempt: 0,
            former_incarnation: 1,
            claim: false,
        },
        Msg::ServerAddress {
            incarnation: 0,
            node_id: 1,
            addr: "/a",
        },
        Msg::ServerUp {
            incarnation: 0,
            node_id: 1,
            addr: "/a",
        },
        Msg::NeedServer {
            client_id: 0,
            failed_incarnation: 0,
            node_id: 1,
            volume: Some(Volume::Origin),
        },
    ] {
        encode_invalid(&bad);
    }
    // List builders refuse entries naming nothing.
    let mut buf = [0u8; 64];
    let mut b = NodeListBuilder::new(&mut buf).unwrap();
    assert!(matches!(
        b.push(Node { id: 0 }),
        Err(EncodeError::Invalid { .. })
    ));
    assert!(b.is_empty());
    let mut buf = [0u8; 64];
    let mut b = ClientListBuilder::new(&mut buf).unwrap();
    for bad in [
        ClientEntry {
            client_id: 0,
            node_id: 1,
        },
        ClientEntry {
            client_id: 1,
            node_id: 0,
        },
    ] {
        assert!(matches!(b.push(bad), Err(EncodeError::Invalid { .. })));
    }
    assert!(b.is_empty());
    let mut buf = [0u8; 64];
    let mut b = NodeStatusListBuilder::new(&mut buf).unwrap();
    assert!(matches!(
        b.push(NodeStatus {
            node: 0,
            flags: 0,
            serving_incarnation: 1
        }),
        Err(EncodeError::Invalid { .. })
    ));
    assert!(b.is_empty());
}

/// The same message with another address.
fn with_addr<'a>(msg: Msg<'a>, a: &'a str) -> Msg<'a> {
    match msg {
        Msg::ServerAddress {
            incarnation,
            node_id,
            ..
        } => Msg::ServerAddress {
            incarnation,
            node_id,
            addr: a,
        },
        Msg::ServerReady { pid, node_id, .. } => Msg::ServerReady {
            pid,
            node_id,
            addr: a,
        },
        Msg::Join { node_id, .. } => Msg::Join { node_id, addr: a },
        Msg::ServerUp {
            incarnation,
            node_id,
            ..
        } => Msg::ServerUp {
            incarnation,
            node_id,
            addr: a,
        },
        Msg::ClusterStatusReply {
            server_incarnation,
            server_node,
            failed_deaths,
            nodes,
            ..
        } => Msg::ClusterStatusReply {
            server_incarnation,
            server_node,
            failed_deaths,
            server_addr: a,
            nodes,
        },
        other => panic!("{other} has no address"),
    }
}

#[test]
fn addresses_are_bounded_non_empty_utf8() {
    // (kind, offset of addr_len, offset of the address) in the body.
    let cases = [
        (Kind::ServerAddress, 14, 16),
        (Kind::ServerReady, 10, 12),
        (Kind::Join, 6, 8),
        (Kind::ServerUp, 14, 16),
        (Kind::ClusterStatusReply, 14, 16),
    ];
    let long = "a".repeat(ADDR_MAX_BYTES + 1);
    for (kind, len_off, at) in cases {
        let mut s = Scratch::new();
        let msg = sample(kind, false, &mut s);
        let body_len = msg.body_bytes();
        let Some(addr) = (match msg {
            Msg::ServerAddress { addr, .. }
            | Msg::ServerReady { addr, .. }
            | Msg::Join { addr, .. }
            | Msg::ServerUp { addr, .. }
            | Msg::ClusterStatusReply {
                server_addr: addr, ..
            } => Some(addr),
            _ => None,
        }) else {
            panic!("{kind} has no address")
        };
        let n = addr.len();
        assert!(n >= 2);
        // Replaces the address bytes, keeping what follows (a list).
        let set_addr = |b: &mut Vec<u8>, new: &[u8], len: u16| {
            let tail = b.split_off(at + n);
            b.truncate(at);
            b.extend_from_slice(new);
            b.extend_from_slice(&tail);
            b[len_off..len_off + 2].copy_from_slice(&len.to_le_bytes());
        };
        // addr_len past the end of the body.
        let past = u16::try_from(body_len - at + 1).unwrap();
        bad_body(
            decode_edited(&msg, |b| {
                b[len_off..len_off + 2].copy_from_slice(&past.to_le_bytes())
            }),
            kind,
            "runs past the body",
        );
        // addr_len over ADDR_MAX_BYTES, with the bytes there.
        bad_body(
            decode_edited(&msg, |b| set_addr(b, long.as_bytes(), 201)),
            kind,
            "ADDR_MAX_BYTES",
        );
        bad_body(
            decode_edited(&msg, |b| {
                b[len_off..len_off + 2].copy_from_slice(&u16::MAX.to_le_bytes())
            }),
            kind,
            "ADDR_MAX_BYTES",
        );
        // Exactly ADDR_MAX_BYTES is fine.
        assert_eq!(
            decode_edited(&msg, |b| set_addr(b, LONG_ADDR.as_bytes(), 200)),
            Ok(kind)
        );
        // Not UTF-8: a stray continuation byte, a cut multi-byte character.
        bad_body(decode_edited(&msg, |b| b[at] = 0x80), kind, "UTF-8");
        bad_body(decode_edited(&msg, |b| b[at + n - 1] = 0xc3), kind, "UTF-8");
        bad_body(
            decode_edited(&msg, |b| set_addr(b, &LONG_ADDR.as_bytes()[..27], 27)),
            kind,
            "UTF-8",
        );
        // Empty.
        bad_body(
            decode_edited(&msg, |b| set_addr(b, &[], 0)),
            kind,
            "empty address",
        );
        // Encoding refuses the same.
        encode_invalid(&with_addr(msg, &long));
        encode_invalid(&with_addr(msg, ""));
        let f = frame_of(&Header::new(1, 0), &with_addr(msg, LONG_ADDR));
        assert_eq!(decode(&f).unwrap().1, with_addr(msg, LONG_ADDR));
    }
    // The cluster status may have no address when no server serves.
    let none = Msg::ClusterStatusReply {
        server_incarnation: 0,
        server_node: 0,
        failed_deaths: 0,
        server_addr: "",
        nodes: NodeStatusList::empty(),
    };
    let f = frame_of(&Header::new(1, 0), &none);
    assert_eq!(f.len(), HEADER_BYTES + 16 + 4);
    assert_eq!(decode(&f).unwrap().1, none);
}

#[test]
fn list_bodies_must_match_their_counts() {
    // (kind, offset of a list count in the small sample body)
    let ns = "/run/csnap/server.sock".len();
    let cases = [
        (Kind::Members, 8),
        (Kind::Clients, 16),
        (Kind::StartServer, 8 + 16),
        (Kind::ClusterStatusReply, 16 + ns),
        (Kind::Revoke, 4),
        (Kind::ReleaseLocks, 0),
    ];
    for (kind, at) in cases {
        let mut s = Scratch::new();
        let msg = sample(kind, false, &mut s);
        for delta in [1u8, 0xff] {
            bad_body(
                decode_edited(&msg, |b| b[at] = b[at].wrapping_add(delta)),
                kind,
                "length",
            );
        }
        // A count over the maximum.
        bad_body(decode_edited(&msg, |b| b[at + 1] = 0x80), kind, "maximum");
    }
    // StartServer: the node count decides where the client list starts.
    let mut s = Scratch::new();
    let msg = sample(Kind::StartServer, false, &mut s);
    for count in [0u8, 1, 2, 4, 5, 0xff] {
        assert!(
            decode_edited(&msg, |b| b[8] = count).is_err(),
            "node count {count}"
        );
    }
    bad_body(
        decode_edited(&msg, |b| b.truncate(5)),
        Kind::StartServer,
        "length",
    );
    bad_body(
        decode_edited(&msg, |b| b.truncate(8 + 3)),
        Kind::StartServer,
        "list",
    );
    bad_body(
        decode_edited(&msg, |b| b.truncate(8 + 16)),
        Kind::StartServer,
        "list",
    );
    bad_body(
        decode_edited(&msg, |b| b.truncate(8 + 18)),
        Kind::StartServer,
        "list",
    );
    // The flags byte: bit 0 is `claim`, any other bit is refused.
    for f in [2u8, 3, 0x80] {
        bad_body(
            decode_edited(&msg, |b| b[0] = f),
            Kind::StartServer,
            "start flags",
        );
    }
    assert!(decode_edited(&msg, |b| b[0] = 1).is_ok());
    let mut s = Scratch::new();
    let here = sample(Kind::StartHere, false, &mut s);
    bad_body(
        decode_edited(&here, |b| b[16] = 2),
        Kind::StartHere,
        "start flags",
    );
    bad_body(
        decode_edited(&here, |b| b[23] = 1),
        Kind::StartHere,
        "reserved",
    );
    // Fixed parts shorter than their minimum.
    for (kind, fixed) in [
        (Kind::Members, 8),
        (Kind::Clients, 16),
        (Kind::ClusterStatusReply, 16),
        (Kind::ServerAddress, 16),
        (Kind::ServerReady, 12),
        (Kind::Join, 8),
        (Kind::ServerUp, 16),
    ] {
        let mut s = Scratch::new();
        let msg = sample(kind, false, &mut s);
        for n in 0..fixed {
            assert!(
                matches!(
                    decode_edited(&msg, |b| b.truncate(n)),
                    Err(DecodeError::BadBody { .. })
                ),
                "{kind} cut to {n}"
            );
        }
    }
}

#[test]
fn new_lists_are_bounded() {
    let mut nb = [0u8; NODE_LIST_BYTES_MAX + 64];
    let mut b = NodeListBuilder::new(&mut nb).unwrap();
    for i in 1..=u32::try_from(NODES_MAX).unwrap() {
        b.push(Node { id: i }).unwrap();
    }
    assert_eq!(b.remaining(), 0);
    assert_eq!(
        b.push(Node { id: 1 }),
        Err(EncodeError::ListFull { max: NODES_MAX })
    );
    assert_eq!(b.finish().as_bytes().len(), NODE_LIST_BYTES_MAX);

    let mut cb = vec![0u8; CLIENT_LIST_BYTES_MAX + 64];
    let mut b = ClientListBuilder::new(&mut cb).unwrap();
    for i in 1..=CLIENT_ENTRIES_MAX as u64 {
        b.push(ClientEntry {
            client_id: i,
            node_id: 1,
        })
        .unwrap();
    }
    assert_eq!(
        b.push(ClientEntry {
            client_id: 1,
            node_id: 1
        }),
        Err(EncodeError::ListFull {
            max: CLIENT_ENTRIES_MAX
        })
    );
    let l = b.finish();
    assert_eq!(l.as_bytes().len(), CLIENT_LIST_BYTES_MAX);
    assert_eq!(
        l.get(CLIENT_ENTRIES_MAX - 1).map(|c| c.client_id),
        Some(1024)
    );
    assert_eq!(ClientList::parse(l.as_bytes()), Ok(l));

    let mut sb = [0u8; NODE_STATUS_LIST_BYTES_MAX + 64];
    let mut b = NodeStatusListBuilder::new(&mut sb).unwrap();
    for i in 1..=u32::try_from(NODES_MAX).unwrap() {
        b.push(NodeStatus {
            node: i,
            flags: 0,
            serving_incarnation: 0,
        })
        .unwrap();
    }
    assert!(b
        .push(NodeStatus {
            node: 1,
            flags: 0,
            serving_incarnation: 0
        })
        .is_err());
    assert_eq!(b.finish().as_bytes().len(), NODE_STATUS_LIST_BYTES_MAX);

    // A count over the maximum with a matching length is still rejected.
    let n = NODES_MAX + 1;
    let mut body = Vec::new();
    body.extend_from_slice(&7u64.to_le_bytes()); // epoch
    body.extend_from_slice(&u16::try_from(n).unwrap().to_le_bytes());
    body.extend_from_slice(&[0, 0]);
    for i in 1..=u32::try_from(n).unwrap() {
        body.extend_from_slice(&i.to_le_bytes());
    }
    let mut s = Scratch::new();
    let msg = sample(Kind::Members, false, &mut s);
    bad_body(
        decode_edited(&msg, |b| *b = body.clone()),
        Kind::Members,
        "maximum",
    );
    assert!(NodeList::parse(&[1, 0, 0, 0, 0, 0, 0, 0]).is_err());
    assert_eq!(NodeList::parse(&[0, 0, 0, 0]), Ok(NodeList::empty()));
    assert_eq!(
        NodeList::parse(&[1, 0, 0, 0, 9, 0, 0, 0]).map(|l| l.get(0)),
        Ok(Some(Node { id: 9 }))
    );
}
