//! The bot at work: invites, messages, commands, and the admin alerts, on one sync loop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::event_handler::Ctx;
use matrix_sdk::ruma::api::error::ErrorKind;
use matrix_sdk::ruma::events::room::member::{MembershipState, StrippedRoomMemberEvent};
use matrix_sdk::ruma::events::room::message::{
    FormattedBody, MessageType, OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId, UserId};
use matrix_sdk::{Client, Room, RoomMemberships, RoomState};
use tokio::sync::watch;

use super::access::AllowList;
use super::commands::{self, Command, Parsed, Reply};
use super::session::Session;
use super::{BotStatus, Deps};
use crate::alerts;
use crate::fsutil::{Owner, write_atomic};
use crate::synapse::admin::{self, Admin, AdminError, Synapse};

/// Runs the bot until `stop`; a failure (Synapse away, a revoked token) is logged, shown in
/// `status`, and retried with back-off from a fresh login.
pub(super) async fn run(
    deps: Deps,
    status: Arc<Mutex<BotStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_secs(2);
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = run_once(&deps, &status) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        if let Err(e) = result {
            let msg = format!("{e:#}");
            tracing::error!(
                "the registration bot stopped working; retrying in {}s: {msg}",
                delay.as_secs()
            );
            let mut s = status.lock().unwrap();
            s.state = "retrying".into();
            s.last_error = Some(msg);
        }
        if started.elapsed() > Duration::from_secs(600) {
            delay = Duration::from_secs(2);
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        delay = (delay * 2).min(Duration::from_secs(300));
    }
    status.lock().unwrap().state = "stopped".into();
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A server admin, or listed in `bot.admins`: everything, including `allow`.
    Owner,
    /// Added with `allow`: the token commands.
    Allowed,
    Nobody,
}

/// What the event handlers share.
struct Bot {
    deps: Deps,
    admin: Admin,
    user_id: OwnedUserId,
    allow: Mutex<AllowList>,
    status: Arc<Mutex<BotStatus>>,
    /// False while a new device's first sync brings in old messages: those are history, not
    /// commands for now.
    live: AtomicBool,
}

