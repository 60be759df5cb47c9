//! The NBD server session: a sans-IO state machine for one NBD connection.
//!
//! It speaks the server side of the NBD protocol's fixed-newstyle handshake
//! and parses and validates transmission-phase requests, so that every I/O
//! driver answers clients the same way. It owns no socket, clock or disk and
//! knows nothing of csnap: which exports exist is the driver's answer to an
//! [`NbdEvent::ExportQuery`] or [`NbdEvent::ListQuery`], and which
//! snapshots an export offers metadata contexts for is its answer to an
//! [`NbdEvent::MetaQuery`]. Structured replies and metadata contexts
//! (`base:allocation`, `x-csnap:changed-since:TAG`,
//! `qemu:dirty-bitmap:since-TAG`) are negotiated; extended headers and TLS
//! are refused with `NBD_REP_ERR_UNSUP`.
//!
//! # What the driver does
//!
//! 1. [`NbdSession::new`] once per connection slot (its only allocation:
//!    the receive scratch, the transmit buffer and the name copy), and
//!    [`NbdSession::reset`] to reuse it for the next connection. The server
//!    greeting is queued at once.
//! 2. Whenever [`transmit`](NbdSession::transmit) is not empty, write it and
//!    call [`consume_transmit`](NbdSession::consume_transmit). The session
//!    queues handshake replies only; in the transmission phase the driver
//!    owns the reply stream (replies may go out of order) and encodes reply
//!    headers with [`simple_reply`].
//! 3. [`poll_event`](NbdSession::poll_event) until `None`, acting on each
//!    event in order (see [`NbdEvent`]).
//! 4. In [`NbdState::AwaitExport`], call
//!    [`answer_export`](NbdSession::answer_export); in
//!    [`NbdState::AwaitList`], [`list_entry`](NbdSession::list_entry) per
//!    export, then [`list_done`](NbdSession::list_done); in
//!    [`NbdState::AwaitMeta`], [`answer_meta`](NbdSession::answer_meta)
//!    with the export's snapshot tags (the session then queues the matching
//!    contexts as the transmit buffer allows, going on in
//!    `consume_transmit`). The session reads no input until answered.
//! 5. When [`payload_remaining`](NbdSession::payload_remaining) is not zero,
//!    that many bytes of `NBD_CMD_WRITE` payload follow: move them into the
//!    driver's own buffer (first what is already received, then straight from
//!    the socket) and report each piece with
//!    [`handle_payload`](NbdSession::handle_payload). Payload bytes never
//!    pass through the session.
//! 6. Otherwise feed received bytes to
//!    [`handle_input`](NbdSession::handle_input) and drop the prefix it
//!    consumed. It stops at each event, so nothing is consumed past a request
//!    the driver has not seen. [`wants_input`](NbdSession::wants_input) says
//!    whether it would consume anything now.
//! 7. [`handle_eof`](NbdSession::handle_eof) when the peer closes or the
//!    socket fails.
//!
//! # States
//!
//! One enum, [`NbdState`], whose doc comment holds the state table.
//!
//! # Choices where the protocol leaves freedom
//!
//! - A client that did not set `NBD_FLAG_C_FIXED_NEWSTYLE` (plain newstyle)
//!   may send only `NBD_OPT_EXPORT_NAME`; any other option closes, as a
//!   plain-newstyle server would.
//! - No TLS (the protocol's NOTLS mode): `NBD_OPT_STARTTLS` gets
//!   `NBD_REP_ERR_UNSUP`.
//! - Option data: `INFO`/`GO` over [`NBD_OPTION_DATA_MAX_BYTES`] is skipped and
//!   answered `NBD_REP_ERR_TOO_BIG`; any option over
//!   [`NBD_OPTION_SKIP_MAX_BYTES`] closes; an `EXPORT_NAME` longer than
//!   [`NBD_EXPORT_NAME_MAX_BYTES`] closes (no such export can exist), an
//!   `INFO`/`GO` name that long gets `NBD_REP_ERR_UNKNOWN`.
//! - `ABORT` data is ignored (as the protocol asks); `LIST` with data gets
//!   `NBD_REP_ERR_INVALID`.
//! - `INFO`/`GO` always answer `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`
//!   (minimum 1, so no client ever needs `NBD_REP_ERR_BLOCK_SIZE_REQD`);
//!   `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` requests are ignored, which
//!   the protocol allows.
//! - Error replies carry a short English message.
//! - Transmission flags: see [`transmission_flags`]. A read-only export
//!   advertises no write features (no FUA, trim, write zeroes), as nbdkit
//!   does. `NBD_FLAG_SEND_FAST_ZERO` is advertised with write zeroes: the
//!   driver answers a `FAST_ZERO` write-zeroes `ENOTSUP` unless it can zero
//!   faster than it writes (always answering `ENOTSUP` is allowed).
//! - `NBD_CMD_FLAG_FUA` is accepted on every command (the protocol says
//!   clients set it on reads too); `NO_HOLE` and `FAST_ZERO` only on
//!   `WRITE_ZEROES`; `REQ_ONE` only on `BLOCK_STATUS`; `DF` never (not
//!   advertised: a read is always one chunk).
//! - Structured replies: `NBD_OPT_STRUCTURED_REPLY` without data is
//!   acknowledged (again if repeated); with data it is `ERR_INVALID`. The
//!   driver answers `READ` with [`offset_data_header`] and its data, a
//!   failed `READ` or `BLOCK_STATUS` with [`error_chunk`], a zero-length
//!   `READ` with [`none_chunk`]; other commands keep simple replies.
//! - Metadata contexts: `LIST_META_CONTEXT` and `SET_META_CONTEXT` data of
//!   up to `NBD_OPTION_DATA_MAX_BYTES` is read whole (longer:
//!   `ERR_TOO_BIG`) and parsed (malformed: `ERR_INVALID`). An empty `LIST`
//!   lists every context; a `LIST` query ending in `:` matches every context
//!   it begins (`base:`, `x-csnap:`, `qemu:`, `qemu:dirty-bitmap:`); other
//!   queries match a context's exact name; queries of other namespaces
//!   match nothing (ignored). `LIST` replies carry id 0. `SET` needs
//!   structured replies (`ERR_INVALID`), takes exact names only (no query
//!   selects nothing), selects each context once in context order with ids
//!   from 1, and replaces the former selection even when it fails. A `GO`
//!   or `EXPORT_NAME` of another export name drops the selection.
//! - `BLOCK_STATUS` is valid only with a selection (`EINVAL` otherwise),
//!   a non-zero length within the export.
//! - Only `READ` and `WRITE` are bounded by the payload limit (they carry a
//!   payload); `TRIM`, `WRITE_ZEROES` and `CACHE` may name any length within
//!   the export. Zero-length requests are valid commands (a zero-length
//!   `READ` succeeds with no data).
//! - `FLUSH` ignores its reserved offset and length; `DISC` is honoured
//!   whatever its fields.
//! - A rejected `WRITE` of up to [`NBD_WRITE_SKIP_MAX_BYTES`] is answered and
//!   its payload skipped; a longer one closes the connection.
//! - Errors, checked in this order: an unknown (or unadvertised) command, a
//!   flag not valid for the command, a `READ`/`WRITE` over the payload
//!   limit: `EINVAL`; a write, trim or write-zeroes on a read-only export:
//!   `EPERM`; a range past the end of the export (or whose end overflows):
//!   `ENOSPC` for `WRITE` and `WRITE_ZEROES`, `EINVAL` for the others.

use core::fmt;

use csnap_pools::{
    NBD_EXPORT_NAME_MAX_BYTES, NBD_META_CONTEXTS_MAX, NBD_OPTION_DATA_MAX_BYTES,
    NBD_OPTION_REPLY_MAX_BYTES, NBD_OPTION_SKIP_MAX_BYTES, NBD_PAYLOAD_MAX_BYTES,
    NBD_TRANSMIT_BUFFER_BYTES, NBD_WRITE_SKIP_MAX_BYTES, SNAPSHOTS_MAX,
};

// ---------------------------------------------------------------------------
// Wire values (the NBD protocol document, `doc/proto.md`). Big-endian.
// ---------------------------------------------------------------------------

