//! The serving phase allocates nothing and faults no page: 100,000 mixed
//! requests through a `csnap server` whose heap is sealed in abort mode (any
//! allocation after the seal kills it with a message naming the phase),
//! including copy-outs, snapshot reads with read locks and releases,
//! snapshot writes, snapshot create and delete, connects and disconnects, a
//! store-full episode and a pool-exhaustion episode. Then its locked memory
//! and page faults are read from /proc.

// Test code: small test-sized numbers.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use csnap_fsm::client::Request;
use csnap_io::client::{control, ClientError, VolumeClient};
use csnap_io::net::Addr;
use csnap_proto::{ErrorCode, Msg, Volume};

const BIN: &str = env!("CARGO_BIN_EXE_csnap");
const CHUNK: u64 = 16384;
const ORIGIN_BYTES: u64 = 4 << 20;

use common::Proc as Server;

fn dir(name: &str) -> PathBuf {
    common::fresh_dir("sealed", name)
}

fn start(d: &Path, store_size: &str, extra: &[&str]) -> (Server, Addr) {
    std::fs::write(d.join("origin"), vec![0x5au8; ORIGIN_BYTES as usize]).unwrap();
    let st = Command::new(BIN)
        .args(["format", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .args([
            "--store-size",
            store_size,
            "--chunk-size",
            "16K",
            "--journal-blocks",
            "256",
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let sock = d.join("sock");
    let child = Command::new(BIN)
        .args(["server", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .arg("--listen")
        .arg(&sock)
        .args(["--seal", "abort"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut s = Server(child);
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(st)) = s.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = s.0.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("server exited at start: {st}; stderr:\n{err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (s, Addr::Unix(sock))
}

fn alive(s: &mut Server, when: &str) {
    if let Ok(Some(st)) = s.0.try_wait() {
        let mut err = String::new();
        if let Some(mut e) = s.0.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        panic!("{when}: the sealed server died ({st}); stderr:\n{err}");
    }
}

fn proc_status(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kb("VmLck:"), kb("VmRSS:"))
}

/// Minor and major faults of the whole process (all threads).
fn faults(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state(3) ... minflt(10) cminflt majflt(12).
    (f[7].parse().unwrap(), f[9].parse().unwrap())
}

/// One round of mixed work; returns the number of requests it made.
fn workload(addr: &Addr, d: &Path, round: u32, target: u64) -> u64 {
    let (origin, store) = (d.join("origin"), d.join("store"));
    let mut ctl = control(addr).unwrap();
    let mut n = 0u64;
    let chunks = ORIGIN_BYTES / CHUNK;
    let data = vec![round as u8; CHUNK as usize];
    let mut buf = vec![0u8; CHUNK as usize];
    let mut tag = round * 1000;
    while n < target {
        tag += 1;
        assert!(matches!(ctl.call(Request::Create(tag)).unwrap(), Msg::Ok));
        n += 1;
        {
            let mut o = VolumeClient::open(addr, &origin, &store, Volume::Origin, 1, 1).unwrap();
            let mut s =
                VolumeClient::open(addr, &origin, &store, Volume::Snapshot(tag), 2, 1).unwrap();
            n += 2;
            for c in 0..chunks {
                // Snapshot read first (origin target: lock, read, release),
                // then the origin write (copy-out), then a snapshot read of
                // the copied chunk, a rewrite, and a snapshot write.
                s.read_at(&mut buf, c * CHUNK).unwrap();
                o.write_at(&data, c * CHUNK).unwrap();
                s.read_at(&mut buf, c * CHUNK).unwrap();
                o.write_at(&data, c * CHUNK).unwrap();
                if c % 4 == 0 {
                    s.write_at(&data[..100], c * CHUNK + 7).unwrap();
                    n += 1;
                }
                n += 4;
            }
        }
        // Connections closed; the snapshot is no longer in use.
        let mut deleted = false;
        for _ in 0..100 {
            match ctl.call(Request::Delete(tag)) {
                Ok(_) => {
                    deleted = true;
                    break;
                }
                Err(ClientError::Server {
                    code: ErrorCode::Busy,
                    ..
                }) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("delete {tag}: {e}"),
            }
        }
        assert!(
            deleted,
            "snapshot {tag} stayed in use after its clients left"
        );
        n += 2;
        let _ = ctl.call(Request::Status).unwrap();
        n += 1;
    }
    n
}

#[test]
fn sealed_server_serves_100k_mixed_requests_without_allocating() {
    let d = dir("mixed");
    let (mut s, addr) = start(&d, "96M", &["--clients", "6", "--read-locks", "64"]);
    let pid = s.0.id();
    let mut total = 0;
    // Pool exhaustion: connections past --clients are refused with a clear
    // error while the server goes on.
    let mut hold = Vec::new();
    for _ in 0..6 {
        if let Ok(c) = control(&addr) {
            hold.push(c);
        }
    }
    match control(&addr) {
        Err(ClientError::Server {
            code: ErrorCode::TooManyClients,
            ..
        }) => {}
        Err(ClientError::Io(_)) => {}
        other => panic!("expected a refusal past --clients, got {other:?}"),
    }
    drop(hold);
    std::thread::sleep(Duration::from_millis(100));
    alive(&mut s, "after the pool-exhaustion episode");
    // Warm-up round, then the measured rounds.
    total += workload(&addr, &d, 1, 10_000);
    alive(&mut s, "after warm-up");
    let f0 = faults(pid);
    total += workload(&addr, &d, 2, 45_000);
    alive(&mut s, "after round 2");
    let f1 = faults(pid);
    total += workload(&addr, &d, 3, 45_000);
    alive(&mut s, "after round 3");
    let f2 = faults(pid);
    assert!(total >= 100_000, "only {total} requests");
    // Every thread of the server runs under its seccomp filter.
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let st = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        assert!(
            st.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
            "a server thread is not in seccomp filter mode"
        );
    }
    let (lck, rss) = proc_status(pid);
    eprintln!(
        "{total} requests; VmLck {lck} kB, VmRSS {rss} kB; faults (minor, major) after warm-up {f0:?}, after round 2 {f1:?}, after round 3 {f2:?}"
    );
    assert!(
        lck >= rss,
        "locked memory ({lck} kB) must cover the resident set ({rss} kB)"
    );
    assert_eq!(f2.1, f0.1, "major page faults grew while serving");
    assert!(
        f2.0 - f1.0 <= 16,
        "minor page faults grew by {} across a second identical run",
        f2.0 - f1.0
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn sealed_server_survives_a_store_full_episode() {
    let d = dir("full");
    // A store with room for few copy-outs.
    let (mut s, addr) = start(&d, "3M", &[]);
    let (origin, store) = (d.join("origin"), d.join("store"));
    let mut ctl = control(&addr).unwrap();
    assert!(matches!(ctl.call(Request::Create(1)).unwrap(), Msg::Ok));
    let mut o = VolumeClient::open(&addr, &origin, &store, Volume::Origin, 1, 1).unwrap();
    let data = vec![7u8; CHUNK as usize];
    let mut refused = 0;
    for c in 0..ORIGIN_BYTES / CHUNK {
        match o.write_at(&data, c * CHUNK) {
            Ok(()) => {}
            Err(e) => {
                assert!(e.to_string().contains("full"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the store never filled");
    alive(&mut s, "after the store-full episode");
    // Deleting the snapshot frees the store; writes go through again.
    drop(o);
    assert!(matches!(ctl.call(Request::Delete(1)).unwrap(), Msg::Ok));
    let mut o = VolumeClient::open(&addr, &origin, &store, Volume::Origin, 1, 1).unwrap();
    assert!(matches!(ctl.call(Request::Create(2)).unwrap(), Msg::Ok));
    o.write_at(&data, 0).unwrap();
    alive(&mut s, "after recovery from store full");
    let _ = std::fs::remove_dir_all(&d);
}
