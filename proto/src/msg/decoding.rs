//! Decoding: [`decode`] reads a frame, `read_body` dispatches on the
//! kind's [`Family`] to one `read_<family>` per family, each with one arm per
//! kind; [`check`] runs after.

use super::check::check;
use super::header::peek_header;
use super::kind::Family;
use super::layout::*;
use super::{
    ClusterOp, ErrorCode, FenceReason, Header, Kind, Msg, RevokeWhat, Role, ServerState, Volume,
};
use crate::error::DecodeError;
use crate::list::{ClientList, NodeList, NodeStatusList, Ranges, SnapList, Targets};
use crate::wire::{get_i8, get_u16, get_u32, get_u64, zero};
use crate::{ADDR_MAX_BYTES, ERROR_TEXT_MAX_BYTES, HEADER_BYTES};

/// Decodes exactly one frame (`frame.len()` equal to its length field).
///
/// Checks in order: header ([`peek_header`]), completeness (`Truncated`),
/// no trailing bytes, flags, kind, body layout and values. The message
/// borrows list bodies, error text and addresses from `frame`.
pub fn decode(frame: &[u8]) -> Result<(Header, Msg<'_>), DecodeError> {
    let hdr = peek_header(frame)?.ok_or(DecodeError::Truncated)?;
    let len = hdr.length as usize;
    if frame.len() < len {
        return Err(DecodeError::Truncated);
    }
    if frame.len() > len {
        return Err(DecodeError::TrailingBytes {
            len: hdr.length,
            have: frame.len(),
        });
    }
    if hdr.flags != 0 {
        return Err(DecodeError::BadFlags);
    }
    let kind = Kind::from_u16(hdr.kind).ok_or(DecodeError::UnknownKind { code: hdr.kind })?;
    let body = &frame[HEADER_BYTES..];
    let msg = read_body(kind, body)
        .and_then(|m| check(&m).map(|()| m))
        .map_err(|what| DecodeError::BadBody { kind, what })?;
    Ok((hdr, msg))
}

/// Decodes a body of a known kind (layout and per-field rules; `check` runs
/// after).
fn read_body(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    match kind.family() {
        Family::Session => read_session(kind, b),
        Family::Locks => read_locks(kind, b),
        Family::Snapshots => read_snapshots(kind, b),
        Family::Status => read_status(kind, b),
        Family::Notice => read_notice(kind, b),
        Family::Locate => read_locate(kind, b),
        Family::Hosting => read_hosting(kind, b),
        Family::Membership => read_membership(kind, b),
        Family::Placement => read_placement(kind, b),
        Family::Control => read_control(kind, b),
    }
}

/// Reads the body of a [`Family::Session`] kind.
fn read_session(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::Hello => {
            exact(b, HELLO_BYTES)?;
            reserved(b, 6, 2)?;
            let role = Role::from_u16(get_u16(b, 4)).ok_or("unknown role")?;
            Msg::Hello {
                version_min: get_u16(b, 0),
                version_max: get_u16(b, 2),
                role,
            }
        }
        Kind::HelloOk => {
            exact(b, HELLO_OK_BYTES)?;
            reserved(b, 2, 6)?;
            Msg::HelloOk {
                version: get_u16(b, 0),
                server_id: get_u64(b, 8),
            }
        }
        Kind::Identify => {
            exact(b, IDENTIFY_BYTES)?;
            let volume = get_volume(get_u16(b, 40), get_u32(b, 44))?;
            let mut origin_uuid = [0u8; 16];
            origin_uuid.copy_from_slice(&b[16..32]);
            Msg::Identify {
                client_id: get_u64(b, 0),
                volume_size_bytes: get_u64(b, 8),
                origin_uuid,
                node_id: get_u32(b, 32),
                chunk_size_bytes: get_u32(b, 36),
                volume,
                flags: get_u16(b, 42),
            }
        }
        Kind::IdentifyOk => {
            exact(b, IDENTIFY_OK_BYTES)?;
            reserved(b, 20, 4)?;
            Msg::IdentifyOk {
                origin_size_bytes: get_u64(b, 0),
                volume_size_bytes: get_u64(b, 8),
                chunk_size_bytes: get_u32(b, 16),
            }
        }
        Kind::Error => {
            if b.len() < ERROR_FIXED_BYTES {
                return Err("body length does not match the kind");
            }
            let code = ErrorCode::from_u32(get_u32(b, 0)).ok_or("unknown error code")?;
            let text_len = usize::from(get_u16(b, 6));
            if text_len > ERROR_TEXT_MAX_BYTES {
                return Err("error text over ERROR_TEXT_MAX_BYTES");
            }
            exact(b, ERROR_FIXED_BYTES + text_len)?;
            let text = core::str::from_utf8(&b[ERROR_FIXED_BYTES..])
                .map_err(|_| "error text is not UTF-8")?;
            Msg::Error {
                code,
                culprit: get_u16(b, 4),
                text,
            }
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Session),
    })
}

