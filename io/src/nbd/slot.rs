//! A connection slot's life: open, the handshake's answers, status and
//! list progress, output helpers, the per-turn pump and the timers.

use super::*;

impl Slot {
    pub(super) fn new(index: usize, cfg: VolumeConfig) -> Slot {
        let t = index * TOKENS_PER_SLOT;
        Slot {
            state: SlotState::Free,
            client_readable: false,
            client_broken: false,
            session: NbdSession::new(NbdConfig {
                payload_limit_bytes: csnap_pools::VOLUME_IO_MAX_BYTES,
                preferred_block_size_bytes: 4096,
            }),
            rx: vec![0u8; RX_BYTES].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            pending: None,
            payload_cmd: None,
            payload_filled: 0,
            commands: NbdCommands::new(),
            hdr_out: [0; CMDS * HDR_MAX],
            hdr_start: 0,
            hdr_end: 0,
            hdr_lens: Deque::new(),
            hdr_front_written: 0,
            data_out: Deque::new(),
            data_written: 0,
            volume: Volume::Origin,
            delta: vec![0u8; DELTA_CHUNKS / 8].into_boxed_slice(),
            delta_state: DeltaState::None,
            bufs_held: 0,
            engine: VolumeEngine::new(cfg),
            link: Link::new(Token(t + 2), Token(t + 1)),
            attached: false,
            timed_out: false,
            dead: None,
            ctl: CtlWait::None,
            list_tags: [0; SNAPSHOTS_MAX],
            list_n: 0,
            list_pos: 0,
            listing: false,
            buffer_wait: false,
            index: u16::try_from(index).unwrap_or(u16::MAX),
            held: None,
            export_tag: None,
            metrics_export: None,
        }
    }

    /// A new connection.
    /// A new connection (its stream is `Shared::streams` entry `index`).
    pub(super) fn open(&mut self) {
        assert!(self.state == SlotState::Free);
        self.state = SlotState::Handshake;
        self.client_readable = true;
        self.client_broken = false;
        self.session.reset();
        self.rx_start = 0;
        self.rx_end = 0;
        self.pending = None;
        self.payload_cmd = None;
        self.payload_filled = 0;
        self.hdr_start = 0;
        self.hdr_end = 0;
        self.hdr_lens.clear();
        self.hdr_front_written = 0;
        self.data_out.clear();
        self.data_written = 0;
        self.volume = Volume::Origin;
        self.delta_state = DeltaState::None;
        self.attached = false;
        self.timed_out = false;
        self.dead = None;
        self.ctl = CtlWait::None;
        self.listing = false;
    }

    /// Answers the pending export query, if the session still waits for
    /// one (a client that went away does not).
    pub(super) fn answer(&mut self, info: Option<ExportInfo>) {
        if matches!(self.session.state(), NbdState::AwaitExport { .. }) {
            let r = self.session.answer_export(info);
            assert!(r.is_ok(), "the session awaits an export answer");
        }
    }

    /// Answers the pending metadata-context query, if the session still
    /// waits for one.
    pub(super) fn answer_meta(&mut self, tags: Option<&[u32]>) {
        if matches!(self.session.state(), NbdState::AwaitMeta { .. }) {
            let r = self.session.answer_meta(tags);
            assert!(r.is_ok(), "the session awaits a meta answer");
        }
    }

