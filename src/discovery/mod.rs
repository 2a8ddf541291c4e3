//! Server discovery (Matrix spec, server-server API "Resolving server names"): where a server
//! name's federation API answers. Used by the doctor (our own name, found the way a remote
//! server finds it) and by MatrixRTC's authorization service (a remote user's server, to
//! check their OpenID token there).
//!
//! Who may be connected to is the caller's (`Reach`): a name someone else chose, and the
//! well-known and SRV records it leads to, must not make root knock on this host's loopback
//! or its LAN (`addr::internal`).

pub mod addr;
pub mod srv;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

/// The most a well-known (or another small answer from a server someone else named) may
/// hold: the spec's documents are a few hundred bytes.
pub const BODY_CAP: usize = 64 * 1024;

/// Where a server's federation API answers.
#[derive(Debug, Clone)]
pub struct Target {
    /// The name the certificate must be valid for (and the Host header's name).
    pub host: String,
    pub port: u16,
    /// The SRV record's target, connected to instead of `host` (spec 3.3 and 4: the
    /// certificate and the Host header stay `host`'s).
    pub via: Option<String>,
    /// Found only through the deprecated `_matrix._tcp` record.
    pub deprecated: bool,
    /// How it was found, for a report.
    pub how: String,
}

impl Target {
    pub fn base(&self) -> String {
        crate::config::https_url(&self.host, self.port)
    }

    /// Where the connection goes: `host:port`, or the SRV target's.
    pub fn endpoint(&self) -> String {
        format!(
            "{}:{}",
            self.via.as_deref().unwrap_or(&self.host),
            self.port
        )
    }

    /// A client whose requests to `base()` reach this target, as `reach` allows.
    pub async fn client(&self, reach: &impl Reach) -> anyhow::Result<reqwest::Client> {
        reach
            .client(&self.host, self.via.as_deref(), self.port)
            .await
    }
}

/// How a caller lets discovery connect: a client whose requests for `name` go to `connect`'s
/// address (None: `name`'s own) on `port`, pinned to the address it checked, or why not.
pub trait Reach {
    fn client(
        &self,
        name: &str,
        connect: Option<&str>,
        port: u16,
    ) -> impl Future<Output = anyhow::Result<reqwest::Client>> + Send;
}

/// Splits `host[:port]` (IPv6 literals in brackets), the spec's server name grammar.
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
        None => Some((s.to_string(), None)),
    }
}

/// Is `s` a server name as the spec's appendix "Server Name" has it: a DNS name, an IPv4
/// literal or a bracketed IPv6 literal, with an optional port, at most 255 characters.
pub fn valid_server_name(s: &str) -> bool {
    let Some((host, _)) = split_host_port(s) else {
        return false;
    };
    if s.len() > 255 || host.is_empty() {
        return false;
    }
    if s.starts_with('[') {
        return host.parse::<std::net::Ipv6Addr>().is_ok();
    }
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && host
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63)
}

/// What server discovery found: the target, or what was seen when the well-known is there but
/// broken, with the target the spec falls back to then.
pub type Discovered = Result<Target, (String, Option<Target>)>;

/// Discovery's settings: the ports a server's well-known and federation API default to (443
/// and 8448 on the internet), and the nameserver SRV records are asked of (None: the
/// system's).
pub struct Finder {
    pub https_port: u16,
    pub federation_port: u16,
    pub nameserver: Option<SocketAddr>,
}

