//! A person with a real Matrix client (matrix-sdk, end-to-end encryption, its own sqlite
//! crypto store), for the tests that need the user side: tests/bot.rs, tests/backup.rs.
//! Included by path (`#[path = "common/person.rs"] mod person;`), not from common/mod.rs, so
//! that test binaries without a Matrix client do not link matrix-sdk.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use matrix_sdk::config::SyncSettings;
use matrix_sdk::deserialized_responses::EncryptionInfo;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::room::member::{MembershipState, StrippedRoomMemberEvent};
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, UserId};
use matrix_sdk::{Client, Room};

pub const WAIT: Duration = Duration::from_secs(60);

/// A message the user side received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub room: OwnedRoomId,
    pub sender: OwnedUserId,
    pub body: String,
    pub msgtype: String,
    /// It arrived encrypted and was decrypted here.
    pub encrypted: bool,
    /// origin_server_ts (ms): history that arrives late (a join) is told from answers by it.
    pub ts: u64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A person with a Matrix client (matrix-sdk, own crypto store), syncing in the background.
pub struct Person {
    pub client: Client,
    pub user_id: OwnedUserId,
    pub inbox: Arc<Mutex<Vec<Msg>>>,
    sync: tokio::task::JoinHandle<()>,
    _store: tempfile::TempDir,
}

impl Drop for Person {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

impl Person {
    /// Logs in and syncs until dropped; joins rooms the bot invites it to (alerts arrive in DMs
    /// the bot opens).
    pub async fn login(hs: &str, user: &str, password: &str, bot: &UserId) -> Person {
        let store = tempfile::tempdir().unwrap();
        let client = Client::builder()
            .homeserver_url(hs)
            // Synapse's login answer names its public URL, which only the front door serves.
            .respect_login_well_known(false)
            .sqlite_store(store.path(), None)
            .build()
            .await
            .unwrap();
        client
            .matrix_auth()
            .login_username(user, password)
            .initial_device_display_name("bot test")
            .send()
            .await
            .unwrap_or_else(|e| panic!("login {user}: {e}"));
        let user_id = client.user_id().unwrap().to_owned();
        let inbox: Arc<Mutex<Vec<Msg>>> = Arc::default();
        let sink = inbox.clone();
        client.add_event_handler(
            move |ev: OriginalSyncRoomMessageEvent, room: Room, enc: Option<EncryptionInfo>| {
                let sink = sink.clone();
                async move {
                    let (msgtype, body) = match &ev.content.msgtype {
                        MessageType::Text(t) => ("m.text", t.body.clone()),
                        MessageType::Notice(n) => ("m.notice", n.body.clone()),
                        _ => return,
                    };
                    sink.lock().unwrap().push(Msg {
                        room: room.room_id().to_owned(),
                        sender: ev.sender.clone(),
                        body,
                        msgtype: msgtype.into(),
                        encrypted: enc.is_some(),
                        ts: ev.origin_server_ts.0.into(),
                    });
                }
            },
        );
        let bot = bot.to_owned();
        let me = user_id.clone();
        client.add_event_handler(move |ev: StrippedRoomMemberEvent, room: Room| {
            let (bot, me) = (bot.clone(), me.clone());
            async move {
                if ev.sender == bot && ev.state_key == me {
                    let _ = room.join().await;
                }
            }
        });
        // Our own loop: Synapse restarts in this test, and `Client::sync` ends at an error.
        let c = client.clone();
        let sync = tokio::spawn(async move {
            loop {
                let s = SyncSettings::default().timeout(Duration::from_secs(5));
                if c.sync_once(s).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        Person {
            client,
            user_id,
            inbox,
            sync,
            _store: store,
        }
    }

    /// A room (unencrypted) with the bot invited.
    pub async fn room_with(&self, bot: &UserId) -> Room {
        let mut req = create_room::v3::Request::new();
        req.invite = vec![bot.to_owned()];
        req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
        self.client.create_room(req).await.unwrap()
    }

    pub async fn say(&self, room: &Room, text: &str) {
        room.send(RoomMessageEventContent::text_plain(text))
            .await
            .unwrap_or_else(|e| panic!("{} sending {text:?}: {e}", self.user_id));
    }

    /// Waits for the first message `want` accepts.
    pub async fn wait_for(&self, what: &str, want: impl Fn(&Msg) -> bool) -> Msg {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(m) = self.inbox.lock().unwrap().iter().find(|m| want(m)) {
                return m.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{} got no {what} within {WAIT:?}; inbox: {:#?}",
                self.user_id,
                self.inbox.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the next message from `from` in `room` sent at `since` (ms) or later.
    pub async fn reply_after(&self, since: u64, room: &Room, from: &UserId) -> Msg {
        let what = format!("answer from {from} in {}", room.room_id());
        self.wait_for(&what, |m| {
            m.room == room.room_id()
                && m.sender == from
                && m.ts >= since
                // Alerts arrive whenever a problem does (here: Element cannot reach GitHub);
                // they are not answers.
                && !m.body.starts_with("homelab-matrix needs an admin")
        })
        .await
    }

    /// Sends `text` to the bot and returns its answer.
    pub async fn ask(&self, room: &Room, bot: &UserId, text: &str) -> Msg {
        let since = now_ms();
        self.say(room, text).await;
        let m = self.reply_after(since, room, bot).await;
        assert_eq!(m.msgtype, "m.notice", "the bot answers with notices: {m:?}");
        m
    }

    pub async fn membership(&self, room: &Room, who: &UserId) -> Option<MembershipState> {
        room.get_member_no_sync(who)
            .await
            .ok()
            .flatten()
            .map(|m| m.membership().clone())
    }

    pub async fn wait_membership(&self, room: &Room, who: &UserId, want: MembershipState) {
        let deadline = Instant::now() + WAIT;
        while self.membership(room, who).await.as_ref() != Some(&want) {
            assert!(
                Instant::now() < deadline,
                "{who} is not {want:?} in {} after {WAIT:?} (is {:?})",
                room.room_id(),
                self.membership(room, who).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
