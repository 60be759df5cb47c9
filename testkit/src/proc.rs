//! Process helpers: scratch directories, children that cannot outlive their
//! test, waiting for a condition with a deadline.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A child process, killed (SIGKILL) and reaped on drop, so a failing test
/// leaves no process behind.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A new, empty directory `csnap-<prefix>-<name>-<pid>` under the temp dir:
/// unique to this test process, emptied first.
#[must_use]
pub fn fresh_dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("csnap-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Polls `f` (every 200 µs) until it returns `Some`, and returns that;
/// panics naming `what` when `t` passes first.
pub fn wait_for<T>(what: &str, t: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_every(what, t, Duration::from_micros(200), f)
}

/// [`wait_for`], polling every `period` (for a costly `f`).
pub fn wait_for_every<T>(
    what: &str,
    t: Duration,
    period: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < t, "timed out waiting until {what}");
        std::thread::sleep(period);
    }
}

/// A new directory under the temp dir, unique to this call
/// (`csnap-<prefix>-<name>-<pid>-<n>-<nanos>`), removed with everything in
/// it on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates the directory; panics if it cannot.
    #[must_use]
    pub fn new(prefix: &str, name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "csnap-{prefix}-{name}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// `name` inside the directory.
    #[must_use]
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
