//! `homelab-matrix restore FILE [--force]`: onto a freshly installed appliance (or after a
//! purge), with the service stopped. Refuses a damaged file, another server's backup, and a
//! database that holds users besides the appliance's own accounts (unless `--force`). Then:
//! every file back with its owner and mode, the role and database as provisioning makes them
//! (UTF8, C, template0), the dump restored by the role itself, `e2e_one_time_keys_json`
//! emptied before Synapse's first start (Synapse docs, "Backups"), and the service started.

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::archive::{self, Manifest};
use super::db;
use crate::config::Config;
use crate::fsutil::{Dir, Owner, ensure_dir};
use crate::secrets::{Kind, Secret, Secrets};
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
        "homelab-matrix is running ({0}); a restore must not race the live server. Stop it first (systemctl stop homelab-matrix), then run the restore again"
    )]
    Running(crate::instance::Holder),
    #[error(
        "this backup is of server {backup:?}, but this appliance is {here:?}: Matrix IDs (@user:{backup}) and the signing key belong to one server name and cannot move to another. Set server_name = {backup:?} in the config file to restore it here, or restore it on the box that serves {backup}"
    )]
    OtherServer { backup: String, here: String },
    #[error(
        "database {database:?} already holds {users} user(s) besides the appliance's own accounts; a restore replaces all of it. Take a backup of it first (homelab-matrix backup), then run the restore again with --force"
    )]
    HoldsData { database: String, users: i64 },
    #[error(
        "database {database:?} on {host} already holds {tables} table(s), and with postgres.provision = false the restore may not drop it and make another. Take a backup of it first (homelab-matrix backup); then empty it as its role, e.g. `psql \"host={host} dbname={database} user={role}\" -c 'DROP OWNED BY CURRENT_USER'` (or ask its administrator), and run the restore again"
    )]
    ExternalNotEmpty {
        database: String,
        host: String,
        role: String,
        tables: i64,
    },
    #[error(
        "{0}: not a part this version can restore; use the homelab-matrix that made the backup"
    )]
    UnknownPart(String),
    #[error(
        "the backup has no {0}: it is not a complete homelab-matrix backup and cannot be restored; use another backup"
    )]
    Incomplete(String),
}

/// Where one archive member goes.
struct Target {
    /// The root-owned directory it is below (opened from its path).
    base: std::path::PathBuf,
    /// Path components below `base`.
    rel: Vec<String>,
    owner: Owner,
    dir_mode: u32,
    /// None: the mode recorded in the archive, masked.
    file_mode: Option<u32>,
    /// What of a recorded mode is kept: never a group or other write bit, nor set-id bits
    /// (a synapse.d file recorded 0666 came back root-owned and world-writable: any local
    /// user could then rewrite Synapse's config).
    mask: u32,
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
    let t = |base: &Path, rel: &[&str], owner, dir_mode, file_mode, mask| Target {
        base: base.to_owned(),
        rel: rel.iter().map(|s| s.to_string()).collect(),
        owner,
        dir_mode,
        file_mode,
        mask,
    };
    Ok(match parts.as_slice() {
        ["state", "secrets", rest @ ..] if rest.len() == 1 => {
            t(&cfg.state_dir(), &parts[1..], root, 0o700, Some(0o600), 0)
        }
        // The internal CA's root.pem is 0644 (DESIGN.md §3); the rest are root's 0600.
        ["state", area, rest @ ..] if ROOT_AREAS.contains(area) && !rest.is_empty() => {
            t(&cfg.state_dir(), &parts[1..], root, 0o700, None, 0o644)
        }
        ["state", SYNAPSE_DATA, "signing.key"]
        | [
            "state",
            SYNAPSE_DATA,
            "media_store",
            "local_content" | "local_thumbnails",
            ..,
        ] => t(&cfg.state_dir(), &parts[1..], synapse, 0o700, None, 0o600),
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
                mask: 0,
            }
        }
        ["config", "element.json"] => t(config_dir, &parts[1..], root, 0o755, None, 0o644),
        ["config", "synapse.d", rest @ ..] if !rest.is_empty() => t(
            Path::new(&cfg.synapse.config_dir),
            rest,
            root,
            0o755,
            None,
            0o644,
        ),
        // Keys stay 0600 or 0640, as the operator had them; never more.
        ["config", "tls", rest @ ..] if !rest.is_empty() => t(
            Path::new(&cfg.tls.files_dir),
            rest,
            root,
            0o750,
            None,
            0o640,
        ),
        _ => bail!(Refused::UnknownPart(name.to_string())),
    })
}

