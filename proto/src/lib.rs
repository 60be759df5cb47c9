//! The csnap wire protocol: framing, handshake and messages, encoded into and
//! decoded from caller-owned buffers.
//!
//! One protocol serves every connection to the server: block-device clients
//! (data I/O on the origin or a snapshot), the control tool and the cluster
//! agent. Clients do the data I/O themselves and ask the server where to read
//! and write; the server owns the snapshot store metadata and the read locks.
//!
//! The same framing carries the agent protocol (kind codes
//! `0x4000..=0x7FFF`, [`Kind::is_agent`]): clients, tools and the standby
//! server talk to their node's agent, and agents and the `csnap cluster`
//! tool talk to the controller (the `local` membership and resource-manager
//! backend). A server answers an agent-protocol frame sent to it with
//! `Error(Unsupported)`.
//!
//! Nothing here allocates on the encode, decode or framing paths: frames are
//! encoded into a `&mut [u8]` ([`encode`]), decoded into a [`Msg`] that
//! borrows its lists, text and addresses from the frame ([`decode`]), and
//! cut out of a byte stream by a [`FrameReader`] over a caller buffer.
//! Malformed input of any kind yields a [`DecodeError`], never a panic.
//!
//! # What changed from csnap/ddsnap
//!
//! Every integer has an explicit byte order (little-endian), not the host's;
//! frames start with a magic and a version, and a `Hello` negotiates the
//! version; the length field covers the whole frame, and every reply,
//! however large, is one frame (no data streamed past a frame's end); frames
//! may be up to [`FRAME_MAX_BYTES`], not 500 bytes; request ids are 64-bit;
//! every server frame carries the server incarnation, so a client notices a
//! failover on the first reply; reserved bytes must be zero and every enum
//! value must be known, so each message has exactly one encoding.
//!
//! # Frame
//!
//! A frame is a 32-byte header followed by a body. All integers are
//! little-endian; offsets are in bytes.
//!
//! | Offset | Size | Field         | Meaning |
//! |-------:|-----:|---------------|---------|
//! | 0      | 4    | `magic`       | [`MAGIC`]: the bytes `b"csnw"` (`0x776e7363` as a u32) |
//! | 4      | 2    | `version`     | [`PROTOCOL_VERSION`] (1) |
//! | 6      | 2    | `kind`        | message kind code ([`Kind`]) |
//! | 8      | 4    | `length`      | whole frame, header included: `32..=65536` |
//! | 12     | 4    | `flags`       | none defined: must be 0 |
//! | 16     | 8    | `request_id`  | chosen by the requester, echoed in the reply |
//! | 24     | 8    | `incarnation` | server incarnation in every server frame; 0 from clients (not checked by the codec) |
//!
//! A receiver checks the magic, version and length as soon as those bytes
//! arrive ([`peek_header`]): garbage and oversized frames are rejected before
//! their bodies are read. Those errors are fatal: the stream cannot be cut
//! into frames any more, so the receiver closes the connection (after an
//! `Error` frame, best effort). Any other error (unknown kind, nonzero flags,
//! malformed body) leaves the framing intact: the server answers with an
//! `Error` frame carrying the frame's `request_id` and kind code as culprit,
//! and goes on ([`DecodeError::is_fatal`], [`DecodeError::code`],
//! [`DecodeError::culprit`]).
//!
//! # Versions and the handshake
//!
//! The first frame on every connection is `Hello` with the range of versions
//! the peer speaks, sent with header `version` 1. The header layout and the
//! `Hello`/`HelloOk`/`Error` bodies are frozen for all future versions, so
//! any server can read any client's `Hello`. The server answers `HelloOk`
//! with the highest common version ([`negotiate`]) and its incarnation in the
//! header, or `Error(BadVersion)` and closes. Every later frame carries the
//! agreed version. This crate speaks version 1 only: a frame with another
//! version is `BadVersion`.
//!
//! # Sequencing
//!
//! - `Hello` → `HelloOk`, first. A role `Client` then sends `Identify` →
//!   `IdentifyOk` before any data request; `Control` and `Agent` send control
//!   requests directly. Which role may send which request is server policy
//!   (answered with `Error(Unsupported)` or `Error(NotIdentified)`).
//! - Requests are pipelined; replies may come back in any order (an origin
//!   write waits for read locks) and are matched by `request_id`, unique
//!   among the sender's outstanding requests on the connection.
//! - Every request may be answered with `Error` instead of its success reply
//!   ([`Kind::success_reply`]). `FinishSnapshotRead`, `UploadLocks` and
//!   `RevokeDone` get no success reply.
//! - Only the server sends reply kinds ([`Kind::is_reply`]); a reply kind
//!   from a client is out of order and answered with `Error(BadFrame)`.
//! - Failover: a client reconnects, sees a new incarnation in `HelloOk`,
//!   identifies, sends `UploadLocks` for the read locks it still holds (as
//!   many frames as needed), then `FinishUpload` → `UploadOk`, then re-sends
//!   every request that had no reply. Requests are idempotent.
//! - Caching: a client whose `Identify` sets [`IDENTIFY_CACHING`] keeps
//!   origin write grants, read locks and snapshot mappings, and the server
//!   may send it two notifications at any time ([`Kind::is_notification`]).
//!   They have bit 15 set like replies but answer no request: a client must
//!   not match their `request_id` against its outstanding requests. `Revoke`
//!   carries a nonzero revoke id chosen by the server as `request_id`; the
//!   client forgets what it names and sends `RevokeDone` with that same
//!   `request_id` (a request without a reply of its own). `ReleaseLocks`
//!   carries `request_id` 0; the client sends `FinishSnapshotRead` for those
//!   chunks once its reads of them are done. (The codec does not check
//!   these request ids.)
//! - Agent socket: a volume client or control tool sends `Hello`, then
//!   `NeedServer` → `ServerAddress`. A standby server sends
//!   `Hello` with role `Server`, then `ServerReady`; its agent later sends
//!   `StartServer` → `Serving`, then `NodeJoined`, `NodeLeft`,
//!   `ClientGone` and `ClientsOf` as they happen.
//! - Controller socket: an agent sends `Hello` with role `Agent`, then
//!   `Join`, answered with `Members`; then `AgentState`, `WantServer`,
//!   `ServerUp`, `ClientGone` and `ClientsOf` from the agent, `Members`, `StartHere`,
//!   `ServerUp`, `ServerDown`, `Fence` and forwarded `NeedClients`/`Clients`
//!   from the controller. The `csnap cluster` tool (role `Control`) sends
//!   `ClusterCommand` → `Ok` and `ClusterStatus` → `ClusterStatusReply`.
//!
//! # Message kinds
//!
//! Requests have bit 15 of the code clear, replies have it set; where a
//! server request has its own success reply, the reply's code is the
//! request's with bit 15 set. Codes `0x4000..=0x7FFF` (bit 14 set, bit 15
//! clear) are the agent protocol: neither server requests nor server
//! replies, though [`Kind::is_request`] counts them as requests; their
//! answers are agent kinds too (or `Ok`). `Revoke` and `ReleaseLocks` have
//! bit 15 set but are notifications, not replies. Code 0 is never valid.
//!
//! | Code     | Kind                 | Sender  | Body | Success reply |
//! |----------|----------------------|---------|------|---------------|
//! | `0x0001` | `Hello`              | any     | hello (8) | `HelloOk` |
//! | `0x0002` | `Identify`           | client  | identify (48) | `IdentifyOk` |
//! | `0x0010` | `QueryOriginWrite`   | client  | range list | `OriginWriteOk` |
//! | `0x0011` | `QuerySnapshotRead`  | client  | range list, ≤ [`QUERY_CHUNKS_MAX`] chunks | `SnapshotReadReply` |
//! | `0x0012` | `FinishSnapshotRead` | client  | range list | none |
//! | `0x0013` | `QuerySnapshotWrite` | client  | range list, ≤ [`QUERY_CHUNKS_MAX`] chunks | `SnapshotWriteOk` |
//! | `0x0014` | `UploadLocks`        | client  | range list | none |
//! | `0x0015` | `FinishUpload`       | client  | empty | `UploadOk` |
//! | `0x0016` | `RevokeDone`         | client  | empty; `request_id` = the `Revoke`'s | none |
//! | `0x0020` | `CreateSnapshot`     | control | tag (4) | `Ok` |
//! | `0x0021` | `DeleteSnapshot`     | control | tag (4) | `Ok` |
//! | `0x0022` | `SetPriority`        | control | set-priority (8) | `Ok` |
//! | `0x0023` | `ListSnapshots`      | control | from tag (4) | `SnapshotList`: one page |
//! | `0x0024` | `Status`             | control | empty | `StatusReply` |
//! | `0x0025` | `QueryDelta`         | control | query-delta (24) | `DeltaMap` |
//! | `0x4001` | `NeedServer`         | client or tool → agent | need-server (32) | `ServerAddress` |
//! | `0x4002` | `ServerAddress`      | agent → client | server-address (16 + addr) | — |
//! | `0x4003` | `ServerReady`        | standby → its agent | server-ready (12 + addr) | none |
//! | `0x4004` | `StartServer`        | agent → its standby | start (node list + client list) | `Serving` |
//! | `0x4005` | `Serving`            | server → its agent | serving (24) | — |
//! | `0x4006` | `NodeJoined`         | agent → its server | node (4) | none |
//! | `0x4007` | `NodeLeft`           | agent → its server | node (4) | none |
//! | `0x4008` | `ClientGone`         | agent → controller → serving agent → its server | client-gone (16) | none |
//! | `0x4009` | `ClientsOf`          | (re)started agent → controller → serving or starting agent → its server | clients-of (8 + client list) | none |
//! | `0x4010` | `Join`               | agent → controller | join (8 + addr) | none (answered with `Members`) |
//! | `0x4011` | `Members`            | controller → agents | members (8 + node list) | — |
//! | `0x4012` | `AgentState`         | agent → controller | agent-state (24) | none |
//! | `0x4013` | `WantServer`         | agent → controller | want-server (8) | none |
//! | `0x4014` | `StartHere`          | controller → agent | start-here (24) | none |
//! | `0x4015` | `NeedClients`        | starting agent → controller → member agents | need-clients (16) | `Clients` |
//! | `0x4016` | `Clients`            | member agent → controller → starter | clients (16 + client list) | — |
//! | `0x4017` | `ServerUp`           | agent → controller → every agent | server-address (16 + addr) | none |
//! | `0x4018` | `ServerDown`         | controller → every agent | server-down (16) | none |
//! | `0x4019` | `Fence`              | controller → agent | fence (8) | none |
//! | `0x4020` | `ClusterCommand`     | tool → controller | cluster-command (8) | `Ok` |
//! | `0x4021` | `ClusterStatus`      | tool → controller | empty | `ClusterStatusReply` |
//! | `0x4022` | `ClusterStatusReply` | controller → tool | cluster-status (16 + addr + node-status list) | — |
//! | `0x8000` | `Error`              | server  | error (8 + text) | — |
//! | `0x8001` | `HelloOk`            | server  | hello-ok (16) | — |
//! | `0x8002` | `IdentifyOk`         | server  | identify-ok (24) | — |
//! | `0x8010` | `OriginWriteOk`      | server  | range list (the query's, then for a caching client the write-ahead grants after it) | — |
//! | `0x8011` | `SnapshotReadReply`  | server  | target list | — |
//! | `0x8013` | `SnapshotWriteOk`    | server  | target list, store targets only | — |
//! | `0x8015` | `UploadOk`           | server  | empty | — |
//! | `0x8020` | `Ok`                 | server  | empty | — |
//! | `0x8023` | `SnapshotList`       | server  | snapshot list | — |
//! | `0x8024` | `StatusReply`        | server  | status (96) | — |
//! | `0x8025` | `DeltaMap`           | server  | delta-map (16 + bitmap) | — |
//! | `0x8030` | `Revoke`             | server, unsolicited | revoke (4 + range list) | the client sends `RevokeDone` |
//! | `0x8031` | `ReleaseLocks`       | server, unsolicited | range list | none (the client sends `FinishSnapshotRead` once its reads are done) |
//!
//! A body must have exactly the size its kind and counts give; reserved
//! bytes must be zero.
//!
//! ## hello (`Hello`, 8 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `version_min` | lowest version spoken, ≥ 1 |
//! | 2 | 2 | `version_max` | highest version spoken, ≥ `version_min` |
//! | 4 | 2 | `role` | [`Role`]: 1 client, 2 control, 3 agent, 4 server (a standby connecting to its agent) |
//! | 6 | 2 | reserved | 0 |
//!
//! ## hello-ok (`HelloOk`, 16 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `version` | the connection's version, ≥ 1 |
//! | 2 | 6 | reserved | 0 |
//! | 8 | 8 | `server_id` | identifies the server's store across incarnations |
//!
//! ## identify (`Identify`, 48 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `client_id` | cluster-unique client id, stable across reconnects |
//! | 8 | 8 | `volume_size_bytes` | the client's device size; 0 = take the server's |
//! | 16 | 16 | `origin_uuid` | identity of the origin device the client sees |
//! | 32 | 4 | `node_id` | cluster node of the client |
//! | 36 | 4 | `chunk_size_bytes` | chunk size the client expects; 0 = take the server's |
//! | 40 | 2 | `volume` | 1 origin, 2 snapshot ([`Volume`]) |
//! | 42 | 2 | `flags` | bit 0 [`IDENTIFY_CACHING`]; other bits 0 |
//! | 44 | 4 | `tag` | snapshot tag; 0 for the origin |
//!
//! ## identify-ok (`IdentifyOk`, 24 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `origin_size_bytes` | origin size |
//! | 8 | 8 | `volume_size_bytes` | the attached volume's size |
//! | 16 | 4 | `chunk_size_bytes` | the store's chunk size |
//! | 20 | 4 | reserved | 0 |
//!
//! ## range list (queries, `OriginWriteOk`, `FinishSnapshotRead`, `UploadLocks`, `ReleaseLocks`, in `Revoke`)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `count` | ≤ [`RANGES_MAX`] |
//! | 2 | 2 | reserved | 0 |
//! | 4 + 16·i | 8 | `chunk` | first logical chunk of range i |
//! | 12 + 16·i | 4 | `chunks` | ≥ 1; `chunk + chunks` ≤ 2^64 − 1 |
//! | 16 + 16·i | 4 | reserved | 0 |
//!
//! Decoded as a [`Ranges`] view of [`Range`]s. Queries answered with a
//! target list cover at most [`QUERY_CHUNKS_MAX`] chunks in total, so their
//! reply always fits one frame (a target covers at least one chunk).
//!
//! ## target list (`SnapshotReadReply`, `SnapshotWriteOk`)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `count` | ≤ [`TARGETS_MAX`] |
//! | 2 | 2 | reserved | 0 |
//! | 4 + 24·i | 8 | `chunk` | first logical chunk of target i |
//! | 12 + 24·i | 4 | `chunks` | ≥ 1; `chunk + chunks` ≤ 2^64 − 1 |
//! | 16 + 24·i | 1 | `kind` | 1 store, 2 origin (now read-locked) ([`TargetKind`]) |
//! | 17 + 24·i | 3 | reserved | 0 |
//! | 20 + 24·i | 8 | `store_chunk` | store: logical `chunk + k` is store chunk `store_chunk + k`; origin: 0 |
//!
//! Decoded as a [`Targets`] view of [`Target`]s. A snapshot read's origin
//! targets are read-locked for the client until its `FinishSnapshotRead` for
//! those chunks (or its disconnect). `SnapshotWriteOk` carries store targets
//! only.
//!
//! ## tag (`CreateSnapshot`, `DeleteSnapshot`, and `ListSnapshots`'s first tag, 4 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `tag` | snapshot tag |
//!
//! ## set-priority (`SetPriority`, 8 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `tag` | snapshot tag |
//! | 4 | 1 | `priority` | i8; 127 = never deleted when the store is full |
//! | 5 | 3 | reserved | 0 |
//!
//! ## snapshot list (`SnapshotList`)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `count` | ≤ [`SNAP_LIST_PAGE_MAX`] |
//! | 2 | 2 | reserved | 0 |
//! | 4 + 32·i | 4 | `tag` | snapshot tag |
//! | 8 + 32·i | 1 | `priority` | i8 |
//! | 9 + 32·i | 1 | `flags` | bit 0 deleting, bit 1 in use; other bits 0 |
//! | 10 + 32·i | 2 | reserved | 0 |
//! | 12 + 32·i | 8 | `ctime_secs` | creation time, Unix seconds |
//! | 20 + 32·i | 8 | `chunks` | store chunks the snapshot holds |
//! | 28 + 32·i | 8 | `unique_chunks` | of those, shared with no other snapshot |
//!
//! Decoded as a [`SnapList`] view of [`SnapInfo`]s.
//!
//! ## status (`StatusReply`, 96 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `incarnation` | server incarnation |
//! | 8 | 8 | `origin_chunks` | origin size in chunks |
//! | 16 | 8 | `data_chunks` | store data area in chunks |
//! | 24 | 8 | `data_free` | free data chunks |
//! | 32 | 8 | `meta_blocks` | metadata area in blocks |
//! | 40 | 8 | `meta_free` | free metadata blocks |
//! | 48 | 8 | `commits` | journal commits |
//! | 56 | 4 | `chunk_size_bytes` | chunk size |
//! | 60 | 4 | `snapshots` | live snapshots |
//! | 64 | 4 | `deleting` | snapshots being deleted |
//! | 68 | 4 | `clients` | identified clients |
//! | 72 | 4 | `read_locks` | read locks held |
//! | 76 | 4 | `waiting_writes` | origin writes waiting on read locks |
//! | 80 | 1 | `state` | 0 recovering, 1 serving ([`ServerState`]) |
//! | 81 | 7 | reserved | 0 |
//! | 88 | 8 | `copyouts` | copy-outs made by this server process since it started |
//!
//! ## query-delta (`QueryDelta`, 24 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `chunk` | first chunk |
//! | 8 | 4 | `chunks` | chunk count, `1..=`[`DELTA_CHUNKS_MAX`]; `chunk + chunks` must not overflow |
//! | 12 | 4 | `base` | the snapshot compared with |
//! | 16 | 2 | `volume` | 1 origin, 2 snapshot ([`Volume`]) |
//! | 18 | 2 | reserved | 0 |
//! | 20 | 4 | `tag` | the snapshot's tag; 0 for the origin |
//!
//! A chunk differs when, for a snapshot volume, it and `base` map it to
//! different places (the origin, or different store chunks), and for the
//! origin, when `base` holds an exception for it. Refused with
//! `NoSuchSnapshot` when either snapshot is not live, `OutOfRange` past the
//! origin's end.
//!
//! ## delta-map (`DeltaMap`, 16 + ⌈`chunks`/8⌉ bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `chunk` | the query's first chunk |
//! | 8 | 4 | `chunks` | the query's chunk count |
//! | 12 | 4 | reserved | 0 |
//! | 16 | ⌈`chunks`/8⌉ | `bits` | bit `i % 8` of byte `i / 8` set when chunk `chunk + i` differs; bits past `chunks` are 0 |
//!
//! ## error (`Error`, 8 + `text_len` bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `code` | [`ErrorCode`] |
//! | 4 | 2 | `culprit` | kind code answered (may be unknown), 0 if none |
//! | 6 | 2 | `text_len` | ≤ [`ERROR_TEXT_MAX_BYTES`] |
//! | 8 | `text_len` | `text` | UTF-8 detail for logs ([`ErrorText`] formats it without allocation) |
//!
//! An `Error` answering a request carries its `request_id`; one sent before
//! closing after a fatal framing error carries 0.
//!
//! ## revoke (`Revoke`, 4 + range list)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `what` | [`RevokeWhat`]: 1 origin grants (forget every origin chunk learnt to need no copy-out), 2 snapshot mappings (forget the store mappings of the ranges) |
//! | 2 | 2 | reserved | 0 |
//! | 4 | | range list | empty for origin grants, not empty for snapshot mappings |
//!
//! # Agent protocol bodies
//!
//! An `addr` is a unix socket path or `host:port` in UTF-8, `addr_len` ≤
//! [`ADDR_MAX_BYTES`] bytes, at the end of the fixed part (in the cluster
//! status, before the node-status list); decoded as a `&str` borrowing the
//! frame. It is never empty, except in the cluster status when no server
//! serves. Node ids name a node where marked ≥ 1 (and in every list entry).
//!
//! ## need-server (`NeedServer`, 32 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `client_id` | the volume client's id, ≥ 1; 0 allowed only with volume 0 |
//! | 8 | 8 | `failed_incarnation` | the incarnation that failed the client; 0 = any serving incarnation will do |
//! | 16 | 4 | `node_id` | the client's node |
//! | 20 | 2 | `volume` | 0 none (a control tool), 1 origin, 2 snapshot ([`Volume`]) |
//! | 22 | 2 | reserved | 0 |
//! | 24 | 4 | `tag` | snapshot tag; 0 unless snapshot |
//! | 28 | 4 | reserved | 0 |
//!
//! ## server-address (`ServerAddress`, `ServerUp`, 16 + `addr_len` bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `incarnation` | the server's incarnation, ≥ 1 |
//! | 8 | 4 | `node_id` | the server's node |
//! | 12 | 2 | reserved | 0 |
//! | 14 | 2 | `addr_len` | ≥ 1 |
//! | 16 | `addr_len` | `addr` | where the server listens for clients |
//!
//! ## server-ready (`ServerReady`, 12 + `addr_len` bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `pid` | the standby's process id |
//! | 4 | 4 | `node_id` | its node |
//! | 8 | 2 | reserved | 0 |
//! | 10 | 2 | `addr_len` | ≥ 1 |
//! | 12 | `addr_len` | `addr` | where it will listen for clients |
//!
//! ## start (`StartServer`)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 1 | `flags` | bit 0 `claim`: the former server may still run; claim the store and wait out its lease first (`Standby::claim`); other bits 0 |
//! | 1 | 7 | reserved | 0 |
//! | 8 | `NodeList::bytes_for(m)` | node list | the cluster members |
//! | 8 + `NodeList::bytes_for(m)` | `ClientList::bytes_for(e)` | client list | the snapshot clients of the former incarnation the recovery barrier waits for; may be empty |
//!
//! ## serving (`Serving`, 24 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `incarnation` | the server's incarnation |
//! | 8 | 8 | `start_micros` | how long the start took, in microseconds |
//! | 16 | 8 | `replayed_commits` | journal commits the start replayed |
//!
//! ## node (`NodeJoined`, `NodeLeft`, 4 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `node_id` | ≥ 1 |
//!
//! ## client-gone (`ClientGone`, 16 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `client_id` | ≥ 1 |
//! | 8 | 4 | `node_id` | ≥ 1 |
//! | 12 | 4 | reserved | 0 |
//!
//! ## clients-of (`ClientsOf`, 8 + client list bytes)
//!
//! Every live volume client of one node, complete: a started agent sends
//! it once its node's clients had the time to reconnect. A client of that
//! node a new server still waits for and not in the list is gone.
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `node_id` | ≥ 1 |
//! | 4 | 4 | reserved | 0 |
//! | 8 | … | client list | entries of other nodes are ignored |
//!
//! ## join (`Join`, 8 + `addr_len` bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `node_id` | the agent's node, ≥ 1 |
//! | 4 | 2 | reserved | 0 |
//! | 6 | 2 | `addr_len` | ≥ 1 |
//! | 8 | `addr_len` | `addr` | the agent's socket |
//!
//! ## members (`Members`, 8 + node list)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `epoch` | membership epoch |
//! | 8 | | node list | the members; may be empty |
//!
//! ## agent-state (`AgentState`, 24 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `node_id` | the agent's node |
//! | 4 | 1 | `standby` | 0 or 1: the standby server is ready |
//! | 5 | 1 | reserved | 0 |
//! | 6 | 2 | `recent_deaths` | the node's own server deaths (crashes, failed starts) within the death window |
//! | 8 | 8 | `serving_incarnation` | the node's serving server, 0 = none |
//! | 16 | 8 | `died_incarnation` | 0 = none; else this node's server of that incarnation died |
//!
//! ## want-server (`WantServer`, 8 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `failed_incarnation` | the incarnation that failed a client, 0 = none |
//!
//! ## start-here (`StartHere`, 24 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `attempt` | ≥ 1 |
//! | 8 | 8 | `former_incarnation` | the incarnation replaced, 0 = none |
//! | 16 | 1 | `flags` | bit 0 `claim`: the former server's death was not seen by its agent; other bits 0 |
//! | 17 | 7 | reserved | 0 |
//!
//! ## need-clients (`NeedClients`, 16 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `gather_id` | ≥ 1 |
//! | 8 | 4 | `starter` | the starting agent's node, ≥ 1 |
//! | 12 | 4 | reserved | 0 |
//!
//! ## clients (`Clients`, 16 + client list)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `gather_id` | the `NeedClients` answered |
//! | 8 | 4 | `from` | the answering node |
//! | 12 | 4 | `to` | the starter |
//! | 16 | | client list | the volume clients on `from` |
//!
//! ## server-down (`ServerDown`, 16 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `incarnation` | the server gone |
//! | 8 | 4 | `node_id` | its node |
//! | 12 | 4 | reserved | 0 |
//!
//! ## fence (`Fence`, 8 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `reason` | [`FenceReason`]: 1 left the cluster (stop the server, refuse clients until a member again), 2 server moved (stop the serving server, it is being started elsewhere) |
//! | 4 | 4 | reserved | 0 |
//!
//! ## cluster-command (`ClusterCommand`, 8 bytes)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 4 | `op` | [`ClusterOp`]: 1 join, 2 leave, 3 start (answered once that node's server serves), 4 clear the store's failed mark (`node_id` ignored) |
//! | 4 | 4 | `node_id` | ≥ 1 |
//!
//! ## cluster-status (`ClusterStatusReply`, 16 + `addr_len` + node-status list)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 8 | `server_incarnation` | the serving server, 0 = none |
//! | 8 | 4 | `server_node` | its node, 0 = none |
//! | 12 | 2 | `failed_deaths` | 0; else the store is marked failed (crash-loop breaker) after this many server deaths within the window |
//! | 14 | 2 | `addr_len` | may be 0 only when `server_incarnation` is 0 |
//! | 16 | `addr_len` | `addr` | the serving server's address |
//! | 16 + `addr_len` | | node-status list | every node known |
//!
//! ## node list (in `StartServer`, `Members`)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `count` | ≤ [`NODES_MAX`] |
//! | 2 | 2 | reserved | 0 |
//! | 4 + 4·i | 4 | `id` | node id, ≥ 1 |
//!
//! Decoded as a [`NodeList`] view of [`Node`]s.
//!
//! ## client list (in `StartServer`, `Clients`)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `count` | ≤ [`CLIENT_ENTRIES_MAX`] |
//! | 2 | 2 | reserved | 0 |
//! | 4 + 16·i | 8 | `client_id` | ≥ 1 |
//! | 12 + 16·i | 4 | `node_id` | the client's node, ≥ 1 |
//! | 16 + 16·i | 4 | reserved | 0 |
//!
//! Decoded as a [`ClientList`] view of [`ClientEntry`]s.
//!
//! ## node-status list (in `ClusterStatusReply`)
//!
//! | Offset | Size | Field | Meaning |
//! |-------:|-----:|-------|---------|
//! | 0 | 2 | `count` | ≤ [`NODES_MAX`] |
//! | 2 | 2 | reserved | 0 |
//! | 4 + 16·i | 4 | `node` | node id, ≥ 1 |
//! | 8 + 16·i | 1 | `flags` | bit 0 connected, bit 1 member, bit 2 standby ready, bit 3 serving; other bits 0 |
//! | 9 + 16·i | 3 | reserved | 0 |
//! | 12 + 16·i | 8 | `serving_incarnation` | the node's serving server, 0 = none |
//!
//! Decoded as a [`NodeStatusList`] view of [`NodeStatus`]es.
//!
//! # Building lists without allocation
//!
//! A list body is built in a caller scratch buffer with a [`ListBuilder`]
//! ([`RangesBuilder`], [`TargetsBuilder`], [`SnapListBuilder`],
//! [`NodeListBuilder`], [`ClientListBuilder`], [`NodeStatusListBuilder`]) or
//! [`List::from_entries`]; both validate each entry and yield a view to put
//! in a [`Msg`]. [`encode`] copies the view's bytes into the frame. A view
//! decoded from one frame can be put straight into another message (the
//! server echoes a `QueryOriginWrite`'s ranges in `OriginWriteOk`), and
//! [`List::as_bytes`] / [`List::parse`] let a list outlive its frame in a
//! fixed slot. Scratch sizes: [`RANGES_BYTES_MAX`], [`TARGETS_BYTES_MAX`],
//! [`SNAP_LIST_BYTES_MAX`], [`NODE_LIST_BYTES_MAX`], [`CLIENT_LIST_BYTES_MAX`],
//! [`NODE_STATUS_LIST_BYTES_MAX`].
//!
//! ```
//! use csnap_proto::*;
//! let mut scratch = [0u8; RANGES_BYTES_MAX];
//! let ranges = Ranges::from_entries(&[Range { chunk: 5, chunks: 1 }], &mut scratch).unwrap();
//! let mut frame = [0u8; FRAME_MAX_BYTES];
//! let n = encode(&Header::new(42, 0), &Msg::QuerySnapshotRead(ranges), &mut frame).unwrap();
//! let (hdr, msg) = decode(&frame[..n]).unwrap();
//! assert_eq!(hdr.request_id, 42);
//! assert_eq!(msg, Msg::QuerySnapshotRead(ranges));
//! ```

