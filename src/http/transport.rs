//! The transport: listeners, TLS, connection limits and lifetimes (idle, slow heads, eviction
//! at the cap, graceful close) and the HTTP/1.1 and HTTP/2 protocol settings. What a request
//! gets for an answer is the [`App`]'s business; nothing here looks inside requests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use super::Listener;
use super::{Body, Holding};
use crate::config::Config;
use crate::fdlimit::AcceptBackoff;

/// What answers the requests the connections carry.
pub trait App: Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        listener: Listener,
    ) -> impl Future<Output = Response<Body>> + Send;
}

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
    /// Of those, what one client address (IPv6: its /64) may hold; over it: 503. None (the
    /// default, and what the config gives): derived from the cap, see
    /// [`Limits::upstream_share_per_addr`].
    pub upstream_max_per_addr: Option<usize>,
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
            upstream_max_per_addr: None,
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
            upstream_timeout: h.upstream_timeout(),
            ..Limits::default()
        }
    }

    /// What one client address (IPv6: its /64) may hold of the requests in flight to
    /// Synapse: a quarter of the cap (`proxy::share_per_addr`) unless set.
    pub fn upstream_share_per_addr(&self) -> usize {
        self.upstream_max_per_addr
            .unwrap_or_else(|| super::proxy::share_per_addr(self.upstream_max_connections))
    }

    /// With `max_connections` lowered to what `nofile` open files leave room for (see
    /// `fdlimit`): past the descriptors, `accept` fails for everyone and the cap, with its
    /// eviction of idle connections, would never be reached.
    pub fn fit_descriptors(mut self, nofile: u64) -> Limits {
        // Each client connection may hold a long-poll, and with it a connection to Synapse
        // (`proxy::Upstream`): two descriptors per client.
        let fit = crate::fdlimit::connections_that_fit(
            nofile,
            self.upstream_max_connections as u64,
            2 * self.max_connections as u64,
        ) as usize
            / 2;
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

async fn bind(addr: &crate::config::Setting<SocketAddr>, key: &str) -> Result<TcpListener> {
    let sa = addr.v();
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

/// The listeners' shared state: limits, the open connections, the TLS settings and the app.
pub struct Transport<A: App> {
    app: Arc<A>,
    tls: TlsAcceptor,
    limits: Limits,
    conns: Mutex<Conns>,
    /// The clock that connection times are counted from.
    epoch: Instant,
}

impl<A: App> Transport<A> {
    pub fn new(app: Arc<A>, tls: TlsAcceptor, limits: Limits) -> Arc<Transport<A>> {
        Arc::new(Transport {
            app,
            tls,
            limits,
            conns: Mutex::new(Conns::default()),
            epoch: Instant::now(),
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
        let tls = self.tls.clone();
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
        // EMFILE and friends leave the connection queued: pace the retries, log once a run.
        let mut backoff = AcceptBackoff::default();
        let what = format!("the {kind:?} listener");
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => {
                    backoff.recovered(&what);
                    x
                }
                Err(e) => {
                    backoff.pause(&what, &e).await;
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
    fn admit(self: Arc<Self>, ip: IpAddr) -> Option<ConnGuard<A>> {
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
        shutdown: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = self.limits;
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
                let resp = this.app.handle(req, peer.ip(), kind).await;
                Ok::<_, Infallible>(resp.map(|body| Holding {
                    body,
                    _keep: in_flight,
                }))
            }
        });
        let io = TokioIo::new(Tracked {
            inner: io,
            h1,
            activity: activity.clone(),
        });
        // ALPN chose the protocol (RFC 9113 §3.2: h2 over TLS only through ALPN; :80 is
        // HTTP/1.x), so hyper need not read ahead for the h2 preface first.
        if h1 {
            let mut b = hyper::server::conn::http1::Builder::new();
            // hyper's header_read_timeout also runs while a keep-alive connection waits for
            // its next request (hyper PR #3828), which would cut idle connections at 30 s:
            // ours (`Activity::head_since`) runs only while a head is being read.
            b.timer(TokioTimer::new())
                .header_read_timeout(None)
                .keep_alive(true)
                // The same cap on a request head as HTTP/2's: past it hyper answers 431
                // (RFC 6585 §5) instead of buffering up to its ~400 KiB default.
                .max_header_size(h2_limits::MAX_HEADER_LIST_SIZE as usize);
            let conn = b.serve_connection(io, svc);
            drive(
                conn,
                |c| c.graceful_shutdown(),
                peer,
                limits,
                activity,
                shutdown,
            )
            .await;
        } else {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .max_concurrent_streams(limits.h2_max_concurrent_streams)
                .max_pending_accept_reset_streams(h2_limits::MAX_PENDING_ACCEPT_RESET_STREAMS)
                .max_local_error_reset_streams(h2_limits::MAX_LOCAL_ERROR_RESET_STREAMS)
                .max_header_list_size(h2_limits::MAX_HEADER_LIST_SIZE)
                .keep_alive_interval(Some(limits.h2_keepalive_interval))
                .keep_alive_timeout(Duration::from_secs(20));
            let conn = b.serve_connection(io, svc);
            drive(
                conn,
                |c| c.graceful_shutdown(),
                peer,
                limits,
                activity,
                shutdown,
            )
            .await;
        }
    }
}

/// Serves one connection until it ends: closes it gracefully (`close`) once idle for the idle
/// timeout, when evicted to make room, or at shutdown; cuts it when a request head is overdue,
/// or when a closing peer does not finish the close.
async fn drive<C>(
    conn: C,
    close: impl Fn(Pin<&mut C>),
    peer: SocketAddr,
    limits: Limits,
    activity: Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
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
                    close(conn.as_mut());
                }
            }
            _ = activity.evict.notified(), if closing.is_none() => {
                tracing::debug!(%peer, "idle connection closed to admit a new one");
                closing = Some(Instant::now());
                close(conn.as_mut());
            }
            _ = shutdown.wait_for(|s| *s), if closing.is_none() => {
                closing = Some(Instant::now());
                close(conn.as_mut());
            }
        }
    }
}

/// The key a connection counts under for the per-address limit: the IPv4 address, or the
/// IPv6 /64 (RFC 6177: a host or site gets a /64 or more, so its addresses share one limit).
pub fn addr_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// Releases a connection's place in the limits when it ends.
struct ConnGuard<A: App> {
    fd: Arc<Transport<A>>,
    addr: IpAddr,
    id: u64,
    activity: Arc<Activity>,
}

impl<A: App> Drop for ConnGuard<A> {
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
