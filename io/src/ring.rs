//! A bounded hand-off between two threads: a ring of fixed capacity reserved
//! at init, under a mutex, with a condition variable for the consumer that
//! blocks. Pushing into a full ring returns the item (the producer bounds its
//! in-flight work so that this does not happen; if it does, it is
//! backpressure, not growth).
//!
//! The network thread and the store worker exchange requests and replies
//! through two of these. The consumer of replies is the network thread, which
//! must not block: it is woken through its event loop's waker instead and uses
//! `try_pop`.

use crate::sync::{Arc, Condvar, Mutex};

#[derive(Debug)]
struct State<T> {
    slots: Vec<Option<T>>,
    head: usize,
    len: usize,
    closed: bool,
    /// Consumers blocked in `pop_blocking`: a push signals the condvar only
    /// when one is waiting (the network thread is woken through its event
    /// loop instead, so a futex wake per reply would be wasted).
    sleepers: usize,
}

/// One end-agnostic handle to a shared ring.
#[derive(Debug)]
pub struct Ring<T> {
    inner: Arc<(Mutex<State<T>>, Condvar)>,
}

impl<T> Clone for Ring<T> {
    fn clone(&self) -> Self {
        Ring {
            inner: self.inner.clone(),
        }
    }
}

/// Why a pop returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopError {
    /// Nothing queued now.
    Empty,
    /// Nothing queued, and the ring was closed.
    Closed,
}

impl<T> Ring<T> {
    /// Reserves `capacity` slots. The only allocation.
    pub fn with_capacity(capacity: usize) -> Self {
        assert!(capacity > 0);
        let mut slots = Vec::with_capacity(capacity);
        slots.resize_with(capacity, || None);
        Ring {
            inner: Arc::new((
                Mutex::new(State {
                    slots,
                    head: 0,
                    len: 0,
                    closed: false,
                    sleepers: 0,
                }),
                Condvar::new(),
            )),
        }
    }

    /// Queues `item`; gives it back when the ring is full or closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let (m, cv) = &*self.inner;
        let mut s = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let cap = s.slots.len();
        if s.len == cap || s.closed {
            return Err(item);
        }
        let tail = (s.head + s.len) % cap;
        s.slots[tail] = Some(item);
        s.len += 1;
        let wake = s.sleepers > 0;
        drop(s);
        if wake {
            cv.notify_one();
        }
        Ok(())
    }

    /// Takes the oldest item without blocking.
    pub fn try_pop(&self) -> Result<T, PopError> {
        let (m, _) = &*self.inner;
        let mut s = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::pop_locked(&mut s)
    }

    fn pop_locked(s: &mut State<T>) -> Result<T, PopError> {
        if s.len == 0 {
            return Err(if s.closed {
                PopError::Closed
            } else {
                PopError::Empty
            });
        }
        let cap = s.slots.len();
        let head = s.head;
        let item = s.slots[head].take();
        s.head = (head + 1) % cap;
        s.len -= 1;
        item.ok_or(PopError::Empty)
    }

    /// Takes the oldest item, blocking while the ring is empty and open.
    pub fn pop_blocking(&self) -> Result<T, PopError> {
        let (m, cv) = &*self.inner;
        let mut s = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            match Self::pop_locked(&mut s) {
                Err(PopError::Empty) => {
                    s.sleepers += 1;
                    s = cv
                        .wait(s)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    s.sleepers -= 1;
                }
                r => return r,
            }
        }
    }

    /// Closes the ring: pushes fail, and a blocked consumer wakes once the
    /// queued items are taken.
    pub fn close(&self) {
        let (m, cv) = &*self.inner;
        let mut s = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.closed = true;
        drop(s);
        cv.notify_all();
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        let (m, _) = &*self.inner;
        m.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(csnap_loom)))]
mod tests {
    use super::*;

    #[test]
    fn fifo_bounded_and_closable() {
        let r = Ring::with_capacity(2);
        r.push(1).unwrap();
        r.push(2).unwrap();
        assert_eq!(r.push(3), Err(3), "a full ring gives the item back");
        assert_eq!(r.try_pop(), Ok(1));
        r.push(3).unwrap();
        assert_eq!(r.try_pop(), Ok(2));
        r.close();
        assert_eq!(r.push(4), Err(4));
        assert_eq!(r.pop_blocking(), Ok(3));
        assert_eq!(r.pop_blocking(), Err(PopError::Closed));
    }

    #[test]
    fn blocked_consumer_is_woken() {
        let r: Ring<u32> = Ring::with_capacity(4);
        let c = r.clone();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Ok(x) = c.pop_blocking() {
                got.push(x);
            }
            got
        });
        for i in 0..100 {
            while r.push(i).is_err() {
                std::thread::yield_now();
            }
        }
        r.close();
        assert_eq!(t.join().unwrap(), (0..100).collect::<Vec<_>>());
    }
}
