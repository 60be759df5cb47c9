//! The csnap snapshot store.
//!
//! One exception b-tree keyed by 64-bit logical chunk holds the exceptions of
//! every snapshot; each exception carries a share mask, so one copy-out serves
//! every snapshot that still needs the old data. All metadata changes go
//! through a physical redo journal with group commit; the superblock (root,
//! depth, free counts, cursors, snapshot table, incarnation) is journaled in
//! every commit. Memory is a fixed block cache and fixed buffers reserved at
//! open: no operation allocates.
//!
//! Operations mutate the open transaction; `commit` makes them durable. The
//! caller performs copy-outs between an operation and the commit through
//! `write_data`; the commit lists their checksums, so one flush after the
//! journal write makes data and metadata durable together and replay
//! discards a commit whose data did not land (data it cannot checksum is
//! flushed before the journal write). See ARCHITECTURE.md "Store" (2.6) for
//! the layout and the commit protocol.
//!
//! Where things are: `format` (layout plan, formatting, the label),
//! `standby` (opening: reserve, then start and replay), `insert` (tree
//! descent and record insertion), `alloc` (where a chunk or metadata block
//! is allocated and freed, usage accounting, store-full policy), `write`
//! (what an origin or snapshot write needs first: copy-out or a chunk),
//! `snapshots` (the snapshot table), `delete` (the deletion walk), `fence`
//! (incarnation, fence read, lease), `commit` (where a commit is written),
//! `error`; below them the block formats (`layout`, `tree`, `mask`), the
//! journal (`journal`), the block cache (`cache`), the device (`disk`) and
//! the offline checker (`check`).

#![forbid(unsafe_code)]

pub mod cache;
pub mod check;
pub mod disk;
pub mod journal;
pub mod layout;
pub mod mask;
pub mod tree;

mod alloc;
mod commit;
mod delete;
mod error;
mod fence;
mod format;
mod insert;
mod snapshots;
mod standby;
mod write;

pub use alloc::test_bit;
use alloc::{clear_bit, set_bit};
pub use error::StoreError;
use format::read_label_checked;
pub use format::{
    format, format_v1, plan_layout, read_label, read_label_into, validate_super, FormatOptions,
    META_BYTES_PER_DATA_CHUNK,
};
pub use standby::{OpenOptions, Standby};

use cache::Cache;
use csnap_pools::{
    BLOCK_SIZE_BYTES, CACHE_MIN_BLOCKS, OP_DIRTY_BLOCKS_MAX, PRIORITY_NEVER_DELETE, SNAPSHOTS_MAX,
    TREE_DEPTH_MAX, TX_BLOCKS_MAX, TX_DATA_CHUNKS_MAX, TX_FREES_MAX,
};
use disk::Disk;
pub use layout::StoreFullPolicy;
use layout::{
    BlockFault, BlockKind, Label, SlotState, SnapSlot, Super, BITMAP_BITS_PER_BLOCK, HEADER_BYTES,
    LEAF_RECORDS_MAX, NODE_ENTRIES_MAX,
};
use mask::Mask;
use tree::Record;

const BS: u64 = BLOCK_SIZE_BYTES as u64;

/// Where the data of a snapshot chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Still on the origin, at the same chunk.
    Origin,
    /// In the store's data area at this chunk.
    Store(u64),
}

/// What an origin write must do before it may overwrite the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginWrite {
    /// Every live snapshot already has its own copy (or there are none).
    Unique,
    /// Copy the origin chunk to this store chunk before the commit.
    CopyOut {
        /// Destination store chunk.
        store_chunk: u64,
    },
}

/// What a snapshot write must do before writing into its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotWrite {
    /// The snapshot already owns this store chunk alone: write there.
    Unique {
        /// Store chunk to write.
        store_chunk: u64,
    },
    /// A new chunk was assigned; copy the origin chunk into it first.
    CopyFromOrigin {
        /// New store chunk.
        store_chunk: u64,
    },
    /// A new chunk was assigned; copy the shared store chunk into it first.
    CopyFromStore {
        /// Store chunk shared with other snapshots.
        from: u64,
        /// New store chunk.
        store_chunk: u64,
    },
}

impl SnapshotWrite {
    /// The chunk the snapshot's data now lives in.
    pub fn store_chunk(&self) -> u64 {
        match *self {
            SnapshotWrite::Unique { store_chunk }
            | SnapshotWrite::CopyFromOrigin { store_chunk }
            | SnapshotWrite::CopyFromStore { store_chunk, .. } => store_chunk,
        }
    }
}

