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
use tokio::sync::{Notify, watch};
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
    /// Connections in all. At the cap an idle connection is closed to admit a new one;
    /// connections with a request in flight are never evicted.
    pub max_connections: usize,
    /// Connections per client address; IPv6 addresses count per /64, the block one host gets
    /// (RFC 6177), so one host cannot take 2^64 separate places.
    pub max_connections_per_ip: usize,
    pub tls_handshake_timeout: Duration,
    /// Slowloris guard (HTTP/1.x): a request head, once started (or, for the first request,
    /// from the connection's start), must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed, whatever bytes move
    /// (HTTP/2 PINGs do not count). Requests in flight (long-polling /sync) are never cut.
    pub idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is PINGed to find dead peers.
    pub h2_keepalive_interval: Duration,
    /// Requests in flight to Synapse, and connections to it; over it: 503.
    pub upstream_max_connections: usize,
    /// Of those, what one client address (IPv6: its /64) may hold; over it: 503. A quarter of
    /// the cap from the config (`proxy::share_per_addr`).
    pub upstream_max_per_addr: usize,
    /// How long Synapse may take to start its answer once the request is sent; long-polls
    /// get their own `timeout` on top (see `proxy::head_timeout`).
    pub upstream_timeout: Duration,
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
            h2_keepalive_interval: Duration::from_secs(60),
            upstream_max_connections: 512,
            upstream_max_per_addr: 128,
            upstream_timeout: Duration::from_secs(180),
        }
    }
}

impl Limits {
    /// The defaults with the `[http]` keys of the config applied.
    pub fn from_config(cfg: &Config) -> Limits {
        let h = &cfg.http;
        Limits {
            idle_timeout: h.idle_timeout(),
            header_read_timeout: h.header_timeout(),
            upstream_max_connections: h.upstream_max_connections,
            upstream_max_per_addr: proxy::share_per_addr(h.upstream_max_connections),
            upstream_timeout: h.upstream_timeout(),
            ..Limits::default()
        }
    }

    /// With `max_connections` lowered to what `nofile` open files leave room for (see
    /// `fdlimit`): past the descriptors, `accept` fails for everyone and the cap, with its
    /// eviction of idle connections, would never be reached.
    pub fn fit_descriptors(mut self, nofile: u64) -> Limits {
        let fit = crate::fdlimit::connections_that_fit(
            nofile,
            self.upstream_max_connections as u64,
            self.max_connections as u64,
        ) as usize;
        if fit < self.max_connections {
            tracing::warn!(
                open_files = nofile,
                connections = fit,
                "the open-file limit leaves room for {fit} client connections, not {}; to serve more, raise LimitNOFILE= for homelab-matrix (systemctl edit homelab-matrix) and restart",
                self.max_connections
            );
            self.max_connections = fit;
        }
        self
    }
}

/// HTTP/2 limits, set explicitly rather than left to library defaults.
/// CVE-2023-44487 ("rapid reset": HEADERS then RST_STREAM at once, over and over) and
/// CVE-2025-8671 ("MadeYouReset": streams the server must reset itself) make a server do work
/// for streams the client never waits for; RFC 9113 §10.5 asks servers to limit that.
mod h2_limits {
    /// Streams reset by the client before we accepted them; past this the connection is
    /// closed with GOAWAY(ENHANCE_YOUR_CALM) (CVE-2023-44487). h2's own default.
    pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
    /// Streams we had to reset for the client's protocol errors, per connection
    /// (CVE-2025-8671). h2's own default.
    pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
    /// RFC 9113 §6.5.2 SETTINGS_MAX_HEADER_LIST_SIZE: 32 KiB, what nginx accepts by default
    /// (4 × 8k large_client_header_buffers); Synapse's Twisted takes 16 KiB.
    pub const MAX_HEADER_LIST_SIZE: u32 = 32 << 10;
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
    conns: Mutex<Conns>,
    /// The clock that connection times are counted from.
    epoch: Instant,
    element: Option<Arc<Element>>,
    matrixrtc: Option<Arc<crate::matrixrtc::Service>>,
    invite: crate::invite::Invite,
}

