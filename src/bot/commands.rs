//! The bot's commands: parsing a message into a command, and the texts it answers with. Pure
//! functions, no I/O, so every rule here is unit-tested in memory.
//!
//! A superset of the old Python bot's commands (moan0s/matrix-registration-bot, bot.py): `help`,
//! `list`, `show`, `create`, `delete`, `delete-all`, `allow`, `disallow`, plus `allowed`,
//! `list all`, and `create [USES] [EXPIRY]` where the old bot hard-coded 1 use and 7 days; and
//! the account commands `users`, `user`, `deactivate` and `reset-password`, for admins only.

use std::time::Duration;

use crate::synapse::admin::{
    RegistrationToken, UserDetails, UserInfo, parse_expiry, parse_uses, valid_token,
};

/// What `create` makes when it is not told: one registration, for a week (the old bot's only
/// choice, kept as the default).
pub const DEFAULT_USES: u64 = 1;
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    /// `all`: also used-up and expired tokens.
    List {
        all: bool,
    },
    Show(Vec<String>),
    /// `uses: None` is unlimited, `expires_in: None` never expires.
    Create {
        uses: Option<u64>,
        expires_in: Option<Duration>,
    },
    Delete(Vec<String>),
    /// Deletes only when confirmed (`delete-all confirm`).
    DeleteAll {
        confirm: bool,
    },
    Allow(Vec<String>),
    Disallow(Vec<String>),
    Allowed,
    /// The server's active users.
    Users,
    /// One user, as given (`alice` or `@alice:server`; resolved against the server name).
    User(String),
    /// Deactivates only when confirmed (`deactivate @x:server confirm`).
    Deactivate {
        user: String,
        erase: bool,
        confirm: bool,
    },
    /// Answers with a new password: only in an encrypted DM.
    ResetPassword(String),
    /// Runs `homelab-matrix doctor` and answers with its report.
    Doctor,
}

impl Command {
    /// Managing who may command the bot is kept for server admins and `bot.admins`: someone
    /// added with `allow` may make tokens but not hand the bot to others.
    pub fn manages_access(&self) -> bool {
        matches!(self, Command::Allow(_) | Command::Disallow(_))
    }

    /// Accounts are for server admins and `bot.admins` too: `allow` hands out registration
    /// tokens, not the power to lock people out or take over their accounts.
    pub fn manages_users(&self) -> bool {
        matches!(
            self,
            Command::Users
                | Command::User(_)
                | Command::Deactivate { .. }
                | Command::ResetPassword(_)
                | Command::Doctor
        )
    }
}

/// What a message means to the bot.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Not addressed to the bot (no prefix, or nothing but white space).
    NotForMe,
    Command(Command),
    /// A known command with arguments it cannot use: the message says what is wrong.
    Usage {
        command: &'static str,
        problem: String,
    },
    /// An unknown first word.
    Unknown(String),
}

/// The command names, as the first word (compared case-insensitively).
pub const NAMES: &[&str] = &[
    "help",
    "list",
    "show",
    "create",
    "delete",
    "delete-all",
    "allow",
    "disallow",
    "allowed",
    "users",
    "user",
    "deactivate",
    "reset-password",
    "doctor",
];

