//! The on-disk decoders (`csnap_store`): label, superblock, b-tree leaves
//! and nodes, bitmaps, journal commits, and a whole store with one block
//! replaced.
//!
//! Every input is made into a block the checksum accepts (magic, version,
//! kind and address set as the reader expects, then sealed), so the
//! fuzzer's mutations reach the structural checks instead of stopping at
//! the crc32c.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use csnap_pools::BLOCK_SIZE_BYTES;
use csnap_store::disk::{Disk, DiskError, MemDisk};
use csnap_store::layout::{self, BlockKind, Label, Super};
use csnap_store::{
    check, journal, tree, FormatOptions, OpenOptions, Store, StoreError, StoreFullPolicy,
};

const BS: usize = BLOCK_SIZE_BYTES;
const CHUNK: u64 = 4096;
const ORIGIN_CHUNKS: u64 = 1000;
const DATA_CHUNKS: u64 = 700;

/// A small real store: snapshots 1 and 2, 500 exceptions in a two-level
/// tree, a snapshot-2 write; the last commit touches only the superblock,
/// so replay does not cover the blocks the targets replace.
struct Fixture {
    disk: MemDisk,
    label: Label,
    sb: Super,
    /// The root node and its children (leaves).
    root: u64,
    leaves: Vec<u64>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    let mut o = FormatOptions::new(ORIGIN_CHUNKS * CHUNK);
    o.chunk_size_bytes = 4096;
    o.journal_blocks = csnap_pools::JOURNAL_MIN_BLOCKS;
    o.policy = StoreFullPolicy::Refuse;
    o.store_uuid = [7; 16];
    o.origin_uuid = [9; 16];
    let mut size = (DATA_CHUNKS + 1) * CHUNK;
    loop {
        if let Ok(l) = csnap_store::plan_layout(size, &o) {
            if l.data_chunks >= DATA_CHUNKS {
                break;
            }
        }
        size += CHUNK;
    }
    let mut d = MemDisk::new(usize::try_from(size).expect("small store"));
    csnap_store::format(&mut d, &o).expect("format");
    let mut s = Store::open(d, &opts()).expect("open fresh store");
    s.create_snapshot(1, 0).expect("create 1");
    s.commit().expect("commit");
    for i in 0..500u64 {
        s.prepare_origin_write(i * 2 % ORIGIN_CHUNKS)
            .expect("origin write");
        if !s.has_room() {
            s.commit().expect("commit");
        }
    }
    s.commit().expect("commit");
    s.create_snapshot(2, 0).expect("create 2");
    s.prepare_snapshot_write(2, 7).expect("snapshot write");
    s.commit().expect("commit");
    s.set_priority(1, 3).expect("priority");
    s.commit().expect("commit");
    assert_eq!(s.status().depth, 2, "fixture tree has two levels");
    let mut disk = s.into_disk();
    let label = csnap_store::read_label(&mut disk).expect("label");
    let mut sb = Super::decode(&read(&disk, layout::SUPER_BLOCK)).expect("super");
    assert!(sb.table_in_blocks(), "fixture is a version-2 store");
    for k in 0..layout::TABLE_BLOCKS_MAX {
        sb.decode_table_block(k, &read(&disk, sb.table[k]))
            .expect("table block");
    }
    let r = read(&disk, sb.root);
    let leaves = (0..tree::node_len(&r))
        .map(|i| tree::node_child(&r, i))
        .collect();
    let report = check::check(&mut disk);
    assert!(report.is_clean(), "fixture: {:?}", report.problems);
    Fixture {
        disk,
        label,
        sb,
        root: sb.root,
        leaves,
    }
}

fn opts() -> OpenOptions {
    OpenOptions {
        cache_blocks: csnap_pools::CACHE_MIN_BLOCKS,
    }
}

fn read(d: &MemDisk, addr: u64) -> Vec<u8> {
    let o = usize::try_from(addr).expect("small") * BS;
    d.bytes[o..o + BS].to_vec()
}

/// A copy-on-write view of the fixture: writes go to a map of blocks.
struct Overlay<'a> {
    base: &'a [u8],
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl<'a> Overlay<'a> {
    fn new(base: &'a MemDisk) -> Self {
        Overlay {
            base: &base.bytes,
            blocks: BTreeMap::new(),
        }
    }

    fn block(&self, b: u64) -> &[u8] {
        match self.blocks.get(&b) {
            Some(v) => v,
            None => {
                let o = b as usize * BS;
                &self.base[o..o + BS]
            }
        }
    }

    fn put(&mut self, addr: u64, img: &[u8]) {
        self.blocks.insert(addr, img.to_vec());
    }

    fn range(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        let size = self.base.len() as u64;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len: len as u64,
                size,
            }),
        }
    }
}

