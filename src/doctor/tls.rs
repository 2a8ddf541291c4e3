//! Certificates per served name, fetched from our own HTTPS port with SNI as a client would:
//! the chain to a trusted root, the names, the days left and the renewal state `status`
//! reports. Also the TURN TLS listener, which must present the TURN host's current
//! certificate (coturn reads an exported copy: DESIGN.md §8).

use crate::certs::Leaf;
use crate::config::TlsMode;
use serde_json::Value;

use super::net::{verify, why};
use super::{Check, Ctx, now_secs};
use crate::units::human_duration;

/// A certificate this close to its end that is not being renewed is a failure in waiting.
const WARN_DAYS: i64 = 14;

/// RFC 6125 §6.4: exact (case-insensitive), or a wildcard for exactly one left-most label.
fn name_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    if p == n {
        return true;
    }
    match (p.strip_prefix("*."), n.split_once('.')) {
        (Some(rest), Some((_, nrest))) => rest == nrest,
        _ => false,
    }
}

/// What `status` says about the certificate for `name`, for the report.
fn renewal(status: &Option<Value>, name: &str) -> (String, Option<String>) {
    let Some(c) = status.as_ref().and_then(|s| {
        s["certificates"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }) else {
        return ("renewal state unknown (service not running)".into(), None);
    };
    let source = c["source"].as_str().unwrap_or("?").to_string();
    let next = c["next_attempt"].as_u64().map(|t| {
        format!(
            ", next renewal attempt in {}",
            human_duration(std::time::Duration::from_secs(t.saturating_sub(now_secs())))
        )
    });
    let err = c["last_error"]
        .as_str()
        .map(|e| format!("{} failed attempts, last: {e}", c["failures"]));
    (format!("source {source}{}", next.unwrap_or_default()), err)
}

pub async fn check(ctx: &Ctx<'_>) -> Vec<Check> {
    let mut out = vec![];
    for name in ctx.cfg.served_names() {
        out.push(one(ctx, &name).await);
    }
    out
}

async fn one(ctx: &Ctx<'_>, name: &str) -> Check {
    let id = format!("tls:{name}");
    let port = ctx.net.https_port;
    let chain = match ctx.net.chain(name, port).await {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => {
            return Check::fail(
                id,
                format!("{name}:{port} presented no certificate"),
                "see `homelab-matrix status` for the certificate state",
            );
        }
        Err(e) => {
            return Check::fail(
                id,
                format!("cannot fetch the certificate of {name}:{port}: {e:#}"),
                "make sure homelab-matrix is running (`systemctl status homelab-matrix`) and that the name resolves to this host",
            );
        }
    };
    let Ok(l) = Leaf::parse(&chain[0]) else {
        return Check::fail(id, "the certificate cannot be parsed", "replace it");
    };
    let days = (crate::units::unix(l.not_after) as i64 - now_secs() as i64) / 86_400;
    let (state, last_error) = renewal(&ctx.status, name);
    let mode = ctx.cfg.tls.mode();
    let fix_source = match mode {
        TlsMode::Files => format!(
            "put a certificate for {name} in {}/{name}/fullchain.pem (with privkey.pem) and run `homelab-matrix reload`",
            ctx.cfg.tls.files_dir
        ),
        TlsMode::Acme => format!(
            "see the ACME error in `homelab-matrix status`; {name} must resolve to this host and port 80 or 443 be reachable from the internet"
        ),
        TlsMode::Internal => {
            "restart homelab-matrix: it issues internal-CA certificates for every served name"
                .into()
        }
    };
    if !l.names.iter().any(|n| name_matches(n, name)) {
        return Check::fail(
            id,
            format!(
                "the certificate is for {}, not {name} (issuer {})",
                if l.names.is_empty() {
                    "no DNS name".into()
                } else {
                    l.names.join(", ")
                },
                l.issuer_name
            ),
            fix_source,
        );
    }
    let seen = format!("issuer {}, {days} days left, {state}", l.issuer_name);
    match verify(&ctx.net.system, &chain, name) {
        Ok(()) if days < WARN_DAYS && last_error.is_some() => {
            Check::warn(id, seen, last_error.unwrap_or_default())
        }
        Ok(()) => Check::pass(id, seen),
        Err(e) => {
            let by_internal = ctx
                .net
                .internal
                .as_ref()
                .filter(|(_, roots)| verify(roots, &chain, name).is_ok());
            match by_internal {
                Some((root, _)) if mode == TlsMode::Internal => Check::pass(
                    id,
                    format!(
                        "{seen}; the internal CA: clients must trust its root {}",
                        root.display()
                    ),
                ),
                Some((root, _)) => Check::warn(
                    id,
                    format!(
                        "{seen}; the internal CA's stand-in ({} only trusted by clients given {}), tls.mode = \"{mode}\" has not delivered{}",
                        name,
                        root.display(),
                        last_error.map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                    fix_source,
                ),
                None => Check::fail(
                    id,
                    format!(
                        "{seen}; {} (checked against {})",
                        why(&e),
                        super::net::SYSTEM_ROOTS
                    ),
                    fix_source,
                ),
            }
        }
    }
}

/// coturn's TLS listener must present the same certificate as the front door for the TURN
/// host, or clients' TURNS connections break after a renewal.
pub async fn turn(ctx: &Ctx<'_>) -> Check {
    let host = &ctx.cfg.hosts.turn;
    let port = ctx.cfg.turn.tls_port;
    let (front, turns) = (
        ctx.net.chain(host, ctx.net.https_port).await,
        ctx.net.chain(host, port).await,
    );
    match (front, turns) {
        (_, Err(e)) => Check::fail(
            "turn-tls",
            format!("TURN over TLS on {host}:{port} does not answer: {e:#}"),
            "see `homelab-matrix status` for coturn's state and its log in `journalctl -u homelab-matrix`",
        ),
        (Ok(f), Ok(t)) if f.first() == t.first() => Check::pass(
            "turn-tls",
            format!("{host}:{port} presents the TURN host's current certificate"),
        ),
        (Ok(_), Ok(_)) => Check::fail(
            "turn-tls",
            format!(
                "{host}:{port} presents another certificate than {host}:{} (stale after a renewal?)",
                ctx.net.https_port
            ),
            "run `homelab-matrix reload`: it exports the current certificate to coturn",
        ),
        (Err(e), Ok(_)) => Check::warn(
            "turn-tls",
            format!(
                "{host}:{port} answers; the front door's certificate for {host} could not be fetched to compare: {e:#}"
            ),
            "",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_label_only() {
        assert!(name_matches("matrix.example.org", "MATRIX.example.org"));
        assert!(name_matches("*.example.org", "matrix.example.org"));
        assert!(!name_matches("*.example.org", "a.matrix.example.org"));
        assert!(!name_matches("*.example.org", "example.org"));
        assert!(!name_matches("other.test", "matrix.test"));
    }
}
