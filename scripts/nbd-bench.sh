#!/usr/bin/env bash
# The data-path benchmark of the NBD export (issue #6), in one run:
# `qemu-img bench` (4 KiB requests, queue depth 1 and 16, reads and writes)
# against
#   - the csnap origin export with 0, 1, 8 and 64 snapshots: first writes
#     after the snapshots were taken (every request hits a chunk not yet
#     copied out) and rewrites of the same blocks;
#   - a csnap snapshot export (reads);
#   - qemu-nbd serving the same raw file (the limit: "raw");
#   - qemu-nbd serving a qcow2 overlay on a backing file (what users pick
#     instead for snapshots): first writes, rewrites, reads.
# It prints IOPS and the ratio of each to raw qemu-nbd at the same depth and
# direction, with the targets of the issue. These write-back rows compare
# csnap (direct I/O, acknowledging a write before it is on the disk, as a
# volatile write cache does) with a page-cached qemu-nbd: not like for like.
#
# Durability-fair rows (issue #11): `qemu-img bench -w --flush-interval=1`
# at QD1 and `--flush-interval=16` at QD16 (a flush after every write, or
# every 16), against qemu-nbd with `--cache=none --aio=native` (direct I/O)
# on a raw file and on a qcow2 overlay over a backing file; csnap first
# writes after 1 and after 64 snapshots, rewrites, and snapshot reads
# (store). Raw qemu-nbd writes and reads are measured on blocks written
# once before (so neither side pays for allocating file blocks).
#
#   scripts/nbd-bench.sh [COUNT]     (default COUNT=20000 requests per run)
#
# Durable first writes are first writes on both sides: the step between
# requests is 64 KiB, qcow2's default cluster (4 csnap chunks of 16 KiB), so every
# request allocates a qcow2 cluster (and copies the rest of it from the
# backing file) just as every request makes csnap copy out a chunk. (With a
# 16 KiB step, 3 of every 4 qcow2 "first writes" land in a cluster the
# request before allocated: rewrites, not first writes; the write-back
# table keeps that 16 KiB step, so its qcow2 first-write row is amortized
# over 4 requests.)
#
# Each figure is the median of RUNS runs (environment, default 5).
# DCOUNT (default 2000): requests per durable run. ROWS=writeback|durable|all
# (default all): which tables.
# FEATURES: cargo features to build csnap with (see the build below).
# FULL (default 64, the store's SNAPSHOTS_MAX): the snapshot count of the
# full-table rows, compared with 1 snapshot.
#
# The script exits non-zero when a qemu-img run fails or prints no time,
# or when the final data check (the pattern written where expected, the
# snapshot unchanged) fails.
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
# Failures inside $(...) stop the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

count="${1:-20000}"
runs="${RUNS:-5}"
dcount="${DCOUNT:-2000}"
rows="${ROWS:-all}"
wb=0; dur=0
case $rows in
    all) wb=1; dur=1 ;;
    writeback) wb=1 ;;
    durable) dur=1 ;;
    *) echo "ROWS must be writeback, durable or all" >&2; exit 2 ;;
