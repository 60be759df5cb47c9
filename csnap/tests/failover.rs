//! Acceptance tests of agents and failover (issue #5), all with real
//! processes: a controller (`csnap cluster run`), three agents (`csnap
//! agent`, each with its spawner and standby servers), `csnap io --agent`
//! volume clients driven through stdin/stdout, and the control commands.
//! Confinement stays on (mlock, sealed heap in abort mode, seccomp).
//!
//! - random SIGKILLs of the serving server under a mixed workload, checked
//!   against shadow copies of every volume;
//! - the ddsnap window: a read lock granted by incarnation N holds off an
//!   origin write granted by N+1;
//! - the lock policy when a client goes away without a failover;
//! - split brain: a second server on the same host, and fencing across
//!   hosts by incarnation;
//! - the failover path allocates nothing and faults no page in the agent
//!   and the standby it starts, and makes only audited syscalls.

// Test code: offsets and sizes are a few MiB at most.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{
    assert_granted, assert_same, assert_waits, csnap, held, kill, seed, send_chunk_write, serial,
    text, Cluster, ClusterOpts, Io, Rng, CHUNK, TIMEOUT,
};

/// A random byte range of a volume of `size` bytes: whole chunks, a few
/// bytes at an odd offset, or several chunks at an odd offset.
fn random_range(rng: &mut Rng, size: u64) -> (u64, u64) {
    let (off, len) = match rng.below(3) {
        0 => {
            let n = 1 + rng.below(4);
            (rng.below(size / CHUNK - n + 1) * CHUNK, n * CHUNK)
        }
        1 => (rng.below(size), 1 + rng.below(CHUNK)),
        _ => (rng.below(size), CHUNK + rng.below(4 * CHUNK)),
    };
    let off = off.min(size - 1);
    (off, len.min(size - off))
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn apply(shadow: &mut [u8], off: u64, data: &[u8]) {
    shadow[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn slice(shadow: &[u8], off: u64, len: u64) -> Vec<u8> {
    shadow[off as usize..(off + len) as usize].to_vec()
}

/// Reads all of `io`'s volume and compares it with `shadow`.
fn read_back(io: &mut Io, shadow: &[u8], what: &str) {
    let got = io.read(0, shadow.len() as u64);
    assert_same(what, &got, shadow);
}

/// Test 1: Random SIGKILLs of the serving server while five clients on three
/// nodes do I/O: two origin writers, two snapshot readers (each its own
/// snapshot) and a snapshot writer. Every reply must be `ok` (the failover
/// is invisible to the volume's user), every read must match the shadow
/// copies, and after every round every volume is read back in full.
/// Between rounds snapshots are created (no write in flight: the harness
/// has every reply) and old ones deleted; a reader moves to a newer
/// snapshot now and then. Twice, the standby the controller would pick is
/// killed too, so the server also lands on the third node. At the end,
/// with everything stopped, `csnap check` finds the store clean.
#[test]
fn random_sigkills_under_a_mixed_workload_lose_no_io_and_no_data() {
    let _serial = serial();
    let mut rng = Rng::new(seed("random_sigkills"));
    let mut c = Cluster::start("kills", ClusterOpts::default(), &mut rng);
    let size = c.initial.len() as u64;
    let mut origin = c.initial.clone();
    let mut snaps: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let replies = Arc::new(AtomicUsize::new(0));
    let r = || Some(Arc::clone(&replies));

    // The first client's demand places the server.
    let mut w1 = c.io_counted("origin", 101, 1, r());
    let mut w2 = c.io_counted("origin", 102, 2, r());
    // Three snapshots, each of a different origin.
    for tag in 1..=3u32 {
        c.create(tag);
        snaps.insert(tag, origin.clone());
        let (off, len) = random_range(&mut rng, size);
        let data = rng.bytes(len as usize);
        w1.write(off, &data);
        apply(&mut origin, off, &data);
    }
    let mut r1 = c.io_counted("1", 201, 2, r());
    let mut r2 = c.io_counted("2", 202, 3, r());
    let mut sw = c.io_counted("3", 301, 1, r());
    let (mut r2_tag, mut r2_id) = (2u32, 202u64);

    const ROUNDS: u32 = 10;
    const PER_CLIENT: usize = 16;
    let mut nodes_served = BTreeSet::new();
    let mut outstanding_at_kill = Vec::new();
    for round in 0..ROUNDS {
        let before = replies.load(Ordering::SeqCst);
        // The batch: origin writes of two clients on disjoint ranges (the
        // result must not depend on how they interleave), snapshot reads
        // checked against the shadows, and the snapshot writer's writes and
        // reads in its own order.
        let mut w1_ranges = Vec::new();
        for _ in 0..PER_CLIENT {
            let (off, len) = random_range(&mut rng, size);
            let data = rng.bytes(len as usize);
            w1.send_write(off, &data);
            apply(&mut origin, off, &data);
            w1_ranges.push((off, len));
        }
        for _ in 0..PER_CLIENT {
            let (off, len) = loop {
                let x = random_range(&mut rng, size);
                if !w1_ranges.iter().any(|&y| overlaps(x, y)) {
                    break x;
                }
            };
            let data = rng.bytes(len as usize);
            w2.send_write(off, &data);
            apply(&mut origin, off, &data);
        }
        for (io, tag) in [(&mut r1, 1u32), (&mut r2, r2_tag)] {
            for _ in 0..PER_CLIENT {
                let (off, len) = random_range(&mut rng, size);
                io.send_read(off, len, Some(slice(&snaps[&tag], off, len)));
            }
        }
        for _ in 0..PER_CLIENT {
            let (off, len) = random_range(&mut rng, size);
            if rng.below(2) == 0 {
                let data = rng.bytes(len as usize);
                sw.send_write(off, &data);
                apply(snaps.get_mut(&3).expect("snapshot 3"), off, &data);
            } else {
                sw.send_read(off, len, Some(slice(&snaps[&3], off, len)));
            }
        }
        let total = 5 * PER_CLIENT;
        // Twice: the standby the controller would pick next dies first, so
        // the server goes to another node.
        let st = c.status();
        if round == 2 || round == 5 {
            let next = st
                .nodes
                .iter()
                .find(|n| n.node != st.node && n.standby)
                .map(|n| n.node)
                .expect("a standby");
            for p in c.standby_pids(next) {
                kill(p, libc::SIGKILL);
            }
        }
        // SIGKILL the server at a random moment during the batch: after a
        // random number of the batch's replies came in.
        let (inc, node) = (st.incarnation, st.node);
        let pid = Cluster::server_pid(&st.addr);
        let at = 3 + rng.below(total as u64 - 6) as usize;
        common::cluster::wait_for("the batch progresses", TIMEOUT, || {
            (replies.load(Ordering::SeqCst) - before >= at).then_some(())
        });
        kill(pid, libc::SIGKILL);
        outstanding_at_kill.push(total - (replies.load(Ordering::SeqCst) - before));
        nodes_served.insert(node);
        // Every reply: ok, and reads as the shadow says.
        for io in [&mut w1, &mut w2, &mut r1, &mut r2, &mut sw] {
            io.finish_all();
        }
        let st = c.wait_serving_above(inc);
        nodes_served.insert(st.node);
        // The next round starts with every node's standby back.
        c.wait_all_ready();
        // Every volume in full.
        read_back(&mut w1, &origin, &format!("round {round}: origin"));
        read_back(&mut r1, &snaps[&1], &format!("round {round}: snapshot 1"));
        read_back(
            &mut r2,
            &snaps[&r2_tag],
            &format!("round {round}: snapshot {r2_tag}"),
        );
        read_back(&mut sw, &snaps[&3], &format!("round {round}: snapshot 3"));
        // Between rounds: a new snapshot of the origin as it is now...
        // Tags 1 to 3 exist; round R creates tag 4 + R.
        let next_tag = 4 + round;
        c.create(next_tag);
        snaps.insert(next_tag, origin.clone());
        // ...the second reader moves to it now and then...
        if round % 3 == 1 {
            r2.quit();
            r2_id += 1;
            r2_tag = next_tag;
            r2 = c.io_counted(&r2_tag.to_string(), r2_id, 3, r());
            read_back(
                &mut r2,
                &snaps[&r2_tag],
                &format!("round {round}: new reader on {r2_tag}"),
            );
        }
        // ...and an old one no client has open goes.
        if round % 2 == 1 {
            let open = [1u32, 3, r2_tag];
            let victim = snaps.keys().copied().find(|t| !open.contains(t));
            if let Some(tag) = victim {
                // A client that just quit may still be detaching.
                let start = Instant::now();
                loop {
                    let o = c.snapshot("delete", tag);
                    if o.status.success() {
                        break;
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(5),
                        "snapshot delete {tag}: {}",
                        text(&o)
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                snaps.remove(&tag);
            }
        }
        eprintln!(
            "round {round}: killed incarnation {inc} on node {node} with {} of {total} replies outstanding; incarnation {} on node {} serves; snapshots {:?}",
            outstanding_at_kill[round as usize],
            st.incarnation,
            st.node,
            snaps.keys().collect::<Vec<_>>()
        );
    }
    // The kills landed mid-batch (not after it): the harness's own check.
    let mid = outstanding_at_kill.iter().filter(|&&n| n > 0).count();
    assert!(
        mid * 2 >= ROUNDS as usize,
        "only {mid} of {ROUNDS} kills had replies outstanding: {outstanding_at_kill:?}"
    );
    assert!(
        nodes_served.len() == 3,
        "the server ran on every node: {nodes_served:?}"
    );
    for io in [w1, w2, r1, r2, sw] {
        io.quit();
    }
    c.stop();
    let o = csnap(&["check", "--store", common::cluster::s(&c.store)]);
    assert!(o.status.success(), "csnap check: {}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("clean"),
        "{}",
        text(&o)
    );
}

/// Test 2: The ddsnap window. A snapshot reader holds a read lock granted by
/// incarnation N on an origin chunk; N is SIGKILLed; once N+1 serves and
/// the reader has re-attached (its idle check re-uploads the held lock), an
/// origin write to that chunk must wait: not answered within a second. A
/// write to a chunk no lock covers goes at once (the control, which also
/// shows the recovery barrier has lifted). `unhold` releases the lock and
/// the write is answered promptly; the snapshot still reads the chunk as it
/// was. Then the variant: a new hold, a new kill, and instead of `unhold`
/// the reader's node leaves the cluster: the write proceeds.
#[test]
fn a_read_lock_from_incarnation_n_holds_off_an_origin_write_granted_by_n_plus_1() {
    let _serial = serial();
    let mut rng = Rng::new(seed("ddsnap_window"));
    let c = Cluster::start("window", ClusterOpts::default(), &mut rng);
    let mut w = c.io("origin", 11, 1);
    c.create(1);
    let mut r = c.io("1", 31, 3);

    // Unhold.
    let held_chunk = 5u64;
    let k = held(&r.call(&format!("hold {} {}", held_chunk * CHUNK + 10, 100)));
    assert!(k >= 1, "the chunk is on the origin: a read lock is held");
    let (inc, node, _) = c.kill_server();
    let st = c.wait_serving_above(inc);
    assert_ne!(st.node, node);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    send_chunk_write(&mut w, &mut rng, 40);
    let d = assert_granted(&mut w, t, "to a chunk no lock covers");
    eprintln!(
        "incarnation {}: unlocked write answered in {d:?}",
        st.incarnation
    );
    send_chunk_write(&mut w, &mut rng, held_chunk);
    assert_waits(
        &mut w,
        "while incarnation N's read lock is held (the ddsnap window)",
    );
    let released = r.call("unhold");
    assert_eq!(released, format!("ok released {k}"));
    let d = assert_granted(&mut w, Instant::now(), "after unhold");
    eprintln!("write answered {d:?} after the unhold");
    let snap = r.read(held_chunk * CHUNK, CHUNK);
    let at = (held_chunk * CHUNK) as usize;
    assert_same(
        "snapshot 1, the held chunk",
        &snap,
        &c.initial[at..at + CHUNK as usize],
    );

    // The reader's node leaves instead.
    let held_chunk = 9u64;
    let k = held(&r.call(&format!("hold {} {}", held_chunk * CHUNK, 2 * CHUNK)));
    assert_eq!(k, 2);
    let (inc, _, _) = c.kill_server();
    let st = c.wait_serving_above(inc);
    assert_ne!(st.node, 3, "the reader's node does not serve");
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    send_chunk_write(&mut w, &mut rng, 41);
    assert_granted(&mut w, t, "to a chunk no lock covers");
    send_chunk_write(&mut w, &mut rng, held_chunk + 1);
    assert_waits(
        &mut w,
        "while incarnation N's read lock is held (the ddsnap window)",
    );
    let t = Instant::now();
    let o = c.cluster_cmd("leave", &["3"]);
    assert!(o.status.success(), "cluster leave 3: {}", text(&o));
    let d = assert_granted(&mut w, t, "after the reader's node left");
    eprintln!("write answered {d:?} after the reader's node left");
}

/// `read locks: N` of `csnap status` at the serving server.
fn server_read_locks(c: &Cluster) -> u64 {
    let st = c.status();
    let o = csnap(&["status", "--server", &st.addr]);
    assert!(o.status.success(), "status: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.lines()
        .find_map(|l| l.strip_prefix("read locks: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no read locks in {out}"))
}

/// Test 3: The lock policy when a snapshot client goes away, no failover
/// involved. What the server does (`Server::handle_disconnect`,
/// `handle_client_gone`, `handle_node_left` in `fsm/src/server/mod.rs`):
///
/// - a snapshot client whose *server connection* closes while its node is
///   a member keeps its read locks, parked under its client id: it may be
///   alive and reading the origin under them (its connection broke, or its
///   server died, which test 2 covers), and it re-uploads them when it
///   re-attaches. Writes to those chunks wait;
/// - the agent of its node reports the client gone (`ClientGone`) when the
///   client's *agent link* closes, i.e. its process is gone: the parked
///   locks are released. So killing a client process releases its locks
///   within the time the report takes;
/// - its node leaving the cluster releases them too (parked or connected).
///
/// Here: (a) a `csnap io` reader holding a lock is SIGKILLed: the write
/// waiting for it proceeds promptly. (b) Two readers in this test process
/// keep their agent links and drop only their server connections: writes
/// to their chunks keep waiting (parked, counted by `csnap status`); one
/// reader's agent link then closes: its write proceeds, the other still
/// waits; the readers' node leaves: that one proceeds too.
#[test]
fn a_gone_client_releases_its_locks_and_a_disconnected_one_keeps_them_until_its_node_leaves() {
    let _serial = serial();
    let mut rng = Rng::new(seed("lock_policy"));
    let c = Cluster::start("policy", ClusterOpts::default(), &mut rng);
    let mut w1 = c.io("origin", 11, 1);
    let mut w2 = c.io("origin", 12, 2);
    c.create(1);
    let inc = c.status().incarnation;

    // (a) The reader's process is killed.
    let mut r = c.io("1", 31, 3);
    assert_eq!(held(&r.call(&format!("hold {} 1", 3 * CHUNK))), 1);
    send_chunk_write(&mut w1, &mut rng, 3);
    assert_waits(&mut w1, "while a live reader holds the chunk's read lock");
    let t = Instant::now();
    r.kill();
    let d = assert_granted(
        &mut w1,
        t,
        "after the reader's process was killed (ClientGone)",
    );
    eprintln!("(a) the write was answered {d:?} after the reader was killed");
    assert_eq!(server_read_locks(&c), 0);

    // (b) Two readers keep their agent links, drop their server links.
    let (origin, store) = (&c.origin, &c.store);
    let mut agents = Vec::new();
    let mut vols = Vec::new();
    for (id, chunk) in [(32u64, 5u64), (33, 6)] {
        let mut a = csnap_io::client::AgentClient::new(
            &c.agent_sock(3),
            id,
            3,
            Some(csnap_proto::Volume::Snapshot(1)),
        );
        let info = a
            .need_server(0, Instant::now() + TIMEOUT)
            .expect("the agent gives the server's address");
        assert_eq!(info.incarnation, inc);
        let mut v = csnap_io::client::VolumeClient::open(
            &info.addr,
            origin,
            store,
            csnap_proto::Volume::Snapshot(1),
            id,
            3,
        )
        .expect("attach snapshot 1");
        let got = v.hold_read(chunk * CHUNK, 1).expect("hold");
        assert_eq!(got.iter().map(|x| x.chunks).sum::<u32>(), 1);
        agents.push(a);
        vols.push(v);
    }
    send_chunk_write(&mut w1, &mut rng, 5);
    send_chunk_write(&mut w2, &mut rng, 6);
    drop(vols);
    assert_waits(
        &mut w1,
        "while its reader's node is a member (locks parked)",
    );
    assert!(
        w2.try_reply(Duration::ZERO).is_none(),
        "parked locks hold the write"
    );
    assert_eq!(server_read_locks(&c), 2, "both readers' locks are parked");
    // Reader 33's process is gone, as far as its agent knows.
    let t = Instant::now();
    drop(agents.pop());
    let d = assert_granted(
        &mut w2,
        t,
        "after its reader's agent link closed (ClientGone)",
    );
    eprintln!("(b) the write was answered {d:?} after its reader's agent link closed");
    assert!(
        w1.try_reply(Duration::from_millis(200)).is_none(),
        "the other reader's parked lock still holds its write"
    );
    // The readers' node leaves.
    let t = Instant::now();
    let o = c.cluster_cmd("leave", &["3"]);
    assert!(o.status.success(), "cluster leave 3: {}", text(&o));
    let d = assert_granted(&mut w1, t, "after its reader's node left");
    eprintln!("(b) the write was answered {d:?} after the readers' node left");
    assert_eq!(server_read_locks(&c), 0);
    assert_eq!(c.status().incarnation, inc, "no failover in this test");
    drop(agents);
}

/// SHA-free fingerprint of a file: its bytes (the stores here are small).
fn file_bytes(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Test 4a: A second server started on the same host against the store the
/// cluster serves never serves: it exits non-zero with the "in use"
/// message and writes nothing (the store file is byte for byte the same;
/// the cluster's server still commits, so its incarnation still owns the
/// store).
#[test]
fn a_second_server_on_the_same_host_is_refused_and_writes_nothing() {
    let _serial = serial();
    let mut rng = Rng::new(seed("second_server"));
    let c = Cluster::start(
        "second",
        ClusterOpts {
            nodes: 1,
            store_size: "48M",
            ..ClusterOpts::default()
        },
        &mut rng,
    );
    let mut w = c.io("origin", 11, 1);
    let data = rng.bytes(3 * CHUNK as usize + 17);
    w.write(1000, &data);
    let st = c.status();
    let before = file_bytes(&c.store);
    let sock = c.dir.join("second.sock");
    let o = csnap(&[
        "server",
        "--origin",
        common::cluster::s(&c.origin),
        "--store",
        common::cluster::s(&c.store),
        "--listen",
        common::cluster::s(&sock),
    ]);
    assert!(
        !o.status.success(),
        "the second server must not serve: {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use"),
        "{}",
        text(&o)
    );
    assert!(
        file_bytes(&c.store) == before,
        "the refused server wrote to the store"
    );
    // The cluster's server still owns the store: its next commit passes the
    // fence check.
    let more = rng.bytes(CHUNK as usize);
    w.write(50 * CHUNK, &more);
    let st2 = c.status();
    assert_eq!((st2.incarnation, st2.node), (st.incarnation, st.node));
    let o = csnap(&["status", "--server", &st.addr]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("incarnation: {}", st.incarnation)),
        "{}",
        text(&o)
    );
}

/// Connects to `addr`, says Hello (control role), returns the stream and
/// the server's `HelloOk` frame.
fn raw_hello(addr: &std::path::Path) -> (std::os::unix::net::UnixStream, Vec<u8>) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = vec![0u8; csnap_proto::FRAME_MAX_BYTES];
    let n = csnap_proto::encode(
        &csnap_proto::Header::new(1, 0),
        &csnap_proto::Msg::Hello {
            version_min: csnap_proto::PROTOCOL_VERSION,
            version_max: csnap_proto::PROTOCOL_VERSION,
            role: csnap_proto::Role::Control,
        },
        &mut buf,
    )
    .expect("encode");
    s.write_all(&buf[..n]).expect("send Hello");
    let f = read_frame(&mut s);
    assert!(
        matches!(
            csnap_proto::decode(&f),
            Ok((_, csnap_proto::Msg::HelloOk { .. }))
        ),
        "HelloOk expected"
    );
    (s, f)
}

/// One frame from `s` (header first, then the rest of its length).
fn read_frame(s: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    try_read_frame(s).expect("a frame")
}

/// One frame from `s`, or `None` if the stream ends (or fails) first.
fn try_read_frame(s: &mut std::os::unix::net::UnixStream) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = vec![0u8; csnap_proto::HEADER_BYTES];
    s.read_exact(&mut f).ok()?;
    let h = csnap_proto::peek_header(&f).ok()??;
    f.resize(h.length as usize, 0);
    s.read_exact(&mut f[csnap_proto::HEADER_BYTES..]).ok()?;
    Some(f)
}

fn frame_incarnation(f: &[u8]) -> u64 {
    csnap_proto::decode(f).expect("frame").0.incarnation
}

/// Test 4b: Fencing across hosts, simulated with `--no-host-lock` (each server
/// skips the host-local lock, as servers on two hosts would). Server A
/// serves a client; A is stopped (SIGSTOP); server B starts on the same
/// store, takes the next incarnation and serves a write; A is continued.
/// A must not serve again: the write its client sends next is refused
/// (StaleIncarnation), A writes nothing and exits with the "fenced"
/// message (exit 1, no heap violation on the way out). A client state
/// machine that has seen B's incarnation refuses A's replies, both A's
/// HelloOk from before the pause and A's answer after it.
#[test]
fn fencing_across_hosts_stops_the_older_incarnation() {
    use csnap_fsm::client::{ClientConfig, ClientEvent, ClientFsm};
    use std::io::Write;
    use std::process::Command;

    let _serial = serial();
    let mut rng = Rng::new(seed("fencing"));
    let d = common::cluster::Disks::new("fence", 2 << 20, "48M", &mut rng);
    let server = |name: &str, sock: &std::path::Path| {
        let mut s = common::cluster::Daemon::spawn(
            name,
            Command::new(common::cluster::BIN)
                .args(["server", "--no-host-lock", "--origin"])
                .arg(&d.origin)
                .arg("--store")
                .arg(&d.store)
                .arg("--listen")
                .arg(sock),
        );
        assert!(
            s.log.wait_line(0, "serving", TIMEOUT).is_some(),
            "{name} did not start:\n{}",
            s.log.text()
        );
        assert!(s.exited().is_none());
        s
    };
    let (sa, sb) = (d.dir.join("a.sock"), d.dir.join("b.sock"));
    let mut a = server("server A", &sa);
    let mut ca = d.io_server(&sa, "origin", 1);
    let first = rng.bytes(2 * CHUNK as usize);
    ca.write(0, &first);
    let (mut raw_a, a_hello) = raw_hello(&sa);
    let inc_a = frame_incarnation(&a_hello);

    kill(a.pid(), libc::SIGSTOP);
    let b = server("server B", &sb);
    let mut cb = d.io_server(&sb, "origin", 2);
    let second = rng.bytes(CHUNK as usize);
    cb.write(CHUNK, &second);
    let (_raw_b, b_hello) = raw_hello(&sb);
    let inc_b = frame_incarnation(&b_hello);
    // B, started by hand, claimed the store first (two above A), waited
    // out A's lease, then took the next incarnation.
    assert_eq!(
        inc_b,
        inc_a + 3,
        "B claimed, then took the next incarnation"
    );
    // No extra pause: B's claim waited longer than A's lease
    // (SERVER_TAKEOVER_WAIT_MS > SERVER_LEASE_MS), so A, continued now,
    // reads the fence before it answers or writes anything.
    kill(a.pid(), libc::SIGCONT);
    // A's client writes where B's client wrote: A must refuse.
    let third = rng.bytes(CHUNK as usize);
    common::cluster::assert_write_refused_as_stale(&mut ca, CHUNK, &third, &a, &b);
    // A raw request to A after the pause: A's answer (if any comes before
    // it exits) carries A's old incarnation.
    let mut buf = vec![0u8; 512];
    let n = csnap_proto::encode(
        &csnap_proto::Header::new(2, 0),
        &csnap_proto::Msg::Status,
        &mut buf,
    )
    .expect("encode");
    let a_late = raw_a
        .write_all(&buf[..n])
        .ok()
        .and_then(|()| try_read_frame(&mut raw_a));
    common::cluster::assert_exits_fenced(&mut a);
    // Nothing of A's refused write reached the origin; B's data is there.
    assert_same("B's write", &cb.read(CHUNK, CHUNK), &second);
    assert_same(
        "A's write before B",
        &cb.read(0, CHUNK),
        &first[..CHUNK as usize],
    );

    // A client that has seen B's incarnation refuses A's replies.
    let mut fsm = ClientFsm::new(ClientConfig {
        client_id: 0,
        node_id: 0,
        role: csnap_proto::Role::Control,
        volume: csnap_proto::Volume::Origin,
        origin_uuid: [0; 16],
        caching: false,
    });
    fsm.handle_connect();
    let mut s = std::os::unix::net::UnixStream::connect(&sb).expect("connect B");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(fsm.transmit()).expect("Hello to B");
    let n = fsm.transmit().len();
    fsm.consume_transmit(n);
    let from_b = read_frame(&mut s);
    assert_eq!(fsm.handle_frame(&from_b), ClientEvent::Ready);
    assert_eq!(fsm.incarnation(), inc_b);
    assert_eq!(
        fsm.handle_frame(&a_hello),
        ClientEvent::Stale,
        "A's HelloOk"
    );
    if let Some(f) = a_late {
        assert_eq!(frame_incarnation(&f), inc_a);
        assert_eq!(fsm.handle_frame(&f), ClientEvent::Stale, "A's late answer");
    }
    drop(b);
}

/// One I/O on every client; each must be answered `ok` (by the incarnation
/// now serving: the only one alive). Origin writes go to chunks 10 and up
/// (the callers hold read locks below).
fn serve_everyone(ios: &mut [&mut Io], rng: &mut Rng) {
    for io in ios.iter_mut() {
        if io.name.contains("[origin") {
            let chunk = 10 + rng.below(60);
            send_chunk_write(io, rng, chunk);
        } else {
            io.send_read(rng.below(60) * CHUNK + 5, 3 * CHUNK, None);
        }
    }
    for io in ios.iter_mut() {
        io.finish();
    }
}

/// Every live process of the cluster's failover path: the agents and the
/// standbys (pid, what).
fn failover_processes(c: &Cluster, nodes: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for n in 1..=nodes {
        v.push((c.agent_pid(n), format!("agent {n}")));
        for p in c.standby_pids(n) {
            v.push((p, format!("node {n} server pid {p}")));
        }
    }
    v
}

/// Test 5a: The failover path faults no page and allocates nothing, on the
/// shipped binary with confinement on. Heap sealed in abort mode: an
/// allocation in any agent or standby kills it (with "heap violation"),
/// so every process surviving is the allocation half of the proof. Page
/// faults: `/proc/PID/stat` (minflt, majflt) of every agent and standby,
/// read before the serving server is SIGKILLed and again once every client
/// was served by the new incarnation and the starting node has its next
/// standby: the deltas must be 0. Three failovers, each to another node.
#[test]
fn the_failover_path_faults_no_page_and_allocates_nothing() {
    let _serial = serial();
    let mut rng = Rng::new(seed("failover_faults"));
    let mut c = Cluster::start("faults", ClusterOpts::default(), &mut rng);
    let mut w = c.io("origin", 11, 1);
    c.create(1);
    let mut r = c.io("1", 31, 3);
    let mut sw = c.io("1", 21, 2);
    assert_eq!(held(&r.call(&format!("hold {} 100", 7 * CHUNK))), 1);
    // Warm-up: every path once.
    serve_everyone(&mut [&mut w, &mut r, &mut sw], &mut rng);
    let mut nodes = BTreeSet::new();
    for round in 0..3 {
        let st = c.wait_all_ready();
        let serving = Cluster::server_pid(&st.addr);
        let procs: Vec<(u32, String)> = failover_processes(&c, 3)
            .into_iter()
            .filter(|(p, _)| *p != serving)
            .collect();
        let before: Vec<(u64, u64)> = procs
            .iter()
            .map(|(p, _)| common::cluster::faults(*p))
            .collect();
        // The counters are read right: every process faulted in its init.
        assert!(before.iter().all(|f| f.0 > 100), "{before:?}");
        kill(serving, libc::SIGKILL);
        let now = c.wait_serving_above(st.incarnation);
        serve_everyone(&mut [&mut w, &mut r, &mut sw], &mut rng);
        let after_st = c.wait_all_ready();
        assert_eq!(after_st.incarnation, now.incarnation, "one failover");
        nodes.insert(now.node);
        let started = Cluster::server_pid(&now.addr);
        assert!(
            procs.iter().any(|(p, _)| *p == started),
            "the new server is one of the measured standbys"
        );
        let mut report = Vec::new();
        for ((pid, what), b) in procs.iter().zip(&before) {
            let alive = common::cluster::cmdline(*pid);
            assert!(
                !alive.is_empty(),
                "{what} died during the failover (a heap violation kills it):\n{}",
                c.logs(40)
            );
            let a = common::cluster::faults(*pid);
            report.push(format!(
                "{what}{}: minor +{} major +{}",
                if *pid == started { " (started)" } else { "" },
                a.0 - b.0,
                a.1 - b.1
            ));
        }
        eprintln!(
            "failover {round} (incarnation {} on node {} -> {} on node {}):\n  {}",
            st.incarnation,
            st.node,
            now.incarnation,
            now.node,
            report.join("\n  ")
        );
        for ((_, what), (b, pid)) in procs
            .iter()
            .zip(before.iter().zip(procs.iter().map(|p| p.0)))
        {
            let a = common::cluster::faults(pid);
            assert_eq!(
                (a.0 - b.0, a.1 - b.1),
                (0, 0),
                "{what} page-faulted on the failover path"
            );
        }
    }
    assert!(
        nodes.len() >= 2,
        "the server moved between nodes: {nodes:?}"
    );
    let all = c.logs(100_000);
    assert!(!all.contains("heap violation"), "{all}");
    assert!(!all.contains("forbidden syscall"), "{all}");
    r.call("unhold");
    c.stop();
}

/// Test 5b: The failover path makes only the syscalls of its phases, on the
/// shipped binary under its seccomp filters (strace works with them). Node
/// 2's agent runs under `strace -f -ff` (its spawner and standbys too).
/// The server starts on node 1 and is SIGKILLed; the controller places it
/// on node 2 (the lowest other member with a standby), whose agent gathers,
/// starts its standby and announces it; every client is served by it; its
/// next standby comes up. Then, per thread, every syscall after its filter
/// install must be in its table: the agent's against `AGENT`; the started
/// standby's main thread against `standby_network()` until its serving
/// filter and `SERVING_NETWORK` after; its store worker against
/// `SERVING_STORE`; the standbys that never start against
/// `standby_network()`. (Which rules the agent never uses is checked by
/// the agent audit in `tests/audit.rs`.)
#[test]
fn the_failover_path_makes_only_audited_syscalls() {
    let _serial = serial();
    common::cluster::require_strace();
    let mut rng = Rng::new(seed("failover_syscalls"));
    let trace_dir = std::env::temp_dir().join(format!("csnap-fo-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&trace_dir);
    std::fs::create_dir_all(&trace_dir).expect("trace dir");
    let prefix = trace_dir.join("t");
    let mut c = Cluster::start(
        "syscalls",
        ClusterOpts {
            agent_wrapper: Some((2, common::cluster::strace_wrapper(&prefix))),
            ..ClusterOpts::default()
        },
        &mut rng,
    );
    let mut w = c.io("origin", 11, 1);
    let st = c.status();
    assert_eq!(st.node, 1, "the first server goes to node 1");
    c.create(1);
    let mut r = c.io("1", 31, 3);
    let mut sw = c.io("1", 21, 2);
    assert_eq!(held(&r.call(&format!("hold {} 100", 7 * CHUNK))), 1);
    serve_everyone(&mut [&mut w, &mut r, &mut sw], &mut rng);
    let st = c.wait_all_ready();
    let (inc, _, _) = c.kill_server();
    let now = c.wait_serving_above(inc);
    assert_eq!(now.node, 2, "the traced node takes over");
    serve_everyone(&mut [&mut w, &mut r, &mut sw], &mut rng);
    r.call("unhold");
    serve_everyone(&mut [&mut w, &mut r, &mut sw], &mut rng);
    c.wait_all_ready();
    let started = Cluster::server_pid(&now.addr);
    let _ = st;
    c.stop();

    let traces = common::cluster::read_traces(&prefix);
    let mut problems = Vec::new();
    let mut report = Vec::new();
    let mut seen_agent = false;
    let mut seen_started = (false, false);
    for t in traces.values() {
        let phases = t.phases();
        if t.runs("agent") {
            if phases.is_empty() {
                continue; // a child between fork and exec, or unconfined
            }
            assert!(!t.thread, "the agent is single-threaded");
            seen_agent = true;
            report.push(format!("agent {}: {:?}", t.tid, phases));
            problems.extend(common::cluster::audit(
                "agent",
                &phases[0],
                csnap_audit::AGENT,
                false,
            ));
            assert_eq!(phases.len(), 1, "the agent installs one filter");
        } else if t.runs("server") {
            let pid = if t.thread {
                t.parent.unwrap_or(0)
            } else {
                t.tid
            };
            let role = if t.name == "csnap-store" {
                "store worker"
            } else {
                "main"
            };
            report.push(format!("server {pid} {role} {}: {:?}", t.tid, phases));
            if t.name == "csnap-store" {
                for p in &phases {
                    problems.extend(common::cluster::audit(
                        "store worker",
                        p,
                        csnap_audit::SERVING_STORE,
                        false,
                    ));
                }
                if pid == started {
                    seen_started.1 = true;
                }
            } else if !phases.is_empty() {
                let standby = csnap_audit::standby_network();
                problems.extend(common::cluster::audit(
                    "standby", &phases[0], &standby, false,
                ));
                if let Some(p) = phases.get(1) {
                    problems.extend(common::cluster::audit(
                        "serving",
                        p,
                        csnap_audit::SERVING_NETWORK,
                        false,
                    ));
                }
                if pid == started {
                    assert_eq!(phases.len(), 2, "the started server installed both filters");
                    seen_started.0 = true;
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        seen_agent,
        "the traced agent's confined phase is in the trace"
    );
    assert_eq!(
        seen_started,
        (true, true),
        "the started server's threads are in the trace"
    );
    assert!(
        problems.is_empty(),
        "syscall audit failed:\n{}",
        problems.join("\n")
    );
    let _ = std::fs::remove_dir_all(&trace_dir);
}

/// The crash-loop breaker (#15): a server that dies again and again (here
/// SIGKILLed each time it serves, as a poison request would kill it) makes
/// the controller mark the store failed after the third death within the
/// window. No further incarnation is taken, `cluster status` says why, a
/// client waiting for a server gets an error within its failover timeout
/// instead of waiting forever, and `clear-failed` brings a server back.
#[test]
fn repeated_server_deaths_mark_the_store_failed_and_clients_get_an_error() {
    let mut rng = Rng::new(0x15);
    let opts = ClusterOpts {
        controller_args: Vec::new(),
        ..ClusterOpts::default()
    };
    let c = Cluster::start("breaker", opts, &mut rng);
    let io_args = |id: u64| {
        let mut a = c.io_args("origin", id, 1);
        a.extend(["--failover-timeout-ms", "2000"].map(std::ffi::OsString::from));
        a
    };
    let mut io = Io::start("io 1", &io_args(901), &c.dir, None);
    io.write(0, &[0xa1; 4096]);
    let mut last = 0;
    for _ in 0..3 {
        last = c.wait_serving_above(last).incarnation;
        c.kill_server();
    }
    assert_marked_failed_after_3(&c);
    // The client's next write fails within seconds, not never.
    let t = Instant::now();
    io.send_write(4096, &[0xa2; 4096]);
    let (_, line) = io
        .try_reply(Duration::from_secs(30))
        .expect("the write was answered");
    assert!(line.starts_with("error"), "{line}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    drop(io);
    // No incarnation was taken meanwhile.
    let st = c.status();
    assert_eq!((st.incarnation, st.failed), (0, 3), "{st:?}");
    let o = c.cluster_cmd("start", &["2"]);
    assert!(!o.status.success(), "start while failed: {}", text(&o));
    // Cleared: a server serves again and I/O goes on.
    let o = c.cluster_cmd("clear-failed", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let st = c.wait_serving_above(last);
    assert_eq!(st.failed, 0);
    let mut io = Io::start("io 2", &io_args(902), &c.dir, None);
    io.write(4096, &[0xa3; 4096]);
    assert_eq!(io.read(0, 4096), vec![0xa1; 4096]);
    io.quit();
}

/// A poison request (#15): a blocking client's request that is at the
/// server through `REQUEST_SERVER_DEATHS_MAX` (3) consecutive server deaths
/// is failed to its caller with an error naming why, instead of being
/// re-sent to server after server. The origin write waits on a snapshot
/// reader's held lock, so it is at the server at every kill; the
/// controller's breaker is off (the default here), so the bound that acts
/// is the request's own. After two deaths the write is still waiting (it
/// was re-sent); after the third it fails, and the client goes on.
#[test]
fn a_request_in_flight_across_three_server_deaths_fails_instead_of_being_resent() {
    let _serial = serial();
    let mut rng = Rng::new(seed("poison_request"));
    let c = Cluster::start("poison", ClusterOpts::default(), &mut rng);
    let mut w = c.io("origin", 11, 1);
    c.create(1);
    let mut r = c.io("1", 31, 3);
    let held_chunk = 5u64;
    let k = held(&r.call(&format!("hold {} {}", held_chunk * CHUNK, 100)));
    assert!(k >= 1, "the chunk is on the origin: a read lock is held");
    send_chunk_write(&mut w, &mut rng, held_chunk);
    assert_waits(&mut w, "while the read lock is held");
    for death in 1..=3 {
        let (inc, _, _) = c.kill_server();
        c.wait_serving_above(inc);
        if death < 3 {
            // Re-sent to the new server, where it waits on the re-uploaded
            // lock (or at the recovery barrier) again.
            assert_waits(
                &mut w,
                &format!("after death {death}: re-sent, waiting again"),
            );
        }
    }
    let (_, line) = w
        .try_reply(Duration::from_secs(20))
        .expect("the write was answered after the third death");
    assert!(
        line.starts_with("error") && line.contains("3 consecutive server deaths"),
        "{line}"
    );
    drop(w);
    // Nothing else is lost: the reader lets go, and a new writer's write to
    // the same chunk is granted.
    assert_eq!(r.call("unhold"), format!("ok released {k}"));
    let mut w = c.io("origin", 12, 1);
    let t = Instant::now();
    send_chunk_write(&mut w, &mut rng, held_chunk);
    assert_granted(&mut w, t, "after the poison request failed");
    w.quit();
    r.quit();
}

/// Waits until the store is marked failed after 3 deaths, and `cluster
/// status` says so.
fn assert_marked_failed_after_3(c: &Cluster) {
    let st = c.wait("the store is marked failed", |st| st.failed > 0);
    assert_eq!(st.failed, 3, "{st:?}");
    let o = c.cluster_cmd("status", &[]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("store: FAILED after 3 server deaths"),
        "{}",
        text(&o)
    );
}

/// The crash-loop breaker survives a controller restart (#15): the agents
/// count their own servers' deaths within the window and report the count
/// when they join the new controller, which starts its breaker from it. Two
/// deaths, a controller killed and started again, one more death: the store
/// is marked failed, as it would be without the restart. (Before the
/// agents counted, the restart reset the count and the loop went on.)
#[test]
fn the_crash_loop_breaker_survives_a_controller_restart() {
    let mut rng = Rng::new(0x15c);
    let opts = ClusterOpts {
        controller_args: Vec::new(),
        ..ClusterOpts::default()
    };
    let mut c = Cluster::start("breaker-restart", opts, &mut rng);
    let mut io_args = c.io_args("origin", 911, 1);
    io_args.extend(["--failover-timeout-ms", "2000"].map(std::ffi::OsString::from));
    let mut io = Io::start("io 1", &io_args, &c.dir, None);
    io.write(0, &[0xb1; 4096]);
    let mut last = 0;
    for _ in 0..2 {
        last = c.wait_serving_above(last).incarnation;
        c.kill_server();
    }
    last = c.wait_serving_above(last).incarnation;
    assert_eq!(c.status().failed, 0);
    c.kill_controller();
    c.start_controller();
    // The serving server is known again (its agent says so on the join),
    // and the count went with the agents.
    let st = c.wait("the restarted controller knows the server", |st| {
        st.incarnation == last
    });
    assert_eq!(st.failed, 0, "{st:?}");
    c.kill_server();
    assert_marked_failed_after_3(&c);
    drop(io);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.status().incarnation, 0, "no incarnation taken");
}
