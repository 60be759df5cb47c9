//! Where a commit is written: `commit` flushes the data, writes the
//! transaction to the journal, and writes the home copies back; `abort` drops
//! an open transaction.

use crate::*;

impl<D: Disk> Store<D> {
    /// Discards the open transaction.
    pub fn abort(&mut self) {
        self.cache.discard_dirty();
        self.sb = self.committed;
        self.pending_frees.clear();
        self.tx_ops = 0;
        self.poisoned = false;
        self.assert_invariants_full();
    }

    /// Makes the open transaction durable.
    ///
    /// 1. Apply pending frees to their (already dirty) bitmap blocks.
    /// 2. Flush the device: copy-out data written since the last commit, and
    ///    the previous commit's home writes, are durable first.
    /// 3. Write the commit block and every dirty block (superblock included)
    ///    to the journal ring in one write, then flush. This is the commit
    ///    point: replies may go out after it.
    /// 4. Write the blocks home. Their durability is assured by the next
    ///    commit's step 2, and replay redoes them until then.
    pub fn commit(&mut self) -> Result<CommitInfo, StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        if self.poisoned {
            return Err(StoreError::TxPoisoned);
        }
        if !self.is_dirty() {
            return Ok(CommitInfo {
                seq: self.committed.seq,
                blocks: 0,
                ops: 0,
            });
        }
        let r = self.commit_inner();
        match r {
            // Found before anything was written (the frees): the open
            // transaction is discarded, the store stays usable.
            Err(StoreError::Corrupt { .. }) => self.abort(),
            Err(_) => self.failed = true,
            Ok(_) => {}
        }
        self.assert_invariants_full();
        r
    }

    pub(crate) fn commit_inner(&mut self) -> Result<CommitInfo, StoreError> {
        // 1. Frees.
        for k in 0..self.pending_frees.len() {
            let f = self.pending_frees[k];
            let (start, _) = self.bitmap_geom(f.area);
            let addr = start + f.index / BITMAP_BITS_PER_BLOCK;
            let slot = self.cache.get(&mut self.disk, addr, BlockKind::Bitmap)?;
            assert!(
                self.cache.is_dirty(slot),
                "pending free lost its dirty bitmap block"
            );
            let was = clear_bit(self.cache.buf_mut(slot), f.index % BITMAP_BITS_PER_BLOCK);
            if !was {
                // Freed twice in one transaction: two records named the
                // same chunk. Nothing is written; `commit` aborts.
                return Err(StoreError::Corrupt {
                    addr,
                    kind: BlockKind::Bitmap,
                    fault: BlockFault::Structure {
                        reason: "two exceptions reference the same chunk (freed twice)",
                    },
                });
            }
            match f.area {
                Area::Meta => self.sb.meta_free += 1,
                Area::Data => self.sb.data_free += 1,
            }
        }
        self.pending_frees.clear();
        // Place the transaction in the ring.
        let n = self.cache.dirty_count() + 1;
        assert!(
            n <= TX_BLOCKS_MAX + 1,
            "transaction exceeds the journal's commit capacity"
        );
        let jb = self.label.journal_blocks;
        let mut start = self.sb.journal_next_slot;
        if start + 1 + n as u64 > jb {
            start = 0;
        }
        let end = start + 1 + n as u64;
        if self.committed.seq > 0 {
            // Never overwrite the last commit: replay may still need it.
            let (ls, le) = (
                self.committed.journal_last_slot,
                self.committed.journal_next_slot,
            );
            assert!(end <= ls || start >= le, "journal ring overrun");
        }
        let seq = self.committed.seq + 1;
        self.sb.seq = seq;
        self.sb.journal_last_slot = start;
        self.sb.journal_next_slot = end;
        // Stage: commit block, superblock, dirty blocks.
        let bs = BLOCK_SIZE_BYTES;
        self.entries.clear();
        {
            let img = &mut self.staging[bs..2 * bs];
            self.sb.encode(img);
            layout::seal(img, seq);
            self.entries.push(journal::Entry {
                home: layout::SUPER_BLOCK,
                crc: crc32c::crc32c(img),
            });
        }
        let mut k = 2;
        for slot in 0..self.cache.capacity() {
            if !self.cache.is_dirty(slot) {
                continue;
            }
            let home = self.cache.addr_of(slot);
            layout::seal(self.cache.buf_mut(slot), seq);
            let img = self.cache.buf(slot);
            self.staging[k * bs..(k + 1) * bs].copy_from_slice(img);
            self.entries.push(journal::Entry {
                home,
                crc: crc32c::crc32c(img),
            });
            k += 1;
        }
        assert_eq!(k, n + 1);
        journal::encode_commit(
            &mut self.staging[..bs],
            &self.label,
            start,
            seq,
            end,
            &self.entries,
        );
        // 2. Fencing: a newer incarnation on disk means another server took
        // the store over; write nothing. Under a lease, a fence read less
        // than one lease old stands (a claimer waits longer than the lease
        // before it reads anything, ARCHITECTURE 5.5): a busy server's
        // commits skip that read. Then data and previous home writes
        // durable.
        if self.lease.is_some() {
            self.within_lease()?;
        } else {
            self.check_fence()?;
        }
        // The flush orders copy-out data and the previous commit's home
        // writes before this journal write; with neither pending it is
        // skipped (the first commit after a start: the new incarnation).
        if self.data_written || !self.home_durable {
            self.disk.flush()?;
        }
        // 3. Journal write and the commit point (the flush above may have
        // outlasted the lease).
        self.within_lease()?;
        self.disk.write_at(
            &self.staging[..(n + 1) * bs],
            (self.label.journal_start + start) * BS,
        )?;
        self.disk.flush()?;
        self.data_written = false;
        // 4. Home writes.
        self.home_durable = false;
        self.within_lease()?;
        self.disk
            .write_at(&self.staging[bs..2 * bs], layout::SUPER_BLOCK * BS)?;
        for slot in 0..self.cache.capacity() {
            if self.cache.is_dirty(slot) {
                let home = self.cache.addr_of(slot);
                self.within_lease()?;
                self.disk.write_at(self.cache.buf(slot), home * BS)?;
            }
        }
        self.cache.clean_all();
        self.committed = self.sb;
        let ops = self.tx_ops;
        self.tx_ops = 0;
        Ok(CommitInfo {
            seq,
            blocks: n,
            ops,
        })
    }
}
