//! `homelab-matrix doctor` (DESIGN.md §5): checks the appliance from the outside in, the way
//! clients and other servers reach it, and says for each check what it saw and how to fix a
//! failure. One file per family of checks; this one holds the check model, the order they run
//! in and the report (text table and `--json`).

use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;

mod delegation;
mod dns;
mod federation;
mod matrixrtc;
mod net;
mod ports;
mod services;
mod tls;
mod turn;
mod workers;

pub use net::Net;

/// The remote server the outbound federation check asks Synapse about by default.
pub const DEFAULT_REMOTE: &str = "matrix.org";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Could not be verified, or works but deserves attention: does not fail the run.
    Warn,
    Fail,
}

impl Status {
    fn mark(self) -> &'static str {
        match self {
            Status::Pass => "✅",
            Status::Warn => "⚠️",
            Status::Fail => "❌",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// `family` or `family:subject` (e.g. `tls:matrix.example.org`); `--only` takes either.
    pub name: String,
    pub status: Status,
    /// What was seen.
    pub seen: String,
    /// What to do, when the check did not pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: impl Into<String>, seen: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Pass,
            seen: seen.into(),
            fix: None,
        }
    }
    pub fn warn(name: impl Into<String>, seen: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Warn,
            seen: seen.into(),
            fix: Some(fix.into()).filter(|f: &String| !f.is_empty()),
        }
    }
    pub fn fail(name: impl Into<String>, seen: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Fail,
            seen: seen.into(),
            fix: Some(fix.into()),
        }
    }
    fn family(&self) -> &str {
        self.name.split(':').next().unwrap_or(&self.name)
    }
}

/// The families, in the order they run and print.
pub const FAMILIES: &[&str] = &[
    "dns",
    "ports",
    "tls",
    "turn-tls",
    "turn",
    "turn-relay",
    "delegation-server",
    "delegation-client",
    "federation-in",
    "federation-out",
    "synapse",
    "redis",
    "workers",
    "postgres",
    "media",
    "disk",
    "clock",
    "element",
    "matrixrtc",
];

#[derive(Debug, Clone)]
pub struct Options {
    /// A family or one check's full name.
    pub only: Option<String>,
    /// Names resolved to these addresses instead of DNS (a test lab, or checking the
    /// appliance as it is reached on the LAN).
    pub resolve: Vec<(String, IpAddr)>,
    /// The remote server for the outbound federation check and the clock estimate.
    pub remote: String,
    /// The nameserver for server discovery's SRV lookups; None: /etc/resolv.conf's.
    pub nameserver: Option<std::net::SocketAddr>,
    /// The doctor runs on another network than the appliance (with its config and state): no
    /// hairpin NAT is in between, so what does not answer at the public address fails.
    pub outside: bool,
}

impl Options {
    /// A full run with the defaults, as the daily run and the bot's `doctor` make it.
    pub fn full() -> Options {
        Options {
            only: None,
            resolve: vec![],
            remote: DEFAULT_REMOTE.into(),
            nameserver: None,
            outside: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Unix seconds.
    pub ran_at: u64,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.failing().len()
    }

    /// The names of the checks that failed, in report order.
    pub fn failing(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// 0 all passed (warnings allowed), 1 a check failed.
    pub fn exit_code(&self) -> i32 {
        if self.failed() > 0 { 1 } else { 0 }
    }

    pub fn warned(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count()
    }

    /// "12 passed, 3 warnings, 1 failed".
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} warnings, {} failed",
            self.checks.len() - self.warned() - self.failed(),
            self.warned(),
            self.failed()
        )
    }

    /// The same report for a chat message (the bot's `doctor`): one list item per check.
    pub fn markdown(&self) -> String {
        let mut md = format!("**doctor: {}**\n", self.summary());
        for c in &self.checks {
            md.push_str(&format!(
                "\n- {} `{}`: {}",
                c.status.mark(),
                c.name,
                c.seen.replace('`', "'")
            ));
            if let Some(f) = &c.fix {
                md.push_str(&format!("\n  fix: {f}"));
            }
        }
        md
    }

    /// One line per check: mark, name, what was seen; the fix on the next line.
    pub fn render(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{} {:<width$}  {}\n",
                c.status.mark(),
                c.name,
                c.seen
            ));
            if let Some(f) = &c.fix {
                out.push_str(&format!("   {:<width$}  fix: {f}\n", ""));
            }
        }
        out.push_str(&format!(
            "{} checks: {}\n",
            self.checks.len(),
            self.summary()
        ));
        out
    }
}

