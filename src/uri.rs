//! URI pieces read the same way everywhere: percent-decoding (RFC 3986 §2.1) and the host of
//! an authority (RFC 3986 §3.2.2). The front door routes on them, Element maps paths to files
//! with them, and the config checks test-server URLs with them: one reading, not three.

use std::borrow::Cow;

/// Every `%XX` decoded, lossily into UTF-8 (Synapse's own paths are ASCII); a malformed
/// escape is kept as it is. For routing decisions, which must read what Synapse reads.
pub fn percent_decode_lenient(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let out = decode(s.as_bytes(), true).expect("lenient decoding keeps malformed escapes");
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Every `%XX` decoded; `None` for a malformed escape or bytes that are not UTF-8. For file
/// names, where a guess would be wrong.
pub fn percent_decode_strict(s: &str) -> Option<String> {
    String::from_utf8(decode(s.as_bytes(), false)?).ok()
}

/// `s` percent-encoded for a query value or a path segment: every byte but RFC 3986
/// §2.3's unreserved characters. For a value the caller did not choose (a token, an ID).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(b: &[u8], keep_malformed: bool) -> Option<Vec<u8>> {
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            match (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ if !keep_malformed => return None,
                _ => {}
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Some(out)
}

/// The host of a Host header, `:authority` or URL authority: lowercased, without the port,
/// the brackets of an IPv6 literal or a trailing dot. A port that is not all digits stays (so
/// `a:b` is no host `a`).
pub fn host_only(authority: &str) -> String {
    let a = authority.trim();
    let h = if let Some(rest) = a.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        a.rsplit_once(':').map_or(a, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                a
            }
        })
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_keeps_only_the_unreserved_characters() {
        assert_eq!(percent_encode("aZ9-._~"), "aZ9-._~");
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            percent_decode_strict(&percent_encode("x&y=é")).as_deref(),
            Some("x&y=é")
        );
    }

    #[test]
    fn lenient_keeps_malformed_escapes_strict_refuses_them() {
        assert_eq!(percent_decode_lenient("/a%2Fb%zz%4"), "/a/b%zz%4");
        assert!(matches!(percent_decode_lenient("/plain"), Cow::Borrowed(_)));
        assert_eq!(percent_decode_strict("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode_strict("a%zz"), None);
        assert_eq!(percent_decode_strict("a%2"), None);
        assert_eq!(percent_decode_strict("%ff"), None);
        assert_eq!(percent_decode_lenient("%ff"), "\u{fffd}");
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(host_only("Matrix.Example.com:443"), "matrix.example.com");
        assert_eq!(host_only("matrix.example.com."), "matrix.example.com");
        assert_eq!(host_only("[::1]:8448"), "::1");
        assert_eq!(host_only("matrix.example.com"), "matrix.example.com");
        assert_eq!(host_only("a:b"), "a:b");
    }
}
