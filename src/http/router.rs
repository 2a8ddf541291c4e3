//! Where a request goes (DESIGN.md §2), decided from the listener, the host, the path and the
//! peer only, so it can be tested without sockets.

use std::borrow::Cow;
use std::net::IpAddr;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// :80, plain HTTP.
    Http,
    /// :443, clients and federation.
    Https,
    /// :8448, federation only.
    Federation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// RFC 8555 §8.3 HTTP-01 validation, answered from the challenge registry.
    AcmeChallenge(String),
    /// Everything else on :80 goes to https.
    RedirectHttps,
    WellKnownServer,
    WellKnownClient,
    /// Proxied to Synapse.
    Synapse,
    /// `/_synapse/admin` from outside the allowed networks.
    AdminForbidden,
    Element,
    /// The invite page (`crate::invite`), on the matrix host.
    Invite,
    Landing,
    NotFound,
    /// MatrixRTC's authorization service (`config::MATRIXRTC_PATH`; 404 unless configured).
    MatrixRtc,
}

/// The host names the front door serves.
#[derive(Debug, Clone)]
pub struct Hosts {
    pub server_name: String,
    pub matrix: String,
    pub element: String,
}

impl Hosts {
    pub fn served(&self, host: &str) -> bool {
        host == self.server_name || host == self.matrix || host == self.element
    }
}

/// The host of a request: the Host header or :authority, lowercased, without the port.
pub fn host_only(authority: &str) -> String {
    let a = authority.trim();
    let h = if let Some(rest) = a.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        a.rsplit_once(':').map_or(a, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                a
            }
        })
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Loopback, or inside one of the `admin_allow` networks.
pub fn admin_allowed(peer: IpAddr, allow: &[(IpAddr, u8)]) -> bool {
    let peer = peer.to_canonical();
    peer.is_loopback() || allow.iter().any(|(net, len)| in_network(peer, *net, *len))
}

fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The path that routing decides on: percent-decoded (every `%XX`, `%2F` included), dot
/// segments resolved (RFC 3986 §5.2.4) and empty segments dropped, so `/_synapse/%61dmin`,
/// `//_synapse/admin` and `/_synapse/x/../admin` all read `/_synapse/admin`. Only the decision
/// uses it: Synapse still gets the raw bytes (its reverse-proxy doc forbids normalising).
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let b = raw.as_bytes();
    let clean = b.first() == Some(&b'/')
        && !b.contains(&b'%')
        && !raw.contains("//")
        && !raw.contains("/.");
    if clean {
        return Cow::Borrowed(raw);
    }
    let decoded = percent_decode(raw);
    let mut out: Vec<&str> = vec![];
    let mut trailing = false;
    for seg in decoded.split('/') {
        trailing = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len() + 1);
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if trailing || out.is_empty() {
        path.push('/');
    }
    Cow::Owned(path)
}

