//! The connection table of the agent and the controller processes: the
//! one every process loop shares, in `csnap_io::conns`.

pub use csnap_io::conns::{ConnTable, Sessions, LISTENER_BASE};
