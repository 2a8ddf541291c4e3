//! The one config file (DESIGN.md §4): TOML, every key optional but `server_name`, unknown keys
//! refused. Loading reports *every* problem it can find at once, each with the key and the fix,
//! so an operator edits the file once, not once per error.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod setting;
pub use setting::{Network, Parse, Setting, Size, TimeOfDay, TlsMode};

pub const DEFAULT_PATH: &str = "/etc/homelab-matrix/homelab-matrix.toml";
/// Redis's directory under the state dir: Redis's own (it makes its socket there), entered by
/// Synapse's group.
pub const REDIS_DIR: &str = "redis";
pub const EXAMPLE_PATH: &str = "/usr/share/doc/homelab-matrix/homelab-matrix.toml.example";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// The part after the colon in `@alice:example.com`. It can never change once users exist.
    pub server_name: String,
    pub hosts: Hosts,
    pub listen: Listen,
    pub tls: Tls,
    pub http: Http,
    pub synapse: Synapse,
    pub postgres: Postgres,
    pub turn: Turn,
    pub element: Element,
    pub bot: Bot,
    pub state: State,
    pub supervisor: Supervisor,
    pub matrixrtc: MatrixRtc,
    pub backup: Backup,
    pub upgrades: Upgrades,
    pub media: Media,
}

/// Where Synapse keeps media besides its own disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Media {
    pub s3: S3Media,
}

/// Media on S3-compatible storage through synapse-s3-storage-provider (its README): every
/// upload is written there before it is answered; the local copy stays as a cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct S3Media {
    /// Empty: media lives on this host's disk only.
    pub bucket: String,
    /// The S3 API's URL (MinIO, Garage, Backblaze B2, ...); empty: AWS's own.
    pub endpoint: String,
    pub region: String,
    /// Put before every object's key, to share a bucket.
    pub prefix: String,
    pub storage_class: String,
    pub access_key_id: String,
    /// A root-only file holding the secret access key on one line.
    pub secret_access_key_file: String,
}

impl Default for S3Media {
    fn default() -> Self {
        S3Media {
            bucket: String::new(),
            endpoint: String::new(),
            region: String::new(),
            prefix: String::new(),
            storage_class: "STANDARD".into(),
            access_key_id: String::new(),
            secret_access_key_file: String::new(),
        }
    }
}

impl S3Media {
    pub fn enabled(&self) -> bool {
        !self.bucket.is_empty()
    }
}

impl Config {
    fn s3_problems(&self) -> Vec<(&'static str, String, &'static str)> {
        let s3 = &self.media.s3;
        let mut out = vec![];
        if !s3.enabled() {
            return out;
        }
        // S3's bucket naming rules (AWS docs, "Bucket naming rules"), which other stores share.
        let b = &s3.bucket;
        if b.len() < 3
            || b.len() > 63
            || !b
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
            || !b.as_bytes()[0].is_ascii_alphanumeric()
        {
            out.push((
                "media.s3.bucket",
                format!("{b:?} is not an S3 bucket name"),
                "3 to 63 lowercase letters, digits, '.' and '-', starting with a letter or digit",
            ));
        }
        match s3.endpoint.split_once("://") {
            _ if s3.endpoint.is_empty() => {}
            Some(("https", _)) => {}
            Some(("http", rest)) if is_loopback_authority(rest) => {}
            _ => out.push((
                "media.s3.endpoint",
                format!("{:?} is not an https:// URL", s3.endpoint),
                "write the store's S3 API URL, e.g. \"https://s3.eu-central-003.backblazeb2.com\" (plain http only on loopback), or leave it empty for AWS",
            )),
        }
        if !S3_STORAGE_CLASSES.contains(&s3.storage_class.as_str()) {
            out.push((
                "media.s3.storage_class",
                format!("{:?} is not one the provider passes on", s3.storage_class),
                "use STANDARD (the default), REDUCED_REDUNDANCY, STANDARD_IA or INTELLIGENT_TIERING",
            ));
        }
        if s3.access_key_id.is_empty() || !Path::new(&s3.secret_access_key_file).is_absolute() {
            out.push((
                "media.s3.access_key_id",
                "an S3 bucket needs access_key_id and secret_access_key_file".into(),
                "create an access key for the bucket at your store; put its id in access_key_id and its secret into a root-only file (e.g. /etc/homelab-matrix/s3-secret, mode 0600) named by secret_access_key_file",
            ));
        }
        out
    }
}

/// The storage classes the provider passes on (s3_storage_provider.py, parse_config).
pub const S3_STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "INTELLIGENT_TIERING",
];

/// Empty host names are derived from `server_name` (`matrix.<server_name>` and so on).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Hosts {
    pub matrix: String,
    pub element: String,
    pub turn: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Listen {
    pub http: Setting<SocketAddr>,
    pub https: Setting<SocketAddr>,
    pub federation: Setting<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Tls {
    pub mode: Setting<TlsMode>,
    pub acme_email: String,
    pub acme_directory: String,
    pub acme_ca_roots: Vec<String>,
    pub challenges: Vec<String>,
    /// The deadline of one request to the ACME server, its answer included.
    pub acme_timeout: Setting<Duration>,
    /// How often a waiting certificate task looks at its schedule again; the renewal time
    /// itself is drawn once per certificate and stored.
    pub acme_check_interval: Setting<Duration>,
    /// `mode = "files"`: `<files_dir>/<host>/fullchain.pem` and `privkey.pem` per host.
    pub files_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Http {
    /// Networks (CIDR) besides loopback that may reach `/_synapse/admin`.
    pub admin_allow: Vec<Setting<Network>>,
    /// A client connection with no request in flight for this long is closed.
    pub idle_timeout: Setting<Duration>,
    /// An HTTP/1.x request head, once begun, must arrive within this (slowloris guard).
    pub header_timeout: Setting<Duration>,
    /// Requests in flight to Synapse, and connections to it; past it clients get 503.
    pub upstream_max_connections: usize,
    /// How long Synapse may take to start answering (long-polls add their `timeout`).
    pub upstream_timeout: Setting<Duration>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            admin_allow: vec![],
            idle_timeout: Setting::new("180s"),
            header_timeout: Setting::new("30s"),
            upstream_max_connections: 512,
            upstream_timeout: Setting::new("180s"),
        }
    }
}

