//! The server FSM driven deterministically in one process, with the store
//! worker run inline on in-memory disks: sessions, routing, read locks,
//! waiting writes, disconnects and bad input, without sockets or threads.

use csnap_fsm::server::{ConnId, Server, ServerConfig, SessionState};
use csnap_fsm::store_ops::StoreRequest;
use csnap_io::store_worker::StoreWorker;
use csnap_proto::{self as proto, ErrorCode, Header, Msg, Range, Role, TargetKind, Volume};
use csnap_store::disk::MemDisk;
use csnap_store::{FormatOptions, OpenOptions, Store};

const CHUNK: u32 = 4096;
const ORIGIN_CHUNKS: u64 = 64;
const UUID: [u8; 16] = [5; 16];

struct Sim {
    server: Server,
    worker: StoreWorker<MemDisk, MemDisk>,
    /// Frames received per connection, decoded lazily.
    inbox: Vec<Vec<Vec<u8>>>,
    closed: Vec<ConnId>,
}

fn sim(clients: usize) -> Sim {
    let mut o = FormatOptions::new(ORIGIN_CHUNKS * u64::from(CHUNK));
    o.chunk_size_bytes = CHUNK;
    o.journal_blocks = 128;
    o.origin_uuid = UUID;
    let mut d = MemDisk::new(4 << 20);
    csnap_store::format(&mut d, &o).unwrap();
    let store = Store::open(
        d,
        &OpenOptions {
            cache_blocks: csnap_pools::CACHE_MIN_BLOCKS,
        },
    )
    .unwrap();
    let origin = MemDisk::new(usize::try_from(ORIGIN_CHUNKS * u64::from(CHUNK)).unwrap());
    let cfg = ServerConfig {
        clients,
        requests_per_client: 4,
        read_locks: 64,
        incarnation: 1,
        server_id: 77,
        chunk_size_bytes: CHUNK,
        origin_size_bytes: ORIGIN_CHUNKS * u64::from(CHUNK),
        origin_uuid: UUID,
    };
    Sim {
        server: Server::new(cfg),
        worker: StoreWorker::new(store, origin, 64),
        inbox: vec![Vec::new(); clients],
        closed: Vec::new(),
    }
}

impl Sim {
    /// Runs the store worker over everything queued, then collects output.
    fn step(&mut self) {
        let mut batch: Vec<StoreRequest> = Vec::new();
        while let Some(r) = self.server.poll_store_request() {
            batch.push(r);
        }
        if !batch.is_empty() {
            let mut replies = Vec::new();
            self.worker.run_batch(&batch, &mut |r| replies.push(r));
            self.worker.write_home(&mut |r| replies.push(r));
            for r in &replies {
                self.server.handle_store_reply(r);
            }
        }
        self.collect();
        self.server.assert_invariants_full();
    }

    fn collect(&mut self) {
        while let Some(c) = self.server.poll_output() {
            let bytes = self.server.output(c).to_vec();
            self.server.consume_output(c, bytes.len());
            let mut at = 0;
            while at < bytes.len() {
                let h = proto::peek_header(&bytes[at..]).unwrap().unwrap();
                let n = h.length as usize;
                self.inbox[c as usize].push(bytes[at..at + n].to_vec());
                at += n;
            }
        }
        while let Some(c) = self.server.poll_close() {
            self.closed.push(c);
        }
    }

    fn send(&mut self, c: ConnId, rid: u64, msg: &Msg<'_>) {
        let mut buf = vec![0u8; proto::FRAME_MAX_BYTES];
        let n = proto::encode(&Header::new(rid, 0), msg, &mut buf).unwrap();
        assert!(self.server.wants_read(c), "server not reading conn {c}");
        self.server.handle_frame(c, &buf[..n]);
        self.collect();
    }

    /// [`Sim::send`], a step, and what `c` got ([`Sim::take`]).
    fn call(&mut self, c: ConnId, rid: u64, msg: &Msg<'_>) -> Vec<(Header, Vec<u8>)> {
        self.send(c, rid, msg);
        self.step();
        self.take(c)
    }

    /// Takes every frame received on `c`.
    fn take(&mut self, c: ConnId) -> Vec<(Header, Vec<u8>)> {
        self.inbox[c as usize]
            .drain(..)
            .map(|f| (proto::decode(&f).unwrap().0, f))
            .collect()
    }

    fn connect(&mut self, role: Role) -> ConnId {
        let c = self.server.handle_accept().unwrap();
        self.send(
            c,
            1,
            &Msg::Hello {
                version_min: 1,
                version_max: 1,
                role,
            },
        );
        let r = self.take(c);
        assert!(matches!(
            proto::decode(&r[0].1).unwrap().1,
            Msg::HelloOk {
                version: 1,
                server_id: 77
            }
        ));
        assert_eq!(r[0].0.incarnation, 1, "every reply carries the incarnation");
        c
    }

    fn attach(&mut self, volume: Volume) -> ConnId {
        self.attach_as(volume, 9)
    }

