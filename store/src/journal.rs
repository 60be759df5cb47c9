//! The journal ring: commit block format, reading a commit back, and the replay
//! walk shared by `Store::open` (which writes replayed blocks home) and `check`
//! (which only overlays them).
//!
//! A transaction of `n` blocks occupies `n + 1` consecutive slots: the commit
//! block first, then the block images. The commit block lists, for each image,
//! its home address and the crc32c of the whole image; each image carries the
//! commit's sequence in its header. A commit counts only if every one of those
//! matches, so a commit torn anywhere is ignored as a whole.
//!
//! A single-flush commit (version 2, ARCHITECTURE 2.6) also vouches for the
//! copy-out data written since the previous commit: its `level` field is 1
//! and a data-checksum block follows the commit block (`n + 2` slots), listing
//! `{store chunk, crc32c of the whole chunk}`. Its data was not flushed
//! before the journal write, so replay reads those chunks back when nothing
//! proves the commit's own flush returned, and discards the commit if any
//! differs.

use crate::disk::Disk;
use crate::layout::{
    self, get_u32, get_u64, put_u32, put_u64, BlockKind, Label, Super, HEADER_BYTES,
};
use csnap_pools::{BLOCK_SIZE_BYTES, TX_BLOCKS_MAX, TX_DATA_CHUNKS_MAX};

const COMMIT_NEXT_SLOT_OFF: usize = HEADER_BYTES;
const COMMIT_ENTRIES_OFF: usize = 64;
const COMMIT_ENTRY_BYTES: usize = 16;

/// One image listed by a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Where the image belongs.
    pub home: u64,
    /// crc32c of the whole sealed image.
    pub crc: u32,
}

/// One data chunk a single-flush commit vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataEntry {
    /// Store (data-area) chunk.
    pub chunk: u64,
    /// crc32c of the whole chunk as written.
    pub crc: u32,
}

/// Blocks before a commit's images: the commit block, and the data-checksum
/// block when the commit vouches for data.
pub fn head_blocks(data: usize) -> usize {
    1 + usize::from(data > 0)
}

/// Encodes and seals a commit for slot `slot` of the ring into `b`: the
/// commit block, then (when `data` is not empty) its data-checksum block.
pub fn encode_commit(
    b: &mut [u8],
    label: &Label,
    slot: u64,
    seq: u64,
    next_slot: u64,
    entries: &[Entry],
    data: &[DataEntry],
) {
    let bs = BLOCK_SIZE_BYTES;
    assert!(entries.len() <= TX_BLOCKS_MAX + 1);
    assert!(data.len() <= TX_DATA_CHUNKS_MAX);
    assert_eq!(b.len(), head_blocks(data.len()) * bs);
    let (c, d) = b.split_at_mut(bs);
    c.fill(0);
    layout::init_header(c, BlockKind::Commit, label.journal_start + slot);
    layout::set_count(c, u16::try_from(entries.len()).unwrap_or(u16::MAX));
    put_u64(c, COMMIT_NEXT_SLOT_OFF, next_slot);
    for (i, e) in entries.iter().enumerate() {
        let o = COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES;
        put_u64(c, o, e.home);
        put_u32(c, o + 8, e.crc);
    }
    if !data.is_empty() {
        layout::set_version(c, layout::COMMIT_VERIFIED_VERSION);
        layout::set_level(c, 1);
        d.fill(0);
        layout::init_header(d, BlockKind::DataCrcs, label.journal_start + slot + 1);
        layout::set_version(d, layout::COMMIT_VERIFIED_VERSION);
        layout::set_count(d, u16::try_from(data.len()).unwrap_or(u16::MAX));
        for (i, e) in data.iter().enumerate() {
            let o = COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES;
            put_u64(d, o, e.chunk);
            put_u32(d, o + 8, e.crc);
        }
        layout::seal(d, seq);
    }
    layout::seal(c, seq);
}

