//! The wire frames (`csnap_proto`).

#[allow(dead_code, clippy::all, clippy::pedantic)]
#[path = "../../proto/tests/common/mod.rs"]
mod samples;

use csnap_proto::{decode, encode, peek_header, FrameReader, Header, Kind, FRAME_MAX_BYTES};

/// `data` as one frame, then as a byte stream cut into frames.
///
/// A frame that decodes re-encodes to the very same bytes (the encoding is
/// canonical: a second spelling of one message would be a way around a
/// check), and its header agrees with `peek_header`.
pub fn wire_frame(data: &[u8]) {
    let mut out = vec![0u8; FRAME_MAX_BYTES];
    one_frame(data, &mut out);
    // A stream: every frame the reader pops is a whole frame with a valid
    // header; each is decoded on its own.
    let mut r = FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice());
    let mut rest = data;
    // Feed in pieces of 1..=64 bytes chosen by the data itself.
    let step = usize::from(data.first().copied().unwrap_or(0) % 64) + 1;
    while !rest.is_empty() {
        let spare = r.spare();
        let n = step.min(rest.len()).min(spare.len());
        if n == 0 {
            break;
        }
        spare[..n].copy_from_slice(&rest[..n]);
        r.advance(n);
        rest = &rest[n..];
        loop {
            match r.next_frame() {
                Ok(Some(f)) => {
                    let h = peek_header(f).expect("a popped frame has a valid header");
                    let h = h.expect("a popped frame is complete");
                    assert_eq!(h.length as usize, f.len());
                    let f = f.to_vec();
                    one_frame(&f, &mut out);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn one_frame(data: &[u8], out: &mut [u8]) {
    let peeked = peek_header(data);
    let Ok((hdr, msg)) = decode(data) else {
        return;
    };
    assert_eq!(peeked, Ok(Some(hdr)));
    assert_eq!(hdr.length as usize, data.len());
    assert_eq!(Kind::from_u16(hdr.kind), Some(msg.kind()));
    assert_eq!(msg.frame_bytes(), data.len());
    let n = encode(&hdr, &msg, out).expect("a decoded message re-encodes");
    assert!(&out[..n] == data, "re-encoding gives other bytes");
    let (h2, m2) = decode(&out[..n]).expect("re-encoded frame decodes");
    assert_eq!(h2, hdr);
    assert_eq!(m2, msg);
}

/// One frame of every kind (small lists: AFL++ works best on small inputs;
/// the largest frames are in `proto/tests`), plus a stream of two.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for kind in Kind::ALL {
        let mut s = Box::new(samples::Scratch::new());
        let msg = samples::sample(kind, false, &mut s);
        let mut out = vec![0u8; FRAME_MAX_BYTES];
        let n = encode(&Header::new(7, 3), &msg, &mut out).expect("sample encodes");
        out.truncate(n);
        v.push(out);
    }
    let two = [v[0].clone(), v[1].clone()].concat();
    v.push(two);
    v
}
