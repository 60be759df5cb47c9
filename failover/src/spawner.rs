//! The spawner: an agent's helper process that starts its standby servers.
//!
//! The agent starts it at init (before it confines itself) with a pipe on
//! its standard input. Each `spawn` line starts one `csnap server --standby
//! --agent ... --listen DIR/server.NODE.SEQ.sock ...`, tied to the spawner
//! (`PR_SET_PDEATHSIG`: it dies with the spawner, which dies with the
//! agent). The spawner reaps its children and removes the socket files they
//! leave behind. When the pipe closes (the agent is gone) it kills every
//! server it started and exits. It is not confined: it is not on the I/O
//! path, and forking and exec'ing is exactly what the agent must not do.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::Duration;

/// What the spawner starts.
#[derive(Debug, Clone)]
pub struct SpawnerOptions {
    /// The csnap binary.
    pub exe: PathBuf,
    /// This node.
    pub node_id: u32,
    /// Where the servers' sockets go.
    pub listen_dir: PathBuf,
    /// This node's IP: every server listens on `IP:0` first, the address
    /// it announces to its agent (a kernel-picked port), then on its unix
    /// socket. `None`: the unix socket only (one host).
    pub listen_host: Option<std::net::IpAddr>,
    /// Arguments after `server --standby --agent SOCK --node N --listen
    /// PATH` (origin, store, pools, confinement flags).
    pub server_args: Vec<String>,
    /// The agent's socket.
    pub agent_socket: PathBuf,
}

/// glibc's malloc tunables for a standby: its own, plus
/// `glibc.malloc.hugetlb=1` (malloc backs its mappings with transparent
/// huge pages, `MADV_HUGEPAGE`). A killed server's sockets close only after
/// the kernel has torn down its locked memory, page by page, so that
/// teardown is the failover's detection time: half of the server's
/// resident set in 2 MiB pages halves it (kill to a broken socket, 25
/// kills of an idle default server on this 2-core VM: p50 2.7 -> 1.4 ms,
/// p90 6.8 -> 3.3 ms). Ignored by a glibc without the tunable or a kernel
/// without THP.
fn tunables() -> String {
    const HUGETLB: &str = "glibc.malloc.hugetlb=1";
    match std::env::var("GLIBC_TUNABLES") {
        Ok(t) if t.contains("glibc.malloc.hugetlb") => t,
        Ok(t) if !t.is_empty() => format!("{t}:{HUGETLB}"),
        _ => HUGETLB.to_string(),
    }
}

/// Runs until standard input closes.
pub fn run(opts: &SpawnerOptions) {
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut children: Vec<(Child, PathBuf)> = Vec::new();
    let mut seq = 0u64;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.trim() == "spawn" => {
                seq += 1;
                let sock = opts
                    .listen_dir
                    .join(format!("server.{}.{seq}.sock", opts.node_id));
                let mut cmd = Command::new(&opts.exe);
                cmd.arg("server")
                    .arg("--standby")
                    .arg("--agent")
                    .arg(&opts.agent_socket)
                    .arg("--node")
                    .arg(opts.node_id.to_string());
                if let Some(ip) = opts.listen_host {
                    cmd.arg("--listen")
                        .arg(std::net::SocketAddr::new(ip, 0).to_string());
                }
                cmd.arg("--listen")
                    .arg(&sock)
                    .args(&opts.server_args)
                    .env("GLIBC_TUNABLES", tunables());
                match csnap_sys::spawn_tied(&mut cmd) {
                    Ok(c) => children.push((c, sock)),
                    Err(e) => eprintln!(
                        "csnap spawner {}: cannot start a standby: {e}",
                        opts.node_id
                    ),
                }
            }
            Ok(other) => eprintln!("csnap spawner {}: unknown command {other:?}", opts.node_id),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        children.retain_mut(|(c, sock)| match c.try_wait() {
            Ok(Some(_)) | Err(_) => {
                let _ = std::fs::remove_file(&*sock);
                false
            }
            Ok(None) => true,
        });
    }
    // The agent is gone: so are its servers.
    for (c, sock) in &mut children {
        let _ = c.kill();
        let _ = c.wait();
        let _ = std::fs::remove_file(&*sock);
    }
}