impl Disk for Overlay<'_> {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (b, o) = (at / BS as u64, (at % BS as u64) as usize);
            let n = (BS - o).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.block(b)[o..o + n]);
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (b, o) = (at / BS as u64, (at % BS as u64) as usize);
            let n = (BS - o).min(buf.len() - done);
            let mut blk = self.block(b).to_vec();
            blk[o..o + n].copy_from_slice(&buf[done..done + n]);
            self.blocks.insert(b, blk);
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.base.len() as u64
    }
}

/// `data` as a 4 KiB block of `kind` for address `addr` (the block's own
/// address field when `None`), sealed so the checksum and the header pass.
fn sealed(data: &[u8], kind: BlockKind, addr: Option<u64>) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    let n = data.len().min(BS);
    b[..n].copy_from_slice(&data[..n]);
    let (level, count, seq) = (layout::level(&b), layout::count(&b), layout::seq(&b));
    let version = layout::version(&b);
    let a = addr.unwrap_or_else(|| layout::addr(&b));
    layout::init_header(&mut b, kind, a);
    // A superblock keeps its version: 2 points to table blocks.
    if kind == BlockKind::Super && version == layout::SUPER_TABLE_VERSION {
        layout::set_version(&mut b, version);
    }
    layout::set_level(&mut b, level);
    layout::set_count(&mut b, count);
    layout::seal(&mut b, seq);
    let h = layout::verify(&b, a, kind).expect("a sealed block verifies");
    assert_eq!((h.level, h.count, h.seq), (level, count, seq));
    b
}

/// Every structural error of a store is `Corrupt` naming a block, a disk
/// error, or a refusal with a reason: never a panic.
fn is_corrupt(e: &StoreError) -> bool {
    matches!(e, StoreError::Corrupt { .. })
}

// ---------------------------------------------------------------------------
// Single blocks.
// ---------------------------------------------------------------------------

/// The label: what `check` accepts, `validate` accepts too (they word the
/// same rules), its geometry's arithmetic does not overflow, and it
/// re-encodes to an equal label.
pub fn label(data: &[u8]) {
    let f = fixture();
    let b = sealed(data, BlockKind::Label, Some(layout::LABEL_BLOCK));
    let Ok(l) = Label::decode(&b) else { return };
    let mut again = vec![0u8; BS];
    l.encode(&mut again);
    assert_eq!(Label::decode(&again), Ok(l), "label round trip");
    assert!(layout::verify(&again, layout::LABEL_BLOCK, BlockKind::Label).is_ok());
    for dev in [f.disk.bytes.len() as u64, l.store_size_bytes, u64::MAX] {
        let c = l.check(dev);
        let v = l.validate(dev);
        assert_eq!(
            c.is_ok(),
            v.is_ok(),
            "Label::check {c:?} and validate {v:?} disagree on {l:?} (device {dev})"
        );
        if c.is_ok() {
            let _ = l.origin_chunks();
            if l.data_chunks > 0 {
                let end = l.chunk_offset(l.data_chunks - 1) + u64::from(l.chunk_size_bytes);
                assert!(end <= dev, "data area past the device: {l:?}");
            }
        }
    }
}

/// The superblock against the fixture's label: `check` and
/// `validate_super` agree, and it re-encodes to an equal superblock.
pub fn superblock(data: &[u8]) {
    let f = fixture();
    let b = sealed(data, BlockKind::Super, Some(layout::SUPER_BLOCK));
    let Ok(s) = Super::decode(&b) else { return };
    let mut again = vec![0u8; BS];
    s.encode(&mut again);
    layout::seal(&mut again, s.seq);
    assert_eq!(Super::decode(&again), Ok(s), "superblock round trip");
    let c = s.check(&f.label);
    let v = csnap_store::validate_super(&f.label, &s);
    if c.is_ok() {
        assert!(v.is_ok(), "check accepts, validate_super refuses: {v:?}");
        let live = s.live_mask();
        assert!(
            (live & s.deleting_mask()).is_empty(),
            "a slot live and deleting"
        );
        for slot in &s.snaps {
            if let Some(bit) = s.live_bit(slot.tag) {
                assert!(live.contains(bit));
            }
        }
    }
}