/// A snapshot as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// User tag.
    pub tag: u32,
    /// Share bit.
    pub bit: u16,
    /// Priority.
    pub priority: i8,
    /// Creation time, seconds since the epoch.
    pub ctime_secs: u64,
    /// Store chunks it references.
    pub chunks: u64,
    /// Store chunks only it references.
    pub unique_chunks: u64,
    /// Deleted, space still being reclaimed.
    pub deleting: bool,
    /// Marked in use by the server (never auto-deleted).
    pub in_use: bool,
}

/// Progress of background deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteProgress {
    /// Nothing to delete.
    Idle,
    /// More steps are needed (commit between steps when `TxFull`-near).
    Working,
}

/// Result of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitInfo {
    /// Sequence of the commit, or of the last one if nothing was pending.
    pub seq: u64,
    /// Blocks journaled (0: nothing to commit).
    pub blocks: usize,
    /// Operations grouped in this commit.
    pub ops: u64,
}

/// Store-wide figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStatus {
    /// Chunk size.
    pub chunk_size_bytes: u32,
    /// Origin chunks.
    pub origin_chunks: u64,
    /// Data chunks in the store.
    pub data_chunks: u64,
    /// Free data chunks.
    pub data_free: u64,
    /// Metadata blocks.
    pub meta_blocks: u64,
    /// Free metadata blocks.
    pub meta_free: u64,
    /// Live snapshots.
    pub snapshots: u32,
    /// Snapshots being deleted.
    pub deleting: u32,
    /// Durable incarnation.
    pub incarnation: u64,
    /// Last commit sequence.
    pub seq: u64,
    /// Tree levels.
    pub depth: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Meta,
    Data,
}

#[derive(Debug, Clone, Copy)]
struct Free {
    area: Area,
    index: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Path {
    nodes: [(usize, usize); TREE_DEPTH_MAX],
    len: usize,
    leaf: usize,
    /// The last key the leaf's range may hold (`u64::MAX`: the last leaf):
    /// the key of the next leaf, which may hold records of it too.
    hi: u64,
}

/// A position in the tree's records, in key order across leaves
/// (`Store::seek`, `Store::next_record`); valid within one operation.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    path: Path,
    /// The next record's index in `path.leaf`.
    i: usize,
    /// Moving to the next leaf unpins the clean blocks the operation read
    /// before, except the path (`Store::next_leaf`).
    release: bool,
}

/// An open store.
#[derive(Debug)]
pub struct Store<D: Disk> {
    disk: D,
    label: Label,
    sb: Super,
    committed: Super,
    cache: Cache,
    pending_frees: Vec<Free>,
    staging: disk::IoBuf,
    entries: Vec<journal::Entry>,
    tx_cap_blocks: usize,
    tx_ops: u64,
    poisoned: bool,
    failed: bool,
    in_use_mask: Mask,
    replay: journal::ReplayReport,
    fence_buf: disk::IoBuf,
    /// Data was written since the last commit that the next commit cannot
    /// vouch for by checksum: it flushes before its journal write.
    pre_flush: bool,
    /// Copy-outs of the open transaction and their checksums
    /// (`TX_DATA_CHUNKS_MAX`, reserved at open).
    tx_data: Vec<journal::DataEntry>,
    /// The chunks the last commit vouches for: a client write into one
    /// of them must wait for a newer commit (`must_commit`), or replay
    /// would find the checksum broken and discard an acknowledged commit.
    last_data: Vec<u64>,
    /// A commit must be written even if nothing changed (a snapshot
    /// write into a chunk of `last_data`).
    must_commit: bool,
    /// The last commit's home writes are still to do (`write_home`): its
    /// images are in the staging buffer after this many head blocks.
    home_pending: Option<usize>,
    /// Ring slots of the commit before the last one, which the next commit
    /// must not overwrite (`None` after an open: its flush made home durable).
    prev_commit: Option<(u64, u64)>,
    /// The lease (`set_lease`): writes only within it of a good fence read.
    lease: Option<std::time::Duration>,
    /// When the last fence read that found no newer incarnation began.
    fence_ok_at: Option<std::time::Instant>,
    /// Records a leaf takes before it splits (`LEAF_RECORDS_MAX`; less only
    /// through `set_tree_fanout`, a test hook).
    leaf_records_max: usize,
    /// Entries an index node takes before it splits (`NODE_ENTRIES_MAX`).
    node_entries_max: usize,
}

