//! The operator's view (#13): `csnap up --metrics ADDR` serves the node's
//! Prometheus metrics, checked with a real parser (`promtool check metrics`,
//! Debian's `prometheus` package, installed by `.ci/packages.sh`), whose
//! values move with the traffic (bytes written after a write, the snapshot
//! gauge after a create, copy-outs, the incarnation and the failover count
//! after the serving server is SIGKILLed); hostile HTTP clients get 400,
//! 404 or 405 or lose their slot at the deadline while NBD goes on; and
//! `--json` of `status`, `snapshot list` and `cluster status` parsed with
//! Python's `json` module.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{csnap_pids, kill};
use common::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_csnap");

/// The incarnation of a formatted store's first server: the start claims
/// the store (two above the formatted 0; nobody saw a former server die)
/// and then takes the next one (ARCHITECTURE 5.5).
const FIRST: f64 = 3.0;

/// A free TCP port on loopback (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP exchange: the raw response.
fn http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8(out).expect("utf-8 response")
}

/// `GET /metrics`: checks the head, the length, and the body with promtool;
/// returns the samples (`name{labels}` → value).
fn scrape(addr: SocketAddr) -> (String, HashMap<String, f64>) {
    checked(&http(addr, SCRAPE))
}

const SCRAPE: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n";

/// One HTTP exchange over a unix socket.
fn http_unix(path: &Path, request: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8(out).expect("utf-8 response")
}

