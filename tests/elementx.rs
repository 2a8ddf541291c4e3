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
    let ip = own_loopback();
    let mut lab = Lab::new("elementx");
    lab.write_config_on_443(ip, "[tls]\nmode = \"internal\"\n");
    let _log = LogOnPanic(lab.path("run.log"));
    let _run = lab.start();
    let alice_pw = add_user(&lab, "alice");
    let bob_pw = add_user(&lab, "bob");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = http_client(&lab, ip);
        // What Element X reads first. No MatrixRTC focus is advertised while none is
        // configured (an advertised but absent focus breaks calls in clients).
        let (st, body) = get(
            &http,
            &format!("https://{}/.well-known/matrix/client", lab.server_name),
            None,
        )
        .await;
        assert_eq!(st, 200);
        let wk: Value = serde_json::from_slice(&body).unwrap();
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
        // Synapse's MSC4143 endpoint is off too.
        let token = alice.client.access_token().unwrap();
        let (st, body) = get(
            &http,
            &format!(
                "https://{}/_matrix/client/unstable/org.matrix.msc4143/rtc/transports",
                lab.matrix_host()
            ),
            Some(&token),
        )
        .await;
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
        assert!(
            alice_tl
                .room()
                .latest_encryption_state()
                .await
                .unwrap()
                .is_encrypted()
        );

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
