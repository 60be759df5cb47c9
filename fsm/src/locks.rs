//! The server's read-lock table.
//!
//! A snapshot read of a chunk still on the origin takes a read lock on that
//! chunk for its connection (the *owner*); the client releases it after its
//! origin read completes. An origin write whose copy-out has committed checks
//! every chunk it covers; each locked chunk gets a *wait* naming the write's
//! *pending* reply, and the reply goes out when the last wait is satisfied. A
//! write never waits for a lock taken after its copy-out (readers that come
//! later see the exception and read the store), so writers cannot starve.
//!
//! Holds and waits belong to owners and pendings and are cleaned up with them:
//! `release_owner` when a connection goes away (and membership says its node
//! left), `cancel_pending` when the writer goes away.
//!
//! Everything lives in fixed slabs reserved at init. A full table is an error
//! the caller turns into a Busy reply.

use csnap_pools::slab::{Slab, U64Map};

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Lock {
    chunk: u64,
    holds_total: u32,
    hold_head: u32,
    wait_head: u32,
}

#[derive(Debug)]
struct Hold {
    lock: u32,
    owner: u32,
    count: u32,
    next_in_lock: u32,
    prev_of_owner: u32,
    next_of_owner: u32,
}

#[derive(Debug)]
struct Wait {
    lock: u32,
    pending: u32,
    next_in_lock: u32,
    prev_of_pending: u32,
    next_of_pending: u32,
}

/// The table is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// The owner holds no lock on that chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotHeld;

/// Sizes of the table.
#[derive(Debug, Clone, Copy)]
pub struct LockLimits {
    /// Distinct locked chunks and hold records.
    pub locks: usize,
    /// Wait records.
    pub waits: usize,
    /// Owner ids are `0..owners`.
    pub owners: usize,
    /// Pending ids are `0..pendings`.
    pub pendings: usize,
}

/// The read-lock table.
#[derive(Debug)]
pub struct LockTable {
    map: U64Map,
    locks: Slab<Lock>,
    holds: Slab<Hold>,
    waits: Slab<Wait>,
    owner_head: Vec<u32>,
    owner_holds: Vec<u32>,
    pending_head: Vec<u32>,
}

impl LockTable {
    /// Reserves every record. The only allocation.
    pub fn new(l: LockLimits) -> Self {
        LockTable {
            map: U64Map::with_capacity(l.locks),
            locks: Slab::with_capacity(l.locks),
            holds: Slab::with_capacity(l.locks),
            waits: Slab::with_capacity(l.waits),
            owner_head: vec![NIL; l.owners],
            owner_holds: vec![0; l.owners],
            pending_head: vec![NIL; l.pendings],
        }
    }

    /// Locked chunks.
    pub fn locked_chunks(&self) -> usize {
        self.locks.len()
    }

    /// Wait records in use.
    pub fn waits(&self) -> usize {
        self.waits.len()
    }

    /// Hold records of `owner`.
    pub fn holds_of(&self, owner: u32) -> u32 {
        self.owner_holds[owner as usize]
    }

    /// Whether `chunk` is read-locked.
    pub fn is_locked(&self, chunk: u64) -> bool {
        self.map.get(chunk).is_some()
    }

    /// Whether `n` more acquisitions are certain to fit.
    pub fn has_room(&self, n: usize) -> bool {
        self.locks.capacity() - self.locks.len() >= n
            && self.holds.capacity() - self.holds.len() >= n
    }

