//! The controller (the `local` membership and resource-manager backend)
//! against scripted agents and `csnap cluster` tools: membership and its
//! epochs, placement (auto and manual), failover, fencing, moves, start
//! timeouts, stale incarnations, message relay and the status reply.

use std::collections::BTreeMap;

use csnap_fsm::cluster::{Controller, ControllerConfig, ControllerEvent, CtlConnId, Policy};
use csnap_proto::{
    self as proto, ClientEntry, ClusterOp, ErrorCode, FenceReason, Header, Kind, Msg, NodeStatus,
    Role,
};

const TIMEOUT_MS: u64 = 5_000;

fn frame(rid: u64, msg: &Msg<'_>) -> Vec<u8> {
    let mut b = vec![0u8; proto::FRAME_MAX_BYTES];
    let n = proto::encode(&Header::new(rid, 0), msg, &mut b).unwrap();
    b.truncate(n);
    b
}

/// A decoded frame, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum M {
    HelloOk,
    Ok,
    Error(ErrorCode),
    Members(u64, Vec<u32>),
    StartHere {
        attempt: u64,
        former: u64,
    },
    ServerUp(u64, u32, String),
    ServerDown(u64, u32),
    Fence(FenceReason),
    NeedClients(u64, u32),
    Clients(u64, u32, u32, Vec<u64>),
    ClientGone(u64, u32),
    Status {
        incarnation: u64,
        node: u32,
        failed: u16,
        addr: String,
        nodes: Vec<(u32, u8, u64)>,
    },
    Other(Kind),
}

/// `StartHere` as an agent gets it.
fn start_here(attempt: u64, former: u64) -> M {
    M::StartHere { attempt, former }
}

fn own(msg: &Msg<'_>) -> M {
    match *msg {
        Msg::HelloOk { .. } => M::HelloOk,
        Msg::Ok => M::Ok,
        Msg::Error { code, text, .. } => {
            assert!(!text.is_empty());
            M::Error(code)
        }
        Msg::Members { epoch, members } => {
            M::Members(epoch, members.iter().map(|n| n.id).collect())
        }
        Msg::StartHere {
            attempt,
            former_incarnation,
            ..
        } => M::StartHere {
            attempt,
            former: former_incarnation,
        },
        Msg::ServerUp {
            incarnation,
            node_id,
            addr,
        } => M::ServerUp(incarnation, node_id, addr.to_string()),
        Msg::ServerDown {
            incarnation,
            node_id,
        } => M::ServerDown(incarnation, node_id),
        Msg::Fence { reason } => M::Fence(reason),
        Msg::NeedClients { gather_id, starter } => M::NeedClients(gather_id, starter),
        Msg::Clients {
            gather_id,
            from,
            to,
            clients,
        } => M::Clients(
            gather_id,
            from,
            to,
            clients.iter().map(|c| c.client_id).collect(),
        ),
        Msg::ClientGone { client_id, node_id } => M::ClientGone(client_id, node_id),
        Msg::ClusterStatusReply {
            server_incarnation,
            server_node,
            failed_deaths,
            server_addr,
            nodes,
        } => M::Status {
            incarnation: server_incarnation,
            node: server_node,
            failed: failed_deaths,
            addr: server_addr.to_string(),
            nodes: nodes
                .iter()
                .map(|n| (n.node, n.flags, n.serving_incarnation))
                .collect(),
        },
        ref m => M::Other(m.kind()),
    }
}

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

struct T {
    c: Controller,
    /// node -> its agent's connection.
    agents: BTreeMap<u32, CtlConnId>,
}

fn addr(node: u32) -> String {
    format!("/run/csnap/node-{node}/server.sock")
}

impl T {
    fn new(policy: Policy) -> T {
        let mut c = Controller::new(ControllerConfig {
            conns: 16,
            policy,
            start_timeout_ms: TIMEOUT_MS,
            max_server_deaths: csnap_pools::CONTROLLER_SERVER_DEATHS_DEFAULT,
            death_window_ms: csnap_pools::CONTROLLER_DEATH_WINDOW_MS_DEFAULT,
        });
        c.set_now(0);
        T {
            c,
            agents: BTreeMap::new(),
        }
    }

    /// Agents of `nodes` joined; every message so far consumed.
    fn with_nodes(policy: Policy, nodes: &[u32]) -> T {
        let mut t = T::new(policy);
        for &n in nodes {
            t.join(n);
        }
        t.drain();
        t
    }

    fn send(&mut self, c: CtlConnId, rid: u64, msg: &Msg<'_>) {
        self.c.handle_frame(c, &frame(rid, msg));
    }

    fn out(&mut self, c: CtlConnId) -> Vec<(u64, M)> {
        let b = self.c.output(c).to_vec();
        self.c.consume_output(c, b.len());
        decode_all(&b)
    }

    fn msgs(&mut self, c: CtlConnId) -> Vec<M> {
        self.out(c).into_iter().map(|x| x.1).collect()
    }

    /// What each agent got, consumed.
    fn agents_got(&mut self) -> BTreeMap<u32, Vec<M>> {
        let nodes: Vec<(u32, CtlConnId)> = self.agents.iter().map(|(&n, &c)| (n, c)).collect();
        let mut m = BTreeMap::new();
        for (n, c) in nodes {
            let v = self.msgs(c);
            if !v.is_empty() {
                m.insert(n, v);
            }
        }
        m
    }

    fn drain(&mut self) {
        self.agents_got();
        while self.c.poll_event().is_some() {}
    }

