//! Runs the built `csnap` binary against files in fresh temporary directories.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ORIGIN_BYTES: u64 = 4 << 20;
const STORE_SIZE: &str = "16M";
const STORE_BYTES: u64 = 16 << 20;

/// A directory under the system temp dir, removed on drop, with the files
/// these tests make in it.
struct TempDir(csnap_testkit::TempDir);

impl TempDir {
    fn new(name: &str) -> TempDir {
        TempDir(csnap_testkit::TempDir::new("cli", name))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path(name)
    }

    /// A sparse origin file of 4 MiB and the path of a store beside it.
    fn origin_and_store(&self) -> (PathBuf, PathBuf) {
        (self.origin(), self.path("store"))
    }

    /// A sparse origin file of 4 MiB.
    fn origin(&self) -> PathBuf {
        let p = self.path("origin");
        File::create(&p)
            .and_then(|f| f.set_len(ORIGIN_BYTES))
            .expect("create origin");
        p
    }

    /// A formatted 16 MiB store with a 128-block journal.
    fn formatted_store(&self) -> PathBuf {
        let origin = self.origin();
        let store = self.path("store");
        let out = format(&origin, &store, &["--store-size", STORE_SIZE]);
        assert_eq!(out.status.code(), Some(0), "format failed: {}", text(&out));
        store
    }
}

fn csnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_csnap"))
        .args(args)
        .output()
        .expect("run csnap")
}

fn format(origin: &Path, store: &Path, extra: &[&str]) -> Output {
    let origin = origin.to_str().expect("utf-8 path");
    let store = store.to_str().expect("utf-8 path");
    let mut args = vec![
        "format",
        "--origin",
        origin,
        "--store",
        store,
        "--journal-blocks",
        "128",
    ];
    args.extend_from_slice(extra);
    csnap(&args)
}

fn check(store: &Path) -> Output {
    csnap(&["check", "--store", store.to_str().expect("utf-8 path")])
}

use csnap_testkit::{stderr, stdout, text};

fn problem_lines(o: &Output) -> Vec<String> {
    stdout(o)
        .lines()
        .filter(|l| l.starts_with("problem: "))
        .map(str::to_string)
        .collect()
}

fn store_uuid(format_output: &Output) -> String {
    stdout(format_output)
        .lines()
        .find_map(|l| l.trim().strip_prefix("store uuid"))
        .map(|s| s.trim().to_string())
        .expect("format prints the store uuid")
}

/// Asserts exit status 0.
fn assert_ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", text(o));
}

/// Asserts that file `p` is `bytes` long.
fn assert_size(p: &Path, bytes: u64) {
    assert_eq!(
        fs::metadata(p).map(|m| m.len()).ok(),
        Some(bytes),
        "size of {}",
        p.display()
    );
}

/// Asserts exit status `code`, one `csnap: ` error line on stderr that
/// contains `word`, and nothing on stdout.
fn assert_error(o: &Output, code: i32, word: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    let err = stderr(o);
    assert!(err.starts_with("csnap: "), "{}", text(o));
    assert!(err.contains(word), "expected {word:?}: {}", text(o));
    assert!(o.stdout.is_empty(), "{}", text(o));
}

#[test]
fn format_then_check_is_clean() {
    let d = TempDir::new("clean");
    let (origin, store) = d.origin_and_store();
    let out = format(&origin, &store, &["--store-size", STORE_SIZE]);
    assert_ok(&out);
    let s = stdout(&out);
    assert_eq!(store_uuid(&out).len(), 32, "{s}");
    assert!(s.contains("chunk size    16384 bytes"), "{s}");
    assert!(s.contains("journal       128 blocks"), "{s}");
    assert!(s.contains("store full    refuse"), "{s}");
    assert_size(&store, STORE_BYTES);

    let out = check(&store);
    assert_ok(&out);
    assert!(problem_lines(&out).is_empty(), "{}", text(&out));
    assert!(stdout(&out).contains(": clean"), "{}", text(&out));
}

#[test]
fn format_options_reach_the_label() {
    let d = TempDir::new("options");
    let (origin, store) = d.origin_and_store();
    let out = format(
        &origin,
        &store,
        &[
            "--store-size",
            "16MiB",
            "--chunk-size",
            "64K",
            "--store-full",
            "delete-lowest-priority",
        ],
    );
    assert_ok(&out);
    let s = stdout(&out);
    assert!(s.contains("chunk size    65536 bytes"), "{s}");
    assert!(s.contains("(64 chunks)"), "{s}");
    assert!(s.contains("store full    delete-lowest-priority"), "{s}");
    assert_eq!(check(&store).status.code(), Some(0));
}

