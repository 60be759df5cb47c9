//! Crash tests. Every block write and flush of a workload is recorded at the
//! disk trait. For every prefix of the event stream, the store image is
//! rebuilt as a crash at that point would leave it, including variants where
//! the writes since the last flush are dropped, reordered or torn. Each image
//! is reopened (which replays the journal), must pass `check`, and must hold
//! every operation that was reported durable: every snapshot reads exactly
//! what it read at the recovered commit, which is never older than the last
//! acknowledged one.

// Test code indexes host-sized buffers with u64 chunk numbers of small test
// stores; truncation cannot happen on the 64-bit hosts the tests run on.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use common::*;
use csnap_store::disk::{Disk, DiskError, MemDisk};
use csnap_store::StoreFullPolicy;

#[derive(Debug, Clone)]
enum Ev {
    Write { dev: u8, off: u64, data: Vec<u8> },
    Flush { dev: u8 },
}

type Log = Rc<RefCell<Vec<Ev>>>;

struct RecDisk {
    inner: MemDisk,
    dev: u8,
    log: Log,
}

impl Disk for RecDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.log.borrow_mut().push(Ev::Write {
            dev: self.dev,
            off: offset,
            data: buf.to_vec(),
        });
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.log.borrow_mut().push(Ev::Flush { dev: self.dev });
        self.inner.flush()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

const STORE: u8 = 0;
const ORIGIN: u8 = 1;

/// What the volumes must read once commit `seq` is the recovered state.
#[derive(Clone)]
struct Point {
    /// Log length when the operation returned.
    log_len: usize,
    /// Committed sequence then.
    seq: u64,
    /// Snapshot contents as of `seq`.
    snaps: BTreeMap<u32, Vec<u64>>,
    /// A snapshot write whose data is durable only from log index `.3` on:
    /// (tag, chunk, new value, flush index).
    flux: Option<(u32, u64, u64, usize)>,
}

use csnap_testkit::XorShift64 as Xor;

const ORIGIN_CHUNKS: u64 = 320;

/// Runs a random workload, recording. Returns the base images, the log and
/// the durability points.
fn record(
    seed: u64,
    ops: usize,
    paired: bool,
    fanout: Option<(usize, usize)>,
) -> (MemDisk, MemDisk, Vec<Ev>, Vec<Point>) {
    let base_store = format_store(ORIGIN_CHUNKS, 2048, StoreFullPolicy::Refuse);
    let base_origin = make_origin(ORIGIN_CHUNKS);
    let log: Log = Rc::new(RefCell::new(Vec::new()));
    let mut store = open(RecDisk {
        inner: base_store.clone(),
        dev: STORE,
        log: log.clone(),
    });
    if let Some((leaf, node)) = fanout {
        store.set_tree_fanout(leaf, node);
    }
    let origin = RecDisk {
        inner: base_origin.clone(),
        dev: ORIGIN,
        log: log.clone(),
    };
    let mut h = Harness::new(store, origin);
    let mut m = Model::new(ORIGIN_CHUNKS);
    let mut rng = Xor::new(seed | 1);
    let mut points = vec![Point {
        log_len: 0,
        seq: 0,
        snaps: BTreeMap::new(),
        flux: None,
    }];
    let mut value = 1u64;
    let mut tag = 0u32;
    for _ in 0..ops {
        let tags: Vec<u32> = m.snaps.keys().copied().collect();
        let mut flux = None;
        let pre_snaps = m.snaps.clone();
        let op = if paired && !tags.is_empty() {
            10
        } else {
            rng.below(10)
        };
        match op {
            10 => {
                // A first write to the origin, whose copy-out the commit
                // vouches for by checksum, then at once a snapshot write
                // into that same chunk (in place when one snapshot alone
                // shares it): the snapshot write must not land while that
                // commit is the newest (ARCHITECTURE 2.6).
                let t = tags[rng.below(tags.len() as u64) as usize];
                let c = rng.below(ORIGIN_CHUNKS);
                value += 1;
                assert_eq!(h.origin_write(c, value), Outcome::Done);
                m.origin[c as usize] = value;
                points.push(Point {
                    log_len: log.borrow().len(),
                    seq: h.store.status().seq,
                    snaps: m.snaps.clone(),
                    flux: None,
                });
                let pre = m.snaps.clone();
                value += 1;
                assert_eq!(h.snapshot_write(t, c, value), Outcome::Done);
                let flush_at = log.borrow().len();
                h.store.client_disk().flush().unwrap();
                m.snaps.get_mut(&t).unwrap()[c as usize] = value;
                points.push(Point {
                    log_len: flush_at,
                    seq: h.store.status().seq,
                    snaps: pre,
                    flux: Some((t, c, value, flush_at)),
                });
            }
            0 | 1 if tags.len() < 6 => {
                tag += 1;
                h.store.create_snapshot(tag, 0).unwrap();
                h.store.commit().unwrap();
                m.snaps.insert(tag, m.origin.clone());
            }
            2 if !tags.is_empty() => {
                let t = tags[rng.below(tags.len() as u64) as usize];
                h.store.delete_snapshot(t).unwrap();
                h.store.commit().unwrap();
                m.snaps.remove(&t);
                points.push(Point {
                    log_len: log.borrow().len(),
                    seq: h.store.status().seq,
                    snaps: m.snaps.clone(),
                    flux: None,
                });
                // Reclaim in small steps, each its own commit.
                while h.store.delete_step(7).unwrap() == csnap_store::DeleteProgress::Working {
                    h.store.commit().unwrap();
                }
                h.store.commit().unwrap();
            }
            3 | 4 if !tags.is_empty() => {
                let t = tags[rng.below(tags.len() as u64) as usize];
                let c = rng.below(ORIGIN_CHUNKS);
                value += 1;
                assert_eq!(h.snapshot_write(t, c, value), Outcome::Done);
                // The client's flush makes the data durable.
                let flush_at = log.borrow().len();
                h.store.client_disk().flush().unwrap();
                flux = Some((t, c, value, flush_at));
                m.snaps.get_mut(&t).unwrap()[c as usize] = value;
            }
            5 | 6 => {
                // A burst of group-committed origin writes.
                let n = 1 + rng.below(40);
                let writes: Vec<(u64, u64)> = (0..n)
                    .map(|_| {
                        value += 1;
                        (rng.below(ORIGIN_CHUNKS), value)
                    })
                    .collect();
                for o in h.origin_write_batch(&writes) {
                    assert_eq!(o, Outcome::Done);
                }
                for (c, v) in writes {
                    m.origin[c as usize] = v;
                }
            }
            _ => {
                let c = rng.below(ORIGIN_CHUNKS);
                value += 1;
                assert_eq!(h.origin_write(c, value), Outcome::Done);
                m.origin[c as usize] = value;
            }
        }
        let seq = h.store.status().seq;
        if let Some((t, c, v, at)) = flux {
            // At the write's commit the old contents still count.
            points.push(Point {
                log_len: at,
                seq,
                snaps: pre_snaps,
                flux: Some((t, c, v, at)),
            });
        }
        points.push(Point {
            log_len: log.borrow().len(),
            seq,
            snaps: m.snaps.clone(),
            flux: None,
        });
    }
    let events = log.borrow().clone();
    (base_store, base_origin, events, points)
}

