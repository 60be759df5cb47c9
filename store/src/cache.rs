//! The metadata cache: a fixed set of block buffers reserved at open.
//!
//! No-steal: a dirty block stays until its transaction commits. A block touched
//! by the running operation (its `stamp` equals the operation stamp) is never
//! evicted, so slot indices held across one operation stay valid. Eviction is a
//! clock sweep over clean, untouched slots; the index is open addressing with
//! linear probing and backward-shift deletion over a table sized at open.

use crate::disk::{Disk, DiskError};
use crate::layout::{self, BlockFault, BlockKind};
use csnap_pools::BLOCK_SIZE_BYTES;

const EMPTY_ADDR: u64 = u64::MAX;
const NO_SLOT: u32 = u32::MAX;

/// Why a cache access failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheError {
    /// The device failed.
    Disk(DiskError),
    /// The block read back fails verification.
    Fault {
        addr: u64,
        kind: BlockKind,
        fault: BlockFault,
    },
    /// Every slot is dirty or in use by the running operation.
    Full,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    addr: u64,
    dirty: bool,
    referenced: bool,
    stamp: u64,
}

/// The cache.
#[derive(Debug)]
pub struct Cache {
    bufs: crate::disk::IoBuf,
    slots: Vec<Slot>,
    index: Vec<u32>,
    index_mask: usize,
    hand: usize,
    dirty: usize,
    /// Stamp of the running operation.
    pub stamp: u64,
    /// Reads that missed, for statistics.
    pub misses: u64,
}

fn hash(addr: u64) -> usize {
    // Fibonacci hashing; the table size is a power of two.
    (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16) as usize
}

impl Cache {
    /// Reserves `nblocks` buffers and the index. The only allocation the cache
    /// ever makes.
    pub fn new(nblocks: usize) -> Cache {
        assert!(nblocks >= 2, "cache needs at least two slots");
        let table = (nblocks * 2).next_power_of_two();
        Cache {
            bufs: crate::disk::io_buf(nblocks * BLOCK_SIZE_BYTES),
            slots: vec![
                Slot {
                    addr: EMPTY_ADDR,
                    dirty: false,
                    referenced: false,
                    stamp: 0,
                };
                nblocks
            ],
            index: vec![NO_SLOT; table],
            index_mask: table - 1,
            hand: 0,
            dirty: 0,
            stamp: 1,
            misses: 0,
        }
    }

    /// Slots in the cache.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Dirty slots.
    pub fn dirty_count(&self) -> usize {
        self.dirty
    }

    /// Starts a new operation: earlier stamps no longer pin their slots.
    pub fn begin_op(&mut self) {
        self.stamp += 1;
    }

    fn find(&self, addr: u64) -> Option<usize> {
        let mut i = hash(addr) & self.index_mask;
        loop {
            let s = self.index[i];
            if s == NO_SLOT {
                return None;
            }
            if self.slots[s as usize].addr == addr {
                return Some(s as usize);
            }
            i = (i + 1) & self.index_mask;
        }
    }

    fn index_insert(&mut self, addr: u64, slot: usize) {
        let mut i = hash(addr) & self.index_mask;
        while self.index[i] != NO_SLOT {
            i = (i + 1) & self.index_mask;
        }
        self.index[i] = u32::try_from(slot).unwrap_or(NO_SLOT);
    }

    fn index_remove(&mut self, addr: u64) {
        let mut i = hash(addr) & self.index_mask;
        loop {
            let s = self.index[i];
            if s == NO_SLOT {
                return;
            }
            if self.slots[s as usize].addr == addr {
                break;
            }
            i = (i + 1) & self.index_mask;
        }
        // Backward-shift deletion keeps probe chains unbroken.
        let mut hole = i;
        let mut j = (i + 1) & self.index_mask;
        loop {
            let s = self.index[j];
            if s == NO_SLOT {
                break;
            }
            let home = hash(self.slots[s as usize].addr) & self.index_mask;
            // Move the entry at j into the hole if its home is not in (hole, j].
            let dist_home = j.wrapping_sub(home) & self.index_mask;
            let dist_hole = j.wrapping_sub(hole) & self.index_mask;
            if dist_home >= dist_hole {
                self.index[hole] = s;
                hole = j;
            }
            j = (j + 1) & self.index_mask;
        }
        self.index[hole] = NO_SLOT;
    }

