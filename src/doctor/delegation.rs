//! Delegation: `/.well-known/matrix/server` and `/client` on the server_name, followed the way
//! the Matrix spec's server discovery does (server-server API "Resolving server names") and the
//! way clients discover their homeserver (client-server API "Well-known URI").

use std::net::IpAddr;

use serde_json::Value;

use super::{Check, Ctx, srv};

/// Where a remote server sends federation traffic for our server_name.
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
    /// How it was found, for the report.
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

    /// A client whose requests to `base()` reach this target: a discovered one, so only at
    /// a public address unless it is the appliance's own (`Net::untrusted`).
    pub async fn client(&self, net: &super::Net) -> anyhow::Result<reqwest::Client> {
        net.untrusted(&self.host, self.via.as_deref(), self.port)
            .await
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets).
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
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

/// What server discovery found: the target, or what was seen when the well-known is there but
/// broken, with the target the spec falls back to then.
pub type Discovered = Result<Target, (String, Option<Target>)>;

/// Server discovery for our server_name, step by step as the Matrix spec's server-server API
/// "Resolving server names" has a remote server do it. Err: the well-known is there but
/// broken (a remote server falls back to step 4 then, which the Err carries).
pub async fn discover(ctx: &Ctx<'_>) -> Discovered {
    let sn = &ctx.cfg.server_name;
    let fed = ctx.net.federation_port;
    let direct = |host: String, port: u16, how: String| Target {
        host,
        port,
        via: None,
        deprecated: false,
        how,
    };
    // Steps 1 and 2: an IP literal, or an explicit port, is used as it is.
    if let Some((host, port)) = split_host_port(sn)
        && (host.parse::<IpAddr>().is_ok() || port.is_some())
    {
        let port = port.unwrap_or(fed);
        return Ok(direct(host, port, format!("{sn} names its server itself")));
    }
    let url = format!(
        "{}/.well-known/matrix/server",
        crate::config::https_url(sn, ctx.net.https_port)
    );
    // Step 4 onwards: no usable well-known.
    let fallback = |before: String| srv_or_default(ctx, sn.clone(), before);
    let resp = match ctx.net.http().get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            return Ok(fallback(format!(
                "no well-known (GET {url} failed: {})",
                error_chain(&e)
            ))
            .await);
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
    let body: Value = match resp.json().await {
        Ok(v) => v,
        Err(e) => return broken(format!("{url} is not JSON: {e}")).await,
    };
    let Some(m_server) = body["m.server"].as_str() else {
        return broken(format!("{url} has no \"m.server\": {body}")).await;
    };
    let Some((host, port)) = split_host_port(m_server) else {
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
        None => Ok(srv_or_default(ctx, host, how).await),
    }
}

