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
    let mut v = vec![0u8; bytes];
    csnap_testkit::XorShift64::new(seed | 1).fill(&mut v);
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

// ---------------------------------------------------------------------------
// Block status: metadata contexts, snapshot deltas, incremental backup.
// ---------------------------------------------------------------------------

use std::collections::BTreeSet;

/// A deterministic generator (xorshift).
use csnap_testkit::XorShift64 as Rng;

impl Up {
    fn csnap(&self, args: &[&str]) -> String {
        run(Command::new(BIN).args(args).arg("--dir").arg(&self.dir))
    }

    fn chunk_bytes(&self) -> u64 {
        let st = self.csnap(&["status"]);
        let line = st
            .lines()
            .find_map(|l| l.strip_prefix("chunk size: "))
            .unwrap_or_else(|| panic!("no chunk size in {st}"));
        line.trim_end_matches(" bytes").parse().unwrap()
    }
}

/// `nbdinfo --map=CONTEXT` of an export: (offset, length, flags,
/// description) rows, checked to tile the export exactly.
fn map(up: &Up, export: &str, context: &str, size: u64) -> Vec<(u64, u64, u32, String)> {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(up.url(export)));
    let mut rows = Vec::new();
    let mut at = 0;
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f.len() >= 3, "map row {l:?}");
        let (o, n, fl): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        assert_eq!(o, at, "map rows tile the export: {out}");
        assert!(n > 0);
        at = o + n;
        rows.push((o, n, fl, f.get(3).copied().unwrap_or("").to_string()));
    }
    assert_eq!(at, size, "the map covers the export: {out}");
    rows
}

/// The chunks a map marks with flag bit 0.
fn dirty_chunks(rows: &[(u64, u64, u32, String)], cs: u64) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for (o, n, fl, _) in rows {
        if fl & 1 != 0 {
            assert_eq!(o % cs, 0, "a changed range starts on a chunk");
            s.extend(o / cs..(o + n).div_ceil(cs));
        }
    }
    s
}

/// Random writes by one qemu-io run: returns the chunks they touched.
fn random_writes(
    up: &Up,
    export: &str,
    rng: &mut Rng,
    n: usize,
    size: u64,
    cs: u64,
) -> BTreeSet<u64> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &up.url(export)]);
    let mut chunks = BTreeSet::new();
    for i in 0..n {
        // Half of them near the 512 MiB mark, where a delta query ends.
        let off = if i % 2 == 0 {
            rng.next_u64() % (size - 300_000)
        } else {
            (512 << 20) - 150_000 + rng.next_u64() % 300_000
        };
        let len = 1 + rng.next_u64() % 100_000;
        cmd.arg("-c")
            .arg(format!("write -P {} {off} {len}", 1 + i % 250));
        chunks.extend(off / cs..(off + len).div_ceil(cs));
    }
    run(&mut cmd);
    chunks
}

