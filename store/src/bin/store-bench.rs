//! Benchmark of the snapshot store on real files.
//!
//! `cargo run --release -p csnap-store --bin store-bench [-- --quick] [-- --dir DIR]`
//!
//! Three sections:
//! 1. origin-write preparation (metadata only, no data copy) with 1, 8 and
//!    `SNAPSHOTS_MAX` (a full snapshot table) snapshots, plus a worst case where every chunk carries 8 exceptions;
//! 2. commit throughput, one commit per operation versus group commit;
//! 3. the full copy-out path of random and sequential 4 KiB origin writes for
//!    chunk sizes 4 KiB .. 1 MiB: the measurement behind
//!    `csnap_pools::CHUNK_SIZE_DEFAULT_BYTES`.
//!
//! Every figure is printed with its unit. The PRNG is seeded by a constant,
//! so the operation sequence is the same on every run.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use csnap_pools::{
    BLOCK_SIZE_BYTES, CACHE_DEFAULT_BLOCKS, CHUNK_SIZE_DEFAULT_BYTES, JOURNAL_DEFAULT_BLOCKS,
    SNAPSHOTS_MAX,
};
use csnap_store::disk::{Disk, FileDisk};
use csnap_store::{FormatOptions, OpenOptions, OriginWrite, Store, StoreError};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// Seed of the deterministic PRNG.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Size of the origin writes of section 3.
const WRITE_BYTES: u64 = 4 * KIB;

type R<T> = Result<T, String>;

