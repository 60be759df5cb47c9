//! The small sys layer: every `unsafe` block of csnap lives here, each with a
//! `SAFETY:` comment.
//!
//! - `alloc`: the sealed global allocator (phases init, sealed, teardown).
//! - `dio`: `O_DIRECT` opens, direct-I/O alignment, aligned buffers.
//! - `panic`: the panic hook (report with `write`, exit with `exit_group`).
//! - `mem`: `mlockall`, prefaulting, `PR_SET_IO_FLUSHER`, `oom_score_adj`.
//! - `random_bytes`: `getrandom(2)`.
//! - `signal`: SIGTERM and SIGINT as a readable descriptor (`signalfd`).

#[cfg(not(csnap_loom))]
pub mod alloc;
#[cfg(not(csnap_loom))]
pub mod confine;
pub mod dio;
pub mod mem;
pub mod panic;
pub mod phase;
pub mod seccomp;
pub mod signal;
pub mod supervise;
pub mod uring;

/// Fills `b` from the kernel's random source.
pub fn random_bytes(b: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0usize;
    while filled < b.len() {
        let rest = &mut b[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable,
        // exclusively borrowed slice; getrandom writes at most `rest.len()`
        // bytes into it and keeps no reference after returning.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Reads from standard input into `buf` (no buffering, no allocation).
pub fn read_stdin(buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live, writable slice; read(2) writes at most
        // `buf.len()` bytes into it.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Takes an exclusive, non-blocking `flock` on an open file: one server per
/// store on this host. Released when the process exits. `Ok(false)` when
/// another process holds it.
pub fn lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock takes a descriptor we own (borrowed from a live File) and
    // flags; it touches no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Spawns `cmd` tied to this process: the child gets SIGKILL when this
/// process dies (`PR_SET_PDEATHSIG`), so a node's agent, its spawner and its
/// servers go down together and no server outlives the agent that fences
/// it. Init or background use only (it forks and allocates).
pub fn spawn_tied(cmd: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid has no preconditions and touches no memory of ours.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec. It calls
    // only sigemptyset, sigprocmask, prctl, getppid and _exit, which are
    // async-signal-safe, allocates nothing and takes no lock, as `pre_exec`
    // requires; the signal set is a local of plain data.
    unsafe {
        cmd.pre_exec(move || {
            // A supervisor blocks its termination signals to wait for them;
            // std passes the mask on, and the child must start with none.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl took effect: go now.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// `CLOCK_MONOTONIC` in microseconds: one clock for every process of the
/// machine, so event lines of different processes can be compared (the
/// failover benchmark does). vDSO: no syscall, no allocation.
pub fn monotonic_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; clock_gettime fills it and
    // keeps no reference.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1000
}

/// Tells the kernel `file` is read at random (`POSIX_FADV_RANDOM`): no
/// readahead. The server's copy-out and metadata reads are random chunk and
/// block reads; readahead around them only fills the page cache (and, on a
/// sparse file, zeroes pages) for nothing. Init only.
pub fn fadvise_random(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: posix_fadvise takes a descriptor we own (borrowed from a live
    // File) and integers; it touches no memory of ours.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Sends signal `sig` to process `pid` (`kill(2)`). For the test harnesses
/// and the failover benchmark (SIGKILL, SIGSTOP, SIGCONT of servers); the
/// confined processes never call it.
pub fn send_signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill takes a pid and a signal number and touches no memory of
    // ours.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The text of an errno a confined process is likely to meet, without the
/// heap (`io::Error`'s own text allocates: not after the heap is sealed).
pub fn errno_text(errno: i32) -> &'static str {
    match errno {
        libc::EIO => "Input/output error",
        libc::ENOSPC => "No space left on device",
        libc::EROFS => "Read-only file system",
        libc::ENXIO => "No such device or address",
        libc::ENODEV => "No such device",
        libc::EBADF => "Bad file descriptor",
        libc::EINVAL => "Invalid argument",
        libc::EDQUOT => "Disk quota exceeded",
        libc::ENOMEM => "Cannot allocate memory",
        libc::EMFILE => "Too many open files",
        libc::EINTR => "Interrupted system call",
        libc::EFAULT => "Bad address",
        _ => "system error",
    }
}

/// The stop of a confined process whose loop failed after its heap was
/// sealed: one heap-free line (`WHO: WHAT: errno text (os error N)`) and
/// `exit_now(code)`. Nothing is formatted into a `String`, nothing freed.
pub fn fail_stop(who: &str, what: &str, err: &std::io::Error, code: u8) -> ! {
    match err.raw_os_error() {
        Some(n) => eprintln!("{who}: {what}: {} (os error {n})", errno_text(n)),
        None => eprintln!("{who}: {what}"),
    }
    exit_now(code)
}

/// Ends the process at once with `code` (`_exit(2)`: the `exit_group`
/// syscall only). For a confined process that stops: no destructor runs,
/// so nothing is freed under the sealed heap and no syscall outside the
/// serving whitelist is made (closing descriptors, unmapping, the signal
/// stack's teardown); the kernel releases everything.
pub fn exit_now(code: u8) -> ! {
    // SAFETY: _exit takes an integer, never returns, and touches no memory
    // of ours.
    unsafe { libc::_exit(i32::from(code)) }
}
