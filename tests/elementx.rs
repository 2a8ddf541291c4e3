//! The Element X path (issue #17 item 2), proven with the engine Element X is built on:
//! matrix-sdk-ui's `SyncService` and `RoomListService` (native sliding sync, MSC4186) and its
//! `Timeline`, against the real binary and Synapse. The clients are given only the server name:
//! they find the homeserver from `https://<server_name>/.well-known/matrix/client` and reach it
//! through the front door on 443, trusting the internal CA as a phone would once told to.
//! Password login, the room list, a live message in an encrypted room, and media through the
//! authenticated media endpoints (MSC3916, Matrix 1.11).

#![cfg(feature = "bot")]
// matrix-sdk-ui's timeline futures nest deeper than the default limit.
#![recursion_limit = "256"]
// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{Lab, LogOnPanic, own_loopback, require_appliance};
use futures_util::StreamExt;
use matrix_sdk::media::{MediaFormat, MediaRequestParameters};
use matrix_sdk::reqwest;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::room::MediaSource;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::{MessageType, RoomMessageEventContent};
use matrix_sdk::ruma::events::{InitialStateEvent, StateEventType};
use matrix_sdk::ruma::{OwnedRoomId, RoomId, ServerName, UserId};
use matrix_sdk::sliding_sync::VersionBuilder;
use matrix_sdk::{Client, RoomState};
use matrix_sdk_ui::eyeball_im::Vector;
use matrix_sdk_ui::room_list_service::RoomListItem;
use matrix_sdk_ui::room_list_service::filters::new_filter_non_left;
use matrix_sdk_ui::sync_service::{State, SyncService};
use matrix_sdk_ui::timeline::{AttachmentConfig, AttachmentSource, RoomExt, Timeline};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const PICTURE: &[u8] = b"\x89PNG\r\n\x1a\n not really a picture, but bytes to get back intact";

/// An HTTP client as a phone's: the internal CA trusted, the lab's names resolved to where
/// the front door listens (always 443, as server discovery and the well-known's URL assume).
fn http_client(lab: &Lab, ip: Ipv4Addr) -> reqwest::Client {
    let ca = std::fs::read(lab.ca_root()).unwrap();
    let at = SocketAddr::from((ip, 443));
    reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve(&lab.server_name, at)
        .resolve(&lab.matrix_host(), at)
        .resolve(&format!("element.{}", lab.server_name), at)
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap()
}

/// A person on Element X's engine: discovered homeserver, password login, SyncService.
struct Phone {
    client: Client,
    sync: SyncService,
    _store: tempfile::TempDir,
}

impl Phone {
    async fn sign_in(lab: &Lab, ip: Ipv4Addr, user: &str, password: &str) -> Phone {
        let store = tempfile::tempdir().unwrap();
        let server: &ServerName = lab.server_name.as_str().try_into().unwrap();
        let client = Client::builder()
            .server_name(server)
            .http_client(http_client(lab, ip))
            // As Element X: use native sliding sync only if /versions says the server has it.
            .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
            .sqlite_store(store.path(), None)
            .build()
            .await
            .unwrap_or_else(|e| panic!("{user}: building the client from the server name: {e}"));
        assert_eq!(
            client.homeserver().as_str(),
            format!("https://{}/", lab.matrix_host()),
            "the homeserver was not found from the server name's well-known"
        );
        client
            .matrix_auth()
            .login_username(user, password)
            .initial_device_display_name("Element X path test")
            .send()
            .await
            .unwrap_or_else(|e| panic!("password login {user}: {e}"));
        let sync = SyncService::builder(client.clone())
            .build()
            .await
            .unwrap_or_else(|e| panic!("{user}: SyncService: {e}"));
        sync.start().await;
        Phone {
            client,
            sync,
            _store: store,
        }
    }

    fn user_id(&self) -> &UserId {
        self.client.user_id().unwrap()
    }

