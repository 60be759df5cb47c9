//! The NBD server's disk operations, off the event loop: every read, write
//! and sync an engine emits goes to one io_uring (`csnap_sys::uring`) and
//! its completion comes back to the loop (the ring's descriptor is in the
//! loop's epoll set), so many direct I/Os are in flight at once.
//!
//! # Operations
//!
//! An operation aligned for direct I/O (offset, length and memory multiples
//! of the devices' alignment `A`) is one ring request on its own memory in
//! the arena. One that is not goes through a bounce buffer of whole aligned
//! blocks:
//!
//! | operation | stages |
//! |---|---|
//! | aligned read, write, sync | running → done |
//! | unaligned read | read of the enclosing blocks into the bounce buffer → part copied out → done |
//! | unaligned write (read-modify-write) | reads of the partial first and last blocks → data merged → write of the whole span → done |
//!
//! # Ordering
//!
//! A read-modify-write rewrites bytes around its data, so no other write
//! may land in its blocks between its reads and its write. An operation
//! starts only when no write whose block-rounded range overlaps its own (on
//! the same device, from any connection of the process) is running or
//! waiting ahead of it, if either of the two is a read-modify-write. Waiting
//! operations start in arrival order among those that conflict (no
//! starvation). Reads never conflict: the bytes a read-modify-write
//! rewrites around its data are rewritten with the values they had.
//!
//! Failures (a negative result, or a short transfer) finish the operation
//! with `ok == false`; the engine turns that into `EIO` for its I/O.
//!
//! Nothing here allocates after `new`.

use std::fs::File;
use std::io;

use csnap_fsm::volume::{Dev, DiskOp};
use csnap_sys::uring::{DiskRing, DmaArena};

/// Operations in flight or waiting, all connections.
pub(crate) const OPS: usize = csnap_pools::NBD_DISK_OPS_MAX;
/// Bounce buffers.
pub(crate) const BOUNCES: usize = csnap_pools::NBD_RMW_BUFFERS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not started (a conflict, or no bounce buffer).
    Waiting,
    /// One request on the operation's own memory.
    Running,
    /// The enclosing blocks read into the bounce buffer (unaligned read).
    BounceRead,
    /// The partial end blocks being read (read-modify-write).
    EdgeReads,
    /// The merged span being written (read-modify-write).
    RmwWrite,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    conn: u16,
    op: DiskOp,
    /// Arena offset of the operation's data (buffer offset 0 of the op).
    data_at: usize,
    dev: Dev,
    write: bool,
    /// Needs a bounce buffer (not aligned for direct I/O).
    bounced: bool,
    /// Block-rounded device range.
    lo: u64,
    hi: u64,
    seq: u64,
    stage: Stage,
    bounce: u16,
    /// Requests of this entry in the ring.
    pending: u8,
    /// Result a request must return to succeed.
    want: i32,
    failed: bool,
}

impl Entry {
    fn len(&self) -> usize {
        match self.op {
            DiskOp::Read { len, .. } | DiskOp::Write { len, .. } => len as usize,
            DiskOp::Sync { .. } => 0,
        }
    }
    fn dev_offset(&self) -> u64 {
        match self.op {
            DiskOp::Read { dev_offset, .. } | DiskOp::Write { dev_offset, .. } => dev_offset,
            DiskOp::Sync { .. } => 0,
        }
    }
    fn span(&self) -> usize {
        usize::try_from(self.hi - self.lo).unwrap_or(usize::MAX)
    }
    fn skip(&self) -> usize {
        usize::try_from(self.dev_offset() - self.lo).unwrap_or(usize::MAX)
    }
}

/// A finished operation, for its connection's engine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finished {
    pub conn: u16,
    pub op: DiskOp,
    pub ok: bool,
    /// It went through a bounce buffer.
    pub bounced: bool,
    /// The failing result (negative errno, or a short byte count).
    pub result: i32,
}

/// The ring, the operations table and the bounce buffers.
pub(crate) struct DiskQueue {
    ring: DiskRing,
    entries: Box<[Option<Entry>]>,
    count: usize,
    waiting: usize,
    seq: u64,
    align: usize,
    /// Arena offset of bounce buffer 0; each is `bounce_bytes`.
    bounce_at: usize,
    bounce_bytes: usize,
    free_bounces: Vec<u16>,
}

