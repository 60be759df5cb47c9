//! The syscall audit: `csnap server` runs under `strace -f` with its seccomp
//! filters enforcing, through a workload that exercises every serving path.
//! For each thread, the syscalls made after it installed its filter (the
//! serving phase) are compared with the audited whitelist (`csnap-audit`):
//! the test fails on a syscall the list lacks and on a rule never used
//! (except rules marked as exit paths). Also: the death test (a forbidden
//! syscall in the serving phase kills the server, which names it).

mod common;

use common::Proc;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use csnap_audit::{ThreadKind, SERVING_NETWORK, SERVING_STORE};
use csnap_fsm::client::Request;
use csnap_io::client::{control, VolumeClient};
use csnap_io::net::Addr;
use csnap_proto::Volume;

const BIN: &str = env!("CARGO_BIN_EXE_csnap");

fn dir(name: &str) -> PathBuf {
    common::fresh_dir("audit", name)
}

fn format(d: &Path) {
    std::fs::write(d.join("origin"), vec![0x33u8; 4 << 20]).unwrap();
    let st = Command::new(BIN)
        .args(["format", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .args(["--store-size", "48M", "--journal-blocks", "256"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

fn wait_for(sock: &Path, p: &mut Proc) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = p.0.try_wait() {
            panic!("server exited at start: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn workload(d: &Path, unix: &Addr, tcp: &Addr) {
    let (origin, store) = (d.join("origin"), d.join("store"));
    let mut ctl = control(tcp).unwrap();
    ctl.call(Request::Create(1)).unwrap();
    let mut o = VolumeClient::open(unix, &origin, &store, Volume::Origin, 1, 1).unwrap();
    let mut s = VolumeClient::open(tcp, &origin, &store, Volume::Snapshot(1), 2, 1).unwrap();
    let data = vec![9u8; 100_000];
    let mut buf = vec![0u8; 100_000];
    for i in 0..20u64 {
        s.read_at(&mut buf, i * 100_000).unwrap();
        o.write_at(&data, i * 100_000).unwrap();
        s.write_at(&data[..5000], i * 100_000 + 1).unwrap();
    }
    ctl.call(Request::List(0)).unwrap();
    ctl.call(Request::Status).unwrap();
    drop(s);
    // Bad input on a raw connection: the server closes it.
    let mut raw = std::os::unix::net::UnixStream::connect(match unix {
        Addr::Unix(p) => p,
        Addr::Tcp(_) => unreachable!(),
    })
    .unwrap();
    raw.write_all(b"garbage that is not a csnap frame").unwrap();
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut sink);
    // Delete (the snapshot client is gone), then more origin writes.
    for _ in 0..100 {
        if ctl.call(Request::Delete(1)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    o.write_at(&data, 0).unwrap();
}

fn syscall_name(line: &str) -> Option<&str> {
    // "TID name(args" or "TID <... name resumed>" (counted at its start).
    let rest = line.split_once(' ')?.1.trim_start();
    if rest.starts_with("<...") || rest.starts_with("---") || rest.starts_with("+++") {
        return None;
    }
    let name = rest.split('(').next()?;
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then_some(name)
}

#[test]
fn serving_syscalls_match_the_audited_whitelist() {
    common::cluster::require_strace();
    let d = dir("strace");
    format(&d);
    let sock = d.join("sock");
    let trace = d.join("trace");
    let child = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(BIN)
        .args(["server", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .arg("--listen")
        .arg(&sock)
        .args(["--listen", "127.0.0.1:0", "--clients", "8"])
        .args(["--metrics", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = Proc(child);
    wait_for(&sock, &mut p);
    // The TCP port: from the server's "listening on" lines.
    let mut err = p.0.stderr.take().unwrap();
    let mut lines = String::new();
    let start = Instant::now();
    let tcp = loop {
        let mut b = [0u8; 4096];
        let n = std::io::Read::read(&mut err, &mut b).unwrap();
        lines.push_str(&String::from_utf8_lossy(&b[..n]));
        // Whole lines only: a read may end mid-line.
        if let Some(l) = lines
            .split_inclusive('\n')
            .find(|l| l.ends_with('\n') && l.contains("listening on 127.0.0.1:"))
        {
            break Addr::parse(l.trim_end().rsplit(' ').next().unwrap()).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no TCP address in:\n{lines}"
        );
    };
    while !lines.contains("serving") {
        let mut b = [0u8; 4096];
        let n = std::io::Read::read(&mut err, &mut b).unwrap();
        lines.push_str(&String::from_utf8_lossy(&b[..n]));
    }
    workload(&d, &Addr::Unix(sock.clone()), &tcp);
    // The metrics endpoint on the network thread: scrapes and bad requests.
    let metrics = lines
        .split_inclusive('\n')
        .find_map(|l| {
            l.trim_end()
                .strip_prefix("csnap server: metrics at http://")
        })
        .and_then(|l| l.strip_suffix("/metrics"))
        .expect("the metrics address")
        .to_string();
    common::scrape_for_audit(&metrics);
    std::thread::sleep(Duration::from_millis(200));
    drop(p);
    let text = std::fs::read_to_string(&trace).unwrap();
    // Killing strace detaches its tracee: kill the server itself (its pid is
    // the trace's first TID).
    if let Some(pid) = text.split_whitespace().next() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }

    // Thread kinds: the first TID is the process (the network thread); the
    // worker names itself csnap-store.
    let main_tid = text.split_whitespace().next().unwrap().to_string();
    let worker_tid = text
        .lines()
        .find(|l| l.contains("PR_SET_NAME, \"csnap-store\""))
        .and_then(|l| l.split_whitespace().next())
        .expect("worker thread in the trace")
        .to_string();
    let mut serving: BTreeMap<&str, bool> = BTreeMap::new();
    let mut used: BTreeMap<ThreadKind, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let tid = line.split_whitespace().next().unwrap_or("");
        let kind = if tid == main_tid {
            ThreadKind::Network
        } else if tid == worker_tid {
            ThreadKind::Store
        } else {
            continue;
        };
        if line.contains("seccomp(SECCOMP_SET_MODE_FILTER") {
            serving.insert(
                if kind == ThreadKind::Network {
                    "net"
                } else {
                    "store"
                },
                true,
            );
            continue;
        }
        let key = if kind == ThreadKind::Network {
            "net"
        } else {
            "store"
        };
        if !serving.get(key).copied().unwrap_or(false) {
            continue;
        }
        if let Some(name) = syscall_name(line) {
            used.entry(kind).or_default().insert(name.to_string());
        }
    }
    assert_eq!(serving.len(), 2, "both threads must install a filter");
    let mut problems = Vec::new();
    let mut report = String::new();
    for (kind, table) in [
        (ThreadKind::Network, SERVING_NETWORK),
        (ThreadKind::Store, SERVING_STORE),
    ] {
        let seen = used.get(&kind).cloned().unwrap_or_default();
        report.push_str(&format!("serving phase, {kind:?} thread: {seen:?}\n"));
        for s in &seen {
            if !table.iter().any(|r| r.name == s) {
                problems.push(format!(
                    "{kind:?} thread made {s} in the serving phase; the whitelist lacks it"
                ));
            }
        }
        for r in table {
            if r.exercised && !seen.contains(r.name) {
                problems.push(format!(
                    "{kind:?} thread never used whitelisted {} ({}) during the audit workload",
                    r.name, r.why
                ));
            }
        }
    }
    eprintln!("{report}");
    assert!(
        problems.is_empty(),
        "syscall audit failed:\n{}\n{report}",
        problems.join("\n")
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn forbidden_syscall_in_the_serving_phase_kills_the_server_and_names_it() {
    let d = dir("death");
    format(&d);
    let out = Command::new(BIN)
        .args(["server", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .arg("--listen")
        .arg(d.join("sock"))
        .arg("--test-forbidden-syscall")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(159), "stderr:\n{err}");
    assert!(
        err.contains(&format!("forbidden syscall {}", libc_openat())),
        "the reporter must name openat: {err}"
    );
    // Without the filter the same hook is harmless.
    let _ = std::fs::remove_dir_all(&d);
}

fn libc_openat() -> i64 {
    257
}

/// The standby path: syscalls of the main thread between its standby filter
/// and its serving filter (phases standby and failover-start) against the
/// standby table, after it against the serving table; the worker against
/// its table throughout.
#[test]
fn standby_and_failover_start_syscalls_match_the_audited_whitelist() {
    let d = dir("standby");
    format(&d);
    let sock = d.join("sock");
    let trace = d.join("trace");
    let mut child = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(BIN)
        .args(["server", "--standby", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .arg("--listen")
        .arg(&sock)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut p = Proc(child);
    let mut lines = String::new();
    let start = Instant::now();
    let read_until = |lines: &mut String, err: &mut std::process::ChildStderr, needle: &str| {
        while !lines
            .split_inclusive('\n')
            .any(|l| l.ends_with('\n') && l.contains(needle))
        {
            let mut b = [0u8; 4096];
            let n = std::io::Read::read(err, &mut b).unwrap();
            assert!(n > 0, "server stderr closed before {needle:?}:\n{lines}");
            lines.push_str(&String::from_utf8_lossy(&b[..n]));
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no {needle:?} in:\n{lines}"
            );
        }
    };
    read_until(&mut lines, &mut err, "standby ready");
    writeln!(stdin, "start member=1").unwrap();
    read_until(&mut lines, &mut err, "serving");
    let tcp = lines
        .lines()
        .find(|l| l.contains("listening on 127.0.0.1:"))
        .and_then(|l| Addr::parse(l.rsplit(' ').next().unwrap()).ok())
        .expect("TCP address");
    wait_for(&sock, &mut p);
    workload(&d, &Addr::Unix(sock.clone()), &tcp);
    std::thread::sleep(Duration::from_millis(200));
    drop(p);
    let text = std::fs::read_to_string(&trace).unwrap();
    // Killing strace detaches its tracee: kill the server itself (its pid is
    // the trace's first TID).
    if let Some(pid) = text.split_whitespace().next() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    let main_tid = text.split_whitespace().next().unwrap().to_string();
    let worker_tid = text
        .lines()
        .find(|l| l.contains("PR_SET_NAME, \"csnap-store\""))
        .and_then(|l| l.split_whitespace().next())
        .expect("worker thread in the trace")
        .to_string();
    let (mut main_filters, mut worker_filtered) = (0, false);
    let mut standby: BTreeSet<String> = BTreeSet::new();
    let mut serving: BTreeSet<String> = BTreeSet::new();
    let mut worker: BTreeSet<String> = BTreeSet::new();
    for line in text.lines() {
        let tid = line.split_whitespace().next().unwrap_or("");
        let is_filter = line.contains("seccomp(SECCOMP_SET_MODE_FILTER");
        if tid == main_tid {
            if is_filter {
                main_filters += 1;
                if main_filters == 2 {
                    // The serving table's own install counts as standby.
                    standby.insert("seccomp".into());
                }
                continue;
            }
            if let Some(n) = syscall_name(line) {
                match main_filters {
                    1 => {
                        standby.insert(n.to_string());
                    }
                    2.. => {
                        serving.insert(n.to_string());
                    }
                    _ => {}
                }
            }
        } else if tid == worker_tid {
            if is_filter {
                worker_filtered = true;
                continue;
            }
            if worker_filtered {
                if let Some(n) = syscall_name(line) {
                    worker.insert(n.to_string());
                }
            }
        }
    }
    assert_eq!(
        main_filters, 2,
        "the main thread installs standby, then serving filters"
    );
    assert!(worker_filtered);
    let mut problems = Vec::new();
    let mut check =
        |phase: &str, seen: &BTreeSet<String>, table: &[csnap_audit::Rule], must_use: &[&str]| {
            for s in seen {
                if !table.iter().any(|r| r.name == s) {
                    problems.push(format!("{phase}: {s} is not in the whitelist"));
                }
            }
            for m in must_use {
                if !seen.contains(*m) {
                    problems.push(format!("{phase}: whitelisted {m} was never used"));
                }
            }
        };
    let standby_table = csnap_audit::standby_network();
    check(
        "standby + failover-start (main thread)",
        &standby,
        &standby_table,
        &["read", "flock", "futex", "write", "seccomp", "prctl"],
    );
    check(
        "serving (main thread)",
        &serving,
        SERVING_NETWORK,
        &["epoll_wait", "recvfrom", "sendto"],
    );
    check(
        "all phases (store worker)",
        &worker,
        SERVING_STORE,
        // The stdin-started standby claims the store (nobody saw a former
        // server die): its worker sleeps out the lease.
        &[
            "futex",
            "pread64",
            "pwrite64",
            "fdatasync",
            "clock_nanosleep",
        ],
    );
    // The standby filter stays installed under the serving one, so each of
    // its rules must be used in one phase or the other.
    let both: BTreeSet<String> = standby.union(&serving).cloned().collect();
    for r in &standby_table {
        if r.exercised && !both.contains(r.name) {
            problems.push(format!(
                "standby table: {} was never used ({})",
                r.name, r.why
            ));
        }
    }
    eprintln!("standby+start: {standby:?}\nserving: {serving:?}\nworker: {worker:?}");
    assert!(
        problems.is_empty(),
        "standby audit failed:\n{}",
        problems.join("\n")
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The agent (`csnap agent`, one thread, confined once its pools exist)
/// under `strace -f -ff` with its filter enforcing, through a workload that
/// reaches every path of its loop: its first bus connection, clients and
/// tools on its socket (attach, I/O, disconnect, a refused request), its
/// standby announcing itself, a start it runs (gather, StartServer,
/// Serving, ServerUp, a new standby spawned), its server dying and a
/// failover elsewhere, a start again, its node leaving and joining, and the
/// controller restarting (the bus breaks, reconnect attempts fail, then
/// succeed), with the bus over TCP. Every syscall after its filter install must be in `AGENT`, and
/// every rule of `AGENT` not marked as an exit path must be used. The
/// controller runs under strace too, and is audited the same way against
/// `CONTROLLER` (its joins, placements, starts, status and cluster
/// commands, leave and join, and its restart).
#[test]
fn agent_syscalls_match_the_audited_whitelist() {
    use common::cluster::{Cluster, ClusterOpts, Rng, CHUNK};

    common::cluster::require_strace();
    let trace_dir = dir("agent");
    let prefix = trace_dir.join("t");
    let wrapper = common::cluster::strace_wrapper(&prefix);
    let ctl_prefix = trace_dir.join("c");
    let ctl_wrapper = common::cluster::strace_wrapper(&ctl_prefix);
    let mut rng = Rng::new(0x5eed);
    // The bus runs over TCP, as between hosts: the controller listens on
    // a loopback port besides its unix socket, and the agents connect
    // there (`setsockopt` TCP_NODELAY on both sides).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let bus = format!("127.0.0.1:{port}");
    let defaults = ClusterOpts::default();
    let mut controller_args = defaults.controller_args.clone();
    controller_args.extend(["--listen".to_string(), bus.clone()]);
    let mut c = Cluster::start(
        "agent-audit",
        ClusterOpts {
            nodes: 2,
            store_size: "48M",
            agent_wrapper: Some((1, wrapper)),
            controller_wrapper: Some(ctl_wrapper),
            agent_args: vec!["--controller".into(), bus],
            controller_args,
            ..defaults
        },
        &mut rng,
    );
    // A start on the traced node (the first demand goes to node 1).
    let mut w = c.io("origin", 11, 1);
    assert_eq!(c.status().node, 1);
    c.create(1);
    let mut r = c.io("1", 12, 1);
    let data = rng.bytes(3 * usize::try_from(CHUNK).unwrap());
    w.write(7, &data);
    r.read(0, 2 * CHUNK);
    // A client that goes away, and one whose request is refused (a node id
    // that is not this agent's).
    c.io("origin", 13, 1).quit();
    {
        let mut a =
            csnap_io::client::AgentClient::new(&c.agent_sock(1), 14, 2, Some(Volume::Snapshot(1)));
        assert!(a
            .need_server(0, Instant::now() + Duration::from_secs(5))
            .is_err());
    }
    // Its server dies: the failover goes to node 2; then back to node 1.
    c.wait_all_ready();
    let (inc, node, _) = c.kill_server();
    assert_eq!(node, 1);
    let st = c.wait_serving_above(inc);
    w.write(CHUNK, &data);
    r.read(0, 2 * CHUNK);
    c.wait_all_ready();
    let (inc, _, _) = c.kill_server();
    let st2 = c.wait_serving_above(inc);
    assert_eq!((st.node, st2.node), (2, 1));
    w.write(2 * CHUNK, &data);
    // Leave and join.
    c.wait_all_ready();
    assert!(c.cluster_cmd("leave", &["1"]).status.success());
    c.wait_serving_above(st2.incarnation);
    assert!(c.cluster_cmd("join", &["1"]).status.success());
    c.wait_all_ready();
    // The controller restarts: the bus breaks, reconnects fail while it is
    // down, then one succeeds.
    c.kill_controller();
    std::thread::sleep(Duration::from_millis(300));
    c.start_controller();
    c.wait_all_ready();
    w.write(3 * CHUNK, &data);
    r.read(0, CHUNK);
    w.quit();
    r.quit();
    c.stop();

    common::cluster::audit_confined_runs(&prefix, "agent", 1, csnap_audit::AGENT);
    // The controller, both of its runs (the one killed, the one after).
    common::cluster::audit_confined_runs(&ctl_prefix, "cluster", 2, csnap_audit::CONTROLLER);
    let _ = std::fs::remove_dir_all(&trace_dir);
}
