//! The NBD server process: devices, listeners and pools reserved at
//! start, and its event loop over the slots.

use super::*;

// ---------------------------------------------------------------------------
// The server.
// ---------------------------------------------------------------------------

/// Why `NbdServer::run` stopped other than by a signal (no heap data: it
/// is made in the sealed phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdStop {
    /// The stop's flush of the devices failed.
    FinalFlush,
    /// The event loop's wait failed with this errno.
    Poll(i32),
    /// Submitting disk operations to the io_uring failed with this errno.
    Disk(i32),
}

impl std::fmt::Display for NbdStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdStop::FinalFlush => write!(f, "the final flush of the devices failed"),
            NbdStop::Poll(errno) => write!(
                f,
                "event loop failed: {}",
                io::Error::from_raw_os_error(*errno)
            ),
            NbdStop::Disk(errno) => write!(
                f,
                "disk submission failed: {}",
                io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

/// The NBD server process's loop and everything it reserved.
pub struct NbdServer {
    poll: Poll,
    events: Events,
    ready: Vec<(Token, bool, bool)>,
    listeners: Listeners,
    signals: OwnedFd,
    slots: Vec<Slot>,
    ctl: Control,
    sh: Shared,
    /// `--metrics`: the Prometheus endpoint.
    metrics: Option<MetricsEndpoint>,
    reserved: Vec<(&'static str, usize)>,
    /// Shutdown requested: the deadline for in-flight work.
    shutdown_at_ms: Option<u64>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Opens the devices, reads the store label, binds the listeners, sets
    /// up the signal descriptor and reserves every pool. The only
    /// allocation. Call from the main thread before any other thread starts
    /// (SIGTERM and SIGINT are blocked and read from a descriptor).
    pub fn new(opts: &NbdOptions) -> Result<NbdServer, String> {
        if opts.connections == 0 || opts.connections > csnap_pools::NBD_CONNECTIONS_MAX {
            return Err(format!(
                "connections must be 1 to {}",
                csnap_pools::NBD_CONNECTIONS_MAX
            ));
        }
        if opts.buffers == 0 || opts.buffers > csnap_pools::NBD_BUFFERS_MAX {
            return Err(format!(
                "buffers must be 1 to {}",
                csnap_pools::NBD_BUFFERS_MAX
            ));
        }
        // Direct I/O, no fallback: a device that cannot do it is an error.
        let open = |p: &Path, what: &str| {
            let (f, a) = open_direct(p, true).map_err(|e| format!("cannot open {what}: {e}"))?;
            let align = a.mem_bytes.max(a.offset_bytes) as usize;
            if align > ALIGN_MAX {
                return Err(format!(
                    "{what} {} needs direct I/O aligned to {align} bytes; csnap nbd serves at most {ALIGN_MAX}",
                    p.display()
                ));
            }
            Ok((f, align))
        };
        let (origin, origin_align) = open(&opts.origin, "origin")?;
        let (store, store_align) = open(&opts.store, "store")?;
        let align = origin_align.max(store_align);
        let mut sd = csnap_store::disk::FileDisk::new(
            store
                .try_clone()
                .map_err(|e| format!("store {}: {e}", opts.store.display()))?,
        )
        .map_err(|e| format!("store {}: {e}", opts.store.display()))?;
        // The label block, read around the page cache too.
        let mut label_buf = AlignedBuf::zeroed(csnap_pools::BLOCK_SIZE_BYTES, ALIGN_MAX);
        let label = csnap_store::read_label_into(&mut sd, &mut label_buf)
            .map_err(|e| format!("store {}: {e}", opts.store.display()))?;
        drop(sd);
        if label.data_start_bytes % align as u64 != 0 {
            return Err(format!(
                "store {}: its data area starts at {} bytes, not aligned to the device's direct-I/O alignment of {align}",
                opts.store.display(),
                label.data_start_bytes
            ));
        }
        let origin_size = csnap_store::disk::device_size_bytes(&origin)
            .map_err(|e| format!("origin {}: {e}", opts.origin.display()))?;
        if origin_size < label.origin_size_bytes {
            return Err(format!(
                "origin {} is {origin_size} bytes; the store was formatted for an origin of {} bytes",
                opts.origin.display(),
                label.origin_size_bytes
            ));
        }
        let chunk = u64::from(label.chunk_size_bytes);
        let cfg = VolumeConfig {
            client: ClientConfig {
                client_id: 0,
                node_id: opts.node_id,
                role: Role::Client,
                volume: Volume::Origin,
                origin_uuid: label.origin_uuid,
                caching: true,
            },
            data_start_bytes: label.data_start_bytes,
            cached_chunks: csnap_pools::VOLUME_CACHED_CHUNKS_DEFAULT,
            read_ahead_chunks: csnap_pools::VOLUME_READ_AHEAD_CHUNKS_DEFAULT,
            origin_chunks_max: label.origin_size_bytes.div_ceil(chunk.max(1)),
            request_deaths_max: csnap_pools::REQUEST_SERVER_DEATHS_MAX,
        };
        let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
        // Bound before the NBD listeners: once those answer (what `csnap up`
        // waits for), the metrics address answers too.
        let metrics = match &opts.metrics {
            Some(a) => Some(MetricsEndpoint::new(a, poll.registry(), METRICS_BASE)?),
            None => None,
        };
        let mut listeners = Vec::with_capacity(opts.listen.len());
        for a in &opts.listen {
            listeners.push(MioListener::bind(a).map_err(|e| format!("cannot listen on {a}: {e}"))?);
        }
        let listeners = Listeners::register(listeners, poll.registry(), 0..=LISTENERS_MAX)
            .map_err(|e| format!("cannot register the listeners: {e}"))?;
        let signals = csnap_sys::signal::signal_fd(&[libc::SIGTERM, libc::SIGINT])
            .map_err(|e| format!("signalfd: {e}"))?;
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&signals.as_raw_fd()),
                SIGNAL,
                Interest::READABLE,
            )
            .map_err(|e| format!("cannot register the signal descriptor: {e}"))?;
        let pool = Buffers::new(opts.buffers);
        let disk = DiskQueue::new(align, pool.bounce_at(), BOUNCE_BYTES)
            .map_err(|e| format!("io_uring setup: {e}"))?;
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&disk.fd()),
                DISK,
                Interest::READABLE,
            )
            .map_err(|e| format!("cannot register the io_uring descriptor: {e}"))?;
        let mut nonce = [0u8; 2];
        csnap_sys::random_bytes(&mut nonce).map_err(|e| format!("getrandom: {e}"))?;
        let slots: Vec<Slot> = (0..opts.connections).map(|i| Slot::new(i, cfg)).collect();
        let ctl_cfg = ClientConfig {
            client_id: 0,
            node_id: opts.node_id,
            role: Role::Control,
            volume: Volume::Origin,
            origin_uuid: [0; 16],
            caching: false,
        };
        let n = opts.connections;
        let mut reserved = vec![
            (
                "NBD connection slots (session, receive buffer, command table, reply queue, delta bitmap)",
                n * (core::mem::size_of::<Slot>() + NbdSession::reserved_bytes() + RX_BYTES + DELTA_CHUNKS / 8),
            ),
            (
                "volume engines (lease cache, grant bitmap, client tables)",
                n * VolumeEngine::reserved_bytes(&cfg),
            ),
            (
                "server and agent links (frame readers), control connection included",
                (n + 1) * Link::reserved_bytes() + ClientFsm::reserved_bytes(),
            ),
            ("data buffers", opts.buffers * BUF_STRIDE),
            ("zero buffer (aligned)", IO_MAX),
            (
                "read-modify-write buffers (aligned)",
                nbd_disk::BOUNCES * BOUNCE_BYTES,
            ),
            (
                "disk operations table and io_uring queues",
                DiskQueue::reserved_bytes(),
            ),
            (
                "readiness events",
                EVENTS_MAX
                    * (core::mem::size_of::<mio::event::Event>()
                        + core::mem::size_of::<(Token, bool, bool)>()),
            ),
        ];
        if metrics.is_some() {
            reserved.push((
                "metrics endpoint (request and response buffers, counters)",
                MetricsEndpoint::reserved_bytes() + NbdMetrics::reserved_bytes(),
            ));
        }
        Ok(NbdServer {
            poll,
            events: Events::with_capacity(EVENTS_MAX),
            ready: Vec::with_capacity(EVENTS_MAX),
            listeners,
            signals,
            slots,
            ctl: Control {
                fsm: ClientFsm::new(ctl_cfg),
                link: Link::new(CTL_AGENT, CTL_SERVER),
            },
            sh: Shared {
                origin,
                store,
                pool,
                streams: Streams::new(opts.connections),
                disk,
                agent: opts.agent.clone(),
                node_id: opts.node_id,
                export_size: label.origin_size_bytes,
                chunk_bytes: chunk.max(1),
                timeout_ms: opts.failover_timeout_ms,
                write_back: opts.write_back,
                progress: 0,
                wake_at: None,
                nonce: u16::from_le_bytes(nonce),
                next_client: 0,
                stats: NbdStats::default(),
                metrics: NbdMetrics::new(),
            },
            metrics,
            reserved,
            shutdown_at_ms: None,
        })
    }

    /// The memory budget, one line per pool.
    pub fn reserved_items(&self) -> &[(&'static str, usize)] {
        &self.reserved
    }

    /// The bound addresses (TCP ports resolved).
    pub fn local_addrs(&self) -> Vec<Addr> {
        self.listeners.local_addrs().collect()
    }

    /// The metrics endpoint's bound address.
    pub fn metrics_addr(&self) -> Option<Addr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// Figures of the run so far.
    pub fn stats(&self) -> NbdStats {
        self.sh.stats
    }

    /// The export size in bytes.
    pub fn export_size_bytes(&self) -> u64 {
        self.sh.export_size
    }

    /// Removes the unix listeners' socket files (after `run`, before the
    /// process ends by `_exit`). Frees nothing.
    pub fn remove_socket_files(&self) {
        self.listeners.remove_socket_files();
        if let Some(m) = &self.metrics {
            m.remove_socket_file();
        }
    }

    /// Serves until SIGTERM or SIGINT, then finishes in-flight commands,
    /// flushes both devices and returns. Allocates nothing, its errors
    /// included.
    pub fn run(&mut self) -> Result<(), NbdStop> {
        loop {
            let now = now_ms();
            self.sh.wake_at = None;
            let mut busy = true;
            for _ in 0..csnap_pools::NBD_LOOP_ROUNDS_MAX {
                let before = self.sh.progress;
                self.pump_control(now);
                for s in 0..self.slots.len() {
                    self.slots[s].pump(&mut self.sh, &mut self.ctl, self.poll.registry(), now);
                }
                self.disk_turn()?;
                if self.sh.progress == before {
                    busy = false;
                    break;
                }
            }
            self.metrics_turn(now);
            self.check();
            if let Some(at) = self.shutdown_at_ms {
                let idle = self.slots.iter().all(|s| s.state == SlotState::Free);
                if idle || now >= at {
                    if !idle {
                        eprintln!(
                            "csnap nbd: shutdown deadline passed with connections still busy"
                        );
                    }
                    if !self.sh.sync_both() {
                        return Err(NbdStop::FinalFlush);
                    }
                    return Ok(());
                }
                self.sh.wake(at);
            }
            let timeout = if busy {
                Some(std::time::Duration::ZERO)
            } else {
                self.sh
                    .wake_at
                    .map(|w| std::time::Duration::from_millis(w.saturating_sub(now_ms())))
            };
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NbdStop::Poll(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            self.ready.clear();
            for ev in self.events.iter() {
                self.ready.push((
                    ev.token(),
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable() || ev.is_error(),
                ));
            }
            for k in 0..self.ready.len() {
                let (t, r, w) = self.ready[k];
                self.dispatch(t, r, w);
            }
        }
    }

    /// Starts what the disk queue can start, submits, and hands finished
    /// operations to their engines.
    fn disk_turn(&mut self) -> Result<(), NbdStop> {
        let Shared {
            disk,
            pool,
            origin,
            store,
            stats,
            progress,
            ..
        } = &mut self.sh;
        let slots = &mut self.slots;
        let mut fin = |f: Finished| {
            *progress += 1;
            if f.bounced {
                stats.unaligned += 1;
            }
            if !f.ok {
                stats.disk_errors += 1;
                eprintln!(
                    "csnap nbd: disk operation failed (result {}): {:?}",
                    f.result, f.op
                );
            }
            if let Some(s) = slots.get_mut(usize::from(f.conn)) {
                // Straight to the engine; its completions are taken on the
                // slot's next pump (`drain_engine`).
                s.engine.disk_done(&f.op, f.ok);
            }
        };
        let r = disk
            .reap(&mut pool.arena, origin, store, &mut fin)
            .and_then(|_| disk.pump(&mut pool.arena, origin, store, &mut fin))
            .and_then(|()| disk.reap(&mut pool.arena, origin, store, &mut fin));
        if let Err(e) = r {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            // Busy (completions to take first) or out of resources for now:
            // the next turn submits again.
            if errno != libc::EBUSY && errno != libc::EAGAIN {
                return Err(NbdStop::Disk(errno));
            }
        }
        if disk.len() > 0 {
            // Completions wake the loop through the ring's descriptor; a
            // short timeout too, as a backstop.
            let at = now_ms() + DISK_BACKSTOP_MS;
            self.sh.wake(at);
        }
        Ok(())
    }

    fn dispatch(&mut self, t: Token, readable: bool, writable: bool) {
        if t == SIGNAL {
            self.on_signal();
        } else if t == DISK {
            // Completions are taken every turn.
        } else if t == CTL_AGENT || t == CTL_SERVER {
            self.ctl.link.on_event(t, readable, writable);
        } else if let Some(m) = self.metrics.as_mut().filter(|m| m.owns(t)) {
            m.on_event(t, readable, writable);
        } else if let Some(li) = self.listeners.index(t) {
            self.accept(li);
        } else if t.0 < LISTENER_BASE {
            let (s, k) = (t.0 / TOKENS_PER_SLOT, t.0 % TOKENS_PER_SLOT);
            if let Some(slot) = self.slots.get_mut(s) {
                if k == 0 {
                    slot.client_readable |= readable;
                } else {
                    slot.link.on_event(t, readable, writable);
                }
            }
        }
    }

    fn on_signal(&mut self) {
        while let Ok(Some(sig)) = csnap_sys::signal::read_signal(&self.signals) {
            if self.shutdown_at_ms.is_some() {
                continue;
            }
            eprintln!("csnap nbd: signal {sig}: finishing in-flight commands, then exiting");
            let now = now_ms();
            self.shutdown_at_ms = Some(now + self.sh.timeout_ms + 2_000);
            self.listeners.deregister(self.poll.registry());
            for s in &mut self.slots {
                if s.state != SlotState::Free {
                    let serving = s.attached;
                    s.begin_close(serving, now);
                }
            }
        }
    }

    fn accept(&mut self, li: usize) {
        loop {
            let Some(stream) = self.listeners.accept(li) else {
                return;
            };
            if self.shutdown_at_ms.is_some() {
                continue;
            }
            let Some(i) = self.slots.iter().position(|s| s.state == SlotState::Free) else {
                eprintln!(
                    "csnap nbd: connection closed: all {} connections are in use",
                    self.slots.len()
                );
                self.sh.stats.refused += 1;
                continue;
            };
            if !self
                .sh
                .streams
                .open(i, stream, Token(i * TOKENS_PER_SLOT), self.poll.registry())
            {
                continue;
            }
            self.slots[i].open();
            self.sh.stats.connections += 1;
            self.sh.moved();
        }
    }

    fn pump_control(&mut self, now: u64) {
        if !self.ctl.link.active() {
            return;
        }
        let slots = &mut self.slots;
        let export_size = self.sh.export_size;
        let write_back = self.sh.write_back;
        let mut ready = false;
        let mut routed = 0u64;
        let mut wake = self.sh.wake_at;
        let metrics = &mut self.sh.metrics;
        let moved = self.ctl.link.pump(
            &mut self.ctl.fsm,
            &self.sh.agent,
            self.poll.registry(),
            now,
            &mut wake,
            &mut |fsm: &mut ClientFsm, f: &[u8]| match fsm.handle_frame(f) {
                ClientEvent::Ready => {
                    ready = true;
                    Verdict::Keep
                }
                ClientEvent::Reply { id } => {
                    if metrics.reply(id, f, fsm)
                        || route_control_reply(slots, id, f, export_size, write_back, fsm)
                    {
                        routed += 1;
                    }
                    Verdict::Keep
                }
                ClientEvent::Refused(_) | ClientEvent::Stale => Verdict::Reconnect,
                ClientEvent::None | ClientEvent::Unexpected | ClientEvent::Notification => {
                    Verdict::Keep
                }
            },
        );
        self.sh.wake_at = wake;
        if ready {
            self.ctl.link.on_ready();
        }
        if moved || routed > 0 {
            self.sh.moved();
        }
    }

    /// The metrics endpoint's turn (`NbdMetrics::turn`); a scrape's
    /// questions go on the control link now, not at the next wake-up.
    fn metrics_turn(&mut self, now: u64) {
        let Some(ep) = self.metrics.as_mut() else {
            return;
        };
        let n = self.slots.iter().filter(|s| s.state != SlotState::Free);
        let (fsm, reg) = (&mut self.ctl.fsm, self.poll.registry());
        let t = self.sh.metrics.turn(ep, fsm, reg, now, n.count());
        if t.asked {
            if !self.ctl.link.active() {
                self.ctl.link.start(0, self.sh.node_id, None, now);
            }
            self.pump_control(now);
        }
        if let Some(w) = t.wake_ms {
            self.sh.wake(w);
        }
    }

    /// Process-wide invariants (cheap; release builds too).
    fn check(&self) {
        let held: usize = self.slots.iter().map(|s| s.bufs_held).sum();
        assert_eq!(
            held + self.sh.pool.available(),
            self.sh.pool.count,
            "a data buffer was lost or freed twice"
        );
        self.sh.disk.check();
        // Every disk operation belongs to an engine I/O still in flight.
        let ios: usize = self.slots.iter().map(|s| s.engine.in_flight()).sum();
        assert!(
            ios > 0 || self.sh.disk.len() == 0,
            "disk operations without an engine I/O"
        );
    }
}
