//! The agent state machine against scripted frames: its socket (clients,
//! control tools, its standby and serving server) and its bus (the
//! membership backend). Frames are encoded with `csnap_proto::encode`, and
//! what `output(conn)` and `bus_output()` produce is decoded and checked.

use csnap_fsm::agent::{
    AddrBuf, AgentAction, AgentConfig, AgentConnId, AgentEvent, AgentFsm, BUS_OUT_BYTES,
    CONN_OUT_BYTES,
};
use csnap_proto::{
    self as proto, ClientEntry, ErrorCode, FenceReason, Header, Kind, Msg, Node, Role, Volume,
};

const ME: u32 = 1;
const HOLD_MS: u64 = 100;
const BACKOFF_MS: u64 = 500;
const SPAWN_TIMEOUT_MS: u64 = 10_000;

// -- frames -------------------------------------------------------------------

fn frame(rid: u64, msg: &Msg<'_>) -> Vec<u8> {
    let mut b = vec![0u8; proto::FRAME_MAX_BYTES];
    let n = proto::encode(&Header::new(rid, 0), msg, &mut b).unwrap();
    b.truncate(n);
    b
}

/// A decoded frame, owned, with the fields the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
enum M {
    HelloOk,
    Hello(Role),
    Error(ErrorCode),
    ServerAddress {
        incarnation: u64,
        node: u32,
        addr: String,
    },
    StartServer {
        members: Vec<u32>,
        expected: Vec<(u64, u32)>,
    },
    NodeJoined(u32),
    NodeLeft(u32),
    ClientGone(u64, u32),
    Join(u32, String),
    AgentState {
        standby: bool,
        serving: u64,
        died: u64,
        deaths: u16,
    },
    WantServer(u64),
    NeedClients(u64, u32),
    Clients {
        gather: u64,
        from: u32,
        to: u32,
        clients: Vec<(u64, u32)>,
    },
    ServerUp(u64, u32, String),
    ClientsOf(u32, Vec<(u64, u32)>),
    Other(Kind),
}

/// `AgentState` as the bus carries it.
fn agent_state(standby: bool, serving: u64, died: u64) -> M {
    agent_state_deaths(standby, serving, died, 0)
}

/// `AgentState` with its count of recent own-server deaths.
fn agent_state_deaths(standby: bool, serving: u64, died: u64, deaths: u16) -> M {
    M::AgentState {
        standby,
        serving,
        died,
        deaths,
    }
}

fn own(msg: &Msg<'_>) -> M {
    match *msg {
        Msg::HelloOk { .. } => M::HelloOk,
        Msg::Hello { role, .. } => M::Hello(role),
        Msg::Error { code, text, .. } => {
            assert!(!text.is_empty(), "an error without text");
            M::Error(code)
        }
        Msg::ServerAddress {
            incarnation,
            node_id,
            addr,
        } => M::ServerAddress {
            incarnation,
            node: node_id,
            addr: addr.to_string(),
        },
        Msg::StartServer {
            members, expected, ..
        } => M::StartServer {
            members: members.iter().map(|n| n.id).collect(),
            expected: sorted(expected.iter().map(|c| (c.client_id, c.node_id)).collect()),
        },
        Msg::NodeJoined { node_id } => M::NodeJoined(node_id),
        Msg::NodeLeft { node_id } => M::NodeLeft(node_id),
        Msg::ClientGone { client_id, node_id } => M::ClientGone(client_id, node_id),
        Msg::Join { node_id, addr } => M::Join(node_id, addr.to_string()),
        Msg::AgentState {
            node_id,
            standby_ready,
            recent_deaths,
            serving_incarnation,
            died_incarnation,
        } => {
            assert_eq!(node_id, ME, "AgentState names this node");
            agent_state_deaths(
                standby_ready,
                serving_incarnation,
                died_incarnation,
                recent_deaths,
            )
        }
        Msg::WantServer { failed_incarnation } => M::WantServer(failed_incarnation),
        Msg::NeedClients { gather_id, starter } => M::NeedClients(gather_id, starter),
        Msg::Clients {
            gather_id,
            from,
            to,
            clients,
        } => M::Clients {
            gather: gather_id,
            from,
            to,
            clients: sorted(clients.iter().map(|c| (c.client_id, c.node_id)).collect()),
        },
        Msg::ServerUp {
            incarnation,
            node_id,
            addr,
        } => M::ServerUp(incarnation, node_id, addr.to_string()),
        Msg::ClientsOf { node_id, clients } => M::ClientsOf(
            node_id,
            sorted(clients.iter().map(|c| (c.client_id, c.node_id)).collect()),
        ),
        ref m => M::Other(m.kind()),
    }
}

fn sorted(mut v: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
    v.sort_unstable();
    v
}

/// Cuts `bytes` into frames and decodes each: (request id, message).
fn decode_all(bytes: &[u8]) -> Vec<(u64, M)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let h = proto::peek_header(&bytes[at..]).unwrap().unwrap();
        let n = h.length as usize;
        let (hdr, msg) = proto::decode(&bytes[at..at + n]).unwrap();
        v.push((hdr.request_id, own(&msg)));
        at += n;
    }
    v
}

// -- the harness ----------------------------------------------------------------

struct T {
    a: AgentFsm,
    now: u64,
}

fn cfg() -> AgentConfig {
    AgentConfig {
        node_id: ME,
        agent_addr: AddrBuf::new("/run/csnap/node-1/agent.sock").unwrap(),
        conns: 8,
        suspect_hold_ms: HOLD_MS,
        respawn_backoff_ms: BACKOFF_MS,
        spawn_timeout_ms: SPAWN_TIMEOUT_MS,
        standby_after_start_ms: 0,
        relist_grace_ms: 0,
        death_window_ms: 0,
    }
}

fn members(epoch: u64, nodes: &[u32]) -> Vec<u8> {
    let entries: Vec<Node> = nodes.iter().map(|&id| Node { id }).collect();
    let mut b = vec![0u8; proto::NODE_LIST_BYTES_MAX];
    let l = proto::NodeList::from_entries(&entries, &mut b).unwrap();
    frame(0, &Msg::Members { epoch, members: l })
}

