//! The HTTP client instant-acme talks to the CA with: every request, body included, has a
//! deadline, so a CA that accepts connections and never answers is an error naming the CA
//! after `timeout`, not a task stuck forever (instant-acme's own client has no timeout).
//!
//! Only single requests are bounded here. Waiting for validation is many requests (polls
//! with the CA's Retry-After, RFC 8555 §7.5.1): a slow but answering CA keeps that going
//! up to the polling deadline in `acme::issue`, and shutdown cancels the whole task.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, Error, HttpClient};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// ACME answers are small (a certificate chain is a few kB).
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("the ACME server did not answer {what} within {}s", after.as_secs_f64())]
pub struct TimedOut {
    what: String,
    after: Duration,
}

pub struct TimeoutClient {
    http: Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    timeout: Duration,
}

impl TimeoutClient {
    /// Trusts the system's roots (rustls-platform-verifier, as instant-acme's default client),
    /// or only `ca_root` (a test CA such as pebble's).
    pub fn new(ca_root: Option<&Path>, timeout: Duration) -> Result<TimeoutClient> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca_root {
            None => builder
                .try_with_platform_verifier()
                .context("loading the system's TLS roots")?,
            Some(path) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let mut roots = rustls::RootCertStore::empty();
                for der in CertificateDer::pem_slice_iter(&pem) {
                    let der =
                        der.with_context(|| format!("{}: not PEM certificates", path.display()))?;
                    roots
                        .add(der)
                        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                builder.with_tls_config(
                    rustls::ClientConfig::builder_with_provider(provider)
                        .with_safe_default_protocol_versions()?
                        .with_root_certificates(roots)
                        .with_no_client_auth(),
                )
            }
        };
        let connector = builder.https_only().enable_http1().enable_http2().build();
        Ok(TimeoutClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        })
    }
}

impl HttpClient for TimeoutClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, Error>> + Send>> {
        let what = format!("{} {}", req.method(), req.uri());
        let after = self.timeout;
        let sent = self.http.request(req);
        Box::pin(async move {
            let whole = async {
                let rsp = sent.await.map_err(|e| Error::Other(Box::new(e)))?;
                let (parts, body) = rsp.into_parts();
                // The body too: a CA that sends headers and then stalls is as stuck.
                let body = Limited::new(body, MAX_BODY)
                    .collect()
                    .await
                    .map_err(Error::Other)?
                    .to_bytes();
                Ok(BytesResponse {
                    parts,
                    body: Box::new(body),
                })
            };
            match tokio::time::timeout(after, whole).await {
                Ok(r) => r,
                Err(_) => Err(Error::Other(Box::new(TimedOut { what, after }))),
            }
        })
    }
}
