//! The connection table every process loop shares (the server, the agent,
//! the controller): its listeners (unix and TCP) and a fixed table of
//! framed connections, driven over mio, that feeds a sans-IO session state
//! machine (`Sessions`; the FSM side is `csnap_fsm::conns::ConnTable`).
//!
//! Everything is reserved in `ConnTable::new`; accepting, reading and
//! writing allocate nothing. A connection the state machine does not want
//! to read from (`wants_read` false: its output is backed up) is paused, so
//! a peer that does not read its replies is throttled, then dropped by the
//! state machine, never buffered without bound.

use std::io::{self, Read, Write};

use csnap_fsm::agent::AgentFsm;
use csnap_fsm::cluster::Controller;
use csnap_fsm::server::Server;
use csnap_proto::{DecodeError, FrameReader, FRAME_MAX_BYTES};
use mio::{Interest, Registry, Token};

use crate::net::{MioListener, MioStream};

/// Token of the first listener; listener `i` has `LISTENER_BASE + i`.
/// Above every connection token, below the loops' own tokens
/// (`usize::MAX - 2` is the agent's bus link, the server's agent link;
/// `usize::MAX - 1` the server's waker).
pub const LISTENER_BASE: usize = usize::MAX - 64;
/// Listeners a table can have (their tokens stay below the loops' own).
pub const LISTENERS_MAX: usize = 61;
const _: () = assert!(LISTENER_BASE + LISTENERS_MAX < usize::MAX - 2);
const _: () = assert!(csnap_pools::CONTROLLER_LISTENERS_MAX <= LISTENERS_MAX);
const _: () = assert!(csnap_pools::CLIENTS_MAX < LISTENER_BASE);
const _: () = assert!(csnap_pools::CONTROLLER_LISTENERS_MAX < 60);
const _: () = assert!(csnap_pools::AGENT_CONNS_MAX < LISTENER_BASE);
const _: () = assert!(csnap_pools::CONTROLLER_CONNS_MAX < LISTENER_BASE);

/// What the table drives: the connection half of a session state machine.
pub trait Sessions {
    /// A new connection; `None` when the table is full.
    fn accept(&mut self) -> Option<u32>;
    /// Whether to hand over more frames of `c`.
    fn wants_read(&self, c: u32) -> bool;
    /// A complete frame of `c`.
    fn frame(&mut self, c: u32, f: &[u8]);
    /// The stream of `c` cannot be cut into frames any more.
    fn bad_stream(&mut self, c: u32, e: &DecodeError);
    /// `c` closed or failed.
    fn disconnect(&mut self, c: u32);
    /// The next connection with output.
    fn poll_output(&mut self) -> Option<u32>;
    /// The output of `c`.
    fn output(&self, c: u32) -> &[u8];
    /// `n` bytes of `c`'s output were written.
    fn consume_output(&mut self, c: u32, n: usize);
    /// Whether `c` has output left.
    fn has_output(&self, c: u32) -> bool;
    /// The next connection to close once its output is written.
    fn poll_close(&mut self) -> Option<u32>;
    /// The frame written, best effort, to a connection refused because
    /// the table is full (its length in `out`; 0: closed without a word).
    fn refusal(&self, out: &mut [u8]) -> usize {
        let _ = out;
        0
    }
}

macro_rules! sessions_for {
    ($t:ty) => {
        impl Sessions for $t {
            fn accept(&mut self) -> Option<u32> {
                self.handle_accept()
            }
            fn wants_read(&self, c: u32) -> bool {
                <$t>::wants_read(self, c)
            }
            fn frame(&mut self, c: u32, f: &[u8]) {
                self.handle_frame(c, f);
            }
            fn bad_stream(&mut self, c: u32, e: &DecodeError) {
                self.handle_bad_stream(c, e);
            }
            fn disconnect(&mut self, c: u32) {
                self.handle_disconnect(c);
            }
            fn poll_output(&mut self) -> Option<u32> {
                <$t>::poll_output(self)
            }
            fn output(&self, c: u32) -> &[u8] {
                <$t>::output(self, c)
            }
            fn consume_output(&mut self, c: u32, n: usize) {
                <$t>::consume_output(self, c, n);
            }
            fn has_output(&self, c: u32) -> bool {
                <$t>::has_output(self, c)
            }
            fn poll_close(&mut self) -> Option<u32> {
                <$t>::poll_close(self)
            }
        }
    };
}