#![forbid(unsafe_code)]

use static_assertions::const_assert;

mod error;
mod frame;
mod list;
mod msg;
mod wire;

pub use error::{DecodeError, EncodeError, Malformed};
pub use frame::FrameReader;
pub use list::{
    ClientEntry, ClientList, ClientListBuilder, Entry, List, ListBuilder, ListIter, Node, NodeList,
    NodeListBuilder, NodeStatus, NodeStatusList, NodeStatusListBuilder, Range, Ranges,
    RangesBuilder, SnapInfo, SnapList, SnapListBuilder, Target, TargetKind, Targets,
    TargetsBuilder, LIST_HEADER_BYTES,
};
pub use msg::{
    decode, encode, negotiate, peek_header, ClusterOp, ErrorCode, ErrorText, FenceReason, Header,
    Kind, Msg, RevokeWhat, Role, ServerState, Volume,
};

// ---------------------------------------------------------------------------
// Bounds.
// ---------------------------------------------------------------------------

/// Largest frame, header included. Memory cost: one receive buffer of this
/// size per connection.
pub const FRAME_MAX_BYTES: usize = 64 * 1024;
/// Bytes of the frame header.
pub const HEADER_BYTES: usize = 32;
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// `b"csnw"` as a little-endian u32, at offset 0 of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"csnw");

