//! Hostile on-disk blocks meet real processes (issue #15): every b-tree leaf
//! of a store is rewritten with a record count of 200 (beyond a leaf's
//! capacity) and a correct checksum. `csnap check` reports the leaves; a
//! confined server on that store fails the snapshot read that needs a leaf
//! with an I/O error, logs one problem line naming the block, and goes on
//! serving. A store whose root is nonsense is refused at start, by a
//! server and by a sealed standby, with the block named and a non-zero exit.

// Test code: offsets and sizes are a few MiB and move freely between u64 and
// usize.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::cluster::{csnap, kill, s, seed, text, Daemon, Disks, Rng, BIN, CHUNK, TIMEOUT};
use csnap_store::layout::{self, BlockKind};

const BS: usize = 4096;

/// Rewrites every b-tree leaf in the metadata area of the store file with
/// a record count of `count`, re-sealed with the store's own sealing (so
/// the checksum is right and only the structure is wrong). Returns the
/// leaves' addresses.
fn rewrite_leaves(store: &Path, count: u16) -> Vec<u64> {
    let mut img = std::fs::read(store).expect("read store");
    let label = layout::Label::decode(&img[..BS]).expect("label");
    let mut leaves = Vec::new();
    for addr in label.meta_start..label.meta_start + label.meta_blocks {
        let b = &mut img[addr as usize * BS..(addr as usize + 1) * BS];
        if layout::verify(b, addr, BlockKind::Leaf).is_ok() {
            layout::set_count(b, count);
            let seq = layout::seq(b);
            layout::seal(b, seq);
            leaves.push(addr);
        }
    }
    std::fs::write(store, &img).expect("write store");
    leaves
}

/// The root block the home superblock names.
fn root(store: &Path) -> u64 {
    let img = std::fs::read(store).expect("read store");
    layout::Super::decode(&img[BS..2 * BS])
        .expect("superblock")
        .root
}

/// `csnap server` (confined: no --no-seccomp) on the disks, listening on
/// `sock`.
fn server(d: &Disks, sock: &Path) -> Daemon {
    Daemon::spawn(
        "server",
        Command::new(BIN)
            .args(["server", "--origin", s(&d.origin), "--store", s(&d.store)])
            .args(["--listen", s(sock)]),
    )
}

fn wait_serving(srv: &Daemon) {
    assert!(
        srv.log.wait_line(0, "serving", TIMEOUT).is_some(),
        "the server did not start; log:\n{}",
        srv.log.text()
    );
}

fn snapshot(sock: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["snapshot", args[0], "--server", s(sock)];
    a.extend_from_slice(&args[1..]);
    csnap(&a)
}

/// Formats, writes the origin, takes snapshot 1, overwrites the whole
/// origin (a copy-out per chunk: a two-level tree), ends with a commit
/// that touches only the superblock (so journal replay does not repair the
/// leaves), and stops the server cleanly.
fn populated(name: &str, origin_bytes: usize) -> (Disks, Vec<u8>, Rng) {
    let mut rng = Rng::new(seed(name));
    let d = Disks::new(name, origin_bytes, "32M", &mut rng);
    let sock = d.dir.join("sock");
    let mut srv = server(&d, &sock);
    wait_serving(&srv);
    let o = snapshot(&sock, &["create", "1"]);
    assert!(o.status.success(), "create: {}", text(&o));
    let mut io = d.io_server(&sock, "origin", 1);
    let new = rng.bytes(origin_bytes);
    for off in (0..origin_bytes).step_by(1 << 20) {
        let end = (off + (1 << 20)).min(origin_bytes);
        io.write(off as u64, &new[off..end]);
    }
    io.quit();
    let o = snapshot(&sock, &["priority", "1", "3"]);
    assert!(o.status.success(), "priority: {}", text(&o));
    kill(srv.pid(), 15);
    assert!(
        srv.wait_exit(TIMEOUT).is_some(),
        "the server did not stop on SIGTERM"
    );
    (d, new, rng)
}

