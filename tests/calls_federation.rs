//! Calls across servers (issue #27): two appliances on two "hosts" (tests/common/twohost.rs),
//! both with `[matrixrtc]`. Element Call asks the SFU's own authorization service for a token
//! whenever it subscribes to media on an SFU it does not publish on, so a user of b.test in a
//! call on a.test asks a.test's service, with an OpenID token b.test issued. a.test checks it
//! on b.test (server discovery, then `/_matrix/federation/v1/openid/userinfo`, the way a
//! remote server reaches it: through b's front door) and answers with a LiveKit token to join
//! and watch, never to publish or to create the room; a.test's own user keeps full grants.
//! A forged token, a server that does not exist, and a server name that leads to loopback get
//! nothing, the last without any request to what it names.
//!
//! No LiveKit server runs: the service signs tokens and never calls the SFU; the tokens are
//! checked with the `livekit-api` crate, as an SFU checks them.

// The test drives the binary from outside, with std's process API.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use livekit_api::access_token::{Claims, TokenVerifier};
use serde_json::{Value, json};

use common::Matrix;
use common::twohost::{BASE_EXTRA, Host, TwoHost, invite_and_join, require_twohost, seg};

const WAIT: Duration = Duration::from_secs(90);
const KEY: &str = "APIcallsAcross";
const SECRET: &str = "a-secret-of-forty-characters-for-hs256ok";
const SLOT: &str = "m.call#ROOM";

/// `[matrixrtc]` for `h`: a LiveKit URL (nothing listens there), its key files, and trust
/// for the other host (its CA, and its private address on the link).
fn with_calls(h: &mut Host) {
    let (key, secret) = (h.lab.path("livekit.key"), h.lab.path("livekit.secret"));
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    h.extra = format!(
        "{BASE_EXTRA}[matrixrtc]\nlivekit_url = \"wss://livekit.{sn}\"\napi_key_file = \"{}\"\napi_secret_file = \"{}\"\nfederation_ca_file = \"{}\"\nallow_private_servers = true\n",
        key.display(),
        secret.display(),
        h.lab.path("peer-ca.pem").display(),
        sn = h.server_name,
    );
}

fn openid(m: &Matrix, token: &str, user: &str) -> Value {
    let (st, v) = m.req(
        "POST",
        &format!("/_matrix/client/v3/user/{}/openid/request_token", seg(user)),
        Some(token),
        Some(json!({})),
    );
    assert_eq!(st, 200, "{v}");
    v
}

fn get_token(service: &Matrix, room: &str, openid: &Value, user: &str) -> (u16, Value) {
    service.req(
        "POST",
        "/livekit/jwt/get_token",
        None,
        Some(json!({
            "room_id": room,
            "slot_id": SLOT,
            "openid_token": openid,
            "member": {"id": "member-1", "claimed_user_id": user, "claimed_device_id": "PHONE1"},
        })),
    )
}

fn claims(v: &Value) -> Claims {
    let jwt = v["jwt"].as_str().unwrap_or_else(|| panic!("no jwt in {v}"));
    TokenVerifier::with_api_key(KEY, SECRET)
        .verify(jwt)
        .unwrap_or_else(|e| panic!("the token does not verify: {e:?}"))
}

/// How many OpenID userinfo requests `h`'s Synapse has answered.
fn userinfo_requests(h: &Host) -> usize {
    h.log_text()
        .lines()
        .filter(|l| l.contains("/_matrix/federation/v1/openid/userinfo"))
        .count()
}

fn refused(st: u16, v: &Value, what: &str) {
    assert_eq!(
        (st, v["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED")),
        "{what}: {v}"
    );
    assert!(v.get("jwt").is_none(), "{what}: {v}");
}

