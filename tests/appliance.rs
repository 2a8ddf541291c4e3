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
    let signing_key = fs::read(lab.state().join("synapse-data/signing.key")).unwrap();

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
    // Without --password-file, on a terminal, it asks twice (a real pty, through script(1)).
    let cmdline = format!(
        "{} --config {} user add dora",
        common::bin(),
        lab.config.display()
    );
    let mut c = std::process::Command::new("script");
    c.args(["-qec", &cmdline, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // Typed slowly, as a person would: each line after its prompt.
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(700));
            stdin.write_all(b"dora-password-1\n").unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Password for dora:"), "{text}");
    assert!(
        !text.contains("dora-password-1"),
        "the password was echoed: {text}"
    );
    assert!(text.contains("created @dora:matrix.test"), "{text}");
    hs.login("dora", "dora-password-1");
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
        fs::read(lab.state().join("synapse-data/signing.key")).unwrap(),
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

fn curl_json(c: &mut std::process::Command) -> serde_json::Value {
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("not JSON: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn through_the_front_door_to_synapse() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("front");
    // All addresses, so that a second host (a network namespace) can reach the front door.
    lab.write_config_on("0.0.0.0", "[tls]\nmode = \"internal\"\n");
    let _run = lab.start();
    let ca = lab.ca_root();
    let base = lab.https_base();
    let curl = || {
        let mut c = lab.curl();
        c.arg("--cacert").arg(&ca);
        c
    };

    // /versions over HTTP/2 and HTTP/1.1, verified against the internal CA's root.
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = curl()
            .args([
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
            ])
            .arg(format!("{base}/_matrix/client/versions"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{want} 200"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Log in through the front door.
    let pw = lab.path("alice.pw");
    fs::write(&pw, "alice-password-1\n").unwrap();
    lab.ok(&[
        "user",
        "add",
        "alice",
        "--admin",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    let login = curl_json(
        curl()
            .args(["-X", "POST", "-H", "Content-Type: application/json", "--data"])
            .arg(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "alice-password-1"}).to_string())
            .arg(format!("{base}/_matrix/client/v3/login")),
    );
    let token = login["access_token"]
        .as_str()
        .expect("an access token")
        .to_string();
    let auth = format!("Authorization: Bearer {token}");

    // A 40 MB upload and download, byte-exact.
    let big = lab.path("big.bin");
    let data: Vec<u8> = (0..40_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(&big, &data).unwrap();
    let up = curl_json(
        curl()
            .args([
                "-X",
                "POST",
                "-H",
                &auth,
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
            ])
            .arg(format!("@{}", big.display()))
            .arg(format!("{base}/_matrix/media/v3/upload?filename=big.bin")),
    );
    let mxc = up["content_uri"]
        .as_str()
        .unwrap_or_else(|| panic!("{up}"))
        .to_string();
    let media_id = mxc.rsplit('/').next().unwrap();
    let back = lab.path("back.bin");
    let out = curl()
        .args(["-H", &auth, "-o"])
        .arg(&back)
        .args(["-w", "%{http_code}"])
        .arg(format!(
            "{base}/_matrix/client/v1/media/download/matrix.test/{media_id}"
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert!(
        fs::read(&back).unwrap() == data,
        "the downloaded media differs from the upload"
    );

    // Over the limit (45M here): 413 from the front door.
    fs::write(&big, vec![0u8; 46 << 20]).unwrap();
    let out = curl()
        .args([
            "--http1.1",
            "-X",
            "POST",
            "-H",
            &auth,
            "-w",
            "\n%{http_code}",
            "--data-binary",
        ])
        .arg(format!("@{}", big.display()))
        .arg(format!("{base}/_matrix/media/v3/upload"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n413") && text.contains("M_TOO_LARGE"),
        "{text}"
    );

    // A forged X-Forwarded-For does not reach Synapse: its own record of alice's addresses
    // (admin API "whois") has the real peer only.
    let out = curl()
        .args([
            "-H",
            &auth,
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("{base}/_matrix/client/v3/account/whoami"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let whois = curl_json(
        curl()
            .args(["-H", &auth])
            .arg(format!("{base}/_synapse/admin/v1/whois/@alice:matrix.test")),
    );
    let text = whois.to_string();
    assert!(text.contains("\"ip\":\"127.0.0.1\""), "{text}");
    assert!(
        !text.contains("203.0.113.9"),
        "the forged address reached Synapse: {text}"
    );

    // Federation on its own port.
    let key = curl_json(curl().arg(format!(
        "https://{}:{}/_matrix/key/v2/server",
        lab.matrix_host(),
        lab.federation_port
    )));
    assert_eq!(key["server_name"], "matrix.test", "{key}");

    // The admin API from a second host is refused; from here it works (above, and again).
    let ns = common::NetNs::new();
    let mut c = ns.exec("curl");
    c.args([
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        "-H",
        &auth,
        "--cacert",
    ])
    .arg(&ca)
    .arg("--resolve")
    .arg(format!(
        "{}:{}:{}",
        lab.matrix_host(),
        lab.https_port,
        ns.host_ip
    ))
    .arg(format!("{base}/_synapse/admin/v1/registration_tokens"));
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n403") && text.contains("M_FORBIDDEN"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl()
        .args(["-H", &auth, "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{base}/_synapse/admin/v1/registration_tokens"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}
