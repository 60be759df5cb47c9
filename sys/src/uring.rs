//! Disk I/O through io_uring, for event loops that must keep many direct
//! I/Os in flight without waiting for the device (`io-uring` crate).
//!
//! A [`DmaArena`] is the memory every operation reads from or writes into:
//! one aligned allocation made at init and never freed (it lives as long as
//! the process, so an operation still in the kernel can never write freed
//! memory). A [`DiskRing`] is one ring set up at init with fixed queue
//! sizes; [`DiskRing::read`], [`DiskRing::write`] and
//! [`DiskRing::fdatasync`] queue operations on arena ranges (checked),
//! [`DiskRing::submit`] hands them to the kernel (`io_uring_enter`), and
//! [`DiskRing::complete`] takes finished ones from the completion queue
//! (shared memory, no syscall). The ring's descriptor becomes readable when
//! completions are waiting, so an epoll loop can sleep on it. Nothing here
//! allocates after `new`.
//!
//! The contract with the caller (not expressible in the types): a range of
//! the arena that an operation is in flight on is not read or written until
//! its completion has been taken, as with any DMA buffer. The bytes stay
//! valid `u8`s whatever happens, and the memory is never freed.

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};

use crate::dio::AlignedBuf;

/// Aligned memory for ring operations, reserved at init, never freed.
pub struct DmaArena {
    buf: ManuallyDrop<AlignedBuf>,
}

impl std::fmt::Debug for DmaArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaArena")
            .field("len", &self.buf.len())
            .finish()
    }
}

impl DmaArena {
    /// A zeroed arena of `len` bytes aligned to `align`. Allocates: init
    /// only. Never freed (an operation may still be in the kernel when the
    /// owner goes away).
    pub fn new(len: usize, align: usize) -> DmaArena {
        DmaArena {
            buf: ManuallyDrop::new(AlignedBuf::zeroed(len, align)),
        }
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The whole arena.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The whole arena, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    fn range(&self, at: usize, len: usize) -> Option<*const u8> {
        let end = at.checked_add(len)?;
        (end <= self.buf.len()).then(|| self.buf[at..].as_ptr())
    }
}

/// One io_uring for disk operations on arena memory.
pub struct DiskRing {
    ring: IoUring,
    /// Operations queued or in the kernel whose completion is not taken.
    in_flight: usize,
    /// Most operations at once (the completion queue never overflows).
    cap: usize,
    /// Queued since the last `submit`.
    queued: usize,
}

impl std::fmt::Debug for DiskRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskRing")
            .field("in_flight", &self.in_flight)
            .field("cap", &self.cap)
            .finish()
    }
}

impl DiskRing {
    /// A ring for at most `ops` operations at once (submission queue of
    /// `ops`, completion queue of twice that). Init only (`io_uring_setup`,
    /// mmap).
    pub fn new(ops: u32) -> io::Result<DiskRing> {
        let ring = IoUring::builder()
            .setup_cqsize(ops.saturating_mul(2))
            .build(ops)?;
        let cap = usize::try_from(ops).unwrap_or(usize::MAX);
        Ok(DiskRing {
            ring,
            in_flight: 0,
            cap,
            queued: 0,
        })
    }

    /// The ring's descriptor (readable when completions wait).
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Operations queued or in the kernel.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Room for `n` more operations.
    pub fn has_room(&self, n: usize) -> bool {
        self.in_flight + n <= self.cap
    }

    fn push(&mut self, e: &io_uring::squeue::Entry) -> bool {
        if self.in_flight >= self.cap {
            return false;
        }
        let mut sq = self.ring.submission();
        // SAFETY: every entry built here names arena memory, which is never
        // freed and whose range was checked against the arena (`range`),
        // or no memory (fsync); the descriptor is the caller's open file,
        // and the kernel holds its own reference to it once submitted.
        let ok = unsafe { sq.push(e) }.is_ok();
        drop(sq);
        if ok {
            self.in_flight += 1;
            self.queued += 1;
        }
        ok
    }

    /// Queues a read of `len` bytes at `dev_offset` of `file` into the
    /// arena at `at`. `false`: no room, or the range is outside the arena.
    pub fn read(
        &mut self,
        arena: &mut DmaArena,
        at: usize,
        len: u32,
        file: &File,
        dev_offset: u64,
        user_data: u64,
    ) -> bool {
        let Some(p) = arena.range(at, len as usize) else {
            return false;
        };
        let e = opcode::Read::new(types::Fd(file.as_raw_fd()), p.cast_mut(), len)
            .offset(dev_offset)
            .build()
            .user_data(user_data);
        self.push(&e)
    }

    /// Queues a write of `len` bytes of the arena at `at` to `dev_offset` of
    /// `file`.
    pub fn write(
        &mut self,
        arena: &DmaArena,
        at: usize,
        len: u32,
        file: &File,
        dev_offset: u64,
        user_data: u64,
    ) -> bool {
        let Some(p) = arena.range(at, len as usize) else {
            return false;
        };
        let e = opcode::Write::new(types::Fd(file.as_raw_fd()), p, len)
            .offset(dev_offset)
            .build()
            .user_data(user_data);
        self.push(&e)
    }

    /// Queues an `fdatasync` of `file`.
    pub fn fdatasync(&mut self, file: &File, user_data: u64) -> bool {
        let e = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data);
        self.push(&e)
    }

    /// Hands what was queued to the kernel (`io_uring_enter`; nothing when
    /// nothing is queued).
    pub fn submit(&mut self) -> io::Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.queued = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next finished operation: `(user_data, result)`, the result a
    /// byte count or a negative errno.
    pub fn complete(&mut self) -> Option<(u64, i32)> {
        let c = self.ring.completion().next()?;
        self.in_flight -= 1;
        Some((c.user_data(), c.result()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_reads_writes_and_syncs_complete_through_the_ring() {
        let dir = std::env::temp_dir().join(format!("csnap-uring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![3u8; 16384]).unwrap();
        let (f, _) = crate::dio::open_direct(&path, true).unwrap();
        let mut arena = DmaArena::new(16384, 4096);
        arena.bytes_mut()[..4096].fill(9);
        let mut ring = DiskRing::new(4).unwrap();
        assert!(ring.write(&arena, 0, 4096, &f, 8192, 1));
        assert!(ring.read(&mut arena, 4096, 4096, &f, 0, 2));
        assert!(ring.fdatasync(&f, 3));
        // Outside the arena: refused, nothing queued.
        assert!(!ring.read(&mut arena, 16000, 4096, &f, 0, 4));
        ring.submit().unwrap();
        let mut seen = [false; 4];
        while ring.in_flight() > 0 {
            match ring.complete() {
                Some((u, r)) => {
                    assert!(r >= 0, "op {u}: {r}");
                    seen[usize::try_from(u).unwrap()] = true;
                }
                None => std::thread::yield_now(),
            }
        }
        assert_eq!(seen, [false, true, true, true]);
        assert!(arena.bytes()[4096..8192].iter().all(|&b| b == 3));
        let back = std::fs::read(&path).unwrap();
        assert!(back[8192..12288].iter().all(|&b| b == 9));
        // An unaligned direct read fails with an error, not a panic.
        assert!(ring.read(&mut arena, 1, 4096, &f, 0, 0));
        ring.submit().unwrap();
        let r = loop {
            if let Some((_, r)) = ring.complete() {
                break r;
            }
            std::thread::yield_now();
        };
        assert_eq!(r, -libc::EINVAL);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
