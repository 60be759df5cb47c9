//! The NBD connection's command policy, sans-IO: what an admitted command
//! still owes the volume engine, which command goes to the engine next
//! (oldest first, never past an overlapping write acknowledged early), and
//! which write is acknowledged as soon as the engine has it (write-back).
//!
//! The driver (`io/src/nbd.rs`) keeps the table (`[Option<Command>; N]`,
//! reserved with its connection slot), the buffers and the sockets; it asks
//! these functions what to do. Nothing here allocates or touches a socket,
//! a disk or a clock (admission times are passed in).

use crate::nbd::{CmdKind, NbdError};
use crate::volume::IoKind;

/// Largest engine I/O: write-zeroes is cut into pieces of this.
const IO_MAX_BYTES: u64 = csnap_pools::VOLUME_IO_MAX_BYTES as u64;

/// Which buffer an engine I/O's disk operations use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufRef {
    /// A pool buffer (its data starts after the reply header).
    Pool(u16),
    /// The shared zero buffer (write-zeroes pieces, flushes).
    Zero,
}

/// The flush a `FUA` write owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fua {
    /// No flush owed.
    No,
    /// A flush follows the data once it is written.
    Needed,
    /// The flush is in the engine.
    Submitted,
}

/// An admitted command.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    /// Admission order (submission is oldest first).
    pub seq: u64,
    /// The client's handle.
    pub handle: u64,
    /// The command.
    pub kind: CmdKind,
    /// Its offset in the export.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// Its pool buffer (reads, writes, block status).
    pub buf: Option<u16>,
    /// A `WRITE` whose payload is still arriving.
    pub receiving: bool,
    /// Data I/O still to submit: `[next, end)` (write-zeroes pieces), or
    /// `0..1` for one I/O.
    pub next: u64,
    /// See `next`.
    pub end: u64,
    /// The flush a `FUA` write owes.
    pub fua: Fua,
    /// Engine I/Os of it in flight.
    pub in_engine: u32,
    /// The first failure.
    pub error: Option<NbdError>,
    /// Acknowledged already (write-back): no reply when it finishes; a
    /// failure is kept for the next `FLUSH`.
    pub acked: bool,
    /// `BLOCK_STATUS`: the next selected context to answer for.
    pub ctx: u16,
    /// `BLOCK_STATUS`: the reply bytes rendered so far in the buffer.
    pub rendered: u32,
    /// `BLOCK_STATUS` with `REQ_ONE`: one extent per context.
    pub req_one: bool,
    /// Admitted at (monotonic µs), for the duration histogram.
    pub start_us: u64,
}

impl Command {
    /// A command admitted as number `seq` at `start_us`, with its buffer.
    #[must_use]
    pub fn admitted(c: &crate::nbd::Cmd, seq: u64, buf: Option<u16>, start_us: u64) -> Command {
        let (next, end) = if c.kind == CmdKind::WriteZeroes {
            (c.offset, c.offset + u64::from(c.length))
        } else {
            (0, 1)
        };
        let fua = c.flags.fua() && matches!(c.kind, CmdKind::Write | CmdKind::WriteZeroes);
        Command {
            seq,
            handle: c.handle,
            kind: c.kind,
            offset: c.offset,
            len: c.length,
            buf,
            receiving: c.kind == CmdKind::Write,
            next,
            end,
            fua: if fua { Fua::Needed } else { Fua::No },
            in_engine: 0,
            error: None,
            acked: false,
            ctx: 0,
            rendered: 0,
            req_one: c.flags.req_one(),
            start_us,
        }
    }

    /// The next engine I/O to submit, if any now.
    #[must_use]
    pub fn next_io(&self) -> Option<(IoKind, u64, u32, BufRef)> {
        if self.receiving {
            return None;
        }
        if self.next < self.end {
            return match self.kind {
                CmdKind::Read => {
                    Some((IoKind::Read, self.offset, self.len, BufRef::Pool(self.buf?)))
                }
                CmdKind::Write => Some((
                    IoKind::Write,
                    self.offset,
                    self.len,
                    BufRef::Pool(self.buf?),
                )),
                CmdKind::WriteZeroes => {
                    let n = (self.end - self.next).min(IO_MAX_BYTES);
                    Some((
                        IoKind::Write,
                        self.next,
                        u32::try_from(n).unwrap_or(0),
                        BufRef::Zero,
                    ))
                }
                CmdKind::Flush => Some((IoKind::Flush, 0, 0, BufRef::Zero)),
                // Answered from the control connection, not the engine.
                CmdKind::Trim | CmdKind::Cache | CmdKind::BlockStatus => None,
            };
        }
        if self.fua == Fua::Needed && self.in_engine == 0 && self.error.is_none() {
            return Some((IoKind::Flush, 0, 0, BufRef::Zero));
        }
        None
    }

    /// The I/O `next_io` named was submitted.
    pub fn advance(&mut self, len: u32) {
        if self.next < self.end {
            if self.kind == CmdKind::WriteZeroes {
                self.next += u64::from(len);
            } else {
                self.next = self.end;
            }
        } else if self.fua == Fua::Needed {
            self.fua = Fua::Submitted;
        }
    }

    /// Nothing more will be submitted or is in the engine.
    #[must_use]
    pub fn done(&self) -> bool {
        self.in_engine == 0 && self.next >= self.end && self.fua != Fua::Needed && !self.receiving
    }

