//! Which host a request names, as the RFCs say, before anything routes by it:
//!
//! - HTTP/1.1 (RFC 9112 §3.2): exactly one `Host`, with a valid value, or 400; an
//!   absolute-form target's authority wins over `Host` (§3.2.2);
//! - HTTP/2 (RFC 9113 §8.3.1): `:authority`, or `Host` when it is absent; a `Host` that names
//!   another authority makes the request malformed (400);
//! - HTTP/1.0 may leave `Host` out (it predates it): routed as no host.

use http::uri::Authority;
use http::{HeaderMap, Request, Version, header};

/// Why a request's host cannot be trusted; each is the client's fault (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadHost {
    #[error("an HTTP/1.1 request needs a Host header (RFC 9112 §3.2)")]
    Missing,
    #[error("a request may carry only one Host header (RFC 9112 §3.2)")]
    Repeated,
    #[error("the Host header is not a valid host[:port] (RFC 9112 §3.2)")]
    Invalid,
    #[error("the Host header names another authority than the request (RFC 9113 §8.3.1)")]
    Conflicting,
}

/// The authority a request is for, as sent (not yet normalized).
pub fn of<B>(req: &Request<B>) -> Result<String, BadHost> {
    let host = single_host(req.headers())?;
    let target = req.uri().authority();
    match req.version() {
        Version::HTTP_2 | Version::HTTP_3 => match (target, host) {
            (Some(a), Some(h)) if !same(a, &h) => Err(BadHost::Conflicting),
            (Some(a), _) => Ok(a.as_str().to_string()),
            (None, Some(h)) => Ok(h.as_str().to_string()),
            (None, None) => Err(BadHost::Missing),
        },
        v => match (target, host) {
            // §3.2.2: the origin server ignores Host, though it must still be sent (§3.2).
            (Some(a), Some(_)) => Ok(a.as_str().to_string()),
            (None, Some(h)) => Ok(h.as_str().to_string()),
            (_, None) if v == Version::HTTP_11 => Err(BadHost::Missing),
            (Some(a), None) => Ok(a.as_str().to_string()),
            (None, None) => Ok(String::new()),
        },
    }
}

/// The one Host header, parsed; more than one, or one that is not an authority, is an error.
fn single_host(headers: &HeaderMap) -> Result<Option<Authority>, BadHost> {
    let mut all = headers.get_all(header::HOST).iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(BadHost::Repeated);
    }
    let a: Authority = first.as_bytes().try_into().map_err(|_| BadHost::Invalid)?;
    // `host` = uri-host [ ":" port ], no userinfo (RFC 9110 §7.2).
    if a.as_str().contains('@') || a.host().is_empty() {
        return Err(BadHost::Invalid);
    }
    Ok(Some(a))
}

/// Host names compare without case (RFC 9110 §4.2.3), ports as written.
fn same(a: &Authority, b: &Authority) -> bool {
    a.host().eq_ignore_ascii_case(b.host()) && a.port_u16() == b.port_u16()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn http1_needs_exactly_one_valid_host() {
        let v = Version::HTTP_11;
        assert_eq!(
            of(&req(v, "/x", &["m.example:8443"])).unwrap(),
            "m.example:8443"
        );
        assert_eq!(of(&req(v, "/x", &[])), Err(BadHost::Missing));
        assert_eq!(
            of(&req(v, "/x", &["a.example", "b.example"])),
            Err(BadHost::Repeated)
        );
        assert_eq!(
            of(&req(v, "/x", &["a.example", "a.example"])),
            Err(BadHost::Repeated)
        );
        for bad in ["a b", "", "u@a.example", "a.example/x", ":443"] {
            assert_eq!(of(&req(v, "/x", &[bad])), Err(BadHost::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn http1_absolute_form_target_wins_over_host() {
        let r = req(Version::HTTP_11, "https://other.example/p", &["m.example"]);
        assert_eq!(of(&r).unwrap(), "other.example");
        let r = req(Version::HTTP_11, "https://other.example/p", &[]);
        assert_eq!(of(&r), Err(BadHost::Missing), "Host is still required");
    }

    #[test]
    fn http10_may_leave_host_out() {
        assert_eq!(of(&req(Version::HTTP_10, "/", &[])).unwrap(), "");
        assert_eq!(
            of(&req(Version::HTTP_10, "/", &["m.example"])).unwrap(),
            "m.example"
        );
    }

    #[test]
    fn http2_authority_and_host_must_agree() {
        let v = Version::HTTP_2;
        let u = "https://m.example/p";
        assert_eq!(of(&req(v, u, &[])).unwrap(), "m.example");
        assert_eq!(of(&req(v, u, &["M.Example"])).unwrap(), "m.example");
        assert_eq!(
            of(&req(v, u, &["other.example"])),
            Err(BadHost::Conflicting)
        );
        assert_eq!(
            of(&req(v, u, &["m.example:8448"])),
            Err(BadHost::Conflicting)
        );
        assert_eq!(of(&req(v, "/p", &["m.example"])).unwrap(), "m.example");
        assert_eq!(of(&req(v, "/p", &[])), Err(BadHost::Missing));
    }
}