    /// Answers the oldest `BLOCK_STATUS` command, one selected context at a
    /// time, into its buffer: `base:allocation` at once (all data: csnap
    /// reports no hole or zero it cannot prove), each changed-since context
    /// from a delta query to the server (at most `DELTA_QUERY_CHUNKS_MAX`
    /// chunks of the request, so a reply may cover less than asked; the two
    /// names of one snapshot share one query). It waits behind writes
    /// acknowledged early that overlap it, as a read does.
    pub(super) fn progress_status(&mut self, sh: &mut Shared, ctl: &mut Control, now: u64) {
        if !matches!(self.state, SlotState::Serving | SlotState::Closing { .. }) {
            return;
        }
        loop {
            if self.ctl != CtlWait::None {
                return;
            }
            let mut oldest: Option<(u64, usize)> = None;
            for (i, c) in self.commands.table().iter().enumerate() {
                if let Some(c) = c {
                    if c.kind == CmdKind::BlockStatus
                        && c.next < c.end
                        && oldest.is_none_or(|(s, _)| c.seq < s)
                    {
                        oldest = Some((c.seq, i));
                    }
                }
            }
            let Some((_, ci)) = oldest else {
                return;
            };
            if nbd_cmds::behind_acked_write(self.commands.table(), ci) {
                return;
            }
            let Some(c) = self.commands.table()[ci] else {
                return;
            };
            let k = usize::from(c.ctx);
            let contexts = self.session.selected_contexts();
            let failed = match self.delta_state {
                DeltaState::Failed(e) => Some(e),
                _ => None,
            };
            let (Some(&ctx), None, Some(b)) = (contexts.get(k), failed, c.buf) else {
                // Every context answered, or the query failed.
                self.delta_state = DeltaState::None;
                if let Some(c) = self.commands.get_mut(ci) {
                    c.next = c.end;
                    if failed.is_some() {
                        c.error = failed;
                    }
                }
                self.commands.finish(ci);
                self.answer_events(sh);
                sh.moved();
                continue;
            };
            let last = k + 1 == contexts.len();
            let max = if c.req_one { 1 } else { EXTENTS_MAX };
            let mut ext = [(0u32, 0u32); EXTENTS_MAX];
            let n = match ctx {
                MetaContext::Allocation => {
                    ext[0] = (c.len, 0);
                    1
                }
                MetaContext::ChangedSince { tag, .. } => {
                    let cs = sh.chunk_bytes;
                    let first = c.offset / cs;
                    let end = c.offset + u64::from(c.len);
                    let want = ((end - 1) / cs - first + 1).min(DELTA_CHUNKS as u64);
                    let chunks = u32::try_from(want).unwrap_or(1);
                    match self.delta_state {
                        DeltaState::Ready {
                            base,
                            chunk,
                            chunks: have,
                        } if base == tag && chunk == first && have == chunks => changed_extents(
                            &self.delta,
                            c.offset,
                            end,
                            first,
                            cs,
                            chunks,
                            &mut ext[..max],
                        ),
                        _ => {
                            let req = Request::Delta {
                                volume: self.volume,
                                base: tag,
                                chunk: first,
                                chunks,
                            };
                            match ctl.request(sh, req, now) {
                                Some(id) => {
                                    self.delta_state = DeltaState::None;
                                    self.ctl = CtlWait::Delta {
                                        id,
                                        base: tag,
                                        deadline_ms: now + sh.timeout_ms,
                                    };
                                    sh.moved();
                                }
                                // Too many questions out: again shortly.
                                None => sh.wake(now + 1),
                            }
                            return;
                        }
                    }
                }
            };
            let bytes = BLOCK_STATUS_HEADER_BYTES + EXTENT_BYTES * n;
            let at = DATA_AT + c.rendered as usize;
            let flags = if last { REPLY_FLAG_DONE } else { 0 };
            let payload = u32::try_from(bytes - BLOCK_STATUS_HEADER_BYTES + 4).unwrap_or(0);
            let id = u32::try_from(k + 1).unwrap_or(0);
            let out = &mut sh.pool.get_mut(b)[at..at + bytes];
            out[..20].copy_from_slice(&structured_header(
                c.handle,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                payload,
            ));
            out[20..24].copy_from_slice(&id.to_be_bytes());
            for (i, (len, fl)) in ext[..n].iter().enumerate() {
                let o = BLOCK_STATUS_HEADER_BYTES + EXTENT_BYTES * i;
                out[o..o + 4].copy_from_slice(&len.to_be_bytes());
                out[o + 4..o + 8].copy_from_slice(&fl.to_be_bytes());
            }
            if let Some(c) = self.commands.get_mut(ci) {
                c.ctx += 1;
                c.rendered += u32::try_from(bytes).unwrap_or(0);
            }
            sh.moved();
        }
    }

    pub(super) fn export_info(&self, size_bytes: u64, write_back: bool) -> ExportInfo {
        let _ = self;
        ExportInfo {
            size_bytes,
            read_only: false,
            // A write acknowledged early on one connection is not visible
            // to another until it lands.
            can_multi_conn: !write_back,
        }
    }

    /// Commands and replies that hold a place in the table's budget.
    pub(super) fn outstanding(&self) -> usize {
        self.commands.active() + self.data_out.len() + self.hdr_lens.len()
    }

    pub(super) fn output_left(&self) -> bool {
        !self.session.transmit().is_empty()
            || self.hdr_end > self.hdr_start
            || !self.data_out.is_empty()
    }

