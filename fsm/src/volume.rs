//! A volume's data path as a sans-IO state machine: the engine behind each
//! NBD connection. Block I/O goes in (`submit`), queries go to the server
//! (through the `ClientFsm` inside), disk operations come out
//! (`poll_disk`), completions come back (`poll_complete`).
//!
//! The engine is a caching client (`IDENTIFY_CACHING`):
//!
//! - **origin**: a chunk the server granted a write for needs no copy-out
//!   until a snapshot is created, so the engine remembers it (a bitmap over
//!   the origin's chunks) and writes it again without asking. A snapshot
//!   creation revokes that (`Revoke`): the engine forgets every grant, lets
//!   the origin writes it has on the disk finish, and answers `RevokeDone`;
//!   the server creates the snapshot only then.
//! - **snapshots**: every chunk a snapshot read asks about stays read-locked
//!   after the read, as a lease on the mapping the engine caches (the origin,
//!   or a store chunk). A writer that needs the chunk makes the server send
//!   `ReleaseLocks`; the engine lets go as soon as no read of its own uses
//!   the chunk. Writes (origin or snapshot) wait for those leases, so a
//!   cached mapping is never stale while it is held.
//! - **failover**: held leases are uploaded to the next server by the
//!   `ClientFsm` (a new incarnation holds every write until they are in).
//!   Origin grants are forgotten on a disconnect, and the engine does not
//!   reconnect (`ready_to_reconnect`) until its origin writes on the disk
//!   have finished.
//!
//! # An I/O's life
//!
//! One state per I/O, [`Phase`] (its doc comment holds the state table),
//! changed only by [`Io::enter`], which asserts the state it leaves. A
//! completed I/O leaves the slab: `poll_complete` hands (tag, result) to
//! the driver and the slot is free.
//!
//! A flush issues a sync of both devices. Write-zeroes and trim are the
//! driver's business (a zeroed buffer written; trim is advisory).
//!
//! Nothing here allocates after `new` or touches a socket or disk.

use csnap_pools::slab::{Slab, U64Map};
use csnap_proto::{self as proto, ErrorCode, Range, Volume};

use crate::client::{ClientConfig, ClientEvent, ClientFsm, ClientState, Request};
use crate::fixed::FixedRing;

mod leases;
mod origin;
mod phase;
mod queries;
use phase::{Io, Phase};

/// I/Os in flight in one engine.
pub const IOS_MAX: usize = csnap_pools::VOLUME_IOS_MAX;
/// Largest I/O the engine takes.
pub const IO_MAX_BYTES: u32 = csnap_pools::VOLUME_IO_MAX_BYTES;
/// Chunks one I/O can touch at the smallest chunk size.
const CHUNKS_PER_IO_MAX: usize = (IO_MAX_BYTES / csnap_pools::CHUNK_SIZE_MIN_BYTES) as usize + 1;
// Every query of every I/O fits the client's outstanding table, so a query
// is never refused for want of a slot.
static_assertions::const_assert!(IOS_MAX * RUNS_PER_IO_MAX <= crate::client::OUTSTANDING_MAX);

/// Words of an I/O's pin bitmap.
const PIN_WORDS: usize = CHUNKS_PER_IO_MAX.div_ceil(64);
/// Queries one I/O may need (runs of at most `CHUNKS_PER_REQUEST_MAX`).
const RUNS_PER_IO_MAX: usize = CHUNKS_PER_IO_MAX.div_ceil(csnap_pools::CHUNKS_PER_REQUEST_MAX) + 1;

/// Which device a disk operation is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dev {
    /// The origin volume.
    Origin,
    /// The snapshot store.
    Store,
}

/// A disk operation for the driver. Buffer offsets are into the buffer the
/// driver keeps for the I/O's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// Read `len` bytes at `dev_offset` into the slot's buffer at
    /// `buf_offset`.
    Read {
        /// The I/O slot.
        slot: u32,
        /// Device.
        dev: Dev,
        /// Byte offset on the device.
        dev_offset: u64,
        /// Byte offset in the slot's buffer.
        buf_offset: u32,
        /// Bytes.
        len: u32,
    },
    /// Write `len` bytes of the slot's buffer at `buf_offset` to
    /// `dev_offset`.
    Write {
        /// The I/O slot.
        slot: u32,
        /// Device.
        dev: Dev,
        /// Byte offset on the device.
        dev_offset: u64,
        /// Byte offset in the slot's buffer.
        buf_offset: u32,
        /// Bytes.
        len: u32,
    },
    /// Make completed writes to the device durable.
    Sync {
        /// The I/O slot.
        slot: u32,
        /// Device.
        dev: Dev,
    },
}

impl DiskOp {
    /// The slot it belongs to.
    pub fn slot(&self) -> u32 {
        match *self {
            DiskOp::Read { slot, .. } | DiskOp::Write { slot, .. } | DiskOp::Sync { slot, .. } => {
                slot
            }
        }
    }
}

