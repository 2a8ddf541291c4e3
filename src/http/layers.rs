//! The request pipeline's layers, each one concern, each tested alone: in the style of tower's
//! middleware, a layer sees the request before its handler (and may answer instead of it) and
//! the response after. They are plain trait objects on a route's list, not nested generic
//! services: a route's pipeline is built once at start and costs a few virtual calls.

use std::net::IpAddr;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as _;

use super::{Body, BoxError, Cx, Listener, answer_unread, matrix_error};

/// What a layer does with a request.
pub enum Step {
    /// Pass it on (changed or not).
    Next(Request<Body>),
    /// Answer it instead of the handler.
    Answer(Response<Body>),
    /// Answer it instead of the handler, once this is done (it may read the request first).
    Later(super::BoxFuture<Response<Body>>),
}

impl Step {
    #[cfg(test)]
    fn next(self) -> Request<Body> {
        match self {
            Step::Next(r) => r,
            Step::Answer(a) => panic!("answered {}", a.status()),
            Step::Later(_) => panic!("answers later"),
        }
    }
    #[cfg(test)]
    fn answer(self) -> Response<Body> {
        match self {
            Step::Answer(a) => a,
            Step::Next(_) | Step::Later(_) => panic!("passed on or answers later"),
        }
    }
}

pub trait Layer: Send + Sync + 'static {
    /// Before the handler: the request to pass on, or the answer to give instead.
    fn request(&self, req: Request<Body>, _cx: &Cx) -> Step {
        Step::Next(req)
    }
    /// After the handler (or after a layer answered).
    fn response(&self, _resp: &mut Response<Body>, _cx: &Cx) {}
}

/// Who may reach Synapse's private trees: DESIGN.md §2, of `/_synapse` only `/_synapse/client`
/// (SSO pages, password reset, consent) is public; the admin API and the rest (e.g.
/// `/_synapse/mas`) are for this host and the `[http] admin_allow` networks. The router asks
/// it once per reading of the path (see `router::route`), so it decides on paths, not requests.
#[derive(Debug, Clone, Default)]
pub struct AdminGuard {
    allow: Vec<(IpAddr, u8)>,
}

/// What the guard says about one path under `/_synapse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// The admin API from outside: 403, saying where it can be reached from.
    Forbidden,
    /// Another private tree from outside: 404, not advertised.
    Hidden,
}

impl AdminGuard {
    pub fn new(allow: Vec<(IpAddr, u8)>) -> AdminGuard {
        AdminGuard { allow }
    }

    /// Loopback, or inside one of the `admin_allow` networks.
    pub fn allowed(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        peer.is_loopback()
            || self
                .allow
                .iter()
                .any(|(net, len)| in_network(peer, *net, *len))
    }

    /// `path` (one reading of it) lies under `/_synapse`.
    pub fn check(&self, path: &str, peer: IpAddr) -> Access {
        if under(path, "/_synapse/client") || self.allowed(peer) {
            Access::Allowed
        } else if under(path, "/_synapse/admin") {
            Access::Forbidden
        } else {
            Access::Hidden
        }
    }

    pub fn forbidden() -> Response<Body> {
        matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "the admin API is reachable only from this host (or the networks in [http] admin_allow)",
        )
    }
}

fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// `path` is `prefix` or lies below it.
pub fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Synapse's reverse-proxy doc: we are the only hop, so whatever the client claimed in
/// X-Forwarded-* (or Forwarded, X-Real-IP) goes, and ours say who connected and that it was
/// https; `Host` is the client's, which Synapse uses for nothing but is kept honest.
pub struct ForwardedHeaders;

const CLAIMS: [HeaderName; 6] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
];

impl Layer for ForwardedHeaders {
    fn request(&self, mut req: Request<Body>, cx: &Cx) -> Step {
        let h = req.headers_mut();
        // Names made once (a `&str` name is parsed again at each lookup).
        for name in &CLAIMS {
            h.remove(name);
        }
        h.insert(CLAIMS[0].clone(), client_address(cx.peer));
        h.insert(CLAIMS[1].clone(), HeaderValue::from_static("https"));
        // Usually Host is already `cx.authority` (it came from there); an HTTP/2 request
        // carries :authority instead, which Synapse does not see.
        if h.get(header::HOST).map(HeaderValue::as_bytes) != Some(cx.authority.as_bytes())
            && let Ok(v) = HeaderValue::from_str(&cx.authority)
        {
            h.insert(header::HOST, v);
        }
        Step::Next(req)
    }
}

/// The client's address as X-Forwarded-For gives it (an IPv4 client on a dual-stack socket
/// as IPv4). IPv4 is written by hand: `Display` goes through `fmt` machinery on every request.
fn client_address(peer: IpAddr) -> HeaderValue {
    match peer.to_canonical() {
        IpAddr::V4(a) => {
            let mut out = Vec::with_capacity(15);
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
            HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).expect("digits and dots")
        }
        a => HeaderValue::from_str(&a.to_string()).expect("an IP is a valid header"),
    }
}

