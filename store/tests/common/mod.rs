//! Test harness: a store plus an origin on in-memory (or recording) disks, the
//! data path a server would run around the store, and a model to compare to.

#![allow(dead_code)]

use std::collections::BTreeMap;

use csnap_store::disk::{Disk, MemDisk};
use csnap_store::{
    FormatOptions, Mapping, OpenOptions, OriginWrite, SnapshotWrite, Store, StoreError,
    StoreFullPolicy,
};

pub const CHUNK: usize = 4096;
pub const CACHE_BLOCKS: usize = csnap_pools::CACHE_MIN_BLOCKS;

/// Contents of a chunk that holds value `v`.
pub fn pattern(v: u64) -> Vec<u8> {
    let mut b = vec![0u8; CHUNK];
    for (i, w) in b.chunks_mut(8).enumerate() {
        w.copy_from_slice(&(v ^ (i as u64).wrapping_mul(0x9E37_79B9)).to_le_bytes());
    }
    b
}

/// Which value a chunk's contents encode, if any.
pub fn value_of(b: &[u8]) -> Option<u64> {
    let v = u64::from_le_bytes(b[..8].try_into().unwrap());
    (pattern(v) == b).then_some(v)
}

/// Initial value of origin chunk `c`.
pub fn initial(c: u64) -> u64 {
    1_000_000 + c
}

/// Formats a store sized so the data area holds about `data_chunks` chunks.
pub fn format_store(origin_chunks: u64, data_chunks: u64, policy: StoreFullPolicy) -> MemDisk {
    format_store_as(origin_chunks, data_chunks, policy, false)
}

/// `format_store` the way csnap before #13 formatted: the snapshot table
/// inside a version-1 superblock.
#[allow(dead_code)]
pub fn format_store_v1(origin_chunks: u64, data_chunks: u64, policy: StoreFullPolicy) -> MemDisk {
    format_store_as(origin_chunks, data_chunks, policy, true)
}

fn format_store_as(
    origin_chunks: u64,
    data_chunks: u64,
    policy: StoreFullPolicy,
    v1: bool,
) -> MemDisk {
    let mut o = FormatOptions::new(origin_chunks * CHUNK as u64);
    o.chunk_size_bytes = CHUNK as u32;
    o.journal_blocks = csnap_pools::JOURNAL_MIN_BLOCKS;
    o.policy = policy;
    o.store_uuid = [7; 16];
    o.origin_uuid = [9; 16];
    // The smallest device whose layout gives the wanted data chunks.
    let mut size = (data_chunks + 1) * CHUNK as u64;
    loop {
        if let Ok(l) = csnap_store::plan_layout(size, &o) {
            if l.data_chunks >= data_chunks {
                assert_eq!(l.data_chunks, data_chunks, "layout search overshot");
                break;
            }
        }
        size += CHUNK as u64;
    }
    let mut d = MemDisk::new(size as usize);
    if v1 {
        csnap_store::format_v1(&mut d, &o).unwrap();
    } else {
        csnap_store::format(&mut d, &o).unwrap();
    }
    d
}

/// An origin whose chunks hold their initial values.
pub fn make_origin(origin_chunks: u64) -> MemDisk {
    let mut d = MemDisk::new((origin_chunks as usize) * CHUNK);
    for c in 0..origin_chunks {
        d.write_at(&pattern(initial(c)), c * CHUNK as u64).unwrap();
    }
    d
}

pub fn open<D: Disk>(d: D) -> Store<D> {
    Store::open(
        d,
        &OpenOptions {
            cache_blocks: CACHE_BLOCKS,
        },
    )
    .unwrap()
}

/// What happened to an origin write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Refused: store full.
    Refused,
}

/// The server-side data path around a store.
pub struct Harness<D: Disk, O: Disk> {
    pub store: Store<D>,
    pub origin: O,
    /// Snapshots deleted by the store-full policy, in order.
    pub auto_deleted: Vec<u32>,
}

impl<D: Disk, O: Disk> Harness<D, O> {
    pub fn new(store: Store<D>, origin: O) -> Self {
        Harness {
            store,
            origin,
            auto_deleted: Vec::new(),
        }
    }

