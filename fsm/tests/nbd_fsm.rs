//! The NBD session (`csnap_fsm::nbd`) against client byte streams as qemu,
//! libnbd (nbdinfo, nbdcopy) and nbd-client send them, against hostile input,
//! and against the no-allocation rule: a counting allocator checks that no
//! session call after `new` allocates, in every test.

use csnap_fsm::nbd::*;
use csnap_pools::{
    NBD_EXPORT_NAME_MAX_BYTES, NBD_OPTION_DATA_MAX_BYTES, NBD_OPTION_SKIP_MAX_BYTES,
    NBD_TRANSMIT_BUFFER_BYTES, NBD_WRITE_SKIP_MAX_BYTES,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Counting allocator (csnap_sys::alloc::CountingAlloc).
// ---------------------------------------------------------------------------

#[global_allocator]
static GLOBAL: csnap_sys::alloc::CountingAlloc = csnap_sys::alloc::CountingAlloc;

fn allocs() -> usize {
    csnap_sys::alloc::thread_allocs()
}

/// Runs one session call and checks that it did not allocate.
fn counted<R>(f: impl FnOnce() -> R) -> R {
    let before = allocs();
    let r = f();
    assert_eq!(allocs(), before, "an NBD session call allocated");
    r
}

// ---------------------------------------------------------------------------
// The client's side of the wire.
// ---------------------------------------------------------------------------

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap().to_be_bytes()
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn client_flags(f: u32) -> Vec<u8> {
    f.to_be_bytes().to_vec()
}

/// An option with its data.
fn opt(o: u32, data: &[u8]) -> Vec<u8> {
    let mut v = opt_header(o, u32::try_from(data.len()).unwrap());
    v.extend_from_slice(data);
    v
}

/// An option header claiming `len` bytes of data.
fn opt_header(o: u32, len: u32) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&o.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data.
fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut v = len32(name.len()).to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn go(name: &[u8], infos: &[u16]) -> Vec<u8> {
    opt(OPT_GO, &info_data(name, infos))
}

fn req(typ: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// A write request followed by its payload.
fn write(flags: u16, handle: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = req(
        CMD_WRITE,
        flags,
        handle,
        offset,
        u32::try_from(payload.len()).unwrap(),
    );
    v.extend_from_slice(payload);
    v
}

// ---------------------------------------------------------------------------
// The server's side, as the client sees it.
// ---------------------------------------------------------------------------

fn greeting() -> Vec<u8> {
    hex("4e42444d41474943 49484156454f5054 0003")
}

/// An option reply.
fn rep(o: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&o.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&len32(data.len()));
    v.extend_from_slice(data);
    v
}

const UNSUP_MSG: &[u8] = b"option not supported by this server";
const UNKNOWN_MSG: &[u8] = b"no such export";
const INVALID_MSG: &[u8] = b"malformed option";
const TOO_BIG_MSG: &[u8] = b"option data too long";

/// The replies to a successful `INFO`/`GO`.
fn info_ok(o: u32, info: &ExportInfo, cfg: &NbdConfig) -> Vec<u8> {
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&info.size_bytes.to_be_bytes());
    export.extend_from_slice(&transmission_flags(info).to_be_bytes());
    let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    block.extend_from_slice(&cfg.preferred_block_size_bytes.to_be_bytes());
    block.extend_from_slice(&cfg.payload_limit_bytes.to_be_bytes());
    [
        rep(o, REP_INFO, &export),
        rep(o, REP_INFO, &block),
        rep(o, REP_ACK, &[]),
    ]
    .concat()
}

fn list_entry_reply(name: &[u8]) -> Vec<u8> {
    let mut d = len32(name.len()).to_vec();
    d.extend_from_slice(name);
    rep(OPT_LIST, REP_SERVER, &d)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    opt: u32,
    typ: u32,
    data: Vec<u8>,
}