    fn closes(&mut self) -> Vec<CtlConnId> {
        let mut v = Vec::new();
        while let Some(c) = self.c.poll_close() {
            v.push(c);
        }
        v
    }

    fn events(&mut self) -> Vec<ControllerEvent> {
        let mut v = Vec::new();
        while let Some(e) = self.c.poll_event() {
            v.push(e);
        }
        v
    }

    fn hello(&mut self, role: Role) -> CtlConnId {
        let c = self.c.handle_accept().unwrap();
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

    fn join(&mut self, node: u32) -> CtlConnId {
        let c = self.hello(Role::Agent);
        let a = format!("/run/csnap/node-{node}/agent.sock");
        self.send(
            c,
            0,
            &Msg::Join {
                node_id: node,
                addr: &a,
            },
        );
        self.agents.insert(node, c);
        c
    }

    fn state(&mut self, node: u32, standby: bool, serving: u64, died: u64) {
        let c = self.agents[&node];
        self.send(
            c,
            0,
            &Msg::AgentState {
                node_id: node,
                standby_ready: standby,
                recent_deaths: 0,
                serving_incarnation: serving,
                died_incarnation: died,
            },
        );
    }

    fn want(&mut self, node: u32, failed: u64) {
        let c = self.agents[&node];
        self.send(
            c,
            0,
            &Msg::WantServer {
                failed_incarnation: failed,
            },
        );
    }

    fn up(&mut self, node: u32, inc: u64) {
        let c = self.agents[&node];
        let a = addr(node);
        self.send(
            c,
            0,
            &Msg::ServerUp {
                incarnation: inc,
                node_id: node,
                addr: &a,
            },
        );
    }

    fn command(&mut self, tool: CtlConnId, rid: u64, op: ClusterOp, node: u32) {
        self.send(tool, rid, &Msg::ClusterCommand { op, node_id: node });
    }

    /// Nodes 1, 2 and 3 with ready standbys, incarnation `inc` serving on
    /// node 2; everything consumed.
    fn running_on_2(inc: u64) -> T {
        let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3]);
        t.state(2, true, 0, 0);
        t.state(3, true, 0, 0);
        t.want(1, 0);
        let m = t.agents_got();
        assert_eq!(m, BTreeMap::from([(2, vec![start_here(1, 0)])]));
        t.up(2, inc);
        t.state(2, false, inc, 0);
        t.state(1, true, 0, 0);
        t.drain();
        assert_eq!(t.c.running(), Some((2, inc)));
        t
    }
}

fn members(epoch: u64, nodes: &[u32]) -> M {
    M::Members(epoch, nodes.to_vec())
}

#[test]
fn join_broadcasts_members_with_growing_epochs_and_a_node_id_is_unique() {
    let mut t = T::new(Policy::Auto);
    let a1 = t.join(1);
    assert_eq!(t.msgs(a1), vec![members(1, &[1])]);
    let a2 = t.join(2);
    assert_eq!(t.msgs(a1), vec![members(2, &[1, 2])]);
    assert_eq!(t.msgs(a2), vec![members(2, &[1, 2])]);
    assert!(t.c.is_member(1) && t.c.is_member(2) && !t.c.is_member(3));
    assert!(t.events().contains(&ControllerEvent::Joined { node: 2 }));
    // Another agent claiming node 1 is refused and closed; nobody hears of it.
    let dup = t.hello(Role::Agent);
    t.send(
        dup,
        4,
        &Msg::Join {
            node_id: 1,
            addr: "/elsewhere.sock",
        },
    );
    assert_eq!(
        t.out(dup),
        vec![(4, M::Error(ErrorCode::AlreadyIdentified))]
    );
    assert_eq!(t.closes(), vec![dup]);
    t.c.handle_disconnect(dup);
    assert!(t.msgs(a1).is_empty() && t.msgs(a2).is_empty());
    // An agent that has not joined may say nothing else.
    let shy = t.hello(Role::Agent);
    t.send(
        shy,
        5,
        &Msg::WantServer {
            failed_incarnation: 0,
        },
    );
    assert_eq!(t.out(shy), vec![(5, M::Error(ErrorCode::NotIdentified))]);
    // A node's agent going away is a membership change too.
    t.c.handle_disconnect(a1);
    assert_eq!(t.msgs(a2), vec![members(3, &[2])]);
    assert!(!t.c.is_member(1));
    let a1b = t.join(1);
    assert_eq!(t.msgs(a1b), vec![members(4, &[1, 2])]);
    assert_eq!(t.msgs(a2), vec![members(4, &[1, 2])]);
}