/// What an I/O asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read into the slot's buffer.
    Read,
    /// Write the slot's buffer.
    Write,
    /// Make every completed write durable.
    Flush,
}

/// Why an I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// A disk operation failed.
    Disk,
    /// The server refused (store full, out of range, ...).
    Server(ErrorCode),
    /// No server within the failover timeout (the driver decides).
    NoServer,
    /// The request was at the server through `REQUEST_SERVER_DEATHS_MAX`
    /// consecutive server deaths: not sent again (it may be what kills
    /// them).
    ServerDeaths,
    /// Outside the volume, or longer than `IO_MAX_BYTES`.
    Invalid,
}

/// `submit` refused the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is in use: retry after a completion (backpressure).
    Busy,
    /// Outside the volume or too long.
    Invalid,
    /// Not attached yet (before the first `Ready`).
    NotReady,
}

/// Engine configuration.
#[derive(Debug, Clone, Copy)]
pub struct VolumeConfig {
    /// The client's identity (its `caching` is forced on).
    pub client: ClientConfig,
    /// Where the store's data area starts (from its label).
    pub data_start_bytes: u64,
    /// Snapshot leases kept when idle (on top of those in use).
    pub cached_chunks: usize,
    /// Chunks past the end of a snapshot read whose mappings are asked
    /// for in the same query (kept as idle leases); 0 turns it off.
    pub read_ahead_chunks: usize,
    /// Origin chunks the grant bitmap covers (the origin's size in chunks
    /// of the smallest chunk size is always enough).
    pub origin_chunks_max: u64,
    /// A query at the server through this many consecutive server deaths
    /// fails its I/O instead of being re-sent (a poison request);
    /// `REQUEST_SERVER_DEATHS_MAX` in production, 0 never.
    pub request_deaths_max: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Origin,
    Store(u64),
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    chunk: u64,
    target: Target,
    /// Holds the server counts for us on this chunk.
    holds: u32,
    /// Reads of ours using it now.
    in_use: u32,
    /// The server asked for it back.
    release_asked: bool,
    /// Recently used (clock eviction).
    referenced: bool,
}

#[derive(Debug, Clone, Copy)]
struct Query {
    id: u64,
    slot: u32,
    range: Range,
    retries: u8,
    /// Server deaths (broken connections) this query was at the server
    /// through.
    deaths: u8,
}

/// The engine.
#[derive(Debug)]
pub struct VolumeEngine {
    cfg: VolumeConfig,
    client: ClientFsm,
    volume: Volume,
    chunk: u64,
    size: u64,
    ready_once: bool,
    ios: Slab<Io>,
    queries: Vec<Option<Query>>,
    disk_q: FixedRing<DiskOp>,
    done_q: FixedRing<(u64, Result<(), IoError>)>,
    poisoned: u64,
    /// Origin: chunks granted since the last revoke (one bit each).
    granted: Vec<u64>,
    revoking: Option<u64>,
    origin_writes_on_disk: u32,
    /// Origin writes started and not complete (querying or on the disk).
    origin_writes_active: u32,
    /// Snapshot: leases by chunk.
    lease_index: U64Map,
    leases: Slab<Lease>,
    unpinned: usize,
    clock: u32,
    /// FinishSnapshotRead batch being built.
    release_buf: [Range; proto::RANGES_MAX],
    release_len: usize,
}

impl VolumeEngine {
    /// Reserves everything. The only allocation.
    pub fn new(mut cfg: VolumeConfig) -> VolumeEngine {
        cfg.client.caching = true;
        let volume = cfg.client.volume;
        let leases_cap = Self::leases_cap(&cfg);
        assert!(
            cfg.read_ahead_chunks < csnap_pools::CHUNKS_PER_REQUEST_MAX,
            "read-ahead fits one query"
        );
        assert!(
            leases_cap <= crate::client::HELD_LOCKS_MAX,
            "the lease cache must fit the client's held-lock table (it is uploaded after a failover)"
        );
        // Both tables are reserved whatever the first volume is: a slot is
        // reused for the origin or a snapshot (`reset`).
        let bitmap_words = usize::try_from(cfg.origin_chunks_max.div_ceil(64)).unwrap_or(0);
        let (lease_index, leases) = (
            U64Map::with_capacity(leases_cap),
            Slab::with_capacity(leases_cap),
        );
        VolumeEngine {
            cfg,
            client: ClientFsm::new(cfg.client),
            volume,
            chunk: 0,
            size: 0,
            ready_once: false,
            ios: Slab::with_capacity(IOS_MAX),
            queries: vec![None; IOS_MAX * RUNS_PER_IO_MAX],
            disk_q: FixedRing::new(IOS_MAX * (CHUNKS_PER_IO_MAX + 2)),
            done_q: FixedRing::new(IOS_MAX),
            poisoned: 0,
            granted: vec![0u64; bitmap_words],
            revoking: None,
            origin_writes_on_disk: 0,
            origin_writes_active: 0,
            lease_index,
            leases,
            unpinned: 0,
            clock: 0,
            release_buf: [Range {
                chunk: 0,
                chunks: 1,
            }; proto::RANGES_MAX],
            release_len: 0,
        }
    }

