//! Element Web (DESIGN.md §8): served on the element host from an installed release, with a
//! `config.json` made for this server, and kept up to date from signed upstream releases.
//!
//! Releases live in `state/element/<version>/` (see `tree`). `current` and `previous` are
//! symlinks naming versions; a switch replaces the symlink with rename(2) and then swaps the
//! in-memory tree, so a request sees either the old release or the new one, never a mix.
//! The previous release stays on disk for `homelab-matrix element rollback`, and its
//! `bundles/` keep being served so tabs opened before an update keep loading their chunks.

pub mod release;
pub mod tree;

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

/// Element's hosting advice (element-web README, "Important Security Notes") plus the policy
/// of its own index.html meta CSP, with `frame-ancestors 'self'` added; Element's crypto is
/// wasm, hence `'wasm-unsafe-eval'`.
pub const CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self' 'wasm-unsafe-eval' https://www.recaptcha.net https://www.gstatic.com; img-src * blob: data:; connect-src * blob: data:; font-src 'self' data:; media-src * blob: data:; child-src * blob: data:; worker-src 'self' blob:; frame-src * blob: data:; form-action 'self'; manifest-src 'self'; frame-ancestors 'self'";

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

    /// Answers one request on the element host.
    pub async fn serve(&self, method: &Method, path: &str, headers: &HeaderMap) -> Response<Bytes> {
        let mut resp = self.respond(method, path, headers).await;
        let h = resp.headers_mut();
        h.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("strict-origin-when-cross-origin"),
        );
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        if method == Method::HEAD {
            // RFC 9110 §9.3.2: the headers a GET would have, including its length.
            let len = HeaderValue::from(resp.body().len());
            resp.headers_mut().insert(header::CONTENT_LENGTH, len);
            *resp.body_mut() = Bytes::new();
        }
        resp
    }

    async fn respond(&self, method: &Method, path: &str, headers: &HeaderMap) -> Response<Bytes> {
        if method != Method::GET && method != Method::HEAD {
            let mut r = simple(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET or HEAD only\n",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let Some(key) = tree::key_for(path) else {
            return not_found();
        };
        // Element asks for config.<hostname>.json first and falls back to config.json only on
        // a 404 (element-web docs/config.md), so only config.json exists here.
        if key == "config.json" {
            let cj = self.config_json.load();
            return representation(
                &cj.1,
                CacheClass::Revalidate,
                "application/json",
                false,
                Encoding::Identity,
                cj.0.clone(),
            );
        }
        if key.starts_with("config.") && key.ends_with(".json") {
            return not_found();
        }
        let Some(current) = self.current.load_full() else {
            return installing_page();
        };
        let mut tree = current;
        if tree.entry(&key).is_none()
            && key.starts_with("bundles/")
            && let Some(prev) = self.previous.load_full()
        {
            tree = prev;
        }
        let Some(entry) = tree.entry(&key) else {
            return not_found();
        };
        let enc = negotiate(headers, entry.br.is_some(), entry.gz.is_some());
        let etag = match enc.token() {
            None => format!("\"{}\"", &entry.sha256[..32]),
            Some(t) => format!("\"{}-{t}\"", &entry.sha256[..32]),
        };
        let varies = entry.br.is_some() || entry.gz.is_some();
        if if_none_match(headers, &etag) {
            return not_modified(&etag, CacheClass::of(&key), varies);
        }
        let body = match tree.read(&key, enc).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(file = %key, version = %tree.version, "reading an Element file: {e}");
                return simple(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "this file could not be read; see the server log\n",
                );
            }
        };
        representation(
            &etag,
            CacheClass::of(&key),
            tree::content_type(&key),
            varies,
            enc,
            body,
        )
    }

    /// The updater: on start, then every `check_interval` with ±10% jitter. A failure leaves
    /// the serving release alone and shows in `status`.
    pub async fn maintain(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if let Err(e) = self.install_bundled().await {
            tracing::error!("installing the bundled Element release: {e:#}");
        }
        let mut first = true;
        loop {
            if self.auto_update || self.current.load().is_none() {
                if !self.auto_update {
                    tracing::info!(
                        "no Element release installed yet: fetching one although element.auto_update is off"
                    );
                }
                match self.update(false).await {
                    Ok(o) => tracing::info!("Element update check: {}", describe(&o)),
                    Err(e) => tracing::error!(
                        "Element update failed, the current release keeps serving: {e}"
                    ),
                }
            } else if first {
                tracing::info!(
                    "element.auto_update is off: `homelab-matrix element update` installs new releases"
                );
            }
            first = false;
            // Until a release is installed, retry sooner than the interval.
            let base = if self.current.load().is_none() {
                self.interval.min(Duration::from_secs(300))
            } else {
                self.interval
            };
            let wait = jitter(base);
            self.status.lock().unwrap().next_check = Some(unix(SystemTime::now() + wait));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Installs the release built into the binary when nothing newer is installed (first
    /// start of a package, or a package upgrade that brings a newer release).
    async fn install_bundled(&self) -> Result<()> {
        let Some(bundled) = bundled_version() else {
            if self.current.load().is_none() {
                tracing::info!(
                    "this build carries no Element release; fetching one from {}",
                    self.release_url
                );
            }
            return Ok(());
        };
        let current = self.version().and_then(|v| Version::parse(&v));
        if current.as_ref().is_some_and(|c| *c >= bundled) {
            return Ok(());
        }
        let _busy = self.busy.lock().await;
        let staging = self.staging_dir(&bundled)?;
        let s = staging.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for name in Bundled::iter() {
                let f = Bundled::get(&name).context("an embedded file vanished")?;
                let p = s.join("files").join(name.as_ref());
                std::fs::create_dir_all(p.parent().expect("a file has a parent"))?;
                std::fs::write(&p, &f.data)?;
            }
            Ok(())
        })
        .await??;
        self.finish_and_switch(staging, &bundled).await?;
        tracing::info!(version = %bundled, "installed the bundled Element release");
        Ok(())
    }

    /// Installs an already unpacked and verified release tree (a copy is made) and serves it.
    pub async fn install_from_dir(&self, src: &Path, version: &str) -> Result<()> {
        let v = Version::parse(version).with_context(|| format!("{version:?} is not a version"))?;
        let _busy = self.busy.lock().await;
        let staging = self.staging_dir(&v)?;
        let (from, to) = (src.to_owned(), staging.join("files"));
        tokio::task::spawn_blocking(move || copy_tree(&from, &to)).await??;
        self.finish_and_switch(staging, &v).await
    }

    /// Checks the release URL and, unless `check_only`, installs a newer release.
    pub async fn update(&self, check_only: bool) -> Result<Outcome, UpdateError> {
        let _busy = self.busy.lock().await;
        let result = self.update_locked(check_only).await;
        let mut s = self.status.lock().unwrap();
        s.last_check = Some(unix(SystemTime::now()));
        match &result {
            Ok(o) => {
                s.last_result = Some(describe(o));
                s.last_error = None;
                self.alerts.clear(alerts::ELEMENT_UPDATE);
            }
            Err(e) => {
                s.last_result = Some("failed".into());
                s.last_error = Some(e.to_string());
                self.alerts.raise(
                    alerts::ELEMENT_UPDATE,
                    format!("Element Web could not be updated; the installed release keeps serving. {e}. `homelab-matrix status` shows it; `homelab-matrix element update` retries now."),
                );
            }
        }
        drop(s);
        self.refresh_status();
        result
    }

    async fn update_locked(&self, check_only: bool) -> Result<Outcome, UpdateError> {
        let latest = self.latest().await?;
        let current = self.version().and_then(|v| Version::parse(&v));
        let held = self.status().held.and_then(|h| Version::parse(&h));
        match &current {
            Some(c) if latest.version == *c => {
                return Ok(Outcome::UpToDate {
                    current: c.to_string(),
                });
            }
            Some(c) if latest.version < *c => {
                return Err(UpdateError::Older {
                    latest: latest.version.to_string(),
                    current: c.to_string(),
                });
            }
            Some(c) if held.as_ref().is_some_and(|h| latest.version <= *h) => {
                return Ok(Outcome::Held {
                    current: c.to_string(),
                    latest: latest.version.to_string(),
                });
            }
            _ => {}
        }
        if check_only {
            return Ok(Outcome::Available {
                current: current.map(|c| c.to_string()),
                latest: latest.version.to_string(),
            });
        }
        let key = self.trusted_key().await?;
        let tarball = download(
            &self.client,
            &latest.tarball_url,
            latest.tarball_size,
            release::MAX_TARBALL,
        )
        .await?;
        let sig = download(&self.client, &latest.signature_url, None, MAX_SMALL).await?;
        let signer = key.verify(&tarball, &sig)?;
        tracing::info!(version = %latest.version, signer = %signer, bytes = tarball.len(), "Element release signature verified");
        let staging = self
            .staging_dir(&latest.version)
            .map_err(UpdateError::Install)?;
        let s = staging.clone();
        let unpacked = tokio::task::spawn_blocking(move || release::unpack(&tarball, &s))
            .await
            .map_err(|e| UpdateError::Install(e.into()));
        // What gets installed is the version the signed tarball itself contains, and only
        // when it is the tag's (so it passed the newer-than-current and hold checks above).
        let checked = match unpacked {
            Ok(Ok(u)) => release::check_version(
                &latest.version,
                &u.top,
                read_version_file(&staging.join("files")).as_deref(),
            )
            .map(|()| u)
            .map_err(UpdateError::from),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e),
        };
        let unpacked = match checked {
            Ok(u) => u,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        tracing::debug!(bytes = unpacked.bytes, top = %unpacked.top, "unpacked");
        let previous = self.version();
        self.finish_and_switch(staging, &latest.version)
            .await
            .map_err(UpdateError::Install)?;
        Ok(Outcome::Installed {
            previous,
            current: latest.version.to_string(),
        })
    }

    async fn latest(&self) -> Result<Release, UpdateError> {
        let url = &self.release_url;
        let fail = |m: String| UpdateError::Check {
            url: url.clone(),
            message: m,
        };
        let resp = self
            .client
            .get(url)
            .header(header::ACCEPT, "application/vnd.github+json")
            .send()
            .await
            .map_err(|e| fail(format!("{e}; check the network and element.release_url")))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let body = read_capped(resp, release::MAX_RELEASE_JSON)
            .await
            .map_err(fail)?;
        let json: release::LatestJson =
            serde_json::from_slice(&body).map_err(|e| fail(format!("unexpected answer: {e}")))?;
        json.release().map_err(fail)
    }

    /// The key releases must verify against: the test key when configured, else the Element
    /// release key bundled at package-build time, else one fetched earlier, else downloaded
    /// now. Whatever the source, its fingerprint must be the pinned one.
    async fn trusted_key(&self) -> Result<TrustedKey, UpdateError> {
        let pin = Some(release::ELEMENT_KEY_FINGERPRINT);
        if let Some(p) = &self.test_key {
            let data =
                std::fs::read(p).map_err(|e| UpdateError::Key(format!("{}: {e}", p.display())))?;
            let k = TrustedKey::from_armor(&data, None)?;
            tracing::warn!(key = %k.fingerprint(), "element.test_release_key is set: trusting a key other than Element's (tests only)");
            return Ok(k);
        }
        if let Some(f) = BundledKeys::get("element-release-key.asc") {
            return Ok(TrustedKey::from_armor(&f.data, pin)?);
        }
        let cached = self.dir.join("release-key.asc");
        if let Ok(data) = std::fs::read(&cached)
            && let Ok(k) = TrustedKey::from_armor(&data, pin)
        {
            return Ok(k);
        }
        let data = download(&self.client, &self.key_url, None, MAX_SMALL)
            .await
            .map_err(|e| UpdateError::Key(e.to_string()))?;
        let k = TrustedKey::from_armor(&data, pin)?;
        write_atomic(&cached, &data, Owner::root(), 0o644).map_err(UpdateError::Install)?;
        Ok(k)
    }

    fn staging_dir(&self, v: &Version) -> Result<PathBuf> {
        let r = random_token(&ring::rand::SystemRandom::new())?;
        let p = self.dir.join(format!(".partial-{}-{}", v.text, &r[..12]));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }

    /// Precompresses and indexes a staged release, moves it to `<version>/` and switches
    /// `current` to it (the old current becomes `previous`); older releases are removed.
    async fn finish_and_switch(&self, staging: PathBuf, v: &Version) -> Result<()> {
        let s = staging.clone();
        let text = v.text.clone();
        let done = tokio::task::spawn_blocking(move || tree::finish_install(&s, &text)).await?;
        if let Err(e) = done {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        let final_dir = self.dir.join(&v.text);
        let old_current = std::fs::read_link(self.dir.join("current")).ok();
        if final_dir.exists() {
            // Re-installing a version: keep the one in use until the new copy is in place.
            let trash = self.dir.join(format!(".partial-old-{}", v.text));
            let _ = std::fs::remove_dir_all(&trash);
            std::fs::rename(&final_dir, &trash)?;
            std::fs::rename(&staging, &final_dir)?;
            let _ = std::fs::remove_dir_all(&trash);
        } else {
            std::fs::rename(&staging, &final_dir)?;
        }
        let tree = Arc::new(Tree::open(&final_dir)?);
        let keep_previous = old_current
            .as_ref()
            .filter(|o| o.as_os_str() != v.text.as_str());
        if let Some(prev) = keep_previous {
            set_link(&self.dir, "previous", prev)?;
            // Only old tabs read from it now: give its memory back.
            if let Some(old) = self.current.load_full() {
                old.drop_cache();
            }
            self.previous.store(self.current.load_full());
        }
        set_link(&self.dir, "current", Path::new(&v.text))?;
        self.current.store(Some(tree));
        self.refresh_status();
        self.prune();
        Ok(())
    }

    /// Keeps only the current and previous releases on disk.
    fn prune(&self) {
        let keep: Vec<PathBuf> = ["current", "previous"]
            .iter()
            .filter_map(|l| std::fs::read_link(self.dir.join(l)).ok())
            .collect();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = PathBuf::from(e.file_name());
            let is_release =
                e.file_type().is_ok_and(|t| t.is_dir()) && !name.to_string_lossy().starts_with('.');
            if is_release
                && !keep.contains(&name)
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                tracing::warn!("removing old Element release {}: {err}", name.display());
            }
        }
    }

    /// Switches back to the previous release and holds automatic updates at the release
    /// rolled back from, until a newer one appears.
    pub async fn rollback(&self) -> Result<Outcome, UpdateError> {
        let _busy = self.busy.lock().await;
        let (Some(cur), Some(prev)) = (self.current.load_full(), self.previous.load_full()) else {
            return Err(UpdateError::NoPrevious);
        };
        let install = |e: anyhow::Error| UpdateError::Install(e);
        set_link(&self.dir, "previous", Path::new(&cur.version)).map_err(install)?;
        set_link(&self.dir, "current", Path::new(&prev.version)).map_err(install)?;
        write_atomic(
            &self.dir.join("hold"),
            cur.version.as_bytes(),
            Owner::root(),
            0o644,
        )
        .map_err(install)?;
        self.current.store(Some(prev.clone()));
        self.previous.store(Some(cur.clone()));
        self.status.lock().unwrap().held = Some(cur.version.clone());
        self.refresh_status();
        Ok(Outcome::RolledBack {
            from: cur.version.clone(),
            to: prev.version.clone(),
        })
    }
}