/// Parses a message body. `prefix` (config `bot.prefix`) must start it when it is not empty.
pub fn parse(body: &str, prefix: &str) -> Parsed {
    let text = strip_reply_fallback(body).trim();
    let text = if prefix.is_empty() {
        text
    } else {
        match strip_prefix_ci(text, prefix) {
            Some(rest) => rest.trim_start(),
            None => return Parsed::NotForMe,
        }
    };
    let mut words = text.split_whitespace();
    let Some(first) = words.next() else {
        return Parsed::NotForMe;
    };
    let args: Vec<String> = words.map(str::to_string).collect();
    let name = first.to_ascii_lowercase();
    let usage = |command: &'static str, problem: String| Parsed::Usage { command, problem };
    let cmd = match name.as_str() {
        "help" => Command::Help,
        "list" => match args.as_slice() {
            [] => Command::List { all: false },
            [a] if a.eq_ignore_ascii_case("all") => Command::List { all: true },
            _ => return usage("list", "it takes nothing, or `all`".into()),
        },
        "show" | "delete" => {
            let command = if name == "show" { "show" } else { "delete" };
            if args.is_empty() {
                return usage(command, "name at least one token".into());
            }
            if let Some(bad) = args.iter().find(|t| !valid_token(t)) {
                return usage(
                    command,
                    format!(
                        "`{}` is not a token (tokens are up to 64 letters, digits and . _ ~ -)",
                        bad.replace('`', "'")
                    ),
                );
            }
            if command == "show" {
                Command::Show(args)
            } else {
                Command::Delete(args)
            }
        }
        "create" => match parse_create(&args) {
            Ok(c) => c,
            Err(e) => return usage("create", e),
        },
        "delete-all" => match args.as_slice() {
            [] => Command::DeleteAll { confirm: false },
            [c] if c.eq_ignore_ascii_case("confirm") => Command::DeleteAll { confirm: true },
            _ => return usage("delete-all", "it takes nothing, or `confirm`".into()),
        },
        "allow" | "disallow" => {
            let command = if name == "allow" { "allow" } else { "disallow" };
            if args.is_empty() {
                return usage(
                    command,
                    "name at least one user, like `@alice:example.com`".into(),
                );
            }
            if let Some(bad) = args.iter().find(|m| !crate::config::is_mxid(m)) {
                return usage(
                    command,
                    format!(
                        "`{}` is not a Matrix user ID; write it in full, like `@alice:example.com`",
                        bad.replace('`', "'")
                    ),
                );
            }
            if command == "allow" {
                Command::Allow(args)
            } else {
                Command::Disallow(args)
            }
        }
        "allowed" => Command::Allowed,
        "users" => match args.as_slice() {
            [] => Command::Users,
            _ => {
                return usage(
                    "users",
                    "it takes nothing; `user @alice:server` shows one".into(),
                );
            }
        },
        "user" | "reset-password" => {
            let command = if name == "user" {
                "user"
            } else {
                "reset-password"
            };
            match args.as_slice() {
                [u] if name == "user" => Command::User(u.clone()),
                [u] => Command::ResetPassword(u.clone()),
                _ => return usage(command, "name one user, like `@alice:example.com`".into()),
            }
        }
        "doctor" => match args.as_slice() {
            [] => Command::Doctor,
            _ => return usage("doctor", "it takes nothing".into()),
        },
        "deactivate" => match parse_deactivate(&args) {
            Ok(c) => c,
            Err(e) => return usage("deactivate", e),
        },
        _ => return Parsed::Unknown(first.to_string()),
    };
    Parsed::Command(cmd)
}

/// `create [USES] [EXPIRY]`, either order: USES is a number or "unlimited", EXPIRY a duration
/// (24h, 7d, 2w) or "never".
fn parse_create(args: &[String]) -> Result<Command, String> {
    if args.len() > 2 {
        return Err("it takes at most a number of uses and an expiry, like `create 2 1d`".into());
    }
    let mut uses = None;
    let mut expires = None;
    for a in args {
        let looks_like_uses =
            a.chars().all(|c| c.is_ascii_digit()) || a.eq_ignore_ascii_case("unlimited");
        if looks_like_uses {
            if uses.is_some() {
                return Err("give the number of uses once".into());
            }
            uses = Some(parse_uses(a)?);
        } else {
            if expires.is_some() {
                return Err("give the expiry once".into());
            }
            expires = Some(parse_expiry(a)?);
        }
    }
    Ok(Command::Create {
        uses: uses.unwrap_or(Some(DEFAULT_USES)),
        expires_in: expires.unwrap_or(Some(DEFAULT_EXPIRY)),
    })
}

/// `deactivate USER [erase] [confirm]`.
fn parse_deactivate(args: &[String]) -> Result<Command, String> {
    let Some((user, rest)) = args.split_first() else {
        return Err("name one user, like `deactivate @alice:example.com`".into());
    };
    let (mut erase, mut confirm) = (false, false);
    for w in rest {
        if w.eq_ignore_ascii_case("erase") {
            erase = true;
        } else if w.eq_ignore_ascii_case("confirm") {
            confirm = true;
        } else {
            return Err(format!(
                "after the user it takes `erase` and `confirm`, not `{}`",
                w.replace('`', "'")
            ));
        }
    }
    Ok(Command::Deactivate {
        user: user.clone(),
        erase,
        confirm,
    })
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// A reply in Element quotes the message replied to as "> " lines, then a blank line, before
/// the new text (Matrix spec 1.12 and earlier, "Fallbacks for rich replies"). The command is
/// what follows.
fn strip_reply_fallback(body: &str) -> &str {
    if !body.starts_with("> ") {
        return body;
    }
    match body.find("\n\n") {
        Some(i) => &body[i + 2..],
        None => body,
    }
}

/// A reply: Markdown (sent as HTML) with a plain-text body for clients that show no HTML.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub markdown: String,
}

