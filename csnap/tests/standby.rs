//! A standby server: everything reserved, memory locked, heap sealed, the
//! standby filter installed, the store not read; `start` on its standard
//! input takes over the store of a server that died (journal replayed, next
//! incarnation), holds origin writes at the recovery barrier until the
//! expected snapshot client is back, and serves.

mod common;

use common::Proc;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_csnap");

fn dir(name: &str) -> PathBuf {
    common::fresh_dir("standby", name)
}

fn wait_sock(sock: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no server on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `csnap io` client: commands in, one reply line each out.
struct Io {
    _p: Proc,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Io {
    fn open(d: &Path, sock: &Path, volume: &str, client_id: u64) -> Io {
        let mut c = Command::new(BIN)
            .args(["io", "--server"])
            .arg(sock)
            .arg("--origin")
            .arg(d.join("origin"))
            .arg("--store")
            .arg(d.join("store"))
            .args([
                "--volume",
                volume,
                "--client-id",
                &client_id.to_string(),
                "--node-id",
                "1",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = c.stdin.take().unwrap();
        let out = c.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let io = Io {
            _p: Proc(c),
            stdin,
            lines: rx,
        };
        let first = io
            .lines
            .recv_timeout(Duration::from_secs(20))
            .expect("io client ready");
        assert!(first.starts_with("ready"), "{first}");
        io
    }
    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
    }
    fn reply(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }
}

fn stderr_lines(c: &mut Child) -> mpsc::Receiver<String> {
    let err = c.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    let t = Instant::now();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no line containing {needle:?}"));
        if l.contains(needle) {
            return l;
        }
        assert!(t.elapsed() < Duration::from_secs(30));
    }
}

#[test]
fn standby_takes_over_a_dead_server_and_holds_writes_at_the_recovery_barrier() {
    let d = dir("takeover");
    std::fs::write(d.join("origin"), vec![0x42u8; 4 << 20]).unwrap();
    let st = Command::new(BIN)
        .args(["format", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .args(["--store-size", "48M"])
        .output()
        .unwrap();
    assert!(st.status.success());
    let (sock1, sock2) = (d.join("s1"), d.join("s2"));
    // The first server, with a snapshot and a snapshot reader holding a read
    // lock... then it dies.
    let first = Proc(
        Command::new(BIN)
            .args(["server", "--origin"])
            .arg(d.join("origin"))
            .arg("--store")
            .arg(d.join("store"))
            .arg("--listen")
            .arg(&sock1)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_sock(&sock1);
    let o = Command::new(BIN)
        .args(["snapshot", "create", "--server"])
        .arg(&sock1)
        .arg("1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = d.join("data");
    std::fs::write(&data, vec![7u8; 20_000]).unwrap();
    {
        let mut w = Io::open(&d, &sock1, "origin", 1);
        w.send(&format!("write 0 {}", data.display()));
        assert!(w.reply(Duration::from_secs(10)).unwrap().starts_with("ok"));
    }
    drop(first); // SIGKILL

    // The standby: ready without reading the store.
    let mut sb = Command::new(BIN)
        .args(["server", "--standby", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .arg("--listen")
        .arg(&sock2)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = stderr_lines(&mut sb);
    let mut ctl = sb.stdin.take().unwrap();
    let sb = Proc(sb);
    wait_line(&err, "standby ready");
    let pid = sb.0.id();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let s = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        assert!(
            s.contains("Seccomp:\t2"),
            "standby threads run under their filters"
        );
    }
    // Start: client 9 on node 1 (a snapshot client of the dead server) is
    // expected back.
    writeln!(ctl, "start member=1 expect=9:1").unwrap();
    // Started from standard input, nobody saw the former server die: the
    // standby claims the store (two above the dead server's incarnation,
    // itself a server started by hand, which claimed too) and waits out
    // its lease first, then takes the next incarnation.
    let number_after = |line: &str, what: &str| -> u64 {
        line.split(what)
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {what:?} in {line:?}"))
    };
    let claimed = wait_line(&err, "takeover: claimed incarnation");
    let claimed = number_after(&claimed, "claimed incarnation ");
    let started = wait_line(&err, "started incarnation");
    assert_eq!(
        number_after(&started, "started incarnation "),
        claimed + 1,
        "{started}"
    );
    assert!(
        started.contains("1 journal commit(s) replayed"),
        "{started}"
    );
    eprintln!("{started}");

    // An origin write reaches the new incarnation: held at the barrier.
    let mut w = Io::open(&d, &sock2, "origin", 2);
    w.send(&format!("write 0 {}", data.display()));
    assert!(
        w.reply(Duration::from_millis(400)).is_none(),
        "no origin write during recovery"
    );
    // Client 9 comes back (no locks to upload any more): the barrier lifts.
    let mut r = Io::open(&d, &sock2, "1", 9);
    let reply = w
        .reply(Duration::from_secs(10))
        .expect("the write is granted after the barrier");
    assert!(reply.starts_with("ok"), "{reply}");
    // The snapshot still holds the data from before its creation.
    let out = d.join("out");
    r.send(&format!("read 0 20000 {}", out.display()));
    assert!(r.reply(Duration::from_secs(10)).unwrap().starts_with("ok"));
    assert_eq!(std::fs::read(&out).unwrap(), vec![0x42u8; 20_000]);
    drop(sb);
    let _ = std::fs::remove_dir_all(&d);
}
