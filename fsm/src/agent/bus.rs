//! The agent's side of the membership bus: members, gathers for a start,
//! the start itself, fencing, the state reports.

use super::*;

/// The volume clients registered on this agent's socket (node `me`).
fn own_clients(
    conns: &ConnTable<AgentConnState>,
    me: u32,
) -> impl Iterator<Item = ClientEntry> + '_ {
    conns.iter().filter_map(move |c| match c.role {
        AgentConnState::Client {
            client_id,
            volume: Some(_),
            ..
        } => Some(ClientEntry {
            client_id,
            node_id: me,
        }),
        _ => None,
    })
}

/// Which list of its own clients an agent sends.
#[derive(Debug, Clone, Copy)]
enum OwnList {
    /// The answer to gather `gather_id` of node `to` (`Clients`).
    Answer { gather_id: u64, to: u32 },
    /// The complete list after the relist grace (`ClientsOf`).
    Complete,
}

impl AgentFsm {
    // -- the bus (membership and resource management) -------------------------

    /// The bus link is up: the agent joins and reports its state.
    pub fn handle_bus_connected(&mut self) {
        self.bus.clear();
        self.bus_up = true;
        self.want_sent_for = None;
        // A new link may reach a restarted backend whose epochs start over.
        self.members_epoch = 0;
        // What it knew of another node's server may be stale (that server
        // may have died while the link was down, and a restarted backend
        // never heard of it): forgotten. The backend says `ServerUp` on the
        // join if it knows a running one; if not, clients waiting make it
        // place one.
        if self
            .cluster_server
            .is_some_and(|k| k.node_id != self.cfg.node_id)
        {
            self.cluster_server = None;
        }
        self.bus_send(&Msg::Hello {
            version_min: proto::PROTOCOL_VERSION,
            version_max: proto::PROTOCOL_VERSION,
            role: Role::Agent,
        });
        let addr = self.cfg.agent_addr;
        self.bus_send(&Msg::Join {
            node_id: self.cfg.node_id,
            addr: addr.as_str(),
        });
        self.report_state(0);
        if self.relist == Relist::ListDue {
            self.send_clients_of();
        }
        if let Some(s) = self.local.serving() {
            self.bus_send(&Msg::ServerUp {
                incarnation: s.incarnation,
                node_id: self.cfg.node_id,
                addr: s.addr.as_str(),
            });
        }
        // Clients that wait for a server keep waiting for one.
        let mut failed = None;
        for c in &self.conns {
            if let AgentConnState::Client {
                pending: Some(p), ..
            } = c.role
            {
                failed = Some(failed.map_or(p.failed, |f: u64| f.max(p.failed)));
            }
        }
        if let Some(f) = failed {
            self.want_server(f);
        }
        self.assert_invariants();
    }

    /// The bus link broke. What the agent knows stays; it rejoins when the
    /// link is back.
    pub fn handle_bus_disconnected(&mut self) {
        self.bus_up = false;
        self.bus.clear();
        // A gather under way is abandoned: the controller counts the start
        // failed once the node is lost, and places the server anew; a
        // gather finished later from old answers would miss the clients
        // registered meanwhile.
        self.abandon_gather();
        self.assert_invariants();
    }

    /// Bytes to write to the bus.
    pub fn bus_output(&self) -> &[u8] {
        self.bus.pending()
    }

    /// `n` bytes of `bus_output` were written.
    pub fn consume_bus_output(&mut self, n: usize) {
        self.bus.consume(n);
    }

    /// A frame from the bus. Anything it cannot use is logged and ignored:
    /// the membership backend is trusted, but a bad frame must not stop the
    /// agent serving its clients.
    pub fn handle_bus_frame(&mut self, frame: &[u8]) {
        match proto::decode(frame) {
            Ok((_, msg)) => self.on_bus_msg(&msg),
            Err(e) => self.log(AgentEvent::BusError {
                code: Some(e.code()),
            }),
        }
        self.assert_invariants();
    }

