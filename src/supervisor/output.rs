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

#[cfg(test)]
mod tests {
    use super::*;

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
