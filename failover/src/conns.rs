//! The connection table of the agent and the controller processes: the
//! one every process loop shares, in `csnap_io::conns`.

pub use csnap_io::conns::{Sessions, LISTENER_BASE};

use csnap_io::net::MioListener;
use mio::Registry;

/// The shared table, as the agent and the controller use it.
pub type ConnTable = csnap_io::conns::ConnTable;

/// A table over `listeners` (1 to `CONTROLLER_LISTENERS_MAX`) and `n`
/// connections.
pub fn table(
    listeners: Vec<MioListener>,
    n: usize,
    registry: &Registry,
) -> std::io::Result<ConnTable> {
    ConnTable::new(
        listeners,
        n,
        registry,
        1..=csnap_pools::CONTROLLER_LISTENERS_MAX,
    )
}