    /// Leases the engine can hold: the idle cache, every chunk its I/Os in
    /// flight pin, and the read-ahead those I/Os may bring in before the
    /// cache is trimmed.
    fn leases_cap(cfg: &VolumeConfig) -> usize {
        cfg.cached_chunks + IOS_MAX * (CHUNKS_PER_IO_MAX + cfg.read_ahead_chunks)
    }

    /// Bytes `new` reserves on the heap for `cfg`, for memory budgets.
    pub fn reserved_bytes(cfg: &VolumeConfig) -> usize {
        use core::mem::size_of;
        let leases_cap = Self::leases_cap(cfg);
        let bitmap_words = usize::try_from(cfg.origin_chunks_max.div_ceil(64)).unwrap_or(0);
        ClientFsm::reserved_bytes()
            + (leases_cap.max(1) * 2).next_power_of_two() * (8 + 4)
            + leases_cap * (size_of::<Option<Lease>>() + 4)
            + IOS_MAX * (size_of::<Option<Io>>() + 4)
            + IOS_MAX * RUNS_PER_IO_MAX * size_of::<Option<Query>>()
            + IOS_MAX * (CHUNKS_PER_IO_MAX + 2) * size_of::<Option<DiskOp>>()
            + IOS_MAX * size_of::<Option<(u64, Result<(), IoError>)>>()
            + bitmap_words * 8
    }

    /// Starts over as a new client of `volume` with id `client_id`, keeping
    /// every reserved table (an NBD connection slot is reused). The caller
    /// has released what the previous client held and closed its
    /// connection.
    pub fn reset(&mut self, volume: Volume, client_id: u64) {
        let mut c = *self.client.config();
        c.volume = volume;
        c.client_id = client_id;
        c.caching = true;
        self.cfg.client = c;
        self.client.reset(c);
        self.volume = volume;
        self.chunk = 0;
        self.size = 0;
        self.ready_once = false;
        let slots: u32 = u32::try_from(self.ios.capacity()).unwrap_or(0);
        for i in 0..slots {
            self.ios.remove(i);
        }
        self.queries.iter_mut().for_each(|q| *q = None);
        while self.disk_q.pop().is_some() {}
        while self.done_q.pop().is_some() {}
        self.forget_grants();
        self.revoking = None;
        self.origin_writes_on_disk = 0;
        self.origin_writes_active = 0;
        self.lease_index.clear();
        let cap: u32 = u32::try_from(self.leases.capacity()).unwrap_or(0);
        for i in 0..cap {
            self.leases.remove(i);
        }
        self.unpinned = 0;
        self.clock = 0;
        self.release_len = 0;
        self.assert_invariants();
    }

    /// Releases every idle lease (before the client goes away for good,
    /// so the server frees them at once rather than keeping them for a
    /// return that will not come).
    pub fn release_all_idle(&mut self) {
        self.release_idle_leases();
        self.flush_releases();
    }

    // -- the server connection (pass-through to the ClientFsm) ----------------

    /// The client state machine.
    pub fn client(&self) -> &ClientFsm {
        &self.client
    }

    /// The volume's size, once attached.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// Whether the engine has attached at least once (geometry known).
    pub fn attached(&self) -> bool {
        self.ready_once
    }

    /// Whether the connection is ready for requests now.
    pub fn is_ready(&self) -> bool {
        self.client.state() == ClientState::Ready
    }

    /// A new connection to a server is up.
    pub fn handle_connect(&mut self) {
        self.client.handle_connect();
    }

    /// The connection broke. Origin grants are forgotten (a new server or a
    /// new snapshot may need copy-outs again); leases stay (they are
    /// uploaded on the next connection).
    pub fn handle_disconnect(&mut self) {
        // Queued releases still go to the client FSM, so that the holds it
        // uploads to the next server are the ones the leases keep.
        self.flush_releases();
        self.count_deaths();
        self.client.handle_disconnect();
        self.forget_grants();
        // The server that asked is gone: writes held for our answer go on
        // (to the next server, which knows nothing of that snapshot yet).
        self.revoking = None;
        self.start_deferred();
        self.assert_invariants();
    }

    /// Whether a new connection may be made: not while origin writes made
    /// under grants are still on their way to the disk (the server a new
    /// connection reaches may create a snapshot at once).
    pub fn ready_to_reconnect(&self) -> bool {
        self.origin_writes_on_disk == 0
    }

    /// Bytes to write to the server.
    pub fn transmit(&self) -> &[u8] {
        self.client.transmit()
    }

