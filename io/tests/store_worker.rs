//! The store worker meets a corrupt block (issue #15): the request fails
//! with `StoreFailure::Corrupt`, one notification names the block, a
//! transaction the block poisoned is aborted with every reply it held
//! failed (nothing derived from the block is committed or acknowledged),
//! and the worker goes on serving.

// Test code: sizes of a few MiB move freely between u64, u32 and usize.
#![allow(clippy::cast_possible_truncation)]

use csnap_fsm::store_ops::{StoreFailure, StoreOp, StoreReply, StoreRequest, StoreResult};
use csnap_io::store_worker::{StoreWorker, NOTIFY_TOKEN};
use csnap_store::disk::{Disk, MemDisk};
use csnap_store::layout;
use csnap_store::{FormatOptions, OpenOptions, Store};

const CHUNK: u64 = 4096;
const ORIGIN_CHUNKS: u64 = 1000;
const BS: u64 = 4096;

fn opts() -> OpenOptions {
    OpenOptions {
        cache_blocks: csnap_pools::CACHE_MIN_BLOCKS,
    }
}

/// A store whose root leaf is full (168 records of snapshot 1), with the
/// metadata bitmap's header rewritten (a count, re-sealed): the next leaf
/// split reads it after the operation has modified the transaction.
fn store_with_a_bad_meta_bitmap() -> (MemDisk, u64) {
    let mut s = fresh_store();
    s.create_snapshot(1, 0).unwrap();
    for c in 0..layout::LEAF_RECORDS_MAX as u64 {
        s.prepare_origin_write(c).unwrap();
        if !s.has_room() {
            s.commit().unwrap();
        }
    }
    // A last commit that leaves the bitmap out of the journal's newest one.
    s.commit().unwrap();
    s.set_priority(1, 2).unwrap();
    s.commit().unwrap();
    assert_eq!(s.status().depth, 1);
    let at = s.label().meta_bitmap_start;
    let mut d = s.into_disk();
    let mut b = vec![0u8; BS as usize];
    d.read_at(&mut b, at * BS).unwrap();
    layout::set_count(&mut b, 7);
    let seq = layout::seq(&b);
    layout::seal(&mut b, seq);
    d.write_at(&b, at * BS).unwrap();
    (d, at)
}

/// A freshly formatted 16 MiB store of `ORIGIN_CHUNKS` chunks, open.
fn fresh_store() -> Store<MemDisk> {
    let mut d = MemDisk::new(16 << 20);
    let mut o = FormatOptions::new(ORIGIN_CHUNKS * CHUNK);
    o.chunk_size_bytes = CHUNK as u32;
    o.journal_blocks = csnap_pools::JOURNAL_MIN_BLOCKS;
    csnap_store::format(&mut d, &o).unwrap();
    Store::open(d, &opts()).unwrap()
}

fn run(w: &mut StoreWorker<MemDisk, MemDisk>, ops: &[StoreOp]) -> Vec<StoreReply> {
    let batch: Vec<StoreRequest> = ops
        .iter()
        .enumerate()
        .map(|(i, &op)| StoreRequest {
            token: i as u32,
            op,
        })
        .collect();
    let mut out = Vec::new();
    w.run_batch(&batch, &mut |r| out.push(r));
    w.write_home(&mut |r| out.push(r));
    out
}

