//! Synapse's worker processes (`[synapse] workers`): which processes run, what each does, the
//! config each reads, and which requests go to which.
//!
//! Everything here follows Synapse's docs/workers.md (element-hq/synapse @ a58ad44eb0, just
//! after 1.157.1): Redis for replication, an HTTP replication listener on every process (unix
//! sockets here, in Synapse's own directory), `instance_map`, stream writers, a federation
//! sender, a media repository, and the endpoint patterns a reverse proxy routes to generic
//! workers. tests/workers.rs checks the table against the Synapse this project pins (1.163.2):
//! the workers answer what is routed to them.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::Layout;

/// Synapse versions the endpoint table and the stream writers were read for (docs/workers.md
/// of 1.157) and tested with (1.163). Outside it the appliance warns at start: the table may
/// miss a new endpoint (it then goes to the main process, which still answers it) or name one
/// a worker no longer serves.
pub const WRITTEN_FOR: ((u32, u32), (u32, u32)) = ((1, 157), (1, 163));

/// What a worker process does. One process may do several (few workers), and the client role
/// may have several processes (many workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The writer of the streams docs/workers.md lets move off the main process and whose
    /// endpoints go to their writer: events, typing, to_device, account_data, receipts,
    /// presence.
    Writer,
    /// `federation_sender_instances`: sends to other servers.
    Sender,
    /// The media repository (`enable_media_repo` only there).
    Media,
    /// Inbound federation: transactions (`/send/`, by origin) and federation reads.
    Federation,
    /// Client reads, `/sync` (sticky by user), logins, event creation.
    Client,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Sender => "sender",
            Role::Media => "media",
            Role::Federation => "federation",
            Role::Client => "client",
        }
    }
}

/// The streams the writer writes (docs/workers.md "Stream writers").
pub const STREAMS: [&str; 6] = [
    "events",
    "typing",
    "to_device",
    "account_data",
    "receipts",
    "presence",
];

/// One worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// Synapse's `worker_name`, and the child's name after `synapse-`.
    pub name: String,
    pub roles: Vec<Role>,
    /// Its HTTP listener on 127.0.0.1 (client, federation and, on the media one, media).
    pub port: u16,
}

impl Worker {
    pub fn has(&self, r: Role) -> bool {
        self.roles.contains(&r)
    }

    /// The supervisor's name for it.
    pub fn child_name(&self) -> String {
        format!("synapse-{}", self.name)
    }

    /// Its replication listener (docs/workers.md: stream writers need one, and the main
    /// process reaches every worker through `instance_map`).
    pub fn replication_socket(&self, l: &Layout) -> PathBuf {
        l.data.join(format!("{}.replication.sock", self.name))
    }
}

/// The processes for `n` workers: every role has a process from one worker on, and more
/// workers first give each role its own process, then add client processes (where the load
/// of many users is: `/sync` and reads).
///
/// | n  | processes |
/// |----|-----------|
/// | 1  | writer+sender+media+federation+client |
/// | 2  | writer+sender+media, federation+client |
/// | 3  | writer, sender+media+federation, client |
/// | 4  | writer, sender+media, federation, client |
/// | 5+ | writer, sender, media, federation, client x (n-4) |
pub fn plan(n: u32, base_port: u16) -> Vec<Worker> {
    use Role::*;
    let groups: Vec<Vec<Role>> = match n {
        0 => vec![],
        1 => vec![vec![Writer, Sender, Media, Federation, Client]],
        2 => vec![vec![Writer, Sender, Media], vec![Federation, Client]],
        3 => vec![vec![Writer], vec![Sender, Media, Federation], vec![Client]],
        4 => vec![
            vec![Writer],
            vec![Sender, Media],
            vec![Federation],
            vec![Client],
        ],
        _ => {
            let mut g = vec![vec![Writer], vec![Sender], vec![Media], vec![Federation]];
            g.extend((4..n).map(|_| vec![Client]));
            g
        }
    };
    let mut clients = 0;
    groups
        .into_iter()
        .enumerate()
        .map(|(i, roles)| {
            let mut name = roles.iter().map(|r| r.word()).collect::<Vec<_>>().join("-");
            if roles == [Client] {
                clients += 1;
                if n > 5 {
                    name = format!("client{clients}");
                }
            }
            Worker {
                name,
                roles,
                port: base_port + i as u16,
            }
        })
        .collect()
}

