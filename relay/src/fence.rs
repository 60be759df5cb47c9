//! Fencing a node that left, as the relay asks for it (#12): the fencer's
//! own answer, for this very leave, rather than its history.

use std::process::Command;
use std::time::{Duration, Instant};

/// How long a failed fence request waits before it is made again.
pub(crate) const FENCE_RETRY_MS: u64 = 1000;
/// How long after a node left the relay asks the fencer: at once. (Waiting
/// for Pacemaker's own request gains nothing: its controller sleeps a
/// second in the scheduler call while its node-state updates of the loss
/// are pending, before it asks; and the relay's request, even merged with
/// Pacemaker's, is an "external" fencing to the controller either way.)
/// Fencing at once releases the dead node's clients' locks about 50 ms
/// after the membership change, which is all a loss of a node that did
/// not serve costs.
pub(crate) const FENCE_ASK_DELAY_MS: u64 = 0;
/// How long the fencer may take for one request, in seconds.
pub(crate) const FENCE_TIMEOUT_S: u64 = 30;
/// The most a fence request accepts as already done, in seconds (and one
/// less than the time since the node last joined, so that a fencing from
/// before that join never counts).
pub(crate) const FENCE_TOLERANCE_MAX_S: u64 = 60;

/// A node that left the CPG group and is not known fenced yet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unfenced {
    /// Which leave this is (a request answered for an older one is stale).
    pub(crate) gen: u64,
    /// A request is with the fencer.
    pub(crate) asked: bool,
    /// Not asked again before this (after a failed request).
    pub(crate) retry_at: Instant,
}

/// How old a successful fencing of a node may be, in whole seconds, for a
/// fence request to count it: a second less than the time since the node
/// last joined (so a fencing from before that join, of the node's former
/// life, never counts, even with the fencer's clock a little apart), at
/// most `FENCE_TOLERANCE_MAX_S`.
pub(crate) fn fence_tolerance_s(since_join: Duration) -> u64 {
    since_join
        .as_secs()
        .saturating_sub(1)
        .min(FENCE_TOLERANCE_MAX_S)
}

/// Asks the fencer to fence `name` (`off`), counting a fencing of it that
/// succeeded less than `tolerance_s` seconds ago; whether it is fenced,
/// and why not.
pub(crate) fn fence(name: &str, tolerance_s: u64) -> (bool, String) {
    let out = Command::new("stonith_admin")
        .args(["--fence", name, "--timeout"])
        .arg(FENCE_TIMEOUT_S.to_string())
        .arg("--tolerance")
        .arg(tolerance_s.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => (true, String::new()),
        Ok(o) => (
            false,
            format!(
                "stonith_admin: {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ),
        Err(e) => (false, format!("stonith_admin: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fencing older than the node's latest join never counts: the
    /// tolerance stays a second below the time since the join, and is
    /// zero (fence again) for a node that joined less than 2 s ago.
    #[test]
    fn the_fence_tolerance_never_reaches_back_past_the_latest_join() {
        let s = Duration::from_secs;
        assert_eq!(fence_tolerance_s(Duration::ZERO), 0);
        assert_eq!(fence_tolerance_s(Duration::from_millis(1999)), 0);
        assert_eq!(fence_tolerance_s(s(2)), 1);
        assert_eq!(fence_tolerance_s(Duration::from_millis(7900)), 6);
        for ms in (0..200_000).step_by(137) {
            let d = Duration::from_millis(ms);
            assert!(fence_tolerance_s(d) < d.as_secs().max(1), "{d:?}");
        }
        assert_eq!(fence_tolerance_s(s(3600)), FENCE_TOLERANCE_MAX_S);
    }
}
