//! Snapshot deletion: the bounded walk that clears deleted snapshots' bits
//! from the tree and frees the chunks no one shares any more.

use crate::*;

impl<D: Disk> Store<D> {
    /// Whether snapshot space is being reclaimed.
    pub fn delete_pending(&self) -> bool {
        !self.sb.delete_walk_mask.is_empty() || !self.sb.deleting_mask().is_empty()
    }

    /// Runs one bounded step of snapshot deletion: clears the deleted bits
    /// from at most `max_records` records (and never more than the open
    /// transaction can hold), freeing chunks no snapshot uses any more.
    /// Crash-safe: the cursor moves in the same commit as the leaves.
    pub fn delete_step(&mut self, max_records: usize) -> Result<DeleteProgress, StoreError> {
        if self.sb.delete_walk_mask.is_empty() {
            if self.sb.deleting_mask().is_empty() {
                return Ok(DeleteProgress::Idle);
            }
            self.sb.delete_walk_mask = self.sb.deleting_mask();
            self.sb.delete_cursor = 0;
        }
        self.begin_op()?;
        let mut modified = false;
        let r = self.delete_step_inner(max_records, &mut modified);
        self.end_op(r, modified)
    }

    pub(crate) fn delete_step_inner(
        &mut self,
        max_records: usize,
        modified: &mut bool,
    ) -> Result<DeleteProgress, StoreError> {
        let walk = self.sb.delete_walk_mask;
        let mut done = 0usize;
        let mut cur = self.seek(self.sb.delete_cursor)?;
        let mut prev = None;
        while let Some(r) = self.next_record(&mut cur, u64::MAX)? {
            // A step ends between chunks once it has done its share (a
            // chunk's records, bounded by the snapshot count, are done
            // together: the cursor names a chunk, and a step resumed inside
            // a group walks its done records again), or anywhere when the
            // transaction is full (the next step resumes at this chunk).
            if (done >= max_records && prev != Some(r.chunk))
                || self.cache.dirty_count() + 3 + layout::TABLE_BLOCKS_MAX > self.tx_cap_blocks
                || self.pending_frees.len() >= TX_FREES_MAX
            {
                self.sb.delete_cursor = r.chunk;
                *modified = true;
                return Ok(DeleteProgress::Working);
            }
            prev = Some(r.chunk);
            done += 1;
            let nm = r.mask & !walk;
            if nm == r.mask {
                continue;
            }
            *modified = true;
            let (leaf, i) = (cur.path.leaf, cur.i - 1);
            self.cache.mark_dirty(leaf);
            let others = self.store_others(r.chunk, r.store, leaf, i)?;
            self.account(others | r.mask, others | nm)?;
            if nm.is_empty() {
                tree::leaf_remove(self.cache.buf_mut(leaf), i);
                cur.i = i;
                // The last record naming the chunk frees it.
                if others.is_empty() {
                    self.free(Area::Data, r.store)?;
                }
            } else {
                tree::leaf_set_mask(self.cache.buf_mut(leaf), i, nm);
            }
        }
        *modified = true;
        self.finish_delete_pass(walk)
    }

    /// The pass is complete: the walked bits are in no mask, their slots
    /// are free again.
    fn finish_delete_pass(&mut self, walk: Mask) -> Result<DeleteProgress, StoreError> {
        for b in walk.slots() {
            if self.sb.snaps[b].chunks != 0 {
                // The tree holds none of its bits any more, the table says
                // it still owns chunks.
                return Err(StoreError::Corrupt {
                    addr: layout::SUPER_BLOCK,
                    kind: BlockKind::Super,
                    fault: BlockFault::Structure {
                        reason: "a deleted snapshot's usage count disagrees with the tree",
                    },
                });
            }
            self.sb.snaps[b] = SnapSlot::FREE;
        }
        self.sb.delete_walk_mask = Mask::EMPTY;
        self.sb.delete_cursor = 0;
        Ok(if !self.sb.deleting_mask().is_empty() {
            DeleteProgress::Working
        } else {
            DeleteProgress::Idle
        })
    }

    /// Commits, then runs deletion steps (committing between them) until no
    /// deletion is pending. For tools and tests; a server interleaves steps
    /// with requests instead.
    pub fn reclaim(&mut self) -> Result<(), StoreError> {
        self.commit()?;
        while self.delete_step(usize::MAX)? == DeleteProgress::Working {
            self.commit()?;
        }
        self.commit()?;
        Ok(())
    }
}
