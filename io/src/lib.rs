//! The I/O layer: the mio event loop, socket and disk drivers, the store
//! worker thread, and the fixed rings between threads that feed the sans-IO
//! state machines in `csnap-fsm`.

#![forbid(unsafe_code)]

pub mod client;
pub mod conns;
pub mod metrics;
pub mod nbd;
mod nbd_disk;
pub mod net;
pub mod ring;
pub mod server;
pub mod store_worker;
pub mod sync;
