//! Helpers shared by the process tests of the `csnap` binary.

#![allow(dead_code)]

pub mod cluster;
pub mod fs;
pub mod hacluster;
pub mod testbed;

use std::path::PathBuf;
use std::process::Child;

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A new, empty directory under the temp dir, unique to this test process.
pub fn fresh_dir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("csnap-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
