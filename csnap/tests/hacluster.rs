//! The real cluster engine (issue #12): csnap on a 3-node corosync +
//! Pacemaker cluster on the test bed (`scripts/hacluster.sh`, through
//! `common::hacluster`), with Pacemaker placing `ocf:csnap:server` and
//! fencing through `fence_csnap_ns`. Clients on every node write through
//! their own NBD exports; the volumes are compared with shadow copies.
//!
//! Slow (each test brings up a cluster: about 10 s, and runs 30-60 s):
//! they run only with `CSNAP_SLOW_TESTS=1` (CI sets it for this binary).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{
    assert_same, assert_waits, held, seed, send_chunk_write, text, Io, Outcome, Rng, CHUNK,
};
use common::hacluster::{available, HaCluster, Target};

const VOLUME_BYTES: usize = 64 * 1024 * 1024;
const WRITE_BYTES: u64 = 64 * 1024;
const WRITE_LEN: usize = 64 * 1024;
const MINUTE: Duration = Duration::from_secs(60);

fn enabled() -> bool {
    if !available() {
        eprintln!("skipped: needs root, ip, losetup, corosync and pacemaker");
        return false;
    }
    if std::env::var_os("CSNAP_SLOW_TESTS").is_none() {
        eprintln!("skipped: slow (set CSNAP_SLOW_TESTS=1)");
        return false;
    }
    true
}

/// Shadow copies of the volumes, by export name.
type Shadows = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// `count` random 64 KiB pattern writes and a flush through node `n`'s
/// export `export`, inside `region` (byte range); the shadow follows.
fn write_some(
    c: &Target,
    n: u32,
    export: &str,
    region: (usize, usize),
    shadows: &Shadows,
    rng: &mut Rng,
) -> Result<(), String> {
    let mut cmds = Vec::new();
    let mut applied = Vec::new();
    for _ in 0..3 {
        let span = ((region.1 - region.0) as u64 - WRITE_BYTES) / 4096;
        let off = region.0 as u64 + rng.below(span) * 4096;
        let pat = 1 + u8::try_from(rng.below(255)).expect("pattern");
        cmds.push(format!("write -P {pat} {off} {WRITE_BYTES}"));
        applied.push((usize::try_from(off).expect("offset"), pat));
    }
    cmds.push("flush".to_string());
    // Each batch is a new NBD connection. While no server serves, the NBD
    // server refuses a *new* connection's export ("no such export": it
    // resolves export names through the server); that is a refused open,
    // not an I/O error of an open client, so it is retried (a few seconds
    // at most) and counted. An error after the open fails the test.
    let mut refused = 0;
    let (ok, out) = loop {
        let (ok, out) = c.qemu_io(n, export, &cmds);
        if !ok && out.contains("Requested export not available") && refused < 100 {
            refused += 1;
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        break (ok, out);
    };
    if refused > 0 {
        eprintln!("node {n}: a new connection to {export} was refused {refused} time(s) during a failover");
    }
    if !ok {
        return Err(format!("node {n} writes to {export}: {out}"));
    }
    let mut sh = shadows.lock().expect("shadows");
    let v = &mut sh.iter_mut().find(|(e, _)| e == export).expect("shadow").1;
    for (o, pat) in applied {
        v[o..o + WRITE_LEN].fill(pat);
    }
    Ok(())
}

fn verify(c: &HaCluster, nodes: &[u32], shadows: &Shadows, when: &str) {
    let sh = shadows.lock().expect("shadows").clone();
    for &n in nodes {
        for (export, want) in &sh {
            let got = c.read_volume(n, export);
            assert_same(&format!("{export} through node {n} {when}"), &got, want);
        }
    }
}

/// Node `n`'s third of the volume (nodes 1..=3): concurrent writers never
/// overlap, so the shadow does not depend on their interleaving.
fn region(n: u32) -> (usize, usize) {
    let third = VOLUME_BYTES / 3 / 4096 * 4096;
    let i = n as usize - 1;
    (i * third, (i + 1) * third)
}

/// Writers on `nodes`, each in its own region, alternating between the
/// origin and snapshot 1, until stopped; each returns its errors.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u32, usize, Vec<String>)>>,
}

