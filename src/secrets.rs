//! Generated secrets (DESIGN.md §3): made once from the OS CSPRNG, kept in `state/secrets`
//! (root, 0700; files 0600), never regenerated while present and never logged.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ring::rand::{SecureRandom, SystemRandom};

use crate::fsutil::{Owner, ensure_dir, write_atomic};

/// The secrets the appliance generates, by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Synapse `registration_shared_secret`: HMAC key for admin registration.
    RegistrationShared,
    /// Synapse `macaroon_secret_key`.
    Macaroon,
    /// Synapse `form_secret`.
    Form,
    /// Password of the PostgreSQL role Synapse logs in as.
    PostgresPassword,
    /// coturn `static-auth-secret` = Synapse `turn_shared_secret`.
    TurnShared,
    /// Password of the appliance's own admin account (used to log in again if its token is lost).
    ServicePassword,
    /// Password of the registration bot's account: to log in again if its token is lost, and
    /// for the user-interactive auth that uploading cross-signing keys asks for.
    BotPassword,
    /// Passphrase of the bot's sqlite store (its end-to-end encryption keys).
    BotStorePassphrase,
    /// Synapse `worker_replication_secret`: authenticates HTTP replication between Synapse's
    /// processes (docs/workers.md: unauthenticated without it).
    WorkerReplication,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::RegistrationShared,
        Kind::Macaroon,
        Kind::Form,
        Kind::PostgresPassword,
        Kind::TurnShared,
        Kind::ServicePassword,
        Kind::BotPassword,
        Kind::BotStorePassphrase,
        Kind::WorkerReplication,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Kind::RegistrationShared => "registration_shared_secret",
            Kind::Macaroon => "macaroon_secret_key",
            Kind::Form => "form_secret",
            Kind::PostgresPassword => "postgres_password",
            Kind::TurnShared => "turn_shared_secret",
            Kind::ServicePassword => "service_account_password",
            Kind::BotPassword => "bot_account_password",
            Kind::BotStorePassphrase => "bot_store_passphrase",
            Kind::WorkerReplication => "worker_replication_secret",
        }
    }
}

/// A secret value. Its Debug and Display never show the value, so it cannot leak into a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The secrets directory.
#[derive(Debug, Clone)]
pub struct Secrets {
    dir: PathBuf,
}

impl Secrets {
    pub fn dir_for(state_dir: &Path) -> PathBuf {
        state_dir.join("secrets")
    }

    /// Opens the directory for reading only (the CLI, which must not create anything).
    pub fn open(state_dir: &Path) -> Secrets {
        Secrets {
            dir: Self::dir_for(state_dir),
        }
    }

    /// Creates the directory and every missing secret. Present secrets are left untouched.
    pub fn ensure(state_dir: &Path) -> Result<Secrets> {
        let s = Self::open(state_dir);
        ensure_dir(&s.dir, Owner::root(), 0o700)?;
        let rng = SystemRandom::new();
        for kind in Kind::ALL {
            let path = s.path(kind);
            if path.exists() {
                // Correct a mode loosened by hand, but never the content.
                crate::fsutil::set_owner_mode(&path, Owner::root(), 0o600)?;
                continue;
            }
            let value = random_token(&rng)?;
            write_atomic(&path, value.as_bytes(), Owner::root(), 0o600)?;
            tracing::info!(secret = kind.file_name(), "generated a new secret");
        }
        Ok(s)
    }

    pub fn path(&self, kind: Kind) -> PathBuf {
        self.dir.join(kind.file_name())
    }

    pub fn get(&self, kind: Kind) -> Result<Secret> {
        self.read_named(kind.file_name())
    }

    /// Reads a secret file by name (also the stored access token, which is not generated here).
    pub fn read_named(&self, name: &str) -> Result<Secret> {
        let path = self.dir.join(name);
        let v = fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {}; run homelab-matrix as root, and start the service once so it creates its secrets",
                path.display()
            )
        })?;
        let v = v.trim().to_string();
        if v.is_empty() {
            bail!(
                "{} is empty; delete it and restart homelab-matrix to generate a new one",
                path.display()
            );
        }
        Ok(Secret(v))
    }

    pub fn write_named(&self, name: &str, value: &Secret) -> Result<()> {
        write_atomic(
            &self.dir.join(name),
            value.expose().as_bytes(),
            Owner::root(),
            0o600,
        )
    }
}

/// 32 bytes from the OS CSPRNG (getrandom), hex: 256 bits, safe in YAML, URLs and SQL literals.
pub fn random_token(rng: &SystemRandom) -> Result<String> {
    let mut buf = [0u8; 32];
    rng.fill(&mut buf)
        .map_err(|_| anyhow::anyhow!("the OS random number generator failed"))?;
    Ok(hex(&buf))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 (file pins, ETags).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// A uniform number in [0, 1) from the OS CSPRNG, for jitter; 0.5 if it fails.
pub fn random_fraction() -> f64 {
    let mut b = [0u8; 4];
    if SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    u32::from_le_bytes(b) as f64 / (u32::MAX as f64 + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn tokens_are_random_and_hex() {
        let rng = SystemRandom::new();
        let a = random_token(&rng).unwrap();
        let b = random_token(&rng).unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
