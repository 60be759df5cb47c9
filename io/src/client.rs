//! Blocking clients over the `ClientFsm`: a control connection (snapshot
//! management, status) and a volume (the block device: origin or one
//! snapshot), which does its data I/O on the shared origin and store devices
//! itself and asks the server only for metadata.
//!
//! A volume reads and writes at any byte offset and length: requests are split
//! at chunk boundaries into queries of at most `CHUNKS_PER_REQUEST_MAX` chunks.
//! - origin read: straight from the origin device;
//! - origin write: `QueryOriginWrite` (the server copies out what snapshots
//!   need and waits for read locks), then the write;
//! - snapshot read: `QuerySnapshotRead`, then each run from the store or (under
//!   a read lock) the origin, then `FinishSnapshotRead` for the origin runs;
//! - snapshot write: `QuerySnapshotWrite` (chunks of its own), then the write
//!   into the store;
//! - flush: fdatasync of both devices.

use csnap_store::disk::{Disk, DiskError, FileDisk};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csnap_fsm::client::{ClientConfig, ClientEvent, ClientFsm, ClientState, Request};
use csnap_pools::CHUNKS_PER_REQUEST_MAX;
use csnap_proto::{self as proto, ErrorCode, FrameReader, Msg, Range, Role, TargetKind, Volume};

use crate::net::{Addr, BlockingStream};

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// A socket or device error.
    Io(io::Error),
    /// The server answered with an error.
    Server {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
    /// The server sent something that makes no sense here.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Server { code, text } => {
                write!(
                    f,
                    "server refused: {text} ({}, code {})",
                    code.name(),
                    code.code()
                )
            }
            ClientError::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}

/// Where a connection finds its server.
#[derive(Debug)]
enum Source {
    /// A fixed address: a broken connection is an error.
    Fixed,
    /// The node's agent: a broken connection, a stale incarnation or a
    /// fenced server means asking the agent again (failover).
    Agent(AgentClient),
}

/// What a server address request returned.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// The server's address.
    pub addr: Addr,
    /// Its incarnation.
    pub incarnation: u64,
    /// The node it runs on.
    pub node_id: u32,
}

/// A client's link to its node's agent: it asks for the serving server's
/// address (`NeedServer`), and stays open for the client's lifetime, which
/// is how the agent knows the client is alive (its snapshot clients are the
/// ones a new incarnation waits for). Blocking.
#[derive(Debug)]
pub struct AgentClient {
    socket: PathBuf,
    stream: Option<std::os::unix::net::UnixStream>,
    reader: FrameReader<Box<[u8]>>,
    frame: Vec<u8>,
    next_rid: u64,
    client_id: u64,
    node_id: u32,
    volume: Option<Volume>,
}

impl AgentClient {
    /// A link to the agent at `socket` for a client (`volume` Some) or a
    /// control tool (`volume` None). Connects lazily.
    pub fn new(socket: &Path, client_id: u64, node_id: u32, volume: Option<Volume>) -> AgentClient {
        AgentClient {
            socket: socket.to_path_buf(),
            stream: None,
            reader: FrameReader::new(vec![0u8; proto::FRAME_MAX_BYTES].into_boxed_slice()),
            frame: vec![0u8; proto::FRAME_MAX_BYTES],
            next_rid: 1,
            client_id,
            node_id,
            volume,
        }
    }

    fn send(&mut self, rid: u64, msg: &Msg<'_>) -> Result<(), ClientError> {
        let n = proto::encode(&proto::Header::new(rid, 0), msg, &mut self.frame)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let s = self
            .stream
            .as_mut()
            .ok_or_else(|| ClientError::Io(io::ErrorKind::NotConnected.into()))?;
        s.write_all(&self.frame[..n])?;
        Ok(())
    }

