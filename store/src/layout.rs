//! On-disk layout: the common metadata block header and checksum, the label
//! (block 0, written once at format), and the superblock (block 1, journaled).
//!
//! Every integer is little-endian. Every metadata block starts with the same
//! 32-byte header and carries a crc32c over its whole contents (with the crc
//! field zeroed) seeded with its own block address, so a torn write and a
//! write that landed at the wrong address are both detected on read.

use csnap_pools::{BLOCK_SIZE_BYTES, SHARE_MASK_WORDS, SNAPSHOTS_MAX};

use crate::mask::Mask;

/// `b"csnp"` as a little-endian u32, at offset 0 of every metadata block.
pub const BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"csnp");
/// Format version written in every block header and the label.
pub const FORMAT_VERSION: u16 = 1;
/// Format version of a commit block that vouches for its data by checksum
/// (and of its data-checksum block): the single-flush commit
/// (ARCHITECTURE 2.6). Every other block, and a commit whose data was
/// flushed before it, stays at `FORMAT_VERSION`; a csnap that reads only
/// version 1 stops its replay at the first version-2 commit, so a store
/// this csnap wrote must not be opened by an older one.
pub const COMMIT_VERIFIED_VERSION: u16 = 2;
/// Format version of a superblock whose snapshot table lives in table
/// blocks of the metadata area (`BlockKind::SnapTable`) instead of inside
/// it (#13: a table of 1024 snapshots is 32 KiB). A store is upgraded to
/// it in place at its first commit after an open (ARCHITECTURE 2.4); a
/// csnap that reads only version 1 refuses the store then.
pub const SUPER_TABLE_VERSION: u16 = 2;
/// Bytes of the common header.
pub const HEADER_BYTES: usize = 32;

/// What a metadata block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum BlockKind {
    /// Block 0: geometry, written once.
    Label = 1,
    /// Block 1: the journaled root of all mutable state.
    Super = 2,
    /// A journal commit block.
    Commit = 3,
    /// An allocation bitmap block.
    Bitmap = 4,
    /// A b-tree index node.
    Node = 5,
    /// A b-tree leaf.
    Leaf = 6,
    /// The data-checksum block of a single-flush commit (journal only).
    DataCrcs = 7,
    /// A block of the snapshot table (a version-2 superblock points to it).
    SnapTable = 8,
}

impl BlockKind {
    /// Decodes a kind field.
    pub fn from_u16(v: u16) -> Option<BlockKind> {
        Some(match v {
            1 => BlockKind::Label,
            2 => BlockKind::Super,
            3 => BlockKind::Commit,
            4 => BlockKind::Bitmap,
            5 => BlockKind::Node,
            6 => BlockKind::Leaf,
            7 => BlockKind::DataCrcs,
            8 => BlockKind::SnapTable,
            _ => return None,
        })
    }

    /// Name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Label => "label",
            BlockKind::Super => "superblock",
            BlockKind::Commit => "journal commit block",
            BlockKind::Bitmap => "bitmap block",
            BlockKind::Node => "b-tree index node",
            BlockKind::Leaf => "b-tree leaf",
            BlockKind::DataCrcs => "journal data-checksum block",
            BlockKind::SnapTable => "snapshot table block",
        }
    }
}

// Header field offsets.
const OFF_MAGIC: usize = 0;
const OFF_CRC: usize = 4;
const OFF_KIND: usize = 8;
const OFF_VERSION: usize = 10;
const OFF_LEVEL: usize = 12;
const OFF_COUNT: usize = 14;
const OFF_ADDR: usize = 16;
const OFF_SEQ: usize = 24;

/// Little-endian field access on a byte slice.
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
/// Reads a little-endian u32.
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
/// Reads a little-endian u64.
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
/// Writes a little-endian u16.
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
/// Writes a little-endian u32.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
/// Writes a little-endian u64.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The decoded common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Block kind.
    pub kind: BlockKind,
    /// Tree level for nodes and leaves (leaf = 0); 0 otherwise.
    pub level: u16,
    /// Entry count for kinds that have entries.
    pub count: u16,
    /// Block address this image belongs at.
    pub addr: u64,
    /// Sequence of the commit that wrote this image.
    pub seq: u64,
}

/// Initialises the header of a block image (crc left for `seal`).
pub fn init_header(b: &mut [u8], kind: BlockKind, addr: u64) {
    debug_assert_eq!(b.len(), BLOCK_SIZE_BYTES);
    b[..HEADER_BYTES].fill(0);
    put_u32(b, OFF_MAGIC, BLOCK_MAGIC);
    put_u16(b, OFF_KIND, kind as u16);
    put_u16(b, OFF_VERSION, FORMAT_VERSION);
    put_u64(b, OFF_ADDR, addr);
}

