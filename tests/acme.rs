//! ACME against a real ACME server (pebble), through the real binary and its front door.

// This test process drives the binary and curl from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::pebble::{self, AriProxy, Pebble, StalledCa};
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
    // Retry delays grow: read them back from the log.
    let delays = retry_delays(&run.log_text(), &host);
    assert!(delays.len() >= 2, "{delays:?}");
    assert!(delays[1] > delays[0], "retries do not back off: {delays:?}");
}

/// The retry delays logged for `host` ("retrying in N.Ns"), in order.
fn retry_delays(log: &str, host: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains(&format!("name={host} ")) && l.contains("retrying in"))
        .filter_map(|l| {
            l.split("retrying in ")
                .nth(1)?
                .split('s')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// No certificate's renewalInfo was fetched again sooner than `retry_after` seconds.
fn polls_honour_retry_after(proxy: &AriProxy, retry_after: u64) {
    let polls = proxy.polls();
    let mut last: BTreeMap<&str, std::time::SystemTime> = BTreeMap::new();
    for (id, t) in &polls {
        if let Some(prev) = last.insert(id, *t) {
            let gap = t.duration_since(prev).unwrap();
            assert!(
                gap + Duration::from_secs(2) >= Duration::from_secs(retry_after),
                "{id} polled again after {gap:?}, before its Retry-After of {retry_after}s: {polls:?}"
            );
        }
    }
}

const NAMES: [&str; 4] = [
    "matrix.test",
    "matrix.matrix.test",
    "element.matrix.test",
    "turn.matrix.test",
];

/// The stored renewal metadata of each name (state/acme/renewal/<name>.json).
fn renewals(lab: &Lab) -> BTreeMap<String, serde_json::Value> {
    NAMES
        .iter()
        .map(|n| {
            let p = lab.state().join(format!("acme/renewal/{n}.json"));
            let text = fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("no renewal metadata {}: {e}", p.display()));
            (n.to_string(), serde_json::from_str(&text).unwrap())
        })
        .collect()
}

fn next_attempts(lab: &Lab) -> BTreeMap<String, u64> {
    lab.certificates()
        .into_iter()
        .map(|(n, c)| (n, c["next_attempt"].as_u64().unwrap_or(0)))
        .collect()
}

/// A CA that accepts connections and never answers: the appliance is ready anyway and serves
/// the internal stand-in, each request times out with an error naming the CA, attempts are
/// retried with backoff, and SIGTERM still stops it promptly, even mid-request.
#[test]
fn a_ca_that_never_answers_times_out_and_does_not_hold_up_start_or_stop() {
    if !require_appliance() {
        return;
    }
    let ca = StalledCa::start();
    let lab = Lab::new("acmestall");
    let tls = |timeout: &str| {
        format!(
            "[tls]\nmode = \"acme\"\nacme_directory = \"{}\"\nacme_timeout = \"{timeout}\"\n",
            ca.directory_url()
        )
    };
    lab.write_config(&tls("2s"));
    let mut run = lab.start();
    let certs = lab.certificates();
    assert_eq!(certs.len(), 4);
    assert!(
        certs.values().all(|c| c["source"] == "internal"),
        "{certs:?}"
    );
    assert_eq!(
        lab.https_code(
            &lab.ca_root(),
            &format!("{}/_matrix/client/versions", lab.https_base())
        ),
        "200"
    );
    let expect = format!("did not answer GET {} within 2s", ca.directory_url());
    wait_until("a timeout naming the CA", Duration::from_secs(30), || {
        run.log_text().contains(&expect)
    });
    // Every name failed once and waits before the next try: the first retry of a first
    // issuance is about a minute (jittered), the next about two.
    wait_until("second attempts", Duration::from_secs(120), || {
        lab.certificates()
            .values()
            .all(|c| c["failures"].as_u64() >= Some(2))
    });
    let host = lab.matrix_host();
    let delays = retry_delays(&run.log_text(), &host);
    assert!(delays.len() >= 2, "{delays:?}");
    assert!(delays[0] >= 30.0, "no backoff: {delays:?}");
    assert!(delays[1] > delays[0], "retries do not back off: {delays:?}");
    let c = &lab.certificates()[&host];
    assert!(
        c["last_error"]
            .as_str()
            .unwrap_or("")
            .contains(&ca.directory_url()),
        "{c}"
    );
    assert_eq!(c["source"], "internal", "{c}");
    let stop = stops_promptly(&mut run);
    eprintln!("stop while the CA does not answer: {stop:?}");
    drop(run);

    // A long timeout: SIGTERM while requests to the CA hang.
    lab.write_config(&tls("10m"));
    let before = ca.accepted();
    let mut run = lab.start();
    wait_until(
        "requests hanging at the CA",
        Duration::from_secs(30),
        || ca.accepted() > before,
    );
    std::thread::sleep(Duration::from_secs(1));
    let stop = stops_promptly(&mut run);
    eprintln!("stop with a hanging CA request: {stop:?}");
}

/// SIGTERM stops the appliance cleanly well within 15 s (Synapse's own stop included).
fn stops_promptly(run: &mut common::Running) -> Duration {
    let t = Instant::now();
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
            .code(),
        Some(0)
    );
    let stop = t.elapsed();
    assert!(stop < Duration::from_secs(15), "stopping took {stop:?}");
    stop
}

