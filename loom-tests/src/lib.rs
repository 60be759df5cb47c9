//! loom models of every cross-thread hand-off in csnap.
//!
//! Run: `RUSTFLAGS="--cfg csnap_loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p csnap-loom-tests --release`
//! (`.ci/run` does). Without the cfg this crate is empty.
//!
//! Models:
//! - `ring`: the network thread / store worker hand-off (`csnap_io::ring::Ring`):
//!   FIFO delivery of everything pushed, a full ring refusing, and `close`
//!   waking a blocked consumer with nothing lost.
//!
//! Known blind spots of loom, which these models do not cover:
//! - loom explores interleavings up to the preemption bound (2 in CI), not all
//!   of them; bugs needing more preemptions can hide.
//! - `SeqCst` is modelled as acquire/release; fences are partly modelled.
//! - loom does not model spurious condvar wake-ups beyond what it schedules,
//!   nor time: code paths that depend on timeouts are not explored.
//! - Only the primitives behind `csnap_io::sync` are instrumented; mio's waker
//!   (an eventfd) and the kernel are outside the model.
//! - The sealed allocator's phase switch (`csnap_sys::alloc`) is one atomic
//!   store read by SeqCst loads; it is not modelled (std atomics, not loom's).
//!   The worker-ready hand-off before the seal uses a std channel and is
//!   covered by the sealed-server test instead.

#[cfg(all(test, csnap_loom))]
mod ring {
    use csnap_io::ring::{PopError, Ring};

    #[test]
    fn handoff_delivers_everything_in_order_then_close_wakes() {
        loom::model(|| {
            let r: Ring<u32> = Ring::with_capacity(2);
            let consumer = r.clone();
            let t = loom::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    match consumer.pop_blocking() {
                        Ok(x) => got.push(x),
                        Err(PopError::Closed) => break,
                        Err(PopError::Empty) => unreachable!("pop_blocking never returns Empty"),
                    }
                }
                got
            });
            let mut sent = Vec::new();
            for i in 0..3 {
                // A full ring gives the item back; the producer retries.
                let mut item = i;
                loop {
                    match r.push(item) {
                        Ok(()) => break,
                        Err(back) => {
                            item = back;
                            loom::thread::yield_now();
                        }
                    }
                }
                sent.push(i);
            }
            r.close();
            assert_eq!(t.join().unwrap(), sent);
        });
    }

    #[test]
    fn try_pop_never_loses_or_duplicates() {
        loom::model(|| {
            let r: Ring<u32> = Ring::with_capacity(1);
            let p = r.clone();
            let t = loom::thread::spawn(move || {
                let a = p.push(1).is_ok();
                let b = p.push(2).is_ok();
                (a, b)
            });
            let mut got = Vec::new();
            for _ in 0..2 {
                if let Ok(x) = r.try_pop() {
                    got.push(x);
                }
            }
            let (a, b) = t.join().unwrap();
            while let Ok(x) = r.try_pop() {
                got.push(x);
            }
            let mut expect = Vec::new();
            if a {
                expect.push(1);
            }
            if b {
                expect.push(2);
            }
            assert!(a, "the first push into an empty ring succeeds");
            assert_eq!(got, expect);
        });
    }
}
