//! The NBD wire values (the protocol document, `doc/proto.md`; big-endian),
//! the sizes and bounds derived from them, and the public types the
//! session and its driver share (exports, errors, commands, events, reply
//! layouts).

use core::fmt;

use csnap_pools::{
    NBD_EXPORT_NAME_MAX_BYTES, NBD_META_CONTEXTS_MAX, NBD_OPTION_REPLY_MAX_BYTES,
    NBD_PAYLOAD_MAX_BYTES, NBD_TRANSMIT_BUFFER_BYTES, SNAPSHOTS_MAX,
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
pub(super) const META_REPLY_MAX_BYTES: usize =
    OPTION_REPLY_HEADER_BYTES + 4 + CONTEXT_NAME_MAX_BYTES;
/// Minimum block size advertised: any byte offset and length is served.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 1;

/// Bytes of the longest error message an option error reply carries.
pub(super) const ERROR_MESSAGE_MAX_BYTES: usize = 64;
/// Bytes of a successful `INFO`/`GO` answer: `NBD_INFO_EXPORT` (type, size,
/// flags), `NBD_INFO_BLOCK_SIZE` (type, three sizes), then the ACK.
pub(super) const INFO_ANSWER_BYTES: usize = (OPTION_REPLY_HEADER_BYTES + 2 + 8 + 2)
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
    pub(super) fn at(i: usize, tags: &[u32]) -> Option<MetaContext> {
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
    pub(super) fn from_wire(t: u16) -> Option<CmdKind> {
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
    pub(super) const fn allowed_flags(self) -> u16 {
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
