//! MatrixRTC's authorization service (MSC4195, the role of Element's lk-jwt-service): a
//! client of this server shows a Matrix OpenID token, Synapse vouches for it, and the answer
//! is a LiveKit access token for the call's LiveKit room on the SFU named by
//! `[matrixrtc] livekit_url`. Served by the front door under `config::MATRIXRTC_PATH` on the
//! matrix host; advertised in the well-known and Synapse's `matrix_rtc.transports` only when
//! configured.
//!
//! Endpoints (as lk-jwt-service's): `POST /get_token` (MSC4195), `POST /sfu/get` (the older
//! Element Call request), `GET /healthz`.
//!
//! This server's users' OpenID tokens are verified with our own Synapse, on loopback; a
//! user of another server's with that server over federation (`remote`, while
//! `remote_users` is on: Element Call asks the SFU's own service whenever it subscribes to
//! media on an SFU it does not publish on). Either only for a room they are joined to, and
//! ours only with an account that is active (asked of Synapse's admin API at every request).
//!
//! The appliance has no LiveKit server API client (only the `livekit-api` crate's access
//! tokens), so it does not create rooms on the SFU beforehand or take over a client's delayed
//! leave event: its tokens let its own users create the room by joining it (`roomCreate`);
//! remote users' tokens do not, which holds only if the SFU does not create rooms on any join
//! (LiveKit `room.auto_create: false`, as lk-jwt-service's README also asks).

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use http::{Method, StatusCode};
use livekit_api::access_token::{AccessToken, VideoGrants};
use serde::Deserialize;
use serde_json::{Value, json};

mod remote;

use crate::config::{self, Config};
use crate::secrets::Secrets;
use crate::synapse::admin::{Admin, AdminError, Synapse};

/// How long a minted LiveKit token is valid for joining (lk-jwt-service: an hour). LiveKit
/// checks it when a participant connects, not for the length of the call.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The legacy request has no slot; MSC4143 names the room-wide call slot so.
const LEGACY_SLOT: &str = "m.call#ROOM";

/// An answer: the status and a JSON body (a Matrix error on failure).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

fn error(status: StatusCode, errcode: &str, message: &str) -> Answer {
    Answer {
        status,
        body: json!({"errcode": errcode, "error": message}),
    }
}

#[derive(Debug, Deserialize)]
struct OpenIdToken {
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    matrix_server_name: String,
}

/// MSC4195's `member`: the call membership's ID and who it claims to be.
#[derive(Debug, Deserialize)]
struct Member {
    #[serde(default)]
    id: String,
    #[serde(default)]
    claimed_user_id: String,
    #[serde(default)]
    claimed_device_id: String,
}

/// The fields both requests may carry to hand their delayed leave event (MSC4140) over.
#[derive(Debug, Default, Deserialize)]
struct Delay {
    #[serde(default)]
    delay_id: String,
}

#[derive(Debug, Deserialize)]
struct GetToken {
    #[serde(default)]
    room_id: String,
    #[serde(default)]
    slot_id: String,
    openid_token: OpenIdToken,
    member: Member,
    #[serde(flatten)]
    delay: Delay,
}

#[derive(Debug, Deserialize)]
struct LegacyGet {
    #[serde(default)]
    room: String,
    openid_token: OpenIdToken,
    #[serde(default)]
    device_id: String,
    #[serde(flatten)]
    delay: Delay,
}

/// One request, whichever endpoint it came in on.
struct Ask {
    token: OpenIdToken,
    claimed_user: Option<String>,
    room: String,
    slot: String,
    /// The LiveKit identity, given the verified Matrix user.
    identity: Box<dyn Fn(&str) -> String + Send>,
}

pub struct Service {
    livekit_url: String,
    key_file: PathBuf,
    secret_file: PathBuf,
    server_name: String,
    synapse: Synapse,
    /// Where the appliance's admin account's token is kept: membership and account state
    /// are asked of Synapse's admin API with it.
    secrets: Secrets,
    /// That admin session, once made.
    admin: tokio::sync::Mutex<Option<Admin>>,
    focus: Value,
    /// Checks other servers' users' OpenID tokens on their servers; None: this server's
    /// users only (`remote_users = false`).
    remote: Option<remote::Verifier>,
}

