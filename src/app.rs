//! `homelab-matrix run`: the start and stop order of DESIGN.md §6.
//!
//! Start: config -> state dirs and secrets -> PostgreSQL -> Synapse's config -> control socket
//! -> Synapse, wait for /health -> the appliance's admin account -> coturn -> the registration
//! bot (its own task: it ensures its account, then syncs) -> READY=1.
//! Stop (SIGTERM/SIGINT): the front door and the bot, then the children in reverse start order,
//! each with its grace period.
//! SIGHUP (or `reload` on the control socket): re-read the config, re-render, restart what changed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::acme::{self, Acme};
use crate::alerts::{self, Alerts};
use crate::bot::{self, Bot};
use crate::certs::ca::InternalCa;
use crate::certs::{Cert, CertStore, Source, unix};
use crate::config::{self, Config, ConfigError, TlsMode};
use crate::control;
use crate::element::{self, Element};
use crate::fsutil::{Owner, ensure_dir};
use crate::http::{self as front, Bound, FrontDoor, Limits, Router, Slot};
use crate::notify::notify;
use crate::postgres;
use crate::secrets::Secrets;
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

/// What `status` answers over the control socket.
#[derive(Debug, Clone, serde::Serialize)]
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
    pub children: Vec<crate::supervisor::ChildStatus>,
    pub element: element::ElementStatus,
    pub bot: bot::BotStatus,
    /// The front door's way to Synapse: requests and long-polls in flight, abandoned ones.
    pub upstream: front::proxy::UpstreamStatus,
    /// Open problems that need an admin (the bot DMs them).
    pub problems: Vec<alerts::Problem>,
}

struct App {
    config_path: PathBuf,
    cfg: Config,
    secrets: Secrets,
    supervisor: Supervisor,
    synapse: Mutex<Arc<Child>>,
    /// Synapse's worker processes (`[synapse] workers`), started once the main one is ready.
    workers: Mutex<Vec<Arc<Child>>>,
    /// The front door's way to Synapse: it routes around workers that are down.
    upstream: Arc<front::proxy::Upstream>,
    /// The Synapse client API for clients in this process (the bot): the main process, or
    /// with workers `upstream` on a loopback port (http::inner).
    client_url: String,
    phase: Mutex<&'static str>,
    certs: Arc<CertStore>,
    ca: InternalCa,
    acme: Option<Arc<Acme>>,
    https_port: u16,
    element: Arc<Element>,
    /// Problems that need an admin; the bot tells them. The Element updater raises
    /// `alerts::ELEMENT_UPDATE`.
    alerts: Alerts,
    bot: Bot,
    /// An upgrade Synapse has not been healthy on yet (backup::upgrade): Synapse gets
    /// `rollback::PATIENCE` to become healthy, and a failed one is undone.
    upgrading: bool,
    /// The upgrade changed packages: apt restarted the service, and may not be done.
    upgraded_packages: bool,
}

/// Internal-CA certificates: a year, re-issued when a third is left (browsers cap private-CA
/// leaves at 825 days; a year keeps well inside that).
const INTERNAL_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// How long open connections get to finish when the front door closes.
const DRAIN: Duration = Duration::from_secs(5);

/// Everything `run` and check-config find wrong with this config on this host, beyond the
/// file itself: the config's own (files, users), then each feature's.
pub fn environment_problems(cfg: &Config) -> Vec<config::Problem> {
    let mut out = config::environment_problems(cfg);
    out.extend(admin::config_problems(cfg));
    out.extend(crate::coturn::environment_problems(cfg));
    out
}