/// Entry count field.
pub fn count(b: &[u8]) -> u16 {
    get_u16(b, OFF_COUNT)
}
/// Sets the entry count field.
pub fn set_count(b: &mut [u8], n: u16) {
    put_u16(b, OFF_COUNT, n);
}
/// Level field.
pub fn level(b: &[u8]) -> u16 {
    get_u16(b, OFF_LEVEL)
}
/// Sets the version field (a commit that vouches for its data by checksum:
/// `COMMIT_VERIFIED_VERSION`).
pub fn set_version(b: &mut [u8], v: u16) {
    put_u16(b, OFF_VERSION, v);
}
/// Version field.
pub fn version(b: &[u8]) -> u16 {
    get_u16(b, OFF_VERSION)
}
/// Sets the level field.
pub fn set_level(b: &mut [u8], l: u16) {
    put_u16(b, OFF_LEVEL, l);
}
/// Address field.
pub fn addr(b: &[u8]) -> u64 {
    get_u64(b, OFF_ADDR)
}
/// Sequence field.
pub fn seq(b: &[u8]) -> u64 {
    get_u64(b, OFF_SEQ)
}
/// Kind field, if known.
pub fn kind(b: &[u8]) -> Option<BlockKind> {
    BlockKind::from_u16(get_u16(b, OFF_KIND))
}

/// crc32c of a block image, with the crc field taken as zero, seeded with the
/// block address.
pub fn block_crc(b: &[u8], addr: u64) -> u32 {
    let seed = crc32c::crc32c(&addr.to_le_bytes());
    let crc = crc32c::crc32c_append(seed, &b[..OFF_CRC]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &b[OFF_CRC + 4..])
}

/// Stamps the sequence and seals the block with its checksum.
pub fn seal(b: &mut [u8], seq: u64) {
    put_u64(b, OFF_SEQ, seq);
    let a = addr(b);
    let crc = block_crc(b, a);
    put_u32(b, OFF_CRC, crc);
}

/// Why a block image failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFault {
    /// No csnap magic: never written, or not a csnap block.
    Magic,
    /// The checksum does not match: torn or bit-flipped.
    Checksum,
    /// The block carries another address: a misdirected write.
    Address { found: u64 },
    /// The block is of another kind than the reference to it expects.
    Kind { found: u16 },
    /// Written by an unknown format version.
    Version { found: u16 },
    /// The checksum passes but the contents are impossible (an entry count
    /// beyond the block's capacity, keys out of order, a pointer outside
    /// its area, ...). Found by the structural checks after `verify`.
    Structure {
        /// What is impossible about it.
        reason: &'static str,
    },
}

impl BlockFault {
    /// A heap-free description (without the numbers `Display` adds), for
    /// the serving path's logs.
    pub fn reason(&self) -> &'static str {
        match self {
            BlockFault::Magic => "no csnap block magic",
            BlockFault::Checksum => "checksum mismatch (torn or corrupted write)",
            BlockFault::Address { .. } => {
                "the block belongs at another address (misdirected write)"
            }
            BlockFault::Kind { .. } => "unexpected block kind or tree level",
            BlockFault::Version { .. } => "unknown format version",
            BlockFault::Structure { reason } => reason,
        }
    }
}

impl std::fmt::Display for BlockFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockFault::Magic => write!(f, "no csnap block magic"),
            BlockFault::Checksum => write!(f, "checksum mismatch (torn or corrupted write)"),
            BlockFault::Address { found } => {
                write!(f, "block belongs at address {found} (misdirected write)")
            }
            BlockFault::Kind { found } => write!(f, "unexpected block kind {found}"),
            BlockFault::Version { found } => write!(f, "unknown format version {found}"),
            BlockFault::Structure { reason } => write!(f, "impossible contents: {reason}"),
        }
    }
}

