//! The `local` membership and resource-manager backend: the controller's
//! sans-IO state machine.
//!
//! The controller is one process per cluster (`csnap cluster run`). Every
//! node's agent keeps one connection to it; that connection is the agent's
//! *bus* (see `crate::agent`). The controller is to the agents what corosync
//! (membership and messaging) plus pacemaker (placement) would be:
//!
//! - **membership**: a node is a member while its agent is connected and it
//!   has not been told to leave (`csnap cluster leave N`; `join N` takes it
//!   back). Every change goes to every agent as `Members` with a growing
//!   epoch. A node told to leave is sent `Fence(LeftCluster)`: its agent
//!   stops its server and gives out no address. On one machine, "fenced"
//!   means exactly that: the node's processes stop using the store.
//! - **messaging**: `NeedClients` from a starting agent goes to every other
//!   member; `Clients` goes to the node it names; `ServerUp` and
//!   `ServerDown` go to every agent; `ClientGone` goes to the serving node.
//! - **placement** (the resource manager): at most one server. With the
//!   `auto` policy, a server is placed when an agent asks for one
//!   (`WantServer`) and none runs, and again at once when the serving one
//!   dies or its node leaves: on the lowest-numbered connected member with a
//!   ready standby, other than the node that just failed if there is
//!   another. `manual` places only on `csnap cluster start N`. `start N`
//!   while another node serves first stops that server (`Fence(ServerMoved)`)
//!   and waits for its agent to report it dead, so two never serve; so
//!   does `leave N` while node N serves or starts one (its agent has the
//!   fence when it reports).
//!
//! # Placement states
//!
//! | state | entered on | next |
//! |---|---|---|
//! | `None` | start, server died | a candidate exists and a server is wanted → `Starting` |
//! | `Starting { node }` | `StartHere` sent | `ServerUp` from it → `Running`; its start failed, its agent left, or the start timed out → `None` (that node avoided next) |
//! | `Running { node, incarnation }` | `ServerUp` | its agent reports it died, or disconnects, or its node leaves → `ServerDown` to all, `None` |
//! | (failed) | `max_server_deaths` server deaths or failed starts within `death_window_ms` (the crash-loop breaker) | nothing is placed (`None` stays) until `clear-failed` |
//! | `Stopping { from, to }` | `start N` while `from` serves; `leave N` while `N` serves or starts (`to` none) | `from`'s agent reports its server died (or that its start stopped), or disconnects → `Starting { to }` (none: placed as in `None`) |
//!
//! Nothing here allocates after `new`, reads a clock or touches a socket.

use core::fmt::Write as _;

use csnap_proto::{
    self as proto, ClusterOp, ErrorCode, ErrorText, FenceReason, Kind, Msg, Node, NodeStatus, Role,
};

use crate::agent::AddrBuf;
use crate::conns::{self, ConnTable, SlotState};
use crate::fixed::FixedRing;

// The controller's work by job; each adds to `impl Controller`.
mod sessions;

/// A connection to the controller.
pub type CtlConnId = u32;

/// Nodes the controller tracks.
pub const NODES_MAX: usize = proto::NODES_MAX;
/// Output queued per connection.
pub const CONN_OUT_BYTES: usize = csnap_pools::CONTROLLER_CONN_OUT_BYTES;
/// `csnap cluster start` requests waiting for a server at once.
pub const PENDING_STARTS_MAX: usize = 16;

/// Placement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Place a server when one is wanted and none runs, and fail over at
    /// once when it dies.
    Auto,
    /// Place only on `csnap cluster start`.
    Manual,
}

/// Configuration, fixed at init.
#[derive(Debug, Clone, Copy)]
pub struct ControllerConfig {
    /// Connections at once (agents and tools).
    pub conns: usize,
    /// Placement policy.
    pub policy: Policy,
    /// A start not serving within this time is abandoned (that node is
    /// fenced from serving and another is tried).
    pub start_timeout_ms: u64,
    /// The crash-loop breaker: this many server deaths (and failed starts)
    /// within `death_window_ms` mark the store failed; 0 turns it off. At
    /// most `CONTROLLER_SERVER_DEATHS_MAX`.
    pub max_server_deaths: u32,
    /// The breaker's sliding window.
    pub death_window_ms: u64,
}

