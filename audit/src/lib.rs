//! The audited syscall whitelist, per phase and thread kind, kept as data.
//!
//! Every rule names the syscall, why it is needed and who calls it. The
//! server compiles these tables with seccompiler at init (`csnap-sys`) and
//! installs them per thread as it enters the serving phase, after
//! `PR_SET_NO_NEW_PRIVS`; any other syscall traps, and the SIGSYS reporter
//! prints its number and exits the process with status 159.
//!
//! Phases:
//! - **init**: no filter. Config parsing, opening the devices, reading the
//!   label and superblock, journal replay, the incarnation commit, binding
//!   listeners, spawning the worker, reserving pools, `mlockall`, prefaulting,
//!   sealing the heap, compiling the filters.
//! - **serving**: the tables below, one per thread kind.
//! - **standby** and **failover-start**: come with the failover issue (#5),
//!   whose standby server waits for "start" under its own, smaller table.
//!
//! The other confined processes have one table each, installed once their
//! pools exist: the agent (`AGENT`), the local cluster controller
//! (`CONTROLLER`) and the NBD server (`NBD`).
//!
//! The audit test (`tests/audit.rs`) runs the shipped `csnap server` under
//! `strace -f` through a workload that exercises every serving path and
//! fails on a syscall made in the serving phase that no rule allows, and on a
//! rule the workload never used (except rules marked `exercised: false`, each
//! of which says why the workload cannot reach it).

/// One whitelist entry.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Syscall name as strace prints it.
    pub name: &'static str,
    /// Syscall number (x86_64).
    pub nr: i64,
    /// Who calls it and why.
    pub why: &'static str,
    /// Whether the audit workload exercises it (false: an exit or error path
    /// it cannot reach; the reason is in `why`).
    pub exercised: bool,
}

const fn rule(name: &'static str, nr: i64, why: &'static str) -> Rule {
    Rule {
        name,
        nr,
        why,
        exercised: true,
    }
}

const fn exit_path(name: &'static str, nr: i64, why: &'static str) -> Rule {
    Rule {
        name,
        nr,
        why,
        exercised: false,
    }
}

/// A rule only a standby started by an agent (`--agent`) uses; the
/// stdin-started standby of the audit test does not reach it.
const fn agent_rule(name: &'static str, nr: i64, why: &'static str) -> Rule {
    Rule {
        name,
        nr,
        why,
        exercised: false,
    }
}

/// A rule only a contended start reaches (the standby waits for the store
/// lock of a server on the same host that is still exiting); the audit
/// workload has no such server.
const fn contended(name: &'static str, nr: i64, why: &'static str) -> Rule {
    Rule {
        name,
        nr,
        why,
        exercised: false,
    }
}

/// A rule only a standby's takeover claim uses (its store worker sleeps
/// out the former server's lease, `Standby::claim`); a server started by
/// hand claims at init, before its filters, so the serving audit does not
/// reach it. The standby audit requires it.
const fn takeover(name: &'static str, nr: i64, why: &'static str) -> Rule {
    Rule {
        name,
        nr,
        why,
        exercised: false,
    }
}

/// Thread kinds of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The mio event loop (the process's main thread).
    Network,
    /// The store worker.
    Store,
}

/// Serving phase, network thread.
pub const SERVING_NETWORK: &[Rule] = &[
    rule("epoll_wait", libc::SYS_epoll_wait, "mio Poll::poll: the event loop's wait"),
    rule("accept4", libc::SYS_accept4, "mio listeners: accept a client (unix and TCP)"),
    rule("epoll_ctl", libc::SYS_epoll_ctl, "mio register/deregister of accepted connections"),
    rule("recvfrom", libc::SYS_recvfrom, "mio stream read of client frames"),
    rule("sendto", libc::SYS_sendto, "mio stream write of replies"),
    rule("close", libc::SYS_close, "dropping a closed connection's socket"),
    rule("setsockopt", libc::SYS_setsockopt, "TCP_NODELAY on accepted TCP connections"),
    rule("futex", libc::SYS_futex, "the store rings' mutex and condvar (csnap_io::ring)"),
    rule(
        "write",
        libc::SYS_write,
        "stderr lines: the \"serving\" line right after the filter is installed, and events (store full: auto-deleted snapshot; store failure)",
    ),
    exit_path(
        "exit_group",
        libc::SYS_exit_group,
        "process exit after a store failure, and the SIGSYS reporter's exit",
    ),
    exit_path(
        "rt_sigreturn",
        libc::SYS_rt_sigreturn,
        "return from a signal handler; the only handler (SIGSYS) exits instead",
    ),
];

