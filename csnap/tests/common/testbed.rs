//! A multi-host test bed on one machine (issue #11): N nodes, each in its
//! own network namespace with its own address and its own loop devices over
//! the shared backing files, so that each node has its own page cache as
//! each SAN host has.
//!
//! - Network: one bridge `csb<ID>` in the test's (root) namespace without an
//!   address; node N gets a namespace `csn<ID>-<N>` with a veth pair
//!   (`csv<ID>h<N>` on the bridge, `csv<ID>p<N>` inside) and the address
//!   `10.213.<X>.<N>/24`. The controller (the `local` membership backend)
//!   is a host of its own: namespace `csn<ID>-0`, address
//!   `10.213.<X>.254`. The bridge has no address and no route: the subnet
//!   is reachable only between the test bed's namespaces.
//!   `<ID>` comes from the pid and a counter (names stay within IFNAMSIZ);
//!   the test bed tests are also serialized (`serial`).
//! - Everything between hosts is TCP: each agent reaches the controller at
//!   `10.213.<X>.254:CONTROLLER_PORT` (`csnap agent --controller`), and its
//!   servers listen on the node's address (`--server-listen`), the address
//!   the agents give to clients on every node. A node's unix sockets (its
//!   agent, its NBD server) serve only that node's own processes.
//! - Disks: node N's origin and store are its own loop devices
//!   (`losetup -f --show`) over the shared `origin` and `store` files.
//!   `TestbedOpts::shared_loop` (a debug option) puts every node on one pair
//!   of loop devices instead: one shared page cache, to tell a page-cache
//!   effect from a harness fault.
//! - Processes: the controller runs in its namespace, and so do the test's
//!   snapshot commands (an operator on the controller's host); node N's
//!   agent (with its spawner and servers), NBD server and clients run in
//!   node N's namespace (`ip netns exec`, which execs: the pid is the
//!   program's). Node N's unix sockets live in `cluster/node-N/`; the
//!   controller's unix socket (`cluster/controller.sock`) is the operator's
//!   `csnap cluster` commands' way in, as on a real controller host. NBD
//!   exports are served over TCP on the node's address.
//! - Teardown on drop, also after a failed test: every process of every
//!   namespace is SIGKILLed, the controller killed, the loop devices
//!   detached, the namespaces (and with them the veths) and the bridge
//!   deleted. `kill_node(N)` SIGKILLs every process of node N's namespace.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::cluster::{
    cluster_cmd_in, csnap, s, status_in, text, wait_for, wait_status_in, Daemon, Disks, Io, Rng,
    Status, BIN, TIMEOUT,
};

/// NBD port of every node (each node has its own address).
pub const NBD_PORT: u16 = 10809;
/// The controller's TCP port on its own address.
pub const CONTROLLER_PORT: u16 = 7790;

