//! `csnap demo`: a self-checking scenario on files in a temporary directory.
//!
//! Formats a store for a 32 MiB origin, starts a server on a unix socket in
//! the directory, and runs several clients at once: origin writers, snapshot
//! readers (on every live snapshot, concurrently with the origin writes), and
//! a snapshot writer, while the control thread creates and deletes snapshots.
//! Every volume has an in-memory shadow; every read is compared with it, and
//! at the end every snapshot and the origin are compared in full. Timings are
//! printed. Exits 0 only when every check passed.
//!
//! Snapshot creation pauses the origin writers (no write in flight), as a
//! filesystem freeze would, so the snapshot's shadow is exact.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use clap::Args;
use csnap_fsm::client::Request;
use csnap_fsm::server::ServerConfig;
use csnap_io::client::{control, ClientError, VolumeClient};
use csnap_io::net::Addr;
use csnap_io::server::{ServerLoop, BATCH_MAX};
use csnap_io::store_worker::StoreWorker;
use csnap_proto::{ErrorCode, Msg, Volume};
use csnap_store::disk::FileDisk;
use csnap_store::{FormatOptions, OpenOptions, Store};

use crate::{error, output, EXIT_FAILED};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory for the files (default: a new temporary directory, removed
    /// afterwards).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the directory (for `csnap check` afterwards).
    #[arg(long)]
    keep: bool,
    /// Origin writes per writer.
    #[arg(long, default_value_t = 400)]
    writes: u64,
}

const ORIGIN_BYTES: u64 = 32 << 20;
const STORE_BYTES: u64 = 160 << 20;
const CHUNK: u32 = 16384;
const WRITERS: u64 = 3;
const READERS: u64 = 2;
const IO_MAX: u64 = 96 * 1024;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

struct Shared {
    origin: Mutex<Vec<u8>>,
    /// Snapshots and their shadows (tag, shadow).
    snaps: Mutex<Vec<(u32, Arc<Vec<u8>>)>>,
    /// Origin writers hold it shared per write; snapshot creation exclusive.
    freeze: RwLock<()>,
    stop: AtomicBool,
    failures: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
}

fn fail(sh: &Shared, what: &str) {
    sh.failures.fetch_add(1, Ordering::SeqCst);
    error(&format!("demo check failed: {what}"));
}

pub fn run(args: &DemoArgs) -> ExitCode {
    let (dir, temp) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("csnap-demo-{}", std::process::id())),
            true,
        ),
    };
    let r = demo(&dir, args);
    if temp && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FAILED),
        Err(e) => {
            error(&e);
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn say(s: &str) {
    let _ = output(&format!("{s}\n"));
}

fn demo(dir: &Path, args: &DemoArgs) -> Result<bool, String> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let origin = dir.join("origin");
    let store = dir.join("store");
    let sock = dir.join("server.sock");
    let (addr, shadow) = start_server(&origin, &store, &sock)?;

    let sh = Arc::new(Shared {
        origin: Mutex::new(shadow),
        snaps: Mutex::new(Vec::new()),
        freeze: RwLock::new(()),
        stop: AtomicBool::new(false),
        failures: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        writes: AtomicU64::new(0),
    });
    let mut ctl = control(&addr).map_err(|e| e.to_string())?;
    create_snapshot(&mut ctl, &sh, 1);
    say("snapshot 1 created");

    let t_io = Instant::now();
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        threads.push(spawn_writer(&sh, &addr, (&origin, &store), w, args.writes));
    }
    for r in 0..READERS {
        threads.push(spawn_reader(&sh, &addr, (&origin, &store), r));
    }
    // The control thread: snapshots come and go while the clients run.
    let (next_tag, deleted) = churn_snapshots(&mut ctl, &sh);
    // A snapshot writer on its own snapshot.
    create_snapshot(&mut ctl, &sh, 100);
    write_snapshot(&sh, &addr, (&origin, &store), 100)?;
    for (i, t) in threads.into_iter().enumerate() {
        if i as u64 == WRITERS {
            sh.stop.store(true, Ordering::SeqCst);
        }
        let _ = t.join();
    }
    sh.stop.store(true, Ordering::SeqCst);
    let io_secs = t_io.elapsed().as_secs_f64();

    // Full verification of every volume.
    let t_v = Instant::now();
    verify_volumes(&sh, &addr, (&origin, &store))?;
    say(&store_status(&mut ctl));
    let failures = sh.failures.load(Ordering::SeqCst);
    say(&format!(
        "timings: {} origin writes and {} snapshot reads in {io_secs:.2} s ({:.0} ops/s) with {WRITERS} writers and {READERS} readers; {} snapshots created, {deleted} deleted; verification {:.2} s; total {:.2} s",
        sh.writes.load(Ordering::SeqCst),
        sh.reads.load(Ordering::SeqCst),
        (sh.writes.load(Ordering::SeqCst) + sh.reads.load(Ordering::SeqCst)) as f64 / io_secs,
        next_tag,
        t_v.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    ));
    if failures == 0 {
        say("demo passed: every check passed");
        Ok(true)
    } else {
        say(&format!("demo FAILED: {failures} check(s) failed"));
        Ok(false)
    }
}

