#!/usr/bin/env bash
# A multi-host test bed on one machine, by hand (issue #11; the tests use
# the same layout from csnap/tests/common/testbed.rs):
#
#   scripts/testbed.sh up DIR [NODES] [--shared-loop]
#   scripts/testbed.sh down DIR
#
# `up` formats DIR/origin.img (64 MiB) and DIR/store.img (256 MiB) if
# missing, creates a bridge csb<ID> (no address) and for each node N a
# network namespace csn<ID>-N, a veth pair into the bridge and the address
# 10.213.<X>.N/24, its own loop devices over the two files (its own page
# cache, as a SAN host has; --shared-loop: one pair for every node), then
# starts the controller on a host of its own (namespace csn<ID>-0, address
# 10.213.<X>.254, listening on TCP port 7790 and on
# DIR/cluster/controller.sock for `csnap cluster` commands) and in each
# node's namespace its agent (bus to the controller over TCP, servers on
# TCP at the node's address) and an NBD server on N's address, port 10809,
# and on DIR/cluster/node-N/nbd.sock. It prints how to reach each node.
# `down` kills every process of the namespaces, detaches the
# loop devices and deletes the namespaces and the bridge (state in
# DIR/testbed.env).
#
# Needs root, ip (iproute2), losetup; csnap from target/release (or $CSNAP).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
csnap=${CSNAP:-$here/target/release/csnap}

usage() {
    echo "usage: $0 up DIR [NODES] [--shared-loop] | down DIR" >&2
    exit 2
}

up() {
    local dir=$1 nodes=${2:-2} shared=${3:-}
    [[ "$nodes" =~ ^[1-9]$ ]] || usage
    [[ -z "$shared" || "$shared" == --shared-loop ]] || usage
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ ! -e "$dir/testbed.env" ]] || { echo "$dir: a test bed is up (down first)" >&2; exit 1; }
    if [[ ! -e "$dir/store.img" ]]; then
        truncate -s 64M "$dir/origin.img"
        "$csnap" format --origin "$dir/origin.img" --store "$dir/store.img" --store-size 256M
    fi
    local id x i n
    id=$(printf '%05x' $(( ($$ << 4) & 0xfffff )))
    x=$(( 1 + $$ % 250 ))
    local env="$dir/testbed.env"
    echo "ID=$id" >"$env"
    echo "NODES=$nodes" >>"$env"
    ip link add "csb$id" type bridge
    ip link set "csb$id" up
    local so="" ss=""
    if [[ -n "$shared" ]]; then
        so=$(losetup -f --show "$dir/origin.img")
        ss=$(losetup -f --show "$dir/store.img")
        echo "LOOPS+=($so $ss)" >>"$env"
    fi
    host() { # NS IP VETH-SUFFIX
        ip netns add "$1"
        ip link add "csv${id}h$3" type veth peer name "csv${id}p$3"
        ip link set "csv${id}p$3" netns "$1"
        ip link set "csv${id}h$3" master "csb$id"
        ip link set "csv${id}h$3" up
        ip netns exec "$1" ip link set lo up
        ip netns exec "$1" ip addr add "$2/24" dev "csv${id}p$3"
        ip netns exec "$1" ip link set "csv${id}p$3" up
    }
    local bus="10.213.$x.254:7790"
    host "csn$id-0" "10.213.$x.254" 0
    ip netns exec "csn$id-0" "$csnap" cluster run --dir "$dir/cluster" --listen "$bus" \
        >"$dir/controller.log" 2>&1 &
    for ((i = 0; i < 200; i++)); do
        [[ -S "$dir/cluster/controller.sock" ]] && break
        sleep 0.05
    done
    for ((n = 1; n <= nodes; n++)); do
        local ns="csn$id-$n" ip="10.213.$x.$n"
        host "$ns" "$ip" "$n"
        local o=$so s=$ss
        if [[ -z "$shared" ]]; then
            o=$(losetup -f --show "$dir/origin.img")
            s=$(losetup -f --show "$dir/store.img")
            echo "LOOPS+=($o $s)" >>"$env"
        fi
        ip netns exec "$ns" "$csnap" agent --dir "$dir/cluster" --node "$n" \
            --origin "$o" --store "$s" --controller "$bus" --server-listen "$ip" \
            >"$dir/agent-$n.log" 2>&1 &
        for ((i = 0; i < 200; i++)); do
            [[ -S "$dir/cluster/node-$n/agent.sock" ]] && break
            sleep 0.05
        done
        ip netns exec "$ns" "$csnap" nbd --agent "$dir/cluster/node-$n/agent.sock" --node "$n" \
            --origin "$o" --store "$s" --listen "$ip:10809" \
            --listen "$dir/cluster/node-$n/nbd.sock" >"$dir/nbd-$n.log" 2>&1 &
        echo "node $n: namespace $ns, address $ip, origin $o, store $s"
        echo "  ip netns exec $ns qemu-io -f raw nbd://$ip:10809/origin"
    done
    echo "cluster: $csnap cluster status --dir $dir/cluster; logs in $dir/*.log"
    echo "snapshots (from the controller's host, over TCP):"
    echo "  ip netns exec csn$id-0 $csnap snapshot list --server \$($csnap cluster status --dir $dir/cluster | sed -n 's/.* at //p')"
    echo "down:    $0 down $dir"
}

down() {
    local dir=$1 env="$1/testbed.env"
    [[ -e "$env" ]] || { echo "$dir: no test bed" >&2; exit 1; }
    local ID NODES LOOPS=()
    # shellcheck disable=SC1090
    source "$env"
    local n i
    for ((n = 0; n <= NODES; n++)); do
        local ns="csn$ID-$n"
        # shellcheck disable=SC2046
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL || true
    done
    sleep 0.2
    for l in "${LOOPS[@]}"; do
        losetup -d "$l" 2>/dev/null || true
    done
    for ((n = 0; n <= NODES; n++)); do
        ip netns del "csn$ID-$n" 2>/dev/null || true
    done
    ip link del "csb$ID" 2>/dev/null || true
    rm -f "$env"
    echo "down: $dir"
}

case "${1:-}" in
up) [[ $# -ge 2 ]] || usage; up "$2" "${3:-2}" "${4:-}" ;;
down) [[ $# -eq 2 ]] || usage; down "$2" ;;
*) usage ;;
esac