/// Reads the body of a [`Family::Locks`] kind.
fn read_locks(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::QueryOriginWrite => Msg::QueryOriginWrite(list(Ranges::parse(b))?),
        Kind::OriginWriteOk => Msg::OriginWriteOk(list(Ranges::parse(b))?),
        Kind::QuerySnapshotRead => Msg::QuerySnapshotRead(list(Ranges::parse(b))?),
        Kind::SnapshotReadReply => Msg::SnapshotReadReply(list(Targets::parse(b))?),
        Kind::FinishSnapshotRead => Msg::FinishSnapshotRead(list(Ranges::parse(b))?),
        Kind::QuerySnapshotWrite => Msg::QuerySnapshotWrite(list(Ranges::parse(b))?),
        Kind::SnapshotWriteOk => Msg::SnapshotWriteOk(list(Targets::parse(b))?),
        Kind::UploadLocks => Msg::UploadLocks(list(Ranges::parse(b))?),
        Kind::FinishUpload => {
            exact(b, 0)?;
            Msg::FinishUpload
        }
        Kind::UploadOk => {
            exact(b, 0)?;
            Msg::UploadOk
        }
        Kind::RevokeDone => {
            exact(b, 0)?;
            Msg::RevokeDone
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Locks),
    })
}

/// Reads the body of a [`Family::Snapshots`] kind.
fn read_snapshots(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::SnapshotList => Msg::SnapshotList(list(SnapList::parse(b))?),
        Kind::CreateSnapshot => {
            exact(b, TAG_BYTES)?;
            Msg::CreateSnapshot { tag: get_u32(b, 0) }
        }
        Kind::DeleteSnapshot => {
            exact(b, TAG_BYTES)?;
            Msg::DeleteSnapshot { tag: get_u32(b, 0) }
        }
        Kind::SetPriority => {
            exact(b, SET_PRIORITY_BYTES)?;
            reserved(b, 5, 3)?;
            Msg::SetPriority {
                tag: get_u32(b, 0),
                priority: get_i8(b, 4),
            }
        }
        Kind::ListSnapshots => {
            exact(b, TAG_BYTES)?;
            Msg::ListSnapshots {
                from: get_u32(b, 0),
            }
        }
        Kind::Ok => {
            exact(b, 0)?;
            Msg::Ok
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Snapshots),
    })
}

