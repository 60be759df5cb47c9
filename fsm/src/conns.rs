//! The connection table the control-plane state machines share (the
//! agent's socket, the controller's): a fixed table of slots, each with
//! its state and its output buffer, the queue of slots with output to
//! write and the queue of slots to close once written. Reserved at init.
//!
//! The owner decides what a slot's state means ([`SlotState`]); the table
//! only knows free, just accepted and closing. The driver side is the same
//! for every owner: `accept`, `poll_output`/`output`/`consume_output`,
//! `poll_close`.

use core::fmt::Write as _;
use core::ops::{Deref, DerefMut, Index, IndexMut};

use csnap_proto::{self as proto, DecodeError, ErrorText, Msg};

use crate::fixed::IdQueue;
use crate::outbuf::OutBuf;

/// The state of one slot, as its owner sees it.
pub trait SlotState: core::fmt::Debug {
    /// Unused.
    const FREE: Self;
    /// Just accepted: waits for the peer's `Hello`.
    const EXPECT_HELLO: Self;
    /// Whether the slot is unused.
    fn is_free(&self) -> bool;
    /// Whether the slot waits to be closed.
    fn is_closing(&self) -> bool;
    /// Marks the slot closed once its output is written (what else the
    /// owner keeps of it stays).
    fn set_closing(&mut self);
}

/// One slot: its state and its output. It dereferences to its state, so
/// an owner whose state is a struct reads its fields straight through.
#[derive(Debug)]
pub struct Slot<S> {
    /// What the owner knows of the connection.
    pub role: S,
    /// Frames waiting to be written.
    pub out: OutBuf,
}

/// A fixed table of connection slots with their output and close queues.
#[derive(Debug)]
pub struct ConnTable<S> {
    slots: Vec<Slot<S>>,
    output_q: IdQueue,
    close_q: IdQueue,
}

impl<S: SlotState> ConnTable<S> {
    /// Reserves `conns` slots of `out_bytes` of output each. The only
    /// allocation.
    pub fn new(conns: usize, out_bytes: usize) -> ConnTable<S> {
        let mut slots = Vec::with_capacity(conns);
        slots.resize_with(conns, || Slot {
            role: S::FREE,
            out: OutBuf::with_capacity(out_bytes),
        });
        ConnTable {
            slots,
            output_q: IdQueue::new(conns),
            close_q: IdQueue::new(conns),
        }
    }

    /// Slots reserved.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot is reserved.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slots in id order.
    pub fn iter(&self) -> core::slice::Iter<'_, Slot<S>> {
        self.slots.iter()
    }

    /// Takes a free slot for a new connection (it waits for `Hello`, its
    /// output empty); `None` when the table is full.
    pub fn accept(&mut self) -> Option<u32> {
        let i = self.slots.iter().position(|c| c.role.is_free())?;
        let c = &mut self.slots[i];
        c.role = S::EXPECT_HELLO;
        c.out.clear();
        u32::try_from(i).ok()
    }

    /// Whether `conn` is free or closing (no frame of it is handled).
    pub fn is_gone(&self, conn: u32) -> bool {
        let r = &self.slots[conn as usize].role;
        r.is_free() || r.is_closing()
    }

    /// Whether `conn` is open and has `room_bytes` of output free.
    pub fn wants_read(&self, conn: u32, room_bytes: usize) -> bool {
        !self.is_gone(conn) && self.out_free(conn) >= room_bytes
    }

    /// Bytes of `conn`'s output not taken.
    pub fn out_free(&self, conn: u32) -> usize {
        let c = &self.slots[conn as usize];
        c.out.capacity() - c.out.pending().len()
    }

    /// Encodes `msg` into `conn`'s output and queues `conn` for
    /// `poll_output`; `false` when it does not fit (the owner closes: the
    /// peer does not read).
    pub fn push_msg(
        &mut self,
        conn: u32,
        request_id: u64,
        incarnation: u64,
        msg: &Msg<'_>,
    ) -> bool {
        if self.slots[conn as usize]
            .out
            .push_msg(request_id, incarnation, msg)
        {
            self.output_q.push(conn);
            true
        } else {
            false
        }
    }

    /// Queues raw frame bytes for `conn` (see `push_msg`).
    pub fn push_bytes(&mut self, conn: u32, bytes: &[u8]) -> bool {
        if self.slots[conn as usize].out.push_bytes(bytes) {
            self.output_q.push(conn);
            true
        } else {
            false
        }
    }

    /// Marks `conn` closing and queues it for `poll_close` (a free slot
    /// stays free).
    pub fn close(&mut self, conn: u32) {
        let c = &mut self.slots[conn as usize];
        if c.role.is_free() {
            return;
        }
        c.role.set_closing();
        self.close_q.push(conn);
    }

    /// The next connection with output to write.
    pub fn poll_output(&mut self) -> Option<u32> {
        while let Some(c) = self.output_q.pop() {
            if !self.slots[c as usize].out.is_empty() {
                return Some(c);
            }
        }
        None
    }

    /// Bytes waiting for `conn`.
    pub fn output(&self, conn: u32) -> &[u8] {
        self.slots[conn as usize].out.pending()
    }

    /// `n` bytes of `output(conn)` were written.
    pub fn consume_output(&mut self, conn: u32, n: usize) {
        self.slots[conn as usize].out.consume(n);
    }

    /// Whether `conn` has unwritten output.
    pub fn has_output(&self, conn: u32) -> bool {
        !self.slots[conn as usize].out.is_empty()
    }

    /// The next connection to close once its output is written.
    pub fn poll_close(&mut self) -> Option<u32> {
        // An entry of a connection gone since (its slot maybe taken again)
        // is skipped.
        while let Some(c) = self.close_q.pop() {
            if self.slots[c as usize].role.is_closing() {
                return Some(c);
            }
        }
        None
    }
}

