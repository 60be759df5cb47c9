//! A standby store starts without allocating: memory is reserved first
//! (`Standby::reserve`), then `start` reads the label and superblock and
//! replays the journal, and the new incarnation is committed, all with the
//! heap sealed (counted). One test in this binary, so no other test thread
//! allocates meanwhile.

use csnap_store::disk::MemDisk;
use csnap_store::{FormatOptions, OpenOptions, Standby, Store};
use csnap_sys::alloc::{self, Mode, SealedAlloc};

#[global_allocator]
static ALLOC: SealedAlloc = SealedAlloc::new();

#[test]
fn standby_start_replay_and_incarnation_commit_allocate_nothing() {
    let mut o = FormatOptions::new(64 * 4096);
    o.chunk_size_bytes = 4096;
    o.journal_blocks = 128;
    let mut d = MemDisk::new(4 << 20);
    csnap_store::format(&mut d, &o).unwrap();
    // A former server: commits, so the journal holds a commit to replay.
    let mut s = Store::open(
        d,
        &OpenOptions {
            cache_blocks: csnap_pools::CACHE_MIN_BLOCKS,
        },
    )
    .unwrap();
    s.bump_incarnation().unwrap();
    s.create_snapshot(1, 0).unwrap();
    for c in 0..40 {
        s.prepare_origin_write(c).unwrap();
    }
    s.commit().unwrap();
    let d = s.into_disk();

    let standby = Standby::reserve(
        d,
        &OpenOptions {
            cache_blocks: csnap_pools::CACHE_MIN_BLOCKS,
        },
    )
    .unwrap();
    alloc::seal(Mode::Count);
    let before = alloc::sealed_allocations();
    // The failover path: start, replay, take the next incarnation durably,
    // and serve a first metadata operation.
    let mut s = standby.start().unwrap();
    let inc = s.bump_incarnation().unwrap();
    s.commit().unwrap();
    let w = s.prepare_origin_write(50).unwrap();
    s.commit().unwrap();
    let allocs = alloc::sealed_allocations() - before;
    let frees = alloc::sealed_frees();
    alloc::teardown();
    assert_eq!(inc, 2);
    assert!(matches!(w, csnap_store::OriginWrite::CopyOut { .. }));
    assert_eq!(
        s.replay_report().commits,
        1,
        "the former server's last commit was replayed"
    );
    assert_eq!(allocs, 0, "the standby start allocated {allocs} times");
    assert_eq!(frees, 0, "the standby start freed {frees} times");
}
