//! The reverse proxy to Synapse, following Synapse's docs/reverse_proxy.md: the request URI is
//! passed on byte for byte ("must not canonicalise or normalise the requested URI in any way":
//! federation signatures cover it), X-Forwarded-For/-Proto are ours, bodies stream both ways.

use std::net::IpAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{Body, BoxError, matrix_error};

pub struct Upstream {
    client: Client<HttpConnector, Body>,
    authority: http::uri::Authority,
    max_body: u64,
}

impl Upstream {
    pub fn new(port: u16, max_body: u64) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .pool_timer(TokioTimer::new())
            // We set Host ourselves, from the client's request.
            .set_host(false)
            .build(connector);
        Upstream {
            client,
            authority: format!("127.0.0.1:{port}")
                .parse()
                .expect("valid authority"),
            max_body,
        }
    }

    pub async fn forward(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        host: &str,
    ) -> Response<Body> {
        let too_large = || {
            matrix_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                &format!(
                    "request body is larger than this server's limit of {} bytes",
                    self.max_body
                ),
            )
        };
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > self.max_body
        {
            // Keep the unread request body until the answer is out: dropping it first would
            // reset an HTTP/2 stream (RST_STREAM) before the client sees the 413.
            let (parts, body) = too_large().into_parts();
            let held = Holding {
                body,
                _unread: req.into_body(),
            };
            return Response::from_parts(parts, held.boxed());
        }
        let (mut parts, body) = req.into_parts();
        let inbound_version = parts.version;
        // The path and query exactly as received.
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .expect("valid upstream URI");
        // Twisted speaks HTTP/1.1 only; an h2 request would fail on an h1 connection.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        // We are the only hop: overwrite whatever the client claimed.
        for h in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-port",
            "forwarded",
            "x-real-ip",
        ] {
            parts.headers.remove(h);
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_str(&peer.to_canonical().to_string())
                .expect("an IP is a valid header"),
        );
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        if let Ok(h) = HeaderValue::from_str(host) {
            parts.headers.insert(header::HOST, h);
        }
        // hyper answers "100 Continue" to our client itself when it reads the body.
        parts.headers.remove(header::EXPECT);

        let limited = Limited::new(body, self.max_body as usize).map_err(BoxError::from);
        let upstream_req = Request::from_parts(parts, limited.boxed());
        match self.client.request(upstream_req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = inbound_version;
                Response::from_parts(parts, body.map_err(BoxError::from).boxed())
            }
            Err(e) if caused_by_length_limit(&e) => too_large(),
            Err(e) => {
                tracing::warn!("proxying to Synapse: {e}");
                matrix_error(
                    StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    "Synapse is not answering right now (it may be restarting); try again in a moment",
                )
            }
        }
    }
}

/// A response body that keeps something alive (the unread request body) until it is done.
struct Holding<T> {
    body: Body,
    _unread: T,
}

impl<T: Unpin> hyper::body::Body for Holding<T> {
    type Data = bytes::Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn caused_by_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// RFC 9110 §7.6.1: Connection and the fields it names are for one hop only, as are the
/// classic hop-by-hop fields (RFC 2616 §13.5.1).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        headers.remove(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("authorization", "Bearer t".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }
}
