#!/usr/bin/env bash
# The data-path benchmark of the NBD export (issue #6), in one run:
# `qemu-img bench` (4 KiB requests, queue depth 1 and 16, reads and writes)
# against
#   - the csnap origin export with 0, 1, 8 and 64 snapshots: first writes
#     after the snapshots were taken (every request hits a chunk not yet
#     copied out: step = chunk size) and rewrites of the same blocks;
#   - a csnap snapshot export (reads);
#   - qemu-nbd serving the same raw file (the limit: "raw");
#   - qemu-nbd serving a qcow2 overlay on a backing file (what users pick
#     instead for snapshots): first writes, rewrites, reads.
# It prints IOPS and the ratio of each to raw qemu-nbd at the same depth and
# direction, with the targets of the issue.
#
#   scripts/nbd-bench.sh [COUNT]     (default COUNT=20000 requests per run)
#
# Each figure is the median of RUNS runs (environment, default 5).
#
# CPUs: the client (qemu-img) is pinned to CPU 0; the server under test
# (qemu-nbd, or every csnap process) may run anywhere, the same for every
# target. With nothing pinned on a 2-core machine, single runs of the same
# setting spread by up to 1.8x (first writes at depth 1: 0.9 to 1.8 s, in
# no order of snapshot count); with the client pinned, by about 15%.
# PIN=servers also pins the servers to the other CPUs (each server then
# has one core on a 2-core machine: the steadiest figures, within about
# 5%, but csnap's three processes share that core while qemu-nbd has it to
# itself); PIN=none pins nothing.
#
# Needs qemu-img and qemu-nbd (qemu-utils). Run as root (memory locking).
set -euo pipefail
cd "$(dirname "$0")/.."

count="${1:-20000}"
runs="${RUNS:-5}"
ncpu=$(nproc)
pin="${PIN:-client}"
# Command prefixes (taskset execs the program, so $! is its pid).
client=()
server=()
client_cpus=any
server_cpus=any
if ((ncpu >= 2)) && [[ $pin != none ]]; then
    client_cpus=0
    client=(taskset -c "$client_cpus")
    if [[ $pin == servers ]]; then
        server_cpus="1-$((ncpu - 1))"
        server=(taskset -c "$server_cpus")
    fi
fi
chunk=16384
echo "== building csnap (release)"
cargo build --release -p csnap >/dev/null 2>&1 || cargo build --release -p csnap
csnap="${CARGO_TARGET_DIR:-$PWD/target}/release/csnap"

work="$(mktemp -d /tmp/csnap-nbd-bench.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Every first-write run gets a region of its own, so its requests really
# are first writes: 4 snapshot counts x 2 depths x RUNS runs (a median).
region=$((count * chunk))
regions=$((8 * runs))
origin_bytes=$(( (regions * region + (1 << 30) - 1) / (1 << 30) * (1 << 30) ))
store_bytes=$((origin_bytes + origin_bytes / 2 + (1 << 30)))
echo "== $count requests per run, medians of $runs runs; client on CPU $client_cpus, servers on CPUs $server_cpus; origin $((origin_bytes >> 20)) MiB, store $((store_bytes >> 20)) MiB, chunk $chunk bytes"

