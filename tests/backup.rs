//! Backups end to end (issue #15): the real binary, Synapse, PostgreSQL and restic, with real
//! data made by real clients (matrix-sdk with end-to-end encryption). One long scenario, as
//! each Synapse start costs seconds: fill, back up while messages are being sent, refuse
//! damaged files and wrong targets, wipe everything (state dir, database, role, synapse.d),
//! restore, and check that everyone and everything is back.

#![cfg(feature = "bot")]
// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "common/person.rs"]
mod person;
#[path = "common/sdk.rs"]
mod sdk;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Lab, Matrix, psql, require, require_appliance, wait_until};
use matrix_sdk::Room;
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::{OwnedUserId, RoomId};
use nix::sys::signal::Signal;
use person::{Person, WAIT};
use serde_json::{Value, json};

const RESTIC_PASSWORD: &str = "restic-test-password";

/// Runs a command as matrix-synapse, the way a compromised Synapse would; it must succeed.
fn as_child(args: &[&str]) {
    let st = common::as_user("matrix-synapse", args[0])
        .args(&args[1..])
        .status()
        .unwrap();
    assert!(st.success(), "as matrix-synapse: {args:?}");
}

fn at(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

/// The lab's config with backups into the lab and, when given, a restic repository.
fn write_config(lab: &Lab, restic: bool) {
    let mut extra = format!(
        "[tls]\nmode = \"internal\"\n[backup]\ndir = \"{}\"\n",
        lab.path("backups").display()
    );
    if restic {
        extra.push_str(&format!(
            "repository = \"{}\"\npassword_file = \"{}\"\n",
            lab.path("restic-repo").display(),
            lab.path("restic.pw").display()
        ));
    }
    lab.write_config(&extra);
}

/// The backup files in the lab's backup directory, oldest first.
fn backups(lab: &Lab) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(lab.path("backups"))
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "tar"));
    v.sort();
    v
}

