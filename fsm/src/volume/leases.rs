//! Snapshot reads and the lease cache: pins on cached mappings, leases the
//! server answered (idle ones too, read ahead), the reads' disk operations
//! along runs of one mapping, clock eviction and the releases sent back.

use csnap_proto::Range;

use super::{Dev, DiskOp, Io, Lease, QueryKind, Target, VolumeEngine};

impl VolumeEngine {
    pub(super) fn start_snapshot_read(&mut self, slot: u32) {
        let Some(io) = self.ios.get(slot).copied() else {
            return;
        };
        let (first, last) = self.chunks_of(&io);
        // Pin what the cache has; ask for runs of what it has not.
        let mut c = first;
        while c <= last {
            if self.pin(slot, first, c) {
                c += 1;
                continue;
            }
            let start = c;
            while c <= last
                && self.lease_index.get(c).is_none()
                && c - start < csnap_pools::CHUNKS_PER_REQUEST_MAX as u64
            {
                c += 1;
            }
            if c > last {
                // The run reaches the end of the read: ask for the
                // mappings of the chunks that follow too (a sequential
                // reader's next reads), as far as none is cached yet.
                let chunks = self.size.checked_div(self.chunk).unwrap_or(0);
                let ahead_end = (last + 1).saturating_add(self.cfg.read_ahead_chunks as u64);
                while c < ahead_end.min(chunks)
                    && self.lease_index.get(c).is_none()
                    && c - start < csnap_pools::CHUNKS_PER_REQUEST_MAX as u64
                {
                    c += 1;
                }
            }
            let r = Range {
                chunk: start,
                chunks: u32::try_from(c - start).unwrap_or(1),
            };
            self.query(slot, QueryKind::SnapshotRead, r, 0);
        }
        self.maybe_to_disk(slot);
    }

    /// Pins the lease on `c` for the read in `slot` (whose first chunk is
    /// `first`); `false` if there is none.
    pub(super) fn pin(&mut self, slot: u32, first: u64, c: u64) -> bool {
        let Some(i) = self.lease_index.get(c) else {
            return false;
        };
        let Some(l) = self.leases.get_mut(i) else {
            return false;
        };
        if l.in_use == 0 {
            self.unpinned -= 1;
        }
        l.in_use += 1;
        l.referenced = true;
        self.mark_pin(slot, first, c);
        true
    }

    pub(super) fn mark_pin(&mut self, slot: u32, first: u64, c: u64) {
        if let Some(io) = self.ios.get_mut(slot) {
            let k = usize::try_from(c - first).unwrap_or(usize::MAX);
            if let Some(w) = io.pins.get_mut(k / 64) {
                *w |= 1 << (k % 64);
            }
        }
    }

    /// A lease answered by the server for the read in `slot` (pinned by
    /// it).
    pub(super) fn add_lease(&mut self, slot: u32, first: u64, c: u64, target: Target) {
        if let Some(i) = self.lease_index.get(c) {
            // Another read of ours asked too: one more hold, same mapping
            // (both answers came while the chunk was locked by us).
            if let Some(l) = self.leases.get_mut(i) {
                l.holds += 1;
                if l.in_use == 0 {
                    self.unpinned -= 1;
                }
                l.in_use += 1;
                l.target = target;
            }
            self.mark_pin(slot, first, c);
            return;
        }
        let lease = Lease {
            chunk: c,
            target,
            holds: 1,
            in_use: 1,
            release_asked: false,
            referenced: true,
        };
        match self.leases.insert(lease) {
            Some(i) => {
                let ok = self.lease_index.insert(c, i);
                assert!(ok, "lease index sized like the lease slab");
                self.mark_pin(slot, first, c);
            }
            None => {
                // Cannot happen: the slab holds every pinned chunk of every
                // I/O plus the idle cache. Give the lock back.
                self.queue_release(c, 1);
            }
        }
    }

    /// A lease read ahead (past the end of the read that asked): idle from
    /// the start.
    pub(super) fn add_idle_lease(&mut self, c: u64, target: Target) {
        if let Some(i) = self.lease_index.get(c) {
            if let Some(l) = self.leases.get_mut(i) {
                l.holds += 1;
                l.target = target;
            }
            return;
        }
        let lease = Lease {
            chunk: c,
            target,
            holds: 1,
            in_use: 0,
            release_asked: false,
            referenced: true,
        };
        match self.leases.insert(lease) {
            Some(i) => {
                let ok = self.lease_index.insert(c, i);
                assert!(ok, "lease index sized like the lease slab");
                self.unpinned += 1;
            }
            None => self.queue_release(c, 1),
        }
    }

