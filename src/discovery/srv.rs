//! SRV lookups (RFC 2782) for server discovery's `_matrix-fed._tcp` and `_matrix._tcp`
//! records: one question over UDP to the system's nameserver (the first `nameserver` in
//! /etc/resolv.conf, resolv.conf(5)) or one given with `--nameserver`. Just the DNS message
//! codec that needs (RFC 1035 §4), not a resolver.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::UdpSocket;

/// RFC 1035 §3.2.2 / RFC 2782: the SRV record type, class IN.
const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;
const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// A query for the SRV records of `name`, recursion desired.
pub fn query(name: &str, id: u16) -> Result<Vec<u8>> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    // RD set (§4.1.1); one question, no other records.
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            bail!("{name:?} is not a DNS name");
        }
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&TYPE_SRV.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(m)
}

/// Reads a (possibly compressed, §4.1.4) name at `at`; returns it and the offset after it.
fn name(msg: &[u8], mut at: usize) -> Result<(String, usize)> {
    let mut labels: Vec<String> = vec![];
    let mut end = None;
    // Each pointer must go backwards, so a loop of pointers ends.
    let mut limit = at;
    loop {
        let len = *msg.get(at).context("a name runs past the message")? as usize;
        match len & 0xC0 {
            0x00 if len == 0 => {
                let next = end.unwrap_or(at + 1);
                return Ok((labels.join("."), next));
            }
            0x00 => {
                let l = msg
                    .get(at + 1..at + 1 + len)
                    .context("a label runs past the message")?;
                labels.push(String::from_utf8_lossy(l).into_owned());
                at += 1 + len;
            }
            0xC0 => {
                let lo = *msg.get(at + 1).context("a truncated name pointer")? as usize;
                let to = ((len & 0x3F) << 8) | lo;
                if to >= limit {
                    bail!("a name pointer that does not point back");
                }
                end.get_or_insert(at + 2);
                limit = to;
                at = to;
            }
            _ => bail!("an unknown label type"),
        }
    }
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16> {
    let b = msg.get(at..at + 2).context("the message is truncated")?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

/// The SRV records in an answer to query `id`, best first (lowest priority, then highest
/// weight: the doctor reports the one a remote server most likely picks). NXDOMAIN and an
/// empty answer are no records; another error code is an error.
pub fn parse(msg: &[u8], id: u16) -> Result<Vec<Srv>> {
    if msg.len() < 12 || u16_at(msg, 0)? != id {
        bail!("not an answer to our query");
    }
    if msg[2] & 0x80 == 0 {
        bail!("a query, not an answer");
    }
    match msg[3] & 0x0F {
        0 => {}
        3 => return Ok(vec![]),
        2 => bail!("the nameserver failed (SERVFAIL)"),
        5 => bail!("the nameserver refused the query (REFUSED)"),
        rc => bail!("the nameserver answered error code {rc}"),
    }
    let (qd, an) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = name(msg, at)?.1 + 4;
    }
    let mut out = vec![];
    for _ in 0..an {
        at = name(msg, at)?.1;
        let (kind, class) = (u16_at(msg, at)?, u16_at(msg, at + 2)?);
        let len = u16_at(msg, at + 8)? as usize;
        let data = at + 10;
        if msg.len() < data + len {
            bail!("a record runs past the message");
        }
        if kind == TYPE_SRV && class == CLASS_IN && len >= 7 {
            out.push(Srv {
                priority: u16_at(msg, data)?,
                weight: u16_at(msg, data + 2)?,
                port: u16_at(msg, data + 4)?,
                target: name(msg, data + 6)?.0,
            });
        }
        at = data + len;
    }
    out.sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)));
    Ok(out)
}

/// The first `nameserver` line of /etc/resolv.conf, on port 53.
pub fn system_nameserver() -> Result<SocketAddr> {
    let text =
        std::fs::read_to_string(RESOLV_CONF).with_context(|| format!("reading {RESOLV_CONF}"))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .with_context(|| format!("{RESOLV_CONF} names no nameserver"))
}