    pub(super) fn push_hdr(&mut self, h: &[u8], sh: &mut Shared) {
        sh.stats.commands += 1;
        let n = h.len().min(HDR_MAX);
        if self.hdr_end + n > self.hdr_out.len() {
            self.hdr_out.copy_within(self.hdr_start..self.hdr_end, 0);
            self.hdr_end -= self.hdr_start;
            self.hdr_start = 0;
        }
        let dst = self.hdr_out.get_mut(self.hdr_end..self.hdr_end + n);
        let counted = self
            .hdr_lens
            .push_back(u8::try_from(n).unwrap_or(u8::MAX))
            .is_ok();
        assert!(
            dst.is_some() && counted,
            "reply room is reserved at admission"
        );
        if let Some(d) = dst {
            d.copy_from_slice(&h[..n]);
            self.hdr_end += n;
        }
    }

    /// The whole reply of a command answered without data: a simple reply,
    /// or (structured replies on, for a `READ` or `BLOCK_STATUS`) a `NONE`
    /// or `ERROR` chunk.
    pub(super) fn push_done(
        &mut self,
        handle: u64,
        structured: bool,
        err: Option<NbdError>,
        sh: &mut Shared,
    ) {
        match (structured, err) {
            (false, e) => self.push_hdr(&simple_reply(handle, e), sh),
            (true, None) => self.push_hdr(&none_chunk(handle), sh),
            (true, Some(e)) => self.push_hdr(&error_chunk(handle, e), sh),
        }
    }

    /// Whether a command of `kind` is answered with structured chunks.
    pub(super) fn structured_for(&self, kind: CmdKind) -> bool {
        self.session.structured() && matches!(kind, CmdKind::Read | CmdKind::BlockStatus)
    }

    pub(super) fn release_buf(&mut self, sh: &mut Shared, b: u16) {
        sh.pool.put(b);
        self.bufs_held -= 1;
        sh.moved();
    }

    pub(super) fn begin_close(&mut self, flush: bool, now: u64) {
        let (f, linger) = match self.state {
            SlotState::Closing {
                flush: f,
                linger_until_ms,
            } => (f || flush, linger_until_ms),
            _ => (flush, now + csnap_pools::NBD_CLOSE_LINGER_MS),
        };
        self.state = SlotState::Closing {
            flush: f,
            linger_until_ms: linger,
        };
    }

    /// Pumps everything of this connection until nothing moves.
    pub(super) fn pump(&mut self, sh: &mut Shared, ctl: &mut Control, reg: &Registry, now: u64) {
        if self.state == SlotState::Free {
            return;
        }
        for _ in 0..csnap_pools::NBD_SLOT_PUMP_ROUNDS_MAX {
            let before = sh.progress;
            self.pump_link(sh, reg, now);
            self.timers(sh, ctl, reg, now);
            self.emit_list(sh);
            self.read_client(sh, ctl, reg, now);
            self.progress_status(sh, ctl, now);
            self.submit(sh);
            self.drain_engine(sh);
            self.write_client(sh);
            self.maybe_close(sh, ctl, reg, now);
            if self.state == SlotState::Free || sh.progress == before {
                break;
            }
        }
        // Completions queued by the last inputs are taken before the check.
        self.drain_engine(sh);
        self.check(sh);
    }

    pub(super) fn pump_link(&mut self, sh: &mut Shared, reg: &Registry, now: u64) {
        if !self.link.active() {
            return;
        }
        let mut ready = false;
        let mut refused = None;
        let mut wake = sh.wake_at;
        let moved = self.link.pump(
            &mut self.engine,
            &sh.agent,
            reg,
            now,
            &mut wake,
            &mut |e: &mut VolumeEngine, f: &[u8]| match e.handle_frame(f) {
                EngineSignal::None => Verdict::Keep,
                EngineSignal::Ready => {
                    ready = true;
                    Verdict::Keep
                }
                EngineSignal::Refused(code) if retryable(code) => Verdict::Reconnect,
                EngineSignal::Refused(code) => {
                    refused = Some(code);
                    Verdict::Keep
                }
                EngineSignal::Stale => Verdict::Reconnect,
            },
        );
        sh.wake_at = wake;
        if moved {
            sh.moved();
        }
        if ready {
            if self.attached {
                sh.stats.reconnects += 1;
            }
            self.link.on_ready();
            sh.metrics.seen.saw(Peer::incarnation(&self.engine));
            if self.timed_out {
                eprintln!("csnap nbd: a server is reachable again; I/O resumes");
            }
            self.timed_out = false;
            if let SlotState::Attaching { .. } = self.state {
                let info = self.export_info(self.engine.size_bytes(), sh.write_back);
                self.answer(Some(info));
                if let Some(i) = self.metrics_export.take() {
                    sh.metrics.detach(i);
                }
                self.metrics_export = Some(sh.metrics.attach(self.export_tag));
                self.attached = true;
                self.state = SlotState::Handshake;
            }
        }
        if let Some(code) = refused {
            self.link.close(reg);
            sh.moved();
            if let SlotState::Attaching { .. } = self.state {
                self.answer(None);
                self.state = SlotState::Handshake;
            } else if self.attached {
                eprintln!(
                    "csnap nbd: the server refused the volume ({}); its I/O fails",
                    code.name()
                );
                self.dead = Some(code);
            }
        }
    }

