//! The front door in front of a recording upstream: asserts on the exact bytes the upstream
//! receives (path, headers, version, body), which Synapse would not let us see. The front door
//! runs in-process from the library; clients are curl and openssl, real TLS clients.

// This test process drives curl and openssl from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use common::frontdoor::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use homelab_matrix::config::Config;
use homelab_matrix::http::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_the_path_byte_for_byte_and_our_forwarding_headers() {
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "127.0.0.1").await;
    let path = "/_matrix/client/v3/rooms/%21abc%3Aexample.test/state/m.room.member/%40u%3Aexample.test?filter=%7B%22a%22%3A1%7D&x=%2F..%2F";
    let mut c = d.curl();
    c.args([
        "--http2",
        "-w",
        "%{http_version} %{http_code}",
        "--path-as-is",
    ])
    .args([
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        "-H",
        "X-Forwarded-Proto: http",
        "-H",
        "Forwarded: for=203.0.113.9",
    ])
    .args(["-H", "Authorization: Bearer tok"])
    .arg(format!("https://{HOST}:{}{path}", d.https));
    let (out, err) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
    assert_eq!(out, "ok2 200", "{err}");
    let seen = rec.seen.lock().unwrap().last().cloned().unwrap();
    let first = seen.head.lines().next().unwrap();
    assert_eq!(
        first,
        format!("GET {path} HTTP/1.1"),
        "an h2 request goes upstream as HTTP/1.1, path untouched"
    );
    let h = seen.head.to_ascii_lowercase();
    assert!(h.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"), "{h}");
    assert!(
        !h.contains("203.0.113.9"),
        "a forged address reached the upstream: {h}"
    );
    assert!(h.contains("\r\nx-forwarded-proto: https\r\n"), "{h}");
    assert!(
        h.contains(&format!("\r\nhost: {HOST}:{}\r\n", d.https)),
        "{h}"
    );
    assert!(h.contains("\r\nauthorization: bearer tok\r\n"), "{h}");
    // Three more requests from three new client connections reuse the pooled upstream one.
    for _ in 0..3 {
        let mut c = d.curl();
        c.args(["-o", "/dev/null"]).arg(format!(
            "https://{HOST}:{}/_matrix/client/versions",
            d.https
        ));
        tokio::task::spawn_blocking(move || run(c)).await.unwrap();
    }
    assert_eq!(rec.seen.lock().unwrap().len(), 4);
    assert_eq!(
        rec.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "upstream connections are not pooled"
    );
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_at_the_front_door_and_federation_paths_pass_on_8448() {
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "127.0.0.1").await;
    let mut c = d.curl();
    c.args(["--http1.1", "-D", "-", "-o", "/dev/null"])
        .args([
            "-H",
            "Connection: keep-alive, X-Secret",
            "-H",
            "X-Secret: 1",
            "-H",
            "TE: trailers",
            "-H",
            "Keep-Alive: timeout=9",
        ])
        .arg(format!(
            "https://{HOST}:{}/_matrix/federation/v1/query/profile?user_id=%40a%3Ab.c",
            d.federation
        ));
    let (resp, err) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}{err}");
    let lower = resp.to_ascii_lowercase();
    assert!(
        !lower.contains("keep-alive: timeout=5"),
        "upstream's Keep-Alive leaked to the client: {resp}"
    );
    assert!(
        lower.contains("strict-transport-security: max-age=31536000"),
        "{resp}"
    );
    let seen = rec.seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        seen.head.starts_with(
            "GET /_matrix/federation/v1/query/profile?user_id=%40a%3Ab.c HTTP/1.1\r\n"
        ),
        "{}",
        seen.head
    );
    let h = seen.head.to_ascii_lowercase();
    for gone in ["x-secret", "\r\nte:", "keep-alive: timeout=9"] {
        assert!(!h.contains(gone), "{gone} reached the upstream: {h}");
    }
    // The client API is not served on the federation port.
    let mut c = d.curl();
    c.args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!(
            "https://{HOST}:{}/_matrix/client/versions",
            d.federation
        ));
    assert_eq!(
        tokio::task::spawn_blocking(move || run(c)).await.unwrap().0,
        "404"
    );
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_and_the_upstream_sees_none_of_a_declared_one() {
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![7u8; (4 << 20) + 1]).unwrap();
    let url = format!("https://{HOST}:{}/_matrix/media/v3/upload", d.https);
    for chunked in [false, true] {
        let before = rec.seen.lock().unwrap().len();
        let mut c = d.curl();
        // HTTP/1.1: curl 7.88 reports the RST_STREAM(NO_ERROR) that RFC 9113 §8.1 prescribes
        // after an early answer as an error; HTTP/2 is checked below with hyper's client.
        c.args(["--http1.1", "-w", "\n%{http_code}", "--data-binary"])
            .arg(format!("@{}", big.display()));
        if chunked {
            c.args(["-H", "Transfer-Encoding: chunked"]);
        }
        c.arg(&url);
        let (out, err) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
        assert!(out.ends_with("\n413"), "chunked={chunked}: {out} {err}");
        assert!(out.contains("M_TOO_LARGE"), "{out}");
        if !chunked {
            assert_eq!(
                rec.seen.lock().unwrap().len(),
                before,
                "the upstream saw a request it should not have"
            );
        }
    }
    // HTTP/2: the 413 arrives although the body was never read.
    let ca = std::fs::read_to_string(&d.ca).unwrap();
    let (mut h2, _) = common::h2_connect(d.https, HOST, &ca).await;
    let req = http::Request::post(format!(
        "https://{HOST}:{}/_matrix/media/v3/upload",
        d.https
    ))
    .header("content-length", (5u64 << 20).to_string())
    .body(http_body_util::Full::new(bytes::Bytes::from(vec![
        0u8;
        5 << 20
    ])))
    .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    // Exactly the limit passes.
    std::fs::write(&big, vec![7u8; 4 << 20]).unwrap();
    let mut c = d.curl();
    c.args(["-w", "%{http_code}", "-o", "/dev/null", "--data-binary"])
        .arg(format!("@{}", big.display()))
        .arg(&url);
    assert_eq!(
        tokio::task::spawn_blocking(move || run(c)).await.unwrap().0,
        "200"
    );
    assert_eq!(rec.seen.lock().unwrap().last().unwrap().body_len, 4 << 20);
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_through_without_being_buffered() {
    // The client sends 1 MiB, then waits until the upstream has received it before sending the
    // rest. A proxy that buffered whole bodies would never pass the first MiB on: deadlock.
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "127.0.0.1").await;
    let progress = rec.progress.clone();
    let url = format!("https://{HOST}:{}/_matrix/media/v3/upload", d.https);
    let mut c = d.curl();
    // -T - streams stdin as it comes (--data-binary @- would read it all first).
    c.args([
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        "-H",
        "Content-Length: 3145728",
        "-T",
        "-",
    ])
    .arg(&url)
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![1u8; 1 << 20]).unwrap();
    stdin.flush().unwrap();
    let t0 = Instant::now();
    while *progress.lock().unwrap() < (1 << 20) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the first MiB never reached the upstream: the body is buffered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stdin.write_all(&vec![2u8; 2 << 20]).unwrap();
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(rec.seen.lock().unwrap().last().unwrap().body_len, 3 << 20);
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_gives_502_with_a_matrix_error_at_once() {
    let dead = common::free_port();
    let d = door(dead, Limits::default(), "127.0.0.1").await;
    let mut c = d.curl();
    c.args(["-w", "\n%{http_code}"]).arg(format!(
        "https://{HOST}:{}/_matrix/client/versions",
        d.https
    ));
    let t0 = Instant::now();
    let (out, _) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "502 took {:?}",
        t0.elapsed()
    );
    assert!(out.ends_with("\n502"), "{out}");
    assert!(out.contains("\"errcode\":\"M_UNKNOWN\""), "{out}");
    let _ = d.stop.send(true);
}

