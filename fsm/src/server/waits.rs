//! What a request waits for after the store: read locks on its chunks
//! (`WaitingFor::Locks`), the recovery barrier (`WaitingFor::Barrier`), a snapshot
//! being created (`WaitingFor::Create`); the one transition function between
//! those states, the grants and the replies with targets.

use super::*;

impl Server {
    /// Whether any chunk of `r` is read-locked.
    pub(super) fn locks_on(&self, r: Range) -> bool {
        (r.chunk..r.end()).any(|c| self.locks.is_locked(c))
    }

    /// Copy-out (or a snapshot write's mapping change) committed; now every
    /// chunk of the write waits for the read locks taken before it (ddsnap
    /// b54143d: all chunks, not only freshly copied ones). Caching holders
    /// are asked to let go of those locks (`ReleaseLocks`): they hold them
    /// as leases, not for a read in progress.
    pub(super) fn check_locks_and_grant(&mut self, token: u32, conn: ConnId, f: Inflight) {
        let mut waiting = false;
        let culprit = match f.kind {
            InflightKind::SnapshotWrite => Kind::QuerySnapshotWrite.code(),
            _ => Kind::QueryOriginWrite.code(),
        };
        for c in f.range.chunk..f.range.end() {
            match self.locks.wait_if_locked(c, token) {
                Ok(w) => {
                    if w {
                        self.ask_release(c);
                    }
                    waiting |= w;
                }
                Err(_) => {
                    self.locks.cancel_pending(token);
                    self.finish(token, conn);
                    self.send_error(
                        conn,
                        f.request_id,
                        ErrorCode::Busy,
                        culprit,
                        "read-lock wait table full; retry",
                    );
                    return;
                }
            }
        }
        if waiting {
            self.set_inflight_state(token, WaitingFor::Store, WaitingFor::Locks);
        } else {
            self.locks_clear(token);
        }
    }

    /// Sends `ReleaseLocks` for `chunk` to every caching session holding it.
    pub(super) fn ask_release(&mut self, chunk: u64) {
        let clients = self.cfg.clients;
        let mut holders = [0u32; 8];
        let mut n = 0usize;
        let mut more = false;
        self.locks.for_each_holder(chunk, &mut |o| {
            if (o as usize) < clients {
                if n < holders.len() {
                    holders[n] = o;
                    n += 1;
                } else {
                    more = true;
                }
            }
        });
        let mut lb = [0u8; proto::LIST_HEADER_BYTES + 16];
        let Ok(list) = proto::Ranges::from_entries(&[Range { chunk, chunks: 1 }], &mut lb) else {
            return;
        };
        let msg = Msg::ReleaseLocks(list);
        for &o in &holders[..n] {
            if self.sessions[o as usize].caching {
                self.send(o, 0, &msg);
            }
        }
        if more {
            // More holders than one pass names: ask every caching session
            // attached to a snapshot (rare: a chunk read by many caching
            // clients at once).
            for i in 0..self.sessions.len() {
                let s = &self.sessions[i];
                if s.caching && matches!(s.state, SessionState::Snapshot(_)) {
                    let o = ConnId::try_from(i).unwrap_or(u32::MAX);
                    if self.locks.hold_count(chunk, o) > 0 && !holders[..n].contains(&o) {
                        self.send(o, 0, &msg);
                    }
                }
            }
        }
    }

    /// Sends `ReleaseLocks` for `chunk` to `conn`.
    pub(super) fn send_release(&mut self, conn: ConnId, chunk: u64) {
        let mut lb = [0u8; proto::LIST_HEADER_BYTES + 16];
        if let Ok(list) = proto::Ranges::from_entries(&[Range { chunk, chunks: 1 }], &mut lb) {
            self.send(conn, 0, &Msg::ReleaseLocks(list));
        }
    }

