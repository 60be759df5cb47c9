//! `csnap snapshot create|delete|list|priority|diff` and `csnap status`,
//! through a server's control connection.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use csnap_fsm::client::Request;
use csnap_io::client::{control, control_via_agent, Connection};
use csnap_io::net::Addr;
use csnap_proto::{Msg, Volume};

use crate::{error, output, EXIT_FAILED, EXIT_USAGE};

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub action: SnapshotAction,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Create a snapshot of the origin as it is now.
    Create {
        #[command(flatten)]
        server: ServerSel,
        /// Tag of the new snapshot.
        tag: u32,
    },
    /// Delete a snapshot (refused while a client has it open).
    Delete {
        #[command(flatten)]
        server: ServerSel,
        /// Tag.
        tag: u32,
    },
    /// List snapshots.
    List {
        #[command(flatten)]
        server: ServerSel,
        /// Print a JSON array (field names in the README).
        #[arg(long)]
        json: bool,
    },
    /// Set a snapshot's priority (lowest is deleted first when the store is
    /// full and the policy allows it; 127 never).
    Priority {
        #[command(flatten)]
        server: ServerSel,
        /// Tag.
        tag: u32,
        /// Priority, -128..=127.
        #[arg(allow_negative_numbers = true)]
        priority: i8,
    },
    /// Which byte ranges differ between snapshot A and B (a snapshot tag, or
    /// `origin`): `offset length type` rows in bytes, as `rbd diff` prints
    /// them, in chunk units. Ranges that were written or zeroed count;
    /// csnap does not know which hold zeroes, so every row is `data`.
    Diff {
        #[command(flatten)]
        server: ServerSel,
        /// The older snapshot (the base).
        a: u32,
        /// A snapshot tag, or `origin`.
        b: String,
        /// Print a JSON array of {"offset", "length", "exists"} objects.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: ServerSel,
    /// Print a JSON object (field names in the README).
    #[arg(long)]
    pub json: bool,
}

/// How a control command finds the server: its address, or the agent of a
/// node (of a cluster directory, or of a `csnap up` directory), which gives
/// the serving server's address and rides out a failover.
#[derive(Debug, Args, Clone)]
pub struct ServerSel {
    /// Server address (unix path or host:port).
    #[arg(long, value_name = "ADDR", required_unless_present_any = ["dir", "agent"],
          conflicts_with_all = ["dir", "agent"])]
    pub server: Option<String>,
    /// A `csnap up` directory, or a local cluster directory: the server is
    /// found through the agent of node --node.
    #[arg(long, value_name = "DIR", conflicts_with = "agent")]
    pub dir: Option<PathBuf>,
    /// A node agent's socket: the server is found through it.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// With --dir: which node's agent to ask.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub node: u32,
}

/// The agent socket of node `node` for a `csnap up` directory (its cluster
/// is `DIR/cluster`) or a cluster directory.
pub fn agent_for_dir(dir: &Path, node: u32) -> PathBuf {
    let up = crate::agent_cmd::agent_socket(&dir.join("cluster"), node);
    if up.exists() {
        up
    } else {
        crate::agent_cmd::agent_socket(dir, node)
    }
}

fn connect(sel: &ServerSel) -> Result<Connection, ExitCode> {
    let agent = match (&sel.server, &sel.dir, &sel.agent) {
        (Some(server), _, _) => {
            let addr = Addr::parse(server).map_err(|e| {
                error(&format!("--server {server}: {e}"));
                ExitCode::from(EXIT_USAGE)
            })?;
            return control(&addr).map_err(|e| {
                error(&format!("cannot reach the server at {server}: {e}"));
                ExitCode::from(EXIT_FAILED)
            });
        }
        (None, Some(dir), _) => agent_for_dir(dir, sel.node),
        (None, None, Some(a)) => a.clone(),
        (None, None, None) => {
            error("give --server, --dir or --agent");
            return Err(ExitCode::from(EXIT_USAGE));
        }
    };
    let timeout = Duration::from_millis(csnap_pools::CLIENT_FAILOVER_TIMEOUT_DEFAULT_MS);
    control_via_agent(&agent, timeout).map_err(|e| {
        error(&format!(
            "cannot reach the server through the agent at {}: {e}",
            agent.display()
        ));
        ExitCode::from(EXIT_FAILED)
    })
}

