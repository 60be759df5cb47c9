//! Queries to the server for an I/O's chunks, and the answers: a grant,
//! snapshot mappings (leases), store targets of a snapshot write, or an
//! error (asked again of the next server, after giving back idle leases,
//! or the I/O fails).

use csnap_proto::{self as proto, ErrorCode, Msg, Range, TargetKind, Volume};

use super::{
    Dev, DiskOp, EngineSignal, Io, IoError, IoKind, Phase, Query, QueryKind, Request, Target,
    VolumeEngine,
};

impl VolumeEngine {
    pub(super) fn query_all(&mut self, slot: u32, kind: QueryKind) {
        let Some(io) = self.ios.get(slot).copied() else {
            return;
        };
        let (first, last) = self.chunks_of(&io);
        let mut c = first;
        while c <= last {
            let n = (last - c + 1).min(csnap_pools::CHUNKS_PER_REQUEST_MAX as u64);
            let r = Range {
                chunk: c,
                chunks: u32::try_from(n).unwrap_or(1),
            };
            self.query(slot, kind, r, 0);
            c += n;
        }
    }

    pub(super) fn query(&mut self, slot: u32, kind: QueryKind, r: Range, retries: u8) {
        let req = match kind {
            QueryKind::OriginWrite => Request::OriginWrite(r),
            QueryKind::SnapshotRead => Request::SnapshotRead(r),
            QueryKind::SnapshotWrite => Request::SnapshotWrite(r),
        };
        let Some(k) = self.queries.iter().position(Option::is_none) else {
            self.fail_io(slot, IoError::Server(ErrorCode::Busy));
            return;
        };
        let Some(id) = self.client.request(req) else {
            // More queries than the client keeps outstanding: refuse this
            // I/O (backpressure; the driver bounds I/Os per engine below
            // that).
            self.fail_io(slot, IoError::Server(ErrorCode::Busy));
            return;
        };
        self.queries[k] = Some(Query {
            id,
            slot,
            range: r,
            retries,
            deaths: 0,
        });
        if let Some(io) = self.ios.get_mut(slot) {
            io.query_sent();
        }
    }

    pub(super) fn fail_io(&mut self, slot: u32, e: IoError) {
        if let Some(io) = self.ios.get_mut(slot) {
            io.error.get_or_insert(e);
        }
        self.maybe_complete(slot);
    }