    /// Attaches as client `client_id` (node 1).
    fn attach_as(&mut self, volume: Volume, client_id: u64) -> ConnId {
        let c = self.connect(Role::Client);
        let mut m = identify(volume);
        if let Msg::Identify { client_id: id, .. } = &mut m {
            *id = client_id;
        }
        self.send(c, 2, &m);
        self.step();
        let r = self.take(c);
        assert!(
            matches!(proto::decode(&r[0].1).unwrap().1, Msg::IdentifyOk { .. }),
            "{:?}",
            proto::decode(&r[0].1)
        );
        c
    }

    fn control(&mut self, c: ConnId, rid: u64, msg: &Msg<'_>) -> Vec<u8> {
        self.send(c, rid, msg);
        self.step();
        let mut r = self.take(c);
        assert_eq!(r.len(), 1);
        r.remove(0).1
    }
}

fn identify(volume: Volume) -> Msg<'static> {
    Msg::Identify {
        client_id: 9,
        node_id: 1,
        volume,
        origin_uuid: UUID,
        volume_size_bytes: 0,
        chunk_size_bytes: 0,
        flags: 0,
    }
}

fn ranges(buf: &mut [u8], chunk: u64, chunks: u32) -> proto::Ranges<'_> {
    proto::Ranges::from_entries(&[Range { chunk, chunks }], buf).unwrap()
}

fn expect_error(frame: &[u8], code: ErrorCode) {
    match proto::decode(frame).unwrap().1 {
        Msg::Error { code: c, text, .. } => {
            assert_eq!(c, code, "error text: {text}");
            assert!(!text.is_empty());
        }
        m => panic!("expected error {code:?}, got {m:?}"),
    }
}

/// The one frame of `r`, decoded.
fn only(r: &[(Header, Vec<u8>)]) -> Msg<'_> {
    assert_eq!(r.len(), 1, "one frame expected");
    proto::decode(&r[0].1).unwrap().1
}

#[test]
fn origin_write_read_lock_race_and_second_write() {
    let mut s = sim(4);
    let ctl = s.connect(Role::Control);
    let ok = s.control(ctl, 3, &Msg::CreateSnapshot { tag: 7 });
    assert!(matches!(proto::decode(&ok).unwrap().1, Msg::Ok));
    let origin = s.attach(Volume::Origin);
    let snap = s.attach(Volume::Snapshot(7));

    // A snapshot read of chunk 5: still on the origin, so read-locked.
    let mut b = [0u8; 64];
    let r = s.call(snap, 10, &Msg::QuerySnapshotRead(ranges(&mut b, 5, 1)));
    match proto::decode(&r[0].1).unwrap().1 {
        Msg::SnapshotReadReply(t) => {
            let t = t.get(0).unwrap();
            assert_eq!((t.chunk, t.chunks, t.kind), (5, 1, TargetKind::Origin));
        }
        m => panic!("{m:?}"),
    }
    assert_eq!(s.server.read_locks(), 1);

    // An origin write to chunk 5 arrives while the read is in flight: its
    // copy-out commits, but the reply waits for the release.
    assert!(
        s.call(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 5, 1)))
            .is_empty(),
        "the write must wait for the reader"
    );
    assert_eq!(s.server.waiting_writes(), 1);
    // A second write to the same chunk (already unique now) waits too.
    assert!(
        s.call(origin, 21, &Msg::QueryOriginWrite(ranges(&mut b, 5, 1)))
            .is_empty(),
        "the second write must wait too (ddsnap b54143d)"
    );
    assert_eq!(s.server.waiting_writes(), 2);
    // A write to another chunk is not held up.
    let r = s.call(origin, 22, &Msg::QueryOriginWrite(ranges(&mut b, 6, 1)));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0.request_id, 22);

    // A new snapshot read of chunk 5 now goes to the store (the copy-out is
    // recorded). It locks the chunk too (a store chunk shared with another
    // snapshot may otherwise be overwritten in place under it), and, like
    // every blocking read, releases it as soon as it has read.
    let r = s.call(snap, 11, &Msg::QuerySnapshotRead(ranges(&mut b, 5, 1)));
    match proto::decode(&r[0].1).unwrap().1 {
        Msg::SnapshotReadReply(t) => assert_eq!(t.get(0).unwrap().kind, TargetKind::Store),
        m => panic!("{m:?}"),
    }
    assert_eq!(s.server.read_locks(), 1);

    // The first release leaves the second read's hold: still waiting.
    s.send(snap, 12, &Msg::FinishSnapshotRead(ranges(&mut b, 5, 1)));
    s.step();
    assert!(s.take(origin).is_empty());
    // The second release grants both waiting writes.
    s.send(snap, 14, &Msg::FinishSnapshotRead(ranges(&mut b, 5, 1)));
    s.step();
    let mut ids: Vec<u64> = s.take(origin).iter().map(|(h, _)| h.request_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![20, 21]);
    assert_eq!(s.server.read_locks(), 0);
    assert_eq!(s.server.waiting_writes(), 0);
    // Releasing a lock not held is a clear error, and the connection goes on.
    s.send(snap, 13, &Msg::FinishSnapshotRead(ranges(&mut b, 5, 1)));
    let r = s.take(snap);
    expect_error(&r[0].1, ErrorCode::BadFrame);
    assert_eq!(s.server.session_state(snap), SessionState::Snapshot(7));
}