/// Runs a CLI command that must fail; returns its stderr.
fn fails(lab: &Lab, args: &[&str]) -> String {
    let out = lab.run_cmd(args);
    assert!(
        !out.status.success(),
        "homelab-matrix {args:?} succeeded but must not:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The names and contents of every member of a backup file.
fn members(file: &Path) -> Vec<(String, Vec<u8>)> {
    let mut ar = tar::Archive::new(fs::File::open(file).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = vec![];
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

fn signing_key(lab: &Lab) -> Vec<u8> {
    fs::read(lab.state().join("synapse-data/signing.key")).unwrap()
}

/// The server's published verify keys (federation key API, spec "Publishing Keys").
fn published_keys(lab: &Lab) -> Value {
    let (st, v) = Matrix::new(&lab.synapse_url()).req("GET", "/_matrix/key/v2/server", None, None);
    assert_eq!(st, 200, "{v}");
    v["verify_keys"].clone()
}

/// Waits until `p` has received `body` in `room`; returns whether it arrived encrypted.
async fn received(p: &Person, room: &RoomId, body: &str) -> bool {
    p.wait_for(&format!("{body:?} in {room}"), |m| {
        m.room == room && m.body == body
    })
    .await
    .encrypted
}

/// The bodies of `room`'s history as `p`'s client decrypts them now (a fresh /messages, not
/// what sync delivered before).
async fn history(room: &Room) -> Vec<(String, bool)> {
    let mut opts = MessagesOptions::backward();
    opts.limit = 100u32.into();
    let msgs = room.messages(opts).await.unwrap();
    msgs.chunk
        .iter()
        .filter_map(|ev| {
            let v: Value = serde_json::from_str(ev.raw().json().get()).ok()?;
            (v["type"] == "m.room.message").then(|| {
                (
                    v["content"]["body"].as_str().unwrap_or("").to_string(),
                    ev.encryption_info().is_some(),
                )
            })
        })
        .collect()
}

/// The `seq N` messages of a room, as Synapse serves them.
fn seqs(hs: &str, token: &str, room: &str) -> Vec<u64> {
    let m = Matrix::new(hs);
    let mut out = vec![];
    let mut from: Option<String> = None;
    loop {
        let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=500");
        if let Some(f) = &from {
            path.push_str(&format!("&from={f}"));
        }
        let (st, v) = m.req("GET", &path, Some(token), None);
        assert_eq!(st, 200, "{v}");
        let chunk = v["chunk"].as_array().cloned().unwrap_or_default();
        for ev in &chunk {
            if let Some(n) = ev["content"]["body"]
                .as_str()
                .and_then(|b| b.strip_prefix("seq "))
            {
                out.push(n.parse().unwrap());
            }
        }
        match v["end"].as_str() {
            Some(e) if !chunk.is_empty() => from = Some(e.to_string()),
            _ => break,
        }
    }
    out.sort();
    out
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
}

fn upload(hs: &str, token: &str, data: &[u8]) -> String {
    let resp = http()
        .post(format!("{hs}/_matrix/media/v3/upload?filename=photo.bin"))
        .bearer_auth(token)
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().unwrap();
    v["content_uri"].as_str().unwrap().to_string()
}

fn download(hs: &str, token: &str, mxc: &str) -> (u16, Vec<u8>) {
    let path = mxc.strip_prefix("mxc://").unwrap();
    let resp = http()
        .get(format!("{hs}/_matrix/client/v1/media/download/{path}"))
        .bearer_auth(token)
        .send()
        .unwrap();
    (resp.status().as_u16(), resp.bytes().unwrap().to_vec())
}

/// Messages sent one after the other (each waits for Synapse's 200) into `room` until told to
/// stop; returns the numbers Synapse accepted.
fn send_until(hs: String, token: String, room: String, stop: Arc<AtomicBool>) -> Vec<u64> {
    let m = Matrix::new(&hs);
    let mut sent = vec![];
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let (st, _) = m.req(
            "PUT",
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/seq{n}"),
            Some(&token),
            Some(json!({"msgtype": "m.text", "body": format!("seq {n}")})),
        );
        if st == 200 {
            sent.push(n);
        }
        n += 1;
    }
    sent
}

#[test]
fn everything_comes_back_after_a_wipe_and_a_restore() {
    if !require_appliance() {
        return;
    }
    let restic = require(
        "restic",
        Path::new("/usr/bin/restic").exists(),
        "apt install restic (packaging/install-deps installs it)",
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut lab = Lab::new("backup");
    fs::write(lab.path("restic.pw"), RESTIC_PASSWORD).unwrap();
    write_config(&lab, restic);
    let mut run = lab.start();
    let hs = lab.synapse_url();
    let bot: OwnedUserId = "@registration-bot:matrix.test".parse().unwrap();
    wait_until("the bot to run", Duration::from_secs(120), || {
        lab.status()["bot"]["state"] == "running"
    });
    let alice_pw = lab.add_user("alice", true);
    let bob_pw = lab.add_user("bob", false);
    lab.ok(&["token", "create", "--token", "kept-token-1", "--uses", "5"]);
    let alice_token = Matrix::new(&hs).login("alice", &alice_pw);
    let photo: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mxc = upload(&hs, &alice_token, &photo);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    // The clients' destructors need the runtime, also when a failed assertion unwinds.
    let _in_rt = rt.enter();
    let alice_id: OwnedUserId = "@alice:matrix.test".parse().unwrap();
    let (alice, bob, secret_room, dm) = rt.block_on(async {
        let alice = Person::login(&hs, "alice", &alice_pw, &bot).await;
        let bob = Person::login(&hs, "bob", &bob_pw, &alice_id).await;
        // An encrypted room (create_dm turns encryption on, as Element does).
        let secret = alice.client.create_dm(&bob.user_id).await.unwrap();
        alice
            .wait_membership(&secret, &bob.user_id, MembershipState::Join)
            .await;
        alice.say(&secret, "old secret from alice").await;
        assert!(received(&bob, secret.room_id(), "old secret from alice").await);
        let bob_room = bob.client.get_room(secret.room_id()).unwrap();
        bob.say(&bob_room, "old secret from bob").await;
        assert!(received(&alice, secret.room_id(), "old secret from bob").await);
        // The bot's encrypted DM.
        let dm = alice.client.create_dm(&bot).await.unwrap();
        alice
            .wait_membership(&dm, &bot, MembershipState::Join)
            .await;
        let m = alice.ask(&dm, &bot, "list").await;
        assert!(m.encrypted, "{m:?}");
        (alice, bob, secret, dm)
    });
    // A public, unencrypted room for the messages sent during the backup.
    let (st, v) = Matrix::new(&hs).req(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&alice_token),
        Some(json!({"preset": "public_chat", "name": "busy"})),
    );
    assert_eq!(st, 200, "{v}");
    let busy = v["room_id"].as_str().unwrap().to_string();

    // matrix-synapse, compromised, plants in its media store a link to a root-only file, a
    // link to a root-only directory, and a FIFO that would hang a reader that opens it.
    let local = lab.state().join("synapse-data/media_store/local_content");
    assert!(local.is_dir(), "the upload made {}", local.display());
    as_child(&["ln", "-s", "/etc/shadow", &at(&local, "planted")]);
    as_child(&["ln", "-s", "/root", &at(&local, "planted-dir")]);
    as_child(&["mkfifo", &at(&local, "planted-fifo")]);
    let synapse_uid = nix::unistd::User::from_name("matrix-synapse")
        .unwrap()
        .unwrap()
        .uid;
    let key_before = signing_key(&lab);
    let published_before = published_keys(&lab);

    // The backup, while messages are being sent.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (hs, token, room, stop) = (hs.clone(), alice_token.clone(), busy.clone(), stop.clone());
        std::thread::spawn(move || send_until(hs, token, room, stop))
    };
    wait_until("the first busy messages", WAIT, || {
        seqs(&hs, &alice_token, &busy).len() >= 5
    });
    let out = lab.ok(&["backup"]);
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().unwrap();
    eprintln!("backup: {out}");
    assert!(out.contains("verified"), "{out}");
    let files = backups(&lab);
    assert_eq!(files.len(), 1, "{files:?}");
    let file = files[0].clone();
    assert!(out.contains(&file.display().to_string()), "{out}");
    // One root-only file, nothing half-written beside it.
    let meta = fs::metadata(&file).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    assert_eq!(
        fs::metadata(lab.path("backups")).unwrap().mode() & 0o777,
        0o700
    );
    assert_eq!(fs::read_dir(lab.path("backups")).unwrap().count(), 1);
    // What it holds: the dump first, the manifest last, the link neither followed nor kept.
    let parts = members(&file);
    assert_eq!(parts[0].0, "database.pgdump");
    assert_eq!(parts.last().unwrap().0, "manifest.json");
    let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "config/homelab-matrix.toml",
        "config/synapse.d/90-test-ratelimits.yaml",
        "state/secrets/postgres_password",
        "state/synapse-data/signing.key",
        "state/ca/root.pem",
        "state/bot/session.json",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("state/synapse-data/media_store/local_content/")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("planted")), "{names:?}");
    let shadow = fs::read("/etc/shadow").unwrap();
    assert!(parts.iter().all(|(_, d)| *d != shadow));
    let manifest: Value = serde_json::from_slice(&parts.last().unwrap().1).unwrap();
    assert_eq!(manifest["server_name"], "matrix.test");
    assert_eq!(
        manifest["database"]["excluded_table_data"],
        json!(["e2e_one_time_keys_json"])
    );
    for planted in ["planted", "planted-dir", "planted-fifo"] {
        assert!(
            manifest["skipped"]
                .to_string()
                .contains(&format!("local_content/{planted}:")),
            "{planted} not reported: {manifest}"
        );
    }
    assert!(
        manifest["database"]["row_counts"]["users"]
            .as_i64()
            .unwrap()
            >= 4
    );
    // `verify` restores the dump into a scratch database: the counts taken in the dump's own
    // snapshot match exactly, busy room and all.
    let v = lab.ok(&["backup", "verify", file.to_str().unwrap()]);
    assert!(v.contains(": ok:"), "{v}");
    let status = lab.ok(&["status"]);
    assert!(status.contains("BACKUP: last good"), "{status}");
    assert!(status.contains(&file.display().to_string()), "{status}");

    // A truncated and a tampered copy are refused by verify.
    let bytes = fs::read(&file).unwrap();
    let truncated = lab.path("truncated.tar");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let tampered = lab.path("tampered.tar");
    let mut t = bytes.clone();
    t[4096] ^= 0x55;
    fs::write(&tampered, &t).unwrap();
    let e = fails(&lab, &["backup", "verify", truncated.to_str().unwrap()]);
    assert!(e.contains("cut short") || e.contains("no manifest"), "{e}");
    let e = fails(&lab, &["backup", "verify", tampered.to_str().unwrap()]);
    assert!(e.contains("does not match the manifest"), "{e}");

    // restic: the copy round-trips through a local repository.
    if restic {
        assert!(out.contains("copied to the restic repository"), "{out}");
        let back = lab.path("restic-out");
        let st = Command::new("restic")
            .args(["--no-cache", "--repo"])
            .arg(lab.path("restic-repo"))
            .arg("--password-file")
            .arg(lab.path("restic.pw"))
            .args(["restore", "latest", "--target"])
            .arg(&back)
            .status()
            .unwrap();
        assert!(st.success());
        let copy = back.join(file.strip_prefix("/").unwrap());
        assert_eq!(
            fs::read(&copy).unwrap(),
            bytes,
            "restic gave back other bytes"
        );
        lab.ok(&["backup", "verify", copy.to_str().unwrap()]);
    }

    // While it runs, restore refuses.
    let e = fails(&lab, &["restore", file.to_str().unwrap()]);
    assert!(e.contains("is running"), "{e}");
    let st = run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(st.code(), Some(0));
    let e = fails(&lab, &["restore", truncated.to_str().unwrap()]);
    assert!(e.contains("cut short") || e.contains("no manifest"), "{e}");
    let e = fails(&lab, &["restore", tampered.to_str().unwrap()]);
    assert!(e.contains("does not match the manifest"), "{e}");
    // Onto another server name: refused, with the reason.
    lab.server_name = "other.test".into();
    write_config(&lab, restic);
    let e = fails(&lab, &["restore", file.to_str().unwrap()]);
    assert!(
        e.contains("this backup is of server \"matrix.test\""),
        "{e}"
    );
    lab.server_name = "matrix.test".into();
    write_config(&lab, restic);
    // Over a database with users: refused without --force.
    let e = fails(&lab, &["restore", file.to_str().unwrap()]);
    assert!(e.contains("already holds 2 user(s)"), "{e}");

    // The disk dies: state, database, role and the operator's synapse.d are gone; a fresh
    // config is all there is (what the package's debconf writes).
    fs::remove_dir_all(lab.state()).unwrap();
    fs::remove_dir_all(lab.path("synapse.d")).unwrap();
    psql(&format!("DROP DATABASE \"{}\" WITH (FORCE)", lab.db));
    psql(&format!("DROP ROLE \"{}\"", lab.db));
    // What the fresh install's Synapse left, compromised: its directory (made by root for
    // it), with the operator's media disk mounted on media_store, and links where the
    // restore writes the signing key and the local media.
    let victim = lab.path("victim");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("signing.key"), b"root's own file").unwrap();
    let data = lab.state().join("synapse-data");
    fs::create_dir_all(&data).unwrap();
    nix::unistd::chown(&data, Some(synapse_uid), None).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
    let media = data.join("media_store");
    let _media_disk = common::TmpfsMount::new(&media, "64m");
    nix::unistd::chown(&media, Some(synapse_uid), None).unwrap();
    as_child(&[
        "ln",
        "-s",
        &at(&victim, "signing.key"),
        &at(&data, "signing.key"),
    ]);
    as_child(&[
        "ln",
        "-s",
        victim.to_str().unwrap(),
        &at(&media, "local_content"),
    ]);
    as_child(&["mkfifo", &at(&data, "homeserver.db")]);
    let out = lab.ok(&["restore", file.to_str().unwrap()]);
    eprintln!("restore: {out}");
    // Neither link was followed; both are real again, and nothing else of the child's stays.
    assert_eq!(
        fs::read(victim.join("signing.key")).unwrap(),
        b"root's own file"
    );
    assert_eq!(
        fs::read_dir(&victim).unwrap().count(),
        1,
        "written into the victim"
    );
    for p in [data.join("signing.key"), media.join("local_content")] {
        let m = fs::symlink_metadata(&p).unwrap();
        assert!(
            !m.file_type().is_symlink(),
            "{} is still a link",
            p.display()
        );
        assert_eq!(m.uid(), synapse_uid.as_raw(), "{}", p.display());
    }
    assert!(
        !data.join("homeserver.db").exists(),
        "the child's FIFO stayed"
    );
    // The media disk is still mounted there, and holds the restored media.
    assert_ne!(
        fs::metadata(&media).unwrap().dev(),
        fs::metadata(&data).unwrap().dev(),
        "the restore replaced the mount point"
    );
    assert!(fs::read_dir(media.join("local_content")).unwrap().count() > 0);
    assert!(
        out.contains("restored the manual backup of matrix.test"),
        "{out}"
    );
    assert!(lab.path("synapse.d/90-test-ratelimits.yaml").exists());
    assert_eq!(signing_key(&lab), key_before, "the signing key changed");
    let m = fs::metadata(&data).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (synapse_uid.as_raw(), 0o700));
    let m = fs::metadata(lab.state().join("secrets/postgres_password")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o600));
    assert_eq!(
        psql(&format!(
            "SELECT pg_encoding_to_char(encoding) || datcollate || datctype || pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{}'",
            lab.db
        )),
        format!("UTF8CC{}", lab.db)
    );
    let mut run = lab.start();

    // Everyone logs in; tokens, media, keys are back.
    Matrix::new(&hs).login("alice", &alice_pw);
    Matrix::new(&hs).login("bob", &bob_pw);
    let shown = lab.ok(&["token", "show", "kept-token-1"]);
    assert!(shown.contains("kept-token-1"), "{shown}");
    assert_eq!(download(&hs, &alice_token, &mxc), (200, photo.clone()));
    assert_eq!(published_keys(&lab), published_before);
    // The busy room restored to one consistent moment: a gap-free prefix of what was sent.
    let restored = seqs(&hs, &alice_token, &busy);
    let want: Vec<u64> = (0..restored.len() as u64).collect();
    assert_eq!(restored, want, "the busy room has gaps");
    assert!(restored.len() >= 5 && restored.len() <= sent.len());
    eprintln!(
        "busy room: {} of {} messages were in the backup",
        restored.len(),
        sent.len()
    );

    rt.block_on(async {
        // The clients kept their keys: old messages still decrypt, both ways.
        let bob_room = bob.client.get_room(secret_room.room_id()).unwrap();
        let h = history(&bob_room).await;
        assert!(
            h.contains(&("old secret from alice".to_string(), true)),
            "bob's history: {h:?}"
        );
        let h = history(&secret_room).await;
        assert!(
            h.contains(&("old secret from bob".to_string(), true)),
            "alice's history: {h:?}"
        );
        // New ones too.
        alice.say(&secret_room, "new secret from alice").await;
        assert!(received(&bob, secret_room.room_id(), "new secret from alice").await);
        bob.say(&bob_room, "new secret from bob").await;
        assert!(received(&alice, secret_room.room_id(), "new secret from bob").await);
    });
    wait_until("the bot to run again", Duration::from_secs(120), || {
        lab.status()["bot"]["state"] == "running"
    });
    rt.block_on(async {
        // The bot answers in its existing encrypted DM (its session and keys came back).
        let m = alice.ask(&dm, &bot, "list").await;
        assert!(m.encrypted, "{m:?}");
    });

    // Now the database holds users again: --force is needed, and works.
    let st = run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30));
    assert_eq!(st.code(), Some(0));
    let e = fails(&lab, &["restore", file.to_str().unwrap()]);
    assert!(e.contains("--force"), "{e}");
    lab.ok(&["restore", file.to_str().unwrap(), "--force"]);
    let _run = lab.start();
    Matrix::new(&hs).login("bob", &bob_pw);
    drop((alice, bob));
}