/// `NBDMAGIC`, first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the greeting and first of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9; // 0x3e889045565a9
/// Magic of every transmission-phase request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk: nothing (only with `DONE`).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply chunk: a hole (zeroes) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply chunk: the extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply chunk: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Structured reply chunk: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` flag: a hole (reads as zeroes unless `STATE_ZERO` is
/// clear and the server says nothing more).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `x-csnap:changed-since:*` and `qemu:dirty-bitmap:*` flag: changed.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Handshake flags this server sends.
pub const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after the `NBD_OPT_EXPORT_NAME` reply.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: choose an export and enter transmission (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option (withdrawn): peek export.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success, or the end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of export information.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context (id, name).
pub const REP_META_CONTEXT: u32 = 4;
/// Option reply error: unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option reply error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option reply error: malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option reply error: unsupported on this platform.
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
/// Option reply error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option reply error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option reply error: block sizes must be requested.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// Option reply error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may share the export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_RESIZE`.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `NBD_CMD_CACHE` is understood.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (structured replies and a selected context only).
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: resize (not advertised; refused).
pub const CMD_RESIZE: u16 = 8;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not punch a hole (`WRITE_ZEROES`).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment (structured `READ` replies).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent only (`BLOCK_STATUS`).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail fast unless zeroing is fast (`WRITE_ZEROES`).
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Bytes of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_BYTES: usize = 8 + 8 + 2;
/// Bytes of the client flags.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Bytes of an option header: `IHAVEOPT`, option, data length.
pub const OPTION_HEADER_BYTES: usize = 8 + 4 + 4;
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 8 + 4 + 4 + 4;
/// Zero bytes after the `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// Bytes of the `NBD_OPT_EXPORT_NAME` reply without its zero bytes: export
/// size and transmission flags.
pub const EXPORT_NAME_REPLY_BYTES: usize = 8 + 2;
/// Bytes of a request header: magic, flags, type, handle, offset, length.
pub const REQUEST_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4;
/// Bytes of a simple reply header: magic, error, handle.
pub const SIMPLE_REPLY_BYTES: usize = 4 + 4 + 8;
/// Bytes of a structured reply chunk header: magic, flags, type, handle,
/// payload length.
pub const STRUCTURED_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 4;
/// Bytes of an `OFFSET_DATA` chunk before its data: header and offset.
pub const OFFSET_DATA_HEADER_BYTES: usize = STRUCTURED_HEADER_BYTES + 8;
/// Bytes of an `ERROR` chunk without a message: header, error, length 0.
pub const ERROR_CHUNK_BYTES: usize = STRUCTURED_HEADER_BYTES + 4 + 2;
/// Bytes of one block-status extent: length, flags.
pub const EXTENT_BYTES: usize = 4 + 4;
/// Bytes of a block-status chunk before its extents: header, context id.
pub const BLOCK_STATUS_HEADER_BYTES: usize = STRUCTURED_HEADER_BYTES + 4;
/// Longest header of any reply the driver queues (a simple reply, a
/// `NONE` or `ERROR` chunk, an `OFFSET_DATA` header).
pub const REPLY_HEADER_MAX_BYTES: usize = 32;
const _: () = assert!(
    SIMPLE_REPLY_BYTES <= REPLY_HEADER_MAX_BYTES
        && ERROR_CHUNK_BYTES <= REPLY_HEADER_MAX_BYTES
        && OFFSET_DATA_HEADER_BYTES <= REPLY_HEADER_MAX_BYTES
);

/// The name of `base:allocation`.
pub const CONTEXT_BASE_ALLOCATION: &[u8] = b"base:allocation";
/// The prefix of `x-csnap:changed-since:<tag>`.
pub const CONTEXT_CHANGED_SINCE: &[u8] = b"x-csnap:changed-since:";
/// The prefix of `qemu:dirty-bitmap:since-<tag>`.
pub const CONTEXT_DIRTY_BITMAP: &[u8] = b"qemu:dirty-bitmap:since-";
/// Bytes of the longest context name (the qemu prefix and a 10-digit tag).
pub const CONTEXT_NAME_MAX_BYTES: usize = CONTEXT_DIRTY_BITMAP.len() + 10;
/// Bytes of one `NBD_REP_META_CONTEXT` reply at most.
const META_REPLY_MAX_BYTES: usize = OPTION_REPLY_HEADER_BYTES + 4 + CONTEXT_NAME_MAX_BYTES;
/// Minimum block size advertised: any byte offset and length is served.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 1;

/// Bytes of the longest error message an option error reply carries.
const ERROR_MESSAGE_MAX_BYTES: usize = 64;
/// Bytes of a successful `INFO`/`GO` answer: `NBD_INFO_EXPORT` (type, size,
/// flags), `NBD_INFO_BLOCK_SIZE` (type, three sizes), then the ACK.
const INFO_ANSWER_BYTES: usize = (OPTION_REPLY_HEADER_BYTES + 2 + 8 + 2)
    + (OPTION_REPLY_HEADER_BYTES + 2 + 12)
    + OPTION_REPLY_HEADER_BYTES;

// Every reply to one option fits the room checked before its header is read.
const _: () =
    assert!(EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES <= NBD_OPTION_REPLY_MAX_BYTES);
const _: () = assert!(INFO_ANSWER_BYTES <= NBD_OPTION_REPLY_MAX_BYTES);
const _: () =
    assert!(OPTION_REPLY_HEADER_BYTES + ERROR_MESSAGE_MAX_BYTES <= NBD_OPTION_REPLY_MAX_BYTES);
// The greeting and the room for one reply fit an empty transmit buffer, and
// so does one list entry of the longest name plus the ACK that ends the list.
const _: () = assert!(GREETING_BYTES + NBD_OPTION_REPLY_MAX_BYTES <= NBD_TRANSMIT_BUFFER_BYTES);
const _: () = assert!(
    OPTION_REPLY_HEADER_BYTES + 4 + NBD_EXPORT_NAME_MAX_BYTES + OPTION_REPLY_HEADER_BYTES
        <= NBD_TRANSMIT_BUFFER_BYTES
);
// One context reply and the ACK that ends the answer fit an empty transmit
// buffer; every context fits the selection table.
const _: () =
    assert!(META_REPLY_MAX_BYTES + OPTION_REPLY_HEADER_BYTES <= NBD_TRANSMIT_BUFFER_BYTES);
const _: () = assert!(META_REPLY_MAX_BYTES <= NBD_OPTION_REPLY_MAX_BYTES);
const _: () = assert!(NBD_META_CONTEXTS_MAX == 1 + 2 * SNAPSHOTS_MAX);
// Reply lengths are u32 on the wire.
const _: () = assert!(NBD_TRANSMIT_BUFFER_BYTES <= u32::MAX as usize);

// ---------------------------------------------------------------------------
// Public types.
// ---------------------------------------------------------------------------

/// Session settings, fixed at [`NbdSession::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdConfig {
    /// Largest `READ` or `WRITE` length accepted, advertised as the maximum
    /// block size. At most [`NBD_PAYLOAD_MAX_BYTES`]; the driver sizes its
    /// payload buffers by it.
    pub payload_limit_bytes: u32,
    /// Preferred block size advertised (a power of two, at least 512, at
    /// most the payload limit), e.g. the store's chunk size.
    pub preferred_block_size_bytes: u32,
}

impl Default for NbdConfig {
    /// The largest payload limit and a 4 KiB preferred block size.
    fn default() -> Self {
        NbdConfig {
            payload_limit_bytes: NBD_PAYLOAD_MAX_BYTES,
            preferred_block_size_bytes: 4096,
        }
    }
}

impl NbdConfig {
    /// Whether the settings satisfy the bounds and the protocol's block size
    /// rules.
    #[must_use]
    pub fn is_valid(&self) -> bool {
        self.payload_limit_bytes >= 1
            && self.payload_limit_bytes <= NBD_PAYLOAD_MAX_BYTES
            && self.preferred_block_size_bytes.is_power_of_two()
            && self.preferred_block_size_bytes >= 512
            && self.preferred_block_size_bytes <= self.payload_limit_bytes
    }
}

/// What the driver knows of an export it agrees to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Writes, trims and write-zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// Flushes are visible across every connection to the export
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    pub can_multi_conn: bool,
}

/// The transmission flags advertised for `info`: `HAS_FLAGS`, `SEND_FLUSH`,
/// `SEND_CACHE`, and either `READ_ONLY` or the write features (`SEND_FUA`,
/// `SEND_TRIM`, `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO`), plus
/// `CAN_MULTI_CONN` when the export allows it. Never `SEND_DF`, block status
/// or `SEND_RESIZE`.
#[must_use]
pub fn transmission_flags(info: &ExportInfo) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if info.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if info.can_multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// The option an export query answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportOption {
    /// `NBD_OPT_EXPORT_NAME`: found enters transmission, not found closes.
    ExportName,
    /// `NBD_OPT_INFO`: the answer is only described to the client.
    Info,
    /// `NBD_OPT_GO`: found enters transmission, not found is an error reply.
    Go,
}

/// An NBD error value, for the error field of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdError {
    /// `NBD_EPERM`: write to a read-only export.
    Perm,
    /// `NBD_EIO`: I/O error.
    Io,
    /// `NBD_ENOMEM`: out of memory (the protocol asks servers to avoid it).
    NoMem,
    /// `NBD_EINVAL`: invalid request.
    Inval,
    /// `NBD_ENOSPC`: no space, or a write past the end of the export.
    NoSpc,
    /// `NBD_EOVERFLOW`: value too large.
    Overflow,
    /// `NBD_ENOTSUP`: a `FAST_ZERO` write-zeroes that would not be fast.
    NotSup,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown,
}

impl NbdError {
    /// Every error value.
    pub const ALL: [NbdError; 8] = [
        NbdError::Perm,
        NbdError::Io,
        NbdError::NoMem,
        NbdError::Inval,
        NbdError::NoSpc,
        NbdError::Overflow,
        NbdError::NotSup,
        NbdError::Shutdown,
    ];

    /// The value on the wire.
    #[must_use]
    pub const fn errno(self) -> u32 {
        match self {
            NbdError::Perm => 1,
            NbdError::Io => 5,
            NbdError::NoMem => 12,
            NbdError::Inval => 22,
            NbdError::NoSpc => 28,
            NbdError::Overflow => 75,
            NbdError::NotSup => 95,
            NbdError::Shutdown => 108,
        }
    }

    /// The error of a wire value, `None` for values the protocol does not
    /// define.
    #[must_use]
    pub fn from_errno(errno: u32) -> Option<NbdError> {
        NbdError::ALL.into_iter().find(|e| e.errno() == errno)
    }
}