/// Why a commit read back from the journal does not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitFault {
    /// No commit block there, or not one with the expected sequence.
    Absent,
    /// The commit block (or its data-checksum block) fails its checksum or
    /// lists an impossible layout.
    Damaged,
    /// Image `index` does not match what the commit block lists.
    Image { index: usize, home: u64 },
}

/// Blocks of the caller-owned buffer `replay` works in: a whole commit (commit
/// block, data-checksum block and up to `TX_BLOCKS_MAX + 1` images) plus one
/// for the superblock.
pub const REPLAY_BUFFER_BLOCKS: usize = TX_BLOCKS_MAX + 4;

/// A commit read back from the ring into a caller-owned buffer: the commit
/// block in block 0, its data-checksum block (if any) in block 1, images
/// after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCommit {
    /// Commit sequence.
    pub seq: u64,
    /// Slot of the commit block.
    pub slot: u64,
    /// Images in the commit.
    pub blocks: usize,
    /// Slot where the next commit was going to be written.
    pub next_slot: u64,
    /// Data chunks the commit vouches for (0: its data was flushed first).
    pub data: usize,
}

impl ReadCommit {
    /// Blocks before the images.
    pub fn head_blocks(&self) -> usize {
        head_blocks(self.data)
    }
}

/// Home address of image `i` of a commit held in `buf`.
pub fn entry_home(buf: &[u8], i: usize) -> u64 {
    get_u64(buf, COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES)
}

/// Data entry `i` of a commit held in `buf` (its data-checksum block).
pub fn data_entry(buf: &[u8], i: usize) -> DataEntry {
    let o = BLOCK_SIZE_BYTES + COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES;
    DataEntry {
        chunk: get_u64(buf, o),
        crc: get_u32(buf, o + 8),
    }
}

/// Reads the commit at `slot`. With `expect_seq`, only that sequence counts.
pub fn read_commit<D: Disk>(
    disk: &mut D,
    label: &Label,
    slot: u64,
    expect_seq: Option<u64>,
    buf: &mut [u8],
) -> Result<Result<ReadCommit, CommitFault>, crate::disk::DiskError> {
    let c = match read_head(disk, label, slot, expect_seq, buf)? {
        Ok(c) => c,
        Err(f) => return Ok(Err(f)),
    };
    read_images(disk, label, &c, buf)
}

/// Reads and checks the commit block at `slot` and its data-checksum block,
/// not the images.
pub fn read_head<D: Disk>(
    disk: &mut D,
    label: &Label,
    slot: u64,
    expect_seq: Option<u64>,
    buf: &mut [u8],
) -> Result<Result<ReadCommit, CommitFault>, crate::disk::DiskError> {
    let bs = BLOCK_SIZE_BYTES;
    if slot >= label.journal_blocks {
        return Ok(Err(CommitFault::Absent));
    }
    let addr = label.journal_start + slot;
    disk.read_at(&mut buf[..bs], addr * bs as u64)?;
    let header = match layout::verify(&buf[..bs], addr, BlockKind::Commit) {
        Ok(h) => h,
        Err(layout::BlockFault::Magic) => return Ok(Err(CommitFault::Absent)),
        Err(layout::BlockFault::Kind { .. }) => return Ok(Err(CommitFault::Absent)),
        Err(_) => return Ok(Err(CommitFault::Damaged)),
    };
    if let Some(s) = expect_seq {
        if header.seq != s {
            return Ok(Err(CommitFault::Absent));
        }
    }
    let n = usize::from(header.count);
    let verified = layout::version(&buf[..bs]) == layout::COMMIT_VERIFIED_VERSION;
    let d = usize::from(header.level);
    if n == 0 || n > TX_BLOCKS_MAX + 1 || d != usize::from(verified) {
        return Ok(Err(CommitFault::Damaged));
    }
    if slot + (1 + d + n) as u64 > label.journal_blocks {
        return Ok(Err(CommitFault::Damaged));
    }
    let next_slot = get_u64(buf, COMMIT_NEXT_SLOT_OFF);
    if next_slot > label.journal_blocks {
        return Ok(Err(CommitFault::Damaged));
    }
    // Every image must belong at the superblock, a bitmap block or the
    // metadata area: replay writes it there (never over the label, the
    // journal or the data area, never past the device).
    let meta_end = label.meta_start + label.meta_blocks;
    for i in 0..n {
        let home = get_u64(buf, COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES);
        if home != layout::SUPER_BLOCK && !(label.meta_bitmap_start..meta_end).contains(&home) {
            return Ok(Err(CommitFault::Damaged));
        }
    }
    let mut data = 0;
    if verified {
        let at = addr + 1;
        disk.read_at(&mut buf[bs..2 * bs], at * bs as u64)?;
        let Ok(h) = layout::verify(&buf[bs..2 * bs], at, BlockKind::DataCrcs) else {
            return Ok(Err(CommitFault::Damaged));
        };
        data = usize::from(h.count);
        if h.seq != header.seq || data == 0 || data > TX_DATA_CHUNKS_MAX {
            return Ok(Err(CommitFault::Damaged));
        }
        if (0..data).any(|i| data_entry(buf, i).chunk >= label.data_chunks) {
            return Ok(Err(CommitFault::Damaged));
        }
    }
    Ok(Ok(ReadCommit {
        seq: header.seq,
        slot,
        blocks: n,
        next_slot,
        data,
    }))
}

