//! Tests on the multi-host test bed (issue #11): nodes in their own network
//! namespaces, each with its own loop devices (its own page cache), its own
//! agent and NBD server, and real NBD clients in its namespace.

// Test code: offsets and sizes of a few MiB move freely between u64,
// usize and pattern bytes.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::cluster::{seed, Rng};
use common::testbed::{enter, Testbed, TestbedOpts};

/// The two-node stale-read scenario: node 1 writes through its export and
/// flushes; node 2 (which has read the block before, as a host using the
/// volume would) reads it through its own export; node 1 overwrites and
/// flushes; node 2 reads again. Each read must see the latest flushed data.
/// Returns the first failure.
fn stale_read(shared_loop: bool) -> Result<(), String> {
    let mut rng = Rng::new(seed("testbed-stale-read"));
    let tb = Testbed::up_with_nbd(
        if shared_loop { "stale-shared" } else { "stale" },
        TestbedOpts {
            nodes: 2,
            // CSNAP_TESTBED_SHARED_LOOP=1 (the default's) applies here too.
            shared_loop: shared_loop || TestbedOpts::default().shared_loop,
            ..TestbedOpts::default()
        },
        &mut rng,
    );
    let (n1, n2) = (tb.node(1), tb.node(2));
    let (ok, out) = n2.qemu_io("origin", &["read 0 64k"]);
    assert!(ok, "node 2's first read:\n{out}");
    for pat in ["0xa1", "0xb2"] {
        let (ok, out) = n1.qemu_io("origin", &[&format!("write -P {pat} 0 64k"), "flush"]);
        assert!(ok, "node 1 writes {pat}:\n{out}");
        let (ok, out) = n2.qemu_io("origin", &[&format!("read -P {pat} 0 64k")]);
        if !ok {
            return Err(format!(
                "node 2 does not see node 1's flushed {pat}:\n{out}"
            ));
        }
    }
    Ok(())
}

/// The real test: per-node loop devices, as on separate hosts. Fails while
/// any device access goes through the page cache (each loop device has its
/// own): it needs O_DIRECT on every device access.
#[test]
fn two_nodes_see_each_others_flushed_origin_writes() {
    let Some(_g) = enter() else { return };
    if let Err(e) = stale_read(false) {
        panic!("{e}");
    }
}

/// The harness's control: the same scenario with every node on one pair of
/// loop devices (one shared page cache) passes, so a failure of the test
/// above is the per-node page caches, not the harness.
#[test]
fn control_one_shared_loop_device_sees_flushed_writes() {
    let Some(_g) = enter() else { return };
    if let Err(e) = stale_read(true) {
        panic!("{e}");
    }
}

use std::collections::BTreeMap;

use std::process::Command;

use std::time::{Duration, Instant};

use common::cluster::{
    assert_granted, assert_same, assert_waits, held, kill, s, send_chunk_write, text, CHUNK,
};
use common::fs::{files, run, Attached, Mounted};

const WRITE_BYTES: u64 = 64 * 1024;

/// Three random 64 KiB pattern writes and a flush through node `n`'s export
/// `export`; the shadow follows.
fn write_some(tb: &Testbed, n: u32, export: &str, shadow: &mut [u8], rng: &mut Rng) {
    let mut cmds = Vec::new();
    for _ in 0..3 {
        let off = rng.below((shadow.len() as u64 - WRITE_BYTES) / 4096) * 4096;
        let pat = 1 + rng.below(255) as u8;
        cmds.push(format!("write -P {pat} {off} {WRITE_BYTES}"));
        let o = usize::try_from(off).expect("offset");
        shadow[o..o + WRITE_BYTES as usize].fill(pat);
    }
    cmds.push("flush".to_string());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let (ok, out) = tb.node(n).qemu_io(export, &refs);
    assert!(ok, "node {n} writes to {export}:\n{out}\n{}", tb.logs(30));
}

/// [`write_some`] to the origin through every node in `nodes`.
fn write_origin(
    tb: &Testbed,
    nodes: &[u32],
    shadows: &mut BTreeMap<String, Vec<u8>>,
    rng: &mut Rng,
) {
    for &n in nodes {
        let shadow = shadows.get_mut("origin").expect("origin");
        write_some(tb, n, "origin", shadow, rng);
    }
}

