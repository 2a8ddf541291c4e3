//! Synapse's admin API, spoken over its loopback listener: shared-secret registration,
//! registration tokens and user accounts (list, show, deactivate, reset password, promote).
//! Also the appliance's own admin account, made once and kept.

use std::time::Duration;

use reqwest::StatusCode;
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::secrets::{Kind, Secret, Secrets};
use crate::units::{human_duration, parse_duration};

/// Localpart of the account the appliance uses for admin API calls.
pub const SERVICE_LOCALPART: &str = "homelab-matrix";
/// Settings that would take the service account's name (check-config and `run` say it).
pub fn config_problems(cfg: &crate::config::Config) -> Vec<crate::config::Problem> {
    if cfg.bot.localpart == SERVICE_LOCALPART {
        return vec![crate::config::Problem {
            key: "bot.localpart".into(),
            message: format!("{SERVICE_LOCALPART:?} is the appliance's own admin account"),
            fix: "keep the default \"registration-bot\" or pick another name".into(),
        }];
    }
    vec![]
}

/// Where its access token is kept, in the secrets dir.
pub const SERVICE_TOKEN_FILE: &str = "service_access_token";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach Synapse at {url}: {source}\n    fix: is homelab-matrix running? Check `homelab-matrix status` or `systemctl status homelab-matrix`"
    )]
    Unreachable { url: String, source: reqwest::Error },
    #[error("user {0} already exists")]
    UserInUse(String),
    #[error(
        "no registration token {0:?}\n    fix: `homelab-matrix token list` shows the tokens there are"
    )]
    NoSuchToken(String),
    #[error(
        "there is no user {0} on this server\n    fix: `homelab-matrix user list` shows the users there are"
    )]
    NoSuchUser(String),
    #[error("Synapse answered {status} to {what}: {errcode} {error}")]
    Api {
        what: String,
        status: StatusCode,
        errcode: String,
        error: String,
    },
}

/// A client for Synapse's loopback listener.
#[derive(Debug, Clone)]
pub struct Synapse {
    base: String,
    http: reqwest::Client,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Registered {
    pub user_id: String,
    pub access_token: String,
    pub device_id: Option<String>,
}

/// A registration token as Synapse's admin API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegistrationToken {
    pub token: String,
    pub uses_allowed: Option<u64>,
    pub pending: u64,
    pub completed: u64,
    /// Milliseconds since the epoch.
    pub expiry_time: Option<i64>,
}

impl RegistrationToken {
    /// "used 1 of 2, expires in 23h59m" at `now_ms` (milliseconds since the epoch).
    pub fn describe(&self, now_ms: i64) -> String {
        let uses = match self.uses_allowed {
            Some(n) => format!("used {} of {n}", self.completed),
            None => format!("used {} (unlimited)", self.completed),
        };
        let pending = if self.pending > 0 {
            format!(", {} registering now", self.pending)
        } else {
            String::new()
        };
        let expiry = match self.expiry_time {
            None => "never expires".to_string(),
            Some(ms) if ms <= now_ms => "expired".into(),
            Some(ms) => format!(
                "expires in {}",
                human_duration(Duration::from_millis((ms - now_ms) as u64))
            ),
        };
        format!("{uses}{pending}, {expiry}")
    }
}

/// How many registrations a new token allows: a number (1 or more) or "unlimited" (`None`).
pub fn parse_uses(s: &str) -> Result<Option<u64>, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(format!(
            "{s:?}: give a number of registrations (1 or more) or \"unlimited\""
        )),
    }
}

/// How long a new token stays valid: a duration such as 24h or 7d, or "never" (`None`).
/// Synapse refuses an expiry in the past, so zero is refused here already.
pub fn parse_expiry(s: &str) -> Result<Option<Duration>, String> {
    if s.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err(format!("{s:?}: a token must be valid for some time")),
        // Ten years: beyond that "never" says it better, and milliseconds stay in range.
        Ok(d) if d > Duration::from_secs(3650 * 86_400) => Err(format!(
            "{s:?} is more than ten years; say \"never\" instead"
        )),
        Ok(d) => Ok(Some(d)),
        Err(e) => Err(format!("{e}, or \"never\"")),
    }
}

