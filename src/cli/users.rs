//! `homelab-matrix user ...`: Matrix accounts, through Synapse's admin API with the
//! appliance's own service account (`user add` uses shared-secret registration instead, so it
//! works before any admin exists).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};

use crate::bot::commands::utc;
use crate::config::{self, Config};
use crate::secrets::{Kind, Secrets};
use crate::synapse::admin::{
    self, Admin, AdminError, UserDetails, UserFilter, UserInfo, local_user_id, protected_account,
};

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Register a user with Synapse's shared secret.
    Add {
        /// The user name (the part before the colon).
        name: String,
        /// Make the user a server admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from this file's first line instead of asking.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// List this server's users: admin flag, state, creation time, last seen.
    List {
        #[arg(long)]
        json: bool,
        /// Also list deactivated users.
        #[arg(long)]
        deactivated: bool,
        /// Also list guest users.
        #[arg(long)]
        guests: bool,
    },
    /// Show one user, with their devices and the number of rooms they are in.
    Show {
        /// `alice` or `@alice:SERVER_NAME`.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Deactivate a user for good: logged out, removed from their rooms, cannot log in again.
    Deactivate {
        /// `alice` or `@alice:SERVER_NAME`.
        name: String,
        /// Also erase them (GDPR): their messages are shown redacted to people who join later.
        #[arg(long)]
        erase: bool,
        /// Do not ask for confirmation (needed without a terminal).
        #[arg(long, short)]
        yes: bool,
    },
    /// Set a new password; logs the user's devices out unless --keep-devices.
    ResetPassword {
        /// `alice` or `@alice:SERVER_NAME`.
        name: String,
        /// Read the password from this file's first line instead of asking.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Keep the user's devices logged in.
        #[arg(long)]
        keep_devices: bool,
    },
    /// Make a user a server admin (on) or not (off).
    Admin {
        /// `alice` or `@alice:SERVER_NAME`.
        name: String,
        state: OnOff,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// A problem with the command line that clap cannot see (a user ID of another server, a
/// confirmation without a terminal): exit code 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub async fn run(cfg: &Config, cmd: UserCmd) -> Result<()> {
    if let UserCmd::Add {
        name,
        admin,
        password_file,
    } = &cmd
    {
        return add(cfg, name, *admin, password_file.as_deref()).await;
    }
    let secrets = Secrets::open(&cfg.state_dir());
    let session = admin::Synapse::new(&cfg.synapse_local_url())
        .service_session(&secrets)
        .await?;
    match cmd {
        UserCmd::Add { .. } => unreachable!("handled above"),
        UserCmd::List {
            json,
            deactivated,
            guests,
        } => {
            let filter = UserFilter {
                deactivated,
                guests,
                admins_only: false,
            };
            let users = session.list_users(filter).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                print_list(&users, filter);
            }
            Ok(())
        }
        UserCmd::Show { name, json } => {
            let id = resolve(cfg, &name)?;
            let d = session.user_details(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print_details(&d);
            }
            Ok(())
        }
        UserCmd::Deactivate { name, erase, yes } => {
            deactivate(cfg, &session, &name, erase, yes).await
        }
        UserCmd::ResetPassword {
            name,
            password_file,
            keep_devices,
        } => {
            let id = resolve_changeable(cfg, &name)?;
            // Unknown and deactivated users are named before a password is asked for.
            if session.get_user(&id).await?.deactivated {
                bail!("{id} is deactivated: a password would not let them in; nothing was changed");
            }
            let password = new_password(&id, password_file.as_deref(), "nothing was changed")?;
            session
                .reset_password(&id, &password, !keep_devices)
                .await?;
            println!(
                "new password set for {id}{}",
                if keep_devices {
                    "; their devices stay logged in"
                } else {
                    "; all their devices were logged out"
                }
            );
            Ok(())
        }
        UserCmd::Admin { name, state } => {
            let on = state == OnOff::On;
            let id = if on {
                resolve(cfg, &name)?
            } else {
                resolve_changeable(cfg, &name)?
            };
            let u = session.get_user(&id).await?;
            if u.deactivated {
                bail!("{id} is deactivated; nothing was changed");
            }
            session.set_admin(&id, on).await?;
            println!(
                "{id} {} a server admin",
                if on { "is now" } else { "is no longer" }
            );
            Ok(())
        }
    }
}

/// NAME as a local user ID; a malformed or remote one is a usage error.
fn resolve(cfg: &Config, name: &str) -> Result<String> {
    local_user_id(name, &cfg.server_name).map_err(|e| UsageError(e.to_string()).into())
}

/// NAME as a local user ID that may be deactivated, demoted or given a new password.
fn resolve_changeable(cfg: &Config, name: &str) -> Result<String> {
    let id = resolve(cfg, name)?;
    if let Some(why) = protected_account(&id, &cfg.server_name, &cfg.bot.localpart) {
        bail!("refused: {why}");
    }
    Ok(id)
}

async fn deactivate(
    cfg: &Config,
    session: &Admin,
    name: &str,
    erase: bool,
    yes: bool,
) -> Result<()> {
    let id = resolve_changeable(cfg, name)?;
    let u = session.get_user(&id).await?;
    if u.already_deactivated(erase) {
        println!("{id} is already deactivated; nothing to do");
        return Ok(());
    }
    let what = if erase {
        format!("Deactivate {id} and erase their messages for people who join later")
    } else {
        format!("Deactivate {id}")
    };
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(UsageError(format!(
                "no terminal to confirm on: add --yes to deactivate {id} without asking"
            ))
            .into());
        }
        eprint!("{what}? This cannot be undone. Type yes to go on: ");
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !answer.trim().eq_ignore_ascii_case("yes") {
            bail!("not confirmed; nothing was changed");
        }
    }
    session.deactivate(&id, erase).await?;
    println!(
        "deactivated {id}{}",
        if erase {
            " and erased their messages for later joiners"
        } else {
            ""
        }
    );
    Ok(())
}