/// Adds what was being done to an error.
trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> R<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> R<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(if seed == 0 { 1 } else { seed })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough value in `0..n` (`n > 0`; the modulo bias is far below
    /// anything a benchmark can see).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// `count` distinct chunks of `0..n`, in random order (partial Fisher-Yates).
fn distinct_chunks(rng: &mut Rng, n: u64, count: usize) -> R<Vec<u64>> {
    let len = usize::try_from(n).ctx(|| format!("origin of {n} chunks"))?;
    if count > len {
        return Err(format!(
            "asked for {count} distinct chunks of an origin of {n} chunks"
        ));
    }
    let mut all: Vec<u64> = (0..n).collect();
    for i in 0..count {
        let rest = u64::try_from(len - i).ctx(|| "index".into())?;
        let j = i + usize::try_from(rng.below(rest)).ctx(|| "index".into())?;
        all.swap(i, j);
    }
    all.truncate(count);
    Ok(all)
}

// ---------------------------------------------------------------------------
// Settings and environment.
// ---------------------------------------------------------------------------

struct Settings {
    quick: bool,
    /// Repetitions of every measurement (fresh store each); the median is shown.
    reps: usize,
    /// Section 1: distinct chunks per pass.
    s1_chunks: usize,
    /// Section 1 worst case: distinct chunks written once per snapshot.
    s1_worst_chunks: usize,
    /// Section 2: operations with one commit each.
    s2_single_ops: usize,
    /// Section 2: operations with group commit.
    s2_group_ops: usize,
    /// Section 3: 4 KiB origin writes per run.
    s3_writes: usize,
    base_dir: Option<PathBuf>,
}

const USAGE: &str = "usage: store-bench [--quick] [--dir DIR]\n  \
     --quick    fewer operations and 3 repetitions instead of 5 (well under 15 s)\n  \
     --dir DIR  make the temporary files under DIR (default /var/tmp)";

/// The settings, or `None` for `--help`.
fn parse_args() -> R<Option<Settings>> {
    let mut quick = false;
    let mut base_dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--dir" => {
                let d = args
                    .next()
                    .ok_or_else(|| "--dir needs a directory".to_string())?;
                base_dir = Some(PathBuf::from(d));
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    Ok(Some(if quick {
        Settings {
            quick,
            reps: 3,
            s1_chunks: 2_000,
            s1_worst_chunks: 500,
            s2_single_ops: 200,
            s2_group_ops: 2_000,
            s3_writes: 300,
            base_dir,
        }
    } else {
        Settings {
            quick,
            reps: 5,
            s1_chunks: 20_000,
            s1_worst_chunks: 4_000,
            s2_single_ops: 2_000,
            s2_group_ops: 20_000,
            s3_writes: 2_000,
            base_dir,
        }
    }))
}

/// The temporary directory; removed when dropped (on success and on error).
struct TempDir(PathBuf);

impl TempDir {
    fn create(base: Option<&Path>) -> R<TempDir> {
        let base = match base {
            Some(b) => b.to_path_buf(),
            None => {
                let vt = Path::new("/var/tmp");
                if vt.is_dir() {
                    vt.to_path_buf()
                } else {
                    std::env::temp_dir()
                }
            }
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!(
            "csnap-store-bench-{}-{nanos:09}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("store-bench: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Filesystem type and device of the mount holding `dir`, from /proc/mounts.
fn mount_of(dir: &Path) -> Option<(String, String, String)> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let mut best: Option<(usize, (String, String, String))> = None;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(dev), Some(mnt), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let mnt = mnt.replace("\\040", " ");
        if dir.starts_with(&mnt) {
            let len = mnt.len();
            // Later lines shadow earlier ones at the same mount point.
            let longer = match &best {
                Some((l, _)) => len >= *l,
                None => true,
            };
            if longer {
                best = Some((len, (fstype.to_string(), dev.to_string(), mnt)));
            }
        }
    }
    best.map(|(_, m)| m)
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Store helpers.
// ---------------------------------------------------------------------------

type FStore = Store<FileDisk>;

/// Creates a sparse file of `size` bytes.
fn sparse_file(path: &Path, size: u64) -> R<File> {
    // Direct I/O, as every node reaches the shared devices.
    let f = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ctx(|| format!("creating {}", path.display()))?;
    f.set_len(size)
        .ctx(|| format!("sizing {} to {size} bytes", path.display()))?;
    Ok(f)
}

/// Formats a fresh store file and opens it.
fn new_store(path: &Path, store_bytes: u64, origin_bytes: u64, chunk: u32) -> R<FStore> {
    let f = sparse_file(path, store_bytes)?;
    let mut disk = FileDisk::new(f).ctx(|| format!("opening {}", path.display()))?;
    let mut o = FormatOptions::new(origin_bytes);
    o.chunk_size_bytes = chunk;
    o.now_secs = now_secs();
    o.store_uuid = [1; 16];
    o.origin_uuid = [2; 16];
    csnap_store::format(&mut disk, &o).ctx(|| format!("formatting {}", path.display()))?;
    Store::open(disk, &OpenOptions::default()).ctx(|| format!("opening store {}", path.display()))
}

fn create_snapshots(store: &mut FStore, tags: std::ops::RangeInclusive<u32>) -> R<()> {
    for tag in tags {
        if !store.has_room() {
            store.commit().ctx(|| "commit".into())?;
        }
        store
            .create_snapshot(tag, now_secs())
            .ctx(|| format!("create_snapshot({tag})"))?;
    }
    store
        .commit()
        .ctx(|| "commit after creating snapshots".into())?;
    Ok(())
}

/// What one timed pass did.
#[derive(Default, Clone, Copy)]
struct Pass {
    ops: u64,
    copyouts: u64,
    prep: Duration,
    commit: Duration,
    wall: Duration,
    /// Commits that wrote something.
    commits: u64,
    /// Blocks journaled by those commits (superblock included).
    blocks: u64,
    /// Time spent copying chunk data (section 3).
    copy: Duration,
    copied_bytes: u64,
}

impl Pass {
    fn prep_rate(&self) -> f64 {
        rate(self.ops, self.prep)
    }
    fn wall_rate(&self) -> f64 {
        rate(self.ops, self.wall)
    }
    fn commit_ms(&self) -> f64 {
        if self.commits == 0 {
            0.0
        } else {
            self.commit.as_secs_f64() * 1e3 / self.commits as f64
        }
    }
    fn blocks_per_commit(&self) -> f64 {
        if self.commits == 0 {
            0.0
        } else {
            self.blocks as f64 / self.commits as f64
        }
    }
}

/// The element whose `key` is the median (the upper one of an even count).
fn median_by<T: Copy>(v: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut sorted: Vec<T> = v.to_vec();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2]
}

fn rate(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        f64::INFINITY
    }
}

fn timed_commit(store: &mut FStore, p: &mut Pass) -> R<()> {
    let t = Instant::now();
    let info = store.commit().ctx(|| "commit".into())?;
    p.commit += t.elapsed();
    if info.blocks > 0 {
        p.commits += 1;
        p.blocks += u64::try_from(info.blocks).ctx(|| "block count".into())?;
    }
    Ok(())
}

/// `prepare_origin_write(chunk)`, committing first whenever the open
/// transaction is full. The prepare calls alone are timed into `p.prep`.
fn prepare(store: &mut FStore, chunk: u64, p: &mut Pass, in_group: &mut u64) -> R<OriginWrite> {
    loop {
        if !store.has_room() {
            timed_commit(store, p)?;
            *in_group = 0;
        }
        let t = Instant::now();
        let r = store.prepare_origin_write(chunk);
        p.prep += t.elapsed();
        match r {
            Ok(w) => {
                if matches!(w, OriginWrite::CopyOut { .. }) {
                    p.copyouts += 1;
                }
                p.ops += 1;
                return Ok(w);
            }
            Err(StoreError::TxFull) => {
                timed_commit(store, p)?;
                *in_group = 0;
            }
            Err(e) => return Err(format!("prepare_origin_write({chunk}): {e}")),
        }
    }
}

/// Metadata-only pass: prepares every chunk (no data copy), committing every
/// `group` operations.
fn metadata_pass(store: &mut FStore, chunks: &[u64], group: u64) -> R<Pass> {
    let mut p = Pass::default();
    let start = Instant::now();
    let mut in_group = 0u64;
    for &c in chunks {
        prepare(store, c, &mut p, &mut in_group)?;
        in_group += 1;
        if in_group >= group {
            timed_commit(store, &mut p)?;
            in_group = 0;
        }
    }
    timed_commit(store, &mut p)?;
    p.wall = start.elapsed();
    Ok(p)
}

fn used_data_chunks(store: &FStore) -> u64 {
    let s = store.status();
    s.data_chunks - s.data_free
}

fn used_meta_blocks(store: &FStore) -> u64 {
    let s = store.status();
    s.meta_blocks - s.meta_free
}

fn fmt_bytes(b: u64) -> String {
    let f = b as f64;
    if b >= GIB {
        format!("{:.2} GiB", f / GIB as f64)
    } else if b >= MIB {
        format!("{:.1} MiB", f / MIB as f64)
    } else if b >= KIB {
        format!("{:.1} KiB", f / KIB as f64)
    } else {
        format!("{b} B")
    }
}

fn fmt_chunk(c: u32) -> String {
    let c = u64::from(c);
    if c >= MIB {
        format!("{}M", c / MIB)
    } else {
        format!("{}K", c / KIB)
    }
}

/// Problems seen while measuring (wrong results from the store).
#[derive(Default)]
struct Anomalies(Vec<String>);

impl Anomalies {
    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            println!("  !! ANOMALY: {w}");
            self.0.push(w);
        }
    }
}