/// Verifies a block read from `at` (its home, or the journal slot holding a
/// copy meant for `at`) against the kind the reader expects.
pub fn verify(b: &[u8], at: u64, expect: BlockKind) -> Result<Header, BlockFault> {
    if get_u32(b, OFF_MAGIC) != BLOCK_MAGIC {
        return Err(BlockFault::Magic);
    }
    let stored = get_u32(b, OFF_CRC);
    let found_addr = addr(b);
    if block_crc(b, found_addr) != stored {
        return Err(BlockFault::Checksum);
    }
    if found_addr != at {
        return Err(BlockFault::Address { found: found_addr });
    }
    let version = get_u16(b, OFF_VERSION);
    let k = get_u16(b, OFF_KIND);
    let verified_commit = matches!(
        BlockKind::from_u16(k),
        Some(BlockKind::Commit | BlockKind::DataCrcs)
    ) && version == COMMIT_VERIFIED_VERSION;
    let table_super = k == BlockKind::Super as u16 && version == SUPER_TABLE_VERSION;
    if version != FORMAT_VERSION && !verified_commit && !table_super {
        return Err(BlockFault::Version { found: version });
    }
    let kind = match BlockKind::from_u16(k) {
        Some(kind) if kind == expect => kind,
        _ => return Err(BlockFault::Kind { found: k }),
    };
    Ok(Header {
        kind,
        level: level(b),
        count: count(b),
        addr: found_addr,
        seq: seq(b),
    })
}

// ---------------------------------------------------------------------------
// Label (block 0).
// ---------------------------------------------------------------------------

/// Block address of the label.
pub const LABEL_BLOCK: u64 = 0;
/// Block address of the superblock.
pub const SUPER_BLOCK: u64 = 1;
/// Format identification string in the label payload.
pub const LABEL_MAGIC: [u8; 8] = *b"CSNAPSTR";

/// What to do when a copy-out finds no free store chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFullPolicy {
    /// Refuse the copy-out: the origin write fails visibly.
    Refuse = 1,
    /// Delete the lowest-priority snapshot not in use, report it, retry.
    DeleteLowestPriority = 2,
}

impl StoreFullPolicy {
    /// Decodes the label field.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(StoreFullPolicy::Refuse),
            2 => Some(StoreFullPolicy::DeleteLowestPriority),
            _ => None,
        }
    }
}

/// Fixed geometry of a store, written once at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    /// Random id of this store.
    pub store_uuid: [u8; 16],
    /// Random id given to the origin volume at format time; clients present it.
    pub origin_uuid: [u8; 16],
    /// Origin size in bytes.
    pub origin_size_bytes: u64,
    /// Copy-out unit.
    pub chunk_size_bytes: u32,
    /// Size of the store device the layout was computed for.
    pub store_size_bytes: u64,
    /// First journal block.
    pub journal_start: u64,
    /// Journal ring length in blocks.
    pub journal_blocks: u64,
    /// First metadata-area bitmap block.
    pub meta_bitmap_start: u64,
    /// Metadata-area bitmap blocks.
    pub meta_bitmap_blocks: u64,
    /// First data-area bitmap block.
    pub data_bitmap_start: u64,
    /// Data-area bitmap blocks.
    pub data_bitmap_blocks: u64,
    /// First block of the metadata area (b-tree nodes and leaves).
    pub meta_start: u64,
    /// Blocks in the metadata area.
    pub meta_blocks: u64,
    /// Byte offset of data chunk 0 (chunk aligned).
    pub data_start_bytes: u64,
    /// Chunks in the data area.
    pub data_chunks: u64,
    /// Store-full policy chosen at format time.
    pub policy: StoreFullPolicy,
    /// Format time, seconds since the epoch.
    pub created_secs: u64,
}

impl Label {
    /// Chunks of the origin (its size rounded down to a chunk multiple).
    pub fn origin_chunks(&self) -> u64 {
        self.origin_size_bytes / u64::from(self.chunk_size_bytes)
    }

    /// Byte offset of data chunk `c`.
    pub fn chunk_offset(&self, c: u64) -> u64 {
        self.data_start_bytes + c * u64::from(self.chunk_size_bytes)
    }

    /// Encodes into a sealed block image.
    pub fn encode(&self, b: &mut [u8]) {
        b.fill(0);
        init_header(b, BlockKind::Label, LABEL_BLOCK);
        let mut o = HEADER_BYTES;
        b[o..o + 8].copy_from_slice(&LABEL_MAGIC);
        o += 8;
        b[o..o + 16].copy_from_slice(&self.store_uuid);
        o += 16;
        b[o..o + 16].copy_from_slice(&self.origin_uuid);
        o += 16;
        for v in [
            self.origin_size_bytes,
            u64::from(self.chunk_size_bytes),
            self.store_size_bytes,
            self.journal_start,
            self.journal_blocks,
            self.meta_bitmap_start,
            self.meta_bitmap_blocks,
            self.data_bitmap_start,
            self.data_bitmap_blocks,
            self.meta_start,
            self.meta_blocks,
            self.data_start_bytes,
            self.data_chunks,
            self.policy as u64,
            self.created_secs,
        ] {
            put_u64(b, o, v);
            o += 8;
        }
        seal(b, 0);
    }

