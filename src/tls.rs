//! TLS termination settings and the handshake-time certificate choice. Reads from `certs`;
//! knows nothing of ACME.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::certs::CertStore;

/// RFC 8737 §6.2: the ALPN protocol of TLS-ALPN-01 validation.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Sessions the cache keeps (a few hundred bytes each): nginx's `ssl_session_cache
/// shared:SSL:1m` holds about 4,000.
const SESSION_CACHE: usize = 4096;

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
    // Resumption (RFC 8446 §2.2, RFC 5077): a returning client skips the key exchange and the
    // signature, most of a handshake's cost. Tickets (stateless; ring's ticketer rotates its
    // key every 6 h) for TLS 1.3 and 1.2 clients that take them, and a session cache for
    // TLS 1.2 session IDs. rustls' defaults are no tickets and a 256-entry cache.
    match rustls::crypto::ring::Ticketer::new() {
        Ok(t) => cfg.ticketer = t,
        Err(e) => tracing::warn!(
            "TLS session tickets are off ({e}); clients resume from the session cache only"
        ),
    }
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Arc::new(cfg)
}

/// The acceptor the front door's TLS listeners share.
pub fn acceptor(store: Arc<CertStore>) -> tokio_rustls::TlsAcceptor {
    tokio_rustls::TlsAcceptor::from(server_config(store))
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