impl Reply {
    pub fn new(markdown: impl Into<String>) -> Reply {
        Reply {
            markdown: markdown.into(),
        }
    }

    /// The plain body: the Markdown without its bold markers. Code spans keep their backticks,
    /// which show where a token starts and ends.
    pub fn plain(&self) -> String {
        self.markdown.replace("**", "")
    }
}

/// One token as a Markdown line: the token in a code span, then uses and expiry.
pub fn token_line(t: &RegistrationToken, now_ms: i64) -> String {
    let state = match (t.uses_allowed, t.expiry_time) {
        (Some(n), _) if t.completed + t.pending >= n => " (used up)",
        (_, Some(ms)) if ms <= now_ms => " (expired)",
        _ => "",
    };
    let expiry = match t.expiry_time {
        Some(ms) => format!(" (until {})", utc(ms)),
        None => String::new(),
    };
    format!("`{}`: {}{expiry}{state}", t.token, t.describe(now_ms))
}

/// The answer to `create`: the token, its limits, and the invite link to send.
pub fn created(t: &RegistrationToken, now_ms: i64, link: &str) -> Reply {
    let line = token_line(t, now_ms);
    let limits = line.split_once(": ").map_or("", |(_, rest)| rest);
    Reply::new(format!(
        "**New token:** `{}`\n\n{limits}. Send this invite link, where anyone can sign up with it (Element X too): {link}",
        t.token
    ))
}

/// One account as a Markdown line: the ID in a code span, then what is known about it.
pub fn user_line(u: &UserInfo) -> String {
    let mut parts = vec![];
    if u.admin {
        parts.push("server admin".to_string());
    }
    if u.deactivated {
        parts.push(if u.erased { "erased" } else { "deactivated" }.to_string());
    }
    if let Some(t) = u.creation_ts.filter(|t| *t > 0) {
        parts.push(format!("created {}", utc(t)));
    }
    parts.push(match u.last_seen_ts.filter(|t| *t > 0) {
        Some(t) => format!("last seen {}", utc(t)),
        None => "not seen yet".into(),
    });
    format!("`{}`: {}", u.name, parts.join(", "))
}

/// `user`: the account, its rooms and devices.
pub fn user_details(d: &UserDetails) -> Reply {
    let mut md = format!(
        "{}\n\nIn {} room{}; {} device{}:",
        user_line(&d.user),
        d.joined_rooms,
        if d.joined_rooms == 1 { "" } else { "s" },
        d.devices.len(),
        if d.devices.len() == 1 { "" } else { "s" },
    );
    for dev in &d.devices {
        md.push_str(&format!(
            "\n- `{}` {}: last seen {} from {}",
            dev.device_id,
            dev.display_name.as_deref().unwrap_or("(no name)"),
            dev.last_seen_ts
                .filter(|t| *t > 0)
                .map_or("never".into(), utc),
            dev.last_seen_ip.as_deref().unwrap_or("-"),
        ));
    }
    Reply::new(md)
}

/// Milliseconds since the epoch as "2026-07-01 12:00 UTC".
pub fn utc(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("{ms} ms"),
    }
}

/// `help`: every command with a line on what it does.
pub fn help(prefix: &str, server_name: &str) -> Reply {
    let p = prefix;
    Reply::new(format!(
        "**Registration tokens for {server_name}.** New people register with a token; I make and manage them.\n\n\
         - `{p}create [USES] [EXPIRY]`: a new token; USES is a number or `unlimited` (default 1), EXPIRY like `24h`, `7d` or `never` (default 7d)\n\
         - `{p}list`: tokens that can still be used; `{p}list all` also shows used-up and expired ones\n\
         - `{p}show TOKEN...`: details of tokens\n\
         - `{p}delete TOKEN...`: delete tokens\n\
         - `{p}delete-all confirm`: delete every token\n\
         - `{p}allow @user:server...`: let others use me too (server admins always may)\n\
         - `{p}disallow @user:server...`: take that back\n\
         - `{p}allowed`: who may use me\n\
         - `{p}help`: this text\n\n\
         **Accounts** (server admins and `bot.admins` only):\n\n\
         - `{p}users`: this server's users\n\
         - `{p}user @user:server`: one user, their devices and rooms\n\
         - `{p}deactivate @user:server [erase] confirm`: deactivate for good; `erase` also hides their messages from people who join later\n\
         - `{p}reset-password @user:server`: a new password for them, sent only in an encrypted DM; it logs their devices out\n\
         - `{p}doctor`: check the whole server from the outside in (certificates, delegation, federation, TURN, database, disk) and say how to fix what fails"
    ))
}