    /// No read lock stands in the way of the write in slot `token` any more.
    pub(super) fn locks_clear(&mut self, token: u32) {
        match self.inflight.get(token).map(|f| f.kind) {
            Some(InflightKind::SnapshotWrite) => self.redispatch_snapshot_write(token),
            Some(_) => self.grant_origin_write(token),
            None => {}
        }
    }

    pub(super) fn finish(&mut self, token: u32, conn: ConnId) {
        self.inflight.remove(token);
        let s = &mut self.sessions[conn as usize];
        s.inflight -= 1;
    }

    /// Leaves the `WaitingFor::Locks` state (counted once).
    pub(super) fn unwait(&mut self, token: u32) {
        if self
            .inflight
            .get(token)
            .is_some_and(|x| x.state == WaitingFor::Locks)
        {
            self.set_inflight_state(token, WaitingFor::Locks, WaitingFor::Store);
        }
    }

    /// Moves request `token` from `from` to `to`: a row of the table on
    /// `WaitingFor`, nothing else (asserted, release builds too). Keeps
    /// the count of each waiting state.
    pub(super) fn set_inflight_state(&mut self, token: u32, from: WaitingFor, to: WaitingFor) {
        use WaitingFor as S;
        assert!(
            matches!(
                (from, to),
                (S::Store, S::Store | S::Locks | S::Barrier | S::Create)
                    | (S::Locks | S::Barrier | S::Create, S::Store)
            ),
            "request {token} in flight: no move from {from:?} to {to:?}"
        );
        let Some(x) = self.inflight.get_mut(token) else {
            return;
        };
        assert_eq!(
            x.state, from,
            "request {token} in flight leaves a state it is not in"
        );
        x.state = to;
        match from {
            S::Store => {}
            S::Locks => self.waiting_writes -= 1,
            S::Barrier => self.barrier_writes -= 1,
            S::Create => self.held_writes -= 1,
        }
        match to {
            S::Store => {}
            S::Locks => self.waiting_writes += 1,
            S::Barrier => self.barrier_writes += 1,
            S::Create => self.held_writes += 1,
        }
    }

    pub(super) fn redispatch_snapshot_write(&mut self, token: u32) {
        self.unwait(token);
        let Some(f) = self.inflight.get(token).copied() else {
            return;
        };
        let Some(conn) = f.conn else {
            self.inflight.remove(token);
            return;
        };
        let SessionState::Snapshot(tag) = self.sessions[conn as usize].state else {
            self.finish(token, conn);
            return;
        };
        let pushed = self.store_q.push(StoreRequest {
            token,
            op: StoreOp::SnapshotWrite {
                tag,
                chunk: f.range.chunk,
                chunks: f.range.chunks,
            },
        });
        assert!(pushed, "store queue sized for every slot");
    }

    /// Chunks to look at for a write-ahead grant on `conn`: caching
    /// sessions only (a blocking client asks for every write).
    pub(super) fn write_ahead(&self, conn: ConnId) -> u32 {
        if self.sessions[conn as usize].caching {
            csnap_pools::ORIGIN_WRITE_AHEAD_CHUNKS
        } else {
            0
        }
    }

