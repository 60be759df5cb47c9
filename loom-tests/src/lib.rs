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
//! - `phase`: the heap phase switch (`csnap_sys::phase::PhaseCell`, the
//!   sealed allocator's state) and the worker-ready hand-off before the
//!   seal: the store worker's init never runs in the sealed phase. A negative
//!   control seals before waiting and must fail (it is the race the sealed
//!   test once found).
//! - `wakeup`: the completion wake-up contract between the store worker and
//!   the network loop (push the reply, then wake; the loop drains the ring
//!   after every wake), with the mio Waker modelled as a flag and a condvar.
//!
//! Known blind spots of loom, which these models do not cover:
//! - loom explores interleavings up to the preemption bound (2 in CI), not all
//!   of them; bugs needing more preemptions can hide.
//! - `SeqCst` is modelled as acquire/release; fences are partly modelled.
//! - loom does not model spurious condvar wake-ups beyond what it schedules,
//!   nor time: code paths that depend on timeouts are not explored.
//! - Only the primitives behind `csnap_io::sync` are instrumented; mio's waker
//!   (an eventfd) and the kernel are outside the model.
//! - The mio Waker itself (an eventfd read by epoll) is outside the model:
//!   `wakeup` models the contract the loop relies on (a wake after a push is
//!   never lost), not mio's implementation. The worker-ready hand-off in the
//!   server uses a std channel; `phase` models it with the loom ring.

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

#[cfg(all(test, csnap_loom))]
mod phase {
    use csnap_io::ring::Ring;
    use csnap_sys::phase::PhaseCell;
    use loom::sync::Arc;

    fn model(seal_first: bool) {
        loom::model(move || {
            let phases = Arc::new(PhaseCell::new());
            let ready: Ring<()> = Ring::with_capacity(1);
            let (p, r) = (phases.clone(), ready.clone());
            let worker = loom::thread::spawn(move || {
                // The worker's init (thread start, its batch buffer) must not
                // run sealed.
                assert!(!p.is_sealed(), "the worker's init ran in the sealed phase");
                r.push(()).unwrap();
            });
            if seal_first {
                phases.seal();
                ready.pop_blocking().unwrap();
            } else {
                ready.pop_blocking().unwrap();
                assert_eq!(phases.seal(), csnap_sys::phase::INIT);
            }
            worker.join().unwrap();
            assert!(phases.is_sealed());
        });
    }

    #[test]
    fn the_heap_is_sealed_only_after_the_worker_is_ready() {
        model(false);
    }

    #[test]
    #[should_panic(expected = "sealed phase")]
    fn sealing_before_the_worker_is_ready_is_caught() {
        model(true);
    }
}

#[cfg(all(test, csnap_loom))]
mod wakeup {
    use csnap_io::ring::{PopError, Ring};
    use loom::sync::{Arc, Condvar, Mutex};

    /// The mio Waker as the loop sees it: a wake sets a flag the next poll
    /// returns and clears.
    struct Waker {
        flag: Mutex<bool>,
        cv: Condvar,
    }

    #[test]
    fn a_reply_pushed_before_a_wake_is_always_drained() {
        loom::model(|| {
            let replies: Ring<u32> = Ring::with_capacity(2);
            let waker = Arc::new(Waker {
                flag: Mutex::new(false),
                cv: Condvar::new(),
            });
            let (r, w) = (replies.clone(), waker.clone());
            let worker = loom::thread::spawn(move || {
                for i in 0..2 {
                    r.push(i).unwrap();
                    // wake(): after the push.
                    *w.flag.lock().unwrap() = true;
                    w.cv.notify_one();
                }
            });
            // The loop: poll (wait for a wake), then drain everything.
            let mut got = Vec::new();
            while got.len() < 2 {
                {
                    let mut f = waker.flag.lock().unwrap();
                    while !*f {
                        f = waker.cv.wait(f).unwrap();
                    }
                    *f = false;
                }
                loop {
                    match replies.try_pop() {
                        Ok(x) => got.push(x),
                        Err(PopError::Empty) | Err(PopError::Closed) => break,
                    }
                }
            }
            worker.join().unwrap();
            assert_eq!(got, vec![0, 1]);
        });
    }
}
