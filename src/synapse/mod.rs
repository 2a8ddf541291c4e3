//! Synapse: its rendered config, its child spec, and the admin API the appliance drives.
//!
//! Two directories (DESIGN.md §3), so that root never writes where the child can:
//! - `state/synapse` (root, group matrix-synapse, 0750; files 0640): what Synapse only reads.
//!   `homeserver.yaml` (ours), `log.yaml`, `conf.d/` (copies of the operator's
//!   `synapse.d/*.yaml`, applied after ours: Synapse reads `-c` files in order and a later file
//!   replaces whole top-level keys), `secrets/` (the secrets Synapse needs, copied from
//!   `state/secrets`).
//! - `state/synapse-data` (matrix-synapse, 0700): what Synapse writes. `signing.key` (made by
//!   Synapse on first start, never replaced), `media_store/`, `homeserver.pid`; also its working
//!   directory and HOME.

pub mod admin;
pub mod s3;
pub mod workers;
pub mod yaml;

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::config::Config;
use crate::fsutil::{Dir, Owner};
use crate::secrets::{Kind, Secrets};
use crate::supervisor::{BackoffPolicy, ChildSpec, Command, Readiness, RunAs};

/// Directory names under the state dir.
const CONFIG_DIR: &str = "synapse";
const DATA_DIR: &str = "synapse-data";
/// What Synapse writes, moved from `state/synapse` to `state/synapse-data` on upgrade.
const WRITTEN_BY_SYNAPSE: [&str; 2] = ["signing.key", "media_store"];
/// libpq's password file (PostgreSQL docs, 34.16 "The Password File").
const PGPASS: &str = "pgpass";

/// Paths of Synapse's files for a given state dir.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Root's, read by Synapse through its group.
    pub dir: PathBuf,
    /// Synapse's own.
    pub data: PathBuf,
}

impl Layout {
    pub fn new(state_dir: &Path) -> Layout {
        Layout {
            dir: state_dir.join(CONFIG_DIR),
            data: state_dir.join(DATA_DIR),
        }
    }
    pub fn homeserver_yaml(&self) -> PathBuf {
        self.dir.join("homeserver.yaml")
    }
    pub fn conf_d(&self) -> PathBuf {
        self.dir.join("conf.d")
    }
    pub fn log_yaml(&self) -> PathBuf {
        self.dir.join("log.yaml")
    }
    pub fn secrets(&self) -> PathBuf {
        self.dir.join("secrets")
    }
    pub fn signing_key(&self) -> PathBuf {
        self.data.join("signing.key")
    }
    pub fn media_store(&self) -> PathBuf {
        self.data.join("media_store")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.data.join("homeserver.pid")
    }
    /// One file per worker process, read after the shared ones.
    pub fn workers_dir(&self) -> PathBuf {
        self.dir.join("workers")
    }
    pub fn worker_yaml(&self, name: &str) -> PathBuf {
        self.workers_dir().join(worker_file(name))
    }
}

/// The secrets Synapse reads, by the file name they get in its own secrets dir.
const SYNAPSE_SECRETS: [Kind; 5] = [
    Kind::RegistrationShared,
    Kind::Macaroon,
    Kind::Form,
    Kind::TurnShared,
    Kind::WorkerReplication,
];

/// A worker's own file's name in `workers_dir`.
fn worker_file(name: &str) -> String {
    format!("{name}.yaml")
}

/// The worker processes this config runs (none: one Synapse process).
pub fn worker_plan(cfg: &Config) -> Vec<workers::Worker> {
    workers::plan(cfg.synapse_workers(), cfg.synapse.worker_base_port)
}