#[test]
fn format_extends_an_empty_store_file() {
    let d = TempDir::new("extend");
    let (origin, store) = d.origin_and_store();
    File::create(&store).expect("create empty store");
    let out = format(&origin, &store, &[]);
    assert_error(&out, 2, "--store-size");
    let out = format(&origin, &store, &["--store-size", STORE_SIZE]);
    assert_ok(&out);
    assert_size(&store, STORE_BYTES);
    assert_eq!(check(&store).status.code(), Some(0));
}

#[test]
fn format_needs_store_size_for_a_missing_store() {
    let d = TempDir::new("nosize");
    let (origin, store) = d.origin_and_store();
    let out = format(&origin, &store, &[]);
    assert_error(&out, 2, "does not exist");
    assert!(stderr(&out).contains("--store-size"), "{}", text(&out));
    assert!(!store.exists());
}

#[test]
fn format_rejects_store_size_for_a_sized_store() {
    let d = TempDir::new("resize");
    let store = d.formatted_store();
    let out = format(
        &d.path("origin"),
        &store,
        &["--store-size", "32M", "--force"],
    );
    assert_error(&out, 2, "already has 16777216 bytes");
    assert_size(&store, STORE_BYTES);
}

#[test]
fn format_refuses_a_missing_origin() {
    let d = TempDir::new("noorigin");
    let store = d.path("store");
    let out = format(&d.path("origin"), &store, &["--store-size", STORE_SIZE]);
    assert_error(&out, 2, "No such file");
    assert!(stderr(&out).contains("origin"), "{}", text(&out));
    assert!(!store.exists());
}

#[test]
fn format_refuses_the_origin_as_store() {
    let d = TempDir::new("same");
    let origin = d.origin();
    let out = format(&origin, &origin, &[]);
    assert_error(&out, 2, "same file");
    assert_size(&origin, ORIGIN_BYTES);
}

#[test]
fn format_refuses_bad_chunk_sizes() {
    let d = TempDir::new("chunk");
    let (origin, store) = d.origin_and_store();
    for bad in ["3000", "2M", "2K", "0"] {
        let out = format(
            &origin,
            &store,
            &["--store-size", STORE_SIZE, "--chunk-size", bad],
        );
        assert_error(&out, 2, "chunk size");
        assert!(stderr(&out).contains("power of two"), "{}", text(&out));
        assert!(!store.exists(), "chunk size {bad} created the store");
    }
}

#[test]
fn format_refuses_a_store_too_small_and_leaves_nothing() {
    let d = TempDir::new("small");
    let (origin, store) = d.origin_and_store();
    let out = format(&origin, &store, &["--store-size", "64K"]);
    assert_error(&out, 1, "too small");
    assert!(!store.exists());
}

#[test]
fn format_refuses_a_short_journal() {
    let d = TempDir::new("journal");
    let (origin, store) = d.origin_and_store();
    let out = csnap(&[
        "format",
        "--origin",
        origin.to_str().expect("utf-8"),
        "--store",
        store.to_str().expect("utf-8"),
        "--store-size",
        STORE_SIZE,
        "--journal-blocks",
        "64",
    ]);
    assert_error(&out, 1, "journal of 64 blocks is too small");
    assert!(!store.exists());
}

#[test]
fn format_refuses_to_overwrite_a_store_without_force() {
    let d = TempDir::new("force");
    let (origin, store) = d.origin_and_store();
    let first = format(&origin, &store, &["--store-size", STORE_SIZE]);
    assert_ok(&first);
    let before = fs::read(&store).expect("read store");

    let out = format(&origin, &store, &[]);
    assert_error(&out, 1, "already holds a csnap store");
    assert!(stderr(&out).contains("--force"), "{}", text(&out));
    assert!(stderr(&out).contains(&store_uuid(&first)), "{}", text(&out));
    assert!(
        fs::read(&store).expect("read store") == before,
        "store was modified"
    );

    let second = format(&origin, &store, &["--force"]);
    assert_ok(&second);
    assert_ne!(store_uuid(&first), store_uuid(&second));
    assert_eq!(check(&store).status.code(), Some(0));
}

