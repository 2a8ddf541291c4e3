//! The reverse proxy to Synapse, following Synapse's docs/reverse_proxy.md: the request URI is
//! passed on byte for byte ("must not canonicalise or normalise the requested URI in any way":
//! federation signatures cover it), bodies stream both ways. X-Forwarded-* and the body limit
//! are layers in front of it (`layers::ForwardedHeaders`, `layers::BodyLimit`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::balance;
use super::layers::BodyLimit;
use super::wire;
use super::{Body, Handler, Holding, Limits, answer_early, full, handler, matrix_error};

/// The longest long-poll `timeout` we wait out. Synapse itself sets no maximum (its
/// `rest/client/sync.py` takes `timeout` as given); clients ask for 30 s (matrix-js-sdk,
/// matrix-rust-sdk).
const MAX_LONG_POLL: Duration = Duration::from_secs(600);

/// Two classes of requests to Synapse, each with its own cap and per-address share: ordinary
/// requests, which make Synapse work, and long-polls (`/sync` with a `timeout`), which mostly
/// wait. A long-poll costs Synapse next to nothing while it waits (a listener on its
/// notifier), but holds a request and a connection for its whole timeout: 5,000 idle clients
/// are 5,000 long-polls. Under one cap they would lock ordinary requests out (or, capped low,
/// refuse the clients); apart, each class is capped by what it costs.
///
/// Both go through one `wire::Pool`: the exchange runs in the client's own task, with no
/// connection task to hand the request to and back (hyper's pooled client does that; on the
/// HTTP/1.1 path it cost about a fifth of the front door's CPU per request), and a waiting
/// long-poll holds no buffer. A connection is open only for a request in flight or idle in
/// the pool, so connections never outnumber the requests in flight plus the idle ones.
pub struct Upstream {
    ordinary: Class,
    long_polls: Class,
    /// One per Synapse process: the main one first, then the workers (`balance`).
    pools: Vec<Arc<wire::Pool>>,
    /// Which process answers what, when there are workers.
    balancer: Option<balance::Balancer>,
    max_body: u64,
    timeout: Duration,
    /// Requests whose client went away (h1 close, h2 RST_STREAM, TLS close) before Synapse
    /// answered: each one's connection to Synapse was closed with it, so Synapse (1.149+)
    /// cancels the work, a /sync long-poll included.
    abandoned: AtomicU64,
}

/// What `status` shows of the way to Synapse.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UpstreamStatus {
    /// Ordinary requests in flight to Synapse, and the cap on them.
    pub requests: usize,
    pub requests_cap: usize,
    /// Long-polls (`/sync` with a timeout) held open at Synapse.
    pub long_polls: usize,
    /// Requests given up by their clients before Synapse answered, since the start.
    pub abandoned: u64,
}

/// Counts a request as abandoned unless it is disarmed: the forward future is dropped (its
/// client went away) while it waits on Synapse.
struct AbandonWatch<'a> {
    counter: &'a AtomicU64,
    armed: bool,
}

impl Drop for AbandonWatch<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One class's cap and shares.
struct Class {
    /// One permit per request in flight to Synapse.
    requests: Arc<Semaphore>,
    cap: usize,
    /// Requests in flight per client address, at most `share` each.
    per_addr: Arc<Mutex<HashMap<IpAddr, usize>>>,
    share: usize,
}

impl Class {
    fn new(cap: usize, share: usize) -> Class {
        Class {
            requests: Arc::new(Semaphore::new(cap)),
            cap,
            per_addr: Arc::default(),
            share,
        }
    }

    /// A place for one request from `peer`, or None over the cap or the address's share.
    fn admit(&self, peer: IpAddr) -> Option<(OwnedSemaphorePermit, Share)> {
        let share = Share::take(&self.per_addr, super::addr_key(peer), self.share)?;
        let permit = self.requests.clone().try_acquire_owned().ok()?;
        Some((permit, share))
    }

    fn in_flight(&self) -> usize {
        self.cap - self.requests.available_permits()
    }
}

impl Upstream {
    pub fn new(port: u16, max_body: u64, limits: &Limits) -> Upstream {
        Upstream::balanced(&[port], None, max_body, limits)
    }

    /// Synapse with workers: `ports[0]` is the main process's, `ports[i]` backend `i` of the
    /// balancer. The caps and shares are the same as for one process: they protect the box,
    /// not one process.
    pub fn balanced(
        ports: &[u16],
        balancer: Option<balance::Balancer>,
        max_body: u64,
        limits: &Limits,
    ) -> Upstream {
        let cap = limits.upstream_max_connections;
        // Half the ordinary places kept open between requests: 160 streams in flight
        // (h2load -c 16 -m 10) over 64 idle connections closed and reopened connections
        // all the time. A /sync that returns is followed by the client's next at once.
        // With workers, that half is shared out among their pools.
        let idle = cap.div_ceil(2).div_ceil(ports.len().max(1)).max(1);
        Upstream {
            ordinary: Class::new(cap, limits.upstream_share_per_addr()),
            // As many long-polls as client connections (and per address, as many as one
            // address may hold connections): one /sync per client is what clients do.
            long_polls: Class::new(limits.max_connections, limits.max_connections_per_ip),
            pools: ports
                .iter()
                .map(|&p| wire::Pool::new(SocketAddr::from(([127, 0, 0, 1], p)), idle))
                .collect(),
            balancer,
            max_body,
            timeout: limits.upstream_timeout,
            abandoned: AtomicU64::new(0),
        }
    }

