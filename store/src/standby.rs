//! Opening a store: a `Standby` reserves the memory and holds the device;
//! `start` reads the label and superblock and replays the journal into a
//! serving `Store` without allocating.

use crate::*;

/// A standby store: its memory reserved (cache, journal staging, free list)
/// and its device open, nothing read. `start` turns it into a serving store
/// without allocating: read the label and superblock, replay the journal.
#[derive(Debug)]
pub struct Standby<D: Disk> {
    disk: D,
    cache_blocks: usize,
    cache: Cache,
    staging: disk::IoBuf,
    pending_frees: Vec<Free>,
    entries: Vec<journal::Entry>,
    tx_data: Vec<journal::DataEntry>,
    last_data: Vec<u64>,
    block_buf: disk::IoBuf,
    /// The incarnation this standby claimed (0: none): the start's replay
    /// keeps it in the superblock it redoes.
    claimed: u64,
}

impl<D: Disk> Standby<D> {
    /// Claims the store for a takeover whose former server may still be
    /// running (on another host, paused, cut off), before anything else is
    /// read: writes the home superblock back with the incarnation two
    /// above the one it holds (the last commit in the journal can be one
    /// above home), flushes, waits `wait`, and reads it again. A former
    /// server's fence read from then on finds it newer and stops it; one
    /// that read the fence before has a lease shorter than the wait, so
    /// its writes are on the disk before this start reads anything. A claim
    /// overwritten during the wait (that server's home write of the
    /// superblock) is made again, `SERVER_CLAIM_ATTEMPTS_MAX` times in
    /// all. A home superblock that does not verify (a torn write) cannot
    /// be claimed: the wait alone is kept, and the start's replay repairs
    /// it. Returns the incarnation claimed (0: none). Allocates nothing.
    ///
    /// What it cannot close: a former server paused between its lease
    /// check and the write system call, or a write held in a queue longer
    /// than the wait's margin. Only fencing at the device (STONITH, a
    /// detached device, SCSI reservations) closes that.
    pub fn claim(&mut self, wait: std::time::Duration) -> Result<u64, StoreError> {
        let mut found = 0;
        let mut claimed = 0;
        for _ in 0..csnap_pools::SERVER_CLAIM_ATTEMPTS_MAX {
            let Standby {
                disk, block_buf, ..
            } = self;
            disk.read_at(block_buf, layout::SUPER_BLOCK * BS)?;
            let home = layout::verify(block_buf, layout::SUPER_BLOCK, BlockKind::Super)
                .ok()
                .and_then(|h| Some((h.seq, Super::decode(block_buf).ok()?)));
            let Some((seq, mut sb)) = home else {
                std::thread::sleep(wait);
                return Ok(0);
            };
            claimed = sb.incarnation.max(found).saturating_add(2);
            sb.incarnation = claimed;
            sb.encode(block_buf);
            layout::seal(block_buf, seq);
            disk.write_at(block_buf, layout::SUPER_BLOCK * BS)?;
            disk.flush()?;
            std::thread::sleep(wait);
            disk.read_at(block_buf, layout::SUPER_BLOCK * BS)?;
            found = layout::verify(block_buf, layout::SUPER_BLOCK, BlockKind::Super)
                .ok()
                .and_then(|_| Super::decode(block_buf).ok())
                .map_or(0, |sb| sb.incarnation);
            if found >= claimed {
                self.claimed = found;
                return Ok(found);
            }
        }
        Err(StoreError::ClaimContested { claimed, found })
    }