pub async fn run(config_path: &Path) -> Result<(), RunError> {
    let cfg = Config::load(config_path)?;
    let env = environment_problems(&cfg);
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
    // Before any listener or file is opened (see `fdlimit`).
    let nofile = crate::fdlimit::raise();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let state = cfg.state_dir();
    ensure_dir(&state, Owner::root(), 0o755)?;
    // Before PostgreSQL, Synapse's config or the control socket are touched; held until the
    // process ends.
    let _instance = crate::instance::Instance::lock(&state, "run", &cfg.control_socket())
        .map_err(anyhow::Error::from)?;
    let secrets = Secrets::ensure(&state)?;
    let synapse_user = RunAs::lookup(&cfg.synapse.user)?;

    let report = postgres::provision(&cfg, &postgres::password(&cfg, &secrets)?)
        .await
        .context("provisioning PostgreSQL")?;
    tracing::info!(
        database = %cfg.postgres.database,
        role = %cfg.postgres.user,
        "PostgreSQL: {report}"
    );
    if cfg.media.s3.enabled() {
        let v = synapse::s3::check_provider(&cfg).await?;
        tracing::info!(bucket = %cfg.media.s3.bucket, "media on S3 through {} {v}", synapse::s3::PROVIDER_PACKAGE);
    }
    synapse::render(&cfg, &secrets, &synapse_user)?;

    let bound = Bound::bind(&cfg).await?;
    let https_port = bound.https_port();
    let (certs, ca) = load_certificates(&cfg)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let alerts = Alerts::new();
    let element = Element::new(
        &cfg,
        config_path.parent().unwrap_or(Path::new("/")),
        https_port,
        alerts.clone(),
    )?;
    tokio::spawn(element.clone().maintain(stop_rx.clone()));
    let limits = Limits::from_config(&cfg).fit_descriptors(nofile);
    let upstream = synapse_upstream(&cfg, &limits);
    let front = FrontDoor::new(
        routes_to(&cfg, &certs, https_port, Some(&element), upstream.clone()),
        https_port,
    );
    let client_url = if synapse::worker_plan(&cfg).is_empty() {
        cfg.synapse_local_url()
    } else {
        front::inner::serve(upstream.clone(), stop_rx.clone()).await?
    };
    let tls = crate::tls::acceptor(certs.clone());
    let front_task = tokio::spawn(front.serve(bound, tls, limits, stop_rx.clone(), DRAIN));
    let acme = (cfg.tls.mode() == TlsMode::Acme).then(|| {
        let a = Acme::new(acme_settings(&cfg), &state.join("acme"), certs.clone());
        for name in cfg.served_names() {
            tokio::spawn(a.clone().maintain(name, stop_rx.clone()));
        }
        a
    });

    // Before Synapse runs a new version's schema migrations (backup::upgrade).
    let upgrade = crate::backup::upgrade::before_start(&cfg, config_path).await;
    let bot = Bot::idle(&cfg);
    let supervisor = Supervisor::new();
    if cfg.synapse_workers() > 0 {
        start_redis(&cfg, &supervisor, &synapse_user).await?;
    }
    let synapse_child = supervisor.start(synapse_spec(&cfg, synapse_user, upgrade.is_some()));
    let app = Arc::new(App {
        config_path: config_path.to_owned(),
        cfg,
        secrets,
        supervisor,
        synapse: Mutex::new(synapse_child.clone()),
        workers: Mutex::new(vec![]),
        upstream,
        client_url,
        phase: Mutex::new("starting"),
        certs,
        ca,
        acme,
        https_port,
        element,
        alerts,
        bot,
        upgrading: upgrade.is_some(),
        upgraded_packages: upgrade
            .as_ref()
            .is_some_and(|u| !u.changed_packages().is_empty()),
    });
    if let Some(r) = crate::backup::rollback::load(&app.cfg) {
        // Said at every start until a later upgrade is healthy (the bot repeats it at most
        // once a day, alerts::REPEAT_AFTER).
        app.alerts
            .raise(crate::backup::rollback::ALERT, r.summary());
    }
    if let Some(u) = &upgrade {
        tokio::spawn(watch_upgrade(app.clone(), u.clone(), stop_rx.clone()));
    }
    tokio::spawn(maintain_internal(app.clone(), stop_rx.clone()));
    tokio::spawn(watch_problems(app.clone(), stop_rx.clone()));

    let (req_tx, mut req_rx) = mpsc::channel(4);
    let listener = control::bind(&app.cfg.control_socket())?;
    let status_app = app.clone();
    let control_task = tokio::spawn(control::serve(
        listener,
        Arc::new(move || serde_json::to_value(status_app.status()).expect("status serializes")),
        req_tx,
    ));

    // Synapse may take a while (schema upgrades); a SIGTERM meanwhile still stops cleanly.
    let started = tokio::select! {
        r = start_rest(&app, &synapse_child, stop_rx.clone()) => r,
        _ = term.recv() => Err(anyhow::anyhow!("stopped by SIGTERM while starting")),
        _ = int.recv() => Err(anyhow::anyhow!("stopped by SIGINT while starting")),
    };
    if let Err(e) = started {
        tracing::error!("{e:#}");
        if let Some(u) = &upgrade {
            tracing::error!("{}", u.how_to_go_back());
        }
        stop(&app, control_task, &stop_tx, front_task).await;
        return Err(e.into());
    }
    *app.phase.lock().unwrap() = "ready";
    notify("READY=1\nSTATUS=Synapse is ready");
    tokio::spawn(crate::doctor::daily(
        app.cfg.clone(),
        app.alerts.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(record_healthy(app.clone(), stop_rx.clone()));
    tokio::spawn(crate::backup::schedule::daily(
        app.cfg.clone(),
        app.config_path.clone(),
        app.alerts.clone(),
        stop_rx.clone(),
    ));
    tracing::info!(
        url = %app.base_url(&app.cfg.hosts.matrix),
        ca_root = %app.ca.root_path.display(),
        "homelab-matrix is ready"
    );

    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => { reload(&app).await; }
            Some(r) = req_rx.recv() => handle_request(&app, r).await,
        }
    }
    stop(&app, control_task, &stop_tx, front_task).await;
    Ok(())
}