/// `path` is `prefix` or lies below it.
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The path as Synapse's web framework dispatches on it: Twisted splits the raw path at its
/// literal slashes and percent-decodes each segment on its own (`Request.process`, `postpath`),
/// resolving no dot segments, and Synapse's servlets match their regexes on the raw path. So
/// `/_synapse/admin/v2/users/..%2F..%2F..%2F..%2F_matrix` reaches an admin servlet (the `..`s
/// are one user ID) although its normalized form reads `/_matrix`. Empty and `.` segments are
/// dropped, which only makes more paths look like `/_synapse/...`.
fn dispatch_path(raw: &str) -> String {
    let mut path = String::with_capacity(raw.len() + 1);
    for seg in raw.split('/').filter(|s| !matches!(*s, "" | ".")) {
        path.push('/');
        path.push_str(&percent_decode(seg));
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// Every `%XX` decoded (lossily: Synapse's own paths are ASCII); a malformed one is kept.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// `raw` is the request path as received. It is decided twice, on its normalized form and on
/// the form Synapse dispatches on ([`dispatch_path`]), and the stricter answer wins: a path
/// that either reading puts in a private tree is refused.
pub fn route(
    listener: Listener,
    hosts: &Hosts,
    host: &str,
    raw: &str,
    peer: IpAddr,
    admin_allow: &[(IpAddr, u8)],
) -> Route {
    let normalized = normalize_path(raw);
    let first = route_on(listener, hosts, host, raw, &normalized, peer, admin_allow);
    if matches!(normalized, Cow::Borrowed(_)) {
        // No `%`, `//` or `/.`: both readings are the same.
        return first;
    }
    let second = route_on(
        listener,
        hosts,
        host,
        raw,
        &dispatch_path(raw),
        peer,
        admin_allow,
    );
    match (first, second) {
        (a, b) if a == b => a,
        (Route::AdminForbidden, _) | (_, Route::AdminForbidden) => Route::AdminForbidden,
        (Route::NotFound, _) | (_, Route::NotFound) => Route::NotFound,
        (a, _) => a,
    }
}

fn route_on(
    listener: Listener,
    hosts: &Hosts,
    host: &str,
    raw: &str,
    path: &str,
    peer: IpAddr,
    admin_allow: &[(IpAddr, u8)],
) -> Route {
    // DESIGN.md §2: of Synapse's own `/_synapse` tree, only `/_synapse/client` (SSO pages,
    // password reset, consent) is public; the admin API and the rest (e.g. `/_synapse/mas`)
    // are for this host and the `admin_allow` networks.
    let synapse = || {
        if under(path, "/_synapse/client") || admin_allowed(peer, admin_allow) {
            Route::Synapse
        } else if under(path, "/_synapse/admin") {
            Route::AdminForbidden
        } else {
            Route::NotFound
        }
    };
    match listener {
        Listener::Http => match raw.strip_prefix("/.well-known/acme-challenge/") {
            Some(token) if !token.is_empty() && !token.contains('/') => {
                Route::AcmeChallenge(token.to_string())
            }
            _ => Route::RedirectHttps,
        },
        // Federation: server-server API and key queries only (Matrix spec, server-server API).
        Listener::Federation => {
            if under(path, "/_matrix/federation") || under(path, "/_matrix/key") {
                Route::Synapse
            } else {
                Route::NotFound
            }
        }
        Listener::Https => {
            if !hosts.served(host) {
                return Route::NotFound;
            }
            match path {
                "/.well-known/matrix/server" => return Route::WellKnownServer,
                "/.well-known/matrix/client" => return Route::WellKnownClient,
                _ => {}
            }
            if host == hosts.matrix {
                if under(path, "/_matrix") {
                    return Route::Synapse;
                }
                if under(path, "/_synapse") {
                    return synapse();
                }
                if under(path, crate::config::MATRIXRTC_PATH) {
                    return Route::MatrixRtc;
                }
                if under(path, crate::invite::PATH) {
                    return Route::Invite;
                }
            }
            if host == hosts.element {
                return Route::Element;
            }
            // The matrix host, or server_name only (delegated): well-known above, a landing
            // page otherwise.
            Route::Landing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Hosts {
        Hosts {
            server_name: "example.com".into(),
            matrix: "matrix.example.com".into(),
            element: "element.example.com".into(),
        }
    }

    const OUT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9));
    const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn r(l: Listener, host: &str, path: &str, peer: IpAddr) -> Route {
        route(l, &hosts(), host, path, peer, &[])
    }

    #[test]
    fn port_80_answers_challenges_and_redirects_the_rest() {
        assert_eq!(
            r(
                Listener::Http,
                "matrix.example.com",
                "/.well-known/acme-challenge/abc",
                OUT
            ),
            Route::AcmeChallenge("abc".into())
        );
        assert_eq!(
            r(
                Listener::Http,
                "matrix.example.com",
                "/_matrix/client/versions",
                OUT
            ),
            Route::RedirectHttps
        );
        assert_eq!(
            r(Listener::Http, "x", "/.well-known/acme-challenge/", OUT),
            Route::RedirectHttps
        );
    }

    #[test]
    fn matrix_host_proxies_the_apis_and_guards_admin() {
        assert_eq!(
            r(
                Listener::Https,
                "matrix.example.com",
                "/_matrix/client/versions",
                OUT
            ),
            Route::Synapse
        );
        assert_eq!(
            r(
                Listener::Https,
                "matrix.example.com",
                "/_synapse/client/pick_username",
                OUT
            ),
            Route::Synapse
        );
        assert_eq!(
            r(
                Listener::Https,
                "matrix.example.com",
                "/_synapse/admin/v1/registration_tokens",
                OUT
            ),
            Route::AdminForbidden
        );
        assert_eq!(
            r(
                Listener::Https,
                "matrix.example.com",
                "/_synapse/admin/v1/registration_tokens",
                LO
            ),
            Route::Synapse
        );
        assert_eq!(
            r(Listener::Https, "matrix.example.com", "/", OUT),
            Route::Landing
        );
        let allow = [("192.168.1.0".parse().unwrap(), 24)];
        let lan: IpAddr = "192.168.1.20".parse().unwrap();
        assert_eq!(
            route(
                Listener::Https,
                &hosts(),
                "matrix.example.com",
                "/_synapse/admin/v1/x",
                lan,
                &allow
            ),
            Route::Synapse
        );
        let other: IpAddr = "192.168.2.20".parse().unwrap();
        assert_eq!(
            route(
                Listener::Https,
                &hosts(),
                "matrix.example.com",
                "/_synapse/admin/v1/x",
                other,
                &allow
            ),
            Route::AdminForbidden
        );
    }

    #[test]
    fn ipv4_mapped_loopback_counts_as_loopback() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(admin_allowed(mapped, &[]));
    }

    #[test]
    fn well_known_on_every_served_host_and_element_on_its_own() {
        for h in ["example.com", "matrix.example.com"] {
            assert_eq!(
                r(Listener::Https, h, "/.well-known/matrix/server", OUT),
                Route::WellKnownServer
            );
            assert_eq!(
                r(Listener::Https, h, "/.well-known/matrix/client", OUT),
                Route::WellKnownClient
            );
        }
        assert_eq!(
            r(Listener::Https, "element.example.com", "/", OUT),
            Route::Element
        );
        assert_eq!(
            r(
                Listener::Https,
                "element.example.com",
                "/_matrix/client/versions",
                OUT
            ),
            Route::Element
        );
        assert_eq!(r(Listener::Https, "example.com", "/", OUT), Route::Landing);
        assert_eq!(
            r(
                Listener::Https,
                "evil.example.net",
                "/_matrix/client/versions",
                OUT
            ),
            Route::NotFound
        );
    }

    #[test]
    fn one_name_setups_route_by_path() {
        let one = Hosts {
            server_name: "chat.lan".into(),
            matrix: "chat.lan".into(),
            element: "chat.lan".into(),
        };
        let go = |p: &str| route(Listener::Https, &one, "chat.lan", p, OUT, &[]);
        assert_eq!(go("/_matrix/client/versions"), Route::Synapse);
        assert_eq!(go("/.well-known/matrix/client"), Route::WellKnownClient);
        assert_eq!(go("/"), Route::Element);
        assert_eq!(go("/_synapse/admin/v1/x"), Route::AdminForbidden);
        assert_eq!(go("/invite"), Route::Invite);
    }

    #[test]
    fn the_invite_page_is_on_the_matrix_host() {
        for p in ["/invite", "/invite/", "/invite/invite.js", "/invite/check"] {
            assert_eq!(
                r(Listener::Https, "matrix.example.com", p, OUT),
                Route::Invite,
                "{p}"
            );
        }
        assert_eq!(
            r(Listener::Https, "matrix.example.com", "/invitex", OUT),
            Route::Landing
        );
        assert_eq!(
            r(Listener::Https, "element.example.com", "/invite", OUT),
            Route::Element
        );
        assert_eq!(
            r(Listener::Federation, "matrix.example.com", "/invite", OUT),
            Route::NotFound
        );
    }

    #[test]
    fn federation_port_serves_federation_only() {
        assert_eq!(
            r(
                Listener::Federation,
                "matrix.example.com",
                "/_matrix/federation/v1/version",
                OUT
            ),
            Route::Synapse
        );
        assert_eq!(
            r(
                Listener::Federation,
                "matrix.example.com",
                "/_matrix/key/v2/server",
                OUT
            ),
            Route::Synapse
        );
        assert_eq!(
            r(
                Listener::Federation,
                "matrix.example.com",
                "/_matrix/client/versions",
                OUT
            ),
            Route::NotFound
        );
        assert_eq!(
            r(
                Listener::Federation,
                "matrix.example.com",
                "/_synapse/admin/v1/x",
                LO
            ),
            Route::NotFound
        );
    }

    #[test]
    fn paths_are_normalized_for_the_decision() {
        for (raw, want) in [
            ("/_matrix/client/versions", "/_matrix/client/versions"),
            ("/_synapse/%61dmin/v1/x", "/_synapse/admin/v1/x"),
            ("//_synapse/admin/v1/x", "/_synapse/admin/v1/x"),
            ("/_synapse/./admin/v1/x", "/_synapse/admin/v1/x"),
            ("/_synapse/foo/../admin", "/_synapse/admin"),
            ("/_synapse%2Fadmin%2fv1", "/_synapse/admin/v1"),
            ("/_synapse/%2e%2e/_synapse/admin/", "/_synapse/admin/"),
            ("/../../_synapse//admin", "/_synapse/admin"),
            ("/a/b/..", "/a/"),
            ("/%zz%4", "/%zz%4"),
            ("", "/"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
        assert!(matches!(
            normalize_path("/_matrix/client/v3/sync"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn disguised_admin_paths_are_refused_from_outside() {
        for p in [
            "/_synapse/%61dmin/v1/registration_tokens",
            "//_synapse/admin/v1/x",
            "/_synapse//admin/v1/x",
            "/_synapse/./admin/v1/x",
            "/_synapse/foo/../admin",
            "/_synapse%2Fadmin/v1/x",
            "/_synapse%2fadmin",
            "/_matrix/../_synapse/admin/v1/x",
            "/_matrix/%2e%2e/_synapse/admin/v1/x",
            "/_synapse/admin",
        ] {
            assert_eq!(
                r(Listener::Https, "matrix.example.com", p, OUT),
                Route::AdminForbidden,
                "{p}"
            );
            assert_eq!(
                r(Listener::Https, "matrix.example.com", p, LO),
                Route::Synapse,
                "{p}"
            );
        }
    }

    /// An encoded slash hides `..`s from Synapse's dispatch (they are inside one segment, an
    /// admin servlet's user ID), while the normalized form resolves them out of `/_synapse`:
    /// the stricter reading decides, on every listener.
    #[test]
    fn encoded_dot_segments_cannot_lead_out_of_the_admin_tree() {
        for p in [
            "/_synapse/admin/v2/users/..%2F..%2F..%2F..%2F_matrix/client/versions",
            "/_synapse/admin/v2/users/..%2f..%2f..%2f..%2f_matrix",
            "/_synapse/admin/v1/users/@a:b/devices/%2e%2e%2F%2e%2e%2F..%2F..%2F..%2F..%2F_matrix",
            "/_synapse/admin/v1/registration_tokens/..%2F..%2F..%2Fclient",
        ] {
            for peer in [OUT, LO] {
                let want = if peer == LO {
                    Route::Synapse
                } else {
                    Route::AdminForbidden
                };
                assert_eq!(
                    r(Listener::Https, "matrix.example.com", p, peer),
                    want,
                    "{p}"
                );
            }
        }
        let p = "/_synapse/admin/v2/users/..%2F..%2F..%2F..%2F_matrix/federation/v1/version";
        assert_eq!(
            r(Listener::Federation, "matrix.example.com", p, OUT),
            Route::NotFound
        );
        // Synapse's view: literal slashes split, each segment decoded, nothing resolved.
        assert_eq!(dispatch_path("/_synapse/a%2Fb/../c"), "/_synapse/a/b/../c");
        assert_eq!(dispatch_path("//x/./y/"), "/x/y");
        assert_eq!(dispatch_path(""), "/");
        // Legitimate encoded paths still reach Synapse.
        assert_eq!(
            r(
                Listener::Https,
                "matrix.example.com",
                "/_matrix/client/v3/rooms/%21r%3Ax/state/m.x/a%2Fb",
                OUT
            ),
            Route::Synapse
        );
    }

    #[test]
    fn only_synapse_client_is_public_under_synapse() {
        for p in [
            "/_synapse/client/pick_idp",
            "/_synapse/client/oidc/callback",
            "/_synapse//client/x",
        ] {
            assert_eq!(
                r(Listener::Https, "matrix.example.com", p, OUT),
                Route::Synapse,
                "{p}"
            );
        }
        for p in [
            "/_synapse/mas/x",
            "/_synapse/metrics",
            "/_synapse",
            "/_synapse/",
            "/_synapse/clientx",
            // Paths are case-sensitive (Twisted's resource tree is): not the admin API, but
            // not public either.
            "/_synapse/%41dmin/v1/x",
        ] {
            assert_eq!(
                r(Listener::Https, "matrix.example.com", p, OUT),
                Route::NotFound,
                "{p}"
            );
            assert_eq!(
                r(Listener::Https, "matrix.example.com", p, LO),
                Route::Synapse,
                "{p}"
            );
        }
        // The federation port decides on the normalized path too.
        assert_eq!(
            r(
                Listener::Federation,
                "matrix.example.com",
                "/_matrix/federation/../../_synapse/admin/v1/x",
                LO
            ),
            Route::NotFound
        );
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(host_only("Matrix.Example.com:443"), "matrix.example.com");
        assert_eq!(host_only("matrix.example.com."), "matrix.example.com");
        assert_eq!(host_only("[::1]:8448"), "::1");
        assert_eq!(host_only("matrix.example.com"), "matrix.example.com");
    }
}
