//! What the bench binaries share: their flag, the `csnap` binary beside
//! them, and a scratch directory removed afterwards.

use std::path::{Path, PathBuf};

/// Checks the command line: `--help` prints `usage` and returns `Ok(false)`
/// (the bench does not run); a flag other than `known` (each taking one
/// value) is an error.
pub fn check_args(args: &[String], known: &[&str], usage: &str) -> Result<bool, String> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--help" || a == "-h" {
            println!("{usage}");
            return Ok(false);
        }
        if !known.contains(&a) {
            usage_error(&format!("unknown argument {a:?}\n{usage}"));
        }
        if i + 1 >= args.len() {
            usage_error(&format!("{a} needs a value"));
        }
        i += 2;
    }
    Ok(true)
}

/// A command-line error: the message, and exit status 2 (as `csnap`'s
/// usage errors). Nothing has started yet: there is nothing to unwind.
#[allow(clippy::exit)]
fn usage_error(msg: &str) -> ! {
    let name = std::env::args()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    eprintln!("{name}: {msg}");
    std::process::exit(2)
}

/// The value of `--NAME V` parsed, or `default` when the flag is absent.
pub fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => {
            let v = args
                .get(i + 1)
                .ok_or_else(|| format!("{name} needs a value"))?;
            v.parse::<T>().map_err(|e| format!("{name}: {e}"))
        }
    }
}

/// The `csnap` binary built beside this one.
pub fn csnap_bin() -> Result<PathBuf, String> {
    let bin = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("csnap");
    if !bin.exists() {
        return Err(format!(
            "{} not found: cargo build --release -p csnap first",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Runs `f` in a fresh directory `TMP/csnap-NAME-PID`, removed afterwards
/// (on success and on error).
pub fn in_scratch_dir<R>(
    name: &str,
    f: impl FnOnce(&Path) -> Result<R, String>,
) -> Result<R, String> {
    let d = std::env::temp_dir().join(format!("csnap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let r = f(&d);
    let _ = std::fs::remove_dir_all(&d);
    r
}
