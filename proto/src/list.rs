//! Counted lists of fixed-size entries: range lists, target lists, snapshot
//! lists, and the agent protocol's node, client and node-status lists. Decoded zero-copy as a [`List`] view over the wire bytes;
//! built without allocation by a [`ListBuilder`] writing into a caller buffer.

use core::fmt;
use core::marker::PhantomData;

use crate::error::{EncodeError, Malformed};
use crate::wire::{get_i8, get_u16, get_u32, get_u64, put_i8, put_u16, put_u32, put_u64, zero};
use crate::{CLIENT_ENTRIES_MAX, NODES_MAX, RANGES_MAX, SNAP_LIST_PAGE_MAX, TARGETS_MAX};

/// Bytes before the first entry of a list: `count: u16`, reserved `u16`.
pub const LIST_HEADER_BYTES: usize = 4;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Range {}
    impl Sealed for super::Target {}
    impl Sealed for super::SnapInfo {}
    impl Sealed for super::Node {}
    impl Sealed for super::ClientEntry {}
    impl Sealed for super::NodeStatus {}
}

/// An entry type of a wire list. Sealed: the six list kinds are [`Range`],
/// [`Target`], [`SnapInfo`], [`Node`], [`ClientEntry`] and [`NodeStatus`].
pub trait Entry: Copy + fmt::Debug + sealed::Sealed {
    /// Encoded size of one entry.
    const BYTES: usize;
    /// Most entries one list may carry.
    const MAX: usize;
    /// Decodes and validates one entry; `b` is exactly [`Entry::BYTES`] long.
    fn read(b: &[u8]) -> Result<Self, &'static str>;
    /// Checks the rules `read` enforces, on a value about to be encoded.
    fn check(&self) -> Result<(), &'static str>;
    /// Encodes a checked entry into `b`, exactly [`Entry::BYTES`] long,
    /// reserved bytes zeroed.
    fn write(&self, b: &mut [u8]);
}

// ---------------------------------------------------------------------------
// Entries.
// ---------------------------------------------------------------------------

/// A run of logical chunks: `chunks` chunks starting at `chunk`.
///
/// Valid when `chunks >= 1` and `chunk + chunks` does not overflow a u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    /// First logical chunk.
    pub chunk: u64,
    /// Number of chunks, at least 1.
    pub chunks: u32,
}

impl Range {
    /// The chunk after the last one of the run.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.chunk.saturating_add(u64::from(self.chunks))
    }
}

fn check_run(chunk: u64, chunks: u32) -> Result<(), &'static str> {
    if chunks == 0 {
        return Err("range of zero chunks");
    }
    if chunk.checked_add(u64::from(chunks)).is_none() {
        return Err("range runs past the last addressable chunk");
    }
    Ok(())
}

impl Entry for Range {
    const BYTES: usize = 16;
    const MAX: usize = RANGES_MAX;

    fn read(b: &[u8]) -> Result<Self, &'static str> {
        if !zero(b, 12, 4) {
            return Err("nonzero reserved bytes in a range");
        }
        let r = Range {
            chunk: get_u64(b, 0),
            chunks: get_u32(b, 8),
        };
        r.check()?;
        Ok(r)
    }
    fn check(&self) -> Result<(), &'static str> {
        check_run(self.chunk, self.chunks)
    }
    fn write(&self, b: &mut [u8]) {
        put_u64(b, 0, self.chunk);
        put_u32(b, 8, self.chunks);
        put_u32(b, 12, 0);
    }
}

/// Where the data of a run of snapshot chunks lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TargetKind {
    /// In the snapshot store, at `store_chunk` onwards.
    Store = 1,
    /// Still on the origin, at the same logical address; the chunks are now
    /// read-locked for this client until it sends `FinishSnapshotRead`.
    Origin = 2,
}

impl TargetKind {
    /// Decodes the wire value.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<TargetKind> {
        match v {
            1 => Some(TargetKind::Store),
            2 => Some(TargetKind::Origin),
            _ => None,
        }
    }
}

