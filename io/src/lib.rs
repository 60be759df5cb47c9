//! The I/O layer: the mio event loop, socket and disk drivers, the store
//! worker thread, and the fixed rings between threads that feed the sans-IO
//! state machines in `csnap-fsm`.

pub mod ring;
pub mod store_worker;
pub mod sync;
