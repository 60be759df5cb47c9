//! What a write must do before it may land: the copy-out an origin write
//! needs (`prepare_origin_write`), the chunk a snapshot write goes to
//! (`prepare_snapshot_write`), and the data write itself (`write_data`).

use crate::*;

impl<D: Disk> Store<D> {
    /// Prepares an origin write to `chunk`: if any live snapshot lacks its own
    /// copy, allocates one store chunk shared by all of them and returns the
    /// copy-out to do before the commit. Idempotent.
    pub fn prepare_origin_write(&mut self, chunk: u64) -> Result<OriginWrite, StoreError> {
        self.check_chunk(chunk)?;
        self.begin_op()?;
        let mut modified = false;
        let r = self.origin_write_inner(chunk, &mut modified);
        self.end_op(r, modified)
    }

    pub(crate) fn origin_write_inner(
        &mut self,
        chunk: u64,
        modified: &mut bool,
    ) -> Result<OriginWrite, StoreError> {
        let live = self.sb.live_mask();
        if live.is_empty() {
            return Ok(OriginWrite::Unique);
        }
        let union = self.group_union(chunk)?;
        let need = live & !union;
        if need.is_empty() {
            return Ok(OriginWrite::Unique);
        }
        let store_chunk = self.alloc_data(modified)?;
        *modified = true;
        // One copy for every snapshot that needs it: a record per 64-slot
        // window of `need`, all naming the one store chunk.
        self.insert_windows(chunk, need, store_chunk)?;
        self.account(Mask::EMPTY, need)?;
        Ok(OriginWrite::CopyOut { store_chunk })
    }

    /// Prepares a write to snapshot `tag` at `chunk`: gives the snapshot a
    /// store chunk of its own, returning the copy to do first if the data was
    /// shared. Idempotent.
    pub fn prepare_snapshot_write(
        &mut self,
        tag: u32,
        chunk: u64,
    ) -> Result<SnapshotWrite, StoreError> {
        self.check_chunk(chunk)?;
        let bit = self
            .sb
            .live_bit(tag)
            .ok_or(StoreError::NoSuchSnapshot(tag))?;
        self.begin_op()?;
        let mut modified = false;
        let r = self.snapshot_write_inner(bit, chunk, &mut modified);
        self.end_op(r, modified)
    }

    pub(crate) fn snapshot_write_inner(
        &mut self,
        bit: usize,
        chunk: u64,
        modified: &mut bool,
    ) -> Result<SnapshotWrite, StoreError> {
        let me = Mask::bit(bit);
        // The record holding the bit, and where it is (its leaf may be any
        // of those the chunk's records span).
        let mut c = self.seek(chunk)?;
        let mut found = None;
        while let Some(r) = self.next_record(&mut c, chunk)? {
            if r.mask.intersects(me) {
                found = Some((c.path.leaf, c.i - 1, r));
                break;
            }
        }
        // The store chunk's users in other windows (a copy-out that served
        // snapshots of several windows is one record per window).
        let others = match found {
            Some((leaf, i, r)) => self.store_others(chunk, r.store, leaf, i)?,
            None => Mask::EMPTY,
        };
        match found {
            Some((_, _, r)) if r.mask == me && others.is_empty() => {
                // The client writes into the chunk after the reply. If a
                // commit vouches for its contents by checksum, that commit
                // must not be the newest when the write lands: the open
                // transaction's data is flushed instead of checksummed, the
                // last commit's is superseded by this one.
                if self.tx_data.iter().any(|e| e.chunk == r.store) {
                    self.pre_flush = true;
                } else if self.last_data.contains(&r.store) {
                    self.must_commit = true;
                }
                Ok(SnapshotWrite::Unique {
                    store_chunk: r.store,
                })
            }
            Some((leaf, i, r)) => {
                let store_chunk = self.alloc_data(modified)?;
                *modified = true;
                // The leaf is still cached (pinned by this operation).
                assert_eq!(tree::leaf_get(self.cache.buf(leaf), i), r);
                self.cache.mark_dirty(leaf);
                if r.mask == me {
                    // Its window held only this snapshot; other windows'
                    // records keep the copy.
                    tree::leaf_remove(self.cache.buf_mut(leaf), i);
                } else {
                    tree::leaf_set_mask(self.cache.buf_mut(leaf), i, r.mask & !me);
                }
                self.account(others | r.mask, others | (r.mask & !me))?;
                self.insert_record(Record {
                    chunk,
                    mask: me,
                    store: store_chunk,
                })?;
                self.account(Mask::EMPTY, me)?;
                // The client writes into the new chunk after the commit:
                // its copy is flushed, not checksummed.
                self.pre_flush = true;
                Ok(SnapshotWrite::CopyFromStore {
                    from: r.store,
                    store_chunk,
                })
            }
            None => {
                let store_chunk = self.alloc_data(modified)?;
                *modified = true;
                self.insert_record(Record {
                    chunk,
                    mask: me,
                    store: store_chunk,
                })?;
                self.account(Mask::EMPTY, me)?;
                self.pre_flush = true;
                Ok(SnapshotWrite::CopyFromOrigin { store_chunk })
            }
        }
    }

    /// Writes copy-out data at byte `off` of the device, within the lease.
    /// A whole chunk is vouched for by the next commit's checksum list; a
    /// partial one, one past the list's room, or any write into a chunk a
    /// client writes next (a snapshot write's copy) is flushed before the
    /// commit's journal write instead.
    pub fn write_data(&mut self, buf: &[u8], off: u64) -> Result<(), StoreError> {
        self.within_lease()?;
        let chunk_bytes = u64::from(self.label.chunk_size_bytes);
        let rel = off.checked_sub(self.label.chunk_offset(0));
        let chunk = rel
            .filter(|r| r % chunk_bytes == 0 && buf.len() as u64 == chunk_bytes)
            .map(|r| r / chunk_bytes)
            .filter(|&c| c < self.label.data_chunks);
        match chunk {
            Some(chunk)
                if !self.pre_flush
                    && self.tx_data.len() < TX_DATA_CHUNKS_MAX
                    && self.tx_data.iter().all(|e| e.chunk != chunk) =>
            {
                self.tx_data.push(journal::DataEntry {
                    chunk,
                    crc: crc32c::crc32c(buf),
                });
            }
            _ => self.pre_flush = true,
        }
        self.disk.write_at(buf, off)?;
        Ok(())
    }
}