/// `f` of the client list of `cs` (client id, node).
fn with_client_list<R>(cs: &[(u64, u32)], f: impl FnOnce(proto::ClientList<'_>) -> R) -> R {
    let entries: Vec<ClientEntry> = cs
        .iter()
        .map(|&(client_id, node_id)| ClientEntry { client_id, node_id })
        .collect();
    let mut b = vec![0u8; proto::CLIENT_LIST_BYTES_MAX];
    f(proto::ClientList::from_entries(&entries, &mut b).unwrap())
}

fn clients_msg(gather: u64, from: u32, to: u32, cs: &[(u64, u32)]) -> Vec<u8> {
    with_client_list(cs, |l| {
        frame(
            0,
            &Msg::Clients {
                gather_id: gather,
                from,
                to,
                clients: l,
            },
        )
    })
}

fn server_addr(seq: u32) -> String {
    format!("/run/csnap/node-1/server.1.{seq}.sock")
}

impl T {
    /// A fresh agent, its bus up, member of {1, 2, 3}; the handshake on the
    /// bus is checked and consumed.
    fn new() -> T {
        T::with(cfg())
    }

    /// As `new`, with this configuration.
    fn with(cfg: AgentConfig) -> T {
        let mut t = T {
            a: AgentFsm::new(cfg),
            now: 0,
        };
        t.a.set_now(0);
        t.a.handle_bus_connected();
        assert_eq!(
            t.bus(),
            vec![
                M::Hello(Role::Agent),
                M::Join(ME, "/run/csnap/node-1/agent.sock".into()),
                agent_state(false, 0, 0),
            ]
        );
        t.bus_in(&members(1, &[1, 2, 3]));
        assert!(t.a.status().member);
        // The first tick asks for a standby.
        t.a.handle_tick();
        assert!(t.actions().contains(&AgentAction::SpawnStandby));
        t
    }

    fn at(&mut self, now: u64) {
        self.now = now;
        self.a.set_now(now);
        self.a.handle_tick();
    }

    fn bus_in(&mut self, f: &[u8]) {
        self.a.handle_bus_frame(f);
        self.a.assert_invariants();
    }

    fn send(&mut self, c: AgentConnId, rid: u64, msg: &Msg<'_>) {
        self.a.handle_frame(c, &frame(rid, msg));
    }

    /// Everything queued for `c`, consumed.
    fn out(&mut self, c: AgentConnId) -> Vec<(u64, M)> {
        let b = self.a.output(c).to_vec();
        self.a.consume_output(c, b.len());
        decode_all(&b)
    }

    /// Messages queued for `c`, request ids dropped.
    fn msgs(&mut self, c: AgentConnId) -> Vec<M> {
        self.out(c).into_iter().map(|x| x.1).collect()
    }

    /// Everything queued on the bus, consumed.
    fn bus(&mut self) -> Vec<M> {
        let b = self.a.bus_output().to_vec();
        self.a.consume_bus_output(b.len());
        decode_all(&b).into_iter().map(|x| x.1).collect()
    }

    fn actions(&mut self) -> Vec<AgentAction> {
        let mut v = Vec::new();
        while let Some(a) = self.a.poll_action() {
            v.push(a);
        }
        v
    }

    fn closes(&mut self) -> Vec<AgentConnId> {
        let mut v = Vec::new();
        while let Some(c) = self.a.poll_close() {
            v.push(c);
        }
        v
    }

    fn hello(&mut self, role: Role) -> AgentConnId {
        let c = self.a.handle_accept().unwrap();
        self.send(
            c,
            1,
            &Msg::Hello {
                version_min: 1,
                version_max: 1,
                role,
            },
        );
        assert_eq!(self.out(c), vec![(1, M::HelloOk)]);
        c
    }

    /// A volume client that has asked for a server once (request `rid`).
    fn need(&mut self, c: AgentConnId, rid: u64, id: u64, failed: u64, volume: Option<Volume>) {
        self.send(
            c,
            rid,
            &Msg::NeedServer {
                client_id: id,
                failed_incarnation: failed,
                node_id: if volume.is_some() { ME } else { 0 },
                volume,
            },
        );
    }

    /// The controller's `StartHere` (no claim) arrives on the bus.
    fn told_start(&mut self, attempt: u64, former: u64) {
        self.bus_in(&frame(
            0,
            &Msg::StartHere {
                attempt,
                former_incarnation: former,
                claim: false,
            },
        ));
    }

    /// A standby that announced itself; its `AgentState` is consumed.
    fn standby(&mut self, pid: u32) -> AgentConnId {
        let (c, b) = self.announce_standby(pid);
        assert!(
            matches!(
                b.as_slice(),
                [M::AgentState {
                    standby: true,
                    died: 0,
                    ..
                }]
            ),
            "{b:?}"
        );
        assert!(self.a.status().standby_ready);
        c
    }

    /// As `standby`, its `AgentState` carrying `deaths` recent deaths.
    fn standby_deaths(&mut self, pid: u32, deaths: u16) -> AgentConnId {
        let (c, b) = self.announce_standby(pid);
        assert_eq!(b, vec![agent_state_deaths(true, 0, 0, deaths)]);
        c
    }

    /// A standby connects and says `ServerReady`: its link and what the
    /// bus got.
    fn announce_standby(&mut self, pid: u32) -> (AgentConnId, Vec<M>) {
        let c = self.hello(Role::Server);
        let addr = server_addr(pid);
        self.send(
            c,
            2,
            &Msg::ServerReady {
                pid,
                node_id: ME,
                addr: &addr,
            },
        );
        assert!(self.out(c).is_empty(), "ServerReady gets no answer");
        (c, self.bus())
    }

    /// Starts standby `sb` as incarnation `inc` with members {1, 2, 3}, no
    /// snapshot clients anywhere; returns when it serves.
    fn serve(&mut self, sb: AgentConnId, attempt: u64, inc: u64) {
        self.bus_in(&frame(
            0,
            &Msg::StartHere {
                attempt,
                former_incarnation: inc - 1,
                claim: false,
            },
        ));
        assert_eq!(self.bus(), vec![M::NeedClients(attempt, ME)]);
        self.bus_in(&clients_msg(attempt, 2, ME, &[]));
        self.bus_in(&clients_msg(attempt, 3, ME, &[]));
        let m = self.msgs(sb);
        assert!(
            matches!(m.as_slice(), [M::StartServer { .. }]),
            "StartServer expected, got {m:?}"
        );
        self.send(
            sb,
            0,
            &Msg::Serving {
                incarnation: inc,
                start_micros: 700,
                replayed_commits: 0,
            },
        );
        assert_eq!(self.a.status().serving_incarnation, inc);
    }
}

fn need_msg(id: u64, failed: u64, node: u32, volume: Option<Volume>) -> Msg<'static> {
    Msg::NeedServer {
        client_id: id,
        failed_incarnation: failed,
        node_id: node,
        volume,
    }
}

fn server_up(inc: u64, node: u32, addr: &str) -> Vec<u8> {
    frame(
        0,
        &Msg::ServerUp {
            incarnation: inc,
            node_id: node,
            addr,
        },
    )
}

fn addr_of(inc: u64, node: u32, addr: &str) -> M {
    M::ServerAddress {
        incarnation: inc,
        node,
        addr: addr.into(),
    }
}

// -- the agent's socket -----------------------------------------------------------

#[test]
fn hello_per_role() {
    let mut t = T::new();
    // Clients, control tools and servers are welcome.
    for role in [Role::Client, Role::Control, Role::Server] {
        t.hello(role);
    }
    assert!(t.closes().is_empty());
    // An agent is not: it talks through the bus.
    let c = t.a.handle_accept().unwrap();
    t.send(
        c,
        5,
        &Msg::Hello {
            version_min: 1,
            version_max: 1,
            role: Role::Agent,
        },
    );
    assert_eq!(t.out(c), vec![(5, M::Error(ErrorCode::Unsupported))]);
    assert_eq!(t.closes(), vec![c]);
    assert!(!t.a.wants_read(c));
    t.a.handle_disconnect(c);
    // No common version: refused and closed.
    let v = t.a.handle_accept().unwrap();
    t.send(
        v,
        6,
        &Msg::Hello {
            version_min: 2,
            version_max: 4,
            role: Role::Client,
        },
    );
    assert_eq!(t.out(v), vec![(6, M::Error(ErrorCode::BadVersion))]);
    assert_eq!(t.closes(), vec![v]);
    t.a.handle_disconnect(v);
    // Anything before Hello, and a second Hello, are refused; the
    // connection goes on.
    let c = t.a.handle_accept().unwrap();
    t.send(c, 7, &need_msg(3, 0, ME, Some(Volume::Origin)));
    assert_eq!(t.out(c), vec![(7, M::Error(ErrorCode::NotIdentified))]);
    t.send(
        c,
        8,
        &Msg::Hello {
            version_min: 1,
            version_max: 1,
            role: Role::Client,
        },
    );
    assert_eq!(t.out(c), vec![(8, M::HelloOk)]);
    t.send(
        c,
        9,
        &Msg::Hello {
            version_min: 1,
            version_max: 1,
            role: Role::Client,
        },
    );
    assert_eq!(t.out(c), vec![(9, M::Error(ErrorCode::AlreadyIdentified))]);
    // A client may not announce itself as a standby.
    t.send(
        c,
        10,
        &Msg::ServerReady {
            pid: 1,
            node_id: ME,
            addr: "x",
        },
    );
    assert_eq!(t.out(c), vec![(10, M::Error(ErrorCode::Unsupported))]);
    assert!(t.closes().is_empty());
    assert!(t.bus().is_empty(), "nothing of it reaches the bus");
}

