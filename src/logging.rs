//! Logging: to journald when systemd started us (structured fields such as `child=synapse`
//! survive as journal fields), else human-readable lines on stderr.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `daemon`: the `run` command logs at info; the other commands only warnings, so their own
/// output stays readable. RUST_LOG overrides both.
pub fn init(daemon: bool) {
    // matrix-sdk logs every request at info, and failed ones (that it returns to the bot,
    // which says what they mean) at error; the bot's own lines say what matters.
    let default = if daemon {
        "info,matrix_sdk=warn,matrix_sdk::http_client=off,matrix_sdk_base=warn,matrix_sdk_crypto=warn,matrix_sdk_crypto::backups=error,matrix_sdk_sqlite=warn,matrix_sdk_common=warn"
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // systemd sets JOURNAL_STREAM for a unit's stdout/stderr (systemd.exec(5)).
    if daemon
        && std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(journald.with_syslog_identifier("homelab-matrix".into()))
            .try_init();
        return;
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .try_init();
}
