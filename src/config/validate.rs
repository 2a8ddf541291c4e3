//! Checking a parsed config: each key's value (`validate`), the keys no table has
//! (`unknown_keys`), TOML errors named by their key (`toml_problem`), and what the host must
//! offer (`environment_problems`).

use std::net::IpAddr;
use std::path::Path;

use super::*;

impl Config {
    pub(super) fn validate(&self, p: &mut Vec<Problem>) {
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

impl MatrixRtc {
    pub(super) fn validate(&self, p: &mut Vec<Problem>) {
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

/// Checks for things outside the file that `run` would trip on (a missing Synapse), so that
/// `check-config` can tell the operator before they start the service: what the host must offer for this config (files, users); the features add their own
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

pub(super) fn unknown_keys(
    user: &toml::Table,
    schema: &toml::Table,
    prefix: &str,
    out: &mut Vec<Problem>,
) {
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
pub(super) fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
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