#[test]
fn need_server_is_answered_at_once_when_a_newer_server_is_known() {
    let mut t = T::new();
    t.bus_in(&server_up(3, 2, "10.0.0.2:7000"));
    let c = t.hello(Role::Client);
    t.need(c, 11, 40, 0, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(11, addr_of(3, 2, "10.0.0.2:7000"))]);
    // Failed incarnation 2: 3 is newer, answered at once too.
    t.need(c, 12, 40, 2, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(12, addr_of(3, 2, "10.0.0.2:7000"))]);
    // A control tool (no volume, node 0) too.
    let tool = t.hello(Role::Control);
    t.need(tool, 13, 0, 0, None);
    assert_eq!(t.out(tool), vec![(13, addr_of(3, 2, "10.0.0.2:7000"))]);
    assert!(t.bus().is_empty(), "no WantServer when a server is known");
    assert_eq!(t.a.status().waiting_clients, 0);
}

#[test]
fn need_server_is_held_until_a_server_is_up() {
    let mut t = T::new();
    let c = t.hello(Role::Client);
    t.need(c, 21, 40, 0, Some(Volume::Snapshot(4)));
    assert!(t.out(c).is_empty(), "held: no server is known");
    assert_eq!(t.bus(), vec![M::WantServer(0)]);
    assert_eq!(t.a.status().waiting_clients, 1);
    assert_eq!(t.a.status().snapshot_clients, 1);
    // A second waiting client does not ask the controller again.
    let d = t.hello(Role::Client);
    t.need(d, 22, 41, 0, Some(Volume::Origin));
    assert!(t.bus().is_empty());
    // Time alone does not answer them.
    t.at(10 * HOLD_MS);
    assert!(t.out(c).is_empty() && t.out(d).is_empty());
    t.bus_in(&server_up(1, 3, "node3.sock"));
    assert_eq!(t.out(c), vec![(21, addr_of(1, 3, "node3.sock"))]);
    assert_eq!(t.out(d), vec![(22, addr_of(1, 3, "node3.sock"))]);
    assert_eq!(t.a.status().waiting_clients, 0);
    assert_eq!(t.a.status().cluster_server, Some((1, 3)));
}

#[test]
fn a_need_server_naming_the_known_incarnation_is_held_then_answered_the_same() {
    let mut t = T::new();
    t.bus_in(&server_up(3, 2, "n2.sock"));
    let c = t.hello(Role::Client);
    t.at(1000);
    // The client says incarnation 3 failed it; the agent still believes
    // in 3: it holds the request for the suspect hold, asks for a server.
    t.need(c, 31, 40, 3, Some(Volume::Origin));
    assert!(t.out(c).is_empty());
    assert_eq!(t.bus(), vec![M::WantServer(3)]);
    assert_eq!(t.a.next_deadline_ms(), Some(1000 + HOLD_MS));
    t.at(1000 + HOLD_MS - 1);
    assert!(t.out(c).is_empty(), "still held");
    // The hold ends with no news: the same address again.
    t.at(1000 + HOLD_MS);
    assert_eq!(t.out(c), vec![(31, addr_of(3, 2, "n2.sock"))]);
    assert_eq!(
        t.a.next_deadline_ms(),
        Some(SPAWN_TIMEOUT_MS),
        "only the standby's spawn deadline is left"
    );

    // Within a hold, a newer server answers at once.
    t.at(2000);
    t.need(c, 32, 40, 3, Some(Volume::Origin));
    assert!(t.out(c).is_empty());
    t.bus_in(&server_up(4, 3, "n3.sock"));
    assert_eq!(t.out(c), vec![(32, addr_of(4, 3, "n3.sock"))]);
}

#[test]
fn one_need_server_at_a_time_per_connection() {
    let mut t = T::new();
    let c = t.hello(Role::Client);
    t.need(c, 41, 40, 0, Some(Volume::Origin));
    t.need(c, 42, 40, 0, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(42, M::Error(ErrorCode::Busy))]);
    t.bus_in(&server_up(1, 2, "n2.sock"));
    assert_eq!(
        t.out(c),
        vec![(41, addr_of(1, 2, "n2.sock"))],
        "only the first request is answered"
    );
    // Once answered, the next one is accepted.
    t.need(c, 43, 40, 0, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(43, addr_of(1, 2, "n2.sock"))]);
}

#[test]
fn a_client_of_another_node_is_refused() {
    let mut t = T::new();
    t.bus_in(&server_up(1, 2, "n2.sock"));
    let c = t.hello(Role::Client);
    t.send(c, 51, &need_msg(40, 0, 2, Some(Volume::Origin)));
    assert_eq!(t.out(c), vec![(51, M::Error(ErrorCode::GeometryMismatch))]);
    assert!(t.closes().is_empty(), "the connection stays usable");
    assert_eq!(t.a.status().waiting_clients, 0);
    t.send(c, 52, &need_msg(40, 0, ME, Some(Volume::Origin)));
    assert_eq!(t.out(c), vec![(52, addr_of(1, 2, "n2.sock"))]);
}

#[test]
fn a_standby_announces_itself_and_a_second_one_is_refused() {
    let mut t = T::new();
    let sb = t.standby(100);
    let actions = t.actions();
    assert!(actions.contains(&AgentAction::Log(AgentEvent::StandbyReady { pid: 100 })));
    assert_eq!(t.a.next_deadline_ms(), None, "no respawn pending");
    // A second standby is sent away.
    let sb2 = t.hello(Role::Server);
    t.send(
        sb2,
        3,
        &Msg::ServerReady {
            pid: 101,
            node_id: ME,
            addr: "other.sock",
        },
    );
    assert_eq!(t.out(sb2), vec![(3, M::Error(ErrorCode::Busy))]);
    assert_eq!(t.closes(), vec![sb2]);
    t.a.handle_disconnect(sb2);
    assert!(t.bus().is_empty(), "the first standby is still the one");
    assert!(t.a.status().standby_ready);
    // A standby started for another node is refused.
    let wrong = t.hello(Role::Server);
    t.send(
        wrong,
        4,
        &Msg::ServerReady {
            pid: 102,
            node_id: 2,
            addr: "x.sock",
        },
    );
    assert_eq!(
        t.out(wrong),
        vec![(4, M::Error(ErrorCode::GeometryMismatch))]
    );
    assert_eq!(t.closes(), vec![wrong]);
    // The standby goes away before a start: reported, respawned after the
    // backoff.
    t.at(50);
    t.a.handle_disconnect(sb);
    assert_eq!(t.bus(), vec![agent_state(false, 0, 0)]);
    assert!(t
        .actions()
        .contains(&AgentAction::Log(AgentEvent::StandbyLost { pid: 100 })));
    t.at(50 + BACKOFF_MS - 1);
    assert!(!t.actions().contains(&AgentAction::SpawnStandby));
    t.at(50 + BACKOFF_MS);
    assert!(t.actions().contains(&AgentAction::SpawnStandby));
}

#[test]
fn a_spawned_standby_that_never_announces_itself_is_spawned_again() {
    let mut t = T::new();
    // T::new saw the first SpawnStandby at time 0.
    t.at(SPAWN_TIMEOUT_MS - 1);
    assert!(t.actions().is_empty());
    t.at(SPAWN_TIMEOUT_MS);
    assert_eq!(t.actions(), vec![AgentAction::SpawnStandby]);
    t.standby(7);
    t.actions();
    t.at(3 * SPAWN_TIMEOUT_MS);
    assert!(t.actions().is_empty(), "a standby is there: no more spawns");
}