#[test]
fn disconnect_releases_locks_and_drops_waiting_writes() {
    let mut s = sim(4);
    let ctl = s.connect(Role::Control);
    s.control(ctl, 3, &Msg::CreateSnapshot { tag: 1 });
    let origin = s.attach(Volume::Origin);
    let snap = s.attach(Volume::Snapshot(1));
    let mut b = [0u8; 64];
    s.call(snap, 10, &Msg::QuerySnapshotRead(ranges(&mut b, 0, 4)));
    assert_eq!(s.server.read_locks(), 4);
    assert!(s
        .call(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 2, 1)))
        .is_empty());
    // The reader dies holding its locks: the write proceeds.
    s.server.handle_disconnect(snap);
    s.step();
    let r = s.take(origin);
    assert!(matches!(only(&r), Msg::OriginWriteOk(_)));
    assert_eq!(s.server.read_locks(), 0);

    // A writer dies while waiting: its wait is dropped and the lock table is
    // clean once the reader releases.
    let snap2 = s.attach(Volume::Snapshot(1));
    s.call(snap2, 30, &Msg::QuerySnapshotRead(ranges(&mut b, 9, 1)));
    s.send(origin, 40, &Msg::QueryOriginWrite(ranges(&mut b, 9, 1)));
    s.step();
    assert_eq!(s.server.waiting_writes(), 1);
    s.server.handle_disconnect(origin);
    s.step();
    assert_eq!(s.server.waiting_writes(), 0);
    s.send(snap2, 31, &Msg::FinishSnapshotRead(ranges(&mut b, 9, 1)));
    s.step();
    assert_eq!(s.server.read_locks(), 0);
    // The snapshot is in use while attached, so it cannot be deleted.
    let r = s.control(ctl, 50, &Msg::DeleteSnapshot { tag: 1 });
    expect_error(&r, ErrorCode::Busy);
    s.server.handle_disconnect(snap2);
    s.step();
    let r = s.control(ctl, 51, &Msg::DeleteSnapshot { tag: 1 });
    assert!(matches!(proto::decode(&r).unwrap().1, Msg::Ok));
}

#[test]
fn bad_input_gets_clear_errors_and_others_go_on() {
    let mut s = sim(3);
    let good = s.attach(Volume::Origin);
    // A request before Hello.
    let c = s.server.handle_accept().unwrap();
    s.send(c, 1, &Msg::Status);
    expect_error(&s.take(c)[0].1, ErrorCode::NotIdentified);
    // A data request before Identify.
    s.send(
        c,
        2,
        &Msg::Hello {
            version_min: 1,
            version_max: 1,
            role: Role::Client,
        },
    );
    s.take(c);
    let mut b = [0u8; 64];
    s.send(c, 3, &Msg::QueryOriginWrite(ranges(&mut b, 0, 1)));
    expect_error(&s.take(c)[0].1, ErrorCode::NotIdentified);
    // Unknown snapshot, wrong geometry, wrong origin.
    s.send(c, 4, &identify(Volume::Snapshot(99)));
    s.step();
    expect_error(&s.take(c)[0].1, ErrorCode::NoSuchSnapshot);
    let mut id = identify(Volume::Origin);
    if let Msg::Identify {
        chunk_size_bytes, ..
    } = &mut id
    {
        *chunk_size_bytes = 8192;
    }
    s.send(c, 5, &id);
    expect_error(&s.take(c)[0].1, ErrorCode::GeometryMismatch);
    if let Msg::Identify {
        chunk_size_bytes,
        origin_uuid,
        ..
    } = &mut id
    {
        *chunk_size_bytes = 0;
        *origin_uuid = [1; 16];
    }
    s.send(c, 6, &id);
    expect_error(&s.take(c)[0].1, ErrorCode::GeometryMismatch);
    // A reply kind from a client.
    s.send(c, 7, &Msg::Ok);
    expect_error(&s.take(c)[0].1, ErrorCode::BadFrame);
    // Out of range.
    s.send(c, 8, &identify(Volume::Origin));
    s.take(c);
    s.send(
        c,
        9,
        &Msg::QueryOriginWrite(ranges(&mut b, ORIGIN_CHUNKS, 1)),
    );
    expect_error(&s.take(c)[0].1, ErrorCode::OutOfRange);
    // Garbage bytes: error and close.
    let g = s.server.handle_accept().unwrap();
    s.server.handle_bad_stream(g, &proto::DecodeError::BadMagic);
    s.collect();
    expect_error(&s.take(g)[0].1, ErrorCode::BadMagic);
    assert!(s.closed.contains(&g));
    // Wrong version in Hello.
    s.server.handle_disconnect(g);
    let v = s.server.handle_accept().unwrap();
    s.send(
        v,
        1,
        &Msg::Hello {
            version_min: 2,
            version_max: 3,
            role: Role::Client,
        },
    );
    expect_error(&s.take(v)[0].1, ErrorCode::BadVersion);
    assert!(s.closed.contains(&v));
    // The client table is full: a further accept is refused with a frame.
    assert!(s.server.handle_accept().is_none());
    let mut f = [0u8; 512];
    let n = s.server.too_many_clients_frame(&mut f);
    expect_error(&f[..n], ErrorCode::TooManyClients);
    // The well-behaved client saw nothing of it.
    let r = s.call(good, 100, &Msg::QueryOriginWrite(ranges(&mut b, 1, 1)));
    assert!(matches!(only(&r), Msg::OriginWriteOk(_)));
}

