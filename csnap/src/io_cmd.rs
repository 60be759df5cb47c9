//! `csnap io`: a volume client process driven by commands on standard input,
//! one per line, each answered by one line on standard output (`ok ...` or
//! `error: ...`). Used by the multi-process scenario tests.
//!
//! Commands:
//! - `write OFF PATH`: write the contents of file PATH at byte OFF;
//! - `read OFF LEN PATH`: read LEN bytes at OFF into file PATH;
//! - `flush`;
//! - `quit` (or end of input).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use csnap_io::client::VolumeClient;
use csnap_io::net::Addr;
use csnap_proto::Volume;

use crate::{error, output, EXIT_FAILED, EXIT_USAGE};

#[derive(Debug, Args)]
pub struct IoArgs {
    /// Server address.
    #[arg(long, value_name = "ADDR")]
    server: String,
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

fn command(v: &mut VolumeClient, line: &str) -> Result<String, String> {
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
        _ => Err(format!("unknown command {line:?}")),
    }
}

pub fn run(args: &IoArgs) -> ExitCode {
    let addr = match Addr::parse(&args.server) {
        Ok(a) => a,
        Err(e) => {
            error(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
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
                return ExitCode::from(EXIT_USAGE);
            }
        }
    };
    let mut v = match VolumeClient::open(
        &addr,
        &args.origin,
        &args.store,
        volume,
        args.client_id,
        args.node_id,
    ) {
        Ok(v) => v,
        Err(e) => {
            error(&format!("cannot attach: {e}"));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    if !output(&format!("ready {}\n", v.size_bytes())) {
        return ExitCode::from(EXIT_FAILED);
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "quit" {
            break;
        }
        let reply = match command(&mut v, line) {
            Ok(s) => s,
            Err(e) => format!("error: {e}"),
        };
        if !output(&format!("{reply}\n")) {
            return ExitCode::from(EXIT_FAILED);
        }
    }
    ExitCode::SUCCESS
}
