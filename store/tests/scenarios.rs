//! Deterministic scenarios in the spirit of ddsnap's cbtb microtests: every
//! volume is compared with its model after every step.

// Test code indexes host-sized buffers with u64 chunk numbers of small test
// stores; truncation cannot happen on the 64-bit hosts the tests run on.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use csnap_pools::SNAPSHOTS_MAX;
use csnap_store::{StoreError, StoreFullPolicy};

const ORIGIN_CHUNKS: u64 = 16;

fn setup(
    data_chunks: u64,
    policy: StoreFullPolicy,
) -> (
    Harness<csnap_store::disk::MemDisk, csnap_store::disk::MemDisk>,
    Model,
) {
    let d = format_store(ORIGIN_CHUNKS, data_chunks, policy);
    let h = Harness::new(open(d), make_origin(ORIGIN_CHUNKS));
    (h, Model::new(ORIGIN_CHUNKS))
}

fn snap(
    h: &mut Harness<csnap_store::disk::MemDisk, csnap_store::disk::MemDisk>,
    m: &mut Model,
    tag: u32,
) {
    h.store.create_snapshot(tag, u64::from(tag)).unwrap();
    h.store.commit().unwrap();
    m.snaps.insert(tag, m.origin.clone());
}

#[test]
fn origin_writes_copy_out_once_for_all_snapshots() {
    let (mut h, mut m) = setup(256, StoreFullPolicy::Refuse);
    for t in 0..5 {
        snap(&mut h, &mut m, t);
    }
    let before = h.store.status().data_free;
    h.origin_write(3, 42);
    m.origin[3] = 42;
    // One copy-out shared by all five snapshots.
    assert_eq!(before - h.store.status().data_free, 1);
    for s in h.store.snapshots() {
        assert_eq!((s.chunks, s.unique_chunks), (1, 0), "snapshot {}", s.tag);
    }
    // A rewrite needs no copy-out.
    h.origin_write(3, 43);
    m.origin[3] = 43;
    assert_eq!(before - h.store.status().data_free, 1);
    verify(&mut h, &m, "after origin writes");
    assert_clean(h.store.client_disk(), "after origin writes");
}

#[test]
fn interleaved_origin_and_snapshot_writes_on_one_chunk() {
    let (mut h, mut m) = setup(256, StoreFullPolicy::Refuse);
    snap(&mut h, &mut m, 1);
    snap(&mut h, &mut m, 2);
    // Snapshot write before any origin write: copies from the origin.
    h.snapshot_write(1, 5, 100);
    m.snaps.get_mut(&1).unwrap()[5] = 100;
    verify(&mut h, &m, "snapshot 1 wrote chunk 5");
    // Origin write: only snapshot 2 still needs the old data.
    h.origin_write(5, 200);
    m.origin[5] = 200;
    verify(&mut h, &m, "origin wrote chunk 5");
    // Snapshot 2 writes the chunk it shares with nobody now.
    h.snapshot_write(2, 5, 300);
    m.snaps.get_mut(&2).unwrap()[5] = 300;
    // A later snapshot, then the origin again.
    snap(&mut h, &mut m, 3);
    h.origin_write(5, 400);
    m.origin[5] = 400;
    // Shared copy split by a snapshot write.
    snap(&mut h, &mut m, 4);
    h.origin_write(6, 500);
    m.origin[6] = 500;
    h.snapshot_write(3, 6, 600);
    m.snaps.get_mut(&3).unwrap()[6] = 600;
    verify(&mut h, &m, "after the sequence");
    assert_clean(h.store.client_disk(), "after the sequence");
}

