//! The daily backup (on by default): make, verify, prune to 7 daily and 4 weekly, copy to
//! restic when a repository is set; the outcome is kept for `status`, and a failure raises an
//! admin alert (the bot tells the admins).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Made;
use crate::alerts::Alerts;
use crate::config::Config;
use crate::fsutil::{Dir, Owner, ensure_dir};

/// Alert key of a failed daily backup (src/alerts.rs).
pub const ALERT: &str = "backup";
/// state/backup: what `status` shows about backups, and the versions of the last healthy start.
pub const STATE_DIR: &str = "backup";
const LAST_FILE: &str = "last.json";
/// Pre-upgrade snapshots kept besides the daily and weekly ones.
const KEEP_PRE_UPGRADE: usize = 2;

/// `20261201T033000Z`.
pub fn stamp(unix: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn parse_stamp(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let month = time::Month::try_from(n(4..6)? as u8).ok()?;
    let date = time::Date::from_calendar_date(n(0..4)? as i32, month, n(6..8)? as u8).ok()?;
    let t = time::Time::from_hms(n(9..11)? as u8, n(11..13)? as u8, n(13..15)? as u8).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp() as u64,
    )
}

/// A backup file in the backup directory, from its name (see `super::file_name`).
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub name: String,
    pub created_at: u64,
    pub kind: String,
}

/// The kinds of backup file (`super::file_name`'s last part).
pub const KINDS: [&str; 3] = ["daily", "manual", "pre-upgrade"];

pub fn parse_name(name: &str) -> Option<Listed> {
    let rest = name.strip_prefix("homelab-matrix-")?.strip_suffix(".tar")?;
    // The kind is the part after the stamp: it may hold a '-' itself (pre-upgrade), as the
    // server name before the stamp may.
    let (head, kind) = KINDS
        .iter()
        .find_map(|k| Some((rest.strip_suffix(k)?.strip_suffix('-')?, *k)))?;
    let (_, stamp) = head.rsplit_once('-')?;
    Some(Listed {
        name: name.to_string(),
        created_at: parse_stamp(stamp)?,
        kind: kind.to_string(),
    })
}

/// The files retention removes: of the daily and manual backups, the newest of each of the
/// last `keep_daily` days that have one and of each of the last `keep_weekly` ISO weeks stay
/// (as `restic forget --keep-daily --keep-weekly` counts); of the pre-upgrade snapshots, the
/// newest two.
pub fn to_delete(files: &[Listed], keep_daily: u32, keep_weekly: u32) -> Vec<String> {
    let mut sorted: Vec<&Listed> = files.iter().collect();
    sorted.sort_by_key(|f| std::cmp::Reverse(f.created_at));
    let mut keep = std::collections::BTreeSet::new();
    let (mut days, mut weeks) = (vec![], vec![]);
    let mut pre = 0;
    for f in &sorted {
        if f.kind == "pre-upgrade" {
            if pre < KEEP_PRE_UPGRADE {
                keep.insert(f.name.clone());
            }
            pre += 1;
            continue;
        }
        let day = f.created_at / 86_400;
        // 1970-01-01 was a Thursday: +3 makes weeks start on Monday.
        let week = (day + 3) / 7;
        if !days.contains(&day) && days.len() < keep_daily as usize {
            days.push(day);
            keep.insert(f.name.clone());
        }
        if !weeks.contains(&week) && weeks.len() < keep_weekly as usize {
            weeks.push(week);
            keep.insert(f.name.clone());
        }
    }
    sorted
        .iter()
        .filter(|f| !keep.contains(&f.name))
        .map(|f| f.name.clone())
        .collect()
}

/// Removes what retention lets go in `dir`; returns the names removed.
pub fn prune(dir: &Path, cfg: &Config) -> Result<Vec<String>> {
    let d = Dir::open(dir)?;
    let files: Vec<Listed> = d
        .entries()?
        .iter()
        .filter_map(|n| n.to_str().and_then(parse_name))
        .collect();
    let gone = to_delete(&files, cfg.backup.keep_daily, cfg.backup.keep_weekly);
    for name in &gone {
        d.remove(name.as_str())?;
    }
    Ok(gone)
}

/// What `status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Last {
    pub good: Option<Made>,
    /// Where a restic copy went, when one is configured.
    pub restic: Option<String>,
    pub failure: Option<Failure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub at: u64,
    pub error: String,
}

pub fn state_dir(cfg: &Config) -> PathBuf {
    cfg.state_dir().join(STATE_DIR)
}