/// Events worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerEvent {
    /// An agent joined.
    Joined {
        /// Its node.
        node: u32,
    },
    /// An agent's link went away.
    Disconnected {
        /// Its node.
        node: u32,
    },
    /// A start was asked of a node.
    Placing {
        /// The node.
        node: u32,
        /// The attempt.
        attempt: u64,
    },
    /// A server serves.
    Running {
        /// Its node.
        node: u32,
        /// Its incarnation.
        incarnation: u64,
    },
    /// The server is gone.
    ServerDown {
        /// Its node.
        node: u32,
        /// Its incarnation.
        incarnation: u64,
    },
    /// A start failed or timed out.
    StartFailed {
        /// The node.
        node: u32,
    },
    /// A server is wanted but no node can start one.
    NoCandidate,
    /// The crash-loop breaker tripped: the store is marked failed and no
    /// incarnation is started until `clear-failed`.
    StoreFailed {
        /// Deaths counted within the window.
        deaths: u32,
        /// The window.
        window_ms: u64,
    },
    /// `clear-failed`: placement resumes.
    FailedCleared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    None,
    Starting {
        node: u32,
        attempt: u64,
        deadline_ms: u64,
        /// A `Clients` answer of this attempt was relayed to `node`: its
        /// gather may be complete (and everything it sent before it took
        /// the `StartHere` has arrived). Until then it cannot start: the
        /// answers of an abandoned attempt are not relayed.
        relayed: bool,
    },
    Running {
        node: u32,
        incarnation: u64,
        addr: AddrBuf,
    },
    /// Waiting for `from`'s agent to report that its server (of
    /// `incarnation`, 0 if it was still starting) stopped.
    Stopping {
        from: u32,
        to: Option<u32>,
        incarnation: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct NodeRec {
    id: u32,
    conn: Option<CtlConnId>,
    left: bool,
    standby_ready: bool,
    serving: u64,
    /// Its agent's count of recent deaths was taken into the crash-loop
    /// breaker (once per controller process: the deaths before it started).
    deaths_taken: bool,
}

/// What the controller knows of a connection (a slot of its `ConnTable`).
///
/// | state | entered on | next |
/// |---|---|---|
/// | `Free` | start; the connection gone | accept → `ExpectHello` |
/// | `ExpectHello` | accept | `Hello` of an agent → `Agent { node: None }`; of a tool → `Tool`; otherwise → `Closing` |
/// | `Agent { node: None }` | `Hello` with role Agent | `Join` → `Agent { node: Some(n) }` (node `n` is a member) |
/// | `Agent { node: Some(n) }` | `Join` | closes → node `n` leaves |
/// | `Tool` | `Hello` with role Control | `ClusterCommand`, `ClusterStatus` answered |
/// | `Closing` | a fatal error, a failed handshake, a peer that does not read | closed once its output is written → `Free` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtlConnState {
    Free,
    ExpectHello,
    Agent { node: Option<u32> },
    Tool,
    Closing,
}

impl SlotState for CtlConnState {
    const FREE: Self = CtlConnState::Free;
    const EXPECT_HELLO: Self = CtlConnState::ExpectHello;
    fn is_free(&self) -> bool {
        *self == CtlConnState::Free
    }
    fn is_closing(&self) -> bool {
        *self == CtlConnState::Closing
    }
    fn set_closing(&mut self) {
        *self = CtlConnState::Closing;
    }
}

/// The controller state machine.
#[derive(Debug)]
pub struct Controller {
    cfg: ControllerConfig,
    now_ms: u64,
    conns: ConnTable<CtlConnState>,
    nodes: Vec<NodeRec>,
    placement: Placement,
    want: bool,
    avoid: Option<u32>,
    attempts: u64,
    highest_incarnation: u64,
    /// The latest server (or start) may still be running: its death was
    /// not seen by its own agent. The next `StartHere` then says `claim`.
    /// Only the latest matters: a start that claims fences every older one.
    former_unseen: bool,
    epoch: u64,
    pending_starts: Vec<(CtlConnId, u64, u32)>,
    events: FixedRing<ControllerEvent>,
    scratch: Vec<u8>,
    /// Times of the latest server deaths (and failed starts), a ring of
    /// `max_server_deaths` entries, for the crash-loop breaker.
    deaths_ms: Vec<u64>,
    deaths_next: usize,
    /// The store is marked failed: deaths counted when the breaker tripped.
    failed_deaths: u32,
}