/// Is `only` a family or the name of a check that a run could produce? (Usage errors exit 2.)
pub fn valid_only(cfg: &Config, only: &str) -> bool {
    let per_name = |prefix: &str| {
        only.strip_prefix(prefix)
            .is_some_and(|n| cfg.served_names().iter().any(|s| s == n))
    };
    FAMILIES.contains(&only)
        || per_name("tls:")
        || per_name("dns:")
        || only == "disk:media"
        || only == "disk:database"
        || workers::names(cfg).iter().any(|n| n == only)
        || matrixrtc::NAMES.contains(&only)
}

/// What every check may use: the config, the network view and the running service's status.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub net: Net,
    pub opts: &'a Options,
    /// `status` from the control socket; None when the service is not running.
    pub status: Option<Value>,
    /// One PostgreSQL session as Synapse's role, made when a check first needs it (postgres,
    /// disk), or why it could not be.
    pg: tokio::sync::OnceCell<Result<tokio_postgres::Client, String>>,
}

impl Ctx<'_> {
    /// What the supervisor says of child `name` ("supervisor: running, 0 restarts").
    pub fn child_state(&self, name: &str) -> String {
        let Some(status) = &self.status else {
            return "homelab-matrix is not running".into();
        };
        let child = status["children"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name));
        let Some(c) = child else {
            return format!("supervisor: no child {name}");
        };
        format!(
            "supervisor: {}, {} restarts{}",
            c["state"].as_str().unwrap_or("?"),
            c["restarts"],
            c["last_exit"]
                .as_str()
                .map(|e| format!(", last exit {e}"))
                .unwrap_or_default()
        )
    }

    /// The PostgreSQL session (src/postgres.rs logs in the way Synapse does).
    pub async fn postgres(&self) -> Result<&tokio_postgres::Client, &str> {
        self.pg
            .get_or_init(|| async {
                let secrets = crate::secrets::Secrets::open(&self.cfg.state_dir());
                let password =
                    crate::postgres::password(self.cfg, &secrets).map_err(|e| format!("{e:#}"))?;
                let req = crate::postgres::Request::from_config(self.cfg, &password);
                crate::postgres::session_as_synapse(&req)
                    .await
                    .map(|(client, _)| client)
                    .map_err(|e| crate::postgres::error_message(&e))
            })
            .await
            .as_ref()
            .map_err(String::as_str)
    }
}

/// Runs the checks (all, or the `--only` ones) and returns the report.
pub async fn run(cfg: &Config, opts: &Options) -> Report {
    let status = crate::control::request(&cfg.control_socket(), "status")
        .await
        .ok()
        .filter(|v| v.get("error").is_none());
    let ctx = Ctx {
        cfg,
        net: Net::new(cfg, &opts.resolve),
        opts,
        status,
        pg: tokio::sync::OnceCell::new(),
    };
    let wanted = |family: &str| match &opts.only {
        None => true,
        Some(o) => o == family || o.split(':').next() == Some(family),
    };
    // The public address, learned once for dns and ports (a STUN round trip).
    let public = if wanted("dns") || wanted("ports") {
        dns::public_address(&ctx).await
    } else {
        Err(String::new())
    };
    // Server discovery, done once for delegation-server and federation-in (the same
    // well-known GET).
    let discovered =
        if wanted("delegation-server") || wanted("federation-in") || wanted("matrixrtc") {
            delegation::discover(&ctx).await
        } else {
            Err((String::new(), None))
        };
    let mut checks = vec![];
    for family in FAMILIES {
        // turn-relay needs turn's allocation: both come from one run of the turn family.
        let runs = wanted(family) || (*family == "turn" && wanted("turn-relay"));
        if !runs {
            continue;
        }
        let got = match *family {
            "dns" => dns::check(&ctx, &public).await,
            "ports" => vec![ports::check(&ctx, &public).await],
            "tls" => tls::check(&ctx).await,
            "turn-tls" if cfg.turn.enabled => vec![tls::turn(&ctx).await],
            "turn-tls" => vec![],
            "turn" if cfg.turn.enabled => turn::check(&ctx).await,
            "turn" | "turn-relay" => vec![],
            "delegation-server" => vec![delegation::server(&ctx, &discovered).await],
            "delegation-client" => vec![delegation::client(&ctx).await],
            "federation-in" => vec![federation::inbound(&ctx, &discovered).await],
            "federation-out" => vec![federation::outbound(&ctx).await],
            "synapse" => vec![services::synapse(&ctx).await],
            "redis" | "workers" if cfg.synapse_workers() == 0 => vec![],
            "redis" => vec![workers::redis(&ctx).await],
            "workers" => workers::check(&ctx).await,
            "postgres" => vec![
                services::postgres(&ctx).await,
                services::postgres_latency(&ctx).await,
            ],
            "media" if !cfg.media.s3.enabled() => vec![],
            "media" => vec![services::media_s3(&ctx).await],
            "disk" => services::disk(&ctx).await,
            "clock" => vec![services::clock(&ctx).await],
            "element" => vec![services::element(&ctx)],
            "matrixrtc" => {
                let first = matrixrtc::check(&ctx).await;
                let ready = first.status != Status::Fail;
                let mut v = vec![first];
                if ready {
                    v.extend(matrixrtc::calls(&ctx, &discovered).await);
                }
                v
            }
            _ => unreachable!("FAMILIES lists only these"),
        };
        checks.extend(got.into_iter().filter(|c| {
            opts.only
                .as_deref()
                .is_none_or(|o| o == c.family() || o == c.name)
        }));
    }
    Report {
        ran_at: now_secs(),
        checks,
    }
}

