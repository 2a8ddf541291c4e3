//! Synapse with workers (`[synapse] workers = 2`) behind the front door: the real binary,
//! the real Synapse (main process and two generic workers), Debian's redis-server, PostgreSQL.
//! Requests reach the worker docs/workers.md names for them (checked in each process's access
//! log), doctor checks Redis and each worker, the bot answers an encrypted DM, a crashed
//! worker restarts alone and is routed around meanwhile, and a backup made with workers on,
//! restored, brings it all back on one process.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/person.rs"]
mod person;
#[path = "common/sdk.rs"]
mod sdk;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Lab, free_ports, pid_alive, proc_uid, require, require_appliance, wait_until};
use serde_json::{Value, json};

const WRITER: &str = "synapse-writer-sender-media";
const CLIENT: &str = "synapse-federation-client";

/// A request through the front door (TLS, the matrix host); status and JSON body.
fn front(
    lab: &Lab,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, String) {
    let mut c = lab.curl();
    c.args(["--max-time", "20", "-D", "-", "--cacert"])
        .arg(lab.ca_root())
        .args(["-X", method]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    c.arg(format!("{}{path}", lab.https_base()));
    let out = c.output().expect("curl");
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        // No answer at all: what curl said stands in for the head.
        text = format!(
            "curl {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        serde_json::from_str(body).unwrap_or(Value::Null),
        head.to_string(),
    )
}

/// A media download through the front door (the authenticated client API, Matrix spec v1.11).
fn download(lab: &Lab, token: &str, media: &str) -> String {
    let mut down = lab.curl();
    down.args(["--max-time", "20", "--cacert"])
        .arg(lab.ca_root())
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!(
            "{}/_matrix/client/v1/media/download/{media}",
            lab.https_base()
        ));
    String::from_utf8_lossy(&down.output().unwrap().stdout).into_owned()
}

fn child<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no child {name} in {st}"))
}

/// Lines a child logged that contain `what`.
fn logged(log: &str, child: &str, what: &str) -> usize {
    log.lines()
        .filter(|l| {
            let tag = format!("child={child}");
            l.ends_with(&tag) || l.contains(&format!("{tag} "))
        })
        .filter(|l| l.contains(what))
        .count()
}

