//! Output: the configuration, the machine, one line per run and the
//! summary table.

use super::*;

pub(crate) fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

pub(crate) fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

pub(crate) fn print_run(r: &RunResult, echo: Option<&RunResult>) {
    let line = format!(
        "  {:<4} {:>2} cl  {:<27} {:>6} req {:>6.2} s {:>9.0} req/s  p50 {:>8.1} us  p99 {:>8.1} us  mean {:>8.1} us",
        r.transport.name(),
        r.clients,
        r.workload.label(),
        r.done,
        r.wall.as_secs_f64(),
        r.rate(),
        us(r.p50_ns),
        us(r.p99_ns),
        us(r.mean_ns),
    );
    println!("{line}");
    let c = r.cpu;
    let mut cpu = String::from("        ");
    if let (Some(e), true) = (echo, r.workload != Workload::Echo) {
        cpu.push_str(&format!(
            "csnap/echo: req/s {}, p50 {}; ",
            ratio(r.rate(), e.rate()),
            ratio(r.p50_ns as f64, e.p50_ns as f64)
        ));
    }
    cpu.push_str(&format!("cpu (CPUs busy): process {:.2}", c.total));
    if r.workload == Workload::Echo {
        cpu.push_str(&format!(", echo server {:.2}", c.echo));
    } else {
        cpu.push_str(&format!(
            ", csnap net thread {:.2}, store worker {:.2}",
            c.net, c.store
        ));
    }
    cpu.push_str(&format!(
        "; machine {:.2} (other processes ~{:.2}, steal {:.2})",
        c.machine,
        (c.machine - c.total).max(0.0),
        c.steal
    ));
    if let Some(k) = r.commits {
        cpu.push_str(&format!("; journal commits {k}"));
    }
    if r.capped {
        cpu.push_str("; stopped by the time cap");
    }
    println!("{cpu}");
}

pub(crate) fn machine_facts(dir: &Path) {
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_string());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let (fs, dev) = mount_of(dir).unwrap_or_else(|| ("?".into(), "?".into()));
    println!(
        "machine: nproc {nproc}; kernel {kernel}; cpu {cpu}; {}",
        loadavg()
    );
    println!(
        "files:   {} ({fs} on {dev}); build {}",
        dir.display(),
        if cfg!(debug_assertions) {
            "debug (use --release for figures)"
        } else {
            "release"
        }
    );
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "load average ?".into(),
        |s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            format!("load average {}", f.join(" "))
        },
    )
}

/// File system type and device of the mount holding `p`.
pub(crate) fn mount_of(p: &Path) -> Option<(String, String)> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let p = p.canonicalize().ok()?;
    let mut best: Option<(usize, String, String)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [dev, at, fs, ..] = f.as_slice() else {
            continue;
        };
        if p.starts_with(at) && best.as_ref().is_none_or(|b| at.len() >= b.0) {
            best = Some((at.len(), (*fs).to_string(), (*dev).to_string()));
        }
    }
    best.map(|b| (b.1, b.2))
}

pub(crate) fn print_config(p: &Params) {
    let chunks = ORIGIN_BYTES / u64::from(CHUNK_BYTES);
    println!(
        "config:  chunk {} KiB; origin {} MiB ({chunks} chunks, sparse); store {} MiB (sparse); \
         one snapshot (tag {SNAP_TAG})",
        CHUNK_BYTES / 1024,
        ORIGIN_BYTES >> 20,
        STORE_BYTES >> 20
    );
    println!(
        "         server: clients {SERVER_CLIENTS}, requests/client {SERVER_REQUESTS_PER_CLIENT}, \
         read locks {SERVER_READ_LOCKS}, store batch max {BATCH_MAX}; net thread + store \
         worker thread"
    );
    println!(
        "         regions: A chunks {}..{} pre-written (unique), B {}..{} never written \
         (on the origin), C {}..{} fresh",
        REGION_A.0,
        REGION_A.0 + REGION_A.1,
        REGION_B.0,
        REGION_B.0 + REGION_B.1,
        REGION_C.0,
        REGION_C.0 + REGION_C.1
    );
    println!(
        "         each run: {} timed requests split over the clients (queue depth 1 each), \
         after {} untimed per client; (c): {} timed first writes, cap {} s, clients {:?}",
        p.requests,
        p.warmup,
        p.copyout,
        p.copyout_deadline.as_secs(),
        COPYOUT_CLIENT_COUNTS
    );
    println!(
        "         clients: raw protocol over std sockets (TCP_NODELAY), a thread each; request \
         frames {} B (one range); replies: (a)/(c) {} B, (b) {} B + a {} B FinishSnapshotRead sent \
         after the reply",
        HEADER_BYTES + LIST_HEADER_BYTES + 16,
        HEADER_BYTES + LIST_HEADER_BYTES + 16,
        HEADER_BYTES + LIST_HEADER_BYTES + 24,
        HEADER_BYTES + LIST_HEADER_BYTES + 16
    );
    println!(
        "         echo: {}; echoes {} B frames",
        p.echo.describe(),
        HEADER_BYTES + LIST_HEADER_BYTES + 16
    );
    if !p.only.is_empty() {
        println!("         only: {}", p.only.join(","));
    }
    println!(
        "         percentiles: nearest rank over every timed request; req/s = requests / wall \
         time from the start barrier to the last client's end; cpu from /proc (10 ms ticks)"
    );
}

pub(crate) fn print_table(results: &[RunResult]) {
    println!();
    println!("summary (ratios: csnap / echo, same transport and client count)");
    println!(
        "{:<5} {:>7}  {:<27} {:>10} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "trans",
        "clients",
        "workload",
        "req/s",
        "p50 us",
        "p99 us",
        "req/s rat",
        "p50 rat",
        "commits"
    );
    for r in results {
        let echo = results.iter().find(|e| {
            e.workload == Workload::Echo && e.transport == r.transport && e.clients == r.clients
        });
        let (rt, pt) = match (echo, r.workload) {
            (Some(e), w) if w != Workload::Echo => (
                ratio(r.rate(), e.rate()),
                ratio(r.p50_ns as f64, e.p50_ns as f64),
            ),
            _ => ("".into(), "".into()),
        };
        println!(
            "{:<5} {:>7}  {:<27} {:>10.0} {:>9.1} {:>9.1} {:>10} {:>10} {:>8}",
            r.transport.name(),
            r.clients,
            r.workload.label(),
            r.rate(),
            us(r.p50_ns),
            us(r.p99_ns),
            rt,
            pt,
            r.commits.map_or_else(String::new, |c| c.to_string())
        );
    }
}