/// The first worker with role `r`.
pub fn with_role(workers: &[Worker], r: Role) -> Option<&Worker> {
    workers.iter().find(|w| w.has(r))
}

/// Keys added to the shared homeserver.yaml when workers run (docs/workers.md "Shared
/// configuration", "Stream writers", `federation_sender_instances`, `enable_media_repo`).
pub fn shared_config(
    workers: &[Worker],
    l: &Layout,
    redis_socket: &Path,
    secret_path: &Path,
) -> Vec<(&'static str, Value)> {
    let Some(writer) = with_role(workers, Role::Writer) else {
        return vec![];
    };
    let sender = with_role(workers, Role::Sender).expect("every plan has a sender");
    let media = with_role(workers, Role::Media).expect("every plan has a media worker");
    let mut instances = serde_json::Map::new();
    instances.insert("main".into(), json!({"path": main_replication_socket(l)}));
    for w in workers {
        instances.insert(w.name.clone(), json!({"path": w.replication_socket(l)}));
    }
    let streams: serde_json::Map<String, Value> = STREAMS
        .iter()
        .map(|s| ((*s).to_string(), json!([writer.name])))
        .collect();
    vec![
        ("redis", json!({"enabled": true, "path": redis_socket})),
        ("instance_map", Value::Object(instances)),
        ("worker_replication_secret_path", json!(secret_path)),
        ("stream_writers", Value::Object(streams)),
        ("federation_sender_instances", json!([sender.name])),
        // The main process then leaves media alone (docs/workers.md, media_repository).
        ("enable_media_repo", json!(false)),
        ("media_instance_running_background_jobs", json!(media.name)),
    ]
}

/// The main process's replication listener, added to its listeners when workers run.
pub fn main_replication_socket(l: &Layout) -> PathBuf {
    l.data.join("main.replication.sock")
}

/// The replication listener entry for `path` (docs/usage/configuration "listeners": a unix
/// socket listener takes `path` instead of `port`).
pub fn replication_listener(path: &Path) -> Value {
    json!({"path": path, "type": "http", "resources": [{"names": ["replication"]}]})
}

/// A worker's own file, read after the shared one and the operator's overrides.
pub fn worker_config(w: &Worker, l: &Layout) -> Value {
    let mut names = vec!["client", "federation"];
    if w.has(Role::Media) {
        names.push("media");
    }
    let mut v = json!({
        "worker_app": "synapse.app.generic_worker",
        "worker_name": w.name,
        "worker_listeners": [
            {
                "type": "http",
                "port": w.port,
                "bind_addresses": ["127.0.0.1"],
                "x_forwarded": true,
                "resources": [{"names": names, "compress": false}],
            },
            replication_listener(&w.replication_socket(l)),
        ],
        // A worker does not read `log_config`; without this it logs in Python's default
        // format, a timestamp the journal already has.
        "worker_log_config": l.log_yaml(),
    });
    if w.has(Role::Media) {
        // The shared file turns the media repository off for every other process.
        v["enable_media_repo"] = json!(true);
    }
    v
}

/// Where a request that goes to a worker may go when that worker is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The main process serves it too.
    Main,
    /// Only a worker of that role can (the stream's writer, the media repository).
    Nobody,
}

/// How one of a role's processes is picked, when it has several (docs/workers.md "Load
/// balancing").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    Any,
    /// `/sync` and the other per-user streams: by the user in the access token.
    User,
    /// Pagination ("all requests for a given room must be routed to the same instance") and
    /// event sending: by the room ID in the path.
    Room,
    /// Inbound transactions, "balanced by source": by the origin server.
    Origin,
}

/// One line of the routing table: a regular expression of docs/workers.md, as written there.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub pattern: &'static str,
    pub role: Role,
    pub affinity: Affinity,
}

impl Role {
    pub fn fallback(self) -> Fallback {
        match self {
            Role::Writer | Role::Media => Fallback::Nobody,
            Role::Sender | Role::Federation | Role::Client => Fallback::Main,
        }
    }
}

const fn e(pattern: &'static str, role: Role, affinity: Affinity) -> Endpoint {
    Endpoint {
        pattern,
        role,
        affinity,
    }
}

use Affinity::{Any, Origin, Room, User};
use Role::{Client, Federation, Media, Writer};

