#!/usr/bin/python3
"""Whole-node kills on a 3-node corosync + Pacemaker cluster with csnap (#12).

    scripts/hacluster-bench.py DIR [--kills N] [--token MS] [--defaults-kills N]

Brings up scripts/hacluster.sh (token --token, default 300 ms; dc-deadtime 2s;
monitor 1s), and N times (default 20): takes a snapshot (so that every probe
write needs the server: a copy-out), SIGKILLs every process of the serving
node (corosync included), and measures on the survivors, in CLOCK_MONOTONIC
(the relays' [t=] lines):
  kill -> membership change   the first survivor relay's CPG confchg without it
  membership -> fenced        the relay's "node N is fenced" (the fencer's
                              history, polled every 50 ms)
  fenced -> serving           the relay's "server incarnation I serves"
  kill -> all served          every survivor's NBD probe (4 KiB origin writes
                              to a new 16 KiB chunk each, 2 ms apart, over TCP
                              to its own node's NBD server) completed a write
                              after the new server served
then starts the killed node again (hacluster.sh restart) and waits for its
standby and for Pacemaker to settle (the DC idle, every node online, for 1 s). Then the same with corosync's and Pacemaker's defaults (token 1000 ms
with token_coefficient 650, consensus 1.2 x token, dc-deadtime 20s, monitor
10s) for --defaults-kills kills (default: as many), and prints both and their
ratio. Exits 1 if any probe got an NBD error reply (figures printed first). Needs root; csnap and csnap-relay in target/release.
"""
import argparse, os, re, socket, struct, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HA = os.path.join(HERE, "hacluster.sh")
CSNAP = os.environ.get("CSNAP", os.path.join(REPO, "target/release/csnap"))

PROBE = r'''
import socket, struct, sys, time
host, base, span = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rx(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b
while True:
    try:
        s = socket.create_connection((host, 10809))
        rx(s, 18)
        s.sendall(struct.pack(">I", 3))
        name = b"origin"
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            _, _, typ, ln = struct.unpack(">QIII", rx(s, 20)); rx(s, ln)
            if typ == 1: break
            if typ & 0x80000000: raise EOFError
        break
    except (OSError, EOFError):
        time.sleep(0.05)
data = b"\xa5" * 4096
i = 0
while True:
    off = base + (i * 16384) % span
    i += 1
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, i, off, 4096) + data)
    magic, err, h = struct.unpack(">IIQ", rx(s, 16))
    print(time.monotonic_ns() // 1000, err, flush=True)
    time.sleep(0.002)
'''


