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
        // Chunks written for the discarded operations are free again; their
        // checksums go. Unverified data keeps its flush (harmless), and a
        // commit a snapshot write asked for is still owed.
        self.tx_data.clear();
        self.assert_invariants_full();
    }

    /// Makes the open transaction durable.
    ///
    /// 1. Apply pending frees to their (already dirty) bitmap blocks.
    /// 2. If data was written that this commit cannot vouch for by checksum
    ///    (a chunk a client will write into, more chunks than one block
    ///    lists, writes through `disk_mut`), flush the device first.
    /// 3. Write the commit block, the data-checksum block (when the commit
    ///    vouches for copy-outs) and every dirty block (superblock included)
    ///    to the journal ring in one write, then flush: one flush covers the
    ///    copy-out data, the previous commit's home writes and this journal
    ///    write. This is the commit point: replies may go out after it.
    /// 4. Write the blocks home. Their durability is assured by the next
    ///    commit's flush, and replay redoes them until then (the ring keeps
    ///    the last two commits for that).
    pub fn commit(&mut self) -> Result<CommitInfo, StoreError> {
        let info = self.commit_journal()?;
        self.write_home()?;
        Ok(info)
    }

    /// `commit` up to its commit point (steps 1 to 3): replies may go out
    /// when it returns. The home writes (step 4) are left for `write_home`,
    /// which the caller runs after sending them, off the replies' path;
    /// until then nothing else runs on the store (every operation, and the
    /// next commit, writes them first), so no block is read back from a
    /// home that is not written yet.
    pub fn commit_journal(&mut self) -> Result<CommitInfo, StoreError> {
        self.write_home()?;
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
                Area::Data => {
                    self.sb.data_free += 1;
                    // Free again once this commit is durable: whatever is
                    // written there next must not be checked against the
                    // copy this transaction made.
                    self.tx_data.retain(|e| e.chunk != f.index);
                }
            }
        }
        self.pending_frees.clear();
        if self.pre_flush {
            self.tx_data.clear();
        }
        self.stage_table()?;
        // Place the transaction in the ring: commit block, data-checksum
        // block, superblock, dirty blocks.
        let n = self.cache.dirty_count() + 1;
        assert!(
            n <= TX_BLOCKS_MAX + 1,
            "transaction exceeds the journal's commit capacity"
        );
        let h = journal::head_blocks(self.tx_data.len());
        let jb = self.label.journal_blocks;
        let mut start = self.sb.journal_next_slot;
        if start + (h + n) as u64 > jb {
            start = 0;
        }
        let end = start + (h + n) as u64;
        // Never overwrite the last commit: replay may still need it. The one
        // before it is needed while the last one's home writes are not
        // durable; a commit that would overwrite it flushes first (only in
        // a small ring: three largest commits and a wrap fit in the default).
        let last = (self.committed.seq > 0).then_some((
            self.committed.journal_last_slot,
            self.committed.journal_next_slot,
        ));
        let overlaps = |r: Option<(u64, u64)>| r.is_some_and(|(ls, le)| end > ls && start < le);
        assert!(!overlaps(last), "journal ring overrun");
        let flush_first = self.pre_flush || overlaps(self.prev_commit);
        let seq = self.committed.seq + 1;
        self.sb.seq = seq;
        self.sb.journal_last_slot = start;
        self.sb.journal_next_slot = end;
        // Stage: commit block (and data-checksum block), superblock, dirty
        // blocks.
        let bs = BLOCK_SIZE_BYTES;
        self.entries.clear();
        {
            let img = &mut self.staging[h * bs..(h + 1) * bs];
            self.sb.encode(img);
            layout::seal(img, seq);
            self.entries.push(journal::Entry {
                home: layout::SUPER_BLOCK,
                crc: crc32c::crc32c(img),
            });
        }
        // Dirty blocks in home order, so that blocks with adjacent homes
        // (the snapshot table's) are adjacent in the staging buffer and go
        // home in one write (`write_home`).
        let mut order = [(0u64, 0usize); TX_BLOCKS_MAX];
        let mut m = 0;
        for slot in 0..self.cache.capacity() {
            if self.cache.is_dirty(slot) {
                order[m] = (self.cache.addr_of(slot), slot);
                m += 1;
            }
        }
        order[..m].sort_unstable();
        let mut k = h + 1;
        for &(home, slot) in &order[..m] {
            layout::seal(self.cache.buf_mut(slot), seq);
            let img = self.cache.buf(slot);
            self.staging[k * bs..(k + 1) * bs].copy_from_slice(img);
            self.entries.push(journal::Entry {
                home,
                crc: crc32c::crc32c(img),
            });
            k += 1;
        }
        assert_eq!(k, h + n);
        journal::encode_commit(
            &mut self.staging[..h * bs],
            &self.label,
            start,
            seq,
            end,
            &self.entries,
            &self.tx_data,
        );
        // 2. Fencing: a newer incarnation on disk means another server took
        // the store over; write nothing. Under a lease, a fence read less
        // than one lease old stands (a claimer waits longer than the lease
        // before it reads anything, ARCHITECTURE 5.5): a busy server's
        // commits skip that read.
        if self.lease.is_some() {
            self.within_lease()?;
        } else {
            self.check_fence()?;
        }
        // Data the commit cannot vouch for is made durable first (and the
        // last commit's home writes, when this one overwrites the one
        // before it).
        if flush_first {
            self.disk.flush()?;
        }
        // 3. Journal write and the commit point (the flush above may have
        // outlasted the lease).
        self.within_lease()?;
        self.disk.write_at(
            &self.staging[..(h + n) * bs],
            (self.label.journal_start + start) * BS,
        )?;
        self.disk.flush()?;
        self.pre_flush = false;
        self.must_commit = false;
        self.last_data.clear();
        for e in &self.tx_data {
            self.last_data.push(e.chunk);
        }
        self.tx_data.clear();
        self.prev_commit = last;
        // 4. Home writes, from the staged images (`write_home`).
        self.home_pending = Some(h);
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

    /// Puts the snapshot table blocks whose slots (or address) changed in
    /// this transaction into the cache as dirty images, so the commit
    /// journals them like tree blocks. A table block is rewritten whole
    /// from memory, never read.
    fn stage_table(&mut self) -> Result<(), StoreError> {
        if !self.sb.table_in_blocks() {
            return Ok(());
        }
        for k in 0..layout::TABLE_BLOCKS_MAX {
            let r = Super::table_range(k);
            if self.sb.table[k] == self.committed.table[k]
                && self.sb.snaps[r.clone()] == self.committed.snaps[r]
            {
                continue;
            }
            let slot = self.cache.get_new(self.sb.table[k], BlockKind::SnapTable)?;
            self.sb.encode_table_block(k, self.cache.buf_mut(slot));
        }
        Ok(())
    }

    /// Moves a version-1 store's snapshot table (inside the superblock)
    /// into table blocks allocated from the metadata area, in the open
    /// transaction: the next commit writes them and a version-2
    /// superblock. A crash before that commit leaves the version-1 store.
    pub(crate) fn upgrade_table(&mut self) -> Result<(), StoreError> {
        self.cache.begin_op();
        let mut table = [0u64; layout::TABLE_BLOCKS_MAX];
        for a in table.iter_mut() {
            *a = self.alloc_meta()?;
        }
        self.sb.table = table;
        Ok(())
    }

    /// Step 4 of the last commit, if `commit_journal` left it: every image
    /// of the commit written to its home, from the journal staging buffer
    /// (the images as committed: the cache may have moved on). Their
    /// durability comes with the next commit's flush; until then replay
    /// redoes them. A failure fails the store (the commit itself stands).
    pub fn write_home(&mut self) -> Result<(), StoreError> {
        let Some(h) = self.home_pending.take() else {
            return Ok(());
        };
        let r = self.write_home_inner(h);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// One write per run of images whose homes are adjacent (staged in
    /// home order by `commit_inner`).
    fn write_home_inner(&mut self, h: usize) -> Result<(), StoreError> {
        let bs = BLOCK_SIZE_BYTES;
        let n = self.entries.len();
        let mut i = 0;
        while i < n {
            let home = self.entries[i].home;
            let mut j = i + 1;
            while j < n && self.entries[j].home == home + (j - i) as u64 {
                j += 1;
            }
            self.within_lease()?;
            let imgs = &self.staging[(h + i) * bs..(h + j) * bs];
            self.disk.write_at(imgs, home * BS)?;
            i = j;
        }
        Ok(())
    }
}