impl<D: Disk> Store<D> {
    /// Opens a formatted store: validates the label, replays the journal,
    /// loads the superblock, and reserves the cache and buffers. The only
    /// place the store allocates.
    pub fn open(mut disk: D, opts: &OpenOptions) -> Result<Self, StoreError> {
        // The label first with the tools' wording (it may allocate here);
        // `start` checks it again, heap-free, for a sealed standby.
        read_label(&mut disk)?;
        Standby::reserve(disk, opts)?.start()
    }

    /// What the journal replay at open did.
    pub fn replay_report(&self) -> journal::ReplayReport {
        self.replay
    }

    /// The store's fixed geometry.
    pub fn label(&self) -> &Label {
        &self.label
    }

    /// The device. Whatever the caller writes through it is flushed
    /// before the next commit's journal write (the commit cannot vouch for
    /// it); copy-outs go through `write_data`, which the commit vouches for
    /// by checksum, and reads through `read_data`.
    pub fn disk_mut(&mut self) -> &mut D {
        self.pre_flush = true;
        &mut self.disk
    }

    /// Test and fuzz hook: leaves split at `leaf_records` records and index
    /// nodes at `node_entries` entries (at least 2 and 3, at most the block
    /// capacities), so that a small store has a deep tree whose chunk
    /// groups span leaves, as a store past 64 snapshots will (ARCHITECTURE
    /// 2.2). The blocks stay valid at full capacity.
    #[doc(hidden)]
    pub fn set_tree_fanout(&mut self, leaf_records: usize, node_entries: usize) {
        self.leaf_records_max = leaf_records.clamp(2, LEAF_RECORDS_MAX);
        self.node_entries_max = node_entries.clamp(3, NODE_ENTRIES_MAX);
    }

    /// The device as another process sees it, for tests that model a
    /// client's own data writes (which the store never learns of): writing
    /// through it marks nothing.
    #[doc(hidden)]
    pub fn client_disk(&mut self) -> &mut D {
        &mut self.disk
    }

    /// Reads data (a copy's source) at byte `off` of the device.
    pub fn read_data(&mut self, buf: &mut [u8], off: u64) -> Result<(), disk::DiskError> {
        self.disk.read_at(buf, off)
    }

    /// Closes the store, returning the device. Uncommitted changes are lost.
    pub fn into_disk(mut self) -> D {
        // Best effort: a failed home write is redone by the next replay.
        let _ = self.write_home();
        self.disk
    }

    /// Byte offset of a data chunk on the store device.
    pub fn chunk_offset(&self, store_chunk: u64) -> u64 {
        assert!(store_chunk < self.label.data_chunks);
        self.label.chunk_offset(store_chunk)
    }

    /// Chunk size.
    pub fn chunk_size_bytes(&self) -> u32 {
        self.label.chunk_size_bytes
    }

    /// Chunks of the origin.
    pub fn origin_chunks(&self) -> u64 {
        self.label.origin_chunks()
    }

    /// Durable incarnation (as of the open transaction).
    pub fn incarnation(&self) -> u64 {
        self.sb.incarnation
    }

    /// Operations in the open transaction.
    pub fn pending_ops(&self) -> u64 {
        self.tx_ops
    }

    /// Whether an operation failed midway: the open transaction must be
    /// aborted (`abort`) before anything else runs.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Whether the open transaction holds changes.
    pub fn is_dirty(&self) -> bool {
        self.cache.dirty_count() > 0
            || self.sb != self.committed
            || !self.pending_frees.is_empty()
            || self.must_commit
    }

    /// Whether another mapping operation fits in the open transaction.
    pub fn has_room(&self) -> bool {
        self.cache.dirty_count() + OP_DIRTY_BLOCKS_MAX + layout::TABLE_BLOCKS_MAX
            <= self.tx_cap_blocks
            && self.pending_frees.len() < TX_FREES_MAX
    }

    /// Figures for `status`.
    pub fn status(&self) -> StoreStatus {
        StoreStatus {
            chunk_size_bytes: self.label.chunk_size_bytes,
            origin_chunks: self.label.origin_chunks(),
            data_chunks: self.label.data_chunks,
            data_free: self.sb.data_free,
            meta_blocks: self.label.meta_blocks,
            meta_free: self.sb.meta_free,
            snapshots: self.sb.live_mask().count(),
            deleting: self.sb.deleting_mask().count(),
            incarnation: self.sb.incarnation,
            seq: self.committed.seq,
            depth: self.sb.depth,
        }
    }

