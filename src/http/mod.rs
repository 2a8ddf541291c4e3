//! The front door: listeners on :80, :443 and :8448, TLS (rustls), HTTP/1.1 and HTTP/2
//! (hyper), and a request pipeline in front of the handlers `app` registers.
//!
//! - `transport`: listeners, TLS, connection limits and lifetimes;
//! - `authority`: which host a request names (one Host, the target's authority first);
//! - `router`: where a request goes, and the handler (with its layers) registered there;
//! - `layers`: admin guard, forwarded headers, body limit, HSTS;
//! - `handlers`: the small answers (well-known, ACME HTTP-01, landing page);
//! - `proxy`: the handler that forwards to Synapse;
//! - `ratelimit`: the registration-token oracle's budget per client address;
//! - `wire`: the lean HTTP/1.1 client its long-polls go through.
//!
//! Nothing here imports a feature module: Element and the rest are registered by `app`.

pub mod authority;
pub mod balance;
pub mod handlers;
pub mod inner;
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
pub use router::{Hosts, Route, Router, Site, Slot};
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

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// :80, plain HTTP.
    Http,
    /// :443, clients and federation.
    Https,
    /// :8448, federation only.
    Federation,
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
            let answer = match route {
                Route::RedirectHttps => self.redirect(&cx.host, &req),
                Route::AdminForbidden => AdminGuard::forbidden(),
                _ => not_found(path),
            };
            return answer_early(answer, req.into_body()).await;
        };
        let mut req = req;
        for layer in &pipeline.layers {
            req = match layer.request(req, cx) {
                Step::Next(r) => r,
                Step::Answer(answer) => return answer,
                Step::Later(answer) => return answer.await,
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

/// 400, as a Matrix error on the Matrix APIs (spec: "Standard error response").
pub fn bad_request(path: &str, why: &str) -> Response<Body> {
    if path.starts_with("/_matrix/") {
        matrix_error(StatusCode::BAD_REQUEST, "M_UNKNOWN", why)
    } else {
        full(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n"))
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
        let authority = match authority::of(&req) {
            Ok(a) => a,
            // The client's fault, so not worth a warning: anyone could write those at will.
            Err(e) => {
                tracing::debug!(%peer, "bad request: {e}");
                let answer = bad_request(req.uri().path(), &e.to_string());
                let body = req.into_body().map_err(BoxError::from).boxed();
                return answer_early(answer, body).await;
            }
        };
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

/// Answers without reading the request body, which is kept until the answer is out (for one
/// too large to read: HTTP/2 then ends the stream with RST_STREAM(NO_ERROR), RFC 9113 §8.1).
pub fn answer_unread(resp: Response<Body>, unread: Body) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let held = Holding {
        body,
        _keep: unread,
    };
    Response::from_parts(parts, held.boxed())
}

/// How much of a request body an early answer waits for, and how long.
const DRAIN_MAX: usize = 64 * 1024;
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// An answer given without the request body (404, 403, 503): a small body still on its way is
/// read and dropped first, so the answer ends the exchange. Left unread, HTTP/2 ends the stream
/// with RST_STREAM(NO_ERROR) after the answer (RFC 9113 §8.1 allows it), which Debian 12's curl
/// 7.88 reports as "Stream error in the HTTP/2 framing layer" instead of the answer. A body
/// over DRAIN_MAX or slower than DRAIN_WAIT gets the reset.
pub async fn answer_early(resp: Response<Body>, mut unread: Body) -> Response<Body> {
    // Past DRAIN_WAIT the rest is left to the reset.
    let _ = tokio::time::timeout(DRAIN_WAIT, async {
        let mut seen = 0;
        while !hyper::body::Body::is_end_stream(&unread) {
            match unread.frame().await {
                Some(Ok(f)) => {
                    seen += f.data_ref().map_or(0, |d| d.len());
                    if seen > DRAIN_MAX {
                        return;
                    }
                }
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    answer_unread(resp, unread)
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
