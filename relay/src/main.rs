//! `csnap-relay`: the `corosync` membership backend of one node (#12).
//!
//! One relay per node, beside that node's agent. To the agent it is the
//! controller: the agent's `--controller` is the relay's socket
//! (`DIR/controller.sock`), and the agent's FSM and sealed loop are those of
//! the `local` backend. To the cluster it is one member of the corosync CPG
//! group `csnap`:
//!
//! - CPG configuration changes drive the agent's `Members`. A node that
//!   left stays in them until the fencer says it is fenced: its clients'
//!   locks are released only then. Each relay of the quorate side asks the
//!   fencer itself (`stonith_admin --fence nN --tolerance T`, T shorter
//!   than the time since the node last joined): Pacemaker's own fencing of
//!   the lost node is merged with it, or counted by the tolerance, and the
//!   answer is the fencer's word that the node is off *after* it left.
//!   (Reading `--history` instead is wrong: it shows only the latest
//!   success, so a second fencing of the same node is never seen.)
//! - `NeedClients`, `Clients`, `ServerUp`, `ClientGone` and the agents'
//!   `AgentState` are CPG messages (the proto frame as it is): every relay
//!   delivers them in the same order and forwards what its agent needs.
//! - The serving node's relay announces the server (`ServerUp`, again when a
//!   node joins).
//! - Without quorum the relay fences its agent (`Fence(LeftCluster)`: no
//!   server, no address) and refuses starts; with quorum back, `Members`
//!   takes it back as a standby.
//! - Pacemaker places the server through the OCF agent `ocf:csnap:server`,
//!   which talks to this socket as `csnap cluster start|leave|status --dir
//!   DIR` does: `start N` sends `StartHere` to the agent (answered once it
//!   serves), `leave N` stops its server (`Fence(ServerMoved)`), `status`
//!   is the monitor.
//!
//! The relay is not sealed or confined: libcpg and libqb allocate and use
//! system calls outside the agent's table. The sealed processes (agent,
//! servers, NBD server) never link them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

mod fence;

use fence::{fence, fence_tolerance_s, Unfenced, FENCE_ASK_DELAY_MS, FENCE_RETRY_MS};

use csnap_proto::{
    self as proto, ClusterOp, ErrorCode, FenceReason, Header, Msg, Node, NodeStatus, Role,
};
use rust_corosync::{cpg, quorum, NodeId};

/// The CPG group every relay joins.
const GROUP: &str = "csnap";
/// How often quorum is polled and queued work retried.
const TICK_MS: u64 = 20;
/// How long a start waits for the node's standby (ticks of `TICK_MS`: 15 s).
const STANDBY_WAIT_TICKS: u64 = 15_000 / TICK_MS;

enum Ev {
    Deliver {
        from: u32,
        data: Vec<u8>,
    },
    Confchg {
        members: Vec<u32>,
    },
    Accept(UnixStream),
    Frame {
        conn: u64,
        data: Vec<u8>,
    },
    Closed {
        conn: u64,
    },
    Tick,
    /// The fencer's answer to request `gen` for node `node`.
    Fenced {
        node: u32,
        gen: u64,
        ok: bool,
        why: String,
    },
    CpgDown(String),
}

static TX: OnceLock<Mutex<Sender<Ev>>> = OnceLock::new();

fn post(e: Ev) {
    if let Some(tx) = TX.get() {
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(e);
        }
    }
}

fn on_deliver(_h: &cpg::Handle, _g: String, node: NodeId, _pid: u32, msg: &[u8], len: usize) {
    post(Ev::Deliver {
        from: u32::from(node),
        data: msg[..len.min(msg.len())].to_vec(),
    });
}

fn on_confchg(
    _h: &cpg::Handle,
    _g: &str,
    members: Vec<cpg::Address>,
    _left: Vec<cpg::Address>,
    _joined: Vec<cpg::Address>,
) {
    let mut m: Vec<u32> = members.iter().map(|a| u32::from(a.nodeid)).collect();
    m.sort_unstable();
    m.dedup();
    post(Ev::Confchg { members: m });
}

macro_rules! say {
    ($($a:tt)*) => { eprintln!("[t={}] csnap relay: {}", csnap_sys::monotonic_micros(), format!($($a)*)) };
}

/// What the relay knows of a connection: `ExpectHello` on accept; `Hello`
/// of an agent → `Agent { joined: false }`, its `Join` → `joined: true`;
/// `Hello` of a tool → `Tool`. (The same naming as the FSMs'
/// `AgentConnState`, `CtlConnState`: `<owner>ConnState`.)
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RelayConnState {
    ExpectHello,
    Agent { joined: bool },
    Tool,
}

struct Conn {
    w: UnixStream,
    role: RelayConnState,
}

#[derive(Clone, Copy, Default, Debug)]
struct NodeState {
    standby_ready: bool,
    serving: u64,
}

