//! A corosync + Pacemaker cluster with csnap on the test bed (issue #12),
//! brought up and down by `scripts/hacluster.sh` (the same script an
//! operator runs by hand): N nodes in network namespaces `csn<ID>-N` with
//! mount namespaces of their own, corosync (knet) and Pacemaker on each,
//! stonith through `fence_csnap_ns`, and on each node csnap's relay, agent
//! and NBD server with the node's own loop devices; Pacemaker places the
//! resource `csnap-server` (`ocf:csnap:server`).
//!
//! Teardown on drop (also after a failed test): `hacluster.sh down`, which
//! kills every process of every node, detaches the loop devices and deletes
//! the namespaces, veths and bridge.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::cluster::{text, Io, BIN};

/// The corosync token of the tests' clusters, in ms. 1000 rather than the
/// script's 300: on the shared 2-core test machine a 300 ms token expires
/// now and then under load (a membership change, a node fenced), which is
/// what the benchmark measures, not what these tests are about.
pub const TEST_TOKEN_MS: u32 = 1000;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `csnap-relay` next to the csnap binary under test, built if missing
/// (it is another crate's binary: cargo does not build it for these tests).
pub fn relay_bin() -> PathBuf {
    let bin = Path::new(BIN).with_file_name("csnap-relay");
    if !bin.exists() {
        let release = BIN.contains("/release/");
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.args(["build", "-p", "csnap-relay"]).current_dir(repo());
        if release {
            c.arg("--release");
        }
        let o = c.output().expect("cargo build -p csnap-relay");
        assert!(o.status.success(), "building csnap-relay: {}", text(&o));
    }
    bin
}

/// Whether this machine can run the cluster (root, corosync, Pacemaker).
pub fn available() -> bool {
    super::testbed::available()
        && Path::new("/usr/sbin/corosync").exists()
        && Path::new("/usr/sbin/pacemakerd").exists()
}

/// The status as one node's relay sees it (`csnap cluster status`).
#[derive(Debug, Clone, Default)]
pub struct HaStatus {
    pub incarnation: u64,
    pub node: u32,
    pub addr: String,
    pub text: String,
}

/// A running cluster.
#[derive(Debug)]
pub struct HaCluster {
    pub dir: PathBuf,
    pub id: String,
    pub x: u32,
    pub nodes: u32,
}

