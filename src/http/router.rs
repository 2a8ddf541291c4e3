//! Where a request goes (DESIGN.md §2), decided from the listener, the host, the path and the
//! peer only, so it can be tested without sockets; and the handlers registered for each place.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::layers::{Access, AdminGuard, Layer, under};
use super::{Handler, Listener};

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
    Landing,
    /// The `n`th handler given to [`Router::mount`].
    Mounted(usize),
    NotFound,
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

/// Which served host a mounted handler answers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Matrix,
    Element,
    /// Any served host (server name, matrix, element).
    Any,
}

/// The routes that take a handler (the rest the front door answers itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    AcmeChallenge,
    WellKnownServer,
    WellKnownClient,
    Synapse,
    Element,
    Landing,
}

/// A handler with the layers in front of it.
pub struct Pipeline {
    pub layers: Vec<Arc<dyn Layer>>,
    pub handler: Handler,
}

/// Where requests go, and to what: the decision (listener, host, path, peer: testable without
/// sockets) and the handlers `app` registered for it. The front door itself imports no
/// feature module: what answers a route is given to it.
pub struct Router {
    hosts: Hosts,
    guard: AdminGuard,
    slots: HashMap<Slot, Pipeline>,
    /// In registration order; the first match wins.
    mounts: Vec<(Site, String, Pipeline)>,
}

impl Router {
    pub fn new(hosts: Hosts, guard: AdminGuard) -> Router {
        Router {
            hosts,
            guard,
            slots: HashMap::new(),
            mounts: vec![],
        }
    }

    pub fn hosts(&self) -> &Hosts {
        &self.hosts
    }

    /// Registers the handler of a built-in route, with the layers that route needs
    /// (Synapse: body limit, then forwarded headers).
    pub fn on(mut self, slot: Slot, layers: Vec<Arc<dyn Layer>>, handler: Handler) -> Router {
        self.slots.insert(slot, Pipeline { layers, handler });
        self
    }

    /// Serves `prefix` (and below it, on the normalized path) on `site` with `handler`,
    /// ahead of Synapse, Element and the landing page (not of the well-known files or the
    /// ACME challenges). E.g. `.mount(Site::Matrix, "/invite", invite::handler(..))`.
    pub fn mount(mut self, site: Site, prefix: &str, handler: Handler) -> Router {
        self.mounts.push((
            site,
            prefix.to_string(),
            Pipeline {
                layers: vec![],
                handler,
            },
        ));
        self
    }

    /// What answers `route`, if anything was registered for it.
    pub fn pipeline(&self, route: &Route) -> Option<&Pipeline> {
        let slot = match route {
            Route::AcmeChallenge(_) => Slot::AcmeChallenge,
            Route::WellKnownServer => Slot::WellKnownServer,
            Route::WellKnownClient => Slot::WellKnownClient,
            Route::Synapse => Slot::Synapse,
            Route::Element => Slot::Element,
            Route::Landing => Slot::Landing,
            Route::Mounted(i) => return self.mounts.get(*i).map(|(_, _, p)| p),
            Route::RedirectHttps | Route::AdminForbidden | Route::NotFound => return None,
        };
        self.slots.get(&slot)
    }

    /// `raw` is the request path as received. It is decided twice, on its normalized form
    /// and on the form Synapse dispatches on ([`dispatch_path`]), and the stricter answer
    /// wins: a path that either reading puts in a private tree is refused.
    pub fn route(&self, listener: Listener, host: &str, raw: &str, peer: IpAddr) -> Route {
        let normalized = normalize_path(raw);
        let first = self.route_on(listener, host, raw, &normalized, peer);
        if matches!(normalized, Cow::Borrowed(_)) {
            // No `%`, `//` or `/.`: both readings are the same.
            return first;
        }
        let second = self.route_on(listener, host, raw, &dispatch_path(raw), peer);
        match (first, second) {
            (a, b) if a == b => a,
            (Route::AdminForbidden, _) | (_, Route::AdminForbidden) => Route::AdminForbidden,
            (Route::NotFound, _) | (_, Route::NotFound) => Route::NotFound,
            (a, _) => a,
        }
    }