    /// Reserves every buffer the store will use. Reads nothing.
    pub fn reserve(disk: D, opts: &OpenOptions) -> Result<Self, StoreError> {
        if opts.cache_blocks < CACHE_MIN_BLOCKS {
            return Err(StoreError::Invalid(format!(
                "metadata cache of {} blocks is below the minimum of {CACHE_MIN_BLOCKS}",
                opts.cache_blocks
            )));
        }
        Ok(Standby {
            disk,
            cache_blocks: opts.cache_blocks,
            cache: Cache::new(opts.cache_blocks),
            staging: disk::io_buf(journal::REPLAY_BUFFER_BLOCKS * BLOCK_SIZE_BYTES),
            pending_frees: Vec::with_capacity(TX_FREES_MAX),
            entries: Vec::with_capacity(TX_BLOCKS_MAX + 1),
            tx_data: Vec::with_capacity(TX_DATA_CHUNKS_MAX),
            last_data: Vec::with_capacity(TX_DATA_CHUNKS_MAX),
            block_buf: disk::io_buf(BLOCK_SIZE_BYTES),
            claimed: 0,
        })
    }

    /// Starts: validates the label, replays the journal, loads the
    /// superblock, reads and checks the tree root. Allocates nothing unless
    /// it fails (and then only in `Invalid` errors, which a start never
    /// returns: its failures are heap-free `Disk` and `Corrupt`).
    pub fn start(self) -> Result<Store<D>, StoreError> {
        self.try_start().map_err(|(_, e)| e)
    }

    /// `start` that hands the standby back on failure, so a confined
    /// process neither frees its buffers nor closes its device (no syscall
    /// outside its whitelist) before it reports the reason and exits.
    // Boxing the large error would allocate in a sealed process.
    #[allow(clippy::result_large_err)]
    pub fn try_start(mut self) -> Result<Store<D>, (Self, StoreError)> {
        let (label, sb, replay) = match self.read_state() {
            Ok(x) => x,
            Err(e) => return Err((self, e)),
        };
        let Standby {
            disk,
            cache_blocks,
            cache,
            staging,
            pending_frees,
            entries,
            tx_data,
            last_data,
            block_buf,
            claimed,
        } = self;
        // Two consecutive commits (the last one must survive the next) plus
        // the wrap gap fit in the ring: a commit is at most cap + 3 slots
        // (commit block, data checksums, superblock), 3 * (cap + 3) <= J.
        let journal_third = usize::try_from((label.journal_blocks - 9) / 3).unwrap_or(usize::MAX);
        let tx_cap_blocks = TX_BLOCKS_MAX
            .min(journal_third)
            .min(cache_blocks - csnap_pools::OP_TOUCHED_BLOCKS_MAX);
        let mut store = Store {
            disk,
            label,
            sb,
            committed: sb,
            cache,
            pending_frees,
            staging,
            entries,
            tx_cap_blocks,
            tx_ops: 0,
            poisoned: false,
            failed: false,
            in_use_mask: Mask::EMPTY,
            replay,
            fence_buf: block_buf,
            pre_flush: false,
            tx_data,
            last_data,
            must_commit: false,
            home_pending: None,
            // Unknown after a start. After a process kill the former
            // server's last home writes may not be durable yet; the first
            // commit's flush makes them so. Only a power loss before that
            // flush, with the superblock's home write lost too, could send
            // replay to a commit this start overwrote: it reports that
            // commit damaged and goes on from the next one, whose flush had
            // made those home writes durable (nothing is lost).
            prev_commit: None,
            lease: None,
            fence_ok_at: None,
            leaf_records_max: crate::LEAF_RECORDS_MAX,
            node_entries_max: crate::NODE_ENTRIES_MAX,
        };
        // The root is read (and checked) now: a store whose root is
        // nonsense refuses to start instead of failing every request.
        let root_kind = if store.sb.depth == 1 {
            BlockKind::Leaf
        } else {
            BlockKind::Node
        };
        store.cache.begin_op();
        if let Err(e) = store.block(store.sb.root, root_kind) {
            let Store {
                disk,
                mut cache,
                pending_frees,
                staging,
                entries,
                mut tx_data,
                mut last_data,
                fence_buf,
                ..
            } = store;
            tx_data.clear();
            last_data.clear();
            cache.discard_all();
            return Err((
                Standby {
                    disk,
                    cache_blocks,
                    cache,
                    staging,
                    pending_frees,
                    entries,
                    tx_data,
                    last_data,
                    block_buf: fence_buf,
                    claimed,
                },
                e,
            ));
        }
        // A store formatted before #13 holds its table in the superblock:
        // its first commit moves it to table blocks (a full metadata area
        // keeps it as it is, with room for 64 snapshots).
        if !store.sb.table_in_blocks() && store.upgrade_table().is_err() {
            store.abort();
        }
        store.assert_invariants_full();
        Ok(store)
    }