/// Ranges in one range list.
pub const RANGES_MAX: usize = 64;
/// Targets in one target list. A query's targets split its ranges wherever
/// the store chunks are not consecutive; this bounds the reply.
pub const TARGETS_MAX: usize = RANGES_MAX * 16;
/// Chunks one `QuerySnapshotRead` or `QuerySnapshotWrite` may cover, summed
/// over its ranges: each target covers at least one chunk, so the reply's
/// targets always fit in [`TARGETS_MAX`].
pub const QUERY_CHUNKS_MAX: usize = TARGETS_MAX;
/// Chunks one `QueryDelta` may cover (its `DeltaMap` carries one bit
/// each: 4 KiB of bitmap). Declared again here so the protocol does not
/// depend on the pools; equal to `csnap_pools::DELTA_QUERY_CHUNKS_MAX`.
pub const DELTA_CHUNKS_MAX: usize = 32 * 1024;
/// Bytes of text in an `Error` message.
pub const ERROR_TEXT_MAX_BYTES: usize = 200;
/// Entries in one page of a snapshot list (`ListSnapshots { from }`): the
/// snapshots whose tag is at least `from`, in tag order, whole tags only.
/// A listing asks from tag 0, then from one past the last tag of each
/// page, until a page comes back empty; no reply grows with the table.
/// Equal to `csnap_pools::SNAPSHOT_LIST_PAGE_ROWS`.
pub const SNAP_LIST_PAGE_MAX: usize = 32;