async fn start_rest(
    app: &App,
    synapse_child: &Child,
    stop_rx: watch::Receiver<bool>,
) -> Result<()> {
    if app.upgrading {
        // After an upgrade Synapse may migrate its schema for long, and apt waits for this
        // start (the postinst restarts the unit): READY goes out after a while anyway, so apt
        // finishes, and watch_upgrade decides whether the upgrade failed.
        tokio::select! {
            r = synapse_child.wait_ready(crate::backup::rollback::PATIENCE) => r?,
            _ = tokio::time::sleep(UPGRADE_READY_AFTER) => {
                notify("READY=1\nSTATUS=upgraded: waiting for Synapse on the new version");
                synapse_child.wait_ready(crate::backup::rollback::PATIENCE).await?;
            }
        }
    } else {
        // Restarts with backoff until ready; the timeout bounds a crash loop at start.
        synapse_child.wait_ready(Duration::from_secs(600)).await?;
    }
    let client = admin::Synapse::new(&app.cfg.synapse_local_url());
    start_workers(app, &client).await?;
    // Without it `token` commands cannot work, but chat does: warn and carry on.
    if let Err(e) = client.service_session(&app.secrets).await {
        tracing::error!("the appliance's admin account is not usable: {e:#}");
    }
    if app.cfg.turn.enabled {
        // Calls are optional: a coturn that will not start is reported and retried, and
        // does not keep chat from being ready.
        match start_coturn(app).await {
            Ok(child) => {
                if let Err(e) = child.wait_ready(Duration::from_secs(60)).await {
                    tracing::error!("coturn: {e:#}");
                }
            }
            Err(e) => tracing::error!("coturn not started: {e:#}"),
        }
    }
    // The bot makes or restores its account and logs in on its own task, retrying while
    // Synapse is away: chat is ready without it.
    app.bot.start(
        bot::Deps {
            cfg: app.cfg.clone(),
            secrets: app.secrets.clone(),
            alerts: app.alerts.clone(),
            client_url: app.client_url.clone(),
        },
        stop_rx,
    );
    Ok(())
}

/// Synapse is healthy: what runs is the new baseline of the upgrade check, and a pending
/// upgrade is done (backup::upgrade). After an upgrade of packages, once apt and dpkg are done
/// too: this start may be a postinst's, with packages still to configure (a venv whose Synapse
/// then fails), so healthy on files apt has not finished with proves nothing yet, and
/// watch_upgrade goes on watching.
async fn record_healthy(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        let synapse_up =
            app.synapse.lock().unwrap().status().state == crate::supervisor::State::Running;
        if synapse_up && !(app.upgraded_packages && crate::apt::dpkg_busy()) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
    }
    if let Some(v) = crate::backup::upgrade::healthy(&app.cfg).await {
        crate::backup::rollback::healthy_on(&app.cfg, &v);
        app.alerts.clear(crate::backup::upgrade::ALERT);
        if crate::backup::rollback::load(&app.cfg).is_none() {
            // A later upgrade is healthy: the rollback before it is history.
            app.alerts.clear(crate::backup::rollback::ALERT);
        }
    }
}

/// How long a start after an upgrade holds back READY while Synapse is not up yet: a minute,
/// which a Synapse that only loads (no migration) takes even on a loaded 2-core box, and which
/// an apt run waiting on the postinst's restart can afford.
const UPGRADE_READY_AFTER: Duration = Duration::from_secs(60);

/// Synapse's child spec; while an upgrade is pending a start may take as long as a migration
/// may (`rollback::PATIENCE`) before it counts as hung.
fn synapse_spec(cfg: &Config, user: RunAs, upgrading: bool) -> crate::supervisor::ChildSpec {
    let mut spec = synapse::child_spec(cfg, user);
    if upgrading {
        spec.ready_timeout = crate::backup::rollback::PATIENCE;
    }
    spec
}

/// Until the upgrade `pending` has been healthy (record_healthy): when Synapse fails on it
/// (`rollback::decide`), hands over to `homelab-matrix rollback`, or, where that cannot work
/// (no kept packages, no snapshot), tells the admins how to go back by hand. Failed starts
/// while apt or dpkg runs do not count: a dist-upgrade may start the service before it has
/// rebuilt Synapse's venv.
async fn watch_upgrade(
    app: Arc<App>,
    pending: crate::backup::upgrade::Pending,
    mut stop: watch::Receiver<bool>,
) {
    use crate::backup::rollback::{self, Decision};
    // Synapse's restart count when apt and dpkg were last seen done.
    let mut after_apt_from: Option<u32> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return,
        }
        // Done once the upgrade's baseline is recorded (record_healthy), not at READY.
        if crate::backup::upgrade::load_pending(&app.cfg).is_none() {
            return;
        }
        let synapse = app.synapse.lock().unwrap().status();
        if crate::apt::dpkg_busy() {
            after_apt_from = None;
            continue;
        }
        // A reload replaces the child, whose count starts again.
        let from = *after_apt_from
            .filter(|f| *f <= synapse.restarts)
            .get_or_insert(synapse.restarts);
        after_apt_from = Some(from);
        let after_apt = synapse.restarts - from;
        let now = unix(std::time::SystemTime::now());
        let failures = synapse.restarts;
        let Decision::RollBack(reason) =
            rollback::decide(&pending, &synapse, failures, after_apt, now)
        else {
            continue;
        };
        match rollback::plan(&pending, Path::new(crate::apt::KEPT_DIR)) {
            Ok(_) => {
                tracing::error!("{reason}: undoing the upgrade (homelab-matrix rollback)");
                app.alerts.raise(
                    rollback::ALERT,
                    format!(
                        "{reason}: rolling the upgrade back (`homelab-matrix status` follows it)"
                    ),
                );
                if let Err(e) = rollback::launch(&app.config_path, &reason).await {
                    tracing::error!("starting the rollback: {e:#}");
                    app.alerts.raise(
                        rollback::ALERT,
                        format!(
                            "{reason}, and the rollback did not start: {e:#}. {}",
                            pending.how_to_go_back()
                        ),
                    );
                }
            }
            Err(why) => {
                tracing::error!("{reason}; it cannot be undone by itself: {why}");
                app.alerts.raise(
                    crate::backup::upgrade::ALERT,
                    format!(
                        "{reason}; it cannot be undone by itself: {why}. {}",
                        pending.how_to_go_back()
                    ),
                );
            }
        }
        return;
    }
}