    /// Decodes a verified label image. Geometry sanity is checked by the caller.
    pub fn decode(b: &[u8]) -> Result<Label, &'static str> {
        let mut o = HEADER_BYTES;
        if b[o..o + 8] != LABEL_MAGIC {
            return Err("label magic is not CSNAPSTR");
        }
        o += 8;
        let mut store_uuid = [0u8; 16];
        store_uuid.copy_from_slice(&b[o..o + 16]);
        o += 16;
        let mut origin_uuid = [0u8; 16];
        origin_uuid.copy_from_slice(&b[o..o + 16]);
        o += 16;
        let mut v = [0u64; 15];
        for x in &mut v {
            *x = get_u64(b, o);
            o += 8;
        }
        let chunk_size_bytes =
            u32::try_from(v[1]).map_err(|_| "chunk size does not fit 32 bits")?;
        let policy = u8::try_from(v[13])
            .ok()
            .and_then(StoreFullPolicy::from_u8)
            .ok_or("unknown store-full policy")?;
        Ok(Label {
            store_uuid,
            origin_uuid,
            origin_size_bytes: v[0],
            chunk_size_bytes,
            store_size_bytes: v[2],
            journal_start: v[3],
            journal_blocks: v[4],
            meta_bitmap_start: v[5],
            meta_bitmap_blocks: v[6],
            data_bitmap_start: v[7],
            data_bitmap_blocks: v[8],
            meta_start: v[9],
            meta_blocks: v[10],
            data_start_bytes: v[11],
            data_chunks: v[12],
            policy,
            created_secs: v[14],
        })
    }

    /// Heap-free structural check of a decoded label against the device
    /// size (the standby's sealed start uses it; `validate` words the same
    /// rules with their numbers for the tools).
    pub fn check(&self, device_size_bytes: u64) -> Result<(), &'static str> {
        let c = self.chunk_size_bytes;
        if !(csnap_pools::CHUNK_SIZE_MIN_BYTES..=csnap_pools::CHUNK_SIZE_MAX_BYTES).contains(&c)
            || !c.is_power_of_two()
        {
            return Err("chunk size is not a power of two in 4 KiB..1 MiB");
        }
        if self.journal_blocks < csnap_pools::JOURNAL_MIN_BLOCKS {
            return Err("journal is smaller than the minimum");
        }
        if self.origin_size_bytes < u64::from(c) {
            return Err("origin is smaller than one chunk");
        }
        let mut next = 2u64;
        for (start, len) in [
            (self.journal_start, self.journal_blocks),
            (self.meta_bitmap_start, self.meta_bitmap_blocks),
            (self.data_bitmap_start, self.data_bitmap_blocks),
            (self.meta_start, self.meta_blocks),
        ] {
            if start != next {
                return Err("regions are not contiguous from block 2");
            }
            next = start.checked_add(len).ok_or("a region overflows")?;
        }
        if self.data_chunks == 0 || self.meta_blocks == 0 {
            return Err("empty data or metadata area");
        }
        if self.meta_bitmap_blocks < self.meta_blocks.div_ceil(BITMAP_BITS_PER_BLOCK)
            || self.data_bitmap_blocks < self.data_chunks.div_ceil(BITMAP_BITS_PER_BLOCK)
        {
            return Err("bitmaps are too small for their areas");
        }
        let meta_end_bytes = next
            .checked_mul(BLOCK_SIZE_BYTES as u64)
            .ok_or("metadata area overflows")?;
        if self.data_start_bytes < meta_end_bytes
            || !self.data_start_bytes.is_multiple_of(u64::from(c))
        {
            return Err("data area overlaps metadata or is not chunk aligned");
        }
        let end = self
            .data_chunks
            .checked_mul(u64::from(c))
            .and_then(|x| x.checked_add(self.data_start_bytes))
            .ok_or("data area overflows")?;
        if end > device_size_bytes {
            return Err("the layout is larger than the device (truncated store)");
        }
        Ok(())
    }

    /// Checks that the regions are in order, non-overlapping and inside the
    /// device. Returns the first problem.
    pub fn validate(&self, device_size_bytes: u64) -> Result<(), String> {
        let bs = BLOCK_SIZE_BYTES as u64;
        let c = self.chunk_size_bytes;
        if !(csnap_pools::CHUNK_SIZE_MIN_BYTES..=csnap_pools::CHUNK_SIZE_MAX_BYTES).contains(&c)
            || !c.is_power_of_two()
        {
            return Err(format!(
                "label chunk size {c} is not a power of two in 4 KiB..1 MiB"
            ));
        }
        if self.journal_blocks < csnap_pools::JOURNAL_MIN_BLOCKS {
            return Err(format!(
                "label journal of {} blocks is too small",
                self.journal_blocks
            ));
        }
        let regions = [
            ("journal", self.journal_start, self.journal_blocks),
            (
                "metadata bitmap",
                self.meta_bitmap_start,
                self.meta_bitmap_blocks,
            ),
            (
                "data bitmap",
                self.data_bitmap_start,
                self.data_bitmap_blocks,
            ),
            ("metadata area", self.meta_start, self.meta_blocks),
        ];
        let mut next = 2u64;
        for (name, start, len) in regions {
            if start != next {
                return Err(format!(
                    "label {name} starts at block {start}, expected {next}"
                ));
            }
            next = start
                .checked_add(len)
                .ok_or_else(|| format!("label {name} overflows"))?;
        }
        if self.meta_bitmap_blocks < self.meta_blocks.div_ceil(BITMAP_BITS_PER_BLOCK)
            || self.data_bitmap_blocks < self.data_chunks.div_ceil(BITMAP_BITS_PER_BLOCK)
        {
            return Err("label bitmaps are too small for their areas".into());
        }
        // Checked: a hostile label can place its regions near u64::MAX
        // blocks (found by fuzzing, target `label`).
        let meta_end_bytes = next
            .checked_mul(bs)
            .ok_or("label metadata area overflows")?;
        if self.data_start_bytes < meta_end_bytes
            || !self.data_start_bytes.is_multiple_of(u64::from(c))
        {
            return Err(format!(
                "label data area offset {} overlaps metadata or is not chunk aligned",
                self.data_start_bytes
            ));
        }
        let end = self
            .data_chunks
            .checked_mul(u64::from(c))
            .and_then(|x| x.checked_add(self.data_start_bytes))
            .ok_or("label data area overflows")?;
        if end > device_size_bytes {
            return Err(format!(
                "store is truncated: the layout needs {end} bytes, the device has {device_size_bytes}"
            ));
        }
        if self.data_chunks == 0 || self.meta_blocks == 0 {
            return Err("label has an empty data or metadata area".into());
        }
        self.check(device_size_bytes)
            .map_err(|e| format!("label: {e}"))
    }
}

