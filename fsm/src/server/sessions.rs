//! The server's connections: accept, frames in, disconnects, and the
//! output and close queues (the slots live in `crate::conns::ConnTable`).

use super::*;

impl Server {
    // -- inputs ----------------------------------------------------------------

    /// A new connection. `None`: the client table is full.
    pub fn handle_accept(&mut self) -> Option<ConnId> {
        let conn = self.sessions.accept()?;
        self.assert_invariants();
        Some(conn)
    }

    /// The frame to send to a connection refused by `handle_accept`.
    pub fn too_many_clients_frame(&self, out: &mut [u8]) -> usize {
        let msg = Msg::Error {
            code: ErrorCode::TooManyClients,
            culprit: 0,
            text: "the server serves its maximum number of clients; try again later",
        };
        encode(&Header::new(0, self.cfg.incarnation), &msg, out).unwrap_or(0)
    }

    /// Whether the loop should read and hand over more frames of `conn`.
    pub fn wants_read(&self, conn: ConnId) -> bool {
        let s = &self.sessions[conn as usize];
        match s.state {
            SessionState::Free | SessionState::Closing | SessionState::Identifying(_) => false,
            _ => {
                let free = self.sessions.out_free(conn);
                (s.inflight as usize) < self.cfg.requests_per_client
                    && free >= (s.inflight as usize + 2) * REPLY_MAX_BYTES
            }
        }
    }

    conns::frame_api!(ConnId, sessions, on_msg);

    /// The connection closed or failed. Its read locks are released (a
    /// client that comes back after a disconnect re-uploads what it still
    /// holds); its waiting writes and pending requests are dropped.
    pub fn handle_disconnect(&mut self, conn: ConnId) {
        let st = self.sessions[conn as usize].state;
        if st == SessionState::Free {
            return;
        }
        let mut woken = core::mem::take(&mut self.woken);
        // Membership decides: a client whose node is still a member keeps
        // its locks (parked) until it comes back or its node leaves.
        let (client_id, node_id, gone) = {
            let s = &self.sessions[conn as usize];
            (s.client_id, s.node_id, s.gone)
        };
        let keep = self.membership_known
            && !gone
            && matches!(st, SessionState::Snapshot(_))
            && self.locks.holds_of(conn) > 0
            && self.members.contains(&node_id);
        let slot = if keep {
            self.parked.iter().position(Option::is_none)
        } else {
            None
        };
        if let Some(p) = slot {
            self.parked[p] = Some(Parked { client_id, node_id });
            let owner = u32::try_from(self.cfg.clients + p).unwrap_or(u32::MAX);
            self.locks.transfer_owner(conn, owner);
        } else {
            self.locks.release_owner(conn, &mut |p| woken.push(p));
        }
        // Slots of this connection: waiting ones are cancelled, ones at the
        // store are orphaned.
        let mut k = 0u32;
        while (k as usize) < self.inflight.capacity() {
            if let Some(f) = self.inflight.get(k).copied() {
                if f.conn == Some(conn) {
                    if f.state == WaitingFor::Locks {
                        self.locks.cancel_pending(k);
                        self.waiting_writes -= 1;
                        self.inflight.remove(k);
                    } else if f.state == WaitingFor::Barrier {
                        self.barrier_writes -= 1;
                        self.inflight.remove(k);
                    } else if f.state == WaitingFor::Create {
                        self.held_writes -= 1;
                        self.inflight.remove(k);
                    } else if let Some(f) = self.inflight.get_mut(k) {
                        f.conn = None;
                    }
                }
            }
            k += 1;
        }
        woken.retain(|&p| self.inflight.get(p).is_some_and(|f| f.conn != Some(conn)));
        for p in woken.drain(..) {
            self.locks_clear(p);
        }
        self.woken = woken;
        if let Some(tag) = self.sessions[conn as usize].snapshot_open {
            let pushed = self.store_q.push(StoreRequest {
                token: DETACHED_TOKEN,
                op: StoreOp::Use { tag, open: false },
            });
            assert!(pushed, "store queue holds one detach per connection");
        }
        if matches!(st, SessionState::Origin | SessionState::Snapshot(_)) {
            self.identified -= 1;
        }
        let s = &self.sessions[conn as usize];
        if st == SessionState::Origin && s.caching {
            // A caching origin client gone. If its node is still a member
            // it may be alive, with writes it acknowledged and has not
            // finished: every snapshot creation waits for it until it
            // identifies again (it reconnects only after finishing them) or
            // its node leaves. Otherwise (standalone server, its node gone,
            // its agent said it is gone) nothing of it is left to wait for.
            let owed_answer = s.revoke_owed;
            let keep = self.membership_known
                && !gone
                && self.members.contains(&node_id)
                && !self.owed.contains(&(client_id, node_id))
                && self.owed.len() < self.owed.capacity();
            if keep {
                self.owed.push((client_id, node_id));
            }
            if owed_answer && !keep {
                if let Some(c) = self.create.as_mut() {
                    c.waiting -= 1;
                }
            }
        }
        let s = &mut self.sessions[conn as usize];
        s.role = Session::FREE;
        s.out.clear();
        if self
            .create
            .is_some_and(|c| c.conn == conn && c.token.is_none())
        {
            // Its control client went away before the create was sent to
            // the store (it still waited for answers): nothing to create.
            // Kept, it would answer whatever session reuses the id.
            self.end_create(false);
        }
        self.maybe_dispatch_create();
        self.assert_invariants();
    }

    // -- output ------------------------------------------------------------------

    pub(super) fn send(&mut self, conn: ConnId, rid: u64, msg: &Msg<'_>) {
        let mut frame = [0u8; 512];
        match encode(&Header::new(rid, self.cfg.incarnation), msg, &mut frame) {
            Ok(n) => self.push_out(conn, &frame[..n]),
            Err(_) => self.close(conn),
        }
    }

    pub(super) fn push_out(&mut self, conn: ConnId, bytes: &[u8]) {
        if self.sessions[conn as usize].state == SessionState::Free {
            return;
        }
        if !self.sessions.push_bytes(conn, bytes) {
            // The client does not read its replies: drop it.
            self.close(conn);
        }
    }

    pub(super) fn close(&mut self, conn: ConnId) {
        let s = &mut self.sessions[conn as usize];
        if s.state == SessionState::Free {
            return;
        }
        if matches!(s.state, SessionState::Origin | SessionState::Snapshot(_)) {
            // No longer an attached client (`handle_disconnect` sees
            // `Closing` and does not count it again).
            self.identified -= 1;
        }
        self.sessions.close(conn);
    }

    conns::driver_api!(ConnId, sessions);
}
