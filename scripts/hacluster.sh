#!/usr/bin/env bash
# An N-node corosync + Pacemaker cluster on the test bed's layout, without
# systemd (issue #12):
#
#   scripts/hacluster.sh up DIR [NODES] [--csnap]   (NODES 1..9, default 3)
#   scripts/hacluster.sh down DIR
#   scripts/hacluster.sh exec DIR N CMD...  (CMD in node N's network and mount namespaces)
#   scripts/hacluster.sh restart DIR N      (node N again after it was fenced or killed:
#                                            corosync, Pacemaker, and csnap if it ran csnap)
#
# Network as scripts/testbed.sh: a bridge csb<ID> without an address, node N
# in network namespace csn<ID>-N with 10.213.<X>.N/24 on a veth into it.
# Each node also gets a mount namespace of its own (`unshare -m`, private
# propagation) with bind mounts over /etc/corosync, /var/lib/corosync,
# /var/lib/pacemaker (hacluster:haclient), /var/log/corosync,
# /var/log/pacemaker (all under DIR/node-N/), a tmpfs on /run (the host's
# /run/netns bound back in, for the fence agent) and one on /dev/shm. libqb's IPC sockets are
# abstract, so per network namespace: the nodes' daemons do not meet.
# corosync: knet on the nodes' addresses, token 300 ms; Pacemaker's first
# CIB is written before it starts (dc-deadtime 2s, stonith-enabled true,
# stonith-action off, the test-bed fence agent fence_csnap_ns as one
# stonith resource per node), so the first DC is elected about 2 s after the
# last node started instead of the default 20 s.
# With --csnap, csnap runs on it: DIR/origin.img (64 MiB) and DIR/store.img
# (256 MiB) are formatted if missing (on tmpfs, $CSNAP_HA_DISKS or /dev/shm,
# linked from DIR; `down` deletes them); each node gets its own loop devices
# over them (listed in DIR/node-N/loops), its membership relay (csnap-relay
# --dir /run/csnap --node N: /run is the node's own), its agent (bus to the
# relay's socket, servers on TCP at the node's address) and an NBD server
# on N's address, port 10809, and DIR/cluster/node-N/nbd.sock; then the
# Pacemaker resource csnap-server (ocf:csnap:server, relay_dir=/run/csnap)
# is created and the script waits until a node serves.
# Installs ocf/csnap/server into /usr/lib/ocf/resource.d/csnap/ and
# fence/fence_csnap_ns into /usr/sbin/.
# `down` stops every process of the nodes (SIGKILL), which ends their mount
# namespaces, detaches loop devices listed in DIR/node-*/loops, deletes the
# namespaces, veths and the bridge: nothing is left running or mounted.
#
# Needs root, ip (iproute2), unshare/nsenter (util-linux), corosync, pacemaker.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
csnap=${CSNAP:-$here/target/release/csnap}
relay=${CSNAP_RELAY:-$here/target/release/csnap-relay}
TOKEN_MS=${CSNAP_HA_TOKEN_MS:-300}
TOKEN_COEFFICIENT=${CSNAP_HA_TOKEN_COEFFICIENT:-0}
DC_DEADTIME=${CSNAP_HA_DC_DEADTIME:-2s}
KNET_PING_INTERVAL_MS=${CSNAP_HA_KNET_PING_INTERVAL_MS:-100}
KNET_PING_TIMEOUT_MS=${CSNAP_HA_KNET_PING_TIMEOUT_MS:-1000}

usage() {
    echo "usage: $0 up DIR [NODES] [--csnap] | down DIR | exec DIR N CMD..." >&2
    exit 2
}

