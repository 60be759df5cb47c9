//! The store worker: the only code that touches the store and the disks on
//! the server's metadata path.
//!
//! It takes a batch of requests, runs each against the store, performs the
//! copy-outs (origin chunk to store chunk, or shared store chunk to a new one)
//! through one chunk buffer reserved at init, commits once for the whole batch
//! (group commit), and only then hands the replies back. A reply therefore
//! always describes durable metadata.
//!
//! Running it on its own thread keeps disk latency out of the network loop:
//! the loop's step is bounded by socket work and ring hand-offs.

use arrayvec::ArrayVec;
use csnap_fsm::store_ops::{
    SnapRow, StoreFailure, StoreFigures, StoreOp, StoreReply, StoreRequest, StoreResult, Target,
    DELTA_BITMAP_BYTES,
};
use csnap_pools::{CHUNKS_PER_REQUEST_MAX, SNAPSHOTS_MAX, SNAPSHOT_LIST_PAGE_ROWS};
use csnap_store::disk::Disk;
use csnap_store::{Mapping, OriginWrite, SnapshotWrite, Store, StoreError};

/// Token of a reply that answers no request: a notification.
pub const NOTIFY_TOKEN: u32 = u32::MAX;

/// Corrupt blocks remembered so each is logged once (a small ring: a block
/// met again after eight others is logged again).
const REPORTED_MAX: usize = 8;

/// Records deleted per background step.
const DELETE_STEP_RECORDS: usize = csnap_pools::DELETE_STEP_RECORDS_MAX;

/// The worker.
#[derive(Debug)]
pub struct StoreWorker<D: Disk, O: Disk> {
    store: Option<Store<D>>,
    standby: Option<csnap_store::Standby<D>>,
    origin: O,
    chunk_buf: csnap_store::disk::IoBuf,
    replies: Vec<StoreReply>,
    in_use: [u32; SNAPSHOTS_MAX],
    failed: bool,
    fenced: bool,
    recheck_fence: bool,
    /// First reply of this batch that may depend on the open transaction
    /// (replies before it were committed by a mid-batch commit, or were
    /// answered while the transaction held nothing).
    tx_first_reply: usize,
    /// Corrupt blocks already logged.
    reported: [u64; REPORTED_MAX],
    reported_next: usize,
    /// Background deletion met a corrupt block: it stops (retrying would
    /// spin on the same block).
    background_blocked: bool,
    /// The store's lease once started (`with_lease`).
    lease: Option<std::time::Duration>,
    /// A claiming start's wait (`SERVER_TAKEOVER_WAIT_MS`).
    takeover_wait: std::time::Duration,
    /// Copy-outs made (origin or shared store chunk to a new store chunk).
    copyouts: u64,
}

fn failure(e: &StoreError) -> StoreFailure {
    match e {
        StoreError::NoSuchSnapshot(_) => StoreFailure::NoSuchSnapshot,
        StoreError::SnapshotExists(_) => StoreFailure::SnapshotExists,
        StoreError::TooManySnapshots => StoreFailure::TooManySnapshots,
        StoreError::ChunkOutOfRange { .. } => StoreFailure::OutOfRange,
        StoreError::StoreFull => StoreFailure::StoreFull,
        StoreError::Fenced { .. } => StoreFailure::Fenced,
        StoreError::Corrupt { .. } => StoreFailure::Corrupt,
        _ => StoreFailure::Internal,
    }
}

/// Claims the store for a takeover (`Standby::claim`, waiting `wait`) and
/// says on stderr what it claimed (heap-free): the standby's worker and a
/// server started by hand use it.
pub fn claim_logged<D: Disk>(
    standby: &mut csnap_store::Standby<D>,
    wait: std::time::Duration,
) -> Result<(), StoreError> {
    let wait_ms = wait.as_millis();
    match standby.claim(wait)? {
        0 => eprintln!(
            "csnap server: takeover: the home superblock does not verify, nothing to claim; waited {wait_ms} ms"
        ),
        inc => eprintln!(
            "csnap server: takeover: claimed incarnation {inc}, waited {wait_ms} ms (the former server may still run)"
        ),
    }
    Ok(())
}

