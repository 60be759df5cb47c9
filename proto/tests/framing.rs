//! The frame reader over a borrowed buffer: several frames per read, frames
//! split across reads, compaction, early rejection, and reuse.

use csnap_proto::*;

fn frame(id: u64, msg: &Msg<'_>) -> Vec<u8> {
    let mut out = vec![0u8; FRAME_MAX_BYTES];
    let n = encode(&Header::new(id, 0), msg, &mut out).unwrap();
    out.truncate(n);
    out
}

fn feed<B: AsRef<[u8]> + AsMut<[u8]>>(r: &mut FrameReader<B>, bytes: &[u8]) {
    let spare = r.spare();
    spare[..bytes.len()].copy_from_slice(bytes);
    r.advance(bytes.len());
}

#[test]
fn several_frames_in_one_read_pop_one_at_a_time() {
    let mut storage = vec![0u8; FRAME_MAX_BYTES];
    let mut r = FrameReader::new(&mut storage[..]);
    let a = frame(1, &Msg::Status);
    let b = frame(2, &Msg::CreateSnapshot { tag: 9 });
    let c = frame(3, &Msg::ListSnapshots { from: 0 });
    let mut all = [a.clone(), b.clone(), c.clone()].concat();
    // Half of a fourth frame.
    let d = frame(4, &Msg::DeleteSnapshot { tag: 9 });
    all.extend_from_slice(&d[..20]);
    feed(&mut r, &all);
    assert_eq!(r.next_frame().unwrap(), Some(&a[..]));
    assert_eq!(r.next_frame().unwrap(), Some(&b[..]));
    assert_eq!(r.next_frame().unwrap(), Some(&c[..]));
    assert_eq!(r.next_frame().unwrap(), None);
    assert_eq!(r.buffered(), 20);
    // The leftover is moved to the front; the rest of the frame completes it.
    let spare_before = r.spare().len();
    assert_eq!(spare_before, FRAME_MAX_BYTES - 20);
    feed(&mut r, &d[20..]);
    let got = r.next_frame().unwrap().unwrap();
    assert_eq!(got, &d[..]);
    assert_eq!(decode(got).unwrap().1, Msg::DeleteSnapshot { tag: 9 });
    assert_eq!(r.buffered(), 0);
    assert_eq!(r.next_frame().unwrap(), None);
}

#[test]
fn a_maximum_frame_fits_after_a_leftover() {
    let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES]);
    // A maximum-length frame of an unknown kind: framing still works and
    // decode reports the kind, not a framing error.
    let mut big = frame(1, &Msg::Ok);
    big.resize(FRAME_MAX_BYTES, 0);
    big[6..8].copy_from_slice(&0x7000u16.to_le_bytes());
    big[8..12].copy_from_slice(&u32::try_from(FRAME_MAX_BYTES).unwrap().to_le_bytes());
    let small = frame(2, &Msg::Status);
    feed(&mut r, &small);
    feed(&mut r, &big[..1000]);
    assert_eq!(r.next_frame().unwrap(), Some(&small[..]));
    assert_eq!(r.next_frame().unwrap(), None);
    assert_eq!(r.spare().len(), FRAME_MAX_BYTES - 1000);
    feed(&mut r, &big[1000..]);
    let f = r.next_frame().unwrap().unwrap();
    assert_eq!(f.len(), FRAME_MAX_BYTES);
    assert_eq!(decode(f), Err(DecodeError::UnknownKind { code: 0x7000 }));
    assert_eq!(r.spare().len(), FRAME_MAX_BYTES);
}

#[test]
fn garbage_is_rejected_at_the_first_byte_and_sticks() {
    let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES]);
    feed(&mut r, b"G");
    assert_eq!(r.next_frame(), Err(DecodeError::BadMagic));
    assert_eq!(r.next_frame(), Err(DecodeError::BadMagic));
    r.clear();
    assert_eq!(r.buffered(), 0);
    let s = frame(5, &Msg::Status);
    feed(&mut r, &s);
    assert_eq!(r.next_frame().unwrap(), Some(&s[..]));
}

#[test]
fn an_oversized_header_is_rejected_before_the_body() {
    let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES]);
    let mut h = frame(1, &Msg::Status);
    h[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
    feed(&mut r, &h[..11]);
    assert_eq!(r.next_frame(), Ok(None));
    feed(&mut r, &h[11..12]);
    assert_eq!(r.next_frame(), Err(DecodeError::TooLarge { len: 1 << 20 }));
}

#[test]
fn into_inner_returns_the_buffer() {
    let r = FrameReader::new([0u8; FRAME_MAX_BYTES]);
    assert_eq!(r.into_inner().len(), FRAME_MAX_BYTES);
}

#[test]
#[should_panic(expected = "FRAME_MAX_BYTES")]
fn a_buffer_smaller_than_a_frame_is_refused() {
    let _ = FrameReader::new(vec![0u8; FRAME_MAX_BYTES - 1]);
}