#[test]
fn delete_old_new_and_all_snapshots() {
    let (mut h, mut m) = setup(512, StoreFullPolicy::Refuse);
    for t in 0..4 {
        snap(&mut h, &mut m, t);
        for c in 0..ORIGIN_CHUNKS {
            h.origin_write(c, u64::from(t) * 100 + c);
            m.origin[c as usize] = u64::from(t) * 100 + c;
        }
        h.snapshot_write(t, t.into(), 9000 + u64::from(t));
        m.snaps.get_mut(&t).unwrap()[t as usize] = 9000 + u64::from(t);
    }
    verify(&mut h, &m, "setup");
    for (step, tag) in [0u32, 3, 1, 2].into_iter().enumerate() {
        h.store.delete_snapshot(tag).unwrap();
        m.snaps.remove(&tag);
        h.store.reclaim().unwrap();
        verify(&mut h, &m, &format!("delete step {step}"));
        assert_clean(h.store.client_disk(), &format!("delete step {step}"));
    }
    let s = h.store.status();
    assert_eq!(
        s.data_free, s.data_chunks,
        "every chunk freed after deleting all"
    );
    assert_eq!(s.snapshots, 0);
    assert!(matches!(
        h.store.delete_snapshot(7),
        Err(StoreError::NoSuchSnapshot(7))
    ));
}

#[test]
fn consistent_across_reopen() {
    let (mut h, mut m) = setup(256, StoreFullPolicy::Refuse);
    snap(&mut h, &mut m, 10);
    h.origin_write(1, 11);
    m.origin[1] = 11;
    h.snapshot_write(10, 2, 12);
    m.snaps.get_mut(&10).unwrap()[2] = 12;
    let origin = std::mem::replace(&mut h.origin, csnap_store::disk::MemDisk::new(0));
    let disk = h.store.into_disk();
    let mut h = Harness::new(open(disk), origin);
    verify(&mut h, &m, "after reopen");
}

#[test]
fn duplicate_and_too_many_snapshots_are_refused() {
    let (mut h, mut m) = setup(256, StoreFullPolicy::Refuse);
    snap(&mut h, &mut m, 1);
    assert_eq!(
        h.store.create_snapshot(1, 0),
        Err(StoreError::SnapshotExists(1))
    );
    let max = SNAPSHOTS_MAX as u32;
    for t in 2..=max {
        h.store.create_snapshot(t, 0).unwrap();
    }
    assert_eq!(
        h.store.create_snapshot(max + 1, 0),
        Err(StoreError::TooManySnapshots)
    );
    // A snapshot with no exceptions frees its slot at once on delete.
    h.store.delete_snapshot(max).unwrap();
    h.store.create_snapshot(max + 1, 0).unwrap();
    h.store.commit().unwrap();
    assert_eq!(h.store.status().snapshots, max);
}

/// One copy-out serves snapshots of several 64-slot windows: one store
/// chunk, a record per window. A snapshot alone in its window's record
/// still shares the copy with the other windows, so its write copies
/// instead of writing in place; the chunk is freed only when its last
/// record goes, and usage counts follow the copy, not the records. Past 64
/// snapshots only (the `snapshots-1024` build, which CI runs for the
/// store's tests); at 64 there is one window.
#[test]
fn one_copy_out_serves_snapshots_of_several_windows() {
    if SNAPSHOTS_MAX <= 64 {
        return;
    }
    let n = 200u32;
    let (mut h, mut m) = setup(1024, StoreFullPolicy::Refuse);
    for t in 0..n {
        snap(&mut h, &mut m, t);
    }
    let free0 = h.store.status().data_free;
    h.origin_write(5, 777);
    m.origin[5] = 777;
    assert_eq!(free0 - h.store.status().data_free, 1, "one copy, 4 windows");
    verify(&mut h, &m, "shared copy-out");
    assert_clean(h.store.client_disk(), "shared copy-out");
    for s in h.store.snapshots() {
        assert_eq!((s.chunks, s.unique_chunks), (1, 0), "snapshot {}", s.tag);
    }
    // Every snapshot but 10 (window 0) and 150 (window 2) goes.
    for t in (0..n).filter(|&t| t != 10 && t != 150) {
        h.store.delete_snapshot(t).unwrap();
        m.snaps.remove(&t);
    }
    h.store.reclaim().unwrap();
    assert_eq!(
        free0 - h.store.status().data_free,
        1,
        "the copy is still used"
    );
    verify(&mut h, &m, "two windows left");
    assert_clean(h.store.client_disk(), "two windows left");
    // Snapshot 10 is alone in its window's record, not in the copy.
    h.snapshot_write(10, 5, 4242);
    m.snaps.get_mut(&10).unwrap()[5] = 4242;
    assert_eq!(free0 - h.store.status().data_free, 2, "its own copy");
    verify(&mut h, &m, "snapshot 10 wrote");
    assert_clean(h.store.client_disk(), "snapshot 10 wrote");
    let s150 = h.store.snapshot(150).unwrap();
    assert_eq!((s150.chunks, s150.unique_chunks), (1, 1));
    // Deleting 150 frees the copy.
    h.store.delete_snapshot(150).unwrap();
    m.snaps.remove(&150);
    h.store.reclaim().unwrap();
    assert_eq!(free0 - h.store.status().data_free, 1);
    verify(&mut h, &m, "150 deleted");
    assert_clean(h.store.client_disk(), "150 deleted");
}