def sh(*args, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        sys.exit(f"{args}: {r.stdout}{r.stderr}")
    return r.stdout


def env_of(d):
    e = {}
    for l in open(os.path.join(d, "hacluster.env")):
        k, _, v = l.strip().partition("=")
        e[k] = v
    return e


def status(d, n):
    r = subprocess.run([HA, "exec", d, str(n), CSNAP, "cluster", "status", "--dir", "/run/csnap"],
                       capture_output=True, text=True)
    m = re.search(r"^server: incarnation (\d+) on node (\d+) at (\S+)", r.stdout, re.M)
    return (int(m.group(1)), int(m.group(2)), m.group(3), r.stdout) if m else (0, 0, "", r.stdout)


def wait(what, f, t=120):
    end = time.monotonic() + t
    while time.monotonic() < end:
        v = f()
        if v:
            return v
        time.sleep(0.05)
    sys.exit(f"timeout: {what}")


def relay_lines(d, n, t0):
    out = []
    try:
        for l in open(os.path.join(d, f"node-{n}/relay.log")):
            m = re.match(r"\[t=(\d+)\] csnap relay: (.*)", l)
            if m and int(m.group(1)) >= t0:
                out.append((int(m.group(1)), m.group(2)))
    except OSError:
        pass
    return out


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def dc_idle(d, n):
    """Whether, seen from node n, all 3 nodes are online and the DC is idle."""
    x = lambda *a: subprocess.run([HA, "exec", d, str(n), *a], capture_output=True, text=True).stdout
    dc = x("crmadmin", "-D", "-q").strip()
    return (bool(dc) and x("crmadmin", "-S", dc, "-q").strip() == "S_IDLE"
            and x("crm_mon", "-1", "--output-as=xml").count('online="true"') >= 3)


def settled(d, n):
    """The DC idle with every node online for 1 s: a node that rejoined is
    integrated (join round, probes) before the next kill, as a node that
    rejoined long ago would be; a kill during its join measures Pacemaker's
    join handling instead."""
    for _ in range(5):
        if not dc_idle(d, n):
            return False
        time.sleep(0.2)
    return True


def run(d, kills, token, defaults):
    env = dict(os.environ, CSNAP=CSNAP)
    if defaults:
        env.update(CSNAP_HA_TOKEN_MS="1000", CSNAP_HA_TOKEN_COEFFICIENT="650",
                   CSNAP_HA_DC_DEADTIME="20s", CSNAP_HA_MONITOR="10s")
    else:
        env.update(CSNAP_HA_TOKEN_MS=str(token))
    subprocess.run([HA, "down", d], capture_output=True)
    sh(HA, "up", d, "3", "--csnap", env=env)
    e = env_of(d)
    ns = lambda n: f"csn{e['ID']}-{n}"
    ip = lambda n: f"10.213.{e['X']}.{n}"
    res = {"detect": [], "fence": [], "serve": [], "all": [], "errors": 0}
    try:
        for k in range(kills):
            inc, s, addr, _ = wait("a server", lambda: (lambda x: x if x[0] else None)(status(d, 1 if 1 != 0 else 2)))
            tag = str(100 + k)
            sh("ip", "netns", "exec", ns(s), CSNAP, "snapshot", "create", "--server", addr, tag, check=False)
            if k > 0:
                subprocess.run(["ip", "netns", "exec", ns(s), CSNAP, "snapshot", "delete", "--server",
                                addr, str(99 + k)], capture_output=True)
            surv = [n for n in (1, 2, 3) if n != s]
            probes = {}
            for n in surv:
                base = (n - 1) * (16 << 20)
                probes[n] = subprocess.Popen(["ip", "netns", "exec", ns(n), "/usr/bin/python3", "-c", PROBE,
                                              ip(n), str(base), str(16 << 20)],
                                             stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            t_kill = time.monotonic_ns() // 1000
            while True:
                pids = sh("ip", "netns", "pids", ns(s), check=False).split()
                if not pids:
                    break
                subprocess.run(["kill", "-KILL"] + pids, capture_output=True)
                time.sleep(0.002)

            def served():
                for n in surv:
                    for t, m in relay_lines(d, n, t_kill):
                        mm = re.match(r"server incarnation (\d+) serves on node (\d+)", m)
                        if mm and int(mm.group(1)) > inc:
                            return t
                return None
            t_serve = wait("the new server", served)
            time.sleep(0.5)
            ends = {}
            for n, p in probes.items():
                p.kill()
                out, _ = p.communicate()
                errs = 0
                for l in out.split():
                    pass
                vals = [tuple(map(int, l.split())) for l in out.splitlines() if l.strip()]
                errs = [er for _, er in vals if er != 0]
                if errs:
                    res["errors"] += len(errs)
                    print(f"kill {k + 1}: node {n}'s probe got {len(errs)} NBD error replies "
                          f"(errno {sorted(set(errs))})", flush=True)
                after = [t for t, er in vals if t >= t_serve and er == 0]
                ends[n] = after[0] if after else None
            lines = [x for n in surv for x in relay_lines(d, n, t_kill)]
            t_det = min((t for t, m in lines if m.startswith("cpg members") and f"left [{s}]" in m or
                         (m.startswith("cpg members") and re.search(rf"left \[.*\b{s}\b", m))), default=None)
            t_fen = min((t for t, m in lines if m.startswith(f"node {s} is fenced")), default=None)
            if None in (t_det, t_fen) or None in ends.values():
                print(f"kill {k}: incomplete (detect {t_det} fenced {t_fen} probes {ends})", file=sys.stderr)
            else:
                res["detect"].append(t_det - t_kill)
                res["fence"].append(t_fen - t_det)
                res["serve"].append(t_serve - t_fen)
                res["all"].append(max(ends.values()) - t_kill)
                print(f"kill {k + 1}/{kills}: node {s}: detect {(t_det - t_kill) / 1000:.0f} ms, "
                      f"fenced +{(t_fen - t_det) / 1000:.0f} ms, serving +{(t_serve - t_fen) / 1000:.0f} ms, "
                      f"all served {(max(ends.values()) - t_kill) / 1000:.0f} ms", flush=True)
            sh(HA, "restart", d, str(s), env=env)
            wait(f"node {s} standby", lambda: re.search(rf"^node {s}: member connected standby-ready",
                                                         status(d, surv[0])[3], re.M))
            wait("Pacemaker settled", lambda: settled(d, surv[0]))
    finally:
        subprocess.run([HA, "down", d], capture_output=True)
    return res


def report(name, res):
    print(f"== {name}: {len(res['all'])} kills measured, {res['errors']} NBD error replies to the probes")
    for k, label in (("detect", "kill -> membership change"), ("fence", "membership -> fenced"),
                     ("serve", "fenced -> serving"), ("all", "kill -> every client served")):
        v = res[k]
        if v:
            print(f"  {label:28} p50 {pct(v, 50) / 1000:7.0f} ms   p99 {pct(v, 99) / 1000:7.0f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--token", type=int, default=300)
    ap.add_argument("--defaults-kills", type=int, default=None)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    tuned = run(os.path.join(a.dir, "tuned"), a.kills, a.token, False)
    dk = a.kills if a.defaults_kills is None else a.defaults_kills
    dflt = run(os.path.join(a.dir, "defaults"), dk, 1000, True) if dk else None
    print(f"settings (tuned): corosync token {a.token} ms, token_coefficient 0, consensus {int(a.token * 1.2)} ms "
          f"(1.2 x token), join 50 ms, knet (ping interval 100 ms, link timeout 1000 ms); Pacemaker "
          f"dc-deadtime 2s, monitor 1s, stonith-enabled, stonith-action off, fence_csnap_ns; the relays "
          f"ask the fencer at once (stonith_admin --fence --tolerance)")
    report("tuned", tuned)
    if dflt:
        print("settings (defaults): corosync token 1000 ms, token_coefficient 650 (3 nodes: 1650 ms), "
              "consensus 1.2 x token, knet as above; Pacemaker dc-deadtime 20s, monitor 10s")
        report("defaults", dflt)
        if tuned["all"] and dflt["all"]:
            print(f"ratio kill -> all served, p50 defaults / tuned: "
                  f"{pct(dflt['all'], 50) / max(1, pct(tuned['all'], 50)):.1f}x")
    errors = tuned["errors"] + (dflt["errors"] if dflt else 0)
    if errors:
        # A benchmark that saw an I/O error fails, after printing its
        # figures: a client error is what the failover must not cause.
        print(f"FAILED: {errors} NBD error replies to the probes (tuned {tuned['errors']}, "
              f"defaults {dflt['errors'] if dflt else 0})", file=sys.stderr)
        sys.exit(1)


main()
