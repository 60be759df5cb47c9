//! `csnap nbd` with real NBD clients (`nbdinfo` from libnbd, `qemu-io` and
//! `qemu-img` from qemu-utils) over a real local cluster: `csnap format`,
//! `csnap cluster run`, one agent per node, and the NBD server of node 1
//! listening on a unix socket and on TCP. Memory locked and the heap sealed
//! in abort mode throughout: an allocation on any path these tests take
//! kills the NBD server and fails the test.

// Test code: small test-sized numbers.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_csnap");
const ORIGIN_BYTES: u64 = 32 << 20;

use common::cluster::{csnap, s, text};

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child whose stderr is collected.
struct Logged {
    proc: Proc,
    log: Arc<Mutex<String>>,
}

impl Logged {
    fn spawn(cmd: &mut Command) -> Logged {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        Logged {
            proc: Proc(child),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }
}

/// A local cluster with the NBD server of node 1.
struct Env {
    dir: PathBuf,
    origin: PathBuf,
    nbd: Option<Logged>,
    agents: Vec<Logged>,
    controller: Option<Logged>,
    /// The NBD server's unix socket.
    sock: PathBuf,
    /// Its TCP address.
    tcp: String,
    /// Loop devices the cluster and the NBD server use instead of the
    /// files (detached at drop).
    loops: Vec<String>,
    /// A file system mounted for the origin (unmounted at drop).
    mount: Option<PathBuf>,
}

/// Where the origin and the store live.
#[derive(Clone, Copy)]
enum Disks {
    /// Files in the test's directory.
    Files,
    /// Loop devices of this sector size over those files.
    Loop(u32),
    /// The origin a sparse file (its first `FULL_FS_WRITTEN_BYTES` written)
    /// on a small ext4 that is then filled: writes to its holes fail
    /// (`ENOSPC`), everything else works.
    FullFs,
}

/// Bytes of the origin written before its file system is filled.
const FULL_FS_WRITTEN_BYTES: u64 = 8 << 20;

impl Env {
    fn new(name: &str, nodes: &[u32], nbd_args: &[&str]) -> Env {
        Env::build(name, nodes, nbd_args, &[], &[])
    }

    fn build(
        name: &str,
        nodes: &[u32],
        nbd_args: &[&str],
        ctl_args: &[&str],
        agent_args: &[&str],
    ) -> Env {
        Env::build_wrapped(
            name,
            nodes,
            nbd_args,
            ctl_args,
            agent_args,
            &[],
            Disks::Files,
        )
    }

    /// Like `new`, every process reaching the origin and the store through
    /// loop devices of `sector` bytes over the files (a device whose
    /// direct-I/O alignment is its sector).
    fn on_loop_devices(name: &str, nbd_args: &[&str], sector: u32) -> Env {
        Env::build_wrapped(name, &[1], nbd_args, &[], &[], &[], Disks::Loop(sector))
    }

    /// Like `new`, the origin on a full file system (`Disks::FullFs`).
    fn on_full_fs(name: &str, nbd_args: &[&str]) -> Env {
        Env::build_wrapped(name, &[1], nbd_args, &[], &[], &[], Disks::FullFs)
    }