/// Bits one bitmap block holds (the payload after the header).
pub const BITMAP_BITS_PER_BLOCK: u64 = ((BLOCK_SIZE_BYTES - HEADER_BYTES) * 8) as u64;

// ---------------------------------------------------------------------------
// Superblock (block 1).
// ---------------------------------------------------------------------------

/// State of a snapshot table slot. The slot index is the snapshot's share bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Unused; the bit appears in no share mask.
    Free = 0,
    /// A live snapshot.
    Live = 1,
    /// Deleted by the user; its bit is being cleared from the tree.
    Deleting = 2,
}

/// One snapshot table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapSlot {
    /// User tag.
    pub tag: u32,
    /// Slot state.
    pub state: SlotState,
    /// Priority: lower is deleted first when the store is full; 127 never.
    pub priority: i8,
    /// Creation time, seconds since the epoch.
    pub ctime_secs: u64,
    /// Store chunks this snapshot references (shared or not).
    pub chunks: u64,
    /// Store chunks referenced by this snapshot alone.
    pub unique_chunks: u64,
}

impl SnapSlot {
    /// An unused slot.
    pub const FREE: SnapSlot = SnapSlot {
        tag: 0,
        state: SlotState::Free,
        priority: 0,
        ctime_secs: 0,
        chunks: 0,
        unique_chunks: 0,
    };
}

/// All mutable global state. Journaled in every commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Super {
    /// Sequence of the last commit.
    pub seq: u64,
    /// Journal slot (relative) of the last commit's commit block.
    pub journal_last_slot: u64,
    /// Journal slot where the next commit goes.
    pub journal_next_slot: u64,
    /// Durable server incarnation, bumped by every server start.
    pub incarnation: u64,
    /// Root block of the exception tree.
    pub root: u64,
    /// Levels of the tree; 1 means the root is a leaf.
    pub depth: u16,
    /// Free blocks of the metadata area.
    pub meta_free: u64,
    /// Free chunks of the data area.
    pub data_free: u64,
    /// Next-fit cursor of the metadata allocator.
    pub meta_cursor: u64,
    /// Next-fit cursor of the data allocator.
    pub data_cursor: u64,
    /// Bits the running delete pass clears.
    pub delete_walk_mask: Mask,
    /// Logical chunks below this are done by the running delete pass.
    pub delete_cursor: u64,
    /// Snapshot table, indexed by share bit.
    pub snaps: [SnapSlot; SNAPSHOTS_MAX],
    /// The table blocks holding `snaps` (a version-2 superblock), or all
    /// zero: the table is inside the superblock (version 1, a store
    /// formatted before #13 and not yet upgraded).
    pub table: [u64; TABLE_BLOCKS_MAX],
}

