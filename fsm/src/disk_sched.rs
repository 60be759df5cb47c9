//! The NBD server's disk-operation policy as a sans-IO state machine: the
//! engines' disk operations go in (`take`), device requests and memory
//! copies come out (`poll_action`), request results come back (`complete`),
//! and finished operations go out for their engines (`Action::Finished`).
//! The driver (`io/src/nbd_disk.rs`) puts requests on an io_uring and does
//! the copies in its arena; a simulation can put them on a simulated disk
//! in any completion order (`fsm/tests/disk_sched.rs`).
//!
//! # Operations
//!
//! An operation aligned for direct I/O (offset, length and memory offset
//! multiples of the alignment `A`) is one request on its own memory. One
//! that is not goes through a bounce buffer of whole aligned blocks:
//!
//! | operation | stages |
//! |---|---|
//! | aligned read, write, sync | running → finished |
//! | unaligned read | the enclosing blocks read into a bounce buffer → its part copied out → finished |
//! | unaligned write (read-modify-write) | the partial first and last blocks read (zeroed first: past the end of a regular file a read is short) → the data copied in → the whole span written → finished |
//!
//! # Ordering
//!
//! A read-modify-write rewrites the bytes around its data, so no other
//! write may land in its blocks between its reads and its write. A write
//! starts only when no write whose block-rounded range overlaps its own (on
//! the same device, from any connection) is running or waiting ahead of it,
//! if either of the two is a read-modify-write. Conflicting writes start in
//! arrival order (no starvation). Reads never wait: the bytes a
//! read-modify-write rewrites around its data keep the values they had.
//!
//! # Syncs
//!
//! A sync of a device no write of this scheduler completed on since the
//! last successful sync was issued finishes at once, without a request:
//! there is nothing of ours for it to make durable (an origin export's
//! flush then costs one `fdatasync`, not one of each device; the store's
//! own writes are the csnap server's, made durable by its commits).
//!
//! A negative result or a short transfer finishes the operation with
//! `ok == false` (the engine makes it `EIO`).
//!
//! Nothing here allocates after `new`.

use crate::fixed::FixedRing;
use crate::volume::{Dev, DiskOp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not started (a conflict, or no bounce buffer).
    Waiting,
    /// One request on the operation's own memory.
    Running,
    /// The enclosing blocks being read into the bounce buffer.
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
    /// Memory offset of the operation's data (its buffer offset 0).
    data_at: usize,
    dev: Dev,
    write: bool,
    bounced: bool,
    /// Block-rounded device range.
    lo: u64,
    hi: u64,
    seq: u64,
    stage: Stage,
    bounce: u16,
    /// Requests out.
    pending: u8,
    /// The result a request must return to succeed.
    want: i32,
    /// The first failing result.
    failed: Option<i32>,
    /// A sync: the device's write count when it was issued.
    gen: u64,
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

/// A device request for the driver. `id` comes back with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `dev_offset` into memory at `mem_at`.
    Read {
        id: u64,
        dev: Dev,
        dev_offset: u64,
        mem_at: usize,
        len: u32,
    },
    /// Write `len` bytes of memory at `mem_at` to `dev_offset`.
    Write {
        id: u64,
        dev: Dev,
        dev_offset: u64,
        mem_at: usize,
        len: u32,
    },
    /// Make the device's completed writes durable (`fdatasync`).
    Sync { id: u64, dev: Dev },
}

/// A finished operation, for its connection's engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The connection (driver's numbering).
    pub conn: u16,
    /// The engine's operation.
    pub op: DiskOp,
    /// Done in full.
    pub ok: bool,
    /// It went through a bounce buffer.
    pub bounced: bool,
    /// The failing result (negative errno, or a short byte count), or the
    /// last result.
    pub result: i32,
}

/// What the driver does next, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Put this request on the device.
    Submit(Request),
    /// Zero `len` bytes of memory at `at`.
    Zero { at: usize, len: usize },
    /// Copy `len` bytes of memory from `from` to `to` (never overlapping).
    Copy { from: usize, to: usize, len: usize },
    /// Hand this to the operation's engine (`disk_done`).
    Finished(Finished),
}

/// How a scheduler is sized and where its bounce buffers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedConfig {
    /// Operations taken at once.
    pub ops_max: usize,
    /// Bounce buffers.
    pub bounces: usize,
    /// Memory offset of bounce buffer 0.
    pub bounce_at: usize,
    /// Bytes of each bounce buffer (at least the largest operation plus two
    /// aligned blocks).
    pub bounce_bytes: usize,
    /// Direct-I/O alignment (a power of two).
    pub align: usize,
}

