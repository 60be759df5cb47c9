//! CPU accounting from /proc: the machine's and this process's ticks
//! around a run.

use super::*;

/// utime + stime ticks of this process's threads, by thread name.
#[derive(Default)]
pub(crate) struct CpuSnap {
    pub(crate) net: u64,
    pub(crate) store: u64,
    pub(crate) echo: u64,
    pub(crate) total: u64,
    pub(crate) machine: u64,
    pub(crate) steal: u64,
}

/// Busy and steal ticks of the whole machine.
pub(crate) fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    Some((busy, *f.get(7)?))
}

pub(crate) fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub(crate) fn cpu_snap() -> CpuSnap {
    let mut s = CpuSnap::default();
    if let Some((busy, steal)) = machine_ticks() {
        s.machine = busy;
        s.steal = steal;
    }
    if let Some(t) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|st| stat_ticks(&st))
    {
        s.total = t;
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return s;
    };
    for e in dir.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let Some(t) = std::fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|st| stat_ticks(&st))
        else {
            continue;
        };
        match comm.trim() {
            "csnap-net" => s.net += t,
            "csnap-store" => s.store += t,
            c if c.starts_with("echo-") => s.echo += t,
            _ => {}
        }
    }
    s
}

pub(crate) fn cpu_use(a: &CpuSnap, b: &CpuSnap, wall: Duration) -> CpuUse {
    let w = wall.as_secs_f64().max(1e-9) * USER_HZ;
    // Threads that exited during the run (echo connection threads) drop out
    // of the per-thread sums; the process total keeps them.
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / w;
    CpuUse {
        net: d(a.net, b.net),
        store: d(a.store, b.store),
        echo: d(a.echo, b.echo),
        total: d(a.total, b.total),
        machine: d(a.machine, b.machine),
        steal: d(a.steal, b.steal),
    }
}