#[test]
fn only_agents_and_tools_are_accepted() {
    let mut t = T::new(Policy::Auto);
    for role in [Role::Client, Role::Server] {
        let c = t.c.handle_accept().unwrap();
        t.send(
            c,
            2,
            &Msg::Hello {
                version_min: 1,
                version_max: 1,
                role,
            },
        );
        assert_eq!(t.out(c), vec![(2, M::Error(ErrorCode::Unsupported))]);
        assert_eq!(t.closes(), vec![c]);
        t.c.handle_disconnect(c);
    }
    // No common version: refused and closed.
    let v = t.c.handle_accept().unwrap();
    t.send(
        v,
        2,
        &Msg::Hello {
            version_min: 2,
            version_max: 4,
            role: Role::Agent,
        },
    );
    assert_eq!(t.out(v), vec![(2, M::Error(ErrorCode::BadVersion))]);
    assert_eq!(t.closes(), vec![v]);
    t.c.handle_disconnect(v);
    let c = t.c.handle_accept().unwrap();
    t.send(c, 3, &Msg::ClusterStatus);
    assert_eq!(t.out(c), vec![(3, M::Error(ErrorCode::NotIdentified))]);
    // A tool may not speak for an agent; an agent not for another node.
    let tool = t.hello(Role::Control);
    t.send(
        tool,
        4,
        &Msg::WantServer {
            failed_incarnation: 0,
        },
    );
    assert_eq!(t.out(tool), vec![(4, M::Error(ErrorCode::Unsupported))]);
    let a = t.join(1);
    t.out(a);
    t.send(
        a,
        5,
        &Msg::AgentState {
            node_id: 2,
            standby_ready: true,
            recent_deaths: 0,
            serving_incarnation: 0,
            died_incarnation: 0,
        },
    );
    assert_eq!(t.out(a), vec![(5, M::Error(ErrorCode::BadFrame))]);
    t.send(
        a,
        6,
        &Msg::ServerUp {
            incarnation: 1,
            node_id: 2,
            addr: "x",
        },
    );
    assert_eq!(t.out(a), vec![(6, M::Error(ErrorCode::BadFrame))]);
    assert_eq!(t.c.running(), None);
    // A malformed frame is answered and the connection goes on.
    let mut f = frame(7, &Msg::ClusterStatus);
    f[12] = 1; // flags must be 0
    t.c.handle_frame(tool, &f);
    let r = t.out(tool);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, 7);
    assert!(matches!(r[0].1, M::Error(_)));
    t.send(tool, 8, &Msg::ClusterStatus);
    assert!(matches!(t.out(tool)[..], [(8, M::Status { .. })]));
    // A stream that cannot be cut into frames: error and close.
    t.c.handle_bad_stream(tool, &proto::DecodeError::BadMagic);
    assert_eq!(t.msgs(tool), vec![M::Error(ErrorCode::BadMagic)]);
    assert_eq!(t.closes(), vec![tool]);
}

#[test]
fn auto_placement_picks_the_lowest_member_with_a_ready_standby() {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3]);
    // Wanted, but no standby anywhere yet.
    t.want(1, 0);
    assert!(t.agents_got().is_empty());
    assert!(t.events().contains(&ControllerEvent::NoCandidate));
    assert_eq!(t.c.next_deadline_ms(), None);
    t.state(3, true, 0, 0);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(3, vec![start_here(1, 0)])]),
        "the wish is remembered: placed once a standby is ready"
    );
    assert_eq!(t.c.next_deadline_ms(), Some(TIMEOUT_MS));

    let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3]);
    t.state(3, true, 0, 0);
    t.state(2, true, 0, 0);
    assert!(t.agents_got().is_empty(), "nothing is placed until wanted");
    t.want(1, 0);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(2, vec![start_here(1, 0)])])
    );
    assert!(t.events().contains(&ControllerEvent::Placing {
        node: 2,
        attempt: 1
    }));
    // More wishes while starting place nothing more.
    t.want(3, 0);
    t.want(1, 0);
    assert!(t.agents_got().is_empty());
}

#[test]
fn manual_policy_places_only_on_a_start_command() {
    let mut t = T::with_nodes(Policy::Manual, &[1, 2, 3]);
    t.state(1, true, 0, 0);
    t.state(2, true, 0, 0);
    t.want(1, 0);
    assert!(t.agents_got().is_empty());
    let tool = t.hello(Role::Control);
    // Not a member: refused.
    t.command(tool, 10, ClusterOp::Start, 9);
    assert_eq!(t.out(tool), vec![(10, M::Error(ErrorCode::Unsupported))]);
    t.command(tool, 11, ClusterOp::Start, 2);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(2, vec![start_here(1, 0)])])
    );
    assert!(t.out(tool).is_empty(), "answered once it serves");
    t.up(2, 1);
    assert_eq!(t.out(tool), vec![(11, M::Ok)]);
    let up = M::ServerUp(1, 2, addr(2));
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(1, vec![up.clone()]), (2, vec![up.clone()]), (3, vec![up])])
    );
    // Starting where it already serves is answered at once.
    t.command(tool, 12, ClusterOp::Start, 2);
    assert_eq!(t.out(tool), vec![(12, M::Ok)]);
    // A server dying under the manual policy is not replaced by itself.
    t.state(2, true, 0, 1);
    let m = t.agents_got();
    assert!(m.values().all(|v| v == &vec![M::ServerDown(1, 2)]), "{m:?}");
    assert_eq!(m.len(), 3);
}

#[test]
fn server_up_runs_and_is_broadcast_and_a_late_joiner_hears_of_it() {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2]);
    t.state(2, true, 0, 0);
    let tool = t.hello(Role::Control);
    t.command(tool, 20, ClusterOp::Start, 2);
    t.drain();
    t.up(2, 4);
    assert_eq!(t.c.running(), Some((2, 4)));
    assert_eq!(t.out(tool), vec![(20, M::Ok)]);
    let up = M::ServerUp(4, 2, addr(2));
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(1, vec![up.clone()]), (2, vec![up.clone()])])
    );
    assert!(t.events().contains(&ControllerEvent::Running {
        node: 2,
        incarnation: 4
    }));
    let a3 = t.join(3);
    assert_eq!(t.msgs(a3), vec![members(3, &[1, 2, 3]), up]);
}