#[test]
fn a_server_fails_the_read_that_meets_a_corrupt_leaf_logs_it_and_keeps_serving() {
    // 8 MiB of 16 KiB chunks: 512 exceptions, four leaves under a root node.
    let (d, new, _rng) = populated("corrupt-serve", 8 << 20);
    let leaves = rewrite_leaves(&d.store, 200);
    assert!(leaves.len() >= 2, "expected a two-level tree: {leaves:?}");
    assert!(!leaves.contains(&root(&d.store)), "the root must be a node");

    let o = csnap(&["check", "--store", s(&d.store)]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "check: {}", text(&o));
    for l in &leaves {
        assert!(
            out.lines().any(|line| line.starts_with("problem: ")
                && line.contains(&format!("leaf at block {l}"))
                && line.contains("overflow")),
            "check names no problem with leaf {l}:\n{out}"
        );
    }

    let sock = d.dir.join("sock");
    let mut srv = server(&d, &sock);
    wait_serving(&srv);

    // Snapshot 1 reads the old data, all of it in the store: every chunk
    // needs a leaf, and every leaf is corrupt.
    let mut snap = d.io_server(&sock, "1", 2);
    for _ in 0..2 {
        snap.send_read(0, CHUNK, None);
        let (_, line) = snap
            .try_reply(TIMEOUT)
            .unwrap_or_else(|| panic!("no reply to the read; server log:\n{}", srv.log.text()));
        assert!(
            line.starts_with("error") && line.contains("corrupt"),
            "the read of a chunk behind a corrupt leaf answered {line:?}"
        );
    }
    assert!(
        srv.exited().is_none(),
        "the server died; log:\n{}",
        srv.log.text()
    );
    let problem = srv
        .log
        .wait_line(0, "problem: b-tree leaf at block", TIMEOUT)
        .unwrap_or_else(|| panic!("no problem line; log:\n{}", srv.log.text()));
    assert!(
        leaves
            .iter()
            .any(|l| problem.contains(&format!("block {l}:")))
            && problem.contains("exceeds its capacity"),
        "{problem}"
    );
    // One line per block, however often it is met.
    let n = srv
        .log
        .lines()
        .iter()
        .filter(|l| l.contains("problem:"))
        .count();
    assert_eq!(n, 1, "log:\n{}", srv.log.text());

    // Everything else is still served: the origin (new data), the
    // snapshot table, the store's figures.
    let mut origin = d.io_server(&sock, "origin", 3);
    let got = origin.read(0, 4 * CHUNK);
    assert_eq!(&got[..], &new[..4 * CHUNK as usize], "origin read");
    origin.quit();
    let o = snapshot(&sock, &["list"]);
    assert!(o.status.success(), "list: {}", text(&o));
    let o = csnap(&["status", "--server", s(&sock)]);
    assert!(o.status.success(), "status: {}", text(&o));
    assert!(
        srv.exited().is_none(),
        "the server died; log:\n{}",
        srv.log.text()
    );
    drop(snap);
}

/// A store whose root leaf is nonsense: a server refuses to start, and so
/// does a sealed standby told to start; both name the block, neither
/// panics.
#[test]
fn a_store_with_a_corrupt_root_is_refused_at_start() {
    // 1 MiB: 64 exceptions, the root is the only leaf.
    let (d, _new, _rng) = populated("corrupt-root", 1 << 20);
    let leaves = rewrite_leaves(&d.store, 200);
    let root = root(&d.store);
    assert_eq!(leaves, vec![root], "the root must be the only leaf");

    let sock = d.dir.join("sock");
    let mut srv = server(&d, &sock);
    let st = srv
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("the server did not refuse; log:\n{}", srv.log.text()));
    let log = srv.log.text();
    assert_eq!(st.code(), Some(2), "exit {st:?}; log:\n{log}");
    assert!(
        log.contains(&format!(
            "store metadata corrupt: b-tree leaf at block {root}: impossible contents"
        )) && log.contains("exceeds its capacity")
            && !log.contains("serving")
            && !log.contains("panicked"),
        "log:\n{log}"
    );

    // A standby: reserved, confined and sealed before it reads the store;
    // the start command makes it read the label, superblock and root.
    standby_refuses(&d, &format!("problem: b-tree leaf at block {root}"));

    // A superblock whose depth is impossible (re-sealed; the journal copy
    // wiped so replay cannot restore it), then a label whose chunk size is
    // impossible: each refused by a sealed standby, heap-free.
    let mut img = std::fs::read(&d.store).expect("read store");
    let label = layout::Label::decode(&img[..BS]).expect("label");
    let j0 = label.journal_start as usize * BS;
    let j1 = j0 + label.journal_blocks as usize * BS;
    img[j0..j1].fill(0);
    let sbk = &mut img[BS..2 * BS];
    layout::put_u64(sbk, layout::HEADER_BYTES + 5 * 8, 40);
    let seq = layout::seq(sbk);
    layout::seal(sbk, seq);
    std::fs::write(&d.store, &img).expect("write store");
    standby_refuses(
        &d,
        "problem: superblock at block 1: tree depth is out of range",
    );
    let lb = &mut img[..BS];
    layout::put_u64(lb, layout::HEADER_BYTES + 40 + 8, 3);
    layout::seal(lb, 0);
    std::fs::write(&d.store, &img).expect("write store");
    standby_refuses(
        &d,
        "problem: label at block 0: chunk size is not a power of two",
    );
}