/// Bytes of an address (a unix socket path or `host:port`, UTF-8) in the
/// agent protocol's messages.
pub const ADDR_MAX_BYTES: usize = 200;
/// Entries in a node list or a node-status list: the most nodes a cluster
/// has.
pub const NODES_MAX: usize = 256;
/// Entries in a client list: the volume clients of a former incarnation a
/// recovery waits for, or those of one node.
pub const CLIENT_ENTRIES_MAX: usize = 1024;

/// `Identify` flag bit: the client caches origin write grants, read locks
/// and snapshot mappings, and answers `Revoke` and `ReleaseLocks`.
pub const IDENTIFY_CACHING: u16 = 1 << 0;

/// Encoded size of the largest range list.
pub const RANGES_BYTES_MAX: usize = LIST_HEADER_BYTES + RANGES_MAX * 16;
/// Encoded size of the largest target list.
pub const TARGETS_BYTES_MAX: usize = LIST_HEADER_BYTES + TARGETS_MAX * 24;
/// Encoded size of the largest snapshot list.
pub const SNAP_LIST_BYTES_MAX: usize = LIST_HEADER_BYTES + SNAP_LIST_PAGE_MAX * 32;
/// Encoded size of the largest node list.
pub const NODE_LIST_BYTES_MAX: usize = LIST_HEADER_BYTES + NODES_MAX * 4;
/// Encoded size of the largest client list.
pub const CLIENT_LIST_BYTES_MAX: usize = LIST_HEADER_BYTES + CLIENT_ENTRIES_MAX * 16;
/// Encoded size of the largest node-status list.
pub const NODE_STATUS_LIST_BYTES_MAX: usize = LIST_HEADER_BYTES + NODES_MAX * 16;