/// Synapse's registration token alphabet (admin_api/registration_tokens.md): A-Z a-z 0-9 . _ ~ -
pub fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c))
}

/// The MAC of shared-secret registration (Synapse docs/admin_api/register_api.md): HMAC-SHA1
/// over nonce, user, password and "admin" or "notadmin", NUL-separated, hex.
pub fn registration_mac(
    secret: &str,
    nonce: &str,
    user: &str,
    password: &str,
    admin: bool,
) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(nonce.as_bytes());
    ctx.update(b"\x00");
    ctx.update(user.as_bytes());
    ctx.update(b"\x00");
    ctx.update(password.as_bytes());
    ctx.update(b"\x00");
    ctx.update(if admin { b"admin" } else { b"notadmin" });
    crate::secrets::hex(ctx.sign().as_ref())
}

/// Why a name given for a user cannot be used, known before asking Synapse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UserIdError {
    #[error(
        "{given:?} is not a user name: type the name, like `alice`, or the full user ID, like `@alice:{server}` (names have lowercase letters, digits and . _ = - /)"
    )]
    Malformed { given: String, server: String },
    #[error(
        "{given} is a user of {theirs}, not of this server: only users of {server} can be managed here; type one of them, like `@alice:{server}`"
    )]
    Remote {
        given: String,
        theirs: String,
        server: String,
    },
}

/// The local user ID for `alice`, `@alice` or `@alice:server_name`. Localparts are compared
/// lowercased, as Synapse's login does (Matrix spec, "User Identifiers": new localparts are
/// lowercase).
pub fn local_user_id(given: &str, server_name: &str) -> Result<String, UserIdError> {
    let malformed = || UserIdError::Malformed {
        given: given.to_string(),
        server: server_name.to_string(),
    };
    let trimmed = given.trim();
    let local = match trimmed.strip_prefix('@') {
        Some(rest) => match rest.split_once(':') {
            Some((local, server)) if !server.eq_ignore_ascii_case(server_name) => {
                if local.is_empty() || server.is_empty() {
                    return Err(malformed());
                }
                return Err(UserIdError::Remote {
                    given: trimmed.to_string(),
                    theirs: server.to_string(),
                    server: server_name.to_string(),
                });
            }
            Some((local, _)) => local,
            None => rest,
        },
        // `alice:server` is neither a name nor a user ID.
        None if trimmed.contains(':') => return Err(malformed()),
        None => trimmed,
    };
    let local = local.to_ascii_lowercase();
    if !crate::config::is_localpart(&local) {
        return Err(malformed());
    }
    Ok(format!("@{local}:{server_name}"))
}

/// Why an account must not be deactivated, demoted or given a new password: the appliance
/// itself logs in with it. `None` for everyone else.
pub fn protected_account(user_id: &str, server_name: &str, bot_localpart: &str) -> Option<String> {
    if user_id == format!("@{SERVICE_LOCALPART}:{server_name}") {
        Some(format!(
            "{user_id} is the appliance's own service account: homelab-matrix makes every admin call (tokens, users) with it, and its password is kept in the secrets dir; leave it as it is"
        ))
    } else if user_id == format!("@{bot_localpart}:{server_name}") {
        Some(format!(
            "{user_id} is the registration bot's account, which needs its admin rights and its stored password; to turn the bot off, set bot.enabled = false in the config instead"
        ))
    } else {
        None
    }
}

/// One account as Synapse's admin API describes it ("List Accounts" and "Query User Account").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserInfo {
    /// The user ID.
    pub name: String,
    pub displayname: Option<String>,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub deactivated: bool,
    /// Deactivated with erasure: their messages are served redacted to later joiners.
    #[serde(default)]
    pub erased: bool,
    #[serde(default)]
    pub is_guest: bool,
    #[serde(default)]
    pub locked: bool,
    pub user_type: Option<String>,
    /// Milliseconds since the epoch.
    pub creation_ts: Option<i64>,
    /// Milliseconds since the epoch; `None` when Synapse has not seen the user (yet).
    pub last_seen_ts: Option<i64>,
}

impl UserInfo {
    /// Deactivating again would change nothing: already deactivated, and erased too when
    /// erasure is asked for (Synapse can erase an account deactivated without it).
    pub fn already_deactivated(&self, erase: bool) -> bool {
        self.deactivated && (self.erased || !erase)
    }
}

