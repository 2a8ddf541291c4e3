//! The one config file (DESIGN.md §4): TOML, every key optional but `server_name`, unknown keys
//! refused. Loading reports *every* problem it can find at once, each with the key and the fix,
//! so an operator edits the file once, not once per error.
//!
//! - `schema`: the tables and keys, with their defaults;
//! - `validate`: each value checked, unknown keys, TOML errors, the host's part;
//! - `names`: the grammars values are checked against;
//! - here: loading, and the values derived from the config (paths, ports, durations).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod setting;
pub use setting::{Network, Parse, Setting, Size, TimeOfDay, TlsMode};

pub const DEFAULT_PATH: &str = "/etc/homelab-matrix/homelab-matrix.toml";
/// Redis's directory under the state dir: Redis's own (it makes its socket there), entered by
/// Synapse's group.
pub const REDIS_DIR: &str = "redis";
pub const EXAMPLE_PATH: &str = "/usr/share/doc/homelab-matrix/homelab-matrix.toml.example";

mod names;
mod schema;
mod validate;
pub use names::*;
pub use schema::*;
pub use validate::environment_problems;
use validate::{toml_problem, unknown_keys};

/// One thing wrong with the config: where, what, and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub key: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}\n    fix: {}", self.key, self.message, self.fix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read {path}: {source}\n    fix: create it (an example is at {EXAMPLE_PATH}) or name another file with --config"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "{}: {} problem{}:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str(&format!("\n  {p}"));
    }
    out
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parses and validates; the returned config has every derived value filled in.
    pub fn from_toml(text: &str) -> Result<Config, Vec<Problem>> {
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => return Err(vec![toml_problem(text, &e)]),
        };
        let mut problems = vec![];
        let schema = toml::Table::try_from(Config::default()).expect("defaults serialize");
        unknown_keys(&table, &schema, "", &mut problems);
        // Unknown keys are reported above, so serde ignores them here and still finds type errors.
        let mut cfg: Config = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                problems.push(toml_problem(text, &e));
                return Err(problems);
            }
        };
        cfg.derive();
        cfg.validate(&mut problems);
        cfg.matrixrtc.validate(&mut problems);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    fn derive(&mut self) {
        self.server_name = self.server_name.trim().to_ascii_lowercase();
        let sn = self.server_name.clone();
        for (host, prefix) in [
            (&mut self.hosts.matrix, "matrix"),
            (&mut self.hosts.element, "element"),
            (&mut self.hosts.turn, "turn"),
        ] {
            if host.is_empty() && !sn.is_empty() {
                *host = format!("{prefix}.{sn}");
            }
            *host = host.to_ascii_lowercase();
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(&self.state.dir)
    }

    pub fn control_socket(&self) -> PathBuf {
        Path::new(&self.state.run_dir).join("control.sock")
    }

    /// Every name the front door serves, each with its own certificate: server_name, then
    /// the matrix, element and turn hosts, without repeats.
    pub fn served_names(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![];
        for n in [
            &self.server_name,
            &self.hosts.matrix,
            &self.hosts.element,
            &self.hosts.turn,
        ] {
            if !v.contains(n) {
                v.push(n.clone());
            }
        }
        v
    }

    pub fn max_upload_bytes(&self) -> u64 {
        self.synapse.max_upload_size.v().0
    }

    pub fn acme_timeout(&self) -> Duration {
        self.tls.acme_timeout.v()
    }

    pub fn acme_check_interval(&self) -> Duration {
        self.tls.acme_check_interval.v()
    }

    pub fn grace_period(&self) -> Duration {
        self.supervisor.grace_period.v()
    }

    /// The socket Synapse's processes reach Redis on (no TCP listener), in Redis's own
    /// directory [`REDIS_DIR`].
    pub fn redis_socket(&self) -> PathBuf {
        self.state_dir().join(REDIS_DIR).join("redis.sock")
    }

    /// How many Synapse worker processes run beside the main one on this box.
    pub fn synapse_workers(&self) -> u32 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.synapse.workers.resolve(cores)
    }

    /// `http://127.0.0.1:<port>`: Synapse's plain listener, reachable only from this host.
    pub fn synapse_local_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.synapse.port)
    }

    /// The port of `listen.https`: what links to this server use.
    pub fn public_https_port(&self) -> u16 {
        self.listen.https.v().port()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn matrixrtc_needs_all_three_keys_and_a_websocket_url() {
        let keys = |p: Vec<Problem>| p.into_iter().map(|p| p.key).collect::<Vec<_>>();
        let base = "server_name = \"example.com\"\n[matrixrtc]\n";
        let p = Config::from_toml(&format!("{base}livekit_url = \"https://lk.example.com\"\n"))
            .unwrap_err();
        assert_eq!(
            keys(p),
            [
                "matrixrtc.api_key_file",
                "matrixrtc.api_secret_file",
                "matrixrtc.livekit_url"
            ]
        );
        let p = Config::from_toml(&format!(
            "{base}livekit_url = \"wss://lk.example.com\"\napi_key_file = \"key\"\napi_secret_file = \"/s\"\n"
        ))
        .unwrap_err();
        assert_eq!(keys(p), ["matrixrtc.api_key_file"]);
        let c = Config::from_toml("server_name = \"example.com\"\n").unwrap();
        assert!(!c.matrixrtc.enabled() && c.matrixrtc.focus("https://m").is_none());
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::from_toml("server_name = \"Example.com\"\n").unwrap();
        assert_eq!(c.server_name, "example.com");
        assert_eq!(c.hosts.matrix, "matrix.example.com");
        assert_eq!(c.hosts.turn, "turn.example.com");
        assert_eq!(c.synapse.port, 8008);
        assert_eq!(c.postgres.database, "synapse");
        assert_eq!(c.max_upload_bytes(), 50 << 20);
        assert_eq!(c.grace_period(), Duration::from_secs(30));
    }

    #[test]
    fn every_problem_is_reported_with_key_and_fix() {
        let text = r#"
server_name = "example.com"
[synapse]
prot = 8008
max_upload_size = "lots"
[postgres]
database = "Syn-apse"
[tls]
mode = "letsencrypt"
[bogus]
x = 1
"#;
        let p = Config::from_toml(text).unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"synapse.prot"), "{keys:?}");
        assert!(keys.contains(&"bogus"), "{keys:?}");
        assert!(keys.contains(&"synapse.max_upload_size"), "{keys:?}");
        assert!(keys.contains(&"postgres.database"), "{keys:?}");
        assert!(keys.contains(&"tls.mode"), "{keys:?}");
        let typo = p.iter().find(|p| p.key == "synapse.prot").unwrap();
        assert!(typo.fix.contains("`port`"), "{}", typo.fix);
    }

    #[test]
    fn type_errors_name_the_key_and_line() {
        let p = Config::from_toml("server_name = \"a.b\"\n[postgres]\nport = \"x\"\n").unwrap_err();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "postgres.port (line 3)");
    }

    /// The shipped example must stay valid and say nothing the defaults do not.
    #[test]
    fn example_config_is_valid_and_matches_the_defaults() {
        let text = include_str!("../packaging/homelab-matrix.toml.example");
        let c = Config::from_toml(text).unwrap_or_else(|p| panic!("{p:#?}"));
        let d = Config::from_toml("server_name = \"example.com\"\n").unwrap();
        assert_eq!(c, d);
    }

    #[test]
    fn bot_keys_are_checked() {
        let text = "server_name = \"a.b\"\n[bot]\nprefix = \"! x\"\nlocalpart = \"homelab-matrix\"\nadmins = [\"alice\"]\n";
        let p = Config::from_toml(text).unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        // bot.localpart = the service account's is synapse::admin's to refuse.
        assert_eq!(keys, ["bot.prefix", "bot.admins[0]"], "{p:#?}");
        let c = Config::from_toml("server_name = \"a.b\"\n[bot]\nprefix = \"!\"\n").unwrap();
        assert_eq!(c.bot.prefix, "!");
    }

    #[test]
    fn http_limit_keys_are_checked() {
        let c = Config::from_toml("server_name = \"a.b\"\n").unwrap();
        assert_eq!(c.http.idle_timeout(), Duration::from_secs(180));
        assert_eq!(c.http.header_timeout(), Duration::from_secs(30));
        assert_eq!(c.http.upstream_timeout(), Duration::from_secs(180));
        assert_eq!(c.http.upstream_max_connections, 512);
        let text = "server_name = \"a.b\"\n[http]\nidle_timeout = \"0s\"\nheader_timeout = \"soon\"\nupstream_max_connections = 0\n";
        let p = Config::from_toml(text).unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "http.idle_timeout",
                "http.header_timeout",
                "http.upstream_max_connections"
            ],
            "{p:#?}"
        );
        let c =
            Config::from_toml("server_name = \"a.b\"\n[http]\nidle_timeout = \"5m\"\n").unwrap();
        assert_eq!(c.http.idle_timeout(), Duration::from_secs(300));
    }

    #[test]
    fn an_external_postgres_is_verified_and_needs_its_password() {
        let parse =
            |pg: &str| Config::from_toml(&format!("server_name = \"a.b\"\n[postgres]\n{pg}"));
        let keys = |pg: &str| -> Vec<String> {
            match parse(pg) {
                Ok(_) => vec![],
                Err(p) => p.into_iter().map(|p| p.key).collect(),
            }
        };
        // This host's server: no TLS, as before; any other name: verified against the roots.
        let local = parse("").unwrap();
        assert!(!local.postgres.tls_verify() && local.postgres.on_this_host());
        let far = parse("host = \"db.lan\"\n").unwrap();
        assert!(far.postgres.tls_verify());
        assert_eq!(far.postgres.ca_path(), SYSTEM_ROOTS);
        assert!(
            !parse("host = \"db.lan\"\ntls = \"off\"\n")
                .unwrap()
                .postgres
                .tls_verify()
        );
        assert!(
            parse("host = \"::1\"\ntls = \"verify\"\n")
                .unwrap()
                .postgres
                .tls_verify()
        );
        assert_eq!(keys("tls = \"prefer\"\n"), ["postgres.tls (line 3)"]);
        // A role made elsewhere (or by `provision-db --superuser-dsn` once): nothing provisioned.
        assert!(
            !parse("provision = false\n")
                .unwrap()
                .postgres
                .on_this_host()
        );
        let ext = parse("provision = false\npassword_file = \"/etc/pw\"\n").unwrap();
        assert!(!ext.postgres.on_this_host());
        assert_eq!(
            keys(
                "provision = false\npassword_file = \"/etc/pw\"\nsuperuser_dsn = \"host=x user=postgres\"\n"
            ),
            ["postgres.provision"]
        );
        assert_eq!(keys("password_file = \"pw\"\n"), ["postgres.password_file"]);
        assert_eq!(keys("ca_file = \"ca.pem\"\n"), ["postgres.ca_file"]);
        assert_eq!(keys("host = \"/var/run/postgresql\"\n"), ["postgres.host"]);
    }

    #[test]
    fn element_release_urls_are_https_unless_testing_on_loopback() {
        let keys = |el: &str| -> Vec<String> {
            match Config::from_toml(&format!("server_name = \"a.b\"\n[element]\n{el}")) {
                Ok(_) => vec![],
                Err(p) => p.into_iter().map(|p| p.key).collect(),
            }
        };
        let local = "release_url = \"http://127.0.0.1:8/releases/latest\"\n";
        assert_eq!(keys(local), ["element.release_url"]);
        assert!(keys(&format!("{local}test_mode = true\n")).is_empty());
        assert!(keys("release_url = \"http://[::1]:8/x\"\ntest_mode = true\n").is_empty());
        assert_eq!(
            keys("release_url = \"http://example.com/x\"\ntest_mode = true\n"),
            ["element.release_url"]
        );
        assert_eq!(
            keys("release_url = \"http://127.0.0.1@evil.example/x\"\ntest_mode = true\n"),
            ["element.release_url"]
        );
        assert_eq!(
            keys("release_key_url = \"http://example.com/k.asc\"\n"),
            ["element.release_key_url"]
        );
        assert_eq!(
            keys("test_release_key = \"/k.asc\"\n"),
            ["element.test_release_key"]
        );
        assert!(keys("test_release_key = \"/k.asc\"\ntest_mode = true\n").is_empty());
    }

    #[test]
    fn workers_are_a_number_or_auto_and_auto_follows_the_cores() {
        let c = |w: &str| {
            Config::from_toml(&format!(
                "server_name = \"x.org\"\n[synapse]\nworkers = {w}\n"
            ))
        };
        assert_eq!(c("3").unwrap().synapse.workers.resolve(2), 3);
        assert_eq!(c("\"3\"").unwrap().synapse.workers.resolve(2), 3);
        let auto = c("\"auto\"").unwrap().synapse.workers;
        assert_eq!(
            [2, 3, 4, 8, 16, 64].map(|n| auto.resolve(n)),
            [0, 0, 2, 6, 8, 8]
        );
        assert_eq!(Config::default().synapse.workers.resolve(16), 0);
        for bad in ["-1", "17", "\"many\""] {
            let e = c(bad).unwrap_err();
            assert!(e.iter().any(|p| p.key == "synapse.workers"), "{bad}: {e:?}");
        }
        let e = Config::from_toml("server_name = \"x.org\"\n[synapse]\nworkers = 4\nport = 8102\nworker_base_port = 8101\n")
            .unwrap_err();
        assert!(
            e.iter().any(|p| p.key == "synapse.worker_base_port"),
            "{e:?}"
        );
    }

    #[test]
    fn missing_server_name() {
        let p = Config::from_toml("").unwrap_err();
        assert_eq!(p[0].key, "server_name");
    }

    /// Typed values (`Setting`) are parsed once, at load, and every bad one is reported with
    /// the rest, not only serde's first.
    #[test]
    fn every_bad_typed_value_is_reported_at_once_and_good_ones_come_typed() {
        let text = r#"
server_name = "example.com"
[listen]
https = "443"
[http]
idle_timeout = "3 minutes"
admin_allow = ["192.168.1.0/24", "10.0.0.0/33"]
[backup]
time = "3:30"
[supervisor]
grace_period = "30"
"#;
        let p = Config::from_toml(text).unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "listen.https",
                "http.admin_allow[1]",
                "http.idle_timeout",
                "supervisor.grace_period",
                "backup.time"
            ]
        );
        let c = Config::from_toml(
            "server_name = \"example.com\"\n[listen]\nhttps = \"127.0.0.1:8443\"\n[http]\nidle_timeout = \"3m\"\nadmin_allow = [\"fd00::/8\"]\n[tls]\nmode = \"files\"\n",
        )
        .unwrap();
        assert_eq!(c.public_https_port(), 8443);
        assert_eq!(c.http.idle_timeout(), Duration::from_secs(180));
        assert_eq!(
            c.http.admin_networks(),
            ["fd00::".parse::<IpAddr>().map(|a| (a, 8)).unwrap()]
        );
        assert_eq!(c.tls.mode(), TlsMode::Files);
        assert_eq!(c.backup.minute_of_day(), 210);
    }
}
