//! Every bound of csnap lives here.
//!
//! Naming: the unit or qualifier comes last (`block_size_bytes`, `snapshots_max`).
//! `_MAX` is a compile-time capacity; a runtime setting that must not exceed it is
//! called a `_limit` where it is configured. Each group ends with static assertions
//! that say why the relations between the bounds hold.
//!
//! The server issue (#3) and the confinement issue (#4) add the connection, lock,
//! request and timer bounds to this module; the store's bounds are here already.

#![forbid(unsafe_code)]

pub mod slab;

use static_assertions::const_assert;

// ---------------------------------------------------------------------------
// Store: blocks, chunks, snapshots.
// ---------------------------------------------------------------------------

/// Size of every metadata block (label, superblock, journal, bitmap, b-tree).
/// Memory cost: one metadata cache slot is one block.
pub const BLOCK_SIZE_BYTES: usize = 4096;

/// Smallest chunk (copy-out unit) a store may be formatted with.
pub const CHUNK_SIZE_MIN_BYTES: u32 = 4096;
/// Largest chunk a store may be formatted with.
pub const CHUNK_SIZE_MAX_BYTES: u32 = 1 << 20;
/// Chunk size used when `csnap format` is not given one. 16 KiB: see
/// ARCHITECTURE.md "Chunk size" for the measurement behind the choice.
pub const CHUNK_SIZE_DEFAULT_BYTES: u32 = 16 * 1024;

/// Snapshots one store holds at once (live or being deleted). One bit of a
/// share mask each. The feature `snapshots-1024` builds the store at 1024
/// (#13): the store crate's tests run so in CI while the server, the NBD
/// export and the wire protocol still size their replies for 64
/// (ARCHITECTURE 2.12).
#[cfg(not(feature = "snapshots-1024"))]
pub const SNAPSHOTS_MAX: usize = 64;
/// Snapshots one store holds at once (the `snapshots-1024` build).
#[cfg(feature = "snapshots-1024")]
pub const SNAPSHOTS_MAX: usize = 1024;

/// Rows of one page of the snapshot list (`ListSnapshots { from }`): the
/// store answers a listing a page at a time, so no store reply, ring slot
/// or wire frame grows with `SNAPSHOTS_MAX`.
pub const SNAPSHOT_LIST_PAGE_ROWS: usize = 32;

/// 64-bit words of an in-memory share mask (one bit per snapshot). On disk
/// a record holds one word and the index of the 64-slot window it covers
/// (ARCHITECTURE 2.2).
pub const SHARE_MASK_WORDS: usize = SNAPSHOTS_MAX / 64;

/// Levels of the exception b-tree, leaves included. 8 levels of 253-way nodes
/// over 168-record leaves address far more than 2^64 chunks, so this bound is
/// never the binding one; it sizes the per-operation path arrays.
pub const TREE_DEPTH_MAX: usize = 8;

/// Blocks (commit block excluded) one journal transaction may carry. The commit
/// block lists each with a 16-byte entry, so this is bounded by what one block
/// can list.
pub const TX_BLOCKS_MAX: usize = 240;

/// Copy-out chunks one commit can vouch for by checksum (a journal-only
/// block after the commit block lists `{chunk u64, crc32c u32}` in 16-byte
/// entries after a 64-byte header). A transaction that writes more data
/// chunks than this, or data it cannot checksum, flushes its data before
/// its journal write instead (ARCHITECTURE 2.6).
pub const TX_DATA_CHUNKS_MAX: usize = (BLOCK_SIZE_BYTES - 64) / 16;

/// Smallest journal a store may be formatted with, in blocks.
pub const JOURNAL_MIN_BLOCKS: u64 = 128;
/// Journal size used when `csnap format` is not given one, in blocks (4 MiB).
pub const JOURNAL_DEFAULT_BLOCKS: u64 = 1024;

/// Worst-case blocks one mapping operation (origin write, snapshot write) can
/// dirty: the leaf, a split of every level plus a new root (2 per level + 1),
/// the data bitmap block, and one metadata bitmap block per new node.
pub const OP_DIRTY_BLOCKS_MAX: usize = 1 + 2 * TREE_DEPTH_MAX + 1 + 1 + (TREE_DEPTH_MAX + 1);

/// Blocks one operation may touch (read or write) in the cache, which must stay
/// resident until the operation returns: the dirty bound plus the read path.
pub const OP_TOUCHED_BLOCKS_MAX: usize = OP_DIRTY_BLOCKS_MAX + TREE_DEPTH_MAX + 4;

/// Smallest metadata cache, in blocks.
pub const CACHE_MIN_BLOCKS: usize = 2 * OP_TOUCHED_BLOCKS_MAX + 64;
/// Default metadata cache, in blocks (16 MiB).
pub const CACHE_DEFAULT_BLOCKS: usize = 4096;

