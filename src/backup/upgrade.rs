//! A snapshot before every upgrade. The package's preinst takes one (`backup --pre-upgrade`)
//! before new files are unpacked; and at every start the supervisor compares the installed
//! homelab-matrix and Synapse with the versions of the last healthy start: when one changed
//! (Synapse upgraded by pip or apt, outside our package), it takes the snapshot itself before
//! Synapse runs its schema migrations, unless the preinst's is fresh. Until the new Synapse is
//! healthy, `status` says how to get back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::schedule;
use crate::config::Config;
use crate::fsutil::{Owner, ensure_dir};
use crate::supervisor::{self, Command, RunAs};

const VERSIONS_FILE: &str = "versions.json";
const PENDING_FILE: &str = "upgrade.json";
/// A preinst snapshot younger than this counts for the start that follows it.
const FRESH: u64 = 2 * 3600;
/// Alert key while an upgraded Synapse is not healthy.
pub const ALERT: &str = "upgrade";

/// Synapse's version, from the Python that runs it.
pub async fn synapse_version(cfg: &Config) -> Result<String> {
    let mut cmd = Command::new(&cfg.synapse.python)
        .arg("-c")
        .arg("import synapse; print(synapse.__version__)");
    cmd.run_as = RunAs::lookup(&cfg.synapse.user).ok();
    let out = supervisor::run_helper(cmd, b"", Duration::from_secs(60)).await?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.exit.success() || v.is_empty() {
        bail!(
            "{} cannot tell Synapse's version: {}",
            cfg.synapse.python,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(v)
}

/// Key prefix of an installed package's version in the versions map.
pub const PACKAGE: &str = "package:";

/// The versions of what runs: `homelab-matrix`, `synapse`, and `package:<name>` for each of
/// our packages dpkg has installed (apt::PACKAGES; a repacked package of the same program is
/// an upgrade too, and its version is what a rollback reinstalls). Synapse's is asked up to three
/// times: one that cannot be told is taken for no upgrade (see [`changed`]), so a single slow or
/// failed import on a loaded box must not cost the snapshot before a real one.
pub async fn current(cfg: &Config) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert("homelab-matrix".into(), env!("CARGO_PKG_VERSION").into());
    for (name, version) in crate::apt::versions().await {
        v.insert(format!("{PACKAGE}{name}"), version);
    }
    for attempt in 1..=3 {
        match synapse_version(cfg).await {
            Ok(s) => {
                v.insert("synapse".into(), s);
                break;
            }
            Err(e) => {
                tracing::warn!(
                    attempt,
                    "{e:#}; an upgrade of Synapse is not noticed without it: check synapse.python and that the venv imports"
                );
                if attempt < 3 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    v
}

/// An upgrade whose Synapse has not been healthy yet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pending {
    pub from: BTreeMap<String, String>,
    pub to: BTreeMap<String, String>,
    /// The snapshot to restore to get back; None when none could be taken.
    pub snapshot: Option<PathBuf>,
    pub since: u64,
}

impl Pending {
    /// How to get back, for `status`, the journal and the admins.
    pub fn how_to_go_back(&self) -> String {
        let changed: Vec<String> = self
            .to
            .iter()
            .filter(|(k, v)| self.from.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} {} -> {v}", self.from.get(k).map_or("?", |s| s)))
            .collect();
        let mut s = format!(
            "upgrade {}: Synapse has not become healthy since.",
            changed.join(", ")
        );
        match &self.snapshot {
            Some(f) => s.push_str(&format!(
                " To get back: reinstall the old versions ({}), then `homelab-matrix restore {} --force`.",
                self.reinstall(),
                f.display()
            )),
            None => s.push_str(&format!(
                " No snapshot was taken before it; reinstall the old versions ({}) and restore the newest backup (`homelab-matrix restore FILE --force`).",
                self.reinstall()
            )),
        }
        s
    }

    /// The packages the upgrade changed, with the versions they had before it (what a rollback
    /// installs again); a package the upgrade brought in new has no version to go back to.
    pub fn changed_packages(&self) -> Vec<(String, Option<String>)> {
        self.to
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(PACKAGE)?;
                let old = self.from.get(k);
                (old != Some(v)).then(|| (name.to_string(), old.cloned()))
            })
            .collect()
    }

    fn reinstall(&self) -> String {
        let mut how = vec![];
        let packages: Vec<String> = self
            .changed_packages()
            .into_iter()
            .filter_map(|(name, old)| Some(format!("{name}={}", old?)))
            .collect();
        if !packages.is_empty() {
            how.push(format!(
                "apt install --allow-downgrades {}",
                packages.join(" ")
            ));
        } else if let Some(v) = self.from.get("homelab-matrix")
            && self.to.get("homelab-matrix") != Some(v)
        {
            how.push(format!("apt install homelab-matrix={v}"));
        }
        if let Some(v) = self.from.get("synapse")
            && self.to.get("synapse") != Some(v)
            && packages.is_empty()
        {
            how.push(format!(
                "Synapse {v}: apt install matrix-synapse-py3={v}* or /opt/venvs/matrix-synapse/bin/pip install matrix-synapse=={v}"
            ));
        }
        if how.is_empty() {
            "none changed".into()
        } else {
            how.join("; ")
        }
    }
}

/// A JSON file of the backup state directory (root 0700, files 0600).
pub(super) fn read<T: for<'de> Deserialize<'de>>(cfg: &Config, name: &str) -> Option<T> {
    serde_json::from_slice(&std::fs::read(schedule::state_dir(cfg).join(name)).ok()?).ok()
}

pub(super) fn write<T: Serialize>(cfg: &Config, name: &str, v: &T) -> Result<()> {
    let d = ensure_dir(&schedule::state_dir(cfg), Owner::root(), 0o700)?;
    d.write_atomic(
        name,
        &serde_json::to_vec_pretty(v).expect("serializes"),
        Owner::root(),
        0o600,
    )
}

pub fn load_pending(cfg: &Config) -> Option<Pending> {
    read(cfg, PENDING_FILE)
}

/// After a restore: the next start records the versions afresh instead of taking a snapshot
/// of what was just restored.
pub fn forget_versions(cfg: &Config) {
    let d = schedule::state_dir(cfg);
    let _ = std::fs::remove_file(d.join(VERSIONS_FILE));
    let _ = std::fs::remove_file(d.join(PENDING_FILE));
}

/// The newest pre-upgrade snapshot in the backup directory made in the last `FRESH` seconds.
fn fresh_snapshot(cfg: &Config, now: u64) -> Option<PathBuf> {
    let dir = Path::new(&cfg.backup.dir);
    let mut snaps: Vec<schedule::Listed> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str().and_then(schedule::parse_name))
        .filter(|l| l.kind == "pre-upgrade" && now.saturating_sub(l.created_at) < FRESH)
        .collect();
    snaps.sort_by_key(|l| l.created_at);
    snaps.pop().map(|l| dir.join(l.name))
}

