//! Backups you can trust (README "Backups"): one file per backup, made online while Synapse
//! runs, verified by restoring it into a scratch database, restorable in one command.
//!
//! What a backup holds follows Synapse's backup doc (docs/usage/administration/backups.md):
//! the database without the one-time keys' rows, the signing key, the media store's
//! `local_content` and `local_thumbnails` (not `remote_*` nor `url_cache*`, which other servers
//! serve again), and besides Synapse's part everything that makes this appliance: the config
//! file and synapse.d, the generated secrets, the ACME account and certificates, the internal
//! CA, the bot's session, crypto store and allow list.
//!
//! One module one concern: `archive` (the file and its manifest), `db` (dump, counts, scratch
//! databases), `restore`, `schedule` (the daily run, retention, the last good backup),
//! `restic` (off-box copies), `upgrade` (the snapshot before an upgrade).

pub mod archive;
pub mod db;
pub mod restic;
pub mod restore;
pub mod rollback;
pub mod schedule;
pub mod upgrade;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::fsutil::{Dir, Owner, ensure_dir};
use crate::secrets::Secrets;

use archive::{Manifest, Writer};

/// Largest single file a backup takes (media uploads are bounded by max_upload_size; this
/// leaves room for thumbnails and the bot's crypto store).
fn file_limit(cfg: &Config) -> u64 {
    (cfg.max_upload_bytes() * 2).max(256 << 20)
}

/// A backup just made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Made {
    pub file: PathBuf,
    pub size: u64,
    pub created_at: u64,
    pub kind: String,
    pub tables: usize,
    pub rows: i64,
    pub files: usize,
    pub skipped: Vec<String>,
    #[serde(default)]
    pub elsewhere: Vec<String>,
}

impl std::fmt::Display for Made {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): database with {} tables and {} rows, {} files",
            self.file.display(),
            crate::units::human_size(self.size),
            self.tables,
            self.rows,
            self.files
        )?;
        for s in &self.skipped {
            write!(f, "\n    left out: {s}")?;
        }
        for s in &self.elsewhere {
            write!(f, "\n    not in this backup: {s}")?;
        }
        Ok(())
    }
}

/// `homelab-matrix-<server>-<UTC time>-<kind>.tar`: sorts by time, says what it is.
pub fn file_name(server_name: &str, created_at: u64, kind: &str) -> String {
    format!(
        "homelab-matrix-{server_name}-{}-{kind}.tar",
        schedule::stamp(created_at)
    )
}

