//! The session's input: one step of the state machine on received bytes,
//! the handshake's options and the transmission's requests (validated into
//! commands or rejections).

use super::*;

impl NbdSession {
    /// One step on non-empty `rest`; returns the bytes consumed (0: blocked).
    pub(super) fn step(&mut self, rest: &[u8]) -> usize {
        match self.st {
            NbdState::ClientFlags => {
                let n = self.fill(rest, CLIENT_FLAGS_BYTES);
                if self.hdr_len == CLIENT_FLAGS_BYTES {
                    self.hdr_len = 0;
                    let flags = u32::from_be_bytes(self.hdr_field(0));
                    self.on_client_flags(flags);
                }
                n
            }
            NbdState::OptionHeader => {
                if self.hdr_len == 0 && self.tx_free() < NBD_OPTION_REPLY_MAX_BYTES {
                    return 0;
                }
                let n = self.fill(rest, OPTION_HEADER_BYTES);
                if self.hdr_len >= 8 && u64::from_be_bytes(self.hdr_field(0)) != IHAVEOPT {
                    self.fatal(FatalReason::BadOptionMagic);
                } else if self.hdr_len == OPTION_HEADER_BYTES {
                    self.hdr_len = 0;
                    let opt = u32::from_be_bytes(self.hdr_field(8));
                    let len = u32::from_be_bytes(self.hdr_field(12));
                    self.on_option_header(opt, len);
                }
                n
            }
            NbdState::OptionData { opt, len } => {
                let want = len.saturating_sub(self.data_len);
                let n = want.min(rest.len());
                let (Some(dst), Some(src)) = (
                    self.data.get_mut(self.data_len..self.data_len + n),
                    rest.get(..n),
                ) else {
                    // Unreachable: `len` is at most the scratch size.
                    self.fatal(FatalReason::OptionTooLong);
                    return 0;
                };
                dst.copy_from_slice(src);
                self.data_len += n;
                if self.data_len == len {
                    self.data_len = 0;
                    self.on_option_data(opt, len);
                }
                n
            }
            NbdState::OptionSkip {
                opt,
                remaining,
                then,
            } => {
                let n = u32::try_from(rest.len()).unwrap_or(u32::MAX).min(remaining);
                let left = remaining - n;
                if left == 0 {
                    self.finish_skip(opt, then);
                } else {
                    self.st = NbdState::OptionSkip {
                        opt,
                        remaining: left,
                        then,
                    };
                }
                usize::try_from(n).unwrap_or(0)
            }
            NbdState::Request => {
                let n = self.fill(rest, REQUEST_HEADER_BYTES);
                if self.hdr_len >= 4 && u32::from_be_bytes(self.hdr_field(0)) != REQUEST_MAGIC {
                    self.fatal(FatalReason::BadRequestMagic);
                } else if self.hdr_len == REQUEST_HEADER_BYTES {
                    self.hdr_len = 0;
                    self.on_request();
                }
                n
            }
            NbdState::PayloadSkip { remaining } => {
                let n = u32::try_from(rest.len()).unwrap_or(u32::MAX).min(remaining);
                let left = remaining - n;
                self.st = if left == 0 {
                    NbdState::Request
                } else {
                    NbdState::PayloadSkip { remaining: left }
                };
                usize::try_from(n).unwrap_or(0)
            }
            NbdState::AwaitExport { .. }
            | NbdState::AwaitList
            | NbdState::AwaitMeta { .. }
            | NbdState::MetaReply { .. }
            | NbdState::Payload { .. }
            | NbdState::Disconnecting
            | NbdState::Closed => 0,
        }
    }

    /// Copies from `rest` into the header until it holds `want` bytes.
    pub(super) fn fill(&mut self, rest: &[u8], want: usize) -> usize {
        let n = want.saturating_sub(self.hdr_len).min(rest.len());
        let (Some(dst), Some(src)) = (
            self.hdr.get_mut(self.hdr_len..self.hdr_len + n),
            rest.get(..n),
        ) else {
            return 0;
        };
        dst.copy_from_slice(src);
        self.hdr_len += n;
        n
    }

    /// `N` header bytes at `at` (zeroes past the header, which callers never
    /// ask for).
    pub(super) fn hdr_field<const N: usize>(&self, at: usize) -> [u8; N] {
        field(&self.hdr, at).unwrap_or([0; N])
    }