#[test]
fn the_serving_agent_reporting_its_server_died_fails_over_to_another_node() {
    let mut t = T::running_on_2(1);
    // Node 2 has a standby again and is the lowest candidate but one; it is
    // avoided because its server just died.
    t.state(2, true, 0, 1);
    let m = t.agents_got();
    let down = M::ServerDown(1, 2);
    assert_eq!(m[&2], vec![down.clone()]);
    assert_eq!(m[&3], vec![down.clone()]);
    assert_eq!(m[&1], vec![down, start_here(2, 1)]);
    assert_eq!(t.c.running(), None);
    // Node 1 cannot start after all: the next try avoids it too, and the
    // lowest other candidate is node 2. Node 1 had not begun its gather, so
    // its report may predate the StartHere: it is fenced so that it does
    // not act on it later.
    t.state(1, false, 0, 0);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([
            (1, vec![M::Fence(FenceReason::ServerMoved)]),
            (2, vec![start_here(3, 1)])
        ])
    );
    // A death report naming an old incarnation changes nothing.
    t.up(2, 2);
    t.drain();
    t.state(2, false, 2, 1);
    assert!(t.agents_got().is_empty());
    assert_eq!(t.c.running(), Some((2, 2)));
}

#[test]
fn the_failed_node_is_tried_again_when_it_is_the_only_candidate() {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2]);
    t.state(2, true, 0, 0);
    t.want(2, 0);
    t.up(2, 1);
    t.drain();
    t.state(2, true, 0, 1);
    let m = t.agents_got();
    assert_eq!(m[&2], vec![M::ServerDown(1, 2), start_here(2, 1)]);
}

#[test]
fn the_serving_agent_disconnecting_fails_over() {
    let mut t = T::running_on_2(1);
    let a2 = t.agents.remove(&2).unwrap();
    t.c.handle_disconnect(a2);
    let m = t.agents_got();
    assert_eq!(
        m[&1],
        vec![M::ServerDown(1, 2), start_here(2, 1), members(4, &[1, 3]),]
    );
    assert_eq!(m[&3], vec![M::ServerDown(1, 2), members(4, &[1, 3])]);
    assert!(t
        .events()
        .contains(&ControllerEvent::Disconnected { node: 2 }));
}

#[test]
fn leave_fences_the_node_and_fails_over_and_join_takes_it_back() {
    let mut t = T::running_on_2(1);
    let tool = t.hello(Role::Control);
    t.command(tool, 30, ClusterOp::Leave, 2);
    assert_eq!(t.out(tool), vec![(30, M::Ok)]);
    assert!(!t.c.is_member(2));
    let m = t.agents_got();
    assert_eq!(m[&2][0], M::Fence(FenceReason::LeftCluster));
    assert!(m[&2].contains(&members(4, &[1, 3])));
    assert!(m[&3].contains(&members(4, &[1, 3])));
    // The fenced agent stops its server and says so; only then is the
    // server started elsewhere.
    assert!(
        m.values()
            .flatten()
            .all(|x| !matches!(x, M::StartHere { .. })),
        "no start while the left node's server may still run: {m:?}"
    );
    t.state(2, false, 0, 1);
    let m = t.agents_got();
    assert!(m[&3].contains(&M::ServerDown(1, 2)));
    assert_eq!(m[&1], vec![M::ServerDown(1, 2), start_here(2, 1)]);
    // A left node is no candidate, even with a standby ready.
    t.up(1, 2);
    t.drain();
    t.state(1, false, 0, 2);
    let m = t.agents_got();
    assert_eq!(m[&3], vec![M::ServerDown(2, 1), start_here(3, 2)]);
    // Join takes it back.
    t.command(tool, 31, ClusterOp::Join, 2);
    assert_eq!(t.out(tool), vec![(31, M::Ok)]);
    assert!(t.c.is_member(2));
    let m = t.agents_got();
    assert_eq!(m[&2], vec![members(5, &[1, 2, 3])]);
}

#[test]
fn leave_of_a_node_whose_agent_is_gone_fails_over_at_once() {
    let mut t = T::running_on_2(1);
    let a2 = t.agents.remove(&2).unwrap();
    let tool = t.hello(Role::Control);
    // Node 2's agent is gone (its server with it): a failover is under way.
    t.c.handle_disconnect(a2);
    t.drain();
    t.command(tool, 1, ClusterOp::Leave, 2);
    assert_eq!(t.out(tool), vec![(1, M::Ok)]);
    // Leaving a node that does not serve places nothing new.
    let m = t.agents_got();
    assert!(
        m.values().flatten().all(|x| matches!(x, M::Members(..))),
        "{m:?}"
    );
}

#[test]
fn start_elsewhere_stops_the_old_server_first() {
    let mut t = T::running_on_2(1);
    let tool = t.hello(Role::Control);
    t.command(tool, 40, ClusterOp::Start, 3);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(2, vec![M::Fence(FenceReason::ServerMoved)])]),
        "nothing for node 3 while node 2 may still serve"
    );
    assert!(t.out(tool).is_empty());
    // A report about something else does not start node 3.
    t.state(2, true, 1, 0);
    assert!(t.agents_got().is_empty());
    // Node 2's server died: now node 3.
    t.state(2, true, 0, 1);
    let m = t.agents_got();
    assert_eq!(m[&3], vec![M::ServerDown(1, 2), start_here(2, 1)]);
    assert_eq!(m[&1], vec![M::ServerDown(1, 2)]);
    t.up(3, 2);
    assert_eq!(t.out(tool), vec![(40, M::Ok)]);
    assert_eq!(t.c.running(), Some((3, 2)));
    // Another start while a start is under way elsewhere: Busy.
    t.state(1, true, 0, 0);
    t.command(tool, 41, ClusterOp::Start, 1);
    t.drain();
    t.state(3, true, 0, 2);
    t.drain();
    t.command(tool, 42, ClusterOp::Start, 2);
    assert_eq!(t.out(tool), vec![(42, M::Error(ErrorCode::Busy))]);
}

