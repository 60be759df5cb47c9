//! The csnap server under test: store worker and server loop in this
//! process, and its commit counter.

use super::*;

/// The server under test: its two addresses, and why its loop stopped.
pub(crate) struct Csnap {
    pub(crate) unix: Addr,
    pub(crate) tcp: Addr,
    pub(crate) stopped: Arc<Mutex<Option<String>>>,
}

/// A fresh origin and store in `dir`, the store formatted and opened at
/// its next incarnation: the store worker and the server configuration.
fn open_store(dir: &Path) -> Result<(StoreWorker<FileDisk, FileDisk>, ServerConfig), String> {
    let origin = dir.join("origin");
    let store = dir.join("store");
    let mk = |p: &Path, len: u64| {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(len))
            .map_err(|e| format!("create {}: {e}", p.display()))
    };
    mk(&origin, ORIGIN_BYTES)?;
    mk(&store, STORE_BYTES)?;
    let mut o = FormatOptions::new(ORIGIN_BYTES);
    o.chunk_size_bytes = CHUNK_BYTES;
    o.origin_uuid = ORIGIN_UUID;
    o.store_uuid = *b"csnap-bench-stor";
    let mut sd = FileDisk::open(&store).map_err(|e| format!("open the store: {e}"))?;
    csnap_store::format(&mut sd, &o).map_err(|e| format!("format the store: {e}"))?;
    let mut st =
        Store::open(sd, &OpenOptions::default()).map_err(|e| format!("open the store: {e}"))?;
    let incarnation = st
        .bump_incarnation()
        .map_err(|e| format!("bump the incarnation: {e}"))?;
    st.commit().map_err(|e| format!("commit: {e}"))?;
    let label = *st.label();
    let od = FileDisk::open(&origin).map_err(|e| format!("open the origin: {e}"))?;
    let worker = StoreWorker::new(st, od, BATCH_MAX);
    let cfg = ServerConfig {
        clients: SERVER_CLIENTS,
        requests_per_client: SERVER_REQUESTS_PER_CLIENT,
        read_locks: SERVER_READ_LOCKS,
        incarnation,
        server_id: 1,
        chunk_size_bytes: label.chunk_size_bytes,
        origin_size_bytes: label.origin_size_bytes,
        origin_uuid: label.origin_uuid,
    };
    Ok((worker, cfg))
}

/// Starts the server loop in a thread, listening on a unix socket in `dir`
/// and on 127.0.0.1 (a free port); returns once it listens.
pub(crate) fn start_csnap(dir: &Path) -> Result<Csnap, String> {
    let (worker, cfg) = open_store(dir)?;
    let listen = vec![
        Addr::Unix(dir.join("csnap.sock")),
        Addr::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
    ];
    let stopped = Arc::new(Mutex::new(None));
    let stopped2 = stopped.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("csnap-net".into())
        .spawn(move || {
            let mut l = match ServerLoop::new(cfg, &listen, worker) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("start the server: {e}")));
                    return;
                }
            };
            let _ = tx.send(Ok(l.local_addrs()));
            let why = match l.run() {
                Stop::StoreFailed => "the store failed".to_string(),
                Stop::Fenced => "fenced by a newer incarnation".to_string(),
                Stop::Io(e) => format!("event loop I/O error: {e}"),
                Stop::AgentGone => "the agent link closed".to_string(),
            };
            if let Ok(mut s) = stopped2.lock() {
                *s = Some(why);
            }
        })
        .map_err(|e| format!("spawn the server: {e}"))?;
    let addrs = rx
        .recv()
        .map_err(|_| "the server thread died during start-up".to_string())??;
    let [unix, tcp] = addrs.as_slice() else {
        return Err(format!(
            "the server listens on {addrs:?}, expected two addresses"
        ));
    };
    Ok(Csnap {
        unix: unix.clone(),
        tcp: tcp.clone(),
        stopped,
    })
}

impl Csnap {
    pub(crate) fn addr(&self, t: Transport) -> &Addr {
        match t {
            Transport::Unix => &self.unix,
            Transport::Tcp => &self.tcp,
        }
    }

    /// The error, with the server's stop reason when it stopped.
    pub(crate) fn explain(&self, e: String) -> String {
        match self.stopped.lock().ok().and_then(|s| s.clone()) {
            Some(why) => format!("{e} (the server stopped: {why})"),
            None => e,
        }
    }
}

pub(crate) fn commits(ctl: &mut Connection) -> Result<u64, String> {
    match ctl.call(Request::Status) {
        Ok(Msg::StatusReply { commits, .. }) => Ok(commits),
        Ok(m) => Err(format!("Status: unexpected {}", m.kind().name())),
        Err(e) => Err(format!("Status: {e}")),
    }
}
