//! Test harness: drives the real `homelab-matrix` binary against the real PostgreSQL and
//! Synapse on this machine, each test in its own state dir, database, role and ports.
//!
//! A test that needs a missing component skips with a loud message, except under `CI=true`,
//! where a missing component fails the test.

#![allow(dead_code)]
// The harness drives the binary from outside with std's process API; only tests/supervisor.rs
// shares a process with the supervisor's reaper, and it calls none of these.
#![allow(clippy::disallowed_methods)]

pub mod aptrepo;
pub mod capture;
pub mod element;
pub mod frontdoor;
pub mod nspawn;
pub mod pebble;
pub mod twohost;

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const SYNAPSE_PYTHON: &str = "/opt/venvs/matrix-synapse/bin/python";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_homelab-matrix")
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True when `ok`; otherwise fails under CI, or prints a loud skip notice and returns false.
pub fn require(component: &str, ok: bool, how: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("{component} is required under CI=true but is not available: {how}");
    }
    eprintln!(
        "\n********************************************************************\n\
         SKIPPED: {component} is not available: {how}\n\
         Run `packaging/run-tests` (as root) to install and start everything.\n\
         ********************************************************************\n"
    );
    false
}

/// `Some(value)` when `r` is Ok; otherwise as [`require`] with the error: fails under CI, or
/// skips loudly (None).
pub fn require_ok<T, E: std::fmt::Debug>(component: &str, r: Result<T, E>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            require(component, false, &format!("{e:?}"));
            None
        }
    }
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

pub fn postgres_up() -> bool {
    Command::new("pg_isready")
        .args(["-q", "-h", "/var/run/postgresql"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Root, a running PostgreSQL and Synapse's venv: what `run` needs.
pub fn require_appliance() -> bool {
    require(
        "root",
        is_root(),
        "these tests start children as other users",
    ) && require(
        "PostgreSQL",
        postgres_up(),
        "pg_isready fails; start it with pg_ctlcluster 15 main start",
    ) && require(
        "Synapse",
        Path::new(SYNAPSE_PYTHON).exists(),
        "no venv at /opt/venvs/matrix-synapse (packaging/install-deps makes it)",
    )
}

/// Twenty UDP ports for one lab's TURN relays, unique within this test process and below the
/// kernel's ephemeral range.
pub fn relay_range() -> (u16, u16) {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        10000 + (std::process::id() % 100) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let start = NEXT.fetch_add(20, Ordering::SeqCst);
    (start, start + 19)
}

/// A port free on 127.0.0.1 for TCP and UDP, unique within this test process. Taken from
/// below Linux's ephemeral range (32768+), so neither another lab's listener nor an outgoing
/// connection can be handed the same one.
/// `n` consecutive free ports (the workers' listeners); the first.
pub fn free_ports(n: u16) -> u16 {
    loop {
        let first = free_port();
        if (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", first + i)).is_ok()) {
            // Skip past them, so free_port never hands one out again.
            for _ in 1..n {
                free_port();
            }
            return first;
        }
    }
}

pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20000 + (std::process::id() % 400) as u16 * 30,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(p < 32768, "ran out of test ports");
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        {
            return p;
        }
    }
}

/// Runs psql as the postgres OS user (peer authentication), returning trimmed stdout.
pub fn psql(sql: &str) -> String {
    psql_in("postgres", sql)
}

/// `psql` in database `db`.
pub fn psql_in(db: &str, sql: &str) -> String {
    let out = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "psql",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        ])
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One appliance instance: its own temp dir, config, database, role and Synapse port.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db: String,
    pub synapse_port: u16,
    pub http_port: u16,
    pub https_port: u16,
    pub federation_port: u16,
    pub turn_port: u16,
    pub turn_tls_port: u16,
    /// coturn's relay range: its own per lab, so parallel labs' allocations never collide.
    pub relay_ports: (u16, u16),
    /// Extra keys for the `[turn]` table (set before `write_config`).
    pub turn_extra: std::cell::RefCell<String>,
    /// Extra keys for the `[synapse]` table (set before `write_config`).
    pub synapse_extra: std::cell::RefCell<String>,
    /// Extra keys for the `[postgres]` table (set before `write_config`).
    pub postgres_extra: std::cell::RefCell<String>,
    pub server_name: String,
}