#[test]
fn start_here_without_a_standby_says_so() {
    let mut t = T::new();
    t.told_start(1, 0);
    assert_eq!(t.bus(), vec![agent_state(false, 0, 0)]);
}

/// A local snapshot client (11), a local origin client (12), a control tool,
/// a standby: the agent is told to start.
fn gathering() -> (T, AgentConnId, AgentConnId) {
    let mut t = T::new();
    let snap = t.hello(Role::Client);
    t.need(snap, 1, 11, 0, Some(Volume::Snapshot(5)));
    let origin = t.hello(Role::Client);
    t.need(origin, 1, 12, 0, Some(Volume::Origin));
    let tool = t.hello(Role::Control);
    t.need(tool, 1, 0, 0, None);
    assert_eq!(t.bus(), vec![M::WantServer(0)]);
    let sb = t.standby(200);
    t.told_start(9, 4);
    assert_eq!(t.bus(), vec![M::NeedClients(9, ME)]);
    assert!(
        !t.a.status().standby_ready,
        "a gathering standby is not free"
    );
    assert!(t
        .actions()
        .contains(&AgentAction::Log(AgentEvent::Gathering {
            attempt: 9,
            waiting: 2
        })));
    (t, sb, snap)
}

#[test]
fn start_here_gathers_every_members_clients_then_starts_the_standby() {
    let (mut t, sb, _) = gathering();
    // Node 2 answers with two snapshot clients.
    t.bus_in(&clients_msg(9, 2, ME, &[(21, 2), (22, 2)]));
    assert!(t.out(sb).is_empty(), "node 3 has not answered");
    // The same answer again, an answer for another gather and one meant for
    // another node: ignored.
    t.bus_in(&clients_msg(9, 2, ME, &[(23, 2)]));
    t.bus_in(&clients_msg(8, 3, ME, &[(31, 3)]));
    t.bus_in(&clients_msg(9, 3, 2, &[(32, 3)]));
    assert!(t.out(sb).is_empty(), "still waiting for node 3");
    // Node 3 answers (naming client 21 again, which is counted once).
    t.bus_in(&clients_msg(9, 3, ME, &[(33, 3), (21, 2)]));
    assert_eq!(
        t.msgs(sb),
        vec![M::StartServer {
            members: vec![1, 2, 3],
            expected: vec![(11, ME), (12, ME), (21, 2), (22, 2), (33, 3)],
        }],
        "every member's clients, local and remote: snapshot clients upload their locks, caching origin clients may hold acknowledged writes"
    );
    assert!(t
        .actions()
        .contains(&AgentAction::Log(AgentEvent::Starting {
            attempt: 9,
            expected: 5
        })));
    // A late duplicate after the start changes nothing.
    t.bus_in(&clients_msg(9, 3, ME, &[(34, 3)]));
    assert!(t.out(sb).is_empty());
}

#[test]
fn a_member_that_leaves_during_the_gather_is_not_waited_for() {
    let (mut t, sb, _) = gathering();
    t.bus_in(&clients_msg(9, 2, ME, &[(21, 2)]));
    assert!(t.out(sb).is_empty());
    // Node 3 leaves before answering.
    t.bus_in(&members(2, &[1, 2]));
    assert_eq!(
        t.msgs(sb),
        vec![M::StartServer {
            members: vec![1, 2],
            expected: vec![(11, ME), (12, ME), (21, 2)],
        }]
    );
    // An older membership view is ignored.
    t.bus_in(&members(1, &[1, 2, 3]));
    assert!(t.out(sb).is_empty());
}

#[test]
fn a_single_node_cluster_starts_at_once() {
    let mut t = T::new();
    t.bus_in(&members(2, &[ME]));
    let sb = t.standby(1);
    t.told_start(1, 0);
    assert_eq!(t.bus(), vec![M::NeedClients(1, ME)]);
    assert_eq!(
        t.msgs(sb),
        vec![M::StartServer {
            members: vec![ME],
            expected: vec![],
        }]
    );
}

#[test]
fn the_node_asked_for_its_clients_answers_with_every_client_it_registered() {
    let mut t = T::new();
    let s = t.hello(Role::Client);
    t.need(s, 1, 15, 0, Some(Volume::Snapshot(2)));
    let o = t.hello(Role::Client);
    t.need(o, 1, 16, 0, Some(Volume::Origin));
    t.bus();
    t.bus_in(&frame(
        0,
        &Msg::NeedClients {
            gather_id: 4,
            starter: 3,
        },
    ));
    assert_eq!(
        t.bus(),
        vec![M::Clients {
            gather: 4,
            from: ME,
            to: 3,
            clients: vec![(15, ME), (16, ME)],
        }]
    );
    // Its own gather's request (relayed back) is not answered.
    t.bus_in(&frame(
        0,
        &Msg::NeedClients {
            gather_id: 5,
            starter: ME,
        },
    ));
    assert!(t.bus().is_empty());
}

#[test]
fn serving_announces_the_server_answers_waiting_clients_and_spawns_a_standby() {
    let (mut t, sb, snap) = gathering();
    t.bus_in(&clients_msg(9, 2, ME, &[]));
    t.bus_in(&clients_msg(9, 3, ME, &[]));
    assert_eq!(t.msgs(sb).len(), 1);
    t.actions();
    t.at(77);
    t.send(
        sb,
        0,
        &Msg::Serving {
            incarnation: 5,
            start_micros: 812,
            replayed_commits: 3,
        },
    );
    let addr = server_addr(200);
    assert_eq!(
        t.bus(),
        vec![M::ServerUp(5, ME, addr.clone()), agent_state(false, 5, 0),]
    );
    assert_eq!(t.out(snap), vec![(1, addr_of(5, ME, &addr))]);
    assert_eq!(t.a.status().waiting_clients, 0);
    assert_eq!(t.a.status().cluster_server, Some((5, ME)));
    assert!(t.actions().contains(&AgentAction::Log(AgentEvent::Serving {
        incarnation: 5,
        start_micros: 812
    })));
    t.at(78);
    assert_eq!(t.actions(), vec![AgentAction::SpawnStandby]);
    // A new client is answered at once; a repeated StartHere is answered
    // with ServerUp again.
    let c = t.hello(Role::Client);
    t.need(c, 3, 50, 0, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(3, addr_of(5, ME, &addr))]);
    t.told_start(10, 5);
    assert_eq!(t.bus(), vec![M::ServerUp(5, ME, addr)]);
}

/// A fresh agent whose started server (incarnation 6) served and then
/// died; the death's `AgentState` is checked and consumed.
fn served_then_died() -> T {
    let mut t = T::new();
    let sb = t.standby(300);
    t.serve(sb, 1, 6);
    t.bus();
    t.actions();
    t.a.handle_disconnect(sb);
    assert_eq!(t.bus(), vec![agent_state(false, 0, 6)]);
    t
}

#[test]
fn the_serving_servers_link_closing_reports_it_died() {
    let mut t = served_then_died();
    assert!(t
        .actions()
        .contains(&AgentAction::Log(AgentEvent::ServerDied { incarnation: 6 })));
    assert_eq!(t.a.status().cluster_server, None, "its address is dead");
    // A client failed by 6 waits for a new one (no hold: 6 is known dead).
    let c = t.hello(Role::Client);
    t.need(c, 4, 60, 6, Some(Volume::Origin));
    assert!(t.out(c).is_empty());
    assert_eq!(t.bus(), vec![M::WantServer(6)]);
    t.bus_in(&server_up(7, 2, "n2.sock"));
    assert_eq!(t.out(c), vec![(4, addr_of(7, 2, "n2.sock"))]);
}

