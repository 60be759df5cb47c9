//! Sans-IO state machines of csnap: the server's connection sessions and
//! read-lock table, the client, the agent, and the NBD session.
//!
//! Events go in through `handle_*`, actions come out through `poll_*`, and time
//! is passed in. Nothing here owns a socket, a clock or a disk.
//!
//! Empty until the server issue (#3) lands its FSMs; the store they drive is
//! `csnap-store`.

#![forbid(unsafe_code)]

pub mod client;
pub mod locks;
pub mod server;
pub mod store_ops;
