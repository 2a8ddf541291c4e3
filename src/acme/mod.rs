//! ACME (RFC 8555) with instant-acme: one account, one certificate per name, renewed on its own.
//!
//! Knows nothing of HTTP or TLS: it publishes challenge answers into, and certificates to, the
//! `certs` store, which the front door reads. Each name has its own task, so a name whose DNS is
//! wrong never holds up the others.
//!
//! Nothing here can stall: every request to the CA has a deadline (`client`), the renewal
//! time is drawn once per certificate and kept on disk (`schedule`), and each name's task
//! runs inside a select on the shutdown signal, so a hanging CA never holds up a stop.

mod client;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::secrets::random_fraction;
use anyhow::{Context, Result, anyhow, bail};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use schedule::{Renewal, Schedules};
use serde::Serialize;
use tokio::sync::{OnceCell, watch};

use crate::certs::{Cert, CertStore, Source, unix};
use crate::fsutil::{Owner, ensure_dir, write_atomic};

#[derive(Debug, Clone)]
pub struct Settings {
    pub directory: String,
    pub email: String,
    /// A PEM root to trust for the directory (a test CA such as pebble's).
    pub ca_root: Option<PathBuf>,
    /// In order of preference.
    pub challenges: Vec<ChallengeType>,
    /// The deadline of one request to the CA, its answer included.
    pub timeout: Duration,
    /// How often a waiting task wakes up to look at its schedule again (and notice a
    /// suspended machine or a changed clock). Does not change the renewal time.
    pub check_interval: Duration,
}

/// Waiting for validation and for the certificate: polls the CA answers, honouring its
/// Retry-After. Generous, because a CA that answers is making progress (a stalled one is
/// caught by the per-request timeout instead); the order's own expiry ends it too.
const POLL_DEADLINE: Duration = Duration::from_secs(600);

/// What `status` shows per name.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NameStatus {
    pub last_success: Option<u64>,
    pub next_attempt: Option<u64>,
    pub last_error: Option<String>,
    /// Failed attempts since the last success.
    pub failures: u32,
}

pub struct Acme {
    settings: Settings,
    dir: PathBuf,
    store: Arc<CertStore>,
    account: OnceCell<Account>,
    status: Mutex<BTreeMap<String, NameStatus>>,
    schedules: Schedules,
    /// The schedules in use, so a failing disk does not mean a new draw on every check.
    renewals: Mutex<BTreeMap<String, Renewal>>,
}

