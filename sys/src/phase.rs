//! The heap phase switch, separated from the allocator so that loom can
//! model it (`loom-tests/`): one atomic, switched Init → Sealed → Teardown.
//! The sealed allocator is built on it; under `--cfg csnap_loom` the atomic is
//! loom's.

#[cfg(csnap_loom)]
use loom::sync::atomic::{AtomicU8, Ordering};
#[cfg(not(csnap_loom))]
use std::sync::atomic::{AtomicU8, Ordering};

/// Phase values.
pub const INIT: u8 = 0;
/// Serving: allocation is a violation.
pub const SEALED: u8 = 1;
/// Shutting down: allocation allowed again.
pub const TEARDOWN: u8 = 2;

/// The phase switch.
#[derive(Debug)]
pub struct PhaseCell {
    phase: AtomicU8,
}

impl PhaseCell {
    /// In phase Init.
    #[cfg(not(csnap_loom))]
    pub const fn new() -> Self {
        PhaseCell {
            phase: AtomicU8::new(INIT),
        }
    }

    /// In phase Init.
    #[cfg(csnap_loom)]
    pub fn new() -> Self {
        PhaseCell {
            phase: AtomicU8::new(INIT),
        }
    }

    /// Seals; returns the phase it left (must be Init).
    pub fn seal(&self) -> u8 {
        self.phase.swap(SEALED, Ordering::SeqCst)
    }

    /// Enters teardown.
    pub fn teardown(&self) {
        self.phase.store(TEARDOWN, Ordering::SeqCst);
    }

    /// The phase now.
    pub fn get(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    /// Whether an allocation now is a violation.
    pub fn is_sealed(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == SEALED
    }
}

#[cfg(not(csnap_loom))]
impl Default for PhaseCell {
    fn default() -> Self {
        Self::new()
    }
}
