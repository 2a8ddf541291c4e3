//! A pristine Debian (12 or 13) booted with systemd as PID 1 (systemd-nspawn, ../shared LAB.md §6),
//! for tests that need what a user's box has: the unit with its hardening, `systemctl`, apt and the
//! maintainer scripts. The image comes from `packaging/debian-image` (cached); each boot starts
//! from the same fresh system (`--volatile=overlay`), and dropping a [`Container`] stops it.
//!
//! The container shares this host's network namespace (apt and pip reach the registries that
//! way): its ports are the host's ports.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{pid_alive, psql, require};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// A root login's environment, not this test's (no cargo, pyenv or CI variables inside).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// True when debootstrap and systemd-nspawn are installed; otherwise skips loudly (fails
/// under CI=true).
pub fn require_nspawn() -> bool {
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    require(
        "systemd-nspawn and debootstrap",
        have("systemd-nspawn") && have("debootstrap"),
        "run packaging/install-test-deps (apt-get install systemd-container debootstrap)",
    )
}

/// Runs one of the packaging scripts, echoing its stderr; returns its stdout lines.
fn script(args: &[&str]) -> Result<Vec<String>, String> {
    let out = Command::new(format!("{ROOT}/{}", args[0]))
        .args(&args[1..])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", args.join(" "), out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// The cached pristine image of Debian `codename` (bookworm, trixie): its path (built on first
/// use, about 1.5 minutes).
pub fn image(codename: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(
        script(&["packaging/debian-image", codename])?
            .pop()
            .ok_or("debian-image printed no path")?,
    ))
}

/// This checkout's two packages (appliance, Synapse venv) for Debian `release`, at `version`
/// (None: their build's), from `packaging/debs`: built once per source state, then reused by
/// every test and run.
pub fn debs(release: &str, version: Option<&str>) -> (PathBuf, PathBuf) {
    let mut args = vec!["packaging/debs", "--release", release];
    if let Some(v) = version {
        args.extend(["--version", v]);
    }
    let started = Instant::now();
    let lines = script(&args).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "packages {release} {version:?}: {lines:?} in {:.0?}",
        started.elapsed()
    );
    assert_eq!(lines.len(), 2, "packaging/debs printed {lines:?}");
    (PathBuf::from(&lines[0]), PathBuf::from(&lines[1]))
}

/// A booted container. Dropping it halts it (and kills what is left, so nothing leaks).
pub struct Container {
    nspawn: Option<Child>,
    /// The container's PID 1 (systemd), as this host sees it.
    pub leader: i32,
    pub log: PathBuf,
}

/// A process inside the container: its PID here and in the container.
#[derive(Debug, Clone)]
pub struct Proc {
    pub host_pid: i32,
    pub pid: i32,
    pub cmdline: String,
}