    /// Takes one read lock on `chunk` for `owner` (repeats add up).
    pub fn acquire(&mut self, chunk: u64, owner: u32) -> Result<(), Full> {
        let li = match self.map.get(chunk) {
            Some(li) => li,
            None => {
                if self.locks.is_full() || self.holds.is_full() {
                    return Err(Full);
                }
                let li = self
                    .locks
                    .insert(Lock {
                        chunk,
                        holds_total: 0,
                        hold_head: NIL,
                        wait_head: NIL,
                    })
                    .ok_or(Full)?;
                if !self.map.insert(chunk, li) {
                    self.locks.remove(li);
                    return Err(Full);
                }
                li
            }
        };
        // An existing hold of this owner?
        let mut h = self.locks.get(li).map_or(NIL, |l| l.hold_head);
        while h != NIL {
            let hold = self.holds.get_mut(h).expect("hold list is consistent");
            if hold.owner == owner {
                hold.count += 1;
                self.lock_mut(li).holds_total += 1;
                return Ok(());
            }
            h = hold.next_in_lock;
        }
        let head = self.lock_mut(li).hold_head;
        let owner_head = self.owner_head[owner as usize];
        let Some(hi) = self.holds.insert(Hold {
            lock: li,
            owner,
            count: 1,
            next_in_lock: head,
            prev_of_owner: NIL,
            next_of_owner: owner_head,
        }) else {
            self.drop_lock_if_idle(li);
            return Err(Full);
        };
        if owner_head != NIL {
            self.holds
                .get_mut(owner_head)
                .expect("owner list")
                .prev_of_owner = hi;
        }
        self.owner_head[owner as usize] = hi;
        self.owner_holds[owner as usize] += 1;
        let l = self.lock_mut(li);
        l.hold_head = hi;
        l.holds_total += 1;
        Ok(())
    }

    fn lock_mut(&mut self, li: u32) -> &mut Lock {
        self.locks.get_mut(li).expect("lock index is live")
    }

    fn drop_lock_if_idle(&mut self, li: u32) {
        let l = self.locks.get(li).expect("lock index is live");
        if l.holds_total == 0 && l.hold_head == NIL {
            debug_assert_eq!(l.wait_head, NIL);
            let chunk = l.chunk;
            self.map.remove(chunk);
            self.locks.remove(li);
        }
    }

    /// Releases one read lock of `owner` on `chunk`; pendings whose last wait
    /// this satisfies are passed to `ready`.
    pub fn release(
        &mut self,
        chunk: u64,
        owner: u32,
        ready: &mut dyn FnMut(u32),
    ) -> Result<(), NotHeld> {
        let li = self.map.get(chunk).ok_or(NotHeld)?;
        let mut prev = NIL;
        let mut h = self.locks.get(li).map_or(NIL, |l| l.hold_head);
        while h != NIL {
            let hold = self.holds.get(h).expect("hold list is consistent");
            if hold.owner == owner {
                break;
            }
            prev = h;
            h = hold.next_in_lock;
        }
        if h == NIL {
            return Err(NotHeld);
        }
        let hold = self.holds.get_mut(h).expect("hold");
        hold.count -= 1;
        let gone = hold.count == 0;
        self.lock_mut(li).holds_total -= 1;
        if gone {
            self.unlink_hold(li, prev, h);
        }
        self.maybe_wake(li, ready);
        Ok(())
    }

    fn unlink_hold(&mut self, li: u32, prev_in_lock: u32, h: u32) {
        let hold = self.holds.remove(h).expect("hold");
        if prev_in_lock == NIL {
            self.lock_mut(li).hold_head = hold.next_in_lock;
        } else {
            self.holds.get_mut(prev_in_lock).expect("hold").next_in_lock = hold.next_in_lock;
        }
        if hold.prev_of_owner == NIL {
            self.owner_head[hold.owner as usize] = hold.next_of_owner;
        } else {
            self.holds
                .get_mut(hold.prev_of_owner)
                .expect("hold")
                .next_of_owner = hold.next_of_owner;
        }
        if hold.next_of_owner != NIL {
            self.holds
                .get_mut(hold.next_of_owner)
                .expect("hold")
                .prev_of_owner = hold.prev_of_owner;
        }
        self.owner_holds[hold.owner as usize] -= 1;
    }

    fn maybe_wake(&mut self, li: u32, ready: &mut dyn FnMut(u32)) {
        let l = self.locks.get(li).expect("lock");
        if l.holds_total > 0 {
            return;
        }
        let mut w = l.wait_head;
        self.lock_mut(li).wait_head = NIL;
        while w != NIL {
            let wait = self.waits.remove(w).expect("wait");
            let p = wait.pending;
            // Unlink from the pending's list.
            if wait.prev_of_pending == NIL {
                self.pending_head[p as usize] = wait.next_of_pending;
            } else {
                self.waits
                    .get_mut(wait.prev_of_pending)
                    .expect("wait")
                    .next_of_pending = wait.next_of_pending;
            }
            if wait.next_of_pending != NIL {
                self.waits
                    .get_mut(wait.next_of_pending)
                    .expect("wait")
                    .prev_of_pending = wait.prev_of_pending;
            }
            if self.pending_head[p as usize] == NIL {
                ready(p);
            }
            w = wait.next_in_lock;
        }
        self.drop_lock_if_idle(li);
    }

