//! `csnap io`: a volume client process driven by commands on standard input,
//! one per line, each answered by one line on standard output (`ok ...` or
//! `error: ...`). Used by the multi-process scenario tests.
//!
//! Commands:
//! - `write OFF PATH`: write the contents of file PATH at byte OFF;
//! - `read OFF LEN PATH`: read LEN bytes at OFF into file PATH;
//! - `flush`;
//! - `hold OFF LEN` (snapshot volumes): ask where the range is and take the
//!   read locks of its origin chunks, without reading or releasing them
//!   (what a slow read looks like to the server); `unhold` releases them;
//! - `quit` (or end of input).
//!
//! With `--agent`, the client finds its server through its node's agent and
//! rides out failovers; while idle it checks its connection every 10 ms,
//! so a held lock is re-uploaded to a new server without waiting for I/O.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use clap::Args;
use csnap_io::client::VolumeClient;
use csnap_io::net::Addr;
use csnap_proto::Volume;

use crate::{error, output, EXIT_FAILED, EXIT_USAGE};

#[derive(Debug, Args)]
pub struct IoArgs {
    /// Server address (no failover).
    #[arg(
        long,
        value_name = "ADDR",
        required_unless_present = "agent",
        conflicts_with = "agent"
    )]
    server: Option<String>,
    /// The node's agent socket (the server is found through it, failovers
    /// are ridden out).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// With --agent: how long one failover may take before I/O fails.
    #[arg(long, value_name = "MS", default_value_t = csnap_pools::CLIENT_FAILOVER_TIMEOUT_DEFAULT_MS)]
    failover_timeout_ms: u64,
    /// Origin device.
    #[arg(long, value_name = "PATH")]
    origin: PathBuf,
    /// Store device.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
    /// `origin` or a snapshot tag.
    #[arg(long, value_name = "VOLUME")]
    volume: String,
    /// Client id.
    #[arg(long, default_value_t = 1)]
    client_id: u64,
    /// Node id.
    #[arg(long, default_value_t = 1)]
    node_id: u32,
}

fn command(
    v: &mut VolumeClient,
    held: &mut Vec<csnap_proto::Range>,
    line: &str,
) -> Result<String, String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let num = |s: &str| s.parse::<u64>().map_err(|_| format!("bad number {s:?}"));
    match w.as_slice() {
        ["write", off, path] => {
            let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
            v.write_at(&data, num(off)?).map_err(|e| e.to_string())?;
            Ok(format!("ok wrote {}", data.len()))
        }
        ["read", off, len, path] => {
            let len = usize::try_from(num(len)?).map_err(|e| e.to_string())?;
            let mut b = vec![0u8; len];
            v.read_at(&mut b, num(off)?).map_err(|e| e.to_string())?;
            std::fs::write(path, &b).map_err(|e| format!("{path}: {e}"))?;
            Ok(format!("ok read {len}"))
        }
        ["flush"] => {
            v.flush().map_err(|e| e.to_string())?;
            Ok("ok".into())
        }
        ["hold", off, len] => {
            let len = usize::try_from(num(len)?).map_err(|e| e.to_string())?;
            let got = v.hold_read(num(off)?, len).map_err(|e| e.to_string())?;
            let n: u64 = got.iter().map(|r| u64::from(r.chunks)).sum();
            held.extend(got);
            Ok(format!("ok held {n}"))
        }
        ["unhold"] => {
            let n: u64 = held.iter().map(|r| u64::from(r.chunks)).sum();
            for r in held.drain(..) {
                v.release_held(r).map_err(|e| e.to_string())?;
            }
            Ok(format!("ok released {n}"))
        }
        _ => Err(format!("unknown command {line:?}")),
    }
}

pub fn run(args: &IoArgs) -> ExitCode {
    let mut v = match attach(args) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if !output(&format!("ready {}\n", v.size_bytes())) {
        return ExitCode::from(EXIT_FAILED);
    }
    serve_lines(&mut v, args.agent.is_some())
}

/// The volume client `args` name, attached (errors said).
fn attach(args: &IoArgs) -> Result<VolumeClient, ExitCode> {
    let volume = if args.volume == "origin" {
        Volume::Origin
    } else {
        match args.volume.parse::<u32>() {
            Ok(t) => Volume::Snapshot(t),
            Err(_) => {
                error(&format!(
                    "--volume {}: expected `origin` or a snapshot tag",
                    args.volume
                ));
                return Err(ExitCode::from(EXIT_USAGE));
            }
        }
    };
    let opened = match (&args.server, &args.agent) {
        (Some(server), _) => {
            let addr = match Addr::parse(server) {
                Ok(a) => a,
                Err(e) => {
                    error(&e);
                    return Err(ExitCode::from(EXIT_USAGE));
                }
            };
            VolumeClient::open(
                &addr,
                &args.origin,
                &args.store,
                volume,
                args.client_id,
                args.node_id,
            )
        }
        (None, Some(agent)) => VolumeClient::open_via_agent(
            agent,
            &args.origin,
            &args.store,
            volume,
            args.client_id,
            args.node_id,
            Duration::from_millis(args.failover_timeout_ms),
        ),
        (None, None) => {
            error("give --server or --agent");
            return Err(ExitCode::from(EXIT_USAGE));
        }
    };
    opened.map_err(|e| {
        error(&format!("cannot attach: {e}"));
        ExitCode::from(EXIT_FAILED)
    })
}

/// Answers the commands of standard input, one line each, until `quit` or
/// its end; `idle_checks`: poll the connection while idle (through an
/// agent, to notice a failover).
fn serve_lines(v: &mut VolumeClient, idle_checks: bool) -> ExitCode {
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut held = Vec::new();
    loop {
        let line = match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if idle_checks {
                    if let Err(e) = v.poll_idle() {
                        error(&format!("connection lost while idle: {e}"));
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "quit" {
            break;
        }
        let reply = match command(v, &mut held, line) {
            Ok(s) => s,
            Err(e) => format!("error: {e}"),
        };
        if !output(&format!("{reply}\n")) {
            return ExitCode::from(EXIT_FAILED);
        }
    }
    ExitCode::SUCCESS
}