/// A sealed, confined standby told to start on this store logs `needle`,
/// says it could not start and exits 2: no panic, no allocation, no
/// forbidden syscall.
fn standby_refuses(d: &Disks, needle: &str) {
    let sock = d.dir.join("standby.sock");
    let mut child = Command::new(BIN)
        .args(["server", "--standby", "--origin", s(&d.origin)])
        .args(["--store", s(&d.store), "--listen", s(&sock)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn standby");
    let mut stdin = child.stdin.take().expect("stdin");
    let log = common::cluster::Log::capture(child.stderr.take().expect("stderr"));
    let mut sb = Daemon {
        name: "standby".into(),
        child,
        log,
    };
    assert!(
        sb.log.wait_line(0, "standby ready", TIMEOUT).is_some(),
        "no standby; log:\n{}",
        sb.log.text()
    );
    stdin.write_all(b"start\n").expect("start");
    let st = sb
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("the standby did not refuse; log:\n{}", sb.log.text()));
    let log = sb.log.text();
    assert_eq!(st.code(), Some(2), "exit {st:?}; log:\n{log}");
    assert!(
        log.contains(needle)
            && log.contains("could not be started")
            && !log.contains("; serving")
            && !log.contains("forbidden syscall")
            && !log.contains("heap violation")
            && !log.contains("panicked"),
        "no {needle:?} in the log:\n{log}"
    );
}

/// Runs `cmd` to completion within `TIMEOUT` (killed after it: a client
/// must not hang on a corrupt block). Returns its status and output.
fn bounded(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = std::time::Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} hung (more than {TIMEOUT:?})");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut out = String::new();
    for p in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut p = p;
        let _ = p.read_to_string(&mut out);
    }
    (st, out)
}

/// `csnap up` in `dir`, waiting for "serving" in `dir/up.out`.
fn up(dir: &Path) -> common::Proc {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("up.out"))
        .expect("up.out");
    let child = Command::new(BIN)
        .args(["up", "--dir", s(&dir.join("up"))])
        .args(["--origin-size", "8M", "--store-size", "32M"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("up.out"))
        .stderr(out)
        .spawn()
        .expect("spawn csnap up");
    let p = common::Proc(child);
    let from = up_log(dir).matches("csnap up: serving").count();
    let start = std::time::Instant::now();
    while up_log(dir).matches("csnap up: serving").count() == from {
        assert!(
            start.elapsed() < TIMEOUT,
            "csnap up did not come up:\n{}",
            up_log(dir)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    p
}

fn up_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("up.out")).unwrap_or_default()
}

fn qemu_io(dir: &Path, export: &str, cmd: &str) -> (std::process::ExitStatus, String) {
    let url = format!(
        "nbd+unix:///{export}?socket={}",
        s(&dir.join("up").join("nbd.sock"))
    );
    bounded(Command::new("qemu-io").args(["-f", "raw", &url, "-c", cmd]))
}