    pub(super) fn on_client_flags(&mut self, flags: u32) {
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            self.fatal(FatalReason::BadClientFlags);
            return;
        }
        self.fixed_newstyle = flags & FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.st = NbdState::OptionHeader;
    }

    pub(super) fn on_option_header(&mut self, opt: u32, len: u32) {
        if !self.fixed_newstyle && opt != OPT_EXPORT_NAME {
            self.fatal(FatalReason::NotFixedNewstyle);
            return;
        }
        match opt {
            OPT_EXPORT_NAME => match usize::try_from(len) {
                Ok(l) if l <= NBD_EXPORT_NAME_MAX_BYTES => self.expect_data(opt, l),
                _ => self.fatal(FatalReason::UnknownExport),
            },
            OPT_INFO | OPT_GO => match usize::try_from(len) {
                Ok(l) if l <= NBD_OPTION_DATA_MAX_BYTES => self.expect_data(opt, l),
                _ => self.skip(opt, len, AfterSkip::Error(REP_ERR_TOO_BIG)),
            },
            OPT_ABORT => self.skip(opt, len, AfterSkip::Abort),
            OPT_LIST if len == 0 => {
                self.st = NbdState::AwaitList;
                self.event = Some(NbdEvent::ListQuery);
            }
            OPT_LIST => self.skip(opt, len, AfterSkip::Error(REP_ERR_INVALID)),
            OPT_STRUCTURED_REPLY if len == 0 => {
                self.structured = true;
                self.reply(opt, REP_ACK, &[]);
            }
            OPT_STRUCTURED_REPLY => self.skip(opt, len, AfterSkip::Error(REP_ERR_INVALID)),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if opt == OPT_SET_META_CONTEXT {
                    // A selection replaces the former one, even when it
                    // fails.
                    self.selected_n = 0;
                    self.selected_name_len = 0;
                }
                match usize::try_from(len) {
                    Ok(l) if l <= NBD_OPTION_DATA_MAX_BYTES => self.expect_data(opt, l),
                    _ => self.skip(opt, len, AfterSkip::Error(REP_ERR_TOO_BIG)),
                }
            }
            _ => self.skip(opt, len, AfterSkip::Error(REP_ERR_UNSUP)),
        }
    }

    pub(super) fn expect_data(&mut self, opt: u32, len: usize) {
        self.data_len = 0;
        if len == 0 {
            self.on_option_data(opt, 0);
        } else {
            self.st = NbdState::OptionData { opt, len };
        }
    }

    pub(super) fn skip(&mut self, opt: u32, len: u32, then: AfterSkip) {
        if len > NBD_OPTION_SKIP_MAX_BYTES {
            self.fatal(FatalReason::OptionTooLong);
        } else if len == 0 {
            self.finish_skip(opt, then);
        } else {
            self.st = NbdState::OptionSkip {
                opt,
                remaining: len,
                then,
            };
        }
    }

    pub(super) fn finish_skip(&mut self, opt: u32, then: AfterSkip) {
        match then {
            AfterSkip::Error(rep) => {
                self.reply_error(opt, rep);
                self.st = NbdState::OptionHeader;
            }
            AfterSkip::Abort => {
                self.reply(opt, REP_ACK, &[]);
                self.st = NbdState::Disconnecting;
                self.event = Some(NbdEvent::Disconnect);
            }
        }
    }

    pub(super) fn on_option_data(&mut self, opt: u32, len: usize) {
        if opt == OPT_EXPORT_NAME {
            self.set_name(0, len);
            self.query(opt);
            return;
        }
        if opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT {
            let parsed = self.data.get(..len).and_then(parse_meta_request);
            match parsed {
                _ if opt == OPT_SET_META_CONTEXT && !self.structured => {
                    self.reply_error(opt, REP_ERR_INVALID);
                    self.st = NbdState::OptionHeader;
                }
                Some(name_len) if name_len <= NBD_EXPORT_NAME_MAX_BYTES => {
                    self.set_name(4, name_len);
                    self.st = NbdState::AwaitMeta { opt, len };
                    self.event = Some(NbdEvent::MetaQuery {
                        set: opt == OPT_SET_META_CONTEXT,
                    });
                }
                Some(_) => {
                    self.reply_error(opt, REP_ERR_UNKNOWN);
                    self.st = NbdState::OptionHeader;
                }
                None => {
                    self.reply_error(opt, REP_ERR_INVALID);
                    self.st = NbdState::OptionHeader;
                }
            }
            return;
        }
        // INFO or GO.
        let parsed = self.data.get(..len).and_then(parse_info_request);
        match parsed {
            Some((at, name_len)) if name_len <= NBD_EXPORT_NAME_MAX_BYTES => {
                self.set_name(at, name_len);
                self.query(opt);
            }
            Some(_) => {
                self.reply_error(opt, REP_ERR_UNKNOWN);
                self.st = NbdState::OptionHeader;
            }
            None => {
                self.reply_error(opt, REP_ERR_INVALID);
                self.st = NbdState::OptionHeader;
            }
        }
    }

    /// Copies `data[at..at + len]` (at most a name's length) as the name.
    pub(super) fn set_name(&mut self, at: usize, len: usize) {
        let src = at.checked_add(len).and_then(|end| self.data.get(at..end));
        match (src, self.name.get_mut(..len)) {
            (Some(src), Some(dst)) => {
                dst.copy_from_slice(src);
                self.name_len = len;
            }
            _ => self.name_len = 0,
        }
    }

    pub(super) fn query(&mut self, opt: u32) {
        let option = match opt {
            OPT_EXPORT_NAME => ExportOption::ExportName,
            OPT_INFO => ExportOption::Info,
            _ => ExportOption::Go,
        };
        self.st = NbdState::AwaitExport { opt };
        self.event = Some(NbdEvent::ExportQuery { option });
    }

    pub(super) fn enter_transmission(&mut self, info: ExportInfo) {
        if self.selected_name.get(..self.selected_name_len) != self.name.get(..self.name_len) {
            // Contexts selected for another export are not this one's.
            self.selected_n = 0;
        }
        self.export = info;
        self.export_chosen = true;
        self.st = NbdState::Request;
        self.event = Some(NbdEvent::Ready);
    }

    pub(super) fn on_request(&mut self) {
        let flags = u16::from_be_bytes(self.hdr_field(4));
        let typ = u16::from_be_bytes(self.hdr_field(6));
        let handle = u64::from_be_bytes(self.hdr_field(8));
        let offset = u64::from_be_bytes(self.hdr_field(16));
        let length = u32::from_be_bytes(self.hdr_field(24));
        if typ == CMD_DISC {
            self.st = NbdState::Disconnecting;
            self.event = Some(NbdEvent::Disconnect);
            return;
        }
        if typ == CMD_WRITE && length > NBD_WRITE_SKIP_MAX_BYTES {
            self.fatal(FatalReason::WriteTooLong);
            return;
        }
        let checked = match CmdKind::from_wire(typ) {
            Some(kind) => self.validate(kind, flags, offset, length).map(|()| kind),
            None => Err(NbdError::Inval),
        };
        let has_payload = typ == CMD_WRITE && length > 0;
        match checked {
            Ok(kind) => {
                self.event = Some(NbdEvent::Command(Cmd {
                    handle,
                    kind,
                    flags: CmdFlags(flags),
                    offset,
                    length,
                }));
                if has_payload {
                    self.st = NbdState::Payload { remaining: length };
                }
            }
            Err(error) => {
                let structured = self.structured && matches!(typ, CMD_READ | CMD_BLOCK_STATUS);
                self.event = Some(NbdEvent::Reject {
                    handle,
                    error,
                    structured,
                });
                if has_payload {
                    self.st = NbdState::PayloadSkip { remaining: length };
                }
            }
        }
    }

    pub(super) fn validate(
        &self,
        kind: CmdKind,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<(), NbdError> {
        if flags & !kind.allowed_flags() != 0 {
            return Err(NbdError::Inval);
        }
        if matches!(kind, CmdKind::Read | CmdKind::Write) && length > self.cfg.payload_limit_bytes {
            return Err(NbdError::Inval);
        }
        if kind == CmdKind::BlockStatus && (self.selected_n == 0 || length == 0) {
            return Err(NbdError::Inval);
        }
        if self.export.read_only && kind.writes() {
            return Err(NbdError::Perm);
        }
        if kind != CmdKind::Flush {
            let size = self.export.size_bytes;
            if offset > size || u64::from(length) > size - offset {
                return Err(match kind {
                    CmdKind::Write | CmdKind::WriteZeroes => NbdError::NoSpc,
                    _ => NbdError::Inval,
                });
            }
        }
        Ok(())
    }

    pub(super) fn fatal(&mut self, reason: FatalReason) {
        self.st = NbdState::Closed;
        self.hdr_len = 0;
        self.data_len = 0;
        self.event = Some(NbdEvent::Fatal(reason));
    }
}
