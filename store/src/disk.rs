//! The small disk trait every store access goes through, a file backend, and an
//! in-memory backend for tests. Tests wrap these to record, reorder, drop and
//! tear writes (see `tests/crash.rs`).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// A disk access failed. Carries no heap data so the error path never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskError {
    /// The operating system returned this errno.
    Os(i32),
    /// The access reaches past the end of the device.
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The device returned fewer bytes than asked for.
    Short { offset: u64 },
    /// The file or device cannot do direct I/O (`O_DIRECT`).
    DirectIoUnsupported,
    /// A shared device was handed over opened without `O_DIRECT`.
    NotDirect,
    /// The device needs a direct-I/O alignment larger than csnap supports.
    AlignmentUnsupported { bytes: u64 },
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskError::Os(errno) => {
                write!(f, "{}", std::io::Error::from_raw_os_error(*errno))
            }
            DiskError::OutOfRange { offset, len, size } => write!(
                f,
                "access of {len} bytes at offset {offset} is past the end of the device ({size} bytes)"
            ),
            DiskError::Short { offset } => write!(f, "short transfer at offset {offset}"),
            DiskError::DirectIoUnsupported => write!(
                f,
                "direct I/O (O_DIRECT) is not supported here; a shared device must be reachable without the page cache"
            ),
            DiskError::NotDirect => {
                write!(f, "the device was opened without O_DIRECT (no silent page-cache fallback)")
            }
            DiskError::AlignmentUnsupported { bytes } => write!(
                f,
                "the device needs direct I/O aligned to {bytes} bytes; csnap supports at most {}",
                csnap_pools::DIO_ALIGN_MAX_BYTES
            ),
        }
    }
}

fn os_error(e: &std::io::Error) -> DiskError {
    match e.raw_os_error() {
        Some(errno) => DiskError::Os(errno),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => DiskError::Short { offset: 0 },
        None => DiskError::Os(libc::EIO),
    }
}

/// Positional block I/O with an explicit durability barrier.
///
/// `flush` makes every completed write durable (fdatasync on a file or block
/// device). Writes between two flushes may reach the platter in any order, or
/// torn, which is exactly what the crash tests simulate.
pub trait Disk {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError>;
    /// Durability barrier.
    fn flush(&mut self) -> Result<(), DiskError>;
    /// Size of the device in bytes.
    fn size_bytes(&self) -> u64;
}

impl<D: Disk + ?Sized> Disk for &mut D {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        (**self).write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        (**self).flush()
    }
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
}

fn check_range(offset: u64, len: usize, size: u64) -> Result<(), DiskError> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

/// A regular file or a block device, read and written around the page cache.
///
/// Shared devices are seen by several hosts, each with its own page cache,
/// so a `FileDisk` opened by `open`/`open_read_only` uses `O_DIRECT`
/// (`csnap_sys::dio`): a device that cannot do direct I/O is an error, never
/// a silent fallback. Aligned accesses (buffer address, offset and length
/// multiples of the device's direct-I/O alignment) go straight to the
/// device; any other access goes through an aligned bounce buffer reserved
/// at open (`DISK_BOUNCE_BYTES`), a read-modify-write of the unaligned edge
/// blocks for a write. A buffered `FileDisk` exists only when asked for by
/// name (`open_buffered`, `new_buffered`: the development flag
/// `--buffered-io`, one node only).
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size_bytes: u64,
    /// Direct-I/O alignment in bytes (1 for a buffered file).
    align: usize,
    direct: bool,
    bounce: csnap_sys::dio::AlignedBuf,
    bounced: u64,
}

impl FileDisk {
    /// Wraps a file opened with `O_DIRECT`; a file opened without it is
    /// refused (`DiskError::NotDirect`). The size is read once: devices do
    /// not grow under a running store.
    pub fn new(file: File) -> Result<Self, DiskError> {
        if !csnap_sys::dio::is_direct(&file).map_err(|e| os_error(&e))? {
            return Err(DiskError::NotDirect);
        }
        Self::wrap(file, true)
    }