impl Finder {
    /// The spec's steps for server name `sn`, in order. Err: the well-known is there but
    /// broken (a server falls back to step 4 then, which the Err carries).
    pub async fn discover(&self, sn: &str, reach: &impl Reach) -> Discovered {
        let fed = self.federation_port;
        let direct = |host: String, port: u16, how: String| Target {
            host,
            port,
            via: None,
            deprecated: false,
            how,
        };
        // Steps 1 and 2: an IP literal, or an explicit port, is used as it is.
        let Some((name, port)) = split_host_port(sn) else {
            return Err((format!("{sn:?} is not a server name"), None));
        };
        if name.parse::<IpAddr>().is_ok() || port.is_some() {
            let port = port.unwrap_or(fed);
            return Ok(direct(name, port, format!("{sn} names its server itself")));
        }
        let url = format!(
            "{}/.well-known/matrix/server",
            crate::config::https_url(&name, self.https_port)
        );
        // Step 4 onwards: no usable well-known.
        let fallback = |before: String| self.srv_or_default(name.clone(), before);
        let got = match reach.client(&name, None, self.https_port).await {
            Ok(c) => c.get(&url).send().await.map_err(|e| error_chain(&e)),
            Err(e) => Err(format!("{e:#}")),
        };
        let resp = match got {
            Ok(r) => r,
            Err(e) => {
                return Ok(fallback(format!("no well-known (GET {url} failed: {e})")).await);
            }
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(fallback(format!("no well-known ({url} answered 404)")).await);
        }
        let broken = |seen: String| async move {
            let t = fallback("the spec then falls back".into()).await;
            Err((seen, Some(t)))
        };
        if !status.is_success() {
            return broken(format!("GET {url} answered {status}")).await;
        }
        let body: Value = match body_capped(resp, BODY_CAP).await {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(v) => v,
                Err(e) => return broken(format!("{url} is not JSON: {e}")).await,
            },
            Err(e) => return broken(format!("{url}: {e}")).await,
        };
        let Some(m_server) = body["m.server"].as_str() else {
            return broken(format!("{url} has no \"m.server\": {body}")).await;
        };
        let Some((host, port)) = split_host_port(m_server).filter(|_| valid_server_name(m_server))
        else {
            return broken(format!(
                "{url}: \"m.server\" {m_server:?} is not host[:port]"
            ))
            .await;
        };
        let how = format!("{sn} delegates to {m_server} (well-known)");
        // Steps 3.1 and 3.2: an IP literal or an explicit port; else 3.3-3.5: SRV, then 8448.
        match port {
            Some(p) => Ok(direct(host, p, how)),
            None if host.parse::<IpAddr>().is_ok() => Ok(direct(host, fed, how)),
            None => Ok(self.srv_or_default(host, how).await),
        }
    }

    /// Spec steps 3.3-3.5 (for the delegated host) and 4-6 (for the server name): SRV
    /// `_matrix-fed._tcp.<name>`, then the deprecated `_matrix._tcp.<name>`, then
    /// `<name>:8448`.
    async fn srv_or_default(&self, name: String, before: String) -> Target {
        let fed = self.federation_port;
        let mut notes = vec![];
        match self.nameserver.map_or_else(srv::system_nameserver, Ok) {
            Err(e) => notes.push(format!("SRV not looked up: {e:#}")),
            Ok(ns) => {
                for (record, deprecated) in [("_matrix-fed._tcp", false), ("_matrix._tcp", true)] {
                    let q = format!("{record}.{name}");
                    match srv::lookup(ns, &q).await {
                        Ok(r) if !r.is_empty() => {
                            let (target, port) = (r[0].target.clone(), r[0].port);
                            return Target {
                                how: format!(
                                    "{before}; SRV {q} → {target}:{port}{}",
                                    if deprecated {
                                        " (a deprecated record)"
                                    } else {
                                        ""
                                    }
                                ),
                                host: name,
                                port,
                                via: Some(target),
                                deprecated,
                            };
                        }
                        Ok(_) => {}
                        Err(e) => notes.push(format!("SRV {q}: {e:#}")),
                    }
                }
            }
        }
        let notes = if notes.is_empty() {
            "no SRV record".to_string()
        } else {
            notes.join("; ")
        };
        Target {
            how: format!("{before}; {notes}; so {name}:{fed}"),
            host: name,
            port: fed,
            via: None,
            deprecated: false,
        }
    }
}

/// A response's body, refused past `cap` bytes (a server someone else named may send
/// without end).
pub async fn body_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(format!("the answer is over {cap} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > cap {
            return Err(format!("the answer is over {cap} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// reqwest's error with its causes (the connect or TLS reason is in the sources).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_split_like_the_spec_reads_them() {
        assert_eq!(
            split_host_port("matrix.example.org:443"),
            Some(("matrix.example.org".into(), Some(443)))
        );
        assert_eq!(
            split_host_port("matrix.example.org"),
            Some(("matrix.example.org".into(), None))
        );
        assert_eq!(
            split_host_port("[2001:db8::1]:8448"),
            Some(("2001:db8::1".into(), Some(8448)))
        );
        assert_eq!(split_host_port("host:notaport"), None);
    }

    #[test]
    fn server_names_are_what_the_spec_allows() {
        for ok in [
            "example.org",
            "matrix.example.org:8448",
            "1.2.3.4",
            "[2001:db8::1]:443",
            "a-b.c",
        ] {
            assert!(valid_server_name(ok), "{ok}");
        }
        for bad in [
            "",
            "exa mple.org",
            "a..b",
            "ex/ample",
            "user@host",
            "[not-v6]",
            "host:",
            "host:99999",
            &"a".repeat(256),
        ] {
            assert!(!valid_server_name(bad), "{bad}");
        }
    }
}
