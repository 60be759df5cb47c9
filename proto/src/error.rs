//! Decode and encode errors. Every malformed input maps to one of these values;
//! nothing in this crate panics on input bytes.

use core::fmt;

use crate::msg::{ErrorCode, Kind};
use crate::{FRAME_MAX_BYTES, HEADER_BYTES, PROTOCOL_VERSION};

/// Why bytes from the peer are not a valid frame.
///
/// [`DecodeError::is_fatal`] tells whether the byte stream can still be cut
/// into frames after this error: if not, answer with an `Error` frame (best
/// effort) and close the connection; if so, answer with an `Error` frame
/// carrying [`DecodeError::code`] and [`DecodeError::culprit`] and go on with
/// the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The first bytes are not the csnap wire magic. Fatal.
    BadMagic,
    /// A protocol version this end does not speak. Fatal.
    BadVersion {
        /// The version field found.
        found: u16,
    },
    /// Fewer bytes than the frame's header or its length field says.
    /// [`peek_header`](crate::peek_header) and
    /// [`FrameReader`](crate::FrameReader) report this as "need more" instead.
    Truncated,
    /// The length field is over [`FRAME_MAX_BYTES`]. Fatal.
    TooLarge {
        /// The length field found.
        len: u32,
    },
    /// The length field is under [`HEADER_BYTES`]. Fatal.
    TooShort {
        /// The length field found.
        len: u32,
    },
    /// Nonzero header flags (version 1 defines none).
    BadFlags,
    /// A kind code this version does not define.
    UnknownKind {
        /// The kind field found.
        code: u16,
    },
    /// The body does not have the layout or values its kind requires.
    BadBody {
        /// The frame's kind.
        kind: Kind,
        /// What is wrong, for the log and the error text.
        what: &'static str,
    },
    /// [`decode`](crate::decode) was given more bytes than the frame's length
    /// field covers.
    TrailingBytes {
        /// The length field found.
        len: u32,
        /// Bytes given.
        have: usize,
    },
}

impl DecodeError {
    /// True when the stream cannot be cut into frames any more (bad magic or
    /// version, length out of bounds): the connection must be closed.
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::BadMagic
                | DecodeError::BadVersion { .. }
                | DecodeError::TooLarge { .. }
                | DecodeError::TooShort { .. }
        )
    }

    /// The error code to answer with.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadMagic => ErrorCode::BadMagic,
            DecodeError::BadVersion { .. } => ErrorCode::BadVersion,
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownKind { .. } => ErrorCode::UnknownKind,
            DecodeError::Truncated
            | DecodeError::TooShort { .. }
            | DecodeError::BadFlags
            | DecodeError::BadBody { .. }
            | DecodeError::TrailingBytes { .. } => ErrorCode::BadFrame,
        }
    }

    /// The kind code the error is about (the `culprit` of the `Error`
    /// answer), 0 when the kind is not known.
    #[must_use]
    pub fn culprit(&self) -> u16 {
        match self {
            DecodeError::UnknownKind { code } => *code,
            DecodeError::BadBody { kind, .. } => kind.code(),
            _ => 0,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadMagic => write!(f, "bad magic: not a csnap protocol frame"),
            DecodeError::BadVersion { found } => write!(
                f,
                "unsupported protocol version {found} (this end speaks version {PROTOCOL_VERSION})"
            ),
            DecodeError::Truncated => write!(f, "truncated frame"),
            DecodeError::TooLarge { len } => {
                write!(
                    f,
                    "frame length {len} is over the {FRAME_MAX_BYTES}-byte maximum"
                )
            }
            DecodeError::TooShort { len } => {
                write!(
                    f,
                    "frame length {len} is under the {HEADER_BYTES}-byte header"
                )
            }
            DecodeError::BadFlags => write!(f, "nonzero flags in the frame header"),
            DecodeError::UnknownKind { code } => write!(f, "unknown message kind {code:#06x}"),
            DecodeError::BadBody { kind, what } => write!(f, "malformed {kind} body: {what}"),
            DecodeError::TrailingBytes { len, have } => {
                write!(f, "{have} bytes given for a frame of {len} bytes")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is too small; nothing was written.
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A list builder already holds its maximum number of entries.
    ListFull {
        /// The maximum.
        max: usize,
    },
    /// A value the protocol does not allow (the same rule decoding enforces).
    Invalid {
        /// Which rule.
        what: &'static str,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall { need, have } => {
                write!(
                    f,
                    "output buffer of {have} bytes is too small, {need} needed"
                )
            }
            EncodeError::ListFull { max } => {
                write!(f, "list already holds its maximum of {max} entries")
            }
            EncodeError::Invalid { what } => write!(f, "cannot encode: {what}"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// A list that is not well formed (from [`List::parse`](crate::List::parse)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed {
    /// What is wrong.
    pub what: &'static str,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed list: {}", self.what)
    }
}

impl std::error::Error for Malformed {}
