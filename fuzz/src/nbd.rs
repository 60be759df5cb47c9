//! The NBD session (`csnap_fsm::nbd`): the handshake and the commands.

use csnap_fsm::nbd::{
    CmdKind, ExportInfo, NbdConfig, NbdEvent, NbdSession, NbdState, IHAVEOPT, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, REQUEST_MAGIC,
};

const PAYLOAD_LIMIT: u32 = 64 * 1024;

fn lookup(name: &[u8]) -> Option<ExportInfo> {
    match name {
        b"" => Some(ExportInfo {
            size_bytes: 1 << 20,
            read_only: false,
            can_multi_conn: true,
        }),
        b"1" => Some(ExportInfo {
            size_bytes: 64 * 1024 + 17,
            read_only: true,
            can_multi_conn: false,
        }),
        _ => None,
    }
}

/// `data[0]` picks the piece size the client bytes arrive in, `data[1]`
/// the transmit drain size; the rest is what the client sends. The session
/// asserts its own invariants after every input; here: every `Command` is
/// within the export and the payload limit, writes only on a writable
/// export, payload is taken exactly, and the session ends or waits (never
/// spins without consuming).
pub fn nbd_session(data: &[u8]) {
    let (piece, drain, input) = match data {
        [a, b, rest @ ..] => (usize::from(*a % 32) + 1, usize::from(*b) + 1, rest),
        _ => return,
    };
    let cfg = NbdConfig {
        payload_limit_bytes: PAYLOAD_LIMIT,
        preferred_block_size_bytes: 4096,
    };
    let mut s = NbdSession::new(cfg);
    let mut rx: Vec<u8> = Vec::new();
    let mut fed = 0usize;
    let mut export: Option<ExportInfo> = None;
    let mut idle_turns = 0;
    loop {
        // Drain what the session wants to send.
        loop {
            let n = s.transmit().len().min(drain);
            if n == 0 {
                break;
            }
            s.consume_transmit(n).expect("consume what transmit shows");
        }
        if let Some(ev) = s.poll_event() {
            match ev {
                NbdEvent::Ready => {
                    export = s.export();
                    assert!(export.is_some(), "Ready without an export");
                }
                NbdEvent::Command(c) => {
                    let e = export.expect("a command before Ready");
                    if c.kind != CmdKind::Flush {
                        assert!(
                            c.offset
                                .checked_add(u64::from(c.length))
                                .is_some_and(|end| end <= e.size_bytes),
                            "command past the export: {c:?}"
                        );
                    }
                    if matches!(c.kind, CmdKind::Read | CmdKind::Write) {
                        assert!(c.length <= PAYLOAD_LIMIT, "command over the limit: {c:?}");
                    }
                    if e.read_only {
                        assert!(
                            !matches!(
                                c.kind,
                                CmdKind::Write | CmdKind::Trim | CmdKind::WriteZeroes
                            ),
                            "a write command on a read-only export: {c:?}"
                        );
                    }
                    if c.kind == CmdKind::Write {
                        assert_eq!(s.payload_remaining(), c.length);
                    }
                }
                NbdEvent::Disconnect | NbdEvent::Fatal(_) => {}
                NbdEvent::ExportQuery { .. }
                | NbdEvent::ListQuery
                | NbdEvent::MetaQuery { .. }
                | NbdEvent::Reject { .. } => {}
            }
            continue;
        }
        match s.state() {
            NbdState::AwaitExport { .. } => {
                let info = lookup(s.export_name());
                s.answer_export(info).expect("answer while awaiting");
                continue;
            }
            NbdState::AwaitList => {
                for name in [&b""[..], b"1"] {
                    loop {
                        match s.list_entry(name) {
                            Ok(()) => break,
                            Err(csnap_fsm::nbd::NbdCallError::TransmitFull) => {
                                let n = s.transmit().len();
                                assert!(n > 0, "full with nothing to write");
                                s.consume_transmit(n).expect("drain");
                            }
                            Err(e) => panic!("list_entry: {e:?}"),
                        }
                    }
                }
                s.list_done().expect("list_done while listing");
                continue;
            }
            NbdState::AwaitMeta { .. } => {
                // Metadata contexts of snapshots 1 to 3 (the export's answer).
                s.answer_meta(Some(&[1, 2, 3]))
                    .expect("answer_meta while awaiting");
                continue;
            }
            NbdState::Disconnecting | NbdState::Closed => return,
            _ => {}
        }
        let remaining = s.payload_remaining() as usize;
        if remaining > 0 && !rx.is_empty() {
            let k = remaining.min(rx.len()).min(piece);
            s.handle_payload(k).expect("payload within what remains");
            rx.drain(..k);
            continue;
        }
        if !rx.is_empty() && remaining == 0 {
            let n = s.handle_input(&rx);
            assert!(n <= rx.len());
            if n > 0 {
                rx.drain(..n);
                idle_turns = 0;
                continue;
            }
        }
        // Needs more bytes.
        if fed < input.len() {
            let k = piece.min(input.len() - fed);
            rx.extend_from_slice(&input[fed..fed + k]);
            fed += k;
            continue;
        }
        idle_turns += 1;
        if idle_turns > 2 {
            s.handle_eof();
            assert_eq!(s.state(), NbdState::Closed);
            return;
        }
    }
}

fn opt(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut v = u32::try_from(name.len())
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(&u16::try_from(infos.len()).unwrap_or(0).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn req(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Client byte sequences as qemu and nbdinfo send them: `GO` and commands,
/// `LIST`, `INFO`, `EXPORT_NAME`, a read-only export, `ABORT`.
pub fn seeds() -> Vec<Vec<u8>> {
    let flags = 3u32.to_be_bytes().to_vec();
    let cmds = [
        req(1, 0, 1, 4096, 8),
        vec![0xab; 8],
        req(0, 0, 2, 0, 4096),
        req(3, 0, 3, 0, 0),
        req(1, 1, 4, 0, 3),
        vec![1, 2, 3],
        req(4, 0, 5, 8192, 4096),
        req(6, 0, 6, 0, 4096),
        req(5, 0, 7, 0, 512),
        req(2, 0, 8, 0, 0),
    ]
    .concat();
    let go = [
        vec![0, 0],
        flags.clone(),
        opt(OPT_GO, &go_data(b"", &[3, 1])),
        cmds.clone(),
    ]
    .concat();
    let list = [
        vec![5, 0],
        flags.clone(),
        opt(OPT_LIST, &[]),
        opt(OPT_INFO, &go_data(b"1", &[])),
        opt(OPT_GO, &go_data(b"nope", &[])),
        opt(8, &[]),
        opt(OPT_ABORT, &[]),
    ]
    .concat();
    let ro = [
        vec![31, 7],
        flags.clone(),
        opt(OPT_GO, &go_data(b"1", &[])),
        req(1, 0, 1, 0, 8),
        vec![0; 8],
        req(0, 0, 2, 65536, 17),
        req(2, 0, 3, 0, 0),
    ]
    .concat();
    let old = [vec![3, 255], flags, opt(OPT_EXPORT_NAME, b""), cmds].concat();
    vec![go, list, ro, old]
}
