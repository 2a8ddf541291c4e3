//! The command line (DESIGN.md §5). Exit codes: 0 ok, 1 failure, 2 usage or invalid config.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::app::{self, RunError};
use crate::config::{self, Config, ConfigError};
use crate::control;
use crate::postgres;
use crate::secrets::Secrets;
use crate::synapse::admin::{self, RegistrationToken};
use crate::units::human_duration;

mod pg;
mod users;
pub use pg::PostgresCmd;
pub use users::UserCmd;

#[derive(Debug, Parser)]
#[command(
    name = "homelab-matrix",
    version,
    about = "A private, federating Matrix server on one Debian host",
    long_about = "homelab-matrix runs Synapse under one supervisor, provisions its PostgreSQL database, terminates TLS itself on 443 and 8448 with ACME (or internal-CA) certificates, proxies the Matrix APIs and serves the well-known files, all configured from one file: /etc/homelab-matrix/homelab-matrix.toml."
)]
pub struct Cli {
    /// The config file.
    #[arg(long, short, global = true, env = "HOMELAB_MATRIX_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the appliance in the foreground (the systemd unit's ExecStart).
    Run,
    /// Validate the config file; print every problem with its key and fix; exit 2 if invalid.
    CheckConfig,
    /// Show the children, their state, pid, uptime and restarts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Re-apply synapse.d (restarting Synapse if its config changed), element.json and the
    /// certificate files now, and print what was re-applied; exit 1 if something failed, 2 if
    /// the config file is invalid (then nothing is reloaded). The unit's ExecReload: what
    /// `systemctl reload homelab-matrix` runs.
    Reload,
    /// Create or check PostgreSQL's role and database for Synapse now (run does it at every start).
    ProvisionDb {
        /// Provision once with this superuser login (an external server's admin account), then
        /// run with `provision = false`; its password may come from PGPASSWORD instead.
        #[arg(long, value_name = "DSN")]
        superuser_dsn: Option<String>,
    },
    /// The local PostgreSQL: `postgres upgrade` moves the database to the newest major installed.
    #[command(subcommand)]
    Postgres(PostgresCmd),
    /// Check the appliance from the outside in (certificates, delegation, federation, Synapse,
    /// PostgreSQL, disk, clock, Element): one line per check with what was seen and the fix;
    /// exit 0 when none fails (warnings allowed), 1 when one fails.
    Doctor(DoctorArgs),
    /// Manage Matrix users.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage registration tokens (registration is only possible with one).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Element Web: check for, install or roll back releases.
    #[command(subcommand)]
    Element(ElementCmd),
    /// Back up everything now, online, into one root-only file (default: into backup.dir);
    /// `backup verify FILE` checks one by restoring it into a scratch database.
    Backup(BackupArgs),
    /// Restore a backup onto this appliance (stopped; freshly installed or purged): refuses a
    /// damaged file, another server's backup, and a database holding users unless --force.
    Restore {
        /// The backup file (homelab-matrix-<server>-<time>-<kind>.tar).
        file: PathBuf,
        /// Replace a database that already holds users.
        #[arg(long)]
        force: bool,
    },
    /// Install new versions of the appliance's packages (and Synapse's) from the configured apt
    /// sources, nothing else; a snapshot comes first, and an upgrade on which Synapse never
    /// becomes healthy is undone by itself. homelab-matrix-upgrade.timer runs it daily.
    Upgrade {
        /// As the timer runs it: does nothing unless upgrades.unattended is on.
        #[arg(long)]
        unattended: bool,
    },
    /// Undo the pending upgrade (one on which Synapse has not been healthy yet): the kept
    /// packages of before it installed again and held, then its snapshot restored. The service
    /// does this by itself when Synapse fails on the new version.
    Rollback {
        /// Why, for `status` (the service gives its own).
        #[arg(long, hide = true)]
        reason: Option<String>,
    },
    /// Internal: the PostgreSQL provisioning helper, run as the postgres user by `run`.
    #[command(hide = true)]
    ProvisionDbHelper,
    /// Packaging: write the man pages and shell completions into DIR.
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run only this family of checks (dns, ports, tls, turn-tls, turn, turn-relay, delegation-server,
    /// delegation-client, federation-in, federation-out, synapse, postgres, disk, clock,
    /// element) or one check (e.g. tls:matrix.example.org, dns:matrix.example.org).
    #[arg(long, value_name = "NAME")]
    pub only: Option<String>,
    /// The remote server for the outbound federation check and the clock estimate.
    #[arg(long, default_value = crate::doctor::DEFAULT_REMOTE)]
    pub remote: String,
    /// The nameserver for server discovery's SRV lookups, ADDR or ADDR:PORT (default: the
    /// first nameserver in /etc/resolv.conf).
    #[arg(long, value_name = "ADDR")]
    pub nameserver: Option<String>,
    /// This runs on another network than the appliance (with a copy of its config and state,
    /// e.g. `--only ports`): a port that does not answer at the public address fails instead of
    /// being put down to a router that does not loop back.
    #[arg(long)]
    pub outside: bool,
    /// Tests: resolve NAME to ADDR instead of asking DNS (like curl --resolve).
    #[arg(long, value_name = "NAME=ADDR", hide = true)]
    pub resolve: Vec<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub cmd: Option<BackupCmd>,
    /// Write just the file into DIR (made root 0700 if missing; an existing one must be
    /// root-only), without the verify, retention and restic copy of a run into backup.dir.
    #[arg(long, value_name = "DIR")]
    pub to: Option<PathBuf>,
    /// Packaging: the snapshot the preinst takes before an upgrade.
    #[arg(long, hide = true)]
    pub pre_upgrade: bool,
}

#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Check every part's sha256, restore the database into a scratch database and compare
    /// its row counts with the manifest's; exit 1 when the backup cannot be trusted.
    Verify { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ElementCmd {
    /// Check the release URL now and install a newer signed release (the running service
    /// does this by itself every element.check_interval).
    Update {
        /// Only report whether a newer release exists.
        #[arg(long)]
        check: bool,
    },
    /// Serve the previous release again, and hold automatic updates until a release newer
    /// than the current one appears.
    Rollback,
    /// Packaging: download and verify the release pinned in LOCK into OUT/element.
    #[command(hide = true)]
    FetchPinned {
        #[arg(long)]
        lock: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token; prints it.
    Create(CreateArgs),
    /// List tokens.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one token.
    Show {
        /// Synapse's tokens may start with '-', which must not read as an option.
        #[arg(allow_hyphen_values = true)]
        token: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a token.
    Delete {
        #[arg(allow_hyphen_values = true)]
        token: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// How many registrations it allows, or "unlimited".
    #[arg(long, default_value = "1")]
    pub uses: String,
    /// How long it is valid (e.g. 24h, 7d), or "never".
    #[arg(long, default_value = "7d")]
    pub expires: String,
    /// Choose the token yourself (A-Z a-z 0-9 . _ ~ -, at most 64); default: Synapse picks one.
    #[arg(long)]
    pub token: Option<String>,
    /// Print the token, its limits and its invite link as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    crate::init_tracing(matches!(cli.command, Cmd::Run));
    // One TLS provider for the whole process, before any TLS config is built: ring, as
    // everything here is built for. matrix-sdk's reqwest also brings aws-lc-rs, and with two
    // providers compiled in rustls cannot choose one by itself and panics. Our own reqwest
    // (Element updates) has no provider of its own and takes this one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    rt.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> i32 {
    let path = cli.config.clone();
    let result = match cli.command {
        Cmd::Run => match app::run(&path).await {
            Ok(()) => Ok(()),
            Err(RunError::Config(e)) => return config_exit(e),
            Err(RunError::Other(e)) => Err(e),
        },
        Cmd::CheckConfig => return check_config(&path),
        Cmd::ProvisionDbHelper => return postgres::helper_main().await,
        Cmd::GenerateAssets { dir } => generate_assets(&dir),
        // Package-build time: no config exists yet.
        Cmd::Element(ElementCmd::FetchPinned { lock, out }) => {
            crate::element::fetch_pinned(&lock, &out)
                .await
                .map(|m| println!("{m}"))
        }
        Cmd::Doctor(args) => match Config::load(&path) {
            Err(e) => return config_exit(e),
            Ok(cfg) => return doctor(&cfg, args).await,
        },
        Cmd::Backup(args) => match Config::load(&path) {
            Err(e) => return config_exit(e),
            Ok(cfg) => backup(&cfg, &path, args).await,
        },
        Cmd::Postgres(p) => match Config::load(&path) {
            Err(e) => return config_exit(e),
            Ok(cfg) => pg::run(&cfg, &path, p).await,
        },
        Cmd::Rollback { reason } => match Config::load(&path) {
            Err(e) => return config_exit(e),
            Ok(cfg) => crate::backup::rollback::run(&cfg, &path, reason)
                .await
                .map(|r| println!("{r}")),
        },
        Cmd::Restore { file, force } => match Config::load(&path) {
            Err(e) => return config_exit(e),
            Ok(cfg) => crate::backup::restore::restore(&cfg, &path, &file, force)
                .await
                .map(|r| println!("{r}")),
        },
        cmd => match Config::load(&path) {
            Err(e) => return config_exit(e),
            Ok(cfg) => other(cmd, &cfg).await,
        },
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.is::<users::UsageError>() { 2 } else { 1 }
        }
    }
}

/// man/homelab-matrix.1 (and one page per subcommand), completions/{bash,zsh,fish}.
fn generate_assets(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man).context("writing man pages")?;
    let comp = dir.join("completions");
    std::fs::create_dir_all(&comp)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "homelab-matrix", &comp)
            .context("writing shell completions")?;
    }
    Ok(())
}

fn config_exit(e: ConfigError) -> i32 {
    eprintln!("{e}");
    2
}

fn check_config(path: &Path) -> i32 {
    match Config::load(path) {
        Err(e) => config_exit(e),
        Ok(cfg) => {
            let env = crate::app::environment_problems(&cfg);
            if !env.is_empty() {
                return config_exit(ConfigError::Invalid {
                    path: path.to_owned(),
                    problems: env,
                });
            }
            println!(
                "{}: ok (server {}, Matrix host {}, Synapse on 127.0.0.1:{}, database {} as {})",
                path.display(),
                cfg.server_name,
                cfg.hosts.matrix,
                cfg.synapse.port,
                cfg.postgres.database,
                cfg.postgres.user
            );
            0
        }
    }
}

async fn other(cmd: Cmd, cfg: &Config) -> Result<()> {
    match cmd {
        Cmd::Status { json } => status(cfg, json).await,
        Cmd::Reload => reload(cfg).await,
        Cmd::Upgrade { unattended } => crate::apt::unattended::run(cfg, unattended)
            .await
            .map(|r| println!("{r}")),
        Cmd::ProvisionDb { superuser_dsn } => {
            let secrets = Secrets::ensure(&cfg.state_dir())?;
            let mut cfg = cfg.clone();
            if let Some(dsn) = superuser_dsn {
                if let Err(e) = dsn.parse::<tokio_postgres::Config>() {
                    bail!(
                        "--superuser-dsn is not a PostgreSQL connection string ({e}); write it like \"host=db.lan user=admin dbname=postgres\""
                    );
                }
                cfg.postgres.superuser_dsn = dsn;
                cfg.postgres.provision = true;
            }
            let cfg = &cfg;
            let report = postgres::provision(cfg, &postgres::password(cfg, &secrets)?).await?;
            println!(
                "database {:?}, role {:?}: {report}",
                cfg.postgres.database, cfg.postgres.user
            );
            Ok(())
        }
        Cmd::User(u) => users::run(cfg, u).await,
        Cmd::Token(t) => token(cfg, t).await,
        Cmd::Element(e) => {
            let what = match e {
                ElementCmd::Update { check: true } => "element-check",
                ElementCmd::Update { check: false } => "element-update",
                ElementCmd::Rollback => "element-rollback",
                ElementCmd::FetchPinned { .. } => unreachable!("handled in dispatch"),
            };
            // An `error` answer is already an Err from control::request.
            let v = ask(cfg, what).await?;
            println!("Element: {}", v["message"].as_str().unwrap_or("done"));
            Ok(())
        }
        Cmd::Run
        | Cmd::CheckConfig
        | Cmd::ProvisionDbHelper
        | Cmd::GenerateAssets { .. }
        | Cmd::Backup(_)
        | Cmd::Restore { .. }
        | Cmd::Rollback { .. }
        | Cmd::Postgres(_)
        | Cmd::Doctor(_) => {
            unreachable!("handled in dispatch")
        }
    }
}

/// `doctor`: exit 0 all passed, 1 a check failed, 2 usage.
async fn doctor(cfg: &Config, args: DoctorArgs) -> i32 {
    let mut resolve = vec![];
    for r in &args.resolve {
        match r.split_once('=').map(|(n, a)| (n, a.parse())) {
            Some((n, Ok(ip))) => resolve.push((n.to_string(), ip)),
            _ => {
                eprintln!("--resolve {r:?}: use NAME=ADDR, e.g. matrix.example.org=192.0.2.1");
                return 2;
            }
        }
    }
    let nameserver = match args.nameserver.as_deref().map(|n| {
        n.parse::<std::net::SocketAddr>()
            .or_else(|_| n.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
    }) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            eprintln!(
                "--nameserver {:?}: use ADDR or ADDR:PORT, e.g. 192.0.2.53",
                args.nameserver.unwrap_or_default()
            );
            return 2;
        }
    };
    if let Some(o) = &args.only
        && !crate::doctor::valid_only(cfg, o)
    {
        eprintln!(
            "--only {o:?}: not a check; use one of {}, or tls:<served name> or dns:<served name>",
            crate::doctor::FAMILIES.join(", ")
        );
        return 2;
    }
    let opts = crate::doctor::Options {
        only: args.only,
        resolve,
        remote: args.remote,
        nameserver,
        outside: args.outside,
    };
    let report = crate::doctor::run(cfg, &opts).await;
    if opts.only.is_none()
        && let Err(e) = crate::doctor::save(cfg, &report)
    {
        eprintln!("warning: the report is not kept for `status`: {e:#}");
    }
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", report.render());
    }
    report.exit_code()
}