impl Http {
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.v()
    }
    pub fn header_timeout(&self) -> Duration {
        self.header_timeout.v()
    }
    pub fn upstream_timeout(&self) -> Duration {
        self.upstream_timeout.v()
    }
    /// `admin_allow` as (network, prefix length) pairs.
    pub fn admin_networks(&self) -> Vec<(IpAddr, u8)> {
        self.admin_allow
            .iter()
            .map(|n| (n.v().addr, n.v().prefix))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Synapse {
    pub python: String,
    pub user: String,
    pub port: u16,
    pub max_upload_size: Setting<Size>,
    pub presence: bool,
    /// Operator's own Synapse YAML, applied after ours (later files win, whole top-level keys).
    pub config_dir: String,
    /// Synapse worker processes beside the main one (`synapse::workers`): 0, a number, or
    /// "auto".
    pub workers: Workers,
    /// The first worker's HTTP listener (127.0.0.1); the next ones take the ports after it.
    pub worker_base_port: u16,
    /// Redis, which workers need (Synapse docs/workers.md): Debian's redis-server, run as its
    /// own user on a unix socket only.
    pub redis_server: String,
    pub redis_user: String,
}

/// `[synapse] workers`: `0`, a number, or `"auto"`, written with or without quotes.
#[derive(Debug, Clone, PartialEq)]
pub struct Workers(pub Setting<WorkerCount>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCount {
    Count(u32),
    /// `Workers::resolve`: from the cores of the box.
    Auto,
}

/// More worker processes than this buys nothing on one box: they share one PostgreSQL and one
/// Redis, and each costs a Python process's memory (~150 MB).
pub const MAX_WORKERS: u32 = 16;

impl Parse for WorkerCount {
    fn parse(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(WorkerCount::Auto);
        }
        match text.parse::<u32>() {
            Ok(n) if n <= MAX_WORKERS => Ok(WorkerCount::Count(n)),
            _ => Err(format!(
                "{text:?} is not 0, a number of workers up to {MAX_WORKERS}, or \"auto\""
            )),
        }
    }
}

impl Workers {
    /// How many worker processes to run on a box with `cores` cores. "auto" is none below 4
    /// cores: Synapse recommends the monolith for small instances (docs/workers.md), and on 2
    /// cores the front door, PostgreSQL and the main process already share them. From 4 cores
    /// on, one per core beyond two (those two for the main process, PostgreSQL and the front
    /// door), at most 8: 16 cores get 8, past which one PostgreSQL is the limit.
    pub fn resolve(&self, cores: usize) -> u32 {
        match self.0.v() {
            WorkerCount::Count(n) => n,
            WorkerCount::Auto if cores < 4 => 0,
            WorkerCount::Auto => (cores as u32 - 2).min(8),
        }
    }
}

impl Default for Workers {
    fn default() -> Self {
        Workers(Setting::new("0"))
    }
}

impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.value() {
            Some(WorkerCount::Count(n)) => s.serialize_u32(*n),
            _ => s.serialize_str(self.0.text()),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        Ok(Workers(Setting::new(&match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        })))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Postgres {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub superuser: String,
    pub socket_dir: String,
    /// When set, provisioning connects with this DSN instead of peer auth as `superuser`.
    pub superuser_dsn: String,
    /// false: the role and database exist already (an external server's administrator made
    /// them, or `provision-db --superuser-dsn` did once); nothing is created, only checked.
    pub provision: bool,
    /// The role's password, for a role made elsewhere; empty: the generated secret.
    pub password_file: String,
    /// TLS to the server: "auto" (verify unless `host` is loopback), "verify", "off".
    pub tls: PgTls,
    /// The CA that signed the server's certificate; empty: the system's roots.
    pub ca_file: String,
}

/// How Synapse and the appliance reach PostgreSQL over TCP. There is no "encrypt without
/// verifying": it protects against nobody who can intercept.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PgTls {
    #[default]
    Auto,
    Verify,
    Off,
}

impl Postgres {
    /// Whether connections to `host` are TLS, verified against `ca_path()` (libpq's
    /// sslmode=verify-full: chain and host name).
    pub fn tls_verify(&self) -> bool {
        match self.tls {
            PgTls::Verify => true,
            PgTls::Off => false,
            PgTls::Auto => !is_loopback_host(&self.host),
        }
    }

    /// The roots a server certificate is checked against.
    pub fn ca_path(&self) -> &str {
        if self.ca_file.is_empty() {
            SYSTEM_ROOTS
        } else {
            &self.ca_file
        }
    }

    /// Whether the database lives in one of this host's own Debian clusters, reached as the
    /// `superuser` OS user (so `pg_lsclusters` and `postgres upgrade` are about it).
    pub fn on_this_host(&self) -> bool {
        self.provision && self.superuser_dsn.is_empty()
    }
}