    /// Wraps a file opened without `O_DIRECT`: its accesses go through this
    /// host's page cache. Development and single-host use only.
    pub fn new_buffered(file: File) -> Result<Self, DiskError> {
        Self::wrap(file, false)
    }

    fn wrap(file: File, direct: bool) -> Result<Self, DiskError> {
        let size_bytes = device_size_bytes(&file)?;
        let align = if direct {
            let a = csnap_sys::dio::dio_align(&file).map_err(|e| open_error(&e))?;
            let align = a.mem_bytes.max(a.offset_bytes) as usize;
            if !align.is_power_of_two() || align > csnap_pools::DIO_ALIGN_MAX_BYTES {
                return Err(DiskError::AlignmentUnsupported {
                    bytes: align as u64,
                });
            }
            align
        } else {
            1
        };
        let bounce = if direct {
            csnap_sys::dio::AlignedBuf::zeroed(
                csnap_pools::DISK_BOUNCE_BYTES,
                csnap_pools::DIO_ALIGN_MAX_BYTES,
            )
        } else {
            csnap_sys::dio::AlignedBuf::zeroed(0, 1)
        };
        Ok(FileDisk {
            file,
            size_bytes,
            align,
            direct,
            bounce,
            bounced: 0,
        })
    }

    /// Opens `path` read-write with direct I/O.
    pub fn open(path: &std::path::Path) -> Result<Self, DiskError> {
        let (file, _) = csnap_sys::dio::open_direct(path, true).map_err(|e| open_error(&e))?;
        Self::wrap(file, true)
    }

    /// Opens `path` read-only with direct I/O; writes will fail with EBADF.
    pub fn open_read_only(path: &std::path::Path) -> Result<Self, DiskError> {
        let (file, _) = csnap_sys::dio::open_direct(path, false).map_err(|e| open_error(&e))?;
        Self::wrap(file, true)
    }

