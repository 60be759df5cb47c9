//! The store worker's answers: each request's next step once the store
//! has done its part (a reply, or one of the waits in `waits`).

use super::*;

impl Server {
    /// The store failed (or found itself fenced): the server stops, once.
    fn store_failed(&mut self, f: StoreFailure) {
        if !self.failed {
            self.failed = true;
            self.events.push(if f == StoreFailure::Fenced {
                ServerEvent::Fenced
            } else {
                ServerEvent::StoreFailed
            });
        }
    }

    /// A reply from the store worker.
    pub fn handle_store_reply(&mut self, reply: &StoreReply) {
        match reply.token {
            NOTIFY_TOKEN => {
                match reply.result {
                    StoreResult::AutoDeleted { tag } => {
                        self.events.push(ServerEvent::AutoDeleted { tag });
                    }
                    StoreResult::Corrupt { addr, kind, reason } => {
                        self.events
                            .push(ServerEvent::Corrupt { addr, kind, reason });
                    }
                    // The store failed outside a request (a commit's home
                    // writes, after its replies went out).
                    StoreResult::Failed(f @ (StoreFailure::Internal | StoreFailure::Fenced)) => {
                        self.store_failed(f);
                    }
                    _ => {}
                }
                return;
            }
            DETACHED_TOKEN => return,
            _ => {}
        }
        if let StoreResult::Failed(f @ (StoreFailure::Internal | StoreFailure::Fenced)) =
            reply.result
        {
            self.store_failed(f);
        }
        let token = reply.token;
        let Some(f) = self.inflight.get(token).copied() else {
            return;
        };
        if self.create.is_some_and(|c| c.token == Some(token)) {
            let created = matches!(reply.result, StoreResult::Done);
            // The reply (Ok or the error) goes out below, before any held
            // write is granted again.
            self.end_create_after_reply = Some(created);
        }
        let Some(conn) = f.conn else {
            // Orphaned: its connection went away. A snapshot open the store
            // granted is closed again.
            self.inflight.remove(token);
            if let Some(created) = self.end_create_after_reply.take() {
                self.end_create(created);
            }
            if let (InflightKind::Identify, StoreResult::Done) = (f.kind, &reply.result) {
                let pushed = self.store_q.push(StoreRequest {
                    token: DETACHED_TOKEN,
                    op: StoreOp::Use {
                        tag: f.tag,
                        open: false,
                    },
                });
                assert!(pushed, "store queue holds one detach per connection");
            }
            return;
        };
        let rid = f.request_id;
        match (&reply.result, f.kind) {
            (StoreResult::Failed(fl), kind) => {
                self.finish(token, conn);
                if kind == InflightKind::Identify {
                    self.sessions[conn as usize].state = SessionState::ExpectIdentify;
                }
                let culprit = match kind {
                    InflightKind::OriginWrite => Kind::QueryOriginWrite.code(),
                    InflightKind::SnapshotRead => Kind::QuerySnapshotRead.code(),
                    InflightKind::SnapshotWrite => Kind::QuerySnapshotWrite.code(),
                    InflightKind::Identify => Kind::Identify.code(),
                    InflightKind::Control(k) => k.code(),
                    InflightKind::Status => Kind::Status.code(),
                };
                self.send_error(conn, rid, error_code(*fl), culprit, failure_text(*fl));
            }
            (StoreResult::Done | StoreResult::WriteAhead(_), InflightKind::OriginWrite) => {
                let ahead = match reply.result {
                    StoreResult::WriteAhead(n) => n,
                    _ => 0,
                };
                if let Some(x) = self.inflight.get_mut(token) {
                    x.ahead = ahead;
                }
                if self.state == ServerState::Recovering {
                    // Held at the recovery barrier.
                    self.set_inflight_state(token, WaitingFor::Store, WaitingFor::Barrier);
                } else {
                    self.check_locks_and_grant(token, conn, f);
                }
            }
            (StoreResult::Targets(targets), InflightKind::SnapshotRead) => {
                let n = targets.len();
                // Every chunk read is locked, store-mapped ones too: a store
                // chunk shared with another snapshot may be moved off by
                // this snapshot's own write and then overwritten in place
                // by the other snapshot's writer, so every write waits for
                // the locks on its chunks. A blocking client releases them
                // after its read; a caching client keeps them as leases on
                // the mappings it caches.
                let caching = self.sessions[conn as usize].caching;
                if !self.locks.has_room(n) {
                    self.finish(token, conn);
                    self.send_error(
                        conn,
                        rid,
                        ErrorCode::Busy,
                        Kind::QuerySnapshotRead.code(),
                        "read-lock table full; retry",
                    );
                    return;
                }
                for i in 0..n {
                    let c = f.range.chunk + i as u64;
                    let held = self.locks.acquire(c, conn);
                    assert!(held.is_ok(), "room for the read's locks was checked");
                    // A write already waits for this chunk (it waits until
                    // no one holds it): a caching reader is asked at once to
                    // give it back after this read.
                    if caching && self.locks.has_waiters(c) {
                        self.release_requests.push((conn, c));
                    }
                }
                self.finish(token, conn);
                self.send_targets(conn, rid, f.range.chunk, targets, true);
                // After the reply: the lease exists at the client when it
                // reads the request to give it back.
                while let Some((o, c)) = self.release_requests.pop() {
                    self.send_release(o, c);
                }
            }
            (StoreResult::Targets(targets), InflightKind::SnapshotWrite) => {
                // The mapping change is committed. Readers that may still
                // read the old mapping hold read locks on these chunks (a
                // caching one as its lease): drain them once, then ask the
                // store again (now a plain lookup) and answer.
                if !f.rechecked && self.state == ServerState::Recovering {
                    // A lease of the former incarnation on these chunks may
                    // not be uploaded yet: held at the barrier like origin
                    // writes, then drained and answered.
                    if let Some(x) = self.inflight.get_mut(token) {
                        x.rechecked = true;
                    }
                    self.set_inflight_state(token, WaitingFor::Store, WaitingFor::Barrier);
                    self.assert_invariants();
                    return;
                }
                if !f.rechecked && self.locks_on(f.range) {
                    if let Some(x) = self.inflight.get_mut(token) {
                        x.rechecked = true;
                    }
                    self.check_locks_and_grant(token, conn, f);
                    self.assert_invariants();
                    return;
                }
                self.finish(token, conn);
                self.send_targets(conn, rid, f.range.chunk, targets, false);
            }
            (StoreResult::Done, InflightKind::Identify) => {
                self.finish(token, conn);
                if let SessionState::Identifying(tag) = self.sessions[conn as usize].state {
                    // Locks kept for a client coming back stay parked until
                    // it has uploaded what it still holds (FinishUpload):
                    // its upload is the truth, and nothing is released in
                    // between. It is not an absent origin writer either.
                    let (cid, nid) = {
                        let s = &self.sessions[conn as usize];
                        (s.client_id, s.node_id)
                    };
                    self.settle_owed(|&(c, n)| c == cid && n == nid);
                    let s = &mut self.sessions[conn as usize];
                    s.state = SessionState::Snapshot(tag);
                    s.snapshot_open = Some(tag);
                    self.identified += 1;
                    self.send_identify_ok(conn, rid);
                }
            }
            (StoreResult::Done, InflightKind::Control(_)) => {
                self.finish(token, conn);
                self.send(conn, rid, &Msg::Ok);
            }
            (StoreResult::List(rows), _) => {
                self.finish(token, conn);
                let mut b = proto::SnapListBuilder::new(&mut self.scratch[..])
                    .expect("scratch holds a full list");
                for r in rows {
                    let mut flags = 0;
                    if r.deleting {
                        flags |= SnapInfo::DELETING;
                    }
                    if r.in_use {
                        flags |= SnapInfo::IN_USE;
                    }
                    let pushed = b.push(SnapInfo {
                        tag: r.tag,
                        priority: r.priority,
                        flags,
                        ctime_secs: r.ctime_secs,
                        chunks: r.chunks,
                        unique_chunks: r.unique_chunks,
                    });
                    // At most SNAPSHOT_LIST_PAGE_ROWS rows, a page's capacity.
                    assert!(pushed.is_ok(), "a snapshot list holds every slot");
                }
                let list = b.finish();
                let mut buf = [0u8; proto::SNAP_LIST_BYTES_MAX + proto::HEADER_BYTES];
                let n = encode(
                    &Header::new(rid, self.cfg.incarnation),
                    &Msg::SnapshotList(list),
                    &mut buf,
                )
                .unwrap_or(0);
                self.push_out(conn, &buf[..n]);
            }
            (
                StoreResult::Delta {
                    chunk,
                    chunks,
                    bits,
                },
                _,
            ) => {
                self.finish(token, conn);
                let n = (*chunks as usize).div_ceil(8).min(bits.len());
                let msg = Msg::DeltaMap {
                    chunk: *chunk,
                    chunks: *chunks,
                    bits: &bits[..n],
                };
                let mut buf = [0u8; proto::HEADER_BYTES + 16 + DELTA_BITMAP_BYTES];
                match encode(&Header::new(rid, self.cfg.incarnation), &msg, &mut buf) {
                    Ok(n) => self.push_out(conn, &buf[..n]),
                    Err(_) => self.send_error(
                        conn,
                        rid,
                        ErrorCode::Internal,
                        Kind::QueryDelta.code(),
                        "the store answered a malformed delta",
                    ),
                }
            }
            (StoreResult::Status(fig), _) => {
                self.finish(token, conn);
                let msg = Msg::StatusReply {
                    incarnation: self.cfg.incarnation,
                    chunk_size_bytes: fig.chunk_size_bytes,
                    origin_chunks: fig.origin_chunks,
                    data_chunks: fig.data_chunks,
                    data_free: fig.data_free,
                    meta_blocks: fig.meta_blocks,
                    meta_free: fig.meta_free,
                    snapshots: fig.snapshots,
                    deleting: fig.deleting,
                    clients: self.identified,
                    read_locks: u32::try_from(self.locks.locked_chunks()).unwrap_or(u32::MAX),
                    waiting_writes: self.waiting_writes,
                    commits: fig.commits,
                    state: self.state,
                    copyouts: fig.copyouts,
                };
                self.send(conn, rid, &msg);
            }
            _ => {
                self.finish(token, conn);
                self.send_error(
                    conn,
                    rid,
                    ErrorCode::Internal,
                    0,
                    "unexpected store result for this request",
                );
            }
        }
        if let Some(created) = self.end_create_after_reply.take() {
            self.end_create(created);
        }
        self.assert_invariants();
    }
}