impl Controller {
    /// Reserves every table. The only allocation.
    pub fn new(cfg: ControllerConfig) -> Controller {
        assert!(cfg.conns >= 1 && cfg.conns <= csnap_pools::CONTROLLER_CONNS_MAX);
        assert!(cfg.max_server_deaths <= csnap_pools::CONTROLLER_SERVER_DEATHS_MAX);
        let conns = ConnTable::new(cfg.conns, CONN_OUT_BYTES);
        Controller {
            cfg,
            now_ms: 0,
            conns,
            nodes: Vec::with_capacity(NODES_MAX),
            placement: Placement::None,
            want: false,
            avoid: None,
            attempts: 0,
            highest_incarnation: 0,
            // A controller that just started knows of no death.
            former_unseen: true,
            epoch: 0,
            pending_starts: Vec::with_capacity(PENDING_STARTS_MAX),
            events: FixedRing::new(64),
            scratch: vec![0u8; proto::NODE_STATUS_LIST_BYTES_MAX],
            deaths_ms: vec![u64::MAX; cfg.max_server_deaths as usize],
            deaths_next: 0,
            failed_deaths: 0,
        }
    }

    /// Sets the time (monotonic milliseconds) for what follows.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// The serving server: (node, incarnation), if one runs.
    pub fn running(&self) -> Option<(u32, u64)> {
        match self.placement {
            Placement::Running {
                node, incarnation, ..
            } => Some((node, incarnation)),
            _ => None,
        }
    }

    /// The node a start is placed on now (`Starting`), if any.
    pub fn placement_node(&self) -> Option<u32> {
        match self.placement {
            Placement::Starting { node, .. } => Some(node),
            _ => None,
        }
    }

    /// The members now.
    pub fn is_member(&self, node: u32) -> bool {
        self.nodes
            .iter()
            .any(|n| n.id == node && n.conn.is_some() && !n.left)
    }

    fn rec(&mut self, node: u32) -> Option<&mut NodeRec> {
        if let Some(i) = self.nodes.iter().position(|n| n.id == node) {
            return Some(&mut self.nodes[i]);
        }
        if self.nodes.len() == self.nodes.capacity() {
            return None;
        }
        self.nodes.push(NodeRec {
            id: node,
            conn: None,
            left: false,
            standby_ready: false,
            serving: 0,
            deaths_taken: false,
        });
        self.nodes.last_mut()
    }

    fn conn_of_node(&self, node: u32) -> Option<CtlConnId> {
        self.nodes
            .iter()
            .find(|n| n.id == node)
            .and_then(|n| n.conn)
    }

    #[allow(clippy::too_many_lines)]
    fn on_msg(&mut self, conn: CtlConnId, rid: u64, msg: &Msg<'_>) {
        let kind = msg.kind();
        let role = self.conns[conn as usize].role;
        match (role, msg) {
            (
                CtlConnState::ExpectHello,
                Msg::Hello {
                    version_min,
                    version_max,
                    role,
                },
            ) => {
                let next = match role {
                    Role::Agent => Ok(CtlConnState::Agent { node: None }),
                    Role::Control => Ok(CtlConnState::Tool),
                    Role::Client | Role::Server => {
                        Err("the cluster controller talks to agents and to `csnap cluster`")
                    }
                };
                if self.answer_hello(conn, rid, (*version_min, *version_max), next.err(), 0) {
                    if let Ok(next) = next {
                        self.conns[conn as usize].role = next;
                    }
                }
            }
            (CtlConnState::ExpectHello, _) => self.refuse_hello_order(conn, rid, kind, true),
            (_, Msg::Hello { .. }) => self.refuse_hello_order(conn, rid, kind, false),
            (CtlConnState::Agent { node: None }, Msg::Join { node_id, .. }) => {
                self.on_join(conn, rid, *node_id);
            }
            (CtlConnState::Agent { node: None }, _) => self.send_error(
                conn,
                rid,
                ErrorCode::NotIdentified,
                kind.code(),
                "an agent sends Join first",
            ),
            (CtlConnState::Agent { node: Some(n) }, m) => self.on_agent_msg(conn, rid, n, m),
            (CtlConnState::Tool, Msg::ClusterCommand { op, node_id }) => {
                self.on_command(conn, rid, *op, *node_id);
            }
            (CtlConnState::Tool, Msg::ClusterStatus) => self.send_status(conn, rid),
            _ => {
                let mut t = ErrorText::new();
                let _ = write!(t, "{} is not accepted on this connection", kind.name());
                self.send_error(conn, rid, ErrorCode::Unsupported, kind.code(), t.as_str());
            }
        }
    }