impl Writers {
    fn start(c: &HaCluster, nodes: &[u32], shadows: &Shadows, test: &str) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = nodes
            .iter()
            .map(|&n| {
                let (c, shadows, stop) = (c.target(), shadows.clone(), stop.clone());
                let mut rng = Rng::new(seed(test) ^ u64::from(n));
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    let mut done = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let export = if done % 2 == 0 { "origin" } else { "1" };
                        match write_some(&c, n, export, region(n), &shadows, &mut rng) {
                            Ok(()) => done += 1,
                            Err(e) => {
                                errors.push(e);
                                break;
                            }
                        }
                    }
                    (n, done, errors)
                })
            })
            .collect();
        Writers { stop, threads }
    }

    /// Stops them; panics on an I/O error any of them saw.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let (n, done, errors) = t.join().expect("writer");
            assert!(
                errors.is_empty(),
                "node {n}'s client saw an I/O error: {errors:?}"
            );
            assert!(done > 0, "node {n}'s client wrote nothing");
            eprintln!("node {n}: {done} write batches, no error");
        }
    }
}

/// After a failed assertion: the writers are told to stop, not waited
/// for (one may hang on a server that never comes); they hold no
/// reference to the cluster, whose drop takes it down and so ends them.
impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Brings up 3 nodes, writes through every node, takes snapshot 1 and
/// reads it through every node (its NBD server takes snapshot read locks).
fn setup(name: &str) -> (HaCluster, Shadows, u32, u64) {
    let c = HaCluster::up(name, 3);
    let st = c.wait(1, "a server serves", MINUTE, |s| s.incarnation > 0);
    let shadows: Shadows = Arc::new(Mutex::new(vec![(
        "origin".to_string(),
        vec![0u8; VOLUME_BYTES],
    )]));
    let mut rng = Rng::new(seed(name));
    for n in 1..=3 {
        write_some(&c.target(), n, "origin", region(n), &shadows, &mut rng).expect("first writes");
    }
    let o = c.snapshot(1, "create", &["1"]);
    assert!(o.status.success(), "snapshot create 1: {}", text(&o));
    {
        let mut sh = shadows.lock().expect("shadows");
        let origin = sh[0].1.clone();
        sh.push(("1".to_string(), origin));
    }
    for n in 1..=3 {
        write_some(&c.target(), n, "1", region(n), &shadows, &mut rng).expect("snapshot writes");
    }
    verify(&c, &[1, 2, 3], &shadows, "before the failure");
    (c, shadows, st.node, st.incarnation)
}

/// The byte offset of the first line of `log` containing `needle` after
/// offset `from`.
fn find(log: &str, from: usize, needle: &str) -> Option<usize> {
    log[from..].find(needle).map(|i| i + from)
}

