//! The NBD export with real clients, through `csnap up` (the embedded
//! default: a one-node cluster whose volumes are NBD exports):
//! `qemu-img convert` and `compare`, `nbdcopy` round trips, `nbdinfo
//! --list`, and a file system: `nbdfuse` plus a loop device, `mkfs.ext4`,
//! files written, a snapshot taken with the file system frozen, more files
//! changed, then the snapshot mounted read-only shows the old files byte for
//! byte, and `e2fsck` is clean on both.
//!
//! The clients are installed by the test command (`.ci/packages.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fs::{files, run, Attached, Mounted};
use common::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_csnap");

/// A running `csnap up`, stopped with SIGTERM on drop.
struct Up {
    proc: Option<Proc>,
    dir: PathBuf,
}

impl Up {
    fn start(dir: &Path, origin: &str, store: &str) -> Up {
        let out = std::fs::File::create(dir.join("up.out")).unwrap();
        let child = Command::new(BIN)
            .args(["up", "--dir"])
            .arg(dir.join("up"))
            .args(["--origin-size", origin, "--store-size", store])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let up = Up {
            proc: Some(Proc(child)),
            dir: dir.join("up"),
        };
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(dir.join("up.out")).unwrap_or_default();
            if text.contains("csnap up: serving") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "csnap up did not come up:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        up
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock().display())
    }

    fn snapshot(&self, tag: u32) {
        let out = Command::new(BIN)
            .args(["snapshot", "create", "--dir"])
            .arg(&self.dir)
            .arg(tag.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "snapshot create: {out:?}");
    }

    /// Stops it the way a user does, and checks it stopped cleanly.
    fn stop(self) {
        self.stop_with("-TERM");
    }

    /// Stops it with `signal` (a kill(1) option), and checks it stopped
    /// cleanly and left a clean store.
    fn stop_with(mut self, signal: &str) {
        if let Some(mut p) = self.proc.take() {
            let pid = i32::try_from(p.0.id()).unwrap();
            let st = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            let t = Instant::now();
            loop {
                if let Ok(Some(st)) = p.0.try_wait() {
                    assert!(st.success(), "csnap up exited {st}");
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "csnap up did not stop"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            std::mem::forget(p);
            let out = self.dir.parent().unwrap().join("up.out");
            let text = std::fs::read_to_string(out).unwrap_or_default();
            assert!(
                text.contains("csnap up: stopped; everything is on disk"),
                "no clean stop after {signal}:\n{text}"
            );
        }
        let out = Command::new(BIN)
            .args(["check", "--store"])
            .arg(self.dir.join("store.img"))
            .output()
            .unwrap();
        assert!(out.status.success(), "check after the stop: {out:?}");
    }
}

fn random_file(path: &Path, bytes: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = vec![0u8; bytes];
    for b in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    std::fs::write(path, v).unwrap();
}

#[test]
fn qemu_img_convert_compare_nbdcopy_and_nbdinfo() {
    let d = common::fresh_dir("nbd-interop", "qemu");
    let up = Up::start(&d, "64M", "256M");
    let a = d.join("a.img");
    let b = d.join("b.img");
    random_file(&a, 8 << 20, 1);
    random_file(&b, 8 << 20, 2);

    // qemu-img convert into the origin export, then compare.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&a)
        .arg(up.url("origin")));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&a)
        .arg(up.url("origin")));

    // A snapshot of it; then the origin gets b, by nbdcopy.
    up.snapshot(1);
    let list = run(Command::new("nbdinfo").arg("--list").arg(up.url("")));
    assert!(list.contains("export=\"origin\""), "{list}");
    assert!(
        list.contains("export=\"1\""),
        "the snapshot is listed at once: {list}"
    );
    run(Command::new("nbdcopy").arg(&b).arg(up.url("origin")));

    // Round trips: each export read back whole by nbdcopy.
    let o = d.join("origin.out");
    let s = d.join("snap.out");
    run(Command::new("nbdcopy").arg(up.url("origin")).arg(&o));
    run(Command::new("nbdcopy").arg(up.url("1")).arg(&s));
    let (o, s) = (std::fs::read(&o).unwrap(), std::fs::read(&s).unwrap());
    assert_eq!(o.len(), 64 << 20);
    assert_eq!(s.len(), 64 << 20);
    assert!(
        o[..8 << 20] == std::fs::read(&b).unwrap()[..],
        "origin holds b"
    );
    assert!(
        s[..8 << 20] == std::fs::read(&a).unwrap()[..],
        "snapshot 1 still holds a"
    );
    assert!(o[8 << 20..].iter().all(|&x| x == 0));
    assert!(s[8 << 20..].iter().all(|&x| x == 0));
    // qemu-img compare agrees, and tells them apart.
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&a)
        .arg(up.url("1")));
    let differ = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&a)
        .arg(up.url("origin"))
        .status()
        .unwrap();
    assert_eq!(differ.code(), Some(1), "compare must see the origin differ");
    // A second snapshot and a snapshot write: each volume keeps its own data.
    up.snapshot(2);
    run(Command::new("qemu-io").args(["-f", "raw", &up.url("2"), "-c", "write -P 0x5a 0 1M"]));
    run(Command::new("qemu-io").args(["-f", "raw", &up.url("2"), "-c", "read -P 0x5a 0 1M"]));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&b)
        .arg(up.url("origin")));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&a)
        .arg(up.url("1")));
    up.stop();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ext4_on_nbdfuse_and_a_loop_device_snapshot_shows_the_old_files() {
    let d = common::fresh_dir("nbd-interop", "ext4");
    let up = Up::start(&d, "128M", "512M");
    let origin = Attached::new(&up.url("origin"), &d.join("fuse-origin"));
    run(Command::new("mkfs.ext4").args(["-q", "-F", &origin.loopdev]));
    let mnt = d.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").arg(&origin.loopdev).arg(&mnt));
    let m = Mounted(mnt.clone());
    // Files of several sizes, some spanning many chunks.
    for (i, size) in [1usize, 4096, 70_000, 1 << 20, 3 << 20].iter().enumerate() {
        random_file(&mnt.join(format!("f{i}")), *size, 10 + i as u64);
    }
    std::fs::create_dir_all(mnt.join("sub")).unwrap();
    std::fs::write(mnt.join("sub/note.txt"), b"before the snapshot\n").unwrap();
    run(&mut Command::new("sync"));
    let before = files(&mnt);
    // The snapshot, with the file system frozen (no write in flight).
    run(Command::new("fsfreeze").arg("-f").arg(&mnt));
    up.snapshot(1);
    run(Command::new("fsfreeze").arg("-u").arg(&mnt));
    // More changes: overwrite, delete, add.
    random_file(&mnt.join("f1"), 4096, 99);
    random_file(&mnt.join("f3"), 2 << 20, 98);
    std::fs::remove_file(mnt.join("f4")).unwrap();
    random_file(&mnt.join("g0"), 500_000, 97);
    run(&mut Command::new("sync"));
    let after = files(&mnt);
    assert_ne!(before, after);

    // The snapshot, mounted read-only elsewhere, shows the old files.
    let snap = Attached::new(&up.url("1"), &d.join("fuse-snap"));
    let smnt = d.join("smnt");
    std::fs::create_dir_all(&smnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&snap.loopdev)
        .arg(&smnt));
    let sm = Mounted(smnt.clone());
    assert!(
        files(&smnt) == before,
        "the snapshot shows the files as they were"
    );
    assert_eq!(
        std::fs::read(smnt.join("sub/note.txt")).unwrap(),
        b"before the snapshot\n"
    );
    drop(sm);
    // The origin still shows the new ones.
    assert!(files(&mnt) == after);
    drop(m);
    // e2fsck is clean on both.
    run(Command::new("e2fsck").args(["-fn", &origin.loopdev]));
    run(Command::new("e2fsck").args(["-fn", &snap.loopdev]));
    drop(snap);
    drop(origin);
    up.stop();
    let _ = std::fs::remove_dir_all(&d);
}