/// Cuts option replies; panics on anything malformed.
fn parse_replies(mut b: &[u8]) -> Vec<Reply> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert!(
            b.len() >= OPTION_REPLY_HEADER_BYTES,
            "truncated reply header"
        );
        assert_eq!(
            u64::from_be_bytes(b[..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let len = usize::try_from(be32(&b[16..20])).unwrap();
        assert!(
            b.len() >= OPTION_REPLY_HEADER_BYTES + len,
            "truncated reply"
        );
        v.push(Reply {
            opt: be32(&b[8..12]),
            typ: be32(&b[12..16]),
            data: b[20..20 + len].to_vec(),
        });
        b = &b[20 + len..];
    }
    v
}

/// Checks that a reply is well formed for its type.
fn check_reply(r: &Reply, cfg: &NbdConfig) {
    match r.typ {
        REP_ACK => assert!(r.data.is_empty()),
        REP_SERVER => {
            assert_eq!(r.opt, OPT_LIST);
            assert!(r.data.len() >= 4);
            let n = usize::try_from(be32(&r.data)).unwrap();
            assert_eq!(n, r.data.len() - 4);
            assert!(n <= NBD_EXPORT_NAME_MAX_BYTES);
        }
        REP_INFO => {
            assert!(r.opt == OPT_INFO || r.opt == OPT_GO);
            let t = u16::from_be_bytes([r.data[0], r.data[1]]);
            match t {
                INFO_EXPORT => {
                    assert_eq!(r.data.len(), 12);
                    let f = u16::from_be_bytes([r.data[10], r.data[11]]);
                    assert!(f & FLAG_HAS_FLAGS != 0);
                    assert_eq!(f & (FLAG_SEND_DF | FLAG_SEND_RESIZE | FLAG_ROTATIONAL), 0);
                }
                INFO_BLOCK_SIZE => {
                    assert_eq!(r.data.len(), 14);
                    let min = be32(&r.data[2..]);
                    let pref = be32(&r.data[6..]);
                    let max = be32(&r.data[10..]);
                    assert_eq!(min, 1);
                    assert!(pref.is_power_of_two() && pref >= 512 && pref <= max);
                    assert_eq!(max, cfg.payload_limit_bytes);
                }
                other => panic!("unexpected info type {other}"),
            }
        }
        REP_META_CONTEXT => {
            assert!(r.opt == OPT_LIST_META_CONTEXT || r.opt == OPT_SET_META_CONTEXT);
            assert!(r.data.len() > 4);
            assert!(std::str::from_utf8(&r.data[4..]).is_ok());
        }
        REP_ERR_UNSUP | REP_ERR_INVALID | REP_ERR_UNKNOWN | REP_ERR_TOO_BIG => {
            assert!(std::str::from_utf8(&r.data).is_ok());
        }
        other => panic!("unexpected reply type {other:#x}"),
    }
}

// ---------------------------------------------------------------------------
// A test driver: answers queries from a table, takes payloads in pieces,
// writes out everything, and checks that no session call allocates.
// ---------------------------------------------------------------------------

fn cfg() -> NbdConfig {
    NbdConfig {
        payload_limit_bytes: 64 * 1024,
        preferred_block_size_bytes: 4096,
    }
}

const MIB: u64 = 1 << 20;

fn rw(size_bytes: u64) -> ExportInfo {
    ExportInfo {
        size_bytes,
        read_only: false,
        can_multi_conn: false,
    }
}

fn ro(size_bytes: u64) -> ExportInfo {
    ExportInfo {
        size_bytes,
        read_only: true,
        can_multi_conn: true,
    }
}

struct Driver {
    s: NbdSession,
    /// Exports found by name, listed in this order.
    exports: Vec<(Vec<u8>, ExportInfo)>,
    /// Answers for names not in `exports`, used in turn (none: not found).
    others: Vec<Option<ExportInfo>>,
    next_other: usize,
    /// Received, not yet consumed.
    rx: Vec<u8>,
    /// Everything written to the client.
    out: Vec<u8>,
    /// Start of `out` not yet taken by `take_out`.
    out_taken: usize,
    events: Vec<NbdEvent>,
    queries: Vec<(ExportOption, Vec<u8>)>,
    /// Every payload byte taken.
    payload: Vec<u8>,
    /// Payload is taken in pieces of at most this many bytes.
    piece_bytes: usize,
    /// Transmit is written in pieces of at most this many bytes.
    tx_piece_bytes: usize,
    /// Where the `NBD_OPT_EXPORT_NAME` reply starts in `out`.
    export_name_reply_at: Option<usize>,
    /// Whether a list entry had to wait for the transmit buffer.
    list_waited: bool,
    /// Write out transmit bytes at every turn.
    auto_drain: bool,
    /// The snapshot tags every export offers contexts for.
    meta_tags: Vec<u32>,
    /// Metadata queries answered: (set, export name).
    meta_queries: Vec<(bool, Vec<u8>)>,
}

impl Driver {
    fn new(cfg: NbdConfig, exports: Vec<(Vec<u8>, ExportInfo)>) -> Driver {
        Driver {
            s: NbdSession::new(cfg),
            exports,
            others: Vec::new(),
            next_other: 0,
            rx: Vec::new(),
            out: Vec::new(),
            out_taken: 0,
            events: Vec::new(),
            queries: Vec::new(),
            payload: Vec::new(),
            piece_bytes: usize::MAX,
            tx_piece_bytes: usize::MAX,
            export_name_reply_at: None,
            list_waited: false,
            auto_drain: true,
            meta_tags: vec![1, 7, u32::MAX],
            meta_queries: Vec::new(),
        }
    }

    fn drain(&mut self) {
        loop {
            let pending = self.s.transmit();
            if pending.is_empty() {
                break;
            }
            let n = pending.len().min(self.tx_piece_bytes);
            self.out.extend_from_slice(&pending[..n]);
            let s = &mut self.s;
            counted(|| s.consume_transmit(n)).unwrap();
        }
    }

    fn lookup(&mut self, name: &[u8]) -> Option<ExportInfo> {
        if let Some((_, info)) = self.exports.iter().find(|(n, _)| n == name) {
            return Some(*info);
        }
        if self.others.is_empty() {
            return None;
        }
        let a = self.others[self.next_other % self.others.len()];
        self.next_other += 1;
        a
    }

    /// Receives `bytes` and runs the session until it needs more.
    fn feed(&mut self, bytes: &[u8]) {
        self.rx.extend_from_slice(bytes);
        self.run();
    }

    fn run(&mut self) {
        loop {
            if self.auto_drain {
                self.drain();
            }
            let s = &mut self.s;
            if let Some(ev) = counted(|| s.poll_event()) {
                if let NbdEvent::ExportQuery { option } = ev {
                    self.queries.push((option, self.s.export_name().to_vec()));
                }
                self.events.push(ev);
                continue;
            }
            match self.s.state() {
                NbdState::AwaitExport { .. } => {
                    let name = self.s.export_name().to_vec();
                    let info = self.lookup(&name);
                    let export_name =
                        matches!(self.queries.last(), Some((ExportOption::ExportName, _)));
                    if export_name && info.is_some() {
                        self.drain();
                        self.export_name_reply_at = Some(self.out.len());
                    }
                    let s = &mut self.s;
                    counted(|| s.answer_export(info)).unwrap();
                    continue;
                }
                NbdState::AwaitList => {
                    for i in 0..self.exports.len() {
                        loop {
                            let s = &mut self.s;
                            let name = &self.exports[i].0;
                            match counted(|| s.list_entry(name)) {
                                Ok(()) => break,
                                Err(NbdCallError::TransmitFull) => {
                                    assert!(
                                        !self.s.transmit().is_empty(),
                                        "full with nothing to write"
                                    );
                                    self.list_waited = true;
                                    self.drain();
                                }
                                Err(e) => panic!("list_entry: {e:?}"),
                            }
                        }
                    }
                    let s = &mut self.s;
                    counted(|| s.list_done()).unwrap();
                    continue;
                }
                NbdState::AwaitMeta { .. } => {
                    let name = self.s.export_name().to_vec();
                    let set = matches!(self.events.last(), Some(NbdEvent::MetaQuery { set: true }));
                    self.meta_queries.push((set, name.clone()));
                    let exists = self.exports.iter().any(|(n, _)| *n == name);
                    let s = &mut self.s;
                    let tags = &self.meta_tags[..];
                    counted(|| s.answer_meta(exists.then_some(tags))).unwrap();
                    continue;
                }
                _ => {}
            }
            let remaining = usize::try_from(self.s.payload_remaining()).unwrap();
            if remaining > 0 {
                if self.rx.is_empty() {
                    break;
                }
                let k = remaining.min(self.rx.len());
                for piece in self.rx[..k].chunks(self.piece_bytes) {
                    self.payload.extend_from_slice(piece);
                    let s = &mut self.s;
                    counted(|| s.handle_payload(piece.len())).unwrap();
                }
                self.rx.drain(..k);
                continue;
            }
            if self.rx.is_empty() {
                break;
            }
            let s = &mut self.s;
            let rx = &self.rx[..];
            let n = counted(|| s.handle_input(rx));
            assert!(n <= self.rx.len());
            self.rx.drain(..n);
            if n == 0 {
                break;
            }
        }
    }

    /// Bytes written to the client since the last call.
    fn take_out(&mut self) -> Vec<u8> {
        let v = self.out[self.out_taken..].to_vec();
        self.out_taken = self.out.len();
        v
    }

    fn take_events(&mut self) -> Vec<NbdEvent> {
        std::mem::take(&mut self.events)
    }
}

fn driver() -> Driver {
    Driver::new(
        cfg(),
        vec![
            (b"".to_vec(), rw(MIB)),
            (b"origin".to_vec(), rw(MIB)),
            (b"snap-1".to_vec(), ro(MIB)),
            (b"snap-2".to_vec(), ro(2 * MIB)),
        ],
    )
}

/// A driver past a `GO` of `name` (block sizes requested), output and
/// events taken.
fn connected(name: &[u8]) -> Driver {
    let mut d = driver();
    d.feed(&[client_flags(3), go(name, &[INFO_BLOCK_SIZE])].concat());
    assert!(d.s.in_transmission(), "{:?}", d.s);
    assert_eq!(d.take_events().last(), Some(&NbdEvent::Ready));
    d.take_out();
    d
}

fn cmd(handle: u64, kind: CmdKind, flags: u16, offset: u64, length: u32) -> NbdEvent {
    NbdEvent::Command(Cmd {
        handle,
        kind,
        flags: CmdFlags(flags),
        offset,
        length,
    })
}

fn reject(handle: u64, error: NbdError) -> NbdEvent {
    NbdEvent::Reject {
        handle,
        error,
        structured: false,
    }
}

// ---------------------------------------------------------------------------
// Handshakes.
// ---------------------------------------------------------------------------

#[test]
fn greeting_is_queued_by_new() {
    let s = NbdSession::new(cfg());
    assert_eq!(s.transmit(), &greeting()[..]);
    assert_eq!(s.transmit(), b"NBDMAGICIHAVEOPT\x00\x03");
    assert_eq!(s.state(), NbdState::ClientFlags);
    assert!(s.wants_input() && !s.in_transmission() && s.export().is_none());
}

/// qemu-img / qemu-io: fixed newstyle and no zeroes, extended headers
/// refused, structured replies acknowledged, then `GO` asking for block
/// sizes. Every byte spelled out.
#[test]
fn qemu_handshake_byte_for_byte() {
    let mut d = driver();
    let client = hex("00000003
         49484156454f5054 0000000b 00000000
         49484156454f5054 00000008 00000000
         49484156454f5054 00000007 0000000e 00000006 6f726967696e 0001 0003");
    d.feed(&client);
    let mut expected = greeting();
    expected.extend(hex("0003e889045565a9 0000000b 80000001 00000023"));
    expected.extend_from_slice(b"option not supported by this server");
    expected.extend(hex("0003e889045565a9 00000008 00000001 00000000"));
    expected.extend(hex(
        "0003e889045565a9 00000007 00000003 0000000c 0000 0000000000100000 0c6d
         0003e889045565a9 00000007 00000003 0000000e 0003 00000001 00001000 00010000
         0003e889045565a9 00000007 00000001 00000000",
    ));
    assert_eq!(d.take_out(), expected);
    assert_eq!(
        d.take_events(),
        vec![
            NbdEvent::ExportQuery {
                option: ExportOption::Go
            },
            NbdEvent::Ready
        ]
    );
    assert_eq!(d.queries, vec![(ExportOption::Go, b"origin".to_vec())]);
    assert_eq!(d.s.state(), NbdState::Request);
    assert!(d.s.in_transmission() && d.s.no_zeroes() && d.s.fixed_newstyle());
    assert_eq!(d.s.export(), Some(rw(MIB)));
    assert_eq!(d.s.export_name(), b"origin");
    assert_eq!(d.s.export_name_str(), Some("origin"));
    assert!(d.rx.is_empty());
}

/// The default export (empty name) is an ordinary name for the driver.
#[test]
fn empty_name_is_passed_to_the_driver() {
    let mut d = driver();
    d.exports[0].1 = rw(7 * MIB);
    d.feed(&[client_flags(3), go(b"", &[])].concat());
    assert_eq!(d.queries, vec![(ExportOption::Go, Vec::new())]);
    assert_eq!(d.s.export(), Some(rw(7 * MIB)));
    let out = d.take_out();
    assert_eq!(
        out[greeting().len()..],
        info_ok(OPT_GO, &rw(7 * MIB), &cfg())[..]
    );
}

/// nbdinfo: `INFO` with name, description and block size requested, then
/// `GO` of the same export.
#[test]
fn info_then_go() {
    let mut d = driver();
    let infos = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    d.feed(
        &[
            client_flags(3),
            opt(OPT_INFO, &info_data(b"snap-1", &infos)),
        ]
        .concat(),
    );
    assert_eq!(d.s.state(), NbdState::OptionHeader);
    assert!(!d.s.in_transmission() && d.s.export().is_none());
    let out = d.take_out();
    assert_eq!(
        out,
        [greeting(), info_ok(OPT_INFO, &ro(MIB), &cfg())].concat()
    );
    d.feed(&go(b"snap-1", &infos));
    assert_eq!(d.take_out(), info_ok(OPT_GO, &ro(MIB), &cfg()));
    assert_eq!(
        d.queries,
        vec![
            (ExportOption::Info, b"snap-1".to_vec()),
            (ExportOption::Go, b"snap-1".to_vec())
        ]
    );
    assert_eq!(d.s.export(), Some(ro(MIB)));
    // Read-only: READ_ONLY, flush, cache, multi-conn; no write features.
    assert_eq!(
        transmission_flags(&ro(MIB)),
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN
    );
}

/// `LIST` of several exports, then `GO` of one of them.
#[test]
fn list_then_go() {
    let mut d = driver();
    d.feed(&[client_flags(3), opt(OPT_LIST, &[])].concat());
    let mut expected = greeting();
    for (name, _) in &d.exports {
        expected.extend(list_entry_reply(name));
    }
    expected.extend(rep(OPT_LIST, REP_ACK, &[]));
    assert_eq!(d.take_out(), expected);
    assert_eq!(d.take_events(), vec![NbdEvent::ListQuery]);
    assert_eq!(d.s.state(), NbdState::OptionHeader);
    d.feed(&go(b"snap-2", &[INFO_BLOCK_SIZE]));
    assert_eq!(d.take_out(), info_ok(OPT_GO, &ro(2 * MIB), &cfg()));
    assert_eq!(d.s.export(), Some(ro(2 * MIB)));
}

/// nbdinfo --list: extended headers refused, structured replies
/// acknowledged, `LIST`, `INFO` per export, `ABORT`.
#[test]
fn nbdinfo_list_sequence() {
    let mut d = driver();
    let infos = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    let mut client = [
        client_flags(3),
        opt(OPT_EXTENDED_HEADERS, &[]),
        opt(OPT_STRUCTURED_REPLY, &[]),
        opt(OPT_LIST, &[]),
    ]
    .concat();
    let names: Vec<Vec<u8>> = d.exports.iter().map(|e| e.0.clone()).collect();
    for n in &names {
        client.extend(opt(OPT_INFO, &info_data(n, &infos)));
    }
    client.extend(opt(OPT_ABORT, &[]));
    d.feed(&client);
    let out = d.take_out();
    let replies = parse_replies(&out[greeting().len()..]);
    for r in &replies {
        check_reply(r, &cfg());
    }
    let types: Vec<(u32, u32)> = replies.iter().map(|r| (r.opt, r.typ)).collect();
    let mut expected = vec![
        (OPT_EXTENDED_HEADERS, REP_ERR_UNSUP),
        (OPT_STRUCTURED_REPLY, REP_ACK),
    ];
    expected.extend(names.iter().map(|_| (OPT_LIST, REP_SERVER)));
    expected.push((OPT_LIST, REP_ACK));
    for _ in &names {
        expected.extend([
            (OPT_INFO, REP_INFO),
            (OPT_INFO, REP_INFO),
            (OPT_INFO, REP_ACK),
        ]);
    }
    expected.push((OPT_ABORT, REP_ACK));
    assert_eq!(types, expected);
    assert_eq!(d.events.last(), Some(&NbdEvent::Disconnect));
    assert_eq!(d.s.state(), NbdState::Disconnecting);
}

#[test]
fn export_name_with_no_zeroes() {
    let mut d = driver();
    d.feed(&[client_flags(3), opt(OPT_EXPORT_NAME, b"origin")].concat());
    let out = d.take_out();
    assert_eq!(out.len(), greeting().len() + EXPORT_NAME_REPLY_BYTES);
    assert_eq!(
        out[greeting().len()..],
        hex("0000000000100000 0c6d")[..],
        "size, then flags, then nothing"
    );
    assert_eq!(
        d.take_events(),
        vec![
            NbdEvent::ExportQuery {
                option: ExportOption::ExportName
            },
            NbdEvent::Ready
        ]
    );
    assert!(d.s.in_transmission() && d.s.no_zeroes());
}

#[test]
fn export_name_without_no_zeroes_sends_124_zero_bytes() {
    for flags in [FLAG_C_FIXED_NEWSTYLE, 0] {
        let mut d = driver();
        d.feed(&[client_flags(flags), opt(OPT_EXPORT_NAME, b"snap-2")].concat());
        let out = d.take_out();
        let reply = &out[greeting().len()..];
        assert_eq!(reply.len(), 8 + 2 + 124);
        assert_eq!(reply[..8], (2 * MIB).to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([reply[8], reply[9]]),
            transmission_flags(&ro(2 * MIB))
        );
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert!(d.s.in_transmission() && !d.s.no_zeroes());
        assert_eq!(d.s.fixed_newstyle(), flags != 0);
        // Requests that were sent right behind the option are served.
        d.feed(&req(CMD_READ, 0, 1, 0, 512));
        assert_eq!(
            d.take_events().last(),
            Some(&cmd(1, CmdKind::Read, 0, 0, 512))
        );
    }
}

#[test]
fn plain_newstyle_client_may_only_send_export_name() {
    let mut d = driver();
    d.feed(&[client_flags(0), go(b"origin", &[])].concat());
    assert_eq!(
        d.take_events(),
        vec![NbdEvent::Fatal(FatalReason::NotFixedNewstyle)]
    );
    assert_eq!(d.s.state(), NbdState::Closed);
    assert_eq!(d.take_out(), greeting());
}

#[test]
fn abort_acks_and_ends() {
    for data in [&b""[..], b"ignored data"] {
        let mut d = driver();
        let trailing = req(CMD_READ, 0, 1, 0, 1);
        d.feed(&[client_flags(3), opt(OPT_ABORT, data), trailing.clone()].concat());
        assert_eq!(
            d.take_out(),
            [greeting(), rep(OPT_ABORT, REP_ACK, &[])].concat()
        );
        assert_eq!(d.take_events(), vec![NbdEvent::Disconnect]);
        assert_eq!(d.s.state(), NbdState::Disconnecting);
        assert!(!d.s.wants_input());
        assert_eq!(d.rx, trailing, "nothing is consumed after the end");
        assert_eq!(d.s.handle_input(&trailing), 0);
    }
}

#[test]
fn structured_replies_acknowledged_then_go() {
    let mut d = driver();
    d.feed(
        &[
            client_flags(3),
            opt(OPT_STRUCTURED_REPLY, &[]),
            go(b"origin", &[]),
        ]
        .concat(),
    );
    assert_eq!(
        d.take_out(),
        [
            greeting(),
            rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]),
            info_ok(OPT_GO, &rw(MIB), &cfg())
        ]
        .concat()
    );
    assert!(d.s.in_transmission());
    assert!(d.s.structured());
    // With data it is malformed.
    let mut d = driver();
    d.feed(&[client_flags(3), opt(OPT_STRUCTURED_REPLY, b"x")].concat());
    assert_eq!(
        d.take_out(),
        [
            greeting(),
            rep(OPT_STRUCTURED_REPLY, REP_ERR_INVALID, INVALID_MSG)
        ]
        .concat()
    );
    assert!(!d.s.structured());
}

