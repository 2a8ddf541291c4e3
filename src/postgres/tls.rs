//! TLS to PostgreSQL over rustls (the one ring provider the binary uses): libpq's
//! `sslmode=verify-full`, the chain checked against the configured roots and the certificate
//! against the host name (PostgreSQL docs, 34.19.1 "Client Verification of Server
//! Certificates"). tokio-postgres asks the server for TLS first (SSLRequest) and, with
//! `SslMode::Require`, refuses a server that says no: no silent fall back to plain text.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Makes verified TLS connections; cheap to clone.
#[derive(Clone)]
pub struct Verified(Arc<rustls::ClientConfig>);

impl Verified {
    /// Trusts the PEM certificates in `roots` (the system bundle or `postgres.ca_file`).
    pub fn from_roots(roots: &Path) -> anyhow::Result<Verified> {
        let store = crate::certs::roots_from_pem(roots)?;
        let cfg = crate::certs::verifying_client(store);
        Ok(Verified(Arc::new(cfg)))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for Verified {
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Connect {
            cfg: self.0.clone(),
            name,
        })
    }
}

pub struct Connect {
    cfg: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for Connect {
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.cfg)
                .connect(self.name, stream)
                .await
                .map(Stream)
        })
    }
}

pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    // SCRAM without channel binding: the verified chain and host name are what stop a
    // man in the middle here.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
