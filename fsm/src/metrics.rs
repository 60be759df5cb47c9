//! Metrics endpoint, sans-IO (#13): the HTTP request a scraper sends, the
//! response head, and the Prometheus text format 0.0.4 written into a fixed
//! buffer.
//!
//! Nothing here allocates: a response is rendered into a buffer the caller
//! reserved at init ([`csnap_pools::METRICS_RESPONSE_MAX_BYTES`]); a body
//! that does not fit is a 500 answer, never a growth. Values are integers
//! (counters, gauges, histogram buckets) or microseconds printed as seconds
//! with six decimals, so no float is formatted (`inf` and `NaN` cannot
//! appear).

use csnap_pools::{METRICS_HEAD_MAX_BYTES, METRICS_HISTOGRAM_BUCKETS, METRICS_REQUEST_MAX_BYTES};

/// The only content type answered (Prometheus 3 refuses a scrape without a
/// well-formed one).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics path.
pub const PATH: &[u8] = b"/metrics";

/// Upper bounds of the duration histogram buckets, in microseconds.
pub const BUCKET_BOUNDS_US: [u64; METRICS_HISTOGRAM_BUCKETS] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// The same bounds as the `le` label values (seconds).
pub const BUCKET_LE: [&str; METRICS_HISTOGRAM_BUCKETS] = [
    "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
    "0.1", "0.25", "0.5", "1", "2.5", "10",
];

/// What an HTTP request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The head has not ended yet, and there is room for more.
    Incomplete,
    /// A complete request (or one that cannot become valid).
    Done {
        /// The answer.
        status: Status,
        /// `HEAD`: the head only.
        head_only: bool,
    },
}

/// Response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `GET /metrics`.
    Ok,
    /// Malformed, or a head over [`METRICS_REQUEST_MAX_BYTES`].
    BadRequest,
    /// Another path.
    NotFound,
    /// Another method.
    MethodNotAllowed,
    /// The body did not fit the response buffer.
    InternalError,
}

impl Status {
    /// Status line text after `HTTP/1.1 `.
    #[must_use]
    pub fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::InternalError => "500 Internal Server Error",
        }
    }

    /// The body of an error answer.
    #[must_use]
    pub fn text(self) -> &'static str {
        match self {
            Status::Ok => "",
            Status::BadRequest => "bad request\n",
            Status::NotFound => "not found: the metrics are at /metrics\n",
            Status::MethodNotAllowed => "method not allowed: GET /metrics\n",
            Status::InternalError => "the metrics do not fit the response buffer\n",
        }
    }
}

/// Parses what a connection sent so far. Only the request line matters;
/// headers are skipped; a body is not expected (a `GET` has none).
#[must_use]
pub fn parse_request(buf: &[u8]) -> Parsed {
    let bad = Parsed::Done {
        status: Status::BadRequest,
        head_only: false,
    };
    let end = find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n"));
    if end.is_none() {
        if buf.len() >= METRICS_REQUEST_MAX_BYTES {
            return bad;
        }
        // A request line that is already wrong need not wait for the rest.
        if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            if request_line(&buf[..nl]).is_none() {
                return bad;
            }
        }
        return Parsed::Incomplete;
    }
    let nl = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let Some((method, target)) = request_line(&buf[..nl]) else {
        return bad;
    };
    let path = target
        .iter()
        .position(|&b| b == b'?')
        .map_or(target, |q| &target[..q]);
    let head_only = method == b"HEAD";
    let status = if method != b"GET" && !head_only {
        Status::MethodNotAllowed
    } else if path != PATH {
        Status::NotFound
    } else {
        Status::Ok
    };
    Parsed::Done { status, head_only }
}