#[test]
fn starttls_refused_then_go() {
    let mut d = driver();
    d.feed(&[client_flags(3), opt(OPT_STARTTLS, &[]), go(b"origin", &[])].concat());
    assert_eq!(
        d.take_out(),
        [
            greeting(),
            rep(OPT_STARTTLS, REP_ERR_UNSUP, UNSUP_MSG),
            info_ok(OPT_GO, &rw(MIB), &cfg())
        ]
        .concat()
    );
}

#[test]
fn unknown_and_unsupported_options_refused_with_data_skipped() {
    let mut d = driver();
    let refused = [
        (0x1234_5678, vec![7u8; 300]),
        (OPT_PEEK_EXPORT, vec![]),
        (OPT_EXTENDED_HEADERS, vec![]),
        (0, vec![1, 2, 3]),
        (u32::MAX, vec![]),
    ];
    let mut client = client_flags(3);
    let mut expected = greeting();
    for (o, data) in &refused {
        client.extend(opt(*o, data));
        expected.extend(rep(*o, REP_ERR_UNSUP, UNSUP_MSG));
    }
    // LIST must not carry data.
    client.extend(opt(OPT_LIST, b"x"));
    expected.extend(rep(OPT_LIST, REP_ERR_INVALID, INVALID_MSG));
    client.extend(go(b"origin", &[]));
    expected.extend(info_ok(OPT_GO, &rw(MIB), &cfg()));
    // Byte by byte, so every skip spans calls.
    for b in &client {
        d.feed(std::slice::from_ref(b));
    }
    assert_eq!(d.take_out(), expected);
    assert!(d.s.in_transmission());
    assert_eq!(d.queries.len(), 1);
}

#[test]
fn unknown_export_go_is_an_error_and_a_second_go_works() {
    let mut d = driver();
    d.feed(&[client_flags(3), go(b"nope", &[INFO_BLOCK_SIZE])].concat());
    assert_eq!(
        d.take_out(),
        [greeting(), rep(OPT_GO, REP_ERR_UNKNOWN, UNKNOWN_MSG)].concat()
    );
    assert_eq!(d.s.state(), NbdState::OptionHeader);
    assert!(d.s.export().is_none());
    d.feed(&opt(OPT_INFO, &info_data(b"nope", &[])));
    assert_eq!(d.take_out(), rep(OPT_INFO, REP_ERR_UNKNOWN, UNKNOWN_MSG));
    d.feed(&go(b"origin", &[INFO_BLOCK_SIZE]));
    assert_eq!(d.take_out(), info_ok(OPT_GO, &rw(MIB), &cfg()));
    assert!(d.s.in_transmission());
    assert_eq!(d.s.export_name(), b"origin");
}

#[test]
fn unknown_export_name_closes() {
    let mut d = driver();
    d.feed(&[client_flags(3), opt(OPT_EXPORT_NAME, b"nope")].concat());
    assert_eq!(
        d.take_out(),
        greeting(),
        "EXPORT_NAME cannot answer an error"
    );
    assert_eq!(
        d.take_events(),
        vec![
            NbdEvent::ExportQuery {
                option: ExportOption::ExportName
            },
            NbdEvent::Fatal(FatalReason::UnknownExport)
        ]
    );
    assert_eq!(d.s.state(), NbdState::Closed);
}

#[test]
fn malformed_go_data_is_invalid_and_the_session_goes_on() {
    let good = info_data(b"origin", &[INFO_BLOCK_SIZE]);
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0, 0],
        good[..good.len() - 1].to_vec(),
        [good.clone(), vec![0]].concat(),
        hex("ffffffff 0000"),
        hex("00000007 6f726967696e 0000"),
    ];
    // The count says two but one follows.
    let mut short = info_data(b"origin", &[INFO_BLOCK_SIZE]);
    short[10..12].copy_from_slice(&2u16.to_be_bytes());
    bad.push(short);
    for o in [OPT_GO, OPT_INFO] {
        let mut d = driver();
        d.feed(&client_flags(3));
        d.take_out();
        for data in &bad {
            d.feed(&opt(o, data));
            assert_eq!(
                d.take_out(),
                rep(o, REP_ERR_INVALID, INVALID_MSG),
                "{data:?}"
            );
            assert_eq!(d.s.state(), NbdState::OptionHeader);
        }
        assert!(d.queries.is_empty());
        d.feed(&go(b"origin", &[]));
        assert!(d.s.in_transmission());
    }
}

#[test]
fn go_data_over_the_scratch_is_too_big_and_skipped() {
    let mut d = driver();
    let big = vec![0xabu8; NBD_OPTION_DATA_MAX_BYTES + 1];
    d.feed(&[client_flags(3), opt(OPT_GO, &big), go(b"origin", &[])].concat());
    assert_eq!(
        d.take_out(),
        [
            greeting(),
            rep(OPT_GO, REP_ERR_TOO_BIG, TOO_BIG_MSG),
            info_ok(OPT_GO, &rw(MIB), &cfg())
        ]
        .concat()
    );
}

#[test]
fn go_name_over_the_bound_is_unknown_without_a_query() {
    let mut d = driver();
    let long = vec![b'a'; NBD_EXPORT_NAME_MAX_BYTES + 1];
    d.feed(&[client_flags(3), go(&long, &[])].concat());
    assert_eq!(
        d.take_out(),
        [greeting(), rep(OPT_GO, REP_ERR_UNKNOWN, UNKNOWN_MSG)].concat()
    );
    assert!(d.queries.is_empty());
    // The longest allowed name is asked about.
    let longest = vec![b'b'; NBD_EXPORT_NAME_MAX_BYTES];
    d.feed(&go(&longest, &[]));
    assert_eq!(d.queries, vec![(ExportOption::Go, longest)]);
    // EXPORT_NAME of an over-long name closes without reading it.
    let mut d = driver();
    d.feed(&[client_flags(3), opt(OPT_EXPORT_NAME, &long)].concat());
    assert_eq!(
        d.take_events(),
        vec![NbdEvent::Fatal(FatalReason::UnknownExport)]
    );
    assert_eq!(d.rx.len(), long.len(), "the name was not read");
}