const SUPER_FIELDS_OFF: usize = HEADER_BYTES;
/// Where a version-1 superblock's table, or a version-2 superblock's table
/// block addresses, begin.
const SUPER_TABLE_OFF: usize = 256;
const SNAP_ENTRY_BYTES: usize = 32;
/// Entries of one snapshot table block (after its header).
pub const TABLE_ENTRIES_PER_BLOCK: usize = (BLOCK_SIZE_BYTES - HEADER_BYTES) / SNAP_ENTRY_BYTES;
/// Table blocks of a version-2 store: the whole table (`SNAPSHOTS_MAX`).
pub const TABLE_BLOCKS_MAX: usize = SNAPSHOTS_MAX.div_ceil(TABLE_ENTRIES_PER_BLOCK);
// A version-1 superblock held the 64-entry table itself.
static_assertions::const_assert!(SUPER_TABLE_OFF + 64 * SNAP_ENTRY_BYTES <= BLOCK_SIZE_BYTES);
static_assertions::const_assert!(SUPER_TABLE_OFF + TABLE_BLOCKS_MAX * 8 <= BLOCK_SIZE_BYTES);
/// Where a version-2 superblock keeps the delete-pass mask's words past the
/// first (which is a field, as in version 1).
const SUPER_MASK_OFF: usize = 512;
static_assertions::const_assert!(SUPER_TABLE_OFF + TABLE_BLOCKS_MAX * 8 <= SUPER_MASK_OFF);
static_assertions::const_assert!(SUPER_MASK_OFF + SHARE_MASK_WORDS * 8 <= BLOCK_SIZE_BYTES);

impl Super {
    /// Mask of the bits of live snapshots.
    pub fn live_mask(&self) -> Mask {
        self.mask_of(SlotState::Live)
    }

    /// Mask of the bits being deleted.
    pub fn deleting_mask(&self) -> Mask {
        self.mask_of(SlotState::Deleting)
    }

    fn mask_of(&self, s: SlotState) -> Mask {
        let mut m = Mask::EMPTY;
        for (i, slot) in self.snaps.iter().enumerate() {
            if slot.state == s {
                m.insert(i);
            }
        }
        m
    }

    /// Share bit of the live snapshot with `tag`.
    pub fn live_bit(&self, tag: u32) -> Option<usize> {
        self.snaps
            .iter()
            .position(|s| s.state == SlotState::Live && s.tag == tag)
    }

