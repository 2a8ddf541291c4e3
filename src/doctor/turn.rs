//! TURN: the credentials a client gets from Synapse (`/_matrix/client/v3/voip/turnServer`,
//! asked through the front door as the appliance's service account) must allocate a relay on
//! our TURN server. A minimal TURN client (RFC 8656 Allocate over UDP, RFC 8489 long-term
//! credentials), beside src/stun.rs's Binding.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use md5::{Digest, Md5};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use tokio::net::UdpSocket;

use super::net::get_json;
use super::{Check, Ctx};
use crate::secrets::Secrets;
use crate::synapse::admin::{SERVICE_TOKEN_FILE, Synapse};

const MAGIC: u32 = 0x2112_A442;
const ALLOCATE: u16 = 0x0003;
const REFRESH: u16 = 0x0004;
const SUCCESS: u16 = 0x0100;
const ERROR: u16 = 0x0110;
const USERNAME: u16 = 0x0006;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const ERROR_CODE: u16 = 0x0009;
const LIFETIME: u16 = 0x000D;
const REALM: u16 = 0x0014;
const NONCE: u16 = 0x0015;
const XOR_RELAYED_ADDRESS: u16 = 0x0016;
const REQUESTED_TRANSPORT: u16 = 0x0019;
/// IANA protocol number of UDP (RFC 8656 §18.7).
const UDP: u8 = 17;

/// A STUN message being built: header, then attributes padded to 4 bytes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(method: u16, id: &[u8; 12]) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&method.to_be_bytes());
        buf.extend_from_slice(&0u16.to_be_bytes());
        buf.extend_from_slice(&MAGIC.to_be_bytes());
        buf.extend_from_slice(id);
        Msg { buf }
    }
    fn attr(mut self, t: u16, v: &[u8]) -> Msg {
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(v.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(v);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        let len = (self.buf.len() - 20) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        self
    }
    /// RFC 8489 §14.5: HMAC-SHA1 over the message up to the attribute, the length already
    /// counting it; key MD5(username ":" realm ":" password) (§9.2.2).
    fn integrity(self, key: &[u8]) -> Msg {
        let mut m = self;
        let len = (m.buf.len() - 20 + 24) as u16;
        m.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key),
            &m.buf,
        );
        m.attr(MESSAGE_INTEGRITY, tag.as_ref())
    }
}

/// A parsed answer: its class bits and attributes.
struct Answer {
    kind: u16,
    attrs: Vec<(u16, Vec<u8>)>,
}

impl Answer {
    fn parse(msg: &[u8], id: &[u8; 12]) -> Result<Answer> {
        if msg.len() < 20 || u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]) != MAGIC {
            bail!("not a STUN message");
        }
        if &msg[8..20] != id {
            bail!("an answer to another request");
        }
        let len = u16::from_be_bytes([msg[2], msg[3]]) as usize;
        let body = msg.get(20..20 + len).context("truncated STUN message")?;
        let mut attrs = vec![];
        let mut i = 0;
        while i + 4 <= body.len() {
            let t = u16::from_be_bytes([body[i], body[i + 1]]);
            let l = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
            let v = body.get(i + 4..i + 4 + l).context("truncated attribute")?;
            attrs.push((t, v.to_vec()));
            i += 4 + l.div_ceil(4) * 4;
        }
        Ok(Answer {
            kind: u16::from_be_bytes([msg[0], msg[1]]) & 0x0110,
            attrs,
        })
    }
    fn get(&self, t: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(a, _)| *a == t)
            .map(|(_, v)| v.as_slice())
    }
    fn error(&self) -> Option<(u16, String)> {
        let v = self.get(ERROR_CODE)?;
        let code = (v.get(2)? & 7) as u16 * 100 + *v.get(3)? as u16;
        Some((code, String::from_utf8_lossy(&v[4..]).into_owned()))
    }
    /// RFC 8489 §14.2: the address XORed with the magic cookie (and the id for IPv6).
    fn relayed(&self, id: &[u8; 12]) -> Option<SocketAddr> {
        let v = self.get(XOR_RELAYED_ADDRESS)?;
        let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC >> 16) as u16;
        let ip = match v[1] {
            1 => IpAddr::V4(Ipv4Addr::from(
                u32::from_be_bytes(v.get(4..8)?.try_into().ok()?) ^ MAGIC,
            )),
            2 => {
                let mut key = MAGIC.to_be_bytes().to_vec();
                key.extend_from_slice(id);
                let b: Vec<u8> = v.get(4..20)?.iter().zip(key).map(|(a, k)| a ^ k).collect();
                IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }
}

async fn exchange(sock: &UdpSocket, msg: &Msg, id: &[u8; 12]) -> Result<Answer> {
    let mut buf = [0u8; 1500];
    // UDP: ask again when no answer comes (RFC 8489 §6.2.1).
    for _ in 0..5 {
        sock.send(&msg.buf).await?;
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await
            && let Ok(a) = Answer::parse(&buf[..n], id)
        {
            return Ok(a);
        }
    }
    bail!("no answer from the TURN server")
}

fn new_id() -> Result<[u8; 12]> {
    let mut id = [0u8; 12];
    SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| anyhow::anyhow!("the OS random number generator failed"))?;
    Ok(id)
}

/// The outcome of one allocation attempt.
pub enum Allocation {
    Relayed(SocketAddr),
    /// The server refused the credentials (error code and reason).
    Refused(u16, String),
}