impl HaCluster {
    /// Brings up `nodes` nodes with csnap and waits until a node serves.
    pub fn up(name: &str, nodes: u32) -> HaCluster {
        let dir = super::fresh_dir("hacluster", name);
        let relay = relay_bin();
        let o = Command::new(repo().join("scripts/hacluster.sh"))
            .args([
                "up",
                dir.to_str().expect("utf-8"),
                &nodes.to_string(),
                "--csnap",
            ])
            .env("CSNAP", BIN)
            .env("CSNAP_RELAY", &relay)
            .env("CSNAP_HA_TOKEN_MS", TEST_TOKEN_MS.to_string())
            .output()
            .expect("hacluster.sh up");
        let env = std::fs::read_to_string(dir.join("hacluster.env")).unwrap_or_default();
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap_or_default()
        };
        let c = HaCluster {
            dir: dir.clone(),
            id: get("ID"),
            x: get("X").parse().unwrap_or(0),
            nodes,
        };
        assert!(o.status.success(), "hacluster.sh up: {}", text(&o));
        c
    }

    pub fn ns(&self, n: u32) -> String {
        format!("csn{}-{n}", self.id)
    }

    pub fn ip(&self, n: u32) -> String {
        format!("10.213.{}.{n}", self.x)
    }

    /// A command run in node `n`'s network and mount namespaces.
    pub fn cmd(&self, n: u32, prog: &str) -> Command {
        let mut c = Command::new(repo().join("scripts/hacluster.sh"));
        c.args([
            "exec",
            self.dir.to_str().expect("utf-8"),
            &n.to_string(),
            prog,
        ]);
        c
    }

    /// The status seen from node `n`'s relay; `None` if it cannot be asked.
    pub fn status(&self, n: u32) -> Option<HaStatus> {
        let o = self
            .cmd(n, BIN)
            .args(["cluster", "status", "--dir", "/run/csnap"])
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        let t = String::from_utf8_lossy(&o.stdout).to_string();
        let mut st = HaStatus {
            text: t.clone(),
            ..HaStatus::default()
        };
        if let Some(l) = t.lines().find(|l| l.starts_with("server: incarnation ")) {
            let w: Vec<&str> = l.split_whitespace().collect();
            // server: incarnation I on node N at ADDR
            st.incarnation = w.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
            st.node = w.get(5).and_then(|v| v.parse().ok()).unwrap_or(0);
            st.addr = w.get(7).map(|s| (*s).to_string()).unwrap_or_default();
        }
        Some(st)
    }

    /// Waits (up to `t`) until node `n`'s relay shows a status with `f`.
    pub fn wait(&self, n: u32, what: &str, t: Duration, f: impl Fn(&HaStatus) -> bool) -> HaStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.status(n) {
                if f(&st) {
                    return st;
                }
            }
            assert!(
                start.elapsed() < t,
                "{what}: not within {t:?} (seen from node {n}); {}",
                self.logs(n, 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pids of node `n`'s namespace.
    pub fn pids(&self, n: u32) -> Vec<u32> {
        let o = Command::new("ip")
            .args(["netns", "pids", &self.ns(n)])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The pid of node `n`'s process named `comm` (first found).
    pub fn pid_of(&self, n: u32, comm: &str) -> Option<u32> {
        self.pids(n).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
    }

    /// SIGKILLs every process of node `n`, corosync and Pacemaker included.
    pub fn kill_node(&self, n: u32) {
        let start = Instant::now();
        loop {
            let pids = self.pids(n);
            if pids.is_empty() {
                return;
            }
            for p in pids {
                let _ = csnap_sys::send_signal(p, libc::SIGKILL);
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node {n} does not die"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// qemu-io on node `n`'s export `export` (over TCP at the node's
    /// address); whether every command succeeded, and the output.
    pub fn qemu_io(&self, n: u32, export: &str, cmds: &[String]) -> (bool, String) {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(n), "qemu-io", "-f", "raw"]);
        c.arg(format!("nbd://{}:10809/{export}", self.ip(n)));
        for x in cmds {
            c.args(["-c", x]);
        }
        let o = c.output().expect("qemu-io");
        let out = text(&o);
        let ok = o.status.success() && !out.contains("failed") && !out.contains("error");
        (ok, out)
    }

    /// The whole of export `export` read through node `n`'s NBD server.
    pub fn read_volume(&self, n: u32, export: &str) -> Vec<u8> {
        let file = self.dir.join(format!("read-{n}-{export}"));
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(n),
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
            ])
            .arg(format!("nbd://{}:10809/{export}", self.ip(n)))
            .arg(&file)
            .output()
            .expect("qemu-img");
        assert!(
            o.status.success(),
            "qemu-img convert {export} on node {n}: {}",
            text(&o)
        );
        let v = std::fs::read(&file).expect("converted volume");
        let _ = std::fs::remove_file(&file);
        v
    }

    /// `csnap snapshot ACTION --server ADDR REST` from node `n` to the
    /// serving server.
    pub fn snapshot(&self, n: u32, action: &str, rest: &[&str]) -> Output {
        let st = self.wait(n, "a server serves", Duration::from_secs(60), |s| {
            s.incarnation > 0
        });
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(n),
                BIN,
                "snapshot",
                action,
                "--server",
                &st.addr,
            ])
            .args(rest)
            .output()
            .expect("csnap snapshot")
    }

    /// The successful fencings of node `m` in the fencer's history, asked
    /// on node `n` (`--verbose`: without it the fencer shows one success
    /// only).
    pub fn fenced_count(&self, n: u32, m: u32) -> usize {
        let o = self
            .cmd(n, "stonith_admin")
            .args(["--history", &format!("n{m}"), "--verbose"])
            .output()
            .expect("stonith_admin");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains(&format!(" of n{m} successful")))
            .count()
    }

    /// Delays every fencing of node `m` by `delay` (its stonith device's
    /// `pcmk_delay_base`), set through node `n`.
    pub fn delay_fencing(&self, n: u32, m: u32, delay: &str) {
        let o = self
            .cmd(n, "crm_resource")
            .args([
                "--resource",
                &format!("fence-n{m}"),
                "--set-parameter",
                "pcmk_delay_base",
                "--parameter-value",
                delay,
            ])
            .output()
            .expect("crm_resource");
        assert!(o.status.success(), "crm_resource: {}", text(&o));
    }

    /// Node `n`'s relay log.
    pub fn relay_log(&self, n: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{n}/relay.log"))).unwrap_or_default()
    }

    /// The last lines of node `n`'s relay and agent logs.
    pub fn logs(&self, n: u32, lines: usize) -> String {
        let mut out = String::new();
        for f in ["relay.log", "agent.log", "nbd.log"] {
            let t =
                std::fs::read_to_string(self.dir.join(format!("node-{n}/{f}"))).unwrap_or_default();
            let v: Vec<&str> = t.lines().collect();
            out.push_str(&format!("--- node {n} {f}\n"));
            for l in &v[v.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Cuts node `n` off (its veth on the bridge down) or heals it.
    pub fn set_link(&self, n: u32, up: bool) {
        let o = Command::new("ip")
            .args([
                "link",
                "set",
                &format!("csv{}h{n}", self.id),
                if up { "up" } else { "down" },
            ])
            .output()
            .expect("ip link");
        assert!(o.status.success(), "ip link: {}", text(&o));
    }

    /// Starts node `n` again after it was fenced or killed: corosync,
    /// Pacemaker and csnap (`hacluster.sh restart`).
    pub fn restart_node(&self, n: u32) {
        let o = Command::new(repo().join("scripts/hacluster.sh"))
            .args(["restart", self.dir.to_str().expect("utf-8"), &n.to_string()])
            .env("CSNAP", BIN)
            .env("CSNAP_RELAY", relay_bin())
            .output()
            .expect("hacluster.sh restart");
        assert!(o.status.success(), "hacluster.sh restart {n}: {}", text(&o));
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        let o = Command::new(repo().join("scripts/hacluster.sh"))
            .args(["down", self.dir.to_str().expect("utf-8")])
            .output();
        if let Ok(o) = o {
            if !o.status.success() {
                eprintln!("hacluster.sh down: {}", text(&o));
            }
        }
    }
}

impl HaCluster {
    /// The pid of node `n`'s process whose command line contains every one
    /// of `words` (as whole arguments).
    pub fn pid_by_args(&self, n: u32, words: &[&str]) -> Option<u32> {
        self.pids(n).into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                words.iter().all(|w| args.contains(&w.as_bytes()))
            })
        })
    }

    /// `csnap io` in node `n`'s namespaces, through its agent, with its
    /// own loop devices (the last two `hacluster.sh` attached for it), as
    /// client `client_id` of volume `volume`.
    pub fn io(&self, n: u32, volume: &str, client_id: u64) -> Io {
        let loops = std::fs::read_to_string(self.dir.join(format!("node-{n}/loops")))
            .expect("the node's loop devices");
        let l: Vec<&str> = loops.lines().collect();
        let [origin, store] = l[l.len().saturating_sub(2)..] else {
            panic!("node {n}: no origin and store loop devices in {loops:?}");
        };
        let agent = self.dir.join(format!("cluster/node-{n}/agent.sock"));
        let script = repo().join("scripts/hacluster.sh");
        let (dir, node) = (self.dir.to_str().expect("utf-8"), n.to_string());
        let args: Vec<std::ffi::OsString> = [
            "io",
            "--agent",
            agent.to_str().expect("utf-8"),
            "--origin",
            origin,
            "--store",
            store,
            "--volume",
            volume,
            "--client-id",
            &client_id.to_string(),
            "--node-id",
            &node,
        ]
        .iter()
        .map(Into::into)
        .collect();
        Io::start_wrapped(
            &format!("io[{volume} #{client_id} node {n}]"),
            &[script.to_str().expect("utf-8"), "exec", dir, &node],
            &args,
            &self.dir,
            None,
        )
    }

    /// Waits until node `n` is a member with a ready standby, as node
    /// `from`'s relay sees it.
    pub fn wait_standby(&self, from: u32, n: u32, t: Duration) -> HaStatus {
        let line = format!("node {n}: member connected standby-ready");
        self.wait(from, &format!("node {n} is a standby again"), t, |s| {
            s.text.lines().any(|l| l.starts_with(&line))
        })
    }
}

/// What a writer thread needs to reach the nodes' exports, without a
/// reference to the cluster (whose drop must not wait for it).
#[derive(Debug, Clone)]
pub struct Target {
    id: String,
    x: u32,
}

impl Target {
    /// qemu-io on node `n`'s export `export` (over TCP at the node's
    /// address); whether every command succeeded, and the output.
    pub fn qemu_io(&self, n: u32, export: &str, cmds: &[String]) -> (bool, String) {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &format!("csn{}-{n}", self.id),
            "qemu-io",
            "-f",
            "raw",
        ]);
        c.arg(format!("nbd://10.213.{}.{n}:10809/{export}", self.x));
        for x in cmds {
            c.args(["-c", x]);
        }
        let o = c.output().expect("qemu-io");
        let out = text(&o);
        let ok = o.status.success() && !out.contains("failed") && !out.contains("error");
        (ok, out)
    }
}

impl HaCluster {
    pub fn target(&self) -> Target {
        Target {
            id: self.id.clone(),
            x: self.x,
        }
    }
}