async fn run_once(deps: &Deps, status: &Arc<Mutex<BotStatus>>) -> Result<()> {
    let session = Session::open(deps).await?;
    let client = session.client.clone();
    let synapse = Synapse::new(&deps.cfg.synapse_local_url());
    let admin = Admin::with_token(&synapse, session.access_token.clone());
    if !admin.is_server_admin(session.user_id.as_str()).await? {
        bail!(
            "{} is not a server admin, so it cannot manage registration tokens; make it one (PUT /_synapse/admin/v2/users/{} with {{\"admin\": true}}), or set bot.localpart to a new name",
            session.user_id,
            session.user_id
        );
    }
    let allow = AllowList::load(&deps.dir())?;
    {
        let mut s = status.lock().unwrap();
        s.state = "starting".into();
        s.user_id = Some(session.user_id.to_string());
        s.device_id = client.device_id().map(|d| d.to_string());
        s.allowed = allow.users();
    }
    let fresh = session.is_new;
    let bot = Arc::new(Bot {
        deps: deps.clone(),
        admin,
        user_id: session.user_id.clone(),
        allow: Mutex::new(allow),
        status: status.clone(),
        live: AtomicBool::new(!fresh),
    });
    client.add_event_handler_context(bot.clone());
    client.add_event_handler(on_invite);
    client.add_event_handler(on_message);

    client
        .sync_once(SyncSettings::default())
        .await
        .context("the bot's first sync")?;
    bot.live.store(true, Ordering::SeqCst);
    if let Err(e) = session.cross_sign().await {
        tracing::warn!(
            "the bot's device is not cross-signed, so clients may flag it as unverified: {e:#}"
        );
    }
    {
        let mut s = status.lock().unwrap();
        s.state = "running".into();
        s.last_error = None;
    }
    let alerts_task = AbortOnDrop(tokio::spawn(alert_admins(bot.clone(), client.clone())));

    let mut failures = 0u32;
    loop {
        let settings = SyncSettings::default().timeout(Duration::from_secs(30));
        match client.sync_once(settings).await {
            Ok(_) => {
                failures = 0;
                // The store learns that the device is signed from the key query that follows
                // the upload, a sync or two later.
                if !status.lock().unwrap().cross_signed {
                    let signed = session.is_cross_signed().await;
                    status.lock().unwrap().cross_signed = signed;
                }
            }
            Err(e) => {
                if matches!(e.client_api_error_kind(), Some(ErrorKind::UnknownToken(_))) {
                    drop(alerts_task);
                    bail!("the bot's access token was revoked: {e}");
                }
                failures += 1;
                if failures >= 10 {
                    drop(alerts_task);
                    return Err(e).context("the bot cannot sync with Synapse");
                }
                tracing::warn!("the bot's sync failed ({failures} in a row): {e}");
                tokio::time::sleep(Duration::from_secs(u64::from(failures) * 2)).await;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Bot {
    async fn role(&self, user: &UserId) -> Result<Role, AdminError> {
        let cfg = &self.deps.cfg;
        if cfg.bot.admins.iter().any(|a| a == user.as_str()) {
            return Ok(Role::Owner);
        }
        // Only this server's users can be its admins; the admin API refuses others.
        if user.server_name().as_str() == cfg.server_name
            && self.admin.is_server_admin(user.as_str()).await?
        {
            return Ok(Role::Owner);
        }
        if self.allow.lock().unwrap().contains(user.as_str()) {
            return Ok(Role::Allowed);
        }
        Ok(Role::Nobody)
    }

    fn prefix(&self) -> &str {
        &self.deps.cfg.bot.prefix
    }

    async fn handle(&self, room: &Room, sender: &UserId, body: &str) {
        let parsed = commands::parse(body, self.prefix());
        // In a room with more than the two of us, people also talk to each other: only what
        // is plainly a command is for the bot.
        let direct = match room.members(RoomMemberships::ACTIVE).await {
            Ok(m) => m.len() <= 2,
            Err(e) => {
                tracing::warn!(room = %room.room_id(), "listing the room's members: {e}");
                false
            }
        };
        match &parsed {
            Parsed::NotForMe => return,
            Parsed::Unknown(_) if !direct => return,
            _ => {}
        }
        let role = match self.role(sender).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(user = %sender, "checking whether a user may command the bot: {e}");
                send(room, Reply::new(format!("I cannot check who may use me right now ({e}). Please try again in a minute."))).await;
                return;
            }
        };
        if role == Role::Nobody {
            tracing::info!(user = %sender, room = %room.room_id(), "refused a command from a user who may not command the bot");
            send(room, commands::not_allowed(&self.deps.cfg.server_name)).await;
            return;
        }
        let reply = match parsed {
            Parsed::NotForMe => return,
            Parsed::Unknown(w) => commands::unknown(&w, self.prefix()),
            Parsed::Usage { command, problem } => commands::usage(command, &problem, self.prefix()),
            Parsed::Command(c) if c.manages_access() && role != Role::Owner => Reply::new(
                "Only server admins (and the people in `bot.admins` of the config file) can change who may use me.",
            ),
            Parsed::Command(c) if c.manages_users() && role != Role::Owner => Reply::new(
                "Only server admins (and the people in `bot.admins` of the config file) can manage accounts; I can make you registration tokens.",
            ),
            Parsed::Command(c) => {
                tracing::info!(user = %sender, command = ?c, "bot command");
                self.execute(c, sender, room, direct).await
            }
        };
        send(room, reply).await;
    }

    async fn execute(&self, cmd: Command, sender: &UserId, room: &Room, direct: bool) -> Reply {
        if cmd.manages_users() {
            return match self.accounts(cmd, sender, room, direct).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("bot account command failed: {e:#}");
                    Reply::new(format!(
                        "That failed: {e:#}. An admin can look at `homelab-matrix status` on the server."
                    ))
                }
            };
        }
        match self.try_execute(cmd, sender).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("bot command failed: {e:#}");
                Reply::new(format!(
                    "That failed: {e:#}. An admin can look at `homelab-matrix status` on the server."
                ))
            }
        }
    }

    async fn try_execute(&self, cmd: Command, sender: &UserId) -> Result<Reply> {
        let now = now_ms();
        let cfg = &self.deps.cfg;
        Ok(match cmd {
            Command::Help => commands::help(self.prefix(), &cfg.server_name),
            Command::List { all } => {
                let tokens = self
                    .admin
                    .list_tokens_where(if all { None } else { Some(true) })
                    .await?;
                if tokens.is_empty() {
                    Reply::new(if all {
                        format!("There are no tokens. `{}create` makes one.", self.prefix())
                    } else {
                        format!(
                            "No token can be used right now. `{p}create` makes one; `{p}list all` also shows used-up and expired ones.",
                            p = self.prefix()
                        )
                    })
                } else {
                    let mut md = format!(
                        "**{} token{}{}:**\n",
                        tokens.len(),
                        if tokens.len() == 1 { "" } else { "s" },
                        if all { "" } else { " that can be used" }
                    );
                    for t in &tokens {
                        md.push_str(&format!("\n- {}", commands::token_line(t, now)));
                    }
                    Reply::new(md)
                }
            }
            Command::Show(tokens) => {
                let mut lines = vec![];
                for t in tokens {
                    lines.push(match self.admin.get_token(&t).await {
                        Ok(t) => commands::token_line(&t, now),
                        Err(AdminError::NoSuchToken(_)) => format!("`{t}`: no such token"),
                        Err(e) => return Err(e.into()),
                    });
                }
                Reply::new(list(&lines))
            }
            Command::Create { uses, expires_in } => {
                let expiry = expires_in.map(|d| now + d.as_millis() as i64);
                let t = self.admin.create_token(None, uses, expiry).await?;
                tracing::info!(user = %sender, uses = ?uses, "created a registration token");
                commands::created(&t, now, &crate::invite::link(cfg, &t.token))
            }
            Command::Delete(tokens) => {
                let mut lines = vec![];
                for t in tokens {
                    lines.push(match self.admin.delete_token(&t).await {
                        Ok(()) => format!("`{t}`: deleted"),
                        Err(AdminError::NoSuchToken(_)) => format!("`{t}`: no such token"),
                        Err(e) => return Err(e.into()),
                    });
                }
                Reply::new(list(&lines))
            }
            Command::DeleteAll { confirm } => {
                let tokens = self.admin.list_tokens().await?;
                if tokens.is_empty() {
                    Reply::new("There are no tokens to delete.")
                } else if !confirm {
                    Reply::new(format!(
                        "That would delete all {} tokens, including ones people may be about to use. Nothing was deleted; send `{}delete-all confirm` to do it.",
                        tokens.len(),
                        self.prefix()
                    ))
                } else {
                    let mut deleted = 0;
                    for t in &tokens {
                        match self.admin.delete_token(&t.token).await {
                            Ok(()) | Err(AdminError::NoSuchToken(_)) => deleted += 1,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    tracing::info!(user = %sender, deleted, "deleted every registration token");
                    Reply::new(format!("Deleted all {deleted} tokens."))
                }
            }
            Command::Allow(users) => {
                let added = self.allow.lock().unwrap().add(&users)?;
                self.refresh_allowed();
                tracing::info!(user = %sender, added = ?added, "allowed users to command the bot");
                let mut md = String::new();
                if !added.is_empty() {
                    md.push_str(&format!(
                        "Allowed {}. They can now invite me and make tokens.",
                        mxids(&added)
                    ));
                }
                let already: Vec<String> =
                    users.into_iter().filter(|u| !added.contains(u)).collect();
                if !already.is_empty() {
                    md.push_str(&format!(" Already allowed: {}.", mxids(&already)));
                }
                Reply::new(md.trim().to_string())
            }
            Command::Disallow(users) => {
                let removed = self.allow.lock().unwrap().remove(&users)?;
                self.refresh_allowed();
                tracing::info!(user = %sender, removed = ?removed, "disallowed users");
                let mut lines = vec![];
                for u in users {
                    lines.push(if removed.contains(&u) {
                        format!("`{u}`: may no longer use me")
                    } else if cfg.bot.admins.contains(&u) {
                        format!("`{u}`: is in `bot.admins` of the config file; remove them there")
                    } else if u.ends_with(&format!(":{}", cfg.server_name))
                        && self.admin.is_server_admin(&u).await.unwrap_or(false)
                    {
                        format!("`{u}`: is a server admin, and server admins always may")
                    } else {
                        format!("`{u}`: was not allowed")
                    });
                }
                Reply::new(list(&lines))
            }
            Command::Users
            | Command::User(_)
            | Command::Deactivate { .. }
            | Command::ResetPassword(_)
            | Command::Doctor => unreachable!("handled by accounts"),
            Command::Allowed => {
                let added = self.allow.lock().unwrap().users();
                let none = "nobody".to_string();
                Reply::new(format!(
                    "Server admins of {} may always use me.\n\n- In `bot.admins` of the config file: {}\n- Allowed with `{}allow`: {}",
                    cfg.server_name,
                    if cfg.bot.admins.is_empty() {
                        none.clone()
                    } else {
                        mxids(&cfg.bot.admins)
                    },
                    self.prefix(),
                    if added.is_empty() {
                        none
                    } else {
                        mxids(&added)
                    },
                ))
            }
        })
    }

    /// `users`, `user`, `deactivate`, `reset-password` (for owners only; `handle` checked).
    async fn accounts(
        &self,
        cmd: Command,
        sender: &UserId,
        room: &Room,
        direct: bool,
    ) -> Result<Reply> {
        let cfg = &self.deps.cfg;
        let p = self.prefix();
        // The resolved ID, or the answer that says what to type instead.
        let resolve = |given: &str, changes: bool| -> Result<String, Reply> {
            let id = admin::local_user_id(given, &cfg.server_name)
                .map_err(|e| Reply::new(format!("{e}.")))?;
            match admin::protected_account(&id, &cfg.server_name, &cfg.bot.localpart) {
                Some(why) if changes => Err(Reply::new(format!("I won't: {why}."))),
                _ => Ok(id),
            }
        };
        let unknown = |id: &str| {
            Reply::new(format!(
                "There is no user `{id}` on this server. `{p}users` lists them."
            ))
        };
        Ok(match cmd {
            Command::Doctor => {
                let report = crate::doctor::run(cfg, &crate::doctor::Options::full()).await;
                if let Err(e) = crate::doctor::save(cfg, &report) {
                    tracing::warn!("keeping the doctor's report: {e:#}");
                }
                Reply::new(report.markdown())
            }
            Command::Users => {
                let users = self.admin.list_users(admin::UserFilter::default()).await?;
                let mut md = format!(
                    "**{} user{} on {}** (not counting deactivated ones and guests):\n",
                    users.len(),
                    if users.len() == 1 { "" } else { "s" },
                    cfg.server_name
                );
                for u in users.iter().take(USERS_SHOWN) {
                    md.push_str(&format!("\n- {}", commands::user_line(u)));
                }
                if users.len() > USERS_SHOWN {
                    md.push_str(&format!(
                        "\n\n…and {} more: `homelab-matrix user list` on the server shows everyone.",
                        users.len() - USERS_SHOWN
                    ));
                }
                Reply::new(md)
            }
            Command::User(given) => {
                let id = match resolve(&given, false) {
                    Ok(id) => id,
                    Err(r) => return Ok(r),
                };
                match self.admin.user_details(&id).await {
                    Ok(d) => commands::user_details(&d),
                    Err(AdminError::NoSuchUser(_)) => unknown(&id),
                    Err(e) => return Err(e.into()),
                }
            }
            Command::Deactivate {
                user,
                erase,
                confirm,
            } => {
                let id = match resolve(&user, true) {
                    Ok(id) => id,
                    Err(r) => return Ok(r),
                };
                let u = match self.admin.get_user(&id).await {
                    Ok(u) => u,
                    Err(AdminError::NoSuchUser(_)) => return Ok(unknown(&id)),
                    Err(e) => return Err(e.into()),
                };
                let erase_word = if erase { " erase" } else { "" };
                if u.already_deactivated(erase) {
                    Reply::new(format!("`{id}` is already deactivated."))
                } else if !confirm {
                    Reply::new(format!(
                        "That would deactivate `{id}` for good: logged out everywhere, out of every room, unable to log in again{}. Nothing was done; send `{p}deactivate {id}{erase_word} confirm` to do it.",
                        if erase {
                            ", and their messages hidden from people who join later"
                        } else {
                            ""
                        }
                    ))
                } else {
                    self.admin.deactivate(&id, erase).await?;
                    tracing::info!(user = %sender, target = %id, erase, "deactivated a user");
                    Reply::new(format!(
                        "Deactivated `{id}`{}.",
                        if erase {
                            " and erased their messages for people who join later"
                        } else {
                            ""
                        }
                    ))
                }
            }
            Command::ResetPassword(given) => {
                let id = match resolve(&given, true) {
                    Ok(id) => id,
                    Err(r) => return Ok(r),
                };
                // The password is only as secret as the room it is sent in (an unencrypted
                // room's messages are plaintext on the server).
                let encrypted = room
                    .latest_encryption_state()
                    .await
                    .map(|s| s.is_encrypted())
                    .unwrap_or(false);
                if !direct || !encrypted {
                    return Ok(Reply::new(format!(
                        "I only send passwords in an encrypted direct message, and this room is {}: anyone who can read it (or the server's database) would see it. Open a DM with me (Element encrypts those) and send `{p}reset-password {id}` there.",
                        if direct { "not encrypted" } else { "not a DM" }
                    )));
                }
                match self.admin.get_user(&id).await {
                    Ok(u) if u.deactivated => {
                        return Ok(Reply::new(format!(
                            "`{id}` is deactivated; a password would not let them in."
                        )));
                    }
                    Ok(_) => {}
                    Err(AdminError::NoSuchUser(_)) => return Ok(unknown(&id)),
                    Err(e) => return Err(e.into()),
                }
                let password = one_time_password()?;
                self.admin.reset_password(&id, &password, true).await?;
                tracing::info!(user = %sender, target = %id, "reset a user's password");
                Reply::new(format!(
                    "**New password for `{id}`:** `{password}`\n\nAll their devices were logged out. Pass it on privately; they should log in with it once and choose their own in Settings → Security & Privacy."
                ))
            }
            _ => unreachable!("only account commands come here"),
        })
    }

    fn refresh_allowed(&self) {
        let users = self.allow.lock().unwrap().users();
        self.status.lock().unwrap().allowed = users;
    }

    /// Who hears about problems: this server's admins (but not the bot and the appliance's
    /// own account) and `bot.admins`.
    async fn alert_recipients(&self) -> Vec<String> {
        let cfg = &self.deps.cfg;
        let service = format!("@{}:{}", admin::SERVICE_LOCALPART, cfg.server_name);
        let mut out: Vec<String> = match self.admin.server_admins().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("listing the server admins to alert: {e}");
                vec![]
            }
        };
        out.retain(|u| *u != service && *u != self.user_id.as_str());
        for a in &cfg.bot.admins {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }
}

