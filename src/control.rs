//! The control socket (DESIGN.md §1): root-only, one request line in, one JSON line out.
//! `status` reports the children; `reload` does what SIGHUP does and answers what it did.
//! Root only twice over: the socket file is 0600 from the moment it can be reached (`bind`),
//! and each client's kernel-reported uid is checked (`answer`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::fsutil::{Owner, ensure_dir};

/// Requests the app acts on.
#[derive(Debug)]
pub enum Request {
    /// `reload`: what SIGHUP does; the answer is the report of what was re-applied.
    Reload {
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// `element update [--check]`; the answer is a JSON outcome or `{"error": ...}`.
    ElementUpdate {
        check_only: bool,
        reply: oneshot::Sender<serde_json::Value>,
    },
    ElementRollback {
        reply: oneshot::Sender<serde_json::Value>,
    },
}

/// The service's status as JSON: what it holds is the app's to say, so this socket knows no
/// feature module.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Binds the socket (replacing a stale one) so that it is never reachable with a mode looser
/// than 0600. A unix socket's file gets its mode at bind(2) from the umask, and fchmod(2) on
/// the socket descriptor does not touch that file; changing the umask is process-wide and
/// races other threads creating files. So the socket is bound inside a fresh 0700 directory
/// of root's, where no one else can reach it, given mode 0600 there, and only then renamed
/// into place: rename(2) is atomic, so `path` holds the stale socket or the finished one.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let dir = path
        .parent()
        .context("control socket path has no directory")?;
    let name = path
        .file_name()
        .context("control socket path has no file name")?;
    // 0755 and root's: no one else may replace the socket (a fake one would see root's
    // requests).
    ensure_dir(dir, Owner::root(), 0o755)?;
    let private = tempfile::Builder::new()
        .prefix(".control-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)
        .with_context(|| format!("creating a private directory in {}", dir.display()))?;
    let staged = private.path().join(name);
    let listener =
        UnixListener::bind(&staged).with_context(|| format!("binding {}", staged.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("changing mode of {}", staged.display()))?;
    std::fs::rename(&staged, path).with_context(|| {
        format!(
            "moving the control socket into place at {}; remove what is there if it is not a socket",
            path.display()
        )
    })?;
    Ok(listener)
}

pub use crate::fdlimit::AcceptBackoff;

/// Logs at most one refusal a minute: a local user knocking in a loop must not fill the journal.
fn log_refusal(uid: u32, pid: Option<i32>) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap();
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
        *last = Some(Instant::now());
        tracing::warn!(
            uid,
            pid,
            "refused a control socket client that is not root (further refusals this minute are not logged)"
        );
    }
}

/// Answers requests until the task is dropped.
pub async fn serve(listener: UnixListener, status: StatusFn, requests: mpsc::Sender<Request>) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.recovered("the control socket");
                stream
            }
            Err(e) => {
                backoff.pause("the control socket", &e).await;
                continue;
            }
        };
        let status = status.clone();
        let requests = requests.clone();
        tokio::spawn(answer(stream, status, requests));
    }
}

/// How long a client gets to send its request line: a silent one must not hold a task and a
/// descriptor forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection: root only (SO_PEERCRED, unix(7): the credentials of the process that
/// connected, which the client cannot forge), one request line, one JSON line back.
async fn answer(stream: UnixStream, status: StatusFn, requests: mpsc::Sender<Request>) {
    let cred = stream.peer_cred();
    let (r, mut w) = stream.into_split();
    let reply = match cred {
        Ok(c) if c.uid() == 0 => None,
        Ok(c) => {
            log_refusal(c.uid(), c.pid());
            Some(serde_json::json!({"error": format!(
                "the control socket answers root only, and this client runs as uid {}: run the command as root (e.g. with sudo)",
                c.uid()
            )}))
        }
        Err(e) => {
            tracing::warn!("reading a control socket client's credentials: {e}");
            Some(
                serde_json::json!({"error": "the control socket could not tell who is asking; nothing was done"}),
            )
        }
    };
    // The request is read even from a client about to be refused: closing a unix socket with
    // unread data makes the client's read fail with ECONNRESET instead of seeing the answer.
    let mut line = String::new();
    let mut r = BufReader::new(r.take(4096));
    match tokio::time::timeout(REQUEST_TIMEOUT, r.read_line(&mut line)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) | Err(_) => return,
    }
    if let Some(refusal) = reply {
        let _ = w.write_all(format!("{refusal}\n").as_bytes()).await;
        return;
    }
    let ask = |make: fn(oneshot::Sender<serde_json::Value>) -> Request| {
        let requests = requests.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            if requests.send(make(tx)).await.is_err() {
                return serde_json::json!({"error": "homelab-matrix is stopping"});
            }
            rx.await
                .unwrap_or_else(|_| serde_json::json!({"error": "homelab-matrix is stopping"}))
        }
    };
    let reply = match line.trim() {
        "status" => status(),
        "reload" => ask(|reply| Request::Reload { reply }).await,
        "element-update" => {
            ask(|reply| Request::ElementUpdate {
                check_only: false,
                reply,
            })
            .await
        }
        "element-check" => {
            ask(|reply| Request::ElementUpdate {
                check_only: true,
                reply,
            })
            .await
        }
        "element-rollback" => ask(|reply| Request::ElementRollback { reply }).await,
        other => {
            serde_json::json!({"error": format!("unknown request {other:?}; try status, reload, element-update, element-check or element-rollback")})
        }
    };
    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
}

/// Client side: sends one request, returns the JSON reply.
pub async fn request(path: &PathBuf, what: &str) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach homelab-matrix at {}; is it running? Start it with `systemctl start homelab-matrix` (and run this as root)",
            path.display()
        )
    })?;
    // A refusal may come before the request is written: read the answer in any case.
    let sent = s.write_all(format!("{what}\n").as_bytes()).await;
    let mut out = String::new();
    let read = s.read_to_string(&mut out).await;
    if out.trim().is_empty() {
        sent.context("sending the request to the control socket")?;
        read.context("reading the control socket's answer")?;
        bail!("homelab-matrix closed the control socket without an answer; its journal says why");
    }
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).context("reading the control socket's answer")?;
    match v["error"].as_str() {
        Some(e) => bail!("{e}"),
        None => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// While `bind` runs again and again, a watcher lists the directory: every socket it can
    /// see is 0600, and the only other entries are root's 0700 staging directories.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_socket_is_never_visible_with_a_looser_mode() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: bind chowns its directory to root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let path = run.join("control.sock");
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dir, stop) = (run.clone(), done.clone());
        let watcher = std::thread::spawn(move || {
            let mut seen = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                        continue;
                    };
                    if m.file_type().is_socket() {
                        seen += 1;
                        assert_eq!(
                            m.mode() & 0o777,
                            0o600,
                            "{} was visible",
                            e.path().display()
                        );
                    } else {
                        assert!(m.is_dir() && m.uid() == 0, "{}", e.path().display());
                        assert_eq!(m.mode() & 0o777, 0o700, "{}", e.path().display());
                    }
                }
            }
            seen
        });
        for _ in 0..200 {
            let l = bind(&path).unwrap();
            let m = std::fs::symlink_metadata(&path).unwrap();
            assert!(m.file_type().is_socket());
            assert_eq!((m.mode() & 0o777, m.uid()), (0o600, 0));
            // The renamed socket still answers on its final path.
            let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let _ = l.accept().await.unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(watcher.join().unwrap() > 0, "the watcher saw the socket");
        let left: Vec<_> = std::fs::read_dir(&run)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("control.sock")],
            "no staging directory is left behind"
        );
    }
}
