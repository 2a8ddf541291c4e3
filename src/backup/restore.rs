//! `homelab-matrix restore FILE [--force]`: onto a freshly installed appliance (or after a
//! purge), with the service stopped. Refuses a damaged file, another server's backup, and a
//! database that holds users besides the appliance's own accounts (unless `--force`). Then:
//! every file back with its owner and mode, the role and database as provisioning makes them
//! (UTF8, C, template0), the dump restored by the role itself, `e2e_one_time_keys_json`
//! emptied before Synapse's first start (Synapse docs, "Backups"), and the service started.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::archive::{self, Manifest};
use super::db;
use crate::config::Config;
use crate::fsutil::{Dir, Owner, ensure_dir};
use crate::secrets::{Kind, Secrets};
use crate::supervisor::{self, Command, RunAs};

/// Directories of the state dir that root owns and a backup holds whole.
pub const ROOT_AREAS: [&str; 4] = ["secrets", "acme", "ca", "bot"];
/// Synapse's own directory, of which a backup holds the signing key and local media.
pub const SYNAPSE_DATA: &str = "synapse-data";
/// Archive names of the operator's files.
pub const CONFIG_FILE: &str = "config/homelab-matrix.toml";
pub const ELEMENT_JSON: &str = "config/element.json";
pub const SYNAPSE_D: &str = "config/synapse.d";
pub const TLS_FILES: &str = "config/tls";

/// Why a restore was refused before it changed anything.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "homelab-matrix is running; a restore must not race the live server. Stop it first (systemctl stop homelab-matrix), then run the restore again"
    )]
    Running,
    #[error(
        "this backup is of server {backup:?}, but this appliance is {here:?}: Matrix IDs (@user:{backup}) and the signing key belong to one server name and cannot move to another. Set server_name = {backup:?} in the config file to restore it here, or restore it on the box that serves {backup}"
    )]
    OtherServer { backup: String, here: String },
    #[error(
        "database {database:?} already holds {users} user(s) besides the appliance's own accounts; a restore replaces all of it. Take a backup of it first (homelab-matrix backup), then run the restore again with --force"
    )]
    HoldsData { database: String, users: i64 },
    #[error(
        "{0}: not a part this version can restore; use the homelab-matrix that made the backup"
    )]
    UnknownPart(String),
}

/// Where one archive member goes.
struct Target {
    /// The root-owned directory it is below (opened from its path).
    base: std::path::PathBuf,
    /// Path components below `base`.
    rel: Vec<String>,
    owner: Owner,
    dir_mode: u32,
    /// None: the mode recorded in the archive.
    file_mode: Option<u32>,
}

fn target(cfg: &Config, config_path: &Path, synapse: Owner, name: &str) -> Result<Target> {
    let parts: Vec<&str> = name.split('/').collect();
    // A crafted archive must not climb out: only plain names.
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        bail!(Refused::UnknownPart(name.to_string()));
    }
    let root = Owner::root();
    let config_dir = config_path.parent().unwrap_or(Path::new("/"));
    let t = |base: &Path, rel: &[&str], owner, dir_mode, file_mode| Target {
        base: base.to_owned(),
        rel: rel.iter().map(|s| s.to_string()).collect(),
        owner,
        dir_mode,
        file_mode,
    };
    Ok(match parts.as_slice() {
        ["state", "secrets", rest @ ..] if rest.len() == 1 => {
            t(&cfg.state_dir(), &parts[1..], root, 0o700, Some(0o600))
        }
        ["state", area, rest @ ..] if ROOT_AREAS.contains(area) && !rest.is_empty() => {
            t(&cfg.state_dir(), &parts[1..], root, 0o700, None)
        }
        ["state", SYNAPSE_DATA, "signing.key"]
        | [
            "state",
            SYNAPSE_DATA,
            "media_store",
            "local_content" | "local_thumbnails",
            ..,
        ] => t(&cfg.state_dir(), &parts[1..], synapse, 0o700, None),
        ["config", "homelab-matrix.toml"] => {
            let file = config_path
                .file_name()
                .and_then(OsStr::to_str)
                .context("the config path has no file name")?;
            Target {
                base: config_dir.to_owned(),
                rel: vec![file.to_string()],
                owner: root,
                dir_mode: 0o755,
                file_mode: Some(0o640),
            }
        }
        ["config", "element.json"] => t(config_dir, &parts[1..], root, 0o755, None),
        ["config", "synapse.d", rest @ ..] if !rest.is_empty() => {
            t(Path::new(&cfg.synapse.config_dir), rest, root, 0o755, None)
        }
        ["config", "tls", rest @ ..] if !rest.is_empty() => {
            t(Path::new(&cfg.tls.files_dir), rest, root, 0o750, None)
        }
        _ => bail!(Refused::UnknownPart(name.to_string())),
    })
}

/// Writes `data` at `t`, making the directories on the way (each through its parent's
/// descriptor, never following a link).
fn write(t: &Target, data: &[u8], mode: u32) -> Result<()> {
    let (file, dirs) = t.rel.split_last().expect("at least a file name");
    let mut dir = match t.base.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            std::fs::create_dir_all(p)?;
            let name = t.base.file_name().and_then(OsStr::to_str).unwrap_or(".");
            // The base itself (state dir, config dir, synapse.d) stays root's and readable.
            Dir::open(p)?.ensure_sub(name, Owner::root(), 0o755)?
        }
        _ => Dir::open(&t.base)?,
    };
    for d in dirs {
        dir = dir.ensure_sub(d, t.owner, t.dir_mode)?;
    }
    dir.write_atomic(file, data, t.owner, t.file_mode.unwrap_or(mode & 0o777))
}