/// The whole snapshot table (`SNAPSHOTS_MAX`, whatever it is): snapshots
/// created with origin and snapshot writes between them, one chunk
/// written before every creation (so it holds the largest chunk group a
/// leaf must keep: one record per snapshot), then every snapshot deleted
/// in a scrambled order, and the freed slots used again. Every volume is
/// compared with the model and `check` must be clean at each stage; at
/// the end every data chunk is free again.
#[test]
fn full_snapshot_table_written_between_and_deleted() {
    full_table(None);
}

/// The same with leaves of 4 records and index nodes of 8 entries: the hot
/// chunk's group (one record per snapshot) spans many leaves, as every
/// large group will at 1024 snapshots, and is read, grown, split off and
/// deleted across them.
#[test]
fn full_snapshot_table_with_groups_spanning_leaves() {
    // Past 64 snapshots the hot chunk's group spans 168-record leaves by
    // itself (the test above), and the small fan-out would need a larger
    // metadata area than the test store has.
    if SNAPSHOTS_MAX == 64 {
        full_table(Some((4, 8)));
    }
}

fn full_table(fanout: Option<(usize, usize)>) {
    const HOT: u64 = 3;
    let max = SNAPSHOTS_MAX as u32;
    let (mut h, mut m) = setup(8 * u64::from(max) + 64, StoreFullPolicy::Refuse);
    if let Some((leaf, node)) = fanout {
        h.store.set_tree_fanout(leaf, node);
    }
    let mut v = 1_000u64;
    for t in 0..max {
        snap(&mut h, &mut m, t);
        v += 1;
        // The hot chunk: one new record per snapshot.
        h.origin_write(HOT, v);
        m.origin[HOT as usize] = v;
        // Another origin chunk, and a snapshot write that splits a copy
        // shared with older snapshots (or copies from the origin).
        let c = (u64::from(t) * 7 + 1) % ORIGIN_CHUNKS;
        h.origin_write(c, v + 1);
        m.origin[c as usize] = v + 1;
        if t % 3 == 0 {
            let sc = (u64::from(t) * 5 + 2) % ORIGIN_CHUNKS;
            h.snapshot_write(t, sc, v + 2);
            m.snaps.get_mut(&t).unwrap()[sc as usize] = v + 2;
        }
        v += 2;
        if t % 16 == 15 {
            verify(&mut h, &m, &format!("after snapshot {t}"));
        }
    }
    assert_eq!(h.store.status().snapshots, max);
    assert_eq!(
        h.store.create_snapshot(max, 0),
        Err(StoreError::TooManySnapshots)
    );
    verify(&mut h, &m, "full table");
    assert_clean(h.store.client_disk(), "full table");
    // Every snapshot holds its own copy of the hot chunk.
    for s in h.store.snapshots() {
        assert!(s.unique_chunks >= 1, "snapshot {}: {s:?}", s.tag);
    }
    // Delete in a scrambled order (a stride coprime with the count),
    // writing the origin between deletes.
    let stride = (1..max).rev().find(|s| gcd(*s, max) == 1).unwrap_or(1);
    for k in 0..max {
        let tag = (k * stride + 5) % max;
        h.store.delete_snapshot(tag).unwrap();
        m.snaps.remove(&tag);
        h.store.reclaim().unwrap();
        v += 1;
        h.origin_write(HOT, v);
        m.origin[HOT as usize] = v;
        if k % 16 == 15 {
            verify(&mut h, &m, &format!("after {} deletes", k + 1));
            assert_clean(h.store.client_disk(), &format!("after {} deletes", k + 1));
        }
    }
    let s = h.store.status();
    assert_eq!((s.snapshots, s.deleting), (0, 0));
    assert_eq!(s.data_free, s.data_chunks, "every chunk freed");
    // The freed slots serve again.
    for t in 0..4 {
        snap(&mut h, &mut m, max + t);
        v += 1;
        h.origin_write(HOT, v);
        m.origin[HOT as usize] = v;
    }
    verify(&mut h, &m, "slots used again");
    assert_clean(h.store.client_disk(), "slots used again");
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[test]
fn store_full_refuse_fails_the_write_visibly_and_loses_nothing() {
    let (mut h, mut m) = setup(4, StoreFullPolicy::Refuse);
    snap(&mut h, &mut m, 1);
    for c in 0..4 {
        assert_eq!(h.origin_write(c, 50 + c), Outcome::Done);
        m.origin[c as usize] = 50 + c;
    }
    assert_eq!(h.origin_write(4, 99), Outcome::Refused);
    assert_eq!(h.store.prepare_origin_write(4), Err(StoreError::StoreFull));
    // Rewrites of unique chunks still work.
    assert_eq!(h.origin_write(0, 77), Outcome::Done);
    m.origin[0] = 77;
    verify(&mut h, &m, "store full");
    assert_clean(h.store.client_disk(), "store full");
}

#[test]
fn store_full_deletes_lowest_priority_unused_snapshot_and_reports_it() {
    let (mut h, mut m) = setup(4, StoreFullPolicy::DeleteLowestPriority);
    snap(&mut h, &mut m, 1);
    snap(&mut h, &mut m, 2);
    snap(&mut h, &mut m, 3);
    h.store.set_priority(1, 127).unwrap(); // never auto-deleted
    h.store.set_priority(2, 5).unwrap();
    h.store.set_priority(3, 1).unwrap(); // lowest, but in use
    h.store.set_in_use(3, true).unwrap();
    h.store.commit().unwrap();
    for c in 0..4 {
        h.origin_write(c, 50 + c);
        m.origin[c as usize] = 50 + c;
    }
    // The next copy-out needs room: snapshot 2 (lowest priority not in use)
    // goes; its chunks are shared with 1 and 3, so that frees nothing; then 3
    // is in use and 1 is never deleted: the write is refused.
    assert_eq!(h.origin_write(4, 99), Outcome::Refused);
    assert_eq!(h.auto_deleted, vec![2]);
    m.snaps.remove(&2);
    verify(&mut h, &m, "after auto-delete");
    // Once 3 is no longer in use it is the victim and its data is freed... but
    // 1 still shares every chunk, so nothing is freed and the write is refused
    // again, losing snapshot 3 visibly.
    h.store.set_in_use(3, false).unwrap();
    assert_eq!(h.origin_write(4, 99), Outcome::Refused);
    assert_eq!(h.auto_deleted, vec![2, 3]);
    m.snaps.remove(&3);
    verify(&mut h, &m, "after second auto-delete");
    assert_clean(h.store.client_disk(), "after auto-delete");
}

#[test]
fn store_full_auto_delete_frees_room_and_the_write_proceeds() {
    let (mut h, mut m) = setup(4, StoreFullPolicy::DeleteLowestPriority);
    snap(&mut h, &mut m, 1);
    for c in 0..4 {
        h.origin_write(c, 50 + c);
        m.origin[c as usize] = 50 + c;
    }
    snap(&mut h, &mut m, 2);
    assert_eq!(h.origin_write(4, 99), Outcome::Done);
    m.origin[4] = 99;
    // Snapshot 1 (older, same priority) was deleted, which freed its 4 chunks.
    assert_eq!(h.auto_deleted, vec![1]);
    m.snaps.remove(&1);
    verify(&mut h, &m, "after auto-delete");
    assert_clean(h.store.client_disk(), "after auto-delete");
}

#[test]
fn out_of_range_chunk_and_unknown_snapshot_are_clear_errors() {
    let (mut h, mut m) = setup(16, StoreFullPolicy::Refuse);
    snap(&mut h, &mut m, 1);
    assert!(matches!(
        h.store.prepare_origin_write(ORIGIN_CHUNKS),
        Err(StoreError::ChunkOutOfRange { .. })
    ));
    assert!(matches!(
        h.store.lookup(2, 0),
        Err(StoreError::NoSuchSnapshot(2))
    ));
    assert!(matches!(
        h.store.prepare_snapshot_write(2, 0),
        Err(StoreError::NoSuchSnapshot(2))
    ));
}

#[test]
fn incarnation_is_durable_and_increases() {
    let (mut h, _) = setup(16, StoreFullPolicy::Refuse);
    assert_eq!(h.store.incarnation(), 0);
    assert_eq!(h.store.bump_incarnation().unwrap(), 1);
    h.store.commit().unwrap();
    let d = h.store.into_disk();
    let mut s = open(d);
    assert_eq!(s.incarnation(), 1);
    assert_eq!(s.bump_incarnation().unwrap(), 2);
}

#[test]
fn many_chunks_grow_the_tree_and_survive_reopen() {
    // Enough exceptions to split leaves and index nodes.
    let chunks = 100_000u64;
    let d = format_store(chunks, chunks * 2, StoreFullPolicy::Refuse);
    let mut s = open(d);
    s.create_snapshot(1, 0).unwrap();
    s.commit().unwrap();
    let mut x = csnap_testkit::XorShift64::new(88172645463325252);
    let mut copied = 0;
    for _ in 0..chunks {
        let c = x.next_u64() % chunks;
        loop {
            match s.prepare_origin_write(c) {
                Ok(csnap_store::OriginWrite::CopyOut { .. }) => {
                    copied += 1;
                    break;
                }
                Ok(_) => break,
                Err(StoreError::TxFull) => {
                    s.commit().unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    s.commit().unwrap();
    assert!(s.status().depth >= 3, "depth {}", s.status().depth);
    assert_eq!(s.snapshot(1).unwrap().chunks, copied);
    let mut d = s.into_disk();
    assert_clean(&mut d, "big tree");
    let mut s = open(d);
    s.create_snapshot(2, 0).unwrap();
    // Deleting snapshot 1 frees everything through the incremental walk.
    s.delete_snapshot(1).unwrap();
    s.reclaim().unwrap();
    assert_eq!(s.status().data_free, s.status().data_chunks);
    let mut d = s.into_disk();
    assert_clean(&mut d, "big tree after delete");
}

/// Two handles on one shared disk, as two servers on two nodes would be.
#[derive(Clone)]
struct Shared(std::rc::Rc<std::cell::RefCell<csnap_store::disk::MemDisk>>);

impl csnap_store::disk::Disk for Shared {
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<(), csnap_store::disk::DiskError> {
        self.0.borrow_mut().read_at(buf, off)
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), csnap_store::disk::DiskError> {
        self.0.borrow_mut().write_at(buf, off)
    }
    fn flush(&mut self) -> Result<(), csnap_store::disk::DiskError> {
        self.0.borrow_mut().flush()
    }
    fn size_bytes(&self) -> u64 {
        self.0.borrow().size_bytes()
    }
}

#[test]
fn an_older_incarnation_is_fenced_and_writes_nothing() {
    use csnap_store::disk::Disk;
    let d = Shared(std::rc::Rc::new(std::cell::RefCell::new(format_store(
        ORIGIN_CHUNKS,
        64,
        StoreFullPolicy::Refuse,
    ))));
    let mut old = open(d.clone());
    assert_eq!(old.bump_incarnation().unwrap(), 1);
    old.create_snapshot(1, 0).unwrap();
    old.commit().unwrap();
    // A new server takes the store over (replay, next incarnation).
    let mut new = open(d.clone());
    assert_eq!(new.bump_incarnation().unwrap(), 2);
    new.commit().unwrap();
    // The old one comes back and tries to commit: fenced, nothing written.
    let before = d.0.borrow().bytes.clone();
    old.prepare_origin_write(3).unwrap();
    match old.commit() {
        Err(StoreError::Fenced { ours: 1, found: 2 }) => {}
        r => panic!("expected Fenced, got {r:?}"),
    }
    assert!(
        d.0.borrow().bytes == before,
        "a fenced server wrote to the store"
    );
    assert_eq!(
        old.commit(),
        Err(StoreError::Failed),
        "a fenced store stays failed"
    );
    // The new one goes on; the store is consistent.
    new.create_snapshot(2, 0).unwrap();
    new.commit().unwrap();
    let mut disk = d.clone();
    let mut buf = vec![0u8; 16];
    disk.read_at(&mut buf, 0).unwrap();
    assert_clean(&mut disk, "after fencing");
}

/// The device flushes a first write costs (ARCHITECTURE 2.6): its commit
/// flushes the store once (the single-flush commit: the copy-out data, the
/// previous commit's home writes and the journal write are made durable
/// together, the commit vouching for the data by checksum), and a group
/// commit shares it among all its first writes; a rewrite commits nothing
/// and flushes nothing. A snapshot write that gets a new chunk flushes
/// twice (the client writes into that chunk after the reply, so its copy
/// is flushed before the journal write, not checksummed); one into a chunk
/// the last commit vouches for waits for one more commit (one flush).
#[test]
fn a_first_write_commit_costs_one_store_flush_shared_by_its_group() {
    use csnap_store::disk::MemDisk;
    let (mut h, mut m) = setup(256, StoreFullPolicy::Refuse);
    snap(&mut h, &mut m, 1);
    let flushes = |h: &mut Harness<MemDisk, MemDisk>| h.store.client_disk().flushes;
    let seq = |h: &mut Harness<MemDisk, MemDisk>| h.store.status().seq;
    let f0 = flushes(&mut h);
    assert_eq!(h.origin_write(3, 42), Outcome::Done);
    m.origin[3] = 42;
    assert_eq!(flushes(&mut h) - f0, 1, "flushes of one first write");
    let f1 = flushes(&mut h);
    let batch: Vec<(u64, u64)> = (4..12).map(|c| (c, 100 + c)).collect();
    for o in h.origin_write_batch(&batch) {
        assert_eq!(o, Outcome::Done);
    }
    for &(c, v) in &batch {
        m.origin[c as usize] = v;
    }
    assert_eq!(
        flushes(&mut h) - f1,
        1,
        "flushes of 8 first writes in one commit"
    );
    let f2 = flushes(&mut h);
    assert_eq!(h.origin_write(3, 43), Outcome::Done);
    m.origin[3] = 43;
    assert_eq!(flushes(&mut h) - f2, 0, "flushes of a rewrite");
    // Snapshot 1 alone shares chunk 11's copy-out, which the last commit
    // vouches for: writing into it takes one more commit first.
    let (f3, s3) = (flushes(&mut h), seq(&mut h));
    assert_eq!(h.snapshot_write(1, 11, 7), Outcome::Done);
    m.snaps.get_mut(&1).unwrap()[11] = 7;
    assert_eq!(
        seq(&mut h) - s3,
        1,
        "a commit before a write into a vouched chunk"
    );
    assert_eq!(flushes(&mut h) - f3, 1, "flushes of that commit");
    // Written again: no commit vouches for it now.
    let (f4, s4) = (flushes(&mut h), seq(&mut h));
    assert_eq!(h.snapshot_write(1, 11, 8), Outcome::Done);
    m.snaps.get_mut(&1).unwrap()[11] = 8;
    assert_eq!(
        (seq(&mut h) - s4, flushes(&mut h) - f4),
        (0, 0),
        "an in-place rewrite"
    );
    // A snapshot write that copies out first: flushed, then committed.
    let f5 = flushes(&mut h);
    assert_eq!(h.snapshot_write(1, 13, 9), Outcome::Done);
    m.snaps.get_mut(&1).unwrap()[13] = 9;
    assert_eq!(
        flushes(&mut h) - f5,
        2,
        "flushes of a snapshot write's copy"
    );
    verify(&mut h, &m, "after first writes and a rewrite");
    assert_clean(h.store.client_disk(), "after first writes and a rewrite");
}

/// A single-flush commit whose journal write landed but whose copy-out did
/// not (a power loss before its flush returned; nobody was told it was
/// durable): the reopened store is at the commit before, reports the
/// discard, wipes the commit block (so that no later replay can take it
/// for the commit of the same sequence written next), and is clean; the
/// snapshot still reads the origin's old data. The same image with the
/// copy-out intact replays the commit.
#[test]
fn a_commit_whose_copy_out_was_lost_is_discarded_and_wiped() {
    use csnap_store::disk::{Disk, MemDisk};
    let (mut h, mut m) = setup(256, StoreFullPolicy::Refuse);
    snap(&mut h, &mut m, 1);
    let label = *h.store.label();
    let before: MemDisk = h.store.client_disk().clone();
    let seq0 = h.store.status().seq;
    assert_eq!(h.origin_write(5, 77), Outcome::Done);
    let csnap_store::Mapping::Store(copy) = h.store.lookup(1, 5).unwrap() else {
        panic!("chunk 5 of snapshot 1 was copied out");
    };
    let after: MemDisk = h.store.client_disk().clone();
    let bs = csnap_pools::BLOCK_SIZE_BYTES as u64;
    let slot = {
        let mut b = vec![0u8; bs as usize];
        after
            .clone()
            .read_at(&mut b, csnap_store::layout::SUPER_BLOCK * bs)
            .unwrap();
        csnap_store::layout::Super::decode(&b)
            .unwrap()
            .journal_last_slot
    };
    // The crash image: everything as before the commit, but its journal.
    let crash = |keep_data: bool| {
        let mut d = before.clone();
        let mut j = vec![0u8; (label.journal_blocks * bs) as usize];
        let mut src = after.clone();
        src.read_at(&mut j, label.journal_start * bs).unwrap();
        d.write_at(&j, label.journal_start * bs).unwrap();
        if keep_data {
            let mut b = vec![0u8; CHUNK];
            let off = label.chunk_offset(copy);
            src.read_at(&mut b, off).unwrap();
            d.write_at(&b, off).unwrap();
        }
        d
    };
    let st = open(crash(false));
    assert_eq!(st.status().seq, seq0, "the commit is discarded");
    assert_eq!(st.replay_report().discarded, Some(seq0 + 1));
    let mut d = st.into_disk();
    let mut blk = vec![0u8; bs as usize];
    d.read_at(&mut blk, (label.journal_start + slot) * bs)
        .unwrap();
    assert!(blk.iter().all(|&b| b == 0), "the commit block is wiped");
    assert_clean(&mut d, "after a discarded commit");
    let mut h2 = Harness::new(open(d), make_origin(ORIGIN_CHUNKS));
    verify(&mut h2, &m, "after a discarded commit");
    // Control: with its copy-out on the disk the commit is replayed.
    let st = open(crash(true));
    assert_eq!(st.status().seq, seq0 + 1, "the commit is replayed");
    assert_eq!(st.replay_report().discarded, None);
}

/// `unique_bits` (the write-ahead grant's question) answers per chunk what
/// an origin write would need, across leaf boundaries: with every third
/// chunk of 1000 copied out (several leaves of records), each window of 64
/// chunks has exactly the bits of the chunks copied out; with no snapshot
/// every chunk is unique; the window stops at the end of the origin.
#[test]
fn unique_bits_answers_what_an_origin_write_would_need_across_leaves() {
    let chunks = 1000u64;
    let d = format_store(chunks, 2048, StoreFullPolicy::Refuse);
    let mut h = Harness::new(open(d), make_origin(chunks));
    assert_eq!(h.store.unique_bits(0, 64).unwrap(), u64::MAX, "no snapshot");
    assert_eq!(h.store.unique_bits(990, 64).unwrap(), (1 << 10) - 1);
    h.store.create_snapshot(1, 0).unwrap();
    h.store.commit().unwrap();
    let written: Vec<(u64, u64)> = (0..chunks).step_by(3).map(|c| (c, c + 1)).collect();
    for batch in written.chunks(40) {
        for o in h.origin_write_batch(batch) {
            assert_eq!(o, Outcome::Done);
        }
    }
    assert!(h.store.status().depth >= 2, "records span leaves");
    for start in [0u64, 1, 100, 160, 333, 500, 936, 950] {
        let want = (0..64u64)
            .filter(|k| start + k < chunks && (start + k) % 3 == 0)
            .fold(0u64, |m, k| m | 1 << k);
        assert_eq!(
            h.store.unique_bits(start, 64).unwrap(),
            want,
            "window at {start}"
        );
    }
}
