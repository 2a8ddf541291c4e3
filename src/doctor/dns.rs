//! DNS: each served name must resolve to this host's public address, the one coturn is given
//! (`turn.external_ip`, or with "auto" what a STUN server sees, as src/coturn.rs learns it).
//! When that address cannot be learned (no internet, no STUN answer) the doctor says it could
//! not tell, instead of guessing.

use std::net::IpAddr;
use std::time::Duration;

use super::{Check, Ctx};

/// This host's public address, or why it is unknown.
pub async fn public_address(ctx: &Ctx<'_>) -> Result<(IpAddr, String), String> {
    let t = &ctx.cfg.turn;
    if t.external_ip != "auto" {
        return t
            .external_ip
            .parse()
            .map(|ip| (ip, "turn.external_ip".to_string()))
            .map_err(|_| format!("turn.external_ip {:?} is not an address", t.external_ip));
    }
    match crate::stun::binding(&t.stun_server, Duration::from_secs(5)).await {
        Ok((_, mapped)) => Ok((mapped, format!("seen by STUN server {}", t.stun_server))),
        Err(e) => Err(format!(
            "no internet? this host's public address could not be learned (STUN {}: {e:#})",
            t.stun_server
        )),
    }
}

pub async fn check(ctx: &Ctx<'_>, public: &Result<(IpAddr, String), String>) -> Vec<Check> {
    let mut out = vec![];
    for name in ctx.cfg.served_names() {
        let id = format!("dns:{name}");
        let addrs = match ctx.net.resolve(&name).await {
            Ok(a) => a,
            Err(e) => {
                out.push(Check::fail(
                    id,
                    format!("{e:#}"),
                    match public {
                        Ok((ip, _)) => format!("create an A (or AAAA) record for {name} pointing at {ip}"),
                        Err(_) => format!("create an A (and AAAA) record for {name} pointing at this host's public address"),
                    },
                ));
                continue;
            }
        };
        let list = addrs
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        out.push(match public {
            Ok((ip, how)) if addrs.contains(ip) => Check::pass(
                id,
                format!("{name} → {list}: this host's public address ({how})"),
            ),
            Ok((ip, how)) => Check::fail(
                id,
                format!("{name} → {list}, not this host's public address {ip} ({how})"),
                format!("point the A record of {name} at {ip} (and its AAAA at this host's IPv6 address, or remove it)"),
            ),
            Err(why) => Check::warn(
                id,
                format!("{name} → {list}; {why}: cannot tell whether that is this host"),
                "set turn.external_ip to the public address, or run the doctor where the internet is reachable",
            ),
        });
    }
    out
}