    pub(super) fn on_reply(&mut self, id: u64, frame: &[u8]) -> EngineSignal {
        let Some(k) = self
            .queries
            .iter()
            .position(|q| q.is_some_and(|q| q.id == id))
        else {
            return EngineSignal::None;
        };
        let Some(q) = self.queries[k].take() else {
            return EngineSignal::None;
        };
        if let Some(io) = self.ios.get_mut(q.slot) {
            io.query_gone();
        }
        let Ok((_, msg)) = proto::decode(frame) else {
            self.fail_io(q.slot, IoError::Server(ErrorCode::BadFrame));
            return EngineSignal::None;
        };
        let kind = match self.ios.get(q.slot).map(|io| (io.kind, self.volume)) {
            Some((IoKind::Write, Volume::Origin)) => QueryKind::OriginWrite,
            Some((IoKind::Read, _)) => QueryKind::SnapshotRead,
            _ => QueryKind::SnapshotWrite,
        };
        match msg {
            Msg::Error {
                code: ErrorCode::StaleIncarnation,
                ..
            } => {
                // A fenced server: ask the next one.
                self.query(q.slot, kind, q.range, q.retries);
                return EngineSignal::Stale;
            }
            Msg::Error { code, .. } => {
                if code == ErrorCode::Busy && q.retries < csnap_pools::VOLUME_BUSY_RETRIES_MAX {
                    // A pool of the server's is full (most likely its lock
                    // table): give back idle leases and ask again.
                    self.release_idle_leases();
                    self.query(q.slot, kind, q.range, q.retries + 1);
                    return EngineSignal::None;
                }
                self.fail_io(q.slot, IoError::Server(code));
            }
            Msg::OriginWriteOk(list) => {
                if self.revoking.is_none() {
                    self.grant(q.range);
                    // A write-ahead grant: the ranges after the query's that
                    // need no copy-out either (a caching session's; a
                    // creation revokes them with the rest). Only within the
                    // window the server looks at.
                    let window = q.range.end()
                        ..q.range.end() + u64::from(csnap_pools::ORIGIN_WRITE_AHEAD_CHUNKS);
                    for r in list.iter() {
                        if window.contains(&r.chunk) && r.end() <= window.end {
                            self.grant(r);
                        }
                    }
                }
                self.maybe_to_disk(q.slot);
            }
            Msg::SnapshotReadReply(targets) => {
                for t in targets.iter() {
                    let target = |k: u64| match t.kind {
                        TargetKind::Origin => Target::Origin,
                        TargetKind::Store => Target::Store(t.store_chunk + k),
                    };
                    // The server holds a lock on every chunk for us (we
                    // cache): record the holds for upload after a failover.
                    let _ = self.client.note_locked(t.range());
                    let (first, last) = self
                        .ios
                        .get(q.slot)
                        .map_or((t.chunk, u64::MAX), |io| self.chunks_of(io));
                    for k in 0..u64::from(t.chunks) {
                        let c = t.chunk + k;
                        if c > last {
                            self.add_idle_lease(c, target(k));
                        } else {
                            self.add_lease(q.slot, first, c, target(k));
                        }
                    }
                }
                self.evict();
                self.maybe_to_disk(q.slot);
            }
            Msg::SnapshotWriteOk(targets) => {
                // Our own leases on these chunks were released before the
                // server answered (it drains every lease first).
                let Some(io) = self.ios.get(q.slot).copied() else {
                    return EngineSignal::None;
                };
                for t in targets.iter() {
                    if t.kind != TargetKind::Store {
                        continue;
                    }
                    self.store_runs_to_disk(q.slot, &io, t.chunk, t.chunks, t.store_chunk, true);
                }
                self.maybe_to_disk(q.slot);
            }
            _ => self.fail_io(q.slot, IoError::Server(ErrorCode::BadFrame)),
        }
        EngineSignal::None
    }

    /// Every query of an I/O answered: its data goes to or from the disk.
    pub(super) fn maybe_to_disk(&mut self, slot: u32) {
        let Some(io) = self.ios.get(slot).copied() else {
            return;
        };
        if io.phase.queries() > 0 {
            return;
        }
        if io.error.is_none() && io.origin_write {
            self.origin_to_disk(slot);
            return;
        }
        if let (Some(io), Phase::AwaitServer { disk, .. }) = (self.ios.get_mut(slot), io.phase) {
            io.enter(Phase::AwaitDisk { disk });
        }
        if io.error.is_some() {
            self.maybe_complete(slot);
            return;
        }
        match (io.kind, self.volume) {
            (IoKind::Read, Volume::Snapshot(_)) => self.snapshot_read_to_disk(slot),
            _ => self.maybe_complete(slot),
        }
    }

    /// Disk writes (or reads) of one store target run, clipped to the I/O.
    pub(super) fn store_runs_to_disk(
        &mut self,
        slot: u32,
        io: &Io,
        chunk: u64,
        chunks: u32,
        store_chunk: u64,
        write: bool,
    ) {
        let start = (chunk * self.chunk).max(io.offset);
        let end = ((chunk + u64::from(chunks)) * self.chunk).min(io.offset + u64::from(io.len));
        if start >= end {
            return;
        }
        let dev_offset =
            self.cfg.data_start_bytes + store_chunk * self.chunk + (start - chunk * self.chunk);
        let buf_offset = u32::try_from(start - io.offset).unwrap_or(0);
        let len = u32::try_from(end - start).unwrap_or(0);
        let op = if write {
            DiskOp::Write {
                slot,
                dev: Dev::Store,
                dev_offset,
                buf_offset,
                len,
            }
        } else {
            DiskOp::Read {
                slot,
                dev: Dev::Store,
                dev_offset,
                buf_offset,
                len,
            }
        };
        self.disk(op);
    }
}