    fn on_join(&mut self, conn: CtlConnId, rid: u64, node: u32) {
        if let Some(other) = self.conn_of_node(node) {
            if other != conn {
                let mut t = ErrorText::new();
                let _ = write!(
                    t,
                    "node {node} is already connected; node ids must be unique"
                );
                self.send_error(
                    conn,
                    rid,
                    ErrorCode::AlreadyIdentified,
                    Kind::Join.code(),
                    t.as_str(),
                );
                self.close(conn);
                return;
            }
        }
        let Some(r) = self.rec(node) else {
            self.send_error(
                conn,
                rid,
                ErrorCode::Busy,
                Kind::Join.code(),
                "the controller tracks its maximum number of nodes",
            );
            self.close(conn);
            return;
        };
        r.conn = Some(conn);
        r.standby_ready = false;
        r.serving = 0;
        self.conns[conn as usize].role = CtlConnState::Agent { node: Some(node) };
        self.events.push_or_count(ControllerEvent::Joined { node });
        self.broadcast_members();
        if let Placement::Running {
            node: sn,
            incarnation,
            addr,
        } = self.placement
        {
            self.send(
                conn,
                0,
                &Msg::ServerUp {
                    incarnation,
                    node_id: sn,
                    addr: addr.as_str(),
                },
            );
        }
    }

    fn on_agent_msg(&mut self, conn: CtlConnId, rid: u64, node: u32, msg: &Msg<'_>) {
        let kind = msg.kind();
        match msg {
            Msg::AgentState {
                node_id,
                standby_ready,
                recent_deaths,
                serving_incarnation,
                died_incarnation,
            } => {
                if *node_id != node {
                    self.send_error(
                        conn,
                        rid,
                        ErrorCode::BadFrame,
                        kind.code(),
                        "AgentState names another node",
                    );
                    return;
                }
                let mut earlier = 0;
                if let Some(r) = self.rec(node) {
                    r.standby_ready = *standby_ready;
                    r.serving = *serving_incarnation;
                    if !r.deaths_taken {
                        // The node's server deaths before this controller
                        // started (a restart must not reset the breaker);
                        // a death this report names is counted below.
                        r.deaths_taken = true;
                        earlier = recent_deaths.saturating_sub(u16::from(*died_incarnation != 0));
                    }
                }
                for _ in 0..u32::from(earlier).min(self.cfg.max_server_deaths) {
                    self.count_death();
                }
                if *died_incarnation != 0 {
                    self.server_died(node, *died_incarnation, true);
                }
                if let Placement::Stopping {
                    from,
                    incarnation: 0,
                    ..
                } = self.placement
                {
                    if from == node && *serving_incarnation == 0 {
                        // The start stopped there before it served.
                        self.stopped_starting(node);
                    }
                }
                if let Placement::Starting {
                    node: sn, relayed, ..
                } = self.placement
                {
                    if sn == node && !*standby_ready && *serving_incarnation == 0 {
                        // The start could not be made (no standby, or it
                        // failed): try elsewhere. Before any answer was
                        // relayed this may be a report sent before the
                        // agent took the `StartHere`: the fence makes sure
                        // it does not act on it later.
                        if !relayed {
                            self.send(
                                conn,
                                0,
                                &Msg::Fence {
                                    reason: FenceReason::ServerMoved,
                                },
                            );
                        }
                        self.events
                            .push_or_count(ControllerEvent::StartFailed { node });
                        self.avoid = Some(node);
                        self.placement = Placement::None;
                        self.want = true;
                        self.count_death();
                    }
                }
                self.maybe_place();
            }
            Msg::WantServer { .. } => {
                self.want = true;
                self.maybe_place();
            }
            Msg::ServerUp {
                incarnation,
                node_id,
                addr,
            } => {
                if *node_id != node {
                    self.send_error(
                        conn,
                        rid,
                        ErrorCode::BadFrame,
                        kind.code(),
                        "ServerUp names another node",
                    );
                    return;
                }
                self.on_server_up(conn, node, *incarnation, addr);
            }
            Msg::NeedClients { starter, gather_id } => {
                // Only for the start under way there: an abandoned start's
                // gather never completes.
                let current = match self.placement {
                    Placement::Starting {
                        node: sn, attempt, ..
                    } => sn == node && attempt == *gather_id,
                    _ => false,
                };
                if *starter != node || !current {
                    return;
                }
                for i in 0..self.nodes.len() {
                    let r = self.nodes[i];
                    if r.id == node || r.left {
                        continue;
                    }
                    if let Some(c) = r.conn {
                        self.send(c, 0, msg);
                    }
                }
            }
            Msg::Clients {
                from,
                to,
                gather_id,
                ..
            } => {
                let Placement::Starting {
                    node: sn,
                    attempt,
                    deadline_ms,
                    ..
                } = self.placement
                else {
                    return;
                };
                if *from != node || sn != *to || attempt != *gather_id {
                    return;
                }
                self.placement = Placement::Starting {
                    node: sn,
                    attempt,
                    deadline_ms,
                    relayed: true,
                };
                if let Some(c) = self.conn_of_node(*to) {
                    self.send(c, 0, msg);
                }
            }
            Msg::ClientGone { .. } | Msg::ClientsOf { .. } => {
                // To the serving node, or to the node starting a server
                // (its recovery barrier may wait for that client).
                let to = match self.placement {
                    Placement::Running { node, .. } | Placement::Starting { node, .. } => {
                        Some(node)
                    }
                    Placement::Stopping { from, .. } => Some(from),
                    Placement::None => None,
                };
                if let Some(c) = to.and_then(|n| self.conn_of_node(n)) {
                    self.send(c, 0, msg);
                }
            }
            Msg::Error { .. } => {}
            _ => {
                let mut t = ErrorText::new();
                let _ = write!(t, "{} is not accepted from an agent", kind.name());
                self.send_error(conn, rid, ErrorCode::Unsupported, kind.code(), t.as_str());
            }
        }
    }