/// Our part of Synapse's config. Secrets are referenced by path (`*_path`, `passfile`) so
/// that homeserver.yaml itself holds none.
pub fn homeserver_config(cfg: &Config, l: &Layout) -> Value {
    let sec = |k: Kind| l.secrets().join(k.file_name()).display().to_string();
    let mut v = json!({
        "server_name": cfg.server_name,
        // Synapse docs, config "public_baseurl": the URL clients reach the client API at.
        "public_baseurl": format!("https://{}/", cfg.hosts.matrix),
        // We serve /.well-known/matrix ourselves (DESIGN.md §2).
        "serve_server_wellknown": false,
        "report_stats": false,
        "pid_file": l.pid_file().display().to_string(),
        "signing_key_path": l.signing_key().display().to_string(),
        "media_store_path": l.media_store().display().to_string(),
        "max_upload_size": cfg.synapse.max_upload_size.text(),
        "log_config": l.log_yaml().display().to_string(),
        // Only the front door talks to Synapse, so it listens on loopback and trusts
        // X-Forwarded-For (Synapse docs/reverse_proxy.md).
        "listeners": [{
            "port": cfg.synapse.port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": false,
            "x_forwarded": true,
            "resources": [{"names": ["client", "federation"], "compress": false}],
        }],
        // TCP with a password: the child runs as matrix-synapse, the role is synapse, so peer
        // authentication over the socket would fail (LAB.md, PostgreSQL gotcha 3).
        "database": {
            "name": "psycopg2",
            "args": {
                "user": cfg.postgres.user,
                "dbname": cfg.postgres.database,
                "host": cfg.postgres.host,
                "port": cfg.postgres.port,
                "passfile": l.secrets().join(PGPASS).display().to_string(),
                "cp_min": 5,
                "cp_max": 10,
            },
        },
        // Registration only with a token (Synapse config "registration_requires_token").
        "enable_registration": true,
        "registration_requires_token": true,
        "registration_shared_secret_path": sec(Kind::RegistrationShared),
        "macaroon_secret_key_path": sec(Kind::Macaroon),
        "form_secret_path": sec(Kind::Form),
        "presence": {"enabled": cfg.synapse.presence},
        "url_preview_enabled": false,
        "trusted_key_servers": [{"server_name": "matrix.org"}],
        "suppress_key_server_warning": true,
    });
    if cfg.media.s3.enabled() {
        v["media_storage_providers"] = s3::providers(cfg);
    }
    // psycopg2 hands these to libpq (PostgreSQL docs 34.19: verify-full checks the chain and
    // the host name). The path, not libpq 16's `sslrootcert=system`: Debian 12 has libpq 15.
    if cfg.postgres.tls_verify() {
        let args = &mut v["database"]["args"];
        args["sslmode"] = json!("verify-full");
        args["sslrootcert"] = json!(cfg.postgres.ca_path());
    }
    let plan = worker_plan(cfg);
    if !plan.is_empty() {
        let o = v.as_object_mut().expect("an object");
        o["listeners"]
            .as_array_mut()
            .expect("a list")
            .push(workers::replication_listener(
                &workers::main_replication_socket(l),
            ));
        for (k, val) in workers::shared_config(
            &plan,
            l,
            &cfg.redis_socket(),
            &l.secrets().join(Kind::WorkerReplication.file_name()),
        ) {
            o.insert(k.into(), val);
        }
    }
    if cfg.turn.enabled {
        // Synapse docs/turn-howto.md: Synapse hands out credentials signed with the secret
        // coturn checks (use-auth-secret), valid for turn_user_lifetime.
        let o = v.as_object_mut().expect("an object");
        o.insert("turn_uris".into(), json!(crate::coturn::uris(cfg)));
        o.insert(
            "turn_shared_secret_path".into(),
            json!(sec(Kind::TurnShared)),
        );
        o.insert("turn_user_lifetime".into(), json!("1d"));
        o.insert("turn_allow_guests".into(), json!(cfg.turn.allow_guests));
    }
    // MatrixRTC only with a LiveKit SFU configured: Synapse's MSC4143 endpoint
    // (`/_matrix/client/unstable/org.matrix.msc4143/rtc/transports`) stays off otherwise, so no
    // client is sent to a focus that is not there. Synapse docs, config "matrix_rtc".
    if let Some(focus) = cfg
        .matrixrtc
        .focus(&format!("https://{}", cfg.hosts.matrix))
    {
        let o = v.as_object_mut().expect("an object");
        o.insert(
            "experimental_features".into(),
            // msc4222: `state_after` in /sync, which Element Call needs to track call
            // memberships reliably (Element Call's self-hosting guide).
            json!({"msc4143_enabled": true, "msc4222_enabled": true}),
        );
        o.insert("matrix_rtc".into(), json!({"transports": [focus]}));
        // MSC4140 delayed events: a call member's leave event, sent by Synapse if the device
        // stops refreshing it (a phone that lost its network leaves the call).
        o.insert("max_event_delay_duration".into(), json!("24h"));
    }
    v
}

