//! The bot's account and its one device: made once with shared-secret registration (a server
//! admin), then the same device, access token and crypto store at every start, so the keys
//! other people's clients shared with it keep decrypting after a restart.

use std::path::Path;

use anyhow::{Context, Result, bail};
use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId};
use matrix_sdk::{Client, SessionMeta, SessionTokens};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::Deps;
use crate::fsutil::{Owner, ensure_dir, write_atomic};
use crate::secrets::{Kind, Secret};
use crate::synapse::admin::{AdminError, Synapse};

const SESSION_FILE: &str = "session.json";
const STORE_DIR: &str = "store";
const DEVICE_NAME: &str = "homelab-matrix registration bot";

/// state/bot/session.json (0600): enough to restore the session without a login.
#[derive(Serialize, Deserialize)]
struct Saved {
    user_id: String,
    device_id: String,
    access_token: String,
}

pub(super) struct Session {
    pub client: Client,
    pub user_id: OwnedUserId,
    pub access_token: Secret,
    /// A device made just now (its store has no history yet).
    pub is_new: bool,
    password: Secret,
}

impl Session {
    /// Logs in once, ever: restores the saved session, or logs in again into the same device
    /// when its token was revoked, or makes the account (or a first device) when there is none.
    pub async fn open(deps: &Deps) -> Result<Session> {
        let dir = deps.dir();
        ensure_dir(&dir, Owner::root(), 0o700)?;
        let synapse = Synapse::new(&deps.cfg.synapse_local_url());
        let localpart = deps.cfg.bot.localpart.as_str();
        let user_id = format!("@{localpart}:{}", deps.cfg.server_name);
        let password = deps.secrets.get(Kind::BotPassword)?;
        let saved = match read_saved(&dir)? {
            Some(s) if s.user_id == user_id => Some(s),
            Some(s) => {
                tracing::warn!(
                    old = %s.user_id, new = %user_id,
                    "bot.localpart changed: starting a new session for the new account"
                );
                None
            }
            None => None,
        };
        let is_new = saved.is_none();
        let saved = match saved {
            Some(s) => match synapse.whoami(&s.access_token).await {
                Ok(_) => s,
                Err(AdminError::Api { status, .. }) if status == StatusCode::UNAUTHORIZED => {
                    tracing::info!(device = %s.device_id, "the bot's access token is no longer valid; logging in again to the same device");
                    let r = synapse
                        .login_device(
                            localpart,
                            password.expose(),
                            Some(&s.device_id),
                            DEVICE_NAME,
                        )
                        .await
                        .with_context(|| wrong_password(&user_id, deps))?;
                    save(&dir, &user_id, &s.device_id, &r.access_token)?
                }
                Err(e) => return Err(e).context("checking the bot's saved session"),
            },
            None => {
                // A crypto store belongs to one device: a new device starts with a new store.
                remove_store(&dir)?;
                let shared = deps.secrets.get(Kind::RegistrationShared)?;
                let r = match synapse
                    .register_with_secret(&shared, localpart, password.expose(), true)
                    .await
                {
                    Ok(r) if r.device_id.is_some() => {
                        tracing::info!(user = %r.user_id, "created the bot's account (server admin)");
                        r
                    }
                    Ok(_) | Err(AdminError::UserInUse(_)) => synapse
                        .login_device(localpart, password.expose(), None, DEVICE_NAME)
                        .await
                        .with_context(|| wrong_password(&user_id, deps))?,
                    Err(e) => return Err(e).context("creating the bot's account"),
                };
                let device = r.device_id.clone().unwrap_or_default();
                save(&dir, &user_id, &device, &r.access_token)?
            }
        };

        let passphrase = deps.secrets.get(Kind::BotStorePassphrase)?;
        let client = Client::builder()
            .homeserver_url(&deps.client_url)
            .sqlite_store(dir.join(STORE_DIR), Some(passphrase.expose()))
            .build()
            .await
            .with_context(|| {
                format!(
                    "opening the bot's store in {}; if it is damaged, stop homelab-matrix and delete {} and {} (the bot then starts over with a new device)",
                    dir.join(STORE_DIR).display(),
                    dir.join(STORE_DIR).display(),
                    dir.join(SESSION_FILE).display()
                )
            })?;
        let user_id: OwnedUserId = saved.user_id.parse().context("the saved user ID")?;
        let device_id: OwnedDeviceId = saved.device_id.as_str().into();
        client
            .restore_session(MatrixSession {
                meta: SessionMeta {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                },
                tokens: SessionTokens {
                    access_token: saved.access_token.clone(),
                    refresh_token: None,
                },
            })
            .await
            .with_context(|| {
                format!(
                    "restoring the bot's session from its store; if the store belongs to another device, delete {} and restart",
                    dir.join(STORE_DIR).display()
                )
            })?;
        tracing::info!(user = %user_id, device = %device_id, "the bot is logged in");
        Ok(Session {
            client,
            user_id,
            access_token: Secret::new(saved.access_token),
            is_new,
            password,
        })
    }