    /// `n` bytes of `transmit()` were written.
    pub fn consume_transmit(&mut self, n: usize) {
        self.client.consume_transmit(n);
    }

    /// A frame from the server. The signal says whether the connection is
    /// still good: a refused handshake or a stale server means the driver
    /// makes a new one (through the agent).
    pub fn handle_frame(&mut self, frame: &[u8]) -> EngineSignal {
        let ev = self.client.handle_frame(frame);
        let sig = match ev {
            ClientEvent::Ready => {
                self.chunk = u64::from(self.client.chunk_size_bytes());
                self.size = self.client.origin_size_bytes();
                self.ready_once = true;
                EngineSignal::Ready
            }
            ClientEvent::Reply { id } => self.on_reply(id, frame),
            ClientEvent::Notification => {
                self.on_notification(frame);
                EngineSignal::None
            }
            ClientEvent::Refused(code) => EngineSignal::Refused(code),
            ClientEvent::Stale => EngineSignal::Stale,
            ClientEvent::None | ClientEvent::Unexpected => EngineSignal::None,
        };
        self.flush_releases();
        self.assert_invariants();
        sig
    }

    /// The connection broke: every query that was at the server counts one
    /// more server death; one at `REQUEST_SERVER_DEATHS_MAX` fails its I/O
    /// instead of being re-sent (a poison request must not kill server
    /// after server).
    fn count_deaths(&mut self) {
        for k in 0..self.queries.len() {
            let Some(q) = self.queries[k].as_mut() else {
                continue;
            };
            if !self.client.is_sent(q.id) {
                continue;
            }
            q.deaths = q.deaths.saturating_add(1);
            let max = self.cfg.request_deaths_max;
            if max == 0 || q.deaths < max {
                continue;
            }
            let (id, slot) = (q.id, q.slot);
            self.queries[k] = None;
            self.client.forget(id);
            self.poisoned += 1;
            if let Some(io) = self.ios.get_mut(slot) {
                io.query_gone();
            }
            self.fail_io(slot, IoError::ServerDeaths);
        }
    }

    /// Queries failed because they were at the server through
    /// `REQUEST_SERVER_DEATHS_MAX` consecutive deaths.
    pub fn poisoned_requests(&self) -> u64 {
        self.poisoned
    }

    /// Every I/O in flight fails (the driver gave up on reaching a server).
    pub fn fail_all(&mut self, e: IoError) {
        let cap = u32::try_from(self.ios.capacity()).unwrap_or(0);
        for slot in 0..cap {
            if let Some(io) = self.ios.get_mut(slot) {
                if io.phase == Phase::AwaitRevoke {
                    io.error.get_or_insert(e);
                    self.maybe_complete(slot);
                }
            }
        }
        for k in 0..self.queries.len() {
            if let Some(q) = self.queries[k].take() {
                self.client.forget(q.id);
                if let Some(io) = self.ios.get_mut(q.slot) {
                    io.query_gone();
                    io.error.get_or_insert(e);
                }
                self.maybe_complete(q.slot);
            }
        }
        // Completing unpins leases; those given back must leave the
        // client's held table now (not be dropped by a later disconnect
        // and uploaded to the next server as still held).
        self.flush_releases();
        self.assert_invariants();
    }

    // -- I/O ---------------------------------------------------------------------

    /// Submits an I/O. Returns its slot; the driver's buffer for that slot
    /// holds the data (written before `submit` for a write, filled by the
    /// `Read` disk operations for a read).
    pub fn submit(
        &mut self,
        tag: u64,
        kind: IoKind,
        offset: u64,
        len: u32,
    ) -> Result<u32, SubmitError> {
        if !self.ready_once {
            return Err(SubmitError::NotReady);
        }
        if kind != IoKind::Flush
            && (len > IO_MAX_BYTES
                || offset
                    .checked_add(u64::from(len))
                    .is_none_or(|e| e > self.size))
        {
            return Err(SubmitError::Invalid);
        }
        let slot = self
            .ios
            .insert(Io {
                tag,
                kind,
                offset,
                len,
                origin_write: kind == IoKind::Write && self.volume == Volume::Origin,
                phase: Phase::Issuing,
                error: None,
                pins: [0; PIN_WORDS],
            })
            .ok_or(SubmitError::Busy)?;
        if len == 0 && kind != IoKind::Flush {
            self.maybe_complete(slot);
            return Ok(slot);
        }
        match (kind, self.volume) {
            (IoKind::Flush, _) => {
                self.disk(DiskOp::Sync {
                    slot,
                    dev: Dev::Origin,
                });
                self.disk(DiskOp::Sync {
                    slot,
                    dev: Dev::Store,
                });
            }
            (IoKind::Read, Volume::Origin) => {
                self.disk(DiskOp::Read {
                    slot,
                    dev: Dev::Origin,
                    dev_offset: offset,
                    buf_offset: 0,
                    len,
                });
            }
            (IoKind::Write, Volume::Origin) => {
                if self.revoking.is_some() {
                    // After the snapshot being created: held until our
                    // answer is out.
                    if let Some(io) = self.ios.get_mut(slot) {
                        io.enter(Phase::AwaitRevoke);
                    }
                } else {
                    self.start_origin_write(slot);
                }
            }
            (IoKind::Read, Volume::Snapshot(_)) => self.start_snapshot_read(slot),
            (IoKind::Write, Volume::Snapshot(_)) => self.query_all(slot, QueryKind::SnapshotWrite),
        }
        self.flush_releases();
        self.assert_invariants();
        Ok(slot)
    }