impl Acme {
    /// `dir` is state/acme: the account lives there.
    pub fn new(settings: Settings, dir: &Path, store: Arc<CertStore>) -> Arc<Acme> {
        Arc::new(Acme {
            settings,
            dir: dir.to_owned(),
            store,
            account: OnceCell::new(),
            status: Mutex::new(BTreeMap::new()),
            schedules: Schedules::new(dir),
            renewals: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn status(&self) -> BTreeMap<String, NameStatus> {
        self.status.lock().unwrap().clone()
    }

    fn set_status(&self, name: &str, f: impl FnOnce(&mut NameStatus)) {
        f(self
            .status
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default());
    }

    /// Keeps `name`'s certificate issued and renewed until `shutdown`. Everything the task
    /// does, waits and requests to the CA alike, is cancelled by the shutdown signal.
    pub async fn maintain(self: Arc<Self>, name: String, mut shutdown: watch::Receiver<bool>) {
        tokio::select! {
            _ = self.keep(&name) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }

    async fn keep(&self, name: &str) {
        let mut failures: u32 = 0;
        let mut retry_at: Option<SystemTime> = None;
        loop {
            let current = self.store.get(name).filter(|c| c.source == Source::Acme);
            let now = SystemTime::now();
            let (due, wake) = match (retry_at, &current) {
                (Some(t), _) => (t, t),
                (None, None) => (now, now),
                (None, Some(c)) => {
                    let r = self.schedule(name, c).await;
                    let due = r.renew_at();
                    let poll = r.ari_next_poll.map(|t| UNIX_EPOCH + Duration::from_secs(t));
                    (due, poll.map_or(due, |p| p.min(due)))
                }
            };
            self.set_status(name, |s| s.next_attempt = Some(unix(due)));
            let now = SystemTime::now();
            if now < due {
                // Sleep in bounded steps: a suspended laptop or a clock change is noticed,
                // and the ARI poll runs at its time. The renewal time itself stays.
                let wake = wake.min(now + self.settings.check_interval);
                let wait = wake.duration_since(now).unwrap_or_default();
                tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
                continue;
            }
            match self
                .issue(name, current.as_deref())
                .await
                .and_then(|cert| self.store.save_and_publish(name, cert))
            {
                Ok(cert) => {
                    tracing::info!(name = %name, issuer = %cert.issuer, expires = unix(cert.not_after), "ACME certificate installed");
                    failures = 0;
                    retry_at = None;
                    self.set_status(name, |s| {
                        s.last_success = Some(unix(SystemTime::now()));
                        s.last_error = None;
                        s.failures = 0;
                    });
                }
                Err(e) => {
                    failures += 1;
                    let delay = retry_delay(current.as_deref(), failures);
                    retry_at = Some(SystemTime::now() + delay);
                    let msg = format!("{e:#}");
                    tracing::warn!(name = %name, failures, "ACME issuance failed; the current certificate keeps serving; retrying in {:.1}s: {msg}", delay.as_secs_f64());
                    self.set_status(name, |s| {
                        s.last_error = Some(msg);
                        s.failures = failures;
                    });
                }
            }
        }
    }

    /// When to renew `cert`: its stored schedule, drawn once per certificate (a third of
    /// the lifetime left, Let's Encrypt's advice and certmagic's default, minus jitter so
    /// that many servers do not renew in the same second), then moved into the CA's ARI
    /// window (RFC 9773) when it offers one, asked again after the CA's Retry-After.
    async fn schedule(&self, name: &str, cert: &Cert) -> Renewal {
        let now = SystemTime::now();
        let fp = schedule::fingerprint(cert);
        let cached = self
            .renewals
            .lock()
            .unwrap()
            .get(name)
            .filter(|r| r.cert_sha256 == fp)
            .cloned();
        let (mut r, mut changed) = match cached.or_else(|| self.schedules.load(name, cert)) {
            Some(r) => (r, false),
            None => (Renewal::draw(cert, now), true),
        };
        if r.ari_due(now) {
            changed |= self.poll_ari(name, cert, &mut r, now).await;
        }
        if changed {
            tracing::info!(name, renew_at = r.renew_at, basis = ?r.basis, "certificate renewal scheduled");
            if let Err(e) = self.schedules.save(name, &r) {
                tracing::warn!(name, "{e:#}; the renewal time is kept in memory only");
            }
        }
        self.renewals
            .lock()
            .unwrap()
            .insert(name.to_string(), r.clone());
        r
    }

    /// Fetches renewalInfo (RFC 9773 §4.1) into `r`; returns whether `r` changed.
    async fn poll_ari(&self, name: &str, cert: &Cert, r: &mut Renewal, now: SystemTime) -> bool {
        let before = r.clone();
        let Some(id) = cert
            .key
            .cert
            .first()
            .and_then(|leaf| CertificateIdentifier::try_from(leaf).ok())
        else {
            // No Authority Key Identifier: nothing to ask ARI about.
            r.ari_next_poll = None;
            return *r != before;
        };
        let account = match self.account().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(name, "ACME renewal info skipped: {e:#}");
                r.ari_failed(now);
                return *r != before;
            }
        };
        match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                let w = &info.suggested_window;
                let (start, end) = (
                    w.start.unix_timestamp().max(0) as u64,
                    w.end.unix_timestamp().max(0) as u64,
                );
                if end <= start {
                    tracing::warn!(
                        name,
                        "the CA's renewal window ends before it starts; keeping the current renewal time"
                    );
                }
                r.apply_ari(start, end, retry_after, info.explanation_url, now);
            }
            // The directory has no renewalInfo: the lifetime rule stands for this certificate.
            Err(instant_acme::Error::Unsupported(_)) => r.ari_next_poll = None,
            Err(e) => {
                tracing::warn!(
                    name,
                    "fetching ACME renewal information failed; keeping the current renewal time: {e}"
                );
                r.ari_failed(now);
            }
        }
        *r != before
    }

