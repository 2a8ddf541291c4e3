//! `check-config` and the exit-code contract, through the real binary. Needs nothing else.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;

use common::bin;

fn check(text: &str) -> std::process::Output {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("homelab-matrix.toml");
    fs::write(&p, text).unwrap();
    std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap()
}

#[test]
fn bad_config_exits_2_naming_every_key_and_fix() {
    let out = check(
        "server_name = \"example.com\"\n[synapse]\nprot = 8008\nmax_upload_size = \"huge\"\n[postgres]\nport = 0\n[tls]\nmode = \"letsencrypt\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "4 problems",
        "synapse.prot: is not a known key",
        "did you mean `port`?",
        "synapse.max_upload_size",
        "postgres.port: is 0",
        "tls.mode: \"letsencrypt\" is not a TLS mode",
        "fix: ",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn type_error_names_key_and_line() {
    let out = check("server_name = \"example.com\"\n\n[synapse]\nport = \"eight\"\n");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("synapse.port (line 4)"), "{err}");
}

#[test]
fn missing_file_exits_2_and_says_how_to_fix() {
    let out = std::process::Command::new(bin())
        .args([
            "check-config",
            "--config",
            "/nonexistent/homelab-matrix.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read /nonexistent/homelab-matrix.toml"),
        "{err}"
    );
    assert!(err.contains("fix:"), "{err}");
}

#[test]
fn missing_synapse_is_named_with_the_way_to_install_it() {
    let out = check(
        "server_name = \"example.com\"\n[synapse]\npython = \"/nonexistent/venv/bin/python\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("synapse.python: /nonexistent/venv/bin/python does not exist"),
        "{err}"
    );
    assert!(
        err.contains("pip install 'matrix-synapse[postgres]'"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = std::process::Command::new(bin())
        .arg("no-such-command")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_with_bad_config_exits_2_before_touching_anything() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.toml");
    let state = d.path().join("state");
    fs::write(
        &p,
        format!(
            "server_name = \"example.com\"\n[state]\ndir = \"{}\"\nrn_dir = \"/x\"\n",
            state.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("state.rn_dir"));
    assert!(!state.exists(), "an invalid config must not create state");
}