/// Makes one backup file in `dir` (created root 0700 if missing). The dump and the row counts
/// come from one exported snapshot (see `db`); the file appears only complete (fsutil's atomic
/// temp file and rename); on any failure nothing is left behind. What the files will take is
/// measured first and checked against the free space, so a media store too big for the
/// backup disk fails the backup at once instead of filling that disk. The walking and writing
/// run on a blocking thread, never on the service's async workers.
pub async fn make(cfg: &Config, config_path: &Path, dir: &Path, kind: &str) -> Result<Made> {
    let out = backup_dir(dir)?;
    let password = crate::postgres::password(cfg, &Secrets::open(&cfg.state_dir()))?;
    let synapse_version = upgrade::synapse_version(cfg).await.ok();
    let limit = file_limit(cfg);
    let (files_bytes, files) = {
        let (cfg, config_path) = (cfg.clone(), config_path.to_owned());
        blocking(move || {
            let mut w = Writer::measure(limit);
            add_state(&mut w, &cfg)?;
            add_config(&mut w, &cfg, &config_path)?;
            Ok((w.bytes, w.files))
        })
        .await?
    };

    let snapshot = db::Snapshot::open(cfg, &password).await?;
    // Unnamed (O_TMPFILE): nothing to clean up after a failure.
    let dump_file =
        tempfile::tempfile_in(out.path()).context("making a scratch file for the dump")?;
    let mut dump_async = tokio::fs::File::from_std(dump_file.try_clone()?);
    let dumped = db::dump(cfg, &password, &snapshot.id, &mut dump_async).await;
    let counts = snapshot.counts.clone();
    let pg_version = snapshot.server_version.clone();
    snapshot.close().await;
    dumped?;
    drop(dump_async);
    // The dump's scratch copy is on that disk already; the archive takes it once more.
    let dump_size = dump_file.metadata()?.len();
    check_space(out.path(), dump_size + files_bytes + manifest_bytes(files))?;

    let created_at = crate::units::unix(std::time::SystemTime::now());
    let name = file_name(&cfg.server_name, created_at, kind);
    let mut versions = BTreeMap::new();
    versions.insert("homelab-matrix".into(), env!("CARGO_PKG_VERSION").into());
    versions.insert("postgresql".into(), pg_version);
    if let Some(v) = synapse_version {
        versions.insert("synapse".into(), v);
    }
    let (cfg2, config_path, kind2, name2) = (
        cfg.clone(),
        config_path.to_owned(),
        kind.to_string(),
        name.clone(),
    );
    let manifest = blocking(move || {
        let cfg = &cfg2;
        let mut dump_file = dump_file;
        let mut atomic = out.create_atomic(&name2, Owner::root(), 0o600)?;
        let mut w = Writer::new(BufWriter::new(atomic.file()), limit);
        let (size, sha256) = w.add_dump(&mut dump_file)?;
        add_state(&mut w, cfg)?;
        add_config(&mut w, cfg, &config_path)?;
        let manifest = Manifest {
            format: archive::FORMAT,
            kind: kind2,
            created_at,
            server_name: cfg.server_name.clone(),
            versions,
            database: archive::Database {
                name: cfg.postgres.database.clone(),
                role: cfg.postgres.user.clone(),
                size,
                sha256,
                excluded_table_data: db::EXCLUDED_DATA.iter().map(|s| s.to_string()).collect(),
                row_counts: counts,
            },
            parts: std::mem::take(&mut w.parts),
            skipped: w.take_skipped(),
            elsewhere: elsewhere(cfg),
        };
        let mut inner = w.finish(&manifest)?;
        inner.flush().context("writing the backup")?;
        drop(inner);
        atomic.commit()?;
        Ok(manifest)
    })
    .await?;
    let file = dir.join(&name);
    let size = std::fs::metadata(&file)?.len();
    for s in &manifest.skipped {
        tracing::warn!("backup: left out {s}");
    }
    Ok(Made {
        file,
        size,
        created_at,
        kind: kind.to_string(),
        tables: manifest.database.row_counts.len(),
        rows: manifest.database.row_counts.values().sum(),
        files: manifest.parts.len(),
        skipped: manifest.skipped,
        elsewhere: manifest.elsewhere,
    })
}

/// Runs `f` on tokio's blocking pool: file walks and archive reads take minutes on a big
/// media store, and must not hold an async worker (or its 2 MiB stack) that long.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("the backup's worker thread failed")?
}

/// The manifest's size, about: a line of JSON per file.
fn manifest_bytes(files: usize) -> u64 {
    64 * 1024 + files as u64 * 512
}

/// Fails when `needed` more bytes would leave `dir`'s file system with less than a reserve
/// (5% of it, at most 256 MiB) for everything else on it (PostgreSQL, Synapse's media).
fn check_space(dir: &Path, needed: u64) -> Result<()> {
    let (free, total) = crate::fsutil::space(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    let reserve = (total / 20).min(256 << 20);
    if needed.saturating_add(reserve) > free {
        bail!(
            "this backup needs {} in {}, which has {} free (and keeps {} in reserve): free space there, move old backups off the box, or set [backup] dir to a bigger disk; `homelab-matrix status` shows the last good backup",
            crate::units::human_size(needed),
            dir.display(),
            crate::units::human_size(free),
            crate::units::human_size(reserve)
        );
    }
    Ok(())
}

/// The directory a backup goes into: made root 0700 when missing; an existing one must be
/// root's and writable by no one else (README "State and privilege separation": root writes
/// only where nobody else can change what it wrote). An operator's `--to /tmp` is refused, not
/// chmodded.
fn backup_dir(dir: &Path) -> Result<Dir> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ensure_dir(dir, Owner::root(), 0o700),
        Err(e) => Err(e).with_context(|| format!("looking at {}", dir.display())),
        Ok(m) if m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0 => Dir::open(dir),
        Ok(_) => bail!(
            "{} is not a directory only root can write (a link, a file, or writable by others): a backup holds every secret of the server. Name a root-only directory, or a new one (it is made 0700)",
            dir.display()
        ),
    }
}