#[test]
fn in_flight_requests_are_bounded_per_client() {
    let mut s = sim(2);
    let c = s.attach(Volume::Origin);
    let mut b = [0u8; 64];
    for i in 0..4 {
        s.send(c, 10 + i, &Msg::QueryOriginWrite(ranges(&mut b, i, 1)));
    }
    assert!(
        !s.server.wants_read(c),
        "the server stops reading at the in-flight limit"
    );
    s.step();
    assert_eq!(s.take(c).len(), 4);
    assert!(s.server.wants_read(c));
}

/// The window ddsnap left open: a snapshot read holds a read lock from
/// incarnation N on an origin chunk; N dies; an origin write for that chunk
/// reaches N+1. The write is not granted until the reader has reconnected,
/// uploaded its lock and released it (or its node left).
#[test]
fn recovery_barrier_holds_origin_writes_until_locks_are_uploaded_and_released() {
    let mut s = sim(4);
    let ctl = s.connect(Role::Control);
    s.control(ctl, 3, &Msg::CreateSnapshot { tag: 7 });
    // Incarnation N+1 starts: client 9 on node 1 was a snapshot client of N.
    s.server.handle_node_joined(1);
    s.server.begin_recovery(&[(9, 1)]);
    assert_eq!(s.server.state(), csnap_proto::ServerState::Recovering);
    // A writer that was not a client of the former incarnation.
    let origin = s.attach_as(Volume::Origin, 99);
    let mut b = [0u8; 64];
    // The origin write's copy-out may proceed, but no grant.
    assert!(
        s.call(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 5, 1)))
            .is_empty(),
        "no origin write during recovery"
    );
    assert_eq!(s.server.barrier_writes(), 1);
    // The reader reconnects (same client id 9), identifies and uploads the
    // lock it held under N.
    let snap = s.attach(Volume::Snapshot(7));
    s.send(snap, 30, &Msg::UploadLocks(ranges(&mut b, 5, 1)));
    assert!(s.take(origin).is_empty());
    let r = s.call(snap, 31, &Msg::FinishUpload);
    assert!(matches!(proto::decode(&r[0].1).unwrap().1, Msg::UploadOk));
    assert_eq!(s.server.state(), csnap_proto::ServerState::Serving);
    // The barrier lifted, but chunk 5 is locked by the uploaded read.
    assert!(
        s.take(origin).is_empty(),
        "the write must wait for the uploaded lock"
    );
    assert_eq!(s.server.waiting_writes(), 1);
    s.send(snap, 32, &Msg::FinishSnapshotRead(ranges(&mut b, 5, 1)));
    s.step();
    let r = s.take(origin);
    assert!(matches!(only(&r), Msg::OriginWriteOk(_)));
}

#[test]
fn recovery_barrier_stops_waiting_for_a_node_that_leaves() {
    let mut s = sim(4);
    s.server.handle_node_joined(1);
    s.server.handle_node_joined(2);
    s.server.begin_recovery(&[(9, 1), (10, 2)]);
    let origin = s.attach(Volume::Origin);
    let mut b = [0u8; 64];
    assert!(s
        .call(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 1, 1)))
        .is_empty());
    s.server.handle_node_left(1);
    s.collect();
    assert!(
        s.take(origin).is_empty(),
        "node 2's client is still awaited"
    );
    s.server.handle_node_left(2);
    s.collect();
    let r = s.take(origin);
    assert_eq!(
        r.len(),
        1,
        "every awaited client left: the write is granted"
    );
    assert_eq!(s.server.state(), csnap_proto::ServerState::Serving);
}

