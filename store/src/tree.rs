//! In-place accessors for b-tree leaves and index nodes.
//!
//! A leaf is the common header plus a sorted array of 24-byte records
//! `{logical chunk, share mask, store chunk}`. All exceptions of one logical
//! chunk are adjacent and live in the same leaf; their masks are disjoint. An
//! index node is the header plus `{lowest key, child block}` entries; entry 0's
//! key is not used for routing.

use crate::layout::{count, set_count};
use crate::layout::{
    get_u64, put_u64, LEAF_MASK_WORDS_OFF, LEAF_RECORDS_MAX, LEAF_RECORDS_OFF, LEAF_RECORD_BYTES,
    NODE_ENTRIES_MAX, NODE_ENTRIES_OFF, NODE_ENTRY_BYTES,
};
use crate::mask::Mask;

/// One exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Logical chunk of the origin.
    pub chunk: u64,
    /// Snapshots (by share bit) that use this copy.
    pub mask: Mask,
    /// Store data chunk holding the copy.
    pub store: u64,
}

/// Records in a leaf.
pub fn leaf_len(b: &[u8]) -> usize {
    usize::from(count(b))
}

/// The record format a leaf declares (its share-mask-width byte): 1, one
/// 64-bit mask word per record and, in the top 16 bits of the store-chunk
/// field, the index of the 64-slot window it covers. Window 0 is byte for
/// byte the format before #13, so older leaves are read as they are.
pub const LEAF_RECORD_FORMAT: u8 = 1;
/// Bits of a record's store-chunk field that hold the store chunk.
pub const RECORD_STORE_BITS: u32 = 48;
const RECORD_STORE_MASK: u64 = (1 << RECORD_STORE_BITS) - 1;

/// Sets up a fresh leaf's fixed fields.
pub fn leaf_init(b: &mut [u8]) {
    b[LEAF_MASK_WORDS_OFF] = LEAF_RECORD_FORMAT;
    set_count(b, 0);
}

/// Share-mask words declared by a leaf.
pub fn leaf_mask_words(b: &[u8]) -> u8 {
    b[LEAF_MASK_WORDS_OFF]
}

fn rec_off(i: usize) -> usize {
    LEAF_RECORDS_OFF + i * LEAF_RECORD_BYTES
}

/// The window field of record `i`.
pub fn leaf_window(b: &[u8], i: usize) -> usize {
    usize::try_from(get_u64(b, rec_off(i) + 16) >> RECORD_STORE_BITS).unwrap_or(usize::MAX)
}

/// Record `i` (a window past the table gives an empty mask, which
/// `check_leaf` refuses).
pub fn leaf_get(b: &[u8], i: usize) -> Record {
    let o = rec_off(i);
    Record {
        chunk: get_u64(b, o),
        mask: Mask::from_window(leaf_window(b, i), get_u64(b, o + 8)),
        store: get_u64(b, o + 16) & RECORD_STORE_MASK,
    }
}

fn leaf_put(b: &mut [u8], i: usize, r: Record) {
    let (w, word) = r
        .mask
        .single_window()
        .expect("a record's share mask lies in one window");
    assert!(r.store <= RECORD_STORE_MASK, "store chunk past 48 bits");
    let o = rec_off(i);
    put_u64(b, o, r.chunk);
    put_u64(b, o + 8, word);
    put_u64(b, o + 16, r.store | (w as u64) << RECORD_STORE_BITS);
}

/// Rewrites record `i`'s share mask, which stays non-empty and in the
/// record's window.
pub fn leaf_set_mask(b: &mut [u8], i: usize, mask: Mask) {
    let (w, word) = mask
        .single_window()
        .expect("a record's share mask lies in one window");
    assert_eq!(w, leaf_window(b, i), "a record keeps its window");
    put_u64(b, rec_off(i) + 8, word);
}

