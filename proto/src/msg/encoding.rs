//! Encoding: [`encode`] writes a frame, `Msg::write_body` dispatches on
//! the kind's [`Family`] to one `write_<family>` per family, each with one
//! arm per message.

use super::check::check;
use super::header::{
    OFF_FLAGS, OFF_INCARNATION, OFF_KIND, OFF_LENGTH, OFF_MAGIC, OFF_REQUEST_ID, OFF_VERSION,
};
use super::kind::Family;
use super::layout::*;
use super::{Header, Msg, Volume};
use crate::error::EncodeError;
use crate::wire::{put_i8, put_u16, put_u32, put_u64};
use crate::{FRAME_MAX_BYTES, HEADER_BYTES, MAGIC, PROTOCOL_VERSION};

/// Encodes one frame into the front of `out` and returns its length.
///
/// Takes `version`, `flags`, `request_id` and `incarnation` from `hdr`;
/// writes the message's kind and the computed length. Writes nothing when it
/// fails. Everything `encode` accepts, [`decode`] accepts and returns equal.
pub fn encode(hdr: &Header, msg: &Msg<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    if hdr.version != PROTOCOL_VERSION {
        return Err(EncodeError::Invalid {
            what: "header version is not PROTOCOL_VERSION",
        });
    }
    if hdr.flags != 0 {
        return Err(EncodeError::Invalid {
            what: "nonzero header flags",
        });
    }
    check(msg).map_err(|what| EncodeError::Invalid { what })?;
    let n = msg.frame_bytes();
    if n > FRAME_MAX_BYTES {
        return Err(EncodeError::Invalid {
            what: "frame over FRAME_MAX_BYTES",
        });
    }
    if out.len() < n {
        return Err(EncodeError::BufferTooSmall {
            need: n,
            have: out.len(),
        });
    }
    let length = u32::try_from(n).map_err(|_| EncodeError::Invalid {
        what: "frame over FRAME_MAX_BYTES",
    })?;
    let frame = &mut out[..n];
    put_u32(frame, OFF_MAGIC, MAGIC);
    put_u16(frame, OFF_VERSION, PROTOCOL_VERSION);
    put_u16(frame, OFF_KIND, msg.kind().code());
    put_u32(frame, OFF_LENGTH, length);
    put_u32(frame, OFF_FLAGS, 0);
    put_u64(frame, OFF_REQUEST_ID, hdr.request_id);
    put_u64(frame, OFF_INCARNATION, hdr.incarnation);
    msg.write_body(&mut frame[HEADER_BYTES..]);
    Ok(n)
}

