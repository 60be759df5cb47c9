//! The exception tree: descending to a leaf, reading a tree block through the
//! cache, and inserting a record (splitting leaves and index nodes on the way).

use crate::*;

impl<D: Disk> Store<D> {
    /// The path to the leftmost leaf that may hold `key`: a chunk's
    /// records start there and may go on in the leaves to its right (whose
    /// keys are then `key`; `next_leaf`). Every block on it passed its
    /// structural check when it was read (`block`); on the way down the
    /// levels must count down by one and each block's keys must lie in the
    /// range its parent gives it, so a corrupt tree is an error, never a
    /// wrong answer or an endless walk.
    pub(crate) fn descend(&mut self, key: u64) -> Result<Path, StoreError> {
        self.walk_down(Path::default(), self.sb.root, 0, u64::MAX, Some(key))
    }

    /// Goes down from `addr` (the child at `path.len` levels below the
    /// root, whose keys lie in `[lo, hi]`) to a leaf: by `key`, or along
    /// the leftmost children.
    fn walk_down(
        &mut self,
        mut path: Path,
        mut addr: u64,
        mut lo: u64,
        mut hi: u64,
        key: Option<u64>,
    ) -> Result<Path, StoreError> {
        let depth = usize::from(self.sb.depth);
        let structure = |addr, kind, reason| StoreError::Corrupt {
            addr,
            kind,
            fault: BlockFault::Structure { reason },
        };
        for level in (1..depth.saturating_sub(path.len)).rev() {
            self.check_meta_addr(addr, BlockKind::Node)?;
            let slot = self.block(addr, BlockKind::Node)?;
            let b = self.cache.buf(slot);
            if usize::from(layout::level(b)) != level {
                return Err(structure(
                    addr,
                    BlockKind::Node,
                    "tree level does not match its depth on the path",
                ));
            }
            let n = tree::node_len(b);
            if n > 1 && (tree::node_key(b, 1) < lo || tree::node_key(b, n - 1) > hi) {
                return Err(structure(
                    addr,
                    BlockKind::Node,
                    "keys outside the range its parent gives it",
                ));
            }
            let idx = key.map_or(0, |k| tree::node_route(b, k));
            if idx > 0 {
                lo = tree::node_key(b, idx);
            }
            if idx + 1 < n {
                hi = tree::node_key(b, idx + 1);
            }
            addr = tree::node_child(b, idx);
            path.nodes[path.len] = (slot, idx);
            path.len += 1;
        }
        self.check_meta_addr(addr, BlockKind::Leaf)?;
        path.leaf = self.block(addr, BlockKind::Leaf)?;
        path.hi = hi;
        let b = self.cache.buf(path.leaf);
        let n = tree::leaf_len(b);
        if n > 0 && (tree::leaf_get(b, 0).chunk < lo || tree::leaf_get(b, n - 1).chunk > hi) {
            return Err(structure(
                addr,
                BlockKind::Leaf,
                "records outside the range its parent gives it",
            ));
        }
        Ok(path)
    }

    /// The leaf right of `path`'s, if its key is at most `last` (a leaf
    /// keyed past `last` holds no record at or below it, and is not read).
    /// The path's blocks are pinned by the running operation. With
    /// `release`, the clean blocks the operation read before are unpinned
    /// first, except the path, so a walk over many leaves needs no more of
    /// the cache than one path: a caller holds no other clean block's slot
    /// across such a walk.
    pub(crate) fn next_leaf(
        &mut self,
        path: &Path,
        last: u64,
        release: bool,
    ) -> Result<Option<Path>, StoreError> {
        for lvl in (0..path.len).rev() {
            let (slot, idx) = path.nodes[lvl];
            let b = self.cache.buf(slot);
            let n = tree::node_len(b);
            if idx + 1 >= n {
                continue;
            }
            let lo = tree::node_key(b, idx + 1);
            if lo > last {
                return Ok(None);
            }
            let addr = tree::node_child(b, idx + 1);
            let mut hi = if idx + 2 < n {
                tree::node_key(b, idx + 2)
            } else {
                u64::MAX
            };
            if idx + 2 >= n {
                // The bound this node has from above.
                for &(s, i) in path.nodes[..lvl].iter() {
                    let pb = self.cache.buf(s);
                    if i + 1 < tree::node_len(pb) {
                        hi = tree::node_key(pb, i + 1);
                    }
                }
            }
            if release {
                self.cache.begin_op();
                for &(s, _) in &path.nodes[..path.len] {
                    self.cache.pin(s);
                }
            }
            let mut next = *path;
            next.nodes[lvl] = (slot, idx + 1);
            next.len = lvl + 1;
            return self.walk_down(next, addr, lo, hi, None).map(Some);
        }
        Ok(None)
    }

