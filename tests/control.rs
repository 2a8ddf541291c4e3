//! The control socket against the real binary (issue #11 items 8 and 9): root only by mode and
//! by peer credentials, an accept loop that does not spin when descriptors run out, and
//! `homelab-matrix reload` (the unit's ExecReload) reporting what it re-applied.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::{Lab, bin, require_appliance, wait_until};

/// A lab without the bot and coturn: these tests are about the supervisor's own socket.
fn lab(name: &str) -> Lab {
    let lab = Lab::new(name);
    *lab.turn_extra.borrow_mut() = "enabled = false\n".into();
    lab.write_config("[tls]\nmode = \"internal\"\n[bot]\nenabled = false\n");
    lab
}

/// user + system CPU time of `pid`, in clock ticks (proc(5), /proc/pid/stat fields 14 and 15).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn prlimit_nofile(pid: i32, soft: &str) {
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_control_socket_answers_root_only_and_survives_running_out_of_descriptors() {
    if !require_appliance() {
        return;
    }
    let lab = lab("control");
    let run = lab.start();
    let sock = lab.path("run/control.sock");
    let m = fs::symlink_metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!((m.mode() & 0o777, m.uid()), (0o600, 0), "root's, 0600");
    let entries: Vec<String> = fs::read_dir(lab.path("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["control.sock"], "no staging directory left");

    // Even with the mode loosened, a user other than root is refused by its credentials.
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()])
        .arg("--config")
        .arg(&lab.config)
        .arg("status")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "nobody got an answer: {}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("answers root only") && err.contains("uid 65534"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no status for nobody");
    assert_eq!(lab.status()["phase"], "ready", "root still gets answers");
    wait_until("the refusal to be logged", Duration::from_secs(5), || {
        run.log_text().contains("refused a control socket client")
    });

    // Out of descriptors: connections wait in the queue and accept fails with EMFILE. The
    // loop must pause between tries, not spin, and answer again once descriptors are back.
    let pid = run.pid();
    let soft = String::from_utf8(
        Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .args(["--nofile", "--output=SOFT", "--noheadings"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let open = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    prlimit_nofile(pid, &(open + 3).to_string());
    let clients: Vec<UnixStream> = (0..30)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    wait_until("accept to fail", Duration::from_secs(10), || {
        run.log_text()
            .contains("the control socket cannot accept connections")
    });
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - t0;
    eprintln!("CPU while accept failed: {used} ticks in 3 s");
    // A busy loop burns all of a core: about 300 ticks in 3 s; pausing, next to nothing.
    assert!(
        used < 60,
        "the supervisor used {used} ticks of CPU in 3 s while accept failed"
    );
    let log = run.log_text();
    assert_eq!(
        log.matches("the control socket cannot accept connections")
            .count(),
        1,
        "the error is logged once:\n{}",
        run.log_tail()
    );
    assert!(log.contains("Too many open files"), "{}", run.log_tail());
    prlimit_nofile(pid, soft.trim());
    drop(clients);
    wait_until(
        "the socket to answer again",
        Duration::from_secs(10),
        || lab.run_cmd(&["status"]).status.success(),
    );
    wait_until("the recovery to be logged", Duration::from_secs(5), || {
        run.log_text()
            .contains("the control socket accepts connections again")
    });
}

/// config.json as the front door serves it on the Element host.
fn served_config_json(lab: &Lab) -> String {
    let out = lab
        .curl()
        .arg("--cacert")
        .arg(lab.ca_root())
        .arg(format!(
            "https://element.{}:{}/config.json",
            lab.server_name, lab.https_port
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn synapse_pid(lab: &Lab) -> i64 {
    lab.synapse_status()["pid"].as_i64().expect("Synapse runs")
}

#[test]
fn reload_reports_what_it_reapplied_and_restarts_synapse_only_on_change() {
    if !require_appliance() {
        return;
    }
    let lab = lab("reload");
    let _run = lab.start();
    let pid0 = synapse_pid(&lab);

    // Nothing changed: Synapse keeps running, the report says what was looked at.
    let out = lab.ok(&["reload"]);
    assert!(out.contains("Synapse: config unchanged"), "{out}");
    assert!(out.contains("Element: config.json re-applied"), "{out}");
    assert!(out.contains("homelab-matrix.toml: unchanged"), "{out}");
    assert!(out.contains("no certificate files to reload"), "{out}");
    assert_eq!(synapse_pid(&lab), pid0, "an unchanged reload keeps Synapse");

    // A synapse.d change, and an element.json: Synapse restarts, and the answer comes once
    // it is ready again; Element's config carries the override.
    fs::write(
        lab.path("synapse.d/50-reload-test.yaml"),
        "require_auth_for_profile_requests: true\n",
    )
    .unwrap();
    fs::write(lab.path("element.json"), r#"{"brand": "Reload Test"}"#).unwrap();
    let out = lab.ok(&["reload"]);
    assert!(out.contains("Synapse: its config changed"), "{out}");
    assert!(out.contains("Synapse is ready again"), "{out}");
    let pid1 = synapse_pid(&lab);
    assert_ne!(pid1, pid0, "Synapse was restarted");
    assert_eq!(lab.synapse_status()["state"], "running");
    assert!(served_config_json(&lab).contains("Reload Test"));

    // A broken element.json: reported, exit 1, and the last good config.json stays served.
    fs::write(lab.path("element.json"), "{\"brand\": ").unwrap();
    let out = lab.run_cmd(&["reload"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("FAILED: Element's config.json stays as it was"),
        "{stdout}"
    );
    assert!(
        stderr.contains("reload incomplete: 1 step(s) failed"),
        "{stderr}"
    );
    assert!(served_config_json(&lab).contains("Reload Test"));
    assert_eq!(synapse_pid(&lab), pid1, "nothing else changed");
}

/// (inode, mtime in ns) of `p`: changed by any write that replaces or rewrites it.
fn stamp(p: &std::path::Path) -> (u64, i64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.ino(), m.mtime() * 1_000_000_000 + m.mtime_nsec())
}

/// One instance per state directory (issue #28 item 4): a second `run` on the same state,
/// with the same config or another one that shares it, stops at once with the first one's
/// pid and how to reach it, before it touches PostgreSQL, Synapse's config or the control
/// socket. With the socket gone, `status` and `restore` still know the service runs: they ask
/// the lock, not the socket.
#[test]
fn a_second_instance_on_one_state_directory_stops_first_and_a_lost_socket_does_not_hide_the_first()
{
    if !require_appliance() {
        return;
    }
    let lab = lab("instance");
    let run = lab.start();
    let first = run.pid();
    let sock = lab.path("run/control.sock");
    let hs = lab.path("state/synapse/homeserver.yaml");
    let before = (stamp(&sock), stamp(&hs));

    // Another config on the same state: other listeners, another run dir, and a PostgreSQL
    // port nothing listens on, so a second instance that went as far as PostgreSQL would
    // fail there instead of at the lock.
    let text = fs::read_to_string(&lab.config).unwrap();
    let mut second = text.replace(
        "[postgres]\n",
        &format!("[postgres]\nport = {}\n", common::free_port()),
    );
    for port in [lab.http_port, lab.https_port, lab.federation_port] {
        second = second.replace(
            &format!(":{port}\""),
            &format!(":{}\"", common::free_port()),
        );
    }
    second = second.replace("/run\"", "/run2\"");
    let other = lab.path("second.toml");
    fs::write(&other, &second).unwrap();

    for (what, config) in [("the same config", &lab.config), ("another config", &other)] {
        let out = Command::new(bin())
            .arg("--config")
            .arg(config)
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: a second run started:\n{err}"
        );
        assert!(
            err.contains(&format!(
                "`homelab-matrix run` (pid {first}) already runs on the state directory"
            )),
            "{what}: the first one's pid: {err}"
        );
        assert!(
            err.contains("homelab-matrix status"),
            "{what}: how to reach it: {err}"
        );
        assert!(
            !err.contains("PostgreSQL"),
            "{what}: it went as far as PostgreSQL: {err}"
        );
    }
    assert_eq!(
        (stamp(&sock), stamp(&hs)),
        before,
        "the second run touched the socket or Synapse's config"
    );
    assert!(
        !lab.path("run2").exists(),
        "the second run made its run dir"
    );
    assert_eq!(lab.status()["pid"], first, "the first one still answers");

    // A child (assume it compromised) can neither replace the lock file with a link nor write
    // a holder into it: the state dir and the file are root's.
    let lock = lab.path("state/instance.lock");
    for attack in [
        format!("ln -sfn /etc/shadow {}", lock.display()),
        format!("echo '1 run' > {}", lock.display()),
        format!("mv {0} {0}.x", lock.display()),
    ] {
        let out = common::as_user("matrix-synapse", "sh")
            .args(["-c", &attack])
            .output()
            .unwrap();
        assert!(!out.status.success(), "as matrix-synapse: {attack} worked");
    }
    let m = fs::symlink_metadata(&lock).unwrap();
    assert!(
        m.file_type().is_file() && m.uid() == 0,
        "the lock file was changed"
    );
    assert!(
        fs::read_to_string(&lock)
            .unwrap()
            .starts_with(&format!("{first} run")),
        "the lock file no longer names the holder"
    );

    // The socket removed (by hand, or tmpfiles cleaning /run): the service still runs, and
    // nothing that needs it stopped takes a missing socket for a stopped server.
    fs::remove_file(&sock).unwrap();
    let out = lab.run_cmd(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "homelab-matrix is running (`homelab-matrix run` (pid {first}))"
        )),
        "status without the socket: {err}"
    );
    let out = lab.run_cmd(&["restore", "/nonexistent/backup.tar"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("homelab-matrix is running") && err.contains(&format!("pid {first}")),
        "restore must refuse while the service runs: {err}"
    );
    assert_eq!(
        stamp(&hs),
        before.1,
        "the refused restore touched Synapse's config"
    );

    // Stopped, the lock is free: restore gets past it (and fails on its missing file).
    let mut run = run;
    run.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(60));
    let out = lab.run_cmd(&["restore", "/nonexistent/backup.tar"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        !err.contains("is running"),
        "stopped, yet refused as running: {err}"
    );
    let err = String::from_utf8_lossy(&lab.run_cmd(&["status"]).stderr).into_owned();
    assert!(
        err.contains("is it running?"),
        "stopped, status says: {err}"
    );
}
