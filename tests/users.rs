//! `homelab-matrix user ...` against the real Synapse: list (paginated), show, deactivate
//! (with erasure), reset-password, admin, and the refusals with their exit codes. One lab,
//! because each Synapse start costs seconds.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;

use common::{Lab, Matrix, require_appliance};
use serde_json::{Value, json};

/// More than two of the admin API's 100-user pages.
const BULK: usize = 230;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must fail with `code`; returns its stderr.
fn fails(lab: &Lab, args: &[&str], code: i32) -> String {
    let out = lab.run_cmd(args);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "homelab-matrix {args:?}: stdout {} stderr {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

fn pw_file(lab: &Lab, name: &str, pw: &str) -> String {
    let f = lab.path(name);
    std::fs::write(&f, format!("{pw}\n")).unwrap();
    f.to_str().unwrap().to_string()
}

fn add_user(lab: &Lab, name: &str) -> String {
    let pw = format!("{name}-password-1");
    let f = pw_file(lab, &format!("{name}.pw"), &pw);
    lab.ok(&["user", "add", name, "--password-file", &f]);
    pw
}

/// Password login: the status and the access token (if any).
fn login(m: &Matrix, user: &str, pw: &str) -> (u16, Option<String>) {
    let (st, v) = m.req(
        "POST",
        "/_matrix/client/v3/login",
        None,
        Some(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": pw})),
    );
    (st, v["access_token"].as_str().map(str::to_string))
}

fn join(m: &Matrix, room: &str, token: &str) {
    let (st, v) = m.req(
        "POST",
        &format!("/_matrix/client/v3/join/{room}"),
        Some(token),
        None,
    );
    assert_eq!(st, 200, "{v}");
}

fn whoami(m: &Matrix, token: &str) -> u16 {
    m.req(
        "GET",
        "/_matrix/client/v3/account/whoami",
        Some(token),
        None,
    )
    .0
}

fn list_json(lab: &Lab, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["user", "list", "--json"];
    args.extend_from_slice(extra);
    let v: Value = serde_json::from_str(&lab.ok(&args)).expect("user list --json is JSON");
    v.as_array().unwrap().clone()
}

fn is_server_admin(m: &Matrix, service: &str, user: &str) -> bool {
    let (st, v) = m.req(
        "GET",
        &format!("/_synapse/admin/v1/users/{user}/admin"),
        Some(service),
        None,
    );
    assert_eq!(st, 200, "{v}");
    v["admin"].as_bool().unwrap()
}

#[test]
fn user_admin_commands_against_synapse() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("users");
    let _run = lab.start();
    let m = Matrix::new(&lab.synapse_url());
    let service = std::fs::read_to_string(lab.state().join("secrets/service_access_token"))
        .expect("the service account's token")
        .trim()
        .to_string();
    let alice_pw = add_user(&lab, "alice");
    let bob_pw = add_user(&lab, "bob");
    let mallory_pw = add_user(&lab, "mallory");
    let carol_pw = add_user(&lab, "carol");
    let dave_pw = add_user(&lab, "dave");

    // `list` pages past the API's page size: BULK accounts made through the admin API
    // (no password, so no bcrypt), four at a time.
    std::thread::scope(|s| {
        for part in 0..4 {
            let (m, service) = (&m, &service);
            s.spawn(move || {
                for i in (part..BULK).step_by(4) {
                    let (st, v) = m.req(
                        "PUT",
                        &format!("/_synapse/admin/v2/users/@bulk{i:03}:matrix.test"),
                        Some(service),
                        Some(json!({})),
                    );
                    assert_eq!(st, 201, "{v}");
                }
            });
        }
    });
    let users = list_json(&lab, &[]);
    let names: BTreeSet<&str> = users.iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), users.len(), "a user listed twice");
    for i in 0..BULK {
        assert!(
            names.contains(format!("@bulk{i:03}:matrix.test").as_str()),
            "@bulk{i:03} missing from {} listed",
            users.len()
        );
    }
    for u in ["@alice:matrix.test", "@homelab-matrix:matrix.test"] {
        assert!(names.contains(u), "{u} missing");
    }
    let text = lab.ok(&["user", "list"]);
    assert!(text.starts_with("USER"), "{text}");
    assert!(
        text.contains(&format!("{} users", users.len())),
        "{}",
        text.lines().last().unwrap_or("")
    );

    // `show`: devices and a room.
    let (_, a1) = login(&m, "alice", &alice_pw);
    let a1 = a1.expect("alice logs in");
    let (_, a2) = login(&m, "alice", &alice_pw);
    let a2 = a2.unwrap();
    assert_eq!(whoami(&m, &a2), 200);
    let (st, v) = m.req(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&a1),
        Some(json!({"preset": "private_chat", "invite": ["@mallory:matrix.test"]})),
    );
    assert_eq!(st, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_string();
    let shown: Value =
        serde_json::from_str(&lab.ok(&["user", "show", "@alice:matrix.test", "--json"])).unwrap();
    assert_eq!(shown["name"], "@alice:matrix.test", "{shown}");
    assert_eq!(shown["joined_rooms"], 1, "{shown}");
    // Two logins, and the device shared-secret registration (`user add`) made.
    let devices = shown["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 3, "{shown}");
    assert_eq!(
        devices
            .iter()
            .filter(|d| d["last_seen_ip"] == "127.0.0.1" && d["last_seen_ts"].as_i64().is_some())
            .count(),
        2,
        "{shown}"
    );
    assert_eq!(shown["admin"], false, "{shown}");
    assert!(
        shown["creation_ts"].as_i64().unwrap() > 1_700_000_000_000,
        "{shown}"
    );
    let text = lab.ok(&["user", "show", "alice"]);
    assert!(text.contains("rooms joined: 1"), "{text}");
    assert!(text.contains("devices:      3"), "{text}");
    assert!(text.contains("from 127.0.0.1"), "{text}");

    // `admin on|off` shows in the admin API's is-admin query.
    assert!(!is_server_admin(&m, &service, "@alice:matrix.test"));
    assert!(lab.ok(&["user", "admin", "alice", "on"]).contains("is now"));
    assert!(is_server_admin(&m, &service, "@alice:matrix.test"));
    let alice = list_json(&lab, &[])
        .into_iter()
        .find(|u| u["name"] == "@alice:matrix.test")
        .unwrap();
    assert_eq!(alice["admin"], true, "{alice}");
    lab.ok(&["user", "admin", "@alice:matrix.test", "off"]);
    assert!(!is_server_admin(&m, &service, "@alice:matrix.test"));

    // `reset-password --keep-devices`: the new password works, the old one does not, the
    // other device stays logged in; without the flag, every device is logged out.
    let (_, b1) = login(&m, "bob", &bob_pw);
    let b1 = b1.unwrap();
    let new1 = pw_file(&lab, "bob-new1.pw", "bob-new-password-1");
    let out = lab.ok(&[
        "user",
        "reset-password",
        "bob",
        "--password-file",
        &new1,
        "--keep-devices",
    ]);
    assert!(out.contains("stay logged in"), "{out}");
    assert_eq!(
        login(&m, "bob", &bob_pw).0,
        403,
        "the old password still works"
    );
    let (st, b2) = login(&m, "bob", "bob-new-password-1");
    assert_eq!(st, 200);
    assert_eq!(whoami(&m, &b1), 200, "--keep-devices logged a device out");
    let new2 = pw_file(&lab, "bob-new2.pw", "bob-new-password-2");
    lab.ok(&[
        "user",
        "reset-password",
        "@bob:matrix.test",
        "--password-file",
        &new2,
    ]);
    assert_eq!(whoami(&m, &b1), 401, "the other device's token still works");
    assert_eq!(whoami(&m, &b2.unwrap()), 401);
    assert_eq!(login(&m, "bob", "bob-new-password-1").0, 403);
    assert_eq!(login(&m, "bob", "bob-new-password-2").0, 200);
    let err = fails(&lab, &["user", "reset-password", "bob"], 1);
    assert!(err.contains("--password-file"), "{err}");
    // On a terminal it asks twice, without echo.
    let (code, shown) = lab.on_terminal(
        &["user", "reset-password", "bob"],
        &["bob-new-password-3", "bob-new-password-3"],
    );
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("Password for @bob:matrix.test:"), "{shown}");
    assert!(!shown.contains("bob-new-password-3"), "echoed: {shown}");
    assert_eq!(login(&m, "bob", "bob-new-password-3").0, 200);

    // `deactivate --erase`: mallory's messages are served redacted to carol, who joins later;
    // alice, who was there, still has them. Mallory can no longer log in.
    let (_, mt) = login(&m, "mallory", &mallory_pw);
    let mt = mt.unwrap();
    join(&m, &room, &mt);
    for i in 0..2 {
        let (st, v) = m.req(
            "PUT",
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/spam{i}"),
            Some(&mt),
            Some(json!({"msgtype": "m.text", "body": format!("buy cheap stuff {i}")})),
        );
        assert_eq!(st, 200, "{v}");
    }
    let err = fails(&lab, &["user", "deactivate", "mallory", "--erase"], 2);
    assert!(err.contains("add --yes"), "{err}");
    assert_eq!(
        login(&m, "mallory", &mallory_pw).0,
        200,
        "deactivated unasked"
    );
    // On a terminal it asks, and only "yes" goes on.
    let (code, shown) = lab.on_terminal(&["user", "deactivate", "mallory"], &["no"]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("This cannot be undone") && shown.contains("nothing was changed"),
        "{shown}"
    );
    assert_eq!(login(&m, "mallory", &mallory_pw).0, 200);
    let out = lab.ok(&["user", "deactivate", "mallory", "--erase", "--yes"]);
    assert!(out.contains("deactivated @mallory:matrix.test"), "{out}");
    assert_eq!(
        login(&m, "mallory", &mallory_pw).0,
        403,
        "a deactivated user logs in"
    );
    assert_eq!(whoami(&m, &mt), 401);
    let err = fails(
        &lab,
        &[
            "user",
            "reset-password",
            "mallory",
            "--password-file",
            &new1,
        ],
        1,
    );
    assert!(err.contains("is deactivated"), "{err}");
    assert!(
        lab.ok(&["user", "deactivate", "mallory", "--yes"])
            .contains("already deactivated")
    );
    let (st, v) = m.req(
        "POST",
        &format!("/_matrix/client/v3/rooms/{room}/invite"),
        Some(&a1),
        Some(json!({"user_id": "@carol:matrix.test"})),
    );
    assert_eq!(st, 200, "{v}");
    let (_, ct) = login(&m, "carol", &carol_pw);
    let ct = ct.unwrap();
    join(&m, &room, &ct);
    let mallorys = |token: &str| -> Vec<Value> {
        let (st, v) = m.req(
            "GET",
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100"),
            Some(token),
            None,
        );
        assert_eq!(st, 200, "{v}");
        v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["sender"] == "@mallory:matrix.test" && e["type"] == "m.room.message")
            .cloned()
            .collect()
    };
    let seen_by_carol = mallorys(&ct);
    assert_eq!(seen_by_carol.len(), 2, "{seen_by_carol:?}");
    for e in &seen_by_carol {
        assert!(
            e["content"].as_object().is_some_and(|c| c.is_empty()),
            "an erased user's message is served to a later joiner: {e}"
        );
    }
    let seen_by_alice = mallorys(&a1);
    assert!(
        seen_by_alice.iter().all(|e| e["content"]["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("buy"))),
        "{seen_by_alice:?}"
    );
    // Listed only with --deactivated, and marked erased.
    assert!(
        !list_json(&lab, &[])
            .iter()
            .any(|u| u["name"] == "@mallory:matrix.test")
    );
    let mallory = list_json(&lab, &["--deactivated"])
        .into_iter()
        .find(|u| u["name"] == "@mallory:matrix.test")
        .expect("--deactivated lists mallory");
    assert_eq!(mallory["deactivated"], true, "{mallory}");
    assert_eq!(mallory["erased"], true, "{mallory}");

    // Refusals: the appliance's own accounts, and names that are not local users.
    let (code, shown) = lab.on_terminal(&["user", "deactivate", "dave"], &["yes"]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("deactivated @dave:matrix.test"), "{shown}");
    assert_eq!(login(&m, "dave", &dave_pw).0, 403);

    for args in [
        &["user", "deactivate", "homelab-matrix", "--yes"][..],
        &["user", "admin", "@homelab-matrix:matrix.test", "off"],
        &[
            "user",
            "reset-password",
            "homelab-matrix",
            "--password-file",
            &new1,
        ],
    ] {
        let err = fails(&lab, args, 1);
        assert!(err.contains("service account"), "{args:?}: {err}");
    }
    let err = fails(
        &lab,
        &["user", "deactivate", "registration-bot", "--yes"],
        1,
    );
    assert!(err.contains("bot.enabled = false"), "{err}");
    let err = fails(&lab, &["user", "show", "@bob:matrix.org"], 2);
    assert!(
        err.contains("not of this server") && err.contains("`@alice:matrix.test`"),
        "{err}"
    );
    let err = fails(&lab, &["user", "deactivate", "@bob:matrix.org", "--yes"], 2);
    assert!(err.contains("not of this server"), "{err}");
    let err = fails(&lab, &["user", "show", "Not A Name!"], 2);
    assert!(err.contains("like `alice`"), "{err}");
    let err = fails(&lab, &["user", "show", "nobody"], 1);
    assert!(
        err.contains("no user @nobody:matrix.test") && err.contains("user list"),
        "{err}"
    );
    let err = fails(&lab, &["user", "deactivate", "nobody", "--yes"], 1);
    assert!(err.contains("no user @nobody:matrix.test"), "{err}");
    let err = fails(&lab, &["user", "admin", "nobody", "on"], 1);
    assert!(err.contains("no user"), "{err}");
    fails(&lab, &["user", "admin", "alice", "maybe"], 2);
    assert!(is_server_admin(&m, &service, "@homelab-matrix:matrix.test"));
}