// ---------------------------------------------------------------------------
// Section 1.
// ---------------------------------------------------------------------------

const S1_ORIGIN_BYTES: u64 = GIB;
const S1_STORE_BYTES: u64 = 4 * GIB;
const S1_GROUP: u64 = 64;

fn section1(dir: &TempDir, s: &Settings, bad: &mut Anomalies) -> R<()> {
    let chunk = CHUNK_SIZE_DEFAULT_BYTES;
    let origin_chunks = S1_ORIGIN_BYTES / u64::from(chunk);
    println!();
    println!("== 1. origin-write preparation: METADATA ONLY (no chunk data is copied) ==");
    println!(
        "chunk {}, origin {} ({origin_chunks} chunks; size only, no origin file), store file {} (sparse)",
        fmt_chunk(chunk),
        fmt_bytes(S1_ORIGIN_BYTES),
        fmt_bytes(S1_STORE_BYTES)
    );
    println!(
        "{} distinct random chunks per pass, commit every {S1_GROUP} ops (or when the transaction is full)",
        s.s1_chunks
    );
    let mut rng = Rng::new(SEED);
    let chunks = distinct_chunks(&mut rng, origin_chunks, s.s1_chunks)?;
    let n_chunks = chunks.len() as u64;
    let mut first = Vec::new();
    let mut recheck = Vec::new();
    let full = u32::try_from(SNAPSHOTS_MAX).ctx(|| "SNAPSHOTS_MAX".into())?;
    for n in [1u32, 8, full] {
        let path = dir.file(&format!("s1-n{n}.store"));
        let (mut r1, mut r2, mut r3) = (Vec::new(), Vec::new(), Vec::new());
        let mut depth = 0;
        let mut meta_used = 0;
        for _ in 0..s.reps {
            let mut store = new_store(&path, S1_STORE_BYTES, S1_ORIGIN_BYTES, chunk)?;
            create_snapshots(&mut store, 1..=n)?;
            let p1 = metadata_pass(&mut store, &chunks, S1_GROUP)?;
            bad.expect(p1.copyouts == n_chunks, || {
                format!(
                    "section 1, N={n}: first pass over {n_chunks} distinct chunks returned {} copy-outs",
                    p1.copyouts
                )
            });
            let p2 = metadata_pass(&mut store, &chunks, S1_GROUP)?;
            bad.expect(p2.copyouts == 0 && p2.commits == 0, || {
                format!(
                    "section 1, N={n}: re-check pass returned {} copy-outs and made {} commits (expected 0, 0)",
                    p2.copyouts, p2.commits
                )
            });
            depth = store.status().depth;
            meta_used = used_meta_blocks(&store);
            // Cold metadata cache: reopen (the OS page cache stays warm).
            let disk = store.into_disk();
            let mut store =
                Store::open(disk, &OpenOptions::default()).ctx(|| "reopening the store".into())?;
            let p3 = metadata_pass(&mut store, &chunks, S1_GROUP)?;
            bad.expect(p3.copyouts == 0 && p3.commits == 0, || {
                format!(
                    "section 1, N={n}: re-check after reopen returned {} copy-outs, {} commits (expected 0, 0)",
                    p3.copyouts, p3.commits
                )
            });
            bad.expect(used_data_chunks(&store) == n_chunks, || {
                format!(
                    "section 1, N={n}: {} data chunks used after {n_chunks} copy-outs",
                    used_data_chunks(&store)
                )
            });
            r1.push(p1);
            r2.push(p2);
            r3.push(p3);
            drop(store);
            std::fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
        }
        let p1 = median_by(&r1, Pass::wall_rate);
        let p2 = median_by(&r2, Pass::prep_rate);
        let p3 = median_by(&r3, Pass::prep_rate);
        println!(
            "N={n:<2} first write (allocates, 1 record/chunk): prepare only {:>9.0} ops/s | incl. commits {:>7.0} ops/s | {} commits, {:.2} ms/commit, {:.1} blocks/commit",
            p1.prep_rate(),
            p1.wall_rate(),
            p1.commits,
            p1.commit_ms(),
            p1.blocks_per_commit()
        );
        println!(
            "N={n:<2} re-check (already unique, idempotent):   prepare only {:>9.0} ops/s | incl. commits {:>7.0} ops/s | {} commits",
            p2.prep_rate(),
            p2.wall_rate(),
            p2.commits
        );
        println!(
            "N={n:<2} re-check after reopen (cold meta cache): prepare only {:>9.0} ops/s | incl. commits {:>7.0} ops/s",
            p3.prep_rate(),
            p3.wall_rate()
        );
        println!(
            "N={n:<2} tree: depth {depth}, {meta_used} metadata blocks in use ({}), cache {CACHE_DEFAULT_BLOCKS} blocks",
            fmt_bytes(meta_used * BLOCK_SIZE_BYTES as u64)
        );
        first.push(p1);
        recheck.push(p2);
    }
    println!(
        "ratio N={full} / N=1: first write prepare only {:.2}, incl. commits {:.2}; re-check prepare only {:.2}  (1.00 = flat in N)",
        first[2].prep_rate() / first[0].prep_rate(),
        first[2].wall_rate() / first[0].wall_rate(),
        recheck[2].prep_rate() / recheck[0].prep_rate()
    );

    // Worst case: each chunk gets one exception per snapshot.
    let w = s.s1_worst_chunks;
    println!();
    println!(
        "-- worst case: 8 snapshots, each followed by a write pass over the same {w} chunks, so every chunk holds 8 exceptions (8 records) --"
    );
    let wchunks = &chunks[..w.min(chunks.len())];
    let wn = wchunks.len() as u64;
    let path = dir.file("s1-worst.store");
    let (mut first_pass, mut last_pass, mut rechecks) = (Vec::new(), Vec::new(), Vec::new());
    let (mut depth, mut meta_used) = (0, 0);
    for _ in 0..s.reps {
        let mut store = new_store(&path, S1_STORE_BYTES, S1_ORIGIN_BYTES, chunk)?;
        for k in 1..=8u32 {
            create_snapshots(&mut store, k..=k)?;
            let p = metadata_pass(&mut store, wchunks, S1_GROUP)?;
            bad.expect(p.copyouts == wn, || {
                format!(
                    "section 1 worst case: pass after snapshot {k} returned {} copy-outs for {wn} chunks",
                    p.copyouts
                )
            });
            if k == 1 {
                first_pass.push(p);
            } else if k == 8 {
                last_pass.push(p);
            }
        }
        let re = metadata_pass(&mut store, wchunks, S1_GROUP)?;
        bad.expect(re.copyouts == 0 && re.commits == 0, || {
            format!(
                "section 1 worst case: re-check returned {} copy-outs, {} commits (expected 0, 0)",
                re.copyouts, re.commits
            )
        });
        bad.expect(used_data_chunks(&store) == 8 * wn, || {
            format!(
                "section 1 worst case: {} data chunks used, expected {}",
                used_data_chunks(&store),
                8 * wn
            )
        });
        let mut uniq_ok = true;
        for info in store.snapshots() {
            uniq_ok &= info.chunks == wn && info.unique_chunks == wn;
        }
        bad.expect(uniq_ok, || {
            "section 1 worst case: a snapshot does not own exactly one unique chunk per written chunk"
                .into()
        });
        rechecks.push(re);
        depth = store.status().depth;
        meta_used = used_meta_blocks(&store);
        drop(store);
        std::fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
    }
    let p_first = median_by(&first_pass, Pass::wall_rate);
    let p_last = median_by(&last_pass, Pass::wall_rate);
    let re = median_by(&rechecks, Pass::prep_rate);
    for (i, p) in [(0, p_first), (7, p_last)] {
        println!(
            "worst pass {} (chunk already has {} records, adds 1): prepare only {:>9.0} ops/s | incl. commits {:>7.0} ops/s | {:.2} ms/commit, {:.1} blocks/commit",
            i + 1,
            i,
            p.prep_rate(),
            p.wall_rate(),
            p.commit_ms(),
            p.blocks_per_commit()
        );
    }
    println!(
        "worst re-check (8 records/chunk, all unique): prepare only {:>9.0} ops/s | incl. commits {:>7.0} ops/s",
        re.prep_rate(),
        re.wall_rate()
    );
    println!(
        "worst ratio pass 8 / pass 1: prepare only {:.2}, incl. commits {:.2}; re-check 8 records vs N=1 re-check: {:.2}; tree depth {depth}, {meta_used} metadata blocks",
        p_last.prep_rate() / p_first.prep_rate(),
        p_last.wall_rate() / p_first.wall_rate(),
        re.prep_rate() / recheck[0].prep_rate(),
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Section 2.
// ---------------------------------------------------------------------------

fn section2(dir: &TempDir, s: &Settings) -> R<()> {
    let chunk = CHUNK_SIZE_DEFAULT_BYTES;
    let origin_chunks = S1_ORIGIN_BYTES / u64::from(chunk);
    println!();
    println!("== 2. commit throughput: one commit per operation vs group commit ==");
    println!(
        "1 snapshot, chunk {}, metadata only (no data copy); each op is prepare_origin_write on a new random chunk;",
        fmt_chunk(chunk)
    );
    println!("a commit is: fdatasync, journal write, fdatasync, home writes");
    let mut rng = Rng::new(SEED ^ 2);
    let mut results = Vec::new();
    for (group, nops) in [
        (1u64, s.s2_single_ops),
        (16, s.s2_group_ops),
        (64, s.s2_group_ops),
    ] {
        let chunks = distinct_chunks(&mut rng, origin_chunks, nops)?;
        let path = dir.file(&format!("s2-g{group}.store"));
        let mut runs = Vec::new();
        for _ in 0..s.reps {
            let mut store = new_store(&path, S1_STORE_BYTES, S1_ORIGIN_BYTES, chunk)?;
            create_snapshots(&mut store, 1..=1)?;
            runs.push(metadata_pass(&mut store, &chunks, group)?);
            drop(store);
            std::fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
        }
        let p = median_by(&runs, Pass::wall_rate);
        let label = if group == 1 {
            "single (commit every op)  ".to_string()
        } else {
            format!("group commit every {group:<3}  ")
        };
        println!(
            "{label} {:>6} ops: {:>8.1} commits/s | {:>8.0} ops/s | {:.2} ms/commit | {:.1} blocks/commit",
            p.ops,
            rate(p.commits, p.wall),
            p.wall_rate(),
            p.commit_ms(),
            p.blocks_per_commit()
        );
        results.push(p);
    }
    println!(
        "ratio group/single, ops/s: every 16 {:.1}x, every 64 {:.1}x",
        results[1].wall_rate() / results[0].wall_rate(),
        results[2].wall_rate() / results[0].wall_rate()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Section 3.
// ---------------------------------------------------------------------------

const S3_ORIGIN_BYTES: u64 = 256 * MIB;
const S3_GROUP: usize = 16;
const S3_CHUNKS: [u32; 5] = [4096, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024];

#[derive(Clone, Copy)]
struct CopyRun {
    chunk: u32,
    pass: Pass,
    data_used_bytes: u64,
    meta_used_bytes: u64,
    /// Share of the store device the format reserves for metadata.
    meta_reserved_frac: f64,
}

/// Writes a pattern over the whole origin file and makes it durable.
fn fill_origin(origin: &File) -> R<()> {
    let mut rng = Rng::new(SEED ^ 3);
    let mut buf = csnap_store::disk::io_buf(usize::try_from(MIB).ctx(|| "buffer".into())?);
    let mut off = 0;
    while off < S3_ORIGIN_BYTES {
        rng.fill(&mut buf);
        origin
            .write_all_at(&buf, off)
            .ctx(|| format!("writing the origin at {off}"))?;
        off += MIB;
    }
    origin.sync_data().ctx(|| "fdatasync of the origin".into())
}

/// One run: format, one snapshot, then the 4 KiB writes at `offsets`, each
/// with the copy-out a server does; commit every `S3_GROUP` writes, and after
/// each commit write the new data of the group into the origin.
fn copy_run(dir: &TempDir, origin: &File, chunk: u32, offsets: &[u64]) -> R<CopyRun> {
    let c = u64::from(chunk);
    let path = dir.file(&format!("s3-{chunk}.store"));
    // Room for a copy of the whole origin plus metadata: never fills.
    let mut store = new_store(&path, S3_ORIGIN_BYTES + 64 * MIB, S3_ORIGIN_BYTES, chunk)?;
    create_snapshots(&mut store, 1..=1)?;
    let mut chunk_buf =
        csnap_store::disk::io_buf(usize::try_from(c).ctx(|| "chunk buffer".into())?);
    let mut new_data =
        csnap_store::disk::io_buf(usize::try_from(WRITE_BYTES).ctx(|| "buffer".into())?);
    Rng::new(SEED ^ 4).fill(&mut new_data);
    let mut pending: Vec<u64> = Vec::with_capacity(S3_GROUP);
    let mut p = Pass::default();
    let mut in_group = 0u64;

    // Commits, then lands the group's origin writes.
    let finish_group = |store: &mut FStore, p: &mut Pass, pending: &mut Vec<u64>| -> R<()> {
        timed_commit(store, p)?;
        for &off in pending.iter() {
            origin
                .write_all_at(&new_data, off)
                .ctx(|| format!("writing the origin at {off}"))?;
        }
        pending.clear();
        Ok(())
    };

    let start = Instant::now();
    for &off in offsets {
        let oc = off / c;
        // A full transaction commits inside `prepare`; the origin writes that
        // commit covers may land now.
        let commits_before = p.commits;
        let w = prepare(&mut store, oc, &mut p, &mut in_group)?;
        if p.commits != commits_before {
            for &o in &pending {
                origin
                    .write_all_at(&new_data, o)
                    .ctx(|| format!("writing the origin at {o}"))?;
            }
            pending.clear();
        }
        if let OriginWrite::CopyOut { store_chunk } = w {
            let t = Instant::now();
            origin
                .read_exact_at(&mut chunk_buf, oc * c)
                .ctx(|| format!("reading origin chunk {oc}"))?;
            let at = store.chunk_offset(store_chunk);
            store
                .disk_mut()
                .write_at(&chunk_buf, at)
                .ctx(|| format!("copying origin chunk {oc} to store chunk {store_chunk}"))?;
            p.copy += t.elapsed();
            p.copied_bytes += c;
        }
        pending.push(off);
        if pending.len() >= S3_GROUP {
            finish_group(&mut store, &mut p, &mut pending)?;
            in_group = 0;
        }
    }
    finish_group(&mut store, &mut p, &mut pending)?;
    p.wall = start.elapsed();
    let run = CopyRun {
        chunk,
        pass: p,
        data_used_bytes: used_data_chunks(&store) * c,
        meta_used_bytes: used_meta_blocks(&store) * BLOCK_SIZE_BYTES as u64,
        meta_reserved_frac: (store.label().meta_blocks * BLOCK_SIZE_BYTES as u64) as f64
            / store.label().store_size_bytes as f64,
    };
    // Untimed: make the origin writes durable so they do not disturb the next run.
    origin
        .sync_data()
        .ctx(|| "fdatasync of the origin".into())?;
    drop(store);
    std::fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
    Ok(run)
}

fn print_table(title: &str, runs: &[CopyRun], k: u64) {
    println!("{title}");
    println!(
        "  chunk | 4K writes/s (wall, all costs) | copy-outs | copied/write | store data used | store meta used | commits | ms/commit | copy time | meta area reserved"
    );
    for r in runs {
        let p = &r.pass;
        println!(
            "  {:>5} | {:>29.0} | {:>9} | {:>12} | {:>15} | {:>15} | {:>7} | {:>9.2} | {:>7.2} s | {:>17.2}%",
            fmt_chunk(r.chunk),
            p.wall_rate(),
            p.copyouts,
            fmt_bytes(p.copied_bytes / k.max(1)),
            fmt_bytes(r.data_used_bytes),
            fmt_bytes(r.meta_used_bytes),
            p.commits,
            p.commit_ms(),
            p.copy.as_secs_f64(),
            r.meta_reserved_frac * 100.0
        );
    }
}

fn section3(dir: &TempDir, s: &Settings, bad: &mut Anomalies) -> R<()> {
    let k = s.s3_writes;
    let k64 = k as u64;
    println!();
    println!(
        "== 3. copy-out cost vs chunk size (behind CHUNK_SIZE_DEFAULT_BYTES = {}) ==",
        fmt_chunk(CHUNK_SIZE_DEFAULT_BYTES)
    );
    println!(
        "origin file {} (filled, in page cache), 1 snapshot, then the first {k} 4 KiB origin writes after it; each write: prepare_origin_write,",
        fmt_bytes(S3_ORIGIN_BYTES)
    );
    println!(
        "copy-out (read the chunk from the origin file, write it to the store file), commit every {S3_GROUP} writes (group commit),"
    );
    println!("then the 4 KiB of new data into the origin file (not fdatasynced: the origin's own durability is not measured)");
    let origin_path = dir.file("origin.img");
    let origin = sparse_file(&origin_path, S3_ORIGIN_BYTES)?;
    let t = Instant::now();
    fill_origin(&origin)?;
    println!(
        "(origin filled and synced in {:.1} s, untimed)",
        t.elapsed().as_secs_f64()
    );

    let blocks = S3_ORIGIN_BYTES / WRITE_BYTES;
    let mut rng = Rng::new(SEED ^ 5);
    let random: Vec<u64> = (0..k).map(|_| rng.below(blocks) * WRITE_BYTES).collect();
    let sequential: Vec<u64> = (0..k64).map(|i| (i % blocks) * WRITE_BYTES).collect();

    let mut rand_runs = Vec::new();
    let mut seq_runs = Vec::new();
    for chunk in S3_CHUNKS {
        let c = u64::from(chunk);
        let mut distinct: Vec<u64> = random.iter().map(|o| o / c).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let expect_seq = (k64 * WRITE_BYTES).div_ceil(c).min(S3_ORIGIN_BYTES / c);
        let (mut rr, mut sr) = (Vec::new(), Vec::new());
        for _ in 0..s.reps {
            let r = copy_run(dir, &origin, chunk, &random)?;
            bad.expect(r.pass.copyouts == distinct.len() as u64, || {
                format!(
                    "section 3, chunk {chunk}: {} copy-outs for {} distinct chunks written",
                    r.pass.copyouts,
                    distinct.len()
                )
            });
            rr.push(r);
            let r = copy_run(dir, &origin, chunk, &sequential)?;
            bad.expect(r.pass.copyouts == expect_seq, || {
                format!(
                    "section 3 sequential, chunk {chunk}: {} copy-outs, expected {expect_seq}",
                    r.pass.copyouts
                )
            });
            sr.push(r);
        }
        rand_runs.push(median_by(&rr, |r| r.pass.wall_rate()));
        seq_runs.push(median_by(&sr, |r| r.pass.wall_rate()));
    }
    drop(origin);
    std::fs::remove_file(&origin_path).ctx(|| format!("removing {}", origin_path.display()))?;

    print_table(
        &format!(
            "random 4 KiB writes ({k} at random 4 KiB-aligned offsets over {}):",
            fmt_bytes(S3_ORIGIN_BYTES)
        ),
        &rand_runs,
        k64,
    );
    print_table(
        &format!("sequential 4 KiB writes ({k} from offset 0):"),
        &seq_runs,
        k64,
    );

    // Conclusion, computed from the figures.
    let find = |runs: &[CopyRun], c: u32| runs.iter().position(|r| r.chunk == c).unwrap_or(0);
    let (i4, i16, i64k) = (
        find(&rand_runs, 4096),
        find(&rand_runs, 16 * 1024),
        find(&rand_runs, 64 * 1024),
    );
    let rr = |i: usize| rand_runs[i].pass.wall_rate();
    let sp = |i: usize| rand_runs[i].data_used_bytes as f64;
    let best = rand_runs
        .iter()
        .max_by(|a, b| a.pass.wall_rate().total_cmp(&b.pass.wall_rate()))
        .map_or(0, |r| r.chunk);
    let best_seq = seq_runs
        .iter()
        .max_by(|a, b| a.pass.wall_rate().total_cmp(&b.pass.wall_rate()))
        .map_or(0, |r| r.chunk);
    println!(
        "conclusion: random 4 KiB writes at 16K chunks run at {:.0}/s = {:.2}x the 4K rate and {:.2}x the 64K rate, \
         using {:.1}x the store space of 4K chunks and {:.2}x that of 64K chunks ({} copied per write); \
         metadata area reserved {:.2}% of the store at 16K vs {:.2}% at 4K; \
         fastest random: {}, fastest sequential: {}; default is {}",
        rr(i16),
        rr(i16) / rr(i4),
        rr(i16) / rr(i64k),
        sp(i16) / sp(i4),
        sp(i16) / sp(i64k),
        fmt_bytes(rand_runs[i16].pass.copied_bytes / k64.max(1)),
        rand_runs[i16].meta_reserved_frac * 100.0,
        rand_runs[i4].meta_reserved_frac * 100.0,
        fmt_chunk(best),
        fmt_chunk(best_seq),
        fmt_chunk(CHUNK_SIZE_DEFAULT_BYTES)
    );
    Ok(())
}

// ---------------------------------------------------------------------------

fn run(s: Settings) -> R<()> {
    let dir = TempDir::create(s.base_dir.as_deref())?;
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    println!(
        "csnap store-bench ({} mode), release build: {}; every figure is the median of {} run(s), each on a freshly formatted store",
        if s.quick { "quick" } else { "full" },
        !cfg!(debug_assertions),
        s.reps
    );
    println!(
        "machine: nproc {nproc}, cpu {}, kernel {}",
        cpu_model().unwrap_or_else(|| "unknown".into()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().to_string())
    );
    match mount_of(&dir.0) {
        Some((fstype, dev, mnt)) => println!(
            "temp dir: {} on {fstype} ({dev} mounted at {mnt})",
            dir.0.display()
        ),
        None => println!("temp dir: {} (filesystem unknown)", dir.0.display()),
    }
    println!(
        "store and origin are regular files (sparse, sized with set_len: first writes allocate); FileDisk flush = fdatasync; \
         metadata cache {CACHE_DEFAULT_BLOCKS} blocks ({}), journal {JOURNAL_DEFAULT_BLOCKS} blocks; PRNG xorshift64* seed {SEED:#x}",
        fmt_bytes(CACHE_DEFAULT_BLOCKS as u64 * BLOCK_SIZE_BYTES as u64)
    );
    let total = Instant::now();
    let mut bad = Anomalies::default();
    section1(&dir, &s, &mut bad)?;
    section2(&dir, &s)?;
    section3(&dir, &s, &mut bad)?;
    println!();
    println!("total time {:.1} s", total.elapsed().as_secs_f64());
    if !bad.0.is_empty() {
        return Err(format!(
            "{} anomalies (wrong results from the store):\n  {}",
            bad.0.len(),
            bad.0.join("\n  ")
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let settings = match parse_args() {
        Ok(Some(s)) => s,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("store-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("store-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