/// nbdinfo lists every context of every export (`--list --content`, and
/// one export's details), and `--map` of each context matches the shadows
/// of random writes between snapshots (origin writes before and after each
/// snapshot, writes to a snapshot), over an export larger than one delta
/// query; `csnap snapshot diff` prints the same ranges.
#[test]
fn nbdinfo_lists_every_context_and_maps_match_the_writes() {
    let version = run(Command::new("nbdinfo").arg("--version"));
    assert!(version.starts_with("nbdinfo 1."), "{version}");
    let d = common::fresh_dir("nbd-interop", "map");
    let up = Up::start(&d, "1G", "256M");
    let size = 1u64 << 30;
    let cs = up.chunk_bytes();
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    random_writes(&up, "origin", &mut rng, 20, size, cs);
    up.snapshot(1);
    let w1 = random_writes(&up, "origin", &mut rng, 20, size, cs);
    up.snapshot(2);
    let w2 = random_writes(&up, "origin", &mut rng, 20, size, cs);
    let s2 = random_writes(&up, "2", &mut rng, 10, size, cs);
    up.snapshot(3);

    // Every export lists every context.
    let list = run(Command::new("nbdinfo")
        .args(["--list", "--content"])
        .arg(up.url("")));
    let contexts = [
        "base:allocation",
        "x-csnap:changed-since:1",
        "qemu:dirty-bitmap:since-1",
        "x-csnap:changed-since:2",
        "qemu:dirty-bitmap:since-2",
        "x-csnap:changed-since:3",
        "qemu:dirty-bitmap:since-3",
    ];
    for e in ["origin", "1", "2", "3"] {
        let block = list
            .split("export=")
            .find(|b| b.starts_with(&format!("\"{e}\"")))
            .unwrap_or_else(|| panic!("export {e} not listed: {list}"));
        for c in contexts {
            assert!(
                block.contains(&format!("\t\t{c}\n")),
                "export {e} lacks {c}: {block}"
            );
        }
    }
    assert!(list.contains("using structured packets"), "{list}");

    let union =
        |a: &BTreeSet<u64>, b: &BTreeSet<u64>| a.union(b).copied().collect::<BTreeSet<u64>>();
    let none = BTreeSet::new();
    // (export, base, the chunks that differ)
    let cases = [
        ("origin", 1, union(&w1, &w2)),
        ("origin", 2, union(&w2, &s2)),
        ("origin", 3, none.clone()),
        ("2", 1, union(&w1, &s2)),
        ("1", 2, union(&w1, &s2)),
        ("1", 1, none.clone()),
        ("3", 2, union(&w2, &s2)),
    ];
    for (e, base, want) in &cases {
        let x = map(&up, e, &format!("x-csnap:changed-since:{base}"), size);
        let q = map(&up, e, &format!("qemu:dirty-bitmap:since-{base}"), size);
        assert_eq!(
            dirty_chunks(&x, cs),
            *want,
            "export {e} changed since {base}"
        );
        assert!(x.iter().all(|r| r.2 <= 1));
        // The same map under qemu's name, labelled by nbdinfo.
        assert_eq!(
            x.iter().map(|r| (r.0, r.1, r.2)).collect::<Vec<_>>(),
            q.iter().map(|r| (r.0, r.1, r.2)).collect::<Vec<_>>()
        );
        for r in &q {
            assert_eq!(r.3, if r.2 == 1 { "dirty" } else { "clean" });
        }
    }
    assert!(!cases[0].2.is_empty() && !cases[3].2.is_empty());
    // qemu reads the same map with REQ_ONE (its dirty-bitmap hook reports
    // dirty ranges as holes).
    let qmap = run(Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(format!(
            "driver=nbd,path={},export=2,x-dirty-bitmap=qemu:dirty-bitmap:since-1",
            up.sock().display()
        )));
    let mut from_qemu = BTreeSet::new();
    for l in qmap.lines().filter(|l| l.contains("\"start\"")) {
        let num = |k: &str| -> u64 {
            let at = l.find(&format!("\"{k}\": ")).unwrap() + k.len() + 4;
            l[at..]
                .split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        if l.contains("\"data\": false") {
            let (o, n) = (num("start"), num("length"));
            from_qemu.extend(o / cs..(o + n).div_ceil(cs));
        }
    }
    assert_eq!(from_qemu, cases[3].2, "qemu-img map: {qmap}");
    // base:allocation: all data, never a hole csnap cannot prove.
    for e in ["origin", "2"] {
        for r in map(&up, e, "base:allocation", size) {
            assert_eq!((r.2, r.3.as_str()), (0, "data"));
        }
    }
    // csnap snapshot diff: the same ranges, in bytes.
    let diff = up.csnap(&["snapshot", "diff", "1", "2"]);
    let mut rows = diff.lines();
    assert_eq!(rows.next(), Some("offset length type"));
    let mut from_diff = BTreeSet::new();
    for r in rows {
        let f: Vec<&str> = r.split(' ').collect();
        assert_eq!(f.len(), 3, "{r}");
        assert_eq!(f[2], "data");
        let (o, n): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        from_diff.extend(o / cs..(o + n) / cs);
    }
    assert_eq!(from_diff, cases[3].2);
    let json = up.csnap(&["snapshot", "diff", "--json", "1", "origin"]);
    let objects = json.matches("\"exists\":\"true\"").count();
    let extents = map(&up, "origin", "x-csnap:changed-since:1", size)
        .iter()
        .filter(|r| r.2 == 1)
        .count();
    assert!(
        json.trim_end().starts_with('[') && json.trim_end().ends_with(']'),
        "{json}"
    );
    assert_eq!(objects, extents, "{json}");
    // Bad input: an unknown snapshot is a clear error.
    let bad = Command::new(BIN)
        .args(["snapshot", "diff", "9", "origin", "--dir"])
        .arg(&up.dir)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .to_lowercase()
            .contains("snapshot"),
        "{bad:?}"
    );
    // A deleted snapshot's contexts are gone; the others still answer.
    up.csnap(&["snapshot", "delete", "3"]);
    let list = run(Command::new("nbdinfo").arg(up.url("origin")));
    assert!(
        !list.contains("since-3") && list.contains("since-2"),
        "{list}"
    );
    assert_eq!(
        dirty_chunks(&map(&up, "origin", "x-csnap:changed-since:1", size), cs),
        cases[0].2
    );
    up.stop();
    let _ = std::fs::remove_dir_all(&d);
}

