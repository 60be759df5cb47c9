//! The NBD server (`csnap nbd`): one process per node, a single-threaded mio
//! loop that exports the origin and every snapshot of a csnap store over
//! NBD, each NBD connection being a caching csnap client of its own.
//!
//! # Loop
//!
//! One thread, one `Poll`: the listeners (unix and TCP), a `signalfd` for
//! SIGTERM and SIGINT, and per connection slot three streams (the NBD
//! client, the slot's csnap server connection, its agent link), plus the
//! control link (a control connection to the server, for `LIST` and
//! `INFO`). Readiness is edge-triggered, so every stream keeps a readable
//! flag that is cleared only by `WouldBlock`; each turn pumps every busy
//! slot until nothing moves (a buffer freed by one slot can unblock
//! another), then sleeps until the next event or deadline.
//!
//! # Slots
//!
//! Everything is reserved in [`NbdServer::new`] and reused for the next
//! connection (`reset`): an [`NbdSession`], a receive buffer, a
//! [`VolumeEngine`], a [`Link`] (agent and server streams with their frame
//! readers), a command table, and the reply queues. A connection over
//! `--connections` is closed at once. An export query (`GO` or
//! `EXPORT_NAME`) resets the slot's engine for the volume with a fresh
//! cluster-unique client id, asks the agent for the server (`NeedServer`),
//! connects, and answers once the engine signals `Ready` (or `None` when
//! the server refuses the volume, or no server is reached within the
//! failover timeout). `INFO` and `LIST` are answered from the server's
//! snapshot list, asked for each time (no cache): a snapshot created while
//! the NBD server runs appears at once. So are `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (every live snapshot has its contexts).
//!
//! # Structured replies and block status
//!
//! With structured replies negotiated, a `READ` is answered with one
//! `OFFSET_DATA` chunk (its header just before the data in the buffer) and
//! errors of `READ` and `BLOCK_STATUS` with `ERROR` chunks. A
//! `BLOCK_STATUS` takes a buffer and answers the selected contexts one
//! after the other into it: `base:allocation` as one data extent, each
//! changed-since context from one `QueryDelta` of at most
//! `DELTA_QUERY_CHUNKS_MAX` chunks on the control connection, as runs of
//! changed and unchanged chunks (at most `NBD_BLOCK_STATUS_EXTENTS_MAX`, one
//! with `REQ_ONE`); the reply then goes out whole.
//!
//! # Commands and buffers
//!
//! A `READ` or `WRITE` takes a buffer of `VOLUME_IO_MAX_BYTES` (its data
//! aligned for direct I/O, the reply header just before it, so a read reply
//! is one write) from the
//! process-wide pool when it arrives; a `WRITE` payload is read straight
//! into it. No buffer free (or the connection holds its share, or its
//! command table is full): the command waits and the connection is not
//! read (backpressure). `WRITE_ZEROES` writes from one shared zero buffer
//! in pieces of at most one buffer; with `FAST_ZERO` it is answered
//! `ENOTSUP`. `TRIM` (advisory) and `CACHE` succeed at once. `FLUSH` is the
//! engine's flush (an `fdatasync` of both devices); a write with `FUA` is
//! answered only after a flush that follows it. Replies go out in
//! completion order. Disk operations go to one io_uring for the process
//! (`nbd_disk`): taken from each engine as it emits them, submitted once per
//! turn, their completions taken every turn (the ring's descriptor is in the
//! epoll set) and handed back with `disk_done`; many are in flight at once,
//! and the loop never waits for a device.
//!
//! # Direct I/O
//!
//! Both devices are opened with `O_DIRECT` (no page cache: other hosts on
//! the shared disks have their own); a device that cannot do it is an
//! error at start. A disk operation not aligned to the devices' direct-I/O
//! alignment (offset, length or buffer address) goes through whole aligned
//! blocks in a bounce buffer: a read copies its part out, a write is a
//! read-modify-write of its partial first and last blocks, serialized
//! against every overlapping write of the process (`nbd_disk`). The engine
//! emits a data write only once the server granted its mapping, and the
//! alignment divides the chunk size, so the blocks read back are that
//! chunk's. The export advertises a minimum block size of 1.
//!
//! # Failover
//!
//! A slot's server connection that breaks, or an engine signal `Stale`, or
//! a refusal worth retrying (`TooManyClients`, `StaleIncarnation`,
//! `Recovering`) closes the connection (`handle_disconnect`), and once the
//! engine is `ready_to_reconnect` the link asks the agent again with the
//! failed incarnation, connects to the new address, and `handle_connect`
//! (the engine re-identifies, re-uploads its leases, re-sends what was
//! unanswered). Retries back off from `CLIENT_RETRY_MIN_MS` to
//! `CLIENT_RETRY_MAX_MS`. Not ready again within the failover timeout: every
//! I/O of the engine waiting for a server fails (`NoServer`, NBD `EIO`);
//! the link keeps trying, and I/O that comes later waits for the next
//! window of one timeout (so no I/O waits for a server much longer than
//! the timeout, and the first `Ready` ends the outage). I/O that needs no
//! server (origin reads) goes on throughout.
//!
//! # Closing and shutdown
//!
//! A connection that ends (`DISC`, end of stream, a protocol violation)
//! reads nothing more, finishes its in-flight commands, writes its last
//! replies (for at most `NBD_CLOSE_LINGER_MS` to a client that does not
//! read), flushes both devices after a `DISC`, gives its idle leases back
//! (`release_all_idle`), writes that out, and closes its server and agent
//! streams (the agent then tells the server the client is gone). SIGTERM or
//! SIGINT stops accepting, closes every connection that way, flushes both
//! devices and returns.
//!
//! Nothing here allocates after [`NbdServer::new`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use csnap_sys::dio::{open_direct, AlignedBuf};
use csnap_sys::uring::DmaArena;

use crate::nbd_disk::{self, DiskQueue, Finished};

use csnap_fsm::agent::AddrBuf;
use csnap_fsm::client::{ClientConfig, ClientEvent, ClientFsm, Request};
use csnap_fsm::nbd::{
    error_chunk, none_chunk, offset_data_header, simple_reply, structured_header, Cmd, CmdKind,
    ExportInfo, ExportOption, MetaContext, NbdConfig, NbdError, NbdEvent, NbdSession, NbdState,
    BLOCK_STATUS_HEADER_BYTES, EXTENT_BYTES, OFFSET_DATA_HEADER_BYTES, REPLY_FLAG_DONE,
    REPLY_HEADER_MAX_BYTES, REPLY_TYPE_BLOCK_STATUS, SIMPLE_REPLY_BYTES, STATE_DIRTY,
};
use csnap_fsm::nbd_cmds::{self, BufRef, Command, Fua};
use csnap_fsm::volume::{DiskOp, EngineSignal, IoError, SubmitError, VolumeConfig, VolumeEngine};
use csnap_proto::{self as proto, ErrorCode, FrameReader, Msg, Role, Volume, FRAME_MAX_BYTES};
use mio::{Events, Interest, Poll, Registry, Token};

use crate::metrics::{MetricsEndpoint, NbdMetrics, METRICS_TOKENS};
use crate::net::{Addr, MioListener, MioStream};

mod control;
mod link;
use control::*;
use link::*;

/// Engine I/Os in flight per connection.
const IOS: usize = csnap_pools::VOLUME_IOS_MAX;
/// Commands admitted per connection.
const CMDS: usize = csnap_pools::NBD_COMMANDS_PER_CONNECTION_MAX;
/// Buffers one connection holds at once.
const BUFS_PER_CONN: usize = csnap_pools::NBD_BUFFERS_PER_CONNECTION_MAX;
/// Reply header in front of a buffer's data.
const HDR: usize = SIMPLE_REPLY_BYTES;
/// Bytes of the longest reply header queued without data.
const HDR_MAX: usize = REPLY_HEADER_MAX_BYTES;
/// Largest I/O (the advertised maximum payload).
const IO_MAX: usize = csnap_pools::VOLUME_IO_MAX_BYTES as usize;
/// Largest direct-I/O alignment served; the room in front of a buffer's data.
const ALIGN_MAX: usize = csnap_pools::NBD_DIO_ALIGN_MAX_BYTES;
/// Where a pool buffer's data starts (aligned for direct I/O).
const DATA_AT: usize = ALIGN_MAX;
/// Where its reply header starts: just before the data, so that a read
/// reply is one contiguous write.
const HDR_AT: usize = DATA_AT - HDR;
/// Bytes of one pool buffer: aligned room for the header, then the data.
const BUF_STRIDE: usize = DATA_AT + IO_MAX;
/// The read-modify-write bounce buffer: one I/O widened to whole aligned
/// blocks at both ends.
const BOUNCE_BYTES: usize = IO_MAX + 2 * ALIGN_MAX;
/// Receive buffer of a connection.
const RX_BYTES: usize = csnap_pools::NBD_RECEIVE_BUFFER_BYTES;
/// Output of an agent link.
const AGENT_OUT: usize = csnap_pools::NBD_AGENT_OUT_BYTES;
/// With disk operations in flight, the loop wakes at least this often
/// (completions wake it through the ring's descriptor anyway).
const DISK_BACKSTOP_MS: u64 = 5;
/// Readiness events per turn.
const EVENTS_MAX: usize = csnap_pools::EVENTS_PER_TURN_MAX;
/// Snapshots a list answer names.
const SNAPSHOTS_MAX: usize = csnap_pools::SNAPSHOTS_MAX;

/// Tokens: slot `s` owns `3s` (NBD client), `3s + 1` (server), `3s + 2`
/// (agent).
const TOKENS_PER_SLOT: usize = 3;
const SIGNAL: Token = Token(usize::MAX - 1);
const CTL_SERVER: Token = Token(usize::MAX - 2);
const CTL_AGENT: Token = Token(usize::MAX - 3);
const DISK: Token = Token(usize::MAX - 4);
const LISTENER_BASE: usize = usize::MAX - 64;
/// The metrics endpoint's tokens (`--metrics`), below the listeners'.
const METRICS_BASE: usize = usize::MAX - 128;
const _: () = assert!(csnap_pools::NBD_CONNECTIONS_MAX * TOKENS_PER_SLOT < METRICS_BASE);
const _: () = assert!(METRICS_BASE + METRICS_TOKENS <= LISTENER_BASE);

