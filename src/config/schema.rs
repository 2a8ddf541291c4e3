//! The config's schema: every table and key, with its default (DESIGN.md §4).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;
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
