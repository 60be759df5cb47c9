//! The client's sans-IO state machine: handshake, request ids, the requests
//! awaiting replies (re-sent after a reconnect), the read locks it holds
//! (uploaded after a reconnect), and incarnation fencing (a reply from an
//! older server incarnation than one already seen is refused).
//!
//! | state | entered on | next |
//! |---|---|---|
//! | `Disconnected` | start, `handle_disconnect` | `handle_connect` → `ExpectHelloOk` |
//! | `ExpectHelloOk` | `Hello` queued | `HelloOk` → `ExpectIdentifyOk` (or `Ready` for control) |
//! | `ExpectIdentifyOk` | `Identify` queued | `IdentifyOk` → `Uploading` (snapshot volumes: the held locks, possibly none) or `Ready` (origin) |
//! | `Uploading` | locks queued for upload, `FinishUpload` sent | `UploadOk` → `Ready` |
//! | `Ready` | | requests flow; unanswered ones are re-queued on reconnect |
//! | `Failed` | an `Error` to the handshake, or a stale incarnation | terminal until `handle_connect` |
//!
//! The driver owns the socket: it writes `transmit()` bytes, feeds every
//! received frame to `handle_frame`, and reports connects and disconnects.

use csnap_pools::slab::U64Map;
use csnap_proto::{self as proto, ErrorCode, Header, Msg, Range, Role, Volume};

/// Requests one client keeps outstanding (and re-sends after a reconnect).
pub const OUTSTANDING_MAX: usize = csnap_pools::REQUESTS_PER_CLIENT_MAX;
/// Read locks (chunks) one client remembers for upload.
pub const HELD_LOCKS_MAX: usize = csnap_pools::CLIENT_HELD_LOCKS_MAX;

/// The client's identity.
#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    /// Cluster-unique client id.
    pub client_id: u64,
    /// The node it runs on.
    pub node_id: u32,
    /// Client (volume I/O) or Control (management).
    pub role: Role,
    /// The volume, for role Client.
    pub volume: Volume,
    /// The origin's id (from the store label).
    pub origin_uuid: [u8; 16],
    /// Whether the client caches origin write grants and read locks (sets
    /// `IDENTIFY_CACHING`): it must then answer `Revoke` (see
    /// `ClientEvent::Notification`) and release locks named by
    /// `ReleaseLocks` once its reads of them are done.
    pub caching: bool,
}

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// No connection.
    Disconnected,
    /// `Hello` sent.
    ExpectHelloOk,
    /// `Identify` sent.
    ExpectIdentifyOk,
    /// Lock upload sent.
    Uploading,
    /// Serving requests.
    Ready,
    /// The server refused us.
    Failed(ErrorCode),
}

/// A data or control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `QueryOriginWrite`.
    OriginWrite(Range),
    /// `QuerySnapshotRead`.
    SnapshotRead(Range),
    /// `QuerySnapshotWrite`.
    SnapshotWrite(Range),
    /// `CreateSnapshot`.
    Create(u32),
    /// `DeleteSnapshot`.
    Delete(u32),
    /// `SetPriority`.
    Priority(u32, i8),
    /// `ListSnapshots`: one page, from the first tag given.
    List(u32),
    /// `Status`.
    Status,
    /// `QueryDelta`: which of `chunks` chunks from `chunk` of `volume`
    /// differ from snapshot `base` (answered with `DeltaMap`).
    Delta {
        /// The volume compared.
        volume: Volume,
        /// The snapshot it is compared with.
        base: u32,
        /// First chunk.
        chunk: u64,
        /// Chunk count, `1..=DELTA_QUERY_CHUNKS_MAX`.
        chunks: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    id: u64,
    req: Request,
    sent: bool,
}

/// What a frame meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEvent {
    /// Nothing for the caller (handshake progress).
    None,
    /// The session is ready for requests.
    Ready,
    /// The reply to request `id` (decode the frame for its body).
    Reply {
        /// Request id.
        id: u64,
    },
    /// The server refused the handshake.
    Refused(ErrorCode),
    /// A reply from an older incarnation than one already seen: dropped.
    Stale,
    /// A frame that matches nothing outstanding.
    Unexpected,
    /// A `Revoke` or `ReleaseLocks` from the server (decode the frame): a
    /// caching client acts on it (`revoke_done` once a revoke is done).
    Notification,
}

/// The client state machine.
#[derive(Debug)]
pub struct ClientFsm {
    cfg: ClientConfig,
    state: ClientState,
    incarnation: u64,
    next_id: u64,
    outstanding: [Option<Outstanding>; OUTSTANDING_MAX],
    held: U64Map,
    tx: Vec<u8>,
    tx_overflow: bool,
    chunk_size_bytes: u32,
    origin_size_bytes: u64,
}