/// Turns what the supervisor and ACME report into alerts: a child in a crash loop, a name whose
/// certificate cannot be issued or renewed. (`alerts::grace` decides when admins hear of it.)
async fn watch_problems(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    // A child back up this long is healthy again (the supervisor's back-off resets then too).
    let healthy_after = crate::supervisor::BackoffPolicy::default().reset_after;
    loop {
        for c in app.supervisor.status() {
            let key = format!("{}{}", alerts::CRASH_LOOP, c.name);
            let recovered = c.state == crate::supervisor::State::Running
                && c.uptime_secs.unwrap_or(0) >= healthy_after.as_secs();
            if c.crash_loop && !recovered {
                app.alerts.raise(
                    &key,
                    format!(
                        "{} is in a crash loop: it failed {} times in a row (last: {}). `journalctl -u homelab-matrix` on the server shows why; `homelab-matrix status` shows its state.",
                        c.name,
                        c.restarts,
                        c.last_exit.as_deref().unwrap_or("did not start")
                    ),
                );
            } else {
                app.alerts.clear(&key);
            }
        }
        if let Some(acme) = &app.acme {
            for (name, st) in acme.status() {
                let key = format!("{}{name}", alerts::CERTIFICATE);
                match (&st.last_error, st.failures) {
                    (Some(err), n) if n > 0 => app.alerts.raise(
                        &key,
                        format!(
                            "the certificate for {name} cannot be issued or renewed ({n} failed attempts; last: {err}). Check that {name} points at this server and ports 80 and 443 are open; `homelab-matrix status` shows the next attempt."
                        ),
                    ),
                    _ => app.alerts.clear(&key),
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Redis for Synapse's workers, ready before any Synapse process starts (they connect at once).
async fn start_redis(cfg: &Config, supervisor: &Supervisor, synapse_user: &RunAs) -> Result<()> {
    let user = RunAs::lookup(&cfg.synapse.redis_user)?;
    crate::redis::prepare(cfg, &user, synapse_user)?;
    let redis = supervisor.start(crate::redis::child_spec(cfg, user));
    redis
        .wait_ready(Duration::from_secs(60))
        .await
        .context("Redis (for Synapse's workers) did not start; its log lines above say why")
}

/// The workers' child specs, each wired to its health flag in the front door (backend i + 1:
/// 0 is the main process), which the supervisor clears the moment a worker stops being ready.
fn worker_specs(
    app: &App,
    user: &RunAs,
) -> Vec<(synapse::workers::Worker, crate::supervisor::ChildSpec)> {
    let mut specs = synapse::worker_specs(&app.cfg, user);
    for (i, (_, spec)) in specs.iter_mut().enumerate() {
        spec.up = app.upstream.health(i + 1);
    }
    specs
}

/// Once the main process is ready (its schema is current, which a worker checks at start):
/// the workers, each telling the front door whether it is up (`worker_specs`).
async fn start_workers(app: &App, client: &admin::Synapse) -> Result<()> {
    let user = RunAs::lookup(&app.cfg.synapse.user)?;
    let specs = worker_specs(app, &user);
    if specs.is_empty() {
        return Ok(());
    }
    match client.server_version().await {
        Ok(v) if synapse::workers::checked_against(&v) == Some(true) => {}
        Ok(v) => {
            let ((a, b), (c, d)) = synapse::workers::WRITTEN_FOR;
            tracing::warn!(
                "Synapse {v} runs with workers, but the routing table was written for {a}.{b} to {c}.{d}: requests it does not know go to the main process. Check Synapse's docs/workers.md for changes, or update homelab-matrix"
            );
        }
        Err(e) => tracing::warn!("could not ask Synapse's version: {e}"),
    }
    let mut children = vec![];
    for (w, spec) in specs {
        tracing::info!(worker = %w.name, port = w.port, roles = ?w.roles, "starting Synapse worker");
        children.push(app.supervisor.start(spec));
    }
    *app.workers.lock().unwrap() = children.clone();
    for c in &children {
        if let Err(e) = c.wait_ready(Duration::from_secs(300)).await {
            // What it serves goes to the main process meanwhile, or answers 503.
            tracing::error!("{e:#}");
        }
    }
    Ok(())
}

async fn start_coturn(app: &App) -> Result<Arc<Child>> {
    let user = RunAs::lookup(&app.cfg.turn.user)?;
    let cert = app
        .certs
        .get(&app.cfg.hosts.turn)
        .context("no certificate for the TURN host")?;
    let external = crate::coturn::external_ip(&app.cfg).await;
    crate::coturn::render(&app.cfg, &app.secrets, &user, &cert, external.as_deref())?;
    let child = app
        .supervisor
        .start(crate::coturn::child_spec(&app.cfg, user.clone()));
    tokio::spawn(follow_turn_certificate(
        app.certs.clone(),
        app.cfg.clone(),
        user,
        child.clone(),
    ));
    Ok(child)
}

/// One certificate lifecycle for the front door and coturn: when the TURN host's certificate
/// changes (ACME renewal, files reload), coturn gets the new copy and SIGUSR2, on which it
/// reloads its certificate without a restart (coturn mainrelay.c, reload_ssl_certs).
async fn follow_turn_certificate(
    certs: Arc<CertStore>,
    cfg: Config,
    user: RunAs,
    coturn: Arc<Child>,
) {
    let mut changes = certs.subscribe();
    while changes.changed().await.is_ok() {
        let Some(cert) = certs.get(&cfg.hosts.turn) else {
            continue;
        };
        match crate::coturn::export_cert(&cfg, &user, &cert) {
            Ok(false) => {}
            Ok(true) => {
                let signalled = coturn.signal(nix::sys::signal::Signal::SIGUSR2);
                tracing::info!(
                    expires = unix(cert.not_after),
                    signalled,
                    "new TURN certificate handed to coturn"
                );
            }
            Err(e) => tracing::error!("copying the TURN certificate for coturn: {e:#}"),
        }
    }
}

async fn stop(
    app: &App,
    control_task: tokio::task::JoinHandle<()>,
    stop_tx: &watch::Sender<bool>,
    front_task: tokio::task::JoinHandle<()>,
) {
    *app.phase.lock().unwrap() = "stopping";
    notify("STOPPING=1");
    // Stop accepting and let open requests finish, then stop the children (DESIGN.md §6).
    let _ = stop_tx.send(true);
    let _ = front_task.await;
    app.bot.stopped().await;
    app.supervisor.shutdown().await;
    control_task.abort();
    let _ = std::fs::remove_file(app.cfg.control_socket());
    tracing::info!("stopped");
}

/// What answers each route of the front door (DESIGN.md §2). A new page or endpoint is one
/// `.mount(Site::Matrix, "/path", handler)` line here. Without Element (tests), its host
/// answers 404.
pub fn routes(
    cfg: &Config,
    certs: &Arc<CertStore>,
    https_port: u16,
    limits: &Limits,
    element: Option<&Arc<Element>>,
) -> Router {
    let upstream = synapse_upstream(cfg, limits);
    routes_to(cfg, certs, https_port, element, upstream)
}

/// The way to Synapse: its main process, and with workers a balancer that sends each request
/// to the process docs/workers.md says serves it (`synapse::workers::ENDPOINTS`).
fn synapse_upstream(cfg: &Config, limits: &Limits) -> Arc<front::proxy::Upstream> {
    use crate::synapse::workers::{self, Affinity, Fallback};
    use front::balance::{self, Balancer, Rule};
    let plan = synapse::worker_plan(cfg);
    let mut ports = vec![cfg.synapse.port];
    ports.extend(plan.iter().map(|w| w.port));
    let balancer = (!plan.is_empty()).then(|| {
        let rules = workers::ENDPOINTS
            .iter()
            .map(|e| Rule {
                pattern: e.pattern.to_string(),
                // Backend i + 1 is worker i (0 is the main process).
                backends: (0..plan.len())
                    .filter(|&i| plan[i].has(e.role))
                    .map(|i| i + 1)
                    .collect(),
                affinity: match e.affinity {
                    Affinity::Any => balance::Affinity::Any,
                    Affinity::User => balance::Affinity::User,
                    Affinity::Room => balance::Affinity::Room,
                    Affinity::Origin => balance::Affinity::Origin,
                },
                main_serves_it: e.role.fallback() == Fallback::Main,
            })
            .collect();
        Balancer::new(rules, ports.len())
            .expect("the worker table's patterns compile (unit-tested)")
    });
    Arc::new(front::proxy::Upstream::balanced(
        &ports,
        balancer,
        cfg.max_upload_bytes(),
        limits,
    ))
}

/// [`routes`], with Synapse behind `upstream`.
fn routes_to(
    cfg: &Config,
    certs: &Arc<CertStore>,
    https_port: u16,
    element: Option<&Arc<Element>>,
    upstream: Arc<front::proxy::Upstream>,
) -> Router {
    use front::handlers;
    use front::layers::{AdminGuard, BodyLimit, ForwardedHeaders};
    let hosts = front::Hosts {
        server_name: cfg.server_name.clone(),
        matrix: cfg.hosts.matrix.clone(),
        element: cfg.hosts.element.clone(),
    };
    let synapse_layers: Vec<Arc<dyn front::layers::Layer>> = vec![
        Arc::new(BodyLimit {
            max: cfg.max_upload_bytes(),
        }),
        Arc::new(ForwardedHeaders),
        // Registration-token guesses through /register and the validity endpoint, per address.
        Arc::new(front::ratelimit::RegistrationLimit::default()),
    ];
    let rtc = crate::matrixrtc::Service::from_config(
        cfg,
        &crate::config::https_url(&hosts.matrix, https_port),
    )
    .map(Arc::new);
    let router = Router::new(hosts.clone(), AdminGuard::new(cfg.http.admin_networks()))
        .on(
            Slot::AcmeChallenge,
            vec![],
            handlers::acme_http01(certs.clone()),
        )
        .on(
            Slot::WellKnownServer,
            vec![],
            handlers::well_known_server(&hosts.matrix, https_port),
        )
        .on(
            Slot::WellKnownClient,
            vec![],
            handlers::well_known_client(&hosts.matrix, https_port, rtc.as_ref().map(|r| r.focus())),
        )
        .on(Slot::Synapse, synapse_layers, upstream.handler())
        .on(Slot::Landing, vec![], handlers::landing(&hosts, https_port))
        .mount(
            front::Site::Matrix,
            crate::invite::PATH,
            invite_handler(Arc::new(crate::invite::Invite::new(cfg, https_port))),
        )
        .mount(
            front::Site::Matrix,
            crate::config::MATRIXRTC_PATH,
            matrixrtc_handler(rtc),
        );
    match element {
        Some(e) => router.on(Slot::Element, vec![], element_handler(e.clone())),
        None => router,
    }
}

/// Element Web on its host, through the front door.
fn element_handler(element: Arc<Element>) -> front::Handler {
    front::handler(move |req, _cx| {
        let element = element.clone();
        async move {
            let (parts, body) = element
                .serve(req.method(), req.uri().path(), req.headers())
                .await
                .into_parts();
            http::Response::from_parts(parts, front::full_body(body))
        }
    })
}

/// The invite page (`/invite` on the matrix host), through the front door.
fn invite_handler(invite: Arc<crate::invite::Invite>) -> front::Handler {
    front::handler(move |req, _cx| {
        let invite = invite.clone();
        async move {
            let (parts, body) = req.into_parts();
            let Some(body) = front::read_body(body, crate::invite::MAX_BODY).await else {
                return front::matrix_error(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "M_TOO_LARGE",
                    "the request body is too large for the invite page",
                );
            };
            let (parts, body) = invite
                .serve(&parts.method, parts.uri.path(), &body)
                .await
                .into_parts();
            http::Response::from_parts(parts, front::full_body(body))
        }
    })
}

/// MatrixRTC's authorization service (`/livekit/jwt` on the matrix host): a small JSON body
/// in, JSON out, CORS open (Element Call asks from its own origin, as lk-jwt-service allows).
/// Without `[matrixrtc]` it says what is missing.
fn matrixrtc_handler(rtc: Option<Arc<crate::matrixrtc::Service>>) -> front::Handler {
    use http::StatusCode;
    use http::header::{self, HeaderValue};
    const MAX_BODY: usize = 64 * 1024;
    front::handler(move |req, _cx| {
        let rtc = rtc.clone();
        async move {
            let Some(rtc) = rtc else {
                return front::matrix_error(
                    StatusCode::NOT_FOUND,
                    "M_UNRECOGNIZED",
                    "no MatrixRTC focus here: group calls need a LiveKit server ([matrixrtc] in the config)",
                );
            };
            let (parts, body) = req.into_parts();
            let sub = parts
                .uri
                .path()
                .strip_prefix(crate::config::MATRIXRTC_PATH)
                .unwrap_or_default();
            let body = match front::read_body(body, MAX_BODY).await {
                Some(b) => b,
                None => {
                    return front::matrix_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "M_TOO_LARGE",
                        "the request body is over 64 KiB",
                    );
                }
            };
            let a = rtc.answer(&parts.method, sub, &body).await;
            let mut r = front::full(a.status, "application/json", a.body.to_string());
            for (name, value) in [
                (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
                (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"),
                (header::ACCESS_CONTROL_ALLOW_HEADERS, "Accept, Content-Type"),
            ] {
                r.headers_mut()
                    .insert(name, HeaderValue::from_static(value));
            }
            r
        }
    })
}

/// Element requests can take minutes (a download); they run beside the main loop.
async fn handle_request(app: &Arc<App>, r: control::Request) {
    let answer = |r: Result<element::Outcome, element::UpdateError>| match r {
        Ok(o) => {
            let mut v = serde_json::to_value(&o).expect("outcome serializes");
            v["message"] = element::describe(&o).into();
            v
        }
        Err(e) => serde_json::json!({"error": e.to_string()}),
    };
    match r {
        control::Request::Reload { reply } => {
            let mut report = reload(app).await;
            // The answer waits for a restarted Synapse to be ready again, beside the main loop
            // (a SIGTERM meanwhile is still handled at once).
            tokio::spawn(async move {
                report.wait_for_synapse().await;
                let _ = reply.send(serde_json::to_value(&report).expect("report serializes"));
            });
        }
        control::Request::ElementUpdate { check_only, reply } => {
            let el = app.element.clone();
            tokio::spawn(async move {
                let _ = reply.send(answer(el.update(check_only).await));
            });
        }
        control::Request::ElementRollback { reply } => {
            let el = app.element.clone();
            tokio::spawn(async move {
                let _ = reply.send(answer(el.rollback().await));
            });
        }
    }
}

/// What a reload re-applied, for `homelab-matrix reload` (the unit's ExecReload) to print.
#[derive(Default, serde::Serialize)]
pub struct ReloadReport {
    /// Nothing failed: every file was applied, or was unchanged.
    pub ok: bool,
    /// One sentence per step, in order, for the operator.
    pub lines: Vec<String>,
    /// The steps that failed (also in `lines`).
    pub errors: Vec<String>,
    /// The TOML file: "unchanged", "changed" (takes effect at the next restart) or "invalid".
    pub config_file: &'static str,
    /// Synapse: "unchanged", "restarted" or "failed".
    pub synapse: &'static str,
    /// After a restart: whether Synapse answered /health again.
    pub synapse_ready: Option<bool>,
    #[serde(skip)]
    restarted: Option<Arc<Child>>,
}

/// How long a reload's answer waits for a restarted Synapse (schema upgrades do not happen at a
/// reload, so this is a normal start).
const RELOAD_READY: Duration = Duration::from_secs(300);

impl ReloadReport {
    fn note(&mut self, line: String) {
        self.lines.push(line);
    }

    fn fail(&mut self, line: String) {
        self.lines.push(format!("FAILED: {line}"));
        self.errors.push(line);
        self.ok = false;
    }

    /// After a restart, waits until Synapse is ready again (or not, within `RELOAD_READY`).
    async fn wait_for_synapse(&mut self) {
        let Some(child) = self.restarted.take() else {
            return;
        };
        match child.wait_ready(RELOAD_READY).await {
            Ok(()) => {
                self.synapse_ready = Some(true);
                let pid = child.status().pid.map_or("?".into(), |p| p.to_string());
                self.note(format!("Synapse is ready again (pid {pid})"));
            }
            Err(e) => {
                self.synapse_ready = Some(false);
                self.fail(format!(
                    "{e:#}; `homelab-matrix status` and the journal say more"
                ));
            }
        }
    }
}

/// SIGHUP or `reload`: re-applies the operator's Synapse overrides (synapse.d) and restarts
/// Synapse if its config changed, Element's element.json, and in `files` mode the certificate
/// files. The TOML file is re-read to report mistakes early, but its changes need a restart of
/// the service: they touch the database, the ports and the identity of the server.
async fn reload(app: &App) -> ReloadReport {
    let mut report = ReloadReport {
        ok: true,
        ..Default::default()
    };
    let path = app.config_path.display();
    tracing::info!(config = %path, "reloading");
    report.config_file = match Config::load(&app.config_path) {
        Err(e) => {
            tracing::error!(
                "the config file has problems; the running config stays in effect: {e}"
            );
            report.fail(format!(
                "{path} has problems; the running config stays in effect: {e}"
            ));
            "invalid"
        }
        Ok(new) if new != app.cfg => {
            let msg = format!(
                "{path} changed; those changes take effect at the next `systemctl restart homelab-matrix`"
            );
            tracing::warn!("{msg}");
            report.note(msg);
            "changed"
        }
        Ok(_) => {
            report.note(format!("{path}: unchanged"));
            "unchanged"
        }
    };
    match app.element.reload_config(&app.cfg, app.https_port) {
        Ok(()) => report.note("Element: config.json re-applied (with element.json)".into()),
        Err(e) => {
            tracing::error!("Element's config.json stays as it was: {e:#}");
            report.fail(format!("Element's config.json stays as it was: {e:#}"));
        }
    }
    if app.cfg.tls.mode() == TlsMode::Files {
        let now = std::time::SystemTime::now();
        for name in app.cfg.served_names() {
            match load_files(&app.cfg, &name) {
                Some(Ok(c)) => {
                    tracing::info!(name = %name, expires = unix(c.not_after), "reloaded certificate files");
                    report.note(format!(
                        "certificate for {name}: reloaded from files (expires in {})",
                        crate::units::human_duration(c.remaining(now))
                    ));
                    app.certs.publish(&name, Arc::new(c));
                }
                Some(Err(e)) => {
                    tracing::error!(name = %name, "keeping the current certificate: {e:#}");
                    report.fail(format!(
                        "certificate for {name}: keeping the current one: {e:#}"
                    ));
                }
                None => report.note(format!(
                    "certificate for {name}: no files in {}/{name}/; keeping the current one",
                    app.cfg.tls.files_dir
                )),
            }
        }
    } else {
        report.note(format!(
            "certificates: tls.mode is {:?}, no certificate files to reload",
            app.cfg.tls.mode().as_str()
        ));
    }
    let result: Result<bool> = async {
        let user = RunAs::lookup(&app.cfg.synapse.user)?;
        if app.cfg.media.s3.enabled() {
            synapse::s3::check_provider(&app.cfg).await?;
        }
        if !synapse::render(&app.cfg, &app.secrets, &user)? {
            return Ok(false);
        }
        tracing::info!("Synapse's config changed; restarting it");
        let old = app.synapse.lock().unwrap().clone();
        let fresh = app
            .supervisor
            .replace(&old, synapse_spec(&app.cfg, user.clone(), app.upgrading))
            .await;
        *app.synapse.lock().unwrap() = fresh.clone();
        // Every process reads the shared file: the workers restart with the main one.
        let old_workers = app.workers.lock().unwrap().clone();
        let specs = worker_specs(app, &user);
        let mut fresh_workers = vec![];
        for (old, (_, spec)) in old_workers.iter().zip(specs) {
            fresh_workers.push(app.supervisor.replace(old, spec).await);
        }
        *app.workers.lock().unwrap() = fresh_workers;
        report.restarted = Some(fresh);
        Ok(true)
    }
    .await;
    report.synapse = match result {
        Ok(true) => {
            report.note("Synapse: its config changed (synapse.d); restarted it".into());
            "restarted"
        }
        Ok(false) => {
            tracing::info!("Synapse's config is unchanged");
            report.note("Synapse: config unchanged; it keeps running".into());
            "unchanged"
        }
        Err(e) => {
            tracing::error!("reload failed: {e:#}");
            report.fail(format!(
                "Synapse: re-applying its config failed, it keeps running as it was: {e:#}"
            ));
            "failed"
        }
    };
    report
}

impl App {
    fn base_url(&self, host: &str) -> String {
        format!("{}/", crate::http::https_url(host, self.https_port))
    }

    fn status(&self) -> Status {
        let acme = self.acme.as_ref().map(|a| a.status()).unwrap_or_default();
        let now = std::time::SystemTime::now();
        let certificates = self
            .certs
            .all()
            .into_iter()
            .map(|(name, c)| {
                let a = acme.get(&name).cloned().unwrap_or_default();
                serde_json::json!({
                    "name": name,
                    "source": c.source,
                    "issuer": c.issuer,
                    "not_after": unix(c.not_after),
                    "expires_in_secs": c.remaining(now).as_secs(),
                    "next_attempt": a.next_attempt,
                    "last_error": a.last_error,
                    "failures": a.failures,
                })
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            server_name: self.cfg.server_name.clone(),
            phase: self.phase.lock().unwrap().to_string(),
            state_dir: self.cfg.state.dir.clone(),
            synapse_url: self.cfg.synapse_local_url(),
            url: self.base_url(&self.cfg.hosts.matrix),
            element_url: self.base_url(&self.cfg.hosts.element),
            tls_mode: self.cfg.tls.mode().as_str().to_owned(),
            ca_root: self.ca.root_path.display().to_string(),
            turn_uris: if self.cfg.turn.enabled {
                crate::coturn::uris(&self.cfg)
            } else {
                vec![]
            },
            certificates,
            children: self.supervisor.status(),
            element: self.element.status(),
            bot: self.bot.status(),
            upstream: self.upstream.status(),
            problems: self.alerts.active(),
        }
    }
}

fn acme_settings(cfg: &Config) -> acme::Settings {
    acme::Settings {
        directory: cfg.tls.acme_directory.clone(),
        email: cfg.tls.acme_email.clone(),
        ca_root: cfg.tls.acme_ca_roots.first().map(PathBuf::from),
        challenges: cfg
            .tls
            .challenges
            .iter()
            .map(|c| match c.as_str() {
                "tls-alpn-01" => instant_acme::ChallengeType::TlsAlpn01,
                _ => instant_acme::ChallengeType::Http01,
            })
            .collect(),
        timeout: cfg.acme_timeout(),
        check_interval: cfg.acme_check_interval(),
    }
}

/// The certificates to serve from the first handshake on: saved ACME ones, the operator's
/// files, or else one from the internal CA, so that 443 is never without a certificate.
fn load_certificates(cfg: &Config) -> Result<(Arc<CertStore>, InternalCa)> {
    let state = cfg.state_dir();
    let store = CertStore::new(&state.join("acme").join("certs"), &cfg.hosts.matrix);
    let ca = InternalCa::load_or_create(&state.join("ca"), &cfg.server_name)?;
    let now = std::time::SystemTime::now();
    for name in cfg.served_names() {
        let loaded = match cfg.tls.mode() {
            TlsMode::Acme => store.load_saved(&name, Source::Acme),
            TlsMode::Files => load_files(cfg, &name),
            TlsMode::Internal => None,
        };
        match loaded {
            Some(Ok(c)) if c.remaining(now) > Duration::ZERO => {
                store.publish(&name, Arc::new(c));
                continue;
            }
            Some(Ok(_)) => tracing::warn!(name = %name, "the saved certificate has expired"),
            Some(Err(e)) => tracing::error!(name = %name, "{e:#}"),
            None if cfg.tls.mode() == TlsMode::Files => tracing::warn!(
                name = %name,
                "no certificate files in {}/{name}/ (fullchain.pem, privkey.pem); serving one from the internal CA",
                cfg.tls.files_dir
            ),
            None => {}
        }
        store.publish(
            &name,
            Arc::new(ca.issue(std::slice::from_ref(&name), INTERNAL_VALIDITY)?),
        );
    }
    Ok((store, ca))
}

fn load_files(cfg: &Config, name: &str) -> Option<Result<Cert>> {
    let d = Path::new(&cfg.tls.files_dir).join(name);
    let chain = std::fs::read_to_string(d.join("fullchain.pem")).ok()?;
    Some(
        std::fs::read_to_string(d.join("privkey.pem"))
            .context("reading privkey.pem")
            .and_then(|key| Cert::parse(&chain, &key, Source::Files))
            .with_context(|| format!("loading {}", d.display())),
    )
}

/// Re-issues internal-CA certificates when a third of their life is left.
async fn maintain_internal(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(12 * 3600)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = std::time::SystemTime::now();
        for (name, c) in app.certs.all() {
            if c.source == Source::Internal && c.remaining(now) < c.lifetime() / 3 {
                match app.ca.issue(std::slice::from_ref(&name), INTERNAL_VALIDITY) {
                    Ok(fresh) => app.certs.publish(&name, Arc::new(fresh)),
                    Err(e) => {
                        tracing::error!(name = %name, "re-issuing the internal certificate: {e:#}")
                    }
                }
            }
        }
    }
}
