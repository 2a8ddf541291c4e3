//! The Debian package end to end: build, lintian, install with preseeded debconf answers,
//! start the unit's ExecStart the way systemd would, upgrade, remove, purge.
//!
//! It installs system-wide (/usr/bin, /etc, /var/lib, ports 80/443/8448), so it runs under
//! CI=true or with HOMELAB_MATRIX_TEST_DEB=1, and otherwise skips with a loud notice.

// This test process drives dpkg, apt and the binary from outside: std's process API is right.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{in_ci, require, require_appliance, start_until_ready};
use nix::sys::signal::Signal;

const UNIT: &str = "/lib/systemd/system/homelab-matrix.service";
const CONF: &str = "/etc/homelab-matrix/homelab-matrix.toml";
const STATE: &str = "/var/lib/homelab-matrix";
const DB: &str = "hm_debtest";

/// Runs a shell command; panics with its output unless it succeeds. Returns stdout.
fn sh(cmd: &str) -> String {
    let out = Command::new("bash").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn try_sh(cmd: &str) -> bool {
    Command::new("bash")
        .args(["-c", cmd])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn installed(pkg: &str) -> bool {
    try_sh(&format!(
        "dpkg-query -W -f='${{Status}}' {pkg} 2>/dev/null | grep -q 'install ok installed'"
    ))
}

fn files_under(dir: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.is_file() {
                out.insert(p.display().to_string(), fs::read(&p).unwrap());
            }
        }
    }
    walk(Path::new(dir), &mut out);
    out
}

fn build(out: &Path, version: Option<&str>) -> (PathBuf, PathBuf) {
    let root = env!("CARGO_MANIFEST_DIR");
    let v = version
        .map(|v| format!("--version {v}"))
        .unwrap_or_default();
    let stdout = sh(&format!(
        "cd {root} && packaging/build-deb --out {} {v} 2>&1",
        out.display()
    ));
    let lines: Vec<&str> = stdout.lines().rev().take(2).collect();
    (PathBuf::from(lines[1]), PathBuf::from(lines[0]))
}

/// Starts the installed unit's ExecStart line as systemd would: root, a bare environment,
/// NOTIFY_SOCKET for Type=notify, after its ExecStartPre succeeded.
fn start_unit(tmp: &Path) -> common::Running {
    let unit = fs::read_to_string(UNIT).unwrap();
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {UNIT}"))
            .to_string()
    };
    sh(&line("ExecStartPre="));
    let exec = line("ExecStart=");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]).env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    start_until_ready(c, &tmp.join("notify.sock"), &tmp.join("unit.log"))
}

fn curl_versions() -> String {
    sh(&format!(
        "curl -sS --max-time 30 --resolve matrix.deb.test:443:127.0.0.1 --cacert {STATE}/ca/root.pem -o /dev/null -w '%{{http_code}}' https://matrix.deb.test/_matrix/client/versions"
    ))
}