/// `METHOD SP TARGET SP HTTP/1.x`, the line without its end.
fn request_line(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if parts.next().is_some()
        || method.is_empty()
        || !method.iter().all(u8::is_ascii_uppercase)
        || !target.starts_with(b"/")
        || !(version == b"HTTP/1.1" || version == b"HTTP/1.0")
    {
        return None;
    }
    Some((method, target))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A duration histogram with the fixed buckets of [`BUCKET_BOUNDS_US`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf` only.
    pub counts: [u64; METRICS_HISTOGRAM_BUCKETS + 1],
    /// Sum of the observations, microseconds.
    pub sum_us: u64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&mut self, us: u64) {
        let i = BUCKET_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(METRICS_HISTOGRAM_BUCKETS);
        self.counts[i] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Observations in all.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Metric family type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

/// A label value.
#[derive(Debug, Clone, Copy)]
pub enum Label<'a> {
    /// Text (escaped as the format says).
    Str(&'a str),
    /// A decimal number.
    Num(u64),
}

/// Prometheus text written into a fixed buffer. Once something does not fit,
/// every later write is dropped and [`Text::overflowed`] says so.
#[derive(Debug)]
pub struct Text<'a> {
    buf: &'a mut [u8],
    pos: usize,
    overflow: bool,
}

impl<'a> Text<'a> {
    /// Writes into `buf`.
    pub fn new(buf: &'a mut [u8]) -> Text<'a> {
        Text {
            buf,
            pos: 0,
            overflow: false,
        }
    }

    /// Bytes written.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Nothing written.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Something did not fit.
    #[must_use]
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    fn put(&mut self, b: &[u8]) {
        if self.overflow || self.buf.len() - self.pos < b.len() {
            self.overflow = true;
            return;
        }
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }

    fn num(&mut self, v: u64) {
        let mut d = [0u8; 20];
        let s = decimal(v, &mut d);
        self.put(s);
    }

    /// Microseconds as seconds with six decimals.
    fn seconds(&mut self, us: u64) {
        self.num(us / 1_000_000);
        let mut frac = *b".000000";
        let mut f = us % 1_000_000;
        for i in (1..7).rev() {
            frac[i] = b'0' + u8::try_from(f % 10).unwrap_or(0);
            f /= 10;
        }
        self.put(&frac);
    }

    fn escaped(&mut self, s: &str, quote: bool) {
        for &b in s.as_bytes() {
            match b {
                b'\\' => self.put(b"\\\\"),
                b'\n' => self.put(b"\\n"),
                b'"' if quote => self.put(b"\\\""),
                _ => self.put(&[b]),
            }
        }
    }

    /// `# HELP` and `# TYPE` of a family; once per family, before its
    /// samples.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        self.put(b"# HELP ");
        self.put(name.as_bytes());
        self.put(b" ");
        self.escaped(help, false);
        self.put(b"\n# TYPE ");
        self.put(name.as_bytes());
        self.put(match kind {
            Kind::Counter => b" counter\n",
            Kind::Gauge => b" gauge\n",
            Kind::Histogram => b" histogram\n",
        });
    }

    fn labels(&mut self, labels: &[(&str, Label<'_>)], extra: Option<(&str, &str)>) {
        if labels.is_empty() && extra.is_none() {
            return;
        }
        self.put(b"{");
        let mut first = true;
        for (k, v) in labels {
            if !first {
                self.put(b",");
            }
            first = false;
            self.put(k.as_bytes());
            self.put(b"=\"");
            match *v {
                Label::Str(s) => self.escaped(s, true),
                Label::Num(n) => self.num(n),
            }
            self.put(b"\"");
        }
        if let Some((k, v)) = extra {
            if !first {
                self.put(b",");
            }
            self.put(k.as_bytes());
            self.put(b"=\"");
            self.escaped(v, true);
            self.put(b"\"");
        }
        self.put(b"}");
    }

    /// One sample with an integer value.
    pub fn sample(&mut self, name: &str, labels: &[(&str, Label<'_>)], value: u64) {
        self.put(name.as_bytes());
        self.labels(labels, None);
        self.put(b" ");
        self.num(value);
        self.put(b"\n");
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The samples of one histogram series (its family written before):
    /// cumulative buckets in ascending order, `+Inf` equal to `_count`, and
    /// `_sum` in seconds.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, Label<'_>)], h: &Histogram) {
        let mut cum = 0u64;
        for (i, le) in BUCKET_LE.iter().enumerate() {
            cum += h.counts[i];
            self.put(name.as_bytes());
            self.put(b"_bucket");
            self.labels(labels, Some(("le", le)));
            self.put(b" ");
            self.num(cum);
            self.put(b"\n");
        }
        cum += h.counts[METRICS_HISTOGRAM_BUCKETS];
        self.put(name.as_bytes());
        self.put(b"_bucket");
        self.labels(labels, Some(("le", "+Inf")));
        self.put(b" ");
        self.num(cum);
        self.put(b"\n");
        self.put(name.as_bytes());
        self.put(b"_sum");
        self.labels(labels, None);
        self.put(b" ");
        self.seconds(h.sum_us);
        self.put(b"\n");
        self.put(name.as_bytes());
        self.put(b"_count");
        self.labels(labels, None);
        self.put(b" ");
        self.num(cum);
        self.put(b"\n");
    }
}

/// `v` in decimal, in `buf`'s tail.
pub fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// Renders a whole response into `buf`: the body through `body` (for
/// [`Status::Ok`]), then the head in front of it. Returns the response's
/// range in `buf`. A body that overflows becomes a 500 answer. `buf` is at
/// least [`METRICS_HEAD_MAX_BYTES`] plus room for the error texts.
pub fn respond(
    buf: &mut [u8],
    status: Status,
    head_only: bool,
    body: &mut dyn FnMut(&mut Text<'_>),
) -> (usize, usize) {
    let mut status = status;
    let body_at = METRICS_HEAD_MAX_BYTES;
    let mut len = 0;
    if status == Status::Ok {
        let mut t = Text::new(&mut buf[body_at..]);
        body(&mut t);
        if t.overflowed() {
            status = Status::InternalError;
        } else {
            len = t.len();
        }
    }
    if status != Status::Ok {
        let txt = status.text().as_bytes();
        buf[body_at..body_at + txt.len()].copy_from_slice(txt);
        len = txt.len();
    }
    let mut head = [0u8; METRICS_HEAD_MAX_BYTES];
    let mut h = Text::new(&mut head);
    h.put(b"HTTP/1.1 ");
    h.put(status.line().as_bytes());
    h.put(b"\r\nContent-Type: ");
    h.put(if status == Status::Ok {
        CONTENT_TYPE.as_bytes()
    } else {
        b"text/plain; charset=utf-8"
    });
    if status == Status::MethodNotAllowed {
        h.put(b"\r\nAllow: GET, HEAD");
    }
    h.put(b"\r\nContent-Length: ");
    h.num(len as u64);
    h.put(b"\r\nConnection: close\r\n\r\n");
    let hl = h.len();
    assert!(!h.overflowed(), "the response head fits its room");
    let start = body_at - hl;
    buf[start..body_at].copy_from_slice(&head[..hl]);
    let end = if head_only { body_at } else { body_at + len };
    (start, end)
}

/// The `csnap_build_info{version}` family (value 1).
pub fn build_info(t: &mut Text<'_>, version: &str) {
    t.family(
        "csnap_build_info",
        Kind::Gauge,
        "csnap build information (always 1)",
    );
    t.sample("csnap_build_info", &[("version", Label::Str(version))], 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed() {
        let ok = Parsed::Done {
            status: Status::Ok,
            head_only: false,
        };
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            ok
        );
        assert_eq!(parse_request(b"GET /metrics?x=1 HTTP/1.0\n\n"), ok);
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost"),
            Parsed::Incomplete
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\n\r\n"),
            Parsed::Done {
                status: Status::NotFound,
                head_only: false
            }
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Parsed::Done {
                status: Status::MethodNotAllowed,
                head_only: false
            }
        );
        assert_eq!(
            parse_request(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Parsed::Done {
                status: Status::Ok,
                head_only: true
            }
        );
        for bad in [
            &b"\x00\x01garbage\n"[..],
            b"GET /metrics\r\n",
            b"get /metrics HTTP/1.1\r\n",
            b"GET metrics HTTP/1.1\r\n",
            b"GET /metrics HTTP/2\r\n",
        ] {
            assert_eq!(
                parse_request(bad),
                Parsed::Done {
                    status: Status::BadRequest,
                    head_only: false
                },
                "{bad:?}"
            );
        }
        let mut all = [b'a'; METRICS_REQUEST_MAX_BYTES];
        let line = b"GET /metrics HTTP/1.1\r\nX: ";
        all[..line.len()].copy_from_slice(line);
        assert!(matches!(
            parse_request(&all),
            Parsed::Done {
                status: Status::BadRequest,
                ..
            }
        ));
    }

    #[test]
    fn text_is_prometheus_shaped() {
        let mut buf = [0u8; 4096];
        let (s, e) = respond(&mut buf, Status::Ok, false, &mut |t| {
            t.single("a_total", Kind::Counter, "a \\ b\nc", 7);
            t.family("h_seconds", Kind::Histogram, "h");
            let mut h = Histogram::default();
            h.observe(40);
            h.observe(1_500_000);
            h.observe(99_000_000);
            t.histogram("h_seconds", &[("op", Label::Str("re\"ad"))], &h);
        });
        let r = core::str::from_utf8(&buf[s..e]).unwrap();
        assert!(r.starts_with(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        ));
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        assert!(body.contains("# HELP a_total a \\\\ b\\nc\n# TYPE a_total counter\na_total 7\n"));
        assert!(body.contains("h_seconds_bucket{op=\"re\\\"ad\",le=\"5e-05\"} 1\n"));
        assert!(body.contains("h_seconds_bucket{op=\"re\\\"ad\",le=\"2.5\"} 2\n"));
        assert!(body.contains("h_seconds_bucket{op=\"re\\\"ad\",le=\"+Inf\"} 3\n"));
        assert!(body.contains("h_seconds_sum{op=\"re\\\"ad\"} 100.500040\n"));
        assert!(body.contains("h_seconds_count{op=\"re\\\"ad\"} 3\n"));
        assert!(body.ends_with('\n'));
        let len: usize = r
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }

    #[test]
    fn a_body_that_does_not_fit_is_a_500() {
        let mut buf = [0u8; METRICS_HEAD_MAX_BYTES + 64];
        let (s, e) = respond(&mut buf, Status::Ok, false, &mut |t| {
            for _ in 0..10 {
                t.single("a_long_name_total", Kind::Counter, "help", 1);
            }
        });
        let r = core::str::from_utf8(&buf[s..e]).unwrap();
        assert!(r.starts_with("HTTP/1.1 500 "), "{r}");
        let (s, e) = respond(&mut buf, Status::MethodNotAllowed, false, &mut |_| {});
        let r = core::str::from_utf8(&buf[s..e]).unwrap();
        assert!(r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET"));
    }
}