    /// Waits until the room list Element X shows (non-left rooms, its sorting) has `room`
    /// in `state`; returns what the list showed.
    async fn room_in_list(&self, room: &RoomId, state: RoomState) -> Vec<String> {
        let list = self.sync.room_list_service().all_rooms().await.unwrap();
        let (stream, controller) = list.entries_with_dynamic_adapters(50);
        let mut stream = std::pin::pin!(stream);
        controller.set_filter(Box::new(new_filter_non_left()));
        let mut rooms: Vector<RoomListItem> = Vector::new();
        let deadline = Instant::now() + WAIT;
        loop {
            if rooms
                .iter()
                .any(|r| r.room_id() == room && r.state() == state)
            {
                return rooms.iter().map(|r| r.room_id().to_string()).collect();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.next()).await {
                Ok(Some(diffs)) => {
                    for d in diffs {
                        d.apply(&mut rooms);
                    }
                }
                Ok(None) => panic!("{}: the room list stream ended", self.user_id()),
                Err(_) => panic!(
                    "{}: {room} not {state:?} in the room list within {WAIT:?}; it shows {:?}; sync state {:?}",
                    self.user_id(),
                    rooms
                        .iter()
                        .map(|r| (r.room_id().to_owned(), r.state()))
                        .collect::<Vec<_>>(),
                    self.sync.state().get()
                ),
            }
        }
    }

    async fn timeline(&self, room: &RoomId) -> Timeline {
        let r = self
            .sync
            .room_list_service()
            .room(room)
            .unwrap_or_else(|e| panic!("{}: no room {room}: {e}", self.user_id()));
        r.timeline().await.unwrap()
    }
}

