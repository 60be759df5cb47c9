//! Tests on the multi-host test bed (issue #11): nodes in their own network
//! namespaces, each with its own loop devices (its own page cache), its own
//! agent and NBD server, and real NBD clients in its namespace.

mod common;

use common::cluster::{seed, Rng};
use common::testbed::{available, serial, Testbed, TestbedOpts};

/// The two-node stale-read scenario: node 1 writes through its export and
/// flushes; node 2 (which has read the block before, as a host using the
/// volume would) reads it through its own export; node 1 overwrites and
/// flushes; node 2 reads again. Each read must see the latest flushed data.
/// Returns the first failure.
fn stale_read(shared_loop: bool) -> Result<(), String> {
    let mut rng = Rng::new(seed("testbed-stale-read"));
    let mut tb = Testbed::up(
        if shared_loop { "stale-shared" } else { "stale" },
        TestbedOpts {
            nodes: 2,
            shared_loop,
            ..TestbedOpts::default()
        },
        &mut rng,
    );
    tb.start_nbd(1);
    tb.start_nbd(2);
    let (n1, n2) = (tb.node(1), tb.node(2));
    let (ok, out) = n2.qemu_io("origin", &["read 0 64k"]);
    assert!(ok, "node 2's first read:\n{out}");
    for pat in ["0xa1", "0xb2"] {
        let (ok, out) = n1.qemu_io("origin", &[&format!("write -P {pat} 0 64k"), "flush"]);
        assert!(ok, "node 1 writes {pat}:\n{out}");
        let (ok, out) = n2.qemu_io("origin", &[&format!("read -P {pat} 0 64k")]);
        if !ok {
            return Err(format!(
                "node 2 does not see node 1's flushed {pat}:\n{out}"
            ));
        }
    }
    Ok(())
}

/// The real test: per-node loop devices, as on separate hosts. Fails while
/// any device access goes through the page cache (each loop device has its
/// own): it needs O_DIRECT on every device access.
#[test]
fn two_nodes_see_each_others_flushed_origin_writes() {
    if !available() {
        eprintln!("skipped: needs root, ip and losetup");
        return;
    }
    let _g = serial();
    if let Err(e) = stale_read(false) {
        panic!("{e}");
    }
}

/// The harness's control: the same scenario with every node on one pair of
/// loop devices (one shared page cache) passes, so a failure of the test
/// above is the per-node page caches, not the harness.
#[test]
fn control_one_shared_loop_device_sees_flushed_writes() {
    if !available() {
        eprintln!("skipped: needs root, ip and losetup");
        return;
    }
    let _g = serial();
    if let Err(e) = stale_read(true) {
        panic!("{e}");
    }
}