/// Every volume read through every node in `nodes` equals its shadow.
fn verify(tb: &Testbed, nodes: &[u32], shadows: &BTreeMap<String, Vec<u8>>, when: &str) {
    for &n in nodes {
        for (export, want) in shadows {
            let got = tb.read_volume(n, export);
            assert_same(&format!("{export} through node {n} {when}"), &got, want);
        }
    }
}

/// The server moves 1 -> 2 -> 1 -> 2 (`cluster start`); after each move
/// both nodes write to the origin and to every snapshot through their own
/// exports, every volume is read back through both nodes and compared with
/// its shadow, and a snapshot is created. At the end every snapshot is
/// listed, every volume equals its shadow and `csnap check` is clean.
#[test]
fn the_server_moves_between_namespaces_under_io_from_both_nodes() {
    let Some(_g) = enter() else { return };
    let mut rng = Rng::new(seed("testbed-move"));
    let mut tb = Testbed::up_with_nbd("move", TestbedOpts::default(), &mut rng);
    let mut shadows = BTreeMap::new();
    shadows.insert("origin".to_string(), tb.initial.clone());
    for (i, target) in [1u32, 2, 1, 2].into_iter().enumerate() {
        tb.move_server(target);
        for n in [1, 2] {
            for (export, shadow) in &mut shadows {
                write_some(&tb, n, export, shadow, &mut rng);
            }
        }
        verify(&tb, &[1, 2], &shadows, &format!("after move {}", i + 1));
        let tag = u32::try_from(i + 1).expect("tag");
        tb.create_snapshot(&tag.to_string());
        let origin = shadows["origin"].clone();
        shadows.insert(tag.to_string(), origin);
    }
    assert_eq!(tb.snapshot_tags(), vec![1, 2, 3, 4]);
    verify(&tb, &[1, 2], &shadows, "at the end");
    tb.stop_and_assert_clean();
}

/// Three nodes, the server on node 1, clients on nodes 2 and 3 through
/// their own exports. Node 1 is killed whole (every process of its
/// namespace); the server fails over to another node and the clients go on.
/// Then the serving server alone is SIGKILLed; again. Nothing written and
/// flushed is lost, a snapshot taken after both failovers holds the data,
/// and `csnap check` is clean.
#[test]
fn a_killed_node_and_a_killed_server_fail_over_and_lose_nothing() {
    let Some(_g) = enter() else { return };
    let mut rng = Rng::new(seed("testbed-failover"));
    let mut tb = Testbed::up_with_nbd(
        "failover",
        TestbedOpts {
            nodes: 3,
            ..TestbedOpts::default()
        },
        &mut rng,
    );
    let mut shadows = BTreeMap::new();
    shadows.insert("origin".to_string(), tb.initial.clone());
    let st = tb.move_server(1);
    write_origin(&tb, &[2, 3], &mut shadows, &mut rng);
    tb.kill_node(1);
    assert!(tb.node_pids(1).is_empty(), "node 1 is dead");
    let st = tb.wait("the server fails over from node 1", |x| {
        x.incarnation > st.incarnation && x.node != 1
    });
    write_origin(&tb, &[2, 3], &mut shadows, &mut rng);
    verify(&tb, &[2, 3], &shadows, "after node 1 died");
    let pid = tb.server_pid(st.node, &st.addr);
    kill(pid, libc::SIGKILL);
    tb.wait("the server fails over after its SIGKILL", |x| {
        x.incarnation > st.incarnation
    });
    write_origin(&tb, &[2, 3], &mut shadows, &mut rng);
    tb.create_snapshot("7");
    shadows.insert("7".to_string(), shadows["origin"].clone());
    verify(&tb, &[2, 3], &shadows, "after both failovers");
    tb.stop_and_assert_clean();
}

fn random_file(path: &std::path::Path, bytes: usize, rng: &mut Rng) {
    std::fs::write(path, rng.bytes(bytes)).expect("write file");
}