/// One heap-free log line naming the disk failure that stops the server
/// (issue #15: "stops serving with a clear message"); the server loop's
/// own line follows. Other errors (fenced, corrupt) have their own lines.
fn log_store_failure(what: &str, e: &StoreError) {
    if let StoreError::Disk(d) = e {
        log_disk_failure(what, d);
    }
}

fn log_disk_failure(what: &str, d: &csnap_store::disk::DiskError) {
    use csnap_store::disk::DiskError;
    match *d {
        DiskError::Os(errno) => eprintln!(
            "csnap server: {what}: {} (os error {errno})",
            csnap_sys::errno_text(errno)
        ),
        DiskError::Short { offset } => {
            eprintln!("csnap server: {what}: short transfer at byte {offset}");
        }
        DiskError::OutOfRange { offset, len, size } => eprintln!(
            "csnap server: {what}: {len} bytes at byte {offset} are past the device's {size}"
        ),
        _ => eprintln!("csnap server: {what}: the device refused the access"),
    }
}

impl<D: Disk, O: Disk> StoreWorker<D, O> {
    /// Wraps an open store and its origin; reserves the chunk buffer and room
    /// for `batch_max` replies. The only allocations.
    pub fn new(store: Store<D>, origin: O, batch_max: usize) -> Self {
        let chunk = store.chunk_size_bytes() as usize;
        Self::build(Some(store), None, origin, batch_max, chunk)
    }

    /// A worker over a standby store: every buffer reserved (the chunk buffer
    /// at the largest chunk size), nothing read until `StoreOp::Start`.
    pub fn standby(standby: csnap_store::Standby<D>, origin: O, batch_max: usize) -> Self {
        let chunk = csnap_pools::CHUNK_SIZE_MAX_BYTES as usize;
        Self::build(None, Some(standby), origin, batch_max, chunk)
    }

    fn build(
        store: Option<Store<D>>,
        standby: Option<csnap_store::Standby<D>>,
        origin: O,
        batch_max: usize,
        chunk: usize,
    ) -> Self {
        StoreWorker {
            store,
            standby,
            origin,
            chunk_buf: csnap_store::disk::io_buf(chunk),
            replies: Vec::with_capacity(batch_max + SNAPSHOTS_MAX + 1),
            in_use: [0; SNAPSHOTS_MAX],
            failed: false,
            fenced: false,
            recheck_fence: false,
            tx_first_reply: 0,
            reported: [u64::MAX; REPORTED_MAX],
            reported_next: 0,
            background_blocked: false,
            lease: None,
            takeover_wait: std::time::Duration::from_millis(csnap_pools::SERVER_TAKEOVER_WAIT_MS),
            copyouts: 0,
        }
    }

    /// A claiming start's wait instead of `SERVER_TAKEOVER_WAIT_MS` (the
    /// one-process simulations, whose former servers are stopped objects,
    /// claim without waiting).
    #[must_use]
    pub fn with_takeover_wait(mut self, wait: std::time::Duration) -> Self {
        self.takeover_wait = wait;
        self
    }

    /// Gives the store the serving lease (`Store::set_lease`) when it
    /// starts, and now if it already runs: a server process's worker does;
    /// the one-process simulations, whose clock is their own, do not.
    #[must_use]
    pub fn with_lease(mut self, lease: std::time::Duration) -> Self {
        self.lease = Some(lease);
        if let Some(store) = self.store.as_mut() {
            store.set_lease(lease);
        }
        self
    }

    /// The store, once started.
    pub fn store(&mut self) -> Option<&mut Store<D>> {
        self.store.as_mut()
    }

    /// Copy-outs made since the process started.
    pub fn copyouts(&self) -> u64 {
        self.copyouts
    }

