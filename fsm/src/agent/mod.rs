//! The agent's sans-IO state machine: one per node.
//!
//! The agent answers every volume client and control tool of its node with
//! the address of the serving server (`NeedServer` -> `ServerAddress`),
//! whether that server was already running or had to be started; it keeps a
//! standby server of its own ready (the standby connects to the agent's
//! socket and announces itself with `ServerReady`), starts it when the
//! resource manager says so (`StartHere`), and relays membership to it.
//!
//! Membership and resource management reach the agent as messages on one
//! link, the *bus* (`handle_bus_*`, `bus_output`): `Members`, `StartHere`,
//! `NeedClients`, `Clients`, `ServerUp`, `ServerDown`, `Fence` and
//! `ClientGone` come in; `Join`, `AgentState`, `WantServer`, `NeedClients`,
//! `Clients`, `ServerUp` and `ClientGone` go out. That message set is the
//! whole interface to a membership backend: the `local` backend is a
//! controller process (`crate::cluster`) that relays them over a unix
//! socket; a corosync/pacemaker backend carries the same messages over CPG
//! and takes `StartHere` from a resource agent.
//!
//! # Starting a new incarnation (the recovery barrier's input)
//!
//! On `StartHere` the agent gathers, from every member node's agent, the ids
//! of its snapshot clients (`NeedClients` -> `Clients`; none is a valid
//! answer). A node that leaves meanwhile (a `Members` without it) is no
//! longer waited for, nor is a client reported gone (`ClientGone`). With
//! every answer in, the agent sends its standby
//! `StartServer { members, expected }`; the standby replays the journal,
//! takes the next incarnation, holds origin writes until every expected
//! client has uploaded its read locks or its node has left, and reports
//! `Serving`. The agent then announces `ServerUp`, answers its waiting
//! clients at once, and asks its driver for a new standby (`SpawnStandby`).
//! Membership changes and gone clients after `StartServer` reach the
//! server too (it reads its link once started).
//!
//! # Connection states (the agent's own socket)
//!
//! | state | entered on | accepts |
//! |---|---|---|
//! | `ExpectHello` | accept | `Hello` (role client, control or server) |
//! | `Client` | `Hello` role client or control | `NeedServer` (one outstanding at a time) |
//! | `Server` | `Hello` role server | `ServerReady`, then `Serving` after a start |
//! | `Closing` | a framing error, a refused peer | nothing; closed once its output is written |
//!
//! # The local server
//!
//! | state | entered on | next |
//! |---|---|---|
//! | none | start, standby or server lost | `SpawnStandby` (with backoff) → a `ServerReady` makes it standby |
//! | standby | `ServerReady` | `StartHere` → gathering |
//! | gathering | `StartHere` with a standby | every member answered `Clients` (or left) → starting |
//! | starting | `StartServer` sent | `Serving` → serving; the connection closes → start failed (reported, new standby) |
//! | serving | `Serving` | the connection closes → died (reported as `AgentState.died_incarnation`) |
//!
//! Nothing here allocates after `new`, reads a clock (time is passed in with
//! `set_now`), or touches a socket.

use core::fmt::Write as _;

use csnap_proto::{
    self as proto, ClientEntry, ErrorCode, ErrorText, FenceReason, Kind, Msg, Node, Role, Volume,
};

use crate::conns::{self, ConnTable, SlotState};
use crate::fixed::FixedRing;

// Every client connection of the agent fits one client list.
const _: () = assert!(csnap_pools::AGENT_CONNS_MAX <= csnap_proto::CLIENT_ENTRIES_MAX);
use crate::outbuf::OutBuf;

// The agent's work by job; each adds to `impl AgentFsm`.
mod bus;
mod life;

use life::{Gather, GatherPhase, LocalServer, StandbySlot};

/// A connection on the agent's socket.
pub type AgentConnId = u32;

/// Nodes a membership view holds.
pub const NODES_MAX: usize = proto::NODES_MAX;
/// Snapshot clients one start waits for, cluster-wide.
pub const EXPECTED_MAX: usize = csnap_pools::START_LIST_MAX;
// A start command's client list holds every expected client.
static_assertions::const_assert!(EXPECTED_MAX <= proto::CLIENT_ENTRIES_MAX);
/// Output queued for one connection on the agent's socket.
pub const CONN_OUT_BYTES: usize = csnap_pools::AGENT_CONN_OUT_BYTES;
/// Output queued for the bus.
pub const BUS_OUT_BYTES: usize = csnap_pools::AGENT_BUS_OUT_BYTES;

