//! The metrics endpoint of a confined process (`--metrics ADDR`, #13): a
//! listener and [`METRICS_CONNECTIONS_MAX`] connection slots inside the
//! process's own mio loop, every buffer reserved at init.
//!
//! It uses only what the loops already do (accept4, recvfrom, sendto,
//! epoll_ctl, close, setsockopt of TCP_NODELAY on accept), so no confined
//! process gains a syscall. Bounds: a request head of at most
//! [`METRICS_REQUEST_MAX_BYTES`] (more is a 400), a response rendered into
//! one buffer of [`METRICS_RESPONSE_MAX_BYTES`] per slot, every connection
//! closed after its response or after [`METRICS_CLIENT_TIMEOUT_MS`]
//! (a client that sends nothing, or does not read, loses its slot), one
//! connection over the slots accepted and closed at once. Nothing blocks:
//! reads and writes stop at `WouldBlock` and resume on readiness.

use std::io::{self, Read, Write};

use csnap_fsm::metrics::{parse_request, respond, Parsed, Status, Text};
use csnap_pools::{
    METRICS_CLIENT_TIMEOUT_MS, METRICS_CONNECTIONS_MAX, METRICS_REQUEST_MAX_BYTES,
    METRICS_RESPONSE_MAX_BYTES,
};
use mio::{Interest, Registry, Token};

use crate::net::{Addr, MioListener, MioStream};

/// Tokens an endpoint uses from its base: the listener, then one per slot.
pub const METRICS_TOKENS: usize = 1 + METRICS_CONNECTIONS_MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// Reading the request head.
    Reading,
    /// A `GET /metrics` waiting for the process's figures.
    Waiting {
        head_only: bool,
    },
    /// Writing `out[at..end]`.
    Writing,
}

#[derive(Debug)]
struct Conn {
    stream: Option<MioStream>,
    state: State,
    readable: bool,
    writable: bool,
    deadline_ms: u64,
    req: Box<[u8]>,
    req_len: usize,
    out: Box<[u8]>,
    at: usize,
    end: usize,
}

/// Figures of an endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct EndpointStats {
    /// Responses written (every status).
    pub served: u64,
    /// Connections closed at once: every slot busy.
    pub refused: u64,
    /// Connections closed at their deadline.
    pub timed_out: u64,
}

/// A metrics listener and its connection slots.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: MioListener,
    base: usize,
    accept_ready: bool,
    conns: Vec<Conn>,
    stats: EndpointStats,
}

impl MetricsEndpoint {
    /// Binds `addr` (TCP `IP:PORT`, or a unix socket path) and registers it
    /// under `Token(base)`; slots get the next tokens. Reserves every
    /// buffer: the only allocation.
    pub fn new(addr: &Addr, reg: &Registry, base: usize) -> Result<MetricsEndpoint, String> {
        let mut listener = MioListener::bind(addr)
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        reg.register(&mut listener, Token(base), Interest::READABLE)
            .map_err(|e| format!("cannot register the metrics listener: {e}"))?;
        let conns = (0..METRICS_CONNECTIONS_MAX)
            .map(|_| Conn {
                stream: None,
                state: State::Free,
                readable: false,
                writable: false,
                deadline_ms: 0,
                req: vec![0u8; METRICS_REQUEST_MAX_BYTES].into_boxed_slice(),
                req_len: 0,
                out: vec![0u8; METRICS_RESPONSE_MAX_BYTES].into_boxed_slice(),
                at: 0,
                end: 0,
            })
            .collect();
        Ok(MetricsEndpoint {
            listener,
            base,
            accept_ready: true,
            conns,
            stats: EndpointStats::default(),
        })
    }

    /// Bytes reserved (for the memory budget).
    #[must_use]
    pub const fn reserved_bytes() -> usize {
        METRICS_CONNECTIONS_MAX * (METRICS_REQUEST_MAX_BYTES + METRICS_RESPONSE_MAX_BYTES)
    }

    /// The bound address (a TCP port 0 resolved).
    pub fn local_addr(&self) -> io::Result<Addr> {
        self.listener.local_addr()
    }