    /// Heap-free structural check of a decoded superblock against the
    /// label: the journal position inside the ring, the root inside the
    /// metadata area, the depth in range, free counts within the areas, a
    /// consistent snapshot table.
    pub fn check(&self, label: &Label) -> Result<(), &'static str> {
        let meta_end = label.meta_start.saturating_add(label.meta_blocks);
        if self.root < label.meta_start || self.root >= meta_end {
            return Err("tree root is outside the metadata area");
        }
        if self.depth == 0 || usize::from(self.depth) > csnap_pools::TREE_DEPTH_MAX {
            return Err("tree depth is out of range");
        }
        if self.data_free > label.data_chunks || self.meta_free > label.meta_blocks {
            return Err("free counts exceed the areas");
        }
        if self.journal_next_slot > label.journal_blocks
            || self.journal_last_slot >= label.journal_blocks
        {
            return Err("journal position is outside the journal");
        }
        if self.delete_walk_mask.intersects(!self.deleting_mask()) {
            return Err("delete pass clears a snapshot that is not being deleted");
        }
        if self.table_in_blocks() {
            for (k, &a) in self.table.iter().enumerate() {
                if a < label.meta_start || a >= meta_end || a == self.root {
                    return Err("a snapshot table block is outside the metadata area");
                }
                if self.table[..k].contains(&a) {
                    return Err("two snapshot table blocks share an address");
                }
            }
        } else if self.snaps[64..].iter().any(|s| s.state != SlotState::Free) {
            return Err("a superblock holding its table has more than 64 snapshots");
        }
        self.check_table(label)
    }

    /// The snapshot table part of `check`: free slots record no usage, a
    /// snapshot's unique chunks are among its chunks, no two live
    /// snapshots share a tag.
    pub fn check_table(&self, label: &Label) -> Result<(), &'static str> {
        for s in &self.snaps {
            match s.state {
                SlotState::Free => {
                    if s.chunks != 0 || s.unique_chunks != 0 {
                        return Err("a free snapshot slot records usage");
                    }
                }
                SlotState::Live | SlotState::Deleting => {
                    if s.unique_chunks > s.chunks {
                        return Err("a snapshot has more unique chunks than chunks");
                    }
                    if s.chunks > label.data_chunks {
                        return Err("a snapshot uses more chunks than the data area holds");
                    }
                }
            }
        }
        if self.duplicate_live_tag().is_some() {
            return Err("two live snapshots share a tag");
        }
        Ok(())
    }

    /// A tag two live snapshots share, if any: the live tags sorted in a
    /// stack array, O(n log n) (a pairwise search is 0.5 M compares at
    /// 1024 snapshots, and this runs at every commit).
    pub fn duplicate_live_tag(&self) -> Option<u32> {
        let mut tags = [0u32; SNAPSHOTS_MAX];
        let mut n = 0;
        for s in self.snaps.iter().filter(|s| s.state == SlotState::Live) {
            tags[n] = s.tag;
            n += 1;
        }
        tags[..n].sort_unstable();
        tags[..n].windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    }

    /// Whether the snapshot table lives in table blocks (version 2).
    pub fn table_in_blocks(&self) -> bool {
        self.table[0] != 0
    }

    /// Encodes into a block image (unsealed: the commit seals it): version
    /// 2 with the table blocks' addresses, or version 1 with the table.
    pub fn encode(&self, b: &mut [u8]) {
        b.fill(0);
        init_header(b, BlockKind::Super, SUPER_BLOCK);
        let mut o = SUPER_FIELDS_OFF;
        for v in [
            self.seq,
            self.journal_last_slot,
            self.journal_next_slot,
            self.incarnation,
            self.root,
            u64::from(self.depth),
            self.meta_free,
            self.data_free,
            self.meta_cursor,
            self.data_cursor,
            self.delete_walk_mask.words()[0],
            self.delete_cursor,
        ] {
            put_u64(b, o, v);
            o += 8;
        }
        if self.table_in_blocks() {
            set_version(b, SUPER_TABLE_VERSION);
            for (k, &a) in self.table.iter().enumerate() {
                put_u64(b, SUPER_TABLE_OFF + k * 8, a);
            }
            for (k, &w) in self.delete_walk_mask.words().iter().enumerate().skip(1) {
                put_u64(b, SUPER_MASK_OFF + k * 8, w);
            }
        } else {
            // A version-1 store holds at most 64 snapshots (`check`).
            assert!(
                self.delete_walk_mask
                    .words()
                    .iter()
                    .skip(1)
                    .all(|&w| w == 0),
                "a version-1 superblock with a delete pass past slot 63"
            );
            for (i, s) in self.snaps.iter().take(64).enumerate() {
                put_entry(b, SUPER_TABLE_OFF + i * SNAP_ENTRY_BYTES, s);
            }
        }
    }

    /// Decodes a verified superblock image. A version-2 superblock's table
    /// is left free: the caller reads the blocks `table` names into it
    /// (`decode_table_block`).
    pub fn decode(b: &[u8]) -> Result<Super, &'static str> {
        let mut v = [0u64; 12];
        let mut o = SUPER_FIELDS_OFF;
        for x in &mut v {
            *x = get_u64(b, o);
            o += 8;
        }
        let mut snaps = [SnapSlot::FREE; SNAPSHOTS_MAX];
        let mut table = [0u64; TABLE_BLOCKS_MAX];
        let mut walk = [0u64; SHARE_MASK_WORDS];
        walk[0] = v[10];
        if version(b) == SUPER_TABLE_VERSION {
            for (k, a) in table.iter_mut().enumerate() {
                *a = get_u64(b, SUPER_TABLE_OFF + k * 8);
            }
            for (k, w) in walk.iter_mut().enumerate().skip(1) {
                *w = get_u64(b, SUPER_MASK_OFF + k * 8);
            }
            if !table.iter().all(|&a| a != 0) {
                return Err("a snapshot table block address is missing");
            }
        } else {
            for (i, s) in snaps.iter_mut().take(64).enumerate() {
                *s = get_entry(b, SUPER_TABLE_OFF + i * SNAP_ENTRY_BYTES)?;
            }
        }
        let depth = u16::try_from(v[5]).map_err(|_| "tree depth out of range")?;
        Ok(Super {
            seq: v[0],
            journal_last_slot: v[1],
            journal_next_slot: v[2],
            incarnation: v[3],
            root: v[4],
            depth,
            meta_free: v[6],
            data_free: v[7],
            meta_cursor: v[8],
            data_cursor: v[9],
            delete_walk_mask: Mask::from_words(walk),
            delete_cursor: v[11],
            snaps,
            table,
        })
    }

    /// The slots table block `k` holds.
    pub fn table_range(k: usize) -> core::ops::Range<usize> {
        let lo = (k * TABLE_ENTRIES_PER_BLOCK).min(SNAPSHOTS_MAX);
        lo..((k + 1) * TABLE_ENTRIES_PER_BLOCK).min(SNAPSHOTS_MAX)
    }

    /// Encodes table block `k` (at `table[k]`) into a block image
    /// (unsealed).
    pub fn encode_table_block(&self, k: usize, b: &mut [u8]) {
        b.fill(0);
        init_header(b, BlockKind::SnapTable, self.table[k]);
        let r = Self::table_range(k);
        set_count(b, u16::try_from(r.len()).unwrap_or(0));
        for (j, s) in self.snaps[r].iter().enumerate() {
            put_entry(b, HEADER_BYTES + j * SNAP_ENTRY_BYTES, s);
        }
    }

    /// Decodes table block `k` (a verified image) into the table.
    pub fn decode_table_block(&mut self, k: usize, b: &[u8]) -> Result<(), &'static str> {
        let r = Self::table_range(k);
        if usize::from(count(b)) != r.len() {
            return Err("a snapshot table block holds the wrong number of entries");
        }
        for (j, s) in self.snaps[r].iter_mut().enumerate() {
            *s = get_entry(b, HEADER_BYTES + j * SNAP_ENTRY_BYTES)?;
        }
        Ok(())
    }
}