/// An address (unix path or host:port) in a fixed array.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AddrBuf {
    len: u8,
    bytes: [u8; proto::ADDR_MAX_BYTES],
}

impl core::fmt::Debug for AddrBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl AddrBuf {
    /// The empty address.
    pub const EMPTY: AddrBuf = AddrBuf {
        len: 0,
        bytes: [0; proto::ADDR_MAX_BYTES],
    };

    /// Copies `s`; `None` if longer than `ADDR_MAX_BYTES`.
    pub fn new(s: &str) -> Option<AddrBuf> {
        let len = u8::try_from(s.len()).ok()?;
        if s.len() > proto::ADDR_MAX_BYTES {
            return None;
        }
        let mut a = AddrBuf::EMPTY;
        a.bytes[..s.len()].copy_from_slice(s.as_bytes());
        a.len = len;
        Some(a)
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Configuration, fixed at init.
#[derive(Debug, Clone, Copy)]
pub struct AgentConfig {
    /// This node.
    pub node_id: u32,
    /// The agent's own socket, announced in `Join`.
    pub agent_addr: AddrBuf,
    /// Connections on the agent's socket at once.
    pub conns: usize,
    /// How long a `NeedServer` naming the incarnation the agent believes
    /// alive is held before the same address is given again.
    pub suspect_hold_ms: u64,
    /// Wait before respawning a standby that was lost.
    pub respawn_backoff_ms: u64,
    /// A spawned standby that has not announced itself by then is spawned
    /// again.
    pub spawn_timeout_ms: u64,
    /// Wait after the local server serves before its successor standby is
    /// spawned.
    pub standby_after_start_ms: u64,
    /// After its first `set_now`, the agent holds gather answers and takes
    /// no start for this long: its node's clients reconnect and say who
    /// they are (`csnap_pools::AGENT_RELIST_GRACE_MS`; 0: none).
    pub relist_grace_ms: u64,
    /// Its own servers' deaths (crashes, failed starts) within this window
    /// are counted and reported (`AgentState.recent_deaths`), so that a
    /// restarted controller's crash-loop breaker starts from them; 0: none
    /// counted.
    pub death_window_ms: u64,
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAction {
    /// Start a new standby server process (it will connect to the agent's
    /// socket and send `ServerReady`).
    SpawnStandby,
    /// Something to log.
    Log(AgentEvent),
}

/// Events worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentEvent {
    /// A standby announced itself.
    StandbyReady {
        /// Its process id.
        pid: u32,
    },
    /// The standby went away before it was started.
    StandbyLost {
        /// Its process id.
        pid: u32,
    },
    /// The resource manager asked this node to start the server.
    Gathering {
        /// The attempt (and gather) id.
        attempt: u64,
        /// Nodes whose answer is awaited.
        waiting: u32,
    },
    /// `StartServer` was sent to the standby.
    Starting {
        /// The attempt.
        attempt: u64,
        /// Snapshot clients the recovery barrier waits for.
        expected: u32,
    },
    /// The local server serves.
    Serving {
        /// Its incarnation.
        incarnation: u64,
        /// Its own start time (standby start to serving), microseconds.
        start_micros: u64,
    },
    /// The local server of this incarnation died.
    ServerDied {
        /// Its incarnation.
        incarnation: u64,
    },
    /// The standby failed to start (it closed before `Serving`).
    StartFailed {
        /// The attempt.
        attempt: u64,
    },
    /// More snapshot clients than one start can carry: the start was
    /// refused (raise `START_LIST_MAX`).
    TooManyExpected,
    /// A newer incarnation serves elsewhere: the local server was stopped.
    StaleServerStopped {
        /// The local (older) incarnation.
        incarnation: u64,
    },
    /// The controller fenced this node.
    Fenced {
        /// Why.
        reason: FenceReason,
    },
    /// The bus said something this agent cannot use (logged, ignored).
    BusError {
        /// The error code it carried, if it was an `Error`.
        code: Option<ErrorCode>,
    },
}

/// A client's outstanding `NeedServer`.
#[derive(Debug, Clone, Copy)]
struct Pending {
    request_id: u64,
    failed: u64,
    hold_until_ms: Option<u64>,
}

/// What the agent knows of a connection on its socket (a slot of its
/// `ConnTable`).
///
/// | state | entered on | next |
/// |---|---|---|
/// | `Free` | start; the connection gone (`handle_disconnect`) | accept → `ExpectHello` |
/// | `ExpectHello` | accept | `Hello` of a client or tool → `Client`; of a server → `Server`; of an agent, or no common version → `Closing` |
/// | `Client` | `Hello` with role Client or Control | `NeedServer` waits in `pending` for a server; closes → `Free` (its snapshot client reported gone) |
/// | `Server { announced: false }` | `Hello` with role Server | `ServerReady` → `announced: true` (the standby, or the server being started) |
/// | `Server { announced: true }` | `ServerReady` | `Serving` → the node's serving server; closes → the server is gone (`server_conn_lost`) |
/// | `Closing` | a fatal error, a failed handshake, a peer that does not read | closed once its output is written → `Free` |
#[derive(Debug, Clone, Copy)]
enum AgentConnState {
    Free,
    ExpectHello,
    Client {
        client_id: u64,
        volume: Option<Volume>,
        pending: Option<Pending>,
    },
    Server {
        pid: u32,
        addr: AddrBuf,
        announced: bool,
    },
    Closing,
}

impl SlotState for AgentConnState {
    const FREE: Self = AgentConnState::Free;
    const EXPECT_HELLO: Self = AgentConnState::ExpectHello;
    fn is_free(&self) -> bool {
        matches!(self, AgentConnState::Free)
    }
    fn is_closing(&self) -> bool {
        matches!(self, AgentConnState::Closing)
    }
    fn set_closing(&mut self) {
        *self = AgentConnState::Closing;
    }
}

#[derive(Debug, Clone, Copy)]
struct KnownServer {
    incarnation: u64,
    node_id: u32,
    addr: AddrBuf,
}

#[derive(Debug, Clone, Copy)]
struct Serving {
    conn: AgentConnId,
    incarnation: u64,
    addr: AddrBuf,
}

/// A (re)started agent knows only the clients connected to it: how far its
/// client list is from complete. It only moves forward:
///
/// | from | to | on |
/// |---|---|---|
/// | `Unstarted` | `Grace` | the first `set_now` (the grace runs from then) |
/// | `Grace` | `ListDue` | the first tick past `until_ms`: owed gather answers sent, `AgentState` (a standby is startable now) |
/// | `ListDue` | `Done` | `ClientsOf` (servers waiting for clients of this node that died unseen learn they are gone) queued on a bus that is up |
///
/// With no grace configured it starts `Done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relist {
    Unstarted,
    Grace { until_ms: u64 },
    ListDue,
    Done,
}

/// What the agent knows, for status lines and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentStatus {
    /// Whether this node is a cluster member (per the last `Members`).
    pub member: bool,
    /// Whether the bus is up.
    pub bus_up: bool,
    /// Whether a standby is ready.
    pub standby_ready: bool,
    /// The incarnation the local server serves, 0 if none.
    pub serving_incarnation: u64,
    /// The serving server the agent knows of: (incarnation, node), if any.
    pub cluster_server: Option<(u64, u32)>,
    /// Clients waiting for a server address.
    pub waiting_clients: u32,
    /// Registered snapshot clients of this node.
    pub snapshot_clients: u32,
    /// Within the relist grace after its start, or its complete client
    /// list (`ClientsOf`) not yet on the bus: clients of this node that
    /// died unseen may still be waited for.
    pub relisting: bool,
}

