//! `csnap up`: the embedded default, a one-node cluster on local files
//! whose volumes are exported over NBD.
//!
//! In DIR (default `./csnap-up`): `origin.img` and `store.img` (made and
//! formatted on first use, reused after), the local cluster in
//! `DIR/cluster` (its controller, node 1's agent with its standby and
//! serving server), and the NBD server on `DIR/nbd.sock` (plus any
//! `--listen` address). Each part is a child process tied to `csnap up`
//! (it dies with it); their logs go to `DIR/log/`. `csnap up` prints the
//! export URLs and serves until SIGINT or SIGTERM, then stops the NBD
//! server first (it finishes what is in flight and flushes both devices),
//! then the agent (and with it the server, whose metadata is committed
//! before every reply), then the controller.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use csnap_sys::supervise::Sig;

use crate::agent_cmd::{agent_socket, controller_socket};
use crate::{error, output, EXIT_FAILED, EXIT_USAGE};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the files, sockets and logs live (made on first use).
    #[arg(long, value_name = "DIR", default_value = "csnap-up")]
    pub dir: PathBuf,
    /// Another address the NBD server listens on (host:port or a unix
    /// path), besides DIR/nbd.sock. Repeatable.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Serve the node's Prometheus metrics at `GET /metrics` on ADDR
    /// (host:port, or a unix socket path): the NBD server's endpoint, which
    /// asks the csnap server for its figures at each scrape.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Size of the origin volume made on first use.
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_store_size,
          default_value = "1G")]
    pub origin_size: u64,
    /// Size of the snapshot store made on first use.
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_store_size,
          default_value = "2G")]
    pub store_size: u64,
    #[command(flatten)]
    pub confine: crate::agent_cmd::ConfineArgs,
}

struct Part {
    name: &'static str,
    child: Child,
}

impl Drop for Part {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find the csnap binary: {e}"))
}

fn start(name: &'static str, dir: &Path, args: &[String]) -> Result<Part, String> {
    let log_dir = dir.join("log");
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
    let log = std::fs::File::create(log_dir.join(format!("{name}.log")))
        .map_err(|e| format!("cannot create the {name} log: {e}"))?;
    let mut cmd = Command::new(exe()?);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    let child =
        csnap_sys::spawn_tied(&mut cmd).map_err(|e| format!("cannot start the {name}: {e}"))?;
    Ok(Part { name, child })
}

