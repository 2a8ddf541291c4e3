//! A quiet journal when all is well (issue #11 item 10): an idle, healthy appliance (Synapse,
//! coturn, the registration bot syncing, Element installed from a reachable release server)
//! logs no WARN or ERROR line, run as the quick start runs it in the foreground. An operator
//! reads ERROR as broken, so every such line on a healthy box is a defect: either a real
//! problem or a level that lies.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::element::{ReleaseServer, TestKey, good_tarball};
use common::{Lab, require, require_appliance, wait_until};

/// How long the appliance idles: several of the bot's 30 s sync long-polls.
const IDLE: Duration = Duration::from_secs(120);

/// Lines at WARN or ERROR in the supervisor's output (the fmt layer writes the level after
/// the timestamp).
fn loud_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let mut words = l.split_whitespace();
            let _timestamp = words.next();
            matches!(words.next(), Some("WARN" | "ERROR"))
        })
        // The test's own release server and key: deliberate warnings that name settings only
        // tests use.
        .filter(|l| !l.contains("element.test_release_key is set"))
        .filter(|l| !l.contains("element.test_mode is on"))
        .map(String::from)
        .collect()
}

#[test]
fn an_idle_healthy_appliance_logs_no_warnings_or_errors() {
    if !require_appliance()
        || !require(
            "coturn",
            std::path::Path::new("/usr/bin/turnserver").exists(),
            "apt-get install coturn (packaging/install-deps does)",
        )
    {
        return;
    }
    // A healthy lab has every outside dependency answering: Element's releases come from a
    // local server instead of GitHub, and coturn's public address is configured rather than
    // asked of a STUN server on the internet.
    let server = ReleaseServer::start();
    let key = TestKey::new("Quiet Test <quiet@example.test>");
    let tarball = good_tarball("1.11.90");
    server.publish("1.11.90", &tarball, &key.sign(&tarball));
    let lab = Lab::new("quiet");
    let key_path = lab.path("test-release-key.asc");
    std::fs::write(&key_path, key.public_armored()).unwrap();
    *lab.turn_extra.borrow_mut() = "external_ip = \"127.0.0.1\"\n".into();
    lab.write_config(&format!(
        "[tls]\nmode = \"internal\"\n[element]\ntest_mode = true\nrelease_url = \"{}\"\ntest_release_key = \"{}\"\n",
        server.latest_url(),
        key_path.display()
    ));
    // With the log filter the quick start runs it with in the foreground (its own log):
    // RUST_LOG adds to the default filter, so it brings none of the chatter back.
    let filter = Command::new("bash")
        .args(["-c", ". packaging/lib.sh && quickstart_log_filter"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let filter = String::from_utf8(filter.stdout).unwrap().trim().to_string();
    assert_eq!(filter, "child=warn", "the quick start's filter");
    let mut run = lab.cmd(&["run"]);
    run.env("RUST_LOG", &filter);
    let run = common::start_until_ready(run, &lab.path("notify.sock"), &lab.path("run.log"));
    let t0 = Instant::now();
    wait_until(
        "the bot running, coturn up and Element installed",
        Duration::from_secs(180),
        || {
            let st = lab.status();
            st["bot"]["state"] == "running"
                && st["element"]["version"] == "1.11.90"
                && st["children"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["name"] == "coturn" && c["state"] == "running")
        },
    );
    eprintln!("healthy after {:?}; idling for {IDLE:?}", t0.elapsed());
    // PR_SET_NO_NEW_PRIVS (issue #11 item 1): neither child can gain privileges through a
    // set-uid binary or file capabilities.
    for c in lab.status()["children"].as_array().unwrap() {
        let pid = c["pid"].as_i64().unwrap();
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            st.lines().any(|l| l == "NoNewPrivs:\t1"),
            "{} (pid {pid}) can gain privileges:\n{st}",
            c["name"]
        );
    }
    std::thread::sleep(IDLE);
    let st = lab.status();
    assert!(
        st["problems"].as_array().unwrap().is_empty(),
        "a healthy lab has no problems: {}",
        st["problems"]
    );
    let log = run.log_text();
    let loud = loud_lines(&log);
    assert!(
        loud.is_empty(),
        "an idle healthy appliance logged {} WARN/ERROR lines:\n{}",
        loud.len(),
        loud.join("\n")
    );
    // The filter did what it says: our own lines at info, Synapse's info lines (its format
    // is `name - lineno - LEVEL - request - message`) not at all.
    assert!(
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains("PostgreSQL: ")),
        "no INFO line of ours:\n{log}"
    );
    let synapse_info: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("child=synapse") && l.contains(" - INFO - "))
        .take(3)
        .collect();
    assert!(
        synapse_info.is_empty(),
        "Synapse's info lines reached the quick start's log:\n{}",
        synapse_info.join("\n")
    );
    // matrix-sdk's routine chatter stays out of the journal too (Synapse's own lines, which
    // carry `child=synapse`, may name the same 404s at info).
    let ours: Vec<&str> = log.lines().filter(|l| !l.contains("child=")).collect();
    for benign in [
        "Got the same sync response twice",
        "Account data not found",
        "no backup key was found",
    ] {
        assert!(
            !ours.iter().any(|l| l.contains(benign)),
            "{benign:?} reached the log:\n{}",
            ours.iter()
                .filter(|l| l.contains(benign))
                .copied()
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
