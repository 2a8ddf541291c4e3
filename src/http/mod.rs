//! The front door: listeners on :80, :443 and :8448, TLS (rustls), HTTP/1.1 and HTTP/2
//! (hyper), routing, the well-known files and the proxy to Synapse.

pub mod proxy;
pub mod router;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::certs::CertStore;
use crate::config::{self, Config};
use crate::element::Element;
use router::{Hosts, Listener, Route};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Limits that keep slow or flooding clients from exhausting the process.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub tls_handshake_timeout: Duration,
    /// Slowloris guard: the whole request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes either way for this long is closed.
    /// Requests in flight (long-polling /sync) are never cut.
    pub idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 8192,
            max_connections_per_ip: 256,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(180),
            h2_max_concurrent_streams: 256,
        }
    }
}

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

/// A Matrix-style error body (spec: "Standard error response").
pub fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response<Body> {
    full(
        status,
        "application/json",
        json!({"errcode": errcode, "error": error}).to_string(),
    )
}

/// Everything a request handler needs, shared by all connections.
pub struct FrontDoor {
    hosts: Hosts,
    https_port: u16,
    admin_allow: Vec<(IpAddr, u8)>,
    certs: Arc<CertStore>,
    upstream: proxy::Upstream,
    limits: Limits,
    conns: Semaphore,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    element: Option<Arc<Element>>,
}

/// The bound listeners, bound before anything else starts (ports 80/443 need root).
pub struct Bound {
    http: TcpListener,
    https: TcpListener,
    federation: TcpListener,
}

impl Bound {
    pub async fn bind(cfg: &Config) -> Result<Bound> {
        Ok(Bound {
            http: bind(&cfg.listen.http, "listen.http").await?,
            https: bind(&cfg.listen.https, "listen.https").await?,
            federation: bind(&cfg.listen.federation, "listen.federation").await?,
        })
    }

    pub fn https_port(&self) -> u16 {
        self.https.local_addr().map(|a| a.port()).unwrap_or(443)
    }
}

async fn bind(addr: &str, key: &str) -> Result<TcpListener> {
    let sa: SocketAddr = addr.parse().with_context(|| format!("{key} = {addr:?}"))?;
    match TcpListener::bind(sa).await {
        Ok(l) => Ok(l),
        // A host without IPv6: "[::]:443" falls back to all IPv4 addresses.
        Err(e) if sa.ip().is_unspecified() && sa.is_ipv6() && e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
            TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], sa.port())))
                .await
                .with_context(|| format!("binding {key} = {addr:?}"))
        }
        Err(e) => Err(e).with_context(|| {
            format!("binding {key} = {addr:?}; is another web server (nginx, apache) using the port? Stop it or change [listen] in the config")
        }),
    }
}

impl FrontDoor {
    pub fn new(
        cfg: &Config,
        certs: Arc<CertStore>,
        https_port: u16,
        limits: Limits,
        element: Option<Arc<Element>>,
    ) -> Arc<FrontDoor> {
        Arc::new(FrontDoor {
            hosts: Hosts {
                server_name: cfg.server_name.clone(),
                matrix: cfg.hosts.matrix.clone(),
                element: cfg.hosts.element.clone(),
            },
            https_port,
            admin_allow: cfg
                .http
                .admin_allow
                .iter()
                .filter_map(|n| config::parse_cidr(n))
                .collect(),
            certs,
            upstream: proxy::Upstream::new(cfg.synapse.port, cfg.max_upload_bytes()),
            limits,
            conns: Semaphore::new(limits.max_connections),
            per_ip: Mutex::new(HashMap::new()),
            element,
        })
    }

