//! The registration bot (DESIGN.md §9), in-process: a Matrix client (matrix-sdk, end-to-end
//! encryption, sqlite store under state/bot) on the bot's own account, which manages
//! registration tokens through Synapse's admin API for the admins who DM it, and tells them
//! about problems from the `alerts` registry.
//!
//! - `commands`: parsing and reply texts (pure).
//! - `access`: the `allow` list, persisted.
//! - `session`: the account, its one device kept across restarts, the client and cross-signing.
//! - `events`: invites, messages, commands and the admin alerts.
//!
//! The Matrix parts are behind the `bot` cargo feature (on by default); without it `start` only
//! reports that this build has no bot.

pub mod access;
pub mod commands;
#[cfg(feature = "bot")]
mod events;
#[cfg(feature = "bot")]
mod session;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::alerts::Alerts;
use crate::config::Config;
use crate::secrets::Secrets;

/// What `homelab-matrix status` shows about the bot.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BotStatus {
    /// disabled | not built | starting | running | retrying | stopped
    pub state: String,
    pub user_id: Option<String>,
    pub device_id: Option<String>,
    /// Its device is signed by its own cross-signing identity, so clients do not flag it.
    pub cross_signed: bool,
    /// Users added with `allow` (server admins and `bot.admins` may always command it).
    pub allowed: Vec<String>,
    pub last_error: Option<String>,
}

/// The running bot, as `App` holds it.
pub struct Bot {
    status: Arc<Mutex<BotStatus>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// What the bot needs from the app.
#[derive(Clone)]
pub struct Deps {
    pub cfg: Config,
    pub secrets: Secrets,
    pub alerts: Alerts,
    /// Synapse's client API: the main process, or with workers the way through the front
    /// door's balancer (http::inner).
    pub client_url: String,
}

impl Deps {
    /// state/bot: session, crypto store, allow list (root, 0700; DESIGN.md §3).
    pub fn dir(&self) -> PathBuf {
        self.cfg.state_dir().join("bot")
    }
}

impl Bot {
    /// Not started (yet): `status` says so.
    pub fn idle(cfg: &Config) -> Bot {
        let state = if !cfg.bot.enabled {
            "disabled"
        } else if cfg!(feature = "bot") {
            "starting"
        } else {
            "not built"
        };
        Bot {
            status: Arc::new(Mutex::new(BotStatus {
                state: state.into(),
                ..BotStatus::default()
            })),
            task: Mutex::new(None),
        }
    }

    pub fn status(&self) -> BotStatus {
        self.status.lock().unwrap().clone()
    }

    /// Starts the bot's task (once Synapse is ready); it runs until `stop` turns true,
    /// logging in again and retrying with back-off when something fails.
    pub fn start(&self, deps: Deps, stop: watch::Receiver<bool>) {
        if !deps.cfg.bot.enabled {
            return;
        }
        #[cfg(feature = "bot")]
        {
            let task = tokio::spawn(events::run(deps, self.status.clone(), stop));
            *self.task.lock().unwrap() = Some(task);
        }
        #[cfg(not(feature = "bot"))]
        {
            let _ = stop;
            tracing::warn!(
                "bot.enabled is true but this build has no bot (cargo feature `bot`); set bot.enabled = false, or install a build with it"
            );
        }
    }

    /// Waits for the task to end after `stop` was sent (bounded: a hung request must not hold
    /// up the children's shutdown).
    pub async fn stopped(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(mut t) = task
            && tokio::time::timeout(std::time::Duration::from_secs(5), &mut t)
                .await
                .is_err()
        {
            tracing::warn!("the bot did not stop within 5s; stopping it now");
            t.abort();
        }
        let mut s = self.status.lock().unwrap();
        if s.state != "disabled" && s.state != "not built" {
            s.state = "stopped".into();
        }
    }
}
