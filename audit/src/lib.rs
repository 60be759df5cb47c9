//! The audited syscall whitelist per phase and the tooling that checks the
//! shipped binary against it. Empty until the confinement issue (#4).

#![forbid(unsafe_code)]
