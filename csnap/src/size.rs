//! Parsing of SIZE arguments: plain bytes or a binary suffix.

use csnap_pools::{CHUNK_SIZE_MAX_BYTES, CHUNK_SIZE_MIN_BYTES};

const SUFFIXES: &str = "K, KiB, M, MiB, G, GiB, T or TiB";

/// Parses `4096`, `16K`, `16KiB`, `2M`, `2MiB`, `1G`, `1GiB`, `1T`, `1TiB`.
/// Suffixes are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size: expected a whole number of bytes, optionally followed by {SUFFIXES}"
        ));
    }
    let shift = match suffix {
        "" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => {
            return Err(format!(
                "'{s}' has an unknown size suffix '{suffix}': use plain bytes or {SUFFIXES} (powers of 1024)"
            ))
        }
    };
    let too_big = || format!("size '{s}' does not fit in 64 bits");
    // `num` is all ASCII digits, so parsing fails only on overflow.
    let n: u64 = num.parse().map_err(|_| too_big())?;
    n.checked_mul(1u64 << shift).ok_or_else(too_big)
}

/// Parses a chunk size: a SIZE that is a power of two from 4 KiB to 1 MiB.
pub fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    let min = u64::from(CHUNK_SIZE_MIN_BYTES);
    let max = u64::from(CHUNK_SIZE_MAX_BYTES);
    if !(min..=max).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "chunk size {n} bytes is not a power of two from {min} (4 KiB) to {max} (1 MiB)"
        ));
    }
    u32::try_from(n).map_err(|_| format!("chunk size {n} does not fit in 32 bits"))
}

/// Parses a store size: a non-zero SIZE.
pub fn parse_store_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("store size must be more than 0 bytes".to_string()),
        n => Ok(n),
    }
}

/// `bytes` as a short human form when it is a whole number of a binary unit.
pub fn human(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_suffixed() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16K"), Ok(16 << 10));
        assert_eq!(parse_size("16KiB"), Ok(16 << 10));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert_eq!(parse_size("3GiB"), Ok(3 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
    }

    #[test]
    fn rejects_bad_strings() {
        for bad in [
            "", "K", "-1", "1.5G", " 1M", "1M ", "1 M", "16MB", "16kb", "1Q", "0x10", "1MiBB",
        ] {
            assert!(parse_size(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn rejects_overflow() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("16777216T").is_err());
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 << 40));
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size("4K"), Ok(4096));
        assert_eq!(parse_chunk_size("16384"), Ok(16384));
        assert_eq!(parse_chunk_size("1M"), Ok(1 << 20));
        for bad in ["3000", "2K", "2M", "12K", "0", "8G"] {
            assert!(parse_chunk_size(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn store_sizes() {
        assert_eq!(parse_store_size("256M"), Ok(256 << 20));
        assert!(parse_store_size("0").is_err());
    }

    #[test]
    fn human_forms() {
        assert_eq!(human(16384), "16 KiB");
        assert_eq!(human(256 << 20), "256 MiB");
        assert_eq!(human(4097), "4097 bytes");
        assert_eq!(human(0), "0 bytes");
    }
}