    /// Like `build`, the NBD server started under `wrapper` (strace).
    fn build_wrapped(
        name: &str,
        nodes: &[u32],
        nbd_args: &[&str],
        ctl_args: &[&str],
        agent_args: &[&str],
        wrapper: &[String],
        disks: Disks,
    ) -> Env {
        let dir = common::fresh_dir("nbd", name);
        let mut origin = dir.join("origin");
        let store = dir.join("store");
        let mut mount = None;
        if let Disks::FullFs = disks {
            use std::os::unix::fs::FileExt;
            let img = dir.join("fs.img");
            let mnt = dir.join("mnt");
            std::fs::create_dir_all(&mnt).unwrap();
            let f = std::fs::File::create(&img).unwrap();
            f.set_len(64 << 20).unwrap();
            drop(f);
            let o = Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&img)
                .output()
                .unwrap();
            assert!(o.status.success(), "mkfs.ext4: {}", text(&o));
            let o = Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt)
                .output()
                .unwrap();
            assert!(o.status.success(), "mount: {}", text(&o));
            mount = Some(mnt.clone());
            origin = mnt.join("origin");
            let f = std::fs::File::create(&origin).unwrap();
            f.set_len(ORIGIN_BYTES).unwrap();
            f.write_all_at(&vec![0u8; FULL_FS_WRITTEN_BYTES as usize], 0)
                .unwrap();
            f.sync_all().unwrap();
            // Fill the rest (dd stops at ENOSPC): in MiB, then in blocks
            // (what the allocator kept aside is free again by then).
            for (bs, name) in [("bs=1M", "fill"), ("bs=4k", "fill2")] {
                let _ = Command::new("dd")
                    .args(["if=/dev/zero", bs, "status=none"])
                    .arg(format!("of={}", s(&mnt.join(name))))
                    .stderr(Stdio::null())
                    .status();
                let _ = Command::new("sync").status();
            }
        } else {
            std::fs::write(&origin, vec![0u8; ORIGIN_BYTES as usize]).unwrap();
        }
        let o = csnap(&[
            "format",
            "--origin",
            s(&origin),
            "--store",
            s(&store),
            "--store-size",
            "96M",
            "--journal-blocks",
            "256",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let mut loops = Vec::new();
        let (origin_dev, store_dev) = match disks {
            Disks::Files | Disks::FullFs => (origin.clone(), store.clone()),
            Disks::Loop(sector) => {
                for f in [&origin, &store] {
                    let o = Command::new("losetup")
                        .args(["-f", "--show", "--sector-size", &sector.to_string()])
                        .arg(f)
                        .output()
                        .unwrap();
                    assert!(o.status.success(), "losetup: {}", text(&o));
                    loops.push(String::from_utf8_lossy(&o.stdout).trim().to_string());
                }
                (PathBuf::from(&loops[0]), PathBuf::from(&loops[1]))
            }
        };
        let cdir = dir.join("c");
        let controller = Logged::spawn(
            Command::new(BIN)
                .args(["cluster", "run", "--dir", s(&cdir)])
                .args(ctl_args),
        );
        wait_until("the controller", Duration::from_secs(10), || {
            cdir.join("controller.sock").exists()
        });
        let mut agents = Vec::new();
        for &n in nodes {
            agents.push(Logged::spawn(
                Command::new(BIN)
                    .args([
                        "agent",
                        "--dir",
                        s(&cdir),
                        "--node",
                        &n.to_string(),
                        "--origin",
                        s(&origin_dev),
                        "--store",
                        s(&store_dev),
                    ])
                    .args(agent_args),
            ));
        }
        let mut env = Env {
            dir: dir.clone(),
            origin,
            nbd: None,
            agents,
            controller: Some(controller),
            sock: dir.join("nbd.sock"),
            tcp: String::new(),
            loops,
            mount,
        };
        wait_until("every standby ready", Duration::from_secs(20), || {
            let st = env.cluster_status();
            nodes
                .iter()
                .all(|n| st.contains(&format!("node {n}: member connected standby-ready")))
        });
        let agent = cdir.join("node-1").join("agent.sock");
        let sock = env.sock.clone();
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["nbd", "--agent", s(&agent), "--node", "1", "--origin"])
            .arg(&origin_dev)
            .arg("--store")
            .arg(&store_dev)
            .arg("--listen")
            .arg(&sock)
            .args(["--listen", "127.0.0.1:0", "--seal", "abort"])
            .args(nbd_args);
        let nbd = Logged::spawn(&mut cmd);
        wait_until("the NBD server", Duration::from_secs(20), || {
            nbd.log().contains("csnap nbd: serving")
        });
        let log = nbd.log();
        env.tcp = log
            .lines()
            .find_map(|l| l.strip_prefix("csnap nbd: listening on 127.0.0.1:"))
            .map(|p| format!("127.0.0.1:{p}"))
            .unwrap_or_else(|| panic!("no TCP port in the log:\n{log}"));
        assert!(
            log.contains(&format!("export nbd+unix:///origin?socket={}", s(&sock))),
            "{log}"
        );
        assert!(
            log.contains(&format!("export nbd://{}/origin", env.tcp)),
            "{log}"
        );
        assert!(log.contains("pool data buffers:"), "{log}");
        // Confined: the whitelist is enforced (filter mode) and memory is
        // locked.
        let pid = common::cluster::csnap_pids(&[["--listen", s(&sock)]])
            .first()
            .copied()
            .unwrap_or_else(|| nbd.pid());
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.contains("Seccomp:\t2"), "{status}");
        assert!(!status.contains("VmLck:\t       0 kB"), "{status}");
        env.nbd = Some(nbd);
        env
    }

    fn cdir(&self) -> PathBuf {
        self.dir.join("c")
    }

    fn cluster_status(&self) -> String {
        let o = csnap(&["cluster", "status", "--dir", s(&self.cdir())]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `(incarnation, node, address)` of the serving server.
    fn server(&self) -> (u64, u32, String) {
        let mut st = String::new();
        wait_until("a serving server", Duration::from_secs(20), || {
            st = self.cluster_status();
            st.contains("server: incarnation")
        });
        let line = st
            .lines()
            .find(|l| l.starts_with("server: incarnation"))
            .unwrap_or_else(|| panic!("no server in the cluster status:\n{st}"));
        let w: Vec<&str> = line.split_whitespace().collect();
        (
            w[2].parse().unwrap(),
            w[5].parse().unwrap(),
            w[7].to_string(),
        )
    }

    fn snapshot(&self, action: &str, tag: u32) {
        let (_, _, addr) = self.server();
        let o = csnap(&["snapshot", action, "--server", &addr, &tag.to_string()]);
        assert!(o.status.success(), "snapshot {action} {tag}: {}", text(&o));
    }

    fn unix_url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", s(&self.sock))
    }

    fn tcp_url(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    fn nbd(&self) -> &Logged {
        self.nbd.as_ref().unwrap()
    }

    fn assert_nbd_alive(&mut self) {
        let nbd = self.nbd.as_mut().unwrap();
        if let Ok(Some(st)) = nbd.proc.0.try_wait() {
            panic!("the NBD server died ({st}):\n{}", nbd.log());
        }
    }

    /// SIGTERM: the NBD server finishes, flushes and exits 0.
    fn stop_nbd(&mut self) {
        // The csnap process itself (under a wrapper, not the wrapper's).
        let pid = common::cluster::csnap_pids(&[["--listen", s(&self.sock)]])
            .first()
            .copied()
            .unwrap_or_else(|| self.nbd().pid());
        let nbd = self.nbd.as_mut().unwrap();
        csnap_sys::send_signal(pid, libc::SIGTERM).unwrap();
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = nbd.proc.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(Duration::from_millis(50));
        let log = nbd.log();
        assert!(st.success(), "exit after SIGTERM: {st}\n{log}");
        assert!(log.contains("stopped (devices flushed)"), "{log}");
        assert!(!log.contains("heap violation"), "{log}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(n) = &self.nbd {
                eprintln!("--- csnap nbd log:\n{}", n.log());
            }
            for (i, a) in self.agents.iter().enumerate() {
                eprintln!("--- agent {} log:\n{}", i + 1, a.log());
            }
        }
        // The NBD server first, then the agents (their servers die with
        // them), then the controller.
        self.nbd.take();
        self.agents.clear();
        self.controller.take();
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        if let Some(m) = &self.mount {
            // The servers the agents started die with them, but a moment
            // later: retry while they still hold files there, then detach
            // lazily so no mount outlives the test.
            let mut unmounted = false;
            for _ in 0..50 {
                let st = Command::new("umount").arg(m).stderr(Stdio::null()).status();
                if st.is_ok_and(|s| s.success()) {
                    unmounted = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !unmounted {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A figure from the NBD server's exit line (`N <what>`).
fn figure(log: &str, what: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(" commands, ") && l.contains(" reconnects"))
        .unwrap_or_else(|| panic!("no figures in the log:\n{log}"));
    let words: Vec<&str> = line
        .split([' ', ',', '(', ')'])
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|w| w[1] == what)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("no {what} in {line:?}"))
}

/// Runs qemu-io with `cmds` (one `-c` each); asserts every command
/// succeeded.
fn qemu_io(url: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", url]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.output().unwrap();
    let out = text(&o);
    assert!(
        o.status.success() && !out.contains("failed") && !out.contains("error"),
        "qemu-io {url} ({} commands, first {:?}):\n{out}",
        cmds.len(),
        cmds.first()
    );
    out
}

/// Runs qemu-io expecting a failure; returns its output.
fn qemu_io_fails(url: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", url]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.output().unwrap();
    let out = text(&o);
    assert!(
        !o.status.success() || out.contains("failed"),
        "qemu-io {url} {cmds:?} should have failed:\n{out}"
    );
    out
}

/// Export names `nbdinfo --list` prints.
fn list_exports(env: &Env) -> Vec<String> {
    let o = Command::new("nbdinfo")
        .args(["--list", &format!("nbd+unix:///?socket={}", s(&env.sock))])
        .output()
        .unwrap();
    assert!(o.status.success(), "nbdinfo --list: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .map(str::to_string)
        .collect()
}

#[test]
fn list_shows_origin_and_every_snapshot_at_once() {
    let env = Env::new("list", &[1], &[]);
    assert_eq!(list_exports(&env), ["origin"]);
    // The server runs by now (the list asked for it).
    env.snapshot("create", 3);
    assert_eq!(list_exports(&env), ["origin", "3"]);
    env.snapshot("create", 700);
    assert_eq!(list_exports(&env), ["origin", "3", "700"]);
    // INFO (nbdinfo without --list) and GO of a snapshot, and of a tag that
    // does not exist.
    let o = Command::new("nbdinfo")
        .arg(env.unix_url("700"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("export-size: {ORIGIN_BYTES}")),
        "{}",
        text(&o)
    );
    for bad in ["4", "origin2", "-1", "99999999999"] {
        let o = Command::new("nbdinfo")
            .arg(env.unix_url(bad))
            .output()
            .unwrap();
        assert!(!o.status.success(), "export {bad} exists? {}", text(&o));
        qemu_io_fails(&env.unix_url(bad), &["read 0 4k"]);
    }
    env.snapshot("delete", 3);
    assert_eq!(list_exports(&env), ["origin", "700"]);
    // The empty name is the origin.
    let o = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///?socket={}", s(&env.sock)))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(!env.nbd().log().contains("heap violation"));
}

/// The file's bytes at `off`.
fn file_bytes(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

#[test]
fn qemu_io_patterns_on_origin_and_snapshots() {
    let mut env = Env::new("patterns", &[1], &[]);
    let origin = env.unix_url("origin");
    qemu_io(
        &origin,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0x11 4097 70000",
            "read -P 0xab 0 4097",
            "read -P 0x11 4097 70000",
            "read -P 0xab 74097 974479",
            // FUA, write zeroes over several buffers, trim, flush.
            "write -f -P 0x22 2M 64k",
            "write -P 0x33 3M 5M",
            "write -z 3M 3M",
            "read -P 0 3M 3M",
            "read -P 0x33 6M 2M",
            "discard 6M 4k",
            "read -P 0x33 6M 4k",
            "flush",
        ],
    );
    // On the origin device itself.
    assert!(file_bytes(&env.origin, 4097, 70000)
        .iter()
        .all(|&b| b == 0x11));
    assert!(file_bytes(&env.origin, 2 << 20, 65536)
        .iter()
        .all(|&b| b == 0x22));
    // Snapshot 1 keeps the old data; the origin takes the new.
    env.snapshot("create", 1);
    qemu_io(
        &origin,
        &["write -P 0xcd 0 1M", "write -P 0x44 100000 9000", "flush"],
    );
    let snap1 = env.unix_url("1");
    qemu_io(
        &snap1,
        &[
            "read -P 0xab 0 4097",
            "read -P 0x11 4097 70000",
            "read -P 0xab 74097 974479",
            "read -P 0x22 2M 64k",
            "read -P 0 3M 3M",
        ],
    );
    qemu_io(
        &origin,
        &[
            "read -P 0xcd 0 100000",
            "read -P 0x44 100000 9000",
            "read -P 0xcd 109000 939576",
        ],
    );
    // A snapshot write changes that snapshot only.
    env.snapshot("create", 2);
    qemu_io(
        &snap1,
        &["write -P 0x55 8192 5000", "read -P 0x55 8192 5000"],
    );
    qemu_io(
        &snap1,
        &[
            "read -P 0xab 0 4097",
            "read -P 0x11 4097 4095",
            "read -P 0x55 8192 5000",
            "read -P 0x11 13192 60905",
        ],
    );
    qemu_io(&env.unix_url("2"), &["read -P 0xcd 0 100000"]);
    qemu_io(&origin, &["read -P 0xcd 0 100000"]);
    // A snapshot read caches its mapping as a lease; a write of the same
    // chunks by the same connection (the server drains that lease first),
    // and by the origin while another connection holds leases.
    let mut s2 = QemuIo::start(&env.unix_url("2"), env.dir.join("s2.err"));
    s2.ok("read -P 0xcd 0 100000");
    s2.ok("read -P 0x44 100000 9000");
    s2.ok("write -P 0x57 16384 100");
    s2.ok("read -P 0x57 16384 100");
    s2.ok("read -P 0xcd 0 16384");
    s2.ok("read -P 0xcd 16484 83516");
    qemu_io(&origin, &["write -P 0xee 0 1M"]);
    s2.ok("read -P 0xcd 0 16384");
    s2.ok("read -P 0x57 16384 100");
    s2.ok("read -P 0xcd 16484 83516");
    s2.ok("read -P 0x44 100000 9000");
    s2.finish(true);
    qemu_io(&origin, &["read -P 0xee 0 1M"]);
    qemu_io(&snap1, &["read -P 0xab 0 4097"]);
    // Over TCP too.
    let tcp = env.tcp_url("origin");
    qemu_io(&tcp, &["write -P 0x66 20M 1M", "read -P 0x66 20M 1M"]);
    qemu_io(&env.tcp_url("1"), &["read -P 0x55 8192 5000"]);
    env.assert_nbd_alive();
    // Memory is locked: at least the 64 data buffers.
    let st = std::fs::read_to_string(format!("/proc/{}/status", env.nbd().pid())).unwrap();
    let kb = |k: &str| -> u64 {
        st.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    assert!(kb("VmLck:") >= 64 * 1024, "{st}");
    // SIGTERM with a client in transmission and one in the handshake: both
    // are closed, the devices flushed, exit 0.
    let mut a = Raw::connect(&env.sock);
    a.go("1");
    a.request(0, 0, 1, 8192, 5000);
    assert_eq!(a.reply(), (0, 1));
    assert_eq!(a.read_n(5000), vec![0x55; 5000]);
    let mut b = Raw::connect(&env.sock);
    b.greeting();
    env.stop_nbd();
    a.expect_closed();
    b.expect_closed();
}

/// `read -P` commands that check `[base, base + shadow.len())` of a volume
/// against `shadow`, one per run of equal bytes (so most are unaligned).
fn shadow_reads(shadow: &[u8], base: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < shadow.len() {
        let mut j = i + 1;
        while j < shadow.len() && shadow[j] == shadow[i] {
            j += 1;
        }
        out.push(format!("read -P {:#x} {} {}", shadow[i], base + i, j - i));
        i = j;
    }
    out
}

fn qemu_io_all(url: &str, cmds: &[String]) -> String {
    let v: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(url, &v)
}

/// Writes `(pattern, offset, length)` to `shadow` and returns the qemu-io
/// commands (`write`, or `aio_write` for writes in flight together).
fn shadow_writes(shadow: &mut [u8], verb: &str, w: &[(u8, usize, usize)]) -> Vec<String> {
    w.iter()
        .map(|&(p, off, len)| {
            shadow[off..off + len].fill(p);
            format!("{verb} -P {p:#x} {off} {len}")
        })
        .collect()
}

/// Requests smaller than the device's direct-I/O block, or not aligned to
/// it, against shadow copies: the cluster and the NBD server on loop
/// devices of 4096-byte sectors, so 512-byte and 1-byte writes and reads are
/// read-modify-writes and bounced reads in the NBD server. On the origin,
/// on a snapshot (its store chunk) and on the origin after the snapshot
/// (after its copy-out); writes in flight together inside one block, two
/// overlapping unaligned writes in flight, and two connections writing
/// alternate bytes of the same blocks at once. Any lost update or a stale
/// block merged shows as a byte that differs from the shadow.
#[test]
fn sub_block_and_unaligned_io_match_a_shadow() {
    const REGION: usize = 256 << 10;
    let mut env = Env::on_loop_devices("subblock", &[], 4096);
    let origin = env.unix_url("origin");
    let mut sh = vec![0x5au8; REGION];
    qemu_io(&origin, &["write -P 0x5a 0 256k"]);
    let mut cmds = shadow_writes(
        &mut sh,
        "write",
        &[
            (0x01, 1, 1),
            (0x02, 512, 512),
            (0x03, 4096 + 1536, 512),
            (0x04, 8191, 1),
            (0x05, 8192, 1),
            (0x06, 12000, 513),
            (0x07, 40961, 70000),
            (0x08, 131071, 2),
        ],
    );
    cmds.extend(shadow_reads(&sh, 0));
    cmds.push("flush".into());
    qemu_io_all(&origin, &cmds);
    assert!(file_bytes(&env.origin, 0, REGION) == sh, "origin device");
    // In flight together: eight 512-byte writes filling one block, two
    // single bytes in the next, then two overlapping unaligned writes.
    let mut cmds = Vec::new();
    for i in 0..8u8 {
        cmds.extend(shadow_writes(
            &mut sh,
            "aio_write",
            &[(0xa0 + i, 16384 + 512 * usize::from(i), 512)],
        ));
    }
    cmds.extend(shadow_writes(
        &mut sh,
        "aio_write",
        &[(0xb1, 20481, 1), (0xb2, 20483, 1)],
    ));
    cmds.push("aio_write -P 0xc1 24676 600".into());
    cmds.push("aio_write -P 0xc2 24876 600".into());
    cmds.push("aio_flush".into());
    qemu_io_all(&origin, &cmds);
    // The overlap is one write's or the other's, whole.
    let got = file_bytes(&env.origin, 24876, 400);
    assert!(
        got.iter().all(|&b| b == 0xc1) || got.iter().all(|&b| b == 0xc2),
        "overlap torn: {got:?}"
    );
    sh[24676..24876].fill(0xc1);
    sh[24876..25276].fill(got[0]);
    sh[25276..25476].fill(0xc2);
    assert!(
        file_bytes(&env.origin, 0, REGION) == sh,
        "after writes in flight"
    );
    qemu_io_all(&origin, &shadow_reads(&sh, 0));
    // Two connections at once, alternate bytes of the same two blocks.
    let mut handles = Vec::new();
    for (k, p) in [(0usize, 0xd1u8), (1, 0xd2)] {
        let mut cmds = Vec::new();
        for i in 0..128 {
            let off = 28672 + 2 * 31 * i + k;
            cmds.extend(shadow_writes(&mut sh, "aio_write", &[(p, off, 1)]));
        }
        cmds.push("aio_flush".into());
        let url = if k == 0 {
            env.unix_url("origin")
        } else {
            env.tcp_url("origin")
        };
        handles.push(std::thread::spawn(move || qemu_io_all(&url, &cmds)));
    }
    for h in handles {
        h.join().unwrap();
    }
    assert!(file_bytes(&env.origin, 0, REGION) == sh, "two connections");
    // A snapshot keeps this; sub-block writes to it land in its store
    // chunks, and the origin's after their copy-out.
    env.snapshot("create", 1);
    let snap = env.unix_url("1");
    let mut ss = sh.clone();
    let mut cmds = shadow_writes(
        &mut ss,
        "write",
        &[(0xe1, 3, 1), (0xe2, 70000, 512), (0xe3, 65535, 2)],
    );
    cmds.extend(shadow_reads(&ss, 0));
    qemu_io_all(&snap, &cmds);
    let mut cmds = shadow_writes(
        &mut sh,
        "write",
        &[(0xf1, 5, 1), (0xf2, 69999, 514), (0xf3, 200001, 4096)],
    );
    cmds.extend(shadow_reads(&sh, 0));
    cmds.push("flush".into());
    qemu_io_all(&origin, &cmds);
    qemu_io_all(&snap, &shadow_reads(&ss, 0));
    assert!(
        file_bytes(&env.origin, 0, REGION) == sh,
        "origin after snapshot"
    );
    env.assert_nbd_alive();
    env.stop_nbd();
    let log = env.nbd().log();
    assert!(figure(&log, "unaligned") > 0, "{log}");
    assert_eq!(figure(&log, "disk"), 0, "{log}");
}

/// Disk failures surface: the origin on a full file system, so a write
/// into one of its holes fails (`ENOSPC` from the device) while the rest
/// works. A write acknowledged early (write-back) fails the next `FLUSH`;
/// a `FUA` write is `EIO` itself and fails the next `FLUSH` too (latched
/// once, as fsync reports a failed write-back); the flush after that, reads
/// and writes of written blocks, and the server go on.
#[test]
fn disk_errors_are_eio_and_a_failed_write_fails_the_next_flush() {
    const EIO: u32 = 5;
    let mut env = Env::on_full_fs("diskerr", &[]);
    let mut r = Raw::connect(&env.sock);
    r.go("origin");
    let write = |r: &mut Raw, flags: u16, h: u64, off: u64, b: u8| {
        r.request(1, flags, h, off, 4096);
        r.0.write_all(&[b; 4096]).unwrap();
    };
    // Written blocks take writes.
    write(&mut r, 0, 1, 4096, 0x11);
    assert_eq!(r.reply(), (0, 1));
    r.request(3, 0, 2, 0, 0);
    assert_eq!(r.reply(), (0, 2));
    // Write-back: acknowledged, then the flush reports the failure, once.
    write(&mut r, 0, 3, FULL_FS_WRITTEN_BYTES + (4 << 20), 0x22);
    assert_eq!(r.reply(), (0, 3));
    r.request(3, 0, 4, 0, 0);
    assert_eq!(r.reply(), (EIO, 4));
    r.request(3, 0, 5, 0, 0);
    assert_eq!(r.reply(), (0, 5));
    // FUA: EIO itself, and the next flush.
    write(&mut r, 1, 6, FULL_FS_WRITTEN_BYTES + (8 << 20), 0x33);
    assert_eq!(r.reply(), (EIO, 6));
    r.request(3, 0, 7, 0, 0);
    assert_eq!(r.reply(), (EIO, 7));
    r.request(3, 0, 8, 0, 0);
    assert_eq!(r.reply(), (0, 8));
    // Reads and writes of written blocks go on.
    r.request(0, 0, 9, 4096, 4096);
    assert_eq!(r.reply(), (0, 9));
    assert_eq!(r.read_n(4096), vec![0x11; 4096]);
    write(&mut r, 1, 10, 8192, 0x44);
    assert_eq!(r.reply(), (0, 10));
    qemu_io(&env.unix_url("origin"), &["read -P 0x44 8192 4k"]);
    env.assert_nbd_alive();
    env.stop_nbd();
    let log = env.nbd().log();
    assert!(figure(&log, "disk") >= 2, "{log}");
    assert!(log.contains("disk operation failed"), "{log}");
}

/// No silent fallback to the page cache: an origin on a file system that
/// cannot do direct I/O (tmpfs reports no `STATX_DIOALIGN`) is a clear
/// error at start, before anything is served.
#[test]
fn a_device_without_direct_io_is_refused_at_start() {
    let dir = common::fresh_dir("nbd", "nodio");
    // Formatted for an origin of the same size on a real disk; the NBD
    // server is then pointed at one on tmpfs.
    let origin = dir.join("origin");
    std::fs::write(&origin, vec![0u8; ORIGIN_BYTES as usize]).unwrap();
    let shm = PathBuf::from(format!("/dev/shm/csnap-nbd-nodio-{}", std::process::id()));
    std::fs::write(&shm, vec![0u8; ORIGIN_BYTES as usize]).unwrap();
    let store = dir.join("store");
    let o = csnap(&[
        "format",
        "--origin",
        s(&origin),
        "--store",
        s(&store),
        "--store-size",
        "96M",
        "--journal-blocks",
        "256",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new(BIN)
        .args([
            "nbd",
            "--agent",
            "/nonexistent",
            "--node",
            "1",
            "--no-mlock",
        ])
        .arg("--origin")
        .arg(&shm)
        .arg("--store")
        .arg(&store)
        .arg("--listen")
        .arg(dir.join("sock"))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&shm);
    let err = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("cannot open origin") && err.contains("direct I/O (O_DIRECT)"),
        "{err}"
    );
    assert!(!dir.join("sock").exists(), "it listened: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_clients_at_once_over_unix_and_tcp() {
    // Two data buffers for everyone: commands wait for them
    // (backpressure), none fails.
    let mut env = Env::new("two", &[1], &["--buffers", "2"]);
    // Two long runs at once, each on its own region, with a snapshot taken
    // in the middle (the caching clients' grants are revoked under them).
    let run = |url: String, base: u64, pat: u8| {
        std::thread::spawn(move || {
            let mut cmds = Vec::new();
            for i in 0..64u64 {
                cmds.push(format!(
                    "write -P {} {} 64k",
                    pat.wrapping_add(i as u8),
                    base + i * 65536
                ));
            }
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(&url, &refs);
        })
    };
    let a = run(env.unix_url("origin"), 0, 0x10);
    let b = run(env.tcp_url("origin"), 8 << 20, 0x80);
    // A third client, 16 writes in flight, flushes among them.
    let url = env.unix_url("origin");
    let c = std::thread::spawn(move || {
        let o = Command::new("qemu-img")
            .args([
                "bench",
                "-f",
                "raw",
                "-w",
                "--pattern",
                "0x42",
                "--flush-interval",
                "16",
            ])
            .args(["-c", "256", "-s", "32k", "-d", "16", "-o", "16M", &url])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    });
    env.snapshot("create", 9);
    a.join().unwrap();
    b.join().unwrap();
    c.join().unwrap();
    qemu_io(&env.unix_url("origin"), &["read -P 0x42 16M 8M"]);
    let mut checks = Vec::new();
    for i in 0..64u64 {
        checks.push(format!(
            "read -P {} {} 64k",
            0x10u8.wrapping_add(i as u8),
            i * 65536
        ));
        checks.push(format!(
            "read -P {} {} 64k",
            0x80u8.wrapping_add(i as u8),
            (8 << 20) + i * 65536
        ));
    }
    let refs: Vec<&str> = checks.iter().map(String::as_str).collect();
    qemu_io(&env.tcp_url("origin"), &refs);
    // Snapshot 9 is one point in time: each writer's regions are written
    // up to some point (one of them perhaps in flight: all old or all new),
    // and never after it.
    let img = env.dir.join("snap9.img");
    let o = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &env.unix_url("9"),
            s(&img),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let snap = std::fs::read(&img).unwrap();
    for (base, pat) in [(0usize, 0x10u8), (8 << 20, 0x80)] {
        let mut written = true;
        for i in 0..64usize {
            let r = &snap[base + i * 65536..base + (i + 1) * 65536];
            let new = r.iter().all(|&b| b == pat.wrapping_add(i as u8));
            let old = r.iter().all(|&b| b == 0);
            assert!(
                new || old,
                "region {i} of writer {pat:#x} is torn in the snapshot"
            );
            assert!(
                !new || written,
                "region {i} of writer {pat:#x} is newer than an earlier one"
            );
            written = new;
        }
    }
    env.stop_nbd();
    let log = env.nbd().log();
    assert!(
        figure(&log, "waited") > 0,
        "no command waited for one of the two buffers:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// A raw NBD client, for what qemu and libnbd never send.
// ---------------------------------------------------------------------------

struct Raw(UnixStream);

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw(s)
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }

    /// The server closed: end of stream (or a reset) within the timeout.
    fn expect_closed(&mut self) {
        let mut b = [0u8; 4096];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close: {e}"),
            }
        }
    }

    fn greeting(&mut self) {
        let g = self.read_n(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    }

    /// The greeting, then client flags fixed newstyle and no zeroes.
    fn handshake(&mut self) {
        self.greeting();
        self.0.write_all(&3u32.to_be_bytes()).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut o = b"IHAVEOPT".to_vec();
        o.extend_from_slice(&opt.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(data);
        self.0.write_all(&o).unwrap();
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let h = self.read_n(20);
        let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (rep, self.read_n(len))
    }

    /// `GO` of `name`: the export size, or the error reply type.
    fn opt_go(&mut self, name: &str) -> Result<u64, u32> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        let mut size = 0;
        loop {
            match self.option_reply() {
                (1, _) => return Ok(size),
                (3, data) if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                }
                (3, _) => {}
                (r, _) => return Err(r),
            }
        }
    }

    /// Handshake and `GO` of `name`: returns the export size.
    fn go(&mut self, name: &str) -> u64 {
        self.handshake();
        self.opt_go(name).unwrap()
    }

    fn request(&mut self, typ: u16, flags: u16, handle: u64, off: u64, len: u32) {
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&typ.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&r).unwrap();
    }

    /// One structured reply chunk: (flags, type, handle, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x668e_33ef);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.read_n(len),
        )
    }

    /// A block-status chunk's context id and extents.
    fn extents(payload: &[u8]) -> (u32, Vec<(u32, u32)>) {
        assert!(payload.len() >= 12 && (payload.len() - 4).is_multiple_of(8));
        let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
        let e = payload[4..]
            .chunks(8)
            .map(|x| {
                (
                    u32::from_be_bytes(x[..4].try_into().unwrap()),
                    u32::from_be_bytes(x[4..].try_into().unwrap()),
                )
            })
            .collect();
        (id, e)
    }

    /// A simple reply: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
}

/// Structured replies and block status byte by byte: `SET_META_CONTEXT`
/// answers the known contexts with ids (an unknown namespace ignored),
/// `BLOCK_STATUS` gives one chunk per context (`DONE` on the last), `REQ_ONE`
/// one extent, `READ` an `OFFSET_DATA` chunk, errors `ERROR` chunks, other
/// commands simple replies; a snapshot deleted under a selection makes
/// block status `EINVAL` and the connection goes on.
#[test]
fn structured_replies_and_block_status_on_the_wire() {
    let mut env = Env::new("structured", &[1], &[]);
    qemu_io(&env.unix_url("origin"), &["write -P 0x11 0 64k"]);
    env.snapshot("create", 5);
    qemu_io(
        &env.unix_url("origin"),
        &["write -P 0x22 1M 1", "write -z 2M 4k"],
    );
    let mut r = Raw::connect(&env.sock);
    r.handshake();
    r.option(8, &[]); // STRUCTURED_REPLY
    assert_eq!(r.option_reply(), (1, vec![]));
    let mut d = 6u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"origin");
    let queries: [&[u8]; 3] = [
        b"base:allocation",
        b"x-csnap:changed-since:5",
        b"x-other:thing",
    ];
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    r.option(10, &d); // SET_META_CONTEXT
    let (t, data) = r.option_reply();
    assert_eq!(
        (t, &data[..4], &data[4..]),
        (4, &1u32.to_be_bytes()[..], &b"base:allocation"[..])
    );
    let (t, data) = r.option_reply();
    assert_eq!(
        (t, &data[..4], &data[4..]),
        (4, &2u32.to_be_bytes()[..], &b"x-csnap:changed-since:5"[..])
    );
    assert_eq!(r.option_reply(), (1, vec![]));
    assert_eq!(r.opt_go("origin"), Ok(ORIGIN_BYTES));

    // BLOCK_STATUS of 4 MiB: all data; changed from 1 MiB for one chunk,
    // and where zeroes were written.
    r.request(7, 0, 1, 0, 4 << 20);
    let (f, t, h, p) = r.chunk();
    assert_eq!((f, t, h), (0, 5, 1));
    assert_eq!(Raw::extents(&p), (1, vec![(4 << 20, 0)]));
    let (f, t, h, p) = r.chunk();
    assert_eq!((f, t, h), (1, 5, 1));
    let (id, e) = Raw::extents(&p);
    assert_eq!(id, 2);
    assert_eq!(e.len(), 5, "{e:?}");
    let cs = e[1].0;
    assert!(cs.is_power_of_two() && cs >= 4096);
    assert_eq!(
        e,
        vec![
            (1 << 20, 0),
            (cs, 1),
            ((1 << 20) - cs, 0),
            (cs, 1),
            ((2 << 20) - cs, 0)
        ]
    );
    // REQ_ONE: one extent per context, within the request.
    r.request(7, 1 << 3, 2, 0, 4 << 20);
    let (_, _, _, p) = r.chunk();
    assert_eq!(Raw::extents(&p), (1, vec![(4 << 20, 0)]));
    let (f, _, _, p) = r.chunk();
    assert_eq!(f, 1);
    assert_eq!(Raw::extents(&p), (2, vec![(1 << 20, 0)]));
    // More runs than one reply holds: 600 changed chunks apart. A reply
    // gives 512 extents and ends short of the request; the client goes on
    // from there (nbdinfo does), and the whole map is the writes.
    let cmds: Vec<String> = (0..600u64)
        .map(|i| format!("write -P 0x33 {} 1", (4 << 20) + 2 * i * u64::from(cs)))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&env.unix_url("origin"), &refs);
    r.request(7, 0, 20, 0, 32 << 20);
    r.chunk();
    let (f, _, _, p) = r.chunk();
    assert_eq!(f, 1);
    let (_, e) = Raw::extents(&p);
    assert_eq!(e.len(), 512);
    let covered: u64 = e.iter().map(|x| u64::from(x.0)).sum();
    assert!(covered < 32 << 20 && e.iter().all(|x| x.0 > 0));
    assert!(e.windows(2).all(|w| w[0].1 != w[1].1), "runs alternate");
    let rows = dirty_ranges(&env.unix_url("origin"), "x-csnap:changed-since:5");
    let mut chunks: Vec<u64> = Vec::new();
    for (o, n) in rows {
        chunks.extend(o / u64::from(cs)..(o + n) / u64::from(cs));
    }
    let mut want: Vec<u64> = vec![(1 << 20) / u64::from(cs), (2 << 20) / u64::from(cs)];
    want.extend((0..600u64).map(|i| (4 << 20) / u64::from(cs) + 2 * i));
    assert_eq!(chunks, want);
    // From an unaligned offset inside the changed chunk: it starts dirty.
    r.request(7, 1 << 3, 3, (1 << 20) + 10, 100);
    r.chunk();
    let (_, _, _, p) = r.chunk();
    assert_eq!(Raw::extents(&p), (2, vec![(100, 1)]));
    // READ: one OFFSET_DATA chunk; errors: ERROR chunks; zero length: NONE.
    r.request(0, 0, 4, 4096, 4096);
    let (f, t, h, p) = r.chunk();
    assert_eq!((f, t, h, p.len()), (1, 1, 4, 8 + 4096));
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 4096);
    assert!(p[8..].iter().all(|&b| b == 0x11));
    r.request(0, 0, 5, ORIGIN_BYTES - 10, 20);
    let (f, t, h, p) = r.chunk();
    assert_eq!((f, t, h), (1, 0x8001, 5));
    assert_eq!(&p[..6], &[0, 0, 0, 22, 0, 0]);
    r.request(0, 0, 6, 0, 0);
    assert_eq!(r.chunk(), (1, 0, 6, vec![]));
    r.request(7, 0, 7, 0, 0); // zero-length block status
    let (_, t, h, p) = r.chunk();
    assert_eq!((t, h, &p[..4]), (0x8001, 7, &[0, 0, 0, 22][..]));
    // Other commands: simple replies.
    r.request(3, 0, 8, 0, 0);
    assert_eq!(r.reply(), (0, 8));
    // The snapshot goes away under the selection: EINVAL, and on.
    env.snapshot("delete", 5);
    r.request(7, 0, 9, 0, 4096);
    let (f, t, h, p) = r.chunk();
    assert_eq!((f, t, h, &p[..4]), (1, 0x8001, 9, &[0, 0, 0, 22][..]));
    r.request(0, 0, 10, 1 << 20, 1);
    let (_, t, _, p) = r.chunk();
    assert_eq!((t, p[8]), (1, 0x22));
    r.request(2, 0, 11, 0, 0);
    r.expect_closed();

    // Without structured replies: SET is refused, block status EINVAL, a
    // read a simple reply.
    let mut r = Raw::connect(&env.sock);
    r.handshake();
    r.option(10, &d);
    assert_eq!(r.option_reply().0, 0x8000_0003);
    assert_eq!(r.opt_go("origin"), Ok(ORIGIN_BYTES));
    r.request(7, 0, 1, 0, 4096);
    assert_eq!(r.reply(), (22, 1));
    r.request(0, 0, 2, 0, 4);
    assert_eq!(r.reply(), (0, 2));
    assert_eq!(r.read_n(4), vec![0x11; 4]);
    env.assert_nbd_alive();
}

