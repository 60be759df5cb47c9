//! The agent: standby servers, instance requests, membership and the recovery
//! barrier. Empty until the failover issue (#5).

#![forbid(unsafe_code)]