// Token spaces do not meet.
const _: () = assert!(csnap_pools::NBD_CONNECTIONS_MAX * TOKENS_PER_SLOT < LISTENER_BASE);
// Engine tags are command indices.
const _: () = assert!(CMDS <= u8::MAX as usize);
// Every buffer of the pool starts aligned.
const _: () = assert!(BUF_STRIDE.is_multiple_of(ALIGN_MAX) && HDR <= DATA_AT);
const _: () = assert!(OFFSET_DATA_HEADER_BYTES <= DATA_AT && HDR_MAX <= u8::MAX as usize);
/// Extents per context in one block-status reply.
const EXTENTS_MAX: usize = csnap_pools::NBD_BLOCK_STATUS_EXTENTS_MAX;
/// Chunks one delta query covers.
const DELTA_CHUNKS: usize = csnap_pools::DELTA_QUERY_CHUNKS_MAX;
// A block-status reply with every context selected fits a data buffer.
const _: () = assert!(
    csnap_pools::NBD_META_CONTEXTS_MAX * (BLOCK_STATUS_HEADER_BYTES + EXTENT_BYTES * EXTENTS_MAX)
        <= IO_MAX
);

/// How `csnap nbd` runs.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The node's agent socket.
    pub agent: PathBuf,
    /// This node.
    pub node_id: u32,
    /// Origin device.
    pub origin: PathBuf,
    /// Store device.
    pub store: PathBuf,
    /// Listen addresses.
    pub listen: Vec<Addr>,
    /// NBD connections at once.
    pub connections: usize,
    /// Buffers in the pool.
    pub buffers: usize,
    /// How long a failover may take before in-flight I/O fails.
    pub failover_timeout_ms: u64,
    /// Write-back: a `WRITE` without FUA is acknowledged as soon as the
    /// engine has taken it, before its server round trip and disk write (as
    /// a disk with a volatile cache does). Reads and writes that overlap it
    /// on its connection wait for it; a `FLUSH` waits for every write
    /// acknowledged before it and reports a failure of any of them. Exports
    /// then do not advertise multi-connection consistency.
    pub write_back: bool,
    /// `--metrics ADDR`: the Prometheus endpoint (see `crate::metrics`).
    pub metrics: Option<Addr>,
}

fn now_ms() -> u64 {
    csnap_sys::monotonic_micros() / 1000
}

// ---------------------------------------------------------------------------
// Small fixed containers.
// ---------------------------------------------------------------------------

/// A fixed ring of `N` items with a peek.
#[derive(Debug)]
struct Ring<T: Copy + Default, const N: usize> {
    items: [T; N],
    head: usize,
    len: usize,
}

impl<T: Copy + Default, const N: usize> Ring<T, N> {
    fn new() -> Self {
        Ring {
            items: [T::default(); N],
            head: 0,
            len: 0,
        }
    }
    fn push(&mut self, t: T) -> bool {
        if self.len == N {
            return false;
        }
        self.items[(self.head + self.len) % N] = t;
        self.len += 1;
        true
    }
    fn peek(&self) -> Option<T> {
        (self.len > 0).then(|| self.items[self.head])
    }
    fn pop(&mut self) -> Option<T> {
        let t = self.peek()?;
        self.head = (self.head + 1) % N;
        self.len -= 1;
        Some(t)
    }
    fn len(&self) -> usize {
        self.len
    }
    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }
}

/// The process-wide pool of data buffers: one aligned allocation; buffer
/// `b` is `[b * BUF_STRIDE, (b + 1) * BUF_STRIDE)`, its data at `DATA_AT`
/// (aligned for direct I/O) and its reply header just before it.
struct Buffers {
    /// The data buffers, then the zero buffer (`zero_at`), then the bounce
    /// buffers of the disk queue (`bounce_at`): memory disk operations on
    /// the ring may name.
    arena: DmaArena,
    free: Vec<u16>,
    count: usize,
}

impl Buffers {
    fn new(count: usize) -> Buffers {
        let mut free = Vec::with_capacity(count);
        for i in (0..count).rev() {
            free.push(u16::try_from(i).unwrap_or(u16::MAX));
        }
        Buffers {
            arena: DmaArena::new(
                count * BUF_STRIDE + IO_MAX + nbd_disk::BOUNCES * BOUNCE_BYTES,
                ALIGN_MAX,
            ),
            free,
            count,
        }
    }
    fn take(&mut self) -> Option<u16> {
        self.free.pop()
    }
    fn put(&mut self, b: u16) {
        assert!(self.free.len() < self.count, "a buffer freed twice");
        // Within the capacity reserved at start: no allocation.
        self.free.push(b);
    }
    fn available(&self) -> usize {
        self.free.len()
    }
    fn get(&self, b: u16) -> &[u8] {
        let at = usize::from(b) * BUF_STRIDE;
        self.arena
            .bytes()
            .get(at..at + BUF_STRIDE)
            .unwrap_or_default()
    }
    fn get_mut(&mut self, b: u16) -> &mut [u8] {
        let at = usize::from(b) * BUF_STRIDE;
        self.arena
            .bytes_mut()
            .get_mut(at..at + BUF_STRIDE)
            .unwrap_or_default()
    }
    /// Arena offset of buffer `b`'s data.
    fn data_at(&self, b: u16) -> usize {
        usize::from(b) * BUF_STRIDE + DATA_AT
    }
    /// Arena offset of the zero buffer (`IO_MAX` bytes, never written).
    fn zero_at(&self) -> usize {
        self.count * BUF_STRIDE
    }
    /// Arena offset of the bounce buffers.
    fn bounce_at(&self) -> usize {
        self.zero_at() + IO_MAX
    }
}

/// What every slot shares: devices, the pool, settings, the wake-up time.
struct Shared {
    /// Both opened with `O_DIRECT`: every data read and write goes around
    /// the page cache (other hosts on the shared disks have their own).
    origin: File,
    store: File,
    pool: Buffers,
    /// Disk operations in flight on the ring.
    disk: DiskQueue,
    agent: PathBuf,
    node_id: u32,
    export_size: u64,
    /// The store's chunk size (block status answers in chunks).
    chunk_bytes: u64,
    timeout_ms: u64,
    write_back: bool,
    /// Moves made (the pump loops until a pass makes none).
    progress: u64,
    /// Earliest deadline a slot waits for.
    wake_at: Option<u64>,
    /// Client ids: node, process nonce, counter.
    nonce: u16,
    next_client: u32,
    /// Figures for the log at exit.
    stats: NbdStats,
    /// Figures for the metrics endpoint.
    metrics: NbdMetrics,
}

/// Figures of a run, printed at exit.
#[derive(Debug, Clone, Copy, Default)]
pub struct NbdStats {
    /// NBD connections accepted.
    pub connections: u64,
    /// Connections closed at once (every slot in use).
    pub refused: u64,
    /// Commands answered.
    pub commands: u64,
    /// Commands that waited for a data buffer (backpressure).
    pub buffer_waits: u64,
    /// Server connections re-made (failovers ridden out).
    pub reconnects: u64,
    /// Failover windows that expired (I/O failed with EIO).
    pub timeouts: u64,
    /// Disk operations that failed.
    pub disk_errors: u64,
    /// Disk operations not aligned for direct I/O, done through whole
    /// aligned blocks (writes as read-modify-write).
    pub unaligned: u64,
}

impl Shared {
    fn wake(&mut self, at: u64) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
    fn moved(&mut self) {
        self.progress += 1;
    }
    fn new_client_id(&mut self) -> u64 {
        self.next_client = self.next_client.wrapping_add(1).max(1);
        (u64::from(self.node_id & 0xffff) << 48)
            | (u64::from(self.nonce) << 32)
            | u64::from(self.next_client)
    }
    fn sync_both(&mut self) -> bool {
        let a = self.origin.sync_data().is_ok();
        let b = self.store.sync_data().is_ok();
        a && b
    }
}

// ---------------------------------------------------------------------------
// Connection slots.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// No connection.
    Free,
    /// Handshake: options.
    Handshake,
    /// An export query waits for the engine to attach.
    Attaching { deadline_ms: u64 },
    /// Transmission.
    Serving,
    /// Ending: nothing more is read; in-flight commands finish; the last
    /// replies are written for a while.
    Closing { flush: bool, linger_until_ms: u64 },
}

/// A question to the control connection on a slot's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtlWait {
    None,
    /// `LIST`: the snapshot list.
    List {
        id: u64,
        deadline_ms: u64,
    },
    /// `INFO` of snapshot `tag`: whether it is live.
    Info {
        id: u64,
        tag: u32,
        deadline_ms: u64,
    },
    /// `LIST_META_CONTEXT`/`SET_META_CONTEXT` of the origin (`tag` none) or
    /// snapshot `tag`: the live snapshots.
    Meta {
        id: u64,
        tag: Option<u32>,
        deadline_ms: u64,
    },
    /// A delta query against snapshot `base` for the block-status command
    /// in progress.
    Delta {
        id: u64,
        base: u32,
        deadline_ms: u64,
    },
}

impl CtlWait {
    /// The control request waited for.
    fn id(self) -> Option<u64> {
        match self {
            CtlWait::None => None,
            CtlWait::List { id, .. }
            | CtlWait::Info { id, .. }
            | CtlWait::Meta { id, .. }
            | CtlWait::Delta { id, .. } => Some(id),
        }
    }

    fn deadline_ms(self) -> Option<u64> {
        match self {
            CtlWait::None => None,
            CtlWait::List { deadline_ms, .. }
            | CtlWait::Info { deadline_ms, .. }
            | CtlWait::Meta { deadline_ms, .. }
            | CtlWait::Delta { deadline_ms, .. } => Some(deadline_ms),
        }
    }
}

/// What a delta answer left for the block-status command in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeltaState {
    /// Nothing asked.
    None,
    /// The bitmap of `chunks` chunks from `chunk` against snapshot `base`
    /// is in the slot's delta buffer.
    Ready { base: u32, chunk: u64, chunks: u32 },
    /// The query failed.
    Failed(NbdError),
}

/// A request the session handed over, not admitted yet (no buffer, or the
/// command table is full): the connection is not read meanwhile.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Cmd(Cmd),
    Reject {
        handle: u64,
        error: NbdError,
        structured: bool,
    },
}

