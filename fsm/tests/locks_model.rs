//! The read-lock table against a model: random acquires, releases, waits,
//! owner departures and pending cancellations.

use std::collections::{BTreeMap, BTreeSet};

use csnap_fsm::locks::{LockLimits, LockTable};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Acquire(u64, u32),
    Release(u64, u32),
    Wait(u64, u32),
    Leave(u32),
    Cancel(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..6, 0u32..4).prop_map(|(c, o)| Op::Acquire(c, o)),
        4 => (0u64..6, 0u32..4).prop_map(|(c, o)| Op::Release(c, o)),
        3 => (0u64..6, 0u32..4).prop_map(|(c, p)| Op::Wait(c, p)),
        1 => (0u32..4).prop_map(Op::Leave),
        1 => (0u32..4).prop_map(Op::Cancel),
    ]
}

proptest! {
    #[test]
    fn lock_table_matches_model(ops in prop::collection::vec(op(), 1..200)) {
        let mut t = LockTable::new(LockLimits { locks: 64, waits: 64, owners: 4, pendings: 4 });
        let mut holds: BTreeMap<u64, BTreeMap<u32, u32>> = BTreeMap::new();
        let mut waits: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
        for op in ops {
            let mut woken = Vec::new();
            match op {
                Op::Acquire(c, o) => {
                    t.acquire(c, o).unwrap();
                    *holds.entry(c).or_default().entry(o).or_default() += 1;
                }
                Op::Release(c, o) => {
                    let held = holds.get(&c).and_then(|m| m.get(&o)).copied().unwrap_or(0);
                    let r = t.release(c, o, &mut |p| woken.push(p));
                    prop_assert_eq!(r.is_ok(), held > 0);
                    if held > 0 {
                        let m = holds.get_mut(&c).unwrap();
                        if held == 1 { m.remove(&o); } else { *m.get_mut(&o).unwrap() -= 1; }
                        if m.is_empty() { holds.remove(&c); }
                    }
                }
                Op::Wait(c, p) => {
                    let w = t.wait_if_locked(c, p).unwrap();
                    prop_assert_eq!(w, holds.contains_key(&c));
                    if w { waits.entry(p).or_default().insert(c); }
                }
                Op::Leave(o) => {
                    t.release_owner(o, &mut |p| woken.push(p));
                    for m in holds.values_mut() { m.remove(&o); }
                    holds.retain(|_, m| !m.is_empty());
                }
                Op::Cancel(p) => {
                    t.cancel_pending(p);
                    waits.remove(&p);
                }
            }
            // Model: a wait is satisfied once its chunk is unlocked (a lock
            // taken again later is a new lock the write does not wait for); a
            // pending is ready when all its waits are satisfied.
            let mut expect: Vec<u32> = Vec::new();
            for (&p, cs) in waits.iter_mut() {
                cs.retain(|c| holds.contains_key(c));
                if cs.is_empty() {
                    expect.push(p);
                }
            }
            waits.retain(|_, cs| !cs.is_empty());
            woken.sort_unstable();
            woken.dedup();
            prop_assert_eq!(&woken, &expect);
            for c in 0..6u64 {
                prop_assert_eq!(t.is_locked(c), holds.contains_key(&c));
            }
            for p in 0..4u32 {
                prop_assert_eq!(t.is_waiting(p), waits.contains_key(&p));
            }
            t.assert_invariants();
        }
    }
}
