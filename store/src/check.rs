//! `csnap check`: an offline, read-only consistency check.
//!
//! The journal is replayed into an overlay (nothing is written), then every
//! structure is verified: block checksums and addresses, tree order and key
//! bounds, share masks against the snapshot table, every data chunk and tree
//! block referenced once and allocated exactly when referenced, free counts,
//! and per-snapshot usage. Each problem is one line. This is a tool, not the
//! serving path: it allocates freely.

use std::collections::HashMap;

use crate::disk::Disk;
use crate::journal;
use crate::layout::{self, BlockKind, Label, SlotState, Super, BITMAP_BITS_PER_BLOCK};
use crate::tree;
use csnap_pools::{BLOCK_SIZE_BYTES, SNAPSHOTS_MAX, TREE_DEPTH_MAX};

use crate::mask::Mask;

const BS: u64 = BLOCK_SIZE_BYTES as u64;

/// What `check` found.
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// One line per problem; empty when the store is clean.
    pub problems: Vec<String>,
    /// Facts about the store, for the summary line.
    pub summary: Option<CheckSummary>,
}

/// Facts about a checked store.
#[derive(Debug, Default, Clone, Copy)]
pub struct CheckSummary {
    /// Last commit sequence (after replay).
    pub seq: u64,
    /// Commits the journal would replay.
    pub replay_commits: u64,
    /// Live snapshots.
    pub snapshots: u32,
    /// Exception records.
    pub exceptions: u64,
    /// Tree blocks.
    pub tree_blocks: u64,
    /// Tree depth.
    pub depth: u16,
    /// Data chunks in use.
    pub data_used: u64,
    /// Data chunks.
    pub data_chunks: u64,
}

impl CheckReport {
    /// Whether no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Reader<'a, D: Disk> {
    disk: &'a mut D,
    overlay: HashMap<u64, Vec<u8>>,
}

impl<D: Disk> Reader<'_, D> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        if let Some(img) = self.overlay.get(&addr) {
            buf.copy_from_slice(img);
            return Ok(());
        }
        self.disk
            .read_at(buf, addr * BS)
            .map_err(|e| format!("block {addr}: read failed: {e}"))
    }
}