    /// The label, the journal replay and the superblock, each checked.
    fn read_state(&mut self) -> Result<(Label, Super, journal::ReplayReport), StoreError> {
        let Standby {
            disk,
            staging,
            block_buf,
            claimed,
            ..
        } = self;
        let claimed = *claimed;
        let label = read_label_checked(disk, block_buf)?;
        // Redo only what differs at home: after a clean stop or a process
        // kill the home copies are already there, and a start that writes
        // nothing needs no flush.
        let mut rewrote = false;
        let replay = journal::replay(disk, &label, staging, &mut |d, home, img| {
            if home == layout::SUPER_BLOCK && claimed > 0 {
                // A claimed store: the superblock redone keeps the claim,
                // or a former server's fence read would pass again.
                if let (Ok(h), Ok(mut sb)) = (
                    layout::verify(img, layout::SUPER_BLOCK, BlockKind::Super),
                    Super::decode(img),
                ) {
                    sb.incarnation = sb.incarnation.max(claimed);
                    sb.encode(block_buf);
                    layout::seal(block_buf, h.seq);
                    d.write_at(block_buf, home * BS)?;
                    rewrote = true;
                    return Ok(());
                }
            }
            d.read_at(block_buf, home * BS)?;
            if block_buf[..] != *img {
                d.write_at(img, home * BS)?;
                rewrote = true;
            }
            Ok(())
        })?;
        // A commit block the walk did not take (torn, or its data lost) is
        // wiped, so that no later replay can take it for the commit of the
        // same sequence this server writes next (ARCHITECTURE 2.6).
        for s in replay.stale_slots.into_iter().flatten() {
            block_buf.fill(0);
            disk.write_at(block_buf, (label.journal_start + s) * BS)?;
            rewrote = true;
        }
        // The replayed home copies and the wipes are durable before this
        // start's first commit writes anything (a wipe must not be reordered
        // after a data write that could make the wiped commit whole).
        if rewrote {
            disk.flush()?;
        }
        // Everything from here fails heap-free (a standby starts sealed): a
        // corrupt block is named by its address and a static reason.
        disk.read_at(block_buf, layout::SUPER_BLOCK * BS)?;
        let super_corrupt = |fault| StoreError::Corrupt {
            addr: layout::SUPER_BLOCK,
            kind: BlockKind::Super,
            fault,
        };
        layout::verify(block_buf, layout::SUPER_BLOCK, BlockKind::Super).map_err(super_corrupt)?;
        let mut sb = Super::decode(block_buf)
            .map_err(|reason| super_corrupt(BlockFault::Structure { reason }))?;
        if sb.table_in_blocks() {
            let meta_end = label.meta_start + label.meta_blocks;
            for k in 0..layout::TABLE_BLOCKS_MAX {
                let addr = sb.table[k];
                let corrupt = |fault| StoreError::Corrupt {
                    addr,
                    kind: BlockKind::SnapTable,
                    fault,
                };
                if addr < label.meta_start || addr >= meta_end {
                    return Err(corrupt(BlockFault::Address { found: addr }));
                }
                disk.read_at(block_buf, addr * BS)?;
                layout::verify(block_buf, addr, BlockKind::SnapTable).map_err(corrupt)?;
                sb.decode_table_block(k, block_buf)
                    .map_err(|reason| corrupt(BlockFault::Structure { reason }))?;
            }
        }
        sb.check(&label)
            .map_err(|reason| super_corrupt(BlockFault::Structure { reason }))?;
        Ok((label, sb, replay))
    }
}

/// Options for `Store::open`.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Metadata cache size in blocks.
    pub cache_blocks: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_blocks: csnap_pools::CACHE_DEFAULT_BLOCKS,
        }
    }
}