/// A leaf: `data[..8]` is the mask of snapshot slots in use, the rest the
/// block. An accepted leaf answers its own lookups, and inserting and
/// removing a record keeps it valid.
pub fn leaf(data: &[u8]) {
    let f = fixture();
    let (mask, rest) = split_u64(data);
    let mask = csnap_store::mask::Mask::from_window(0, mask);
    let b = sealed(rest, BlockKind::Leaf, None);
    if tree::check_leaf(&b, f.label.origin_chunks(), f.label.data_chunks, mask).is_err() {
        return;
    }
    let n = tree::leaf_len(&b);
    assert!(n <= layout::LEAF_RECORDS_MAX);
    for i in 0..n {
        let r = tree::leaf_get(&b, i);
        let (lo, hi) = tree::leaf_find(&b, r.chunk);
        assert!(lo <= i && i < hi && hi <= n, "leaf_find misses record {i}");
        assert_eq!(tree::leaf_lower_bound(&b, r.chunk), lo);
    }
    if n == layout::LEAF_RECORDS_MAX {
        let s = tree::leaf_split_point(&b);
        assert!(s > 0 && s < n);
        let (mut from, mut to) = (b.clone(), vec![0u8; BS]);
        tree::leaf_init(&mut to);
        tree::leaf_move_tail(&mut from, &mut to, s);
        assert_eq!(tree::leaf_len(&from) + tree::leaf_len(&to), n);
        let sm = mask;
        assert!(tree::check_leaf(&from, f.label.origin_chunks(), f.label.data_chunks, sm).is_ok());
        assert!(tree::check_leaf(&to, f.label.origin_chunks(), f.label.data_chunks, sm).is_ok());
    } else if n > 0 && !mask.is_empty() {
        // A new chunk's record after the last: still valid.
        let last = tree::leaf_get(&b, n - 1);
        if last.chunk + 1 < f.label.origin_chunks() {
            let mut c = b.clone();
            let r = tree::Record {
                chunk: last.chunk + 1,
                mask: csnap_store::mask::Mask::bit(mask.lowest().unwrap_or(0)),
                store: 0,
            };
            tree::leaf_insert(&mut c, n, r);
            assert!(
                tree::check_leaf(&c, f.label.origin_chunks(), f.label.data_chunks, mask).is_ok()
            );
            tree::leaf_remove(&mut c, n);
            // Bytes past the records may differ (remove zeroes the slot).
            let end = layout::LEAF_RECORDS_OFF + n * layout::LEAF_RECORD_BYTES;
            assert!(c[..end] == b[..end], "insert then remove changed the leaf");
        }
    }
}

/// An index node in the fixture's metadata area: an accepted node routes
/// each of its keys to the entry before the first entry with that key (a
/// chunk's records start in the leaf left of the first leaf keyed by it)
/// and never past its entries.
pub fn node(data: &[u8]) {
    let f = fixture();
    let b = sealed(data, BlockKind::Node, None);
    let a = layout::addr(&b);
    let meta_end = f.label.meta_start + f.label.meta_blocks;
    if tree::check_node(&b, a, f.label.meta_start, meta_end).is_err() {
        return;
    }
    let n = tree::node_len(&b);
    assert!((1..=layout::NODE_ENTRIES_MAX).contains(&n));
    for i in 0..n {
        let k = tree::node_key(&b, i);
        let r = tree::node_route(&b, k);
        assert!(r < n);
        if i >= 1 {
            assert!(r < i, "key of entry {i} routes to {r}");
            assert!(
                r == 0 || tree::node_key(&b, r) < k,
                "entry {r} is keyed past {k}"
            );
            assert!(
                tree::node_key(&b, r + 1) >= k,
                "entry {} is keyed before {k}",
                r + 1
            );
        }
        let c = tree::node_child(&b, i);
        assert!((f.label.meta_start..meta_end).contains(&c) && c != a);
    }
    assert!(tree::node_route(&b, 0) < n && tree::node_route(&b, u64::MAX) < n);
}

/// A bitmap block.
pub fn bitmap(data: &[u8]) {
    let b = sealed(data, BlockKind::Bitmap, None);
    if layout::check_bitmap(&b).is_ok() {
        assert_eq!((layout::level(&b), layout::count(&b)), (0, 0));
    }
}