#[test]
fn a_user_of_another_server_joins_and_watches_a_call_here() {
    if !require_twohost() {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let t0 = Instant::now();
    let mut pair = TwoHost::new("rtc");
    with_calls(&mut pair.a);
    with_calls(&mut pair.b);
    pair.start();
    eprintln!("both appliances READY after {:?}", t0.elapsed());
    let (a, b) = (&pair.a, &pair.b);

    a.add_user("alice", "alice-secret-pw");
    b.add_user("bob", "bob-secret-pw");
    let (alice_id, bob_id) = (a.mxid("alice"), b.mxid("bob"));
    let (ma, mb) = (a.front_matrix(), b.front_matrix());
    let alice = ma.login("alice", "alice-secret-pw");
    let bob = mb.login("bob", "bob-secret-pw");

    // alice's room on a; bob invited over federation and joined.
    let room = invite_and_join((&ma, &alice), (&mb, &bob, &bob_id), "the call", WAIT);

    // alice, of a: full grants on a's SFU.
    let alice_openid = openid(&ma, &alice, &alice_id);
    let (st, v) = get_token(&ma, &room, &alice_openid, &alice_id);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["url"], "wss://livekit.a.test");
    let c = claims(&v);
    assert!(c.video.room_join && c.video.room_create, "{:?}", c.video);
    assert_eq!(c.video.can_publish, Some(true));
    assert_eq!(c.video.can_subscribe, Some(true));

    // bob, of b, in the same call on a's SFU: checked with b.test (its well-known, then its
    // front door), then join and subscribe only.
    let bob_openid = openid(&mb, &bob, &bob_id);
    assert_eq!(bob_openid["matrix_server_name"], "b.test");
    let asked_b = userinfo_requests(b);
    let t = Instant::now();
    let (st, v) = get_token(&ma, &room, &bob_openid, &bob_id);
    eprintln!("a remote user's token: {:?}", t.elapsed());
    assert_eq!(st, 200, "{v}");
    let c = claims(&v);
    assert_eq!(
        c.video.room,
        claims(&get_token(&ma, &room, &alice_openid, &alice_id).1)
            .video
            .room
    );
    assert!(c.video.room_join, "{:?}", c.video);
    assert!(
        !c.video.room_create,
        "a remote user may not open the room: {:?}",
        c.video
    );
    assert_eq!(c.video.can_publish, Some(false), "{:?}", c.video);
    assert_eq!(c.video.can_publish_data, Some(false), "{:?}", c.video);
    assert_eq!(c.video.can_subscribe, Some(true), "{:?}", c.video);
    assert!(!c.video.room_admin && !c.video.room_list);
    assert!(
        userinfo_requests(b) > asked_b,
        "b.test's Synapse was not asked about bob's token:\n{}",
        b.log_text()
    );
    // The legacy request (/sfu/get) gives him the same.
    let (st, v) = ma.req(
        "POST",
        "/livekit/jwt/sfu/get",
        None,
        Some(json!({"room": room, "openid_token": bob_openid, "device_id": "PHONE1"})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(claims(&v).video.can_publish, Some(false));

    // Not in the room: nothing. (alice's second room, bob not invited.)
    let (st, v) = ma.req(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&alice),
        Some(json!({"preset": "private_chat", "name": "alice only"})),
    );
    assert_eq!(st, 200, "{v}");
    let alone = v["room_id"].as_str().unwrap().to_string();
    let (st, v) = get_token(&ma, &alone, &bob_openid, &bob_id);
    assert_eq!(
        (st, v["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{v}"
    );

    // A forged token said to be b's: b refuses it.
    let mut forged = bob_openid.clone();
    forged["access_token"] = "QmFkVG9rZW5Gb3JnZWRCeUF0dGFja2Vy".into();
    let (st, v) = get_token(&ma, &room, &forged, &bob_id);
    refused(st, &v, "a forged token");
    // bob's real token passed off as another b user's.
    let (st, v) = get_token(&ma, &room, &bob_openid, "@mallory:b.test");
    refused(st, &v, "bob's token as mallory's");
    // A server that does not exist.
    let mut nowhere = bob_openid.clone();
    nowhere["matrix_server_name"] = "c.test".into();
    let t = Instant::now();
    let (st, v) = get_token(&ma, &room, &nowhere, "@bob:c.test");
    refused(st, &v, "a server that does not exist");
    eprintln!("a server that does not exist: refused in {:?}", t.elapsed());
    // Server names that lead to a's own loopback (its front door's 8448, its own Synapse
    // behind it would vouch for alice): refused before any request. alice's real token,
    // claimed to be of "localhost:8448", reaches no Synapse.
    let asked_a = userinfo_requests(a);
    for name in ["localhost:8448", "127.0.0.1:8448", "[::1]:8448"] {
        let mut looped = alice_openid.clone();
        looped["matrix_server_name"] = name.into();
        let (st, v) = get_token(&ma, &room, &looped, &format!("@alice:{name}"));
        refused(st, &v, name);
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not a public address"),
            "{name}: {v}"
        );
    }
    // Not a server name at all.
    let mut bad = bob_openid.clone();
    bad["matrix_server_name"] = "b.test/evil".into();
    let (st, v) = get_token(&ma, &room, &bad, "@bob:b.test/evil");
    assert_eq!(st, 400, "{v}");
    assert_eq!(
        userinfo_requests(a),
        asked_a,
        "a server name at loopback reached a's Synapse"
    );
    // The doctor on each side checks what callers meet from outside (the well-known's
    // focus, both transports paths, userinfo through discovery and the federation port, the
    // service with a real token); only the SFU, which does not run here, is a warning.
    for h in [a, b] {
        let out = h
            .cli(&["doctor", "--json", "--only", "matrixrtc"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        let checks = v["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 5, "{v}");
        for c in checks {
            let want = if c["name"] == "matrixrtc" {
                "warn"
            } else {
                "pass"
            };
            assert_eq!(c["status"], want, "{}: {c}", h.server_name);
        }
    }
    // None of this wrote a warning: what remote parties get wrong is theirs.
    let warns: Vec<String> = a
        .log_text()
        .lines()
        .filter(|l| l.contains("MatrixRTC") && (l.contains("WARN") || l.contains("ERROR")))
        .map(str::to_string)
        .collect();
    assert!(warns.is_empty(), "{warns:#?}");
    eprintln!("calls across servers: {:?} in all", t0.elapsed());
}