    /// Reads the next frame into `self.frame`; returns its length.
    fn recv(&mut self, deadline: Instant) -> Result<usize, ClientError> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => {
                    let n = f.len();
                    self.frame[..n].copy_from_slice(f);
                    return Ok(n);
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Io(io::ErrorKind::TimedOut.into()));
            }
            let s = self
                .stream
                .as_mut()
                .ok_or_else(|| ClientError::Io(io::ErrorKind::NotConnected.into()))?;
            s.set_read_timeout(Some(left))?;
            let n = match s.read(self.reader.spare()) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Io(io::ErrorKind::TimedOut.into()))
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection",
                )));
            }
            self.reader.advance(n);
        }
    }

    fn ensure_connected(&mut self, deadline: Instant) -> Result<(), ClientError> {
        if self.stream.is_some() {
            return Ok(());
        }
        let s = std::os::unix::net::UnixStream::connect(&self.socket).map_err(|e| {
            ClientError::Io(io::Error::new(
                e.kind(),
                format!("cannot reach the agent at {}: {e}", self.socket.display()),
            ))
        })?;
        self.stream = Some(s);
        self.reader.clear();
        let role = if self.volume.is_some() {
            Role::Client
        } else {
            Role::Control
        };
        self.send(
            0,
            &Msg::Hello {
                version_min: proto::PROTOCOL_VERSION,
                version_max: proto::PROTOCOL_VERSION,
                role,
            },
        )?;
        let n = self.recv(deadline)?;
        match proto::decode(&self.frame[..n]) {
            Ok((_, Msg::HelloOk { .. })) => Ok(()),
            Ok((_, Msg::Error { code, text, .. })) => Err(ClientError::Server {
                code,
                text: text.to_string(),
            }),
            _ => Err(ClientError::Protocol(
                "the agent did not answer Hello".into(),
            )),
        }
    }

    /// Asks for a serving server newer than `failed` (0: any), retrying the
    /// agent link until `deadline`. An error the agent answers (this node
    /// was fenced, a bad request) is returned at once.
    pub fn need_server(
        &mut self,
        failed: u64,
        deadline: Instant,
    ) -> Result<ServerInfo, ClientError> {
        let mut pause = Duration::from_millis(csnap_pools::CLIENT_RETRY_MIN_MS);
        loop {
            match self.try_need_server(failed, deadline) {
                Ok(i) => return Ok(i),
                Err(e @ ClientError::Server { .. }) => return Err(e),
                Err(e) => {
                    self.stream = None;
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(pause);
                    pause =
                        (pause * 2).min(Duration::from_millis(csnap_pools::CLIENT_RETRY_MAX_MS));
                }
            }
        }
    }

    fn try_need_server(
        &mut self,
        failed: u64,
        deadline: Instant,
    ) -> Result<ServerInfo, ClientError> {
        self.ensure_connected(deadline)?;
        let rid = self.next_rid;
        self.next_rid += 1;
        self.send(
            rid,
            &Msg::NeedServer {
                client_id: self.client_id,
                failed_incarnation: failed,
                node_id: self.node_id,
                volume: self.volume,
            },
        )?;
        loop {
            let n = self.recv(deadline)?;
            match proto::decode(&self.frame[..n]) {
                Ok((
                    h,
                    Msg::ServerAddress {
                        incarnation,
                        node_id,
                        addr,
                    },
                )) if h.request_id == rid => {
                    let addr = Addr::parse(addr).map_err(ClientError::Protocol)?;
                    return Ok(ServerInfo {
                        addr,
                        incarnation,
                        node_id,
                    });
                }
                Ok((h, Msg::Error { code, text, .. })) if h.request_id == rid => {
                    return Err(ClientError::Server {
                        code,
                        text: text.to_string(),
                    });
                }
                Ok(_) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
    }
}

/// Asks the agent at `socket` where the server is (a control tool).
pub fn locate(socket: &Path, timeout: Duration) -> Result<ServerInfo, ClientError> {
    let mut a = AgentClient::new(socket, 0, 0, None);
    a.need_server(0, Instant::now() + timeout)
}

/// What `wait_for` saw.
enum Waited {
    /// The reply is in `reply`.
    Reply,
    /// A reply from an older incarnation: this connection is stale.
    Stale,
}

/// A connection to a server.
#[derive(Debug)]
pub struct Connection {
    stream: Option<BlockingStream>,
    reader: FrameReader<Box<[u8]>>,
    fsm: ClientFsm,
    reply: Vec<u8>,
    source: Source,
    failover_timeout: Duration,
    reconnects: u64,
}

impl Connection {
    fn build(cfg: ClientConfig, source: Source, failover_timeout: Duration) -> Connection {
        Connection {
            stream: None,
            reader: FrameReader::new(vec![0u8; proto::FRAME_MAX_BYTES].into_boxed_slice()),
            fsm: ClientFsm::new(cfg),
            reply: Vec::with_capacity(proto::FRAME_MAX_BYTES),
            source,
            failover_timeout,
            reconnects: 0,
        }
    }

    /// Connects and completes the handshake (and identify, for role Client).
    pub fn connect(addr: &Addr, cfg: ClientConfig) -> Result<Connection, ClientError> {
        let mut c = Self::build(cfg, Source::Fixed, Duration::ZERO);
        c.establish(addr)?;
        Ok(c)
    }

    /// Connects through the node's agent: asks it for the server, and from
    /// then on survives failovers (a broken connection, a stale or fenced
    /// server) for up to `failover_timeout` each, re-sending what was
    /// unanswered and re-uploading held read locks.
    pub fn via_agent(
        agent: AgentClient,
        cfg: ClientConfig,
        failover_timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let mut c = Self::build(cfg, Source::Agent(agent), failover_timeout);
        let mut deadline = None;
        c.recover("first connection", &mut deadline)?;
        Ok(c)
    }

    /// The server incarnation seen.
    pub fn incarnation(&self) -> u64 {
        self.fsm.incarnation()
    }

    /// Times this connection re-attached to a server after a failure.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The client state machine.
    pub fn fsm(&self) -> &ClientFsm {
        &self.fsm
    }

    /// Opens a new stream to `addr` and runs the handshake on it with the
    /// same state machine (identify, lock upload, then the unanswered
    /// requests go out again).
    fn establish(&mut self, addr: &Addr) -> Result<(), ClientError> {
        self.stream = None;
        self.fsm.handle_disconnect();
        let stream = BlockingStream::connect(addr)?;
        self.stream = Some(stream);
        self.reader.clear();
        self.fsm.handle_connect();
        loop {
            if let Err(e) = self.flush() {
                // A server that refuses us (too many clients) writes its
                // error and closes; our write may fail first. Read what it
                // said before reporting the broken pipe.
                if let Ok(ClientEvent::Refused(code)) = self.next_event() {
                    return Err(self.refusal(code));
                }
                return Err(e);
            }
            match self.next_event()? {
                ClientEvent::Ready => return Ok(()),
                ClientEvent::Refused(code) => return Err(self.refusal(code)),
                ClientEvent::Stale => {
                    return Err(ClientError::Server {
                        code: ErrorCode::StaleIncarnation,
                        text: "the server is an older incarnation than one already seen".into(),
                    })
                }
                _ => {}
            }
        }
    }

    fn refusal(&self, code: ErrorCode) -> ClientError {
        let text = match proto::decode(&self.reply) {
            Ok((_, Msg::Error { text, .. })) => text.to_string(),
            _ => String::new(),
        };
        ClientError::Server { code, text }
    }

    /// Whether `e` is a failure a failover may cure.
    fn curable(&self, e: &ClientError) -> bool {
        if !matches!(self.source, Source::Agent(_)) {
            return false;
        }
        match e {
            ClientError::Io(_) => true,
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::StaleIncarnation | ErrorCode::TooManyClients | ErrorCode::Recovering
            ),
            ClientError::Protocol(_) => false,
        }
    }

    /// Finds a serving server through the agent and re-attaches, until the
    /// failover deadline (set at the first failure of this episode).
    fn recover(&mut self, why: &str, deadline: &mut Option<Instant>) -> Result<(), ClientError> {
        let timeout = self.failover_timeout;
        let dl = *deadline.get_or_insert_with(|| Instant::now() + timeout);
        self.stream = None;
        self.fsm.handle_disconnect();
        let mut pause = Duration::from_millis(csnap_pools::CLIENT_RETRY_MIN_MS);
        loop {
            let failed = self.fsm.incarnation();
            let Source::Agent(agent) = &mut self.source else {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::NotConnected,
                    why.to_string(),
                )));
            };
            let last = match agent.need_server(failed, dl) {
                Ok(info) => match self.establish(&info.addr) {
                    Ok(()) => {
                        self.reconnects += 1;
                        return Ok(());
                    }
                    Err(e) if self.curable(&e) => e,
                    Err(e) => return Err(e),
                },
                Err(e @ ClientError::Server { .. }) => return Err(e),
                Err(e) => e,
            };
            self.stream = None;
            self.fsm.handle_disconnect();
            if Instant::now() + pause >= dl {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no server reachable within {} ms of the failure ({why}); last error: {last}",
                        timeout.as_millis()
                    ),
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(csnap_pools::CLIENT_RETRY_MAX_MS));
        }
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        while !self.fsm.transmit().is_empty() {
            let s = self
                .stream
                .as_mut()
                .ok_or_else(|| ClientError::Io(io::ErrorKind::NotConnected.into()))?;
            let n = s.write(self.fsm.transmit())?;
            if n == 0 {
                return Err(ClientError::Io(io::ErrorKind::WriteZero.into()));
            }
            self.fsm.consume_transmit(n);
        }
        Ok(())
    }

    /// Reads the next frame into `self.reply` and feeds it to the FSM.
    fn next_event(&mut self) -> Result<ClientEvent, ClientError> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => {
                    self.reply.clear();
                    self.reply.extend_from_slice(f);
                    return Ok(self.fsm.handle_frame(&self.reply));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            let s = self
                .stream
                .as_mut()
                .ok_or_else(|| ClientError::Io(io::ErrorKind::NotConnected.into()))?;
            let n = s.read(self.reader.spare())?;
            if n == 0 {
                self.fsm.handle_disconnect();
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
            self.reader.advance(n);
        }
    }

    /// Sends what is queued and waits for the reply to `id`; `at_server`
    /// is set once `id` has gone out on this connection (a failure after
    /// that found the request at the server).
    fn wait_for(&mut self, id: u64, at_server: &mut bool) -> Result<Waited, ClientError> {
        self.flush()?;
        *at_server = self.fsm.is_sent(id);
        loop {
            let ev = self.next_event()?;
            self.flush()?;
            match ev {
                ClientEvent::Reply { id: got } if got == id => return Ok(Waited::Reply),
                ClientEvent::Stale => return Ok(Waited::Stale),
                _ => {}
            }
        }
    }

    /// Counts a failure of request `id` that found it at a server that died
    /// or was replaced (its connection broke, or a newer incarnation
    /// answered). A request that meets `REQUEST_SERVER_DEATHS_MAX` of those
    /// in a row may be what kills the server (a poison request): it is
    /// dropped (not re-sent) and its error returned.
    fn count_death(
        &mut self,
        id: u64,
        e: &ClientError,
        at_server: bool,
        deaths: &mut u8,
    ) -> Option<ClientError> {
        let died = matches!(
            e,
            ClientError::Io(_)
                | ClientError::Server {
                    code: ErrorCode::StaleIncarnation,
                    ..
                }
        );
        if !died || !at_server {
            return None;
        }
        *deaths += 1;
        if *deaths < csnap_pools::REQUEST_SERVER_DEATHS_MAX {
            return None;
        }
        self.fsm.forget(id);
        self.stream = None;
        self.fsm.handle_disconnect();
        Some(ClientError::Io(io::Error::other(format!(
            "the request was in flight across {deaths} consecutive server deaths \
             (the last: {e}); failed instead of re-sent"
        ))))
    }

    /// Sends a request and waits for its reply, returned as the decoded
    /// message (borrowing the connection's reply buffer). Through an agent,
    /// a failover on the way is waited out (up to the failover timeout) and
    /// the request re-sent.
    pub fn call(&mut self, req: Request) -> Result<Msg<'_>, ClientError> {
        let mut deadline = None;
        if self.stream.is_none() || self.fsm.state() != ClientState::Ready {
            if !matches!(self.source, Source::Agent(_)) {
                return Err(ClientError::Protocol("connection not ready".into()));
            }
            self.recover("the connection was broken", &mut deadline)?;
        }
        let mut id = self
            .fsm
            .request(req)
            .ok_or_else(|| ClientError::Protocol("too many requests outstanding".into()))?;
        let mut deaths: u8 = 0;
        loop {
            let mut at_server = false;
            let failure = match self.wait_for(id, &mut at_server) {
                Ok(Waited::Reply) => match proto::decode(&self.reply) {
                    Ok((_, Msg::Error { code, text, .. })) => {
                        let e = ClientError::Server {
                            code,
                            text: text.to_string(),
                        };
                        if !self.curable(&e) {
                            return Err(e);
                        }
                        // A fenced server: ask again elsewhere.
                        Some(e)
                    }
                    Ok(_) => None,
                    Err(e) => return Err(ClientError::Protocol(e.to_string())),
                },
                Ok(Waited::Stale) => Some(ClientError::Server {
                    code: ErrorCode::StaleIncarnation,
                    text: "a reply from an older server incarnation".into(),
                }),
                Err(e) if self.curable(&e) => Some(e),
                Err(e) => return Err(e),
            };
            let Some(e) = failure else { break };
            let why = e.to_string();
            if let Some(poisoned) = self.count_death(id, &e, at_server, &mut deaths) {
                return Err(poisoned);
            }
            let requeue = matches!(e, ClientError::Server { .. });
            self.recover(&why, &mut deadline)?;
            if requeue {
                // The error consumed the request; ask the new server.
                id = self
                    .fsm
                    .request(req)
                    .ok_or_else(|| ClientError::Protocol("too many requests outstanding".into()))?;
                self.flush().ok();
            }
        }
        let (_, msg) =
            proto::decode(&self.reply).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(msg)
    }

    /// Sends the release of read locks (no reply). A broken connection is
    /// not an error here: the lock is forgotten locally, so it is not
    /// uploaded to the next server, and the next call re-attaches.
    pub fn release(&mut self, r: Range) -> Result<(), ClientError> {
        self.fsm.release(r);
        match self.flush() {
            Ok(()) => Ok(()),
            Err(e) if self.curable(&e) => {
                self.stream = None;
                self.fsm.handle_disconnect();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Records read locks granted.
    pub fn note_locked(&mut self, r: Range) {
        self.fsm.note_locked(r);
    }

    /// For an idle client: notices a broken or stale connection without
    /// waiting for the next I/O, and re-attaches through the agent
    /// (uploading the read locks still held), as a kernel client's control
    /// thread would. Does not block on a healthy connection.
    pub fn poll_idle(&mut self) -> Result<(), ClientError> {
        let broken = match self.stream.as_mut() {
            None => true,
            Some(s) => {
                s.set_nonblocking(true)?;
                let mut broken = false;
                loop {
                    match s.read(self.reader.spare()) {
                        Ok(0) => {
                            broken = true;
                            break;
                        }
                        Ok(n) => self.reader.advance(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            broken = true;
                            break;
                        }
                    }
                }
                s.set_nonblocking(false)?;
                broken
            }
        };
        // Frames that arrived (nothing is expected while idle) go to the FSM.
        while let Ok(Some(f)) = self.reader.next_frame() {
            self.reply.clear();
            self.reply.extend_from_slice(f);
            if self.fsm.handle_frame(&self.reply) == ClientEvent::Stale {
                self.stream = None;
            }
        }
        if broken || self.stream.is_none() {
            if !matches!(self.source, Source::Agent(_)) {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
            let mut deadline = None;
            self.recover("the connection broke while idle", &mut deadline)?;
        }
        Ok(())
    }
}

/// Opens a control connection.
pub fn control(addr: &Addr) -> Result<Connection, ClientError> {
    Connection::connect(
        addr,
        ClientConfig {
            client_id: 0,
            node_id: 0,
            role: Role::Control,
            volume: Volume::Origin,
            origin_uuid: [0; 16],
            caching: false,
        },
    )
}

/// Opens a control connection through the node's agent (it locates the
/// server and rides out failovers for up to `failover_timeout`).
pub fn control_via_agent(
    agent_socket: &Path,
    failover_timeout: Duration,
) -> Result<Connection, ClientError> {
    Connection::via_agent(
        AgentClient::new(agent_socket, 0, 0, None),
        ClientConfig {
            client_id: 0,
            node_id: 0,
            role: Role::Control,
            volume: Volume::Origin,
            origin_uuid: [0; 16],
            caching: false,
        },
        failover_timeout,
    )
}

/// A volume: the origin or one snapshot, as a block device.
#[derive(Debug)]
pub struct VolumeClient {
    conn: Connection,
    volume: Volume,
    origin: FileDisk,
    store: FileDisk,
    chunk: u64,
    data_start: u64,
    size: u64,
}

impl VolumeClient {
    /// Attaches to `volume` through the server at `addr`. The store device is
    /// read for its label (geometry, origin id); data I/O goes to both devices
    /// directly. No failover: a broken connection is an I/O error.
    pub fn open(
        addr: &Addr,
        origin_path: &Path,
        store_path: &Path,
        volume: Volume,
        client_id: u64,
        node_id: u32,
    ) -> Result<VolumeClient, ClientError> {
        Self::attach(origin_path, store_path, volume, |origin_uuid| {
            Connection::connect(
                addr,
                ClientConfig {
                    client_id,
                    node_id,
                    role: Role::Client,
                    volume,
                    origin_uuid,
                    caching: false,
                },
            )
        })
    }

    /// Attaches to `volume` through the agent at `agent_socket`: the agent
    /// gives the server's address, and every failover (the server killed, a
    /// newer incarnation elsewhere) is ridden out for up to
    /// `failover_timeout`: the client asks its agent again, re-identifies,
    /// uploads the read locks it holds and re-sends what was unanswered, so
    /// the volume's user sees no error. Past the timeout, I/O fails with a
    /// clear error.
    pub fn open_via_agent(
        agent_socket: &Path,
        origin_path: &Path,
        store_path: &Path,
        volume: Volume,
        client_id: u64,
        node_id: u32,
        failover_timeout: Duration,
    ) -> Result<VolumeClient, ClientError> {
        Self::attach(origin_path, store_path, volume, |origin_uuid| {
            Connection::via_agent(
                AgentClient::new(agent_socket, client_id, node_id, Some(volume)),
                ClientConfig {
                    client_id,
                    node_id,
                    role: Role::Client,
                    volume,
                    origin_uuid,
                    caching: false,
                },
                failover_timeout,
            )
        })
    }

    fn attach(
        origin_path: &Path,
        store_path: &Path,
        volume: Volume,
        connect: impl FnOnce([u8; 16]) -> Result<Connection, ClientError>,
    ) -> Result<VolumeClient, ClientError> {
        // Both shared devices around the page cache (direct I/O): another
        // node's writes are on the disk, not in this host's cache.
        let open = |p: &Path| {
            FileDisk::open(p)
                .map_err(|e| ClientError::Io(io::Error::other(format!("{}: {e}", p.display()))))
        };
        let origin = open(origin_path)?;
        let mut store = open(store_path)?;
        let label = csnap_store::read_label(&mut store)
            .map_err(|e| ClientError::Io(io::Error::other(e.to_string())))?;
        let conn = connect(label.origin_uuid)?;
        let chunk = u64::from(conn.fsm.chunk_size_bytes());
        Ok(VolumeClient {
            volume,
            origin,
            store,
            chunk,
            data_start: label.data_start_bytes,
            size: conn.fsm.origin_size_bytes(),
            conn,
        })
    }

    /// Size of the volume in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// Chunk size.
    pub fn chunk_size_bytes(&self) -> u64 {
        self.chunk
    }

    /// The connection.
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn check(&self, off: u64, len: usize) -> io::Result<()> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "I/O of {len} bytes at {off} is past the end of the volume ({} bytes)",
                    self.size
                ),
            )),
        }
    }

    /// Splits `[off, off+len)` into runs of whole chunks of at most
    /// `CHUNKS_PER_REQUEST_MAX`: (first chunk, chunks, byte offset in the
    /// caller's buffer, byte length).
    fn runs(&self, off: u64, len: usize) -> impl Iterator<Item = (u64, u32, usize, usize)> {
        let chunk = self.chunk;
        let end = off + len as u64;
        let mut at = off;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let first = at / chunk;
            let max_end = (first + CHUNKS_PER_REQUEST_MAX as u64) * chunk;
            let run_end = end.min(max_end);
            let last = (run_end - 1) / chunk;
            let chunks = u32::try_from(last - first + 1).unwrap_or(u32::MAX);
            let boff = usize::try_from(at - off).unwrap_or(0);
            let blen = usize::try_from(run_end - at).unwrap_or(0);
            at = run_end;
            Some((first, chunks, boff, blen))
        })
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check(off, buf.len())?;
        let Volume::Snapshot(_) = self.volume else {
            return self.origin.read_at(buf, off).map_err(disk_io);
        };
        for (first, chunks, boff, blen) in self.runs(off, buf.len()) {
            let msg = self.conn.call(Request::SnapshotRead(Range {
                chunk: first,
                chunks,
            }))?;
            let Msg::SnapshotReadReply(targets) = msg else {
                return Err(ClientError::Protocol("expected a snapshot read reply".into()).into());
            };
            let mut ts = [None; CHUNKS_PER_REQUEST_MAX];
            for (i, t) in targets.iter().enumerate() {
                ts[i] = Some(t);
            }
            // The server locked every chunk it answered for, store-mapped
            // ones too (another snapshot's writer may otherwise overwrite a
            // shared store chunk under this read); released after the read.
            for t in ts.iter().flatten() {
                self.conn.note_locked(t.range());
            }
            let seg_start = off + boff as u64;
            let seg_end = seg_start + blen as u64;
            let mut result = Ok(());
            for t in ts.iter().flatten() {
                let t_start = (t.chunk * self.chunk).max(seg_start);
                let t_end = (t.range().end() * self.chunk).min(seg_end);
                if t_start >= t_end {
                    continue;
                }
                let dst = &mut buf[usize::try_from(t_start - off).unwrap_or(0)
                    ..usize::try_from(t_end - off).unwrap_or(0)];
                let r = match t.kind {
                    TargetKind::Origin => self.origin.read_at(dst, t_start).map_err(disk_io),
                    TargetKind::Store => {
                        let at = self.data_start
                            + t.store_chunk * self.chunk
                            + (t_start - t.chunk * self.chunk);
                        self.store.read_at(dst, at).map_err(disk_io)
                    }
                };
                if r.is_err() {
                    result = r;
                }
            }
            // Release the read locks once the reads are done.
            for t in ts.iter().flatten() {
                self.conn.release(t.range())?;
            }
            result?;
        }
        Ok(())
    }

    /// Writes `buf` at `off`.
    pub fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check(off, buf.len())?;
        for (first, chunks, boff, blen) in self.runs(off, buf.len()) {
            let seg = &buf[boff..boff + blen];
            let seg_off = off + boff as u64;
            match self.volume {
                Volume::Origin => {
                    let msg = self.conn.call(Request::OriginWrite(Range {
                        chunk: first,
                        chunks,
                    }))?;
                    if !matches!(msg, Msg::OriginWriteOk(_)) {
                        return Err(
                            ClientError::Protocol("expected an origin write grant".into()).into(),
                        );
                    }
                    self.origin.write_at(seg, seg_off).map_err(disk_io)?;
                }
                Volume::Snapshot(_) => {
                    let msg = self.conn.call(Request::SnapshotWrite(Range {
                        chunk: first,
                        chunks,
                    }))?;
                    let Msg::SnapshotWriteOk(targets) = msg else {
                        return Err(ClientError::Protocol(
                            "expected a snapshot write reply".into(),
                        )
                        .into());
                    };
                    let mut ts = [None; CHUNKS_PER_REQUEST_MAX];
                    for (i, t) in targets.iter().enumerate() {
                        ts[i] = Some(t);
                    }
                    for t in ts.iter().flatten() {
                        let t_start = (t.chunk * self.chunk).max(seg_off);
                        let t_end = (t.range().end() * self.chunk).min(seg_off + blen as u64);
                        if t_start >= t_end {
                            continue;
                        }
                        let src = &seg[usize::try_from(t_start - seg_off).unwrap_or(0)
                            ..usize::try_from(t_end - seg_off).unwrap_or(0)];
                        let at = self.data_start
                            + t.store_chunk * self.chunk
                            + (t_start - t.chunk * self.chunk);
                        self.store.write_at(src, at).map_err(disk_io)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Asks where `[off, off+len)` of a snapshot is and takes the read locks
    /// of every chunk it reads (store-mapped ones too), without reading or releasing them; returns the
    /// locked ranges (for tests of slow readers across a failover).
    pub fn hold_read(&mut self, off: u64, len: usize) -> io::Result<Vec<Range>> {
        self.check(off, len)?;
        if !matches!(self.volume, Volume::Snapshot(_)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only a snapshot read takes read locks",
            ));
        }
        let mut held = Vec::new();
        let runs: Vec<_> = self.runs(off, len).collect();
        for (first, chunks, _, _) in runs {
            let msg = self.conn.call(Request::SnapshotRead(Range {
                chunk: first,
                chunks,
            }))?;
            let Msg::SnapshotReadReply(targets) = msg else {
                return Err(ClientError::Protocol("expected a snapshot read reply".into()).into());
            };
            let locked: Vec<Range> = targets.iter().map(|t| t.range()).collect();
            for r in locked {
                self.conn.note_locked(r);
                held.push(r);
            }
        }
        Ok(held)
    }

    /// Releases read locks taken by `hold_read`.
    pub fn release_held(&mut self, r: Range) -> io::Result<()> {
        self.conn.release(r).map_err(io::Error::from)
    }

    /// Times the connection re-attached after a failure.
    pub fn reconnects(&self) -> u64 {
        self.conn.reconnects()
    }

    /// Notices a failover while idle and re-attaches (see
    /// `Connection::poll_idle`).
    pub fn poll_idle(&mut self) -> io::Result<()> {
        self.conn.poll_idle().map_err(io::Error::from)
    }

    /// Makes completed writes durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.origin.flush().map_err(disk_io)?;
        self.store.flush().map_err(disk_io)
    }
}

/// A disk error as the `io::Error` the block-device API returns.
fn disk_io(e: DiskError) -> io::Error {
    match e {
        DiskError::Os(errno) => io::Error::from_raw_os_error(errno),
        other => io::Error::other(other.to_string()),
    }
}
