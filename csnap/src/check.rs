//! `csnap check`: offline, read-only consistency check of a store.
//!
//! A file with no csnap label at all (empty, too short, foreign data) is not a
//! store to check: that is exit 2, like a missing file. A file that carries
//! the csnap block magic in block 0 is a store, however damaged: everything
//! wrong with it is a `problem:` line and exit 1.

use std::process::ExitCode;

use csnap_pools::BLOCK_SIZE_BYTES;
use csnap_store::check::CheckReport;
use csnap_store::disk::{Disk, FileDisk};
use csnap_store::layout;

use crate::device::require_device;
use crate::{error, output, CheckArgs, EXIT_FAILED, EXIT_USAGE};

pub fn run(args: &CheckArgs) -> ExitCode {
    let path = args.store.display();
    if let Err(e) = require_device(&args.store, "store") {
        error(&e);
        return ExitCode::from(EXIT_USAGE);
    }
    let mut disk = match FileDisk::open_read_only(&args.store) {
        Ok(d) => d,
        Err(e) => {
            error(&format!("cannot open store {path}: {e}"));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match has_store_magic(&mut disk) {
        Ok(true) => {}
        Ok(false) => {
            let why = if disk.size_bytes() == 0 {
                "not a csnap store: the file is empty (0 bytes)".to_string()
            } else {
                match csnap_store::read_label(&mut disk) {
                    Err(e) => e.to_string(),
                    Ok(_) => "not a csnap store".to_string(),
                }
            };
            error(&format!("{path}: {why}"));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            error(&format!("cannot read store {path}: {e}"));
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let report = csnap_store::check::check(&mut disk);
    let clean = report.is_clean();
    if !output(&render(&path.to_string(), &report)) {
        return ExitCode::from(EXIT_USAGE);
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// Whether block 0 starts with the csnap block magic (checksum not checked:
/// a damaged label is a damaged store, which `check` reports).
fn has_store_magic(disk: &mut FileDisk) -> Result<bool, csnap_store::disk::DiskError> {
    if disk.size_bytes() < 2 * BLOCK_SIZE_BYTES as u64 {
        return Ok(false);
    }
    let mut b = vec![0u8; BLOCK_SIZE_BYTES];
    disk.read_at(&mut b, 0)?;
    Ok(layout::get_u32(&b, 0) == layout::BLOCK_MAGIC)
}

fn render(path: &str, report: &CheckReport) -> String {
    let mut text = String::new();
    for p in &report.problems {
        text.push_str("problem: ");
        text.push_str(p);
        text.push('\n');
    }
    let n = report.problems.len();
    let facts = report.summary.map(|s| {
        format!(
            "commit {}, {} journal commit(s) to replay, {} snapshot(s), {} exception(s), \
             tree depth {} in {} block(s), {} of {} data chunks used",
            s.seq,
            s.replay_commits,
            s.snapshots,
            s.exceptions,
            s.depth,
            s.tree_blocks,
            s.data_used,
            s.data_chunks
        )
    });
    match (n, facts) {
        (0, Some(f)) => text.push_str(&format!("{path}: clean: {f}\n")),
        (0, None) => text.push_str(&format!("{path}: clean\n")),
        (n, Some(f)) => text.push_str(&format!(
            "{path}: {n} problem{} found; {f}\n",
            if n == 1 { "" } else { "s" }
        )),
        (n, None) => text.push_str(&format!(
            "{path}: {n} problem{} found; the check stopped early\n",
            if n == 1 { "" } else { "s" }
        )),
    }
    text
}