fn split_u64(data: &[u8]) -> (u64, &[u8]) {
    if data.len() < 8 {
        return (0, &[]);
    }
    let (a, b) = data.split_at(8);
    (u64::from_le_bytes(a.try_into().expect("8 bytes")), b)
}

// ---------------------------------------------------------------------------
// The journal and whole stores.
// ---------------------------------------------------------------------------

/// A new commit written after the fixture's last one: `data` is the commit
/// block followed by its images (4 KiB each). Each image is sealed for the
/// home its entry names, with the commit's sequence, and its entry's crc is
/// made right, so the commit reads back whole and replay applies it:
/// `read_commit`, then `check` and a whole store on it.
pub fn journal(data: &[u8]) {
    let f = fixture();
    let l = &f.label;
    let (slot, seq) = (f.sb.journal_next_slot, f.sb.seq + 1);
    let mut disk = journal_disk(data);
    let mut buf = vec![0u8; journal::REPLAY_BUFFER_BLOCKS * BS];
    if let Ok(Ok(rc)) = journal::read_commit(&mut disk, l, slot, Some(seq), &mut buf) {
        assert_eq!(rc.seq, seq);
        assert!(rc.blocks >= 1 && rc.blocks <= csnap_pools::TX_BLOCKS_MAX + 1);
        assert!(rc.next_slot <= l.journal_blocks);
        for i in 0..rc.blocks {
            let home = journal::entry_home(&buf, i);
            assert!(
                home == layout::SUPER_BLOCK
                    || (l.meta_bitmap_start..l.meta_start + l.meta_blocks).contains(&home)
            );
        }
    }
    whole_store(disk, data.first().copied().unwrap_or(0));
}

/// The fixture with `data` written as its next commit (see [`journal`]).
fn journal_disk(data: &[u8]) -> Overlay<'static> {
    let f = fixture();
    let l = &f.label;
    let slot = f.sb.journal_next_slot;
    let seq = f.sb.seq + 1;
    let addr = l.journal_start + slot;
    let mut c = vec![0u8; BS];
    let n = data.len().min(BS);
    c[..n].copy_from_slice(&data[..n]);
    let count = usize::from(layout::count(&c)).min(csnap_pools::TX_BLOCKS_MAX + 1);
    let mut disk = Overlay::new(&f.disk);
    let images = data.get(BS..).unwrap_or(&[]);
    for i in 0..count {
        let img_data = images.get(i * BS..).unwrap_or(&[]);
        // The commit block's entries: 16 bytes each from byte 64.
        let o = 64 + i * 16;
        let home = layout::get_u64(&c, o);
        // The kind the image claims, else one picked by its kind byte.
        let mut padded = vec![0u8; BS];
        let k = img_data.len().min(BS);
        padded[..k].copy_from_slice(&img_data[..k]);
        let kind = layout::kind(&padded)
            .or_else(|| BlockKind::from_u16(u16::from(padded[8] % 6) + 1))
            .unwrap_or(BlockKind::Leaf);
        let mut img = sealed(img_data, kind, Some(home));
        layout::seal(&mut img, seq);
        layout::put_u32(&mut c, o + 8, crc32c::crc32c(&img));
        if let Some(at) = (addr + 1 + i as u64).checked_mul(BS as u64) {
            let _ = disk.write_at(&img, at);
        }
    }
    let mut commit = sealed(&c, BlockKind::Commit, Some(addr));
    layout::seal(&mut commit, seq);
    disk.put(addr, &commit);
    disk
}

/// One block of the fixture replaced: `data[0]` picks which (a leaf, the
/// root, a metadata or data bitmap block, the superblock, the label), the
/// rest is the block, sealed for that address. Then `check`, open, and
/// lookups, writes, snapshot creates and deletes and delete steps.
pub fn store_image(data: &[u8]) {
    let f = fixture();
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let l = &f.label;
    let (addr, kind) = match pick % 7 {
        0 => (
            f.leaves[usize::from(pick / 7) % f.leaves.len()],
            BlockKind::Leaf,
        ),
        1 => (f.root, BlockKind::Node),
        2 => (l.meta_bitmap_start, BlockKind::Bitmap),
        3 => (
            l.data_bitmap_start + u64::from(pick / 7) % l.data_bitmap_blocks,
            BlockKind::Bitmap,
        ),
        4 => (layout::SUPER_BLOCK, BlockKind::Super),
        5 => (layout::LABEL_BLOCK, BlockKind::Label),
        _ => (
            // One table block of the table's (one at 64 snapshots).
            f.sb.table
                .get(usize::from(pick / 7))
                .copied()
                .unwrap_or(f.sb.table[0]),
            BlockKind::SnapTable,
        ),
    };
    let b = sealed(rest, kind, Some(addr));
    let mut disk = Overlay::new(&f.disk);
    disk.put(addr, &b);
    whole_store(disk, pick);
}

