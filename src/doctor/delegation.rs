//! Delegation: `/.well-known/matrix/server` and `/client` on the server_name, followed the way
//! the Matrix spec's server discovery does (server-server API "Resolving server names",
//! `crate::discovery`) and the way clients discover their homeserver (client-server API
//! "Well-known URI").

use std::net::IpAddr;

use serde_json::Value;

use super::{Check, Ctx};
pub use crate::discovery::{Discovered, error_chain};

/// Server discovery for our server_name, as a remote server does it, through the doctor's
/// `Net` (the `--resolve` overrides; discovered targets only at public addresses unless they
/// are the appliance's own names).
pub async fn discover(ctx: &Ctx<'_>) -> Discovered {
    let finder = crate::discovery::Finder {
        https_port: ctx.net.https_port,
        federation_port: ctx.net.federation_port,
        nameserver: ctx.opts.nameserver,
    };
    finder.discover(&ctx.cfg.server_name, &ctx.net).await
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
