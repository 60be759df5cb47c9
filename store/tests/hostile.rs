//! Hostile blocks: images whose checksum is valid but whose contents are
//! impossible (issue #15). For each, `check` reports a clear problem line,
//! and opening, lookups and writes return `StoreError::Corrupt` naming the
//! block and the reason; nothing panics. A seeded random loop feeds sealed
//! random images to every block decoder and to a whole store.

// Test code indexes host-sized buffers with u64 block numbers of small test
// stores.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use csnap_store::disk::{Disk, MemDisk};
use csnap_store::layout::{self, BlockFault, BlockKind, Label, Super};
use csnap_store::{tree, StoreError, StoreFullPolicy};

const ORIGIN_CHUNKS: u64 = POPULATED_ORIGIN_CHUNKS;
const BS: u64 = 4096;

fn populated() -> MemDisk {
    populated_store(false)
}

/// Rewrites block `addr` with `f` and re-seals it (same sequence): the
/// checksum is valid, only the contents are wrong.
fn reseal(d: &mut MemDisk, addr: u64, f: impl FnOnce(&mut [u8])) {
    let mut b = read_block(d, addr);
    f(&mut b);
    let seq = layout::seq(&b);
    layout::seal(&mut b, seq);
    d.write_at(&b, addr * BS).unwrap();
}

fn label(d: &mut MemDisk) -> Label {
    csnap_store::read_label(d).unwrap()
}

/// The home superblock with its snapshot table (read from the table
/// blocks of a version-2 superblock).
fn sb(d: &mut MemDisk) -> Super {
    let mut s = Super::decode(&read_block(d, layout::SUPER_BLOCK)).unwrap();
    if s.table_in_blocks() {
        for k in 0..layout::TABLE_BLOCKS_MAX {
            let b = read_block(d, s.table[k]);
            s.decode_table_block(k, &b).unwrap();
        }
    }
    s
}

/// The root node, its second child (a leaf) and the first chunk that leaf
/// holds.
fn second_leaf(d: &mut MemDisk) -> (u64, u64, u64) {
    let root = sb(d).root;
    let r = read_block(d, root);
    assert!(tree::node_len(&r) >= 2);
    (root, tree::node_child(&r, 1), tree::node_key(&r, 1))
}

/// `check` finds problems and one of them contains every needle.
fn check_reports(d: &mut MemDisk, needles: &[&str]) {
    let r = csnap_store::check::check(d);
    assert!(!r.is_clean(), "check missed the corruption");
    assert!(
        r.problems
            .iter()
            .any(|p| needles.iter().all(|n| p.contains(n))),
        "no problem line contains {needles:?}:\n{}",
        r.problems.join("\n")
    );
}

fn open_opts() -> csnap_store::OpenOptions {
    csnap_store::OpenOptions {
        cache_blocks: CACHE_BLOCKS,
    }
}

/// Opening fails with `Corrupt` naming `addr` and a structural reason
/// containing `reason`.
fn open_refused(d: MemDisk, addr: u64, reason: &str) {
    match csnap_store::Store::open(d, &open_opts()) {
        Ok(_) => panic!("a store with corrupt block {addr} opened"),
        Err(e) => assert_corrupt(&e, addr, reason),
    }
}

fn assert_corrupt(e: &StoreError, at: u64, reason: &str) {
    match e {
        StoreError::Corrupt {
            addr,
            fault: BlockFault::Structure { reason: r },
            ..
        } => {
            assert_eq!(*addr, at, "{e}");
            assert!(r.contains(reason), "{e}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("block {at}")) && text.contains(reason),
                "{text}"
            );
        }
        _ => panic!("expected a structural Corrupt at block {at}, got {e:?} ({e})"),
    }
}