    fn on_server_up(&mut self, conn: CtlConnId, node: u32, incarnation: u64, addr: &str) {
        let Some(a) = AddrBuf::new(addr) else { return };
        if incarnation < self.highest_incarnation {
            // An older incarnation than one that served: stop it.
            self.send(
                conn,
                0,
                &Msg::Fence {
                    reason: FenceReason::ServerMoved,
                },
            );
            return;
        }
        if let Placement::Stopping { from, to, .. } = self.placement {
            if from == node {
                // A server being stopped (its node left, or it moves): its
                // agent reports its death next. Nobody is told of it.
                self.highest_incarnation = incarnation;
                self.placement = Placement::Stopping {
                    from,
                    to,
                    incarnation,
                };
                return;
            }
        }
        if let Placement::Running { node: other, .. } = self.placement {
            if other != node {
                if let Some(c) = self.conn_of_node(other) {
                    self.send(
                        c,
                        0,
                        &Msg::Fence {
                            reason: FenceReason::ServerMoved,
                        },
                    );
                }
            }
        }
        self.highest_incarnation = incarnation;
        self.placement = Placement::Running {
            node,
            incarnation,
            addr: a,
        };
        self.want = false;
        self.avoid = None;
        if let Some(r) = self.rec(node) {
            r.serving = incarnation;
        }
        let _ = self
            .events
            .push(ControllerEvent::Running { node, incarnation });
        let up = Msg::ServerUp {
            incarnation,
            node_id: node,
            addr,
        };
        self.broadcast(&up);
        let mut k = 0;
        while k < self.pending_starts.len() {
            let (c, rid, n) = self.pending_starts[k];
            if n == node {
                self.pending_starts.swap_remove(k);
                self.send(c, rid, &Msg::Ok);
            } else {
                k += 1;
            }
        }
    }

    /// The server `incarnation` on `node` is gone; `seen`: its own agent
    /// saw it die (its link closed: the process exited), so the next start
    /// need not claim the store.
    fn server_died(&mut self, node: u32, incarnation: u64, seen: bool) {
        let crashed = matches!(self.placement, Placement::Running { node: n, incarnation: i, .. } if n == node && i == incarnation);
        let (gone, next) = match self.placement {
            Placement::Running {
                node: n,
                incarnation: i,
                ..
            } if n == node && i == incarnation => (true, None),
            Placement::Stopping {
                from,
                to,
                incarnation: i,
            } if from == node && i == incarnation => (true, to),
            _ => (false, None),
        };
        if !gone {
            return;
        }
        self.former_unseen = !seen;
        self.placement = Placement::None;
        let _ = self
            .events
            .push(ControllerEvent::ServerDown { node, incarnation });
        self.broadcast(&Msg::ServerDown {
            incarnation,
            node_id: node,
        });
        if crashed {
            // Not asked for (a move's stop is not counted).
            self.count_death();
        }
        if let Some(to) = next {
            self.start_on(to);
        } else {
            // Fail over at once (auto), preferring another node.
            self.want = true;
            self.avoid = Some(node);
            self.maybe_place();
        }
    }