/// The disk-operation scheduler.
#[derive(Debug)]
pub struct DiskSched {
    cfg: SchedConfig,
    entries: Vec<Option<Entry>>,
    count: usize,
    waiting: usize,
    seq: u64,
    free_bounces: Vec<u16>,
    actions: FixedRing<Action>,
    /// Requests submitted and not completed.
    requests: usize,
    /// Writes completed, per device (origin, store).
    written: [u64; 2],
    /// Of those, how many the last successful sync covered, per device.
    synced: [u64; 2],
    /// Syncs finished without a request (nothing to make durable).
    syncs_skipped: u64,
    /// Invariant checks made (`assert_invariants`).
    checks: core::cell::Cell<u32>,
}

/// `assert_invariants` walks the whole table every this many calls.
const FULL_CHECK_EVERY: u32 = 256;

fn dev_index(d: Dev) -> usize {
    match d {
        Dev::Origin => 0,
        Dev::Store => 1,
    }
}

impl DiskSched {
    /// Reserves everything.
    pub fn new(cfg: SchedConfig) -> DiskSched {
        assert!(cfg.align.is_power_of_two() && cfg.ops_max > 0 && cfg.bounces > 0);
        let mut free_bounces = Vec::with_capacity(cfg.bounces);
        for b in (0..cfg.bounces).rev() {
            free_bounces.push(u16::try_from(b).unwrap_or(u16::MAX));
        }
        DiskSched {
            cfg,
            entries: vec![None; cfg.ops_max],
            count: 0,
            waiting: 0,
            seq: 0,
            free_bounces,
            // Per entry at most: two zeroings and two reads, or a copy and a
            // write, or a copy and a finish, at once.
            actions: FixedRing::new(4 * cfg.ops_max),
            requests: 0,
            written: [0; 2],
            synced: [0; 2],
            syncs_skipped: 0,
            checks: core::cell::Cell::new(0),
        }
    }

    /// Bytes reserved in `new`.
    pub fn reserved_bytes(cfg: &SchedConfig) -> usize {
        cfg.ops_max
            * (core::mem::size_of::<Option<Entry>>() + 4 * core::mem::size_of::<Option<Action>>())
            + cfg.bounces * 2
    }

    /// Operations taken and not finished.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing is taken.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Requests out (submitted, result not back).
    pub fn requests(&self) -> usize {
        self.requests
    }

    /// Syncs finished without a request (no write of ours to cover).
    pub fn syncs_skipped(&self) -> u64 {
        self.syncs_skipped
    }

    /// Takes operation `op` of connection `conn`, its data at memory offset
    /// `data_at`. `false`: the table is full; offer it again later.
    pub fn take(&mut self, conn: u16, op: DiskOp, data_at: usize) -> bool {
        if self.count >= self.cfg.ops_max {
            return false;
        }
        let Some(i) = self.entries.iter().position(Option::is_none) else {
            return false;
        };
        let a = self.cfg.align as u64;
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
            && data_at.is_multiple_of(self.cfg.align);
        self.seq += 1;
        self.entries[i] = Some(Entry {
            conn,
            op,
            data_at,
            dev,
            write,
            bounced: !sync && !aligned,
            lo: off - off % a,
            hi: (off + u64::from(len)).div_ceil(a) * a,
            seq: self.seq,
            stage: Stage::Waiting,
            bounce: 0,
            pending: 0,
            want: 0,
            failed: None,
            gen: 0,
        });
        self.count += 1;
        self.waiting += 1;
        self.assert_invariants();
        true
    }

    /// Starts every waiting operation that may start now.
    pub fn pump(&mut self) {
        if self.waiting > 0 {
            for i in 0..self.entries.len() {
                if self.waiting == 0 {
                    break;
                }
                if self.entries[i].is_some_and(|e| e.stage == Stage::Waiting) && !self.blocked(i) {
                    self.launch(i);
                }
            }
        }
        self.assert_invariants();
    }

    /// The next thing for the driver to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop()
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

    fn act(&mut self, a: Action) {
        if let Action::Submit(_) = a {
            self.requests += 1;
        }
        let pushed = self.actions.push(a);
        assert!(pushed, "action queue sized for every operation");
    }

