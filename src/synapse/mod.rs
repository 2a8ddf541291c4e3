//! Synapse: its rendered config, its child spec, and the admin API the appliance drives.
//!
//! Layout under `state/synapse` (owned by the Synapse user, DESIGN.md §3):
//! `homeserver.yaml` (ours), `conf.d/` (copies of the operator's `synapse.d/*.yaml`, applied
//! after ours: Synapse reads `-c` files in order and a later file replaces whole top-level keys),
//! `log.yaml`, `secrets/` (the secrets Synapse needs, copied from `state/secrets`, 0600),
//! `signing.key` (made by Synapse on first start, never replaced), `media_store/`.

pub mod admin;
pub mod yaml;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::config::Config;
use crate::fsutil::{Owner, ensure_dir, write_if_changed};
use crate::secrets::{Kind, Secrets};
use crate::supervisor::{BackoffPolicy, ChildSpec, Command, Readiness, RunAs};

/// Paths of Synapse's files for a given state dir.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(state_dir: &Path) -> Layout {
        Layout {
            dir: state_dir.join("synapse"),
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
        self.dir.join("signing.key")
    }
    pub fn media_store(&self) -> PathBuf {
        self.dir.join("media_store")
    }
}

/// The secrets Synapse reads, by the file name they get in its own secrets dir.
const SYNAPSE_SECRETS: [Kind; 4] = [
    Kind::RegistrationShared,
    Kind::Macaroon,
    Kind::Form,
    Kind::TurnShared,
];

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
        "pid_file": l.dir.join("homeserver.pid").display().to_string(),
        "signing_key_path": l.signing_key().display().to_string(),
        "media_store_path": l.media_store().display().to_string(),
        "max_upload_size": cfg.synapse.max_upload_size,
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
                "passfile": l.secrets().join("pgpass").display().to_string(),
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
    let owner = synapse_user.owner();
    ensure_dir(&l.dir, owner, 0o750)?;
    ensure_dir(&l.secrets(), owner, 0o700)?;
    ensure_dir(&l.conf_d(), owner, 0o750)?;
    ensure_dir(&l.media_store(), owner, 0o750)?;

    let mut changed = false;
    for kind in SYNAPSE_SECRETS {
        let v = secrets.get(kind)?;
        changed |= write_if_changed(
            &l.secrets().join(kind.file_name()),
            v.expose().as_bytes(),
            owner,
            0o600,
        )?;
    }
    // libpq passfile format: hostname:port:database:username:password (libpq docs, 34.16).
    let pw = secrets.get(Kind::PostgresPassword)?;
    let pgpass = format!(
        "{}:{}:{}:{}:{}\n",
        cfg.postgres.host,
        cfg.postgres.port,
        cfg.postgres.database,
        cfg.postgres.user,
        pw.expose()
    );
    changed |= write_if_changed(&l.secrets().join("pgpass"), pgpass.as_bytes(), owner, 0o600)?;

    let header = "# Generated by homelab-matrix from /etc/homelab-matrix/homelab-matrix.toml.\n# Do not edit: it is rewritten at every start. Put your own settings in\n# /etc/homelab-matrix/synapse.d/*.yaml (applied after this file, whole top-level keys).\n";
    let hs = format!("{header}{}", yaml::to_yaml(&homeserver_config(cfg, &l)));
    changed |= write_if_changed(&l.homeserver_yaml(), hs.as_bytes(), owner, 0o640)?;
    let log = format!("{header}{}", yaml::to_yaml(&log_config()));
    changed |= write_if_changed(&l.log_yaml(), log.as_bytes(), owner, 0o640)?;
    changed |= sync_overrides(Path::new(&cfg.synapse.config_dir), &l.conf_d(), owner)?;
    Ok(changed)
}

/// Mirrors the operator's `*.yaml` overrides into conf.d (owned by Synapse's user, so a 0600
/// file of root's still works), removing copies whose source is gone.
fn sync_overrides(src: &Path, dst: &Path, owner: Owner) -> Result<bool> {
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
        let body = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        changed |= write_if_changed(&dst.join(&name), &body, owner, 0o600)?;
        names.push(name);
    }
    for e in fs::read_dir(dst).with_context(|| format!("reading {}", dst.display()))? {
        let e = e?;
        if !names.contains(&e.file_name()) {
            fs::remove_file(e.path())
                .with_context(|| format!("removing stale {}", e.path().display()))?;
            changed = true;
        }
    }
    Ok(changed)
}

/// How the supervisor runs Synapse.
pub fn child_spec(cfg: &Config, run_as: RunAs) -> ChildSpec {
    let l = Layout::new(&cfg.state_dir());
    let mut command = Command::new(&cfg.synapse.python)
        .arg("-m")
        .arg("synapse.app.homeserver")
        .arg("-c")
        .arg(l.homeserver_yaml())
        .arg("-c")
        .arg(l.conf_d())
        .env("HOME", &l.dir)
        .env("USER", &run_as.user)
        .env("LOGNAME", &run_as.user)
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1");
    command.cwd = l.dir.clone();
    command.run_as = Some(run_as);
    ChildSpec {
        name: "synapse".into(),
        command,
        readiness: Readiness::HttpGet {
            port: cfg.synapse.port,
            path: "/health".into(),
        },
        // A first start creates the schema (a few seconds here; minutes on an SD card).
        ready_timeout: Duration::from_secs(300),
        stop_signal: Signal::SIGTERM,
        grace: cfg.grace_period(),
        backoff: BackoffPolicy::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(v["presence"]["enabled"], false);
        assert_eq!(v["max_upload_size"], "50M");
        let y = yaml::to_yaml(&v);
        assert!(!y.contains("secret\":"), "no inline secrets:\n{y}");
    }
}