/// Runs a command to completion; panics on a failure to start.
fn sh(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} {args:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn must(prog: &str, args: &[&str]) -> String {
    let o = sh(prog, args);
    assert!(o.status.success(), "{prog} {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Whether this machine can build a test bed (root, `ip`, `losetup`).
pub fn available() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    root && sh("ip", &["-V"]).status.success() && sh("losetup", &["--version"]).status.success()
}

#[derive(Debug, Clone)]
pub struct TestbedOpts {
    pub nodes: u32,
    pub origin_bytes: usize,
    pub store_size: &'static str,
    /// Debug: every node uses the same loop devices (one page cache).
    pub shared_loop: bool,
    /// Extra arguments of every agent.
    pub agent_args: Vec<String>,
}

impl Default for TestbedOpts {
    /// `CSNAP_TESTBED_SHARED_LOOP=1` sets `shared_loop` for every test (to
    /// tell page-cache failures from others by hand).
    fn default() -> Self {
        TestbedOpts {
            nodes: 2,
            origin_bytes: 4 << 20,
            store_size: "128M",
            shared_loop: std::env::var_os("CSNAP_TESTBED_SHARED_LOOP").is_some_and(|v| v == "1"),
            agent_args: Vec::new(),
        }
    }
}

/// One node of the test bed.
pub struct Node {
    pub n: u32,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the test bed's subnet.
    pub ip: String,
    /// Its origin and store block devices (loop devices).
    pub origin: String,
    pub store: String,
    /// Its directory of unix sockets (`cluster/node-N`).
    pub dir: PathBuf,
    pub agent: Option<Daemon>,
    pub nbd: Option<Daemon>,
}

impl Node {
    pub fn agent_sock(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// `nbd://IP:PORT/EXPORT` of the node's NBD server.
    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}:{NBD_PORT}/{export}", self.ip)
    }

    /// `nbd+unix:///EXPORT?socket=...` of the node's NBD server: its unix
    /// socket in the node's directory, for tools of the node's own context
    /// that cannot enter its namespace (a FUSE mount made inside `ip netns
    /// exec` would stay in that command's mount namespace).
    pub fn unix_url(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    /// A command running `prog` in the node's namespace.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, prog]);
        c
    }

    /// qemu-io on the node's export `export`, one `-c` per command; the
    /// output and whether every command succeeded (exit status and no
    /// "failed"/"error" in the output: a pattern mismatch exits 0).
    pub fn qemu_io(&self, export: &str, cmds: &[&str]) -> (bool, String) {
        let mut c = self.cmd("qemu-io");
        c.args(["-f", "raw", &self.url(export)]);
        for x in cmds {
            c.args(["-c", x]);
        }
        let o = c.output().expect("qemu-io");
        let out = text(&o);
        let ok = o.status.success() && !out.contains("failed") && !out.contains("error");
        (ok, out)
    }
}

pub struct Testbed {
    pub id: String,
    pub bridge: String,
    pub subnet: u8,
    /// The test directory (origin and store files, cluster directory).
    pub dir: PathBuf,
    pub cdir: PathBuf,
    pub origin_file: PathBuf,
    pub store_file: PathBuf,
    /// The origin as formatted.
    pub initial: Vec<u8>,
    pub controller: Option<Daemon>,
    /// The controller host's namespace and `IP:PORT`.
    pub controller_ns: String,
    pub controller_addr: String,
    /// Node N at index N-1.
    pub nodes: Vec<Node>,
    loops: Vec<String>,
    namespaces: Vec<String>,
    opts: TestbedOpts,
    _disks: Disks,
}

/// One test bed at a time in a test binary (a dozen processes each, on a
/// loaded machine); names are unique per process anyway.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    super::cluster::serial()
}

/// The start of every test on the bed: `None` (and a note) where the bed
/// cannot run, else the serial guard to hold for the test.
pub fn enter() -> Option<std::sync::MutexGuard<'static, ()>> {
    if !available() {
        eprintln!("skipped: the test bed needs root, ip and losetup");
        return None;
    }
    Some(serial())
}

impl Testbed {
    /// Builds the network, the loop devices and the per-node directories,
    /// starts the controller and one agent per node; returns once every
    /// node is a connected member with a standby ready.
    pub fn up(name: &str, opts: TestbedOpts, rng: &mut Rng) -> Testbed {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = u64::from(std::process::id());
        // 5 hex digits: pid and counter; names stay within 15 characters.
        let id = format!("{:05x}", ((pid << 4) + k) & 0xf_ffff);
        let subnet = u8::try_from(1 + (pid + k) % 250).expect("subnet");
        let disks = Disks::new(name, opts.origin_bytes, opts.store_size, rng);
        let mut tb = Testbed {
            bridge: format!("csb{id}"),
            id,
            subnet,
            dir: disks.dir.clone(),
            cdir: disks.dir.join("cluster"),
            origin_file: disks.origin.clone(),
            store_file: disks.store.clone(),
            initial: disks.initial.clone(),
            controller: None,
            controller_ns: String::new(),
            controller_addr: String::new(),
            nodes: Vec::new(),
            loops: Vec::new(),
            namespaces: Vec::new(),
            opts,
            _disks: disks,
        };
        must("ip", &["link", "add", &tb.bridge, "type", "bridge"]);
        must("ip", &["link", "set", &tb.bridge, "up"]);
        let shared = if tb.opts.shared_loop {
            Some((
                tb.attach(&tb.origin_file.clone()),
                tb.attach(&tb.store_file.clone()),
            ))
        } else {
            None
        };
        let (ns, ip) = tb.add_host(0, 254);
        tb.controller_ns = ns;
        tb.controller_addr = format!("{ip}:{CONTROLLER_PORT}");
        for n in 1..=tb.opts.nodes {
            let (ns, ip) = tb.add_host(n, n);
            let (origin, store) = match &shared {
                Some(p) => p.clone(),
                None => (
                    tb.attach(&tb.origin_file.clone()),
                    tb.attach(&tb.store_file.clone()),
                ),
            };
            tb.nodes.push(Node {
                n,
                ns,
                ip,
                origin,
                store,
                dir: tb.cdir.join(format!("node-{n}")),
                agent: None,
                nbd: None,
            });
        }
        tb.start_controller();
        for n in 1..=tb.opts.nodes {
            tb.start_agent(n);
        }
        tb.wait_all_ready();
        tb
    }