/// Encodes a simple reply header: magic, error (0 for success), handle. A
/// successful `READ` reply is followed by exactly the requested bytes.
#[must_use]
pub fn simple_reply(handle: u64, error: Option<NbdError>) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_BYTES];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.map_or(0, NbdError::errno).to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Encodes a structured reply chunk header.
#[must_use]
pub fn structured_header(
    handle: u64,
    flags: u16,
    typ: u16,
    length: u32,
) -> [u8; STRUCTURED_HEADER_BYTES] {
    let mut b = [0u8; STRUCTURED_HEADER_BYTES];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// The one chunk of a successful structured `READ` reply before its
/// `length` data bytes: `OFFSET_DATA` with `DONE`, and the offset. A
/// zero-length read is answered with [`none_chunk`] instead (an
/// `OFFSET_DATA` chunk must carry data).
#[must_use]
pub fn offset_data_header(handle: u64, offset: u64, length: u32) -> [u8; OFFSET_DATA_HEADER_BYTES] {
    let mut b = [0u8; OFFSET_DATA_HEADER_BYTES];
    let h = structured_header(
        handle,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        length.saturating_add(8),
    );
    b[..STRUCTURED_HEADER_BYTES].copy_from_slice(&h);
    b[STRUCTURED_HEADER_BYTES..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A `NONE` chunk with `DONE`: success with nothing to say.
#[must_use]
pub fn none_chunk(handle: u64) -> [u8; STRUCTURED_HEADER_BYTES] {
    structured_header(handle, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
}

/// An `ERROR` chunk with `DONE` and no message: the whole structured reply
/// of a failed command.
#[must_use]
pub fn error_chunk(handle: u64, error: NbdError) -> [u8; ERROR_CHUNK_BYTES] {
    let mut b = [0u8; ERROR_CHUNK_BYTES];
    let h = structured_header(handle, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6);
    b[..STRUCTURED_HEADER_BYTES].copy_from_slice(&h);
    b[STRUCTURED_HEADER_BYTES..STRUCTURED_HEADER_BYTES + 4]
        .copy_from_slice(&error.errno().to_be_bytes());
    b
}

/// A metadata context an export offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`.
    Allocation,
    /// `x-csnap:changed-since:<tag>` (`qemu` false) or
    /// `qemu:dirty-bitmap:since-<tag>` (`qemu` true): the same map, bit 0
    /// set where the export differs from snapshot `tag`.
    ChangedSince {
        /// The snapshot compared with.
        tag: u32,
        /// Named in qemu's dirty-bitmap namespace.
        qemu: bool,
    },
}

impl MetaContext {
    /// The context of index `i` of an export offering `tags`: 0 is
    /// `base:allocation`, then two per tag.
    fn at(i: usize, tags: &[u32]) -> Option<MetaContext> {
        if i == 0 {
            return Some(MetaContext::Allocation);
        }
        let tag = *tags.get((i - 1) / 2)?;
        Some(MetaContext::ChangedSince {
            tag,
            qemu: (i - 1) % 2 == 1,
        })
    }

    /// Writes the context's name into `buf`; returns its length.
    pub fn name(self, buf: &mut [u8; CONTEXT_NAME_MAX_BYTES]) -> usize {
        let (prefix, tag) = match self {
            MetaContext::Allocation => (CONTEXT_BASE_ALLOCATION, None),
            MetaContext::ChangedSince { tag, qemu: false } => (CONTEXT_CHANGED_SINCE, Some(tag)),
            MetaContext::ChangedSince { tag, qemu: true } => (CONTEXT_DIRTY_BITMAP, Some(tag)),
        };
        buf[..prefix.len()].copy_from_slice(prefix);
        let mut n = prefix.len();
        if let Some(mut v) = tag {
            let mut digits = [0u8; 10];
            let mut d = digits.len();
            loop {
                d -= 1;
                digits[d] = b'0' + u8::try_from(v % 10).unwrap_or(0);
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            let k = digits.len() - d;
            buf[n..n + k].copy_from_slice(&digits[d..]);
            n += k;
        }
        n
    }
}

/// A valid command's kind (`NBD_CMD_DISC` is [`NbdEvent::Disconnect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdKind {
    /// `NBD_CMD_READ`: reply with the data.
    Read,
    /// `NBD_CMD_WRITE`: `length` payload bytes follow.
    Write,
    /// `NBD_CMD_FLUSH`: offset and length are reserved.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`: a hint; success without action is fine.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (structured replies and a selected context
    /// only): one `BLOCK_STATUS` chunk per
    /// [selected context](NbdSession::selected_contexts).
    BlockStatus,
}

impl CmdKind {
    fn from_wire(t: u16) -> Option<CmdKind> {
        match t {
            CMD_READ => Some(CmdKind::Read),
            CMD_WRITE => Some(CmdKind::Write),
            CMD_FLUSH => Some(CmdKind::Flush),
            CMD_TRIM => Some(CmdKind::Trim),
            CMD_CACHE => Some(CmdKind::Cache),
            CMD_WRITE_ZEROES => Some(CmdKind::WriteZeroes),
            CMD_BLOCK_STATUS => Some(CmdKind::BlockStatus),
            _ => None,
        }
    }

    /// The command type on the wire.
    #[must_use]
    pub const fn wire(self) -> u16 {
        match self {
            CmdKind::Read => CMD_READ,
            CmdKind::Write => CMD_WRITE,
            CmdKind::Flush => CMD_FLUSH,
            CmdKind::Trim => CMD_TRIM,
            CmdKind::Cache => CMD_CACHE,
            CmdKind::WriteZeroes => CMD_WRITE_ZEROES,
            CmdKind::BlockStatus => CMD_BLOCK_STATUS,
        }
    }

    /// Whether the command changes the export (refused on read-only ones).
    #[must_use]
    pub const fn writes(self) -> bool {
        matches!(self, CmdKind::Write | CmdKind::Trim | CmdKind::WriteZeroes)
    }

    /// Command flags valid for this kind.
    const fn allowed_flags(self) -> u16 {
        match self {
            CmdKind::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CmdKind::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => CMD_FLAG_FUA,
        }
    }
}

/// The command flags of a valid command (only those valid for its kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmdFlags(pub u16);

impl CmdFlags {
    /// `NBD_CMD_FLAG_FUA`: reply only once the written data is durable.
    #[must_use]
    pub const fn fua(self) -> bool {
        self.0 & CMD_FLAG_FUA != 0
    }
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes must allocate.
    #[must_use]
    pub const fn no_hole(self) -> bool {
        self.0 & CMD_FLAG_NO_HOLE != 0
    }
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `ENOTSUP` unless zeroing is
    /// faster than writing.
    #[must_use]
    pub const fn fast_zero(self) -> bool {
        self.0 & CMD_FLAG_FAST_ZERO != 0
    }
    /// `NBD_CMD_FLAG_REQ_ONE`: one extent per context, no longer than the
    /// request.
    #[must_use]
    pub const fn req_one(self) -> bool {
        self.0 & CMD_FLAG_REQ_ONE != 0
    }
}

/// A valid transmission-phase command: within the export, within the payload
/// limit, allowed on the export. Answer it with [`simple_reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmd {
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// What to do.
    pub kind: CmdKind,
    /// Its flags.
    pub flags: CmdFlags,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length (`offset + length` is within the export, except for
    /// `Flush` whose fields are reserved).
    pub length: u32,
}

/// Why a session must close at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalReason {
    /// The client set flags the server does not know.
    BadClientFlags,
    /// An option other than `NBD_OPT_EXPORT_NAME` from a client that did not
    /// set `NBD_FLAG_C_FIXED_NEWSTYLE`.
    NotFixedNewstyle,
    /// An option did not start with `IHAVEOPT`.
    BadOptionMagic,
    /// Option data over [`NBD_OPTION_SKIP_MAX_BYTES`].
    OptionTooLong,
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (the option
    /// cannot answer an error).
    UnknownExport,
    /// A request did not start with the request magic: the stream is lost.
    BadRequestMagic,
    /// A `WRITE` longer than [`NBD_WRITE_SKIP_MAX_BYTES`].
    WriteTooLong,
}

impl FatalReason {
    /// A short description, for the log.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            FatalReason::BadClientFlags => "unknown client flags",
            FatalReason::NotFixedNewstyle => "option other than EXPORT_NAME without fixed newstyle",
            FatalReason::BadOptionMagic => "bad option magic",
            FatalReason::OptionTooLong => "option data too long",
            FatalReason::UnknownExport => "EXPORT_NAME of an unknown export",
            FatalReason::BadRequestMagic => "bad request magic",
            FatalReason::WriteTooLong => "write too long to skip",
        }
    }
}

impl fmt::Display for FatalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the driver must act on, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdEvent {
    /// Does the export [`NbdSession::export_name`] exist? Answer with
    /// [`NbdSession::answer_export`]. The empty name is an ordinary name
    /// (the protocol's default export).
    ExportQuery {
        /// The option asking.
        option: ExportOption,
    },
    /// Which exports exist? Call [`NbdSession::list_entry`] for each, then
    /// [`NbdSession::list_done`].
    ListQuery,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set` false) or
    /// `NBD_OPT_SET_META_CONTEXT` (`set` true) for the export
    /// [`NbdSession::export_name`]: answer with
    /// [`NbdSession::answer_meta`] (the export's snapshot tags, or `None`
    /// when it does not exist).
    MetaQuery {
        /// A selection, not a listing.
        set: bool,
    },
    /// The handshake ended: [`NbdSession::export`] is served from now on.
    /// Write out `transmit()` before any reply.
    Ready,
    /// A valid command. For `Write` with a non-zero length, the payload comes
    /// next ([`NbdSession::payload_remaining`]).
    Command(Cmd),
    /// An invalid request: send `simple_reply(handle, Some(error))`, or
    /// `error_chunk(handle, error)` when `structured`. A rejected
    /// `WRITE`'s payload is skipped by the session.
    Reject {
        /// The client's handle.
        handle: u64,
        /// The error to reply.
        error: NbdError,
        /// Answer with a structured `ERROR` chunk (a `READ` or
        /// `BLOCK_STATUS` once structured replies are on).
        structured: bool,
    },
    /// The client ended the session (`NBD_CMD_DISC`, or `NBD_OPT_ABORT`
    /// whose ACK is queued): finish in-flight commands, write out, close.
    Disconnect,
    /// Protocol violation: close (queued transmit bytes may be written best
    /// effort first).
    Fatal(FatalReason),
}

/// A call the session refused: a driver bug or a full transmit buffer,
/// never a client's doing. The session is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdCallError {
    /// `answer_export` outside [`NbdState::AwaitExport`].
    NotAwaitingExport,
    /// `list_entry`/`list_done` outside [`NbdState::AwaitList`].
    NotListing,
    /// `answer_meta` outside [`NbdState::AwaitMeta`], or with more tags
    /// than `SNAPSHOTS_MAX`.
    NotAwaitingMeta,
    /// A list entry name over [`NBD_EXPORT_NAME_MAX_BYTES`].
    NameTooLong,
    /// No room for the list entry: write out `transmit()`, then call again.
    TransmitFull,
    /// `handle_payload` of more than `payload_remaining()`.
    PayloadOverrun,
    /// `consume_transmit` of more than `transmit().len()`.
    TransmitOverrun,
}

// ---------------------------------------------------------------------------
// The session.
// ---------------------------------------------------------------------------

/// What follows a skipped option's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSkip {
    /// An error reply of this type.
    Error(u32),
    /// The ACK of `NBD_OPT_ABORT`, then the end.
    Abort,
}

/// A session's state, with what it keeps while in it. The driver reads it
/// ([`NbdSession::state`]); only the session changes it.
///
/// | state | entered on | consumes | leaves on |
/// |---|---|---|---|
/// | `ClientFlags` | `new`, `reset` (greeting queued) | 4 bytes of client flags | known flags → `OptionHeader`; unknown flags → `Closed` (`Fatal`) |
/// | `OptionHeader` | client flags; an option answered | a 16-byte option header, once the transmit buffer has room for the reply | data to read → `OptionData`; data to skip → `OptionSkip`; `LIST` → `AwaitList`; bad magic, an option other than `EXPORT_NAME` from a client without fixed newstyle, or data over the skip bound → `Closed` (`Fatal`) |
/// | `OptionData` | `EXPORT_NAME`, `INFO` or `GO` with data | the data, into the receive scratch | valid → `AwaitExport` (`ExportQuery`); malformed `INFO`/`GO` → error reply, `OptionHeader` |
/// | `OptionSkip` | a refused option, `ABORT` with data | the data, discarded | reply queued → `OptionHeader`; `ABORT` → `Disconnecting` |
/// | `AwaitExport` | `ExportQuery` | nothing | `answer_export`: `GO`/`EXPORT_NAME` found → `Request` (`Ready`); `INFO`, or `GO` not found → `OptionHeader`; `EXPORT_NAME` not found → `Closed` (`Fatal`) |
/// | `AwaitList` | `ListQuery` | nothing | `list_done` → `OptionHeader` |
/// | `AwaitMeta` | `LIST_META_CONTEXT`/`SET_META_CONTEXT` data parsed (`MetaQuery`) | nothing | `answer_meta(Some(tags))` → `MetaReply`; `answer_meta(None)` → `NBD_REP_ERR_UNKNOWN`, `OptionHeader` |
/// | `MetaReply` | `answer_meta` | nothing | every matching context and the ACK queued (as room allows) → `OptionHeader` |
/// | `Request` | `Ready`; a request handled | a 28-byte request header | `Command`/`Reject` (stays); `WRITE` accepted → `Payload`; `WRITE` rejected → `PayloadSkip`; `DISC` → `Disconnecting`; bad magic or a write over the skip bound → `Closed` (`Fatal`) |
/// | `Payload` | an accepted `WRITE` with data | nothing (`handle_payload` takes the payload) | payload complete → `Request` |
/// | `PayloadSkip` | a rejected `WRITE` with data | the payload, discarded | payload skipped → `Request` |
/// | `Disconnecting` | `ABORT` (ACK queued), `DISC` | nothing | terminal: the driver finishes in-flight commands, writes out, closes |
/// | `Closed` | `Fatal`, `handle_eof` | nothing | terminal until `reset` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdState {
    /// Greeting queued, waiting for the client flags.
    ClientFlags,
    /// Waiting for an option header.
    OptionHeader,
    /// Reading option data into the scratch.
    OptionData {
        /// The option.
        opt: u32,
        /// Its data length.
        len: usize,
    },
    /// Skipping the data of a refused option.
    OptionSkip {
        /// The option.
        opt: u32,
        /// Bytes left to skip.
        remaining: u32,
        /// What is queued once skipped.
        then: AfterSkip,
    },
    /// Waiting for `answer_export`.
    AwaitExport {
        /// The option asking (`EXPORT_NAME`, `INFO` or `GO`).
        opt: u32,
    },
    /// Waiting for `list_entry`s and `list_done`.
    AwaitList,
    /// Waiting for `answer_meta`.
    AwaitMeta {
        /// `LIST_META_CONTEXT` or `SET_META_CONTEXT`.
        opt: u32,
        /// Its data length (the queries, in the scratch).
        len: usize,
    },
    /// Queuing the metadata contexts answered (as the transmit buffer
    /// allows; `consume_transmit` goes on).
    MetaReply {
        /// `LIST_META_CONTEXT` or `SET_META_CONTEXT`.
        opt: u32,
        /// Its data length (the queries, in the scratch).
        len: usize,
        /// The next context to consider.
        next: usize,
    },
    /// Transmission: waiting for a request header.
    Request,
    /// Transmission: the driver takes a `WRITE` payload.
    Payload {
        /// Payload bytes still to take.
        remaining: u32,
    },
    /// Transmission: skipping a rejected `WRITE`'s payload.
    PayloadSkip {
        /// Payload bytes still to skip.
        remaining: u32,
    },
    /// The client ended the session.
    Disconnecting,
    /// Closed after a fatal error or end of stream.
    Closed,
}

/// One NBD connection's protocol state. See the module documentation for the
/// call order.
pub struct NbdSession {
    cfg: NbdConfig,
    st: NbdState,
    event: Option<NbdEvent>,
    fixed_newstyle: bool,
    no_zeroes: bool,
    /// Header being assembled (client flags, option header or request).
    hdr: [u8; REQUEST_HEADER_BYTES],
    hdr_len: usize,
    /// Option data scratch, `NBD_OPTION_DATA_MAX_BYTES`.
    data: Box<[u8]>,
    data_len: usize,
    /// Handshake transmit buffer, `NBD_TRANSMIT_BUFFER_BYTES`; pending bytes
    /// are `tx[tx_start..tx_end]`.
    tx: Box<[u8]>,
    tx_start: usize,
    tx_end: usize,
    /// The queried or chosen export name, `NBD_EXPORT_NAME_MAX_BYTES`.
    name: Box<[u8]>,
    name_len: usize,
    export: ExportInfo,
    export_chosen: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured: bool,
    /// The snapshot tags of the export a metadata query is answered for.
    meta_tags: [u32; SNAPSHOTS_MAX],
    meta_n: usize,
    /// The selected contexts (id = index + 1) and the export they were
    /// selected for.
    selected: [MetaContext; NBD_META_CONTEXTS_MAX],
    selected_n: usize,
    selected_name: Box<[u8]>,
    selected_name_len: usize,
}

impl fmt::Debug for NbdSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdSession")
            .field("st", &self.st)
            .field("event", &self.event)
            .field("fixed_newstyle", &self.fixed_newstyle)
            .field("no_zeroes", &self.no_zeroes)
            .field("hdr_len", &self.hdr_len)
            .field("data_len", &self.data_len)
            .field("tx_start", &self.tx_start)
            .field("tx_end", &self.tx_end)
            .field("name_len", &self.name_len)
            .field("export", &self.export_chosen.then_some(self.export))
            .field("structured", &self.structured)
            .field("selected", &self.selected_contexts())
            .finish_non_exhaustive()
    }
}

/// `N` bytes of `b` at `at`, `None` when out of bounds.
fn field<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Where the name is in valid `INFO`/`GO` data: (offset, length).
fn parse_info_request(d: &[u8]) -> Option<(usize, usize)> {
    let name_len = usize::try_from(u32::from_be_bytes(field(d, 0)?)).ok()?;
    let count_at = 4usize.checked_add(name_len)?;
    let count = usize::from(u16::from_be_bytes(field(d, count_at)?));
    let end = count_at
        .checked_add(2)?
        .checked_add(count.checked_mul(2)?)?;
    (end == d.len()).then_some((4, name_len))
}

const MESSAGE_UNSUP: &[u8] = b"option not supported by this server";
const MESSAGE_INVALID: &[u8] = b"malformed option";
const MESSAGE_UNKNOWN: &[u8] = b"no such export";
const MESSAGE_TOO_BIG: &[u8] = b"option data too long";
const _: () = assert!(
    MESSAGE_UNSUP.len() <= ERROR_MESSAGE_MAX_BYTES
        && MESSAGE_INVALID.len() <= ERROR_MESSAGE_MAX_BYTES
        && MESSAGE_UNKNOWN.len() <= ERROR_MESSAGE_MAX_BYTES
        && MESSAGE_TOO_BIG.len() <= ERROR_MESSAGE_MAX_BYTES
);

/// The message of an option error reply (for the user; libnbd and qemu
/// print it).
fn error_message(rep: u32) -> &'static [u8] {
    match rep {
        REP_ERR_UNSUP => MESSAGE_UNSUP,
        REP_ERR_INVALID => MESSAGE_INVALID,
        REP_ERR_UNKNOWN => MESSAGE_UNKNOWN,
        REP_ERR_TOO_BIG => MESSAGE_TOO_BIG,
        _ => b"",
    }
}

/// Parses `LIST_META_CONTEXT`/`SET_META_CONTEXT` data (u32 name length,
/// name, u32 query count, then each query as u32 length and bytes, nothing
/// after): the name's length (it starts at byte 4), `None` when malformed.
fn parse_meta_request(d: &[u8]) -> Option<usize> {
    let name_len = usize::try_from(u32::from_be_bytes(field(d, 0)?)).ok()?;
    let mut at = 4usize.checked_add(name_len)?;
    let count = u32::from_be_bytes(field(d, at)?);
    at += 4;
    for _ in 0..count {
        let l = usize::try_from(u32::from_be_bytes(field(d, at)?)).ok()?;
        at = at.checked_add(4)?.checked_add(l)?;
        if at > d.len() {
            return None;
        }
    }
    (at == d.len()).then_some(name_len)
}

/// Whether the queries of well-formed meta-context data `d` select the
/// context `name`. No query: every context for a list, none for a
/// selection. A query is a context's exact name; in a list, a query ending
/// in `:` is a wildcard for every context it begins (`base:`, `x-csnap:`,
/// `qemu:`, `qemu:dirty-bitmap:`). Queries of unknown namespaces match
/// nothing (ignored, as the protocol asks).
fn meta_query_matches(d: &[u8], name: &[u8], set: bool) -> bool {
    let Some(name_len) = field(d, 0).map(u32::from_be_bytes) else {
        return false;
    };
    let Ok(mut at) = usize::try_from(name_len).map(|n| n + 4) else {
        return false;
    };
    let Some(count) = field(d, at).map(u32::from_be_bytes) else {
        return false;
    };
    at += 4;
    if count == 0 {
        return !set;
    }
    for _ in 0..count {
        let Some(l) = field(d, at).and_then(|l| usize::try_from(u32::from_be_bytes(l)).ok()) else {
            return false;
        };
        let Some(q) = d.get(at + 4..at + 4 + l) else {
            return false;
        };
        at += 4 + l;
        if q == name || (!set && q.last() == Some(&b':') && name.starts_with(q)) {
            return true;
        }
    }
    false
}

impl NbdSession {
    /// Reserves the buffers (the only allocation) and queues the greeting.
    ///
    /// # Panics
    ///
    /// When `cfg` is not [valid](NbdConfig::is_valid) (a setup error, not an
    /// input error).
    #[must_use]
    pub fn new(cfg: NbdConfig) -> NbdSession {
        assert!(cfg.is_valid(), "invalid NbdConfig {cfg:?}");
        let mut s = NbdSession {
            cfg,
            st: NbdState::ClientFlags,
            event: None,
            fixed_newstyle: false,
            no_zeroes: false,
            hdr: [0; REQUEST_HEADER_BYTES],
            hdr_len: 0,
            data: vec![0u8; NBD_OPTION_DATA_MAX_BYTES].into_boxed_slice(),
            data_len: 0,
            tx: vec![0u8; NBD_TRANSMIT_BUFFER_BYTES].into_boxed_slice(),
            tx_start: 0,
            tx_end: 0,
            name: vec![0u8; NBD_EXPORT_NAME_MAX_BYTES].into_boxed_slice(),
            name_len: 0,
            export: ExportInfo::default(),
            export_chosen: false,
            structured: false,
            meta_tags: [0; SNAPSHOTS_MAX],
            meta_n: 0,
            selected: [MetaContext::Allocation; NBD_META_CONTEXTS_MAX],
            selected_n: 0,
            selected_name: vec![0u8; NBD_EXPORT_NAME_MAX_BYTES].into_boxed_slice(),
            selected_name_len: 0,
        };
        s.reset();
        s
    }

    /// Bytes `new` reserves on the heap.
    #[must_use]
    pub const fn reserved_bytes() -> usize {
        NBD_OPTION_DATA_MAX_BYTES + NBD_TRANSMIT_BUFFER_BYTES + 2 * NBD_EXPORT_NAME_MAX_BYTES
    }

    /// Starts over for a new connection, reusing the buffers: everything is
    /// forgotten and the greeting is queued.
    pub fn reset(&mut self) {
        self.st = NbdState::ClientFlags;
        self.event = None;
        self.fixed_newstyle = false;
        self.no_zeroes = false;
        self.hdr_len = 0;
        self.data_len = 0;
        self.tx_start = 0;
        self.tx_end = 0;
        self.name_len = 0;
        self.export = ExportInfo::default();
        self.export_chosen = false;
        self.structured = false;
        self.meta_n = 0;
        self.selected_n = 0;
        self.selected_name_len = 0;
        self.push(&NBDMAGIC.to_be_bytes());
        self.push(&IHAVEOPT.to_be_bytes());
        self.push(&HANDSHAKE_FLAGS.to_be_bytes());
        self.check();
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> NbdConfig {
        self.cfg
    }

    /// The state.
    #[must_use]
    pub fn state(&self) -> NbdState {
        self.st
    }

    /// Whether the session is in the transmission phase (requests flow).
    #[must_use]
    pub fn in_transmission(&self) -> bool {
        matches!(
            self.st,
            NbdState::Request | NbdState::Payload { .. } | NbdState::PayloadSkip { .. }
        )
    }

    /// Whether the client set `NBD_FLAG_C_FIXED_NEWSTYLE`.
    #[must_use]
    pub fn fixed_newstyle(&self) -> bool {
        self.fixed_newstyle
    }

    /// Whether the client set `NBD_FLAG_C_NO_ZEROES`.
    #[must_use]
    pub fn no_zeroes(&self) -> bool {
        self.no_zeroes
    }

    /// Whether structured replies were negotiated: `READ` and
    /// `BLOCK_STATUS` are answered with structured chunks.
    #[must_use]
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// The selected metadata contexts; the id of entry `i` is `i + 1`. Empty
    /// unless a `SET_META_CONTEXT` for the export served selected some.
    #[must_use]
    pub fn selected_contexts(&self) -> &[MetaContext] {
        self.selected.get(..self.selected_n).unwrap_or_default()
    }

    /// The export being served (the driver's answer to the `GO` or
    /// `EXPORT_NAME` that ended the handshake), `None` before.
    #[must_use]
    pub fn export(&self) -> Option<ExportInfo> {
        self.export_chosen.then_some(self.export)
    }

    /// The name of the pending export query, or of the export being served.
    #[must_use]
    pub fn export_name(&self) -> &[u8] {
        self.name.get(..self.name_len).unwrap_or_default()
    }

    /// [`export_name`](NbdSession::export_name) when it is UTF-8.
    #[must_use]
    pub fn export_name_str(&self) -> Option<&str> {
        core::str::from_utf8(self.export_name()).ok()
    }

    /// The next event, in order.
    pub fn poll_event(&mut self) -> Option<NbdEvent> {
        self.event.take()
    }

    /// Whether [`handle_input`](NbdSession::handle_input) would consume
    /// anything now. False while an event is unpolled, an answer or a payload
    /// is awaited, the transmit buffer lacks room for the next option's
    /// reply, and after the end.
    #[must_use]
    pub fn wants_input(&self) -> bool {
        if self.event.is_some() {
            return false;
        }
        match self.st {
            NbdState::ClientFlags
            | NbdState::OptionData { .. }
            | NbdState::OptionSkip { .. }
            | NbdState::Request
            | NbdState::PayloadSkip { .. } => true,
            NbdState::OptionHeader => {
                self.hdr_len > 0 || self.tx_free() >= NBD_OPTION_REPLY_MAX_BYTES
            }
            NbdState::AwaitExport { .. }
            | NbdState::AwaitList
            | NbdState::AwaitMeta { .. }
            | NbdState::MetaReply { .. }
            | NbdState::Payload { .. }
            | NbdState::Disconnecting
            | NbdState::Closed => false,
        }
    }

    /// Feeds received bytes; returns how many were consumed (the driver drops
    /// them). Stops right after the bytes that complete an event, and
    /// consumes nothing while [`wants_input`](NbdSession::wants_input) is
    /// false: the rest must be offered again later (a `WRITE` payload goes to
    /// [`handle_payload`](NbdSession::handle_payload) instead).
    pub fn handle_input(&mut self, input: &[u8]) -> usize {
        let mut used = 0;
        while self.event.is_none() {
            let Some(rest) = input.get(used..) else {
                break;
            };
            if rest.is_empty() {
                break;
            }
            let n = self.step(rest).min(rest.len());
            if n == 0 {
                break;
            }
            used += n;
            self.check();
        }
        self.check();
        used
    }

    /// Bytes of `WRITE` payload the driver must still take (0 outside the
    /// payload state).
    #[must_use]
    pub fn payload_remaining(&self) -> u32 {
        match self.st {
            NbdState::Payload { remaining } => remaining,
            _ => 0,
        }
    }

    /// The driver took `n` more payload bytes into its own buffer.
    ///
    /// # Errors
    ///
    /// [`NbdCallError::PayloadOverrun`] when `n` is more than
    /// [`payload_remaining`](NbdSession::payload_remaining).
    pub fn handle_payload(&mut self, n: usize) -> Result<(), NbdCallError> {
        if n == 0 {
            return Ok(());
        }
        let NbdState::Payload { remaining } = self.st else {
            return Err(NbdCallError::PayloadOverrun);
        };
        let n = u32::try_from(n).map_err(|_| NbdCallError::PayloadOverrun)?;
        let Some(left) = remaining.checked_sub(n) else {
            return Err(NbdCallError::PayloadOverrun);
        };
        self.st = if left == 0 {
            NbdState::Request
        } else {
            NbdState::Payload { remaining: left }
        };
        self.check();
        Ok(())
    }

    /// The peer closed (or the socket failed): the session is over. Drops any
    /// unpolled event; queued transmit bytes stay (e.g. the ACK of an
    /// `ABORT` to a client that half-closed).
    pub fn handle_eof(&mut self) {
        self.st = NbdState::Closed;
        self.event = None;
        self.hdr_len = 0;
        self.data_len = 0;
        self.check();
    }

    /// Handshake bytes to write to the client.
    #[must_use]
    pub fn transmit(&self) -> &[u8] {
        self.tx.get(self.tx_start..self.tx_end).unwrap_or_default()
    }

    /// `n` bytes of [`transmit`](NbdSession::transmit) were written.
    ///
    /// # Errors
    ///
    /// [`NbdCallError::TransmitOverrun`] when `n` is more than is pending.
    pub fn consume_transmit(&mut self, n: usize) -> Result<(), NbdCallError> {
        if n > self.tx_end - self.tx_start {
            return Err(NbdCallError::TransmitOverrun);
        }
        self.tx_start += n;
        if self.tx_start == self.tx_end {
            self.tx_start = 0;
            self.tx_end = 0;
        }
        if matches!(self.st, NbdState::MetaReply { .. }) {
            self.emit_meta();
        }
        self.check();
        Ok(())
    }

    /// Answers the pending [`NbdEvent::ExportQuery`]: `Some` serves (or, for
    /// `INFO`, describes) the export, `None` says it does not exist.
    ///
    /// # Errors
    ///
    /// [`NbdCallError::NotAwaitingExport`] outside
    /// [`NbdState::AwaitExport`].
    pub fn answer_export(&mut self, info: Option<ExportInfo>) -> Result<(), NbdCallError> {
        let NbdState::AwaitExport { opt } = self.st else {
            return Err(NbdCallError::NotAwaitingExport);
        };
        self.event = None;
        match (opt, info) {
            (OPT_EXPORT_NAME, Some(i)) => {
                self.push(&i.size_bytes.to_be_bytes());
                self.push(&transmission_flags(&i).to_be_bytes());
                if !self.no_zeroes {
                    self.push(&[0u8; EXPORT_NAME_ZEROES_BYTES]);
                }
                self.enter_transmission(i);
            }
            (OPT_EXPORT_NAME, None) => self.fatal(FatalReason::UnknownExport),
            (_, Some(i)) => {
                self.reply(
                    opt,
                    REP_INFO,
                    &[
                        &INFO_EXPORT.to_be_bytes(),
                        &i.size_bytes.to_be_bytes(),
                        &transmission_flags(&i).to_be_bytes(),
                    ],
                );
                self.reply(
                    opt,
                    REP_INFO,
                    &[
                        &INFO_BLOCK_SIZE.to_be_bytes(),
                        &BLOCK_SIZE_MIN_BYTES.to_be_bytes(),
                        &self.cfg.preferred_block_size_bytes.to_be_bytes(),
                        &self.cfg.payload_limit_bytes.to_be_bytes(),
                    ],
                );
                self.reply(opt, REP_ACK, &[]);
                if opt == OPT_GO {
                    self.enter_transmission(i);
                } else {
                    self.st = NbdState::OptionHeader;
                }
            }
            (_, None) => {
                self.reply_error(opt, REP_ERR_UNKNOWN);
                self.st = NbdState::OptionHeader;
            }
        }
        self.check();
        Ok(())
    }

    /// Adds one export to the pending [`NbdEvent::ListQuery`]'s answer.
    ///
    /// # Errors
    ///
    /// [`NbdCallError::NotListing`] outside [`NbdState::AwaitList`];
    /// [`NbdCallError::NameTooLong`] for a name over
    /// [`NBD_EXPORT_NAME_MAX_BYTES`] (no client could open it);
    /// [`NbdCallError::TransmitFull`] when the transmit buffer must be
    /// written out first (then call again with the same name).
    pub fn list_entry(&mut self, name: &[u8]) -> Result<(), NbdCallError> {
        if self.st != NbdState::AwaitList {
            return Err(NbdCallError::NotListing);
        }
        if name.len() > NBD_EXPORT_NAME_MAX_BYTES {
            return Err(NbdCallError::NameTooLong);
        }
        let bytes = OPTION_REPLY_HEADER_BYTES + 4 + name.len();
        // Keep room for the ACK that ends the list.
        if self.tx_free() < bytes + OPTION_REPLY_HEADER_BYTES {
            return Err(NbdCallError::TransmitFull);
        }
        self.event = None;
        let name_len = u32::try_from(name.len()).map_err(|_| NbdCallError::NameTooLong)?;
        self.reply(OPT_LIST, REP_SERVER, &[&name_len.to_be_bytes(), name]);
        self.check();
        Ok(())
    }

    /// Ends the pending list (queues the ACK).
    ///
    /// # Errors
    ///
    /// [`NbdCallError::NotListing`] outside [`NbdState::AwaitList`].
    pub fn list_done(&mut self) -> Result<(), NbdCallError> {
        if self.st != NbdState::AwaitList {
            return Err(NbdCallError::NotListing);
        }
        self.event = None;
        self.reply(OPT_LIST, REP_ACK, &[]);
        self.st = NbdState::OptionHeader;
        self.check();
        Ok(())
    }

    /// Answers the pending [`NbdEvent::MetaQuery`]: `Some(tags)` gives the
    /// snapshot tags the export offers contexts for (the session answers
    /// every query from them, as the transmit buffer allows), `None` says
    /// the export does not exist (`NBD_REP_ERR_UNKNOWN`).
    ///
    /// # Errors
    ///
    /// [`NbdCallError::NotAwaitingMeta`] outside [`NbdState::AwaitMeta`],
    /// or for more than `SNAPSHOTS_MAX` tags.
    pub fn answer_meta(&mut self, tags: Option<&[u32]>) -> Result<(), NbdCallError> {
        let NbdState::AwaitMeta { opt, len } = self.st else {
            return Err(NbdCallError::NotAwaitingMeta);
        };
        if tags.is_some_and(|t| t.len() > SNAPSHOTS_MAX) {
            return Err(NbdCallError::NotAwaitingMeta);
        }
        self.event = None;
        match tags {
            None => {
                self.reply_error(opt, REP_ERR_UNKNOWN);
                self.st = NbdState::OptionHeader;
            }
            Some(tags) => {
                self.meta_tags[..tags.len()].copy_from_slice(tags);
                self.meta_n = tags.len();
                if opt == OPT_SET_META_CONTEXT {
                    let n = self.name_len;
                    self.selected_name[..n].copy_from_slice(&self.name[..n]);
                    self.selected_name_len = n;
                }
                self.st = NbdState::MetaReply { opt, len, next: 0 };
                self.emit_meta();
            }
        }
        self.check();
        Ok(())
    }

    /// Queues the next matching contexts of the metadata answer while they
    /// fit (with room kept for the ACK), then the ACK.
    fn emit_meta(&mut self) {
        let NbdState::MetaReply { opt, len, mut next } = self.st else {
            return;
        };
        let set = opt == OPT_SET_META_CONTEXT;
        let total = 1 + 2 * self.meta_n;
        let mut name = [0u8; CONTEXT_NAME_MAX_BYTES];
        while next < total {
            let Some(ctx) = MetaContext::at(next, &self.meta_tags[..self.meta_n]) else {
                break;
            };
            let n = ctx.name(&mut name);
            let matched = self
                .data
                .get(..len)
                .is_some_and(|d| meta_query_matches(d, &name[..n], set));
            if matched {
                if self.tx_free() < OPTION_REPLY_HEADER_BYTES + 4 + n + OPTION_REPLY_HEADER_BYTES {
                    self.st = NbdState::MetaReply { opt, len, next };
                    return;
                }
                let id = if set && self.selected_n < self.selected.len() {
                    self.selected[self.selected_n] = ctx;
                    self.selected_n += 1;
                    u32::try_from(self.selected_n).unwrap_or(0)
                } else {
                    0
                };
                self.reply(opt, REP_META_CONTEXT, &[&id.to_be_bytes(), &name[..n]]);
            }
            next += 1;
        }
        self.reply(opt, REP_ACK, &[]);
        self.st = NbdState::OptionHeader;
    }

    // -----------------------------------------------------------------------
    // Input.
    // -----------------------------------------------------------------------

    /// One step on non-empty `rest`; returns the bytes consumed (0: blocked).
    fn step(&mut self, rest: &[u8]) -> usize {
        match self.st {
            NbdState::ClientFlags => {
                let n = self.fill(rest, CLIENT_FLAGS_BYTES);
                if self.hdr_len == CLIENT_FLAGS_BYTES {
                    self.hdr_len = 0;
                    let flags = u32::from_be_bytes(self.hdr_field(0));
                    self.on_client_flags(flags);
                }
                n
            }
            NbdState::OptionHeader => {
                if self.hdr_len == 0 && self.tx_free() < NBD_OPTION_REPLY_MAX_BYTES {
                    return 0;
                }
                let n = self.fill(rest, OPTION_HEADER_BYTES);
                if self.hdr_len >= 8 && u64::from_be_bytes(self.hdr_field(0)) != IHAVEOPT {
                    self.fatal(FatalReason::BadOptionMagic);
                } else if self.hdr_len == OPTION_HEADER_BYTES {
                    self.hdr_len = 0;
                    let opt = u32::from_be_bytes(self.hdr_field(8));
                    let len = u32::from_be_bytes(self.hdr_field(12));
                    self.on_option_header(opt, len);
                }
                n
            }
            NbdState::OptionData { opt, len } => {
                let want = len.saturating_sub(self.data_len);
                let n = want.min(rest.len());
                let (Some(dst), Some(src)) = (
                    self.data.get_mut(self.data_len..self.data_len + n),
                    rest.get(..n),
                ) else {
                    // Unreachable: `len` is at most the scratch size.
                    self.fatal(FatalReason::OptionTooLong);
                    return 0;
                };
                dst.copy_from_slice(src);
                self.data_len += n;
                if self.data_len == len {
                    self.data_len = 0;
                    self.on_option_data(opt, len);
                }
                n
            }
            NbdState::OptionSkip {
                opt,
                remaining,
                then,
            } => {
                let n = u32::try_from(rest.len()).unwrap_or(u32::MAX).min(remaining);
                let left = remaining - n;
                if left == 0 {
                    self.finish_skip(opt, then);
                } else {
                    self.st = NbdState::OptionSkip {
                        opt,
                        remaining: left,
                        then,
                    };
                }
                usize::try_from(n).unwrap_or(0)
            }
            NbdState::Request => {
                let n = self.fill(rest, REQUEST_HEADER_BYTES);
                if self.hdr_len >= 4 && u32::from_be_bytes(self.hdr_field(0)) != REQUEST_MAGIC {
                    self.fatal(FatalReason::BadRequestMagic);
                } else if self.hdr_len == REQUEST_HEADER_BYTES {
                    self.hdr_len = 0;
                    self.on_request();
                }
                n
            }
            NbdState::PayloadSkip { remaining } => {
                let n = u32::try_from(rest.len()).unwrap_or(u32::MAX).min(remaining);
                let left = remaining - n;
                self.st = if left == 0 {
                    NbdState::Request
                } else {
                    NbdState::PayloadSkip { remaining: left }
                };
                usize::try_from(n).unwrap_or(0)
            }
            NbdState::AwaitExport { .. }
            | NbdState::AwaitList
            | NbdState::AwaitMeta { .. }
            | NbdState::MetaReply { .. }
            | NbdState::Payload { .. }
            | NbdState::Disconnecting
            | NbdState::Closed => 0,
        }
    }

    /// Copies from `rest` into the header until it holds `want` bytes.
    fn fill(&mut self, rest: &[u8], want: usize) -> usize {
        let n = want.saturating_sub(self.hdr_len).min(rest.len());
        let (Some(dst), Some(src)) = (
            self.hdr.get_mut(self.hdr_len..self.hdr_len + n),
            rest.get(..n),
        ) else {
            return 0;
        };
        dst.copy_from_slice(src);
        self.hdr_len += n;
        n
    }

    /// `N` header bytes at `at` (zeroes past the header, which callers never
    /// ask for).
    fn hdr_field<const N: usize>(&self, at: usize) -> [u8; N] {
        field(&self.hdr, at).unwrap_or([0; N])
    }

    fn on_client_flags(&mut self, flags: u32) {
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            self.fatal(FatalReason::BadClientFlags);
            return;
        }
        self.fixed_newstyle = flags & FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.st = NbdState::OptionHeader;
    }

    fn on_option_header(&mut self, opt: u32, len: u32) {
        if !self.fixed_newstyle && opt != OPT_EXPORT_NAME {
            self.fatal(FatalReason::NotFixedNewstyle);
            return;
        }
        match opt {
            OPT_EXPORT_NAME => match usize::try_from(len) {
                Ok(l) if l <= NBD_EXPORT_NAME_MAX_BYTES => self.expect_data(opt, l),
                _ => self.fatal(FatalReason::UnknownExport),
            },
            OPT_INFO | OPT_GO => match usize::try_from(len) {
                Ok(l) if l <= NBD_OPTION_DATA_MAX_BYTES => self.expect_data(opt, l),
                _ => self.skip(opt, len, AfterSkip::Error(REP_ERR_TOO_BIG)),
            },
            OPT_ABORT => self.skip(opt, len, AfterSkip::Abort),
            OPT_LIST if len == 0 => {
                self.st = NbdState::AwaitList;
                self.event = Some(NbdEvent::ListQuery);
            }
            OPT_LIST => self.skip(opt, len, AfterSkip::Error(REP_ERR_INVALID)),
            OPT_STRUCTURED_REPLY if len == 0 => {
                self.structured = true;
                self.reply(opt, REP_ACK, &[]);
            }
            OPT_STRUCTURED_REPLY => self.skip(opt, len, AfterSkip::Error(REP_ERR_INVALID)),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if opt == OPT_SET_META_CONTEXT {
                    // A selection replaces the former one, even when it
                    // fails.
                    self.selected_n = 0;
                    self.selected_name_len = 0;
                }
                match usize::try_from(len) {
                    Ok(l) if l <= NBD_OPTION_DATA_MAX_BYTES => self.expect_data(opt, l),
                    _ => self.skip(opt, len, AfterSkip::Error(REP_ERR_TOO_BIG)),
                }
            }
            _ => self.skip(opt, len, AfterSkip::Error(REP_ERR_UNSUP)),
        }
    }

    fn expect_data(&mut self, opt: u32, len: usize) {
        self.data_len = 0;
        if len == 0 {
            self.on_option_data(opt, 0);
        } else {
            self.st = NbdState::OptionData { opt, len };
        }
    }

    fn skip(&mut self, opt: u32, len: u32, then: AfterSkip) {
        if len > NBD_OPTION_SKIP_MAX_BYTES {
            self.fatal(FatalReason::OptionTooLong);
        } else if len == 0 {
            self.finish_skip(opt, then);
        } else {
            self.st = NbdState::OptionSkip {
                opt,
                remaining: len,
                then,
            };
        }
    }

    fn finish_skip(&mut self, opt: u32, then: AfterSkip) {
        match then {
            AfterSkip::Error(rep) => {
                self.reply_error(opt, rep);
                self.st = NbdState::OptionHeader;
            }
            AfterSkip::Abort => {
                self.reply(opt, REP_ACK, &[]);
                self.st = NbdState::Disconnecting;
                self.event = Some(NbdEvent::Disconnect);
            }
        }
    }

    fn on_option_data(&mut self, opt: u32, len: usize) {
        if opt == OPT_EXPORT_NAME {
            self.set_name(0, len);
            self.query(opt);
            return;
        }
        if opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT {
            let parsed = self.data.get(..len).and_then(parse_meta_request);
            match parsed {
                _ if opt == OPT_SET_META_CONTEXT && !self.structured => {
                    self.reply_error(opt, REP_ERR_INVALID);
                    self.st = NbdState::OptionHeader;
                }
                Some(name_len) if name_len <= NBD_EXPORT_NAME_MAX_BYTES => {
                    self.set_name(4, name_len);
                    self.st = NbdState::AwaitMeta { opt, len };
                    self.event = Some(NbdEvent::MetaQuery {
                        set: opt == OPT_SET_META_CONTEXT,
                    });
                }
                Some(_) => {
                    self.reply_error(opt, REP_ERR_UNKNOWN);
                    self.st = NbdState::OptionHeader;
                }
                None => {
                    self.reply_error(opt, REP_ERR_INVALID);
                    self.st = NbdState::OptionHeader;
                }
            }
            return;
        }
        // INFO or GO.
        let parsed = self.data.get(..len).and_then(parse_info_request);
        match parsed {
            Some((at, name_len)) if name_len <= NBD_EXPORT_NAME_MAX_BYTES => {
                self.set_name(at, name_len);
                self.query(opt);
            }
            Some(_) => {
                self.reply_error(opt, REP_ERR_UNKNOWN);
                self.st = NbdState::OptionHeader;
            }
            None => {
                self.reply_error(opt, REP_ERR_INVALID);
                self.st = NbdState::OptionHeader;
            }
        }
    }

    /// Copies `data[at..at + len]` (at most a name's length) as the name.
    fn set_name(&mut self, at: usize, len: usize) {
        let src = at.checked_add(len).and_then(|end| self.data.get(at..end));
        match (src, self.name.get_mut(..len)) {
            (Some(src), Some(dst)) => {
                dst.copy_from_slice(src);
                self.name_len = len;
            }
            _ => self.name_len = 0,
        }
    }

    fn query(&mut self, opt: u32) {
        let option = match opt {
            OPT_EXPORT_NAME => ExportOption::ExportName,
            OPT_INFO => ExportOption::Info,
            _ => ExportOption::Go,
        };
        self.st = NbdState::AwaitExport { opt };
        self.event = Some(NbdEvent::ExportQuery { option });
    }

    fn enter_transmission(&mut self, info: ExportInfo) {
        if self.selected_name.get(..self.selected_name_len) != self.name.get(..self.name_len) {
            // Contexts selected for another export are not this one's.
            self.selected_n = 0;
        }
        self.export = info;
        self.export_chosen = true;
        self.st = NbdState::Request;
        self.event = Some(NbdEvent::Ready);
    }

    fn on_request(&mut self) {
        let flags = u16::from_be_bytes(self.hdr_field(4));
        let typ = u16::from_be_bytes(self.hdr_field(6));
        let handle = u64::from_be_bytes(self.hdr_field(8));
        let offset = u64::from_be_bytes(self.hdr_field(16));
        let length = u32::from_be_bytes(self.hdr_field(24));
        if typ == CMD_DISC {
            self.st = NbdState::Disconnecting;
            self.event = Some(NbdEvent::Disconnect);
            return;
        }
        if typ == CMD_WRITE && length > NBD_WRITE_SKIP_MAX_BYTES {
            self.fatal(FatalReason::WriteTooLong);
            return;
        }
        let checked = match CmdKind::from_wire(typ) {
            Some(kind) => self.validate(kind, flags, offset, length).map(|()| kind),
            None => Err(NbdError::Inval),
        };
        let has_payload = typ == CMD_WRITE && length > 0;
        match checked {
            Ok(kind) => {
                self.event = Some(NbdEvent::Command(Cmd {
                    handle,
                    kind,
                    flags: CmdFlags(flags),
                    offset,
                    length,
                }));
                if has_payload {
                    self.st = NbdState::Payload { remaining: length };
                }
            }
            Err(error) => {
                let structured = self.structured && matches!(typ, CMD_READ | CMD_BLOCK_STATUS);
                self.event = Some(NbdEvent::Reject {
                    handle,
                    error,
                    structured,
                });
                if has_payload {
                    self.st = NbdState::PayloadSkip { remaining: length };
                }
            }
        }
    }

    fn validate(
        &self,
        kind: CmdKind,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<(), NbdError> {
        if flags & !kind.allowed_flags() != 0 {
            return Err(NbdError::Inval);
        }
        if matches!(kind, CmdKind::Read | CmdKind::Write) && length > self.cfg.payload_limit_bytes {
            return Err(NbdError::Inval);
        }
        if kind == CmdKind::BlockStatus && (self.selected_n == 0 || length == 0) {
            return Err(NbdError::Inval);
        }
        if self.export.read_only && kind.writes() {
            return Err(NbdError::Perm);
        }
        if kind != CmdKind::Flush {
            let size = self.export.size_bytes;
            if offset > size || u64::from(length) > size - offset {
                return Err(match kind {
                    CmdKind::Write | CmdKind::WriteZeroes => NbdError::NoSpc,
                    _ => NbdError::Inval,
                });
            }
        }
        Ok(())
    }

    fn fatal(&mut self, reason: FatalReason) {
        self.st = NbdState::Closed;
        self.hdr_len = 0;
        self.data_len = 0;
        self.event = Some(NbdEvent::Fatal(reason));
    }

    // -----------------------------------------------------------------------
    // Output.
    // -----------------------------------------------------------------------

    fn tx_free(&self) -> usize {
        self.tx.len() - (self.tx_end - self.tx_start)
    }

    /// Appends to the transmit buffer, moving pending bytes to the front when
    /// the tail is short. Callers checked the room first.
    fn push(&mut self, bytes: &[u8]) {
        if self.tx.len() - self.tx_end < bytes.len() && self.tx_start > 0 {
            self.tx.copy_within(self.tx_start..self.tx_end, 0);
            self.tx_end -= self.tx_start;
            self.tx_start = 0;
        }
        let dst = self.tx.get_mut(self.tx_end..self.tx_end + bytes.len());
        assert!(dst.is_some(), "NBD transmit room is checked before a reply");
        if let Some(dst) = dst {
            dst.copy_from_slice(bytes);
            self.tx_end += bytes.len();
        }
    }

    /// Queues an option reply whose data is `parts`, concatenated.
    fn reply(&mut self, opt: u32, rep: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        self.push(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.push(&opt.to_be_bytes());
        self.push(&rep.to_be_bytes());
        self.push(&len.to_be_bytes());
        for p in parts {
            self.push(p);
        }
    }

    fn reply_error(&mut self, opt: u32, rep: u32) {
        self.reply(opt, rep, &[error_message(rep)]);
    }

    /// The invariants, after every transition (cheap; release builds too).
    fn check(&self) {
        assert!(self.tx_start <= self.tx_end && self.tx_end <= self.tx.len());
        assert!(self.tx_start < self.tx_end || self.tx_start == 0);
        assert!(self.name_len <= self.name.len());
        assert!(self.data.len() == NBD_OPTION_DATA_MAX_BYTES);
        let hdr_limit = match self.st {
            NbdState::ClientFlags => CLIENT_FLAGS_BYTES,
            NbdState::OptionHeader => OPTION_HEADER_BYTES,
            NbdState::Request => REQUEST_HEADER_BYTES,
            _ => 1,
        };
        assert!(
            self.hdr_len < hdr_limit,
            "header of {} bytes in {:?}",
            self.hdr_len,
            self.st
        );
        match self.st {
            NbdState::OptionData { len, .. } => {
                assert!(len <= self.data.len() && self.data_len < len);
            }
            _ => assert!(self.data_len == 0),
        }
        match self.st {
            NbdState::OptionHeader if self.hdr_len > 0 => {
                assert!(self.tx_free() >= NBD_OPTION_REPLY_MAX_BYTES);
            }
            NbdState::OptionData { .. }
            | NbdState::OptionSkip { .. }
            | NbdState::AwaitExport { .. } => {
                assert!(self.tx_free() >= NBD_OPTION_REPLY_MAX_BYTES);
            }
            NbdState::AwaitList => assert!(self.tx_free() >= OPTION_REPLY_HEADER_BYTES),
            NbdState::AwaitMeta { len, .. } => {
                assert!(self.tx_free() >= NBD_OPTION_REPLY_MAX_BYTES);
                assert!(len <= self.data.len());
            }
            NbdState::MetaReply { len, next, .. } => {
                assert!(len <= self.data.len() && next <= 1 + 2 * self.meta_n);
            }
            _ => {}
        }
        assert!(self.meta_n <= SNAPSHOTS_MAX);
        assert!(self.selected_n <= self.selected.len());
        assert!(self.selected_name_len <= self.selected_name.len());
        if self.selected_n > 0 {
            assert!(
                self.structured,
                "contexts selected without structured replies"
            );
        }
        match self.st {
            NbdState::OptionSkip { remaining, .. } => {
                assert!(remaining > 0 && remaining <= NBD_OPTION_SKIP_MAX_BYTES);
            }
            NbdState::Payload { remaining } => {
                assert!(remaining > 0 && remaining <= self.cfg.payload_limit_bytes);
            }
            NbdState::PayloadSkip { remaining } => {
                assert!(remaining > 0 && remaining <= NBD_WRITE_SKIP_MAX_BYTES);
            }
            _ => {}
        }
        if self.in_transmission() {
            assert!(self.export_chosen);
        }
        if matches!(self.event, Some(NbdEvent::Ready)) {
            assert!(self.export_chosen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_layout() {
        let r = simple_reply(0x0102_0304_0506_0708, Some(NbdError::NoSpc));
        assert_eq!(
            r,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(&simple_reply(9, None)[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn errno_values_round_trip() {
        let values: Vec<u32> = NbdError::ALL.iter().map(|e| e.errno()).collect();
        assert_eq!(values, [1, 5, 12, 22, 28, 75, 95, 108]);
        for e in NbdError::ALL {
            assert_eq!(NbdError::from_errno(e.errno()), Some(e));
        }
        assert_eq!(NbdError::from_errno(0), None);
        assert_eq!(NbdError::from_errno(2), None);
    }

    #[test]
    fn magic_values_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(
            OPTION_REPLY_MAGIC.to_be_bytes(),
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]
        );
        assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);
    }

    #[test]
    fn info_request_parsing() {
        // name "ab", two info requests.
        let d = [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 3, 0, 1];
        assert_eq!(parse_info_request(&d), Some((4, 2)));
        // Count says 2 but only one follows; trailing garbage; name past the
        // end; too short for the fixed fields.
        assert_eq!(parse_info_request(&d[..10]), None);
        let mut long = d.to_vec();
        long.push(0);
        assert_eq!(parse_info_request(&long), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0]), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0, 0]), Some((4, 0)));
    }

    #[test]
    fn read_only_exports_advertise_no_write_features() {
        let rw = transmission_flags(&ExportInfo {
            size_bytes: 1,
            read_only: false,
            can_multi_conn: true,
        });
        assert_eq!(rw, 0b1101_0110_1101);
        let ro = transmission_flags(&ExportInfo {
            size_bytes: 1,
            read_only: true,
            can_multi_conn: false,
        });
        assert_eq!(
            ro,
            FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_CACHE
        );
    }

    #[test]
    fn config_validation() {
        assert!(NbdConfig::default().is_valid());
        let bad = [
            (0, 512),
            (NBD_PAYLOAD_MAX_BYTES + 1, 4096),
            (4096, 8192),
            (4096, 256),
            (4096, 3000),
        ];
        for (payload_limit_bytes, preferred_block_size_bytes) in bad {
            let c = NbdConfig {
                payload_limit_bytes,
                preferred_block_size_bytes,
            };
            assert!(!c.is_valid(), "{c:?}");
        }
    }
}