fn nbd_error(e: IoError) -> NbdError {
    match e {
        IoError::Disk | IoError::NoServer | IoError::ServerDeaths => NbdError::Io,
        IoError::Invalid => NbdError::Inval,
        IoError::Server(ErrorCode::StoreFull) => NbdError::NoSpc,
        IoError::Server(ErrorCode::ReadOnly) => NbdError::Perm,
        IoError::Server(_) => NbdError::Io,
    }
}

/// A refusal that another connection (through the agent) may cure.
fn retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::TooManyClients | ErrorCode::StaleIncarnation | ErrorCode::Recovering
    )
}

/// The volume an export name names: `origin` (or the empty default name),
/// or a snapshot tag in decimal.
fn parse_export(name: &[u8]) -> Option<Volume> {
    if name.is_empty() || name == b"origin" {
        return Some(Volume::Origin);
    }
    if name.len() > 10 || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(name)
        .ok()?
        .parse::<u32>()
        .ok()
        .map(Volume::Snapshot)
}

/// The extents of a changed-since context over `[offset, end)` from a
/// delta bitmap of `chunks` chunks from `first` (chunks of `cs` bytes):
/// runs of changed (`STATE_DIRTY`) and unchanged chunks, clipped to the
/// range, at most `out.len()`. Returns how many.
fn changed_extents(
    bits: &[u8],
    offset: u64,
    end: u64,
    first: u64,
    cs: u64,
    chunks: u32,
    out: &mut [(u32, u32)],
) -> usize {
    let mut n: usize = 0;
    let mut pos = offset;
    for i in 0..u64::from(chunks) {
        if pos >= end {
            break;
        }
        let chunk_end = ((first + i + 1) * cs).min(end);
        let dirty = usize::try_from(i / 8)
            .ok()
            .and_then(|k| bits.get(k))
            .is_some_and(|b| b & (1 << (i % 8)) != 0);
        let flags = if dirty { STATE_DIRTY } else { 0 };
        let len = u32::try_from(chunk_end - pos).unwrap_or(u32::MAX);
        match n.checked_sub(1).and_then(|l| out.get_mut(l)) {
            Some(last) if last.1 == flags => last.0 = last.0.saturating_add(len),
            _ => {
                let Some(slot) = out.get_mut(n) else {
                    break;
                };
                *slot = (len, flags);
                n += 1;
            }
        }
        pos = chunk_end;
    }
    n
}