    pub(super) fn snapshot_read_to_disk(&mut self, slot: u32) {
        let Some(io) = self.ios.get(slot).copied() else {
            return;
        };
        let (first, last) = self.chunks_of(&io);
        let mut c = first;
        while c <= last {
            let target = self
                .lease_index
                .get(c)
                .and_then(|i| self.leases.get(i))
                .map_or(Target::Origin, |l| l.target);
            // Extend the run while the next chunk continues the mapping.
            let mut n = 1u64;
            while c + n <= last {
                let next = self
                    .lease_index
                    .get(c + n)
                    .and_then(|i| self.leases.get(i))
                    .map(|l| l.target);
                let continues = match (target, next) {
                    (Target::Origin, Some(Target::Origin)) => true,
                    (Target::Store(a), Some(Target::Store(b))) => b == a + n,
                    _ => false,
                };
                if !continues {
                    break;
                }
                n += 1;
            }
            let chunks = u32::try_from(n).unwrap_or(1);
            match target {
                Target::Origin => {
                    let start = (c * self.chunk).max(io.offset);
                    let end = ((c + n) * self.chunk).min(io.offset + u64::from(io.len));
                    self.disk(DiskOp::Read {
                        slot,
                        dev: Dev::Origin,
                        dev_offset: start,
                        buf_offset: u32::try_from(start - io.offset).unwrap_or(0),
                        len: u32::try_from(end - start).unwrap_or(0),
                    });
                }
                Target::Store(s) => self.store_runs_to_disk(slot, &io, c, chunks, s, false),
            }
            c += n;
        }
        self.maybe_complete(slot);
    }

    pub(super) fn unpin_io(&mut self, io: &Io) {
        let (first, last) = self.chunks_of(io);
        for c in first..=last {
            let k = usize::try_from(c - first).unwrap_or(usize::MAX);
            if io.pins.get(k / 64).is_none_or(|w| w & (1 << (k % 64)) == 0) {
                continue;
            }
            let Some(i) = self.lease_index.get(c) else {
                continue;
            };
            let Some(l) = self.leases.get_mut(i) else {
                continue;
            };
            if l.in_use == 0 {
                continue;
            }
            l.in_use -= 1;
            if l.in_use == 0 {
                self.unpinned += 1;
                if l.release_asked {
                    self.drop_lease(i);
                }
            }
        }
        self.evict();
    }

    /// Keeps idle leases within `cached_chunks` (clock order).
    pub(super) fn evict(&mut self) {
        let cap = u32::try_from(self.leases.capacity()).unwrap_or(u32::MAX);
        let mut steps = 0u32;
        while self.unpinned > self.cfg.cached_chunks && steps < 2 * cap {
            steps += 1;
            let i = self.clock;
            self.clock = (self.clock + 1) % cap.max(1);
            let Some(l) = self.leases.get_mut(i) else {
                continue;
            };
            if l.in_use > 0 {
                continue;
            }
            if l.referenced {
                l.referenced = false;
                continue;
            }
            self.drop_lease(i);
        }
    }

    /// Gives every idle lease back (the server's lock table is full).
    pub(super) fn release_idle_leases(&mut self) {
        for i in 0..u32::try_from(self.leases.capacity()).unwrap_or(0) {
            if self.leases.get(i).is_some_and(|l| l.in_use == 0) {
                self.drop_lease(i);
            }
        }
    }

    /// Removes an idle lease and queues the release of its holds.
    pub(super) fn drop_lease(&mut self, i: u32) {
        let Some(l) = self.leases.remove(i) else {
            return;
        };
        debug_assert_eq!(l.in_use, 0);
        self.unpinned -= 1;
        self.lease_index.remove(l.chunk);
        self.queue_release(l.chunk, l.holds);
    }

    pub(super) fn queue_release(&mut self, c: u64, holds: u32) {
        for _ in 0..holds {
            if self.release_len == self.release_buf.len() {
                self.flush_releases();
            }
            self.release_buf[self.release_len] = Range {
                chunk: c,
                chunks: 1,
            };
            self.release_len += 1;
        }
    }

    /// Sends the queued releases (one `FinishSnapshotRead` per batch; the
    /// client FSM drops the holds from its upload table and sends the frame
    /// while connected).
    pub(super) fn flush_releases(&mut self) {
        let n = self.release_len;
        self.release_len = 0;
        if n > 0 {
            self.client.release_ranges(&self.release_buf[..n]);
        }
    }
}
