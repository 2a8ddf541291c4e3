//! TURN: the credentials a client gets from Synapse (`/_matrix/client/v3/voip/turnServer`,
//! asked through the front door as the appliance's service account) must allocate a relay on
//! our TURN server (`turn`), and a packet must go through that relay both ways between the
//! client and a test peer (`turn-relay`): the peer sends to the relayed address, which probes
//! one port of the relay range the way a remote caller's packets arrive, and the client sends
//! back through it. A minimal TURN client (RFC 8656 Allocate, CreatePermission, Send and Data
//! indications over UDP; RFC 8489 long-term credentials) on src/stun.rs's codec.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use md5::{Digest, Md5};
use serde_json::Value;
use tokio::net::UdpSocket;

use super::net::get_json;
use super::{Check, Ctx};
use crate::discovery::addr::unspecified;
use crate::secrets::Secrets;
use crate::stun::{Answer, ERROR, INDICATION, Msg, SUCCESS, new_id};
use crate::synapse::admin::Synapse;

// RFC 8656 §17 methods (requests; indications add the class bit).
const ALLOCATE: u16 = 0x0003;
const REFRESH: u16 = 0x0004;
const SEND: u16 = 0x0006 | INDICATION;
const DATA_INDICATION: u16 = 0x0007 | INDICATION;
const CREATE_PERMISSION: u16 = 0x0008;
// RFC 8489 §18.3 and RFC 8656 §18 attributes.
const USERNAME: u16 = 0x0006;
const LIFETIME: u16 = 0x000D;
const XOR_PEER_ADDRESS: u16 = 0x0012;
const DATA: u16 = 0x0013;
const REALM: u16 = 0x0014;
const NONCE: u16 = 0x0015;
const XOR_RELAYED_ADDRESS: u16 = 0x0016;
const REQUESTED_TRANSPORT: u16 = 0x0019;
/// IANA protocol number of UDP (RFC 8656 §18.7).
const UDP: u8 = 17;
/// How often a packet is sent when none arrives (UDP may drop one), 1 s apart.
const TRIES: usize = 5;

/// Waits for a message on `sock` that `want` accepts, up to `within`; other messages (a late
/// answer, an indication) are skipped.
async fn recv_matching(
    sock: &UdpSocket,
    within: Duration,
    want: impl Fn(&Answer) -> bool,
) -> Option<Answer> {
    let mut buf = [0u8; 1500];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        if let Ok(a) = Answer::parse(&buf[..n])
            && want(&a)
        {
            return Some(a);
        }
    }
}

async fn exchange(sock: &UdpSocket, msg: &Msg, id: &[u8; 12]) -> Result<Answer> {
    // UDP: ask again when no answer comes (RFC 8489 §6.2.1).
    for _ in 0..TRIES {
        sock.send(&msg.buf).await?;
        if let Some(a) = recv_matching(sock, Duration::from_secs(1), |a| &a.id == id).await {
            return Ok(a);
        }
    }
    bail!("no answer from the TURN server")
}

/// An allocation held open on the TURN server with long-term credentials.
pub struct Session {
    sock: UdpSocket,
    user: String,
    realm: Vec<u8>,
    nonce: Vec<u8>,
    key: Vec<u8>,
    pub relay: SocketAddr,
}

/// The outcome of one allocation attempt.
pub enum Allocation {
    Relayed(Session),
    /// The server refused the credentials (error code and reason).
    Refused(u16, String),
}

impl Session {
    fn signed(&self, kind: u16, id: &[u8; 12], attrs: impl FnOnce(Msg) -> Msg) -> Msg {
        attrs(Msg::new(kind, id))
            .attr(USERNAME, self.user.as_bytes())
            .attr(REALM, &self.realm)
            .attr(NONCE, &self.nonce)
            .integrity(&self.key)
    }