/// The open connections: counted in all and per address, and each one's activity, so that an
/// idle one can be closed to make room. Locked once when a connection opens and once when it
/// closes, never per request.
#[derive(Default)]
struct Conns {
    total: usize,
    per_addr: HashMap<IpAddr, usize>,
    /// By id; `counted` is false once the connection was evicted (its place already given on).
    live: HashMap<u64, (Arc<Activity>, bool)>,
    next_id: u64,
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
            upstream: proxy::Upstream::new(cfg.synapse.port, cfg.max_upload_bytes(), &limits),
            limits,
            conns: Mutex::new(Conns::default()),
            epoch: Instant::now(),
            element,
            matrixrtc: crate::matrixrtc::Service::from_config(
                cfg,
                &https_url(&cfg.hosts.matrix, https_port),
            )
            .map(Arc::new),
            invite: crate::invite::Invite::new(cfg, https_port),
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
                let activity = guard.activity.clone();
                this.connection(tcp, peer, kind, tls, activity, shutdown)
                    .await;
                active.fetch_sub(1, Ordering::Relaxed);
                drop(guard);
            });
        }
    }

    /// A place for a new connection from `ip`, or None when its address (block) is at its
    /// limit, or all places are taken by connections with requests in flight.
    fn admit(self: Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let addr = addr_key(ip);
        let mut c = self.conns.lock().unwrap();
        if c.per_addr.get(&addr).copied().unwrap_or(0) >= self.limits.max_connections_per_ip {
            return None;
        }
        if c.total >= self.limits.max_connections {
            // Full: the connection idle longest makes room (RFC 9112 §9.5 lets a server
            // close an idle connection at any time). One scan, only at the cap.
            let victim = c
                .live
                .iter()
                .filter(|(_, (a, counted))| *counted && a.idle())
                .min_by_key(|(_, (a, _))| a.idle_since.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            let (a, counted) = c.live.get_mut(&victim).expect("just found");
            *counted = false;
            a.evict.notify_one();
            c.total -= 1;
        }
        c.total += 1;
        *c.per_addr.entry(addr).or_insert(0) += 1;
        let id = c.next_id;
        c.next_id += 1;
        let activity = Arc::new(Activity::new(self.epoch));
        c.live.insert(id, (activity.clone(), true));
        drop(c);
        Some(ConnGuard {
            fd: self,
            addr,
            id,
            activity,
        })
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        kind: Listener,
        tls: Option<TlsAcceptor>,
        activity: Arc<Activity>,
        shutdown: watch::Receiver<bool>,
    ) {
        match tls {
            None => self.http(tcp, peer, kind, true, activity, shutdown).await,
            Some(acceptor) => {
                let stream = match tokio::time::timeout(
                    self.limits.tls_handshake_timeout,
                    acceptor.accept(tcp),
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
                let alpn = stream.get_ref().1.alpn_protocol();
                // A TLS-ALPN-01 validation connection ends after the handshake (RFC 8737 §3).
                if alpn == Some(crate::tls::ACME_TLS_ALPN) {
                    return;
                }
                let h1 = alpn != Some(b"h2");
                self.http(stream, peer, kind, h1, activity, shutdown).await
            }
        }
    }

    async fn http<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        kind: Listener,
        h1: bool,
        activity: Arc<Activity>,
        mut shutdown: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = self.limits;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's header_read_timeout also runs while a keep-alive connection waits for its
        // next request (hyper PR #3828), which would cut idle connections at 30 s: ours
        // (`Activity::head_since`) runs only while a head is being read.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(h2_limits::MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(h2_limits::MAX_LOCAL_ERROR_RESET_STREAMS)
            .max_header_list_size(h2_limits::MAX_HEADER_LIST_SIZE)
            .keep_alive_interval(Some(limits.h2_keepalive_interval))
            .keep_alive_timeout(Duration::from_secs(20));
        if h1 {
            // The first request head is due from the start (as nginx's client_header_timeout).
            activity.head_since.store(activity.now(), Ordering::Relaxed);
        }
        let this = self.clone();
        let act = activity.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            // Counted from here until the response body is done or dropped.
            let in_flight = InFlight::start(act.clone());
            async move {
                let resp = this.handle(req, peer.ip(), kind).await;
                Ok::<_, Infallible>(resp.map(|body| Holding {
                    body,
                    _keep: in_flight,
                }))
            }
        });
        let io = Tracked {
            inner: io,
            h1,
            activity: activity.clone(),
        };
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        // Once closing, a peer that does not finish the graceful close (GOAWAY, PING) is cut
        // after this, if it has no request in flight.
        const CLOSE_GRACE: Duration = Duration::from_secs(5);
        let mut closing: Option<Instant> = None;
        let tick = (limits.idle_timeout.min(limits.header_read_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut tick = tokio::time::interval(tick);
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    break;
                }
                _ = tick.tick() => {
                    if let Some(t) = closing {
                        // Never a request in flight (one may have begun as we closed).
                        if t.elapsed() >= CLOSE_GRACE && activity.idle() {
                            break;
                        }
                    } else if activity.head_overdue(limits.header_read_timeout) {
                        tracing::debug!(%peer, "request head not received in time");
                        break;
                    } else if activity.idle_for() >= limits.idle_timeout {
                        closing = Some(Instant::now());
                        conn.as_mut().graceful_shutdown();
                    }
                }
                _ = activity.evict.notified(), if closing.is_none() => {
                    tracing::debug!(%peer, "idle connection closed to admit a new one");
                    closing = Some(Instant::now());
                    conn.as_mut().graceful_shutdown();
                }
                _ = shutdown.wait_for(|s| *s), if closing.is_none() => {
                    closing = Some(Instant::now());
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
                let mut wk =
                    json!({"m.homeserver": {"base_url": self.base_url(&self.hosts.matrix)}});
                // MSC4143: only a focus that is there (an empty one breaks clients' calls).
                if let Some(rtc) = &self.matrixrtc {
                    wk["org.matrix.msc4143.rtc_foci"] = json!([rtc.focus()]);
                }
                let mut r = full(StatusCode::OK, "application/json", wk.to_string());
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
            Route::Invite => {
                let method = req.method().clone();
                let (parts, body) = self
                    .invite
                    .serve(&method, &path, req.into_body())
                    .await
                    .into_parts();
                Response::from_parts(parts, full_body(body))
            }
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
            Route::MatrixRtc => match &self.matrixrtc {
                Some(rtc) => matrixrtc_answer(rtc, req, &path).await,
                None => matrix_error(
                    StatusCode::NOT_FOUND,
                    "M_UNRECOGNIZED",
                    "no MatrixRTC focus here: group calls need a LiveKit server ([matrixrtc] in the config)",
                ),
            },
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

/// MatrixRTC's authorization service: a small JSON body in, JSON out, CORS open (Element
/// Call asks from its own origin, as lk-jwt-service allows).
async fn matrixrtc_answer(
    rtc: &crate::matrixrtc::Service,
    req: Request<Incoming>,
    path: &str,
) -> Response<Body> {
    const MAX_BODY: usize = 64 * 1024;
    let method = req.method().clone();
    let sub = path
        .strip_prefix(config::MATRIXRTC_PATH)
        .unwrap_or_default();
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return matrix_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                "the request body is over 64 KiB",
            );
        }
    };
    let a = rtc.answer(&method, sub, &body).await;
    let mut r = full(a.status, "application/json", a.body.to_string());
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, "Accept, Content-Type"),
    ] {
        r.headers_mut()
            .insert(name, header::HeaderValue::from_static(value));
    }
    r
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title></head><body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>{title}</h1><p>{body}</p></body></html>\n"
    )
}

