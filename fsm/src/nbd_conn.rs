//! The NBD connection's commands, sans-IO: the table of admitted commands,
//! what goes to the volume engine next (`nbd_cmds`), which write is
//! acknowledged as soon as the engine has it, how the engine's completions
//! map back to their commands, and how each finished command is answered.
//!
//! Together with the session (`crate::nbd`: the wire) and the engine
//! (`crate::volume`: the server round trips and the disk operations), this
//! is a whole NBD connection as a state machine: bytes and disk completions
//! in, replies and disk operations out. The driver (`io/src/nbd/`) keeps the
//! memory (the buffers commands name by number, the reply queues) and the
//! sockets; it admits a command (`admit`), hands the engine work (`submit`),
//! passes completions back (`complete`), and turns each [`ConnEvent`]
//! (`poll_event`) into bytes. `io/tests/engine_sim.rs` drives the three
//! with a seeded cluster, disk completions included. Nothing here allocates
//! or touches a socket, a disk or a clock (admission times are passed in).

use csnap_proto::ErrorCode;

use crate::nbd::{Cmd, CmdKind, NbdError};
use crate::nbd_cmds::{self, BufRef, Command, Fua};
use crate::volume::{IoError, SubmitError, VolumeEngine};

/// Commands one connection has admitted at once.
pub const CMDS: usize = csnap_pools::NBD_COMMANDS_PER_CONNECTION_MAX;
/// Engine I/Os of one connection at once.
pub const IOS: usize = csnap_pools::VOLUME_IOS_MAX;
/// Events between two drains: an early acknowledgement and a finish per
/// command at most.
const EVENTS: usize = 2 * CMDS;
const _: () = assert!(CMDS <= u8::MAX as usize + 1);

/// What a request needs before it is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Answered at once, with this error or none (`TRIM` and `CACHE`, which
    /// csnap need not act on; an empty transfer; a fast zero it cannot
    /// promise).
    Answer(Option<NbdError>),
    /// A data buffer (reads, writes, block status).
    Buffer,
    /// Nothing (flushes, write-zeroes).
    Nothing,
}

/// What request `c` needs before admission.
#[must_use]
pub fn needs(c: &Cmd) -> Needs {
    match c.kind {
        CmdKind::Trim | CmdKind::Cache => Needs::Answer(None),
        CmdKind::WriteZeroes if c.flags.fast_zero() => Needs::Answer(Some(NbdError::NotSup)),
        CmdKind::Read | CmdKind::Write | CmdKind::WriteZeroes if c.length == 0 => {
            Needs::Answer(None)
        }
        CmdKind::Read | CmdKind::Write | CmdKind::BlockStatus => Needs::Buffer,
        CmdKind::Flush | CmdKind::WriteZeroes => Needs::Nothing,
    }
}

/// The NBD error an engine failure is answered with.
#[must_use]
pub fn nbd_error(e: IoError) -> NbdError {
    match e {
        IoError::Disk | IoError::NoServer | IoError::ServerDeaths => NbdError::Io,
        IoError::Invalid => NbdError::Inval,
        IoError::Server(ErrorCode::StoreFull) => NbdError::NoSpc,
        IoError::Server(ErrorCode::ReadOnly) => NbdError::Perm,
        IoError::Server(_) => NbdError::Io,
    }
}

/// How a finished command is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Not at all: it was acknowledged when the engine took it (a failure
    /// now is reported by the next `FLUSH`).
    Acked,
    /// Its data, in its buffer (a simple reply or an `OFFSET_DATA` chunk
    /// before it).
    ReadData,
    /// The block-status chunks rendered in its buffer: `rendered` bytes.
    BlockStatus {
        /// Bytes of reply in the buffer.
        rendered: u32,
    },
    /// A reply without data: a simple reply, or a `NONE` or `ERROR` chunk.
    Done {
        /// The error, if it failed.
        error: Option<NbdError>,
    },
}

/// A finished command: how it is answered and what it gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The client's handle.
    pub handle: u64,
    /// The command.
    pub kind: CmdKind,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// Its buffer: the driver answers from it (`ReadData`, `BlockStatus`)
    /// or gives it back.
    pub buf: Option<u16>,
    /// It succeeded (for the figures; a `FLUSH` that reports an earlier
    /// write's failure counts as its own success).
    pub ok: bool,
    /// Admitted at (µs).
    pub start_us: u64,
    /// The answer.
    pub answer: Answer,
}

/// What the driver turns into bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEvent {
    /// A write acknowledged as soon as the engine took it (write-back): a
    /// simple reply without error, now.
    Ack {
        /// The client's handle.
        handle: u64,
    },
    /// A command finished.
    Finished(Finished),
}

/// The connection's commands.
#[derive(Debug, Clone)]
pub struct NbdCommands {
    cmds: [Option<Command>; CMDS],
    /// Engine slot → (command, buffer of its disk operations).
    io_map: [Option<(u8, BufRef)>; IOS],
    active: usize,
    seq: u64,
    /// A failure of a write acknowledged early: the next `FLUSH` reports it.
    wb_error: Option<NbdError>,
    events: [Option<ConnEvent>; EVENTS],
    ev_head: usize,
    ev_len: usize,
}

