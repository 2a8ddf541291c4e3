//! The control socket (DESIGN.md §1): root-only, one request line in, one JSON line out.
//! `status` reports the children; `reload` does what SIGHUP does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::alerts::Problem;
use crate::bot::BotStatus;
use crate::element::ElementStatus;
use crate::fsutil::{Owner, ensure_dir, set_owner_mode};
use crate::supervisor::ChildStatus;

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub server_name: String,
    /// `starting` until Synapse first answers /health, then `ready`; `stopping` on the way out.
    pub phase: String,
    pub state_dir: String,
    pub synapse_url: String,
    /// The client API's public URL.
    pub url: String,
    pub element_url: String,
    pub tls_mode: String,
    /// The internal CA's certificate: what LAN clients trust in `internal` mode.
    pub ca_root: String,
    /// What Synapse hands clients for calls (empty when TURN is off).
    pub turn_uris: Vec<String>,
    pub certificates: Vec<serde_json::Value>,
    pub children: Vec<ChildStatus>,
    pub element: ElementStatus,
    pub bot: BotStatus,
    /// Open problems that need an admin (the bot DMs them).
    pub problems: Vec<Problem>,
}

/// Requests the app acts on.
#[derive(Debug)]
pub enum Request {
    Reload,
    /// `element update [--check]`; the answer is a JSON outcome or `{"error": ...}`.
    ElementUpdate {
        check_only: bool,
        reply: oneshot::Sender<serde_json::Value>,
    },
    ElementRollback {
        reply: oneshot::Sender<serde_json::Value>,
    },
}

pub type StatusFn = Arc<dyn Fn() -> Status + Send + Sync>;

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let dir = path
        .parent()
        .context("control socket path has no directory")?;
    ensure_dir(dir, Owner::root(), 0o755)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    set_owner_mode(path, Owner::root(), 0o600)?;
    Ok(l)
}

/// Answers requests until the task is dropped.
pub async fn serve(listener: UnixListener, status: StatusFn, requests: mpsc::Sender<Request>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r.take(4096));
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match line.trim() {
                "status" => serde_json::to_string(&status()).expect("status serializes"),
                "reload" => {
                    let ok = requests.send(Request::Reload).await.is_ok();
                    serde_json::json!({"ok": ok}).to_string()
                }
                line @ ("element-update" | "element-check" | "element-rollback") => {
                    let (tx, rx) = oneshot::channel();
                    let req = if line == "element-rollback" {
                        Request::ElementRollback { reply: tx }
                    } else {
                        Request::ElementUpdate {
                            check_only: line == "element-check",
                            reply: tx,
                        }
                    };
                    let _ = requests.send(req).await;
                    rx.await.unwrap_or_else(
                        |_| serde_json::json!({"error": "homelab-matrix is stopping"}),
                    )
                    .to_string()
                }
                other => serde_json::json!({"error": format!("unknown request {other:?}; try status, reload, element-update, element-check or element-rollback")})
                    .to_string(),
            };
            let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
        });
    }
}

/// Client side: sends one request, returns the JSON reply.
pub async fn request(path: &PathBuf, what: &str) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach homelab-matrix at {}; is it running? Start it with `systemctl start homelab-matrix` (and run this as root)",
            path.display()
        )
    })?;
    s.write_all(format!("{what}\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    serde_json::from_str(out.trim()).context("reading the control socket's answer")
}