    /// Publishes the figures the metrics endpoint renders (after a batch).
    pub fn publish(&self, f: &crate::metrics::WorkerFigures) {
        if let Some(s) = self.store.as_ref() {
            let st = s.status();
            f.publish(
                self.copyouts,
                st.incarnation,
                st.chunk_size_bytes,
                st.data_chunks,
                st.data_free,
                st.snapshots,
            );
        }
    }

    /// Whether the store failed; the server must stop serving.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether background deletion has work.
    pub fn has_background_work(&self) -> bool {
        !self.failed
            && !self.background_blocked
            && self.store.as_ref().is_some_and(Store::delete_pending)
    }

    /// Asks the next batch to read the on-disk incarnation before it
    /// answers anything, even if it commits nothing: the worker thread does
    /// this after an idle gap, so a server that was stopped (SIGSTOP, a VM
    /// pause) while a newer incarnation took the store over finds out
    /// before it hands out one more read mapping.
    pub fn request_fence_check(&mut self) {
        self.recheck_fence = true;
    }

    /// Runs a batch and passes every reply, after the batch's commit, to
    /// `out`. Notifications (auto-deleted snapshots) use `NOTIFY_TOKEN`.
    pub fn run_batch(&mut self, batch: &[StoreRequest], out: &mut dyn FnMut(StoreReply)) {
        // Only notifications of a background step can be left over.
        self.replies.retain(|r| r.token == NOTIFY_TOKEN);
        self.tx_first_reply = 0;
        if core::mem::take(&mut self.recheck_fence) && !self.failed {
            if let Some(store) = self.store.as_mut() {
                if let Err(e) = store.check_fence() {
                    self.fenced = matches!(e, StoreError::Fenced { .. });
                    self.fail();
                }
            }
        }
        for req in batch {
            let result = if self.failed {
                StoreResult::Failed(StoreFailure::Internal)
            } else if let StoreOp::Start { claim } = req.op {
                self.start(claim)
            } else if self.store.is_none() {
                // Not started: a standby answers nothing else.
                StoreResult::Failed(StoreFailure::Internal)
            } else {
                if !self.store.as_ref().is_some_and(Store::is_dirty) {
                    // The open transaction holds nothing yet: replies
                    // before this one do not depend on it.
                    self.tx_first_reply = self.replies.len();
                }
                self.run_one(&req.op)
            };
            self.replies.push(StoreReply {
                token: req.token,
                result,
            });
        }
        if !self.failed && self.store.is_some() {
            let _ = self.commit();
        }
        if self.failed {
            let why = if self.fenced {
                StoreFailure::Fenced
            } else {
                StoreFailure::Internal
            };
            for r in &mut self.replies {
                if r.token != NOTIFY_TOKEN {
                    r.result = StoreResult::Failed(why);
                }
            }
        }
        for r in self.replies.drain(..) {
            out(r);
        }
    }

    fn start(&mut self, claim: bool) -> StoreResult {
        let Some(mut standby) = self.standby.take() else {
            return StoreResult::Failed(StoreFailure::Internal);
        };
        if claim {
            if let Err(e) = claim_logged(&mut standby, self.takeover_wait) {
                eprintln!("csnap server: {e}");
                self.standby = Some(standby);
                self.fenced = matches!(e, StoreError::ClaimContested { .. });
                self.fail();
                return StoreResult::Failed(StoreFailure::Fenced);
            }
        }
        let mut store = match standby.try_start() {
            Ok(s) => s,
            Err((standby, e)) => {
                // The reason goes to the standby's log (heap-free); the
                // standby is kept, not dropped: a confined worker closes
                // no file and the process exits with everything reserved.
                self.standby = Some(standby);
                log_store_failure("the store could not be read at start", &e);
                self.report(&e);
                self.fail();
                return StoreResult::Failed(StoreFailure::Internal);
            }
        };
        let incarnation = match store.bump_incarnation() {
            Ok(i) => i,
            Err(e) => {
                log_store_failure("the start's incarnation commit failed", &e);
                // Kept, not dropped (no close in a confined worker).
                self.store = Some(store);
                self.fail();
                return StoreResult::Failed(StoreFailure::Internal);
            }
        };
        // From now on every write of the store is within the lease.
        if let Some(lease) = self.lease {
            store.set_lease(lease);
        }
        // The incarnation is committed by this batch's commit, before the
        // reply goes out.
        let label = *store.label();
        let replayed = store.replay_report().commits;
        self.store = Some(store);
        StoreResult::Started {
            incarnation,
            server_id: u64::from_le_bytes(label.store_uuid[..8].try_into().unwrap_or([0; 8])),
            chunk_size_bytes: label.chunk_size_bytes,
            origin_size_bytes: label.origin_size_bytes,
            origin_uuid: label.origin_uuid,
            replayed,
        }
    }