    /// Removes a unix listener's socket file (before `_exit`).
    pub fn remove_socket_file(&self) {
        self.listener.remove_socket_file();
    }

    /// Figures so far.
    #[must_use]
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// Whether `t` is one of this endpoint's tokens.
    #[must_use]
    pub fn owns(&self, t: Token) -> bool {
        t.0 >= self.base && t.0 < self.base + METRICS_TOKENS
    }

    /// Readiness of one of its tokens.
    pub fn on_event(&mut self, t: Token, readable: bool, writable: bool) {
        if t.0 == self.base {
            self.accept_ready = true;
        } else if let Some(c) = self.conns.get_mut(t.0.wrapping_sub(self.base + 1)) {
            c.readable |= readable;
            c.writable |= writable;
        }
    }

    /// Whether a `GET /metrics` waits for [`MetricsEndpoint::respond`].
    #[must_use]
    pub fn waiting(&self) -> bool {
        self.conns
            .iter()
            .any(|c| matches!(c.state, State::Waiting { .. }))
    }

    /// The earliest connection deadline.
    #[must_use]
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.conns
            .iter()
            .filter(|c| c.state != State::Free)
            .map(|c| c.deadline_ms)
            .min()
    }

    /// Accepts, reads requests, answers bad ones, writes responses, closes
    /// finished and expired connections. Returns whether anything moved.
    pub fn pump(&mut self, reg: &Registry, now_ms: u64) -> bool {
        let mut moved = false;
        if self.accept_ready {
            moved |= self.accept(reg, now_ms);
        }
        for i in 0..self.conns.len() {
            moved |= self.pump_conn(i, reg, now_ms);
        }
        moved
    }

    fn accept(&mut self, reg: &Registry, now_ms: u64) -> bool {
        let mut moved = false;
        loop {
            let mut s = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_ready = false;
                    return moved;
                }
                // Out of descriptors or the like: try again on the next
                // readiness rather than spin.
                Err(_) => {
                    self.accept_ready = false;
                    return moved;
                }
            };
            moved = true;
            let Some(i) = self.conns.iter().position(|c| c.state == State::Free) else {
                // Every slot busy: closed at once (dropped).
                self.stats.refused += 1;
                continue;
            };
            if reg
                .register(
                    &mut s,
                    Token(self.base + 1 + i),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                continue;
            }
            let c = &mut self.conns[i];
            c.stream = Some(s);
            c.state = State::Reading;
            c.readable = true;
            c.writable = false;
            c.req_len = 0;
            c.deadline_ms = now_ms + METRICS_CLIENT_TIMEOUT_MS;
        }
    }

    fn close(&mut self, i: usize, reg: &Registry) {
        let c = &mut self.conns[i];
        if let Some(mut s) = c.stream.take() {
            let _ = reg.deregister(&mut s);
        }
        c.state = State::Free;
        c.readable = false;
        c.writable = false;
        c.req_len = 0;
        c.at = 0;
        c.end = 0;
    }

    fn pump_conn(&mut self, i: usize, reg: &Registry, now_ms: u64) -> bool {
        let mut moved = false;
        if self.conns[i].state == State::Free {
            return false;
        }
        if now_ms >= self.conns[i].deadline_ms {
            self.stats.timed_out += 1;
            self.close(i, reg);
            return true;
        }
        if self.conns[i].state == State::Reading {
            let c = &mut self.conns[i];
            let mut eof = false;
            while c.readable && c.req_len < c.req.len() {
                let Some(s) = c.stream.as_mut() else { break };
                match s.read(&mut c.req[c.req_len..]) {
                    Ok(0) => {
                        eof = true;
                        c.readable = false;
                    }
                    Ok(n) => {
                        c.req_len += n;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
                    Err(_) => {
                        eof = true;
                        c.readable = false;
                    }
                }
            }
            match parse_request(&c.req[..c.req_len]) {
                Parsed::Incomplete if eof => {
                    // Gone before finishing its request: nobody to answer.
                    self.close(i, reg);
                    return true;
                }
                Parsed::Incomplete => {}
                Parsed::Done {
                    status: Status::Ok,
                    head_only,
                } => {
                    c.state = State::Waiting { head_only };
                    moved = true;
                }
                Parsed::Done { status, head_only } => {
                    let (a, b) = respond(&mut c.out, status, head_only, &mut |_| {});
                    c.at = a;
                    c.end = b;
                    c.state = State::Writing;
                    moved = true;
                }
            }
        }
        if self.conns[i].state == State::Writing {
            moved |= self.write(i, reg);
        }
        moved
    }

    fn write(&mut self, i: usize, reg: &Registry) -> bool {
        let c = &mut self.conns[i];
        let mut moved = false;
        let mut broken = false;
        while c.writable && c.at < c.end {
            let Some(s) = c.stream.as_mut() else { break };
            match s.write(&c.out[c.at..c.end]) {
                Ok(0) => broken = true,
                Ok(n) => {
                    c.at += n;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Err(_) => broken = true,
            }
            if broken {
                break;
            }
        }
        if broken || c.at >= c.end {
            if !broken {
                self.stats.served += 1;
            }
            self.close(i, reg);
            return true;
        }
        moved
    }

    /// Renders the body for every waiting `GET /metrics` (in its slot's own
    /// buffer) and starts writing it.
    pub fn respond(&mut self, reg: &Registry, body: &mut dyn FnMut(&mut Text<'_>)) {
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            let State::Waiting { head_only } = c.state else {
                continue;
            };
            let (a, b) = respond(&mut c.out, Status::Ok, head_only, body);
            c.at = a;
            c.end = b;
            c.state = State::Writing;
            self.write(i, reg);
        }
    }
}

// ---------------------------------------------------------------------------
// The NBD server's figures (single-threaded: plain counters).
// ---------------------------------------------------------------------------

use csnap_fsm::metrics::{build_info, Histogram, Kind, Label};
use csnap_fsm::nbd::CmdKind;
use csnap_pools::SNAPSHOTS_MAX;

/// NBD operations with a series of their own.
pub const NBD_OPS: usize = 7;
/// Their `op` label values.
pub const NBD_OP_NAMES: [&str; NBD_OPS] = [
    "read",
    "write",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
];

/// The `op` index of a command kind.
#[must_use]
pub fn nbd_op(k: CmdKind) -> usize {
    match k {
        CmdKind::Read => 0,
        CmdKind::Write => 1,
        CmdKind::Flush => 2,
        CmdKind::Trim => 3,
        CmdKind::Cache => 4,
        CmdKind::WriteZeroes => 5,
        CmdKind::BlockStatus => 6,
    }
}

/// An export's series key: `None` for the origin, else the tag.
#[must_use]
pub fn export_tag(v: csnap_proto::Volume) -> Option<u32> {
    match v {
        csnap_proto::Volume::Origin => None,
        csnap_proto::Volume::Snapshot(t) => Some(t),
    }
}

/// Export series: the origin and every snapshot that exists (a snapshot
/// cannot be deleted while a connection has it open, so attached exports
/// are live ones).
pub const NBD_EXPORT_SERIES_MAX: usize = SNAPSHOTS_MAX + 1;

#[derive(Debug, Clone, Copy, Default)]
struct ExportCounters {
    used: bool,
    /// Its snapshot was on a page of the running list pass.
    listed: bool,
    /// `None`: the origin.
    tag: Option<u32>,
    attached: u32,
    read_bytes: u64,
    written_bytes: u64,
}

/// The csnap server's figures as its last `StatusReply` gave them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerFigures {
    /// Server incarnation.
    pub incarnation: u64,
    /// Store data area, bytes.
    pub store_size_bytes: u64,
    /// Store data in use, bytes.
    pub store_used_bytes: u64,
    /// Live snapshots.
    pub snapshots: u64,
    /// Read locks held.
    pub read_locks: u64,
    /// Origin writes waiting for read locks.
    pub waiting_writes: u64,
    /// Copy-outs made by the serving server process.
    pub copyouts: u64,
}

