//! The standby's start line: `start [member=NODE ...] [expect=CLIENT:NODE ...]`.
//!
//! A standby started without an agent (`csnap server --standby` with no
//! `--agent`) reads this one line on its standard input. It is parsed after
//! the heap is sealed, so the parser writes into caller arrays and never
//! allocates. Only the first line counts (anything after the first newline
//! is ignored, as the standby reads no further). Every malformed line is a
//! clear error: an unknown word, a number that does not parse, and more
//! members or expected clients than the arrays hold (never silently dropped:
//! a member left out would be a member the recovery barrier never waits
//! for). Fuzzed by `fuzz/` (target `start_line`).

/// What a valid start line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartLine {
    /// Members written to the front of the members array.
    pub members: usize,
    /// Expected clients (client id, node) written to the front of the
    /// expected array.
    pub expected: usize,
}

/// Parses the first line of `input` into `members` and `expected`.
///
/// # Errors
///
/// A static reason for the first problem found.
pub fn parse_start_line(
    input: &[u8],
    members: &mut [u32],
    expected: &mut [(u64, u32)],
) -> Result<StartLine, &'static str> {
    let line = match input.iter().position(|&c| c == b'\n') {
        Some(n) => &input[..n],
        None => input,
    };
    let line = core::str::from_utf8(line).map_err(|_| "start command is not UTF-8")?;
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some("start") {
        return Err("expected `start [member=NODE ...] [expect=CLIENT:NODE ...]`");
    }
    let mut out = StartLine {
        members: 0,
        expected: 0,
    };
    for w in words {
        if let Some(v) = w.strip_prefix("member=") {
            let slot = members
                .get_mut(out.members)
                .ok_or("start refused: more members than START_LIST_MAX")?;
            *slot = v.parse().map_err(|_| "bad member")?;
            out.members += 1;
        } else if let Some(v) = w.strip_prefix("expect=") {
            let (c, n) = v.split_once(':').ok_or("bad expect (CLIENT:NODE)")?;
            let slot = expected
                .get_mut(out.expected)
                .ok_or("start refused: more expected clients than START_LIST_MAX")?;
            *slot = (
                c.parse().map_err(|_| "bad expect client")?,
                n.parse().map_err(|_| "bad expect node")?,
            );
            out.expected += 1;
        } else {
            return Err("unknown word in the start command");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_members_and_expected_clients() {
        let mut m = [0u32; 4];
        let mut e = [(0u64, 0u32); 4];
        let r = parse_start_line(
            b"start member=1 member=2 expect=9:1\ntrailing",
            &mut m,
            &mut e,
        );
        assert_eq!(
            r,
            Ok(StartLine {
                members: 2,
                expected: 1
            })
        );
        assert_eq!(&m[..2], &[1, 2]);
        assert_eq!(e[0], (9, 1));
        assert_eq!(
            parse_start_line(b"start", &mut m, &mut e),
            Ok(StartLine {
                members: 0,
                expected: 0
            })
        );
    }

    /// Regression (fuzz target `start_line`): members past the array were
    /// silently dropped, so the recovery barrier would not wait for them.
    #[test]
    fn too_many_members_is_an_error_not_a_silent_drop() {
        let mut m = [0u32; 2];
        let mut e = [(0u64, 0u32); 1];
        assert!(
            parse_start_line(b"start member=1 member=2 member=3", &mut m, &mut e)
                .unwrap_err()
                .contains("more members")
        );
        assert!(
            parse_start_line(b"start expect=1:1 expect=2:1", &mut m, &mut e)
                .unwrap_err()
                .contains("more expected")
        );
    }

    #[test]
    fn malformed_lines_are_errors() {
        let mut m = [0u32; 2];
        let mut e = [(0u64, 0u32); 2];
        for bad in [
            &b""[..],
            b"stop",
            b"start member=x",
            b"start member=-1",
            b"start expect=1",
            b"start expect=a:1",
            b"start expect=1:b",
            b"start what",
            b"start \xff",
        ] {
            assert!(parse_start_line(bad, &mut m, &mut e).is_err(), "{bad:?}");
        }
    }
}
