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

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size_bytes: u64,
}

impl FileDisk {
    /// Wraps an open file. The size is read once: devices do not grow under a
    /// running store.
    pub fn new(file: File) -> Result<Self, DiskError> {
        let size_bytes = device_size_bytes(&file)?;
        Ok(FileDisk { file, size_bytes })
    }

    /// Opens `path` read-write.
    pub fn open(path: &std::path::Path) -> Result<Self, DiskError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| os_error(&e))?;
        Self::new(file)
    }

    /// Opens `path` read-only; writes will fail with EBADF.
    pub fn open_read_only(path: &std::path::Path) -> Result<Self, DiskError> {
        let file = File::open(path).map_err(|e| os_error(&e))?;
        Self::new(file)
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
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
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| match os_error(&e) {
                DiskError::Short { .. } => DiskError::Short { offset },
                other => other,
            })
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size_bytes)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| os_error(&e))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(|e| os_error(&e))
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
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