    async fn account(&self) -> Result<&Account> {
        self.account
            .get_or_try_init(|| async {
                ensure_dir(&self.dir, Owner::root(), 0o700)?;
                let path = self.dir.join("account.json");
                let builder = || -> Result<_> {
                    let http = client::TimeoutClient::new(
                        self.settings.ca_root.as_deref(),
                        self.settings.timeout,
                    )
                    .context("setting up the ACME client")?;
                    Ok(Account::builder_with_http(Box::new(http)))
                };
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let saved: SavedAccount = serde_json::from_str(&text)
                        .with_context(|| format!("reading {}", path.display()))?;
                    if saved.directory == self.settings.directory {
                        let account = builder()?
                            .from_credentials(saved.credentials)
                            .await
                            .context("restoring the ACME account")?;
                        tracing::info!(id = account.id(), "using the saved ACME account");
                        return Ok(account);
                    }
                    tracing::info!("tls.acme_directory changed: registering a new ACME account");
                }
                let contact = format!("mailto:{}", self.settings.email);
                let contacts: Vec<&str> = if self.settings.email.is_empty() {
                    vec![]
                } else {
                    vec![contact.as_str()]
                };
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.settings.directory.clone(),
                        None,
                    )
                    .await
                    .with_context(|| {
                        format!("registering an ACME account at {}", self.settings.directory)
                    })?;
                let saved = SavedAccount {
                    directory: self.settings.directory.clone(),
                    credentials,
                };
                write_atomic(
                    &path,
                    serde_json::to_string(&saved)?.as_bytes(),
                    Owner::root(),
                    0o600,
                )?;
                tracing::info!(id = account.id(), "registered an ACME account");
                Ok(account)
            })
            .await
    }

    /// A new order for `name`; a renewal names the certificate it replaces (RFC 9773 §5), so
    /// the CA can link them (and may exempt it from rate limits).
    async fn new_order(&self, name: &str, replacing: Option<&Cert>) -> Result<Order> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(name.to_string())];
        let replaces = replacing
            .and_then(|c| c.key.cert.first())
            .and_then(|leaf| CertificateIdentifier::try_from(leaf).ok());
        if let Some(id) = replaces {
            let shown = id.to_string();
            match account.new_order(&NewOrder::new(&ids).replaces(id)).await {
                Ok(order) => {
                    tracing::info!(name, replaces = %shown, "renewal order placed");
                    return Ok(order);
                }
                // The CA offers no ARI: a plain order.
                Err(instant_acme::Error::Unsupported(_)) => {}
                // e.g. alreadyReplaced (RFC 9773 §5): the certificate must still be renewed.
                Err(e @ instant_acme::Error::Api(_)) => tracing::warn!(
                    name,
                    "the CA refused an order replacing {shown} ({e}); ordering without `replaces`"
                ),
                Err(e) => return Err(e).context("creating the order"),
            }
        }
        account
            .new_order(&NewOrder::new(&ids))
            .await
            .context("creating the order")
    }

    /// One order for one name, through to the certificate.
    async fn issue(&self, name: &str, replacing: Option<&Cert>) -> Result<Cert> {
        let mut order = self.new_order(name, replacing).await?;
        let mut published = Published {
            store: &self.store,
            http01: vec![],
            alpn01: vec![],
        };
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut authz = a.context("reading the authorization")?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let offered: Vec<ChallengeType> =
                authz.challenges.iter().map(|c| c.r#type.clone()).collect();
            let Some(kind) = self
                .settings
                .challenges
                .iter()
                .find(|k| offered.contains(k))
                .cloned()
            else {
                bail!("the CA offers none of the challenges in tls.challenges ({offered:?})");
            };
            let mut ch = authz.challenge(kind.clone()).expect("offered");
            let ka = ch.key_authorization();
            match kind {
                ChallengeType::Http01 => {
                    self.store.put_http01(&ch.token, ka.as_str());
                    published.http01.push(ch.token.clone());
                }
                ChallengeType::TlsAlpn01 => {
                    self.store
                        .put_alpn01(name, alpn_challenge_cert(name, ka.digest().as_ref())?);
                    published.alpn01.push(name.to_string());
                }
                other => bail!("unsupported challenge {other:?}"),
            }
            ch.set_ready()
                .await
                .context("telling the CA the challenge is ready")?;
        }
        let polls = RetryPolicy::new()
            .initial_delay(Duration::from_millis(500))
            .backoff(1.5)
            .timeout(POLL_DEADLINE);
        let status = order
            .poll_ready(&polls)
            .await
            .context("waiting for validation")?;
        if status != OrderStatus::Ready {
            let detail = order_problem(&mut order).await;
            bail!(
                "the CA could not validate {name} ({status:?}){detail}; check that {name} resolves to this host and that ports 80 and 443 reach it from the internet"
            );
        }
        let key_pem = order.finalize().await.context("finalizing the order")?;
        let chain = order
            .poll_certificate(&polls)
            .await
            .context("downloading the certificate")?;
        drop(published);
        Cert::parse(&chain, &key_pem, Source::Acme)
    }
}

