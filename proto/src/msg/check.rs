//! The rules beyond the layout, shared by encode and decode so that
//! whatever encodes also decodes.

use super::layout::IDENTIFY_FLAGS_ALL;
use super::{Msg, RevokeWhat};
use crate::list::TargetKind;
use crate::{ADDR_MAX_BYTES, ERROR_TEXT_MAX_BYTES, QUERY_CHUNKS_MAX};

/// Rules beyond the layout, shared by encode and decode so that whatever
/// encodes also decodes.
pub(super) fn check(msg: &Msg<'_>) -> Result<(), &'static str> {
    if msg.kind().is_agent() {
        check_agent(msg)
    } else {
        check_server(msg)
    }
}

/// The rules of the server protocol's messages.
fn check_server(msg: &Msg<'_>) -> Result<(), &'static str> {
    match msg {
        Msg::Hello {
            version_min,
            version_max,
            ..
        } if *version_min == 0 || version_min > version_max => {
            Err("version range must satisfy 1 <= version_min <= version_max")
        }
        Msg::HelloOk { version: 0, .. } => Err("version 0"),
        Msg::QueryDelta { chunk, chunks, .. } => check_delta_range(*chunk, *chunks),
        Msg::DeltaMap {
            chunk,
            chunks,
            bits,
        } => {
            check_delta_range(*chunk, *chunks)?;
            let n = *chunks as usize;
            if bits.len() != n.div_ceil(8) {
                return Err("delta bitmap length does not match its chunk count");
            }
            let tail = n % 8;
            if tail != 0 && bits.last().is_some_and(|b| b >> tail != 0) {
                return Err("delta bitmap bits past its chunk count");
            }
            Ok(())
        }
        Msg::QuerySnapshotRead(r) | Msg::QuerySnapshotWrite(r)
            if r.total_chunks() > QUERY_CHUNKS_MAX as u64 =>
        {
            Err("query covers more than QUERY_CHUNKS_MAX chunks")
        }
        Msg::SnapshotWriteOk(t) if t.iter().any(|t| t.kind != TargetKind::Store) => {
            Err("origin target in a snapshot write reply")
        }
        Msg::Error { text, .. } if text.len() > ERROR_TEXT_MAX_BYTES => {
            Err("error text over ERROR_TEXT_MAX_BYTES")
        }
        Msg::Identify { flags, .. } if flags & !IDENTIFY_FLAGS_ALL != 0 => {
            Err("undefined identify flag bits")
        }
        Msg::Revoke { what, ranges } => match what {
            RevokeWhat::OriginGrants if !ranges.is_empty() => {
                Err("origin-grants revoke carries ranges")
            }
            RevokeWhat::SnapshotMappings if ranges.is_empty() => {
                Err("snapshot-mappings revoke without ranges")
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// The rules of the agent protocol's messages.
fn check_agent(msg: &Msg<'_>) -> Result<(), &'static str> {
    match msg {
        Msg::NeedServer {
            client_id: 0,
            volume: Some(_),
            ..
        } => Err("client id 0 with a volume"),
        Msg::ServerAddress {
            incarnation, addr, ..
        }
        | Msg::ServerUp {
            incarnation, addr, ..
        } => {
            if *incarnation == 0 {
                return Err("server incarnation 0");
            }
            check_addr(addr)
        }
        Msg::ServerReady { addr, .. } => check_addr(addr),
        Msg::Join { node_id, addr } => {
            check_node(*node_id)?;
            check_addr(addr)
        }
        Msg::NodeJoined { node_id }
        | Msg::NodeLeft { node_id }
        | Msg::ClusterCommand { node_id, .. } => check_node(*node_id),
        Msg::ClientGone { client_id, node_id } => {
            if *client_id == 0 {
                return Err("client id 0");
            }
            check_node(*node_id)
        }
        // (Entries of other nodes are ignored by the receiver.)
        Msg::ClientsOf { node_id, .. } => check_node(*node_id),
        Msg::StartHere { attempt: 0, .. } => Err("start attempt 0"),
        Msg::NeedClients { gather_id, starter } => {
            if *gather_id == 0 {
                return Err("gather id 0");
            }
            if *starter == 0 {
                return Err("starter node id 0");
            }
            Ok(())
        }
        Msg::ClusterStatusReply {
            server_incarnation,
            server_addr,
            ..
        } => {
            if server_addr.len() > ADDR_MAX_BYTES {
                return Err("address over ADDR_MAX_BYTES");
            }
            if server_addr.is_empty() && *server_incarnation != 0 {
                return Err("empty address for a server incarnation");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A delta range: `1..=DELTA_CHUNKS_MAX` chunks whose end does not
/// overflow.
fn check_delta_range(chunk: u64, chunks: u32) -> Result<(), &'static str> {
    if chunks == 0 || chunks as usize > crate::DELTA_CHUNKS_MAX {
        return Err("delta chunk count outside 1..=DELTA_CHUNKS_MAX");
    }
    if chunk.checked_add(u64::from(chunks)).is_none() {
        return Err("delta range end overflows");
    }
    Ok(())
}

/// An address that must not be empty.
fn check_addr(addr: &str) -> Result<(), &'static str> {
    if addr.len() > ADDR_MAX_BYTES {
        return Err("address over ADDR_MAX_BYTES");
    }
    if addr.is_empty() {
        return Err("empty address");
    }
    Ok(())
}

/// A node id that must name a node.
fn check_node(node_id: u32) -> Result<(), &'static str> {
    if node_id == 0 {
        return Err("node id 0");
    }
    Ok(())
}
