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
//! caller performs copy-outs between an operation and the commit (the commit
//! flushes the store device before the journal write, so copied data is
//! durable before the metadata that points to it). See ARCHITECTURE.md
//! "Store" for the layout and the commit protocol.

#![forbid(unsafe_code)]

pub mod cache;
pub mod check;
pub mod disk;
pub mod journal;
pub mod layout;
pub mod mask;
pub mod tree;

use cache::{Cache, CacheError};
use csnap_pools::{
    BLOCK_SIZE_BYTES, CACHE_MIN_BLOCKS, OP_DIRTY_BLOCKS_MAX, PRIORITY_NEVER_DELETE, SNAPSHOTS_MAX,
    TREE_DEPTH_MAX, TX_BLOCKS_MAX, TX_FREES_MAX,
};
use disk::{Disk, DiskError};
pub use layout::StoreFullPolicy;
use layout::{
    BlockFault, BlockKind, Label, SlotState, SnapSlot, Super, BITMAP_BITS_PER_BLOCK, HEADER_BYTES,
    LEAF_RECORDS_MAX, NODE_ENTRIES_MAX,
};
use mask::Mask;
use tree::Record;

const BS: u64 = BLOCK_SIZE_BYTES as u64;

/// Errors of store operations. Variants used on the serving path carry no
/// heap data; `Invalid` is produced only while formatting or opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// A device access failed.
    Disk(DiskError),
    /// A metadata block failed verification.
    Corrupt {
        /// Block address.
        addr: u64,
        /// What the block was expected to be.
        kind: BlockKind,
        /// What is wrong with it.
        fault: BlockFault,
    },
    /// The store cannot be formatted or opened; the text says why.
    Invalid(String),
    /// No live snapshot has this tag.
    NoSuchSnapshot(u32),
    /// A live snapshot already has this tag.
    SnapshotExists(u32),
    /// All snapshot slots are live or still being deleted.
    TooManySnapshots,
    /// The chunk is past the end of the origin.
    ChunkOutOfRange {
        /// Chunk asked for.
        chunk: u64,
        /// Chunks of the origin.
        origin_chunks: u64,
    },
    /// No free store chunk and the policy refuses the copy-out, or no snapshot
    /// may be deleted to make room.
    StoreFull,
    /// No free store chunk; snapshots are being deleted to make room (`victim`
    /// names the one this call chose, if any). Commit, run `delete_step`, retry.
    Reclaiming {
        /// Tag of the snapshot this call chose for deletion.
        victim: Option<u32>,
    },
    /// The metadata area is full.
    MetadataFull,
    /// The open transaction cannot take another operation: commit first.
    TxFull,
    /// The metadata cache has no evictable block (too small for the workload).
    CacheFull,
    /// An operation failed midway; the open transaction must be aborted.
    TxPoisoned,
    /// A commit failed: the store must be reopened (which replays the journal).
    Failed,
    /// The tree reached its maximum depth.
    TreeTooDeep,
    /// A snapshot with this priority may not be changed this way.
    BadPriority(i8),
    /// A newer server incarnation has taken this store over (its superblock
    /// on disk carries a higher incarnation): this server must stop.
    Fenced {
        /// This server's incarnation.
        ours: u64,
        /// The incarnation on disk (0: the superblock was being rewritten
        /// by another writer).
        found: u64,
    },
    /// A takeover's claim was overwritten during its wait, every attempt:
    /// another server keeps writing the superblock.
    ClaimContested {
        /// The last incarnation claimed.
        claimed: u64,
        /// The incarnation found on disk after the wait.
        found: u64,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Disk(e) => write!(f, "store device error: {e}"),
            StoreError::Corrupt { addr, kind, fault } => {
                write!(f, "store metadata corrupt: {} at block {addr}: {fault}", kind.name())
            }
            StoreError::Invalid(s) => write!(f, "{s}"),
            StoreError::NoSuchSnapshot(t) => write!(f, "no snapshot with tag {t}"),
            StoreError::SnapshotExists(t) => write!(f, "snapshot {t} already exists"),
            StoreError::TooManySnapshots => write!(
                f,
                "the store holds {SNAPSHOTS_MAX} snapshots (live or being deleted); delete one first"
            ),
            StoreError::ChunkOutOfRange { chunk, origin_chunks } => write!(
                f,
                "chunk {chunk} is past the end of the origin ({origin_chunks} chunks)"
            ),
            StoreError::StoreFull => write!(
                f,
                "snapshot store is full: the copy-out was refused and the origin write must fail"
            ),
            StoreError::Reclaiming { victim: Some(t) } => write!(
                f,
                "snapshot store is full: deleting snapshot {t} (lowest priority, not in use) to make room"
            ),
            StoreError::Reclaiming { victim: None } => {
                write!(f, "snapshot store is full: waiting for a snapshot deletion to free room")
            }
            StoreError::MetadataFull => write!(f, "snapshot store metadata area is full"),
            StoreError::TxFull => write!(f, "transaction is full; commit first"),
            StoreError::CacheFull => write!(f, "metadata cache has no evictable block"),
            StoreError::TxPoisoned => {
                write!(f, "an operation failed midway; the transaction must be aborted")
            }
            StoreError::Failed => {
                write!(f, "a commit failed; the store must be reopened to recover")
            }
            StoreError::TreeTooDeep => write!(f, "exception tree reached its maximum depth"),
            StoreError::BadPriority(p) => write!(f, "bad priority {p}"),
            StoreError::Fenced { ours, found } => write!(
                f,
                "fenced: this server is incarnation {ours}, but the store now belongs to incarnation {found}; stopping"
            ),
            StoreError::ClaimContested { claimed, found } => write!(
                f,
                "takeover refused: incarnation {claimed} was claimed, but after the wait the store says {found}: another server is still writing it"
            ),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<DiskError> for StoreError {
    fn from(e: DiskError) -> Self {
        StoreError::Disk(e)
    }
}

impl From<CacheError> for StoreError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Disk(d) => StoreError::Disk(d),
            CacheError::Fault { addr, kind, fault } => StoreError::Corrupt { addr, kind, fault },
            CacheError::Full => StoreError::CacheFull,
        }
    }
}

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
    pub bit: u8,
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

