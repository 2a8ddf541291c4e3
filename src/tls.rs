//! TLS termination settings and the handshake-time certificate choice. Reads from `certs`;
//! knows nothing of ACME.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::certs::CertStore;

/// RFC 8737 §6.2: the ALPN protocol of TLS-ALPN-01 validation.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// TLS 1.3 and 1.2 only (rustls has nothing older), ring as the one crypto provider,
/// ALPN h2 > http/1.1, and acme-tls/1 for validation handshakes.
pub fn server_config(store: Arc<CertStore>) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { store }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Arc::new(cfg)
}

#[derive(Debug)]
struct SniResolver {
    store: Arc<CertStore>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A validation handshake offers exactly acme-tls/1 (RFC 8737 §3); answer it with the
        // challenge certificate or not at all.
        let only_acme = hello
            .alpn()
            .map(|mut protos| protos.next() == Some(ACME_TLS_ALPN) && protos.next().is_none())
            .unwrap_or(false);
        if only_acme {
            return self.store.alpn01(hello.server_name()?);
        }
        self.store.for_sni(hello.server_name())
    }
}