    /// Lets `peer` send to the relay and be sent to (RFC 8656 §9). Err((code, reason)) when
    /// the server refuses, e.g. 403 for a peer in coturn's denied ranges.
    pub async fn permit(&self, peer: IpAddr) -> Result<Result<(), (u16, String)>> {
        let id = new_id()?;
        let m = self.signed(CREATE_PERMISSION, &id, |m| {
            m.xor_addr(XOR_PEER_ADDRESS, SocketAddr::new(peer, 0), &id)
        });
        let a = exchange(&self.sock, &m, &id).await?;
        Ok(match a.class() {
            SUCCESS => Ok(()),
            _ => Err(a.error().unwrap_or((0, "no error code".into()))),
        })
    }

    /// Waits for a Data indication carrying `payload` (a peer's packet relayed to us, RFC
    /// 8656 §11.6); returns the peer's address as the server saw it.
    pub async fn data_from_peer(&self, payload: &[u8], within: Duration) -> Option<SocketAddr> {
        let a = recv_matching(&self.sock, within, |a| {
            a.kind == DATA_INDICATION && a.get(DATA) == Some(payload)
        })
        .await?;
        a.addr(XOR_PEER_ADDRESS, true)
    }

    /// Asks the server to relay `payload` to `peer` (a Send indication, RFC 8656 §11.3).
    pub async fn send_to(&self, peer: SocketAddr, payload: &[u8]) -> Result<()> {
        let id = new_id()?;
        let m = Msg::new(SEND, &id)
            .xor_addr(XOR_PEER_ADDRESS, peer, &id)
            .attr(DATA, payload);
        self.sock.send(&m.buf).await?;
        Ok(())
    }

    /// Releases the allocation (Refresh with LIFETIME 0, RFC 8656 §7).
    pub async fn release(self) {
        if let Ok(id) = new_id() {
            let m = self.signed(REFRESH, &id, |m| m.attr(LIFETIME, &[0; 4]));
            let _ = exchange(&self.sock, &m, &id).await;
        }
    }
}

/// Allocates a UDP relay on `server` with long-term credentials.
pub async fn allocate(server: SocketAddr, user: &str, password: &str) -> Result<Allocation> {
    let sock = UdpSocket::bind(unspecified(server)).await?;
    sock.connect(server).await?;
    let transport = [UDP, 0, 0, 0];
    // The first request, unauthenticated, earns the realm and a nonce (RFC 8489 §9.2.3).
    let id = new_id()?;
    let first = exchange(
        &sock,
        &Msg::new(ALLOCATE, &id).attr(REQUESTED_TRANSPORT, &transport),
        &id,
    )
    .await?;
    let (Some(realm), Some(nonce)) = (first.get(REALM), first.get(NONCE)) else {
        bail!("the TURN server asked for no credentials (no realm and nonce in its answer)");
    };
    let mut h = Md5::new();
    h.update(format!("{user}:{}:{password}", String::from_utf8_lossy(realm)).as_bytes());
    let mut s = Session {
        realm: realm.to_vec(),
        nonce: nonce.to_vec(),
        key: h.finalize().to_vec(),
        user: user.to_string(),
        sock,
        relay: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
    };
    let id = new_id()?;
    let m = s.signed(ALLOCATE, &id, |m| m.attr(REQUESTED_TRANSPORT, &transport));
    let a = exchange(&s.sock, &m, &id).await?;
    match a.class() {
        SUCCESS => {
            s.relay = a
                .addr(XOR_RELAYED_ADDRESS, true)
                .context("the allocation has no relayed address")?;
            Ok(Allocation::Relayed(s))
        }
        ERROR => {
            let (code, reason) = a.error().unwrap_or((0, "no error code".into()));
            Ok(Allocation::Refused(code, reason))
        }
        k => bail!("an unexpected answer (class {k:#06x})"),
    }
}

