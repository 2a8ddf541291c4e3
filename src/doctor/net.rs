//! How the doctor reaches the appliance: names resolved by DNS (or by `--resolve` overrides),
//! the ports the front door listens on, TLS trusting what a client trusts (the system roots,
//! plus the internal CA's root when the operator's clients were told to trust it).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

use crate::config::Config;

pub use crate::config::SYSTEM_ROOTS;
use crate::discovery::addr::internal;

/// One connection attempt, or one request, may take this long.
pub const TIMEOUT: Duration = Duration::from_secs(15);

pub struct Net {
    overrides: Vec<(String, IpAddr)>,
    /// The appliance's own names (server_name, `[hosts]`, the `--resolve` ones): discovered
    /// targets that are these may be anywhere (split-horizon DNS), others only public.
    own: Vec<String>,
    /// The front door's HTTPS port (443 on a real host) and federation port (8448).
    pub https_port: u16,
    pub federation_port: u16,
    pub system: Arc<RootCertStore>,
    /// The internal CA's root, when it exists.
    pub internal: Option<(PathBuf, Arc<RootCertStore>)>,
    http: reqwest::Client,
    tls: rustls::ClientConfig,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots in `path`, none when it cannot be read (the checks then say what they could not
/// verify).
fn load_roots(path: &std::path::Path) -> RootCertStore {
    crate::certs::roots_from_pem(path).unwrap_or_else(|_| RootCertStore::empty())
}

impl Net {
    pub fn new(cfg: &Config, overrides: &[(String, IpAddr)]) -> Net {
        let system = Arc::new(load_roots(std::path::Path::new(SYSTEM_ROOTS)));
        let root_path = cfg.state_dir().join("ca/root.pem");
        let internal = Some(Arc::new(load_roots(&root_path)))
            .filter(|s| !s.is_empty())
            .map(|s| (root_path, s));
        // What the doctor's HTTP requests trust: what a client of this appliance trusts.
        let mut trusted = (*system).clone();
        if cfg.tls.mode() == crate::config::TlsMode::Internal
            && let Some((_, s)) = &internal
        {
            trusted.roots.extend(s.roots.iter().cloned());
        }
        let tls = crate::certs::verifying_client(trusted);
        let mut own: Vec<String> = [
            &cfg.server_name,
            &cfg.hosts.matrix,
            &cfg.hosts.element,
            &cfg.hosts.turn,
        ]
        .into_iter()
        .map(|n| {
            n.rsplit_once(':')
                .map_or(n.as_str(), |(h, _)| h)
                .to_string()
        })
        .chain(overrides.iter().map(|(n, _)| n.clone()))
        .filter(|n| !n.is_empty())
        .collect();
        own.sort();
        own.dedup();
        Net {
            overrides: overrides.to_vec(),
            own,
            https_port: cfg.public_https_port(),
            federation_port: cfg.listen.federation.v().port(),
            system,
            internal,
            http: http_client(&tls, overrides, &[]),
            tls,
        }
    }

    fn client(&self, extra: &[(&str, SocketAddr)]) -> reqwest::Client {
        http_client(&self.tls, &self.overrides, extra)
    }

    /// A client for a target someone else named (a well-known, an SRV record): its requests
    /// for `name` go to `connect`'s address (server discovery's SRV case: the certificate and
    /// Host stay `name`'s; None: `name`'s own). Unless `connect` is the appliance's own name
    /// or address, only a public address will do, and the one checked is the one connected
    /// to (pinned: a second DNS answer cannot move it). A hostile well-known must not make
    /// root's doctor knock on loopback or the LAN.
    pub async fn untrusted(
        &self,
        name: &str,
        connect: Option<&str>,
        port: u16,
    ) -> Result<reqwest::Client> {
        let connect = connect.unwrap_or(name);
        let addrs = self.resolve(connect).await?;
        let own = self.own.iter().any(|n| n.eq_ignore_ascii_case(connect));
        let Some(ip) = addrs.iter().copied().find(|ip| own || !internal(*ip)) else {
            let (is, hint) = if connect.parse::<IpAddr>().is_ok() {
                (String::new(), "delegate to one of its names".to_string())
            } else {
                let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
                (
                    format!(" ({})", list.join(", ")),
                    format!("name it in [hosts] or pass --resolve {connect}=ADDRESS"),
                )
            };
            bail!(
                "{connect}{is} is not a public address: the doctor does not follow a discovered target there (if it is this appliance, {hint})"
            );
        };
        Ok(self.client(&[(name, SocketAddr::new(ip, port))]))
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The addresses `name` resolves to (the override when there is one).
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>> {
        if let Some((_, ip)) = self.overrides.iter().find(|(n, _)| n == name) {
            return Ok(vec![*ip]);
        }
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let addrs = tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((name, 0)))
            .await
            .map_err(|_| anyhow!("resolving {name} timed out"))?
            .with_context(|| format!("resolving {name}"))?;
        let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
        v.dedup();
        if v.is_empty() {
            bail!("{name} has no address");
        }
        Ok(v)
    }

    /// The certificate chain `name`:`port` presents to a client asking for `name` (SNI),
    /// not verified yet: the caller judges it and says why.
    pub async fn chain(&self, name: &str, port: u16) -> Result<Vec<CertificateDer<'static>>> {
        let ip = self.resolve(name).await?[0];
        let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect((ip, port)))
            .await
            .map_err(|_| anyhow!("connecting to {ip}:{port} timed out"))?
            .with_context(|| format!("connecting to {ip}:{port}"))?;
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Capture(provider())))
            .with_no_client_auth();
        let sni = ServerName::try_from(name.to_string()).context("not a DNS name")?;
        let tls = tokio::time::timeout(
            TIMEOUT,
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(sni, tcp),
        )
        .await
        .map_err(|_| anyhow!("the TLS handshake with {ip}:{port} timed out"))?
        .with_context(|| format!("TLS handshake with {ip}:{port}"))?;
        let chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        Ok(chain)
    }
}

