//! The links of an NBD connection: its agent connection (asking for a
//! server) and its server connection (the volume engine's frames), with the
//! failover retry state.

use super::*;

/// What a link carries: a volume engine or the control connection's FSM.
pub(super) trait Peer {
    fn transmit(&self) -> &[u8];
    fn consume_transmit(&mut self, n: usize);
    fn handle_connect(&mut self);
    fn handle_disconnect(&mut self);
    fn incarnation(&self) -> u64;
    fn ready_to_reconnect(&self) -> bool;
    fn tx_overflowed(&self) -> bool;
}

impl Peer for VolumeEngine {
    fn transmit(&self) -> &[u8] {
        VolumeEngine::transmit(self)
    }
    fn consume_transmit(&mut self, n: usize) {
        VolumeEngine::consume_transmit(self, n);
    }
    fn handle_connect(&mut self) {
        VolumeEngine::handle_connect(self);
    }
    fn handle_disconnect(&mut self) {
        VolumeEngine::handle_disconnect(self);
    }
    fn incarnation(&self) -> u64 {
        self.client().incarnation()
    }
    fn ready_to_reconnect(&self) -> bool {
        VolumeEngine::ready_to_reconnect(self)
    }
    fn tx_overflowed(&self) -> bool {
        self.client().tx_overflowed()
    }
}

impl Peer for ClientFsm {
    fn transmit(&self) -> &[u8] {
        ClientFsm::transmit(self)
    }
    fn consume_transmit(&mut self, n: usize) {
        ClientFsm::consume_transmit(self, n);
    }
    fn handle_connect(&mut self) {
        ClientFsm::handle_connect(self);
    }
    fn handle_disconnect(&mut self) {
        ClientFsm::handle_disconnect(self);
    }
    fn incarnation(&self) -> u64 {
        ClientFsm::incarnation(self)
    }
    fn ready_to_reconnect(&self) -> bool {
        true
    }
    fn tx_overflowed(&self) -> bool {
        ClientFsm::tx_overflowed(self)
    }
}

/// What a server frame means for its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The connection is good.
    Keep,
    /// Make a new one (through the agent).
    Reconnect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AgentSt {
    /// No agent connection.
    Down,
    /// `Hello` sent.
    HelloSent,
    /// Idle.
    Up,
    /// `NeedServer` with this request id sent; `announce`: only to be known
    /// to the agent again (the server connection is up).
    Asking { rid: u64, announce: bool },
}

/// A client's agent link and server connection, with the failover retry
/// state. Reserved once; `start` and `close` reuse it.
pub(super) struct Link {
    pub(super) client_id: u64,
    pub(super) node_id: u32,
    pub(super) volume: Option<Volume>,
    pub(super) tok_agent: Token,
    pub(super) tok_server: Token,
    pub(super) agent: Option<mio::net::UnixStream>,
    pub(super) agent_st: AgentSt,
    pub(super) agent_rd: FrameReader<Box<[u8]>>,
    pub(super) agent_readable: bool,
    pub(super) agent_out: [u8; AGENT_OUT],
    pub(super) agent_out_len: usize,
    pub(super) next_rid: u64,
    pub(super) server: Option<MioStream>,
    pub(super) server_connecting: bool,
    pub(super) server_rd: FrameReader<Box<[u8]>>,
    pub(super) server_readable: bool,
    pub(super) server_writable: bool,
    /// A (new) server connection is wanted until the peer is ready.
    pub(super) want: bool,
    /// The incarnation that failed us (for `NeedServer`).
    pub(super) failed: u64,
    /// The agent's answer, not yet connected to: address, incarnation.
    pub(super) addr: Option<(AddrBuf, u64)>,
    /// The incarnation the agent named for the connection made last.
    pub(super) addr_incarnation: u64,
    pub(super) retry_at_ms: u64,
    pub(super) backoff_ms: u64,
    /// Since when the peer has not been ready (attach or failover).
    pub(super) down_since_ms: Option<u64>,
    /// The agent link was re-made while the server connection stayed up:
    /// tell the agent about this client again.
    pub(super) reannounce: bool,
}

