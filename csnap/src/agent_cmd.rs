//! `csnap agent`, `csnap cluster ...` and the hidden `csnap spawner`: a
//! node's agent and the `local` membership and resource-manager backend.
//!
//! Layout of a local cluster directory DIR:
//! - `DIR/controller.sock`: the controller (`csnap cluster run --dir DIR`);
//! - `DIR/node-N/agent.sock`: node N's agent (`csnap agent --dir DIR --node N`);
//! - `DIR/node-N/server.N.SEQ.sock`: the servers node N's agent starts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use csnap_failover::Confinement;
use csnap_proto::{ClusterOp, Msg};

use crate::server_cmd::SealMode;
use crate::{error, output, EXIT_FAILED, EXIT_USAGE};

/// Confinement flags shared by the agent, the controller and the NBD server
/// (and passed on to the agent's servers).
#[derive(Debug, Args, Clone)]
pub struct ConfineArgs {
    /// Do not lock memory (development only).
    #[arg(long)]
    pub no_mlock: bool,
    /// What an allocation after init does: abort (production), count,
    /// report, or off.
    #[arg(long, value_enum, default_value_t = SealMode::Abort)]
    pub seal: SealMode,
    /// Do not install the syscall whitelist (development, valgrind).
    #[arg(long)]
    pub no_seccomp: bool,
}

impl ConfineArgs {
    /// What these flags ask for, with `rules` as the whitelist (compiled
    /// here, at init; the SIGSYS reporter installed).
    pub fn confinement(
        &self,
        rules: Option<&[csnap_audit::Rule]>,
        who: &str,
    ) -> Result<Confinement, String> {
        let seal = match self.seal {
            SealMode::Abort => Some(csnap_sys::alloc::Mode::Abort),
            SealMode::Count => Some(csnap_sys::alloc::Mode::Count),
            SealMode::Report => Some(csnap_sys::alloc::Mode::Report),
            SealMode::Off => None,
        };
        let filter = match rules {
            Some(r) if !self.no_seccomp && self.seal != SealMode::Report => {
                csnap_sys::seccomp::install_sigsys_reporter()
                    .map_err(|e| format!("{who}: cannot install the SIGSYS reporter: {e}"))?;
                Some(csnap_sys::seccomp::compile(&csnap_audit::numbers(r))?)
            }
            _ => None,
        };
        Ok(Confinement {
            mlock: !self.no_mlock,
            seal,
            filter,
        })
    }

    /// The same flags for a child process.
    pub fn child_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.no_mlock {
            v.push("--no-mlock".to_string());
        }
        if self.no_seccomp {
            v.push("--no-seccomp".to_string());
        }
        v.push("--seal".to_string());
        v.push(
            match self.seal {
                SealMode::Abort => "abort",
                SealMode::Count => "count",
                SealMode::Report => "report",
                SealMode::Off => "off",
            }
            .to_string(),
        );
        v
    }
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The local cluster directory (controller socket, node directories).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// This node's id (1 or more; unique in the cluster).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub node: u32,
    /// Origin volume.
    #[arg(long, value_name = "PATH")]
    pub origin: PathBuf,
    /// Snapshot store.
    #[arg(long, value_name = "PATH")]
    pub store: PathBuf,
    /// Connections on the agent's socket at once.
    #[arg(long, value_name = "N", default_value_t = csnap_pools::AGENT_CONNS_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(2..=csnap_pools::AGENT_CONNS_MAX as u64))]
    pub conns: u64,
    /// An extra argument for the standby servers (repeatable), e.g.
    /// `--server-arg=--clients=128`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    /// The controller's address, when it runs on another host: `IP:PORT`
    /// of its `cluster run --listen`. Default: `DIR/controller.sock`.
    #[arg(long, value_name = "ADDR")]
    pub controller: Option<String>,
    /// This node's IP address for its servers: each standby listens on
    /// `IP:PORT` (a port the kernel picks), and that is the address the
    /// agents give to clients on every node. Without it the servers listen
    /// only on unix sockets in the node's directory (one host).
    #[arg(long, value_name = "IP")]
    pub server_listen: Option<std::net::IpAddr>,
    /// Serve Prometheus metrics (text format 0.0.4) at `GET /metrics` on
    /// ADDR (host:port, or a unix socket path): membership, the serving
    /// incarnation and the failovers this agent saw.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// The crash-loop breaker's window, in milliseconds, as the
    /// controller's `--death-window-ms`: the agent counts its own servers'
    /// deaths within it and reports the count, so that a restarted
    /// controller starts from it. 0: not counted.
    #[arg(long, value_name = "MS", default_value_t = csnap_pools::CONTROLLER_DEATH_WINDOW_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(0..=csnap_pools::CONTROLLER_DEATH_WINDOW_MS_MAX))]
    pub death_window_ms: u64,
    #[command(flatten)]
    pub confine: ConfineArgs,
}

