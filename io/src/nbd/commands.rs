//! A connection slot's commands: client input, admission and submission
//! to the engine, disk and engine completions, replies, and the close.

use super::*;

impl Slot {
    pub(super) fn read_client(
        &mut self,
        sh: &mut Shared,
        ctl: &mut Control,
        reg: &Registry,
        now: u64,
    ) {
        loop {
            if let Some(ev) = self.session.poll_event() {
                sh.moved();
                self.on_event(ev, sh, ctl, reg, now);
                continue;
            }
            if matches!(self.state, SlotState::Closing { .. } | SlotState::Free) {
                return;
            }
            if let Some(p) = self.pending {
                if !self.admit(p, sh) {
                    return;
                }
                self.pending = None;
                sh.moved();
                continue;
            }
            let rem = usize::try_from(self.session.payload_remaining()).unwrap_or(0);
            if rem > 0 {
                if !self.read_payload(rem, sh, now) {
                    return;
                }
                continue;
            }
            if !self.session.wants_input() {
                return;
            }
            if self.rx_start < self.rx_end {
                let n = self
                    .session
                    .handle_input(&self.rx[self.rx_start..self.rx_end]);
                if n > 0 {
                    self.rx_start += n;
                    if self.rx_start == self.rx_end {
                        self.rx_start = 0;
                        self.rx_end = 0;
                    }
                    sh.moved();
                    continue;
                }
                // Nothing taken from a full buffer cannot happen (the
                // session takes any header byte it wants); do not spin.
                if self.rx_start == 0 && self.rx_end == self.rx.len() {
                    return;
                }
            }
            if !self.client_readable {
                return;
            }
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if !sh.streams.is_open(usize::from(self.index)) {
                return;
            }
            match sh
                .streams
                .read(usize::from(self.index), &mut self.rx[self.rx_end..])
            {
                StreamIo::Moved(n) => {
                    self.rx_end += n;
                    sh.moved();
                }
                StreamIo::WouldBlock => {
                    self.client_readable = false;
                    return;
                }
                StreamIo::Closed => {
                    self.client_eof(now, false);
                    sh.moved();
                    return;
                }
                StreamIo::Failed => {
                    self.client_eof(now, true);
                    sh.moved();
                    return;
                }
            }
        }
    }

