//! The benchmark's clients: a raw protocol connection (`Wire`), the
//! handshake and one timed request, and the client threads.

use super::*;

pub(crate) struct Wire {
    pub(crate) stream: BlockingStream,
    pub(crate) reader: FrameReader<Box<[u8]>>,
    pub(crate) tx: Vec<u8>,
    pub(crate) rx: Vec<u8>,
}

impl Wire {
    pub(crate) fn connect(addr: &Addr) -> Result<Wire, String> {
        let stream = BlockingStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| format!("set a read timeout on {addr}: {e}"))?;
        Ok(Wire {
            stream,
            reader: FrameReader::new(vec![0u8; FRAME_MAX_BYTES].into_boxed_slice()),
            tx: vec![0u8; 1024],
            rx: Vec::with_capacity(FRAME_MAX_BYTES),
        })
    }

    /// Encodes `msg` into the send buffer; returns its length.
    fn encode(&mut self, id: u64, msg: &Msg<'_>) -> Result<usize, String> {
        encode(&Header::new(id, 0), msg, &mut self.tx).map_err(|e| format!("encode: {e:?}"))
    }

    fn send(&mut self, n: usize) -> Result<(), String> {
        self.stream
            .write_all(&self.tx[..n])
            .map_err(|e| format!("send: {e}"))
    }

    /// Reads one whole frame into `rx`.
    fn recv(&mut self) -> Result<&[u8], String> {
        loop {
            match self.reader.next_frame() {
                Ok(Some(f)) => {
                    self.rx.clear();
                    self.rx.extend_from_slice(f);
                    return Ok(&self.rx);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("bad frame from the server: {e}")),
            }
            match self.stream.read(self.reader.spare()) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => self.reader.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!(
                        "no reply within {} s (server stuck?)",
                        IO_TIMEOUT.as_secs()
                    ))
                }
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
    }

    pub(crate) fn call(&mut self, id: u64, msg: &Msg<'_>) -> Result<(), String> {
        let n = self.encode(id, msg)?;
        self.send(n)?;
        self.recv()?;
        Ok(())
    }
}

pub(crate) fn unexpected(what: &str, frame: &[u8]) -> String {
    match decode(frame) {
        Ok((_, Msg::Error { code, text, .. })) => {
            format!(
                "{what}: server error {} ({}): {text}",
                code.name(),
                code.code()
            )
        }
        Ok((h, m)) => format!(
            "{what}: unexpected {} (request id {})",
            m.kind().name(),
            h.request_id
        ),
        Err(e) => format!("{what}: undecodable reply: {e}"),
    }
}

/// `Hello` + `Identify` as a block-device client of `volume`.
pub(crate) fn handshake(w: &mut Wire, client_id: u64, volume: Volume) -> Result<(), String> {
    w.call(
        0,
        &Msg::Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            role: Role::Client,
        },
    )?;
    if !matches!(decode(&w.rx), Ok((_, Msg::HelloOk { .. }))) {
        return Err(unexpected("Hello", &w.rx));
    }
    w.call(
        0,
        &Msg::Identify {
            client_id,
            node_id: 1,
            volume,
            origin_uuid: ORIGIN_UUID,
            volume_size_bytes: 0,
            chunk_size_bytes: 0,
            flags: 0,
        },
    )?;
    if !matches!(decode(&w.rx), Ok((_, Msg::IdentifyOk { .. }))) {
        return Err(unexpected("Identify", &w.rx));
    }
    Ok(())
}

/// One request at queue depth 1; returns its latency in ns (send → reply).
pub(crate) fn one_request(
    w: &mut Wire,
    workload: Workload,
    id: u64,
    chunk: u64,
) -> Result<u64, String> {
    let range = Range { chunk, chunks: 1 };
    let mut lb = [0u8; LIST_HEADER_BYTES + 16];
    let ranges =
        Ranges::from_entries(&[range], &mut lb).map_err(|e| format!("range list: {e:?}"))?;
    let msg = match workload {
        Workload::SnapRead => Msg::QuerySnapshotRead(ranges),
        _ => Msg::QueryOriginWrite(ranges),
    };
    let n = w.encode(id, &msg)?;
    let t0 = Instant::now();
    w.send(n)?;
    w.recv()?;
    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    match workload {
        Workload::Echo => {
            if w.rx[..] != w.tx[..n] {
                return Err("the echo differs from the frame sent".into());
            }
        }
        Workload::OriginUnique | Workload::CopyOut => match decode(&w.rx) {
            Ok((h, Msg::OriginWriteOk(r))) if h.request_id == id && r.get(0) == Some(range) => {}
            _ => return Err(unexpected("QueryOriginWrite", &w.rx)),
        },
        Workload::SnapRead => {
            let ok = match decode(&w.rx) {
                Ok((h, Msg::SnapshotReadReply(t))) if h.request_id == id && t.len() == 1 => t
                    .get(0)
                    .is_some_and(|t| t.kind == TargetKind::Origin && t.range() == range),
                _ => return Err(unexpected("QuerySnapshotRead", &w.rx)),
            };
            if !ok {
                return Err(format!(
                    "QuerySnapshotRead of chunk {chunk}: expected one origin target, got {:?}",
                    decode(&w.rx).map(|(_, m)| m)
                ));
            }
            let n = w.encode(0, &Msg::FinishSnapshotRead(ranges))?;
            w.send(n)?;
        }
    }
    Ok(ns)
}

// ---------------------------------------------------------------------------
// Client threads.
// ---------------------------------------------------------------------------

pub(crate) struct Job {
    pub(crate) workload: Workload,
    /// Chunks this client uses: `base .. base + len`.
    pub(crate) base: u64,
    pub(crate) len: u64,
    /// Untimed warm-up requests (origin clients of (c) warm up on region A).
    pub(crate) warmup: usize,
    pub(crate) count: usize,
    pub(crate) deadline: Option<Duration>,
}

pub(crate) struct ThreadOut {
    /// Kept open until the CPU figures are read: a per-connection echo
    /// thread's CPU time goes with it when the connection closes.
    pub(crate) wire: Wire,
    pub(crate) lat: Vec<u64>,
    pub(crate) end: Instant,
    pub(crate) capped: bool,
}

pub(crate) fn client_thread(
    mut w: Wire,
    job: &Job,
    barrier: &Barrier,
) -> Result<ThreadOut, String> {
    let mut id = 1u64;
    let warm = (|| {
        let (wl, base, len) = match job.workload {
            Workload::CopyOut => (Workload::OriginUnique, REGION_A.0, REGION_A.1),
            wl => (wl, job.base, job.len),
        };
        for k in 0..job.warmup {
            let c = base + u64::try_from(k).unwrap_or(0) % len;
            one_request(&mut w, wl, id, c)?;
            id += 1;
        }
        Ok::<(), String>(())
    })();
    let mut lat = Vec::with_capacity(job.count);
    // Every thread passes the barrier exactly once, even after an error.
    barrier.wait();
    warm.map_err(|e| format!("warm-up: {e}"))?;
    let start = Instant::now();
    let mut capped = false;
    for k in 0..job.count {
        if let Some(d) = job.deadline {
            if start.elapsed() > d {
                capped = true;
                break;
            }
        }
        let c = job.base + u64::try_from(k).unwrap_or(0) % job.len;
        lat.push(one_request(&mut w, job.workload, id, c)?);
        id += 1;
    }
    Ok(ThreadOut {
        wire: w,
        lat,
        end: Instant::now(),
        capped,
    })
}
