//! The appliance end to end: the real binary supervising the real Synapse on a provisioned,
//! real PostgreSQL. One long scenario, because each Synapse start costs seconds.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::{Lab, Matrix, pid_alive, proc_uid, require_appliance, wait_until};
use nix::sys::signal::Signal;
use serde_json::json;

fn secret_files(state: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    let dir = state.join("secrets");
    let mode = fs::metadata(&dir).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "secrets dir mode");
    fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (fs::read(e.path()).unwrap(), m.mode() & 0o777),
            )
        })
        .collect()
}

#[test]
fn synapse_under_the_supervisor_end_to_end() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("e2e");
    let mut run = lab.start();
    let hs = Matrix::new(&lab.synapse_url());
    let synapse_uid = nix::unistd::User::from_name("matrix-synapse")
        .unwrap()
        .expect("matrix-synapse user")
        .uid
        .as_raw();

    // The child runs as its own user, not root, and status says so.
    let syn = lab.synapse_status();
    assert_eq!(syn["state"], "running", "{syn}");
    assert_eq!(syn["user"], "matrix-synapse");
    let synapse_pid = syn["pid"].as_i64().unwrap() as i32;
    assert_eq!(proc_uid(synapse_pid), synapse_uid);
    assert_ne!(proc_uid(synapse_pid), 0);
    assert_eq!(lab.status()["phase"], "ready");

    // Secrets: 0600, root-owned, from the CSPRNG (64 hex chars), none printed in the log.
    let secrets = secret_files(&lab.state());
    for name in [
        "registration_shared_secret",
        "macaroon_secret_key",
        "form_secret",
        "postgres_password",
        "turn_shared_secret",
    ] {
        let (value, mode) = &secrets[name];
        assert_eq!(*mode, 0o600, "{name} mode");
        assert_eq!(value.len(), 64, "{name} length");
        let text = String::from_utf8_lossy(value).into_owned();
        assert!(!run.log_text().contains(&text), "{name} appears in the log");
    }
    let homeserver_yaml = fs::read_to_string(lab.state().join("synapse/homeserver.yaml")).unwrap();
    let pw = String::from_utf8_lossy(&secrets["postgres_password"].0).into_owned();
    assert!(
        !homeserver_yaml.contains(&pw),
        "DB password inline in homeserver.yaml"
    );
    let signing_key = fs::read(lab.state().join("synapse/signing.key")).unwrap();

    // `user add` makes an admin who can log in and use the admin API.
    let pwfile = lab.path("alice.pw");
    fs::write(&pwfile, "alice-password-1\n").unwrap();
    let out = lab.ok(&[
        "user",
        "add",
        "alice",
        "--admin",
        "--password-file",
        pwfile.to_str().unwrap(),
    ]);
    assert!(
        out.contains("created @alice:matrix.test (server admin)"),
        "{out}"
    );
    let again = lab.run_cmd(&[
        "user",
        "add",
        "alice",
        "--password-file",
        pwfile.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let alice = hs.login("alice", "alice-password-1");
    let (st, v) = hs.req(
        "GET",
        "/_synapse/admin/v2/users/@alice:matrix.test",
        Some(&alice),
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["admin"], true);

    // Registration without a token is refused: the only flow needs one.
    let (st, v) = hs.register("mallory", "mallory-password-1", None);
    assert_eq!(st, 401, "{v}");
    let flows = v["flows"].as_array().unwrap();
    assert!(
        flows.iter().all(|f| f["stages"]
            .as_array()
            .unwrap()
            .contains(&json!("m.login.registration_token"))),
        "{v}"
    );
    let (st, v) = hs.register("mallory", "mallory-password-1", Some("not-a-token"));
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["errcode"], "M_UNAUTHORIZED");

    // A token from `token create` lets exactly one new user register.
    let token = lab
        .ok(&["token", "create", "--uses", "1", "--expires", "1d"])
        .trim()
        .to_string();
    assert!(!token.is_empty());
    let (st, v) = hs.register("bob", "bob-password-1", Some(&token));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["user_id"], "@bob:matrix.test");
    let shown: serde_json::Value =
        serde_json::from_str(&lab.ok(&["token", "show", &token, "--json"])).unwrap();
    assert_eq!(shown["completed"], 1);
    assert_eq!(shown["uses_allowed"], 1);
    let (st, _) = hs.register("carol", "carol-password-1", Some(&token));
    assert_eq!(st, 401, "a used-up token must not register another user");

    // `token delete` really removes it.
    let t2 = lab
        .ok(&["token", "create", "--token", "deleteme-123"])
        .trim()
        .to_string();
    assert_eq!(t2, "deleteme-123");
    assert!(lab.ok(&["token", "list"]).contains("deleteme-123"));
    assert!(
        lab.ok(&["token", "delete", "deleteme-123"])
            .contains("deleted")
    );
    let shown = lab.run_cmd(&["token", "show", "deleteme-123"]);
    assert_eq!(shown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&shown.stderr).contains("no registration token"));
    assert!(!lab.ok(&["token", "list"]).contains("deleteme-123"));
    let (st, _) = hs.register("dave", "dave-password-1", Some("deleteme-123"));
    assert_eq!(st, 401);

    // A message sent before Synapse is killed is still there after the supervisor restarts it.
    let (st, room) = hs.req(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&alice),
        Some(json!({"preset": "private_chat"})),
    );
    assert_eq!(st, 200, "{room}");
    let room_id = room["room_id"].as_str().unwrap().to_string();
    let (st, v) = hs.req(
        "PUT",
        &format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/txn1"),
        Some(&alice),
        Some(json!({"msgtype": "m.text", "body": "sent before the kill"})),
    );
    assert_eq!(st, 200, "{v}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(synapse_pid), Signal::SIGKILL).unwrap();
    wait_until(
        "Synapse to be restarted and healthy",
        Duration::from_secs(90),
        || {
            let s = lab.synapse_status();
            s["state"] == "running"
                && s["restarts"].as_u64() >= Some(1)
                && s["pid"].as_i64() != Some(synapse_pid as i64)
        },
    );
    let syn = lab.synapse_status();
    assert_eq!(syn["last_exit"], "killed by SIGKILL", "{syn}");
    assert!(!pid_alive(synapse_pid), "the killed Synapse was not reaped");
    let (st, v) = hs.req(
        "GET",
        &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=10"),
        Some(&alice),
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert!(v.to_string().contains("sent before the kill"), "{v}");
    let synapse_pid = lab.synapse_status()["pid"].as_i64().unwrap() as i32;

    // SIGTERM: Synapse stopped within the grace period (10s), supervisor exits 0.
    let st = run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15));
    assert_eq!(st.code(), Some(0), "{}", run.log_tail());
    assert!(
        !pid_alive(synapse_pid),
        "Synapse outlived the supervisor's SIGTERM"
    );
    assert!(run.log_text().contains("stopped"));
    drop(run);

    // Restart: secrets and signing key unchanged, nothing re-provisioned, the kept admin
    // session still drives the token API.
    let mut run = lab.start();
    assert_eq!(
        secret_files(&lab.state())
            .into_iter()
            .filter(|(k, _)| k != "service_access_token")
            .collect::<BTreeMap<_, _>>(),
        secrets
            .into_iter()
            .filter(|(k, _)| k != "service_access_token")
            .collect::<BTreeMap<_, _>>(),
        "secrets changed across a restart"
    );
    assert_eq!(
        fs::read(lab.state().join("synapse/signing.key")).unwrap(),
        signing_key
    );
    assert!(
        run.log_text().contains("nothing changed"),
        "second start re-provisioned"
    );
    assert!(lab.ok(&["token", "list"]).contains("used 1 of 1"));
    hs.login("bob", "bob-password-1");

    // SIGKILL of the supervisor: PR_SET_PDEATHSIG takes Synapse down with it.
    let synapse_pid = lab.synapse_status()["pid"].as_i64().unwrap() as i32;
    run.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5));
    wait_until(
        "Synapse to die with its supervisor",
        Duration::from_secs(5),
        || !pid_alive(synapse_pid),
    );
}