    /// Releases every lock of `owner` (its client left the cluster, or its
    /// connection closed and it will not come back).
    pub fn release_owner(&mut self, owner: u32, ready: &mut dyn FnMut(u32)) {
        while self.owner_head[owner as usize] != NIL {
            let h = self.owner_head[owner as usize];
            let (li, count) = {
                let hold = self.holds.get(h).expect("hold");
                (hold.lock, hold.count)
            };
            // Find the predecessor in the lock's list.
            let mut prev = NIL;
            let mut x = self.locks.get(li).expect("lock").hold_head;
            while x != h {
                prev = x;
                x = self.holds.get(x).expect("hold").next_in_lock;
            }
            self.lock_mut(li).holds_total -= count;
            self.unlink_hold(li, prev, h);
            self.maybe_wake(li, ready);
        }
    }

    /// Whether a write waits for `chunk`.
    pub fn has_waiters(&self, chunk: u64) -> bool {
        self.map
            .get(chunk)
            .and_then(|li| self.locks.get(li))
            .is_some_and(|l| l.wait_head != NIL)
    }

    /// Calls `f` with every owner holding a lock on `chunk`.
    pub fn for_each_holder(&self, chunk: u64, f: &mut dyn FnMut(u32)) {
        let Some(li) = self.map.get(chunk) else {
            return;
        };
        let mut h = self.locks.get(li).map_or(NIL, |l| l.hold_head);
        while h != NIL {
            let hold = self.holds.get(h).expect("hold list is consistent");
            f(hold.owner);
            h = hold.next_in_lock;
        }
    }

    /// Read locks `owner` holds on `chunk`.
    pub fn hold_count(&self, chunk: u64, owner: u32) -> u32 {
        let Some(li) = self.map.get(chunk) else {
            return 0;
        };
        let mut h = self.locks.get(li).map_or(NIL, |l| l.hold_head);
        while h != NIL {
            let hold = self.holds.get(h).expect("hold list is consistent");
            if hold.owner == owner {
                return hold.count;
            }
            h = hold.next_in_lock;
        }
        0
    }

    /// Gives every lock of `from` to `to`, which must hold none (a client's
    /// locks parked while it is away, or adopted when it comes back).
    pub fn transfer_owner(&mut self, from: u32, to: u32) {
        assert_eq!(
            self.owner_head[to as usize], NIL,
            "transfer to an owner with locks"
        );
        let mut h = self.owner_head[from as usize];
        while h != NIL {
            let hold = self.holds.get_mut(h).expect("owner list");
            hold.owner = to;
            h = hold.next_of_owner;
        }
        self.owner_head[to as usize] = self.owner_head[from as usize];
        self.owner_head[from as usize] = NIL;
        self.owner_holds[to as usize] = self.owner_holds[from as usize];
        self.owner_holds[from as usize] = 0;
    }

    /// Makes `pending` wait for `chunk` if it is locked. Returns whether it
    /// waits.
    pub fn wait_if_locked(&mut self, chunk: u64, pending: u32) -> Result<bool, Full> {
        let Some(li) = self.map.get(chunk) else {
            return Ok(false);
        };
        let head = self.pending_head[pending as usize];
        let lock_head = self.locks.get(li).expect("lock").wait_head;
        let w = self
            .waits
            .insert(Wait {
                lock: li,
                pending,
                next_in_lock: lock_head,
                prev_of_pending: NIL,
                next_of_pending: head,
            })
            .ok_or(Full)?;
        if head != NIL {
            self.waits.get_mut(head).expect("wait").prev_of_pending = w;
        }
        self.pending_head[pending as usize] = w;
        self.lock_mut(li).wait_head = w;
        Ok(true)
    }

    /// Whether `pending` still waits for any lock.
    pub fn is_waiting(&self, pending: u32) -> bool {
        self.pending_head[pending as usize] != NIL
    }