/// The incremental backup of the README: snapshot 1 copied whole with
/// nbdcopy; writes; snapshot 2; only the ranges `changed-since:1` of
/// export 2 marks are copied (`nbdinfo --map`, then `qemu-img convert` of
/// each range); the file then equals snapshot 2, and the bytes copied are
/// within one chunk per written range of the bytes written.
#[test]
fn incremental_backup_copies_only_the_changed_ranges() {
    let d = common::fresh_dir("nbd-interop", "backup");
    let up = Up::start(&d, "32M", "128M");
    let size = 32u64 << 20;
    let cs = up.chunk_bytes();
    let a = d.join("a.img");
    random_file(&a, 32 << 20, 7);
    run(Command::new("nbdcopy").arg(&a).arg(up.url("origin")));
    up.snapshot(1);
    let backup = d.join("backup.img");
    run(Command::new("nbdcopy").arg(up.url("1")).arg(&backup));

    // Ranges that start on a chunk and end inside one, and one write inside
    // a chunk: each costs less than a chunk more than its bytes.
    let writes: [(u64, u64); 6] = [
        (3 * cs, 1000),
        (40 * cs, 5 * cs + 77),
        (41 * cs + 100, 10),
        (500 * cs, 3 * cs + cs / 2),
        (size - cs, cs),
        (1000 * cs + cs / 4, cs / 4),
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &up.url("origin")]);
    for (i, (o, n)) in writes.iter().enumerate() {
        cmd.arg("-c").arg(format!("write -P {} {o} {n}", 0x41 + i));
    }
    run(&mut cmd);
    up.snapshot(2);
    // Overlapping writes (the second and third) count once.
    let written: u64 = writes.iter().map(|w| w.1).sum::<u64>() - 10;
    let ranges = writes.len() as u64 - 1;

    // The backup is snapshot 1, not 2, until the changes are copied.
    let differ = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&backup)
        .arg(up.url("2"))
        .status()
        .unwrap();
    assert_eq!(differ.code(), Some(1));

    let mut copied = 0;
    let mut extents = 0;
    for (o, n, fl, desc) in map(&up, "2", "qemu:dirty-bitmap:since-1", size) {
        if fl & 1 == 0 {
            assert_eq!(desc, "clean");
            continue;
        }
        assert_eq!(desc, "dirty");
        run(Command::new("qemu-img")
            .args(["convert", "-n", "--image-opts"])
            .arg(format!(
                "driver=raw,offset={o},size={n},file.driver=nbd,file.path={},file.export=2",
                up.sock().display()
            ))
            .arg("--target-image-opts")
            .arg(format!(
                "driver=raw,offset={o},size={n},file.driver=file,file.filename={}",
                backup.display()
            )));
        copied += n;
        extents += 1;
    }
    assert_eq!(extents, ranges, "one changed range per written range");
    assert!(
        copied >= written && copied < written + ranges * cs,
        "copied {copied} bytes for {written} written in {ranges} ranges of chunks of {cs}"
    );
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&backup)
        .arg(up.url("2")));
    assert_eq!(std::fs::metadata(&backup).unwrap().len(), size);
    up.stop();
    let _ = std::fs::remove_dir_all(&d);
}