pub fn load_last(cfg: &Config) -> Option<Last> {
    let bytes = std::fs::read(state_dir(cfg).join(LAST_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn save_last(cfg: &Config, last: &Last) -> Result<()> {
    ensure_dir(&cfg.state_dir(), Owner::root(), 0o755)?;
    let d = ensure_dir(&state_dir(cfg), Owner::root(), 0o700)?;
    d.write_atomic(
        LAST_FILE,
        &serde_json::to_vec_pretty(last).expect("serializes"),
        Owner::root(),
        0o600,
    )
}

/// Notes a good backup (made by any path: daily, `backup`, pre-upgrade) for `status`.
pub fn record_good(cfg: &Config, made: &Made, restic: Option<String>) -> Result<()> {
    let mut last = load_last(cfg).unwrap_or_default();
    last.good = Some(made.clone());
    last.restic = restic;
    last.failure = None;
    save_last(cfg, &last)
}

pub fn record_failure(cfg: &Config, error: &str) -> Result<()> {
    let mut last = load_last(cfg).unwrap_or_default();
    last.failure = Some(Failure {
        at: crate::units::unix(std::time::SystemTime::now()),
        error: error.to_string(),
    });
    save_last(cfg, &last)
}

/// One complete run as the daily timer does it: make, verify, prune, copy to restic. The
/// result is recorded either way.
pub async fn run_once(
    cfg: &Config,
    config_path: &Path,
    kind: &str,
) -> Result<(Made, Option<String>)> {
    let result = async {
        let dir = Path::new(&cfg.backup.dir);
        let made = super::make(cfg, config_path, dir, kind).await?;
        let verified = super::verify(cfg, &made.file).await;
        if let Err(e) = verified {
            // A backup that does not restore is no backup: it must not push a good one out.
            let _ = std::fs::remove_file(&made.file);
            return Err(e.context(format!(
                "the new backup {} failed its own verification and was removed",
                made.file.display()
            )));
        }
        for gone in prune(dir, cfg)? {
            tracing::info!(file = %gone, "backup retention removed an old backup");
        }
        let restic = if cfg.backup.repository.is_empty() {
            None
        } else {
            Some(super::restic::copy(cfg, &made.file).await?)
        };
        anyhow::Ok((made, restic))
    }
    .await;
    match &result {
        Ok((made, restic)) => record_good(cfg, made, restic.clone())?,
        Err(e) => record_failure(cfg, &format!("{e:#}"))?,
    }
    result
}

/// Seconds from `now` (unix) until the next `minute` (after midnight UTC).
pub fn until_next(now: u64, minute: u32) -> Duration {
    let day = now / 86_400 * 86_400;
    let mut at = day + u64::from(minute) * 60;
    if at <= now {
        at += 86_400;
    }
    Duration::from_secs(at - now)
}

/// The service's daily backup at `backup.time` (UTC).
pub async fn daily(
    cfg: Config,
    config_path: PathBuf,
    alerts: Alerts,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if !cfg.backup.enabled {
        return;
    }
    loop {
        let now = crate::units::unix(std::time::SystemTime::now());
        let wait = until_next(now, cfg.backup.minute_of_day());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        match run_once(&cfg, &config_path, "daily")
            .await
            .context("the daily backup failed")
        {
            Ok((made, _)) => {
                tracing::info!("daily backup: {made}");
                alerts.clear(ALERT);
            }
            Err(e) => alerts.raise(
                ALERT,
                format!(
                    "{e:#}. Nothing of the running server is lost, but there is no fresh backup: fix the cause and run `homelab-matrix backup` on the server to check; `homelab-matrix status` shows the last good one."
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let t = 1_795_000_000;
        let n = super::super::file_name("example.org", t, "daily");
        assert_eq!(
            n,
            format!("homelab-matrix-example.org-{}-daily.tar", stamp(t))
        );
        assert_eq!(
            parse_name(&n),
            Some(Listed {
                name: n.clone(),
                created_at: t,
                kind: "daily".into()
            })
        );
        // Every kind, with a '-' in the server name: "pre-upgrade" has one too (the
        // supervisor did not find the preinst's snapshot and took a second).
        for kind in KINDS {
            let n = super::super::file_name("my-home.example", t, kind);
            assert_eq!(
                parse_name(&n),
                Some(Listed {
                    name: n.clone(),
                    created_at: t,
                    kind: kind.into()
                }),
                "{n}"
            );
        }
        assert_eq!(parse_name("homelab-matrix.toml"), None);
        assert_eq!(
            parse_name("homelab-matrix-a-20261201T000000Z-other.tar"),
            None
        );
    }

    #[test]
    fn keeps_seven_daily_and_four_weekly() {
        let day = 86_400;
        // 60 days of one daily backup each, plus a second one on the newest day, and 3
        // pre-upgrade snapshots.
        let start = 1_790_000_000 / day * day + 3 * 3600;
        let mut files = vec![];
        for i in 0..60 {
            let t = start + i * day;
            files.push(Listed {
                name: format!("d{i}"),
                created_at: t,
                kind: "daily".into(),
            });
        }
        files.push(Listed {
            name: "manual-late".into(),
            created_at: start + 59 * day + 3600,
            kind: "manual".into(),
        });
        for i in 0..3 {
            files.push(Listed {
                name: format!("pre{i}"),
                created_at: start + i * day,
                kind: "pre-upgrade".into(),
            });
        }
        let gone = to_delete(&files, 7, 4);
        let kept: Vec<&str> = files
            .iter()
            .map(|f| f.name.as_str())
            .filter(|n| !gone.iter().any(|g| g == n))
            .collect();
        // The newest of the last 7 days (the manual one on day 59), and the newest of each of
        // the last 4 weeks (3 of them already among the 7 days' or older).
        assert!(kept.contains(&"manual-late"), "{kept:?}");
        assert!(!kept.contains(&"d59"), "{kept:?}");
        for i in 53..59 {
            assert!(kept.contains(&format!("d{i}").as_str()), "{kept:?}");
        }
        assert!(kept.contains(&"pre2") && kept.contains(&"pre1") && !kept.contains(&"pre0"));
        let daily_kept = kept
            .iter()
            .filter(|n| n.starts_with('d') || n.starts_with('m'))
            .count();
        assert!((7..=10).contains(&daily_kept), "{kept:?}");
        assert!(!kept.contains(&"d0"));
    }

    #[test]
    fn next_run_is_today_or_tomorrow() {
        let midnight = 1_790_000_000 / 86_400 * 86_400;
        assert_eq!(
            until_next(midnight + 60, 3 * 60),
            Duration::from_secs(3 * 3600 - 60)
        );
        assert_eq!(
            until_next(midnight + 4 * 3600, 3 * 60),
            Duration::from_secs(23 * 3600)
        );
    }
}
