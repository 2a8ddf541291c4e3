//! The front door: listeners on :80, :443 and :8448, TLS (rustls), HTTP/1.1 and HTTP/2
//! (hyper), and a request pipeline in front of the handlers `app` registers.
//!
//! - `transport`: listeners, TLS, connection limits and lifetimes;
//! - `router`: where a request goes, and the handler (with its layers) registered there;
//! - `layers`: admin guard, forwarded headers, body limit, HSTS;
//! - `handlers`: the small answers (well-known, ACME HTTP-01, landing page);
//! - `proxy`: the handler that forwards to Synapse;
//! - `ratelimit`: the registration-token oracle's budget per client address;
//! - `wire`: the lean HTTP/1.1 client its long-polls go through.
//!
//! Nothing here imports a feature module: Element and the rest are registered by `app`.

pub mod handlers;
pub mod layers;
pub mod proxy;
pub mod ratelimit;
pub mod router;
pub mod transport;
pub mod wire;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use layers::{AdminGuard, Hsts, Layer, Step};
pub use router::{Hosts, Listener, Route, Router, Site, Slot};
pub use transport::{Bound, Limits, addr_key};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// `https://host`, with the port only when it is not 443.
pub use crate::config::https_url;

pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(full_body(body.into()))
        .expect("valid response")
}

pub fn full_body(body: Bytes) -> Body {
    Full::new(body).map_err(|never| match never {}).boxed()
}

/// A response body that first reads the unread request body to its end (at most `left`
/// bytes), then gives its own. An answer given before the request is read (a 429) would
/// otherwise finish while the client is still sending: HTTP/2 then resets the stream
/// (RFC 9113 §8.1), and curl and others report the reset, not the answer.
pub struct Drained {
    pub body: Body,
    pub req: Option<Body>,
    pub left: usize,
}

impl hyper::body::Body for Drained {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        while let Some(req) = self.req.as_mut() {
            match Pin::new(req).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let n = frame.data_ref().map_or(0, |d| d.len());
                    match self.left.checked_sub(n) {
                        Some(left) => self.left = left,
                        // Too much to be a mistaken client: stop reading, answer anyway.
                        None => self.req = None,
                    }
                }
                Poll::Ready(_) => self.req = None,
            }
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.req.is_none() && self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A request body read whole, or None when it is over `max` bytes or broke off. A handler
/// that needs the bytes (small JSON) reads them with this.
pub async fn read_body(mut body: Body, max: usize) -> Option<Bytes> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buf.len() + data.len() > max {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(buf.freeze())
}

/// A Matrix-style error body (spec: "Standard error response").
pub fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response<Body> {
    full(
        status,
        "application/json",
        json!({"errcode": errcode, "error": error}).to_string(),
    )
}

/// What a handler knows of a request besides the request itself.
#[derive(Debug, Clone)]
pub struct Cx {
    /// The client's address as connected (no proxy in front of us).
    pub peer: IpAddr,
    pub listener: Listener,
    /// The request's host, normalized (`uri::host_only`).
    pub host: String,
    /// The Host header (or `:authority`) as sent.
    pub authority: String,
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Answers the requests of one route.
pub type Handler = Arc<dyn Fn(Request<Body>, Cx) -> BoxFuture<Response<Body>> + Send + Sync>;

/// A [`Handler`] from an async closure.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Body>, Cx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    Arc::new(move |req, cx| Box::pin(f(req, cx)))
}

/// The request pipeline: route, the route's layers, its handler, then the layers every
/// answer gets (HSTS).
pub struct FrontDoor {
    router: Router,
    https_port: u16,
    /// Layers every answer gets, outermost first.
    outer: Vec<Arc<dyn Layer>>,
}

impl FrontDoor {
    pub fn new(router: Router, https_port: u16) -> Arc<FrontDoor> {
        Arc::new(FrontDoor {
            router,
            https_port,
            outer: vec![Arc::new(Hsts)],
        })
    }