    /// A start that was being stopped (`Stopping` with no incarnation)
    /// ended without serving.
    fn stopped_starting(&mut self, node: u32) {
        let Placement::Stopping { to, .. } = self.placement else {
            return;
        };
        self.placement = Placement::None;
        if let Some(to) = to {
            self.start_on(to);
        } else {
            self.want = true;
            self.avoid = Some(node);
            self.maybe_place();
        }
    }

    /// Node `n` was told to leave while its agent is connected: a server
    /// there, or a start there, is stopped by its agent when the fence
    /// arrives; none is placed elsewhere before its agent says so (or goes
    /// away), so two never serve.
    fn fence_wait(&mut self, n: u32) {
        match self.placement {
            Placement::Running {
                node, incarnation, ..
            } if node == n => {
                self.placement = Placement::Stopping {
                    from: n,
                    to: None,
                    incarnation,
                };
            }
            Placement::Starting { node, .. } if node == n => {
                self.events
                    .push_or_count(ControllerEvent::StartFailed { node });
                self.placement = Placement::Stopping {
                    from: n,
                    to: None,
                    incarnation: 0,
                };
            }
            Placement::Stopping {
                from,
                to: Some(t),
                incarnation,
            } if t == n => {
                self.placement = Placement::Stopping {
                    from,
                    to: None,
                    incarnation,
                };
            }
            _ => {}
        }
        self.pending_starts.retain(|p| p.2 != n);
    }

    fn on_command(&mut self, conn: CtlConnId, rid: u64, op: ClusterOp, node: u32) {
        let code = Kind::ClusterCommand.code();
        match op {
            ClusterOp::Join => {
                let Some(r) = self.rec(node) else {
                    self.send_error(conn, rid, ErrorCode::Busy, code, "node table full");
                    return;
                };
                r.left = false;
                self.broadcast_members();
                self.send(conn, rid, &Msg::Ok);
                self.maybe_place();
            }
            ClusterOp::Leave => {
                let Some(r) = self.rec(node) else {
                    self.send_error(conn, rid, ErrorCode::Busy, code, "node table full");
                    return;
                };
                r.left = true;
                let c = r.conn;
                if let Some(c) = c {
                    self.send(
                        c,
                        0,
                        &Msg::Fence {
                            reason: FenceReason::LeftCluster,
                        },
                    );
                    self.fence_wait(node);
                } else {
                    self.node_lost(node);
                }
                self.broadcast_members();
                self.send(conn, rid, &Msg::Ok);
            }
            ClusterOp::ClearFailed => {
                if self.failed_deaths != 0 {
                    self.failed_deaths = 0;
                    self.deaths_ms.fill(u64::MAX);
                    self.events.push_or_count(ControllerEvent::FailedCleared);
                    self.want = true;
                    self.avoid = None;
                }
                self.send(conn, rid, &Msg::Ok);
                self.maybe_place();
            }
            ClusterOp::Start => {
                if self.failed_deaths != 0 {
                    let mut t = ErrorText::new();
                    let _ = write!(
                        t,
                        "the store is marked failed ({} server deaths within {} ms); run `csnap cluster clear-failed` first",
                        self.failed_deaths, self.cfg.death_window_ms
                    );
                    self.send_error(conn, rid, ErrorCode::Unsupported, code, t.as_str());
                    return;
                }
                if !self.is_member(node) {
                    let mut t = ErrorText::new();
                    let _ = write!(t, "node {node} is not a connected member");
                    self.send_error(conn, rid, ErrorCode::Unsupported, code, t.as_str());
                    return;
                }
                if self.pending_starts.len() == self.pending_starts.capacity() {
                    self.send_error(conn, rid, ErrorCode::Busy, code, "too many starts waiting");
                    return;
                }
                match self.placement {
                    Placement::Running { node: n, .. } if n == node => {
                        self.send(conn, rid, &Msg::Ok);
                        return;
                    }
                    Placement::Running {
                        node: n,
                        incarnation,
                        ..
                    } => {
                        if let Some(c) = self.conn_of_node(n) {
                            self.send(
                                c,
                                0,
                                &Msg::Fence {
                                    reason: FenceReason::ServerMoved,
                                },
                            );
                        }
                        self.placement = Placement::Stopping {
                            from: n,
                            to: Some(node),
                            incarnation,
                        };
                    }
                    Placement::Starting { node: n, .. } if n != node => {
                        let mut t = ErrorText::new();
                        let _ = write!(t, "a start is under way on node {n}; retry");
                        self.send_error(conn, rid, ErrorCode::Busy, code, t.as_str());
                        return;
                    }
                    Placement::Starting { .. } => {}
                    Placement::Stopping { from, .. } if from == node => {
                        let mut t = ErrorText::new();
                        let _ = write!(t, "the server on node {node} is being stopped; retry");
                        self.send_error(conn, rid, ErrorCode::Busy, code, t.as_str());
                        return;
                    }
                    Placement::Stopping {
                        from, incarnation, ..
                    } => {
                        self.placement = Placement::Stopping {
                            from,
                            to: Some(node),
                            incarnation,
                        };
                    }
                    Placement::None => self.start_on(node),
                }
                self.pending_starts.push((conn, rid, node));
            }
        }
    }