/// Lookups, an origin write and a snapshot write of `chunk` all fail with
/// the corruption; then the open transaction is clean and a chunk under
/// another leaf is still served and written.
fn every_path_refuses(d: MemDisk, leaf: u64, chunk: u64, reason: &str) {
    let mut s = csnap_store::Store::open(d, &open_opts()).expect("the root is fine: opens");
    for _ in 0..2 {
        let e = s.lookup(1, chunk).unwrap_err();
        assert_corrupt(&e, leaf, reason);
    }
    let e = s.prepare_origin_write(chunk).unwrap_err();
    assert_corrupt(&e, leaf, reason);
    let e = s.prepare_snapshot_write(2, chunk).unwrap_err();
    assert_corrupt(&e, leaf, reason);
    // Nothing was modified: no abort needed, and a commit writes nothing.
    assert!(!s.is_poisoned() && !s.is_dirty());
    // Chunk 0 lives under the first leaf, which is intact.
    assert_eq!(s.lookup(1, 0).unwrap(), csnap_store::Mapping::Store(0));
    s.prepare_origin_write(1).unwrap();
    s.commit().unwrap();
}

#[test]
fn leaf_with_200_records() {
    let mut d = populated();
    let (_, leaf, chunk) = second_leaf(&mut d);
    reseal(&mut d, leaf, |b| layout::set_count(b, 200));
    check_reports(
        &mut d,
        &[&format!("leaf at block {leaf}"), "200 records overflow"],
    );
    every_path_refuses(d, leaf, chunk, "exceeds its capacity");
}

#[test]
fn leaf_records_out_of_order() {
    let mut d = populated();
    let (_, leaf, chunk) = second_leaf(&mut d);
    reseal(&mut d, leaf, |b| {
        // Swap the first and the last record.
        let n = tree::leaf_len(b);
        let (o1, o2) = (
            layout::LEAF_RECORDS_OFF,
            layout::LEAF_RECORDS_OFF + (n - 1) * layout::LEAF_RECORD_BYTES,
        );
        let first: Vec<u8> = b[o1..o1 + layout::LEAF_RECORD_BYTES].to_vec();
        b.copy_within(o2..o2 + layout::LEAF_RECORD_BYTES, o1);
        b[o2..o2 + layout::LEAF_RECORD_BYTES].copy_from_slice(&first);
    });
    check_reports(&mut d, &[&format!("leaf at block {leaf}"), "out of order"]);
    every_path_refuses(d, leaf, chunk, "out of order");
}

#[test]
fn leaf_mask_names_a_free_snapshot_slot() {
    let mut d = populated();
    let (_, leaf, chunk) = second_leaf(&mut d);
    reseal(&mut d, leaf, |b| {
        layout::put_u64(b, layout::LEAF_RECORDS_OFF + 8, 1 << 40);
    });
    check_reports(&mut d, &[&format!("leaf at block {leaf}"), "do not exist"]);
    every_path_refuses(d, leaf, chunk, "free snapshot slot");
}

#[test]
fn leaf_store_chunk_outside_the_data_area() {
    let mut d = populated();
    let (_, leaf, chunk) = second_leaf(&mut d);
    reseal(&mut d, leaf, |b| {
        layout::put_u64(b, layout::LEAF_RECORDS_OFF + 16, 1 << 40);
    });
    check_reports(
        &mut d,
        &[&format!("leaf at block {leaf}"), "outside the data area"],
    );
    every_path_refuses(d, leaf, chunk, "outside the data area");
}

/// A record naming a 64-slot window past the snapshot table (the top 16
/// bits of its store-chunk field).
#[test]
fn leaf_record_window_past_the_table() {
    let mut d = populated();
    let (_, leaf, chunk) = second_leaf(&mut d);
    reseal(&mut d, leaf, |b| {
        let o = layout::LEAF_RECORDS_OFF + 16;
        let store = layout::get_u64(b, o);
        let past = csnap_pools::SHARE_MASK_WORDS as u64;
        layout::put_u64(b, o, store | past << tree::RECORD_STORE_BITS);
    });
    check_reports(
        &mut d,
        &[&format!("leaf at block {leaf}"), "past the snapshot table"],
    );
    every_path_refuses(d, leaf, chunk, "share window is past the snapshot table");
}

#[test]
fn leaf_with_an_unknown_mask_width() {
    let mut d = populated();
    let (_, leaf, chunk) = second_leaf(&mut d);
    reseal(&mut d, leaf, |b| b[layout::LEAF_MASK_WORDS_OFF] = 9);
    check_reports(
        &mut d,
        &[&format!("leaf at block {leaf}"), "masks of 9 words"],
    );
    every_path_refuses(d, leaf, chunk, "share-mask width");
}

