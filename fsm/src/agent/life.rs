//! The local server's life cycle on this node, as three explicit state
//! enums with their move tables: the standby slot (`StandbySlot`), the
//! gather before a start (`GatherPhase`) and the server it started
//! (`LocalServer`). Each changes only through its one move function here,
//! which asserts the move is a row of the enum's table.

use super::*;

/// The server this agent started, past its gather: what the agent waits
/// for from it. One move function, `AgentFsm::local_to`, asserts every move
/// is a row of this table (the gather before a start is [`GatherPhase`],
/// `Collecting` only while this is `Idle`):
///
/// | from | to | on |
/// |---|---|---|
/// | `Idle` | `Starting` | the gather is complete: `StartServer` sent to the ready standby |
/// | `Starting` | `Serving` | its `Serving` |
/// | `Starting` | `Idle` | its link closed (start failed) or the agent is fenced |
/// | `Serving` | `Idle` | its link closed (it died), a newer server elsewhere, or the agent is fenced |
// One per agent, never in a collection: the size difference costs nothing,
// and boxing the address would allocate after init.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy)]
pub(super) enum LocalServer {
    /// None started (a gather may be under way).
    Idle,
    /// Waiting for `Serving` from the started standby.
    Starting {
        /// Its link.
        conn: AgentConnId,
        /// The start attempt.
        attempt: u64,
    },
    /// Serving; waiting for its end.
    Serving(Serving),
}

impl LocalServer {
    pub(super) fn starting(self) -> Option<(AgentConnId, u64)> {
        match self {
            LocalServer::Starting { conn, attempt } => Some((conn, attempt)),
            _ => None,
        }
    }

    pub(super) fn serving(self) -> Option<Serving> {
        match self {
            LocalServer::Serving(s) => Some(s),
            _ => None,
        }
    }
}

/// The gather before a start: what the agent waits for before it tells
/// its standby to start. One move function, `AgentFsm::gather_to`, asserts
/// every move is a row of this table:
///
/// | from | to | on |
/// |---|---|---|
/// | `Idle` | `Collecting` | `StartHere` with a ready standby (`NeedClients` sent to the group) |
/// | `Collecting` | `Idle` | every member answered `Clients` or left (then `StartServer`), or the bus, the standby or membership was lost (start failed) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GatherPhase {
    /// No start under way; the tables are empty.
    Idle,
    /// Waiting for every member's `Clients` for this attempt.
    Collecting {
        /// The attempt (and gather) id.
        attempt: u64,
        /// The start claims the store first (`StartHere::claim`).
        claim: bool,
        /// The highest incarnation known when the gather began: a server
        /// above it serving elsewhere makes the gather stale.
        floor: u64,
    },
}

/// The gather's tables, reserved once in `AgentFsm::new` and reused by
/// every gather (empty while `Idle`).
#[derive(Debug)]
pub(super) struct Gather {
    pub(super) phase: GatherPhase,
    /// Member nodes whose `Clients` has not come yet.
    pub(super) waiting: Vec<u32>,
    /// The snapshot clients the new server waits for.
    pub(super) expected: Vec<ClientEntry>,
    /// More clients than `EXPECTED_MAX`: the start is refused.
    pub(super) overflow: bool,
}

/// The local standby server's slot: what the agent waits for to have a
/// ready standby. One move function, `AgentFsm::standby_to`, asserts every
/// move is a row of this table:
///
/// | from | to | on |
/// |---|---|---|
/// | `Idle` | `Due` | the server of a start serves (`standby_after_start_ms`), a start failed or a standby was lost (`respawn_backoff_ms`) |
/// | `Due`, `Spawning` | `Spawning` | the tick at `at_ms` or past `deadline_ms`: `SpawnStandby` (again) |
/// | `Due`, `Spawning` | `Due` | the server of a start serves while a spawn was pending (later time) |
/// | `Idle`, `Due`, `Spawning` | `Ready` | a standby's `ServerReady` (an extra one is refused) |
/// | `Ready` | `Idle` | the standby is started (it becomes the starting server) or its link is lost |
///
/// The first standby is `Due` at time 0 (spawned at the first tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StandbySlot {
    /// No standby and none asked for (a start consumed it; the next one is
    /// asked for once that server serves or fails).
    Idle,
    /// Waiting for the time to spawn one.
    Due {
        /// When.
        at_ms: u64,
    },
    /// Spawned; waiting for its `ServerReady` until the deadline, then
    /// spawned again.
    Spawning {
        /// The deadline.
        deadline_ms: u64,
    },
    /// Ready on this link: waiting for a start.
    Ready {
        /// Its link.
        conn: AgentConnId,
    },
}