/// Before Synapse starts: when the versions differ from the last healthy start's, makes sure
/// a snapshot exists (the preinst's, or one taken now) and notes the upgrade as pending.
/// Never fails the start: a snapshot that cannot be taken is logged and said in `status`.
pub async fn before_start(cfg: &Config, config_path: &Path) -> Option<Pending> {
    let now = crate::units::unix(std::time::SystemTime::now());
    let from: BTreeMap<String, String> = match read(cfg, VERSIONS_FILE) {
        Some(v) => v,
        // Nothing recorded: a first start (nothing to protect), or a restore.
        None => return None,
    };
    let to = current(cfg).await;
    if !changed(&from, &to) {
        return load_pending(cfg);
    }
    if let Some(p) = load_pending(cfg).filter(|p| p.to == to) {
        return Some(p);
    }
    let snapshot = if !cfg.backup.enabled {
        None
    } else if let Some(f) = fresh_snapshot(cfg, now) {
        Some(f)
    } else {
        tracing::info!(
            ?from,
            ?to,
            "versions changed since the last start: taking a snapshot before Synapse starts"
        );
        match super::make(cfg, config_path, Path::new(&cfg.backup.dir), "pre-upgrade").await {
            Ok(made) => {
                tracing::info!("pre-upgrade snapshot: {made}");
                let _ = schedule::record_good(cfg, &made, None);
                Some(made.file)
            }
            Err(e) => {
                tracing::error!("the snapshot before the upgrade failed: {e:#}");
                None
            }
        }
    };
    let pending = Pending {
        from,
        to,
        snapshot,
        since: now,
    };
    if let Err(e) = write(cfg, PENDING_FILE, &pending) {
        tracing::warn!("noting the upgrade: {e:#}");
    }
    Some(pending)
}

/// An upgrade is a known version replaced by another. A version that could not be told (a
/// Python killed by a shutdown, a slow import) is no upgrade: taking it for one made a
/// snapshot at an ordinary restart.
fn changed(from: &BTreeMap<String, String>, to: &BTreeMap<String, String>) -> bool {
    to.iter()
        .any(|(k, v)| from.get(k).is_some_and(|old| old != v))
}

/// Synapse is healthy with these versions: they are the new baseline; no upgrade is pending.
/// A baseline without Synapse's version is not recorded; the last full one stays. Returns the
/// versions recorded.
pub async fn healthy(cfg: &Config) -> Option<BTreeMap<String, String>> {
    let v = current(cfg).await;
    if !v.contains_key("synapse") {
        tracing::warn!(
            "Synapse is healthy but its version could not be read; the versions of the last healthy start stay the baseline for the upgrade check"
        );
        return None;
    }
    if let Err(e) = write(cfg, VERSIONS_FILE, &v) {
        tracing::warn!("recording the versions: {e:#}");
    }
    let _ = std::fs::remove_file(schedule::state_dir(cfg).join(PENDING_FILE));
    Some(v)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A versions map from pairs.
    pub(in crate::backup) fn v(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_a_known_version_replaced_by_another_is_an_upgrade() {
        let both = v(&[("homelab-matrix", "0.1.0"), ("synapse", "1.163.2")]);
        assert!(!changed(&both, &both));
        assert!(changed(
            &both,
            &v(&[("homelab-matrix", "0.1.0"), ("synapse", "1.164.0")])
        ));
        assert!(changed(
            &both,
            &v(&[("homelab-matrix", "0.2.0"), ("synapse", "1.163.2")])
        ));
        // Synapse's version unknown now, or unknown when recorded: no upgrade seen.
        assert!(!changed(&both, &v(&[("homelab-matrix", "0.1.0")])));
        assert!(!changed(&v(&[("homelab-matrix", "0.1.0")]), &both));
    }
}