    pub(super) fn on_bus_msg(&mut self, msg: &Msg<'_>) {
        match msg {
            Msg::HelloOk { .. } => {}
            Msg::Members { epoch, members } => {
                if *epoch < self.members_epoch {
                    return;
                }
                self.members_epoch = *epoch;
                // A node that joins (or comes back) while a gather runs was
                // not asked for its clients: it is waited for, and asked.
                let me = self.cfg.node_id;
                let mut ask_again = false;
                let gathering = self.gathering();
                let g = &mut self.gather;
                if gathering.is_some() {
                    for n in members.iter() {
                        if n.id != me
                            && !self.members.contains(&n.id)
                            && !g.waiting.contains(&n.id)
                            && g.waiting.len() < g.waiting.capacity()
                        {
                            g.waiting.push(n.id);
                            ask_again = true;
                        }
                    }
                }
                self.members.clear();
                for n in members.iter() {
                    if self.members.len() < self.members.capacity() {
                        self.members.push(n.id);
                    }
                }
                self.membership_known = true;
                self.member = self.members.contains(&self.cfg.node_id);
                if self.member && self.fenced {
                    self.fenced = false;
                    // The controller last heard "no standby" (fenced): its
                    // standby can be started again.
                    self.report_state(0);
                }
                self.push_membership();
                if let Some(attempt) = self.gathering() {
                    let members = &self.members;
                    self.gather.waiting.retain(|n| members.contains(n));
                    if ask_again {
                        self.bus_send(&Msg::NeedClients {
                            gather_id: attempt,
                            starter: me,
                        });
                    }
                }
                self.maybe_finish_gather();
            }
            Msg::StartHere { attempt, claim, .. } => self.on_start_here(*attempt, *claim),
            Msg::NeedClients { gather_id, starter } => {
                if *starter != self.cfg.node_id {
                    self.answer_need_clients(*gather_id, *starter);
                }
            }
            Msg::Clients {
                gather_id,
                from,
                to,
                clients,
            } => {
                if *to != self.cfg.node_id {
                    return;
                }
                if self.gathering() != Some(*gather_id) {
                    return;
                }
                let g = &mut self.gather;
                let Some(at) = g.waiting.iter().position(|n| n == from) else {
                    return;
                };
                g.waiting.swap_remove(at);
                for c in clients.iter() {
                    if g.expected.iter().any(|e| e.client_id == c.client_id) {
                        continue;
                    }
                    if g.expected.len() < g.expected.capacity() {
                        g.expected.push(c);
                    } else {
                        g.overflow = true;
                    }
                }
                self.maybe_finish_gather();
            }
            Msg::ServerUp {
                incarnation,
                node_id,
                addr,
            } => {
                let Some(a) = AddrBuf::new(addr) else { return };
                self.highest_incarnation = self.highest_incarnation.max(*incarnation);
                if let GatherPhase::Collecting { floor, .. } = self.gather.phase {
                    if *node_id != self.cfg.node_id && *incarnation > floor {
                        // A server newer than any known when the gather
                        // began serves elsewhere: the controller placed it,
                        // so this gather is stale; finishing it would start
                        // a second.
                        self.abandon_gather();
                        self.report_state(0);
                    }
                }
                // A server on this node is this agent's own, and exits when
                // its link to the agent closes: one this agent does not
                // serve is gone (its death seen already, or it died with an
                // earlier agent process), and an echo of its announcement
                // must not make it the known server again.
                let gone_here = *node_id == self.cfg.node_id
                    && self.local.serving().map(|s| s.incarnation) != Some(*incarnation);
                if !gone_here
                    && self
                        .cluster_server
                        .is_none_or(|s| s.incarnation <= *incarnation)
                {
                    self.cluster_server = Some(KnownServer {
                        incarnation: *incarnation,
                        node_id: *node_id,
                        addr: a,
                    });
                    self.want_sent_for = None;
                }
                if *node_id != self.cfg.node_id {
                    for i in 0..self.gone.len() {
                        let client_id = self.gone[i];
                        self.bus_send(&Msg::ClientGone {
                            client_id,
                            node_id: self.cfg.node_id,
                        });
                    }
                }
                if let Some(s) = self.local.serving() {
                    if s.incarnation < *incarnation {
                        // Split brain avoided: ours is older. Closing the
                        // link makes the server exit at once.
                        self.local_to(LocalServer::Idle);
                        self.close(s.conn);
                        self.log(AgentEvent::StaleServerStopped {
                            incarnation: s.incarnation,
                        });
                        self.report_state(s.incarnation);
                    }
                }
                self.answer_pending();
            }
            Msg::ServerDown { incarnation, .. } => {
                if self
                    .cluster_server
                    .is_some_and(|s| s.incarnation == *incarnation)
                {
                    self.cluster_server = None;
                }
            }
            Msg::Fence { reason } => self.on_fence(*reason),
            Msg::ClientsOf { node_id, clients } => self.on_clients_of(*node_id, *clients),
            Msg::ClientGone { client_id, node_id } => {
                // This node's own clients were handled when they went.
                if *node_id != self.cfg.node_id {
                    self.client_gone(*client_id, *node_id);
                }
            }
            Msg::Error { code, .. } => self.log(AgentEvent::BusError { code: Some(*code) }),
            _ => self.log(AgentEvent::BusError { code: None }),
        }
    }

