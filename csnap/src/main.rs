//! The csnap binary: `format`, `check`, `server`, `snapshot`, `status`, `demo`,
//! `agent`, `cluster`, `nbd` (the NBD export), and `io` (a scriptable volume
//! client used by tests).
//!
//! Exit status: 0 success; 1 the command ran and failed (`check`: the store
//! has problems; `format`: the store could not be formatted); 2 usage error or
//! a file that cannot be used at all (missing, a directory, not a csnap store).

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod agent_cmd;
mod check;
mod demo;
mod device;
mod format;
mod io_cmd;
mod json;
mod nbd_cmd;
mod server_cmd;
mod size;
mod snapshot_cmd;
mod up_cmd;

/// The sealed heap: `csnap server` seals it once its pools exist.
#[global_allocator]
static ALLOC: csnap_sys::alloc::SealedAlloc = csnap_sys::alloc::SealedAlloc::new();

/// Exit status of a command that ran and failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status of a usage error or an unusable file.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "csnap",
    version,
    about = "Cluster snapshot block device",
    after_help = "Exit status: 0 success; 1 failure (check: problems found); \
                  2 usage error or an unusable file."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Format a snapshot store for an origin volume.
    Format(FormatArgs),
    /// Check a snapshot store offline (read-only) and list every problem.
    Check(CheckArgs),
    /// Serve a store: snapshot metadata and read locks for clients.
    Server(server_cmd::ServerArgs),
    /// Create, delete, list, prioritise or diff snapshots through a server.
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Show a server's status.
    Status(snapshot_cmd::StatusArgs),
    /// A self-checking scenario on files in a temporary directory.
    Demo(demo::DemoArgs),
    /// The embedded default: a one-node cluster on files in DIR, its
    /// volumes exported over NBD, until interrupted.
    Up(up_cmd::UpArgs),
    /// A node's agent: gives its clients the server's address, keeps a
    /// standby server ready and starts it when the cluster says so.
    Agent(agent_cmd::AgentArgs),
    /// The local cluster: run its controller, or join, leave, start, status.
    Cluster(agent_cmd::ClusterArgs),
    /// Export the origin and the snapshots over NBD (one per node).
    Nbd(nbd_cmd::NbdArgs),
    /// A volume client driven by commands on standard input (for tests).
    #[command(hide = true)]
    Io(io_cmd::IoArgs),
    /// An agent's helper that starts its standby servers.
    #[command(hide = true)]
    Spawner(agent_cmd::SpawnerArgs),
}

/// What the store does when a copy-out finds no free chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreFull {
    /// Refuse the copy-out: the origin write fails visibly.
    Refuse,
    /// Delete the lowest-priority snapshot not in use, report it, retry.
    DeleteLowestPriority,
}

impl StoreFull {
    fn name(self) -> &'static str {
        match self {
            StoreFull::Refuse => "refuse",
            StoreFull::DeleteLowestPriority => "delete-lowest-priority",
        }
    }
}

#[derive(Debug, Args)]
#[command(
    after_help = "SIZE is a number of bytes, or a number followed by K, KiB, M, MiB, G, \
                        GiB, T or TiB (powers of 1024)."
)]
pub struct FormatArgs {
    /// Origin volume (regular file or block device); it is only read, for its size.
    #[arg(long, value_name = "PATH")]
    origin: PathBuf,
    /// Store (regular file or block device); created if missing (needs --store-size).
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
    /// Copy-out unit: a power of two from 4K to 1M.
    #[arg(long, value_name = "SIZE", value_parser = size::parse_chunk_size,
          default_value_t = csnap_pools::CHUNK_SIZE_DEFAULT_BYTES)]
    chunk_size: u32,
    /// Journal ring length in 4 KiB blocks.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::JOURNAL_DEFAULT_BLOCKS)]
    journal_blocks: u64,
    /// What to do when the store is full.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = StoreFull::Refuse)]
    store_full: StoreFull,
    /// Size of a store file to create, or of an existing empty one to extend.
    #[arg(long, value_name = "SIZE", value_parser = size::parse_store_size)]
    store_size: Option<u64>,
    /// Overwrite an existing csnap store.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Store to check; opened read-only, nothing is written.
    #[arg(long, value_name = "PATH")]
    store: PathBuf,
}

/// Writes `csnap: <message>` to stderr. Never panics, even on a closed stderr.
pub fn error(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "csnap: {message}");
}

/// Writes `text` to stdout. Returns false if stdout is gone (the caller fails).
pub fn output(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) => {
            error(&format!("cannot write to standard output: {e}"));
            false
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    // Every process reports a panic with write(2) and ends with exit_group:
    // a confined one dies of neither its filter nor its sealed heap on the
    // way, and the message reaches its log.
    csnap_sys::panic::install_hook(cli.command.name());
    match cli.command {
        Command::Format(args) => format::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Server(args) => server_cmd::run(&args),
        Command::Snapshot(args) => snapshot_cmd::run(&args),
        Command::Status(args) => snapshot_cmd::status(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Io(args) => io_cmd::run(&args),
        Command::Agent(args) => agent_cmd::run_agent(&args),
        Command::Up(args) => up_cmd::run(&args),
        Command::Cluster(args) => agent_cmd::run_cluster(&args),
        Command::Nbd(args) => nbd_cmd::run(&args),
        Command::Spawner(args) => agent_cmd::run_spawner(&args),
    }
}

impl Command {
    /// The subcommand's name, for reports.
    fn name(&self) -> &'static str {
        match self {
            Command::Format(_) => "format",
            Command::Check(_) => "check",
            Command::Server(_) => "server",
            Command::Snapshot(_) => "snapshot",
            Command::Status(_) => "status",
            Command::Demo(_) => "demo",
            Command::Io(_) => "io",
            Command::Agent(_) => "agent",
            Command::Up(_) => "up",
            Command::Cluster(_) => "cluster",
            Command::Nbd(_) => "nbd",
            Command::Spawner(_) => "spawner",
        }
    }
}

/// Help and version go out as clap renders them; errors are reworded to the
/// `csnap: <message>` form.
fn clap_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let code = u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE);
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
        }
        _ => {
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            let _ = write!(std::io::stderr().lock(), "csnap: {text}");
        }
    }
    ExitCode::from(code)
}
