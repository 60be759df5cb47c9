//! The one place the I/O layer takes its synchronisation primitives from:
//! std normally, loom under `--cfg loom`, so the hand-offs built on them are
//! model-checked as written (see `loom-tests/`).

#[cfg(csnap_loom)]
pub use loom::sync::{Arc, Condvar, Mutex};
#[cfg(not(csnap_loom))]
pub use std::sync::{Arc, Condvar, Mutex};