    pub(super) fn grant_origin_write(&mut self, token: u32) {
        self.unwait(token);
        let Some(f) = self.inflight.get(token).copied() else {
            return;
        };
        let Some(conn) = f.conn else {
            self.inflight.remove(token);
            return;
        };
        if self.create.is_some() && !self.sessions[conn as usize].revoke_owed {
            // Not granted while a snapshot is being created; except to a
            // caching session that has not answered its revoke yet: what it
            // sent before its answer belongs before the snapshot (it may
            // have acknowledged those writes to its user already), and it
            // answers only once they have landed.
            self.set_inflight_state(token, WaitingFor::Store, WaitingFor::Create);
            return;
        }
        if f.epoch != self.epoch {
            // Its copy-out predates a snapshot created since: copy out
            // again (for the new snapshot) before the grant.
            if let Some(x) = self.inflight.get_mut(token) {
                x.epoch = self.epoch;
            }
            self.set_inflight_state(token, WaitingFor::Store, WaitingFor::Store);
            let pushed = self.store_q.push(StoreRequest {
                token,
                op: StoreOp::OriginWrite {
                    chunk: f.range.chunk,
                    chunks: f.range.chunks,
                    ahead: self.write_ahead(conn),
                },
            });
            assert!(pushed, "store queue sized for every slot");
            return;
        }
        self.finish(token, conn);
        // The write-ahead grant: after the range, the chunks that need no
        // copy-out (as of this epoch: the check above) and that nobody holds
        // a read lock on (a reader that read the origin before a copy-out
        // of such a chunk may still be reading it), as more ranges. Only a
        // caching session asks for them, and a snapshot creation revokes
        // them with the rest.
        let mut ranges = [f.range; 1 + WRITE_AHEAD_RANGES_MAX];
        let mut n = 1;
        let mut bits = f.ahead;
        while bits != 0 && n < ranges.len() {
            let k = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let c = f.range.end() + k;
            if self.locks.is_locked(c) {
                continue;
            }
            if ranges[n - 1].end() == c && n > 1 {
                ranges[n - 1].chunks += 1;
            } else {
                ranges[n] = Range {
                    chunk: c,
                    chunks: 1,
                };
                n += 1;
            }
        }
        const LIST: usize = proto::LIST_HEADER_BYTES + 16 * (1 + WRITE_AHEAD_RANGES_MAX);
        let mut buf = [0u8; proto::HEADER_BYTES + LIST];
        let mut lb = [0u8; LIST];
        let Ok(list) = proto::Ranges::from_entries(&ranges[..n], &mut lb) else {
            return;
        };
        let n = encode(
            &Header::new(f.request_id, self.cfg.incarnation),
            &Msg::OriginWriteOk(list),
            &mut buf,
        )
        .unwrap_or(0);
        self.push_out(conn, &buf[..n]);
    }

    pub(super) fn send_targets(
        &mut self,
        conn: ConnId,
        rid: u64,
        first: u64,
        targets: &[StoreTarget],
        read: bool,
    ) {
        // Coalesce runs: consecutive origin chunks, or consecutive chunks in
        // consecutive store chunks.
        let mut scratch = core::mem::take(&mut self.scratch);
        let mut b = proto::TargetsBuilder::new(&mut scratch[..]).expect("scratch holds targets");
        let mut i = 0;
        while i < targets.len() {
            let start = i;
            let t0 = targets[i];
            i += 1;
            while i < targets.len() {
                let next_ok = match (t0, targets[i]) {
                    (StoreTarget::Origin, StoreTarget::Origin) => true,
                    (StoreTarget::Store(a), StoreTarget::Store(b)) => b == a + (i - start) as u64,
                    _ => false,
                };
                if !next_ok {
                    break;
                }
                i += 1;
            }
            let (kind, store_chunk) = match t0 {
                StoreTarget::Origin => (TargetKind::Origin, 0),
                StoreTarget::Store(s) => (TargetKind::Store, s),
            };
            let pushed = b.push(Target {
                chunk: first + start as u64,
                chunks: u32::try_from(i - start).unwrap_or(u32::MAX),
                kind,
                store_chunk,
            });
            // At most one run per chunk of a request: the list's capacity.
            assert!(pushed.is_ok(), "a target list holds a request's chunks");
        }
        let list = b.finish();
        let msg = if read {
            Msg::SnapshotReadReply(list)
        } else {
            Msg::SnapshotWriteOk(list)
        };
        let mut frame = [0u8; REPLY_MAX_BYTES];
        let n = encode(&Header::new(rid, self.cfg.incarnation), &msg, &mut frame).unwrap_or(0);
        self.scratch = scratch;
        self.push_out(conn, &frame[..n]);
    }
}

/// Ranges a write-ahead grant adds at most: every other chunk of the window.
const WRITE_AHEAD_RANGES_MAX: usize = csnap_pools::ORIGIN_WRITE_AHEAD_CHUNKS as usize / 2;