    /// A cursor at the first record whose chunk is `>= key`, releasing
    /// the leaves it leaves behind (`next_leaf`).
    pub(crate) fn seek(&mut self, key: u64) -> Result<Cursor, StoreError> {
        let path = self.descend(key)?;
        let i = tree::leaf_lower_bound(self.cache.buf(path.leaf), key);
        Ok(Cursor {
            path,
            i,
            release: true,
        })
    }

    /// The record at the cursor if its chunk is at most `last`, moving past
    /// it (into the leaves to the right as needed); it is record `c.i - 1`
    /// of leaf `c.path.leaf` afterwards.
    pub(crate) fn next_record(
        &mut self,
        c: &mut Cursor,
        last: u64,
    ) -> Result<Option<Record>, StoreError> {
        loop {
            let b = self.cache.buf(c.path.leaf);
            if c.i < tree::leaf_len(b) {
                let r = tree::leaf_get(b, c.i);
                if r.chunk > last {
                    return Ok(None);
                }
                c.i += 1;
                return Ok(Some(r));
            }
            match self.next_leaf(&c.path, last, c.release)? {
                Some(p) => {
                    c.path = p;
                    c.i = 0;
                }
                None => return Ok(None),
            }
        }
    }

    /// The union of the share masks of `chunk`'s records.
    pub(crate) fn group_union(&mut self, chunk: u64) -> Result<Mask, StoreError> {
        let mut c = self.seek(chunk)?;
        let mut union = Mask::EMPTY;
        while let Some(r) = self.next_record(&mut c, chunk)? {
            union |= r.mask;
        }
        Ok(union)
    }

    /// The union of the share masks of `chunk`'s records that name store
    /// chunk `store`, except the record at (`leaf` slot, index `i`): the
    /// other windows of one copy-out (ARCHITECTURE 2.2). Keeps every block
    /// it reads pinned, so the caller's slots stay valid. With one window
    /// (64 snapshots) a copy-out is one record: nothing to walk.
    pub(crate) fn store_others(
        &mut self,
        chunk: u64,
        store: u64,
        leaf: usize,
        i: usize,
    ) -> Result<Mask, StoreError> {
        if csnap_pools::SHARE_MASK_WORDS == 1 {
            return Ok(Mask::EMPTY);
        }
        let mut c = self.seek(chunk)?;
        c.release = false;
        let mut others = Mask::EMPTY;
        while let Some(r) = self.next_record(&mut c, chunk)? {
            if r.store == store && !(c.path.leaf == leaf && c.i - 1 == i) {
                others |= r.mask;
            }
        }
        Ok(others)
    }

    /// Inserts the records of a copy-out serving `mask` (at `chunk`, in
    /// store chunk `store`): one per 64-slot window the mask touches.
    pub(crate) fn insert_windows(
        &mut self,
        chunk: u64,
        mask: Mask,
        store: u64,
    ) -> Result<(), StoreError> {
        for (w, word) in mask.windows() {
            self.insert_record(Record {
                chunk,
                mask: Mask::from_window(w, word),
                store,
            })?;
        }
        Ok(())
    }

    /// The cache slot of block `addr`, read and verified as `kind` on a
    /// miss, and then checked structurally (entry counts within capacity,
    /// order, pointers inside their areas, masks naming slots in use). A
    /// block that fails is dropped from the cache and reported as
    /// `Corrupt` with the reason: nothing derived from it is used.
    pub(crate) fn block(&mut self, addr: u64, kind: BlockKind) -> Result<usize, StoreError> {
        // A miss reads home: the last commit's home writes go first.
        self.write_home()?;
        let misses = self.cache.misses;
        let slot = self.cache.get(&mut self.disk, addr, kind)?;
        if self.cache.misses == misses {
            return Ok(slot);
        }
        let l = &self.label;
        let b = self.cache.buf(slot);
        let r = match kind {
            BlockKind::Leaf => tree::check_leaf(
                b,
                l.origin_chunks(),
                l.data_chunks,
                self.sb.live_mask() | self.sb.deleting_mask(),
            ),
            BlockKind::Node => {
                tree::check_node(b, addr, l.meta_start, l.meta_start + l.meta_blocks)
            }
            BlockKind::Bitmap => layout::check_bitmap(b),
            _ => Ok(()),
        };
        if let Err(reason) = r {
            self.cache.forget(slot);
            return Err(StoreError::Corrupt {
                addr,
                kind,
                fault: BlockFault::Structure { reason },
            });
        }
        Ok(slot)
    }