/// Where to do the I/O for a run of logical chunks.
///
/// For [`TargetKind::Store`], logical chunk `chunk + i` maps to store chunk
/// `store_chunk + i` for `i < chunks`. For [`TargetKind::Origin`],
/// `store_chunk` is 0 and the data is read from the origin at `chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// First logical chunk.
    pub chunk: u64,
    /// Number of chunks, at least 1.
    pub chunks: u32,
    /// Store or origin.
    pub kind: TargetKind,
    /// First store chunk (store targets), 0 (origin targets).
    pub store_chunk: u64,
}

impl Target {
    /// The logical run this target covers.
    #[must_use]
    pub fn range(&self) -> Range {
        Range {
            chunk: self.chunk,
            chunks: self.chunks,
        }
    }
}

impl Entry for Target {
    const BYTES: usize = 24;
    const MAX: usize = TARGETS_MAX;

    fn read(b: &[u8]) -> Result<Self, &'static str> {
        if !zero(b, 13, 3) {
            return Err("nonzero reserved bytes in a target");
        }
        let kind = TargetKind::from_u8(b[12]).ok_or("unknown target kind")?;
        let t = Target {
            chunk: get_u64(b, 0),
            chunks: get_u32(b, 8),
            kind,
            store_chunk: get_u64(b, 16),
        };
        t.check()?;
        Ok(t)
    }
    fn check(&self) -> Result<(), &'static str> {
        check_run(self.chunk, self.chunks)?;
        match self.kind {
            TargetKind::Origin if self.store_chunk != 0 => Err("origin target with a store chunk"),
            TargetKind::Store
                if self
                    .store_chunk
                    .checked_add(u64::from(self.chunks))
                    .is_none() =>
            {
                Err("store target runs past the last addressable chunk")
            }
            _ => Ok(()),
        }
    }
    fn write(&self, b: &mut [u8]) {
        put_u64(b, 0, self.chunk);
        put_u32(b, 8, self.chunks);
        b[12] = self.kind as u8;
        b[13..16].fill(0);
        put_u64(b, 16, self.store_chunk);
    }
}

/// One row of a snapshot list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapInfo {
    /// The snapshot's tag.
    pub tag: u32,
    /// Store-full priority (127 = never chosen for deletion).
    pub priority: i8,
    /// [`SnapInfo::DELETING`] | [`SnapInfo::IN_USE`]; other bits are invalid.
    pub flags: u8,
    /// Creation time, seconds since the Unix epoch.
    pub ctime_secs: u64,
    /// Chunks the snapshot holds in the store.
    pub chunks: u64,
    /// Of those, chunks no other snapshot shares.
    pub unique_chunks: u64,
}

impl SnapInfo {
    /// Flag bit: the snapshot is being deleted in the background.
    pub const DELETING: u8 = 1 << 0;
    /// Flag bit: a client has the snapshot open.
    pub const IN_USE: u8 = 1 << 1;
    /// Every defined flag bit.
    pub const FLAGS_ALL: u8 = Self::DELETING | Self::IN_USE;

    /// Whether the deleting flag is set.
    #[must_use]
    pub fn deleting(&self) -> bool {
        self.flags & Self::DELETING != 0
    }
    /// Whether the in-use flag is set.
    #[must_use]
    pub fn in_use(&self) -> bool {
        self.flags & Self::IN_USE != 0
    }
}

impl Entry for SnapInfo {
    const BYTES: usize = 32;
    const MAX: usize = SNAP_LIST_PAGE_MAX;

