//! The updater: signed upstream releases checked, installed and switched to, the previous one
//! kept for rollback; and the release pinned for the package build.

use super::*;

impl Element {
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
pub(super) fn http_client(https_only: bool) -> Result<reqwest::Client> {
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

fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.9 + 0.2 * random_fraction())
}
