//! One installed Element release on disk, and how its files are served.
//!
//! Layout of `state/element/<version>/`: `files/` is the release as unpacked, `br/` and `gz/`
//! mirror it with precompressed variants made once at install time, and `manifest.json`
//! (written last, so its presence means the install is complete) lists every servable file
//! with its length and hash. Only paths in the manifest are ever served, so nothing outside
//! `files/` (and no link) can be reached whatever the request path says.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The file that marks a complete install.
pub const MANIFEST: &str = "manifest.json";
/// Files bigger than this are read from disk on every request instead of being kept in memory.
const CACHE_FILE_MAX: u64 = 16 << 20;
/// What one tree keeps in memory at most, over all variants.
const CACHE_BUDGET: usize = 64 << 20;
/// Variants smaller than this gain nothing from compression.
const COMPRESS_MIN: u64 = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub version: String,
    pub files: HashMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub len: u64,
    /// Hex SHA-256 of the file; the strong validator behind the ETag.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub br: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gz: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Identity,
    Gzip,
    Brotli,
}

impl Encoding {
    pub fn token(self) -> Option<&'static str> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some("gzip"),
            Encoding::Brotli => Some("br"),
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Encoding::Identity => "files",
            Encoding::Gzip => "gz",
            Encoding::Brotli => "br",
        }
    }
}

/// An installed release, ready to serve.
pub struct Tree {
    pub version: String,
    pub dir: PathBuf,
    manifest: Manifest,
    cache: Mutex<HashMap<(String, Encoding), Bytes>>,
    cached_bytes: AtomicUsize,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("version", &self.version)
            .field("dir", &self.dir)
            .field("files", &self.manifest.files.len())
            .finish()
    }
}

impl Tree {
    /// Opens a complete install (one with a manifest).
    pub fn open(dir: &Path) -> Result<Tree> {
        let text = std::fs::read(dir.join(MANIFEST))
            .with_context(|| format!("{} is not a complete install", dir.display()))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .with_context(|| format!("reading {}", dir.join(MANIFEST).display()))?;
        Ok(Tree {
            version: manifest.version.clone(),
            dir: dir.to_owned(),
            manifest,
            cache: Mutex::new(HashMap::new()),
            cached_bytes: AtomicUsize::new(0),
        })
    }

    pub fn entry(&self, path: &str) -> Option<&Entry> {
        self.manifest.files.get(path)
    }

    pub fn file_count(&self) -> usize {
        self.manifest.files.len()
    }

    pub fn drop_cache(&self) {
        self.cache.lock().unwrap().clear();
        self.cached_bytes.store(0, Ordering::Relaxed);
    }

    /// The bytes of one variant; small files are kept in memory after the first read.
    pub async fn read(&self, path: &str, enc: Encoding) -> std::io::Result<Bytes> {
        let key = (path.to_string(), enc);
        if let Some(b) = self.cache.lock().unwrap().get(&key) {
            return Ok(b.clone());
        }
        let data = Bytes::from(tokio::fs::read(self.dir.join(enc.dir()).join(path)).await?);
        let len = data.len();
        if (len as u64) <= CACHE_FILE_MAX
            && self.cached_bytes.load(Ordering::Relaxed) + len <= CACHE_BUDGET
        {
            self.cached_bytes.fetch_add(len, Ordering::Relaxed);
            self.cache.lock().unwrap().insert(key, data.clone());
        }
        Ok(data)
    }
}

/// Maps a request path to a manifest key: no leading slash, `/` is `index.html`, percent-escapes
/// decoded. `None` for anything that tries to leave the tree or is not a plain relative path
/// (RFC 3986 §5.2.4 dot segments are refused, not resolved).
pub fn key_for(path: &str) -> Option<String> {
    let raw = path.strip_prefix('/')?;
    let decoded = crate::uri::percent_decode_strict(raw)?;
    if decoded.is_empty() {
        return Some("index.html".into());
    }
    if decoded.contains('\\') || decoded.contains('\0') || decoded.ends_with('/') {
        return None;
    }
    if decoded
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == ".." || seg.starts_with('.'))
    {
        return None;
    }
    Some(decoded)
}

/// The media type by extension; unknown types go out as octet-stream, never sniffed
/// (`X-Content-Type-Options: nosniff`).
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "webmanifest" => "application/manifest+json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "webm" => "video/webm",
        "mp4" => "video/mp4",
        _ => "application/octet-stream",
    }
}

fn compressible(path: &str) -> bool {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    matches!(
        ext.to_ascii_lowercase().as_str(),
        "html"
            | "htm"
            | "js"
            | "mjs"
            | "css"
            | "json"
            | "webmanifest"
            | "wasm"
            | "svg"
            | "txt"
            | "xml"
            | "ttf"
            | "otf"
            | "ico"
    )
}

/// How long browsers may keep a file (element-web README, "Caching requirements").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheClass {
    /// Content-addressed: a new release never changes these bytes under the same name.
    Immutable,
    /// Must be revalidated on every use: index.html, version, config*.json, i18n/, and
    /// everything not content-addressed.
    Revalidate,
}

impl CacheClass {
    pub fn of(key: &str) -> CacheClass {
        if key.starts_with("bundles/") || key.split('/').next_back().is_some_and(hashed_name) {
            CacheClass::Immutable
        } else {
            CacheClass::Revalidate
        }
    }

    pub fn header(self) -> &'static str {
        match self {
            CacheClass::Immutable => "public, max-age=31536000, immutable",
            CacheClass::Revalidate => "no-cache",
        }
    }
}

