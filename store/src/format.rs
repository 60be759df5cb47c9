//! Making a store: the layout plan for a device size (`plan_layout`), writing
//! an empty store (`format`), reading and checking the label, and the sanity
//! of a decoded superblock against it (`validate_super`).

use crate::*;

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
    for _ in 0..csnap_pools::FORMAT_LAYOUT_ROUNDS_MAX {
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

/// Formats `disk` as an empty store.
pub fn format<D: Disk>(disk: &mut D, o: &FormatOptions) -> Result<Label, StoreError> {
    format_with(disk, o, true)
}

/// Formats `disk` the way csnap did before #13: the snapshot table inside
/// a version-1 superblock (metadata blocks after the root unused). For the
/// tests of the in-place upgrade; `format` is what tools use.
#[doc(hidden)]
pub fn format_v1<D: Disk>(disk: &mut D, o: &FormatOptions) -> Result<Label, StoreError> {
    format_with(disk, o, false)
}

fn format_with<D: Disk>(
    disk: &mut D,
    o: &FormatOptions,
    table_blocks: bool,
) -> Result<Label, StoreError> {
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
    // Bitmaps: the root leaf (metadata block 0) and the snapshot table
    // blocks (1 ..= TABLE_BLOCKS_MAX) are in use; bits past the end of each
    // area are set so they are never allocated.
    let tables = if table_blocks {
        layout::TABLE_BLOCKS_MAX as u64
    } else {
        0
    };
    let meta_used: Vec<u64> = (0..=tables).collect();
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
        &meta_used,
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
    // The superblock, and the empty snapshot table's blocks.
    let mut table = [0u64; layout::TABLE_BLOCKS_MAX];
    if table_blocks {
        for (k, a) in table.iter_mut().enumerate() {
            *a = label.meta_start + 1 + k as u64;
        }
    }
    let sb = Super {
        seq: 0,
        journal_last_slot: 0,
        journal_next_slot: 0,
        incarnation: 0,
        root: label.meta_start,
        depth: 1,
        meta_free: label.meta_blocks - 1 - tables,
        data_free: label.data_chunks,
        meta_cursor: 1 + tables,
        data_cursor: 0,
        delete_walk_mask: Mask::EMPTY,
        delete_cursor: 0,
        snaps: [SnapSlot::FREE; SNAPSHOTS_MAX],
        table,
    };
    if table_blocks {
        for (k, &a) in table.iter().enumerate() {
            sb.encode_table_block(k, &mut b);
            layout::seal(&mut b, 0);
            disk.write_at(&b, a * BS)?;
        }
    }
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
pub(crate) fn read_label_checked<D: Disk>(disk: &mut D, b: &mut [u8]) -> Result<Label, StoreError> {
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