#[test]
fn a_block_that_poisons_the_transaction_fails_the_replies_it_held_and_nothing_stops() {
    let (d, bitmap) = store_with_a_bad_meta_bitmap();
    let store = Store::open(d, &opts()).unwrap();
    let mut w = StoreWorker::new(store, MemDisk::new((ORIGIN_CHUNKS * CHUNK) as usize), 16);
    // A create (modifies the transaction, done), then an origin write whose
    // copy-out needs a leaf split: its new block comes from the corrupt
    // bitmap after the data chunk was allocated.
    let out = run(
        &mut w,
        &[
            StoreOp::Create {
                tag: 9,
                now_secs: 1,
            },
            StoreOp::OriginWrite {
                chunk: 500,
                chunks: 1,
                ahead: 0,
            },
        ],
    );
    let notes: Vec<&StoreReply> = out.iter().filter(|r| r.token == NOTIFY_TOKEN).collect();
    assert_eq!(notes.len(), 1, "{out:?}");
    match notes[0].result {
        StoreResult::Corrupt { addr, kind, reason } => {
            assert_eq!(addr, bitmap);
            assert_eq!(kind, "bitmap block");
            assert!(reason.contains("header"), "{reason}");
        }
        ref r => panic!("{r:?}"),
    }
    for t in [0, 1] {
        let r = out.iter().find(|r| r.token == t).unwrap();
        assert_eq!(
            r.result,
            StoreResult::Failed(StoreFailure::Corrupt),
            "reply {t} was in the aborted transaction: {out:?}"
        );
    }
    assert!(!w.failed(), "the worker stopped");
    // The create was not committed; the worker serves the next batch, and
    // the block is reported once however often it is met.
    let out = run(
        &mut w,
        &[
            StoreOp::List { from: 0 },
            StoreOp::SnapshotRead {
                tag: 1,
                chunk: 3,
                chunks: 1,
            },
            StoreOp::OriginWrite {
                chunk: 501,
                chunks: 1,
                ahead: 0,
            },
        ],
    );
    match &out[0].result {
        StoreResult::List(rows) => {
            assert_eq!(rows.len(), 1, "{out:?}");
            assert_eq!(rows[0].tag, 1);
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(out[1].result, StoreResult::Targets(_)), "{out:?}");
    assert_eq!(out[2].result, StoreResult::Failed(StoreFailure::Corrupt));
    assert!(out.iter().all(|r| r.token != NOTIFY_TOKEN), "{out:?}");
    assert!(!w.failed());
    // An origin write that needs no split still works (chunk 3 has its
    // copy already).
    let out = run(
        &mut w,
        &[StoreOp::OriginWrite {
            chunk: 3,
            chunks: 1,
            ahead: 0,
        }],
    );
    assert_eq!(out[0].result, StoreResult::Done);
    // Nothing of the failed batches was kept: snapshot 1 only.
    assert_eq!(w.store().unwrap().snapshots().count(), 1);
}

/// Background deletion that meets a corrupt leaf reports it once (as a
/// notification the server loop logs), stops instead of spinning on it, and
/// requests are still served.
#[test]
fn background_deletion_stops_at_a_corrupt_leaf_and_reports_it() {
    let mut s = fresh_store();
    s.create_snapshot(1, 0).unwrap();
    s.create_snapshot(2, 0).unwrap();
    for c in 0..400 {
        s.prepare_origin_write(c).unwrap();
        if !s.has_room() {
            s.commit().unwrap();
        }
    }
    s.commit().unwrap();
    assert_eq!(s.status().depth, 2);
    s.delete_snapshot(1).unwrap();
    s.commit().unwrap();
    s.set_priority(2, 1).unwrap();
    s.commit().unwrap();
    let root = {
        let mut b = vec![0u8; BS as usize];
        s.disk_mut()
            .read_at(&mut b, layout::SUPER_BLOCK * BS)
            .unwrap();
        layout::Super::decode(&b).unwrap().root
    };
    let mut d = s.into_disk();
    let mut b = vec![0u8; BS as usize];
    d.read_at(&mut b, root * BS).unwrap();
    let leaf = csnap_store::tree::node_child(&b, 0);
    d.read_at(&mut b, leaf * BS).unwrap();
    layout::set_count(&mut b, 200);
    let seq = layout::seq(&b);
    layout::seal(&mut b, seq);
    d.write_at(&b, leaf * BS).unwrap();

    let store = Store::open(d, &opts()).unwrap();
    let mut w = StoreWorker::new(store, MemDisk::new((ORIGIN_CHUNKS * CHUNK) as usize), 16);
    assert!(w.has_background_work());
    w.background_step();
    let mut notes = Vec::new();
    assert!(w.take_notifications(&mut |r| notes.push(r)));
    assert_eq!(notes.len(), 1);
    assert_eq!(
        notes[0].result,
        StoreResult::Corrupt {
            addr: leaf,
            kind: "b-tree leaf",
            reason: "leaf record count exceeds its capacity",
        }
    );
    assert!(!w.has_background_work(), "deletion would spin on the block");
    assert!(!w.failed());
    // A read under the other leaf is served.
    let out = run(
        &mut w,
        &[StoreOp::SnapshotRead {
            tag: 2,
            chunk: 399,
            chunks: 1,
        }],
    );
    assert!(matches!(out[0].result, StoreResult::Targets(_)), "{out:?}");
}

/// The snapshot list comes a page at a time (`StoreOp::List { from }`):
/// whole tags from `from`, in tag order, at most `SNAPSHOT_LIST_PAGE_ROWS`
/// rows, an empty page past the last tag. A live snapshot and a deleting
/// one with the same tag, placed where a page boundary would split them,
/// come in one page.
#[test]
fn the_snapshot_list_comes_in_pages_of_whole_tags_in_tag_order() {
    let page = csnap_pools::SNAPSHOT_LIST_PAGE_ROWS;
    let mut s = fresh_store();
    let n = u32::try_from(page).unwrap() * 2 - 4;
    let tags: Vec<u32> = (0..n).map(|i| (i * 37 + 11) % 1000).collect();
    for &t in &tags {
        s.create_snapshot(t, 0).unwrap();
        s.commit().unwrap();
    }
    // The tag ranked last in a first page's worth: deleted while it holds a
    // chunk (so it stays, deleting), then created again.
    let mut sorted = tags.clone();
    sorted.sort_unstable();
    let dup = sorted[page - 1];
    s.prepare_origin_write(5).unwrap();
    s.commit().unwrap();
    s.delete_snapshot(dup).unwrap();
    s.create_snapshot(dup, 0).unwrap();
    s.commit().unwrap();
    let mut w = StoreWorker::new(s, MemDisk::new((ORIGIN_CHUNKS * CHUNK) as usize), 64);
    let (mut from, mut seen, mut pages) = (0u32, Vec::new(), Vec::new());
    loop {
        let out = run(&mut w, &[StoreOp::List { from }]);
        let StoreResult::List(rows) = &out[0].result else {
            panic!("{out:?}");
        };
        assert!(rows.len() <= page);
        if rows.is_empty() {
            break;
        }
        assert!(rows[0].tag >= from);
        assert!(rows.windows(2).all(|p| p[0].tag <= p[1].tag), "{rows:?}");
        pages.push(rows.iter().map(|r| r.tag).collect::<Vec<_>>());
        seen.extend(rows.iter().map(|r| (r.tag, r.deleting)));
        from = rows.last().unwrap().tag + 1;
    }
    let mut want: Vec<(u32, bool)> = sorted.iter().map(|&t| (t, false)).collect();
    want.push((dup, true));
    want.sort_unstable();
    seen.sort_unstable();
    assert_eq!(seen, want);
    assert!(pages.len() >= 2, "{pages:?}");
    let with_dup: Vec<usize> = (0..pages.len())
        .filter(|&i| pages[i].contains(&dup))
        .collect();
    assert_eq!(with_dup.len(), 1, "tag {dup} split across pages: {pages:?}");
    assert_eq!(pages[with_dup[0]].iter().filter(|&&t| t == dup).count(), 2);
}
