//! Fencing a former server that may still run (ARCHITECTURE 5.5): the
//! serving lease and the takeover claim, on one store file opened with
//! direct I/O by two "hosts" (two descriptors, no shared page cache).

// The shared test support (tests/common) converts small test sizes with
// `as`, as every suite using it allows.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::time::Duration;

use csnap_store::disk::{Disk, FileDisk};
use csnap_store::{OpenOptions, Standby, Store, StoreError};

const BS: u64 = 4096;
const LEASE: Duration = Duration::from_millis(csnap_pools::SERVER_LEASE_MS);
const WAIT: Duration = Duration::from_millis(csnap_pools::SERVER_TAKEOVER_WAIT_MS);

/// A serving store on `path`: started, incarnation taken and committed.
fn serving(path: &Path, lease: bool) -> Store<FileDisk> {
    let mut s = Store::open(FileDisk::open(path).unwrap(), &OpenOptions::default()).unwrap();
    if lease {
        s.set_lease(LEASE);
    }
    s.bump_incarnation().unwrap();
    s.commit().unwrap();
    s
}

fn standby(path: &Path) -> Standby<FileDisk> {
    Standby::reserve(FileDisk::open(path).unwrap(), &OpenOptions::default()).unwrap()
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut d = FileDisk::open(path).unwrap();
    let mut buf = csnap_store::disk::io_buf(len);
    d.read_at(&mut buf, off).unwrap();
    buf.to_vec()
}

