//! Where a request is routed: the session's messages (handshake,
//! identify, data queries, control) and the dispatch of those that need
//! the store (a request then waits in `WaitingFor::Store`).

use super::*;

impl Server {
    pub(super) fn on_msg(&mut self, conn: ConnId, rid: u64, msg: &Msg<'_>) {
        let kind = msg.kind();
        let st = self.sessions[conn as usize].state;
        if kind.is_reply() {
            let mut t = ErrorText::new();
            let _ = write!(t, "{} is a reply; clients send requests", kind.name());
            self.send_error(conn, rid, ErrorCode::BadFrame, kind.code(), t.as_str());
            return;
        }
        match (st, msg) {
            (
                SessionState::ExpectHello,
                Msg::Hello {
                    version_min,
                    version_max,
                    role,
                },
            ) => {
                let versions = (*version_min, *version_max);
                if self.answer_hello(conn, rid, versions, None, self.cfg.server_id) {
                    self.sessions[conn as usize].state = match role {
                        Role::Client => SessionState::ExpectIdentify,
                        Role::Control | Role::Agent | Role::Server => SessionState::Control,
                    };
                }
            }
            (SessionState::ExpectHello, _) => self.refuse_hello_order(conn, rid, kind, true),
            (_, Msg::Hello { .. }) => self.refuse_hello_order(conn, rid, kind, false),
            (
                SessionState::ExpectIdentify,
                Msg::Identify {
                    client_id,
                    node_id,
                    volume,
                    origin_uuid,
                    volume_size_bytes,
                    chunk_size_bytes,
                    flags,
                },
            ) => {
                self.sessions[conn as usize].caching = flags & proto::IDENTIFY_CACHING != 0;
                self.on_identify(
                    conn,
                    rid,
                    *client_id,
                    *node_id,
                    *volume,
                    origin_uuid,
                    *volume_size_bytes,
                    *chunk_size_bytes,
                );
            }
            (_, Msg::Identify { .. }) => {
                let (code, text) = if st == SessionState::Control {
                    (
                        ErrorCode::Unsupported,
                        "control connections do not attach to volumes",
                    )
                } else {
                    (
                        ErrorCode::AlreadyIdentified,
                        "this connection is already attached to a volume",
                    )
                };
                self.send_error(conn, rid, code, kind.code(), text);
            }
            (_, m) if is_control(kind) => self.on_control(conn, rid, m),
            (SessionState::ExpectIdentify, _) => self.send_error(
                conn,
                rid,
                ErrorCode::NotIdentified,
                kind.code(),
                "send Identify before data requests",
            ),
            (SessionState::Control, _) => self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                kind.code(),
                "control connections send only control requests",
            ),
            (SessionState::Origin, Msg::QueryOriginWrite(r)) => {
                if let Some(range) = self.one_range(conn, rid, kind, r) {
                    self.dispatch(
                        conn,
                        rid,
                        InflightKind::OriginWrite,
                        range,
                        StoreOp::OriginWrite {
                            chunk: range.chunk,
                            chunks: range.chunks,
                            ahead: self.write_ahead(conn),
                        },
                    );
                }
            }
            (SessionState::Snapshot(tag), Msg::QuerySnapshotRead(r)) => {
                if let Some(range) = self.one_range(conn, rid, kind, r) {
                    self.dispatch(
                        conn,
                        rid,
                        InflightKind::SnapshotRead,
                        range,
                        StoreOp::SnapshotRead {
                            tag,
                            chunk: range.chunk,
                            chunks: range.chunks,
                        },
                    );
                }
            }
            (SessionState::Snapshot(tag), Msg::QuerySnapshotWrite(r)) => {
                if let Some(range) = self.one_range(conn, rid, kind, r) {
                    self.dispatch(
                        conn,
                        rid,
                        InflightKind::SnapshotWrite,
                        range,
                        StoreOp::SnapshotWrite {
                            tag,
                            chunk: range.chunk,
                            chunks: range.chunks,
                        },
                    );
                }
            }
            (SessionState::Snapshot(_), Msg::FinishSnapshotRead(ranges)) => {
                // Every listed hold is released; one not held is reported
                // once, after the rest of the list was processed.
                let mut not_held: Option<u64> = None;
                for r in ranges.iter() {
                    for c in r.chunk..r.end() {
                        let mut woken = core::mem::take(&mut self.woken);
                        let res = self.locks.release(c, conn, &mut |p| woken.push(p));
                        for p in woken.drain(..) {
                            self.locks_clear(p);
                        }
                        self.woken = woken;
                        if res.is_err() && not_held.is_none() {
                            not_held = Some(c);
                        }
                    }
                }
                if let Some(c) = not_held {
                    let mut t = ErrorText::new();
                    let _ = write!(t, "no read lock held on chunk {c}");
                    self.send_error(conn, rid, ErrorCode::BadFrame, kind.code(), t.as_str());
                }
            }
            (SessionState::Snapshot(_), Msg::UploadLocks(ranges)) => {
                let n: u64 = ranges.total_chunks();
                if !self
                    .locks
                    .has_room(usize::try_from(n).unwrap_or(usize::MAX))
                {
                    self.send_error(
                        conn,
                        rid,
                        ErrorCode::Busy,
                        kind.code(),
                        "read-lock table full",
                    );
                    return;
                }
                // One hold per listed chunk (a chunk held twice is listed
                // twice). Room was checked above. Locks parked for this
                // client from an earlier connection are released at its
                // FinishUpload, so nothing is counted twice for long.
                for r in ranges.iter() {
                    for c in r.chunk..r.end() {
                        let held = self.locks.acquire(c, conn);
                        assert!(held.is_ok(), "room for the upload was checked");
                    }
                }
            }
            (SessionState::Snapshot(_), Msg::FinishUpload) => {
                let id = self.sessions[conn as usize].client_id;
                // What was parked for this client is replaced by its upload.
                let mut woken = core::mem::take(&mut self.woken);
                self.release_parked(|x| x.client_id == id, &mut woken);
                for w in woken.drain(..) {
                    self.locks_clear(w);
                }
                self.woken = woken;
                for e in &mut self.expected {
                    if e.client_id == id {
                        e.done = true;
                    }
                }
                self.send(conn, rid, &Msg::UploadOk);
                self.maybe_end_recovery();
            }
            (SessionState::Origin, Msg::RevokeDone) => {
                let s = &mut self.sessions[conn as usize];
                if s.revoke_owed && self.create.is_some_and(|c| c.revoke_id == rid) {
                    s.revoke_owed = false;
                    if let Some(c) = self.create.as_mut() {
                        c.waiting -= 1;
                    }
                    self.maybe_dispatch_create();
                }
            }
            (SessionState::Origin, _) => self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                kind.code(),
                "an origin client sends QueryOriginWrite and control requests",
            ),
            (SessionState::Snapshot(_), _) => self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                kind.code(),
                "a snapshot client sends snapshot reads, writes, releases and lock uploads",
            ),
            _ => self.send_error(
                conn,
                rid,
                ErrorCode::Unsupported,
                kind.code(),
                "not accepted in this connection state",
            ),
        }
    }

    /// Data queries name one range of at most `CHUNKS_PER_REQUEST_MAX` chunks
    /// inside the origin.
    pub(super) fn one_range(
        &mut self,
        conn: ConnId,
        rid: u64,
        kind: Kind,
        ranges: &proto::Ranges<'_>,
    ) -> Option<Range> {
        let r = match (ranges.len(), ranges.get(0)) {
            (1, Some(r)) => r,
            _ => {
                self.send_error(
                    conn,
                    rid,
                    ErrorCode::Unsupported,
                    kind.code(),
                    "a data query names exactly one range",
                );
                return None;
            }
        };
        if r.chunks as usize > CHUNKS_PER_REQUEST_MAX {
            let mut t = ErrorText::new();
            let _ = write!(t, "a query covers at most {CHUNKS_PER_REQUEST_MAX} chunks");
            self.send_error(conn, rid, ErrorCode::TooLarge, kind.code(), t.as_str());
            return None;
        }
        if r.end() > self.cfg.origin_chunks() {
            let mut t = ErrorText::new();
            let _ = write!(
                t,
                "chunks {}..{} are past the end of the volume ({} chunks)",
                r.chunk,
                r.end(),
                self.cfg.origin_chunks()
            );
            self.send_error(conn, rid, ErrorCode::OutOfRange, kind.code(), t.as_str());
            return None;
        }
        Some(r)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_identify(
        &mut self,
        conn: ConnId,
        rid: u64,
        client_id: u64,
        node_id: u32,
        volume: Volume,
        origin_uuid: &[u8; 16],
        volume_size_bytes: u64,
        chunk_size_bytes: u32,
    ) {
        let code = Kind::Identify.code();
        if *origin_uuid != self.cfg.origin_uuid {
            self.send_error(
                conn,
                rid,
                ErrorCode::GeometryMismatch,
                code,
                "the client's origin is not the origin of this store (origin UUID differs)",
            );
            return;
        }
        if chunk_size_bytes != 0 && chunk_size_bytes != self.cfg.chunk_size_bytes {
            let mut t = ErrorText::new();
            let _ = write!(
                t,
                "chunk size {chunk_size_bytes} differs from the store's {}",
                self.cfg.chunk_size_bytes
            );
            self.send_error(conn, rid, ErrorCode::GeometryMismatch, code, t.as_str());
            return;
        }
        if volume_size_bytes != 0 && volume_size_bytes != self.cfg.origin_size_bytes {
            let mut t = ErrorText::new();
            let _ = write!(
                t,
                "volume size {volume_size_bytes} differs from the origin's {}",
                self.cfg.origin_size_bytes
            );
            self.send_error(conn, rid, ErrorCode::GeometryMismatch, code, t.as_str());
            return;
        }
        let s = &mut self.sessions[conn as usize];
        s.client_id = client_id;
        s.node_id = node_id;
        match volume {
            Volume::Origin => {
                s.state = SessionState::Origin;
                self.identified += 1;
                // An absent caching writer is back. It reconnects only after
                // the writes it had on the disk have landed; writes it
                // acknowledged but had not sent yet come again now. With a
                // creation pending it is asked to answer like everyone
                // else (its owed entry becomes its revoke); otherwise it
                // is simply no longer absent.
                let was_owed = self.owed.contains(&(client_id, node_id));
                if was_owed && self.create.is_some() && self.sessions[conn as usize].caching {
                    self.owed.retain(|&e| e != (client_id, node_id));
                    self.sessions[conn as usize].revoke_owed = true;
                    self.revoke_after_identify = Some(conn);
                } else {
                    self.settle_owed(|&(c, n)| c == client_id && n == node_id);
                }
                // An origin client of the former incarnation is back: it has
                // no read locks to upload.
                for e in &mut self.expected {
                    if e.client_id == client_id && e.node_id == node_id {
                        e.done = true;
                    }
                }
                self.maybe_end_recovery();
                self.send_identify_ok(conn, rid);
                if self.revoke_after_identify.take() == Some(conn) {
                    if let Some(c) = self.create {
                        self.send(
                            conn,
                            c.revoke_id,
                            &Msg::Revoke {
                                what: proto::RevokeWhat::OriginGrants,
                                ranges: proto::Ranges::empty(),
                            },
                        );
                    }
                }
            }
            Volume::Snapshot(tag) => {
                s.state = SessionState::Identifying(tag);
                let range = Range {
                    chunk: 0,
                    chunks: 1,
                };
                self.dispatch(
                    conn,
                    rid,
                    InflightKind::Identify,
                    range,
                    StoreOp::Use { tag, open: true },
                );
            }
        }
    }

    pub(super) fn send_identify_ok(&mut self, conn: ConnId, rid: u64) {
        self.send(
            conn,
            rid,
            &Msg::IdentifyOk {
                chunk_size_bytes: self.cfg.chunk_size_bytes,
                origin_size_bytes: self.cfg.origin_size_bytes,
                volume_size_bytes: self.cfg.origin_size_bytes,
            },
        );
    }

    pub(super) fn on_control(&mut self, conn: ConnId, rid: u64, m: &Msg<'_>) {
        let kind = m.kind();
        if let Msg::CreateSnapshot { tag } = *m {
            self.begin_create(conn, rid, tag);
            return;
        }
        let op = match *m {
            Msg::CreateSnapshot { tag } => StoreOp::Create { tag, now_secs: 0 },
            Msg::DeleteSnapshot { tag } => StoreOp::Delete { tag },
            Msg::SetPriority { tag, priority } => StoreOp::Priority { tag, priority },
            Msg::ListSnapshots { from } => StoreOp::List { from },
            Msg::Status => StoreOp::Status,
            Msg::QueryDelta {
                volume,
                base,
                chunk,
                chunks,
            } => StoreOp::Delta {
                volume: match volume {
                    proto::Volume::Origin => None,
                    proto::Volume::Snapshot(t) => Some(t),
                },
                base,
                chunk,
                chunks,
            },
            _ => return,
        };
        let ik = if kind == Kind::Status {
            InflightKind::Status
        } else {
            InflightKind::Control(kind)
        };
        self.dispatch(
            conn,
            rid,
            ik,
            Range {
                chunk: 0,
                chunks: 1,
            },
            op,
        );
    }

    pub(super) fn dispatch(
        &mut self,
        conn: ConnId,
        rid: u64,
        kind: InflightKind,
        range: Range,
        op: StoreOp,
    ) {
        let s = &self.sessions[conn as usize];
        if s.inflight as usize >= self.cfg.requests_per_client {
            self.send_error(
                conn,
                rid,
                ErrorCode::Busy,
                0,
                "too many requests in flight on this connection",
            );
            return;
        }
        let tag = match op {
            StoreOp::Use { tag, .. } => tag,
            _ => 0,
        };
        let Some(token) = self.inflight.insert(Inflight {
            conn: Some(conn),
            request_id: rid,
            kind,
            state: WaitingFor::Store,
            range,
            tag,
            epoch: self.epoch,
            rechecked: false,
            ahead: 0,
        }) else {
            self.send_error(conn, rid, ErrorCode::Busy, 0, "server request table full");
            return;
        };
        let op = match op {
            StoreOp::Create { tag, .. } => StoreOp::Create {
                tag,
                now_secs: self.now_secs,
            },
            other => other,
        };
        let pushed = self.store_q.push(StoreRequest { token, op });
        assert!(pushed, "store queue sized for every slot");
        self.sessions[conn as usize].inflight += 1;
        self.last_dispatched = token;
    }
}
