//! Process helpers: scratch directories, children that cannot outlive their
//! test, waiting for a condition with a deadline.

use std::path::PathBuf;
use std::process::Child;
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
pub fn wait_for<T>(what: &str, t: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < t, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}
