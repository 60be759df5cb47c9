//! The shipped binaries on a disk that really fails (issue #15): `csnap up`
//! with its origin and store on loop devices over nbdfuse over nbdkit's
//! `error` filter (`common::faulty`), used by `qemu-io`.
//!
//! - A read that hits a failing origin gets `EIO` (right after a write of
//!   the same blocks: nothing is served from a cache), and reads go on once
//!   the disk is back.
//! - A write-back write that the disk then fails was acknowledged; the
//!   next `FLUSH` reports it with `EIO` (once), as fsync does.
//! - A write whose copy-out or commit hits a failing store gets `EIO`
//!   within seconds; the server stops with a clear message; standbys that
//!   meet the same failing store fail their start, the crash-loop breaker
//!   marks the store failed (`status` says so); once the disk is back and
//!   the mark cleared, a standby takes over and serves. A snapshot create
//!   whose commit fails is refused (never acknowledged) and succeeds when
//!   retried after recovery.
//! - Nothing acknowledged is lost: the origin and the snapshot read back
//!   equal to shadow copies (a failed write's blocks hold the old or the
//!   new data, never anything else; the snapshot never sees a failed
//!   origin write), and `csnap check` of the store is clean after a stop.

// Test code: offsets and sizes are a few MiB.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{kill, parse_status, s, Status, BIN, TIMEOUT};
use common::faulty::{self, FaultyDisk};

const MIB: u64 = 1 << 20;
const ORIGIN_BYTES: u64 = 16 * MIB;
const STORE_BYTES: u64 = 64 * MIB;

/// Runs `cmd` within `TIMEOUT` (a client must never hang on a failing
/// disk); its status, stdout and stderr, and how long it took.
fn bounded(cmd: &mut Command) -> (bool, String, Duration) {
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let st = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} hung (more than {TIMEOUT:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let _ = child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out);
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut out);
    (st.success(), out, t.elapsed())
}

fn csnap(args: &[&str]) -> (bool, String) {
    let (ok, out, _) = bounded(Command::new(BIN).args(args));
    (ok, out)
}

struct Up {
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Up {
    fn url(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            s(&self.dir.join("nbd.sock"))
        )
    }

    /// `qemu-io` running `cmds` (each a `-c`) on `export`, with qemu-io's
    /// default cache mode (writethrough: every write is FUA).
    fn qemu_io(&self, export: &str, cmds: &[&str]) -> (bool, String, Duration) {
        self.qemu_io_cache("writethrough", export, cmds)
    }

