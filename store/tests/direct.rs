//! Direct I/O as separate hosts see a shared disk: two loop devices over one
//! backing file each have a page cache of their own, as two hosts on one SAN
//! do. Needs root (losetup); skipped with a message otherwise.

// The shared test support (tests/common) converts small test sizes with
// `as`, as every suite using it allows.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use csnap_store::disk::{Disk, DiskError, FileDisk};
use csnap_store::{OpenOptions, Store, StoreError};

/// A loop device over `file`, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!("skipped: losetup: {}", String::from_utf8_lossy(&o.stderr));
            return None;
        }
        Some(Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
    }
    fn path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The fence read sees another host's commit: a server on loop device A,
/// whose page cache holds the old superblock, is fenced by a newer
/// incarnation committed through loop device B. With buffered I/O the fence
/// read answers from A's cache and the stale server commits (checked: the
/// same test with `open_buffered` on both sides commits on A).
#[test]
fn a_fence_read_sees_a_newer_incarnation_committed_through_another_device() {
    let dir = common::scratch_dir("direct", "fence");
    let path = common::direct_store(&dir);
    let (Some(a), Some(b)) = (Loop::attach(&path), Loop::attach(&path)) else {
        return;
    };
    for direct in [true, false] {
        let open = |p: &Path| {
            if direct {
                FileDisk::open(p).unwrap()
            } else {
                FileDisk::open_buffered(p, true).unwrap()
            }
        };
        // Host A serves incarnation N and commits once (its cache now holds
        // the superblock).
        let mut sa = Store::open(open(a.path()), &OpenOptions::default()).unwrap();
        sa.bump_incarnation().unwrap();
        sa.commit().unwrap();
        sa.create_snapshot(1, 0).unwrap();
        sa.commit().unwrap();
        let ours = sa.incarnation();
        // Host B takes the store over: incarnation N + 1, durable.
        let mut sb = Store::open(open(b.path()), &OpenOptions::default()).unwrap();
        sb.bump_incarnation().unwrap();
        sb.commit().unwrap();
        assert_eq!(sb.incarnation(), ours + 1);
        drop(sb);
        // Host A's next commit must be refused before it writes anything.
        sa.create_snapshot(2, 0).unwrap();
        let r = sa.commit();
        if direct {
            match r {
                Err(StoreError::Fenced { ours: o, found }) => {
                    assert_eq!((o, found), (ours, ours + 1));
                }
                other => panic!("a stale server committed through direct I/O: {other:?}"),
            }
        } else {
            // The control: the page cache of device A hides B's commit.
            assert!(
                r.is_ok(),
                "buffered control expected to miss the fence: {r:?}"
            );
        }
        drop(sa);
        // Reset the store in place (the loop devices keep the same inode).
        common::direct_store(&dir);
        // Drop whatever the loop devices cached of the old contents.
        for l in [&a, &b] {
            let _ = Command::new("blockdev")
                .args(["--flushbufs", &l.0])
                .status();
        }
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unaligned accesses go through the bounce buffer: reads and writes of any
/// offset and length match a shadow, and aligned ones go straight through.
#[test]
fn unaligned_accesses_match_a_shadow() {
    let dir = common::scratch_dir("direct", "bounce");
    let path = dir.join("dev");
    let size = 4usize << 20;
    std::fs::write(&path, vec![0u8; size]).unwrap();
    let mut d = FileDisk::open(&path).unwrap();
    let mut shadow = vec![0u8; size];
    let mut x = csnap_testkit::XorShift64::new(csnap_testkit::GOLDEN_GAMMA);
    let mut next = move || x.next_u64();
    let max_len = csnap_pools::DISK_BOUNCE_BYTES * 2 + 1000;
    for i in 0..400u64 {
        let len = 1 + usize::try_from(next() % max_len as u64).unwrap();
        let off = usize::try_from(next() % (size - len) as u64).unwrap();
        if next() % 2 == 0 {
            let data: Vec<u8> = (0..len)
                .map(|k| (i.to_le_bytes()[0]) ^ (k.to_le_bytes()[0]))
                .collect();
            d.write_at(&data, off as u64).unwrap();
            shadow[off..off + len].copy_from_slice(&data);
        } else {
            let mut got = vec![0u8; len];
            d.read_at(&mut got, off as u64).unwrap();
            assert!(got == shadow[off..off + len], "read {len} at {off} differs");
        }
    }
    assert!(d.bounced() > 0);
    d.flush().unwrap();
    // The file (read through the page cache after the direct writes) holds
    // exactly the shadow.
    assert!(std::fs::read(&path).unwrap() == shadow);
    // Aligned transfers from an aligned buffer do not bounce.
    let before = d.bounced();
    let mut b = csnap_store::disk::io_buf(8192);
    d.read_at(&mut b, 4096).unwrap();
    d.write_at(&b, 8192).unwrap();
    assert_eq!(d.bounced(), before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file opened without O_DIRECT is refused as a shared device: no silent
/// page-cache fallback.
#[test]
fn a_buffered_file_is_refused_unless_asked_for() {
    let dir = common::scratch_dir("direct", "refuse");
    let path = dir.join("dev");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    assert_eq!(FileDisk::new(f).unwrap_err(), DiskError::NotDirect);
    assert!(!FileDisk::open_buffered(&path, true).unwrap().is_direct());
    assert!(FileDisk::open(&path).unwrap().is_direct());
    // tmpfs has no direct-I/O support: a clear error.
    let shm = PathBuf::from(format!("/dev/shm/csnap-direct-{}", std::process::id()));
    std::fs::write(&shm, vec![0u8; 1 << 20]).unwrap();
    let e = FileDisk::open(&shm).unwrap_err();
    let _ = std::fs::remove_file(&shm);
    assert!(e.to_string().contains("direct I/O"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