/// Logging to stderr, which the supervisor turns into journald records tagged child=synapse.
/// The " - LEVEL - " shape is what `supervisor::log_child_line` maps to log levels.
fn log_config() -> Value {
    json!({
        "version": 1,
        "formatters": {"journal": {"format": "%(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "journal", "stream": "ext://sys.stderr"}},
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["console"]},
        "disable_existing_loggers": false,
    })
}

/// Writes Synapse's files. Returns true when anything Synapse reads changed (a restart is due).
pub fn render(cfg: &Config, secrets: &Secrets, synapse_user: &RunAs) -> Result<bool> {
    let l = Layout::new(&cfg.state_dir());
    let child = synapse_user.owner();
    let group = Owner::root_with_group(synapse_user.gid);
    let state = Dir::open(&cfg.state_dir())?;
    // Taken back through its descriptor first when an older version left it to the child.
    let dir = state.ensure_sub(CONFIG_DIR, group, 0o750)?;
    let data = state.ensure_sub(DATA_DIR, child, 0o700)?;
    adopt_old_layout(&dir, &data)?;
    let sec = dir.ensure_sub("secrets", group, 0o750)?;
    let conf_d = dir.ensure_sub("conf.d", group, 0o750)?;

    let mut changed = false;
    let mut names = vec![OsString::from(PGPASS)];
    for kind in SYNAPSE_SECRETS {
        let v = secrets.get(kind)?;
        changed |= sec.write_if_changed(kind.file_name(), v.expose().as_bytes(), group, 0o640)?;
        names.push(kind.file_name().into());
    }
    // libpq passfile format: hostname:port:database:username:password (libpq docs, 34.16).
    // libpq ignores a passfile with any group or other permission bit ("password file has
    // group or world access", checked with this host's libpq 15), so this one file is
    // Synapse's own, 0600. It still lives in root's directory: Synapse can change what it
    // holds (its own password) but cannot replace it with a link.
    let pw = crate::postgres::password(cfg, secrets)?;
    let pgpass = [
        cfg.postgres.host.as_str(),
        &cfg.postgres.port.to_string(),
        &cfg.postgres.database,
        &cfg.postgres.user,
        pw.expose(),
    ]
    .map(passfile_field)
    .join(":")
        + "\n";
    changed |= sec.write_if_changed(PGPASS, pgpass.as_bytes(), child, 0o600)?;
    if cfg.media.s3.enabled() {
        let creds = s3::credentials(cfg)?;
        changed |= sec.write_if_changed(s3::CREDENTIALS, creds.as_bytes(), group, 0o640)?;
        names.push(s3::CREDENTIALS.into());
    }
    sec.remove_all_but(|n| names.iter().any(|k| k == n))?;

    let header = "# Generated by homelab-matrix from /etc/homelab-matrix/homelab-matrix.toml.\n# Do not edit: it is rewritten at every start. Put your own settings in\n# /etc/homelab-matrix/synapse.d/*.yaml (applied after this file, whole top-level keys).\n";
    let hs = format!("{header}{}", yaml::to_yaml(&homeserver_config(cfg, &l)));
    changed |= dir.write_if_changed("homeserver.yaml", hs.as_bytes(), group, 0o640)?;
    let log = format!("{header}{}", yaml::to_yaml(&log_config()));
    changed |= dir.write_if_changed("log.yaml", log.as_bytes(), group, 0o640)?;
    changed |= sync_overrides(Path::new(&cfg.synapse.config_dir), &conf_d, group)?;
    let workers_dir = dir.ensure_sub("workers", group, 0o750)?;
    let plan = worker_plan(cfg);
    for w in &plan {
        let body = format!("{header}{}", yaml::to_yaml(&workers::worker_config(w, &l)));
        changed |=
            workers_dir.write_if_changed(&worker_file(&w.name), body.as_bytes(), group, 0o640)?;
    }
    changed |= workers_dir.remove_all_but(|n| {
        plan.iter()
            .any(|w| n.to_str() == Some(&worker_file(&w.name)))
    })?;
    Ok(changed)
}

/// In the older layout `state/synapse` was the child's own (matrix-synapse 0750) and held what
/// Synapse writes. By now `render` has taken the directory back through its descriptor, so the
/// child can add nothing more; here the signing key and media store move to `synapse-data` with
/// `renameat` (the entry itself, never what a link points to), and every other entry that is
/// not ours (the pid file, anything the child planted) is removed without being followed.
fn adopt_old_layout(dir: &Dir, data: &Dir) -> Result<()> {
    for name in dir.entries()? {
        match name.to_str() {
            Some("homeserver.yaml" | "log.yaml" | "conf.d" | "secrets" | "workers") => {}
            Some(n) if WRITTEN_BY_SYNAPSE.contains(&n) => {
                if data.contains(&name) {
                    tracing::warn!(
                        child = "synapse",
                        "{} is left from an older layout, but {} exists and is the one Synapse uses; remove the old one once you have checked it",
                        dir.join(n).display(),
                        data.join(n).display()
                    );
                    continue;
                }
                dir.rename_to(n, data, n)?;
                tracing::info!(
                    child = "synapse",
                    "moved {} to {}",
                    dir.join(n).display(),
                    data.join(n).display()
                );
            }
            _ => dir.remove(&name)?,
        }
    }
    Ok(())
}

/// Mirrors the operator's `*.yaml` overrides into conf.d (root's, read by Synapse's group, so
/// an operator's 0600 file still works), removing copies whose source is gone. `synapse.d` is
/// root's: a link there is the operator's choice and is read through, but only to a regular
/// file; conf.d itself is only written through its descriptor.
fn sync_overrides(src: &Path, dst: &Dir, owner: Owner) -> Result<bool> {
    let mut wanted = vec![];
    if src.is_dir() {
        for e in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "yaml") && p.is_file() {
                wanted.push(p);
            }
        }
    }
    let mut changed = false;
    let mut names = vec![];
    for p in &wanted {
        let name = p.file_name().expect("has a name").to_owned();
        let Some(n) = name.to_str() else {
            tracing::warn!(
                child = "synapse",
                "skipping {}: its name is not UTF-8",
                p.display()
            );
            continue;
        };
        let mut f = fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let mut body = vec![];
        f.read_to_end(&mut body)
            .with_context(|| format!("reading {}", p.display()))?;
        changed |= dst.write_if_changed(n, &body, owner, 0o640)?;
        names.push(name);
    }
    changed |= dst.remove_all_but(|n| names.iter().any(|k| k == n))?;
    Ok(changed)
}