    /// One bounded step of background deletion, committed.
    pub fn background_step(&mut self) {
        if self.failed || self.store.is_none() {
            return;
        }
        let r = self
            .store
            .as_mut()
            .expect("started")
            .delete_step(DELETE_STEP_RECORDS);
        if let Err(e) = r {
            if matches!(e, StoreError::Corrupt { .. }) {
                // Reclaiming stops here; requests are still served.
                self.report(&e);
                self.background_blocked = true;
            }
            self.store.as_mut().expect("started").abort();
        }
        let _ = self.commit();
    }

    /// Passes on the notifications a background step produced (a corrupt
    /// block it met); returns whether there were any.
    pub fn take_notifications(&mut self, out: &mut dyn FnMut(StoreReply)) -> bool {
        let any = !self.replies.is_empty();
        for r in self.replies.drain(..) {
            out(r);
        }
        any
    }

    /// Sends the problem line of a corrupt block (once per block) as a
    /// notification.
    fn report(&mut self, e: &StoreError) {
        let StoreError::Corrupt { addr, kind, fault } = *e else {
            return;
        };
        // Reserved room only (the sealed heap must not grow): without room
        // the block is not marked reported and is logged when next met.
        if self.reported.contains(&addr) || self.replies.len() >= self.replies.capacity() {
            return;
        }
        self.reported[self.reported_next] = addr;
        self.reported_next = (self.reported_next + 1) % REPORTED_MAX;
        self.replies.push(StoreReply {
            token: NOTIFY_TOKEN,
            result: StoreResult::Corrupt {
                addr,
                kind: kind.name(),
                reason: fault.reason(),
            },
        });
    }

    /// A request met a corrupt block: log it, and if the open transaction
    /// was modified midway, discard it and fail every reply of this batch
    /// that it holds (nothing derived from a corrupt block is committed,
    /// nothing not durable is acknowledged). The server goes on serving.
    fn corrupt(&mut self, e: &StoreError) {
        self.report(e);
        let store = self.store.as_mut().expect("started");
        if store.is_poisoned() {
            store.abort();
            self.fail_open_transaction();
        }
    }

    fn fail_open_transaction(&mut self) {
        for r in &mut self.replies[self.tx_first_reply..] {
            if r.token != NOTIFY_TOKEN {
                r.result = StoreResult::Failed(StoreFailure::Corrupt);
            }
        }
    }

    fn fail(&mut self) {
        self.failed = true;
    }

    /// Commits the open transaction; a failure (fenced or not) stops the
    /// worker, except corruption found before anything was written (the
    /// store discarded the transaction): then the replies it held fail.
    fn commit(&mut self) -> Result<(), StoreFailure> {
        match self.store.as_mut().map(Store::commit_journal) {
            Some(Ok(_)) => {
                self.tx_first_reply = self.replies.len();
                Ok(())
            }
            Some(Err(StoreError::Fenced { .. })) => {
                self.fenced = true;
                self.fail();
                Err(StoreFailure::Fenced)
            }
            Some(Err(e @ StoreError::Corrupt { .. })) => {
                self.report(&e);
                self.fail_open_transaction();
                Err(StoreFailure::Corrupt)
            }
            Some(Err(e)) => {
                log_store_failure("a commit failed (nothing of its batch is acknowledged)", &e);
                self.fail();
                Err(StoreFailure::Internal)
            }
            None => {
                self.fail();
                Err(StoreFailure::Internal)
            }
        }
    }

