//! `check` catches injected corruption in every kind of metadata block, a
//! misdirected block write and a leaked chunk, each with a clear message; the
//! store refuses to open, or opens and repairs from the journal, but never
//! panics.

// Test code indexes host-sized buffers with u64 chunk numbers of small test
// stores; truncation cannot happen on the 64-bit hosts the tests run on.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use csnap_store::disk::{Disk, MemDisk};
use csnap_store::layout::{self, BlockKind, Super};
use csnap_store::tree;

const BS: u64 = 4096;

fn populated() -> MemDisk {
    populated_store(true)
}

fn write_block(d: &mut MemDisk, addr: u64, b: &[u8]) {
    d.write_at(b, addr * BS).unwrap();
}

fn flip(d: &mut MemDisk, addr: u64, byte: usize) {
    let mut b = read_block(d, addr);
    b[byte] ^= 0x10;
    write_block(d, addr, &b);
}

fn sb(d: &mut MemDisk) -> Super {
    Super::decode(&read_block(d, layout::SUPER_BLOCK)).unwrap()
}

fn problems(d: &mut MemDisk) -> Vec<String> {
    let r = csnap_store::check::check(d);
    assert!(!r.is_clean(), "check missed the corruption");
    r.problems
}

fn expect(d: &mut MemDisk, needles: &[&str]) -> Vec<String> {
    let p = problems(d);
    let all = p.join("\n");
    for n in needles {
        assert!(all.contains(n), "check output lacks {n:?}:\n{all}");
    }
    p
}