#[derive(Clone, Debug)]
struct Server {
    node: u32,
    incarnation: u64,
    addr: String,
}

/// What the relay does with a frame from its own agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FromAgent {
    /// To the CPG group (agreed order, every relay sees it).
    Multicast,
    /// Not needed here (Pacemaker keeps the resource running; errors are
    /// the agent's to log).
    Drop,
    /// Not this agent's to say (it names another node) or not a bus
    /// message: logged and ignored.
    Unexpected,
}

/// The routing of a frame from node `me`'s agent: only what it may say
/// for its own node goes to the group.
fn from_agent(me: u32, msg: &Msg<'_>) -> FromAgent {
    match msg {
        Msg::AgentState { node_id, .. }
        | Msg::ServerUp { node_id, .. }
        | Msg::ClientsOf { node_id, .. }
            if *node_id == me =>
        {
            FromAgent::Multicast
        }
        Msg::NeedClients { starter, .. } if *starter == me => FromAgent::Multicast,
        Msg::Clients { from, .. } if *from == me => FromAgent::Multicast,
        Msg::ClientGone { .. } => FromAgent::Multicast,
        Msg::WantServer { .. } | Msg::Error { .. } => FromAgent::Drop,
        _ => FromAgent::Unexpected,
    }
}

/// Whether a CPG message from node `from` that the relay only passes on
/// goes to node `me`'s agent. `here`: this node serves or starts the
/// server (a client's word is for its barrier only).
fn forward_to_agent(me: u32, from: u32, here: bool, msg: &Msg<'_>) -> bool {
    match msg {
        // Another node's gather asks every other agent.
        Msg::NeedClients { starter, .. } => *starter != me && *starter == from,
        // An answer to this node's gather, from the node it names.
        Msg::Clients { to, from: f, .. } => *to == me && *f == from,
        Msg::ClientGone { .. } => here,
        // A node's complete list, said by that node, for the server here.
        Msg::ClientsOf { node_id, .. } => here && *node_id == from && *node_id != me,
        _ => false,
    }
}

struct Relay {
    me: u32,
    fence_prefix: String,
    cpg: cpg::Handle,
    quorum: quorum::Handle,
    quorate: bool,
    conns: HashMap<u64, Conn>,
    agent: Option<u64>,
    cpg_members: BTreeSet<u32>,
    /// Nodes that left the CPG group and are not fenced yet (kept in the
    /// agent's `Members`).
    unfenced: BTreeMap<u32, Unfenced>,
    /// When each member last joined, as this relay saw it.
    joined_at: BTreeMap<u32, Instant>,
    /// Leaves counted, for `Unfenced::gen`.
    leaves: u64,
    states: BTreeMap<u32, NodeState>,
    server: Option<Server>,
    highest: u64,
    former_unseen: bool,
    /// The node of the latest server (or start) announced.
    last_server_node: Option<u32>,
    epoch: u64,
    attempt: u64,
    pending_start: Option<(u64, u64)>,
    pending_stop: Option<(u64, u64)>,
    /// A start waiting for the standby: (tool conn, request, ticks left).
    waiting_standby: Option<(u64, u64, u64)>,
    /// CPG messages not yet accepted by libcpg (`TryAgain`), in order.
    mcast_q: VecDeque<Vec<u8>>,
    fenced_agent: bool,
    buf: Vec<u8>,
}

impl Relay {
    fn send_to(&mut self, conn: u64, rid: u64, msg: &Msg<'_>) {
        let Ok(n) = proto::encode(&Header::new(rid, 0), msg, &mut self.buf) else {
            say!("cannot encode {}", msg.kind().name());
            return;
        };
        let bad = match self.conns.get_mut(&conn) {
            Some(c) => c.w.write_all(&self.buf[..n]).is_err(),
            None => false,
        };
        if bad {
            self.close(conn);
        }
    }

    fn send_agent(&mut self, msg: &Msg<'_>) {
        if let Some(a) = self.agent {
            self.send_to(a, 0, msg);
        }
    }

    fn error(&mut self, conn: u64, rid: u64, culprit: u16, text: &str) {
        self.send_to(
            conn,
            rid,
            &Msg::Error {
                code: ErrorCode::Unsupported,
                culprit,
                text,
            },
        );
    }

    fn close(&mut self, conn: u64) {
        if let Some(c) = self.conns.remove(&conn) {
            let _ = c.w.shutdown(std::net::Shutdown::Both);
        }
        if self.agent == Some(conn) {
            self.agent = None;
            say!("the agent's link closed");
            self.agent_lost();
        }
        if self.pending_start.is_some_and(|(c, _)| c == conn) {
            self.pending_start = None;
        }
        if self.pending_stop.is_some_and(|(c, _)| c == conn) {
            self.pending_stop = None;
        }
    }