/// The agent state machine.
#[derive(Debug)]
pub struct AgentFsm {
    cfg: AgentConfig,
    now_ms: u64,
    conns: ConnTable<AgentConnState>,
    actions: FixedRing<AgentAction>,
    bus: OutBuf,
    bus_up: bool,
    members: Vec<u32>,
    members_epoch: u64,
    membership_known: bool,
    member: bool,
    fenced: bool,
    /// Members as last told to the local serving server.
    pushed: Vec<u32>,
    standby: StandbySlot,
    gather: Gather,
    local: LocalServer,
    cluster_server: Option<KnownServer>,
    highest_incarnation: u64,
    want_sent_for: Option<u64>,
    scratch: Vec<u8>,
    scratch2: Vec<u8>,
    /// The last `cfg.conns` snapshot clients of this node that went (a
    /// ring): their `ClientGone` is sent again on every `ServerUp` naming
    /// another node's server (the backend says it on this agent's join,
    /// and to all when the serving node joins again), since the word may
    /// have been lost with a bus link, or dropped by a backend that did not
    /// know the server yet; a server that never saw it would keep their
    /// locks parked for good. Sending it twice is harmless.
    gone: Vec<u64>,
    gone_next: usize,
    /// How far the (re)started agent's client list is from complete.
    relist: Relist,
    /// Gathers whose `NeedClients` came while the list was incomplete:
    /// (gather id, starter), answered once it is complete.
    owed: Vec<(u64, u32)>,
    /// When its own servers died (crashed or failed to start), a ring;
    /// `u64::MAX`: unused.
    deaths_ms: [u64; csnap_pools::AGENT_DEATHS_KEPT],
    deaths_next: usize,
}