/// How the supervisor runs Synapse's main process.
pub fn child_spec(cfg: &Config, run_as: RunAs) -> ChildSpec {
    let l = Layout::new(&cfg.state_dir());
    let command = python(cfg, &l, run_as, "synapse.app.homeserver", None);
    process_spec(cfg, "synapse".into(), command, cfg.synapse.port)
}

/// How the supervisor runs each worker process: the shared files, then the worker's own
/// (docs/workers.md "Worker configuration"). Started once the main process is ready, which
/// has brought the schema up to date (a worker refuses an outdated one).
pub fn worker_specs(cfg: &Config, run_as: &RunAs) -> Vec<(workers::Worker, ChildSpec)> {
    let l = Layout::new(&cfg.state_dir());
    worker_plan(cfg)
        .into_iter()
        .map(|w| {
            let yaml = l.worker_yaml(&w.name);
            let app = "synapse.app.generic_worker";
            let command = python(cfg, &l, run_as.clone(), app, Some(&yaml));
            let spec = process_spec(cfg, w.child_name(), command, w.port);
            (w, spec)
        })
        .collect()
}

/// What every Synapse process shares: ready when `/health` on its HTTP listener answers.
fn process_spec(cfg: &Config, name: String, command: Command, port: u16) -> ChildSpec {
    ChildSpec {
        name,
        command,
        readiness: Readiness::HttpGet {
            port,
            path: "/health".into(),
        },
        // A first start creates the schema (a few seconds here; minutes on an SD card).
        ready_timeout: Duration::from_secs(300),
        stop_signal: Signal::SIGTERM,
        grace: cfg.grace_period(),
        backoff: BackoffPolicy::default(),
        up: None,
    }
}