/// The last full run's report, kept for `status`: `<state>/doctor-last.json`.
pub const LAST_FILE: &str = "doctor-last.json";

/// Keeps a full run's report for `status` (a `--only` run is not the whole picture).
pub fn save(cfg: &Config, report: &Report) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(report)?;
    crate::fsutil::write_atomic(
        &cfg.state_dir().join(LAST_FILE),
        &json,
        crate::fsutil::Owner::root(),
        0o600,
    )
}

pub fn load_last(cfg: &Config) -> Option<Report> {
    let text = std::fs::read(cfg.state_dir().join(LAST_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Alert key prefix of a failing doctor check (src/alerts.rs).
pub const ALERT: &str = "doctor:";

/// Raises an alert for each failing check and clears it once the check passes again; the
/// registry tells the admins only when a problem is new (alerts::Alerts::raise).
pub fn raise_alerts(alerts: &crate::alerts::Alerts, report: &Report) {
    for c in &report.checks {
        let key = format!("{ALERT}{}", c.name);
        if c.status == Status::Fail {
            alerts.raise(
                &key,
                format!(
                    "The daily `homelab-matrix doctor` finds {} failing: {}. Fix: {}",
                    c.name,
                    c.seen,
                    c.fix.as_deref().unwrap_or("see `homelab-matrix doctor`")
                ),
            );
        } else {
            alerts.clear(&key);
        }
    }
}

/// The service's daily run (DESIGN.md §5): first an hour after the start, so that a fresh
/// install's ACME has had its chance, then every day; the report is kept for `status`.
pub async fn daily(
    cfg: Config,
    alerts: crate::alerts::Alerts,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    const FIRST: std::time::Duration = std::time::Duration::from_secs(3600);
    const EVERY: std::time::Duration = std::time::Duration::from_secs(86_400);
    let mut wait = FIRST;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        let report = run(&cfg, &Options::full()).await;
        tracing::info!(summary = %report.summary(), "daily doctor run");
        if let Err(e) = save(&cfg, &report) {
            tracing::warn!("keeping the doctor's report: {e:#}");
        }
        raise_alerts(&alerts, &report);
        wait = EVERY;
    }
}

pub fn now_secs() -> u64 {
    crate::units::unix(SystemTime::now())
}

/// Base64 as Matrix uses it: standard alphabet, padding optional (spec appendix "Unpadded
/// Base64"); URL-safe characters accepted too.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_unpadded_and_padded() {
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a*b").is_none());
    }

    #[test]
    fn the_report_shows_the_fix_and_fails_only_on_a_failure() {
        let mut r = Report {
            ran_at: 0,
            checks: vec![
                Check::pass("tls:a", "ok"),
                Check::warn("federation-out", "no internet", ""),
            ],
        };
        assert_eq!(r.exit_code(), 0);
        r.checks
            .push(Check::fail("synapse", "not answering", "start it"));
        assert_eq!(r.exit_code(), 1);
        let text = r.render();
        assert!(text.contains("❌ synapse"), "{text}");
        assert!(text.contains("fix: start it"), "{text}");
        assert!(text.contains("1 passed, 1 warnings, 1 failed"), "{text}");
        let md = r.markdown();
        assert!(
            md.starts_with("**doctor: 1 passed, 1 warnings, 1 failed**"),
            "{md}"
        );
        assert!(
            md.contains("\n- ❌ `synapse`: not answering\n  fix: start it"),
            "{md}"
        );
    }

    #[test]
    fn a_failing_check_raises_an_alert_until_it_passes() {
        let alerts = crate::alerts::Alerts::new();
        let mut r = Report {
            ran_at: 0,
            checks: vec![Check::fail("synapse", "not answering", "start it")],
        };
        raise_alerts(&alerts, &r);
        let open = alerts.active();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].key, "doctor:synapse");
        assert!(open[0].message.contains("Fix: start it"), "{open:?}");
        r.checks[0] = Check::pass("synapse", "answers");
        raise_alerts(&alerts, &r);
        assert!(alerts.active().is_empty());
    }
}
