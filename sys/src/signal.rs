//! Termination signals as a readable descriptor (`signalfd`), so an event
//! loop learns of SIGTERM and SIGINT like of any other input, with no signal
//! handler running inside it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Blocks `signals` for the calling thread (and threads it starts later) and
/// returns a non-blocking, close-on-exec `signalfd` that reads them. Call it
/// from the main thread before starting any other thread, so no thread
/// leaves them unblocked (a blocked signal would otherwise be delivered to
/// that thread's default action).
pub fn signal_fd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; all-zero bytes are a valid value, and
    // sigemptyset initialises it right after.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, writable sigset_t.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for &s in signals {
        // SAFETY: `set` is a live, initialised sigset_t; `s` is checked by
        // the kernel (EINVAL for an invalid number).
        if unsafe { libc::sigaddset(&mut set, s) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: `set` is initialised; the old mask is not asked for (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: -1 asks for a new descriptor; `set` is initialised and only
    // read during the call.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal from a descriptor made by [`signal_fd`]:
/// `Ok(None)` when none is pending. No allocation.
pub fn read_signal(fd: &OwnedFd) -> io::Result<Option<libc::c_int>> {
    // SAFETY: signalfd_siginfo is plain data; all-zero bytes are valid.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let want = std::mem::size_of::<libc::signalfd_siginfo>();
    loop {
        // SAFETY: `info` is a live, writable signalfd_siginfo of `want`
        // bytes; read(2) writes at most that many and keeps no reference.
        let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::from_mut(&mut info).cast(), want) };
        match usize::try_from(n) {
            Ok(n) if n == want => {
                return Ok(Some(libc::c_int::try_from(info.ssi_signo).unwrap_or(0)));
            }
            Ok(_) => return Ok(None),
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return Ok(None),
                    _ => return Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_read_from_the_descriptor() {
        // SIGUSR2 only: blocking it in this test thread harms no other test.
        let fd = signal_fd(&[libc::SIGUSR2]).unwrap();
        assert_eq!(read_signal(&fd).unwrap(), None);
        // SAFETY: pthread_kill to this thread has no memory preconditions;
        // SIGUSR2 is blocked in this thread, so it stays pending for the
        // signalfd.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
        assert_eq!(rc, 0);
        assert_eq!(read_signal(&fd).unwrap(), Some(libc::SIGUSR2));
        assert_eq!(read_signal(&fd).unwrap(), None);
    }
}