/// Debian's bundle of the system's trusted roots (ca-certificates).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Turn {
    pub enabled: bool,
    pub user: String,
    pub port: u16,
    pub tls_port: u16,
    pub min_port: u16,
    pub max_port: u16,
    pub external_ip: String,
    pub user_quota: u32,
    pub total_quota: u32,
    /// Peers relayed to despite the denied ranges (coturn allowed-peer-ip), e.g. this host's
    /// own address so that two clients relayed by this server can reach each other.
    pub allowed_peer_ips: Vec<String>,
    /// Synapse turn_allow_guests.
    pub allow_guests: bool,
    /// Asked for this host's public address when `external_ip = "auto"`.
    pub stun_server: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Element {
    pub auto_update: bool,
    pub release_url: String,
    pub check_interval: Setting<Duration>,
    /// Where the Element release key is fetched from when the build did not bundle it; its
    /// fingerprint is pinned in the binary whatever the source.
    pub release_key_url: String,
    /// Tests only: an armored public key trusted instead of Element's (logged as a warning).
    /// Refused unless `test_mode` is on.
    pub test_release_key: String,
    /// Tests only: allows an `http://` release server on loopback and `test_release_key`
    /// (logged as a warning). Off, release and key URLs must be https.
    pub test_mode: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Bot {
    pub enabled: bool,
    pub localpart: String,
    pub admins: Vec<String>,
    /// Put before every command (e.g. "!"); empty: the first word of a message is the command.
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct State {
    pub dir: String,
    /// Runtime files (the control socket). systemd's RuntimeDirectory= creates it.
    pub run_dir: String,
}

/// Where the front door serves MatrixRTC's authorization service on the matrix host.
pub const MATRIXRTC_PATH: &str = "/livekit/jwt";

/// MatrixRTC (MSC4143), what Element X and Element Call hold group calls with: a LiveKit SFU
/// the operator runs elsewhere (or a hosted one), and the authorization service the appliance
/// serves itself at `https://<matrix host>/livekit/jwt`. All empty: no focus is advertised.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MatrixRtc {
    /// The SFU's WebSocket URL clients connect to, e.g. "wss://livekit.example.com".
    pub livekit_url: String,
    /// Files holding the LiveKit API key and its secret (first line of each; root-readable).
    pub api_key_file: String,
    pub api_secret_file: String,
    /// Users of other servers in a call here get tokens to join and watch it, never to
    /// publish: Element Call asks the SFU's own service whenever it subscribes to media on
    /// an SFU it does not publish on (MSC4195; lk-jwt-service does the same). false: this
    /// server's users only.
    pub remote_users: bool,
    /// PEM CA certificates trusted for remote servers' TLS besides the system's, for a
    /// private federation whose servers have their own CA (Synapse's
    /// `federation_custom_ca_list`). Empty: the system's roots only.
    pub federation_ca_file: String,
    /// Follow a remote server's name to a private or link-local address (a LAN federation,
    /// or a test; Synapse's `ip_range_whitelist`). Never to loopback: a remote server is
    /// never this host.
    pub allow_private_servers: bool,
}

impl Default for MatrixRtc {
    fn default() -> MatrixRtc {
        MatrixRtc {
            livekit_url: String::new(),
            api_key_file: String::new(),
            api_secret_file: String::new(),
            remote_users: true,
            federation_ca_file: String::new(),
            allow_private_servers: false,
        }
    }
}

impl MatrixRtc {
    pub fn enabled(&self) -> bool {
        !self.livekit_url.is_empty()
    }

    /// The focus (MSC4143 "transport") clients are told about, in the well-known's
    /// `org.matrix.msc4143.rtc_foci` and Synapse's `matrix_rtc.transports`: LiveKit, through
    /// the authorization service under `matrix_base` (MSC4195). None when not configured:
    /// an advertised focus that is not there breaks calls in clients.
    pub fn focus(&self, matrix_base: &str) -> Option<serde_json::Value> {
        self.enabled().then(|| {
            serde_json::json!({
                "type": "livekit",
                "livekit_service_url": format!("{}{MATRIXRTC_PATH}", matrix_base.trim_end_matches('/')),
            })
        })
    }

    fn validate(&self, p: &mut Vec<Problem>) {
        let set = [
            ("matrixrtc.livekit_url", &self.livekit_url),
            ("matrixrtc.api_key_file", &self.api_key_file),
            ("matrixrtc.api_secret_file", &self.api_secret_file),
        ];
        if set.iter().all(|(_, v)| v.is_empty()) {
            return;
        }
        for (key, v) in set {
            if v.is_empty() {
                p.push(Problem {
                    key: key.into(),
                    message: "is missing: group calls need the LiveKit URL, API key file and API secret file together".into(),
                    fix: "set all three keys of [matrixrtc], or remove the table to run without group calls".into(),
                });
            }
        }
        if !self.livekit_url.is_empty()
            && !["wss://", "ws://"]
                .iter()
                .any(|s| self.livekit_url.starts_with(s))
        {
            p.push(Problem {
                key: "matrixrtc.livekit_url".into(),
                message: format!("{:?} is not a ws:// or wss:// URL", self.livekit_url),
                fix: "use the WebSocket URL clients connect to LiveKit with, e.g. \"wss://livekit.example.com\"".into(),
            });
        }
        let ca = ("matrixrtc.federation_ca_file", &self.federation_ca_file);
        for (key, v) in set[1..].iter().chain([&ca]) {
            if !v.is_empty() && !Path::new(v).is_absolute() {
                p.push(Problem {
                    key: (*key).into(),
                    message: format!("{v:?} is not an absolute path"),
                    fix: "name the file by its full path, e.g. /etc/homelab-matrix/livekit.key"
                        .into(),
                });
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Supervisor {
    /// How long a child may take to stop after its stop signal before it is killed.
    pub grace_period: Setting<Duration>,
}

/// Backups (README "Backups"): one file a day, verified, kept 7 daily and 4 weekly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Backup {
    /// The daily backup (and the snapshot before an upgrade).
    pub enabled: bool,
    /// Where backup files go (root 0700, files 0600).
    pub dir: String,
    /// Time of day (UTC, HH:MM) of the daily backup.
    pub time: Setting<TimeOfDay>,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    /// A restic repository (a path, sftp:, s3:, rest: ...) that gets a copy of each daily backup;
    /// empty: none. restic keeps its own 7 daily and 4 weekly snapshots there.
    pub repository: String,
    /// The file holding the restic repository's password (required with `repository`).
    pub password_file: String,
}

impl Default for Backup {
    fn default() -> Self {
        Backup {
            enabled: true,
            dir: "/var/backups/homelab-matrix".into(),
            time: Setting::new("03:30"),
            keep_daily: 7,
            keep_weekly: 4,
            repository: String::new(),
            password_file: String::new(),
        }
    }
}

/// Package upgrades (README "Upgrades"). Each one is undone by itself when Synapse never
/// becomes healthy on the new version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Upgrades {
    /// homelab-matrix-upgrade.timer installs new versions of the appliance's packages (and of
    /// Synapse's) once a day: Synapse's security releases reach a box nobody looks after.
    pub unattended: bool,
}

impl Default for Upgrades {
    fn default() -> Self {
        Upgrades { unattended: true }
    }
}

impl Backup {
    /// Minutes after midnight UTC of `time`.
    pub fn minute_of_day(&self) -> u32 {
        self.time.v().0
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http: Setting::new("[::]:80"),
            https: Setting::new("[::]:443"),
            federation: Setting::new("[::]:8448"),
        }
    }
}

impl Tls {
    pub fn mode(&self) -> TlsMode {
        self.mode.v()
    }
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            mode: Setting::new("acme"),
            acme_email: String::new(),
            acme_directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            acme_ca_roots: vec![],
            challenges: vec!["http-01".into(), "tls-alpn-01".into()],
            acme_timeout: Setting::new("30s"),
            acme_check_interval: Setting::new("1h"),
            files_dir: "/etc/homelab-matrix/tls".into(),
        }
    }
}

