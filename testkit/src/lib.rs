//! What csnap's tests share, so each is written once: the seeded
//! generators of test data and schedules ([`rng`]), the process helpers
//! (scratch directories, children killed on drop, waiting for a condition;
//! [`proc`]), a comparison of device contents that says where they
//! differ ([`bytes`]) and a command's output as text ([`output`]). A dev-dependency only: nothing here runs in a product binary,
//! so it allocates and panics freely. The counting allocator of the
//! no-allocation tests is `csnap_sys::alloc::CountingAlloc`, not here.

pub mod bytes;
pub mod output;
pub mod proc;
pub mod rng;

pub use bytes::assert_same_bytes;
pub use output::{stderr, stdout, text};
pub use proc::{fresh_dir, wait_for, wait_for_every, Proc, TempDir};
pub use rng::{seed, Rng, SplitMix64, XorShift64, GOLDEN_GAMMA};