    /// The agent of this node is gone (crashed or killed): its spawner and
    /// servers die with it, its clients lose it. The node cannot serve or
    /// vouch for its clients any more: ask the cluster to fence it, so the
    /// others release its clients' locks (they are released on a fenced
    /// node only).
    fn agent_lost(&mut self) {
        let name = format!("{}{}", self.fence_prefix, self.me);
        say!("asking the cluster to fence this node ({name}): its agent is gone");
        std::thread::spawn(move || {
            // No tolerance: an earlier fencing of this node is not this one.
            let (ok, why) = fence(&name, 0);
            if !ok {
                say!("fencing this node ({name}) failed: {why}");
            }
        });
    }

    fn mcast(&mut self, msg: &Msg<'_>) {
        let Ok(n) = proto::encode(&Header::new(0, 0), msg, &mut self.buf) else {
            return;
        };
        self.mcast_q.push_back(self.buf[..n].to_vec());
        self.flush_mcast();
    }

    /// Sends the queued CPG messages in order; CPG refuses with `TryAgain`
    /// during a configuration change (flow control): the rest wait for the
    /// next tick.
    fn flush_mcast(&mut self) {
        while let Some(m) = self.mcast_q.front() {
            match cpg::mcast_joined(&self.cpg, cpg::Guarantee::TypeAgreed, m) {
                Ok(()) => {
                    self.mcast_q.pop_front();
                }
                Err(rust_corosync::CsError::CsErrTryAgain) => return,
                Err(e) => {
                    say!("cpg mcast failed: {e}; message dropped");
                    self.mcast_q.pop_front();
                }
            }
        }
    }

    fn agent_members(&self) -> Vec<u32> {
        let mut m: BTreeSet<u32> = self.cpg_members.clone();
        m.extend(self.unfenced.keys());
        m.into_iter().collect()
    }

    fn send_members(&mut self) {
        if !self.quorate {
            return;
        }
        self.epoch += 1;
        let nodes: Vec<Node> = self
            .agent_members()
            .into_iter()
            .map(|id| Node { id })
            .collect();
        let mut scratch = vec![0u8; proto::NODE_LIST_BYTES_MAX];
        let Ok(list) = proto::NodeList::from_entries(&nodes, &mut scratch) else {
            return;
        };
        let epoch = self.epoch;
        say!(
            "members (epoch {epoch}): {:?}",
            nodes.iter().map(|n| n.id).collect::<Vec<_>>()
        );
        self.send_agent(&Msg::Members {
            epoch,
            members: list,
        });
    }