#[test]
fn format_overwrites_foreign_data_without_force() {
    let d = TempDir::new("foreign");
    let (origin, store) = d.origin_and_store();
    fs::write(&store, pseudo_random(STORE_BYTES)).expect("write store");
    let out = format(&origin, &store, &[]);
    assert_ok(&out);
    assert_eq!(check(&store).status.code(), Some(0));
}

#[test]
fn bad_size_strings_are_rejected() {
    let d = TempDir::new("sizes");
    let (origin, store) = d.origin_and_store();
    for bad in [
        "",
        "12Q",
        "16MB",
        "1.5G",
        "-1",
        "M",
        "0x100000",
        "99999999999999999999",
        "16777216T",
        "0",
    ] {
        // `--flag=VALUE` so that "-1" reaches the size parser.
        let arg = format!("--store-size={bad}");
        let out = format(&origin, &store, &[&arg]);
        assert_error(&out, 2, "--store-size");
        assert!(!store.exists(), "size {bad:?} created the store");
        let arg = format!("--chunk-size={bad}");
        let out = format(&origin, &store, &["--store-size", STORE_SIZE, &arg]);
        assert_error(&out, 2, "--chunk-size");
        assert!(!store.exists(), "chunk size {bad:?} created the store");
    }
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = csnap(&["format", "--origin", "x"]);
    assert_error(&out, 2, "--store");
    let out = csnap(&["check"]);
    assert_error(&out, 2, "--store");
    let out = csnap(&["check", "--store", "x", "--bogus"]);
    assert_error(&out, 2, "--bogus");
    let out = csnap(&["frobnicate"]);
    assert_error(&out, 2, "frobnicate");
    let out = csnap(&[
        "format",
        "--origin",
        "x",
        "--store",
        "y",
        "--store-full",
        "sometimes",
    ]);
    assert_error(&out, 2, "sometimes");
    let out = csnap(&[
        "format",
        "--origin",
        "x",
        "--store",
        "y",
        "--journal-blocks",
        "many",
    ]);
    assert_error(&out, 2, "--journal-blocks");
    // Cluster addresses: a listen address that does not parse, and an
    // agent's server address that is not an IP.
    let d = TempDir::new("bad-addr");
    let cl = d.path("cl");
    let out = csnap(&[
        "cluster",
        "run",
        "--dir",
        cl.to_str().unwrap(),
        "--listen",
        "no-such-host.invalid:7790",
        "--no-mlock",
    ]);
    assert_error(&out, 2, "--listen no-such-host.invalid:7790");
    let out = csnap(&[
        "agent",
        "--dir",
        cl.to_str().unwrap(),
        "--node",
        "1",
        "--origin",
        "x",
        "--store",
        "y",
        "--server-listen",
        "node1",
    ]);
    assert_error(&out, 2, "--server-listen");
}

#[test]
fn check_missing_path() {
    let d = TempDir::new("missing");
    let out = check(&d.path("nothing-here"));
    assert_error(&out, 2, "No such file");
}

#[test]
fn check_directory() {
    let d = TempDir::new("dir");
    let out = check(d.0.dir());
    assert_error(&out, 2, "is a directory");
}

#[test]
fn check_random_bytes() {
    let d = TempDir::new("random");
    let p = d.path("random");
    fs::write(&p, pseudo_random(1 << 20)).expect("write");
    let out = check(&p);
    assert_error(&out, 2, "not a csnap store");
}

#[test]
fn check_zero_length_file() {
    let d = TempDir::new("empty");
    let p = d.path("empty");
    File::create(&p).expect("create");
    let out = check(&p);
    assert_error(&out, 2, "not a csnap store");
    assert!(stderr(&out).contains("empty"), "{}", text(&out));
}

#[test]
fn check_store_truncated_to_half() {
    let d = TempDir::new("truncated");
    let store = d.formatted_store();
    OpenOptions::new()
        .write(true)
        .open(&store)
        .and_then(|f| f.set_len(STORE_BYTES / 2))
        .expect("truncate");
    let out = check(&store);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let problems = problem_lines(&out);
    assert_eq!(problems.len(), 1, "{}", text(&out));
    assert!(problems[0].contains("truncated"), "{}", text(&out));
}

#[test]
fn check_store_truncated_below_two_blocks() {
    let d = TempDir::new("stub");
    let store = d.formatted_store();
    OpenOptions::new()
        .write(true)
        .open(&store)
        .and_then(|f| f.set_len(4096))
        .expect("truncate");
    let out = check(&store);
    assert_error(&out, 2, "truncated or empty");
}

