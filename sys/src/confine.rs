//! The confinement sequence every sealed process runs once its pools
//! exist (the agent, the controller, the NBD server as a whole; the server
//! step by step, because its two threads install different filters): lock
//! memory, prefault the stack, ask to be an I/O flusher out of the OOM
//! killer's reach, seal the heap, install the syscall filter. One copy, so
//! the order and the warnings cannot drift apart.

/// Exit status of a process whose syscall filter could not be installed
/// (`csnap`'s usage error, as the start-up errors before it).
pub const CONFINE_FAILED_EXIT: u8 = 2;

/// How a process confines itself once its pools exist.
#[derive(Debug, Default)]
pub struct Confinement {
    /// Lock memory (`mlockall`); a failure is a start-up error.
    pub mlock: bool,
    /// Seal the heap in this mode (`None`: not sealed).
    pub seal: Option<crate::alloc::Mode>,
    /// The syscall whitelist to install (`None`: no filter).
    pub filter: Option<crate::seccomp::Filter>,
}

impl Confinement {
    /// Locks memory, prefaults the stack, asks to be an I/O flusher out of
    /// the OOM killer's reach, seals the heap and installs the filter, in
    /// that order. `who` prefixes the notes it prints. A memory step that
    /// fails is an error; a filter that cannot be installed, after the seal,
    /// stops the process heap-free ([`crate::fail_stop`], exit
    /// [`CONFINE_FAILED_EXIT`]).
    pub fn enter(&self, who: &str) -> Result<(), String> {
        confine_memory(who, self.mlock)?;
        seal_heap(who, self.seal);
        if let Some(f) = &self.filter {
            if let Err(e) = f.install() {
                crate::fail_stop(
                    who,
                    "cannot install the seccomp filter",
                    &e,
                    CONFINE_FAILED_EXIT,
                );
            }
        } else {
            eprintln!(
                "{who}: WARNING: the syscall whitelist is not enforced. Development use only."
            );
        }
        Ok(())
    }
}

/// The memory steps: `mlockall` (unless `mlock` is false: a loud warning),
/// the stack budget touched, `PR_SET_IO_FLUSHER` and `oom_score_adj -1000`
/// (notes when refused).
pub fn confine_memory(who: &str, mlock: bool) -> Result<(), String> {
    if mlock {
        crate::mem::lock_all().map_err(|e| {
            format!(
                "cannot lock memory (mlockall): {e}; run as root or with CAP_IPC_LOCK, or pass --no-mlock for development"
            )
        })?;
    } else {
        eprintln!("{who}: WARNING: memory is not locked (--no-mlock): page faults (and memory inversion under pressure) are possible. Development use only.");
    }
    crate::mem::prefault_stack(csnap_pools::THREAD_STACK_BUDGET_BYTES);
    if let Err(e) = crate::mem::set_io_flusher() {
        eprintln!("{who}: note: PR_SET_IO_FLUSHER not set ({e})");
    }
    if let Err(e) = crate::mem::set_oom_score_adj(-1000) {
        eprintln!("{who}: note: oom_score_adj not set ({e})");
    }
    Ok(())
}

/// Seals the heap in `mode` (`None`: left open), and says so.
pub fn seal_heap(who: &str, mode: Option<crate::alloc::Mode>) {
    if let Some(mode) = mode {
        crate::alloc::seal(mode);
        eprintln!("{who}: heap sealed ({mode:?} on allocation)");
    }
}