/// Pattern byte of step `t` (never 0, the origin's initial contents).
fn pat(t: u32) -> u32 {
    1 + t % 250
}

/// Runs qemu-io on `export` with `cmds`, asserting every command worked
/// (qemu-io exits 0 even when a `read -P` finds other bytes).
fn qemu_io(up: &Up, export: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &up.url(export)]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = run(&mut c);
    assert!(
        !out.contains("failed") && !out.contains("error") && !out.contains("Pattern verification"),
        "qemu-io {export} {cmds:?}:\n{out}"
    );
}

/// A full snapshot table (`SNAPSHOTS_MAX` snapshots, whatever the
/// constant is) through `csnap up` and `csnap snapshot create`: before
/// every create the origin writes one hot range (so one chunk carries an
/// exception per snapshot) and a range of its own, some snapshots are
/// written; every snapshot export then reads what it saw at its creation
/// plus its own writes; every snapshot is deleted (scrambled order, origin
/// writes between), the exports are gone, and `csnap check` is clean
/// after the stop.
#[test]
fn a_full_snapshot_table_through_csnap_up() {
    const KIB: u64 = 1024;
    let max = u32::try_from(csnap_pools::SNAPSHOTS_MAX).unwrap();
    let d = common::fresh_dir("nbd-interop", "full-table");
    let up = Up::start(&d, "64M", "256M");
    // Step t's own range and the range snapshot t writes.
    let own = |t: u32| (1 << 20) + u64::from(t) * 16 * KIB;
    let snap_own = |t: u32| (40 << 20) + u64::from(t) * 16 * KIB;
    for t in 1..=max {
        qemu_io(
            &up,
            "origin",
            &[
                format!("write -P {} 0 64k", pat(t)),
                format!("write -P {} {} 4k", pat(t), own(t)),
            ],
        );
        up.snapshot(t);
        if t % 5 == 0 {
            qemu_io(
                &up,
                &t.to_string(),
                &[format!("write -P {} {} 8k", pat(t + 7), snap_own(t))],
            );
        }
    }
    let exports = run(Command::new("nbdinfo").arg("--list").arg(up.url("")));
    assert_eq!(
        exports.matches("export=").count(),
        1 + max as usize,
        "{exports}"
    );
    for t in 1..=max {
        let mut cmds = vec![
            format!("read -P {} 0 64k", pat(t)),
            format!("read -P {} {} 4k", pat(t), own(t)),
            format!("read -P 0 {} 4k", own(t + 1)),
        ];
        if t > 1 {
            cmds.push(format!("read -P {} {} 4k", pat(t - 1), own(t - 1)));
        }
        if t % 5 == 0 {
            cmds.push(format!("read -P {} {} 8k", pat(t + 7), snap_own(t)));
        } else {
            cmds.push(format!("read -P 0 {} 8k", snap_own(t)));
        }
        qemu_io(&up, &t.to_string(), &cmds);
    }
    // Delete every snapshot, in a scrambled order (a stride coprime with
    // the count), writing the hot range between deletes.
    let stride = (1..max)
        .rev()
        .find(|s| (1..=*s).filter(|k| s % k == 0 && max % k == 0).count() == 1)
        .unwrap_or(1);
    for k in 0..max {
        let tag = 1 + (k * stride + 3) % max;
        let out = Command::new(BIN)
            .args(["snapshot", "delete", "--dir"])
            .arg(&up.dir)
            .arg(tag.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "snapshot delete {tag}: {out:?}");
        qemu_io(&up, "origin", &[format!("write -P {} 0 64k", pat(k))]);
    }
    let exports = run(Command::new("nbdinfo").arg("--list").arg(up.url("")));
    assert_eq!(exports.matches("export=").count(), 1, "{exports}");
    qemu_io(
        &up,
        "origin",
        &[
            format!("read -P {} 0 64k", pat(max - 1)),
            format!("read -P {} {} 4k", pat(max), own(max)),
        ],
    );
    up.stop();
    let _ = std::fs::remove_dir_all(&d);
}