/// `check`, then the store itself. What `check` calls clean, the store
/// opens and serves without meeting a corrupt block.
fn whole_store(mut disk: Overlay<'_>, salt: u8) {
    let report = check::check(&mut disk);
    let clean = report.is_clean();
    let mut s = match Store::open(disk, &opts()) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !clean || !is_corrupt(&e),
                "check is clean but open finds corruption: {e}"
            );
            return;
        }
    };
    let origin = s.origin_chunks();
    // Every chunk of every snapshot, then writes.
    for tag in [1u32, 2] {
        for c in (0..origin.min(ORIGIN_CHUNKS)).step_by(7) {
            if let Err(e) = s.lookup(tag, c) {
                assert!(
                    !clean || !is_corrupt(&e),
                    "check is clean but lookup({tag}, {c}) finds corruption: {e}"
                );
            }
        }
    }
    let mut r = u64::from(salt) | 1;
    for _ in 0..24 {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        let c = r % ORIGIN_CHUNKS;
        let res = match (r >> 20) % 8 {
            0 | 1 => s.lookup(1 + (r >> 30) as u32 % 3, c).map(|_| ()),
            2 | 3 => s.prepare_origin_write(c).map(|_| ()),
            4 => s
                .prepare_snapshot_write(1 + (r >> 30) as u32 % 3, c)
                .map(|_| ()),
            5 => s.delete_snapshot(1 + (r >> 30) as u32 % 3),
            6 => s.create_snapshot(3 + (r >> 30) as u32 % 3, 1).map(|_| ()),
            _ => s.delete_step(50).map(|_| ()),
        };
        if let Err(e) = &res {
            assert!(
                !clean || !is_corrupt(e),
                "check is clean but the store finds corruption: {e}"
            );
            if s.is_poisoned() {
                s.abort();
            }
        }
        if (r >> 40) % 4 == 0 {
            let _ = s.commit();
        }
    }
    let _ = s.commit();
}

// ---------------------------------------------------------------------------
// Seeds: the fixture's real blocks.
// ---------------------------------------------------------------------------

pub fn label_seeds() -> Vec<Vec<u8>> {
    vec![read(&fixture().disk, layout::LABEL_BLOCK)]
}

pub fn superblock_seeds() -> Vec<Vec<u8>> {
    vec![read(&fixture().disk, layout::SUPER_BLOCK)]
}

/// Two of the fixture's leaves, and a full one (every record slot used:
/// one mutation of the count away from a count beyond capacity).
pub fn leaf_seeds() -> Vec<Vec<u8>> {
    let f = fixture();
    let mask = f.sb.live_mask().words()[0].to_le_bytes();
    let mut v: Vec<Vec<u8>> = f
        .leaves
        .iter()
        .take(2)
        .map(|&a| [&mask[..], &read(&f.disk, a)].concat())
        .collect();
    let mut full = read(&f.disk, f.leaves[0]);
    tree::leaf_init(&mut full);
    for i in 0..layout::LEAF_RECORDS_MAX {
        let r = tree::Record {
            chunk: i as u64 * 3,
            mask: csnap_store::mask::Mask::bit(0),
            store: i as u64,
        };
        tree::leaf_insert(&mut full, i, r);
    }
    let seq = layout::seq(&full);
    layout::seal(&mut full, seq);
    v.push([&mask[..], &full].concat());
    v
}

/// The fixture's root, and a full node (every entry slot used).
pub fn node_seeds() -> Vec<Vec<u8>> {
    let f = fixture();
    let root = read(&f.disk, f.root);
    let mut full = root.clone();
    layout::set_count(&mut full, 0);
    for i in 0..layout::NODE_ENTRIES_MAX {
        // Any metadata block but the node itself.
        let mut child = f.label.meta_start + i as u64 % (f.label.meta_blocks - 1);
        if child >= f.root {
            child += 1;
        }
        tree::node_insert(&mut full, i, i as u64 * 4, child);
    }
    let seq = layout::seq(&full);
    layout::seal(&mut full, seq);
    vec![root, full]
}