    fn begin_op(&mut self) -> Result<(), StoreError> {
        self.write_home()?;
        if self.failed {
            return Err(StoreError::Failed);
        }
        if self.poisoned {
            return Err(StoreError::TxPoisoned);
        }
        if !self.has_room() {
            return Err(StoreError::TxFull);
        }
        self.cache.begin_op();
        Ok(())
    }

    fn end_op<T>(&mut self, r: Result<T, StoreError>, modified: bool) -> Result<T, StoreError> {
        match &r {
            Ok(_) => {
                if modified {
                    self.tx_ops += 1;
                }
            }
            Err(e) => {
                if modified && !matches!(e, StoreError::Reclaiming { .. }) {
                    self.poisoned = true;
                }
            }
        }
        self.assert_invariants();
        r
    }

    fn check_chunk(&self, chunk: u64) -> Result<(), StoreError> {
        let origin_chunks = self.label.origin_chunks();
        if chunk >= origin_chunks {
            return Err(StoreError::ChunkOutOfRange {
                chunk,
                origin_chunks,
            });
        }
        Ok(())
    }

    // -- b-tree ------------------------------------------------------------

    // -- allocation ----------------------------------------------------------

    // -- usage accounting ----------------------------------------------------

    // -- mapping operations --------------------------------------------------

