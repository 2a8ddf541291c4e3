//! Logging: to journald when systemd started us (structured fields such as `child=synapse`
//! survive as journal fields), else human-readable lines on stderr.
//!
//! An operator reads WARN and ERROR as "something is wrong", so on a healthy appliance the
//! default filter lets none through that do not mean it: our own lines at info, the Matrix
//! client libraries (the registration bot's matrix-sdk) at warn, minus the messages they log
//! routinely on a healthy server (`BENIGN`). RUST_LOG replaces all of it, for debugging.

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

/// `daemon`: the `run` command logs at info; the other commands only warnings, so their own
/// output stays readable. RUST_LOG overrides both.
pub fn init(daemon: bool) {
    let (filter, drop_benign) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, None),
        Err(_) if daemon => (EnvFilter::new(DAEMON_DEFAULT), Some(DropBenign)),
        Err(_) => (EnvFilter::new("warn"), None),
    };
    let base = tracing_subscriber::registry()
        .with(filter)
        .with(drop_benign);
    // systemd sets JOURNAL_STREAM for a unit's stdout/stderr (systemd.exec(5)).
    if daemon
        && std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = base
            .with(journald.with_syslog_identifier("homelab-matrix".into()))
            .try_init();
        return;
    }
    let _ = base
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .try_init();
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

    #[test]
    fn the_default_filter_parses() {
        // EnvFilter::new ignores bad directives silently; parse strictly here.
        for d in DAEMON_DEFAULT.split(',') {
            d.parse::<tracing_subscriber::filter::Directive>()
                .unwrap_or_else(|e| panic!("{d}: {e}"));
        }
    }
}