    /// Opens `path` through the page cache (`writable` or read-only): the
    /// development mode `--buffered-io`, which one node only may use.
    pub fn open_buffered(path: &std::path::Path, writable: bool) -> Result<Self, DiskError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| os_error(&e))?;
        Self::wrap(file, false)
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// True when accesses go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The direct-I/O alignment in bytes (1 when buffered).
    pub fn align_bytes(&self) -> usize {
        self.align
    }

    /// Accesses that went through the bounce buffer (unaligned), for tests
    /// and figures.
    pub fn bounced(&self) -> u64 {
        self.bounced
    }

    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        let a = self.align;
        (ptr as usize).is_multiple_of(a) && len.is_multiple_of(a) && offset.is_multiple_of(a as u64)
    }

    /// Reads `buf.len()` bytes at `offset` whatever their alignment, through
    /// the bounce buffer in aligned windows.
    fn read_bounced(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.bounced += 1;
        let a = self.align as u64;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let win_start = pos - pos % a;
            let win_end =
                (win_start + csnap_pools::DISK_BOUNCE_BYTES as u64).min(end.next_multiple_of(a));
            let win_len =
                usize::try_from(win_end - win_start).map_err(|_| DiskError::Short { offset })?;
            pread_full(
                &self.file,
                &mut self.bounce[..win_len],
                win_start,
                self.size_bytes,
            )?;
            let take_end = win_end.min(end);
            let from = usize::try_from(pos - win_start).map_err(|_| DiskError::Short { offset })?;
            let n = usize::try_from(take_end - pos).map_err(|_| DiskError::Short { offset })?;
            let at = usize::try_from(pos - offset).map_err(|_| DiskError::Short { offset })?;
            buf[at..at + n].copy_from_slice(&self.bounce[from..from + n]);
            pos = take_end;
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset` whatever its alignment: aligned
    /// windows through the bounce buffer, the partial edge blocks read first
    /// (read-modify-write). One writer per `FileDisk` (`&mut self`).
    fn write_bounced(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.bounced += 1;
        let a = self.align as u64;
        let end = offset + buf.len() as u64;
        if end.next_multiple_of(a) > self.size_bytes {
            // The tail block would reach past the end of the device.
            return Err(DiskError::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.size_bytes,
            });
        }
        let mut pos = offset;
        while pos < end {
            let win_start = pos - pos % a;
            let win_end =
                (win_start + csnap_pools::DISK_BOUNCE_BYTES as u64).min(end.next_multiple_of(a));
            let win_len =
                usize::try_from(win_end - win_start).map_err(|_| DiskError::Short { offset })?;
            let take_end = win_end.min(end);
            let head = usize::try_from(pos - win_start).map_err(|_| DiskError::Short { offset })?;
            let n = usize::try_from(take_end - pos).map_err(|_| DiskError::Short { offset })?;
            let au = self.align;
            if head != 0 {
                pread_full(
                    &self.file,
                    &mut self.bounce[..au],
                    win_start,
                    self.size_bytes,
                )?;
            }
            if take_end < win_end {
                let last = win_len - au;
                let last_off = win_end - a;
                if last_off != win_start || head == 0 {
                    pread_full(
                        &self.file,
                        &mut self.bounce[last..win_len],
                        last_off,
                        self.size_bytes,
                    )?;
                }
            }
            let at = usize::try_from(pos - offset).map_err(|_| DiskError::Short { offset })?;
            self.bounce[head..head + n].copy_from_slice(&buf[at..at + n]);
            self.file
                .write_all_at(&self.bounce[..win_len], win_start)
                .map_err(|e| os_error(&e))?;
            pos = take_end;
        }
        Ok(())
    }
}

/// `pread` until `buf` is full; bytes past the end of a regular file whose
/// size is not a multiple of the alignment read as zeroes.
fn pread_full(file: &File, buf: &mut [u8], offset: u64, size: u64) -> Result<(), DiskError> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) if offset + done as u64 >= size => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(0) => return Err(DiskError::Short { offset }),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(os_error(&e)),
        }
    }
    Ok(())
}

fn open_error(e: &std::io::Error) -> DiskError {
    if e.kind() == std::io::ErrorKind::Unsupported {
        DiskError::DirectIoUnsupported
    } else {
        os_error(e)
    }
}

/// Size of a regular file or block device in bytes.
pub fn device_size_bytes(file: &File) -> Result<u64, DiskError> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata().map_err(|e| os_error(&e))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // A block device reports its size through the end of the seekable range.
    let mut f = file;
    let end = f.seek(SeekFrom::End(0)).map_err(|e| os_error(&e))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| os_error(&e))?;
    Ok(end)
}

impl Disk for FileDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size_bytes)?;
        if self.direct && !self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.read_bounced(buf, offset);
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| match os_error(&e) {
                DiskError::Short { .. } => DiskError::Short { offset },
                other => other,
            })
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size_bytes)?;
        if self.direct && !self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.write_bounced(buf, offset);
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| os_error(&e))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        // O_DIRECT bypasses the page cache, not the device's volatile write
        // cache: the barrier is still fdatasync.
        self.file.sync_data().map_err(|e| os_error(&e))
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

/// A buffer for device transfers, aligned for direct I/O (reserved at init).
pub type IoBuf = csnap_sys::dio::AlignedBuf;

/// A zeroed `IoBuf` of `len` bytes, aligned to `DIO_ALIGN_MAX_BYTES`, so
/// whole-block transfers from and to it go straight to a direct device.
/// Allocates: init only.
pub fn io_buf(len: usize) -> IoBuf {
    csnap_sys::dio::AlignedBuf::zeroed(len, csnap_pools::DIO_ALIGN_MAX_BYTES)
}

/// A disk held in memory, for tests and the simulator.
#[derive(Debug, Clone)]
pub struct MemDisk {
    /// The device contents.
    pub bytes: Vec<u8>,
    /// Count of flushes, for tests.
    pub flushes: u64,
}

impl MemDisk {
    /// A zero-filled disk of `size_bytes`.
    pub fn new(size_bytes: usize) -> Self {
        MemDisk {
            bytes: vec![0; size_bytes],
            flushes: 0,
        }
    }
}

impl Disk for MemDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.bytes.len() as u64)?;
        let start = usize::try_from(offset).map_err(|_| DiskError::Short { offset })?;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.bytes.len() as u64)?;
        let start = usize::try_from(offset).map_err(|_| DiskError::Short { offset })?;
        self.bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.flushes += 1;
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }
}