    /// The last commit's home writes (`Store::write_home`), which a batch
    /// leaves until its replies are out: the caller runs this after handing
    /// them over. Anything the store does next would run them first, so this
    /// only takes them off the replies' path. A failure stops the worker as
    /// a failed commit does (the commit itself stands: replay redoes them)
    /// and is passed to `out` as a notification, so that the server stops
    /// now rather than at its next request; returns whether it was.
    pub fn write_home(&mut self, out: &mut dyn FnMut(StoreReply)) -> bool {
        if self.failed {
            return false;
        }
        let Some(Err(e)) = self.store.as_mut().map(Store::write_home) else {
            return false;
        };
        let why = if matches!(e, StoreError::Fenced { .. }) {
            self.fenced = true;
            StoreFailure::Fenced
        } else {
            log_store_failure("a commit's home writes failed", &e);
            StoreFailure::Internal
        };
        self.fail();
        out(StoreReply {
            token: NOTIFY_TOKEN,
            result: StoreResult::Failed(why),
        });
        true
    }

    /// Retries `f` through transaction-full commits and store-full reclaim.
    fn with_retry<T>(
        &mut self,
        mut f: impl FnMut(&mut Store<D>) -> Result<T, StoreError>,
    ) -> Result<T, StoreFailure> {
        loop {
            match f(self.store.as_mut().expect("started")) {
                Ok(v) => return Ok(v),
                Err(StoreError::TxFull) => self.commit()?,
                Err(StoreError::Reclaiming { victim }) => {
                    if let Some(tag) = victim {
                        self.replies.push(StoreReply {
                            token: NOTIFY_TOKEN,
                            result: StoreResult::AutoDeleted { tag },
                        });
                    }
                    match self.store.as_mut().expect("started").reclaim() {
                        Ok(()) => self.tx_first_reply = self.replies.len(),
                        Err(e @ StoreError::Corrupt { .. }) => {
                            self.corrupt(&e);
                            return Err(StoreFailure::Corrupt);
                        }
                        Err(_) => {
                            self.fail();
                            return Err(StoreFailure::Internal);
                        }
                    }
                }
                Err(StoreError::TxPoisoned) | Err(StoreError::Failed) => {
                    self.fail();
                    return Err(StoreFailure::Internal);
                }
                Err(e) => {
                    let f = failure(&e);
                    if f == StoreFailure::Internal {
                        self.fail();
                    }
                    if f == StoreFailure::Corrupt {
                        self.corrupt(&e);
                    }
                    return Err(f);
                }
            }
        }
    }

    fn copy(&mut self, from_origin: Option<u64>, from_store: Option<u64>, to: u64) -> bool {
        let Some(store) = self.store.as_mut() else {
            return false;
        };
        let chunk = u64::from(store.chunk_size_bytes());
        let n = usize::try_from(chunk)
            .unwrap_or(0)
            .min(self.chunk_buf.len());
        let buf = &mut self.chunk_buf[..n];
        let read = match (from_origin, from_store) {
            (Some(c), _) => self
                .origin
                .read_at(buf, c * chunk)
                .map_err(|e| ("a copy-out's read of the origin failed", e)),
            (_, Some(s)) => {
                let off = store.chunk_offset(s);
                store
                    .read_data(buf, off)
                    .map_err(|e| ("a copy-out's read of the store failed", e))
            }
            _ => return false,
        };
        let off = store.chunk_offset(to);
        let ok = match read {
            Err((what, e)) => {
                log_disk_failure(what, &e);
                false
            }
            // Within the lease (ARCHITECTURE 5.5); a fenced write is
            // reported by the commit's fence check.
            Ok(()) => match store.write_data(buf, off) {
                Ok(()) => true,
                Err(StoreError::Disk(e)) => {
                    log_disk_failure("a copy-out's write to the store failed", &e);
                    false
                }
                Err(_) => false,
            },
        };
        self.copyouts += u64::from(ok);
        ok
    }