    pub(crate) fn check_meta_addr(&self, addr: u64, kind: BlockKind) -> Result<(), StoreError> {
        let l = &self.label;
        if addr < l.meta_start || addr >= l.meta_start + l.meta_blocks {
            return Err(StoreError::Corrupt {
                addr,
                kind,
                fault: BlockFault::Address { found: addr },
            });
        }
        Ok(())
    }

    /// Inserts a record. Splits as needed; every block it needs is allocated
    /// before anything is modified.
    pub(crate) fn insert_record(&mut self, r: Record) -> Result<(), StoreError> {
        let path = self.descend(r.chunk)?;
        let leaf_b = self.cache.buf(path.leaf);
        if tree::leaf_len(leaf_b) < self.leaf_records_max {
            let (_, hi) = tree::leaf_find(leaf_b, r.chunk);
            self.cache.mark_dirty(path.leaf);
            tree::leaf_insert(self.cache.buf_mut(path.leaf), hi, r);
            return Ok(());
        }
        // How many levels split: the leaf, then each full ancestor.
        let mut splits = 1;
        for lvl in (0..path.len).rev() {
            if tree::node_len(self.cache.buf(path.nodes[lvl].0)) < self.node_entries_max {
                break;
            }
            splits += 1;
        }
        let new_root = splits > path.len;
        if new_root && usize::from(self.sb.depth) >= TREE_DEPTH_MAX {
            return Err(StoreError::TreeTooDeep);
        }
        let need = splits + usize::from(new_root);
        if self.sb.meta_free < need as u64 {
            return Err(StoreError::MetadataFull);
        }
        // Split the leaf.
        let new_leaf_addr = self.alloc_meta()?;
        let new_leaf = self.cache.get_new(new_leaf_addr, BlockKind::Leaf)?;
        tree::leaf_init(self.cache.buf_mut(new_leaf));
        self.cache.mark_dirty(path.leaf);
        let (old_b, new_b) = self.cache.two_mut(path.leaf, new_leaf);
        let s = tree::leaf_split_point(old_b);
        tree::leaf_move_tail(old_b, new_b, s);
        let sep = tree::leaf_get(new_b, 0).chunk;
        let target = if r.chunk >= sep { new_leaf } else { path.leaf };
        let tb = self.cache.buf_mut(target);
        let (_, hi) = tree::leaf_find(tb, r.chunk);
        tree::leaf_insert(tb, hi, r);
        // Carry the separator up.
        let mut carry = Some((sep, new_leaf_addr));
        for lvl in (0..path.len).rev() {
            let Some((key, child)) = carry else { break };
            let (slot, idx) = path.nodes[lvl];
            self.cache.mark_dirty(slot);
            if tree::node_len(self.cache.buf(slot)) < self.node_entries_max {
                tree::node_insert(self.cache.buf_mut(slot), idx + 1, key, child);
                carry = None;
                break;
            }
            let node_level = layout::level(self.cache.buf(slot));
            let right_addr = self.alloc_meta()?;
            let right = self.cache.get_new(right_addr, BlockKind::Node)?;
            layout::set_level(self.cache.buf_mut(right), node_level);
            let (lb, rb) = self.cache.two_mut(slot, right);
            let n = tree::node_len(lb);
            let s = n / 2;
            tree::node_move_tail(lb, rb, s);
            if idx < s {
                tree::node_insert(lb, idx + 1, key, child);
            } else {
                tree::node_insert(rb, idx + 1 - s, key, child);
            }
            carry = Some((tree::node_key(rb, 0), right_addr));
        }
        if let Some((key, child)) = carry {
            let root_addr = self.alloc_meta()?;
            let root = self.cache.get_new(root_addr, BlockKind::Node)?;
            let b = self.cache.buf_mut(root);
            layout::set_level(b, self.sb.depth);
            tree::node_insert(b, 0, 0, self.sb.root);
            tree::node_insert(b, 1, key, child);
            self.sb.root = root_addr;
            self.sb.depth += 1;
        }
        Ok(())
    }
}