/// Allocates a UDP relay on `server` with long-term credentials, then releases it
/// (Refresh with LIFETIME 0, RFC 8656 §7).
pub async fn allocate(server: SocketAddr, user: &str, password: &str) -> Result<Allocation> {
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await?;
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
    let (realm, nonce) = (realm.to_vec(), nonce.to_vec());
    let mut h = Md5::new();
    h.update(format!("{user}:{}:{password}", String::from_utf8_lossy(&realm)).as_bytes());
    let key = h.finalize();
    let signed = |method: u16, id: &[u8; 12], extra: Option<(u16, &[u8])>| {
        let mut m = Msg::new(method, id);
        if let Some((t, v)) = extra {
            m = m.attr(t, v);
        }
        m.attr(USERNAME, user.as_bytes())
            .attr(REALM, &realm)
            .attr(NONCE, &nonce)
            .integrity(&key)
    };
    let id = new_id()?;
    let a = exchange(
        &sock,
        &signed(ALLOCATE, &id, Some((REQUESTED_TRANSPORT, &transport))),
        &id,
    )
    .await?;
    match a.kind {
        SUCCESS => {
            let relay = a
                .relayed(&id)
                .context("the allocation has no relayed address")?;
            let id = new_id()?;
            let _ = exchange(&sock, &signed(REFRESH, &id, Some((LIFETIME, &[0; 4]))), &id).await;
            Ok(Allocation::Relayed(relay))
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

pub async fn check(ctx: &Ctx<'_>) -> Check {
    const NAME: &str = "turn";
    let cfg = ctx.cfg;
    let secrets = Secrets::open(&cfg.state_dir());
    let token = match Synapse::new(&cfg.synapse_local_url())
        .service_session(&secrets)
        .await
        .and_then(|_| secrets.read_named(SERVICE_TOKEN_FILE))
    {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot log in as the appliance's service account: {e:#}"),
                "fix the synapse check first",
            );
        }
    };
    // As a client asks: through the front door.
    let url = format!(
        "{}/_matrix/client/v3/voip/turnServer",
        crate::config::https_url(&cfg.hosts.matrix, ctx.net.https_port)
    );
    let creds = match get_json(
        ctx.net.http().get(&url).bearer_auth(token.expose()),
        NAME,
        &format!("GET {url}"),
        "Synapse hands out no TURN credentials: see `homelab-matrix status` and Synapse's log",
        "fix the delegation-client check first",
    )
    .await
    {
        Ok(v) => v,
        Err(c) => return c,
    };
    let (Some(user), Some(password), Some((host, port))) = (
        creds["username"].as_str(),
        creds["password"].as_str(),
        udp_uri(&creds["uris"]),
    ) else {
        return Check::fail(
            NAME,
            format!("Synapse's TURN answer has no UDP URI or credentials: {creds}"),
            "restart homelab-matrix: it writes Synapse's turn_uris and turn_shared_secret",
        );
    };
    let ip = match ctx.net.resolve(&host).await {
        Ok(ips) => ips[0],
        Err(e) => {
            return Check::fail(
                NAME,
                format!("{e:#}"),
                format!("{host} must resolve to this host's public address"),
            );
        }
    };
    let server = SocketAddr::new(ip, port);
    match allocate(server, user, password).await {
        Ok(Allocation::Relayed(relay)) => {
            let (lo, hi) = (cfg.turn.min_port, cfg.turn.max_port);
            let seen = format!(
                "Synapse's credentials allocated relay {relay} on turn:{host}:{port} ({server})"
            );
            if (lo..=hi).contains(&relay.port()) {
                Check::pass(NAME, format!("{seen}, in the relay range {lo}-{hi}"))
            } else {
                Check::warn(
                    NAME,
                    format!("{seen}, outside turn.min_port..max_port {lo}-{hi}"),
                    "",
                )
            }
        }
        Ok(Allocation::Refused(code, reason)) => Check::fail(
            NAME,
            format!("turn:{host}:{port} ({server}) refused Synapse's credentials: {code} {reason}"),
            if code == 401 {
                "coturn's static-auth-secret and Synapse's turn_shared_secret differ: restart homelab-matrix, which writes both from the same secret (state/secrets); an operator's synapse.d must not set turn_shared_secret"
            } else {
                "see coturn's log lines in `journalctl -u homelab-matrix`"
            },
        ),
        Err(e) => Check::fail(
            NAME,
            format!("turn:{host}:{port} ({server}): {e:#}"),
            format!("coturn must be running (`homelab-matrix status`) and UDP {port} open"),
        ),
    }
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

    /// RFC 5769 §2.4's sample? Its credentials are short-term; instead the integrity length
    /// rule: the header length counts the MESSAGE-INTEGRITY attribute when the HMAC is taken.
    #[test]
    fn message_integrity_covers_the_header_with_its_own_length() {
        let id = [1u8; 12];
        let m = Msg::new(ALLOCATE, &id)
            .attr(USERNAME, b"abc")
            .integrity(b"k");
        let len = u16::from_be_bytes([m.buf[2], m.buf[3]]) as usize;
        assert_eq!(len + 20, m.buf.len());
        let mut signed = m.buf[..m.buf.len() - 24].to_vec();
        signed[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"k"),
            &signed,
        );
        assert_eq!(&m.buf[m.buf.len() - 20..], tag.as_ref());
    }
}
