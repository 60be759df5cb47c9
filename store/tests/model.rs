//! Property tests: random sequences of snapshot create and delete, origin
//! writes (single and group-committed), snapshot writes, deletion steps and
//! reopens, against an in-memory model. After every step every volume equals
//! the model; `check` is clean at every reopen and at the end.

// Test code indexes host-sized buffers with u64 chunk numbers of small test
// stores; truncation cannot happen on the 64-bit hosts the tests run on.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use csnap_store::disk::MemDisk;
use csnap_store::StoreFullPolicy;
use proptest::prelude::*;

const ORIGIN_CHUNKS: u64 = 48;

#[derive(Debug, Clone)]
enum Op {
    Create(u32),
    Delete(usize),
    OriginWrite(u64),
    OriginBatch(Vec<u64>),
    SnapWrite(usize, u64),
    DeleteStep(usize),
    Priority(usize, i8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..40).prop_map(Op::Create),
        2 => any::<usize>().prop_map(Op::Delete),
        6 => (0..ORIGIN_CHUNKS).prop_map(Op::OriginWrite),
        2 => prop::collection::vec(0..ORIGIN_CHUNKS, 1..12).prop_map(Op::OriginBatch),
        4 => (any::<usize>(), 0..ORIGIN_CHUNKS).prop_map(|(s, c)| Op::SnapWrite(s, c)),
        2 => (1usize..20).prop_map(Op::DeleteStep),
        1 => (any::<usize>(), -3i8..3).prop_map(|(s, p)| Op::Priority(s, p)),
        1 => Just(Op::Reopen),
    ]
}

/// Opens the store with the tree's fan-out cut to `fanout` (leaf records,
/// node entries) if given: a deep tree whose chunk groups span leaves.
fn open_with<D: csnap_store::disk::Disk>(
    d: D,
    fanout: Option<(usize, usize)>,
) -> csnap_store::Store<D> {
    let mut s = open(d);
    if let Some((leaf, node)) = fanout {
        s.set_tree_fanout(leaf, node);
    }
    s
}

fn run(ops: Vec<Op>, data_chunks: u64, policy: StoreFullPolicy) {
    run_fanout(ops, data_chunks, policy, None);
}

fn run_fanout(
    ops: Vec<Op>,
    data_chunks: u64,
    policy: StoreFullPolicy,
    fanout: Option<(usize, usize)>,
) {
    let d = format_store(ORIGIN_CHUNKS, data_chunks, policy);
    let mut h = Harness::new(open_with(d, fanout), make_origin(ORIGIN_CHUNKS));
    let mut m = Model::new(ORIGIN_CHUNKS);
    let mut next_value = 1u64;
    for (step, op) in ops.into_iter().enumerate() {
        let when = format!("step {step} ({op:?})");
        let tags: Vec<u32> = m.snaps.keys().copied().collect();
        match op {
            Op::Create(tag) => {
                let r = h.store.create_snapshot(tag, step as u64);
                if m.snaps.contains_key(&tag) {
                    assert_eq!(
                        r,
                        Err(csnap_store::StoreError::SnapshotExists(tag)),
                        "{when}"
                    );
                } else if r.is_ok() {
                    m.snaps.insert(tag, m.origin.clone());
                } else {
                    assert_eq!(r, Err(csnap_store::StoreError::TooManySnapshots), "{when}");
                }
                h.store.commit().unwrap();
            }
            Op::Delete(i) => {
                if !tags.is_empty() {
                    let tag = tags[i % tags.len()];
                    h.store.delete_snapshot(tag).unwrap();
                    h.store.commit().unwrap();
                    m.snaps.remove(&tag);
                }
            }
            Op::OriginWrite(c) => {
                let v = next_value;
                next_value += 1;
                if h.origin_write(c, v) == Outcome::Done {
                    m.origin[c as usize] = v;
                }
            }
            Op::OriginBatch(cs) => {
                let writes: Vec<(u64, u64)> = cs
                    .iter()
                    .map(|&c| {
                        next_value += 1;
                        (c, next_value)
                    })
                    .collect();
                let outcomes = h.origin_write_batch(&writes);
                for (&(c, v), o) in writes.iter().zip(&outcomes) {
                    if *o == Outcome::Done {
                        m.origin[c as usize] = v;
                    }
                }
            }
            Op::SnapWrite(i, c) => {
                if !tags.is_empty() {
                    let tag = tags[i % tags.len()];
                    let v = next_value;
                    next_value += 1;
                    if h.snapshot_write(tag, c, v) == Outcome::Done {
                        m.snaps.get_mut(&tag).unwrap()[c as usize] = v;
                    }
                }
            }
            Op::DeleteStep(n) => {
                match h.store.delete_step(n) {
                    Ok(_) | Err(csnap_store::StoreError::TxFull) => {}
                    Err(e) => panic!("{when}: {e}"),
                }
                h.store.commit().unwrap();
            }
            Op::Priority(i, p) => {
                if !tags.is_empty() {
                    h.store.set_priority(tags[i % tags.len()], p).unwrap();
                    h.store.commit().unwrap();
                }
            }
            Op::Reopen => {
                let origin = std::mem::replace(&mut h.origin, MemDisk::new(0));
                let store = std::mem::replace(
                    &mut h,
                    Harness::new(open(format_store(1, 1, policy)), MemDisk::new(0)),
                )
                .store;
                let mut disk = store.into_disk();
                assert_clean(&mut disk, &when);
                let auto = std::mem::take(&mut h.auto_deleted);
                h = Harness::new(open_with(disk, fanout), origin);
                h.auto_deleted = auto;
            }
        }
        // Snapshots the store-full policy deleted leave the model too.
        for t in h.auto_deleted.drain(..) {
            assert!(
                m.snaps.remove(&t).is_some(),
                "{when}: auto-deleted unknown snapshot {t}"
            );
        }
        verify(&mut h, &m, &when);
    }
    h.store.reclaim().unwrap();
    verify(&mut h, &m, "end");
    let mut disk = h.store.into_disk();
    assert_clean(&mut disk, "end");
}

/// Proptest cases: `PROPTEST_CASES` or `CSNAP_SIM_SEEDS` (the one knob the
/// simulations take for a soak) when set, else `default` (CI).
fn soak_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .or_else(|_| std::env::var("CSNAP_SIM_SEEDS"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: soak_cases(96), ..ProptestConfig::default() })]

    /// A roomy store: the mapping logic alone.
    #[test]
    fn roomy_store_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops, 4096, StoreFullPolicy::Refuse);
    }

    /// A small store that fills: refusals must lose nothing.
    #[test]
    fn full_store_refuse_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops, 24, StoreFullPolicy::Refuse);
    }

    /// A small store that fills: the store-full policy deletes snapshots, and
    /// says which.
    #[test]
    fn full_store_auto_delete_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops, 24, StoreFullPolicy::DeleteLowestPriority);
    }

    /// Leaves of 3 records and index nodes of 6 entries: a deep tree whose
    /// chunk groups are cut by splits and span leaves (as at 1024
    /// snapshots), walked by every lookup, write, delta and delete step.
    #[test]
    fn groups_spanning_leaves_match_model(ops in prop::collection::vec(op(), 1..160)) {
        run_fanout(ops, 4096, StoreFullPolicy::Refuse, Some((3, 6)));
    }
}