/// Standby and failover-start phases, network (main) thread: what the main
/// thread needs on top of its serving table. A standby waits for "start" on
/// its standard input, then drives the start; its filter stays installed
/// under the serving table, which is stacked on top when serving begins, so
/// the standby filter allows both (`standby_network`).
pub const STANDBY_EXTRA_NETWORK: &[Rule] = &[
    rule(
        "read",
        libc::SYS_read,
        "the standby waits for its start command on standard input",
    ),
    rule(
        "flock",
        libc::SYS_flock,
        "failover start: the exclusive lock on the store",
    ),
    rule(
        "seccomp",
        libc::SYS_seccomp,
        "installing the serving table on top when serving begins",
    ),
    rule(
        "prctl",
        libc::SYS_prctl,
        "PR_SET_NO_NEW_PRIVS before the serving table (seccompiler sets it again)",
    ),
    contended(
        "clock_nanosleep",
        libc::SYS_clock_nanosleep,
        "failover start: the pause between attempts at the store lock while the server this one replaces on the same host is still exiting (std::thread::sleep)",
    ),
    agent_rule(
        "ioctl",
        libc::SYS_ioctl,
        "FIONBIO: the link to the node's agent turns non-blocking for the serving loop",
    ),
];

/// The standby filter of the main thread: its serving table plus
/// `STANDBY_EXTRA_NETWORK`. Init only (it allocates).
pub fn standby_network() -> Vec<Rule> {
    let mut v: Vec<Rule> = SERVING_NETWORK.to_vec();
    v.extend_from_slice(STANDBY_EXTRA_NETWORK);
    v
}

/// Serving phase, store worker thread.
pub const SERVING_STORE: &[Rule] = &[
    rule(
        "futex",
        libc::SYS_futex,
        "waiting on the request ring (csnap_io::ring)",
    ),
    rule(
        "pread64",
        libc::SYS_pread64,
        "metadata cache misses, copy-out reads of origin and store chunks",
    ),
    rule(
        "pwrite64",
        libc::SYS_pwrite64,
        "copy-out writes, journal writes, home writes of metadata blocks",
    ),
    rule(
        "fdatasync",
        libc::SYS_fdatasync,
        "the two flushes of every commit",
    ),
    rule(
        "write",
        libc::SYS_write,
        "waking the network thread (mio Waker's eventfd); a standby's takeover line and the one stderr line naming a disk failure that stops the server",
    ),
    takeover(
        "clock_nanosleep",
        libc::SYS_clock_nanosleep,
        "a standby's takeover claim: the wait (SERVER_TAKEOVER_WAIT_MS) for a former server's lease to run out before the store is read (std::thread::sleep)",
    ),
    exit_path(
        "exit_group",
        libc::SYS_exit_group,
        "the SIGSYS reporter's exit (the worker never exits while serving)",
    ),
    exit_path(
        "rt_sigreturn",
        libc::SYS_rt_sigreturn,
        "return from a signal handler; the only handler (SIGSYS) exits instead",
    ),
];

/// The agent (`csnap agent`), single-threaded, once its pools exist: the
/// whole failover path on the agent's side (taking a start from the bus,
/// gathering the expected clients, starting its standby, announcing the new
/// server, answering its clients) runs under this table. Audited under
/// strace by `agent_syscalls_match_the_audited_whitelist` (tests/audit.rs:
/// every rule used, nothing else made) and, on the failover path, by
/// `the_failover_path_makes_only_audited_syscalls` (tests/failover.rs).
pub const AGENT: &[Rule] = &[
    rule(
        "epoll_wait",
        libc::SYS_epoll_wait,
        "mio Poll::poll: the event loop's wait (with the next deadline as timeout)",
    ),
    rule(
        "accept4",
        libc::SYS_accept4,
        "a client, tool or server connecting to the agent's socket",
    ),
    rule(
        "epoll_ctl",
        libc::SYS_epoll_ctl,
        "mio register/deregister of connections and of the bus link",
    ),
    rule(
        "recvfrom",
        libc::SYS_recvfrom,
        "reading frames from connections and the bus",
    ),
    rule(
        "sendto",
        libc::SYS_sendto,
        "writing frames to connections and the bus",
    ),
    rule(
        "close",
        libc::SYS_close,
        "dropping a closed connection, a broken bus link, or the socket of a bus connect that failed",
    ),
    rule(
        "write",
        libc::SYS_write,
        "`spawn` on the spawner's pipe (a new standby), and stderr event lines",
    ),
    rule(
        "socket",
        libc::SYS_socket,
        "the bus link to the membership backend: its first connect is made by the confined loop (strace: after the filter install), and it is re-made after it broke",
    ),
    rule(
        "connect",
        libc::SYS_connect,
        "the bus link to the membership backend: first connect, and again after it broke",
    ),
    rule(
        "setsockopt",
        libc::SYS_setsockopt,
        "TCP_NODELAY on a bus link over TCP (`--controller IP:PORT`: the controller on another host)",
    ),
    exit_path(
        "exit_group",
        libc::SYS_exit_group,
        "process exit when the loop fails, and the SIGSYS reporter's exit",
    ),
    exit_path(
        "rt_sigreturn",
        libc::SYS_rt_sigreturn,
        "return from a signal handler; the only handler (SIGSYS) exits instead",
    ),
];

