//! A child's output, turned into log lines. The bytes are the child's, not ours to trust:
//! coturn is C and prints what it is given, and a Synapse module can write anything. So the
//! output is read as bytes, split on `\n`, decoded lossily, and a line is capped: a child that
//! writes a megabyte without a newline costs at most one capped line of memory. The pipe is
//! read to EOF whatever comes, so the child never writes into a closed pipe (EPIPE, SIGPIPE).

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest line logged; the rest of a longer one is dropped (journald's own line limit,
/// LineMax=, defaults to 48 KiB: journald.conf(5)).
pub const MAX_LINE: usize = 16 * 1024;

/// Appended to a line that was cut at `MAX_LINE`.
pub const CUT_MARKER: &str = " [line cut: longer than 16 KiB]";

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct Lines {
    max: usize,
    line: Vec<u8>,
    /// The current line was cut and logged; its rest is dropped up to the next newline.
    dropping: bool,
}

impl Lines {
    pub fn new(max: usize) -> Lines {
        Lines {
            max,
            line: Vec::with_capacity(256),
            dropping: false,
        }
    }

    /// Feeds `bytes`; calls `emit(line, cut)` for each complete line, and at once for a line
    /// that reaches `max` without a newline (`cut` is true, and the rest of it is dropped).
    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&str, bool)) {
        while !bytes.is_empty() {
            let nl = bytes.iter().position(|&b| b == b'\n');
            let (chunk, rest, ends) = match nl {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if !self.dropping {
                let room = self.max - self.line.len();
                if chunk.len() >= room && !(ends && chunk.len() == room) {
                    self.line.extend_from_slice(&chunk[..room]);
                    self.flush(true, emit);
                    self.dropping = true;
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            if ends {
                if self.dropping {
                    self.dropping = false;
                } else {
                    self.flush(false, emit);
                }
            }
        }
    }

    /// At EOF: the last line, if it had no newline.
    pub fn finish(&mut self, emit: &mut impl FnMut(&str, bool)) {
        if !self.line.is_empty() {
            self.flush(false, emit);
        }
        self.dropping = false;
    }

    fn flush(&mut self, cut: bool, emit: &mut impl FnMut(&str, bool)) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        emit(&String::from_utf8_lossy(line), cut);
        self.line.clear();
    }
}

/// Reads `pipe` to EOF (or a read error), calling `emit` for each line.
pub async fn forward(mut pipe: impl AsyncRead + Unpin, mut emit: impl FnMut(&str, bool)) {
    let mut lines = Lines::new(MAX_LINE);
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => lines.push(&buf[..n], &mut emit),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    lines.finish(&mut emit);
}

/// Query parameters whose values are secrets and must not reach the journal. Synapse's access
/// log redacts `access_token` and `client_secret` itself (`synapse.http.redact_uri`) but logs
/// the registration token that the invite page's validity check carries
/// (`GET /_matrix/client/v1/register/m.login.registration_token/validity?token=...`).
const SECRET_PARAMS: [&str; 2] = ["token", "access_token"];

/// Synapse logs the completed UIA stages with their credentials at INFO
/// (synapse/handlers/auth.py, `check_ui_auth`: "Auth completed with creds: %r"), a Python dict
/// whose registration-token stage holds the token itself.
const SECRET_REPR: &str = "'m.login.registration_token': '";

/// The line with secrets replaced by `<redacted>`: the value of every [`SECRET_PARAMS`] query
/// parameter (after `?` or `&`, up to the next `&`, `#`, quote or blank), and the quoted value
/// after [`SECRET_REPR`].
pub fn redact_secrets(line: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let line = match redact_query(line) {
        Cow::Borrowed(_) => Cow::Borrowed(line),
        Cow::Owned(o) => Cow::Owned(o),
    };
    let Some(at) = line.find(SECRET_REPR) else {
        return line;
    };
    let start = at + SECRET_REPR.len();
    let end = line[start..].find('\'').map_or(line.len(), |e| start + e);
    Cow::Owned(format!("{}<redacted>{}", &line[..start], &line[end..]))
}

fn redact_query(line: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let hit = |at: usize| {
        SECRET_PARAMS
            .iter()
            .find(|p| line[at..].starts_with(**p) && line[at + p.len()..].starts_with('='))
            .map(|p| at + p.len() + 1)
    };
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    let b = line.as_bytes();
    while i < b.len() {
        if matches!(b[i], b'?' | b'&')
            && let Some(start) = hit(i + 1)
        {
            let end = line[start..]
                .find(['&', '#', '"', '\'', ' ', '\t'])
                .map_or(line.len(), |e| start + e);
            if end > start {
                let o = out.get_or_insert_with(String::new);
                o.push_str(&line[copied..start]);
                o.push_str("<redacted>");
                copied = end;
            }
            i = end;
            continue;
        }
        i += 1;
    }
    match out {
        None => Cow::Borrowed(line),
        Some(mut o) => {
            o.push_str(&line[copied..]);
            Cow::Owned(o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_query_parameters_are_redacted() {
        let l = r#"synapse.access.http.8008 - 123 - INFO - GET-4 - ::1 - 8008 - {None} Processed request: 0.003sec 200 14B 200 "GET /_matrix/client/v1/register/m.login.registration_token/validity?token=Ab.C_1~-z HTTP/1.1" "Mozilla/5.0""#;
        let r = redact_secrets(l);
        assert!(!r.contains("Ab.C_1"), "{r}");
        assert!(r.contains("validity?token=<redacted> HTTP/1.1"), "{r}");
        assert_eq!(
            redact_secrets("/x?a=1&token=s3cret&b=2 /y?access_token=t#f"),
            "/x?a=1&token=<redacted>&b=2 /y?access_token=<redacted>#f"
        );
        let creds = "Auth completed with creds: {'m.login.registration_token': 'j.1Vq~x', 'm.login.dummy': True}.";
        assert_eq!(
            redact_secrets(creds),
            "Auth completed with creds: {'m.login.registration_token': '<redacted>', 'm.login.dummy': True}."
        );
        // Other parameters, a bare word and empty values stay.
        for same in [
            "/x?tokens=1&mytoken=2",
            "a token=3 here",
            "/x?token=&y",
            "no query at all",
        ] {
            assert!(
                matches!(redact_secrets(same), std::borrow::Cow::Borrowed(_)),
                "{same}"
            );
        }
    }

    fn split(max: usize, pieces: &[&[u8]]) -> Vec<(String, bool)> {
        let mut out = vec![];
        let mut l = Lines::new(max);
        let mut emit = |s: &str, cut: bool| out.push((s.to_string(), cut));
        for p in pieces {
            l.push(p, &mut emit);
        }
        l.finish(&mut emit);
        out
    }

    fn owned(v: &[(&str, bool)]) -> Vec<(String, bool)> {
        v.iter().map(|(s, c)| (s.to_string(), *c)).collect()
    }

    #[test]
    fn lines_split_across_reads_and_crlf() {
        assert_eq!(
            split(100, &[b"one\ntw", b"o\r\nthree"]),
            owned(&[("one", false), ("two", false), ("three", false)])
        );
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        assert_eq!(
            split(100, &[b"bad \xff\xfe here\nnext\n"]),
            owned(&[("bad \u{fffd}\u{fffd} here", false), ("next", false)])
        );
    }

    #[test]
    fn a_long_line_is_cut_once_and_its_rest_dropped() {
        let long = [b'x'; 25];
        let out = split(10, &[b"a\n", &long[..7], &long[7..], b"\nb\n"]);
        assert_eq!(
            out,
            owned(&[("a", false), ("xxxxxxxxxx", true), ("b", false)])
        );
        // Exactly `max` bytes then a newline is a whole line, not a cut one.
        assert_eq!(
            split(3, &[b"abc\nd"]),
            owned(&[("abc", false), ("d", false)])
        );
        // The cut is reported at once, before any newline comes.
        let mut seen = vec![];
        let mut l = Lines::new(4);
        l.push(b"abcdefgh", &mut |s: &str, c| seen.push((s.to_string(), c)));
        assert_eq!(seen, owned(&[("abcd", true)]));
    }
}