#[test]
fn a_start_that_times_out_fences_the_slow_node_and_places_elsewhere() {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3]);
    t.state(1, true, 0, 0);
    t.state(2, true, 0, 0);
    t.c.set_now(1_000);
    t.want(3, 0);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(1, vec![start_here(1, 0)])])
    );
    assert_eq!(t.c.next_deadline_ms(), Some(1_000 + TIMEOUT_MS));
    t.c.set_now(1_000 + TIMEOUT_MS - 1);
    t.c.handle_tick();
    assert!(t.agents_got().is_empty());
    t.c.set_now(1_000 + TIMEOUT_MS);
    t.c.handle_tick();
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([
            (1, vec![M::Fence(FenceReason::ServerMoved)]),
            (2, vec![start_here(2, 0)])
        ])
    );
    assert!(t
        .events()
        .contains(&ControllerEvent::StartFailed { node: 1 }));
}

#[test]
fn a_stale_server_up_fences_its_agent() {
    let mut t = T::running_on_2(5);
    t.up(3, 4);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(3, vec![M::Fence(FenceReason::ServerMoved)])])
    );
    assert_eq!(t.c.running(), Some((2, 5)));
    // A newer one elsewhere wins: the older one is fenced.
    t.up(3, 6);
    let m = t.agents_got();
    assert_eq!(
        m[&2],
        vec![
            M::Fence(FenceReason::ServerMoved),
            M::ServerUp(6, 3, addr(3))
        ]
    );
    assert_eq!(m[&1], vec![M::ServerUp(6, 3, addr(3))]);
    assert_eq!(t.c.running(), Some((3, 6)));
    // The old one's death report does not undo it.
    t.state(2, true, 0, 5);
    assert!(t.agents_got().is_empty());
    assert_eq!(t.c.running(), Some((3, 6)));
}

fn clients_frame(gather: u64, from: u32, to: u32, ids: &[u64]) -> Vec<u8> {
    let e: Vec<ClientEntry> = ids
        .iter()
        .map(|&client_id| ClientEntry {
            client_id,
            node_id: from,
        })
        .collect();
    let mut b = vec![0u8; proto::CLIENT_LIST_BYTES_MAX];
    let l = proto::ClientList::from_entries(&e, &mut b).unwrap();
    frame(
        0,
        &Msg::Clients {
            gather_id: gather,
            from,
            to,
            clients: l,
        },
    )
}

#[test]
fn need_clients_clients_and_client_gone_are_relayed_to_the_right_nodes_only() {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3, 4]);
    let tool = t.hello(Role::Control);
    t.command(tool, 1, ClusterOp::Leave, 4);
    t.out(tool);
    t.drain();
    // No server: a client gone goes nowhere.
    let a1 = t.agents[&1];
    t.send(
        a1,
        0,
        &Msg::ClientGone {
            client_id: 7,
            node_id: 1,
        },
    );
    assert!(t.agents_got().is_empty());
    // Node 2 gathers: every other member is asked, not node 2 itself, not
    // the left node 4, not the tool.
    t.state(2, true, 0, 0);
    t.want(1, 0);
    t.drain();
    let a2 = t.agents[&2];
    t.send(
        a2,
        0,
        &Msg::NeedClients {
            gather_id: 1,
            starter: 2,
        },
    );
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([
            (1, vec![M::NeedClients(1, 2)]),
            (3, vec![M::NeedClients(1, 2)])
        ])
    );
    assert!(t.out(tool).is_empty());
    // A NeedClients naming another starter is dropped.
    t.send(
        a2,
        0,
        &Msg::NeedClients {
            gather_id: 1,
            starter: 3,
        },
    );
    assert!(t.agents_got().is_empty());
    // Answers go to the starter only; one naming another sender is dropped.
    t.c.handle_frame(a1, &clients_frame(1, 1, 2, &[11, 12]));
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(2, vec![M::Clients(1, 1, 2, vec![11, 12])])])
    );
    t.c.handle_frame(a1, &clients_frame(1, 3, 2, &[31]));
    assert!(t.agents_got().is_empty());
    // A client gone during the start goes to the starting node.
    t.send(
        a1,
        0,
        &Msg::ClientGone {
            client_id: 11,
            node_id: 1,
        },
    );
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(2, vec![M::ClientGone(11, 1)])])
    );
    // While running, to the serving node only.
    t.up(2, 1);
    t.drain();
    let a3 = t.agents[&3];
    t.send(
        a3,
        0,
        &Msg::ClientGone {
            client_id: 31,
            node_id: 3,
        },
    );
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(2, vec![M::ClientGone(31, 3)])])
    );
}