fn open_err(d: MemDisk) -> String {
    match csnap_store::Store::open(
        d,
        &csnap_store::OpenOptions {
            cache_blocks: CACHE_BLOCKS,
        },
    ) {
        Ok(_) => panic!("a corrupt store opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn flipped_bit_in_label() {
    let mut d = populated();
    flip(&mut d, 0, 200);
    expect(&mut d, &["label", "checksum"]);
    assert!(open_err(d).contains("label is corrupt"));
}

#[test]
fn flipped_bit_in_superblock_is_reported_and_repaired_from_the_journal() {
    let mut d = populated();
    flip(&mut d, layout::SUPER_BLOCK, 300);
    expect(
        &mut d,
        &[
            "superblock (block 1): checksum mismatch",
            "journal holds a good copy",
        ],
    );
    // Opening replays the journal copy over it.
    let s = open(d);
    assert_eq!(s.status().snapshots, 2);
    let mut d = s.into_disk();
    assert_clean(&mut d, "after repair");
}

#[test]
fn flipped_bit_in_superblock_without_a_journal_copy_refuses_to_open() {
    let mut d = populated();
    let l = csnap_store::read_label(&mut d).unwrap();
    // Wipe the journal, then damage the superblock.
    for s in 0..l.journal_blocks {
        write_block(&mut d, l.journal_start + s, &vec![0u8; BS as usize]);
    }
    flip(&mut d, layout::SUPER_BLOCK, 300);
    expect(
        &mut d,
        &["superblock is unreadable and the journal holds no copy"],
    );
    assert!(open_err(d).contains("superblock is unreadable"));
}

#[test]
fn flipped_bit_in_journal_commit_block() {
    let mut d = populated();
    let l = csnap_store::read_label(&mut d).unwrap();
    let s = sb(&mut d);
    flip(&mut d, l.journal_start + s.journal_last_slot, 40);
    expect(
        &mut d,
        &[
            &format!("journal: commit {} at slot {}", s.seq, s.journal_last_slot),
            "damaged",
        ],
    );
}

#[test]
fn flipped_bit_in_journal_block_image() {
    let mut d = populated();
    let l = csnap_store::read_label(&mut d).unwrap();
    let s = sb(&mut d);
    flip(&mut d, l.journal_start + s.journal_last_slot + 1, 1000);
    expect(&mut d, &["journal: commit", "damaged"]);
}

#[test]
fn flipped_bit_in_metadata_bitmap() {
    let mut d = populated();
    let l = csnap_store::read_label(&mut d).unwrap();
    flip(&mut d, l.meta_bitmap_start, 100);
    expect(
        &mut d,
        &[&format!(
            "metadata bitmap block {}: checksum mismatch",
            l.meta_bitmap_start
        )],
    );
}

#[test]
fn flipped_bit_in_data_bitmap() {
    let mut d = populated();
    let l = csnap_store::read_label(&mut d).unwrap();
    flip(&mut d, l.data_bitmap_start, 100);
    expect(
        &mut d,
        &[&format!(
            "data bitmap block {}: checksum mismatch",
            l.data_bitmap_start
        )],
    );
}

#[test]
fn flipped_bit_in_index_node() {
    let mut d = populated();
    let root = sb(&mut d).root;
    flip(&mut d, root, 60);
    expect(
        &mut d,
        &[&format!(
            "b-tree index node at block {root} (level 1): checksum mismatch"
        )],
    );
    // Opening reads and checks the root: a store whose root is damaged
    // refuses to open (a server refuses to start) and names the block.
    let e = open_err(d);
    assert!(
        e.contains("corrupt") && e.contains(&format!("block {root}")),
        "{e}"
    );
}

#[test]
fn flipped_bit_in_leaf() {
    let mut d = populated();
    let root = sb(&mut d).root;
    let leaf = tree::node_child(&read_block(&mut d, root), 1);
    flip(&mut d, leaf, 500);
    expect(
        &mut d,
        &[&format!(
            "b-tree leaf at block {leaf} (level 0): checksum mismatch"
        )],
    );
}

#[test]
fn misdirected_write_is_detected() {
    let mut d = populated();
    let root = sb(&mut d).root;
    let rb = read_block(&mut d, root);
    let (a, b) = (tree::node_child(&rb, 0), tree::node_child(&rb, 1));
    // The image meant for block a lands on block b.
    let img = read_block(&mut d, a);
    write_block(&mut d, b, &img);
    expect(
        &mut d,
        &[&format!("block belongs at address {a} (misdirected write)")],
    );
}

#[test]
fn leaked_chunk_is_detected() {
    let mut d = populated();
    let l = csnap_store::read_label(&mut d).unwrap();
    let mut b = read_block(&mut d, l.data_bitmap_start);
    // The last data chunk is free in a store this size; mark it allocated and
    // reseal so only the cross-check can tell.
    let idx = l.data_chunks - 1;
    assert!(!csnap_store::test_bit(&b, idx));
    b[layout::HEADER_BYTES + (idx / 8) as usize] |= 1 << (idx % 8);
    let seq = layout::seq(&b);
    layout::seal(&mut b, seq);
    write_block(&mut d, l.data_bitmap_start, &b);
    expect(
        &mut d,
        &[&format!(
            "data chunk {idx} is allocated but not referenced (leak)"
        )],
    );
}

#[test]
fn double_referenced_chunk_is_detected() {
    let mut d = populated();
    let root = sb(&mut d).root;
    let leaf = tree::node_child(&read_block(&mut d, root), 0);
    let mut b = read_block(&mut d, leaf);
    // Point record 1 at record 0's store chunk.
    let r0 = tree::leaf_get(&b, 0);
    let off = layout::LEAF_RECORDS_OFF + layout::LEAF_RECORD_BYTES + 16;
    b[off..off + 8].copy_from_slice(&r0.store.to_le_bytes());
    let seq = layout::seq(&b);
    layout::seal(&mut b, seq);
    write_block(&mut d, leaf, &b);
    expect(
        &mut d,
        &[
            &format!("store chunk {} is used by two exceptions", r0.store),
            "leak",
        ],
    );
}

#[test]
fn foreign_truncated_and_empty_devices_get_clear_errors() {
    let mut empty = MemDisk::new(1 << 20);
    expect(&mut empty, &["not a csnap store", "block 0 is empty"]);
    let mut foreign = MemDisk::new(1 << 20);
    for (i, x) in foreign.bytes.iter_mut().enumerate() {
        *x = (i * 7 + 3) as u8;
    }
    expect(&mut foreign, &["not a csnap store", "foreign"]);
    let mut tiny = MemDisk::new(100);
    expect(&mut tiny, &["truncated or empty"]);
    let d = populated();
    let mut half = MemDisk::new(d.bytes.len() / 2);
    half.bytes.copy_from_slice(&d.bytes[..d.bytes.len() / 2]);
    expect(&mut half, &["store is truncated"]);
    assert!(open_err(half).contains("truncated"));
}

#[test]
fn kind_of_block_is_checked() {
    // A valid bitmap image written over a leaf's home (same address, so the
    // checksum and address pass): the reader expects a leaf.
    let mut d = populated();
    let l = csnap_store::read_label(&mut d).unwrap();
    let root = sb(&mut d).root;
    let leaf = tree::node_child(&read_block(&mut d, root), 0);
    let mut b = read_block(&mut d, l.meta_bitmap_start);
    layout::init_header(&mut b, BlockKind::Bitmap, leaf);
    layout::seal(&mut b, 1);
    write_block(&mut d, leaf, &b);
    expect(
        &mut d,
        &[&format!(
            "b-tree leaf at block {leaf} (level 0): unexpected block kind"
        )],
    );
}

#[test]
fn damaged_home_copy_of_a_journaled_block_is_reported() {
    let mut d = populated();
    let l = csnap_store::read_label(&mut d).unwrap();
    // Make the newest commit cover a leaf, then damage the leaf's home copy.
    let mut s = open(d);
    s.prepare_snapshot_write(1, 901).unwrap();
    s.commit().unwrap();
    let mut d = s.into_disk();
    let sbv = sb(&mut d);
    let mut buf = vec![0u8; csnap_store::journal::REPLAY_BUFFER_BLOCKS * BS as usize];
    let c = csnap_store::journal::read_commit(
        &mut d,
        &l,
        sbv.journal_last_slot,
        Some(sbv.seq),
        &mut buf,
    )
    .unwrap()
    .unwrap();
    let leaf = (0..c.blocks)
        .map(|i| csnap_store::journal::entry_home(&buf, i))
        .find(|&a| a >= l.meta_start)
        .expect("the commit covers a tree block");
    flip(&mut d, leaf, 700);
    expect(
        &mut d,
        &[&format!("at block {leaf}: home copy: checksum mismatch")],
    );
    let mut d = open(d).into_disk();
    assert_clean(&mut d, "after replay repaired the home copy");
}