    pub fn status(&self) -> UpstreamStatus {
        UpstreamStatus {
            requests: self.ordinary.in_flight(),
            requests_cap: self.ordinary.cap,
            long_polls: self.long_polls.in_flight(),
            abandoned: self.abandoned.load(Ordering::Relaxed),
        }
    }

    /// The handler for the Synapse route (registered behind `BodyLimit` and
    /// `ForwardedHeaders`).
    pub fn handler(self: Arc<Self>) -> Handler {
        handler(move |req, cx| {
            let this = self.clone();
            async move { this.forward(req, cx.peer).await }
        })
    }

    /// The balancer's health flag of backend `i` (for whoever supervises the workers).
    pub fn health(&self, i: usize) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.balancer.as_ref().map(|b| b.health(i))
    }

    pub async fn forward(&self, req: Request<Body>, peer: IpAddr) -> Response<Body> {
        let pool = match &self.balancer {
            None => &self.pools[0],
            Some(b) => match b.pick(req.uri(), req.headers(), peer) {
                balance::Pick::Backend(i) => &self.pools[i],
                // Never a hang: the one process that serves it is restarting.
                balance::Pick::Unavailable => {
                    return answer_early(worker_down(), req.into_body()).await;
                }
            },
        };
        let wait = long_poll_wait(req.uri());
        let class = if wait.is_some() {
            &self.long_polls
        } else {
            &self.ordinary
        };
        // Over the cap Synapse is not asked at all (RFC 9110 §15.6.4: 503 with Retry-After).
        let Some(permit) = class.admit(peer) else {
            return answer_early(busy(), req.into_body()).await;
        };
        let (mut parts, body) = req.into_parts();
        stable_alias(&mut parts.uri);
        let inbound_version = parts.version;
        let head_timeout = head_timeout(self.timeout, wait);
        // For the log, copied: the request's own Uri (like its header values) shares hyper's
        // HTTP/1.1 read buffer, which a clone held across the wait would keep from being
        // reused, 8 KiB more for every held long-poll.
        let path: Box<str> = parts.uri.path().into();
        // Twisted speaks HTTP/1.1 only; the request line carries the path and query exactly
        // as received (`wire` writes `uri.path_and_query()`).
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        // hyper answers "100 Continue" to our client itself when it reads the body.
        parts.headers.remove(header::EXPECT);
        // Sent again on a fresh connection if a kept one closes under it: only what may be
        // repeated (RFC 9110 §9.2.2), and /sync, which reads.
        let resend = wait.is_some() || idempotent(&parts.method);
        let mut watch = AbandonWatch {
            counter: &self.abandoned,
            armed: true,
        };
        let result = pool.send(parts, body, head_timeout, resend).await;
        watch.armed = false;
        match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = inbound_version;
                // The request's place is held until its answer has gone through.
                Response::from_parts(
                    parts,
                    Holding {
                        body,
                        _keep: permit,
                    }
                    .boxed(),
                )
            }
            Err(wire::Error::Body(e)) if BodyLimit::caused(&*e) => {
                BodyLimit::too_large(self.max_body)
            }
            // The client's own body broke (a bad chunk, a reset): its fault, not Synapse's,
            // and not worth a warning anyone could write at will (RFC 9112 §7.1: 400).
            Err(wire::Error::Body(e)) => {
                tracing::debug!(%peer, "the request body to {path} broke off: {e}");
                super::bad_request(&path, "the request body is malformed or broke off")
            }
            Err(wire::Error::TimedOut(_)) => {
                tracing::warn!("Synapse did not answer {path} within {head_timeout:?}");
                matrix_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "M_UNKNOWN",
                    "Synapse did not answer in time; try again in a moment",
                )
            }
            Err(e) => {
                tracing::warn!("proxying {path} to Synapse: {e}");
                matrix_error(
                    StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    "Synapse is not answering right now (it may be restarting); try again in a moment",
                )
            }
        }
    }
}

/// RFC 9110 §9.2.2.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

/// How many requests in flight to Synapse one client address may hold: a quarter of the cap.
/// Requests with a trickling body or a long-poll hold their place as long as they last, so
/// without a share one client could hold every place and lock all others out (503). Generous
/// for a household behind one NAT address (each client holds two or three).
pub fn share_per_addr(cap: usize) -> usize {
    cap.div_ceil(4).max(1)
}

/// One request's place in its address's share; given back when dropped.
struct Share {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    addr: IpAddr,
}

impl Share {
    fn take(
        counts: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        addr: IpAddr,
        max: usize,
    ) -> Option<Share> {
        let mut c = counts.lock().unwrap();
        let n = c.entry(addr).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Share {
            counts: counts.clone(),
            addr,
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap();
        if let Some(n) = c.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.addr);
            }
        }
    }
}

