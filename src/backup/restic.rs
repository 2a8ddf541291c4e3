//! Off-box copies with restic (Debian's `restic`) when `[backup] repository` is set: encrypted,
//! deduplicated, with its own retention (`forget --keep-daily --keep-weekly --prune`). No
//! home-made copier: restic speaks local paths, SFTP, S3, REST and more (restic docs,
//! "Preparing a new repository").

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::config::Config;
use crate::supervisor::{self, Command};

const TIMEOUT: Duration = Duration::from_secs(6 * 3600);
pub const RESTIC: &str = "restic";
/// Every snapshot we make carries this tag, so `forget` touches only ours.
const TAG: &str = "homelab-matrix";

fn restic(cfg: &Config) -> Command {
    // HOME for sftp's ssh keys and known_hosts; no cache: root's daily run needs none.
    Command::new(RESTIC)
        .env("HOME", "/root")
        .arg("--repo")
        .arg(&cfg.backup.repository)
        .arg("--password-file")
        .arg(&cfg.backup.password_file)
        .arg("--no-cache")
}

async fn run(cmd: Command, what: &str) -> Result<String> {
    let out = supervisor::run_helper(cmd, b"", TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}; is restic installed (apt install restic)?"))?;
    if !out.exit.success() {
        bail!(
            "restic {what} failed ({}): {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copies `file` into the repository (made on first use), then applies restic's retention.
/// Returns the repository, for `status`.
pub async fn copy(cfg: &Config, file: &Path) -> Result<String> {
    let repo = cfg.backup.repository.clone();
    // `cat config` fails on a repository that does not exist yet.
    if run(restic(cfg).arg("cat").arg("config"), "cat config")
        .await
        .is_err()
    {
        run(restic(cfg).arg("init"), "init").await.map_err(|e| {
            e.context(format!(
                "backup.repository {repo}: cannot open or create it; check the address and the password in backup.password_file"
            ))
        })?;
        tracing::info!(repository = %repo, "created the restic repository");
    }
    run(
        restic(cfg)
            .arg("backup")
            .arg("--tag")
            .arg(TAG)
            .arg("--host")
            .arg(&cfg.server_name)
            .arg(file),
        "backup",
    )
    .await?;
    run(
        restic(cfg)
            .arg("forget")
            .arg("--tag")
            .arg(TAG)
            .arg("--keep-daily")
            .arg(cfg.backup.keep_daily.to_string())
            .arg("--keep-weekly")
            .arg(cfg.backup.keep_weekly.to_string())
            .arg("--prune"),
        "forget",
    )
    .await?;
    Ok(repo)
}