fn put_entry(b: &mut [u8], e: usize, s: &SnapSlot) {
    put_u32(b, e, s.tag);
    b[e + 4] = s.state as u8;
    b[e + 5] = s.priority.to_le_bytes()[0];
    put_u64(b, e + 8, s.ctime_secs);
    put_u64(b, e + 16, s.chunks);
    put_u64(b, e + 24, s.unique_chunks);
}

fn get_entry(b: &[u8], e: usize) -> Result<SnapSlot, &'static str> {
    let state = match b[e + 4] {
        0 => SlotState::Free,
        1 => SlotState::Live,
        2 => SlotState::Deleting,
        _ => return Err("snapshot table slot has an unknown state"),
    };
    Ok(SnapSlot {
        tag: get_u32(b, e),
        state,
        priority: i8::from_le_bytes([b[e + 5]]),
        ctime_secs: get_u64(b, e + 8),
        chunks: get_u64(b, e + 16),
        unique_chunks: get_u64(b, e + 24),
    })
}

// ---------------------------------------------------------------------------
// B-tree blocks.
// ---------------------------------------------------------------------------

/// Byte offset of the first leaf record.
pub const LEAF_RECORDS_OFF: usize = 48;
/// Offset of the share-mask-width byte in a leaf.
pub const LEAF_MASK_WORDS_OFF: usize = 32;
/// Bytes of one leaf record: logical chunk, share mask, store chunk.
pub const LEAF_RECORD_BYTES: usize = 24;
/// Records one leaf holds.
pub const LEAF_RECORDS_MAX: usize = (BLOCK_SIZE_BYTES - LEAF_RECORDS_OFF) / LEAF_RECORD_BYTES;
/// Byte offset of the first index entry.
pub const NODE_ENTRIES_OFF: usize = 48;
/// Bytes of one index entry: lowest key of the child, child block.
pub const NODE_ENTRY_BYTES: usize = 16;
/// Entries one index node holds.
pub const NODE_ENTRIES_MAX: usize = (BLOCK_SIZE_BYTES - NODE_ENTRIES_OFF) / NODE_ENTRY_BYTES;

// At 64 snapshots a chunk's records (at most one per snapshot) never fill
// a leaf alone, so a leaf always splits at a group boundary; past that a
// group may span leaves (ARCHITECTURE 2.2).
static_assertions::const_assert!(NODE_ENTRIES_MAX >= 4);

/// Structural check of a verified bitmap block: its header carries no level
/// and no count (the bits themselves are all meaningful).
pub fn check_bitmap(b: &[u8]) -> Result<(), &'static str> {
    if level(b) != 0 || count(b) != 0 {
        return Err("bitmap block header carries a level or a count");
    }
    Ok(())
}
