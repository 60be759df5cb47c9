//! The NBD server's disk operations, off the event loop: the driver of the
//! sans-IO scheduler `csnap_fsm::disk_sched` (stages, read-modify-write,
//! ordering; see there). Its requests go to one io_uring
//! (`csnap_sys::uring`), its copies and zeroings are done in the arena, and
//! its finished operations go back to the loop for their engines; the
//! ring's descriptor is in the loop's epoll set, so many direct I/Os are in
//! flight at once and the loop never waits for a device.
//!
//! Nothing here allocates after `new`.

use std::fs::File;
use std::io;

pub(crate) use csnap_fsm::disk_sched::Finished;
use csnap_fsm::disk_sched::{Action, DiskSched, Request, SchedConfig};
use csnap_fsm::volume::Dev;
#[cfg(test)]
use csnap_fsm::volume::DiskOp;
use csnap_sys::uring::{DiskRing, DmaArena};

/// Operations in flight or waiting, all connections.
pub(crate) const OPS: usize = csnap_pools::NBD_DISK_OPS_MAX;
/// Bounce buffers.
pub(crate) const BOUNCES: usize = csnap_pools::NBD_RMW_BUFFERS;

/// The scheduler and the ring.
pub(crate) struct DiskQueue {
    sched: DiskSched,
    ring: DiskRing,
}

impl std::fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskQueue")
            .field("ops", &self.sched.len())
            .field("ring", &self.ring)
            .finish()
    }
}

fn cfg(align: usize, bounce_at: usize, bounce_bytes: usize) -> SchedConfig {
    SchedConfig {
        ops_max: OPS,
        bounces: BOUNCES,
        bounce_at,
        bounce_bytes,
        align,
    }
}

impl DiskQueue {
    /// A queue whose bounce buffers are `BOUNCES` ranges of `bounce_bytes`
    /// from `bounce_at` in the arena; `align` is the devices' direct-I/O
    /// alignment. Init only (the ring is set up here).
    pub(crate) fn new(align: usize, bounce_at: usize, bounce_bytes: usize) -> io::Result<Self> {
        // Two requests of every operation at once (the edge reads).
        let ring = DiskRing::new(u32::try_from(2 * OPS).unwrap_or(u32::MAX))?;
        Ok(DiskQueue {
            sched: DiskSched::new(cfg(align, bounce_at, bounce_bytes)),
            ring,
        })
    }

    /// The ring's descriptor, for the loop's epoll set.
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.ring.fd()
    }

    /// Operations taken and not finished.
    pub(crate) fn len(&self) -> usize {
        self.sched.len()
    }

    /// Memory beyond the arena, for the budget: the scheduler's tables and
    /// the ring's queues (64-byte submission and 16-byte completion
    /// entries).
    pub(crate) fn reserved_bytes() -> usize {
        DiskSched::reserved_bytes(&cfg(1, 0, 0)) + 2 * OPS * 64 + 4 * OPS * 16
    }

    /// Takes an engine's operation (see `DiskSched::take`).
    pub(crate) fn take(
        &mut self,
        conn: u16,
        op: csnap_fsm::volume::DiskOp,
        data_at: usize,
    ) -> bool {
        self.sched.take(conn, op, data_at)
    }

    /// Does what the scheduler asks, in order.
    fn run_actions(
        &mut self,
        arena: &mut DmaArena,
        origin: &File,
        store: &File,
        done: &mut impl FnMut(Finished),
    ) {
        let file = |dev| match dev {
            Dev::Origin => origin,
            Dev::Store => store,
        };
        while let Some(a) = self.sched.poll_action() {
            let queued = match a {
                Action::Submit(Request::Read {
                    id,
                    dev,
                    dev_offset,
                    mem_at,
                    len,
                }) => self
                    .ring
                    .read(arena, mem_at, len, file(dev), dev_offset, id),
                Action::Submit(Request::Write {
                    id,
                    dev,
                    dev_offset,
                    mem_at,
                    len,
                }) => self
                    .ring
                    .write(arena, mem_at, len, file(dev), dev_offset, id),
                Action::Submit(Request::Sync { id, dev }) => self.ring.fdatasync(file(dev), id),
                Action::Zero { at, len } => {
                    if let Some(m) = arena.bytes_mut().get_mut(at..at + len) {
                        m.fill(0);
                    }
                    true
                }
                Action::Copy { from, to, len } => {
                    arena.bytes_mut().copy_within(from..from + len, to);
                    true
                }
                Action::Finished(f) => {
                    done(f);
                    true
                }
            };
            // The ring has room for two requests of every operation, and
            // every request names arena memory.
            assert!(queued, "disk ring sized for every operation");
        }
    }

    /// Starts what can start and hands the ring's queue to the kernel.
    pub(crate) fn pump(
        &mut self,
        arena: &mut DmaArena,
        origin: &File,
        store: &File,
        done: &mut impl FnMut(Finished),
    ) -> io::Result<()> {
        self.sched.pump();
        self.run_actions(arena, origin, store, done);
        self.ring.submit()
    }

    /// Takes the ring's completions; what they lead to (a finished
    /// operation to `done`, a read-modify-write's write) happens now, and
    /// new requests are submitted. Returns how many completions were taken.
    pub(crate) fn reap(
        &mut self,
        arena: &mut DmaArena,
        origin: &File,
        store: &File,
        done: &mut impl FnMut(Finished),
    ) -> io::Result<usize> {
        let mut n = 0;
        while let Some((u, res)) = self.ring.complete() {
            n += 1;
            self.sched.complete(u, res);
            self.run_actions(arena, origin, store, done);
        }
        if n > 0 {
            self.ring.submit()?;
        }
        Ok(n)
    }

    /// Checks the invariants (cheap; release builds too).
    pub(crate) fn check(&self) {
        self.sched.assert_invariants();
        assert_eq!(
            self.sched.requests(),
            self.ring.in_flight(),
            "ring requests out of step"
        );
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
            q.reap(arena, f, f, &mut done).unwrap();
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
        // The first RMW (one edge read) and block 1 start; the second RMW
        // and the aligned write of block 0 wait (in that order) behind it.
        assert_eq!(q.ring.in_flight(), 2);
        assert_eq!(q.len(), 4);
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
