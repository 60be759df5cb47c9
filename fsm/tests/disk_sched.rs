//! The disk-operation scheduler (`csnap_fsm::disk_sched`) driven against a
//! simulated disk and memory, with requests completed in random order and
//! some of them failing. Reads and writes cover byte ranges that never
//! overlap one another but share aligned blocks, so every write is a
//! read-modify-write racing its neighbours: every write that finished ok
//! must be on the disk, every failed one absent, every other byte as it
//! was, and every read must see the bytes as they were.

// Test code: small test-sized numbers.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use csnap_fsm::disk_sched::{Action, DiskSched, Finished, Request, SchedConfig};
use csnap_fsm::volume::{Dev, DiskOp};
use proptest::prelude::*;

const ALIGN: usize = 16;
const DEV_BYTES: usize = 2048;
const SLOT_BYTES: usize = 64;
const OPS_MAX: usize = 8;
const BOUNCES: usize = 2;
const BOUNCE_BYTES: usize = SLOT_BYTES + 2 * ALIGN;

#[derive(Debug, Clone, Copy)]
struct Spec {
    write: bool,
    gap: usize,
    len: usize,
    misalign: usize,
}

fn spec() -> impl Strategy<Value = Spec> {
    (any::<bool>(), 0usize..20, 1usize..40, 0usize..3).prop_map(|(write, gap, len, misalign)| {
        Spec {
            write,
            gap,
            len,
            misalign,
        }
    })
}

/// xorshift: the scheduling decisions, each in `0..n`.
struct Rng(csnap_testkit::XorShift64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        (self.0.below(n as u64)) as usize
    }
}

fn initial(i: usize) -> u8 {
    (i * 7 + 3) as u8
}

fn run(specs: &[Spec], seed: u64, fail_one_in: usize) {
    // Disjoint byte ranges, in order, sharing blocks.
    let mut ops = Vec::new();
    let mut at = 0;
    for (k, s) in specs.iter().enumerate() {
        let off = at + s.gap;
        if off + s.len > DEV_BYTES {
            break;
        }
        at = off + s.len;
        let data_at = k * SLOT_BYTES + s.misalign;
        let op = if s.write {
            DiskOp::Write {
                slot: k as u32,
                dev: Dev::Origin,
                dev_offset: off as u64,
                buf_offset: 0,
                len: s.len as u32,
            }
        } else {
            DiskOp::Read {
                slot: k as u32,
                dev: Dev::Origin,
                dev_offset: off as u64,
                buf_offset: 0,
                len: s.len as u32,
            }
        };
        ops.push((op, data_at, off, s.len, s.write));
    }
    let n = ops.len();
    let bounce_at = n * SLOT_BYTES + SLOT_BYTES;
    let mut mem = vec![0u8; bounce_at + BOUNCES * BOUNCE_BYTES];
    for (k, &(_, data_at, _, len, write)) in ops.iter().enumerate() {
        if write {
            mem[data_at..data_at + len].fill(0x80 | k as u8);
        }
    }
    let mut disk: Vec<u8> = (0..DEV_BYTES).map(initial).collect();
    let mut sched = DiskSched::new(SchedConfig {
        ops_max: OPS_MAX,
        bounces: BOUNCES,
        bounce_at,
        bounce_bytes: BOUNCE_BYTES,
        align: ALIGN,
    });
    let mut rng = Rng(csnap_testkit::XorShift64::new(seed | 1));
    let mut out: Vec<Request> = Vec::new();
    let mut done: Vec<Option<Finished>> = vec![None; n];
    let mut next = 0;
    let mut turns = 0;
    while done.iter().any(Option::is_none) {
        turns += 1;
        assert!(
            turns < 100_000,
            "no progress: {} taken, {} out",
            sched.len(),
            out.len()
        );
        match rng.next(3) {
            0 if next < n => {
                let (op, data_at, ..) = ops[next];
                if sched.take((next % 3) as u16, op, data_at) {
                    next += 1;
                }
            }
            1 => sched.pump(),
            _ if !out.is_empty() => {
                let r = out.swap_remove(rng.next(out.len()));
                let fail = fail_one_in > 0 && rng.next(fail_one_in) == 0;
                let (id, res) = match r {
                    Request::Read {
                        id,
                        dev_offset,
                        mem_at,
                        len,
                        ..
                    } => {
                        if !fail {
                            let d = dev_offset as usize;
                            let l = len as usize;
                            mem[mem_at..mem_at + l].copy_from_slice(&disk[d..d + l]);
                        }
                        (id, if fail { -5 } else { len as i32 })
                    }
                    Request::Write {
                        id,
                        dev_offset,
                        mem_at,
                        len,
                        ..
                    } => {
                        if !fail {
                            let d = dev_offset as usize;
                            let l = len as usize;
                            disk[d..d + l].copy_from_slice(&mem[mem_at..mem_at + l]);
                        }
                        (id, if fail { -5 } else { len as i32 })
                    }
                    Request::Sync { id, .. } => (id, 0),
                };
                sched.complete(id, res);
            }
            _ => sched.pump(),
        }
        // Every invariant after every step (the scheduler itself walks its
        // table only every so often).
        sched.assert_invariants_full();
        while let Some(a) = sched.poll_action() {
            match a {
                Action::Submit(r) => out.push(r),
                Action::Zero { at, len } => mem[at..at + len].fill(0),
                Action::Copy { from, to, len } => {
                    assert!(from + len <= to || to + len <= from, "overlapping copy");
                    mem.copy_within(from..from + len, to);
                }
                Action::Finished(f) => {
                    let k = f.op.slot() as usize;
                    assert!(done[k].is_none(), "finished twice");
                    done[k] = Some(f);
                }
            }
        }
    }
    assert!(sched.is_empty() && out.is_empty());
    let mut expect: Vec<u8> = (0..DEV_BYTES).map(initial).collect();
    for (k, &(_, data_at, off, len, write)) in ops.iter().enumerate() {
        let f = done[k].expect("finished");
        if write && f.ok {
            expect[off..off + len].fill(0x80 | k as u8);
        }
        if !write && f.ok {
            let want: Vec<u8> = (off..off + len).map(initial).collect();
            assert_eq!(
                &mem[data_at..data_at + len],
                &want[..],
                "read {k} saw other bytes"
            );
        }
        if fail_one_in == 0 {
            assert!(f.ok, "op {k} failed without a failure injected");
        }
    }
    assert_eq!(disk, expect, "a write lost, or bytes around one changed");
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
    #![proptest_config(ProptestConfig { cases: soak_cases(300), ..ProptestConfig::default() })]

    #[test]
    fn racing_read_modify_writes_lose_nothing(specs in prop::collection::vec(spec(), 1..40), seed in any::<u64>()) {
        run(&specs, seed, 0);
    }

    #[test]
    fn failed_requests_fail_their_operation_only(specs in prop::collection::vec(spec(), 1..40), seed in any::<u64>()) {
        run(&specs, seed, 5);
    }
}

