//! The control connection: snapshot lists for `LIST` and `INFO`, and the
//! block-status queries answered from the server.

use super::*;

/// A control connection to the server through the agent, made on first use
/// and kept; it rides out failovers like the engines' connections.
pub(super) struct Control {
    pub(super) fsm: ClientFsm,
    pub(super) link: Link,
}

impl Control {
    /// Asks for the snapshot list; `None` when too many questions are out.
    pub(super) fn request_list(&mut self, sh: &Shared, now: u64) -> Option<u64> {
        self.request(sh, Request::List, now)
    }

    /// Sends a control request (connecting first if need be); `None` when
    /// too many questions are out.
    pub(super) fn request(&mut self, sh: &Shared, req: Request, now: u64) -> Option<u64> {
        if !self.link.active() {
            self.link.start(0, sh.node_id, None, now);
        }
        self.fsm.request(req)
    }
}

/// A control reply for the slot that asked.
pub(super) fn route_control_reply(
    slots: &mut [Slot],
    id: u64,
    frame: &[u8],
    export_size: u64,
    write_back: bool,
) -> bool {
    let Some(slot) = slots.iter_mut().find(|s| s.ctl.id() == Some(id)) else {
        return false;
    };
    let decoded = proto::decode(frame);
    let list = match decoded {
        Ok((_, Msg::SnapshotList(l))) => Some(l),
        _ => None,
    };
    match slot.ctl {
        CtlWait::Meta { tag, .. } => {
            let mut tags = [0u32; SNAPSHOTS_MAX];
            let mut n = 0;
            let mut found = tag.is_none();
            if let Some(l) = list {
                for info in l.iter().filter(|i| !i.deleting()) {
                    if n < SNAPSHOTS_MAX {
                        tags[n] = info.tag;
                        n += 1;
                    }
                    found |= Some(info.tag) == tag;
                }
            }
            slot.answer_meta(found.then_some(&tags[..n]));
        }
        CtlWait::Delta { base, .. } => {
            slot.delta_state = match decoded {
                Ok((
                    _,
                    Msg::DeltaMap {
                        chunk,
                        chunks,
                        bits,
                    },
                )) if bits.len() <= slot.delta.len() => {
                    slot.delta[..bits.len()].copy_from_slice(bits);
                    DeltaState::Ready {
                        base,
                        chunk,
                        chunks,
                    }
                }
                // The snapshot went away (or never was one of this
                // export's): the request names nothing that exists.
                Ok((
                    _,
                    Msg::Error {
                        code: ErrorCode::NoSuchSnapshot | ErrorCode::OutOfRange,
                        ..
                    },
                )) => DeltaState::Failed(NbdError::Inval),
                _ => DeltaState::Failed(NbdError::Io),
            };
        }
        CtlWait::List { .. } => {
            slot.list_n = 0;
            if let Some(l) = list {
                for info in l.iter().filter(|i| !i.deleting()) {
                    if slot.list_n < SNAPSHOTS_MAX {
                        slot.list_tags[slot.list_n] = info.tag;
                        slot.list_n += 1;
                    }
                }
            }
            slot.list_pos = 0;
            slot.listing = true;
        }
        CtlWait::Info { tag, .. } => {
            let live = list.is_some_and(|l| l.iter().any(|i| i.tag == tag && !i.deleting()));
            let info = live.then(|| slot.export_info(export_size, write_back));
            slot.answer(info);
        }
        CtlWait::None => {}
    }
    slot.ctl = CtlWait::None;
    true
}
