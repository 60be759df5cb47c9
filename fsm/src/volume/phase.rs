//! An I/O's state in the volume engine ([`Phase`], its table) and the one
//! transition function that changes it.

use super::{IoError, IoKind, PIN_WORDS};

/// Where an I/O is in its life, named for what it waits for.
///
/// | state | entered from, on | next |
/// |---|---|---|
/// | `Issuing` | `submit` | what `submit` issues: one of the states below, or complete (empty I/O, refused query) |
/// | `AwaitRevoke` | `Issuing`: an origin write submitted while a revoke is answered | `RevokeDone` out → `AwaitServer` or `AwaitOriginDisk`; `fail_all` → complete |
/// | `AwaitServer` | `Issuing` or `AwaitRevoke`: queries sent | every query answered → `AwaitDisk` or `AwaitOriginDisk`; a failure with nothing left outstanding → complete |
/// | `AwaitDisk` | `Issuing` (flush, origin read, cached snapshot read) or `AwaitServer` | every `disk_done` → complete (cached leases unpinned, released if asked for) |
/// | `AwaitOriginDisk` | `Issuing`, `AwaitRevoke` (every chunk granted) or `AwaitServer` (grants answered): an origin write | its `disk_done` → complete |
///
/// An origin write out of `Issuing` and `AwaitRevoke` is counted in
/// `origin_writes_active` (a revoke is answered when none is); in
/// `AwaitOriginDisk`, in `origin_writes_on_disk` too (no reconnect until
/// none is). `AwaitServer` counts disk operations too: a snapshot write's
/// answered runs go to the disk while other runs are still asked about.
/// A failure completes the I/O in whatever state it is, once nothing is
/// outstanding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// `submit` is issuing its first operations (waits for nothing yet).
    Issuing,
    /// An origin write submitted while a revoke is being answered: waits
    /// for `RevokeDone` to be out (it belongs after the snapshot).
    AwaitRevoke,
    /// Waits for the server's answers to `queries` queries (and `disk`
    /// disk operations already issued).
    AwaitServer { queries: u32, disk: u32 },
    /// Waits for `disk` disk operations.
    AwaitDisk { disk: u32 },
    /// An origin write, its chunks granted: waits for its `disk` disk
    /// operations.
    AwaitOriginDisk { disk: u32 },
}

impl Phase {
    pub(super) fn queries(self) -> u32 {
        match self {
            Phase::AwaitServer { queries, .. } => queries,
            _ => 0,
        }
    }

    pub(super) fn disk(self) -> u32 {
        match self {
            Phase::AwaitServer { disk, .. }
            | Phase::AwaitDisk { disk }
            | Phase::AwaitOriginDisk { disk } => disk,
            Phase::Issuing | Phase::AwaitRevoke => 0,
        }
    }

    /// Counted in `origin_writes_on_disk`.
    pub(super) fn origin_on_disk(self) -> bool {
        matches!(self, Phase::AwaitOriginDisk { .. })
    }

    /// An origin write in this state is started (counted in
    /// `origin_writes_active`).
    pub(super) fn started(self) -> bool {
        !matches!(self, Phase::Issuing | Phase::AwaitRevoke)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Io {
    pub(super) tag: u64,
    pub(super) kind: IoKind,
    pub(super) offset: u64,
    pub(super) len: u32,
    /// An origin write (counted in the origin write counters once
    /// started).
    pub(super) origin_write: bool,
    pub(super) phase: Phase,
    pub(super) error: Option<IoError>,
    /// Chunks of this I/O (bit k: its first chunk + k) it pinned in the
    /// lease cache (snapshot reads).
    pub(super) pins: [u64; PIN_WORDS],
}

impl Io {
    /// The one state transition: asserts the state it leaves (see the
    /// table on [`Phase`]); queries and disk operations outstanding carry
    /// over.
    pub(super) fn enter(&mut self, to: Phase) {
        let from = self.phase;
        let legal = match (from, to) {
            (Phase::Issuing, Phase::AwaitRevoke) => self.origin_write,
            (Phase::Issuing | Phase::AwaitRevoke, Phase::AwaitServer { .. }) => true,
            (Phase::Issuing, Phase::AwaitDisk { .. }) => !self.origin_write,
            (Phase::AwaitServer { queries: 0, .. }, Phase::AwaitDisk { .. }) => true,
            (
                Phase::Issuing | Phase::AwaitRevoke | Phase::AwaitServer { queries: 0, .. },
                Phase::AwaitOriginDisk { .. },
            ) => self.origin_write,
            _ => false,
        };
        assert!(legal, "I/O state {from:?} -> {to:?}");
        assert_eq!(
            (from.queries(), from.disk()),
            (to.queries(), to.disk()),
            "outstanding work lost in {from:?} -> {to:?}"
        );
        self.phase = to;
    }

    /// One more query at the server (enters `AwaitServer` if need be).
    pub(super) fn query_sent(&mut self) {
        match self.phase {
            Phase::AwaitServer { queries, disk } => {
                self.phase = Phase::AwaitServer {
                    queries: queries + 1,
                    disk,
                };
                return;
            }
            Phase::Issuing | Phase::AwaitRevoke => self.enter(Phase::AwaitServer {
                queries: 0,
                disk: 0,
            }),
            p => panic!("query sent in {p:?}"),
        }
        self.query_sent();
    }

    /// A query answered (or given up).
    pub(super) fn query_gone(&mut self) {
        let Phase::AwaitServer { queries, disk } = self.phase else {
            panic!("query answered in {:?}", self.phase);
        };
        assert!(queries > 0, "more answers than queries");
        self.phase = Phase::AwaitServer {
            queries: queries - 1,
            disk,
        };
    }

    /// One more disk operation (an I/O still `Issuing` waits for the disk
    /// from now on).
    pub(super) fn disk_issued(&mut self) {
        if self.phase == Phase::Issuing {
            self.enter(Phase::AwaitDisk { disk: 0 });
        }
        match &mut self.phase {
            Phase::AwaitServer { disk, .. }
            | Phase::AwaitDisk { disk }
            | Phase::AwaitOriginDisk { disk } => *disk += 1,
            p => panic!("disk operation issued in {p:?}"),
        }
    }

    /// A disk operation finished.
    pub(super) fn disk_gone(&mut self) {
        match &mut self.phase {
            Phase::AwaitServer { disk, .. }
            | Phase::AwaitDisk { disk }
            | Phase::AwaitOriginDisk { disk } => {
                assert!(*disk > 0, "more disk completions than operations");
                *disk -= 1;
            }
            p => panic!("disk operation done in {p:?}"),
        }
    }

    /// Nothing outstanding: the I/O can complete.
    pub(super) fn idle(&self) -> bool {
        self.phase.queries() == 0 && self.phase.disk() == 0
    }
}