/// Asks `server` for the SRV records of `name` (retrying twice, 2 s apart, RFC 1035 §4.2.1).
/// A target of "." means "no such service here" (RFC 2782) and is left out.
pub async fn lookup(server: SocketAddr, name: &str) -> Result<Vec<Srv>> {
    let sock = UdpSocket::bind(super::addr::unspecified(server)).await?;
    sock.connect(server).await?;
    let mut id = [0u8; 2];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| anyhow::anyhow!("the OS random number generator failed"))?;
    let id = u16::from_be_bytes(id);
    let q = query(name, id)?;
    let mut buf = [0u8; 4096];
    for _ in 0..3 {
        sock.send(&q).await?;
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await {
            let records = parse(&buf[..n], id)?;
            return Ok(records
                .into_iter()
                .filter(|r| !r.target.is_empty())
                .collect());
        }
    }
    bail!("no answer from the nameserver {server}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as a nameserver sends it: the question echoed, the record's owner a pointer
    /// to it, and (as dnsmasq does) the target compressed against the question too.
    fn answer(id: u16, rcode: u8, records: &[(u16, u16, u16, &str)]) -> Vec<u8> {
        let mut m = query("_matrix-fed._tcp.example.org", id).unwrap();
        m[2] |= 0x80;
        m[3] = 0x80 | rcode;
        m[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (prio, weight, port, target) in records {
            m.extend_from_slice(&[0xC0, 12]);
            m.extend_from_slice(&TYPE_SRV.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&300u32.to_be_bytes());
            let mut rdata = vec![];
            rdata.extend_from_slice(&prio.to_be_bytes());
            rdata.extend_from_slice(&weight.to_be_bytes());
            rdata.extend_from_slice(&port.to_be_bytes());
            if let Some(first) = target.strip_suffix(".example.org") {
                rdata.push(first.len() as u8);
                rdata.extend_from_slice(first.as_bytes());
                // "example.org" begins after "_matrix-fed" and "_tcp": 12 + 1 + 11 + 1 + 4.
                rdata.extend_from_slice(&[0xC0, 29]);
            } else {
                for l in target.split('.').filter(|l| !l.is_empty()) {
                    rdata.push(l.len() as u8);
                    rdata.extend_from_slice(l.as_bytes());
                }
                rdata.push(0);
            }
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(&rdata);
        }
        m
    }

    #[test]
    fn the_query_is_one_srv_question_in_labels() {
        let q = query("_matrix-fed._tcp.example.org.", 0xBEEF).unwrap();
        assert_eq!(&q[..4], &[0xBE, 0xEF, 0x01, 0x00]);
        assert_eq!(&q[12..24], b"\x0b_matrix-fed");
        assert_eq!(&q[q.len() - 4..], &[0, 33, 0, 1]);
        assert!(query("a..b", 1).is_err());
    }

    #[test]
    fn records_are_read_through_compression_best_first() {
        let m = answer(
            7,
            0,
            &[
                (20, 0, 443, "b.example.org"),
                (10, 5, 8448, "matrix.example.org"),
                (10, 9, 8449, "other.net"),
            ],
        );
        let r = parse(&m, 7).unwrap();
        assert_eq!(
            r,
            vec![
                Srv {
                    priority: 10,
                    weight: 9,
                    port: 8449,
                    target: "other.net".into()
                },
                Srv {
                    priority: 10,
                    weight: 5,
                    port: 8448,
                    target: "matrix.example.org".into()
                },
                Srv {
                    priority: 20,
                    weight: 0,
                    port: 443,
                    target: "b.example.org".into()
                },
            ]
        );
    }

    #[test]
    fn nxdomain_is_no_record_and_other_errors_say_why() {
        assert_eq!(parse(&answer(1, 3, &[]), 1).unwrap(), vec![]);
        assert!(
            parse(&answer(1, 2, &[]), 1)
                .unwrap_err()
                .to_string()
                .contains("SERVFAIL")
        );
        assert!(
            parse(&answer(1, 0, &[]), 2).is_err(),
            "another query's answer"
        );
        let mut looped = answer(1, 0, &[(1, 1, 1, "x.example.org")]);
        let n = looped.len();
        looped[n - 2..].copy_from_slice(&[0xC0, (n - 2) as u8]);
        assert!(parse(&looped, 1).is_err(), "a pointer to itself");
    }

    #[test]
    fn a_dot_target_means_no_service() {
        let r = parse(&answer(3, 0, &[(0, 0, 0, ".")]), 3).unwrap();
        assert_eq!(r[0].target, "");
    }
}