    fn send_status(&mut self, conn: CtlConnId, rid: u64) {
        let (inc, node, addr) = match self.placement {
            Placement::Running {
                node,
                incarnation,
                addr,
            } => (incarnation, node, addr),
            _ => (0, 0, AddrBuf::EMPTY),
        };
        let mut scratch = core::mem::take(&mut self.scratch);
        if let Ok(mut b) = proto::NodeStatusListBuilder::new(&mut scratch[..]) {
            for r in &self.nodes {
                let mut flags = 0;
                if r.conn.is_some() {
                    flags |= NodeStatus::CONNECTED;
                }
                if r.conn.is_some() && !r.left {
                    flags |= NodeStatus::MEMBER;
                }
                if r.standby_ready {
                    flags |= NodeStatus::STANDBY_READY;
                }
                if r.serving != 0 {
                    flags |= NodeStatus::SERVING;
                }
                let _ = b.push(NodeStatus {
                    node: r.id,
                    flags,
                    serving_incarnation: r.serving,
                });
            }
            let nodes = b.finish();
            let msg = Msg::ClusterStatusReply {
                server_incarnation: inc,
                server_node: node,
                failed_deaths: u16::try_from(self.failed_deaths).unwrap_or(u16::MAX),
                server_addr: addr.as_str(),
                nodes,
            };
            if !self.conns.push_msg(conn, rid, 0, &msg) {
                // The tool does not read its replies: drop it (a reply is
                // never dropped silently).
                self.close(conn);
            }
        }
        self.scratch = scratch;
    }

    /// Node `n` is no longer a member (disconnected or told to leave): a
    /// server there is gone, a start there is abandoned.
    fn node_lost(&mut self, n: u32) {
        match self.placement {
            Placement::Running {
                node, incarnation, ..
            } if node == n => self.server_died(node, incarnation, false),
            Placement::Stopping {
                from,
                incarnation: 0,
                ..
            } if from == n => self.stopped_starting(from),
            Placement::Stopping {
                from, incarnation, ..
            } if from == n => self.server_died(from, incarnation, false),
            Placement::Stopping {
                from,
                to: Some(t),
                incarnation,
            } if t == n => {
                self.placement = Placement::Stopping {
                    from,
                    to: None,
                    incarnation,
                };
            }
            Placement::Starting { node, .. } if node == n => {
                self.events
                    .push_or_count(ControllerEvent::StartFailed { node });
                self.placement = Placement::None;
                self.avoid = Some(n);
                self.want = true;
                self.maybe_place();
            }
            _ => {}
        }
        self.pending_starts.retain(|p| p.2 != n);
    }

    // -- placement --------------------------------------------------------------

    /// The crash-loop breaker: records a server death (or a failed start)
    /// now, and marks the store failed when `max_server_deaths` fall within
    /// the window. A server that dies on every start (a poison request, a
    /// corrupt block it cannot survive) then stops taking incarnations
    /// instead of looping; clients waiting for a server fail after their
    /// failover timeout, and `cluster status` says why.
    fn count_death(&mut self) {
        let n = self.deaths_ms.len();
        if n == 0 {
            return;
        }
        self.deaths_ms[self.deaths_next] = self.now_ms;
        self.deaths_next = (self.deaths_next + 1) % n;
        let window = self.cfg.death_window_ms;
        let now = self.now_ms;
        let recent = self
            .deaths_ms
            .iter()
            .filter(|&&t| t != u64::MAX && t <= now && now - t < window)
            .count();
        let recent = u32::try_from(recent).unwrap_or(u32::MAX);
        if self.failed_deaths == 0 && recent >= self.cfg.max_server_deaths {
            self.failed_deaths = recent;
            self.events.push_or_count(ControllerEvent::StoreFailed {
                deaths: recent,
                window_ms: window,
            });
        }
    }

