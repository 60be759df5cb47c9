//! A block device that really fails (issue #15): a backing file served by
//! `nbdkit` through its `error` filter, mounted as a file by `nbdfuse`, with
//! a loop device on it in direct-I/O mode (`losetup --direct-io=on`), so
//! every read and write of the loop device reaches nbdkit: no page cache
//! between csnap and the failures (a buffered loop device would answer
//! reads of cached blocks and hide read errors). The csnap binaries open the
//! loop device with `O_DIRECT`, as every shared device.
//!
//! Faults are switched by files (`error-pwrite-file`, `error-pread-file`):
//! while one exists, every write (read) fails with `EIO`. nbdkit logs each
//! fault it injects, which [`FaultyDisk::injected`] counts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fs::run;

/// Whether this machine can build a failing disk (root, nbdkit with its
/// error filter, nbdfuse, losetup, fusermount3). Under CI (`CI` set) a
/// missing piece is a failure: `.ci/packages.sh` installs them.
pub fn available() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let ok = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let have = root
        && ok("nbdkit", &["--filter=error", "null", "--dump-plugin"])
        && ok("nbdfuse", &["--version"])
        && ok("losetup", &["--version"])
        && ok("fusermount3", &["--version"])
        && Path::new("/dev/fuse").exists();
    assert!(
        have || std::env::var_os("CI").is_none(),
        "CI must be able to build a failing disk: root, nbdkit (error filter), nbdfuse, losetup, fusermount3, /dev/fuse"
    );
    have
}

/// A failing disk: nbdkit (error filter) → nbdfuse → loop device.
pub struct FaultyDisk {
    /// The loop device (`/dev/loopN`).
    pub dev: String,
    fail_write: PathBuf,
    fail_read: PathBuf,
    log: PathBuf,
    fuse_dir: PathBuf,
    kit: Option<Child>,
    fuse: Option<Child>,
}

impl FaultyDisk {
    /// A failing disk named `name` in `dir` over a new zeroed backing file
    /// of `size_bytes`.
    pub fn new(dir: &Path, name: &str, size_bytes: u64) -> FaultyDisk {
        let backing = dir.join(format!("{name}.raw"));
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size_bytes))
            .expect("backing file");
        let sock = dir.join(format!("{name}.nbdkit.sock"));
        let log = dir.join(format!("{name}.nbdkit.log"));
        let fail_write = dir.join(format!("{name}.fail-write"));
        let fail_read = dir.join(format!("{name}.fail-read"));
        let kit = Command::new("nbdkit")
            .arg("-f")
            .arg("-U")
            .arg(&sock)
            .args(["--filter=error", "file"])
            .arg(&backing)
            // Per-operation rates and switches only: a global
            // `error-rate` would also fail every trim, zero and cache.
            .arg("error-pwrite-rate=100%")
            .arg(format!("error-pwrite-file={}", fail_write.display()))
            .arg("error-pread-rate=100%")
            .arg(format!("error-pread-file={}", fail_read.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("nbdkit log"))
            .spawn()
            .expect("spawn nbdkit");
        let mut d = FaultyDisk {
            dev: String::new(),
            fail_write,
            fail_read,
            log,
            fuse_dir: dir.join(format!("{name}.fuse")),
            kit: Some(kit),
            fuse: None,
        };
        wait("nbdkit's socket", || sock.exists());
        std::fs::create_dir_all(&d.fuse_dir).expect("fuse dir");
        let file = d.fuse_dir.join("disk");
        d.fuse = Some(
            Command::new("nbdfuse")
                .arg(&file)
                .arg(format!("nbd+unix:///?socket={}", sock.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nbdfuse"),
        );
        wait("nbdfuse's file", || file.exists());
        d.dev = run(Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(&file))
        .trim()
        .to_string();
        d
    }

    /// Whether the loop device does direct I/O on its backing file
    /// (`losetup`'s DIO column).
    pub fn loop_direct_io(&self) -> bool {
        run(Command::new("losetup").args(["-l", "-n", "-O", "DIO", &self.dev])).trim() == "1"
    }

    /// Every write fails with `EIO` while `on`.
    pub fn fail_writes(&self, on: bool) {
        switch(&self.fail_write, on);
    }

    /// Every read fails with `EIO` while `on`.
    pub fn fail_reads(&self, on: bool) {
        switch(&self.fail_read, on);
    }

    /// Faults injected so far: (reads, writes).
    pub fn injected(&self) -> (usize, usize) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        (
            log.matches("error into pread").count(),
            log.matches("error into pwrite").count(),
        )
    }
}

fn switch(file: &Path, on: bool) {
    if on {
        std::fs::write(file, b"").expect("fault switch");
    } else {
        let _ = std::fs::remove_file(file);
    }
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what} did not appear"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.fail_write);
        let _ = std::fs::remove_file(&self.fail_read);
        if !self.dev.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        }
        // Users of the loop device (a killed csnap's children) may take a
        // moment to go: the loop device lets go of the file only then.
        let t = Instant::now();
        let mut unmounted = false;
        while !unmounted && t.elapsed() < Duration::from_secs(10) {
            unmounted = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.fuse_dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|st| st.success());
            if !unmounted {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if !unmounted {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.fuse_dir)
                .status();
        }
        // nbdfuse ends with its mount; nbdkit serves until killed.
        if let Some(mut c) = self.fuse.take() {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut c) = self.kit.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
