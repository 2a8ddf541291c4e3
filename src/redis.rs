//! Redis, which Synapse's processes use for replication and a shared cache when workers run
//! (Synapse docs/workers.md "Setting up workers"): Debian's redis-server as its own user, on a
//! unix socket only, keeping nothing on disk.
//!
//! Its directory `state/redis` is Redis's (it makes its socket there), group Synapse's, 0750:
//! only Redis and Synapse's processes reach the socket. Root never connects to it: readiness is
//! `redis-cli ping` run as Redis's user. Redis's working directory is another one, root's and
//! empty (`state/redis-cwd`): Redis loads a `dump.rdb` it finds there at every start, even with
//! saving off, so in its own directory a planted one (a link to a file it cannot read) kept it
//! from starting (tests/privsep.rs); here there is none, and a SAVE has nowhere to write.

use std::time::Duration;

use anyhow::Result;
use nix::sys::signal::Signal;

use crate::config::Config;
use crate::fsutil::{Dir, Owner};
use crate::supervisor::{BackoffPolicy, ChildSpec, Command, Readiness, RunAs};

/// Beside redis-server in Debian's redis-tools, which redis-server depends on.
const REDIS_CLI: &str = "/usr/bin/redis-cli";

/// Redis's working directory, under the state dir: root's, empty.
const WORK_DIR: &str = "redis-cwd";

/// Makes Redis's directory (root makes it in its own state dir, then hands it over) and its
/// working directory (root's).
pub fn prepare(cfg: &Config, redis: &RunAs, synapse: &RunAs) -> Result<()> {
    let state = Dir::open(&cfg.state_dir())?;
    state.ensure_sub(
        crate::config::REDIS_DIR,
        Owner {
            uid: redis.uid,
            gid: synapse.gid,
        },
        0o750,
    )?;
    state.ensure_sub(WORK_DIR, Owner::root(), 0o755)?;
    Ok(())
}

/// How the supervisor runs Redis. Everything on the command line (redis-server takes
/// `--option value` in place of a file), so there is no config file to keep.
pub fn child_spec(cfg: &Config, run_as: RunAs) -> ChildSpec {
    let work = cfg.state_dir().join(WORK_DIR);
    let socket = cfg.redis_socket();
    let mut command = Command::new(&cfg.synapse.redis_server);
    for (k, v) in [
        // No TCP listener at all.
        ("--port", "0"),
        ("--unixsocket", &*socket.to_string_lossy()),
        // The socket file is Redis's own group's; the directory (group Synapse's, 0750) is
        // what keeps everyone else out.
        ("--unixsocketperm", "777"),
        ("--dir", &*work.to_string_lossy()),
        // Replication and a cache: nothing worth keeping across a restart.
        ("--save", ""),
        ("--appendonly", "no"),
        // Synapse's cache entries carry their own expiry; this bounds the rest.
        ("--maxmemory", "256mb"),
        ("--maxmemory-policy", "allkeys-lru"),
        ("--daemonize", "no"),
        ("--supervised", "no"),
        // Stdout, which the supervisor sends to the journal.
        ("--logfile", ""),
    ] {
        command = command.arg(k).arg(v);
    }
    command.cwd = work;
    let mut ping = Command::new(REDIS_CLI).arg("-s").arg(&socket).arg("ping");
    ping.run_as = Some(run_as.clone());
    command.run_as = Some(run_as);
    ChildSpec {
        name: "redis".into(),
        command,
        readiness: Readiness::Command(ping),
        ready_timeout: Duration::from_secs(30),
        stop_signal: Signal::SIGTERM,
        grace: Duration::from_secs(10),
        backoff: BackoffPolicy::default(),
        up: None,
    }
}