    fn run_one(&mut self, op: &StoreOp) -> StoreResult {
        match *op {
            StoreOp::OriginWrite {
                chunk,
                chunks,
                ahead,
            } => {
                for c in chunk..chunk + u64::from(chunks) {
                    match self.with_retry(|s| s.prepare_origin_write(c)) {
                        Ok(OriginWrite::Unique) => {}
                        Ok(OriginWrite::CopyOut { store_chunk }) => {
                            if !self.copy(Some(c), None, store_chunk) {
                                self.fail();
                                return StoreResult::Failed(StoreFailure::Internal);
                            }
                        }
                        Err(f) => return StoreResult::Failed(f),
                    }
                }
                if ahead == 0 {
                    return StoreResult::Done;
                }
                // Read only: an error here (a corrupt leaf) grants nothing
                // ahead and fails nothing.
                let next = chunk + u64::from(chunks);
                let store = self.store.as_mut().expect("started");
                StoreResult::WriteAhead(store.unique_bits(next, ahead).unwrap_or(0))
            }
            StoreOp::SnapshotRead { tag, chunk, chunks } => {
                if too_many_chunks(chunks) {
                    return StoreResult::Failed(StoreFailure::OutOfRange);
                }
                let mut targets = ArrayVec::<Target, CHUNKS_PER_REQUEST_MAX>::new();
                for c in chunk..chunk + u64::from(chunks) {
                    let t = match self.store.as_mut().expect("started").lookup(tag, c) {
                        Ok(Mapping::Origin) => Target::Origin,
                        Ok(Mapping::Store(s)) => Target::Store(s),
                        Err(e) => {
                            let f = failure(&e);
                            if f == StoreFailure::Internal {
                                self.fail();
                            }
                            if f == StoreFailure::Corrupt {
                                self.corrupt(&e);
                            }
                            return StoreResult::Failed(f);
                        }
                    };
                    targets.push(t);
                }
                StoreResult::Targets(targets)
            }
            StoreOp::SnapshotWrite { tag, chunk, chunks } => {
                if too_many_chunks(chunks) {
                    return StoreResult::Failed(StoreFailure::OutOfRange);
                }
                let mut targets = ArrayVec::<Target, CHUNKS_PER_REQUEST_MAX>::new();
                for c in chunk..chunk + u64::from(chunks) {
                    let w = match self.with_retry(|s| s.prepare_snapshot_write(tag, c)) {
                        Ok(w) => w,
                        Err(f) => return StoreResult::Failed(f),
                    };
                    let ok = match w {
                        SnapshotWrite::Unique { .. } => true,
                        SnapshotWrite::CopyFromOrigin { store_chunk } => {
                            self.copy(Some(c), None, store_chunk)
                        }
                        SnapshotWrite::CopyFromStore { from, store_chunk } => {
                            self.copy(None, Some(from), store_chunk)
                        }
                    };
                    if !ok {
                        self.fail();
                        return StoreResult::Failed(StoreFailure::Internal);
                    }
                    targets.push(Target::Store(w.store_chunk()));
                }
                StoreResult::Targets(targets)
            }
            StoreOp::Create { tag, now_secs } => {
                match self.with_retry(|s| s.create_snapshot(tag, now_secs)) {
                    Ok(_) => StoreResult::Done,
                    Err(f) => StoreResult::Failed(f),
                }
            }
            StoreOp::Delete { tag } => {
                if let Some(info) = self.store.as_mut().expect("started").snapshot(tag) {
                    if self.in_use[usize::from(info.bit)] > 0 {
                        return StoreResult::Failed(StoreFailure::InUse);
                    }
                }
                match self.with_retry(|s| s.delete_snapshot(tag)) {
                    Ok(()) => StoreResult::Done,
                    Err(f) => StoreResult::Failed(f),
                }
            }
            StoreOp::Priority { tag, priority } => {
                match self.with_retry(|s| s.set_priority(tag, priority)) {
                    Ok(()) => StoreResult::Done,
                    Err(f) => StoreResult::Failed(f),
                }
            }
            StoreOp::Use { tag, open } => {
                let Some(info) = self.store.as_mut().expect("started").snapshot(tag) else {
                    return StoreResult::Failed(StoreFailure::NoSuchSnapshot);
                };
                let n = &mut self.in_use[usize::from(info.bit)];
                if open {
                    *n += 1;
                } else {
                    *n = n.saturating_sub(1);
                }
                let busy = *n > 0;
                match self.store.as_mut().expect("started").set_in_use(tag, busy) {
                    Ok(()) => StoreResult::Done,
                    Err(e) => StoreResult::Failed(failure(&e)),
                }
            }
            StoreOp::List { from } => {
                StoreResult::List(list_page(self.store.as_ref().expect("started"), from))
            }
            StoreOp::Delta {
                volume,
                base,
                chunk,
                chunks,
            } => {
                let mut bits = [0u8; DELTA_BITMAP_BYTES];
                let r = self.store.as_mut().expect("started").delta(
                    volume,
                    base,
                    chunk,
                    u64::from(chunks),
                    &mut bits,
                );
                match r {
                    Ok(()) => StoreResult::Delta {
                        chunk,
                        chunks,
                        bits,
                    },
                    Err(e) => {
                        let f = failure(&e);
                        if f == StoreFailure::Internal {
                            self.fail();
                        }
                        if f == StoreFailure::Corrupt {
                            self.corrupt(&e);
                        }
                        StoreResult::Failed(f)
                    }
                }
            }
            StoreOp::Status => {
                let s = self.store.as_mut().expect("started").status();
                StoreResult::Status(StoreFigures {
                    incarnation: s.incarnation,
                    chunk_size_bytes: s.chunk_size_bytes,
                    origin_chunks: s.origin_chunks,
                    data_chunks: s.data_chunks,
                    data_free: s.data_free,
                    meta_blocks: s.meta_blocks,
                    meta_free: s.meta_free,
                    snapshots: s.snapshots,
                    deleting: s.deleting,
                    commits: s.seq,
                    copyouts: self.copyouts,
                })
            }
            StoreOp::Start { .. } => StoreResult::Failed(StoreFailure::Internal),
        }
    }
}

