//! The backup file: one tar archive, the database dump first, then every file, the manifest
//! last (so each part's sha256 is known when it is written). Reading checks every part against
//! the manifest before anything is restored: a truncated or altered file is refused.
//!
//! Files are read through [`Dir`] descriptors from a root-owned base down, never following a
//! symlink (README "State and privilege separation"): a link Synapse plants in its media store
//! (say to /etc/shadow) is skipped and reported, not archived.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ring::digest::{Context as Sha, SHA256};
use serde::{Deserialize, Serialize};

use crate::fsutil::Dir;
use crate::secrets::hex;

/// The archive member holding `pg_dump -Fc`.
pub const DUMP: &str = "database.pgdump";
/// The archive member holding the manifest (always the last one).
pub const MANIFEST: &str = "manifest.json";
/// Version of the layout below; a newer one is refused by an older binary.
pub const FORMAT: u32 = 1;

/// What a backup holds, with the versions it came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    /// `manual`, `daily` or `pre-upgrade`.
    pub kind: String,
    /// Unix seconds.
    pub created_at: u64,
    pub server_name: String,
    pub versions: BTreeMap<String, String>,
    pub database: Database,
    /// Every other member, in archive order.
    pub parts: Vec<Part>,
    /// What was left out and why (symlinks and other non-files, never followed).
    #[serde(default)]
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Database {
    pub name: String,
    pub role: String,
    pub size: u64,
    pub sha256: String,
    /// Tables whose rows are left out (Synapse's backup doc: one-time keys must not be reused).
    pub excluded_table_data: Vec<String>,
    /// Rows per table, counted in the very snapshot pg_dump dumped.
    pub row_counts: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Part {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub mode: u32,
}

/// Why a backup file is refused. Each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Damaged {
    #[error(
        "{file}: the archive is cut short or unreadable ({detail}); it cannot be restored. Use another backup (`ls -l` the backup directory) or the restic copy"
    )]
    Unreadable { file: String, detail: String },
    #[error(
        "{file}: has no manifest (the file is truncated or not a homelab-matrix backup); use another backup"
    )]
    NoManifest { file: String },
    #[error(
        "{file}: {part} does not match the manifest ({detail}): the file was altered or damaged; use another backup"
    )]
    Mismatch {
        file: String,
        part: String,
        detail: String,
    },
    #[error(
        "{file}: made by a newer homelab-matrix (backup format {format}, this one reads {FORMAT}); install that version to restore it"
    )]
    Newer { file: String, format: u32 },
}

/// Writes the archive into `out`, hashing each part as it goes.
pub struct Writer<W: Write> {
    tar: tar::Builder<W>,
    pub parts: Vec<Part>,
    pub skipped: Vec<String>,
    /// Largest file read into memory (bigger ones are refused and reported).
    limit: u64,
}

fn header(size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode & 0o7777);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn now() -> u64 {
    crate::units::unix(std::time::SystemTime::now())
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, limit: u64) -> Writer<W> {
        Writer {
            tar: tar::Builder::new(out),
            parts: vec![],
            skipped: vec![],
            limit,
        }
    }

    /// Adds the dump from `file` (read from its start) as [`DUMP`]; returns its size and sha256.
    /// The dump is read once: hashed on its way into the archive.
    pub fn add_dump(&mut self, file: &mut File) -> Result<(u64, String)> {
        file.seek(SeekFrom::Start(0))?;
        let size = file.metadata()?.len();
        let mut h = header(size, 0o600, now());
        let mut r = Hashing::new(file.take(size));
        self.tar
            .append_data(&mut h, DUMP, &mut r)
            .context("writing the database dump into the backup")?;
        let (read, sha) = r.finish();
        if read != size {
            bail!(
                "the database dump ended after {read} of its {size} bytes while it was written into the backup; run the backup again"
            );
        }
        Ok((size, sha))
    }

    /// Adds one file's contents as `path`.
    pub fn add_bytes(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let mut h = header(data.len() as u64, mode, now());
        self.tar
            .append_data(&mut h, path, data)
            .with_context(|| format!("writing {path} into the backup"))?;
        self.parts.push(Part {
            path: path.to_string(),
            size: data.len() as u64,
            sha256: crate::secrets::sha256_hex(data),
            mode: mode & 0o7777,
        });
        Ok(())
    }

    /// Adds the regular file `name` of `dir` as `path`, if it is one (a symlink or anything
    /// else is skipped and reported). Returns whether it was added.
    pub fn add_file(&mut self, dir: &Dir, name: &OsStr, path: &str) -> Result<bool> {
        let Some((f, st)) = dir.open_regular(name)? else {
            if dir.contains(name) {
                self.skipped.push(format!(
                    "{}: not a regular file (a symlink or special file); not followed",
                    dir.path().join(name).display()
                ));
            }
            return Ok(false);
        };
        if st.st_size as u64 > self.limit {
            self.skipped.push(format!(
                "{}: {} bytes, larger than the {} bytes a backed-up file may have",
                dir.path().join(name).display(),
                st.st_size,
                self.limit
            ));
            return Ok(false);
        }
        let mut data = vec![];
        (&f).take(self.limit + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("reading {}", dir.path().join(name).display()))?;
        self.add_bytes(path, &data, st.st_mode)?;
        Ok(true)
    }

    /// Adds every regular file below `dir` as `prefix/...`, recursing only into real
    /// directories.
    pub fn add_tree(&mut self, dir: &Dir, prefix: &str) -> Result<()> {
        let mut names = dir.entries()?;
        names.sort();
        for name in names {
            let Some(n) = name.to_str() else {
                self.skipped.push(format!(
                    "{}: a name that is not UTF-8",
                    dir.path().join(&name).display()
                ));
                continue;
            };
            // Our own temp files (fsutil) are never part of the state.
            if n.starts_with('.') && n.ends_with(".tmp") {
                continue;
            }
            let path = format!("{prefix}/{n}");
            // open_sub opens real directories only (never a link to one).
            match dir.open_sub(&name)? {
                Some(sub) => self.add_tree(&sub, &path)?,
                None => {
                    self.add_file(dir, &name, &path)?;
                }
            }
        }
        Ok(())
    }

    /// Adds the manifest (last) and finishes the archive; returns the inner writer.
    pub fn finish(mut self, manifest: &Manifest) -> Result<W> {
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
        let mut h = header(json.len() as u64, 0o600, now());
        self.tar
            .append_data(&mut h, MANIFEST, json.as_slice())
            .context("writing the manifest into the backup")?;
        self.tar.into_inner().context("finishing the backup")
    }
}

