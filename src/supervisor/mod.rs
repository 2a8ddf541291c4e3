//! Supervises long-running children (Synapse, later coturn) and runs one-shot helpers.
//!
//! Each child gets a task running its life cycle: spawn, wait for readiness, wait for exit,
//! back off, spawn again, until it is told to stop. Stop is the child's stop signal to its
//! process group, then SIGKILL after the grace period.

pub mod backoff;
pub mod output;
pub mod process;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use backoff::BackoffPolicy;
pub use process::{Command, Exit, RunAs};

/// How the supervisor knows a child is up.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// As soon as it is spawned.
    Spawned,
    /// An HTTP GET on 127.0.0.1 answers 200 (Synapse's `/health`).
    HttpGet { port: u16, path: String },
    /// A TCP connection to 127.0.0.1 succeeds on every one of `ports` (coturn's listeners:
    /// it opens its plain and TLS ones one after the other, and a check of the first alone
    /// let the doctor find the TLS one still closed).
    TcpConnect { ports: Vec<u16> },
    /// A command exits 0 (Redis: `redis-cli ping` on its socket). It runs as an unprivileged
    /// user of the spec's choosing, so root never connects to a socket in a directory a child
    /// can change.
    Command(Command),
}

/// Everything the supervisor needs to know to run a child.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub name: String,
    pub command: Command,
    pub readiness: Readiness,
    /// Give up on a start that is not ready by then: kill it and back off.
    pub ready_timeout: Duration,
    pub stop_signal: Signal,
    pub grace: Duration,
    pub backoff: BackoffPolicy,
    /// Set while the child is ready, cleared the moment it is not (before `status` says so):
    /// the front door reads it to route around a worker that is restarting.
    pub up: Option<Arc<AtomicBool>>,
}

/// Failures in a row (without a healthy run between) that make a crash loop.
pub const CRASH_LOOP_FAILURES: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Starting,
    Running,
    Backoff,
    Stopping,
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChildStatus {
    pub name: String,
    pub state: State,
    pub user: String,
    pub pid: Option<i32>,
    /// Seconds since the current process started.
    pub uptime_secs: Option<u64>,
    /// Unix time the current process started.
    pub started_at: Option<u64>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub crash_loop: bool,
    /// Seconds until the next start while backing off.
    pub next_start_in_secs: Option<u64>,
}

struct Shared {
    status: ChildStatus,
    started: Option<Instant>,
    next_start: Option<Instant>,
}