/// The store's figures from `Status`, one line.
fn store_status(ctl: &mut csnap_io::client::Connection) -> String {
    match ctl.call(Request::Status) {
        Ok(Msg::StatusReply {
            data_chunks,
            data_free,
            commits,
            snapshots,
            ..
        }) => format!(
            "store: {snapshots} snapshots, {} of {data_chunks} chunks used, {commits} commits",
            data_chunks - data_free
        ),
        other => format!("status: {other:?}"),
    }
}

/// Makes the origin (random contents, so a wrong read cannot look right)
/// and the store, and starts a server on `sock` in a thread; returns its
/// address and the origin's contents.
fn start_server(origin: &Path, store: &Path, sock: &Path) -> Result<(Addr, Vec<u8>), String> {
    let mut rng = Rng(0x5eed_c5a9);
    let mut shadow = vec![0u8; usize_of(ORIGIN_BYTES)];
    rng.fill(&mut shadow);
    std::fs::write(origin, &shadow).map_err(|e| format!("origin: {e}"))?;
    let f = std::fs::File::create(store).map_err(|e| format!("store: {e}"))?;
    f.set_len(STORE_BYTES).map_err(|e| format!("store: {e}"))?;
    drop(f);
    let mut o = FormatOptions::new(ORIGIN_BYTES);
    o.chunk_size_bytes = CHUNK;
    o.origin_uuid = crate::device::random_uuid()?;
    o.store_uuid = crate::device::random_uuid()?;
    let mut sd = FileDisk::open(store).map_err(|e| format!("store: {e}"))?;
    csnap_store::format(&mut sd, &o).map_err(|e| e.to_string())?;
    say(&format!(
        "formatted {} ({} MiB) for origin {} ({} MiB), chunk {} KiB",
        store.display(),
        STORE_BYTES >> 20,
        origin.display(),
        ORIGIN_BYTES >> 20,
        CHUNK / 1024
    ));
    let mut st = Store::open(sd, &OpenOptions::default()).map_err(|e| e.to_string())?;
    let incarnation = st
        .bump_incarnation()
        .and_then(|i| st.commit().map(|_| i))
        .map_err(|e| e.to_string())?;
    let label = *st.label();
    let od = FileDisk::open(origin).map_err(|e| format!("origin: {e}"))?;
    let cfg = ServerConfig {
        clients: 32,
        requests_per_client: 4,
        read_locks: 4096,
        incarnation,
        server_id: 1,
        chunk_size_bytes: label.chunk_size_bytes,
        origin_size_bytes: label.origin_size_bytes,
        origin_uuid: label.origin_uuid,
    };
    let worker = StoreWorker::new(st, od, BATCH_MAX);
    let addr = Addr::Unix(sock.to_path_buf());
    let (tx, rx) = std::sync::mpsc::channel();
    let listen = vec![addr.clone()];
    std::thread::spawn(move || match ServerLoop::new(cfg, &listen, worker) {
        Ok(mut l) => {
            let _ = tx.send(Ok(()));
            let _ = l.run();
        }
        Err(e) => {
            let _ = tx.send(Err(e.to_string()));
        }
    });
    rx.recv()
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("server: {e}"))?;
    say(&format!("server listening on {}", sock.display()));
    Ok((addr, shadow))
}

