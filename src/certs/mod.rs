//! Certificates, as the rest of the appliance sees them (DESIGN.md §11): the store on disk,
//! the live name -> certificate map, and the pending ACME challenges.
//!
//! `acme` and the internal CA *write* here; `tls` and `http` only *read*. That split (Caddy's
//! with certmagic) keeps ACME ignorant of HTTP routing and TLS ignorant of ACME.

pub mod ca;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use crate::fsutil::{Owner, ensure_dir, write_atomic};

/// A TLS client that verifies servers against `roots` (chain and name, TLS 1.2+, ring): what
/// every outgoing verified connection of the appliance uses.
pub fn verifying_client(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The PEM certificates in `path` as trust roots (a CA bundle or one CA); an error when the
/// file cannot be read or holds none.
pub fn roots_from_pem(path: &Path) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading the CA certificates in {}", path.display()))?
    {
        let c = c.with_context(|| format!("parsing {}", path.display()))?;
        // A bundle may hold a root rustls cannot use; the rest still count.
        let _ = store.add(c);
    }
    if store.is_empty() {
        bail!("{} holds no usable CA certificate", path.display());
    }
    Ok(store)
}

/// Where a certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Acme,
    Internal,
    Files,
}

/// A certificate ready to serve, with what status and renewal need to know about it.
#[derive(Debug)]
pub struct Cert {
    pub key: Arc<CertifiedKey>,
    pub chain_pem: String,
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub issuer: String,
    pub names: Vec<String>,
    pub source: Source,
}

/// What a leaf certificate says about itself: its DNS names, issuer and validity.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// subjectAltName DNS names, lowercase.
    pub names: Vec<String>,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// The issuer's common name, or its distinguished name when it has none.
    pub issuer_name: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Leaf {
    pub fn parse(der: &[u8]) -> Result<Leaf> {
        let (_, x) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("parsing the certificate: {e}"))?;
        let to_time = |t: x509_parser::time::ASN1Time| {
            UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        let mut names = vec![];
        if let Ok(Some(san)) = x.subject_alternative_name() {
            for n in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                    names.push(d.to_ascii_lowercase());
                }
            }
        }
        let issuer = x.issuer().to_string();
        let issuer_name = x
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map_or_else(|| issuer.clone(), str::to_string);
        Ok(Leaf {
            names,
            issuer,
            issuer_name,
            not_before: to_time(x.validity().not_before),
            not_after: to_time(x.validity().not_after),
        })
    }
}

impl Cert {
    /// Parses a PEM chain (leaf first) and its PEM private key.
    pub fn parse(chain_pem: &str, key_pem: &str, source: Source) -> Result<Cert> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .context("reading the certificate chain (PEM)")?;
        let Some(leaf) = chain.first() else {
            bail!("the certificate file holds no certificate");
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .context("reading the private key (PEM)")?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key)
            .context("loading the private key")?;
        let ck = CertifiedKey::new(chain.clone(), signing);
        // The check rustls' from_der would do; done here because challenge certs skip it.
        ck.keys_match()
            .context("the private key does not belong to the certificate")?;
        let x = Leaf::parse(leaf)?;
        Ok(Cert {
            key: Arc::new(ck),
            chain_pem: chain_pem.to_string(),
            key_pem: key_pem.to_string(),
            not_before: x.not_before,
            not_after: x.not_after,
            issuer: x.issuer,
            names: x.names,
            source,
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Time left until expiry (zero when expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// The store. Cheap to read from any thread: lookups are an atomic load and a map get.
pub struct CertStore {
    dir: PathBuf,
    live: ArcSwap<HashMap<String, Arc<Cert>>>,
    /// Bumped at every publish, for those who copy certificates elsewhere (coturn).
    changes: tokio::sync::watch::Sender<u64>,
    default_name: String,
    alpn: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    http01: RwLock<HashMap<String, String>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("dir", &self.dir).finish()
    }
}

impl CertStore {
    /// `dir` holds saved certificates (`<name>/fullchain.pem`, `<name>/privkey.pem`);
    /// `default_name`'s certificate answers clients that send no (or an unknown) SNI.
    pub fn new(dir: &Path, default_name: &str) -> Arc<CertStore> {
        Arc::new(CertStore {
            dir: dir.to_owned(),
            live: ArcSwap::from_pointee(HashMap::new()),
            changes: tokio::sync::watch::Sender::new(0),
            default_name: default_name.to_string(),
            alpn: ArcSwap::from_pointee(HashMap::new()),
            http01: RwLock::new(HashMap::new()),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Cert>> {
        self.live.load().get(name).cloned()
    }

    /// The certificate for a TLS handshake: by SNI, else the default name's, else any.
    pub fn for_sni(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let live = self.live.load();
        sni.and_then(|s| live.get(&s.to_ascii_lowercase()))
            .or_else(|| live.get(&self.default_name))
            .or_else(|| live.values().next())
            .map(|c| c.key.clone())
    }

    pub fn all(&self) -> Vec<(String, Arc<Cert>)> {
        let mut v: Vec<_> = self
            .live
            .load()
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Serves `cert` for `name` from the next handshake on. Open connections keep theirs.
    pub fn publish(&self, name: &str, cert: Arc<Cert>) {
        self.live.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(name.to_string(), cert.clone());
            m
        });
        self.changes.send_modify(|n| *n += 1);
    }

    /// Wakes on every publish.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn cert_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Saves (atomically, key 0600) and then publishes. A crash in between leaves the old pair.
    pub fn save_and_publish(&self, name: &str, cert: Cert) -> Result<Arc<Cert>> {
        let d = self.cert_dir(name);
        ensure_dir(&self.dir, Owner::root(), 0o700)?;
        ensure_dir(&d, Owner::root(), 0o700)?;
        write_atomic(
            &d.join("privkey.pem"),
            cert.key_pem.as_bytes(),
            Owner::root(),
            0o600,
        )?;
        write_atomic(
            &d.join("fullchain.pem"),
            cert.chain_pem.as_bytes(),
            Owner::root(),
            0o600,
        )?;
        let cert = Arc::new(cert);
        self.publish(name, cert.clone());
        Ok(cert)
    }

    /// Loads a saved certificate, if there is one.
    pub fn load_saved(&self, name: &str, source: Source) -> Option<Result<Cert>> {
        let d = self.cert_dir(name);
        let chain = std::fs::read_to_string(d.join("fullchain.pem")).ok()?;
        let key = match std::fs::read_to_string(d.join("privkey.pem")) {
            Ok(k) => k,
            Err(e) => return Some(Err(e).context("reading the saved private key")),
        };
        Some(Cert::parse(&chain, &key, source).with_context(|| format!("loading {}", d.display())))
    }

    /// HTTP-01 (RFC 8555 §8.3): the key authorization served at
    /// /.well-known/acme-challenge/<token>.
    pub fn put_http01(&self, token: &str, key_authorization: &str) {
        self.http01
            .write()
            .unwrap()
            .insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove_http01(&self, token: &str) {
        self.http01.write().unwrap().remove(token);
    }

    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01.read().unwrap().get(token).cloned()
    }

    /// TLS-ALPN-01 (RFC 8737): the self-signed challenge certificate for `name`.
    pub fn put_alpn01(&self, name: &str, key: Arc<CertifiedKey>) {
        self.alpn.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(name.to_ascii_lowercase(), key.clone());
            m
        });
    }

    pub fn remove_alpn01(&self, name: &str) {
        self.alpn.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(name);
            m
        });
    }

    pub fn alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn.load().get(&name.to_ascii_lowercase()).cloned()
    }
}

pub use crate::units::unix;