#[test]
fn a_start_that_fails_is_reported_and_a_standby_respawned() {
    let mut t = T::new();
    let sb = t.standby(400);
    t.at(1000);
    t.told_start(3, 0);
    t.bus_in(&clients_msg(3, 2, ME, &[]));
    t.bus_in(&clients_msg(3, 3, ME, &[]));
    assert_eq!(t.msgs(sb).len(), 1);
    t.bus();
    t.actions();
    // The standby reports why, then closes.
    t.send(
        sb,
        0,
        &Msg::Error {
            code: ErrorCode::Internal,
            culprit: 0,
            text: "journal unreadable",
        },
    );
    assert!(t.out(sb).is_empty(), "a server's error is not answered");
    t.a.handle_disconnect(sb);
    assert_eq!(t.bus(), vec![agent_state(false, 0, 0)]);
    assert!(t
        .actions()
        .contains(&AgentAction::Log(AgentEvent::StartFailed { attempt: 3 })));
    t.at(1000 + BACKOFF_MS);
    assert_eq!(t.actions(), vec![AgentAction::SpawnStandby]);
}

#[test]
fn membership_changes_are_pushed_to_the_serving_server() {
    let mut t = T::new();
    let sb = t.standby(500);
    t.serve(sb, 1, 2);
    assert!(t.out(sb).is_empty(), "it was told the members at its start");
    t.bus_in(&members(2, &[1, 2]));
    assert_eq!(t.msgs(sb), vec![M::NodeLeft(3)]);
    t.bus_in(&members(3, &[1, 2, 3, 4]));
    let mut m = t.msgs(sb);
    m.sort_by_key(|x| format!("{x:?}"));
    assert_eq!(m, vec![M::NodeJoined(3), M::NodeJoined(4)]);
    // The same view again: nothing new.
    t.bus_in(&members(4, &[1, 2, 3, 4]));
    assert!(t.out(sb).is_empty());
}

#[test]
fn membership_changes_during_a_start_reach_the_new_server() {
    let mut t = T::new();
    let sb = t.standby(510);
    t.told_start(1, 0);
    t.bus_in(&clients_msg(1, 2, ME, &[(21, 2)]));
    t.bus_in(&clients_msg(1, 3, ME, &[(31, 3)]));
    assert_eq!(
        t.msgs(sb),
        vec![M::StartServer {
            members: vec![1, 2, 3],
            expected: vec![(21, 2), (31, 3)],
        }]
    );
    // Node 3 leaves and node 4 joins while the standby replays.
    t.bus_in(&members(2, &[1, 2, 4]));
    t.send(
        sb,
        0,
        &Msg::Serving {
            incarnation: 1,
            start_micros: 1,
            replayed_commits: 0,
        },
    );
    // The server was told {1, 2, 3}: it must learn that 3 left (its
    // recovery barrier waits for client 31 until then) and that 4 joined.
    let mut m = t.msgs(sb);
    m.sort_by_key(|x| format!("{x:?}"));
    assert_eq!(m, vec![M::NodeJoined(4), M::NodeLeft(3)]);
}

#[test]
fn fenced_left_cluster_stops_the_server_and_refuses_clients_until_a_member_again() {
    let mut t = T::new();
    let sb = t.standby(600);
    t.serve(sb, 1, 3);
    t.at(1);
    assert_eq!(t.actions().last(), Some(&AgentAction::SpawnStandby));
    t.bus();
    let sb2 = t.standby(601);
    t.bus();
    // A client waiting out a suspect hold.
    let c = t.hello(Role::Client);
    t.need(c, 7, 70, 3, Some(Volume::Origin));
    assert!(t.out(c).is_empty());
    t.bus();
    t.closes();
    t.bus_in(&frame(
        0,
        &Msg::Fence {
            reason: FenceReason::LeftCluster,
        },
    ));
    assert_eq!(t.closes(), vec![sb], "the serving server's link is closed");
    assert_eq!(
        t.bus(),
        vec![agent_state(true, 0, 3), agent_state(false, 0, 0),]
    );
    t.a.handle_disconnect(sb);
    assert!(t.bus().is_empty(), "the death was reported once");
    assert_eq!(t.out(c), vec![(7, M::Error(ErrorCode::Unsupported))]);
    assert!(t.actions().contains(&AgentAction::Log(AgentEvent::Fenced {
        reason: FenceReason::LeftCluster
    })));
    assert!(!t.a.status().member);
    // Later requests are refused, even with a server known elsewhere.
    t.bus_in(&server_up(4, 2, "n2.sock"));
    t.need(c, 8, 70, 0, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(8, M::Error(ErrorCode::Unsupported))]);
    // A start is refused while fenced.
    t.told_start(2, 4);
    assert_eq!(t.bus(), vec![agent_state(false, 0, 0)]);
    assert!(t.out(sb2).is_empty());
    // A member again: clients are served, and the controller learns that
    // its standby can be started again.
    t.bus_in(&members(5, &[1, 2, 3]));
    assert!(t.a.status().member);
    t.need(c, 9, 70, 0, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(9, addr_of(4, 2, "n2.sock"))]);
    assert_eq!(
        t.bus(),
        vec![agent_state(true, 0, 0)],
        "a rejoined node reports its standby ready again"
    );
}

#[test]
fn fenced_server_moved_stops_the_server_only() {
    let mut t = T::new();
    let sb = t.standby(700);
    t.serve(sb, 1, 3);
    t.bus();
    t.closes();
    t.bus_in(&frame(
        0,
        &Msg::Fence {
            reason: FenceReason::ServerMoved,
        },
    ));
    assert_eq!(t.closes(), vec![sb]);
    let b = t.bus();
    assert!(b.contains(&agent_state(false, 0, 3)));
    assert!(t.a.status().member, "still a member");
    t.bus_in(&server_up(4, 2, "n2.sock"));
    let c = t.hello(Role::Client);
    t.need(c, 1, 80, 3, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(1, addr_of(4, 2, "n2.sock"))]);
}

#[test]
fn a_newer_incarnation_elsewhere_stops_the_local_older_server() {
    let mut t = T::new();
    let sb = t.standby(800);
    t.serve(sb, 1, 5);
    t.bus();
    t.closes();
    t.actions();
    // An older one elsewhere changes nothing.
    t.bus_in(&server_up(4, 2, "n2.sock"));
    assert!(t.closes().is_empty());
    assert_eq!(t.a.status().cluster_server, Some((5, ME)));
    t.bus_in(&server_up(6, 3, "n3.sock"));
    assert_eq!(t.closes(), vec![sb]);
    assert_eq!(t.bus(), vec![agent_state(false, 0, 5)]);
    assert!(t
        .actions()
        .contains(&AgentAction::Log(AgentEvent::StaleServerStopped {
            incarnation: 5
        })));
    assert_eq!(t.a.status().serving_incarnation, 0);
    assert_eq!(t.a.status().cluster_server, Some((6, 3)));
}

#[test]
fn client_gone_goes_to_the_bus_and_from_the_bus_to_the_serving_server() {
    let mut t = T::new();
    let snap = t.hello(Role::Client);
    t.need(snap, 1, 90, 0, Some(Volume::Snapshot(1)));
    let origin = t.hello(Role::Client);
    t.need(origin, 1, 91, 0, Some(Volume::Origin));
    let tool = t.hello(Role::Control);
    t.need(tool, 1, 0, 0, None);
    let silent = t.hello(Role::Client);
    t.bus();
    // A registered client's link closing is a client gone.
    t.a.handle_disconnect(snap);
    assert_eq!(t.bus(), vec![M::ClientGone(90, ME)]);
    t.a.handle_disconnect(origin);
    assert_eq!(t.bus(), vec![M::ClientGone(91, ME)]);
    // A tool, or a client that never said who it is: nothing.
    t.a.handle_disconnect(tool);
    t.a.handle_disconnect(silent);
    assert!(t.bus().is_empty());
    // From the bus, to the serving server.
    let sb = t.standby(900);
    t.serve(sb, 1, 1);
    t.bus_in(&frame(
        0,
        &Msg::ClientGone {
            client_id: 55,
            node_id: 2,
        },
    ));
    assert_eq!(t.msgs(sb), vec![M::ClientGone(55, 2)]);
}

