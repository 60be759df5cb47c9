//! Memory locking, prefaulting and process hardening for the serving phase.

use std::io;

/// `mlockall(MCL_CURRENT | MCL_FUTURE)`: every page mapped now and later stays
/// resident. Needs CAP_IPC_LOCK (or a large enough RLIMIT_MEMLOCK).
pub fn lock_all() -> io::Result<()> {
    // SAFETY: mlockall takes flags only and touches no memory of ours.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Touches `bytes` of this thread's stack below the current frame, so later
/// calls that deep fault no page (with `lock_all`, the pages stay).
#[inline(never)]
pub fn prefault_stack(bytes: usize) {
    const STEP: usize = 4096;
    let mut page = [0u8; STEP];
    // Volatile write: the page is really touched.
    // SAFETY: `page` is a live local array; writing one byte through a
    // pointer to its first element is in bounds.
    unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 1) };
    if bytes > STEP {
        prefault_stack(bytes - STEP);
    }
    std::hint::black_box(&page);
}

/// Marks this process as an I/O flusher (`PR_SET_IO_FLUSHER`, Linux 5.6+):
/// its allocations avoid reclaim that would wait for I/O it must serve.
/// Needs CAP_SYS_RESOURCE; the error is returned for the caller to report.
pub fn set_io_flusher() -> io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `/proc/self/oom_score_adj` (-1000: never chosen by the OOM killer).
pub fn set_oom_score_adj(v: i32) -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", v.to_string())
}

/// Minor and major page faults of this process so far (`getrusage`).
pub fn page_faults() -> io::Result<(u64, u64)> {
    // SAFETY: rusage is plain data; all-zero bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable rusage the kernel fills in.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let minor = u64::try_from(ru.ru_minflt).unwrap_or(0);
    let major = u64::try_from(ru.ru_majflt).unwrap_or(0);
    Ok((minor, major))
}