/// A scrape's response checked (head, length, promtool) and its samples.
fn checked(r: &str) -> (String, HashMap<String, f64>) {
    let (head, body) = r.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"), "{head}");
    let hdrs: Vec<&str> = lines.collect();
    assert!(
        hdrs.contains(&"Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    let len: usize = hdrs
        .iter()
        .find_map(|h| h.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length");
    promtool(body);
    let mut m = HashMap::new();
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let (k, v) = l.rsplit_once(' ').expect("name value");
        m.insert(k.to_string(), v.parse::<f64>().expect("a number"));
    }
    (body.to_string(), m)
}

/// `promtool check metrics` on the text: parse errors and lint problems
/// both fail.
fn promtool(body: &str) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus, .ci/packages.sh)");
    c.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scrape whose server figures are this scrape's (`csnap_server_up` 1:
/// the server answered the NBD server's status question in time; on a
/// loaded machine it may not, and the figures are then the last known).
fn fresh(addr: SocketAddr) -> (String, HashMap<String, f64>) {
    wait_until(
        "a scrape with the server's answer",
        Duration::from_secs(60),
        || {
            let (b, m) = scrape(addr);
            (get(&m, "csnap_server_up") == 1.0).then_some((b, m))
        },
    )
}

fn get(m: &HashMap<String, f64>, k: &str) -> f64 {
    *m.get(k)
        .unwrap_or_else(|| panic!("no sample {k} in {:?}", m.keys()))
}

/// A value from JSON printed by `csnap ... --json`, through Python's parser
/// (`expr` is evaluated with the document as `d`).
fn json(out: &str, expr: &str) -> String {
    let mut c = Command::new("python3")
        .args([
            "-c",
            "import json,sys; d=json.load(sys.stdin); print(json.dumps(eval(sys.argv[1])))",
            expr,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(out.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "json.load of {out:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn csnap_out(args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).output().unwrap();
    assert!(o.status.success(), "csnap {args:?}: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

fn qemu_io(url: &str, cmd: &str) {
    let o = Command::new("qemu-io")
        .args(["-f", "raw", url, "-c", cmd])
        .output()
        .unwrap();
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"),
        "qemu-io {cmd}: {o:?}"
    );
}

fn wait_until<T>(what: &str, t: Duration, f: impl FnMut() -> Option<T>) -> T {
    csnap_testkit::wait_for_every(what, t, Duration::from_millis(100), f)
}

struct Up {
    proc: Option<Proc>,
    dir: PathBuf,
    out: PathBuf,
}

impl Up {
    fn start(d: &Path, metrics: &str) -> Up {
        let out = d.join("up.out");
        let f = std::fs::File::create(&out).unwrap();
        let child = Command::new(BIN)
            .args(["up", "--dir"])
            .arg(d.join("up"))
            .args(["--origin-size", "64M", "--store-size", "128M"])
            .args(["--metrics", metrics])
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let up = Up {
            proc: Some(Proc(child)),
            dir: d.join("up"),
            out: out.clone(),
        };
        wait_until("csnap up", Duration::from_secs(60), || {
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("csnap up: serving")
                .then_some(())
        });
        up
    }

    fn url(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn stop(mut self) {
        let mut p = self.proc.take().unwrap();
        kill(p.0.id(), libc::SIGTERM);
        let st = wait_until("csnap up to stop", Duration::from_secs(30), || {
            p.0.try_wait().unwrap()
        });
        assert!(st.success(), "csnap up exited {st}");
        std::mem::forget(p);
        let text = std::fs::read_to_string(&self.out).unwrap();
        assert!(text.contains("everything is on disk"), "{text}");
    }
}

#[test]
fn metrics_and_json_of_a_running_node() {
    let d = common::fresh_dir("metrics", "up");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up = Up::start(&d, &addr.to_string());

    // At start: parsed, the build, no snapshot, nothing written.
    let (body, m) = fresh(addr);
    assert_eq!(
        get(
            &m,
            &format!(
                "csnap_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert_eq!(get(&m, "csnap_snapshots"), 0.0);
    assert_eq!(get(&m, "csnap_server_up"), 1.0);
    // The first start claims the store (ARCHITECTURE 5.5: two above the
    // formatted store's 0), then takes the next incarnation.
    assert_eq!(get(&m, "csnap_server_incarnation"), FIRST);
    assert_eq!(get(&m, "csnap_failovers_total"), 0.0);
    assert_eq!(
        get(&m, "csnap_nbd_written_bytes_total{export=\"origin\"}"),
        0.0
    );
    assert!(get(&m, "csnap_store_size_bytes") > 100e6);
    for f in [
        "csnap_nbd_read_bytes_total",
        "csnap_nbd_requests_total",
        "csnap_nbd_request_duration_seconds",
        "csnap_copyouts_total",
        "csnap_store_used_bytes",
        "csnap_read_locks",
        "csnap_waiting_writes",
    ] {
        assert!(body.contains(&format!("# TYPE {f} ")), "{f} missing");
    }

    // A write: the bytes, the request and its duration move.
    qemu_io(&up.url("origin"), "write -P 0xa1 0 1M");
    let (_, m) = fresh(addr);
    assert_eq!(
        get(&m, "csnap_nbd_written_bytes_total{export=\"origin\"}"),
        1048576.0
    );
    assert!(get(&m, "csnap_nbd_requests_total{op=\"write\"}") >= 1.0);
    assert_eq!(
        get(&m, "csnap_nbd_request_duration_seconds_count{op=\"write\"}"),
        get(&m, "csnap_nbd_requests_total{op=\"write\"}")
    );
    assert_eq!(get(&m, "csnap_copyouts_total"), 0.0);

    // A snapshot: the gauge; a write over it: copy-outs and store use; a
    // read of the snapshot export: its own series.
    csnap_out(&["snapshot", "create", "--dir", up.d(), "7"]);
    let (_, m) = fresh(addr);
    assert_eq!(get(&m, "csnap_snapshots"), 1.0);
    qemu_io(&up.url("origin"), "write -P 0xa2 0 1M");
    qemu_io(&up.url("7"), "read -P 0xa1 0 1M");
    let (_, m) = fresh(addr);
    assert_eq!(
        get(&m, "csnap_copyouts_total"),
        64.0,
        "1 MiB of 16 KiB chunks"
    );
    assert_eq!(get(&m, "csnap_store_used_bytes"), 1048576.0);
    assert_eq!(
        get(&m, "csnap_nbd_read_bytes_total{export=\"7\"}"),
        1048576.0
    );
    assert_eq!(
        get(&m, "csnap_nbd_written_bytes_total{export=\"origin\"}"),
        2.0 * 1048576.0
    );

    // A snapshot's series lives while the snapshot does.
    csnap_out(&["snapshot", "create", "--dir", up.d(), "8"]);
    qemu_io(&up.url("8"), "read 0 4k");
    let (body, _) = fresh(addr);
    assert!(body.contains("csnap_nbd_read_bytes_total{export=\"8\"} 4096\n"));
    csnap_out(&["snapshot", "delete", "--dir", up.d(), "8"]);
    let (body, m) = fresh(addr);
    assert!(!body.contains("export=\"8\""), "{body}");
    assert_eq!(get(&m, "csnap_snapshots"), 1.0);

    // JSON, through a real parser, agreeing with the metrics.
    let st = csnap_out(&["status", "--dir", up.d(), "--json"]);
    assert_eq!(json(&st, "d['snapshots']"), "1");
    assert_eq!(json(&st, "d['state']"), "\"serving\"");
    assert_eq!(json(&st, "d['store_used_bytes']"), "1048576");
    assert_eq!(json(&st, "d['copyouts']"), "64");
    assert_eq!(json(&st, "d['incarnation']"), FIRST.to_string());
    let l = csnap_out(&["snapshot", "list", "--dir", up.d(), "--json"]);
    assert_eq!(json(&l, "[s['tag'] for s in d]"), "[7]");
    assert_eq!(json(&l, "d[0]['unique_chunks']"), "64");
    assert_eq!(json(&l, "d[0]['state']"), "\"idle\"");
    let cl_dir = up.dir.join("cluster");
    let cl = cl_dir.to_str().unwrap();
    let c = csnap_out(&["cluster", "status", "--dir", cl, "--json"]);
    assert_eq!(json(&c, "d['store_failed']"), "false");
    assert_eq!(json(&c, "d['server']['node']"), "1");
    assert_eq!(json(&c, "[n['serving'] for n in d['nodes']]"), "[true]");
    let server_addr: String = serde_free_string(&json(&c, "d['server']['addr']"));

    // Hostile HTTP: answered with an error, never a crash.
    for (req, want) in [
        (&b"POST /metrics HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 405 "),
        (b"GET /other HTTP/1.1\r\n\r\n", "HTTP/1.1 404 "),
        (b"\x16\x03\x01 garbage\r\n\r\n", "HTTP/1.1 400 "),
    ] {
        let r = http(addr, req);
        assert!(r.starts_with(want), "{req:?}: {r}");
    }
    let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    long.resize(8192, b'a');
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&long);
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 400 "), "oversized head: {r}");
    // Clients that send nothing hold every slot, and one more: NBD goes
    // on, and each loses its slot at the deadline (closed by the server).
    let idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
    qemu_io(&up.url("7"), "read -P 0xa1 0 64k");
    let t = Instant::now();
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0, "an idle client is closed");
    }
    assert!(t.elapsed() < Duration::from_secs(20));
    scrape(addr);

    // A failover: the serving server SIGKILLed; the incarnation and the
    // failover count move.
    let pids = csnap_pids(&[["--listen", &server_addr]]);
    assert_eq!(pids.len(), 1, "the serving server at {server_addr}");
    kill(pids[0], libc::SIGKILL);
    let m = wait_until(
        "a new incarnation in the metrics",
        Duration::from_secs(30),
        || {
            let (_, m) = fresh(addr);
            (get(&m, "csnap_server_incarnation") >= FIRST + 1.0
                && get(&m, "csnap_server_up") == 1.0)
                .then_some(m)
        },
    );
    assert_eq!(get(&m, "csnap_failovers_total"), 1.0);
    assert_eq!(get(&m, "csnap_snapshots"), 1.0);
    assert_eq!(get(&m, "csnap_copyouts_total"), 0.0, "a new server process");
    qemu_io(&up.url("origin"), "read -P 0xa2 0 1M");
    let c = csnap_out(&["cluster", "status", "--dir", cl, "--json"]);
    // A death its agent saw: no claim, the next incarnation.
    assert_eq!(
        json(&c, "d['server']['incarnation']"),
        (FIRST + 1.0).to_string()
    );
    up.stop();
}

/// A JSON string's value as Python printed it (`"..."`, no escapes in a
/// socket path).
fn serde_free_string(s: &str) -> String {
    s.trim_matches('"').to_string()
}

#[test]
fn a_standalone_server_serves_its_own_metrics() {
    let d = common::fresh_dir("metrics", "server");
    let origin = d.join("origin.img");
    std::fs::File::create(&origin)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let store = d.join("store.img");
    let (o, s) = (origin.to_str().unwrap(), store.to_str().unwrap());
    csnap_out(&["format", "--origin", o, "--store", s, "--store-size", "64M"]);
    let sock = d.join("server.sock");
    let msock = d.join("metrics.sock");
    let log = std::fs::File::create(d.join("server.log")).unwrap();
    let p = Proc(
        Command::new(BIN)
            .args(["server", "--origin", o, "--store", s, "--listen"])
            .arg(&sock)
            .arg("--metrics")
            .arg(&msock)
            .arg("--no-mlock")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_until("the server", Duration::from_secs(30), || {
        std::fs::read_to_string(d.join("server.log"))
            .unwrap_or_default()
            .contains("metrics at")
            .then_some(())
    });
    let (_, m) = checked(&http_unix(&msock, SCRAPE));
    // Started by hand: it claimed the store first.
    assert_eq!(get(&m, "csnap_server_incarnation"), FIRST);
    assert_eq!(get(&m, "csnap_snapshots"), 0.0);
    assert!(get(&m, "csnap_store_size_bytes") > 30e6);
    let srv = sock.to_str().unwrap();
    csnap_out(&["snapshot", "create", "--server", srv, "1"]);
    csnap_out(&["snapshot", "create", "--server", srv, "2"]);
    let (_, m) = checked(&http_unix(&msock, SCRAPE));
    assert_eq!(get(&m, "csnap_snapshots"), 2.0);
    assert_eq!(get(&m, "csnap_server_clients"), 0.0);
    let st = csnap_out(&["status", "--server", srv, "--json"]);
    assert_eq!(json(&st, "d['snapshots']"), "2");
    assert_eq!(
        json(&st, "d['store_size_bytes']"),
        format!("{}", get(&m, "csnap_store_size_bytes"))
    );
    let r = http_unix(&msock, b"PUT /metrics HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    drop(p);
}

#[test]
fn an_agent_serves_membership_and_failovers() {
    use common::cluster::{Cluster, ClusterOpts, Rng};
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let opts = ClusterOpts {
        nodes: 1,
        agent_args: vec!["--metrics".into(), addr.to_string()],
        ..ClusterOpts::default()
    };
    let c = Cluster::start("metrics-agent", opts, &mut Rng::new(13));
    c.wait_all_ready();
    let (_, m) = scrape(addr);
    assert_eq!(get(&m, "csnap_agent_member"), 1.0);
    assert_eq!(get(&m, "csnap_agent_standby_ready"), 1.0);
    // A tool through the agent places the server.
    let sock = c.agent_sock(1);
    csnap_out(&["status", "--agent", sock.to_str().unwrap(), "--json"]);
    let (_, m) = scrape(addr);
    assert_eq!(get(&m, "csnap_server_incarnation"), FIRST);
    assert_eq!(get(&m, "csnap_agent_serving_incarnation"), FIRST);
    assert_eq!(get(&m, "csnap_failovers_total"), 0.0);
    c.kill_server();
    c.wait_serving_above(3);
    let m = wait_until(
        "the failover in the agent's metrics",
        Duration::from_secs(30),
        || {
            let (_, m) = scrape(addr);
            (get(&m, "csnap_server_incarnation") > FIRST).then_some(m)
        },
    );
    assert_eq!(get(&m, "csnap_failovers_total"), 1.0);
    let r = http(addr, b"GET /nope HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
}