    fn read(b: &[u8]) -> Result<Self, &'static str> {
        if !zero(b, 6, 2) {
            return Err("nonzero reserved bytes in a snapshot entry");
        }
        let s = SnapInfo {
            tag: get_u32(b, 0),
            priority: get_i8(b, 4),
            flags: b[5],
            ctime_secs: get_u64(b, 8),
            chunks: get_u64(b, 16),
            unique_chunks: get_u64(b, 24),
        };
        s.check()?;
        Ok(s)
    }
    fn check(&self) -> Result<(), &'static str> {
        if self.flags & !Self::FLAGS_ALL != 0 {
            return Err("undefined snapshot flag bits");
        }
        Ok(())
    }
    fn write(&self, b: &mut [u8]) {
        put_u32(b, 0, self.tag);
        put_i8(b, 4, self.priority);
        b[5] = self.flags;
        put_u16(b, 6, 0);
        put_u64(b, 8, self.ctime_secs);
        put_u64(b, 16, self.chunks);
        put_u64(b, 24, self.unique_chunks);
    }
}

/// One row of a node list: a cluster node.
///
/// Valid when `id >= 1` (node id 0 names no node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Node {
    /// The node id, at least 1.
    pub id: u32,
}

impl Entry for Node {
    const BYTES: usize = 4;
    const MAX: usize = NODES_MAX;

    fn read(b: &[u8]) -> Result<Self, &'static str> {
        let n = Node { id: get_u32(b, 0) };
        n.check()?;
        Ok(n)
    }
    fn check(&self) -> Result<(), &'static str> {
        if self.id == 0 {
            return Err("node id 0 in a node entry");
        }
        Ok(())
    }
    fn write(&self, b: &mut [u8]) {
        put_u32(b, 0, self.id);
    }
}

/// One row of a client list: a volume client and the node it runs on.
///
/// Valid when `client_id >= 1` and `node_id >= 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientEntry {
    /// The client's cluster-unique id (as in its `Identify`), at least 1.
    pub client_id: u64,
    /// The node the client runs on, at least 1.
    pub node_id: u32,
}

impl Entry for ClientEntry {
    const BYTES: usize = 16;
    const MAX: usize = CLIENT_ENTRIES_MAX;

    fn read(b: &[u8]) -> Result<Self, &'static str> {
        if !zero(b, 12, 4) {
            return Err("nonzero reserved bytes in a client entry");
        }
        let c = ClientEntry {
            client_id: get_u64(b, 0),
            node_id: get_u32(b, 8),
        };
        c.check()?;
        Ok(c)
    }
    fn check(&self) -> Result<(), &'static str> {
        if self.client_id == 0 {
            return Err("client id 0 in a client entry");
        }
        if self.node_id == 0 {
            return Err("node id 0 in a client entry");
        }
        Ok(())
    }
    fn write(&self, b: &mut [u8]) {
        put_u64(b, 0, self.client_id);
        put_u32(b, 8, self.node_id);
        put_u32(b, 12, 0);
    }
}

/// One row of a node-status list: what the controller knows of a node.
///
/// Valid when `node >= 1` and `flags` has only defined bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeStatus {
    /// The node id, at least 1.
    pub node: u32,
    /// [`NodeStatus::CONNECTED`] | [`NodeStatus::MEMBER`] |
    /// [`NodeStatus::STANDBY_READY`] | [`NodeStatus::SERVING`]; other bits
    /// are invalid.
    pub flags: u8,
    /// The incarnation of the server serving on this node, 0 if none.
    pub serving_incarnation: u64,
}

impl NodeStatus {
    /// Flag bit: the node's agent is connected to the controller.
    pub const CONNECTED: u8 = 1 << 0;
    /// Flag bit: the node is a cluster member.
    pub const MEMBER: u8 = 1 << 1;
    /// Flag bit: the node's standby server is ready to start.
    pub const STANDBY_READY: u8 = 1 << 2;
    /// Flag bit: the node's server is serving.
    pub const SERVING: u8 = 1 << 3;
    /// Every defined flag bit.
    pub const FLAGS_ALL: u8 = Self::CONNECTED | Self::MEMBER | Self::STANDBY_READY | Self::SERVING;

