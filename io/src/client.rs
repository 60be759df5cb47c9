//! Blocking clients over the `ClientFsm`: a control connection (snapshot
//! management, status) and a volume (the block device: origin or one
//! snapshot), which does its data I/O on the shared origin and store devices
//! itself and asks the server only for metadata.
//!
//! A volume reads and writes at any byte offset and length: requests are split
//! at chunk boundaries into queries of at most `CHUNKS_PER_REQUEST_MAX` chunks.
//! - origin read: straight from the origin device;
//! - origin write: `QueryOriginWrite` (the server copies out what snapshots
//!   need and waits for read locks), then the write;
//! - snapshot read: `QuerySnapshotRead`, then each run from the store or (under
//!   a read lock) the origin, then `FinishSnapshotRead` for the origin runs;
//! - snapshot write: `QuerySnapshotWrite` (chunks of its own), then the write
//!   into the store;
//! - flush: fdatasync of both devices.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use csnap_fsm::client::{ClientConfig, ClientEvent, ClientFsm, ClientState, Request};
use csnap_pools::CHUNKS_PER_REQUEST_MAX;
use csnap_proto::{self as proto, ErrorCode, FrameReader, Msg, Range, Role, TargetKind, Volume};

use crate::net::{Addr, BlockingStream};

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// A socket or device error.
    Io(io::Error),
    /// The server answered with an error.
    Server {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
    /// The server sent something that makes no sense here.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Server { code, text } => {
                write!(
                    f,
                    "server refused: {text} ({}, code {})",
                    code.name(),
                    code.code()
                )
            }
            ClientError::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}

/// A connection to a server.
#[derive(Debug)]
pub struct Connection {
    stream: BlockingStream,
    reader: FrameReader<Box<[u8]>>,
    fsm: ClientFsm,
    reply: Vec<u8>,
}

impl Connection {
    /// Connects and completes the handshake (and identify, for role Client).
    pub fn connect(addr: &Addr, cfg: ClientConfig) -> Result<Connection, ClientError> {
        let stream = BlockingStream::connect(addr)?;
        let mut c = Connection {
            stream,
            reader: FrameReader::new(vec![0u8; proto::FRAME_MAX_BYTES].into_boxed_slice()),
            fsm: ClientFsm::new(cfg),
            reply: Vec::with_capacity(proto::FRAME_MAX_BYTES),
        };
        c.fsm.handle_connect();
        loop {
            if let Err(e) = c.flush() {
                // A server that refuses us (too many clients) writes its
                // error and closes; our write may fail first. Read what it
                // said before reporting the broken pipe.
                if let Ok(ClientEvent::Refused(code)) = c.next_event() {
                    let text = match proto::decode(&c.reply) {
                        Ok((_, Msg::Error { text, .. })) => text.to_string(),
                        _ => String::new(),
                    };
                    return Err(ClientError::Server { code, text });
                }
                return Err(e);
            }
            let ev = c.next_event()?;
            match ev {
                ClientEvent::Ready => return Ok(c),
                ClientEvent::Refused(code) => {
                    let text = match proto::decode(&c.reply) {
                        Ok((_, Msg::Error { text, .. })) => text.to_string(),
                        _ => String::new(),
                    };
                    return Err(ClientError::Server { code, text });
                }
                _ => {}
            }
        }
    }

    /// The server incarnation seen.
    pub fn incarnation(&self) -> u64 {
        self.fsm.incarnation()
    }

    /// The client state machine.
    pub fn fsm(&self) -> &ClientFsm {
        &self.fsm
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        while !self.fsm.transmit().is_empty() {
            let n = self.stream.write(self.fsm.transmit())?;
            if n == 0 {
                return Err(ClientError::Io(io::ErrorKind::WriteZero.into()));
            }
            self.fsm.consume_transmit(n);
        }
        Ok(())
    }

    /// Reads the next frame into `self.reply` and feeds it to the FSM.
    fn next_event(&mut self) -> Result<ClientEvent, ClientError> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => {
                    self.reply.clear();
                    self.reply.extend_from_slice(f);
                    return Ok(self.fsm.handle_frame(&self.reply));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            let n = self.stream.read(self.reader.spare())?;
            if n == 0 {
                self.fsm.handle_disconnect();
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
            self.reader.advance(n);
        }
    }