#[test]
fn child_pointer_outside_the_metadata_area() {
    let mut d = populated();
    let l = label(&mut d);
    let (root, _, _) = second_leaf(&mut d);
    let outside = l.meta_start + l.meta_blocks + 5;
    reseal(&mut d, root, |b| {
        layout::put_u64(
            b,
            layout::NODE_ENTRIES_OFF + layout::NODE_ENTRY_BYTES + 8,
            outside,
        );
    });
    check_reports(
        &mut d,
        &[&format!("block {outside}"), "outside the metadata area"],
    );
    open_refused(d, root, "outside the metadata area");
}

#[test]
fn index_node_count_beyond_capacity() {
    let mut d = populated();
    let (root, _, _) = second_leaf(&mut d);
    reseal(&mut d, root, |b| layout::set_count(b, 300));
    check_reports(
        &mut d,
        &[&format!("node at block {root}"), "bad entry count 300"],
    );
    open_refused(d, root, "exceeds its capacity");
}

#[test]
fn index_node_keys_out_of_order() {
    let mut d = populated();
    let (root, _, _) = second_leaf(&mut d);
    // Entry 2 keyed below entry 1 (equal keys are allowed: the leaves of a
    // chunk whose records span them).
    reseal(&mut d, root, |b| {
        let k1 = tree::node_key(b, 1);
        assert!(k1 > 0);
        layout::put_u64(
            b,
            layout::NODE_ENTRIES_OFF + 2 * layout::NODE_ENTRY_BYTES,
            k1 - 1,
        );
    });
    check_reports(&mut d, &[&format!("node at block {root}"), "out of order"]);
    open_refused(d, root, "not ascending");
}

/// A non-root node at the wrong level under a valid root: a leaf address
/// where a node is expected is caught by the level check on the way down.
#[test]
fn leaf_level_where_the_path_needs_another() {
    let mut d = populated();
    let (_, leaf, chunk) = second_leaf(&mut d);
    reseal(&mut d, leaf, |b| layout::set_level(b, 3));
    check_reports(
        &mut d,
        &[&format!("block {leaf}"), "level 3 where 0 was expected"],
    );
    every_path_refuses(d, leaf, chunk, "non-zero tree level");
}

/// Wipes the journal (so replay cannot restore the superblock) and
/// rewrites the home superblock with `f`.
fn bad_super(f: impl FnOnce(&mut Super)) -> MemDisk {
    let mut d = populated();
    let l = label(&mut d);
    for s in 0..l.journal_blocks {
        d.write_at(&vec![0u8; BS as usize], (l.journal_start + s) * BS)
            .unwrap();
    }
    let mut s = sb(&mut d);
    f(&mut s);
    let mut b = vec![0u8; BS as usize];
    if s.table_in_blocks() {
        for k in 0..layout::TABLE_BLOCKS_MAX {
            s.encode_table_block(k, &mut b);
            layout::seal(&mut b, s.seq);
            d.write_at(&b, s.table[k] * BS).unwrap();
        }
    }
    s.encode(&mut b);
    layout::seal(&mut b, s.seq);
    d.write_at(&b, layout::SUPER_BLOCK * BS).unwrap();
    d
}

#[test]
fn superblock_depth_beyond_the_maximum() {
    let mut d = bad_super(|s| s.depth = csnap_pools::TREE_DEPTH_MAX as u16 + 1);
    check_reports(&mut d, &["superblock", "depth 9 is out of range"]);
    open_refused(d, layout::SUPER_BLOCK, "tree depth is out of range");
}

#[test]
fn superblock_root_outside_the_metadata_area() {
    let mut d = bad_super(|s| s.root = 1);
    check_reports(
        &mut d,
        &["superblock", "root 1 is outside the metadata area"],
    );
    open_refused(d, layout::SUPER_BLOCK, "root is outside the metadata area");
}

#[test]
fn superblock_journal_position_outside_the_ring() {
    let mut d = bad_super(|s| s.journal_next_slot = u64::MAX);
    check_reports(&mut d, &["superblock", "journal position"]);
    open_refused(d, layout::SUPER_BLOCK, "journal position");
}

#[test]
fn superblock_free_slot_with_usage() {
    let mut d = bad_super(|s| s.snaps[50].chunks = 3);
    check_reports(&mut d, &["free slot 50 records usage"]);
    open_refused(d, layout::SUPER_BLOCK, "free snapshot slot records usage");
}

