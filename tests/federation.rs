//! Federation between two appliances on two "hosts" (network namespaces, a veth link, hosts
//! files: tests/common/twohost.rs), as two users' servers meet on the internet.
//!
//! Discovery goes the spec's way (server-server API, "Resolving server names"), one way in
//! each direction of the one pair:
//! - `b.test` exposes 443 but not 8448: `a.test` must find it through the
//!   `/.well-known/matrix/server` that b's front door serves on b.test:443 (delegation to
//!   `matrix.b.test:443`);
//! - `a.test` exposes 8448 but not 443 (its 443 is on its loopback only), so it has no
//!   reachable well-known: `b.test` must fall back to `a.test:8448`.
//!
//! Through the front door, not around it: each Synapse listens on its namespace's loopback
//! only, and its access log names the peer server's veth address for the peer's requests:
//! the X-Forwarded-For the front door writes (Synapse docs, reverse_proxy.md). A front door
//! that dropped or forged the header would show 127.0.0.1 there.
//!
//! `b.test` runs with Synapse workers (`[synapse] workers = 2`, Redis): federation from a
//! reaches b's federation worker through b's balancer (by origin), and b's federation sender
//! worker sends to a.

// The test drives the binary and curl from outside, with std's process API.
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/sdk.rs"]
mod sdk;

use std::process::Output;
use std::time::{Duration, Instant};

use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde_json::{Value, json};

use common::twohost::{Host, TwoHost, invite_and_join, require_twohost, seg};
use common::{Matrix, wait_until};
use sdk::SdkUser;

const WAIT: Duration = Duration::from_secs(90);