impl AgentFsm {
    /// Reserves every table. The only allocation.
    pub fn new(cfg: AgentConfig) -> AgentFsm {
        assert!(cfg.node_id >= 1, "node ids start at 1");
        assert!(cfg.conns >= 2 && cfg.conns <= csnap_pools::AGENT_CONNS_MAX);
        let conns = ConnTable::new(cfg.conns, CONN_OUT_BYTES);
        AgentFsm {
            cfg,
            now_ms: 0,
            conns,
            actions: FixedRing::new(64),
            bus: OutBuf::with_capacity(BUS_OUT_BYTES),
            bus_up: false,
            members: Vec::with_capacity(NODES_MAX),
            members_epoch: 0,
            membership_known: false,
            member: false,
            fenced: false,
            pushed: Vec::with_capacity(NODES_MAX),
            // The first standby is spawned at the first tick.
            standby: StandbySlot::Due { at_ms: 0 },
            // Reserved once; every gather reuses them.
            gather: Gather {
                phase: GatherPhase::Idle,
                waiting: Vec::with_capacity(NODES_MAX),
                expected: Vec::with_capacity(EXPECTED_MAX),
                overflow: false,
            },
            local: LocalServer::Idle,
            cluster_server: None,
            highest_incarnation: 0,
            want_sent_for: None,
            scratch: vec![0u8; proto::CLIENT_LIST_BYTES_MAX],
            scratch2: vec![0u8; proto::NODE_LIST_BYTES_MAX],
            gone: Vec::with_capacity(cfg.conns),
            gone_next: 0,
            // No grace: nothing to wait for, report or send.
            relist: if cfg.relist_grace_ms == 0 {
                Relist::Done
            } else {
                Relist::Unstarted
            },
            owed: Vec::with_capacity(NODES_MAX),
            deaths_ms: [u64::MAX; csnap_pools::AGENT_DEATHS_KEPT],
            deaths_next: 0,
        }
    }