sessions_for!(AgentFsm);
sessions_for!(Controller);

impl Sessions for Server {
    fn accept(&mut self) -> Option<u32> {
        self.handle_accept()
    }
    fn wants_read(&self, c: u32) -> bool {
        Server::wants_read(self, c)
    }
    fn frame(&mut self, c: u32, f: &[u8]) {
        self.handle_frame(c, f);
    }
    fn bad_stream(&mut self, c: u32, e: &DecodeError) {
        self.handle_bad_stream(c, e);
    }
    fn disconnect(&mut self, c: u32) {
        self.handle_disconnect(c);
    }
    fn poll_output(&mut self) -> Option<u32> {
        Server::poll_output(self)
    }
    fn output(&self, c: u32) -> &[u8] {
        Server::output(self, c)
    }
    fn consume_output(&mut self, c: u32, n: usize) {
        Server::consume_output(self, c, n);
    }
    fn has_output(&self, c: u32) -> bool {
        Server::has_output(self, c)
    }
    fn poll_close(&mut self) -> Option<u32> {
        Server::poll_close(self)
    }
    fn refusal(&self, out: &mut [u8]) -> usize {
        self.too_many_clients_frame(out)
    }
}

/// A process loop's listeners, registered at `LISTENER_BASE + i`. Every
/// loop accepts through one: the framed tables below (server, agent,
/// controller) and the NBD server's slot table (`io/src/nbd/server.rs`).
pub struct Listeners {
    list: Vec<MioListener>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("len", &self.list.len())
            .finish()
    }
}

impl Listeners {
    /// Registers `list` for reading, refused unless its length is within
    /// `allowed` (and `LISTENERS_MAX`). The vector is the only allocation.
    pub fn register(
        mut list: Vec<MioListener>,
        registry: &Registry,
        allowed: core::ops::RangeInclusive<usize>,
    ) -> io::Result<Listeners> {
        let max = (*allowed.end()).min(LISTENERS_MAX);
        if list.len() < *allowed.start() || list.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} listen addresses ({} to {max})",
                    list.len(),
                    allowed.start()
                ),
            ));
        }
        for (i, l) in list.iter_mut().enumerate() {
            registry.register(l, Token(LISTENER_BASE + i), Interest::READABLE)?;
        }
        Ok(Listeners { list })
    }

    /// The listener a token names, if it is one of these.
    pub fn index(&self, t: Token) -> Option<usize> {
        t.0.checked_sub(LISTENER_BASE)
            .filter(|&i| i < self.list.len())
    }

    /// The next waiting connection of listener `i`; `None` when none waits
    /// (or accepting failed: the loop goes on serving the others).
    pub fn accept(&self, i: usize) -> Option<MioStream> {
        let l = self.list.get(i)?;
        loop {
            match l.accept() {
                Ok(s) => return Some(s),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    /// The addresses listened on (TCP ports resolved).
    pub fn local_addrs(&self) -> impl Iterator<Item = crate::net::Addr> + '_ {
        self.list.iter().filter_map(|l| l.local_addr().ok())
    }

    /// Stops accepting: every listener leaves the poll (shutdown).
    pub fn deregister(&mut self, registry: &Registry) {
        for l in &mut self.list {
            let _ = registry.deregister(l);
        }
    }

    /// Removes the unix listeners' socket files. Frees nothing.
    pub fn remove_socket_files(&self) {
        for l in &self.list {
            l.remove_socket_file();
        }
    }
}

struct Conn {
    closing: bool,
    paused: bool,
}

/// What one read or write of a [`Streams`] entry came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamIo {
    /// That many bytes moved (never 0).
    Moved(usize),
    /// The peer closed: a read of 0 bytes, or a write that took none.
    Closed,
    /// Nothing now; the next readiness event says when.
    WouldBlock,
    /// The socket failed (the entry is no good any more), or there is no
    /// stream at that index.
    Failed,
}

