//! The registration-token oracle, rate-limited per client address. Each `POST .../register`
//! that carries an `m.login.registration_token` stage, and each
//! `GET .../register/m.login.registration_token/validity`, tells whether one guessed token is
//! live (Matrix spec, client-server API "Token-authenticated registration"). Synapse limits
//! only the validity endpoint (`rc_registration_token_validity`); guesses through `/register`
//! itself got 401 after 401, never 429. So the front door gives every client address one
//! budget for both: a person signing up makes four such requests (the invite page's validity
//! check, then the three user-interactive auth steps), a guesser makes one per guess.
//!
//! The body is not read (a layer sees the request before it streams): every `POST /register`
//! counts, which is what a guesser must send too. The hot path pays a path comparison; only
//! these requests take the lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::layers::Layer;
use super::transport::addr_key;
use super::{Body, Cx, full, read_body};

/// Requests at once per address: two people behind one NAT signing up together, each with a
/// retry, fit.
pub const BURST: u32 = 10;
/// One more every this long: three guesses a minute, 4,320 a day, against a token of 16+
/// random characters.
pub const REFILL: Duration = Duration::from_secs(20);
/// A refused guess is read up to this much, for at most this long, before its 429.
const DRAIN_MAX: usize = 64 * 1024;
const DRAIN_WITHIN: Duration = Duration::from_secs(10);
/// Addresses remembered at most (a few hundred KB): past it, full buckets go first (they
/// are as good as forgotten), then the longest idle.
const MAX_ADDRESSES: usize = 10_000;

/// The client-server register endpoints (any API version) this counts.
fn counted(method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/_matrix/client/") else {
        return false;
    };
    let Some((_version, tail)) = rest.split_once('/') else {
        return false;
    };
    (method == Method::POST && tail == "register")
        || (method == Method::GET && tail == "register/m.login.registration_token/validity")
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() / REFILL.as_secs_f64();
        (self.tokens + gained).min(f64::from(BURST))
    }
}

#[derive(Default)]
pub struct RegistrationLimit {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RegistrationLimit {
    /// Takes one request from `ip`'s budget at `now`: None when it may go on, or how long
    /// until it may.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let k = addr_key(ip);
        if !b.contains_key(&k) && b.len() >= MAX_ADDRESSES {
            b.retain(|_, v| v.refilled(now) < f64::from(BURST));
            if b.len() >= MAX_ADDRESSES
                && let Some(oldest) = b.iter().min_by_key(|(_, v)| v.at).map(|(k, _)| *k)
            {
                b.remove(&oldest);
            }
        }
        let bucket = b.entry(k).or_insert(Bucket {
            tokens: f64::from(BURST),
            at: now,
        });
        let tokens = bucket.refilled(now);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            None
        } else {
            Some(REFILL.mul_f64(1.0 - tokens))
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// The Matrix spec's answer to a client over its limit: 429, `M_LIMIT_EXCEEDED` with
/// `retry_after_ms`, and `Retry-After` in seconds (RFC 9110 §10.2.3).
fn too_many(wait: Duration) -> Response<Body> {
    let ms = wait.as_millis().max(1);
    let mut r = full(
        StatusCode::TOO_MANY_REQUESTS,
        "application/json",
        json!({
            "errcode": "M_LIMIT_EXCEEDED",
            "error": "too many registration attempts from this address; wait and try again",
            "retry_after_ms": ms as u64,
        })
        .to_string(),
    );
    let secs = ms.div_ceil(1000).to_string();
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&secs).expect("digits"),
    );
    r
}

