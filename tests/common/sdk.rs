//! The user side of a test: a matrix-sdk client (end-to-end encryption, its own sqlite crypto
//! store) logged in with a password, synced in the background until dropped, keeping the text
//! and notice messages it gets.
//!
//! Included by path (`#[path = "common/sdk.rs"] mod sdk;`) by the tests that use it, so the
//! other test binaries do not compile matrix-sdk code.

// Each test that includes it uses its own part.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use matrix_sdk::config::SyncSettings;
use matrix_sdk::deserialized_responses::EncryptionInfo;
use matrix_sdk::ruma::events::room::message::{MessageType, OriginalSyncRoomMessageEvent};
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId};
use matrix_sdk::{Client, Room};

/// A text or notice message the client got (decrypted here if it came encrypted).
#[derive(Debug, Clone)]
pub struct Msg {
    pub room: OwnedRoomId,
    pub sender: OwnedUserId,
    pub body: String,
    pub msgtype: String,
    /// It arrived encrypted and was decrypted here.
    pub encrypted: bool,
    /// origin_server_ts (ms): history that arrives late (a join) is told from new messages
    /// by it.
    pub ts: u64,
}

pub struct SdkUser {
    pub client: Client,
    pub inbox: Arc<Mutex<Vec<Msg>>>,
    sync: Option<tokio::task::JoinHandle<()>>,
    _store: tempfile::TempDir,
}

impl SdkUser {
    /// Logs in as `user` on `hs` (a Synapse URL). Add event handlers, then `start_sync`.
    pub async fn login(hs: &str, user: &str, password: &str, device_name: &str) -> SdkUser {
        SdkUser::login_with(hs, None, user, password, device_name).await
    }

    /// `login`, through `http` when given (`common::front_door_http`).
    pub async fn login_with(
        hs: &str,
        http: Option<reqwest::Client>,
        user: &str,
        password: &str,
        device_name: &str,
    ) -> SdkUser {
        let store = tempfile::tempdir().unwrap();
        let client =
            crate::common::sdk_login_with(hs, http, store.path(), user, password, device_name)
                .await;
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
        SdkUser {
            client,
            inbox,
            sync: None,
            _store: store,
        }
    }

    /// Waits up to `within` for the first message in the inbox that `f` accepts; `what` names
    /// it in the failure.
    pub async fn wait_msg(&self, within: Duration, what: &str, f: impl Fn(&Msg) -> bool) -> Msg {
        let deadline = Instant::now() + within;
        loop {
            if let Some(m) = self.inbox.lock().unwrap().iter().find(|m| f(m)) {
                return m.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{} got no {what} within {within:?}; inbox: {:#?}",
                self.user_id(),
                self.inbox.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Syncs until dropped, in a loop of its own: `Client::sync` ends at the first error, and
    /// a test may restart Synapse.
    pub fn start_sync(&mut self) {
        let c = self.client.clone();
        self.sync = Some(tokio::spawn(async move {
            loop {
                let s = SyncSettings::default().timeout(Duration::from_secs(5));
                if c.sync_once(s).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }));
    }

    pub fn user_id(&self) -> OwnedUserId {
        self.client.user_id().unwrap().to_owned()
    }
}

impl Drop for SdkUser {
    fn drop(&mut self) {
        if let Some(s) = self.sync.take() {
            s.abort();
        }
    }
}