#[test]
fn disconnect_keeps_locks_while_the_node_is_a_member_and_releases_when_it_leaves() {
    let mut s = sim(4);
    let ctl = s.connect(Role::Control);
    s.control(ctl, 3, &Msg::CreateSnapshot { tag: 7 });
    s.server.handle_node_joined(1);
    let origin = s.attach(Volume::Origin);
    let snap = s.attach(Volume::Snapshot(7));
    let mut b = [0u8; 64];
    s.call(snap, 10, &Msg::QuerySnapshotRead(ranges(&mut b, 3, 2)));
    // The client's connection drops, but node 1 is still a member: its locks
    // stay, and a write to chunk 3 waits.
    s.server.handle_disconnect(snap);
    s.step();
    assert_eq!(s.server.parked_clients(), 1);
    assert_eq!(s.server.read_locks(), 2);
    assert!(
        s.call(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 3, 1)))
            .is_empty(),
        "a client that may come back keeps its locks"
    );
    // It comes back (same client id): what was kept for it stays until it
    // has uploaded what it still holds; its upload replaces it.
    let back = s.attach(Volume::Snapshot(7));
    assert_eq!(s.server.parked_clients(), 1, "kept until the upload is in");
    let mut b2 = [0u8; 64];
    let held = proto::Ranges::from_entries(
        &[
            Range {
                chunk: 3,
                chunks: 1,
            },
            Range {
                chunk: 4,
                chunks: 1,
            },
        ],
        &mut b2,
    )
    .unwrap();
    s.send(back, 0, &Msg::UploadLocks(held));
    s.send(back, 0, &Msg::FinishUpload);
    s.step();
    assert!(matches!(
        proto::decode(&s.take(back)[0].1).unwrap().1,
        Msg::UploadOk
    ));
    assert_eq!(s.server.parked_clients(), 0);
    assert_eq!(s.server.read_locks(), 2, "the upload's locks, once each");
    assert!(
        s.take(origin).is_empty(),
        "the write still waits for chunk 3"
    );
    s.send(back, 11, &Msg::FinishSnapshotRead(ranges(&mut b, 3, 1)));
    s.step();
    let r = s.take(origin);
    assert_eq!(r.len(), 1, "released by the returning client");
    // It drops again; this time its node leaves: the last lock goes.
    s.server.handle_disconnect(back);
    s.step();
    assert!(s
        .call(origin, 21, &Msg::QueryOriginWrite(ranges(&mut b, 4, 1)))
        .is_empty());
    s.server.handle_node_left(1);
    s.collect();
    let r = s.take(origin);
    assert_eq!(r.len(), 1, "node left: its locks are released");
    assert_eq!(s.server.read_locks(), 0);
    assert_eq!(s.server.parked_clients(), 0);
}

#[test]
fn an_attached_client_that_sends_garbage_is_closed_and_the_server_goes_on() {
    // Found with the failover tests: closing an attached (identified)
    // session left the identified-client count one too high, and the
    // invariant check then stopped the server.
    let mut s = sim(3);
    let ctl = s.connect(Role::Control);
    s.control(ctl, 3, &Msg::CreateSnapshot { tag: 7 });
    let origin = s.attach(Volume::Origin);
    let snap = s.attach(Volume::Snapshot(7));
    let mut b = [0u8; 64];
    s.call(snap, 10, &Msg::QuerySnapshotRead(ranges(&mut b, 3, 1)));
    assert!(
        s.call(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 3, 1)))
            .is_empty(),
        "the read lock holds the write"
    );
    s.server
        .handle_bad_stream(snap, &proto::DecodeError::BadMagic);
    s.collect();
    expect_error(&s.take(snap)[0].1, ErrorCode::BadMagic);
    assert!(s.closed.contains(&snap));
    s.server.handle_disconnect(snap);
    s.step();
    let r = s.take(origin);
    assert_eq!(r.len(), 1, "its lock went with it");
    assert!(matches!(
        proto::decode(&r[0].1).unwrap().1,
        Msg::OriginWriteOk(_)
    ));
}

#[test]
fn a_node_that_leaves_takes_the_locks_of_its_connected_clients_and_their_connections() {
    // Found with the failover tests (`csnap cluster leave` of a snapshot
    // reader's node): only parked locks were released, so a write waiting
    // for a connected client of the fenced node waited for ever.
    let mut s = sim(4);
    let ctl = s.connect(Role::Control);
    s.control(ctl, 3, &Msg::CreateSnapshot { tag: 7 });
    s.server.handle_node_joined(1);
    s.server.handle_node_joined(2);
    let origin = s.attach(Volume::Origin);
    let snap = s.attach(Volume::Snapshot(7));
    let mut b = [0u8; 64];
    s.call(snap, 10, &Msg::QuerySnapshotRead(ranges(&mut b, 3, 2)));
    assert!(s
        .call(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 4, 1)))
        .is_empty());
    // Another node leaving changes nothing.
    s.server.handle_node_left(2);
    s.collect();
    assert!(s.take(origin).is_empty());
    assert_eq!(s.server.read_locks(), 2);
    // The reader's node (identify says node 1) leaves: its locks go, its
    // connection is closed, the write is granted.
    s.server.handle_node_left(1);
    s.collect();
    assert_eq!(s.server.read_locks(), 0);
    assert!(s.closed.contains(&snap));
    let r = s.take(origin);
    assert_eq!(
        r.len(),
        1,
        "the lock of a client of the node that left went"
    );
    assert!(matches!(
        proto::decode(&r[0].1).unwrap().1,
        Msg::OriginWriteOk(_)
    ));
    s.server.handle_disconnect(snap);
    s.step();
    assert_eq!(s.server.parked_clients(), 0, "nothing parked for it");
}