pub fn describe(o: &Outcome) -> String {
    match o {
        Outcome::UpToDate { current } => format!("{current} is the latest release"),
        Outcome::Available { current, latest } => format!(
            "{latest} is available (installed: {})",
            current.as_deref().unwrap_or("none")
        ),
        Outcome::Held { current, latest } => format!(
            "{latest} is held back by a rollback; {current} stays (a newer release lifts the hold)"
        ),
        Outcome::Installed { previous, current } => format!(
            "installed {current} (previous: {})",
            previous.as_deref().unwrap_or("none")
        ),
        Outcome::RolledBack { from, to } => format!("rolled back from {from} to {to}"),
    }
}

/// Signatures and keys are a few kB.
const MAX_SMALL: u64 = 1 << 20;

/// Downloads at most `limit` bytes; `expected` is the length the release lists.
async fn download(
    client: &reqwest::Client,
    url: &str,
    expected: Option<u64>,
    limit: u64,
) -> Result<Vec<u8>, UpdateError> {
    let fail = |m: String| UpdateError::Download {
        url: url.to_string(),
        message: m,
    };
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let out = read_capped(resp, limit).await.map_err(fail)?;
    if let Some(n) = expected
        && out.len() as u64 != n
    {
        return Err(fail(format!(
            "got {} bytes, the release lists {n}",
            out.len()
        )));
    }
    Ok(out)
}