impl Service {
    /// None unless `[matrixrtc]` is configured. `matrix_base` is the matrix host's URL as
    /// clients reach it.
    pub fn from_config(cfg: &Config, matrix_base: &str) -> Option<Service> {
        let focus = cfg.matrixrtc.focus(matrix_base)?;
        let rtc = &cfg.matrixrtc;
        let remote = rtc
            .remote_users
            .then(|| {
                let ca = Some(std::path::Path::new(&rtc.federation_ca_file))
                    .filter(|p| !p.as_os_str().is_empty());
                remote::Verifier::new(ca, rtc.allow_private_servers)
                    .inspect_err(|e| {
                        tracing::error!(
                            "MatrixRTC: users of other servers get no call tokens: {e:#}; fix matrixrtc.federation_ca_file (`homelab-matrix check-config` says what is wrong)"
                        )
                    })
                    .ok()
            })
            .flatten();
        Some(Service {
            remote,
            livekit_url: cfg.matrixrtc.livekit_url.clone(),
            key_file: cfg.matrixrtc.api_key_file.clone().into(),
            secret_file: cfg.matrixrtc.api_secret_file.clone().into(),
            server_name: cfg.server_name.clone(),
            synapse: Synapse::new(&cfg.synapse_local_url()),
            secrets: Secrets::open(&cfg.state_dir()),
            admin: tokio::sync::Mutex::new(None),
            focus,
        })
    }

    /// The focus this service is, as the well-known lists it.
    pub fn focus(&self) -> &Value {
        &self.focus
    }

    /// Answers a request under `MATRIXRTC_PATH`; `path` is what follows it.
    pub async fn answer(&self, method: &Method, path: &str, body: &[u8]) -> Answer {
        match (method, path) {
            // CORS preflight: Element Call asks from its own origin.
            (&Method::OPTIONS, _) => Answer {
                status: StatusCode::OK,
                body: json!({}),
            },
            (&Method::GET | &Method::HEAD, "/healthz") => Answer {
                status: StatusCode::OK,
                body: json!({}),
            },
            (&Method::POST, "/get_token") => match parse_get_token(body) {
                Ok(ask) => self.mint(ask).await,
                Err(a) => a,
            },
            (&Method::POST, "/sfu/get") => match parse_legacy(body) {
                Ok(ask) => self.mint(ask).await,
                Err(a) => a,
            },
            (_, "/get_token" | "/sfu/get" | "/healthz") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "use POST for tokens, GET for /healthz",
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
                "not served here: this authorization service has /get_token, /sfu/get and /healthz",
            ),
        }
    }

    async fn mint(&self, ask: Ask) -> Answer {
        let server = &ask.token.matrix_server_name;
        let local = *server == self.server_name;
        let user = if local {
            self.local_user(&ask.token.access_token).await
        } else {
            self.remote_user(server, &ask.token.access_token).await
        };
        let user = match user {
            Ok(u) => u,
            Err(refused) => return refused,
        };
        if ask.claimed_user.as_deref().is_some_and(|c| c != user) {
            return error(
                StatusCode::UNAUTHORIZED,
                "M_UNAUTHORIZED",
                "the OpenID token belongs to another user than member.claimed_user_id",
            );
        }
        if let Err(refused) = self.may_join(&ask.room, &user).await {
            return refused;
        }
        let (Some(key), Some(secret)) = (
            config::first_line(&self.key_file),
            config::first_line(&self.secret_file),
        ) else {
            tracing::error!(
                "MatrixRTC: cannot read the LiveKit API key ({}) or secret ({}); fix: write them there, one each, readable by root",
                self.key_file.display(),
                self.secret_file.display()
            );
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "M_UNKNOWN",
                "this server's LiveKit credentials are missing; its admin is told in the log",
            );
        };
        let room = room_alias(&ask.room, &ask.slot);
        let identity = (ask.identity)(&user);
        let grants = grants(local, &room);
        match AccessToken::with_api_key(&key, &secret)
            .with_identity(&identity)
            .with_ttl(TOKEN_TTL)
            .with_grants(grants)
            .to_jwt()
        {
            Ok(jwt) => {
                tracing::info!(%user, livekit_room = %room, publish = local, "MatrixRTC: LiveKit token issued");
                Answer {
                    status: StatusCode::OK,
                    body: json!({"url": self.livekit_url, "jwt": jwt}),
                }
            }
            Err(e) => {
                tracing::error!("MatrixRTC: minting a LiveKit token failed: {e}");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "M_UNKNOWN",
                    "minting the LiveKit token failed",
                )
            }
        }
    }
}