/// Node N's directory.
pub fn node_dir(dir: &Path, node: u32) -> PathBuf {
    dir.join(format!("node-{node}"))
}

/// Node N's agent socket.
pub fn agent_socket(dir: &Path, node: u32) -> PathBuf {
    node_dir(dir, node).join("agent.sock")
}

/// The controller's socket.
pub fn controller_socket(dir: &Path) -> PathBuf {
    dir.join("controller.sock")
}

pub fn run_agent(args: &AgentArgs) -> ExitCode {
    match agent(args) {
        Ok(why) => {
            error(&format!("agent {}: {why}", args.node));
            ExitCode::from(EXIT_FAILED)
        }
        Err(e) => {
            error(&e);
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn agent(args: &AgentArgs) -> Result<String, String> {
    crate::device::require_device(&args.origin, "origin")?;
    crate::device::require_device(&args.store, "store")?;
    let nd = node_dir(&args.dir, args.node);
    std::fs::create_dir_all(&nd).map_err(|e| format!("cannot create {}: {e}", nd.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the csnap binary: {e}"))?;
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut spawner = std::process::Command::new(&exe);
    spawner
        .arg("spawner")
        .arg("--node")
        .arg(args.node.to_string())
        .arg("--listen-dir")
        .arg(&nd)
        .arg("--agent")
        .arg(agent_socket(&args.dir, args.node));
    if let Some(ip) = args.server_listen {
        spawner.arg("--listen-host").arg(ip.to_string());
    }
    spawner
        .arg("--")
        .arg("--origin")
        .arg(abs(&args.origin))
        .arg("--store")
        .arg(abs(&args.store))
        .args(args.confine.child_args())
        .args(&args.server_arg);
    let controller = match &args.controller {
        Some(a) => csnap_io::net::Addr::parse(a).map_err(|e| format!("--controller {a}: {e}"))?,
        None => csnap_io::net::Addr::Unix(controller_socket(&args.dir)),
    };
    let who = format!("csnap agent {}", args.node);
    let opts = csnap_failover::agent::AgentOptions {
        node_id: args.node,
        socket: agent_socket(&args.dir, args.node),
        controller,
        conns: usize::try_from(args.conns).unwrap_or(usize::MAX),
        death_window_ms: args.death_window_ms,
        spawner,
        confinement: args.confine.confinement(Some(csnap_audit::AGENT), &who)?,
        metrics: args
            .metrics
            .as_deref()
            .map(|a| csnap_io::net::Addr::parse(a).map_err(|e| format!("--metrics {a}: {e}")))
            .transpose()?,
    };
    csnap_failover::agent::run(opts)
}

#[derive(Debug, Args)]
pub struct SpawnerArgs {
    #[arg(long)]
    node: u32,
    #[arg(long)]
    listen_dir: PathBuf,
    #[arg(long)]
    agent: PathBuf,
    /// Each server listens on `IP:0` first (the address it announces).
    #[arg(long)]
    listen_host: Option<std::net::IpAddr>,
    /// Arguments for every server.
    #[arg(last = true, allow_hyphen_values = true)]
    server_args: Vec<String>,
}

pub fn run_spawner(args: &SpawnerArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            error(&format!("cannot find the csnap binary: {e}"));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    csnap_failover::spawner::run(&csnap_failover::spawner::SpawnerOptions {
        exe,
        node_id: args.node,
        listen_dir: args.listen_dir.clone(),
        listen_host: args.listen_host,
        server_args: args.server_args.clone(),
        agent_socket: args.agent.clone(),
    });
    ExitCode::SUCCESS
}

/// Placement policy of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Start a server when one is wanted; fail over at once when it dies.
    Auto,
    /// Start only on `csnap cluster start N`.
    Manual,
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub action: ClusterAction,
}

#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Run the controller of a local cluster (membership, messaging between
    /// agents, server placement) until killed.
    Run {
        /// The cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Placement policy.
        #[arg(long, value_enum, default_value_t = PolicyArg::Auto)]
        policy: PolicyArg,
        /// Connections at once.
        #[arg(long, value_name = "N", default_value_t = csnap_pools::CONTROLLER_CONNS_DEFAULT as u64,
              value_parser = clap::value_parser!(u64).range(1..=csnap_pools::CONTROLLER_CONNS_MAX as u64))]
        conns: u64,
        /// Another address to listen on besides `DIR/controller.sock`
        /// (repeatable): `IP:PORT` for agents on other hosts
        /// (`csnap agent --controller IP:PORT`).
        #[arg(long, value_name = "ADDR")]
        listen: Vec<String>,
        /// The crash-loop breaker: this many server deaths (or failed
        /// starts) within --death-window-ms mark the store failed: no more
        /// incarnations until `csnap cluster clear-failed`. 0 turns it off.
        #[arg(long, value_name = "N", default_value_t = csnap_pools::CONTROLLER_SERVER_DEATHS_DEFAULT,
              value_parser = clap::value_parser!(u32).range(0..=i64::from(csnap_pools::CONTROLLER_SERVER_DEATHS_MAX)))]
        max_server_deaths: u32,
        /// The breaker's sliding window, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = csnap_pools::CONTROLLER_DEATH_WINDOW_MS_DEFAULT,
              value_parser = clap::value_parser!(u64).range(1..=csnap_pools::CONTROLLER_DEATH_WINDOW_MS_MAX))]
        death_window_ms: u64,
        #[command(flatten)]
        confine: ConfineArgs,
    },
    /// Clear the store's failed mark (set by the crash-loop breaker after
    /// repeated server deaths): placement resumes. Look at the servers'
    /// logs for why they died first.
    ClearFailed {
        /// The cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Take node N (back) into the cluster.
    Join {
        /// The cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node.
        node: u32,
    },
    /// Node N leaves the cluster and is fenced: its server stops, its agent
    /// gives out no address, its clients' read locks are released.
    Leave {
        /// The cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node.
        node: u32,
    },
    /// Start the server on node N (stopping it first where it runs now);
    /// returns once it serves.
    Start {
        /// The cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node.
        node: u32,
    },
    /// Show the members and where the server runs.
    Status {
        /// The cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Print a JSON object (field names in the README).
        #[arg(long)]
        json: bool,
    },
}