/// `backup [--to DIR]` and `backup verify FILE`.
async fn backup(cfg: &Config, config_path: &Path, args: BackupArgs) -> Result<()> {
    use crate::backup::{self, schedule};
    if let Some(BackupCmd::Verify { file }) = args.cmd {
        let v = backup::verify(cfg, &file).await?;
        let db = if v.restored {
            format!(
                "the database restored into a scratch database with {} tables and {} rows, as the manifest counted",
                v.tables, v.rows
            )
        } else {
            format!(
                "the database dump ({} tables, {} rows) reads through; it was not test-restored, as with postgres.provision = false there is no scratch database to restore into",
                v.tables, v.rows
            )
        };
        println!(
            "{}: ok: every part matches its sha256; {db} (made {} UTC of {})",
            file.display(),
            schedule::stamp(v.manifest.created_at),
            v.manifest.server_name
        );
        return Ok(());
    }
    let kind = if args.pre_upgrade {
        "pre-upgrade"
    } else {
        "manual"
    };
    // Into backup.dir: what the daily run does (verified, pruned, copied to restic).
    let Some(dir) = args.to.filter(|_| !args.pre_upgrade) else {
        let (made, restic) = schedule::run_once(cfg, config_path, kind)
            .await
            .map_err(|e| {
                e.context(
                    "no backup was kept; fix the cause above and run `homelab-matrix backup` again",
                )
            })?;
        println!("{made}");
        println!("verified: the database restores with the counts of the manifest");
        if let Some(r) = restic {
            println!("copied to the restic repository {r}");
        }
        return Ok(());
    };
    let made = match backup::make(cfg, config_path, &dir, kind).await {
        Ok(m) => m,
        Err(e) => {
            let _ = schedule::record_failure(cfg, &format!("{e:#}"));
            return Err(e.context(
                "no backup was written; fix the cause above and run `homelab-matrix backup` again",
            ));
        }
    };
    if let Err(e) = schedule::record_good(cfg, &made, None) {
        eprintln!("warning: `status` will not show this backup: {e:#}");
    }
    println!("{made}");
    println!(
        "check it with: homelab-matrix backup verify {}",
        made.file.display()
    );
    Ok(())
}

