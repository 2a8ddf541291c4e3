//! The descriptor budget. systemd starts services with a soft `RLIMIT_NOFILE` of 1024 (its
//! default `1024:524288` since v240, Debian 12's too) so that old `select(2)` code keeps
//! working; a server that wants more raises its own soft limit to the hard one, and gives its
//! children the original back (systemd.exec(5), `LimitNOFILE=`). Without this the front
//! door's connection cap (8192) lies far beyond what `accept` can reach: a few hostile clients
//! holding ~1000 idle connections made every `accept` fail with EMFILE, and the eviction of
//! idle connections at the cap never ran.

use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The limits this process started with (soft, hard): what children get.
static ORIGINAL: OnceLock<(u64, u64)> = OnceLock::new();

/// Raises the soft descriptor limit to the hard one (once); returns the soft limit now in
/// force.
pub fn raise() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    ORIGINAL.get_or_init(|| (soft, hard));
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(e) => {
            tracing::warn!(soft, hard, "could not raise the open-file limit: {e}");
            soft
        }
    }
}

/// The limits to restore in a child (None when [`raise`] never ran): resolved before the
/// fork, applied between fork and exec (setrlimit is a plain syscall).
pub fn for_children() -> Option<(u64, u64)> {
    ORIGINAL.get().copied()
}

/// Descriptors kept for everything but client connections: files, pipes, the database, the
/// bot's store, ACME and Element downloads.
pub const RESERVE: u64 = 256;
/// Fewer client connections than this would make the server useless; said loudly instead.
pub const MIN_CONNECTIONS: u64 = 64;

/// How many client connections fit in `nofile` descriptors next to `upstream` connections to
/// Synapse and the [`RESERVE`]: `wanted`, or fewer.
pub fn connections_that_fit(nofile: u64, upstream: u64, wanted: u64) -> u64 {
    let room = nofile.saturating_sub(upstream + RESERVE);
    wanted.min(room.max(MIN_CONNECTIONS))
}

/// Paces `accept` after errors: EMFILE/ENFILE leave the pending connection in the queue, so
/// accepting again at once fails again at once, a busy loop. The pause doubles up to `MAX`.
/// The first error of a run is logged, and at most one run a minute: near the limit, a
/// descriptor freed now and then lets one accept through, which would otherwise log every
/// few seconds. The end of a logged run is logged too.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
    /// When a run's first error was last logged.
    warned: Option<std::time::Instant>,
    /// This run's first error was logged (so its end is).
    run_logged: bool,
}

impl AcceptBackoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);
    /// At most one logged run per this.
    pub const WARN_EVERY: Duration = Duration::from_secs(60);

    /// Records an error; returns how long to pause and whether this error should be logged.
    pub fn failed(&mut self) -> (Duration, bool) {
        self.failures = self.failures.saturating_add(1);
        let delay = Self::FIRST
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(Self::MAX);
        let log = self.failures == 1 && self.warned.is_none_or(|t| t.elapsed() >= Self::WARN_EVERY);
        if log {
            self.warned = Some(std::time::Instant::now());
            self.run_logged = true;
        }
        (delay, log)
    }

    /// Records a success; returns how many errors came before it, when that run was logged
    /// (0 otherwise: nothing to report).
    pub fn succeeded(&mut self) -> u32 {
        let errors = std::mem::take(&mut self.failures);
        if std::mem::take(&mut self.run_logged) {
            errors
        } else {
            0
        }
    }

    /// Waits out an `accept` error on `what` ("the control socket"), logging the first of a
    /// run.
    pub async fn pause(&mut self, what: &str, e: &std::io::Error) {
        let (pause, log) = self.failed();
        if log {
            tracing::warn!(
                "{what} cannot accept connections ({e}); retrying with pauses up to {}s. If this is EMFILE, something holds many connections open: raise LimitNOFILE= for homelab-matrix (systemctl edit homelab-matrix) and restart",
                Self::MAX.as_secs()
            );
        }
        tokio::time::sleep(pause).await;
    }

    /// After a successful `accept`: logs the end of a run of errors on `what`.
    pub fn recovered(&mut self, what: &str) {
        let errors = self.succeeded();
        if errors > 0 {
            tracing::info!(errors, "{what} accepts connections again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_grows_caps_logs_once_and_resets() {
        let mut b = AcceptBackoff::default();
        let steps: Vec<(Duration, bool)> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(steps[0], (Duration::from_millis(10), true));
        assert_eq!(steps[1], (Duration::from_millis(20), false));
        assert_eq!(steps[2], (Duration::from_millis(40), false));
        assert!(steps.iter().skip(1).all(|(_, log)| !log), "logged once");
        assert_eq!(steps[9].0, AcceptBackoff::MAX);
        for _ in 0..100 {
            assert_eq!(b.failed().0, AcceptBackoff::MAX);
        }
        assert_eq!(b.succeeded(), 110);
        // A new run within the minute (one accept got through near the limit) is not logged,
        // nor its end; after the minute a new run is.
        assert_eq!(b.failed(), (Duration::from_millis(10), false));
        assert_eq!(b.succeeded(), 0, "an unlogged run's end is not logged");
        b.warned = Some(std::time::Instant::now() - AcceptBackoff::WARN_EVERY);
        assert_eq!(
            b.failed(),
            (Duration::from_millis(10), true),
            "a new run after the minute logs again"
        );
        assert_eq!(b.succeeded(), 1);
    }

    #[test]
    fn connections_are_capped_by_the_descriptors_left() {
        assert_eq!(connections_that_fit(524_288, 512, 8192), 8192);
        assert_eq!(connections_that_fit(1024, 512, 8192), 256);
        assert_eq!(connections_that_fit(1500, 512, 8192), 732);
        assert_eq!(connections_that_fit(512, 512, 8192), MIN_CONNECTIONS);
    }
}