/// Transmit buffer: every outstanding request, releases, and a full lock
/// upload (one chunk per range, `RANGES_MAX` ranges per frame).
const TX_BYTES: usize = (OUTSTANDING_MAX + 8) * 512
    + proto::FRAME_MAX_BYTES
    + (HELD_LOCKS_MAX / proto::RANGES_MAX + 1) * (proto::HEADER_BYTES + proto::RANGES_BYTES_MAX);

impl ClientFsm {
    /// Reserves the tables. The only allocation.
    pub fn new(cfg: ClientConfig) -> ClientFsm {
        ClientFsm {
            cfg,
            state: ClientState::Disconnected,
            incarnation: 0,
            next_id: 1,
            outstanding: [None; OUTSTANDING_MAX],
            held: U64Map::with_capacity(HELD_LOCKS_MAX),
            tx: Vec::with_capacity(TX_BYTES),
            tx_overflow: false,
            chunk_size_bytes: 0,
            origin_size_bytes: 0,
        }
    }

    /// Bytes `new` reserves on the heap (the held-lock map and the transmit
    /// buffer), for memory budgets.
    pub const fn reserved_bytes() -> usize {
        (HELD_LOCKS_MAX * 2).next_power_of_two() * (8 + 4) + TX_BYTES
    }

    /// Starts over as a new client (`cfg`), keeping the reserved tables:
    /// nothing outstanding, nothing held, no incarnation seen.
    pub fn reset(&mut self, cfg: ClientConfig) {
        self.cfg = cfg;
        self.state = ClientState::Disconnected;
        self.incarnation = 0;
        self.next_id = 1;
        self.outstanding = [None; OUTSTANDING_MAX];
        self.held.clear();
        self.tx.clear();
        self.tx_overflow = false;
        self.chunk_size_bytes = 0;
        self.origin_size_bytes = 0;
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The state.
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// Highest server incarnation seen.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Chunk size from `IdentifyOk`.
    pub fn chunk_size_bytes(&self) -> u32 {
        self.chunk_size_bytes
    }

    /// Origin size from `IdentifyOk`.
    pub fn origin_size_bytes(&self) -> u64 {
        self.origin_size_bytes
    }

    /// Read locks held: (chunk, count), in no particular order.
    pub fn held_locks(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.held.iter()
    }

    /// Distinct chunks read-locked.
    pub fn held_chunks(&self) -> usize {
        self.held.len()
    }

    /// Read locks held on `chunk`.
    pub fn held_count(&self, chunk: u64) -> u32 {
        self.held.get(chunk).unwrap_or(0)
    }

    /// Whether queued output ever overflowed the fixed transmit buffer (a
    /// frame was dropped: the connection must be re-made).
    pub fn tx_overflowed(&self) -> bool {
        self.tx_overflow
    }

    /// Requests awaiting replies.
    pub fn outstanding(&self) -> usize {
        self.outstanding.iter().flatten().count()
    }

    fn queue(&mut self, id: u64, msg: &Msg<'_>) {
        let at = self.tx.len();
        if at + msg.frame_bytes() > self.tx.capacity() {
            // Never grow: the driver re-makes the connection (everything
            // outstanding is re-sent then).
            self.tx_overflow = true;
            return;
        }
        self.tx.resize(at + msg.frame_bytes(), 0);
        let n = proto::encode(&Header::new(id, 0), msg, &mut self.tx[at..]).unwrap_or(0);
        self.tx.truncate(at + n);
    }

    /// Queues `RevokeDone` for the `Revoke` with request id `id`.
    pub fn revoke_done(&mut self, id: u64) {
        if self.state == ClientState::Ready || self.state == ClientState::Uploading {
            self.queue(id, &Msg::RevokeDone);
        }
    }

    /// A connection is up: queue the handshake.
    pub fn handle_connect(&mut self) {
        self.tx.clear();
        self.tx_overflow = false;
        self.state = ClientState::ExpectHelloOk;
        self.queue(
            0,
            &Msg::Hello {
                version_min: proto::PROTOCOL_VERSION,
                version_max: proto::PROTOCOL_VERSION,
                role: self.cfg.role,
            },
        );
    }

    /// The connection broke: every sent request will be re-sent after the
    /// next handshake.
    pub fn handle_disconnect(&mut self) {
        self.state = ClientState::Disconnected;
        self.tx.clear();
        self.tx_overflow = false;
        for o in self.outstanding.iter_mut().flatten() {
            o.sent = false;
        }
    }

    /// Bytes to write to the server.
    pub fn transmit(&self) -> &[u8] {
        &self.tx
    }

    /// `n` bytes of `transmit()` were written.
    pub fn consume_transmit(&mut self, n: usize) {
        self.tx.drain(..n);
    }

    /// Queues a request; `None` when `OUTSTANDING_MAX` are outstanding.
    pub fn request(&mut self, req: Request) -> Option<u64> {
        let slot = self.outstanding.iter().position(Option::is_none)?;
        let id = self.next_id;
        self.next_id += 1;
        self.outstanding[slot] = Some(Outstanding {
            id,
            req,
            sent: false,
        });
        if self.state == ClientState::Ready {
            self.send_unsent();
        }
        Some(id)
    }

    fn send_unsent(&mut self) {
        for i in 0..OUTSTANDING_MAX {
            let Some(o) = self.outstanding[i] else {
                continue;
            };
            if o.sent {
                continue;
            }
            self.send_request(o.id, o.req);
            if let Some(o) = self.outstanding[i].as_mut() {
                o.sent = true;
            }
        }
    }

    fn send_request(&mut self, id: u64, req: Request) {
        let mut lb = [0u8; proto::LIST_HEADER_BYTES + 16];
        match req {
            Request::OriginWrite(r) | Request::SnapshotRead(r) | Request::SnapshotWrite(r) => {
                let Ok(l) = proto::Ranges::from_entries(&[r], &mut lb) else {
                    return;
                };
                let msg = match req {
                    Request::OriginWrite(_) => Msg::QueryOriginWrite(l),
                    Request::SnapshotRead(_) => Msg::QuerySnapshotRead(l),
                    _ => Msg::QuerySnapshotWrite(l),
                };
                self.queue(id, &msg);
            }
            Request::Create(tag) => self.queue(id, &Msg::CreateSnapshot { tag }),
            Request::Delete(tag) => self.queue(id, &Msg::DeleteSnapshot { tag }),
            Request::Priority(tag, priority) => {
                self.queue(id, &Msg::SetPriority { tag, priority });
            }
            Request::List(from) => self.queue(id, &Msg::ListSnapshots { from }),
            Request::Status => self.queue(id, &Msg::Status),
            Request::Delta {
                volume,
                base,
                chunk,
                chunks,
            } => self.queue(
                id,
                &Msg::QueryDelta {
                    volume,
                    base,
                    chunk,
                    chunks,
                },
            ),
        }
    }

    /// Records read locks granted by a snapshot read reply.
    pub fn note_locked(&mut self, r: Range) -> bool {
        for c in r.chunk..r.end() {
            let n = self.held.get(c).unwrap_or(0);
            if !self.held.insert(c, n + 1) {
                return false;
            }
        }
        true
    }

    /// Whether request `id` was sent on the current connection (is at the
    /// server, or was when the connection broke).
    pub fn is_sent(&self, id: u64) -> bool {
        self.outstanding
            .iter()
            .flatten()
            .any(|o| o.id == id && o.sent)
    }

    /// Drops outstanding request `id` (its caller gave up on it): it is not
    /// re-sent, and a late reply to it is `Unexpected`.
    pub fn forget(&mut self, id: u64) {
        for o in &mut self.outstanding {
            if o.is_some_and(|o| o.id == id) {
                *o = None;
            }
        }
    }

    /// Releases one hold on each range's chunks in one `FinishSnapshotRead`
    /// (at most `RANGES_MAX` ranges).
    pub fn release_ranges(&mut self, rs: &[Range]) {
        let rs = &rs[..rs.len().min(proto::RANGES_MAX)];
        for r in rs {
            for c in r.chunk..r.end() {
                match self.held.get(c) {
                    Some(1) => {
                        self.held.remove(c);
                    }
                    Some(n) => {
                        self.held.insert(c, n - 1);
                    }
                    None => {}
                }
            }
        }
        // Once identified (uploading or ready) the server holds what we
        // hold, so every release goes out; before that, forgetting the hold
        // is enough (the upload lists what is left).
        if matches!(self.state, ClientState::Ready | ClientState::Uploading) && !rs.is_empty() {
            let mut lb = [0u8; proto::RANGES_BYTES_MAX];
            if let Ok(l) = proto::Ranges::from_entries(rs, &mut lb) {
                self.queue(0, &Msg::FinishSnapshotRead(l));
            }
        }
    }

    /// Queues the release of read locks after the origin read completed.
    pub fn release(&mut self, r: Range) {
        for c in r.chunk..r.end() {
            match self.held.get(c) {
                Some(1) => {
                    self.held.remove(c);
                }
                Some(n) => {
                    self.held.insert(c, n - 1);
                }
                None => {}
            }
        }
        if matches!(self.state, ClientState::Ready | ClientState::Uploading) {
            let mut lb = [0u8; proto::LIST_HEADER_BYTES + 16];
            if let Ok(l) = proto::Ranges::from_entries(&[r], &mut lb) {
                self.queue(0, &Msg::FinishSnapshotRead(l));
            }
        }
    }

    /// A frame from the server.
    pub fn handle_frame(&mut self, frame: &[u8]) -> ClientEvent {
        let Ok((hdr, msg)) = proto::decode(frame) else {
            return ClientEvent::Unexpected;
        };
        if hdr.incarnation < self.incarnation {
            return ClientEvent::Stale;
        }
        match (self.state, msg) {
            (ClientState::ExpectHelloOk, Msg::HelloOk { .. }) => {
                self.incarnation = hdr.incarnation;
                if self.cfg.role == Role::Client {
                    self.state = ClientState::ExpectIdentifyOk;
                    self.queue(
                        0,
                        &Msg::Identify {
                            client_id: self.cfg.client_id,
                            node_id: self.cfg.node_id,
                            volume: self.cfg.volume,
                            origin_uuid: self.cfg.origin_uuid,
                            volume_size_bytes: 0,
                            chunk_size_bytes: 0,
                            flags: if self.cfg.caching {
                                proto::IDENTIFY_CACHING
                            } else {
                                0
                            },
                        },
                    );
                    ClientEvent::None
                } else {
                    self.become_ready()
                }
            }
            (
                ClientState::ExpectIdentifyOk,
                Msg::IdentifyOk {
                    chunk_size_bytes,
                    origin_size_bytes,
                    ..
                },
            ) => {
                self.chunk_size_bytes = chunk_size_bytes;
                self.origin_size_bytes = origin_size_bytes;
                // A snapshot client always finishes a lock upload (possibly
                // empty): a new incarnation's recovery barrier waits for it.
                if matches!(self.cfg.volume, Volume::Origin) {
                    return self.become_ready();
                }
                // Upload the read locks still held, in runs of one chunk
                // (a chunk held n times is listed n times).
                let mut b = [0u8; proto::RANGES_BYTES_MAX];
                {
                    let mut held = self.held.iter().flat_map(|(c, n)| (0..n).map(move |_| c));
                    let mut more = true;
                    while more {
                        let mut lb = proto::RangesBuilder::new(&mut b).expect("buffer fits");
                        more = false;
                        for c in held.by_ref() {
                            let pushed = lb.push(Range {
                                chunk: c,
                                chunks: 1,
                            });
                            // Pushed only while the builder has room.
                            assert!(pushed.is_ok(), "a ranges list with room takes one more");
                            if lb.remaining() == 0 {
                                more = true;
                                break;
                            }
                        }
                        if lb.is_empty() {
                            break;
                        }
                        let l = lb.finish();
                        let at = self.tx.len();
                        if at + proto::HEADER_BYTES + l.as_bytes().len() > self.tx.capacity() {
                            self.tx_overflow = true;
                            break;
                        }
                        self.tx
                            .resize(at + proto::HEADER_BYTES + l.as_bytes().len(), 0);
                        let n = proto::encode(
                            &Header::new(0, 0),
                            &Msg::UploadLocks(l),
                            &mut self.tx[at..],
                        )
                        .unwrap_or(0);
                        self.tx.truncate(at + n);
                    }
                }
                self.queue(0, &Msg::FinishUpload);
                self.state = ClientState::Uploading;
                ClientEvent::None
            }
            (ClientState::Uploading, Msg::UploadOk) => self.become_ready(),
            (
                ClientState::ExpectHelloOk | ClientState::ExpectIdentifyOk | ClientState::Uploading,
                Msg::Error { code, .. },
            ) => {
                self.state = ClientState::Failed(code);
                ClientEvent::Refused(code)
            }
            (ClientState::ExpectIdentifyOk | ClientState::Uploading | ClientState::Ready, m)
                if m.kind().is_notification() =>
            {
                ClientEvent::Notification
            }
            (ClientState::Ready, m) => {
                if hdr.incarnation > self.incarnation {
                    // A reply from a newer incarnation without a new
                    // handshake cannot happen on one connection.
                    return ClientEvent::Unexpected;
                }
                let id = hdr.request_id;
                let Some(slot) = self
                    .outstanding
                    .iter()
                    .position(|o| o.is_some_and(|o| o.id == id))
                else {
                    return ClientEvent::Unexpected;
                };
                if !m.kind().is_reply() {
                    return ClientEvent::Unexpected;
                }
                self.outstanding[slot] = None;
                ClientEvent::Reply { id }
            }
            _ => ClientEvent::Unexpected,
        }
    }

    fn become_ready(&mut self) -> ClientEvent {
        self.state = ClientState::Ready;
        self.send_unsent();
        ClientEvent::Ready
    }
}