/// 503 when the cap on requests to Synapse is reached. The Matrix spec's M_LIMIT_EXCEEDED
/// with `retry_after_ms`, and Retry-After (spec v1.10+ and RFC 9110 §10.2.3).
fn busy() -> Response<Body> {
    unavailable(
        "M_LIMIT_EXCEEDED",
        "this server has too many requests in flight to Synapse; retry in a moment",
        1,
    )
}

/// 503 for a request only a worker that is down can answer (a stream's writer, the media
/// repository): Retry-After, as for `busy`; the supervisor is restarting it.
fn worker_down() -> Response<Body> {
    unavailable(
        "M_UNKNOWN",
        "the Synapse process that serves this is restarting; retry in a few seconds",
        5,
    )
}

fn unavailable(errcode: &str, error: &str, retry_secs: u64) -> Response<Body> {
    let mut r = full(
        StatusCode::SERVICE_UNAVAILABLE,
        "application/json",
        json!({"errcode": errcode, "error": error, "retry_after_ms": retry_secs * 1000})
            .to_string(),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs));
    r
}

/// How long a long-poll (`/sync`, its sliding-sync variants and the legacy `/events`) asked
/// Synapse to wait, from its `timeout` in ms (Matrix spec, client-server API "GET /sync"), up to
/// MAX_LONG_POLL; None for anything else, and for a `/sync` that does not wait (no or a zero
/// `timeout`: Synapse answers at once).
pub fn long_poll_wait(uri: &Uri) -> Option<Duration> {
    let path = uri.path();
    let long_poll = path.starts_with("/_matrix/client/")
        && matches!(path.rsplit('/').next(), Some("sync" | "events"));
    if !long_poll {
        return None;
    }
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("timeout="))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(|ms| Duration::from_millis(ms).min(MAX_LONG_POLL))
}

/// How long Synapse may take to start answering: `base`, plus a long-poll's wait.
pub fn head_timeout(base: Duration, long_poll: Option<Duration>) -> Duration {
    base + long_poll.unwrap_or(Duration::ZERO)
}

/// RFC 9110 §7.6.1: Connection and the fields it names are for one hop only, as are the
/// classic hop-by-hop fields (RFC 2616 §13.5.1).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The common case, none there: one pass over the fields, comparing names already parsed
    // (a lookup by `&str` parses the name each time).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = wire::connection_tokens(headers)
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k))
        .cloned()
        .collect();
    for n in hop {
        headers.remove(n);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHORIZATION
        || *name == header::PROXY_AUTHENTICATE
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// MSC4143's stable `GET /_matrix/client/v1/rtc/transports`, which Element X asks first:
/// Synapse (to 1.163 at least) serves only the unstable path (synapse#19652), so the stable
/// one is sent there and both answer alike (a 404 from both while no focus is configured).
const RTC_TRANSPORTS: (&str, &str) = (
    "/_matrix/client/v1/rtc/transports",
    "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports",
);

fn stable_alias(uri: &mut Uri) {
    let (stable, unstable) = RTC_TRANSPORTS;
    if uri.path() != stable {
        return;
    }
    let target = match uri.query() {
        Some(q) => format!("{unstable}?{q}"),
        None => unstable.to_string(),
    };
    if let Ok(t) = target.parse() {
        *uri = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stable_transports_path_reaches_synapse_s_unstable_one() {
        let go = |u: &str| {
            let mut uri: Uri = u.parse().unwrap();
            stable_alias(&mut uri);
            uri.to_string()
        };
        assert_eq!(
            go("/_matrix/client/v1/rtc/transports"),
            "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"
        );
        assert_eq!(
            go("/_matrix/client/v1/rtc/transports?x=1"),
            "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports?x=1"
        );
        for other in [
            "/_matrix/client/v1/rtc/transports/x",
            "/_matrix/client/v3/sync",
        ] {
            assert_eq!(go(other), other);
        }
    }

    #[test]
    fn long_polls_get_their_timeout_on_top_up_to_the_cap() {
        let base = Duration::from_secs(180);
        let t = |u: &str| head_timeout(base, long_poll_wait(&u.parse().unwrap()));
        assert_eq!(t("/_matrix/client/v3/rooms/x/messages?timeout=30000"), base);
        assert_eq!(
            t("/_matrix/client/v3/sync?since=s&timeout=30000"),
            base + Duration::from_secs(30)
        );
        assert_eq!(
            t("/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=5000"),
            base + Duration::from_secs(5)
        );
        assert_eq!(
            t("/_matrix/client/r0/events?timeout=1000"),
            base + Duration::from_secs(1)
        );
        assert_eq!(t("/_matrix/client/v3/sync"), base);
        assert_eq!(t("/_matrix/client/v3/sync?timeout=x"), base);
        assert_eq!(
            t("/_matrix/client/v3/sync?timeout=86400000"),
            base + MAX_LONG_POLL
        );
        assert_eq!(t("/_matrix/federation/v1/sync?timeout=9000"), base);
    }

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