/// Options for `format`.
#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    /// Origin size in bytes.
    pub origin_size_bytes: u64,
    /// Chunk size (power of two, 4 KiB..1 MiB).
    pub chunk_size_bytes: u32,
    /// Journal ring length in blocks.
    pub journal_blocks: u64,
    /// What to do when the store is full.
    pub policy: StoreFullPolicy,
    /// Store id.
    pub store_uuid: [u8; 16],
    /// Origin id.
    pub origin_uuid: [u8; 16],
    /// Format time.
    pub now_secs: u64,
}

impl FormatOptions {
    /// Defaults for an origin of `origin_size_bytes`; ids zero (set them).
    pub fn new(origin_size_bytes: u64) -> Self {
        FormatOptions {
            origin_size_bytes,
            chunk_size_bytes: csnap_pools::CHUNK_SIZE_DEFAULT_BYTES,
            journal_blocks: csnap_pools::JOURNAL_DEFAULT_BLOCKS,
            policy: StoreFullPolicy::Refuse,
            store_uuid: [0; 16],
            origin_uuid: [0; 16],
            now_secs: 0,
        }
    }
}

/// Metadata bytes reserved per data chunk: a 24-byte record in leaves that
/// may be half full after splits, index overhead, and room for leaves left
/// sparse by deletion.
pub const META_BYTES_PER_DATA_CHUNK: u64 = 128;

/// Computes the layout for a device of `size_bytes`.
pub fn plan_layout(size_bytes: u64, o: &FormatOptions) -> Result<Label, StoreError> {
    let c = o.chunk_size_bytes;
    if !(csnap_pools::CHUNK_SIZE_MIN_BYTES..=csnap_pools::CHUNK_SIZE_MAX_BYTES).contains(&c)
        || !c.is_power_of_two()
    {
        return Err(StoreError::Invalid(format!(
            "chunk size {c} must be a power of two from 4096 (4 KiB) to 1048576 (1 MiB)"
        )));
    }
    if o.journal_blocks < csnap_pools::JOURNAL_MIN_BLOCKS {
        return Err(StoreError::Invalid(format!(
            "journal of {} blocks is too small; the minimum is {}",
            o.journal_blocks,
            csnap_pools::JOURNAL_MIN_BLOCKS
        )));
    }
    let c64 = u64::from(c);
    if o.origin_size_bytes < c64 {
        return Err(StoreError::Invalid(format!(
            "origin of {} bytes is smaller than one chunk ({c} bytes)",
            o.origin_size_bytes
        )));
    }
    let layout_for = |d: u64| -> Label {
        let meta_blocks = (d * META_BYTES_PER_DATA_CHUNK).div_ceil(BS) + 64;
        let meta_bitmap_blocks = meta_blocks.div_ceil(BITMAP_BITS_PER_BLOCK);
        let data_bitmap_blocks = d.div_ceil(BITMAP_BITS_PER_BLOCK).max(1);
        let journal_start = 2;
        let meta_bitmap_start = journal_start + o.journal_blocks;
        let data_bitmap_start = meta_bitmap_start + meta_bitmap_blocks;
        let meta_start = data_bitmap_start + data_bitmap_blocks;
        let meta_end_bytes = (meta_start + meta_blocks) * BS;
        let data_start_bytes = meta_end_bytes.div_ceil(c64) * c64;
        Label {
            store_uuid: o.store_uuid,
            origin_uuid: o.origin_uuid,
            origin_size_bytes: o.origin_size_bytes,
            chunk_size_bytes: c,
            store_size_bytes: size_bytes,
            journal_start,
            journal_blocks: o.journal_blocks,
            meta_bitmap_start,
            meta_bitmap_blocks,
            data_bitmap_start,
            data_bitmap_blocks,
            meta_start,
            meta_blocks,
            data_start_bytes,
            data_chunks: d,
            policy: o.policy,
            created_secs: o.now_secs,
        }
    };
    let mut d = size_bytes / c64;
    for _ in 0..64 {
        if d == 0 {
            break;
        }
        let l = layout_for(d);
        let end = l.data_start_bytes + d * c64;
        if end <= size_bytes {
            return Ok(l);
        }
        let excess = end - size_bytes;
        d = d.saturating_sub(excess.div_ceil(c64).max(1));
    }
    let min = layout_for(1);
    Err(StoreError::Invalid(format!(
        "store device of {size_bytes} bytes is too small: chunk size {c} and a journal of {} blocks need at least {} bytes",
        o.journal_blocks,
        min.data_start_bytes + c64
    )))
}

