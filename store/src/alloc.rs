//! Where chunks and metadata blocks are allocated and freed: the bitmap scans
//! of the metadata and data areas, the usage accounting of share masks, and
//! the store-full policy.

use crate::*;

pub(crate) fn set_bit(b: &mut [u8], bit: u64) {
    let byte = HEADER_BYTES + usize::try_from(bit / 8).unwrap_or(0);
    b[byte] |= 1 << (bit % 8);
}

pub(crate) fn clear_bit(b: &mut [u8], bit: u64) -> bool {
    let byte = HEADER_BYTES + usize::try_from(bit / 8).unwrap_or(0);
    let was = b[byte] & (1 << (bit % 8)) != 0;
    b[byte] &= !(1 << (bit % 8));
    was
}

/// Tests a bit of a bitmap block image.
pub fn test_bit(b: &[u8], bit: u64) -> bool {
    let byte = HEADER_BYTES + usize::try_from(bit / 8).unwrap_or(0);
    b[byte] & (1 << (bit % 8)) != 0
}

impl<D: Disk> Store<D> {
    pub(crate) fn bitmap_geom(&self, area: Area) -> (u64, u64) {
        match area {
            Area::Meta => (self.label.meta_bitmap_start, self.label.meta_blocks),
            Area::Data => (self.label.data_bitmap_start, self.label.data_chunks),
        }
    }

    pub(crate) fn alloc(&mut self, area: Area) -> Result<u64, StoreError> {
        let (start, size) = self.bitmap_geom(area);
        let (free, cursor) = match area {
            Area::Meta => (self.sb.meta_free, self.sb.meta_cursor),
            Area::Data => (self.sb.data_free, self.sb.data_cursor),
        };
        if free == 0 {
            return Err(match area {
                Area::Meta => StoreError::MetadataFull,
                Area::Data => StoreError::StoreFull,
            });
        }
        let mut idx = if cursor >= size { 0 } else { cursor };
        let mut scanned = 0u64;
        // One lap over the area at most (plus the partial block we start in).
        while scanned <= size + BITMAP_BITS_PER_BLOCK {
            let blk = idx / BITMAP_BITS_PER_BLOCK;
            let slot = self.block(start + blk, BlockKind::Bitmap)?;
            let b = self.cache.buf(slot);
            let mut bit = idx % BITMAP_BITS_PER_BLOCK;
            while bit < BITMAP_BITS_PER_BLOCK {
                let byte = HEADER_BYTES + usize::try_from(bit / 8).unwrap_or(0);
                if bit.is_multiple_of(8) && b[byte] == 0xff {
                    bit += 8;
                    continue;
                }
                if !test_bit(b, bit) {
                    let found = blk * BITMAP_BITS_PER_BLOCK + bit;
                    if found < size {
                        self.cache.mark_dirty(slot);
                        set_bit(self.cache.buf_mut(slot), bit);
                        match area {
                            Area::Meta => {
                                self.sb.meta_free -= 1;
                                self.sb.meta_cursor = found + 1;
                            }
                            Area::Data => {
                                self.sb.data_free -= 1;
                                self.sb.data_cursor = found + 1;
                            }
                        }
                        return Ok(found);
                    }
                }
                bit += 1;
            }
            let next = (blk + 1) * BITMAP_BITS_PER_BLOCK;
            scanned += next - idx;
            idx = if next >= size { 0 } else { next };
        }
        // The free count says there is room, the bitmap says not.
        Err(StoreError::Corrupt {
            addr: start,
            kind: BlockKind::Bitmap,
            fault: BlockFault::Checksum,
        })
    }

    pub(crate) fn alloc_meta(&mut self) -> Result<u64, StoreError> {
        let i = self.alloc(Area::Meta)?;
        let addr = self.label.meta_start + i;
        // Tree blocks are never freed (and an aborted allocation leaves the
        // cache), so a cached block handed out again is one the tree uses
        // while the bitmap says it is free: reusing it would overwrite a
        // block on the path (and two cache views of one slot).
        if self.cache.contains(addr) {
            return Err(StoreError::Corrupt {
                addr: self.label.meta_bitmap_start + i / BITMAP_BITS_PER_BLOCK,
                kind: BlockKind::Bitmap,
                fault: BlockFault::Structure {
                    reason: "a tree block in use is free in the bitmap",
                },
            });
        }
        Ok(addr)
    }

