//! Seeded, reproducible generators for test data and schedules. Not for
//! anything secret. Each test prints or fixes its seed, so a failure
//! replays.

/// 2^64 / φ, odd: the splitmix64 increment, and a multiplier that spreads a
/// small seed over all 64 bits.
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Marsaglia's xorshift64 (shifts 13, 7, 17). The state is the output, so
/// it never yields 0; the seed must not be 0.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from a nonzero seed.
    #[must_use]
    pub const fn new(seed: u64) -> XorShift64 {
        assert!(seed != 0, "xorshift64 needs a nonzero seed");
        XorShift64(seed)
    }

    /// The next value (the new state).
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }

    /// Fills `buf` with the little-endian bytes of successive values (the
    /// last value is cut to what is left).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            b.copy_from_slice(&v[..b.len()]);
        }
    }
}

/// splitmix64: every seed is good, 0 included.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from any seed.
    #[must_use]
    pub const fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }
}

/// xorshift64*: the process tests' generator, from any seed (spread by
/// [`GOLDEN_GAMMA`], forced odd).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from any seed.
    #[must_use]
    pub const fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(GOLDEN_GAMMA) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }

    /// `len` random bytes, never zero (a stray read of zeroes shows).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            for b in self.next_u64().to_le_bytes() {
                if v.len() < len {
                    v.push(b | 1);
                }
            }
        }
        v
    }
}

/// The seed of a randomised test: `CSNAP_TEST_SEED` or the clock. Printed,
/// so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("CSNAP_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_nanos() % (1 << 64)).unwrap_or(1))
        });
    eprintln!("{test}: seed {s} (replay with CSNAP_TEST_SEED={s})");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generators are the ones the tests were written with: their
    /// first values are pinned, so a change here cannot silently change
    /// every test's data.
    #[test]
    fn first_values_are_pinned() {
        let mut x = XorShift64::new(1);
        assert_eq!(x.next_u64(), 0x4082_2041);
        let mut s = SplitMix64::new(0);
        assert_eq!(s.next_u64(), 0xe220_a839_7b1d_cdaf);
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0x47e4_ce4b_896c_dd1d);
    }

    #[test]
    fn fill_cuts_the_last_value() {
        let mut a = XorShift64::new(7);
        let mut b = XorShift64::new(7);
        let mut buf = [0u8; 11];
        a.fill(&mut buf);
        assert_eq!(buf[..8], b.next_u64().to_le_bytes());
        assert_eq!(buf[8..], b.next_u64().to_le_bytes()[..3]);
    }
}
