//! The client state machine against scripted server frames: handshake,
//! request matching, re-send after a disconnect, lock upload after a
//! reconnect, and refusal of replies from an older incarnation.

use csnap_fsm::client::{ClientConfig, ClientEvent, ClientFsm, ClientState, Request};
use csnap_proto::{self as proto, ErrorCode, Header, Kind, Msg, Range, Role, TargetKind, Volume};

fn cfg(role: Role) -> ClientConfig {
    ClientConfig {
        client_id: 7,
        node_id: 2,
        role,
        volume: Volume::Snapshot(3),
        origin_uuid: [4; 16],
        caching: false,
    }
}

fn frame(rid: u64, inc: u64, msg: &Msg<'_>) -> Vec<u8> {
    let mut b = vec![0u8; proto::FRAME_MAX_BYTES];
    let n = proto::encode(&Header::new(rid, inc), msg, &mut b).unwrap();
    b.truncate(n);
    b
}

/// Decodes every frame the client wants to send, and consumes them.
fn sent(c: &mut ClientFsm) -> Vec<(u64, Kind)> {
    let bytes = c.transmit().to_vec();
    c.consume_transmit(bytes.len());
    let mut v = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (h, m) = proto::decode(
            &bytes[at..at + proto::peek_header(&bytes[at..]).unwrap().unwrap().length as usize],
        )
        .unwrap();
        v.push((h.request_id, m.kind()));
        at += h.length as usize;
    }
    v
}

fn handshake(c: &mut ClientFsm, inc: u64) {
    c.handle_connect();
    assert_eq!(
        sent(c).iter().map(|x| x.1).collect::<Vec<_>>(),
        vec![Kind::Hello]
    );
    assert_eq!(
        c.handle_frame(&frame(
            0,
            inc,
            &Msg::HelloOk {
                version: 1,
                server_id: 1
            }
        )),
        ClientEvent::None
    );
    assert_eq!(
        sent(c).iter().map(|x| x.1).collect::<Vec<_>>(),
        vec![Kind::Identify]
    );
    let ok = Msg::IdentifyOk {
        chunk_size_bytes: 4096,
        origin_size_bytes: 1 << 20,
        volume_size_bytes: 1 << 20,
    };
    assert_eq!(c.handle_frame(&frame(0, inc, &ok)), ClientEvent::None);
    // A snapshot client always finishes a (here empty) lock upload.
    assert_eq!(
        sent(c).iter().map(|x| x.1).collect::<Vec<_>>(),
        vec![Kind::FinishUpload]
    );
    assert_eq!(
        c.handle_frame(&frame(0, inc, &Msg::UploadOk)),
        ClientEvent::Ready
    );
}

#[test]
fn requests_are_matched_and_resent_after_a_reconnect_with_locks_uploaded() {
    let mut c = ClientFsm::new(cfg(Role::Client));
    handshake(&mut c, 5);
    assert_eq!(c.state(), ClientState::Ready);
    assert_eq!(
        (c.chunk_size_bytes(), c.origin_size_bytes()),
        (4096, 1 << 20)
    );
    let r = Range {
        chunk: 8,
        chunks: 2,
    };
    let id = c.request(Request::SnapshotRead(r)).unwrap();
    assert_eq!(sent(&mut c), vec![(id, Kind::QuerySnapshotRead)]);
    // The reply grants origin targets: the client records the locks.
    let mut tb = [0u8; 64];
    let t = proto::Targets::from_entries(
        &[proto::Target {
            chunk: 8,
            chunks: 2,
            kind: TargetKind::Origin,
            store_chunk: 0,
        }],
        &mut tb,
    )
    .unwrap();
    assert_eq!(
        c.handle_frame(&frame(id, 5, &Msg::SnapshotReadReply(t))),
        ClientEvent::Reply { id }
    );
    assert!(c.note_locked(r));
    assert_eq!(c.held_chunks(), 2);
    // A reply nobody asked for is flagged, not taken.
    assert_eq!(
        c.handle_frame(&frame(999, 5, &Msg::Ok)),
        ClientEvent::Unexpected
    );

    // Two requests in flight when the connection breaks.
    let a = c
        .request(Request::SnapshotWrite(Range {
            chunk: 1,
            chunks: 1,
        }))
        .unwrap();
    let b = c.request(Request::Status).unwrap();
    assert_eq!(sent(&mut c).len(), 2);
    c.handle_disconnect();
    assert_eq!(c.state(), ClientState::Disconnected);
    assert_eq!(c.outstanding(), 2);

    // Reconnect to a new incarnation: identify, upload the held locks, then
    // re-send both requests.
    c.handle_connect();
    sent(&mut c);
    c.handle_frame(&frame(
        0,
        6,
        &Msg::HelloOk {
            version: 1,
            server_id: 1,
        },
    ));
    sent(&mut c);
    let ok = Msg::IdentifyOk {
        chunk_size_bytes: 4096,
        origin_size_bytes: 1 << 20,
        volume_size_bytes: 1 << 20,
    };
    assert_eq!(c.handle_frame(&frame(0, 6, &ok)), ClientEvent::None);
    assert_eq!(c.state(), ClientState::Uploading);
    let kinds: Vec<Kind> = sent(&mut c).iter().map(|x| x.1).collect();
    assert_eq!(kinds, vec![Kind::UploadLocks, Kind::FinishUpload]);
    assert_eq!(
        c.handle_frame(&frame(0, 6, &Msg::UploadOk)),
        ClientEvent::Ready
    );
    let mut resent = sent(&mut c);
    resent.sort_unstable_by_key(|x| x.0);
    assert_eq!(
        resent,
        vec![(a, Kind::QuerySnapshotWrite), (b, Kind::Status)]
    );
    assert_eq!(c.incarnation(), 6);

    // A reply stamped with the old incarnation is refused.
    assert_eq!(c.handle_frame(&frame(b, 5, &Msg::Ok)), ClientEvent::Stale);
    assert_eq!(c.outstanding(), 2);

    // Releasing the locks sends FinishSnapshotRead and forgets them.
    c.release(r);
    assert_eq!(
        sent(&mut c).iter().map(|x| x.1).collect::<Vec<_>>(),
        vec![Kind::FinishSnapshotRead]
    );
    assert!(c.held_chunks() == 0);
}

#[test]
fn a_refused_handshake_is_reported() {
    let mut c = ClientFsm::new(cfg(Role::Client));
    c.handle_connect();
    sent(&mut c);
    c.handle_frame(&frame(
        0,
        1,
        &Msg::HelloOk {
            version: 1,
            server_id: 1,
        },
    ));
    let e = Msg::Error {
        code: ErrorCode::NoSuchSnapshot,
        culprit: Kind::Identify.code(),
        text: "no such snapshot",
    };
    assert_eq!(
        c.handle_frame(&frame(0, 1, &e)),
        ClientEvent::Refused(ErrorCode::NoSuchSnapshot)
    );
    assert_eq!(c.state(), ClientState::Failed(ErrorCode::NoSuchSnapshot));
}

#[test]
fn control_role_is_ready_after_hello() {
    let mut c = ClientFsm::new(cfg(Role::Control));
    c.handle_connect();
    sent(&mut c);
    assert_eq!(
        c.handle_frame(&frame(
            0,
            1,
            &Msg::HelloOk {
                version: 1,
                server_id: 1
            }
        )),
        ClientEvent::Ready
    );
    let id = c.request(Request::Create(4)).unwrap();
    assert_eq!(sent(&mut c), vec![(id, Kind::CreateSnapshot)]);
}