impl ServerFigures {
    /// From a `StatusReply` frame.
    #[must_use]
    pub fn from_frame(frame: &[u8]) -> Option<ServerFigures> {
        match csnap_proto::decode(frame) {
            Ok((
                _,
                csnap_proto::Msg::StatusReply {
                    incarnation,
                    chunk_size_bytes,
                    data_chunks,
                    data_free,
                    snapshots,
                    read_locks,
                    waiting_writes,
                    copyouts,
                    ..
                },
            )) => {
                let chunk = u64::from(chunk_size_bytes);
                Some(ServerFigures {
                    incarnation,
                    store_size_bytes: data_chunks.saturating_mul(chunk),
                    store_used_bytes: data_chunks.saturating_sub(data_free).saturating_mul(chunk),
                    snapshots: u64::from(snapshots),
                    read_locks: u64::from(read_locks),
                    waiting_writes: u64::from(waiting_writes),
                    copyouts,
                })
            }
            _ => None,
        }
    }
}

/// Renders the server figures' families (also the server's own endpoint).
pub fn render_server_figures(t: &mut Text<'_>, f: &ServerFigures) {
    t.single(
        "csnap_copyouts_total",
        Kind::Counter,
        "Copy-outs made by the serving csnap server process (origin or shared store chunk to a new store chunk)",
        f.copyouts,
    );
    t.single(
        "csnap_store_used_bytes",
        Kind::Gauge,
        "Snapshot store data area in use, bytes",
        f.store_used_bytes,
    );
    t.single(
        "csnap_store_size_bytes",
        Kind::Gauge,
        "Snapshot store data area, bytes",
        f.store_size_bytes,
    );
    t.single(
        "csnap_snapshots",
        Kind::Gauge,
        "Live snapshots in the store",
        f.snapshots,
    );
    t.single(
        "csnap_read_locks",
        Kind::Gauge,
        "Snapshot read locks held at the server",
        f.read_locks,
    );
    t.single(
        "csnap_waiting_writes",
        Kind::Gauge,
        "Origin writes waiting at the server for read locks",
        f.waiting_writes,
    );
}