/// Whole-node loss: every process of the serving node, corosync
/// included, is SIGKILLed while clients on the other two nodes write. The
/// node is fenced (fence_csnap_ns, through Pacemaker), the server starts on
/// another node only after that (the relay takes the dead node out of the
/// agents' members, which releases its clients' locks, only once the fencer
/// reports it fenced), the survivors' clients see no I/O error, and every
/// volume equals its shadow.
#[test]
fn whole_node_loss_is_fenced_and_the_server_moves_without_an_io_error() {
    if !enabled() {
        return;
    }
    let _g = common::testbed::serial();
    let (c, shadows, s, inc) = setup("node-loss");
    let others: Vec<u32> = (1..=3).filter(|&n| n != s).collect();
    let a = others[0];
    let fenced_before = c.fenced_count(a, s);
    let log_from: Vec<(u32, usize)> = others.iter().map(|&n| (n, c.relay_log(n).len())).collect();
    // A snapshot reader on the serving node holds a read lock that an
    // origin write of node a waits for.
    let mut rng = Rng::new(seed("node-loss-lock"));
    let (reader, mut waiter, held_chunk, waited) = held_off_write(&c, s, a, 9001, &mut rng);
    let writers = Writers::start(&c, &others, &shadows, "node-loss-writers");
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let (t_instant, t_micros) = (Instant::now(), csnap_sys::monotonic_micros());
    c.kill_node(s);
    drop(reader);
    let st = c.wait(a, "the server serves on a survivor", MINUTE, |x| {
        x.incarnation > inc && x.node != s && x.node != 0
    });
    eprintln!(
        "node {s} killed; incarnation {} serves on node {} after {:?}",
        st.incarnation,
        st.node,
        t.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    writers.finish();
    assert!(
        c.fenced_count(a, s) > fenced_before,
        "node {s} was not fenced"
    );
    // The new server's node started it only after its relay knew node s
    // fenced: the fencing line precedes the StartHere that started it.
    let n = st.node;
    let from = log_from
        .iter()
        .find(|(m, _)| *m == n)
        .map_or(0, |(_, f)| *f);
    let log = c.relay_log(n);
    let fenced = find(&log, from, &format!("node {s} is fenced"))
        .unwrap_or_else(|| panic!("node {n}'s relay never saw node {s} fenced:\n{log}"));
    let started = find(&log, from, ": StartHere (")
        .unwrap_or_else(|| panic!("node {n}'s relay never started its server:\n{log}"));
    assert!(
        fenced < started,
        "node {n} started the new server before node {s} was fenced:\n{}",
        &log[from..]
    );
    // The write that waited on the dead node's read lock goes, and only
    // once node s is fenced (its reader's lock released then, never
    // before): its reply came after the fencing line's time.
    let (at, _, _) = waiter.finish();
    let replied_us =
        t_micros + u64::try_from(at.duration_since(t_instant).as_micros()).expect("micros");
    let fenced_us = stamp(&log[log[..fenced].rfind('\n').map_or(0, |i| i + 1)..]);
    assert!(
        replied_us > fenced_us,
        "the write waiting on node {s}'s read lock went at t={replied_us} before node {s} was fenced at t={fenced_us}"
    );
    eprintln!(
        "the write held off by node {s}'s read lock went {} ms after the fence",
        (replied_us - fenced_us) / 1000
    );
    shadow_origin_chunk(&shadows, held_chunk, &waited);
    waiter.quit();
    // Snapshot 1 still reads the held chunk as it was (the copy-out went
    // before the write), and every volume equals its shadow.
    verify(&c, &others, &shadows, "after the node loss");
}

/// A snapshot reader on node `r` (client `id`) holds the read lock of an
/// origin chunk of snapshot 1 in `r`'s region, which no other node's
/// writer touches; an origin write of node `w` (client `id + 1`) to that
/// chunk is sent and waits for it. The reader, the waiting writer, the
/// chunk and the data sent.
fn held_off_write(c: &HaCluster, r: u32, w: u32, id: u64, rng: &mut Rng) -> (Io, Io, u64, Vec<u8>) {
    let mut reader = c.io(r, "1", id);
    let chunk = (u64::try_from(region(r).0).expect("offset") / CHUNK..)
        .take(32)
        .find(|&k| held(&reader.call(&format!("hold {} 1", k * CHUNK))) >= 1)
        .unwrap_or_else(|| panic!("no origin chunk of snapshot 1 in node {r}'s region"));
    let mut waiter = c.io(w, "origin", id + 1);
    let data = send_chunk_write(&mut waiter, rng, chunk);
    assert_waits(
        &mut waiter,
        &format!("while node {r}'s snapshot reader holds its read lock"),
    );
    (reader, waiter, chunk, data)
}

/// The origin's shadow follows a whole-chunk write at chunk `chunk`.
fn shadow_origin_chunk(shadows: &Shadows, chunk: u64, data: &[u8]) {
    let at = usize::try_from(chunk * CHUNK).expect("offset");
    let mut sh = shadows.lock().expect("shadows");
    sh[0].1[at..at + data.len()].copy_from_slice(data);
}

/// The `[t=MICROS]` stamp at the start of a relay log line.
fn stamp(line: &str) -> u64 {
    line.strip_prefix("[t=")
        .and_then(|r| r.split(']').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no [t=] stamp: {line:?}"))
}

/// Partition of the serving node: its veth on the bridge goes down while
/// clients on the other two nodes write. The cut-off node loses quorum and
/// its relay stops its server at once (its fence is delayed 4 s here, so
/// the minority's own reaction is seen before it is killed); the majority
/// fences it and starts the server on one of its nodes; there are never two
/// servers (the minority stops before the majority's start, which also
/// claims the store). When the link comes back the node is started again
/// and rejoins as a standby; the server stays where it is; no I/O error;
/// shadows equal.
#[test]
fn a_partitioned_serving_node_stops_serving_is_fenced_and_rejoins_as_a_standby() {
    if !enabled() {
        return;
    }
    let _g = common::testbed::serial();
    let (c, shadows, s, inc) = setup("partition");
    let others: Vec<u32> = (1..=3).filter(|&n| n != s).collect();
    let a = others[0];
    // Delay the fencing of node s so that its own reaction can be seen.
    c.delay_fencing(a, s, "4s");
    let s_from = c.relay_log(s).len();
    // A client on node s itself, connected to the server there (its own
    // node's: the partition does not cut it off from it).
    let mut rng = Rng::new(seed("partition-minority"));
    let mut minority = c.io(s, "origin", 9003);
    let first_chunk = u64::try_from(region(s).0).expect("offset") / CHUNK + 1;
    let first = send_chunk_write(&mut minority, &mut rng, first_chunk);
    minority.finish();
    shadow_origin_chunk(&shadows, first_chunk, &first);
    let writers = Writers::start(&c, &others, &shadows, "partition-writers");
    std::thread::sleep(Duration::from_secs(1));
    c.set_link(s, false);
    // The minority: quorum lost, its server stopped, no server anywhere
    // it knows of, while the majority has not fenced it yet.
    let st_s = c.wait(s, "the minority stops serving", MINUTE, |x| {
        !x.text
            .lines()
            .any(|l| l.starts_with(&format!("node {s}:")) && l.contains("serving"))
    });
    let log_s = c.relay_log(s);
    assert!(
        log_s[s_from..].contains("quorum lost"),
        "node {s}'s relay did not see quorum lost:\n{}",
        &log_s[s_from..]
    );
    let a_st = c.status(a).expect("majority status");
    assert!(
        a_st.incarnation == 0 || a_st.node != s || a_st.incarnation == inc,
        "majority: {a_st:?}"
    );
    eprintln!("minority node {s} stopped serving; its view: {}", st_s.text);
    // A write on the minority now needs a grant for a chunk its client has
    // not written: no server of the cut-off side may give one (a stale
    // grant, while the majority is about to serve). It is never answered
    // `ok` (an error is allowed: the node is being fenced); the volume
    // check at the end shows nothing of it reached the disk.
    send_chunk_write(&mut minority, &mut rng, first_chunk + 1);
    // The majority: node s fenced, the server on one of the others.
    let st = c.wait(a, "the majority serves", MINUTE, |x| {
        x.incarnation > inc && x.node != s && x.node != 0
    });
    assert!(
        c.pids(s).is_empty(),
        "node {s} was not fenced: {:?}",
        c.pids(s)
    );
    loop {
        match minority.reply_or_exit(Duration::from_secs(10)) {
            Outcome::Reply(_, line) => assert!(
                !line.starts_with("ok"),
                "a write on the cut-off node {s} was granted: {line:?}"
            ),
            Outcome::Exited => break,
            Outcome::Pending => panic!("node {s}'s client outlived its node's fencing"),
        }
    }
    // Heal. A client whose connection went to the cut-off server sees no
    // FIN or RST while the link is down: it waits until its next TCP
    // retransmission meets the (now empty) namespace's reset, then fails
    // over; no error reaches it.
    c.set_link(s, true);
    std::thread::sleep(Duration::from_secs(1));
    writers.finish();
    // The node comes back and rejoins as a standby.
    c.restart_node(s);
    c.wait_standby(a, s, MINUTE);
    let after = c.wait_standby(s, s, MINUTE);
    assert_eq!(
        (after.node, after.incarnation),
        (st.node, st.incarnation),
        "the server moved when node {s} rejoined"
    );
    verify(&c, &[1, 2, 3], &shadows, "after the partition healed");
}

/// The locks of a dead node's clients go when it is fenced, never before.
/// A snapshot reader on a node that does not serve holds the read lock of
/// an origin chunk; an origin write of the third node to that chunk waits.
/// The reader's node is killed whole (corosync included) with its fencing
/// delayed 3 s: the server (still serving on its own node) keeps the lock
/// through the membership change and lets the write go only after the
/// fence, so no sooner than 3 s after the kill; the snapshot still reads
/// the chunk as it was.
#[test]
fn a_dead_nodes_read_lock_holds_a_write_until_the_node_is_fenced() {
    if !enabled() {
        return;
    }
    let _g = common::testbed::serial();
    let (c, shadows, s, inc) = setup("lock-release");
    let others: Vec<u32> = (1..=3).filter(|&n| n != s).collect();
    let (d, w) = (others[0], others[1]);
    let fence_delay = Duration::from_secs(3);
    c.delay_fencing(w, d, "3s");
    let fenced_before = c.fenced_count(w, d);
    let mut rng = Rng::new(seed("lock-release-io"));
    let (reader, mut waiter, held_chunk, waited) = held_off_write(&c, d, w, 9011, &mut rng);
    let t = Instant::now();
    c.kill_node(d);
    drop(reader);
    let (at, _, _) = waiter.finish();
    let went = at.duration_since(t);
    assert!(
        went >= fence_delay,
        "the write held off by node {d}'s read lock went {went:?} after the kill, before the node's fencing (delayed {fence_delay:?}) could have happened"
    );
    assert!(
        c.fenced_count(w, d) > fenced_before,
        "node {d} was not fenced"
    );
    let st = c.status(w).expect("status");
    assert_eq!(
        (st.node, st.incarnation),
        (s, inc),
        "the server stays where it was"
    );
    eprintln!("the write held off by dead node {d}'s read lock went {went:?} after the kill");
    shadow_origin_chunk(&shadows, held_chunk, &waited);
    waiter.quit();
    verify(&c, &[s, w], &shadows, "after the lock holder's node died");
}

/// A crash on a node that does not serve: first its agent is SIGKILLed
/// (its relay asks the cluster to fence the node: its clients cannot be
/// vouched for any more), then, after that node is started again, corosync
/// on the other non-serving node is SIGKILLed (Pacemaker fences it). The
/// serving node and the remaining clients write throughout without an
/// error; both nodes rejoin as standbys; shadows equal.
#[test]
fn an_agent_or_corosync_crash_on_a_standby_node_fences_it_and_io_goes_on() {
    if !enabled() {
        return;
    }
    let _g = common::testbed::serial();
    let (c, shadows, s, inc) = setup("standby-crash");
    let others: Vec<u32> = (1..=3).filter(|&n| n != s).collect();
    let (m, k) = (others[0], others[1]);
    // The agent of node m.
    let writers = Writers::start(&c, &[s, k], &shadows, "crash-writers-1");
    std::thread::sleep(Duration::from_secs(1));
    let agent = c
        .pid_by_args(m, &["agent", "--node", &m.to_string()])
        .expect("node m's agent");
    let _ = csnap_sys::send_signal(agent, libc::SIGKILL);
    common::cluster::wait_for("node m fenced after its agent died", MINUTE, || {
        c.pids(m).is_empty().then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    writers.finish();
    let st = c.status(s).expect("status");
    assert_eq!((st.node, st.incarnation), (s, inc), "the server moved");
    c.restart_node(m);
    c.wait_standby(s, m, MINUTE);
    // corosync of node k.
    let writers = Writers::start(&c, &[s, m], &shadows, "crash-writers-2");
    std::thread::sleep(Duration::from_secs(1));
    let coro = c.pid_of(k, "corosync").expect("node k's corosync");
    let _ = csnap_sys::send_signal(coro, libc::SIGKILL);
    common::cluster::wait_for("node k fenced after its corosync died", MINUTE, || {
        c.pids(k).is_empty().then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    writers.finish();
    let st = c.status(s).expect("status");
    assert_eq!((st.node, st.incarnation), (s, inc), "the server moved");
    c.restart_node(k);
    c.wait_standby(s, k, MINUTE);
    verify(&c, &[1, 2, 3], &shadows, "after both crashes");
}