impl Default for Synapse {
    fn default() -> Self {
        Synapse {
            python: "/opt/venvs/matrix-synapse/bin/python".into(),
            user: "matrix-synapse".into(),
            port: 8008,
            max_upload_size: Setting::new("50M"),
            presence: false,
            config_dir: "/etc/homelab-matrix/synapse.d".into(),
            workers: Workers::default(),
            worker_base_port: 8101,
            redis_server: "/usr/bin/redis-server".into(),
            redis_user: "redis".into(),
        }
    }
}

impl Default for Postgres {
    fn default() -> Self {
        Postgres {
            host: "127.0.0.1".into(),
            port: 5432,
            database: "synapse".into(),
            user: "synapse".into(),
            superuser: "postgres".into(),
            socket_dir: "/var/run/postgresql".into(),
            superuser_dsn: String::new(),
            provision: true,
            password_file: String::new(),
            tls: PgTls::Auto,
            ca_file: String::new(),
        }
    }
}

impl Default for Turn {
    fn default() -> Self {
        Turn {
            enabled: true,
            user: "turnserver".into(),
            port: 3478,
            tls_port: 5349,
            min_port: 49152,
            max_port: 65535,
            external_ip: "auto".into(),
            user_quota: 12,
            total_quota: 1200,
            allowed_peer_ips: vec![],
            allow_guests: false,
            stun_server: "stun.l.google.com:19302".into(),
        }
    }
}

impl Default for Element {
    fn default() -> Self {
        Element {
            auto_update: true,
            release_url: "https://api.github.com/repos/element-hq/element-web/releases/latest"
                .into(),
            check_interval: Setting::new("6h"),
            release_key_url: "https://packages.element.io/element-release-key.asc".into(),
            test_release_key: String::new(),
            test_mode: false,
        }
    }
}

impl Default for Bot {
    fn default() -> Self {
        Bot {
            enabled: true,
            localpart: "registration-bot".into(),
            admins: vec![],
            prefix: String::new(),
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State {
            dir: "/var/lib/homelab-matrix".into(),
            run_dir: "/run/homelab-matrix".into(),
        }
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor {
            grace_period: Setting::new("30s"),
        }
    }
}

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

