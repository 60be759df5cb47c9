//! [`ErrorText`]: an `Error` message's text, formatted without allocation.

use core::fmt;

use crate::ERROR_TEXT_MAX_BYTES;

/// A fixed buffer for an `Error` message's text, written with `write!`.
/// Text past [`ERROR_TEXT_MAX_BYTES`] is dropped at a character boundary, so
/// formatting never fails and never allocates.
///
/// ```
/// use core::fmt::Write;
/// use csnap_proto::{DecodeError, ErrorText};
/// let mut t = ErrorText::new();
/// write!(t, "{}", DecodeError::UnknownKind { code: 0x77 }).unwrap();
/// assert_eq!(t.as_str(), "unknown message kind 0x0077");
/// ```
#[derive(Clone)]
pub struct ErrorText {
    buf: [u8; ERROR_TEXT_MAX_BYTES],
    len: usize,
    truncated: bool,
}

impl ErrorText {
    /// Empty text.
    #[must_use]
    pub const fn new() -> ErrorText {
        ErrorText {
            buf: [0; ERROR_TEXT_MAX_BYTES],
            len: 0,
            truncated: false,
        }
    }

    /// The text so far.
    #[must_use]
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// True when some text was dropped for lack of room.
    #[must_use]
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Empties the text.
    pub fn clear(&mut self) {
        self.len = 0;
        self.truncated = false;
    }
}

impl Default for ErrorText {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for ErrorText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = ERROR_TEXT_MAX_BYTES - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.truncated = true;
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ErrorText").field(&self.as_str()).finish()
    }
}