    /// Drops every wait of `pending` (its connection went away).
    pub fn cancel_pending(&mut self, pending: u32) {
        while self.pending_head[pending as usize] != NIL {
            let w = self.pending_head[pending as usize];
            let wait = self.waits.remove(w).expect("wait");
            self.pending_head[pending as usize] = wait.next_of_pending;
            if wait.next_of_pending != NIL {
                self.waits
                    .get_mut(wait.next_of_pending)
                    .expect("wait")
                    .prev_of_pending = NIL;
            }
            // Unlink from the lock's list.
            let li = wait.lock;
            let mut prev = NIL;
            let mut x = self.locks.get(li).expect("lock").wait_head;
            while x != w {
                prev = x;
                x = self.waits.get(x).expect("wait").next_in_lock;
            }
            if prev == NIL {
                self.lock_mut(li).wait_head = wait.next_in_lock;
            } else {
                self.waits.get_mut(prev).expect("wait").next_in_lock = wait.next_in_lock;
            }
        }
    }

    /// Checks the table's internal consistency (counts and list links).
    pub fn assert_invariants(&self) {
        assert_eq!(
            self.map.len(),
            self.locks.len(),
            "lock map and slab disagree"
        );
        let mut holds = 0;
        for (li, l) in self.locks.iter() {
            assert_eq!(self.map.get(l.chunk), Some(li));
            let mut total = 0;
            let mut h = l.hold_head;
            while h != NIL {
                let hold = self.holds.get(h).expect("dangling hold");
                assert_eq!(hold.lock, li);
                assert!(hold.count > 0);
                total += hold.count;
                holds += 1;
                h = hold.next_in_lock;
            }
            assert_eq!(total, l.holds_total, "lock {} hold count drifted", l.chunk);
            assert!(
                l.holds_total > 0 || l.wait_head == NIL,
                "idle lock with waiters"
            );
        }
        assert_eq!(holds, self.holds.len(), "hold records leaked");
        let per_owner: u32 = self.owner_holds.iter().sum();
        assert_eq!(per_owner as usize, self.holds.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> LockTable {
        LockTable::new(LockLimits {
            locks: 8,
            waits: 8,
            owners: 4,
            pendings: 4,
        })
    }

    #[test]
    fn write_waits_for_every_reader_and_repeats() {
        let mut t = table();
        t.acquire(5, 0).unwrap();
        t.acquire(5, 0).unwrap();
        t.acquire(5, 1).unwrap();
        assert!(t.wait_if_locked(5, 2).unwrap());
        assert!(!t.wait_if_locked(6, 2).unwrap());
        let mut woken = Vec::new();
        t.release(5, 0, &mut |p| woken.push(p)).unwrap();
        t.release(5, 1, &mut |p| woken.push(p)).unwrap();
        assert!(woken.is_empty(), "one hold of owner 0 remains");
        t.release(5, 0, &mut |p| woken.push(p)).unwrap();
        assert_eq!(woken, vec![2]);
        assert!(!t.is_locked(5));
        assert_eq!(t.release(5, 0, &mut |_| {}), Err(NotHeld));
        t.assert_invariants();
    }

    #[test]
    fn a_pending_on_several_chunks_wakes_once_all_are_free() {
        let mut t = table();
        t.acquire(1, 0).unwrap();
        t.acquire(2, 1).unwrap();
        assert!(t.wait_if_locked(1, 3).unwrap());
        assert!(t.wait_if_locked(2, 3).unwrap());
        let mut woken = Vec::new();
        t.release(1, 0, &mut |p| woken.push(p)).unwrap();
        assert!(woken.is_empty() && t.is_waiting(3));
        t.release_owner(1, &mut |p| woken.push(p));
        assert_eq!(woken, vec![3]);
        assert_eq!(t.locked_chunks(), 0);
        t.assert_invariants();
    }

    #[test]
    fn cancelled_pending_is_never_woken_and_full_table_refuses() {
        let mut t = table();
        for c in 0..8 {
            t.acquire(c, 0).unwrap();
        }
        assert_eq!(t.acquire(100, 1), Err(Full));
        // An existing chunk needs no new lock, but a new hold record: full.
        assert_eq!(t.acquire(3, 1), Err(Full));
        assert!(t.wait_if_locked(3, 0).unwrap());
        t.cancel_pending(0);
        let mut woken = Vec::new();
        t.release_owner(0, &mut |p| woken.push(p));
        t.release_owner(1, &mut |p| woken.push(p));
        assert!(woken.is_empty());
        assert_eq!(t.locked_chunks(), 0);
        t.assert_invariants();
    }
}