/// Largest direct-I/O alignment (buffer address, offset and length) a store
/// or origin device may need: the block size of the store's metadata, so
/// every metadata block is one aligned transfer.
pub const DIO_ALIGN_MAX_BYTES: usize = BLOCK_SIZE_BYTES;
/// A panic report's bytes (the panic hook formats into a stack buffer of
/// this size; a longer message is truncated).
pub const PANIC_REPORT_BYTES: usize = 2048;
/// The sealed allocator's panic arena: what std allocates for a panic's
/// formatted message on the way to the hook, served without a syscall.
pub const PANIC_ARENA_BYTES: usize = 64 * 1024;
const_assert!(PANIC_REPORT_BYTES <= THREAD_STACK_BUDGET_BYTES / 16);
const_assert!(PANIC_ARENA_BYTES >= 4 * PANIC_REPORT_BYTES);

/// The aligned bounce buffer of each direct `FileDisk` (reserved at open):
/// an access whose buffer, offset or length is not aligned goes through it,
/// in pieces of at most this size (read-modify-write at unaligned edges).
pub const DISK_BOUNCE_BYTES: usize = 256 * 1024;

/// Chunks freed in one transaction before it must commit. Freed chunks are
/// reusable only after the commit that frees them is durable.
pub const TX_FREES_MAX: usize = 4096;

/// Snapshot priority that is never chosen by the store-full policy.
pub const PRIORITY_NEVER_DELETE: i8 = 127;

const_assert!(BLOCK_SIZE_BYTES.is_power_of_two());
const_assert!(CHUNK_SIZE_MIN_BYTES as usize >= BLOCK_SIZE_BYTES);
const_assert!(CHUNK_SIZE_MIN_BYTES.is_power_of_two());
const_assert!(CHUNK_SIZE_MAX_BYTES.is_power_of_two());
const_assert!(CHUNK_SIZE_DEFAULT_BYTES >= CHUNK_SIZE_MIN_BYTES);
const_assert!(CHUNK_SIZE_DEFAULT_BYTES <= CHUNK_SIZE_MAX_BYTES);
const_assert!(SNAPSHOTS_MAX.is_multiple_of(64));
// A record's window index is 16 bits (the top of its store-chunk field).
const_assert!(SHARE_MASK_WORDS <= 1 << 16);

/// Rounds `format` takes to fit its layout to the device: each one lays out
/// the data chunks counted so far and, when the end overshoots the device,
/// drops at least one chunk and as many as the excess covers; past the
/// bound the device is refused as too small.
pub const FORMAT_LAYOUT_ROUNDS_MAX: usize = 64;
// A commit block lists every block of its transaction in 16-byte entries after
// a 64-byte header.
const_assert!(64 + 16 * TX_BLOCKS_MAX <= BLOCK_SIZE_BYTES);
const_assert!(64 + 16 * TX_DATA_CHUNKS_MAX <= BLOCK_SIZE_BYTES);
// A transaction is capped at (journal - 9) / 3 dirty blocks (a commit is at
// most that plus the commit block, the data-checksum block and the
// superblock) so that the last commit, the next one and the gap left by a
// wrap always fit in the ring. The commit before the last is kept too when
// there is room (replay may start there); when the next commit would
// overwrite it, that commit flushes first (ARCHITECTURE 2.6). One operation
// must fit in an otherwise empty transaction of the smallest journal.
const_assert!((OP_DIRTY_BLOCKS_MAX as u64) < (JOURNAL_MIN_BLOCKS - 9) / 3);
const_assert!(JOURNAL_DEFAULT_BLOCKS >= JOURNAL_MIN_BLOCKS);
const_assert!(JOURNAL_DEFAULT_BLOCKS >= 3 * (TX_BLOCKS_MAX as u64 + 3));
// The cache holds a full transaction's dirty blocks plus one operation's
// working set.
const_assert!(CACHE_MIN_BLOCKS > OP_TOUCHED_BLOCKS_MAX + OP_DIRTY_BLOCKS_MAX);
const_assert!(DIO_ALIGN_MAX_BYTES.is_power_of_two());
const_assert!(DISK_BOUNCE_BYTES.is_multiple_of(DIO_ALIGN_MAX_BYTES));
const_assert!(DISK_BOUNCE_BYTES >= 2 * DIO_ALIGN_MAX_BYTES);
const_assert!(CACHE_DEFAULT_BLOCKS >= TX_BLOCKS_MAX + OP_TOUCHED_BLOCKS_MAX);