#[test]
fn a_client_gone_during_a_start_reaches_the_new_server() {
    let mut t = T::new();
    let sb = t.standby(910);
    t.told_start(1, 1);
    t.bus_in(&clients_msg(1, 2, ME, &[(21, 2), (22, 2)]));
    // Client 21 goes away while node 3 has not answered: it is not waited
    // for any more.
    t.bus_in(&frame(
        0,
        &Msg::ClientGone {
            client_id: 21,
            node_id: 2,
        },
    ));
    t.bus_in(&clients_msg(1, 3, ME, &[]));
    assert_eq!(
        t.msgs(sb),
        vec![M::StartServer {
            members: vec![1, 2, 3],
            expected: vec![(22, 2)],
        }]
    );
    // Client 22 goes away while the standby starts: the server learns it.
    t.bus_in(&frame(
        0,
        &Msg::ClientGone {
            client_id: 22,
            node_id: 2,
        },
    ));
    t.send(
        sb,
        0,
        &Msg::Serving {
            incarnation: 2,
            start_micros: 1,
            replayed_commits: 0,
        },
    );
    assert_eq!(t.msgs(sb), vec![M::ClientGone(22, 2)]);
}

#[test]
fn a_bus_reconnect_resends_join_and_state() {
    let mut t = T::new();
    let sb = t.standby(1000);
    t.serve(sb, 1, 8);
    t.bus();
    t.a.handle_bus_disconnected();
    assert!(t.a.bus_stalled());
    // Nothing is queued for a bus that is down.
    let c = t.hello(Role::Client);
    t.need(c, 1, 95, 8, Some(Volume::Origin));
    assert!(t.a.bus_output().is_empty());
    t.a.handle_bus_connected();
    assert!(!t.a.bus_stalled());
    assert_eq!(
        t.bus(),
        vec![
            M::Hello(Role::Agent),
            M::Join(ME, "/run/csnap/node-1/agent.sock".into()),
            agent_state(false, 8, 0),
            M::ServerUp(8, ME, server_addr(1000)),
            M::WantServer(8),
        ]
    );
}

#[test]
fn malformed_frames_get_an_error_and_the_agent_goes_on() {
    let mut t = T::new();
    t.bus_in(&server_up(2, 2, "n2.sock"));
    let c = t.hello(Role::Client);
    // A NeedServer with a nonzero reserved byte: not fatal.
    let mut f = frame(33, &need_msg(1, 0, ME, Some(Volume::Origin)));
    let last = f.len() - 1;
    f[last] = 0xff;
    t.a.handle_frame(c, &f);
    let out = t.out(c);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 33, "the error names the request");
    assert!(matches!(out[0].1, M::Error(_)));
    assert!(t.closes().is_empty());
    // An unknown kind: not fatal either.
    let mut f = frame(34, &Msg::Ok);
    f[6] = 0x77;
    f[7] = 0x3f;
    t.a.handle_frame(c, &f);
    assert_eq!(t.out(c).len(), 1);
    // The connection still works.
    t.need(c, 35, 1, 0, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(35, addr_of(2, 2, "n2.sock"))]);
    // A stream that cannot be cut into frames: error and close.
    let g = t.hello(Role::Client);
    t.a.handle_bad_stream(g, &proto::DecodeError::BadMagic);
    assert_eq!(t.msgs(g), vec![M::Error(ErrorCode::BadMagic)]);
    assert_eq!(t.closes(), vec![g]);
    t.a.handle_frame(g, &frame(1, &need_msg(1, 0, ME, Some(Volume::Origin))));
    assert!(t.out(g).is_empty(), "a closing connection is not read");
    t.a.handle_disconnect(g);
    // Garbage on the bus is logged and ignored.
    t.a.handle_bus_frame(b"not a frame at all, not even close");
    t.bus_in(&f);
    t.bus_in(&frame(0, &Msg::Status));
    let logged = t
        .actions()
        .iter()
        .filter(|a| matches!(a, AgentAction::Log(AgentEvent::BusError { .. })))
        .count();
    assert_eq!(logged, 3);
    assert!(t.bus().is_empty());
    t.need(c, 36, 1, 0, Some(Volume::Origin));
    assert_eq!(t.out(c), vec![(36, addr_of(2, 2, "n2.sock"))]);
}

#[test]
fn a_peer_that_never_reads_is_closed_not_buffered_without_bound() {
    let mut t = T::new();
    let addr = "x".repeat(proto::ADDR_MAX_BYTES);
    t.bus_in(&server_up(2, 2, &addr));
    let c = t.hello(Role::Client);
    let mut rid = 1;
    let mut stopped_reading_at = None;
    while !t.closes().contains(&c) {
        assert!(rid < 10_000, "never closed");
        if !t.a.wants_read(c) && stopped_reading_at.is_none() {
            stopped_reading_at = Some(t.a.output(c).len());
        }
        // A hostile peer sends on even when the driver would stop reading.
        t.need(c, rid, 1, 0, Some(Volume::Origin));
        assert!(t.a.output(c).len() <= CONN_OUT_BYTES);
        rid += 1;
    }
    let paused = stopped_reading_at.expect("the driver is told to stop reading first");
    assert!(paused <= CONN_OUT_BYTES);
    assert!(!t.a.wants_read(c));
    t.a.handle_disconnect(c);
    // The bus: a backend that never reads stalls the bus (the driver
    // re-makes the link); its output never grows past its buffer.
    let tool = t.hello(Role::Client);
    let mut n = 0;
    while !t.a.bus_stalled() {
        assert!(n < 100_000, "the bus never stalled");
        t.bus_in(&frame(
            0,
            &Msg::NeedClients {
                gather_id: n + 1,
                starter: 2,
            },
        ));
        assert!(t.a.bus_output().len() <= BUS_OUT_BYTES);
        n += 1;
    }
    assert!(t.a.bus_output().is_empty(), "a stalled bus drops its queue");
    // The agent goes on serving its clients.
    t.need(tool, 1, 2, 0, Some(Volume::Origin));
    assert_eq!(t.out(tool), vec![(1, addr_of(2, 2, &addr))]);
}

/// A connection the agent closes (a fatal frame) whose peer hangs up before
/// the driver polls the close, and whose slot a new connection takes at
/// once: the pending close is not the new connection's.
#[test]
fn a_close_queued_for_a_gone_connection_does_not_close_its_successor() {
    let mut t = T::new();
    let c = t.a.handle_accept().unwrap();
    t.a.handle_frame(
        c,
        b"this is not a csnap frame at all, and it is long enough",
    );
    t.a.handle_disconnect(c);
    let d = t.hello(Role::Control);
    assert_eq!(c, d, "the slot is reused");
    assert!(t.closes().is_empty(), "the new connection is not closed");
    assert!(t.a.wants_read(d));
}