#[test]
fn the_package_installs_runs_upgrades_and_purges_cleanly() {
    let opted_in = in_ci() || std::env::var("HOMELAB_MATRIX_TEST_DEB").is_ok_and(|v| v == "1");
    if !opted_in {
        eprintln!(
            "\n********************************************************************\n\
             SKIPPED: the package test installs homelab-matrix system-wide and uses ports\n\
             80/443/8448. It runs under CI=true, or with HOMELAB_MATRIX_TEST_DEB=1.\n\
             ********************************************************************\n"
        );
        return;
    }
    if !require_appliance()
        || !require(
            "dpkg-buildpackage",
            try_sh("command -v apt-get"),
            "a Debian host",
        )
    {
        return;
    }
    assert!(
        installed("homelab-matrix") || !Path::new("/etc/homelab-matrix").exists(),
        "/etc/homelab-matrix exists but the package is not installed: a hand-made setup (packaging/quickstart?) would be overwritten; remove it first"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dist = tmp.path().join("dist");

    // Build, and lintian: no errors; warnings are printed (and justified in debian/).
    let (deb, venv) = build(&dist, None);
    let lint = Command::new("lintian")
        .args(["--no-tag-display-limit"])
        .arg(&deb)
        .arg(&venv)
        .output()
        .unwrap();
    let lint_out = String::from_utf8_lossy(&lint.stdout);
    eprintln!("lintian:\n{lint_out}");
    assert!(
        !lint_out.lines().any(|l| l.starts_with("E:")),
        "lintian errors:\n{lint_out}"
    );

    // Install with preseeded answers, non-interactively. A previous run's package goes first.
    if installed("homelab-matrix") {
        sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq homelab-matrix");
    }
    sh(
        "printf '%s\\n' 'homelab-matrix homelab-matrix/server_name string deb.test' 'homelab-matrix homelab-matrix/tls_mode select internal' | debconf-set-selections",
    );
    sh("apt-get update -qq");
    sh(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {} {} 2>&1",
        venv.display(),
        deb.display()
    ));
    let conf = fs::read_to_string(CONF).unwrap();
    assert!(conf.contains("server_name = \"deb.test\""), "{conf}");
    assert!(conf.contains("mode = \"internal\""), "{conf}");
    assert_eq!(fs::metadata(CONF).unwrap().mode() & 0o777, 0o640);
    for unit in ["coturn.service", "matrix-synapse.service"] {
        let link = format!("/etc/systemd/system/{unit}");
        assert_eq!(
            fs::read_link(&link).ok(),
            Some(PathBuf::from("/dev/null")),
            "{unit} not masked"
        );
    }
    assert!(Path::new("/usr/share/man/man1/homelab-matrix.1.gz").exists());
    assert!(Path::new("/usr/share/bash-completion/completions/homelab-matrix").exists());
    assert!(sh("/usr/bin/homelab-matrix --help").contains("token"));
    sh(&format!("systemd-analyze verify {UNIT}"));
    let security = sh(&format!(
        "systemd-analyze security --offline=true {UNIT} 2>&1 || true"
    ));
    eprintln!(
        "systemd-analyze security: {}",
        security.lines().last().unwrap_or("")
    );

    // Reinstalling the same version changes nothing the operator has.
    let before = fs::read(CONF).unwrap();
    sh(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall {} 2>&1",
        deb.display()
    ));
    assert_eq!(
        fs::read(CONF).unwrap(),
        before,
        "a reinstall rewrote the config"
    );
    assert_eq!(
        fs::read_link("/etc/systemd/system/coturn.service").ok(),
        Some(PathBuf::from("/dev/null"))
    );
    assert_eq!(
        fs::read_to_string(format!("{STATE}/masked-units"))
            .unwrap()
            .lines()
            .count(),
        2,
        "masks recorded twice"
    );

    // An operator edit, which upgrades must keep: its own database name.
    fs::write(
        CONF,
        format!("{conf}\n# operator edit\n[postgres]\ndatabase = \"{DB}\"\nuser = \"{DB}\"\n"),
    )
    .unwrap();
    let conf = fs::read(CONF).unwrap();

    let mut run = start_unit(tmp.path());
    assert_eq!(curl_versions(), "200");
    let pw = tmp.path().join("pw");
    fs::write(&pw, "debtest-password-1\n").unwrap();
    sh(&format!(
        "/usr/bin/homelab-matrix user add alice --password-file {}",
        pw.display()
    ));
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
            .code(),
        Some(0)
    );
    drop(run);
    let secrets = files_under(&format!("{STATE}/secrets"));
    let signing_key = fs::read(format!("{STATE}/synapse-data/signing.key")).unwrap();

    // Upgrade to a rebuilt, higher version: config, secrets and data stay.
    let (deb2, _) = build(&dist, Some("0.1.0+1"));
    sh(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {} 2>&1",
        deb2.display()
    ));
    assert_eq!(
        sh("dpkg-query -W -f='${Version}' homelab-matrix"),
        "0.1.0+1"
    );
    assert_eq!(
        fs::read(CONF).unwrap(),
        conf,
        "the upgrade changed the config"
    );
    assert_eq!(
        files_under(&format!("{STATE}/secrets")),
        secrets,
        "the upgrade changed the secrets"
    );
    assert_eq!(
        fs::read(format!("{STATE}/synapse-data/signing.key")).unwrap(),
        signing_key
    );
    let mut run = start_unit(tmp.path());
    let login = sh(&format!(
        "curl -sS --max-time 30 --resolve matrix.deb.test:443:127.0.0.1 --cacert {STATE}/ca/root.pem -H 'Content-Type: application/json' --data '{{\"type\":\"m.login.password\",\"identifier\":{{\"type\":\"m.id.user\",\"user\":\"alice\"}},\"password\":\"debtest-password-1\"}}' https://matrix.deb.test/_matrix/client/v3/login"
    ));
    assert!(
        login.contains("access_token"),
        "alice's account did not survive the upgrade: {login}"
    );
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
            .code(),
        Some(0)
    );
    drop(run);

    // Remove: the program goes, config and data stay, Synapse's and coturn's units come back.
    sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq homelab-matrix 2>&1");
    assert!(!Path::new("/usr/bin/homelab-matrix").exists());
    assert!(Path::new(CONF).exists() && Path::new(&format!("{STATE}/secrets")).exists());
    assert!(
        fs::symlink_metadata("/etc/systemd/system/coturn.service").is_err(),
        "coturn.service still masked"
    );

    // Purge: nothing of ours is left.
    sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq homelab-matrix 2>&1");
    for p in [
        "/etc/homelab-matrix",
        STATE,
        "/usr/share/doc/homelab-matrix",
        UNIT,
    ] {
        assert!(fs::symlink_metadata(p).is_err(), "{p} is left after purge");
    }
    assert!(!try_sh(
        "dpkg-query -W -f='${Status}' homelab-matrix 2>/dev/null | grep -q installed"
    ));
    assert!(
        sh("debconf-show homelab-matrix 2>/dev/null || true")
            .trim()
            .is_empty(),
        "debconf answers left"
    );

    // Leave the machine as it was: the venv package goes (its venv stays: other tests use it).
    sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq homelab-matrix-synapse-venv 2>&1");
    common::psql(&format!("DROP DATABASE IF EXISTS \"{DB}\" WITH (FORCE)"));
    common::psql(&format!("DROP ROLE IF EXISTS \"{DB}\""));
}