    fn on_frame(&mut self, conn: u64, data: &[u8]) {
        let Some(role) = self.conns.get(&conn).map(|c| c.role) else {
            return;
        };
        let (hdr, msg) = match proto::decode(data) {
            Ok(x) => x,
            Err(e) => {
                let t = format!("{e}");
                self.error(conn, 0, 0, &t);
                self.close(conn);
                return;
            }
        };
        let rid = hdr.request_id;
        let kind = msg.kind().code();
        match (role, &msg) {
            (
                RelayConnState::ExpectHello,
                Msg::Hello {
                    version_min,
                    version_max,
                    role,
                },
            ) => {
                let Some(version) = proto::negotiate(*version_min, *version_max) else {
                    self.error(conn, rid, kind, "no common protocol version");
                    self.close(conn);
                    return;
                };
                let next = match role {
                    Role::Agent => RelayConnState::Agent { joined: false },
                    Role::Control => RelayConnState::Tool,
                    _ => {
                        self.error(conn, rid, kind, "the relay talks to its agent and to tools");
                        self.close(conn);
                        return;
                    }
                };
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.role = next;
                }
                self.send_to(
                    conn,
                    rid,
                    &Msg::HelloOk {
                        version,
                        server_id: 0,
                    },
                );
            }
            (RelayConnState::ExpectHello, _) => self.error(conn, rid, kind, "send Hello first"),
            (RelayConnState::Agent { joined: false }, Msg::Join { node_id, .. }) => {
                if *node_id != self.me || self.agent.is_some() {
                    let t = format!(
                        "this relay is node {}'s and has {} agent",
                        self.me,
                        if self.agent.is_some() { "an" } else { "no" }
                    );
                    self.error(conn, rid, kind, &t);
                    self.close(conn);
                    return;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.role = RelayConnState::Agent { joined: true };
                }
                self.agent = Some(conn);
                say!("node {}'s agent joined", self.me);
                if self.quorate {
                    self.send_members();
                } else {
                    self.fence_agent(FenceReason::LeftCluster);
                }
                if let Some(s) = self.server.clone() {
                    self.send_agent(&Msg::ServerUp {
                        incarnation: s.incarnation,
                        node_id: s.node,
                        addr: &s.addr,
                    });
                }
            }
            (RelayConnState::Agent { joined: true }, m) => self.on_agent_msg(m),
            (RelayConnState::Agent { joined: false }, _) => {
                self.error(conn, rid, kind, "an agent sends Join first");
            }
            (RelayConnState::Tool, Msg::ClusterCommand { op, node_id }) => {
                self.on_command(conn, rid, *op, *node_id);
            }
            (RelayConnState::Tool, Msg::ClusterStatus) => self.send_status(conn, rid),
            _ => {
                let t = format!("{} is not accepted on this connection", msg.kind().name());
                self.error(conn, rid, kind, &t);
            }
        }
    }

    fn on_agent_msg(&mut self, msg: &Msg<'_>) {
        match from_agent(self.me, msg) {
            FromAgent::Multicast => self.mcast(msg),
            FromAgent::Drop => {}
            FromAgent::Unexpected => say!("ignoring {} from the agent", msg.kind().name()),
        }
    }

    fn fence_agent(&mut self, reason: FenceReason) {
        if reason == FenceReason::LeftCluster {
            self.fenced_agent = true;
        }
        self.send_agent(&Msg::Fence { reason });
    }

    fn on_command(&mut self, conn: u64, rid: u64, op: ClusterOp, node: u32) {
        let code = proto::Kind::ClusterCommand.code();
        if node != self.me {
            let t = format!("this is node {}'s relay; ask node {node}'s", self.me);
            self.error(conn, rid, code, &t);
            return;
        }
        match op {
            ClusterOp::Start => {
                if let Some(s) = &self.server {
                    if s.node == self.me {
                        self.send_to(conn, rid, &Msg::Ok);
                        return;
                    }
                }
                if self.agent.is_none() {
                    self.error(conn, rid, code, "no agent is connected on this node");
                    return;
                }
                if self.pending_start.is_some() || self.waiting_standby.is_some() {
                    self.error(conn, rid, code, "a start is under way");
                    return;
                }
                if let Some(n) = self.former_unfenced() {
                    // Pacemaker fences a lost node before it starts the
                    // server elsewhere; the relay checks it again, so a
                    // start never runs while the node of the former server
                    // may still write (a wrong constraint, a manual start).
                    say!("start: waiting until node {n}, where the former server ran, is fenced");
                    self.waiting_standby = Some((conn, rid, STANDBY_WAIT_TICKS));
                    return;
                }
                if !self.quorate || !self.states.get(&self.me).is_some_and(|s| s.standby_ready) {
                    // The agent spawns its standby at init and after every
                    // start or loss, and quorum can be lost for a moment
                    // (a membership change Pacemaker has not acted on
                    // yet): wait for both (bounded, checked every tick)
                    // rather than fail a start Pacemaker placed here.
                    // Never start without quorum.
                    say!("start: waiting for quorum and this node's standby");
                    self.waiting_standby = Some((conn, rid, STANDBY_WAIT_TICKS));
                    return;
                }
                self.start_here(conn, rid);
            }
            ClusterOp::Leave => {
                let serving = self.states.get(&self.me).map_or(0, |s| s.serving);
                let here = self.server.as_ref().is_some_and(|s| s.node == self.me);
                if serving == 0 && !here && self.pending_start.is_none() {
                    if let Some((c, r, _)) = self.waiting_standby.take() {
                        self.error(c, r, code, "stopped");
                    }
                    self.send_to(conn, rid, &Msg::Ok);
                    return;
                }
                if let Some((c, r)) = self.pending_start.take() {
                    self.error(c, r, code, "stopped");
                }
                if let Some((c, r, _)) = self.waiting_standby.take() {
                    self.error(c, r, code, "stopped");
                }
                self.pending_stop = Some((conn, rid));
                say!("stop: fencing the local server");
                self.fence_agent(FenceReason::ServerMoved);
            }
            ClusterOp::Join | ClusterOp::ClearFailed => {
                self.error(
                    conn,
                    rid,
                    code,
                    "membership is corosync's here; not supported",
                );
            }
        }
    }

    /// The node the former server ran on, if it left the group and the
    /// fencer has not said it is fenced yet.
    fn former_unfenced(&self) -> Option<u32> {
        self.last_server_node
            .filter(|&n| n != self.me && self.unfenced.contains_key(&n))
    }

    /// Asks the fencer to fence every node that left and is not asked for
    /// yet, if this side has quorum (the minority never fences the
    /// majority). Each request runs in a thread of its own and ends in
    /// `Ev::Fenced`.
    fn request_fences(&mut self) {
        if !quorum::getquorate(&self.quorum).unwrap_or(false) {
            return;
        }
        let now = Instant::now();
        for (&n, u) in &mut self.unfenced {
            if u.asked || now < u.retry_at {
                continue;
            }
            u.asked = true;
            let tolerance = fence_tolerance_s(
                self.joined_at
                    .get(&n)
                    .map_or(Duration::ZERO, |t| now.duration_since(*t)),
            );
            let name = format!("{}{n}", self.fence_prefix);
            let gen = u.gen;
            say!("asking the fencer to fence node {n} ({name}, tolerance {tolerance} s)");
            std::thread::spawn(move || {
                let (ok, why) = fence(&name, tolerance);
                post(Ev::Fenced {
                    node: n,
                    gen,
                    ok,
                    why,
                });
            });
        }
    }

    fn start_here(&mut self, conn: u64, rid: u64) {
        self.attempt += 1;
        let attempt = self.attempt;
        let claim = self.former_unseen;
        let former = self.highest;
        say!("start {attempt}: StartHere (former incarnation {former}, claim {claim})");
        self.pending_start = Some((conn, rid));
        self.send_agent(&Msg::StartHere {
            attempt,
            former_incarnation: former,
            claim,
        });
    }

    fn send_status(&mut self, conn: u64, rid: u64) {
        let members = self.agent_members();
        let mut ids: BTreeSet<u32> = self.states.keys().copied().collect();
        ids.extend(members.iter());
        let list: Vec<NodeStatus> = ids
            .iter()
            .map(|&id| {
                let st = self.states.get(&id).copied().unwrap_or_default();
                let mut flags = 0;
                if self.cpg_members.contains(&id) {
                    flags |= NodeStatus::CONNECTED;
                }
                if members.contains(&id) && self.quorate {
                    flags |= NodeStatus::MEMBER;
                }
                if st.standby_ready {
                    flags |= NodeStatus::STANDBY_READY;
                }
                if st.serving != 0 {
                    flags |= NodeStatus::SERVING;
                }
                NodeStatus {
                    node: id,
                    flags,
                    serving_incarnation: st.serving,
                }
            })
            .collect();
        let mut scratch = vec![0u8; proto::NODE_STATUS_LIST_BYTES_MAX];
        let Ok(nodes) = proto::NodeStatusList::from_entries(&list, &mut scratch) else {
            return;
        };
        let s = self.server.clone();
        self.send_to(
            conn,
            rid,
            &Msg::ClusterStatusReply {
                server_incarnation: s.as_ref().map_or(0, |s| s.incarnation),
                server_node: s.as_ref().map_or(0, |s| s.node),
                failed_deaths: 0,
                server_addr: s.as_ref().map_or("", |s| s.addr.as_str()),
                nodes,
            },
        );
    }

    fn on_deliver(&mut self, from: u32, data: &[u8]) {
        let Ok((_, msg)) = proto::decode(data) else {
            say!("undecodable CPG message from node {from}");
            return;
        };
        match &msg {
            Msg::AgentState {
                node_id,
                standby_ready,
                serving_incarnation,
                died_incarnation,
                ..
            } => {
                if *node_id != from {
                    return;
                }
                self.states.insert(
                    from,
                    NodeState {
                        standby_ready: *standby_ready,
                        serving: *serving_incarnation,
                    },
                );
                if *died_incarnation != 0 {
                    if let Some(s) = &self.server {
                        if s.node == from && s.incarnation == *died_incarnation {
                            say!("server incarnation {died_incarnation} on node {from} died (its agent saw it)");
                            self.server = None;
                            self.former_unseen = false;
                            self.send_agent(&Msg::ServerDown {
                                incarnation: *died_incarnation,
                                node_id: from,
                            });
                        }
                    }
                }
                if from == self.me {
                    if *serving_incarnation == 0 {
                        if let Some((c, r)) = self.pending_stop.take() {
                            self.send_to(c, r, &Msg::Ok);
                        }
                    }
                    if !*standby_ready && *serving_incarnation == 0 && *died_incarnation == 0 {
                        if let Some((c, r)) = self.pending_start.take() {
                            self.error(
                                c,
                                r,
                                proto::Kind::ClusterCommand.code(),
                                "the start could not be made on this node",
                            );
                        }
                    }
                }
            }
            Msg::NeedClients { .. } | Msg::Clients { .. }
                if forward_to_agent(self.me, from, false, &msg) =>
            {
                self.send_agent(&msg);
            }
            Msg::ServerUp {
                incarnation,
                node_id,
                addr,
            } => {
                if *node_id != from {
                    return;
                }
                if *incarnation < self.highest {
                    if from == self.me {
                        say!(
                            "our server incarnation {incarnation} is older than {}: fencing it",
                            self.highest
                        );
                        self.fence_agent(FenceReason::ServerMoved);
                    }
                    return;
                }
                let new = self
                    .server
                    .as_ref()
                    .is_none_or(|s| s.incarnation != *incarnation);
                self.highest = *incarnation;
                self.former_unseen = true;
                self.last_server_node = Some(from);
                self.server = Some(Server {
                    node: from,
                    incarnation: *incarnation,
                    addr: (*addr).to_string(),
                });
                if new {
                    say!("server incarnation {incarnation} serves on node {from} at {addr}");
                }
                self.send_agent(&msg);
                if from == self.me {
                    if let Some((c, r)) = self.pending_start.take() {
                        self.send_to(c, r, &Msg::Ok);
                    }
                }
            }
            Msg::ClientGone { .. } | Msg::ClientsOf { .. } => {
                let here = self.states.get(&self.me).is_some_and(|s| s.serving != 0)
                    || self.pending_start.is_some();
                if forward_to_agent(self.me, from, here, &msg) {
                    self.send_agent(&msg);
                }
            }
            _ => {}
        }
    }

    fn on_confchg(&mut self, members: Vec<u32>) {
        let new: BTreeSet<u32> = members.into_iter().collect();
        let left: Vec<u32> = self.cpg_members.difference(&new).copied().collect();
        let joined: Vec<u32> = new.difference(&self.cpg_members).copied().collect();
        self.cpg_members = new;
        say!(
            "cpg members {:?} (left {left:?}, joined {joined:?})",
            self.cpg_members
        );
        for &n in &left {
            if n == self.me {
                continue;
            }
            self.leaves += 1;
            self.unfenced.insert(
                n,
                Unfenced {
                    gen: self.leaves,
                    asked: false,
                    retry_at: Instant::now() + Duration::from_millis(FENCE_ASK_DELAY_MS),
                },
            );
            self.states.remove(&n);
            if let Some(s) = self.server.clone() {
                if s.node == n {
                    say!(
                        "the serving node {n} left: server incarnation {} is down (not yet fenced)",
                        s.incarnation
                    );
                    self.server = None;
                    self.send_agent(&Msg::ServerDown {
                        incarnation: s.incarnation,
                        node_id: n,
                    });
                }
            }
        }
        for &n in &joined {
            self.unfenced.remove(&n);
            self.joined_at.insert(n, Instant::now());
        }
        self.request_fences();
        self.send_members();
        if !joined.is_empty() {
            // Tell the joiners our state and, if we serve, the server.
            if let Some(st) = self.states.get(&self.me).copied() {
                self.mcast(&Msg::AgentState {
                    node_id: self.me,
                    standby_ready: st.standby_ready,
                    recent_deaths: 0,
                    serving_incarnation: st.serving,
                    died_incarnation: 0,
                });
            }
            if let Some(s) = self.server.clone() {
                if s.node == self.me {
                    self.mcast(&Msg::ServerUp {
                        incarnation: s.incarnation,
                        node_id: s.node,
                        addr: &s.addr,
                    });
                }
            }
        }
    }

    fn on_fenced(&mut self, n: u32, gen: u64, ok: bool, why: &str) {
        let Some(u) = self.unfenced.get_mut(&n).filter(|u| u.gen == gen) else {
            return;
        };
        if !ok {
            say!("fencing node {n} failed ({why}); asking again in {FENCE_RETRY_MS} ms");
            u.asked = false;
            u.retry_at = Instant::now() + Duration::from_millis(FENCE_RETRY_MS);
            return;
        }
        self.unfenced.remove(&n);
        say!("node {n} is fenced: it leaves the agent's members (its clients' locks go)");
        if self.last_server_node == Some(n) {
            // The latest server ran there: fenced, it cannot write any
            // more, so the next start need not claim.
            self.former_unseen = false;
        }
        self.send_members();
    }

    fn on_tick(&mut self) {
        self.flush_mcast();
        if self.unfenced.values().any(|u| !u.asked) {
            self.request_fences();
        }
        if let Some((c, r, left)) = self.waiting_standby {
            let ready = self.quorate
                && self.former_unfenced().is_none()
                && self.agent.is_some()
                && self.states.get(&self.me).is_some_and(|s| s.standby_ready);
            if ready && self.conns.contains_key(&c) {
                self.waiting_standby = None;
                self.start_here(c, r);
            } else if left == 0 || !self.conns.contains_key(&c) {
                self.waiting_standby = None;
                self.error(
                    c,
                    r,
                    proto::Kind::ClusterCommand.code(),
                    "no quorum, no ready standby on this node, or the former server's node not fenced within 15 s",
                );
            } else {
                self.waiting_standby = Some((c, r, left - 1));
            }
        }
        let q = quorum::getquorate(&self.quorum).unwrap_or(false);
        if q != self.quorate {
            self.quorate = q;
            if q {
                say!("quorum regained: this node may serve again");
                self.fenced_agent = false;
                self.send_members();
            } else {
                say!("quorum lost: this node stops serving and starts nothing");
                self.fence_agent(FenceReason::LeftCluster);
                if let Some((c, r)) = self.pending_start.take() {
                    // The fence aborts the start under way; it is made
                    // again (a new attempt) if quorum and the standby come
                    // back within the wait, else it fails.
                    say!("start: aborted by the quorum loss; waiting for quorum again");
                    self.waiting_standby = Some((c, r, STANDBY_WAIT_TICKS));
                }
            }
        }
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: csnap-relay --dir DIR --node N [--fence-prefix n]\n  \
         listens on DIR/controller.sock for node N's agent (csnap agent --controller \
         DIR/controller.sock) and for `csnap cluster start|leave|status --dir DIR`;\n  \
         node N is corosync node id N, whose fencing Pacemaker reports as PREFIX<N>"
    );
    ExitCode::from(2)
}