#[test]
fn cluster_status_reports_the_server_and_every_node() {
    let mut t = T::running_on_2(3);
    t.state(3, true, 0, 0);
    t.state(1, false, 0, 0);
    let tool = t.hello(Role::Control);
    t.command(tool, 1, ClusterOp::Leave, 1);
    t.out(tool);
    t.send(tool, 50, &Msg::ClusterStatus);
    let r = t.out(tool);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, 50);
    let M::Status {
        incarnation,
        node,
        addr: a,
        nodes,
        ..
    } = &r[0].1
    else {
        panic!("{r:?}")
    };
    assert_eq!((*incarnation, *node, a.as_str()), (3, 2, addr(2).as_str()));
    let c = NodeStatus::CONNECTED;
    let m = NodeStatus::MEMBER;
    let s = NodeStatus::STANDBY_READY;
    let v = NodeStatus::SERVING;
    assert_eq!(
        nodes,
        &vec![(1, c, 0), (2, c | m | v, 3), (3, c | m | s, 0)],
        "node 1 left (connected, not a member), node 2 serves, node 3 stands by"
    );
    // No server: empty address, zeros.
    let mut t = T::with_nodes(Policy::Auto, &[5]);
    let tool = t.hello(Role::Control);
    t.send(tool, 51, &Msg::ClusterStatus);
    assert_eq!(
        t.out(tool),
        vec![(
            51,
            M::Status {
                incarnation: 0,
                node: 0,
                failed: 0,
                addr: String::new(),
                nodes: vec![(5, c | m, 0)],
            }
        )]
    );
}

#[test]
fn a_peer_that_never_reads_is_closed_not_buffered_without_bound() {
    let mut t = T::running_on_2(1);
    let a1 = t.agents[&1];
    let a2 = t.agents[&2];
    let tool = t.hello(Role::Control);
    // Node 1's agent never reads; membership changes pile up for it.
    let mut n = 0;
    while !t.closes().contains(&a1) {
        assert!(n < 100_000, "never closed");
        t.command(tool, n, ClusterOp::Leave, 3);
        t.command(tool, n, ClusterOp::Join, 3);
        assert!(t.c.output(a1).len() <= csnap_fsm::cluster::CONN_OUT_BYTES);
        for c in [a2, t.agents[&3], tool] {
            t.c.consume_output(c, t.c.output(c).len());
        }
        n += 1;
    }
    assert!(!t.c.wants_read(a1));
    // It is still node 1 until its connection is gone; then it is not a
    // member any more, and the others hear of it.
    assert!(t.c.is_member(1));
    t.c.handle_disconnect(a1);
    assert!(!t.c.is_member(1));
    assert_eq!(t.c.running(), Some((2, 1)));
    assert!(matches!(t.msgs(a2).last(), Some(M::Members(_, m)) if m == &vec![2, 3]));
    // A tool that never reads its status replies is closed too.
    let mut k = 0;
    while !t.closes().contains(&tool) {
        assert!(k < 100_000, "never closed");
        t.send(tool, k, &Msg::ClusterStatus);
        assert!(t.c.output(tool).len() <= csnap_fsm::cluster::CONN_OUT_BYTES);
        k += 1;
    }
    t.c.handle_disconnect(tool);
    assert_eq!(t.c.running(), Some((2, 1)));
}

/// Nodes 1, 2 and 3 with standbys on 2 and 3; node 2 was asked to start
/// (attempt 1) and has asked the others for their clients.
fn gathering_on_2() -> T {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3]);
    t.state(2, true, 0, 0);
    t.state(3, true, 0, 0);
    t.want(1, 0);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(2, vec![start_here(1, 0)])])
    );
    let a2 = t.agents[&2];
    t.send(
        a2,
        0,
        &Msg::NeedClients {
            gather_id: 1,
            starter: 2,
        },
    );
    t.drain();
    t
}

#[test]
fn leave_of_a_node_whose_start_may_complete_waits_for_its_agent() {
    let mut t = gathering_on_2();
    // Node 1 answered: node 2's gather may be complete.
    let a1 = t.agents[&1];
    t.c.handle_frame(a1, &clients_frame(1, 1, 2, &[]));
    t.drain();
    let tool = t.hello(Role::Control);
    t.command(tool, 1, ClusterOp::Leave, 2);
    assert_eq!(t.out(tool), vec![(1, M::Ok)]);
    let m = t.agents_got();
    assert_eq!(m[&2][0], M::Fence(FenceReason::LeftCluster));
    assert!(
        m.values()
            .flatten()
            .all(|x| !matches!(x, M::StartHere { .. })),
        "no start elsewhere while node 2 may start one: {m:?}"
    );
    // Its start finished before the fence arrived: nobody is told of it.
    t.up(2, 1);
    t.state(2, false, 1, 0);
    assert!(t.agents_got().is_empty());
    assert_eq!(t.c.running(), None);
    // The fence stopped it: now elsewhere.
    t.state(2, false, 0, 1);
    let m = t.agents_got();
    assert_eq!(m[&3], vec![M::ServerDown(1, 2), start_here(2, 1)]);
}

#[test]
fn leave_of_a_node_whose_start_stops_before_serving_places_elsewhere_then() {
    let mut t = gathering_on_2();
    let a1 = t.agents[&1];
    t.c.handle_frame(a1, &clients_frame(1, 1, 2, &[]));
    t.drain();
    let tool = t.hello(Role::Control);
    t.command(tool, 1, ClusterOp::Leave, 2);
    t.drain();
    t.state(2, false, 0, 0);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(3, vec![start_here(2, 0)])])
    );
}

