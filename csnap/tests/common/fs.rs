//! File-system helpers of the interop tests: an `nbdfuse` mount of an NBD
//! export with a loop device on it, a mount undone on drop, and a
//! directory's files read back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An `nbdfuse` mount of an export and a loop device on it.
pub struct Attached {
    pub fuse_dir: PathBuf,
    pub loopdev: String,
    fuse: Option<Child>,
}

impl Attached {
    pub fn new(url: &str, fuse_dir: &Path) -> Attached {
        std::fs::create_dir_all(fuse_dir).unwrap();
        let fuse = Command::new("nbdfuse")
            .arg(fuse_dir.join("disk"))
            .arg(url)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !fuse_dir.join("disk").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nbdfuse did not mount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let loopdev = run(Command::new("losetup")
            .args(["-f", "--show"])
            .arg(fuse_dir.join("disk")))
        .trim()
        .to_string();
        Attached {
            fuse_dir: fuse_dir.to_path_buf(),
            loopdev,
            fuse: Some(fuse),
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        let unmounted = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status()
            .is_ok_and(|st| st.success());
        if !unmounted {
            // A failed test may leave it busy or its server gone: detach
            // it lazily rather than leave a mount behind.
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.fuse_dir)
                .status();
        }
        if let Some(mut f) = self.fuse.take() {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = f.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = f.kill();
            let _ = f.wait();
        }
    }
}

/// A mount point, unmounted on drop (lazily if busy).
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|st| st.success());
        if !unmounted {
            // Busy, or its device gone with a failed test: detach lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// The regular files of `dir` (not recursive), sorted by name.
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}
