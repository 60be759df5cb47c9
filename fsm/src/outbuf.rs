//! A fixed output queue of encoded frames for one connection, reserved at
//! init: frames are encoded straight into its spare room, the driver writes
//! `pending()` and reports what it wrote with `consume`. A frame that does
//! not fit is refused (`false`): the caller closes the connection rather
//! than growing the buffer.

use csnap_proto::{self as proto, Header, Msg};

/// One connection's output queue.
#[derive(Debug)]
pub struct OutBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl OutBuf {
    /// Reserves `capacity_bytes`. The only allocation.
    pub fn with_capacity(capacity_bytes: usize) -> OutBuf {
        OutBuf {
            buf: vec![0u8; capacity_bytes],
            start: 0,
            end: 0,
        }
    }

    /// Bytes reserved.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Discards everything queued.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Bytes waiting to be written.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Whether anything waits.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// `n` bytes of `pending()` were written.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        assert!(self.start <= self.end, "consumed more than was pending");
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends an encoded frame; `false` if it does not fit (nothing is
    /// queued then).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> bool {
        if self.end + bytes.len() > self.buf.len() {
            // Compact: move what is pending to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end + bytes.len() > self.buf.len() {
            return false;
        }
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
        true
    }

    /// Encodes `msg` at the end of the queue; `false` if it does not fit
    /// (nothing is queued then).
    pub fn push_msg(&mut self, request_id: u64, incarnation: u64, msg: &Msg<'_>) -> bool {
        let need = msg.frame_bytes();
        if self.end + need > self.buf.len() {
            // Compact: move what is pending to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end + need > self.buf.len() {
            return false;
        }
        match proto::encode(
            &Header::new(request_id, incarnation),
            msg,
            &mut self.buf[self.end..],
        ) {
            Ok(n) => {
                self.end += n;
                assert!(self.end <= self.buf.len());
                true
            }
            Err(_) => false,
        }
    }
}
