//! Confinement benchmark: 1,000,000 metadata requests through `csnap server`
//! with confinement on (mlockall, sealed heap, seccomp) and off (`--no-mlock
//! --no-seccomp --seal off`), in one run. Prints the server's resident memory
//! after a warm-up and after the run (no growth expected), and the request
//! rate of both, as a ratio.
//!
//! Run: `cargo build --release -p csnap && cargo run --release -p csnap --bin confinement-bench [-- --requests N]`

use std::path::Path;

mod common;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csnap_fsm::client::Request;
use csnap_io::client::{control, Connection, VolumeClient};
use csnap_io::net::Addr;
use csnap_proto::{Msg, Range, Volume};

const CHUNK: u64 = 16384;
const ORIGIN_BYTES: u64 = 16 << 20;
const CLIENTS: u64 = 4;

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn start(bin: &Path, d: &Path, confined: bool) -> Result<(Server, Addr), String> {
    let sock = d.join(if confined { "on.sock" } else { "off.sock" });
    let mut cmd = Command::new(bin);
    cmd.args(["server", "--origin"])
        .arg(d.join("origin"))
        .arg("--store")
        .arg(d.join("store"))
        .arg("--listen")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !confined {
        cmd.args(["--no-mlock", "--no-seccomp", "--seal", "off"]);
    }
    let mut s = Server(
        cmd.spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?,
    );
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(st)) = s.0.try_wait() {
            return Err(format!("server exited: {st}"));
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err("server did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((s, Addr::Unix(sock)))
}

/// `n` requests from one client: snapshot read queries (origin targets with
/// read locks, then releases) and origin write queries on chunks already
/// copied out (pure metadata).
fn drive(addr: &Addr, d: &Path, client: u64, n: u64) -> Result<(), String> {
    let (origin, store) = (d.join("origin"), d.join("store"));
    let mut snap = VolumeClient::open(addr, &origin, &store, Volume::Snapshot(1), 10 + client, 1)
        .map_err(|e| e.to_string())?;
    let mut orig = Connection::connect(
        addr,
        csnap_fsm::client::ClientConfig {
            client_id: 100 + client,
            node_id: 1,
            role: csnap_proto::Role::Client,
            volume: Volume::Origin,
            origin_uuid: label_uuid(&store)?,
            caching: false,
        },
    )
    .map_err(|e| e.to_string())?;
    let chunks = ORIGIN_BYTES / CHUNK;
    let half = chunks / 2;
    for i in 0..n {
        let c = (i * 7 + client) % half;
        if i % 2 == 0 {
            // Chunks of the upper half are still on the origin.
            let r = Range {
                chunk: half + c,
                chunks: 1,
            };
            let conn = snap.connection();
            match conn
                .call(Request::SnapshotRead(r))
                .map_err(|e| e.to_string())?
            {
                Msg::SnapshotReadReply(_) => {}
                m => return Err(format!("unexpected {m:?}")),
            }
            conn.note_locked(r);
            conn.release(r).map_err(|e| e.to_string())?;
        } else {
            let r = Range {
                chunk: c,
                chunks: 1,
            };
            match orig
                .call(Request::OriginWrite(r))
                .map_err(|e| e.to_string())?
            {
                Msg::OriginWriteOk(_) => {}
                m => return Err(format!("unexpected {m:?}")),
            }
        }
    }
    Ok(())
}

fn label_uuid(store: &Path) -> Result<[u8; 16], String> {
    let mut d = csnap_store::disk::FileDisk::open_read_only(store).map_err(|e| e.to_string())?;
    Ok(csnap_store::read_label(&mut d)
        .map_err(|e| e.to_string())?
        .origin_uuid)
}

fn run_config(bin: &Path, d: &Path, confined: bool, total: u64) -> Result<(f64, u64, u64), String> {
    let (s, addr) = start(bin, d, confined)?;
    let pid = s.0.id();
    // Warm-up: copy out the lower half once, so origin queries are pure
    // metadata afterwards.
    {
        let (origin, store) = (d.join("origin"), d.join("store"));
        let mut o = VolumeClient::open(&addr, &origin, &store, Volume::Origin, 1, 1)
            .map_err(|e| e.to_string())?;
        let data = vec![1u8; 16384];
        for c in 0..ORIGIN_BYTES / CHUNK / 2 {
            o.write_at(&data, c * CHUNK).map_err(|e| e.to_string())?;
        }
    }
    std::thread::scope(|sc| {
        let addr = &addr;
        let hs: Vec<_> = (0..CLIENTS)
            .map(|c| sc.spawn(move || drive(addr, d, c, 10_000)))
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().map_err(|_| "client panicked".to_string())?)
    })?;
    let rss_before = rss_kb(pid);
    let t = Instant::now();
    let per = total / CLIENTS;
    std::thread::scope(|sc| {
        let addr = &addr;
        let hs: Vec<_> = (0..CLIENTS)
            .map(|c| sc.spawn(move || drive(addr, d, c, per)))
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().map_err(|_| "client panicked".to_string())?)
    })?;
    let secs = t.elapsed().as_secs_f64();
    let rss_after = rss_kb(pid);
    drop(s);
    Ok(((per * CLIENTS) as f64 / secs, rss_before, rss_after))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("confinement-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if !common::check_args(
        &args,
        &["--requests"],
        "usage: confinement-bench [--requests N]   (default 1000000: metadata requests through \
         csnap server with confinement on and off)",
    )? {
        return Ok(());
    }
    let total: u64 = common::flag(&args, "--requests", 1_000_000)?;
    let bin = common::csnap_bin()?;
    common::in_scratch_dir("confinement-bench", |d| {
        std::fs::write(d.join("origin"), vec![7u8; 16 << 20]).map_err(|e| e.to_string())?;
        let st = Command::new(&bin)
            .args(["format", "--origin"])
            .arg(d.join("origin"))
            .arg("--store")
            .arg(d.join("store"))
            .args(["--store-size", "256M"])
            .output()
            .map_err(|e| e.to_string())?;
        if !st.status.success() {
            return Err(String::from_utf8_lossy(&st.stderr).to_string());
        }
        println!(
            "confinement-bench: {total} requests per configuration ({CLIENTS} clients, one request in flight each: half snapshot-read queries with read locks and releases, half origin-write queries on chunks already copied out), nproc {}",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        // A snapshot for the readers (the store persists across runs).
        {
            let (s, addr) = start(&bin, d, false)?;
            let mut c = control(&addr).map_err(|e| e.to_string())?;
            let _ = c.call(Request::Create(1));
            drop(c);
            drop(s);
        }
        // Two rounds per configuration, interleaved (on, off, on, off), so
        // that load from elsewhere on the machine hits both alike; each
        // configuration serves `total` requests in all.
        let mut secs = [0.0f64; 2];
        for round in 0..2 {
            for (k, confined) in [true, false].into_iter().enumerate() {
                let (rate, before, after) = run_config(&bin, d, confined, total / 2)?;
                let name = if confined {
                    "confinement on "
                } else {
                    "confinement off"
                };
                println!(
                    "round {round} {name}: {rate:>9.0} requests/s; server RSS {before} kB after warm-up, {after} kB after {} requests (growth {} kB)",
                    total / 2,
                    after.cast_signed() - before.cast_signed()
                );
                secs[k] += (total / 2) as f64 / rate;
            }
        }
        let rows = [total as f64 / secs[0], total as f64 / secs[1]];
        println!(
            "confinement on : {:>9.0} requests/s over {total} requests\nconfinement off: {:>9.0} requests/s over {total} requests",
            rows[0], rows[1]
        );
        println!(
            "ratio on/off: {:.3} (confinement costs {:.1}% of the request rate)",
            rows[0] / rows[1],
            (1.0 - rows[0] / rows[1]) * 100.0
        );
        Ok(())
    })
}