    /// Schedules a free: the bit is cleared by the commit, so the chunk cannot
    /// be reused before the commit that frees it is durable. Its bitmap block
    /// is dirtied now so the transaction budget counts it.
    pub(crate) fn free(&mut self, area: Area, index: u64) -> Result<(), StoreError> {
        assert!(self.pending_frees.len() < TX_FREES_MAX);
        let (start, _) = self.bitmap_geom(area);
        let addr = start + index / BITMAP_BITS_PER_BLOCK;
        let slot = self.block(addr, BlockKind::Bitmap)?;
        if !test_bit(self.cache.buf(slot), index % BITMAP_BITS_PER_BLOCK) {
            // The tree references it, the bitmap says it is free.
            return Err(StoreError::Corrupt {
                addr,
                kind: BlockKind::Bitmap,
                fault: BlockFault::Structure {
                    reason: "a chunk the tree references is free in the bitmap",
                },
            });
        }
        self.cache.mark_dirty(slot);
        self.pending_frees.push(Free { area, index });
        Ok(())
    }

    /// Moves usage counts from share mask `old` to `new`. Counts that
    /// disagree with the tree (a count would go below zero, or a snapshot
    /// would hold more unique chunks than chunks) are corruption of the
    /// superblock's table; every caller has modified the transaction by
    /// then, so the error poisons it and it is aborted.
    pub(crate) fn account(&mut self, old: Mask, new: Mask) -> Result<(), StoreError> {
        let bad = || StoreError::Corrupt {
            addr: layout::SUPER_BLOCK,
            kind: BlockKind::Super,
            fault: BlockFault::Structure {
                reason: "a snapshot's usage count disagrees with the tree",
            },
        };
        for b in (old & !new).slots() {
            let s = &mut self.sb.snaps[b];
            s.chunks = s.chunks.checked_sub(1).ok_or_else(bad)?;
        }
        for b in (new & !old).slots() {
            let s = &mut self.sb.snaps[b];
            s.chunks = s.chunks.checked_add(1).ok_or_else(bad)?;
        }
        if let Some(b) = old.single() {
            let s = &mut self.sb.snaps[b];
            s.unique_chunks = s.unique_chunks.checked_sub(1).ok_or_else(bad)?;
        }
        let new_single = new.single();
        if let Some(b) = new_single {
            let s = &mut self.sb.snaps[b];
            s.unique_chunks = s.unique_chunks.checked_add(1).ok_or_else(bad)?;
        }
        // Only a count that went down (`old & !new`) or a unique count that
        // went up (a single-bit `new`) can break unique <= chunks.
        let mut touched = old & !new;
        if new_single.is_some() {
            touched |= new;
        }
        for b in touched.slots() {
            let s = &self.sb.snaps[b];
            if s.unique_chunks > s.chunks {
                return Err(bad());
            }
        }
        Ok(())
    }

    pub(crate) fn alloc_data(&mut self, modified: &mut bool) -> Result<u64, StoreError> {
        if self.sb.data_free == 0 {
            return Err(self.store_full(modified));
        }
        if self.sb.meta_free < TREE_DEPTH_MAX as u64 + 2 {
            return Err(StoreError::MetadataFull);
        }
        self.alloc(Area::Data)
    }

    pub(crate) fn store_full(&mut self, modified: &mut bool) -> StoreError {
        if self.label.policy == StoreFullPolicy::Refuse {
            return StoreError::StoreFull;
        }
        if !self.sb.deleting_mask().is_empty() {
            return StoreError::Reclaiming { victim: None };
        }
        let victim = self
            .sb
            .snaps
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.state == SlotState::Live
                    && s.priority != PRIORITY_NEVER_DELETE
                    && !self.in_use_mask.contains(*i)
            })
            .min_by_key(|(i, s)| (s.priority, s.ctime_secs, *i))
            .map(|(_, s)| s.tag);
        match victim {
            Some(tag) => {
                *modified = true;
                self.mark_deleted(tag);
                StoreError::Reclaiming { victim: Some(tag) }
            }
            None => StoreError::StoreFull,
        }
    }
}