/// Checks the store on `disk`.
pub fn check<D: Disk>(disk: &mut D) -> CheckReport {
    let mut report = CheckReport::default();
    let label = match crate::read_label(disk) {
        Ok(l) => l,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    // Replay into an overlay.
    let mut overlay: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; journal::REPLAY_BUFFER_BLOCKS * BLOCK_SIZE_BYTES];
    let replay = journal::replay(disk, &label, &mut buf, &mut |_, home, img| {
        overlay.insert(home, img.to_vec());
        Ok(())
    });
    let replay = match replay {
        Ok(r) => r,
        Err(e) => {
            report.problems.push(format!("journal: {e}"));
            return report;
        }
    };
    if let Some((seq, slot)) = replay.last_commit_damaged {
        report.problems.push(format!(
            "journal: commit {seq} at slot {slot} (the superblock's last commit) is damaged"
        ));
    }
    // Home blocks the overlay supersedes are still checked for damage: a bad
    // home copy is a problem even when the journal can repair it.
    let mut r = Reader { disk, overlay };
    let mut b = vec![0u8; BLOCK_SIZE_BYTES];
    {
        let mut home = vec![0u8; BLOCK_SIZE_BYTES];
        if r.disk.read_at(&mut home, layout::SUPER_BLOCK * BS).is_ok() {
            if let Err(f) = layout::verify(&home, layout::SUPER_BLOCK, BlockKind::Super) {
                report.problems.push(format!(
                    "superblock (block 1): {f}{}",
                    if replay.super_recovered {
                        "; the journal holds a good copy (opening the store repairs it)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    // Damaged home copies of blocks the journal covers.
    let mut covered: Vec<u64> = r
        .overlay
        .keys()
        .copied()
        .filter(|&a| a != layout::SUPER_BLOCK)
        .collect();
    covered.sort_unstable();
    for addr in covered {
        let kind = layout::kind(&r.overlay[&addr]).unwrap_or(BlockKind::Leaf);
        if r.disk.read_at(&mut b, addr * BS).is_ok() {
            if let Err(f) = layout::verify(&b, addr, kind) {
                report.problems.push(format!(
                    "{} at block {addr}: home copy: {f}; the journal holds a good copy (opening the store repairs it)",
                    kind.name()
                ));
            }
        }
    }
    if let Err(e) = r.read(layout::SUPER_BLOCK, &mut b) {
        report.problems.push(e);
        return report;
    }
    let mut sb = match layout::verify(&b, layout::SUPER_BLOCK, BlockKind::Super)
        .map_err(|f| f.to_string())
        .and_then(|_| Super::decode(&b).map_err(str::to_string))
    {
        Ok(sb) => sb,
        Err(e) => {
            report.problems.push(format!("superblock (block 1): {e}"));
            return report;
        }
    };
    // The snapshot table's blocks (a version-2 superblock).
    let mut table_refs = Vec::new();
    if sb.table_in_blocks() {
        for k in 0..layout::TABLE_BLOCKS_MAX {
            let addr = sb.table[k];
            let what = format!("snapshot table block {k} at block {addr}");
            if addr < label.meta_start || addr >= label.meta_start + label.meta_blocks {
                report
                    .problems
                    .push(format!("{what}: outside the metadata area"));
                return report;
            }
            let r = r.read(addr, &mut b).and_then(|()| {
                layout::verify(&b, addr, BlockKind::SnapTable).map_err(|f| f.to_string())?;
                sb.decode_table_block(k, &b).map_err(str::to_string)
            });
            if let Err(e) = r {
                report.problems.push(format!("{what}: {e}"));
                return report;
            }
            table_refs.push(addr - label.meta_start);
        }
    }
    if let Err(e) = crate::validate_super(&label, &sb) {
        report.problems.push(e);
        return report;
    }
    let mut c = Checker {
        label,
        sb,
        problems: Vec::new(),
        meta_refs: vec![false; usize::try_from(label.meta_blocks).unwrap_or(0)],
        data_refs: vec![false; usize::try_from(label.data_chunks).unwrap_or(0)],
        chunks: [0; SNAPSHOTS_MAX],
        unique: [0; SNAPSHOTS_MAX],
        exceptions: 0,
        tree_blocks: 0,
    };
    for i in table_refs {
        if let Some(m) = usize::try_from(i).ok().and_then(|i| c.meta_refs.get_mut(i)) {
            *m = true;
        }
    }
    c.snapshot_table();
    c.walk_tree(&mut r);
    c.bitmaps(&mut r);
    c.usage();
    report.summary = Some(CheckSummary {
        seq: sb.seq,
        replay_commits: replay.commits,
        snapshots: sb.live_mask().count(),
        exceptions: c.exceptions,
        tree_blocks: c.tree_blocks,
        depth: sb.depth,
        data_used: c.data_refs.iter().filter(|&&x| x).count() as u64,
        data_chunks: label.data_chunks,
    });
    report.problems.extend(c.problems);
    report
}

struct Checker {
    label: Label,
    sb: Super,
    problems: Vec<String>,
    meta_refs: Vec<bool>,
    data_refs: Vec<bool>,
    chunks: [u64; SNAPSHOTS_MAX],
    unique: [u64; SNAPSHOTS_MAX],
    exceptions: u64,
    tree_blocks: u64,
}

impl Checker {
    fn snapshot_table(&mut self) {
        let sb = self.sb;
        for (i, s) in sb.snaps.iter().enumerate() {
            if s.state == SlotState::Live {
                for (j, t) in sb.snaps.iter().enumerate().skip(i + 1) {
                    if t.state == SlotState::Live && t.tag == s.tag {
                        self.problems.push(format!(
                            "snapshot table: slots {i} and {j} both hold live snapshot {}",
                            s.tag
                        ));
                    }
                }
            }
            if s.state == SlotState::Free && (s.chunks != 0 || s.unique_chunks != 0) {
                self.problems
                    .push(format!("snapshot table: free slot {i} records usage"));
            }
            if s.state != SlotState::Free && s.unique_chunks > s.chunks {
                self.problems.push(format!(
                    "snapshot table: slot {i} records more unique chunks ({}) than chunks ({})",
                    s.unique_chunks, s.chunks
                ));
            }
        }
    }

    fn walk_tree<D: Disk>(&mut self, r: &mut Reader<'_, D>) {
        // Explicit stack: (block, expected level, low key, high key
        // inclusive: the next leaf's key, which a chunk's records spanning
        // leaves share). Children are pushed right to left, so leaves are
        // met in key order and a chunk's records are checked together
        // across the leaves they span.
        let mut stack: Vec<(u64, u16, u64, Option<u64>)> =
            vec![(self.sb.root, self.sb.depth - 1, 0, None)];
        let mut group_chunk = None;
        let mut group_mask = Mask::EMPTY;
        // The group's copy-outs: store chunk and the union of the masks of
        // its records (one per 64-slot window it serves).
        let mut group_stores: Vec<(u64, Mask)> = Vec::new();
        let mut b = vec![0u8; BLOCK_SIZE_BYTES];
        let allocated = self.sb.live_mask() | self.sb.deleting_mask();
        while let Some((addr, level, lo, hi)) = stack.pop() {
            let l = &self.label;
            if addr < l.meta_start || addr >= l.meta_start + l.meta_blocks {
                self.problems.push(format!(
                    "b-tree: block {addr} at level {level} is outside the metadata area"
                ));
                continue;
            }
            let mi = usize::try_from(addr - l.meta_start).unwrap_or(0);
            if self.meta_refs[mi] {
                self.problems
                    .push(format!("b-tree: block {addr} is referenced twice"));
                continue;
            }
            self.meta_refs[mi] = true;
            self.tree_blocks += 1;
            if let Err(e) = r.read(addr, &mut b) {
                self.problems.push(e);
                continue;
            }
            let kind = if level == 0 {
                BlockKind::Leaf
            } else {
                BlockKind::Node
            };
            if let Err(f) = layout::verify(&b, addr, kind) {
                self.problems.push(format!(
                    "{} at block {addr} (level {level}): {f}",
                    kind.name()
                ));
                continue;
            }
            if layout::level(&b) != level {
                self.problems.push(format!(
                    "{} at block {addr}: level {} where {level} was expected",
                    kind.name(),
                    layout::level(&b)
                ));
                continue;
            }
            let in_bounds = |k: u64| k >= lo && hi.is_none_or(|h| k <= h);
            if level == 0 {
                if tree::leaf_mask_words(&b) != tree::LEAF_RECORD_FORMAT {
                    self.problems.push(format!(
                        "b-tree leaf at block {addr}: share masks of {} words are not supported",
                        tree::leaf_mask_words(&b)
                    ));
                    continue;
                }
                let n = tree::leaf_len(&b);
                if n > layout::LEAF_RECORDS_MAX {
                    self.problems.push(format!(
                        "b-tree leaf at block {addr}: {n} records overflow the leaf"
                    ));
                    continue;
                }
                for i in 0..n {
                    let rec = tree::leaf_get(&b, i);
                    let what = format!(
                        "b-tree leaf at block {addr}, record {i} (chunk {})",
                        rec.chunk
                    );
                    if i > 0 && tree::leaf_get(&b, i - 1).chunk > rec.chunk {
                        self.problems.push(format!("{what}: records out of order"));
                    }
                    if group_chunk != Some(rec.chunk) {
                        self.count_unique(&mut group_stores);
                        group_chunk = Some(rec.chunk);
                        group_mask = Mask::EMPTY;
                    }
                    if !in_bounds(rec.chunk) {
                        self.problems.push(format!(
                            "{what}: key outside the node's range [{lo}, {}]",
                            hi.map_or("end".to_string(), |h| h.to_string())
                        ));
                    }
                    if rec.chunk >= self.label.origin_chunks() {
                        self.problems
                            .push(format!("{what}: chunk is past the end of the origin"));
                    }
                    let w = tree::leaf_window(&b, i);
                    if w >= csnap_pools::SHARE_MASK_WORDS {
                        self.problems.push(format!(
                            "{what}: share window {w} is past the snapshot table"
                        ));
                    }
                    if rec.mask.is_empty() {
                        self.problems.push(format!("{what}: empty share mask"));
                    }
                    if rec.mask.intersects(!allocated) {
                        self.problems.push(format!(
                            "{what}: share mask {:#x} names snapshots that do not exist",
                            rec.mask & !allocated
                        ));
                    }
                    if rec.mask.intersects(group_mask) {
                        self.problems.push(format!(
                            "{what}: a snapshot has two exceptions for this chunk"
                        ));
                    }
                    group_mask |= rec.mask;
                    if rec.mask.intersects(self.sb.delete_walk_mask)
                        && rec.chunk < self.sb.delete_cursor
                    {
                        self.problems.push(format!(
                            "{what}: a deleted snapshot's bit survives behind the delete cursor"
                        ));
                    }
                    if rec.store >= self.label.data_chunks {
                        self.problems.push(format!(
                            "{what}: store chunk {} is outside the data area",
                            rec.store
                        ));
                        continue;
                    }
                    for b in (rec.mask & allocated).slots() {
                        self.chunks[b] += 1;
                    }
                    if let Some(e) = group_stores.iter_mut().find(|e| e.0 == rec.store) {
                        // Another window of the same copy-out.
                        e.1 |= rec.mask;
                        continue;
                    }
                    let di = usize::try_from(rec.store).unwrap_or(0);
                    if self.data_refs[di] {
                        self.problems.push(format!(
                            "{what}: store chunk {} is used by two exceptions",
                            rec.store
                        ));
                    }
                    self.data_refs[di] = true;
                    self.exceptions += 1;
                    group_stores.push((rec.store, rec.mask));
                }
            } else {
                let n = tree::node_len(&b);
                if n == 0 || n > layout::NODE_ENTRIES_MAX {
                    self.problems
                        .push(format!("b-tree node at block {addr}: bad entry count {n}"));
                    continue;
                }
                if usize::from(level) >= TREE_DEPTH_MAX {
                    self.problems
                        .push(format!("b-tree node at block {addr}: too deep"));
                    continue;
                }
                for i in (0..n).rev() {
                    let key = tree::node_key(&b, i);
                    let child_lo = if i == 0 { lo } else { key };
                    if i > 0 {
                        if key < tree::node_key(&b, i - 1) && i > 1 {
                            self.problems.push(format!(
                                "b-tree node at block {addr}: keys out of order at entry {i}"
                            ));
                        }
                        if !in_bounds(key) {
                            self.problems.push(format!(
                                "b-tree node at block {addr}: key {key} outside the node's range"
                            ));
                        }
                    }
                    let child_hi = if i + 1 < n {
                        Some(tree::node_key(&b, i + 1))
                    } else {
                        hi
                    };
                    stack.push((tree::node_child(&b, i), level - 1, child_lo, child_hi));
                }
            }
        }
        self.count_unique(&mut group_stores);
    }

    /// A finished group's copy-outs: each used by one snapshot alone counts
    /// as that snapshot's unique chunk.
    fn count_unique(&mut self, group_stores: &mut Vec<(u64, Mask)>) {
        for (_, m) in group_stores.drain(..) {
            if let Some(b) = m.single() {
                self.unique[b] += 1;
            }
        }
    }

    fn bitmaps<D: Disk>(&mut self, r: &mut Reader<'_, D>) {
        let l = self.label;
        let meta_refs = std::mem::take(&mut self.meta_refs);
        let data_refs = std::mem::take(&mut self.data_refs);
        let meta_free = self.bitmap(
            r,
            "metadata",
            l.meta_bitmap_start,
            l.meta_bitmap_blocks,
            &meta_refs,
            l.meta_start,
        );
        let data_free = self.bitmap(
            r,
            "data",
            l.data_bitmap_start,
            l.data_bitmap_blocks,
            &data_refs,
            0,
        );
        if let Some(f) = meta_free {
            if f != self.sb.meta_free {
                self.problems.push(format!(
                    "superblock: {} free metadata blocks recorded, {f} in the bitmap",
                    self.sb.meta_free
                ));
            }
        }
        if let Some(f) = data_free {
            if f != self.sb.data_free {
                self.problems.push(format!(
                    "superblock: {} free data chunks recorded, {f} in the bitmap",
                    self.sb.data_free
                ));
            }
        }
        self.meta_refs = meta_refs;
        self.data_refs = data_refs;
    }

    #[allow(clippy::too_many_arguments)]
    fn bitmap<D: Disk>(
        &mut self,
        r: &mut Reader<'_, D>,
        name: &str,
        start: u64,
        nblocks: u64,
        refs: &[bool],
        addr_base: u64,
    ) -> Option<u64> {
        let mut b = vec![0u8; BLOCK_SIZE_BYTES];
        let mut free = 0u64;
        let mut complete = true;
        let area = refs.len() as u64;
        for blk in 0..nblocks {
            let addr = start + blk;
            if let Err(e) = r.read(addr, &mut b) {
                self.problems.push(e);
                complete = false;
                continue;
            }
            if let Err(f) = layout::verify(&b, addr, BlockKind::Bitmap) {
                self.problems
                    .push(format!("{name} bitmap block {addr}: {f}"));
                complete = false;
                continue;
            }
            if let Err(e) = layout::check_bitmap(&b) {
                self.problems
                    .push(format!("{name} bitmap block {addr}: {e}"));
            }
            for bit in 0..BITMAP_BITS_PER_BLOCK {
                let idx = blk * BITMAP_BITS_PER_BLOCK + bit;
                let set = crate::test_bit(&b, bit);
                if idx >= area {
                    if !set {
                        self.problems.push(format!(
                            "{name} bitmap block {addr}: bit {idx} past the end of the area is clear"
                        ));
                    }
                    continue;
                }
                let used = refs[usize::try_from(idx).unwrap_or(0)];
                let what = if name == "data" {
                    format!("data chunk {idx}")
                } else {
                    format!("metadata block {}", addr_base + idx)
                };
                match (set, used) {
                    (true, false) => self
                        .problems
                        .push(format!("{what} is allocated but not referenced (leak)")),
                    (false, true) => self.problems.push(format!(
                        "{what} is referenced but free in the bitmap (it could be handed out twice)"
                    )),
                    (false, false) => free += 1,
                    (true, true) => {}
                }
            }
        }
        complete.then_some(free)
    }

    fn usage(&mut self) {
        for (i, s) in self.sb.snaps.iter().enumerate() {
            if s.state == SlotState::Free {
                if self.chunks[i] != 0 {
                    self.problems.push(format!(
                        "snapshot table: free slot {i} appears in {} share masks",
                        self.chunks[i]
                    ));
                }
                continue;
            }
            if s.chunks != self.chunks[i] || s.unique_chunks != self.unique[i] {
                self.problems.push(format!(
                    "snapshot {} (slot {i}): usage recorded as {} chunks ({} unique), the tree has {} ({} unique)",
                    s.tag, s.chunks, s.unique_chunks, self.chunks[i], self.unique[i]
                ));
            }
        }
    }
}
