//! The journal ring: commit block format, reading a commit back, and the replay
//! walk shared by `Store::open` (which writes replayed blocks home) and `check`
//! (which only overlays them).
//!
//! A transaction of `n` blocks occupies `n + 1` consecutive slots: the commit
//! block first, then the block images. The commit block lists, for each image,
//! its home address and the crc32c of the whole image; each image carries the
//! commit's sequence in its header. A commit counts only if every one of those
//! matches, so a commit torn anywhere is ignored as a whole.

use crate::disk::Disk;
use crate::layout::{
    self, get_u32, get_u64, put_u32, put_u64, BlockKind, Label, Super, HEADER_BYTES,
};
use csnap_pools::{BLOCK_SIZE_BYTES, TX_BLOCKS_MAX};

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

/// Encodes and seals a commit block for slot `slot` of the ring.
pub fn encode_commit(
    b: &mut [u8],
    label: &Label,
    slot: u64,
    seq: u64,
    next_slot: u64,
    entries: &[Entry],
) {
    assert!(entries.len() <= TX_BLOCKS_MAX + 1);
    b.fill(0);
    layout::init_header(b, BlockKind::Commit, label.journal_start + slot);
    layout::set_count(b, u16::try_from(entries.len()).unwrap_or(u16::MAX));
    put_u64(b, COMMIT_NEXT_SLOT_OFF, next_slot);
    for (i, e) in entries.iter().enumerate() {
        let o = COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES;
        put_u64(b, o, e.home);
        put_u32(b, o + 8, e.crc);
    }
    layout::seal(b, seq);
}

/// Why a commit read back from the journal does not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitFault {
    /// No commit block there, or not one with the expected sequence.
    Absent,
    /// The commit block fails its checksum or lists an impossible layout.
    Damaged,
    /// Image `index` does not match what the commit block lists.
    Image { index: usize, home: u64 },
}

/// Blocks of the caller-owned buffer `replay` works in: a whole commit (commit
/// block and up to `TX_BLOCKS_MAX + 1` images) plus one for the superblock.
pub const REPLAY_BUFFER_BLOCKS: usize = TX_BLOCKS_MAX + 3;

/// A commit read back from the ring into a caller-owned buffer: the commit
/// block in block 0, images after it.
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
}

/// Home address of image `i` of a commit held in `buf`.
pub fn entry_home(buf: &[u8], i: usize) -> u64 {
    get_u64(buf, COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES)
}

/// Reads the commit at `slot`. With `expect_seq`, only that sequence counts.
pub fn read_commit<D: Disk>(
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
    if n == 0 || n > TX_BLOCKS_MAX + 1 || slot + 1 + n as u64 > label.journal_blocks {
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
    disk.read_at(&mut buf[bs..bs * (n + 1)], (addr + 1) * bs as u64)?;
    for i in 0..n {
        let o = COMMIT_ENTRIES_OFF + i * COMMIT_ENTRY_BYTES;
        let home = get_u64(buf, o);
        let crc = get_u32(buf, o + 8);
        let img = &buf[bs * (i + 1)..bs * (i + 2)];
        let ok = crc32c::crc32c(img) == crc
            && layout::addr(img) == home
            && layout::seq(img) == header.seq
            && layout::kind(img).is_some_and(|k| layout::verify(img, home, k).is_ok());
        if !ok {
            return Ok(Err(CommitFault::Image { index: i, home }));
        }
    }
    Ok(Ok(ReadCommit {
        seq: header.seq,
        slot,
        blocks: n,
        next_slot,
    }))
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
    let (buf, sb_img) = buf.split_at_mut(split);
    disk.read_at(sb_img, layout::SUPER_BLOCK * bs as u64)?;
    let home = layout::verify(sb_img, layout::SUPER_BLOCK, BlockKind::Super)
        .ok()
        .and_then(|_| Super::decode(sb_img).ok());

    let (mut slot, mut expect) = match home {
        Some(sb) => {
            if sb.seq > 0 {
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
            // Find the newest commit that reads back whole.
            let mut best: Option<(u64, u64)> = None;
            for s in 0..label.journal_blocks {
                if let Ok(c) = read_commit(disk, label, s, None, buf)? {
                    if best.is_none_or(|(seq, _)| c.seq > seq) {
                        best = Some((c.seq, s));
                    }
                }
            }
            // Heap-free errors: a standby starts sealed.
            let Some((seq, s)) = best else {
                return Err(crate::StoreError::Corrupt {
                    addr: layout::SUPER_BLOCK,
                    kind: BlockKind::Super,
                    fault: layout::BlockFault::Structure {
                        reason: "superblock is unreadable and the journal holds no copy of it",
                    },
                });
            };
            let c = match read_commit(disk, label, s, Some(seq), buf)? {
                Ok(c) => c,
                Err(_) => {
                    return Err(crate::StoreError::Corrupt {
                        addr: label.journal_start + s,
                        kind: BlockKind::Commit,
                        fault: layout::BlockFault::Structure {
                            reason: "the journal changed while it was being read",
                        },
                    })
                }
            };
            apply_commit(disk, buf, &c, apply)?;
            report.super_recovered = true;
            report.commits += 1;
            report.blocks += c.blocks as u64;
            (c.next_slot, seq.saturating_add(1))
        }
    };
    // Follow the chain of later commits: a ring of `journal_blocks` slots
    // holds fewer commits than that, so a longer chain is a corrupt loop.
    for _ in 0..label.journal_blocks {
        let mut found = read_commit(disk, label, slot, Some(expect), buf)?;
        if found.is_err() && slot != 0 {
            // The writer wraps to slot 0 when a transaction does not fit before
            // the end of the ring.
            found = read_commit(disk, label, 0, Some(expect), buf)?;
        }
        let Ok(c) = found else { break };
        apply_commit(disk, buf, &c, apply)?;
        report.commits += 1;
        report.blocks += c.blocks as u64;
        slot = c.next_slot;
        expect = expect.saturating_add(1);
    }
    Ok(report)
}

fn apply_commit<D: Disk>(
    disk: &mut D,
    buf: &[u8],
    c: &ReadCommit,
    apply: &mut ApplyFn<'_, D>,
) -> Result<(), crate::disk::DiskError> {
    let bs = BLOCK_SIZE_BYTES;
    for i in 0..c.blocks {
        let home = entry_home(buf, i);
        apply(disk, home, &buf[bs * (i + 1)..bs * (i + 2)])?;
    }
    Ok(())
}
