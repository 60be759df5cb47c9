//! Termination signals for a supervisor, waited for synchronously: `csnap up`
//! blocks them once, before it starts anything, and then waits for them
//! with a timeout instead of running a handler.

use std::io;
use std::time::Duration;

/// A signal `wait` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM.
    Term,
    /// SIGHUP.
    Hup,
    /// SIGCHLD: a child changed state.
    Child,
}

fn set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before
    // any use, and sigaddset only sets bits in it.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGCHLD for the calling thread (and
/// threads it starts later), so `wait` can take them. Children inherit the
/// mask: start them with `spawn_tied`, which clears it.
pub fn block_termination() -> io::Result<()> {
    let s = set();
    // SAFETY: `s` is an initialised signal set; a null old-set pointer is
    // allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits up to `timeout` for one of the blocked signals.
pub fn wait(timeout: Duration) -> io::Result<Option<Sig>> {
    let s = set();
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos().min(999_999_999).cast_signed()),
    };
    // SAFETY: `s` and `ts` are initialised and live for the call; a null
    // siginfo pointer is allowed.
    let rc = unsafe { libc::sigtimedwait(&s, std::ptr::null_mut(), &ts) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(match rc {
        libc::SIGINT => Some(Sig::Int),
        libc::SIGTERM => Some(Sig::Term),
        libc::SIGHUP => Some(Sig::Hup),
        libc::SIGCHLD => Some(Sig::Child),
        _ => None,
    })
}

/// Sends `sig` (SIGTERM or SIGKILL) to process `pid`.
pub fn send(pid: u32, kill: bool) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
    // SAFETY: kill takes integers only.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