# qemu-img bench prints "Run completed in X seconds."; IOPS = count / X.
# Every run starts from the same memory state: the page cache written back
# (sync, so a run does not pay for the previous one's writeback) and dropped.
# Dropping matters on a VM with free page reporting (virtio-balloon
# REPORTING, as on our CI machines): memory the guest freed a few seconds
# ago goes back to the host, and touching it again costs a host fault per
# page (dd to tmpfs: about 0.6 GB/s on fresh memory against 2.6-4.9 GB/s on
# reused memory). Without the drop, a run that grows the page cache into
# such memory pays for it: csnap's first writes touch 9 pages per request
# (a 4 KiB write, a 16 KiB copy-out read and write), raw qemu-nbd's 1, and
# the later snapshot counts looked 2.5 times slower than the first.
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
bench_once() { # url depth write(0|1) offset step
    local url=$1 depth=$2 write=$3 off=$4 step=$5 args=()
    if [[ $write == 1 ]]; then args+=(-w); fi
    drop_caches
    local out
    out=$("${client[@]}" qemu-img bench -f raw -c "$count" -d "$depth" -s 4k -S "$step" -o "$off" "${args[@]}" "$url" 2>&1) || {
        echo "qemu-img bench failed: $out" >&2
        return 1
    }
    local secs
    secs=$(sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
    if [[ -n "${BENCH_VERBOSE:-}" ]]; then echo "  run: $url depth $depth write $write offset $off step $step: $secs s" >&2; fi
    awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.0f", c / s }'
}
median() { printf "%s\n" "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
# Repeatable measurements (reads, rewrites): the median of RUNS runs.
bench() { # url depth write offset step
    local v=() i
    for ((i = 0; i < runs; i++)); do v+=("$(bench_once "$@")"); done
    median "${v[@]}"
}
# First writes cannot be repeated on the same blocks (the second run would
# be rewrites): the median of RUNS runs on RUNS fresh regions from OFFSET on.
bench_first() { # url depth offset step
    local url=$1 depth=$2 off=$3 step=$4 v=() i
    for ((i = 0; i < runs; i++)); do
        v+=("$(bench_once "$url" "$depth" 1 $((off + i * region)) "$step")")
    done
    median "${v[@]}"
}

declare -A iops

echo "== qemu-nbd on a raw file (the limit)"
raw="$work/raw.img"
truncate -s "$origin_bytes" "$raw"
"${server[@]}" qemu-nbd -f raw -k "$work/raw.sock" -x raw --persistent "$raw" &
pids+=($!)
for _ in $(seq 100); do [[ -S $work/raw.sock ]] && break; sleep 0.05; done
rawurl="nbd+unix:///raw?socket=$work/raw.sock"
for d in 1 16; do
    iops[raw_write_$d]=$(bench "$rawurl" "$d" 1 $(( (d == 1 ? 0 : 1) * region )) 4096)
    iops[raw_read_$d]=$(bench "$rawurl" "$d" 0 $(( (d == 1 ? 0 : 1) * region )) 4096)
done
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'

rm -f "$raw"; drop_caches

echo "== qemu-nbd on a qcow2 overlay over a backing file"
truncate -s "$origin_bytes" "$work/base.img"
qemu-img create -q -f qcow2 -b "$work/base.img" -F raw "$work/overlay.qcow2"
"${server[@]}" qemu-nbd -f qcow2 -k "$work/qcow.sock" -x qcow --persistent "$work/overlay.qcow2" &
pids+=($!)
for _ in $(seq 100); do [[ -S $work/qcow.sock ]] && break; sleep 0.05; done
qurl="nbd+unix:///qcow?socket=$work/qcow.sock"
for d in 1 16; do
    off=$(( (d == 1 ? 0 : runs) * region ))
    iops[qcow_first_$d]=$(bench_first "$qurl" "$d" "$off" "$chunk")
    iops[qcow_rewrite_$d]=$(bench "$qurl" "$d" 1 "$off" "$chunk")
    iops[qcow_read_$d]=$(bench "$qurl" "$d" 0 "$off" "$chunk")
done
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'

# Each section starts from the same state: the previous one's files gone,
# written back, and the page cache dropped (where the kernel lets us).
fresh_state() {
    rm -f "$work"/*.img "$work"/*.qcow2
    drop_caches
}
fresh_state

echo "== csnap up (one-node cluster, NBD export)"
up="$work/up"
"${server[@]}" "$csnap" up --dir "$up" --origin-size "$origin_bytes" --store-size "$store_bytes" >"$work/up.out" 2>&1 &
pids+=($!)
for _ in $(seq 600); do grep -q "serving" "$work/up.out" 2>/dev/null && break; sleep 0.05; done
grep -q "serving" "$work/up.out" || { cat "$work/up.out"; exit 1; }
sock="$up/nbd.sock"
ourl="nbd+unix:///origin?socket=$sock"
tags=0
snapshots_to() { # n: create snapshots until n exist
    while ((tags < $1)); do
        tags=$((tags + 1))
        "$csnap" snapshot create --dir "$up" "$tags" >/dev/null
    done
}
region_no=0
for n in 0 1 8 64; do
    snapshots_to "$n"
    for d in 1 16; do
        off=$((region_no * region))
        region_no=$((region_no + runs))
        iops[csnap_first_${n}_$d]=$(bench_first "$ourl" "$d" "$off" "$chunk")
        iops[csnap_rewrite_${n}_$d]=$(bench "$ourl" "$d" 1 "$off" "$chunk")
    done
done
# Snapshot reads: snapshot 1 of the last region (all its chunks were copied
# out after it was taken, so the reads go to the store), and of a region
# written before any snapshot (reads that stay on the origin, under locks).
surl="nbd+unix:///1?socket=$sock"
for d in 1 16; do
    iops[csnap_snapread_store_$d]=$(bench "$surl" "$d" 0 $(( (region_no - 1) * region )) 4096)
    iops[csnap_snapread_origin_$d]=$(bench "$surl" "$d" 0 $(( (d == 1 ? 0 : 1) * region )) 4096)
done
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
echo "== results: 4 KiB requests, $count per run, IOPS and ratio to raw qemu-nbd (same depth, same direction)"
printf "%-44s %10s %7s %10s %7s\n" "target" "QD1" "ratio" "QD16" "ratio"
row() { # label key-prefix raw-kind
    local l=$1 k=$2 r=$3
    printf "%-44s %10s %7s %10s %7s\n" "$l" "${iops[${k}_1]}" "$(ratio "${iops[${k}_1]}" "${iops[raw_${r}_1]}")" \
        "${iops[${k}_16]}" "$(ratio "${iops[${k}_16]}" "${iops[raw_${r}_16]}")"
}
row "qemu-nbd raw: writes" raw_write write
row "qemu-nbd raw: reads" raw_read read
row "qemu-nbd qcow2 overlay: first writes" qcow_first write
row "qemu-nbd qcow2 overlay: rewrites" qcow_rewrite write
row "qemu-nbd qcow2 overlay: reads" qcow_read read
for n in 0 1 8 64; do
    row "csnap origin, $n snapshots: first writes" "csnap_first_$n" write
    row "csnap origin, $n snapshots: rewrites" "csnap_rewrite_$n" write
done
row "csnap snapshot export: reads (store)" csnap_snapread_store read
row "csnap snapshot export: reads (origin, locked)" csnap_snapread_origin read
echo
for d in 1 16; do
    echo "64 vs 1 snapshot, first writes, QD$d: $(ratio "${iops[csnap_first_64_$d]}" "${iops[csnap_first_1_$d]}") (target: within 10%, 0.90 to 1.10)"
done
echo "targets: rewrites and snapshot reads >= 0.90 of raw; first writes >= 0.33 of raw"
