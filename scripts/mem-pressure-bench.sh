#!/usr/bin/env bash
# Memory pressure (issue #11): csnap and a stress-ng memory hog in one memory
# cgroup at its limit (csnap's locked memory plus LIMIT_EXTRA_MB, default
# 300 MiB), against the same run with a CPU-only hog.
#
#   sudo bash scripts/mem-pressure-bench.sh
#
# What it does, in one run:
#   1. `csnap up` (controller, agent, standby and serving server, NBD server)
#      in a fresh cgroup-v1 memory group; the limit is then set to the
#      group's usage (its locked memory and page cache) plus LIMIT_EXTRA_MB.
#   2. QD1 durable writes on the origin export: `qemu-img bench -w -d 1
#      --flush-interval=1` (COUNT requests of 4 KiB, the client pinned to
#      CPU 0 outside the group), RUNS times under a CPU-only hog
#      (`stress-ng --cpu 1`) and RUNS times under a memory hog
#      (`stress-ng --vm 2 --vm-bytes <limit> --vm-keep`), both hogs in the
#      group and pinned to CPU 1. It prints the median times and their ratio
#      (memory hog / CPU hog; the issue's target is at most 1.2).
#   3. Under the memory hog, a SIGKILL of the serving server in the middle of
#      a `qemu-io` write run: the run must finish without an I/O error and
#      the data must read back.
#   4. It checks that no csnap process was killed (all still running, the
#      group's OOM kills were of the hog only).
# It exits non-zero on any I/O error, failed check or killed csnap process.
# Needs root (cgroups, memory locking), qemu-utils and stress-ng.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

count="${COUNT:-2000}"
runs="${RUNS:-3}"
extra_mb="${LIMIT_EXTRA_MB:-300}"
for t in qemu-img qemu-io stress-ng taskset; do
    command -v "$t" >/dev/null || { echo "mem-pressure-bench: $t is missing" >&2; exit 2; }
done
cgroot=/sys/fs/cgroup/memory
[[ -d $cgroot ]] || { echo "mem-pressure-bench: no cgroup-v1 memory controller at $cgroot" >&2; exit 2; }

echo "== building csnap (release)"
cargo build --release -p csnap >/dev/null 2>&1 || cargo build --release -p csnap
csnap="${CARGO_TARGET_DIR:-$PWD/target}/release/csnap"

work=$(mktemp -d /var/tmp/csnap-mp.XXXXXX)
cg="$cgroot/csnap-mp-$$"
up_pid=""
hog_pid=""
cleanup() {
    [[ -n $hog_pid ]] && kill "$hog_pid" 2>/dev/null && wait "$hog_pid" 2>/dev/null
    if [[ -n $up_pid ]]; then
        kill -TERM "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
    fi
    if [[ -d $cg ]]; then
        # Move anything left to the root group, then remove ours.
        while read -r p; do echo "$p" > "$cgroot/cgroup.procs" 2>/dev/null || true; done < "$cg/cgroup.procs"
        rmdir "$cg" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "mem-pressure-bench: FAILED: $*" >&2; exit 1; }

mkdir "$cg"
# csnap up in the group (its children inherit it).
(
    echo "$BASHPID" > "$cg/cgroup.procs"
    exec "$csnap" up --dir "$work/up" --origin-size 256M --store-size 1G
) > "$work/up.out" 2>&1 &
up_pid=$!
for _ in $(seq 600); do
    grep -q "serving" "$work/up.out" 2>/dev/null && break
    kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.out" >&2; fail "csnap up exited"; }
    sleep 0.1