/// Writes `data` at `t`, making the directories on the way (each through its parent's
/// descriptor, never following a link). The file appears only when what was read has the
/// sha256 `want` (the archive may have changed since it was checked).
fn write(t: &Target, data: &mut dyn Read, mode: u32, want: &str) -> Result<()> {
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
    let mode = t.file_mode.unwrap_or(mode & t.mask);
    let mut out = dir.create_atomic(file, t.owner, mode)?;
    let mut r = archive::Hashing::new(data);
    std::io::copy(&mut r, out.file())
        .with_context(|| format!("writing {}", dir.join(file).display()))?;
    if r.finish().1 != want {
        bail!(
            "{} changed since the backup was checked; run the restore again",
            dir.join(file).display()
        );
    }
    out.commit()
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
        for s in &m.elsewhere {
            writeln!(f, "  not in the backup, still where it was: {s}")?;
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

/// The database password's member: restored first, as the role's password, to restore the
/// dump as that role.
fn password_member() -> String {
    format!("state/secrets/{}", Kind::PostgresPassword.file_name())
}

/// Runs the restore; see the module doc. Everything that can refuse a backup is checked
/// before anything changes (the archive's members, their types, sizes, hashes and places, the
/// server name, the database's users), and the dump goes into a database of its own first:
/// a refused backup or a dump that does not restore leaves the appliance as it was.
pub async fn restore(
    cfg: &Config,
    config_path: &Path,
    file: &Path,
    force: bool,
) -> Result<Restored> {
    let state = cfg.state_dir();
    ensure_dir(&state, Owner::root(), 0o755)?;
    // Whether the service runs is the instance lock's to say, not the control socket's (one
    // lost must not make a running server look stopped); held while the restore runs, so no
    // `run` starts under it either, and let go before the service is started again.
    let instance = match crate::instance::Instance::lock(&state, "restore", &cfg.control_socket()) {
        Ok(i) => i,
        Err(crate::instance::Error::Held { holder, .. }) => bail!(Refused::Running(holder)),
        Err(e) => return Err(e.into()),
    };
    // Removing a deep tree a child left holds a descriptor per level (fsutil::Dir::remove).
    crate::fdlimit::raise();
    let checked = {
        let (file, state) = (file.to_owned(), state.clone());
        super::blocking(move || archive::check(&file, &state)).await?
    };
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
    let password = match archive::read_member(file, &password_member(), 4096)? {
        Some(b) if !String::from_utf8_lossy(&b).trim().is_empty() => {
            Secret::new(String::from_utf8_lossy(&b).trim().to_string())
        }
        _ => bail!(Refused::Incomplete(password_member())),
    };
    // A database made elsewhere (provision = false): the role may not drop or create one, so
    // the dump goes straight into it, which must be empty. pg_restore's single transaction
    // still leaves it empty if the dump does not restore.
    let scratch = if !cfg.postgres.provision {
        let password = crate::postgres::password(cfg, &Secrets::open(&state))?;
        let tables = db::table_count(cfg, &password).await?;
        if tables > 0 {
            bail!(Refused::ExternalNotEmpty {
                database: cfg.postgres.database.clone(),
                host: cfg.postgres.host.clone(),
                role: cfg.postgres.user.clone(),
                tables,
            });
        }
        let restored = async {
            crate::postgres::provision(cfg, &password).await?;
            db::restore(cfg, &password, &cfg.postgres.database, checked.dump).await?;
            db::truncate_excluded(cfg, &password, &cfg.postgres.database).await
        }
        .await;
        if let Err(e) = restored {
            return Err(e.context(
                "the database dump did not restore; the appliance and its files are as they were, the database is still empty",
            ));
        }
        None
    } else {
        Some(restore_beside(cfg, &state, &password, checked.dump, force).await?)
    };

    // Files: what the backup holds replaces what is there (a fresh install's own secrets,
    // signing key and CA must not survive next to the restored ones). Synapse's directory
    // goes whole: it is the child's, so anything in it may be a link it planted where the
    // restore writes; rebuilt by root, it holds only what the backup does (remote media and
    // URL previews are caches Synapse fetches again). A disk mounted on it or below it is
    // emptied and kept (fsutil::Dir::remove).
    let files = {
        let (cfg, config_path, file) = (cfg.clone(), config_path.to_owned(), file.to_owned());
        let parts: std::collections::HashMap<String, String> = m
            .parts
            .iter()
            .map(|p| (p.path.clone(), p.sha256.clone()))
            .collect();
        super::blocking(move || {
            let state_dir = Dir::open(&cfg.state_dir())?;
            for area in ROOT_AREAS.into_iter().chain([SYNAPSE_DATA]) {
                state_dir.remove(area)?;
            }
            let mut files = 0;
            archive::for_each_file(&file, |name, data, _size, mode| {
                let Some(want) = parts.get(name) else {
                    bail!("{name} changed since the backup was checked; run the restore again");
                };
                write(&target(&cfg, &config_path, synapse, name)?, data, mode, want)?;
                files += 1;
                Ok(())
            })?;
            Ok(files)
        })
        .await
        .with_context(|| {
            format!(
                "the restore stopped while it put the files back; {}. Fix the cause and run the restore again with --force",
                match &scratch {
                    Some(s) => format!("the restored database waits as {s}"),
                    None => "the database holds the restored dump".into(),
                }
            )
        })?
    };

    // The restored database takes the place of the old one.
    if let Some(scratch) = &scratch {
        db::drop_database(cfg, &cfg.postgres.database).await?;
        db::superuser_sql(
            cfg,
            "postgres",
            &format!(
                "ALTER DATABASE {} RENAME TO {}",
                crate::postgres::ident(scratch),
                crate::postgres::ident(&cfg.postgres.database)
            ),
        )
        .await
        .with_context(|| format!("renaming the restored database {scratch}"))?;
    }
    // The versions this backup ran with: Synapse's start after the restore is no upgrade
    // unless the installed one is newer.
    super::upgrade::forget_versions(cfg);

    drop(instance);
    let started = start_service(cfg).await?;
    Ok(Restored {
        manifest: checked.manifest,
        files,
        started,
    })
}

/// With systemd: starts the unit and waits until the service is ready. Without (a test lab, a
/// container): None, and the operator starts it.
pub async fn start_service(cfg: &Config) -> Result<Option<String>> {
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

/// This host's PostgreSQL (or a superuser login): the dump goes into a scratch database as the
/// role with the backup's password; only once it restored may the old one go. Returns the
/// scratch database's name.
async fn restore_beside(
    cfg: &Config,
    state: &Path,
    password: &Secret,
    dump: std::fs::File,
    force: bool,
) -> Result<String> {
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

    // The database, into a scratch database as the role with the backup's password; only
    // when it restored does the old one go.
    let old_password = Secrets::open(state).get(Kind::PostgresPassword).ok();
    let scratch = format!(
        "{}_restore_{}",
        &cfg.postgres.database[..cfg.postgres.database.len().min(40)],
        &crate::secrets::random_token(&ring::rand::SystemRandom::new())?[..8]
    );
    let restored = async {
        crate::postgres::provision(cfg, password)
            .await
            .context("making the role and database for the restore")?;
        db::create_database(cfg, &scratch).await?;
        db::restore(cfg, password, &scratch, dump).await?;
        db::truncate_excluded(cfg, password, &scratch).await
    }
    .await;
    if let Err(e) = restored {
        let _ = db::drop_database(cfg, &scratch).await;
        if let Some(old) = &old_password {
            let _ = crate::postgres::provision(cfg, old).await;
        }
        return Err(e.context(
            "the database dump did not restore; the appliance, its files and its database are as they were",
        ));
    }

    Ok(scratch)
}