/// Usage counts that disagree with the tree: the operation that would take
/// a count below zero fails with the corruption (it had modified the
/// transaction, so it is poisoned and aborted), never an overflow panic.
#[test]
fn usage_counts_that_disagree_with_the_tree() {
    let mut d = bad_super(|s| s.snaps[0].unique_chunks = 0);
    check_reports(
        &mut d,
        &["snapshot 1 (slot 0): usage recorded as", "(0 unique)"],
    );
    let mut s = csnap_store::Store::open(d, &open_opts()).unwrap();
    // Deleting snapshot 1 walks its records; the first it owns alone takes
    // its unique count below zero.
    s.delete_snapshot(1).unwrap();
    s.commit().unwrap();
    let e = s.delete_step(usize::MAX).unwrap_err();
    assert_corrupt(&e, layout::SUPER_BLOCK, "usage count disagrees");
    assert!(s.is_poisoned());
    s.abort();
    assert!(!s.is_dirty());
    // The rest is served: snapshot 2 reads, the origin takes a write.
    assert_eq!(s.lookup(2, 7).unwrap(), s.lookup(2, 7).unwrap());
    s.prepare_origin_write(1999).unwrap();
    s.commit().unwrap();
}

#[test]
fn bitmap_header_with_a_count() {
    let mut d = populated();
    let l = label(&mut d);
    reseal(&mut d, l.data_bitmap_start, |b| layout::set_count(b, 7));
    check_reports(
        &mut d,
        &[&format!("bitmap block {}", l.data_bitmap_start), "count"],
    );
    // The allocator reads it on the next copy-out.
    let mut s = csnap_store::Store::open(d, &open_opts()).unwrap();
    let e = s.prepare_origin_write(1999).unwrap_err();
    assert_corrupt(&e, l.data_bitmap_start, "bitmap block header");
}

/// A journal commit that lists an image for the label (or past the
/// metadata area) is ignored as damaged: replay never writes there.
#[test]
fn journal_commit_aimed_at_the_label_is_not_replayed() {
    let mut d = populated();
    let l = label(&mut d);
    let s = sb(&mut d);
    let at = l.journal_start + s.journal_last_slot;
    reseal(&mut d, at, |b| layout::put_u64(b, 64, layout::LABEL_BLOCK));
    let label_before = read_block(&mut d, 0);
    check_reports(&mut d, &["journal: commit", "damaged"]);
    let st = csnap_store::Store::open(d, &open_opts()).unwrap();
    let mut d = st.into_disk();
    assert_eq!(read_block(&mut d, 0), label_before);
}

// ---------------------------------------------------------------------------
// Random sealed images.
// ---------------------------------------------------------------------------

/// splitmix64: a seeded PRNG (the seed is printed; CSNAP_TEST_SEED replays).
use csnap_testkit::SplitMix64 as Rng;

use csnap_testkit::seed;

/// A random image for block `addr` of `kind`: random bytes, usually with a
/// plausible header (magic, version, kind, address), small counts and
/// levels half the time, values near the store's areas, then sealed.
fn random_image(r: &mut Rng, addr: u64, kind: BlockKind, l: &Label, img: &mut [u8]) {
    for w in img.chunks_mut(8) {
        let v = match r.below(4) {
            0 => r.next_u64(),
            1 => r.below(l.meta_start + l.meta_blocks + 4),
            2 => r.below(l.data_chunks + 4),
            _ => r.below(ORIGIN_CHUNKS + 4),
        };
        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
    }
    if r.below(8) != 0 {
        layout::init_header(img, kind, addr);
        // init_header zeroes the rest of the header; restore some noise.
        let count = match r.below(3) {
            0 => r.below(u64::from(u16::MAX)),
            1 => r.below(300),
            _ => r.below(8),
        };
        layout::set_count(img, count as u16);
        let levels = if r.below(2) == 0 { 12 } else { 3 };
        layout::set_level(img, r.below(levels) as u16);
        if kind == BlockKind::Leaf && r.below(2) == 0 {
            img[layout::LEAF_MASK_WORDS_OFF] = 1;
        }
        if kind == BlockKind::Label {
            img[layout::HEADER_BYTES..layout::HEADER_BYTES + 8]
                .copy_from_slice(&layout::LABEL_MAGIC);
        }
        if kind == BlockKind::Super && r.below(2) == 0 {
            // Snapshot states in range, most slots free (a version-1
            // superblock's table: 64 slots).
            for i in 0..64 {
                img[256 + i * 32 + 4] = if r.below(8) == 0 { r.below(3) as u8 } else { 0 };
            }
        }
    }
    let seq = r.next_u64();
    layout::seal(img, seq);
}