impl<S> Deref for Slot<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.role
    }
}

impl<S> DerefMut for Slot<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.role
    }
}

impl<S> Index<usize> for ConnTable<S> {
    type Output = Slot<S>;
    fn index(&self, i: usize) -> &Slot<S> {
        &self.slots[i]
    }
}

impl<S> IndexMut<usize> for ConnTable<S> {
    fn index_mut(&mut self, i: usize) -> &mut Slot<S> {
        &mut self.slots[i]
    }
}

impl<'a, S> IntoIterator for &'a ConnTable<S> {
    type Item = &'a Slot<S>;
    type IntoIter = core::slice::Iter<'a, Slot<S>>;
    fn into_iter(self) -> Self::IntoIter {
        self.slots.iter()
    }
}

impl<'a, S> IntoIterator for &'a mut ConnTable<S> {
    type Item = &'a mut Slot<S>;
    type IntoIter = core::slice::IterMut<'a, Slot<S>>;
    fn into_iter(self) -> Self::IntoIter {
        self.slots.iter_mut()
    }
}

/// The frame inputs of an FSM's connections, the same for every FSM:
/// expands, inside the FSM's `impl`, to `handle_bad_stream` (answer with
/// an error, close) and `handle_frame` (frames of a free or closing
/// connection are ignored; a frame that does not decode is answered with
/// an error, and the connection closed when the error is fatal; a decoded
/// one goes to `self.$on_msg(conn, request_id, &msg)`), and `send_error`.
/// The FSM provides `send`, `close` and `assert_invariants`.
macro_rules! frame_api {
    ($id:ty, $table:ident, $on_msg:ident) => {
        /// The frame reader of `conn` failed: garbage, a bad version, or a
        /// frame over the maximum. Answers with an error and closes.
        pub fn handle_bad_stream(&mut self, conn: $id, err: &csnap_proto::DecodeError) {
            let t = $crate::conns::bad_stream_text(err);
            self.send_error(conn, 0, err.code(), err.culprit(), t.as_str());
            self.close(conn);
            self.assert_invariants();
        }

        /// Queues an `Error` for `conn`.
        pub(crate) fn send_error(
            &mut self,
            conn: $id,
            rid: u64,
            code: csnap_proto::ErrorCode,
            culprit: u16,
            text: &str,
        ) {
            self.send(
                conn,
                rid,
                &csnap_proto::Msg::Error {
                    code,
                    culprit,
                    text,
                },
            );
        }

        /// Answers a `Hello` offering `min..=max`, the one handshake rule of
        /// every FSM's connections: `HelloOk` (with `server_id`) and true;
        /// or, after `BadVersion` (naming both ranges), or `Unsupported`
        /// with `refusal` (a role this side does not take), false with
        /// `conn` closed.
        pub(crate) fn answer_hello(
            &mut self,
            conn: $id,
            rid: u64,
            (min, max): (u16, u16),
            refusal: Option<&'static str>,
            server_id: u64,
        ) -> bool {
            let culprit = csnap_proto::Kind::Hello.code();
            let Some(version) = csnap_proto::negotiate(min, max) else {
                let mut t = csnap_proto::ErrorText::new();
                let _ = core::fmt::Write::write_fmt(
                    &mut t,
                    format_args!(
                        "no common protocol version: the peer speaks {min}..={max}, this side speaks {}",
                        csnap_proto::PROTOCOL_VERSION
                    ),
                );
                self.send_error(conn, rid, csnap_proto::ErrorCode::BadVersion, culprit, t.as_str());
                self.close(conn);
                return false;
            };
            if let Some(why) = refusal {
                self.send_error(conn, rid, csnap_proto::ErrorCode::Unsupported, culprit, why);
                self.close(conn);
                return false;
            }
            self.send(
                conn,
                rid,
                &csnap_proto::Msg::HelloOk { version, server_id },
            );
            true
        }

        /// Answers a message out of the handshake's order: anything but
        /// `Hello` while one is `expected`, or a second `Hello`.
        pub(crate) fn refuse_hello_order(
            &mut self,
            conn: $id,
            rid: u64,
            kind: csnap_proto::Kind,
            expected: bool,
        ) {
            let (code, text) = if expected {
                (csnap_proto::ErrorCode::NotIdentified, "send Hello first")
            } else {
                (
                    csnap_proto::ErrorCode::AlreadyIdentified,
                    "Hello was already received on this connection",
                )
            };
            self.send_error(conn, rid, code, kind.code(), text);
        }

        /// A complete frame from `conn`.
        pub fn handle_frame(&mut self, conn: $id, frame: &[u8]) {
            if self.$table.is_gone(conn) {
                return;
            }
            match csnap_proto::decode(frame) {
                Ok((hdr, msg)) => self.$on_msg(conn, hdr.request_id, &msg),
                Err(e) => {
                    let (rid, t) = $crate::conns::decode_error_reply(frame, &e);
                    self.send_error(conn, rid, e.code(), e.culprit(), t.as_str());
                    if e.is_fatal() {
                        self.close(conn);
                    }
                }
            }
            self.assert_invariants();
        }
    };
}
pub(crate) use frame_api;