/// Waits for a remote (not a local echo) message from `from` for which `want` holds; returns
/// its content and whether it arrived encrypted (and was decrypted here).
async fn wait_message(
    timeline: &Timeline,
    from: &UserId,
    what: &str,
    want: impl Fn(&MessageType) -> bool,
) -> (MessageType, bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        for item in timeline.items().await.iter() {
            let Some(ev) = item.as_event() else { continue };
            if ev.is_local_echo() || ev.sender() != from {
                continue;
            }
            if let Some(m) = ev.content().as_message()
                && want(m.msgtype())
            {
                return (m.msgtype().clone(), ev.encryption_info().is_some());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} from {from} not in the timeline within {WAIT:?}: {:#?}",
            timeline.items().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `doctor --only matrixrtc --json`'s one check, the lab's names resolved to `ip`.
fn doctor_matrixrtc(lab: &Lab, ip: Ipv4Addr) -> Value {
    let mut args = vec![
        "doctor".to_string(),
        "--json".into(),
        "--only".into(),
        "matrixrtc".into(),
    ];
    for n in [lab.server_name.clone(), lab.matrix_host()] {
        args.extend(["--resolve".to_string(), format!("{n}={ip}")]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.run_cmd(&refs);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = v["checks"].as_array().unwrap();
    let named = |n: &str| checks.iter().filter(|c| c["name"] == n).count();
    assert_eq!(named("matrixrtc"), 1, "{v}");
    // With a LiveKit configured, what callers meet is checked from outside too; without,
    // that both transports paths advertise nothing.
    let calls = [
        "matrixrtc:well-known",
        "matrixrtc:userinfo",
        "matrixrtc:token",
    ];
    let configured = lab.status()["matrixrtc"]["configured"] == true;
    for n in calls {
        assert_eq!(named(n), usize::from(configured), "{n}: {v}");
    }
    for c in checks.iter().filter(|c| c["name"] != "matrixrtc") {
        assert_eq!(c["status"], "pass", "{c}");
    }
    assert_eq!(named("matrixrtc:transports"), 1, "{v}");
    checks
        .iter()
        .find(|c| c["name"] == "matrixrtc")
        .unwrap()
        .clone()
}

fn add_user(lab: &Lab, name: &str) -> String {
    let pw = format!("{name}-password-1");
    let file = lab.path(&format!("{name}.pw"));
    std::fs::write(&file, &pw).unwrap();
    lab.ok(&[
        "user",
        "add",
        name,
        "--password-file",
        file.to_str().unwrap(),
    ]);
    pw
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// The server name's `/.well-known/matrix/client`, as a client fetches it first.
async fn well_known(http: &reqwest::Client, lab: &Lab) -> Value {
    let url = format!("https://{}/.well-known/matrix/client", lab.server_name);
    let (st, body) = get(http, &url, None).await;
    assert_eq!(st, 200, "{url}");
    serde_json::from_slice(&body).unwrap()
}

/// MSC4143's transports, as Element X asks for them: the stable path, then the unstable one
/// (Synapse serves only the latter; the front door sends the former there). Both answers,
/// which must agree.
async fn rtc_transports(http: &reqwest::Client, lab: &Lab, token: &str) -> (u16, Vec<u8>) {
    let mut answers = vec![];
    for path in [
        "/_matrix/client/v1/rtc/transports",
        "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports",
    ] {
        let url = format!("https://{}{path}", lab.matrix_host());
        answers.push(get(http, &url, Some(token)).await);
    }
    let unstable = answers.pop().unwrap();
    let stable = answers.pop().unwrap();
    assert_eq!(
        stable.0, unstable.0,
        "the stable and unstable paths disagree"
    );
    if stable.0 == 200 {
        let [a, b] = [&stable.1, &unstable.1].map(|b| serde_json::from_slice::<Value>(b).unwrap());
        assert_eq!(a, b, "the stable and unstable paths disagree");
        // Never `200 {}`: Element X takes it for "no calls here" (element-x-android#7659).
        assert!(a.get("rtc_transports").is_some(), "{a}");
    }
    stable
}

/// Element Web's config.json, as the appliance serves it.
async fn element_config(http: &reqwest::Client, lab: &Lab) -> Value {
    let url = format!("https://element.{}/config.json", lab.server_name);
    let (st, body) = get(http, &url, None).await;
    assert_eq!(st, 200, "{url}");
    serde_json::from_slice(&body).unwrap()
}

/// GET through the front door; status and body.
async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut rb = http.get(url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let resp = rb.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let st = resp.status().as_u16();
    (st, resp.bytes().await.unwrap().to_vec())
}

#[test]
fn element_x_path_through_the_front_door() {
    if !require_appliance() {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ip = own_loopback(1);
    let mut lab = Lab::new("elementx");
    lab.write_config_on_443(ip, "[tls]\nmode = \"internal\"\n");
    let _log = LogOnPanic(lab.path("run.log"));
    let _run = lab.start();
    let alice_pw = add_user(&lab, "alice");
    let bob_pw = add_user(&lab, "bob");
    // `status` and `doctor` say what group calls need.
    let status = lab.ok(&["status"]);
    assert!(
        status.contains("CALLS: group calls in Element X and Element Call need a LiveKit server"),
        "{status}"
    );
    assert_eq!(lab.status()["matrixrtc"]["configured"], false);
    let rtc = doctor_matrixrtc(&lab, ip);
    assert_eq!(rtc["status"], "warn", "{rtc}");
    assert!(
        rtc["seen"]
            .as_str()
            .unwrap()
            .contains("no LiveKit server configured"),
        "{rtc}"
    );

    runtime().block_on(async {
        let http = http_client(&lab, ip);
        // What Element X reads first. No MatrixRTC focus is advertised while none is
        // configured (an advertised but absent focus breaks calls in clients).
        let wk = well_known(&http, &lab).await;
        assert_eq!(
            wk["m.homeserver"]["base_url"],
            format!("https://{}", lab.matrix_host())
        );
        assert!(
            wk.get("org.matrix.msc4143.rtc_foci").is_none(),
            "an RTC focus is advertised with no [matrixrtc] configured: {wk}"
        );

        let alice = Phone::sign_in(&lab, ip, "alice", &alice_pw).await;
        let bob = Phone::sign_in(&lab, ip, "bob", &bob_pw).await;
        for p in [&alice, &bob] {
            let deadline = Instant::now() + WAIT;
            while !matches!(p.sync.state().get(), State::Running) {
                assert!(
                    Instant::now() < deadline,
                    "{}: SyncService is {:?}, not running",
                    p.user_id(),
                    p.sync.state().get()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Synapse's MSC4143 endpoint is off too, on both paths, and Element Web shows no
        // group call button (1:1 calls over TURN stay).
        let token = alice.client.access_token().unwrap();
        let (st, body) = rtc_transports(&http, &lab, &token).await;
        let ew = element_config(&http, &lab).await;
        assert_eq!(ew["element_call"]["disable"], true, "{ew}");
        assert_eq!(ew["features"]["feature_group_calls"], false, "{ew}");
        assert_eq!(
            st,
            404,
            "rtc/transports answers: {}",
            String::from_utf8_lossy(&body)
        );

        // Alice makes an encrypted room (as Element X makes every private room) and invites
        // Bob; it shows in both room lists, Bob's as an invite, which he accepts.
        let mut req = create_room::v3::Request::new();
        req.name = Some("Element X path".into());
        req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
        req.invite = vec![bob.user_id().to_owned()];
        req.initial_state = vec![
            InitialStateEvent::with_empty_state_key(
                RoomEncryptionEventContent::with_recommended_defaults(),
            )
            .to_raw_any(),
        ];
        let room: OwnedRoomId = alice
            .client
            .create_room(req)
            .await
            .unwrap()
            .room_id()
            .to_owned();
        let shown = alice.room_in_list(&room, RoomState::Joined).await;
        eprintln!("alice's room list: {shown:?}");
        bob.room_in_list(&room, RoomState::Invited).await;
        bob.client.join_room_by_id(&room).await.unwrap();
        bob.room_in_list(&room, RoomState::Joined).await;
        let bob_tl = bob.timeline(&room).await;
        let alice_tl = alice.timeline(&room).await;
        // The room was made encrypted; sliding sync may bring its m.room.encryption a little
        // after the room itself (CI once saw it not yet there), so it is waited for, bounded.
        let deadline = common::deadline(Duration::from_secs(30));
        while !alice_tl
            .room()
            .latest_encryption_state()
            .await
            .unwrap()
            .is_encrypted()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the room alice made encrypted is still not encrypted for her"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A live message: sent after both are syncing, it reaches Bob decrypted.
        let text = format!("hello from the Element X path {}", std::process::id());
        alice_tl
            .send(RoomMessageEventContent::text_plain(&text).into())
            .await
            .unwrap();
        let (_, encrypted) = wait_message(
            &bob_tl,
            alice.user_id(),
            "the text",
            |m| matches!(m, MessageType::Text(t) if t.body == text),
        )
        .await;
        assert!(encrypted, "the message did not arrive encrypted");
        // On the server it is ciphertext only.
        let (st, body) = get(
            &http,
            &format!(
                "https://{}/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20",
                lab.matrix_host()
            ),
            Some(&token),
        )
        .await;
        assert_eq!(st, 200);
        let page = String::from_utf8_lossy(&body);
        assert!(
            page.contains("m.room.encrypted") && !page.contains(&text),
            "{page}"
        );

        // Media: an image in the encrypted room (an encrypted file, uploaded by Alice's send
        // queue), downloaded by Bob through the authenticated endpoint and decrypted.
        alice_tl
            .send_attachment(
                AttachmentSource::Data {
                    bytes: PICTURE.to_vec(),
                    filename: "picture.png".into(),
                },
                mime::IMAGE_PNG,
                AttachmentConfig::default(),
            )
            .await
            .unwrap();
        let (image, encrypted) = wait_message(&bob_tl, alice.user_id(), "the image", |m| {
            matches!(m, MessageType::Image(_))
        })
        .await;
        assert!(encrypted);
        let MessageType::Image(image) = image else {
            unreachable!()
        };
        let MediaSource::Encrypted(file) = &image.source else {
            panic!("the image in an encrypted room is not an encrypted file: {image:?}")
        };
        let got = bob
            .client
            .media()
            .get_media_content(
                &MediaRequestParameters {
                    source: image.source.clone(),
                    format: MediaFormat::File,
                },
                false,
            )
            .await
            .unwrap();
        assert_eq!(got, PICTURE, "Bob got other bytes than Alice sent");
        // The ciphertext is served only on the authenticated endpoint (MSC3916): not without
        // a token, and not on the legacy unauthenticated one.
        let (server, id) = file
            .url
            .parts()
            .map(|(s, i)| (s.to_string(), i.to_string()))
            .unwrap();
        let authed = format!(
            "https://{}/_matrix/client/v1/media/download/{server}/{id}",
            lab.matrix_host()
        );
        let bob_token = bob.client.access_token().unwrap();
        let (st, cipher) = get(&http, &authed, Some(&bob_token)).await;
        assert_eq!(st, 200);
        assert!(!cipher.is_empty() && cipher != PICTURE, "stored in clear");
        assert_eq!(get(&http, &authed, None).await.0, 401);
        let legacy = format!(
            "https://{}/_matrix/media/v3/download/{server}/{id}",
            lab.matrix_host()
        );
        assert_eq!(get(&http, &legacy, None).await.0, 404);
        // The room state as Element X reads it on entering a room: through sliding sync.
        assert!(
            bob_tl
                .room()
                .get_state_events(StateEventType::RoomEncryption)
                .await
                .unwrap()
                .len()
                == 1
        );

        for p in [&alice, &bob] {
            p.sync.stop().await;
        }
    });
}

/// A stand-in for the LiveKit server's HTTP side: answers every request "OK" as LiveKit does
/// at `/` (no SFU is available here). Returns its port.
fn livekit_stand_in(ip: Ipv4Addr) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK");
        }
    });
    port
}

/// Unpadded base64 of the SHA-256 of `json`: how lk-jwt-service names LiveKit rooms and
/// identities, computed here independently of the appliance's code.
fn lk_hash(json: &str) -> String {
    use base64::Engine as _;
    let d = ring::digest::digest(&ring::digest::SHA256, json.as_bytes());
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(d.as_ref())
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let resp = http
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let st = resp.status().as_u16();
    (st, resp.json().await.unwrap_or(Value::Null))
}

/// MatrixRTC (issue #17 item 4) with `[matrixrtc]` configured: the focus is advertised in the
/// well-known and by Synapse, and the appliance's authorization service exchanges a Matrix
/// OpenID token for a LiveKit access token whose signature and claims are checked here with
/// the livekit-api crate; forged, foreign and mismatched tokens are refused. No SFU is
/// available here: the LiveKit URL points at a stand-in that only answers HTTP.
#[test]
fn matrixrtc_authorization_service() {
    use livekit_api::access_token::TokenVerifier;
    if !require_appliance() {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ip = own_loopback(2);
    let mut lab = Lab::new("matrixrtc");
    let (key, secret) = ("APIhomelabTest", "a-secret-of-forty-characters-for-hs256ok");
    let (key_file, secret_file) = (lab.path("livekit.key"), lab.path("livekit.secret"));
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let livekit_url = format!("ws://{ip}:{}", livekit_stand_in(ip));
    lab.write_config_on_443(
        ip,
        &format!(
            "[tls]\nmode = \"internal\"\n[matrixrtc]\nlivekit_url = \"{livekit_url}\"\napi_key_file = \"{}\"\napi_secret_file = \"{}\"\n",
            key_file.display(),
            secret_file.display()
        ),
    );
    let _log = LogOnPanic(lab.path("run.log"));
    let _run = lab.start();
    let alice_pw = add_user(&lab, "alice");
    let bob_pw = add_user(&lab, "bob");
    let carol_pw = add_user(&lab, "carol");
    let service = format!("https://{}/livekit/jwt", lab.matrix_host());
    let focus = serde_json::json!({"type": "livekit", "livekit_service_url": service});

    let st = lab.status()["matrixrtc"].clone();
    assert_eq!(st["configured"], true, "{st}");
    assert_eq!(st["service_url"], service.as_str());
    let text = lab.ok(&["status"]);
    assert!(
        text.contains(&format!("CALLS: MatrixRTC with LiveKit at {livekit_url}")),
        "{text}"
    );
    let rtc = doctor_matrixrtc(&lab, ip);
    assert_eq!(rtc["status"], "pass", "{rtc}");

    let real_token = runtime().block_on(async {
        let http = http_client(&lab, ip);
        // Advertised where clients look: the well-known and Synapse's MSC4143 endpoint.
        let wk = well_known(&http, &lab).await;
        assert_eq!(wk["org.matrix.msc4143.rtc_foci"], serde_json::json!([focus]), "{wk}");
        let login = |user: &str, pw: &str| {
            let (http, url, user, pw) = (
                http.clone(),
                format!("https://{}/_matrix/client/v3/login", lab.matrix_host()),
                user.to_string(),
                pw.to_string(),
            );
            async move {
                let (st, v) = post(
                    &http,
                    &url,
                    serde_json::json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": pw}),
                )
                .await;
                assert_eq!(st, 200, "{v}");
                v["access_token"].as_str().unwrap().to_string()
            }
        };
        let alice = login("alice", &alice_pw).await;
        let bob = login("bob", &bob_pw).await;
        let (st, body) = rtc_transports(&http, &lab, &alice).await;
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        let t: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(t["rtc_transports"], serde_json::json!([focus]), "{t}");
        // Element Web holds group calls with Element Call, on our focus.
        let ew = element_config(&http, &lab).await;
        assert_eq!(ew["element_call"]["disable"], false, "{ew}");
        assert_eq!(ew["features"]["feature_group_calls"], true, "{ew}");

        // A real OpenID token from Synapse (Matrix spec, client-server API "OpenID").
        let openid = |who: &str, token: &str| {
            let (http, url, token) = (
                http.clone(),
                format!(
                    "https://{}/_matrix/client/v3/user/@{who}:{}/openid/request_token",
                    lab.matrix_host(),
                    lab.server_name
                ),
                token.to_string(),
            );
            async move {
                let resp = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&serde_json::json!({}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                resp.json::<Value>().await.unwrap()
            }
        };
        let alice_openid = openid("alice", &alice).await;
        assert_eq!(alice_openid["matrix_server_name"], lab.server_name.as_str());
        // Alice's private room: the call is hers and her guests' only (issue #24 item 5).
        let client = |method: reqwest::Method, path: String, token: &str, body: Value| {
            let (http, url, token) = (
                http.clone(),
                format!("https://{}{path}", lab.matrix_host()),
                token.to_string(),
            );
            async move {
                let resp = http.request(method, &url).bearer_auth(&token).json(&body).send().await.unwrap();
                let st = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                assert_eq!(st, 200, "{url}: {v}");
                v
            }
        };
        let created = client(
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom".into(),
            &alice,
            serde_json::json!({"preset": "private_chat", "name": "alice's calls"}),
        )
        .await;
        let room_id = created["room_id"].as_str().unwrap().to_string();
        let room = room_id.as_str();
        let ask = |openid: &Value, claimed: &str| {
            serde_json::json!({
                "room_id": room,
                "slot_id": "m.call#ROOM",
                "openid_token": openid,
                "member": {"id": "member-1", "claimed_user_id": claimed, "claimed_device_id": "PHONE1"},
            })
        };
        let (st, v) = post(
            &http,
            &format!("{service}/get_token"),
            ask(&alice_openid, "@alice:matrix.test"),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["url"], livekit_url.as_str());
        let jwt = v["jwt"].as_str().unwrap();
        // The signature and claims, checked with the crate LiveKit's Rust SDK uses.
        let claims = TokenVerifier::with_api_key(key, secret)
            .verify(jwt)
            .unwrap_or_else(|e| panic!("the minted token does not verify: {e:?}"));
        assert_eq!(claims.iss, key);
        assert_eq!(
            claims.sub,
            lk_hash(r#"["@alice:matrix.test","PHONE1","member-1"]"#)
        );
        let alias = lk_hash(&serde_json::to_string(&[room, "m.call#ROOM"]).unwrap());
        assert_eq!(claims.video.room, alias);
        assert!(claims.video.room_join && claims.video.room_create);
        assert_eq!(claims.video.can_publish, Some(true));
        assert_eq!(claims.video.can_subscribe, Some(true));
        assert!(!claims.video.room_admin && !claims.video.room_list);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as usize;
        assert!(claims.nbf <= now + 5 && claims.exp > now + 3500 && claims.exp <= now + 3605);
        assert!(
            TokenVerifier::with_api_key(key, "another-secret-of-forty-characters-here")
                .verify(jwt)
                .is_err(),
            "a token verifies with the wrong secret"
        );

        // The older request Element Call sends (lk-jwt-service's /sfu/get): same room.
        let (st, v) = post(
            &http,
            &format!("{service}/sfu/get"),
            serde_json::json!({"room": room, "openid_token": alice_openid, "device_id": "PHONE1"}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let claims = TokenVerifier::with_api_key(key, secret)
            .verify(v["jwt"].as_str().unwrap())
            .unwrap();
        assert_eq!(claims.sub, "@alice:matrix.test:PHONE1");
        assert_eq!(claims.video.room, alias);

        // Bob has a real token of this server but is not in alice's room: nothing, on either
        // request; invited is not joined either.
        let bob_openid = openid("bob", &bob).await;
        let refused = |v: &Value, st: u16, what: &str| {
            assert_eq!((st, v["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{what}: {v}");
            assert!(v.get("jwt").is_none(), "{what}: {v}");
        };
        let legacy = |openid: &Value, room: &str| {
            serde_json::json!({"room": room, "openid_token": openid, "device_id": "DEV"})
        };
        let (st, v) = post(&http, &format!("{service}/get_token"), ask(&bob_openid, "@bob:matrix.test")).await;
        refused(&v, st, "bob, not in the room");
        let (st, v) = post(&http, &format!("{service}/sfu/get"), legacy(&bob_openid, room)).await;
        refused(&v, st, "bob, not in the room, legacy request");
        let invite = format!("/_matrix/client/v3/rooms/{room}/invite");
        client(reqwest::Method::POST, invite.clone(), &alice, serde_json::json!({"user_id": "@bob:matrix.test"})).await;
        let (st, v) = post(&http, &format!("{service}/get_token"), ask(&bob_openid, "@bob:matrix.test")).await;
        refused(&v, st, "bob, invited only");
        // A room that does not exist, and a room ID that is none.
        let (st, v) = post(&http, &format!("{service}/sfu/get"), legacy(&alice_openid, "!nowhere:matrix.test")).await;
        refused(&v, st, "a room that does not exist");
        let (st, v) = post(&http, &format!("{service}/sfu/get"), legacy(&alice_openid, "call-room")).await;
        assert_eq!(st, 400, "{v}");
        // Carol joins and gets a token; deactivated, her OpenID token (good for an hour
        // still) gets none.
        let carol = login("carol", &carol_pw).await;
        client(reqwest::Method::POST, invite, &alice, serde_json::json!({"user_id": "@carol:matrix.test"})).await;
        client(reqwest::Method::POST, format!("/_matrix/client/v3/join/{room}"), &carol, serde_json::json!({})).await;
        let carol_openid = openid("carol", &carol).await;
        let (st, v) = post(&http, &format!("{service}/sfu/get"), legacy(&carol_openid, room)).await;
        assert_eq!(st, 200, "carol, joined: {v}");
        lab.ok(&["user", "deactivate", "carol", "--yes"]);
        let (st, v) = post(&http, &format!("{service}/sfu/get"), legacy(&carol_openid, room)).await;
        refused(&v, st, "carol, deactivated");

        // Refused: a forged OpenID token, a real one claimed for someone else, one from
        // another server, a delegation this server cannot carry out.
        let mut forged = alice_openid.clone();
        forged["access_token"] = "QmFkVG9rZW5Gb3JnZWRCeUF0dGFja2Vy".into();
        let (st, v) = post(&http, &format!("{service}/get_token"), ask(&forged, "@alice:matrix.test")).await;
        assert_eq!((st, v["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{v}");
        assert!(v.get("jwt").is_none());
        let (st, v) = post(&http, &format!("{service}/get_token"), ask(&bob_openid, "@alice:matrix.test")).await;
        assert_eq!(st, 401, "bob's token passed as alice's: {v}");
        // A token said to be of another server is checked there (tests/calls_federation.rs):
        // one that does not exist vouches for nobody.
        let mut foreign = bob_openid.clone();
        foreign["matrix_server_name"] = "evil.example".into();
        let (st, v) = post(&http, &format!("{service}/get_token"), ask(&foreign, "@bob:evil.example")).await;
        assert_eq!((st, v["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{v}");
        assert!(v.get("jwt").is_none());
        let mut delegated = ask(&bob_openid, "@bob:matrix.test");
        delegated["delay_id"] = "syd_abc".into();
        delegated["delay_timeout"] = 10000.into();
        delegated["delay_cs_api_url"] = format!("https://{}", lab.matrix_host()).into();
        let (st, v) = post(&http, &format!("{service}/get_token"), delegated).await;
        assert_eq!(st, 400, "{v}");

        // Element Call asks from its own origin: the preflight is answered.
        let resp = http
            .request(reqwest::Method::OPTIONS, format!("{service}/get_token"))
            .header("Origin", "https://call.example")
            .header("Access-Control-Request-Method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["access-control-allow-origin"], "*");
        alice_openid["access_token"].as_str().unwrap().to_string()
    });
    // No OpenID token reaches the log (the appliance's lines and Synapse's, which redacts
    // access_token in the URIs it logs).
    let log = std::fs::read_to_string(lab.path("run.log")).unwrap();
    assert!(
        log.contains("MatrixRTC: LiveKit token issued"),
        "no issue logged"
    );
    for t in [real_token.as_str(), "QmFkVG9rZW5Gb3JnZWRCeUF0dGFja2Vy"] {
        assert!(!log.contains(t), "an OpenID token is in the log");
    }
}
