//! Element releases: versions, the release API, signatures and safe unpacking
//! (research REFERENCE.md §F.1–F.2).

use std::cmp::Ordering;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use pgp::types::KeyDetails;
use serde::Deserialize;

/// The Element Releases key (releases@riot.im): the primary key whose signing subkey
/// (E95B7699E80B68A9EAD9A19A2BAA9B8552BD9047) signs every release tarball.
pub const ELEMENT_KEY_FINGERPRINT: &str = "712BFBEE92DCA45252DB17D7C7BE97EFA179B100";

/// Refuse downloads and unpacked trees bigger than this; a release is tens of MB.
pub const MAX_TARBALL: u64 = 256 << 20;
/// GitHub's latest-release answer is a few kB (tens with long release notes); it is read
/// into memory, so it is capped while streaming.
pub const MAX_RELEASE_JSON: u64 = 1 << 20;
pub const MAX_UNPACKED: u64 = 1 << 30;
pub const MAX_ENTRIES: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("the release signature does not verify: {0}")]
    BadSignature(String),
    #[error("the release key is not the one pinned: fingerprint {found}, expected {expected}")]
    WrongKey { found: String, expected: String },
    #[error("unsafe release archive: {0}")]
    UnsafeArchive(String),
    #[error("the release archive is damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    WrongVersion(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A release version: `v1.11.85`, `1.11.85-rc.1`. Compared numerically part by part; a
/// pre-release sorts before its release (SemVer 2.0.0 §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub text: String,
    nums: Vec<u64>,
    pre: Option<String>,
}

impl Version {
    /// Tolerant of a leading `v` and surrounding whitespace (element-desktop reads `version`
    /// the same way).
    pub fn parse(s: &str) -> Option<Version> {
        let t = s.trim();
        let t = t.strip_prefix('v').unwrap_or(t);
        let (main, pre) = match t.split_once('-') {
            Some((m, p)) if !p.is_empty() => (m, Some(p.to_string())),
            Some(_) => return None,
            None => (t, None),
        };
        let nums = main
            .split('.')
            .map(|p| p.parse::<u64>().ok())
            .collect::<Option<Vec<_>>>()?;
        if nums.is_empty() || nums.len() > 4 {
            return None;
        }
        let text = match &pre {
            Some(p) => format!("{main}-{p}"),
            None => main.to_string(),
        };
        if !text
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        {
            return None;
        }
        Some(Version { text, nums, pre })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.nums.len().max(other.nums.len());
        for i in 0..n {
            let a = self.nums.get(i).copied().unwrap_or(0);
            let b = other.nums.get(i).copied().unwrap_or(0);
            match a.cmp(&b) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        match (&self.pre, &other.pre) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => a.cmp(b),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The parts of GitHub's "get the latest release" answer we use
/// (docs.github.com/rest/releases/releases#get-the-latest-release).
#[derive(Debug, Deserialize)]
pub struct LatestJson {
    pub tag_name: String,
    #[serde(default)]
    pub assets: Vec<AssetJson>,
}

#[derive(Debug, Deserialize)]
pub struct AssetJson {
    pub name: String,
    pub browser_download_url: String,
    #[serde(default)]
    pub size: Option<u64>,
}

/// What to download for one release.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: Version,
    pub tarball_url: String,
    pub tarball_size: Option<u64>,
    pub signature_url: String,
}

impl LatestJson {
    /// The tarball is `element-<tag>.tar.gz` with its armored signature beside it.
    pub fn release(&self) -> Result<Release, String> {
        let version = Version::parse(&self.tag_name)
            .ok_or_else(|| format!("{:?} is not a release version", self.tag_name))?;
        let name = format!("element-{}.tar.gz", self.tag_name);
        let find = |n: &str| self.assets.iter().find(|a| a.name == n);
        let tarball = find(&name).ok_or_else(|| format!("the release has no asset {name}"))?;
        let sig = find(&format!("{name}.asc"))
            .ok_or_else(|| format!("the release has no signature {name}.asc"))?;
        Ok(Release {
            version,
            tarball_url: tarball.browser_download_url.clone(),
            tarball_size: tarball.size,
            signature_url: sig.browser_download_url.clone(),
        })
    }
}

/// The key releases must be signed with.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    key: SignedPublicKey,
}

impl TrustedKey {
    /// Parses an armored public key and checks its primary fingerprint against `pinned`
    /// (hex, any case, spaces allowed), and its self-signatures.
    pub fn from_armor(armored: &[u8], pinned: Option<&str>) -> Result<TrustedKey, ReleaseError> {
        let (key, _) = SignedPublicKey::from_armor_single(armored)
            .map_err(|e| ReleaseError::BadSignature(format!("cannot read the key: {e}")))?;
        if let Some(pin) = pinned {
            let found = format!("{:X}", key.fingerprint());
            let expected: String = pin
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_ascii_uppercase();
            if found != expected {
                return Err(ReleaseError::WrongKey { found, expected });
            }
        }
        key.verify_bindings()
            .map_err(|e| ReleaseError::BadSignature(format!("the key's self-signatures: {e}")))?;
        Ok(TrustedKey { key })
    }