/// curl run inside `h`'s namespace, trusting the peer's CA (what its Synapse trusts).
fn curl_in(h: &Host, args: &[&str]) -> Output {
    h.exec("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(h.lab.path("peer-ca.pem"))
        .args(args)
        .output()
        .unwrap()
}

/// The lines of `h`'s Synapse access log for requests made by server `origin`.
fn requests_from(h: &Host, origin: &str) -> Vec<String> {
    let mark = format!(" - {{{origin}}} Processed request: ");
    h.log_text()
        .lines()
        .filter(|l| l.contains(&mark))
        .map(str::to_string)
        .collect()
}

/// b's workers: how many, and the first one's port (inside b's namespace).
const B_WORKERS: u16 = 2;
const B_WORKER_BASE: u16 = 8101;
/// The worker b's balancer sends federation to, with two workers (src/synapse/workers.rs).
const B_FEDERATION_WORKER: &str = "synapse-federation-client";

/// The ports of `h`'s Synapse processes' HTTP listeners.
fn synapse_ports(h: &Host) -> Vec<u16> {
    let mut ports = vec![h.lab.synapse_port];
    if h.server_name == "b.test" {
        ports.extend(B_WORKER_BASE..B_WORKER_BASE + B_WORKERS);
    }
    ports
}

/// Asserts that `h`'s Synapse saw requests from `peer`'s server, each from `peer`'s veth
/// address (the front door's X-Forwarded-For), one of them on `path`.
fn assert_through_front_door(h: &Host, peer: &Host, path: &str) {
    let lines = requests_from(h, &peer.server_name);
    assert!(
        lines.iter().any(|l| l.contains(path)),
        "{}'s Synapse logged no request from {} on {path}; its requests from there: {lines:#?}",
        h.server_name,
        peer.server_name
    );
    let want: Vec<String> = synapse_ports(h)
        .iter()
        .map(|port| {
            format!(
                " - {} - {port} - {{{}}} Processed request: ",
                peer.ip, peer.server_name
            )
        })
        .collect();
    let odd: Vec<&String> = lines
        .iter()
        .filter(|l| !want.iter().any(|w| l.contains(w)))
        .collect();
    assert!(
        odd.is_empty(),
        "requests from {} reached {}'s Synapse without the front door's X-Forwarded-For {}: {odd:#?}",
        peer.server_name,
        h.server_name,
        peer.ip
    );
}

/// Synapse's TCP listeners inside `h`'s namespace are on loopback only.
fn assert_synapse_on_loopback(h: &Host) {
    let out = h.exec("ss").args(["-Hltn"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for port in synapse_ports(h) {
        let port = format!(":{port}");
        let binds: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter(|a| a.ends_with(&port))
            .collect();
        assert_eq!(binds, [format!("127.0.0.1{port}")], "{text}");
    }
}

/// curl's exit code for a connection to `url` from `h`'s namespace.
fn curl_exit(h: &Host, url: &str) -> Option<i32> {
    curl_in(h, &["-o", "/dev/null", url]).status.code()
}

/// The timeline of `room` as `token`'s user sees it (newest first).
fn timeline(m: &Matrix, token: &str, room: &str) -> Vec<Value> {
    let (st, v) = m.req(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
            seg(room)
        ),
        Some(token),
        None,
    );
    assert_eq!(st, 200, "{v}");
    v["chunk"].as_array().cloned().unwrap_or_default()
}

fn send_text(m: &Matrix, token: &str, room: &str, body: &str) {
    let txn = format!("t{}", rand::random::<u64>());
    let (st, v) = m.req(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            seg(room)
        ),
        Some(token),
        Some(json!({"msgtype": "m.text", "body": body})),
    );
    assert_eq!(st, 200, "sending {body:?}: {v}");
}

/// Waits until `m`'s user sees `body` from `sender` in `room`.
fn wait_message(m: &Matrix, token: &str, room: &str, sender: &str, body: &str) {
    wait_until(&format!("{body:?} from {sender}"), WAIT, || {
        timeline(m, token, room)
            .iter()
            .any(|e| e["sender"] == sender && e["content"]["body"] == body)
    });
}

/// Someone with matrix-sdk.
struct Person {
    sdk: SdkUser,
}

impl Person {
    async fn login(hs: &str, http: Option<reqwest::Client>, user: &str, password: &str) -> Person {
        let mut sdk = SdkUser::login_with(hs, http, user, password, "federation test").await;
        sdk.start_sync();
        Person { sdk }
    }

    /// Waits until this client knows a device of `who` (fetched over federation).
    async fn wait_devices_of(&self, who: &UserId) {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self
                .sdk
                .client
                .encryption()
                .get_user_devices(who)
                .await
                .map(|d| d.devices().count())
                .unwrap_or(0);
            if n > 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never learned a device of {who}",
                self.sdk.user_id()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for `body` from `from` in `room`; returns whether it arrived encrypted.
    async fn wait_for(&self, room: &OwnedRoomId, from: &UserId, body: &str) -> bool {
        let what = format!("{body:?} from {from}");
        let m = self
            .sdk
            .wait_msg(WAIT, &what, |m| {
                &m.room == room && m.sender == from && m.body == body
            })
            .await;
        m.encrypted
    }
}

#[test]
fn two_appliances_federate() {
    if !require_twohost()
        || !common::require(
            "redis-server",
            std::path::Path::new("/usr/bin/redis-server").exists(),
            "apt install redis-server (packaging/install-deps does): b.test runs with workers",
        )
    {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let t0 = Instant::now();
    let mut pair = TwoHost::new("fed");
    // a.test: no reachable well-known (443 on its loopback only); 8448 open.
    pair.a.listen_http = "127.0.0.1".into();
    pair.a.listen_https = "127.0.0.1".into();
    // b.test: 443 (and its well-known) open; 8448 on its loopback only.
    pair.b.listen_federation = "127.0.0.1".into();
    *pair.b.lab.synapse_extra.borrow_mut() =
        format!("workers = {B_WORKERS}\nworker_base_port = {B_WORKER_BASE}\n");
    pair.start();
    let started = t0.elapsed();
    eprintln!("both appliances READY after {started:?}");
    let (a, b) = (&pair.a, &pair.b);

    // The way each must go is the only way: a's 443 and b's 8448 are closed to the other.
    assert_eq!(
        curl_exit(b, "https://a.test/"),
        Some(7),
        "a.test:443 from b"
    );
    assert_eq!(
        curl_exit(a, "https://b.test:8448/_matrix/federation/v1/version"),
        Some(7),
        "b.test:8448 from a"
    );
    // b's well-known, as a's Synapse fetches it.
    let out = curl_in(a, &["https://b.test/.well-known/matrix/server"]);
    let wk: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "b.test's well-known: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(wk, json!({"m.server": "matrix.b.test:443"}));
    for h in pair.hosts() {
        assert_synapse_on_loopback(h);
    }

    a.add_user("alice", "alice-secret-pw");
    b.add_user("bob", "bob-secret-pw");
    let (alice_id, bob_id) = (a.mxid("alice"), b.mxid("bob"));
    // b's clients go through b's front door, as with workers they must.
    let (ma, mb) = (a.matrix(), b.front_matrix());
    let alice = ma.login("alice", "alice-secret-pw");
    let bob = mb.login("bob", "bob-secret-pw");

    // alice's room; bob invited, over federation (a -> b: the well-known way); bob joins
    // (b -> a: make_join/send_join through a.test:8448).
    let room = invite_and_join((&ma, &alice), (&mb, &bob, &bob_id), "across", WAIT);
    // Messages both ways.
    send_text(&ma, &alice, &room, "hello from a.test");
    wait_message(&mb, &bob, &room, &alice_id, "hello from a.test");
    send_text(&mb, &bob, &room, "hello from b.test");
    wait_message(&ma, &alice, &room, &bob_id, "hello from b.test");
    let t_messages = t0.elapsed();

    // Media uploaded on a.test downloads on b.test, authenticated (Matrix 1.11, client
    // /_matrix/client/v1/media/download; b's Synapse fetches it with
    // /_matrix/federation/v1/media/download).
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = a.lab.path("blob.bin");
    std::fs::write(&file, &blob).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "-H"])
        .arg(format!("Authorization: Bearer {alice}"))
        .args([
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(format!(
            "{}/_matrix/media/v3/upload?filename=blob.bin",
            ma.base
        ))
        .output()
        .unwrap();
    let up: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("upload: {}", String::from_utf8_lossy(&out.stdout)));
    let mxc = up["content_uri"].as_str().unwrap_or_else(|| panic!("{up}"));
    let media_id = mxc.strip_prefix("mxc://a.test/").expect("an a.test mxc");
    let got = a.lab.path("got.bin");
    // Through b's front door, as a client goes: with workers, b's media is its media
    // worker's (b's main process serves no media, docs/workers.md "media repository").
    let b_front = b.forward(443);
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "-o"])
        .arg(&got)
        .arg("--cacert")
        .arg(a.lab.path("peer-ca.pem"))
        .arg("--connect-to")
        .arg(format!("matrix.b.test:443:127.0.0.1:{b_front}"))
        .arg("-H")
        .arg(format!("Authorization: Bearer {bob}"))
        .arg(format!(
            "https://matrix.b.test/_matrix/client/v1/media/download/a.test/{media_id}"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bob's download of {mxc}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&got).unwrap() == blob,
        "bob got other bytes for {mxc}"
    );
    assert_through_front_door(a, b, "/_matrix/federation/v1/media/download/");

    // An encrypted room, with real clients on both sides (matrix-sdk).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (hs_a, hs_b) = (ma.base.clone(), mb.base.clone());
    let b_http = b.front_http();
    let secret_room = rt.block_on(async {
        let alice = Person::login(&hs_a, None, "alice", "alice-secret-pw").await;
        let bob = Person::login(&hs_b, Some(b_http), "bob", "bob-secret-pw").await;
        let bob_uid: OwnedUserId = bob_id.parse().unwrap();
        let alice_uid: OwnedUserId = alice_id.parse().unwrap();
        let dm = alice.sdk.client.create_dm(&bob_uid).await.unwrap();
        let room = dm.room_id().to_owned();
        let deadline = Instant::now() + WAIT;
        while bob.sdk.client.join_room_by_id(&room).await.is_err() {
            assert!(Instant::now() < deadline, "bob could not join {room}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let m = dm.get_member_no_sync(&bob_uid).await.ok().flatten();
            if m.is_some_and(|m| *m.membership() == MembershipState::Join) {
                break;
            }
            assert!(Instant::now() < deadline, "alice never saw bob join {room}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        alice.wait_devices_of(&bob_uid).await;
        dm.send(RoomMessageEventContent::text_plain("secret from a.test"))
            .await
            .unwrap();
        assert!(
            bob.wait_for(&room, &alice_uid, "secret from a.test").await,
            "alice's message reached bob unencrypted"
        );
        bob.wait_devices_of(&alice_uid).await;
        let bobs_room = bob
            .sdk
            .client
            .get_room(&room)
            .expect("bob's client has the room");
        bobs_room
            .send(RoomMessageEventContent::text_plain("secret from b.test"))
            .await
            .unwrap();
        assert!(
            alice.wait_for(&room, &bob_uid, "secret from b.test").await,
            "bob's message reached alice unencrypted"
        );
        room
    });
    // Each server holds ciphertext only.
    for (m, token) in [(&ma, &alice), (&mb, &bob)] {
        let events = timeline(m, token, secret_room.as_str());
        let texts: Vec<&Value> = events
            .iter()
            .filter(|e| e["sender"] == alice_id.as_str() || e["sender"] == bob_id.as_str())
            .filter(|e| e.get("state_key").is_none())
            .collect();
        assert!(texts.len() >= 2, "{events:#?}");
        assert!(
            texts.iter().all(|e| e["type"] == "m.room.encrypted"),
            "plaintext on a server: {texts:#?}"
        );
        let all = serde_json::to_string(&events).unwrap();
        assert!(!all.contains("secret from"), "plaintext on a server: {all}");
    }

    // Every request each Synapse got from the other server came through the front door.
    assert_through_front_door(a, b, "/_matrix/federation/v1/send/");
    assert_through_front_door(b, a, "/_matrix/federation/v1/send/");
    assert_through_front_door(b, a, "/invite/");
    // On b, inbound federation is the federation worker's (docs/workers.md), not main's.
    let sends: Vec<String> = requests_from(b, &a.server_name)
        .into_iter()
        .filter(|l| l.contains("/_matrix/federation/v1/send/"))
        .collect();
    let tag = format!("child={B_FEDERATION_WORKER}");
    assert!(
        sends
            .iter()
            .all(|l| l.ends_with(&tag) || l.contains(&format!("{tag} "))),
        "b's transactions from a, all on its federation worker: {sends:#?}"
    );
    assert_through_front_door(a, b, "/_matrix/federation/v1/make_join/");
    // Device lists for the encrypted room (user/devices or user/keys/query).
    assert_through_front_door(a, b, "/_matrix/federation/v1/user/");
    assert_through_front_door(b, a, "/_matrix/federation/v1/user/");
    // Server keys are fetched without an origin; here only the peer fetches them.
    for (me, peer) in [(a, b), (b, a)] {
        let keys: Vec<String> = me
            .log_text()
            .lines()
            .filter(|l| l.contains("Processed request: ") && l.contains(" /_matrix/key/v2/server"))
            .map(str::to_string)
            .collect();
        let want: Vec<String> = synapse_ports(me)
            .iter()
            .map(|port| format!(" - {} - {port} - ", peer.ip))
            .collect();
        assert!(
            !keys.is_empty() && keys.iter().all(|l| want.iter().any(|w| l.contains(w))),
            "{}'s key requests, all from {} through the front door: {keys:#?}",
            me.server_name,
            peer.ip
        );
    }
    eprintln!(
        "timings: READY {started:?}, messages both ways at {t_messages:?}, all done at {:?}",
        t0.elapsed()
    );
}
