//! Body layouts shared by encode and decode: the body sizes of the
//! fixed-size kinds and the fixed parts of the others, and the wire values
//! of fields both sides spell.

use crate::IDENTIFY_CACHING;

// Body sizes of the fixed-size kinds, and of the fixed parts of the others.
pub(super) const HELLO_BYTES: usize = 8;
pub(super) const HELLO_OK_BYTES: usize = 16;
pub(super) const IDENTIFY_BYTES: usize = 48;
pub(super) const IDENTIFY_OK_BYTES: usize = 24;
pub(super) const TAG_BYTES: usize = 4;
pub(super) const SET_PRIORITY_BYTES: usize = 8;
pub(super) const STATUS_REPLY_BYTES: usize = 96;
pub(super) const QUERY_DELTA_BYTES: usize = 24;
pub(super) const DELTA_MAP_FIXED_BYTES: usize = 16;
pub(super) const ERROR_FIXED_BYTES: usize = 8;
pub(super) const REVOKE_FIXED_BYTES: usize = 4;
pub(super) const NEED_SERVER_BYTES: usize = 32;
pub(super) const SERVER_ADDRESS_FIXED_BYTES: usize = 16;
pub(super) const SERVER_READY_FIXED_BYTES: usize = 12;
pub(super) const SERVING_BYTES: usize = 24;
pub(super) const NODE_BYTES: usize = 4;
pub(super) const CLIENT_GONE_BYTES: usize = 16;
/// `ClientsOf` before its list: the node and 4 reserved bytes.
pub(super) const CLIENTS_OF_FIXED_BYTES: usize = 8;
pub(super) const JOIN_FIXED_BYTES: usize = 8;
pub(super) const MEMBERS_FIXED_BYTES: usize = 8;
pub(super) const AGENT_STATE_BYTES: usize = 24;
pub(super) const WANT_SERVER_BYTES: usize = 8;
pub(super) const START_HERE_BYTES: usize = 24;
/// The fixed part of `StartServer` before its lists: the flags byte and 7
/// reserved bytes.
pub(crate) const START_SERVER_FIXED_BYTES: usize = 8;
/// `StartServer` / `StartHere` flag: the former server may still be running
/// (its death was not seen by its own agent): claim the store and wait out
/// its lease before reading (`Standby::claim`).
pub(super) const START_FLAG_CLAIM: u8 = 1;
pub(super) const NEED_CLIENTS_BYTES: usize = 16;
pub(super) const CLIENTS_FIXED_BYTES: usize = 16;
pub(super) const SERVER_UP_FIXED_BYTES: usize = 16;
pub(super) const SERVER_DOWN_BYTES: usize = 16;
pub(super) const FENCE_BYTES: usize = 8;
pub(super) const CLUSTER_COMMAND_BYTES: usize = 8;
pub(super) const CLUSTER_STATUS_REPLY_FIXED_BYTES: usize = 16;

pub(super) const VOLUME_NONE: u16 = 0;
pub(super) const VOLUME_ORIGIN: u16 = 1;
pub(super) const VOLUME_SNAPSHOT: u16 = 2;

/// Every defined `Identify` flag bit.
pub(super) const IDENTIFY_FLAGS_ALL: u16 = IDENTIFY_CACHING;
