//! Comparing device contents.

/// Asserts `got == want`, reporting the first and last differing bytes and
/// their chunks (of `chunk_bytes`) instead of megabytes of dump.
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8], chunk_bytes: u64) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if got == want {
        return;
    }
    let diff = |(a, b): (&u8, &u8)| a != b;
    let first = got.iter().zip(want).position(diff).unwrap_or(0);
    let last = got.iter().zip(want).rposition(diff).unwrap_or(0);
    let n = got.iter().zip(want).filter(|p| diff(*p)).count();
    let end = (first + 8).min(got.len());
    let (first_at, last_at) = (first as u64, last as u64);
    panic!(
        "{what}: contents differ from the shadow: {n} bytes differ, first at byte {first} \
         (chunk {}, +{}), last at byte {last} (chunk {}); at the first: got {:02x?} want {:02x?}",
        first_at / chunk_bytes,
        first_at % chunk_bytes,
        last_at / chunk_bytes,
        &got[first..end],
        &want[first..end]
    );
}

#[cfg(test)]
mod tests {
    use super::assert_same_bytes;

    #[test]
    fn equal_contents_pass() {
        assert_same_bytes("same", &[1, 2, 3], &[1, 2, 3], 2);
    }

    #[test]
    #[should_panic(expected = "first at byte 2 (chunk 1, +0), last at byte 3 (chunk 1)")]
    fn a_difference_names_its_bytes_and_chunks() {
        assert_same_bytes("differs", &[1, 2, 3, 4], &[1, 2, 9, 9], 2);
    }
}
