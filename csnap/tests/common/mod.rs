//! Helpers shared by the process tests of the `csnap` binary.

#![allow(dead_code)]

pub mod cluster;
pub mod faulty;
pub mod fs;
pub mod hacluster;
pub mod testbed;

#[allow(unused_imports)] // Not every test binary uses every helper.
pub use csnap_testkit::{fresh_dir, Proc};

/// Drives a metrics endpoint at `addr` (host:port) through every path its
/// loop takes, for the syscall audits: scrapes, a 404, a 405, garbage, an
/// oversized head, and a client that sends nothing (closed at the
/// deadline). Panics when a scrape is not a 200 with the Prometheus type.
pub fn scrape_for_audit(addr: &str) {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let ask = |req: &[u8]| -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let _ = s.write_all(req);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let idle = TcpStream::connect(addr).unwrap();
    for _ in 0..3 {
        let r = ask(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 ")
                && r.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n")
                && r.contains("csnap_build_info"),
            "{r}"
        );
    }
    assert!(ask(b"GET /x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    assert!(ask(b"DELETE /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
    assert!(ask(b"\x00garbage\n").starts_with("HTTP/1.1 400 "));
    let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    long.resize(8192, b'a');
    assert!(ask(&long).starts_with("HTTP/1.1 400 "));
    let mut idle = idle;
    idle.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(
        idle.read(&mut b).unwrap_or(0),
        0,
        "an idle client is closed"
    );
}