    /// Starts `e`'s single transfer `r` of `len` bytes in `stage`.
    fn submit_one(&mut self, e: &mut Entry, stage: Stage, r: Request, len: u32) {
        e.stage = stage;
        e.want = i32::try_from(len).unwrap_or(i32::MAX);
        e.pending = 1;
        self.act(Action::Submit(r));
    }

    fn bounce_off(&self, b: u16) -> usize {
        self.cfg.bounce_at + usize::from(b) * self.cfg.bounce_bytes
    }

    fn launch(&mut self, i: usize) {
        let Some(mut e) = self.entries[i] else {
            return;
        };
        if e.bounced {
            if e.span() > self.cfg.bounce_bytes {
                // Larger than a bounce buffer: refused (cannot happen with
                // the engine's I/O size; a clear failure if it did).
                self.waiting -= 1;
                self.entries[i] = Some(e);
                self.finish(i, false, -22);
                return;
            }
            let Some(b) = self.free_bounces.pop() else {
                return;
            };
            e.bounce = b;
        }
        self.waiting -= 1;
        let id = u64::try_from(i).unwrap_or(u64::MAX);
        let a = self.cfg.align;
        let len32 = u32::try_from(e.len()).unwrap_or(u32::MAX);
        let span32 = u32::try_from(e.span()).unwrap_or(u32::MAX);
        let bo = self.bounce_off(e.bounce);
        let (dev, off) = (e.dev, e.dev_offset());
        match (e.op, e.bounced) {
            (DiskOp::Sync { .. }, _) => {
                let d = dev_index(dev);
                e.stage = Stage::Running;
                if self.written[d] == self.synced[d] {
                    self.syncs_skipped += 1;
                    self.entries[i] = Some(e);
                    self.finish(i, true, 0);
                    return;
                }
                e.gen = self.written[d];
                e.pending = 1;
                self.act(Action::Submit(Request::Sync { id, dev }));
            }
            (DiskOp::Read { .. }, false) => {
                let r = Request::Read {
                    id,
                    dev,
                    dev_offset: off,
                    mem_at: e.data_at,
                    len: len32,
                };
                self.submit_one(&mut e, Stage::Running, r, len32);
            }
            (DiskOp::Write { .. }, false) => {
                let r = Request::Write {
                    id,
                    dev,
                    dev_offset: off,
                    mem_at: e.data_at,
                    len: len32,
                };
                self.submit_one(&mut e, Stage::Running, r, len32);
            }
            (DiskOp::Read { .. }, true) => {
                let r = Request::Read {
                    id,
                    dev,
                    dev_offset: e.lo,
                    mem_at: bo,
                    len: span32,
                };
                self.submit_one(&mut e, Stage::BounceRead, r, span32);
            }
            (DiskOp::Write { .. }, true) => {
                e.stage = Stage::EdgeReads;
                e.want = i32::try_from(a).unwrap_or(i32::MAX);
                let a32 = u32::try_from(a).unwrap_or(u32::MAX);
                let end = e.skip() + e.len();
                let last = e.span() - a;
                let mut edges = [None; 2];
                if e.skip() > 0 {
                    edges[0] = Some(0);
                }
                if !end.is_multiple_of(a) && (last > 0 || e.skip() == 0) {
                    edges[1] = Some(last);
                }
                for at in edges.into_iter().flatten() {
                    e.pending += 1;
                    self.act(Action::Zero {
                        at: bo + at,
                        len: a,
                    });
                    let r = Request::Read {
                        id,
                        dev,
                        dev_offset: e.lo + at as u64,
                        mem_at: bo + at,
                        len: a32,
                    };
                    self.act(Action::Submit(r));
                }
            }
        }
        self.entries[i] = Some(e);
        if e.pending == 0 && e.stage == Stage::EdgeReads {
            // Aligned on the device, not in memory: no edges to read.
            self.merge_and_write(i);
        }
    }

    fn merge_and_write(&mut self, i: usize) {
        let Some(mut e) = self.entries[i] else {
            return;
        };
        if let Some(r) = e.failed {
            self.finish(i, false, r);
            return;
        }
        let bo = self.bounce_off(e.bounce);
        self.act(Action::Copy {
            from: e.data_at,
            to: bo + e.skip(),
            len: e.len(),
        });
        let span32 = u32::try_from(e.span()).unwrap_or(u32::MAX);
        e.stage = Stage::RmwWrite;
        e.want = i32::try_from(span32).unwrap_or(i32::MAX);
        e.pending = 1;
        self.entries[i] = Some(e);
        let r = Request::Write {
            id: u64::try_from(i).unwrap_or(u64::MAX),
            dev: e.dev,
            dev_offset: e.lo,
            mem_at: bo,
            len: span32,
        };
        self.act(Action::Submit(r));
    }

