//! Undoing an upgrade on which Synapse never became healthy (README "Upgrades"): the packages
//! of before it (kept by debian/keep-debs at each install) installed again and held, then the
//! snapshot taken before it restored. Only while the upgrade is pending (backup::upgrade): once
//! the new version has been healthy it has taken messages, which a restore would lose, so it is
//! never undone by itself.
//!
//! The service decides ([`decide`]) and hands over to `homelab-matrix rollback` in a unit of
//! its own (systemd-run), as dpkg stops and starts the service it runs from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::schedule;
use super::upgrade::{self, Pending};
use crate::apt;
use crate::config::Config;
use crate::supervisor::{self, CRASH_LOOP_FAILURES, ChildStatus, Command};

/// Alert key of a rollback (under way, done or failed).
pub const ALERT: &str = "rollback";
const RECORD_FILE: &str = "rollback.json";
const UNIT: &str = "homelab-matrix-rollback";
/// How long a Synapse that keeps running (not crashing) may take to become healthy on a new
/// version before the upgrade counts as failed. Synapse applies its schema deltas before it
/// listens, and a large one on a big database can take an hour or more; the work that takes
/// longer runs as background updates after it is up (Synapse docs, "Upgrading"). A Synapse
/// that exits is not migrating: [`CRASH_LOOP_FAILURES`] failed starts in a row decide sooner.
pub const PATIENCE: Duration = Duration::from_secs(6 * 3600);
/// apt and dpkg for the old packages (the venv one may build Synapse again from PyPI), and
/// the restore, which starts the service and waits for it.
const STEP_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    RollingBack,
    RolledBack,
    Failed,
}

/// What `status` says about the last rollback, until a later upgrade is healthy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub at: u64,
    pub from: BTreeMap<String, String>,
    pub to: BTreeMap<String, String>,
    /// Why the upgrade counts as failed.
    pub reason: String,
    pub snapshot: PathBuf,
    /// The package files installed again.
    pub packages: Vec<PathBuf>,
    pub outcome: Outcome,
    /// What failed, for `Failed`.
    pub detail: String,
    /// The packages held at their old versions, so that the next upgrade does not bring the
    /// broken one back.
    pub held: Vec<String>,
}

impl Record {
    /// For `status`, the journal and the admins: what happened and what to do next.
    pub fn summary(&self) -> String {
        let changes = changes(&self.from, &self.to);
        match self.outcome {
            Outcome::RollingBack => format!(
                "ROLLING BACK the upgrade {changes}: {}. `journalctl -u {UNIT}` follows it.",
                self.reason
            ),
            Outcome::RolledBack => format!(
                "ROLLED BACK the upgrade {changes}: {}. Back on the versions of before it, with the snapshot {} restored; nothing written since was lost (the new version never served). Held: {}. To try again once a fixed version is published: apt-mark unhold {} && homelab-matrix upgrade",
                self.reason,
                self.snapshot.display(),
                self.held.join(" "),
                self.held.join(" ")
            ),
            Outcome::Failed => format!(
                "ROLLBACK FAILED for the upgrade {changes} ({}): {}. By hand: systemctl stop homelab-matrix; apt install --allow-downgrades {}; homelab-matrix restore {} --force",
                self.reason,
                self.detail,
                self.packages
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                self.snapshot.display()
            ),
        }
    }
}