    pub(super) fn timers(&mut self, sh: &mut Shared, ctl: &mut Control, reg: &Registry, now: u64) {
        if let SlotState::Attaching { deadline_ms } = self.state {
            if now >= deadline_ms {
                eprintln!(
                    "csnap nbd: no server attached the volume within {} ms; export refused",
                    sh.timeout_ms
                );
                self.link.close(reg);
                self.answer(None);
                self.state = SlotState::Handshake;
                sh.moved();
            } else {
                sh.wake(deadline_ms);
            }
        }
        if self.attached && self.dead.is_none() {
            if let Some(since) = self.link.down_since_ms {
                let dl = since + sh.timeout_ms;
                if now >= dl {
                    // Every I/O waiting for a server fails; later ones get
                    // a window of their own (the link keeps trying).
                    if !self.timed_out {
                        eprintln!(
                            "csnap nbd: no server within {} ms of the failure; in-flight I/O fails (EIO), still trying",
                            sh.timeout_ms
                        );
                        self.timed_out = true;
                    }
                    sh.stats.timeouts += 1;
                    self.engine.fail_all(IoError::NoServer);
                    self.link.down_since_ms = Some(now);
                    sh.wake(now + sh.timeout_ms);
                    sh.moved();
                } else {
                    sh.wake(dl);
                }
            }
        }
        if let Some(code) = self.dead {
            if self.engine.in_flight() > 0 {
                self.engine.fail_all(IoError::Server(code));
            }
        }
        match (self.ctl.id(), self.ctl.deadline_ms()) {
            (Some(id), Some(deadline_ms)) if now >= deadline_ms => {
                ctl.fsm.forget(id);
                match self.ctl {
                    CtlWait::Info { .. } => self.answer(None),
                    // No server: the origin is all that can be named, and
                    // offers no snapshot's contexts.
                    CtlWait::Meta { tag: None, .. } => self.answer_meta(Some(&[])),
                    CtlWait::Meta { tag: Some(_), .. } => self.answer_meta(None),
                    CtlWait::Delta { .. } => {
                        self.delta_state = DeltaState::Failed(NbdError::Io);
                    }
                    CtlWait::List { .. } | CtlWait::None => {
                        self.list_n = 0;
                        self.list_pos = 0;
                        self.listing = true;
                    }
                }
                self.ctl = CtlWait::None;
                sh.moved();
            }
            (_, Some(deadline_ms)) => sh.wake(deadline_ms),
            _ => {}
        }
    }

    /// Sends the pending list's entries (as the transmit buffer allows).
    pub(super) fn emit_list(&mut self, sh: &mut Shared) {
        if self.listing && self.session.state() != NbdState::AwaitList {
            // The client went away meanwhile.
            self.listing = false;
        }
        while self.listing {
            if self.list_pos > self.list_n {
                let r = self.session.list_done();
                assert!(r.is_ok(), "a list is pending");
                self.listing = false;
                sh.moved();
                break;
            }
            let mut b = [0u8; 10];
            let name: &[u8] = if self.list_pos == 0 {
                b"origin"
            } else {
                decimal(self.list_tags[self.list_pos - 1], &mut b)
            };
            match self.session.list_entry(name) {
                Ok(()) => {
                    self.list_pos += 1;
                    sh.moved();
                }
                // Written out by `write_client`, then again.
                Err(_) => break,
            }
        }
    }
}