#[test]
fn synapse_workers_behind_the_front_door() {
    if !require_appliance()
        || !require(
            "redis-server",
            Path::new("/usr/bin/redis-server").exists(),
            "apt install redis-server (packaging/install-deps does)",
        )
    {
        return;
    }
    let lab = Lab::new("workers");
    let base = free_ports(2);
    *lab.synapse_extra.borrow_mut() = format!("workers = 2\nworker_base_port = {base}\n");
    *lab.turn_extra.borrow_mut() = "enabled = false\n".into();
    let backups = lab.path("backups");
    let config = format!(
        "[tls]\nmode = \"internal\"\n[backup]\ndir = \"{}\"\n",
        backups.display()
    );
    lab.write_config(&config);
    let mut run = lab.start();

    // Every process is a child, each as its own user; Redis has no TCP listener.
    let st = lab.status();
    let synapse_uid = proc_uid(child(&st, "synapse")["pid"].as_i64().unwrap() as i32);
    for name in ["redis", "synapse", WRITER, CLIENT] {
        let c = child(&st, name);
        assert_eq!(c["state"], "running", "{c}");
        let uid = proc_uid(c["pid"].as_i64().unwrap() as i32);
        assert_ne!(uid, 0, "{name} runs as root");
        if name == "redis" {
            assert_eq!(c["user"], "redis");
            assert_ne!(uid, synapse_uid);
        } else {
            assert_eq!(uid, synapse_uid, "{name}");
        }
    }
    let redis_pid = child(&st, "redis")["pid"].as_i64().unwrap();
    let ss = Command::new("ss").args(["-ltnpH"]).output().unwrap();
    let tcp = String::from_utf8_lossy(&ss.stdout);
    assert!(
        !tcp.contains(&format!("pid={redis_pid},")),
        "Redis listens on TCP:\n{tcp}"
    );
    let sock = lab.state().join("redis/redis.sock");
    assert!(sock.exists(), "no {}", sock.display());

    // doctor checks Redis and every worker.
    let doctor = |only: &str| -> Vec<Value> {
        let out = lab.run_cmd(&["doctor", "--only", only, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor --json: {e}: {out:?}"));
        v["checks"].as_array().unwrap().clone()
    };
    let checks = doctor("workers");
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "workers:writer-sender-media",
            "workers:federation-client",
            "workers:routes"
        ]
    );
    for c in &checks {
        assert_eq!(c["status"], "pass", "{c}");
    }
    let redis = doctor("redis");
    assert_eq!(redis.len(), 1);
    assert_eq!(redis[0]["status"], "pass", "{}", redis[0]);
    // Redis owns its directory: a link it plants there to root's control socket is not
    // connected to (doctor runs as root).
    let control = lab.dir.path().join("run/control.sock");
    let real = lab.state().join("redis/redis.sock.real");
    let as_redis = |args: &[&str]| {
        let st = common::as_user("redis", args[0])
            .args(&args[1..])
            .status()
            .unwrap();
        assert!(st.success(), "{args:?} as redis");
    };
    as_redis(&["mv", sock.to_str().unwrap(), real.to_str().unwrap()]);
    as_redis(&[
        "ln",
        "-s",
        control.to_str().unwrap(),
        sock.to_str().unwrap(),
    ]);
    let redis = doctor("redis");
    assert_eq!(redis[0]["status"], "fail", "{}", redis[0]);
    assert!(
        redis[0]["seen"]
            .as_str()
            .unwrap()
            .contains("no socket of Redis's user"),
        "{}",
        redis[0]
    );
    as_redis(&["mv", "-f", real.to_str().unwrap(), sock.to_str().unwrap()]);
    assert_eq!(doctor("redis")[0]["status"], "pass");

    // A user's day, through the front door.
    let pw = lab.add_user("alice", true);
    let (code, v, _) = front(
        &lab,
        "POST",
        "/_matrix/client/v3/login",
        None,
        Some(
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": pw}),
        ),
    );
    assert_eq!(code, 200, "{v}");
    let token = v["access_token"].as_str().unwrap().to_string();
    let t = Some(token.as_str());
    let (code, v, _) = front(
        &lab,
        "POST",
        "/_matrix/client/v3/createRoom",
        t,
        Some(json!({})),
    );
    assert_eq!(code, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_string();
    let (code, v, _) = front(&lab, "GET", "/_matrix/client/v3/sync?timeout=0", t, None);
    assert_eq!(code, 200, "{v}");
    let since = v["next_batch"].as_str().unwrap().to_string();
    let (code, v, _) = front(
        &lab,
        "PUT",
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t1"),
        t,
        Some(json!({"msgtype": "m.text", "body": "hello from a worker"})),
    );
    assert_eq!(code, 200, "{v}");
    let event = v["event_id"].as_str().unwrap().to_string();
    let (code, v, _) = front(
        &lab,
        "GET",
        &format!("/_matrix/client/v3/sync?since={since}&timeout=10000"),
        t,
        None,
    );
    assert_eq!(code, 200, "{v}");
    assert!(
        v.to_string().contains(&event),
        "the message comes down /sync: {v}"
    );
    let (code, v, _) = front(
        &lab,
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{room}/typing/@alice:{}",
            lab.server_name
        ),
        t,
        Some(json!({"typing": true, "timeout": 5000})),
    );
    assert_eq!(code, 200, "typing: {v}");
    let mut up = lab.curl();
    up.args(["--max-time", "20", "--cacert"])
        .arg(lab.ca_root())
        .args([
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Content-Type: text/plain",
        ])
        .args(["--data-binary", "a file for the media worker"])
        .arg(format!(
            "{}/_matrix/media/v3/upload?filename=a.txt",
            lab.https_base()
        ));
    let up: Value = serde_json::from_slice(&up.output().unwrap().stdout).unwrap_or(Value::Null);
    let mxc = up["content_uri"]
        .as_str()
        .unwrap_or_else(|| panic!("upload: {up}"))
        .to_string();
    let media = mxc.trim_start_matches("mxc://");
    assert_eq!(download(&lab, &token, media), "a file for the media worker");

    // Each went to the process docs/workers.md names: Synapse's access log, per child.
    let want = [
        (CLIENT, "/_matrix/client/v3/sync", 2),
        (CLIENT, "/send/m.room.message/t1", 1),
        (CLIENT, "/createRoom", 1),
        (WRITER, "/typing/", 1),
        (WRITER, "/_matrix/media/v3/upload", 1),
        (WRITER, "/_matrix/client/v1/media/download/", 1),
    ];
    let counts = || {
        let log = run.log_text();
        want.iter()
            .map(|(c, w, _)| logged(&log, c, w))
            .collect::<Vec<_>>()
    };
    let deadline = common::deadline(Duration::from_secs(10));
    while counts().iter().zip(&want).any(|(n, w)| *n < w.2) {
        assert!(
            std::time::Instant::now() < deadline,
            "requests not seen in the access log of the process that should serve them: {:?}\n{}",
            want.iter().zip(counts()).collect::<Vec<_>>(),
            run.log_text()
                .lines()
                .filter(|l| l.contains("Processed request"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = run.log_text();
    assert_eq!(
        logged(&log, "synapse", "/_matrix/client/v3/sync"),
        0,
        "the main process served /sync"
    );

    // The bot with workers on: an admin's encrypted DM, `create`, an encrypted answer with a
    // token. The bot's own requests (its to-device keys above all) go through the balancer
    // (http::inner): Synapse's main process alone answers them 500.
    wait_until("the bot running", Duration::from_secs(120), || {
        lab.status()["bot"]["state"] == "running"
    });
    let bot: matrix_sdk::ruma::OwnedUserId = format!("@registration-bot:{}", lab.server_name)
        .parse()
        .unwrap();
    let ca = std::fs::read(lab.ca_root()).unwrap();
    let http = common::front_door_http(&lab.matrix_host(), lab.https_port, &ca);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token_made = rt.block_on(async {
        let alice =
            person::Person::login_with(&lab.https_base(), Some(http), "alice", &pw, &bot).await;
        let dm = alice.client.create_dm(&bot).await.unwrap();
        alice
            .wait_membership(
                &dm,
                &bot,
                matrix_sdk::ruma::events::room::member::MembershipState::Join,
            )
            .await;
        let m = alice.ask(&dm, &bot, "create 1 1d").await;
        assert!(m.encrypted, "the answer in the DM was not encrypted: {m:?}");
        let body = m.body.clone();
        let start = body
            .find('`')
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("{m:?}"));
        let len = body[start..].find('`').unwrap();
        body[start..start + len].to_string()
    });
    let shown = lab.ok(&["token", "show", &token_made]);
    assert!(shown.contains(&token_made), "{shown}");
    drop(rt);

    // A crashed worker restarts alone; meanwhile what it serves goes to the main process.
    let main_pid = child(&lab.status(), "synapse")["pid"].as_i64().unwrap();
    let client_pid = child(&lab.status(), CLIENT)["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the worker's death", Duration::from_secs(5), || {
        !pid_alive(client_pid)
    });
    wait_until(
        "the front door to see it down",
        Duration::from_secs(5),
        || child(&lab.status(), CLIENT)["state"] != "running",
    );
    let (code, v, _) = front(&lab, "GET", "/_matrix/client/v3/account/whoami", t, None);
    assert_eq!(code, 200, "whoami while the client worker restarts: {v}");
    wait_until("the client worker back", Duration::from_secs(120), || {
        let st = lab.status();
        let c = child(&st, CLIENT);
        c["state"] == "running" && c["pid"].as_i64() != Some(client_pid as i64)
    });
    let st = lab.status();
    assert_eq!(
        child(&st, "synapse")["pid"].as_i64().unwrap(),
        main_pid,
        "the main process kept running"
    );
    assert!(child(&st, CLIENT)["restarts"].as_u64().unwrap() >= 1);

    // Only the writer writes typing: while it is down that answers 503 with Retry-After, at once.
    let writer_pid = child(&st, WRITER)["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(writer_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the writer seen down", Duration::from_secs(5), || {
        child(&lab.status(), WRITER)["state"] != "running"
    });
    let t0 = std::time::Instant::now();
    let (code, v, head) = front(
        &lab,
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{room}/typing/@alice:{}",
            lab.server_name
        ),
        t,
        Some(json!({"typing": false})),
    );
    if code == 503 {
        assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    } else {
        // The writer came back before the request: it must then have succeeded.
        assert_eq!(code, 200, "typing with the writer down: {head} {v}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "no hang: {:?}",
        t0.elapsed()
    );
    wait_until("the writer back", Duration::from_secs(120), || {
        child(&lab.status(), WRITER)["state"] == "running"
    });

    // A backup with workers on holds it all: the one database, the media worker's files.
    let out = lab.ok(&["backup"]);
    assert!(out.contains("verified"), "{out}");
    let files: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let (code, v, _) = front(
        &lab,
        "PUT",
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t2"),
        t,
        Some(json!({"msgtype": "m.text", "body": "after the backup"})),
    );
    assert_eq!(code, 200, "{v}");

    // Restored, and back to one process: everything the backup held is there.
    run.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(90));
    let out = lab.ok(&["restore", files[0].to_str().unwrap(), "--force"]);
    eprintln!("restore: {out}");
    *lab.synapse_extra.borrow_mut() = format!("workers = 0\nworker_base_port = {base}\n");
    lab.write_config(&config);
    let mut run = lab.start();
    let st = lab.status();
    for c in st["children"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        assert!(
            name != "redis" && !name.starts_with("synapse-"),
            "one Synapse process, no Redis: {st}"
        );
    }
    let (code, v, _) = front(
        &lab,
        "GET",
        &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10"),
        t,
        None,
    );
    assert_eq!(code, 200, "{v}");
    assert!(v.to_string().contains("hello from a worker"), "{v}");
    assert!(
        !v.to_string().contains("after the backup"),
        "the restore kept what came after the backup: {v}"
    );
    assert_eq!(
        download(&lab, &token, media),
        "a file for the media worker",
        "the media the worker stored"
    );
    run.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(90));
}
