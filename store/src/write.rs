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
        let path = self.descend(chunk)?;
        let b = self.cache.buf(path.leaf);
        let (lo, hi) = tree::leaf_find(b, chunk);
        let union = (lo..hi).fold(Mask::EMPTY, |m, i| m | tree::leaf_get(b, i).mask);
        let need = live & !union;
        if need.is_empty() {
            return Ok(OriginWrite::Unique);
        }
        let store_chunk = self.alloc_data(modified)?;
        *modified = true;
        self.insert_record(Record {
            chunk,
            mask: need,
            store: store_chunk,
        })?;
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
        let path = self.descend(chunk)?;
        let b = self.cache.buf(path.leaf);
        let (lo, hi) = tree::leaf_find(b, chunk);
        let found = (lo..hi)
            .map(|i| (i, tree::leaf_get(b, i)))
            .find(|(_, r)| r.mask.intersects(me));
        match found {
            Some((_, r)) if r.mask == me => Ok(SnapshotWrite::Unique {
                store_chunk: r.store,
            }),
            Some((i, r)) => {
                let store_chunk = self.alloc_data(modified)?;
                *modified = true;
                // The leaf is still cached (stamped by this operation).
                let path = self.descend(chunk)?;
                debug_assert_eq!(tree::leaf_get(self.cache.buf(path.leaf), i), r);
                self.cache.mark_dirty(path.leaf);
                tree::leaf_set_mask(self.cache.buf_mut(path.leaf), i, r.mask & !me);
                self.account(r.mask, r.mask & !me)?;
                self.insert_record(Record {
                    chunk,
                    mask: me,
                    store: store_chunk,
                })?;
                self.account(Mask::EMPTY, me)?;
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
                Ok(SnapshotWrite::CopyFromOrigin { store_chunk })
            }
        }
    }

    /// Writes copy-out data at byte `off` of the device, within the lease.
    pub fn write_data(&mut self, buf: &[u8], off: u64) -> Result<(), StoreError> {
        self.within_lease()?;
        self.data_written = true;
        self.disk.write_at(buf, off)?;
        Ok(())
    }
}