    /// The next disk operation to perform.
    pub fn poll_disk(&mut self) -> Option<DiskOp> {
        self.disk_q.pop()
    }

    /// A disk operation finished.
    pub fn disk_done(&mut self, op: &DiskOp, ok: bool) {
        let slot = op.slot();
        let Some(io) = self.ios.get_mut(slot) else {
            return;
        };
        io.disk_gone();
        if !ok {
            io.error.get_or_insert(IoError::Disk);
        }
        self.maybe_complete(slot);
        self.flush_releases();
        self.assert_invariants();
    }

    /// The next finished I/O: (tag, result). Its slot is free again.
    pub fn poll_complete(&mut self) -> Option<(u64, Result<(), IoError>)> {
        self.done_q.pop()
    }

    /// The leases held (chunk, holds, reads using it, release asked), for
    /// diagnostics.
    pub fn leases(&self) -> impl Iterator<Item = (u64, u32, u32, bool)> + '_ {
        self.leases
            .iter()
            .map(|(_, l)| (l.chunk, l.holds, l.in_use, l.release_asked))
    }

    /// I/Os in flight: (tag, kind, offset, length, queries, disk ops), for
    /// diagnostics.
    pub fn ios(&self) -> impl Iterator<Item = (u64, IoKind, u64, u32, u32, u32)> + '_ {
        self.ios.iter().map(|(_, io)| {
            let (q, d) = (io.phase.queries(), io.phase.disk());
            (io.tag, io.kind, io.offset, io.len, q, d)
        })
    }

    /// I/Os in flight.
    pub fn in_flight(&self) -> usize {
        self.ios.len()
    }

    fn disk(&mut self, op: DiskOp) {
        let pushed = self.disk_q.push(op);
        assert!(pushed, "disk queue sized for every chunk of every I/O");
        if let Some(io) = self.ios.get_mut(op.slot()) {
            io.disk_issued();
        }
    }

    fn chunks_of(&self, io: &Io) -> (u64, u64) {
        let first = io.offset / self.chunk;
        let last = (io.offset + u64::from(io.len) - 1) / self.chunk;
        (first, last)
    }

    fn maybe_complete(&mut self, slot: u32) {
        let Some(io) = self.ios.get(slot).copied() else {
            return;
        };
        if !io.idle() {
            return;
        }
        // Queries still queued in the disk path? `disk` counts them.
        self.ios.remove(slot);
        if io.pins.iter().any(|w| *w != 0) {
            self.unpin_io(&io);
        }
        if io.phase.origin_on_disk() {
            self.origin_writes_on_disk -= 1;
        }
        if io.origin_write && io.phase.started() {
            self.origin_writes_active -= 1;
            self.maybe_revoke_done();
        }
        let r = match io.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        let pushed = self.done_q.push((io.tag, r));
        assert!(pushed, "completion queue holds every I/O");
    }

    /// Checks the engine's invariants (after every input, release builds
    /// too).
    pub fn assert_invariants(&self) {
        let mut on_disk = 0u32;
        for (_, io) in self.ios.iter() {
            if io.phase.origin_on_disk() {
                on_disk += 1;
            }
            assert!(
                io.origin_write
                    || !matches!(io.phase, Phase::AwaitRevoke | Phase::AwaitOriginDisk { .. }),
                "an origin write's state on another I/O"
            );
            assert!(io.phase != Phase::Issuing, "an I/O left issuing");
        }
        assert_eq!(
            on_disk, self.origin_writes_on_disk,
            "origin writes on disk miscounted"
        );
        let active = self
            .ios
            .iter()
            .filter(|(_, io)| io.origin_write && io.phase.started())
            .count();
        assert_eq!(
            active, self.origin_writes_active as usize,
            "origin writes under way miscounted"
        );
        assert!(
            self.revoking.is_some()
                || self
                    .ios
                    .iter()
                    .all(|(_, io)| io.phase != Phase::AwaitRevoke),
            "a write held for a revoke that is not being answered"
        );
        assert!(
            self.unpinned <= self.leases.len(),
            "more idle leases than leases"
        );
        assert_eq!(
            self.lease_index.len(),
            self.leases.len(),
            "lease index out of step"
        );
        assert!(self.release_len == 0, "releases left unsent");
    }
}