/// A reader that counts and hashes (sha256) what passes through it.
struct Hashing<R> {
    inner: R,
    sha: Sha,
    size: u64,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            sha: Sha::new(&SHA256),
            size: 0,
        }
    }

    /// The bytes read and their sha256 (hex).
    fn finish(self) -> (u64, String) {
        (self.size, hex(self.sha.finish().as_ref()))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// A backup that passed [`check`]: its manifest, and its dump copied out (for pg_restore).
pub struct Checked {
    pub manifest: Manifest,
    pub dump: File,
}

/// Reads the whole archive once, checks every member's size and sha256 against the manifest
/// (none missing, none extra), and copies the dump into an anonymous file in `scratch`.
pub fn check(path: &Path, scratch: &Path) -> Result<Checked> {
    let file = path.display().to_string();
    let unreadable = |e: std::io::Error| Damaged::Unreadable {
        file: file.clone(),
        detail: e.to_string(),
    };
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ar = tar::Archive::new(f);
    let mut seen: BTreeMap<String, (u64, String, u32)> = BTreeMap::new();
    let mut manifest: Option<Manifest> = None;
    let mut dump = tempfile::tempfile_in(scratch)
        .with_context(|| format!("making a scratch file in {}", scratch.display()))?;
    let mut dump_seen = None;
    for entry in ar.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        let name = entry
            .path()
            .map_err(unreadable)?
            .to_string_lossy()
            .into_owned();
        let mode = entry.header().mode().map_err(unreadable)?;
        if manifest.is_some() {
            return Err(Damaged::Mismatch {
                file,
                part: name,
                detail: "a member after the manifest".into(),
            }
            .into());
        }
        if name == MANIFEST {
            let mut buf = vec![];
            entry.read_to_end(&mut buf).map_err(unreadable)?;
            manifest = Some(serde_json::from_slice(&buf).map_err(|e| Damaged::Mismatch {
                file: file.clone(),
                part: MANIFEST.into(),
                detail: format!("not a manifest: {e}"),
            })?);
            continue;
        }
        let mut r = Hashing::new(&mut entry);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            if name == DUMP {
                dump.write_all(&buf[..n])?;
            }
        }
        let (size, digest) = r.finish();
        if size != entry.size() {
            return Err(Damaged::Unreadable {
                file,
                detail: format!("{name} ends after {size} of {} bytes", entry.size()),
            }
            .into());
        }
        if name == DUMP {
            dump_seen = Some((size, digest));
        } else {
            seen.insert(name, (size, digest, mode));
        }
    }
    let Some(manifest) = manifest else {
        return Err(Damaged::NoManifest { file }.into());
    };
    if manifest.format > FORMAT {
        return Err(Damaged::Newer {
            file,
            format: manifest.format,
        }
        .into());
    }
    let mismatch = |part: &str, detail: String| Damaged::Mismatch {
        file: file.clone(),
        part: part.to_string(),
        detail,
    };
    match dump_seen {
        None => return Err(mismatch(DUMP, "missing".into()).into()),
        Some((size, sha)) if size != manifest.database.size || sha != manifest.database.sha256 => {
            return Err(mismatch(
                DUMP,
                format!(
                    "{size} bytes with sha256 {sha}, the manifest says {} bytes with {}",
                    manifest.database.size, manifest.database.sha256
                ),
            )
            .into());
        }
        Some(_) => {}
    }
    for p in &manifest.parts {
        match seen.remove(&p.path) {
            None => return Err(mismatch(&p.path, "missing".into()).into()),
            Some((size, sha, _)) if size != p.size || sha != p.sha256 => {
                return Err(mismatch(
                    &p.path,
                    format!(
                        "{size} bytes with sha256 {sha}, the manifest says {} bytes with {}",
                        p.size, p.sha256
                    ),
                )
                .into());
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = seen.keys().next() {
        return Err(mismatch(extra, "not in the manifest".into()).into());
    }
    dump.seek(SeekFrom::Start(0))?;
    Ok(Checked { manifest, dump })
}

/// Calls `f(path, contents, mode)` for every file member (not the dump, not the manifest) of an
/// archive that [`check`] passed.
pub fn for_each_file(path: &Path, mut f: impl FnMut(&str, &[u8], u32) -> Result<()>) -> Result<()> {
    let mut ar = tar::Archive::new(File::open(path)?);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let name: PathBuf = entry.path()?.into_owned();
        let name = name.to_string_lossy().into_owned();
        if name == DUMP || name == MANIFEST {
            continue;
        }
        let mode = entry.header().mode()?;
        let mut data = vec![];
        entry.read_to_end(&mut data)?;
        f(&name, &data, mode)?;
    }
    Ok(())
}