/// ext4 on node 1's origin export (nbdfuse on node 1's unix socket and a
/// loop device), files written, fsfreeze, a snapshot, unfreeze, more
/// writes. Then through node 2's exports: e2fsck -fn of the snapshot and of
/// the origin is clean and their files read back byte for byte.
#[test]
fn ext4_written_on_node_1_reads_back_on_node_2_from_a_snapshot() {
    let Some(_g) = enter() else { return };
    let mut rng = Rng::new(seed("testbed-ext4"));
    let tb = Testbed::up_with_nbd(
        "ext4",
        TestbedOpts {
            origin_bytes: 48 << 20,
            store_size: "256M",
            ..TestbedOpts::default()
        },
        &mut rng,
    );
    tb.move_server(1);
    let d = tb.dir.clone();
    let origin = Attached::new(&tb.node(1).unix_url("origin"), &d.join("fuse-origin"));
    run(Command::new("mkfs.ext4").args(["-q", "-F", &origin.loopdev]));
    let mnt = d.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mnt");
    run(Command::new("mount").arg(&origin.loopdev).arg(&mnt));
    let m = Mounted(mnt.clone());
    for (i, size) in [1usize, 4096, 70_000, 1 << 20, 3 << 20].iter().enumerate() {
        random_file(&mnt.join(format!("f{i}")), *size, &mut rng);
    }
    run(&mut Command::new("sync"));
    let before = files(&mnt);
    run(Command::new("fsfreeze").arg("-f").arg(&mnt));
    let o = tb.snapshot("create", &["1"]);
    run(Command::new("fsfreeze").arg("-u").arg(&mnt));
    assert!(o.status.success(), "snapshot create: {}", text(&o));
    random_file(&mnt.join("f1"), 4096, &mut rng);
    random_file(&mnt.join("f3"), 2 << 20, &mut rng);
    std::fs::remove_file(mnt.join("f4")).expect("rm f4");
    random_file(&mnt.join("g0"), 500_000, &mut rng);
    run(&mut Command::new("sync"));
    let after = files(&mnt);
    assert_ne!(before, after);
    drop(m);
    drop(origin);

    // Node 2: each volume read whole through its own export.
    for (export, want) in [("1", &before), ("origin", &after)] {
        let img = d.join(format!("node2-{export}.img"));
        std::fs::write(&img, tb.read_volume(2, export)).expect("image");
        run(Command::new("e2fsck").arg("-fn").arg(&img));
        let smnt = d.join(format!("node2-{export}"));
        std::fs::create_dir_all(&smnt).expect("mount point");
        run(Command::new("mount")
            .args(["-o", "loop,ro,noload"])
            .arg(&img)
            .arg(&smnt));
        let sm = Mounted(smnt.clone());
        assert!(
            &files(&smnt) == want,
            "volume {export} read through node 2 shows other files"
        );
        drop(sm);
    }
}

/// `prog ARGS` in node `n`'s namespace, which must succeed.
fn on(tb: &Testbed, n: u32, prog: &str, args: &[&str]) -> String {
    run(tb.node(n).cmd(prog).args(args))
}

/// NBD interop across three nodes, each client on its own node's export:
/// qemu-img convert on node 1, compare on node 2, a snapshot, nbdcopy of
/// new data on node 3; then every node reads back what the others wrote
/// (nbdcopy, qemu-img compare, which also tells the volumes apart).
#[test]
fn nbd_clients_on_three_nodes_see_each_others_data() {
    let Some(_g) = enter() else { return };
    let mut rng = Rng::new(seed("testbed-interop"));
    let tb = Testbed::up_with_nbd(
        "interop",
        TestbedOpts {
            nodes: 3,
            origin_bytes: 8 << 20,
            ..TestbedOpts::default()
        },
        &mut rng,
    );
    let a = tb.dir.join("a.img");
    let b = tb.dir.join("b.img");
    std::fs::write(&a, rng.bytes(8 << 20)).expect("a");
    std::fs::write(&b, rng.bytes(8 << 20)).expect("b");
    let (a, b) = (s(&a).to_string(), s(&b).to_string());
    let url = |n: u32, e: &str| tb.node(n).url(e);
    on(
        &tb,
        1,
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &a,
            &url(1, "origin"),
        ],
    );
    on(
        &tb,
        2,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &a, &url(2, "origin")],
    );
    tb.create_snapshot("1");
    let list = on(&tb, 3, "nbdinfo", &["--list", &url(3, "")]);
    assert!(
        list.contains("export=\"1\""),
        "node 3 lists the snapshot: {list}"
    );
    on(&tb, 3, "nbdcopy", &[&b, &url(3, "origin")]);
    let out = tb.dir.join("origin.out");
    on(&tb, 1, "nbdcopy", &[&url(1, "origin"), s(&out)]);
    assert_same(
        "origin read by node 1",
        &std::fs::read(&out).expect("out"),
        &std::fs::read(&b).expect("b"),
    );
    on(
        &tb,
        2,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &a, &url(2, "1")],
    );
    let differ = tb
        .node(2)
        .cmd("qemu-img")
        .args([
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            &a,
            &url(2, "origin"),
        ])
        .status()
        .expect("qemu-img");
    assert_eq!(
        differ.code(),
        Some(1),
        "node 2 sees the origin differ from a"
    );
    on(
        &tb,
        3,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &b, &url(3, "origin")],
    );
    // A client on every node (`csnap io` through its agent) reaches the
    // server, and every agent the controller, over TCP between the
    // namespaces.
    let mut clients: Vec<_> = (1..=3).map(|n| tb.io("1", 100 + u64::from(n), n)).collect();
    for c in &mut clients {
        c.read(0, 4096);
    }
    tb.assert_links_between_hosts_are_tcp(&[1, 2, 3]);
    for c in clients {
        c.quit();
    }
}