fn wait_for(
    what: &str,
    parts: &mut [Part],
    deadline: Instant,
    ready: &dyn Fn() -> bool,
) -> Result<(), String> {
    loop {
        if ready() {
            return Ok(());
        }
        for p in parts.iter_mut() {
            if let Ok(Some(st)) = p.child.try_wait() {
                return Err(format!(
                    "the {} exited ({st}) while waiting for {what}",
                    p.name
                ));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(args: &UpArgs) -> ExitCode {
    match up(args) {
        Ok(code) => code,
        Err((code, e)) => {
            error(&e);
            ExitCode::from(code)
        }
    }
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// First use: a sparse origin and a formatted store; later ones reuse
/// them (said either way).
fn make_or_reuse(args: &UpArgs, origin: &Path, store: &Path) -> Result<(), (u8, String)> {
    let fail = |e: String| (EXIT_FAILED, e);
    if !store.exists() {
        // First use: a sparse origin and a formatted store.
        let f = std::fs::File::create(origin)
            .map_err(|e| fail(format!("cannot create {}: {e}", origin.display())))?;
        f.set_len(args.origin_size)
            .map_err(|e| fail(format!("cannot size {}: {e}", origin.display())))?;
        let st = Command::new(exe().map_err(fail)?)
            .args(["format", "--origin"])
            .arg(origin)
            .arg("--store")
            .arg(store)
            .arg("--store-size")
            .arg(args.store_size.to_string())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| fail(format!("cannot run csnap format: {e}")))?;
        if !st.success() {
            let _ = std::fs::remove_file(store);
            return Err(fail(format!("csnap format failed ({st})")));
        }
        output(&format!(
            "csnap up: made {} ({} bytes) and its snapshot store {}\n",
            origin.display(),
            args.origin_size,
            store.display()
        ));
    } else if !origin.exists() {
        return Err((
            EXIT_USAGE,
            format!(
                "{} exists but {} does not",
                store.display(),
                origin.display()
            ),
        ));
    } else {
        let size = std::fs::metadata(origin).map(|m| m.len()).unwrap_or(0);
        output(&format!(
            "csnap up: reusing {} ({size} bytes) and its snapshot store {} \
             (--origin-size and --store-size apply to a first use only)\n",
            origin.display(),
            store.display()
        ));
    }
    Ok(())
}

/// What `up` serves, and how to reach and stop it.
fn banner(
    args: &UpArgs,
    dir: &Path,
    info: &csnap_io::client::ServerInfo,
    nbd_sock: &Path,
) -> String {
    let mut text = format!(
        "csnap up: serving {} (server incarnation {} at {})\n\
         \x20 origin export:    nbd+unix:///origin?socket={}\n",
        dir.display(),
        info.incarnation,
        info.addr,
        nbd_sock.display()
    );
    for l in &args.listen {
        if l.contains(':') && !l.contains('/') {
            text.push_str(&format!("  origin over TCP:  nbd://{l}/origin\n"));
        }
    }
    if let Some(m) = &args.metrics {
        text.push_str(&format!("  metrics:          GET /metrics at {m}\n"));
    }
    text.push_str(&format!(
        "  snapshot exports: nbd+unix:///TAG?socket={} (one per snapshot, by tag)\n\
         \x20 create one:       csnap snapshot create --dir {} TAG\n\
         \x20 list exports:     nbdinfo --list 'nbd+unix:///?socket={}'\n\
         \x20 status:           csnap status --dir {}\n\
         \x20 logs:             {}/log/\n\
         \x20 stop:             Ctrl-C or SIGTERM\n",
        nbd_sock.display(),
        dir.display(),
        nbd_sock.display(),
        dir.display(),
        dir.display()
    ));
    text
}

/// Waits for a stop signal (`None`) or a part that died (why).
fn supervise(parts: &mut [Part], dir: &Path) -> Option<String> {
    loop {
        match csnap_sys::supervise::wait(Duration::from_millis(500)) {
            Ok(Some(Sig::Int | Sig::Term | Sig::Hup)) => break None,
            Ok(_) => {}
            Err(e) => break Some(format!("waiting for signals failed: {e}")),
        }
        if let Some(p) = parts
            .iter_mut()
            .find_map(|p| matches!(p.child.try_wait(), Ok(Some(_))).then_some(p.name))
        {
            break Some(format!(
                "the {p} exited; stopping (see {}/log/{p}.log)",
                dir.display(),
            ));
        }
    }
}

/// Stops the parts, last started first: the NBD server (it flushes), then
/// the agent (and its server), then the controller; one that does not stop
/// within 10 s is killed.
fn stop(mut parts: Vec<Part>) {
    while let Some(mut p) = parts.pop() {
        let _ = csnap_sys::supervise::send(p.child.id(), false);
        let t = Instant::now();
        loop {
            if let Ok(Some(_)) = p.child.try_wait() {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                error(&format!(
                    "the {} did not stop within 10 s; killing it",
                    p.name
                ));
                let _ = p.child.kill();
                let _ = p.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The NBD server's arguments: its agent, the devices, its listeners
/// (the unix socket and `--listen`), `--metrics`, the confinement flags.
fn nbd_args(
    args: &UpArgs,
    agent_sock: &Path,
    (origin, store): (&Path, &Path),
    nbd_sock: &Path,
    confine: &[String],
) -> Vec<String> {
    let mut nbd_args = vec!["nbd".into(), "--agent".into(), path_arg(agent_sock)];
    nbd_args.extend(["--node".into(), "1".into()]);
    nbd_args.extend(devices(origin, store));
    nbd_args.extend(["--listen".into(), path_arg(nbd_sock)]);
    for l in &args.listen {
        nbd_args.push("--listen".into());
        nbd_args.push(l.clone());
    }
    if let Some(m) = &args.metrics {
        nbd_args.push("--metrics".into());
        nbd_args.push(m.clone());
    }
    nbd_args.extend(confine.iter().cloned());
    nbd_args
}

/// `--origin ORIGIN --store STORE`.
fn devices(origin: &Path, store: &Path) -> [String; 4] {
    [
        "--origin".into(),
        path_arg(origin),
        "--store".into(),
        path_arg(store),
    ]
}

fn up(args: &UpArgs) -> Result<ExitCode, (u8, String)> {
    let usage = |e: String| (EXIT_USAGE, e);
    let failed = |e: String| (EXIT_FAILED, e);
    if let Some(m) = &args.metrics {
        csnap_io::net::Addr::parse(m).map_err(|e| usage(format!("--metrics {m}: {e}")))?;
    }
    // Signals first: every part inherits an empty mask, and a Ctrl-C during
    // start-up is handled like one later.
    csnap_sys::supervise::block_termination()
        .map_err(|e| failed(format!("cannot block signals: {e}")))?;
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| usage(format!("cannot create {}: {e}", args.dir.display())))?;
    let dir = std::fs::canonicalize(&args.dir)
        .map_err(|e| usage(format!("{}: {e}", args.dir.display())))?;
    let origin = dir.join("origin.img");
    let store = dir.join("store.img");
    let cluster = dir.join("cluster");
    let nbd_sock = dir.join("nbd.sock");
    make_or_reuse(args, &origin, &store)?;
    let confine = args.confine.child_args();
    let mut parts: Vec<Part> = Vec::new();
    let mut ctl_args = vec![
        "cluster".into(),
        "run".into(),
        "--dir".into(),
        path_arg(&cluster),
    ];
    ctl_args.extend(confine.iter().cloned());
    parts.push(start("controller", &dir, &ctl_args).map_err(failed)?);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ctl_sock = controller_socket(&cluster);
    wait_for("the controller", &mut parts, deadline, &|| {
        std::os::unix::net::UnixStream::connect(&ctl_sock).is_ok()
    })
    .map_err(failed)?;
    let mut agent_args = vec!["agent".into(), "--dir".into(), path_arg(&cluster)];
    agent_args.extend(["--node".into(), "1".into()]);
    agent_args.extend(devices(&origin, &store));
    agent_args.extend(confine.iter().cloned());
    parts.push(start("agent", &dir, &agent_args).map_err(failed)?);
    let agent_sock = agent_socket(&cluster, 1);
    wait_for("the agent", &mut parts, deadline, &|| {
        std::os::unix::net::UnixStream::connect(&agent_sock).is_ok()
    })
    .map_err(failed)?;
    // The server starts on first demand; ask for it now so `up` reports a
    // serving cluster.
    let info = csnap_io::client::locate(&agent_sock, Duration::from_secs(30))
        .map_err(|e| failed(format!("no server started: {e}")))?;
    let nbd_args = nbd_args(args, &agent_sock, (&origin, &store), &nbd_sock, &confine);
    parts.push(start("nbd", &dir, &nbd_args).map_err(failed)?);
    wait_for("the NBD server", &mut parts, deadline, &|| {
        std::os::unix::net::UnixStream::connect(&nbd_sock).is_ok()
    })
    .map_err(failed)?;
    let text = banner(args, &dir, &info, &nbd_sock);
    if !output(&text) {
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    let why = supervise(&mut parts, &dir);
    output("csnap up: stopping\n");
    stop(parts);
    match why {
        None => {
            output("csnap up: stopped; everything is on disk\n");
            Ok(ExitCode::SUCCESS)
        }
        Some(e) => Err(failed(e)),
    }
}