fn set_bit(b: &mut [u8], bit: u64) {
    let byte = HEADER_BYTES + usize::try_from(bit / 8).unwrap_or(0);
    b[byte] |= 1 << (bit % 8);
}

fn clear_bit(b: &mut [u8], bit: u64) -> bool {
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

/// Formats `disk` as an empty store.
pub fn format<D: Disk>(disk: &mut D, o: &FormatOptions) -> Result<Label, StoreError> {
    let size = disk.size_bytes();
    let label = plan_layout(size, o)?;
    let mut b = vec![0u8; BLOCK_SIZE_BYTES];
    // Invalidate any old label first, so an interrupted format is not taken
    // for the store it replaces.
    disk.write_at(&b, 0)?;
    disk.flush()?;
    // Zero the journal so no commit of an earlier store is ever replayed.
    let zeros = vec![0u8; 64 * BLOCK_SIZE_BYTES];
    let mut blk = 0;
    while blk < label.journal_blocks {
        let n = (label.journal_blocks - blk).min(64);
        let len = usize::try_from(n).unwrap_or(64) * BLOCK_SIZE_BYTES;
        disk.write_at(&zeros[..len], (label.journal_start + blk) * BS)?;
        blk += n;
    }
    // Bitmaps: the root leaf (metadata block 0) is in use; bits past the end
    // of each area are set so they are never allocated.
    let write_bitmaps = |disk: &mut D,
                         b: &mut [u8],
                         start: u64,
                         nblocks: u64,
                         area: u64,
                         used: &[u64]|
     -> Result<(), StoreError> {
        for i in 0..nblocks {
            b.fill(0);
            layout::init_header(b, BlockKind::Bitmap, start + i);
            let first = i * BITMAP_BITS_PER_BLOCK;
            for bit in 0..BITMAP_BITS_PER_BLOCK {
                let idx = first + bit;
                if idx >= area || used.contains(&idx) {
                    set_bit(b, bit);
                }
            }
            layout::seal(b, 0);
            disk.write_at(b, (start + i) * BS)?;
        }
        Ok(())
    };
    write_bitmaps(
        disk,
        &mut b,
        label.meta_bitmap_start,
        label.meta_bitmap_blocks,
        label.meta_blocks,
        &[0],
    )?;
    write_bitmaps(
        disk,
        &mut b,
        label.data_bitmap_start,
        label.data_bitmap_blocks,
        label.data_chunks,
        &[],
    )?;
    // The empty root leaf.
    b.fill(0);
    layout::init_header(&mut b, BlockKind::Leaf, label.meta_start);
    tree::leaf_init(&mut b);
    layout::seal(&mut b, 0);
    disk.write_at(&b, label.meta_start * BS)?;
    // The superblock.
    let sb = Super {
        seq: 0,
        journal_last_slot: 0,
        journal_next_slot: 0,
        incarnation: 0,
        root: label.meta_start,
        depth: 1,
        meta_free: label.meta_blocks - 1,
        data_free: label.data_chunks,
        meta_cursor: 1,
        data_cursor: 0,
        delete_walk_mask: Mask::EMPTY,
        delete_cursor: 0,
        snaps: [SnapSlot::FREE; SNAPSHOTS_MAX],
    };
    sb.encode(&mut b);
    layout::seal(&mut b, 0);
    disk.write_at(&b, layout::SUPER_BLOCK * BS)?;
    disk.flush()?;
    // The label last: a store is formatted once its label is durable.
    label.encode(&mut b);
    disk.write_at(&b, 0)?;
    disk.flush()?;
    Ok(label)
}

/// Reads and validates the label of a store device.
pub fn read_label<D: Disk>(disk: &mut D) -> Result<Label, StoreError> {
    let mut b = vec![0u8; BLOCK_SIZE_BYTES];
    read_label_into(disk, &mut b)
}

/// `read_label` into a caller's block buffer: allocates nothing unless it
/// fails (its error text).
pub fn read_label_into<D: Disk>(disk: &mut D, b: &mut [u8]) -> Result<Label, StoreError> {
    let size = disk.size_bytes();
    if size < 2 * BS {
        return Err(StoreError::Invalid(format!(
            "not a csnap store: the device is only {size} bytes (truncated or empty)"
        )));
    }
    disk.read_at(b, 0)?;
    match layout::verify(b, layout::LABEL_BLOCK, BlockKind::Label) {
        Ok(_) => {}
        Err(BlockFault::Magic) => {
            return Err(StoreError::Invalid(if b.iter().all(|&x| x == 0) {
                "not a csnap store: block 0 is empty (never formatted, or the format was interrupted)".into()
            } else {
                "not a csnap store: block 0 carries no csnap label (foreign data)".into()
            }))
        }
        Err(BlockFault::Version { found }) => {
            return Err(StoreError::Invalid(format!(
                "store label has format version {found}; this csnap reads version {}",
                layout::FORMAT_VERSION
            )))
        }
        Err(f) => return Err(StoreError::Invalid(format!("store label is corrupt: {f}"))),
    }
    let label = Label::decode(b).map_err(|e| StoreError::Invalid(format!("store label: {e}")))?;
    label.validate(size).map_err(StoreError::Invalid)?;
    Ok(label)
}

/// `read_label_into` for a sealed start: every failure is a heap-free
/// `Corrupt` naming block 0 (the tools read the label with `read_label`
/// first, whose errors are worded with their numbers).
fn read_label_checked<D: Disk>(disk: &mut D, b: &mut [u8]) -> Result<Label, StoreError> {
    let corrupt = |fault| StoreError::Corrupt {
        addr: layout::LABEL_BLOCK,
        kind: BlockKind::Label,
        fault,
    };
    let size = disk.size_bytes();
    if size < 2 * BS {
        return Err(corrupt(BlockFault::Structure {
            reason: "the device is too small to hold a store",
        }));
    }
    disk.read_at(b, 0)?;
    layout::verify(b, layout::LABEL_BLOCK, BlockKind::Label).map_err(corrupt)?;
    let label = Label::decode(b).map_err(|reason| corrupt(BlockFault::Structure { reason }))?;
    label
        .check(size)
        .map_err(|reason| corrupt(BlockFault::Structure { reason }))?;
    Ok(label)
}

/// A standby store: its memory reserved (cache, journal staging, free list)
/// and its device open, nothing read. `start` turns it into a serving store
/// without allocating: read the label and superblock, replay the journal.
#[derive(Debug)]
pub struct Standby<D: Disk> {
    disk: D,
    cache_blocks: usize,
    cache: Cache,
    staging: disk::IoBuf,
    pending_frees: Vec<Free>,
    entries: Vec<journal::Entry>,
    block_buf: disk::IoBuf,
    /// The incarnation this standby claimed (0: none): the start's replay
    /// keeps it in the superblock it redoes.
    claimed: u64,
}

impl<D: Disk> Standby<D> {
    /// Claims the store for a takeover whose former server may still be
    /// running (on another host, paused, cut off), before anything else is
    /// read: writes the home superblock back with the incarnation two
    /// above the one it holds (the last commit in the journal can be one
    /// above home), flushes, waits `wait`, and reads it again. A former
    /// server's fence read from then on finds it newer and stops it; one
    /// that read the fence before has a lease shorter than the wait, so
    /// its writes are on the disk before this start reads anything. A claim
    /// overwritten during the wait (that server's home write of the
    /// superblock) is made again, `SERVER_CLAIM_ATTEMPTS_MAX` times in
    /// all. A home superblock that does not verify (a torn write) cannot
    /// be claimed: the wait alone is kept, and the start's replay repairs
    /// it. Returns the incarnation claimed (0: none). Allocates nothing.
    ///
    /// What it cannot close: a former server paused between its lease
    /// check and the write system call, or a write held in a queue longer
    /// than the wait's margin. Only fencing at the device (STONITH, a
    /// detached device, SCSI reservations) closes that.
    pub fn claim(&mut self, wait: std::time::Duration) -> Result<u64, StoreError> {
        let mut found = 0;
        let mut claimed = 0;
        for _ in 0..csnap_pools::SERVER_CLAIM_ATTEMPTS_MAX {
            let Standby {
                disk, block_buf, ..
            } = self;
            disk.read_at(block_buf, layout::SUPER_BLOCK * BS)?;
            let home = layout::verify(block_buf, layout::SUPER_BLOCK, BlockKind::Super)
                .ok()
                .and_then(|h| Some((h.seq, Super::decode(block_buf).ok()?)));
            let Some((seq, mut sb)) = home else {
                std::thread::sleep(wait);
                return Ok(0);
            };
            claimed = sb.incarnation.max(found).saturating_add(2);
            sb.incarnation = claimed;
            sb.encode(block_buf);
            layout::seal(block_buf, seq);
            disk.write_at(block_buf, layout::SUPER_BLOCK * BS)?;
            disk.flush()?;
            std::thread::sleep(wait);
            disk.read_at(block_buf, layout::SUPER_BLOCK * BS)?;
            found = layout::verify(block_buf, layout::SUPER_BLOCK, BlockKind::Super)
                .ok()
                .and_then(|_| Super::decode(block_buf).ok())
                .map_or(0, |sb| sb.incarnation);
            if found >= claimed {
                self.claimed = found;
                return Ok(found);
            }
        }
        Err(StoreError::ClaimContested { claimed, found })
    }

    /// Reserves every buffer the store will use. Reads nothing.
    pub fn reserve(disk: D, opts: &OpenOptions) -> Result<Self, StoreError> {
        if opts.cache_blocks < CACHE_MIN_BLOCKS {
            return Err(StoreError::Invalid(format!(
                "metadata cache of {} blocks is below the minimum of {CACHE_MIN_BLOCKS}",
                opts.cache_blocks
            )));
        }
        Ok(Standby {
            disk,
            cache_blocks: opts.cache_blocks,
            cache: Cache::new(opts.cache_blocks),
            staging: disk::io_buf(journal::REPLAY_BUFFER_BLOCKS * BLOCK_SIZE_BYTES),
            pending_frees: Vec::with_capacity(TX_FREES_MAX),
            entries: Vec::with_capacity(TX_BLOCKS_MAX + 1),
            block_buf: disk::io_buf(BLOCK_SIZE_BYTES),
            claimed: 0,
        })
    }

    /// Starts: validates the label, replays the journal, loads the
    /// superblock, reads and checks the tree root. Allocates nothing unless
    /// it fails (and then only in `Invalid` errors, which a start never
    /// returns: its failures are heap-free `Disk` and `Corrupt`).
    pub fn start(self) -> Result<Store<D>, StoreError> {
        self.try_start().map_err(|(_, e)| e)
    }

    /// `start` that hands the standby back on failure, so a confined
    /// process neither frees its buffers nor closes its device (no syscall
    /// outside its whitelist) before it reports the reason and exits.
    // Boxing the large error would allocate in a sealed process.
    #[allow(clippy::result_large_err)]
    pub fn try_start(mut self) -> Result<Store<D>, (Self, StoreError)> {
        let (label, sb, replay) = match self.read_state() {
            Ok(x) => x,
            Err(e) => return Err((self, e)),
        };
        let Standby {
            disk,
            cache_blocks,
            cache,
            staging,
            pending_frees,
            entries,
            block_buf,
            claimed,
        } = self;
        // Two consecutive commits (the last one must survive the next) plus the
        // wrap gap fit in the ring: 3 * (cap + 1) + 3 <= journal blocks.
        let journal_third = usize::try_from((label.journal_blocks - 6) / 3).unwrap_or(usize::MAX);
        let tx_cap_blocks = TX_BLOCKS_MAX
            .min(journal_third)
            .min(cache_blocks - csnap_pools::OP_TOUCHED_BLOCKS_MAX);
        let mut store = Store {
            disk,
            label,
            sb,
            committed: sb,
            cache,
            pending_frees,
            staging,
            entries,
            tx_cap_blocks,
            tx_ops: 0,
            poisoned: false,
            failed: false,
            in_use_mask: Mask::EMPTY,
            replay,
            fence_buf: block_buf,
            // After the replay's flush (or a format's), home is durable.
            home_durable: true,
            data_written: false,
            lease: None,
            fence_ok_at: None,
        };
        // The root is read (and checked) now: a store whose root is
        // nonsense refuses to start instead of failing every request.
        let root_kind = if store.sb.depth == 1 {
            BlockKind::Leaf
        } else {
            BlockKind::Node
        };
        store.cache.begin_op();
        if let Err(e) = store.block(store.sb.root, root_kind) {
            let Store {
                disk,
                mut cache,
                pending_frees,
                staging,
                entries,
                fence_buf,
                ..
            } = store;
            cache.discard_all();
            return Err((
                Standby {
                    disk,
                    cache_blocks,
                    cache,
                    staging,
                    pending_frees,
                    entries,
                    block_buf: fence_buf,
                    claimed,
                },
                e,
            ));
        }
        store.assert_invariants_full();
        Ok(store)
    }

    /// The label, the journal replay and the superblock, each checked.
    fn read_state(&mut self) -> Result<(Label, Super, journal::ReplayReport), StoreError> {
        let Standby {
            disk,
            staging,
            block_buf,
            claimed,
            ..
        } = self;
        let claimed = *claimed;
        let label = read_label_checked(disk, block_buf)?;
        // Redo only what differs at home: after a clean stop or a process
        // kill the home copies are already there, and a start that writes
        // nothing needs no flush.
        let mut rewrote = false;
        let replay = journal::replay(disk, &label, staging, &mut |d, home, img| {
            if home == layout::SUPER_BLOCK && claimed > 0 {
                // A claimed store: the superblock redone keeps the claim,
                // or a former server's fence read would pass again.
                if let (Ok(h), Ok(mut sb)) = (
                    layout::verify(img, layout::SUPER_BLOCK, BlockKind::Super),
                    Super::decode(img),
                ) {
                    sb.incarnation = sb.incarnation.max(claimed);
                    sb.encode(block_buf);
                    layout::seal(block_buf, h.seq);
                    d.write_at(block_buf, home * BS)?;
                    rewrote = true;
                    return Ok(());
                }
            }
            d.read_at(block_buf, home * BS)?;
            if block_buf[..] != *img {
                d.write_at(img, home * BS)?;
                rewrote = true;
            }
            Ok(())
        })?;
        if rewrote {
            disk.flush()?;
        }
        // Everything from here fails heap-free (a standby starts sealed): a
        // corrupt block is named by its address and a static reason.
        disk.read_at(block_buf, layout::SUPER_BLOCK * BS)?;
        let super_corrupt = |fault| StoreError::Corrupt {
            addr: layout::SUPER_BLOCK,
            kind: BlockKind::Super,
            fault,
        };
        layout::verify(block_buf, layout::SUPER_BLOCK, BlockKind::Super).map_err(super_corrupt)?;
        let sb = Super::decode(block_buf)
            .map_err(|reason| super_corrupt(BlockFault::Structure { reason }))?;
        sb.check(&label)
            .map_err(|reason| super_corrupt(BlockFault::Structure { reason }))?;
        Ok((label, sb, replay))
    }
}

/// Options for `Store::open`.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Metadata cache size in blocks.
    pub cache_blocks: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_blocks: csnap_pools::CACHE_DEFAULT_BLOCKS,
        }
    }
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
    /// The first key past the leaf's range (`u64::MAX`: the last leaf).
    hi: u64,
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
    /// The home copies of every committed block are durable (no home write
    /// since the last flush).
    home_durable: bool,
    /// The device was handed out (`disk_mut`) since the last flush.
    data_written: bool,
    /// The lease (`set_lease`): writes only within it of a good fence read.
    lease: Option<std::time::Duration>,
    /// When the last fence read that found no newer incarnation began.
    fence_ok_at: Option<std::time::Instant>,
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

    /// The device.
    pub fn disk_mut(&mut self) -> &mut D {
        // Whatever the caller writes (copy-outs) must be flushed before the
        // next commit's journal write.
        self.data_written = true;
        &mut self.disk
    }

    /// Closes the store, returning the device. Uncommitted changes are lost.
    pub fn into_disk(self) -> D {
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
        self.cache.dirty_count() > 0 || self.sb != self.committed || !self.pending_frees.is_empty()
    }

    /// Whether another mapping operation fits in the open transaction.
    pub fn has_room(&self) -> bool {
        self.cache.dirty_count() + OP_DIRTY_BLOCKS_MAX <= self.tx_cap_blocks
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

    /// Live and deleting snapshots, by share bit.
    pub fn snapshots(&self) -> impl Iterator<Item = SnapshotInfo> + '_ {
        self.sb
            .snaps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state != SlotState::Free)
            .map(|(i, s)| SnapshotInfo {
                tag: s.tag,
                bit: u8::try_from(i).unwrap_or(u8::MAX),
                priority: s.priority,
                ctime_secs: s.ctime_secs,
                chunks: s.chunks,
                unique_chunks: s.unique_chunks,
                deleting: s.state == SlotState::Deleting,
                in_use: self.in_use_mask.contains(i),
            })
    }

    /// The live snapshot with `tag`.
    pub fn snapshot(&self, tag: u32) -> Option<SnapshotInfo> {
        self.snapshots().find(|s| s.tag == tag && !s.deleting)
    }

    /// Marks a snapshot in use (a client has it open) or not. In use
    /// snapshots are never chosen by the store-full policy. Not persistent.
    pub fn set_in_use(&mut self, tag: u32, in_use: bool) -> Result<(), StoreError> {
        let bit = self
            .sb
            .live_bit(tag)
            .ok_or(StoreError::NoSuchSnapshot(tag))?;
        if in_use {
            self.in_use_mask.insert(bit);
        } else {
            self.in_use_mask.remove(bit);
        }
        Ok(())
    }

    fn begin_op(&mut self) -> Result<(), StoreError> {
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

    /// The path to the leaf that holds `key`. Every block on it passed its
    /// structural check when it was read (`block`); on the way down the
    /// levels must count down by one and each block's keys must lie in the
    /// range its parent gives it, so a corrupt tree is an error, never a
    /// wrong answer or an endless walk.
    fn descend(&mut self, key: u64) -> Result<Path, StoreError> {
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
    fn block(&mut self, addr: u64, kind: BlockKind) -> Result<usize, StoreError> {
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

    fn check_meta_addr(&self, addr: u64, kind: BlockKind) -> Result<(), StoreError> {
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
    fn insert_record(&mut self, r: Record) -> Result<(), StoreError> {
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

    // -- allocation ----------------------------------------------------------

    fn bitmap_geom(&self, area: Area) -> (u64, u64) {
        match area {
            Area::Meta => (self.label.meta_bitmap_start, self.label.meta_blocks),
            Area::Data => (self.label.data_bitmap_start, self.label.data_chunks),
        }
    }

    fn alloc(&mut self, area: Area) -> Result<u64, StoreError> {
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

    fn alloc_meta(&mut self) -> Result<u64, StoreError> {
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
    fn free(&mut self, area: Area, index: u64) -> Result<(), StoreError> {
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

    // -- usage accounting ----------------------------------------------------

    /// Moves usage counts from share mask `old` to `new`. Counts that
    /// disagree with the tree (a count would go below zero, or a snapshot
    /// would hold more unique chunks than chunks) are corruption of the
    /// superblock's table; every caller has modified the transaction by
    /// then, so the error poisons it and it is aborted.
    fn account(&mut self, old: Mask, new: Mask) -> Result<(), StoreError> {
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
        let path = self.descend(chunk)?;
        let b = self.cache.buf(path.leaf);
        let (lo, hi) = tree::leaf_find(b, chunk);
        for i in lo..hi {
            let r = tree::leaf_get(b, i);
            if r.mask.contains(bit) {
                return Ok(Mapping::Store(r.store));
            }
        }
        Ok(Mapping::Origin)
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
        let mut x = chunk;
        while x < end {
            self.cache.begin_op();
            let path = self.descend(x)?;
            let b = self.cache.buf(path.leaf);
            let n = tree::leaf_len(b);
            let mut i = tree::leaf_lower_bound(b, x);
            while i < n {
                let c = tree::leaf_get(b, i).chunk;
                if c >= end {
                    break;
                }
                let (mut in_base, mut in_vol) = (None, None);
                while i < n {
                    let r = tree::leaf_get(b, i);
                    if r.chunk != c {
                        break;
                    }
                    if r.mask.contains(base_bit) {
                        in_base = Some(r.store);
                    }
                    if vol_bit.is_some_and(|v| r.mask.contains(v)) {
                        in_vol = Some(r.store);
                    }
                    i += 1;
                }
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
            }
            if path.hi <= x || path.hi == u64::MAX {
                break;
            }
            x = path.hi;
        }
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
        let path = self.descend(chunk)?;
        let b = self.cache.buf(path.leaf);
        let (lo, hi) = tree::leaf_find(b, chunk);
        let union = (lo..hi).fold(Mask::EMPTY, |m, i| m | tree::leaf_get(b, i).mask);
        Ok((live & !union).is_empty())
    }

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

    fn origin_write_inner(
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

    fn alloc_data(&mut self, modified: &mut bool) -> Result<u64, StoreError> {
        if self.sb.data_free == 0 {
            return Err(self.store_full(modified));
        }
        if self.sb.meta_free < TREE_DEPTH_MAX as u64 + 2 {
            return Err(StoreError::MetadataFull);
        }
        self.alloc(Area::Data)
    }

    fn store_full(&mut self, modified: &mut bool) -> StoreError {
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

    fn snapshot_write_inner(
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

    // -- snapshots -------------------------------------------------------------

    /// Creates snapshot `tag`: instant, no tree work.
    pub fn create_snapshot(&mut self, tag: u32, now_secs: u64) -> Result<u8, StoreError> {
        self.begin_op()?;
        if self.sb.live_bit(tag).is_some() {
            return self.end_op(Err(StoreError::SnapshotExists(tag)), false);
        }
        let Some(bit) = self
            .sb
            .snaps
            .iter()
            .position(|s| s.state == SlotState::Free)
        else {
            return self.end_op(Err(StoreError::TooManySnapshots), false);
        };
        self.sb.snaps[bit] = SnapSlot {
            tag,
            state: SlotState::Live,
            priority: 0,
            ctime_secs: now_secs,
            chunks: 0,
            unique_chunks: 0,
        };
        self.in_use_mask.remove(bit);
        self.end_op(Ok(u8::try_from(bit).unwrap_or(u8::MAX)), true)
    }

    /// Deletes snapshot `tag`: it disappears at once (atomically with the
    /// commit); its chunks are reclaimed by `delete_step`.
    pub fn delete_snapshot(&mut self, tag: u32) -> Result<(), StoreError> {
        self.begin_op()?;
        if self.sb.live_bit(tag).is_none() {
            return self.end_op(Err(StoreError::NoSuchSnapshot(tag)), false);
        }
        self.mark_deleted(tag);
        self.end_op(Ok(()), true)
    }

    fn mark_deleted(&mut self, tag: u32) {
        let Some(bit) = self.sb.live_bit(tag) else {
            return;
        };
        self.in_use_mask.remove(bit);
        if self.sb.snaps[bit].chunks == 0 {
            // Its bit is in no share mask: the slot is free at once.
            self.sb.snaps[bit] = SnapSlot::FREE;
            return;
        }
        self.sb.snaps[bit].state = SlotState::Deleting;
        if self.sb.delete_walk_mask.is_empty() {
            self.sb.delete_walk_mask = self.sb.deleting_mask();
            self.sb.delete_cursor = 0;
        }
    }

    /// Sets a snapshot's priority.
    pub fn set_priority(&mut self, tag: u32, priority: i8) -> Result<(), StoreError> {
        self.begin_op()?;
        let Some(bit) = self.sb.live_bit(tag) else {
            return self.end_op(Err(StoreError::NoSuchSnapshot(tag)), false);
        };
        self.sb.snaps[bit].priority = priority;
        self.end_op(Ok(()), true)
    }

    /// Takes the next incarnation (in the open transaction; commit it before
    /// serving).
    pub fn bump_incarnation(&mut self) -> Result<u64, StoreError> {
        self.begin_op()?;
        self.sb.incarnation += 1;
        let inc = self.sb.incarnation;
        self.end_op(Ok(inc), true)
    }

    /// Reads the home superblock and fails with `Fenced` if another server
    /// has taken the next incarnation (or is rewriting the superblock). Run
    /// by every commit before it writes anything. On a shared block device
    /// this must bypass the page cache (O_DIRECT) to see other nodes' writes.
    pub fn check_fence(&mut self) -> Result<(), StoreError> {
        let began = self.lease.map(|_| std::time::Instant::now());
        let ours = self.committed.incarnation.max(self.sb.incarnation);
        self.disk
            .read_at(&mut self.fence_buf, layout::SUPER_BLOCK * BS)?;
        let found = match layout::verify(&self.fence_buf, layout::SUPER_BLOCK, BlockKind::Super) {
            Ok(_) => Super::decode(&self.fence_buf).map_or(0, |sb| sb.incarnation),
            Err(_) => 0,
        };
        if found == 0 && self.committed.seq == 0 {
            // A freshly formatted store's superblock says incarnation 0.
            self.fence_ok_at = began;
            return Ok(());
        }
        if found > ours || (found == 0 && ours > 0) {
            return Err(StoreError::Fenced { ours, found });
        }
        self.fence_ok_at = began;
        Ok(())
    }

    /// Gives the store a lease (a serving server's, `SERVER_LEASE_MS`):
    /// from now on every write of the device (journal, home blocks,
    /// `write_data`) is made only within `lease` of the start of a fence
    /// read that found no newer incarnation, and reads the fence again
    /// first when it is older. Without one (tools, simulations) only the
    /// commit's own fence read guards the writes.
    pub fn set_lease(&mut self, lease: std::time::Duration) {
        self.lease = Some(lease);
        self.fence_ok_at = None;
    }

    /// Renews the lease when it ran out (see `set_lease`); `Fenced` when a
    /// newer incarnation has the store.
    fn within_lease(&mut self) -> Result<(), StoreError> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        if self.fence_ok_at.is_none_or(|t| t.elapsed() >= lease) {
            self.check_fence()?;
        }
        Ok(())
    }

    /// Writes copy-out data at byte `off` of the device, within the lease.
    pub fn write_data(&mut self, buf: &[u8], off: u64) -> Result<(), StoreError> {
        self.within_lease()?;
        self.data_written = true;
        self.disk.write_at(buf, off)?;
        Ok(())
    }

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

    fn delete_step_inner(
        &mut self,
        max_records: usize,
        modified: &mut bool,
    ) -> Result<DeleteProgress, StoreError> {
        let walk = self.sb.delete_walk_mask;
        let mut done = 0usize;
        loop {
            let cursor = self.sb.delete_cursor;
            let path = self.descend(cursor)?;
            let mut i = tree::leaf_lower_bound(self.cache.buf(path.leaf), cursor);
            while i < tree::leaf_len(self.cache.buf(path.leaf)) {
                let r = tree::leaf_get(self.cache.buf(path.leaf), i);
                if done >= max_records
                    || self.cache.dirty_count() + 3 > self.tx_cap_blocks
                    || self.pending_frees.len() >= TX_FREES_MAX
                {
                    self.sb.delete_cursor = r.chunk;
                    *modified = true;
                    return Ok(DeleteProgress::Working);
                }
                done += 1;
                let nm = r.mask & !walk;
                if nm == r.mask {
                    i += 1;
                    continue;
                }
                *modified = true;
                self.account(r.mask, nm)?;
                self.cache.mark_dirty(path.leaf);
                if nm.is_empty() {
                    tree::leaf_remove(self.cache.buf_mut(path.leaf), i);
                    self.free(Area::Data, r.store)?;
                } else {
                    tree::leaf_set_mask(self.cache.buf_mut(path.leaf), i, nm);
                    i += 1;
                }
            }
            // Next leaf: the lowest key right of this one on the path.
            let mut next = None;
            for lvl in (0..path.len).rev() {
                let (slot, idx) = path.nodes[lvl];
                let b = self.cache.buf(slot);
                if idx + 1 < tree::node_len(b) {
                    next = Some(tree::node_key(b, idx + 1));
                    break;
                }
            }
            *modified = true;
            match next {
                Some(k) if k <= cursor => {
                    return Err(StoreError::Corrupt {
                        addr: self.cache.addr_of(path.leaf),
                        kind: BlockKind::Leaf,
                        fault: BlockFault::Structure {
                            reason: "the next leaf's key does not follow this one's",
                        },
                    });
                }
                Some(k) => {
                    self.sb.delete_cursor = k;
                    if done >= max_records {
                        return Ok(DeleteProgress::Working);
                    }
                }
                None => {
                    // The pass is complete: the walked bits are in no mask.
                    for b in walk.slots() {
                        if self.sb.snaps[b].chunks != 0 {
                            // The tree holds none of its bits any more, the
                            // table says it still owns chunks.
                            return Err(StoreError::Corrupt {
                                addr: layout::SUPER_BLOCK,
                                kind: BlockKind::Super,
                                fault: BlockFault::Structure {
                                    reason:
                                        "a deleted snapshot's usage count disagrees with the tree",
                                },
                            });
                        }
                        self.sb.snaps[b] = SnapSlot::FREE;
                    }
                    self.sb.delete_walk_mask = Mask::EMPTY;
                    self.sb.delete_cursor = 0;
                    return Ok(if !self.sb.deleting_mask().is_empty() {
                        DeleteProgress::Working
                    } else {
                        DeleteProgress::Idle
                    });
                }
            }
        }
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

    // -- commit ------------------------------------------------------------------

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

    fn commit_inner(&mut self) -> Result<CommitInfo, StoreError> {
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
            if s.state == SlotState::Live {
                let dup = sb.snaps[i + 1..]
                    .iter()
                    .any(|t| t.state == SlotState::Live && t.tag == s.tag);
                assert!(!dup, "two live snapshots share tag {}", s.tag);
            }
        }
        self.cache.assert_invariants();
    }
}

/// Sanity of a decoded superblock against the label (`Super::check`, with
/// the numbers of the first rules).
pub fn validate_super(label: &Label, sb: &Super) -> Result<(), String> {
    let meta_end = label.meta_start + label.meta_blocks;
    if sb.root < label.meta_start || sb.root >= meta_end {
        return Err(format!(
            "superblock: tree root {} is outside the metadata area",
            sb.root
        ));
    }
    if sb.depth == 0 || usize::from(sb.depth) > TREE_DEPTH_MAX {
        return Err(format!(
            "superblock: tree depth {} is out of range",
            sb.depth
        ));
    }
    if sb.data_free > label.data_chunks || sb.meta_free > label.meta_blocks {
        return Err("superblock: free counts exceed the areas".into());
    }
    if sb.journal_next_slot > label.journal_blocks || sb.journal_last_slot >= label.journal_blocks {
        return Err("superblock: journal position is outside the journal".into());
    }
    if sb.delete_walk_mask.intersects(!sb.deleting_mask()) {
        return Err("superblock: delete pass clears a snapshot that is not being deleted".into());
    }
    Ok(())
}