#[test]
fn unknown_client_flags_close() {
    for f in [4u32, 1 << 31, 0xffff_ffff, 3 | 8] {
        let mut d = driver();
        d.feed(&client_flags(f));
        assert_eq!(
            d.take_events(),
            vec![NbdEvent::Fatal(FatalReason::BadClientFlags)]
        );
        assert_eq!(d.s.state(), NbdState::Closed);
    }
}

#[test]
fn bad_option_magic_closes_as_soon_as_it_is_in() {
    let mut d = driver();
    d.feed(&client_flags(3));
    d.feed(b"IHAVEOPX");
    assert_eq!(
        d.take_events(),
        vec![NbdEvent::Fatal(FatalReason::BadOptionMagic)]
    );
    assert_eq!(d.s.state(), NbdState::Closed);
}

#[test]
fn option_length_u32_max_closes_without_reading() {
    for o in [
        OPT_GO,
        OPT_INFO,
        OPT_STRUCTURED_REPLY,
        OPT_LIST,
        OPT_ABORT,
        77,
    ] {
        let mut d = driver();
        d.feed(&[client_flags(3), opt_header(o, u32::MAX), vec![0; 100]].concat());
        assert_eq!(
            d.take_events(),
            vec![NbdEvent::Fatal(FatalReason::OptionTooLong)],
            "option {o}"
        );
        assert_eq!(d.rx.len(), 100);
        assert_eq!(d.take_out(), greeting());
    }
    let mut d = driver();
    d.feed(&[client_flags(3), opt_header(OPT_EXPORT_NAME, u32::MAX)].concat());
    assert_eq!(
        d.take_events(),
        vec![NbdEvent::Fatal(FatalReason::UnknownExport)]
    );
    // The largest skippable length is skipped, not refused.
    let mut d = driver();
    d.feed(&[client_flags(3), opt_header(99, NBD_OPTION_SKIP_MAX_BYTES)].concat());
    assert!(matches!(d.s.state(), NbdState::OptionSkip { .. }));
    d.feed(&vec![
        0;
        usize::try_from(NBD_OPTION_SKIP_MAX_BYTES).unwrap()
    ]);
    assert_eq!(d.s.state(), NbdState::OptionHeader);
    assert_eq!(
        d.take_out(),
        [greeting(), rep(99, REP_ERR_UNSUP, UNSUP_MSG)].concat()
    );
}

/// A client that pipelines options without reading replies is throttled:
/// the session stops reading while its transmit buffer lacks room.
#[test]
fn unread_replies_throttle_option_input() {
    let mut d = driver();
    d.auto_drain = false;
    let count = 400;
    let mut client = client_flags(3);
    for _ in 0..count {
        client.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    }
    d.feed(&client);
    assert!(!d.rx.is_empty(), "input stops");
    assert!(!d.s.wants_input());
    assert!(d.s.transmit().len() <= NBD_TRANSMIT_BUFFER_BYTES);
    assert_eq!(d.s.state(), NbdState::OptionHeader);
    d.auto_drain = true;
    d.run();
    assert!(d.rx.is_empty());
    let out = d.take_out();
    let replies = parse_replies(&out[greeting().len()..]);
    assert_eq!(replies.len(), count);
    assert!(replies
        .iter()
        .all(|r| r.opt == OPT_STRUCTURED_REPLY && r.typ == REP_ACK));
}

/// A list longer than the transmit buffer goes out in several writes.
#[test]
fn long_list_waits_for_the_transmit_buffer() {
    let exports: Vec<(Vec<u8>, ExportInfo)> = (0..40u8)
        .map(|i| (vec![b'a' + i % 26; NBD_EXPORT_NAME_MAX_BYTES], rw(MIB)))
        .collect();
    let mut d = Driver::new(cfg(), exports.clone());
    d.tx_piece_bytes = 1000;
    d.feed(&[client_flags(3), opt(OPT_LIST, &[]), go(&exports[3].0, &[])].concat());
    assert!(d.list_waited);
    let out = d.take_out();
    let mut expected = greeting();
    for (name, _) in &exports {
        expected.extend(list_entry_reply(name));
    }
    expected.extend(rep(OPT_LIST, REP_ACK, &[]));
    expected.extend(info_ok(OPT_GO, &rw(MIB), &cfg()));
    assert_eq!(out, expected);
}

#[test]
fn calls_out_of_turn_are_refused() {
    let mut s = NbdSession::new(cfg());
    assert_eq!(s.answer_export(None), Err(NbdCallError::NotAwaitingExport));
    assert_eq!(s.list_entry(b"x"), Err(NbdCallError::NotListing));
    assert_eq!(s.list_done(), Err(NbdCallError::NotListing));
    assert_eq!(s.handle_payload(1), Err(NbdCallError::PayloadOverrun));
    assert_eq!(s.handle_payload(0), Ok(()));
    assert_eq!(
        s.consume_transmit(GREETING_BYTES + 1),
        Err(NbdCallError::TransmitOverrun)
    );
    assert_eq!(s.transmit().len(), GREETING_BYTES, "unchanged");
    let mut d = driver();
    d.exports.clear();
    d.feed(&client_flags(3));
    d.s.handle_input(&opt(OPT_LIST, &[]));
    assert_eq!(
        d.s.list_entry(&[0; NBD_EXPORT_NAME_MAX_BYTES + 1]),
        Err(NbdCallError::NameTooLong)
    );
    // An empty list is just the ACK.
    d.s.list_done().unwrap();
    d.drain();
    assert_eq!(
        d.take_out(),
        [greeting(), rep(OPT_LIST, REP_ACK, &[])].concat()
    );
}

#[test]
fn eof_closes_from_any_state() {
    let mut d = driver();
    d.feed(&[client_flags(3), opt_header(OPT_GO, 20)].concat());
    assert!(matches!(d.s.state(), NbdState::OptionData { .. }));
    d.s.handle_eof();
    assert_eq!(d.s.state(), NbdState::Closed);
    assert!(!d.s.wants_input());
    assert_eq!(d.s.handle_input(&[0; 10]), 0);
    let mut d = connected(b"origin");
    d.feed(&req(CMD_WRITE, 0, 1, 0, 100)[..]);
    assert!(matches!(d.s.state(), NbdState::Payload { .. }));
    d.s.handle_eof();
    assert_eq!(d.s.state(), NbdState::Closed);
    assert_eq!(d.s.payload_remaining(), 0);
    assert!(!d.s.in_transmission());
}

#[test]
fn reset_serves_a_new_connection() {
    let mut d = connected(b"origin");
    d.feed(&req(CMD_DISC, 0, 0, 0, 0));
    assert_eq!(d.s.state(), NbdState::Disconnecting);
    let s = &mut d.s;
    counted(|| s.reset());
    assert_eq!(d.s.state(), NbdState::ClientFlags);
    assert!(d.s.export().is_none() && !d.s.no_zeroes() && d.s.export_name().is_empty());
    d.take_out();
    d.take_events();
    d.feed(&[client_flags(1), opt(OPT_EXPORT_NAME, b"snap-1")].concat());
    assert_eq!(d.take_out().len(), GREETING_BYTES + 134);
    assert_eq!(d.s.export(), Some(ro(MIB)));
}

// ---------------------------------------------------------------------------
// Transmission.
// ---------------------------------------------------------------------------

#[test]
fn read_and_simple_reply() {
    let mut d = connected(b"origin");
    d.feed(&req(CMD_READ, 0, 0xdead_beef, 4096, 512));
    assert_eq!(
        d.take_events(),
        vec![cmd(0xdead_beef, CmdKind::Read, 0, 4096, 512)]
    );
    assert_eq!(d.s.state(), NbdState::Request);
    assert!(d.s.transmit().is_empty(), "replies are the driver's");
    assert_eq!(
        simple_reply(0xdead_beef, None)[..],
        hex("67446698 00000000 00000000deadbeef")[..]
    );
}

#[test]
fn write_payload_in_pieces_of_every_size() {
    let payload: Vec<u8> = (0..97u8).map(|i| i.wrapping_mul(31)).collect();
    let stream = [write(0, 5, 512, &payload), req(CMD_FLUSH, 0, 6, 0, 0)].concat();
    for piece in 1..=payload.len() + 1 {
        for split in [1, 7, 28, 29, 64, stream.len()] {
            let mut d = connected(b"origin");
            d.piece_bytes = piece;
            for chunk in stream.chunks(split) {
                d.feed(chunk);
            }
            assert_eq!(d.payload, payload, "piece {piece} split {split}");
            assert_eq!(
                d.take_events(),
                vec![
                    cmd(5, CmdKind::Write, 0, 512, 97),
                    cmd(6, CmdKind::Flush, 0, 0, 0)
                ]
            );
            assert_eq!(d.s.state(), NbdState::Request);
            assert!(d.rx.is_empty());
        }
    }
}

/// The driver reads the payload straight into its buffer: the session
/// reports how much is due and never sees the bytes.
#[test]
fn payload_is_taken_by_the_driver_not_the_session() {
    let mut s = NbdSession::new(cfg());
    let mut input = [client_flags(3), go(b"origin", &[])].concat();
    assert_eq!(s.handle_input(&input), input.len());
    assert!(matches!(s.poll_event(), Some(NbdEvent::ExportQuery { .. })));
    s.answer_export(Some(rw(MIB))).unwrap();
    assert_eq!(s.poll_event(), Some(NbdEvent::Ready));
    input = [
        req(CMD_WRITE, CMD_FLAG_FUA, 9, 0, 10),
        vec![0xee; 10],
        req(CMD_READ, 0, 10, 0, 1),
    ]
    .concat();
    assert_eq!(s.handle_input(&input), REQUEST_HEADER_BYTES);
    assert_eq!(
        s.poll_event(),
        Some(cmd(9, CmdKind::Write, CMD_FLAG_FUA, 0, 10))
    );
    assert_eq!(s.payload_remaining(), 10);
    assert!(!s.wants_input());
    assert_eq!(
        s.handle_input(&input[REQUEST_HEADER_BYTES..]),
        0,
        "payload is not input"
    );
    assert_eq!(s.handle_payload(11), Err(NbdCallError::PayloadOverrun));
    s.handle_payload(4).unwrap();
    assert_eq!(s.payload_remaining(), 6);
    s.handle_payload(6).unwrap();
    assert_eq!(s.payload_remaining(), 0);
    assert_eq!(
        s.handle_input(&input[REQUEST_HEADER_BYTES + 10..]),
        REQUEST_HEADER_BYTES
    );
    assert_eq!(s.poll_event(), Some(cmd(10, CmdKind::Read, 0, 0, 1)));
}