/// The cluster controller of the `local` backend (`csnap cluster run`),
/// single-threaded, once its pools exist.
pub const CONTROLLER: &[Rule] = &[
    rule(
        "epoll_wait",
        libc::SYS_epoll_wait,
        "mio Poll::poll: the event loop's wait (start timeouts as its timeout)",
    ),
    rule(
        "accept4",
        libc::SYS_accept4,
        "an agent or a `csnap cluster` command connecting",
    ),
    rule(
        "setsockopt",
        libc::SYS_setsockopt,
        "TCP_NODELAY on an accepted TCP connection (an agent on another host, `--listen IP:PORT`)",
    ),
    rule(
        "epoll_ctl",
        libc::SYS_epoll_ctl,
        "mio register/deregister of connections",
    ),
    rule("recvfrom", libc::SYS_recvfrom, "reading frames"),
    rule("sendto", libc::SYS_sendto, "writing frames"),
    rule("close", libc::SYS_close, "dropping a closed connection"),
    rule(
        "write",
        libc::SYS_write,
        "stderr event lines (joins, placements, servers up and down)",
    ),
    exit_path(
        "exit_group",
        libc::SYS_exit_group,
        "process exit when the loop fails, and the SIGSYS reporter's exit",
    ),
    exit_path(
        "rt_sigreturn",
        libc::SYS_rt_sigreturn,
        "return from a signal handler; the only handler (SIGSYS) exits instead",
    ),
];

/// The NBD server (`csnap nbd`), single-threaded, once its pools exist and
/// its heap is sealed: handshakes, commands and their disk I/O (on an
/// io_uring; completions are read from its mapped queue), the slots'
/// csnap server and agent links (reconnects through failovers included),
/// the control link, SIGTERM/SIGINT through its signalfd, and the stop
/// (every connection closed, both devices flushed, the unix sockets
/// removed). Audited under strace by
/// `nbd_server_syscalls_match_the_audited_whitelist` (tests/nbd.rs: every
/// rule used, nothing else made).
pub const NBD: &[Rule] = &[
    rule(
        "epoll_wait",
        libc::SYS_epoll_wait,
        "mio Poll::poll: the event loop's wait (the next deadline as timeout)",
    ),
    rule(
        "accept4",
        libc::SYS_accept4,
        "an NBD client connecting (unix and TCP listeners)",
    ),
    rule(
        "epoll_ctl",
        libc::SYS_epoll_ctl,
        "mio register/deregister of NBD clients, server and agent links",
    ),
    rule(
        "recvfrom",
        libc::SYS_recvfrom,
        "reading NBD requests and payloads, csnap replies, agent replies",
    ),
    rule(
        "sendto",
        libc::SYS_sendto,
        "writing NBD replies, csnap requests, agent requests",
    ),
    rule(
        "writev",
        libc::SYS_writev,
        "writing several NBD replies at once: the queued headers and read data gathered",
    ),
    rule(
        "read",
        libc::SYS_read,
        "the signalfd (SIGTERM, SIGINT)",
    ),
    rule(
        "io_uring_enter",
        libc::SYS_io_uring_enter,
        "submitting disk operations to the io_uring set up at init: data reads and writes (direct I/O, read-modify-write edges), FLUSH and FUA syncs",
    ),
    rule(
        "fdatasync",
        libc::SYS_fdatasync,
        "the flush after a DISC, and the stop's flush of both devices",
    ),
    rule(
        "socket",
        libc::SYS_socket,
        "a slot's links for a new export: the agent and the csnap server, and again after a failover",
    ),
    rule(
        "connect",
        libc::SYS_connect,
        "the same links: agent socket, server address",
    ),
    rule(
        "close",
        libc::SYS_close,
        "dropping a closed NBD client, a broken or finished link",
    ),
    rule(
        "setsockopt",
        libc::SYS_setsockopt,
        "TCP_NODELAY on accepted TCP clients",
    ),
    rule(
        "write",
        libc::SYS_write,
        "stderr lines: \"serving\", failover and outage events, the stop's figures",
    ),
    rule(
        "unlink",
        libc::SYS_unlink,
        "the stop: removing the unix sockets it listened on",
    ),
    exit_path(
        "exit_group",
        libc::SYS_exit_group,
        "process exit after the stop or a loop failure, and the SIGSYS reporter's exit",
    ),
    exit_path(
        "rt_sigreturn",
        libc::SYS_rt_sigreturn,
        "return from a signal handler; the only handler (SIGSYS) exits instead",
    ),
];

/// The table of a thread kind in the serving phase.
pub fn serving(kind: ThreadKind) -> &'static [Rule] {
    match kind {
        ThreadKind::Network => SERVING_NETWORK,
        ThreadKind::Store => SERVING_STORE,
    }
}

/// The syscall numbers of a table.
pub fn numbers(rules: &[Rule]) -> Vec<i64> {
    rules.iter().map(|r| r.nr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_no_duplicates_and_every_rule_says_why() {
        let standby = standby_network();
        for t in [
            SERVING_NETWORK,
            SERVING_STORE,
            &standby,
            AGENT,
            CONTROLLER,
            NBD,
        ] {
            for (i, r) in t.iter().enumerate() {
                assert!(r.why.len() > 10, "{} needs a reason", r.name);
                assert!(
                    t[i + 1..].iter().all(|o| o.nr != r.nr),
                    "{} listed twice",
                    r.name
                );
            }
        }
    }
}