/// A query over more chunks than one request carries: the server refuses
/// it before it gets here; the worker refuses it too rather than fill a
/// target list past its end.
/// One page of the snapshot list: the snapshots whose tag is at least
/// `from`, in tag order, whole tags only (a live snapshot and deleting ones
/// may share a tag; a page never splits them, except more of one tag than
/// a page holds, which only a table of deleting snapshots can have).
/// O(page × table) compares, no allocation.
fn list_page<D: Disk>(store: &Store<D>, from: u32) -> ArrayVec<SnapRow, SNAPSHOT_LIST_PAGE_ROWS> {
    let mut rows = ArrayVec::new();
    let mut next = u64::from(from);
    while let Some(tag) = store
        .snapshots()
        .map(|s| s.tag)
        .filter(|&t| u64::from(t) >= next)
        .min()
    {
        let n = store.snapshots().filter(|s| s.tag == tag).count();
        if !rows.is_empty() && rows.len() + n > rows.capacity() {
            break;
        }
        for s in store.snapshots().filter(|s| s.tag == tag) {
            let row = SnapRow {
                tag: s.tag,
                priority: s.priority,
                deleting: s.deleting,
                in_use: s.in_use,
                ctime_secs: s.ctime_secs,
                chunks: s.chunks,
                unique_chunks: s.unique_chunks,
            };
            if rows.try_push(row).is_err() {
                break;
            }
        }
        next = u64::from(tag) + 1;
    }
    rows
}

fn too_many_chunks(chunks: u32) -> bool {
    usize::try_from(chunks).map_or(true, |n| n > CHUNKS_PER_REQUEST_MAX)
}