/// Reads the body of a [`Family::Status`] kind.
fn read_status(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::QueryDelta => {
            exact(b, QUERY_DELTA_BYTES)?;
            reserved(b, 18, 2)?;
            let volume = get_volume(get_u16(b, 16), get_u32(b, 20))?;
            Msg::QueryDelta {
                volume,
                base: get_u32(b, 12),
                chunk: get_u64(b, 0),
                chunks: get_u32(b, 8),
            }
        }
        Kind::DeltaMap => {
            at_least(b, DELTA_MAP_FIXED_BYTES)?;
            reserved(b, 12, 4)?;
            Msg::DeltaMap {
                chunk: get_u64(b, 0),
                chunks: get_u32(b, 8),
                bits: &b[DELTA_MAP_FIXED_BYTES..],
            }
        }
        Kind::StatusReply => {
            exact(b, STATUS_REPLY_BYTES)?;
            reserved(b, 81, 7)?;
            Msg::StatusReply {
                incarnation: get_u64(b, 0),
                origin_chunks: get_u64(b, 8),
                data_chunks: get_u64(b, 16),
                data_free: get_u64(b, 24),
                meta_blocks: get_u64(b, 32),
                meta_free: get_u64(b, 40),
                commits: get_u64(b, 48),
                chunk_size_bytes: get_u32(b, 56),
                snapshots: get_u32(b, 60),
                deleting: get_u32(b, 64),
                clients: get_u32(b, 68),
                read_locks: get_u32(b, 72),
                waiting_writes: get_u32(b, 76),
                state: ServerState::from_u8(b[80]).ok_or("unknown server state")?,
                copyouts: get_u64(b, 88),
            }
        }
        Kind::Status => {
            exact(b, 0)?;
            Msg::Status
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Status),
    })
}

/// Reads the body of a [`Family::Notice`] kind.
fn read_notice(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::Revoke => {
            at_least(b, REVOKE_FIXED_BYTES)?;
            reserved(b, 2, 2)?;
            let what = RevokeWhat::from_u16(get_u16(b, 0)).ok_or("unknown revoke kind")?;
            Msg::Revoke {
                what,
                ranges: list(Ranges::parse(&b[REVOKE_FIXED_BYTES..]))?,
            }
        }
        Kind::ReleaseLocks => Msg::ReleaseLocks(list(Ranges::parse(b))?),
        other => unreachable!("{other} is not a {:?} kind", Family::Notice),
    })
}

/// Reads the body of a [`Family::Locate`] kind.
fn read_locate(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::NeedServer => {
            exact(b, NEED_SERVER_BYTES)?;
            reserved(b, 22, 2)?;
            reserved(b, 28, 4)?;
            let tag = get_u32(b, 24);
            let volume = match get_u16(b, 20) {
                VOLUME_NONE if tag == 0 => None,
                VOLUME_NONE => return Err("snapshot tag given without a volume"),
                code => Some(get_volume(code, tag)?),
            };
            Msg::NeedServer {
                client_id: get_u64(b, 0),
                failed_incarnation: get_u64(b, 8),
                node_id: get_u32(b, 16),
                volume,
            }
        }
        Kind::ServerAddress => {
            at_least(b, SERVER_ADDRESS_FIXED_BYTES)?;
            reserved(b, 12, 2)?;
            Msg::ServerAddress {
                incarnation: get_u64(b, 0),
                node_id: get_u32(b, 8),
                addr: get_last_addr(b, 14, SERVER_ADDRESS_FIXED_BYTES)?,
            }
        }
        Kind::ServerReady => {
            at_least(b, SERVER_READY_FIXED_BYTES)?;
            reserved(b, 8, 2)?;
            Msg::ServerReady {
                pid: get_u32(b, 0),
                node_id: get_u32(b, 4),
                addr: get_last_addr(b, 10, SERVER_READY_FIXED_BYTES)?,
            }
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Locate),
    })
}