/// Applies a write, torn at 512-byte sectors if `keep` says which to keep.
fn apply(d: &mut MemDisk, off: u64, data: &[u8], keep: Option<&dyn Fn(usize) -> bool>) {
    match keep {
        None => d.write_at(data, off).unwrap(),
        Some(k) => {
            for (i, s) in data.chunks(512).enumerate() {
                if k(i) {
                    d.write_at(s, off + (i * 512) as u64).unwrap();
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Variant {
    /// Everything up to the crash reached the disk.
    Whole,
    /// Volatile writes dropped at random.
    Drop,
    /// Volatile writes applied in reverse order, some dropped.
    Reorder,
    /// One volatile write torn at sector granularity, later ones dropped.
    Tear,
}

fn crash_image(
    base_store: &MemDisk,
    base_origin: &MemDisk,
    events: &[Ev],
    p: usize,
    variant: Variant,
    rng: &mut Xor,
) -> (MemDisk, MemDisk) {
    let mut s = base_store.clone();
    let mut o = base_origin.clone();
    let last_flush = events[..p]
        .iter()
        .rposition(|e| matches!(e, Ev::Flush { dev: STORE }))
        .map_or(0, |i| i + 1);
    for e in &events[..last_flush] {
        match e {
            Ev::Write {
                dev: STORE,
                off,
                data,
            } => apply(&mut s, *off, data, None),
            Ev::Write { off, data, .. } => apply(&mut o, *off, data, None),
            Ev::Flush { .. } => {}
        }
    }
    let mut volatile: Vec<&Ev> = Vec::new();
    for e in &events[last_flush..p] {
        match e {
            Ev::Write {
                dev: ORIGIN,
                off,
                data,
            } => apply(&mut o, *off, data, None),
            Ev::Write { .. } => volatile.push(e),
            Ev::Flush { .. } => {}
        }
    }
    match variant {
        Variant::Whole => {}
        Variant::Drop => volatile.retain(|_| rng.below(2) == 0),
        Variant::Reorder => {
            volatile.reverse();
            volatile.retain(|_| rng.below(3) != 0);
        }
        Variant::Tear => {
            if !volatile.is_empty() {
                let t = rng.below(volatile.len() as u64) as usize;
                if let Ev::Write { off, data, .. } = volatile[t] {
                    let sectors = data.len() / 512;
                    let cut = rng.below(sectors as u64) as usize;
                    let salt = rng.next_u64();
                    let keep = move |i: usize| i < cut || (salt >> (i % 64)) & 1 == 1 && i != cut;
                    apply(&mut s, *off, data, Some(&keep));
                }
                volatile.truncate(t);
            }
        }
    }
    for e in volatile {
        if let Ev::Write { off, data, .. } = e {
            apply(&mut s, *off, data, None);
        }
    }
    (s, o)
}

fn verify_crash(
    base_store: &MemDisk,
    base_origin: &MemDisk,
    events: &[Ev],
    points: &[Point],
    p: usize,
    variant: Variant,
    rng: &mut Xor,
) {
    let when = format!("crash after event {p} of {} ({variant:?})", events.len());
    let (s, o) = crash_image(base_store, base_origin, events, p, variant, rng);
    let store = match csnap_store::Store::open(
        s,
        &csnap_store::OpenOptions {
            cache_blocks: CACHE_BLOCKS,
        },
    ) {
        Ok(st) => st,
        Err(e) => panic!("{when}: reopen failed: {e}"),
    };
    let seq = store.status().seq;
    let acked = points
        .iter()
        .filter(|pt| pt.log_len <= p)
        .map(|pt| pt.seq)
        .max()
        .unwrap_or(0);
    assert!(
        seq >= acked,
        "{when}: recovered commit {seq} is older than acknowledged {acked}"
    );
    let mut h = Harness::new(store, o);
    assert_clean(h.store.client_disk(), &when);
    // The model at the recovered commit: the newest point of that commit the
    // crash had reached, or, when the commit became durable before its
    // operation returned, the first point of that commit.
    let at_seq: Vec<&Point> = points.iter().filter(|pt| pt.seq == seq).collect();
    let point = at_seq
        .iter()
        .rev()
        .find(|pt| pt.log_len <= p)
        .or_else(|| at_seq.first())
        .copied()
        .or_else(|| points.iter().rev().find(|pt| pt.seq < seq))
        .unwrap_or_else(|| panic!("{when}: no model for commit {seq}"));
    let listed: Vec<u32> = h
        .store
        .snapshots()
        .filter(|s| !s.deleting)
        .map(|s| s.tag)
        .collect();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort_unstable();
    let expected: Vec<u32> = point.snaps.keys().copied().collect();
    assert_eq!(listed_sorted, expected, "{when}: snapshots at commit {seq}");
    for (&tag, data) in &point.snaps {
        for c in 0..ORIGIN_CHUNKS {
            let got = value_of(&h.read_snapshot(tag, c));
            let want = data[c as usize];
            if let Some((ft, fc, fv, at)) = point.flux {
                if ft == tag && fc == c {
                    if p > at {
                        assert_eq!(got, Some(fv), "{when}: snapshot {tag} chunk {c} (flushed)");
                    }
                    continue;
                }
            }
            assert_eq!(
                got,
                Some(want),
                "{when}: snapshot {tag} chunk {c} at commit {seq}"
            );
        }
    }
}

fn crash_run(seed: u64, ops: usize) {
    crash_run_mix(seed, ops, false, None);
}

fn crash_run_mix(seed: u64, ops: usize, paired: bool, fanout: Option<(usize, usize)>) {
    let (bs, bo, events, points) = record(seed, ops, paired, fanout);
    let mut rng = Xor::new(seed.wrapping_mul(31) | 1);
    let mut tested = 0;
    for p in 0..=events.len() {
        verify_crash(&bs, &bo, &events, &points, p, Variant::Whole, &mut rng);
        tested += 1;
        let volatile = events[..p]
            .iter()
            .rev()
            .take_while(|e| !matches!(e, Ev::Flush { dev: STORE }))
            .any(|e| matches!(e, Ev::Write { dev: STORE, .. }));
        if volatile {
            for v in [Variant::Drop, Variant::Reorder, Variant::Tear] {
                verify_crash(&bs, &bo, &events, &points, p, v, &mut rng);
                tested += 1;
            }
        }
    }
    assert!(tested > events.len(), "seed {seed}: too few crash points");
    eprintln!(
        "seed {seed}: {} events, {tested} crash images, all recovered",
        events.len()
    );
}

#[test]
fn crash_at_every_point_seed_1() {
    crash_run(1, 40);
}

#[test]
fn crash_at_every_point_seed_2() {
    crash_run(0xfeed, 40);
}

#[test]
fn crash_at_every_point_seed_3() {
    crash_run(0xdead_beef, 40);
}

/// Origin first writes each followed at once by a snapshot write into the
/// chunk just copied out (one snapshot: in place), crashed at every point.
#[test]
fn crash_at_every_point_snapshot_writes_into_fresh_copy_outs() {
    crash_run_mix(0x5eed, 24, true, None);
}

/// Leaves of 3 records, index nodes of 6 entries: splits cut chunk groups
/// and deepen the tree (more blocks per commit), crashed at every point.
#[test]
fn crash_at_every_point_where_groups_span_leaves() {
    crash_run_mix(0x1eaf, 40, false, Some((3, 6)));
}