/// Reads a body of at most `limit` bytes, refusing it as soon as it grows past (a hostile or
/// broken server cannot make us buffer more, whatever its Content-Length says).
async fn read_capped(mut resp: reqwest::Response, limit: u64) -> Result<Vec<u8>, String> {
    let too_big = || format!("the answer is larger than {} KiB; refusing it", limit >> 10);
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(too_big());
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        out.extend_from_slice(&chunk);
        if out.len() as u64 > limit {
            return Err(too_big());
        }
    }
    Ok(out)
}

/// Downloads take minutes at most; GitHub's API wants a User-Agent. `https_only` also holds
/// for redirects (GitHub sends asset downloads to its object storage).
fn http_client(https_only: bool) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("homelab-matrix/", env!("CARGO_PKG_VERSION")))
        .https_only(https_only)
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(600))
        .build()
        .context("building the HTTP client")
}

/// `packaging/element.lock`: the release built into the package.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedRelease {
    pub version: String,
    pub url: String,
    pub signature_url: String,
    pub sha256: String,
    pub key_url: String,
    pub key_fingerprint: String,
}

/// Package-build time (packaging/fetch-element): downloads the pinned release, checks its
/// sha256, the key's fingerprint and the signature, and unpacks it safely into
/// `<out>/element`, with the key in `<out>/keys` (what `Bundled` and `BundledKeys` embed).
/// Nothing in `out` changes unless every check passes.
pub async fn fetch_pinned(lock: &Path, out: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
    let pin: PinnedRelease = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid lock file", lock.display()))?;
    // The sha256 in the lock file pins the exact bytes, whatever the transport.
    let client = http_client(false)?;
    let tarball = download(&client, &pin.url, None, release::MAX_TARBALL).await?;
    let sum = sha256_hex(&tarball);
    anyhow::ensure!(
        sum.eq_ignore_ascii_case(pin.sha256.trim()),
        "{}: sha256 {sum}, but {} pins {}; refusing it",
        pin.url,
        lock.display(),
        pin.sha256
    );
    let key_bytes = download(&client, &pin.key_url, None, MAX_SMALL).await?;
    let key = TrustedKey::from_armor(&key_bytes, Some(&pin.key_fingerprint))?;
    let sig = download(&client, &pin.signature_url, None, MAX_SMALL).await?;
    let signer = key.verify(&tarball, &sig)?;
    let staging = tempfile::Builder::new()
        .prefix(".fetch-element-")
        .tempdir_in(out)
        .with_context(|| format!("creating a staging dir in {}", out.display()))?;
    let s = staging.path().to_owned();
    let unpacked = tokio::task::spawn_blocking(move || release::unpack(&tarball, &s)).await??;
    // The updater's rule: the lock's version, the top directory and the version file agree.
    let pinned = Version::parse(&pin.version)
        .with_context(|| format!("{}: {:?} is not a version", lock.display(), pin.version))?;
    release::check_version(
        &pinned,
        &unpacked.top,
        read_version_file(&staging.path().join("files")).as_deref(),
    )
    .with_context(|| format!("{} pins {}", lock.display(), pin.version))?;
    let (el, keys) = (out.join("element"), out.join("keys"));
    let _ = std::fs::remove_dir_all(&el);
    std::fs::rename(staging.path().join("files"), &el)?;
    std::fs::create_dir_all(&keys)?;
    std::fs::write(keys.join("element-release-key.asc"), &key_bytes)?;
    Ok(format!(
        "Element {} (sha256 {sum}, signed by {signer}) unpacked into {}",
        pin.version,
        el.display()
    ))
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

fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.9 + 0.2 * random_fraction())
}