/// How many users `users` names in one message; `homelab-matrix user list` has them all.
const USERS_SHOWN: usize = 50;

/// 20 hex digits (80 bits) from the OS CSPRNG: short enough to type once, too long to guess
/// at Synapse's login rate.
fn one_time_password() -> Result<String> {
    let mut t = crate::secrets::random_token(&ring::rand::SystemRandom::new())?;
    t.truncate(20);
    Ok(t)
}

fn list(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| format!("- {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn mxids(users: &[String]) -> String {
    users
        .iter()
        .map(|u| format!("`{u}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sends a reply as `m.notice`: the spec's msgtype for automated messages, which other bots
/// do not answer (client-server API, "m.notice"). Encrypted when the room is.
async fn send(room: &Room, reply: Reply) {
    let content = match FormattedBody::markdown(&reply.markdown) {
        Some(html) => RoomMessageEventContent::notice_html(reply.plain(), html.body),
        None => RoomMessageEventContent::notice_plain(reply.plain()),
    };
    if let Err(e) = room.send(content).await {
        tracing::warn!(room = %room.room_id(), "the bot could not send its reply: {e}");
    }
}

async fn on_invite(ev: StrippedRoomMemberEvent, room: Room, Ctx(bot): Ctx<Arc<Bot>>) {
    if ev.state_key != bot.user_id || ev.content.membership != MembershipState::Invite {
        return;
    }
    let inviter = ev.sender;
    match bot.role(&inviter).await {
        Ok(Role::Owner | Role::Allowed) => {
            // Synapse can refuse a join that follows its invite too closely
            // (element-hq/synapse#4345): retry a few times.
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=5 {
                match room.join().await {
                    Ok(()) => {
                        tracing::info!(room = %room.room_id(), by = %inviter, "joined a room on invitation");
                        return;
                    }
                    Err(e) if attempt == 5 => {
                        tracing::error!(room = %room.room_id(), "could not join after an invitation: {e}")
                    }
                    Err(_) => {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        }
        Ok(Role::Nobody) => {
            tracing::info!(room = %room.room_id(), by = %inviter, "rejected an invitation from a user who may not command the bot");
            if let Err(e) = room.leave().await {
                tracing::warn!(room = %room.room_id(), "rejecting an invitation: {e}");
            }
        }
        Err(e) => tracing::error!(
            room = %room.room_id(), by = %inviter,
            "cannot check the inviter, so the invitation stays open: {e}"
        ),
    }
}

async fn on_message(ev: OriginalSyncRoomMessageEvent, room: Room, Ctx(bot): Ctx<Arc<Bot>>) {
    if ev.sender == bot.user_id
        || room.state() != RoomState::Joined
        || !bot.live.load(Ordering::SeqCst)
    {
        return;
    }
    // Only what people type: notices are other bots' output (and answering them could loop).
    let MessageType::Text(text) = &ev.content.msgtype else {
        return;
    };
    // An edit repeats the message with "* " in front (spec, "Event replacements"): the
    // command was answered when it was first sent.
    if matches!(ev.content.relates_to, Some(Relation::Replacement(_))) {
        return;
    }
    bot.handle(&room, &ev.sender, &text.body).await;
}

/// Tells the admins, in a DM, about problems that qualify (alerts::due): at once, and again
/// at most once a day while they last. When each was last told is kept in
/// state/bot/alerts.json, so a restart does not repeat it.
async fn alert_admins(bot: Arc<Bot>, client: Client) {
    let path = bot.deps.dir().join("alerts.json");
    let mut sent: BTreeMap<String, u64> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut rooms: BTreeMap<String, OwnedRoomId> = BTreeMap::new();
    let mut changes = bot.deps.alerts.subscribe();
    loop {
        let problems = bot.deps.alerts.active();
        let now = now_ms() as u64 / 1000;
        let due = alerts::due(&problems, &sent, now);
        if !due.is_empty() {
            let recipients = bot.alert_recipients().await;
            if recipients.is_empty() {
                tracing::warn!(
                    "problems need an admin, but the bot knows of none to tell (no server admins, empty bot.admins)"
                );
            }
            for p in due {
                let reply = Reply::new(format!(
                    "**homelab-matrix needs an admin:** {}\n\nSince {}. I will say this again in a day if it lasts.",
                    p.message,
                    commands::utc(p.since as i64 * 1000)
                ));
                let mut told = false;
                for user in &recipients {
                    match dm_room(&client, &mut rooms, user).await {
                        Ok(room) => {
                            send(&room, reply.clone()).await;
                            told = true;
                        }
                        Err(e) => {
                            tracing::warn!(user = %user, "cannot open a DM to alert an admin: {e:#}")
                        }
                    }
                }
                if told {
                    tracing::info!(problem = %p.key, admins = recipients.len(), "told the admins");
                    sent.insert(p.key.clone(), now);
                    if let Err(e) = write_atomic(
                        &path,
                        serde_json::to_string(&sent).expect("serializes").as_bytes(),
                        Owner::root(),
                        0o600,
                    ) {
                        tracing::warn!("saving when admins were alerted: {e:#}");
                    }
                }
            }
        }
        // A change comes at once; the minute tick catches problems whose grace ran out.
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// The DM with `user`: the one they opened with the bot, the one the bot opened before, or
/// a new encrypted one.
async fn dm_room(
    client: &Client,
    made: &mut BTreeMap<String, OwnedRoomId>,
    user: &str,
) -> Result<Room> {
    let user_id: OwnedUserId = user.parse().with_context(|| format!("{user:?}"))?;
    if let Some(room) = client.get_dm_room(&user_id) {
        return Ok(room);
    }
    if let Some(room) = made.get(user).and_then(|id| client.get_room(id)) {
        return Ok(room);
    }
    let room = client.create_dm(&user_id).await?;
    made.insert(user.to_string(), room.room_id().to_owned());
    Ok(room)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