    /// Sends a request and waits for its reply, returned as the decoded
    /// message (borrowing the connection's reply buffer).
    pub fn call(&mut self, req: Request) -> Result<Msg<'_>, ClientError> {
        if self.fsm.state() != ClientState::Ready {
            return Err(ClientError::Protocol("connection not ready".into()));
        }
        let id = self
            .fsm
            .request(req)
            .ok_or_else(|| ClientError::Protocol("too many requests outstanding".into()))?;
        self.flush()?;
        loop {
            let ev = self.next_event()?;
            self.flush()?;
            if let ClientEvent::Reply { id: got } = ev {
                if got == id {
                    break;
                }
            }
        }
        let (_, msg) =
            proto::decode(&self.reply).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Msg::Error { code, text, .. } = msg {
            return Err(ClientError::Server {
                code,
                text: text.to_string(),
            });
        }
        Ok(msg)
    }

    /// Sends the release of read locks (no reply).
    pub fn release(&mut self, r: Range) -> Result<(), ClientError> {
        self.fsm.release(r);
        self.flush()
    }

    /// Records read locks granted.
    pub fn note_locked(&mut self, r: Range) {
        self.fsm.note_locked(r);
    }
}

/// Opens a control connection.
pub fn control(addr: &Addr) -> Result<Connection, ClientError> {
    Connection::connect(
        addr,
        ClientConfig {
            client_id: 0,
            node_id: 0,
            role: Role::Control,
            volume: Volume::Origin,
            origin_uuid: [0; 16],
        },
    )
}

/// A volume: the origin or one snapshot, as a block device.
#[derive(Debug)]
pub struct VolumeClient {
    conn: Connection,
    volume: Volume,
    origin: File,
    store: File,
    chunk: u64,
    data_start: u64,
    size: u64,
}

impl VolumeClient {
    /// Attaches to `volume` through the server at `addr`. The store device is
    /// read for its label (geometry, origin id); data I/O goes to both devices
    /// directly.
    pub fn open(
        addr: &Addr,
        origin_path: &Path,
        store_path: &Path,
        volume: Volume,
        client_id: u64,
        node_id: u32,
    ) -> Result<VolumeClient, ClientError> {
        let mut writable = std::fs::OpenOptions::new();
        writable.read(true).write(true);
        let origin = writable.open(origin_path)?;
        let store = writable.open(store_path)?;
        let mut sd = csnap_store::disk::FileDisk::new(store.try_clone()?)
            .map_err(|e| ClientError::Io(io::Error::other(e.to_string())))?;
        let label = csnap_store::read_label(&mut sd)
            .map_err(|e| ClientError::Io(io::Error::other(e.to_string())))?;
        let conn = Connection::connect(
            addr,
            ClientConfig {
                client_id,
                node_id,
                role: Role::Client,
                volume,
                origin_uuid: label.origin_uuid,
            },
        )?;
        let chunk = u64::from(conn.fsm.chunk_size_bytes());
        Ok(VolumeClient {
            volume,
            origin,
            store,
            chunk,
            data_start: label.data_start_bytes,
            size: conn.fsm.origin_size_bytes(),
            conn,
        })
    }

    /// Size of the volume in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// Chunk size.
    pub fn chunk_size_bytes(&self) -> u64 {
        self.chunk
    }

