//! Encoding, decoding, list building, framing and error-text formatting do
//! not allocate: counted by a global allocator that tallies allocations made
//! on the current thread.

mod common;

use common::{sample, Scratch};
use core::fmt::Write;
use csnap_proto::*;

#[global_allocator]
static GLOBAL: csnap_sys::alloc::CountingAlloc = csnap_sys::alloc::CountingAlloc;

fn allocs() -> usize {
    csnap_sys::alloc::thread_allocs()
}

#[test]
fn protocol_paths_do_not_allocate() {
    // Set-up allocations happen before counting starts.
    let mut scratch: Vec<Scratch> = (0..Kind::ALL.len() * 2).map(|_| Scratch::new()).collect();
    let mut out = vec![0u8; FRAME_MAX_BYTES];
    let mut reader = FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice());
    let mut stream = vec![0u8; 4 * FRAME_MAX_BYTES];

    // Sanity: the counter sees allocations.
    let before = allocs();
    drop(std::hint::black_box(vec![1u8; 10]));
    assert_eq!(allocs(), before + 1);

    let start = allocs();
    let mut frames = 0;
    let mut stream_len = 0;
    let (small, big) = scratch.split_at_mut(Kind::ALL.len());
    for (i, s) in small.iter_mut().chain(big.iter_mut()).enumerate() {
        let kind = Kind::ALL[i % Kind::ALL.len()];
        let msg = sample(kind, i >= Kind::ALL.len(), s);
        let n = encode(&Header::new(i as u64, 1), &msg, &mut out).unwrap();
        let (_, back) = decode(&out[..n]).unwrap();
        assert_eq!(back, msg);
        let mut text = ErrorText::new();
        write!(
            text,
            "{} {}",
            back.kind(),
            DecodeError::BadBody { kind, what: "x" }
        )
        .unwrap();
        assert!(!text.as_str().is_empty());
        // Queue small frames into a stream for the reader.
        if stream_len + n <= stream.len() && n < 4096 {
            stream[stream_len..stream_len + n].copy_from_slice(&out[..n]);
            stream_len += n;
        }
    }
    let mut fed = 0;
    while fed < stream_len {
        let spare = reader.spare();
        let n = 777.min(stream_len - fed).min(spare.len());
        spare[..n].copy_from_slice(&stream[fed..fed + n]);
        reader.advance(n);
        fed += n;
        while let Some(f) = reader.next_frame().unwrap() {
            decode(f).unwrap();
            frames += 1;
        }
    }
    let mut rb = [0u8; RANGES_BYTES_MAX];
    let r = Ranges::from_entries(
        &[Range {
            chunk: 1,
            chunks: 1,
        }],
        &mut rb,
    )
    .unwrap();
    assert_eq!(r.iter().count(), 1);
    let mut nb = [0u8; NODE_LIST_BYTES_MAX];
    let nodes = NodeList::from_entries(&[Node { id: 1 }, Node { id: 2 }], &mut nb).unwrap();
    let mut cb = [0u8; CLIENT_LIST_BYTES_MAX];
    let mut b = ClientListBuilder::new(&mut cb).unwrap();
    b.push(ClientEntry {
        client_id: 1,
        node_id: 2,
    })
    .unwrap();
    let clients = b.finish();
    let mut sb = [0u8; NODE_STATUS_LIST_BYTES_MAX];
    let statuses = NodeStatusList::from_entries(
        &[NodeStatus {
            node: 1,
            flags: NodeStatus::SERVING,
            serving_incarnation: 3,
        }],
        &mut sb,
    )
    .unwrap();
    for msg in [
        Msg::StartServer {
            claim: false,
            members: nodes,
            expected: clients,
        },
        Msg::ClusterStatusReply {
            server_incarnation: 3,
            server_node: 1,
            failed_deaths: 0,
            server_addr: "/run/csnap/server.sock",
            nodes: statuses,
        },
    ] {
        let n = encode(&Header::new(1, 0), &msg, &mut out).unwrap();
        assert_eq!(decode(&out[..n]).unwrap().1, msg);
    }
    assert_eq!(nodes.iter().count() + clients.iter().count(), 3);
    assert!(statuses.iter().all(|s| s.serving()));
    let used = allocs() - start;
    assert_eq!(used, 0, "{used} allocations on protocol paths");
    assert!(frames > Kind::ALL.len());
}
