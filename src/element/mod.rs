//! Element Web (DESIGN.md §8): served on the element host from an installed release, with a
//! `config.json` made for this server, and kept up to date from signed upstream releases.
//!
//! Releases live in `state/element/<version>/` (see `tree`). `current` and `previous` are
//! symlinks naming versions; a switch replaces the symlink with rename(2) and then swaps the
//! in-memory tree, so a request sees either the old release or the new one, never a mix.
//! The previous release stays on disk for `homelab-matrix element rollback`, and its
//! `bundles/` keep being served so tabs opened before an update keep loading their chunks.
//!
//! - here: the installed releases and the switch between them;
//! - `serve`: answering the element host's requests (caching, encodings, CSP);
//! - `config_json`: the `config.json` made for this server;
//! - `update`: the updater (signed upstream releases, rollback, the pinned release);
//! - `release`: upstream releases and their signatures; `tree`: one release on disk.

mod config_json;
pub mod release;
mod serve;
pub mod tree;
mod update;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::alerts::{self, Alerts};
use crate::config::Config;
use crate::fsutil::{Owner, ensure_dir, write_atomic};
use crate::secrets::{random_fraction, random_token, sha256_hex};
use crate::units::unix;
use release::{Release, ReleaseError, TrustedKey, Version};
use tree::{CacheClass, Encoding, Tree};

pub use config_json::client_config;
use config_json::client_config_bytes;
pub use serve::{CSP, negotiate};
use update::http_client;
pub use update::{PinnedRelease, describe, fetch_pinned};

/// The release built into the binary by packaging/fetch-element (empty in offline builds).
/// Source maps stay out: they are a large part of a release and browsers fetch them only
/// with developer tools open.
#[derive(rust_embed::RustEmbed)]
#[folder = "embedded/element/"]
#[allow_missing = true]
#[exclude = "*.map"]
struct Bundled;

/// The Element release key as downloaded and fingerprint-checked by packaging/fetch-element.
#[derive(rust_embed::RustEmbed)]
#[folder = "embedded/keys/"]
#[allow_missing = true]
struct BundledKeys;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("could not check {url}: {message}")]
    Check { url: String, message: String },
    #[error("could not download {url}: {message}")]
    Download { url: String, message: String },
    #[error("the latest release {latest} is older than the installed {current}; keeping {current}")]
    Older { latest: String, current: String },
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error("could not get the Element release key: {0}")]
    Key(String),
    #[error("installing failed: {0:#}")]
    Install(anyhow::Error),
    #[error("no previous release to roll back to")]
    NoPrevious,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    UpToDate {
        current: String,
    },
    Available {
        current: Option<String>,
        latest: String,
    },
    Held {
        current: String,
        latest: String,
    },
    Installed {
        previous: Option<String>,
        current: String,
    },
    RolledBack {
        from: String,
        to: String,
    },
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ElementStatus {
    pub version: Option<String>,
    pub previous: Option<String>,
    pub bundled: Option<String>,
    pub auto_update: bool,
    /// Set by a rollback: releases up to this one are not installed automatically.
    pub held: Option<String>,
    pub last_check: Option<u64>,
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    pub next_check: Option<u64>,
}

pub struct Element {
    dir: PathBuf,
    release_url: String,
    key_url: String,
    test_key: Option<PathBuf>,
    auto_update: bool,
    interval: Duration,
    overrides_path: PathBuf,
    client: reqwest::Client,
    current: ArcSwapOption<Tree>,
    previous: ArcSwapOption<Tree>,
    config_json: arc_swap::ArcSwap<(Bytes, String)>,
    status: Mutex<ElementStatus>,
    busy: tokio::sync::Mutex<()>,
    alerts: Alerts,
}

/// Copies regular files and directories; links and special files are refused.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let t = e.file_type()?;
        let dest = to.join(e.file_name());
        if t.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else if t.is_file() {
            std::fs::copy(e.path(), &dest)?;
        } else {
            anyhow::bail!("{}: not a regular file or directory", e.path().display());
        }
    }
    Ok(())
}