/// A node told to leave while it gathers for a start may still finish that
/// gather (a `Members` without the node it waits for ends the wait) and
/// start its server before the fence reaches it: the controller places
/// nothing elsewhere until that node's agent has taken the fence and said
/// it serves nothing (the simulation found two servers serving at once,
/// seed 2384 with 3000 seeds, when the start moved on at once).
#[test]
fn leave_of_a_gathering_node_waits_for_its_agent_then_places_elsewhere() {
    let mut t = gathering_on_2();
    let tool = t.hello(Role::Control);
    t.command(tool, 1, ClusterOp::Leave, 2);
    let m = t.agents_got();
    assert_eq!(m[&2][0], M::Fence(FenceReason::LeftCluster));
    assert!(
        !m.values()
            .flatten()
            .any(|x| matches!(x, M::StartHere { .. })),
        "placed elsewhere before node 2's agent took the fence: {m:?}"
    );
    // The abandoned attempt's messages are not relayed any more.
    let (a1, a2) = (t.agents[&1], t.agents[&2]);
    t.c.handle_frame(a1, &clients_frame(1, 1, 2, &[5]));
    t.send(
        a2,
        0,
        &Msg::NeedClients {
            gather_id: 1,
            starter: 2,
        },
    );
    assert!(t.agents_got().is_empty());
    // Node 2's agent took the fence (its report after it): now node 3.
    t.state(2, false, 0, 0);
    let m = t.agents_got();
    assert_eq!(m[&3][0], start_here(2, 0));
    // The new attempt's gather messages are relayed.
    let a3 = t.agents[&3];
    t.send(
        a3,
        0,
        &Msg::NeedClients {
            gather_id: 2,
            starter: 3,
        },
    );
    let m = t.agents_got();
    assert_eq!(m[&1], vec![M::NeedClients(2, 3)]);
    assert!(!m.contains_key(&3));
}

#[test]
fn a_start_refused_before_its_gather_began_is_fenced() {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3]);
    t.state(2, true, 0, 0);
    t.state(3, true, 0, 0);
    t.want(1, 0);
    t.drain();
    // "No standby" from node 2 may predate its StartHere (a report still
    // on its way): node 2 is fenced, so that it does not start later, and
    // node 3 is asked.
    t.state(2, false, 0, 0);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([
            (2, vec![M::Fence(FenceReason::ServerMoved)]),
            (3, vec![start_here(2, 0)])
        ])
    );
    // Once node 3's gather began, a failure report is its answer: no fence.
    let a3 = t.agents[&3];
    t.send(
        a3,
        0,
        &Msg::NeedClients {
            gather_id: 2,
            starter: 3,
        },
    );
    let a1 = t.agents[&1];
    t.c.handle_frame(a1, &clients_frame(2, 1, 3, &[]));
    t.drain();
    t.state(2, true, 0, 0);
    t.state(3, false, 0, 0);
    assert_eq!(
        t.agents_got(),
        BTreeMap::from([(2, vec![start_here(3, 0)])])
    );
}

#[test]
fn a_start_on_the_node_being_stopped_is_refused_not_fatal() {
    let mut t = T::running_on_2(1);
    let tool = t.hello(Role::Control);
    t.command(tool, 1, ClusterOp::Start, 3);
    t.drain();
    // Back to node 2 while its server is being stopped: retry later.
    t.command(tool, 2, ClusterOp::Start, 2);
    assert_eq!(t.out(tool), vec![(2, M::Error(ErrorCode::Busy))]);
    t.state(2, true, 0, 1);
    let m = t.agents_got();
    assert_eq!(m[&3], vec![M::ServerDown(1, 2), start_here(2, 1)]);
    t.up(3, 2);
    assert_eq!(t.out(tool), vec![(1, M::Ok)]);
}

/// A connection the controller closes (a fatal frame) whose peer hangs up
/// before the driver polls the close, and whose slot a new connection takes
/// at once: the pending close is not the new connection's.
#[test]
fn a_close_queued_for_a_gone_connection_does_not_close_its_successor() {
    let mut t = T::new(Policy::Auto);
    let c = t.c.handle_accept().unwrap();
    t.c.handle_frame(
        c,
        b"this is not a csnap frame at all, and it is long enough",
    );
    t.c.handle_disconnect(c);
    let d = t.hello(Role::Control);
    assert_eq!(c, d, "the slot is reused");
    assert!(t.closes().is_empty(), "the new connection is not closed");
    assert!(t.c.wants_read(d));
}

/// The node a `StartHere` went to in `m`, if any.
fn started(m: &BTreeMap<u32, Vec<M>>) -> Option<u32> {
    m.iter()
        .find(|(_, v)| v.iter().any(|x| matches!(x, M::StartHere { .. })))
        .map(|(n, _)| *n)
}

/// The server on `node` serves incarnation `inc`, then dies; returns where
/// the controller placed the next one (None: nowhere).
fn serve_then_die(t: &mut T, node: u32, inc: u64) -> Option<u32> {
    t.up(node, inc);
    t.state(node, false, inc, 0);
    t.drain();
    assert_eq!(t.c.running(), Some((node, inc)));
    t.state(node, true, 0, inc);
    started(&t.agents_got())
}

/// The crash-loop breaker: three server deaths within the window mark the
/// store failed; nothing is placed, `start` is refused, status says so, and
/// `clear-failed` resumes placement.
#[test]
fn repeated_server_deaths_mark_the_store_failed_until_cleared() {
    let mut t = T::running_on_2(1);
    let c = &mut t;
    c.c.set_now(1_000);
    c.state(2, true, 0, 1); // death 1
    let n = started(&c.agents_got()).expect("placed after one death");
    c.c.set_now(2_000);
    let n = serve_then_die(c, n, 2).expect("placed after two deaths"); // death 2
    c.c.set_now(3_000);
    assert_eq!(c.c.failed_deaths(), 0);
    assert_eq!(serve_then_die(c, n, 3), None, "placed after three deaths"); // death 3
    assert_eq!(c.c.failed_deaths(), 3);
    assert_eq!(c.c.running(), None);
    // Clients keep asking: still nothing.
    c.want(1, 3);
    assert_eq!(started(&c.agents_got()), None);
    let tool = c.hello(Role::Control);
    c.send(tool, 7, &Msg::ClusterStatus);
    let r = c.out(tool);
    assert!(matches!(r[..], [(7, M::Status { failed: 3, .. })]), "{r:?}");
    c.command(tool, 8, ClusterOp::Start, 1);
    let r = c.out(tool);
    assert!(
        matches!(&r[..], [(8, M::Error(ErrorCode::Unsupported))]),
        "{r:?}"
    );
    assert_eq!(started(&c.agents_got()), None);
    // Cleared: placed at once (a server is wanted).
    c.command(tool, 9, ClusterOp::ClearFailed, 1);
    assert!(matches!(c.out(tool)[..], [(9, M::Ok)]));
    assert_eq!(c.c.failed_deaths(), 0);
    assert!(started(&c.agents_got()).is_some());
}

