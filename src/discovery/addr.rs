//! Which addresses a name someone else chose may lead to: a discovered server on the
//! internet, not this host's loopback or its LAN (server-side request forgery).

use std::net::{IpAddr, SocketAddr};

/// An address the internet does not route to (RFC 6890's special-purpose registries):
/// loopback, private (RFC 1918, RFC 4193), link-local, shared (RFC 6598), unspecified,
/// multicast and broadcast, documentation and benchmarking ranges, IPv4 in IPv6.
pub fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let [a, b, ..] = v.octets();
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_multicast()
                || v.is_broadcast()
                || v.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v) => {
            if let Some(v4) = v.to_ipv4_mapped() {
                return internal(IpAddr::V4(v4));
            }
            let first = v.segments()[0];
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x2001 && v.segments()[1] == 0x0db8) // documentation
                || (first == 0 && v.segments()[..6].iter().all(|s| *s == 0)) // IPv4-compatible
        }
    }
}

/// The any-address of `of`'s family, port 0: where a socket that talks to `of` binds.
pub fn unspecified(of: SocketAddr) -> SocketAddr {
    let ip = if of.is_ipv4() {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    };
    SocketAddr::new(ip, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_the_internet_routes_are_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
        ] {
            assert!(internal(a.parse().unwrap()), "{a}");
        }
        for a in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(!internal(a.parse().unwrap()), "{a}");
        }
    }
}