/// The controller's `claim` (the former server may still run) reaches the
/// standby's `StartServer` unchanged, and a start without it does not
/// claim.
#[test]
fn the_start_passes_the_claim_flag_to_the_standby() {
    for claim in [true, false] {
        let mut t = T::new();
        let sb = t.standby(77);
        t.bus_in(&frame(
            0,
            &Msg::StartHere {
                attempt: 1,
                former_incarnation: 4,
                claim,
            },
        ));
        assert_eq!(t.bus(), vec![M::NeedClients(1, ME)]);
        t.bus_in(&clients_msg(1, 2, ME, &[]));
        t.bus_in(&clients_msg(1, 3, ME, &[]));
        let b = t.a.output(sb).to_vec();
        t.a.consume_output(sb, b.len());
        let (_, m) = csnap_proto::decode(&b).expect("one StartServer");
        let Msg::StartServer { claim: got, .. } = m else {
            panic!("StartServer expected, got {:?}", m.kind());
        };
        assert_eq!(got, claim);
    }
}

// -- bus breaks and lost words (#15, found by cluster_sim's link cuts) --------

#[test]
fn a_node_that_joins_during_the_gather_is_asked_and_waited_for() {
    let (mut t, sb, _) = gathering();
    // Node 3 drops out (its bus broke) before node 2 answered.
    t.bus_in(&members(2, &[1, 2]));
    assert!(t.bus().is_empty());
    // Node 3 comes back while node 2 has not answered: it is asked again
    // and waited for (its clients may hold read locks).
    t.bus_in(&members(3, &[1, 2, 3]));
    assert_eq!(t.bus(), vec![M::NeedClients(9, ME)]);
    t.bus_in(&clients_msg(9, 2, ME, &[(21, 2)]));
    assert!(t.out(sb).is_empty(), "node 3 not answered yet");
    t.bus_in(&clients_msg(9, 3, ME, &[(31, 3)]));
    assert_eq!(
        t.msgs(sb),
        vec![M::StartServer {
            members: vec![1, 2, 3],
            expected: vec![(11, ME), (12, ME), (21, 2), (31, 3)],
        }]
    );
}

#[test]
fn a_bus_break_abandons_the_gather() {
    let (mut t, sb, _) = gathering();
    t.a.handle_bus_disconnected();
    assert!(t
        .actions()
        .contains(&AgentAction::Log(AgentEvent::StartFailed { attempt: 9 })));
    // Answers to the old gather start nothing.
    t.a.handle_bus_connected();
    t.bus();
    t.bus_in(&members(1, &[1, 2, 3]));
    t.bus_in(&clients_msg(9, 2, ME, &[(21, 2)]));
    t.bus_in(&clients_msg(9, 3, ME, &[(31, 3)]));
    assert!(t.out(sb).is_empty(), "a stale gather started the standby");
    assert!(t.a.status().standby_ready, "the standby is free again");
}

#[test]
fn a_local_client_gone_reaches_the_own_server_with_the_bus_down_and_is_said_again_later() {
    let mut t = T::new();
    let sb = t.standby(200);
    t.serve(sb, 9, 4);
    t.bus();
    let snap = t.hello(Role::Client);
    t.need(snap, 1, 11, 0, Some(Volume::Snapshot(5)));
    t.out(snap);
    t.out(sb);
    t.a.handle_bus_disconnected();
    t.a.handle_disconnect(snap);
    assert_eq!(
        t.msgs(sb),
        vec![M::ClientGone(11, ME)],
        "the own server learns it without the bus"
    );
    // Back on the bus: a server elsewhere (a restarted backend) hears it
    // again, and the address of the remote server known before the break
    // is forgotten.
    t.a.handle_bus_connected();
    t.bus();
    t.bus_in(&server_up(12, 2, "/run/csnap/node-2/server.sock"));
    assert!(t.bus().contains(&M::ClientGone(11, ME)));
}

#[test]
fn a_hold_past_due_with_no_server_known_is_no_deadline() {
    let mut t = T::new();
    t.bus_in(&server_up(4, 2, "/run/csnap/node-2/server.sock"));
    let c = t.hello(Role::Client);
    // It saw 4 fail: held.
    t.need(c, 1, 11, 4, Some(Volume::Snapshot(5)));
    assert!(t.a.next_deadline_ms().is_some());
    // The bus breaks and comes back: the remote server is forgotten.
    t.a.handle_bus_disconnected();
    t.a.handle_bus_connected();
    t.bus();
    t.at(HOLD_MS + 1);
    assert!(t.out(c).is_empty(), "no server known: nothing to answer");
    assert!(
        t.a.next_deadline_ms().is_none_or(|d| d > t.now),
        "a deadline in the past makes the loop spin"
    );
    // The backend says 4 runs after all: answered after the hold.
    t.bus_in(&server_up(4, 2, "/run/csnap/node-2/server.sock"));
    t.at(t.now + HOLD_MS + 1);
    assert_eq!(
        t.msgs(c),
        vec![addr_of(4, 2, "/run/csnap/node-2/server.sock")]
    );
}

/// A (re)started agent knows only the clients connected to it: for
/// `relist_grace_ms` after its start it holds its answer to a gather and
/// takes no start, so a snapshot client that reconnects and says who it is
/// within its retry backoff is listed (cluster_sim's agent crashes: a
/// gather answered at once missed a lock holder, and the new server lifted
/// its barrier without it).
#[test]
fn a_started_agent_lists_its_clients_only_after_they_had_the_time_to_reconnect() {
    const GRACE_MS: u64 = 250;
    let mut t = T {
        a: AgentFsm::new(AgentConfig {
            relist_grace_ms: GRACE_MS,
            ..cfg()
        }),
        now: 1_000,
    };
    t.a.set_now(1_000);
    t.a.handle_bus_connected();
    t.bus_in(&members(1, &[1, 2, 3]));
    t.a.handle_tick();
    t.actions();
    t.bus();
    // A standby is ready, but the agent takes no start yet and says so.
    let sb = t.hello(Role::Server);
    t.send(
        sb,
        2,
        &Msg::ServerReady {
            pid: 7,
            node_id: ME,
            addr: &server_addr(7),
        },
    );
    assert_eq!(t.bus(), vec![agent_state(false, 0, 0)]);
    assert!(!t.a.status().standby_ready);
    // The end of the grace is the next thing the loop wakes for.
    assert_eq!(t.a.next_deadline_ms(), Some(1_000 + GRACE_MS));
    t.told_start(1, 0);
    assert_eq!(t.bus(), vec![agent_state(false, 0, 0)]);
    // Another node's gather asks; the answer is held.
    t.bus_in(&frame(
        0,
        &Msg::NeedClients {
            gather_id: 4,
            starter: 3,
        },
    ));
    assert!(
        t.bus().is_empty(),
        "answered before its clients reconnected"
    );
    // A snapshot client reconnects and says who it is (an announce).
    let s = t.hello(Role::Client);
    t.need(s, 1, 15, 0, Some(Volume::Snapshot(2)));
    // (No server is known: its question goes up.)
    assert_eq!(t.bus(), vec![M::WantServer(0)]);
    t.at(1_000 + GRACE_MS - 1);
    let b = t.bus();
    assert!(b.is_empty(), "{b:?}");
    assert!(t.a.status().relisting);
    // Past the grace: the held answer lists it, the standby is startable,
    // and the complete list goes out once (servers waiting for clients of
    // this node that died unseen learn they are gone).
    t.at(1_000 + GRACE_MS);
    assert_eq!(
        t.bus(),
        vec![
            M::Clients {
                gather: 4,
                from: ME,
                to: 3,
                clients: vec![(15, ME)],
            },
            agent_state(true, 0, 0),
            M::ClientsOf(ME, vec![(15, ME)]),
        ]
    );
    assert!(t.a.status().standby_ready);
    assert!(!t.a.status().relisting);
    t.at(1_000 + GRACE_MS + 1);
    assert!(t.bus().is_empty(), "the list goes out once");
    // Later gathers are answered at once.
    t.bus_in(&frame(
        0,
        &Msg::NeedClients {
            gather_id: 5,
            starter: 2,
        },
    ));
    assert_eq!(t.bus().len(), 1);
}