/// Renders `csnap_server_incarnation` and `csnap_failovers_total`.
pub fn render_incarnation(t: &mut Text<'_>, incarnation: u64, failovers: u64) {
    t.single(
        "csnap_server_incarnation",
        Kind::Gauge,
        "Incarnation of the serving csnap server, as this process last saw it (0: none seen)",
        incarnation,
    );
    t.single(
        "csnap_failovers_total",
        Kind::Counter,
        "Server incarnation changes this process saw after the first (failovers and moves)",
        failovers,
    );
}

/// Tracks the highest incarnation seen and counts the changes after the
/// first.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncarnationSeen {
    /// Highest incarnation seen, 0 before any.
    pub incarnation: u64,
    /// Rises after the first.
    pub failovers: u64,
}

impl IncarnationSeen {
    /// Notes an incarnation.
    pub fn saw(&mut self, inc: u64) {
        if inc > self.incarnation {
            if self.incarnation != 0 {
                self.failovers += 1;
            }
            self.incarnation = inc;
        }
    }
}

/// What the NBD loop does after [`NbdMetrics::turn`].
#[derive(Debug, Clone, Copy)]
pub struct NbdTurn {
    /// Questions were put on the control connection: send them now.
    pub asked: bool,
    /// Wake the loop by then (a connection deadline, the status wait).
    pub wake_ms: Option<u64>,
}

/// Everything the NBD server's endpoint renders. Reserved at init, updated
/// on the loop's thread without allocation.
#[derive(Debug)]
pub struct NbdMetrics {
    exports: Vec<ExportCounters>,
    requests: [u64; NBD_OPS],
    errors: [u64; NBD_OPS],
    durations: [Histogram; NBD_OPS],
    /// Server incarnations seen by the connections' engines.
    pub seen: IncarnationSeen,
    /// The last status the server gave, and when (ms).
    pub server: Option<ServerFigures>,
    /// A scrape's status and list questions on the control connection.
    pub status_id: Option<u64>,
    /// See `status_id`.
    pub list_id: Option<u64>,
    /// When the questions went out (ms), while a scrape waits.
    pub asked_at_ms: Option<u64>,
    /// Connections the NBD server has (gauge).
    pub connections: u64,
    /// A status came back since the last question (`csnap_server_up`).
    pub fresh: bool,
}