    /// Whether the connected flag is set.
    #[must_use]
    pub fn connected(&self) -> bool {
        self.flags & Self::CONNECTED != 0
    }
    /// Whether the member flag is set.
    #[must_use]
    pub fn member(&self) -> bool {
        self.flags & Self::MEMBER != 0
    }
    /// Whether the standby-ready flag is set.
    #[must_use]
    pub fn standby_ready(&self) -> bool {
        self.flags & Self::STANDBY_READY != 0
    }
    /// Whether the serving flag is set.
    #[must_use]
    pub fn serving(&self) -> bool {
        self.flags & Self::SERVING != 0
    }
}

impl Entry for NodeStatus {
    const BYTES: usize = 16;
    const MAX: usize = NODES_MAX;

    fn read(b: &[u8]) -> Result<Self, &'static str> {
        if !zero(b, 5, 3) {
            return Err("nonzero reserved bytes in a node-status entry");
        }
        let s = NodeStatus {
            node: get_u32(b, 0),
            flags: b[4],
            serving_incarnation: get_u64(b, 8),
        };
        s.check()?;
        Ok(s)
    }
    fn check(&self) -> Result<(), &'static str> {
        if self.node == 0 {
            return Err("node id 0 in a node-status entry");
        }
        if self.flags & !Self::FLAGS_ALL != 0 {
            return Err("undefined node-status flag bits");
        }
        Ok(())
    }
    fn write(&self, b: &mut [u8]) {
        put_u32(b, 0, self.node);
        b[4] = self.flags;
        b[5..8].fill(0);
        put_u64(b, 8, self.serving_incarnation);
    }
}

// ---------------------------------------------------------------------------
// The view.
// ---------------------------------------------------------------------------

/// A validated, zero-copy view of a wire list (count, reserved, entries).
///
/// Only [`List::parse`], [`ListBuilder::finish`], [`List::from_entries`] and
/// [`List::empty`] make one, so every view holds a well-formed list and its
/// accessors cannot fail.
pub struct List<'a, E> {
    bytes: &'a [u8],
    _entry: PhantomData<E>,
}

/// A range list: the body of queries, `OriginWriteOk`, `FinishSnapshotRead`
/// and `UploadLocks`.
pub type Ranges<'a> = List<'a, Range>;
/// A target list: the body of `SnapshotReadReply` and `SnapshotWriteOk`.
pub type Targets<'a> = List<'a, Target>;
/// A snapshot list: the body of `SnapshotList`.
pub type SnapList<'a> = List<'a, SnapInfo>;
/// A node list: in `StartServer` and `Members`.
pub type NodeList<'a> = List<'a, Node>;
/// A client list: in `StartServer` and `Clients`.
pub type ClientList<'a> = List<'a, ClientEntry>;
/// A node-status list: in `ClusterStatusReply`.
pub type NodeStatusList<'a> = List<'a, NodeStatus>;

const EMPTY_LIST: [u8; LIST_HEADER_BYTES] = [0; LIST_HEADER_BYTES];

impl<'a, E: Entry> List<'a, E> {
    /// Encoded size of the largest list of this kind.
    pub const BYTES_MAX: usize = LIST_HEADER_BYTES + E::MAX * E::BYTES;

    /// Encoded size of a list of `n` entries.
    #[must_use]
    pub const fn bytes_for(n: usize) -> usize {
        LIST_HEADER_BYTES + n * E::BYTES
    }

