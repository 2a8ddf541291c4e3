//! The TLS modes besides ACME issuance: the operator's files (reloaded on SIGHUP), and the
//! internal-CA stand-in while ACME has not delivered.

// This test process drives the binary and curl from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{Lab, require_appliance, wait_until};
use nix::sys::signal::Signal;

/// A CA (written to `dir/ca-<tag>.pem`) and, under `files_dir/<name>/`, a certificate for
/// each name it signs.
fn operator_certs(dir: &Path, files_dir: &Path, names: &[String], tag: &str) -> std::path::PathBuf {
    let ca = common::TestCa::new(&format!("operator CA {tag}"));
    for n in names {
        let (cert, key) = ca.leaf(std::slice::from_ref(n));
        let d = files_dir.join(n);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("fullchain.pem"), cert).unwrap();
        fs::write(d.join("privkey.pem"), key).unwrap();
    }
    let p = dir.join(format!("ca-{tag}.pem"));
    fs::write(&p, &ca.pem).unwrap();
    p
}

#[test]
fn files_mode_serves_the_operators_certificates_and_reloads_them_on_sighup() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("files");
    let files = lab.path("tls");
    let names: Vec<String> = ["matrix.test", "matrix.matrix.test", "element.matrix.test"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // turn.* has no files: it must get an internal-CA certificate and not block the others.
    let ca1 = operator_certs(lab.dir.path(), &files, &names, "one");
    lab.write_config(&format!(
        "[tls]\nmode = \"files\"\nfiles_dir = \"{}\"\n",
        files.display()
    ));
    let mut run = lab.start();
    let url = format!("{}/_matrix/client/versions", lab.https_base());
    assert_eq!(lab.https_code(&ca1, &url), "200");
    let certs = lab.certificates();
    assert_eq!(certs["matrix.matrix.test"]["source"], "files");
    assert_eq!(certs["turn.matrix.test"]["source"], "internal");

    // New files, then SIGHUP: new connections get the new certificate; no restart.
    let ca2 = operator_certs(lab.dir.path(), &files, &names, "two");
    assert_eq!(
        lab.https_code(&ca2, &url).get(..3),
        Some("000"),
        "the new CA is trusted before the reload?"
    );
    let synapse_pid = lab.synapse_status()["pid"].clone();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid()), Signal::SIGHUP).unwrap();
    wait_until("the reloaded certificate", Duration::from_secs(10), || {
        lab.https_code(&ca2, &url) == "200"
    });
    assert!(
        lab.https_code(&ca1, &url).starts_with("000"),
        "the old certificate is still served"
    );
    assert_eq!(
        lab.synapse_status()["pid"],
        synapse_pid,
        "a certificate reload restarted Synapse"
    );

    // A broken file on reload keeps the current certificate serving.
    fs::write(files.join("matrix.matrix.test/privkey.pem"), "not a key").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid()), Signal::SIGHUP).unwrap();
    wait_until("the reload to be logged", Duration::from_secs(10), || {
        run.log_text().contains("keeping the current certificate")
    });
    assert_eq!(lab.https_code(&ca2, &url), "200");
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(20))
            .code(),
        Some(0)
    );
}

#[test]
fn acme_mode_serves_internal_certificates_until_the_ca_delivers() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("acmewait");
    // A directory nobody answers: ACME keeps failing, and 443 must still work.
    let dead = common::free_port();
    lab.write_config(&format!(
        "[tls]\nmode = \"acme\"\nacme_directory = \"https://127.0.0.1:{dead}/dir\"\n"
    ));
    let _run = lab.start();
    let url = format!("{}/_matrix/client/versions", lab.https_base());
    assert_eq!(lab.https_code(&lab.ca_root(), &url), "200");
    wait_until("a recorded ACME failure", Duration::from_secs(20), || {
        lab.certificates()["matrix.matrix.test"]["failures"].as_u64() >= Some(1)
    });
    let c = lab.certificates()["matrix.matrix.test"].clone();
    assert_eq!(c["source"], "internal", "{c}");
    assert!(
        c["last_error"].as_str().unwrap().contains("127.0.0.1"),
        "{c}"
    );
    assert!(c["next_attempt"].as_u64().is_some(), "{c}");
    // The human status says what failed.
    let text = lab.ok(&["status"]);
    assert!(
        text.contains("last error (1 failures)") || text.contains("last error ("),
        "{text}"
    );
}
