//! `Store::delta` against per-chunk lookups: random origin and snapshot
//! writes between snapshots over a tree of many leaves, every range and
//! pair of volumes compared.

#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use csnap_store::{Mapping, StoreError, StoreFullPolicy};

const ORIGIN_CHUNKS: u64 = 3000;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// The delta computed from lookups, one chunk at a time.
fn expected<D: csnap_store::disk::Disk>(
    s: &mut csnap_store::Store<D>,
    volume: Option<u32>,
    base: u32,
    chunk: u64,
    chunks: u64,
) -> Vec<bool> {
    (chunk..chunk + chunks)
        .map(|c| {
            let b = s.lookup(base, c).unwrap();
            match volume {
                None => b != Mapping::Origin,
                Some(v) => s.lookup(v, c).unwrap() != b,
            }
        })
        .collect()
}

fn bits(out: &[u8], chunks: u64) -> Vec<bool> {
    (0..chunks)
        .map(|i| out[(i / 8) as usize] & (1 << (i % 8)) != 0)
        .collect()
}

#[test]
fn delta_matches_lookups_over_many_leaves() {
    delta_run(None);
}

/// The same over a tree of 3-record leaves and 16-entry nodes, where chunk
/// groups span leaves (a larger store: it needs more metadata blocks).
#[test]
fn delta_matches_lookups_where_groups_span_leaves() {
    delta_run(Some((3, 16)));
}

fn delta_run(fanout: Option<(usize, usize)>) {
    let data = if fanout.is_some() { 60_000 } else { 12_000 };
    let d = format_store(ORIGIN_CHUNKS, data, StoreFullPolicy::Refuse);
    let mut h = Harness::new(open(d), make_origin(ORIGIN_CHUNKS));
    if let Some((leaf, node)) = fanout {
        h.store.set_tree_fanout(leaf, node);
    }
    let mut rng = Lcg(42);
    let tags = [1u32, 2, 3, 4];
    for (i, &t) in tags.iter().enumerate() {
        h.store.create_snapshot(t, 1).unwrap();
        h.store.commit().unwrap();
        // Origin writes in clusters and scattered, and writes to earlier
        // snapshots (their own chunks, and shared ones split).
        for _ in 0..700 {
            let c = if rng.next().is_multiple_of(2) {
                rng.next() % ORIGIN_CHUNKS
            } else {
                (i as u64 * 600 + rng.next() % 400) % ORIGIN_CHUNKS
            };
            assert_eq!(h.origin_write(c, rng.next()), Outcome::Done);
        }
        for _ in 0..60 {
            let s = tags[(rng.next() % (i as u64 + 1)) as usize];
            let c = rng.next() % ORIGIN_CHUNKS;
            assert_eq!(h.snapshot_write(s, c, rng.next()), Outcome::Done);
        }
        h.store.commit().unwrap();
    }
    let volumes = [None, Some(1), Some(2), Some(3), Some(4)];
    let mut out = vec![0xffu8; 400];
    let mut differing = 0;
    for v in volumes {
        for base in tags {
            // The whole origin, then random ranges (odd starts and lengths).
            let mut ranges = vec![(0, ORIGIN_CHUNKS)];
            for _ in 0..20 {
                let a = rng.next() % ORIGIN_CHUNKS;
                let n = 1 + rng.next() % (ORIGIN_CHUNKS - a);
                ranges.push((a, n));
            }
            for (a, n) in ranges {
                out.fill(0xff);
                h.store.delta(v, base, a, n, &mut out).unwrap();
                let want = expected(&mut h.store, v, base, a, n);
                assert_eq!(
                    bits(&out, n),
                    want,
                    "volume {v:?} base {base} range {a}+{n}"
                );
                // Bits past the range are cleared.
                assert!(
                    (n..out.len() as u64 * 8).all(|i| out[(i / 8) as usize] & (1 << (i % 8)) == 0)
                );
                differing += want.iter().filter(|&&b| b).count();
            }
            // A snapshot never differs from itself.
            if v == Some(base) {
                h.store.delta(v, base, 0, ORIGIN_CHUNKS, &mut out).unwrap();
                assert!(out.iter().all(|&b| b == 0));
            }
        }
    }
    assert!(
        differing > 10_000,
        "the test must see differences: {differing}"
    );
    h.store.assert_invariants_full();
}

#[test]
fn delta_refuses_bad_arguments() {
    let d = format_store(64, 64, StoreFullPolicy::Refuse);
    let mut h = Harness::new(open(d), make_origin(64));
    h.store.create_snapshot(5, 1).unwrap();
    h.store.commit().unwrap();
    let mut out = [0u8; 8];
    assert!(matches!(
        h.store.delta(None, 6, 0, 8, &mut out),
        Err(StoreError::NoSuchSnapshot(6))
    ));
    assert!(matches!(
        h.store.delta(Some(7), 5, 0, 8, &mut out),
        Err(StoreError::NoSuchSnapshot(7))
    ));
    assert!(matches!(
        h.store.delta(None, 5, 60, 8, &mut out),
        Err(StoreError::ChunkOutOfRange { .. })
    ));
    assert!(matches!(
        h.store.delta(None, 5, 0, 65, &mut out),
        Err(StoreError::ChunkOutOfRange { .. })
    ));
    assert!(matches!(
        h.store.delta(None, 5, u64::MAX - 1, 8, &mut out),
        Err(StoreError::ChunkOutOfRange { .. })
    ));
    h.store.delta(None, 5, 56, 8, &mut out).unwrap();
    assert_eq!(out, [0; 8]);
}