/// First record index whose chunk is `>= chunk`.
pub fn leaf_lower_bound(b: &[u8], chunk: u64) -> usize {
    let (mut lo, mut hi) = (0, leaf_len(b));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if get_u64(b, rec_off(mid)) < chunk {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Index range of the records of `chunk`.
pub fn leaf_find(b: &[u8], chunk: u64) -> (usize, usize) {
    let lo = leaf_lower_bound(b, chunk);
    let n = leaf_len(b);
    let mut hi = lo;
    while hi < n && get_u64(b, rec_off(hi)) == chunk {
        hi += 1;
    }
    (lo, hi)
}

/// Inserts a record at index `i`. The leaf must have room.
pub fn leaf_insert(b: &mut [u8], i: usize, r: Record) {
    let n = leaf_len(b);
    assert!(n < LEAF_RECORDS_MAX, "leaf insert into a full leaf");
    assert!(i <= n);
    b.copy_within(rec_off(i)..rec_off(n), rec_off(i + 1));
    leaf_put(b, i, r);
    set_count(b, u16::try_from(n + 1).unwrap_or(u16::MAX));
}

/// Removes record `i`.
pub fn leaf_remove(b: &mut [u8], i: usize) {
    let n = leaf_len(b);
    assert!(i < n);
    b.copy_within(rec_off(i + 1)..rec_off(n), rec_off(i));
    b[rec_off(n - 1)..rec_off(n)].fill(0);
    set_count(b, u16::try_from(n - 1).unwrap_or(0));
}

/// Where to split a full leaf: the group boundary nearest the middle on the
/// right, else on the left, so a chunk's records stay in one leaf where
/// they can; a leaf that holds one chunk's records only is cut in the
/// middle (groups may span leaves: ARCHITECTURE 2.2).
pub fn leaf_split_point(b: &[u8]) -> usize {
    let n = leaf_len(b);
    assert!(n >= 2, "split of a leaf with fewer than two records");
    let mid = n / 2;
    let boundary = |s: usize| leaf_get(b, s).chunk != leaf_get(b, s - 1).chunk;
    (mid..n)
        .find(|&s| boundary(s))
        .or_else(|| (1..mid).rev().find(|&s| boundary(s)))
        .unwrap_or(mid)
}

/// Moves records `[s..]` of `from` into the empty leaf `to`.
pub fn leaf_move_tail(from: &mut [u8], to: &mut [u8], s: usize) {
    let n = leaf_len(from);
    assert_eq!(leaf_len(to), 0);
    to[rec_off(0)..rec_off(n - s)].copy_from_slice(&from[rec_off(s)..rec_off(n)]);
    from[rec_off(s)..rec_off(n)].fill(0);
    set_count(to, u16::try_from(n - s).unwrap_or(0));
    set_count(from, u16::try_from(s).unwrap_or(0));
}

/// Entries in an index node.
pub fn node_len(b: &[u8]) -> usize {
    usize::from(count(b))
}

fn ent_off(i: usize) -> usize {
    NODE_ENTRIES_OFF + i * NODE_ENTRY_BYTES
}

/// Key of entry `i`.
pub fn node_key(b: &[u8], i: usize) -> u64 {
    get_u64(b, ent_off(i))
}

/// Child block of entry `i`.
pub fn node_child(b: &[u8], i: usize) -> u64 {
    get_u64(b, ent_off(i) + 8)
}

/// Entry to follow for `key`: the last whose key is `< key`, or 0. Keys
/// may repeat (a chunk's records may span leaves, and every leaf after the
/// first of them is keyed by that chunk), so the records of `key` start in
/// the child left of the first entry keyed `key`: the walks go right from
/// there (`Store::next_leaf`).
pub fn node_route(b: &[u8], key: u64) -> usize {
    let n = node_len(b);
    let (mut lo, mut hi) = (1, n);
    // Find the first entry in 1..n with key >= `key`; route to the one before.
    while lo < hi {
        let mid = (lo + hi) / 2;
        if node_key(b, mid) < key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo - 1
}

/// Inserts an entry at index `i`. The node must have room.
pub fn node_insert(b: &mut [u8], i: usize, key: u64, child: u64) {
    let n = node_len(b);
    assert!(n < NODE_ENTRIES_MAX, "node insert into a full node");
    assert!(i <= n);
    b.copy_within(ent_off(i)..ent_off(n), ent_off(i + 1));
    put_u64(b, ent_off(i), key);
    put_u64(b, ent_off(i) + 8, child);
    set_count(b, u16::try_from(n + 1).unwrap_or(u16::MAX));
}

/// Moves entries `[s..]` of `from` into the empty node `to`.
pub fn node_move_tail(from: &mut [u8], to: &mut [u8], s: usize) {
    let n = node_len(from);
    assert!(s > 0 && s < n);
    assert_eq!(node_len(to), 0);
    to[ent_off(0)..ent_off(n - s)].copy_from_slice(&from[ent_off(s)..ent_off(n)]);
    from[ent_off(s)..ent_off(n)].fill(0);
    set_count(to, u16::try_from(n - s).unwrap_or(0));
    set_count(from, u16::try_from(s).unwrap_or(0));
}

/// Structural check of a verified leaf (heap-free; no panic, no index past
/// the block): the level is 0, the share-mask width is the supported one,
/// the record count fits the block, records are sorted by logical chunk,
/// each logical chunk is inside the origin, each store chunk inside the
/// data area, each share mask non-empty, naming only snapshot slots in use
/// (`slots_in_use`) and disjoint from the other masks of its chunk.
pub fn check_leaf(
    b: &[u8],
    origin_chunks: u64,
    data_chunks: u64,
    slots_in_use: Mask,
) -> Result<(), &'static str> {
    if crate::layout::level(b) != 0 {
        return Err("leaf has a non-zero tree level");
    }
    if leaf_mask_words(b) != LEAF_RECORD_FORMAT {
        return Err("leaf declares an unsupported share-mask width");
    }
    let n = leaf_len(b);
    if n > LEAF_RECORDS_MAX {
        return Err("leaf record count exceeds its capacity");
    }
    let mut prev_chunk = 0u64;
    let mut group = Mask::EMPTY;
    for i in 0..n {
        let r = leaf_get(b, i);
        if leaf_window(b, i) >= csnap_pools::SHARE_MASK_WORDS {
            return Err("leaf record's share window is past the snapshot table");
        }
        if i > 0 && r.chunk < prev_chunk {
            return Err("leaf records are out of order");
        }
        if i == 0 || r.chunk != prev_chunk {
            group = Mask::EMPTY;
        }
        if r.chunk >= origin_chunks {
            return Err("leaf record's logical chunk is past the end of the origin");
        }
        if r.store >= data_chunks {
            return Err("leaf record's store chunk is outside the data area");
        }
        if r.mask.is_empty() {
            return Err("leaf record has an empty share mask");
        }
        if r.mask.intersects(!slots_in_use) {
            return Err("leaf record's share mask names a free snapshot slot");
        }
        if r.mask.intersects(group) {
            return Err("a snapshot has two exceptions for one chunk");
        }
        group |= r.mask;
        prev_chunk = r.chunk;
    }
    Ok(())
}

/// Structural check of a verified index node at `addr` (heap-free): its
/// level is 1..TREE_DEPTH_MAX-1, its entry count 1..=capacity, its keys
/// (from entry 1, entry 0's is not used for routing) ascending (equal keys
/// allowed: the leaves of one chunk's records),
/// and every child inside the metadata area `[meta_start, meta_end)` and
/// not the node itself.
pub fn check_node(b: &[u8], addr: u64, meta_start: u64, meta_end: u64) -> Result<(), &'static str> {
    let level = usize::from(crate::layout::level(b));
    if level == 0 || level >= csnap_pools::TREE_DEPTH_MAX {
        return Err("index node level is out of range");
    }
    let n = node_len(b);
    if n == 0 {
        return Err("index node is empty");
    }
    if n > NODE_ENTRIES_MAX {
        return Err("index node entry count exceeds its capacity");
    }
    for i in 0..n {
        if i >= 2 && node_key(b, i) < node_key(b, i - 1) {
            return Err("index node keys are not ascending");
        }
        let c = node_child(b, i);
        if c < meta_start || c >= meta_end {
            return Err("index node child pointer is outside the metadata area");
        }
        if c == addr {
            return Err("index node points to itself");
        }
    }
    Ok(())
}