    /// The connection.
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn check(&self, off: u64, len: usize) -> io::Result<()> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "I/O of {len} bytes at {off} is past the end of the volume ({} bytes)",
                    self.size
                ),
            )),
        }
    }

    /// Splits `[off, off+len)` into runs of whole chunks of at most
    /// `CHUNKS_PER_REQUEST_MAX`: (first chunk, chunks, byte offset in the
    /// caller's buffer, byte length).
    fn runs(&self, off: u64, len: usize) -> impl Iterator<Item = (u64, u32, usize, usize)> {
        let chunk = self.chunk;
        let end = off + len as u64;
        let mut at = off;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let first = at / chunk;
            let max_end = (first + CHUNKS_PER_REQUEST_MAX as u64) * chunk;
            let run_end = end.min(max_end);
            let last = (run_end - 1) / chunk;
            let chunks = u32::try_from(last - first + 1).unwrap_or(u32::MAX);
            let boff = usize::try_from(at - off).unwrap_or(0);
            let blen = usize::try_from(run_end - at).unwrap_or(0);
            at = run_end;
            Some((first, chunks, boff, blen))
        })
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check(off, buf.len())?;
        let Volume::Snapshot(_) = self.volume else {
            return self.origin.read_exact_at(buf, off);
        };
        for (first, chunks, boff, blen) in self.runs(off, buf.len()) {
            let msg = self.conn.call(Request::SnapshotRead(Range {
                chunk: first,
                chunks,
            }))?;
            let Msg::SnapshotReadReply(targets) = msg else {
                return Err(ClientError::Protocol("expected a snapshot read reply".into()).into());
            };
            let mut ts = [None; CHUNKS_PER_REQUEST_MAX];
            for (i, t) in targets.iter().enumerate() {
                ts[i] = Some(t);
            }
            for t in ts.iter().flatten() {
                if t.kind == TargetKind::Origin {
                    self.conn.note_locked(t.range());
                }
            }
            let seg_start = off + boff as u64;
            let seg_end = seg_start + blen as u64;
            let mut result = Ok(());
            for t in ts.iter().flatten() {
                let t_start = (t.chunk * self.chunk).max(seg_start);
                let t_end = (t.range().end() * self.chunk).min(seg_end);
                if t_start >= t_end {
                    continue;
                }
                let dst = &mut buf[usize::try_from(t_start - off).unwrap_or(0)
                    ..usize::try_from(t_end - off).unwrap_or(0)];
                let r = match t.kind {
                    TargetKind::Origin => self.origin.read_exact_at(dst, t_start),
                    TargetKind::Store => {
                        let at = self.data_start
                            + t.store_chunk * self.chunk
                            + (t_start - t.chunk * self.chunk);
                        self.store.read_exact_at(dst, at)
                    }
                };
                if r.is_err() {
                    result = r;
                }
            }
            // Release the read locks once the origin reads are done.
            for t in ts.iter().flatten() {
                if t.kind == TargetKind::Origin {
                    self.conn.release(t.range())?;
                }
            }
            result?;
        }
        Ok(())
    }

    /// Writes `buf` at `off`.
    pub fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check(off, buf.len())?;
        for (first, chunks, boff, blen) in self.runs(off, buf.len()) {
            let seg = &buf[boff..boff + blen];
            let seg_off = off + boff as u64;
            match self.volume {
                Volume::Origin => {
                    let msg = self.conn.call(Request::OriginWrite(Range {
                        chunk: first,
                        chunks,
                    }))?;
                    if !matches!(msg, Msg::OriginWriteOk(_)) {
                        return Err(
                            ClientError::Protocol("expected an origin write grant".into()).into(),
                        );
                    }
                    self.origin.write_all_at(seg, seg_off)?;
                }
                Volume::Snapshot(_) => {
                    let msg = self.conn.call(Request::SnapshotWrite(Range {
                        chunk: first,
                        chunks,
                    }))?;
                    let Msg::SnapshotWriteOk(targets) = msg else {
                        return Err(ClientError::Protocol(
                            "expected a snapshot write reply".into(),
                        )
                        .into());
                    };
                    let mut ts = [None; CHUNKS_PER_REQUEST_MAX];
                    for (i, t) in targets.iter().enumerate() {
                        ts[i] = Some(t);
                    }
                    for t in ts.iter().flatten() {
                        let t_start = (t.chunk * self.chunk).max(seg_off);
                        let t_end = (t.range().end() * self.chunk).min(seg_off + blen as u64);
                        if t_start >= t_end {
                            continue;
                        }
                        let src = &seg[usize::try_from(t_start - seg_off).unwrap_or(0)
                            ..usize::try_from(t_end - seg_off).unwrap_or(0)];
                        let at = self.data_start
                            + t.store_chunk * self.chunk
                            + (t_start - t.chunk * self.chunk);
                        self.store.write_all_at(src, at)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.origin.sync_data()?;
        self.store.sync_data()
    }
}