/// Reads the body of a [`Family::Hosting`] kind.
fn read_hosting(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::StartServer => {
            if b.len() < START_SERVER_FIXED_BYTES {
                return Err("body length does not match the kind");
            }
            let claim = start_flags(b[0])?;
            reserved(b, 1, START_SERVER_FIXED_BYTES - 1)?;
            let (members, rest) = list(NodeList::parse_prefix(&b[START_SERVER_FIXED_BYTES..]))?;
            Msg::StartServer {
                claim,
                members,
                expected: list(ClientList::parse(rest))?,
            }
        }
        Kind::Serving => {
            exact(b, SERVING_BYTES)?;
            Msg::Serving {
                incarnation: get_u64(b, 0),
                start_micros: get_u64(b, 8),
                replayed_commits: get_u64(b, 16),
            }
        }
        Kind::NodeJoined => {
            exact(b, NODE_BYTES)?;
            Msg::NodeJoined {
                node_id: get_u32(b, 0),
            }
        }
        Kind::NodeLeft => {
            exact(b, NODE_BYTES)?;
            Msg::NodeLeft {
                node_id: get_u32(b, 0),
            }
        }
        Kind::ClientsOf => {
            at_least(b, CLIENTS_OF_FIXED_BYTES)?;
            reserved(b, 4, 4)?;
            Msg::ClientsOf {
                node_id: get_u32(b, 0),
                clients: list(ClientList::parse(&b[CLIENTS_OF_FIXED_BYTES..]))?,
            }
        }
        Kind::ClientGone => {
            exact(b, CLIENT_GONE_BYTES)?;
            reserved(b, 12, 4)?;
            Msg::ClientGone {
                client_id: get_u64(b, 0),
                node_id: get_u32(b, 8),
            }
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Hosting),
    })
}

/// Reads the body of a [`Family::Membership`] kind.
fn read_membership(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::Join => {
            at_least(b, JOIN_FIXED_BYTES)?;
            reserved(b, 4, 2)?;
            Msg::Join {
                node_id: get_u32(b, 0),
                addr: get_last_addr(b, 6, JOIN_FIXED_BYTES)?,
            }
        }
        Kind::Members => {
            at_least(b, MEMBERS_FIXED_BYTES)?;
            Msg::Members {
                epoch: get_u64(b, 0),
                members: list(NodeList::parse(&b[MEMBERS_FIXED_BYTES..]))?,
            }
        }
        Kind::AgentState => {
            exact(b, AGENT_STATE_BYTES)?;
            reserved(b, 5, 1)?;
            let standby_ready = match b[4] {
                0 => false,
                1 => true,
                _ => return Err("standby flag is neither 0 nor 1"),
            };
            Msg::AgentState {
                node_id: get_u32(b, 0),
                standby_ready,
                recent_deaths: get_u16(b, 6),
                serving_incarnation: get_u64(b, 8),
                died_incarnation: get_u64(b, 16),
            }
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Membership),
    })
}

/// Reads the body of a [`Family::Placement`] kind.
fn read_placement(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::WantServer => {
            exact(b, WANT_SERVER_BYTES)?;
            Msg::WantServer {
                failed_incarnation: get_u64(b, 0),
            }
        }
        Kind::StartHere => {
            exact(b, START_HERE_BYTES)?;
            reserved(b, 17, 7)?;
            Msg::StartHere {
                attempt: get_u64(b, 0),
                former_incarnation: get_u64(b, 8),
                claim: start_flags(b[16])?,
            }
        }
        Kind::NeedClients => {
            exact(b, NEED_CLIENTS_BYTES)?;
            reserved(b, 12, 4)?;
            Msg::NeedClients {
                gather_id: get_u64(b, 0),
                starter: get_u32(b, 8),
            }
        }
        Kind::Clients => {
            at_least(b, CLIENTS_FIXED_BYTES)?;
            Msg::Clients {
                gather_id: get_u64(b, 0),
                from: get_u32(b, 8),
                to: get_u32(b, 12),
                clients: list(ClientList::parse(&b[CLIENTS_FIXED_BYTES..]))?,
            }
        }
        Kind::ServerUp => {
            at_least(b, SERVER_UP_FIXED_BYTES)?;
            reserved(b, 12, 2)?;
            Msg::ServerUp {
                incarnation: get_u64(b, 0),
                node_id: get_u32(b, 8),
                addr: get_last_addr(b, 14, SERVER_UP_FIXED_BYTES)?,
            }
        }
        Kind::ServerDown => {
            exact(b, SERVER_DOWN_BYTES)?;
            reserved(b, 12, 4)?;
            Msg::ServerDown {
                incarnation: get_u64(b, 0),
                node_id: get_u32(b, 8),
            }
        }
        Kind::Fence => {
            exact(b, FENCE_BYTES)?;
            reserved(b, 4, 4)?;
            Msg::Fence {
                reason: FenceReason::from_u32(get_u32(b, 0)).ok_or("unknown fence reason")?,
            }
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Placement),
    })
}