    pub fn fingerprint(&self) -> String {
        format!("{:X}", self.key.fingerprint())
    }

    /// Verifies an armored detached signature over `data`, made by the primary key or by a
    /// subkey the primary key has bound (RFC 9580 §5.2.1, subkey binding signature).
    /// Returns the fingerprint of the key that signed.
    pub fn verify(&self, data: &[u8], armored_sig: &[u8]) -> Result<String, ReleaseError> {
        let (sig, _) = DetachedSignature::from_armor_single(armored_sig)
            .map_err(|e| ReleaseError::BadSignature(format!("cannot read the signature: {e}")))?;
        if sig.verify(&self.key, data).is_ok() {
            return Ok(self.fingerprint());
        }
        for sub in &self.key.public_subkeys {
            if sub.verify_bindings(&self.key.primary_key).is_ok() && sig.verify(sub, data).is_ok() {
                return Ok(format!("{:X}", sub.fingerprint()));
            }
        }
        Err(ReleaseError::BadSignature(
            "not made over this file by the trusted key or one of its signing subkeys".into(),
        ))
    }
}

/// What `unpack` found: the bytes written and the archive's top-level directory.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub bytes: u64,
    pub top: String,
}

/// A signed tarball is only as new as what it contains: the tag names a release, but a
/// validly signed *older* tarball offered under a newer tag would be a downgrade (an
/// attacker replaying an old release with known holes). So the tag, the archive's top
/// directory (`element-vX.Y.Z/`, as element-web's scripts/package.sh makes it) and its
/// `version` file must all name the same version.
pub fn check_version(
    tag: &Version,
    top: &str,
    version_file: Option<&str>,
) -> Result<(), ReleaseError> {
    let dir = top.strip_prefix("element-").and_then(Version::parse);
    let file = version_file.and_then(Version::parse);
    if dir.as_ref() == Some(tag) && file.as_ref() == Some(tag) {
        return Ok(());
    }
    let file_says = match (version_file, &file) {
        (None, _) => "it has no version file".to_string(),
        (Some(_), Some(v)) => format!("its version file says {v}"),
        (Some(raw), None) => format!("its version file says {:?}", raw.trim()),
    };
    Err(ReleaseError::WrongVersion(format!(
        "the release tagged {tag} is not Element {tag}: its top directory is {top}/ and {file_says}; refusing it (a signed older release under a newer tag would be a downgrade)"
    )))
}

/// Unpacks a release `.tar.gz` into `dest/files`, refusing anything that could write outside
/// it: absolute paths, `..`, links leaving the tree, device files, more than one top-level
/// directory, and archives over the size limits. Symlinks and hard links inside the tree are
/// materialized as copies, so the served tree has regular files only. Blocking.
pub fn unpack(tar_gz: &[u8], dest: &Path) -> Result<Unpacked, ReleaseError> {
    let root = dest.join("files");
    std::fs::create_dir_all(&root)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tar_gz));
    let mut top: Option<String> = None;
    let mut total = 0u64;
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let damaged = |e: std::io::Error| ReleaseError::Damaged(e.to_string());
    for (count, entry) in archive.entries().map_err(damaged)?.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(ReleaseError::UnsafeArchive(format!(
                "more than {MAX_ENTRIES} entries"
            )));
        }
        let mut entry = entry.map_err(damaged)?;
        let raw = entry.path().map_err(damaged)?.into_owned();
        let Some(rel) = inside_top(&raw, &mut top)? else {
            continue;
        };
        let out = root.join(&rel);
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => std::fs::create_dir_all(&out)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(damaged)?;
                total += size;
                if total > MAX_UNPACKED {
                    return Err(ReleaseError::UnsafeArchive(format!(
                        "unpacks to more than {} MiB",
                        MAX_UNPACKED >> 20
                    )));
                }
                if let Some(parent) = out.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let mut f = std::fs::File::create(&out)?;
                let copied =
                    std::io::copy(&mut (&mut entry).take(size), &mut f).map_err(damaged)?;
                if copied != size {
                    return Err(ReleaseError::Damaged(format!(
                        "{} is truncated",
                        raw.display()
                    )));
                }
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(damaged)?
                    .ok_or_else(|| ReleaseError::Damaged("a link without a target".into()))?
                    .into_owned();
                let resolved = if kind == tar::EntryType::Symlink {
                    // Relative to the link's own directory.
                    let base = rel.parent().map(Path::to_path_buf).unwrap_or_default();
                    normalize_within(&base.join(&target))
                } else {
                    // Hard link targets are archive paths.
                    inside_top(&target, &mut top)?
                };
                match resolved {
                    Some(t) => links.push((rel, t)),
                    None => {
                        return Err(ReleaseError::UnsafeArchive(format!(
                            "{} links to {}, outside the release",
                            raw.display(),
                            target.display()
                        )));
                    }
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(ReleaseError::UnsafeArchive(format!(
                    "{} is a {other:?}, not a file or directory",
                    raw.display()
                )));
            }
        }
    }
    // The gzip trailer (CRC and length) is checked only at the end of the stream.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(damaged)?;
    for (link, target) in links {
        let from = root.join(&target);
        let meta = std::fs::symlink_metadata(&from).map_err(|_| {
            ReleaseError::UnsafeArchive(format!(
                "{} links to {}, which is not a file in the release",
                link.display(),
                target.display()
            ))
        })?;
        if !meta.is_file() {
            return Err(ReleaseError::UnsafeArchive(format!(
                "{} links to a directory",
                link.display()
            )));
        }
        let to = root.join(&link);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&from, &to)?;
    }
    let Some(top) = top else {
        return Err(ReleaseError::Damaged("the archive is empty".into()));
    };
    Ok(Unpacked { bytes: total, top })
}

