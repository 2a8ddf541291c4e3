//! `homelab-matrix doctor` against a real appliance (Synapse, PostgreSQL, coturn, the front
//! door): a correct one passes every check that can pass on this machine (what needs the
//! internet says "no internet" as a warning), and each broken setup is caught by its check,
//! with the fix.

// This test process drives the binary from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::process::Output;

use common::{Lab, require_appliance};
use serde_json::Value;

/// `doctor` with the lab's names resolved to 127.0.0.1 (the lab has no DNS), plus `overrides`
/// (NAME=ADDR, applied after, so they win).
fn doctor(lab: &Lab, args: &[&str], overrides: &[&str]) -> (Option<i32>, String) {
    let mut all: Vec<String> = vec!["doctor".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let names = [
        lab.server_name.clone(),
        lab.matrix_host(),
        format!("element.{}", lab.server_name),
        format!("turn.{}", lab.server_name),
    ];
    for n in names {
        let over = overrides.iter().find(|o| o.starts_with(&format!("{n}=")));
        all.push("--resolve".into());
        all.push(over.map_or(format!("{n}=127.0.0.1"), |o| o.to_string()));
    }
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out: Output = lab.run_cmd(&refs);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &*String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// The report line of check `name` (its mark and what was seen) and the fix line after it.
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    let start = text
        .lines()
        .position(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{text}"));
    let begin = text.lines().take(start).map(|l| l.len() + 1).sum::<usize>();
    let mut end = begin + text.lines().nth(start).unwrap().len();
    if let Some(next) = text.lines().nth(start + 1)
        && next.trim_start().starts_with("fix:")
    {
        end += 1 + next.len();
    }
    &text[begin..end]
}

fn assert_mark(text: &str, name: &str, mark: &str) {
    let l = line(text, name);
    assert!(
        l.starts_with(mark),
        "{name}: expected {mark}, got:\n{l}\n\nfull report:\n{text}"
    );
}

#[test]
fn a_correct_appliance_passes_and_each_break_is_caught_with_its_fix() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("doctor");
    let _run = lab.start();

    let (code, text) = doctor(&lab, &[], &[]);
    eprintln!("{text}");
    for n in [
        "matrix.test",
        "matrix.matrix.test",
        "element.matrix.test",
        "turn.matrix.test",
    ] {
        assert_mark(&text, &format!("tls:{n}"), "✅");
    }
    assert!(
        line(&text, "tls:matrix.matrix.test").contains("clients must trust its root"),
        "{text}"
    );
    for name in [
        "turn-tls",
        "turn",
        "delegation-server",
        "delegation-client",
        "federation-in",
        "synapse",
        "postgres",
    ] {
        assert_mark(&text, name, "✅");
    }
    // Free space is the shared machine's: anything but a failure.
    for name in ["disk:media", "disk:database"] {
        assert!(!line(&text, name).starts_with("❌"), "{text}");
    }
    assert!(
        line(&text, "federation-in").contains("signed by our key ed25519:"),
        "{text}"
    );
    assert!(
        line(&text, "turn").contains("allocated relay 127.0.0.1:"),
        "{text}"
    );
    assert!(line(&text, "postgres").contains("collation C"), "{text}");
    // This machine has no internet: said as such, a warning, not a failure.
    for name in [
        "federation-out",
        "clock",
        "dns:matrix.test",
        "dns:turn.matrix.test",
        "ports",
    ] {
        assert_mark(&text, name, "⚠️");
        assert!(line(&text, name).contains("no internet"), "{text}");
    }
    assert_eq!(code, Some(0), "{text}");
    // `status` shows the last full run and when it ran.
    let st = lab.ok(&["status"]);
    assert!(
        st.contains("DOCTOR: last run 0s ago:") && st.contains(" 0 failed"),
        "{st}"
    );
    let summary = lab.status()["doctor"]["summary"].clone();
    assert!(summary.as_str().unwrap().ends_with("0 failed"), "{summary}");

    // --json parses and has the same checks; --only runs one family; usage errors exit 2.
    let (code, json) = doctor(&lab, &["--json", "--only", "tls"], &[]);
    assert_eq!(code, Some(0), "{json}");
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 4, "{json}");
    assert!(
        checks
            .iter()
            .all(|c| c["name"].as_str().unwrap().starts_with("tls:") && c["status"] == "pass"),
        "{json}"
    );
    let (code, text) = doctor(&lab, &["--only", "nonsense"], &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("delegation-server"),
        "the usage error lists the checks: {text}"
    );

    // The Matrix host resolving elsewhere: delegation points at an address with no server.
    let (code, text) = doctor(
        &lab,
        &["--only", "delegation-server"],
        &["matrix.matrix.test=127.0.0.2"],
    );
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "delegation-server");
    assert!(
        l.starts_with("❌") && l.contains("127.0.0.2") && l.contains("fix:"),
        "{text}"
    );

    // A database with the wrong collation (Synapse refuses it: docs/postgres.md).
    let bad = format!("{}_c", lab.db);
    common::psql(&format!(
        "CREATE DATABASE \"{bad}\" OWNER \"{}\" ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TEMPLATE template0",
        lab.db
    ));
    let good_config = fs::read_to_string(&lab.config).unwrap();
    fs::write(
        &lab.config,
        good_config.replace(
            &format!("database = \"{}\"", lab.db),
            &format!("database = \"{bad}\""),
        ),
    )
    .unwrap();
    let (code, text) = doctor(&lab, &["--only", "postgres"], &[]);
    fs::write(&lab.config, &good_config).unwrap();
    common::psql(&format!("DROP DATABASE \"{bad}\""));
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "postgres");
    assert!(
        l.starts_with("❌") && l.contains("collation C.UTF-8"),
        "{text}"
    );
    assert!(l.contains("LC_COLLATE 'C'"), "the fix says how: {text}");

    // Synapse not answering (stopped, so the supervisor does not restart it under us).
    let pid = lab.synapse_status()["pid"].as_i64().unwrap() as i32;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (code, text) = doctor(&lab, &["--only", "synapse"], &[]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "synapse");
    assert!(
        l.starts_with("❌") && l.contains("does not answer") && l.contains("fix:"),
        "{text}"
    );

    // coturn with another secret than Synapse's: the relay is refused, 401.
    let conf = walk(&lab.state(), "turnserver.conf").expect("coturn's rendered config");
    let text = fs::read_to_string(&conf).unwrap();
    let secret_line = text
        .lines()
        .find(|l| l.starts_with("static-auth-secret="))
        .unwrap();
    fs::write(
        &conf,
        text.replace(secret_line, "static-auth-secret=not-synapses"),
    )
    .unwrap();
    let coturn = |st: &Value| {
        st["children"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "coturn")
            .cloned()
            .unwrap()
    };
    let old = coturn(&lab.status())["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    common::wait_until(
        "coturn restarted",
        std::time::Duration::from_secs(30),
        || {
            let c = coturn(&lab.status());
            c["state"] == "running" && c["pid"].as_i64() != Some(old as i64)
        },
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (code, text) = doctor(&lab, &["--only", "turn"], &[]);
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "turn");
    assert!(l.starts_with("❌") && l.contains("401"), "{text}");
    assert!(
        l.contains("static-auth-secret and Synapse's turn_shared_secret differ"),
        "{text}"
    );
    // --only runs are not the whole picture: `status` still shows the last full run.
    assert_eq!(lab.status()["doctor"]["summary"], summary);
}