#[test]
fn raw_commands_and_hostile_clients() {
    let mut env = Env::new("hostile", &[1], &["--connections", "4"]);
    // A qemu-io client works through all of what follows.
    let url = env.unix_url("origin");
    let good = std::thread::spawn(move || {
        let mut cmds = Vec::new();
        for i in 0..200u64 {
            cmds.push(format!(
                "write -P {} {} 16k",
                (i % 200) as u8 + 1,
                (16 << 20) + i * 16384
            ));
            cmds.push(format!(
                "read -P {} {} 16k",
                (i % 200) as u8 + 1,
                (16 << 20) + i * 16384
            ));
        }
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&url, &refs);
    });
    // Commands qemu does not send this way: a 3 MiB write-zeroes (pieces
    // of one buffer), FAST_ZERO (ENOTSUP), trim, cache, out of range.
    let mut r = Raw::connect(&env.sock);
    assert_eq!(r.go("origin"), ORIGIN_BYTES);
    r.request(1, 0, 1, 4 << 20, 8192); // WRITE
    r.0.write_all(&[0x99u8; 8192]).unwrap();
    assert_eq!(r.reply(), (0, 1));
    r.request(6, 0, 2, 24 << 20, 3 << 20); // WRITE_ZEROES
    assert_eq!(r.reply(), (0, 2));
    r.request(6, 1 << 4, 3, 0, 4096); // FAST_ZERO
    assert_eq!(r.reply(), (95, 3));
    r.request(4, 0, 4, 0, 1 << 20); // TRIM
    assert_eq!(r.reply(), (0, 4));
    r.request(5, 0, 5, 0, 1 << 20); // CACHE
    assert_eq!(r.reply(), (0, 5));
    r.request(0, 0, 6, ORIGIN_BYTES - 4096, 8192); // READ past the end
    assert_eq!(r.reply(), (22, 6));
    r.request(1, 0, 7, ORIGIN_BYTES, 4); // WRITE past the end: payload skipped
    r.0.write_all(&[0u8; 4]).unwrap();
    assert_eq!(r.reply(), (28, 7));
    // Over the 1 MiB limit: EINVAL, the payload skipped, in step after.
    r.request(1, 0, 8, 0, 2 << 20);
    r.0.write_all(&vec![0x77u8; 2 << 20]).unwrap();
    assert_eq!(r.reply(), (22, 8));
    r.request(0, 0, 9, 0, (1 << 20) + 1);
    assert_eq!(r.reply(), (22, 9));
    // Pipelined: several in flight, replies in any order.
    for h in 10..20u64 {
        r.request(0, 0, h, 4 << 20, 8192);
    }
    let mut seen = Vec::new();
    for _ in 10..20 {
        let (e, h) = r.reply();
        assert_eq!(e, 0);
        assert!(r.read_n(8192).iter().all(|&b| b == 0x99));
        seen.push(h);
    }
    seen.sort_unstable();
    assert_eq!(seen, (10..20).collect::<Vec<_>>());
    r.request(3, 0, 30, 0, 0); // FLUSH
    assert_eq!(r.reply(), (0, 30));
    r.request(2, 0, 31, 0, 0); // DISC
    r.expect_closed();
    assert!(file_bytes(&env.origin, 24 << 20, 3 << 20)
        .iter()
        .all(|&b| b == 0));

    // A GO of a snapshot that does not exist, then of the origin, on one
    // connection; a zero-length read and write; a FUA write.
    let mut r = Raw::connect(&env.sock);
    r.handshake();
    assert_eq!(r.opt_go("12345"), Err(0x8000_0006));
    assert_eq!(r.opt_go("origin"), Ok(ORIGIN_BYTES));
    r.request(0, 0, 1, 0, 0);
    assert_eq!(r.reply(), (0, 1));
    r.request(1, 0, 2, 0, 0);
    assert_eq!(r.reply(), (0, 2));
    r.request(1, 1, 3, 5 << 20, 4096);
    r.0.write_all(&[0x3cu8; 4096]).unwrap();
    assert_eq!(r.reply(), (0, 3));
    r.request(0, 0, 4, 5 << 20, 4096);
    assert_eq!(r.reply(), (0, 4));
    assert!(r.read_n(4096).iter().all(|&b| b == 0x3c));
    drop(r);
    // The old-style EXPORT_NAME (with the 124 zero bytes), an unknown one
    // (closed), and ABORT (acknowledged, closed).
    let mut r = Raw::connect(&env.sock);
    r.greeting();
    r.0.write_all(&1u32.to_be_bytes()).unwrap();
    r.option(1, b"origin");
    let x = r.read_n(8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(x[..8].try_into().unwrap()), ORIGIN_BYTES);
    r.request(0, 0, 9, 5 << 20, 16);
    assert_eq!(r.reply(), (0, 9));
    assert_eq!(r.read_n(16), [0x3c; 16]);
    drop(r);
    let mut r = Raw::connect(&env.sock);
    r.handshake();
    r.option(1, b"nope");
    r.expect_closed();
    let mut r = Raw::connect(&env.sock);
    r.handshake();
    r.option(2, &[]);
    assert_eq!(r.option_reply().0, 1);
    r.expect_closed();

    // Hostile: unknown client flags.
    let mut h = Raw::connect(&env.sock);
    h.greeting();
    h.0.write_all(&[0xff; 4]).unwrap();
    h.expect_closed();
    // An option longer than anything the server skips.
    let mut h = Raw::connect(&env.sock);
    h.greeting();
    h.0.write_all(&1u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&99u32.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    h.0.write_all(&opt).unwrap();
    h.expect_closed();
    // A bad request magic in transmission.
    let mut h = Raw::connect(&env.sock);
    h.go("origin");
    h.0.write_all(&[0x5a; 28]).unwrap();
    h.expect_closed();
    // A write whose payload never comes, then the client vanishes.
    let mut h = Raw::connect(&env.sock);
    h.go("origin");
    h.request(1, 0, 1, 0, 1 << 20);
    h.0.write_all(&[1u8; 1000]).unwrap();
    drop(h);
    // Garbage from the first byte.
    let mut h = Raw::connect(&env.sock);
    h.0.write_all(&[0u8; 100_000]).unwrap_or(());
    h.expect_closed();
    good.join().unwrap();
    env.assert_nbd_alive();

    // The connection limit: four held, a fifth is closed at once (no
    // greeting), and the slots come back.
    let held: Vec<Raw> = (0..4)
        .map(|_| {
            let mut r = Raw::connect(&env.sock);
            r.greeting();
            r
        })
        .collect();
    let mut over = Raw::connect(&env.sock);
    over.expect_closed();
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    qemu_io(&env.unix_url("origin"), &["read -P 0x99 4M 8k"]);
    env.assert_nbd_alive();
    let log = env.nbd().log();
    assert!(log.contains("all 4 connections are in use"), "{log}");
    assert!(log.contains("bad request magic"), "{log}");
    env.stop_nbd();
}

