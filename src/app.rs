//! `homelab-matrix run`: the start and stop order of DESIGN.md §6.
//!
//! Start: config -> state dirs and secrets -> PostgreSQL -> Synapse's config -> control socket
//! -> Synapse, wait for /health -> the appliance's admin account -> READY=1.
//! Stop (SIGTERM/SIGINT): children in reverse start order, each with its grace period.
//! SIGHUP (or `reload` on the control socket): re-read the config, re-render, restart what changed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::{self, Config, ConfigError};
use crate::control::{self, Status};
use crate::fsutil::{Owner, ensure_dir};
use crate::notify::notify;
use crate::postgres;
use crate::secrets::{Kind, Secrets};
use crate::supervisor::{Child, RunAs, Supervisor};
use crate::synapse::{self, admin};

/// Failures of `run` that map to distinct exit codes.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

struct App {
    config_path: PathBuf,
    cfg: Config,
    secrets: Secrets,
    supervisor: Supervisor,
    synapse: Mutex<Arc<Child>>,
    phase: Mutex<&'static str>,
}

pub async fn run(config_path: &Path) -> Result<(), RunError> {
    let cfg = Config::load(config_path)?;
    let env = config::environment_problems(&cfg);
    if !env.is_empty() {
        return Err(ConfigError::Invalid {
            path: config_path.to_owned(),
            problems: env,
        }
        .into());
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Err(anyhow::anyhow!(
            "homelab-matrix run must start as root: it binds ports 80/443/8448 and starts each child as its own user"
        )
        .into());
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let state = cfg.state_dir();
    ensure_dir(&state, Owner::root(), 0o755)?;
    let secrets = Secrets::ensure(&state)?;
    let synapse_user = RunAs::lookup(&cfg.synapse.user)?;

    let report = postgres::provision(&cfg, &secrets.get(Kind::PostgresPassword)?)
        .await
        .context("provisioning PostgreSQL")?;
    tracing::info!(
        database = %cfg.postgres.database,
        role = %cfg.postgres.user,
        "PostgreSQL: {report}"
    );
    synapse::render(&cfg, &secrets, &synapse_user)?;

    let supervisor = Supervisor::new();
    let synapse_child = supervisor.start(synapse::child_spec(&cfg, synapse_user));
    let app = Arc::new(App {
        config_path: config_path.to_owned(),
        cfg,
        secrets,
        supervisor,
        synapse: Mutex::new(synapse_child.clone()),
        phase: Mutex::new("starting"),
    });

    let (req_tx, mut req_rx) = mpsc::channel(4);
    let listener = control::bind(&app.cfg.control_socket())?;
    let status_app = app.clone();
    let control_task = tokio::spawn(control::serve(
        listener,
        Arc::new(move || status_app.status()),
        req_tx,
    ));

    // Synapse may take a while (schema upgrades); a SIGTERM meanwhile still stops cleanly.
    let started = tokio::select! {
        r = start_rest(&app, &synapse_child) => r,
        _ = term.recv() => Err(anyhow::anyhow!("stopped by SIGTERM while starting")),
        _ = int.recv() => Err(anyhow::anyhow!("stopped by SIGINT while starting")),
    };
    if let Err(e) = started {
        tracing::error!("{e:#}");
        stop(&app, control_task).await;
        return Err(e.into());
    }
    *app.phase.lock().unwrap() = "ready";
    notify("READY=1\nSTATUS=Synapse is ready");
    tracing::info!(
        synapse = %app.cfg.synapse_local_url(),
        "homelab-matrix is ready"
    );

    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => reload(&app).await,
            Some(control::Request::Reload) = req_rx.recv() => reload(&app).await,
        }
    }
    stop(&app, control_task).await;
    Ok(())
}

async fn start_rest(app: &App, synapse_child: &Child) -> Result<()> {
    // Restarts with backoff until ready; the timeout bounds a crash loop at start.
    synapse_child.wait_ready(Duration::from_secs(600)).await?;
    let client = admin::Synapse::new(&app.cfg.synapse_local_url());
    // Without it `token` commands cannot work, but chat does: warn and carry on.
    if let Err(e) = client.service_session(&app.secrets).await {
        tracing::error!("the appliance's admin account is not usable: {e:#}");
    }
    Ok(())
}

async fn stop(app: &App, control_task: tokio::task::JoinHandle<()>) {
    *app.phase.lock().unwrap() = "stopping";
    notify("STOPPING=1");
    app.supervisor.shutdown().await;
    control_task.abort();
    let _ = std::fs::remove_file(app.cfg.control_socket());
    tracing::info!("stopped");
}

/// SIGHUP: re-applies the operator's Synapse overrides (synapse.d) and restarts Synapse if its
/// config changed. The TOML file is re-read to report mistakes early, but its changes need a
/// restart of the service: they touch the database, the ports and the identity of the server.
async fn reload(app: &App) {
    tracing::info!(config = %app.config_path.display(), "reloading");
    match Config::load(&app.config_path) {
        Err(e) => {
            tracing::error!("the config file has problems; the running config stays in effect: {e}")
        }
        Ok(new) if new != app.cfg => tracing::warn!(
            "{} changed; those changes take effect at the next `systemctl restart homelab-matrix`",
            app.config_path.display()
        ),
        Ok(_) => {}
    }
    let result: Result<()> = async {
        let user = RunAs::lookup(&app.cfg.synapse.user)?;
        if synapse::render(&app.cfg, &app.secrets, &user)? {
            tracing::info!("Synapse's config changed; restarting it");
            let old = app.synapse.lock().unwrap().clone();
            let fresh = app
                .supervisor
                .replace(&old, synapse::child_spec(&app.cfg, user))
                .await;
            *app.synapse.lock().unwrap() = fresh;
        } else {
            tracing::info!("Synapse's config is unchanged");
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::error!("reload failed: {e:#}");
    }
}

impl App {
    fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            server_name: self.cfg.server_name.clone(),
            phase: self.phase.lock().unwrap().to_string(),
            state_dir: self.cfg.state.dir.clone(),
            synapse_url: self.cfg.synapse_local_url(),
            children: control::children_json(&self.supervisor.status()),
        }
    }
}