/// Deaths further apart than the window never trip the breaker.
#[test]
fn server_deaths_outside_the_window_do_not_mark_the_store_failed() {
    let mut t = T::running_on_2(1);
    let step = csnap_pools::CONTROLLER_DEATH_WINDOW_MS_DEFAULT / 2 + 1;
    let mut now = step;
    t.c.set_now(now);
    t.state(2, true, 0, 1);
    let mut n = started(&t.agents_got()).unwrap();
    for inc in 2..8 {
        now += step;
        t.c.set_now(now);
        n = serve_then_die(&mut t, n, inc).expect("placed again");
        assert_eq!(t.c.failed_deaths(), 0, "death {inc}");
    }
}

/// The `claim` flag of every `StartHere` in `bytes`.
fn start_here_claims(bytes: &[u8]) -> Vec<bool> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let h = proto::peek_header(&bytes[at..]).unwrap().unwrap();
        let n = h.length as usize;
        if let (_, Msg::StartHere { claim, .. }) = proto::decode(&bytes[at..at + n]).unwrap() {
            v.push(claim);
        }
        at += n;
    }
    v
}

/// What the agent of `node` got, raw, consumed; the claims of its
/// `StartHere` messages.
fn claims_to(t: &mut T, node: u32) -> Vec<bool> {
    let c = t.agents[&node];
    let b = t.c.output(c).to_vec();
    t.c.consume_output(c, b.len());
    start_here_claims(&b)
}

/// A start claims the store (ARCHITECTURE 5.5) exactly when the server it
/// replaces may still run: the controller's first start (it knows of no
/// death), and a start after the serving node was lost (its agent gone, so
/// nobody saw the server die). After a death the server's own agent
/// reported, the start goes straight to reading the store.
#[test]
fn a_start_claims_the_store_unless_the_former_server_was_seen_to_die() {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3]);
    for n in [1, 2, 3] {
        t.state(n, true, 0, 0);
    }
    t.want(1, 0);
    let first = t.c.placement_node().expect("a start is placed");
    assert_eq!(
        claims_to(&mut t, first),
        vec![true],
        "the first start claims"
    );
    t.drain();
    t.up(first, 1);
    t.state(first, false, 1, 0);
    t.drain();
    // Its agent sees it die (the link closed): no claim.
    t.state(first, true, 0, 1);
    let second = t.c.placement_node().expect("a failover start");
    assert_eq!(
        claims_to(&mut t, second),
        vec![false],
        "a seen death needs no claim"
    );
    t.drain();
    t.up(second, 2);
    t.state(second, false, 2, 0);
    t.drain();
    // Its whole node is lost (the agent's connection drops): claim.
    let c = t.agents[&second];
    t.c.handle_disconnect(c);
    t.agents.remove(&second);
    let third = t.c.placement_node().expect("a start after the node loss");
    assert_ne!(third, second);
    assert_eq!(
        claims_to(&mut t, third),
        vec![true],
        "a lost node's server may still run"
    );
}

/// A restarted controller's crash-loop breaker starts from what the agents
/// report (`AgentState.recent_deaths`: their own servers' deaths within the
/// window), once per node: two deaths before the restart and one after
/// mark the store failed; a node's later reports (a bus reconnect to the
/// same controller) are not counted again.
#[test]
fn the_breaker_survives_a_controller_restart_through_the_agents_counts() {
    let mut t = T::with_nodes(Policy::Auto, &[1, 2, 3]);
    t.c.set_now(50_000);
    let report = |t: &mut T, node: u32, deaths: u16, died: u64| {
        let c = t.agents[&node];
        t.send(
            c,
            0,
            &Msg::AgentState {
                node_id: node,
                standby_ready: true,
                recent_deaths: deaths,
                serving_incarnation: 0,
                died_incarnation: died,
            },
        );
    };
    // Node 2's servers died twice before this controller started, node 3's
    // once; reported again and again, they count once.
    report(&mut t, 2, 1, 0);
    report(&mut t, 3, 1, 0);
    report(&mut t, 2, 1, 0);
    report(&mut t, 3, 1, 0);
    assert_eq!(t.c.failed_deaths(), 0, "two deaths, once each");
    t.drain();
    // Node 1's two: the third trips the breaker (the count it tripped at
    // is what status shows).
    report(&mut t, 1, 2, 0);
    assert_eq!(t.c.failed_deaths(), 3);
    t.want(1, 0);
    assert_eq!(started(&t.agents_got()), None, "nothing placed");
    let tool = t.hello(Role::Control);
    t.send(tool, 7, &Msg::ClusterStatus);
    let r = t.out(tool);
    assert!(matches!(r[..], [(7, M::Status { failed: 3, .. })]), "{r:?}");
}