/// The `config.json` Element gets: the homeserver it belongs to, plus choices a private
/// server wants (element-web docs/config.md), deep-merged with the operator's element.json.
pub fn client_config(cfg: &Config, https_port: u16, overrides: Option<Value>) -> Value {
    let base_url = crate::config::https_url(&cfg.hosts.matrix, https_port);
    let mut v = json!({
        "default_server_config": {
            "m.homeserver": {"base_url": base_url, "server_name": cfg.server_name}
        },
        // Registration needs a token and guests are off in Synapse; email and phone login
        // need an identity server this appliance does not run.
        "disable_guests": true,
        "disable_3pid_login": true,
        "disable_custom_urls": false,
        "brand": "Element",
        "default_theme": "light",
        "room_directory": {"servers": [cfg.server_name]},
        "show_labs_settings": false,
        // The integration manager (scalar.vector.im) is a third-party service; a private
        // server does not send it its users' rooms by default.
        "integrations_ui_url": null,
        "integrations_rest_url": null,
        "integrations_widgets_urls": null,
        "permalink_prefix": crate::config::https_url(&cfg.hosts.element, https_port),
        "setting_defaults": {"UIFeature.registration": true, "UIFeature.passwordReset": false},
    });
    // Group calls (Element Call) only with a MatrixRTC focus to hold them: otherwise every
    // call button would lead to a call that cannot start; 1:1 calls over TURN stay either
    // way. Element Web 1.12.24+ reads `element_call.disable` (Element Call is its default
    // there); older ones the `feature_group_calls` labs flag (element-web docs/config.md).
    let calls = cfg.matrixrtc.enabled();
    let o = v.as_object_mut().expect("an object");
    o.insert("element_call".into(), json!({"disable": !calls}));
    o.insert("features".into(), json!({"feature_group_calls": calls}));
    if let Some(o) = overrides {
        merge(&mut v, o);
    }
    v
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

fn client_config_bytes(cfg: &Config, https_port: u16, overrides: &Path) -> Result<(Bytes, String)> {
    let over = match std::fs::read(overrides) {
        Ok(text) => Some(serde_json::from_slice::<Value>(&text).map_err(|e| {
            anyhow!(
                "{}: not valid JSON ({e})\n    fix: correct it (it is merged into Element's config.json) or remove it",
                overrides.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", overrides.display())),
    };
    if over.as_ref().is_some_and(|o| !o.is_object()) {
        return Err(anyhow!(
            "{}: must be a JSON object like {{\"brand\": \"My chat\"}}",
            overrides.display()
        ));
    }
    let body = serde_json::to_vec_pretty(&client_config(cfg, https_port, over))?;
    let etag = format!("\"{}\"", &sha256_hex(&body)[..32]);
    Ok((Bytes::from(body), etag))
}

/// Picks br, then gzip, then the identity (RFC 9110 §12.5.3); `q=0` refuses a coding.
pub fn negotiate(headers: &HeaderMap, has_br: bool, has_gz: bool) -> Encoding {
    // A coding named explicitly wins over `*` (RFC 9110 §12.5.3).
    let (mut br, mut gz, mut star) = (None, None, None);
    for v in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(s) = v.to_str() else { continue };
        for item in s.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .filter_map(|q| q.trim().parse::<f32>().ok())
                .next()
                .unwrap_or(1.0);
            let ok = Some(q > 0.0);
            match coding.as_str() {
                "br" => br = ok,
                "gzip" | "x-gzip" => gz = ok,
                "*" => star = ok,
                _ => {}
            }
        }
    }
    let star = star.unwrap_or(false);
    if br.unwrap_or(star) && has_br {
        Encoding::Brotli
    } else if gz.unwrap_or(star) && has_gz {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// RFC 9110 §13.1.2: weak comparison, `*` matches any current representation.
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                let t = t.trim();
                t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag
            })
        })
    })
}