done
grep -q "serving" "$work/up.out" || fail "csnap up did not serve"
sock="$work/up/nbd.sock"
url="nbd+unix:///origin?socket=$sock"
csnap_pids() { pgrep -f "$csnap" | sort; }
pids_before=$(csnap_pids)
locked_kb=0
for p in $pids_before; do
    k=$(awk '/^VmLck:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    locked_kb=$((locked_kb + ${k:-0}))
done
usage=$(cat "$cg/memory.usage_in_bytes")
limit=$((usage + extra_mb * 1024 * 1024))
echo "$limit" > "$cg/memory.limit_in_bytes"
echo "csnap processes: $(echo "$pids_before" | wc -w), locked $((locked_kb / 1024)) MiB; group usage $((usage >> 20)) MiB, limit $((limit >> 20)) MiB"
oom_before=$(awk '/^oom_kill / {print $2}' "$cg/memory.oom_control")

# Write the region once so both runs rewrite allocated blocks.
"$csnap" snapshot create --dir "$work/up" 1 >/dev/null
taskset -c 0 qemu-img bench -f raw -w -t none -c "$count" -s 4k -d 1 -S 4k "$url" >/dev/null

hog() {
    # The hog in the group, on CPU 1.
    (
        echo "$BASHPID" > "$cg/cgroup.procs"
        exec taskset -c 1 stress-ng "$@" --timeout 600s --quiet
    ) &
    hog_pid=$!
    sleep 2
}
stop_hog() {
    kill "$hog_pid" 2>/dev/null || true
    wait "$hog_pid" 2>/dev/null || true
    hog_pid=""
    sleep 1
}
bench_once() {
    local out
    out=$(taskset -c 0 qemu-img bench -f raw -w -t none -c "$count" -s 4k -d 1 -S 4k \
        --flush-interval=1 "$url" 2>&1) || { echo "$out" >&2; fail "qemu-img bench failed"; }
    local t
    t=$(sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
    [[ -n $t ]] || { echo "$out" >&2; fail "qemu-img bench printed no time"; }
    echo "$t"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

declare -a cpu_t mem_t
hog --cpu 1
bench_once >/dev/null # warm-up, not counted
for _ in $(seq "$runs"); do cpu_t+=("$(bench_once)"); done
stop_hog
hog --vm 2 --vm-bytes "$((limit >> 20))M" --vm-keep
bench_once >/dev/null # warm-up, not counted
for _ in $(seq "$runs"); do mem_t+=("$(bench_once)"); done

# A failover under the memory hog: kill the serving server mid-run.
qemu-io -f raw -t none "$url" -c "write -P 0x5a 0 64M" > "$work/qio.out" 2>&1 &
qio=$!
sleep 0.5
# The serving server is the standby started first (the agent spawns its
# successor standby after the start): the oldest server process.
servers=$(pgrep -f -- "$csnap server --standby" | sort -n)
victim=$(head -1 <<<"$servers")
[[ -n $victim ]] || fail "no server process to kill"
kill -KILL "$victim"
wait "$qio" || { cat "$work/qio.out" >&2; fail "qemu-io write failed across the failover"; }
grep -qi "error" "$work/qio.out" && { cat "$work/qio.out" >&2; fail "qemu-io reported an error"; }
qemu-io -f raw -t none "$url" -c "read -P 0x5a 0 64M" > "$work/qio2.out" 2>&1 \
    || { cat "$work/qio2.out" >&2; fail "the data written across the failover does not read back"; }
stop_hog

oom_after=$(awk '/^oom_kill / {print $2}' "$cg/memory.oom_control")
kill -0 "$up_pid" 2>/dev/null || fail "csnap up died"
for p in $pids_before; do
    [[ $p == "$victim" ]] && continue
    kill -0 "$p" 2>/dev/null || fail "csnap process $p ($(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)) was killed"
done

mc=$(printf '%s\n' "${cpu_t[@]}" | median)
mm=$(printf '%s\n' "${mem_t[@]}" | median)
echo
echo "QD1 durable writes ($count x 4 KiB, flush after each), seconds (median of $runs):"
echo "  CPU-only hog:  $mc   (runs: ${cpu_t[*]})"
echo "  memory hog:    $mm   (runs: ${mem_t[*]})"
awk -v a="$mm" -v b="$mc" 'BEGIN { printf "  ratio memory/CPU: %.2f (target <= 1.2)\n", a / b }'
echo "OOM kills in the group during the run: $((oom_after - oom_before)) (the hog's workers; every csnap process survived)"
echo "failover under the memory hog: server $victim SIGKILLed during a 64 MiB qemu-io write; no I/O error, data read back"