/// The controller echoes a server's announcement back to every agent, its
/// own included. An echo that arrives after the agent saw its own server
/// die (or at an agent restarted since: its servers died with the former
/// process) must not make the dead server the known one again: clients
/// would be given its address until a new controller happened to say
/// otherwise (cluster_sim, a controller crash that lost the death report).
#[test]
fn an_echo_of_its_own_dead_servers_announcement_is_ignored() {
    let mut t = served_then_died();
    // The echo of its `ServerUp`, late.
    t.bus_in(&server_up(6, ME, &server_addr(300)));
    assert_eq!(
        t.a.status().cluster_server,
        None,
        "a dead address came back"
    );
    let c = t.hello(Role::Client);
    t.need(c, 4, 60, 6, Some(Volume::Origin));
    assert!(t.out(c).is_empty());
    assert_eq!(t.bus(), vec![M::WantServer(6)]);
    // Another node's server is taken as before.
    t.bus_in(&server_up(7, 2, "n2.sock"));
    assert_eq!(t.out(c), vec![(4, addr_of(7, 2, "n2.sock"))]);
}

fn clients_of_msg(node: u32, cs: &[(u64, u32)]) -> Vec<u8> {
    with_client_list(cs, |l| {
        frame(
            0,
            &Msg::ClientsOf {
                node_id: node,
                clients: l,
            },
        )
    })
}

/// Another node's complete list (`ClientsOf`, from its restarted agent): a
/// gather under way drops that node's clients the list leaves out (they
/// died unseen), and the server being started, then serving, is told.
#[test]
fn another_nodes_complete_list_trims_the_gather_and_reaches_the_server() {
    let (mut t, sb, _) = gathering();
    t.bus_in(&clients_msg(9, 2, ME, &[(21, 2), (22, 2)]));
    // Node 2's agent restarted meanwhile: 22 is gone. An entry of node 3
    // in its list is not node 2's to speak for.
    t.bus_in(&clients_of_msg(2, &[(21, 2), (33, 3)]));
    t.bus_in(&clients_msg(9, 3, ME, &[(33, 3)]));
    assert_eq!(
        t.msgs(sb),
        vec![M::StartServer {
            members: vec![1, 2, 3],
            expected: vec![(11, ME), (12, ME), (21, 2), (33, 3)],
        }],
    );
    // Starting: the next list reaches the server on its link.
    t.bus_in(&clients_of_msg(3, &[]));
    assert_eq!(t.msgs(sb), vec![M::ClientsOf(3, vec![])]);
    // Its own node's list (an echo) is not passed on.
    t.bus_in(&clients_of_msg(ME, &[]));
    assert!(t.msgs(sb).is_empty());
}

/// The crash-loop breaker's input that survives a controller restart: the
/// agent counts its own servers' deaths (a crash after serving, a failed
/// start) within the window and reports the count in every `AgentState`;
/// deaths older than the window drop out. (A stop it was told to make is
/// no death.)
#[test]
fn its_own_servers_deaths_within_the_window_are_reported() {
    const WINDOW_MS: u64 = 10_000;
    let mut t = T::with(AgentConfig {
        death_window_ms: WINDOW_MS,
        ..cfg()
    });
    let sb = t.standby(300);
    t.serve(sb, 1, 6);
    t.bus();
    t.a.handle_disconnect(sb);
    assert_eq!(t.bus(), vec![agent_state_deaths(false, 0, 6, 1)]);
    // The next standby's start fails: a second death.
    t.at(1_000);
    let sb = t.standby_deaths(301, 1);
    t.told_start(2, 6);
    t.bus_in(&clients_msg(2, 2, ME, &[]));
    t.bus_in(&clients_msg(2, 3, ME, &[]));
    assert_eq!(t.msgs(sb).len(), 1, "StartServer");
    t.bus();
    t.a.handle_disconnect(sb);
    assert_eq!(t.bus(), vec![agent_state_deaths(false, 0, 0, 2)]);
    // A server moved away on the controller's word is no death.
    t.at(2_000);
    let sb = t.standby_deaths(302, 2);
    t.serve(sb, 3, 8);
    t.bus();
    t.bus_in(&frame(
        0,
        &Msg::Fence {
            reason: FenceReason::ServerMoved,
        },
    ));
    t.a.handle_disconnect(sb);
    let b = t.bus();
    assert!(
        b.iter()
            .all(|m| matches!(m, M::AgentState { deaths: 2, .. })),
        "{b:?}"
    );
    // A bus reconnect (a restarted controller) hears the count; past the
    // window the first death drops out, then the second.
    t.at(WINDOW_MS - 1);
    t.a.handle_bus_disconnected();
    t.a.handle_bus_connected();
    assert!(t.bus().contains(&agent_state_deaths(false, 0, 0, 2)));
    t.at(WINDOW_MS);
    t.a.handle_bus_disconnected();
    t.a.handle_bus_connected();
    assert!(t.bus().contains(&agent_state_deaths(false, 0, 0, 1)));
    t.at(1_000 + WINDOW_MS);
    t.a.handle_bus_disconnected();
    t.a.handle_bus_connected();
    assert!(t.bus().contains(&agent_state_deaths(false, 0, 0, 0)));
}

/// A gather that waited long: a snapshot client that came to this node
/// meanwhile holds locks the new server must wait for, so the node's own
/// clients are listed as they are when the gather completes.
#[test]
fn the_starters_own_clients_are_listed_as_of_the_end_of_the_gather() {
    let (mut t, sb, snap) = gathering();
    let late = t.hello(Role::Client);
    t.need(late, 1, 13, 0, Some(Volume::Snapshot(5)));
    t.a.handle_disconnect(snap);
    t.bus();
    t.bus_in(&clients_msg(9, 2, ME, &[]));
    t.bus_in(&clients_msg(9, 3, ME, &[]));
    assert_eq!(
        t.msgs(sb),
        vec![M::StartServer {
            members: vec![1, 2, 3],
            expected: vec![(12, ME), (13, ME)],
        }],
        "the late client listed, the gone one not"
    );
}

/// A gather the controller gave up on is stale: a `StartHere` for another
/// attempt replaces it (with fresh lists), and a newer server announced
/// from another node ends it; neither finishes into a second server.
#[test]
fn a_stale_gather_is_replaced_or_ended_never_finished() {
    let (mut t, sb, _) = gathering();
    // The same attempt again: nothing new.
    t.told_start(9, 4);
    assert!(t.bus().is_empty());
    // Another attempt: the old gather fails, a new one asks again.
    t.told_start(12, 4);
    assert_eq!(t.bus(), vec![M::NeedClients(12, ME)]);
    let a = t.actions();
    assert!(a.contains(&AgentAction::Log(AgentEvent::StartFailed { attempt: 9 })));
    // Answers for the old attempt are ignored.
    t.bus_in(&clients_msg(9, 2, ME, &[]));
    t.bus_in(&clients_msg(9, 3, ME, &[]));
    assert!(t.msgs(sb).is_empty());
    // A server newer than any known at the start serves on node 2: the
    // controller placed it; this gather ends, the standby is free again.
    t.bus_in(&server_up(5, 2, "n2.sock"));
    let b = t.bus();
    assert!(b.contains(&agent_state(true, 0, 0)), "{b:?}");
    assert!(t
        .actions()
        .contains(&AgentAction::Log(AgentEvent::StartFailed { attempt: 12 })));
    t.bus_in(&clients_msg(12, 2, ME, &[]));
    t.bus_in(&clients_msg(12, 3, ME, &[]));
    assert!(t.msgs(sb).is_empty(), "a stale gather started a server");
}