    fn victim(&mut self) -> Result<usize, CacheError> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            let s = self.slots[i];
            if s.addr == EMPTY_ADDR {
                return Ok(i);
            }
            if s.dirty || s.stamp == self.stamp {
                continue;
            }
            if s.referenced {
                self.slots[i].referenced = false;
                continue;
            }
            self.index_remove(s.addr);
            self.slots[i].addr = EMPTY_ADDR;
            return Ok(i);
        }
        Err(CacheError::Full)
    }

    fn claim(&mut self, addr: u64) -> Result<usize, CacheError> {
        let i = self.victim()?;
        self.slots[i] = Slot {
            addr,
            dirty: false,
            referenced: true,
            stamp: self.stamp,
        };
        self.index_insert(addr, i);
        Ok(i)
    }

    /// Pins slot `i` for the running operation.
    pub fn pin(&mut self, i: usize) {
        self.slots[i].stamp = self.stamp;
    }

    /// The slot holding `addr`, read and verified as `kind` on a miss.
    pub fn get<D: Disk>(
        &mut self,
        disk: &mut D,
        addr: u64,
        kind: BlockKind,
    ) -> Result<usize, CacheError> {
        if let Some(i) = self.find(addr) {
            let s = &mut self.slots[i];
            s.referenced = true;
            s.stamp = self.stamp;
            let b = self.buf(i);
            if layout::kind(b) != Some(kind) {
                return Err(CacheError::Fault {
                    addr,
                    kind,
                    fault: BlockFault::Kind {
                        found: layout::get_u16(b, 8),
                    },
                });
            }
            return Ok(i);
        }
        self.misses += 1;
        let i = self.claim(addr)?;
        let off = addr * BLOCK_SIZE_BYTES as u64;
        let r = disk.read_at(self.buf_mut(i), off);
        let r = r.map_err(CacheError::Disk).and_then(|()| {
            layout::verify(self.buf(i), addr, kind)
                .map(|_| ())
                .map_err(|fault| CacheError::Fault { addr, kind, fault })
        });
        if let Err(e) = r {
            self.drop_slot(i);
            return Err(e);
        }
        Ok(i)
    }

    /// A slot for a newly allocated block at `addr`; contents zeroed, marked
    /// dirty.
    pub fn get_new(&mut self, addr: u64, kind: BlockKind) -> Result<usize, CacheError> {
        let i = match self.find(addr) {
            Some(i) => {
                self.slots[i].stamp = self.stamp;
                i
            }
            None => self.claim(addr)?,
        };
        let b = self.buf_mut(i);
        b.fill(0);
        layout::init_header(b, kind, addr);
        self.mark_dirty(i);
        Ok(i)
    }

    /// Forgets a clean slot: its block failed the caller's structural
    /// checks, so the next access reads (and checks) it again.
    pub fn forget(&mut self, i: usize) {
        debug_assert!(!self.slots[i].dirty);
        self.drop_slot(i);
    }

    fn drop_slot(&mut self, i: usize) {
        let a = self.slots[i].addr;
        if a != EMPTY_ADDR {
            self.index_remove(a);
        }
        if self.slots[i].dirty {
            self.dirty -= 1;
        }
        self.slots[i].addr = EMPTY_ADDR;
        self.slots[i].dirty = false;
    }

    /// Marks a slot dirty (part of the open transaction).
    pub fn mark_dirty(&mut self, i: usize) {
        if !self.slots[i].dirty {
            self.slots[i].dirty = true;
            self.dirty += 1;
        }
    }

    /// Whether a slot is dirty.
    pub fn is_dirty(&self, i: usize) -> bool {
        self.slots[i].dirty
    }

    /// Whether the block at `addr` is cached.
    pub fn contains(&self, addr: u64) -> bool {
        self.find(addr).is_some()
    }

    /// Whether the block at `addr` is cached and dirty.
    pub fn is_addr_dirty(&self, addr: u64) -> bool {
        self.find(addr).is_some_and(|i| self.slots[i].dirty)
    }

    /// The block address held in a slot.
    pub fn addr_of(&self, i: usize) -> u64 {
        self.slots[i].addr
    }

    /// Visits every dirty slot.
    pub fn dirty_slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.dirty)
            .map(|(i, _)| i)
    }

    /// Marks every dirty slot clean (after the commit is durable and home
    /// writes are issued).
    pub fn clean_all(&mut self) {
        for s in &mut self.slots {
            s.dirty = false;
        }
        self.dirty = 0;
    }

    /// Discards every dirty slot (transaction abort).
    pub fn discard_dirty(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].dirty {
                self.drop_slot(i);
            }
        }
        debug_assert_eq!(self.dirty, 0);
    }

    /// Discards every slot (after replay rewrote blocks underneath).
    pub fn discard_all(&mut self) {
        for i in 0..self.slots.len() {
            self.drop_slot(i);
        }
    }

    /// A slot's buffer.
    pub fn buf(&self, i: usize) -> &[u8] {
        &self.bufs[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES]
    }

    /// A slot's buffer, writable. The caller marks it dirty.
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES]
    }

    /// Two distinct slots' buffers, writable.
    pub fn two_mut(&mut self, a: usize, b: usize) -> (&mut [u8], &mut [u8]) {
        assert_ne!(a, b);
        let (lo, hi, swap) = if a < b { (a, b, false) } else { (b, a, true) };
        let (x, y) = self.bufs.split_at_mut(hi * BLOCK_SIZE_BYTES);
        let x = &mut x[lo * BLOCK_SIZE_BYTES..(lo + 1) * BLOCK_SIZE_BYTES];
        let y = &mut y[..BLOCK_SIZE_BYTES];
        if swap {
            (y, x)
        } else {
            (x, y)
        }
    }

    /// Checks the cache's internal invariants.
    pub fn assert_invariants(&self) {
        let mut dirty = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.addr != EMPTY_ADDR {
                assert_eq!(
                    self.find(s.addr),
                    Some(i),
                    "cache index lost block {}",
                    s.addr
                );
            }
            if s.dirty {
                dirty += 1;
            }
        }
        assert_eq!(dirty, self.dirty, "cache dirty count drifted");
    }
}