    fn finish(&mut self, i: usize, ok: bool, result: i32) {
        let Some(e) = self.entries[i].take() else {
            return;
        };
        self.count -= 1;
        if e.bounced && e.stage != Stage::Waiting {
            // Within the capacity reserved in `new`: no allocation.
            self.free_bounces.push(e.bounce);
        }
        self.act(Action::Finished(Finished {
            conn: e.conn,
            op: e.op,
            ok,
            bounced: e.bounced,
            result,
        }));
    }

    /// The result of request `id`: a byte count, or a negative errno.
    pub fn complete(&mut self, id: u64, result: i32) {
        let i = usize::try_from(id).unwrap_or(usize::MAX);
        let Some(mut e) = self.entries.get(i).copied().flatten() else {
            return;
        };
        if e.pending == 0 {
            return;
        }
        self.requests -= 1;
        e.pending -= 1;
        match e.stage {
            Stage::Running | Stage::RmwWrite => {
                let ok = result == e.want;
                let d = dev_index(e.dev);
                if ok && e.write {
                    self.written[d] += 1;
                }
                if ok && matches!(e.op, DiskOp::Sync { .. }) {
                    self.synced[d] = self.synced[d].max(e.gen);
                }
                self.entries[i] = Some(e);
                self.finish(i, ok, result);
            }
            Stage::BounceRead => {
                // The end of a regular file reads short: what was asked for
                // may still be in.
                let got = u64::try_from(result).ok();
                let ok = result == e.want
                    || got.is_some_and(|n| e.dev_offset() + e.len() as u64 <= e.lo + n);
                if ok {
                    self.act(Action::Copy {
                        from: self.bounce_off(e.bounce) + e.skip(),
                        to: e.data_at,
                        len: e.len(),
                    });
                }
                self.entries[i] = Some(e);
                self.finish(i, ok, result);
            }
            Stage::EdgeReads => {
                if result < 0 {
                    e.failed.get_or_insert(result);
                }
                // A short edge (past the end of a regular file) keeps the
                // zeros it was cleared to.
                self.entries[i] = Some(e);
                if e.pending == 0 {
                    self.merge_and_write(i);
                }
            }
            Stage::Waiting => self.entries[i] = Some(e),
        }
        self.assert_invariants();
    }

    /// The invariants, after every change (release builds too): the counts'
    /// relations at once, and every 256th call (and always in
    /// `assert_invariants_full`) the counts against the table, in one pass.
    /// The table has a place for every operation of every connection
    /// (thousands); a full pass per operation was a fifth of the NBD
    /// process's time at QD16 snapshot reads.
    pub fn assert_invariants(&self) {
        assert!(
            self.count <= self.entries.len(),
            "more operations than places"
        );
        assert!(self.waiting <= self.count, "more waiting than operations");
        assert!(
            self.free_bounces.len() <= self.cfg.bounces,
            "more free bounce buffers than buffers"
        );
        assert!(
            self.synced[0] <= self.written[0] && self.synced[1] <= self.written[1],
            "a sync covered writes not done"
        );
        let n = self.checks.get().wrapping_add(1);
        self.checks.set(n);
        if n.is_multiple_of(FULL_CHECK_EVERY) {
            self.assert_invariants_full();
        }
    }

    /// Every invariant, the table walked once.
    pub fn assert_invariants_full(&self) {
        let (mut live, mut waiting, mut bounced, mut pending) = (0, 0, 0, 0);
        for e in self.entries.iter().flatten() {
            live += 1;
            if e.stage == Stage::Waiting {
                waiting += 1;
            } else if e.bounced {
                bounced += 1;
            }
            pending += usize::from(e.pending);
        }
        assert_eq!(live, self.count, "disk operations out of step");
        assert_eq!(waiting, self.waiting, "waiting operations out of step");
        assert_eq!(
            bounced + self.free_bounces.len(),
            self.cfg.bounces,
            "bounce buffers out of step"
        );
        assert_eq!(pending, self.requests, "requests out of step");
    }
}