/// Request bodies up to Synapse's `max_upload_size` (DESIGN.md §2): a declared length past it
/// is answered 413 at once, and a body that grows past it while streaming fails (the proxy
/// turns that into 413 too, see [`BodyLimit::caused`]).
pub struct BodyLimit {
    pub max: u64,
}

impl BodyLimit {
    /// The 413 answer (Matrix spec: M_TOO_LARGE).
    pub fn too_large(max: u64) -> Response<Body> {
        matrix_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            &format!("request body is larger than this server's limit of {max} bytes"),
        )
    }

    /// The error came from a body that grew past the limit.
    pub fn caused(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if err.is::<http_body_util::LengthLimitError>() {
                return true;
            }
            cur = err.source();
        }
        false
    }
}

impl Layer for BodyLimit {
    fn request(&self, req: Request<Body>, _cx: &Cx) -> Step {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max) {
            return Step::Answer(answer_unread(Self::too_large(self.max), req.into_body()));
        }
        if req.body().is_end_stream() {
            return Step::Next(req); // nothing to count
        }
        let max = self.max as usize;
        Step::Next(req.map(|b| Limited::new(b, max).map_err(BoxError::from).boxed()))
    }
}

/// RFC 6797 HSTS on the TLS listeners. No includeSubDomains: the server name's other
/// subdomains are not ours.
pub struct Hsts;

impl Layer for Hsts {
    fn response(&self, resp: &mut Response<Body>, cx: &Cx) {
        if cx.listener != Listener::Http {
            resp.headers_mut().insert(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=31536000"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{full, full_body};
    use super::*;
    use bytes::Bytes;

    fn cx(listener: Listener) -> Cx {
        Cx {
            peer: "203.0.113.9".parse().unwrap(),
            listener,
            host: "matrix.example.com".into(),
            authority: "matrix.example.com:8443".into(),
        }
    }

    fn req(body: &'static str) -> Request<Body> {
        Request::builder()
            .uri("/_matrix/media/v3/upload")
            .header(header::CONTENT_LENGTH, body.len())
            .body(full_body(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    #[test]
    fn admin_guard_opens_client_pages_and_closes_the_rest_to_outsiders() {
        let g = AdminGuard::new(vec![("192.168.1.0".parse().unwrap(), 24)]);
        let out: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(g.check("/_synapse/client/pick_idp", out), Access::Allowed);
        assert_eq!(g.check("/_synapse/admin/v1/x", out), Access::Forbidden);
        assert_eq!(g.check("/_synapse/admin", out), Access::Forbidden);
        assert_eq!(g.check("/_synapse/mas/x", out), Access::Hidden);
        assert_eq!(g.check("/_synapse/clientx", out), Access::Hidden);
        for ok in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "192.168.1.20"] {
            assert_eq!(
                g.check("/_synapse/admin/v1/x", ok.parse().unwrap()),
                Access::Allowed,
                "{ok}"
            );
        }
        assert_eq!(
            g.check("/_synapse/admin/v1/x", "192.168.2.20".parse().unwrap()),
            Access::Forbidden
        );
        assert_eq!(AdminGuard::forbidden().status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn forwarded_headers_replace_the_clients_claims() {
        let mut r = req("");
        for (k, v) in [
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("x-forwarded-host", "evil"),
            ("host", "evil"),
        ] {
            r.headers_mut().insert(k, v.parse().unwrap());
        }
        let c = Cx {
            peer: "::ffff:192.0.2.7".parse().unwrap(),
            ..cx(Listener::Https)
        };
        let r = ForwardedHeaders.request(r, &c).next();
        let h = r.headers();
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["host"], "matrix.example.com:8443");
        for gone in ["forwarded", "x-real-ip", "x-forwarded-host"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[tokio::test]
    async fn body_limit_refuses_declared_and_streamed_overflows() {
        let limit = BodyLimit { max: 4 };
        let c = cx(Listener::Https);
        let refused = limit.request(req("12345"), &c).answer();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let passed = limit.request(req("1234"), &c).next();
        assert_eq!(
            passed.into_body().collect().await.unwrap().to_bytes(),
            "1234"
        );
        // A body that lies about (or does not declare) its length is cut while streaming.
        let mut lying = req("123456");
        lying.headers_mut().remove(header::CONTENT_LENGTH);
        let err = limit
            .request(lying, &c)
            .next()
            .into_body()
            .collect()
            .await
            .unwrap_err();
        assert!(BodyLimit::caused(err.as_ref()), "{err}");
    }

    #[test]
    fn client_addresses_are_written_as_display_writes_them() {
        for a in [
            "0.0.0.0",
            "10.0.20.255",
            "127.0.0.1",
            "192.168.100.9",
            "::1",
            "fd00::7",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(client_address(ip), a);
        }
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(client_address(mapped), "203.0.113.7");
    }

    #[test]
    fn hsts_only_over_tls() {
        for (l, want) in [
            (Listener::Https, true),
            (Listener::Federation, true),
            (Listener::Http, false),
        ] {
            let mut r = full(StatusCode::OK, "text/plain", "x");
            Hsts.response(&mut r, &cx(l));
            assert_eq!(
                r.headers().contains_key(header::STRICT_TRANSPORT_SECURITY),
                want,
                "{l:?}"
            );
        }
    }
}