    /// A host on the bridge: namespace `csn<ID>-<n>`, a veth into the
    /// bridge, address `10.213.<X>.<octet>/24`; returns (namespace, IP).
    fn add_host(&mut self, n: u32, octet: u32) -> (String, String) {
        let ns = format!("csn{}-{n}", self.id);
        must("ip", &["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let host = format!("csv{}h{n}", self.id);
        let peer = format!("csv{}p{n}", self.id);
        must(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        );
        must("ip", &["link", "set", &peer, "netns", &ns]);
        must("ip", &["link", "set", &host, "master", &self.bridge]);
        must("ip", &["link", "set", &host, "up"]);
        let ip = format!("10.213.{}.{octet}", self.subnet);
        let cidr = format!("{ip}/24");
        for a in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &cidr, "dev", &peer],
            vec!["link", "set", &peer, "up"],
        ] {
            let mut v = vec!["netns", "exec", &ns, "ip"];
            v.extend(a);
            must("ip", &v);
        }
        (ns, ip)
    }

    /// A command running `prog` on the controller's host (its namespace).
    pub fn controller_cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.controller_ns, prog]);
        c
    }

    /// The pid of the server listening on `addr` (TCP `IP:PORT` on node
    /// `node`'s address, as the agents give it out).
    pub fn server_pid(&self, node: u32, addr: &str) -> u32 {
        let port = addr.rsplit(':').next().expect("IP:PORT");
        let o = self
            .node(node)
            .cmd("ss")
            .args(["-Htlnp", &format!("sport = :{port}")])
            .output()
            .expect("ss");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let pid = out
            .split("pid=")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok());
        pid.unwrap_or_else(|| panic!("no process listens on {addr} on node {node}: {out:?}"))
    }

    /// The remote addresses of the TCP connections established to `port`
    /// on host namespace `ns` (`ss`).
    fn tcp_peers(ns: &str, port: &str) -> Vec<String> {
        let o = sh(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "ss",
                "-Htn",
                "state",
                "established",
                &format!("sport = :{port}"),
            ],
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .filter_map(|peer| peer.rsplit_once(':').map(|(ip, _)| ip.to_string()))
            .collect()
    }

    /// Every link between hosts is TCP: the controller has a bus
    /// connection from every node's address, and the serving server (at a
    /// TCP address of its node) has a connection from every node in
    /// `clients` (an NBD server or client of that node that has done I/O).
    pub fn assert_links_between_hosts_are_tcp(&self, clients: &[u32]) {
        let bus = Self::tcp_peers(&self.controller_ns, &CONTROLLER_PORT.to_string());
        for node in &self.nodes {
            assert!(
                bus.contains(&node.ip),
                "no bus connection from node {} ({}) at the controller: {bus:?}",
                node.n,
                node.ip
            );
        }
        let st = self.wait("a server serves", |st| st.incarnation > 0);
        let (ip, port) = st
            .addr
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("the server's address is not IP:PORT: {}", st.addr));
        assert_eq!(
            ip,
            self.node(st.node).ip,
            "the server listens on its node's address"
        );
        let peers = Self::tcp_peers(&self.node(st.node).ns, port);
        for &n in clients {
            assert!(
                peers.contains(&self.node(n).ip),
                "no connection from node {n} at the server on node {}: {peers:?}",
                st.node
            );
        }
    }

    /// A loop device over `file`, detached on drop.
    fn attach(&mut self, file: &Path) -> String {
        let dev = must("losetup", &["-f", "--show", s(file)]);
        self.loops.push(dev.clone());
        dev
    }

    /// The loop devices it attached (for the teardown test).
    pub fn loop_devices(&self) -> Vec<String> {
        self.loops.clone()
    }

    pub fn node(&self, n: u32) -> &Node {
        &self.nodes[n as usize - 1]
    }

    pub fn start_controller(&mut self) {
        let d = Daemon::spawn(
            "controller",
            self.controller_cmd(BIN).args([
                "cluster",
                "run",
                "--dir",
                s(&self.cdir),
                "--listen",
                &self.controller_addr,
            ]),
        );
        self.controller = Some(d);
        let sock = self.cdir.join("controller.sock");
        wait_for("the controller listens", TIMEOUT, || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        });
    }

    /// Starts node `n`'s agent in its namespace, on its own loop devices.
    pub fn start_agent(&mut self, n: u32) {
        let node = &self.nodes[n as usize - 1];
        let mut cmd = node.cmd(BIN);
        cmd.args(["agent", "--dir", s(&self.cdir), "--node", &n.to_string()])
            .args(["--origin", &node.origin, "--store", &node.store])
            .args(["--controller", &self.controller_addr])
            .args(["--server-listen", &node.ip])
            .args(&self.opts.agent_args);
        let d = Daemon::spawn(&format!("agent {n}"), &mut cmd);
        self.nodes[n as usize - 1].agent = Some(d);
    }

    /// [`Testbed::up`], then an NBD server on every node.
    pub fn up_with_nbd(name: &str, opts: TestbedOpts, rng: &mut Rng) -> Testbed {
        let nodes = opts.nodes;
        let mut tb = Testbed::up(name, opts, rng);
        for n in 1..=nodes {
            tb.start_nbd(n);
        }
        tb
    }

    /// Starts node `n`'s NBD server in its namespace, listening on TCP at
    /// the node's address; returns once it serves.
    pub fn start_nbd(&mut self, n: u32) {
        let node = &self.nodes[n as usize - 1];
        let listen = format!("{}:{NBD_PORT}", node.ip);
        let mut cmd = node.cmd(BIN);
        cmd.args(["nbd", "--agent", s(&node.agent_sock()), "--node"])
            .arg(n.to_string())
            .args(["--origin", &node.origin, "--store", &node.store])
            .args(["--listen", &listen])
            .arg("--listen")
            .arg(node.dir.join("nbd.sock"));
        let d = Daemon::spawn(&format!("nbd {n}"), &mut cmd);
        let start = Instant::now();
        while !d.log.text().contains("csnap nbd: serving") {
            assert!(
                start.elapsed() < TIMEOUT,
                "node {n}'s NBD server does not serve:\n{}",
                d.log.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.nodes[n as usize - 1].nbd = Some(d);
    }

    /// The whole of export `export` read through node `n`'s NBD server
    /// (`qemu-img convert` in the node's namespace).
    pub fn read_volume(&self, n: u32, export: &str) -> Vec<u8> {
        let node = self.node(n);
        let file = self.dir.join(format!("read-{n}-{export}"));
        let o = node
            .cmd("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &node.url(export)])
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

    /// `csnap snapshot ACTION --server ADDR REST` at the serving server,
    /// from the controller's host (over TCP, as an operator's tool).
    pub fn snapshot(&self, action: &str, rest: &[&str]) -> Output {
        let st = self.wait("a server serves", |st| st.incarnation > 0);
        assert!(
            !st.addr.contains('/'),
            "the server's address is not TCP: {}",
            st.addr
        );
        self.controller_cmd(BIN)
            .args(["snapshot", action, "--server", &st.addr])
            .args(rest)
            .output()
            .expect("csnap snapshot")
    }

    /// `csnap snapshot create TAG`, which must succeed.
    pub fn create_snapshot(&self, tag: &str) {
        let o = self.snapshot("create", &[tag]);
        assert!(o.status.success(), "snapshot create {tag}: {}", text(&o));
    }

    /// The tags `csnap snapshot list` shows.
    pub fn snapshot_tags(&self) -> Vec<u32> {
        let o = self.snapshot("list", &[]);
        assert!(o.status.success(), "snapshot list: {}", text(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split('\t').next()?.parse().ok())
            .collect()
    }

    /// `cluster start N`, which must succeed; returns once node N serves.
    pub fn move_server(&self, n: u32) -> Status {
        let o = self.cluster_cmd("start", &[&n.to_string()]);
        assert!(
            o.status.success(),
            "cluster start {n}: {}\n{}",
            text(&o),
            self.logs(30)
        );
        self.wait(&format!("node {n} serves"), |st| {
            st.incarnation > 0 && st.node == n
        })
    }

    /// Kills every node and the controller (the store is quiet after), then
    /// runs `csnap check` on the store file; returns its output.
    pub fn stop_and_check(&mut self) -> Output {
        for n in 1..=self.opts.nodes {
            self.kill_node(n);
        }
        self.kill_controller();
        csnap(&["check", "--store", s(&self.store_file)])
    }

    /// [`Testbed::stop_and_check`], which must find the store clean.
    pub fn stop_and_assert_clean(&mut self) {
        let o = self.stop_and_check();
        assert!(
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(": clean"),
            "check: {}",
            text(&o)
        );
    }

    /// A `csnap io --agent` client of node `n` on `volume`, in its namespace,
    /// through its agent and its own loop devices.
    pub fn io(&self, volume: &str, client_id: u64, n: u32) -> Io {
        let node = self.node(n);
        let args: Vec<OsString> = [
            "io",
            "--agent",
            s(&node.agent_sock()),
            "--origin",
            &node.origin,
            "--store",
            &node.store,
            "--volume",
            volume,
            "--client-id",
            &client_id.to_string(),
            "--node-id",
            &n.to_string(),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        Io::start_wrapped(
            &format!("io[{volume} #{client_id} node {n}]"),
            &["ip", "netns", "exec", &node.ns],
            &args,
            &self.dir,
            None,
        )
    }

    /// `csnap cluster ACTION --dir D REST`.
    pub fn cluster_cmd(&self, action: &str, rest: &[&str]) -> Output {
        cluster_cmd_in(&self.cdir, action, rest)
    }

    pub fn status(&self) -> Status {
        status_in(&self.cdir)
    }

    /// Polls the status until `f` holds; returns it (the nodes' logs on a
    /// timeout).
    pub fn wait(&self, what: &str, f: impl FnMut(&Status) -> bool) -> Status {
        wait_status_in(&self.cdir, what, f, || self.logs(30))
    }

    pub fn wait_all_ready(&self) -> Status {
        let n = self.opts.nodes as usize;
        self.wait("every node is a member with a standby ready", |st| {
            st.nodes.len() == n
                && st
                    .nodes
                    .iter()
                    .all(|x| x.member && x.connected && x.standby)
        })
    }

    /// The pids of every process in node `n`'s namespace.
    pub fn node_pids(&self, n: u32) -> Vec<u32> {
        let o = sh("ip", &["netns", "pids", &self.nodes[n as usize - 1].ns]);
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Kills the controller (and anything else on its host) and reaps it.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
        if self.controller_ns.is_empty() {
            return;
        }
        let o = sh("ip", &["netns", "pids", &self.controller_ns]);
        for p in String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
        {
            let _ = csnap_sys::send_signal(p, libc::SIGKILL);
        }
    }

    /// "Kill node N": SIGKILLs every process of its namespace (agent,
    /// spawner, servers, NBD server, clients) and reaps the harness's own.
    pub fn kill_node(&mut self, n: u32) {
        let start = Instant::now();
        loop {
            let pids = self.node_pids(n);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = csnap_sys::send_signal(p, libc::SIGKILL);
            }
            if start.elapsed() > TIMEOUT {
                eprintln!("kill_node {n}: processes left in its namespace");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            let node = &mut self.nodes[n as usize - 1];
            for d in [node.agent.as_mut(), node.nbd.as_mut()]
                .into_iter()
                .flatten()
            {
                let _ = d.exited();
            }
        }
        let node = &mut self.nodes[n as usize - 1];
        for d in [node.agent.as_mut(), node.nbd.as_mut()]
            .into_iter()
            .flatten()
        {
            d.kill();
        }
    }

    /// The logs of the controller, agents and NBD servers.
    pub fn logs(&self, lines: usize) -> String {
        let mut t = String::new();
        if let Some(c) = &self.controller {
            t.push_str(&format!("--- controller\n{}\n", c.log.tail(lines)));
        }
        for node in &self.nodes {
            for d in [&node.agent, &node.nbd].into_iter().flatten() {
                t.push_str(&format!("--- {}\n{}\n", d.name, d.log.tail(lines)));
            }
        }
        t
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test bed {} logs:\n{}", self.id, self.logs(40));
        }
        for n in 1..=self.opts.nodes {
            self.kill_node(n);
        }
        self.kill_controller();
        for dev in self.loops.drain(..) {
            let _ = sh("losetup", &["-d", &dev]);
        }
        // Deleting a namespace deletes the veth inside it and so its peer.
        for ns in self.namespaces.drain(..) {
            let _ = sh("ip", &["netns", "del", &ns]);
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
    }
}