    fn copy_origin_to_store(&mut self, chunk: u64, store_chunk: u64) {
        let mut b = vec![0u8; CHUNK];
        self.origin.read_at(&mut b, chunk * CHUNK as u64).unwrap();
        let off = self.store.chunk_offset(store_chunk);
        self.store.write_data(&b, off).unwrap();
    }

    fn copy_store_to_store(&mut self, from: u64, to: u64) {
        let mut b = vec![0u8; CHUNK];
        let off = self.store.chunk_offset(from);
        self.store.read_data(&mut b, off).unwrap();
        let off = self.store.chunk_offset(to);
        self.store.write_data(&b, off).unwrap();
    }

    /// Prepares an origin write (copy-out included), without committing.
    /// Retries through commits and reclaim as a server would.
    pub fn prepare_origin(&mut self, chunk: u64) -> Outcome {
        loop {
            match self.store.prepare_origin_write(chunk) {
                Ok(OriginWrite::Unique) => return Outcome::Done,
                Ok(OriginWrite::CopyOut { store_chunk }) => {
                    self.copy_origin_to_store(chunk, store_chunk);
                    return Outcome::Done;
                }
                Err(StoreError::TxFull) => {
                    self.store.commit().unwrap();
                }
                Err(StoreError::Reclaiming { victim }) => {
                    if let Some(t) = victim {
                        self.auto_deleted.push(t);
                    }
                    self.store.reclaim().unwrap();
                }
                Err(StoreError::StoreFull) => return Outcome::Refused,
                Err(e) => panic!("origin write of chunk {chunk}: {e}"),
            }
        }
    }

    /// A whole origin write: prepare, copy out, commit, then write the origin.
    pub fn origin_write(&mut self, chunk: u64, v: u64) -> Outcome {
        let o = self.prepare_origin(chunk);
        if o == Outcome::Done {
            self.store.commit().unwrap();
            self.origin
                .write_at(&pattern(v), chunk * CHUNK as u64)
                .unwrap();
        }
        o
    }

    /// Several origin writes sharing one commit (group commit).
    pub fn origin_write_batch(&mut self, writes: &[(u64, u64)]) -> Vec<Outcome> {
        let outcomes: Vec<Outcome> = writes
            .iter()
            .map(|&(c, _)| self.prepare_origin(c))
            .collect();
        self.store.commit().unwrap();
        for (&(c, v), o) in writes.iter().zip(&outcomes) {
            if *o == Outcome::Done {
                self.origin.write_at(&pattern(v), c * CHUNK as u64).unwrap();
            }
        }
        outcomes
    }

    /// A whole snapshot write.
    pub fn snapshot_write(&mut self, tag: u32, chunk: u64, v: u64) -> Outcome {
        let w = loop {
            match self.store.prepare_snapshot_write(tag, chunk) {
                Ok(w) => break w,
                Err(StoreError::TxFull) => {
                    self.store.commit().unwrap();
                }
                Err(StoreError::Reclaiming { victim }) => {
                    if let Some(t) = victim {
                        self.auto_deleted.push(t);
                    }
                    self.store.reclaim().unwrap();
                    if self.store.snapshot(tag).is_none() {
                        return Outcome::Refused;
                    }
                }
                Err(StoreError::StoreFull) => return Outcome::Refused,
                Err(e) => panic!("snapshot {tag} write of chunk {chunk}: {e}"),
            }
        };
        match w {
            SnapshotWrite::Unique { .. } => {}
            SnapshotWrite::CopyFromOrigin { store_chunk } => {
                self.copy_origin_to_store(chunk, store_chunk)
            }
            SnapshotWrite::CopyFromStore { from, store_chunk } => {
                self.copy_store_to_store(from, store_chunk)
            }
        }
        self.store.commit().unwrap();
        // The client's own write: the store does not see it.
        let off = self.store.chunk_offset(w.store_chunk());
        self.store.client_disk().write_at(&pattern(v), off).unwrap();
        Outcome::Done
    }

    /// Reads snapshot `tag`'s chunk.
    pub fn read_snapshot(&mut self, tag: u32, chunk: u64) -> Vec<u8> {
        let mut b = vec![0u8; CHUNK];
        match self.store.lookup(tag, chunk).unwrap() {
            Mapping::Origin => self.origin.read_at(&mut b, chunk * CHUNK as u64).unwrap(),
            Mapping::Store(s) => {
                let off = self.store.chunk_offset(s);
                self.store.read_data(&mut b, off).unwrap()
            }
        }
        b
    }