#[test]
fn every_command_kind() {
    let mut d = connected(b"origin");
    let stream = [
        req(CMD_READ, CMD_FLAG_FUA, 1, 0, 4096),
        write(CMD_FLAG_FUA, 2, 100, b"hello"),
        req(CMD_FLUSH, 0, 3, 0, 0),
        req(CMD_TRIM, CMD_FLAG_FUA, 4, 8192, 4096),
        req(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            5,
            0,
            1 << 19,
        ),
        req(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 6, MIB - 1, 1),
        req(CMD_CACHE, 0, 7, 0, u32::try_from(MIB).unwrap()),
        req(CMD_READ, 0, 8, MIB, 0),
        req(CMD_WRITE, 0, 9, 0, 0),
        req(CMD_DISC, 0, 10, 0, 0),
        req(CMD_READ, 0, 11, 0, 1),
    ]
    .concat();
    d.feed(&stream);
    let events = d.take_events();
    assert_eq!(
        events,
        vec![
            cmd(1, CmdKind::Read, CMD_FLAG_FUA, 0, 4096),
            cmd(2, CmdKind::Write, CMD_FLAG_FUA, 100, 5),
            cmd(3, CmdKind::Flush, 0, 0, 0),
            cmd(4, CmdKind::Trim, CMD_FLAG_FUA, 8192, 4096),
            cmd(
                5,
                CmdKind::WriteZeroes,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                1 << 19
            ),
            cmd(6, CmdKind::WriteZeroes, CMD_FLAG_FUA, MIB - 1, 1),
            cmd(7, CmdKind::Cache, 0, 0, u32::try_from(MIB).unwrap()),
            cmd(8, CmdKind::Read, 0, MIB, 0),
            cmd(9, CmdKind::Write, 0, 0, 0),
            NbdEvent::Disconnect,
        ]
    );
    assert_eq!(d.payload, b"hello");
    if let NbdEvent::Command(c) = events[4] {
        assert!(c.flags.no_hole() && c.flags.fast_zero() && !c.flags.fua());
    }
    if let NbdEvent::Command(c) = events[1] {
        assert!(c.flags.fua() && c.kind.writes() && c.kind.wire() == CMD_WRITE);
    }
    assert_eq!(d.s.state(), NbdState::Disconnecting);
    assert_eq!(d.rx, req(CMD_READ, 0, 11, 0, 1), "nothing read after DISC");
}

#[test]
fn handle_input_stops_at_each_event() {
    let mut s = NbdSession::new(cfg());
    let hs = [client_flags(3), go(b"origin", &[])].concat();
    assert_eq!(s.handle_input(&hs), hs.len());
    s.answer_export(Some(rw(MIB))).unwrap();
    // Unpolled events hold input back.
    assert_eq!(s.handle_input(&req(CMD_READ, 0, 1, 0, 1)), 0);
    assert_eq!(s.poll_event(), Some(NbdEvent::Ready));
    let batch = [req(CMD_READ, 0, 1, 0, 1), req(CMD_FLUSH, 0, 2, 0, 0)].concat();
    assert_eq!(s.handle_input(&batch), REQUEST_HEADER_BYTES);
    assert!(!s.wants_input());
    assert_eq!(s.handle_input(&batch[REQUEST_HEADER_BYTES..]), 0);
    assert_eq!(s.poll_event(), Some(cmd(1, CmdKind::Read, 0, 0, 1)));
    assert!(s.wants_input());
    assert_eq!(
        s.handle_input(&batch[REQUEST_HEADER_BYTES..]),
        REQUEST_HEADER_BYTES
    );
    assert_eq!(s.poll_event(), Some(cmd(2, CmdKind::Flush, 0, 0, 0)));
    assert_eq!(s.poll_event(), None);
}

/// Invalid requests get their errno, and the request after each one is
/// parsed correctly.
#[test]
fn invalid_requests_are_rejected_and_the_stream_stays_in_sync() {
    let limit = cfg().payload_limit_bytes;
    let cases: Vec<(Vec<u8>, NbdError)> = vec![
        // Past the end, and an end that overflows.
        (req(CMD_READ, 0, 1, MIB - 511, 512), NbdError::Inval),
        (req(CMD_READ, 0, 1, MIB + 1, 0), NbdError::Inval),
        (req(CMD_READ, 0, 1, u64::MAX - 1, 10), NbdError::Inval),
        (write(0, 1, MIB - 2, b"abc"), NbdError::NoSpc),
        (write(0, 1, u64::MAX, b"x"), NbdError::NoSpc),
        (req(CMD_WRITE_ZEROES, 0, 1, MIB, 1), NbdError::NoSpc),
        (
            req(CMD_TRIM, 0, 1, 0, u32::try_from(MIB + 1).unwrap()),
            NbdError::Inval,
        ),
        (req(CMD_CACHE, 0, 1, u64::MAX, u32::MAX), NbdError::Inval),
        // Over the payload limit (a write's payload is skipped).
        (req(CMD_READ, 0, 1, 0, limit + 1), NbdError::Inval),
        (
            write(0, 1, 0, &vec![0x5a; usize::try_from(limit).unwrap() + 1]),
            NbdError::Inval,
        ),
        // Flags not valid for the command, or unknown.
        (req(CMD_READ, CMD_FLAG_DF, 1, 0, 1), NbdError::Inval),
        (req(CMD_READ, CMD_FLAG_REQ_ONE, 1, 0, 1), NbdError::Inval),
        (req(CMD_READ, CMD_FLAG_NO_HOLE, 1, 0, 1), NbdError::Inval),
        (write(CMD_FLAG_NO_HOLE, 1, 0, b"abcd"), NbdError::Inval),
        (write(CMD_FLAG_FAST_ZERO, 1, 0, b"abcd"), NbdError::Inval),
        (req(CMD_TRIM, CMD_FLAG_FAST_ZERO, 1, 0, 1), NbdError::Inval),
        (req(CMD_FLUSH, CMD_FLAG_NO_HOLE, 1, 0, 0), NbdError::Inval),
        (req(CMD_READ, 1 << 5, 1, 0, 1), NbdError::Inval),
        (req(CMD_WRITE_ZEROES, 1 << 15, 1, 0, 1), NbdError::Inval),
        // Unknown or unnegotiated commands.
        (req(CMD_BLOCK_STATUS, 0, 1, 0, 512), NbdError::Inval),
        (
            req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 1, 0, 512),
            NbdError::Inval,
        ),
        (req(CMD_RESIZE, 0, 1, 0, 0), NbdError::Inval),
        (req(9, 0, 1, 0, 1), NbdError::Inval),
        (req(u16::MAX, 0, 1, 0, u32::MAX), NbdError::Inval),
    ];
    for (bad, error) in cases {
        for split in [1, 5, bad.len()] {
            let mut d = connected(b"origin");
            let stream = [bad.clone(), req(CMD_READ, 0, 2, 512, 512)].concat();
            for chunk in stream.chunks(split) {
                d.feed(chunk);
            }
            assert_eq!(
                d.take_events(),
                vec![reject(1, error), cmd(2, CmdKind::Read, 0, 512, 512)],
                "{bad:?}"
            );
            assert!(d.payload.is_empty(), "a rejected payload is skipped");
            assert_eq!(d.s.state(), NbdState::Request);
        }
    }
}

#[test]
fn read_only_export_refuses_writes() {
    let mut d = connected(b"snap-1");
    let stream = [
        write(0, 1, 0, &[1; 600]),
        req(CMD_TRIM, 0, 2, 0, 512),
        req(CMD_WRITE_ZEROES, 0, 3, 0, 512),
        // Read-only refusal comes before the range check.
        write(0, 4, 2 * MIB, b"zz"),
        req(CMD_READ, CMD_FLAG_FUA, 5, 0, 512),
        req(CMD_FLUSH, 0, 6, 0, 0),
        req(CMD_CACHE, 0, 7, 0, 512),
    ]
    .concat();
    d.feed(&stream);
    assert_eq!(
        d.take_events(),
        vec![
            reject(1, NbdError::Perm),
            reject(2, NbdError::Perm),
            reject(3, NbdError::Perm),
            reject(4, NbdError::Perm),
            cmd(5, CmdKind::Read, CMD_FLAG_FUA, 0, 512),
            cmd(6, CmdKind::Flush, 0, 0, 0),
            cmd(7, CmdKind::Cache, 0, 0, 512),
        ]
    );
    assert!(d.payload.is_empty());
    assert_eq!(simple_reply(1, Some(NbdError::Perm))[4..8], [0, 0, 0, 1]);
}

#[test]
fn bad_request_magic_is_fatal() {
    let mut d = connected(b"origin");
    let mut bad = req(CMD_READ, 0, 1, 0, 1);
    bad[3] ^= 1;
    // Detected once the four magic bytes are in.
    d.feed(&bad[..4]);
    assert_eq!(
        d.take_events(),
        vec![NbdEvent::Fatal(FatalReason::BadRequestMagic)]
    );
    assert_eq!(d.s.state(), NbdState::Closed);
    d.feed(&bad[4..]);
    assert_eq!(d.rx.len(), bad.len() - 4, "nothing read after the close");
    // The old magic, after a valid request.
    let mut d = connected(b"origin");
    d.feed(&[req(CMD_READ, 0, 1, 0, 1), hex("12560953"), vec![0; 24]].concat());
    assert_eq!(
        d.take_events(),
        vec![
            cmd(1, CmdKind::Read, 0, 0, 1),
            NbdEvent::Fatal(FatalReason::BadRequestMagic)
        ]
    );
}

#[test]
fn write_length_u32_max_closes_without_reading() {
    let mut d = connected(b"origin");
    d.feed(&[req(CMD_WRITE, 0, 1, 0, u32::MAX), vec![0; 1000]].concat());
    assert_eq!(
        d.take_events(),
        vec![NbdEvent::Fatal(FatalReason::WriteTooLong)]
    );
    assert_eq!(d.rx.len(), 1000);
    assert!(d.payload.is_empty());
    // The longest skippable rejected write is skipped, and the stream goes
    // on.
    let mut d = connected(b"origin");
    d.feed(&req(CMD_WRITE, 0, 1, 0, NBD_WRITE_SKIP_MAX_BYTES));
    assert_eq!(d.take_events(), vec![reject(1, NbdError::Inval)]);
    assert!(matches!(d.s.state(), NbdState::PayloadSkip { .. }));
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..NBD_WRITE_SKIP_MAX_BYTES >> 20 {
        d.feed(&chunk);
    }
    d.feed(&req(CMD_READ, 0, 2, 0, 1));
    assert_eq!(d.take_events(), vec![cmd(2, CmdKind::Read, 0, 0, 1)]);
    assert!(d.payload.is_empty());
}

