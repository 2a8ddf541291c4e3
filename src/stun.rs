//! STUN (RFC 8489): the message codec shared by the Binding client here (which learns this
//! host's public address for coturn's `external-ip` when `turn.external_ip = "auto"`) and the
//! doctor's TURN client (src/doctor/turn.rs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::UdpSocket;

/// RFC 8489 §5: the magic cookie in every message.
const MAGIC: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const MAPPED_ADDRESS: u16 = 0x0001;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const ERROR_CODE: u16 = 0x0009;

/// The class bits of a message type (RFC 8489 §5).
const CLASS_MASK: u16 = 0x0110;
pub const INDICATION: u16 = 0x0010;
pub const SUCCESS: u16 = 0x0100;
pub const ERROR: u16 = 0x0110;

/// A random transaction id (RFC 8489 §5: 96 bits, uniformly random).
pub fn new_id() -> Result<[u8; 12]> {
    let mut id = [0u8; 12];
    SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| anyhow::anyhow!("the OS random number generator failed"))?;
    Ok(id)
}

/// A STUN message being built: header, then attributes padded to 4 bytes.
pub struct Msg {
    pub buf: Vec<u8>,
}

impl Msg {
    /// `kind`: method and class bits together (e.g. 0x0001 Binding request).
    pub fn new(kind: u16, id: &[u8; 12]) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(&0u16.to_be_bytes());
        buf.extend_from_slice(&MAGIC.to_be_bytes());
        buf.extend_from_slice(id);
        Msg { buf }
    }

    pub fn attr(mut self, t: u16, v: &[u8]) -> Msg {
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

    /// An address attribute XORed with the magic cookie (and the id for IPv6), RFC 8489 §14.2.
    pub fn xor_addr(self, t: u16, addr: SocketAddr, id: &[u8; 12]) -> Msg {
        let mut v = vec![0u8];
        v.push(if addr.is_ipv4() { 1 } else { 2 });
        v.extend_from_slice(&(addr.port() ^ (MAGIC >> 16) as u16).to_be_bytes());
        let key = xor_key(id);
        match addr.ip() {
            IpAddr::V4(ip) => v.extend(ip.octets().iter().zip(&key).map(|(a, k)| a ^ k)),
            IpAddr::V6(ip) => v.extend(ip.octets().iter().zip(&key).map(|(a, k)| a ^ k)),
        }
        self.attr(t, &v)
    }

    /// RFC 8489 §14.5: HMAC-SHA1 over the message up to the attribute, the length already
    /// counting it; with long-term credentials the key is MD5(username ":" realm ":" password)
    /// (§9.2.2).
    pub fn integrity(self, key: &[u8]) -> Msg {
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

/// The cookie followed by the transaction id: what XOR-*-ADDRESS attributes are XORed with.
fn xor_key(id: &[u8; 12]) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC.to_be_bytes());
    key[4..].copy_from_slice(id);
    key
}

/// A parsed message: its type and attributes.
pub struct Answer {
    /// Method and class bits.
    pub kind: u16,
    pub id: [u8; 12],
    pub attrs: Vec<(u16, Vec<u8>)>,
}

impl Answer {
    pub fn parse(msg: &[u8]) -> Result<Answer> {
        if msg.len() < 20 || u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]) != MAGIC {
            bail!("not a STUN message");
        }
        let len = u16::from_be_bytes([msg[2], msg[3]]) as usize;
        let body = msg.get(20..20 + len).context("truncated STUN message")?;
        let mut attrs = vec![];
        let mut i = 0;
        while i + 4 <= body.len() {
            let t = u16::from_be_bytes([body[i], body[i + 1]]);
            let l = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
            let v = body
                .get(i + 4..i + 4 + l)
                .context("truncated STUN attribute")?;
            attrs.push((t, v.to_vec()));
            // Attributes are padded to 4 bytes (RFC 8489 §14).
            i += 4 + l.div_ceil(4) * 4;
        }
        Ok(Answer {
            kind: u16::from_be_bytes([msg[0], msg[1]]),
            id: msg[8..20].try_into().expect("12 bytes"),
            attrs,
        })
    }

    /// Parses an answer to transaction `id`.
    pub fn parse_for(msg: &[u8], id: &[u8; 12]) -> Result<Answer> {
        let a = Answer::parse(msg)?;
        if &a.id != id {
            bail!("a STUN answer to another request");
        }
        Ok(a)
    }

    pub fn class(&self) -> u16 {
        self.kind & CLASS_MASK
    }

    pub fn get(&self, t: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(a, _)| *a == t)
            .map(|(_, v)| v.as_slice())
    }

    /// ERROR-CODE (RFC 8489 §14.8): the code and its reason phrase.
    pub fn error(&self) -> Option<(u16, String)> {
        let v = self.get(ERROR_CODE)?;
        let code = (v.get(2)? & 7) as u16 * 100 + *v.get(3)? as u16;
        Some((code, String::from_utf8_lossy(&v[4..]).into_owned()))
    }

    /// An address attribute; `xor` for the XOR-*-ADDRESS kind (RFC 8489 §14.1, §14.2).
    pub fn addr(&self, t: u16, xor: bool) -> Option<SocketAddr> {
        let v = self.get(t)?;
        let key = if xor { xor_key(&self.id) } else { [0; 16] };
        let port =
            u16::from_be_bytes([*v.get(2)?, *v.get(3)?]) ^ u16::from_be_bytes([key[0], key[1]]);
        let ip = match v[1] {
            1 => {
                let b: [u8; 4] = v.get(4..8)?.try_into().ok()?;
                IpAddr::V4(Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|i| {
                    b[i] ^ key[i]
                })))
            }
            2 => {
                let b: [u8; 16] = v.get(4..20)?.try_into().ok()?;
                IpAddr::V6(Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|i| {
                    b[i] ^ key[i]
                })))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }
}