#[test]
fn an_aligned_write_waits_behind_a_read_modify_write_of_its_block() {
    let mut sched = DiskSched::new(SchedConfig {
        ops_max: 4,
        bounces: 1,
        bounce_at: 4096,
        bounce_bytes: 4096,
        align: 512,
    });
    let w = |slot, dev_offset, len| DiskOp::Write {
        slot,
        dev: Dev::Store,
        dev_offset,
        buf_offset: 0,
        len,
    };
    assert!(sched.take(0, w(0, 100, 10), 0));
    assert!(sched.take(0, w(1, 0, 512), 512));
    sched.pump();
    let mut reqs = Vec::new();
    while let Some(a) = sched.poll_action() {
        if let Action::Submit(r) = a {
            reqs.push(r);
        }
    }
    // Only the read-modify-write's edge read: the aligned write waits.
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(matches!(
        reqs[0],
        Request::Read {
            dev_offset: 0,
            len: 512,
            ..
        }
    ));
}

#[test]
fn a_sync_with_no_write_of_ours_to_cover_needs_no_request() {
    let mut sched = DiskSched::new(SchedConfig {
        ops_max: 4,
        bounces: 1,
        bounce_at: 8192,
        bounce_bytes: 4096,
        align: 512,
    });
    let sync = |slot, dev| DiskOp::Sync { slot, dev };
    let step = |sched: &mut DiskSched| {
        sched.pump();
        let mut v = Vec::new();
        while let Some(a) = sched.poll_action() {
            v.push(a);
        }
        v
    };
    // Nothing written: both finish at once.
    assert!(sched.take(0, sync(0, Dev::Origin), 0));
    assert!(sched.take(0, sync(0, Dev::Store), 0));
    let a = step(&mut sched);
    assert!(
        a.iter().all(|x| matches!(x, Action::Finished(f) if f.ok)),
        "{a:?}"
    );
    assert_eq!(sched.syncs_skipped(), 2);
    // An origin write completes: the origin's next sync is a request, the
    // store's is not.
    let w = DiskOp::Write {
        slot: 1,
        dev: Dev::Origin,
        dev_offset: 0,
        buf_offset: 0,
        len: 512,
    };
    assert!(sched.take(0, w, 0));
    let a = step(&mut sched);
    let Some(Action::Submit(Request::Write { id, .. })) = a.first().copied() else {
        panic!("{a:?}")
    };
    sched.complete(id, 512);
    assert!(sched.take(0, sync(2, Dev::Origin), 0));
    assert!(sched.take(0, sync(2, Dev::Store), 0));
    let a = step(&mut sched);
    let reqs: Vec<_> = a
        .iter()
        .filter_map(|x| match x {
            Action::Submit(r) => Some(*r),
            _ => None,
        })
        .collect();
    assert!(
        matches!(
            reqs[..],
            [Request::Sync {
                dev: Dev::Origin,
                ..
            }]
        ),
        "{a:?}"
    );
    assert_eq!(sched.syncs_skipped(), 3);
    // A failed sync covers nothing: the next one is a request again.
    let Request::Sync { id, .. } = reqs[0] else {
        unreachable!()
    };
    sched.complete(id, -5);
    assert!(sched.take(0, sync(3, Dev::Origin), 0));
    let a = step(&mut sched);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Submit(Request::Sync { .. }))),
        "{a:?}"
    );
    let Some(Request::Sync { id, .. }) = a.iter().find_map(|x| match x {
        Action::Submit(r) => Some(*r),
        _ => None,
    }) else {
        unreachable!()
    };
    sched.complete(id, 0);
    // Now covered: skipped.
    assert!(sched.take(0, sync(0, Dev::Origin), 0));
    let a = step(&mut sched);
    assert!(
        a.iter().all(|x| matches!(x, Action::Finished(f) if f.ok)),
        "{a:?}"
    );
    assert_eq!(sched.syncs_skipped(), 4);
}