/// A new Synapse version seen at start: a snapshot is taken before Synapse runs, and while the
/// new one is not healthy `status` says how to get back.
#[test]
fn a_new_synapse_gets_a_snapshot_first_and_status_says_how_to_get_back() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("upgrade");
    write_config(&lab, false);
    let mut run = lab.start();
    let versions = lab.state().join("backup/versions.json");
    wait_until("the versions of a healthy start", WAIT, || {
        versions.exists()
    });
    run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30));
    assert!(backups(&lab).is_empty(), "a first start needs no snapshot");

    // As if Synapse had been upgraded from 1.0.0, to a version that does not start.
    let mut v: Value = serde_json::from_slice(&fs::read(&versions).unwrap()).unwrap();
    let installed = v["synapse"].as_str().unwrap().to_string();
    v["synapse"] = "1.0.0".into();
    fs::write(&versions, v.to_string()).unwrap();
    let broken = lab.path("synapse.d/99-broken.yaml");
    fs::write(&broken, "listeners: 7\n").unwrap();
    fs::set_permissions(&broken, fs::Permissions::from_mode(0o644)).unwrap();
    // And the first question for Synapse's version fails, as a slow import on a loaded box can:
    // the upgrade must be noticed all the same (a Python that answers nothing is asked again).
    let marks = lab.path("python-marks");
    fs::create_dir(&marks).unwrap();
    fs::set_permissions(&marks, fs::Permissions::from_mode(0o777)).unwrap();
    let python = lab.path("python-once");
    fs::write(
        &python,
        format!(
            "#!/bin/sh\ncase \"$*\" in *__version__*) [ -e {m}/asked ] || {{ : > {m}/asked; echo 'ImportError: simulated' >&2; exit 1; }} ;; esac\nexec {py} \"$@\"\n",
            m = marks.display(),
            py = common::SYNAPSE_PYTHON
        ),
    )
    .unwrap();
    fs::set_permissions(&python, fs::Permissions::from_mode(0o755)).unwrap();
    let config = fs::read_to_string(&lab.config).unwrap();
    fs::write(
        &lab.config,
        config.replacen(
            "[synapse]\n",
            &format!("[synapse]\npython = \"{}\"\n", python.display()),
            1,
        ),
    )
    .unwrap();
    let log = fs::File::create(lab.path("run2.log")).unwrap();
    // A missed snapshot was seen once in CI and not since: what the supervisor said, if again.
    let _log = common::LogOnPanic(lab.path("run2.log"));
    let mut child = lab
        .cmd(&["run"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // Up to three version questions (a minute each at most) and the snapshot: minutes on a
    // loaded box, so waited for by what the service says, not by a clock: the snapshot, its
    // failure (said in the log) or the service's exit ends the wait.
    let run2 = lab.path("run2.log");
    wait_until("a pre-upgrade snapshot", Duration::from_secs(900), || {
        let log = fs::read_to_string(&run2).unwrap_or_default();
        assert!(
            !log.contains("the snapshot before the upgrade failed"),
            "the snapshot failed:\n{log}"
        );
        if let Some(st) = child.try_wait().unwrap() {
            panic!("homelab-matrix exited ({st}) before the snapshot:\n{log}");
        }
        backups(&lab)
            .iter()
            .any(|f| f.to_string_lossy().ends_with("-pre-upgrade.tar"))
    });
    assert!(
        marks.join("asked").exists(),
        "the first version question was not the wrapper's"
    );
    let snap = backups(&lab)[0].clone();
    let mut text = String::new();
    wait_until(
        "status to say how to get back",
        Duration::from_secs(120),
        || {
            let out = lab.run_cmd(&["status"]);
            text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("UPGRADE:")
        },
    );
    assert!(
        text.contains(&format!("synapse 1.0.0 -> {installed}")),
        "{text}"
    );
    assert!(text.contains("matrix-synapse==1.0.0"), "{text}");
    assert!(
        text.contains(&format!(
            "homelab-matrix restore {} --force",
            snap.display()
        )),
        "{text}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
    // The snapshot is a good backup.
    lab.ok(&["backup", "verify", snap.to_str().unwrap()]);

    // Fixed: once healthy, the upgrade is done; no second snapshot for the same upgrade.
    fs::remove_file(&broken).unwrap();
    let _run = lab.start();
    // After an upgrade READY may come before Synapse is up (app.rs UPGRADE_READY_AFTER): the
    // wait covers Synapse's start too, which on a loaded CI box took over a minute.
    wait_until("the upgrade to be done", Duration::from_secs(300), || {
        !lab.ok(&["status"]).contains("UPGRADE:")
    });
    assert_eq!(backups(&lab).len(), 1);
}

/// The daily run, when it fails, raises an admin alert (the bot tells the admins) and `status`
/// says so, with the error.
#[test]
fn a_failing_daily_backup_raises_an_alert() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("backup-fail");
    // A backup dir below a regular file cannot be made.
    fs::write(lab.path("not-a-dir"), "x").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The next whole minute at least 90 s from now, in UTC.
    let at = (now + 90).div_ceil(60) * 60;
    let time = format!("{:02}:{:02}", at / 3600 % 24, at / 60 % 60);
    lab.write_config(&format!(
        "[tls]\nmode = \"internal\"\n[backup]\ndir = \"{}\"\ntime = \"{time}\"\n",
        lab.path("not-a-dir/backups").display()
    ));
    let _run = lab.start();
    // A directory others can write is refused for --to, and left as it was.
    let e = fails(&lab, &["backup", "--to", "/tmp"]);
    assert!(e.contains("not a directory only root can write"), "{e}");
    assert_eq!(fs::metadata("/tmp").unwrap().mode() & 0o7777, 0o1777);
    let mut problems = Value::Null;
    wait_until(
        "the daily backup's alert",
        Duration::from_secs(at.saturating_sub(now) + 120),
        || {
            problems = lab.status()["problems"].clone();
            problems.to_string().contains("\"key\":\"backup\"")
        },
    );
    let p = problems
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"] == "backup")
        .unwrap();
    let msg = p["message"].as_str().unwrap();
    assert!(msg.contains("the daily backup failed"), "{msg}");
    assert!(msg.contains("homelab-matrix backup"), "{msg}");
    let text = lab.ok(&["status"]);
    assert!(text.contains("BACKUP: none yet"), "{text}");
    assert!(text.contains("last attempt failed"), "{text}");
}
