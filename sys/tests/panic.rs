//! A panic in a sealed, seccomp-confined process reports its message and
//! location and exits with `PANIC_EXIT_STATUS`, using only `write` and
//! `exit_group`: never "forbidden syscall" (abort's rt_sigprocmask) and never
//! a heap violation (std formats the message on the heap). The confined part
//! runs in a child process (this test binary, re-executed), so its sealed
//! heap and filter never touch the other tests.

use std::process::Command;

#[global_allocator]
static ALLOC: csnap_sys::alloc::SealedAlloc = csnap_sys::alloc::SealedAlloc::new();

const CHILD_ENV: &str = "CSNAP_PANIC_TEST_CHILD";

/// The child: hook, seal, the narrowest whitelist, then a formatted panic
/// (its message allocates) on a thread whose filter allows nothing but
/// `write`, `exit_group` and `rt_sigreturn`.
fn child(mode: &str) {
    csnap_sys::seccomp::install_sigsys_reporter().unwrap();
    if mode == "hook" {
        csnap_sys::panic::install_hook("panic-test");
    }
    let filter = csnap_sys::seccomp::compile(&[
        libc::SYS_write,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
    ])
    .unwrap();
    let detail = std::hint::black_box(42u64);
    csnap_sys::alloc::seal(csnap_sys::alloc::Mode::Abort);
    filter.install().unwrap();
    panic!(
        "a formatted message with detail {detail} and a {}",
        "string"
    );
}

fn run_child(mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_confined_panic_reports_and_exits",
            "--nocapture",
        ])
        .env(CHILD_ENV, mode)
        .output()
        .unwrap()
}

#[test]
fn a_confined_panic_reports_and_exits() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
        return;
    }
    let o = run_child("hook");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(i32::from(csnap_sys::panic::PANIC_EXIT_STATUS)),
        "{err}"
    );
    assert!(
        err.contains("csnap: panic-test: panic: at sys/tests/panic.rs:")
            && err.contains("a formatted message with detail 42 and a string"),
        "{err}"
    );
    assert!(!err.contains("forbidden syscall"), "{err}");
    assert!(!err.contains("heap violation"), "{err}");
    // The control: without the hook the same panic dies on the filter
    // (abort's syscalls), its message lost.
    let o = run_child("none");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(
        o.status.code(),
        Some(i32::from(csnap_sys::panic::PANIC_EXIT_STATUS)),
        "{err}"
    );
    assert!(!err.contains("csnap: panic-test: panic"), "{err}");
}
