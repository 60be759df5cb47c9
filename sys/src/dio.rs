//! Direct I/O on the shared devices: `O_DIRECT` opens, the device's direct-I/O
//! alignment, and aligned buffers.
//!
//! Shared disks are seen by several hosts, each with its own page cache, so
//! every read and write of the origin and the store goes around the page
//! cache. `O_DIRECT` needs the buffer address, the offset and the length
//! aligned to the device's direct-I/O alignment (the logical block size of a
//! block device, `STATX_DIOALIGN` of a file). Buffers come from
//! [`AlignedBuf`], allocated at init like every other pool.

use std::alloc::Layout;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

/// A heap buffer whose address is aligned for direct I/O. Allocated once, at
/// init; never grows.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like a `Box<[u8]>`);
// moving it to another thread moves that ownership, and `&AlignedBuf` gives
// only shared reads of plain bytes.
unsafe impl Send for AlignedBuf {}
// SAFETY: see `Send`: shared references allow only reads of `u8`s.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes whose address is a multiple of `align`
    /// (a power of two). Allocates: call at init only. Aborts on allocation
    /// failure, as any init allocation does.
    pub fn zeroed(len: usize, align: usize) -> AlignedBuf {
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        if len == 0 {
            // A dangling, aligned, never-dereferenced pointer, like an empty Vec's.
            let ptr = NonNull::new(align as *mut u8).expect("align is non-zero");
            return AlignedBuf { ptr, len, align };
        }
        let layout = Layout::from_size_align(len, align).expect("aligned buffer layout");
        // SAFETY: `layout` has a non-zero size (len > 0 was checked above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, align }
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The alignment the buffer was allocated with.
    pub fn align(&self) -> usize {
        self.align
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation)
        // bytes owned by `self` (or is dangling with len 0), valid for the
        // lifetime of the borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let layout = Layout::from_size_align(self.len, self.align).expect("aligned buffer layout");
        // SAFETY: `ptr` was returned by `alloc_zeroed` with this same layout
        // and has not been freed (drop runs once).
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

/// The direct-I/O constraints of an open device or file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlign {
    /// Required alignment of the buffer address, in bytes.
    pub mem_bytes: u32,
    /// Required alignment of the offset and length, in bytes (the logical
    /// block size for a block device).
    pub offset_bytes: u32,
}

/// Opens `path` with `O_DIRECT` (read-write when `writable`), and checks that
/// direct I/O really works on it: a file system that refuses `O_DIRECT` is a
/// clear error naming the path, never a silent fallback to the page cache.
pub fn open_direct(path: &Path, writable: bool) -> io::Result<(File, DioAlign)> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(writable).custom_flags(libc::O_DIRECT);
    let file = o.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EINVAL) {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: direct I/O (O_DIRECT) is not supported here; a shared device must be \
                     reachable without the page cache",
                    path.display()
                ),
            )
        } else {
            io::Error::new(e.kind(), format!("{}: {e}", path.display()))
        }
    })?;
    let align = dio_align(&file)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok((file, align))
}

/// True when `file` was opened with `O_DIRECT`.
pub fn is_direct(file: &File) -> io::Result<bool> {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's
    // status flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::O_DIRECT != 0)
}

/// The direct-I/O alignment of an open file: `BLKSSZGET` for a block device,
/// `statx(STATX_DIOALIGN)` for a regular file. A file whose file system
/// reports no direct-I/O support is an error.
pub fn dio_align(file: &File) -> io::Result<DioAlign> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one c_int through the pointer, which
        // points to a live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let bytes = u32::try_from(size)
            .ok()
            .filter(|b| b.is_power_of_two())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("logical block size {size}"),
                )
            })?;
        return Ok(DioAlign {
            mem_bytes: bytes,
            offset_bytes: bytes,
        });
    }
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a NUL-terminated string, `st` a live, writable
    // statx; with AT_EMPTY_PATH the call describes the descriptor itself.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the file system does not support direct I/O (O_DIRECT) on this file",
        ));
    }
    Ok(DioAlign {
        mem_bytes: st.stx_dio_mem_align,
        offset_bytes: st.stx_dio_offset_align,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_zeroed_and_writable() {
        for (len, align) in [(4096, 4096), (1 << 20, 4096), (512, 512), (0, 4096)] {
            let mut b = AlignedBuf::zeroed(len, align);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.iter_mut().for_each(|x| *x = 0xa5);
            assert!(b.iter().all(|&x| x == 0xa5));
        }
    }

    #[test]
    fn a_file_opens_direct_and_reads_aligned() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir().join(format!("csnap-dio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let (f, align) = open_direct(&path, true).unwrap();
        assert!(align.offset_bytes.is_power_of_two() && align.offset_bytes <= 4096);
        let mut b = AlignedBuf::zeroed(4096, 4096);
        f.read_exact_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        // An unaligned buffer is refused by the kernel: direct I/O really is on.
        let mut big = AlignedBuf::zeroed(8192, 4096);
        let r = f.read_at(&mut big[1..4097], 0);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