    /// Bytes reserved by `new`, one line per pool.
    pub fn reserved_items(cfg: &AgentConfig) -> [(&'static str, usize); 5] {
        [
            ("agent gone-client ring", cfg.conns * 8),
            (
                "agent connection output buffers",
                cfg.conns * CONN_OUT_BYTES,
            ),
            ("agent bus output buffer", BUS_OUT_BYTES),
            (
                "agent gather tables",
                NODES_MAX * 4 * 3
                    + NODES_MAX * core::mem::size_of::<(u64, u32)>()
                    + EXPECTED_MAX * core::mem::size_of::<ClientEntry>(),
            ),
            (
                "agent list scratch",
                proto::CLIENT_LIST_BYTES_MAX + proto::NODE_LIST_BYTES_MAX,
            ),
        ]
    }

    /// Sets the time (monotonic milliseconds) for what follows.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if self.relist == Relist::Unstarted {
            self.relist = Relist::Grace {
                until_ms: now_ms + self.cfg.relist_grace_ms,
            };
        }
    }

    /// One of its own servers died (crashed, or its start failed): counted
    /// for the crash-loop breaker.
    fn note_death(&mut self) {
        if self.cfg.death_window_ms == 0 {
            return;
        }
        self.deaths_ms[self.deaths_next] = self.now_ms;
        self.deaths_next = (self.deaths_next + 1) % self.deaths_ms.len();
    }

    /// Its own servers' deaths within the death window.
    fn recent_deaths(&self) -> u16 {
        let (now, w) = (self.now_ms, self.cfg.death_window_ms);
        let n = self
            .deaths_ms
            .iter()
            .filter(|&&t| t != u64::MAX && t <= now && now - t < w)
            .count();
        u16::try_from(n).unwrap_or(u16::MAX)
    }

    /// A standby is ready and free to start: no gather holds it, and the
    /// client list is complete.
    fn standby_free(&self) -> bool {
        self.standby.ready().is_some() && self.gathering().is_none() && self.listed()
    }

    /// Whether every live client of this node has had the time to
    /// reconnect and say who it is since the agent started.
    fn listed(&self) -> bool {
        match self.relist {
            Relist::Unstarted => false,
            Relist::Grace { until_ms } => self.now_ms >= until_ms,
            Relist::ListDue | Relist::Done => true,
        }
    }

    /// What the agent knows.
    pub fn status(&self) -> AgentStatus {
        let mut waiting = 0u32;
        let mut snaps = 0u32;
        for c in &self.conns {
            if let AgentConnState::Client {
                pending, volume, ..
            } = c.role
            {
                if pending.is_some() {
                    waiting += 1;
                }
                if matches!(volume, Some(Volume::Snapshot(_))) {
                    snaps += 1;
                }
            }
        }
        AgentStatus {
            member: self.member,
            bus_up: self.bus_up,
            standby_ready: self.standby_free(),
            serving_incarnation: self.local.serving().map_or(0, |s| s.incarnation),
            cluster_server: self.cluster_server.map(|s| (s.incarnation, s.node_id)),
            waiting_clients: waiting,
            snapshot_clients: snaps,
            relisting: self.relist != Relist::Done,
        }
    }

    // -- the agent's socket ----------------------------------------------------

    /// A new connection on the agent's socket; `None` when the table is full
    /// (the driver closes it).
    pub fn handle_accept(&mut self) -> Option<AgentConnId> {
        let conn = self.conns.accept()?;
        self.assert_invariants();
        Some(conn)
    }

    /// Whether the driver should hand over more frames of `conn`.
    pub fn wants_read(&self, conn: AgentConnId) -> bool {
        self.conns.wants_read(conn, 2 * 512)
    }

    conns::frame_api!(AgentConnId, conns, on_conn_msg);

    fn on_conn_msg(&mut self, conn: AgentConnId, rid: u64, msg: &Msg<'_>) {
        let kind = msg.kind();
        let role = self.conns[conn as usize].role;
        match (role, msg) {
            (
                AgentConnState::ExpectHello,
                Msg::Hello {
                    version_min,
                    version_max,
                    role,
                },
            ) => {
                let next = match role {
                    Role::Client | Role::Control => Ok(AgentConnState::Client {
                        client_id: 0,
                        volume: None,
                        pending: None,
                    }),
                    Role::Server => Ok(AgentConnState::Server {
                        pid: 0,
                        addr: AddrBuf::EMPTY,
                        announced: false,
                    }),
                    Role::Agent => {
                        Err("agents talk to each other through the membership backend, not here")
                    }
                };
                if self.answer_hello(conn, rid, (*version_min, *version_max), next.err(), 0) {
                    if let Ok(next) = next {
                        self.conns[conn as usize].role = next;
                    }
                }
            }
            (AgentConnState::ExpectHello, _) => self.refuse_hello_order(conn, rid, kind, true),
            (_, Msg::Hello { .. }) => self.refuse_hello_order(conn, rid, kind, false),
            (
                AgentConnState::Client { .. },
                Msg::NeedServer {
                    client_id,
                    failed_incarnation,
                    node_id,
                    volume,
                },
            ) => self.on_need_server(
                conn,
                rid,
                *client_id,
                *failed_incarnation,
                *node_id,
                *volume,
            ),
            (
                AgentConnState::Server {
                    announced: false, ..
                },
                Msg::ServerReady { pid, node_id, addr },
            ) => {
                self.on_server_ready(conn, rid, *pid, *node_id, addr);
            }
            (
                AgentConnState::Server {
                    announced: true, ..
                },
                Msg::Serving {
                    incarnation,
                    start_micros,
                    ..
                },
            ) => self.on_serving(conn, *incarnation, *start_micros),
            (AgentConnState::Server { .. }, Msg::Error { .. }) => {
                // A server reporting why its start failed; it closes next.
            }
            _ => {
                let mut t = ErrorText::new();
                let _ = write!(t, "{} is not accepted on this connection", kind.name());
                self.send_error(conn, rid, ErrorCode::Unsupported, kind.code(), t.as_str());
            }
        }
    }

    fn on_need_server(
        &mut self,
        conn: AgentConnId,
        rid: u64,
        client_id: u64,
        failed: u64,
        node_id: u32,
        volume: Option<Volume>,
    ) {
        let code = Kind::NeedServer.code();
        if volume.is_some() && node_id != self.cfg.node_id {
            let mut t = ErrorText::new();
            let _ = write!(
                t,
                "a client of node {node_id} asked the agent of node {}",
                self.cfg.node_id
            );
            self.send_error(conn, rid, ErrorCode::GeometryMismatch, code, t.as_str());
            return;
        }
        if self.fenced {
            self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                code,
                "this node left the cluster (fenced); no server is given out here",
            );
            return;
        }
        let AgentConnState::Client {
            pending: already, ..
        } = self.conns[conn as usize].role
        else {
            return;
        };
        if already.is_some() {
            self.send_error(
                conn,
                rid,
                ErrorCode::Busy,
                code,
                "one NeedServer at a time per connection",
            );
            return;
        }
        if let AgentConnState::Client {
            client_id: id,
            volume: v,
            ..
        } = &mut self.conns[conn as usize].role
        {
            if volume.is_some() {
                *id = client_id;
                *v = volume;
            }
        }
        let hold = match self.cluster_server {
            Some(s) if s.incarnation > failed => {
                self.reply_address(conn, rid);
                return;
            }
            Some(s) if s.incarnation == failed => Some(self.now_ms + self.cfg.suspect_hold_ms),
            _ => None,
        };
        if let AgentConnState::Client { pending, .. } = &mut self.conns[conn as usize].role {
            *pending = Some(Pending {
                request_id: rid,
                failed,
                hold_until_ms: hold,
            });
        }
        self.want_server(failed);
    }

    fn reply_address(&mut self, conn: AgentConnId, rid: u64) {
        let Some(s) = self.cluster_server else { return };
        self.send(
            conn,
            rid,
            &Msg::ServerAddress {
                incarnation: s.incarnation,
                node_id: s.node_id,
                addr: s.addr.as_str(),
            },
        );
    }

    fn want_server(&mut self, failed: u64) {
        if self.bus_up && self.want_sent_for.is_none_or(|w| w < failed) {
            self.want_sent_for = Some(failed);
            self.bus_send(&Msg::WantServer {
                failed_incarnation: failed,
            });
        }
    }

    /// Answers every waiting client a known server satisfies (newer than
    /// what it saw fail, or its hold expired).
    fn answer_pending(&mut self) {
        let Some(s) = self.cluster_server else { return };
        for i in 0..self.conns.len() {
            let AgentConnState::Client {
                pending: Some(p), ..
            } = self.conns[i].role
            else {
                continue;
            };
            if p.hold_until_ms.is_none() && s.incarnation == p.failed {
                // It asked while no server was known (the agent forgot it
                // on a bus reconnect), and the one it saw fail is said to
                // run: held like a NeedServer naming it, then answered.
                if let AgentConnState::Client {
                    pending: Some(q), ..
                } = &mut self.conns[i].role
                {
                    q.hold_until_ms = Some(self.now_ms + self.cfg.suspect_hold_ms);
                }
                continue;
            }
            let expired = p.hold_until_ms.is_some_and(|t| t <= self.now_ms);
            if s.incarnation > p.failed || expired {
                if let AgentConnState::Client { pending, .. } = &mut self.conns[i].role {
                    *pending = None;
                }
                let conn = AgentConnId::try_from(i).unwrap_or(u32::MAX);
                self.reply_address(conn, p.request_id);
            }
        }
    }

    fn refuse_pending(&mut self, text: &str) {
        for i in 0..self.conns.len() {
            let AgentConnState::Client {
                pending: Some(p), ..
            } = self.conns[i].role
            else {
                continue;
            };
            if let AgentConnState::Client { pending, .. } = &mut self.conns[i].role {
                *pending = None;
            }
            let conn = AgentConnId::try_from(i).unwrap_or(u32::MAX);
            self.send_error(
                conn,
                p.request_id,
                ErrorCode::Unsupported,
                Kind::NeedServer.code(),
                text,
            );
        }
    }

    fn on_server_ready(&mut self, conn: AgentConnId, rid: u64, pid: u32, node: u32, addr: &str) {
        if node != self.cfg.node_id {
            self.send_error(
                conn,
                rid,
                ErrorCode::GeometryMismatch,
                Kind::ServerReady.code(),
                "the server was started for another node",
            );
            self.close(conn);
            return;
        }
        let Some(a) = AddrBuf::new(addr) else {
            self.close(conn);
            return;
        };
        if self.standby.ready().is_some() || self.local.starting().is_some() {
            // One standby at a time: an extra one is sent away.
            self.send_error(
                conn,
                rid,
                ErrorCode::Busy,
                Kind::ServerReady.code(),
                "this agent has a standby already",
            );
            self.close(conn);
            return;
        }
        self.conns[conn as usize].role = AgentConnState::Server {
            pid,
            addr: a,
            announced: true,
        };
        self.standby_to(StandbySlot::Ready { conn });
        self.log(AgentEvent::StandbyReady { pid });
        self.report_state(0);
    }

    fn on_serving(&mut self, conn: AgentConnId, incarnation: u64, start_micros: u64) {
        let Some((sconn, _attempt)) = self.local.starting() else {
            return;
        };
        if sconn != conn {
            return;
        }
        let AgentConnState::Server { addr, .. } = self.conns[conn as usize].role else {
            return;
        };
        self.local_to(LocalServer::Serving(Serving {
            conn,
            incarnation,
            addr,
        }));
        // Members that changed while it started (it was told the members
        // of its `StartServer`).
        self.push_membership();
        self.highest_incarnation = self.highest_incarnation.max(incarnation);
        if self
            .cluster_server
            .is_none_or(|s| s.incarnation < incarnation)
        {
            self.cluster_server = Some(KnownServer {
                incarnation,
                node_id: self.cfg.node_id,
                addr,
            });
        }
        self.want_sent_for = None;
        self.log(AgentEvent::Serving {
            incarnation,
            start_micros,
        });
        // Our own clients first, then everyone else's through the bus.
        self.answer_pending();
        self.bus_send(&Msg::ServerUp {
            incarnation,
            node_id: self.cfg.node_id,
            addr: addr.as_str(),
        });
        self.report_state(0);
        // A new standby, in the background, once the clients have caught
        // up: its init (reserving and locking its memory) would compete for
        // the CPU with their reconnects.
        if self.standby.ready().is_none() {
            let at_ms = self.now_ms + self.cfg.standby_after_start_ms;
            self.standby_to(StandbySlot::Due { at_ms });
        }
    }

    /// `conn` closed or failed.
    pub fn handle_disconnect(&mut self, conn: AgentConnId) {
        let role = self.conns[conn as usize].role;
        match role {
            AgentConnState::Free => return,
            AgentConnState::Client {
                client_id, volume, ..
            } => {
                if volume.is_some() && client_id != 0 {
                    // This node's own gather and server learn it here, not
                    // through the bus (which may be down: the word would be
                    // lost, and a barrier wait for the client forever).
                    self.client_gone(client_id, self.cfg.node_id);
                    if self.gone.len() < self.gone.capacity() {
                        self.gone.push(client_id);
                    } else if let Some(x) = self.gone.get_mut(self.gone_next) {
                        *x = client_id;
                        self.gone_next = (self.gone_next + 1) % self.gone.capacity();
                    }
                    self.bus_send(&Msg::ClientGone {
                        client_id,
                        node_id: self.cfg.node_id,
                    });
                }
            }
            AgentConnState::Server { pid, .. } => self.server_conn_lost(conn, pid),
            AgentConnState::ExpectHello | AgentConnState::Closing => {}
        }
        let c = &mut self.conns[conn as usize];
        c.role = AgentConnState::Free;
        c.out.clear();
        self.assert_invariants();
    }

    fn server_conn_lost(&mut self, conn: AgentConnId, pid: u32) {
        if let Some(s) = self.local.serving().filter(|s| s.conn == conn) {
            self.local_to(LocalServer::Idle);
            self.note_death();
            if self
                .cluster_server
                .is_some_and(|k| k.incarnation == s.incarnation)
            {
                self.cluster_server = None;
            }
            self.log(AgentEvent::ServerDied {
                incarnation: s.incarnation,
            });
            self.report_state(s.incarnation);
        } else if let Some((_, attempt)) = self.local.starting().filter(|s| s.0 == conn) {
            self.local_to(LocalServer::Idle);
            self.note_death();
            self.log(AgentEvent::StartFailed { attempt });
            self.report_state(0);
            self.schedule_spawn(self.cfg.respawn_backoff_ms);
        } else if self.standby.ready() == Some(conn) {
            self.standby_to(StandbySlot::Idle);
            self.abandon_gather();
            self.log(AgentEvent::StandbyLost { pid });
            self.report_state(0);
            self.schedule_spawn(self.cfg.respawn_backoff_ms);
        }
    }

    fn schedule_spawn(&mut self, after_ms: u64) {
        if self.standby == StandbySlot::Idle {
            let at_ms = self.now_ms + after_ms;
            self.standby_to(StandbySlot::Due { at_ms });
        }
    }

    // -- time ------------------------------------------------------------------

    /// Runs what is due at the time given to `set_now`.
    pub fn handle_tick(&mut self) {
        let now = self.now_ms;
        // Due, or spawned and not ready by its deadline: spawn (again).
        if self.standby.next_ms().is_some_and(|t| t <= now) {
            let deadline_ms = now + self.cfg.spawn_timeout_ms;
            self.standby_to(StandbySlot::Spawning { deadline_ms });
            assert!(
                self.actions.push(AgentAction::SpawnStandby),
                "the action queue is drained every loop turn"
            );
        }
        self.answer_pending();
        if self.listed() {
            for i in 0..self.owed.len() {
                let (gather_id, starter) = self.owed[i];
                self.send_clients(gather_id, starter);
            }
            self.owed.clear();
            if let Relist::Grace { .. } = self.relist {
                self.relist = Relist::ListDue;
                // The controller heard "no standby" so far.
                self.report_state(0);
            }
            if self.relist == Relist::ListDue && self.bus_up {
                self.send_clients_of();
            }
        }
        self.assert_invariants();
    }

    /// The next time `handle_tick` has something to do, if any.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut take = |t: Option<u64>| {
            if let Some(t) = t {
                d = Some(d.map_or(t, |x| x.min(t)));
            }
        };
        take(self.standby.next_ms());
        if let Relist::Grace { until_ms } = self.relist {
            take(Some(until_ms));
        }
        // A hold ends in an answer only with a server known (else a past
        // hold would make the loop spin until one is).
        if self.cluster_server.is_some() {
            for c in &self.conns {
                if let AgentConnState::Client {
                    pending: Some(p), ..
                } = c.role
                {
                    take(p.hold_until_ms);
                }
            }
        }
        d
    }

    /// The next thing for the driver to do.
    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop()
    }

    fn log(&mut self, e: AgentEvent) {
        // A full log queue drops the event: logging must never block.
        self.actions.push_or_count(AgentAction::Log(e));
    }

    // -- output ----------------------------------------------------------------

    fn send(&mut self, conn: AgentConnId, rid: u64, msg: &Msg<'_>) {
        if self.conns[conn as usize].role.is_free() {
            return;
        }
        if !self.conns.push_msg(conn, rid, 0, msg) {
            // The peer does not read: drop it.
            self.close(conn);
        }
    }

    fn close(&mut self, conn: AgentConnId) {
        let c = &mut self.conns[conn as usize];
        if matches!(c.role, AgentConnState::Free) {
            return;
        }
        if let AgentConnState::Server { pid, .. } = c.role {
            // Closing a server's link stops it; account for it now.
            c.role = AgentConnState::Closing;
            self.server_conn_lost(conn, pid);
        }
        self.conns.close(conn);
    }

    conns::driver_api!(AgentConnId, conns);

    /// Checks the state's invariants (after every input, release builds
    /// too).
    pub fn assert_invariants(&self) {
        let server_conn = |c: Option<AgentConnId>| {
            c.is_none_or(|c| {
                matches!(
                    self.conns[c as usize].role,
                    AgentConnState::Server {
                        announced: true,
                        ..
                    }
                )
            })
        };
        assert!(
            server_conn(self.standby.ready()),
            "standby is not a server link"
        );
        assert!(
            server_conn(self.local.starting().map(|s| s.0)),
            "starting is not a server link"
        );
        assert!(
            server_conn(self.local.serving().map(|s| s.conn)),
            "serving is not a server link"
        );
        assert!(
            self.standby.ready().is_none()
                || self.standby.ready() != self.local.serving().map(|s| s.conn),
            "the standby serves"
        );
        assert!(
            self.gathering().is_none() || matches!(self.local, LocalServer::Idle),
            "a gather while a started server runs"
        );
        assert!(self.members.len() <= NODES_MAX);
        assert!(
            self.owed.is_empty() || !self.listed(),
            "a gather answer owed with the client list complete"
        );
        let g = &self.gather;
        assert!(g.expected.len() <= EXPECTED_MAX);
        assert!(g.waiting.len() <= NODES_MAX);
        match g.phase {
            GatherPhase::Idle => assert!(
                g.waiting.is_empty() && g.expected.is_empty() && !g.overflow,
                "an idle gather holds entries"
            ),
            GatherPhase::Collecting { attempt, .. } => {
                assert!(attempt != 0, "gather attempt 0");
                assert!(
                    self.standby.ready().is_some(),
                    "gathering without a standby"
                );
            }
        }
        if let (Some(s), Some(k)) = (self.local.serving(), self.cluster_server) {
            assert!(
                k.incarnation >= s.incarnation,
                "known server older than ours"
            );
        }
    }
}