/// Memory the store reserves at open for a cache of `cache_blocks`, one line
/// per consumer.
#[must_use]
pub fn store_reserved_items(cache_blocks: usize) -> [(&'static str, usize); 6] {
    [
        ("metadata cache blocks", cache_blocks * BLOCK_SIZE_BYTES),
        ("metadata cache slot descriptors", cache_blocks * 32),
        (
            "metadata cache hash index",
            cache_blocks.next_power_of_two() * 2 * 4,
        ),
        (
            "journal staging buffer",
            (TX_BLOCKS_MAX + 4) * BLOCK_SIZE_BYTES,
        ),
        ("pending frees of the open transaction", TX_FREES_MAX * 8),
        (
            "data checksums of the open and the last transaction",
            TX_DATA_CHUNKS_MAX * (16 + 8),
        ),
    ]
}

/// Total of `store_reserved_items`.
#[must_use]
pub fn store_reserved_bytes(cache_blocks: usize) -> usize {
    store_reserved_items(cache_blocks)
        .iter()
        .map(|(_, b)| b)
        .sum()
}

// ---------------------------------------------------------------------------
// Server: clients, requests, read locks.
// ---------------------------------------------------------------------------

/// Client connections one server accepts at once (compile-time ceiling of the
/// `--clients` setting). Memory: one session record and one output buffer each.
pub const CLIENTS_MAX: usize = 1024;
/// Default for the `--clients` setting.
pub const CLIENTS_DEFAULT: usize = 64;

/// Requests one client may have in flight (sent, not yet answered). Past it
/// the server stops reading that client's socket: backpressure, not a queue.
pub const REQUESTS_PER_CLIENT_MAX: usize = 256;
/// Default for the `--requests-per-client` setting.
pub const REQUESTS_PER_CLIENT_DEFAULT: usize = 64;

/// Chunks one request may name (all its ranges together).
pub const CHUNKS_PER_REQUEST_MAX: usize = 256;

/// Chunks past an origin write's own that the server looks at for a
/// caching client's write-ahead grant: those that need no copy-out and hold
/// no read lock are granted with the write (the client's later writes there
/// go straight to the disk, as rewrites in a warm cache do). One bit each
/// in the store's answer; one descent per leaf the window touches.
pub const ORIGIN_WRITE_AHEAD_CHUNKS: u32 = 64;
const_assert!(ORIGIN_WRITE_AHEAD_CHUNKS <= 64);

/// Chunks one delta query (`QueryDelta`: which chunks of a volume differ
/// from a snapshot) covers: its reply is a bitmap of one bit per chunk, 4
/// KiB, within one server reply. Longer ranges are walked in pieces (NBD
/// block status answers at most this much per request; `csnap snapshot
/// diff` asks piece after piece). Memory: one bitmap per store reply slot.
pub const DELTA_QUERY_CHUNKS_MAX: usize = 32 * 1024;
const_assert!(DELTA_QUERY_CHUNKS_MAX.is_multiple_of(8));
// The bitmap is no larger than the largest snapshot-read reply's targets,
// so a store reply (passed by value through the worker's rings) grows by
// its few fixed fields at most.
const_assert!(DELTA_QUERY_CHUNKS_MAX / 8 <= CHUNKS_PER_REQUEST_MAX * 16);

/// Read locks held at once across all clients (ceiling of `--read-locks`).
pub const READ_LOCKS_MAX: usize = 1 << 20;
/// Default for the `--read-locks` setting.
pub const READ_LOCKS_DEFAULT: usize = 16 * 1024;

/// Requests the store worker takes in one batch (one commit). Memory: one
/// request each in the worker's batch buffer.
pub const STORE_BATCH_MAX: usize = 256;

/// Readiness events the network loop handles per turn.
pub const EVENTS_PER_TURN_MAX: usize = 1024;

/// Records one background deletion step clears before it commits.
pub const DELETE_STEP_RECORDS_MAX: usize = 4096;

/// Stack each server thread may use, touched before the heap is sealed.
pub const THREAD_STACK_BUDGET_BYTES: usize = 256 * 1024;

/// A server's store worker reads the on-disk incarnation before a batch when
/// it last did so longer ago than this (commits check it too): a server
/// paused or cut off while another took the store over stops answering
/// within one period, even if it commits nothing.
pub const SERVER_FENCE_RECHECK_MS: u64 = 50;

/// A serving server's lease on the store: it writes the store device
/// (journal, home blocks, copy-out data) only within this time of a fence
/// read that found no newer incarnation; past it, the next write reads the
/// fence first. A commit's own fence read renews it.
pub const SERVER_LEASE_MS: u64 = SERVER_FENCE_RECHECK_MS;

/// A takeover whose former server may still run (its death was not seen
/// by its own agent: a node lost, a start abandoned) claims the store (a
/// higher incarnation in the home superblock), then waits this long before
/// it reads anything, and checks that its claim is still there: every
/// write of a former server that read the fence before the claim is then
/// on the disk, and every later one is refused by its lease. The margin
/// over the lease covers a write issued at the end of the lease and still
/// in the device's queue.
pub const SERVER_TAKEOVER_WAIT_MS: u64 = 2 * SERVER_LEASE_MS;
const _: () = assert!(SERVER_TAKEOVER_WAIT_MS > SERVER_LEASE_MS);

/// Claims made before a takeover gives up: a claim overwritten during the
/// wait (a former server's home write of the superblock) is made again.
pub const SERVER_CLAIM_ATTEMPTS_MAX: u32 = 3;

/// How long a standby's failover start waits for the host-local store lock
/// held by the server it replaces on the same host while that one is still
/// exiting (a killed process's sockets can close, and so its agent start
/// the failover, before its store file is released). A live holder past
/// this is a refusal.
pub const STANDBY_LOCK_WAIT_MS: u64 = 1_000;
/// Pause between a standby's attempts at the store lock.
pub const STANDBY_LOCK_RETRY_US: u64 = 20;

/// Expected clients, and members, one standby start command may name.
pub const START_LIST_MAX: usize = 256;
/// Bytes of the start command a standby without an agent reads from its
/// standard input (`start [claim] members=... expected=...`, one line: the
/// manual and test path). Memory: one buffer on the standby's stack.
pub const STANDBY_START_LINE_MAX_BYTES: usize = 4096;

/// Read locks (chunks) one client remembers for upload after a reconnect:
/// a caching client's idle leases plus every chunk its I/Os in flight pin.
pub const CLIENT_HELD_LOCKS_MAX: usize = 32 * 1024;

/// I/Os one volume engine (one NBD connection) has in flight.
pub const VOLUME_IOS_MAX: usize = 64;
/// Largest I/O a volume engine takes (the NBD maximum payload advertised).
pub const VOLUME_IO_MAX_BYTES: u32 = 1 << 20;
/// Idle snapshot leases a volume engine keeps by default.
pub const VOLUME_CACHED_CHUNKS_DEFAULT: usize = 4096;
/// Chunks past the end of a snapshot read whose mappings (leases) a volume
/// engine asks for in the same query, by default: a sequential reader
/// pays one server round trip per this many chunks, not one per chunk.
pub const VOLUME_READ_AHEAD_CHUNKS_DEFAULT: usize = 32;
const_assert!(VOLUME_READ_AHEAD_CHUNKS_DEFAULT < CHUNKS_PER_REQUEST_MAX);
const_assert!(VOLUME_READ_AHEAD_CHUNKS_DEFAULT <= VOLUME_CACHED_CHUNKS_DEFAULT);
/// Times a volume engine asks a query again that the server answered `Busy`
/// (one of its pools is full, most likely the lock table), giving back its
/// idle leases before each; then the I/O fails with the error.
pub const VOLUME_BUSY_RETRIES_MAX: u8 = 3;
// At least one retry, so a Busy from leases this engine holds idle is cured.
const_assert!(VOLUME_BUSY_RETRIES_MAX >= 1);

const_assert!(CLIENTS_DEFAULT <= CLIENTS_MAX);
const_assert!(REQUESTS_PER_CLIENT_DEFAULT <= REQUESTS_PER_CLIENT_MAX);
const_assert!(READ_LOCKS_DEFAULT <= READ_LOCKS_MAX);
// Every chunk of every in-flight snapshot read of the default configuration
// can hold a lock at once only if the table is at least this big; smaller
// tables answer Busy instead, which is allowed but should not be the default.
const_assert!(READ_LOCKS_DEFAULT >= REQUESTS_PER_CLIENT_DEFAULT * CHUNKS_PER_REQUEST_MAX);
// The stack budget must fit a default 2 MiB thread stack.
const_assert!(THREAD_STACK_BUDGET_BYTES < 2 * 1024 * 1024);
const_assert!(START_LIST_MAX <= CLIENTS_MAX);
// The start line buffer is a small part of the prefaulted stack.
const_assert!(STANDBY_START_LINE_MAX_BYTES <= THREAD_STACK_BUDGET_BYTES / 16);

// ---------------------------------------------------------------------------
// NBD export: one session per NBD connection (`csnap-fsm::nbd`).
// ---------------------------------------------------------------------------

/// Metadata contexts one NBD export offers, and one session may select:
/// `base:allocation`, and `x-csnap:changed-since:<tag>` and
/// `qemu:dirty-bitmap:since-<tag>` for every snapshot.
pub const NBD_META_CONTEXTS_MAX: usize = 1 + 2 * SNAPSHOTS_MAX;
/// Extents one `NBD_CMD_BLOCK_STATUS` reply gives per selected context
/// (a reply may cover less than the request; the client asks again from
/// where it ends). With every context selected, a reply fits one data
/// buffer (`VOLUME_IO_MAX_BYTES`).
pub const NBD_BLOCK_STATUS_EXTENTS_MAX: usize = 512;
/// Contexts one NBD session may select (`SET_META_CONTEXT`): every context
/// of an export at 64 snapshots; past that a selection stops at 129 (a
/// `SET` answers the first 129 matching contexts, as the protocol allows),
/// so that a block-status reply, one chunk per selected context, still
/// fits a data buffer.
pub const NBD_META_SELECTED_MAX: usize = if NBD_META_CONTEXTS_MAX < 129 {
    NBD_META_CONTEXTS_MAX
} else {
    129
};
const_assert!(
    NBD_META_SELECTED_MAX * (24 + 8 * NBD_BLOCK_STATUS_EXTENTS_MAX) <= VOLUME_IO_MAX_BYTES as usize
);

/// Largest `NBD_CMD_READ` or `NBD_CMD_WRITE` payload an NBD session accepts:
/// the ceiling of the configured payload limit, which is advertised as the
/// maximum block size. 32 MiB (2^25) is what the NBD protocol tells clients
/// to stay within when no limit was advertised, and what qemu and the kernel
/// send at most. Memory: the I/O driver's payload buffers, not the session.
pub const NBD_PAYLOAD_MAX_BYTES: u32 = 32 << 20;

/// Longest export name an NBD session handles. 256 bytes is the protocol's
/// recommended bound for strings (4096 is its hard one); csnap names its
/// exports itself and keeps them far shorter. A client naming a longer export
/// gets `NBD_REP_ERR_UNKNOWN` (or a close, for `NBD_OPT_EXPORT_NAME`).
/// Memory: one name copy per session.
pub const NBD_EXPORT_NAME_MAX_BYTES: usize = 256;

/// Option data an NBD session reads into its receive scratch (the data of
/// `NBD_OPT_EXPORT_NAME`, `NBD_OPT_INFO` and `NBD_OPT_GO`). Longer `INFO` and
/// `GO` data is skipped and answered `NBD_REP_ERR_TOO_BIG`. Memory: the
/// receive scratch of each session.
pub const NBD_OPTION_DATA_MAX_BYTES: usize = 4096;

/// Option data an NBD session skips (options it refuses, or data too long to
/// read). A longer option is taken as a denial-of-service attempt, which the
/// protocol allows the server to answer with a hard disconnect.
pub const NBD_OPTION_SKIP_MAX_BYTES: u32 = 1 << 20;

/// Payload of a rejected `NBD_CMD_WRITE` that an NBD session skips (so that
/// the client gets its error and the stream stays in sync). A longer write
/// closes the connection: the protocol lets the server treat payloads of
/// 2^25 bytes and more as a denial-of-service attack.
pub const NBD_WRITE_SKIP_MAX_BYTES: u32 = 64 << 20;

/// Bytes of the handshake-phase reply a session queues for one option, list
/// entries (`NBD_REP_SERVER`) aside: room the session needs free in its
/// transmit buffer before it reads the next option.
pub const NBD_OPTION_REPLY_MAX_BYTES: usize = 256;

/// Transmit buffer of an NBD session (handshake greeting and option replies;
/// transmission-phase replies are the driver's). Memory: one per session.
pub const NBD_TRANSMIT_BUFFER_BYTES: usize = 4096;

const_assert!(NBD_PAYLOAD_MAX_BYTES.is_power_of_two());
// A payload limit below 4 KiB would refuse ordinary 4 KiB I/O.
const_assert!(NBD_PAYLOAD_MAX_BYTES as usize >= BLOCK_SIZE_BYTES);
// An `INFO`/`GO` request naming the longest export with 64 information
// requests (u32 name length, name, u16 count, u16 each) fits the scratch.
const_assert!(4 + NBD_EXPORT_NAME_MAX_BYTES + 2 + 2 * 64 <= NBD_OPTION_DATA_MAX_BYTES);
// `NBD_OPT_EXPORT_NAME` data is the bare name.
const_assert!(NBD_EXPORT_NAME_MAX_BYTES <= NBD_OPTION_DATA_MAX_BYTES);
// The protocol's string limit: longer names are never valid.
const_assert!(NBD_EXPORT_NAME_MAX_BYTES <= 4096);
// Data the scratch holds is never refused as too long to skip.
const_assert!(NBD_OPTION_SKIP_MAX_BYTES as usize >= NBD_OPTION_DATA_MAX_BYTES);
// Every write the session could accept is skippable when rejected, and no
// write below the protocol's 2^25-byte denial-of-service line closes.
const_assert!(NBD_WRITE_SKIP_MAX_BYTES >= NBD_PAYLOAD_MAX_BYTES);
const_assert!(NBD_WRITE_SKIP_MAX_BYTES >= 1 << 25);
// The largest single reply is the `NBD_OPT_EXPORT_NAME` reply with its 124
// zero bytes: size (8), transmission flags (2), zeroes (124).
const_assert!(NBD_OPTION_REPLY_MAX_BYTES >= 8 + 2 + 124);
// The greeting (18 bytes) and one option's reply fit at once, and so do one
// list entry of the longest name (20-byte reply header, u32 length, name) and
// the room kept for the reply that ends the list.
const_assert!(NBD_TRANSMIT_BUFFER_BYTES >= 18 + NBD_OPTION_REPLY_MAX_BYTES);
const_assert!(
    NBD_TRANSMIT_BUFFER_BYTES >= 20 + 4 + NBD_EXPORT_NAME_MAX_BYTES + NBD_OPTION_REPLY_MAX_BYTES
);
// An engine's idle leases plus every chunk its I/Os may pin (at the smallest
// chunk size) and read ahead fit the client's held-lock table, which is
// uploaded whole after a failover.
const_assert!(
    VOLUME_CACHED_CHUNKS_DEFAULT
        + VOLUME_IOS_MAX
            * ((VOLUME_IO_MAX_BYTES / CHUNK_SIZE_MIN_BYTES) as usize
                + 1
                + VOLUME_READ_AHEAD_CHUNKS_DEFAULT)
        <= CLIENT_HELD_LOCKS_MAX
);

// ---------------------------------------------------------------------------
// NBD server (`csnap nbd`, `csnap-io::nbd`): connection slots and buffers.
// ---------------------------------------------------------------------------

/// NBD connections one `csnap nbd` process serves at once (ceiling of
/// `--connections`). Memory: one slot each (session, receive buffer, volume
/// engine with its lease tables, frame readers of its server and agent
/// links), printed at start.
pub const NBD_CONNECTIONS_MAX: usize = 256;
/// Addresses one `csnap nbd` listens on (unix and TCP; each a token below
/// the loop's own).
pub const NBD_LISTENERS_MAX: usize = 60;
/// Default for `--connections`.
pub const NBD_CONNECTIONS_DEFAULT: usize = 16;

/// Data buffers of `VOLUME_IO_MAX_BYTES` (plus a reply header) in the
/// process-wide pool (ceiling of `--buffers`). A `READ` or `WRITE` holds one
/// from its arrival (or its payload) until its reply is written; a command
/// that finds none waits and its connection is not read (backpressure).
pub const NBD_BUFFERS_MAX: usize = 1024;
/// Default for `--buffers` (64 MiB).
pub const NBD_BUFFERS_DEFAULT: usize = 64;
/// Buffers one NBD connection holds at once, so that one client cannot take
/// the whole pool: as many as its engine has I/Os in flight.
pub const NBD_BUFFERS_PER_CONNECTION_MAX: usize = VOLUME_IOS_MAX;

/// Largest direct-I/O alignment `csnap nbd` serves a device with (its
/// logical block size, or `STATX_DIOALIGN` of a file); a device that needs
/// more is refused at start. Each data buffer keeps this much room in front
/// of its data (the 16-byte reply header sits just before the data, which
/// starts aligned), and the read-modify-write bounce buffer is one I/O plus
/// two of it.
pub const NBD_DIO_ALIGN_MAX_BYTES: usize = 4096;

/// Disk operations the NBD server has in flight at once (all connections,
/// on its io_uring; the ring has room for two requests each, the two edge
/// reads of a read-modify-write). Past it a connection's engine keeps its
/// next operation until one finishes.
pub const NBD_DISK_OPS_MAX: usize = 1024;

/// Bounce buffers of `VOLUME_IO_MAX_BYTES` plus two aligned blocks for disk
/// operations not aligned for direct I/O (read-modify-write): that many at
/// once; another one waits.
pub const NBD_RMW_BUFFERS: usize = 4;

/// Commands one NBD connection has admitted and not yet answered (in the
/// engine, queued for it, or with a reply waiting to be written). Past it
/// the connection is not read.
pub const NBD_COMMANDS_PER_CONNECTION_MAX: usize = 2 * VOLUME_IOS_MAX;

/// Receive buffer of one NBD connection: request headers and small
/// payloads (larger payloads are read straight into a data buffer).
pub const NBD_RECEIVE_BUFFER_BYTES: usize = 64 * 1024;

/// Output buffer of a link to the node's agent (`Hello`, `NeedServer`).
pub const NBD_AGENT_OUT_BYTES: usize = 256;

/// How long a closing NBD connection may take to write its last replies
/// to a client that does not read them before they are dropped.
pub const NBD_CLOSE_LINGER_MS: u64 = 1_000;

/// Rounds one NBD connection's pump makes in a loop turn (its server link,
/// timers, block-status lists, client input, engine, client output), each
/// until a round moves nothing: the bound keeps one busy connection from
/// starving the others.
pub const NBD_SLOT_PUMP_ROUNDS_MAX: usize = 64;
/// Rounds over every connection (and the disk) in one NBD loop turn before
/// it polls again, each until a round moves nothing.
pub const NBD_LOOP_ROUNDS_MAX: usize = 16;
/// Writes a best-effort flush of a server link's output makes before the
/// link is closed.
pub const NBD_FLUSH_WRITES_MAX: usize = 64;

const_assert!(NBD_CONNECTIONS_DEFAULT <= NBD_CONNECTIONS_MAX);
const_assert!(NBD_BUFFERS_DEFAULT <= NBD_BUFFERS_MAX);
// Buffer indices are u16.
const_assert!(NBD_BUFFERS_MAX <= u16::MAX as usize);
// Command indices are u8 (engine tags).
const_assert!(NBD_COMMANDS_PER_CONNECTION_MAX <= u8::MAX as usize);
// Every engine I/O belongs to an admitted command.
const_assert!(NBD_COMMANDS_PER_CONNECTION_MAX >= VOLUME_IOS_MAX);
// A receive buffer holds a request header with room to spare.
const_assert!(NBD_RECEIVE_BUFFER_BYTES >= 4096);
// The reply header fits in front of a buffer's aligned data.
const_assert!(NBD_DIO_ALIGN_MAX_BYTES.is_power_of_two() && NBD_DIO_ALIGN_MAX_BYTES >= 16);
// An aligned block never straddles two chunks, so a read-modify-write stays
// inside the chunk whose mapping the server granted.
const_assert!((CHUNK_SIZE_MIN_BYTES as usize).is_multiple_of(NBD_DIO_ALIGN_MAX_BYTES));
// Data buffers are whole aligned blocks, so each one's data starts aligned.
const_assert!((VOLUME_IO_MAX_BYTES as usize).is_multiple_of(NBD_DIO_ALIGN_MAX_BYTES));
// One connection can have every engine I/O on the disk at once.
const_assert!(NBD_DISK_OPS_MAX >= VOLUME_IOS_MAX);
// Ring entries (two per operation) fit io_uring's limit of 32768.
const_assert!(2 * NBD_DISK_OPS_MAX <= 32768 && NBD_RMW_BUFFERS >= 1);
// The NBD payload limit csnap advertises is the engine's I/O size.
const_assert!(VOLUME_IO_MAX_BYTES <= NBD_PAYLOAD_MAX_BYTES);

// ---------------------------------------------------------------------------
// Agent and the local cluster controller.
// ---------------------------------------------------------------------------

/// Connections on one agent's socket at once (volume clients, control
/// tools, its standby and serving server). Ceiling of `--conns`.
pub const AGENT_CONNS_MAX: usize = 1024;
/// Default for the agent's `--conns`.
pub const AGENT_CONNS_DEFAULT: usize = 128;
/// Output queued for one connection on the agent's socket: a start command
/// naming every expected client, plus replies.
pub const AGENT_CONN_OUT_BYTES: usize = 16 * 1024;
/// Output queued on an agent's bus link (to the membership backend).
pub const AGENT_BUS_OUT_BYTES: usize = 256 * 1024;
/// How long an agent holds a client's `NeedServer` naming the incarnation
/// the agent believes alive before it gives the same address again.
pub const AGENT_SUSPECT_HOLD_MS: u64 = 100;
/// Pause between an agent's attempts to reach its membership backend.
pub const AGENT_BUS_RETRY_MS: u64 = 100;
/// Wait before an agent respawns a standby that was lost.
pub const AGENT_RESPAWN_BACKOFF_MS: u64 = 500;
/// A spawned standby that has not announced itself by then is spawned again.
pub const AGENT_SPAWN_TIMEOUT_MS: u64 = 10_000;
/// Wait after an agent's server starts serving before the agent spawns its
/// next standby: the clients reconnect meanwhile, and the new standby's
/// init (reserving, touching and locking tens of MB) would compete with
/// them for the CPU (failover-bench: kill to every client served, p99 on 2
/// cores, 22 ms without, 14 ms with 50 ms).
pub const AGENT_STANDBY_AFTER_START_MS: u64 = 50;
/// A started agent knows only the clients connected to it. One that
/// started (or restarted) less than this ago holds its answer to a gather
/// (`NeedClients`) and takes no start, so that the snapshot clients of its
/// node, which reconnect to it within their retry backoff
/// (`CLIENT_RETRY_MAX_MS`) and say who they are, are listed: a new server
/// must wait for every lock holder.
pub const AGENT_RELIST_GRACE_MS: u64 = 250;

/// Connections to the cluster controller at once (agents and tools).
pub const CONTROLLER_CONNS_MAX: usize = 512;
/// Default for the controller's `--conns`.
pub const CONTROLLER_CONNS_DEFAULT: usize = 64;
/// Addresses one controller listens on: its unix socket in the cluster
/// directory plus every `--listen` (TCP for agents on other hosts).
pub const CONTROLLER_LISTENERS_MAX: usize = 8;
/// Output queued for one controller connection: a relayed client list,
/// membership and status with room to spare.
pub const CONTROLLER_CONN_OUT_BYTES: usize = 128 * 1024;
/// A start that does not serve within this time is abandoned and tried on
/// another node.
pub const CONTROLLER_START_TIMEOUT_MS: u64 = 5_000;
/// A request in flight at the server across this many consecutive server
/// deaths is failed to its client (EIO) instead of being re-sent again: it
/// may be what kills them (a poison request).
pub const REQUEST_SERVER_DEATHS_MAX: u8 = 3;
/// The crash-loop breaker: this many server deaths (or failed starts)
/// within `CONTROLLER_DEATH_WINDOW_MS_DEFAULT` mark the store failed (no
/// more incarnations until `csnap cluster clear-failed`). 0 turns it off.
pub const CONTROLLER_SERVER_DEATHS_DEFAULT: u32 = 3;
/// The largest death bound `csnap cluster run --max-server-deaths` takes
/// (the controller keeps this many death times).
pub const CONTROLLER_SERVER_DEATHS_MAX: u32 = 64;
/// The breaker's sliding window, default.
pub const CONTROLLER_DEATH_WINDOW_MS_DEFAULT: u64 = 10_000;
/// The breaker's window, at most (one hour).
pub const CONTROLLER_DEATH_WINDOW_MS_MAX: u64 = 3_600_000;

/// How long a volume client keeps retrying to reach a serving server
/// (through its agent) before its I/O fails, by default.
pub const CLIENT_FAILOVER_TIMEOUT_DEFAULT_MS: u64 = 5_000;
/// First pause between a volume client's reconnection attempts; doubled up
/// to `CLIENT_RETRY_MAX_MS`.
pub const CLIENT_RETRY_MIN_MS: u64 = 1;
/// Longest pause between a volume client's reconnection attempts.
pub const CLIENT_RETRY_MAX_MS: u64 = 50;

const_assert!(AGENT_CONNS_DEFAULT <= AGENT_CONNS_MAX);
const_assert!(CONTROLLER_CONNS_DEFAULT <= CONTROLLER_CONNS_MAX);
const_assert!(CONTROLLER_SERVER_DEATHS_DEFAULT <= CONTROLLER_SERVER_DEATHS_MAX);
const_assert!(CONTROLLER_SERVER_DEATHS_MAX <= u16::MAX as u32);
/// Deaths of its own servers an agent remembers (their times), for the
/// count it reports (`AgentState.recent_deaths`): as many as any
/// controller's breaker can need.
pub const AGENT_DEATHS_KEPT: usize = CONTROLLER_SERVER_DEATHS_MAX as usize;
const_assert!(CONTROLLER_DEATH_WINDOW_MS_DEFAULT <= CONTROLLER_DEATH_WINDOW_MS_MAX);
// A start command naming START_LIST_MAX members and expected clients (4 and
// 16 bytes each, two list headers, the frame header) fits one agent
// connection's output with room for replies.
const_assert!(32 + 8 + START_LIST_MAX * (4 + 16) + 4096 <= AGENT_CONN_OUT_BYTES);
// A relayed client list of 1024 entries fits a controller connection's
// output several times over.
const_assert!(4 * (32 + 24 + 1024 * 16) <= CONTROLLER_CONN_OUT_BYTES);
const_assert!(CLIENT_RETRY_MIN_MS <= CLIENT_RETRY_MAX_MS);
const_assert!(CLIENT_RETRY_MAX_MS < CLIENT_FAILOVER_TIMEOUT_DEFAULT_MS);
const_assert!(AGENT_SUSPECT_HOLD_MS < CLIENT_FAILOVER_TIMEOUT_DEFAULT_MS);
const_assert!(AGENT_STANDBY_AFTER_START_MS < AGENT_RESPAWN_BACKOFF_MS);
const_assert!(AGENT_RELIST_GRACE_MS >= 4 * CLIENT_RETRY_MAX_MS);
const_assert!(STANDBY_LOCK_RETRY_US < STANDBY_LOCK_WAIT_MS * 1000);
// A start that waited its longest for the store lock still serves before
// the controller gives up on it and before clients time out.
const_assert!(STANDBY_LOCK_WAIT_MS < CONTROLLER_START_TIMEOUT_MS);
const_assert!(STANDBY_LOCK_WAIT_MS < CLIENT_FAILOVER_TIMEOUT_DEFAULT_MS);

// ---------------------------------------------------------------------------
// Metrics endpoint (`--metrics ADDR`, #13): Prometheus text format 0.0.4.
// ---------------------------------------------------------------------------

/// HTTP connections a metrics endpoint serves at once; one more is accepted
/// and closed at once (the scraper retries at its next interval).
pub const METRICS_CONNECTIONS_MAX: usize = 4;
/// The largest HTTP request head (request line and headers) a metrics
/// endpoint reads; a longer one is answered 400 and closed.
pub const METRICS_REQUEST_MAX_BYTES: usize = 4096;
/// Room in front of the rendered body for the response's status line and
/// headers.
pub const METRICS_HEAD_MAX_BYTES: usize = 256;
/// The rendered response of one scrape, head included: fixed families plus
/// two per-export series (origin and every snapshot) of at most 160 bytes
/// each.
pub const METRICS_RESPONSE_MAX_BYTES: usize = 48 * 1024 + (SNAPSHOTS_MAX + 1) * 2 * 160;
/// A metrics connection that has not sent its request, or not taken its
/// response, within this time is closed (slow or hostile clients do not
/// hold a slot).
pub const METRICS_CLIENT_TIMEOUT_MS: u64 = 3_000;
/// How long the NBD server's endpoint waits for the csnap server's status
/// before it answers a scrape with the figures it has.
pub const METRICS_STATUS_WAIT_MS: u64 = 1_000;
/// Buckets of the request-duration histograms (upper bounds in
/// microseconds; `+Inf` comes on top).
pub const METRICS_HISTOGRAM_BUCKETS: usize = 16;

const_assert!(METRICS_CONNECTIONS_MAX >= 1);
const_assert!(METRICS_HEAD_MAX_BYTES + METRICS_REQUEST_MAX_BYTES < METRICS_RESPONSE_MAX_BYTES);
const_assert!(METRICS_STATUS_WAIT_MS < METRICS_CLIENT_TIMEOUT_MS);