impl Default for NbdMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NbdMetrics {
    /// Reserves the export table (the origin in entry 0).
    #[must_use]
    pub fn new() -> NbdMetrics {
        let mut exports = vec![ExportCounters::default(); NBD_EXPORT_SERIES_MAX];
        exports[0].used = true;
        NbdMetrics {
            exports,
            requests: [0; NBD_OPS],
            errors: [0; NBD_OPS],
            durations: [Histogram::default(); NBD_OPS],
            seen: IncarnationSeen::default(),
            server: None,
            status_id: None,
            list_id: None,
            asked_at_ms: None,
            connections: 0,
            fresh: false,
        }
    }

    /// Bytes reserved.
    #[must_use]
    pub const fn reserved_bytes() -> usize {
        NBD_EXPORT_SERIES_MAX * core::mem::size_of::<ExportCounters>()
            + core::mem::size_of::<NbdMetrics>()
    }

    /// A connection attached an export (`None`: the origin); its series
    /// index. An entry of a snapshot no connection has is reused when the
    /// table is full (counters of a snapshot deleted meanwhile go with it).
    pub fn attach(&mut self, tag: Option<u32>) -> usize {
        let i = match tag {
            None => 0,
            Some(t) => {
                if let Some(i) = self.exports.iter().position(|e| e.used && e.tag == Some(t)) {
                    i
                } else {
                    let free = self.exports.iter().skip(1).position(|e| !e.used);
                    let idle = || self.exports.iter().skip(1).position(|e| e.attached == 0);
                    let Some(k) = free.or_else(idle) else {
                        // Every entry attached: cannot be (attached exports
                        // are live snapshots); counted with the origin.
                        return 0;
                    };
                    let i = k + 1;
                    self.exports[i] = ExportCounters {
                        used: true,
                        tag: Some(t),
                        ..ExportCounters::default()
                    };
                    i
                }
            }
        };
        self.exports[i].attached += 1;
        i
    }

    /// A connection let its export go.
    pub fn detach(&mut self, i: usize) {
        if let Some(e) = self.exports.get_mut(i) {
            e.attached = e.attached.saturating_sub(1);
        }
    }

    /// A command of `kind` admitted at `start_us` (monotonic) was answered.
    pub fn finished(
        &mut self,
        export: Option<usize>,
        kind: CmdKind,
        len: u32,
        ok: bool,
        start_us: u64,
    ) {
        let us = csnap_sys::monotonic_micros().saturating_sub(start_us);
        self.done(export, nbd_op(kind), u64::from(len), ok, us);
    }

    /// A command was answered after `us` microseconds.
    pub fn done(&mut self, export: Option<usize>, op: usize, bytes: u64, ok: bool, us: u64) {
        self.requests[op] += 1;
        if !ok {
            self.errors[op] += 1;
        }
        self.durations[op].observe(us);
        if let (true, Some(e)) = (ok, export.and_then(|i| self.exports.get_mut(i))) {
            match op {
                0 => e.read_bytes += bytes,
                1 | 5 => e.written_bytes += bytes,
                _ => {}
            }
        }
    }

