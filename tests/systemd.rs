//! The Debian packages as a user's box runs them: a pristine Debian 12, then 13, booted with
//! systemd as PID 1 (systemd-nspawn, tests/common/nspawn.rs), `apt install homelab-matrix` with
//! debconf answers from the signed repository the README names (packaging/release, served over HTTP
//! on loopback, the key fetched and named by `Signed-By`), the unit with its full hardening,
//! `systemctl reload/restart/stop`, crashes of the supervisor and of Synapse, `apt upgrade` to a
//! newer version published in the repository (a snapshot first; users, rooms and messages kept),
//! remove and purge. Any EPERM, seccomp or AppArmor denial in the container's journal fails it.
//!
//! The container shares this host's network (apt and pip reach Debian and PyPI through it), so
//! the appliance takes the host's ports 80/443/8448/3478 and the container's PostgreSQL the
//! host's 5432: the host's cluster is stopped for the test (once no client uses it) and started
//! again at the end. It runs under CI=true, or with HOMELAB_MATRIX_TEST_DEB=1, and otherwise
//! skips with a loud notice. One #[test]: the tests of one binary run in parallel.

// This test process drives nspawn, nsenter, apt and curl from outside: std's process API is right.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::aptrepo;
use common::nspawn::{self, Container, HostPostgresPaused};
use common::{in_ci, pid_alive, require, require_ok, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const SN: &str = "sd.test";
const UNIT: &str = "homelab-matrix";
const CONF: &str = "/etc/homelab-matrix/homelab-matrix.toml";
const STATE: &str = "/var/lib/homelab-matrix";
const APT: &str = "DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0";
/// debian/keep-debs keeps each installed version of our packages here.
const KEPT: &str = "/var/cache/homelab-matrix/packages";
/// The venv package of a broken release: Synapse cannot start on it (its entry point exits at
/// import), while its version can still be read.
const BROKEN_VENV_POSTINST: &str = "#!/bin/sh\nset -e\n[ \"$1\" = configure ] || exit 0\n\
    for f in /opt/venvs/matrix-synapse/lib/python3*/site-packages/synapse/app/homeserver.py; do\n\
    sed -i '1i raise SystemExit(\"this Synapse cannot start: a broken release made by tests/systemd.rs\")' \"$f\"\ndone\n\
    systemctl try-restart homelab-matrix.service || true\n";
/// debian/homelab-matrix.service's TimeoutStopSec.
const TIMEOUT_STOP: Duration = Duration::from_secs(90);

/// The unit's CapabilityBoundingSet as a capability mask (linux/capability.h): CHOWN 0,
/// DAC_OVERRIDE 1, DAC_READ_SEARCH 2, FOWNER 3, KILL 5, SETGID 6, SETUID 7, NET_BIND_SERVICE 10.
const CAP_BOUNDING: u64 = 1 | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 10;

/// What the container itself logs as "not permitted", nothing to do with the appliance:
/// dbus-daemon cannot raise its fd limit without CAP_SYS_RESOURCE, which nspawn withholds.
const CONTAINER_NOISE: &[&str] = &["Failed to set fd limit"];

fn prop(ct: &Container, p: &str) -> String {
    ct.sh(&format!("systemctl show -p {p} --value {UNIT}"))
}

fn main_pid(ct: &Container) -> i32 {
    prop(ct, "MainPID").parse().unwrap()
}

fn status_json(ct: &Container) -> Value {
    serde_json::from_str(&ct.sh("homelab-matrix status --json")).expect("status --json is JSON")
}

/// The child `name` from `status --json`: (state, PID in the container).
fn child(ct: &Container, name: &str) -> (String, i64) {
    let out = ct.run("homelab-matrix status --json");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["children"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
        .map(|c| {
            (
                c["state"].as_str().unwrap_or_default().to_string(),
                c["pid"].as_i64().unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

fn wait_ready(ct: &Container, what: &str) {
    wait_until(what, Duration::from_secs(180), || {
        ct.ok(&format!("systemctl is-active -q {UNIT}"))
            && String::from_utf8_lossy(&ct.run("homelab-matrix status --json").stdout)
                .contains("\"phase\": \"ready\"")
    });
}

/// One request through the appliance's front door (443), from this host, trusting the
/// container's internal CA.
fn api(
    ct: &Container,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "60",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ])
    .arg("--resolve")
    .arg(format!("matrix.{SN}:443:127.0.0.1"))
    .arg("--cacert")
    .arg(ct.path(&format!("{STATE}/ca/root.pem")))
    .args(["-H", "Content-Type: application/json"]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args(["--data", &b.to_string()]);
    }
    c.arg(format!("https://matrix.{SN}{path}"));
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The room's latest messages, as `token`'s user reads them, hold `text`.
fn assert_history_has(ct: &Container, token: &str, room: &str, text: &str) {
    let (st, v) = api(
        ct,
        "GET",
        &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20"),
        Some(token),
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        v.to_string().contains(text),
        "{text:?} is not in {room}'s history: {v}"
    );
}

fn try_login(ct: &Container, user: &str, password: &str) -> (u16, Value) {
    api(
        ct,
        "POST",
        "/_matrix/client/v3/login",
        None,
        Some(
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password}),
        ),
    )
}

fn login(ct: &Container, user: &str, password: &str) -> String {
    let (st, v) = try_login(ct, user, password);
    assert_eq!(st, 200, "login {user}: {v}");
    v["access_token"].as_str().unwrap().to_string()
}

/// A registration attempt without a token: 401 (the token stage) while registration is on.
fn register_eve(ct: &Container) -> (u16, Value) {
    api(
        ct,
        "POST",
        "/_matrix/client/v3/register",
        None,
        Some(json!({"username": "eve", "password": "eve-password-1"})),
    )
}

fn secrets_digest(ct: &Container) -> String {
    ct.sh(&format!(
        "cd {STATE}/secrets && sha256sum $(find . -type f | sort)"
    ))
}

/// No Synapse and no coturn runs in the container.
fn children_gone(ct: &Container) -> bool {
    [
        "synapse.app.homeserver",
        "synapse.app.generic_worker",
        "turnserver",
        "redis-server",
    ]
    .iter()
    .all(|p| ct.pids_of(p).is_empty())
}

fn read(ct: &Container, p: &str) -> Vec<u8> {
    fs::read(ct.path(p)).unwrap_or_else(|e| panic!("{p} in the container: {e}"))
}

/// `/proc/<pid>/status` field, e.g. "NoNewPrivs".
fn proc_field(host_pid: i32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{host_pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn lintian(debs: &[&Path]) {
    let lint = Command::new("lintian")
        .arg("--no-tag-display-limit")
        .args(debs)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&lint.stdout);
    eprintln!("lintian:\n{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("E:")),
        "lintian errors:\n{out}"
    );
}

#[test]
fn on_debian_12_and_13_with_systemd_the_package_installs_survives_crashes_upgrades_and_purges() {
    let opted_in = in_ci() || std::env::var("HOMELAB_MATRIX_TEST_DEB").is_ok_and(|v| v == "1");
    if !opted_in {
        eprintln!(
            "\n********************************************************************\n\
             SKIPPED: the systemd package test stops this host's PostgreSQL while it runs and\n\
             uses ports 80/443/8448/3478. It runs under CI=true, or with HOMELAB_MATRIX_TEST_DEB=1.\n\
             ********************************************************************\n"
        );
        return;
    }
    if !require("root", common::is_root(), "run the tests as root") || !nspawn::require_nspawn() {
        return;
    }
    let t0 = Instant::now();
    let mut images = vec![];
    // HOMELAB_MATRIX_TEST_RELEASES=trixie (or bookworm, dist-upgrade, comma-separated) runs
    // only those parts, for a quicker try by hand; CI runs all.
    let only = std::env::var("HOMELAB_MATRIX_TEST_RELEASES").unwrap_or_default();
    let runs = |part: &str| {
        let yes = in_ci() || only.is_empty() || only.split(',').any(|c| c == part);
        if !yes {
            eprintln!("HOMELAB_MATRIX_TEST_RELEASES={only}: not running {part}");
        }
        yes
    };
    for codename in ["bookworm", "trixie"] {
        let Some(image) = require_ok(
            &format!("a Debian {codename} image (packaging/debian-image {codename})"),
            nspawn::image(codename),
        ) else {
            return;
        };
        images.push((codename, image));
    }

    // Every package is built (or found in the cache) before anything on the host is touched:
    // for each release its own build (packaging/build-deb --release), the next version, a
    // broken release after it (the same programs, with a venv package whose Synapse cannot
    // start), and the fix published after that.
    struct Release {
        version: String,
        debs: [PathBuf; 2],
        next: String,
        next_debs: [PathBuf; 2],
        later: [String; 2],
        later_debs: [[PathBuf; 2]; 2],
    }
    let broken_dir = tempfile::tempdir().unwrap();
    let mut releases = vec![];
    for (codename, _) in &images {
        let (deb, venv) = nspawn::debs(codename, None);
        let version = aptrepo::field(&deb, "Version");
        let n = if *codename == "bookworm" { 12 } else { 13 };
        assert!(
            version.ends_with(&format!("+deb{n}")),
            "{codename}'s package has version {version}"
        );
        assert_eq!(aptrepo::field(&venv, "Version"), version);
        lintian(&[&deb, &venv]);
        let next = format!("{version}+upgrade1");
        let (deb2, venv2) = nspawn::debs(codename, Some(&next));
        let dir = broken_dir.path().join(codename);
        fs::create_dir_all(&dir).unwrap();
        let broken = format!("{version}+upgrade2");
        let deb3 = aptrepo::repack(&deb2, &dir, &broken, None);
        let venv3 = aptrepo::repack(&venv2, &dir, &broken, Some(BROKEN_VENV_POSTINST));
        let fixed = format!("{version}+upgrade3");
        let deb4 = aptrepo::repack(&deb2, &dir, &fixed, None);
        let venv4 = aptrepo::repack(&venv2, &dir, &fixed, None);
        releases.push(Release {
            version,
            debs: [deb, venv],
            next,
            next_debs: [deb2, venv2],
            later: [broken, fixed],
            later_debs: [[deb3, venv3], [deb4, venv4]],
        });
    }
    // One life cycle per release, one after the other (the containers take the same host
    // ports).
    for ((codename, image), r) in images.iter().zip(&releases) {
        if !runs(codename) {
            continue;
        }
        let t = Instant::now();
        let [deb, venv] = &r.debs;
        let [deb2, venv2] = &r.next_debs;
        let [[deb3, venv3], [deb4, venv4]] = &r.later_debs;
        life_cycle(
            codename,
            image,
            &r.version,
            [deb, venv],
            &r.next,
            [deb2, venv2],
            [&r.later[0], &r.later[1]],
            [[deb3, venv3], [deb4, venv4]],
        );
        eprintln!("{codename}: the life cycle took {:.0?}", t.elapsed());
    }
    // The host's own upgrade, Debian 12 to 13, with the appliance and its data on it: from
    // the bookworm build to the trixie one.
    if let Some((_, image)) = images.iter().find(|(c, _)| *c == "bookworm")
        && runs("dist-upgrade")
    {
        let t = Instant::now();
        let [old, new] = [&releases[0], &releases[1]];
        dist_upgrade(image, [&old.version, &new.version], &old.debs, &new.debs);
        eprintln!("the dist-upgrade from 12 to 13 took {:.0?}", t.elapsed());
    }
    eprintln!(
        "the systemd test took {:.0?} (builds included)",
        t0.elapsed()
    );
}

/// A pristine `codename` from `image`, booted, with this host's trust store (it may hold a
/// proxy's CA that pip needs) and pip settings; its log in `dir`.
fn boot(image: &Path, codename: &str, dir: &Path) -> Option<Container> {
    let mut binds = vec![];
    for f in ["/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf"] {
        if Path::new(f).exists() {
            binds.push((PathBuf::from(f), f));
        }
    }
    require_ok(
        &format!("systemd-nspawn booting Debian {codename}"),
        Container::boot(image, &binds, &dir.join("nspawn.log")),
    )
}

/// Install from the signed repository, the unit's hardening, reload, restart, crashes, the
/// unattended upgrade to `next` through the repository, then to a broken release (`later[0]`)
/// and back by itself, then to its fix (`later[1]`), stop, remove, purge, restore, on a
/// pristine `codename`.
#[allow(clippy::too_many_arguments)]
fn life_cycle(
    codename: &str,
    image: &Path,
    version: &str,
    [deb, venv]: [&PathBuf; 2],
    next: &str,
    [deb2, venv2]: [&PathBuf; 2],
    later: [&str; 2],
    later_debs: [[&PathBuf; 2]; 2],
) {
    // The repository, as packaging/release publishes it: this version for now, the next one
    // published before the upgrade.
    let tmp = tempfile::tempdir().unwrap();
    let gnupg = tmp.path().join("gnupg");
    let fpr = aptrepo::key(&gnupg, "homelab-matrix test release key");
    let repo = tmp.path().join("repo");
    aptrepo::release(
        &gnupg,
        &repo,
        &fpr,
        &[(codename, vec![deb.clone(), venv.clone()])],
    );
    let (_served, port) = aptrepo::serve(&repo);

    nspawn::assert_ports_free(&[80, 443, 8448, 3478, 5349], &[3478]);
    let _pg = HostPostgresPaused::pause(5432, Duration::from_secs(900));
    let booted = Instant::now();
    let Some(ct) = boot(image, codename, tmp.path()) else {
        return;
    };
    eprintln!("booted in {:.1?}", booted.elapsed());

    // Install as the README says: the key into /etc/apt/keyrings (apt's own downloader: minbase
    // has no curl), a deb822 source that names it, debconf answers, `apt install`.
    ct.sh(&format!(
        "cd /tmp && /usr/lib/apt/apt-helper download-file http://127.0.0.1:{port}/homelab-matrix-archive-keyring.gpg key.gpg \
         && install -d /etc/apt/keyrings && install -m 0644 key.gpg /etc/apt/keyrings/homelab-matrix-archive-keyring.gpg"
    ));
    let source = |signed_by: &str| {
        ct.sh(&format!(
            "printf 'Types: deb\\nURIs: http://127.0.0.1:{port}/\\nSuites: {codename}\\nComponents: main\\n{signed_by}' > /etc/apt/sources.list.d/homelab-matrix.sources"
        ))
    };
    // Without the key named, Debian's keys do not vouch for it: apt refuses the repository and
    // there is nothing to install.
    source("");
    let refused = ct.run("apt-get update -q 2>&1");
    let said = String::from_utf8_lossy(&refused.stdout);
    assert!(
        // Debian 12's apt (gpgv) says NO_PUBKEY; Debian 13's (sqv) "Missing key".
        !refused.status.success() && (said.contains("NO_PUBKEY") || said.contains("Missing key")),
        "apt took the repository without its key:\n{said}"
    );
    assert!(
        !ct.run(&format!("{APT} install homelab-matrix"))
            .status
            .success()
    );
    source("Signed-By: /etc/apt/keyrings/homelab-matrix-archive-keyring.gpg\\n");
    let preseed = format!(
        "printf '%s\\n' 'homelab-matrix homelab-matrix/server_name string {SN}' 'homelab-matrix homelab-matrix/tls_mode select internal' | debconf-set-selections"
    );
    ct.sh(&preseed);
    let started = Instant::now();
    let said = ct.sh(&format!(
        "apt-get update -q 2>&1 && {APT} install homelab-matrix 2>&1"
    ));
    assert!(
        // apt's own warnings and errors start their line; a substring match also caught
        // debconf's "…/postgresql.config.3FzaAW: 12: pg_lsclusters: not found" (a temp name
        // ending in W), Debian's own preconfigure noise.
        !said
            .lines()
            .any(|l| l.starts_with("W: ") || l.starts_with("E: ")),
        "apt warned or failed:\n{said}"
    );
    // No matrix.org repository here: the Synapse dependency came from ours, this version.
    assert_eq!(
        ct.sh("dpkg-query -W -f='${Version} ' homelab-matrix homelab-matrix-synapse-venv"),
        format!("{version} {version}")
    );
    eprintln!(
        "apt install (incl. Synapse from PyPI and the first start): {:.0?}",
        started.elapsed()
    );

    // The package started the unit (Type=notify: READY=1 arrived) from its shipped file alone.
    assert_eq!(ct.sh(&format!("systemctl is-active {UNIT}")), "active");
    assert_eq!(ct.sh(&format!("systemctl is-enabled {UNIT}")), "enabled");
    assert_eq!(
        ct.sh(&format!("readlink -f {}", prop(&ct, "FragmentPath"))),
        // Debian 13's /lib is /usr/lib (merged /usr): systemd names the unit there.
        ct.sh("readlink -f /lib/systemd/system/homelab-matrix.service"),
        "the unit is not the package's"
    );
    assert_eq!(prop(&ct, "DropInPaths"), "", "the unit runs with drop-ins");
    assert_eq!(
        prop(&ct, "NRestarts"),
        "0",
        "the first start was not the first"
    );
    wait_ready(&ct, "the appliance to be ready after install");
    // The hardening is in effect on the supervisor and what it starts (inherited).
    let sup = ct
        .host_pid(main_pid(&ct))
        .expect("the supervisor's host PID");
    let (_, synapse) = child(&ct, "synapse");
    let synapse_host = ct.host_pid(synapse as i32).expect("Synapse's host PID");
    for (who, pid) in [("supervisor", sup), ("synapse", synapse_host)] {
        assert_eq!(proc_field(pid, "NoNewPrivs"), "1", "{who}: NoNewPrivileges");
        assert_eq!(proc_field(pid, "Seccomp"), "2", "{who}: SystemCallFilter");
        assert_eq!(
            u64::from_str_radix(&proc_field(pid, "CapBnd"), 16).unwrap(),
            CAP_BOUNDING,
            "{who}: CapabilityBoundingSet"
        );
    }
    eprintln!(
        "systemd-analyze security: {}",
        ct.sh(&format!(
            "systemd-analyze security --no-pager {UNIT} 2>&1 | tail -n 1"
        ))
    );
    // --man=no: Documentation= names a man page, and minbase has no man-db to look it up.
    ct.sh("systemd-analyze verify --man=no /lib/systemd/system/homelab-matrix.service");

    // What the package put on the box.
    let conf = String::from_utf8(read(&ct, CONF)).unwrap();
    assert!(conf.contains(&format!("server_name = \"{SN}\"")), "{conf}");
    assert!(conf.contains("mode = \"internal\""), "{conf}");
    assert_eq!(ct.sh(&format!("stat -c %a {CONF}")), "640");
    // Unattended upgrades are on by default (the debconf question's default, README
    // "Upgrades"), and the timer that runs them is enabled and waiting.
    assert!(conf.contains("[upgrades]\nunattended = true"), "{conf}");
    assert_eq!(
        ct.sh("systemctl is-enabled homelab-matrix-upgrade.timer"),
        "enabled"
    );
    assert_eq!(
        ct.sh("systemctl is-active homelab-matrix-upgrade.timer"),
        "active"
    );
    // The installed packages are kept (from apt's archive: apt read its hooks before the
    // first install brought ours).
    let kept = ct.sh(&format!("ls {KEPT}"));
    for name in ["homelab-matrix", "homelab-matrix-synapse-venv"] {
        assert!(
            kept.lines()
                .any(|l| l.starts_with(&format!("{name}_{version}_"))),
            "{name} {version} not kept: {kept}"
        );
    }
    for unit in ["coturn.service", "matrix-synapse.service"] {
        assert_eq!(
            ct.sh(&format!("readlink /etc/systemd/system/{unit}")),
            "/dev/null",
            "{unit} not masked"
        );
    }
    ct.sh("test -e /usr/share/man/man1/homelab-matrix.1.gz && test -e /usr/share/bash-completion/completions/homelab-matrix");
    assert!(ct.sh("homelab-matrix --help").contains("token"));
    let status = ct.sh("homelab-matrix status");
    eprintln!("homelab-matrix status:\n{status}");
    assert_eq!(status_json(&ct)["phase"], "ready");
    let (st, v) = api(&ct, "GET", "/_matrix/client/versions", None, None);
    assert_eq!(st, 200, "{v}");

    // Reinstalling the same version changes nothing the operator has.
    ct.sh(&format!("{APT} install --reinstall homelab-matrix 2>&1"));
    assert_eq!(String::from_utf8(read(&ct, CONF)).unwrap(), conf);
    assert_eq!(
        ct.sh(&format!("wc -l < {STATE}/masked-units")),
        "2",
        "masks recorded twice"
    );
    wait_ready(&ct, "the appliance after the reinstall");
    // A reinstall is no upgrade: no snapshot (dpkg calls the preinst with "upgrade" and the
    // postinst with the old version for it too).
    assert_eq!(
        ct.sh("ls /var/backups/homelab-matrix"),
        "",
        "a snapshot at the reinstall"
    );

    // A user, a room and a message, which every later step must keep.
    ct.sh("umask 077; echo sd-password-1 > /root/pw && homelab-matrix user add alice --password-file /root/pw");
    let token = login(&ct, "alice", "sd-password-1");
    let (st, v) = api(
        &ct,
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&token),
        Some(json!({"name": "kept"})),
    );
    assert_eq!(st, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_string();
    let (st, v) = api(
        &ct,
        "PUT",
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t1"),
        Some(&token),
        Some(json!({"msgtype": "m.text", "body": "written before the upgrade"})),
    );
    assert_eq!(st, 200, "{v}");

    // systemctl reload (ExecReload): synapse.d re-applied, Synapse restarted, not the service.
    let sup_pid = main_pid(&ct);
    let (_, syn_before) = child(&ct, "synapse");
    let (st, v) = register_eve(&ct);
    assert_eq!(st, 401, "token registration is on by default: {v}");
    ct.sh(
        "echo 'enable_registration: false' > /etc/homelab-matrix/synapse.d/50-no-registration.yaml",
    );
    let reload = ct.run(&format!("systemctl reload {UNIT}"));
    assert!(
        reload.status.success(),
        "systemctl reload failed: {}\n{}",
        String::from_utf8_lossy(&reload.stderr),
        ct.sh(&format!("journalctl -b -u {UNIT} --no-pager | tail -n 20"))
    );
    wait_until(
        "Synapse to restart with the override",
        Duration::from_secs(90),
        || {
            let (state, pid) = child(&ct, "synapse");
            state == "running" && pid != syn_before
        },
    );
    assert_eq!(main_pid(&ct), sup_pid, "reload restarted the service");
    let (st, v) = register_eve(&ct);
    assert_eq!(st, 403, "synapse.d override not applied by reload: {v}");

    // systemctl restart: a new supervisor, ready again.
    let t = Instant::now();
    ct.sh(&format!("systemctl restart {UNIT}"));
    assert_ne!(main_pid(&ct), sup_pid);
    wait_ready(&ct, "the appliance after systemctl restart");
    eprintln!("systemctl restart: ready in {:.1?}", t.elapsed());

    // kill -9 of the supervisor: systemd restarts the service, and none of the old children
    // survive (KillMode=mixed: SIGKILL for the rest of the cgroup).
    let old_sup = ct.host_pid(main_pid(&ct)).unwrap();
    let old_children: Vec<i32> = [
        ct.pids_of("synapse.app.homeserver"),
        ct.pids_of("turnserver"),
    ]
    .concat();
    assert!(
        old_children.len() >= 2,
        "Synapse and coturn run: {:?}",
        ct.procs()
    );
    let restarts: u32 = prop(&ct, "NRestarts").parse().unwrap();
    let t = Instant::now();
    kill(Pid::from_raw(old_sup), Signal::SIGKILL).unwrap();
    wait_until(
        "systemd to restart the service",
        Duration::from_secs(60),
        || {
            prop(&ct, "NRestarts").parse::<u32>().unwrap() > restarts
                && ct.host_pid(main_pid(&ct)).is_some_and(|p| p != old_sup)
        },
    );
    wait_ready(&ct, "the appliance after the supervisor was killed");
    eprintln!("supervisor kill -9: ready again in {:.1?}", t.elapsed());
    let orphans: Vec<i32> = old_children
        .iter()
        .copied()
        .filter(|p| pid_alive(*p))
        .collect();
    assert!(
        orphans.is_empty(),
        "children of the killed supervisor survive: {orphans:?} {:?}",
        ct.procs()
    );

    // kill -9 of Synapse: the supervisor restarts it; the service stays.
    let sup_pid = main_pid(&ct);
    let (_, syn) = child(&ct, "synapse");
    kill(
        Pid::from_raw(ct.host_pid(syn as i32).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        "the supervisor to restart Synapse",
        Duration::from_secs(90),
        || {
            let (state, pid) = child(&ct, "synapse");
            state == "running" && pid != syn
        },
    );
    assert_eq!(main_pid(&ct), sup_pid);
    wait_ready(&ct, "the appliance after Synapse was killed");

    // Upgrade to the next version: config (with an operator's edit), secrets, data, the user,
    // the room and the message.
    ct.sh(&format!("echo '# an operator edit' >> {CONF}"));
    let conf = String::from_utf8(read(&ct, CONF)).unwrap();
    let secrets = secrets_digest(&ct);
    let signing = read(&ct, &format!("{STATE}/synapse-data/signing.key"));
    // The next version is published; the box takes it by itself: the timer's service (run
    // now rather than at night) upgrades our packages and nothing else.
    aptrepo::release(
        &gnupg,
        &repo,
        &fpr,
        &[(codename, vec![deb2.clone(), venv2.clone()])],
    );
    let t = Instant::now();
    ct.sh("systemctl start homelab-matrix-upgrade.service");
    let said = ct.sh("journalctl -u homelab-matrix-upgrade --no-pager -o cat");
    assert!(
        said.contains(&format!("homelab-matrix {version} -> {next}")),
        "{said}"
    );
    assert_eq!(
        ct.sh("dpkg-query -W -f='${Version} ' homelab-matrix homelab-matrix-synapse-venv"),
        format!("{next} {next}")
    );
    wait_ready(&ct, "the appliance after the upgrade");
    eprintln!("upgrade: ready in {:.1?}", t.elapsed());
    // The preinst took a snapshot first (README "Backups"): root-only, a good backup; and once
    // the new version is healthy, `status` has no upgrade pending.
    let snaps = ct.sh("ls /var/backups/homelab-matrix | grep -- '-pre-upgrade.tar$' || true");
    // Exactly one: the postinst and the supervisor see the preinst's, and no restart before
    // the upgrade passed for one.
    assert_eq!(
        snaps.lines().count(),
        1,
        "one snapshot before the upgrade: {snaps:?}\n{}",
        ct.sh(&format!(
            "journalctl -b -u {UNIT} --no-pager | grep -i -e snapshot -e versions || true"
        ))
    );
    let snap = format!(
        "/var/backups/homelab-matrix/{}",
        snaps.lines().next().unwrap().trim()
    );
    assert_eq!(ct.sh(&format!("stat -c %a:%U {snap}")), "600:root");
    ct.sh(&format!("homelab-matrix backup verify {snap}"));
    wait_until("the upgrade to be done", Duration::from_secs(60), || {
        !ct.sh("homelab-matrix status").contains("UPGRADE:")
    });
    assert_eq!(
        String::from_utf8(read(&ct, CONF)).unwrap(),
        conf,
        "the upgrade changed the config"
    );
    assert_eq!(secrets_digest(&ct), secrets);
    assert_eq!(
        read(&ct, &format!("{STATE}/synapse-data/signing.key")),
        signing
    );
    ct.sh("test -e /etc/homelab-matrix/synapse.d/50-no-registration.yaml");
    let token = login(&ct, "alice", "sd-password-1");
    let (st, v) = api(
        &ct,
        "GET",
        "/_matrix/client/v3/joined_rooms",
        Some(&token),
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        v["joined_rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == room.as_str()),
        "{v}"
    );
    assert_history_has(&ct, &token, &room, "written before the upgrade");

    broken_upgrade_is_undone(
        &ct,
        (&gnupg, &repo, &fpr, codename),
        [version, next, later[0], later[1]],
        later_debs,
        &room,
    );
    // Two more upgrades took their snapshots, and retention keeps the newest two pre-upgrade
    // ones (README "Backups"): the purge and restore below start from the newest.
    let snaps = ct.sh("ls /var/backups/homelab-matrix | grep -- '-pre-upgrade.tar$'");
    assert_eq!(snaps.lines().count(), 2, "{snaps}");
    let snap = format!(
        "/var/backups/homelab-matrix/{}",
        snaps.lines().last().unwrap().trim()
    );

    workers_under_systemd(&ct, &room);

    // systemctl stop: clean, within TimeoutStopSec, nothing left running.
    let t = Instant::now();
    ct.sh(&format!("systemctl stop {UNIT}"));
    let took = t.elapsed();
    eprintln!("systemctl stop: {took:.1?}");
    assert!(took < TIMEOUT_STOP, "stop took {took:?}");
    assert_eq!(
        prop(&ct, "Result"),
        "success",
        "the stop was not clean (timeout or kill)"
    );
    assert!(
        children_gone(&ct),
        "children left after stop: {:?}",
        ct.procs()
    );

    // Remove (running): the program goes, config and data stay, Synapse's and coturn's own
    // units are theirs again.
    ct.sh(&format!("systemctl start {UNIT}"));
    ct.sh(&format!("{APT} remove homelab-matrix 2>&1"));
    ct.sh(&format!("! systemctl is-active -q {UNIT}"));
    assert!(children_gone(&ct));
    ct.sh(&format!(
        "test ! -e /usr/bin/homelab-matrix && test -e {CONF} && test -d {STATE}/secrets"
    ));
    for unit in ["coturn.service", "matrix-synapse.service"] {
        ct.sh(&format!("test ! -L /etc/systemd/system/{unit}"));
    }
    assert_ne!(ct.sh("systemctl is-enabled coturn || true"), "masked");

    // Purge: nothing of ours is left, debconf answers included.
    ct.sh(&format!("{APT} purge homelab-matrix 2>&1"));
    ct.sh(&format!(
        "for p in /etc/homelab-matrix {STATE} /usr/share/doc/homelab-matrix /lib/systemd/system/homelab-matrix.service {KEPT} /etc/apt/apt.conf.d/50homelab-matrix; do test ! -e $p || {{ echo $p left; exit 1; }}; done"
    ));
    assert_eq!(
        ct.sh("debconf-show homelab-matrix 2>/dev/null || true"),
        "",
        "debconf answers left"
    );
    ct.sh("! dpkg-query -W -f='${Status}' homelab-matrix 2>/dev/null | grep -q installed");
    // Backups outlive a purge: they are what a restore after it starts from.
    ct.sh(&format!("test -s {snap}"));

    // A restore after a purge (README "Backups"): the database dropped too, a fresh install
    // with the same debconf answers, the service stopped, then `restore` of the snapshot,
    // which starts the unit and waits for it. The user, her room, the message and the
    // signing key are the old ones again.
    ct.sh("runuser -u postgres -- psql -q -c 'DROP DATABASE IF EXISTS synapse' -c 'DROP ROLE IF EXISTS synapse'");
    ct.sh(&preseed);
    ct.sh(&format!("{APT} install homelab-matrix 2>&1"));
    wait_ready(&ct, "a fresh install after the purge");
    assert_ne!(
        read(&ct, &format!("{STATE}/synapse-data/signing.key")),
        signing,
        "the fresh install kept the old signing key"
    );
    ct.sh(&format!("systemctl stop {UNIT}"));
    let t = Instant::now();
    let restored = ct.sh(&format!("homelab-matrix restore {snap} 2>&1"));
    eprintln!("restore: {:.1?}\n{restored}", t.elapsed());
    assert_eq!(
        ct.sh(&format!("systemctl is-active {UNIT}")),
        "active",
        "restore did not start the unit: {restored}"
    );
    wait_ready(&ct, "the appliance after the restore");
    assert_eq!(
        read(&ct, &format!("{STATE}/synapse-data/signing.key")),
        signing,
        "the restore did not bring the signing key back"
    );
    let (st, v) = try_login(&ct, "alice", "sd-password-1");
    if st != 200 {
        panic!(
            "login alice after the restore: {st} {v}\nusers: {}\njournal:\n{}",
            ct.sh("runuser -u postgres -- psql -d synapse -Atc 'select name, length(password_hash), deactivated from users' 2>&1; ls -la /var/backups/homelab-matrix"),
            ct.sh(&format!("journalctl -b -u {UNIT} --no-pager | tail -n 80"))
        );
    }
    let token = v["access_token"].as_str().unwrap().to_string();
    assert_history_has(&ct, &token, &room, "written before the upgrade");

    // The whole boot's journal: the hardening denied nothing, to anyone.
    let journal = ct.sh("journalctl -b --no-pager -o short-monotonic");
    let denials: Vec<&str> = journal
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            (l.contains("eperm")
                || l.contains("operation not permitted")
                || l.contains("seccomp")
                || l.contains("apparmor=\"denied\""))
                && !CONTAINER_NOISE
                    .iter()
                    .any(|n| l.contains(&n.to_ascii_lowercase()))
        })
        .collect();
    assert!(
        denials.is_empty(),
        "denials in the journal:\n{}",
        denials.join("\n")
    );
    aptrepo::stop_agent(&gnupg);
}

/// Synapse workers under systemd (README "Synapse workers"): Debian's redis-server with its own
/// service disabled, `workers = 2`, a restart. Redis and both workers run as their own users in
/// the unit's cgroup under its hardening, messages flow through the front door, doctor checks
/// them, and a worker killed with SIGKILL restarts alone. The caller's `systemctl stop` then
/// checks that none of them is left.
fn workers_under_systemd(ct: &Container, room: &str) {
    ct.sh(&format!(
        "{APT} install redis-server 2>&1 | tail -n 2 && systemctl disable --now redis-server 2>&1"
    ));
    assert!(ct.pids_of("redis-server").is_empty(), "{:?}", ct.procs());
    ct.sh(&format!("printf '\\n[synapse]\\nworkers = 2\\n' >> {CONF}"));
    let t = Instant::now();
    ct.sh(&format!("systemctl restart {UNIT}"));
    wait_ready(ct, "the appliance with workers = 2");
    eprintln!("workers = 2: ready in {:.1?}", t.elapsed());

    let cgroup = prop(ct, "ControlGroup");
    let mut pids = vec![];
    for (name, user) in [
        ("synapse", "matrix-synapse"),
        ("redis", "redis"),
        ("synapse-writer-sender-media", "matrix-synapse"),
        ("synapse-federation-client", "matrix-synapse"),
    ] {
        let (state, pid) = child(ct, name);
        assert_eq!(
            state,
            "running",
            "{name}: {}",
            ct.sh("homelab-matrix status")
        );
        assert_eq!(
            ct.sh(&format!("stat -c %U /proc/{pid}")),
            user,
            "{name}'s user"
        );
        let own = ct.sh(&format!("cat /proc/{pid}/cgroup"));
        assert!(
            own.trim_end().ends_with(&cgroup),
            "{name} is in {own}, not {cgroup}"
        );
        // The unit's hardening reaches every child (inherited).
        let host = ct.host_pid(pid as i32).expect("a host PID");
        assert_eq!(
            proc_field(host, "NoNewPrivs"),
            "1",
            "{name}: NoNewPrivileges"
        );
        assert_eq!(proc_field(host, "Seccomp"), "2", "{name}: SystemCallFilter");
        assert_eq!(
            u64::from_str_radix(&proc_field(host, "CapBnd"), 16).unwrap(),
            CAP_BOUNDING,
            "{name}: CapabilityBoundingSet"
        );
        pids.push(pid);
    }
    // Redis listens on no TCP port: its socket only.
    let tcp = ct.sh("cat /proc/net/tcp /proc/net/tcp6 | awk '$4 == \"0A\" {print $2}'");
    assert!(!tcp.contains(":18EB"), "something listens on 6379:\n{tcp}");
    let doctor =
        ct.run("homelab-matrix doctor --only workers && homelab-matrix doctor --only redis");
    assert!(
        doctor.status.success(),
        "doctor with workers:\n{}",
        String::from_utf8_lossy(&doctor.stdout)
    );

    // A message in and out through the front door: the send goes to the event writer, the
    // read to a client worker.
    let token = login(ct, "alice", "sd-password-1");
    let (st, v) = api(
        ct,
        "PUT",
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/w1"),
        Some(&token),
        Some(json!({"msgtype": "m.text", "body": "written on workers"})),
    );
    assert_eq!(st, 200, "{v}");
    assert_history_has(ct, &token, room, "written on workers");

    // kill -9 of a worker: it alone restarts; main Synapse and the supervisor stay.
    let sup = main_pid(ct);
    let (_, worker) = child(ct, "synapse-federation-client");
    kill(
        Pid::from_raw(ct.host_pid(worker as i32).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        "the supervisor to restart the worker",
        Duration::from_secs(120),
        || {
            let (state, pid) = child(ct, "synapse-federation-client");
            state == "running" && pid != worker
        },
    );
    assert_eq!(main_pid(ct), sup);
    assert_eq!(
        child(ct, "synapse").1,
        pids[0],
        "main Synapse restarted too"
    );
    assert_eq!(child(ct, "redis").1, pids[1], "Redis restarted too");
    wait_ready(ct, "the appliance after a worker was killed");
    assert_history_has(ct, &token, room, "written on workers");
}

/// The rollback file (backup::rollback) as JSON, or Null while there is none.
fn rollback_record(ct: &Container) -> Value {
    let out = ct.run(&format!("cat {STATE}/backup/rollback.json"));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// A release whose Synapse cannot start, published and taken by the unattended upgrade: the
/// appliance sees Synapse fail on it, installs the kept packages of `next` again, holds them,
/// restores the snapshot taken before, and says so; nothing written before is lost. Then the
/// fix is published, and unheld as `status` says, the next upgrade takes it.
fn broken_upgrade_is_undone(
    ct: &Container,
    (gnupg, repo, fpr, codename): (&Path, &Path, &str, &str),
    [version, next, broken, fixed]: [&str; 4],
    [[deb3, venv3], [deb4, venv4]]: [[&PathBuf; 2]; 2],
    room: &str,
) {
    let token = login(ct, "alice", "sd-password-1");
    let (st, v) = api(
        ct,
        "PUT",
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t2"),
        Some(&token),
        Some(json!({"msgtype": "m.text", "body": "written before the broken upgrade"})),
    );
    assert_eq!(st, 200, "{v}");
    aptrepo::release(
        gnupg,
        repo,
        fpr,
        &[(codename, vec![deb3.clone(), venv3.clone()])],
    );
    let t = Instant::now();
    ct.sh("systemctl start homelab-matrix-upgrade.service");
    eprintln!("broken release installed in {:.0?}", t.elapsed());
    assert_eq!(
        ct.sh("dpkg-query -W -f='${Version} ' homelab-matrix homelab-matrix-synapse-venv"),
        format!("{broken} {broken}")
    );
    wait_until(
        "the appliance to undo the broken upgrade",
        Duration::from_secs(1200),
        || {
            let r = rollback_record(ct);
            r["outcome"] == "rolled-back" || r["outcome"] == "failed"
        },
    );
    let record = rollback_record(ct);
    assert_eq!(
        record["outcome"],
        "rolled-back",
        "{record:#}\n{}",
        ct.sh("journalctl -u homelab-matrix-rollback --no-pager | tail -n 60")
    );
    eprintln!("broken upgrade: undone {:.0?} after it began", t.elapsed());
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("starts in a row"),
        "{record:#}"
    );
    assert_eq!(
        ct.sh("dpkg-query -W -f='${Version} ' homelab-matrix homelab-matrix-synapse-venv"),
        format!("{next} {next}"),
        "not back on the packages of before"
    );
    let held = ct.sh("apt-mark showhold");
    assert!(
        held.contains("homelab-matrix\n") && held.contains("homelab-matrix-synapse-venv"),
        "{held}"
    );
    wait_ready(ct, "the appliance after the rollback");
    let status = ct.sh("homelab-matrix status");
    eprintln!("homelab-matrix status after the rollback:\n{status}");
    assert!(
        status.contains("ROLLED BACK")
            && status.contains(&format!("{next} -> {broken}"))
            && status.contains("apt-mark unhold homelab-matrix homelab-matrix-synapse-venv"),
        "{status}"
    );
    // Everything written before the broken upgrade is there.
    let token = login(ct, "alice", "sd-password-1");
    assert_history_has(ct, &token, room, "written before the broken upgrade");
    // Held: the next unattended run leaves the broken release alone.
    ct.sh("systemctl start homelab-matrix-upgrade.service");
    let said = ct.sh("journalctl -u homelab-matrix-upgrade --no-pager -o cat | tail -n 8");
    assert!(said.contains("held: homelab-matrix"), "{said}");
    assert_eq!(
        ct.sh("dpkg-query -W -f='${Version} ' homelab-matrix homelab-matrix-synapse-venv"),
        format!("{next} {next}")
    );
    let kept = ct.sh(&format!("ls {KEPT}"));
    eprintln!("kept packages:\n{kept}");
    for v in [version, next, broken] {
        assert!(
            kept.contains(&format!("homelab-matrix-synapse-venv_{v}_all.deb")),
            "{v} not kept: {kept}"
        );
    }
    // The fix is published; unheld as `status` says, the next run takes it, and once Synapse
    // is healthy on it the rollback is history.
    aptrepo::release(
        gnupg,
        repo,
        fpr,
        &[(codename, vec![deb4.clone(), venv4.clone()])],
    );
    ct.sh("apt-mark unhold homelab-matrix homelab-matrix-synapse-venv");
    ct.sh("systemctl start homelab-matrix-upgrade.service");
    assert_eq!(
        ct.sh("dpkg-query -W -f='${Version} ' homelab-matrix homelab-matrix-synapse-venv"),
        format!("{fixed} {fixed}")
    );
    wait_ready(ct, "the appliance on the fixed release");
    wait_until(
        "the rollback to be history once the fix is healthy",
        Duration::from_secs(60),
        || rollback_record(ct).is_null(),
    );
    assert!(!ct.sh("homelab-matrix status").contains("ROLLED BACK"));
    let token = login(ct, "alice", "sd-password-1");
    assert_history_has(ct, &token, room, "written before the broken upgrade");
}

/// A Debian 12 box with the appliance, a user, an encrypted room with a message and a picture,
/// switched to trixie and `apt full-upgrade`d as Debian's release notes say: the Synapse venv,
/// built for Python 3.11, is built again for 3.13 (its package's trigger on python3) and the
/// service comes back with everything, still on PostgreSQL 15's cluster, which `doctor` and
/// `status` point out; `homelab-matrix postgres upgrade` then moves it to 17, and all is still
/// there.
/// `old` (the bookworm build, at `version[0]`) installed, then the box upgraded to trixie,
/// where the repository offers `new` (the trixie build, `version[1]`).
fn dist_upgrade(image: &Path, version: [&str; 2], old: &[PathBuf; 2], new: &[PathBuf; 2]) {
    let tmp = tempfile::tempdir().unwrap();
    let gnupg = tmp.path().join("gnupg");
    let fpr = aptrepo::key(&gnupg, "homelab-matrix test release key");
    let repo = tmp.path().join("repo");
    // Each suite with its own build, as the release workflow publishes them.
    aptrepo::release(
        &gnupg,
        &repo,
        &fpr,
        &[("bookworm", old.to_vec()), ("trixie", new.to_vec())],
    );
    let (_served, port) = aptrepo::serve(&repo);
    nspawn::assert_ports_free(&[80, 443, 8448, 3478, 5349, 5433], &[3478]);
    let _pg = HostPostgresPaused::pause(5432, Duration::from_secs(900));
    let Some(ct) = boot(image, "bookworm", tmp.path()) else {
        return;
    };
    ct.sh(&format!(
        "cd /tmp && /usr/lib/apt/apt-helper download-file http://127.0.0.1:{port}/homelab-matrix-archive-keyring.gpg key.gpg \
         && install -d /etc/apt/keyrings && install -m 0644 key.gpg /etc/apt/keyrings/homelab-matrix-archive-keyring.gpg \
         && printf 'Types: deb\\nURIs: http://127.0.0.1:{port}/\\nSuites: bookworm\\nComponents: main\\nSigned-By: /etc/apt/keyrings/homelab-matrix-archive-keyring.gpg\\n' > /etc/apt/sources.list.d/homelab-matrix.sources \
         && printf '%s\\n' 'homelab-matrix homelab-matrix/server_name string {SN}' 'homelab-matrix homelab-matrix/tls_mode select internal' | debconf-set-selections"
    ));
    ct.sh(&format!(
        "apt-get update -q 2>&1 && {APT} install homelab-matrix 2>&1"
    ));
    wait_ready(&ct, "the appliance on Debian 12");
    assert_eq!(
        ct.sh("dpkg-query -W -f='${Version}' homelab-matrix"),
        version[0]
    );
    assert_eq!(
        ct.sh("python3 -c 'import sys; print(sys.version_info[1])'"),
        "11"
    );

    // What the upgrade must keep: a user, an encrypted room, a message, a picture.
    ct.sh("umask 077; echo du-password-1 > /root/pw && homelab-matrix user add alice --password-file /root/pw");
    let token = login(&ct, "alice", "du-password-1");
    let (st, v) = api(
        &ct,
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&token),
        Some(json!({"name": "kept", "initial_state": [
            {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
        ]})),
    );
    assert_eq!(st, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_string();
    let (st, v) = api(
        &ct,
        "PUT",
        &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/d1"),
        Some(&token),
        Some(json!({"msgtype": "m.text", "body": "written on Debian 12"})),
    );
    assert_eq!(st, 200, "{v}");
    let picture: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let picture_file = tmp.path().join("picture.bin");
    fs::write(&picture_file, &picture).unwrap();
    // curl on this host (minbase has none), through the front door as a client would.
    let curl = |ct: &Container, token: &str| {
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail", "--max-time", "60"])
            .arg("--cacert")
            .arg(ct.path(&format!("{STATE}/ca/root.pem")))
            .arg("--resolve")
            .arg(format!("matrix.{SN}:443:127.0.0.1"))
            .args(["-H", &format!("Authorization: Bearer {token}")]);
        c
    };
    let out = aptrepo::run(
        curl(&ct, &token)
            .args([
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
            ])
            .arg(format!("@{}", picture_file.display()))
            .arg(format!("https://matrix.{SN}/_matrix/media/v3/upload")),
    );
    let mxc = serde_json::from_slice::<Value>(&out.stdout).unwrap()["content_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let media = |ct: &Container, token: &str| -> Vec<u8> {
        let path = mxc.trim_start_matches("mxc://");
        aptrepo::run(curl(ct, token).arg(format!(
            "https://matrix.{SN}/_matrix/client/v1/media/download/{path}"
        )))
        .stdout
    };
    assert_eq!(media(&ct, &token), picture, "the picture as uploaded");

    // Debian's release notes: point the sources at trixie, `apt update`, `apt upgrade
    // --without-new-pkgs`, then `apt full-upgrade`. Our repository's trixie suite too.
    let t = Instant::now();
    ct.sh("sed -i 's/bookworm/trixie/g' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/homelab-matrix.sources");
    // ca-certificates held: its bundle here is the host's, bound read-only.
    ct.sh("apt-mark hold ca-certificates");
    let opts = "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold";
    ct.sh(&format!(
        "apt-get update -q 2>&1 && {APT} {opts} upgrade --without-new-pkgs 2>&1 | tail -n 5 && {APT} {opts} full-upgrade 2>&1 | tail -n 20"
    ));
    eprintln!("apt full-upgrade to trixie: {:.0?}", t.elapsed());
    assert_eq!(
        ct.sh("python3 -c 'import sys; print(sys.version_info[1])'"),
        "13"
    );
    // Ours came along: the trixie builds replaced the bookworm ones.
    assert_eq!(
        ct.sh("dpkg-query -W -f='${Version} ' homelab-matrix homelab-matrix-synapse-venv"),
        format!("{0} {0}", version[1])
    );
    // The venv runs on the new Python: the trigger built it again.
    ct.sh("/opt/venvs/matrix-synapse/bin/python -c 'import synapse.app.homeserver, psycopg2'");
    assert!(
        ct.sh("/opt/venvs/matrix-synapse/bin/python -V")
            .contains("3.13"),
        "the venv is not on Python 3.13"
    );
    // The release notes end with a reboot; the service's restart is what matters here.
    ct.sh(&format!("systemctl restart {UNIT}"));
    wait_ready(&ct, "the appliance after the dist-upgrade");
    let token = login(&ct, "alice", "du-password-1");
    assert_history_has(&ct, &token, &room, "written on Debian 12");
    assert!(media(&ct, &token) == picture, "the picture changed");

    // PostgreSQL 17 came beside 15, whose cluster still holds the database: said, with the
    // command that moves it.
    let clusters = ct.sh("pg_lsclusters --no-header");
    eprintln!("clusters after the dist-upgrade:\n{clusters}");
    assert!(
        clusters.contains("15  main    5432 online")
            || clusters
                .lines()
                .any(|l| l.starts_with("15 ") && l.contains("5432")),
        "{clusters}"
    );
    let status = ct.sh("homelab-matrix status");
    assert!(
        status.contains("POSTGRES: the database lives on PostgreSQL 15 while 17 is installed")
            && status.contains("homelab-matrix postgres upgrade"),
        "{status}"
    );
    let doctor = ct.run("homelab-matrix doctor --only postgres");
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        said.contains("PostgreSQL 17 is installed beside it"),
        "doctor:\n{said}"
    );

    let t = Instant::now();
    let said = ct.sh("homelab-matrix postgres upgrade 2>&1");
    eprintln!("postgres upgrade: {:.0?}\n{said}", t.elapsed());
    let clusters = ct.sh("pg_lsclusters --no-header");
    assert!(
        clusters
            .lines()
            .any(|l| l.starts_with("17 ") && l.contains(" 5432 ") && l.contains("online")),
        "{clusters}"
    );
    wait_ready(&ct, "the appliance on PostgreSQL 17");
    assert!(!ct.sh("homelab-matrix status").contains("POSTGRES:"));
    let token = login(&ct, "alice", "du-password-1");
    assert_history_has(&ct, &token, &room, "written on Debian 12");
    assert!(media(&ct, &token) == picture, "the picture changed");
    let (st, v) = api(
        &ct,
        "GET",
        &format!("/_matrix/client/v3/rooms/{room}/state/m.room.encryption/"),
        Some(&token),
        None,
    );
    assert_eq!(
        (st, v["algorithm"].as_str()),
        (200, Some("m.megolm.v1.aes-sha2")),
        "{v}"
    );
    assert!(
        ct.sh("ls /var/backups/homelab-matrix")
            .contains("-pre-upgrade.tar"),
        "no snapshot before the database moved"
    );
    aptrepo::stop_agent(&gnupg);
}