/// A qemu-io process fed one command at a time on its standard input (it
/// reads a line per wake-up), answers unbuffered (`stdbuf`).
struct QemuIo {
    child: Proc,
    stdin: Option<std::process::ChildStdin>,
    rx: std::sync::mpsc::Receiver<String>,
    out: Arc<Mutex<String>>,
    err: PathBuf,
}

impl QemuIo {
    fn start(url: &str, err: PathBuf) -> QemuIo {
        let mut child = Command::new("stdbuf")
            .args(["-o0", "qemu-io", "-f", "raw", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let out = Arc::new(Mutex::new(String::new()));
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                o.lock().unwrap().push_str(&format!("{line}\n"));
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        QemuIo {
            child: Proc(child),
            stdin,
            rx,
            out,
            err,
        }
    }

    /// Sends a read or write command; returns its answer line and how long
    /// it took.
    fn cmd(&mut self, c: &str) -> (String, Duration) {
        let t0 = Instant::now();
        writeln!(self.stdin.as_mut().unwrap(), "{c}").unwrap();
        loop {
            let Ok(line) = self
                .rx
                .recv_timeout(Duration::from_secs(20).saturating_sub(t0.elapsed()))
            else {
                let err = std::fs::read_to_string(&self.err).unwrap_or_default();
                let out = self.out.lock().unwrap().clone();
                panic!("{c:?} not answered; stdout:\n{out}\nstderr:\n{err}");
            };
            if ["wrote ", "read ", "failed", "error"]
                .iter()
                .any(|w| line.contains(w))
            {
                return (line, t0.elapsed());
            }
        }
    }

    /// Like `cmd`, asserting success.
    fn ok(&mut self, c: &str) -> Duration {
        let (line, t) = self.cmd(c);
        assert!(
            !line.contains("failed") && !line.contains("error"),
            "{c:?}: {line}"
        );
        t
    }

    /// Flushes, quits; asserts a clean exit (`clean`: no command failed).
    fn finish(mut self, clean: bool) {
        let mut stdin = self.stdin.take().unwrap();
        writeln!(stdin, "flush").unwrap();
        writeln!(stdin, "quit").unwrap();
        drop(stdin);
        let st = self.child.0.wait().unwrap();
        let err = std::fs::read_to_string(&self.err).unwrap_or_default();
        let out = self.out.lock().unwrap().clone();
        let ok = if clean {
            st.success() && !out.contains("failed")
        } else {
            st.code() == Some(1)
        };
        assert!(ok, "qemu-io: {st}\nstdout:\n{out}\nstderr:\n{err}");
    }
}

/// The pid of the process whose command line names `addr`.
fn pid_listening_on(addr: &str) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap() {
        let e = e.unwrap();
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.contains(&&b"server"[..]) && args.contains(&addr.as_bytes()) {
            return pid;
        }
    }
    panic!("no server process listens on {addr}");
}

/// The changed ranges `nbdinfo --map=CONTEXT` reports: (offset, length).
fn dirty_ranges(url: &str, context: &str) -> Vec<(u64, u64)> {
    let o = Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(3)
                .map(|x| x.parse().unwrap())
                .collect();
            (f[2] & 1 == 1).then(|| (f[0], f[1]))
        })
        .collect()
}