impl Service {
    /// The user our own Synapse says the OpenID token is for (on loopback).
    async fn local_user(&self, token: &str) -> Result<String, Answer> {
        match self.synapse.openid_userinfo(token).await {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(error(
                StatusCode::UNAUTHORIZED,
                "M_UNAUTHORIZED",
                "the OpenID token is not one this server issued, or it expired: ask for a new one (POST /_matrix/client/v3/user/{userId}/openid/request_token)",
            )),
            Err(e) => {
                tracing::warn!("MatrixRTC: cannot verify an OpenID token with Synapse: {e}");
                Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "M_UNKNOWN",
                    "the homeserver cannot verify OpenID tokens right now; try again shortly",
                ))
            }
        }
    }

    /// The user of `server` the token is for, as `server` itself says over federation.
    /// What goes wrong there is the remote side's (or the asker's): answered, logged at
    /// info, never a warning anyone on the internet could write into our journal.
    async fn remote_user(&self, server: &str, token: &str) -> Result<String, Answer> {
        let Some(verifier) = &self.remote else {
            return Err(error(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                &format!(
                    "this server's calls are for users of {}; a user of {server} joins through their own server's MatrixRTC focus",
                    self.server_name
                ),
            ));
        };
        match verifier.userinfo(server, token).await {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(error(
                StatusCode::UNAUTHORIZED,
                "M_UNAUTHORIZED",
                &format!(
                    "{server} does not vouch for this OpenID token: ask your server for a new one"
                ),
            )),
            Err(remote::RemoteError::NotAServerName(_)) => Err(bad_json(
                "openid_token.matrix_server_name is not a Matrix server name",
            )),
            Err(e) => {
                tracing::info!("MatrixRTC: a remote user's OpenID token could not be checked: {e}");
                Err(error(
                    StatusCode::UNAUTHORIZED,
                    "M_UNAUTHORIZED",
                    &format!("the OpenID token could not be checked with its server: {e}"),
                ))
            }
        }
    }
}

/// What a token lets its holder do in the call's LiveKit room. Our users may open the room
/// by joining it and publish; a user of another server only joins and watches (MSC4195: a
/// participant publishes on their own server's SFU and subscribes on others';
/// lk-jwt-service grants remote users the same).
fn grants(local: bool, room: &str) -> VideoGrants {
    VideoGrants {
        room_join: true,
        room: room.to_string(),
        room_create: local,
        can_publish: Some(local),
        can_publish_data: Some(local),
        can_subscribe: Some(true),
        ..Default::default()
    }
}

impl Service {
    /// The admin session (made once; made again when Synapse stops taking its token).
    async fn admin(&self, fresh: bool) -> Result<Admin, Answer> {
        let mut slot = self.admin.lock().await;
        if fresh || slot.is_none() {
            match self.synapse.service_session(&self.secrets).await {
                Ok(a) => *slot = Some(a),
                Err(e) => {
                    tracing::warn!("MatrixRTC: no admin session with Synapse: {e:#}");
                    return Err(unavailable());
                }
            }
        }
        Ok(slot.clone().expect("set above"))
    }