/// The driver's side of an FSM's connection table, the same for every FSM:
/// expands, inside the FSM's `impl`, to `poll_output`, `output`,
/// `consume_output`, `has_output` and `poll_close` over `self.$table`.
macro_rules! driver_api {
    ($id:ty, $table:ident) => {
        /// The next connection with output to write.
        #[must_use]
        pub fn poll_output(&mut self) -> Option<$id> {
            self.$table.poll_output()
        }

        /// Bytes waiting to be written to `conn`.
        pub fn output(&self, conn: $id) -> &[u8] {
            self.$table.output(conn)
        }

        /// `n` bytes of `output(conn)` were written; if some remain, the
        /// connection stays queued for `poll_output`.
        pub fn consume_output(&mut self, conn: $id, n: usize) {
            self.$table.consume_output(conn, n);
        }

        /// Whether `conn` has unwritten output.
        pub fn has_output(&self, conn: $id) -> bool {
            self.$table.has_output(conn)
        }

        /// The next connection to close once its output is written.
        #[must_use]
        pub fn poll_close(&mut self) -> Option<$id> {
            self.$table.poll_close()
        }
    };
}
pub(crate) use driver_api;

/// The text of the error sent before closing a connection whose frame
/// reader failed (garbage, a bad version, a frame over the maximum).
pub fn bad_stream_text(err: &DecodeError) -> ErrorText {
    let mut t = ErrorText::new();
    let _ = write!(t, "{err}; closing the connection");
    t
}

/// The error answer to a frame that does not decode: the request id it
/// answers (0 when the header is unreadable) and its text. The owner
/// sends it and closes when `err.is_fatal()`.
pub fn decode_error_reply(frame: &[u8], err: &DecodeError) -> (u64, ErrorText) {
    let request_id = proto::peek_header(frame)
        .ok()
        .flatten()
        .map_or(0, |h| h.request_id);
    let mut t = ErrorText::new();
    let _ = write!(t, "{err}");
    (request_id, t)
}