/// The appliance's state: secrets, ACME, internal CA, the bot; and of Synapse's own directory
/// only the signing key and local media, read without following any link.
fn add_state<W: Write>(w: &mut Writer<W>, cfg: &Config) -> Result<()> {
    let state = Dir::open(&cfg.state_dir())?;
    for area in restore::ROOT_AREAS {
        if let Some(d) = state.open_sub(OsStr::new(area))? {
            w.add_tree(d, &format!("state/{area}"))?;
        }
    }
    let Some(data) = state.open_sub(OsStr::new(restore::SYNAPSE_DATA))? else {
        return Ok(());
    };
    let key = format!("state/{}/signing.key", restore::SYNAPSE_DATA);
    if !w.add_file(&data, OsStr::new("signing.key"), &key)? && !w.measuring() {
        tracing::warn!(
            "backup: Synapse has no signing key yet (it makes one at its first start); this backup has none"
        );
    }
    // With S3 on the media store is a cache of the bucket (see `elsewhere`).
    if cfg.media.s3.enabled() {
        return Ok(());
    }
    if let Some(media) = data.open_sub(OsStr::new("media_store"))? {
        for sub in ["local_content", "local_thumbnails"] {
            if let Some(d) = media.open_sub(OsStr::new(sub))? {
                w.add_tree(
                    d,
                    &format!("state/{}/media_store/{sub}", restore::SYNAPSE_DATA),
                )?;
            }
        }
    }
    Ok(())
}

/// What this appliance keeps outside the backup by its config. With S3 on, every upload is in
/// the bucket before it is answered (synapse::s3), so the bucket holds the media and the local
/// store is only its cache.
pub fn elsewhere(cfg: &Config) -> Vec<String> {
    let s3 = &cfg.media.s3;
    if !s3.enabled() {
        return vec![];
    }
    let mut at = format!("S3 bucket {:?}", s3.bucket);
    if !s3.prefix.is_empty() {
        at.push_str(&format!(" under {:?}", s3.prefix));
    }
    if !s3.endpoint.is_empty() {
        at.push_str(&format!(" at {}", s3.endpoint));
    }
    vec![format!(
        "media and thumbnails: they live in {at} (media.s3); keep the bucket safe with the store's own tools (versioning, replication, a copy elsewhere)"
    )]
}

/// The config file, element.json beside it, synapse.d, and in `files` mode the certificates.
fn add_config<W: Write>(w: &mut Writer<W>, cfg: &Config, config_path: &Path) -> Result<()> {
    let (dir, name) = parent_and_name(config_path)?;
    if !w.add_file(&dir, name, restore::CONFIG_FILE)? {
        bail!(
            "{} is not a regular file; back up needs the config file itself (not a link)",
            config_path.display()
        );
    }
    w.add_file(&dir, OsStr::new("element.json"), restore::ELEMENT_JSON)?;
    for (path, prefix) in [
        (&cfg.synapse.config_dir, restore::SYNAPSE_D),
        (&cfg.tls.files_dir, restore::TLS_FILES),
    ] {
        if prefix == restore::TLS_FILES && cfg.tls.mode() != crate::config::TlsMode::Files {
            continue;
        }
        let p = Path::new(path);
        if let Ok((parent, name)) = parent_and_name(p)
            && let Some(d) = parent.open_sub(name)?
        {
            w.add_tree(d, prefix)?;
        }
    }
    Ok(())
}