    /// The endpoint's turn in the NBD loop: its connections move on; a
    /// scrape asks the server for `Status` and the snapshot list on the
    /// control connection (`fsm`), and is answered once both came back or
    /// after [`csnap_pools::METRICS_STATUS_WAIT_MS`] with the figures known
    /// (`csnap_server_up` 0). The caller sends what was asked at once.
    pub fn turn(
        &mut self,
        ep: &mut MetricsEndpoint,
        fsm: &mut csnap_fsm::client::ClientFsm,
        reg: &Registry,
        now: u64,
        connections: usize,
    ) -> NbdTurn {
        use csnap_fsm::client::Request;
        ep.pump(reg, now);
        let mut asked = false;
        if ep.waiting() && self.asked_at_ms.is_none() {
            self.fresh = false;
            self.status_id = fsm.request(Request::Status);
            for e in &mut self.exports {
                e.listed = false;
            }
            self.list_id = fsm.request(Request::List(0));
            self.asked_at_ms = Some(now);
            asked = true;
        }
        let mut wake_ms = ep.next_deadline_ms();
        if ep.waiting() {
            let at = self.asked_at_ms.unwrap_or(now) + csnap_pools::METRICS_STATUS_WAIT_MS;
            if (self.status_id.is_none() && self.list_id.is_none()) || now >= at {
                self.connections = connections as u64;
                let me = &*self;
                ep.respond(reg, &mut |t| me.render(t));
                for id in [self.status_id.take(), self.list_id.take()]
                    .into_iter()
                    .flatten()
                {
                    fsm.forget(id);
                }
                self.asked_at_ms = None;
            } else {
                wake_ms = Some(wake_ms.map_or(at, |w| w.min(at)));
            }
        }
        NbdTurn { asked, wake_ms }
    }

    /// A control reply: `true` when it answered a scrape's question.
    pub fn reply(&mut self, id: u64, frame: &[u8], fsm: &mut csnap_fsm::client::ClientFsm) -> bool {
        if self.status_id == Some(id) {
            self.status_id = None;
            self.status_reply(frame);
        } else if self.list_id == Some(id) {
            self.list_id = None;
            if let Some(from) = self.list_reply(frame) {
                self.list_id = fsm.request(csnap_fsm::client::Request::List(from));
            }
        } else {
            return false;
        }
        true
    }

    /// A page of the snapshot list arrived: the exports of the snapshots
    /// it lists are marked, and a non-empty page returns the tag the next
    /// page starts from. The empty page ends the pass: series of snapshots
    /// no page listed (and no connection has) go.
    pub fn list_reply(&mut self, frame: &[u8]) -> Option<u32> {
        let Ok((_, csnap_proto::Msg::SnapshotList(l))) = csnap_proto::decode(frame) else {
            return None;
        };
        for e in self.exports.iter_mut().skip(1) {
            if l.iter().any(|s| Some(s.tag) == e.tag && !s.deleting()) {
                e.listed = true;
            }
        }
        if let Some(last) = l.iter().map(|s| s.tag).max() {
            // Past tag u32::MAX there is nothing more to list.
            if let Some(from) = last.checked_add(1) {
                return Some(from);
            }
        }
        for e in self.exports.iter_mut().skip(1) {
            if e.used && e.attached == 0 && !e.listed {
                *e = ExportCounters::default();
            }
            e.listed = false;
        }
        None
    }

    /// A status arrived.
    pub fn status_reply(&mut self, frame: &[u8]) {
        if let Some(f) = ServerFigures::from_frame(frame) {
            self.seen.saw(f.incarnation);
            self.server = Some(f);
            self.fresh = true;
        }
    }

    /// The whole text.
    pub fn render(&self, t: &mut Text<'_>) {
        build_info(t, env!("CARGO_PKG_VERSION"));
        t.family(
            "csnap_nbd_read_bytes_total",
            Kind::Counter,
            "Bytes read through the NBD exports, by export (origin, or a snapshot tag)",
        );
        self.per_export(t, "csnap_nbd_read_bytes_total", |e| e.read_bytes);
        t.family(
            "csnap_nbd_written_bytes_total",
            Kind::Counter,
            "Bytes written through the NBD exports (WRITE and WRITE_ZEROES), by export",
        );
        self.per_export(t, "csnap_nbd_written_bytes_total", |e| e.written_bytes);
        t.family(
            "csnap_nbd_requests_total",
            Kind::Counter,
            "NBD commands answered, by operation",
        );
        for (i, op) in NBD_OP_NAMES.iter().enumerate() {
            t.sample(
                "csnap_nbd_requests_total",
                &[("op", Label::Str(op))],
                self.requests[i],
            );
        }
        t.family(
            "csnap_nbd_request_errors_total",
            Kind::Counter,
            "NBD commands answered with an error, by operation",
        );
        for (i, op) in NBD_OP_NAMES.iter().enumerate() {
            t.sample(
                "csnap_nbd_request_errors_total",
                &[("op", Label::Str(op))],
                self.errors[i],
            );
        }
        t.family(
            "csnap_nbd_request_duration_seconds",
            Kind::Histogram,
            "NBD command time from admission to completion, by operation",
        );
        for (i, op) in NBD_OP_NAMES.iter().enumerate() {
            t.histogram(
                "csnap_nbd_request_duration_seconds",
                &[("op", Label::Str(op))],
                &self.durations[i],
            );
        }
        t.single(
            "csnap_nbd_connections",
            Kind::Gauge,
            "NBD connections open",
            self.connections,
        );
        render_incarnation(t, self.seen.incarnation, self.seen.failovers);
        t.single(
            "csnap_server_up",
            Kind::Gauge,
            "1 when the csnap server answered this scrape's status question, else 0 (its figures are then the last known)",
            u64::from(self.fresh),
        );
        render_server_figures(t, &self.server.unwrap_or_default());
    }

