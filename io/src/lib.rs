//! The I/O layer: the mio event loop, socket and disk drivers, and the fixed
//! I/O thread rings that feed the sans-IO state machines in `csnap-fsm`.
//!
//! Empty until the server issue (#3).