fn bundled_version() -> Option<Version> {
    Bundled::get("index.html")?;
    let v = Bundled::get("version")?;
    Version::parse(std::str::from_utf8(&v.data).ok()?)
}

/// A release's `version` file (small; a huge or unreadable one counts as missing).
fn read_version_file(files: &Path) -> Option<String> {
    let p = files.join("version");
    let meta = std::fs::symlink_metadata(&p).ok()?;
    if !meta.is_file() || meta.len() > 256 {
        return None;
    }
    std::fs::read_to_string(p).ok()
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Points `dir/name` at `target` with rename(2), which replaces the old link atomically.
fn set_link(dir: &Path, name: &str, target: &Path) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name))
        .with_context(|| format!("switching {}", dir.join(name).display()))?;
    Ok(())
}

impl Element {
    /// Opens what is installed under `state/element`; fails only on an unreadable operator
    /// `element.json`, which names the file and the fix.
    pub fn new(
        cfg: &Config,
        config_dir: &Path,
        https_port: u16,
        alerts: Alerts,
    ) -> Result<Arc<Element>> {
        let dir = cfg.state_dir().join("element");
        ensure_dir(&dir, Owner::root(), 0o755)?;
        // Leftovers of an install interrupted by a crash or power loss.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".partial-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let overrides_path = config_dir.join("element.json");
        let config_json = client_config_bytes(cfg, https_port, &overrides_path)?;
        // Tests only (config.rs allows an http:// loopback release server and a test key only
        // with this switch); said loudly, since it weakens what the updater trusts.
        let test_mode = cfg.element.test_mode;
        if test_mode {
            tracing::warn!(
                "element.test_mode is on: Element releases may come from a loopback http:// server and be signed by element.test_release_key; never set it on a real server"
            );
        }
        let client = http_client(!test_mode)?;
        let e = Element {
            release_url: cfg.element.release_url.clone(),
            key_url: cfg.element.release_key_url.clone(),
            test_key: (test_mode && !cfg.element.test_release_key.is_empty())
                .then(|| PathBuf::from(&cfg.element.test_release_key)),
            auto_update: cfg.element.auto_update,
            interval: cfg.element.check_interval.v(),
            overrides_path,
            client,
            current: ArcSwapOption::empty(),
            previous: ArcSwapOption::empty(),
            config_json: arc_swap::ArcSwap::from_pointee(config_json),
            status: Mutex::new(ElementStatus {
                auto_update: cfg.element.auto_update,
                bundled: bundled_version().map(|v| v.text),
                ..Default::default()
            }),
            busy: tokio::sync::Mutex::new(()),
            alerts,
            dir,
        };
        e.current.store(e.open_link("current").map(Arc::new));
        e.previous.store(e.open_link("previous").map(Arc::new));
        e.status.lock().unwrap().held = read_trimmed(&e.dir.join("hold"));
        e.refresh_status();
        if let Some(t) = e.current.load_full() {
            tracing::info!(version = %t.version, files = t.file_count(), "Element release installed");
        }
        Ok(Arc::new(e))
    }

    fn open_link(&self, name: &str) -> Option<Tree> {
        let target = std::fs::read_link(self.dir.join(name)).ok()?;
        match Tree::open(&self.dir.join(target)) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("Element {name} release unusable: {e:#}");
                None
            }
        }
    }

    fn refresh_status(&self) {
        let mut s = self.status.lock().unwrap();
        s.version = self.current.load().as_ref().map(|t| t.version.clone());
        s.previous = self.previous.load().as_ref().map(|t| t.version.clone());
    }

    pub fn status(&self) -> ElementStatus {
        self.status.lock().unwrap().clone()
    }

    pub fn version(&self) -> Option<String> {
        self.current.load().as_ref().map(|t| t.version.clone())
    }

    /// Re-reads the operator's `element.json` (SIGHUP); a broken file keeps the current one.
    pub fn reload_config(&self, cfg: &Config, https_port: u16) -> Result<()> {
        let fresh = client_config_bytes(cfg, https_port, &self.overrides_path)?;
        self.config_json.store(Arc::new(fresh));
        Ok(())
    }
}