    fn per_export(&self, t: &mut Text<'_>, name: &str, v: impl Fn(&ExportCounters) -> u64) {
        for e in self.exports.iter().filter(|e| e.used) {
            match e.tag {
                None => t.sample(name, &[("export", Label::Str("origin"))], v(e)),
                Some(tag) => t.sample(name, &[("export", Label::Num(u64::from(tag)))], v(e)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The csnap server's figures: published by the store worker thread after
// each batch (atomics: the one thread boundary), read by the network thread.
// ---------------------------------------------------------------------------

use std::sync::atomic::{AtomicU64, Ordering};

/// What the store worker publishes for the network thread's endpoint.
#[derive(Debug, Default)]
pub struct WorkerFigures {
    copyouts: AtomicU64,
    incarnation: AtomicU64,
    chunk_size_bytes: AtomicU64,
    data_chunks: AtomicU64,
    data_free: AtomicU64,
    snapshots: AtomicU64,
}

impl WorkerFigures {
    /// Stores the worker's figures (relaxed: each is a figure of its own).
    pub fn publish(
        &self,
        copyouts: u64,
        incarnation: u64,
        chunk_size_bytes: u32,
        data_chunks: u64,
        data_free: u64,
        snapshots: u32,
    ) {
        self.copyouts.store(copyouts, Ordering::Relaxed);
        self.incarnation.store(incarnation, Ordering::Relaxed);
        self.chunk_size_bytes
            .store(u64::from(chunk_size_bytes), Ordering::Relaxed);
        self.data_chunks.store(data_chunks, Ordering::Relaxed);
        self.data_free.store(data_free, Ordering::Relaxed);
        self.snapshots
            .store(u64::from(snapshots), Ordering::Relaxed);
    }

    /// The figures, with the network thread's locks and waiting writes.
    pub fn load(&self, read_locks: u64, waiting_writes: u64) -> ServerFigures {
        let chunk = self.chunk_size_bytes.load(Ordering::Relaxed);
        let data = self.data_chunks.load(Ordering::Relaxed);
        let free = self.data_free.load(Ordering::Relaxed);
        ServerFigures {
            incarnation: self.incarnation.load(Ordering::Relaxed),
            store_size_bytes: data.saturating_mul(chunk),
            store_used_bytes: data.saturating_sub(free).saturating_mul(chunk),
            snapshots: self.snapshots.load(Ordering::Relaxed),
            read_locks,
            waiting_writes,
            copyouts: self.copyouts.load(Ordering::Relaxed),
        }
    }
}

/// The csnap server's whole text.
pub fn render_server(t: &mut Text<'_>, f: &ServerFigures, clients: u64) {
    build_info(t, env!("CARGO_PKG_VERSION"));
    t.single(
        "csnap_server_incarnation",
        Kind::Gauge,
        "Incarnation of this csnap server (0: a standby not started)",
        f.incarnation,
    );
    t.single(
        "csnap_server_clients",
        Kind::Gauge,
        "Identified client connections of this csnap server",
        clients,
    );
    render_server_figures(t, f);
}

/// An agent's whole text: what its FSM knows, and the incarnations seen.
pub fn render_agent(t: &mut Text<'_>, st: &csnap_fsm::agent::AgentStatus, seen: &IncarnationSeen) {
    build_info(t, env!("CARGO_PKG_VERSION"));
    render_incarnation(t, seen.incarnation, seen.failovers);
    t.single(
        "csnap_agent_member",
        Kind::Gauge,
        "1 while this node is a cluster member",
        u64::from(st.member),
    );
    t.single(
        "csnap_agent_bus_up",
        Kind::Gauge,
        "1 while the link to the membership backend is up",
        u64::from(st.bus_up),
    );
    t.single(
        "csnap_agent_standby_ready",
        Kind::Gauge,
        "1 while a standby server is ready on this node",
        u64::from(st.standby_ready),
    );
    t.single(
        "csnap_agent_serving_incarnation",
        Kind::Gauge,
        "Incarnation of the server serving on this node, 0 if none",
        st.serving_incarnation,
    );
    t.single(
        "csnap_agent_waiting_clients",
        Kind::Gauge,
        "Clients waiting for a server address",
        u64::from(st.waiting_clients),
    );
    t.single(
        "csnap_agent_snapshot_clients",
        Kind::Gauge,
        "Registered snapshot clients of this node",
        u64::from(st.snapshot_clients),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_series_are_bounded_reused_and_pruned() {
        let mut m = NbdMetrics::new();
        assert_eq!(m.attach(None), 0);
        let a = m.attach(Some(5));
        assert_eq!(m.attach(Some(5)), a, "one series per tag");
        m.done(Some(a), 0, 4096, true, 10);
        m.done(Some(a), 1, 512, false, 10);
        assert_eq!(m.exports[a].read_bytes, 4096);
        assert_eq!(
            m.exports[a].written_bytes, 0,
            "a failed write moves no bytes"
        );
        assert_eq!(m.errors[1], 1);
        // Fill the table with tags nobody holds any more; one more tag
        // still gets a series (an idle one is reused), never past the bound.
        for t in 100..100 + u32::try_from(NBD_EXPORT_SERIES_MAX).unwrap() {
            let i = m.attach(Some(t));
            m.detach(i);
        }
        let used = m.exports.iter().filter(|e| e.used).count();
        assert!(used <= NBD_EXPORT_SERIES_MAX);
        assert!(
            m.exports.iter().any(|e| e.tag == Some(5)),
            "held series stay"
        );
        let i = m.attach(Some(9999));
        assert!(i > 0 && m.exports[i].tag == Some(9999));
        // A list without the idle tags prunes them; held ones stay.
        let list = csnap_proto::SnapList::empty();
        let mut frame = [0u8; 256];
        let n = csnap_proto::encode(
            &csnap_proto::Header::new(1, 1),
            &csnap_proto::Msg::SnapshotList(list),
            &mut frame,
        )
        .unwrap();
        m.list_reply(&frame[..n]);
        let tags: Vec<_> = m.exports.iter().filter(|e| e.used).map(|e| e.tag).collect();
        assert_eq!(tags, vec![None, Some(5), Some(9999)]);
    }

    #[test]
    fn incarnations_count_failovers_after_the_first() {
        let mut s = IncarnationSeen::default();
        s.saw(3);
        s.saw(3);
        s.saw(2);
        assert_eq!((s.incarnation, s.failovers), (3, 0));
        s.saw(4);
        s.saw(6);
        assert_eq!((s.incarnation, s.failovers), (6, 2));
    }

    #[test]
    fn a_full_nbd_text_fits_its_buffer() {
        let mut m = NbdMetrics::new();
        for t in 0..u32::try_from(SNAPSHOTS_MAX).unwrap() {
            m.attach(Some(u32::MAX - t));
        }
        for op in 0..NBD_OPS {
            m.done(Some(0), op, u64::MAX / 4, true, u64::MAX / 4);
        }
        let mut buf = vec![0u8; csnap_pools::METRICS_RESPONSE_MAX_BYTES];
        let (s, e) = respond(&mut buf, Status::Ok, false, &mut |t| m.render(t));
        assert!(
            buf[s..e].starts_with(b"HTTP/1.1 200 "),
            "the largest text fits"
        );
    }
}