/// Changes one to three fields of a real image (the count by a little or
/// a lot, the level, or one u64 of the payload to a value near the store's
/// areas, a neighbour's value or a random one) and re-seals it.
fn mutate(r: &mut Rng, l: &Label, img: &mut [u8]) {
    for _ in 0..=r.below(3) {
        match r.below(6) {
            0 => {
                let n = layout::count(img);
                let d = r.below(5) as u16;
                layout::set_count(
                    img,
                    if r.below(2) == 0 {
                        n.wrapping_add(d)
                    } else {
                        n.wrapping_sub(d)
                    },
                );
            }
            1 => layout::set_count(img, r.below(400) as u16),
            2 => layout::set_level(img, r.below(4) as u16),
            _ => {
                let words = (BS as usize - layout::HEADER_BYTES) / 8;
                let o = layout::HEADER_BYTES + 8 * r.below(words as u64) as usize;
                let v = match r.below(5) {
                    0 => r.next_u64(),
                    1 => r.below(l.meta_start + l.meta_blocks + 2),
                    2 => r.below(l.data_chunks + 2),
                    3 => layout::get_u64(img, o.saturating_sub(24).max(layout::HEADER_BYTES)),
                    _ => 1 << r.below(64),
                };
                layout::put_u64(img, o, v);
            }
        }
    }
    let seq = layout::seq(img);
    layout::seal(img, seq);
}

/// Every decoder and structural check on sealed random images: no panic.
#[test]
fn random_sealed_images_never_panic_a_decoder() {
    let mut r = Rng::new(seed("hostile"));
    let mut d = populated();
    let l = label(&mut d);
    let mut img = vec![0u8; BS as usize];
    for _ in 0..20_000 {
        let kind = match r.below(6) {
            0 => BlockKind::Leaf,
            1 => BlockKind::Node,
            2 => BlockKind::Bitmap,
            3 => BlockKind::Super,
            4 => BlockKind::Label,
            _ => BlockKind::Commit,
        };
        let addr = r.below(l.meta_start + l.meta_blocks);
        random_image(&mut r, addr, kind, &l, &mut img);
        if layout::verify(&img, addr, kind).is_err() {
            continue;
        }
        let _ = tree::check_leaf(
            &img,
            l.origin_chunks(),
            l.data_chunks,
            csnap_store::mask::Mask::from_window(0, r.next_u64()),
        );
        let _ = tree::check_node(&img, addr, l.meta_start, l.meta_start + l.meta_blocks);
        let _ = layout::check_bitmap(&img);
        if let Ok(s) = Super::decode(&img) {
            let _ = s.check(&l);
            let _ = csnap_store::validate_super(&l, &s);
        }
        if let Ok(lb) = Label::decode(&img) {
            let _ = lb.check(d.bytes.len() as u64);
            let _ = lb.validate(d.bytes.len() as u64);
        }
    }
}