    fn route_on(
        &self,
        listener: Listener,
        host: &str,
        raw: &str,
        path: &str,
        peer: IpAddr,
    ) -> Route {
        let hosts = &self.hosts;
        let synapse = || match self.guard.check(path, peer) {
            Access::Allowed => Route::Synapse,
            Access::Forbidden => Route::AdminForbidden,
            Access::Hidden => Route::NotFound,
        };
        match listener {
            Listener::Http => match raw.strip_prefix(ACME_CHALLENGE) {
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
                let on_site = |site: Site| match site {
                    Site::Matrix => host == hosts.matrix,
                    Site::Element => host == hosts.element,
                    Site::Any => true,
                };
                if let Some(i) = self
                    .mounts
                    .iter()
                    .position(|(site, prefix, _)| on_site(*site) && under(path, prefix))
                {
                    return Route::Mounted(i);
                }
                if host == hosts.matrix {
                    if under(path, "/_matrix") {
                        return Route::Synapse;
                    }
                    if under(path, "/_synapse") {
                        return synapse();
                    }
                }
                if host == hosts.element {
                    return Route::Element;
                }
                // The matrix host, or server_name only (delegated): well-known above, a
                // landing page otherwise.
                Route::Landing
            }
        }
    }
}

/// RFC 8555 §8.3: where HTTP-01 validation asks on :80.
pub const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

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
    let decoded = crate::uri::percent_decode_lenient(raw);
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
        path.push_str(&crate::uri::percent_decode_lenient(seg));
    }
    if path.is_empty() {
        path.push('/');
    }
    path
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
        Router::new(hosts(), AdminGuard::default()).route(l, host, path, peer)
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
        let lan_router = Router::new(
            hosts(),
            AdminGuard::new(vec![("192.168.1.0".parse().unwrap(), 24)]),
        );
        let lan: IpAddr = "192.168.1.20".parse().unwrap();
        assert_eq!(
            lan_router.route(
                Listener::Https,
                "matrix.example.com",
                "/_synapse/admin/v1/x",
                lan
            ),
            Route::Synapse
        );
        let other: IpAddr = "192.168.2.20".parse().unwrap();
        assert_eq!(
            lan_router.route(
                Listener::Https,
                "matrix.example.com",
                "/_synapse/admin/v1/x",
                other
            ),
            Route::AdminForbidden
        );
    }

    #[test]
    fn ipv4_mapped_loopback_counts_as_loopback() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(AdminGuard::default().allowed(mapped));
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
        let one = Router::new(one, AdminGuard::default());
        let go = |p: &str| one.route(Listener::Https, "chat.lan", p, OUT);
        assert_eq!(go("/_matrix/client/versions"), Route::Synapse);
        assert_eq!(go("/.well-known/matrix/client"), Route::WellKnownClient);
        assert_eq!(go("/"), Route::Element);
        assert_eq!(go("/_synapse/admin/v1/x"), Route::AdminForbidden);
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
    fn mounts_answer_their_prefix_on_their_site_ahead_of_synapse() {
        let h = super::super::handler(|_req, _cx| async {
            super::super::full(http::StatusCode::OK, "text/plain", "x")
        });
        let rt = Router::new(hosts(), AdminGuard::default())
            .mount(Site::Matrix, "/invite", h.clone())
            .mount(Site::Any, "/_matrix/rtc", h);
        let go = |host: &str, p: &str| rt.route(Listener::Https, host, p, OUT);
        assert_eq!(go("matrix.example.com", "/invite"), Route::Mounted(0));
        assert_eq!(go("matrix.example.com", "/invite/x"), Route::Mounted(0));
        assert_eq!(go("matrix.example.com", "/invitex"), Route::Landing);
        assert_eq!(go("element.example.com", "/invite"), Route::Element);
        assert_eq!(
            go("element.example.com", "/_matrix/rtc/jwt"),
            Route::Mounted(1)
        );
        assert_eq!(
            go("matrix.example.com", "/_matrix/client/versions"),
            Route::Synapse
        );
        // Well-known files stay the front door's.
        assert_eq!(
            go("matrix.example.com", "/.well-known/matrix/client"),
            Route::WellKnownClient
        );
        assert!(rt.pipeline(&Route::Mounted(1)).is_some());
        assert!(rt.pipeline(&Route::Synapse).is_none());
    }
}