    /// A token only for a user joined to the room's call, with an account that is active
    /// (MSC4195; lk-jwt-service checks membership too). An OpenID token stays valid for up to
    /// an hour after it was issued, also once its account is deactivated or has left the
    /// room, so both are asked of Synapse now, on loopback, at every request.
    async fn may_join(&self, room: &str, user: &str) -> Result<(), Answer> {
        if !room.starts_with('!') {
            return Err(bad_json(
                "room_id is not a Matrix room ID (it starts with '!')",
            ));
        }
        let mut admin = self.admin(false).await?;
        for retry in [true, false] {
            let local = user
                .rsplit_once(':')
                .is_some_and(|(_, server)| server == self.server_name);
            let checked = async {
                if local {
                    let u = admin.get_user(user).await?;
                    if u.deactivated || u.locked {
                        return Ok(Some(false));
                    }
                }
                admin.is_joined(room, user).await
            }
            .await;
            return match checked {
                Ok(Some(true)) => Ok(()),
                Ok(Some(false)) | Ok(None) | Err(AdminError::NoSuchUser(_)) => Err(error(
                    StatusCode::FORBIDDEN,
                    "M_FORBIDDEN",
                    "a call's token is only for an active account joined to that room: join the room first",
                )),
                // The stored admin token stopped working: log in again, once.
                Err(AdminError::Api { status, .. })
                    if retry && status == StatusCode::UNAUTHORIZED =>
                {
                    admin = self.admin(true).await?;
                    continue;
                }
                Err(e) => {
                    tracing::warn!("MatrixRTC: cannot check room membership with Synapse: {e}");
                    Err(unavailable())
                }
            };
        }
        Err(unavailable())
    }
}

fn unavailable() -> Answer {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "M_UNKNOWN",
        "the homeserver cannot check room membership right now; try again shortly",
    )
}

/// What `status` says when no LiveKit server is configured.
pub const NOT_CONFIGURED: &str = "group calls in Element X and Element Call need a LiveKit server: set livekit_url, api_key_file and api_secret_file in [matrixrtc] (no MatrixRTC focus is advertised until then; 1:1 calls use TURN)";

/// Group calls as `status --json` shows them (`matrixrtc`).
pub fn status(cfg: &Config) -> Value {
    match cfg.matrixrtc.focus(&config::https_url(
        &cfg.hosts.matrix,
        cfg.public_https_port(),
    )) {
        None => json!({"configured": false, "note": NOT_CONFIGURED}),
        Some(focus) => json!({
            "configured": true,
            "livekit_url": cfg.matrixrtc.livekit_url,
            "service_url": focus["livekit_service_url"],
        }),
    }
}

/// The same as one line of `status`.
pub fn status_line(v: &Value) -> String {
    if v["configured"] == true {
        format!(
            "CALLS: MatrixRTC with LiveKit at {}, authorization service {}",
            v["livekit_url"].as_str().unwrap_or("?"),
            v["service_url"].as_str().unwrap_or("?")
        )
    } else {
        format!("CALLS: {}", v["note"].as_str().unwrap_or(NOT_CONFIGURED))
    }
}

fn bad_json(message: &str) -> Answer {
    error(StatusCode::BAD_REQUEST, "M_BAD_JSON", message)
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Answer> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            &format!("the request body is not the JSON expected: {e}"),
        )
    })
}

fn check_common(token: &OpenIdToken, delay: &Delay) -> Result<(), Answer> {
    if token.access_token.is_empty() || token.matrix_server_name.is_empty() {
        return Err(bad_json(
            "openid_token needs access_token and matrix_server_name",
        ));
    }
    if !delay.delay_id.is_empty() {
        // Taking a delayed leave event over needs the SFU's webhooks (lk-jwt-service's
        // delegation); without them the client keeps restarting its own (MSC4140).
        return Err(bad_json(
            "this server does not take over delayed leave events: restart the delayed event yourself and ask again without delay_id",
        ));
    }
    Ok(())
}

