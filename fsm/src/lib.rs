//! Sans-IO state machines of csnap: the server's connection sessions and
//! read-lock table, the client, the agent, and the NBD session.
//!
//! Events go in through `handle_*`, actions come out through `poll_*`, and time
//! is passed in. Nothing here owns a socket, a clock or a disk.
//!
//! - [`server`]: the server's sessions, request routing and replies;
//!   [`locks`]: its read-lock table; [`store_ops`]: what it asks the store.
//! - [`client`]: a volume client's or control tool's session with the
//!   server (handshake, requests, reconnects, lock upload).
//! - [`volume`]: a caching volume's data path (the NBD export's engine).
//! - [`nbd`]: one NBD connection (fixed-newstyle handshake, request
//!   validation) for the NBD export of csnap volumes.
//! - [`agent`]: one node's agent (server addresses, its standby, starts).
//! - [`cluster`]: the `local` membership and resource-manager backend (the
//!   controller the agents talk to).
//! - [`metrics`]: the metrics endpoint's HTTP request, response and
//!   Prometheus text in a fixed buffer.
//! - [`start_line`]: the standby's `start ...` line (no agent).
//! - [`conns`]: the connection table (slots, output and close queues) the
//!   agent and the controller share; [`fixed`], [`outbuf`]: fixed queues
//!   and output buffers.

#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod cluster;
pub mod conns;
pub mod disk_sched;
pub mod fixed;
pub mod locks;
pub mod metrics;
pub mod nbd;
pub mod nbd_cmds;
pub mod nbd_conn;
pub mod outbuf;
pub mod server;
pub mod start_line;
pub mod store_ops;
pub mod volume;

// The wire's snapshot limit is the store's (proto does not depend on pools;
// fsm depends on both).
const _: () = assert!(csnap_proto::SNAP_LIST_PAGE_MAX == csnap_pools::SNAPSHOT_LIST_PAGE_ROWS);