/// The mio side of every process loop's connections: a fixed table of
/// accepted streams, each registered under the token its loop gives it,
/// read and written through one error mapping (`EINTR` retried,
/// `WouldBlock` kept apart from end of stream and failure) and closed
/// through one deregistration. The framed [`ConnTable`] keeps its
/// connections here (token = index), the NBD server its clients'
/// connections (`io/src/nbd/server.rs`, token = slot × tokens per slot);
/// what each loop keeps per connection besides (a frame reader and the
/// pause and close flags; an NBD session and its buffers) stays its own.
pub struct Streams {
    slots: Vec<Option<MioStream>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("capacity", &self.slots.len())
            .field("open", &self.slots.iter().filter(|s| s.is_some()).count())
            .finish()
    }
}

impl Streams {
    /// Room for `n` streams, reserved here (the only allocation).
    pub fn new(n: usize) -> Streams {
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, || None);
        Streams { slots }
    }

    /// Registers `stream` for reading and writing under `token` and keeps
    /// it at `i` (which must be free); `false` (the stream dropped, so
    /// closed) when the registration failed.
    pub fn open(
        &mut self,
        i: usize,
        mut stream: MioStream,
        token: Token,
        registry: &Registry,
    ) -> bool {
        assert!(
            self.slots.get(i).is_some_and(Option::is_none),
            "stream slot {i} is free"
        );
        if registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            return false;
        }
        self.slots[i] = Some(stream);
        true
    }

    /// Whether a stream is kept at `i`.
    pub fn is_open(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(Option::is_some)
    }

    /// Reads into `buf` from the stream at `i`.
    pub fn read(&mut self, i: usize, buf: &mut [u8]) -> StreamIo {
        let empty = buf.is_empty();
        self.transfer(i, empty, |s| s.read(buf))
    }

    /// Writes from `buf` to the stream at `i`.
    pub fn write(&mut self, i: usize, buf: &[u8]) -> StreamIo {
        self.transfer(i, buf.is_empty(), |s| s.write(buf))
    }

    /// Writes `bufs` in order to the stream at `i` in one call (`writev`):
    /// several replies at once.
    pub fn write_vectored(&mut self, i: usize, bufs: &[io::IoSlice<'_>]) -> StreamIo {
        let empty = bufs.iter().all(|b| b.is_empty());
        self.transfer(i, empty, |s| s.write_vectored(bufs))
    }

    /// One read or write, `EINTR` retried, its result mapped once for
    /// every loop (`empty`: nothing was asked for, so 0 bytes is no end).
    fn transfer(
        &mut self,
        i: usize,
        empty: bool,
        mut op: impl FnMut(&mut MioStream) -> io::Result<usize>,
    ) -> StreamIo {
        let Some(s) = self.slots.get_mut(i).and_then(Option::as_mut) else {
            return StreamIo::Failed;
        };
        loop {
            return match op(s) {
                Ok(0) if !empty => StreamIo::Closed,
                Ok(0) => StreamIo::WouldBlock,
                Ok(n) => StreamIo::Moved(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => StreamIo::WouldBlock,
                Err(_) => StreamIo::Failed,
            };
        }
    }

    /// Deregisters and closes the stream at `i`, if any.
    pub fn close(&mut self, i: usize, registry: &Registry) {
        if let Some(mut s) = self.slots.get_mut(i).and_then(Option::take) {
            let _ = registry.deregister(&mut s);
        }
    }
}

/// Listeners and their connections.
pub struct ConnTable {
    listeners: Listeners,
    /// The connections' streams (token = index).
    streams: Streams,
    /// Per open connection: whether it is closing, whether reading paused.
    conns: Vec<Option<Conn>>,
    readers: Vec<FrameReader<Box<[u8]>>>,
    refuse_buf: [u8; 512],
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable")
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl ConnTable {
    /// Registers `listeners` (as many as `allowed` says, within
    /// `LISTENERS_MAX`) and reserves `n` connections (a frame reader each).
    /// The only allocation.
    pub fn new(
        listeners: Vec<MioListener>,
        n: usize,
        registry: &Registry,
        allowed: core::ops::RangeInclusive<usize>,
    ) -> io::Result<ConnTable> {
        let listeners = Listeners::register(listeners, registry, allowed)?;
        let mut conns = Vec::with_capacity(n);
        conns.resize_with(n, || None);
        let readers = (0..n)
            .map(|_| FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice()))
            .collect();
        Ok(ConnTable {
            listeners,
            streams: Streams::new(n),
            conns,
            readers,
            refuse_buf: [0u8; 512],
        })
    }

    /// The addresses listened on (TCP ports resolved), for the start line.
    pub fn local_addrs(&self) -> impl Iterator<Item = crate::net::Addr> + '_ {
        self.listeners.local_addrs()
    }

    /// Bytes reserved for `n` connections.
    pub fn reserved_bytes(n: usize) -> usize {
        n * FRAME_MAX_BYTES
    }

    /// Whether `t` is one of the table's connection tokens.
    pub fn owns(&self, t: Token) -> bool {
        t.0 < self.conns.len()
    }

    /// Handles a readiness event of the listener or a connection.
    pub fn on_event(
        &mut self,
        fsm: &mut dyn Sessions,
        registry: &Registry,
        token: Token,
        readable: bool,
        writable: bool,
        closed: bool,
    ) {
        if let Some(i) = self.listeners.index(token) {
            self.accept(fsm, registry, i);
            return;
        }
        if token.0 >= LISTENER_BASE {
            return;
        }
        let Ok(c) = u32::try_from(token.0) else {
            return;
        };
        if readable || closed {
            self.read(fsm, registry, c);
        }
        if writable {
            self.write(fsm, registry, c);
        }
    }

    fn accept(&mut self, fsm: &mut dyn Sessions, registry: &Registry, listener: usize) {
        loop {
            let Some(mut stream) = self.listeners.accept(listener) else {
                return;
            };
            let Some(c) = fsm.accept() else {
                // Table full: the peer gets the refusal, if any, best
                // effort, and sees its connection closed.
                let n = fsm.refusal(&mut self.refuse_buf);
                if n > 0 {
                    let _ = stream.write(&self.refuse_buf[..n]);
                }
                continue;
            };
            if !self
                .streams
                .open(c as usize, stream, Token(c as usize), registry)
            {
                fsm.disconnect(c);
                continue;
            }
            self.readers[c as usize].clear();
            self.conns[c as usize] = Some(Conn {
                closing: false,
                paused: false,
            });
            self.read(fsm, registry, c);
        }
    }

    fn read(&mut self, fsm: &mut dyn Sessions, registry: &Registry, c: u32) {
        let ci = c as usize;
        loop {
            loop {
                if !fsm.wants_read(c) {
                    if let Some(k) = self.conns[ci].as_mut() {
                        k.paused = true;
                    }
                    return;
                }
                match self.readers[ci].next_frame() {
                    Ok(Some(f)) => fsm.frame(c, f),
                    Ok(None) => break,
                    Err(e) => {
                        fsm.bad_stream(c, &e);
                        return;
                    }
                }
            }
            let Some(k) = self.conns[ci].as_mut() else {
                return;
            };
            if k.closing {
                return;
            }
            match self.streams.read(ci, self.readers[ci].spare()) {
                StreamIo::Moved(n) => self.readers[ci].advance(n),
                StreamIo::WouldBlock => {
                    k.paused = false;
                    return;
                }
                StreamIo::Closed | StreamIo::Failed => {
                    self.drop_conn(fsm, registry, c);
                    return;
                }
            }
        }
    }

    fn write(&mut self, fsm: &mut dyn Sessions, registry: &Registry, c: u32) {
        let ci = c as usize;
        while fsm.has_output(c) {
            if self.conns[ci].is_none() {
                return;
            }
            match self.streams.write(ci, fsm.output(c)) {
                StreamIo::Moved(n) => fsm.consume_output(c, n),
                StreamIo::WouldBlock => return,
                StreamIo::Closed | StreamIo::Failed => {
                    self.drop_conn(fsm, registry, c);
                    return;
                }
            }
        }
        if self.conns[ci].as_ref().is_some_and(|k| k.closing) {
            self.drop_conn(fsm, registry, c);
        }
    }

    fn drop_conn(&mut self, fsm: &mut dyn Sessions, registry: &Registry, c: u32) {
        if self.conns[c as usize].take().is_some() {
            self.streams.close(c as usize, registry);
            fsm.disconnect(c);
            self.readers[c as usize].clear();
        }
    }

    /// Writes what the state machine queued, closes what it closed, and
    /// resumes paused connections it wants to read again.
    pub fn pump(&mut self, fsm: &mut dyn Sessions, registry: &Registry) {
        self.write_queued(fsm, registry);
        self.resume_paused(fsm, registry);
    }

    /// Writes what the state machine queued and closes what it closed.
    pub fn write_queued(&mut self, fsm: &mut dyn Sessions, registry: &Registry) {
        while let Some(c) = fsm.poll_output() {
            self.write(fsm, registry, c);
        }
        while let Some(c) = fsm.poll_close() {
            if let Some(k) = self.conns[c as usize].as_mut() {
                k.closing = true;
            }
            self.write(fsm, registry, c);
            if self.conns[c as usize].is_none() {
                continue;
            }
            if !fsm.has_output(c) {
                self.drop_conn(fsm, registry, c);
            }
        }
    }

    /// Reads again from paused connections the state machine wants to
    /// read now (their output drained).
    pub fn resume_paused(&mut self, fsm: &mut dyn Sessions, registry: &Registry) {
        for ci in 0..self.conns.len() {
            let paused = self.conns[ci]
                .as_ref()
                .is_some_and(|k| k.paused && !k.closing);
            if paused {
                let c = u32::try_from(ci).unwrap_or(u32::MAX);
                if fsm.wants_read(c) {
                    if let Some(k) = self.conns[ci].as_mut() {
                        k.paused = false;
                    }
                    self.read(fsm, registry, c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::Poll;

    /// One mapping for every loop: bytes move, an empty socket would
    /// block, a peer's close is `Closed` (not a failure), a closed entry
    /// is gone, and an index with no stream fails rather than panics.
    #[test]
    fn a_stream_entry_reads_writes_and_closes_through_one_mapping() {
        let poll = Poll::new().expect("poll");
        let (a, mut peer) = mio::net::UnixStream::pair().expect("pair");
        let mut t = Streams::new(2);
        assert!(!t.is_open(1));
        assert!(t.open(1, MioStream::Unix(a), Token(7), poll.registry()));
        assert!(t.is_open(1));
        let mut buf = [0u8; 8];
        assert_eq!(t.read(1, &mut buf), StreamIo::WouldBlock);
        assert_eq!(t.write(1, b"ping"), StreamIo::Moved(4));
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).expect("peer reads");
        assert_eq!(&got, b"ping");
        peer.write_all(b"pong").expect("peer writes");
        assert_eq!(t.read(1, &mut buf), StreamIo::Moved(4));
        assert_eq!(&buf[..4], b"pong");
        assert_eq!(t.read(1, &mut []), StreamIo::WouldBlock, "nothing asked");
        drop(peer);
        assert_eq!(t.read(1, &mut buf), StreamIo::Closed);
        assert_eq!(t.read(0, &mut buf), StreamIo::Failed, "no stream there");
        assert_eq!(t.write(0, b"x"), StreamIo::Failed);
        t.close(1, poll.registry());
        assert!(!t.is_open(1));
        assert_eq!(t.write(1, b"x"), StreamIo::Failed);
        t.close(1, poll.registry());
    }
}
