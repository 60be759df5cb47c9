//! A panic hook that reports and exits with only the syscalls every confined
//! phase allows (`write` and `exit_group`).
//!
//! The default panic path of a `panic = "abort"` build calls `abort`, whose
//! `rt_sigprocmask` and `tgkill` are outside the serving whitelists: the
//! message was lost and the process died as "forbidden syscall 14". This
//! hook formats the message and location into a fixed stack buffer
//! (truncating, never allocating), writes it to stderr with `write(2)`, and
//! ends the process with `_exit(PANIC_EXIT_STATUS)`. The allocations std
//! itself makes for a formatted panic message are served by the sealed
//! allocator's panic arena (`alloc`), so a sealed process reaches the hook.

use core::fmt::Write as _;

/// Exit status of a process that panicked (as Rust's own test harness uses).
pub const PANIC_EXIT_STATUS: u8 = 101;

/// Bytes of one panic report; a longer message is truncated.
const REPORT_BYTES: usize = csnap_pools::PANIC_REPORT_BYTES;

struct Fixed {
    buf: [u8; REPORT_BYTES],
    len: usize,
}

impl core::fmt::Write for Fixed {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = REPORT_BYTES - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Installs the hook for the whole process, naming it `who` in the report.
/// Init only (it allocates the hook's box once).
pub fn install_hook(who: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let mut w = Fixed {
            buf: [0; REPORT_BYTES],
            len: 0,
        };
        let _ = write!(w, "csnap: {who}: panic: ");
        match info.location() {
            Some(l) => {
                let _ = write!(w, "at {}:{}:{}: ", l.file(), l.line(), l.column());
            }
            None => {
                let _ = write!(w, "at an unknown location: ");
            }
        }
        let p = info.payload();
        let message = p
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| p.downcast_ref::<String>().map(String::as_str));
        match message {
            Some(m) => {
                let _ = write!(w, "{m}");
            }
            None => {
                let _ = write!(w, "(a panic without a message)");
            }
        }
        w.buf[w.len] = b'\n';
        w.len += 1;
        let mut done = 0;
        while done < w.len {
            // SAFETY: the pointer and length describe the initialised part
            // of `w.buf`, a live stack array; write(2) only reads it.
            let n = unsafe { libc::write(2, w.buf[done..].as_ptr().cast(), w.len - done) };
            match usize::try_from(n) {
                Ok(n) if n > 0 => done += n,
                _ => break,
            }
        }
        crate::exit_now(PANIC_EXIT_STATUS);
    }));
}