#[test]
fn check_reports_a_flipped_superblock_byte() {
    let out = check_flipped("superblock", 4096 + 100);
    let problems = problem_lines(&out);
    assert!(!problems.is_empty(), "{}", text(&out));
    assert!(
        problems.iter().any(|p| p.contains("superblock")),
        "{}",
        text(&out)
    );
    assert!(stdout(&out).contains("problem"), "{}", text(&out));
}

#[test]
fn check_reports_a_flipped_label_byte() {
    let out = check_flipped("label", 100);
    let problems = problem_lines(&out);
    assert!(
        problems.iter().any(|p| p.contains("label is corrupt")),
        "{}",
        text(&out)
    );
}

#[test]
fn check_reports_a_flipped_bitmap_byte() {
    // Block 2 + 128 is the first metadata bitmap block of a 128-block journal.
    let out = check_flipped("bitmap", (2 + 128) * 4096 + 200);
    assert!(
        problem_lines(&out).iter().any(|p| p.contains("bitmap")),
        "{}",
        text(&out)
    );
}

#[test]
fn check_writes_nothing() {
    let d = TempDir::new("readonly");
    let store = d.formatted_store();
    flip_byte(&store, 4096 + 100);
    let before = fs::read(&store).expect("read");
    let _ = check(&store);
    assert!(
        fs::read(&store).expect("read") == before,
        "check modified the store"
    );
}

/// `csnap check` of a formatted store with the byte at `offset` flipped,
/// which must report problems (exit 1).
fn check_flipped(name: &str, offset: u64) -> Output {
    let d = TempDir::new(name);
    let store = d.formatted_store();
    flip_byte(&store, offset);
    let out = check(&store);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    out
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read byte");
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).expect("write byte");
}

/// Deterministic bytes that look like foreign data (xorshift64).
fn pseudo_random(len: u64) -> Vec<u8> {
    let mut x = csnap_testkit::XorShift64::new(csnap_testkit::GOLDEN_GAMMA);
    (0..len).map(|_| x.next_u64().to_le_bytes()[0]).collect()
}

/// Shared devices are reached around the page cache: an origin or a store on
/// a file system without direct I/O (tmpfs) is refused with a clear message
/// (exit 2), and a store file created for it is removed again.
#[test]
fn format_refuses_devices_without_direct_io() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let d = TempDir::new("nodio");
    let tag = format!("csnap-cli-nodio-{}", std::process::id());
    let shm_origin = shm.join(format!("{tag}-origin"));
    let shm_store = shm.join(format!("{tag}-store"));
    File::create(&shm_origin)
        .and_then(|f| f.set_len(ORIGIN_BYTES))
        .unwrap();
    let out = format(&shm_origin, &d.path("store"), &["--store-size", STORE_SIZE]);
    assert_error(&out, 2, "direct I/O");
    assert!(!d.path("store").exists());
    let out = format(&d.origin(), &shm_store, &["--store-size", STORE_SIZE]);
    let _ = fs::remove_file(&shm_origin);
    assert_error(&out, 2, "direct I/O");
    assert!(!shm_store.exists(), "the refused store file stays behind");
}

/// Every binary of the workspace answers `--help` at once (exit 0, a usage
/// line, no run of its workload) and refuses an unknown flag (exit 2, the
/// flag named). The benches of other crates are checked where cargo built
/// them next to csnap (a workspace test run does).
#[test]
fn every_binary_answers_help_and_refuses_unknown_flags() {
    let csnap = std::path::PathBuf::from(env!("CARGO_BIN_EXE_csnap"));
    let dir = csnap.parent().expect("target dir").to_path_buf();
    let mut bins = vec![
        csnap.clone(),
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_failover-bench")),
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_confinement-bench")),
    ];
    for other in ["server-bench", "store-bench"] {
        let p = dir.join(other);
        if p.exists() {
            bins.push(p);
        } else {
            eprintln!("{other} not built next to csnap: not checked here");
        }
    }
    for b in bins {
        let t0 = std::time::Instant::now();
        let o = std::process::Command::new(&b)
            .arg("--help")
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{} --help: {all}", b.display());
        assert!(
            all.to_lowercase().contains("usage"),
            "{} --help: {all}",
            b.display()
        );
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "{} --help ran a workload",
            b.display()
        );
        let o = std::process::Command::new(&b)
            .arg("--no-such-flag")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{} --no-such-flag: {err}",
            b.display()
        );
        assert!(err.contains("--no-such-flag"), "{}: {err}", b.display());
    }
}
