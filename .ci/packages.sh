#!/usr/bin/env bash
# Installs the Debian packages the tests and the main job need, only those
# missing. Sourced by .ci/run and .ci/demo.
#   strace      the syscall audits (csnap/tests/audit.rs)
#   qemu-utils  qemu-img, qemu-io, qemu-nbd: NBD interop tests, benchmarks
#   libnbd-bin  nbdinfo, nbdcopy, nbdfuse: NBD interop tests
#   file        what `nbdinfo --list --content` runs (block-status interop test)
#   fuse3       fusermount3 for nbdfuse
#   e2fsprogs   mkfs.ext4, e2fsck (interop test: a file system on an export)
#   stress-ng   the memory hog of scripts/mem-pressure-bench.sh
#   iproute2    ip: network namespaces, veths, a bridge (csnap/tests/testbed.rs)
#   mount       losetup: each test-bed node's own loop devices
#   prometheus  promtool check metrics: the metrics endpoint's text (csnap/tests/metrics.rs)
#   nbdkit      its error filter: the disk that really fails
#               (csnap/tests/failing_disk.rs)
#   afl++       the toolchain (clang, make) cargo-afl builds its AFL++ with;
#               scripts/fuzz.sh runs cargo-afl's own afl-fuzz (its runtime
#               and fork server must match)
#   corosync pacemaker pacemaker-cli-utils crmsh resource-agents fence-agents
#               the real cluster engine on the test bed (#12, scripts/hacluster.sh):
#               membership and quorum, placement (ocf-tester), fencing
#   libcorosync-common-dev libcpg-dev libquorum-dev libcmap-dev
#   libvotequorum-dev libcfg-dev
#               what the rust-corosync crate links (the membership relay)
#   libxml2-utils  xmllint, which ocf-tester runs on the resource agent's meta-data
csnap_install_packages() {
    local wanted=(strace qemu-utils libnbd-bin file fuse3 e2fsprogs stress-ng iproute2 mount
        prometheus nbdkit afl++
        corosync pacemaker pacemaker-cli-utils crmsh resource-agents fence-agents
        libcorosync-common-dev libcpg-dev libquorum-dev libcmap-dev libvotequorum-dev libcfg-dev
        libxml2-utils)
    local missing=()
    for p in "${wanted[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        sudo=(sudo)
    fi
    echo "== apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}
