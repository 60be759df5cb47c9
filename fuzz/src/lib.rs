//! Fuzz targets of every csnap decoder (issue #15), shared by the AFL++
//! driver (`fuzz/afl`, run by `scripts/fuzz.sh`) and the plain-test replay
//! of the seed corpus (`fuzz/tests/corpus.rs`, part of `cargo test`).
//!
//! Each target takes arbitrary bytes and asserts: no panic, and whatever
//! decodes is internally consistent (re-encoding round-trips where an
//! encoder exists; a structurally accepted block answers its own queries;
//! `check` and the running store agree). On-disk blocks are re-sealed
//! after the fuzzer's mutation (magic, version, kind and checksum made
//! right), otherwise the fuzzer would only test the crc32c.
//!
//! | target | decoder |
//! |---|---|
//! | `wire_frame` | `csnap_proto::decode`, `peek_header`, `FrameReader` |
//! | `nbd_session` | `csnap_fsm::nbd::NbdSession` (handshake and commands) |
//! | `label` | `Label::decode`, `check`, `validate` |
//! | `superblock` | `Super::decode`, `check`, `validate_super` |
//! | `leaf` | `tree::check_leaf` and the leaf accessors |
//! | `node` | `tree::check_node` and routing |
//! | `bitmap` | `layout::check_bitmap` |
//! | `journal` | `journal::read_commit`, replay in `check` and `Store::open` |
//! | `store_image` | a whole store with one block replaced: `check`, open, lookups, writes, creates, deletes |
//! | `start_line` | the standby's `start ...` line |

// Fuzz inputs index small test stores with u64 block numbers.
#![allow(clippy::cast_possible_truncation)]

mod nbd;
mod store;
mod wire;

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name: the corpus directory `fuzz/corpus/<name>/`.
    pub name: &'static str,
    /// Runs one input; panics on a finding.
    pub run: fn(&[u8]),
    /// The seed inputs, generated from real frames and blocks.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "wire_frame",
        run: wire::wire_frame,
        seeds: wire::seeds,
    },
    Target {
        name: "nbd_session",
        run: nbd::nbd_session,
        seeds: nbd::seeds,
    },
    Target {
        name: "label",
        run: store::label,
        seeds: store::label_seeds,
    },
    Target {
        name: "superblock",
        run: store::superblock,
        seeds: store::superblock_seeds,
    },
    Target {
        name: "leaf",
        run: store::leaf,
        seeds: store::leaf_seeds,
    },
    Target {
        name: "node",
        run: store::node,
        seeds: store::node_seeds,
    },
    Target {
        name: "bitmap",
        run: store::bitmap,
        seeds: store::bitmap_seeds,
    },
    Target {
        name: "journal",
        run: store::journal,
        seeds: store::journal_seeds,
    },
    Target {
        name: "store_image",
        run: store::store_image,
        seeds: store::store_image_seeds,
    },
    Target {
        name: "start_line",
        run: start_line,
        seeds: start_line_seeds,
    },
];

/// The target called `name`.
#[must_use]
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The standby's start line: a parsed line is within the arrays, and the
/// same line with a newline and garbage after it parses the same.
fn start_line(data: &[u8]) {
    const N: usize = csnap_pools::START_LIST_MAX;
    let mut members = [0u32; N];
    let mut expected = [(0u64, 0u32); N];
    let r = csnap_fsm::start_line::parse_start_line(data, &mut members, &mut expected);
    if let Ok(p) = r {
        assert!(p.members <= N && p.expected <= N);
        let line = data.split(|&c| c == b'\n').next().unwrap_or(&[]);
        let mut again = line.to_vec();
        again.extend_from_slice(b"\nmember=garbage \xff");
        let (mut m2, mut e2) = ([0u32; N], [(0u64, 0u32); N]);
        let r2 = csnap_fsm::start_line::parse_start_line(&again, &mut m2, &mut e2);
        assert_eq!(r2, Ok(p));
        assert_eq!(members[..p.members], m2[..p.members]);
        assert_eq!(expected[..p.expected], e2[..p.expected]);
    }
}

fn start_line_seeds() -> Vec<Vec<u8>> {
    [
        &b"start\n"[..],
        b"start member=1\n",
        b"start member=1 member=2 expect=9:1 expect=10:2\n",
        b"start expect=18446744073709551615:4294967295\n",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}
