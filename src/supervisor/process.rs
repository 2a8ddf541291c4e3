//! The only place in homelab-matrix that creates or reaps processes.
//!
//! Two dedicated OS threads, started once per process:
//! - the *spawner* forks every child. `PR_SET_PDEATHSIG` fires when the thread that forked a
//!   child exits (prctl(2)), so forking from a tokio worker, which may exit, would kill children
//!   at random; this thread lives as long as the process.
//! - the *reaper* is the one owner of `waitpid`. Linux keeps one pool of exit statuses per parent,
//!   so a second waiter (tokio's `process` feature, `Child::wait`) would steal statuses; that
//!   feature is not enabled and `clippy.toml` forbids the std waits.
//!
//! The two share `TABLE`'s lock: the spawner holds it across `fork` and the insertion of the pid,
//! so a child that exits at once cannot be reaped before it is known, and std's own wait after a
//! failed `exec` cannot race the reaper.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{Gid, Pid, Uid};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

/// The identity a child runs as, resolved in the parent before forking: after `fork` in a
/// threaded process only async-signal-safe calls are allowed, and `getpwnam` is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub home: PathBuf,
}

impl RunAs {
    /// This identity as the owner of files made for it.
    pub fn owner(&self) -> crate::fsutil::Owner {
        crate::fsutil::Owner {
            uid: self.uid,
            gid: self.gid,
        }
    }

    pub fn lookup(user: &str) -> anyhow::Result<RunAs> {
        use anyhow::Context;
        let u = nix::unistd::User::from_name(user)
            .with_context(|| format!("looking up system user {user}"))?
            .with_context(|| {
                format!(
                    "system user {user:?} does not exist; create it with: adduser --system --group --no-create-home {user}"
                )
            })?;
        let cname = std::ffi::CString::new(user)?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid)
            .with_context(|| format!("reading the groups of {user}"))?;
        Ok(RunAs {
            user: user.to_string(),
            uid: u.uid,
            gid: u.gid,
            groups,
            home: u.dir,
        })
    }
}

/// What to run. The environment is exactly `env`: nothing leaks in from root's.
#[derive(Debug, Clone)]
pub struct Command {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub run_as: Option<RunAs>,
    /// Give the child a stdin pipe (one-shot helpers read their request from it).
    pub stdin: bool,
}

impl Command {
    pub fn new(program: impl Into<PathBuf>) -> Command {
        Command {
            program: program.into(),
            args: vec![],
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            cwd: PathBuf::from("/"),
            run_as: None,
            stdin: false,
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Command {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Command {
        let k = k.into();
        self.env.retain(|(old, _)| *old != k);
        self.env.push((k, v.into()));
        self
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by {}", s.as_str()),
        }
    }
}

/// A running child: its pid (also its process group), its pipes, and its exit to come.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub stdin: Option<pipe::Sender>,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
    pub exit: oneshot::Receiver<Exit>,
}

impl Spawned {
    /// Signals the child's whole process group (it is a session leader), so helpers it started
    /// get the signal too.
    pub fn signal(&self, sig: Signal) {
        signal_group(self.pid, sig);
    }
}

pub fn signal_group(pid: Pid, sig: Signal) {
    match killpg(pid, sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pid = pid.as_raw(), "signalling process group: {e}"),
    }
}

struct RawSpawned {
    pid: Pid,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    exit: oneshot::Receiver<Exit>,
}

type Request = (Command, oneshot::Sender<io::Result<RawSpawned>>);

struct Layer {
    requests: Mutex<mpsc::Sender<Request>>,
}

/// pid -> where its exit goes. Its lock is the spawn lock.
static TABLE: Mutex<Option<HashMap<Pid, oneshot::Sender<Exit>>>> = Mutex::new(None);
static LAYER: OnceLock<Layer> = OnceLock::new();

fn layer() -> &'static Layer {
    LAYER.get_or_init(|| {
        // Orphans of our children (daemonized grandchildren) are re-parented to us, not to
        // PID 1, so the reaper collects them and nothing lingers as a zombie.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!("could not become a child subreaper: {e}");
        }
        *TABLE.lock().unwrap() = Some(HashMap::new());
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("hm-spawner".into())
            .spawn(move || {
                for (cmd, reply) in rx {
                    let _ = reply.send(spawn_locked(cmd));
                }
            })
            .expect("starting the spawner thread");
        std::thread::Builder::new()
            .name("hm-reaper".into())
            .spawn(reaper)
            .expect("starting the reaper thread");
        Layer {
            requests: Mutex::new(tx),
        }
    })
}