    /// Moves `WRITE` payload into the command's buffer: what is received
    /// already, then straight from the socket. `false`: wait for input.
    pub(super) fn read_payload(&mut self, rem: usize, sh: &mut Shared, now: u64) -> bool {
        let Some(ci) = self.payload_cmd.map(usize::from) else {
            // Unreachable: an accepted WRITE is admitted before its payload.
            self.client_eof(now, true);
            return false;
        };
        let Some(b) = self.commands.table()[ci].and_then(|c| c.buf) else {
            self.client_eof(now, true);
            return false;
        };
        let at = DATA_AT + self.payload_filled;
        let n = if self.rx_start < self.rx_end {
            let n = rem.min(self.rx_end - self.rx_start);
            let dst = &mut sh.pool.get_mut(b)[at..at + n];
            dst.copy_from_slice(&self.rx[self.rx_start..self.rx_start + n]);
            self.rx_start += n;
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
            }
            n
        } else {
            if !self.client_readable {
                return false;
            }
            if !sh.streams.is_open(usize::from(self.index)) {
                return false;
            }
            let dst = &mut sh.pool.get_mut(b)[at..at + rem];
            match sh.streams.read(usize::from(self.index), dst) {
                StreamIo::Moved(n) => n,
                StreamIo::WouldBlock => {
                    self.client_readable = false;
                    return false;
                }
                StreamIo::Closed => {
                    self.client_eof(now, false);
                    return false;
                }
                StreamIo::Failed => {
                    self.client_eof(now, true);
                    return false;
                }
            }
        };
        let r = self.session.handle_payload(n);
        assert!(r.is_ok(), "payload within what the session expects");
        self.payload_filled += n;
        sh.moved();
        if self.session.payload_remaining() == 0 {
            self.payload_cmd = None;
            self.payload_filled = 0;
            if let Some(c) = self.commands.get_mut(ci) {
                c.receiving = false;
            }
        }
        true
    }

    pub(super) fn client_eof(&mut self, now: u64, broken: bool) {
        self.session.handle_eof();
        if broken {
            self.client_broken = true;
        }
        let serving = self.attached;
        self.begin_close(serving, now);
    }

    pub(super) fn on_event(
        &mut self,
        ev: NbdEvent,
        sh: &mut Shared,
        ctl: &mut Control,
        reg: &Registry,
        now: u64,
    ) {
        match ev {
            NbdEvent::ExportQuery { option } => {
                let vol = parse_export(self.session.export_name());
                match (option, vol) {
                    (_, None) => self.answer(None),
                    (ExportOption::Info, Some(Volume::Origin)) => {
                        let info = self.export_info(sh.export_size, sh.write_back);
                        self.answer(Some(info));
                    }
                    (ExportOption::Info, Some(Volume::Snapshot(tag))) => {
                        // The page from `tag` says whether it is live.
                        match ctl.request_list(sh, now, tag) {
                            Some(id) => {
                                self.ctl = CtlWait::Info {
                                    id,
                                    tag,
                                    deadline_ms: now + sh.timeout_ms,
                                };
                            }
                            None => self.answer(None),
                        }
                    }
                    (ExportOption::Go | ExportOption::ExportName, Some(v)) => {
                        self.attach(v, sh, reg, now);
                    }
                }
            }
            NbdEvent::MetaQuery { .. } => {
                let tag = match parse_export(self.session.export_name()) {
                    None => {
                        self.answer_meta(None);
                        return;
                    }
                    Some(Volume::Origin) => None,
                    Some(Volume::Snapshot(t)) => Some(t),
                };
                self.list_n = 0;
                match ctl.request_list(sh, now, 0) {
                    Some(id) => {
                        self.ctl = CtlWait::Meta {
                            id,
                            tag,
                            deadline_ms: now + sh.timeout_ms,
                        };
                    }
                    None if tag.is_none() => self.answer_meta(Some(&[])),
                    None => self.answer_meta(None),
                }
            }
            NbdEvent::ListQuery => match ctl.request_list(sh, now, 0) {
                Some(id) => {
                    self.list_n = 0;
                    self.ctl = CtlWait::List {
                        id,
                        deadline_ms: now + sh.timeout_ms,
                    };
                }
                None => {
                    self.list_n = 0;
                    self.list_pos = 0;
                    self.listing = true;
                }
            },
            NbdEvent::Ready => {
                if self.state == SlotState::Handshake {
                    self.state = SlotState::Serving;
                }
            }
            NbdEvent::Command(c) => self.pending = Some(Pending::Cmd(c)),
            NbdEvent::Reject {
                handle,
                error,
                structured,
            } => {
                self.pending = Some(Pending::Reject {
                    handle,
                    error,
                    structured,
                });
            }
            NbdEvent::Disconnect => {
                let serving = self.attached;
                self.begin_close(serving, now);
            }
            NbdEvent::Fatal(reason) => {
                eprintln!("csnap nbd: closing a connection: {reason}");
                let serving = self.attached;
                self.begin_close(serving, now);
            }
        }
    }

    /// Attaches the engine to `v` for an export query.
    pub(super) fn attach(&mut self, v: Volume, sh: &mut Shared, reg: &Registry, now: u64) {
        self.link.close(reg);
        let id = sh.new_client_id();
        self.engine.reset(v, id);
        self.volume = v;
        self.export_tag = crate::metrics::export_tag(v);
        self.link.start(id, sh.node_id, Some(v), now);
        self.timed_out = false;
        self.dead = None;
        self.state = SlotState::Attaching {
            deadline_ms: now + sh.timeout_ms,
        };
    }

    /// Admits a request: `false` when it must wait (no room, no buffer).
    pub(super) fn admit(&mut self, p: Pending, sh: &mut Shared) -> bool {
        if self.outstanding() >= CMDS {
            return false;
        }
        let c = match p {
            Pending::Reject {
                handle,
                error,
                structured,
            } => {
                self.push_done(handle, structured, Some(error), sh);
                return true;
            }
            Pending::Cmd(c) => c,
        };
        let buf = match nbd_conn::needs(&c) {
            Needs::Answer(err) => {
                let now_us = csnap_sys::monotonic_micros();
                sh.metrics
                    .finished(self.metrics_export, c.kind, 0, err.is_none(), now_us);
                let structured = self.structured_for(c.kind);
                self.push_done(c.handle, structured, err, sh);
                return true;
            }
            Needs::Nothing => None,
            Needs::Buffer => {
                if self.bufs_held >= BUFS_PER_CONN {
                    return false;
                }
                let Some(b) = sh.pool.take() else {
                    if !self.buffer_wait {
                        self.buffer_wait = true;
                        sh.stats.buffer_waits += 1;
                    }
                    return false;
                };
                self.buffer_wait = false;
                self.bufs_held += 1;
                Some(b)
            }
        };
        let Some(ci) = self.commands.admit(&c, buf, csnap_sys::monotonic_micros()) else {
            // Unreachable: `outstanding` bounds the table.
            if let Some(b) = buf {
                self.release_buf(sh, b);
            }
            return false;
        };
        if c.kind == CmdKind::Write {
            self.payload_cmd = u8::try_from(ci).ok();
            self.payload_filled = 0;
        }
        true
    }

    /// Submits what commands have for the engine, oldest first, until it is
    /// busy.
    pub(super) fn submit(&mut self, sh: &mut Shared) {
        if !matches!(self.state, SlotState::Serving | SlotState::Closing { .. }) {
            return;
        }
        if self.commands.submit(&mut self.engine, sh.write_back) {
            sh.moved();
        }
        self.answer_events(sh);
    }

    /// Hands the engine's disk operations to the disk queue and its
    /// completions to their commands.
    pub(super) fn drain_engine(&mut self, sh: &mut Shared) {
        while let Some(op) = self.held.take().or_else(|| self.engine.poll_disk()) {
            let bref = self.commands.disk_buf(op.slot());
            let buf_offset = match op {
                DiskOp::Read { buf_offset, .. } | DiskOp::Write { buf_offset, .. } => {
                    buf_offset as usize
                }
                DiskOp::Sync { .. } => 0,
            };
            let data_at = match (bref, op) {
                (Some(BufRef::Pool(b)), _) => Some(sh.pool.data_at(b) + buf_offset),
                (Some(BufRef::Zero), DiskOp::Write { .. } | DiskOp::Sync { .. }) => {
                    Some(sh.pool.zero_at() + buf_offset)
                }
                // Unreachable: every engine I/O has a buffer, and nothing
                // reads into the zero buffer.
                _ => None,
            };
            let Some(data_at) = data_at else {
                sh.stats.disk_errors += 1;
                self.engine.disk_done(&op, false);
                sh.moved();
                continue;
            };
            if !sh.disk.take(self.index, op, data_at) {
                // The queue is full: offered again after a completion.
                self.held = Some(op);
                break;
            }
            sh.moved();
        }
        while let Some((tag, r)) = self.engine.poll_complete() {
            sh.moved();
            self.commands.complete(tag, r);
            self.answer_events(sh);
        }
    }

    /// Turns the commands' events into replies: an early acknowledgement
    /// is a simple reply; a finished command's answer is written around
    /// its buffer's data or queued as a header, and its buffer goes back
    /// when it carries no reply.
    pub(super) fn answer_events(&mut self, sh: &mut Shared) {
        while let Some(ev) = self.commands.poll_event() {
            sh.moved();
            let f = match ev {
                ConnEvent::Ack { handle } => {
                    self.push_hdr(&simple_reply(handle, None), sh);
                    continue;
                }
                ConnEvent::Finished(f) => f,
            };
            sh.metrics
                .finished(self.metrics_export, f.kind, f.len, f.ok, f.start_us);
            let structured = self.structured_for(f.kind);
            let end = u32::try_from(DATA_AT).unwrap_or(0);
            match (f.answer, f.buf) {
                (Answer::ReadData, Some(b)) => {
                    let start = if structured {
                        let at = DATA_AT - OFFSET_DATA_HEADER_BYTES;
                        sh.pool.get_mut(b)[at..DATA_AT]
                            .copy_from_slice(&offset_data_header(f.handle, f.offset, f.len));
                        at
                    } else {
                        sh.pool.get_mut(b)[HDR_AT..DATA_AT]
                            .copy_from_slice(&simple_reply(f.handle, None));
                        HDR_AT
                    };
                    sh.stats.commands += 1;
                    let start = u32::try_from(start).unwrap_or(0);
                    let pushed = self.data_out.push_back((b, start, end + f.len)).is_ok();
                    assert!(pushed, "reply room is reserved at admission");
                }
                (Answer::BlockStatus { rendered }, Some(b)) => {
                    sh.stats.commands += 1;
                    let pushed = self.data_out.push_back((b, end, end + rendered)).is_ok();
                    assert!(pushed, "reply room is reserved at admission");
                }
                (answer, buf) => {
                    if let Answer::Done { error } = answer {
                        self.push_done(f.handle, structured, error, sh);
                    }
                    if let Some(b) = buf {
                        self.release_buf(sh, b);
                    }
                }
            }
        }
    }

    pub(super) fn write_client(&mut self, sh: &mut Shared) {
        loop {
            if self.client_broken {
                self.drop_output(sh);
                return;
            }
            if !sh.streams.is_open(usize::from(self.index)) {
                return;
            }
            let i = usize::from(self.index);
            if !self.session.transmit().is_empty() {
                match sh.streams.write(i, self.session.transmit()) {
                    StreamIo::Moved(n) => {
                        let r = self.session.consume_transmit(n);
                        assert!(r.is_ok(), "wrote what was pending");
                        sh.moved();
                    }
                    StreamIo::WouldBlock => return,
                    StreamIo::Closed | StreamIo::Failed => self.client_broken = true,
                }
                continue;
            }
            // The queued headers, then the data replies, in one `writev`.
            let hdr = self.hdr_end - self.hdr_start;
            let mut iov = [std::io::IoSlice::new(&[]); GATHER];
            let mut k = 0;
            if hdr > 0 {
                iov[0] = std::io::IoSlice::new(&self.hdr_out[self.hdr_start..self.hdr_end]);
                k = 1;
            }
            for (j, &(b, start, end)) in self.data_out.iter().enumerate() {
                if k == GATHER {
                    break;
                }
                let from = start as usize + if j == 0 { self.data_written } else { 0 };
                iov[k] = std::io::IoSlice::new(&sh.pool.get(b)[from..end as usize]);
                k += 1;
            }
            if k == 0 {
                return;
            }
            let n = match sh.streams.write_vectored(i, &iov[..k]) {
                StreamIo::Moved(n) => n,
                StreamIo::WouldBlock => return,
                StreamIo::Closed | StreamIo::Failed => {
                    self.client_broken = true;
                    continue;
                }
            };
            let h = n.min(hdr);
            if h > 0 {
                self.hdr_written(h);
            }
            self.data_sent(n - h, sh);
            sh.moved();
        }
    }

    /// `n` bytes of the queued headers went out.
    fn hdr_written(&mut self, n: usize) {
        self.hdr_start += n;
        if self.hdr_start == self.hdr_end {
            self.hdr_start = 0;
            self.hdr_end = 0;
        }
        self.hdr_front_written += n;
        while let Some(l) = self.hdr_lens.front().copied() {
            if self.hdr_front_written < usize::from(l) {
                break;
            }
            self.hdr_front_written -= usize::from(l);
            self.hdr_lens.pop_front();
        }
    }

    /// `n` bytes of the data replies went out: those sent whole give their
    /// buffers back.
    fn data_sent(&mut self, mut n: usize, sh: &mut Shared) {
        while n > 0 {
            let Some((b, start, end)) = self.data_out.front().copied() else {
                return;
            };
            let left = (end - start) as usize - self.data_written;
            let k = n.min(left);
            self.data_written += k;
            n -= k;
            if k == left {
                self.data_out.pop_front();
                self.data_written = 0;
                self.release_buf(sh, b);
            }
        }
    }

    /// The client is gone: its replies cannot be delivered.
    pub(super) fn drop_output(&mut self, sh: &mut Shared) {
        while let Some((b, _, _)) = self.data_out.pop_front() {
            self.release_buf(sh, b);
        }
        self.data_written = 0;
        self.hdr_start = 0;
        self.hdr_end = 0;
        self.hdr_lens.clear();
        self.hdr_front_written = 0;
        let n = self.session.transmit().len();
        let _ = self.session.consume_transmit(n);
    }

    pub(super) fn maybe_close(
        &mut self,
        sh: &mut Shared,
        ctl: &mut Control,
        reg: &Registry,
        now: u64,
    ) {
        let SlotState::Closing {
            flush,
            linger_until_ms,
        } = self.state
        else {
            return;
        };
        // What can never complete now: a request not admitted, a write whose
        // payload will not come, a question to the control connection.
        self.pending = None;
        self.listing = false;
        if let Some(id) = self.ctl.id() {
            ctl.fsm.forget(id);
            if matches!(self.ctl, CtlWait::Delta { .. }) {
                // Its block-status command ends with an error now.
                self.delta_state = DeltaState::Failed(NbdError::Shutdown);
            }
            sh.moved();
        }
        self.ctl = CtlWait::None;
        if let Some(ci) = self.payload_cmd.take().map(usize::from) {
            if let Some(Some(b)) = self.commands.drop_cmd(ci) {
                self.release_buf(sh, b);
            }
            self.payload_cmd = None;
            self.payload_filled = 0;
        }
        if self.commands.active() > 0 {
            return;
        }
        if self.output_left() && !self.client_broken && now < linger_until_ms {
            sh.wake(linger_until_ms);
            return;
        }
        if flush && !sh.sync_both() {
            eprintln!("csnap nbd: flush at disconnect failed");
        }
        self.teardown(sh, ctl, reg);
    }

    /// Gives everything back; the slot is free.
    pub(super) fn teardown(&mut self, sh: &mut Shared, ctl: &mut Control, reg: &Registry) {
        assert!(
            self.commands.active() == 0,
            "teardown with commands in flight"
        );
        if self.attached {
            self.engine.release_all_idle();
            self.link.flush_best_effort(&mut self.engine);
        }
        self.link.close(reg);
        if sh.streams.is_open(usize::from(self.index)) {
            if !self.client_broken && !self.session.transmit().is_empty() {
                let _ = sh
                    .streams
                    .write(usize::from(self.index), self.session.transmit());
            }
            sh.streams.close(usize::from(self.index), reg);
        }
        self.client_broken = true;
        self.drop_output(sh);
        if let Some(id) = self.ctl.id() {
            ctl.fsm.forget(id);
        }
        self.ctl = CtlWait::None;
        self.delta_state = DeltaState::None;
        self.listing = false;
        self.pending = None;
        self.payload_cmd = None;
        assert!(self.held.is_none(), "a disk operation held without I/O");
        self.commands.reset_ios();
        self.attached = false;
        if let Some(i) = self.metrics_export.take() {
            sh.metrics.detach(i);
        }
        self.timed_out = false;
        self.dead = None;
        self.state = SlotState::Free;
        sh.moved();
    }

    /// The invariants, after every pump (cheap; release builds too).
    pub(super) fn check(&self, sh: &Shared) {
        self.commands.check();
        let bufs = self
            .commands
            .table()
            .iter()
            .flatten()
            .filter(|c| c.buf.is_some())
            .count()
            + self.data_out.len();
        assert_eq!(bufs, self.bufs_held, "buffers held out of step");
        assert!(self.bufs_held <= BUFS_PER_CONN);
        assert!(self.outstanding() <= CMDS, "more commands than the table");
        assert!(self.hdr_start <= self.hdr_end && self.hdr_end <= self.hdr_out.len());
        assert!(self.hdr_lens.is_empty() || self.hdr_end > self.hdr_start);
        if matches!(self.ctl, CtlWait::Delta { .. }) {
            assert!(
                self.commands
                    .table()
                    .iter()
                    .flatten()
                    .any(|c| c.kind == CmdKind::BlockStatus),
                "a delta query for no block-status command"
            );
        }
        assert!(self.rx_start <= self.rx_end && self.rx_end <= self.rx.len());
        let in_engine = self.commands.in_engine();
        assert_eq!(
            in_engine,
            self.engine.in_flight(),
            "engine I/Os out of step with the commands"
        );
        if self.state == SlotState::Free {
            assert!(
                !sh.streams.is_open(usize::from(self.index))
                    && !self.link.active()
                    && self.commands.active() == 0
            );
        }
        if let Some(ci) = self.payload_cmd {
            assert!(self.commands.table()[usize::from(ci)].is_some_and(|c| c.receiving));
            assert!(matches!(self.session.state(), NbdState::Payload { .. }));
        }
        let _ = sh;
    }
}