/// The key a connection counts under for the per-address limit: the IPv4 address, or the
/// IPv6 /64 (RFC 6177: a host or site gets a /64 or more, so its addresses share one limit).
pub(crate) fn addr_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// Releases a connection's place in the limits when it ends.
struct ConnGuard {
    fd: Arc<FrontDoor>,
    addr: IpAddr,
    id: u64,
    activity: Arc<Activity>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.fd.conns.lock().unwrap();
        if let Some((_, counted)) = c.live.remove(&self.id)
            && counted
        {
            c.total -= 1;
        }
        if let Some(n) = c.per_addr.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                c.per_addr.remove(&self.addr);
            }
        }
    }
}

/// Milliseconds on a connection's clock: none set.
const NEVER: u64 = u64::MAX;

/// A connection's requests in flight and the times its idle and head timers started.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When `in_flight` last fell to 0 (ms since `epoch`).
    idle_since: AtomicU64,
    /// HTTP/1.x: when the request head now being read began, or NEVER.
    head_since: AtomicU64,
    /// Told when the connection is to close to make room for a new one.
    evict: Notify,
}

impl Activity {
    fn new(epoch: Instant) -> Activity {
        let a = Activity {
            epoch,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NEVER),
            evict: Notify::new(),
        };
        a.idle_since.store(a.now(), Ordering::Relaxed);
        a
    }
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }
    /// How long the connection has had no request in flight.
    fn idle_for(&self) -> Duration {
        if !self.idle() {
            return Duration::ZERO;
        }
        let since = self.idle_since.load(Ordering::Relaxed);
        Duration::from_millis(self.now().saturating_sub(since))
    }
    fn head_overdue(&self, limit: Duration) -> bool {
        let since = self.head_since.load(Ordering::Relaxed);
        since != NEVER && self.now().saturating_sub(since) >= limit.as_millis() as u64
    }
}

/// One request in flight on a connection: from the moment hyper hands it to us until its
/// response body is done or dropped (a reset HTTP/2 stream drops it).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.head_since.store(NEVER, Ordering::Relaxed);
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle_since.store(self.0.now(), Ordering::Relaxed);
        }
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

/// The connection's stream as hyper reads it: on HTTP/1.x, the first bytes read while no
/// request is in flight start the head timer.
struct Tracked<S> {
    inner: S,
    /// HTTP/1.x (from ALPN; plain HTTP is HTTP/1.x): h2 has no head timer.
    h1: bool,
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
        let a = &self.activity;
        if buf.filled().len() > before
            && self.h1
            && a.idle()
            && a.head_since.load(Ordering::Relaxed) == NEVER
        {
            a.head_since.store(a.now(), Ordering::Relaxed);
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_per_64_and_ipv4_per_address() {
        let k = |s: &str| addr_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_ne!(k("192.0.2.1"), k("192.0.2.2"));
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
    }
}
