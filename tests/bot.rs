//! The registration bot end to end: the real binary, the real Synapse, and real Matrix clients
//! on the user side (matrix-sdk with end-to-end encryption, and matrix-nio once). One long
//! scenario, because each Synapse start costs seconds.

#![cfg(feature = "bot")]
// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/person.rs"]
mod person;
#[path = "common/sdk.rs"]
mod sdk;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Lab, LogOnPanic, Matrix, Running, require, require_appliance, wait_until};
use matrix_sdk::ruma::OwnedUserId;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::events::room::message::{ReplacementMetadata, RoomMessageEventContent};
use nix::sys::signal::Signal;
use person::{Person, WAIT, now_ms};
use serde_json::Value;

const NIO_PYTHON: &str = "/opt/venvs/homelab-matrix-nio/bin/python";

/// The first code span of a reply: the bot puts tokens in them.
fn code_span(body: &str) -> String {
    body.split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no code span in {body:?}"))
        .to_string()
}

fn wait_bot_running(lab: &Lab) -> Value {
    let mut last = Value::Null;
    wait_until("the bot to be running", Duration::from_secs(120), || {
        last = lab.status()["bot"].clone();
        last["state"] == "running"
    });
    last
}

/// `token show --json`, or None when there is no such token (any other failure panics).
fn token_json(lab: &Lab, token: &str) -> Option<Value> {
    let out = lab.run_cmd(&["token", "show", token, "--json"]);
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).unwrap());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no registration token"),
        "token show {token}: {err}"
    );
    None
}

fn token_count(lab: &Lab) -> usize {
    let v: Value = serde_json::from_str(&lab.ok(&["token", "list", "--json"])).unwrap();
    v.as_array().unwrap().len()
}

/// Registers a new user with `token` through the client API's UIA flow (blocking HTTP, so off
/// the async runtime's threads).
async fn register(hs: &str, user: &str, token: &str) -> (u16, Value) {
    let (hs, user, token) = (hs.to_string(), user.to_string(), token.to_string());
    tokio::task::spawn_blocking(move || {
        Matrix::new(&hs).register(&user, &format!("{user}-password-1"), Some(&token))
    })
    .await
    .unwrap()
}

/// The status of a password login (blocking HTTP, so off the runtime's worker).
fn login_status(hs: &str, user: &str, password: &str) -> u16 {
    tokio::task::block_in_place(|| {
        Matrix::new(hs)
            .req(
                "POST",
                "/_matrix/client/v3/login",
                None,
                Some(serde_json::json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password})),
            )
            .0
    })
}

fn restart(lab: &Lab, run: &mut Running) -> Running {
    let st = run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{}", run.log_tail());
    lab.start()
}

