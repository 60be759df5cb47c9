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
    /// Asks for the page of the snapshot list from tag `from`; `None` when
    /// too many questions are out.
    pub(super) fn request_list(&mut self, sh: &Shared, now: u64, from: u32) -> Option<u64> {
        self.request(sh, Request::List(from), now)
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

/// A page of a listing for `LIST` or a meta-context query: its live tags
/// join the slot's list, and a non-empty page asks for the next one (from
/// one past its last tag) in its stead: `true` while pages are still to
/// come. A page that cannot be asked for ends the listing with what came.
fn list_page(slot: &mut Slot, list: Option<proto::SnapList<'_>>, fsm: &mut ClientFsm) -> bool {
    let Some(l) = list else {
        return false;
    };
    for info in l.iter().filter(|i| !i.deleting()) {
        if slot.list_n < SNAPSHOTS_MAX {
            slot.list_tags[slot.list_n] = info.tag;
            slot.list_n += 1;
        }
    }
    let Some(from) = l.iter().map(|i| i.tag).max().and_then(|t| t.checked_add(1)) else {
        return false;
    };
    match (fsm.request(Request::List(from)), &mut slot.ctl) {
        (Some(next), CtlWait::List { id, .. } | CtlWait::Meta { id, .. }) => {
            *id = next;
            true
        }
        _ => false,
    }
}

/// A control reply for the slot that asked.
pub(super) fn route_control_reply(
    slots: &mut [Slot],
    id: u64,
    frame: &[u8],
    export_size: u64,
    write_back: bool,
    fsm: &mut ClientFsm,
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
            if list_page(slot, list, fsm) {
                return true;
            }
            let mut tags = [0u32; SNAPSHOTS_MAX];
            let n = slot.list_n;
            tags[..n].copy_from_slice(&slot.list_tags[..n]);
            let found = tag.is_none_or(|t| tags[..n].contains(&t));
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
            if list_page(slot, list, fsm) {
                return true;
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