#[derive(serde::Deserialize, Serialize)]
struct SavedAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Removes published challenge answers when the order is done, failed or cancelled.
struct Published<'a> {
    store: &'a CertStore,
    http01: Vec<String>,
    alpn01: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for t in &self.http01 {
            self.store.remove_http01(t);
        }
        for n in &self.alpn01 {
            self.store.remove_alpn01(n);
        }
    }
}

async fn order_problem(order: &mut instant_acme::Order) -> String {
    let mut out = String::new();
    let mut authzs = order.authorizations();
    while let Some(Ok(a)) = authzs.next().await {
        for c in &a.challenges {
            if let Some(e) = &c.error {
                out.push_str(&format!(": {e}"));
            }
        }
    }
    out
}

/// RFC 8737 §3: a self-signed certificate for `name` carrying the critical acmeIdentifier
/// extension with the SHA-256 of the key authorization. Built by hand, because rustls'
/// `CertifiedKey::from_der` rejects the unknown critical extension (LAB.md gotcha 14).
fn alpn_challenge_cert(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .map_err(|e| anyhow!("loading the challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(cert.der().to_vec())],
        signing,
    )))
}

/// After a failure: exponential from a start that scales with the certificate's lifetime
/// (a minute for 90-day certificates, a second for test certificates of minutes), capped at a
/// twelfth of the lifetime and at 6 hours, so a renewal always has many tries before expiry.
fn retry_delay(current: Option<&Cert>, failures: u32) -> Duration {
    let lifetime = current.map_or(Duration::from_secs(90 * 86400), Cert::lifetime);
    let initial = (lifetime / 300).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let max = (lifetime / 12).clamp(Duration::from_secs(2), Duration::from_secs(6 * 3600));
    let exp = initial.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.min(max)
        .mul_f64(0.8 + 0.4 * random_fraction())
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_within_the_certificate_lifetime() {
        let d: Vec<Duration> = (1..=12).map(|f| retry_delay(None, f)).collect();
        assert!(
            d[0] >= Duration::from_secs(48) && d[0] <= Duration::from_secs(72),
            "{d:?}"
        );
        assert!(d[3] > d[0] * 4, "{d:?}");
        assert!(
            d.iter()
                .all(|x| *x <= Duration::from_secs(6 * 3600 * 12 / 10)),
            "{d:?}"
        );
    }

    #[test]
    fn challenge_cert_carries_the_acme_identifier() {
        let ck = alpn_challenge_cert("turn.example.com", &[7u8; 32]).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&ck.cert[0]).unwrap();
        let ext = x
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert!(ext.value.ends_with(&[7u8; 32]));
    }
}