    /// A snapshot client is gone: a start under way does not wait for it;
    /// a standby told to start learns it once it serves (it reads its link
    /// after the start).
    pub(super) fn client_gone(&mut self, client_id: u64, node_id: u32) {
        if self.gathering().is_some() {
            self.gather
                .expected
                .retain(|e| !(e.client_id == client_id && e.node_id == node_id));
        }
        if let Some(conn) = self.local_link() {
            self.send(conn, 0, &Msg::ClientGone { client_id, node_id });
        }
    }

    /// The link of the server this agent serves or starts, if any: what a
    /// client's fate is told to (its barrier may wait for that client).
    fn local_link(&self) -> Option<AgentConnId> {
        self.local
            .serving()
            .map(|s| s.conn)
            .or(self.local.starting().map(|s| s.0))
    }

    pub(super) fn on_start_here(&mut self, attempt: u64, claim: bool) {
        if let Some(s) = self.local.serving() {
            // Already serving: say so again.
            self.bus_send(&Msg::ServerUp {
                incarnation: s.incarnation,
                node_id: self.cfg.node_id,
                addr: s.addr.as_str(),
            });
            return;
        }
        if self.local.starting().is_some() || self.gathering() == Some(attempt) {
            return;
        }
        // A gather for another attempt is stale: the controller gave up on
        // it (a start timeout) and asks again; finishing it later would
        // start a server the controller no longer expects.
        self.abandon_gather();
        if self.standby.ready().is_none() || self.fenced || !self.listed() {
            // Cannot start: the controller sees `standby: false` and picks
            // another node.
            self.report_state(0);
            return;
        }
        let me = self.cfg.node_id;
        self.gather_to(GatherPhase::Collecting {
            attempt,
            claim,
            floor: self.highest_incarnation,
        });
        {
            let g = &mut self.gather;
            for &n in &self.members {
                if n != me && g.waiting.len() < g.waiting.capacity() {
                    g.waiting.push(n);
                }
            }
        }
        let waiting = u32::try_from(self.gather.waiting.len()).unwrap_or(u32::MAX);
        self.log(AgentEvent::Gathering { attempt, waiting });
        self.bus_send(&Msg::NeedClients {
            gather_id: attempt,
            starter: me,
        });
        self.maybe_finish_gather();
    }

    /// Every volume client connected to this agent, complete, to the bus
    /// (`ClientsOf`); sent once, after the relist grace.
    pub(super) fn send_clients_of(&mut self) {
        if self.send_own_clients(OwnList::Complete) {
            self.relist = Relist::Done;
        }
    }

