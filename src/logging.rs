//! Logging: to journald when systemd started us (structured fields such as `child=synapse`
//! survive as journal fields), else human-readable lines on stderr.
//!
//! An operator reads WARN and ERROR as "something is wrong", so on a healthy appliance the
//! default filter lets none through that do not mean it: our own lines at info, the Matrix
//! client libraries (the registration bot's matrix-sdk) at warn, minus the messages they log
//! routinely on a healthy server (`BENIGN`). RUST_LOG adds to that filter (a directive for
//! the same target replaces the default's), so `RUST_LOG=child=warn` or
//! `RUST_LOG=homelab_matrix::http=debug` changes only what it names.

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// The `run` command's filter when RUST_LOG is not set.
///
/// matrix-sdk's crates log every request at info. Its HTTP client also logs every failed
/// request at error; each of those failures is returned to the bot, which says what it means
/// in its own words, so that copy is off.
pub const DAEMON_DEFAULT: &str = "info,\
    matrix_sdk=warn,matrix_sdk::http_client=off,matrix_sdk_base=warn,matrix_sdk_common=warn,\
    matrix_sdk_crypto=warn,matrix_sdk_sqlite=warn,matrix_sdk_store_encryption=warn,\
    matrix_sdk_ui=warn,ruma=warn,ruma_common=warn,ruma_events=warn,ruma_client_api=warn,\
    ruma_html=warn,vodozemac=warn";

/// matrix-sdk's messages (target prefix, message start) that are routine on a healthy
/// appliance, dropped by the default filter.
pub const BENIGN: &[(&str, &str)] = &[
    // The bot keeps no server-side key backup (its keys live in its own store), and
    // matrix-sdk warns about the missing backup key at each round of room keys.
    (
        "matrix_sdk_crypto::backups",
        "Trying to backup room keys but no backup key was found",
    ),
    // A long-poll that timed out returns the `since` token again (Matrix spec, GET /sync:
    // next_batch may equal since); matrix-sdk notes it at info, every 30 s.
    ("matrix_sdk_base", "Got the same sync response twice"),
    // A new device's first /keys/query can run before its own keys upload has landed. A
    // device that really was deleted loses its access token too, and the bot logs in again
    // and says so (bot::session).
    (
        "matrix_sdk_crypto::identities",
        "Our own device might have been deleted",
    ),
];

/// Whether an event of `target` with `message` is one of the routine ones in `BENIGN`.
pub fn is_benign(target: &str, message: &str) -> bool {
    BENIGN
        .iter()
        .any(|(t, m)| target.starts_with(t) && message.starts_with(m))
}

/// Drops the events `is_benign` names, for every output (journald or stderr).
struct DropBenign;

impl<S: tracing::Subscriber> Layer<S> for DropBenign {
    fn event_enabled(&self, event: &tracing::Event<'_>, _: Context<'_, S>) -> bool {
        let target = event.metadata().target();
        // Only matrix-sdk's events are looked at: formatting every message would cost.
        if !BENIGN.iter().any(|(t, _)| target.starts_with(t)) {
            return true;
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        !is_benign(target, &m.0)
    }
}

struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, f: &Field, v: &str) {
        if f.name() == "message" {
            self.0 = v.to_string();
        }
    }

    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        if f.name() == "message" {
            self.0 = format!("{v:?}");
        }
    }
}

/// The default filter with `extra` (RUST_LOG's directives) after it: EnvFilter keeps the last
/// directive for each target, so an extra one replaces the default's for its target only.
/// A RUST_LOG that does not parse is an error naming it; the default alone stays usable.
pub fn filter(default: &str, extra: Option<&str>) -> (EnvFilter, Option<String>) {
    let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) else {
        return (EnvFilter::new(default), None);
    };
    match EnvFilter::builder().parse(format!("{default},{extra}")) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new(default),
            Some(format!(
                "RUST_LOG={extra:?} is not a log filter ({e}), so the default is used; write \
                 directives such as `debug` or `child=warn,homelab_matrix::http=debug`"
            )),
        ),
    }
}