#[test]
fn sighup_applies_synapse_overrides_by_restarting_synapse() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("hup");
    let mut run = lab.start();
    let hs = Matrix::new(&lab.synapse_url());
    let before = lab.synapse_status()["pid"].as_i64().unwrap();
    let (st, v) = hs.register("eve", "eve-password-1", None);
    assert_eq!(st, 401, "token registration is on by default: {v}");
    // An operator override that shows from outside: registration switched off entirely.
    fs::write(
        lab.path("synapse.d/50-no-registration.yaml"),
        "enable_registration: false\n",
    )
    .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid()), Signal::SIGHUP).unwrap();
    wait_until(
        "Synapse to restart with the override",
        Duration::from_secs(90),
        || {
            let s = lab.synapse_status();
            s["state"] == "running" && s["pid"].as_i64() != Some(before)
        },
    );
    let (st, v) = hs.register("eve", "eve-password-1", None);
    assert_eq!(st, 403, "override not applied: {v}");
    assert_eq!(v["errcode"], "M_FORBIDDEN");
    // A second SIGHUP with nothing changed leaves Synapse alone.
    let pid = lab.synapse_status()["pid"].as_i64();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid()), Signal::SIGHUP).unwrap();
    wait_until("the reload to be logged", Duration::from_secs(10), || {
        run.log_text().contains("Synapse's config is unchanged")
    });
    assert_eq!(lab.synapse_status()["pid"].as_i64(), pid);
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15))
            .code(),
        Some(0)
    );
}