/// `HM_TEST_WORKERS=N`: every lab that does not set `[synapse]` keys itself runs Synapse with
/// N workers (and Redis), so a suite written for the monolith runs again in that mode
/// (packaging/run-tests does so for the client-facing suites).
fn workers_mode() -> String {
    match std::env::var("HM_TEST_WORKERS") {
        Ok(n) if n.parse::<u16>().is_ok_and(|n| (1..=16).contains(&n)) => {
            eprintln!("test lab: Synapse with {n} workers (HM_TEST_WORKERS)");
            let base = free_ports(n.parse().unwrap());
            format!("workers = {n}\nworker_base_port = {base}\n")
        }
        _ => String::new(),
    }
}

impl Lab {
    pub fn new(name: &str) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix(&format!("hm-{name}-"))
            .tempdir()
            .unwrap();
        // The Synapse user must be able to traverse down to its state dir.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let suffix: String = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .chars()
            .rev()
            .take(6)
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        let db = format!("hm_{}_{}", name.replace('-', "_"), suffix);
        let server_name = "matrix.test".to_string();
        let lab = Lab {
            config: dir.path().join("homelab-matrix.toml"),
            dir,
            db,
            synapse_port: free_port(),
            http_port: free_port(),
            https_port: free_port(),
            federation_port: free_port(),
            turn_port: free_port(),
            turn_tls_port: free_port(),
            relay_ports: relay_range(),
            turn_extra: std::cell::RefCell::new(String::new()),
            synapse_extra: std::cell::RefCell::new(workers_mode()),
            postgres_extra: std::cell::RefCell::new(String::new()),
            server_name,
        };
        lab.write_config("[tls]\nmode = \"internal\"\n");
        // Synapse's login and registration rate limits would trip these tests (LAB.md gotcha 6).
        let overrides = lab.path("synapse.d");
        fs::create_dir_all(&overrides).unwrap();
        fs::write(
            overrides.join("90-test-ratelimits.yaml"),
            "rc_login:\n  address: {per_second: 1000, burst_count: 1000}\n  account: {per_second: 1000, burst_count: 1000}\n  failed_attempts: {per_second: 1000, burst_count: 1000}\nrc_registration: {per_second: 1000, burst_count: 1000}\nrc_registration_token_validity: {per_second: 1000, burst_count: 1000}\nrc_message: {per_second: 1000, burst_count: 1000}\n",
        )
        .unwrap();
        lab
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// Writes the config; `extra` holds whole tables (at least `[tls]`) and may add `[http]`
    /// or `[synapse]` keys after a `[synapse]`-less config: it must not repeat a table.
    pub fn write_config(&self, extra: &str) {
        self.write_config_on("127.0.0.1", extra)
    }

    /// Like `write_config`, with the listeners on `ip` (e.g. 0.0.0.0 to be reached from a
    /// network namespace).
    pub fn write_config_on(&self, ip: &str, extra: &str) {
        let d = self.dir.path().display();
        let text = format!(
            "server_name = \"{sn}\"\n{extra}\n\
             [listen]\nhttp = \"{ip}:{hp}\"\nhttps = \"{ip}:{sp}\"\nfederation = \"{ip}:{fp}\"\n\
             [synapse]\nport = {port}\nconfig_dir = \"{d}/synapse.d\"\nmax_upload_size = \"45M\"\n{synapse_extra}\
             [postgres]\ndatabase = \"{db}\"\nuser = \"{db}\"\n{postgres_extra}\
             [state]\ndir = \"{d}/state\"\nrun_dir = \"{d}/run\"\n\
             [supervisor]\ngrace_period = \"10s\"\n\
             [turn]\nport = {tp}\ntls_port = {tsp}\nmin_port = {rmin}\nmax_port = {rmax}\n{turn_extra}",
            sn = self.server_name,
            rmin = self.relay_ports.0,
            rmax = self.relay_ports.1,
            tp = self.turn_port,
            tsp = self.turn_tls_port,
            turn_extra = self.turn_extra.borrow(),
            synapse_extra = self.synapse_extra.borrow(),
            postgres_extra = self.postgres_extra.borrow(),
            hp = self.http_port,
            sp = self.https_port,
            fp = self.federation_port,
            port = self.synapse_port,
            db = self.db,
        );
        fs::write(&self.config, text).unwrap();
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--config").arg(&self.config).args(args);
        c.env_remove("NOTIFY_SOCKET").env_remove("RUST_LOG");
        c
    }