fn reader(conn: u64, mut s: UnixStream) {
    let mut r = proto::FrameReader::new(vec![0u8; proto::FRAME_MAX_BYTES].into_boxed_slice());
    loop {
        loop {
            match r.next_frame() {
                Ok(Some(f)) => post(Ev::Frame {
                    conn,
                    data: f.to_vec(),
                }),
                Ok(None) => break,
                Err(_) => {
                    post(Ev::Closed { conn });
                    return;
                }
            }
        }
        match s.read(r.spare()) {
            Ok(0) | Err(_) => {
                post(Ev::Closed { conn });
                return;
            }
            Ok(n) => r.advance(n),
        }
    }
}

fn main() -> ExitCode {
    let mut dir: Option<PathBuf> = None;
    let mut node: Option<u32> = None;
    let mut prefix = "n".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--node" => node = args.next().and_then(|v| v.parse().ok()).filter(|&n| n >= 1),
            "--fence-prefix" => prefix = args.next().unwrap_or_default(),
            _ => return usage(),
        }
    }
    let (Some(dir), Some(me)) = (dir, node) else {
        return usage();
    };
    match run(&dir, me, prefix) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(dir: &std::path::Path, me: u32, prefix: String) -> Result<(), String> {
    let (tx, rx): (Sender<Ev>, Receiver<Ev>) = channel();
    TX.set(Mutex::new(tx))
        .map_err(|_| "already initialised".to_string())?;
    let model = cpg::ModelData::ModelV1(cpg::Model1Data {
        flags: cpg::Model1Flags::None,
        deliver_fn: Some(on_deliver),
        confchg_fn: Some(on_confchg),
        totem_confchg_fn: None,
    });
    let h = cpg::initialize(&model, 0)
        .map_err(|e| format!("cpg initialize: {e} (is corosync running?)"))?;
    let local = u32::from(cpg::local_get(&h).map_err(|e| format!("cpg local_get: {e}"))?);
    if local != me {
        return Err(format!(
            "--node {me} but this is corosync node {local}: csnap node ids are corosync node ids"
        ));
    }
    let qmodel = quorum::ModelData::ModelV1(quorum::Model1Data {
        flags: quorum::Model1Flags::None,
        quorum_notification_fn: None,
        nodelist_notification_fn: None,
    });
    let (qh, _) = quorum::initialize(&qmodel, 0).map_err(|e| format!("quorum initialize: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let sock = dir.join("controller.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    cpg::join(&h, GROUP).map_err(|e| format!("cpg join {GROUP}: {e}"))?;
    let hd = h.clone();
    std::thread::spawn(move || {
        if let Err(e) = cpg::dispatch(&hd, rust_corosync::DispatchFlags::Blocking) {
            post(Ev::CpgDown(format!("{e}")));
        } else {
            post(Ev::CpgDown("dispatch returned".into()));
        }
    });
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            post(Ev::Accept(s));
        }
    });
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(TICK_MS));
        post(Ev::Tick);
    });
    let quorate = quorum::getquorate(&qh).unwrap_or(false);
    let mut relay = Relay {
        me,
        fence_prefix: prefix,
        cpg: h,
        quorum: qh,
        quorate,
        conns: HashMap::new(),
        agent: None,
        cpg_members: BTreeSet::new(),
        unfenced: BTreeMap::new(),
        joined_at: BTreeMap::new(),
        leaves: 0,
        states: BTreeMap::new(),
        server: None,
        highest: 0,
        former_unseen: true,
        last_server_node: None,
        epoch: 0,
        attempt: 0,
        pending_start: None,
        pending_stop: None,
        waiting_standby: None,
        mcast_q: VecDeque::new(),
        fenced_agent: false,
        buf: vec![0u8; proto::FRAME_MAX_BYTES],
    };
    say!(
        "node {me}: cpg group {GROUP} joined, {} quorum; listening on {}",
        if quorate { "with" } else { "without" },
        sock.display()
    );
    let mut next_conn = 1u64;
    while let Ok(ev) = rx.recv() {
        match ev {
            Ev::Deliver { from, data } => relay.on_deliver(from, &data),
            Ev::Confchg { members } => relay.on_confchg(members),
            Ev::Accept(s) => {
                let id = next_conn;
                next_conn += 1;
                let Ok(r) = s.try_clone() else { continue };
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                relay.conns.insert(
                    id,
                    Conn {
                        w: s,
                        role: RelayConnState::ExpectHello,
                    },
                );
                std::thread::spawn(move || reader(id, r));
            }
            Ev::Frame { conn, data } => relay.on_frame(conn, &data),
            Ev::Closed { conn } => relay.close(conn),
            Ev::Tick => relay.on_tick(),
            Ev::Fenced { node, gen, ok, why } => relay.on_fenced(node, gen, ok, &why),
            Ev::CpgDown(e) => return Err(format!("corosync CPG connection lost: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use csnap_proto::{ClientEntry, ClientList};

    fn list<'a>(buf: &'a mut [u8], cs: &[(u64, u32)]) -> ClientList<'a> {
        let e: Vec<ClientEntry> = cs
            .iter()
            .map(|&(client_id, node_id)| ClientEntry { client_id, node_id })
            .collect();
        ClientList::from_entries(&e, buf).unwrap()
    }

    #[test]
    fn an_agent_speaks_to_the_group_only_for_its_own_node() {
        let mut b = [0u8; 256];
        let state = |node_id| Msg::AgentState {
            node_id,
            standby_ready: true,
            recent_deaths: 0,
            serving_incarnation: 0,
            died_incarnation: 0,
        };
        assert_eq!(from_agent(2, &state(2)), FromAgent::Multicast);
        assert_eq!(from_agent(2, &state(3)), FromAgent::Unexpected);
        let up = |node_id| Msg::ServerUp {
            incarnation: 7,
            node_id,
            addr: "10.0.0.2:7000",
        };
        assert_eq!(from_agent(2, &up(2)), FromAgent::Multicast);
        assert_eq!(from_agent(2, &up(1)), FromAgent::Unexpected);
        let need = |starter| Msg::NeedClients {
            gather_id: 4,
            starter,
        };
        assert_eq!(from_agent(2, &need(2)), FromAgent::Multicast);
        assert_eq!(from_agent(2, &need(3)), FromAgent::Unexpected);
        let cl = list(&mut b, &[(9, 2)]);
        let clients = |from| Msg::Clients {
            gather_id: 4,
            from,
            to: 3,
            clients: cl,
        };
        assert_eq!(from_agent(2, &clients(2)), FromAgent::Multicast);
        assert_eq!(from_agent(2, &clients(1)), FromAgent::Unexpected);
        let of = |node_id| Msg::ClientsOf {
            node_id,
            clients: cl,
        };
        assert_eq!(from_agent(2, &of(2)), FromAgent::Multicast);
        assert_eq!(from_agent(2, &of(1)), FromAgent::Unexpected);
        let gone = Msg::ClientGone {
            client_id: 9,
            node_id: 2,
        };
        assert_eq!(from_agent(2, &gone), FromAgent::Multicast);
        let want = Msg::WantServer {
            failed_incarnation: 3,
        };
        assert_eq!(from_agent(2, &want), FromAgent::Drop);
        assert_eq!(from_agent(2, &Msg::Status), FromAgent::Unexpected);
    }

    #[test]
    fn the_group_reaches_an_agent_only_with_what_is_for_it() {
        let mut b = [0u8; 256];
        let cl = list(&mut b, &[(9, 3)]);
        // Another node's gather is answered here; this node's own is not
        // asked back, and a request naming another starter than its sender
        // is forged.
        let need = |starter| Msg::NeedClients {
            gather_id: 4,
            starter,
        };
        assert!(forward_to_agent(1, 3, false, &need(3)));
        assert!(!forward_to_agent(1, 1, false, &need(1)));
        assert!(!forward_to_agent(1, 2, false, &need(3)));
        // Answers to this node's gather, from the node they name.
        let clients = |from, to| Msg::Clients {
            gather_id: 4,
            from,
            to,
            clients: cl,
        };
        assert!(forward_to_agent(1, 3, false, &clients(3, 1)));
        assert!(!forward_to_agent(1, 3, false, &clients(3, 2)));
        assert!(!forward_to_agent(1, 2, false, &clients(3, 1)));
        // A client's word, and a node's complete list, go to the server
        // here only.
        let gone = Msg::ClientGone {
            client_id: 9,
            node_id: 3,
        };
        assert!(forward_to_agent(1, 3, true, &gone));
        assert!(!forward_to_agent(1, 3, false, &gone));
        let of = |node_id| Msg::ClientsOf {
            node_id,
            clients: cl,
        };
        assert!(forward_to_agent(1, 3, true, &of(3)));
        assert!(!forward_to_agent(1, 3, false, &of(3)));
        assert!(
            !forward_to_agent(1, 2, true, &of(3)),
            "said for another node"
        );
        assert!(!forward_to_agent(1, 1, true, &of(1)), "its own, back");
        assert!(!forward_to_agent(1, 3, true, &Msg::Status));
    }
}