impl Container {
    /// Boots `image` with systemd as PID 1 and waits for `systemctl is-system-running` to say
    /// `running`. `binds` are (host path, container path), read-only.
    pub fn boot(image: &Path, binds: &[(PathBuf, &str)], log: &Path) -> Result<Container, String> {
        // nspawn refuses --volatile on a /run/systemd/nspawn that is not a tmpfs of its own
        // ("Attempted to remove disk file system").
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if !mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/run/systemd/nspawn"))
        {
            fs::create_dir_all("/run/systemd/nspawn").map_err(|e| e.to_string())?;
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "tmpfs", "/run/systemd/nspawn"])
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err("mounting a tmpfs on /run/systemd/nspawn failed".into());
            }
        }
        let logf = fs::File::create(log).map_err(|e| e.to_string())?;
        let mut c = Command::new("systemd-nspawn");
        // --register=no --keep-unit: no machined or system bus on the host is needed.
        c.arg("-D").arg(image).args([
            "--volatile=overlay",
            "--register=no",
            "--keep-unit",
            "--machine=hm-debian",
            "--console=pipe",
            "-b",
        ]);
        for (host, inside) in binds {
            c.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        c.stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(|e| e.to_string())?)
            .stderr(logf);
        let child = c.spawn().map_err(|e| format!("systemd-nspawn: {e}"))?;
        let mut ct = Container {
            nspawn: Some(child),
            leader: 0,
            log: log.to_owned(),
        };
        let nspawn_pid = ct.nspawn.as_ref().unwrap().id() as i32;
        let deadline = Instant::now() + Duration::from_secs(60);
        while ct.leader == 0 {
            if let Some(st) = ct.nspawn.as_mut().unwrap().try_wait().ok().flatten() {
                ct.nspawn = None;
                return Err(format!("systemd-nspawn exited ({st}):\n{}", ct.log_text()));
            }
            ct.leader = children_of(nspawn_pid)
                .into_iter()
                .find(|p| comm(*p).as_deref() == Some("systemd"))
                .unwrap_or(0);
            if Instant::now() > deadline {
                return Err(format!("no systemd in the container:\n{}", ct.log_text()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Until its system bus is up, systemctl cannot even ask: it prints nothing.
        let mut state = String::new();
        while state.is_empty() && Instant::now() < deadline + Duration::from_secs(120) {
            let out = ct.run("timeout 120 systemctl is-system-running --wait");
            state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state.is_empty() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if state != "running" {
            let failed =
                ct.run("systemctl --failed --no-pager; journalctl -b --no-pager | tail -50");
            return Err(format!(
                "the container's systemd is {state:?}, not running:\n{}",
                String::from_utf8_lossy(&failed.stdout)
            ));
        }
        Ok(ct)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A bash script run inside the container (all its namespaces, a root login's environment).
    pub fn cmd(&self, script: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-a", "env", "-i"])
            .arg(format!("PATH={PATH}"))
            .args(["LANG=C.UTF-8", "HOME=/root", "bash", "-c", script]);
        c
    }

    pub fn run(&self, script: &str) -> Output {
        self.cmd(script).output().expect("running nsenter")
    }

    /// Runs `script` inside; panics with its output unless it succeeds. Returns stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self.run(script);
        assert!(
            out.status.success(),
            "in the container, `{script}` failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn ok(&self, script: &str) -> bool {
        self.run(script).status.success()
    }

    /// A path inside the container, as this host reaches it.
    pub fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{p}", self.leader))
    }

    /// The container's processes (the host sees them in its own PID namespace too).
    pub fn procs(&self) -> Vec<Proc> {
        let Ok(ns) = fs::read_link(format!("/proc/{}/ns/pid", self.leader)) else {
            return vec![];
        };
        let mut out = vec![];
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(host_pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if fs::read_link(format!("/proc/{host_pid}/ns/pid"))
                .ok()
                .as_ref()
                != Some(&ns)
                || !pid_alive(host_pid)
            {
                continue;
            }
            let status = fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap_or_default();
            // NSpid: this host's PID, then the container's.
            let Some(pid) = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last()?.parse().ok())
            else {
                continue;
            };
            let cmdline = fs::read(format!("/proc/{host_pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            out.push(Proc {
                host_pid,
                pid,
                cmdline,
            });
        }
        out
    }

    /// The host PID of the container's process `pid`.
    pub fn host_pid(&self, pid: i32) -> Option<i32> {
        self.procs()
            .into_iter()
            .find(|p| p.pid == pid)
            .map(|p| p.host_pid)
    }

    /// The host PIDs of the container's processes whose command line contains `needle`.
    pub fn pids_of(&self, needle: &str) -> Vec<i32> {
        self.procs()
            .into_iter()
            .filter(|p| p.cmdline.contains(needle))
            .map(|p| p.host_pid)
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        // SIGTERM: nspawn halts the container cleanly; a second one forces it; then SIGKILL
        // for nspawn and everything still running in there.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        for _ in 0..2 {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let left = self.procs();
        let _ = child.kill();
        for p in left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.host_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait();
    }
}

fn children_of(ppid: i32) -> Vec<i32> {
    let mut out = vec![];
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<i32>().ok())
            == Some(ppid)
        {
            out.push(pid);
        }
    }
    out
}

fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Fails with the port's name unless nothing on this host listens on it: the container's
/// appliance needs the host's ports, as it shares the host's network.
pub fn assert_ports_free(tcp: &[u16], udp: &[u16]) {
    for &p in tcp {
        assert!(
            std::net::TcpListener::bind(("0.0.0.0", p)).is_ok(),
            "TCP port {p} is in use on this host; the systemd test's appliance needs it (the container shares the host's network): stop what listens there (ss -ltnp)"
        );
    }
    for &p in udp {
        assert!(
            std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok(),
            "UDP port {p} is in use on this host; the systemd test's appliance needs it: stop what listens there (ss -lunp)"
        );
    }
}

/// The host's PostgreSQL clusters on a port, stopped while this lives and started again when
/// it is dropped: the container shares the host's network, so its own cluster (made by its
/// postgresql package, port 5432 like on any Debian box) could not listen while the host's does.
pub struct HostPostgresPaused {
    clusters: Vec<(String, String)>,
}

impl HostPostgresPaused {
    /// Waits (up to `idle_within`) until no client is connected, so that another test using
    /// the host's cluster is never cut off; then stops the clusters on `port`.
    pub fn pause(port: u16, idle_within: Duration) -> HostPostgresPaused {
        let out = Command::new("pg_lsclusters")
            .arg("--no-header")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let clusters: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 3 && f[2] == port.to_string() && f[3] == "online")
                    .then(|| (f[0].to_string(), f[1].to_string()))
            })
            .collect();
        if clusters.is_empty() {
            return HostPostgresPaused { clusters };
        }
        let deadline = Instant::now() + idle_within;
        loop {
            let clients = psql(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            );
            if clients == "0" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the host's PostgreSQL still has {clients} clients after {idle_within:?}; the systemd test must stop it (its container needs port {port}): let the other tests finish, then run it again"
            );
            eprintln!(
                "systemd test: waiting for the host's PostgreSQL to be idle ({clients} clients)"
            );
            std::thread::sleep(Duration::from_secs(5));
        }
        eprintln!(
            "systemd test: stopping the host's PostgreSQL {clusters:?} for the container (started again at the end)"
        );
        let paused = HostPostgresPaused { clusters };
        for (v, c) in &paused.clusters {
            let st = Command::new("pg_ctlcluster")
                .args([v, c, "stop", "-m", "fast"])
                .status()
                .unwrap();
            assert!(st.success(), "pg_ctlcluster {v} {c} stop failed");
        }
        paused
    }
}

impl Drop for HostPostgresPaused {
    fn drop(&mut self) {
        for (v, c) in &self.clusters {
            let ok = Command::new("pg_ctlcluster")
                .args([v, c, "start"])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!(
                    "systemd test: could not start the host's PostgreSQL {v}/{c} again: pg_ctlcluster {v} {c} start"
                );
            }
        }
    }
}