    pub fn read_origin(&mut self, chunk: u64) -> Vec<u8> {
        let mut b = vec![0u8; CHUNK];
        self.origin.read_at(&mut b, chunk * CHUNK as u64).unwrap();
        b
    }
}

/// The model: what every volume must read.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub origin: Vec<u64>,
    pub snaps: BTreeMap<u32, Vec<u64>>,
}

impl Model {
    pub fn new(origin_chunks: u64) -> Self {
        Model {
            origin: (0..origin_chunks).map(initial).collect(),
            snaps: BTreeMap::new(),
        }
    }
}

/// Compares every chunk of every volume with the model.
pub fn verify<D: Disk, O: Disk>(h: &mut Harness<D, O>, m: &Model, when: &str) {
    for c in 0..m.origin.len() as u64 {
        let got = value_of(&h.read_origin(c));
        assert_eq!(got, Some(m.origin[c as usize]), "{when}: origin chunk {c}");
    }
    let listed: Vec<u32> = h
        .store
        .snapshots()
        .filter(|s| !s.deleting)
        .map(|s| s.tag)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let expected: Vec<u32> = m.snaps.keys().copied().collect();
    assert_eq!(listed, expected, "{when}: snapshot list");
    for (&tag, data) in &m.snaps {
        for c in 0..data.len() as u64 {
            let got = value_of(&h.read_snapshot(tag, c));
            assert_eq!(
                got,
                Some(data[c as usize]),
                "{when}: snapshot {tag} chunk {c}"
            );
        }
    }
}

/// `check` on a store disk must be clean.
pub fn assert_clean<D: Disk>(d: &mut D, when: &str) {
    let r = csnap_store::check::check(d);
    assert!(
        r.is_clean(),
        "{when}: check found problems:\n{}",
        r.problems.join("\n")
    );
}

/// Origin chunks of `populated_store`.
pub const POPULATED_ORIGIN_CHUNKS: u64 = 2000;

/// A store with a two-level tree and snapshots 1 and 2 (snapshot 2 written
/// at chunk 7, and snapshot 1 at chunk 5 when `snapshot_1_write`), whose
/// last commit touches only the superblock, so the journal's newest commit
/// does not cover the blocks the corruption tests damage.
pub fn populated_store(snapshot_1_write: bool) -> MemDisk {
    let n = POPULATED_ORIGIN_CHUNKS;
    let d = format_store(n, 4000, StoreFullPolicy::Refuse);
    let mut h = Harness::new(open(d), make_origin(n));
    h.store.create_snapshot(1, 0).unwrap();
    h.store.commit().unwrap();
    let writes: Vec<(u64, u64)> = (0..400).map(|i| (i * 5 % n, i)).collect();
    h.origin_write_batch(&writes);
    h.store.create_snapshot(2, 0).unwrap();
    h.snapshot_write(2, 7, 77);
    if snapshot_1_write {
        h.snapshot_write(1, 5, 55);
    }
    assert_eq!(h.store.status().depth, 2);
    h.store.set_priority(1, 3).unwrap();
    h.store.commit().unwrap();
    let mut d = h.store.into_disk();
    assert_clean(&mut d, "populated store");
    d
}

/// Metadata block `addr` of a store disk.
pub fn read_block(d: &mut MemDisk, addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; csnap_pools::BLOCK_SIZE_BYTES];
    d.read_at(&mut b, addr * csnap_pools::BLOCK_SIZE_BYTES as u64)
        .unwrap();
    b
}

/// A fresh scratch directory for test `name` of suite `suite` (under the
/// temp dir, emptied first).
pub fn scratch_dir(suite: &str, name: &str) -> std::path::PathBuf {
    csnap_testkit::fresh_dir(suite, name)
}

/// A 64 MiB store file in `dir`, formatted through direct I/O (a 16 MiB
/// origin, a 128-block journal); returns its path.
pub fn direct_store(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("store");
    std::fs::write(&path, vec![0u8; 64 << 20]).unwrap();
    let mut d = csnap_store::disk::FileDisk::open(&path).unwrap();
    assert!(d.is_direct());
    let mut o = csnap_store::FormatOptions::new(16 << 20);
    o.journal_blocks = 128;
    csnap_store::format(&mut d, &o).unwrap();
    path
}