#[test]
fn failover_is_invisible_to_nbd_clients() {
    // The nodes' servers as on two hosts: no host-local store lock (the
    // SIGKILLed server may still hold it for a moment while it exits; the
    // incarnation fences it anyway).
    let mut env = Env::build(
        "failover",
        &[1, 2],
        &[],
        &[],
        &["--server-arg=--no-host-lock"],
    );
    let o = csnap(&["cluster", "start", "--dir", s(&env.cdir()), "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let (inc, node, addr) = env.server();
    assert_eq!(node, 1);
    // A snapshot with data of its own, read during the failover (its
    // leases go to the next server).
    qemu_io(&env.unix_url("origin"), &["write -P 0x5e 0 4M"]);
    env.snapshot("create", 5);
    // A writer fed command by command, so the kill lands mid-run.
    let mut w = QemuIo::start(&env.unix_url("origin"), env.dir.join("writer.err"));
    let pat = |i: u64| (i % 250) as u8 + 1;
    let off = |i: u64| (8 << 20) + i * 65536;
    for i in 0..40u64 {
        w.ok(&format!("write -P {} {} 64k", pat(i), off(i)));
    }
    // A snapshot reader: its engine caches leases on every chunk it read
    // (the origin's, shared by the snapshot), which go to the next server.
    let mut r = QemuIo::start(&env.unix_url("5"), env.dir.join("reader.err"));
    r.ok("read -P 0x5e 0 4M");
    // Block status asks the server through the process's control
    // connection, which rides the failover out too.
    let url = env.unix_url("origin");
    assert_eq!(
        dirty_ranges(&url, "x-csnap:changed-since:5"),
        vec![(8 << 20, 40 * 65536)]
    );
    let pid = pid_listening_on(&addr);
    csnap_sys::send_signal(u32::try_from(pid).unwrap(), libc::SIGKILL).unwrap();
    let mut longest = Duration::ZERO;
    for i in 40..300u64 {
        longest = longest.max(w.ok(&format!("write -P {} {} 64k", pat(i), off(i))));
    }
    eprintln!("longest write across the failover: {longest:?}");
    // The new server must take the reader's leases back before the origin
    // chunks under them change: the snapshot still reads its data.
    w.ok("write -P 0x6f 0 4M");
    r.ok("read -P 0x5e 0 4M");
    w.ok("read -P 0x6f 0 4M");
    w.finish(true);
    r.finish(true);
    let (inc2, node2, _) = env.server();
    assert!(inc2 > inc, "no failover: incarnation {inc2}");
    assert_eq!(node2, 2, "the server moved to node 2");
    // Every write is there, and the snapshot still reads its data.
    let cmds: Vec<String> = (0..300u64)
        .map(|i| format!("read -P {} {} 64k", pat(i), off(i)))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&env.unix_url("origin"), &refs);
    qemu_io(&env.unix_url("5"), &["read -P 0x5e 0 4M"]);
    assert_eq!(
        dirty_ranges(&url, "qemu:dirty-bitmap:since-5"),
        vec![(0, 4 << 20), (8 << 20, 300 * 65536)]
    );
    let log = env.nbd().log();
    assert!(!log.contains("fails (EIO)"), "{log}");
    env.stop_nbd();
    // The writer's and the reader's engines re-attached (and the control
    // connection, if it was up).
    let log = env.nbd().log();
    assert!(figure(&log, "reconnects") >= 2, "{log}");
    assert_eq!(figure(&log, "failover"), 0, "{log}");
}

#[test]
fn an_outage_past_the_failover_timeout_is_eio_then_io_resumes() {
    // Manual placement: nothing restarts the killed server until told to.
    let mut env = Env::build(
        "outage",
        &[1],
        &["--failover-timeout-ms", "400"],
        &["--policy", "manual"],
        &[],
    );
    let start = || {
        let o = csnap(&["cluster", "start", "--dir", s(&env.cdir()), "1"]);
        assert!(o.status.success(), "{}", text(&o));
    };
    start();
    let (inc, _, addr) = env.server();
    let mut w = QemuIo::start(&env.unix_url("origin"), env.dir.join("writer.err"));
    w.ok("write -P 0x71 0 64k");
    let pid = pid_listening_on(&addr);
    csnap_sys::send_signal(u32::try_from(pid).unwrap(), libc::SIGKILL).unwrap();
    // A write the engine holds no grant for needs the server: EIO once the
    // timeout has passed. (Far past the first write: its grant covered the
    // 64 chunks after it too, ahead.)
    let (line, took) = w.cmd("write -P 0x72 16M 64k");
    assert!(line.contains("Input/output error"), "{line}");
    assert!(
        took >= Duration::from_millis(300),
        "failed after {took:?}, before the timeout"
    );
    // Reads of the origin do not need the server.
    w.ok("read -P 0x71 0 64k");
    // A server again: the same connection goes on.
    wait_until("a new standby", Duration::from_secs(20), || {
        env.cluster_status()
            .contains("node 1: member connected standby-ready")
    });
    start();
    let (inc2, _, _) = env.server();
    assert!(inc2 > inc);
    w.ok("write -P 0x73 2M 64k");
    w.ok("read -P 0x73 2M 64k");
    w.finish(false);
    qemu_io(
        &env.unix_url("origin"),
        &["read -P 0x71 0 64k", "read -P 0x73 2M 64k"],
    );
    let log = env.nbd().log();
    assert!(log.contains("in-flight I/O fails (EIO)"), "{log}");
    assert!(log.contains("I/O resumes"), "{log}");
    env.stop_nbd();
    let log = env.nbd().log();
    assert!(figure(&log, "failover") >= 1, "{log}");
}

/// The NBD server under `strace -f` with its filter enforcing, through a
/// workload that reaches every path of its loop: handshakes with LIST and
/// INFO (nbdinfo), reads, writes, FLUSH, WRITE_ZEROES and TRIM on the origin
/// over unix and TCP, a snapshot created and read and written, hostile
/// clients (garbage, a connection over `--connections`, a client gone
/// mid-command), a failover under a qemu-io client (its links re-made),
/// and the stop on SIGTERM. Every syscall after the filter install must be
/// in `csnap_audit::NBD`, and every rule not marked as an exit path must
/// be used.
#[test]
fn nbd_server_syscalls_match_the_audited_whitelist() {
    common::cluster::require_strace();
    let trace_dir = common::fresh_dir("nbd", "audit-trace");
    let prefix = trace_dir.join("t");
    let wrapper = common::cluster::strace_wrapper(&prefix);
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut env = Env::build_wrapped(
        "audit",
        &[1, 2],
        &["--connections", "3", "--metrics", &metrics],
        &[],
        &["--server-arg=--no-host-lock"],
        &wrapper,
        Disks::Files,
    );
    let o = csnap(&["cluster", "start", "--dir", s(&env.cdir()), "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let (inc, _, addr) = env.server();
    // Data path on the origin, over unix, then TCP.
    qemu_io(
        &env.unix_url("origin"),
        &[
            "write -P 0x11 0 1M",
            "flush",
            "write -z 1M 256k",
            "discard 2M 64k",
            "read -P 0x11 0 1M",
        ],
    );
    qemu_io(
        &env.tcp_url("origin"),
        &["read -P 0x11 0 64k", "write -P 0x12 4M 64k"],
    );
    // A snapshot: listed, read (store and origin-locked), written.
    env.snapshot("create", 3);
    let exports = list_exports(&env);
    assert!(exports.contains(&"3".to_string()), "{exports:?}");
    qemu_io(&env.unix_url("origin"), &["write -P 0x13 0 64k"]);
    qemu_io(
        &env.unix_url("3"),
        &[
            "read -P 0x11 0 64k",
            "read -P 0x11 64k 64k",
            "write -P 0x14 128k 4k",
        ],
    );
    // Block status of the origin and the snapshot (nbdinfo: structured
    // replies, meta contexts, delta queries on the control connection).
    for e in ["origin", "3"] {
        let o = Command::new("nbdinfo")
            .arg("--map=qemu:dirty-bitmap:since-3")
            .arg(env.unix_url(e))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    // Hostile clients: garbage; a client gone in the middle of a write;
    // one connection over `--connections` while three are open.
    let mut g = Raw::connect(&env.sock);
    g.greeting();
    g.0.write_all(b"not the client flags of any NBD client, at all")
        .unwrap();
    g.expect_closed();
    let mut half = Raw::connect(&env.sock);
    half.go("origin");
    half.request(1, 0, 7, 0, 65536);
    half.0.write_all(&[0u8; 100]).unwrap();
    drop(half);
    let held: Vec<Raw> = (0..3).map(|_| Raw::connect(&env.sock)).collect();
    let mut over = Raw::connect(&env.sock);
    over.expect_closed();
    drop(held);
    // A failover under a connected client: its links are made again.
    let mut w = QemuIo::start(&env.unix_url("origin"), env.dir.join("w.err"));
    w.ok("write -P 0x15 0 64k");
    let pid = pid_listening_on(&addr);
    csnap_sys::send_signal(u32::try_from(pid).unwrap(), libc::SIGKILL).unwrap();
    w.ok("write -P 0x16 64k 64k");
    w.ok("read -P 0x15 0 64k");
    w.finish(true);
    let (inc2, _, _) = env.server();
    assert!(inc2 > inc, "no failover");
    // The metrics endpoint (status and list asked on the control link).
    common::scrape_for_audit(&metrics);
    env.assert_nbd_alive();
    env.stop_nbd();

    common::cluster::audit_confined_runs(&prefix, "nbd", 1, csnap_audit::NBD);
    let _ = std::fs::remove_dir_all(&trace_dir);
}
