//! Origin writes: the grant bitmap, a write's start (straight to the disk
//! when every chunk is granted, else asked about), and the revoke that a
//! snapshot creation sends (answered once the writes started before it have
//! landed; writes submitted meanwhile wait in `AwaitRevoke`).

use csnap_proto::{self as proto, Msg, Range, RevokeWhat};

use super::{Dev, DiskOp, Phase, QueryKind, VolumeEngine};

impl VolumeEngine {
    pub(super) fn granted(&self, c: u64) -> bool {
        let w = usize::try_from(c / 64).unwrap_or(usize::MAX);
        self.granted
            .get(w)
            .is_some_and(|x| x & (1 << (c % 64)) != 0)
    }

    pub(super) fn grant(&mut self, r: Range) {
        for c in r.chunk..r.end() {
            let w = usize::try_from(c / 64).unwrap_or(usize::MAX);
            if let Some(x) = self.granted.get_mut(w) {
                *x |= 1 << (c % 64);
            }
        }
    }

    pub(super) fn forget_grants(&mut self) {
        self.granted.iter_mut().for_each(|w| *w = 0);
    }

    pub(super) fn start_origin_write(&mut self, slot: u32) {
        let Some(io) = self.ios.get(slot).copied() else {
            return;
        };
        let (first, last) = self.chunks_of(&io);
        let all = self.revoking.is_none() && (first..=last).all(|c| self.granted(c));
        self.origin_writes_active += 1;
        if all {
            self.origin_to_disk(slot);
        } else {
            // Started from here on (a query refused at once completes it
            // as a started write).
            if let Some(io) = self.ios.get_mut(slot) {
                io.enter(Phase::AwaitServer {
                    queries: 0,
                    disk: 0,
                });
            }
            self.query_all(slot, QueryKind::OriginWrite);
        }
    }

    pub(super) fn origin_to_disk(&mut self, slot: u32) {
        let Some(io) = self.ios.get_mut(slot) else {
            return;
        };
        io.enter(Phase::AwaitOriginDisk { disk: 0 });
        let (offset, len) = (io.offset, io.len);
        self.origin_writes_on_disk += 1;
        self.disk(DiskOp::Write {
            slot,
            dev: Dev::Origin,
            dev_offset: offset,
            buf_offset: 0,
            len,
        });
    }

    pub(super) fn on_notification(&mut self, frame: &[u8]) {
        let Ok((hdr, msg)) = proto::decode(frame) else {
            return;
        };
        match msg {
            Msg::Revoke {
                what: RevokeWhat::OriginGrants,
                ..
            } => {
                self.forget_grants();
                self.revoking = Some(hdr.request_id);
                self.maybe_revoke_done();
            }
            Msg::Revoke { .. } => {
                // Mappings are leases here: nothing else is cached. Answer
                // at once.
                self.client.revoke_done(hdr.request_id);
            }
            Msg::ReleaseLocks(ranges) => {
                for r in ranges.iter() {
                    for c in r.chunk..r.end() {
                        let Some(i) = self.lease_index.get(c) else {
                            continue;
                        };
                        let Some(l) = self.leases.get_mut(i) else {
                            continue;
                        };
                        if l.in_use == 0 {
                            self.drop_lease(i);
                        } else {
                            l.release_asked = true;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The revoke is answered once every origin write started before it
    /// has landed (the server grants those while our answer is owed: they
    /// belong before the snapshot, like everything already acknowledged);
    /// writes submitted meanwhile start after the answer.
    pub(super) fn maybe_revoke_done(&mut self) {
        if self.origin_writes_active == 0 {
            if let Some(id) = self.revoking.take() {
                self.client.revoke_done(id);
                self.start_deferred();
            }
        }
    }

    pub(super) fn start_deferred(&mut self) {
        let cap = u32::try_from(self.ios.capacity()).unwrap_or(0);
        for slot in 0..cap {
            if self
                .ios
                .get(slot)
                .is_some_and(|io| io.phase == Phase::AwaitRevoke)
            {
                self.start_origin_write(slot);
            }
        }
    }
}