/// The answer to a word that is not a command: short, with the way to the full help.
pub fn unknown(word: &str, prefix: &str) -> Reply {
    Reply::new(format!(
        "I don't know `{}`. Try `{prefix}create`, `{prefix}list` or `{prefix}help` for everything I can do.",
        word.replace('`', "'")
    ))
}

pub fn usage(command: &str, problem: &str, prefix: &str) -> Reply {
    Reply::new(format!(
        "`{prefix}{command}`: {problem}. `{prefix}help` lists every command."
    ))
}

/// The polite refusal for someone who may not command the bot.
pub fn not_allowed(server_name: &str) -> Reply {
    Reply::new(format!(
        "Sorry, I only take commands from the admins of {server_name} and the people they allow. \
         Ask an admin if you need a registration token."
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> Command {
        match parse(s, "") {
            Parsed::Command(c) => c,
            other => panic!("{s:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn first_word_case_insensitive_with_defaults() {
        assert_eq!(cmd("help"), Command::Help);
        assert_eq!(cmd("  HeLp me please"), Command::Help);
        assert_eq!(
            cmd("Create"),
            Command::Create {
                uses: Some(1),
                expires_in: Some(Duration::from_secs(7 * 86_400))
            }
        );
        assert_eq!(cmd("list"), Command::List { all: false });
        assert_eq!(cmd("LIST All"), Command::List { all: true });
        assert_eq!(cmd("allowed"), Command::Allowed);
    }

    #[test]
    fn create_takes_uses_and_expiry_in_either_order() {
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(
            cmd("create 2 1d"),
            Command::Create {
                uses: Some(2),
                expires_in: day
            }
        );
        assert_eq!(
            cmd("create 24h 2"),
            Command::Create {
                uses: Some(2),
                expires_in: day
            }
        );
        assert_eq!(
            cmd("create unlimited never"),
            Command::Create {
                uses: None,
                expires_in: None
            }
        );
        assert_eq!(
            cmd("create never"),
            Command::Create {
                uses: Some(1),
                expires_in: None
            }
        );
        for bad in [
            "create 0",
            "create 2 3",
            "create 1d 2d",
            "create soon",
            "create 1 1d x",
        ] {
            assert!(
                matches!(
                    parse(bad, ""),
                    Parsed::Usage {
                        command: "create",
                        ..
                    }
                ),
                "{bad}: {:?}",
                parse(bad, "")
            );
        }
    }

    #[test]
    fn tokens_and_user_ids_are_checked() {
        assert_eq!(
            cmd("show abc DEF-1.2"),
            Command::Show(vec!["abc".into(), "DEF-1.2".into()])
        );
        assert_eq!(cmd("delete abc"), Command::Delete(vec!["abc".into()]));
        assert!(matches!(
            parse("delete", ""),
            Parsed::Usage {
                command: "delete",
                ..
            }
        ));
        assert!(matches!(
            parse("show a/b", ""),
            Parsed::Usage {
                command: "show",
                ..
            }
        ));
        assert_eq!(
            cmd("allow @friend:example.com @b:x.org"),
            Command::Allow(vec!["@friend:example.com".into(), "@b:x.org".into()])
        );
        assert_eq!(
            cmd("disallow @friend:example.com"),
            Command::Disallow(vec!["@friend:example.com".into()])
        );
        assert!(matches!(
            parse("allow friend", ""),
            Parsed::Usage {
                command: "allow",
                ..
            }
        ));
    }

    #[test]
    fn account_commands() {
        assert_eq!(cmd("doctor"), Command::Doctor);
        assert!(cmd("doctor").manages_users(), "doctor is for admins");
        assert_eq!(cmd("users"), Command::Users);
        assert!(cmd("users").manages_users());
        assert!(!cmd("create").manages_users());
        assert_eq!(cmd("user @a:x"), Command::User("@a:x".into()));
        assert_eq!(
            cmd("reset-password alice"),
            Command::ResetPassword("alice".into())
        );
        assert_eq!(
            cmd("deactivate @a:x"),
            Command::Deactivate {
                user: "@a:x".into(),
                erase: false,
                confirm: false
            }
        );
        assert_eq!(
            cmd("Deactivate @a:x ERASE confirm"),
            Command::Deactivate {
                user: "@a:x".into(),
                erase: true,
                confirm: true
            }
        );
        for bad in [
            "user",
            "user a b",
            "deactivate",
            "deactivate @a:x yes",
            "users x",
        ] {
            assert!(matches!(parse(bad, ""), Parsed::Usage { .. }), "{bad}");
        }
        assert!(
            help("", "x")
                .markdown
                .contains("`reset-password @user:server`")
        );
    }

    #[test]
    fn user_lines_say_what_is_known() {
        let u = UserInfo {
            name: "@alice:example.com".into(),
            displayname: None,
            admin: true,
            deactivated: false,
            erased: false,
            is_guest: false,
            locked: false,
            user_type: None,
            creation_ts: Some(1_767_225_600_000),
            last_seen_ts: None,
        };
        assert_eq!(
            user_line(&u),
            "`@alice:example.com`: server admin, created 2026-01-01 00:00 UTC, not seen yet"
        );
        let d = UserDetails {
            user: UserInfo {
                admin: false,
                deactivated: true,
                erased: true,
                ..u
            },
            devices: vec![crate::synapse::admin::Device {
                device_id: "ABC".into(),
                display_name: Some("Element".into()),
                last_seen_ip: Some("192.0.2.1".into()),
                last_seen_ts: Some(1_767_225_600_000),
                last_seen_user_agent: None,
            }],
            joined_rooms: 1,
        };
        let md = user_details(&d).markdown;
        assert!(
            md.starts_with("`@alice:example.com`: erased, created"),
            "{md}"
        );
        assert!(md.contains("In 1 room; 1 device:"), "{md}");
        assert!(
            md.contains("- `ABC` Element: last seen 2026-01-01 00:00 UTC from 192.0.2.1"),
            "{md}"
        );
    }

    #[test]
    fn delete_all_needs_confirm() {
        assert_eq!(cmd("delete-all"), Command::DeleteAll { confirm: false });
        assert_eq!(
            cmd("delete-all CONFIRM"),
            Command::DeleteAll { confirm: true }
        );
        assert!(matches!(parse("delete-all yes", ""), Parsed::Usage { .. }));
    }

    #[test]
    fn prefix_unknown_and_empty() {
        assert_eq!(parse("create", "!"), Parsed::NotForMe);
        assert_eq!(
            parse("!create 3", "!"),
            Parsed::Command(Command::Create {
                uses: Some(3),
                expires_in: Some(DEFAULT_EXPIRY)
            })
        );
        assert_eq!(
            parse("!REG list", "!reg"),
            Parsed::Command(Command::List { all: false })
        );
        assert_eq!(parse("   ", ""), Parsed::NotForMe);
        assert_eq!(parse("!", "!"), Parsed::NotForMe);
        assert_eq!(parse("hello there", ""), Parsed::Unknown("hello".into()));
        // "helpful" is not help (the old bot matched help anywhere in the message).
        assert_eq!(parse("helpful", ""), Parsed::Unknown("helpful".into()));
    }

    #[test]
    fn element_reply_fallback_is_skipped() {
        let body = "> <@registration-bot:example.com> `abc`: used 0 of 1\n> more\n\ndelete abc";
        assert_eq!(cmd(body), Command::Delete(vec!["abc".into()]));
    }

    #[test]
    fn replies_have_code_spans_and_a_plain_body() {
        let t = RegistrationToken {
            token: "AbC_1".into(),
            uses_allowed: Some(2),
            pending: 0,
            completed: 0,
            expiry_time: Some(1_767_225_600_000),
        };
        let line = token_line(&t, 1_767_139_200_000);
        assert_eq!(
            line,
            "`AbC_1`: used 0 of 2, expires in 1d0h (until 2026-01-01 00:00 UTC)"
        );
        let used = RegistrationToken {
            completed: 2,
            ..t.clone()
        };
        assert!(token_line(&used, 0).ends_with("(used up)"));
        assert!(token_line(&t, 1_767_225_600_001).ends_with("(expired)"));
        let c = created(&t, 1_767_139_200_000, "https://m.example.com/invite#AbC_1").plain();
        assert!(c.starts_with("New token: `AbC_1`\n\nused 0 of 2"), "{c}");
        assert!(c.ends_with(": https://m.example.com/invite#AbC_1"), "{c}");
        let r = Reply::new(format!("**Created:** {line}"));
        assert!(r.plain().starts_with("Created: `AbC_1`"), "{}", r.plain());
        assert!(
            help("!", "example.com")
                .markdown
                .contains("`!create [USES] [EXPIRY]`")
        );
        assert!(unknown("frob", "").markdown.contains("`help`"));
    }
}
