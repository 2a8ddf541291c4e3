//! `homelab-matrix upgrade`: new versions of the installed `PACKAGES` from the configured apt
//! sources, and nothing else of the box's (the rest stays the operator's, or
//! unattended-upgrades'). homelab-matrix-upgrade.timer runs it daily with `--unattended`,
//! which does nothing unless `upgrades.unattended` is on. The packages' own scripts do the
//! rest: the preinst takes the snapshot, the service restarts, and a Synapse that never becomes
//! healthy on the new version has it undone (backup::rollback).

use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::config::Config;
use crate::supervisor::{self, Command};

/// apt and dpkg together: the venv package may build Synapse from PyPI (minutes), and the
/// service's restart waits for its READY.
const APT_TIMEOUT: Duration = Duration::from_secs(3600);

fn apt_get() -> Command {
    Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        // A conffile an operator edited stays theirs, as unattended-upgrades does.
        .arg("-o")
        .arg("Dpkg::Options::=--force-confdef")
        .arg("-o")
        .arg("Dpkg::Options::=--force-confold")
        // apt of another run (the operator's, or unattended-upgrades') finishes first.
        .arg("-o")
        .arg("DPkg::Lock::Timeout=600")
        .arg("-q")
}

async fn apt(cmd: Command, what: &str) -> Result<String> {
    supervisor::run_checked(cmd, what, APT_TIMEOUT)
        .await
        .context("fix what apt says, then run `homelab-matrix upgrade` again")
}

/// Upgrades what is installed of `PACKAGES`; returns apt's output and what changed.
pub async fn run(cfg: &Config, unattended: bool) -> Result<String> {
    if unattended && !cfg.upgrades.unattended {
        return Ok(
            "upgrades.unattended is false: nothing done (upgrade by hand: homelab-matrix upgrade)"
                .into(),
        );
    }
    let before = super::installed().await;
    if before.is_empty() {
        bail!(
            "none of {} is installed by dpkg: a source install upgrades by building again",
            super::PACKAGES.join(", ")
        );
    }
    apt(apt_get().arg("update"), "apt-get update").await?;
    // A package apt-mark holds (a rollback holds the versions it went back to) stays as it
    // is: named to apt-get it would be an error.
    let free: Vec<&String> = before
        .iter()
        .filter(|(_, i)| !i.held)
        .map(|(k, _)| k)
        .collect();
    let said = if free.is_empty() {
        String::new()
    } else {
        let mut install = apt_get().arg("install").arg("-y").arg("--only-upgrade");
        for name in free {
            install = install.arg(name);
        }
        apt(install, "apt-get install --only-upgrade").await?
    };
    let after = super::installed().await;
    let changed: Vec<String> = after
        .iter()
        .filter(|(k, i)| before.get(*k).map(|b| &b.version) != Some(&i.version))
        .map(|(k, i)| {
            let old = before.get(k).map_or("none", |b| b.version.as_str());
            format!("{k} {old} -> {}", i.version)
        })
        .collect();
    let held: Vec<&str> = after
        .iter()
        .filter(|(_, i)| i.held)
        .map(|(k, _)| k.as_str())
        .collect();
    let mut report = if changed.is_empty() {
        "no new versions".to_string()
    } else {
        format!("upgraded: {}", changed.join(", "))
    };
    if !held.is_empty() {
        report.push_str(&format!(
            "; held: {} (after a rollback: `homelab-matrix status` says why; `apt-mark unhold` them to try again)",
            held.join(" ")
        ));
    }
    Ok(format!("{}\n{report}", said.trim_end()))
}
