//! Little-endian field access on byte slices.
//!
//! Every caller checks the slice length first (a frame's length against its
//! header, a body's length against its kind's exact or list size), so these
//! index in bounds; the fuzz properties in `tests/` exercise that claim.

/// Reads a little-endian u16.
pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
/// Reads a little-endian u32.
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
/// Reads a little-endian u64.
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
/// Reads an i8 (two's complement byte).
pub(crate) fn get_i8(b: &[u8], off: usize) -> i8 {
    i8::from_le_bytes([b[off]])
}
/// Writes a little-endian u16.
pub(crate) fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
/// Writes a little-endian u32.
pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
/// Writes a little-endian u64.
pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
/// Writes an i8.
pub(crate) fn put_i8(b: &mut [u8], off: usize, v: i8) {
    b[off] = v.to_le_bytes()[0];
}
/// True when `b[off..off + n]` is all zero (reserved bytes).
pub(crate) fn zero(b: &[u8], off: usize, n: usize) -> bool {
    b[off..off + n].iter().all(|&x| x == 0)
}