#[test]
fn multi_conn_is_the_drivers_call() {
    let mut d = driver();
    d.exports[1].1.can_multi_conn = true;
    d.feed(&[client_flags(3), go(b"origin", &[])].concat());
    let out = d.take_out();
    let replies = parse_replies(&out[GREETING_BYTES..]);
    let flags = u16::from_be_bytes([replies[0].data[10], replies[0].data[11]]);
    assert!(flags & FLAG_CAN_MULTI_CONN != 0);
    assert!(flags & FLAG_READ_ONLY == 0);
}

// ---------------------------------------------------------------------------
// No allocation after `new`.
// ---------------------------------------------------------------------------

/// A whole connection (handshake with every kind of option, then a batch of
/// commands, valid and not) costs no allocation beyond `new`; so does the
/// next connection after `reset`.
#[test]
fn new_is_the_only_allocation() {
    // Everything the test itself needs is allocated before counting.
    let handshake = [
        client_flags(3),
        opt(OPT_EXTENDED_HEADERS, &[]),
        opt(OPT_STRUCTURED_REPLY, &[]),
        opt(OPT_STARTTLS, &[]),
        opt(OPT_LIST, &[]),
        opt(OPT_INFO, &info_data(b"nope", &[INFO_BLOCK_SIZE])),
        opt(
            OPT_INFO,
            &info_data(b"origin", &[INFO_NAME, INFO_BLOCK_SIZE]),
        ),
        opt(OPT_GO, &[1, 2, 3]),
        opt(OPT_GO, &vec![0; NBD_OPTION_DATA_MAX_BYTES + 10]),
        go(b"origin", &[INFO_BLOCK_SIZE]),
    ]
    .concat();
    let mut commands = Vec::new();
    for i in 0..32u64 {
        commands.extend(req(CMD_READ, 0, i, i * 4096, 4096));
        commands.extend(write(
            CMD_FLAG_FUA,
            i + 100,
            i * 512,
            &[u8::try_from(i).unwrap(); 700],
        ));
        commands.extend(req(CMD_FLUSH, 0, i + 200, 0, 0));
        commands.extend(req(CMD_TRIM, 0, i + 300, 0, 4096));
        commands.extend(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, i + 400, 0, 4096));
        commands.extend(req(CMD_CACHE, 0, i + 500, 0, 4096));
        commands.extend(req(CMD_READ, 0, i + 600, MIB, 1));
        commands.extend(write(CMD_FLAG_NO_HOLE, i + 700, 0, &[7; 300]));
        commands.extend(req(42, 0, i + 800, 0, 0));
    }
    commands.extend(req(CMD_DISC, 0, 0, 0, 0));
    let names: [&[u8]; 3] = [b"", b"origin", b"snap-1"];
    let mut payload_buf = vec![0u8; 64 * 1024];
    let mut out_buf = vec![0u8; 64 * 1024];

    // Sanity: the counter sees allocations.
    let before = allocs();
    drop(std::hint::black_box(vec![1u8; 10]));
    assert_eq!(allocs(), before + 1);

    let before_new = allocs();
    let mut s = NbdSession::new(cfg());
    let by_new = allocs() - before_new;
    assert!((1..=4).contains(&by_new), "{by_new} allocations in new");

    let start = allocs();
    let mut tally = [0usize; 8];
    for round in 0..2 {
        if round == 1 {
            s.reset();
        }
        let mut out_len = 0;
        for input in [&handshake[..], &commands[..]] {
            let mut at = 0;
            loop {
                let pending = s.transmit();
                let n = pending.len();
                out_buf[out_len..out_len + n].copy_from_slice(pending);
                out_len = (out_len + n) % (32 * 1024);
                s.consume_transmit(n).unwrap();
                if let Some(ev) = s.poll_event() {
                    let slot = match ev {
                        NbdEvent::ExportQuery { .. } => 0,
                        NbdEvent::ListQuery => 1,
                        NbdEvent::Ready => 2,
                        NbdEvent::Command(_) => 3,
                        NbdEvent::Reject { .. } => 4,
                        NbdEvent::Disconnect => 5,
                        NbdEvent::Fatal(_) => 6,
                        NbdEvent::MetaQuery { .. } => 7,
                    };
                    tally[slot] += 1;
                    continue;
                }
                match s.state() {
                    NbdState::AwaitExport { .. } => {
                        let found = s.export_name() == b"origin";
                        s.answer_export(found.then_some(rw(MIB))).unwrap();
                        continue;
                    }
                    NbdState::AwaitList => {
                        for n in names {
                            s.list_entry(n).unwrap();
                        }
                        s.list_done().unwrap();
                        continue;
                    }
                    NbdState::AwaitMeta { .. } => {
                        s.answer_meta(Some(&[1, 2, 3])).unwrap();
                        continue;
                    }
                    _ => {}
                }
                let due = usize::try_from(s.payload_remaining()).unwrap();
                if due > 0 {
                    let k = due.min(input.len() - at);
                    if k == 0 {
                        break;
                    }
                    payload_buf[..k].copy_from_slice(&input[at..at + k]);
                    s.handle_payload(k).unwrap();
                    at += k;
                    continue;
                }
                // Feed in odd-sized pieces.
                let end = (at + 333).min(input.len());
                let n = s.handle_input(&input[at..end]);
                at += n;
                if n == 0 && at == input.len() {
                    break;
                }
                if n == 0 && !s.wants_input() {
                    break;
                }
            }
        }
        assert_eq!(s.state(), NbdState::Disconnecting);
    }
    let used = allocs() - start;
    assert_eq!(used, 0, "{used} allocations after new");
    // Per round: INFO x2 and GO x1 queried (the bad GOs are refused before),
    // one list, one Ready, 32 x 6 commands, 32 x 3 rejects, one DISC.
    assert_eq!(tally, [6, 2, 2, 2 * 32 * 6, 2 * 32 * 3, 2, 0, 0]);
    std::hint::black_box(&payload_buf);
}

// ---------------------------------------------------------------------------
// Hostile input.
// ---------------------------------------------------------------------------

/// Checks the whole output of a session: the greeting, then well-formed
/// option replies, then (if `EXPORT_NAME` succeeded) its reply.
fn check_output(out: &[u8], export_name_at: Option<usize>, no_zeroes: bool, cfg: &NbdConfig) {
    assert!(out.len() >= GREETING_BYTES);
    assert_eq!(out[..GREETING_BYTES], greeting()[..]);
    let end = export_name_at.unwrap_or(out.len());
    for r in parse_replies(&out[GREETING_BYTES..end]) {
        check_reply(&r, cfg);
    }
    if let Some(at) = export_name_at {
        let tail = &out[at..];
        let zeroes = if no_zeroes { 0 } else { 124 };
        assert_eq!(tail.len(), EXPORT_NAME_REPLY_BYTES + zeroes);
        assert!(tail[EXPORT_NAME_REPLY_BYTES..].iter().all(|&b| b == 0));
        let flags = u16::from_be_bytes([tail[8], tail[9]]);
        assert!(flags & FLAG_HAS_FLAGS != 0);
    }
}

/// Checks every event against the export it was produced for.
fn check_events(events: &[NbdEvent], export: Option<ExportInfo>, cfg: &NbdConfig) {
    let mut ended = false;
    for ev in events {
        assert!(!ended, "event after the end: {ev:?}");
        match *ev {
            NbdEvent::Command(c) => {
                let e = export.expect("a command needs an export");
                assert_eq!(
                    c.flags.0
                        & !(CMD_FLAG_FUA
                            | CMD_FLAG_NO_HOLE
                            | CMD_FLAG_FAST_ZERO
                            | CMD_FLAG_REQ_ONE),
                    0
                );
                match c.kind {
                    CmdKind::WriteZeroes => {}
                    CmdKind::BlockStatus => {
                        assert_eq!(c.flags.0 & !(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE), 0);
                        assert!(c.length > 0);
                    }
                    _ => assert_eq!(c.flags.0 & !CMD_FLAG_FUA, 0),
                }
                if c.kind != CmdKind::Flush {
                    assert!(c.offset <= e.size_bytes);
                    assert!(u64::from(c.length) <= e.size_bytes - c.offset);
                }
                if matches!(c.kind, CmdKind::Read | CmdKind::Write) {
                    assert!(c.length <= cfg.payload_limit_bytes);
                }
                assert!(!(e.read_only && c.kind.writes()));
            }
            NbdEvent::Reject { error, .. } => {
                assert!(matches!(
                    error,
                    NbdError::Inval | NbdError::Perm | NbdError::NoSpc
                ));
            }
            NbdEvent::Disconnect | NbdEvent::Fatal(_) => ended = true,
            NbdEvent::ExportQuery { .. }
            | NbdEvent::ListQuery
            | NbdEvent::MetaQuery { .. }
            | NbdEvent::Ready => {}
        }
    }
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"origin".to_vec()),
        Just(b"snap-1".to_vec()),
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..12),
        Just(vec![b'n'; NBD_EXPORT_NAME_MAX_BYTES + 1]),
    ]
}

fn offset_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        1 => Just(512),
        1 => Just(MIB - 512),
        1 => Just(MIB),
        1 => Just(u64::MAX - 3),
        4 => 0..MIB,
        1 => 0..2 * MIB,
        1 => any::<u64>(),
    ]
}

fn length_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => Just(0u32),
        1 => Just(1),
        1 => Just(512),
        1 => Just(4096),
        1 => Just(4097),
        1 => Just(u32::MAX),
        1 => Just(NBD_WRITE_SKIP_MAX_BYTES + 1),
        6 => 0u32..2000,
        1 => any::<u32>(),
    ]
}