#[test]
fn registration_bot_end_to_end() {
    if !require_appliance() {
        return;
    }
    let nio = require(
        "matrix-nio",
        Path::new(NIO_PYTHON).exists(),
        "no venv at /opt/venvs/homelab-matrix-nio (packaging/install-deps makes it)",
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let lab = Lab::new("bot");
    let _log = LogOnPanic(lab.path("run.log"));
    let mut run = lab.start();
    let t0 = Instant::now();
    let bot_status = wait_bot_running(&lab);
    eprintln!("bot running {:?} after READY", t0.elapsed());
    let bot: OwnedUserId = "@registration-bot:matrix.test".parse().unwrap();
    assert_eq!(bot_status["user_id"], bot.as_str());
    wait_until("the bot's device to be cross-signed", WAIT, || {
        lab.status()["bot"]["cross_signed"] == true
    });
    let device = bot_status["device_id"].as_str().unwrap().to_string();
    // Session and store are the root's alone.
    use std::os::unix::fs::MetadataExt;
    let bot_dir = lab.state().join("bot");
    assert_eq!(std::fs::metadata(&bot_dir).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(bot_dir.join("session.json"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );

    let hs = lab.synapse_url();
    let alice_pw = lab.add_user("alice", true);
    let eve_pw = lab.add_user("eve", false);
    let friend_pw = lab.add_user("friend", false);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let alice = Person::login(&hs, "alice", &alice_pw, &bot).await;

        // An admin in an unencrypted room: `create 2 1d` gives a token with 2 uses for a day,
        // and it registers a new user.
        let room = alice.room_with(&bot).await;
        alice
            .wait_membership(&room, &bot, MembershipState::Join)
            .await;
        let m = alice.ask(&room, &bot, "create 2 1d").await;
        assert!(!m.encrypted);
        let t1 = code_span(&m.body);
        // The answer carries the invite link (tests/invite.rs drives the page).
        let link = format!("{}/invite#{t1}", lab.https_base());
        assert!(m.body.contains(&link), "no invite link {link} in {m:?}");
        let shown = token_json(&lab, &t1).expect("the token exists");
        assert_eq!(shown["uses_allowed"], 2, "{shown}");
        let expiry = shown["expiry_time"].as_i64().unwrap();
        let day_from_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            + 86_400_000;
        assert!((expiry - day_from_now).abs() < 120_000, "{shown}");
        let (st, v) = register(&hs, "newbie1", &t1).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["user_id"], "@newbie1:matrix.test");

        // An admin in Element's kind of DM (encrypted): the bot decrypts, answers encrypted.
        let dm = alice.client.create_dm(&bot).await.unwrap();
        alice
            .wait_membership(&dm, &bot, MembershipState::Join)
            .await;
        let m = alice.ask(&dm, &bot, "Create 2 1d").await;
        assert!(m.encrypted, "the answer in the DM was not encrypted: {m:?}");
        let t2 = code_span(&m.body);
        let shown = token_json(&lab, &t2).unwrap_or_else(|| panic!("no token in {m:?}"));
        assert_eq!(shown["uses_allowed"], 2, "{shown}");
        let (st, v) = register(&hs, "newbie2", &t2).await;
        assert_eq!(st, 200, "{v}");
        // On the server, the bot's messages in the DM are ciphertext only.
        let alice_token = alice.client.access_token().unwrap();
        let (st, v) = tokio::task::block_in_place(|| {
            Matrix::new(&hs).req(
                "GET",
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
                    dm.room_id()
                ),
                Some(&alice_token),
                None,
            )
        });
        assert_eq!(st, 200, "{v}");
        let from_bot: Vec<&Value> = v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["sender"] == bot.as_str() && e.get("state_key").is_none())
            .collect();
        assert!(!from_bot.is_empty(), "{v}");
        assert!(
            from_bot.iter().all(|e| e["type"] == "m.room.encrypted"),
            "the bot sent plaintext into the encrypted DM: {from_bot:?}"
        );
        assert!(
            !v.to_string().contains(&t2),
            "the token is visible on the server"
        );
        // Its device is signed by its own cross-signing identity.
        let dev = alice
            .client
            .encryption()
            .get_device(&bot, device.as_str().into())
            .await
            .unwrap()
            .expect("alice knows the bot's device");
        assert!(
            dev.is_cross_signed_by_owner(),
            "the bot's device is not cross-signed"
        );

        // `help`, and a word it does not know, get answers.
        assert!(
            alice
                .ask(&dm, &bot, "help")
                .await
                .body
                .contains("delete-all confirm")
        );
        assert!(
            alice
                .ask(&dm, &bot, "frobnicate")
                .await
                .body
                .contains("help")
        );

        // Accounts, for admins: `users`, `user`, `reset-password` (in the encrypted DM only)
        // and `deactivate ... confirm`.
        let m = alice.ask(&dm, &bot, "users").await;
        assert!(
            m.body.contains("`@newbie1:matrix.test`") && m.body.contains("`@eve:matrix.test`"),
            "{m:?}"
        );
        // `doctor`: the same report as the CLI's (this lab's names do not resolve, so only
        // what is behind the front door passes).
        let m = alice.ask(&dm, &bot, "doctor").await;
        assert!(
            m.body.contains("doctor: ") && m.body.contains("✅ `synapse`: Synapse"),
            "{m:?}"
        );
        let m = alice.ask(&dm, &bot, "user newbie1").await;
        assert!(
            m.body.contains("`@newbie1:matrix.test`") && m.body.contains("In 0 rooms; 1 device"),
            "{m:?}"
        );
        let m = alice.ask(&dm, &bot, "user @someone:matrix.org").await;
        assert!(m.body.contains("not of this server"), "{m:?}");
        let m = alice
            .ask(&room, &bot, "reset-password @newbie1:matrix.test")
            .await;
        assert!(m.body.contains("not encrypted"), "{m:?}");
        assert_eq!(login_status(&hs, "newbie1", "newbie1-password-1"), 200);
        let m = alice
            .ask(&dm, &bot, "reset-password @newbie1:matrix.test")
            .await;
        assert!(m.encrypted, "{m:?}");
        let password = m.body.split('`').nth(3).unwrap_or_else(|| panic!("{m:?}"));
        assert_eq!(login_status(&hs, "newbie1", password), 200, "{m:?}");
        assert_eq!(login_status(&hs, "newbie1", "newbie1-password-1"), 403);
        let m = alice
            .ask(&dm, &bot, "deactivate @newbie2:matrix.test")
            .await;
        assert!(m.body.contains("Nothing was done"), "{m:?}");
        assert_eq!(login_status(&hs, "newbie2", "newbie2-password-1"), 200);
        let m = alice
            .ask(&dm, &bot, "deactivate @newbie2:matrix.test confirm")
            .await;
        assert!(m.body.starts_with("Deactivated"), "{m:?}");
        assert_eq!(login_status(&hs, "newbie2", "newbie2-password-1"), 403);
        let m = alice
            .ask(&dm, &bot, &format!("deactivate {bot} confirm"))
            .await;
        assert!(m.body.contains("I won't"), "{m:?}");

        // A non-admin: their invitation is rejected, and in a room they share with the bot
        // they are told, politely, that they may not.
        let eve = Person::login(&hs, "eve", &eve_pw, &bot).await;
        let eves = eve.room_with(&bot).await;
        eve.wait_membership(&eves, &bot, MembershipState::Leave)
            .await;
        room.invite_user_by_id(&eve.user_id).await.unwrap();
        alice
            .wait_membership(&room, &eve.user_id, MembershipState::Invite)
            .await;
        eve.client.join_room_by_id(room.room_id()).await.unwrap();
        let before = token_count(&lab);
        let eve_room = eve.client.get_room(room.room_id()).unwrap();
        let m = eve.ask(&eve_room, &bot, "create").await;
        assert!(m.body.starts_with("Sorry"), "{m:?}");
        assert_eq!(token_count(&lab), before, "a non-admin made a token");
        // In a group room, talk that is not a command is not answered.
        let since = now_ms();
        eve.say(&eve_room, "hello everyone").await;
        assert!(alice.ask(&room, &bot, "list").await.body.contains(&t1));
        assert!(
            !alice
                .sdk
                .inbox
                .lock()
                .unwrap()
                .iter()
                .any(|m| m.sender == bot && m.ts >= since && m.body.starts_with("Sorry")),
            "the bot answered small talk"
        );

        // An edit is not a new command: "help" edited into "create" makes no token.
        let since = now_ms();
        let help = dm
            .send(RoomMessageEventContent::text_plain("help"))
            .await
            .unwrap()
            .response
            .event_id;
        alice.reply_after(since, &dm, &bot).await;
        let before = token_count(&lab);
        let edit = RoomMessageEventContent::text_plain("* create")
            .make_replacement(ReplacementMetadata::new(help, None));
        let since = now_ms();
        dm.send(edit).await.unwrap();
        alice.say(&dm, "allowed").await;
        // The first answer after the edit is the one to `allowed`: the edit got none.
        let m = alice.reply_after(since, &dm, &bot).await;
        assert!(m.body.contains("may always use me"), "{m:?}");
        assert_eq!(token_count(&lab), before, "an edit was taken as a command");

        // `delete` removes a token; `delete-all` without `confirm` deletes nothing.
        let m = alice.ask(&dm, &bot, "create").await;
        let t3 = code_span(&m.body);
        assert!(token_json(&lab, &t3).is_some(), "{m:?}");
        let m = alice.ask(&dm, &bot, &format!("delete {t3}")).await;
        assert!(m.body.contains("deleted"), "{m:?}");
        assert!(token_json(&lab, &t3).is_none(), "{t3} still exists");
        let (st, _) = register(&hs, "newbie3", &t3).await;
        assert_eq!(st, 401);
        let before = token_count(&lab);
        let m = alice.ask(&dm, &bot, "delete-all").await;
        assert!(m.body.contains("Nothing was deleted"), "{m:?}");
        assert_eq!(token_count(&lab), before);
        // `list all` shows the used-up and deleted-free state: t1 is still valid (1 use left).
        let m = alice.ask(&dm, &bot, "list all").await;
        assert!(m.body.contains(&t1) && m.body.contains(&t2), "{m:?}");

        // `allow`: a non-admin friend may then command the bot, here through matrix-nio.
        let m = alice.ask(&dm, &bot, "allow @friend:matrix.test").await;
        assert!(m.body.contains("Allowed"), "{m:?}");
        if nio {
            let out = std::process::Command::new(NIO_PYTHON)
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bot_nio.py"))
                .args([&hs, "friend", &friend_pw, bot.as_str(), "create 1 2h"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "matrix-nio: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["msgtype"], "m.notice", "{v}");
            let t = code_span(v["body"].as_str().unwrap());
            assert_eq!(token_json(&lab, &t).unwrap()["uses_allowed"], 1, "{v}");
        }
        let friend = Person::login(&hs, "friend", &friend_pw, &bot).await;
        let froom = friend.room_with(&bot).await;
        friend
            .wait_membership(&froom, &bot, MembershipState::Join)
            .await;
        let m = friend.ask(&froom, &bot, "create").await;
        assert!(token_json(&lab, &code_span(&m.body)).is_some(), "{m:?}");
        // Access to the bot is for owners to hand out.
        let m = friend.ask(&froom, &bot, "allow @eve:matrix.test").await;
        assert!(m.body.contains("Only server admins"), "{m:?}");
        // ...and so are accounts.
        let m = friend.ask(&froom, &bot, "users").await;
        assert!(m.body.contains("can manage accounts"), "{m:?}");
        let m = friend.ask(&froom, &bot, "doctor").await;
        assert!(m.body.contains("can manage accounts"), "{m:?}");

        // A restart: the same device, and new messages in the encrypted DM still decrypt
        // (alice's client keeps its room key, so the bot needs the one it stored).
        let mut run2 = tokio::task::block_in_place(|| restart(&lab, &mut run));
        let after = tokio::task::block_in_place(|| wait_bot_running(&lab));
        assert_eq!(
            after["device_id"],
            device.as_str(),
            "a new device after the restart"
        );
        let m = alice.ask(&dm, &bot, "list").await;
        assert!(m.encrypted, "{m:?}");
        assert!(m.body.contains(&t2) && !m.body.contains(&t3), "{m:?}");
        // The allow list survived the restart; `disallow` ends it.
        assert!(
            friend
                .ask(&froom, &bot, "allowed")
                .await
                .body
                .contains("@friend:matrix.test")
        );
        let m = friend.ask(&froom, &bot, "create").await;
        assert!(token_json(&lab, &code_span(&m.body)).is_some(), "{m:?}");
        let m = alice.ask(&dm, &bot, "disallow @friend:matrix.test").await;
        assert!(m.body.contains("may no longer"), "{m:?}");
        let m = friend.ask(&froom, &bot, "create").await;
        assert!(m.body.starts_with("Sorry"), "{m:?}");

        // An alert: coturn made to crash-loop (killed five times in a row) reaches the admin
        // in a DM.
        let since = now_ms();
        tokio::task::block_in_place(|| crash_loop(&lab, "coturn"));
        let alert = alice
            .sdk
            .wait_msg(WAIT, "alert for the crash loop", |m| {
                m.sender == bot && m.ts >= since && m.body.contains("crash loop")
            })
            .await;
        assert!(alert.body.contains("coturn"), "{alert:?}");
        assert!(alert.encrypted, "{alert:?}");
        let problems = tokio::task::block_in_place(|| lab.status()["problems"].clone());
        assert!(
            problems.to_string().contains("crash-loop:coturn"),
            "{problems}"
        );

        drop((alice, eve, friend));
        let st = run2.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20));
        assert_eq!(st.code(), Some(0), "{}", run2.log_tail());
    });
}

/// Kills `child` each time the supervisor restarts it, until it is flagged as a crash loop.
fn crash_loop(lab: &Lab, child: &str) {
    let mut last = None;
    for _ in 0..5 {
        let mut pid = None;
        wait_until(
            &format!("{child} to run again"),
            Duration::from_secs(60),
            || {
                let st = lab.status();
                pid = st["children"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["name"] == child)
                    .and_then(|c| c["pid"].as_i64());
                pid.is_some() && pid != last
            },
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid.unwrap() as i32),
            Signal::SIGKILL,
        )
        .unwrap();
        last = pid;
    }
    wait_until(
        &format!("{child} flagged as a crash loop"),
        Duration::from_secs(30),
        || {
            lab.status()["children"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == child && c["crash_loop"] == true)
        },
    );
}