/// Reads the body of a [`Family::Control`] kind.
fn read_control(kind: Kind, b: &[u8]) -> Result<Msg<'_>, &'static str> {
    Ok(match kind {
        Kind::ClusterCommand => {
            exact(b, CLUSTER_COMMAND_BYTES)?;
            Msg::ClusterCommand {
                op: ClusterOp::from_u32(get_u32(b, 0)).ok_or("unknown cluster op")?,
                node_id: get_u32(b, 4),
            }
        }
        Kind::ClusterStatus => {
            exact(b, 0)?;
            Msg::ClusterStatus
        }
        Kind::ClusterStatusReply => {
            at_least(b, CLUSTER_STATUS_REPLY_FIXED_BYTES)?;
            let (server_addr, rest) = get_addr(b, 14, CLUSTER_STATUS_REPLY_FIXED_BYTES)?;
            Msg::ClusterStatusReply {
                server_incarnation: get_u64(b, 0),
                server_node: get_u32(b, 8),
                failed_deaths: u16::from_le_bytes([b[12], b[13]]),
                server_addr,
                nodes: list(NodeStatusList::parse(rest))?,
            }
        }
        other => unreachable!("{other} is not a {:?} kind", Family::Control),
    })
}

/// The flags byte of `StartServer` and `StartHere`.
fn start_flags(f: u8) -> Result<bool, &'static str> {
    match f {
        0 => Ok(false),
        START_FLAG_CLAIM => Ok(true),
        _ => Err("unknown start flags"),
    }
}

fn exact(body: &[u8], n: usize) -> Result<(), &'static str> {
    if body.len() == n {
        Ok(())
    } else {
        Err("body length does not match the kind")
    }
}

fn reserved(body: &[u8], off: usize, n: usize) -> Result<(), &'static str> {
    if zero(body, off, n) {
        Ok(())
    } else {
        Err("nonzero reserved bytes")
    }
}

fn list<T>(r: Result<T, crate::Malformed>) -> Result<T, &'static str> {
    r.map_err(|m| m.what)
}

/// At least the fixed part of a variable-size body.
fn at_least(body: &[u8], n: usize) -> Result<(), &'static str> {
    if body.len() >= n {
        Ok(())
    } else {
        Err("body length does not match the kind")
    }
}

/// The address of a body whose fixed part, at least `fixed` bytes long (the
/// caller checked), holds the address length (u16) at `len_off`; the address
/// follows the fixed part. Returns it and the bytes after it.
fn get_addr(b: &[u8], len_off: usize, fixed: usize) -> Result<(&str, &[u8]), &'static str> {
    let n = usize::from(get_u16(b, len_off));
    if n > ADDR_MAX_BYTES {
        return Err("address over ADDR_MAX_BYTES");
    }
    let rest = &b[fixed..];
    if rest.len() < n {
        return Err("address length runs past the body");
    }
    let (a, rest) = rest.split_at(n);
    let addr = core::str::from_utf8(a).map_err(|_| "address is not UTF-8")?;
    Ok((addr, rest))
}

/// The address of a body that ends with it (see [`get_addr`]).
fn get_last_addr(b: &[u8], len_off: usize, fixed: usize) -> Result<&str, &'static str> {
    at_least(b, fixed)?;
    let (addr, rest) = get_addr(b, len_off, fixed)?;
    exact(rest, 0)?;
    Ok(addr)
}

/// A volume field: its code and the snapshot tag (0 for the origin).
fn get_volume(code: u16, tag: u32) -> Result<Volume, &'static str> {
    match code {
        VOLUME_ORIGIN if tag == 0 => Ok(Volume::Origin),
        VOLUME_ORIGIN => Err("snapshot tag given for the origin"),
        VOLUME_SNAPSHOT => Ok(Volume::Snapshot(tag)),
        _ => Err("unknown volume kind"),
    }
}