/// A start may list up to `START_LIST_MAX` clients whatever the server's
/// `--clients`: the barrier waits for every one (an early version kept
/// only `2 × clients` of them and opened the barrier while the rest were
/// still away).
#[test]
fn recovery_barrier_waits_for_every_listed_client_even_beyond_the_session_count() {
    let mut s = sim(4);
    s.server.handle_node_joined(1);
    let listed: Vec<(u64, u32)> = (0..csnap_pools::START_LIST_MAX as u64)
        .map(|i| (1000 + i, 1))
        .collect();
    s.server.begin_recovery(&listed);
    let origin = s.attach_as(Volume::Origin, 99);
    let mut b = [0u8; 64];
    s.send(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 1, 1)));
    s.step();
    let (last, firsts) = listed.split_last().unwrap();
    for &(c, n) in firsts {
        s.server.handle_client_gone(c, n);
    }
    s.collect();
    assert!(
        s.take(origin).is_empty(),
        "the last listed client is still awaited"
    );
    assert_eq!(s.server.state(), csnap_proto::ServerState::Recovering);
    s.server.handle_client_gone(last.0, last.1);
    s.collect();
    assert_eq!(
        s.take(origin).len(),
        1,
        "every listed client is gone: granted"
    );
    assert_eq!(s.server.state(), csnap_proto::ServerState::Serving);
}

/// A connection the server closes (a fatal frame) whose peer hangs up
/// before the driver polls the close, and whose slot a new connection takes
/// at once: the pending close is the old connection's, never the new one's.
#[test]
fn a_close_queued_for_a_gone_connection_does_not_close_its_successor() {
    let mut s = sim(2);
    let a = s.server.handle_accept().unwrap();
    s.server.handle_frame(
        a,
        b"this is not a csnap frame at all, and it is long enough",
    );
    // The peer hangs up before the driver ran: the slot is free again.
    s.server.handle_disconnect(a);
    let b = s.server.handle_accept().unwrap();
    assert_eq!(a, b, "the slot is reused");
    assert_eq!(
        s.server.poll_output(),
        None,
        "nothing to write to the new one"
    );
    assert_eq!(
        s.server.poll_close(),
        None,
        "the new connection is not closed"
    );
    // It works: it says hello and is answered.
    s.send(
        b,
        1,
        &Msg::Hello {
            version_min: 1,
            version_max: 1,
            role: Role::Control,
        },
    );
    assert!(!s.take(b).is_empty());
    assert!(s.closed.is_empty(), "closed: {:?}", s.closed);
}

/// A corrupt metadata block (here the data bitmap: re-sealed with a count
/// in its header) fails the origin write that needs it with `Corrupt`; the
/// server FSM stays up, holds no lock or waiting write for it, and serves
/// the snapshot reads and the status that do not need the block.
#[test]
fn a_corrupt_block_fails_the_request_that_needs_it_and_the_server_goes_on() {
    use csnap_store::disk::Disk;
    use csnap_store::layout;
    let mut s = sim(4);
    let ctl = s.connect(Role::Control);
    let ok = s.control(ctl, 3, &Msg::CreateSnapshot { tag: 7 });
    assert!(matches!(proto::decode(&ok).unwrap().1, Msg::Ok));
    {
        let store = s.worker.store().unwrap();
        let at = store.label().data_bitmap_start * 4096;
        let d = store.disk_mut();
        let mut b = vec![0u8; 4096];
        d.read_at(&mut b, at).unwrap();
        layout::set_count(&mut b, 7);
        let seq = layout::seq(&b);
        layout::seal(&mut b, seq);
        d.write_at(&b, at).unwrap();
    }
    let origin = s.attach(Volume::Origin);
    let snap = s.attach(Volume::Snapshot(7));
    let mut b = [0u8; 64];
    for rid in [20, 21] {
        // Chunk 5 needs a copy-out for snapshot 7: a data chunk from the
        // corrupt bitmap.
        let r = s.call(origin, rid, &Msg::QueryOriginWrite(ranges(&mut b, 5, 1)));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0.request_id, rid);
        expect_error(&r[0].1, ErrorCode::Corrupt);
    }
    assert_eq!(s.server.waiting_writes(), 0);
    assert!(!s.worker.failed());
    // Reads need only the tree: served.
    let r = s.call(snap, 30, &Msg::QuerySnapshotRead(ranges(&mut b, 5, 1)));
    match proto::decode(&r[0].1).unwrap().1 {
        Msg::SnapshotReadReply(t) => assert_eq!(t.get(0).unwrap().kind, TargetKind::Origin),
        m => panic!("{m:?}"),
    }
    s.send(snap, 31, &Msg::FinishSnapshotRead(ranges(&mut b, 5, 1)));
    s.step();
    assert_eq!(s.server.read_locks(), 0);
    let st = s.control(ctl, 4, &Msg::Status);
    assert!(
        matches!(proto::decode(&st).unwrap().1, Msg::StatusReply { .. }),
        "{:?}",
        proto::decode(&st)
    );
    // The problem was reported once, as an event for the server's log.
    let mut events = Vec::new();
    while let Some(e) = s.server.poll_event() {
        events.push(e);
    }
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(
            events[0],
            csnap_fsm::server::ServerEvent::Corrupt {
                kind: "bitmap block",
                ..
            }
        ),
        "{events:?}"
    );
}

