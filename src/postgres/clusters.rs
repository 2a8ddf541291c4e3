//! Debian's PostgreSQL clusters (postgresql-common): which one serves the appliance's port,
//! which major version is the newest installed, and moving a cluster to it. A dist-upgrade
//! (Debian 12's PostgreSQL 15 to 13's 17) installs the new server beside the old one, creates an
//! empty cluster of it on the next port, and leaves the old one running with the data: the
//! move is the operator's, with `pg_upgradecluster` (Debian's release notes, "Upgrading
//! PostgreSQL"), which `homelab-matrix postgres upgrade` runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::supervisor::{self, Command, RunAs};

/// One line of `pg_lsclusters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub version: u32,
    pub name: String,
    pub port: u16,
    pub online: bool,
    pub data_dir: PathBuf,
}

/// `pg_lsclusters --no-header`: "15 main 5432 online postgres /var/lib/postgresql/15/main LOG".
pub fn parse(text: &str) -> Vec<Cluster> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Cluster {
                version: f.first()?.parse().ok()?,
                name: f.get(1)?.to_string(),
                port: f.get(2)?.parse().ok()?,
                online: f.get(3)?.starts_with("online"),
                data_dir: PathBuf::from(f.get(5)?),
            })
        })
        .collect()
}

/// The clusters of this host; none where postgresql-common is not installed.
pub async fn list() -> Result<Vec<Cluster>> {
    if !Path::new("/usr/bin/pg_lsclusters").exists() {
        return Ok(vec![]);
    }
    let said = supervisor::run_checked(
        Command::new("pg_lsclusters").arg("--no-header"),
        "pg_lsclusters",
        Duration::from_secs(30),
    )
    .await?;
    Ok(parse(&said))
}

/// The newest PostgreSQL server major installed (Debian's /usr/lib/postgresql/<major>/).
pub fn newest_installed_in(root: &Path) -> Option<u32> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            e.path().join("bin/postgres").exists().then_some(v)
        })
        .max()
}

pub fn newest_installed() -> Option<u32> {
    newest_installed_in(Path::new("/usr/lib/postgresql"))
}

/// Where the database lives on an older major than the newest installed: (serving, newest).
pub fn behind(clusters: &[Cluster], port: u16, newest: Option<u32>) -> Option<(Cluster, u32)> {
    let serving = clusters.iter().find(|c| c.port == port)?;
    let newest = newest?;
    (serving.version < newest).then(|| (serving.clone(), newest))
}

/// The databases of a cluster besides PostgreSQL's own (to tell an empty new cluster from one
/// somebody uses).
async fn user_databases(c: &Cluster) -> Result<i64> {
    let mut cmd = Command::new("psql")
        .arg("-X")
        .arg("-At")
        .arg("-p")
        .arg(c.port.to_string())
        .arg("-c")
        .arg("SELECT count(*) FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')");
    cmd.run_as = Some(RunAs::lookup("postgres")?);
    let out = supervisor::run_helper(cmd, b"", Duration::from_secs(30)).await?;
    if !out.exit.success() {
        bail!(
            "asking cluster {} {} for its databases: {}",
            c.version,
            c.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("psql's count")
}

/// Moves `old` to major `to` with pg_upgradecluster (pg_upgrade, copying: the old cluster's
/// files stay as they were, stopped, on another port). An empty cluster of `to` under the
/// same name, as installing the new server made it, is dropped first; one with databases is
/// refused. The new cluster takes the old one's port, so nothing else changes. Run with the
/// clients (the service) stopped.
pub async fn upgrade(old: &Cluster, to: u32) -> Result<String> {
    let clusters = list().await?;
    if let Some(empty) = clusters
        .iter()
        .find(|c| c.version == to && c.name == old.name)
    {
        if !empty.online {
            supervisor::run_checked(
                Command::new("pg_ctlcluster")
                    .arg(to.to_string())
                    .arg(&empty.name)
                    .arg("start"),
                "starting the new cluster to look into it",
                Duration::from_secs(120),
            )
            .await?;
        }
        let n = user_databases(empty).await?;
        if n > 0 {
            bail!(
                "PostgreSQL {to}'s cluster {:?} (port {}) already holds {n} database(s): it is not the empty one the package made. Move them or drop it yourself (pg_dropcluster --stop {to} {}), then run this again",
                empty.name,
                empty.port,
                empty.name
            );
        }
        supervisor::run_checked(
            Command::new("pg_dropcluster")
                .arg("--stop")
                .arg(to.to_string())
                .arg(&empty.name),
            "dropping the new server's empty cluster",
            Duration::from_secs(120),
        )
        .await?;
    }
    // Hours for a big database would be unusual with pg_upgrade (it copies files, it does not
    // dump and reload them).
    supervisor::run_checked(
        Command::new("pg_upgradecluster")
            .arg("-m")
            .arg("upgrade")
            .arg("-v")
            .arg(to.to_string())
            .arg(old.version.to_string())
            .arg(&old.name),
        "pg_upgradecluster",
        Duration::from_secs(4 * 3600),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_read_from_pg_lsclusters_and_an_older_one_on_our_port_is_behind() {
        let text = "15  main    5432 online postgres /var/lib/postgresql/15/main /var/log/postgresql/postgresql-15-main.log\n\
                    17  main    5433 online,recovery postgres /var/lib/postgresql/17/main /var/log/postgresql/postgresql-17-main.log\n\
                    garbage\n";
        let c = parse(text);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            Cluster {
                version: 15,
                name: "main".into(),
                port: 5432,
                online: true,
                data_dir: "/var/lib/postgresql/15/main".into()
            }
        );
        assert!(c[1].online);
        let (old, newest) = behind(&c, 5432, Some(17)).unwrap();
        assert_eq!((old.version, newest), (15, 17));
        assert!(behind(&c, 5433, Some(17)).is_none(), "17 is the newest");
        assert!(
            behind(&c, 5999, Some(17)).is_none(),
            "not a cluster of ours"
        );
        assert!(behind(&c, 5432, None).is_none());
    }

    #[test]
    fn the_newest_installed_server_is_the_highest_major_with_a_postgres_binary() {
        let d = tempfile::tempdir().unwrap();
        for (v, bin) in [("13", true), ("15", true), ("17", false), ("x", true)] {
            std::fs::create_dir_all(d.path().join(v).join("bin")).unwrap();
            if bin {
                std::fs::write(d.path().join(v).join("bin/postgres"), b"").unwrap();
            }
        }
        // 17's directory without its server (only the client left): not installed.
        assert_eq!(newest_installed_in(d.path()), Some(15));
        assert_eq!(newest_installed_in(&d.path().join("missing")), None);
    }
}