/// `turn:host:port?transport=udp` → (host, port).
fn udp_uri(uris: &Value) -> Option<(String, u16)> {
    uris.as_array()?
        .iter()
        .filter_map(|u| u.as_str())
        .find_map(|u| {
            let rest = u.strip_prefix("turn:")?;
            let (hp, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !query.is_empty() && query != "transport=udp" {
                return None;
            }
            let (h, p) = hp.rsplit_once(':').unwrap_or((hp, "3478"));
            Some((h.to_string(), p.parse().ok()?))
        })
}

/// `turn` (Synapse's credentials allocate a relay) and, once that passes, `turn-relay` (a
/// packet through it both ways).
pub async fn check(ctx: &Ctx<'_>) -> Vec<Check> {
    const NAME: &str = "turn";
    let cfg = ctx.cfg;
    let secrets = Secrets::open(&cfg.state_dir());
    let admin = match Synapse::new(&cfg.synapse_local_url())
        .service_session(&secrets)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            return vec![Check::fail(
                NAME,
                format!("cannot log in as the appliance's service account: {e:#}"),
                "fix the synapse check first",
            )];
        }
    };
    // As a client asks: through the front door.
    let url = format!(
        "{}/_matrix/client/v3/voip/turnServer",
        crate::config::https_url(&cfg.hosts.matrix, ctx.net.https_port)
    );
    let creds = match get_json(
        ctx.net.http().get(&url).bearer_auth(admin.token().expose()),
        NAME,
        &format!("GET {url}"),
        "Synapse hands out no TURN credentials: see `homelab-matrix status` and Synapse's log",
        "fix the delegation-client check first",
    )
    .await
    {
        Ok(v) => v,
        Err(c) => return vec![c],
    };
    let (Some(user), Some(password), Some((host, port))) = (
        creds["username"].as_str(),
        creds["password"].as_str(),
        udp_uri(&creds["uris"]),
    ) else {
        return vec![Check::fail(
            NAME,
            format!("Synapse's TURN answer has no UDP URI or credentials: {creds}"),
            "restart homelab-matrix: it writes Synapse's turn_uris and turn_shared_secret",
        )];
    };
    let ip = match ctx.net.resolve(&host).await {
        Ok(ips) => ips[0],
        Err(e) => {
            return vec![Check::fail(
                NAME,
                format!("{e:#}"),
                format!("{host} must resolve to this host's public address"),
            )];
        }
    };
    let server = SocketAddr::new(ip, port);
    let session = match allocate(server, user, password).await {
        Ok(Allocation::Relayed(s)) => s,
        Ok(Allocation::Refused(code, reason)) => {
            return vec![Check::fail(
                NAME,
                format!(
                    "turn:{host}:{port} ({server}) refused Synapse's credentials: {code} {reason}"
                ),
                if code == 401 {
                    "coturn's static-auth-secret and Synapse's turn_shared_secret differ: restart homelab-matrix, which writes both from the same secret (state/secrets); an operator's synapse.d must not set turn_shared_secret"
                } else {
                    "see coturn's log lines in `journalctl -u homelab-matrix`"
                },
            )];
        }
        Err(e) => {
            return vec![Check::fail(
                NAME,
                format!("turn:{host}:{port} ({server}): {e:#}"),
                format!("coturn must be running (`homelab-matrix status`) and UDP {port} open"),
            )];
        }
    };
    let relay = session.relay;
    let (lo, hi) = (cfg.turn.min_port, cfg.turn.max_port);
    let seen =
        format!("Synapse's credentials allocated relay {relay} on turn:{host}:{port} ({server})");
    let allocated = if (lo..=hi).contains(&relay.port()) {
        Check::pass(NAME, format!("{seen}, in the relay range {lo}-{hi}"))
    } else {
        Check::warn(
            NAME,
            format!("{seen}, outside turn.min_port..max_port {lo}-{hi}"),
            "",
        )
    };
    let relayed = match through(&session, ctx).await {
        Ok(c) => c,
        Err(e) => Check::fail(
            RELAY,
            format!("testing relay {relay}: {e:#}"),
            "see coturn's log lines in `journalctl -u homelab-matrix`",
        ),
    };
    session.release().await;
    vec![allocated, relayed]
}