/// Asks the running service to reload and prints its report (app::ReloadReport).
async fn reload(cfg: &Config) -> Result<()> {
    let v = ask(cfg, "reload").await?;
    for line in v["lines"].as_array().into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or("?"));
    }
    if v["ok"] != true {
        let n = v["errors"].as_array().map_or(0, |e| e.len());
        bail!(
            "reload incomplete: {n} step(s) failed (above); what was running before stays in effect for those. Fix them and run `homelab-matrix reload` again"
        );
    }
    Ok(())
}

/// A request to the running service. When its socket cannot be reached, the instance lock
/// says whether the service runs at all: a socket lost or removed must not make a running
/// server look stopped (and someone then start a second one).
async fn ask(cfg: &Config, what: &str) -> Result<serde_json::Value> {
    let socket = cfg.control_socket();
    let e = match control::request(&socket, what).await {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let unreachable = e.root_cause().downcast_ref::<std::io::Error>().is_some();
    match crate::instance::Instance::holder(&cfg.state_dir()) {
        Some(holder) if unreachable => bail!(
            "homelab-matrix is running ({holder}), but its control socket {} does not answer ({}); `systemctl restart homelab-matrix` makes a new one",
            socket.display(),
            e.root_cause()
        ),
        _ => Err(e),
    }
}

async fn status(cfg: &Config, json: bool) -> Result<()> {
    let rollback = crate::backup::rollback::load(cfg);
    let mut v = match ask(cfg, "status").await {
        Ok(v) => v,
        Err(e) => {
            // The service is down; a rollback under way (or one that failed) is why.
            if let Some(r) = &rollback {
                eprintln!("{}", r.summary());
            }
            return Err(e);
        }
    };
    v["rollback"] = serde_json::to_value(&rollback)?;
    // The database on an older PostgreSQL than one a dist-upgrade installed beside it.
    let pg_behind = if cfg.postgres.on_this_host() {
        let clusters = postgres::clusters::list().await.unwrap_or_default();
        postgres::clusters::behind(
            &clusters,
            cfg.postgres.port,
            postgres::clusters::newest_installed(),
        )
    } else {
        None
    };
    v["postgres_behind"] = match &pg_behind {
        Some((old, newest)) => serde_json::json!({"serving": old.version, "newest": newest}),
        None => serde_json::Value::Null,
    };
    let doctor = crate::doctor::load_last(cfg);
    let backup = crate::backup::schedule::load_last(cfg);
    let upgrade = crate::backup::upgrade::load_pending(cfg);
    v["backup"] = serde_json::to_value(&backup)?;
    v["upgrade"] = serde_json::to_value(&upgrade)?;
    if let Some(d) = &doctor {
        v["doctor"] = serde_json::json!({
            "ran_at": d.ran_at,
            "summary": d.summary(),
            "failed": d.failing(),
        });
    }
    v["matrixrtc"] = crate::matrixrtc::status(cfg);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "homelab-matrix {} (pid {}): {}, server {}",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        v["phase"].as_str().unwrap_or("?"),
        v["server_name"].as_str().unwrap_or("?")
    );
    println!(
        "URL: {}   (Element: {})",
        v["url"].as_str().unwrap_or("?"),
        v["element_url"].as_str().unwrap_or("?")
    );
    if v["tls_mode"] != "acme" {
        println!(
            "TLS: {} CA; clients trust {}",
            v["tls_mode"].as_str().unwrap_or("?"),
            v["ca_root"].as_str().unwrap_or("?")
        );
    }
    if let Some(uris) = v["turn_uris"].as_array().filter(|u| !u.is_empty()) {
        let uris: Vec<&str> = uris.iter().filter_map(|u| u.as_str()).collect();
        println!("TURN: {}", uris.join("  "));
    }
    println!("{}", crate::matrixrtc::status_line(&v["matrixrtc"]));
    let el = &v["element"];
    println!(
        "Element: {}{}",
        el["version"].as_str().unwrap_or("not installed yet"),
        el["last_error"]
            .as_str()
            .map_or(String::new(), |e| format!("   (last update failed: {e})"))
    );
    let up = &v["upstream"];
    println!(
        "To Synapse: {} of {} requests in flight, {} long-polls held; {} given up by their clients (each closed at Synapse at once)",
        up["requests"], up["requests_cap"], up["long_polls"], up["abandoned"]
    );
    println!();
    println!("CHILD      STATE      USER             PID         UPTIME  RESTARTS  LAST EXIT");
    for c in v["children"].as_array().into_iter().flatten() {
        let state = if c["crash_loop"].as_bool() == Some(true) {
            format!("{} (crash loop)", c["state"].as_str().unwrap_or("?"))
        } else {
            c["state"].as_str().unwrap_or("?").to_string()
        };
        println!(
            "{:<10} {:<10} {:<16} {:<8} {:>9}  {:<8}  {}",
            c["name"].as_str().unwrap_or("?"),
            state,
            c["user"].as_str().unwrap_or("?"),
            c["pid"].as_i64().map_or("-".into(), |p| p.to_string()),
            c["uptime_secs"]
                .as_u64()
                .map_or("-".into(), |s| human_duration(Duration::from_secs(s))),
            c["restarts"],
            c["last_exit"].as_str().unwrap_or("-"),
        );
    }
    println!();
    println!("CERTIFICATE                  SOURCE    EXPIRES IN  NEXT ATTEMPT  ISSUER");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for c in v["certificates"].as_array().into_iter().flatten() {
        let next = c["next_attempt"].as_u64().map_or("-".into(), |t| {
            human_duration(Duration::from_secs(t.saturating_sub(now)))
        });
        println!(
            "{:<28} {:<9} {:>10}  {:>12}  {}",
            c["name"].as_str().unwrap_or("?"),
            c["source"].as_str().unwrap_or("?"),
            human_duration(Duration::from_secs(
                c["expires_in_secs"].as_u64().unwrap_or(0)
            )),
            next,
            c["issuer"].as_str().unwrap_or("?"),
        );
        if let Some(e) = c["last_error"].as_str() {
            println!("    last error ({} failures): {e}", c["failures"]);
        }
    }
    let bot = &v["bot"];
    println!();
    print!("BOT: {}", bot["state"].as_str().unwrap_or("?"));
    if let Some(u) = bot["user_id"].as_str() {
        print!(
            " as {u}, device {}{}",
            bot["device_id"].as_str().unwrap_or("?"),
            if bot["cross_signed"] == true {
                " (cross-signed)"
            } else {
                " (not cross-signed)"
            }
        );
    }
    println!();
    if let Some(e) = bot["last_error"].as_str() {
        println!("    last error: {e}");
    }
    println!();
    match &doctor {
        Some(d) => {
            let failing = d.failing();
            println!(
                "DOCTOR: last run {} ago: {}{}",
                human_duration(Duration::from_secs(now.saturating_sub(d.ran_at))),
                d.summary(),
                if failing.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({}; `homelab-matrix doctor` says how to fix)",
                        failing.join(", ")
                    )
                }
            );
        }
        None => println!("DOCTOR: never run; `homelab-matrix doctor` checks the whole path"),
    }
    print_backup(cfg, backup.as_ref(), now);
    if let Some(u) = &upgrade {
        println!("UPGRADE: {}", u.how_to_go_back());
    }
    if let Some(r) = &rollback {
        println!("{}", r.summary());
    }
    if let Some((old, newest)) = &pg_behind {
        println!(
            "POSTGRES: the database lives on PostgreSQL {} while {newest} is installed (a dist-upgrade): `homelab-matrix postgres upgrade` moves it, a snapshot first",
            old.version
        );
    }
    for p in v["problems"].as_array().into_iter().flatten() {
        println!(
            "PROBLEM {}: {}",
            p["key"].as_str().unwrap_or("?"),
            p["message"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn print_backup(cfg: &Config, last: Option<&crate::backup::schedule::Last>, now: u64) {
    let ago = |t: u64| human_duration(Duration::from_secs(now.saturating_sub(t)));
    match last.and_then(|l| l.good.as_ref()) {
        Some(g) => println!(
            "BACKUP: last good {} ago, {}: {}{}",
            ago(g.created_at),
            crate::units::human_size(g.size),
            g.file.display(),
            last.and_then(|l| l.restic.as_ref())
                .map_or(String::new(), |r| format!(" (copied to restic {r})"))
        ),
        None if cfg.backup.enabled => println!(
            "BACKUP: none yet; the first daily one runs at {} UTC (or run `homelab-matrix backup`)",
            cfg.backup.time.text()
        ),
        None => println!("BACKUP: off (backup.enabled = false) and none made"),
    }
    if let Some(f) = last.and_then(|l| l.failure.as_ref()) {
        println!("    last attempt failed {} ago: {}", ago(f.at), f.error);
    }
}

async fn token(cfg: &Config, cmd: TokenCmd) -> Result<()> {
    let secrets = Secrets::open(&cfg.state_dir());
    let session = admin::Synapse::new(&cfg.synapse_local_url())
        .service_session(&secrets)
        .await?;
    match cmd {
        TokenCmd::Create(a) => {
            if let Some(t) = &a.token
                && !admin::valid_token(t)
            {
                bail!("--token {t:?}: use at most 64 of A-Z a-z 0-9 . _ ~ -");
            }
            let uses = admin::parse_uses(&a.uses).map_err(|e| anyhow::anyhow!("--uses: {e}"))?;
            let expiry = admin::parse_expiry(&a.expires)
                .map_err(|e| anyhow::anyhow!("--expires: {e}"))?
                .map(|d| now_ms() + d.as_millis() as i64);
            let t = session
                .create_token(a.token.as_deref(), uses, expiry)
                .await?;
            let link = crate::invite::link(cfg, &t.token);
            if a.json {
                let mut v = serde_json::to_value(&t)?;
                v["link"] = link.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "{}; send this invite link, where anyone can sign up with it: {link}",
                    describe(&t)
                );
            }
        }
        TokenCmd::List { json } => {
            let tokens = session.list_tokens().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else if tokens.is_empty() {
                println!("no registration tokens; make one with `homelab-matrix token create`");
            } else {
                for t in tokens {
                    println!("{:<24} {}", t.token, describe(&t));
                }
            }
        }
        TokenCmd::Show { token, json } => {
            let t = session.get_token(&token).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{:<24} {}", t.token, describe(&t));
            }
        }
        TokenCmd::Delete { token } => {
            session.delete_token(&token).await?;
            println!("deleted {token}");
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn describe(t: &RegistrationToken) -> String {
    t.describe(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synapse generates tokens from A-Z a-z 0-9 . _ ~ -, so one in 66 starts with '-'.
    #[test]
    fn a_token_may_start_with_a_hyphen() {
        let cli =
            Cli::try_parse_from(["homelab-matrix", "token", "show", "-xY1", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Token(TokenCmd::Show { ref token, json: true }) if token == "-xY1"
        ));
        let cli = Cli::try_parse_from(["homelab-matrix", "token", "delete", "-xY1"]).unwrap();
        assert!(
            matches!(cli.command, Cmd::Token(TokenCmd::Delete { ref token }) if token == "-xY1")
        );
    }
}
