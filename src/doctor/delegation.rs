//! Delegation: `/.well-known/matrix/server` and `/client` on the server_name, followed the way
//! the Matrix spec's server discovery does (server-server API "Resolving server names") and the
//! way clients discover their homeserver (client-server API "Well-known URI").

use std::net::IpAddr;

use serde_json::Value;

use super::{Check, Ctx};

/// Where a remote server sends federation traffic for our server_name.
#[derive(Debug, Clone)]
pub struct Target {
    /// The name the certificate must be valid for (and the Host header's name).
    pub host: String,
    pub port: u16,
    /// How it was found, for the report.
    pub how: String,
}

impl Target {
    pub fn base(&self) -> String {
        crate::config::https_url(&self.host, self.port)
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
/// broken, with the spec's fallback (port 8448) when there is one.
pub type Discovered = Result<Target, (String, Option<Target>)>;

/// Server discovery for our server_name. Err: the well-known is there but broken, with what
/// was seen (the spec has remote servers fall back to port 8448 then).
pub async fn discover(ctx: &Ctx<'_>) -> Discovered {
    let sn = &ctx.cfg.server_name;
    let url = format!(
        "{}/.well-known/matrix/server",
        crate::config::https_url(sn, ctx.net.https_port)
    );
    // Spec step 6: no usable well-known (and no SRV record): the server_name on 8448.
    let fallback = Target {
        host: sn.clone(),
        port: ctx.net.federation_port,
        how: format!(
            "no delegation: {sn}:{} (SRV records are not looked up by the doctor)",
            ctx.net.federation_port
        ),
    };
    let resp = match ctx.net.http().get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            return Err((
                format!("GET {url} failed: {}", error_chain(&e)),
                Some(fallback),
            ));
        }
    };
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Ok(fallback);
    }
    if !status.is_success() {
        return Err((format!("GET {url} answered {status}"), Some(fallback)));
    }
    let body: Value = match resp.json().await {
        Ok(v) => v,
        Err(e) => return Err((format!("{url} is not JSON: {e}"), Some(fallback))),
    };
    let Some(m_server) = body["m.server"].as_str() else {
        return Err((format!("{url} has no \"m.server\": {body}"), Some(fallback)));
    };
    let Some((host, port)) = split_host_port(m_server) else {
        return Err((
            format!("{url}: \"m.server\" {m_server:?} is not host[:port]"),
            Some(fallback),
        ));
    };
    // Spec steps 3.3-3.5 (no port): SRV _matrix-fed._tcp, then 8448; SRV is not looked up
    // here.
    let port = port.unwrap_or(ctx.net.federation_port);
    Ok(Target {
        how: format!("{sn} delegates to {m_server} (well-known)"),
        host,
        port,
    })
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
    match ctx.net.http().get(&url).send().await {
        Ok(r) if r.status().is_success() => {
            let v: Value = r.json().await.unwrap_or(Value::Null);
            Check::pass(
                NAME,
                format!(
                    "{}; {} {} answers at {}:{}",
                    target.how,
                    v["server"]["name"].as_str().unwrap_or("a server"),
                    v["server"]["version"].as_str().unwrap_or(""),
                    target.host,
                    target.port
                ),
            )
        }
        Ok(r) => Check::fail(
            NAME,
            format!("{}; but {url} answered {}", target.how, r.status()),
            "see `homelab-matrix status`: Synapse must be running behind the front door",
        ),
        Err(e) => {
            let addrs = ctx
                .net
                .resolve(&target.host)
                .await
                .map(|a| {
                    a.iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_else(|e| format!("{e:#}"));
            Check::fail(
                NAME,
                format!(
                    "{}; but {}:{} ({addrs}) does not answer federation: {}",
                    target.how,
                    target.host,
                    target.port,
                    error_chain(&e)
                ),
                format!(
                    "{} must resolve to this host and port {} be open to the internet (firewall, NAT port forward)",
                    target.host, target.port
                ),
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
    let versions = format!("{}/_matrix/client/versions", base.trim_end_matches('/'));
    let answer = match super::net::get_json(
        ctx.net.http().get(&versions),
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