fn representation(
    etag: &str,
    class: CacheClass,
    ctype: &'static str,
    varies: bool,
    enc: Encoding,
    body: Bytes,
) -> Response<Bytes> {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(class.header()),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    if varies {
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    if let Some(t) = enc.token() {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(t));
    }
    r
}

fn not_modified(etag: &str, class: CacheClass, varies: bool) -> Response<Bytes> {
    let mut r = Response::new(Bytes::new());
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(class.header()),
    );
    if varies {
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    r
}

fn simple(status: StatusCode, ctype: &'static str, body: &'static str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from_static(body.as_bytes()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn not_found() -> Response<Bytes> {
    simple(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}

/// Shown until the first release is installed (an offline build fetches one on first start).
fn installing_page() -> Response<Bytes> {
    let mut r = simple(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/html; charset=utf-8",
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"15\"><title>Element is being installed</title></head><body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>Element is being installed</h1><p>The web client is being downloaded and checked; this page reloads by itself. Meanwhile, any Matrix client works with this server. <code>homelab-matrix status</code> shows the progress.</p></body></html>\n",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("15"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ae(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn encoding_negotiation_prefers_br_and_honours_q0() {
        assert_eq!(
            negotiate(&ae("gzip, deflate, br, zstd"), true, true),
            Encoding::Brotli
        );
        assert_eq!(
            negotiate(&ae("gzip, deflate, br"), false, true),
            Encoding::Gzip
        );
        assert_eq!(
            negotiate(&ae("gzip;q=0, br;q=0"), true, true),
            Encoding::Identity
        );
        assert_eq!(negotiate(&ae("*"), true, true), Encoding::Brotli);
        assert_eq!(negotiate(&ae("br;q=0, *"), true, true), Encoding::Gzip);
        assert_eq!(negotiate(&HeaderMap::new(), true, true), Encoding::Identity);
    }

    #[test]
    fn etags_match_weakly_and_by_star() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"a\", W/\"b\""),
        );
        assert!(if_none_match(&h, "\"b\""));
        assert!(!if_none_match(&h, "\"c\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&h, "\"c\""));
    }

    #[test]
    fn client_config_points_at_this_server_and_merges_overrides() {
        let cfg = Config::from_toml("server_name = \"example.org\"\n").unwrap();
        let v = client_config(
            &cfg,
            443,
            Some(
                json!({"brand": "Our chat", "setting_defaults": {"x": 1}, "integrations_ui_url": "https://i"}),
            ),
        );
        assert_eq!(
            v["default_server_config"]["m.homeserver"]["base_url"],
            "https://matrix.example.org"
        );
        assert_eq!(
            v["default_server_config"]["m.homeserver"]["server_name"],
            "example.org"
        );
        assert_eq!(v["brand"], "Our chat");
        assert_eq!(v["setting_defaults"]["x"], 1);
        assert_eq!(v["setting_defaults"]["UIFeature.passwordReset"], false);
        assert_eq!(v["integrations_ui_url"], "https://i");
        assert_eq!(v["disable_guests"], true);
    }

    #[test]
    fn no_group_call_button_without_a_focus_to_hold_the_call() {
        let off = Config::from_toml("server_name = \"example.org\"\n").unwrap();
        let v = client_config(&off, 443, None);
        assert_eq!(v["element_call"]["disable"], true);
        assert_eq!(v["features"]["feature_group_calls"], false);
        let on = Config::from_toml(
            "server_name = \"example.org\"\n[matrixrtc]\nlivekit_url = \"wss://lk.example.org\"\napi_key_file = \"/k\"\napi_secret_file = \"/s\"\n",
        )
        .unwrap();
        let v = client_config(&on, 443, None);
        assert_eq!(v["element_call"]["disable"], false);
        assert_eq!(v["features"]["feature_group_calls"], true);
    }
}