// Counts are u16 on the wire.
const_assert!(RANGES_MAX <= u16::MAX as usize);
const_assert!(TARGETS_MAX <= u16::MAX as usize);
const_assert!(SNAP_LIST_PAGE_MAX <= u16::MAX as usize);
const_assert!(NODES_MAX <= u16::MAX as usize);
const_assert!(CLIENT_ENTRIES_MAX <= u16::MAX as usize);
const_assert!(ERROR_TEXT_MAX_BYTES <= u16::MAX as usize);
const_assert!(ADDR_MAX_BYTES <= u16::MAX as usize);
// The length field is u32 and the header fits in a frame.
const_assert!(FRAME_MAX_BYTES <= u32::MAX as usize);
const_assert!(HEADER_BYTES < FRAME_MAX_BYTES);
// A query's reply cannot need more targets than a list holds.
const_assert!(QUERY_CHUNKS_MAX <= TARGETS_MAX);
const_assert!(TARGETS_MAX >= RANGES_MAX);
// The largest message of each kind fits in a frame.
const_assert!(HEADER_BYTES + RANGES_BYTES_MAX <= FRAME_MAX_BYTES);
const_assert!(HEADER_BYTES + TARGETS_BYTES_MAX <= FRAME_MAX_BYTES);
const_assert!(HEADER_BYTES + SNAP_LIST_BYTES_MAX <= FRAME_MAX_BYTES);
const_assert!(HEADER_BYTES + 8 + ERROR_TEXT_MAX_BYTES <= FRAME_MAX_BYTES);
const_assert!(
    HEADER_BYTES + msg::START_SERVER_FIXED_BYTES + NODE_LIST_BYTES_MAX + CLIENT_LIST_BYTES_MAX
        <= FRAME_MAX_BYTES
);
const_assert!(HEADER_BYTES + 16 + CLIENT_LIST_BYTES_MAX <= FRAME_MAX_BYTES);
const_assert!(HEADER_BYTES + 16 + ADDR_MAX_BYTES + NODE_STATUS_LIST_BYTES_MAX <= FRAME_MAX_BYTES);
const_assert!(every_kind_fits());
// The list byte sizes agree with the entry types.
const_assert!(RANGES_BYTES_MAX == Ranges::BYTES_MAX);
const_assert!(TARGETS_BYTES_MAX == Targets::BYTES_MAX);
const_assert!(SNAP_LIST_BYTES_MAX == SnapList::BYTES_MAX);
const_assert!(NODE_LIST_BYTES_MAX == NodeList::BYTES_MAX);
const_assert!(CLIENT_LIST_BYTES_MAX == ClientList::BYTES_MAX);
const_assert!(NODE_STATUS_LIST_BYTES_MAX == NodeStatusList::BYTES_MAX);

const fn every_kind_fits() -> bool {
    let mut i = 0;
    while i < Kind::ALL.len() {
        if HEADER_BYTES + Kind::ALL[i].body_max_bytes() > FRAME_MAX_BYTES {
            return false;
        }
        i += 1;
    }
    true
}