    /// Write-back: whether this command, just handed to the engine, is
    /// acknowledged now. The engine has it (it rides out a failover with
    /// it); not while no server answers (a write taken then waits for the
    /// failover like any other, and fails on its own if that times out),
    /// nor a `FUA` write (acknowledged once flushed).
    #[must_use]
    pub fn acks_early(&self, write_back: bool, connected: bool) -> bool {
        write_back && connected && self.kind == CmdKind::Write && self.fua == Fua::No && !self.acked
    }
}

/// Whether command `ci` must wait for an earlier write acknowledged early:
/// a read or write overlapping it (it must see it, or land after it), or a
/// flush (it covers every acknowledged write).
#[must_use]
pub fn behind_acked_write(cmds: &[Option<Command>], ci: usize) -> bool {
    let Some(c) = cmds.get(ci).copied().flatten() else {
        return false;
    };
    let (a, b) = match c.kind {
        CmdKind::Read | CmdKind::Write | CmdKind::BlockStatus => {
            (c.offset, c.offset + u64::from(c.len))
        }
        CmdKind::WriteZeroes => (c.next, c.end),
        CmdKind::Flush => (0, u64::MAX),
        CmdKind::Trim | CmdKind::Cache => return false,
    };
    cmds.iter().flatten().any(|w| {
        w.seq < c.seq && w.acked && !w.done() && w.offset < b && a < w.offset + u64::from(w.len)
    })
}

/// The command whose I/O goes to the engine next: the oldest with one to
/// submit that is not behind an overlapping write acknowledged early.
#[must_use]
pub fn next_to_submit(cmds: &[Option<Command>]) -> Option<usize> {
    let mut best: Option<(u64, usize)> = None;
    for (i, c) in cmds.iter().enumerate() {
        if let Some(c) = c {
            if c.next_io().is_some()
                && best.is_none_or(|(s, _)| c.seq < s)
                && !behind_acked_write(cmds, i)
            {
                best = Some((c.seq, i));
            }
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{Cmd, CmdFlags, CMD_FLAG_FUA};

    fn cmd(seq: u64, kind: CmdKind, offset: u64, length: u32, flags: u16) -> Command {
        let c = Cmd {
            handle: seq * 10,
            kind,
            flags: CmdFlags(flags),
            offset,
            length,
        };
        let buf = matches!(kind, CmdKind::Read | CmdKind::Write).then_some(0);
        Command::admitted(&c, seq, buf, 0)
    }

    /// A write acknowledged early holds back an overlapping read, write or
    /// any flush until it is done; a disjoint read goes first.
    #[test]
    fn overlapping_commands_wait_for_an_acknowledged_write() {
        let mut w = cmd(1, CmdKind::Write, 4096, 4096, 0);
        w.receiving = false;
        assert_eq!(
            w.next_io(),
            Some((IoKind::Write, 4096, 4096, BufRef::Pool(0)))
        );
        w.advance(4096);
        w.in_engine = 1;
        assert!(w.acks_early(true, true));
        assert!(!w.acks_early(true, false), "acknowledged with no server");
        assert!(
            !w.acks_early(false, true),
            "acknowledged without write-back"
        );
        w.acked = true;
        let overlapping = cmd(2, CmdKind::Read, 6000, 100, 0);
        let disjoint = cmd(3, CmdKind::Read, 0, 4096, 0);
        let flush = cmd(4, CmdKind::Flush, 0, 0, 0);
        let table = [Some(w), Some(overlapping), Some(disjoint), Some(flush)];
        assert!(behind_acked_write(&table, 1));
        assert!(!behind_acked_write(&table, 2));
        assert!(behind_acked_write(&table, 3));
        assert_eq!(next_to_submit(&table), Some(2));
        // The write lands: the oldest goes next.
        let mut table = table;
        if let Some(w) = table[0].as_mut() {
            w.in_engine = 0;
        }
        assert_eq!(next_to_submit(&table), Some(1));
    }

    /// A `FUA` write is not acknowledged early and owes a flush after its
    /// data; write-zeroes go in pieces of the largest engine I/O.
    #[test]
    fn fua_writes_flush_after_their_data_and_zeroes_go_in_pieces() {
        let mut w = cmd(1, CmdKind::Write, 0, 4096, CMD_FLAG_FUA);
        assert_eq!(w.next_io(), None, "submitted before its payload");
        w.receiving = false;
        assert!(!w.acks_early(true, true));
        w.advance(4096);
        w.in_engine = 1;
        assert_eq!(w.next_io(), None, "flushed before its data landed");
        w.in_engine = 0;
        assert_eq!(w.next_io(), Some((IoKind::Flush, 0, 0, BufRef::Zero)));
        w.advance(0);
        assert!(w.done());
        let len = u32::try_from(IO_MAX_BYTES).unwrap() + 1;
        let mut z = cmd(2, CmdKind::WriteZeroes, 0, len, 0);
        let (_, off, n, r) = z.next_io().unwrap();
        assert_eq!((off, u64::from(n), r), (0, IO_MAX_BYTES, BufRef::Zero));
        z.advance(n);
        assert_eq!(
            z.next_io(),
            Some((IoKind::Write, IO_MAX_BYTES, 1, BufRef::Zero))
        );
        z.advance(1);
        assert!(z.done());
    }
}
