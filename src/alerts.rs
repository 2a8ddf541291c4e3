//! Problems that need an admin, in one place: subsystems `raise` and `clear` them by key; the
//! registration bot reads them and tells the admins in a DM (DESIGN.md §9).
//!
//! A foundation module: it knows nothing of Matrix, certificates or children. Keys name the
//! problem and its kind: `certificate:<name>`, `crash-loop:<child>`, `element-update`,
//! `doctor:<check>` (a check of the daily doctor run that fails).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::units::unix;

/// Key prefix of a certificate that cannot be issued or renewed.
pub const CERTIFICATE: &str = "certificate:";
/// Key prefix of a child in a crash loop.
pub const CRASH_LOOP: &str = "crash-loop:";
/// Key of a failed Element update.
pub const ELEMENT_UPDATE: &str = "element-update";

const DAY: Duration = Duration::from_secs(86_400);

/// One open problem.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub key: String,
    /// What is wrong and what to do about it, for a person.
    pub message: String,
    /// Unix seconds of the first `raise` since the last `clear`.
    pub since: u64,
}

/// The registry. Clones share it.
#[derive(Debug, Clone)]
pub struct Alerts {
    problems: Arc<Mutex<BTreeMap<String, Problem>>>,
    /// Bumped on every change, so readers can wait for one instead of polling.
    changes: Arc<watch::Sender<u64>>,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts::new()
    }
}

impl Alerts {
    pub fn new() -> Alerts {
        Alerts {
            problems: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    /// Records that `key` is a problem now. Raising it again updates the message but keeps the
    /// time it started, so "failing for more than a day" counts from the first failure.
    pub fn raise(&self, key: &str, message: impl Into<String>) {
        let message = message.into();
        let mut p = self.problems.lock().unwrap();
        match p.get_mut(key) {
            Some(old) if old.message == message => return,
            Some(old) => old.message = message,
            None => {
                tracing::warn!(problem = key, "{message}");
                p.insert(
                    key.to_string(),
                    Problem {
                        key: key.to_string(),
                        message,
                        since: unix(SystemTime::now()),
                    },
                );
            }
        }
        drop(p);
        self.changes.send_modify(|n| *n += 1);
    }

    /// The problem is over (a no-op if it was not raised).
    pub fn clear(&self, key: &str) {
        if self.problems.lock().unwrap().remove(key).is_some() {
            tracing::info!(problem = key, "resolved");
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Every open problem, by key.
    pub fn active(&self) -> Vec<Problem> {
        self.problems.lock().unwrap().values().cloned().collect()
    }

    /// Changes whenever a problem is raised, changed or cleared.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// How long a problem must last before an admin is told. A certificate renewal is retried
/// with back-off while the current certificate keeps serving for weeks, so one failed night
/// is not worth a message; a crash loop or a failed update is news at once.
pub fn grace(key: &str) -> Duration {
    if key.starts_with(CERTIFICATE) {
        DAY
    } else {
        Duration::ZERO
    }
}

/// At most one message per problem per this long, however often it flaps.
pub const REPEAT_AFTER: Duration = DAY;

/// The problems admins should hear about now: past their grace period and not told about in
/// the last `REPEAT_AFTER` (`last_sent` holds unix seconds per key, kept by the caller).
pub fn due<'a>(
    problems: &'a [Problem],
    last_sent: &BTreeMap<String, u64>,
    now: u64,
) -> Vec<&'a Problem> {
    problems
        .iter()
        .filter(|p| now.saturating_sub(p.since) >= grace(&p.key).as_secs())
        .filter(|p| {
            last_sent
                .get(&p.key)
                .is_none_or(|t| now.saturating_sub(*t) >= REPEAT_AFTER.as_secs())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_again_keeps_the_start_and_clear_removes() {
        let a = Alerts::new();
        let rx = a.subscribe();
        a.raise("crash-loop:coturn", "coturn keeps failing");
        let since = a.active()[0].since;
        a.raise("crash-loop:coturn", "coturn keeps failing (6 times)");
        assert_eq!(a.active().len(), 1);
        assert_eq!(a.active()[0].since, since);
        assert_eq!(a.active()[0].message, "coturn keeps failing (6 times)");
        assert!(rx.has_changed().unwrap());
        a.clear("crash-loop:coturn");
        assert!(a.active().is_empty());
        a.clear("crash-loop:coturn");
    }

    #[test]
    fn certificates_wait_a_day_and_nothing_repeats_within_a_day() {
        let now = 10 * 86_400;
        let p = |key: &str, since: u64| Problem {
            key: key.into(),
            message: String::new(),
            since,
        };
        let problems = vec![
            p("certificate:a.example", now - 3600),
            p("certificate:b.example", now - 86_400 - 1),
            p("crash-loop:coturn", now - 5),
            p(ELEMENT_UPDATE, now),
        ];
        let keys = |v: Vec<&Problem>| v.iter().map(|p| p.key.clone()).collect::<Vec<_>>();
        assert_eq!(
            keys(due(&problems, &BTreeMap::new(), now)),
            [
                "certificate:b.example",
                "crash-loop:coturn",
                "element-update"
            ]
        );
        let mut sent = BTreeMap::new();
        sent.insert("crash-loop:coturn".to_string(), now - 3600);
        sent.insert(ELEMENT_UPDATE.to_string(), now - 86_400);
        assert_eq!(
            keys(due(&problems, &sent, now)),
            ["certificate:b.example", "element-update"]
        );
    }
}