fn stop_up(mut p: common::Proc) {
    kill(p.0.id(), 15);
    let start = std::time::Instant::now();
    while p.0.try_wait().expect("wait").is_none() {
        assert!(start.elapsed() < TIMEOUT, "csnap up did not stop");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The issue's scenario end to end: `csnap up`, the origin written,
/// snapshot 1, the origin overwritten, a clean stop; every leaf rewritten
/// with 200 records and a correct checksum; `csnap up` again. A `qemu-io`
/// read of snapshot 1 gets EIO at once (no crash loop, no hang), the log
/// names the block, and the origin is still served.
#[test]
fn the_issue_scenario_through_csnap_up_and_qemu_io() {
    let dir = common::fresh_dir("corrupt", "up");
    let u = up(&dir);
    let (st, out) = qemu_io(&dir, "origin", "write -P 0x11 0 8M");
    assert!(st.success(), "{out}");
    let o = csnap(&["snapshot", "create", "--dir", s(&dir.join("up")), "1"]);
    assert!(o.status.success(), "create: {}", text(&o));
    let (st, out) = qemu_io(&dir, "origin", "write -P 0x22 0 8M");
    assert!(st.success(), "{out}");
    let o = csnap(&[
        "snapshot",
        "priority",
        "--dir",
        s(&dir.join("up")),
        "1",
        "3",
    ]);
    assert!(o.status.success(), "priority: {}", text(&o));
    stop_up(u);

    let store = dir.join("up").join("store.img");
    let leaves = rewrite_leaves(&store, 200);
    assert!(leaves.len() >= 2, "{leaves:?}");
    let o = csnap(&["check", "--store", s(&store)]);
    assert_eq!(o.status.code(), Some(1), "check: {}", text(&o));

    let u = up(&dir);
    for _ in 0..2 {
        let (_, out) = qemu_io(&dir, "1", "read -P 0x11 0 64k");
        assert!(
            out.contains("Input/output error"),
            "a read behind a corrupt leaf did not get EIO: {out}"
        );
    }
    let (st, out) = qemu_io(&dir, "origin", "read -P 0x22 0 1M");
    assert!(st.success() && !out.contains("error"), "{out}");
    // The servers log through their agent: DIR/up/log/agent.log, begun
    // anew by each `csnap up`.
    let log =
        std::fs::read_to_string(dir.join("up").join("log").join("agent.log")).unwrap_or_default();
    assert!(
        log.contains("problem: b-tree leaf at block") && log.contains("exceeds its capacity"),
        "{log}"
    );
    assert_eq!(
        log.matches("problem:").count(),
        1,
        "one line per block:\n{log}"
    );
    let starts = log.matches("csnap server: started incarnation").count()
        + log.matches("csnap server: serving").count();
    assert!(
        starts <= 1,
        "a server was restarted (a crash loop?):\n{log}"
    );
    stop_up(u);
}

/// Reads one frame from a stream: the 32-byte header, then the rest.
fn read_frame(s: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    let mut f = vec![0u8; csnap_proto::HEADER_BYTES];
    s.read_exact(&mut f).expect("frame header");
    let h = csnap_proto::peek_header(&f)
        .expect("header")
        .expect("whole header");
    f.resize(h.length as usize, 0);
    s.read_exact(&mut f[csnap_proto::HEADER_BYTES..])
        .expect("frame body");
    f
}

fn write_frame(s: &mut std::os::unix::net::UnixStream, m: &csnap_proto::Msg<'_>) {
    let mut buf = vec![0u8; csnap_proto::FRAME_MAX_BYTES];
    let n = csnap_proto::encode(&csnap_proto::Header::new(0, 0), m, &mut buf).expect("encode");
    s.write_all(&buf[..n]).expect("send");
}

/// A standby started by an agent (a fake one here, speaking the protocol
/// on a unix socket) on a store whose root is corrupt tells the agent why,
/// with an `Error` (`Corrupt`, culprit `StartServer`), before it exits.
#[test]
fn a_standby_tells_its_agent_why_its_start_failed() {
    use csnap_proto::{ClientList, ErrorCode, Kind, Msg, Node, NodeList};
    let (d, _new, _rng) = populated("corrupt-agent", 1 << 20);
    rewrite_leaves(&d.store, 200);
    let agent_sock = d.dir.join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&agent_sock).expect("bind");
    let sock = d.dir.join("standby.sock");
    let mut sb = Daemon::spawn(
        "standby",
        Command::new(BIN)
            .args(["server", "--standby", "--origin", s(&d.origin)])
            .args(["--store", s(&d.store), "--listen", s(&sock)])
            .args(["--agent", s(&agent_sock), "--node", "1"]),
    );
    let (mut link, _) = listener.accept().expect("accept");
    link.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let f = read_frame(&mut link);
    assert!(
        matches!(csnap_proto::decode(&f).expect("hello").1, Msg::Hello { .. }),
        "{:?}",
        csnap_proto::decode(&f)
    );
    write_frame(
        &mut link,
        &Msg::HelloOk {
            version: csnap_proto::PROTOCOL_VERSION,
            server_id: 0,
        },
    );
    let f = read_frame(&mut link);
    assert!(
        matches!(
            csnap_proto::decode(&f).expect("ready").1,
            Msg::ServerReady { .. }
        ),
        "{:?}; log:\n{}",
        csnap_proto::decode(&f),
        sb.log.text()
    );
    let (mut nb, mut cb) = ([0u8; 64], [0u8; 64]);
    write_frame(
        &mut link,
        &Msg::StartServer {
            claim: false,
            members: NodeList::from_entries(&[Node { id: 1 }], &mut nb).expect("members"),
            expected: ClientList::from_entries(&[], &mut cb).expect("clients"),
        },
    );
    let f = read_frame(&mut link);
    match csnap_proto::decode(&f).expect("error").1 {
        Msg::Error {
            code,
            culprit,
            text,
        } => {
            assert_eq!(code, ErrorCode::Corrupt);
            assert_eq!(culprit, Kind::StartServer.code());
            assert!(text.contains("metadata is corrupt"), "{text}");
        }
        m => panic!("expected an Error, got {m:?}; log:\n{}", sb.log.text()),
    }
    let st = sb
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("the standby did not exit; log:\n{}", sb.log.text()));
    assert_eq!(st.code(), Some(2), "log:\n{}", sb.log.text());
    let log = sb.log.text();
    assert!(
        log.contains("problem: b-tree leaf at block") && !log.contains("forbidden syscall"),
        "{log}"
    );
}