impl Layer for RegistrationLimit {
    fn request(&self, req: Request<Body>, cx: &Cx) -> super::layers::Step {
        use super::layers::Step;
        if !counted(req.method(), req.uri().path()) {
            return Step::Next(req);
        }
        match self.take(cx.peer, Instant::now()) {
            None => Step::Next(req),
            Some(wait) => {
                tracing::debug!(peer = %cx.peer, "registration attempts over the limit: 429");
                Step::Later(Box::pin(async move {
                    // The guess (a few hundred bytes) is read before the 429's headers go out:
                    // curl stops sending on an error status that comes first and ends the
                    // stream short of its Content-Length, which HTTP/2 resets as a protocol
                    // error (RFC 9113 §8.1.1), so the client sees the reset, not the 429.
                    let body = req.into_body();
                    let _ = tokio::time::timeout(DRAIN_WITHIN, read_body(body, DRAIN_MAX)).await;
                    too_many(wait)
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_oracles_count() {
        for (m, p) in [
            (Method::POST, "/_matrix/client/v3/register"),
            (Method::POST, "/_matrix/client/r0/register"),
            (
                Method::GET,
                "/_matrix/client/v1/register/m.login.registration_token/validity",
            ),
        ] {
            assert!(counted(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::GET, "/_matrix/client/v3/register/available"),
            (Method::POST, "/_matrix/client/v3/login"),
            (Method::GET, "/_matrix/client/v3/register"),
            (Method::POST, "/_matrix/client/v3/registerx"),
            (Method::POST, "/register"),
        ] {
            assert!(!counted(&m, p), "{m} {p}");
        }
    }

    #[test]
    fn a_burst_then_one_per_refill_per_address_and_per_64() {
        let l = RegistrationLimit::default();
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for i in 0..BURST {
            assert_eq!(l.take(a, t), None, "request {i}");
        }
        let wait = l.take(a, t).expect("over the burst");
        assert!(wait <= REFILL && wait > REFILL / 2, "{wait:?}");
        // Another address has its own budget; the same /64 shares one.
        assert_eq!(l.take("192.0.2.2".parse().unwrap(), t), None);
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..BURST {
            assert_eq!(l.take(v6a, t), None);
        }
        assert!(l.take(v6b, t).is_some());
        // One refill later, one more.
        assert_eq!(l.take(a, t + REFILL), None);
        assert!(l.take(a, t + REFILL).is_some());
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_addresses() {
        let l = RegistrationLimit::default();
        let t = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 500) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = l.take(ip, t);
        }
        assert!(l.len() <= MAX_ADDRESSES, "{}", l.len());
    }

    /// A request body the test sends piece by piece.
    struct Sent(tokio::sync::mpsc::Receiver<bytes::Bytes>);
    impl hyper::body::Body for Sent {
        type Data = bytes::Bytes;
        type Error = super::super::BoxError;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }

    /// Over the limit, the guess is read to its end before the 429 exists (its headers would
    /// otherwise go out first, and curl would stop sending).
    #[tokio::test]
    async fn the_429_comes_after_the_guess_is_read() {
        use http_body_util::BodyExt;
        let l = RegistrationLimit::default();
        let cx = Cx {
            peer: "198.51.100.7".parse().unwrap(),
            listener: super::super::Listener::Https,
            host: "matrix.example.com".into(),
            authority: "matrix.example.com".into(),
        };
        for _ in 0..BURST {
            let _ = l.take(cx.peer, Instant::now());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = Request::post("/_matrix/client/v3/register")
            .body(Sent(rx).boxed())
            .unwrap();
        let super::super::layers::Step::Later(mut answer) = l.request(req, &cx) else {
            panic!("not answered later");
        };
        tx.send(bytes::Bytes::from_static(b"{\"auth\":"))
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), &mut answer).await;
        assert!(early.is_err(), "answered before the request ended");
        drop(tx);
        let resp = answer.await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().contains_key(header::RETRY_AFTER));
        // Past the cap it answers without reading the rest.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(bytes::Bytes::from(vec![b'x'; DRAIN_MAX + 1]))
            .await
            .unwrap();
        let req = Request::post("/_matrix/client/v3/register")
            .body(Sent(rx).boxed())
            .unwrap();
        let super::super::layers::Step::Later(answer) = l.request(req, &cx) else {
            panic!("not answered later");
        };
        let resp = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .expect("answered past the cap");
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        drop(tx);
    }
}