# Runs inside node N's fresh mount namespace (and its network namespace):
# the private mounts, then corosync (it daemonizes), then pacemakerd in the
# foreground (exec: this process becomes it).
node_start() {
    local nd=$1
    mount --make-rprivate /
    mkdir -p "$nd/netns-view"
    mount --rbind /run/netns "$nd/netns-view"
    mount -t tmpfs -o mode=0755 tmpfs /run
    mkdir -p /run/netns
    mount --rbind "$nd/netns-view" /run/netns
    umount -l "$nd/netns-view"
    mount --bind "$nd/etc-corosync" /etc/corosync
    mount --bind "$nd/var-lib-corosync" /var/lib/corosync
    mount --bind "$nd/var-lib-pacemaker" /var/lib/pacemaker
    mount --bind "$nd/log-corosync" /var/log/corosync
    mount --bind "$nd/log-pacemaker" /var/log/pacemaker
    # The node's own /dev/shm, as a host has: libqb keeps corosync's and
    # Pacemaker's IPC rings and blackbox (8 MB each) there, and a SIGKILLed
    # daemon never removes them. On the host's /dev/shm every node kill
    # leaked them (22 GB of RAM after a day of benchmarks); here they go
    # with the mount namespace when the node's last process dies.
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    mkdir -p /run/csnap /run/crm /run/pacemaker /run/corosync
    chown hacluster:haclient /run/crm /run/pacemaker
    corosync
    echo $$ >"$nd/pacemakerd.pid.new"
    mv "$nd/pacemakerd.pid.new" "$nd/pacemakerd.pid"
    exec pacemakerd
}

write_conf() { # NODEDIR NODES X
    local nd=$1 nodes=$2 x=$3 n
    {
        cat <<CONF
totem {
    version: 2
    cluster_name: csnap
    transport: knet
    token: $TOKEN_MS
    token_coefficient: $TOKEN_COEFFICIENT
    join: 50
    crypto_cipher: none
    crypto_hash: none
    interface {
        linknumber: 0
        knet_ping_interval: $KNET_PING_INTERVAL_MS
        knet_ping_timeout: $KNET_PING_TIMEOUT_MS
    }
}
nodelist {
CONF
        for ((n = 1; n <= nodes; n++)); do
            cat <<CONF
    node {
        ring0_addr: 10.213.$x.$n
        nodeid: $n
        name: n$n
    }
CONF
        done
        cat <<CONF
}
quorum {
    provider: corosync_votequorum
}
logging {
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_syslog: no
    to_stderr: no
    timestamp: hires
}
CONF
    } >"$nd/etc-corosync/corosync.conf"
}

write_cib() { # NODEDIR NODES ID DIR
    local nd=$1 nodes=$2 id=$3 dir=$4 n
    {
        cat <<CIB
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-dc-deadtime" name="dc-deadtime" value="$DC_DEADTIME"/>
        <nvpair id="opt-stonith-enabled" name="stonith-enabled" value="${CSNAP_HA_STONITH:-true}"/>
        <nvpair id="opt-stonith-action" name="stonith-action" value="off"/>
        <nvpair id="opt-no-quorum-policy" name="no-quorum-policy" value="stop"/>
        <nvpair id="opt-cluster-recheck" name="cluster-recheck-interval" value="1min"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources>
CIB
        for ((n = 1; n <= nodes; n++)); do
            cat <<CIB
      <primitive id="fence-n$n" class="stonith" type="fence_csnap_ns">
        <instance_attributes id="fence-n$n-ia">
          <nvpair id="fence-n$n-host" name="pcmk_host_list" value="n$n"/>
          <nvpair id="fence-n$n-prefix" name="ns_prefix" value="csn$id-"/>
          <nvpair id="fence-n$n-dir" name="testbed_dir" value="$dir"/>
        </instance_attributes>
        <operations>
          <op id="fence-n$n-mon" name="monitor" interval="60s"/>
        </operations>
      </primitive>
CIB
        done
        echo "    </resources>"
        echo "    <constraints>"
        for ((n = 1; n <= nodes; n++)); do
            echo "      <rsc_location id=\"fence-n$n-not-self\" rsc=\"fence-n$n\" node=\"n$n\" score=\"-INFINITY\"/>"
        done
        cat <<CIB
    </constraints>
  </configuration>
  <status/>
</cib>
CIB
    } >"$nd/var-lib-pacemaker/cib/cib.xml"
    chown hacluster:haclient "$nd/var-lib-pacemaker/cib/cib.xml"
    chmod 600 "$nd/var-lib-pacemaker/cib/cib.xml"
}