pub fn run(args: &SnapshotArgs) -> ExitCode {
    let (server, req) = match &args.action {
        SnapshotAction::Diff { server, a, b, json } => return diff(server, *a, b, *json),
        SnapshotAction::Create { server, tag } => (server, Request::Create(*tag)),
        SnapshotAction::Delete { server, tag } => (server, Request::Delete(*tag)),
        SnapshotAction::List { server, json } => return list(server, *json),
        SnapshotAction::Priority {
            server,
            tag,
            priority,
        } => (server, Request::Priority(*tag, *priority)),
    };
    let mut c = match connect(server) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.call(req) {
        Ok(Msg::Ok) => {
            let what = match req {
                Request::Create(t) => format!("created snapshot {t}\n"),
                Request::Delete(t) => format!("deleted snapshot {t}\n"),
                Request::Priority(t, p) => format!("snapshot {t}: priority {p}\n"),
                _ => String::new(),
            };
            if output(&what) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Ok(m) => {
            error(&format!("unexpected reply: {m:?}"));
            ExitCode::from(EXIT_FAILED)
        }
        Err(e) => {
            error(&e.to_string());
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `snapshot list`: every page (`ListSnapshots { from }`, from tag 0 and
/// then one past each page's last tag, until an empty page), in tag order.
fn list(server: &ServerSel, json: bool) -> ExitCode {
    let mut c = match connect(server) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut all: Vec<csnap_proto::SnapInfo> = Vec::new();
    let mut from = Some(0u32);
    while let Some(f) = from {
        match c.call(Request::List(f)) {
            Ok(Msg::SnapshotList(l)) => {
                all.extend(l.iter());
                from = l.iter().map(|e| e.tag).max().and_then(|t| t.checked_add(1));
            }
            Ok(m) => {
                error(&format!("unexpected reply: {m:?}"));
                return ExitCode::from(EXIT_FAILED);
            }
            Err(e) => {
                error(&e.to_string());
                return ExitCode::from(EXIT_FAILED);
            }
        }
    }
    let text = if json {
        crate::json::snapshot_list(&all)
    } else {
        let mut s = String::from("tag\tpriority\tchunks\tunique\tctime\tstate\n");
        for e in &all {
            let state = if e.deleting() {
                "deleting"
            } else if e.in_use() {
                "in use"
            } else {
                "idle"
            };
            s.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\n",
                e.tag, e.priority, e.chunks, e.unique_chunks, e.ctime_secs, state
            ));
        }
        s
    };
    if output(&text) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// The byte ranges (offset, length) where `b` differs from snapshot `a`,
/// asked piece after piece (`DELTA_QUERY_CHUNKS_MAX` chunks each),
/// adjacent pieces merged.
fn delta_ranges(c: &mut Connection, a: u32, b: Volume) -> Result<Vec<(u64, u64)>, String> {
    let (chunk_bytes, origin_chunks) = match c.call(Request::Status) {
        Ok(Msg::StatusReply {
            chunk_size_bytes,
            origin_chunks,
            ..
        }) => (u64::from(chunk_size_bytes), origin_chunks),
        Ok(m) => return Err(format!("unexpected reply: {m:?}")),
        Err(e) => return Err(e.to_string()),
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let piece = csnap_pools::DELTA_QUERY_CHUNKS_MAX as u64;
    let mut at = 0;
    while at < origin_chunks {
        let n = piece.min(origin_chunks - at);
        let req = Request::Delta {
            volume: b,
            base: a,
            chunk: at,
            chunks: u32::try_from(n).unwrap_or(u32::MAX),
        };
        let bits = match c.call(req) {
            Ok(Msg::DeltaMap {
                chunk,
                chunks,
                bits,
            }) if chunk == at && u64::from(chunks) == n => bits.to_vec(),
            Ok(m) => return Err(format!("unexpected reply: {m:?}")),
            Err(e) => return Err(e.to_string()),
        };
        for i in 0..n {
            let set = usize::try_from(i / 8)
                .ok()
                .and_then(|k| bits.get(k))
                .is_some_and(|byte| byte & (1 << (i % 8)) != 0);
            if !set {
                continue;
            }
            let off = (at + i) * chunk_bytes;
            match runs.last_mut() {
                Some((o, l)) if *o + *l == off => *l += chunk_bytes,
                _ => runs.push((off, chunk_bytes)),
            }
        }
        at += n;
    }
    Ok(runs)
}

fn diff(sel: &ServerSel, a: u32, b: &str, json: bool) -> ExitCode {
    let volume = if b == "origin" {
        Volume::Origin
    } else if let Ok(t) = b.parse::<u32>() {
        Volume::Snapshot(t)
    } else {
        error(&format!("B must be a snapshot tag or `origin`, not {b:?}"));
        return ExitCode::from(EXIT_USAGE);
    };
    let mut c = match connect(sel) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runs = match delta_ranges(&mut c, a, volume) {
        Ok(r) => r,
        Err(e) => {
            error(&e);
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let mut s = String::new();
    if json {
        s.push('[');
        for (i, (o, l)) in runs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&format!(
                "{{\"offset\":{o},\"length\":{l},\"exists\":\"true\"}}"
            ));
        }
        s.push_str("]\n");
    } else {
        s.push_str("offset length type\n");
        for (o, l) in &runs {
            s.push_str(&format!("{o} {l} data\n"));
        }
    }
    if output(&s) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

pub fn status(args: &StatusArgs) -> ExitCode {
    let mut c = match connect(&args.server) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.call(Request::Status) {
        Ok(m) if args.json && crate::json::status(&m).is_some() => {
            if output(&crate::json::status(&m).unwrap_or_default()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Ok(Msg::StatusReply {
            incarnation,
            chunk_size_bytes,
            origin_chunks,
            data_chunks,
            data_free,
            meta_blocks,
            meta_free,
            snapshots,
            deleting,
            clients,
            read_locks,
            waiting_writes,
            commits,
            state,
            copyouts,
        }) => {
            let s = format!(
                "state: {state:?}\nincarnation: {incarnation}\nchunk size: {chunk_size_bytes} bytes\n\
                 origin: {origin_chunks} chunks\nstore data: {} of {data_chunks} chunks used\n\
                 store metadata: {} of {meta_blocks} blocks used\nsnapshots: {snapshots} ({deleting} being deleted)\n\
                 clients: {clients}\nread locks: {read_locks}\nwaiting writes: {waiting_writes}\ncommits: {commits}\n\
                 copy-outs: {copyouts}\n",
                data_chunks - data_free,
                meta_blocks - meta_free,
            );
            if output(&s) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Ok(m) => {
            error(&format!("unexpected reply: {m:?}"));
            ExitCode::from(EXIT_FAILED)
        }
        Err(e) => {
            error(&e.to_string());
            ExitCode::from(EXIT_FAILED)
        }
    }
}