/// A request, usually well formed, with the payload a `WRITE` announces
/// (all of it for short writes, some of it for long ones).
fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![8 => 0u16..8, 1 => any::<u16>()],
        prop_oneof![8 => Just(0u16), 4 => 0u16..32, 1 => any::<u16>()],
        any::<u64>(),
        offset_strategy(),
        length_strategy(),
        any::<u8>(),
    )
        .prop_map(|(t, f, h, o, l, fill)| {
            let mut v = req(t, f, h, o, l);
            if t == CMD_WRITE {
                let n = usize::try_from(l).unwrap_or(usize::MAX).min(3000);
                v.extend(std::iter::repeat_n(fill, n));
            }
            v
        })
}

/// A valid request for a 1 MiB read-write export, with its full payload.
fn valid_request_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            (CMD_READ, 0),
            (CMD_READ, CMD_FLAG_FUA),
            (CMD_WRITE, 0),
            (CMD_WRITE, CMD_FLAG_FUA),
            (CMD_FLUSH, 0),
            (CMD_TRIM, 0),
            (CMD_CACHE, 0),
            (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO),
            (CMD_BLOCK_STATUS, 0),
            (CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE),
        ]),
        any::<u64>(),
        0..MIB - 4096,
        0u32..4096,
        any::<u8>(),
    )
        .prop_map(|((t, f), h, o, l, fill)| {
            if t == CMD_WRITE {
                write(f, h, o, &vec![fill; usize::try_from(l).unwrap()])
            } else {
                req(t, f, h, o, l)
            }
        })
}

/// One handshake-phase message, valid or not.
fn option_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => (0u32..14, prop::collection::vec(any::<u8>(), 0..24)).prop_map(|(o, d)| opt(o, &d)),
        3 => (
            name_strategy(),
            prop::collection::vec(0u16..6, 0..4),
            any::<bool>()
        )
            .prop_map(|(n, i, is_go)| opt(if is_go { OPT_GO } else { OPT_INFO }, &info_data(&n, &i))),
        1 => name_strategy().prop_map(|n| opt(OPT_EXPORT_NAME, &n)),
        2 => Just(opt(OPT_LIST, &[])),
        1 => Just(opt(OPT_ABORT, &[])),
        2 => Just(opt(OPT_STRUCTURED_REPLY, &[])),
        3 => (
            name_strategy(),
            prop::collection::vec(meta_query_strategy(), 0..4),
            any::<bool>()
        )
            .prop_map(|(n, q, set)| {
                let q: Vec<&[u8]> = q.iter().map(Vec::as_slice).collect();
                let o = if set { OPT_SET_META_CONTEXT } else { OPT_LIST_META_CONTEXT };
                opt(o, &meta_data(&n, &q))
            }),
        1 => (0u32..12, any::<u32>()).prop_map(|(o, l)| opt_header(o, l)),
        1 => (0u32..12, 0u32..64).prop_map(|(o, l)| opt_header(o, l)),
    ]
}

fn meta_query_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"base:allocation".to_vec()),
        Just(b"base:".to_vec()),
        Just(b"x-csnap:".to_vec()),
        Just(b"x-csnap:changed-since:7".to_vec()),
        Just(b"qemu:dirty-bitmap:since-1".to_vec()),
        Just(b"qemu:".to_vec()),
        Just(b"unknown:x".to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ]
}

fn raw_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..48)
}

/// A session's input: a handshake (mostly options) or a transmission phase
/// (a valid handshake, then mostly requests), with an optional flipped byte.
fn session_input() -> impl Strategy<Value = Vec<u8>> {
    let handshake = (
        prop_oneof![
            4 => Just(client_flags(3)),
            1 => (0u32..8).prop_map(client_flags),
            1 => Just(Vec::new()),
        ],
        prop::collection::vec(
            prop_oneof![8 => option_strategy(), 1 => raw_strategy(), 1 => request_strategy()],
            0..10,
        ),
    )
        .prop_map(|(p, segs)| [p, segs.concat()].concat());
    let transmission = (
        prop_oneof![
            3 => Just([client_flags(3), go(b"origin", &[INFO_BLOCK_SIZE])].concat()),
            1 => Just([client_flags(1), go(b"snap-1", &[])].concat()),
            1 => Just([client_flags(0), opt(OPT_EXPORT_NAME, b"origin")].concat()),
            1 => Just([client_flags(3), opt(OPT_EXPORT_NAME, b"snap-1")].concat()),
            2 => Just(
                [
                    client_flags(3),
                    opt(OPT_STRUCTURED_REPLY, &[]),
                    opt(
                        OPT_SET_META_CONTEXT,
                        &meta_data(b"origin", &[b"base:allocation", b"x-csnap:changed-since:7"]),
                    ),
                    go(b"origin", &[]),
                ]
                .concat()
            ),
        ],
        prop::collection::vec(
            prop_oneof![
                12 => valid_request_strategy(),
                8 => request_strategy(),
                1 => raw_strategy(),
                1 => option_strategy(),
            ],
            0..16,
        ),
    )
        .prop_map(|(p, segs)| [p, segs.concat()].concat());
    (
        prop_oneof![handshake, transmission],
        prop_oneof![
            5 => Just(None),
            1 => (any::<prop::sample::Index>(), 1u8..).prop_map(Some),
        ],
    )
        .prop_map(|(mut v, flip)| {
            if let Some((i, x)) = flip {
                if !v.is_empty() {
                    let at = i.index(v.len());
                    v[at] ^= x;
                }
            }
            v
        })
}

fn answer_strategy() -> impl Strategy<Value = Option<ExportInfo>> {
    prop::option::of(
        (
            prop_oneof![Just(0u64), Just(1), Just(MIB), any::<u64>()],
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(size_bytes, read_only, can_multi_conn)| ExportInfo {
                size_bytes,
                read_only,
                can_multi_conn,
            }),
    )
}

/// Proptest cases: `PROPTEST_CASES` or `CSNAP_SIM_SEEDS` (the one knob the
/// simulations take for a soak) when set, else `default` (CI).
fn soak_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .or_else(|_| std::env::var("CSNAP_SIM_SEEDS"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(soak_cases(4000)))]

    /// Arbitrary byte streams, split at arbitrary points, with random
    /// export answers: no panic, no allocation, well-formed output, and only
    /// valid commands reach the driver.
    #[test]
    fn hostile_input_never_breaks_the_session(
        input in session_input(),
        splits in prop::collection::vec(1usize..80, 1..16),
        answers in prop::collection::vec(answer_strategy(), 1..6),
        piece_bytes in 1usize..200,
        tx_piece_bytes in 1usize..64,
        exports_listed in 0usize..5,
        payload_limit_bytes in prop_oneof![Just(4096u32), Just(NbdConfig::default().payload_limit_bytes)],
    ) {
        let cfg = NbdConfig { payload_limit_bytes, preferred_block_size_bytes: 4096 };
        let mut exports = vec![
            (b"origin".to_vec(), rw(MIB)),
            (b"snap-1".to_vec(), ro(MIB)),
        ];
        for i in 0..exports_listed {
            exports.push((vec![b'x'; 50 * i], rw(4096)));
        }
        let mut d = Driver::new(cfg, exports);
        d.others = answers;
        d.piece_bytes = piece_bytes;
        d.tx_piece_bytes = tx_piece_bytes;
        let mut at = 0;
        let mut i = 0;
        while at < input.len() {
            let n = splits[i % splits.len()].min(input.len() - at);
            d.feed(&input[at..at + n]);
            at += n;
            i += 1;
        }
        d.drain();
        check_output(&d.out, d.export_name_reply_at, d.s.no_zeroes(), &cfg);
        check_events(&d.events, d.s.export(), &cfg);
        let written: u64 = d
            .events
            .iter()
            .filter_map(|e| match e {
                NbdEvent::Command(c) if c.kind == CmdKind::Write => Some(u64::from(c.length)),
                _ => None,
            })
            .sum();
        let taken = u64::try_from(d.payload.len()).unwrap();
        prop_assert!(taken <= written);
        if d.s.payload_remaining() == 0 {
            prop_assert_eq!(taken, written);
        }
        match d.s.state() {
            NbdState::Disconnecting | NbdState::Closed => {
                prop_assert!(!d.s.wants_input());
            }
            NbdState::AwaitExport { .. } | NbdState::AwaitList => {
                prop_assert!(false, "the driver answers every query");
            }
            NbdState::Payload { .. } => prop_assert!(d.rx.is_empty()),
            _ => prop_assert!(d.rx.is_empty(), "input left in {:?}", d.s.state()),
        }
        let s = &mut d.s;
        counted(|| s.handle_eof());
        prop_assert_eq!(d.s.state(), NbdState::Closed);
    }
}

// ---------------------------------------------------------------------------
// Structured replies, metadata contexts, block status.
// ---------------------------------------------------------------------------

/// `LIST_META_CONTEXT`/`SET_META_CONTEXT` data: export name, queries.
fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut v = len32(name.len()).to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(&len32(queries.len()));
    for q in queries {
        v.extend_from_slice(&len32(q.len()));
        v.extend_from_slice(q);
    }
    v
}