install_agents() {
    install -D -m 0755 "$here/ocf/csnap/server" /usr/lib/ocf/resource.d/csnap/server
    install -D -m 0755 "$here/fence/fence_csnap_ns" /usr/sbin/fence_csnap_ns
}

up() {
    local dir=$1 nodes=${2:-3} with_csnap=${3:-}
    [[ "$nodes" =~ ^[1-9]$ ]] || usage
    [[ -z "$with_csnap" || "$with_csnap" == --csnap ]] || usage
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [[ ! -e "$dir/hacluster.env" ]] || { echo "$dir: a cluster is up (down first)" >&2; exit 1; }
    install_agents
    local id x n
    id=$(printf '%05x' $(( ($$ << 4) & 0xfffff )))
    x=$(( 1 + $$ % 250 ))
    local env="$dir/hacluster.env"
    { echo "ID=$id"; echo "X=$x"; echo "NODES=$nodes"; } >"$env"
    ip link add "csb$id" type bridge
    ip link set "csb$id" up
    for ((n = 1; n <= nodes; n++)); do
        local ns="csn$id-$n" ip="10.213.$x.$n" nd="$dir/node-$n"
        ip netns add "$ns"
        ip link add "csv${id}h$n" type veth peer name "csv${id}p$n"
        ip link set "csv${id}p$n" netns "$ns"
        ip link set "csv${id}h$n" master "csb$id"
        ip link set "csv${id}h$n" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip addr add "$ip/24" dev "csv${id}p$n"
        ip netns exec "$ns" ip link set "csv${id}p$n" up
        rm -rf "$nd"
        mkdir -p "$nd"/{etc-corosync,var-lib-corosync,log-corosync,log-pacemaker}
        mkdir -p "$nd"/var-lib-pacemaker/{cib,pengine,blackbox,cores}
        chown -R hacluster:haclient "$nd/var-lib-pacemaker" "$nd/log-pacemaker"
        chmod 750 "$nd"/var-lib-pacemaker/*
        write_conf "$nd" "$nodes" "$x"
        write_cib "$nd" "$nodes" "$id" "$dir"
    done
    for ((n = 1; n <= nodes; n++)); do
        local nd="$dir/node-$n"
        setsid ip netns exec "csn$id-$n" unshare -m --propagation private \
            "$0" node-start "$nd" >"$nd/pacemakerd.out" 2>&1 </dev/null &
    done
    # Wait for Pacemaker to see every node online (DC elected).
    local i online=""
    for ((i = 0; i < 600; i++)); do
        if online=$(node_exec "$dir" 1 timeout 5 crm_mon -1 -X 2>/dev/null | grep -c 'online="true"'); then
            [[ "$online" -ge "$nodes" ]] && break
        fi
        sleep 0.1
    done
    if [[ "${online:-0}" -lt "$nodes" ]]; then
        echo "hacluster: only ${online:-0} of $nodes nodes online after 60 s" >&2
        exit 1
    fi
    for ((n = 1; n <= nodes; n++)); do
        echo "node n$n: namespace csn$id-$n, address 10.213.$x.$n"
    done
    if [[ -n "$with_csnap" ]]; then
        csnap_up "$dir" "$nodes" "$x"
    fi
    echo "commands in a node: $0 exec $dir N crm_mon -1 | corosync-quorumtool -s | crm ..."
    echo "down: $0 down $dir"
}

csnap_up() { # DIR NODES X
    local dir=$1 nodes=$2 x=$3 n i
    if [[ ! -e "$dir/store.img" ]]; then
        # The shared disks live on tmpfs (CSNAP_HA_DISKS, default /dev/shm),
        # not beside the logs: behind a SAN's LUNs there is no host file
        # system. Over a file on the host's ext4 the loop devices' writes
        # and flushes become that file system's dirty pages and journal
        # commits, and every daemon's log write waits behind them: corosync
        # then misses a 300 ms token for no network reason (both nodes at
        # the same millisecond), and membership flaps.
        local disks="${CSNAP_HA_DISKS:-/dev/shm}/csnap-ha-$(basename "$dir")-$$"
        mkdir -p "$disks"
        echo "DISKS=$disks" >>"$dir/hacluster.env"
        # (tmpfs has no O_DIRECT, which csnap insists on: formatted through
        # loop devices, as the nodes use it.)
        truncate -s 64M "$disks/origin.img"
        truncate -s 256M "$disks/store.img"
        local fo fs
        fo=$(losetup -f --show "$disks/origin.img")
        fs=$(losetup -f --show "$disks/store.img")
        "$csnap" format --origin "$fo" --store "$fs" >/dev/null
        losetup -d "$fo" "$fs"
        ln -sfn "$disks/origin.img" "$dir/origin.img"
        ln -sfn "$disks/store.img" "$dir/store.img"
    fi
    for ((n = 1; n <= nodes; n++)); do
        csnap_node_up "$dir" "$n" "$x"
    done
    node_exec "$dir" 1 cibadmin --create -o resources --xml-text \
"<primitive id=\"csnap-server\" class=\"ocf\" provider=\"csnap\" type=\"server\">
  <instance_attributes id=\"csnap-server-ia\">
    <nvpair id=\"csnap-server-relay\" name=\"relay_dir\" value=\"/run/csnap\"/>
    <nvpair id=\"csnap-server-bin\" name=\"csnap\" value=\"$csnap\"/>
  </instance_attributes>
  <meta_attributes id=\"csnap-server-meta\">
    <nvpair id=\"csnap-server-stick\" name=\"resource-stickiness\" value=\"100\"/>
  </meta_attributes>
  <operations>
    <op id=\"csnap-server-start\" name=\"start\" interval=\"0\" timeout=\"30s\"/>
    <op id=\"csnap-server-stop\" name=\"stop\" interval=\"0\" timeout=\"30s\"/>
    <op id=\"csnap-server-mon\" name=\"monitor\" interval=\"${CSNAP_HA_MONITOR:-1s}\" timeout=\"10s\"/>
  </operations>
</primitive>"
    for ((i = 0; i < 300; i++)); do
        node_exec "$dir" 1 "$csnap" cluster status --dir /run/csnap 2>/dev/null | grep -q '^server: incarnation' && break
        sleep 0.1
    done
    node_exec "$dir" 1 "$csnap" cluster status --dir /run/csnap
}

# Starts node N's csnap processes (relay, agent, NBD server) in its
# namespaces, with its own loop devices.
csnap_node_up() { # DIR N X
    local dir=$1 n=$2 x=$3 nd="$1/node-$2" ip="10.213.$3.$2" i o s
    o=$(losetup -f --show "$dir/origin.img")
    echo "$o" >>"$nd/loops"
    s=$(losetup -f --show "$dir/store.img")
    echo "$s" >>"$nd/loops"
    setsid "$0" exec "$dir" "$n" "$relay" --dir /run/csnap --node "$n" \
        >>"$nd/relay.log" 2>&1 </dev/null &
    for ((i = 0; i < 200; i++)); do
        node_exec "$dir" "$n" test -S /run/csnap/controller.sock && break
        sleep 0.05
    done
    mkdir -p "$dir/cluster"
    setsid "$0" exec "$dir" "$n" "$csnap" agent --dir "$dir/cluster" --node "$n" \
        --origin "$o" --store "$s" --controller /run/csnap/controller.sock --server-listen "$ip" \
        >>"$nd/agent.log" 2>&1 </dev/null &
    for ((i = 0; i < 200; i++)); do
        [[ -S "$dir/cluster/node-$n/agent.sock" ]] && break
        sleep 0.05
    done
    setsid "$0" exec "$dir" "$n" "$csnap" nbd --agent "$dir/cluster/node-$n/agent.sock" --node "$n" \
        --origin "$o" --store "$s" --listen "$ip:10809" \
        --listen "$dir/cluster/node-$n/nbd.sock" >>"$nd/nbd.log" 2>&1 </dev/null &
    echo "node n$n: csnap agent, relay and NBD server (nbd://$ip:10809/origin); origin $o, store $s"
}

# Runs CMD in node N's network and mount namespaces (those of its pacemakerd).
node_exec() {
    local dir=$1 n=$2
    shift 2
    local pid
    pid=$(cat "$dir/node-$n/pacemakerd.pid")
    nsenter -t "$pid" -m -n "$@"
}

restart() {
    local dir=$1 n=$2 env="$1/hacluster.env"
    [[ -e "$env" ]] || { echo "$dir: no cluster" >&2; exit 1; }
    local ID X NODES i
    # shellcheck disable=SC1090
    source "$env"
    [[ -z "$(ip netns pids "csn$ID-$n" 2>/dev/null)" ]] || { echo "node $n still runs" >&2; exit 1; }
    local nd="$dir/node-$n"
    if [[ -e "$nd/loops" ]]; then
        while read -r l; do losetup -d "$l" 2>/dev/null || true; done <"$nd/loops"
        rm -f "$nd/loops"
    fi
    # corosync and Pacemaker keep no state the node needs on disk here.
    rm -f "$nd"/var-lib-corosync/* "$nd/pacemakerd.pid" 2>/dev/null || true
    setsid ip netns exec "csn$ID-$n" unshare -m --propagation private \
        "$0" node-start "$nd" >>"$nd/pacemakerd.out" 2>&1 </dev/null &
    for ((i = 0; i < 600; i++)); do
        if [[ -e "$nd/pacemakerd.pid" ]] && node_exec "$dir" "$n" corosync-quorumtool -s >/dev/null 2>&1; then
            break
        fi
        sleep 0.1
    done
    if [[ -e "$dir/store.img" && -d "$dir/cluster" ]]; then
        csnap_node_up "$dir" "$n" "$X"
    fi
}

down() {
    local dir=$1 env="$1/hacluster.env"
    [[ -e "$env" ]] || { echo "$dir: no cluster" >&2; exit 1; }
    local ID X NODES DISKS="" n i
    # shellcheck disable=SC1090
    source "$env"
    for ((i = 0; i < 50; i++)); do
        local left=0
        for ((n = 1; n <= NODES; n++)); do
            local pids
            pids=$(ip netns pids "csn$ID-$n" 2>/dev/null || true)
            if [[ -n "$pids" ]]; then
                left=1
                # shellcheck disable=SC2086
                kill -KILL $pids 2>/dev/null || true
            fi
        done
        ((left)) || break
        sleep 0.1
    done
    for ((n = 1; n <= NODES; n++)); do
        if [[ -e "$dir/node-$n/loops" ]]; then
            while read -r l; do losetup -d "$l" 2>/dev/null || true; done <"$dir/node-$n/loops"
            rm -f "$dir/node-$n/loops"
        fi
        ip netns del "csn$ID-$n" 2>/dev/null || true
    done
    ip link del "csb$ID" 2>/dev/null || true
    if [[ -n "${DISKS:-}" ]]; then
        rm -rf "$DISKS"
        rm -f "$dir/origin.img" "$dir/store.img"
    fi
    rm -f "$env"
    echo "down: $dir"
}

case "${1:-}" in
up) [[ $# -ge 2 ]] || usage; up "$2" "${3:-3}" "${4:-}" ;;
down) [[ $# -eq 2 ]] || usage; down "$2" ;;
restart) [[ $# -eq 3 ]] || usage; restart "$2" "$3" ;;
exec) # exec: the caller's child is the command itself (its kill reaches it)
    [[ $# -ge 4 ]] || usage
    d=$2 n=$3
    shift 3
    exec nsenter -t "$(cat "$d/node-$n/pacemakerd.pid")" -m -n "$@"
    ;;
node-start) node_start "$2" ;;
*) usage ;;
esac
