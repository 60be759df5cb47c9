//! The 32-byte frame header and [`peek_header`], which checks it as its
//! bytes arrive.

use super::Kind;
use crate::error::DecodeError;
use crate::wire::{get_u16, get_u32, get_u64};
use crate::{FRAME_MAX_BYTES, HEADER_BYTES, MAGIC, PROTOCOL_VERSION};

pub(super) const OFF_MAGIC: usize = 0;
pub(super) const OFF_VERSION: usize = 4;
pub(super) const OFF_KIND: usize = 6;
pub(super) const OFF_LENGTH: usize = 8;
pub(super) const OFF_FLAGS: usize = 12;
pub(super) const OFF_REQUEST_ID: usize = 16;
pub(super) const OFF_INCARNATION: usize = 24;

/// The 32-byte frame header.
///
/// On decode every field is as found (`kind` raw, so an unknown kind can be
/// answered with its code). On encode `kind` and `length` are ignored (taken
/// from the message and computed), `version` must be [`PROTOCOL_VERSION`] and
/// `flags` 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Protocol version.
    pub version: u16,
    /// Raw kind code; see [`Header::known_kind`].
    pub kind: u16,
    /// Whole frame length, header included.
    pub length: u32,
    /// Flags; none defined, must be 0.
    pub flags: u32,
    /// Chosen by the requester, echoed by the reply.
    pub request_id: u64,
    /// The server's incarnation in server frames, 0 in client frames.
    pub incarnation: u64,
}

impl Header {
    /// A header to encode with: current version, no flags. Clients pass
    /// incarnation 0.
    #[must_use]
    pub const fn new(request_id: u64, incarnation: u64) -> Header {
        Header {
            version: PROTOCOL_VERSION,
            kind: 0,
            length: 0,
            flags: 0,
            request_id,
            incarnation,
        }
    }

    /// The kind, when this version defines the code.
    #[must_use]
    pub const fn known_kind(&self) -> Option<Kind> {
        Kind::from_u16(self.kind)
    }
}

/// Validates as much of a header as `buf` holds and returns it once all 32
/// bytes are there.
///
/// Checked as soon as present: the magic (byte by byte), the version (6
/// bytes), the length bounds (12 bytes). So garbage or an oversized frame is
/// rejected before its body (or even its whole header) arrives. `Ok(None)`
/// means "valid so far, need more bytes". Kind, flags and body are checked
/// by [`decode`].
pub fn peek_header(buf: &[u8]) -> Result<Option<Header>, DecodeError> {
    let magic = MAGIC.to_le_bytes();
    let n = buf.len().min(magic.len());
    if buf[..n] != magic[..n] {
        return Err(DecodeError::BadMagic);
    }
    if buf.len() >= OFF_VERSION + 2 {
        let version = get_u16(buf, OFF_VERSION);
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::BadVersion { found: version });
        }
    }
    if buf.len() >= OFF_LENGTH + 4 {
        let len = get_u32(buf, OFF_LENGTH);
        if (len as usize) < HEADER_BYTES {
            return Err(DecodeError::TooShort { len });
        }
        if len as usize > FRAME_MAX_BYTES {
            return Err(DecodeError::TooLarge { len });
        }
    }
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    Ok(Some(Header {
        version: get_u16(buf, OFF_VERSION),
        kind: get_u16(buf, OFF_KIND),
        length: get_u32(buf, OFF_LENGTH),
        flags: get_u32(buf, OFF_FLAGS),
        request_id: get_u64(buf, OFF_REQUEST_ID),
        incarnation: get_u64(buf, OFF_INCARNATION),
    }))
}