#[test]
fn a_name_resolving_elsewhere_and_a_certificate_for_another_name_fail_with_their_fix() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("doctor-cert");
    let files = lab.path("tls");
    let ca = common::TestCa::new("operator CA");
    let (cert, key) = ca.leaf(&["other.test".to_string()]);
    let d = files.join("matrix.matrix.test");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("fullchain.pem"), cert).unwrap();
    fs::write(d.join("privkey.pem"), key).unwrap();
    // The public address known without STUN, so that DNS can be judged.
    *lab.turn_extra.borrow_mut() = "external_ip = \"127.0.0.1\"\n".into();
    lab.write_config(&format!(
        "[tls]\nmode = \"files\"\nfiles_dir = \"{}\"\n",
        files.display()
    ));
    let _run = lab.start();

    // With the public address known (and this host's own), every port answers there.
    let (code, text) = doctor(&lab, &["--only", "ports"], &[]);
    eprintln!("{text}");
    assert_eq!(code, Some(0), "{text}");
    let l = line(&text, "ports");
    assert!(l.starts_with("✅"), "{text}");
    for p in [lab.https_port, lab.federation_port, lab.turn_tls_port] {
        assert!(l.contains(&format!("{p}/tcp")), "{p}: {text}");
    }
    assert!(
        l.contains(&format!("{}/udp (TURN)", lab.turn_port)),
        "{text}"
    );

    // A name resolving elsewhere is caught by its DNS check, which says where.
    let (code, text) = doctor(&lab, &["--only", "dns"], &["element.matrix.test=127.0.0.2"]);
    eprintln!("{text}");
    assert_eq!(code, Some(1), "{text}");
    assert_mark(&text, "dns:matrix.test", "✅");
    let l = line(&text, "dns:element.matrix.test");
    assert!(
        l.starts_with("❌") && l.contains("127.0.0.2, not this host's public address 127.0.0.1"),
        "{text}"
    );
    assert!(
        l.contains("point the A record of element.matrix.test at 127.0.0.1"),
        "{text}"
    );

    let (code, text) = doctor(&lab, &["--only", "tls"], &[]);
    eprintln!("{text}");
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "tls:matrix.matrix.test");
    assert!(
        l.starts_with("❌") && l.contains("is for other.test, not matrix.matrix.test"),
        "{text}"
    );
    assert!(
        l.contains("fullchain.pem"),
        "the fix names the file: {text}"
    );
    // The names without files get the internal CA's stand-in: a warning, not a pass.
    assert_mark(&text, "tls:element.matrix.test", "⚠️");
}

fn walk(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir()
            && let Some(found) = walk(&p, name)
        {
            return Some(found);
        }
    }
    None
}