    /// The volume clients connected to this agent to the bus, as `what`
    /// says; whether it was queued (a bus that does not take it is
    /// dropped: the agent rejoins and says it again).
    fn send_own_clients(&mut self, what: OwnList) -> bool {
        if !self.bus_up {
            return false;
        }
        let me = self.cfg.node_id;
        let mut scratch = core::mem::take(&mut self.scratch);
        let mut sent = false;
        if let Ok(mut b) = proto::ClientListBuilder::new(&mut scratch[..]) {
            for e in own_clients(&self.conns, me) {
                // Every connection fits: AGENT_CONNS_MAX <= CLIENT_ENTRIES_MAX.
                assert!(b.push(e).is_ok());
            }
            let clients = b.finish();
            let msg = match what {
                OwnList::Answer { gather_id, to } => Msg::Clients {
                    gather_id,
                    from: me,
                    to,
                    clients,
                },
                OwnList::Complete => Msg::ClientsOf {
                    node_id: me,
                    clients,
                },
            };
            sent = self.bus.push_msg(0, 0, &msg);
            if !sent {
                self.bus_overflow();
            }
        }
        self.scratch = scratch;
        sent
    }

    /// Another node's complete client list: a gather under way stops
    /// waiting for that node's clients it does not list, and the server
    /// this agent runs or starts learns it.
    fn on_clients_of(&mut self, node: u32, clients: proto::ClientList<'_>) {
        if node == self.cfg.node_id {
            return;
        }
        let listed = |id: u64| {
            clients
                .iter()
                .any(|c| c.client_id == id && c.node_id == node)
        };
        if self.gathering().is_some() {
            self.gather
                .expected
                .retain(|e| e.node_id != node || listed(e.client_id));
        }
        if let Some(conn) = self.local_link() {
            self.send(
                conn,
                0,
                &Msg::ClientsOf {
                    node_id: node,
                    clients,
                },
            );
        }
    }

    pub(super) fn send_clients(&mut self, gather_id: u64, to: u32) {
        self.send_own_clients(OwnList::Answer { gather_id, to });
    }

    /// This node's own clients, as they are now, into the gather (it may
    /// have waited long for the others: a client that came meanwhile holds
    /// locks the new server must wait for).
    fn gather_own_clients(&mut self) {
        let g = &mut self.gather;
        for e in own_clients(&self.conns, self.cfg.node_id) {
            if g.expected.contains(&e) {
                continue;
            }
            if g.expected.len() < g.expected.capacity() {
                g.expected.push(e);
            } else {
                g.overflow = true;
            }
        }
    }

    /// Another node's gather asks for this node's clients: answered now, or
    /// once the clients had the time to reconnect to a (re)started agent
    /// (one answer owed per starter: a newer gather replaces the older).
    fn answer_need_clients(&mut self, gather_id: u64, starter: u32) {
        if self.listed() {
            self.send_clients(gather_id, starter);
            return;
        }
        self.owed.retain(|o| o.1 != starter);
        if self.owed.len() < self.owed.capacity() {
            self.owed.push((gather_id, starter));
        }
    }

