//! The exception tree: descending to a leaf, reading a tree block through the
//! cache, and inserting a record (splitting leaves and index nodes on the way).

use crate::*;

impl<D: Disk> Store<D> {
    /// The path to the leaf that holds `key`. Every block on it passed its
    /// structural check when it was read (`block`); on the way down the
    /// levels must count down by one and each block's keys must lie in the
    /// range its parent gives it, so a corrupt tree is an error, never a
    /// wrong answer or an endless walk.
    pub(crate) fn descend(&mut self, key: u64) -> Result<Path, StoreError> {
        let mut path = Path::default();
        let mut addr = self.sb.root;
        let depth = usize::from(self.sb.depth);
        let (mut lo, mut hi) = (0u64, u64::MAX);
        let structure = |addr, kind, reason| StoreError::Corrupt {
            addr,
            kind,
            fault: BlockFault::Structure { reason },
        };
        for level in (1..depth).rev() {
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
            if n > 1 && (tree::node_key(b, 1) < lo || tree::node_key(b, n - 1) >= hi) {
                return Err(structure(
                    addr,
                    BlockKind::Node,
                    "keys outside the range its parent gives it",
                ));
            }
            let idx = tree::node_route(b, key);
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
        if n > 0 && (tree::leaf_get(b, 0).chunk < lo || tree::leaf_get(b, n - 1).chunk >= hi) {
            return Err(structure(
                addr,
                BlockKind::Leaf,
                "records outside the range its parent gives it",
            ));
        }
        Ok(path)
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
        if tree::leaf_len(leaf_b) < LEAF_RECORDS_MAX {
            let (_, hi) = tree::leaf_find(leaf_b, r.chunk);
            self.cache.mark_dirty(path.leaf);
            tree::leaf_insert(self.cache.buf_mut(path.leaf), hi, r);
            return Ok(());
        }
        // How many levels split: the leaf, then each full ancestor.
        let mut splits = 1;
        for lvl in (0..path.len).rev() {
            if tree::node_len(self.cache.buf(path.nodes[lvl].0)) < NODE_ENTRIES_MAX {
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
            if tree::node_len(self.cache.buf(slot)) < NODE_ENTRIES_MAX {
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
