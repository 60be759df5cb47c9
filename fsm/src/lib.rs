//! Sans-IO state machines of csnap: the server's connection sessions and
//! read-lock table, the client, the agent, and the NBD session.
//!
//! Events go in through `handle_*`, actions come out through `poll_*`, and time
//! is passed in. Nothing here owns a socket, a clock or a disk.
//!
//! - [`server`]: the server's sessions, request routing and replies;
//!   [`locks`]: its read-lock table; [`store_ops`]: what it asks the store.
//! - [`client`]: the client's handshake, requests and reconnects.
//! - [`nbd`]: one NBD connection (fixed-newstyle handshake, request
//!   validation) for the NBD export of csnap volumes.

#![forbid(unsafe_code)]

pub mod client;
pub mod locks;
pub mod nbd;
pub mod server;
pub mod store_ops;