/// What a server frame meant for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineSignal {
    /// Nothing for the driver.
    None,
    /// Attached (again): I/O may be submitted.
    Ready,
    /// The handshake was refused with this code. `TooManyClients` and
    /// `StaleIncarnation` are worth another connection later; anything else
    /// (no such snapshot, wrong origin) is final for this engine.
    Refused(ErrorCode),
    /// The server is older than one already seen, or was fenced: make a
    /// new connection through the agent (queries are re-sent).
    Stale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueryKind {
    OriginWrite,
    SnapshotRead,
    SnapshotWrite,
}

#[cfg(test)]
mod tests {
    use super::*;
    use csnap_proto::{Header, Kind, Msg, RevokeWhat, Role, Target, TargetKind};

    fn frame(rid: u64, inc: u64, msg: &Msg<'_>) -> Vec<u8> {
        let mut b = vec![0u8; proto::FRAME_MAX_BYTES];
        let n = proto::encode(&Header::new(rid, inc), msg, &mut b).unwrap();
        b.truncate(n);
        b
    }

    /// The frames the engine wants to send (consumed).
    fn sent(e: &mut VolumeEngine) -> Vec<Vec<u8>> {
        let bytes = e.transmit().to_vec();
        e.consume_transmit(bytes.len());
        let mut v = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = proto::peek_header(&bytes[at..]).unwrap().unwrap().length as usize;
            v.push(bytes[at..at + len].to_vec());
            at += len;
        }
        v
    }

    fn kinds(frames: &[Vec<u8>]) -> Vec<Kind> {
        frames
            .iter()
            .map(|f| proto::decode(f).unwrap().1.kind())
            .collect()
    }

    fn engine(volume: Volume) -> VolumeEngine {
        VolumeEngine::new(VolumeConfig {
            client: ClientConfig {
                client_id: 9,
                node_id: 1,
                role: Role::Client,
                volume,
                origin_uuid: [1; 16],
                caching: true,
            },
            data_start_bytes: 1 << 20,
            cached_chunks: 8,
            read_ahead_chunks: 0,
            origin_chunks_max: 256,
            request_deaths_max: csnap_pools::REQUEST_SERVER_DEATHS_MAX,
        })
    }

    /// Connects and runs the handshake (with its lock upload) at `inc`;
    /// returns the upload frames.
    fn attach(e: &mut VolumeEngine, inc: u64) -> Vec<Vec<u8>> {
        e.handle_connect();
        assert_eq!(kinds(&sent(e)), [Kind::Hello]);
        let hello = Msg::HelloOk {
            version: 1,
            server_id: 1,
        };
        assert_eq!(e.handle_frame(&frame(0, inc, &hello)), EngineSignal::None);
        assert_eq!(kinds(&sent(e)), [Kind::Identify]);
        let ok = Msg::IdentifyOk {
            chunk_size_bytes: 4096,
            origin_size_bytes: 1 << 20,
            volume_size_bytes: 1 << 20,
        };
        assert_eq!(e.handle_frame(&frame(0, inc, &ok)), EngineSignal::None);
        let upload = sent(e);
        assert_eq!(kinds(&upload).last(), Some(&Kind::FinishUpload));
        assert_eq!(
            e.handle_frame(&frame(0, inc, &Msg::UploadOk)),
            EngineSignal::Ready
        );
        upload
    }

    fn disk_all(e: &mut VolumeEngine) {
        while let Some(op) = e.poll_disk() {
            e.disk_done(&op, true);
        }
    }

    fn origin_targets(chunk: u64, chunks: u32, buf: &mut [u8]) -> Msg<'_> {
        let t = Target {
            chunk,
            chunks,
            kind: TargetKind::Origin,
            store_chunk: 0,
        };
        Msg::SnapshotReadReply(proto::Targets::from_entries(&[t], buf).unwrap())
    }

    /// Chunks named by the lock upload frames.
    fn uploaded(frames: &[Vec<u8>]) -> Vec<u64> {
        let mut v = Vec::new();
        for f in frames {
            if let Ok((_, Msg::UploadLocks(l))) = proto::decode(f) {
                v.extend(l.iter().map(|r| r.chunk));
            }
        }
        v
    }

    /// A query at the server through `REQUEST_SERVER_DEATHS_MAX`
    /// consecutive deaths fails its I/O (it may be a poison request), and
    /// is not re-sent to the next server; fewer deaths re-send it.
    #[test]
    fn a_request_through_repeated_server_deaths_fails_instead_of_being_resent() {
        let mut e = engine(Volume::Snapshot(3));
        attach(&mut e, 1);
        e.submit(1, IoKind::Read, 0, 4096).unwrap();
        assert_eq!(kinds(&sent(&mut e)), [Kind::QuerySnapshotRead]);
        for inc in 2..=u64::from(csnap_pools::REQUEST_SERVER_DEATHS_MAX) {
            e.handle_disconnect();
            assert_eq!(e.poll_complete(), None, "failed after {} deaths", inc - 1);
            let frames = attach(&mut e, inc);
            // Re-sent once the new server is ready.
            let resent: Vec<Kind> = kinds(&sent(&mut e));
            assert!(
                kinds(&frames).contains(&Kind::QuerySnapshotRead)
                    || resent.contains(&Kind::QuerySnapshotRead),
                "not re-sent after death {}: {frames:?} {resent:?}",
                inc - 1
            );
        }
        e.handle_disconnect();
        assert_eq!(e.poll_complete(), Some((1, Err(IoError::ServerDeaths))));
        assert_eq!(e.poisoned_requests(), 1);
        // The next server does not see it; other I/O goes on.
        let frames = attach(&mut e, 9);
        assert!(!kinds(&frames).contains(&Kind::QuerySnapshotRead));
        assert!(!kinds(&sent(&mut e)).contains(&Kind::QuerySnapshotRead));
        e.submit(2, IoKind::Read, 0, 4096).unwrap();
        assert_eq!(kinds(&sent(&mut e)), [Kind::QuerySnapshotRead]);
    }

    #[test]
    fn leases_given_back_by_failed_io_are_not_uploaded_to_the_next_server() {
        let mut e = engine(Volume::Snapshot(1));
        attach(&mut e, 1);
        // A read caches a lease on chunk 0.
        e.submit(1, IoKind::Read, 0, 4096).unwrap();
        let q = sent(&mut e);
        let rid = proto::decode(&q[0]).unwrap().0.request_id;
        let mut b = [0u8; 64];
        e.handle_frame(&frame(rid, 1, &origin_targets(0, 1, &mut b)));
        disk_all(&mut e);
        assert_eq!(e.poll_complete(), Some((1, Ok(()))));
        assert_eq!(e.client().held_count(0), 1);
        // A read of chunks 0 (cached, pinned) and 1 (asked); the server
        // wants chunk 0 back meanwhile; the connection breaks.
        e.submit(2, IoKind::Read, 0, 8192).unwrap();
        assert_eq!(kinds(&sent(&mut e)), [Kind::QuerySnapshotRead]);
        let mut rb = [0u8; 64];
        let r = proto::Ranges::from_entries(
            &[Range {
                chunk: 0,
                chunks: 1,
            }],
            &mut rb,
        )
        .unwrap();
        e.handle_frame(&frame(0, 1, &Msg::ReleaseLocks(r)));
        e.handle_disconnect();
        // No server within the timeout: the read fails and unpins chunk 0,
        // whose lease goes back (the server asked for it).
        e.fail_all(IoError::NoServer);
        assert_eq!(e.poll_complete(), Some((2, Err(IoError::NoServer))));
        // A connection that breaks before any frame, then a good one.
        e.handle_connect();
        e.handle_disconnect();
        assert_eq!(
            e.client().held_count(0),
            0,
            "the released lease is still counted as held"
        );
        let upload = attach(&mut e, 2);
        assert!(
            !uploaded(&upload).contains(&0),
            "chunk 0 uploaded again: the next server would keep a lock nobody releases"
        );
        e.assert_invariants();
    }

    /// Connects an origin client (no lock upload) at `inc`.
    fn attach_origin(e: &mut VolumeEngine, inc: u64) {
        e.handle_connect();
        assert_eq!(kinds(&sent(e)), [Kind::Hello]);
        let hello = Msg::HelloOk {
            version: 1,
            server_id: 1,
        };
        e.handle_frame(&frame(0, inc, &hello));
        assert_eq!(kinds(&sent(e)), [Kind::Identify]);
        let ok = Msg::IdentifyOk {
            chunk_size_bytes: 4096,
            origin_size_bytes: 1 << 20,
            volume_size_bytes: 1 << 20,
        };
        assert_eq!(e.handle_frame(&frame(0, inc, &ok)), EngineSignal::Ready);
    }

    fn phase(e: &VolumeEngine, slot: u32) -> Phase {
        e.ios.get(slot).unwrap().phase
    }

    fn ranges<'a>(rs: &[Range], buf: &'a mut [u8]) -> proto::Ranges<'a> {
        proto::Ranges::from_entries(rs, buf).unwrap()
    }

    /// An origin write's states: asked about (`AwaitServer`), granted and
    /// on the disk (`AwaitOriginDisk`); a rewrite of a granted chunk goes
    /// straight to the disk; a write submitted while a revoke is answered
    /// waits (`AwaitRevoke`) until the write on the disk lands and
    /// `RevokeDone` is out, then asks again (the grants are forgotten).
    #[test]
    fn an_origin_write_goes_through_its_states_and_waits_for_a_revoke() {
        let mut e = engine(Volume::Origin);
        attach_origin(&mut e, 1);
        let a = e.submit(1, IoKind::Write, 0, 4096).unwrap();
        assert_eq!(
            phase(&e, a),
            Phase::AwaitServer {
                queries: 1,
                disk: 0
            }
        );
        let q = sent(&mut e);
        assert_eq!(kinds(&q), [Kind::QueryOriginWrite]);
        assert_eq!(e.poll_disk(), None, "on the disk before its grant");
        let rid = proto::decode(&q[0]).unwrap().0.request_id;
        let one = [Range {
            chunk: 0,
            chunks: 1,
        }];
        let mut b = [0u8; 64];
        e.handle_frame(&frame(rid, 1, &Msg::OriginWriteOk(ranges(&one, &mut b))));
        assert_eq!(phase(&e, a), Phase::AwaitOriginDisk { disk: 1 });
        disk_all(&mut e);
        assert_eq!(e.poll_complete(), Some((1, Ok(()))));
        // Granted: the rewrite asks nothing.
        let b1 = e.submit(2, IoKind::Write, 0, 4096).unwrap();
        assert_eq!(phase(&e, b1), Phase::AwaitOriginDisk { disk: 1 });
        assert!(sent(&mut e).is_empty());
        let op = e.poll_disk().unwrap();
        // A revoke while that write is on the disk: a new write waits.
        let mut rb = [0u8; 8];
        let revoke = Msg::Revoke {
            what: RevokeWhat::OriginGrants,
            ranges: ranges(&[], &mut rb),
        };
        e.handle_frame(&frame(77, 1, &revoke));
        assert!(sent(&mut e).is_empty(), "answered before the write landed");
        let c = e.submit(3, IoKind::Write, 0, 4096).unwrap();
        assert_eq!(phase(&e, c), Phase::AwaitRevoke);
        assert_eq!(e.poll_disk(), None);
        assert!(sent(&mut e).is_empty());
        e.disk_done(&op, true);
        assert_eq!(e.poll_complete(), Some((2, Ok(()))));
        // RevokeDone out, then the held write asks again.
        assert_eq!(
            kinds(&sent(&mut e)),
            [Kind::RevokeDone, Kind::QueryOriginWrite]
        );
        assert_eq!(
            phase(&e, c),
            Phase::AwaitServer {
                queries: 1,
                disk: 0
            }
        );
    }

    /// A write held for a revoke fails with the rest when no server is
    /// reached (it never started: no origin write is counted for it).
    #[test]
    fn a_write_held_for_a_revoke_fails_with_fail_all() {
        let mut e = engine(Volume::Origin);
        attach_origin(&mut e, 1);
        let a = e.submit(1, IoKind::Write, 0, 4096).unwrap();
        assert_eq!(kinds(&sent(&mut e)), [Kind::QueryOriginWrite]);
        let mut rb = [0u8; 8];
        let revoke = Msg::Revoke {
            what: RevokeWhat::OriginGrants,
            ranges: ranges(&[], &mut rb),
        };
        // The revoke comes while the first write is asked about: it is
        // answered only once that write lands.
        e.handle_frame(&frame(77, 1, &revoke));
        let c = e.submit(2, IoKind::Write, 8192, 4096).unwrap();
        assert_eq!(
            phase(&e, a),
            Phase::AwaitServer {
                queries: 1,
                disk: 0
            }
        );
        assert_eq!(phase(&e, c), Phase::AwaitRevoke);
        assert_eq!(e.origin_writes_active, 1);
        e.handle_disconnect();
        e.fail_all(IoError::NoServer);
        let mut done = [e.poll_complete(), e.poll_complete()];
        done.sort_by_key(|d| d.map(|(tag, _)| tag));
        assert_eq!(
            done,
            [
                Some((1, Err(IoError::NoServer))),
                Some((2, Err(IoError::NoServer)))
            ]
        );
        assert_eq!(e.origin_writes_active, 0);
        e.assert_invariants();
    }

    /// The transition function refuses a state change the table does not
    /// have (here a read into an origin write's disk state).
    #[test]
    #[should_panic(expected = "I/O state")]
    fn an_illegal_transition_panics() {
        let mut io = Io {
            tag: 1,
            kind: IoKind::Read,
            offset: 0,
            len: 4096,
            origin_write: false,
            phase: Phase::Issuing,
            error: None,
            pins: [0; PIN_WORDS],
        };
        io.enter(Phase::AwaitDisk { disk: 0 });
        io.enter(Phase::AwaitOriginDisk { disk: 0 });
    }

    /// Work outstanding is carried over: a transition that would drop a
    /// disk operation is refused.
    #[test]
    #[should_panic(expected = "outstanding work lost")]
    fn a_transition_that_loses_work_panics() {
        let mut io = Io {
            tag: 1,
            kind: IoKind::Write,
            offset: 0,
            len: 4096,
            origin_write: false,
            phase: Phase::AwaitServer {
                queries: 0,
                disk: 2,
            },
            error: None,
            pins: [0; PIN_WORDS],
        };
        io.enter(Phase::AwaitDisk { disk: 0 });
    }
}