/// Starts a child. Must be called inside a tokio runtime (the pipes register with its reactor).
pub async fn spawn(cmd: Command) -> io::Result<Spawned> {
    let (tx, rx) = oneshot::channel();
    layer()
        .requests
        .lock()
        .unwrap()
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    let raw = rx
        .await
        .map_err(|_| io::Error::other("spawner thread is gone"))??;
    Ok(Spawned {
        pid: raw.pid,
        stdin: raw
            .stdin
            .map(|fd| pipe::Sender::from_file(File::from(fd)))
            .transpose()?,
        stdout: pipe::Receiver::from_file(File::from(raw.stdout))?,
        stderr: pipe::Receiver::from_file(File::from(raw.stderr))?,
        exit: raw.exit,
    })
}

fn spawn_locked(cmd: Command) -> io::Result<RawSpawned> {
    let mut c = std::process::Command::new(&cmd.program);
    c.args(&cmd.args)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cmd.cwd)
        .stdin(if cmd.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let run_as = cmd.run_as.clone();
    let nofile = crate::fdlimit::for_children();
    // Highest descriptor to look at when close_range(2) is refused (an old kernel, a filter).
    let max_fd = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft.min(1 << 20)) as i32;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec and makes only raw, async-signal-safe
    // syscalls (setsid, close_range/fcntl, setrlimit, setgroups, setgid, setuid, prctl, getppid, _exit); everything it needs
    // was resolved above, before the fork.
    unsafe {
        c.pre_exec(move || {
            // Own session and process group: a signal to the group reaches the child's helpers,
            // and a Ctrl-C on the supervisor's terminal does not hit the children directly.
            nix::unistd::setsid().map_err(io::Error::from)?;
            // Only stdio crosses to a child. Our own descriptors are close-on-exec already,
            // but not what the supervisor inherited without it (from whoever started it, e.g.
            // a build tool's jobserver pipe): those are marked now, not closed, so that std's
            // exec-error pipe still works (close_range(2), CLOSE_RANGE_CLOEXEC, Linux 5.11).
            // Plain syscalls on descriptor numbers; one that is not open fails with EBADF.
            let marked = nix::libc::syscall(
                nix::libc::SYS_close_range,
                3u32,
                u32::MAX,
                nix::libc::CLOSE_RANGE_CLOEXEC,
            );
            if marked != 0 {
                for fd in 3..max_fd {
                    nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
                }
            }
            // The open-file limit the supervisor started with, not the one it raised for
            // its own connections (see `fdlimit`).
            if let Some((soft, hard)) = nofile {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    soft,
                    hard,
                )
                .map_err(io::Error::from)?;
            }
            if let Some(r) = &run_as {
                // Order matters: setgroups and setgid need privileges that setuid gives up.
                // std's own Command::uid/gid would clear the supplementary groups instead.
                nix::unistd::setgroups(&r.groups).map_err(io::Error::from)?;
                nix::unistd::setgid(r.gid).map_err(io::Error::from)?;
                nix::unistd::setuid(r.uid).map_err(io::Error::from)?;
            }
            // No set-uid/set-gid binary or file capability can raise what the child holds:
            // a compromised child stays what it was started as (prctl(2), PR_SET_NO_NEW_PRIVS;
            // inherited across fork and execve, never unset).
            nix::sys::prctl::set_no_new_privs().map_err(io::Error::from)?;
            // After setuid: a credential change clears the parent-death signal (prctl(2)).
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The supervisor may have died between fork and prctl; then no signal will come.
            if nix::unistd::getppid() != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut table = TABLE.lock().unwrap();
    let mut child = c.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", cmd.program.display()),
        )
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, exit) = oneshot::channel();
    table.as_mut().expect("table initialised").insert(pid, tx);
    drop(table);
    let stdin = child.stdin.take().map(OwnedFd::from);
    let stdout = OwnedFd::from(child.stdout.take().expect("stdout is piped"));
    let stderr = OwnedFd::from(child.stderr.take().expect("stderr is piped"));
    // Dropping std's Child neither kills nor waits: the reaper owns the exit.
    drop(child);
    Ok(RawSpawned {
        pid,
        stdin,
        stdout,
        stderr,
        exit,
    })
}

fn reaper() {
    loop {
        // Sleep in the kernel until some child is a zombie, without reaping it (WNOWAIT),
        // then reap everything ready under the spawn lock.
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => {}
            Err(Errno::ECHILD) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("waitid failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let mut table = TABLE.lock().unwrap();
        let table = table.as_mut().expect("table initialised");
        loop {
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("waitpid failed: {e}");
                    break;
                }
            };
            match table.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => tracing::debug!(pid = pid.as_raw(), %exit, "reaped an orphaned process"),
            }
        }
    }
}