/// An answer given before the request body has arrived (here a 404: client paths are not
/// served on 8448), as a typing PUT got 503 while its worker was down: the front door reads a
/// small body still on its way before answering, so Debian 12's curl (7.88), which takes the
/// RST_STREAM(NO_ERROR) that RFC 9113 §8.1 allows after an early answer for a stream error and
/// shows no answer at all, gets the 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_curl_whose_h2_body_comes_late() {
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "127.0.0.1").await;
    let mut c = d.curl();
    c.args(["--http2", "-T", "-", "-w", "\n%{http_code} %{http_version}"])
        .arg(format!(
            "https://{HOST}:{}/_matrix/client/v3/rooms/x/typing/y",
            d.federation
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        // The head goes at once, the body a moment later.
        std::thread::sleep(Duration::from_millis(300));
        let _ = stdin.write_all(br#"{"typing": false}"#);
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl saw no answer: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.ends_with("\n404 2"), "{text}");
    assert!(text.contains("M_UNRECOGNIZED"), "{text}");
    let _ = d.stop.send(true);
}

/// A body that never comes does not hold the early answer back: it comes, then the server
/// asks without error that the body stop (RFC 9113 §8.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_does_not_wait_for_an_h2_body_that_never_comes() {
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "127.0.0.1").await;
    let (tls, _, _) = common::h2_tls(d.federation, HOST, &d.ca_pem).await;
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::put(format!(
        "https://{HOST}:{}/_matrix/client/v3/rooms/x/typing/y",
        d.federation
    ))
    .body(())
    .unwrap();
    // The head goes now, the body never: the answer must not wait for it, nor be lost.
    let (resp, mut body) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("an answer without the body")
        .expect("an answer, not a reset stream");
    assert_eq!(resp.status(), 404);
    let mut got = resp.into_body();
    let mut text = vec![];
    while let Some(chunk) = got.data().await {
        text.extend_from_slice(&chunk.expect("the whole answer"));
    }
    assert!(
        String::from_utf8_lossy(&text).contains("M_UNRECOGNIZED"),
        "{text:?}"
    );
    // Then the server asks, without error, that the body stop (RFC 9113 §8.1).
    let reason = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| body.poll_reset(cx)),
    )
    .await
    .expect("the stream reset after the answer")
    .unwrap();
    assert_eq!(reason, h2::Reason::NO_ERROR);
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_80_redirects_except_acme_challenges_and_well_known_is_served() {
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "127.0.0.1").await;
    d.store.put_http01("tok123", "tok123.thumbprint");
    let http = |path: &str| {
        let mut c = d.curl();
        c.args(["-D", "-", "-o", "-"])
            .arg(format!("http://{HOST}:{}{path}", d.http));
        c
    };
    let (r, _) = tokio::task::spawn_blocking({
        let c = http("/_matrix/client/versions?x=1");
        move || run(c)
    })
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 301"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains(&format!(
            "location: https://{HOST}:{}/_matrix/client/versions?x=1",
            d.https
        )),
        "{r}"
    );
    let (r, _) = tokio::task::spawn_blocking({
        let c = http("/.well-known/acme-challenge/tok123");
        move || run(c)
    })
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\ntok123.thumbprint"), "{r}");
    let (r, _) = tokio::task::spawn_blocking({
        let c = http("/.well-known/acme-challenge/unknown");
        move || run(c)
    })
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");

    let mut c = d.curl();
    c.args(["-D", "-"]).arg(format!(
        "https://example.test:{}/.well-known/matrix/server",
        d.https
    ));
    let (r, _) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
    assert!(
        r.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{r}"
    );
    assert!(
        r.ends_with(&format!("{{\"m.server\":\"{HOST}:{}\"}}", d.https)),
        "{r}"
    );
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_below_1_2_is_refused_by_the_server() {
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "127.0.0.1").await;
    let s_client = |args: &[&str]| {
        let mut c = Command::new("openssl");
        c.args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", d.https),
            "-servername",
            HOST,
        ])
        .args(args)
        .stdin(std::process::Stdio::null());
        c
    };
    // SECLEVEL=0 so that OpenSSL 3 itself is willing to offer TLS 1.1: the refusal must come
    // from our server (an alert it sends: "SSL alert number N"), not from the client's policy.
    let (out, err) = tokio::task::spawn_blocking({
        let c = s_client(&["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]);
        move || run(c)
    })
    .await
    .unwrap();
    assert!(
        err.contains("SSL alert number"),
        "TLS 1.1 was not refused by the server:\n{out}\n{err}"
    );
    assert!(
        out.contains("Cipher is (NONE)"),
        "a TLS 1.1 session was established: {out}"
    );
    let (out, _) = tokio::task::spawn_blocking({
        let c = s_client(&["-tls1_2"]);
        move || run(c)
    })
    .await
    .unwrap();
    assert!(
        out.contains("Protocol  : TLSv1.2") || out.contains("Protocol: TLSv1.2"),
        "{out}"
    );
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_flooding_clients_are_cut_off() {
    let rec = recorder().await;
    let limits = Limits {
        max_connections_per_ip: 3,
        header_read_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let d = door(rec.port, limits, "127.0.0.1").await;
    let http = d.http;
    tokio::task::spawn_blocking(move || {
        // Slowloris: half a request head, then silence.
        let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t0 = Instant::now();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        let resp = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(t0.elapsed() < Duration::from_secs(5), "slow header not cut");
        assert!(n == 0 || resp.starts_with("HTTP/1.1 408"), "{resp}");

        // Flood: three connections held open, the fourth is closed at once.
        let held: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(("127.0.0.1", http)).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut extra = TcpStream::connect(("127.0.0.1", http)).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = extra.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let n = extra.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "a fourth connection from one address was served");
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
        // Places free up when connections close.
        let mut again = TcpStream::connect(("127.0.0.1", http)).unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        again
            .write_all(b"GET / HTTP/1.1\r\nHost: matrix.example.test\r\n\r\n")
            .unwrap();
        let n = again.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 301"));
    })
    .await
    .unwrap();
    let _ = d.stop.send(true);
}

/// `/_synapse/admin/v1/server_version` in disguises that decode or resolve to it, and an admin
/// servlet's path whose encoded `..`s (one user ID to Synapse) resolve out of `/_synapse`.
const DISGUISED_ADMIN: [&str; 8] = [
    "/_synapse/admin/v2/users/..%2F..%2F..%2F..%2F_matrix",
    "/_synapse/%61dmin/v1/server_version",
    "//_synapse/admin/v1/server_version",
    "/_synapse//admin/v1/server_version",
    "/_synapse/./admin/v1/server_version",
    "/_synapse/foo/../admin/v1/server_version",
    "/_synapse%2Fadmin/v1/server_version",
    "/_matrix/../_synapse/admin/v1/server_version",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_refused_from_another_host_and_allowed_from_loopback() {
    if !common::require("root", common::is_root(), "network namespaces need root") {
        return;
    }
    let rec = recorder().await;
    let d = door(rec.port, Limits::default(), "0.0.0.0").await;
    let ns = common::NetNs::new();
    let url_from_ns = format!(
        "https://{HOST}:{}/_synapse/admin/v1/registration_tokens",
        d.https
    );
    // From the namespace: a different host, 10.x.y.2, reaching us on 10.x.y.1.
    let mut c = ns.exec("curl");
    c.args([
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(&d.ca)
    .arg("--resolve")
    .arg(format!("{HOST}:{}:{}", d.https, ns.host_ip))
    .arg(&url_from_ns);
    let before = rec.seen.lock().unwrap().len();
    let (out, err) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
    assert!(out.ends_with("\n403"), "{out} {err}");
    assert!(out.contains("M_FORBIDDEN"), "{out}");
    assert_eq!(
        rec.seen.lock().unwrap().len(),
        before,
        "the admin request reached the upstream"
    );
    // Disguised: the guard decides on the normalized path (curl --path-as-is sends these
    // bytes as they are).
    for p in DISGUISED_ADMIN {
        let mut c = ns.exec("curl");
        c.args(["-sS", "--path-as-is", "--max-time", "10", "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "--cacert"])
            .arg(&d.ca)
            .arg("--resolve")
            .arg(format!("{HOST}:{}:{}", d.https, ns.host_ip))
            .arg(format!("https://{HOST}:{}{p}", d.https));
        let (out, err) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
        assert_eq!(out, "403", "{p} from another host: {err}");
    }
    assert_eq!(
        rec.seen.lock().unwrap().len(),
        before,
        "a disguised admin request reached the upstream"
    );
    // The client API still works from there.
    let mut c = ns.exec("curl");
    c.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
    ])
    .arg(&d.ca)
    .arg("--resolve")
    .arg(format!("{HOST}:{}:{}", d.https, ns.host_ip))
    .arg(format!(
        "https://{HOST}:{}/_matrix/client/versions",
        d.https
    ));
    assert_eq!(
        tokio::task::spawn_blocking(move || run(c)).await.unwrap().0,
        "200"
    );
    // From loopback the admin API is passed on.
    let mut c = d.curl();
    c.args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!(
            "https://{HOST}:{}/_synapse/admin/v1/registration_tokens",
            d.https
        ));
    assert_eq!(
        tokio::task::spawn_blocking(move || run(c)).await.unwrap().0,
        "200"
    );
    let seen = rec.seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        seen.head
            .starts_with("GET /_synapse/admin/v1/registration_tokens HTTP/1.1")
    );
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_but_a_request_in_flight_is_never_cut() {
    let rec = recorder().await;
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let d = door(rec.port, limits, "127.0.0.1").await;
    let ca = std::fs::read_to_string(&d.ca).unwrap();
    let (mut h2, _) = common::h2_connect(d.https, HOST, &ca).await;
    let get = |p: &str| {
        http::Request::get(format!("https://{HOST}:{}{p}", d.https))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    // 3 s without a byte either way, three times the idle timeout: still answered.
    let t0 = Instant::now();
    let resp = h2
        .send_request(get("/_matrix/client/v3/sync?slow"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(t0.elapsed() >= Duration::from_secs(3));
    // Then, idle with nothing in flight, the connection is closed.
    let t0 = Instant::now();
    while !h2.is_closed() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "an idle connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = d.stop.send(true);
}

fn get(port: u16, p: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::get(format!("https://{HOST}:{port}{p}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap()
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// GETs every path at once, each on its own stream of `h2`; their statuses as they come.
fn get_all(
    h2: &H2,
    port: u16,
    paths: impl IntoIterator<Item = String>,
) -> Vec<tokio::task::JoinHandle<http::StatusCode>> {
    paths
        .into_iter()
        .map(|p| {
            let mut h2 = h2.clone();
            let req = get(port, &p);
            tokio::spawn(async move { h2.send_request(req).await.unwrap().status() })
        })
        .collect()
}

/// Reads one HTTP/1.1 response head (and a short body) from `s`; "" if the server closed.
fn read_response(s: &mut TcpStream) -> String {
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_answering_pings_is_closed_after_the_idle_timeout() {
    let (_rec, d) = door_with(Limits {
        idle_timeout: Duration::from_secs(2),
        h2_keepalive_interval: Duration::from_millis(200),
        ..Limits::default()
    })
    .await;
    let ca = &d.ca_pem;
    let (mut h2, _, reads) = common::h2_connect_counted(d.https, HOST, ca).await;
    let resp = h2
        .send_request(get(d.https, "/_matrix/client/versions"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    // From here the client sends nothing but its answers to the server's PINGs (hyper's h2
    // client acknowledges them itself).
    let after_response = reads.load(std::sync::atomic::Ordering::SeqCst);
    let t0 = Instant::now();
    while !h2.is_closed() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "an idle h2 connection answering PINGs was still open after {:?} (idle timeout 2 s)",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pings = reads.load(std::sync::atomic::Ordering::SeqCst) - after_response;
    assert!(
        pings >= 4,
        "the server sent {pings} frames while idle: the test did not see keep-alive PINGs"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before the idle timeout",
        t0.elapsed()
    );
    let _ = d.stop.send(true);
}

/// On the :80 listener at `http` of a front door with a 1 s header timeout and a 4 s idle
/// timeout: a keep-alive connection outlives the header timeout between requests, closes after
/// the idle timeout, and a started head is cut after the header timeout.
fn keep_alive_outlives_the_header_timeout(http: u16) {
    let req = GET_ROOT;
    let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 301"));
    // Twice the header timeout between requests, within the idle timeout: still open.
    std::thread::sleep(Duration::from_millis(2500));
    s.write_all(req).unwrap();
    let r = read_response(&mut s);
    assert!(
        r.starts_with("HTTP/1.1 301"),
        "a keep-alive connection idle for 2.5 s was closed (header timeout 1 s, idle timeout 4 s): {r:?}"
    );
    // Then idle: closed after the idle timeout.
    let t0 = Instant::now();
    let r = read_response(&mut s);
    assert_eq!(r, "", "expected the close, got {r:?}");
    assert!(
        t0.elapsed() >= Duration::from_secs(3) && t0.elapsed() < Duration::from_secs(8),
        "closed after {:?}, not the 4 s idle timeout",
        t0.elapsed()
    );

    // A next request head begun but not finished is cut after the header timeout.
    let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 301"));
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"GET / HTTP/1.1\r\nHost: ").unwrap();
    let t0 = Instant::now();
    let r = read_response(&mut s);
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 408"), "{r:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "a started head was allowed {:?} (header timeout 1 s)",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h1_keep_alive_connection_lives_for_the_idle_timeout_not_the_header_timeout() {
    let (_rec, d) = door_with(Limits {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(4),
        ..Limits::default()
    })
    .await;
    let http = d.http;
    tokio::task::spawn_blocking(move || keep_alive_outlives_the_header_timeout(http))
        .await
        .unwrap();
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_idle_connections_make_room_and_busy_ones_stay() {
    let (rec, d) = door_with(Limits {
        max_connections: 3,
        ..Limits::default()
    })
    .await;
    let ca = &d.ca_pem;
    // Place 1: an h2 connection with a long request in flight.
    let (mut h2, _) = common::h2_connect(d.https, HOST, ca).await;
    let busy = tokio::spawn({
        let req = get(d.https, "/_matrix/client/v3/sync?delay=4000");
        async move {
            let t0 = Instant::now();
            let r = h2.send_request(req).await;
            (r.map(|r| r.status().as_u16()), t0.elapsed())
        }
    });
    rec.wait_seen(1).await;
    let http = d.http;
    tokio::task::spawn_blocking(move || {
        // Places 2 and 3: idle connections.
        let mut idle: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(("127.0.0.1", http)).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // Three newcomers: each is served, an idle connection making room.
        for i in 0..3 {
            let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(GET_ROOT).unwrap();
            let r = read_response(&mut s);
            assert!(
                r.starts_with("HTTP/1.1 301"),
                "newcomer {i} at the cap was refused though idle connections were open: {r:?}"
            );
            idle.push(s);
        }
        // The first two idle connections were the ones closed.
        for s in &mut idle[..2] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(read_response(s), "", "an evicted connection is still open");
        }
    })
    .await
    .unwrap();
    let (status, took) = busy.await.unwrap();
    assert_eq!(
        status.expect("the connection with a request in flight was cut"),
        200
    );
    assert!(took >= Duration::from_secs(4));
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_in_one_64_share_one_limit() {
    if !common::require(
        "root",
        common::is_root(),
        "adding addresses to lo needs root",
    ) {
        return;
    }
    let lo = common::LoopbackV6::new(&[1, 2]);
    let rec = recorder().await;
    let limits = Limits {
        max_connections_per_ip: 2,
        ..Limits::default()
    };
    let d = door(rec.port, limits, "[::]").await;
    let http = d.http;
    let (a, b) = (lo.addr(1), lo.addr(2));
    let connect = move |from: std::net::Ipv6Addr| {
        let sock = tokio::net::TcpSocket::new_v6().unwrap();
        sock.bind((from, 0).into()).unwrap();
        let std = {
            let rt = tokio::runtime::Handle::current();
            rt.block_on(sock.connect((a, http).into()))
                .unwrap()
                .into_std()
                .unwrap()
        };
        std.set_nonblocking(false).unwrap();
        std.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std
    };
    tokio::task::spawn_blocking(move || {
        let held: Vec<TcpStream> = (0..2).map(|_| connect(a)).collect();
        std::thread::sleep(Duration::from_millis(300));
        // Another address of the same /64: over the limit.
        let mut third = connect(b);
        let _ = third.write_all(GET_ROOT);
        let r = read_response(&mut third);
        assert_eq!(
            r, "",
            "{b} was served while {a}, in the same /64, held the limit of 2"
        );
        // An address outside that /64 is not affected.
        let mut other = connect("::1".parse().unwrap());
        other.write_all(GET_ROOT).unwrap();
        assert!(read_response(&mut other).starts_with("HTTP/1.1 301"));
        drop(held);
    })
    .await
    .unwrap();
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_upstream_cap_clients_get_503_with_retry_after() {
    let (rec, d) = door_with(Limits {
        upstream_max_connections: 2,
        // One client address here: the per-address share is another test's.
        upstream_max_per_addr: Some(2),
        ..Limits::default()
    })
    .await;
    let ca = &d.ca_pem;
    let (h2, _) = common::h2_connect(d.https, HOST, ca).await;
    let slow = get_all(
        &h2,
        d.https,
        (0..2).map(|_| "/_matrix/client/v3/rooms?delay=3000".to_string()),
    );
    rec.wait_seen(2).await;
    let mut h = h2.clone();
    let resp = h
        .send_request(get(d.https, "/_matrix/client/versions"))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        503,
        "a third request over a cap of 2 was not refused"
    );
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errcode"], "M_LIMIT_EXCEEDED", "{v}");
    assert_eq!(
        rec.seen.lock().unwrap().len(),
        2,
        "the upstream saw the refused request"
    );
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    // Places are given back: the next request goes through.
    let resp = h
        .send_request(get(d.https, "/_matrix/client/versions"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = d.stop.send(true);
}

/// Returning clients resume instead of repeating the full handshake: with a session ticket
/// (TLS 1.2 and 1.3) and, for TLS 1.2 clients without tickets, from the session cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_from_tickets_and_from_the_cache() {
    let (_rec, d) = door_with(Limits::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = d.https;
    let ca = d.ca.clone();
    let sess = dir.path().join("sess.pem");
    let handshake = move |extra: &[&str], resume: bool| {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-servername", HOST, "-CAfile"])
            .arg(&ca)
            .args(extra)
            .arg(if resume { "-sess_in" } else { "-sess_out" })
            .arg(&sess)
            // A request, read to the server's close: TLS 1.3 tickets come after the
            // handshake, and s_client must still be reading when they do.
            .arg("-ign_eof")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = c.spawn().expect("running openssl s_client");
        let req = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(req.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    tokio::task::spawn_blocking(move || {
        for (what, extra) in [
            ("TLS 1.3 ticket", &["-tls1_3"][..]),
            ("TLS 1.2 ticket", &["-tls1_2"][..]),
            ("TLS 1.2 session cache", &["-tls1_2", "-no_ticket"][..]),
        ] {
            let first = handshake(extra, false);
            assert!(first.contains("New, TLSv1."), "{what}: {first}");
            if what.contains("ticket") {
                assert!(
                    first.contains("TLS session ticket lifetime hint"),
                    "{what}: no session ticket was issued: {first}"
                );
            }
            let again = handshake(extra, true);
            assert!(
                again.contains("Reused, TLSv1."),
                "{what}: the session was not resumed: {again}"
            );
        }
    })
    .await
    .unwrap();
    let _ = d.stop.send(true);
}

/// Long-polls (`/sync` with a timeout) wait, they do not make Synapse work: they are held
/// beyond the cap on ordinary requests (5,000 idle clients are 5,000 long-polls), and while
/// they are, ordinary requests still have their own places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_are_held_beyond_the_request_cap_and_leave_it_free() {
    const CAP: usize = 2;
    const POLLS: usize = 12;
    let (rec, d) = door_with(Limits {
        upstream_max_connections: CAP,
        upstream_max_per_addr: Some(CAP),
        ..Limits::default()
    })
    .await;
    let (h2, _) = common::h2_connect(d.https, HOST, &d.ca_pem).await;
    let polls = get_all(
        &h2,
        d.https,
        (0..POLLS).map(|i| format!("/_matrix/client/v3/sync?since=s{i}&timeout=3000&delay=2500")),
    );
    rec.wait_seen(POLLS).await;
    // Every long-poll is at the upstream at once; an ordinary request still gets through.
    let versions = get_all(&h2, d.https, ["/_matrix/client/versions".to_string()]);
    for v in versions {
        assert_eq!(
            v.await.unwrap(),
            200,
            "an ordinary request while {POLLS} long-polls were held"
        );
    }
    for p in polls {
        assert_eq!(
            p.await.unwrap(),
            200,
            "a long-poll over the cap of {CAP} on ordinary requests was refused"
        );
    }
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_answer_times_out_but_a_long_poll_gets_its_timeout() {
    let (_rec, d) = door_with(Limits {
        upstream_timeout: Duration::from_secs(2),
        ..Limits::default()
    })
    .await;
    let ca = &d.ca_pem;
    let (mut h2, _) = common::h2_connect(d.https, HOST, ca).await;
    let t0 = Instant::now();
    let resp = h2
        .send_request(get(d.https, "/_matrix/client/v3/rooms?delay=6000"))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        504,
        "an answer 6 s late got through a 2 s head timeout"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "504 after {:?}",
        t0.elapsed()
    );
    // /sync asked to wait 4 s may take 4 s + the 2 s head timeout.
    for p in [
        "/_matrix/client/v3/sync?since=s1&timeout=4000&delay=5000",
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=4000&delay=5000",
    ] {
        let resp = h2.send_request(get(d.https, p)).await.unwrap();
        assert_eq!(resp.status(), 200, "{p}");
    }
    let _ = d.stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_keeps_upstream_connections_under_the_cap() {
    const CAP: usize = 8;
    let (rec, d) = door_with(Limits {
        upstream_max_connections: CAP,
        // One client address here: the per-address share is another test's.
        upstream_max_per_addr: Some(CAP),
        ..Limits::default()
    })
    .await;
    let ca = &d.ca_pem;
    let peak = PeakConnections::watch(rec.port);
    let request = |p: &str| {
        http::Request::get(format!("https://{HOST}:{}{p}", d.https))
            .body(())
            .unwrap()
    };
    // 1. Many streams at once to a slow upstream, on four connections: only CAP reach it.
    let mut waiting = vec![];
    let mut conns = vec![];
    for _ in 0..4 {
        let (tls, _, _) = common::h2_tls(d.https, HOST, ca).await;
        let (client, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        for _ in 0..50 {
            let (resp, _) = client
                .send_request(request("/_matrix/client/v3/rooms?delay=4000"), true)
                .unwrap();
            waiting.push(resp);
            client = client.ready().await.unwrap();
        }
        conns.push(client);
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for r in waiting {
        *statuses
            .entry(r.await.map_or(0, |r| r.status().as_u16()))
            .or_default() += 1;
    }
    assert!(
        peak.max() <= CAP,
        "{} connections to the upstream at once, over the cap of {CAP}",
        peak.max()
    );
    assert_eq!(statuses.get(&200), Some(&CAP), "{statuses:?}");
    assert_eq!(statuses.get(&503), Some(&(200 - CAP)), "{statuses:?}");

    // 2. CVE-2023-44487: HEADERS then RST_STREAM at once, over and over; the server may end
    // a connection for it (GOAWAY), and the attacker reconnects.
    let mut sent = 0;
    let t0 = Instant::now();
    while sent < 5000 && t0.elapsed() < Duration::from_secs(20) {
        let (tls, _, _) = common::h2_tls(d.https, HOST, ca).await;
        let Ok((client, conn)) = h2::client::handshake(tls).await else {
            continue;
        };
        tokio::spawn(conn);
        let Ok(mut client) = client.ready().await else {
            continue;
        };
        loop {
            let Ok((_, mut stream)) =
                client.send_request(request("/_matrix/client/v3/rooms?delay=2000"), true)
            else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
            match client.ready().await {
                Ok(c) if sent < 5000 => client = c,
                _ => break,
            }
        }
    }
    assert!(sent >= 1000, "only {sent} streams sent");
    assert!(
        peak.max() <= CAP,
        "{} connections to the upstream at once during the rapid-reset flood, over the cap of {CAP}",
        peak.max()
    );
    // Still serving.
    let mut c = d.curl();
    c.args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!(
            "https://{HOST}:{}/_matrix/client/versions",
            d.https
        ));
    assert_eq!(
        tokio::task::spawn_blocking(move || run(c)).await.unwrap().0,
        "200"
    );
    eprintln!(
        "rapid reset: {sent} streams sent, {} reached the upstream, peak {} upstream connections",
        rec.seen.lock().unwrap().len(),
        peak.max()
    );
    drop(conns);
    let _ = d.stop.send(true);
}

#[test]
fn through_the_binary_admin_in_any_spelling_is_refused_from_another_host_and_http_timeouts_hold() {
    if !common::require_appliance() {
        return;
    }
    let lab = common::Lab::new("guard");
    // All addresses, so that a second host (a network namespace) can reach the front door.
    // Also the [http] timeouts, as the binary reads them.
    lab.write_config_on(
        "0.0.0.0",
        "[tls]\nmode = \"internal\"\n[http]\nheader_timeout = \"1s\"\nidle_timeout = \"4s\"\n",
    );
    let _run = lab.start();
    keep_alive_outlives_the_header_timeout(lab.http_port);
    let ns = common::NetNs::new();
    let base = lab.https_base();
    let from_ns = |p: &str| {
        let mut c = ns.exec("curl");
        c.args([
            "-sS",
            "--path-as-is",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cacert")
        .arg(lab.ca_root())
        .arg("--resolve")
        .arg(format!(
            "{}:{}:{}",
            lab.matrix_host(),
            lab.https_port,
            ns.host_ip
        ))
        .arg(format!("{base}{p}"));
        let (out, err) = run(c);
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), format!("{body} {err}"))
    };
    for p in std::iter::once("/_synapse/admin/v1/server_version").chain(DISGUISED_ADMIN) {
        let (code, body) = from_ns(p);
        assert_eq!(code, "403", "{p} from another host: {body}");
        assert!(body.contains("M_FORBIDDEN"), "{p}: {body}");
    }
    // Synapse's other private trees are not found from outside.
    for p in ["/_synapse/mas/x", "/_synapse/%6Das/x", "/_synapse"] {
        let (code, body) = from_ns(p);
        assert_eq!(code, "404", "{p} from another host: {body}");
    }
    // The public parts are served: the client API, and /_synapse/client (Synapse answers,
    // here 400 for a missing parameter, not our 404).
    let (code, body) = from_ns("/_matrix/client/versions");
    assert_eq!(code, "200", "{body}");
    let (code, body) = from_ns("/_synapse/client/pick_idp");
    assert!(code != "404" && code != "403", "{code} {body}");
    // From this host the admin API is passed on, the raw bytes as sent.
    let out = lab
        .curl()
        .args(["-w", "\n%{http_code}", "--cacert"])
        .arg(lab.ca_root())
        .arg(format!("{base}/_synapse/admin/v1/server_version"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.ends_with("\n200") && out.contains("server_version"),
        "{out}"
    );
}

/// `Max open files` of a process: (soft, hard).
fn nofile(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

/// systemd's default open-file limit is soft 1024 (hard higher). Hostile clients from a few
/// addresses holding more idle connections than that must not make `accept` fail for
/// everyone: the binary raises its own soft limit, keeps its connection cap within it (so idle
/// connections are evicted for a new client), and gives Synapse the original limit back.
#[test]
fn through_the_binary_idle_connections_past_1024_descriptors_do_not_lock_clients_out_nor_leak() {
    if !common::require_appliance() {
        return;
    }
    const SOFT: u64 = 1024;
    const HARD: u64 = 1500;
    let lab = common::Lab::new("nofile");
    lab.write_config("[tls]\nmode = \"internal\"\n[http]\nheader_timeout = \"120s\"\n");
    let mut c = lab.cmd(&["run"]);
    // SAFETY: only plain syscalls (setrlimit, pipe, dup2) between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, SOFT, HARD)
                .map_err(std::io::Error::from)?;
            // A pipe the supervisor inherits without close-on-exec, as from a careless parent.
            let mut p = [0; 2];
            if nix::libc::pipe(p.as_mut_ptr()) != 0 || nix::libc::dup2(p[0], 200) != 200 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let run = common::start_until_ready(c, &lab.path("notify.sock"), &lab.path("run.log"));
    // 1100 silent connections from five addresses (220 each, under the per-address cap).
    let port = lab.http_port;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let held = rt.block_on(async {
        let mut held = vec![];
        for i in 0..1100u32 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            let src = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 5) as u8);
            s.bind((src, 0).into()).unwrap();
            held.push(s.connect(([127, 0, 0, 1], port).into()).await.unwrap());
        }
        held
    });
    // A new client is still answered (port 80 redirects), within seconds.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--interface", "127.0.0.9"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        code,
        "301",
        "a new client behind 1100 idle ones; log: {}",
        run.log_tail()
    );
    // (Synapse raises its own soft limit, synapse/util/rlimit.py; tests/supervisor.rs shows
    // what a child is given.)
    assert_eq!(
        nofile(run.pid()),
        (HARD, HARD),
        "the supervisor's own limit"
    );
    drop(held);
    // No socket or pipe of the supervisor's (listeners, the control socket, client
    // connections, other children's pipes, nor the pipe it inherited at 200) is open in
    // Synapse: only stdio crosses.
    assert!(std::path::Path::new(&format!("/proc/{}/fd/200", run.pid())).exists());
    let synapse = lab.synapse_status()["pid"].as_i64().unwrap() as i32;
    // Its own stdio pipes are shared by design (the supervisor reads their other ends), also
    // where Synapse duplicated them.
    let objects = |pid: i32, stdio: bool| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| !stdio || e.file_name().to_str().unwrap().parse::<u32>().unwrap() <= 2)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|t| t.display().to_string())
            .filter(|t| t.starts_with("socket:") || t.starts_with("pipe:"))
            .collect()
    };
    let stdio = objects(synapse, true);
    let ours = objects(run.pid(), false);
    let shared: Vec<_> = objects(synapse, false)
        .intersection(&ours)
        .filter(|o| !stdio.contains(*o))
        .cloned()
        .collect();
    let fds = |pid: i32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| {
                format!(
                    "{:?}->{:?}",
                    e.file_name(),
                    std::fs::read_link(e.path()).ok()
                )
            })
            .collect()
    };
    assert!(
        shared.is_empty(),
        "Synapse inherited {shared:?}: synapse {:?} supervisor {:?}",
        fds(synapse),
        fds(run.pid())
    );
}

/// One client address may hold only its share (a quarter) of the places to Synapse: slow
/// requests from one address cannot lock every other client out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_place_to_synapse() {
    let cfg =
        Config::from_toml("server_name = \"example.test\"\n[http]\nupstream_max_connections = 8\n")
            .unwrap();
    let (rec, d) = door_with(Limits::from_config(&cfg)).await;
    let (h2, _) = common::h2_connect(d.https, HOST, &d.ca_pem).await;
    let slow = get_all(
        &h2,
        d.https,
        (0..8).map(|_| "/_matrix/client/v3/rooms?delay=4000".to_string()),
    );
    rec.wait_seen(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another address is still served while those wait.
    let mut c = d.curl();
    c.args([
        "--interface",
        "127.0.0.2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg(format!(
        "https://{HOST}:{}/_matrix/client/versions",
        d.https
    ));
    let (code, err) = tokio::task::spawn_blocking(move || run(c)).await.unwrap();
    assert_eq!(
        code, "200",
        "another client over one address's slow requests: {err}"
    );
    let mut codes = vec![];
    for s in slow {
        codes.push(s.await.unwrap().as_u16());
    }
    codes.sort();
    assert_eq!(
        codes,
        [200, 200, 503, 503, 503, 503, 503, 503],
        "one address's 8 requests"
    );
    let _ = d.stop.send(true);
}

/// An upstream for the long-poll client (`http::wire`): it answers `mode=chunked` with a
/// chunked body written in pieces (and a trailer), and after `mode=drop-next` closes the
/// connection on the next request without answering it, as a server closing a kept
/// connection at the wrong moment does. It records each request's body.
async fn long_poll_upstream() -> (
    u16,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<Mutex<Vec<String>>>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(vec![]));
    let (a2, b2) = (accepted.clone(), bodies.clone());
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = l.accept().await.unwrap();
            a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let bodies = b2.clone();
            tokio::spawn(async move {
                let mut drop_next = false;
                loop {
                    let Some(head) = read_head(&mut sock).await else {
                        return;
                    };
                    if drop_next {
                        return;
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    let mut body = vec![0u8; len];
                    sock.read_exact(&mut body).await.unwrap();
                    bodies
                        .lock()
                        .unwrap()
                        .push(String::from_utf8(body).unwrap());
                    if head.contains("mode=chunked") {
                        sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
                            .await
                            .unwrap();
                        for piece in [
                            &b"7\r\nhello, "[..],
                            b"\r\n8;x=y\r\nchu",
                            b"nked \r\n",
                            b"5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n",
                        ] {
                            sock.write_all(piece).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    } else {
                        sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    }
                    drop_next = head.contains("mode=drop-next");
                }
            });
        }
    });
    (port, accepted, bodies)
}

/// Long-polls go through the lean client (`http::wire`), not hyper's: bodies both ways arrive
/// whole (a chunked answer in pieces, a sliding-sync POST body), kept connections are reused,
/// and a request that meets a kept connection closing under it is sent again on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_stream_chunked_answers_reuse_connections_and_survive_a_closing_one() {
    use http_body_util::BodyExt;
    let (port, accepted, bodies) = long_poll_upstream().await;
    let d = door(port, Limits::default(), "127.0.0.1").await;
    let (mut h2, _) = common::h2_connect(d.https, HOST, &d.ca_pem).await;
    let url = |p: &str| format!("https://{HOST}:{}{p}", d.https);
    let mut send = async |req: http::Request<http_body_util::Full<bytes::Bytes>>| {
        let resp = h2.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    };
    let msc4186 =
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=1000&mode=chunked";
    let (st, body) = send(
        http::Request::post(url(msc4186))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"lists":{}}"#,
            )))
            .unwrap(),
    )
    .await;
    assert_eq!((st.as_u16(), body.as_str()), (200, "hello, chunked world"));
    assert_eq!(bodies.lock().unwrap().last().unwrap(), r#"{"lists":{}}"#);
    for _ in 0..3 {
        let (st, body) = send(get(d.https, "/_matrix/client/v3/sync?timeout=1000")).await;
        assert_eq!((st.as_u16(), body.as_str()), (200, "ok"));
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "four long-polls one after another did not reuse one upstream connection"
    );
    let (st, _) = send(get(
        d.https,
        "/_matrix/client/v3/sync?timeout=1000&mode=drop-next",
    ))
    .await;
    assert_eq!(st, 200);
    let (st, body) = send(get(d.https, "/_matrix/client/v3/sync?timeout=1000")).await;
    assert_eq!(
        (st.as_u16(), body.as_str()),
        (200, "ok"),
        "a long-poll whose kept connection closed under it was not sent again"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    let _ = d.stop.send(true);
}

/// Sockets on Synapse's side of its port that Synapse has not closed yet (ESTABLISHED, or
/// CLOSE-WAIT: the front door closed and Synapse has not noticed): the requests it still holds.
fn synapse_side(port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-Htn", "state", "established", "state", "close-wait"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("running ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// How a client goes away in the middle of its long-poll.
#[derive(Clone, Copy, Debug)]
enum Vanish {
    /// HTTP/1.1, TCP FIN without a TLS close_notify.
    Fin,
    /// HTTP/1.1, TLS close_notify then FIN.
    TlsClose,
    /// HTTP/1.1, TCP RST (SO_LINGER 0).
    Reset,
}

/// Abandoned requests free Synapse (issue #28 item 1): 1,000 clients in the middle of a /sync
/// long-poll (half over HTTP/1.1, going away by FIN, TLS close or RST; half as HTTP/2 streams
/// reset with RST_STREAM on connections that stay) leave no request held at Synapse: each one's
/// upstream connection is closed with it, long before the long-poll's own timeout, and
/// `status` counts them.
#[test]
fn through_the_binary_clients_that_vanish_mid_long_poll_free_synapse_at_once() {
    if !common::require_appliance() {
        return;
    }
    // 1,000 client sockets in this process.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let lab = common::Lab::new("abandon");
    *lab.turn_extra.borrow_mut() = "enabled = false\n".into();
    lab.write_config("[tls]\nmode = \"internal\"\n[bot]\nenabled = false\n");
    let _run = lab.start();
    let pw = lab.add_user("alice", false);
    let m = common::Matrix::new(&lab.synapse_url());
    let token = m.login("alice", &pw);
    let (_, v) = m.req(
        "GET",
        "/_matrix/client/v3/sync?timeout=0",
        Some(&token),
        None,
    );
    let since = v["next_batch"].as_str().unwrap().to_string();
    // Far longer than the test: only the front door closing it can end one early.
    let path = format!("/_matrix/client/v3/sync?since={since}&timeout=120000");
    let ca = std::fs::read_to_string(lab.ca_root()).unwrap();
    let host = lab.matrix_host();
    let port = lab.https_port;
    let before = synapse_side(lab.synapse_port);
    let abandoned_before = lab.status()["upstream"]["abandoned"].as_u64().unwrap();
    const H1: usize = 500;
    const H2_STREAMS: usize = 250;
    let src = |i: u8| std::net::IpAddr::from([127, 0, 0, i]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (h1, h2_conns, h2_streams) = rt.block_on(async {
        // HTTP/1.1: two client addresses of 250 (a quarter of the cap each would be 256).
        let mut h1 = vec![];
        for i in 0..H1 {
            let mut tls =
                common::tls_alpn_from(src(2 + (i % 2) as u8), port, &host, &ca, b"http/1.1").await;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            tls.write_all(req.as_bytes()).await.unwrap();
            let how = [Vanish::Fin, Vanish::TlsClose, Vanish::Reset][i % 3];
            h1.push((tls, how));
        }
        // HTTP/2: two connections from two more addresses, 250 streams each.
        let (mut conns, mut streams) = (vec![], vec![]);
        for c in 0..2u8 {
            let tls = common::tls_alpn_from(src(4 + c), port, &host, &ca, b"h2").await;
            let (client, conn) = h2::client::handshake(tls).await.unwrap();
            tokio::spawn(conn);
            let mut client = client.ready().await.unwrap();
            for _ in 0..H2_STREAMS {
                let req = http::Request::get(format!("https://{host}:{port}{path}"))
                    .header("authorization", format!("Bearer {token}"))
                    .body(())
                    .unwrap();
                let (resp, _) = client.send_request(req, true).unwrap();
                streams.push(resp);
                client = client.ready().await.unwrap();
            }
            conns.push(client);
        }
        (h1, conns, streams)
    });
    let all = H1 + 2 * H2_STREAMS;
    common::wait_until(
        "every long-poll to be held at Synapse",
        Duration::from_secs(300),
        || synapse_side(lab.synapse_port) >= before + all,
    );
    let held = lab.status()["upstream"]["long_polls"].as_u64().unwrap();
    assert!(held >= all as u64, "status shows {held} long-polls held");

    // All go away at once.
    let t0 = Instant::now();
    rt.block_on(async {
        for (mut tls, how) in h1 {
            match how {
                Vanish::Fin => drop(tls),
                Vanish::TlsClose => {
                    let _ = tls.shutdown().await;
                }
                Vanish::Reset => {
                    tls.get_ref().0.inner().set_zero_linger().unwrap();
                    drop(tls);
                }
            }
        }
        // Dropping an h2 response future resets its stream (RST_STREAM CANCEL).
        drop(h2_streams);
    });
    common::wait_until(
        "Synapse to hold none of the vanished long-polls",
        Duration::from_secs(60),
        || synapse_side(lab.synapse_port) <= before,
    );
    let freed = t0.elapsed();
    eprintln!("{all} vanished long-polls freed at Synapse in {freed:?}");
    let abandoned = lab.status()["upstream"]["abandoned"].as_u64().unwrap() - abandoned_before;
    assert_eq!(
        abandoned, all as u64,
        "status counts each abandoned request once"
    );
    assert_eq!(lab.status()["upstream"]["long_polls"], 0);

    // The h2 connections whose streams were reset still serve.
    rt.block_on(async {
        for client in h2_conns {
            let mut client = client.ready().await.unwrap();
            let req = http::Request::get(format!("https://{host}:{port}/_matrix/client/versions"))
                .body(())
                .unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            assert_eq!(resp.await.unwrap().status(), 200);
        }
    });
}
