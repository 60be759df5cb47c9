//! The real server loop on a unix socket and TCP, with real files as disks,
//! driven by the blocking clients.

use std::path::{Path, PathBuf};

use csnap_fsm::client::Request;
use csnap_fsm::server::ServerConfig;
use csnap_io::client::{control, VolumeClient};
use csnap_io::net::Addr;
use csnap_io::server::ServerLoop;
use csnap_io::store_worker::StoreWorker;
use csnap_proto::{Msg, Volume};
use csnap_store::disk::FileDisk;
use csnap_store::{FormatOptions, OpenOptions, Store};

const CHUNK: u32 = 16384;
const ORIGIN_BYTES: u64 = 8 << 20;

fn tmpdir(name: &str) -> PathBuf {
    csnap_testkit::fresh_dir("e2e", name)
}

fn start(dir: &Path, listen: Vec<Addr>) -> Vec<Addr> {
    let origin = dir.join("origin");
    let store = dir.join("store");
    let f = std::fs::File::create(&origin).unwrap();
    f.set_len(ORIGIN_BYTES).unwrap();
    let f = std::fs::File::create(&store).unwrap();
    f.set_len(32 << 20).unwrap();
    let mut o = FormatOptions::new(ORIGIN_BYTES);
    o.chunk_size_bytes = CHUNK;
    o.origin_uuid = [3; 16];
    let mut sd = FileDisk::open(&store).unwrap();
    csnap_store::format(&mut sd, &o).unwrap();
    let mut st = Store::open(sd, &OpenOptions::default()).unwrap();
    let inc = st.bump_incarnation().unwrap();
    st.commit().unwrap();
    let label = *st.label();
    let od = FileDisk::open(&origin).unwrap();
    let worker = StoreWorker::new(st, od, 256);
    let cfg = ServerConfig {
        clients: 8,
        requests_per_client: 4,
        read_locks: 1024,
        incarnation: inc,
        server_id: 1,
        chunk_size_bytes: label.chunk_size_bytes,
        origin_size_bytes: label.origin_size_bytes,
        origin_uuid: label.origin_uuid,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = ServerLoop::new(cfg, &listen, worker).unwrap();
        tx.send(l.local_addrs()).unwrap();
        let _ = l.run();
    });
    rx.recv().unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = csnap_testkit::XorShift64::new(seed | 1);
    (0..len).map(|_| x.next_u64().to_le_bytes()[0]).collect()
}

#[test]
fn origin_and_snapshot_volumes_over_unix_and_tcp() {
    let dir = tmpdir("basic");
    let addrs = start(
        &dir,
        vec![
            Addr::Unix(dir.join("sock")),
            Addr::Tcp("127.0.0.1:0".parse().unwrap()),
        ],
    );
    let (unix, tcp) = (&addrs[0], &addrs[1]);
    let (origin, store) = (dir.join("origin"), dir.join("store"));
    let mut o = VolumeClient::open(unix, &origin, &store, Volume::Origin, 1, 1).unwrap();
    let before = pattern(1, 100_000);
    o.write_at(&before, 12_345).unwrap();

    let mut ctl = control(tcp).unwrap();
    assert!(matches!(ctl.call(Request::Create(5)).unwrap(), Msg::Ok));

    // Overwrite part of the region after the snapshot, unaligned.
    let after = pattern(2, 50_000);
    o.write_at(&after, 40_000).unwrap();
    let mut got = vec![0u8; 100_000];
    o.read_at(&mut got, 12_345).unwrap();
    let mut expect = before.clone();
    expect[40_000 - 12_345..90_000 - 12_345].copy_from_slice(&after);
    assert_eq!(got, expect, "origin reads back its writes");

    let mut s = VolumeClient::open(tcp, &origin, &store, Volume::Snapshot(5), 2, 1).unwrap();
    let mut snap = vec![0u8; 100_000];
    s.read_at(&mut snap, 12_345).unwrap();
    assert_eq!(snap, before, "the snapshot keeps the old data");

    // Snapshot writes are private to the snapshot.
    let sw = pattern(3, 20_000);
    s.write_at(&sw, 15_000).unwrap();
    s.read_at(&mut snap, 12_345).unwrap();
    let mut sexp = before.clone();
    sexp[15_000 - 12_345..35_000 - 12_345].copy_from_slice(&sw);
    assert_eq!(snap, sexp);
    o.read_at(&mut got, 12_345).unwrap();
    assert_eq!(got, expect, "snapshot writes do not touch the origin");

    match ctl.call(Request::List(0)).unwrap() {
        Msg::SnapshotList(l) => {
            let v: Vec<_> = l.iter().collect();
            assert_eq!(v.len(), 1);
            assert_eq!(v[0].tag, 5);
            assert!(v[0].in_use());
        }
        m => panic!("{m:?}"),
    }
    match ctl.call(Request::Status).unwrap() {
        Msg::StatusReply {
            clients,
            snapshots,
            incarnation,
            ..
        } => {
            assert_eq!((clients, snapshots, incarnation), (2, 1, 1));
        }
        m => panic!("{m:?}"),
    }
    // Errors are clear and the connection goes on.
    match ctl.call(Request::Delete(99)) {
        Err(csnap_io::client::ClientError::Server { code, text }) => {
            assert_eq!(code, csnap_proto::ErrorCode::NoSuchSnapshot);
            assert!(text.contains("no such snapshot"), "{text}");
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(ctl.call(Request::Create(6)).unwrap(), Msg::Ok));
    let _ = std::fs::remove_dir_all(&dir);
}