    pub fn run_cmd(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running homelab-matrix")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run_cmd(args);
        assert!(
            out.status.success(),
            "homelab-matrix {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a CLI command on a real pty (through script(1)), typing each of `typed` as a line
    /// after a pause, as a person answers prompts; returns the exit code and what the terminal
    /// showed.
    pub fn on_terminal(&self, args: &[&str], typed: &[&str]) -> (Option<i32>, String) {
        use std::io::Write;
        let cmdline = std::iter::once(bin().to_string())
            .chain(["--config".into(), self.config.display().to_string()])
            .chain(args.iter().map(|a| a.to_string()))
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new("script")
            .args(["-qec", &cmdline, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running script(1)");
        {
            let mut stdin = child.stdin.take().unwrap();
            for line in typed {
                std::thread::sleep(Duration::from_millis(700));
                stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `user add NAME [--admin]` with the password `<name>-password-1`, which it returns.
    pub fn add_user(&self, name: &str, admin: bool) -> String {
        let pw = format!("{name}-password-1");
        let file = self.path(&format!("{name}.pw"));
        fs::write(&file, &pw).unwrap();
        let mut args = vec![
            "user",
            "add",
            name,
            "--password-file",
            file.to_str().unwrap(),
        ];
        if admin {
            args.push("--admin");
        }
        self.ok(&args);
        pw
    }

    /// Starts `run` and waits for its sd_notify READY=1 (Synapse healthy, admin account made).
    pub fn start(&self) -> Running {
        let c = self.cmd(&["run"]);
        start_until_ready(c, &self.path("notify.sock"), &self.path("run.log"))
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON")
    }

    /// The certificates `status` reports, by name.
    pub fn certificates(&self) -> std::collections::BTreeMap<String, Value> {
        self.status()["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
            .collect()
    }

    pub fn synapse_status(&self) -> Value {
        let st = self.status();
        st["children"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "synapse")
            .cloned()
            .expect("a synapse child")
    }

    pub fn synapse_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.synapse_port)
    }

    pub fn matrix_host(&self) -> String {
        format!("matrix.{}", self.server_name)
    }

    /// The internal CA's root, which clients of an `internal` lab trust.
    pub fn ca_root(&self) -> PathBuf {
        self.state().join("ca/root.pem")
    }

    /// curl, resolving every served name to 127.0.0.1 on this lab's ports.
    pub fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "120"]);
        for name in [
            self.server_name.clone(),
            self.matrix_host(),
            format!("element.{}", self.server_name),
            format!("turn.{}", self.server_name),
        ] {
            for port in [self.https_port, self.http_port, self.federation_port] {
                c.arg("--resolve").arg(format!("{name}:{port}:127.0.0.1"));
            }
        }
        c
    }

    /// A Matrix client of this lab's front door, trusting its internal CA.
    pub fn front_matrix(&self) -> Matrix {
        let ca = fs::read(self.ca_root()).expect("the lab's internal CA");
        Matrix::through(&self.matrix_host(), self.https_port, &ca)
    }

    /// `https://matrix.<server>:<port>`
    pub fn https_base(&self) -> String {
        format!("https://{}:{}", self.matrix_host(), self.https_port)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop_database(&self.db);
    }
}

/// Drops a lab's database and its role of the same name (dropping what is gone is cheap).
pub fn drop_database(db: &str) {
    if is_root() && postgres_up() {
        // Two -c: DROP DATABASE cannot run inside the transaction one -c would make.
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-q", "-c"])
            .arg(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", db))
            .arg("-c")
            .arg(format!("DROP ROLE IF EXISTS \"{}\"", db))
            .output();
    }
}

/// Spawns `c` with NOTIFY_SOCKET set, output appended to `log`, and waits for READY=1, the way
/// systemd runs a Type=notify unit.
pub fn start_until_ready(mut c: Command, sock_path: &Path, log: &Path) -> Running {
    let _ = fs::remove_file(sock_path);
    let sock = UnixDatagram::bind(sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    c.env("NOTIFY_SOCKET", sock_path)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf);
    let child = c.spawn().expect("starting homelab-matrix");
    let mut running = Running {
        child: Some(child),
        log: log.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut buf = [0u8; 512];
    loop {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]);
            if msg.lines().any(|l| l == "READY=1") {
                return running;
            }
        }
        if let Some(st) = running.try_exit() {
            panic!(
                "homelab-matrix exited ({st}) before READY=1:\n{}",
                running.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no READY=1 within 180s:\n{}",
            running.log_tail()
        );
    }
}

/// A running `homelab-matrix run`. Killed (SIGKILL) if the test drops it while running.
pub struct Running {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        let _ = fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` and waits up to `within` (at least [`MIN_WAIT`]) for the exit.
    pub fn signal_and_wait(
        &mut self,
        sig: nix::sys::signal::Signal,
        within: Duration,
    ) -> ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
        let within = within.max(MIN_WAIT);
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.try_exit() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "homelab-matrix did not exit within {within:?} of {sig}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; count it as gone only when reaped or dead.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// The shortest bound any wait gets. A wait's bound is there so that a test that will never
/// see its event ends, not to time the event (performance is measured in benchmarks): CI runs
/// the package's release build beside two test threads, each with its own Synapse, on two
/// cores, and a step that takes a second alone can take tens of seconds there. A bound under
/// this only ever failed tests on a busy machine; returning as soon as the event is seen, a
/// longer one costs nothing when all is well.
pub const MIN_WAIT: Duration = Duration::from_secs(60);

/// When a wait of `within` (at least [`MIN_WAIT`]) started now gives up.
pub fn deadline(within: Duration) -> Instant {
    Instant::now() + within.max(MIN_WAIT)
}

pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let within = within.max(MIN_WAIT);
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A command that runs `program` as the system user `user` with only its own group, the way a
/// compromised child would run it (setpriv execs directly, so signals and exit codes pass).
pub fn as_user(user: &str, program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={user}"))
        .arg(format!("--regid={user}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program);
    c
}

/// The real uid of a process, from /proc.
pub fn proc_uid(pid: i32) -> u32 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// A minimal Matrix client-server API client (spec v1.x, /_matrix/client/v3).
pub struct Matrix {
    pub base: String,
    http: reqwest::blocking::Client,
}

impl Matrix {
    pub fn new(base: &str) -> Matrix {
        Matrix::with(base, reqwest::blocking::Client::builder())
    }

    /// A client of a front door: `https://<host>` reached at 127.0.0.1:`port`, trusting `ca_pem`.
    pub fn through(host: &str, port: u16, ca_pem: &[u8]) -> Matrix {
        let ca = reqwest::Certificate::from_pem(ca_pem).unwrap();
        let b = reqwest::blocking::Client::builder()
            .resolve(host, SocketAddr::from(([127, 0, 0, 1], port)))
            .add_root_certificate(ca);
        Matrix::with(&format!("https://{host}"), b)
    }

    fn with(base: &str, b: reqwest::blocking::ClientBuilder) -> Matrix {
        // reqwest is built without a default crypto provider (the binary picks ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Matrix {
            base: base.to_string(),
            http: b
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    pub fn req(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut rb = self.http.request(method.parse().unwrap(), &url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(Value::Null))
    }

    pub fn login(&self, user: &str, password: &str) -> String {
        let (st, v) = self.req(
            "POST",
            "/_matrix/client/v3/login",
            None,
            Some(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password})),
        );
        assert_eq!(st, 200, "login {user}: {v}");
        v["access_token"].as_str().unwrap().to_string()
    }

    /// Registration through the UIA flow (spec: "User-Interactive Authentication API"):
    /// the token stage then the dummy stage. Returns the final status and body.
    pub fn register(&self, user: &str, password: &str, token: Option<&str>) -> (u16, Value) {
        let body = json!({"username": user, "password": password, "inhibit_login": false});
        let (st, v) = self.req(
            "POST",
            "/_matrix/client/v3/register",
            None,
            Some(body.clone()),
        );
        if st != 401 {
            return (st, v);
        }
        let session = v["session"].as_str().unwrap_or_default().to_string();
        let Some(token) = token else { return (st, v) };
        let mut b = body.clone();
        b["auth"] =
            json!({"type": "m.login.registration_token", "token": token, "session": session});
        let (st, v) = self.req("POST", "/_matrix/client/v3/register", None, Some(b));
        if st != 401 || v.get("errcode").is_some() {
            return (st, v);
        }
        let mut b = body;
        b["auth"] = json!({"type": "m.login.dummy", "session": session});
        self.req("POST", "/_matrix/client/v3/register", None, Some(b))
    }
}

/// A matrix-sdk client with its sqlite store in `store`, logged in with a password.
/// `hs` is Synapse's own URL: its login answer names the public URL, which only the front
/// door serves, so the login's well-known is not followed.
pub async fn sdk_login(
    hs: &str,
    store: &Path,
    user: &str,
    password: &str,
    device: &str,
) -> matrix_sdk::Client {
    sdk_login_with(hs, None, store, user, password, device).await
}

/// An async HTTP client for matrix-sdk reaching `https://<host>` at 127.0.0.1:`port` (a front
/// door relayed from a namespace), trusting `ca_pem`.
pub fn front_door_http(host: &str, port: u16, ca_pem: &[u8]) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .resolve(host, SocketAddr::from(([127, 0, 0, 1], port)))
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .no_proxy()
        .build()
        .unwrap()
}

/// `sdk_login`, through `http` when given (see [`front_door_http`]).
pub async fn sdk_login_with(
    hs: &str,
    http: Option<reqwest::Client>,
    store: &Path,
    user: &str,
    password: &str,
    device: &str,
) -> matrix_sdk::Client {
    let mut b = matrix_sdk::Client::builder()
        .homeserver_url(hs)
        .respect_login_well_known(false)
        .sqlite_store(store, None);
    if let Some(http) = http {
        b = b.http_client(http);
    }
    let client = b.build().await.unwrap();
    client
        .matrix_auth()
        .login_username(user, password)
        .initial_device_display_name(device)
        .send()
        .await
        .unwrap_or_else(|e| panic!("login {user}: {e}"));
    client
}

/// A second "host": a network namespace joined to this one by a veth pair, so requests come
/// from a real non-loopback address (10.231.k.2) to ours (10.231.k.1). Removed on drop.
pub struct NetNs {
    pub name: String,
    veth: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = (std::process::id() % 200)
            + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let ns = NetNs {
            name: format!("hmt{k}"),
            veth: format!("hmv{k}"),
            host_ip: format!("10.231.{k}.1"),
            ns_ip: format!("10.231.{k}.2"),
        };
        ns.cleanup();
        let (a, b) = (format!("{}a", ns.veth), format!("{}b", ns.veth));
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.name.clone()],
            vec![
                "link".into(),
                "add".into(),
                a.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                b.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                b.clone(),
                "netns".into(),
                ns.name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{}/24", ns.host_ip),
                "dev".into(),
                a.clone(),
            ],
            vec!["link".into(), "set".into(), a.clone(), "up".into()],
            vec![
                "-n".into(),
                ns.name.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/24", ns.ns_ip),
                "dev".into(),
                b.clone(),
            ],
            vec![
                "-n".into(),
                ns.name.clone(),
                "link".into(),
                "set".into(),
                b,
                "up".into(),
            ],
            vec![
                "-n".into(),
                ns.name.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for s in steps {
            let out = Command::new("ip")
                .args(&s)
                .output()
                .expect("running ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {s:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ns
    }

    /// A command run inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn cleanup(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}a", self.veth)])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// An HTTP/2 connection over TLS (rustls, ring), trusting `ca_pem`, to 127.0.0.1:`port`
/// with SNI `host`. Returns the request sender and the server's leaf certificate (DER).
pub async fn h2_connect(
    port: u16,
    host: &str,
    ca_pem: &str,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    Vec<u8>,
) {
    let (send, leaf, _) = h2_connect_counted(port, host, ca_pem).await;
    (send, leaf)
}

/// `h2_connect`, also returning how many reads from the server have returned bytes (each
/// frame the server sends, PINGs included, is at least one).
pub async fn h2_connect_counted(
    port: u16,
    host: &str,
    ca_pem: &str,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    Vec<u8>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let (tls, leaf, reads) = h2_tls(port, host, ca_pem).await;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    (send, leaf, reads)
}

/// A client TLS connection, the server's leaf certificate, and a count of the reads that
/// returned bytes.
pub type TlsConn = (
    tokio_rustls::client::TlsStream<CountingReads<tokio::net::TcpStream>>,
    Vec<u8>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

/// A TLS connection negotiated for h2 (ALPN), for an HTTP/2 client of the test's choice;
/// with the server's leaf certificate and a count of reads that returned bytes.
pub async fn h2_tls(port: u16, host: &str, ca_pem: &str) -> TlsConn {
    tls_alpn(port, host, ca_pem, b"h2").await
}

/// `tls_alpn` with the client's end bound to `source` (any of 127/8 on loopback), so that one
/// test can be many client addresses.
pub async fn tls_alpn_from(
    source: std::net::IpAddr,
    port: u16,
    host: &str,
    ca_pem: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<CountingReads<tokio::net::TcpStream>> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::new(source, 0)).unwrap();
    let tcp = sock
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    tls_over(tcp, host, ca_pem, alpn).await.0
}

/// A TLS connection to `port` on loopback, verified against `ca_pem` for `host`, that
/// negotiated `alpn` (b"h2" or b"http/1.1").
pub async fn tls_alpn(port: u16, host: &str, ca_pem: &str, alpn: &[u8]) -> TlsConn {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tls_over(tcp, host, ca_pem, alpn).await
}

async fn tls_over(tcp: tokio::net::TcpStream, host: &str, ca_pem: &str, alpn: &[u8]) -> TlsConn {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tcp = CountingReads {
        inner: tcp,
        reads: reads.clone(),
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    (tls, leaf, reads)
}

/// A stream that counts the reads that returned bytes.
pub struct CountingReads<S> {
    inner: S,
    reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<S> CountingReads<S> {
    /// The stream underneath (to set socket options on it).
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingReads<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingReads<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Extra IPv6 addresses on `lo` (one /64 of fd00::/8, unique to this process), removed on
/// drop: two client addresses in one /64 without a second host.
pub struct LoopbackV6 {
    pub prefix: String,
    added: Vec<String>,
}

impl LoopbackV6 {
    /// Adds `<prefix>::<host>` for each of `hosts`.
    pub fn new(hosts: &[u16]) -> LoopbackV6 {
        let pid = std::process::id();
        let prefix = format!("fd00:686d:{:x}:{:x}", pid >> 16, pid & 0xffff);
        let mut lo = LoopbackV6 {
            prefix,
            added: vec![],
        };
        for h in hosts {
            let a = format!("{}::{h:x}/64", lo.prefix);
            let out = Command::new("ip")
                .args(["-6", "addr", "add", &a, "dev", "lo", "nodad"])
                .output()
                .expect("running ip (iproute2)");
            assert!(
                out.status.success(),
                "ip -6 addr add {a}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            lo.added.push(a);
        }
        lo
    }

    pub fn addr(&self, host: u16) -> std::net::Ipv6Addr {
        format!("{}::{host:x}", self.prefix).parse().unwrap()
    }
}

impl Drop for LoopbackV6 {
    fn drop(&mut self) {
        for a in &self.added {
            let _ = Command::new("ip")
                .args(["-6", "addr", "del", a, "dev", "lo"])
                .output();
        }
    }
}

/// A throwaway certificate authority for tests, and leaves it signs.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(common_name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Not rcgen's default name: a leaf with the same subject would look self-signed.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names, or IP addresses), as (certificate PEM, key PEM).
    pub fn leaf(&self, names: &[String]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(names.to_vec()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        (
            p.signed_by(&key, &self.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }
}

impl Lab {
    /// The HTTP status of a GET through this lab's names, trusting `ca`; curl's error if none.
    pub fn https_code(&self, ca: &Path, url: &str) -> String {
        let out = self
            .curl()
            .args(["-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(ca)
            .arg(url)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// Packet-filter rules for one test, in their own nftables table (removed on drop), so that a
/// test can close a port or block a range as a firewall in front of the host would.
pub struct Firewall {
    table: String,
    /// The network namespace whose firewall this is (None: this test's own).
    netns: Option<String>,
}

impl Firewall {
    /// `rules`: nft rule bodies for an input-hook chain, e.g. `ip daddr 127.0.0.1 udp dport
    /// 10000-10019 drop`.
    pub fn new(rules: &[String]) -> Firewall {
        Firewall::new_in(None, rules)
    }

    /// `Firewall::new` in network namespace `netns`.
    pub fn new_in(netns: Option<&str>, rules: &[String]) -> Firewall {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let fw = Firewall {
            table: format!(
                "hmtest{}_{}",
                std::process::id(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            netns: netns.map(str::to_string),
        };
        let mut script = format!(
            "table inet {t} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n",
            t = fw.table
        );
        for r in rules {
            script.push_str(&format!("  {r}\n"));
        }
        script.push_str(" }\n}\n");
        let mut child = fw
            .nft()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running nft (apt install nftables)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft -f: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
        fw
    }
}

impl Firewall {
    fn nft(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => Command::new("nft"),
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = self
            .nft()
            .args(["delete", "table", "inet", &self.table])
            .output();
    }
}

/// A DNS server for one test (dnsmasq on 127.0.0.1, its own port): authoritative for `.test`
/// (unknown names there are NXDOMAIN), answering only the records given. Stopped on drop.
pub struct Dns {
    pub addr: std::net::SocketAddr,
    child: Child,
}

impl Dns {
    pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

    /// `srv`: dnsmasq `--srv-host` values, `_service._proto.name,target,port`.
    pub fn start(srv: &[String]) -> Dns {
        let port = free_port();
        let mut c = Command::new(Self::DNSMASQ);
        c.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
            "--local=/test/",
        ])
        .arg(format!("--port={port}"));
        for s in srv {
            c.arg(format!("--srv-host={s}"));
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running dnsmasq (apt install dnsmasq-base)");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // Listening once our own bind of the port fails.
        wait_until("dnsmasq listening", Duration::from_secs(10), || {
            std::net::UdpSocket::bind(addr).is_err()
        });
        Dns { addr, child }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small tmpfs mounted over `path` (e.g. a store, to make its disk full), unmounted on drop.
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    pub fn new(path: &Path, size: &str) -> TmpfsMount {
        fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(st.success(), "mounting a tmpfs on {}", path.display());
        TmpfsMount {
            path: path.to_path_buf(),
        }
    }

    /// Writes zeros into `name` until the file system is full.
    pub fn fill(&self, name: &str) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.path.join(name).display()))
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// A loopback address of this test process's own (127.0.x.`host`), where a lab can listen on
/// the standard ports clients assume without colliding with other processes' labs: server
/// discovery (`https://<server_name>/.well-known/matrix/client`, Matrix spec client-server API
/// "Server Discovery") has no port, so it needs 443. Tests in one process pick distinct hosts.
pub fn own_loopback(host: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, (std::process::id() % 250) as u8 + 2, host)
}

impl Lab {
    /// Puts this lab's https listener on `ip`:443 (the other listeners on `ip` at their
    /// ports), as `write_config_on` with `extra`.
    pub fn write_config_on_443(&mut self, ip: std::net::Ipv4Addr, extra: &str) {
        self.https_port = 443;
        self.write_config_on(&ip.to_string(), extra);
    }
}

/// Prints the last lines of a log when the test panics (dropped while unwinding).
pub struct LogOnPanic(pub PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = fs::read_to_string(&self.0).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- the last lines of {} ---\n{}",
                self.0.display(),
                lines[lines.len().saturating_sub(120)..].join("\n")
            );
        }
    }
}