impl StandbySlot {
    /// The ready standby's link.
    pub(super) fn ready(self) -> Option<AgentConnId> {
        match self {
            StandbySlot::Ready { conn } => Some(conn),
            _ => None,
        }
    }

    /// When the tick has something to do for the slot.
    pub(super) fn next_ms(self) -> Option<u64> {
        match self {
            StandbySlot::Due { at_ms } => Some(at_ms),
            StandbySlot::Spawning { deadline_ms } => Some(deadline_ms),
            StandbySlot::Idle | StandbySlot::Ready { .. } => None,
        }
    }
}

impl AgentFsm {
    /// The one way the gather changes: asserts the move is a row of
    /// [`GatherPhase`]'s table; back to `Idle` empties the tables.
    pub(super) fn gather_to(&mut self, next: GatherPhase) {
        use GatherPhase::{Collecting, Idle};
        let ok = matches!(
            (self.gather.phase, next),
            (Idle, Collecting { .. }) | (Collecting { .. }, Idle)
        );
        assert!(
            ok,
            "gather: no move from {:?} to {next:?}",
            self.gather.phase
        );
        if next == Idle {
            self.gather.waiting.clear();
            self.gather.expected.clear();
            self.gather.overflow = false;
        }
        self.gather.phase = next;
    }

    /// The attempt a gather collects clients for, if one runs.
    pub(super) fn gathering(&self) -> Option<u64> {
        match self.gather.phase {
            GatherPhase::Collecting { attempt, .. } => Some(attempt),
            GatherPhase::Idle => None,
        }
    }

    /// A gather under way ends without a start: logged as a failed start.
    pub(super) fn abandon_gather(&mut self) {
        if let Some(attempt) = self.gathering() {
            self.gather_to(GatherPhase::Idle);
            self.log(AgentEvent::StartFailed { attempt });
        }
    }

    /// The one way the started server's state changes: asserts the move is
    /// a row of [`LocalServer`]'s table.
    pub(super) fn local_to(&mut self, next: LocalServer) {
        use LocalServer::{Idle, Serving, Starting};
        let ok = matches!(
            (self.local, next),
            (Idle, Starting { .. })
                | (Starting { .. }, Serving(_))
                | (Starting { .. } | Serving(_), Idle)
        );
        assert!(
            ok,
            "local server: no move from {:?} to {next:?}",
            self.local
        );
        assert!(
            !matches!(next, Starting { .. }) || self.gathering().is_none(),
            "a start while its gather runs"
        );
        self.local = next;
    }

    /// The one way the standby slot changes: asserts the move is a row of
    /// [`StandbySlot`]'s table.
    pub(super) fn standby_to(&mut self, next: StandbySlot) {
        use StandbySlot::{Due, Idle, Ready, Spawning};
        let ok = matches!(
            (self.standby, next),
            (Idle, Due { .. })
                | (Due { .. } | Spawning { .. }, Due { .. })
                | (Due { .. } | Spawning { .. }, Spawning { .. })
                | (Idle | Due { .. } | Spawning { .. }, Ready { .. })
                | (Ready { .. }, Idle)
        );
        assert!(
            ok,
            "standby slot: no move from {:?} to {next:?}",
            self.standby
        );
        self.standby = next;
    }
}
