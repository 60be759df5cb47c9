//! Cutting a received byte stream into frames, in a caller-provided buffer.

use core::fmt;

use crate::error::DecodeError;
use crate::msg::peek_header;
use crate::FRAME_MAX_BYTES;

/// Accumulates bytes from a stream socket and pops complete frames, one at a
/// time, without allocation.
///
/// The buffer `B` is any `AsRef<[u8]> + AsMut<[u8]>` (`&mut [u8]`,
/// `Box<[u8]>`, `[u8; N]`, a pool slot type) of at least [`FRAME_MAX_BYTES`],
/// so any valid frame fits; it is set up once and reused for every frame of
/// the connection. Use:
///
/// 1. [`spare`](FrameReader::spare): the free space; read the socket into it.
/// 2. [`advance`](FrameReader::advance) by the bytes read.
/// 3. [`next_frame`](FrameReader::next_frame) until it returns `Ok(None)`;
///    hand each frame to [`decode`](crate::decode).
///
/// `next_frame` returns a fatal [`DecodeError`] (bad magic or version, length
/// out of bounds) as soon as the offending header bytes are in, without
/// waiting for the body; the connection must then be closed. The reader keeps
/// returning that error.
///
/// ```
/// use csnap_proto::{encode, FrameReader, Header, Msg, FRAME_MAX_BYTES};
/// let mut out = [0u8; 64];
/// let n = encode(&Header::new(7, 0), &Msg::Status, &mut out).unwrap();
/// let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice());
/// r.spare()[..n].copy_from_slice(&out[..n]);
/// r.advance(n);
/// let frame = r.next_frame().unwrap().unwrap();
/// assert_eq!(frame, &out[..n]);
/// assert_eq!(r.next_frame(), Ok(None));
/// ```
pub struct FrameReader<B> {
    buf: B,
    /// Start of the first unconsumed byte.
    start: usize,
    /// End of the received bytes.
    end: usize,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> FrameReader<B> {
    /// A reader over `buf`.
    ///
    /// # Panics
    ///
    /// When `buf` is shorter than [`FRAME_MAX_BYTES`] (a setup error, not an
    /// input error).
    pub fn new(buf: B) -> Self {
        assert!(
            buf.as_ref().len() >= FRAME_MAX_BYTES,
            "FrameReader buffer must hold FRAME_MAX_BYTES"
        );
        FrameReader {
            buf,
            start: 0,
            end: 0,
        }
    }

    /// The free space after the received bytes, to read into. Moves any
    /// leftover partial frame to the front of the buffer first, so the free
    /// space is never smaller than what the next frame still needs.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.as_mut().copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end;
        &mut self.buf.as_mut()[end..]
    }

    /// Records that `n` bytes were read into [`spare`](FrameReader::spare).
    ///
    /// # Panics
    ///
    /// When `n` is more than the spare space (a caller bug).
    pub fn advance(&mut self, n: usize) {
        let cap = self.buf.as_ref().len();
        assert!(n <= cap - self.end, "FrameReader::advance past the buffer");
        self.end += n;
    }

    /// Pops the next complete frame, `Ok(None)` when more bytes are needed.
    /// The frame is valid until the next call on the reader; it has a valid
    /// header (magic, version, length) but its kind and body are unchecked.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        let pending = &self.buf.as_ref()[self.start..self.end];
        let Some(hdr) = peek_header(pending)? else {
            return Ok(None);
        };
        let len = hdr.length as usize;
        if pending.len() < len {
            return Ok(None);
        }
        let at = self.start;
        self.start += len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(&self.buf.as_ref()[at..at + len]))
    }

    /// Received bytes not yet popped as frames.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Drops every buffered byte (for reuse on a new connection).
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// The buffer back.
    pub fn into_inner(self) -> B {
        self.buf
    }
}

impl<B> fmt::Debug for FrameReader<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReader")
            .field("start", &self.start)
            .field("end", &self.end)
            .finish()
    }
}