impl std::fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskQueue")
            .field("count", &self.count)
            .field("waiting", &self.waiting)
            .field("ring", &self.ring)
            .finish()
    }
}

fn ud(index: usize) -> u64 {
    u64::try_from(index).unwrap_or(u64::MAX)
}

impl DiskQueue {
    /// A queue whose bounce buffers are `BOUNCES` ranges of `bounce_bytes`
    /// from `bounce_at` in the arena; `align` is the devices' direct-I/O
    /// alignment. Init only (the ring is set up here).
    pub(crate) fn new(align: usize, bounce_at: usize, bounce_bytes: usize) -> io::Result<Self> {
        let ring = DiskRing::new(u32::try_from(2 * OPS).unwrap_or(u32::MAX))?;
        let mut free_bounces = Vec::with_capacity(BOUNCES);
        for b in (0..BOUNCES).rev() {
            free_bounces.push(u16::try_from(b).unwrap_or(u16::MAX));
        }
        Ok(DiskQueue {
            ring,
            entries: vec![None; OPS].into_boxed_slice(),
            count: 0,
            waiting: 0,
            seq: 0,
            align,
            bounce_at,
            bounce_bytes,
            free_bounces,
        })
    }

    /// The ring's descriptor, for the loop's epoll set.
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.ring.fd()
    }

    /// Operations taken and not finished.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Memory of the queue beyond the arena, for the budget.
    pub(crate) const fn reserved_bytes() -> usize {
        OPS * core::mem::size_of::<Option<Entry>>() + BOUNCES * 2 + 2 * OPS * (64 + 2 * 16)
    }

    /// Takes operation `op` of connection `conn` whose data is at `data_at`
    /// in the arena. `false`: the table is full; offer it again later.
    pub(crate) fn take(&mut self, conn: u16, op: DiskOp, data_at: usize) -> bool {
        if self.count >= OPS {
            return false;
        }
        let Some(i) = self.entries.iter().position(Option::is_none) else {
            return false;
        };
        let a = self.align as u64;
        let (dev, write, off, len) = match op {
            DiskOp::Read {
                dev,
                dev_offset,
                len,
                ..
            } => (dev, false, dev_offset, len),
            DiskOp::Write {
                dev,
                dev_offset,
                len,
                ..
            } => (dev, true, dev_offset, len),
            DiskOp::Sync { dev, .. } => (dev, false, 0, 0),
        };
        let sync = matches!(op, DiskOp::Sync { .. });
        let aligned = off.is_multiple_of(a)
            && u64::from(len).is_multiple_of(a)
            && data_at.is_multiple_of(self.align);
        let bounced = !sync && !aligned;
        let lo = off - off % a;
        let hi = (off + u64::from(len)).div_ceil(a) * a;
        self.seq += 1;
        self.entries[i] = Some(Entry {
            conn,
            op,
            data_at,
            dev,
            write,
            bounced,
            lo,
            hi,
            seq: self.seq,
            stage: Stage::Waiting,
            bounce: 0,
            pending: 0,
            want: 0,
            failed: false,
        });
        self.count += 1;
        self.waiting += 1;
        true
    }

    /// Whether waiting entry `i` must wait for another.
    fn blocked(&self, i: usize) -> bool {
        let Some(x) = self.entries[i] else {
            return false;
        };
        if !x.write {
            return false;
        }
        self.entries.iter().enumerate().any(|(j, y)| {
            let Some(y) = y else { return false };
            j != i
                && y.write
                && y.dev == x.dev
                && (x.bounced || y.bounced)
                && y.lo < x.hi
                && x.lo < y.hi
                && (y.stage != Stage::Waiting || y.seq < x.seq)
        })
    }

    /// Starts what can start and hands the ring's queue to the kernel.
    pub(crate) fn pump(
        &mut self,
        arena: &mut DmaArena,
        origin: &File,
        store: &File,
        done: &mut impl FnMut(Finished),
    ) -> io::Result<()> {
        if self.waiting > 0 {
            for i in 0..self.entries.len() {
                if self.waiting == 0 {
                    break;
                }
                if self.entries[i].is_some_and(|e| e.stage == Stage::Waiting) && !self.blocked(i) {
                    self.launch(i, arena, origin, store, done);
                }
            }
        }
        self.ring.submit()
    }

    fn bounce_off(&self, b: u16) -> usize {
        self.bounce_at + usize::from(b) * self.bounce_bytes
    }

    /// Starts waiting entry `i` (a bounced one only with a bounce buffer).
    fn launch(
        &mut self,
        i: usize,
        arena: &mut DmaArena,
        origin: &File,
        store: &File,
        done: &mut impl FnMut(Finished),
    ) {
        let Some(mut e) = self.entries[i] else {
            return;
        };
        if e.bounced {
            let Some(b) = self.free_bounces.pop() else {
                return;
            };
            e.bounce = b;
        }
        self.waiting -= 1;
        let file = match e.dev {
            Dev::Origin => origin,
            Dev::Store => store,
        };
        let u = ud(i);
        let a = self.align;
        let len32 = u32::try_from(e.len()).unwrap_or(u32::MAX);
        let span32 = u32::try_from(e.span()).unwrap_or(u32::MAX);
        let bo = self.bounce_off(e.bounce);
        let queued = match (e.op, e.bounced) {
            (DiskOp::Sync { .. }, _) => {
                e.stage = Stage::Running;
                e.want = 0;
                e.pending = 1;
                self.ring.fdatasync(file, u)
            }
            (DiskOp::Read { .. }, false) => {
                e.stage = Stage::Running;
                e.want = i32::try_from(len32).unwrap_or(i32::MAX);
                e.pending = 1;
                self.ring
                    .read(arena, e.data_at, len32, file, e.dev_offset(), u)
            }
            (DiskOp::Write { .. }, false) => {
                e.stage = Stage::Running;
                e.want = i32::try_from(len32).unwrap_or(i32::MAX);
                e.pending = 1;
                self.ring
                    .write(arena, e.data_at, len32, file, e.dev_offset(), u)
            }
            (DiskOp::Read { .. }, true) => {
                e.stage = Stage::BounceRead;
                e.want = i32::try_from(span32).unwrap_or(i32::MAX);
                e.pending = 1;
                self.ring.read(arena, bo, span32, file, e.lo, u)
            }
            (DiskOp::Write { .. }, true) => {
                e.stage = Stage::EdgeReads;
                e.want = i32::try_from(a).unwrap_or(i32::MAX);
                let a32 = u32::try_from(a).unwrap_or(u32::MAX);
                let end = e.skip() + e.len();
                let last = e.span() - a;
                let mut ok = true;
                // Zeros first: an edge past the end of a regular file reads
                // short and keeps them.
                if e.skip() > 0 {
                    e.pending += 1;
                    arena.bytes_mut()[bo..bo + a].fill(0);
                    ok &= self.ring.read(arena, bo, a32, file, e.lo, u);
                }
                if !end.is_multiple_of(a) && (last > 0 || e.skip() == 0) {
                    e.pending += 1;
                    arena.bytes_mut()[bo + last..bo + last + a].fill(0);
                    ok &= self
                        .ring
                        .read(arena, bo + last, a32, file, e.lo + last as u64, u);
                }
                ok
            }
        };
        // The ring has room for two requests of every entry.
        assert!(queued, "disk ring sized for every operation");
        self.entries[i] = Some(e);
        if e.pending == 0 {
            // A write aligned on the device but not in memory: no edges to
            // read; merge and write at once.
            self.merge_and_write(i, arena, origin, store, done);
        }
    }

    /// Read-modify-write, after its edge reads: the data merged into the
    /// bounce buffer, the span written.
    fn merge_and_write(
        &mut self,
        i: usize,
        arena: &mut DmaArena,
        origin: &File,
        store: &File,
        done: &mut impl FnMut(Finished),
    ) {
        let Some(mut e) = self.entries[i] else {
            return;
        };
        if e.failed {
            self.finish(i, false, e.want, done);
            return;
        }
        let bo = self.bounce_off(e.bounce);
        let (src, dst, n) = (e.data_at, bo + e.skip(), e.len());
        arena.bytes_mut().copy_within(src..src + n, dst);
        let file = match e.dev {
            Dev::Origin => origin,
            Dev::Store => store,
        };
        let span32 = u32::try_from(e.span()).unwrap_or(u32::MAX);
        e.stage = Stage::RmwWrite;
        e.want = i32::try_from(span32).unwrap_or(i32::MAX);
        e.pending = 1;
        self.entries[i] = Some(e);
        let queued = self.ring.write(arena, bo, span32, file, e.lo, ud(i));
        assert!(queued, "disk ring sized for every operation");
    }

    fn finish(&mut self, i: usize, ok: bool, result: i32, done: &mut impl FnMut(Finished)) {
        let Some(e) = self.entries[i].take() else {
            return;
        };
        self.count -= 1;
        if e.bounced {
            // Within the capacity reserved at start: no allocation.
            self.free_bounces.push(e.bounce);
        }
        done(Finished {
            conn: e.conn,
            op: e.op,
            ok,
            bounced: e.bounced,
            result,
        });
    }

    /// Takes the ring's completions: each finished operation goes to
    /// `done`; a read-modify-write whose edges are in goes on to its write.
    /// Returns how many completions were taken.
    pub(crate) fn reap(
        &mut self,
        arena: &mut DmaArena,
        origin: &File,
        store: &File,
        done: &mut impl FnMut(Finished),
    ) -> usize {
        let mut n = 0;
        while let Some((u, res)) = self.ring.complete() {
            n += 1;
            let i = usize::try_from(u).unwrap_or(usize::MAX);
            let Some(mut e) = self.entries.get(i).copied().flatten() else {
                continue;
            };
            e.pending -= 1;
            match e.stage {
                Stage::Running | Stage::RmwWrite => {
                    self.entries[i] = Some(e);
                    self.finish(i, res == e.want, res, done);
                }
                Stage::BounceRead => {
                    // The end of a regular file reads short: zeros.
                    let got = u64::try_from(res).ok();
                    let ok = res == e.want
                        || got.is_some_and(|n| e.dev_offset() + e.len() as u64 <= e.lo + n);
                    if ok {
                        let bo = self.bounce_off(e.bounce) + e.skip();
                        arena.bytes_mut().copy_within(bo..bo + e.len(), e.data_at);
                    }
                    self.entries[i] = Some(e);
                    self.finish(i, ok, res, done);
                }
                Stage::EdgeReads => {
                    if res < 0 {
                        e.failed = true;
                        e.want = res;
                    }
                    // A short edge (past the end of a regular file) keeps
                    // the zeros it was cleared to.
                    self.entries[i] = Some(e);
                    if e.pending == 0 {
                        self.merge_and_write(i, arena, origin, store, done);
                    }
                }
                Stage::Waiting => {
                    // Unreachable: a waiting entry has nothing in the ring.
                    self.entries[i] = Some(e);
                }
            }
        }
        n
    }

    /// Checks the table's invariants (cheap; release builds too).
    pub(crate) fn check(&self) {
        let live = self.entries.iter().flatten().count();
        assert_eq!(live, self.count, "disk operations out of step");
        let waiting = self
            .entries
            .iter()
            .flatten()
            .filter(|e| e.stage == Stage::Waiting)
            .count();
        assert_eq!(waiting, self.waiting, "waiting disk operations out of step");
        let bounced = self
            .entries
            .iter()
            .flatten()
            .filter(|e| e.bounced && e.stage != Stage::Waiting)
            .count();
        assert_eq!(
            bounced + self.free_bounces.len(),
            BOUNCES,
            "bounce buffers out of step"
        );
        let pending: usize = self
            .entries
            .iter()
            .flatten()
            .map(|e| usize::from(e.pending))
            .sum();
        assert_eq!(pending, self.ring.in_flight(), "ring requests out of step");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arena: 64 KiB of data, then the bounce buffers.
    const DATA: usize = 64 << 10;
    const BOUNCE: usize = 64 << 10;

    fn setup(name: &str) -> (std::path::PathBuf, File, DmaArena, DiskQueue) {
        let dir =
            std::env::temp_dir().join(format!("csnap-nbd-disk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev");
        std::fs::write(&path, vec![0x5au8; 64 << 10]).unwrap();
        let (f, a) = csnap_sys::dio::open_direct(&path, true).unwrap();
        assert!(a.offset_bytes <= 4096 && a.mem_bytes <= 4096);
        let arena = DmaArena::new(DATA + BOUNCES * BOUNCE, 4096);
        // 4096: a multiple of the file's own alignment, so 512-byte writes
        // are read-modify-writes here whatever the file system says.
        let q = DiskQueue::new(4096, DATA, BOUNCE).unwrap();
        (dir, f, arena, q)
    }

    fn write(dev_offset: u64, buf_offset: u32, len: u32) -> DiskOp {
        DiskOp::Write {
            slot: 0,
            dev: Dev::Origin,
            dev_offset,
            buf_offset,
            len,
        }
    }

    fn run_all(q: &mut DiskQueue, arena: &mut DmaArena, f: &File) -> Vec<Finished> {
        let mut out = Vec::new();
        let mut done = |x: Finished| out.push(x);
        while q.len() > 0 {
            q.pump(arena, f, f, &mut done).unwrap();
            q.reap(arena, f, f, &mut done);
            q.check();
        }
        out
    }

    #[test]
    fn read_modify_writes_in_one_block_wait_for_each_other_and_lose_nothing() {
        let (dir, f, mut arena, mut q) = setup("rmw");
        arena.bytes_mut()[..512].fill(0xa1);
        arena.bytes_mut()[512..1024].fill(0xa2);
        arena.bytes_mut()[4096..8192].fill(0xb0);
        // Two 512-byte writes into block 0, an aligned write of block 1,
        // and an aligned write of block 0 behind them.
        assert!(q.take(0, write(0, 0, 512), 0));
        assert!(q.take(1, write(512, 0, 512), 512));
        assert!(q.take(0, write(4096, 0, 4096), 4096));
        assert!(q.take(1, write(0, 0, 4096), 4096));
        let mut out = Vec::new();
        q.pump(&mut arena, &f, &f, &mut |x| out.push(x)).unwrap();
        q.check();
        let stages: Vec<Stage> = q.entries.iter().flatten().map(|e| e.stage).collect();
        // The first RMW and block 1 start; the second RMW and the aligned
        // write of block 0 wait (in that order) behind the first.
        assert_eq!(
            stages,
            [
                Stage::EdgeReads,
                Stage::Waiting,
                Stage::Running,
                Stage::Waiting
            ]
        );
        out.extend(run_all(&mut q, &mut arena, &f));
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|x| x.ok), "{out:?}");
        assert_eq!(out.iter().filter(|x| x.bounced).count(), 2);
        let back = std::fs::read(dir.join("dev")).unwrap();
        // The aligned write of block 0 came last.
        assert!(back[..8192].iter().all(|&b| b == 0xb0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unaligned_reads_and_writes_keep_the_bytes_around_them() {
        let (dir, f, mut arena, mut q) = setup("edges");
        arena.bytes_mut()[1..4].fill(0xc1);
        // Three bytes across a block boundary, from an unaligned buffer.
        assert!(q.take(0, write(4095, 0, 3), 1));
        let out = run_all(&mut q, &mut arena, &f);
        assert!(out.len() == 1 && out[0].ok && out[0].bounced);
        // An unaligned read of it: reads never wait.
        assert!(q.take(
            0,
            DiskOp::Read {
                slot: 0,
                dev: Dev::Origin,
                dev_offset: 4094,
                buf_offset: 0,
                len: 5,
            },
            8192 + 3,
        ));
        let out = run_all(&mut q, &mut arena, &f);
        assert!(out.len() == 1 && out[0].ok);
        assert_eq!(&arena.bytes()[8195..8200], &[0x5a, 0xc1, 0xc1, 0xc1, 0x5a]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_transfer_finishes_not_ok() {
        let (dir, f, mut arena, mut q) = setup("fail");
        // Past the end of the file: a direct read returns 0 bytes.
        assert!(q.take(
            0,
            DiskOp::Read {
                slot: 0,
                dev: Dev::Origin,
                dev_offset: 1 << 20,
                buf_offset: 0,
                len: 4096,
            },
            0,
        ));
        let out = run_all(&mut q, &mut arena, &f);
        assert!(out.len() == 1 && !out[0].ok && out[0].result == 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
