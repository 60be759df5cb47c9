//! The house rules that review keeps finding by hand (issue #14), checked
//! on every test run:
//! - functions over `FN_LINES_MAX` lines in non-test code: a ratchet (the
//!   count may only go down; lower `LONG_FUNCTIONS_MAX` when it does);
//! - source files (outside tests) over `FILE_LINES_MAX` lines: only those in
//!   `LONG_FILES`, none longer than listed there (a ratchet too);
//! - `unsafe` only in `sys/`;
//! - no allocation macro (`format!`, `vec!`, `Box::new`, `.to_string()`) in
//!   `fsm/` and `proto/` non-test code, except in init-time constructors
//!   (functions named `new`, `with_*`, `reserve*`, `build*`), which reserve
//!   the pools.

use std::path::{Path, PathBuf};

use csnap_tidy::{code_lines, functions, rust_files, workspace_root};

const FN_LINES_MAX: usize = 70;
/// Functions over `FN_LINES_MAX` lines today (the ratchet).
const LONG_FUNCTIONS_MAX: usize = 39;
const FILE_LINES_MAX: usize = 1200;
/// Files over `FILE_LINES_MAX` lines today, with their length: each may only
/// shrink, and no other file may grow past the limit.
const LONG_FILES: &[(&str, usize)] = &[];

/// The crates whose `src/` is checked.
const CRATES: &[&str] = &[
    "pools",
    "sys",
    "store",
    "proto",
    "fsm",
    "io",
    "failover",
    "audit",
    "loom-tests",
    "csnap",
    "tidy",
    "fuzz",
    "testkit",
];

fn sources() -> Vec<(PathBuf, String)> {
    let root = workspace_root();
    let mut v = Vec::new();
    for c in CRATES {
        for f in rust_files(&root.join(c).join("src")) {
            let rel = f.strip_prefix(&root).unwrap_or(&f).to_path_buf();
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            v.push((rel, text));
        }
    }
    v
}

fn is_init(name: &str) -> bool {
    name == "new"
        || name.starts_with("with_")
        || name.starts_with("reserve")
        || name.starts_with("build")
}

#[test]
fn long_functions_only_go_down() {
    let mut long = Vec::new();
    for (path, text) in sources() {
        for f in functions(&code_lines(&text)) {
            if !f.in_test && f.lines() > FN_LINES_MAX {
                long.push(format!(
                    "{}:{} {} ({} lines)",
                    path.display(),
                    f.start,
                    f.name,
                    f.lines()
                ));
            }
        }
    }
    eprintln!("functions over {FN_LINES_MAX} lines: {}", long.len());
    assert!(
        long.len() <= LONG_FUNCTIONS_MAX,
        "{} functions over {FN_LINES_MAX} lines, the ratchet allows {LONG_FUNCTIONS_MAX}: split the new one(s):\n{}",
        long.len(),
        long.join("\n")
    );
    if long.len() < LONG_FUNCTIONS_MAX {
        eprintln!(
            "note: {} < {LONG_FUNCTIONS_MAX}: lower LONG_FUNCTIONS_MAX in tidy/tests/tidy.rs",
            long.len()
        );
    }
}

#[test]
fn long_files_only_shrink() {
    let mut problems = Vec::new();
    for (path, text) in sources() {
        let n = text.lines().count();
        let p = path.to_string_lossy().to_string();
        match LONG_FILES.iter().find(|(f, _)| *f == p) {
            Some(&(_, max)) if n > max => {
                problems.push(format!("{p}: {n} lines, more than its ratchet {max}"))
            }
            None if n > FILE_LINES_MAX => problems.push(format!(
                "{p}: {n} lines, over {FILE_LINES_MAX}: split it by job"
            )),
            _ => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every `.rs` file of the workspace (sources, tests, benches), but `sys/`.
fn all_but_sys() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut v = Vec::new();
    for c in CRATES.iter().filter(|c| **c != "sys") {
        v.extend(rust_files(&root.join(c)));
    }
    v
}

#[test]
fn unsafe_lives_only_in_sys() {
    let mut found = Vec::new();
    for f in all_but_sys() {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for (i, line) in code_lines(&text).iter().enumerate() {
            let t = line.trim();
            if t.starts_with("#![") || t.starts_with("#[") {
                continue;
            }
            let words = t.split(|c: char| !(c.is_alphanumeric() || c == '_'));
            if words.into_iter().any(|w| w == "unsafe") {
                found.push(format!("{}:{}: {t}", f.display(), i + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "unsafe outside sys/:\n{}",
        found.join("\n")
    );
}

fn alloc_macros_in(dir: &Path) -> Vec<String> {
    const MACROS: &[&str] = &["format!", "vec!", "Box::new", ".to_string()"];
    let mut found = Vec::new();
    for path in rust_files(dir) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let code = code_lines(&text);
        let fns = functions(&code);
        for (i, line) in code.iter().enumerate() {
            let Some(m) = MACROS.iter().find(|m| line.contains(**m)) else {
                continue;
            };
            // The innermost function around the line.
            let inner = fns
                .iter()
                .filter(|f| f.start <= i + 1 && i < f.end)
                .min_by_key(|f| f.lines());
            if let Some(f) = inner.filter(|f| !f.in_test && !is_init(&f.name)) {
                found.push(format!(
                    "{}:{}: {m} in fn {}",
                    path.display(),
                    i + 1,
                    f.name
                ));
            }
        }
    }
    found
}

#[test]
fn no_allocation_macros_in_fsm_and_proto_outside_init() {
    let root = workspace_root();
    let mut found = alloc_macros_in(&root.join("fsm/src"));
    found.extend(alloc_macros_in(&root.join("proto/src")));
    assert!(
        found.is_empty(),
        "allocation macros in fsm/ or proto/ outside init-time constructors:\n{}",
        found.join("\n")
    );
}