pub fn run_cluster(args: &ClusterArgs) -> ExitCode {
    let r = match &args.action {
        ClusterAction::Run {
            dir,
            policy,
            conns,
            max_server_deaths,
            death_window_ms,
            listen,
            confine,
        } => controller(
            dir,
            *policy,
            *conns,
            (*max_server_deaths, *death_window_ms),
            listen,
            confine,
        ),
        ClusterAction::ClearFailed { dir } => command(dir, ClusterOp::ClearFailed, 1),
        ClusterAction::Join { dir, node } => command(dir, ClusterOp::Join, *node),
        ClusterAction::Leave { dir, node } => command(dir, ClusterOp::Leave, *node),
        ClusterAction::Start { dir, node } => command(dir, ClusterOp::Start, *node),
        ClusterAction::Status { dir, json } => status(dir, *json),
    };
    match r {
        Ok(code) => code,
        Err((code, e)) => {
            error(&e);
            ExitCode::from(code)
        }
    }
}

type CmdResult = Result<ExitCode, (u8, String)>;

fn controller(
    dir: &Path,
    policy: PolicyArg,
    conns: u64,
    (max_server_deaths, death_window_ms): (u32, u64),
    listen: &[String],
    confine: &ConfineArgs,
) -> CmdResult {
    std::fs::create_dir_all(dir)
        .map_err(|e| (EXIT_USAGE, format!("cannot create {}: {e}", dir.display())))?;
    if listen.len() >= csnap_pools::CONTROLLER_LISTENERS_MAX {
        return Err((
            EXIT_USAGE,
            format!(
                "at most {} --listen addresses",
                csnap_pools::CONTROLLER_LISTENERS_MAX - 1
            ),
        ));
    }
    let listen = listen
        .iter()
        .map(|a| {
            csnap_io::net::Addr::parse(a).map_err(|e| (EXIT_USAGE, format!("--listen {a}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let opts = csnap_failover::controller::ControllerOptions {
        socket: controller_socket(dir),
        listen,
        conns: usize::try_from(conns).unwrap_or(usize::MAX),
        policy: match policy {
            PolicyArg::Auto => csnap_fsm::cluster::Policy::Auto,
            PolicyArg::Manual => csnap_fsm::cluster::Policy::Manual,
        },
        max_server_deaths,
        death_window_ms,
        confinement: confine
            .confinement(Some(csnap_audit::CONTROLLER), "csnap cluster")
            .map_err(|e| (EXIT_USAGE, e))?,
    };
    match csnap_failover::controller::run(&opts) {
        Ok(why) => Err((EXIT_FAILED, format!("controller: {why}"))),
        Err(e) => Err((EXIT_USAGE, e)),
    }
}

/// A blocking request to the controller.
fn ask(dir: &Path, msg: &Msg<'_>, on_reply: &mut dyn FnMut(&Msg<'_>) -> CmdResult) -> CmdResult {
    use std::io::{Read, Write};
    let path = controller_socket(dir);
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        (
            EXIT_FAILED,
            format!(
                "cannot reach the cluster controller at {}: {e}",
                path.display()
            ),
        )
    })?;
    let mut buf = vec![0u8; csnap_proto::FRAME_MAX_BYTES];
    let hello = Msg::Hello {
        version_min: csnap_proto::PROTOCOL_VERSION,
        version_max: csnap_proto::PROTOCOL_VERSION,
        role: csnap_proto::Role::Control,
    };
    for (rid, m) in [(0u64, &hello), (1, msg)] {
        let n = csnap_proto::encode(&csnap_proto::Header::new(rid, 0), m, &mut buf)
            .map_err(|e| (EXIT_FAILED, e.to_string()))?;
        s.write_all(&buf[..n])
            .map_err(|e| (EXIT_FAILED, format!("controller: {e}")))?;
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut reader =
        csnap_proto::FrameReader::new(vec![0u8; csnap_proto::FRAME_MAX_BYTES].into_boxed_slice());
    loop {
        if let Some(f) = reader
            .next_frame()
            .map_err(|e| (EXIT_FAILED, format!("controller: {e}")))?
        {
            let (h, m) =
                csnap_proto::decode(f).map_err(|e| (EXIT_FAILED, format!("controller: {e}")))?;
            if h.request_id != 1 {
                if let Msg::Error { text, .. } = m {
                    return Err((EXIT_FAILED, format!("controller: {text}")));
                }
                continue;
            }
            if let Msg::Error { text, .. } = m {
                return Err((EXIT_FAILED, text.to_string()));
            }
            return on_reply(&m);
        }
        let n = s
            .read(reader.spare())
            .map_err(|e| (EXIT_FAILED, format!("controller: {e}")))?;
        if n == 0 {
            return Err((EXIT_FAILED, "the controller closed the connection".into()));
        }
        reader.advance(n);
    }
}

fn command(dir: &Path, op: ClusterOp, node: u32) -> CmdResult {
    if node == 0 {
        return Err((EXIT_USAGE, "node ids start at 1".into()));
    }
    ask(dir, &Msg::ClusterCommand { op, node_id: node }, &mut |_| {
        let line = match op {
            ClusterOp::Join => format!("node {node}: joined\n"),
            ClusterOp::Leave => format!("node {node}: left (fenced)\n"),
            ClusterOp::Start => format!("node {node}: serving\n"),
            ClusterOp::ClearFailed => "store: failed mark cleared; placement resumes\n".into(),
        };
        if output(&line) {
            Ok(ExitCode::SUCCESS)
        } else {
            Ok(ExitCode::from(EXIT_FAILED))
        }
    })
}

fn status(dir: &Path, json: bool) -> CmdResult {
    ask(dir, &Msg::ClusterStatus, &mut |m| {
        if let Some(text) = crate::json::cluster_status(m).filter(|_| json) {
            return if output(&text) {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(EXIT_FAILED))
            };
        }
        let Msg::ClusterStatusReply {
            server_incarnation,
            server_node,
            failed_deaths,
            server_addr,
            nodes,
        } = m
        else {
            return Err((EXIT_FAILED, "unexpected reply".into()));
        };
        let mut text = String::new();
        if *failed_deaths != 0 {
            text.push_str(&format!(
                "store: FAILED after {failed_deaths} server deaths within the window; no server is started until `csnap cluster clear-failed`\n"
            ));
        }
        if *server_incarnation == 0 {
            text.push_str("server: none\n");
        } else {
            text.push_str(&format!(
                "server: incarnation {server_incarnation} on node {server_node} at {server_addr}\n"
            ));
        }
        for n in nodes.iter() {
            use csnap_proto::NodeStatus as S;
            let f = |bit: u8, yes: &str, no: &str| {
                if n.flags & bit != 0 {
                    yes.to_string()
                } else {
                    no.to_string()
                }
            };
            text.push_str(&format!(
                "node {}: {} {} {}{}\n",
                n.node,
                f(S::MEMBER, "member", "not-member"),
                f(S::CONNECTED, "connected", "disconnected"),
                f(S::STANDBY_READY, "standby-ready", "no-standby"),
                if n.flags & S::SERVING != 0 {
                    format!(" serving incarnation {}", n.serving_incarnation)
                } else {
                    String::new()
                }
            ));
        }
        if output(&text) {
            Ok(ExitCode::SUCCESS)
        } else {
            Ok(ExitCode::from(EXIT_FAILED))
        }
    })
}