/// Creates snapshot `tag` with the writers held off, and records its
/// shadow (the origin's at that instant).
fn create_snapshot(ctl: &mut csnap_io::client::Connection, sh: &Shared, tag: u32) {
    let _frozen = sh
        .freeze
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match ctl.call(Request::Create(tag)) {
        Ok(Msg::Ok) => {
            let copy = sh
                .origin
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            sh.snaps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((tag, Arc::new(copy)));
        }
        other => fail(sh, &format!("create snapshot {tag}: {other:?}")),
    }
}

/// An origin writer: `n` random writes, each mirrored in the shadow.
fn spawn_writer(
    sh: &Arc<Shared>,
    addr: &Addr,
    (origin, store): (&Path, &Path),
    w: u64,
    n: u64,
) -> std::thread::JoinHandle<()> {
    let (sh, addr, origin, store) = (
        sh.clone(),
        addr.clone(),
        origin.to_path_buf(),
        store.to_path_buf(),
    );
    std::thread::spawn(move || {
        let mut v = match VolumeClient::open(&addr, &origin, &store, Volume::Origin, 100 + w, 1) {
            Ok(v) => v,
            Err(e) => return fail(&sh, &format!("origin writer {w}: {e}")),
        };
        let mut rng = Rng(0xabc0 + w);
        let mut buf = vec![0u8; usize_of(IO_MAX)];
        for _ in 0..n {
            let len = 1 + rng.below(IO_MAX);
            let off = rng.below(ORIGIN_BYTES - len);
            let b = &mut buf[..usize_of(len)];
            rng.fill(b);
            let _shared = sh
                .freeze
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Writers serialise on the shadow so overlapping writes land
            // in one order on both.
            let mut shadow = sh
                .origin
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = v.write_at(b, off) {
                return fail(&sh, &format!("origin write at {off}: {e}"));
            }
            shadow[usize_of(off)..usize_of(off + len)].copy_from_slice(b);
            sh.writes.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// A snapshot reader: random reads of random live snapshots, each checked
/// against the snapshot's shadow, until told to stop.
fn spawn_reader(
    sh: &Arc<Shared>,
    addr: &Addr,
    (origin, store): (&Path, &Path),
    r: u64,
) -> std::thread::JoinHandle<()> {
    let (sh, addr, origin, store) = (
        sh.clone(),
        addr.clone(),
        origin.to_path_buf(),
        store.to_path_buf(),
    );
    std::thread::spawn(move || {
        let mut rng = Rng(0xdef0 + r);
        let mut buf = vec![0u8; usize_of(IO_MAX)];
        while !sh.stop.load(Ordering::SeqCst) {
            let pick = {
                let s = sh
                    .snaps
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if s.is_empty() {
                    None
                } else {
                    Some(s[usize_of(rng.below(s.len() as u64))].clone())
                }
            };
            let Some((tag, shadow)) = pick else {
                std::thread::yield_now();
                continue;
            };
            let mut v =
                match VolumeClient::open(&addr, &origin, &store, Volume::Snapshot(tag), 200 + r, 1)
                {
                    Ok(v) => v,
                    // Deleted meanwhile.
                    Err(ClientError::Server {
                        code: ErrorCode::NoSuchSnapshot,
                        ..
                    }) => continue,
                    Err(e) => return fail(&sh, &format!("snapshot {tag} reader: {e}")),
                };
            for _ in 0..8 {
                let len = 1 + rng.below(IO_MAX);
                let off = rng.below(ORIGIN_BYTES - len);
                let b = &mut buf[..usize_of(len)];
                if let Err(e) = v.read_at(b, off) {
                    return fail(&sh, &format!("snapshot {tag} read at {off}: {e}"));
                }
                if b != &shadow[usize_of(off)..usize_of(off + len)] {
                    return fail(
                        &sh,
                        &format!("snapshot {tag}: {len} bytes at {off} differ from its shadow"),
                    );
                }
                sh.reads.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

/// Snapshots created and deleted while the clients run; returns the next
/// tag and how many were deleted.
fn churn_snapshots(ctl: &mut csnap_io::client::Connection, sh: &Shared) -> (u32, u32) {
    let mut next_tag = 2;
    let mut deleted = 0;
    for round in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        create_snapshot(ctl, sh, next_tag);
        say(&format!("snapshot {next_tag} created during the run"));
        next_tag += 1;
        if round % 2 == 1 {
            let victim = {
                let s = sh
                    .snaps
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s.first().map(|x| x.0)
            };
            if let Some(tag) = victim {
                // Refused while a reader has it open: retry.
                let start = Instant::now();
                loop {
                    match ctl.call(Request::Delete(tag)) {
                        Ok(_) => {
                            sh.snaps
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .retain(|x| x.0 != tag);
                            deleted += 1;
                            say(&format!("snapshot {tag} deleted during the run"));
                            break;
                        }
                        Err(ClientError::Server {
                            code: ErrorCode::Busy,
                            ..
                        }) if start.elapsed().as_secs() < 10 => {
                            // Keep readers off it: drop it from their list first.
                            sh.snaps
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .retain(|x| x.0 != tag);
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        Err(e) => {
                            fail(sh, &format!("delete snapshot {tag}: {e}"));
                            break;
                        }
                    }
                }
            }
        }
    }
    (next_tag, deleted)
}

/// 50 random writes to snapshot `tag` while the origin writers run, its
/// shadow updated.
fn write_snapshot(
    sh: &Shared,
    addr: &Addr,
    (origin, store): (&Path, &Path),
    tag: u32,
) -> Result<(), String> {
    let mut v = VolumeClient::open(addr, origin, store, Volume::Snapshot(tag), 300, 1)
        .map_err(|e| e.to_string())?;
    let mut s = sh
        .snaps
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let entry = s
        .iter_mut()
        .find(|x| x.0 == tag)
        .ok_or("snapshot 100 missing")?;
    let mut shadow = (*entry.1).clone();
    let mut rng = Rng(0x77);
    let mut buf = vec![0u8; usize_of(IO_MAX)];
    for _ in 0..50 {
        let len = 1 + rng.below(IO_MAX);
        let off = rng.below(ORIGIN_BYTES - len);
        let b = &mut buf[..usize_of(len)];
        rng.fill(b);
        v.write_at(b, off)
            .map_err(|e| format!("snapshot 100 write: {e}"))?;
        shadow[usize_of(off)..usize_of(off + len)].copy_from_slice(b);
    }
    entry.1 = Arc::new(shadow);
    say("snapshot 100 written (50 writes) while the origin writers run");
    Ok(())
}

/// Reads every snapshot and the origin whole and compares each with its
/// shadow (a difference is a failed check).
fn verify_volumes(sh: &Shared, addr: &Addr, (origin, store): (&Path, &Path)) -> Result<(), String> {
    let mut buf = vec![0u8; usize_of(ORIGIN_BYTES)];
    let snaps = sh
        .snaps
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for (tag, shadow) in &snaps {
        let mut v = VolumeClient::open(addr, origin, store, Volume::Snapshot(*tag), 400, 1)
            .map_err(|e| e.to_string())?;
        v.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
        if buf != **shadow {
            let at = buf
                .iter()
                .zip(shadow.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            fail(
                sh,
                &format!("snapshot {tag} differs from its shadow at byte {at}"),
            );
        } else {
            say(&format!(
                "snapshot {tag}: all {} MiB equal its shadow",
                ORIGIN_BYTES >> 20
            ));
        }
    }
    {
        let mut v = VolumeClient::open(addr, origin, store, Volume::Origin, 401, 1)
            .map_err(|e| e.to_string())?;
        v.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
        v.flush().map_err(|e| e.to_string())?;
        let shadow = sh
            .origin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buf != *shadow {
            fail(sh, "the origin differs from its shadow");
        } else {
            say(&format!(
                "origin: all {} MiB equal its shadow",
                ORIGIN_BYTES >> 20
            ));
        }
    }
    Ok(())
}