/// Without ARI (Debian's pebble has none), the renewal time is drawn once per certificate,
/// stored, and the same across hourly checks (here every second) and restarts.
#[test]
fn the_renewal_time_is_stored_and_kept_across_checks_and_restarts() {
    if !require_pebble() {
        return;
    }
    let lab = Lab::new("acmesched");
    // One-hour certificates: renewal is due 20 minutes before expiry, minus up to 2 minutes.
    let pebble = Pebble::start(lab.http_port, common::free_port(), Some(3600));
    lab.write_config(&format!(
        "{}acme_check_interval = \"1s\"\n",
        pebble.tls_section(&["http-01"])
    ));
    let mut run = lab.start();
    wait_until(
        "ACME certificates for all four names",
        Duration::from_secs(120),
        || all_acme(&lab),
    );
    wait_until("renewal times", Duration::from_secs(10), || {
        next_attempts(&lab).values().all(|t| *t > 0)
    });
    let first = next_attempts(&lab);
    for (name, c) in lab.certificates() {
        let not_after = c["not_after"].as_u64().unwrap();
        let at = first[&name];
        assert!(
            at <= not_after - 1200 && at + 1 >= not_after - 1200 - 120,
            "{name}: renews at {at}, expires at {not_after}"
        );
    }
    // Several checks later: the same times.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(next_attempts(&lab), first, "re-drawn by a check");
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
            .code(),
        Some(0)
    );
    drop(run);
    let _run = lab.start();
    wait_until(
        "renewal times after the restart",
        Duration::from_secs(10),
        || next_attempts(&lab).values().all(|t| *t > 0),
    );
    assert_eq!(next_attempts(&lab), first, "re-drawn by a restart");
    // What keeps it: the stored metadata.
    for (name, r) in renewals(&lab) {
        assert_eq!(r["basis"], "lifetime", "{r}");
        assert_eq!(r["renew_at"].as_u64(), Some(first[&name]), "{name}: {r}");
    }
    let mode = fs::metadata(lab.state().join("acme/renewal/matrix.test.json"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// With ARI (RFC 9773; a proxy adds it to Debian's pebble, which has none): the time is drawn
/// in the CA's window and kept, renewalInfo is polled again only after its Retry-After, and
/// when the window says "now", the renewal order carries `replaces` with the identifier of
/// the certificate it replaces.
#[test]
fn ari_windows_and_retry_after_are_honoured_and_renewals_carry_replaces() {
    if !require_pebble() {
        return;
    }
    let lab = Lab::new("acmeari");
    let pebble = Pebble::start(lab.http_port, common::free_port(), None);
    const RETRY_AFTER: u64 = 70;
    let proxy = AriProxy::start(&pebble, RETRY_AFTER);
    lab.write_config(&format!(
        "{}acme_check_interval = \"1s\"\n",
        pebble
            .tls_section(&["http-01"])
            .replace(&pebble.directory_url, &proxy.directory_url)
    ));
    let mut run = lab.start();
    wait_until(
        "ACME certificates for all four names",
        Duration::from_secs(120),
        || all_acme(&lab),
    );
    wait_until(
        "a renewalInfo poll per certificate",
        Duration::from_secs(20),
        || {
            proxy
                .polls()
                .iter()
                .map(|p| &p.0)
                .collect::<BTreeSet<_>>()
                .len()
                == 4
        },
    );
    let ids: BTreeSet<String> = proxy.polls().into_iter().map(|p| p.0).collect();
    assert!(
        proxy.replaces().is_empty(),
        "a first order carried replaces"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    wait_until(
        "renewal times in the ARI window",
        Duration::from_secs(10),
        || {
            next_attempts(&lab)
                .values()
                .all(|t| *t >= now + 9 * 86400 && *t <= now + 11 * 86400 + 60)
        },
    );
    let first = next_attempts(&lab);
    // Checks every second, a restart: no new poll before Retry-After, the same times.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
            .code(),
        Some(0)
    );
    drop(run);
    let run = lab.start();
    std::thread::sleep(Duration::from_secs(2));
    polls_honour_retry_after(&proxy, RETRY_AFTER);
    assert_eq!(next_attempts(&lab), first, "re-drawn by a restart");
    // What keeps them: the stored metadata, with the window and the CA's Retry-After.
    let stored = renewals(&lab);
    for (name, r) in &stored {
        assert_eq!(r["basis"], "ari", "{r}");
        assert_eq!(r["renew_at"].as_u64(), Some(first[name]), "{name}");
        let next = r["ari_next_poll"].as_u64().unwrap();
        assert!(
            proxy.polls().iter().any(|(_, t)| {
                let due = unix(*t) + RETRY_AFTER;
                next + 2 >= due && next <= due + 2
            }),
            "{name}: the next poll is not a poll plus the CA's Retry-After: {r} {:?}",
            proxy.polls()
        );
    }

    // The CA now wants these certificates replaced: at the next poll, each is renewed with
    // `replaces` naming it.
    proxy.renew_now(ids.iter().cloned());
    wait_until(
        "four renewal orders with replaces",
        Duration::from_secs(RETRY_AFTER + 90),
        || proxy.replaces().len() >= 4,
    );
    let replaced: BTreeSet<String> = proxy.replaces().into_iter().collect();
    assert_eq!(
        replaced, ids,
        "replaces does not name the replaced certificates"
    );
    polls_honour_retry_after(&proxy, RETRY_AFTER);
    wait_until(
        "the new certificates' schedules",
        Duration::from_secs(60),
        || {
            let now = renewals(&lab);
            NAMES
                .iter()
                .all(|n| now[*n]["cert_sha256"] != stored[*n]["cert_sha256"])
        },
    );
    assert!(
        run.log_text().contains("renewal order placed"),
        "the renewal is not logged"
    );
}
