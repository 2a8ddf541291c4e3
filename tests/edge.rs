//! HTTP semantics at the edge, as the RFCs say (issue #28 item 7): what a client gets for a
//! request that is its own fault, and that none of it reaches the upstream or writes a
//! warning. The front door runs in-process in front of a recording upstream; the requests are
//! written byte by byte over real TLS (HTTP/1.1) or with the h2 crate (HTTP/2).

// This test process drives curl from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::frontdoor::{Door, HOST, Recorder, door_with, run};
use homelab_matrix::http::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes `raw` on a new HTTP/1.1-over-TLS connection and reads the answer until the server
/// closes (each request says `Connection: close`) or 10 s pass.
async fn h1(d: &Door, raw: &[u8]) -> String {
    let (mut tls, _, _) = common::tls_alpn(d.https, HOST, &d.ca_pem, b"http/1.1").await;
    // A server that answers before the whole request is in may close under the writer.
    let _ = tls.write_all(raw).await;
    let _ = tls.flush().await;
    let mut got = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

fn status(answer: &str) -> &str {
    answer.split(' ').nth(1).unwrap_or("(no answer)")
}

/// A POST to Synapse with a chunked body of `chunks` (raw bytes after the head).
fn chunked(chunks: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /_matrix/client/v3/rooms/r/send/m.room.message/t HTTP/1.1\r\nHost: {HOST}\r\n\
         Transfer-Encoding: chunked\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    r.extend_from_slice(chunks);
    r
}

fn get(target: &str, headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n").into_bytes()
}

/// Asserts the upstream has seen `n` requests, after giving a stray one time to arrive.
async fn upstream_saw(rec: &Recorder, n: usize, what: &str) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = rec.seen.lock().unwrap();
    assert_eq!(seen.len(), n, "{what}: the upstream saw {:#?}", seen.last());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_the_clients_fault_get_4xx_never_reach_the_upstream_nor_warn() {
    common::capture::install();
    let (rec, d) = door_with(Limits::default()).await;
    let versions = "/_matrix/client/versions";

    // Sanity: a good request goes through, so the refusals below are the front door's.
    let ok = h1(&d, &get(versions, &format!("Host: {HOST}\r\n"))).await;
    assert_eq!(status(&ok), "200", "{ok}");
    upstream_saw(&rec, 1, "a good request").await;

    // Broken chunked bodies (RFC 9112 §7.1): the client's fault, so 400, not "Synapse is not
    // answering". The head may have gone on; the request never completes there.
    let long_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(100_000));
    for (what, body) in [
        (
            "a chunk size past u64",
            &b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"[..],
        ),
        ("a 100 KB chunk extension", long_ext.as_bytes()),
        ("bare LF chunk lines", &b"5\nhello\n0\n\n"[..]),
        (
            "a chunk size that is not hex",
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        ),
    ] {
        let a = h1(&d, &chunked(body)).await;
        assert_eq!(status(&a), "400", "{what}: {a}");
        assert!(!a.contains("Synapse is not answering"), "{what}: {a}");
    }
    upstream_saw(&rec, 1, "broken bodies").await;

    // Header size: the same 32 KiB cap on a request head over HTTP/1.1 as over HTTP/2
    // (RFC 6585 §5: 431), answered here instead of forwarded for Synapse to drop.
    let big = |n: usize| format!("Host: {HOST}\r\nX-Big: {}\r\n", "a".repeat(n));
    let a = h1(&d, &get(versions, &big(20_000))).await;
    assert_eq!(status(&a), "200", "a 20 KB header is under the cap: {a}");
    upstream_saw(&rec, 2, "a 20 KB header").await;
    for n in [40_000, 70_000, 300_000] {
        let a = h1(&d, &get(versions, &big(n))).await;
        assert_eq!(status(&a), "431", "a {n} B header over HTTP/1.1: {a}");
    }
    for (n, want) in [(20_000, "200"), (40_000, "431")] {
        let mut c = d.curl();
        c.args([
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .args(["-H", &format!("X-Big: {}", "a".repeat(n))])
        .arg(format!("https://{HOST}:{}{versions}", d.https));
        let (out, err) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
        assert_eq!(
            out,
            format!("2 {want}"),
            "a {n} B header over HTTP/2: {err}"
        );
    }
    upstream_saw(&rec, 3, "big headers").await;

    // Host (RFC 9112 §3.2): exactly one, valid, on every HTTP/1.1 request.
    for (what, headers) in [
        ("no Host", String::new()),
        (
            "two Host fields",
            format!("Host: {HOST}\r\nHost: {HOST}\r\n"),
        ),
        (
            "two different Hosts",
            format!("Host: {HOST}\r\nHost: other.example\r\n"),
        ),
        ("a Host with a path", format!("Host: {HOST}/x\r\n")),
    ] {
        let a = h1(&d, &get(versions, &headers)).await;
        assert_eq!(status(&a), "400", "{what}: {a}");
    }
    upstream_saw(&rec, 3, "bad Host fields").await;

    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2): routed by it.
    let other = h1(
        &d,
        &get(
            &format!("https://other.example{versions}"),
            &format!("Host: {HOST}\r\n"),
        ),
    )
    .await;
    assert_eq!(status(&other), "404", "a target for another host: {other}");
    upstream_saw(&rec, 3, "an absolute-form target for another host").await;
    let ours = h1(
        &d,
        &get(
            &format!("https://{HOST}:{}{versions}", d.https),
            "Host: other.example\r\n",
        ),
    )
    .await;
    assert_eq!(status(&ours), "200", "a target for us: {ours}");
    upstream_saw(&rec, 4, "an absolute-form target for us").await;
    let head = rec.seen.lock().unwrap()[3].head.to_ascii_lowercase();
    assert!(
        head.starts_with(&format!("get {versions} http/1.1\r\n")),
        "origin-form upstream: {head}"
    );
    assert!(
        head.contains(&format!("\r\nhost: {HOST}:{}\r\n", d.https)) && !head.contains("other."),
        "the upstream gets the target's authority as Host: {head}"
    );

    // HTTP/2: a `host` that names another authority than `:authority` is malformed
    // (RFC 9113 §8.3.1); one that agrees is served.
    let (tls, _, _) = common::h2_tls(d.https, HOST, &d.ca_pem).await;
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    for (host, want) in [("other.example", 400), (HOST, 200)] {
        let mut client = client.clone().ready().await.unwrap();
        let req = http::Request::get(format!("https://{HOST}{versions}"))
            .header("host", host)
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("an answer")
            .expect("an answer, not a reset");
        assert_eq!(resp.status(), want, "h2 with host: {host}");
    }
    upstream_saw(&rec, 5, "h2 host checks").await;

    // None of it is worth a warning: any client could write those into the journal at will.
    let loud: Vec<_> = common::capture::all()
        .into_iter()
        .filter(|e| matches!(e.level, tracing::Level::WARN | tracing::Level::ERROR))
        .collect();
    assert!(loud.is_empty(), "warnings from client mistakes: {loud:#?}");
    let _ = d.stop.send(true);
}