esac
ncpu=$(nproc)
pin="${PIN:-client}"
# The full-table row: the store's SNAPSHOTS_MAX (64 in the default build;
# FULL=1024 with FEATURES=csnap-pools/snapshots-1024, ARCHITECTURE.md 2.12).
full="${FULL:-64}"
[[ "$full" =~ ^[0-9]+$ ]] && ((full > 8)) || { echo "FULL must be a number above 8" >&2; exit 2; }
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
# The step of durable first-write runs (and their rewrites and snapshot reads):
# qemu-img's default qcow2 cluster, a multiple of the csnap chunk.
fstride=65536
echo "== building csnap (release)"
# FEATURES (optional): cargo features of the build, e.g.
# FEATURES=csnap-pools/snapshots-1024 with FULL=1024 and a target directory
# of its own (CARGO_TARGET_DIR=target/s1024) for the 1024-snapshot rows.
feat=()
if [[ -n "${FEATURES:-}" ]]; then feat=(--features "$FEATURES"); fi
cargo build --release -p csnap "${feat[@]}" >/dev/null 2>&1 || cargo build --release -p csnap "${feat[@]}"
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
# Durable first writes: csnap after 1 and after $full snapshots, 2 depths,
# RUNS runs each, after the write-back regions.
dregion=$((dcount * fstride))
dbase=$((regions * region))
origin_bytes=$(( (dbase + 4 * runs * dregion + (1 << 30) - 1) / (1 << 30) * (1 << 30) ))
store_bytes=$((origin_bytes + origin_bytes / 2 + (1 << 30)))
echo "== $count requests per run, medians of $runs runs; client on CPU $client_cpus, servers on CPUs $server_cpus; origin $((origin_bytes >> 20)) MiB, store $((store_bytes >> 20)) MiB, chunk $chunk bytes, first-write step $fstride bytes"

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
# The section's settings: requests per run, region per first-write run,
# flushes (durable: every write at QD1, every 16 at QD16).
cnt=$count
reg=$region
flush=0
writeback_mode() { cnt=$count; reg=$region; flush=0; }
durable_mode() { cnt=$dcount; reg=$dregion; flush=1; }
bench_once() { # url depth write(0|1) offset step
    local url=$1 depth=$2 write=$3 off=$4 step=$5 args=()
    if [[ $write == 1 ]]; then
        args+=(-w --pattern=165)
        if [[ $flush == 1 ]]; then args+=(--flush-interval="$depth"); fi
    fi
    drop_caches
    local out
    out=$("${client[@]}" qemu-img bench -f raw -c "$cnt" -d "$depth" -s 4k -S "$step" -o "$off" "${args[@]}" "$url" 2>&1) || {
        echo "qemu-img bench failed ($url depth $depth write $write offset $off): $out" >&2
        return 1
    }
    local secs
    secs=$(sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
    if [[ -z $secs ]] || ! awk -v s="$secs" 'BEGIN { exit !(s > 0) }'; then
        echo "qemu-img bench printed no time ($url): $out" >&2
        return 1
    fi
    if [[ -n "${BENCH_VERBOSE:-}" ]]; then echo "  run: $url depth $depth write $write flush $flush offset $off step $step: $secs s" >&2; fi
    awk -v c="$cnt" -v s="$secs" 'BEGIN { printf "%.0f", c / s }'
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
        v+=("$(bench_once "$url" "$depth" 1 $((off + i * reg)) "$step")")
    done
    median "${v[@]}"
}

declare -A iops

start_qemu_nbd() { # name format file [options...]: serves it, sets url
    local name=$1 fmt=$2 file=$3
    shift 3
    "${server[@]}" qemu-nbd -f "$fmt" "$@" -k "$work/$name.sock" -x "$name" --persistent "$file" &
    pids+=($!)
    for _ in $(seq 100); do [[ -S $work/$name.sock ]] && break; sleep 0.05; done
    [[ -S $work/$name.sock ]] || { echo "qemu-nbd ($name) did not start" >&2; exit 1; }
    url="nbd+unix:///$name?socket=$work/$name.sock"
}
stop_last() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
direct=(--cache=none --aio=native)

if ((wb)); then
    writeback_mode
    echo "== qemu-nbd on a raw file, page cache (the limit)"
    raw="$work/raw.img"
    truncate -s "$origin_bytes" "$raw"
    start_qemu_nbd raw raw "$raw"
    for d in 1 16; do
        iops[raw_write_$d]=$(bench "$url" "$d" 1 $(( (d == 1 ? 0 : 1) * region )) 4096)
        iops[raw_read_$d]=$(bench "$url" "$d" 0 $(( (d == 1 ? 0 : 1) * region )) 4096)
    done
    stop_last
    rm -f "$raw"; drop_caches

    echo "== qemu-nbd on a qcow2 overlay over a backing file, page cache"
    truncate -s "$origin_bytes" "$work/base.img"
    qemu-img create -q -f qcow2 -b "$work/base.img" -F raw "$work/overlay.qcow2"
    start_qemu_nbd qcow qcow2 "$work/overlay.qcow2"
    for d in 1 16; do
        off=$(( (d == 1 ? 0 : runs) * region ))
        iops[qcow_first_$d]=$(bench_first "$url" "$d" "$off" "$chunk")
        iops[qcow_rewrite_$d]=$(bench "$url" "$d" 1 "$off" "$chunk")
        iops[qcow_read_$d]=$(bench "$url" "$d" 0 "$off" "$chunk")
    done
    stop_last
    rm -f "$work"/*.img "$work"/*.qcow2; drop_caches
fi

if ((dur)); then
    durable_mode
    echo "== qemu-nbd --cache=none --aio=native on a raw file, flushes ($dcount requests per run)"
    raw="$work/raw.img"
    truncate -s "$origin_bytes" "$raw"
    start_qemu_nbd draw raw "$raw" "${direct[@]}"
    for d in 1 16; do
        off=$(( (d == 1 ? 0 : 1) * dregion ))
        # Written once first: blocks allocated, as csnap's are on rewrites.
        bench_once "$url" "$d" 1 "$off" 4096 >/dev/null
        iops[d_raw_write_$d]=$(bench "$url" "$d" 1 "$off" 4096)
        iops[d_raw_read_$d]=$(bench "$url" "$d" 0 "$off" 4096)
    done
    stop_last
    rm -f "$raw"; drop_caches

    echo "== qemu-nbd --cache=none --aio=native on a qcow2 overlay over a backing file, flushes"
    truncate -s "$origin_bytes" "$work/base.img"
    qemu-img create -q -f qcow2 -b "$work/base.img" -F raw "$work/overlay.qcow2"
    start_qemu_nbd dqcow qcow2 "$work/overlay.qcow2" "${direct[@]}"
    for d in 1 16; do
        off=$(( (d == 1 ? 0 : runs) * dregion ))
        iops[d_qcow_first_$d]=$(bench_first "$url" "$d" "$off" "$fstride")
        iops[d_qcow_rewrite_$d]=$(bench "$url" "$d" 1 "$off" "$fstride")
    done
    stop_last
    rm -f "$work"/*.img "$work"/*.qcow2; drop_caches
fi

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
dregion_no=0
surl="nbd+unix:///1?socket=$sock"
for n in 0 1 8 "$full"; do
    snapshots_to "$n"
    if ((wb)); then
        writeback_mode
        for d in 1 16; do
            off=$((region_no * region))
            region_no=$((region_no + runs))
            iops[csnap_first_${n}_$d]=$(bench_first "$ourl" "$d" "$off" "$chunk")
            iops[csnap_rewrite_${n}_$d]=$(bench "$ourl" "$d" 1 "$off" "$chunk")
        done
    fi
    if ((dur)) && ((n == 1 || n == full)); then
        durable_mode
        for d in 1 16; do
            off=$((dbase + dregion_no * dregion))
            dregion_no=$((dregion_no + runs))
            iops[d_csnap_first_${n}_$d]=$(bench_first "$ourl" "$d" "$off" "$fstride")
            iops[d_csnap_rewrite_${n}_$d]=$(bench "$ourl" "$d" 1 "$off" "$fstride")
            if ((n == 1)); then
                # Snapshot 1 of this region: every chunk was copied out after
                # it was taken, so the reads go to the store.
                iops[d_csnap_snapread_$d]=$(bench "$surl" "$d" 0 "$off" "$fstride")
                check_off=$off
            fi
        done
    fi
done
if ((wb)); then
    writeback_mode
    # Snapshot reads: snapshot 1 of the last region (all its chunks were
    # copied out after it was taken, so the reads go to the store), and of a
    # region written before any snapshot (reads that stay on the origin,
    # under locks).
    for d in 1 16; do
        iops[csnap_snapread_store_$d]=$(bench "$surl" "$d" 0 $(( (region_no - 1) * region )) 4096)
        iops[csnap_snapread_origin_$d]=$(bench "$surl" "$d" 0 $(( (d == 1 ? 0 : 1) * region )) 4096)
    done
fi
# The data check: what the benchmark wrote is on the origin, and snapshot 1
# still reads what it had (zeros where only later writes went).
if ((dur)); then
    out=$(qemu-io -f raw -c "read -P 0xa5 $check_off 4k" -c "read -P 0xa5 $((check_off + 100 * fstride)) 4k" "$ourl")
    if grep -q -i "fail\|error" <<<"$out" || ! grep -q "^read 4096" <<<"$out"; then
        echo "data check failed: the origin does not hold the pattern written: $out" >&2; exit 1
    fi
    out=$(qemu-io -f raw -c "read -P 0 $check_off 4k" "$surl")
    if grep -q -i "fail\|error" <<<"$out"; then echo "data check failed: snapshot 1 changed: $out" >&2; exit 1; fi
else
    out=$(qemu-io -f raw -c "read -P 0xa5 0 4k" "$ourl")
    if grep -q -i "fail\|error" <<<"$out"; then echo "data check failed: $out" >&2; exit 1; fi
fi
grep -q "disk operation failed" "$up"/log/*.log 2>/dev/null && { echo "csnap logged disk errors" >&2; exit 1; }
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
row() { # label key-prefix reference-prefix
    local l=$1 k=$2 r=$3
    printf "%-52s %9s %6s %9s %6s\n" "$l" "${iops[${k}_1]}" "$(ratio "${iops[${k}_1]}" "${iops[${r}_1]}")" \
        "${iops[${k}_16]}" "$(ratio "${iops[${k}_16]}" "${iops[${r}_16]}")"
}
if ((wb)); then
    echo
    echo "== write-back vs page-cached qemu-nbd (not like for like): 4 KiB requests, $count per run, IOPS and ratio to raw qemu-nbd (same depth, same direction)"
    printf "%-52s %9s %6s %9s %6s\n" "target" "QD1" "ratio" "QD16" "ratio"
    row "qemu-nbd raw: writes" raw_write raw_write
    row "qemu-nbd raw: reads" raw_read raw_read
    row "qemu-nbd qcow2 overlay: first writes" qcow_first raw_write
    row "qemu-nbd qcow2 overlay: rewrites" qcow_rewrite raw_write
    row "qemu-nbd qcow2 overlay: reads" qcow_read raw_read
    for n in 0 1 8 "$full"; do
        row "csnap origin, $n snapshots: first writes" "csnap_first_$n" raw_write
        row "csnap origin, $n snapshots: rewrites" "csnap_rewrite_$n" raw_write
    done
    row "csnap snapshot export: reads (store)" csnap_snapread_store raw_read
    row "csnap snapshot export: reads (origin, locked)" csnap_snapread_origin raw_read
    echo
    for d in 1 16; do
        echo "write-back, $full vs 1 snapshot, first writes, QD$d: $(ratio "${iops[csnap_first_${full}_$d]}" "${iops[csnap_first_1_$d]}")"
    done
fi
if ((dur)); then
    echo
    echo "== durability-fair: flush after every write at QD1, every 16 at QD16; qemu-nbd --cache=none --aio=native; 4 KiB requests, $dcount per run, IOPS and ratio to the reference named"
    printf "%-52s %9s %6s %9s %6s\n" "target (reference)" "QD1" "ratio" "QD16" "ratio"
    row "qemu-nbd raw: writes (raw)" d_raw_write d_raw_write
    row "qemu-nbd raw: reads (raw)" d_raw_read d_raw_read
    row "qemu-nbd qcow2 overlay: first writes (overlay)" d_qcow_first d_qcow_first
    row "qemu-nbd qcow2 overlay: rewrites (raw)" d_qcow_rewrite d_raw_write
    row "csnap, 1 snapshot: first writes (overlay)" d_csnap_first_1 d_qcow_first
    row "csnap, $full snapshots: first writes (overlay)" "d_csnap_first_$full" d_qcow_first
    row "csnap, 1 snapshot: rewrites (raw)" d_csnap_rewrite_1 d_raw_write
    row "csnap, $full snapshots: rewrites (raw)" "d_csnap_rewrite_$full" d_raw_write
    row "csnap snapshot export: reads, store (raw)" d_csnap_snapread d_raw_read
    echo
    for d in 1 16; do
        echo "durable, $full vs 1 snapshot, first writes, QD$d: $(ratio "${iops[d_csnap_first_${full}_$d]}" "${iops[d_csnap_first_1_$d]}") (target: within 10%)"
    done
    echo "targets (issue #11): first writes >= 1.0x the qcow2 overlay at QD1 and QD16; rewrites >= 0.95x raw; snapshot reads >= 0.95x raw; $full vs 1 within 10% (#13 at 1024: within 15%)"
fi