/// A snapshot create waits for a caching origin client's revoke answer;
/// its control connection closes meanwhile and the slot is reused by a new
/// session. When the answer comes, nothing is created and the new session
/// gets no `Ok` it never asked for (found by cluster_sim's connection cuts:
/// the `Ok` went to whatever session reused the id).
#[test]
fn a_create_whose_control_connection_closed_answers_no_successor() {
    let mut s = sim(4);
    // A caching origin client: a create waits for its revoke answer.
    let o = s.connect(Role::Client);
    let mut m = identify(Volume::Origin);
    if let Msg::Identify { flags, .. } = &mut m {
        *flags = proto::IDENTIFY_CACHING;
    }
    s.call(o, 2, &m);
    let ctl = s.connect(Role::Control);
    s.send(ctl, 5, &Msg::CreateSnapshot { tag: 3 });
    s.step();
    let revoke_id = |s: &mut Sim| {
        s.take(o)
            .iter()
            .find(|(_, f)| matches!(proto::decode(f).unwrap().1, Msg::Revoke { .. }))
            .map(|(h, _)| h.request_id)
            .expect("the caching client is asked to give its grants back")
    };
    let rid = revoke_id(&mut s);
    assert!(s.take(ctl).is_empty(), "the create waits for the answer");
    // The admin goes away; a new session takes the slot.
    s.server.handle_disconnect(ctl);
    let next = s.connect(Role::Control);
    assert_eq!(next, ctl, "the slot is reused");
    // The revoke answer arrives.
    s.send(o, rid, &Msg::RevokeDone);
    s.step();
    assert!(
        s.take(next).is_empty(),
        "the new session got an answer to a create it never asked for"
    );
    // Nothing was created: the tag is free.
    s.send(next, 6, &Msg::CreateSnapshot { tag: 3 });
    s.step();
    let rid = revoke_id(&mut s);
    s.send(o, rid, &Msg::RevokeDone);
    s.step();
    let r = s.take(next);
    assert_eq!(r.len(), 1);
    assert!(matches!(proto::decode(&r[0].1).unwrap().1, Msg::Ok));
    s.server.assert_invariants_full();
}

/// A client list for `ClientsOf`.
fn client_list<'a>(buf: &'a mut [u8], entries: &[(u64, u32)]) -> proto::ClientList<'a> {
    let e: Vec<proto::ClientEntry> = entries
        .iter()
        .map(|&(client_id, node_id)| proto::ClientEntry { client_id, node_id })
        .collect();
    proto::ClientList::from_entries(&e, buf).unwrap()
}

/// A restarted agent's complete list (`ClientsOf`): a client of that node
/// the barrier waits for, or whose locks are parked, and that the list
/// leaves out died while no agent ran there; it is gone. Listed clients
/// and other nodes' clients are still waited for.
#[test]
fn a_nodes_complete_client_list_settles_the_clients_that_died_unseen() {
    let mut s = sim(4);
    let ctl = s.connect(Role::Control);
    s.control(ctl, 3, &Msg::CreateSnapshot { tag: 7 });
    s.server.handle_node_joined(1);
    s.server.handle_node_joined(2);
    s.server.begin_recovery(&[(20, 1), (21, 1), (22, 2)]);
    let origin = s.attach_as(Volume::Origin, 99);
    let mut b = [0u8; 64];
    assert!(s
        .call(origin, 20, &Msg::QueryOriginWrite(ranges(&mut b, 5, 1)))
        .is_empty());
    // Node 1's agent lists 21 (and, ignored, an entry of node 2): 20 is gone.
    let mut lb = [0u8; 256];
    s.server
        .handle_clients_of(1, client_list(&mut lb, &[(21, 1), (22, 1)]));
    s.collect();
    assert!(s.take(origin).is_empty(), "21 and 22 are still awaited");
    assert_eq!(s.server.state(), csnap_proto::ServerState::Recovering);
    // Node 2's list leaves 22 out; node 1's again leaves 21 out.
    s.server.handle_clients_of(2, client_list(&mut lb, &[]));
    s.collect();
    assert!(s.take(origin).is_empty(), "21 is still awaited");
    s.server
        .handle_clients_of(1, client_list(&mut lb, &[(30, 1)]));
    s.collect();
    assert_eq!(s.server.state(), csnap_proto::ServerState::Serving);
    assert!(matches!(only(&s.take(origin)), Msg::OriginWriteOk(_)));
    // A snapshot client of node 1 reads chunk 3 and its connection drops:
    // its lock is parked (node 1 is a member), and a write to 3 waits.
    let snap = s.attach_as(Volume::Snapshot(7), 40);
    s.call(snap, 10, &Msg::QuerySnapshotRead(ranges(&mut b, 3, 1)));
    s.server.handle_disconnect(snap);
    s.step();
    assert_eq!(s.server.parked_clients(), 1);
    assert!(s
        .call(origin, 21, &Msg::QueryOriginWrite(ranges(&mut b, 3, 1)))
        .is_empty());
    // Listed, it may come back: kept.
    s.server
        .handle_clients_of(1, client_list(&mut lb, &[(40, 1)]));
    s.collect();
    assert_eq!(s.server.parked_clients(), 1);
    assert!(s.take(origin).is_empty());
    // Left out: gone, its lock released, the write granted.
    s.server.handle_clients_of(1, client_list(&mut lb, &[]));
    s.collect();
    assert_eq!(s.server.parked_clients(), 0);
    assert_eq!(s.take(origin).len(), 1);
}