impl Default for NbdCommands {
    fn default() -> Self {
        Self::new()
    }
}

impl NbdCommands {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        NbdCommands {
            cmds: [None; CMDS],
            io_map: [None; IOS],
            active: 0,
            seq: 0,
            wb_error: None,
            events: [None; EVENTS],
            ev_head: 0,
            ev_len: 0,
        }
    }

    /// Commands admitted and not finished.
    #[must_use]
    pub fn active(&self) -> usize {
        self.active
    }

    /// The table (the driver's block-status progress and checks read it).
    #[must_use]
    pub fn table(&self) -> &[Option<Command>] {
        &self.cmds
    }

    /// Command `ci`, to update (payload received, block-status progress).
    pub fn get_mut(&mut self, ci: usize) -> Option<&mut Command> {
        self.cmds.get_mut(ci).and_then(Option::as_mut)
    }

    /// Admits `c` (what it `needs` is the caller's: its buffer is `buf`) at
    /// `now_us`; `None` when the table is full.
    pub fn admit(&mut self, c: &Cmd, buf: Option<u16>, now_us: u64) -> Option<usize> {
        let ci = self.cmds.iter().position(Option::is_none)?;
        self.seq += 1;
        self.cmds[ci] = Some(Command::admitted(c, self.seq, buf, now_us));
        self.active += 1;
        self.check();
        Some(ci)
    }

    /// Drops command `ci` without an answer (its payload will not come: the
    /// connection is closing); returns its buffer.
    pub fn drop_cmd(&mut self, ci: usize) -> Option<Option<u16>> {
        let c = self.cmds.get_mut(ci)?.take()?;
        self.active -= 1;
        self.check();
        Some(c.buf)
    }

    /// Hands the engine what commands have for it, oldest first, until it
    /// is busy; a write it takes is acknowledged at once under write-back.
    /// Returns whether anything moved.
    pub fn submit(&mut self, engine: &mut VolumeEngine, write_back: bool) -> bool {
        let mut moved = false;
        while let Some(ci) = nbd_cmds::next_to_submit(&self.cmds) {
            let Some((kind, off, len, bref)) = self.cmds[ci].and_then(|c| c.next_io()) else {
                break;
            };
            let tag = u64::try_from(ci).unwrap_or(u64::MAX);
            match engine.submit(tag, kind, off, len) {
                Ok(slot) => {
                    if let Some(m) = self.io_map.get_mut(slot as usize) {
                        *m = Some((u8::try_from(ci).unwrap_or(u8::MAX), bref));
                    }
                    let connected = engine.is_ready();
                    let mut ack = None;
                    if let Some(c) = self.cmds[ci].as_mut() {
                        c.in_engine += 1;
                        c.advance(len);
                        if c.acks_early(write_back, connected) {
                            c.acked = true;
                            ack = Some(c.handle);
                        }
                    }
                    if let Some(handle) = ack {
                        self.event(ConnEvent::Ack { handle });
                    }
                    moved = true;
                }
                Err(SubmitError::Busy | SubmitError::NotReady) => break,
                Err(SubmitError::Invalid) => {
                    if let Some(c) = self.cmds[ci].as_mut() {
                        c.error.get_or_insert(NbdError::Inval);
                        c.next = c.end;
                        c.fua = Fua::No;
                    }
                    self.finish(ci);
                    moved = true;
                }
            }
        }
        self.check();
        moved
    }

    /// The buffer engine slot `slot`'s disk operations use.
    #[must_use]
    pub fn disk_buf(&self, slot: u32) -> Option<BufRef> {
        self.io_map
            .get(slot as usize)
            .copied()
            .flatten()
            .map(|(_, b)| b)
    }

    /// The engine finished an I/O of command `tag`.
    pub fn complete(&mut self, tag: u64, r: Result<(), IoError>) {
        let ci = usize::try_from(tag).unwrap_or(usize::MAX);
        let Some(c) = self.cmds.get_mut(ci).and_then(Option::as_mut) else {
            return;
        };
        assert!(
            c.in_engine > 0,
            "a completion for a command not in the engine"
        );
        c.in_engine -= 1;
        if let Err(e) = r {
            c.error.get_or_insert(nbd_error(e));
            c.next = c.end;
            c.fua = match c.fua {
                Fua::Needed => Fua::No,
                f => f,
            };
            // A write the disk failed also fails the next flush (as fsync
            // reports a failed write-back).
            if e == IoError::Disk && matches!(c.kind, CmdKind::Write | CmdKind::WriteZeroes) {
                self.wb_error.get_or_insert(NbdError::Io);
            }
        }
        self.finish(ci);
        self.check();
    }

    /// Finishes command `ci` if nothing of it is left to do: its answer
    /// goes to the events.
    pub fn finish(&mut self, ci: usize) {
        let Some(c) = self.cmds.get(ci).copied().flatten() else {
            return;
        };
        if !c.done() {
            return;
        }
        self.cmds[ci] = None;
        self.active -= 1;
        let ok = c.error.is_none();
        let answer = if c.acked {
            // Its reply went out when it was taken; a failure now is the
            // next flush's to report.
            if let Some(e) = c.error {
                self.wb_error.get_or_insert(e);
            }
            Answer::Acked
        } else {
            // A flush reports a failure of a write acknowledged before it.
            let error = match (c.kind, c.error) {
                (CmdKind::Flush, None) => self.wb_error.take(),
                (_, e) => e,
            };
            match (c.kind, error, c.buf) {
                (CmdKind::Read, None, Some(_)) => Answer::ReadData,
                (CmdKind::BlockStatus, None, Some(_)) => Answer::BlockStatus {
                    rendered: c.rendered,
                },
                (_, error, _) => Answer::Done { error },
            }
        };
        self.event(ConnEvent::Finished(Finished {
            handle: c.handle,
            kind: c.kind,
            offset: c.offset,
            len: c.len,
            buf: c.buf,
            ok,
            start_us: c.start_us,
            answer,
        }));
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<ConnEvent> {
        if self.ev_len == 0 {
            return None;
        }
        let e = self.events[self.ev_head].take();
        self.ev_head = (self.ev_head + 1) % EVENTS;
        self.ev_len -= 1;
        e
    }

    /// Forgets the engine's I/Os (the connection is torn down, nothing in
    /// flight).
    pub fn reset_ios(&mut self) {
        assert!(self.active == 0, "reset with commands in flight");
        self.io_map = [None; IOS];
    }

    fn event(&mut self, e: ConnEvent) {
        assert!(self.ev_len < EVENTS, "events are drained after every call");
        self.events[(self.ev_head + self.ev_len) % EVENTS] = Some(e);
        self.ev_len += 1;
    }

    /// The invariants (after every change; release builds too).
    pub fn check(&self) {
        assert_eq!(
            self.cmds.iter().flatten().count(),
            self.active,
            "command count out of step"
        );
        assert!(self.ev_len <= EVENTS);
        for (ci, _) in self.io_map.iter().flatten() {
            assert!(usize::from(*ci) < CMDS);
        }
    }

    /// Engine I/Os the commands have in flight.
    #[must_use]
    pub fn in_engine(&self) -> usize {
        self.cmds
            .iter()
            .flatten()
            .map(|c| c.in_engine as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::CmdFlags;

    fn cmd(handle: u64, kind: CmdKind, offset: u64, length: u32) -> Cmd {
        Cmd {
            handle,
            kind,
            flags: CmdFlags(0),
            offset,
            length,
        }
    }

    /// Trims, caches and empty transfers are answered at once; data
    /// commands need a buffer; a full table admits nothing; a flush
    /// reports the failure of a write acknowledged before it, once.
    #[test]
    fn admission_answers_and_a_failed_acknowledged_write_fails_the_next_flush() {
        assert_eq!(needs(&cmd(1, CmdKind::Trim, 0, 4096)), Needs::Answer(None));
        assert_eq!(needs(&cmd(1, CmdKind::Read, 0, 0)), Needs::Answer(None));
        assert_eq!(needs(&cmd(1, CmdKind::Read, 0, 512)), Needs::Buffer);
        assert_eq!(needs(&cmd(1, CmdKind::Flush, 0, 0)), Needs::Nothing);
        let mut t = NbdCommands::new();
        for i in 0..CMDS {
            assert!(t
                .admit(&cmd(i as u64, CmdKind::Flush, 0, 0), None, 0)
                .is_some());
        }
        assert_eq!(t.admit(&cmd(999, CmdKind::Flush, 0, 0), None, 0), None);
        let mut t = NbdCommands::new();
        let w = t
            .admit(&cmd(7, CmdKind::Write, 0, 4096), Some(3), 0)
            .unwrap();
        {
            let c = t.get_mut(w).unwrap();
            c.receiving = false;
            c.next = c.end;
            c.in_engine = 1;
            c.acked = true;
        }
        t.complete(w as u64, Err(IoError::Disk));
        assert_eq!(
            t.poll_event(),
            Some(ConnEvent::Finished(Finished {
                handle: 7,
                kind: CmdKind::Write,
                offset: 0,
                len: 4096,
                buf: Some(3),
                ok: false,
                start_us: 0,
                answer: Answer::Acked,
            }))
        );
        let f = t.admit(&cmd(8, CmdKind::Flush, 0, 0), None, 0).unwrap();
        t.get_mut(f).unwrap().next = 1;
        t.finish(f);
        let Some(ConnEvent::Finished(x)) = t.poll_event() else {
            panic!("the flush finished");
        };
        assert_eq!(
            x.answer,
            Answer::Done {
                error: Some(NbdError::Io)
            }
        );
        let f = t.admit(&cmd(9, CmdKind::Flush, 0, 0), None, 0).unwrap();
        t.get_mut(f).unwrap().next = 1;
        t.finish(f);
        let Some(ConnEvent::Finished(x)) = t.poll_event() else {
            panic!("the flush finished");
        };
        assert_eq!(x.answer, Answer::Done { error: None }, "reported once");
        assert_eq!(t.active(), 0);
    }
}