fn parse_get_token(body: &[u8]) -> Result<Ask, Answer> {
    let r: GetToken = parse(body)?;
    if r.room_id.is_empty() || r.slot_id.is_empty() {
        return Err(bad_json("the request needs room_id and slot_id"));
    }
    let m = &r.member;
    if m.id.is_empty() || m.claimed_user_id.is_empty() || m.claimed_device_id.is_empty() {
        return Err(bad_json(
            "member needs id, claimed_user_id and claimed_device_id",
        ));
    }
    check_common(&r.openid_token, &r.delay)?;
    let (device, member) = (m.claimed_device_id.clone(), m.id.clone());
    Ok(Ask {
        claimed_user: Some(m.claimed_user_id.clone()),
        token: r.openid_token,
        room: r.room_id,
        slot: r.slot_id,
        identity: Box::new(move |user| hashed(&[user, &device, &member])),
    })
}

fn parse_legacy(body: &[u8]) -> Result<Ask, Answer> {
    let r: LegacyGet = parse(body)?;
    if r.room.is_empty() {
        return Err(bad_json("the request needs room"));
    }
    check_common(&r.openid_token, &r.delay)?;
    let device = r.device_id;
    Ok(Ask {
        claimed_user: None,
        token: r.openid_token,
        room: r.room,
        slot: LEGACY_SLOT.into(),
        identity: Box::new(move |user| format!("{user}:{device}")),
    })
}

/// The LiveKit room of a Matrix room's call slot: the same for everyone in the call, and
/// computed as lk-jwt-service does, so clients that derive it themselves agree.
pub fn room_alias(room: &str, slot: &str) -> String {
    hashed(&[room, slot])
}

/// Unpadded base64 of the SHA-256 of the strings as a JSON array, as Go's encoding/json
/// writes it (it escapes `<`, `>`, `&`, U+2028 and U+2029; serde_json does not).
pub fn hashed(parts: &[&str]) -> String {
    let json = serde_json::to_string(parts)
        .expect("strings serialize")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029");
    let digest = ring::digest::digest(&ring::digest::SHA256, json.as_bytes());
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_hashed_as_go_writes_the_json() {
        // sha256(`["!room:example.org","m.call#ROOM"]`), unpadded base64.
        let expected = {
            let d = ring::digest::digest(
                &ring::digest::SHA256,
                br#"["!room:example.org","m.call#ROOM"]"#,
            );
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(d.as_ref())
        };
        assert_eq!(room_alias("!room:example.org", LEGACY_SLOT), expected);
        assert_eq!(hashed(&["a<b"]), {
            let d = ring::digest::digest(&ring::digest::SHA256, br#"["a\u003cb"]"#);
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(d.as_ref())
        });
        assert!(!room_alias("!r:x", "s").contains('='));
    }

    #[test]
    fn requests_are_checked_before_anyone_is_asked() {
        let no_member = br#"{"room_id":"!r:x","slot_id":"m.call#ROOM","openid_token":{"access_token":"t","matrix_server_name":"x"},"member":{"id":"","claimed_user_id":"@a:x","claimed_device_id":"D"}}"#;
        assert!(
            matches!(parse_get_token(no_member), Err(a) if a.status == StatusCode::BAD_REQUEST)
        );
        let delegated = br#"{"room":"!r:x","openid_token":{"access_token":"t","matrix_server_name":"x"},"device_id":"D","delay_id":"syd_1","delay_timeout":5000,"delay_cs_api_url":"https://x"}"#;
        let Err(a) = parse_legacy(delegated) else {
            panic!("a delegation was accepted")
        };
        assert_eq!(a.body["errcode"], "M_BAD_JSON");
        assert!(matches!(parse_legacy(b"not json"), Err(a) if a.body["errcode"] == "M_NOT_JSON"));
        let ok = parse_legacy(
            br#"{"room":"!r:x","openid_token":{"access_token":"t","matrix_server_name":"x"},"device_id":"DEV"}"#,
        )
        .unwrap_or_else(|a| panic!("{a:?}"));
        assert_eq!((ok.identity)("@a:x"), "@a:x:DEV");
        assert_eq!(ok.slot, LEGACY_SLOT);
    }
}