/// `v` in decimal, in `buf`.
fn decimal(mut v: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// One NBD connection's resources, reserved once.
struct Slot {
    state: SlotState,
    client: Option<MioStream>,
    client_readable: bool,
    client_broken: bool,
    session: NbdSession,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    pending: Option<Pending>,
    /// The admitted `WRITE` whose payload is being received, and how much
    /// of it is in.
    payload_cmd: Option<u8>,
    payload_filled: usize,
    cmds: [Option<Command>; CMDS],
    active: usize,
    seq: u64,
    /// Header-only replies to write (each at most `HDR_MAX` bytes), and
    /// their lengths, so that the queue counts replies, not bytes.
    hdr_out: [u8; CMDS * HDR_MAX],
    hdr_start: usize,
    hdr_end: usize,
    hdr_lens: Ring<u8, CMDS>,
    hdr_front_written: usize,
    /// Replies in a buffer to write: buffer, first and end byte in it.
    data_out: Ring<(u16, u32, u32), CMDS>,
    data_written: usize,
    /// The volume served (for delta queries).
    volume: Volume,
    /// The delta bitmap of the block-status command in progress.
    delta: Box<[u8]>,
    delta_state: DeltaState,
    /// Engine I/O slot → (command, buffer).
    io_map: [Option<(u8, BufRef)>; IOS],
    bufs_held: usize,
    engine: VolumeEngine,
    link: Link,
    /// The engine was attached for this connection (leases to give back).
    attached: bool,
    /// Not ready again within the failover timeout (for the log).
    timed_out: bool,
    /// The server refused the volume for good after the attach.
    dead: Option<ErrorCode>,
    ctl: CtlWait,
    list_tags: [u32; SNAPSHOTS_MAX],
    list_n: usize,
    list_pos: usize,
    listing: bool,
    /// The pending command was counted as waiting for a buffer.
    buffer_wait: bool,
    /// The first failure of a write acknowledged early, or of a disk
    /// write, for the next `FLUSH` to report.
    wb_error: Option<NbdError>,
    /// This slot's index (the disk queue's connection number).
    index: u16,
    /// A disk operation the engine emitted that the disk queue had no room
    /// for yet.
    held: Option<DiskOp>,
    /// The export asked for (`None`: the origin) and, once attached, its
    /// metrics series.
    export_tag: Option<u32>,
    metrics_export: Option<usize>,
}

impl Slot {
    fn new(index: usize, cfg: VolumeConfig) -> Slot {
        let t = index * TOKENS_PER_SLOT;
        Slot {
            state: SlotState::Free,
            client: None,
            client_readable: false,
            client_broken: false,
            session: NbdSession::new(NbdConfig {
                payload_limit_bytes: csnap_pools::VOLUME_IO_MAX_BYTES,
                preferred_block_size_bytes: 4096,
            }),
            rx: vec![0u8; RX_BYTES].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            pending: None,
            payload_cmd: None,
            payload_filled: 0,
            cmds: [None; CMDS],
            active: 0,
            seq: 0,
            hdr_out: [0; CMDS * HDR_MAX],
            hdr_start: 0,
            hdr_end: 0,
            hdr_lens: Ring::new(),
            hdr_front_written: 0,
            data_out: Ring::new(),
            data_written: 0,
            volume: Volume::Origin,
            delta: vec![0u8; DELTA_CHUNKS / 8].into_boxed_slice(),
            delta_state: DeltaState::None,
            io_map: [None; IOS],
            bufs_held: 0,
            engine: VolumeEngine::new(cfg),
            link: Link::new(Token(t + 2), Token(t + 1)),
            attached: false,
            timed_out: false,
            dead: None,
            ctl: CtlWait::None,
            list_tags: [0; SNAPSHOTS_MAX],
            list_n: 0,
            list_pos: 0,
            listing: false,
            buffer_wait: false,
            wb_error: None,
            index: u16::try_from(index).unwrap_or(u16::MAX),
            held: None,
            export_tag: None,
            metrics_export: None,
        }
    }

    /// A new connection.
    fn open(&mut self, stream: MioStream) {
        assert!(self.state == SlotState::Free);
        self.state = SlotState::Handshake;
        self.client = Some(stream);
        self.client_readable = true;
        self.client_broken = false;
        self.session.reset();
        self.rx_start = 0;
        self.rx_end = 0;
        self.pending = None;
        self.payload_cmd = None;
        self.payload_filled = 0;
        self.hdr_start = 0;
        self.hdr_end = 0;
        self.hdr_lens.clear();
        self.hdr_front_written = 0;
        self.data_out.clear();
        self.data_written = 0;
        self.volume = Volume::Origin;
        self.delta_state = DeltaState::None;
        self.attached = false;
        self.timed_out = false;
        self.dead = None;
        self.ctl = CtlWait::None;
        self.listing = false;
    }

    /// Answers the pending export query, if the session still waits for
    /// one (a client that went away does not).
    fn answer(&mut self, info: Option<ExportInfo>) {
        if matches!(self.session.state(), NbdState::AwaitExport { .. }) {
            let r = self.session.answer_export(info);
            assert!(r.is_ok(), "the session awaits an export answer");
        }
    }

    /// Answers the pending metadata-context query, if the session still
    /// waits for one.
    fn answer_meta(&mut self, tags: Option<&[u32]>) {
        if matches!(self.session.state(), NbdState::AwaitMeta { .. }) {
            let r = self.session.answer_meta(tags);
            assert!(r.is_ok(), "the session awaits a meta answer");
        }
    }

    /// Answers the oldest `BLOCK_STATUS` command, one selected context at a
    /// time, into its buffer: `base:allocation` at once (all data: csnap
    /// reports no hole or zero it cannot prove), each changed-since context
    /// from a delta query to the server (at most `DELTA_QUERY_CHUNKS_MAX`
    /// chunks of the request, so a reply may cover less than asked; the two
    /// names of one snapshot share one query). It waits behind writes
    /// acknowledged early that overlap it, as a read does.
    fn progress_status(&mut self, sh: &mut Shared, ctl: &mut Control, now: u64) {
        if !matches!(self.state, SlotState::Serving | SlotState::Closing { .. }) {
            return;
        }
        loop {
            if self.ctl != CtlWait::None {
                return;
            }
            let mut oldest: Option<(u64, usize)> = None;
            for (i, c) in self.cmds.iter().enumerate() {
                if let Some(c) = c {
                    if c.kind == CmdKind::BlockStatus
                        && c.next < c.end
                        && oldest.is_none_or(|(s, _)| c.seq < s)
                    {
                        oldest = Some((c.seq, i));
                    }
                }
            }
            let Some((_, ci)) = oldest else {
                return;
            };
            if nbd_cmds::behind_acked_write(&self.cmds, ci) {
                return;
            }
            let Some(c) = self.cmds[ci] else {
                return;
            };
            let k = usize::from(c.ctx);
            let contexts = self.session.selected_contexts();
            let failed = match self.delta_state {
                DeltaState::Failed(e) => Some(e),
                _ => None,
            };
            let (Some(&ctx), None, Some(b)) = (contexts.get(k), failed, c.buf) else {
                // Every context answered, or the query failed.
                self.delta_state = DeltaState::None;
                if let Some(c) = self.cmds[ci].as_mut() {
                    c.next = c.end;
                    if failed.is_some() {
                        c.error = failed;
                    }
                }
                self.maybe_finish(ci, sh);
                sh.moved();
                continue;
            };
            let last = k + 1 == contexts.len();
            let max = if c.req_one { 1 } else { EXTENTS_MAX };
            let mut ext = [(0u32, 0u32); EXTENTS_MAX];
            let n = match ctx {
                MetaContext::Allocation => {
                    ext[0] = (c.len, 0);
                    1
                }
                MetaContext::ChangedSince { tag, .. } => {
                    let cs = sh.chunk_bytes;
                    let first = c.offset / cs;
                    let end = c.offset + u64::from(c.len);
                    let want = ((end - 1) / cs - first + 1).min(DELTA_CHUNKS as u64);
                    let chunks = u32::try_from(want).unwrap_or(1);
                    match self.delta_state {
                        DeltaState::Ready {
                            base,
                            chunk,
                            chunks: have,
                        } if base == tag && chunk == first && have == chunks => changed_extents(
                            &self.delta,
                            c.offset,
                            end,
                            first,
                            cs,
                            chunks,
                            &mut ext[..max],
                        ),
                        _ => {
                            let req = Request::Delta {
                                volume: self.volume,
                                base: tag,
                                chunk: first,
                                chunks,
                            };
                            match ctl.request(sh, req, now) {
                                Some(id) => {
                                    self.delta_state = DeltaState::None;
                                    self.ctl = CtlWait::Delta {
                                        id,
                                        base: tag,
                                        deadline_ms: now + sh.timeout_ms,
                                    };
                                    sh.moved();
                                }
                                // Too many questions out: again shortly.
                                None => sh.wake(now + 1),
                            }
                            return;
                        }
                    }
                }
            };
            let bytes = BLOCK_STATUS_HEADER_BYTES + EXTENT_BYTES * n;
            let at = DATA_AT + c.rendered as usize;
            let flags = if last { REPLY_FLAG_DONE } else { 0 };
            let payload = u32::try_from(bytes - BLOCK_STATUS_HEADER_BYTES + 4).unwrap_or(0);
            let id = u32::try_from(k + 1).unwrap_or(0);
            let out = &mut sh.pool.get_mut(b)[at..at + bytes];
            out[..20].copy_from_slice(&structured_header(
                c.handle,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                payload,
            ));
            out[20..24].copy_from_slice(&id.to_be_bytes());
            for (i, (len, fl)) in ext[..n].iter().enumerate() {
                let o = BLOCK_STATUS_HEADER_BYTES + EXTENT_BYTES * i;
                out[o..o + 4].copy_from_slice(&len.to_be_bytes());
                out[o + 4..o + 8].copy_from_slice(&fl.to_be_bytes());
            }
            if let Some(c) = self.cmds[ci].as_mut() {
                c.ctx += 1;
                c.rendered += u32::try_from(bytes).unwrap_or(0);
            }
            sh.moved();
        }
    }

    fn export_info(&self, size_bytes: u64, write_back: bool) -> ExportInfo {
        let _ = self;
        ExportInfo {
            size_bytes,
            read_only: false,
            // A write acknowledged early on one connection is not visible
            // to another until it lands.
            can_multi_conn: !write_back,
        }
    }

    /// Commands and replies that hold a place in the table's budget.
    fn outstanding(&self) -> usize {
        self.active + self.data_out.len() + self.hdr_lens.len()
    }

    fn output_left(&self) -> bool {
        !self.session.transmit().is_empty()
            || self.hdr_end > self.hdr_start
            || self.data_out.len() > 0
    }

    fn push_hdr(&mut self, h: &[u8], sh: &mut Shared) {
        sh.stats.commands += 1;
        let n = h.len().min(HDR_MAX);
        if self.hdr_end + n > self.hdr_out.len() {
            self.hdr_out.copy_within(self.hdr_start..self.hdr_end, 0);
            self.hdr_end -= self.hdr_start;
            self.hdr_start = 0;
        }
        let dst = self.hdr_out.get_mut(self.hdr_end..self.hdr_end + n);
        let counted = self.hdr_lens.push(u8::try_from(n).unwrap_or(u8::MAX));
        assert!(
            dst.is_some() && counted,
            "reply room is reserved at admission"
        );
        if let Some(d) = dst {
            d.copy_from_slice(&h[..n]);
            self.hdr_end += n;
        }
    }

    /// The whole reply of a command answered without data: a simple reply,
    /// or (structured replies on, for a `READ` or `BLOCK_STATUS`) a `NONE`
    /// or `ERROR` chunk.
    fn push_done(&mut self, handle: u64, structured: bool, err: Option<NbdError>, sh: &mut Shared) {
        match (structured, err) {
            (false, e) => self.push_hdr(&simple_reply(handle, e), sh),
            (true, None) => self.push_hdr(&none_chunk(handle), sh),
            (true, Some(e)) => self.push_hdr(&error_chunk(handle, e), sh),
        }
    }

    /// Whether a command of `kind` is answered with structured chunks.
    fn structured_for(&self, kind: CmdKind) -> bool {
        self.session.structured() && matches!(kind, CmdKind::Read | CmdKind::BlockStatus)
    }

    fn release_buf(&mut self, sh: &mut Shared, b: u16) {
        sh.pool.put(b);
        self.bufs_held -= 1;
        sh.moved();
    }

    fn begin_close(&mut self, flush: bool, now: u64) {
        let (f, linger) = match self.state {
            SlotState::Closing {
                flush: f,
                linger_until_ms,
            } => (f || flush, linger_until_ms),
            _ => (flush, now + csnap_pools::NBD_CLOSE_LINGER_MS),
        };
        self.state = SlotState::Closing {
            flush: f,
            linger_until_ms: linger,
        };
    }

    /// Pumps everything of this connection until nothing moves.
    fn pump(&mut self, sh: &mut Shared, ctl: &mut Control, reg: &Registry, now: u64) {
        if self.state == SlotState::Free {
            return;
        }
        for _ in 0..64 {
            let before = sh.progress;
            self.pump_link(sh, reg, now);
            self.timers(sh, ctl, reg, now);
            self.emit_list(sh);
            self.read_client(sh, ctl, reg, now);
            self.progress_status(sh, ctl, now);
            self.submit(sh);
            self.drain_engine(sh);
            self.write_client(sh);
            self.maybe_close(sh, ctl, reg, now);
            if self.state == SlotState::Free || sh.progress == before {
                break;
            }
        }
        // Completions queued by the last inputs are taken before the check.
        self.drain_engine(sh);
        self.check(sh);
    }

    fn pump_link(&mut self, sh: &mut Shared, reg: &Registry, now: u64) {
        if !self.link.active() {
            return;
        }
        let mut ready = false;
        let mut refused = None;
        let mut wake = sh.wake_at;
        let moved = self.link.pump(
            &mut self.engine,
            &sh.agent,
            reg,
            now,
            &mut wake,
            &mut |e: &mut VolumeEngine, f: &[u8]| match e.handle_frame(f) {
                EngineSignal::None => Verdict::Keep,
                EngineSignal::Ready => {
                    ready = true;
                    Verdict::Keep
                }
                EngineSignal::Refused(code) if retryable(code) => Verdict::Reconnect,
                EngineSignal::Refused(code) => {
                    refused = Some(code);
                    Verdict::Keep
                }
                EngineSignal::Stale => Verdict::Reconnect,
            },
        );
        sh.wake_at = wake;
        if moved {
            sh.moved();
        }
        if ready {
            if self.attached {
                sh.stats.reconnects += 1;
            }
            self.link.on_ready();
            sh.metrics.seen.saw(Peer::incarnation(&self.engine));
            if self.timed_out {
                eprintln!("csnap nbd: a server is reachable again; I/O resumes");
            }
            self.timed_out = false;
            if let SlotState::Attaching { .. } = self.state {
                let info = self.export_info(self.engine.size_bytes(), sh.write_back);
                self.answer(Some(info));
                if let Some(i) = self.metrics_export.take() {
                    sh.metrics.detach(i);
                }
                self.metrics_export = Some(sh.metrics.attach(self.export_tag));
                self.attached = true;
                self.state = SlotState::Handshake;
            }
        }
        if let Some(code) = refused {
            self.link.close(reg);
            sh.moved();
            if let SlotState::Attaching { .. } = self.state {
                self.answer(None);
                self.state = SlotState::Handshake;
            } else if self.attached {
                eprintln!(
                    "csnap nbd: the server refused the volume ({}); its I/O fails",
                    code.name()
                );
                self.dead = Some(code);
            }
        }
    }

    fn timers(&mut self, sh: &mut Shared, ctl: &mut Control, reg: &Registry, now: u64) {
        if let SlotState::Attaching { deadline_ms } = self.state {
            if now >= deadline_ms {
                eprintln!(
                    "csnap nbd: no server attached the volume within {} ms; export refused",
                    sh.timeout_ms
                );
                self.link.close(reg);
                self.answer(None);
                self.state = SlotState::Handshake;
                sh.moved();
            } else {
                sh.wake(deadline_ms);
            }
        }
        if self.attached && self.dead.is_none() {
            if let Some(since) = self.link.down_since_ms {
                let dl = since + sh.timeout_ms;
                if now >= dl {
                    // Every I/O waiting for a server fails; later ones get
                    // a window of their own (the link keeps trying).
                    if !self.timed_out {
                        eprintln!(
                            "csnap nbd: no server within {} ms of the failure; in-flight I/O fails (EIO), still trying",
                            sh.timeout_ms
                        );
                        self.timed_out = true;
                    }
                    sh.stats.timeouts += 1;
                    self.engine.fail_all(IoError::NoServer);
                    self.link.down_since_ms = Some(now);
                    sh.wake(now + sh.timeout_ms);
                    sh.moved();
                } else {
                    sh.wake(dl);
                }
            }
        }
        if let Some(code) = self.dead {
            if self.engine.in_flight() > 0 {
                self.engine.fail_all(IoError::Server(code));
            }
        }
        match (self.ctl.id(), self.ctl.deadline_ms()) {
            (Some(id), Some(deadline_ms)) if now >= deadline_ms => {
                ctl.fsm.forget(id);
                match self.ctl {
                    CtlWait::Info { .. } => self.answer(None),
                    // No server: the origin is all that can be named, and
                    // offers no snapshot's contexts.
                    CtlWait::Meta { tag: None, .. } => self.answer_meta(Some(&[])),
                    CtlWait::Meta { tag: Some(_), .. } => self.answer_meta(None),
                    CtlWait::Delta { .. } => {
                        self.delta_state = DeltaState::Failed(NbdError::Io);
                    }
                    CtlWait::List { .. } | CtlWait::None => {
                        self.list_n = 0;
                        self.list_pos = 0;
                        self.listing = true;
                    }
                }
                self.ctl = CtlWait::None;
                sh.moved();
            }
            (_, Some(deadline_ms)) => sh.wake(deadline_ms),
            _ => {}
        }
    }

    /// Sends the pending list's entries (as the transmit buffer allows).
    fn emit_list(&mut self, sh: &mut Shared) {
        if self.listing && self.session.state() != NbdState::AwaitList {
            // The client went away meanwhile.
            self.listing = false;
        }
        while self.listing {
            if self.list_pos > self.list_n {
                let r = self.session.list_done();
                assert!(r.is_ok(), "a list is pending");
                self.listing = false;
                sh.moved();
                break;
            }
            let mut b = [0u8; 10];
            let name: &[u8] = if self.list_pos == 0 {
                b"origin"
            } else {
                decimal(self.list_tags[self.list_pos - 1], &mut b)
            };
            match self.session.list_entry(name) {
                Ok(()) => {
                    self.list_pos += 1;
                    sh.moved();
                }
                // Written out by `write_client`, then again.
                Err(_) => break,
            }
        }
    }

    fn read_client(&mut self, sh: &mut Shared, ctl: &mut Control, reg: &Registry, now: u64) {
        loop {
            if let Some(ev) = self.session.poll_event() {
                sh.moved();
                self.on_event(ev, sh, ctl, reg, now);
                continue;
            }
            if matches!(self.state, SlotState::Closing { .. } | SlotState::Free) {
                return;
            }
            if let Some(p) = self.pending {
                if !self.admit(p, sh) {
                    return;
                }
                self.pending = None;
                sh.moved();
                continue;
            }
            let rem = usize::try_from(self.session.payload_remaining()).unwrap_or(0);
            if rem > 0 {
                if !self.read_payload(rem, sh, now) {
                    return;
                }
                continue;
            }
            if !self.session.wants_input() {
                return;
            }
            if self.rx_start < self.rx_end {
                let n = self
                    .session
                    .handle_input(&self.rx[self.rx_start..self.rx_end]);
                if n > 0 {
                    self.rx_start += n;
                    if self.rx_start == self.rx_end {
                        self.rx_start = 0;
                        self.rx_end = 0;
                    }
                    sh.moved();
                    continue;
                }
                // Nothing taken from a full buffer cannot happen (the
                // session takes any header byte it wants); do not spin.
                if self.rx_start == 0 && self.rx_end == self.rx.len() {
                    return;
                }
            }
            if !self.client_readable {
                return;
            }
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let Some(c) = self.client.as_mut() else {
                return;
            };
            match c.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    self.client_eof(now, false);
                    sh.moved();
                    return;
                }
                Ok(n) => {
                    self.rx_end += n;
                    sh.moved();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.client_readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.client_eof(now, true);
                    sh.moved();
                    return;
                }
            }
        }
    }

    /// Moves `WRITE` payload into the command's buffer: what is received
    /// already, then straight from the socket. `false`: wait for input.
    fn read_payload(&mut self, rem: usize, sh: &mut Shared, now: u64) -> bool {
        let Some(ci) = self.payload_cmd.map(usize::from) else {
            // Unreachable: an accepted WRITE is admitted before its payload.
            self.client_eof(now, true);
            return false;
        };
        let Some(b) = self.cmds[ci].and_then(|c| c.buf) else {
            self.client_eof(now, true);
            return false;
        };
        let at = DATA_AT + self.payload_filled;
        let n = if self.rx_start < self.rx_end {
            let n = rem.min(self.rx_end - self.rx_start);
            let dst = &mut sh.pool.get_mut(b)[at..at + n];
            dst.copy_from_slice(&self.rx[self.rx_start..self.rx_start + n]);
            self.rx_start += n;
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
            }
            n
        } else {
            if !self.client_readable {
                return false;
            }
            let Some(c) = self.client.as_mut() else {
                return false;
            };
            let dst = &mut sh.pool.get_mut(b)[at..at + rem];
            match c.read(dst) {
                Ok(0) => {
                    self.client_eof(now, false);
                    return false;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.client_readable = false;
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
                Err(_) => {
                    self.client_eof(now, true);
                    return false;
                }
            }
        };
        let r = self.session.handle_payload(n);
        assert!(r.is_ok(), "payload within what the session expects");
        self.payload_filled += n;
        sh.moved();
        if self.session.payload_remaining() == 0 {
            self.payload_cmd = None;
            self.payload_filled = 0;
            if let Some(c) = self.cmds[ci].as_mut() {
                c.receiving = false;
            }
        }
        true
    }

    fn client_eof(&mut self, now: u64, broken: bool) {
        self.session.handle_eof();
        if broken {
            self.client_broken = true;
        }
        let serving = self.attached;
        self.begin_close(serving, now);
    }

    fn on_event(
        &mut self,
        ev: NbdEvent,
        sh: &mut Shared,
        ctl: &mut Control,
        reg: &Registry,
        now: u64,
    ) {
        match ev {
            NbdEvent::ExportQuery { option } => {
                let vol = parse_export(self.session.export_name());
                match (option, vol) {
                    (_, None) => self.answer(None),
                    (ExportOption::Info, Some(Volume::Origin)) => {
                        let info = self.export_info(sh.export_size, sh.write_back);
                        self.answer(Some(info));
                    }
                    (ExportOption::Info, Some(Volume::Snapshot(tag))) => {
                        match ctl.request_list(sh, now) {
                            Some(id) => {
                                self.ctl = CtlWait::Info {
                                    id,
                                    tag,
                                    deadline_ms: now + sh.timeout_ms,
                                };
                            }
                            None => self.answer(None),
                        }
                    }
                    (ExportOption::Go | ExportOption::ExportName, Some(v)) => {
                        self.attach(v, sh, reg, now);
                    }
                }
            }
            NbdEvent::MetaQuery { .. } => {
                let tag = match parse_export(self.session.export_name()) {
                    None => {
                        self.answer_meta(None);
                        return;
                    }
                    Some(Volume::Origin) => None,
                    Some(Volume::Snapshot(t)) => Some(t),
                };
                match ctl.request_list(sh, now) {
                    Some(id) => {
                        self.ctl = CtlWait::Meta {
                            id,
                            tag,
                            deadline_ms: now + sh.timeout_ms,
                        };
                    }
                    None if tag.is_none() => self.answer_meta(Some(&[])),
                    None => self.answer_meta(None),
                }
            }
            NbdEvent::ListQuery => match ctl.request_list(sh, now) {
                Some(id) => {
                    self.ctl = CtlWait::List {
                        id,
                        deadline_ms: now + sh.timeout_ms,
                    };
                }
                None => {
                    self.list_n = 0;
                    self.list_pos = 0;
                    self.listing = true;
                }
            },
            NbdEvent::Ready => {
                if self.state == SlotState::Handshake {
                    self.state = SlotState::Serving;
                }
            }
            NbdEvent::Command(c) => self.pending = Some(Pending::Cmd(c)),
            NbdEvent::Reject {
                handle,
                error,
                structured,
            } => {
                self.pending = Some(Pending::Reject {
                    handle,
                    error,
                    structured,
                });
            }
            NbdEvent::Disconnect => {
                let serving = self.attached;
                self.begin_close(serving, now);
            }
            NbdEvent::Fatal(reason) => {
                eprintln!("csnap nbd: closing a connection: {reason}");
                let serving = self.attached;
                self.begin_close(serving, now);
            }
        }
    }

    /// Attaches the engine to `v` for an export query.
    fn attach(&mut self, v: Volume, sh: &mut Shared, reg: &Registry, now: u64) {
        self.link.close(reg);
        let id = sh.new_client_id();
        self.engine.reset(v, id);
        self.volume = v;
        self.export_tag = crate::metrics::export_tag(v);
        self.link.start(id, sh.node_id, Some(v), now);
        self.timed_out = false;
        self.dead = None;
        self.state = SlotState::Attaching {
            deadline_ms: now + sh.timeout_ms,
        };
    }

    /// Admits a request: `false` when it must wait (no room, no buffer).
    fn admit(&mut self, p: Pending, sh: &mut Shared) -> bool {
        if self.outstanding() >= CMDS {
            return false;
        }
        let c = match p {
            Pending::Reject {
                handle,
                error,
                structured,
            } => {
                self.push_done(handle, structured, Some(error), sh);
                return true;
            }
            Pending::Cmd(c) => c,
        };
        let immediate = match c.kind {
            CmdKind::Trim | CmdKind::Cache => Some(None),
            CmdKind::WriteZeroes if c.flags.fast_zero() => Some(Some(NbdError::NotSup)),
            CmdKind::Read | CmdKind::Write | CmdKind::WriteZeroes if c.length == 0 => Some(None),
            _ => None,
        };
        if let Some(err) = immediate {
            let now_us = csnap_sys::monotonic_micros();
            sh.metrics
                .finished(self.metrics_export, c.kind, 0, err.is_none(), now_us);
            let structured = self.structured_for(c.kind);
            self.push_done(c.handle, structured, err, sh);
            return true;
        }
        let needs_buf = matches!(
            c.kind,
            CmdKind::Read | CmdKind::Write | CmdKind::BlockStatus
        );
        let buf = if needs_buf {
            if self.bufs_held >= BUFS_PER_CONN {
                return false;
            }
            let Some(b) = sh.pool.take() else {
                if !self.buffer_wait {
                    self.buffer_wait = true;
                    sh.stats.buffer_waits += 1;
                }
                return false;
            };
            self.buffer_wait = false;
            self.bufs_held += 1;
            Some(b)
        } else {
            None
        };
        let Some(ci) = self.cmds.iter().position(Option::is_none) else {
            // Unreachable: `outstanding` bounds the table.
            if let Some(b) = buf {
                self.release_buf(sh, b);
            }
            return false;
        };
        self.seq += 1;
        let cmd = Command::admitted(&c, self.seq, buf, csnap_sys::monotonic_micros());
        let receiving = cmd.receiving;
        self.cmds[ci] = Some(cmd);
        self.active += 1;
        if receiving {
            self.payload_cmd = u8::try_from(ci).ok();
            self.payload_filled = 0;
        }
        true
    }

    /// Submits what commands have for the engine, oldest first, until it is
    /// busy.
    fn submit(&mut self, sh: &mut Shared) {
        if !matches!(self.state, SlotState::Serving | SlotState::Closing { .. }) {
            return;
        }
        loop {
            let Some(ci) = nbd_cmds::next_to_submit(&self.cmds) else {
                return;
            };
            let Some((kind, off, len, bref)) = self.cmds[ci].and_then(|c| c.next_io()) else {
                return;
            };
            let tag = u64::try_from(ci).unwrap_or(u64::MAX);
            match self.engine.submit(tag, kind, off, len) {
                Ok(slot) => {
                    if let Some(m) = self.io_map.get_mut(slot as usize) {
                        *m = Some((u8::try_from(ci).unwrap_or(u8::MAX), bref));
                    }
                    let mut ack = None;
                    let connected = self.engine.is_ready();
                    if let Some(c) = self.cmds[ci].as_mut() {
                        c.in_engine += 1;
                        c.advance(len);
                        if c.acks_early(sh.write_back, connected) {
                            c.acked = true;
                            ack = Some(c.handle);
                        }
                    }
                    if let Some(h) = ack {
                        self.push_hdr(&simple_reply(h, None), sh);
                    }
                    sh.moved();
                }
                Err(SubmitError::Busy | SubmitError::NotReady) => return,
                Err(SubmitError::Invalid) => {
                    if let Some(c) = self.cmds[ci].as_mut() {
                        c.error.get_or_insert(NbdError::Inval);
                        c.next = c.end;
                        c.fua = Fua::No;
                    }
                    self.maybe_finish(ci, sh);
                    sh.moved();
                }
            }
        }
    }

    /// Hands the engine's disk operations to the disk queue and its
    /// completions to their commands.
    fn drain_engine(&mut self, sh: &mut Shared) {
        while let Some(op) = self.held.take().or_else(|| self.engine.poll_disk()) {
            let bref = self.io_map.get(op.slot() as usize).copied().flatten();
            let buf_offset = match op {
                DiskOp::Read { buf_offset, .. } | DiskOp::Write { buf_offset, .. } => {
                    buf_offset as usize
                }
                DiskOp::Sync { .. } => 0,
            };
            let data_at = match (bref, op) {
                (Some((_, BufRef::Pool(b))), _) => Some(sh.pool.data_at(b) + buf_offset),
                (Some((_, BufRef::Zero)), DiskOp::Write { .. } | DiskOp::Sync { .. }) => {
                    Some(sh.pool.zero_at() + buf_offset)
                }
                // Unreachable: every engine I/O has a buffer, and nothing
                // reads into the zero buffer.
                _ => None,
            };
            let Some(data_at) = data_at else {
                sh.stats.disk_errors += 1;
                self.engine.disk_done(&op, false);
                sh.moved();
                continue;
            };
            if !sh.disk.take(self.index, op, data_at) {
                // The queue is full: offered again after a completion.
                self.held = Some(op);
                break;
            }
            sh.moved();
        }
        while let Some((tag, r)) = self.engine.poll_complete() {
            sh.moved();
            let ci = usize::try_from(tag).unwrap_or(usize::MAX);
            let Some(c) = self.cmds.get_mut(ci).and_then(Option::as_mut) else {
                continue;
            };
            assert!(
                c.in_engine > 0,
                "a completion for a command not in the engine"
            );
            c.in_engine -= 1;
            if let Err(e) = r {
                c.error.get_or_insert(nbd_error(e));
                c.next = c.end;
                c.fua = match c.fua {
                    Fua::Needed => Fua::No,
                    f => f,
                };
                // A write the disk failed also fails the next flush (as
                // fsync reports a failed write-back).
                if e == IoError::Disk && matches!(c.kind, CmdKind::Write | CmdKind::WriteZeroes) {
                    self.wb_error.get_or_insert(NbdError::Io);
                }
            }
            self.maybe_finish(ci, sh);
        }
    }

    /// A disk operation of this slot's engine finished.
    fn disk_finished(&mut self, f: &Finished) {
        self.engine.disk_done(&f.op, f.ok);
    }

    /// Replies to command `ci` once nothing of it is left to do.
    fn maybe_finish(&mut self, ci: usize, sh: &mut Shared) {
        let Some(c) = self.cmds[ci] else {
            return;
        };
        if !c.done() {
            return;
        }
        self.cmds[ci] = None;
        self.active -= 1;
        let ok = c.error.is_none();
        sh.metrics
            .finished(self.metrics_export, c.kind, c.len, ok, c.start_us);
        if c.acked {
            // Its reply went out when it was taken; a failure now is the
            // next flush's to report.
            if let Some(e) = c.error {
                self.wb_error.get_or_insert(e);
            }
            if let Some(b) = c.buf {
                self.release_buf(sh, b);
            }
            sh.moved();
            return;
        }
        // A flush reports a failure of a write acknowledged before it.
        let error = match (c.kind, c.error) {
            (CmdKind::Flush, None) => self.wb_error.take(),
            (_, e) => e,
        };
        let structured = self.structured_for(c.kind);
        let end = u32::try_from(DATA_AT).unwrap_or(0);
        match (c.kind, error, c.buf) {
            (CmdKind::Read, None, Some(b)) => {
                let start = if structured {
                    let at = DATA_AT - OFFSET_DATA_HEADER_BYTES;
                    sh.pool.get_mut(b)[at..DATA_AT]
                        .copy_from_slice(&offset_data_header(c.handle, c.offset, c.len));
                    at
                } else {
                    sh.pool.get_mut(b)[HDR_AT..DATA_AT]
                        .copy_from_slice(&simple_reply(c.handle, None));
                    HDR_AT
                };
                sh.stats.commands += 1;
                let start = u32::try_from(start).unwrap_or(0);
                let pushed = self.data_out.push((b, start, end + c.len));
                assert!(pushed, "reply room is reserved at admission");
            }
            (CmdKind::BlockStatus, None, Some(b)) => {
                sh.stats.commands += 1;
                let pushed = self.data_out.push((b, end, end + c.rendered));
                assert!(pushed, "reply room is reserved at admission");
            }
            (_, err, buf) => {
                self.push_done(c.handle, structured, err, sh);
                if let Some(b) = buf {
                    self.release_buf(sh, b);
                }
            }
        }
        sh.moved();
    }

    fn write_client(&mut self, sh: &mut Shared) {
        loop {
            if self.client_broken {
                self.drop_output(sh);
                return;
            }
            let Some(c) = self.client.as_mut() else {
                return;
            };
            let r = if !self.session.transmit().is_empty() {
                c.write(self.session.transmit()).map(|n| (0, n))
            } else if self.hdr_end > self.hdr_start {
                c.write(&self.hdr_out[self.hdr_start..self.hdr_end])
                    .map(|n| (1, n))
            } else if let Some((b, start, end)) = self.data_out.peek() {
                let from = start as usize + self.data_written;
                c.write(&sh.pool.get(b)[from..end as usize]).map(|n| (2, n))
            } else {
                return;
            };
            match r {
                Ok((_, 0)) => self.client_broken = true,
                Ok((0, n)) => {
                    let r = self.session.consume_transmit(n);
                    assert!(r.is_ok(), "wrote what was pending");
                    sh.moved();
                }
                Ok((1, n)) => {
                    self.hdr_start += n;
                    if self.hdr_start == self.hdr_end {
                        self.hdr_start = 0;
                        self.hdr_end = 0;
                    }
                    self.hdr_front_written += n;
                    while let Some(l) = self.hdr_lens.peek() {
                        if self.hdr_front_written < usize::from(l) {
                            break;
                        }
                        self.hdr_front_written -= usize::from(l);
                        self.hdr_lens.pop();
                    }
                    sh.moved();
                }
                Ok((_, n)) => {
                    self.data_written += n;
                    if let Some((b, start, end)) = self.data_out.peek() {
                        if self.data_written == (end - start) as usize {
                            self.data_out.pop();
                            self.data_written = 0;
                            self.release_buf(sh, b);
                        }
                    }
                    sh.moved();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.client_broken = true,
            }
        }
    }

    /// The client is gone: its replies cannot be delivered.
    fn drop_output(&mut self, sh: &mut Shared) {
        while let Some((b, _, _)) = self.data_out.pop() {
            self.release_buf(sh, b);
        }
        self.data_written = 0;
        self.hdr_start = 0;
        self.hdr_end = 0;
        self.hdr_lens.clear();
        self.hdr_front_written = 0;
        let n = self.session.transmit().len();
        let _ = self.session.consume_transmit(n);
    }

    fn maybe_close(&mut self, sh: &mut Shared, ctl: &mut Control, reg: &Registry, now: u64) {
        let SlotState::Closing {
            flush,
            linger_until_ms,
        } = self.state
        else {
            return;
        };
        // What can never complete now: a request not admitted, a write whose
        // payload will not come, a question to the control connection.
        self.pending = None;
        self.listing = false;
        if let Some(id) = self.ctl.id() {
            ctl.fsm.forget(id);
            if matches!(self.ctl, CtlWait::Delta { .. }) {
                // Its block-status command ends with an error now.
                self.delta_state = DeltaState::Failed(NbdError::Shutdown);
            }
            sh.moved();
        }
        self.ctl = CtlWait::None;
        if let Some(ci) = self.payload_cmd.take().map(usize::from) {
            if let Some(c) = self.cmds[ci].take() {
                self.active -= 1;
                if let Some(b) = c.buf {
                    self.release_buf(sh, b);
                }
            }
            self.payload_cmd = None;
            self.payload_filled = 0;
        }
        if self.active > 0 {
            return;
        }
        if self.output_left() && !self.client_broken && now < linger_until_ms {
            sh.wake(linger_until_ms);
            return;
        }
        if flush && !sh.sync_both() {
            eprintln!("csnap nbd: flush at disconnect failed");
        }
        self.teardown(sh, ctl, reg);
    }

    /// Gives everything back; the slot is free.
    fn teardown(&mut self, sh: &mut Shared, ctl: &mut Control, reg: &Registry) {
        assert!(self.active == 0, "teardown with commands in flight");
        if self.attached {
            self.engine.release_all_idle();
            self.link.flush_best_effort(&mut self.engine);
        }
        self.link.close(reg);
        if let Some(mut c) = self.client.take() {
            if !self.client_broken && !self.session.transmit().is_empty() {
                let _ = c.write(self.session.transmit());
            }
            let _ = reg.deregister(&mut c);
        }
        self.client_broken = true;
        self.drop_output(sh);
        if let Some(id) = self.ctl.id() {
            ctl.fsm.forget(id);
        }
        self.ctl = CtlWait::None;
        self.delta_state = DeltaState::None;
        self.listing = false;
        self.pending = None;
        self.payload_cmd = None;
        assert!(self.held.is_none(), "a disk operation held without I/O");
        self.io_map = [None; IOS];
        self.attached = false;
        if let Some(i) = self.metrics_export.take() {
            sh.metrics.detach(i);
        }
        self.timed_out = false;
        self.dead = None;
        self.state = SlotState::Free;
        sh.moved();
    }

    /// The invariants, after every pump (cheap; release builds too).
    fn check(&self, sh: &Shared) {
        let cmds = self.cmds.iter().flatten().count();
        assert_eq!(cmds, self.active, "command count out of step");
        let bufs = self
            .cmds
            .iter()
            .flatten()
            .filter(|c| c.buf.is_some())
            .count()
            + self.data_out.len();
        assert_eq!(bufs, self.bufs_held, "buffers held out of step");
        assert!(self.bufs_held <= BUFS_PER_CONN);
        assert!(self.outstanding() <= CMDS, "more commands than the table");
        assert!(self.hdr_start <= self.hdr_end && self.hdr_end <= self.hdr_out.len());
        assert!(self.hdr_lens.len() == 0 || self.hdr_end > self.hdr_start);
        if matches!(self.ctl, CtlWait::Delta { .. }) {
            assert!(
                self.cmds
                    .iter()
                    .flatten()
                    .any(|c| c.kind == CmdKind::BlockStatus),
                "a delta query for no block-status command"
            );
        }
        assert!(self.rx_start <= self.rx_end && self.rx_end <= self.rx.len());
        let in_engine: u32 = self.cmds.iter().flatten().map(|c| c.in_engine).sum();
        assert_eq!(
            in_engine as usize,
            self.engine.in_flight(),
            "engine I/Os out of step with the commands"
        );
        if self.state == SlotState::Free {
            assert!(self.client.is_none() && !self.link.active() && self.active == 0);
        }
        if let Some(ci) = self.payload_cmd {
            assert!(self.cmds[usize::from(ci)].is_some_and(|c| c.receiving));
            assert!(matches!(self.session.state(), NbdState::Payload { .. }));
        }
        let _ = sh;
    }
}