/// What a restore did, for the operator.
pub struct Restored {
    pub manifest: Manifest,
    pub files: usize,
    pub started: Option<String>,
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.manifest;
        writeln!(
            f,
            "restored the {} backup of {} made at {} UTC:",
            m.kind,
            m.server_name,
            super::schedule::stamp(m.created_at)
        )?;
        writeln!(
            f,
            "  database {}: {} tables, {} rows (one-time keys emptied, as Synapse's backup doc says)",
            m.database.name,
            m.database.row_counts.len(),
            m.database.row_counts.values().sum::<i64>()
        )?;
        writeln!(
            f,
            "  {} files: config, synapse.d, secrets, signing key, local media, ACME, CA, bot",
            self.files
        )?;
        for (k, v) in &m.versions {
            writeln!(f, "  made by {k} {v}")?;
        }
        match &self.started {
            Some(s) => write!(f, "{s}"),
            None => write!(
                f,
                "start the service now: systemctl start homelab-matrix (then `homelab-matrix status`)"
            ),
        }
    }
}

/// Runs the restore; see the module doc.
pub async fn restore(
    cfg: &Config,
    config_path: &Path,
    file: &Path,
    force: bool,
) -> Result<Restored> {
    if crate::control::request(&cfg.control_socket(), "status")
        .await
        .is_ok()
    {
        bail!(Refused::Running);
    }
    let state = cfg.state_dir();
    ensure_dir(&state, Owner::root(), 0o755)?;
    let checked = archive::check(file, &state)?;
    let m = &checked.manifest;
    if m.server_name != cfg.server_name {
        bail!(Refused::OtherServer {
            backup: m.server_name.clone(),
            here: cfg.server_name.clone(),
        });
    }
    let synapse = RunAs::lookup(&cfg.synapse.user)?.owner();
    for p in &m.parts {
        target(cfg, config_path, synapse, &p.path)?;
    }
    let existing = db::users_besides_ours(cfg).await?;
    if let Some(users) = existing
        && users > 0
        && !force
    {
        bail!(Refused::HoldsData {
            database: cfg.postgres.database.clone(),
            users,
        });
    }

    // Files: what the backup holds replaces what is there (a fresh install's own secrets,
    // signing key and CA must not survive next to the restored ones). Synapse's directory
    // goes whole: it is the child's, so anything in it may be a link it planted where the
    // restore writes; rebuilt by root, it holds only what the backup does (remote media and
    // URL previews are caches Synapse fetches again). A disk mounted on it or below it is
    // emptied and kept (fsutil::Dir::remove).
    let state_dir = Dir::open(&state)?;
    for area in ROOT_AREAS.into_iter().chain([SYNAPSE_DATA]) {
        state_dir.remove(area)?;
    }
    let mut files = 0;
    // Looked up once per member: a media store holds tens of thousands of files.
    let sha256_of: std::collections::HashMap<&str, &str> = m
        .parts
        .iter()
        .map(|p| (p.path.as_str(), p.sha256.as_str()))
        .collect();
    archive::for_each_file(file, |name, data, mode| {
        let want = sha256_of.get(name);
        if want.is_none_or(|sha| *sha != crate::secrets::sha256_hex(data)) {
            bail!("{name} changed since the backup was checked; run the restore again");
        }
        write(&target(cfg, config_path, synapse, name)?, data, mode)?;
        files += 1;
        Ok(())
    })?;

    // The database: dropped when it exists (checked above), then made exactly as provisioning
    // makes it, with the restored role password.
    if existing.is_some() {
        db::drop_database(cfg, &cfg.postgres.database).await?;
    }
    let password = Secrets::ensure(&state)?.get(Kind::PostgresPassword)?;
    crate::postgres::provision(cfg, &password)
        .await
        .context("making the role and database for the restore")?;
    db::restore(cfg, &password, &cfg.postgres.database, checked.dump).await?;
    db::truncate_excluded(cfg, &password, &cfg.postgres.database).await?;
    // The versions this backup ran with: Synapse's start after the restore is no upgrade
    // unless the installed one is newer.
    super::upgrade::forget_versions(cfg);

    let started = start_service(cfg).await?;
    Ok(Restored {
        manifest: checked.manifest,
        files,
        started,
    })
}

/// With systemd: starts the unit and waits until the service is ready. Without (a test lab, a
/// container): None, and the operator starts it.
async fn start_service(cfg: &Config) -> Result<Option<String>> {
    if !Path::new("/run/systemd/system").exists() {
        return Ok(None);
    }
    let out = supervisor::run_helper(
        Command::new("systemctl").arg("start").arg("homelab-matrix"),
        b"",
        Duration::from_secs(900),
    )
    .await?;
    if !out.exit.success() {
        bail!(
            "the restore is complete, but `systemctl start homelab-matrix` failed: {}; `journalctl -u homelab-matrix` says why",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(900);
    loop {
        if let Ok(v) = crate::control::request(&cfg.control_socket(), "status").await
            && v["phase"] == "ready"
        {
            return Ok(Some(format!(
                "homelab-matrix is running again and Synapse is healthy: {}",
                v["url"].as_str().unwrap_or("")
            )));
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the restore is complete and the service was started, but it is not ready after 15 minutes; `homelab-matrix status` and `journalctl -u homelab-matrix` say why"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
