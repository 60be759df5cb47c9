//! `csnap snapshot create|delete|list|priority` and `csnap status`, through a
//! server's control connection.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use csnap_fsm::client::Request;
use csnap_io::client::{control, Connection};
use csnap_io::net::Addr;
use csnap_proto::Msg;

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
        /// Server address (unix path or host:port).
        #[arg(long, value_name = "ADDR")]
        server: String,
        /// Tag of the new snapshot.
        tag: u32,
    },
    /// Delete a snapshot (refused while a client has it open).
    Delete {
        /// Server address.
        #[arg(long, value_name = "ADDR")]
        server: String,
        /// Tag.
        tag: u32,
    },
    /// List snapshots.
    List {
        /// Server address.
        #[arg(long, value_name = "ADDR")]
        server: String,
    },
    /// Set a snapshot's priority (lowest is deleted first when the store is
    /// full and the policy allows it; 127 never).
    Priority {
        /// Server address.
        #[arg(long, value_name = "ADDR")]
        server: String,
        /// Tag.
        tag: u32,
        /// Priority, -128..=127.
        #[arg(allow_negative_numbers = true)]
        priority: i8,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Server address (unix path or host:port).
    #[arg(long, value_name = "ADDR")]
    pub server: String,
}

fn connect(server: &str) -> Result<Connection, ExitCode> {
    let addr = Addr::parse(server).map_err(|e| {
        error(&format!("--server {server}: {e}"));
        ExitCode::from(EXIT_USAGE)
    })?;
    control(&addr).map_err(|e| {
        error(&format!("cannot reach the server at {server}: {e}"));
        ExitCode::from(EXIT_FAILED)
    })
}

pub fn run(args: &SnapshotArgs) -> ExitCode {
    let (server, req) = match &args.action {
        SnapshotAction::Create { server, tag } => (server, Request::Create(*tag)),
        SnapshotAction::Delete { server, tag } => (server, Request::Delete(*tag)),
        SnapshotAction::List { server } => (server, Request::List),
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
        Ok(Msg::SnapshotList(l)) => {
            let mut s = String::from("tag\tpriority\tchunks\tunique\tctime\tstate\n");
            for e in l.iter() {
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

pub fn status(args: &StatusArgs) -> ExitCode {
    let mut c = match connect(&args.server) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.call(Request::Status) {
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
        }) => {
            let s = format!(
                "state: {state:?}\nincarnation: {incarnation}\nchunk size: {chunk_size_bytes} bytes\n\
                 origin: {origin_chunks} chunks\nstore data: {} of {data_chunks} chunks used\n\
                 store metadata: {} of {meta_blocks} blocks used\nsnapshots: {snapshots} ({deleting} being deleted)\n\
                 clients: {clients}\nread locks: {read_locks}\nwaiting writes: {waiting_writes}\ncommits: {commits}\n",
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
