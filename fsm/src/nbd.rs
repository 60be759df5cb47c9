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
    NBD_EXPORT_NAME_MAX_BYTES, NBD_META_SELECTED_MAX, NBD_OPTION_DATA_MAX_BYTES,
    NBD_OPTION_REPLY_MAX_BYTES, NBD_OPTION_SKIP_MAX_BYTES, NBD_TRANSMIT_BUFFER_BYTES,
    NBD_WRITE_SKIP_MAX_BYTES, SNAPSHOTS_MAX,
};

pub use wire::*;

mod input;
mod wire;

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
    selected: [MetaContext; NBD_META_SELECTED_MAX],
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
            selected: [MetaContext::Allocation; NBD_META_SELECTED_MAX],
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
            // A full selection selects no more (`NBD_META_SELECTED_MAX`).
            let room = !set || self.selected_n < self.selected.len();
            if matched && room {
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
    use csnap_pools::NBD_PAYLOAD_MAX_BYTES;

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