impl Link {
    pub(super) fn new(tok_agent: Token, tok_server: Token) -> Link {
        Link {
            client_id: 0,
            node_id: 0,
            volume: None,
            tok_agent,
            tok_server,
            agent: None,
            agent_st: AgentSt::Down,
            agent_rd: FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice()),
            agent_readable: false,
            agent_out: [0; AGENT_OUT],
            agent_out_len: 0,
            next_rid: 1,
            server: None,
            server_connecting: false,
            server_rd: FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice()),
            server_readable: false,
            server_writable: false,
            want: false,
            failed: 0,
            addr: None,
            addr_incarnation: 0,
            retry_at_ms: 0,
            backoff_ms: csnap_pools::CLIENT_RETRY_MIN_MS,
            down_since_ms: None,
            reannounce: false,
        }
    }

    pub(super) const fn reserved_bytes() -> usize {
        2 * FRAME_MAX_BYTES
    }

    /// Whether the link is in use (connected, or trying).
    pub(super) fn active(&self) -> bool {
        self.want || self.server.is_some() || self.agent.is_some()
    }

    /// Starts attaching: the agent is asked at once.
    pub(super) fn start(&mut self, client_id: u64, node_id: u32, volume: Option<Volume>, now: u64) {
        self.client_id = client_id;
        self.node_id = node_id;
        self.volume = volume;
        self.want = true;
        self.failed = 0;
        self.addr = None;
        self.addr_incarnation = 0;
        self.retry_at_ms = now;
        self.backoff_ms = csnap_pools::CLIENT_RETRY_MIN_MS;
        self.down_since_ms = Some(now);
        self.reannounce = false;
    }

    /// Closes both streams and forgets everything.
    pub(super) fn close(&mut self, reg: &Registry) {
        if let Some(mut s) = self.server.take() {
            let _ = reg.deregister(&mut s);
        }
        if let Some(mut a) = self.agent.take() {
            let _ = reg.deregister(&mut a);
        }
        self.agent_st = AgentSt::Down;
        self.agent_rd.clear();
        self.agent_out_len = 0;
        self.server_rd.clear();
        self.server_connecting = false;
        self.want = false;
        self.addr = None;
        self.down_since_ms = None;
        self.reannounce = false;
    }

    /// The peer is ready: the outage (or attach) is over.
    pub(super) fn on_ready(&mut self) {
        self.want = false;
        self.down_since_ms = None;
        self.backoff_ms = csnap_pools::CLIENT_RETRY_MIN_MS;
    }

    pub(super) fn retry_later(&mut self, now: u64) {
        self.retry_at_ms = now + self.backoff_ms;
        self.backoff_ms = (self.backoff_ms * 2).min(csnap_pools::CLIENT_RETRY_MAX_MS);
    }

    /// The server connection failed (or must be re-made).
    pub(super) fn server_failed<P: Peer>(&mut self, peer: &mut P, reg: &Registry, now: u64) {
        if let Some(mut s) = self.server.take() {
            let _ = reg.deregister(&mut s);
        }
        self.server_rd.clear();
        self.server_connecting = false;
        peer.handle_disconnect();
        self.want = true;
        // The server that failed us, as the handshake or the agent named it
        // (a connection that broke before `HelloOk` still names it).
        self.failed = peer.incarnation().max(self.addr_incarnation);
        self.addr = None;
        self.down_since_ms.get_or_insert(now);
        self.retry_later(now);
    }

    pub(super) fn agent_failed(&mut self, reg: &Registry, now: u64) {
        if let Some(mut a) = self.agent.take() {
            let _ = reg.deregister(&mut a);
        }
        self.agent_st = AgentSt::Down;
        self.agent_rd.clear();
        self.agent_out_len = 0;
        if self.server.is_some() && self.volume.is_some() {
            self.reannounce = true;
        }
        self.retry_later(now);
    }

    pub(super) fn agent_send(&mut self, rid: u64, msg: &Msg<'_>) -> bool {
        let out = self
            .agent_out
            .get_mut(self.agent_out_len..)
            .unwrap_or_default();
        match proto::encode(&proto::Header::new(rid, 0), msg, out) {
            Ok(n) => {
                self.agent_out_len += n;
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn ask(&mut self, failed: u64, announce: bool) {
        let rid = self.next_rid;
        self.next_rid += 1;
        let msg = Msg::NeedServer {
            client_id: self.client_id,
            failed_incarnation: failed,
            node_id: self.node_id,
            volume: self.volume,
        };
        if self.agent_send(rid, &msg) {
            self.agent_st = AgentSt::Asking { rid, announce };
        }
    }

    pub(super) fn connect_agent(&mut self, path: &Path, reg: &Registry, now: u64) -> bool {
        let mut s = match mio::net::UnixStream::connect(path) {
            Ok(s) => s,
            Err(_) => {
                self.retry_later(now);
                return false;
            }
        };
        if reg
            .register(
                &mut s,
                self.tok_agent,
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.retry_later(now);
            return false;
        }
        self.agent = Some(s);
        self.agent_rd.clear();
        self.agent_readable = true;
        self.agent_out_len = 0;
        let role = if self.volume.is_some() {
            Role::Client
        } else {
            Role::Control
        };
        let hello = Msg::Hello {
            version_min: proto::PROTOCOL_VERSION,
            version_max: proto::PROTOCOL_VERSION,
            role,
        };
        if self.agent_send(0, &hello) {
            self.agent_st = AgentSt::HelloSent;
        }
        true
    }

    /// Writes queued agent output and handles the agent's frames.
    pub(super) fn agent_io(&mut self, reg: &Registry, now: u64) -> bool {
        let mut moved = false;
        let Some(a) = self.agent.as_mut() else {
            return false;
        };
        let mut broken = false;
        while self.agent_out_len > 0 {
            match a.write(&self.agent_out[..self.agent_out_len]) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    self.agent_out.copy_within(n..self.agent_out_len, 0);
                    self.agent_out_len -= n;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        while !broken {
            loop {
                let f = match self.agent_rd.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                };
                moved = true;
                let Ok((h, msg)) = proto::decode(f) else {
                    continue;
                };
                match (self.agent_st, msg) {
                    (AgentSt::HelloSent, Msg::HelloOk { .. }) => self.agent_st = AgentSt::Up,
                    (AgentSt::HelloSent, Msg::Error { .. }) => broken = true,
                    (
                        AgentSt::Asking { rid, .. },
                        Msg::ServerAddress {
                            incarnation, addr, ..
                        },
                    ) if h.request_id == rid => {
                        self.agent_st = AgentSt::Up;
                        if self.want && self.server.is_none() && incarnation > 0 {
                            self.addr = AddrBuf::new(addr).map(|a| (a, incarnation));
                            self.retry_at_ms = now;
                        }
                    }
                    (AgentSt::Asking { rid, .. }, Msg::Error { .. }) if h.request_id == rid => {
                        // Fenced node, or a bad request: ask again later.
                        self.agent_st = AgentSt::Up;
                        self.retry_later(now);
                    }
                    _ => {}
                }
                if broken {
                    break;
                }
            }
            if broken || !self.agent_readable {
                break;
            }
            let Some(a) = self.agent.as_mut() else {
                break;
            };
            match a.read(self.agent_rd.spare()) {
                Ok(0) => broken = true,
                Ok(n) => {
                    self.agent_rd.advance(n);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.agent_readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => broken = true,
            }
        }
        if broken {
            self.agent_failed(reg, now);
            moved = true;
        }
        moved
    }

    /// Drives the link: agent questions, connecting, the server stream.
    /// Frames go to `on_frame`. Returns whether anything moved.
    pub(super) fn pump<P: Peer>(
        &mut self,
        peer: &mut P,
        agent_path: &Path,
        reg: &Registry,
        now: u64,
        wake: &mut Option<u64>,
        on_frame: &mut dyn FnMut(&mut P, &[u8]) -> Verdict,
    ) -> bool {
        let mut moved = false;
        if self.agent.is_some() {
            moved |= self.agent_io(reg, now);
        }
        let need_server = self.want && self.server.is_none();
        if need_server || self.reannounce {
            if now >= self.retry_at_ms {
                if need_server && self.addr.is_some() {
                    if peer.ready_to_reconnect() {
                        moved = true;
                        self.connect_server(peer, reg, now);
                    }
                } else if self.agent.is_none() {
                    moved |= self.connect_agent(agent_path, reg, now);
                    if self.agent.is_some() {
                        moved |= self.agent_io(reg, now);
                    }
                } else if self.agent_st == AgentSt::Up {
                    if need_server {
                        self.ask(self.failed, false);
                    } else {
                        self.ask(0, true);
                        self.reannounce = false;
                    }
                    moved = true;
                    moved |= self.agent_io(reg, now);
                }
            }
            // Waiting out a backoff: wake up for it (answers and connects
            // come as events).
            if (self.want && self.server.is_none() || self.reannounce) && self.retry_at_ms > now {
                let at = self.retry_at_ms;
                *wake = Some(wake.map_or(at, |w| w.min(at)));
            }
        }
        if self.server_connecting && self.server_writable {
            // A TCP connect that failed also turns writable: its error
            // comes back from the link's first read or write, which fails
            // the link as any broken link (no getsockopt(SO_ERROR) or
            // getpeername here: the NBD table has neither).
            let ok = self.server.is_some();
            moved = true;
            if ok {
                self.server_connecting = false;
                peer.handle_connect();
            } else {
                self.server_failed(peer, reg, now);
            }
        }
        if self.server.is_some() && !self.server_connecting {
            moved |= self.server_io(peer, reg, now, on_frame);
        }
        moved
    }

    pub(super) fn connect_server<P: Peer>(&mut self, peer: &mut P, reg: &Registry, now: u64) {
        let Some((a, incarnation)) = self.addr.take() else {
            return;
        };
        let (mut s, connecting) = match connect_str(a.as_str()) {
            Ok(x) => x,
            Err(_) => {
                // Dead already: ask the agent for a newer one than this.
                self.failed = self.failed.max(incarnation);
                self.retry_later(now);
                return;
            }
        };
        self.addr_incarnation = incarnation;
        if reg
            .register(
                &mut s,
                self.tok_server,
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.retry_later(now);
            return;
        }
        self.server = Some(s);
        self.server_rd.clear();
        self.server_readable = true;
        self.server_writable = !connecting;
        self.server_connecting = connecting;
        if !connecting {
            peer.handle_connect();
        }
    }

    pub(super) fn server_io<P: Peer>(
        &mut self,
        peer: &mut P,
        reg: &Registry,
        now: u64,
        on_frame: &mut dyn FnMut(&mut P, &[u8]) -> Verdict,
    ) -> bool {
        let mut moved = false;
        let mut broken = false;
        loop {
            // Output first (requests, releases, the handshake).
            while !broken && !peer.transmit().is_empty() {
                let Some(s) = self.server.as_mut() else {
                    break;
                };
                match s.write(peer.transmit()) {
                    Ok(0) => broken = true,
                    Ok(n) => {
                        peer.consume_transmit(n);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.server_writable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => broken = true,
                }
            }
            if broken {
                break;
            }
            let mut handled = false;
            loop {
                let f = match self.server_rd.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                };
                handled = true;
                if on_frame(peer, f) == Verdict::Reconnect || peer.tx_overflowed() {
                    broken = true;
                    break;
                }
            }
            if broken {
                break;
            }
            if handled {
                moved = true;
                continue;
            }
            if !self.server_readable {
                break;
            }
            let Some(s) = self.server.as_mut() else {
                break;
            };
            match s.read(self.server_rd.spare()) {
                Ok(0) => broken = true,
                Ok(n) => {
                    self.server_rd.advance(n);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.server_readable = false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => broken = true,
            }
        }
        if broken {
            self.server_failed(peer, reg, now);
            moved = true;
        }
        moved
    }

    /// Best-effort write of the peer's output before closing.
    pub(super) fn flush_best_effort<P: Peer>(&mut self, peer: &mut P) {
        if self.server_connecting {
            return;
        }
        let Some(s) = self.server.as_mut() else {
            return;
        };
        for _ in 0..csnap_pools::NBD_FLUSH_WRITES_MAX {
            if peer.transmit().is_empty() {
                break;
            }
            match s.write(peer.transmit()) {
                Ok(n) if n > 0 => peer.consume_transmit(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => break,
            }
        }
    }

    pub(super) fn on_event(&mut self, token: Token, readable: bool, writable: bool) {
        if token == self.tok_agent {
            self.agent_readable |= readable;
        } else if token == self.tok_server {
            self.server_readable |= readable;
            self.server_writable |= writable;
        }
    }
}

/// Connects to a server address as the agent gives it: a unix path, or a
/// numeric `host:port` (no name resolution, no allocation). Returns the
/// stream and whether the connect is still in progress.
pub(super) fn connect_str(a: &str) -> io::Result<(MioStream, bool)> {
    if a.contains('/') || !a.contains(':') {
        let s = mio::net::UnixStream::connect(Path::new(a))?;
        return Ok((MioStream::Unix(s), false));
    }
    let sa: SocketAddr = a
        .parse()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let s = mio::net::TcpStream::connect(sa)?;
    let _ = s.set_nodelay(true);
    Ok((MioStream::Tcp(s), true))
}
