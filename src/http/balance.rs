//! Which of several upstream processes answers a request to Synapse: a table of path patterns
//! (given by `app`, from Synapse's docs/workers.md), each naming a group of backends, how one is
//! picked when the group has several, and what happens when none of them is up. Backend 0 is
//! the main process; whatever matches no pattern goes there.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use http::header::AUTHORIZATION;
use http::{HeaderMap, Uri};
use regex::RegexSet;

/// How one backend of a group is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// Round robin.
    Any,
    /// By the user the access token names (the `syt_<localpart>_` of Synapse's tokens, as
    /// docs/workers.md's nginx example does), else by the whole token, else by address.
    User,
    /// By the room ID after `/rooms/` in the path.
    Room,
    /// By the origin in a federation request's `Authorization: X-Matrix origin=...`, else by
    /// address.
    Origin,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Rule {
    /// A regular expression on the request path as received.
    pub pattern: String,
    /// Indexes into the backends (never 0: that is the main process).
    pub backends: Vec<usize>,
    pub affinity: Affinity,
    /// When none of `backends` is up: the main process (true) or 503 (false).
    pub main_serves_it: bool,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pick {
    Backend(usize),
    /// Its backends are down and the main process cannot serve it.
    Unavailable,
}

pub struct Balancer {
    set: RegexSet,
    rules: Vec<Rule>,
    /// Per backend: whether it is up (set by whoever supervises them).
    up: Vec<Arc<AtomicBool>>,
    next: AtomicUsize,
}

impl Balancer {
    /// `backends` counts the main process. Every backend starts down but the main one.
    pub fn new(rules: Vec<Rule>, backends: usize) -> Result<Balancer, regex::Error> {
        let set = RegexSet::new(rules.iter().map(|r| &r.pattern))?;
        Ok(Balancer {
            set,
            rules,
            up: (0..backends)
                .map(|i| Arc::new(AtomicBool::new(i == 0)))
                .collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// The flag that says whether backend `i` is up.
    pub fn health(&self, i: usize) -> Arc<AtomicBool> {
        self.up[i].clone()
    }

    pub fn pick(&self, uri: &Uri, headers: &HeaderMap, peer: IpAddr) -> Pick {
        let path = uri.path();
        // The lowest index of the matching patterns: the first line of the table wins.
        let Some(i) = self.set.matches(path).iter().next() else {
            return Pick::Backend(0);
        };
        let rule = &self.rules[i];
        let is_up = |b: usize| self.up.get(b).is_some_and(|f| f.load(Ordering::Relaxed));
        let all = &rule.backends;
        let n = match rule.affinity {
            Affinity::Any => self.next.fetch_add(1, Ordering::Relaxed),
            Affinity::User => hash(user_key(headers, uri.query()).ok_or(peer)),
            Affinity::Room => hash(room_key(path).ok_or(peer)),
            Affinity::Origin => hash(origin_key(headers).ok_or(peer)),
        };
        // Sticky among all the group's backends, so that one being down moves only its own
        // users: a down pick goes to the next one up. Each flag is read once per candidate, so
        // a worker going down meanwhile only moves this request on.
        let first = n % all.len().max(1);
        match (0..all.len())
            .map(|k| all[(first + k) % all.len()])
            .find(|&b| is_up(b))
        {
            Some(b) => Pick::Backend(b),
            None if rule.main_serves_it => Pick::Backend(0),
            None => Pick::Unavailable,
        }
    }
}

fn hash(k: impl Hash) -> usize {
    let mut h = DefaultHasher::new();
    k.hash(&mut h);
    h.finish() as usize
}

/// The access token's user part, or the token. Synapse's tokens are
/// `syt_<base64 localpart>_<random>_<crc>` (synapse/handlers/auth.py, `generate_access_token`).
fn user_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| {
            query?
                .split('&')
                .find_map(|kv| kv.strip_prefix("access_token="))
        })?;
    Some(
        token
            .strip_prefix("syt_")
            .and_then(|t| t.split('_').next())
            .unwrap_or(token),
    )
}

/// The room ID after `/rooms/`.
fn room_key(path: &str) -> Option<&str> {
    path.split_once("/rooms/")?.1.split('/').next()
}

/// The `origin` of an `X-Matrix` Authorization (Matrix spec, server-server API
/// "Request Authentication").
fn origin_key(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let params = v.strip_prefix("X-Matrix ")?;
    params.split(',').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        (k == "origin").then(|| v.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                pattern: "^/_matrix/client/v3/rooms/.*/typing".into(),
                backends: vec![1],
                affinity: Affinity::Any,
                main_serves_it: false,
            },
            Rule {
                pattern: "^/_matrix/client/(r0|v3)/sync$".into(),
                backends: vec![2, 3, 4],
                affinity: Affinity::User,
                main_serves_it: true,
            },
            Rule {
                pattern: "^/_matrix/client/v3/rooms/.*/messages$".into(),
                backends: vec![2, 3, 4],
                affinity: Affinity::Room,
                main_serves_it: true,
            },
            Rule {
                pattern: "^/_matrix/federation/v1/send/".into(),
                backends: vec![2, 3],
                affinity: Affinity::Origin,
                main_serves_it: true,
            },
        ]
    }

    fn all_up(b: &Balancer, n: usize) {
        for i in 0..n {
            b.health(i).store(true, Ordering::Relaxed);
        }
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        h
    }

    fn u(s: &str) -> Uri {
        s.parse().unwrap()
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn unmatched_paths_go_to_the_main_process_and_the_first_rule_wins() {
        let b = Balancer::new(rules(), 5).unwrap();
        all_up(&b, 5);
        let h = HeaderMap::new();
        assert_eq!(
            b.pick(&u("/_matrix/client/v3/login"), &h, PEER),
            Pick::Backend(0)
        );
        assert_eq!(
            b.pick(&u("/_matrix/client/v3/rooms/!r:x/typing/@a:x"), &h, PEER),
            Pick::Backend(1)
        );
        // Anchored as written: a longer path is another endpoint.
        assert_eq!(
            b.pick(&u("/_matrix/client/v3/sync/x"), &h, PEER),
            Pick::Backend(0)
        );
    }

    #[test]
    fn sync_sticks_to_one_worker_per_user_across_devices() {
        let b = Balancer::new(rules(), 5).unwrap();
        all_up(&b, 5);
        let mut seen = std::collections::HashSet::new();
        for user in ["alice", "bob", "carol", "dave", "erin", "frank", "grace"] {
            let one = b.pick(
                &u("/_matrix/client/v3/sync"),
                &bearer(&format!("syt_{user}_aaaa_1")),
                PEER,
            );
            for device in ["bbbb_2", "cccc_3"] {
                let other = b.pick(
                    &u("/_matrix/client/v3/sync"),
                    &bearer(&format!("syt_{user}_{device}")),
                    PEER,
                );
                assert_eq!(one, other, "{user}'s devices on one worker");
            }
            seen.insert(one);
        }
        assert!(seen.len() > 1, "users spread over the workers: {seen:?}");
        // The token in the query string counts too.
        assert_eq!(
            b.pick(
                &u("/_matrix/client/v3/sync?access_token=syt_alice_zz_9"),
                &HeaderMap::new(),
                PEER
            ),
            b.pick(
                &u("/_matrix/client/v3/sync"),
                &bearer("syt_alice_aaaa_1"),
                PEER
            )
        );
    }

    #[test]
    fn a_down_worker_moves_only_its_own_users_and_a_writer_down_is_unavailable() {
        let b = Balancer::new(rules(), 5).unwrap();
        all_up(&b, 5);
        let users: Vec<String> = (0..30).map(|i| format!("syt_user{i}_x_1")).collect();
        let before: Vec<Pick> = users
            .iter()
            .map(|t| b.pick(&u("/_matrix/client/v3/sync"), &bearer(t), PEER))
            .collect();
        b.health(3).store(false, Ordering::Relaxed);
        for (t, was) in users.iter().zip(&before) {
            let now = b.pick(&u("/_matrix/client/v3/sync"), &bearer(t), PEER);
            if *was == Pick::Backend(3) {
                assert_ne!(now, Pick::Backend(3));
            } else {
                assert_eq!(now, *was, "{t} stays where it was");
            }
        }
        for i in [2, 4] {
            b.health(i).store(false, Ordering::Relaxed);
        }
        assert_eq!(
            b.pick(&u("/_matrix/client/v3/sync"), &bearer(&users[0]), PEER),
            Pick::Backend(0),
            "the main process serves /sync when no worker can"
        );
        b.health(1).store(false, Ordering::Relaxed);
        assert_eq!(
            b.pick(
                &u("/_matrix/client/v3/rooms/!r:x/typing/@a:x"),
                &HeaderMap::new(),
                PEER
            ),
            Pick::Unavailable
        );
    }

    #[test]
    fn pagination_by_room_and_transactions_by_origin() {
        let b = Balancer::new(rules(), 5).unwrap();
        all_up(&b, 5);
        let h = HeaderMap::new();
        for room in ["!a:x", "!b:x", "!c:x"] {
            let p = format!("/_matrix/client/v3/rooms/{room}/messages");
            let first = b.pick(&u(&p), &h, PEER);
            for _ in 0..5 {
                assert_eq!(b.pick(&u(&p), &bearer("syt_other_1_1"), PEER), first);
            }
        }
        let mut x = HeaderMap::new();
        x.insert(
            AUTHORIZATION,
            r#"X-Matrix origin="remote.example",destination="here",key="ed25519:a",sig="s""#
                .parse()
                .unwrap(),
        );
        let first = b.pick(&u("/_matrix/federation/v1/send/1"), &x, PEER);
        let other_peer: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(
            b.pick(&u("/_matrix/federation/v1/send/2"), &x, other_peer),
            first
        );
        assert_eq!(origin_key(&x), Some("remote.example"));
    }

    #[test]
    fn a_bad_pattern_is_an_error() {
        let mut r = rules();
        r[0].pattern = "(".into();
        assert!(Balancer::new(r, 5).is_err());
    }
}