    /// The empty list.
    #[must_use]
    pub const fn empty() -> List<'static, E> {
        List {
            bytes: &EMPTY_LIST,
            _entry: PhantomData,
        }
    }

    /// Validates `bytes` as exactly one list: count within [`Entry::MAX`],
    /// length exact, reserved bytes zero, every entry valid.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Malformed> {
        if bytes.len() < LIST_HEADER_BYTES {
            return Err(Malformed {
                what: "list shorter than its count",
            });
        }
        let count = usize::from(get_u16(bytes, 0));
        if get_u16(bytes, 2) != 0 {
            return Err(Malformed {
                what: "nonzero reserved bytes after the list count",
            });
        }
        if count > E::MAX {
            return Err(Malformed {
                what: "list count over the maximum",
            });
        }
        if bytes.len() != Self::bytes_for(count) {
            return Err(Malformed {
                what: "list length does not match its count",
            });
        }
        for e in bytes[LIST_HEADER_BYTES..].chunks_exact(E::BYTES) {
            E::read(e).map_err(|what| Malformed { what })?;
        }
        Ok(List {
            bytes,
            _entry: PhantomData,
        })
    }

    /// Validates the list at the front of `bytes`, its length given by its
    /// count, and returns it with the bytes after it (for a body holding a
    /// list followed by more).
    pub(crate) fn parse_prefix(bytes: &'a [u8]) -> Result<(Self, &'a [u8]), Malformed> {
        let count = if bytes.len() < LIST_HEADER_BYTES {
            0
        } else {
            usize::from(get_u16(bytes, 0))
        };
        // Clipped to the bytes there are: `parse` then reports the short list.
        let n = Self::bytes_for(count).min(bytes.len());
        let (head, rest) = bytes.split_at(n);
        Ok((Self::parse(head)?, rest))
    }

    /// Writes `items` as a list into `buf` and returns the view of it.
    pub fn from_entries(items: &[E], buf: &'a mut [u8]) -> Result<Self, EncodeError> {
        let mut b = ListBuilder::new(buf)?;
        for &e in items {
            b.push(e)?;
        }
        Ok(b.finish())
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        (self.bytes.len() - LIST_HEADER_BYTES) / E::BYTES
    }

    /// True when the list has no entries.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i`, or `None` past the end.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<E> {
        if i >= self.len() {
            return None;
        }
        let off = LIST_HEADER_BYTES + i * E::BYTES;
        E::read(&self.bytes[off..off + E::BYTES]).ok()
    }

    /// The entries in order.
    #[must_use]
    pub fn iter(&self) -> ListIter<'a, E> {
        ListIter {
            rest: &self.bytes[LIST_HEADER_BYTES..],
            _entry: PhantomData,
        }
    }

    /// The whole encoded list (count, reserved, entries): copy it to keep the
    /// list beyond the frame it came from, and [`List::parse`] it back.
    #[must_use]
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

impl<'a> List<'a, Range> {
    /// Sum of `chunks` over the ranges.
    #[must_use]
    pub fn total_chunks(&self) -> u64 {
        self.iter().map(|r| u64::from(r.chunks)).sum()
    }
}

impl<'a> List<'a, Target> {
    /// Sum of `chunks` over the targets.
    #[must_use]
    pub fn total_chunks(&self) -> u64 {
        self.iter().map(|t| u64::from(t.chunks)).sum()
    }
}

impl<E> Clone for List<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for List<'_, E> {}

impl<E> PartialEq for List<'_, E> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}
impl<E> Eq for List<'_, E> {}

impl<E: Entry> fmt::Debug for List<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a, E: Entry> IntoIterator for List<'a, E> {
    type Item = E;
    type IntoIter = ListIter<'a, E>;
    fn into_iter(self) -> ListIter<'a, E> {
        self.iter()
    }
}

impl<'a, E: Entry> IntoIterator for &List<'a, E> {
    type Item = E;
    type IntoIter = ListIter<'a, E>;
    fn into_iter(self) -> ListIter<'a, E> {
        self.iter()
    }
}

/// Iterator over the entries of a [`List`].
pub struct ListIter<'a, E> {
    rest: &'a [u8],
    _entry: PhantomData<E>,
}

impl<E: Entry> Iterator for ListIter<'_, E> {
    type Item = E;
    fn next(&mut self) -> Option<E> {
        if self.rest.len() < E::BYTES {
            return None;
        }
        let (head, tail) = self.rest.split_at(E::BYTES);
        self.rest = tail;
        E::read(head).ok()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.rest.len() / E::BYTES;
        (n, Some(n))
    }
}

impl<E: Entry> ExactSizeIterator for ListIter<'_, E> {}

impl<E> Clone for ListIter<'_, E> {
    fn clone(&self) -> Self {
        ListIter {
            rest: self.rest,
            _entry: PhantomData,
        }
    }
}

