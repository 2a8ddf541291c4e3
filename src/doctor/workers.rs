//! With Synapse workers on (`[synapse] workers`): Redis answers on its socket, each worker
//! answers on its listener, and the routing table was written for the running Synapse.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Check, Ctx};
use crate::supervisor::RunAs;
use crate::synapse::workers;

const LOGS: &str = "journalctl -u homelab-matrix";

/// `redis`: a PING on the socket Synapse's processes use (RESP inline command, "+PONG").
pub async fn redis(ctx: &Ctx<'_>) -> Check {
    const NAME: &str = "redis";
    let socket = ctx.cfg.redis_socket();
    let state = ctx.child_state("redis");
    let fix = format!("see Redis's log: `{LOGS} | grep child=redis`; Synapse's workers need it");
    match ping(ctx).await {
        Ok(()) => Check::pass(
            NAME,
            format!("Redis answers on {} ({state})", socket.display()),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("Redis on {} ({state}): {e}", socket.display()),
            fix,
        ),
    }
}

async fn ping(ctx: &Ctx<'_>) -> Result<(), String> {
    let user = RunAs::lookup(&ctx.cfg.synapse.redis_user).map_err(|e| format!("{e:#}"))?;
    let dir = crate::fsutil::Dir::open(&ctx.cfg.state_dir().join(crate::config::REDIS_DIR))
        .map_err(|e| format!("{e:#}"))?;
    // The socket is in Redis's own directory: connected to only if it is a socket of Redis's
    // user, never through a link Redis could plant to another service's socket.
    let name = ctx.cfg.redis_socket();
    let name = name
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stream = dir
        .connect_socket(name, user.uid)
        .map_err(|e| format!("{e:#}"))?
        .ok_or("no socket of Redis's user there")?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
    let exchange = async {
        stream.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(answer)) if answer == "+PONG" => Ok(()),
        Ok(Ok(answer)) => Err(format!("answered {answer:?} to PING")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer to PING within 5 s".into()),
    }
}

/// `workers:<name>` for each worker (its `/health`, and the supervisor's view), and
/// `workers:routes`: the running Synapse against the versions the routing table was written for.
pub async fn check(ctx: &Ctx<'_>) -> Vec<Check> {
    let mut checks = vec![];
    for w in crate::synapse::worker_plan(ctx.cfg) {
        let name = format!("workers:{}", w.name);
        let child = w.child_name();
        let state = ctx.child_state(&child);
        let url = format!("http://127.0.0.1:{}/health", w.port);
        let fix = format!("see its log: `{LOGS} | grep child={child}`");
        let what = format!("worker {} ({state}) at {url}", w.name);
        let got = super::net::get_json(ctx.net.http().get(&url), &name, &what, &fix, &fix).await;
        checks.push(match got {
            Ok(_) => Check::pass(
                &name,
                format!(
                    "worker {} answers on port {} ({state}), serving {:?}",
                    w.name, w.port, w.roles
                ),
            ),
            Err(c) => c,
        });
    }
    checks.push(routes(ctx).await);
    checks
}

async fn routes(ctx: &Ctx<'_>) -> Check {
    const NAME: &str = "workers:routes";
    let ((a, b), (c, d)) = workers::WRITTEN_FOR;
    let url = format!(
        "{}/_synapse/admin/v1/server_version",
        ctx.cfg.synapse_local_url()
    );
    let fix = "see the synapse check";
    let what = format!("Synapse at {url}");
    let got = super::net::get_json(ctx.net.http().get(&url), NAME, &what, fix, fix).await;
    let v = match &got {
        Ok(v) => v["server_version"].as_str().unwrap_or("?"),
        Err(c) => return Check::warn(NAME, c.seen.clone(), fix),
    };
    match workers::checked_against(v) {
        Some(true) => Check::pass(
            NAME,
            format!("the routing table was written for Synapse {a}.{b} to {c}.{d}; {v} runs"),
        ),
        _ => Check::warn(
            NAME,
            format!(
                "Synapse {v} runs; the routing table was written for {a}.{b} to {c}.{d}: endpoints it does not know go to the main process"
            ),
            "check Synapse's docs/workers.md for changed endpoints, or update homelab-matrix",
        ),
    }
}

/// The check names a run with this config could produce (for `--only`).
pub fn names(cfg: &crate::config::Config) -> Vec<String> {
    let mut n: Vec<String> = crate::synapse::worker_plan(cfg)
        .iter()
        .map(|w| format!("workers:{}", w.name))
        .collect();
    n.push("workers:routes".into());
    n
}
