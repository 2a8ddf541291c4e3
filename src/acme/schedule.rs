//! When to renew one certificate, kept in `state/acme/renewal/<name>.json` (DESIGN.md §3,
//! "renewal metadata"): the time is drawn once per certificate, with its jitter, and then
//! kept across hourly checks and restarts. It is drawn again only for a new certificate, or
//! when the CA's ARI window changes (RFC 9773 §4.2: the client picks a time inside the
//! current window).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::certs::{Cert, unix};
use crate::fsutil::{Owner, ensure_dir, write_atomic};
use crate::secrets::{random_fraction, sha256_hex};

/// RFC 9773 §4.3: clients bound the CA's Retry-After, e.g. to between a minute and a day.
pub const ARI_MIN_POLL: Duration = Duration::from_secs(60);
pub const ARI_MAX_POLL: Duration = Duration::from_secs(86400);
/// After a failed renewalInfo fetch (or an invalid window): the lifetime-based time stands,
/// and ARI is asked again this much later.
pub const ARI_RETRY: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// A third of the lifetime left, minus up to a thirtieth of it as jitter.
    Lifetime,
    /// A uniformly random time inside the CA's suggested window (RFC 9773 §4.2).
    Ari,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// SHA-256 of the leaf certificate (DER) this schedule belongs to.
    pub cert_sha256: String,
    /// Unix seconds.
    pub renew_at: u64,
    pub basis: Basis,
    /// The ARI window `renew_at` was drawn in (unix seconds, start and end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ari_window: Option<(u64, u64)>,
    /// When to fetch renewalInfo again (the CA's Retry-After, bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ari_next_poll: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ari_explanation: Option<String>,
}

impl Renewal {
    /// A fresh schedule for `cert`: the lifetime rule, and ARI asked at once (RFC 9773 §4.3:
    /// "immediately after issuance").
    pub fn draw(cert: &Cert, now: SystemTime) -> Renewal {
        let third = cert.lifetime() / 3;
        let jitter = (cert.lifetime() / 30).mul_f64(random_fraction());
        Renewal {
            cert_sha256: fingerprint(cert),
            renew_at: unix(cert.not_after - third - jitter),
            basis: Basis::Lifetime,
            ari_window: None,
            ari_next_poll: Some(unix(now)),
            ari_explanation: None,
        }
    }

    pub fn renew_at(&self) -> SystemTime {
        at(self.renew_at)
    }

    /// Whether renewalInfo should be fetched now.
    pub fn ari_due(&self, now: SystemTime) -> bool {
        self.ari_next_poll.is_some_and(|t| at(t) <= now)
    }

    /// The CA's window and Retry-After. Returns whether anything changed.
    pub fn apply_ari(
        &mut self,
        start: u64,
        end: u64,
        retry_after: Duration,
        explanation: Option<String>,
        now: SystemTime,
    ) -> bool {
        let before = self.clone();
        if end <= start {
            // RFC 9773 §4.2: an invalid window counts as no answer.
            self.ari_next_poll = Some(unix(now + ARI_RETRY));
        } else {
            if self.ari_window != Some((start, end)) {
                self.renew_at = start + (random_fraction() * (end - start) as f64) as u64;
                self.basis = Basis::Ari;
                self.ari_window = Some((start, end));
            }
            self.ari_explanation = explanation;
            let wait = retry_after.clamp(ARI_MIN_POLL, ARI_MAX_POLL);
            self.ari_next_poll = Some(unix(now + wait));
        }
        *self != before
    }

    pub fn ari_failed(&mut self, now: SystemTime) {
        self.ari_next_poll = Some(unix(now + ARI_RETRY));
    }
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

pub fn fingerprint(cert: &Cert) -> String {
    cert.key
        .cert
        .first()
        .map(|leaf| sha256_hex(leaf.as_ref()))
        .unwrap_or_default()
}

/// The schedules on disk, one file per name.
pub struct Schedules {
    dir: PathBuf,
}

impl Schedules {
    pub fn new(acme_dir: &Path) -> Schedules {
        Schedules {
            dir: acme_dir.join("renewal"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// The stored schedule of `cert`, if it is this certificate's; anything else (none, a
    /// previous certificate's, unreadable) gives `None`.
    pub fn load(&self, name: &str, cert: &Cert) -> Option<Renewal> {
        let text = std::fs::read(self.path(name)).ok()?;
        let r: Renewal = match serde_json::from_slice(&text) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(name, "ignoring unreadable renewal metadata: {e}");
                return None;
            }
        };
        (r.cert_sha256 == fingerprint(cert)).then_some(r)
    }

    pub fn save(&self, name: &str, r: &Renewal) -> Result<()> {
        ensure_dir(&self.dir, Owner::root(), 0o700)?;
        let path = self.path(name);
        write_atomic(&path, &serde_json::to_vec_pretty(r)?, Owner::root(), 0o600)
            .with_context(|| format!("saving {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Renewal {
        Renewal {
            cert_sha256: "x".into(),
            renew_at: 1000,
            basis: Basis::Lifetime,
            ari_window: None,
            ari_next_poll: Some(0),
            ari_explanation: None,
        }
    }

    #[test]
    fn an_ari_window_is_drawn_in_once_and_retry_after_is_bounded() {
        let now = at(500);
        let mut r = sample();
        assert!(r.ari_due(now));
        assert!(r.apply_ari(2000, 3000, Duration::from_secs(7200), None, now));
        assert_eq!(r.basis, Basis::Ari);
        assert!((2000..=3000).contains(&r.renew_at), "{r:?}");
        assert_eq!(r.ari_next_poll, Some(500 + 7200));
        assert!(!r.ari_due(at(600)));
        // The same window again: the drawn time stays.
        let drawn = r.renew_at;
        for _ in 0..20 {
            r.apply_ari(2000, 3000, Duration::from_secs(7200), None, now);
            assert_eq!(r.renew_at, drawn);
        }
        // A new window: drawn again inside it.
        r.apply_ari(100, 200, Duration::from_secs(1), None, now);
        assert!((100..=200).contains(&r.renew_at), "{r:?}");
        assert_eq!(
            r.ari_next_poll,
            Some(500 + 60),
            "Retry-After under a minute"
        );
        r.apply_ari(100, 200, Duration::from_secs(10 * 86400), None, now);
        assert_eq!(r.ari_next_poll, Some(500 + 86400), "Retry-After over a day");
        // An invalid window changes nothing but the next poll.
        let kept = r.renew_at;
        r.apply_ari(300, 300, Duration::from_secs(60), None, now);
        assert_eq!(r.renew_at, kept);
        assert_eq!(r.ari_next_poll, Some(500 + 3600));
    }
}