    /// Where snapshot `tag` reads `chunk` from.
    pub fn lookup(&mut self, tag: u32, chunk: u64) -> Result<Mapping, StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        self.check_chunk(chunk)?;
        let bit = self
            .sb
            .live_bit(tag)
            .ok_or(StoreError::NoSuchSnapshot(tag))?;
        self.cache.begin_op();
        let mut c = self.seek(chunk)?;
        while let Some(r) = self.next_record(&mut c, chunk)? {
            if r.mask.contains(bit) {
                return Ok(Mapping::Store(r.store));
            }
        }
        Ok(Mapping::Origin)
    }

    /// Which of the `n` (at most 64) chunks from `chunk` an origin write
    /// could land on without a copy-out (every live snapshot has its own
    /// copy): bit `k` for chunk `chunk + k`, none past the origin. Read only;
    /// one descent per leaf the window touches: the write-ahead grant's
    /// question (ARCHITECTURE 6).
    pub fn unique_bits(&mut self, chunk: u64, n: u32) -> Result<u64, StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        let end = chunk
            .saturating_add(u64::from(n.min(64)))
            .min(self.label.origin_chunks());
        let live = self.sb.live_mask();
        if live.is_empty() {
            let k = end.saturating_sub(chunk);
            return Ok(if k >= 64 { u64::MAX } else { (1u64 << k) - 1 });
        }
        let mut bits = 0u64;
        self.cache.begin_op();
        let mut cur = self.seek(chunk)?;
        let (mut at, mut union) = (u64::MAX, Mask::EMPTY);
        while let Some(r) = self.next_record(&mut cur, end - 1)? {
            if r.chunk != at {
                if at != u64::MAX && (live & !union).is_empty() {
                    bits |= 1 << (at - chunk);
                }
                (at, union) = (r.chunk, Mask::EMPTY);
            }
            union |= r.mask;
        }
        if at != u64::MAX && (live & !union).is_empty() {
            bits |= 1 << (at - chunk);
        }
        Ok(bits)
    }

    /// Which of `chunks` chunks from `chunk` differ between `volume` (a
    /// snapshot tag, or `None` for the origin) and snapshot `base`: bit `i`
    /// of `out` (byte `i / 8`, bit `i % 8`) is set when chunk `chunk + i`
    /// differs, every other bit of `out` is cleared. A snapshot differs
    /// from `base` where the two map the chunk to different places (the
    /// origin, or different store chunks); the origin differs where `base`
    /// holds an exception. Read only; one descent per leaf the range
    /// touches, so a range is as cheap as the leaves that hold it.
    ///
    /// # Errors
    ///
    /// `NoSuchSnapshot` for a snapshot that is not live, `ChunkOutOfRange`
    /// for a range past the origin (or `out` shorter than `chunks` bits),
    /// and what reading the tree can meet (`Corrupt`, `Disk`).
    pub fn delta(
        &mut self,
        volume: Option<u32>,
        base: u32,
        chunk: u64,
        chunks: u64,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Failed);
        }
        let origin_chunks = self.label.origin_chunks();
        let end = chunk.saturating_add(chunks);
        if end > origin_chunks || (out.len() as u64).saturating_mul(8) < chunks {
            return Err(StoreError::ChunkOutOfRange {
                chunk: end.saturating_sub(1),
                origin_chunks,
            });
        }
        let base_bit = self
            .sb
            .live_bit(base)
            .ok_or(StoreError::NoSuchSnapshot(base))?;
        let vol_bit = match volume {
            None => None,
            Some(t) => Some(self.sb.live_bit(t).ok_or(StoreError::NoSuchSnapshot(t))?),
        };
        out.fill(0);
        if chunks == 0 {
            return Ok(());
        }
        self.cache.begin_op();
        let mut cur = self.seek(chunk)?;
        let mut group: Option<(u64, Option<u64>, Option<u64>)> = None;
        let mut mark = |g: Option<(u64, Option<u64>, Option<u64>)>| {
            let Some((c, in_base, in_vol)) = g else {
                return;
            };
            let differs = match vol_bit {
                None => in_base.is_some(),
                Some(_) => in_base != in_vol,
            };
            if differs {
                let k = c - chunk;
                if let Some(byte) = usize::try_from(k / 8).ok().and_then(|k| out.get_mut(k)) {
                    *byte |= 1 << (k % 8);
                }
            }
        };
        while let Some(r) = self.next_record(&mut cur, end - 1)? {
            if group.is_none_or(|(c, _, _)| c != r.chunk) {
                mark(group);
                group = Some((r.chunk, None, None));
            }
            if let Some((_, in_base, in_vol)) = group.as_mut() {
                if r.mask.contains(base_bit) {
                    *in_base = Some(r.store);
                }
                if vol_bit.is_some_and(|v| r.mask.contains(v)) {
                    *in_vol = Some(r.store);
                }
            }
        }
        mark(group);
        Ok(())
    }

    /// Whether an origin write to `chunk` needs no copy-out (read only).
    pub fn origin_chunk_unique(&mut self, chunk: u64) -> Result<bool, StoreError> {
        self.check_chunk(chunk)?;
        let live = self.sb.live_mask();
        if live.is_empty() {
            return Ok(true);
        }
        self.cache.begin_op();
        let union = self.group_union(chunk)?;
        Ok((live & !union).is_empty())
    }

    // -- snapshots -------------------------------------------------------------

    // -- commit ------------------------------------------------------------------

    /// Checks the invariants that are cheap enough for every operation (a
    /// few dozen compares), in release builds too.
    pub fn assert_invariants(&self) {
        let sb = &self.sb;
        assert!(sb.depth >= 1 && usize::from(sb.depth) <= TREE_DEPTH_MAX);
        assert!(sb.data_free <= self.label.data_chunks);
        assert!(sb.meta_free <= self.label.meta_blocks);
        assert!(
            sb.root >= self.label.meta_start
                && sb.root < self.label.meta_start + self.label.meta_blocks
        );
        let (live, deleting) = (sb.live_mask(), sb.deleting_mask());
        assert!(
            !sb.delete_walk_mask.intersects(!deleting),
            "walk clears a bit not being deleted"
        );
        assert!(
            !self.in_use_mask.intersects(!live),
            "in-use mask names a dead snapshot"
        );
        assert!(self.cache.dirty_count() <= self.tx_cap_blocks + OP_DIRTY_BLOCKS_MAX);
        assert!(self.pending_frees.len() <= TX_FREES_MAX);
    }

    /// Checks every in-memory invariant, including the snapshot table and the
    /// cache index: O(cache size), run at every commit and open.
    pub fn assert_invariants_full(&self) {
        self.assert_invariants();
        let sb = &self.sb;
        for (i, s) in sb.snaps.iter().enumerate() {
            if s.state == SlotState::Free {
                assert_eq!(
                    (s.chunks, s.unique_chunks),
                    (0, 0),
                    "free slot {i} has usage"
                );
            } else {
                assert!(s.unique_chunks <= s.chunks);
            }
        }
        if let Some(tag) = sb.duplicate_live_tag() {
            panic!("two live snapshots share tag {tag}");
        }
        self.cache.assert_invariants();
    }
}