/// Asks `server` which address our packets come from. Returns (local, mapped): the address
/// this host sent from, and the one the server saw.
pub async fn binding(server: &str, timeout: Duration) -> Result<(IpAddr, IpAddr)> {
    let target = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("resolving {server}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("{server} has no IPv4 address"))?;
    let sock = UdpSocket::bind("0.0.0.0:0").await?;
    sock.connect(target).await?;
    let local = sock.local_addr()?.ip();
    let id = new_id()?;
    let req = Msg::new(BINDING_REQUEST, &id);
    let mut buf = [0u8; 1024];
    // UDP: ask again when no answer comes (RFC 8489 §6.2.1 retransmits), within `timeout`.
    const TRIES: u32 = 5;
    for _ in 0..TRIES {
        sock.send(&req.buf).await?;
        if let Ok(Ok(n)) = tokio::time::timeout(timeout / TRIES, sock.recv(&mut buf)).await {
            return Ok((local, parse_response(&buf[..n], &id)?));
        }
    }
    bail!("no answer from the STUN server {server}")
}

/// The mapped address from a Binding success response for transaction `id`.
pub fn parse_response(msg: &[u8], id: &[u8; 12]) -> Result<IpAddr> {
    let a = Answer::parse_for(msg, id)?;
    if a.kind != BINDING_SUCCESS {
        bail!("not a STUN Binding success response");
    }
    a.addr(XOR_MAPPED_ADDRESS, true)
        .or_else(|| a.addr(MAPPED_ADDRESS, false))
        .map(|s| s.ip())
        .context("no mapped address in the STUN response")
}

/// coturn's `external-ip` value: none when the host has its public address itself, else
/// "public/private" (coturn README: the relay's private address behind 1:1 NAT).
pub fn external_ip_setting(local: IpAddr, mapped: IpAddr) -> Option<String> {
    (local != mapped).then(|| format!("{mapped}/{local}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_xor_mapped_ipv4_address() {
        let id = [7u8; 12];
        let ip = [203u8, 0, 113, 9];
        let mut m = vec![];
        m.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
        m.extend_from_slice(&12u16.to_be_bytes());
        m.extend_from_slice(&MAGIC.to_be_bytes());
        m.extend_from_slice(&id);
        m.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
        m.extend_from_slice(&8u16.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0x12 ^ 0x21, 0x34 ^ 0x12]);
        for (b, k) in ip.iter().zip(MAGIC.to_be_bytes()) {
            m.push(b ^ k);
        }
        assert_eq!(parse_response(&m, &id).unwrap(), IpAddr::from(ip));
        assert!(
            parse_response(&m, &[8u8; 12]).is_err(),
            "another transaction's answer"
        );
    }

    #[test]
    fn xor_addresses_round_trip_for_both_families() {
        let id = [9u8; 12];
        for a in ["192.0.2.7:49160", "[2001:db8::5]:3478"] {
            let addr: SocketAddr = a.parse().unwrap();
            let m = Msg::new(0x0016, &id).xor_addr(0x0012, addr, &id);
            let parsed = Answer::parse(&m.buf).unwrap();
            assert_eq!(parsed.addr(0x0012, true), Some(addr));
            assert_ne!(
                parsed.addr(0x0012, false),
                Some(addr),
                "it is XORed on the wire"
            );
        }
    }

    /// RFC 8489 §14.5: the header length counts the MESSAGE-INTEGRITY attribute when the HMAC
    /// is taken.
    #[test]
    fn message_integrity_covers_the_header_with_its_own_length() {
        let id = [1u8; 12];
        let m = Msg::new(0x0003, &id).attr(0x0006, b"abc").integrity(b"k");
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

    #[test]
    fn nat_gives_public_slash_private() {
        let private: IpAddr = "192.168.1.20".parse().unwrap();
        let public: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            external_ip_setting(private, public).as_deref(),
            Some("203.0.113.9/192.168.1.20")
        );
        assert_eq!(external_ip_setting(public, public), None);
    }
}
