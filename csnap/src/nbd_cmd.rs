//! `csnap nbd`: the NBD server of one node. It exports the origin (`origin`,
//! and the empty default name) and every snapshot (by its decimal tag) over
//! NBD on unix and TCP listeners; each NBD connection is a caching csnap
//! client that finds the server through the node's agent and rides out
//! failovers. See `csnap_io::nbd` for the design.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use csnap_io::nbd::{NbdOptions, NbdServer};
use csnap_io::net::Addr;

use crate::{error, EXIT_FAILED, EXIT_USAGE};

#[derive(Debug, Args)]
pub struct NbdArgs {
    /// The node's agent socket (DIR/node-N/agent.sock).
    #[arg(long, value_name = "PATH")]
    pub agent: PathBuf,
    /// This node (the agent's node).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=0xffff))]
    pub node: u32,
    /// Origin volume (regular file or block device).
    #[arg(long, value_name = "PATH")]
    pub origin: PathBuf,
    /// Snapshot store formatted for that origin.
    #[arg(long, value_name = "PATH")]
    pub store: PathBuf,
    /// Address to listen on: a unix socket path, or host:port (port 0: any
    /// free port, printed at start). Repeatable.
    #[arg(long, value_name = "ADDR", required = true)]
    pub listen: Vec<String>,
    /// NBD connections served at once; one more is closed at once.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::NBD_CONNECTIONS_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=csnap_pools::NBD_CONNECTIONS_MAX as u64))]
    pub connections: u64,
    /// Data buffers of 1 MiB, reserved and locked at start. A command that
    /// finds none waits.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::NBD_BUFFERS_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=csnap_pools::NBD_BUFFERS_MAX as u64))]
    pub buffers: u64,
    /// How long a failover (or the first attach of an export) may take
    /// before in-flight I/O fails with EIO.
    #[arg(long, value_name = "MS", default_value_t = csnap_pools::CLIENT_FAILOVER_TIMEOUT_DEFAULT_MS,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub failover_timeout_ms: u64,
    /// Acknowledge a WRITE (without FUA) only once it is on the disk,
    /// instead of as soon as it is taken (write-back, the default: reads
    /// and writes overlapping it on its connection wait for it, and a FLUSH
    /// waits for every write acknowledged before it and reports their
    /// failures). With write-back, exports do not advertise multi-connection
    /// consistency.
    #[arg(long)]
    pub no_write_back: bool,
    /// Serve Prometheus metrics (text format 0.0.4) at `GET /metrics` on
    /// ADDR (host:port, or a unix socket path): NBD traffic by export and
    /// operation, and the csnap server's figures (asked for at each scrape).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Memory locking, the sealed heap and the syscall whitelist (`NBD`).
    #[command(flatten)]
    pub confine: crate::agent_cmd::ConfineArgs,
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

pub fn run(args: &NbdArgs) -> ExitCode {
    match serve(args) {
        Ok(code) => code,
        Err(e) => {
            error(&e);
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `nbd+unix:///origin?socket=PATH` or `nbd://HOST:PORT/origin`.
fn export_url(a: &Addr) -> String {
    match a {
        Addr::Unix(p) => {
            let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            format!("nbd+unix:///origin?socket={}", abs.display())
        }
        Addr::Tcp(s) => format!("nbd://{s}/origin"),
    }
}

fn serve(args: &NbdArgs) -> Result<ExitCode, String> {
    crate::device::require_device(&args.origin, "origin")?;
    crate::device::require_device(&args.store, "store")?;
    let mut listen = Vec::with_capacity(args.listen.len());
    for a in &args.listen {
        listen.push(Addr::parse(a).map_err(|e| format!("--listen {a}: {e}"))?);
    }
    let opts = NbdOptions {
        agent: args.agent.clone(),
        node_id: args.node,
        origin: args.origin.clone(),
        store: args.store.clone(),
        listen,
        connections: usize_of(args.connections),
        buffers: usize_of(args.buffers),
        failover_timeout_ms: args.failover_timeout_ms,
        write_back: !args.no_write_back,
        metrics: args
            .metrics
            .as_deref()
            .map(|a| Addr::parse(a).map_err(|e| format!("--metrics {a}: {e}")))
            .transpose()?,
    };
    let mut server = NbdServer::new(&opts)?;
    let mut reserved = 0usize;
    for (what, bytes) in server.reserved_items() {
        eprintln!("csnap nbd: pool {what}: {bytes} bytes");
        reserved += bytes;
    }
    if let Some(a) = server.metrics_addr() {
        eprintln!("csnap nbd: metrics at http://{a}/metrics");
    }
    for a in server.local_addrs() {
        eprintln!("csnap nbd: listening on {a}");
        eprintln!("csnap nbd: export {}", export_url(&a));
    }
    eprintln!(
        "csnap nbd: node {}, agent {}, volume size {} bytes, {} connections, {} buffers, failover timeout {} ms, {reserved} bytes reserved",
        args.node,
        args.agent.display(),
        server.export_size_bytes(),
        args.connections,
        args.buffers,
        args.failover_timeout_ms
    );
    // Locks memory, seals the heap, installs the whitelist. Kept to the
    // end: freeing the filter would be an allocator call under the sealed
    // heap.
    let who = "csnap nbd";
    let confinement = args.confine.confinement(Some(csnap_audit::NBD), who)?;
    confinement.enter(who)?;
    eprintln!("csnap nbd: serving");
    let r = server.run();
    // The stop stays confined: no allocation, nothing freed (the pools and
    // the filter go with the process), only whitelisted syscalls: the
    // figures, the unix sockets removed, then `_exit`.
    let st = server.stats();
    eprintln!(
        "csnap nbd: {} connections ({} refused), {} commands, {} waited for a buffer, {} reconnects, {} failover timeouts, {} disk errors, {} unaligned disk operations",
        st.connections,
        st.refused,
        st.commands,
        st.buffer_waits,
        st.reconnects,
        st.timeouts,
        st.disk_errors,
        st.unaligned
    );
    server.remove_socket_files();
    match r {
        Ok(()) => {
            eprintln!("csnap nbd: stopped (devices flushed)");
            csnap_sys::exit_now(0)
        }
        Err(e) => {
            eprintln!("csnap nbd: error: {e}");
            csnap_sys::exit_now(EXIT_FAILED)
        }
    }
}
