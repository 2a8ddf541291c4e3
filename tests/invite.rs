//! Invite links end to end (issue #17 items 1 and 3): `token create --json` gives a link, a
//! real headless Chromium opens it through the front door, checks the token, sees username
//! availability as typed and signs up through Synapse's token flow; the new account then logs
//! in with matrix-sdk and sliding-syncs (matrix-sdk-ui's SyncService, as Element X does). Used,
//! expired and made-up tokens each get their message, the page passes axe-core with no
//! violation, and no token reaches a log line.

#![cfg(feature = "bot")]
// This test process drives the binary and node from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lab, Matrix, require, require_appliance};
use matrix_sdk::ruma::OwnedRoomId;
use matrix_sdk_ui::{room_list_service, sync_service, sync_service::SyncService};
use serde_json::Value;

/// Where packaging/install-test-deps puts playwright-core and axe-core (tests/invite/package.json).
const NODE_MODULES: &str = "/var/cache/homelab-matrix/test-node/node_modules";

fn node_modules() -> PathBuf {
    std::env::var_os("HM_TEST_NODE_MODULES")
        .map_or_else(|| PathBuf::from(NODE_MODULES), PathBuf::from)
}

/// Runs tests/invite/drive.cjs in `mode` against `url`; returns its JSON answer.
fn drive(lab: &Lab, mode: &str, url: &str, extra: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/invite/drive.cjs");
    let rules = format!("MAP *.{0} 127.0.0.1, MAP {0} 127.0.0.1", lab.server_name);
    let out = Command::new("timeout")
        .args(["120", "node", script, mode, url, &rules])
        .args(extra)
        .env("NODE_PATH", node_modules())
        .env("HOME", lab.path("."))
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "drive.cjs {mode}: no JSON ({e}):\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(v.get("error").is_none(), "drive.cjs {mode} {url}: {v:#}");
    let bad: Vec<&str> = v["logs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|l| {
            l.contains("Content Security Policy")
                || l.contains("Refused to")
                || l.starts_with("pageerror")
        })
        .collect();
    assert!(bad.is_empty(), "{mode}: the browser complained: {bad:?}");
    assert_eq!(
        v["violations"],
        Value::Array(vec![]),
        "{mode}: axe-core found accessibility violations"
    );
    v
}

fn created(lab: &Lab, args: &[&str]) -> (String, String) {
    let mut all = vec!["token", "create", "--json"];
    all.extend_from_slice(args);
    let v: Value = serde_json::from_str(&lab.ok(&all)).expect("token create --json is JSON");
    (
        v["token"].as_str().unwrap().to_string(),
        v["link"].as_str().unwrap().to_string(),
    )
}