/// Reads the images of a commit whose head `read_head` read into `buf`.
pub fn read_images<D: Disk>(
    disk: &mut D,
    label: &Label,
    c: &ReadCommit,
    buf: &mut [u8],
) -> Result<Result<ReadCommit, CommitFault>, crate::disk::DiskError> {
    let bs = BLOCK_SIZE_BYTES;
    let (h, n) = (c.head_blocks(), c.blocks);
    let addr = label.journal_start + c.slot;
    disk.read_at(
        &mut buf[bs * h..bs * (h + n)],
        (addr + h as u64) * bs as u64,
    )?;
    for i in 0..n {
        let o = COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES;
        let home = get_u64(buf, o);
        let crc = get_u32(buf, o + 8);
        let img = &buf[bs * (h + i)..bs * (h + i + 1)];
        let ok = crc32c::crc32c(img) == crc
            && layout::addr(img) == home
            && layout::seq(img) == c.seq
            && layout::kind(img).is_some_and(|k| layout::verify(img, home, k).is_ok());
        if !ok {
            return Ok(Err(CommitFault::Image { index: i, home }));
        }
    }
    Ok(Ok(*c))
}

/// Whether every data chunk a commit held in `buf` (head only) vouches for
/// reads back with its checksum. Reads the chunks through the buffer's
/// image area (a chunk of up to 1 MiB in a few pieces).
pub fn data_intact<D: Disk>(
    disk: &mut D,
    label: &Label,
    c: &ReadCommit,
    buf: &mut [u8],
) -> Result<bool, crate::disk::DiskError> {
    let bs = BLOCK_SIZE_BYTES;
    let chunk_bytes = u64::from(label.chunk_size_bytes);
    let (list, scratch) = buf.split_at_mut(c.head_blocks() * bs);
    let piece = scratch.len() / bs * bs;
    assert!(
        piece >= bs,
        "replay buffer leaves no room to read data back"
    );
    for i in 0..c.data {
        let e = data_entry(list, i);
        let base = label.chunk_offset(e.chunk);
        let mut crc = 0u32;
        let mut done = 0u64;
        while done < chunk_bytes {
            let len = usize::try_from((chunk_bytes - done).min(piece as u64)).unwrap_or(piece);
            disk.read_at(&mut scratch[..len], base + done)?;
            crc = crc32c::crc32c_append(crc, &scratch[..len]);
            done += len as u64;
        }
        if crc != e.crc {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Receives each replayed image and its home address.
pub type ApplyFn<'a, D> = dyn FnMut(&mut D, u64, &[u8]) -> Result<(), crate::disk::DiskError> + 'a;

/// What a replay walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayReport {
    /// Commits replayed.
    pub commits: u64,
    /// Blocks replayed.
    pub blocks: u64,
    /// The home superblock was unreadable and was recovered from the journal.
    pub super_recovered: bool,
    /// The journal copy of the superblock's own commit is damaged (the home
    /// copies are intact, so nothing is lost, but the journal is corrupt).
    pub last_commit_damaged: Option<(u64, u64)>,
    /// A commit after the last one replayed whose data or images had not all
    /// reached the disk (a crash before its flush returned: nobody was told
    /// it was durable): its sequence.
    pub discarded: Option<u64>,
    /// Slots holding a commit block of the sequence after the last one
    /// replayed that was not replayed (torn, or its data lost). Opening the
    /// store wipes them, so that no later walk can take one for the commit
    /// the new server writes in its place.
    pub stale_slots: [Option<u64>; 2],
}

/// Walks the journal from what the home superblock says (or, if the home
/// superblock is unreadable, from the newest valid commit in the ring) and
/// hands every image of every commit to replay, in order, to `apply`.
///
/// Returns the report; the caller re-reads the superblock afterwards.
pub fn replay<D: Disk>(
    disk: &mut D,
    label: &Label,
    buf: &mut [u8],
    apply: &mut ApplyFn<'_, D>,
) -> Result<ReplayReport, crate::StoreError> {
    let bs = BLOCK_SIZE_BYTES;
    let mut report = ReplayReport::default();
    let split = buf.len() - bs;
    let (buf, one) = buf.split_at_mut(split);
    disk.read_at(one, layout::SUPER_BLOCK * bs as u64)?;
    let home = layout::verify(one, layout::SUPER_BLOCK, BlockKind::Super)
        .ok()
        .and_then(|_| Super::decode(one).ok());

    let (slot, expect) = match home {
        Some(sb) => {
            if sb.seq > 0 {
                // The superblock's own commit: its data is durable (a
                // commit's home superblock is written after its flush).
                match read_commit(disk, label, sb.journal_last_slot, Some(sb.seq), buf)? {
                    Ok(c) => {
                        apply_commit(disk, buf, &c, apply)?;
                        report.commits += 1;
                        report.blocks += c.blocks as u64;
                    }
                    Err(_) => report.last_commit_damaged = Some((sb.seq, sb.journal_last_slot)),
                }
            }
            (sb.journal_next_slot, sb.seq.saturating_add(1))
        }
        None => {
            let start = newest_start(disk, label, buf)?;
            let applied = match start {
                Some((s, seq)) => walk(disk, label, buf, one, s, seq, apply, &mut report)?,
                None => 0,
            };
            if applied == 0 {
                // Heap-free errors: a standby starts sealed.
                return Err(crate::StoreError::Corrupt {
                    addr: layout::SUPER_BLOCK,
                    kind: BlockKind::Super,
                    fault: layout::BlockFault::Structure {
                        reason: "superblock is unreadable and the journal holds no copy of it",
                    },
                });
            }
            report.super_recovered = true;
            return Ok(report);
        }
    };
    walk(disk, label, buf, one, slot, expect, apply, &mut report)?;
    Ok(report)
}

/// Where replay starts when the home superblock is unreadable: the newest
/// commit that reads back whole, or the one before it when that one is
/// there too (without a flush between a commit's journal write and the
/// next one's, the older one's home writes may be the ones that tore the
/// superblock). `(slot, seq)`.
fn newest_start<D: Disk>(
    disk: &mut D,
    label: &Label,
    buf: &mut [u8],
) -> Result<Option<(u64, u64)>, crate::disk::DiskError> {
    let mut best: [Option<(u64, u64)>; 2] = [None, None];
    for s in 0..label.journal_blocks {
        if let Ok(c) = read_commit(disk, label, s, None, buf)? {
            if best[0].is_none_or(|(seq, _)| c.seq > seq) {
                best = [Some((c.seq, s)), best[0]];
            } else if best[1].is_none_or(|(seq, _)| c.seq > seq) {
                best[1] = Some((c.seq, s));
            }
        }
    }
    Ok(match best {
        [Some((a, _)), Some((b, s))] if b.saturating_add(1) == a => Some((s, b)),
        [Some((a, s)), _] => Some((s, a)),
        _ => None,
    })
}

/// Follows the chain of commits from `expect` at `slot` (or at slot 0
/// after a wrap), applying each; returns how many. The last one in the
/// chain is applied only if its data reads back whole, unless the commit
/// block of its successor is there (written only after its flush returned).
#[allow(clippy::too_many_arguments)]
fn walk<D: Disk>(
    disk: &mut D,
    label: &Label,
    buf: &mut [u8],
    one: &mut [u8],
    mut slot: u64,
    mut expect: u64,
    apply: &mut ApplyFn<'_, D>,
    report: &mut ReplayReport,
) -> Result<u64, crate::StoreError> {
    let mut applied = 0;
    // A ring of `journal_blocks` slots holds fewer commits than that, so a
    // longer chain is a corrupt loop.
    for _ in 0..label.journal_blocks {
        let mut found = None;
        for s in candidates(slot) {
            let Ok(c) = read_head(disk, label, s, Some(expect), buf)? else {
                continue;
            };
            let durable = c.data == 0
                || candidates(c.next_slot)
                    .into_iter()
                    .try_fold(false, |any, n| {
                        Ok::<_, crate::disk::DiskError>(
                            any || commit_block_at(disk, label, n, expect + 1, one)?,
                        )
                    })?;
            if !durable && !data_intact(disk, label, &c, buf)? {
                report.discarded = Some(expect);
                continue;
            }
            if let Ok(c) = read_images(disk, label, &c, buf)? {
                found = Some(c);
                break;
            }
        }
        let Some(c) = found else {
            let mut k = 0;
            for s in candidates(slot) {
                if k == 1 && report.stale_slots[0] == Some(s) {
                    continue;
                }
                if commit_block_at(disk, label, s, expect, one)? {
                    report.stale_slots[k] = Some(s);
                    k += 1;
                }
            }
            break;
        };
        apply_commit(disk, buf, &c, apply)?;
        applied += 1;
        report.commits += 1;
        report.blocks += c.blocks as u64;
        slot = c.next_slot;
        expect = expect.saturating_add(1);
    }
    Ok(applied)
}

/// Where the commit after one ending at `next_slot` may be: there, or at
/// slot 0 (the writer wraps when a transaction does not fit before the end).
fn candidates(next_slot: u64) -> [u64; 2] {
    [next_slot, 0]
}

/// Whether slot `s` holds a commit block (checksum good, at its address) of
/// sequence `seq`, whatever follows it.
fn commit_block_at<D: Disk>(
    disk: &mut D,
    label: &Label,
    s: u64,
    seq: u64,
    one: &mut [u8],
) -> Result<bool, crate::disk::DiskError> {
    if s >= label.journal_blocks {
        return Ok(false);
    }
    let addr = label.journal_start + s;
    disk.read_at(one, addr * BLOCK_SIZE_BYTES as u64)?;
    Ok(layout::verify(one, addr, BlockKind::Commit).is_ok_and(|h| h.seq == seq))
}

fn apply_commit<D: Disk>(
    disk: &mut D,
    buf: &[u8],
    c: &ReadCommit,
    apply: &mut ApplyFn<'_, D>,
) -> Result<(), crate::disk::DiskError> {
    let bs = BLOCK_SIZE_BYTES;
    let h = c.head_blocks();
    for i in 0..c.blocks {
        let home = entry_home(buf, i);
        apply(disk, home, &buf[bs * (h + i)..bs * (h + i + 1)])?;
    }
    Ok(())
}
