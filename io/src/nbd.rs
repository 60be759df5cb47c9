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

use heapless::Deque;
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
use csnap_fsm::nbd_cmds::{self, BufRef};
use csnap_fsm::nbd_conn::{self, Answer, ConnEvent, NbdCommands, Needs};
use csnap_fsm::volume::{DiskOp, EngineSignal, IoError, VolumeConfig, VolumeEngine};
use csnap_proto::{self as proto, ErrorCode, FrameReader, Msg, Role, Volume, FRAME_MAX_BYTES};
use mio::{Events, Interest, Poll, Registry, Token};

use crate::conns::{Listeners, StreamIo, Streams, LISTENER_BASE};
use crate::metrics::{MetricsEndpoint, NbdMetrics, METRICS_TOKENS};
use crate::net::{Addr, MioListener, MioStream};

mod commands;
mod control;
mod link;
mod server;
mod slot;

use control::*;
use link::*;
pub use server::{NbdServer, NbdStop};

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
/// Listen addresses: their tokens (`LISTENER_BASE + i`, the shared
/// listener table's) stay below the loop's own.
const LISTENERS_MAX: usize = csnap_pools::NBD_LISTENERS_MAX;
const _: () = assert!(LISTENER_BASE + LISTENERS_MAX <= DISK.0);
const _: () = assert!(LISTENERS_MAX <= crate::conns::LISTENERS_MAX);
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
/// Replies one `writev` gathers (the queued headers and up to this many
/// less one data replies).
const GATHER: usize = 16;
/// Extents per context in one block-status reply.
const EXTENTS_MAX: usize = csnap_pools::NBD_BLOCK_STATUS_EXTENTS_MAX;
/// Chunks one delta query covers.
const DELTA_CHUNKS: usize = csnap_pools::DELTA_QUERY_CHUNKS_MAX;
// A block-status reply with every context a session may select fits a
// data buffer.
const _: () = assert!(
    csnap_pools::NBD_META_SELECTED_MAX * (BLOCK_STATUS_HEADER_BYTES + EXTENT_BYTES * EXTENTS_MAX)
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
    /// The clients' connections, one per slot (the table every process
    /// loop keeps its connections in, `crate::conns::Streams`).
    streams: Streams,
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
    /// The client's connection is `Shared::streams` entry `index`.
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
    /// The admitted commands, their engine I/Os and their answers
    /// (`csnap_fsm::nbd_conn`).
    commands: NbdCommands,
    /// Header-only replies to write (each at most `HDR_MAX` bytes), and
    /// their lengths, so that the queue counts replies, not bytes.
    hdr_out: [u8; CMDS * HDR_MAX],
    hdr_start: usize,
    hdr_end: usize,
    hdr_lens: Deque<u8, CMDS>,
    hdr_front_written: usize,
    /// Replies in a buffer to write: buffer, first and end byte in it.
    data_out: Deque<(u16, u32, u32), CMDS>,
    data_written: usize,
    /// The volume served (for delta queries).
    volume: Volume,
    /// The delta bitmap of the block-status command in progress.
    delta: Box<[u8]>,
    delta_state: DeltaState,
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