    pub(super) fn maybe_finish_gather(&mut self) {
        let GatherPhase::Collecting { attempt, claim, .. } = self.gather.phase else {
            return;
        };
        if !self.gather.waiting.is_empty() {
            return;
        }
        let Some(conn) = self.standby.ready() else {
            self.gather_to(GatherPhase::Idle);
            return;
        };
        self.gather_own_clients();
        let g = &self.gather;
        if g.overflow || g.expected.len() > EXPECTED_MAX {
            self.gather_to(GatherPhase::Idle);
            self.log(AgentEvent::TooManyExpected);
            self.report_state(0);
            return;
        }
        let expected_n = u32::try_from(g.expected.len()).unwrap_or(u32::MAX);
        // Build the two lists, then the frame.
        let mut nodes = core::mem::take(&mut self.scratch2);
        let mut clients = core::mem::take(&mut self.scratch);
        let sent = {
            let (Ok(mut nb), Ok(mut cb)) = (
                proto::NodeListBuilder::new(&mut nodes[..]),
                proto::ClientListBuilder::new(&mut clients[..]),
            ) else {
                self.scratch = clients;
                self.scratch2 = nodes;
                return;
            };
            for &n in &self.members {
                // `members` holds at most NODES_MAX (a decoded list).
                assert!(nb.push(Node { id: n }).is_ok());
            }
            for &e in &self.gather.expected {
                // At most EXPECTED_MAX (checked above), the list's capacity.
                assert!(cb.push(e).is_ok(), "the client list holds EXPECTED_MAX");
            }
            let msg = Msg::StartServer {
                claim,
                members: nb.finish(),
                expected: cb.finish(),
            };
            self.conns.push_msg(conn, 0, 0, &msg)
        };
        self.scratch = clients;
        self.scratch2 = nodes;
        self.gather_to(GatherPhase::Idle);
        self.standby_to(StandbySlot::Idle);
        // What the server is told; changes from now on reach it once it
        // serves (`on_serving`).
        self.pushed.clear();
        self.pushed.extend_from_slice(&self.members);
        if !sent {
            self.close(conn);
            self.schedule_spawn(self.cfg.respawn_backoff_ms);
            return;
        }
        self.local_to(LocalServer::Starting { conn, attempt });
        self.log(AgentEvent::Starting {
            attempt,
            expected: expected_n,
        });
    }

    /// Tells the local serving server who joined and left since it was last
    /// told.
    pub(super) fn push_membership(&mut self) {
        let Some(s) = self.local.serving() else {
            return;
        };
        let mut i = 0;
        while i < self.pushed.len() {
            let n = self.pushed[i];
            if self.members.contains(&n) {
                i += 1;
            } else {
                self.pushed.swap_remove(i);
                self.send(s.conn, 0, &Msg::NodeLeft { node_id: n });
            }
        }
        for k in 0..self.members.len() {
            let n = self.members[k];
            if !self.pushed.contains(&n) && self.pushed.len() < self.pushed.capacity() {
                self.pushed.push(n);
                self.send(s.conn, 0, &Msg::NodeJoined { node_id: n });
            }
        }
    }

    pub(super) fn on_fence(&mut self, reason: FenceReason) {
        self.log(AgentEvent::Fenced { reason });
        if let Some(s) = self.local.serving() {
            self.local_to(LocalServer::Idle);
            self.close(s.conn);
            if self
                .cluster_server
                .is_some_and(|k| k.incarnation == s.incarnation)
            {
                self.cluster_server = None;
            }
            self.report_state(s.incarnation);
        }
        if let Some((conn, attempt)) = self.local.starting() {
            self.local_to(LocalServer::Idle);
            self.close(conn);
            self.log(AgentEvent::StartFailed { attempt });
            self.schedule_spawn(self.cfg.respawn_backoff_ms);
        }
        if self.gathering().is_some() {
            self.gather_to(GatherPhase::Idle);
        }
        if reason == FenceReason::LeftCluster {
            self.fenced = true;
            self.member = false;
            self.refuse_pending("this node left the cluster (fenced); no server is given out here");
        }
        self.report_state(0);
    }

    pub(super) fn report_state(&mut self, died: u64) {
        let standby_ready = self.standby_free() && !self.fenced;
        self.bus_send(&Msg::AgentState {
            node_id: self.cfg.node_id,
            standby_ready,
            recent_deaths: self.recent_deaths(),
            serving_incarnation: self.local.serving().map_or(0, |s| s.incarnation),
            died_incarnation: died,
        });
    }

    pub(super) fn bus_send(&mut self, msg: &Msg<'_>) {
        if !self.bus_up {
            return;
        }
        if !self.bus.push_msg(0, 0, msg) {
            self.bus_overflow();
        }
    }

    pub(super) fn bus_overflow(&mut self) {
        // The backend stopped reading: drop what is queued; the driver sees
        // `bus_stalled` and reconnects (a rejoin resends the state).
        self.bus.clear();
        self.bus_up = false;
    }

    /// Whether the bus output overflowed and the link must be re-made.
    pub fn bus_stalled(&self) -> bool {
        !self.bus_up
    }
}