/// The write-ahead grant (ARCHITECTURE 6): a caching origin client's write
/// is answered with its range and, after it, the chunks within
/// `ORIGIN_WRITE_AHEAD_CHUNKS` that need no copy-out and that no reader
/// holds a read lock on. A chunk copied out while a reader still reads the
/// origin under its lock is not granted ahead; one that still needs a
/// copy-out is not either; a blocking client gets its range alone.
#[test]
fn a_caching_writer_is_granted_ahead_only_chunks_needing_no_copy_out_and_no_lock() {
    let mut s = sim(4);
    let ctl = s.connect(Role::Control);
    let ok = s.control(ctl, 3, &Msg::CreateSnapshot { tag: 7 });
    assert!(matches!(proto::decode(&ok).unwrap().1, Msg::Ok));
    let blocking = s.attach_as(Volume::Origin, 30);
    let snap = s.attach_as(Volume::Snapshot(7), 31);
    let caching = {
        let c = s.connect(Role::Client);
        let mut m = identify(Volume::Origin);
        if let Msg::Identify {
            client_id, flags, ..
        } = &mut m
        {
            *client_id = 32;
            *flags = proto::IDENTIFY_CACHING;
        }
        s.send(c, 2, &m);
        s.step();
        assert!(matches!(only(&s.take(c)), Msg::IdentifyOk { .. }));
        c
    };
    let mut b = [0u8; 64];
    // Chunks 11, 12 and 14 copied out (by the blocking writer, which gets
    // exactly its range back).
    for c in [11, 12, 14] {
        let r = s.call(
            blocking,
            40 + c,
            &Msg::QueryOriginWrite(ranges(&mut b, c, 1)),
        );
        let Msg::OriginWriteOk(l) = only(&r) else {
            panic!("granted");
        };
        let got: Vec<(u64, u32)> = l.iter().map(|r| (r.chunk, r.chunks)).collect();
        assert_eq!(got, vec![(c, 1)], "a blocking client gets its range alone");
    }
    // A reader of chunk 13 on the origin holds its lock; a copy-out of 13
    // then waits for it (13 is unique in the store, and locked).
    let r = s.call(snap, 60, &Msg::QuerySnapshotRead(ranges(&mut b, 13, 1)));
    assert!(matches!(only(&r), Msg::SnapshotReadReply(_)));
    assert!(s
        .call(blocking, 61, &Msg::QueryOriginWrite(ranges(&mut b, 13, 1)))
        .is_empty());
    // The caching writer's write to chunk 10: 11 and 12 granted ahead, not
    // 13 (locked), 14 granted, nothing past it (never written: a copy-out).
    let r = s.call(caching, 70, &Msg::QueryOriginWrite(ranges(&mut b, 10, 1)));
    let Msg::OriginWriteOk(l) = only(&r) else {
        panic!("granted");
    };
    let got: Vec<(u64, u32)> = l.iter().map(|r| (r.chunk, r.chunks)).collect();
    assert_eq!(got, vec![(10, 1), (11, 2), (14, 1)]);
    // The reader finishes: the waiting write goes, and a new write by the
    // caching client is granted 13 ahead now.
    s.send(snap, 62, &Msg::FinishSnapshotRead(ranges(&mut b, 13, 1)));
    s.step();
    assert_eq!(s.take(blocking).len(), 1);
    let r = s.call(caching, 71, &Msg::QueryOriginWrite(ranges(&mut b, 10, 1)));
    let Msg::OriginWriteOk(l) = only(&r) else {
        panic!("granted");
    };
    let got: Vec<(u64, u32)> = l.iter().map(|r| (r.chunk, r.chunks)).collect();
    assert_eq!(got, vec![(10, 1), (11, 4)]);
}