    fn validate(&self, p: &mut Vec<Problem>) {
        let mut bad = |key: &str, message: String, fix: &str| {
            p.push(Problem {
                key: key.into(),
                message,
                fix: fix.into(),
            })
        };
        if self.server_name.is_empty() {
            bad(
                "server_name",
                "is missing".into(),
                "set server_name = \"example.com\": the domain in your users' IDs (@you:example.com); it cannot change later",
            );
        } else if !is_dns_name(&self.server_name) {
            bad(
                "server_name",
                format!("{:?} is not a DNS name", self.server_name),
                "use a domain name such as \"example.com\" (letters, digits, hyphens and dots)",
            );
        }
        for (key, v) in [
            ("hosts.matrix", &self.hosts.matrix),
            ("hosts.element", &self.hosts.element),
            ("hosts.turn", &self.hosts.turn),
        ] {
            if !v.is_empty() && !is_dns_name(v) {
                bad(
                    key,
                    format!("{v:?} is not a DNS name"),
                    "use a host name such as \"matrix.example.com\", or remove the key to derive it from server_name",
                );
            }
        }
        for (key, v) in [
            ("listen.http", &self.listen.http),
            ("listen.https", &self.listen.https),
            ("listen.federation", &self.listen.federation),
        ] {
            if let Some(e) = v.problem() {
                bad(
                    key,
                    e.into(),
                    "write it like \"[::]:443\" (all addresses) or \"127.0.0.1:8443\"",
                );
            }
        }
        match self.tls.mode.value() {
            Some(TlsMode::Acme) => {
                if !self.tls.acme_email.is_empty() && !self.tls.acme_email.contains('@') {
                    bad(
                        "tls.acme_email",
                        format!("{:?} is not an e-mail address", self.tls.acme_email),
                        "set the address the CA may write to about expiring certificates, or leave it empty",
                    );
                }
                if !self.tls.acme_directory.starts_with("https://") {
                    bad(
                        "tls.acme_directory",
                        format!("{:?} is not an https:// URL", self.tls.acme_directory),
                        "use the CA's directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory",
                    );
                }
            }
            Some(TlsMode::Internal | TlsMode::Files) => {}
            None => bad(
                "tls.mode",
                self.tls.mode.problem().unwrap_or_default().into(),
                "use \"acme\" (public certificates), \"internal\" (a local CA, for a LAN) or \"files\" (your own certificates)",
            ),
        }
        for (i, root) in self.tls.acme_ca_roots.iter().enumerate() {
            if !Path::new(root).is_absolute() {
                bad(
                    &format!("tls.acme_ca_roots[{i}]"),
                    format!("{root:?} is not an absolute path"),
                    "name the PEM file with its full path, e.g. \"/etc/homelab-matrix/ca.pem\"",
                );
            }
        }
        if self.tls.acme_ca_roots.len() > 1 {
            bad(
                "tls.acme_ca_roots",
                format!("lists {} files", self.tls.acme_ca_roots.len()),
                "list at most one PEM root (the CA that signs the ACME directory's TLS certificate)",
            );
        }
        if self.tls.challenges.is_empty() {
            bad(
                "tls.challenges",
                "is empty".into(),
                "list at least one of \"http-01\" and \"tls-alpn-01\"",
            );
        }
        for (i, c) in self.tls.challenges.iter().enumerate() {
            if c != "http-01" && c != "tls-alpn-01" {
                bad(
                    &format!("tls.challenges[{i}]"),
                    format!("{c:?} is not a supported challenge"),
                    "use \"http-01\" and/or \"tls-alpn-01\"",
                );
            }
        }
        for (key, v, example) in [
            ("tls.acme_timeout", &self.tls.acme_timeout, "30s"),
            (
                "tls.acme_check_interval",
                &self.tls.acme_check_interval,
                "1h",
            ),
        ] {
            match (v.value(), v.problem()) {
                (Some(d), _) if d.is_zero() => {
                    bad(key, "is 0".into(), &format!("write it like \"{example}\""))
                }
                (_, Some(e)) => bad(key, e.into(), &format!("write it like \"{example}\"")),
                _ => {}
            }
        }
        for (i, net) in self.http.admin_allow.iter().enumerate() {
            if let Some(e) = net.problem() {
                bad(
                    &format!("http.admin_allow[{i}]"),
                    e.into(),
                    "write a network in CIDR form, e.g. \"192.168.1.0/24\" or \"fd00::/8\"",
                );
            }
        }
        for (key, v) in [
            ("http.idle_timeout", &self.http.idle_timeout),
            ("http.header_timeout", &self.http.header_timeout),
            ("http.upstream_timeout", &self.http.upstream_timeout),
        ] {
            match (v.value(), v.problem()) {
                (_, Some(e)) => bad(key, e.into(), "write it like \"180s\" or \"3m\""),
                (Some(d), _) if d.is_zero() => bad(
                    key,
                    "0 would close every connection".into(),
                    "give a duration of at least a second, e.g. \"30s\"",
                ),
                _ => {}
            }
        }
        if self.http.upstream_max_connections == 0 {
            bad(
                "http.upstream_max_connections",
                "0 would refuse every request to Synapse".into(),
                "leave it out (default 512) or give a positive number",
            );
        }
        if !Path::new(&self.synapse.python).is_absolute() {
            bad(
                "synapse.python",
                format!("{:?} is not an absolute path", self.synapse.python),
                "point it at the Python of Synapse's venv, e.g. \"/opt/venvs/matrix-synapse/bin/python\"",
            );
        }
        for (key, user) in [
            ("synapse.user", &self.synapse.user),
            ("synapse.redis_user", &self.synapse.redis_user),
            ("postgres.superuser", &self.postgres.superuser),
            ("turn.user", &self.turn.user),
        ] {
            if !is_unix_name(user) {
                bad(
                    key,
                    format!("{user:?} is not a user name"),
                    "name an existing system user (lowercase letters, digits, '-' and '_')",
                );
            }
        }
        for (key, port) in [
            ("synapse.port", self.synapse.port),
            ("postgres.port", self.postgres.port),
            ("turn.port", self.turn.port),
            ("turn.tls_port", self.turn.tls_port),
            ("turn.min_port", self.turn.min_port),
            ("turn.max_port", self.turn.max_port),
        ] {
            if port == 0 {
                bad(key, "is 0".into(), "use a port between 1 and 65535");
            }
        }
        if self.turn.min_port > self.turn.max_port {
            bad(
                "turn.min_port",
                format!(
                    "{} is above turn.max_port ({})",
                    self.turn.min_port, self.turn.max_port
                ),
                "make min_port..max_port a range, e.g. 49152 and 65535",
            );
        }
        if self.turn.external_ip != "auto" && self.turn.external_ip.parse::<IpAddr>().is_err() {
            bad(
                "turn.external_ip",
                format!("{:?} is not an IP address", self.turn.external_ip),
                "use \"auto\" or the public address of this host, e.g. \"203.0.113.7\"",
            );
        }
        for (i, ip) in self.turn.allowed_peer_ips.iter().enumerate() {
            if ip.parse::<IpAddr>().is_err() {
                bad(
                    &format!("turn.allowed_peer_ips[{i}]"),
                    format!("{ip:?} is not an IP address"),
                    "list single addresses, e.g. this host's public address \"203.0.113.7\"",
                );
            }
        }
        if !self
            .turn
            .stun_server
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            bad(
                "turn.stun_server",
                format!("{:?} is not host:port", self.turn.stun_server),
                "name a public STUN server, e.g. \"stun.l.google.com:19302\"",
            );
        }
        if let Some(e) = self.synapse.workers.0.problem() {
            bad(
                "synapse.workers",
                e.into(),
                "write 0 (one Synapse process), a number such as 4, or \"auto\" (by the cores of this box)",
            );
        } else {
            let n = self.synapse.workers.resolve(usize::MAX);
            let last = u32::from(self.synapse.worker_base_port) + n.max(1) - 1;
            let taken = u32::from(self.synapse.port);
            if self.synapse.worker_base_port == 0 || last > 65535 {
                bad(
                    "synapse.worker_base_port",
                    format!(
                        "{} leaves no room for the workers' ports",
                        self.synapse.worker_base_port
                    ),
                    "use a port such as 8101; the workers take it and the ones after it",
                );
            } else if (u32::from(self.synapse.worker_base_port)..=last).contains(&taken) {
                bad(
                    "synapse.worker_base_port",
                    format!(
                        "the workers' ports {}..={last} include synapse.port ({taken})",
                        self.synapse.worker_base_port
                    ),
                    "move worker_base_port past synapse.port, e.g. 8101",
                );
            }
        }
        if let Some(e) = self.synapse.max_upload_size.problem() {
            bad(
                "synapse.max_upload_size",
                e.into(),
                "write a size like \"50M\"",
            );
        }
        for (key, v) in [
            ("synapse.config_dir", &self.synapse.config_dir),
            ("synapse.redis_server", &self.synapse.redis_server),
            ("tls.files_dir", &self.tls.files_dir),
            ("postgres.socket_dir", &self.postgres.socket_dir),
            ("state.dir", &self.state.dir),
            ("state.run_dir", &self.state.run_dir),
        ] {
            if !Path::new(v).is_absolute() {
                bad(
                    key,
                    format!("{v:?} is not an absolute path"),
                    "use a full path starting with /",
                );
            }
        }
        for (key, v) in [
            ("postgres.database", &self.postgres.database),
            ("postgres.user", &self.postgres.user),
        ] {
            if !is_sql_ident(v) {
                bad(
                    key,
                    format!("{v:?} is not a plain PostgreSQL name"),
                    "use lowercase letters, digits and '_' (starting with a letter or '_'), at most 63 characters",
                );
            }
        }
        if self.postgres.host.is_empty() {
            bad(
                "postgres.host",
                "is empty".into(),
                "use \"127.0.0.1\" (Debian's PostgreSQL accepts password logins there)",
            );
        }
        if !self.postgres.superuser_dsn.is_empty()
            && self
                .postgres
                .superuser_dsn
                .parse::<tokio_postgres::Config>()
                .is_err()
        {
            bad(
                "postgres.superuser_dsn",
                "is not a PostgreSQL connection string".into(),
                "write it like \"host=/var/run/postgresql user=postgres\" or postgresql://user:pass@host/db, or remove it to use peer auth as postgres.superuser",
            );
        }
        for (key, message, fix) in self.s3_problems() {
            bad(key, message, fix);
        }
        if !self.postgres.provision && !self.postgres.superuser_dsn.is_empty() {
            bad(
                "postgres.provision",
                "is false, but postgres.superuser_dsn names a login to provision with".into(),
                "remove superuser_dsn to use a role and database made elsewhere, or set provision = true to let that login make them",
            );
        }
        for (key, v) in [
            ("postgres.password_file", &self.postgres.password_file),
            ("postgres.ca_file", &self.postgres.ca_file),
        ] {
            if !v.is_empty() && !Path::new(v).is_absolute() {
                bad(
                    key,
                    format!("{v:?} is not an absolute path"),
                    "use a full path starting with /",
                );
            }
        }
        if self.postgres.host.starts_with('/') {
            bad(
                "postgres.host",
                format!(
                    "{:?} is a socket directory; Synapse logs in over TCP with a password",
                    self.postgres.host
                ),
                "use \"127.0.0.1\" for this host's PostgreSQL (postgres.socket_dir is where provisioning finds its socket), or the external server's name",
            );
        }
        for (key, url, fix) in [
            (
                "element.release_url",
                &self.element.release_url,
                "use the default GitHub releases URL unless you mirror Element yourself",
            ),
            (
                "element.release_key_url",
                &self.element.release_key_url,
                "remove the key to use https://packages.element.io/element-release-key.asc",
            ),
        ] {
            if url.starts_with("https://") {
                continue;
            }
            match url.strip_prefix("http://") {
                // A release served in clear could be swapped for an older signed one, and
                // its size and timing are an attacker's: only a local test server may be.
                Some(rest) if self.element.test_mode && is_loopback_authority(rest) => {}
                Some(_) if self.element.test_mode => bad(
                    key,
                    format!("{url:?} is plain http and not on loopback"),
                    "use https://; element.test_mode allows http:// only for a test server on 127.0.0.1, [::1] or localhost",
                ),
                Some(_) => bad(
                    key,
                    format!("{url:?} is not https://"),
                    &format!(
                        "{fix}; it must be https:// (plain http only for a loopback test server, with element.test_mode = true)"
                    ),
                ),
                None => bad(key, format!("{url:?} is not a URL"), fix),
            }
        }
        if !self.element.test_release_key.is_empty() && !self.element.test_mode {
            bad(
                "element.test_release_key",
                "is set, but it is for tests only: Element releases are checked against Element's own key".into(),
                "remove element.test_release_key; in a test setup, also set element.test_mode = true",
            );
        }
        if let Some(e) = self.element.check_interval.problem() {
            bad("element.check_interval", e.into(), "write it like \"6h\"");
        }
        if let Some(e) = self.supervisor.grace_period.problem() {
            bad("supervisor.grace_period", e.into(), "write it like \"30s\"");
        }
        if let Some(e) = self.backup.time.problem() {
            bad(
                "backup.time",
                e.into(),
                "write it as HH:MM in UTC, e.g. \"03:30\"",
            );
        }
        if !Path::new(&self.backup.dir).is_absolute() {
            bad(
                "backup.dir",
                format!("{:?} is not an absolute path", self.backup.dir),
                "use a full path, e.g. \"/var/backups/homelab-matrix\"",
            );
        }
        if self.backup.keep_daily == 0 {
            bad(
                "backup.keep_daily",
                "is 0, which would delete each backup as soon as it is made".into(),
                "keep at least 1 (default 7); to turn backups off set backup.enabled = false",
            );
        }
        if !self.backup.repository.is_empty()
            && !Path::new(&self.backup.password_file).is_absolute()
        {
            bad(
                "backup.password_file",
                "must name the restic repository's password file when backup.repository is set"
                    .into(),
                "write the password into a root-only file (e.g. /etc/homelab-matrix/restic-password, mode 0600) and set password_file to its full path",
            );
        }
        if !is_localpart(&self.bot.localpart) {
            bad(
                "bot.localpart",
                format!("{:?} is not a Matrix user name", self.bot.localpart),
                "use lowercase letters, digits and . _ = - / (e.g. \"registration-bot\")",
            );
        }
        if self.bot.prefix.chars().any(char::is_whitespace) {
            bad(
                "bot.prefix",
                format!("{:?} contains white space", self.bot.prefix),
                "use one word such as \"!\" or \"!reg\", or \"\" for none",
            );
        }
        for (i, mxid) in self.bot.admins.iter().enumerate() {
            if !is_mxid(mxid) {
                bad(
                    &format!("bot.admins[{i}]"),
                    format!("{mxid:?} is not a Matrix user ID"),
                    "write it in full, like \"@alice:example.com\"",
                );
            }
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

/// Checks for things outside the file that `run` would trip on (a missing Synapse), so that
/// `check-config` can tell the operator before they start the service.
/// What the host must offer for this config (files, users); the features add their own
/// (`app::environment_problems`).
pub fn environment_problems(cfg: &Config) -> Vec<Problem> {
    let mut out = vec![];
    for (key, file) in [
        ("matrixrtc.api_key_file", &cfg.matrixrtc.api_key_file),
        ("matrixrtc.api_secret_file", &cfg.matrixrtc.api_secret_file),
    ] {
        if !file.is_empty() && first_line(Path::new(file)).is_none() {
            out.push(Problem {
                key: key.into(),
                message: format!("{file} cannot be read or is empty"),
                fix: "write the LiveKit API key and secret (from LiveKit's config `keys:`, or your provider) into these files, one each, readable by root".into(),
            });
        }
    }
    let ca = &cfg.matrixrtc.federation_ca_file;
    if !ca.is_empty() && crate::certs::roots_from_pem(Path::new(ca)).is_err() {
        out.push(Problem {
            key: "matrixrtc.federation_ca_file".into(),
            message: format!("{ca} cannot be read or holds no PEM certificate"),
            fix: "name a PEM file with the CA certificate(s) the other servers' certificates are signed by, or leave the key empty to trust the system's roots only".into(),
        });
    }
    let s3 = &cfg.media.s3;
    if s3.enabled() && first_line(Path::new(&s3.secret_access_key_file)).is_none() {
        out.push(Problem {
            key: "media.s3.secret_access_key_file".into(),
            message: format!("{} cannot be read or is empty", s3.secret_access_key_file),
            fix: "write the bucket's secret access key into it on one line, readable by root only (chmod 600)".into(),
        });
    }
    let pg = &cfg.postgres;
    if !pg.password_file.is_empty() && first_line(Path::new(&pg.password_file)).is_none() {
        out.push(Problem {
            key: "postgres.password_file".into(),
            message: format!("{} cannot be read or is empty", pg.password_file),
            fix: "write the role's password into it on one line, readable by root only (chmod 600)"
                .into(),
        });
    }
    if pg.tls_verify() {
        // Synapse (as its own user) and root both read it: a CA certificate is public.
        use std::os::unix::fs::PermissionsExt;
        let readable = std::fs::read_to_string(pg.ca_path())
            .ok()
            .filter(|t| t.contains("-----BEGIN CERTIFICATE-----"));
        let world =
            std::fs::metadata(pg.ca_path()).is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
        if readable.is_none() || !world {
            out.push(Problem {
                key: if pg.ca_file.is_empty() { "postgres.tls" } else { "postgres.ca_file" }.into(),
                message: format!(
                    "{} holds no readable PEM certificate for Synapse's user, so no TLS connection to {} can be verified",
                    pg.ca_path(),
                    pg.host
                ),
                fix: "set postgres.ca_file to the CA certificate that signed the server's (PEM, chmod 644), or apt install ca-certificates for a publicly trusted one; postgres.tls = \"off\" only on a network you trust".into(),
            });
        }
    }
    if !Path::new(&cfg.synapse.python).exists() {
        out.push(Problem {
            key: "synapse.python".into(),
            message: format!("{} does not exist, so Synapse cannot start", cfg.synapse.python),
            fix: "install matrix.org's matrix-synapse-py3 package, or the homelab-matrix-synapse-venv package, or a venv by hand: /usr/bin/python3 -m venv /opt/venvs/matrix-synapse && /opt/venvs/matrix-synapse/bin/pip install 'matrix-synapse[postgres]'; or point synapse.python at a Python that can import synapse".into(),
        });
    }
    if cfg.synapse_workers() > 0 {
        if !Path::new(&cfg.synapse.redis_server).exists() {
            out.push(Problem {
                key: "synapse.workers".into(),
                message: format!(
                    "workers need Redis, and {} does not exist",
                    cfg.synapse.redis_server
                ),
                fix: "apt install redis-server (its own service may be stopped: `systemctl disable --now redis-server`; homelab-matrix runs its own), or set synapse.workers = 0".into(),
            });
        }
        if nix::unistd::User::from_name(&cfg.synapse.redis_user)
            .ok()
            .flatten()
            .is_none()
        {
            out.push(Problem {
                key: "synapse.redis_user".into(),
                message: format!("system user {:?} does not exist", cfg.synapse.redis_user),
                fix: "apt install redis-server (it adds the user redis), or name another unprivileged system user".into(),
            });
        }
    }
    if cfg.turn.enabled
        && nix::unistd::User::from_name(&cfg.turn.user)
            .ok()
            .flatten()
            .is_none()
    {
        out.push(Problem {
            key: "turn.user".into(),
            message: format!("system user {:?} does not exist", cfg.turn.user),
            fix: format!(
                "create it: adduser --system --group --no-create-home {} (the coturn package does)",
                cfg.turn.user
            ),
        });
    }
    if nix::unistd::User::from_name(&cfg.synapse.user)
        .ok()
        .flatten()
        .is_none()
    {
        out.push(Problem {
            key: "synapse.user".into(),
            message: format!("system user {:?} does not exist", cfg.synapse.user),
            fix: format!(
                "create it: adduser --system --group --no-create-home {}",
                cfg.synapse.user
            ),
        });
    }
    out
}

fn unknown_keys(user: &toml::Table, schema: &toml::Table, prefix: &str, out: &mut Vec<Problem>) {
    for (k, v) in user {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match schema.get(k) {
            None => {
                let known: Vec<&str> = schema.keys().map(String::as_str).collect();
                let fix = match closest(k, &known) {
                    Some(s) => format!("did you mean `{s}`? Otherwise remove the key"),
                    None => format!("remove it; the keys allowed here are: {}", known.join(", ")),
                };
                out.push(Problem {
                    key: path,
                    message: "is not a known key".into(),
                    fix,
                });
            }
            Some(toml::Value::Table(sub)) => {
                if let toml::Value::Table(usub) = v {
                    unknown_keys(usub, sub, &path, out);
                }
            }
            Some(_) => {}
        }
    }
}

/// A key that is one or two edits away, as a spelling hint.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Turns a toml error into a problem naming the key at the error's position.
fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    let (key, line) = match e.span() {
        Some(span) => key_at(text, span.start),
        None => ("(file)".to_string(), 0),
    };
    let message = e.message().trim().to_string();
    Problem {
        key: if line > 0 {
            format!("{key} (line {line})")
        } else {
            key
        },
        message,
        fix: "correct the value's type or the TOML syntax (strings need quotes, lists need [ ])"
            .into(),
    }
}

/// The dotted key defined on the line holding `offset`, and that line's number.
fn key_at(text: &str, offset: usize) -> (String, usize) {
    let mut section = String::new();
    let mut pos = 0;
    for (i, line) in text.lines().enumerate() {
        let end = pos + line.len() + 1;
        let t = line.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            section = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
        if offset < end {
            let key = t.split('=').next().unwrap_or("").trim();
            let key = if t.contains('=') && !key.is_empty() {
                if section.is_empty() {
                    key.to_string()
                } else {
                    format!("{section}.{key}")
                }
            } else if !section.is_empty() {
                section
            } else {
                "(file)".into()
            };
            return (key, i + 1);
        }
        pos = end;
    }
    ("(file)".into(), 0)
}

/// `host[:port]/...` names 127.0.0.1 (any of 127/8), [::1] or localhost.
/// A name or address that is this host's loopback (`localhost`, 127.0.0.0/8, ::1).
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_loopback_authority(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return false;
    }
    let host = crate::uri::host_only(authority);
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The public https URL of a host; the port only when it is not 443.
pub fn https_url(host: &str, port: u16) -> String {
    if port == 443 {
        format!("https://{host}")
    } else {
        format!("https://{host}:{port}")
    }
}

pub fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.contains('.')
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        || s == "localhost"
}

fn is_unix_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn is_sql_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Matrix spec, appendix "User Identifiers": a-z 0-9 . _ = - /
pub fn is_localpart(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/".contains(c))
}

pub fn is_mxid(s: &str) -> bool {
    s.strip_prefix('@')
        .and_then(|r| r.split_once(':'))
        .is_some_and(|(local, server)| !local.is_empty() && !server.is_empty())
}

/// The first line of a key file, trimmed; None when it cannot be read or is empty.
pub fn first_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