/// A server A whose fence read came before B's claim writes nothing after
/// its lease ran out: its next copy-out write reads the fence first and is
/// refused as fenced, and the store's data is untouched. Without a lease
/// (the control) the same write lands in the store B now owns.
#[test]
fn a_claim_stops_a_leased_former_server_before_its_next_write() {
    let dir = common::scratch_dir("takeover", "lease");
    for lease in [true, false] {
        let path = common::direct_store(&dir);
        let mut a = serving(&path, lease);
        let ours = a.incarnation();
        // B claims the store (and waits out A's lease).
        let mut b = standby(&path);
        let claimed = b.claim(WAIT).unwrap();
        assert_eq!(claimed, ours + 2, "the claim is two above home");
        // A, paused meanwhile, wakes up and writes a copy-out to chunk 3.
        let off = a.chunk_offset(3);
        let before = read_at(&path, off, 4096);
        let data = vec![0xa5u8; 4096];
        let r = a.write_data(&data, off);
        let after = read_at(&path, off, 4096);
        if lease {
            match r {
                Err(StoreError::Fenced { ours: o, found }) => {
                    assert_eq!((o, found), (ours, claimed));
                }
                other => panic!("a former server wrote past its lease: {other:?}"),
            }
            assert_eq!(after, before, "nothing reached the store");
            // Its commits are refused too.
            a.create_snapshot(1, 0).unwrap();
            assert!(matches!(a.commit(), Err(StoreError::Fenced { .. })));
        } else {
            assert!(r.is_ok(), "control: without a lease the write goes: {r:?}");
            assert_eq!(after, data, "control: the write landed");
        }
        // B starts and serves above the claim.
        let mut sb = b.start().unwrap();
        sb.bump_incarnation().unwrap();
        sb.commit().unwrap();
        assert_eq!(sb.incarnation(), claimed + 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server within its lease writes without reading the fence again (the
/// lease is what keeps a busy server fast); one past it reads the fence
/// once and renews.
#[test]
fn within_its_lease_a_server_writes_and_past_it_renews() {
    let dir = common::scratch_dir("takeover", "renew");
    let path = common::direct_store(&dir);
    let mut a = serving(&path, true);
    let off = a.chunk_offset(1);
    a.write_data(&vec![1u8; 4096], off).unwrap();
    std::thread::sleep(LEASE + Duration::from_millis(10));
    // Nobody claimed: the renewing fence read passes.
    a.write_data(&vec![2u8; 4096], off).unwrap();
    assert_eq!(read_at(&path, off, 4096), vec![2u8; 4096]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The claim survives the start's replay: a journal whose last commit is
/// not yet at home (a crash between the journal write and the home
/// writes) makes the replay redo the superblock, and the superblock it
/// redoes keeps the claimed incarnation, so the former server stays
/// fenced. (Without that, the redone superblock would carry the former
/// incarnation again and the former server's fence read would pass.)
#[test]
fn the_start_replay_keeps_the_claim() {
    let dir = common::scratch_dir("takeover", "replay");
    let path = common::direct_store(&dir);
    let mut a = serving(&path, true);
    let ours = a.incarnation();
    // A's home superblock before its next commit, put back after it: the
    // commit is in the journal only, as after a crash before its home
    // writes.
    let old_home = read_at(&path, BS, 4096);
    a.create_snapshot(7, 0).unwrap();
    a.commit().unwrap();
    {
        let mut d = FileDisk::open(&path).unwrap();
        let mut buf = csnap_store::disk::io_buf(4096);
        buf.copy_from_slice(&old_home);
        d.write_at(&buf, BS).unwrap();
        d.flush().unwrap();
    }
    let mut b = standby(&path);
    let claimed = b.claim(WAIT).unwrap();
    assert!(claimed > ours);
    let sb = b.start().unwrap();
    assert!(sb.replay_report().commits >= 1, "the commit was replayed");
    assert!(
        sb.incarnation() >= claimed,
        "the replayed superblock dropped the claim: {} < {claimed}",
        sb.incarnation()
    );
    assert!(sb.snapshots().any(|s| s.tag == 7), "A's commit survived");
    // A, waking up, is fenced at its next fence read.
    std::thread::sleep(LEASE);
    assert!(matches!(a.check_fence(), Err(StoreError::Fenced { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A claim that keeps being overwritten during its wait (a former server
/// still writing its superblock home) is retried, then refused with
/// `ClaimContested`: the start reads nothing and serves nothing.
#[test]
fn a_contested_claim_is_refused() {
    let dir = common::scratch_dir("takeover", "contest");
    let path = common::direct_store(&dir);
    let a = serving(&path, true);
    let home = read_at(&path, BS, 4096);
    drop(a);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut d = FileDisk::open(&path).unwrap();
            let mut buf = csnap_store::disk::io_buf(4096);
            buf.copy_from_slice(&home);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                d.write_at(&buf, BS).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut b = standby(&path);
    let r = b.claim(WAIT);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    match r {
        Err(StoreError::ClaimContested { claimed, found }) => assert!(found < claimed),
        other => panic!("a contested claim was taken: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Counts reads of the home superblock (fence reads) through to a disk.
struct Counting<'a> {
    disk: FileDisk,
    super_reads: &'a std::cell::Cell<u32>,
}

impl Disk for Counting<'_> {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), csnap_store::disk::DiskError> {
        if offset == BS {
            self.super_reads.set(self.super_reads.get() + 1);
        }
        self.disk.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), csnap_store::disk::DiskError> {
        self.disk.write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<(), csnap_store::disk::DiskError> {
        self.disk.flush()
    }
    fn size_bytes(&self) -> u64 {
        self.disk.size_bytes()
    }
}

/// Under a lease, commits within it skip the fence read (a busy server's
/// first writes pay no superblock read each); without one, every commit
/// reads the fence.
#[test]
fn commits_within_the_lease_skip_the_fence_read() {
    let dir = common::scratch_dir("takeover", "skip");
    for lease in [true, false] {
        let path = common::direct_store(&dir);
        let reads = std::cell::Cell::new(0u32);
        let disk = Counting {
            disk: FileDisk::open(&path).unwrap(),
            super_reads: &reads,
        };
        let mut s = Store::open(disk, &OpenOptions::default()).unwrap();
        if lease {
            s.set_lease(Duration::from_secs(60));
        }
        s.bump_incarnation().unwrap();
        s.commit().unwrap();
        let before = reads.get();
        for tag in 1..=5 {
            s.create_snapshot(tag, 0).unwrap();
            s.commit().unwrap();
        }
        let fence_reads = reads.get() - before;
        if lease {
            assert_eq!(fence_reads, 0, "commits within the lease read the fence");
        } else {
            assert_eq!(fence_reads, 5, "one fence read per commit without a lease");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
