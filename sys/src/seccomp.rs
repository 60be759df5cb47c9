//! Seccomp filters: compiled at init from a list of allowed syscall numbers,
//! installed per thread when it enters a confined phase, with a SIGSYS
//! reporter that names the offending syscall before the process exits.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Exit status of a process killed for a forbidden syscall (128 + SIGSYS).
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 159;

/// A compiled filter: allow the listed syscalls, trap everything else.
#[derive(Debug, Clone)]
pub struct Filter {
    prog: BpfProgram,
}

/// Compiles a filter that allows `allowed` and traps the rest. Init only (it
/// allocates).
pub fn compile(allowed: &[i64]) -> Result<Filter, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        allowed.iter().map(|&nr| (nr, Vec::new())).collect();
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: unsupported architecture: {e:?}"))?;
    let f = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    let prog: BpfProgram = f
        .try_into()
        .map_err(|e| format!("seccomp compile: {e:?}"))?;
    Ok(Filter { prog })
}

impl Filter {
    /// Installs the filter on the calling thread (after
    /// `PR_SET_NO_NEW_PRIVS`).
    ///
    /// Heap-free, as it runs after the heap is sealed: the error is the
    /// kernel's (`prctl` or `seccomp`), or `InvalidInput` for a filter
    /// seccompiler refuses, never a formatted text.
    pub fn install(&self) -> io::Result<()> {
        seccompiler::apply_filter(&self.prog).map_err(|e| match e {
            seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
            _ => io::Error::from(io::ErrorKind::InvalidInput),
        })
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The kernel's SIGSYS siginfo carries `si_syscall` (an int) at byte 24
    // on Linux (after signo, errno, code, padding and `si_call_addr`).
    // SAFETY: the kernel passes a valid siginfo_t for this SA_SIGINFO
    // handler; byte 24 is inside it (it is 128 bytes long) and holds an int
    // for SIGSYS.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut buf = [0u8; 12];
    let mut i = buf.len();
    let mut v = u32::try_from(nr).unwrap_or(0);
    loop {
        i -= 1;
        buf[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let parts: [&[u8]; 3] = [
        b"csnap: forbidden syscall ",
        &buf[i..],
        b" in a confined phase (not in the audited whitelist, see audit/); exiting\n",
    ];
    for p in parts {
        // SAFETY: `p` is a live byte slice; write(2) only reads it.
        let _ = unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // SAFETY: exit_group ends the process; it is in every whitelist.
    unsafe { libc::syscall(libc::SYS_exit_group, EXIT_FORBIDDEN_SYSCALL) };
}

/// Installs the SIGSYS reporter for the whole process. Init only.
pub fn install_sigsys_reporter() -> io::Result<()> {
    // SAFETY: sigaction is plain data; all-zero is a valid starting value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa.sa_mask is a live sigset_t owned by `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `sa` is fully initialised; the old action is not wanted.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes an `open(2)` of `/etc/hostname` without allocating: the death test's
/// forbidden syscall in the serving phase.
pub fn forbidden_open_for_tests() {
    let path = b"/etc/hostname\0";
    // SAFETY: `path` is a NUL-terminated static byte string; open only reads
    // it. The returned descriptor (if the filter lets the call through) is
    // closed at once.
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by open and is owned here.
        unsafe { libc::close(fd) };
    }
}