/// A supervised child. Dropping it does not stop the child; call `stop`.
pub struct Child {
    name: String,
    shared: Arc<Mutex<Shared>>,
    ready: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Child {
    /// Starts supervising `spec` and returns at once.
    pub fn start(spec: ChildSpec) -> Arc<Child> {
        let user = spec
            .command
            .run_as
            .as_ref()
            .map_or_else(|| "root".to_string(), |r| r.user.clone());
        let shared = Arc::new(Mutex::new(Shared {
            status: ChildStatus {
                name: spec.name.clone(),
                state: State::Starting,
                user,
                pid: None,
                uptime_secs: None,
                started_at: None,
                restarts: 0,
                last_exit: None,
                crash_loop: false,
                next_start_in_secs: None,
            },
            started: None,
            next_start: None,
        }));
        let (ready_tx, ready) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(life_cycle(spec.clone(), shared.clone(), ready_tx, stop_rx));
        Arc::new(Child {
            name: spec.name,
            shared,
            ready,
            stop,
            task: Mutex::new(Some(task)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn status(&self) -> ChildStatus {
        let s = self.shared.lock().unwrap();
        let mut st = s.status.clone();
        st.uptime_secs = s.started.map(|t| t.elapsed().as_secs());
        st.next_start_in_secs = s
            .next_start
            .map(|t| t.saturating_duration_since(Instant::now()).as_secs());
        st
    }

    /// Waits until the child is ready (it may take several starts). Errors after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let mut rx = self.ready.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .with_context(|| {
                let st = self.status();
                format!(
                    "{} was not ready after {}s (state {:?}, {} restarts, last exit: {}); its log lines above say why",
                    self.name,
                    timeout.as_secs(),
                    st.state,
                    st.restarts,
                    st.last_exit.as_deref().unwrap_or("none")
                )
            })?
            .map(|_| ())
            .map_err(|_| anyhow::anyhow!("{} stopped before it was ready", self.name))
    }

    /// Sends `sig` to the running process (not its group), e.g. SIGUSR2 for coturn to reload
    /// its certificate. Returns whether there was a process to signal.
    pub fn signal(&self, sig: Signal) -> bool {
        let pid = self.shared.lock().unwrap().status.pid;
        match pid {
            Some(p) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig).is_ok(),
            None => false,
        }
    }

    /// Stops the child (stop signal, then SIGKILL after the grace period) and waits for it.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn life_cycle(
    spec: ChildSpec,
    shared: Arc<Mutex<Shared>>,
    ready_tx: watch::Sender<bool>,
    mut stop_rx: watch::Receiver<bool>,
) {
    let mut backoff = backoff::Backoff::new(spec.backoff);
    let set = |f: &dyn Fn(&mut Shared)| f(&mut shared.lock().unwrap());
    loop {
        if *stop_rx.borrow() {
            break;
        }
        set(&|s| {
            s.status.state = State::Starting;
            s.next_start = None;
        });
        let t0 = Instant::now();
        let outcome = match process::spawn(spec.command.clone()).await {
            Err(e) => {
                tracing::error!(child = %spec.name, "{e}");
                set(&|s| s.status.last_exit = Some(format!("failed to start: {e}")));
                None
            }
            Ok(mut child) => {
                let pid = child.pid;
                tracing::info!(child = %spec.name, pid = pid.as_raw(), "started");
                set(&|s| {
                    s.status.pid = Some(pid.as_raw());
                    s.status.started_at = Some(now_unix());
                    s.started = Some(t0);
                });
                forward_output(&spec.name, &mut child);
                enum Step {
                    Exited(Exit),
                    Ready,
                    NotReady,
                    Stop,
                    Lost,
                }
                let step = tokio::select! {
                    exit = &mut child.exit => exit.map_or(Step::Lost, Step::Exited),
                    ok = probe(&spec.readiness, spec.ready_timeout) => if ok { Step::Ready } else { Step::NotReady },
                    _ = stop_rx.wait_for(|s| *s) => Step::Stop,
                };
                let step = match step {
                    Step::Ready => {
                        tracing::info!(child = %spec.name, after_ms = t0.elapsed().as_millis() as u64, "ready");
                        set(&|s| s.status.state = State::Running);
                        let _ = ready_tx.send(true);
                        if let Some(up) = &spec.up {
                            up.store(true, Ordering::Relaxed);
                        }
                        let next = tokio::select! {
                            exit = &mut child.exit => exit.map_or(Step::Lost, Step::Exited),
                            _ = stop_rx.wait_for(|s| *s) => Step::Stop,
                        };
                        if let Some(up) = &spec.up {
                            up.store(false, Ordering::Relaxed);
                        }
                        next
                    }
                    other => other,
                };
                match step {
                    Step::Stop => {
                        stop_child(&spec, &shared, &mut child).await;
                        break;
                    }
                    Step::NotReady => {
                        tracing::error!(child = %spec.name, timeout_s = spec.ready_timeout.as_secs(), "not ready in time; stopping it to try again");
                        Some(stop_child(&spec, &shared, &mut child).await)
                    }
                    Step::Exited(e) => {
                        // Leftovers of the child's group (its own helpers) must not outlive it.
                        process::signal_group(pid, Signal::SIGKILL);
                        Some(e)
                    }
                    Step::Lost | Step::Ready => None,
                }
            }
        };
        let _ = ready_tx.send(false);
        let uptime = t0.elapsed();
        let delay = backoff.on_exit(uptime);
        let failures = backoff.failures();
        let exit_text = outcome.map(|e| e.to_string());
        set(&|s| {
            s.status.state = State::Backoff;
            s.status.pid = None;
            s.started = None;
            s.status.restarts += 1;
            if let Some(e) = &exit_text {
                s.status.last_exit = Some(e.clone());
            }
            s.status.crash_loop = failures >= CRASH_LOOP_FAILURES;
            s.next_start = Some(Instant::now() + delay);
        });
        let last = exit_text.as_deref().unwrap_or("did not start");
        if failures >= CRASH_LOOP_FAILURES {
            tracing::error!(child = %spec.name, failures, "crash loop: {failures} failed runs in a row (last: {last}); next try in {:.1}s. Its log lines above say why.", delay.as_secs_f64());
        } else {
            tracing::warn!(child = %spec.name, uptime_s = uptime.as_secs(), "exited unexpectedly ({last}); restarting in {:.1}s", delay.as_secs_f64());
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_rx.wait_for(|s| *s) => break,
        }
    }
    set(&|s| {
        s.status.state = State::Stopped;
        s.status.pid = None;
        s.started = None;
        s.next_start = None;
    });
}

/// Sends the stop signal to the child's group, waits up to the grace period, then SIGKILLs.
async fn stop_child(
    spec: &ChildSpec,
    shared: &Mutex<Shared>,
    child: &mut process::Spawned,
) -> Exit {
    shared.lock().unwrap().status.state = State::Stopping;
    tracing::info!(child = %spec.name, signal = spec.stop_signal.as_str(), "stopping");
    child.signal(spec.stop_signal);
    let exit = match tokio::time::timeout(spec.grace, &mut child.exit).await {
        Ok(Ok(e)) => e,
        Ok(Err(_)) => Exit::Signal(Signal::SIGKILL),
        Err(_) => {
            tracing::warn!(child = %spec.name, grace_s = spec.grace.as_secs(), "did not stop within the grace period; killing it");
            child.signal(Signal::SIGKILL);
            (&mut child.exit)
                .await
                .unwrap_or(Exit::Signal(Signal::SIGKILL))
        }
    };
    // Whatever else is left in its process group goes too.
    child.signal(Signal::SIGKILL);
    tracing::info!(child = %spec.name, %exit, "stopped");
    shared.lock().unwrap().status.last_exit = Some(exit.to_string());
    exit
}

/// Resolves to true once ready, false at the timeout. Never resolves early otherwise.
async fn probe(r: &Readiness, timeout: Duration) -> bool {
    match r {
        Readiness::Spawned => true,
        Readiness::HttpGet { port, path } => {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if http_get_ok(*port, path).await {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        }
        Readiness::TcpConnect { ports } => {
            let deadline = Instant::now() + timeout;
            let mut open = 0;
            while Instant::now() < deadline {
                // A port that answered once is not asked again (each ask is a log line in coturn).
                while let Some(port) = ports.get(open) {
                    if TcpStream::connect(("127.0.0.1", *port)).await.is_err() {
                        break;
                    }
                    open += 1;
                }
                if open == ports.len() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
        Readiness::Command(cmd) => {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                let ask = run_helper(cmd.clone(), b"", Duration::from_secs(5));
                if ask.await.is_ok_and(|o| o.exit.success()) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        }
    }
}

/// A bare HTTP/1.0 GET on loopback: the probe must not depend on the proxy stack it guards.
pub async fn http_get_ok(port: u16, path: &str) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        Some(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Each line a child writes becomes a tracing event with `child=<name>`, so journald can
/// filter by child. Python logging's level names map to tracing levels. The pipes are read as
/// bytes to EOF (`output::forward`): invalid UTF-8 or an endless line never ends the reading.
/// Secrets in URLs (a registration token in a query string) are redacted first (`output::redact_secrets`).
fn forward_output(name: &str, child: &mut process::Spawned) {
    let (out, err) = (
        std::mem::replace(&mut child.stdout, dummy_pipe()),
        std::mem::replace(&mut child.stderr, dummy_pipe()),
    );
    for pipe in [out, err] {
        let name = name.to_string();
        tokio::spawn(async move {
            output::forward(pipe, |line, cut| {
                if cut {
                    log_child_line(&name, &format!("{line}{}", output::CUT_MARKER));
                } else {
                    log_child_line(&name, line);
                }
            })
            .await;
        });
    }
}

fn dummy_pipe() -> tokio::net::unix::pipe::Receiver {
    let (_tx, rx) = tokio::net::unix::pipe::pipe().expect("creating a pipe");
    rx
}

fn log_child_line(name: &str, line: &str) {
    let line = &*output::redact_secrets(line);
    match child_line_level(line) {
        tracing::Level::ERROR => tracing::error!(target: "child", child = %name, "{line}"),
        tracing::Level::WARN => tracing::warn!(target: "child", child = %name, "{line}"),
        tracing::Level::DEBUG | tracing::Level::TRACE => {
            tracing::debug!(target: "child", child = %name, "{line}")
        }
        tracing::Level::INFO => tracing::info!(target: "child", child = %name, "{line}"),
    }
}

/// Synapse logs its start banner at WARNING so that it shows at any log level
/// (synapse/config/logger.py, `setup_logging`); it is news, not a problem.
const SYNAPSE_BANNER: [&str; 4] = [
    "***** STARTING SERVER *****",
    "Server ",
    "Copyright (c)",
    "Licensed under the AGPL",
];

/// The level of one line of a child's output. A Python logging line (Synapse's format,
/// `%(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s`, maybe after a
/// timestamp) carries its level after the line number; anything else is info.
fn child_line_level(line: &str) -> tracing::Level {
    use tracing::Level;
    let fields: Vec<&str> = line.splitn(6, " - ").collect();
    let Some(i) = (1..fields.len().saturating_sub(1)).find(|&i| {
        fields[i].parse::<u32>().is_ok()
            && matches!(
                fields[i + 1],
                "CRITICAL" | "ERROR" | "WARNING" | "INFO" | "DEBUG"
            )
    }) else {
        return Level::INFO;
    };
    let (logger, level) = (fields[i - 1], fields[i + 1]);
    let message = fields.last().copied().unwrap_or("");
    match level {
        "CRITICAL" | "ERROR" => Level::ERROR,
        "WARNING"
            if logger == "synapse.config.logger"
                && SYNAPSE_BANNER.iter().any(|b| message.starts_with(b)) =>
        {
            Level::INFO
        }
        "WARNING" => Level::WARN,
        "DEBUG" => Level::DEBUG,
        _ => Level::INFO,
    }
}

/// What a one-shot helper printed, and how it ended.
#[derive(Debug)]
pub struct Output {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs a one-shot command (apt, dpkg, systemctl, pg_upgradecluster) with no input; what it
/// said (stdout, then stderr), or an error naming `what` with all of it.
pub async fn run_checked(cmd: Command, what: &str, timeout: Duration) -> Result<String> {
    let out = run_helper(cmd, b"", timeout).await?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.exit.success() {
        anyhow::bail!("{what} failed ({}):\n{}", out.exit, said.trim_end());
    }
    Ok(said)
}

/// Runs a one-shot helper to completion through the process layer, feeding it `input` on stdin.
/// Killed (with its group) after `timeout`.
pub async fn run_helper(cmd: Command, input: &[u8], timeout: Duration) -> Result<Output> {
    let mut stdout = vec![];
    let input = std::io::Cursor::new(input.to_vec());
    let (exit, stderr) = run_helper_io(cmd, Some(input), &mut stdout, timeout).await?;
    Ok(Output {
        exit,
        stdout,
        stderr,
    })
}

/// Like [`run_helper`], streaming: stdin is copied from `input` (none: no stdin pipe) and stdout
/// into `stdout`, so a helper's output (a database dump) need not fit in memory. Returns the
/// exit and what it printed on stderr.
pub async fn run_helper_io<R, W>(
    mut cmd: Command,
    input: Option<R>,
    stdout: &mut W,
    timeout: Duration,
) -> Result<(Exit, Vec<u8>)>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + ?Sized,
{
    let program = cmd.program.clone();
    cmd.stdin = input.is_some();
    let mut child = process::spawn(cmd).await?;
    let writer = match (child.stdin.take(), input) {
        (Some(mut stdin), Some(mut input)) => Some(tokio::spawn(async move {
            let _ = tokio::io::copy(&mut input, &mut stdin).await;
            // Dropping stdin closes it: the helper sees EOF.
        })),
        _ => None,
    };
    let mut out = std::mem::replace(&mut child.stdout, dummy_pipe());
    let err = read_all(std::mem::replace(&mut child.stderr, dummy_pipe()));
    let run = async {
        let copy = async {
            let r = tokio::io::copy(&mut out, stdout).await;
            // Drain the rest so the helper is never blocked on a full pipe.
            let _ = read_all(&mut out).await;
            r
        };
        let (copied, e) = tokio::join!(copy, err);
        let exit = (&mut child.exit).await;
        (copied, e, exit)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((copied, stderr, Ok(exit))) => {
            if let Some(w) = writer {
                let _ = w.await;
            }
            copied.with_context(|| format!("keeping the output of {}", program.display()))?;
            Ok((exit, stderr))
        }
        Ok((_, _, Err(_))) => bail!("lost track of {}", program.display()),
        Err(_) => {
            child.signal(Signal::SIGKILL);
            bail!(
                "{} did not finish within {}s and was killed",
                program.display(),
                timeout.as_secs()
            )
        }
    }
}

async fn read_all(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut v = vec![];
    let _ = r.read_to_end(&mut v).await;
    v
}

/// The running supervisor's children, in start order (stopped in reverse).
#[derive(Default)]
pub struct Supervisor {
    children: Mutex<Vec<Arc<Child>>>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    pub fn start(&self, spec: ChildSpec) -> Arc<Child> {
        let c = Child::start(spec);
        self.children.lock().unwrap().push(c.clone());
        c
    }

    /// Stops `old` and starts `spec` in its place (same position in the stop order).
    pub async fn replace(&self, old: &Arc<Child>, spec: ChildSpec) -> Arc<Child> {
        old.stop().await;
        let fresh = Child::start(spec);
        let mut children = self.children.lock().unwrap();
        match children.iter().position(|c| Arc::ptr_eq(c, old)) {
            Some(i) => children[i] = fresh.clone(),
            None => children.push(fresh.clone()),
        }
        fresh
    }

    pub fn status(&self) -> Vec<ChildStatus> {
        self.children
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.status())
            .collect()
    }

    /// Stops every child, last started first (coturn before Synapse, Synapse before nothing).
    pub async fn shutdown(&self) {
        let children: Vec<Arc<Child>> = self.children.lock().unwrap().drain(..).rev().collect();
        for c in children {
            c.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::child_line_level;
    use tracing::Level;

    #[test]
    fn python_levels_map_and_the_synapse_banner_is_news() {
        let l = |s: &str| child_line_level(s);
        assert_eq!(
            l("synapse.storage - 12 - WARNING - main - slow query"),
            Level::WARN
        );
        assert_eq!(
            l("2026-01-01 - synapse.x - 1 - ERROR - GET-1 - boom"),
            Level::ERROR
        );
        assert_eq!(l("twisted - 3 - CRITICAL - - down"), Level::ERROR);
        assert_eq!(l("synapse.http - 7 - DEBUG - - details"), Level::DEBUG);
        assert_eq!(
            l("synapse.http - 7 - INFO - - said - WARNING - here"),
            Level::INFO
        );
        // Not Python's format, or a level word in the message only: info.
        assert_eq!(l("0: : WARNING: coturn says"), Level::INFO);
        assert_eq!(
            l("Traceback (most recent call last): - ERROR - x"),
            Level::INFO
        );
        for banner in [
            "***** STARTING SERVER *****",
            "Server /opt/venvs/matrix-synapse/lib/python3.11/site-packages/synapse/app/homeserver.py version 1.163.2",
            "Copyright (c) 2023 New Vector, Inc",
            "Licensed under the AGPL 3.0 license. Website: https://github.com/element-hq/synapse",
        ] {
            let line = format!("synapse.config.logger - 377 - WARNING - main - {banner}");
            assert_eq!(l(&line), Level::INFO, "{line}");
        }
        assert_eq!(
            l("synapse.config.logger - 318 - WARNING - main - Loaded a blank logging config?"),
            Level::WARN
        );
    }

    #[tokio::test]
    async fn a_tcp_probe_waits_for_every_port() {
        use super::{Readiness, probe};
        use std::time::Duration;
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // A port taken and let go: closed, as coturn's TLS one is before it opens.
        let second = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port2 = second.local_addr().unwrap().port();
        drop(second);
        let r = Readiness::TcpConnect {
            ports: vec![first.local_addr().unwrap().port(), port2],
        };
        assert!(!probe(&r, Duration::from_millis(400)).await);
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::net::TcpListener::bind(("127.0.0.1", port2)).unwrap()
        });
        assert!(probe(&r, Duration::from_secs(5)).await);
        drop(later.await.unwrap());
    }

    #[tokio::test]
    async fn a_command_probe_waits_for_the_command_to_succeed() {
        use super::{Command, Readiness, probe};
        use std::time::Duration;
        let dir = std::env::temp_dir().join(format!("probe-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let r = Readiness::Command(
            Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("test -e {}", dir.display())),
        );
        assert!(!probe(&r, Duration::from_millis(500)).await);
        let flag = dir.clone();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(flag, b"").unwrap();
        });
        assert!(probe(&r, Duration::from_secs(5)).await);
        later.await.unwrap();
        std::fs::remove_file(&dir).unwrap();
    }
}
