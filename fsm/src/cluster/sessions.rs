//! The controller's connections: accept, frames in, disconnects, and
//! output (the slots live in `crate::conns::ConnTable`).

use super::*;

impl Controller {
    // -- connections -----------------------------------------------------------

    /// A new connection; `None` when the table is full.
    pub fn handle_accept(&mut self) -> Option<CtlConnId> {
        self.conns.accept()
    }

    /// Whether the driver should hand over more frames of `conn`.
    pub fn wants_read(&self, conn: CtlConnId) -> bool {
        self.conns.wants_read(conn, proto::FRAME_MAX_BYTES / 2)
    }

    conns::frame_api!(CtlConnId, conns, on_msg);

    /// `conn` closed or failed.
    pub fn handle_disconnect(&mut self, conn: CtlConnId) {
        let role = self.conns[conn as usize].role;
        if role == CtlConnState::Free {
            return;
        }
        // An agent's connection the controller closed (it stopped reading,
        // or its stream broke) is still bound to its node until now.
        let node = match role {
            CtlConnState::Agent { node } => node,
            CtlConnState::Closing => self
                .nodes
                .iter()
                .find(|r| r.conn == Some(conn))
                .map(|r| r.id),
            _ => None,
        };
        if let Some(n) = node {
            if let Some(r) = self.rec(n) {
                if r.conn == Some(conn) {
                    r.conn = None;
                    r.standby_ready = false;
                    r.serving = 0;
                }
            }
            self.events
                .push_or_count(ControllerEvent::Disconnected { node: n });
            self.node_lost(n);
            self.broadcast_members();
        }
        self.pending_starts.retain(|p| p.0 != conn);
        let c = &mut self.conns[conn as usize];
        c.role = CtlConnState::Free;
        c.out.clear();
        self.assert_invariants();
    }

    // -- output ----------------------------------------------------------------

    pub(super) fn broadcast_members(&mut self) {
        self.epoch += 1;
        let mut scratch = core::mem::take(&mut self.scratch);
        if let Ok(mut b) = proto::NodeListBuilder::new(&mut scratch[..]) {
            for r in &self.nodes {
                if r.conn.is_some() && !r.left {
                    // At most NODES_MAX rows, the list's capacity.
                    assert!(
                        b.push(Node { id: r.id }).is_ok(),
                        "a node list holds NODES_MAX"
                    );
                }
            }
            let msg = Msg::Members {
                epoch: self.epoch,
                members: b.finish(),
            };
            self.broadcast(&msg);
        }
        self.scratch = scratch;
    }

    pub(super) fn broadcast(&mut self, msg: &Msg<'_>) {
        for i in 0..self.conns.len() {
            if matches!(self.conns[i].role, CtlConnState::Agent { node: Some(_) }) {
                let c = CtlConnId::try_from(i).unwrap_or(u32::MAX);
                self.send(c, 0, msg);
            }
        }
    }

    pub(super) fn send(&mut self, conn: CtlConnId, rid: u64, msg: &Msg<'_>) {
        if self.conns.is_gone(conn) {
            return;
        }
        if !self.conns.push_msg(conn, rid, 0, msg) {
            self.close(conn);
        }
    }

    pub(super) fn close(&mut self, conn: CtlConnId) {
        self.conns.close(conn);
    }

    conns::driver_api!(CtlConnId, conns);
}