fn parent_and_name(p: &Path) -> Result<(Dir, &OsStr)> {
    let name = p
        .file_name()
        .with_context(|| format!("{} has no file name", p.display()))?;
    let parent = p.parent().filter(|p| !p.as_os_str().is_empty());
    Ok((Dir::open(parent.unwrap_or(Path::new(".")))?, name))
}

/// A backup that passed `verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verified {
    pub manifest: Manifest,
    pub tables: usize,
    pub rows: i64,
    /// false: the dump was read through (pg_restore --list), not restored: a database made
    /// elsewhere (`provision = false`) gives the role no scratch database to restore into.
    pub restored: bool,
}

/// Why verify refused a backup whose file is intact: its database does not restore to what
/// the manifest counted.
#[derive(Debug, thiserror::Error)]
#[error(
    "{file}: the database restored from it does not match its manifest: {detail}. Do not rely on this backup; make a new one (`homelab-matrix backup`) and report this"
)]
pub struct CountMismatch {
    pub file: String,
    pub detail: String,
}

/// Checks every part's hash, restores the dump into a scratch database, compares the row
/// counts with the manifest's, and drops the scratch database again.
pub async fn verify(cfg: &Config, file: &Path) -> Result<Verified> {
    let scratch_dir = file.parent().unwrap_or(Path::new(".")).to_owned();
    let path = file.to_owned();
    let checked = blocking(move || archive::check(&path, &scratch_dir)).await?;
    let password = crate::postgres::password(cfg, &Secrets::open(&cfg.state_dir()))?;
    if !cfg.postgres.provision {
        db::list(checked.dump).await?;
        let counts = &checked.manifest.database.row_counts;
        return Ok(Verified {
            tables: counts.len(),
            rows: counts.values().sum(),
            restored: false,
            manifest: checked.manifest,
        });
    }
    let scratch = format!(
        "{}_verify_{}",
        &cfg.postgres.database[..cfg.postgres.database.len().min(40)],
        &crate::secrets::random_token(&ring::rand::SystemRandom::new())?[..8]
    );
    db::create_database(cfg, &scratch).await?;
    let result = async {
        db::restore(cfg, &password, &scratch, checked.dump).await?;
        let client = db::connect(cfg, &password, &scratch).await?;
        let counts = db::count_rows(&client).await?;
        compare_counts(&checked.manifest.database.row_counts, &counts).map_err(|detail| {
            CountMismatch {
                file: file.display().to_string(),
                detail,
            }
        })?;
        anyhow::Ok(counts)
    }
    .await;
    if let Err(e) = db::drop_database(cfg, &scratch).await {
        tracing::warn!("dropping the scratch database {scratch}: {e:#}");
    }
    let counts = result?;
    Ok(Verified {
        tables: counts.len(),
        rows: counts.values().sum(),
        restored: true,
        manifest: checked.manifest,
    })
}

fn compare_counts(want: &BTreeMap<String, i64>, got: &BTreeMap<String, i64>) -> Result<(), String> {
    let mut diffs = vec![];
    for (t, n) in want {
        match got.get(t) {
            Some(m) if m == n => {}
            Some(m) => diffs.push(format!("{t} has {m} rows, the manifest counted {n}")),
            None => diffs.push(format!("{t} is missing")),
        }
    }
    for t in got.keys().filter(|t| !want.contains_key(*t)) {
        diffs.push(format!("{t} is not in the manifest"));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_must_match_exactly() {
        let want: BTreeMap<String, i64> = [("users".to_string(), 3), ("events".to_string(), 10)]
            .into_iter()
            .collect();
        assert!(compare_counts(&want, &want).is_ok());
        let mut got = want.clone();
        got.insert("events".into(), 9);
        got.insert("extra".into(), 0);
        let e = compare_counts(&want, &got).unwrap_err();
        assert!(
            e.contains("events has 9 rows, the manifest counted 10"),
            "{e}"
        );
        assert!(e.contains("extra is not in the manifest"), "{e}");
    }
}