    /// Serves until `shutdown` turns true; then stops accepting and gives open connections
    /// up to `drain` to finish.
    pub async fn serve(
        self: Arc<Self>,
        bound: Bound,
        tls: TlsAcceptor,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        transport::Transport::new(self, tls, limits)
            .serve(bound, shutdown, drain)
            .await
    }

    async fn answer(&self, req: Request<Body>, cx: &Cx) -> Response<Body> {
        let path = req.uri().path();
        let route = self.router.route(cx.listener, &cx.host, path, cx.peer);
        let Some(pipeline) = self.router.pipeline(&route) else {
            return match route {
                Route::RedirectHttps => self.redirect(&cx.host, &req),
                Route::AdminForbidden => AdminGuard::forbidden(),
                _ => not_found(path),
            };
        };
        let mut req = req;
        for layer in &pipeline.layers {
            req = match layer.request(req, cx) {
                Step::Next(r) => r,
                Step::Answer(answer) => return answer,
            };
        }
        let mut resp = (pipeline.handler)(req, cx.clone()).await;
        for layer in pipeline.layers.iter().rev() {
            layer.response(&mut resp, cx);
        }
        resp
    }

    fn redirect(&self, host: &str, req: &Request<Body>) -> Response<Body> {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let hosts = self.router.hosts();
        let target = if hosts.served(host) {
            format!("{}{pq}", https_url(host, self.https_port))
        } else {
            format!("{}/", https_url(&hosts.matrix, self.https_port))
        };
        let mut r = full(
            StatusCode::MOVED_PERMANENTLY,
            "text/plain",
            "moved to https\n",
        );
        if let Ok(v) = header::HeaderValue::from_str(&target) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }
}

fn not_found(path: &str) -> Response<Body> {
    if path.starts_with("/_matrix/") {
        matrix_error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "not served here")
    } else {
        full(StatusCode::NOT_FOUND, "text/plain", "not found\n")
    }
}

impl transport::App for FrontDoor {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        listener: Listener,
    ) -> Response<Body> {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let cx = Cx {
            peer,
            listener,
            host: crate::uri::host_only(&authority),
            authority,
        };
        let req = req.map(|b| b.map_err(BoxError::from).boxed());
        let mut resp = self.answer(req, &cx).await;
        for layer in self.outer.iter().rev() {
            layer.response(&mut resp, &cx);
        }
        resp
    }
}

/// A response body that keeps something alive (a request's place, the unread request body)
/// until it is done.
pub struct Holding<T> {
    pub body: Body,
    pub _keep: T,
}

impl<T: Unpin> hyper::body::Body for Holding<T> {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request body the test sends piece by piece.
    struct Sent(tokio::sync::mpsc::Receiver<Bytes>);
    impl hyper::body::Body for Sent {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            self.0
                .poll_recv(cx)
                .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }

    /// The request is read to its end before the answer's first byte; past the cap, the
    /// answer comes anyway.
    #[tokio::test]
    async fn a_drained_answer_reads_the_request_first_and_stops_at_the_cap() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut answer = Drained {
            body: full_body(Bytes::from_static(b"429")),
            req: Some(Sent(rx).boxed()),
            left: 10,
        };
        tx.send(Bytes::from_static(b"guess")).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), answer.frame()).await;
        assert!(early.is_err(), "answered before the request ended");
        drop(tx);
        let got = answer.collect().await.unwrap().to_bytes();
        assert_eq!(got, "429");

        let mut capped = Drained {
            body: full_body(Bytes::from_static(b"429")),
            req: Some(full_body(Bytes::from(vec![b'x'; 11]))),
            left: 10,
        };
        assert!(!hyper::body::Body::is_end_stream(&capped));
        let got = (&mut capped).collect().await.unwrap().to_bytes();
        assert_eq!(got, "429");
        assert!(capped.req.is_none());
    }
}