    /// Makes the bot's device trusted by its own identity (Matrix spec, "Cross-signing"): a
    /// master key, a self-signing key that signs this device, a user-signing key. Then clients
    /// that see it do not show it as an unverified session. Needs the keys in this store; with
    /// a lost store the identity is replaced (uploading over an existing one asks for the
    /// password, through user-interactive auth).
    pub async fn cross_sign(&self) -> Result<()> {
        let enc = self.client.encryption();
        let complete = enc
            .cross_signing_status()
            .await
            .is_some_and(|s| s.is_complete());
        if !complete {
            if let Err(e) = enc.bootstrap_cross_signing(None).await {
                let Some(info) = e.as_uiaa_response() else {
                    return Err(e).context("uploading the bot's cross-signing keys");
                };
                let mut pw = uiaa::Password::new(
                    uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(
                        self.user_id.to_string(),
                    )),
                    self.password.expose().to_string(),
                );
                pw.session = info.session.clone();
                enc.bootstrap_cross_signing(Some(uiaa::AuthData::Password(pw)))
                    .await
                    .context("uploading the bot's cross-signing keys (with its password)")?;
            }
            tracing::info!("the bot's cross-signing keys are set up");
        }
        Ok(())
    }

    /// Whether this device is signed by the bot's own identity, as its store knows.
    pub async fn is_cross_signed(&self) -> bool {
        matches!(
            self.client.encryption().get_own_device().await,
            Ok(Some(d)) if d.is_cross_signed_by_owner()
        )
    }
}

fn wrong_password(user_id: &str, deps: &Deps) -> String {
    format!(
        "the account {user_id} exists but does not accept the password in {}; reset its password with Synapse's admin API, or set bot.localpart to a new name",
        deps.secrets.path(Kind::BotPassword).display()
    )
}

fn read_saved(dir: &Path) -> Result<Option<Saved>> {
    let path = dir.join(SESSION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
            format!(
                "reading {}; delete it (and {}) to let the bot start over with a new device",
                path.display(),
                dir.join(STORE_DIR).display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save(dir: &Path, user_id: &str, device_id: &str, access_token: &str) -> Result<Saved> {
    if device_id.is_empty() {
        bail!("Synapse returned no device for the bot's login");
    }
    let s = Saved {
        user_id: user_id.into(),
        device_id: device_id.into(),
        access_token: access_token.into(),
    };
    write_atomic(
        &dir.join(SESSION_FILE),
        serde_json::to_string_pretty(&s)?.as_bytes(),
        Owner::root(),
        0o600,
    )?;
    Ok(s)
}

fn remove_store(dir: &Path) -> Result<()> {
    let store = dir.join(STORE_DIR);
    match std::fs::remove_dir_all(&store) {
        Ok(()) => {
            tracing::info!(store = %store.display(), "removed the crypto store of a previous device");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", store.display())),
    }
}
