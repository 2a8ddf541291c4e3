//! A STUN Binding client (RFC 8489), just enough to learn this host's public address for
//! coturn's `external-ip` when `turn.external_ip = "auto"`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::UdpSocket;

/// RFC 8489 §5: the magic cookie in every message.
const MAGIC: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const MAPPED_ADDRESS: u16 = 0x0001;

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
    let mut id = [0u8; 12];
    SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| anyhow::anyhow!("the OS random number generator failed"))?;
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&MAGIC.to_be_bytes());
    req.extend_from_slice(&id);
    let mut buf = [0u8; 1024];
    // UDP: ask again when no answer comes (RFC 8489 §6.2.1 retransmits), within `timeout`.
    const TRIES: u32 = 5;
    for _ in 0..TRIES {
        sock.send(&req).await?;
        if let Ok(Ok(n)) = tokio::time::timeout(timeout / TRIES, sock.recv(&mut buf)).await {
            return Ok((local, parse_response(&buf[..n], &id)?));
        }
    }
    bail!("no answer from the STUN server {server}")
}

/// The mapped address from a Binding success response for transaction `id`.
pub fn parse_response(msg: &[u8], id: &[u8; 12]) -> Result<IpAddr> {
    if msg.len() < 20 || u16::from_be_bytes([msg[0], msg[1]]) != BINDING_SUCCESS {
        bail!("not a STUN Binding success response");
    }
    if u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]) != MAGIC || &msg[8..20] != id {
        bail!("a STUN response for another request");
    }
    let len = u16::from_be_bytes([msg[2], msg[3]]) as usize;
    let attrs = msg.get(20..20 + len).context("truncated STUN response")?;
    let mut i = 0;
    let mut plain = None;
    while i + 4 <= attrs.len() {
        let kind = u16::from_be_bytes([attrs[i], attrs[i + 1]]);
        let alen = u16::from_be_bytes([attrs[i + 2], attrs[i + 3]]) as usize;
        let v = attrs
            .get(i + 4..i + 4 + alen)
            .context("truncated STUN attribute")?;
        if (kind == XOR_MAPPED_ADDRESS || kind == MAPPED_ADDRESS) && v.len() >= 8 {
            let xor = kind == XOR_MAPPED_ADDRESS;
            let ip = match v[1] {
                0x01 => {
                    let mut a = [v[4], v[5], v[6], v[7]];
                    if xor {
                        for (b, m) in a.iter_mut().zip(MAGIC.to_be_bytes()) {
                            *b ^= m;
                        }
                    }
                    IpAddr::V4(Ipv4Addr::from(a))
                }
                0x02 if v.len() >= 20 => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&v[4..20]);
                    if xor {
                        let mut key = MAGIC.to_be_bytes().to_vec();
                        key.extend_from_slice(id);
                        for (b, m) in a.iter_mut().zip(key) {
                            *b ^= m;
                        }
                    }
                    IpAddr::V6(Ipv6Addr::from(a))
                }
                _ => bail!("unknown address family in STUN response"),
            };
            if xor {
                return Ok(ip);
            }
            plain = Some(ip);
        }
        // Attributes are padded to 4 bytes (RFC 8489 §14).
        i += 4 + alen.div_ceil(4) * 4;
    }
    plain.context("no mapped address in the STUN response")
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