    /// Serves until `shutdown` turns true; then stops accepting and gives open connections
    /// up to `drain` to finish.
    pub async fn serve(
        self: Arc<Self>,
        bound: Bound,
        shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let tls = TlsAcceptor::from(crate::tls::server_config(self.certs.clone()));
        let active = Arc::new(AtomicUsize::new(0));
        let loops = [
            (bound.http, Listener::Http, None),
            (bound.https, Listener::Https, Some(tls.clone())),
            (bound.federation, Listener::Federation, Some(tls)),
        ]
        .into_iter()
        .map(|(l, kind, tls)| {
            tokio::spawn(
                self.clone()
                    .accept_loop(l, kind, tls, shutdown.clone(), active.clone()),
            )
        })
        .collect::<Vec<_>>();
        let mut sd = shutdown.clone();
        let _ = sd.wait_for(|s| *s).await;
        for l in loops {
            l.abort();
        }
        let deadline = Instant::now() + drain;
        while active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        kind: Listener,
        tls: Option<TlsAcceptor>,
        shutdown: watch::Receiver<bool>,
        active: Arc<AtomicUsize>,
    ) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept on {kind:?}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(guard) = self.clone().admit(peer.ip()) else {
                continue; // over a limit: dropping the socket closes it
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            let active = active.clone();
            tokio::spawn(async move {
                active.fetch_add(1, Ordering::Relaxed);
                this.connection(tcp, peer, kind, tls, shutdown).await;
                active.fetch_sub(1, Ordering::Relaxed);
                drop(guard);
            });
        }
    }

    fn admit(self: Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let permit = self.conns.try_acquire().ok()?;
        permit.forget();
        let mut m = self.per_ip.lock().unwrap();
        let n = m.entry(ip).or_insert(0);
        if *n >= self.limits.max_connections_per_ip {
            drop(m);
            self.conns.add_permits(1);
            return None;
        }
        *n += 1;
        drop(m);
        Some(ConnGuard { fd: self, ip })
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        kind: Listener,
        tls: Option<TlsAcceptor>,
        shutdown: watch::Receiver<bool>,
    ) {
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            inner: tcp,
            activity: activity.clone(),
        };
        match tls {
            None => self.http(io, peer, kind, activity, shutdown).await,
            Some(acceptor) => {
                let stream = match tokio::time::timeout(
                    self.limits.tls_handshake_timeout,
                    acceptor.accept(io),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                // A TLS-ALPN-01 validation connection ends after the handshake (RFC 8737 §3).
                if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN) {
                    return;
                }
                self.http(stream, peer, kind, activity, shutdown).await
            }
        }
    }

    async fn http<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        kind: Listener,
        activity: Arc<Activity>,
        mut shutdown: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.h2_max_concurrent_streams)
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(20));
        let this = self.clone();
        let act = activity.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let act = act.clone();
            async move {
                act.in_flight.fetch_add(1, Ordering::Relaxed);
                let resp = this.handle(req, peer.ip(), kind).await;
                act.in_flight.fetch_sub(1, Ordering::Relaxed);
                act.touch();
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let mut closing = false;
        let mut tick =
            tokio::time::interval((self.limits.idle_timeout / 4).min(Duration::from_secs(5)));
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    break;
                }
                _ = tick.tick(), if !closing => {
                    if activity.idle_for() >= self.limits.idle_timeout {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                _ = shutdown.wait_for(|s| *s), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: IpAddr, kind: Listener) -> Response<Body> {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let host = router::host_only(&authority);
        let path = req.uri().path().to_string();
        let route = router::route(kind, &self.hosts, &host, &path, peer, &self.admin_allow);
        let mut resp = match route {
            Route::AcmeChallenge(token) => match self.certs.http01(&token) {
                Some(ka) => full(StatusCode::OK, "application/octet-stream", ka),
                None => full(StatusCode::NOT_FOUND, "text/plain", "no such challenge\n"),
            },
            Route::RedirectHttps => self.redirect(&host, &req),
            Route::WellKnownServer => {
                // Matrix spec, server-server API "/.well-known/matrix/server".
                full(
                    StatusCode::OK,
                    "application/json",
                    json!({"m.server": format!("{}:{}", self.hosts.matrix, self.https_port)})
                        .to_string(),
                )
            }
            Route::WellKnownClient => {
                // Matrix spec, client-server API "Well-known URI"; clients fetch it
                // cross-origin, so CORS is required.
                let mut r = full(
                    StatusCode::OK,
                    "application/json",
                    json!({"m.homeserver": {"base_url": self.base_url(&self.hosts.matrix)}})
                        .to_string(),
                );
                r.headers_mut().insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    header::HeaderValue::from_static("*"),
                );
                r
            }
            Route::Synapse => self.upstream.forward(req, peer, &authority).await,
            Route::AdminForbidden => matrix_error(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "the admin API is reachable only from this host (or the networks in [http] admin_allow)",
            ),
            Route::Element => match &self.element {
                Some(e) => {
                    let (parts, body) = e
                        .serve(req.method(), &path, req.headers())
                        .await
                        .into_parts();
                    Response::from_parts(parts, full_body(body))
                }
                None => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            },
            Route::Landing => {
                let element = self.base_url(&self.hosts.element);
                full(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    page(
                        &format!("Matrix server {}", self.hosts.server_name),
                        &format!(
                            "This is a Matrix homeserver. Chat in the browser at <a href=\"{element}\">{element}</a>, or use any Matrix client with the server name <code>{}</code>.",
                            self.hosts.server_name
                        ),
                    ),
                )
            }
            Route::NotFound => {
                if path.starts_with("/_matrix/") {
                    matrix_error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "not served here")
                } else {
                    full(StatusCode::NOT_FOUND, "text/plain", "not found\n")
                }
            }
        };
        if kind != Listener::Http {
            // RFC 6797. No includeSubDomains: the server name's other subdomains are not ours.
            resp.headers_mut().insert(
                header::STRICT_TRANSPORT_SECURITY,
                header::HeaderValue::from_static("max-age=31536000"),
            );
        }
        resp
    }

    fn base_url(&self, host: &str) -> String {
        https_url(host, self.https_port)
    }

    fn redirect(&self, host: &str, req: &Request<Incoming>) -> Response<Body> {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let target = if self.hosts.served(host) {
            format!("{}{pq}", self.base_url(host))
        } else {
            format!("{}/", self.base_url(&self.hosts.matrix))
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

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title></head><body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>{title}</h1><p>{body}</p></body></html>\n"
    )
}

/// Releases a connection's place in the limits when it ends.
struct ConnGuard {
    fd: Arc<FrontDoor>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut m = self.fd.per_ip.lock().unwrap();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
        drop(m);
        self.fd.conns.add_permits(1);
    }
}

/// When a connection last moved bytes, and how many requests it has in flight.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A socket that records activity for the idle timeout.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
