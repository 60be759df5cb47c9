//! Inputs the fuzzers (`fuzz/`, `scripts/fuzz.sh`) found that crashed a
//! decoder, each as a plain test against the public API. The crashing
//! inputs themselves are also in `fuzz/corpus/<target>/`, replayed by
//! `cargo test -p csnap-fuzz`.

use csnap_store::disk::{Disk, MemDisk};
use csnap_store::layout::{self, Label};
use csnap_store::{FormatOptions, StoreError};

const BS: usize = 4096;

fn formatted() -> MemDisk {
    let mut o = FormatOptions::new(4 << 20);
    o.chunk_size_bytes = 4096;
    o.journal_blocks = csnap_pools::JOURNAL_MIN_BLOCKS;
    let mut d = MemDisk::new(16 << 20);
    csnap_store::format(&mut d, &o).unwrap();
    d
}

/// Fuzz target `label`: a label whose metadata area ends past
/// `u64::MAX / 4096` blocks made `Label::validate` (every tool's and every
/// open's label check) multiply past u64 and panic. Now a clear refusal,
/// from `read_label`, `check` and `Store::open` alike.
#[test]
fn label_whose_regions_end_near_u64_max_is_refused_not_a_panic() {
    let mut d = formatted();
    let mut b = vec![0u8; BS];
    d.read_at(&mut b, 0).unwrap();
    let mut l = Label::decode(&b).unwrap();
    // The fuzzer's values: the data bitmap reaches 0x0600_0000_0000_0001
    // blocks, the metadata area starts right after it and is empty.
    l.data_bitmap_blocks = 0x0600_0000_0000_0001;
    l.meta_start = l.data_bitmap_start + l.data_bitmap_blocks;
    l.meta_blocks = 0;
    l.data_chunks = 0;
    l.encode(&mut b);
    assert!(layout::verify(&b, 0, layout::BlockKind::Label).is_ok());
    d.write_at(&b, 0).unwrap();
    let size = d.size_bytes();
    assert!(l.validate(size).is_err());
    assert!(l.check(size).is_err());
    match csnap_store::read_label(&mut d) {
        Err(StoreError::Invalid(why)) => assert!(why.contains("overflows"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let r = csnap_store::check::check(&mut d);
    assert!(!r.is_clean());
    assert!(csnap_store::Store::open(d, &csnap_store::OpenOptions::default()).is_err());
}