// ---------------------------------------------------------------------------
// The server.
// ---------------------------------------------------------------------------

/// Why `NbdServer::run` stopped other than by a signal (no heap data: it
/// is made in the sealed phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdStop {
    /// The stop's flush of the devices failed.
    FinalFlush,
    /// The event loop's wait failed with this errno.
    Poll(i32),
    /// Submitting disk operations to the io_uring failed with this errno.
    Disk(i32),
}

impl std::fmt::Display for NbdStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdStop::FinalFlush => write!(f, "the final flush of the devices failed"),
            NbdStop::Poll(errno) => write!(
                f,
                "event loop failed: {}",
                io::Error::from_raw_os_error(*errno)
            ),
            NbdStop::Disk(errno) => write!(
                f,
                "disk submission failed: {}",
                io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

/// The NBD server process's loop and everything it reserved.
pub struct NbdServer {
    poll: Poll,
    events: Events,
    ready: Vec<(Token, bool, bool)>,
    listeners: Vec<MioListener>,
    signals: OwnedFd,
    slots: Vec<Slot>,
    ctl: Control,
    sh: Shared,
    /// `--metrics`: the Prometheus endpoint.
    metrics: Option<MetricsEndpoint>,
    reserved: Vec<(&'static str, usize)>,
    /// Shutdown requested: the deadline for in-flight work.
    shutdown_at_ms: Option<u64>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Opens the devices, reads the store label, binds the listeners, sets
    /// up the signal descriptor and reserves every pool. The only
    /// allocation. Call from the main thread before any other thread starts
    /// (SIGTERM and SIGINT are blocked and read from a descriptor).
    pub fn new(opts: &NbdOptions) -> Result<NbdServer, String> {
        if opts.connections == 0 || opts.connections > csnap_pools::NBD_CONNECTIONS_MAX {
            return Err(format!(
                "connections must be 1 to {}",
                csnap_pools::NBD_CONNECTIONS_MAX
            ));
        }
        if opts.buffers == 0 || opts.buffers > csnap_pools::NBD_BUFFERS_MAX {
            return Err(format!(
                "buffers must be 1 to {}",
                csnap_pools::NBD_BUFFERS_MAX
            ));
        }
        // Direct I/O, no fallback: a device that cannot do it is an error.
        let open = |p: &Path, what: &str| {
            let (f, a) = open_direct(p, true).map_err(|e| format!("cannot open {what}: {e}"))?;
            let align = a.mem_bytes.max(a.offset_bytes) as usize;
            if align > ALIGN_MAX {
                return Err(format!(
                    "{what} {} needs direct I/O aligned to {align} bytes; csnap nbd serves at most {ALIGN_MAX}",
                    p.display()
                ));
            }
            Ok((f, align))
        };
        let (origin, origin_align) = open(&opts.origin, "origin")?;
        let (store, store_align) = open(&opts.store, "store")?;
        let align = origin_align.max(store_align);
        let mut sd = csnap_store::disk::FileDisk::new(
            store
                .try_clone()
                .map_err(|e| format!("store {}: {e}", opts.store.display()))?,
        )
        .map_err(|e| format!("store {}: {e}", opts.store.display()))?;
        // The label block, read around the page cache too.
        let mut label_buf = AlignedBuf::zeroed(csnap_pools::BLOCK_SIZE_BYTES, ALIGN_MAX);
        let label = csnap_store::read_label_into(&mut sd, &mut label_buf)
            .map_err(|e| format!("store {}: {e}", opts.store.display()))?;
        drop(sd);
        if label.data_start_bytes % align as u64 != 0 {
            return Err(format!(
                "store {}: its data area starts at {} bytes, not aligned to the device's direct-I/O alignment of {align}",
                opts.store.display(),
                label.data_start_bytes
            ));
        }
        let origin_size = csnap_store::disk::device_size_bytes(&origin)
            .map_err(|e| format!("origin {}: {e}", opts.origin.display()))?;
        if origin_size < label.origin_size_bytes {
            return Err(format!(
                "origin {} is {origin_size} bytes; the store was formatted for an origin of {} bytes",
                opts.origin.display(),
                label.origin_size_bytes
            ));
        }
        let chunk = u64::from(label.chunk_size_bytes);
        let cfg = VolumeConfig {
            client: ClientConfig {
                client_id: 0,
                node_id: opts.node_id,
                role: Role::Client,
                volume: Volume::Origin,
                origin_uuid: label.origin_uuid,
                caching: true,
            },
            data_start_bytes: label.data_start_bytes,
            cached_chunks: csnap_pools::VOLUME_CACHED_CHUNKS_DEFAULT,
            read_ahead_chunks: csnap_pools::VOLUME_READ_AHEAD_CHUNKS_DEFAULT,
            origin_chunks_max: label.origin_size_bytes.div_ceil(chunk.max(1)),
            request_deaths_max: csnap_pools::REQUEST_SERVER_DEATHS_MAX,
        };
        let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
        // Bound before the NBD listeners: once those answer (what `csnap up`
        // waits for), the metrics address answers too.
        let metrics = match &opts.metrics {
            Some(a) => Some(MetricsEndpoint::new(a, poll.registry(), METRICS_BASE)?),
            None => None,
        };
        let mut listeners = Vec::with_capacity(opts.listen.len());
        for (i, a) in opts.listen.iter().enumerate() {
            let mut l = MioListener::bind(a).map_err(|e| format!("cannot listen on {a}: {e}"))?;
            poll.registry()
                .register(&mut l, Token(LISTENER_BASE + i), Interest::READABLE)
                .map_err(|e| format!("cannot register {a}: {e}"))?;
            listeners.push(l);
        }
        if listeners.len() > 60 {
            return Err("at most 60 listen addresses".into());
        }
        let signals = csnap_sys::signal::signal_fd(&[libc::SIGTERM, libc::SIGINT])
            .map_err(|e| format!("signalfd: {e}"))?;
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&signals.as_raw_fd()),
                SIGNAL,
                Interest::READABLE,
            )
            .map_err(|e| format!("cannot register the signal descriptor: {e}"))?;
        let pool = Buffers::new(opts.buffers);
        let disk = DiskQueue::new(align, pool.bounce_at(), BOUNCE_BYTES)
            .map_err(|e| format!("io_uring setup: {e}"))?;
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&disk.fd()),
                DISK,
                Interest::READABLE,
            )
            .map_err(|e| format!("cannot register the io_uring descriptor: {e}"))?;
        let mut nonce = [0u8; 2];
        csnap_sys::random_bytes(&mut nonce).map_err(|e| format!("getrandom: {e}"))?;
        let slots: Vec<Slot> = (0..opts.connections).map(|i| Slot::new(i, cfg)).collect();
        let ctl_cfg = ClientConfig {
            client_id: 0,
            node_id: opts.node_id,
            role: Role::Control,
            volume: Volume::Origin,
            origin_uuid: [0; 16],
            caching: false,
        };
        let n = opts.connections;
        let mut reserved = vec![
            (
                "NBD connection slots (session, receive buffer, command table, reply queue, delta bitmap)",
                n * (core::mem::size_of::<Slot>() + NbdSession::reserved_bytes() + RX_BYTES + DELTA_CHUNKS / 8),
            ),
            (
                "volume engines (lease cache, grant bitmap, client tables)",
                n * VolumeEngine::reserved_bytes(&cfg),
            ),
            (
                "server and agent links (frame readers), control connection included",
                (n + 1) * Link::reserved_bytes() + ClientFsm::reserved_bytes(),
            ),
            ("data buffers", opts.buffers * BUF_STRIDE),
            ("zero buffer (aligned)", IO_MAX),
            (
                "read-modify-write buffers (aligned)",
                nbd_disk::BOUNCES * BOUNCE_BYTES,
            ),
            (
                "disk operations table and io_uring queues",
                DiskQueue::reserved_bytes(),
            ),
            (
                "readiness events",
                EVENTS_MAX
                    * (core::mem::size_of::<mio::event::Event>()
                        + core::mem::size_of::<(Token, bool, bool)>()),
            ),
        ];
        if metrics.is_some() {
            reserved.push((
                "metrics endpoint (request and response buffers, counters)",
                MetricsEndpoint::reserved_bytes() + NbdMetrics::reserved_bytes(),
            ));
        }
        Ok(NbdServer {
            poll,
            events: Events::with_capacity(EVENTS_MAX),
            ready: Vec::with_capacity(EVENTS_MAX),
            listeners,
            signals,
            slots,
            ctl: Control {
                fsm: ClientFsm::new(ctl_cfg),
                link: Link::new(CTL_AGENT, CTL_SERVER),
            },
            sh: Shared {
                origin,
                store,
                pool,
                disk,
                agent: opts.agent.clone(),
                node_id: opts.node_id,
                export_size: label.origin_size_bytes,
                chunk_bytes: chunk.max(1),
                timeout_ms: opts.failover_timeout_ms,
                write_back: opts.write_back,
                progress: 0,
                wake_at: None,
                nonce: u16::from_le_bytes(nonce),
                next_client: 0,
                stats: NbdStats::default(),
                metrics: NbdMetrics::new(),
            },
            metrics,
            reserved,
            shutdown_at_ms: None,
        })
    }

    /// The memory budget, one line per pool.
    pub fn reserved_items(&self) -> &[(&'static str, usize)] {
        &self.reserved
    }

    /// The bound addresses (TCP ports resolved).
    pub fn local_addrs(&self) -> Vec<Addr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The metrics endpoint's bound address.
    pub fn metrics_addr(&self) -> Option<Addr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// Figures of the run so far.
    pub fn stats(&self) -> NbdStats {
        self.sh.stats
    }

    /// The export size in bytes.
    pub fn export_size_bytes(&self) -> u64 {
        self.sh.export_size
    }

    /// Removes the unix listeners' socket files (after `run`, before the
    /// process ends by `_exit`). Frees nothing.
    pub fn remove_socket_files(&self) {
        for l in &self.listeners {
            l.remove_socket_file();
        }
        if let Some(m) = &self.metrics {
            m.remove_socket_file();
        }
    }

    /// Serves until SIGTERM or SIGINT, then finishes in-flight commands,
    /// flushes both devices and returns. Allocates nothing, its errors
    /// included.
    pub fn run(&mut self) -> Result<(), NbdStop> {
        loop {
            let now = now_ms();
            self.sh.wake_at = None;
            let mut busy = true;
            for _ in 0..16 {
                let before = self.sh.progress;
                self.pump_control(now);
                for s in 0..self.slots.len() {
                    self.slots[s].pump(&mut self.sh, &mut self.ctl, self.poll.registry(), now);
                }
                self.disk_turn()?;
                if self.sh.progress == before {
                    busy = false;
                    break;
                }
            }
            self.metrics_turn(now);
            self.check();
            if let Some(at) = self.shutdown_at_ms {
                let idle = self.slots.iter().all(|s| s.state == SlotState::Free);
                if idle || now >= at {
                    if !idle {
                        eprintln!(
                            "csnap nbd: shutdown deadline passed with connections still busy"
                        );
                    }
                    if !self.sh.sync_both() {
                        return Err(NbdStop::FinalFlush);
                    }
                    return Ok(());
                }
                self.sh.wake(at);
            }
            let timeout = if busy {
                Some(std::time::Duration::ZERO)
            } else {
                self.sh
                    .wake_at
                    .map(|w| std::time::Duration::from_millis(w.saturating_sub(now_ms())))
            };
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NbdStop::Poll(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            self.ready.clear();
            for ev in self.events.iter() {
                self.ready.push((
                    ev.token(),
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable() || ev.is_error(),
                ));
            }
            for k in 0..self.ready.len() {
                let (t, r, w) = self.ready[k];
                self.dispatch(t, r, w);
            }
        }
    }

    /// Starts what the disk queue can start, submits, and hands finished
    /// operations to their engines.
    fn disk_turn(&mut self) -> Result<(), NbdStop> {
        let Shared {
            disk,
            pool,
            origin,
            store,
            stats,
            progress,
            ..
        } = &mut self.sh;
        let slots = &mut self.slots;
        let mut fin = |f: Finished| {
            *progress += 1;
            if f.bounced {
                stats.unaligned += 1;
            }
            if !f.ok {
                stats.disk_errors += 1;
                eprintln!(
                    "csnap nbd: disk operation failed (result {}): {:?}",
                    f.result, f.op
                );
            }
            if let Some(s) = slots.get_mut(usize::from(f.conn)) {
                s.disk_finished(&f);
            }
        };
        let r = disk
            .reap(&mut pool.arena, origin, store, &mut fin)
            .and_then(|_| disk.pump(&mut pool.arena, origin, store, &mut fin))
            .and_then(|()| disk.reap(&mut pool.arena, origin, store, &mut fin));
        if let Err(e) = r {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            // Busy (completions to take first) or out of resources for now:
            // the next turn submits again.
            if errno != libc::EBUSY && errno != libc::EAGAIN {
                return Err(NbdStop::Disk(errno));
            }
        }
        if disk.len() > 0 {
            // Completions wake the loop through the ring's descriptor; a
            // short timeout too, as a backstop.
            let at = now_ms() + DISK_BACKSTOP_MS;
            self.sh.wake(at);
        }
        Ok(())
    }

    fn dispatch(&mut self, t: Token, readable: bool, writable: bool) {
        if t == SIGNAL {
            self.on_signal();
        } else if t == DISK {
            // Completions are taken every turn.
        } else if t == CTL_AGENT || t == CTL_SERVER {
            self.ctl.link.on_event(t, readable, writable);
        } else if let Some(m) = self.metrics.as_mut().filter(|m| m.owns(t)) {
            m.on_event(t, readable, writable);
        } else if t.0 >= LISTENER_BASE {
            let li = t.0 - LISTENER_BASE;
            if li < self.listeners.len() {
                self.accept(li);
            }
        } else {
            let (s, k) = (t.0 / TOKENS_PER_SLOT, t.0 % TOKENS_PER_SLOT);
            if let Some(slot) = self.slots.get_mut(s) {
                if k == 0 {
                    slot.client_readable |= readable;
                } else {
                    slot.link.on_event(t, readable, writable);
                }
            }
        }
    }

    fn on_signal(&mut self) {
        while let Ok(Some(sig)) = csnap_sys::signal::read_signal(&self.signals) {
            if self.shutdown_at_ms.is_some() {
                continue;
            }
            eprintln!("csnap nbd: signal {sig}: finishing in-flight commands, then exiting");
            let now = now_ms();
            self.shutdown_at_ms = Some(now + self.sh.timeout_ms + 2_000);
            for l in &mut self.listeners {
                let _ = self.poll.registry().deregister(l);
            }
            for s in &mut self.slots {
                if s.state != SlotState::Free {
                    let serving = s.attached;
                    s.begin_close(serving, now);
                }
            }
        }
    }

    fn accept(&mut self, li: usize) {
        loop {
            let Some(l) = self.listeners.get(li) else {
                return;
            };
            let mut stream = match l.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.shutdown_at_ms.is_some() {
                continue;
            }
            let Some(i) = self.slots.iter().position(|s| s.state == SlotState::Free) else {
                eprintln!(
                    "csnap nbd: connection closed: all {} connections are in use",
                    self.slots.len()
                );
                self.sh.stats.refused += 1;
                continue;
            };
            if self
                .poll
                .registry()
                .register(
                    &mut stream,
                    Token(i * TOKENS_PER_SLOT),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                continue;
            }
            self.slots[i].open(stream);
            self.sh.stats.connections += 1;
            self.sh.moved();
        }
    }

    fn pump_control(&mut self, now: u64) {
        if !self.ctl.link.active() {
            return;
        }
        let slots = &mut self.slots;
        let export_size = self.sh.export_size;
        let write_back = self.sh.write_back;
        let mut ready = false;
        let mut routed = 0u64;
        let mut wake = self.sh.wake_at;
        let metrics = &mut self.sh.metrics;
        let moved = self.ctl.link.pump(
            &mut self.ctl.fsm,
            &self.sh.agent,
            self.poll.registry(),
            now,
            &mut wake,
            &mut |fsm: &mut ClientFsm, f: &[u8]| match fsm.handle_frame(f) {
                ClientEvent::Ready => {
                    ready = true;
                    Verdict::Keep
                }
                ClientEvent::Reply { id } => {
                    if metrics.reply(id, f)
                        || route_control_reply(slots, id, f, export_size, write_back)
                    {
                        routed += 1;
                    }
                    Verdict::Keep
                }
                ClientEvent::Refused(_) | ClientEvent::Stale => Verdict::Reconnect,
                ClientEvent::None | ClientEvent::Unexpected | ClientEvent::Notification => {
                    Verdict::Keep
                }
            },
        );
        self.sh.wake_at = wake;
        if ready {
            self.ctl.link.on_ready();
        }
        if moved || routed > 0 {
            self.sh.moved();
        }
    }

    /// The metrics endpoint's turn (`NbdMetrics::turn`); a scrape's
    /// questions go on the control link now, not at the next wake-up.
    fn metrics_turn(&mut self, now: u64) {
        let Some(ep) = self.metrics.as_mut() else {
            return;
        };
        let n = self.slots.iter().filter(|s| s.state != SlotState::Free);
        let (fsm, reg) = (&mut self.ctl.fsm, self.poll.registry());
        let t = self.sh.metrics.turn(ep, fsm, reg, now, n.count());
        if t.asked {
            if !self.ctl.link.active() {
                self.ctl.link.start(0, self.sh.node_id, None, now);
            }
            self.pump_control(now);
        }
        if let Some(w) = t.wake_ms {
            self.sh.wake(w);
        }
    }

    /// Process-wide invariants (cheap; release builds too).
    fn check(&self) {
        let held: usize = self.slots.iter().map(|s| s.bufs_held).sum();
        assert_eq!(
            held + self.sh.pool.available(),
            self.sh.pool.count,
            "a data buffer was lost or freed twice"
        );
        self.sh.disk.check();
        // Every disk operation belongs to an engine I/O still in flight.
        let ios: usize = self.slots.iter().map(|s| s.engine.in_flight()).sum();
        assert!(
            ios > 0 || self.sh.disk.len() == 0,
            "disk operations without an engine I/O"
        );
    }
}