/// The path below the archive's single top-level directory (`element-vX.Y.Z/`), or `None`
/// for the directory itself.
fn inside_top(raw: &Path, top: &mut Option<String>) -> Result<Option<PathBuf>, ReleaseError> {
    let unsafe_path =
        || ReleaseError::UnsafeArchive(format!("{} leaves the release directory", raw.display()));
    let mut comps = raw.components().filter(|c| *c != Component::CurDir);
    let first = match comps.next() {
        Some(Component::Normal(f)) => f.to_str().ok_or_else(unsafe_path)?.to_string(),
        _ => return Err(unsafe_path()),
    };
    match top {
        None => *top = Some(first),
        Some(t) if *t == first => {}
        Some(t) => {
            return Err(ReleaseError::UnsafeArchive(format!(
                "more than one top-level directory ({t} and {first})"
            )));
        }
    }
    let mut rel = PathBuf::new();
    for c in comps {
        match c {
            Component::Normal(p) => rel.push(p),
            _ => return Err(unsafe_path()),
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Resolves `..` lexically; `None` if the path climbs out or is absolute.
fn normalize_within(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_compare_numerically_with_prereleases_first() {
        assert!(v("v1.11.100") > v("1.11.99"));
        assert!(v("1.12.0") > v("1.12.0-rc.2"));
        assert!(v("1.12.0-rc.2") > v("1.12.0-rc.1"));
        assert_eq!(v(" v1.2.3\n"), v("1.2.3"));
        assert_eq!(v("v1.2.3").text, "1.2.3");
        for bad in ["", "v", "1..2", "x1.2", "1.2-", "1.2.3/../x", "1.2.3-a b"] {
            assert!(Version::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn release_json_names_the_tarball_and_its_signature() {
        let j: LatestJson = serde_json::from_str(
            r#"{"tag_name":"v1.2.3","prerelease":false,"assets":[
              {"name":"element-v1.2.3.tar.gz","browser_download_url":"https://x/t","size":5},
              {"name":"element-v1.2.3.tar.gz.asc","browser_download_url":"https://x/s","size":1},
              {"name":"v1.2.3.tar.gz.asc","browser_download_url":"https://x/src","size":1}]}"#,
        )
        .unwrap();
        let r = j.release().unwrap();
        assert_eq!(r.version, v("1.2.3"));
        assert_eq!(
            (r.tarball_url.as_str(), r.signature_url.as_str()),
            ("https://x/t", "https://x/s")
        );
        let no_sig: LatestJson = serde_json::from_str(
            r#"{"tag_name":"v1.2.3","assets":[{"name":"element-v1.2.3.tar.gz","browser_download_url":"u"}]}"#,
        )
        .unwrap();
        assert!(no_sig.release().unwrap_err().contains(".asc"));
    }

    #[test]
    fn tag_top_directory_and_version_file_must_agree() {
        let tag = v("v1.3.0");
        assert!(check_version(&tag, "element-v1.3.0", Some("v1.3.0\n")).is_ok());
        assert!(check_version(&tag, "element-1.3.0", Some("1.3.0")).is_ok());
        for (top, file) in [
            ("element-v1.1.5", Some("v1.1.5\n")),
            ("element-v1.3.0", Some("v1.1.5\n")),
            ("element-v1.1.5", Some("v1.3.0\n")),
            ("element-v1.3.0", None),
            ("element-v1.3.0", Some("garbage")),
            ("webapp", Some("v1.3.0")),
        ] {
            let e = check_version(&tag, top, file).unwrap_err().to_string();
            assert!(e.contains("is not Element 1.3.0"), "{top} {file:?}: {e}");
        }
    }

    #[test]
    fn lexical_normalization_refuses_climbing_out() {
        assert_eq!(
            normalize_within(Path::new("a/b/../c")),
            Some(PathBuf::from("a/c"))
        );
        assert_eq!(normalize_within(Path::new("a/../../c")), None);
        assert_eq!(normalize_within(Path::new("/etc/passwd")), None);
    }
}