/// webpack's `[name].[hash:7].[ext]`: a middle dot-separated part of at least 7 hex digits.
fn hashed_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() >= 3
        && parts[1..parts.len() - 1]
            .iter()
            .any(|p| p.len() >= 7 && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Builds `br/`, `gz/` and the manifest for an unpacked `files/` tree. Blocking and CPU-heavy:
/// run it off the async workers. Brotli at quality 9 and gzip at level 9 are a measured
/// trade: a full Element release compresses in seconds, within a few percent of the maximum.
pub fn finish_install(dir: &Path, version: &str) -> Result<Manifest> {
    let files_dir = dir.join("files");
    let mut files = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = files_dir.join(&rel);
        for entry in
            std::fs::read_dir(&abs).with_context(|| format!("reading {}", abs.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                bail!("{}: a file name that is not UTF-8", abs.display());
            };
            let rel_path = rel.join(name);
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(rel_path);
                continue;
            }
            if !ft.is_file() {
                bail!("{}: not a regular file", rel_path.display());
            }
            let key = rel_path
                .to_str()
                .expect("built from UTF-8 parts")
                .to_string();
            if key_for(&format!("/{key}")).as_deref() != Some(key.as_str()) {
                // Dot files (e.g. `.well-known`) cannot be requested; do not list them.
                continue;
            }
            let data = std::fs::read(entry.path())?;
            let sha256 = crate::secrets::sha256_hex(&data);
            let mut e = Entry {
                len: data.len() as u64,
                sha256,
                br: None,
                gz: None,
            };
            if compressible(&key) && e.len >= COMPRESS_MIN {
                let keep = |c: &[u8]| (c.len() as u64) * 100 <= e.len * 95;
                let gz = gzip(&data)?;
                if keep(&gz) {
                    write_variant(dir, "gz", &key, &gz)?;
                    e.gz = Some(gz.len() as u64);
                }
                let br = brotli(&data)?;
                if keep(&br) {
                    write_variant(dir, "br", &key, &br)?;
                    e.br = Some(br.len() as u64);
                }
            }
            files.insert(key, e);
        }
    }
    if !files.contains_key("index.html") {
        bail!("the release has no index.html at its top level");
    }
    let manifest = Manifest {
        version: version.to_string(),
        files,
    };
    let json = serde_json::to_vec(&manifest)?;
    let tmp = dir.join(".manifest.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(MANIFEST))?;
    Ok(manifest)
}

fn write_variant(dir: &Path, kind: &str, key: &str, data: &[u8]) -> Result<()> {
    let p = dir.join(kind).join(key);
    std::fs::create_dir_all(p.parent().expect("a file has a parent"))?;
    std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

fn brotli(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut r = brotli::CompressorReader::new(data, 64 << 10, 9, 22);
    r.read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_never_leave_the_tree() {
        assert_eq!(key_for("/").as_deref(), Some("index.html"));
        assert_eq!(
            key_for("/bundles/abc/app.js").as_deref(),
            Some("bundles/abc/app.js")
        );
        assert_eq!(
            key_for("/i18n/en%5FEN.json").as_deref(),
            Some("i18n/en_EN.json")
        );
        for bad in [
            "/../etc/passwd",
            "/a/../../b",
            "/%2e%2e/etc/passwd",
            "/a/%2E%2E/b",
            "/a//b",
            "/./index.html",
            "/a\\..\\b",
            "/%00",
            "/.manifest",
            "/bundles/",
            "/%zz",
            "relative",
        ] {
            assert_eq!(key_for(bad), None, "{bad}");
        }
    }

    #[test]
    fn cache_classes_follow_element_hosting_rules() {
        for k in [
            "index.html",
            "version",
            "config.json",
            "i18n/en_EN.json",
            "sw.js",
        ] {
            assert_eq!(CacheClass::of(k), CacheClass::Revalidate, "{k}");
        }
        for k in [
            "bundles/0123abcd/init.js",
            "img/logo.1a2b3c4.svg",
            "fonts/Inter.8f9e7d6c5b.woff2",
        ] {
            assert_eq!(CacheClass::of(k), CacheClass::Immutable, "{k}");
        }
        assert_eq!(CacheClass::of("themes/light/x.css"), CacheClass::Revalidate);
    }

    #[test]
    fn install_compresses_text_once_and_lists_only_servable_files() {
        let d = tempfile::tempdir().unwrap();
        let files = d.path().join("files");
        std::fs::create_dir_all(files.join("bundles/h")).unwrap();
        std::fs::write(files.join("index.html"), "<html>".repeat(200)).unwrap();
        std::fs::write(files.join("bundles/h/a.js"), "let x = 1;\n".repeat(500)).unwrap();
        std::fs::write(files.join("logo.png"), [0u8; 1000]).unwrap();
        std::fs::write(files.join(".hidden"), "x").unwrap();
        let m = finish_install(d.path(), "1.2.3").unwrap();
        assert_eq!(m.files.len(), 3);
        let js = &m.files["bundles/h/a.js"];
        assert!(js.br.unwrap() < js.len / 5 && js.gz.unwrap() < js.len / 5);
        assert_eq!(m.files["logo.png"].br, None, "images are not recompressed");
        let mut gz = flate2::read::GzDecoder::new(
            std::fs::File::open(d.path().join("gz/bundles/h/a.js")).unwrap(),
        );
        let mut plain = String::new();
        gz.read_to_string(&mut plain).unwrap();
        assert_eq!(plain, "let x = 1;\n".repeat(500));
        let t = Tree::open(d.path()).unwrap();
        assert_eq!(t.version, "1.2.3");
        assert!(t.entry(".hidden").is_none());
    }
}