impl<E: Entry> fmt::Debug for ListIter<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.clone()).finish()
    }
}

// ---------------------------------------------------------------------------
// The builder.
// ---------------------------------------------------------------------------

/// Appends entries to a list in a caller buffer, without allocation.
///
/// ```
/// use csnap_proto::{Range, RangesBuilder, RANGES_BYTES_MAX};
/// let mut scratch = [0u8; RANGES_BYTES_MAX];
/// let mut b = RangesBuilder::new(&mut scratch).unwrap();
/// b.push(Range { chunk: 10, chunks: 2 }).unwrap();
/// let ranges = b.finish();
/// assert_eq!(ranges.get(0), Some(Range { chunk: 10, chunks: 2 }));
/// ```
pub struct ListBuilder<'a, E> {
    buf: &'a mut [u8],
    len: usize,
    _entry: PhantomData<E>,
}

/// Builds a [`Ranges`].
pub type RangesBuilder<'a> = ListBuilder<'a, Range>;
/// Builds a [`Targets`].
pub type TargetsBuilder<'a> = ListBuilder<'a, Target>;
/// Builds a [`SnapList`].
pub type SnapListBuilder<'a> = ListBuilder<'a, SnapInfo>;
/// Builds a [`NodeList`].
pub type NodeListBuilder<'a> = ListBuilder<'a, Node>;
/// Builds a [`ClientList`].
pub type ClientListBuilder<'a> = ListBuilder<'a, ClientEntry>;
/// Builds a [`NodeStatusList`].
pub type NodeStatusListBuilder<'a> = ListBuilder<'a, NodeStatus>;

impl<'a, E: Entry> ListBuilder<'a, E> {
    /// Starts an empty list at the front of `buf`, which must hold at least
    /// the 4-byte list header.
    pub fn new(buf: &'a mut [u8]) -> Result<Self, EncodeError> {
        if buf.len() < LIST_HEADER_BYTES {
            return Err(EncodeError::BufferTooSmall {
                need: LIST_HEADER_BYTES,
                have: buf.len(),
            });
        }
        buf[..LIST_HEADER_BYTES].fill(0);
        Ok(ListBuilder {
            buf,
            len: 0,
            _entry: PhantomData,
        })
    }

    /// Appends one entry. Fails, leaving the list as it was, when the entry
    /// is invalid, the list holds [`Entry::MAX`] entries, or `buf` is full.
    pub fn push(&mut self, e: E) -> Result<(), EncodeError> {
        e.check().map_err(|what| EncodeError::Invalid { what })?;
        if self.len >= E::MAX {
            return Err(EncodeError::ListFull { max: E::MAX });
        }
        let off = List::<E>::bytes_for(self.len);
        let need = off + E::BYTES;
        if need > self.buf.len() {
            return Err(EncodeError::BufferTooSmall {
                need,
                have: self.buf.len(),
            });
        }
        let count =
            u16::try_from(self.len + 1).map_err(|_| EncodeError::ListFull { max: E::MAX })?;
        e.write(&mut self.buf[off..need]);
        put_u16(self.buf, 0, count);
        self.len += 1;
        Ok(())
    }

    /// Entries pushed so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was pushed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries that can still be pushed (bounded by [`Entry::MAX`] and by the
    /// buffer).
    #[must_use]
    pub fn remaining(&self) -> usize {
        let by_buf = (self.buf.len() - List::<E>::bytes_for(self.len)) / E::BYTES;
        by_buf.min(E::MAX - self.len)
    }

    /// Ends the list and returns the view of it in the buffer.
    #[must_use]
    pub fn finish(self) -> List<'a, E> {
        let n = List::<E>::bytes_for(self.len);
        let buf: &'a [u8] = self.buf;
        List {
            bytes: &buf[..n],
            _entry: PhantomData,
        }
    }
}

impl<E: Entry> fmt::Debug for ListBuilder<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListBuilder")
            .field("len", &self.len)
            .field("buf_bytes", &self.buf.len())
            .finish()
    }
}
