//! Ports at the public address: 80, 443, 8448, TURN's 3478 (UDP, a STUN Binding; TCP) and
//! 5349. Probed from this host, which sees only part of the truth: when the public address is
//! this host's own, a refused port is a real failure but a firewall in front cannot be seen;
//! when it is a NAT's, a failed probe may only be the router refusing to loop back (hairpin
//! NAT), so the doctor says it could not see instead of failing.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use super::{Check, Ctx};

/// Is `ip` one of this host's own addresses (no NAT in between)?
pub(super) fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

async fn tcp_open(addr: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5s".into()),
    }
}

pub async fn check(ctx: &Ctx<'_>, public: &Result<(IpAddr, String), String>) -> Check {
    const NAME: &str = "ports";
    let (ip, how) = match public {
        Ok(p) => p,
        Err(why) => {
            return Check::warn(
                NAME,
                format!("{why}: the ports were not probed from outside"),
                "probe 80, 443, 8448, 3478 (UDP and TCP), 5349 and the relay range from another network",
            );
        }
    };
    let http = ctx.cfg.listen.http.v().port();
    let mut probes: Vec<(String, Result<(), String>)> = vec![];
    for (label, port) in [
        ("http", http),
        ("https", ctx.net.https_port),
        ("federation", ctx.net.federation_port),
    ] {
        probes.push((
            format!("{port}/tcp ({label})"),
            tcp_open(SocketAddr::new(*ip, port)).await,
        ));
    }
    if ctx.cfg.turn.enabled {
        let t = &ctx.cfg.turn;
        let stun = crate::stun::binding(&format!("{ip}:{}", t.port), Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:#}"));
        probes.push((format!("{}/udp (TURN)", t.port), stun));
        probes.push((
            format!("{}/tcp (TURN)", t.port),
            tcp_open(SocketAddr::new(*ip, t.port)).await,
        ));
        probes.push((
            format!("{}/tcp (TURN TLS)", t.tls_port),
            tcp_open(SocketAddr::new(*ip, t.tls_port)).await,
        ));
    }
    let open: Vec<&str> = probes
        .iter()
        .filter(|p| p.1.is_ok())
        .map(|p| p.0.as_str())
        .collect();
    let closed: Vec<String> = probes
        .iter()
        .filter_map(|(l, r)| r.as_ref().err().map(|e| format!("{l}: {e}")))
        .collect();
    let relay = if ctx.cfg.turn.enabled {
        format!(
            "; the relay range {}-{}/udp: see turn-relay",
            ctx.cfg.turn.min_port, ctx.cfg.turn.max_port
        )
    } else {
        String::new()
    };
    let local = is_local(*ip);
    if closed.is_empty() {
        let caveat = if ctx.opts.outside {
            "seen from another network"
        } else if local {
            "seen from this host: a firewall in front of it cannot be seen"
        } else {
            "through the NAT's loopback"
        };
        return Check::pass(
            NAME,
            format!(
                "{ip} ({how}) answers on {} ({caveat}){relay}",
                open.join(", ")
            ),
        );
    }
    let seen = format!(
        "at {ip} ({how}): {}; open: {}",
        closed.join("; "),
        if open.is_empty() {
            "none".into()
        } else {
            open.join(", ")
        }
    );
    if ctx.opts.outside {
        Check::fail(
            NAME,
            format!("{seen} (seen from another network)"),
            "open these ports to the internet: the firewall of the host, and on a router the port forwards to this host; and check that homelab-matrix listens there (`homelab-matrix status`, [listen] in the config)",
        )
    } else if local {
        Check::fail(
            NAME,
            seen,
            "nothing answers there: is homelab-matrix running (`homelab-matrix status`), listening on that address ([listen] in the config), and the local firewall open?",
        )
    } else {
        Check::warn(
            NAME,
            format!(
                "{seen}; {ip} is not this host's address, so the router may simply not loop back (hairpin NAT): could not see"
            ),
            "probe from another network; forward these ports on the router to this host",
        )
    }
}