/// `daemon`: the `run` command logs at info; the other commands only warnings, so their own
/// output stays readable. RUST_LOG adds to either (`filter`).
pub fn init(daemon: bool) {
    let default = if daemon { DAEMON_DEFAULT } else { "warn" };
    let (filter, bad_env) = filter(default, std::env::var("RUST_LOG").ok().as_deref());
    let base = tracing_subscriber::registry()
        .with(filter)
        .with(daemon.then_some(DropBenign));
    // systemd sets JOURNAL_STREAM for a unit's stdout/stderr (systemd.exec(5)).
    if daemon
        && std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = base
            .with(journald.with_syslog_identifier("homelab-matrix".into()))
            .try_init();
    } else {
        let _ = base
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_target(false),
            )
            .try_init();
    }
    if let Some(bad) = bad_env {
        tracing::warn!("{bad}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routine_matrix_sdk_messages_are_benign_and_others_are_not() {
        assert!(is_benign(
            "matrix_sdk_crypto::backups",
            "Trying to backup room keys but no backup key was found"
        ));
        assert!(is_benign(
            "matrix_sdk_base::client",
            "Got the same sync response twice"
        ));
        assert!(is_benign(
            "matrix_sdk_crypto::identities::manager",
            "Our own device might have been deleted"
        ));
        // Same words from another crate, or another message from the same place: kept.
        assert!(!is_benign(
            "homelab_matrix::bot",
            "Got the same sync response twice"
        ));
        assert!(!is_benign(
            "matrix_sdk_crypto::backups",
            "Backup key is invalid"
        ));
    }

    /// Which of `events` (target, level) pass `filter`.
    fn passing(filter: EnvFilter, events: &[(&str, tracing::Level)]) -> Vec<String> {
        use std::sync::{Arc, Mutex};
        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> Layer<S> for Seen {
            fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
                let mut m = Message(String::new());
                e.record(&mut m);
                self.0.lock().unwrap().push(m.0);
            }
        }
        let seen = Arc::new(Mutex::new(vec![]));
        let sub = tracing_subscriber::registry()
            .with(filter)
            .with(Seen(seen.clone()));
        tracing::subscriber::with_default(sub, || {
            for (target, level) in events {
                // Targets must be static in the macros: one call site per case.
                let m = format!("{target} {level}");
                match (*target, *level) {
                    ("homelab_matrix::bot", tracing::Level::INFO) => {
                        tracing::info!(target: "homelab_matrix::bot", "{m}")
                    }
                    ("homelab_matrix::http", tracing::Level::DEBUG) => {
                        tracing::debug!(target: "homelab_matrix::http", "{m}")
                    }
                    ("child", tracing::Level::INFO) => tracing::info!(target: "child", "{m}"),
                    ("child", tracing::Level::WARN) => tracing::warn!(target: "child", "{m}"),
                    ("matrix_sdk_base::client", tracing::Level::INFO) => {
                        tracing::info!(target: "matrix_sdk_base::client", "{m}")
                    }
                    ("matrix_sdk::http_client", tracing::Level::ERROR) => {
                        tracing::error!(target: "matrix_sdk::http_client", "{m}")
                    }
                    ("matrix_sdk::http_client", tracing::Level::DEBUG) => {
                        tracing::debug!(target: "matrix_sdk::http_client", "{m}")
                    }
                    other => panic!("no call site for {other:?}"),
                }
            }
        });
        Arc::try_unwrap(seen).unwrap().into_inner().unwrap()
    }

    #[test]
    fn rust_log_adds_to_the_default_filter_instead_of_replacing_it() {
        use tracing::Level;
        let events = [
            ("homelab_matrix::bot", Level::INFO),
            ("homelab_matrix::http", Level::DEBUG),
            ("child", Level::INFO),
            ("child", Level::WARN),
            ("matrix_sdk_base::client", Level::INFO),
            ("matrix_sdk::http_client", Level::ERROR),
            ("matrix_sdk::http_client", Level::DEBUG),
        ];
        let run = |extra| {
            let (f, bad) = filter(DAEMON_DEFAULT, extra);
            assert_eq!(bad, None);
            passing(f, &events)
        };
        let default = run(None);
        assert_eq!(
            default,
            ["homelab_matrix::bot INFO", "child INFO", "child WARN"]
        );
        assert_eq!(run(Some("")), default);
        // The quick start's: Synapse's lines from warnings up, everything else as by default.
        assert_eq!(
            run(Some("child=warn")),
            ["homelab_matrix::bot INFO", "child WARN"]
        );
        // What it names, it replaces; the rest of the default stays (matrix-sdk quiet).
        assert_eq!(
            run(Some("info,child=warn,homelab_matrix::http=debug")),
            [
                "homelab_matrix::bot INFO",
                "homelab_matrix::http DEBUG",
                "child WARN"
            ]
        );
        assert_eq!(
            run(Some("matrix_sdk::http_client=debug")),
            [
                "homelab_matrix::bot INFO",
                "child INFO",
                "child WARN",
                "matrix_sdk::http_client ERROR",
                "matrix_sdk::http_client DEBUG"
            ]
        );
    }

    #[test]
    fn a_rust_log_that_does_not_parse_is_named_and_the_default_kept() {
        let (f, bad) = filter(DAEMON_DEFAULT, Some("child=loud"));
        let bad = bad.expect("an error");
        assert!(bad.contains("RUST_LOG=\"child=loud\""), "{bad}");
        assert_eq!(
            passing(f, &[("child", tracing::Level::INFO)]),
            ["child INFO"]
        );
    }

    #[test]
    fn the_default_filter_parses() {
        // EnvFilter::new ignores bad directives silently; parse strictly here.
        for d in DAEMON_DEFAULT.split(',') {
            d.parse::<tracing_subscriber::filter::Directive>()
                .unwrap_or_else(|e| panic!("{d}: {e}"));
        }
    }
}