/// Whole stores with one sealed random block (a leaf, the root, a bitmap
/// block, the superblock, the label or the newest journal commit): `check`,
/// open, lookups, writes, snapshot creates and deletes, delete steps and
/// commits return, never panic. `CSNAP_HOSTILE_ROUNDS` raises the count
/// for a soak (default 300).
#[test]
fn a_store_with_a_sealed_random_block_never_panics() {
    let mut r = Rng::new(seed("hostile"));
    let base = populated();
    let mut d0 = base.clone();
    let l = label(&mut d0);
    let (root, leaf, _) = second_leaf(&mut d0);
    let s0 = sb(&mut d0);
    let mut img = vec![0u8; BS as usize];
    let (mut opened, mut refused) = (0, 0);
    let root_img = read_block(&mut d0, root);
    let leaves: Vec<u64> = (0..tree::node_len(&root_img))
        .map(|i| tree::node_child(&root_img, i))
        .collect();
    assert!(leaves.contains(&leaf));
    let rounds: u64 = std::env::var("CSNAP_HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for _ in 0..rounds {
        let mut d = base.clone();
        let (addr, kind) = match r.below(6) {
            0 => (
                leaves[r.below(leaves.len() as u64) as usize],
                BlockKind::Leaf,
            ),
            1 => (root, BlockKind::Node),
            2 => (
                l.data_bitmap_start + r.below(l.data_bitmap_blocks),
                BlockKind::Bitmap,
            ),
            3 => (layout::SUPER_BLOCK, BlockKind::Super),
            4 => (layout::LABEL_BLOCK, BlockKind::Label),
            _ => (l.journal_start + s0.journal_last_slot, BlockKind::Commit),
        };
        if r.below(2) == 0 {
            random_image(&mut r, addr, kind, &l, &mut img);
        } else {
            // A real image with a few fields changed: plausible blocks
            // that reach deeper than random ones.
            d.read_at(&mut img, addr * BS).unwrap();
            mutate(&mut r, &l, &mut img);
        }
        d.write_at(&img, addr * BS).unwrap();
        let _ = csnap_store::check::check(&mut d);
        let Ok(mut s) = csnap_store::Store::open(d, &open_opts()) else {
            refused += 1;
            continue;
        };
        opened += 1;
        for _ in 0..40 {
            let c = r.below(ORIGIN_CHUNKS);
            let tag = 1 + r.below(3) as u32;
            let res = match r.below(8) {
                0 | 1 => s.lookup(tag, c).map(|_| ()),
                2 | 3 => s.prepare_origin_write(c).map(|_| ()),
                4 => s.prepare_snapshot_write(tag, c).map(|_| ()),
                5 => s.delete_snapshot(tag),
                6 => s.create_snapshot(tag, 1).map(|_| ()),
                _ => s.delete_step(50).map(|_| ()),
            };
            if res.is_err() && s.is_poisoned() {
                s.abort();
            }
            if r.below(4) == 0 {
                let _ = s.commit();
            }
        }
        let _ = s.commit();
    }
    println!("opened {opened}, refused {refused}");
    assert!(
        opened > 0 && refused > 0,
        "opened {opened}, refused {refused}"
    );
}

/// The metadata bitmap says the root leaf's block is free (and the cursor
/// points at it): the split that would take it for a new leaf fails with
/// the corruption instead of overwriting the leaf it splits.
#[test]
fn a_tree_block_free_in_the_bitmap_is_not_handed_out_again() {
    let d = format_store(ORIGIN_CHUNKS, 4000, StoreFullPolicy::Refuse);
    let mut s = open(d);
    s.create_snapshot(1, 0).unwrap();
    for c in 0..layout::LEAF_RECORDS_MAX as u64 {
        s.prepare_origin_write(c).unwrap();
        if !s.has_room() {
            s.commit().unwrap();
        }
    }
    s.commit().unwrap();
    assert_eq!(s.status().depth, 1);
    let mut d = s.into_disk();
    let l = label(&mut d);
    for j in 0..l.journal_blocks {
        d.write_at(&vec![0u8; BS as usize], (l.journal_start + j) * BS)
            .unwrap();
    }
    // Root leaf = metadata block 0: clear its bit, point the cursor at it.
    reseal(&mut d, l.meta_bitmap_start, |b| {
        b[layout::HEADER_BYTES] &= !1;
    });
    let mut sbk = sb(&mut d);
    assert_eq!(sbk.root, l.meta_start);
    sbk.meta_cursor = 0;
    sbk.meta_free += 1;
    let mut b = vec![0u8; BS as usize];
    sbk.encode(&mut b);
    layout::seal(&mut b, sbk.seq);
    d.write_at(&b, layout::SUPER_BLOCK * BS).unwrap();
    check_reports(
        &mut d,
        &[
            &format!("metadata block {}", l.meta_start),
            "free in the bitmap",
        ],
    );
    let mut s = csnap_store::Store::open(d, &open_opts()).unwrap();
    let e = s.prepare_origin_write(500).unwrap_err();
    assert_corrupt(&e, l.meta_bitmap_start, "free in the bitmap");
    assert!(s.is_poisoned());
    s.abort();
    assert_eq!(s.lookup(1, 3).unwrap(), csnap_store::Mapping::Store(3));
}