/// Verifies `chain` for `name` against `roots` as a TLS client would.
pub fn verify(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    name: &str,
) -> Result<(), rustls::Error> {
    let v = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let (ee, rest) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let sni = ServerName::try_from(name.to_string())
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    v.verify_server_cert(ee, rest, &sni, &[], UnixTime::now())
        .map(|_| ())
}

/// Accepts any certificate (handshake signatures still checked) so that the doctor can see and
/// judge what is presented, instead of only learning that the handshake failed.
#[derive(Debug)]
struct Capture(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A short, operator-readable reason for a TLS verification error.
pub fn why(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "not issued by a trusted root".into()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "expired".into()
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => "not valid for this name".into(),
        other => other.to_string(),
    }
}

/// Sends a request whose answer must be 2xx JSON. Err: the failed check, saying that `what`
/// answered another status (fix `on_status`) or did not answer at all (fix `on_error`).
pub async fn get_json(
    req: reqwest::RequestBuilder,
    name: &str,
    what: &str,
    on_status: &str,
    on_error: &str,
) -> Result<serde_json::Value, super::Check> {
    match req.send().await {
        Ok(r) if r.status().is_success() => Ok(r.json().await.unwrap_or(serde_json::Value::Null)),
        Ok(r) => Err(super::Check::fail(
            name,
            format!("{what} answered {}", r.status()),
            on_status,
        )),
        Err(e) => Err(super::Check::fail(
            name,
            format!(
                "{what} does not answer: {}",
                crate::discovery::error_chain(&e)
            ),
            on_error,
        )),
    }
}

/// Is this a "cannot reach the internet" kind of error (DNS or connect failure, timeout)?
pub fn offline(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout()
}

/// An HTTP client trusting what a client of the appliance trusts (`tls`), with the
/// `--resolve` overrides and then `extra` (a name sent to another address, e.g. an SRV
/// target's).
fn http_client(
    tls: &rustls::ClientConfig,
    overrides: &[(String, IpAddr)],
    extra: &[(&str, SocketAddr)],
) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .no_proxy()
        .user_agent(concat!("homelab-matrix-doctor/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    for (name, ip) in overrides {
        // Port 0: the URL's port is used.
        b = b.resolve(name, SocketAddr::new(*ip, 0));
    }
    for (name, addr) in extra {
        b = b.resolve(name, *addr);
    }
    b.build().expect("building the doctor's HTTP client")
}

/// Server discovery from the doctor goes where `Net::untrusted` lets it.
impl crate::discovery::Reach for Net {
    async fn client(
        &self,
        name: &str,
        connect: Option<&str>,
        port: u16,
    ) -> Result<reqwest::Client> {
        self.untrusted(name, connect, port).await
    }
}