    /// `qemu-io -t CACHE`: `writeback` sends plain writes and explicit
    /// flushes, as a file system does.
    fn qemu_io_cache(&self, cache: &str, export: &str, cmds: &[&str]) -> (bool, String, Duration) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw", "-t", cache, &self.url(export)]);
        for x in cmds {
            c.args(["-c", x]);
        }
        bounded(&mut c)
    }

    /// The whole export, read with nbdcopy into `to`.
    fn read_all(&self, export: &str, to: &Path) -> Vec<u8> {
        let (ok, out, _) = bounded(Command::new("nbdcopy").arg(self.url(export)).arg(to));
        assert!(ok, "nbdcopy of {export}: {out}");
        std::fs::read(to).expect("copy")
    }

    fn status(&self) -> Status {
        let (ok, out) = csnap(&["cluster", "status", "--dir", s(&self.dir.join("cluster"))]);
        assert!(ok, "cluster status: {out}");
        parse_status(&out)
    }

    fn logs(&self) -> String {
        let mut t = String::new();
        for f in ["agent", "controller", "nbd"] {
            let l = std::fs::read_to_string(self.dir.join("log").join(format!("{f}.log")))
                .unwrap_or_default();
            t.push_str(&format!("--- {f}.log\n{l}"));
        }
        t
    }

    fn wait_status(&self, what: &str, f: impl Fn(&Status) -> bool) -> Status {
        let t = Instant::now();
        loop {
            let st = self.status();
            if f(&st) {
                return st;
            }
            assert!(
                t.elapsed() < TIMEOUT,
                "timed out waiting until {what}: {st:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, a clean stop (exit 0).
    fn stop(mut self) {
        let mut c = self.child.take().expect("running");
        kill(c.id(), 15);
        let t = Instant::now();
        let st = loop {
            if let Some(st) = c.try_wait().expect("wait") {
                break st;
            }
            assert!(t.elapsed() < TIMEOUT, "csnap up did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "csnap up stop: {st}\n{}", self.logs());
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `csnap up` on the two failing disks (its `origin.img` and `store.img`
/// are links to their loop devices).
fn up(dir: &Path, origin: &FaultyDisk, store: &FaultyDisk) -> Up {
    let up_dir = dir.join("up");
    std::fs::create_dir_all(&up_dir).expect("up dir");
    std::os::unix::fs::symlink(&origin.dev, up_dir.join("origin.img")).expect("link");
    std::os::unix::fs::symlink(&store.dev, up_dir.join("store.img")).expect("link");
    let out = std::fs::File::create(dir.join("up.out")).expect("up.out");
    let child = Command::new(BIN)
        .args(["up", "--dir", s(&up_dir)])
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("up.out"))
        .stderr(out)
        .spawn()
        .expect("spawn csnap up");
    let u = Up {
        dir: up_dir,
        child: Some(child),
    };
    let t = Instant::now();
    loop {
        let o = std::fs::read_to_string(dir.join("up.out")).unwrap_or_default();
        if o.contains("csnap up: serving") {
            break;
        }
        assert!(t.elapsed() < TIMEOUT, "csnap up did not come up:\n{o}");
        std::thread::sleep(Duration::from_millis(50));
    }
    u
}

fn fill(shadow: &mut [u8], off: u64, len: u64, byte: u8) {
    shadow[off as usize..(off + len) as usize].fill(byte);
}

/// `got` equals `want`, except that in `[off, off + len)` each 512-byte
/// sector may hold either `want` (the old data) or `new` everywhere.
fn assert_same_but(what: &str, got: &[u8], want: &[u8], off: u64, len: u64, new: u8) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    for (i, (g, w)) in got.chunks(512).zip(want.chunks(512)).enumerate() {
        let at = i as u64 * 512;
        if g == w {
            continue;
        }
        let in_failed = at >= off && at < off + len;
        assert!(
            in_failed && g.iter().all(|&b| b == new),
            "{what}: sector at byte {at} is neither what was acknowledged nor the failed write's data"
        );
    }
}

#[test]
fn a_really_failing_disk_under_csnap_up_and_qemu_io() {
    if !faulty::available() {
        eprintln!("skipped: needs root, nbdkit (error filter), nbdfuse, losetup, fusermount3");
        return;
    }
    let _g = common::cluster::serial();
    let dir = common::fresh_dir("failing-disk", "up");
    let origin = FaultyDisk::new(&dir, "origin", ORIGIN_BYTES);
    let store = FaultyDisk::new(&dir, "store", STORE_BYTES);
    assert!(
        origin.loop_direct_io() && store.loop_direct_io(),
        "the loop devices must do direct I/O on the nbdfuse files"
    );
    let (ok, out) = csnap(&[
        "format",
        "--origin",
        &origin.dev,
        "--store",
        &store.dev,
        "--store-size",
        "64M",
    ]);
    assert!(ok, "format on the loop devices: {out}");
    let u = up(&dir, &origin, &store);
    let mut shadow = vec![0u8; ORIGIN_BYTES as usize];

    // The origin written, snapshot 1 taken.
    let (ok, out, _) = u.qemu_io("origin", &["write -P 0x11 0 4M"]);
    assert!(ok && !out.contains("failed"), "{out}");
    fill(&mut shadow, 0, 4 * MIB, 0x11);
    let (ok, out) = csnap(&["snapshot", "create", "--dir", s(&u.dir), "1"]);
    assert!(ok, "snapshot create: {out}");
    let snap1 = shadow.clone();

    // 1. A read that hits the failing origin gets EIO; the blocks were
    //    just written, so a page cache anywhere would have answered.
    origin.fail_reads(true);
    let (_, out, took) = u.qemu_io("origin", &["read -P 0x11 0 64k"]);
    origin.fail_reads(false);
    assert!(
        out.contains("read failed: Input/output error"),
        "the read on a failing disk: {out}"
    );
    eprintln!("read on a failing origin: EIO after {took:?}");
    let (ok, out, _) = u.qemu_io("origin", &["read -P 0x11 0 64k"]);
    assert!(ok && !out.contains("failed"), "the disk is back: {out}");
    let (reads_failed, _) = origin.injected();
    assert!(reads_failed >= 1, "nbdkit injected no read fault");

    // 2. A write-back write acknowledged, then failed by the disk: the
    //    next FLUSH reports it, once.
    //    The chunk is the origin's own first (its copy-out for snapshot 1
    //    done), so the write goes straight to the origin, acknowledged early.
    let (ok, out, _) = u.qemu_io("origin", &["write -P 0x21 8M 64k", "flush"]);
    assert!(ok && !out.contains("failed"), "{out}");
    //    A read first: the connection's engine is then connected to the
    //    server, and only a connected engine acknowledges a write early.
    origin.fail_writes(true);
    let (ok, out, _) = u.qemu_io_cache(
        "writeback",
        "origin",
        &["read -P 0x11 0 4k", "write -P 0x22 8M 64k", "flush"],
    );
    origin.fail_writes(false);
    // qemu-io prints nothing for a failed flush; its exit status says a
    // command failed, and the read and the write before it succeeded.
    assert!(
        !ok && out.contains("read 4096/4096")
            && out.contains("wrote 65536/65536")
            && !out.contains("failed"),
        "write-back write on a failing disk, then FLUSH: the write is acknowledged, the flush fails:\n{out}"
    );
    let (_, wb_writes_failed) = origin.injected();
    assert_eq!(wb_writes_failed, 1, "one write failed at the disk");
    let (ok, out, _) = u.qemu_io("origin", &["flush"]);
    assert!(ok && !out.contains("failed"), "a second flush: {out}");
    // The failed blocks are rewritten; acknowledged and durable now.
    let (ok, out, _) = u.qemu_io("origin", &["write -P 0x23 8M 64k", "flush"]);
    assert!(ok && !out.contains("failed"), "{out}");
    fill(&mut shadow, 8 * MIB, 64 << 10, 0x23);

    // 3. A store that fails while an origin write needs a copy-out and a
    //    commit: the write gets EIO within seconds, the server stops with
    //    a clear message, standbys on the same store fail their start
    //    until the crash-loop breaker marks the store failed.
    let before = u.status().incarnation;
    store.fail_writes(true);
    let (ok, out, took) = u.qemu_io("origin", &["write -P 0x33 1M 64k"]);
    assert!(
        !ok || out.contains("write failed: Input/output error"),
        "the write whose copy-out hits a failing store: {out}"
    );
    assert!(out.contains("Input/output error"), "{out}");
    eprintln!("origin write needing a copy-out to a failing store: EIO after {took:?}");
    let st = u.wait_status("the crash-loop breaker marks the store failed", |st| {
        st.failed > 0
    });
    let logs = u.logs();
    assert!(
        logs.contains("the snapshot store failed; stopping")
            && logs.contains("failed: Input/output error (os error 5)"),
        "the server says why it stops, naming the disk error:\n{logs}"
    );
    assert_eq!(
        st.incarnation, 0,
        "no server serves a failing store: {st:?}"
    );
    let (_, store_writes_failed) = store.injected();
    assert!(store_writes_failed >= 1, "nbdkit injected no write fault");

    // 4. The disk comes back; the mark is cleared; a standby takes over.
    store.fail_writes(false);
    let (ok, out) = csnap(&[
        "cluster",
        "clear-failed",
        "--dir",
        s(&u.dir.join("cluster")),
    ]);
    assert!(ok, "clear-failed: {out}");
    let st = u.wait_status("a standby takes over", |st| {
        st.incarnation > 0 && st.failed == 0
    });
    assert!(
        st.incarnation > before,
        "a new incarnation: {before} -> {st:?}"
    );

    // 5. Nothing acknowledged is lost; the failed write's blocks hold the
    //    old or the new data; the snapshot never saw the failed write.
    let got = u.read_all("origin", &dir.join("origin.copy"));
    assert_same_but("origin", &got, &shadow, MIB, 64 << 10, 0x33);
    let got = u.read_all("1", &dir.join("snap1.copy"));
    assert!(got == snap1, "snapshot 1 differs from its shadow");
    // And both are writable again.
    let (ok, out, _) = u.qemu_io("origin", &["write -P 0x44 1M 64k", "flush"]);
    assert!(ok && !out.contains("failed"), "{out}");
    fill(&mut shadow, MIB, 64 << 10, 0x44);
    let got = u.read_all("origin", &dir.join("origin.copy"));
    assert!(got == shadow, "origin differs from its shadow");
    let got = u.read_all("1", &dir.join("snap1.copy"));
    assert!(
        got == snap1,
        "snapshot 1 differs from its shadow after the rewrite"
    );

    // 6. A commit of metadata only (a snapshot create) on a failing store:
    //    refused, never acknowledged; after recovery the store is
    //    consistent, and the create, retried, succeeds.
    store.fail_writes(true);
    let (ok, out) = csnap(&["snapshot", "create", "--dir", s(&u.dir), "2"]);
    assert!(
        !ok,
        "a snapshot create whose commit fails must not succeed: {out}"
    );
    eprintln!("snapshot create on a failing store: {}", out.trim());
    u.wait_status("the breaker marks the store failed again", |st| {
        st.failed > 0
    });
    assert!(
        u.logs()
            .contains("a commit failed (nothing of its batch is acknowledged): Input/output error"),
        "the server names the failed commit:\n{}",
        u.logs()
    );
    store.fail_writes(false);
    let (ok, out) = csnap(&[
        "cluster",
        "clear-failed",
        "--dir",
        s(&u.dir.join("cluster")),
    ]);
    assert!(ok, "clear-failed: {out}");
    u.wait_status("a standby takes over again", |st| {
        st.incarnation > 0 && st.failed == 0
    });
    let (ok, out) = csnap(&["snapshot", "create", "--dir", s(&u.dir), "2"]);
    assert!(ok, "the create, retried on the recovered store: {out}");
    let got = u.read_all("2", &dir.join("snap2.copy"));
    assert!(
        got == shadow,
        "snapshot 2 differs from the origin it was taken of"
    );
    let got = u.read_all("1", &dir.join("snap1.copy"));
    assert!(
        got == snap1,
        "snapshot 1 differs from its shadow after the second failure"
    );

    // 7. A clean stop, and the store checks clean.
    u.stop();
    let (ok, out) = csnap(&["check", "--store", &store.dev]);
    assert!(
        ok && out.contains("clean"),
        "csnap check after recovery: {out}"
    );
    let (or, ow) = origin.injected();
    let (sr, sw) = store.injected();
    eprintln!(
        "faults injected: origin {or} read(s), {ow} write(s); store {sr} read(s), {sw} write(s)"
    );
    // The mounts and loop devices go first, then their directory.
    drop(store);
    drop(origin);
    let _ = std::fs::remove_dir_all(&dir);
}