pub fn bitmap_seeds() -> Vec<Vec<u8>> {
    let f = fixture();
    vec![
        read(&f.disk, f.label.meta_bitmap_start),
        read(&f.disk, f.label.data_bitmap_start),
    ]
}

/// The fixture's last commit (the superblock only) and a commit of a leaf
/// and the superblock, as new commits.
pub fn journal_seeds() -> Vec<Vec<u8>> {
    let f = fixture();
    let l = &f.label;
    let last = l.journal_start + f.sb.journal_last_slot;
    let c = read(&f.disk, last);
    let n = usize::from(layout::count(&c));
    let mut one = c.clone();
    for i in 0..n {
        one.extend_from_slice(&read(&f.disk, last + 1 + i as u64));
    }
    let mut two = c;
    layout::set_count(&mut two, 2);
    layout::put_u64(&mut two, 64, f.leaves[0]);
    layout::put_u64(&mut two, 80, layout::SUPER_BLOCK);
    two.extend_from_slice(&read(&f.disk, f.leaves[0]));
    two.extend_from_slice(&read(&f.disk, layout::SUPER_BLOCK));
    vec![one, two]
}

pub fn store_image_seeds() -> Vec<Vec<u8>> {
    let f = fixture();
    let l = &f.label;
    let blocks = [
        (0u8, f.leaves[0]),
        (7, f.leaves[1 % f.leaves.len()]),
        (6, f.sb.table[0]),
        (1, f.root),
        (2, l.meta_bitmap_start),
        (3, l.data_bitmap_start),
        (4, layout::SUPER_BLOCK),
        (5, layout::LABEL_BLOCK),
    ];
    blocks
        .iter()
        .map(|&(p, a)| [&[p][..], &read(&f.disk, a)].concat())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness reaches what it is meant to: the journal seeds are
    /// whole commits that `check` replays, and the store seeds (the
    /// fixture's own blocks, re-sealed) leave a clean store that opens.
    #[test]
    fn seeds_reach_replay_and_open() {
        let f = fixture();
        let (slot, seq) = (f.sb.journal_next_slot, f.sb.seq + 1);
        for (i, seed) in journal_seeds().iter().enumerate() {
            let mut disk = journal_disk(seed);
            let mut buf = vec![0u8; journal::REPLAY_BUFFER_BLOCKS * BS];
            let rc = journal::read_commit(&mut disk, &f.label, slot, Some(seq), &mut buf);
            assert!(matches!(rc, Ok(Ok(_))), "journal seed {i}: {rc:?}");
            let r = check::check(&mut disk);
            let replayed = r.summary.map_or(0, |s| s.replay_commits);
            assert!(
                replayed >= 1,
                "journal seed {i}: nothing replayed: {:?}",
                r.problems
            );
        }
        // The full leaf and node seeds are valid: one mutation of the
        // count from a count beyond capacity.
        let full_leaf = leaf_seeds().pop().expect("full leaf");
        let (mask, b) = split_u64(&full_leaf);
        assert_eq!(tree::leaf_len(b), layout::LEAF_RECORDS_MAX);
        let l = &f.label;
        assert_eq!(
            tree::check_leaf(
                b,
                l.origin_chunks(),
                l.data_chunks,
                csnap_store::mask::Mask::from_window(0, mask)
            ),
            Ok(())
        );
        let full_node = node_seeds().pop().expect("full node");
        assert_eq!(tree::node_len(&full_node), layout::NODE_ENTRIES_MAX);
        let meta_end = l.meta_start + l.meta_blocks;
        let a = layout::addr(&full_node);
        assert_eq!(
            tree::check_node(&full_node, a, l.meta_start, meta_end),
            Ok(())
        );
        for (i, seed) in store_image_seeds().iter().enumerate() {
            let (pick, rest) = seed.split_first().expect("seed");
            let mut disk = Overlay::new(&f.disk);
            let addr = layout::addr(rest);
            let kind = layout::kind(rest).expect("a real block");
            disk.put(addr, &sealed(rest, kind, Some(addr)));
            let r = check::check(&mut disk);
            assert!(
                r.is_clean(),
                "store seed {i} (pick {pick}): {:?}",
                r.problems
            );
            assert!(Store::open(disk, &opts()).is_ok(), "store seed {i}");
        }
    }
}
