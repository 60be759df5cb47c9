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

/// How a process confines itself once its pools exist: the one sequence,
/// in `csnap_sys::confine` (the server uses its steps one by one).
pub use csnap_sys::confine::Confinement;

/// Exit status of an agent or controller whose loop failed after init
/// (`csnap`'s EXIT_FAILED).
pub const LOOP_FAILED_EXIT: u8 = 1;