/// The routing table, in docs/workers.md's words and order within each section; the first
/// line that matches wins, so the stream writers' and the media repository's come first.
/// What matches no line goes to the main process.
pub const ENDPOINTS: &[Endpoint] = &[
    // "The typing stream", "to_device", "account_data", "receipts", "presence".
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/typing",
        Writer,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/sendToDevice/",
        Writer,
        Any,
    ),
    e("^/_matrix/client/(r0|v3|unstable)/.*/tags", Writer, Any),
    e(
        "^/_matrix/client/(r0|v3|unstable)/.*/account_data",
        Writer,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/rooms/.*/receipt",
        Writer,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/rooms/.*/read_markers",
        Writer,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/presence/",
        Writer,
        Any,
    ),
    // "synapse.app.media_repository".
    e("^/_matrix/media/", Media, Any),
    e("^/_matrix/client/v1/media/", Media, Any),
    e("^/_matrix/federation/v1/media/", Media, Any),
    e("^/_synapse/admin/v1/purge_media_cache$", Media, Any),
    e("^/_synapse/admin/v1/room/.*/media.*$", Media, Any),
    e("^/_synapse/admin/v1/user/.*/media.*$", Media, Any),
    e("^/_synapse/admin/v1/media/.*$", Media, Any),
    e("^/_synapse/admin/v1/quarantine_media/.*$", Media, Any),
    e("^/_synapse/admin/v1/users/.*/media$", Media, Any),
    // "Inbound federation transaction request", then "Federation requests".
    e("^/_matrix/federation/v1/send/", Federation, Origin),
    e("^/_matrix/federation/v1/version$", Federation, Any),
    e("^/_matrix/federation/v1/event/", Federation, Any),
    e("^/_matrix/federation/v1/state/", Federation, Any),
    e("^/_matrix/federation/v1/state_ids/", Federation, Any),
    e("^/_matrix/federation/v1/backfill/", Federation, Any),
    e(
        "^/_matrix/federation/v1/get_missing_events/",
        Federation,
        Any,
    ),
    e("^/_matrix/federation/v1/publicRooms", Federation, Any),
    e("^/_matrix/federation/v1/query/", Federation, Any),
    e("^/_matrix/federation/v1/make_join/", Federation, Any),
    e("^/_matrix/federation/v1/make_leave/", Federation, Any),
    e("^/_matrix/federation/(v1|v2)/send_join/", Federation, Any),
    e("^/_matrix/federation/(v1|v2)/send_leave/", Federation, Any),
    e("^/_matrix/federation/v1/make_knock/", Federation, Any),
    e("^/_matrix/federation/v1/send_knock/", Federation, Any),
    e("^/_matrix/federation/(v1|v2)/invite/", Federation, Any),
    e("^/_matrix/federation/v1/event_auth/", Federation, Any),
    e(
        "^/_matrix/federation/v1/timestamp_to_event/",
        Federation,
        Any,
    ),
    e(
        "^/_matrix/federation/v1/exchange_third_party_invite/",
        Federation,
        Any,
    ),
    e("^/_matrix/federation/v1/user/devices/", Federation, Any),
    e("^/_matrix/key/v2/query", Federation, Any),
    e("^/_matrix/federation/v1/hierarchy/", Federation, Any),
    // "Sync requests": one worker per user.
    e("^/_matrix/client/(r0|v3)/sync$", Client, User),
    e("^/_matrix/client/(api/v1|r0|v3)/events$", Client, User),
    e("^/_matrix/client/(api/v1|r0|v3)/initialSync$", Client, User),
    e(
        "^/_matrix/client/(api/v1|r0|v3)/rooms/[^/]+/initialSync$",
        Client,
        User,
    ),
    // "Pagination requests": one worker per room.
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/messages$",
        Client,
        Room,
    ),
    // "Client API requests".
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/createRoom$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/publicRooms$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/joined_members$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/context/.*$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/members$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/state$",
        Client,
        Any,
    ),
    e("^/_matrix/client/v1/rooms/.*/hierarchy$", Client, Any),
    e(
        "^/_matrix/client/(v1|unstable)/rooms/.*/relations/",
        Client,
        Any,
    ),
    e("^/_matrix/client/v1/rooms/.*/threads$", Client, Any),
    e(
        "^/_matrix/client/unstable/im.nheko.summary/summary/.*$",
        Client,
        Any,
    ),
    e("^/_matrix/client/v1/room_summary/.*$", Client, Any),
    e(
        "^/_matrix/client/(r0|v3|unstable)/account/3pid$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/account/whoami$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/account/deactivate$",
        Client,
        Any,
    ),
    e("^/_matrix/client/(r0|v3)/delete_devices$", Client, Any),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/devices(/|$)",
        Client,
        Any,
    ),
    e("^/_matrix/client/versions$", Client, Any),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/voip/turnServer$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/event/",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/joined_rooms$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/v1/rooms/.*/timestamp_to_event$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable/.*)/rooms/.*/aliases",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/search$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/user/.*/filter(/|$)",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/directory/room/.*$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/capabilities$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/notifications$",
        Client,
        Any,
    ),
    // "Encryption requests".
    e("^/_matrix/client/(r0|v3|unstable)/keys/query$", Client, Any),
    e(
        "^/_matrix/client/(r0|v3|unstable)/keys/changes$",
        Client,
        Any,
    ),
    e("^/_matrix/client/(r0|v3|unstable)/keys/claim$", Client, Any),
    e("^/_matrix/client/(r0|v3|unstable)/room_keys/", Client, Any),
    e("^/_matrix/client/(r0|v3|unstable)/keys/upload", Client, Any),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/keys/device_signing/upload$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/keys/signatures/upload$",
        Client,
        Any,
    ),
    // "Registration/login requests".
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/login$",
        Client,
        Any,
    ),
    e("^/_matrix/client/(r0|v3|unstable)/register$", Client, Any),
    e(
        "^/_matrix/client/(r0|v3|unstable)/register/available$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/v1/register/m.login.registration_token/validity$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(r0|v3|unstable)/password_policy$",
        Client,
        Any,
    ),
    // "Event sending requests": by room, as the doc suggests.
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/redact",
        Client,
        Room,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/send",
        Client,
        Room,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/state/",
        Client,
        Room,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/(join|invite|leave|ban|unban|kick)$",
        Client,
        Room,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/join/",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/knock/",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/(api/v1|r0|v3|unstable)/profile/",
        Client,
        Any,
    ),
    // "User directory search requests", "Unstable MSC4140 support".
    e(
        "^/_matrix/client/(r0|v3|unstable)/user_directory/search$",
        Client,
        Any,
    ),
    e(
        "^/_matrix/client/unstable/org.matrix.msc4140/delayed_events(/.*/restart)?$",
        Client,
        Any,
    ),
];