/// The embedded default keeps its volumes: stopped with SIGINT (Ctrl-C),
/// started again on the same directory (sizes given again are ignored), the
/// origin and the snapshot hold what they held, and a SIGTERM stop is clean
/// too.
#[test]
fn csnap_up_reuses_its_files_across_a_restart_and_stops_cleanly_on_sigint_and_sigterm() {
    let d = common::fresh_dir("nbd-interop", "restart");
    let up = Up::start(&d, "32M", "128M");
    let first = std::fs::read_to_string(d.join("up.out")).unwrap();
    assert!(first.contains("csnap up: made "), "{first}");
    let a = d.join("a.img");
    let b = d.join("b.img");
    random_file(&a, 4 << 20, 11);
    random_file(&b, 4 << 20, 12);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&a)
        .arg(up.url("origin")));
    up.snapshot(1);
    run(Command::new("nbdcopy").arg(&b).arg(up.url("origin")));
    up.stop_with("-INT");

    let up = Up::start(&d, "64M", "256M");
    let again = std::fs::read_to_string(d.join("up.out")).unwrap();
    assert!(again.contains("csnap up: reusing "), "{again}");
    assert!(!again.contains("csnap up: made "), "{again}");
    let list = run(Command::new("nbdinfo").arg("--list").arg(up.url("")));
    assert!(
        list.contains("export=\"1\""),
        "the snapshot survived: {list}"
    );
    assert!(
        list.contains("export-size: 33554432"),
        "the origin kept its size: {list}"
    );
    let o = d.join("origin.out");
    let s = d.join("snap.out");
    run(Command::new("nbdcopy").arg(up.url("origin")).arg(&o));
    run(Command::new("nbdcopy").arg(up.url("1")).arg(&s));
    let (o, s) = (std::fs::read(&o).unwrap(), std::fs::read(&s).unwrap());
    assert!(
        o[..4 << 20] == std::fs::read(&b).unwrap()[..],
        "origin holds b"
    );
    assert!(
        s[..4 << 20] == std::fs::read(&a).unwrap()[..],
        "snapshot 1 holds a"
    );
    assert!(o[4 << 20..].iter().all(|&x| x == 0));
    up.stop();
    let _ = std::fs::remove_dir_all(&d);
}
