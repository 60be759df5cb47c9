//! Snapshot creation: the revoke round with caching origin clients, the
//! create sent to the store once every answer is in, and the origin
//! writes held for it (`WaitingFor::Create`).

use super::*;

impl Server {
    /// Sets the creation time stamped on snapshots created from now on (the
    /// loop passes its clock in; the FSM reads none).
    pub fn set_now(&mut self, now_secs: u64) {
        self.now_secs = now_secs;
    }

    /// A snapshot creation: caching origin clients first forget their
    /// grants and finish their writes (`Revoke` -> `RevokeDone`), then the
    /// create goes to the store; no origin write is granted until it has
    /// committed, and writes whose copy-out predates it are copied out
    /// again.
    pub(super) fn begin_create(&mut self, conn: ConnId, rid: u64, tag: u32) {
        if self.create.is_some() {
            self.send_error(
                conn,
                rid,
                ErrorCode::Busy,
                Kind::CreateSnapshot.code(),
                "a snapshot creation is under way; retry",
            );
            return;
        }
        let revoke_id = self.next_revoke_id;
        self.next_revoke_id += 1;
        self.create = Some(PendingCreate {
            conn,
            request_id: rid,
            tag,
            revoke_id,
            waiting: 0,
            token: None,
        });
        let mut waiting = 0u32;
        for i in 0..self.sessions.len() {
            let s = &self.sessions[i];
            if s.state == SessionState::Origin && s.caching {
                self.sessions[i].revoke_owed = true;
                waiting += 1;
                let c = ConnId::try_from(i).unwrap_or(u32::MAX);
                self.send(
                    c,
                    revoke_id,
                    &Msg::Revoke {
                        what: proto::RevokeWhat::OriginGrants,
                        ranges: proto::Ranges::empty(),
                    },
                );
            }
        }
        // Caching origin clients away (disconnected on a member node, or of
        // the former incarnation and not back yet) may hold writes they
        // acknowledged: the creation waits for each to come back (its
        // identify is its answer) or leave.
        waiting += u32::try_from(self.owed.len()).unwrap_or(u32::MAX);
        if let Some(c) = self.create.as_mut() {
            c.waiting = waiting;
        }
        self.maybe_dispatch_create();
    }

    /// Drops `owed` entries matching `f`: each was one answer a pending
    /// create waited for.
    pub(super) fn settle_owed(&mut self, f: impl Fn(&(u64, u32)) -> bool) {
        let before = self.owed.len();
        self.owed.retain(|e| !f(e));
        let settled = u32::try_from(before - self.owed.len()).unwrap_or(0);
        if settled > 0 {
            if let Some(c) = self.create.as_mut() {
                c.waiting -= settled;
            }
            self.maybe_dispatch_create();
        }
    }

    pub(super) fn maybe_dispatch_create(&mut self) {
        let Some(c) = self.create else { return };
        if c.waiting > 0 || c.token.is_some() {
            return;
        }
        if self.sessions[c.conn as usize].state == SessionState::Free {
            // The control client went away: nothing to create.
            self.end_create(false);
            return;
        }
        let before = self.sessions[c.conn as usize].inflight;
        self.dispatch(
            c.conn,
            c.request_id,
            InflightKind::Control(Kind::CreateSnapshot),
            Range {
                chunk: 0,
                chunks: 1,
            },
            StoreOp::Create {
                tag: c.tag,
                now_secs: 0,
            },
        );
        if self.sessions[c.conn as usize].inflight == before {
            // Refused (Busy was sent): nothing is pending any more.
            self.end_create(false);
            return;
        }
        let token = self.last_dispatched;
        if let Some(p) = self.create.as_mut() {
            p.token = Some(token);
        }
    }

    /// The create committed (`created`) or will not happen: writes held for
    /// it go on; after a commit they are copied out again for the new
    /// snapshot first.
    pub(super) fn end_create(&mut self, created: bool) {
        self.create = None;
        for s in &mut self.sessions {
            s.revoke_owed = false;
        }
        if created {
            self.epoch += 1;
        }
        for k in 0..self.inflight.capacity() {
            let Ok(token) = u32::try_from(k) else { break };
            let Some(f) = self.inflight.get(token).copied() else {
                continue;
            };
            if f.state != WaitingFor::Create {
                continue;
            }
            self.set_inflight_state(token, WaitingFor::Create, WaitingFor::Store);
            self.grant_origin_write(token);
        }
    }
}