fn ts(ms: Option<i64>) -> String {
    ms.filter(|t| *t > 0)
        .map_or("-".into(), |t| utc(t).trim_end_matches(" UTC").to_string())
}

fn state(u: &UserInfo) -> &'static str {
    match (u.deactivated, u.erased, u.locked, u.is_guest) {
        (true, true, _, _) => "erased",
        (true, false, _, _) => "deactivated",
        (_, _, true, _) => "locked",
        (_, _, _, true) => "guest",
        _ => "active",
    }
}

fn print_list(users: &[UserInfo], filter: UserFilter) {
    if users.is_empty() {
        println!("no users; make one with `homelab-matrix user add NAME`");
        return;
    }
    let width = users.iter().map(|u| u.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  ADMIN  STATE        CREATED (UTC)     LAST SEEN (UTC)",
        "USER"
    );
    for u in users {
        println!(
            "{:<width$}  {:<5}  {:<11}  {:<16}  {}",
            u.name,
            if u.admin { "yes" } else { "no" },
            state(u),
            ts(u.creation_ts),
            ts(u.last_seen_ts),
        );
    }
    let hidden = match (filter.deactivated, filter.guests) {
        (false, false) => " (not counting deactivated users and guests: --deactivated, --guests)",
        (false, true) => " (not counting deactivated users: --deactivated)",
        (true, false) => " (not counting guests: --guests)",
        (true, true) => "",
    };
    println!("{} users{hidden}", users.len());
}

fn print_details(d: &UserDetails) {
    let u = &d.user;
    println!("{}", u.name);
    if let Some(n) = &u.displayname {
        println!("  display name: {n}");
    }
    println!("  server admin: {}", if u.admin { "yes" } else { "no" });
    println!("  state:        {}", state(u));
    println!("  created:      {} UTC", ts(u.creation_ts));
    println!("  last seen:    {} UTC", ts(u.last_seen_ts));
    println!("  rooms joined: {}", d.joined_rooms);
    println!("  devices:      {}", d.devices.len());
    for dev in &d.devices {
        println!(
            "    {:<14} {:<24} last seen {} UTC from {}",
            dev.device_id,
            dev.display_name.as_deref().unwrap_or("-"),
            ts(dev.last_seen_ts),
            dev.last_seen_ip.as_deref().unwrap_or("-"),
        );
    }
}

/// A new password: the first line of `file`, or asked twice without echo on a terminal.
/// `nothing` says what did not happen when the two differ.
fn new_password(who: &str, file: Option<&Path>, nothing: &str) -> Result<String> {
    let password = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the password from {}", f.display()))?;
            text.lines().next().unwrap_or("").to_string()
        }
        None if std::io::stdin().is_terminal() => {
            let a = rpassword::prompt_password(format!("Password for {who}: "))?;
            let b = rpassword::prompt_password("Again: ")?;
            if a != b {
                bail!("the passwords differ; {nothing}");
            }
            a
        }
        None => bail!("no terminal to ask for a password: pass --password-file FILE"),
    };
    if password.chars().count() < 8 {
        bail!("the password is too short: use at least 8 characters; {nothing}");
    }
    Ok(password)
}

async fn add(cfg: &Config, name: &str, admin: bool, password_file: Option<&Path>) -> Result<()> {
    let name = name.trim_start_matches('@');
    let name = name
        .strip_suffix(&format!(":{}", cfg.server_name))
        .unwrap_or(name)
        .to_ascii_lowercase();
    if !config::is_localpart(&name) {
        bail!("{name:?} is not a valid user name: use lowercase letters, digits and . _ = - /");
    }
    let password = new_password(&name, password_file, "nothing was created")?;
    let secrets = Secrets::open(&cfg.state_dir());
    let shared = secrets.get(Kind::RegistrationShared)?;
    let client = admin::Synapse::new(&cfg.synapse_local_url());
    match client
        .register_with_secret(&shared, &name, &password, admin)
        .await
    {
        Ok(r) => {
            println!(
                "created {}{}",
                r.user_id,
                if admin { " (server admin)" } else { "" }
            );
            Ok(())
        }
        Err(AdminError::UserInUse(_)) => bail!(
            "@{name}:{} already exists; nothing was changed",
            cfg.server_name
        ),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Cmd};
    use clap::Parser;

    #[test]
    fn user_subcommands_parse() {
        let cli = Cli::try_parse_from(["homelab-matrix", "user", "admin", "alice", "on"]).unwrap();
        assert!(matches!(
            cli.command,
            Cmd::User(UserCmd::Admin { ref name, state: OnOff::On }) if name == "alice"
        ));
        assert!(Cli::try_parse_from(["homelab-matrix", "user", "admin", "alice", "yes"]).is_err());
        let cli = Cli::try_parse_from([
            "homelab-matrix",
            "user",
            "deactivate",
            "@bob:example.com",
            "--erase",
            "-y",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Cmd::User(UserCmd::Deactivate {
                erase: true,
                yes: true,
                ..
            })
        ));
    }
}
