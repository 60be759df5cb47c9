//! `--json` output of `csnap status`, `csnap snapshot list` and `csnap
//! cluster status` (#13). Field names are stable and documented in the
//! README; each document is one line of JSON. Written by hand (a few flat
//! objects of numbers, booleans and strings), on the CLI side only.

use std::fmt::Write as _;

use csnap_proto::{Msg, NodeStatus, ServerState, SnapInfo};

/// A JSON string literal.
fn string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", u32::from(c));
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `csnap status --json`: one object.
pub fn status(m: &Msg<'_>) -> Option<String> {
    let Msg::StatusReply {
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
    } = *m
    else {
        return None;
    };
    let state = match state {
        ServerState::Serving => "serving",
        ServerState::Recovering => "recovering",
    };
    let chunk = u64::from(chunk_size_bytes);
    Some(format!(
        "{{\"state\":\"{state}\",\"incarnation\":{incarnation},\"chunk_size_bytes\":{chunk_size_bytes},\
         \"origin_chunks\":{origin_chunks},\"origin_size_bytes\":{},\
         \"store_data_chunks\":{data_chunks},\"store_data_free_chunks\":{data_free},\
         \"store_size_bytes\":{},\"store_used_bytes\":{},\
         \"meta_blocks\":{meta_blocks},\"meta_free_blocks\":{meta_free},\
         \"snapshots\":{snapshots},\"snapshots_deleting\":{deleting},\"clients\":{clients},\
         \"read_locks\":{read_locks},\"waiting_writes\":{waiting_writes},\"commits\":{commits},\
         \"copyouts\":{copyouts}}}\n",
        origin_chunks.saturating_mul(chunk),
        data_chunks.saturating_mul(chunk),
        data_chunks.saturating_sub(data_free).saturating_mul(chunk),
    ))
}

/// `csnap snapshot list --json`: an array of objects.
pub fn snapshot_list(l: &[SnapInfo]) -> String {
    let mut o = String::from("[");
    for (i, e) in l.iter().enumerate() {
        let state = if e.deleting() {
            "deleting"
        } else if e.in_use() {
            "in_use"
        } else {
            "idle"
        };
        let _ = write!(
            o,
            "{}{{\"tag\":{},\"priority\":{},\"chunks\":{},\"unique_chunks\":{},\"ctime_secs\":{},\"state\":\"{state}\",\"in_use\":{},\"deleting\":{}}}",
            if i == 0 { "" } else { "," },
            e.tag,
            e.priority,
            e.chunks,
            e.unique_chunks,
            e.ctime_secs,
            e.in_use(),
            e.deleting(),
        );
    }
    o.push_str("]\n");
    o
}

/// `csnap cluster status --json`: one object.
pub fn cluster_status(m: &Msg<'_>) -> Option<String> {
    let Msg::ClusterStatusReply {
        server_incarnation,
        server_node,
        failed_deaths,
        server_addr,
        nodes,
    } = m
    else {
        return None;
    };
    let server = if *server_incarnation == 0 {
        "null".to_string()
    } else {
        format!(
            "{{\"incarnation\":{server_incarnation},\"node\":{server_node},\"addr\":{}}}",
            string(server_addr)
        )
    };
    let mut o = format!(
        "{{\"store_failed\":{},\"failed_deaths\":{failed_deaths},\"server\":{server},\"nodes\":[",
        *failed_deaths != 0
    );
    for (i, n) in nodes.iter().enumerate() {
        let f = |bit: u8| n.flags & bit != 0;
        let _ = write!(
            o,
            "{}{{\"node\":{},\"member\":{},\"connected\":{},\"standby_ready\":{},\"serving\":{},\"serving_incarnation\":{}}}",
            if i == 0 { "" } else { "," },
            n.node,
            f(NodeStatus::MEMBER),
            f(NodeStatus::CONNECTED),
            f(NodeStatus::STANDBY_READY),
            f(NodeStatus::SERVING),
            if f(NodeStatus::SERVING) { n.serving_incarnation } else { 0 },
        );
    }
    o.push_str("]}\n");
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::string;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
