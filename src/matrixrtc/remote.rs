//! A remote user's OpenID token, checked on their own server: server discovery for the
//! server name the token claims (Matrix spec, server-server API "Resolving server names"),
//! then `GET /_matrix/federation/v1/openid/userinfo` there (server-server API "OpenID"), as
//! lk-jwt-service does for users of other servers.
//!
//! The server name is the caller's choice, so nothing here connects where it leads unless
//! `Reach` allows it: a public address (or, with `allow_private_servers`, a private one),
//! never loopback, the address checked being the one connected to (pinned: a second DNS
//! answer cannot move it), no redirects, no proxy, a deadline and a size cap on every answer.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::discovery::{self, Finder, Reach, addr};

/// One connection or one request may take this long; the whole check `DEADLINE`.
const TIMEOUT: Duration = Duration::from_secs(5);
const DEADLINE: Duration = Duration::from_secs(15);
/// userinfo's answer is `{"sub": "@user:server"}`.
const USERINFO_CAP: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0:?} is not a Matrix server name")]
    NotAServerName(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{server} did not answer in {DEADLINE:?}")]
    Deadline { server: String },
    #[error("{server} answered userinfo with {what}")]
    BadAnswer { server: String, what: String },
}

pub struct Verifier {
    finder: Finder,
    tls: rustls::ClientConfig,
    allow_private: bool,
}

impl Verifier {
    /// `extra_ca`: PEM roots trusted besides the system's (None: the system's only).
    pub fn new(
        extra_ca: Option<&std::path::Path>,
        allow_private: bool,
    ) -> anyhow::Result<Verifier> {
        let mut roots =
            crate::certs::roots_from_pem(std::path::Path::new(crate::config::SYSTEM_ROOTS))
                .unwrap_or_else(|_| rustls::RootCertStore::empty());
        if let Some(p) = extra_ca {
            roots.extend(crate::certs::roots_from_pem(p)?.roots);
        }
        let tls = crate::certs::verifying_client(roots);
        Ok(Verifier {
            finder: Finder {
                https_port: 443,
                federation_port: 8448,
                nameserver: None,
            },
            tls,
            allow_private,
        })
    }

    /// May a remote server's connection go to `ip`?
    fn allowed(&self, ip: IpAddr) -> bool {
        let loopback = match ip {
            IpAddr::V4(v) => v.is_loopback() || v.is_unspecified() || v.octets()[0] == 0,
            IpAddr::V6(v) => {
                v.is_loopback()
                    || v.is_unspecified()
                    || v.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        };
        !loopback && (self.allow_private || !addr::internal(ip))
    }

    /// The user `token` belongs to, as `server` (the name the token claims) says, or None
    /// when that server refuses the token. A user of another server than `server` is never
    /// the answer: a server vouches for its own users only.
    pub async fn userinfo(&self, server: &str, token: &str) -> Result<Option<String>, RemoteError> {
        if !discovery::valid_server_name(server) {
            return Err(RemoteError::NotAServerName(server.to_string()));
        }
        tokio::time::timeout(DEADLINE, self.ask(server, token))
            .await
            .map_err(|_| RemoteError::Deadline {
                server: server.to_string(),
            })?
    }

    async fn ask(&self, server: &str, token: &str) -> Result<Option<String>, RemoteError> {
        let target = match self.finder.discover(server, self).await {
            Ok(t) | Err((_, Some(t))) => t,
            Err((seen, None)) => return Err(RemoteError::Unreachable(seen)),
        };
        let client = target
            .client(self)
            .await
            .map_err(|e| RemoteError::Unreachable(format!("{e:#}")))?;
        let url = format!(
            "{}/_matrix/federation/v1/openid/userinfo?access_token={}",
            target.base(),
            crate::uri::percent_encode(token)
        );
        let resp = client.get(&url).send().await.map_err(|e| {
            RemoteError::Unreachable(format!(
                "{} ({}): {}",
                server,
                target.endpoint(),
                discovery::error_chain(&e)
            ))
        })?;
        let status = resp.status();
        // The spec's answer to a token it does not know: 401 M_UNKNOWN_TOKEN.
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Ok(None);
        }
        let bad = |what: String| RemoteError::BadAnswer {
            server: server.to_string(),
            what,
        };
        if !status.is_success() {
            return Err(bad(format!("HTTP {status}")));
        }
        let body = discovery::body_capped(resp, USERINFO_CAP)
            .await
            .map_err(bad)?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| bad(format!("no JSON ({e})")))?;
        let Some(sub) = v["sub"].as_str() else {
            return Err(bad("no \"sub\"".into()));
        };
        match sub.split_once(':') {
            Some((local, of)) if local.starts_with('@') && of == server => Ok(Some(sub.into())),
            _ => Err(bad(format!("{sub:?}, not a user of {server}"))),
        }
    }
}

impl Reach for Verifier {
    async fn client(
        &self,
        name: &str,
        connect: Option<&str>,
        port: u16,
    ) -> anyhow::Result<reqwest::Client> {
        let connect = connect.unwrap_or(name);
        let addrs: Vec<IpAddr> = match connect.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((connect, 0)))
                .await
                .map_err(|_| anyhow!("resolving {connect} timed out"))?
                .with_context(|| format!("resolving {connect}"))?
                .map(|a| a.ip())
                .collect(),
        };
        let Some(ip) = addrs.iter().copied().find(|ip| self.allowed(*ip)) else {
            let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
            bail!(
                "{connect} ({}) is not a public address: a remote server is not followed there{}",
                list.join(", "),
                if self.allow_private {
                    " (loopback never)"
                } else {
                    " (matrixrtc.allow_private_servers allows private ones)"
                }
            );
        };
        Ok(reqwest::Client::builder()
            .use_preconfigured_tls(self.tls.clone())
            .no_proxy()
            .user_agent(concat!("homelab-matrix/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(TIMEOUT)
            .timeout(TIMEOUT)
            .resolve(name, SocketAddr::new(ip, port))
            .build()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_never_private_only_when_allowed() {
        let strict = Verifier::new(None, false).unwrap();
        let lan = Verifier::new(None, true).unwrap();
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
        ] {
            let ip = ip.parse().unwrap();
            assert!(!strict.allowed(ip) && !lan.allowed(ip), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "192.168.1.2",
            "169.254.169.254",
            "fd00::1",
            "fe80::1",
        ] {
            let ip = ip.parse().unwrap();
            assert!(!strict.allowed(ip) && lan.allowed(ip), "{ip}");
        }
        assert!(strict.allowed("1.1.1.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_name_that_is_no_server_name_is_refused_before_any_request() {
        let v = Verifier::new(None, true).unwrap();
        for bad in ["", "evil.example/path", "user@host", "a b"] {
            assert!(
                matches!(
                    v.userinfo(bad, "t").await,
                    Err(RemoteError::NotAServerName(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_server_name_at_loopback_is_not_asked() {
        // A listener on loopback that counts connections: none may arrive.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            while l.accept().await.is_ok() {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let v = Verifier::new(None, true).unwrap();
        for name in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            let e = v.userinfo(&name, "t").await.unwrap_err();
            assert!(
                e.to_string().contains("not a public address"),
                "{name}: {e}"
            );
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