#[test]
fn an_invite_link_signs_a_friend_up_in_a_real_browser() {
    if !require_appliance() {
        return;
    }
    let have = Command::new("chromium").arg("--version").output().is_ok()
        && Command::new("node").arg("--version").output().is_ok()
        && node_modules().join("playwright-core").is_dir()
        && node_modules().join("axe-core").is_dir();
    if !require(
        "chromium, node, playwright-core and axe-core",
        have,
        "run packaging/install-test-deps (it installs tests/invite/package-lock.json)",
    ) {
        return;
    }
    let lab = Lab::new("invite");
    let run = lab.start();

    // The CLI gives the link: the matrix host, the token in the fragment.
    let (token, link) = created(&lab, &["--uses", "1"]);
    assert_eq!(link, format!("{}/invite#{token}", lab.https_base()));
    let plain = lab.run_cmd(&["token", "create"]);
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains(&format!("{}/invite#", lab.https_base())),
        "token create names no invite link: {}",
        String::from_utf8_lossy(&plain.stderr)
    );

    // The page's own headers: a strict CSP, no inline anything.
    let head = lab
        .curl()
        .args(["-D", "-", "-o", "/dev/null"])
        .arg(format!("{}/invite", lab.https_base()))
        .arg("--cacert")
        .arg(lab.ca_root())
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/"), "{head}");
    assert!(
        head.contains(
            "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'"
        ),
        "{head}"
    );
    assert!(!head.contains("unsafe-inline"), "{head}");

    // Without JavaScript the page says that it needs it.
    let nojs = drive(&lab, "nojs", &link, &[]);
    assert!(
        nojs["text"].as_str().unwrap().contains("needs JavaScript"),
        "{nojs:#}"
    );

    // Sign up: a taken name is named taken as typed, two different passwords are refused,
    // then the account is made and the page tells how to sign in.
    let password = "correct horse battery staple";
    let up = drive(
        &lab,
        "signup",
        &link,
        &["registration-bot", "friend", password],
    );
    let mxid = format!("@friend:{}", lab.server_name);
    assert!(
        up["takenNote"].as_str().unwrap().contains("taken"),
        "{up:#}"
    );
    assert!(
        up["freeNote"].as_str().unwrap().contains("available"),
        "{up:#}"
    );
    assert!(
        up["mismatch"].as_str().unwrap().contains("differ"),
        "{up:#}"
    );
    assert_eq!(up["mxid"], mxid.as_str(), "{up:#}");
    let done = up["done"].as_str().unwrap();
    assert!(done.contains("Element X"), "{done}");
    assert!(done.contains(&lab.server_name), "{done}");
    assert_eq!(
        up["elementHref"],
        format!("https://element.{}:{}/", lab.server_name, lab.https_port).as_str()
    );
    assert_eq!(up["focused"], "done-title", "focus moves to the result");

    // The new account is real: matrix-sdk logs in and sliding-syncs (MSC4186) with the
    // SyncService/RoomListService that Element X is built on, and sees a room it made elsewhere.
    let other_device = Matrix::new(&lab.synapse_url()).login("friend", password);
    let (st, made) = Matrix::new(&lab.synapse_url()).req(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&other_device),
        Some(serde_json::json!({"name": "made on another device"})),
    );
    assert_eq!(st, 200, "{made}");
    let room_id = OwnedRoomId::try_from(made["room_id"].as_str().unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = tempfile::tempdir().unwrap();
        // The account made on the invite page logs in.
        let client = common::sdk_login(
            &lab.synapse_url(),
            store.path(),
            "friend",
            password,
            "invite test",
        )
        .await;
        assert_eq!(client.user_id().unwrap().as_str(), mxid);
        let sync = SyncService::builder(client.clone())
            .build()
            .await
            .expect("a sliding sync service");
        let rooms = sync.room_list_service();
        sync.start().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let sync_service::State::Error(e) = sync.state().get() {
                panic!("sliding sync failed: {e}");
            }
            if matches!(rooms.state().get(), room_list_service::State::Running)
                && rooms.room(&room_id).is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sliding sync did not bring {room_id} within 60 s (room list: {:?})",
                rooms.state().get()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sync.stop().await;
    });

    // Each dead token says what is wrong with it.
    let used = drive(&lab, "message", &link, &[]);
    assert!(
        used["text"].as_str().unwrap().contains("used up"),
        "{used:#}"
    );
    assert_eq!(used["formVisible"], false);

    let (expired, expired_link) = created(&lab, &["--expires", "2s"]);
    std::thread::sleep(Duration::from_secs(3));
    let ex = drive(&lab, "message", &expired_link, &[]);
    assert!(ex["text"].as_str().unwrap().contains("expired"), "{ex:#}");

    let made_up = "MadeUp-NoSuchToken_42";
    let unknown = drive(
        &lab,
        "message",
        &format!("{}/invite#{made_up}", lab.https_base()),
        &[],
    );
    assert!(
        unknown["text"].as_str().unwrap().contains("not known"),
        "{unknown:#}"
    );

    // A token used elsewhere (by an app) is used up for the page too.
    let (other, other_link) = created(&lab, &["--uses", "1"]);
    let (st, v) =
        Matrix::new(&lab.synapse_url()).register("elsewhere", "pw-elsewhere-1", Some(&other));
    assert_eq!(st, 200, "{v}");
    let used2 = drive(&lab, "message", &other_link, &[]);
    assert!(
        used2["text"].as_str().unwrap().contains("used up"),
        "{used2:#}"
    );

    // No token reached a log line: neither the front door's nor Synapse's access log, which
    // the supervisor relays (the validity check carries the token in its query string).
    let log = run.log_text();
    for t in [&token, &expired, &other, &made_up.to_string()] {
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(t.as_str())).collect();
        assert!(
            hits.is_empty(),
            "token {t} is in the log:\n{}",
            hits.join("\n")
        );
    }
    assert!(
        log.contains("registration_token/validity?token=<redacted>"),
        "Synapse's access log lines for the validity check are not in the log"
    );
}