/// The (id, name) of every `NBD_REP_META_CONTEXT` reply in `out`, and
/// whether an ACK ends them.
fn meta_replies(out: &[u8]) -> (Vec<(u32, String)>, bool) {
    let replies = parse_replies(out);
    let mut v = Vec::new();
    let mut acked = false;
    for r in &replies {
        check_reply(r, &cfg());
        match r.typ {
            REP_META_CONTEXT => {
                assert!(!acked, "a context after the ACK");
                v.push((
                    be32(&r.data),
                    String::from_utf8(r.data[4..].to_vec()).unwrap(),
                ));
            }
            REP_ACK => acked = true,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    (v, acked)
}

fn names(v: &[(u32, String)]) -> Vec<&str> {
    v.iter().map(|(_, n)| n.as_str()).collect()
}

#[test]
fn list_meta_context_lists_every_context_and_answers_wildcards() {
    let all = [
        "base:allocation",
        "x-csnap:changed-since:1",
        "qemu:dirty-bitmap:since-1",
        "x-csnap:changed-since:7",
        "qemu:dirty-bitmap:since-7",
        "x-csnap:changed-since:4294967295",
        "qemu:dirty-bitmap:since-4294967295",
    ];
    let cases: [(&[&[u8]], Vec<&str>); 9] = [
        (&[], all.to_vec()),
        (&[b"base:"], vec![all[0]]),
        (&[b"base:allocation"], vec![all[0]]),
        (&[b"x-csnap:"], vec![all[1], all[3], all[5]]),
        (&[b"qemu:"], vec![all[2], all[4], all[6]]),
        (&[b"qemu:dirty-bitmap:"], vec![all[2], all[4], all[6]]),
        (
            &[b"x-csnap:changed-since:7", b"base:"],
            vec![all[0], all[3]],
        ),
        // Unknown namespaces, unknown names and bare strings: ignored.
        (
            &[
                b"nbd-server:",
                b"x-other:",
                b"x-csnap:changed-since:8",
                b"bogus",
            ],
            vec![],
        ),
        (
            &[b"x-csnap:changed-since:1", b"x-csnap:"],
            vec![all[1], all[3], all[5]],
        ),
    ];
    for (queries, want) in cases {
        // Without structured replies, as nbdinfo --list --content may ask.
        let mut d = driver();
        d.feed(
            &[
                client_flags(3),
                opt(OPT_LIST_META_CONTEXT, &meta_data(b"origin", queries)),
            ]
            .concat(),
        );
        let out = d.take_out();
        let (got, acked) = meta_replies(&out[greeting().len()..]);
        assert!(acked);
        assert_eq!(names(&got), want, "queries {queries:?}");
        assert!(got.iter().all(|(id, _)| *id == 0), "list ids are 0");
        assert_eq!(d.take_events(), vec![NbdEvent::MetaQuery { set: false }]);
        assert_eq!(d.meta_queries, vec![(false, b"origin".to_vec())]);
        assert_eq!(d.s.state(), NbdState::OptionHeader);
        assert!(d.s.selected_contexts().is_empty(), "a list selects nothing");
    }
}

#[test]
fn set_meta_context_selects_exact_names_once() {
    let mut d = driver();
    let queries: [&[u8]; 6] = [
        b"base:allocation",
        b"qemu:dirty-bitmap:since-7",
        b"unknown:thing",
        b"base:allocation",
        b"x-csnap:",
        b"x-csnap:changed-since:1",
    ];
    d.feed(
        &[
            client_flags(3),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_SET_META_CONTEXT, &meta_data(b"snap-1", &queries)),
        ]
        .concat(),
    );
    let out = d.take_out();
    let after_ack = greeting().len() + 20;
    let (got, acked) = meta_replies(&out[after_ack..]);
    assert!(acked);
    // In context order, each once, ids from 1; the wildcard selects nothing.
    assert_eq!(
        got,
        vec![
            (1, "base:allocation".to_string()),
            (2, "x-csnap:changed-since:1".to_string()),
            (3, "qemu:dirty-bitmap:since-7".to_string()),
        ]
    );
    assert_eq!(
        d.s.selected_contexts(),
        &[
            MetaContext::Allocation,
            MetaContext::ChangedSince {
                tag: 1,
                qemu: false
            },
            MetaContext::ChangedSince { tag: 7, qemu: true },
        ]
    );
    // GO on the same export keeps the selection: block status is valid.
    d.feed(&go(b"snap-1", &[]));
    assert!(d.s.in_transmission());
    assert_eq!(d.s.selected_contexts().len(), 3);
    d.take_events();
    d.feed(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5, 4096, 8192));
    assert_eq!(
        d.take_events(),
        vec![cmd(5, CmdKind::BlockStatus, CMD_FLAG_REQ_ONE, 4096, 8192)]
    );
    // Zero length, past the end, an unknown flag: EINVAL, as a structured
    // error; so is a bad READ. A bad WRITE stays a simple reply.
    for (bad, h) in [
        req(CMD_BLOCK_STATUS, 0, 6, 0, 0),
        req(CMD_BLOCK_STATUS, 0, 7, MIB, 1),
        req(CMD_BLOCK_STATUS, CMD_FLAG_DF, 8, 0, 1),
        req(CMD_READ, CMD_FLAG_REQ_ONE, 9, 0, 1),
    ]
    .into_iter()
    .zip(6..)
    {
        d.feed(&bad);
        assert_eq!(
            d.take_events(),
            vec![NbdEvent::Reject {
                handle: h,
                error: NbdError::Inval,
                structured: true
            }]
        );
    }
    d.feed(&req(CMD_TRIM, 0, 10, 0, 1));
    assert_eq!(d.take_events(), vec![reject(10, NbdError::Perm)]);
}

#[test]
fn selection_rules() {
    // SET before structured replies: invalid, nothing selected.
    let mut d = driver();
    d.feed(
        &[
            client_flags(3),
            opt(
                OPT_SET_META_CONTEXT,
                &meta_data(b"origin", &[b"base:allocation"]),
            ),
        ]
        .concat(),
    );
    assert_eq!(
        d.take_out(),
        [
            greeting(),
            rep(OPT_SET_META_CONTEXT, REP_ERR_INVALID, INVALID_MSG)
        ]
        .concat()
    );
    assert!(d.s.selected_contexts().is_empty());
    // An unknown export: ERR_UNKNOWN, and the earlier selection is gone.
    let mut d = driver();
    let base: [&[u8]; 1] = [b"base:allocation"];
    d.feed(
        &[
            client_flags(3),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_SET_META_CONTEXT, &meta_data(b"origin", &base)),
        ]
        .concat(),
    );
    assert_eq!(d.s.selected_contexts(), &[MetaContext::Allocation]);
    d.take_out();
    d.feed(&opt(OPT_SET_META_CONTEXT, &meta_data(b"nope", &base)));
    assert_eq!(
        d.take_out(),
        rep(OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN, UNKNOWN_MSG)
    );
    assert!(d.s.selected_contexts().is_empty());
    // A selection with no query selects nothing.
    d.feed(&opt(OPT_SET_META_CONTEXT, &meta_data(b"origin", &[])));
    assert_eq!(d.take_out(), rep(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    assert!(d.s.selected_contexts().is_empty());
    // Selected for `origin`, then GO of another export: dropped, and block
    // status is refused.
    d.feed(&opt(OPT_SET_META_CONTEXT, &meta_data(b"origin", &base)));
    assert_eq!(d.s.selected_contexts().len(), 1);
    d.feed(&go(b"snap-2", &[]));
    assert!(d.s.in_transmission());
    assert!(d.s.selected_contexts().is_empty());
    d.take_events();
    d.feed(&req(CMD_BLOCK_STATUS, 0, 1, 0, 512));
    assert_eq!(
        d.take_events(),
        vec![NbdEvent::Reject {
            handle: 1,
            error: NbdError::Inval,
            structured: true
        }]
    );
    // Malformed data: a truncated query, trailing bytes, a count past the
    // end, a name length past the end.
    let good = meta_data(b"origin", &base);
    let mut trailing = good.clone();
    trailing.push(0);
    let mut bad_count = good.clone();
    bad_count[4 + 6 + 3] = 2;
    let mut bad_name = good.clone();
    bad_name[3] = 200;
    for data in [
        good[..good.len() - 1].to_vec(),
        trailing,
        bad_count,
        bad_name,
        vec![0, 0],
    ] {
        for o in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            let mut d = driver();
            d.feed(
                &[
                    client_flags(3),
                    opt(OPT_STRUCTURED_REPLY, &[]),
                    opt(o, &data),
                ]
                .concat(),
            );
            let out = d.take_out();
            assert_eq!(
                out[greeting().len() + 20..],
                rep(o, REP_ERR_INVALID, INVALID_MSG)[..],
                "{data:?}"
            );
            assert!(d.meta_queries.is_empty());
        }
    }
    // Over the data bound: skipped, TOO_BIG.
    let mut d = driver();
    let long = vec![0u8; NBD_OPTION_DATA_MAX_BYTES + 1];
    d.feed(&[client_flags(3), opt(OPT_LIST_META_CONTEXT, &long)].concat());
    assert_eq!(
        d.take_out(),
        [
            greeting(),
            rep(OPT_LIST_META_CONTEXT, REP_ERR_TOO_BIG, TOO_BIG_MSG)
        ]
        .concat()
    );
    // answer_meta out of turn is refused.
    assert_eq!(
        d.s.answer_meta(Some(&[])),
        Err(NbdCallError::NotAwaitingMeta)
    );
}

/// 64 snapshots: 129 contexts, more than the transmit buffer holds; the
/// answer goes out in several writes, whole, ACK last, without allocating.
#[test]
fn long_context_list_waits_for_the_transmit_buffer() {
    let mut d = driver();
    d.meta_tags = (1000..1064).collect();
    d.tx_piece_bytes = 700;
    d.feed(
        &[
            client_flags(3),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_LIST_META_CONTEXT, &meta_data(b"origin", &[])),
            opt(
                OPT_SET_META_CONTEXT,
                &meta_data(
                    b"origin",
                    &[
                        b"qemu:dirty-bitmap:since-1063",
                        b"x-csnap:changed-since:1000",
                    ],
                ),
            ),
            go(b"origin", &[]),
        ]
        .concat(),
    );
    assert!(d.s.in_transmission());
    let out = d.take_out();
    let replies = parse_replies(&out[greeting().len() + 20..]);
    let listed: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.opt == OPT_LIST_META_CONTEXT)
        .collect();
    assert_eq!(listed.len(), 129 + 1);
    assert_eq!(listed.last().unwrap().typ, REP_ACK);
    assert!(NBD_TRANSMIT_BUFFER_BYTES < listed.iter().map(|r| 20 + r.data.len()).sum::<usize>());
    assert_eq!(
        d.s.selected_contexts(),
        &[
            MetaContext::ChangedSince {
                tag: 1000,
                qemu: false
            },
            MetaContext::ChangedSince {
                tag: 1063,
                qemu: true
            },
        ]
    );
}

#[test]
fn structured_chunk_layouts() {
    assert_eq!(
        error_chunk(0x0102_0304_0506_0708, NbdError::Io).to_vec(),
        hex("668e33ef 0001 8001 0102030405060708 00000006 00000005 0000")
    );
    assert_eq!(
        offset_data_header(9, 4096, 512).to_vec(),
        hex("668e33ef 0001 0001 0000000000000009 00000208 0000000000001000")
    );
    assert_eq!(
        none_chunk(3).to_vec(),
        hex("668e33ef 0001 0000 0000000000000003 00000000")
    );
    let mut b = [0u8; CONTEXT_NAME_MAX_BYTES];
    let n = MetaContext::ChangedSince {
        tag: u32::MAX,
        qemu: true,
    }
    .name(&mut b);
    assert_eq!(&b[..n], b"qemu:dirty-bitmap:since-4294967295");
    assert_eq!(n, CONTEXT_NAME_MAX_BYTES);
}
