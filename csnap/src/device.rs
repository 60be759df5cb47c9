//! Checks on the paths given for an origin or a store.

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The metadata of `path` (`what` is "origin" or "store" in messages), which
/// must be a regular file or a block device.
pub fn require_device(path: &Path, what: &str) -> Result<Metadata, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot open {what} {}: {e}", path.display()))?;
    let ft = meta.file_type();
    if ft.is_file() || ft.is_block_device() {
        return Ok(meta);
    }
    let kind = if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(format!(
        "{what} {} is {kind}; expected a regular file or a block device",
        path.display()
    ))
}

/// Whether two paths name the same file or the same block device.
pub fn same_device(a: &Metadata, b: &Metadata) -> bool {
    let both_block = a.file_type().is_block_device() && b.file_type().is_block_device();
    (a.dev() == b.dev() && a.ino() == b.ino()) || (both_block && a.rdev() == b.rdev())
}

/// 16 random bytes from the kernel.
pub fn random_uuid() -> Result<[u8; 16], String> {
    let mut b = [0u8; 16];
    csnap_sys::random_bytes(&mut b)
        .map_err(|e| format!("cannot get random bytes for a UUID: {e}"))?;
    Ok(b)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_differ() {
        let a = random_uuid().unwrap_or_default();
        let b = random_uuid().unwrap_or_default();
        assert_ne!(a, [0; 16]);
        assert_ne!(a, b);
    }

    #[test]
    fn hex_form() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