/// `python -m <app> -c homeserver.yaml -c conf.d [-c worker.yaml]`, as Synapse's user.
fn python(cfg: &Config, l: &Layout, run_as: RunAs, app: &str, worker: Option<&Path>) -> Command {
    let mut command = Command::new(&cfg.synapse.python)
        .arg("-m")
        .arg(app)
        .arg("-c")
        .arg(l.homeserver_yaml())
        .arg("-c")
        .arg(l.conf_d());
    if let Some(w) = worker {
        command = command.arg("-c").arg(w);
    }
    let mut command = command
        // Synapse's own directory: whatever it or a module writes at run time lands there.
        .env("HOME", &l.data)
        .env("USER", &run_as.user)
        .env("LOGNAME", &run_as.user)
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1");
    for (k, v) in s3::env(cfg, &l.secrets()) {
        command = command.env(k, v);
    }
    command.cwd = l.data.clone();
    command.run_as = Some(run_as);
    command
}

/// One field of a libpq passfile line: `:` and `\` escaped with `\` (libpq docs, 34.16), so
/// a password the operator chose may hold them.
fn passfile_field(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passfile_fields_escape_colons_and_backslashes() {
        assert_eq!(passfile_field("a:b\\c"), "a\\:b\\\\c");
        assert_eq!(passfile_field("0123abcdef"), "0123abcdef");
    }

    #[test]
    fn matrixrtc_only_when_a_livekit_server_is_configured() {
        let l = Layout::new(Path::new("/var/lib/homelab-matrix"));
        let off = homeserver_config(
            &Config::from_toml("server_name = \"example.com\"\n").unwrap(),
            &l,
        );
        for k in [
            "experimental_features",
            "matrix_rtc",
            "max_event_delay_duration",
        ] {
            assert!(off.get(k).is_none(), "{k} without [matrixrtc]");
        }
        let cfg = Config::from_toml(
            "server_name = \"example.com\"\n[matrixrtc]\nlivekit_url = \"wss://lk.example.com\"\napi_key_file = \"/k\"\napi_secret_file = \"/s\"\n",
        )
        .unwrap();
        let on = homeserver_config(&cfg, &l);
        assert_eq!(on["experimental_features"]["msc4143_enabled"], true);
        assert_eq!(
            on["matrix_rtc"]["transports"],
            json!([{"type": "livekit", "livekit_service_url": "https://matrix.example.com/livekit/jwt"}])
        );
    }

    #[test]
    fn config_has_what_synapse_needs() {
        let cfg = Config::from_toml("server_name = \"example.com\"\n[synapse]\npresence = false\n")
            .unwrap();
        let l = Layout::new(Path::new("/var/lib/homelab-matrix"));
        let v = homeserver_config(&cfg, &l);
        assert_eq!(v["public_baseurl"], "https://matrix.example.com/");
        assert_eq!(v["listeners"][0]["bind_addresses"][0], "127.0.0.1");
        assert_eq!(v["listeners"][0]["x_forwarded"], true);
        assert_eq!(v["database"]["args"]["cp_min"], 5);
        assert_eq!(v["database"]["args"]["host"], "127.0.0.1");
        assert!(v["database"]["args"].get("password").is_none());
        assert_eq!(v["registration_requires_token"], true);
        // What Synapse writes is in its own directory; what it reads is root's.
        for k in ["signing_key_path", "media_store_path", "pid_file"] {
            assert!(
                v[k].as_str()
                    .unwrap()
                    .starts_with("/var/lib/homelab-matrix/synapse-data/"),
                "{k}: {}",
                v[k]
            );
        }
        assert_eq!(
            v["database"]["args"]["passfile"],
            "/var/lib/homelab-matrix/synapse/secrets/pgpass"
        );
        assert_eq!(v["presence"]["enabled"], false);
        assert_eq!(v["max_upload_size"], "50M");
        let y = yaml::to_yaml(&v);
        assert!(!y.contains("secret\":"), "no inline secrets:\n{y}");
    }
}