impl Msg<'_> {
    /// Encoded body size.
    #[must_use]
    pub fn body_bytes(&self) -> usize {
        match self {
            Msg::QueryOriginWrite(r)
            | Msg::OriginWriteOk(r)
            | Msg::QuerySnapshotRead(r)
            | Msg::FinishSnapshotRead(r)
            | Msg::QuerySnapshotWrite(r)
            | Msg::UploadLocks(r) => r.as_bytes().len(),
            Msg::SnapshotReadReply(t) | Msg::SnapshotWriteOk(t) => t.as_bytes().len(),
            Msg::SnapshotList(s) => s.as_bytes().len(),
            Msg::DeltaMap { bits, .. } => DELTA_MAP_FIXED_BYTES + bits.len(),
            Msg::Error { text, .. } => ERROR_FIXED_BYTES + text.len(),
            Msg::Revoke { ranges, .. } => REVOKE_FIXED_BYTES + ranges.as_bytes().len(),
            Msg::ReleaseLocks(r) => r.as_bytes().len(),
            Msg::ServerAddress { addr, .. } => SERVER_ADDRESS_FIXED_BYTES + addr.len(),
            Msg::ServerReady { addr, .. } => SERVER_READY_FIXED_BYTES + addr.len(),
            Msg::StartServer {
                members, expected, ..
            } => START_SERVER_FIXED_BYTES + members.as_bytes().len() + expected.as_bytes().len(),
            Msg::Join { addr, .. } => JOIN_FIXED_BYTES + addr.len(),
            Msg::Members { members, .. } => MEMBERS_FIXED_BYTES + members.as_bytes().len(),
            Msg::Clients { clients, .. } => CLIENTS_FIXED_BYTES + clients.as_bytes().len(),
            Msg::ClientsOf { clients, .. } => CLIENTS_OF_FIXED_BYTES + clients.as_bytes().len(),
            Msg::ServerUp { addr, .. } => SERVER_UP_FIXED_BYTES + addr.len(),
            Msg::ClusterStatusReply {
                server_addr, nodes, ..
            } => CLUSTER_STATUS_REPLY_FIXED_BYTES + server_addr.len() + nodes.as_bytes().len(),
            _ => self.kind().body_max_bytes(),
        }
    }

    /// Encoded frame size (header and body).
    #[must_use]
    pub fn frame_bytes(&self) -> usize {
        HEADER_BYTES + self.body_bytes()
    }

    /// Writes the body into `b`, exactly `body_bytes()` long.
    fn write_body(&self, b: &mut [u8]) {
        b.fill(0);
        match self.kind().family() {
            Family::Session => self.write_session(b),
            Family::Locks => self.write_locks(b),
            Family::Snapshots => self.write_snapshots(b),
            Family::Status => self.write_status(b),
            Family::Notice => self.write_notice(b),
            Family::Locate => self.write_locate(b),
            Family::Hosting => self.write_hosting(b),
            Family::Membership => self.write_membership(b),
            Family::Placement => self.write_placement(b),
            Family::Control => self.write_control(b),
        }
    }

    /// Writes the body of a [`Family::Session`] message.
    fn write_session(&self, b: &mut [u8]) {
        match *self {
            Msg::Hello {
                version_min,
                version_max,
                role,
            } => {
                put_u16(b, 0, version_min);
                put_u16(b, 2, version_max);
                put_u16(b, 4, role as u16);
            }
            Msg::HelloOk { version, server_id } => {
                put_u16(b, 0, version);
                put_u64(b, 8, server_id);
            }
            Msg::Identify {
                client_id,
                node_id,
                volume,
                origin_uuid,
                volume_size_bytes,
                chunk_size_bytes,
                flags,
            } => {
                put_u64(b, 0, client_id);
                put_u64(b, 8, volume_size_bytes);
                b[16..32].copy_from_slice(&origin_uuid);
                put_u32(b, 32, node_id);
                put_u32(b, 36, chunk_size_bytes);
                let (code, tag) = volume_code(Some(volume));
                put_u16(b, 40, code);
                put_u16(b, 42, flags);
                put_u32(b, 44, tag);
            }
            Msg::IdentifyOk {
                chunk_size_bytes,
                origin_size_bytes,
                volume_size_bytes,
            } => {
                put_u64(b, 0, origin_size_bytes);
                put_u64(b, 8, volume_size_bytes);
                put_u32(b, 16, chunk_size_bytes);
            }
            Msg::Error {
                code,
                culprit,
                text,
            } => {
                put_u32(b, 0, code.code());
                put_u16(b, 4, culprit);
                // check() bounded the text to ERROR_TEXT_MAX_BYTES.
                put_u16(b, 6, u16::try_from(text.len()).unwrap_or(u16::MAX));
                b[ERROR_FIXED_BYTES..].copy_from_slice(text.as_bytes());
            }
            other => unreachable!("{other} is not a {:?} message", Family::Session),
        }
    }

    /// Writes the body of a [`Family::Locks`] message.
    fn write_locks(&self, b: &mut [u8]) {
        match *self {
            Msg::QueryOriginWrite(r)
            | Msg::OriginWriteOk(r)
            | Msg::QuerySnapshotRead(r)
            | Msg::FinishSnapshotRead(r)
            | Msg::QuerySnapshotWrite(r)
            | Msg::UploadLocks(r) => b.copy_from_slice(r.as_bytes()),
            Msg::SnapshotReadReply(t) | Msg::SnapshotWriteOk(t) => b.copy_from_slice(t.as_bytes()),
            Msg::FinishUpload | Msg::UploadOk | Msg::RevokeDone => {}
            other => unreachable!("{other} is not a {:?} message", Family::Locks),
        }
    }

    /// Writes the body of a [`Family::Snapshots`] message.
    fn write_snapshots(&self, b: &mut [u8]) {
        match *self {
            Msg::SnapshotList(s) => b.copy_from_slice(s.as_bytes()),
            Msg::CreateSnapshot { tag }
            | Msg::DeleteSnapshot { tag }
            | Msg::ListSnapshots { from: tag } => put_u32(b, 0, tag),
            Msg::SetPriority { tag, priority } => {
                put_u32(b, 0, tag);
                put_i8(b, 4, priority);
            }
            Msg::Ok => {}
            other => unreachable!("{other} is not a {:?} message", Family::Snapshots),
        }
    }

    /// Writes the body of a [`Family::Status`] message.
    fn write_status(&self, b: &mut [u8]) {
        match *self {
            Msg::QueryDelta {
                volume,
                base,
                chunk,
                chunks,
            } => {
                put_u64(b, 0, chunk);
                put_u32(b, 8, chunks);
                put_u32(b, 12, base);
                let (code, tag) = volume_code(Some(volume));
                put_u16(b, 16, code);
                put_u32(b, 20, tag);
            }
            Msg::DeltaMap {
                chunk,
                chunks,
                bits,
            } => {
                put_u64(b, 0, chunk);
                put_u32(b, 8, chunks);
                b[DELTA_MAP_FIXED_BYTES..].copy_from_slice(bits);
            }
            Msg::StatusReply {
                incarnation,
                chunk_size_bytes,
                origin_chunks,
                data_chunks,
                data_free,
                meta_blocks,
                meta_free,
                snapshots,
                deleting,
                clients,
                read_locks,
                waiting_writes,
                commits,
                state,
                copyouts,
            } => {
                put_u64(b, 0, incarnation);
                put_u64(b, 8, origin_chunks);
                put_u64(b, 16, data_chunks);
                put_u64(b, 24, data_free);
                put_u64(b, 32, meta_blocks);
                put_u64(b, 40, meta_free);
                put_u64(b, 48, commits);
                put_u32(b, 56, chunk_size_bytes);
                put_u32(b, 60, snapshots);
                put_u32(b, 64, deleting);
                put_u32(b, 68, clients);
                put_u32(b, 72, read_locks);
                put_u32(b, 76, waiting_writes);
                b[80] = state as u8;
                put_u64(b, 88, copyouts);
            }
            Msg::Status => {}
            other => unreachable!("{other} is not a {:?} message", Family::Status),
        }
    }

    /// Writes the body of a [`Family::Notice`] message.
    fn write_notice(&self, b: &mut [u8]) {
        match *self {
            Msg::Revoke { what, ranges } => {
                put_u16(b, 0, what as u16);
                b[REVOKE_FIXED_BYTES..].copy_from_slice(ranges.as_bytes());
            }
            Msg::ReleaseLocks(r) => b.copy_from_slice(r.as_bytes()),
            other => unreachable!("{other} is not a {:?} message", Family::Notice),
        }
    }

    /// Writes the body of a [`Family::Locate`] message.
    fn write_locate(&self, b: &mut [u8]) {
        match *self {
            Msg::NeedServer {
                client_id,
                failed_incarnation,
                node_id,
                volume,
            } => {
                put_u64(b, 0, client_id);
                put_u64(b, 8, failed_incarnation);
                put_u32(b, 16, node_id);
                let (code, tag) = volume_code(volume);
                put_u16(b, 20, code);
                put_u32(b, 24, tag);
            }
            Msg::ServerAddress {
                incarnation,
                node_id,
                addr,
            } => put_server_at(b, incarnation, node_id, addr),
            Msg::ServerReady { pid, node_id, addr } => {
                put_u32(b, 0, pid);
                put_u32(b, 4, node_id);
                put_addr(b, 10, SERVER_READY_FIXED_BYTES, addr);
            }
            other => unreachable!("{other} is not a {:?} message", Family::Locate),
        }
    }

    /// Writes the body of a [`Family::Hosting`] message.
    fn write_hosting(&self, b: &mut [u8]) {
        match *self {
            Msg::StartServer {
                claim,
                members,
                expected,
            } => {
                b[0] = if claim { START_FLAG_CLAIM } else { 0 };
                let (m, e) = b[START_SERVER_FIXED_BYTES..].split_at_mut(members.as_bytes().len());
                m.copy_from_slice(members.as_bytes());
                e.copy_from_slice(expected.as_bytes());
            }
            Msg::Serving {
                incarnation,
                start_micros,
                replayed_commits,
            } => {
                put_u64(b, 0, incarnation);
                put_u64(b, 8, start_micros);
                put_u64(b, 16, replayed_commits);
            }
            Msg::NodeJoined { node_id } | Msg::NodeLeft { node_id } => put_u32(b, 0, node_id),
            Msg::ClientGone { client_id, node_id } => {
                put_u64(b, 0, client_id);
                put_u32(b, 8, node_id);
            }
            Msg::ClientsOf { node_id, clients } => {
                put_u32(b, 0, node_id);
                b[CLIENTS_OF_FIXED_BYTES..].copy_from_slice(clients.as_bytes());
            }
            other => unreachable!("{other} is not a {:?} message", Family::Hosting),
        }
    }

    /// Writes the body of a [`Family::Membership`] message.
    fn write_membership(&self, b: &mut [u8]) {
        match *self {
            Msg::Join { node_id, addr } => {
                put_u32(b, 0, node_id);
                put_addr(b, 6, JOIN_FIXED_BYTES, addr);
            }
            Msg::Members { epoch, members } => {
                put_u64(b, 0, epoch);
                b[MEMBERS_FIXED_BYTES..].copy_from_slice(members.as_bytes());
            }
            Msg::AgentState {
                node_id,
                standby_ready,
                recent_deaths,
                serving_incarnation,
                died_incarnation,
            } => {
                put_u32(b, 0, node_id);
                b[4] = u8::from(standby_ready);
                put_u16(b, 6, recent_deaths);
                put_u64(b, 8, serving_incarnation);
                put_u64(b, 16, died_incarnation);
            }
            other => unreachable!("{other} is not a {:?} message", Family::Membership),
        }
    }

    /// Writes the body of a [`Family::Placement`] message.
    fn write_placement(&self, b: &mut [u8]) {
        match *self {
            Msg::WantServer { failed_incarnation } => put_u64(b, 0, failed_incarnation),
            Msg::StartHere {
                attempt,
                former_incarnation,
                claim,
            } => {
                put_u64(b, 0, attempt);
                put_u64(b, 8, former_incarnation);
                b[16] = if claim { START_FLAG_CLAIM } else { 0 };
            }
            Msg::NeedClients { gather_id, starter } => {
                put_u64(b, 0, gather_id);
                put_u32(b, 8, starter);
            }
            Msg::Clients {
                gather_id,
                from,
                to,
                clients,
            } => {
                put_u64(b, 0, gather_id);
                put_u32(b, 8, from);
                put_u32(b, 12, to);
                b[CLIENTS_FIXED_BYTES..].copy_from_slice(clients.as_bytes());
            }
            Msg::ServerDown {
                incarnation,
                node_id,
            } => {
                put_u64(b, 0, incarnation);
                put_u32(b, 8, node_id);
            }
            Msg::Fence { reason } => put_u32(b, 0, reason as u32),
            Msg::ServerUp {
                incarnation,
                node_id,
                addr,
            } => put_server_at(b, incarnation, node_id, addr),
            other => unreachable!("{other} is not a {:?} message", Family::Placement),
        }
    }

    /// Writes the body of a [`Family::Control`] message.
    fn write_control(&self, b: &mut [u8]) {
        match *self {
            Msg::ClusterCommand { op, node_id } => {
                put_u32(b, 0, op as u32);
                put_u32(b, 4, node_id);
            }
            Msg::ClusterStatusReply {
                server_incarnation,
                server_node,
                failed_deaths,
                server_addr,
                nodes,
            } => {
                put_u64(b, 0, server_incarnation);
                put_u32(b, 8, server_node);
                b[12..14].copy_from_slice(&failed_deaths.to_le_bytes());
                put_addr(b, 14, CLUSTER_STATUS_REPLY_FIXED_BYTES, server_addr);
                b[CLUSTER_STATUS_REPLY_FIXED_BYTES + server_addr.len()..]
                    .copy_from_slice(nodes.as_bytes());
            }
            Msg::ClusterStatus => {}
            other => unreachable!("{other} is not a {:?} message", Family::Control),
        }
    }
}

/// A volume field: its code and the snapshot tag (0 for the origin or none).
fn volume_code(volume: Option<Volume>) -> (u16, u32) {
    match volume {
        None => (VOLUME_NONE, 0),
        Some(Volume::Origin) => (VOLUME_ORIGIN, 0),
        Some(Volume::Snapshot(tag)) => (VOLUME_SNAPSHOT, tag),
    }
}

/// The body of `ServerAddress` and `ServerUp`: incarnation, node, address.
fn put_server_at(b: &mut [u8], incarnation: u64, node_id: u32, addr: &str) {
    put_u64(b, 0, incarnation);
    put_u32(b, 8, node_id);
    put_addr(b, 14, SERVER_ADDRESS_FIXED_BYTES, addr);
}

/// Writes an address: its length (u16) at `len_off`, its bytes at `at`.
/// `check` bounded it to [`ADDR_MAX_BYTES`].
fn put_addr(b: &mut [u8], len_off: usize, at: usize, addr: &str) {
    put_u16(b, len_off, u16::try_from(addr.len()).unwrap_or(u16::MAX));
    b[at..at + addr.len()].copy_from_slice(addr.as_bytes());
}
