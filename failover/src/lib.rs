//! The agent process and the `local` membership and resource-manager
//! backend.
//!
//! - `agent`: one per node. Answers its node's volume clients and control
//!   tools with the serving server's address, keeps a standby server ready,
//!   starts it when the resource manager says so (gathering the recovery
//!   barrier's expected clients first), relays membership to it. Drives
//!   `csnap_fsm::agent::AgentFsm`.
//! - `controller`: the `local` backend, one per cluster on one machine:
//!   membership (who is in), messaging between the agents, and placement
//!   (where the one server runs). Drives `csnap_fsm::cluster::Controller`.
//!   A corosync/pacemaker backend would replace this process and carry the
//!   same bus messages (see `csnap_fsm::agent`).
//! - `spawner`: the agent's helper that forks and execs new standby
//!   servers, so the confined agent never does.
//! - `conns`: the connection table both processes use.

#![forbid(unsafe_code)]

pub mod agent;
pub mod conns;
pub mod controller;
pub mod spawner;

/// How a process confines itself once its pools exist.
#[derive(Debug, Default)]
pub struct Confinement {
    /// Lock memory (`mlockall`); a failure is a start-up error.
    pub mlock: bool,
    /// Seal the heap in this mode (`None`: not sealed).
    pub seal: Option<csnap_sys::alloc::Mode>,
    /// The syscall whitelist to install (`None`: no filter).
    pub filter: Option<csnap_sys::seccomp::Filter>,
}

impl Confinement {
    /// Locks memory, prefaults the stack, asks to be an I/O flusher out of
    /// the OOM killer's reach, seals the heap and installs the filter, in
    /// that order. `who` prefixes the notes it prints.
    pub fn enter(&self, who: &str) -> Result<(), String> {
        if self.mlock {
            csnap_sys::mem::lock_all().map_err(|e| {
                format!(
                    "cannot lock memory (mlockall): {e}; run as root or with CAP_IPC_LOCK, or pass --no-mlock for development"
                )
            })?;
        } else {
            eprintln!("{who}: WARNING: memory is not locked (--no-mlock). Development use only.");
        }
        csnap_sys::mem::prefault_stack(csnap_pools::THREAD_STACK_BUDGET_BYTES);
        if let Err(e) = csnap_sys::mem::set_io_flusher() {
            eprintln!("{who}: note: PR_SET_IO_FLUSHER not set ({e})");
        }
        if let Err(e) = csnap_sys::mem::set_oom_score_adj(-1000) {
            eprintln!("{who}: note: oom_score_adj not set ({e})");
        }
        if let Some(mode) = self.seal {
            csnap_sys::alloc::seal(mode);
            eprintln!("{who}: heap sealed ({mode:?} on allocation)");
        }
        if let Some(f) = &self.filter {
            f.install()
                .map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
        } else {
            eprintln!(
                "{who}: WARNING: the syscall whitelist is not enforced. Development use only."
            );
        }
        Ok(())
    }
}