/// Whether `version` ("1.163.2") is inside [`WRITTEN_FOR`]; None when it cannot be read.
pub fn checked_against(version: &str) -> Option<bool> {
    let mut it = version.split('.').map(|p| p.parse::<u32>().ok());
    let v = (it.next()??, it.next()??);
    let (lo, hi) = WRITTEN_FOR;
    Some(lo <= v && v <= hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_has_a_process_from_one_worker_on() {
        for n in 1..=10 {
            let p = plan(n, 8101);
            assert_eq!(p.len(), n as usize);
            for r in [
                Role::Writer,
                Role::Sender,
                Role::Media,
                Role::Federation,
                Role::Client,
            ] {
                assert!(with_role(&p, r).is_some(), "{n} workers: no {r:?}");
            }
            let mut names: Vec<_> = p.iter().map(|w| w.name.clone()).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), p.len(), "unique names: {p:?}");
            let ports: Vec<u16> = p.iter().map(|w| w.port).collect();
            assert_eq!(ports, (8101..8101 + n as u16).collect::<Vec<_>>());
        }
        assert!(plan(0, 8101).is_empty());
        assert_eq!(plan(2, 8101)[1].name, "federation-client");
        let six: Vec<_> = plan(6, 8101).into_iter().map(|w| w.name).collect();
        assert_eq!(
            six,
            [
                "writer",
                "sender",
                "media",
                "federation",
                "client1",
                "client2"
            ]
        );
    }

    #[test]
    fn the_shared_config_names_every_worker_and_the_streams_writer() {
        let l = Layout::new(Path::new("/var/lib/homelab-matrix"));
        let p = plan(3, 8101);
        let keys: serde_json::Map<String, Value> =
            shared_config(&p, &l, Path::new("/r/redis.sock"), Path::new("/s/secret"))
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(keys["redis"]["path"], "/r/redis.sock");
        let im = keys["instance_map"].as_object().unwrap();
        assert_eq!(im.len(), 4, "main and the three workers: {im:?}");
        assert!(
            im["main"]["path"]
                .as_str()
                .unwrap()
                .starts_with("/var/lib/homelab-matrix/synapse-data/")
        );
        for s in STREAMS {
            assert_eq!(keys["stream_writers"][s], json!(["writer"]), "{s}");
        }
        assert_eq!(
            keys["federation_sender_instances"],
            json!(["sender-media-federation"])
        );
        assert_eq!(keys["enable_media_repo"], false);
        let media = worker_config(&p[1], &l);
        assert_eq!(media["enable_media_repo"], true);
        assert_eq!(
            media["worker_listeners"][0]["resources"][0]["names"],
            json!(["client", "federation", "media"])
        );
        assert_eq!(
            media["worker_listeners"][0]["bind_addresses"],
            json!(["127.0.0.1"])
        );
        assert!(worker_config(&p[0], &l).get("enable_media_repo").is_none());
        assert!(shared_config(&[], &l, Path::new("/r"), Path::new("/s")).is_empty());
    }

    /// The role the first matching line names, as the front door's balancer picks it.
    fn role_of(path: &str) -> Option<Role> {
        let set = regex::RegexSet::new(ENDPOINTS.iter().map(|e| e.pattern)).unwrap();
        set.matches(path).iter().next().map(|i| ENDPOINTS[i].role)
    }

    #[test]
    fn the_table_sends_each_endpoint_to_its_role() {
        let c = "/_matrix/client/v3";
        for (path, role) in [
            (format!("{c}/sync"), Some(Role::Client)),
            (format!("{c}/rooms/!r:x/messages"), Some(Role::Client)),
            (
                format!("{c}/rooms/!r:x/send/m.room.message/t1"),
                Some(Role::Client),
            ),
            (format!("{c}/account/whoami"), Some(Role::Client)),
            (format!("{c}/rooms/!r:x/typing/@a:x"), Some(Role::Writer)),
            (
                format!("{c}/sendToDevice/m.room_key_request/t"),
                Some(Role::Writer),
            ),
            (
                format!("{c}/user/@a:x/account_data/m.direct"),
                Some(Role::Writer),
            ),
            (
                format!("{c}/user/@a:x/rooms/!r:x/account_data/t"),
                Some(Role::Writer),
            ),
            (
                format!("{c}/rooms/!r:x/receipt/m.read/$e"),
                Some(Role::Writer),
            ),
            (format!("{c}/presence/@a:x/status"), Some(Role::Writer)),
            (
                "/_matrix/client/v1/media/download/x/y".into(),
                Some(Role::Media),
            ),
            ("/_matrix/media/v3/upload".into(), Some(Role::Media)),
            (
                "/_matrix/federation/v1/media/download/m".into(),
                Some(Role::Media),
            ),
            (
                "/_matrix/federation/v1/send/123".into(),
                Some(Role::Federation),
            ),
            ("/_matrix/key/v2/query".into(), Some(Role::Federation)),
            // Left to the main process: not in docs/workers.md's lists.
            (format!("{c}/pushrules/"), None),
            (
                "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync".into(),
                None,
            ),
            ("/_synapse/admin/v1/registration_tokens/new".into(), None),
            ("/_matrix/key/v2/server".into(), None),
            ("/health".into(), None),
        ] {
            assert_eq!(role_of(&path), role, "{path}");
        }
        // The inbound transactions go by origin, /sync by user, pagination by room.
        let aff = |p: &str| {
            let set = regex::RegexSet::new(ENDPOINTS.iter().map(|e| e.pattern)).unwrap();
            ENDPOINTS[set.matches(p).iter().next().unwrap()].affinity
        };
        assert_eq!(aff("/_matrix/federation/v1/send/1"), Affinity::Origin);
        assert_eq!(aff(&format!("{c}/sync")), Affinity::User);
        assert_eq!(aff(&format!("{c}/rooms/!r:x/messages")), Affinity::Room);
    }

    #[test]
    fn versions_are_checked_against_the_table() {
        assert_eq!(checked_against("1.163.2"), Some(true));
        assert_eq!(checked_against("1.157.0"), Some(true));
        assert_eq!(checked_against("1.170.0"), Some(false));
        assert_eq!(checked_against("1.120.0"), Some(false));
        assert_eq!(checked_against("x"), None);
    }
}