    /// Deaths counted when the crash-loop breaker tripped (0: not failed).
    pub fn failed_deaths(&self) -> u32 {
        self.failed_deaths
    }

    fn maybe_place(&mut self) {
        if self.placement != Placement::None || !self.want || self.cfg.policy == Policy::Manual {
            return;
        }
        if self.failed_deaths != 0 {
            // The crash-loop breaker tripped: no incarnation until cleared.
            return;
        }
        let candidate = |r: &NodeRec| r.conn.is_some() && !r.left && r.standby_ready;
        let mut best: Option<u32> = None;
        for r in &self.nodes {
            if candidate(r) && Some(r.id) != self.avoid && best.is_none_or(|b| r.id < b) {
                best = Some(r.id);
            }
        }
        if best.is_none() {
            best = self
                .avoid
                .filter(|a| self.nodes.iter().any(|r| r.id == *a && candidate(r)));
        }
        match best {
            Some(n) => self.start_on(n),
            None => {
                self.events.push_or_count(ControllerEvent::NoCandidate);
            }
        }
    }

    fn start_on(&mut self, node: u32) {
        let Some(c) = self.conn_of_node(node) else {
            self.placement = Placement::None;
            return;
        };
        self.attempts += 1;
        let attempt = self.attempts;
        self.placement = Placement::Starting {
            node,
            attempt,
            deadline_ms: self.now_ms + self.cfg.start_timeout_ms,
            relayed: false,
        };
        self.events
            .push_or_count(ControllerEvent::Placing { node, attempt });
        self.send(
            c,
            0,
            &Msg::StartHere {
                attempt,
                former_incarnation: self.highest_incarnation,
                claim: self.former_unseen,
            },
        );
        // This start is now the latest: until its server is seen to die,
        // the one after it claims.
        self.former_unseen = true;
    }

    /// Runs what is due at the time given to `set_now`.
    pub fn handle_tick(&mut self) {
        if let Placement::Starting {
            node, deadline_ms, ..
        } = self.placement
        {
            if deadline_ms <= self.now_ms {
                self.events
                    .push_or_count(ControllerEvent::StartFailed { node });
                if let Some(c) = self.conn_of_node(node) {
                    self.send(
                        c,
                        0,
                        &Msg::Fence {
                            reason: FenceReason::ServerMoved,
                        },
                    );
                }
                self.placement = Placement::None;
                self.avoid = Some(node);
                self.want = true;
                self.count_death();
                self.maybe_place();
            }
        }
        self.assert_invariants();
    }

    /// The next time `handle_tick` has something to do.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        match self.placement {
            Placement::Starting { deadline_ms, .. } => Some(deadline_ms),
            _ => None,
        }
    }

    /// The next event to log.
    pub fn poll_event(&mut self) -> Option<ControllerEvent> {
        self.events.pop()
    }

    /// Checks the invariants (after every input, release builds too).
    pub fn assert_invariants(&self) {
        assert!(self.nodes.len() <= NODES_MAX);
        for (i, r) in self.nodes.iter().enumerate() {
            assert!(r.id >= 1, "node id 0 recorded");
            assert!(
                self.nodes[i + 1..].iter().all(|o| o.id != r.id),
                "node {} recorded twice",
                r.id
            );
            if let Some(c) = r.conn {
                let role = self.conns[c as usize].role;
                assert!(
                    role == CtlConnState::Agent { node: Some(r.id) }
                        || role == CtlConnState::Closing,
                    "node {} bound to a connection that is not its agent: {role:?}",
                    r.id
                );
            }
        }
        match self.placement {
            Placement::Running { node, .. } | Placement::Starting { node, .. } => {
                assert!(
                    self.nodes.iter().any(|r| r.id == node),
                    "placement on an unknown node"
                );
            }
            Placement::Stopping { from, to, .. } => {
                assert!(
                    to != Some(from),
                    "stopping a server to start it on the same node"
                );
            }
            Placement::None => {}
        }
        assert!(self.pending_starts.len() <= PENDING_STARTS_MAX);
    }
}