const RELAY: &str = "turn-relay";

/// A test peer on this host sends to the relayed address (as a remote caller's packets arrive,
/// through the firewall and the NAT's forward of the relay range) and is sent to through it.
async fn through(session: &Session, ctx: &Ctx<'_>) -> Result<Check> {
    let relay = session.relay;
    let (lo, hi) = (ctx.cfg.turn.min_port, ctx.cfg.turn.max_port);
    let peer = UdpSocket::bind(unspecified(relay)).await?;
    peer.connect(relay).await?;
    // The address coturn sees the peer's packets come from (when the relay is this host's own;
    // behind a NAT the router's loopback may rewrite it).
    let from = peer.local_addr()?.ip();
    if let Err((code, reason)) = session.permit(from).await? {
        return Ok(Check::warn(
            RELAY,
            format!(
                "coturn refuses this host's own address {from} as a peer ({code} {reason}: it is in the denied private, loopback or reserved ranges), so the path through relay {relay} was not tested"
            ),
            format!(
                "to test it here, add \"{from}\" to turn.allowed_peer_ips; or call through the relay from another network"
            ),
        ));
    }
    if from != relay.ip() {
        // A NAT that loops back may show the public address as the source instead.
        let _ = session.permit(relay.ip()).await;
    }
    let inbound = random_payload()?;
    let mut seen_peer = None;
    for _ in 0..TRIES {
        peer.send(&inbound).await?;
        seen_peer = session
            .data_from_peer(&inbound, Duration::from_secs(1))
            .await;
        if seen_peer.is_some() {
            break;
        }
    }
    let Some(seen_peer) = seen_peer else {
        let seen = format!(
            "a packet from {from} to relay {relay} (one port of the relay range {lo}-{hi}/udp) did not come through coturn"
        );
        return Ok(if super::ports::is_local(relay.ip()) {
            Check::fail(
                RELAY,
                seen,
                format!(
                    "open UDP {lo}-{hi} (turn.min_port..max_port, the relay range) to the internet in this host's firewall; callers behind NAT get no media without it"
                ),
            )
        } else {
            Check::warn(
                RELAY,
                format!(
                    "{seen}; {} is not this host's address, so the router may simply not loop back (hairpin NAT): could not see",
                    relay.ip()
                ),
                format!(
                    "forward UDP {lo}-{hi} on the router to this host, and test a call from another network"
                ),
            )
        });
    };
    let outbound = random_payload()?;
    let mut buf = [0u8; 1500];
    for _ in 0..TRIES {
        session.send_to(seen_peer, &outbound).await?;
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), peer.recv(&mut buf)).await
            && buf[..n] == outbound
        {
            return Ok(Check::pass(
                RELAY,
                format!(
                    "a packet went through relay {relay} both ways: from the test peer {seen_peer} in, and back out to it"
                ),
            ));
        }
    }
    Ok(Check::fail(
        RELAY,
        format!(
            "a packet from the test peer {seen_peer} came in through relay {relay}, but coturn relayed nothing back out to it"
        ),
        "see coturn's log lines in `journalctl -u homelab-matrix` (a denied-peer-ip or quota refusal)",
    ))
}

fn random_payload() -> Result<Vec<u8>> {
    let id = new_id()?;
    Ok([b"homelab-matrix doctor ".as_slice(), &id].concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_udp_uri_is_picked() {
        let uris = json!([
            "turns:t.test:5349?transport=tcp",
            "turn:t.test:3478?transport=udp"
        ]);
        assert_eq!(udp_uri(&uris), Some(("t.test".into(), 3478)));
        assert_eq!(udp_uri(&json!(["turn:t.test:3478?transport=tcp"])), None);
    }
}
