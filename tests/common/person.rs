//! A person with a Matrix client (matrix-sdk, own crypto store, common/sdk.rs) who talks to
//! the registration bot: joins the rooms it invites them to, asks, waits for answers.
//!
//! Included by path with common/sdk.rs (`#[path = "common/sdk.rs"] mod sdk;` and
//! `#[path = "common/person.rs"] mod person;`) by the tests that use it (bot.rs, backup.rs, workers.rs).

// Each test that includes it uses its own part.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::room::member::{MembershipState, StrippedRoomMemberEvent};
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedUserId, UserId};
use matrix_sdk::{Client, Room};

pub use crate::sdk::Msg;
use crate::sdk::SdkUser;

pub const WAIT: Duration = Duration::from_secs(60);

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
    pub sdk: SdkUser,
}

impl Person {
    /// Logs in and syncs until dropped; joins rooms the bot invites it to (alerts arrive in DMs
    /// the bot opens).
    pub async fn login(hs: &str, user: &str, password: &str, bot: &UserId) -> Person {
        Person::login_with(hs, None, user, password, bot).await
    }

    /// `login`, through `http` when given (`common::front_door_http`).
    pub async fn login_with(
        hs: &str,
        http: Option<reqwest::Client>,
        user: &str,
        password: &str,
        bot: &UserId,
    ) -> Person {
        let mut sdk = SdkUser::login_with(hs, http, user, password, "bot test").await;
        let client = sdk.client.clone();
        let user_id = sdk.user_id();
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
        // Synapse restarts in this test: the sync loop outlives its errors.
        sdk.start_sync();
        Person {
            client,
            user_id,
            sdk,
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

    /// Waits for a message the client got that `want` accepts.
    pub async fn wait_for(&self, what: &str, want: impl Fn(&Msg) -> bool) -> Msg {
        self.sdk.wait_msg(WAIT, what, want).await
    }

    /// Waits for the next message from `from` in `room` sent at `since` (ms) or later.
    pub async fn reply_after(&self, since: u64, room: &Room, from: &UserId) -> Msg {
        let what = format!("answer from {from} in {}", room.room_id());
        self.sdk
            .wait_msg(WAIT, &what, |m| {
                m.room == room.room_id()
                    && m.sender == from
                    && m.ts >= since
                    // Alerts arrive whenever a problem does (here: Element cannot reach
                    // GitHub); they are not answers.
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