fn changes(from: &BTreeMap<String, String>, to: &BTreeMap<String, String>) -> String {
    to.iter()
        .filter(|(k, v)| from.get(*k) != Some(v))
        .map(|(k, v)| format!("{k} {} -> {v}", from.get(k).map_or("none", |s| s)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn load(cfg: &Config) -> Option<Record> {
    upgrade::read(cfg, RECORD_FILE)
}

fn save(cfg: &Config, r: &Record) -> Result<()> {
    upgrade::write(cfg, RECORD_FILE, r)
}

/// Healthy on `versions`: a record of a rollback from other versions is history now (a later
/// upgrade worked); one that brought these versions back stays for `status`.
pub fn healthy_on(cfg: &Config, versions: &BTreeMap<String, String>) {
    if let Some(r) = load(cfg)
        && r.outcome != Outcome::RollingBack
        && r.from
            .iter()
            .any(|(k, v)| versions.get(k).is_some_and(|n| n != v))
    {
        let _ = std::fs::remove_file(schedule::state_dir(cfg).join(RECORD_FILE));
    }
}

#[derive(Debug, PartialEq)]
pub enum Decision {
    Wait,
    RollBack(String),
}

/// Failed starts after apt and dpkg were done that a crash loop must include: a Synapse
/// started while apt still unpacks may lack its venv, and must get a try on what apt left.
pub const FAILURES_AFTER_APT: u32 = 2;

/// Whether the pending upgrade `p` has failed, from Synapse's state: `failures` failed starts
/// in a row, `after_apt` of them since apt and dpkg last ran.
pub fn decide(
    p: &Pending,
    synapse: &ChildStatus,
    failures: u32,
    after_apt: u32,
    now: u64,
) -> Decision {
    if failures >= CRASH_LOOP_FAILURES && after_apt >= FAILURES_AFTER_APT {
        return Decision::RollBack(format!(
            "Synapse failed {failures} starts in a row on the new version (last: {})",
            synapse.last_exit.as_deref().unwrap_or("did not start")
        ));
    }
    let waited = now.saturating_sub(p.since);
    if waited >= PATIENCE.as_secs() {
        return Decision::RollBack(format!(
            "Synapse has not become healthy in the {} h since the upgrade",
            waited / 3600
        ));
    }
    Decision::Wait
}

/// What a rollback of `p` needs: the snapshot, and the kept package file of the version each
/// changed package had before. Err says what is missing.
pub fn plan(p: &Pending, kept: &Path) -> std::result::Result<(PathBuf, Vec<PathBuf>), String> {
    let snapshot = p
        .snapshot
        .clone()
        .ok_or("no snapshot was taken before the upgrade")?;
    if !snapshot.is_file() {
        return Err(format!("the snapshot {} is gone", snapshot.display()));
    }
    let changed = p.changed_packages();
    if changed.is_empty() {
        return Err(
            "the upgrade changed none of the packages (Synapse was replaced outside apt), so there is no package to go back to"
                .into(),
        );
    }
    let mut debs = vec![];
    for (name, old) in changed {
        let old = old.ok_or(format!("{name} came new with the upgrade"))?;
        debs.push(apt::find_kept(kept, &name, &old).ok_or(format!(
            "no package file of {name} {old} was kept in {} (it was installed before this version kept them)",
            kept.display()
        ))?);
    }
    Ok((snapshot, debs))
}

/// From the service: starts `homelab-matrix rollback` in a transient unit of its own, which
/// outlives the service's stop.
pub async fn launch(config_path: &Path, reason: &str) -> Result<()> {
    let exe = std::env::current_exe().context("finding the homelab-matrix binary")?;
    supervisor::run_checked(
        Command::new("systemd-run")
            .arg(format!("--unit={UNIT}"))
            .arg("--collect")
            .arg("--quiet")
            .arg("--description=homelab-matrix: undo an upgrade on which Synapse never started")
            .arg(exe)
            .arg("--config")
            .arg(config_path)
            .arg("rollback")
            .arg("--reason")
            .arg(reason),
        "systemd-run",
        Duration::from_secs(60),
    )
    .await?;
    Ok(())
}

async fn step(what: &str, cmd: Command) -> Result<String> {
    supervisor::run_checked(cmd, what, STEP_TIMEOUT).await
}

fn systemctl(args: &[&str]) -> Command {
    args.iter()
        .fold(Command::new("systemctl"), |c, a| c.arg(*a))
}

/// `homelab-matrix rollback`: undoes the pending upgrade, as root, outside the service.
pub async fn run(cfg: &Config, config_path: &Path, reason: Option<String>) -> Result<String> {
    let Some(p) = upgrade::load_pending(cfg) else {
        bail!(
            "no upgrade is pending: Synapse has been healthy since the last one, so it has taken messages that a rollback would lose. To go back anyway: install the old packages from {} and restore a backup (homelab-matrix restore FILE --force)",
            apt::KEPT_DIR
        );
    };
    let (snapshot, packages) = plan(&p, Path::new(apt::KEPT_DIR)).map_err(|why| {
        anyhow::anyhow!(
            "the upgrade cannot be undone by itself: {why}. {}",
            p.how_to_go_back()
        )
    })?;
    let mut record = Record {
        at: crate::units::unix(std::time::SystemTime::now()),
        from: p.from.clone(),
        to: p.to.clone(),
        reason: reason.unwrap_or_else(|| "rolled back by hand".into()),
        snapshot: snapshot.clone(),
        packages: packages.clone(),
        outcome: Outcome::RollingBack,
        detail: String::new(),
        held: vec![],
    };
    save(cfg, &record)?;
    tracing::warn!("{}", record.summary());
    let result = undo(cfg, config_path, &mut record).await;
    // Whatever happened, the service may start again.
    let _ = step(
        "unmask",
        systemctl(&["unmask", "--runtime", "homelab-matrix"]),
    )
    .await;
    match &result {
        Ok(()) => record.outcome = Outcome::RolledBack,
        Err(e) => {
            record.outcome = Outcome::Failed;
            record.detail = format!("{e:#}");
        }
    }
    save(cfg, &record)?;
    match result {
        Ok(()) => Ok(record.summary()),
        Err(_) => bail!("{}", record.summary()),
    }
}

async fn undo(cfg: &Config, config_path: &Path, record: &mut Record) -> Result<()> {
    // dpkg starts the service again after it installs the old package: the runtime mask keeps
    // it stopped until the snapshot is back (and is gone at a reboot, whatever happens here).
    step(
        "masking the service",
        systemctl(&["mask", "--runtime", "homelab-matrix"]),
    )
    .await?;
    step(
        "stopping the service",
        systemctl(&["stop", "homelab-matrix"]),
    )
    .await?;
    let mut names = vec![];
    for deb in &record.packages {
        let said = step(
            "reading a kept package",
            Command::new("dpkg-deb")
                .arg("-f")
                .arg(deb)
                .arg("Package")
                .arg("Version"),
        )
        .await?;
        let field = |f: &str| {
            said.lines()
                .find_map(|l| l.strip_prefix(f)?.strip_prefix(':'))
                .map(|s| s.trim().to_string())
        };
        let (Some(name), Some(version)) = (field("Package"), field("Version")) else {
            bail!("{} is not a Debian package", deb.display());
        };
        if record.from.get(&format!("{}{name}", upgrade::PACKAGE)) != Some(&version) {
            bail!(
                "{} holds {name} {version}, not the version of before the upgrade",
                deb.display()
            );
        }
        names.push(name);
    }
    let mut install = Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        // The snapshot to go back to exists; the preinst need not take one of the broken state.
        .env("HOMELAB_MATRIX_SKIP_SNAPSHOT", "1")
        .arg("-y")
        .arg("-q")
        .arg("-o")
        .arg("DPkg::Lock::Timeout=600")
        .arg("install")
        .arg("--allow-downgrades");
    for deb in &record.packages {
        install = install.arg(deb);
    }
    let said = step("installing the packages of before the upgrade", install).await?;
    tracing::info!("{}", said.trim_end());
    let mut hold = Command::new("apt-mark").arg("hold");
    for n in &names {
        hold = hold.arg(n);
    }
    step("holding the old versions", hold).await?;
    record.held = names;
    // Said as done from here: the restore starts the service, whose start tells the admins
    // what the record says; a failed restore makes it `Failed` again.
    record.outcome = Outcome::RolledBack;
    save(cfg, record)?;
    step(
        "unmasking the service",
        systemctl(&["unmask", "--runtime", "homelab-matrix"]),
    )
    .await?;
    // The old binary restores what it wrote before the upgrade, and starts the service.
    let said = step(
        "restoring the snapshot",
        Command::new("/usr/bin/homelab-matrix")
            .arg("--config")
            .arg(config_path)
            .arg("restore")
            .arg(&record.snapshot)
            .arg("--force"),
    )
    .await?;
    tracing::info!("{}", said.trim_end());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::upgrade::tests::v;
    use super::*;
    use crate::supervisor::State;

    fn synapse(last_exit: &str) -> ChildStatus {
        ChildStatus {
            name: "synapse".into(),
            state: State::Backoff,
            user: "matrix-synapse".into(),
            pid: None,
            uptime_secs: None,
            started_at: None,
            restarts: 7,
            last_exit: Some(last_exit.into()),
            crash_loop: true,
            next_start_in_secs: Some(3),
        }
    }

    fn pending(snapshot: Option<PathBuf>) -> Pending {
        Pending {
            from: v(&[
                ("homelab-matrix", "0.1.0"),
                ("package:homelab-matrix", "0.1.0"),
                ("package:homelab-matrix-synapse-venv", "0.1.0"),
                ("synapse", "1.163.2"),
            ]),
            to: v(&[
                ("homelab-matrix", "0.1.0"),
                ("package:homelab-matrix", "0.1.0+1"),
                ("package:homelab-matrix-synapse-venv", "0.1.0+1"),
                ("synapse", "1.163.2"),
            ]),
            snapshot,
            since: 1_000_000,
        }
    }

    #[test]
    fn a_crash_loop_or_a_start_past_the_patience_fails_the_upgrade_a_slow_one_does_not() {
        let p = pending(None);
        let s = synapse("exit status 1");
        // Migrating: up, not crashing, within the patience.
        assert_eq!(decide(&p, &s, 0, 0, p.since + 3600), Decision::Wait);
        assert_eq!(
            decide(&p, &s, CRASH_LOOP_FAILURES - 1, 4, p.since + 60),
            Decision::Wait
        );
        // Failing while apt ran (a venv still being built) is no verdict yet.
        assert_eq!(
            decide(
                &p,
                &s,
                CRASH_LOOP_FAILURES + 3,
                FAILURES_AFTER_APT - 1,
                p.since + 60
            ),
            Decision::Wait
        );
        let Decision::RollBack(why) = decide(
            &p,
            &s,
            CRASH_LOOP_FAILURES,
            FAILURES_AFTER_APT,
            p.since + 60,
        ) else {
            panic!("a crash loop is a failed upgrade");
        };
        assert!(
            why.contains("5 starts") && why.contains("exit status 1"),
            "{why}"
        );
        let Decision::RollBack(why) = decide(&p, &s, 0, 0, p.since + PATIENCE.as_secs()) else {
            panic!("past the patience is a failed upgrade");
        };
        assert!(why.contains("6 h"), "{why}");
    }

    #[test]
    fn a_rollback_needs_the_snapshot_and_the_old_version_of_every_changed_package() {
        let d = tempfile::tempdir().unwrap();
        let kept = d.path().join("kept");
        std::fs::create_dir(&kept).unwrap();
        let snap = d.path().join("snap.tar");
        assert!(
            plan(&pending(None), &kept)
                .unwrap_err()
                .contains("no snapshot")
        );
        assert!(
            plan(&pending(Some(snap.clone())), &kept)
                .unwrap_err()
                .contains("gone")
        );
        std::fs::write(&snap, b"").unwrap();
        let p = pending(Some(snap.clone()));
        let e = plan(&p, &kept).unwrap_err();
        assert!(
            e.contains("homelab-matrix 0.1.0 was kept")
                || e.contains("no package file of homelab-matrix"),
            "{e}"
        );
        for n in [
            apt::deb_file_name("homelab-matrix", "0.1.0", "amd64"),
            apt::deb_file_name("homelab-matrix", "0.1.0+1", "amd64"),
            apt::deb_file_name("homelab-matrix-synapse-venv", "0.1.0", "all"),
        ] {
            std::fs::write(kept.join(n), b"").unwrap();
        }
        let (s, debs) = plan(&p, &kept).unwrap();
        assert_eq!(s, snap);
        assert_eq!(
            debs,
            vec![
                kept.join("homelab-matrix_0.1.0_amd64.deb"),
                kept.join("homelab-matrix-synapse-venv_0.1.0_all.deb")
            ]
        );
        // Synapse replaced by pip, no package changed: nothing to reinstall.
        let mut pip = pending(Some(snap));
        pip.to = v(&[
            ("homelab-matrix", "0.1.0"),
            ("package:homelab-matrix", "0.1.0"),
            ("package:homelab-matrix-synapse-venv", "0.1.0"),
            ("synapse", "1.164.0"),
        ]);
        assert!(plan(&pip, &kept).unwrap_err().contains("outside apt"));
    }

    #[test]
    fn the_record_of_a_rollback_stays_until_other_versions_are_healthy() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.state.dir = d.path().display().to_string();
        let p = pending(Some(d.path().join("snap.tar")));
        let r = Record {
            at: 1,
            from: p.from.clone(),
            to: p.to.clone(),
            reason: "Synapse failed 5 starts in a row".into(),
            snapshot: d.path().join("snap.tar"),
            packages: vec![],
            outcome: Outcome::RolledBack,
            detail: String::new(),
            held: vec![
                "homelab-matrix".into(),
                "homelab-matrix-synapse-venv".into(),
            ],
        };
        save(&cfg, &r).unwrap();
        let s = load(&cfg).unwrap().summary();
        assert!(
            s.contains("ROLLED BACK")
                && s.contains("package:homelab-matrix 0.1.0 -> 0.1.0+1")
                && s.contains("apt-mark unhold homelab-matrix homelab-matrix-synapse-venv"),
            "{s}"
        );
        // Healthy on the versions it went back to: still said.
        healthy_on(&cfg, &p.from);
        assert!(load(&cfg).is_some());
        // A later upgrade healthy: history.
        healthy_on(&cfg, &p.to);
        assert!(load(&cfg).is_none());
    }
}
