//! `homelab-matrix postgres upgrade`: the database moved to the newest PostgreSQL installed,
//! after a dist-upgrade brought one beside the old (postgres::clusters), a snapshot first.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;

use crate::config::Config;
use crate::postgres::clusters;
use crate::supervisor::{self, Command};

#[derive(Debug, Subcommand)]
pub enum PostgresCmd {
    /// Move the database to the newest PostgreSQL installed (after a dist-upgrade, Debian 12's
    /// 15 to 13's 17): a snapshot, the service stopped, pg_upgradecluster, the service started
    /// again. The old cluster stays, stopped, until you drop it.
    Upgrade,
}

pub async fn run(cfg: &Config, config_path: &Path, cmd: PostgresCmd) -> Result<()> {
    match cmd {
        PostgresCmd::Upgrade => upgrade(cfg, config_path).await,
    }
}

async fn upgrade(cfg: &Config, config_path: &Path) -> Result<()> {
    if !cfg.postgres.on_this_host() {
        bail!(
            "the database lives on a server of its own (postgres.superuser_dsn or provision = false): upgrade PostgreSQL where it runs"
        );
    }
    let all = clusters::list().await?;
    let Some(serving) = all.iter().find(|c| c.port == cfg.postgres.port) else {
        bail!(
            "no cluster of this host's PostgreSQL (pg_lsclusters) listens on postgres.port {}: nothing here to upgrade",
            cfg.postgres.port
        );
    };
    let Some((old, newest)) =
        clusters::behind(&all, cfg.postgres.port, clusters::newest_installed())
    else {
        println!(
            "the database is on PostgreSQL {}, the newest installed: nothing to do",
            serving.version
        );
        return Ok(());
    };
    if !old.online {
        bail!(
            "PostgreSQL {} {} is down: start it (pg_ctlcluster {} {} start) so that the snapshot can be taken, then run this again",
            old.version,
            old.name,
            old.version,
            old.name
        );
    }
    println!(
        "moving the database from PostgreSQL {} to {newest}; first a snapshot ...",
        old.version
    );
    let made =
        crate::backup::make(cfg, config_path, Path::new(&cfg.backup.dir), "pre-upgrade").await?;
    println!("snapshot: {made}");
    let systemd = Path::new("/run/systemd/system").exists();
    if systemd {
        supervisor::run_checked(
            Command::new("systemctl").arg("stop").arg("homelab-matrix"),
            "stopping homelab-matrix",
            Duration::from_secs(120),
        )
        .await?;
    }
    let said = match clusters::upgrade(&old, newest).await {
        Ok(s) => s,
        Err(e) => {
            // The old cluster is as it was (pg_upgrade copies): the service goes on with it.
            if systemd {
                let _ = crate::backup::restore::start_service(cfg).await;
            }
            bail!(
                "{e:#}\nThe database stays on PostgreSQL {} (started again); the snapshot {} holds it too",
                old.version,
                made.file.display()
            );
        }
    };
    println!("{}", said.trim_end());
    if let Some(up) = crate::backup::restore::start_service(cfg).await? {
        println!("{up}");
    } else {
        println!("start the service now: systemctl start homelab-matrix");
    }
    println!(
        "the database is on PostgreSQL {newest}. The old cluster ({} {}) is kept, stopped: once all is well, `pg_dropcluster {} {}` frees its space and `apt purge postgresql-{}` removes the old server",
        old.version, old.name, old.version, old.name, old.version
    );
    Ok(())
}
