//! The descriptor budget. systemd starts services with a soft `RLIMIT_NOFILE` of 1024 (its
//! default `1024:524288` since v240, Debian 12's too) so that old `select(2)` code keeps
//! working; a server that wants more raises its own soft limit to the hard one, and gives its
//! children the original back (systemd.exec(5), `LimitNOFILE=`). Without this the front
//! door's connection cap (8192) lies far beyond what `accept` can reach: a few hostile clients
//! holding ~1000 idle connections made every `accept` fail with EMFILE, and the eviction of
//! idle connections at the cap never ran.

use std::sync::OnceLock;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_by_the_descriptors_left() {
        assert_eq!(connections_that_fit(524_288, 512, 8192), 8192);
        assert_eq!(connections_that_fit(1024, 512, 8192), 256);
        assert_eq!(connections_that_fit(1500, 512, 8192), 732);
        assert_eq!(connections_that_fit(512, 512, 8192), MIN_CONNECTIONS);
    }
}
