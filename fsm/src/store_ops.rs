//! The work the server FSM hands to the store worker, and what comes back.
//!
//! The FSM never touches the store: it emits `StoreRequest`s (one per client
//! request that needs metadata) and consumes `StoreReply`s in the order the
//! worker finished them. The worker runs a batch of requests, performs their
//! copy-outs, commits once (group commit) and only then returns the replies,
//! so every reply the FSM sends is durable.

use arrayvec::ArrayVec;
use csnap_pools::{CHUNKS_PER_REQUEST_MAX, DELTA_QUERY_CHUNKS_MAX, SNAPSHOT_LIST_PAGE_ROWS};

/// Bytes of a delta bitmap: one bit per chunk of the largest delta query.
pub const DELTA_BITMAP_BYTES: usize = DELTA_QUERY_CHUNKS_MAX / 8;

/// A store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// Copy out what live snapshots still need, for `chunks` chunks from
    /// `chunk` of the origin.
    OriginWrite {
        /// First chunk.
        chunk: u64,
        /// Chunk count.
        chunks: u32,
        /// How many chunks after them (at most 64) to look at for a
        /// write-ahead grant (0: none): the answer is then `WriteAhead`.
        ahead: u32,
    },
    /// Where snapshot `tag` reads chunks from.
    SnapshotRead {
        /// Snapshot tag.
        tag: u32,
        /// First chunk.
        chunk: u64,
        /// Chunk count.
        chunks: u32,
    },
    /// Give snapshot `tag` its own store chunks to write.
    SnapshotWrite {
        /// Snapshot tag.
        tag: u32,
        /// First chunk.
        chunk: u64,
        /// Chunk count.
        chunks: u32,
    },
    /// Create a snapshot.
    Create {
        /// Tag.
        tag: u32,
        /// Creation time.
        now_secs: u64,
    },
    /// Delete a snapshot (refused while it is in use).
    Delete {
        /// Tag.
        tag: u32,
    },
    /// Set a snapshot's priority.
    Priority {
        /// Tag.
        tag: u32,
        /// New priority.
        priority: i8,
    },
    /// A client opened (`open`) or closed a snapshot: in-use accounting.
    Use {
        /// Tag.
        tag: u32,
        /// Opened or closed.
        open: bool,
    },
    /// One page of the snapshot list: whole tags from `from`, in tag order.
    List {
        /// The first tag of the page.
        from: u32,
    },
    /// Store figures.
    Status,
    /// Which of `chunks` chunks from `chunk` of `volume` (a snapshot tag,
    /// `None` for the origin) differ from snapshot `base`.
    Delta {
        /// The volume compared.
        volume: Option<u32>,
        /// The snapshot it is compared with.
        base: u32,
        /// First chunk.
        chunk: u64,
        /// Chunk count, `1..=DELTA_QUERY_CHUNKS_MAX`.
        chunks: u32,
    },
    /// A standby starts: read the store, replay its journal, take the next
    /// incarnation durably. With `claim` (its former server may still be
    /// running), it first claims the store and waits out that server's
    /// lease (`Standby::claim`).
    Start {
        /// Claim and wait before reading.
        claim: bool,
    },
}

/// A request to the store worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreRequest {
    /// The FSM's handle for the request (its in-flight slot).
    pub token: u32,
    /// What to do.
    pub op: StoreOp,
}

/// Where one chunk of a snapshot read or write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// Read from the origin (under a read lock the FSM takes).
    #[default]
    Origin,
    /// The store data chunk.
    Store(u64),
}

/// Why a store operation failed; each maps to a wire error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// No such snapshot.
    NoSuchSnapshot,
    /// The tag is taken.
    SnapshotExists,
    /// The snapshot table is full (`SNAPSHOTS_MAX` live or being deleted).
    TooManySnapshots,
    /// Past the end of the origin.
    OutOfRange,
    /// No room for the copy-out.
    StoreFull,
    /// The snapshot is in use by a client.
    InUse,
    /// The store failed (I/O error, corruption): the server must stop.
    Internal,
    /// A newer server incarnation took the store over: this server must stop.
    Fenced,
    /// A metadata block this request needs is corrupt: the request fails,
    /// the server goes on serving the rest.
    Corrupt,
}

/// One snapshot in a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapRow {
    /// Tag.
    pub tag: u32,
    /// Priority.
    pub priority: i8,
    /// Being deleted.
    pub deleting: bool,
    /// In use by a client.
    pub in_use: bool,
    /// Creation time.
    pub ctime_secs: u64,
    /// Chunks referenced.
    pub chunks: u64,
    /// Chunks referenced by it alone.
    pub unique_chunks: u64,
}

/// Store figures for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreFigures {
    /// Durable incarnation.
    pub incarnation: u64,
    /// Chunk size.
    pub chunk_size_bytes: u32,
    /// Origin chunks.
    pub origin_chunks: u64,
    /// Data chunks.
    pub data_chunks: u64,
    /// Free data chunks.
    pub data_free: u64,
    /// Metadata blocks.
    pub meta_blocks: u64,
    /// Free metadata blocks.
    pub meta_free: u64,
    /// Live snapshots.
    pub snapshots: u32,
    /// Snapshots being deleted.
    pub deleting: u32,
    /// Journal commits since the store was formatted (its last sequence).
    pub commits: u64,
    /// Copy-outs this worker made since the process started.
    pub copyouts: u64,
}

/// What came back.
// Replies travel by value through a ring reserved at init; boxing the large
// variants would allocate per reply.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreResult {
    /// Done (origin write granted from the store's side, create, delete,
    /// priority, use).
    Done,
    /// An origin write done from the store's side, and which of the chunks
    /// right after it need no copy-out either (asked with `ahead`): bit `k`
    /// is chunk `chunk + chunks + k`.
    WriteAhead(u64),
    /// Per-chunk targets of a snapshot read or write, in chunk order
    /// (inline, at most one request's chunks).
    Targets(ArrayVec<Target, CHUNKS_PER_REQUEST_MAX>),
    /// A page of the listing (inline, `SNAPSHOT_LIST_PAGE_ROWS` rows at
    /// most; empty past the last tag).
    List(ArrayVec<SnapRow, SNAPSHOT_LIST_PAGE_ROWS>),
    /// Figures.
    Status(StoreFigures),
    /// A delta: bit `i` of `bits` set when chunk `chunk + i` differs.
    Delta {
        /// First chunk.
        chunk: u64,
        /// Chunk count.
        chunks: u32,
        /// The bitmap (`ceil(chunks / 8)` bytes in use, the rest zero).
        bits: [u8; DELTA_BITMAP_BYTES],
    },
    /// Failed.
    Failed(StoreFailure),
    /// Notification: a corrupt metadata block was met (heap-free, for the
    /// server's problem line).
    Corrupt {
        /// Block address.
        addr: u64,
        /// What the block was expected to be.
        kind: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A standby started.
    Started {
        /// The new incarnation.
        incarnation: u64,
        /// The store's id (first 8 bytes of its UUID).
        server_id: u64,
        /// Chunk size.
        chunk_size_bytes: u32,
        /// Origin size.
        origin_size_bytes: u64,
        /// Origin id.
        origin_uuid: [u8; 16],
        /// Journal commits replayed.
        replayed: u64,
    },
    /// A snapshot was deleted by the store-full policy to make room (reported
    /// to the log by the server); the request it served is answered by its own
    /// reply.
    AutoDeleted {
        /// Tag of the deleted snapshot.
        tag: u32,
    },
}

/// A reply from the store worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreReply {
    /// The request's token.
    pub token: u32,
    /// The result.
    pub result: StoreResult,
}
