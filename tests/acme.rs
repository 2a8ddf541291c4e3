//! ACME against a real ACME server (pebble), through the real binary and its front door.

// This test process drives the binary and curl from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::pebble::{self, Pebble};
use common::{Lab, require, require_appliance, wait_until};
use nix::sys::signal::Signal;

fn require_pebble() -> bool {
    require_appliance()
        && require(
            "pebble",
            pebble::available(),
            "apt-get install pebble (packaging/install-deps does)",
        )
}

fn all_acme(lab: &Lab) -> bool {
    let certs = lab.certificates();
    certs.len() == 4 && certs.values().all(|c| c["source"] == "acme")
}

#[test]
fn http_01_issues_one_certificate_per_name_and_the_account_is_kept() {
    if !require_pebble() {
        return;
    }
    let lab = Lab::new("acmehttp");
    // pebble's TLS-ALPN-01 port leads nowhere: only HTTP-01 on our :80 can succeed.
    let pebble = Pebble::start(lab.http_port, common::free_port(), None);
    lab.write_config(&pebble.tls_section(&["http-01"]));
    let mut run = lab.start();
    wait_until(
        "ACME certificates for all four names",
        Duration::from_secs(120),
        || all_acme(&lab),
    );
    let root = lab.path("pebble-root.pem");
    fs::write(&root, pebble.issuing_root()).unwrap();
    // Clients that trust only the CA's root get through: the chain is real and complete.
    let base = lab.https_base();
    assert_eq!(
        lab.https_code(&root, &format!("{base}/_matrix/client/versions")),
        "200"
    );
    assert_eq!(
        lab.https_code(
            &root,
            &format!("https://element.matrix.test:{}/config.json", lab.https_port)
        ),
        "200"
    );
    assert_eq!(
        lab.https_code(
            &root,
            &format!(
                "https://matrix.test:{}/.well-known/matrix/server",
                lab.https_port
            )
        ),
        "200"
    );
    for c in lab.certificates().values() {
        assert!(c["issuer"].as_str().unwrap().contains("Pebble"), "{c}");
        assert!(c["last_error"].is_null(), "{c}");
    }
    let account = lab.state().join("acme/account.json");
    assert_eq!(fs::metadata(&account).unwrap().mode() & 0o777, 0o600);
    for name in [
        "matrix.test",
        "matrix.matrix.test",
        "element.matrix.test",
        "turn.matrix.test",
    ] {
        let key = lab.state().join(format!("acme/certs/{name}/privkey.pem"));
        assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600, "{name}");
    }
    let account_before = fs::read(&account).unwrap();
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20))
            .code(),
        Some(0)
    );
    drop(run);

    // Restart: the saved account and certificates are used; nothing is ordered again.
    let run = lab.start();
    assert!(
        all_acme(&lab),
        "saved certificates not served at once: {:?}",
        lab.certificates()
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = run.log_text();
    assert_eq!(
        log.matches("registered an ACME account").count(),
        1,
        "a second account was registered"
    );
    assert!(
        log.contains("using the saved ACME account")
            || log.matches("ACME certificate installed").count() == 4
    );
    assert_eq!(
        log.matches("ACME certificate installed").count(),
        4,
        "certificates were ordered again"
    );
    assert_eq!(fs::read(&account).unwrap(), account_before);
    assert_eq!(
        lab.https_code(&root, &format!("{base}/_matrix/client/versions")),
        "200"
    );
}

#[test]
fn tls_alpn_01_alone_issues_the_certificates() {
    if !require_pebble() {
        return;
    }
    let lab = Lab::new("acmealpn");
    // pebble's HTTP-01 port leads nowhere: only TLS-ALPN-01 on our :443 can succeed.
    let pebble = Pebble::start(common::free_port(), lab.https_port, None);
    lab.write_config(&pebble.tls_section(&["tls-alpn-01"]));
    let _run = lab.start();
    wait_until(
        "ACME certificates for all four names",
        Duration::from_secs(120),
        || all_acme(&lab),
    );
    let root = lab.path("pebble-root.pem");
    fs::write(&root, pebble.issuing_root()).unwrap();
    // turn.* has no HTTP route (404), but its handshake proves the certificate.
    assert_eq!(
        lab.https_code(
            &root,
            &format!("https://turn.matrix.test:{}/", lab.https_port)
        ),
        "404"
    );
    assert_eq!(
        lab.https_code(
            &root,
            &format!("{}/_matrix/client/versions", lab.https_base())
        ),
        "200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_the_certificate_under_an_open_h2_connection_and_a_dead_ca_changes_nothing() {
    if !require_pebble() {
        return;
    }
    let lab = Lab::new("acmerenew");
    // 30-second certificates: renewal is due after 20 s (a third left).
    let mut pebble = Pebble::start(lab.http_port, lab.https_port, Some(30));
    lab.write_config(&pebble.tls_section(&["http-01"]));
    let run = tokio::task::block_in_place(|| lab.start());
    let host = lab.matrix_host();
    tokio::task::block_in_place(|| {
        wait_until("first ACME certificates", Duration::from_secs(120), || {
            all_acme(&lab)
        })
    });
    let root = pebble.issuing_root();
    let first_expiry = lab.certificates()[&host]["not_after"].as_u64().unwrap();
    let (mut conn, leaf1) = common::h2_connect(lab.https_port, &host, &root).await;
    let get = || {
        http::Request::get(format!("{}/_matrix/client/versions", lab.https_base()))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    assert_eq!(conn.send_request(get()).await.unwrap().status(), 200);

    tokio::task::block_in_place(|| {
        wait_until("the renewal", Duration::from_secs(60), || {
            lab.certificates()[&host]["not_after"].as_u64() > Some(first_expiry)
        })
    });
    // The open connection goes on working; a new one gets the new certificate.
    assert_eq!(conn.send_request(get()).await.unwrap().status(), 200);
    let (_, leaf2) = common::h2_connect(lab.https_port, &host, &root).await;
    assert_ne!(
        leaf1, leaf2,
        "a new connection still got the old certificate"
    );
    let second_expiry = lab.certificates()[&host]["not_after"].as_u64().unwrap();

    // The CA goes away: renewals fail, back off, and the current certificate keeps serving.
    pebble.stop_pebble();
    tokio::task::block_in_place(|| {
        wait_until("two failed renewals", Duration::from_secs(40), || {
            lab.certificates()[&host]["failures"].as_u64() >= Some(2)
        })
    });
    let c = lab.certificates()[&host].clone();
    assert_eq!(c["not_after"].as_u64(), Some(second_expiry), "{c}");
    assert!(
        c["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{c}"
    );
    let (mut conn2, leaf3) = common::h2_connect(lab.https_port, &host, &root).await;
    assert_eq!(leaf3, leaf2);
    assert_eq!(conn2.send_request(get()).await.unwrap().status(), 200);
    // Retry delays grow: read them back from the log ("retrying in N.Ns").
    let log = run.log_text();
    let delays: Vec<f64> = log
        .lines()
        .filter(|l| l.contains(&format!("name={host}")) && l.contains("retrying in"))
        .filter_map(|l| {
            l.split("retrying in ")
                .nth(1)?
                .split('s')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(delays.len() >= 2, "{delays:?}");
    assert!(delays[1] > delays[0], "retries do not back off: {delays:?}");
}