/// One device of a user (admin API "List all devices").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Device {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ip: Option<String>,
    /// Milliseconds since the epoch.
    pub last_seen_ts: Option<i64>,
    pub last_seen_user_agent: Option<String>,
}

/// `user show`: the account, its devices, and how many rooms it is in.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UserDetails {
    #[serde(flatten)]
    pub user: UserInfo,
    pub devices: Vec<Device>,
    pub joined_rooms: u64,
}

/// Which accounts `list_users` returns. Synapse's defaults differ: it lists guests unless
/// told not to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UserFilter {
    pub deactivated: bool,
    pub guests: bool,
    /// Only server admins.
    pub admins_only: bool,
}

/// How many accounts one "List Accounts" request asks for (Synapse's default page).
pub const USER_PAGE: usize = 100;

impl Synapse {
    pub fn new(base: &str) -> Synapse {
        let http = reqwest::Client::builder()
            // Loopback only: an HTTP(S)_PROXY in root's environment must not divert it.
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("building the HTTP client");
        Synapse {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Value), AdminError> {
        let resp = req.send().await.map_err(|source| AdminError::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok((status, body));
        }
        let errcode = body["errcode"].as_str().unwrap_or("").to_string();
        let error = body["error"].as_str().unwrap_or("").to_string();
        Err(AdminError::Api {
            what: what.to_string(),
            status,
            errcode,
            error,
        })
    }

    /// The running Synapse's version (Synapse admin API "Server Version", no auth needed).
    pub async fn server_version(&self) -> Result<String, AdminError> {
        let req = self.http.get(self.url("/_synapse/admin/v1/server_version"));
        let (_, v) = self.call("asking Synapse's version", req).await?;
        Ok(v["server_version"].as_str().unwrap_or_default().to_string())
    }

    /// Whose OpenID token `token` is (Matrix spec, server-server API "OpenID":
    /// `GET /_matrix/federation/v1/openid/userinfo`), or None when Synapse does not know it
    /// (made up, or expired: Synapse's tokens live an hour).
    pub async fn openid_userinfo(&self, token: &str) -> Result<Option<String>, AdminError> {
        // The token is whatever the caller sent.
        let token = crate::uri::percent_encode(token);
        let req = self.http.get(self.url(&format!(
            "/_matrix/federation/v1/openid/userinfo?access_token={token}"
        )));
        match self.call("OpenID userinfo", req).await {
            Ok((_, v)) => Ok(v["sub"].as_str().map(str::to_string)),
            Err(AdminError::Api { status, .. }) if status == StatusCode::UNAUTHORIZED => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Registers a user with the shared secret (no existing admin needed).
    pub async fn register_with_secret(
        &self,
        secret: &Secret,
        user: &str,
        password: &str,
        admin: bool,
    ) -> Result<Registered, AdminError> {
        let path = "/_synapse/admin/v1/register";
        let (_, n) = self
            .call("GET nonce", self.http.get(self.url(path)))
            .await?;
        let nonce = n["nonce"].as_str().unwrap_or_default();
        let mac = registration_mac(secret.expose(), nonce, user, password, admin);
        let body = json!({
            "nonce": nonce, "username": user, "password": password, "admin": admin, "mac": mac,
        });
        match self
            .call(
                "shared-secret registration",
                self.http.post(self.url(path)).json(&body),
            )
            .await
        {
            Ok((_, v)) => Ok(serde_json::from_value(v).map_err(|e| AdminError::Api {
                what: "shared-secret registration".into(),
                status: StatusCode::OK,
                errcode: "M_BAD_JSON".into(),
                error: e.to_string(),
            })?),
            Err(AdminError::Api { errcode, .. }) if errcode == "M_USER_IN_USE" => {
                Err(AdminError::UserInUse(user.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    pub async fn login(&self, user: &str, password: &str) -> Result<Registered, AdminError> {
        self.login_device(user, password, None, "homelab-matrix")
            .await
    }

    /// Password login; with `device_id`, into that existing device (its end-to-end keys stay
    /// valid; Matrix spec, client-server API "Login": a known device ID is reused).
    pub async fn login_device(
        &self,
        user: &str,
        password: &str,
        device_id: Option<&str>,
        display_name: &str,
    ) -> Result<Registered, AdminError> {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "initial_device_display_name": display_name,
        });
        if let Some(d) = device_id {
            body["device_id"] = json!(d);
        }
        let (_, v) = self
            .call(
                "login",
                self.http
                    .post(self.url("/_matrix/client/v3/login"))
                    .json(&body),
            )
            .await?;
        serde_json::from_value(v).map_err(|e| AdminError::Api {
            what: "login".into(),
            status: StatusCode::OK,
            errcode: "M_BAD_JSON".into(),
            error: e.to_string(),
        })
    }

    pub async fn whoami(&self, token: &str) -> Result<String, AdminError> {
        let (_, v) = self
            .call(
                "whoami",
                self.http
                    .get(self.url("/_matrix/client/v3/account/whoami"))
                    .bearer_auth(token),
            )
            .await?;
        Ok(v["user_id"].as_str().unwrap_or_default().to_string())
    }

    /// Makes sure the appliance's own admin account exists and returns a working access token.
    /// The token is kept in the secrets dir; if it stops working, log in again with the stored
    /// password rather than making a new account.
    pub async fn service_session(&self, secrets: &Secrets) -> anyhow::Result<Admin> {
        use anyhow::Context;
        if let Ok(t) = secrets.read_named(SERVICE_TOKEN_FILE)
            && self.whoami(t.expose()).await.is_ok()
        {
            return Ok(Admin {
                synapse: self.clone(),
                token: t,
            });
        }
        let password = secrets.get(Kind::ServicePassword)?;
        let shared = secrets.get(Kind::RegistrationShared)?;
        let token = match self
            .register_with_secret(&shared, SERVICE_LOCALPART, password.expose(), true)
            .await
        {
            Ok(r) => {
                tracing::info!(user = %r.user_id, "created the appliance's admin account");
                r.access_token
            }
            Err(AdminError::UserInUse(_)) => self
                .login(SERVICE_LOCALPART, password.expose())
                .await
                .with_context(|| {
                    format!(
                        "the account {SERVICE_LOCALPART} exists but does not accept the password in {}; reset its password with Synapse's admin API, or deactivate it",
                        secrets.path(Kind::ServicePassword).display()
                    )
                })?
                .access_token,
            Err(e) => return Err(e).context("creating the appliance's admin account"),
        };
        let token = Secret::new(token);
        secrets.write_named(SERVICE_TOKEN_FILE, &token)?;
        Ok(Admin {
            synapse: self.clone(),
            token,
        })
    }
}

/// An admin session: the registration-token and user-account APIs.
#[derive(Debug, Clone)]
pub struct Admin {
    synapse: Synapse,
    token: Secret,
}

const TOKENS: &str = "/_synapse/admin/v1/registration_tokens";
const USERS: &str = "/_synapse/admin/v2/users";
const USERS_V1: &str = "/_synapse/admin/v1/users";

/// Percent-encodes what may not stand in one path segment ('/' is legal in a localpart).
fn path_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@:._-~=".contains(c) {
                c.to_string()
            } else {
                let mut b = [0u8; 4];
                c.encode_utf8(&mut b)
                    .bytes()
                    .map(|x| format!("%{x:02X}"))
                    .collect()
            }
        })
        .collect()
}

impl Admin {
    /// An admin session from an access token of a server admin (e.g. the bot's own).
    pub fn with_token(synapse: &Synapse, token: Secret) -> Admin {
        Admin {
            synapse: synapse.clone(),
            token,
        }
    }

    /// The session's access token, for a request made as this account outside these calls
    /// (the doctor asks `/voip/turnServer` through the front door as a client would).
    pub fn token(&self) -> &Secret {
        &self.token
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.bearer_auth(self.token.expose())
    }

    pub async fn create_token(
        &self,
        token: Option<&str>,
        uses_allowed: Option<u64>,
        expiry_time_ms: Option<i64>,
    ) -> Result<RegistrationToken, AdminError> {
        let mut body = serde_json::Map::new();
        if let Some(t) = token {
            body.insert("token".into(), json!(t));
        }
        if let Some(u) = uses_allowed {
            body.insert("uses_allowed".into(), json!(u));
        }
        if let Some(e) = expiry_time_ms {
            body.insert("expiry_time".into(), json!(e));
        }
        let s = &self.synapse;
        let (_, v) = s
            .call(
                "creating a registration token",
                self.authed(s.http.post(s.url(&format!("{TOKENS}/new"))).json(&body)),
            )
            .await?;
        parse(v)
    }

    pub async fn list_tokens(&self) -> Result<Vec<RegistrationToken>, AdminError> {
        self.list_tokens_where(None).await
    }

    /// `Some(true)`: only tokens that can still register someone (uses left, not expired), by
    /// Synapse's own rule; `Some(false)`: only the others; `None`: all.
    pub async fn list_tokens_where(
        &self,
        valid: Option<bool>,
    ) -> Result<Vec<RegistrationToken>, AdminError> {
        let s = &self.synapse;
        let url = match valid {
            Some(v) => format!("{TOKENS}?valid={v}"),
            None => TOKENS.to_string(),
        };
        let (_, v) = s
            .call(
                "listing registration tokens",
                self.authed(s.http.get(s.url(&url))),
            )
            .await?;
        parse(v["registration_tokens"].clone())
    }

    /// Whether `user_id` is a server admin of this homeserver (admin API "Query User Account",
    /// GET /_synapse/admin/v2/users/<user_id>). Unknown and remote users are not.
    pub async fn is_server_admin(&self, user_id: &str) -> Result<bool, AdminError> {
        match self.get_user(user_id).await {
            Ok(u) => Ok(u.admin && !u.deactivated),
            Err(AdminError::NoSuchUser(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The server admins (active accounts), by user ID.
    pub async fn server_admins(&self) -> Result<Vec<String>, AdminError> {
        let filter = UserFilter {
            admins_only: true,
            ..UserFilter::default()
        };
        Ok(self
            .list_users(filter)
            .await?
            .into_iter()
            .map(|u| u.name)
            .collect())
    }

    /// Every local account the filter admits, sorted by user ID: "List Accounts" (v2) page by
    /// page, each `next_token` passed back as `from` until there is none (Synapse
    /// docs/admin_api/user_admin_api.md), so any number of users is listed.
    pub async fn list_users(&self, filter: UserFilter) -> Result<Vec<UserInfo>, AdminError> {
        let s = &self.synapse;
        let mut out: Vec<UserInfo> = vec![];
        let mut from = "0".to_string();
        loop {
            // v2's `deactivated=true` means "include deactivated ones too".
            let mut url = format!(
                "{USERS}?from={from}&limit={USER_PAGE}&order_by=name&guests={}&deactivated={}",
                filter.guests, filter.deactivated
            );
            if filter.admins_only {
                url.push_str("&admins=true");
            }
            let (_, v) = s
                .call("listing users", self.authed(s.http.get(s.url(&url))))
                .await?;
            let page: Vec<UserInfo> = parse(v["users"].clone())?;
            let got = page.len();
            out.extend(page);
            match v["next_token"].as_str() {
                // An empty page with a token would loop for ever.
                // Synapse's token is the offset of the next page, a number.
                Some(next) if got > 0 => from = next.to_string(),
                _ => return Ok(out),
            }
        }
    }

    /// One account; `NoSuchUser` when there is none (or it is not local).
    pub async fn get_user(&self, user_id: &str) -> Result<UserInfo, AdminError> {
        let s = &self.synapse;
        let url = s.url(&format!("{USERS}/{}", path_escape(user_id)));
        let v = match self
            .user_call(user_id, "looking up a user", s.http.get(url))
            .await
        {
            // 400: "Can only look up local users".
            Err(AdminError::Api { status, .. }) if status == StatusCode::BAD_REQUEST => {
                Err(AdminError::NoSuchUser(user_id.to_string()))
            }
            r => r,
        }?;
        let mut u: UserInfo = parse(v)?;
        // This one answer gives creation_ts in seconds; the list gives milliseconds.
        u.creation_ts = u.creation_ts.map(|t| t * 1000);
        Ok(u)
    }

    /// Whether `user_id` is joined to `room_id` now: admin API "Room Members"
    /// (`GET /_synapse/admin/v1/rooms/<room_id>/members`), which lists the joined members
    /// only, so an invite, a leave, a kick or a ban is not joined. None when Synapse knows no
    /// such room (404) or the room ID is not one (400).
    pub async fn is_joined(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Option<bool>, AdminError> {
        let s = &self.synapse;
        let url = s.url(&format!(
            "/_synapse/admin/v1/rooms/{}/members",
            path_escape(room_id)
        ));
        match s
            .call("listing a room's members", self.authed(s.http.get(url)))
            .await
        {
            Ok((_, v)) => {
                Ok(Some(v["members"].as_array().is_some_and(|m| {
                    m.iter().any(|u| u.as_str() == Some(user_id))
                })))
            }
            Err(AdminError::Api { status, .. })
                if status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The account with its devices and joined-room count (admin API "List all devices",
    /// "List joined rooms of a user").
    pub async fn user_details(&self, user_id: &str) -> Result<UserDetails, AdminError> {
        let s = &self.synapse;
        let user = self.get_user(user_id).await?;
        let id = path_escape(user_id);
        let v = self
            .user_call(
                user_id,
                "listing a user's devices",
                s.http.get(s.url(&format!("{USERS}/{id}/devices"))),
            )
            .await?;
        let mut devices: Vec<Device> = parse(v["devices"].clone())?;
        devices.sort_by_key(|d| std::cmp::Reverse(d.last_seen_ts));
        let v = self
            .user_call(
                user_id,
                "listing a user's rooms",
                s.http.get(s.url(&format!("{USERS_V1}/{id}/joined_rooms"))),
            )
            .await?;
        Ok(UserDetails {
            user,
            devices,
            joined_rooms: v["total"].as_u64().unwrap_or(0),
        })
    }

    /// Deactivates the account (admin API "Deactivate Account"): logged out everywhere,
    /// removed from its rooms, cannot log in again. With `erase`, Synapse marks it erased, and
    /// serves its messages redacted to anyone who was not in the room when they were sent.
    pub async fn deactivate(&self, user_id: &str, erase: bool) -> Result<(), AdminError> {
        let s = &self.synapse;
        self.user_call(
            user_id,
            "deactivating a user",
            s.http
                .post(s.url(&format!(
                    "/_synapse/admin/v1/deactivate/{}",
                    path_escape(user_id)
                )))
                .json(&json!({ "erase": erase })),
        )
        .await
        .map(drop)
    }

    /// Sets a new password (admin API "Reset password"); with `logout_devices`, every access
    /// token of the user is revoked.
    pub async fn reset_password(
        &self,
        user_id: &str,
        password: &str,
        logout_devices: bool,
    ) -> Result<(), AdminError> {
        let s = &self.synapse;
        self.user_call(
            user_id,
            "resetting a password",
            s.http
                .post(s.url(&format!(
                    "/_synapse/admin/v1/reset_password/{}",
                    path_escape(user_id)
                )))
                .json(&json!({ "new_password": password, "logout_devices": logout_devices })),
        )
        .await
        .map(drop)
    }

    /// Makes the user a server admin, or not (admin API "Change whether a user is a server
    /// administrator or not").
    pub async fn set_admin(&self, user_id: &str, admin: bool) -> Result<(), AdminError> {
        let s = &self.synapse;
        self.user_call(
            user_id,
            "changing a user's admin flag",
            s.http
                .put(s.url(&format!("{USERS_V1}/{}/admin", path_escape(user_id))))
                .json(&json!({ "admin": admin })),
        )
        .await
        .map(drop)
    }

    /// A call about one user: 404 is `NoSuchUser`.
    async fn user_call(
        &self,
        user_id: &str,
        what: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<Value, AdminError> {
        match self.synapse.call(what, self.authed(rb)).await {
            Ok((_, v)) => Ok(v),
            Err(AdminError::Api { status, .. }) if status == StatusCode::NOT_FOUND => {
                Err(AdminError::NoSuchUser(user_id.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    pub async fn get_token(&self, token: &str) -> Result<RegistrationToken, AdminError> {
        let s = &self.synapse;
        match s
            .call(
                "reading a registration token",
                self.authed(s.http.get(s.url(&format!("{TOKENS}/{token}")))),
            )
            .await
        {
            Ok((_, v)) => parse(v),
            Err(AdminError::Api { status, .. }) if status == StatusCode::NOT_FOUND => {
                Err(AdminError::NoSuchToken(token.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    pub async fn delete_token(&self, token: &str) -> Result<(), AdminError> {
        let s = &self.synapse;
        match s
            .call(
                "deleting a registration token",
                self.authed(s.http.delete(s.url(&format!("{TOKENS}/{token}")))),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(AdminError::Api { status, .. }) if status == StatusCode::NOT_FOUND => {
                Err(AdminError::NoSuchToken(token.to_string()))
            }
            Err(e) => Err(e),
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, AdminError> {
    serde_json::from_value(v).map_err(|e| AdminError::Api {
        what: "reading Synapse's answer".into(),
        status: StatusCode::OK,
        errcode: "M_BAD_JSON".into(),
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bot_may_not_take_the_service_accounts_name() {
        let cfg = |lp: &str| {
            crate::config::Config::from_toml(&format!(
                "server_name = \"a.b\"\n[bot]\nlocalpart = \"{lp}\"\n"
            ))
            .unwrap()
        };
        let p = config_problems(&cfg(SERVICE_LOCALPART));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "bot.localpart");
        assert!(config_problems(&cfg("registration-bot")).is_empty());
    }

    /// Cross-checked against Python's hmac, which Synapse uses to verify:
    /// hmac.new(b"secret", b"\0".join([b"nonce", b"user", b"pass", b"notadmin"]), sha1).hexdigest()
    #[test]
    fn mac_matches_pythons_hmac() {
        assert_eq!(
            registration_mac("secret", "nonce", "user", "pass", false),
            "a62633a505e2bc2e61569cf3c6847ee41ef09bae"
        );
    }

    #[test]
    fn uses_and_expiry() {
        assert_eq!(parse_uses("2"), Ok(Some(2)));
        assert_eq!(parse_uses("Unlimited"), Ok(None));
        assert!(parse_uses("0").is_err());
        assert!(parse_uses("-1").is_err());
        assert_eq!(parse_expiry("24h"), Ok(Some(Duration::from_secs(86_400))));
        assert_eq!(parse_expiry("never"), Ok(None));
        assert!(parse_expiry("0d").is_err());
        assert!(parse_expiry("soon").is_err());
        assert!(parse_expiry("20000d").is_err());
    }

    #[test]
    fn describe_counts_uses_and_time_left() {
        let t = RegistrationToken {
            token: "abc".into(),
            uses_allowed: Some(2),
            pending: 0,
            completed: 1,
            expiry_time: Some(86_400_000),
        };
        assert_eq!(t.describe(3_600_000), "used 1 of 2, expires in 23h0m");
        assert_eq!(t.describe(86_400_000), "used 1 of 2, expired");
    }

    #[test]
    fn user_names_resolve_to_local_ids() {
        let sn = "example.com";
        assert_eq!(local_user_id("alice", sn).unwrap(), "@alice:example.com");
        assert_eq!(local_user_id("@Alice", sn).unwrap(), "@alice:example.com");
        assert_eq!(
            local_user_id(" @alice:Example.com ", sn).unwrap(),
            "@alice:example.com"
        );
        let remote = local_user_id("@bob:matrix.org", sn).unwrap_err();
        assert!(matches!(remote, UserIdError::Remote { .. }), "{remote}");
        assert!(
            remote.to_string().contains("`@alice:example.com`"),
            "{remote}"
        );
        for bad in ["", "@", "@:example.com", "al ice", "alice:example.com", "ä"] {
            let e = local_user_id(bad, sn).unwrap_err();
            assert!(matches!(e, UserIdError::Malformed { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("like `alice`"), "{e}");
        }
    }

    #[test]
    fn the_appliances_own_accounts_are_protected() {
        let sn = "example.com";
        let service = protected_account("@homelab-matrix:example.com", sn, "registration-bot");
        assert!(service.unwrap().contains("service account"));
        let bot = protected_account("@registration-bot:example.com", sn, "registration-bot");
        assert!(bot.unwrap().contains("bot.enabled = false"));
        assert_eq!(
            protected_account("@alice:example.com", sn, "registration-bot"),
            None
        );
    }

    #[test]
    fn token_alphabet() {
        assert!(valid_token("abc-DEF_1.2~"));
        assert!(!valid_token("a/b"));
        assert!(!valid_token(""));
    }
}