/// The recovery barrier across hosts (the ddsnap window of
/// csnap/tests/failover.rs on the test bed): a snapshot reader on node 3
/// holds a read lock granted by incarnation N, whose server on node 1 is
/// SIGKILLed; once N+1 serves, an origin write of node 2 to that chunk
/// waits, one to a chunk no lock covers goes at once, and `unhold` lets the
/// held-off write through; the snapshot still reads the chunk as it was.
#[test]
fn a_read_lock_of_node_3_holds_off_node_2_across_a_failover() {
    let Some(_g) = enter() else { return };
    let mut rng = Rng::new(seed("testbed-window"));
    let tb = Testbed::up(
        "window",
        TestbedOpts {
            nodes: 3,
            ..TestbedOpts::default()
        },
        &mut rng,
    );
    let st = tb.move_server(1);
    let mut w = tb.io("origin", 11, 2);
    tb.create_snapshot("1");
    let mut r = tb.io("1", 31, 3);
    let held_chunk = 5u64;
    let k = held(&r.call(&format!("hold {} 100", held_chunk * CHUNK + 10)));
    assert!(k >= 1, "the chunk is on the origin: a read lock is held");
    kill(tb.server_pid(st.node, &st.addr), libc::SIGKILL);
    let st = tb.wait("a new incarnation serves", |x| {
        x.incarnation > st.incarnation
    });
    assert_ne!(st.node, 1);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    send_chunk_write(&mut w, &mut rng, 40);
    assert_granted(&mut w, t, "to a chunk no lock covers");
    send_chunk_write(&mut w, &mut rng, held_chunk);
    assert_waits(&mut w, "while incarnation N's read lock is held");
    assert_eq!(r.call("unhold"), format!("ok released {k}"));
    assert_granted(&mut w, Instant::now(), "after unhold");
    let at = (held_chunk * CHUNK) as usize;
    assert_same(
        "snapshot 1, the held chunk, read on node 3",
        &r.read(held_chunk * CHUNK, CHUNK),
        &tb.initial[at..at + CHUNK as usize],
    );
}

/// The harness itself: node 2 killed leaves node 1 serving and no process
/// in node 2's namespace; a test that panics with a test bed up leaves no
/// process, namespace, link or loop device behind.
#[test]
fn kill_node_and_teardown_after_a_panic_leave_nothing_behind() {
    let Some(_g) = enter() else { return };
    let mut rng = Rng::new(seed("testbed-teardown"));
    let names = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut tb = Testbed::up_with_nbd("teardown", TestbedOpts::default(), &mut rng);
        let pids: Vec<u32> = [1, 2].iter().flat_map(|&n| tb.node_pids(n)).collect();
        assert!(
            tb.node_pids(2).len() >= 3,
            "agent, spawner, standby, NBD server"
        );
        tb.kill_node(2);
        assert!(tb.node_pids(2).is_empty(), "node 2 is dead");
        let (ok, out) = tb
            .node(1)
            .qemu_io("origin", &["write -P 0x3c 0 4k", "read -P 0x3c 0 4k"]);
        assert!(ok, "node 1 serves on:\n{out}");
        *names.lock().expect("names") = Some((
            tb.bridge.clone(),
            tb.nodes.iter().map(|n| n.ns.clone()).collect::<Vec<_>>(),
            tb.loop_devices(),
            pids,
            s(&tb.dir).to_string(),
        ));
        panic!("a failing test");
    }));
    assert!(r.is_err());
    let (bridge, namespaces, loops, pids, dir) =
        names.lock().expect("names").take().expect("names");
    let ns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    for n in &namespaces {
        assert!(
            !ns.lines()
                .any(|l| l.split_whitespace().next() == Some(n.as_str())),
            "namespace {n} left: {ns}"
        );
    }
    let links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    assert!(!links.contains(&bridge), "bridge {bridge} left: {links}");
    let attached = String::from_utf8_lossy(
        &Command::new("losetup")
            .arg("-a")
            .output()
            .expect("losetup")
            .stdout,
    )
    .into_owned();
    for l in &loops {
        assert!(
            !attached
                .lines()
                .any(|x| x.starts_with(&format!("{l}:")) && x.contains(&dir)),
            "loop device {l} left: {attached}"
        );
    }
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "process {p} left"
        );
    }
}