/// Spec steps 3.3-3.5 (for the delegated host) and 4-6 (for the server_name): SRV
/// `_matrix-fed._tcp.<name>`, then the deprecated `_matrix._tcp.<name>`, then `<name>:8448`.
async fn srv_or_default(ctx: &Ctx<'_>, name: String, before: String) -> Target {
    let fed = ctx.net.federation_port;
    let mut notes = vec![];
    match ctx.opts.nameserver.map_or_else(srv::system_nameserver, Ok) {
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

pub async fn server(ctx: &Ctx<'_>, discovered: &Discovered) -> Check {
    const NAME: &str = "delegation-server";
    let fix_wk = format!(
        "serve {{\"m.server\": \"{}:{}\"}} as application/json at https://{}/.well-known/matrix/server (homelab-matrix does this itself when {} resolves to this host)",
        ctx.cfg.hosts.matrix, ctx.net.https_port, ctx.cfg.server_name, ctx.cfg.server_name
    );
    let target = match discovered {
        Ok(t) => t,
        Err((seen, _)) => return Check::fail(NAME, seen.clone(), fix_wk),
    };
    let url = format!("{}/_matrix/federation/v1/version", target.base());
    let endpoint = target.endpoint();
    let answer = match target.client(&ctx.net).await {
        Ok(c) => c.get(&url).send().await.map_err(|e| error_chain(&e)),
        Err(e) => Err(format!("{e:#}")),
    };
    match answer {
        Ok(r) if r.status().is_success() => {
            let v: Value = r.json().await.unwrap_or(Value::Null);
            let seen = format!(
                "{}; {} {} answers at {endpoint}",
                target.how,
                v["server"]["name"].as_str().unwrap_or("a server"),
                v["server"]["version"].as_str().unwrap_or(""),
            );
            if target.deprecated {
                // Matrix spec v1.8 deprecated `_matrix._tcp` for `_matrix-fed._tcp`.
                Check::warn(
                    NAME,
                    seen,
                    format!(
                        "rename the SRV record to _matrix-fed._tcp.{} (same target and port): newer servers may stop reading _matrix._tcp",
                        target.host
                    ),
                )
            } else {
                Check::pass(NAME, seen)
            }
        }
        Ok(r) => Check::fail(
            NAME,
            format!("{}; but {url} answered {}", target.how, r.status()),
            "see `homelab-matrix status`: Synapse must be running behind the front door",
        ),
        Err(e) => {
            let connect = target.via.as_deref().unwrap_or(&target.host);
            let addrs = ctx
                .net
                .resolve(connect)
                .await
                .map(|a| {
                    a.iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_else(|e| format!("{e:#}"));
            // Without a well-known and an SRV record, the spec's last resort is the
            // server_name itself on 8448: delegation is the usual fix.
            let fix = if target.host == ctx.cfg.server_name && target.via.is_none() {
                format!("{fix_wk}; or make {endpoint} reach this appliance (DNS, port forward)")
            } else {
                format!(
                    "{connect} must resolve to this host and port {} be open to the internet (firewall, NAT port forward)",
                    target.port
                )
            };
            Check::fail(
                NAME,
                format!(
                    "{}; but {endpoint} ({addrs}) does not answer federation: {e}",
                    target.how,
                ),
                fix,
            )
        }
    }
}

pub async fn client(ctx: &Ctx<'_>) -> Check {
    const NAME: &str = "delegation-client";
    let sn = &ctx.cfg.server_name;
    let url = format!(
        "{}/.well-known/matrix/client",
        crate::config::https_url(sn, ctx.net.https_port)
    );
    let fix = format!(
        "serve {{\"m.homeserver\": {{\"base_url\": \"https://{}/\"}}}} as application/json with Access-Control-Allow-Origin: * at {url}",
        ctx.cfg.hosts.matrix
    );
    // Web clients (Element on another origin) fetch it cross-origin: CORS is required.
    let resp = match ctx
        .net
        .http()
        .get(&url)
        .header("Origin", "https://app.element.io")
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Check::fail(NAME, format!("GET {url} failed: {}", error_chain(&e)), fix),
    };
    if !resp.status().is_success() {
        return Check::fail(NAME, format!("GET {url} answered {}", resp.status()), fix);
    }
    let header = |h: &str| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (ctype, cors) = (
        header("content-type"),
        header("access-control-allow-origin"),
    );
    if cors != "*" && cors != "https://app.element.io" {
        return Check::fail(
            NAME,
            format!(
                "{url} has no CORS header (Access-Control-Allow-Origin: {cors:?}): web clients cannot read it"
            ),
            fix,
        );
    }
    let body: Value = match resp.json().await {
        Ok(v) => v,
        Err(e) => return Check::fail(NAME, format!("{url} is not JSON: {e}"), fix),
    };
    let Some(base) = body["m.homeserver"]["base_url"].as_str() else {
        return Check::fail(
            NAME,
            format!("{url} has no m.homeserver.base_url: {body}"),
            fix,
        );
    };
    // The client-server API is served over TLS (spec "API standards": clients SHOULD use
    // HTTPS), and a web client on an https origin cannot call anything else.
    let parsed = reqwest::Url::parse(base).ok();
    let Some((host, port)) = parsed
        .as_ref()
        .filter(|u| u.scheme() == "https")
        .and_then(|u| {
            Some((
                u.host_str()?.trim_matches(['[', ']']),
                u.port_or_known_default()?,
            ))
        })
    else {
        return Check::fail(
            NAME,
            format!("{url}: base_url {base:?} is not an https:// URL"),
            fix,
        );
    };
    let via = match ctx.net.untrusted(host, None, port).await {
        Ok(c) => c,
        Err(e) => return Check::fail(NAME, format!("base_url {base}: {e:#}"), fix),
    };
    let versions = format!("{}/_matrix/client/versions", base.trim_end_matches('/'));
    let answer = match super::net::get_json(
        via.get(&versions),
        NAME,
        &format!("base_url {base}: {versions}"),
        "see `homelab-matrix status`: Synapse must be running behind the front door",
        &format!("{base} must resolve to this host and port 443 be reachable"),
    )
    .await
    {
        Ok(v) => Some(v),
        Err(c) => return c,
    };
    let newest = answer.as_ref().and_then(|v| {
        v["versions"]
            .as_array()?
            .last()?
            .as_str()
            .map(str::to_string)
    });
    let Some(newest) = newest else {
        return Check::fail(
            NAME,
            format!("{versions} is not a Matrix versions answer"),
            fix,
        );
    };
    let json_type = ctype.starts_with("application/json");
    let seen = format!("base_url {base} answers (client API up to {newest}), CORS {cors}");
    if json_type {
        Check::pass(NAME, seen)
    } else {
        Check::warn(
            NAME,
            format!("{seen}; but Content-Type is {ctype:?}"),
            "serve it as application/json",
        )
    }
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
}
