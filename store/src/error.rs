//! The store's error type: every way an operation, a format or an open can
//! fail, with the words the tools print.

use crate::cache::CacheError;
use crate::disk::DiskError;
use crate::layout::{BlockFault, BlockKind};
use csnap_pools::SNAPSHOTS_MAX;

/// Errors of store operations. Variants used on the serving path carry no
/// heap data; `Invalid` is produced only while formatting or opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// A device access failed.
    Disk(DiskError),
    /// A metadata block failed verification.
    Corrupt {
        /// Block address.
        addr: u64,
        /// What the block was expected to be.
        kind: BlockKind,
        /// What is wrong with it.
        fault: BlockFault,
    },
    /// The store cannot be formatted or opened; the text says why.
    Invalid(String),
    /// No live snapshot has this tag.
    NoSuchSnapshot(u32),
    /// A live snapshot already has this tag.
    SnapshotExists(u32),
    /// All snapshot slots are live or still being deleted.
    TooManySnapshots,
    /// The chunk is past the end of the origin.
    ChunkOutOfRange {
        /// Chunk asked for.
        chunk: u64,
        /// Chunks of the origin.
        origin_chunks: u64,
    },
    /// No free store chunk and the policy refuses the copy-out, or no snapshot
    /// may be deleted to make room.
    StoreFull,
    /// No free store chunk; snapshots are being deleted to make room (`victim`
    /// names the one this call chose, if any). Commit, run `delete_step`, retry.
    Reclaiming {
        /// Tag of the snapshot this call chose for deletion.
        victim: Option<u32>,
    },
    /// The metadata area is full.
    MetadataFull,
    /// The open transaction cannot take another operation: commit first.
    TxFull,
    /// The metadata cache has no evictable block (too small for the workload).
    CacheFull,
    /// An operation failed midway; the open transaction must be aborted.
    TxPoisoned,
    /// A commit failed: the store must be reopened (which replays the journal).
    Failed,
    /// The tree reached its maximum depth.
    TreeTooDeep,
    /// A snapshot with this priority may not be changed this way.
    BadPriority(i8),
    /// A newer server incarnation has taken this store over (its superblock
    /// on disk carries a higher incarnation): this server must stop.
    Fenced {
        /// This server's incarnation.
        ours: u64,
        /// The incarnation on disk (0: the superblock was being rewritten
        /// by another writer).
        found: u64,
    },
    /// A takeover's claim was overwritten during its wait, every attempt:
    /// another server keeps writing the superblock.
    ClaimContested {
        /// The last incarnation claimed.
        claimed: u64,
        /// The incarnation found on disk after the wait.
        found: u64,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Disk(e) => write!(f, "store device error: {e}"),
            StoreError::Corrupt { addr, kind, fault } => {
                write!(f, "store metadata corrupt: {} at block {addr}: {fault}", kind.name())
            }
            StoreError::Invalid(s) => write!(f, "{s}"),
            StoreError::NoSuchSnapshot(t) => write!(f, "no snapshot with tag {t}"),
            StoreError::SnapshotExists(t) => write!(f, "snapshot {t} already exists"),
            StoreError::TooManySnapshots => write!(
                f,
                "the store holds {SNAPSHOTS_MAX} snapshots (live or being deleted); delete one first"
            ),
            StoreError::ChunkOutOfRange { chunk, origin_chunks } => write!(
                f,
                "chunk {chunk} is past the end of the origin ({origin_chunks} chunks)"
            ),
            StoreError::StoreFull => write!(
                f,
                "snapshot store is full: the copy-out was refused and the origin write must fail"
            ),
            StoreError::Reclaiming { victim: Some(t) } => write!(
                f,
                "snapshot store is full: deleting snapshot {t} (lowest priority, not in use) to make room"
            ),
            StoreError::Reclaiming { victim: None } => {
                write!(f, "snapshot store is full: waiting for a snapshot deletion to free room")
            }
            StoreError::MetadataFull => write!(f, "snapshot store metadata area is full"),
            StoreError::TxFull => write!(f, "transaction is full; commit first"),
            StoreError::CacheFull => write!(f, "metadata cache has no evictable block"),
            StoreError::TxPoisoned => {
                write!(f, "an operation failed midway; the transaction must be aborted")
            }
            StoreError::Failed => {
                write!(f, "a commit failed; the store must be reopened to recover")
            }
            StoreError::TreeTooDeep => write!(f, "exception tree reached its maximum depth"),
            StoreError::BadPriority(p) => write!(f, "bad priority {p}"),
            StoreError::Fenced { ours, found } => write!(
                f,
                "fenced: this server is incarnation {ours}, but the store now belongs to incarnation {found}; stopping"
            ),
            StoreError::ClaimContested { claimed, found } => write!(
                f,
                "takeover refused: incarnation {claimed} was claimed, but after the wait the store says {found}: another server is still writing it"
            ),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<DiskError> for StoreError {
    fn from(e: DiskError) -> Self {
        StoreError::Disk(e)
    }
}

impl From<CacheError> for StoreError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Disk(d) => StoreError::Disk(d),
            CacheError::Fault { addr, kind, fault } => StoreError::Corrupt { addr, kind, fault },
            CacheError::Full => StoreError::CacheFull,
        }
    }
}