/// Fencing across hosts (issue #11), on two nodes of the test bed: no
/// cluster, two standalone servers, each on its own node's loop devices
/// (its own page cache; the host-local lock of one does not see the other,
/// as on two hosts) and TCP address. Server A on node 1 serves a client
/// of node 1; A is paused (SIGSTOP); server B on node 2 takes the store
/// over (the next incarnation) and serves a write of a node-2 client; A
/// is continued. A must not serve again: its client's next write is
/// refused as stale, A exits naming the fence, and B's data and A's
/// earlier data are what node 2 reads. A's fence read goes to the disk
/// (direct I/O): through its own page cache it would still see its own
/// incarnation and serve on.
#[test]
fn a_paused_server_on_node_1_is_fenced_by_a_takeover_on_node_2() {
    use common::cluster::{
        assert_exits_fenced, assert_same, assert_write_refused_as_stale, kill, Daemon, Io, BIN,
        CHUNK, TIMEOUT,
    };
    use std::ffi::OsString;
    use std::time::{Duration, Instant};

    let Some(_serial) = enter() else { return };
    let mut rng = Rng::new(seed("testbed-fence"));
    let mut tb = Testbed::up("fence", TestbedOpts::default(), &mut rng);
    // No cluster for this one: the agents (and their standbys) go.
    for node in &mut tb.nodes {
        node.agent.take();
    }
    let addr = |n: usize| format!("{}:7070", tb.nodes[n].ip);
    let server = |n: usize, name: &str| {
        let node = &tb.nodes[n];
        let mut cmd = node.cmd(BIN);
        cmd.args(["server", "--origin", &node.origin, "--store", &node.store])
            .args(["--listen", &addr(n)]);
        let mut s = Daemon::spawn(name, &mut cmd);
        assert!(
            s.log.wait_line(0, "serving", TIMEOUT).is_some(),
            "{name} did not start:\n{}",
            s.log.text()
        );
        assert!(s.exited().is_none());
        s
    };
    let client = |n: usize, id: u64| {
        let node = &tb.nodes[n];
        let args: Vec<OsString> = [
            "io",
            "--server",
            &addr(n),
            "--origin",
            &node.origin,
            "--store",
            &node.store,
            "--volume",
            "origin",
            "--client-id",
            &id.to_string(),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        Io::start_wrapped(
            &format!("io node {}", n + 1),
            &["ip", "netns", "exec", &node.ns],
            &args,
            &tb.dir,
            None,
        )
    };
    let mut a = server(0, "server A (node 1)");
    let mut ca = client(0, 1);
    let first = rng.bytes(2 * CHUNK as usize);
    ca.write(0, &first);

    kill(a.pid(), libc::SIGSTOP);
    let stopped_at = Instant::now();
    let b = server(1, "server B (node 2)");
    let mut cb = client(1, 2);
    let second = rng.bytes(CHUNK as usize);
    cb.write(CHUNK, &second);
    // A re-reads the on-disk incarnation before a batch once its last check
    // is older than SERVER_FENCE_RECHECK_MS: the pause outlasts it (a real
    // takeover takes longer than that: failure detection).
    let period = Duration::from_millis(csnap_pools::SERVER_FENCE_RECHECK_MS);
    std::thread::sleep((2 * period).saturating_sub(stopped_at.elapsed()));
    kill(a.pid(), libc::SIGCONT);
    let third = rng.bytes(CHUNK as usize);
    assert_write_refused_as_stale(&mut ca, CHUNK, &third, &a, &b);
    assert_exits_fenced(&mut a);
    // Node 2 reads B's write and A's write from before the takeover.
    assert_same("B's write", &cb.read(CHUNK, CHUNK), &second);
    assert_same(
        "A's earlier write",
        &cb.read(0, CHUNK),
        &first[..CHUNK as usize],
    );
    drop(ca);
    cb.quit();
}
