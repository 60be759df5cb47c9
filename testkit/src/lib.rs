//! What csnap's tests share, so each is written once: the seeded
//! generators of test data and schedules ([`rng`]), and the process helpers
//! (scratch directories, children killed on drop, waiting for a condition;
//! [`proc`]). A dev-dependency only: nothing here runs in a product binary,
//! so it allocates and panics freely. The counting allocator of the
//! no-allocation tests is `csnap_sys::alloc::CountingAlloc`, not here.

pub mod proc;
pub mod rng;

pub use proc::{fresh_dir, wait_for, Proc};
pub use rng::{seed, Rng, SplitMix64, XorShift64, GOLDEN_GAMMA};
