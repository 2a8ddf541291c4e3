//! The backup file: one tar archive, the database dump first, then every file, the manifest
//! last (so each part's sha256 is known when it is written). Reading checks every part against
//! the manifest before anything is restored: a truncated or altered file is refused.
//!
//! Files are read through [`Dir`] descriptors from a root-owned base down, never following a
//! symlink (README "State and privilege separation"): a link Synapse plants in its media store
//! (say to /etc/shadow) is skipped and reported, not archived.

use std::collections::{BTreeMap, HashMap};
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
    /// What the appliance keeps elsewhere, by its config, and so not here (media on S3).
    #[serde(default)]
    pub elsewhere: Vec<String>,
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

/// Directory levels a backup descends below the top of a tree it takes. Synapse's media
/// store nests three (`local_content/ab/cd/<rest>`; thumbnails one more, docs/media_repository.md);
/// anything deeper is not its layout, and a compromised Synapse made one 19,000 deep to
/// overflow the walk's stack. Deeper directories are left out and named.
pub const MAX_DEPTH: usize = 16;
/// Messages about what was left out, at most; the rest are counted in one more line (a child
/// can plant a million links: the manifest and the journal get a hundred lines).
const MAX_SKIPPED: usize = 100;

/// Writes the archive into `out`, hashing each part as it goes; or, made by
/// [`Writer::measure`], writes nothing and only adds up what the archive would take.
pub struct Writer<W: Write> {
    /// None: measuring.
    tar: Option<tar::Builder<W>>,
    pub parts: Vec<Part>,
    pub skipped: Vec<String>,
    /// Left out beyond the first [`MAX_SKIPPED`].
    more_skipped: usize,
    /// Largest file taken (bigger ones are left out and reported).
    limit: u64,
    /// Bytes of the archive so far (headers, data, padding), and files taken.
    pub bytes: u64,
    pub files: usize,
}

fn header(size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode & 0o7777);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// What a member takes in the archive: its header, a GNU long-name member when the name does
/// not fit the header's 100 bytes, and its data padded to whole blocks.
fn member_bytes(path: &str, size: u64) -> u64 {
    let blocks = |n: u64| n.div_ceil(512) * 512;
    let long_name = if path.len() >= 100 {
        512 + blocks(path.len() as u64 + 1)
    } else {
        0
    };
    512 + long_name + blocks(size)
}

fn now() -> u64 {
    crate::units::unix(std::time::SystemTime::now())
}

/// A file that holds mostly holes: less than half its size on disk, and a hole before its end
/// (SEEK_HOLE; a file kept compressed or inline by its file system has none). Synapse writes
/// none; six planted ones of 250 MiB each (0 bytes on disk) made a 1.5 GiB backup.
fn mostly_holes(f: &File, st: &nix::sys::stat::FileStat) -> bool {
    use nix::unistd::{Whence, lseek};
    let size = st.st_size as u64;
    if (st.st_blocks as u64) * 512 >= size / 2 {
        return false;
    }
    let hole = lseek(f, 0, Whence::SeekHole);
    // Back to the start for the read that follows.
    let _ = lseek(f, 0, Whence::SeekSet);
    hole.is_ok_and(|at| (at as u64) < size)
}

impl Writer<std::io::Sink> {
    /// A writer that only measures: the same walk and the same choices, nothing read.
    pub fn measure(limit: u64) -> Writer<std::io::Sink> {
        Writer {
            tar: None,
            ..Writer::new(std::io::sink(), limit)
        }
    }
}

impl<W: Write> Writer<W> {
    pub fn new(out: W, limit: u64) -> Writer<W> {
        Writer {
            tar: Some(tar::Builder::new(out)),
            parts: vec![],
            skipped: vec![],
            more_skipped: 0,
            limit,
            bytes: 0,
            files: 0,
        }
    }

    /// Whether this writer only measures.
    pub fn measuring(&self) -> bool {
        self.tar.is_none()
    }

    fn skip(&mut self, why: String) {
        if self.skipped.len() < MAX_SKIPPED {
            self.skipped.push(why);
        } else {
            self.more_skipped += 1;
        }
    }

    /// What was left out, with the count of what was not named.
    pub fn take_skipped(&mut self) -> Vec<String> {
        let mut v = std::mem::take(&mut self.skipped);
        if self.more_skipped > 0 {
            v.push(format!(
                "and {} more entries like these, not named here",
                std::mem::take(&mut self.more_skipped)
            ));
        }
        v
    }

    fn tar(&mut self) -> &mut tar::Builder<W> {
        self.tar.as_mut().expect("a writing Writer")
    }

    /// Adds the dump from `file` (read from its start) as [`DUMP`]; returns its size and sha256.
    /// The dump is read once: hashed on its way into the archive.
    pub fn add_dump(&mut self, file: &mut File) -> Result<(u64, String)> {
        file.seek(SeekFrom::Start(0))?;
        let size = file.metadata()?.len();
        let mut h = header(size, 0o600, now());
        let mut r = Hashing::new(file.take(size));
        self.tar()
            .append_data(&mut h, DUMP, &mut r)
            .context("writing the database dump into the backup")?;
        let (read, sha) = r.finish();
        if read != size {
            bail!(
                "the database dump ended after {read} of its {size} bytes while it was written into the backup; run the backup again"
            );
        }
        self.bytes += member_bytes(DUMP, size);
        Ok((size, sha))
    }

    /// Opens the regular file `name` of `dir` when a backup takes it: not a symlink or
    /// anything else, not over the size limit, not mostly holes. What is left out is reported.
    fn admit(&mut self, dir: &Dir, name: &OsStr) -> Result<Option<(File, u64, u32)>> {
        let Some((f, st)) = dir.open_regular(name)? else {
            if dir.contains(name) {
                self.skip(format!(
                    "{}: not a regular file (a symlink or special file); not followed",
                    dir.path().join(name).display()
                ));
            }
            return Ok(None);
        };
        let size = st.st_size as u64;
        if size > self.limit {
            self.skip(format!(
                "{}: {size} bytes, larger than the {} bytes a backed-up file may have",
                dir.path().join(name).display(),
                self.limit
            ));
            return Ok(None);
        }
        if mostly_holes(&f, &st) {
            self.skip(format!(
                "{}: {size} bytes of which {} are on disk: a sparse file, which Synapse never writes; not backed up",
                dir.path().join(name).display(),
                st.st_blocks as u64 * 512
            ));
            return Ok(None);
        }
        Ok(Some((f, size, st.st_mode)))
    }

    /// Adds the regular file `name` of `dir` as `path`, streamed, if a backup takes it (see
    /// `admit`). Returns whether it was added. A file that shrinks while it is read (its
    /// owner is writing it) is padded with zeros to the size its header gave, so the archive
    /// stays whole; that is reported.
    pub fn add_file(&mut self, dir: &Dir, name: &OsStr, path: &str) -> Result<bool> {
        let Some((f, size, mode)) = self.admit(dir, name)? else {
            return Ok(false);
        };
        self.bytes += member_bytes(path, size);
        self.files += 1;
        if self.tar.is_none() {
            return Ok(true);
        }
        let mut h = header(size, mode, now());
        let mut r = Hashing::new(Padded::new((&f).take(size), size));
        self.tar()
            .append_data(&mut h, path, &mut r)
            .with_context(|| format!("writing {path} into the backup"))?;
        if r.inner.padded {
            self.skip(format!(
                "{}: shrank while it was read; its copy is padded with zeros",
                dir.path().join(name).display()
            ));
        }
        let (_, sha256) = r.finish();
        self.parts.push(Part {
            path: path.to_string(),
            size,
            sha256,
            mode: mode & 0o7777,
        });
        Ok(true)
    }

    /// Adds every regular file below `top` as `prefix/...`, descending only into real
    /// directories and at most [`MAX_DEPTH`] levels. The walk keeps its own stack (a tree a
    /// child made may be any depth) and holds one descriptor per level.
    pub fn add_tree(&mut self, top: Dir, prefix: &str) -> Result<()> {
        /// One open directory, its names still to take (sorted, popped from the end), and
        /// its archive path.
        struct Level {
            dir: Dir,
            left: Vec<std::ffi::OsString>,
            prefix: String,
        }
        let level = |dir: Dir, prefix: String| -> Result<Level> {
            let mut left = dir.entries()?;
            left.sort_by(|a, b| b.cmp(a));
            Ok(Level { dir, left, prefix })
        };
        let mut stack = vec![level(top, prefix.to_string())?];
        while let Some(here) = stack.last_mut() {
            let Some(name) = here.left.pop() else {
                stack.pop();
                continue;
            };
            let Some(n) = name.to_str() else {
                self.skip(format!(
                    "{}: a name that is not UTF-8",
                    here.dir.path().join(&name).display()
                ));
                continue;
            };
            // Our own temp files (fsutil) are never part of the state.
            if n.starts_with('.') && n.ends_with(".tmp") {
                continue;
            }
            let path = format!("{}/{n}", here.prefix);
            let depth = stack.len();
            let here = stack.last().expect("a level");
            // open_sub opens real directories only (never a link to one).
            match here.dir.open_sub(&name)? {
                Some(sub) if depth > MAX_DEPTH => self.skip(format!(
                    "{}: a directory more than {MAX_DEPTH} levels deep, which is not Synapse's layout; not backed up",
                    sub.path().display()
                )),
                Some(sub) => {
                    let next = level(sub, path)?;
                    stack.push(next);
                }
                None => {
                    self.add_file(&here.dir, &name, &path)?;
                }
            }
        }
        Ok(())
    }

    /// Adds the manifest (last) and finishes the archive; returns the inner writer.
    pub fn finish(mut self, manifest: &Manifest) -> Result<W> {
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
        let mut h = header(json.len() as u64, 0o600, now());
        self.tar()
            .append_data(&mut h, MANIFEST, json.as_slice())
            .context("writing the manifest into the backup")?;
        self.tar
            .take()
            .expect("a writing Writer")
            .into_inner()
            .context("finishing the backup")
    }
}

/// A reader of exactly `size` bytes: what `inner` gives, then zeros if it ends early.
struct Padded<R> {
    inner: R,
    left: u64,
    padded: bool,
}

impl<R: Read> Padded<R> {
    fn new(inner: R, size: u64) -> Padded<R> {
        Padded {
            inner,
            left: size,
            padded: false,
        }
    }
}

impl<R: Read> Read for Padded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let mut n = if self.padded {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        if n == 0 {
            self.padded = true;
            buf[..want].fill(0);
            n = want;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A reader that counts and hashes (sha256) what passes through it.
pub struct Hashing<R> {
    inner: R,
    sha: Sha,
    size: u64,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            sha: Sha::new(&SHA256),
            size: 0,
        }
    }

    /// The bytes read and their sha256 (hex).
    pub fn finish(self) -> (u64, String) {
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

/// Largest manifest read into memory (one for a million media files is some 200 MB).
const MAX_MANIFEST: u64 = 512 << 20;

/// One member as its header gives it.
struct Member {
    name: String,
    size: u64,
}

/// Reads the archive twice, never trusting a header. First the headers alone: every member
/// must be a regular file (all the writer makes: a symlink, a hard link, a directory or a GNU
/// sparse member, whose holes tar readers fill with zeros at will, is refused), named once,
/// lying inside the file, the manifest last; the manifest must list exactly the members, with
/// their sizes, and no member may sit below another's name (a file used as a directory). Then
/// the data, streamed and hashed against the manifest, the dump copied into an anonymous file
/// in `scratch` (after checking it fits there). Nothing is buffered but the manifest.
pub fn check(path: &Path, scratch: &Path) -> Result<Checked> {
    let file = path.display().to_string();
    let unreadable = |e: std::io::Error| Damaged::Unreadable {
        file: file.clone(),
        detail: e.to_string(),
    };
    let mismatch = |part: &str, detail: String| Damaged::Mismatch {
        file: file.clone(),
        part: part.to_string(),
        detail,
    };
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut ar = tar::Archive::new(f);
    let mut members: Vec<Member> = vec![];
    let mut names = std::collections::HashSet::new();
    let mut manifest: Option<Manifest> = None;
    for entry in ar.entries_with_seek().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        let name = entry
            .path()
            .map_err(unreadable)?
            .to_string_lossy()
            .into_owned();
        if manifest.is_some() {
            return Err(mismatch(&name, "a member after the manifest".into()).into());
        }
        let kind = entry.header().entry_type();
        if kind != tar::EntryType::Regular {
            return Err(mismatch(
                &name,
                format!("a {kind:?} member; a backup holds regular files only"),
            )
            .into());
        }
        let size = entry.size();
        if entry.raw_file_position().saturating_add(size) > len {
            return Err(Damaged::Unreadable {
                file,
                detail: format!("{name} claims {size} bytes, more than the file holds"),
            }
            .into());
        }
        if !names.insert(name.clone()) {
            return Err(mismatch(&name, "in the archive twice".into()).into());
        }
        if name == MANIFEST {
            if size > MAX_MANIFEST {
                return Err(mismatch(MANIFEST, format!("{size} bytes, too large")).into());
            }
            let mut buf = vec![];
            entry.read_to_end(&mut buf).map_err(unreadable)?;
            manifest = Some(
                serde_json::from_slice(&buf)
                    .map_err(|e| mismatch(MANIFEST, format!("not a manifest: {e}")))?,
            );
            continue;
        }
        members.push(Member { name, size });
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
    let mut want: HashMap<&str, (u64, &str)> = manifest
        .parts
        .iter()
        .map(|p| (p.path.as_str(), (p.size, p.sha256.as_str())))
        .collect();
    if want.len() != manifest.parts.len() {
        return Err(mismatch(MANIFEST, "lists a part twice".into()).into());
    }
    want.insert(
        DUMP,
        (manifest.database.size, manifest.database.sha256.as_str()),
    );
    for m in &members {
        match want.get(m.name.as_str()) {
            None => return Err(mismatch(&m.name, "not in the manifest".into()).into()),
            Some((size, _)) if *size != m.size => {
                return Err(mismatch(
                    &m.name,
                    format!("{} bytes, the manifest says {size}", m.size),
                )
                .into());
            }
            Some(_) => {}
        }
    }
    if let Some(missing) = want.keys().find(|k| !names.contains(**k)) {
        return Err(mismatch(missing, "missing".into()).into());
    }
    // A member below another one's name: the first would have to be a file and a directory.
    for m in &members {
        let mut at = 0;
        while let Some(i) = m.name[at..].find('/') {
            let above = &m.name[..at + i];
            if names.contains(above) {
                return Err(
                    mismatch(&m.name, format!("lies below {above}, which is a file")).into(),
                );
            }
            at += i + 1;
        }
    }

    let (free, _) = crate::fsutil::space(scratch)
        .with_context(|| format!("reading the free space of {}", scratch.display()))?;
    if manifest.database.size > free {
        bail!(
            "the database dump takes {}, but {} has only {} free to unpack it; free space there (or restore on a bigger disk), then run this again",
            crate::units::human_size(manifest.database.size),
            scratch.display(),
            crate::units::human_size(free)
        );
    }
    let mut dump = tempfile::tempfile_in(scratch)
        .with_context(|| format!("making a scratch file in {}", scratch.display()))?;
    let mut ar = tar::Archive::new(File::open(path)?);
    for entry in ar.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        let name = entry
            .path()
            .map_err(unreadable)?
            .to_string_lossy()
            .into_owned();
        let Some((size, sha)) = want.get(name.as_str()).copied() else {
            // The manifest itself (checked above); anything else changed since.
            if name == MANIFEST {
                continue;
            }
            return Err(mismatch(&name, "not in the manifest".into()).into());
        };
        let mut r = Hashing::new((&mut entry).take(size));
        if name == DUMP {
            std::io::copy(&mut r, &mut dump).map_err(unreadable)?;
        } else {
            std::io::copy(&mut r, &mut std::io::sink()).map_err(unreadable)?;
        }
        let (read, digest) = r.finish();
        if read != size {
            return Err(Damaged::Unreadable {
                file,
                detail: format!("{name} ends after {read} of {size} bytes"),
            }
            .into());
        }
        if digest != sha {
            return Err(
                mismatch(&name, format!("sha256 {digest}, the manifest says {sha}")).into(),
            );
        }
    }
    dump.seek(SeekFrom::Start(0))?;
    Ok(Checked { manifest, dump })
}

/// Calls `f(path, data, size, mode)` for every file member (not the dump, not the manifest) of
/// an archive that [`check`] passed, with the member's data as a reader of `size` bytes
/// (streamed, never held in memory whole).
pub fn for_each_file(
    path: &Path,
    mut f: impl FnMut(&str, &mut dyn Read, u64, u32) -> Result<()>,
) -> Result<()> {
    let mut ar = tar::Archive::new(File::open(path)?);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let name: PathBuf = entry.path()?.into_owned();
        let name = name.to_string_lossy().into_owned();
        if name == DUMP || name == MANIFEST {
            continue;
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            bail!("{name} changed since the backup was checked; run the restore again");
        }
        let mode = entry.header().mode()?;
        let size = entry.size();
        f(&name, &mut (&mut entry).take(size), size, mode)?;
    }
    Ok(())
}

/// The contents of member `name` (at most `limit` bytes), if the archive has it.
pub fn read_member(path: &Path, name: &str, limit: u64) -> Result<Option<Vec<u8>>> {
    let mut ar = tar::Archive::new(File::open(path)?);
    for entry in ar.entries_with_seek()? {
        let entry = entry?;
        if entry.path()?.to_string_lossy() == name {
            let mut buf = vec![];
            entry.take(limit).read_to_end(&mut buf)?;
            return Ok(Some(buf));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// `depth` nested directories `d` below `top`, made through descriptors (the path is far
    /// longer than PATH_MAX), with a file in the deepest.
    fn deep_tree(top: &Path, depth: usize) {
        use nix::fcntl::{OFlag, openat};
        use nix::sys::stat::{Mode, mkdirat};
        let mut fd = nix::fcntl::open(top, OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        for _ in 0..depth {
            mkdirat(fd.as_fd(), "d", Mode::from_bits_truncate(0o700)).unwrap();
            fd = openat(fd.as_fd(), "d", OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        }
        let f = openat(
            fd.as_fd(),
            "bottom",
            OFlag::O_CREAT | OFlag::O_WRONLY,
            Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        nix::unistd::write(&f, b"x").unwrap();
    }

    /// Runs `f` on a thread with a 256 KiB stack: a walk that recursed per level would
    /// overflow it thousands of levels before the bottom.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(f)
            .unwrap()
            .join()
            .expect("no stack overflow")
    }

    #[test]
    fn a_tree_of_any_depth_is_walked_to_the_cap_and_removed_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("local_content");
        fs_mkdir(&top);
        std::fs::write(top.join("shallow"), b"kept").unwrap();
        deep_tree(&top, 19_000);
        let t = top.clone();
        let (bytes, parts, skipped) = on_small_stack(move || {
            let mut w = Writer::new(std::io::sink(), 1 << 20);
            w.add_tree(Dir::open(&t).unwrap(), "media").unwrap();
            let skipped = w.take_skipped();
            (w.bytes, w.parts, skipped)
        });
        let names: Vec<&str> = parts.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(names, ["media/shallow"], "{skipped:?}");
        assert!(bytes > 0);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].contains(&format!("more than {MAX_DEPTH} levels deep")),
            "{skipped:?}"
        );
        // The cut is at MAX_DEPTH levels below the top: that many `d/` in the path named.
        assert_eq!(
            skipped[0].matches("/d").count(),
            MAX_DEPTH + 1,
            "{skipped:?}"
        );

        let base = tmp.path().to_owned();
        on_small_stack(move || Dir::open(&base).unwrap().remove("local_content").unwrap());
        assert!(!top.exists());
    }

    fn fs_mkdir(p: &Path) {
        std::fs::create_dir(p).unwrap();
    }

    #[test]
    fn sparse_files_are_left_out_and_the_count_of_skipped_is_capped() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("media");
        fs_mkdir(&top);
        for i in 0..6 {
            let f = File::create(top.join(format!("sparse{i}"))).unwrap();
            f.set_len(250 << 20).unwrap();
        }
        std::fs::write(top.join("real"), vec![7u8; 100_000]).unwrap();
        for i in 0..150 {
            std::os::unix::fs::symlink("/etc/shadow", top.join(format!("link{i:03}"))).unwrap();
        }
        let mut w = Writer::new(std::io::sink(), 1 << 30);
        w.add_tree(Dir::open(&top).unwrap(), "m").unwrap();
        let names: Vec<&str> = w.parts.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(names, ["m/real"]);
        assert!(w.bytes < 200_000, "{}", w.bytes);
        let skipped = w.take_skipped();
        assert_eq!(skipped.len(), MAX_SKIPPED + 1, "{skipped:?}");
        assert!(
            skipped
                .iter()
                .filter(|s| s.contains("a sparse file"))
                .count()
                <= 6,
            "{skipped:?}"
        );
        assert_eq!(
            skipped.last().unwrap(),
            &format!(
                "and {} more entries like these, not named here",
                156 - MAX_SKIPPED
            )
        );
        // The measuring writer makes the same choices and reads nothing.
        let mut m = Writer::measure(1 << 30);
        m.add_tree(Dir::open(&top).unwrap(), "m").unwrap();
        assert_eq!((m.bytes, m.files), (w.bytes, 1));
    }

    /// An archive with the members given (name, type, data) and a manifest that lists every
    /// regular one with its true size and hash.
    fn archive(dir: &Path, members: &[(&str, tar::EntryType, &[u8])]) -> PathBuf {
        let path = dir.join("b.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut parts = vec![];
        let mut db = (0, String::new());
        for (name, kind, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_entry_type(*kind);
            if *kind == tar::EntryType::Symlink {
                h.set_size(0);
                b.append_link(&mut h, name, "/etc").unwrap();
                continue;
            }
            b.append_data(&mut h, name, *data).unwrap();
            let sha = crate::secrets::sha256_hex(data);
            if *name == DUMP {
                db = (data.len() as u64, sha);
            } else {
                parts.push(Part {
                    path: name.to_string(),
                    size: data.len() as u64,
                    sha256: sha,
                    mode: 0o600,
                });
            }
        }
        let m = Manifest {
            format: FORMAT,
            kind: "manual".into(),
            created_at: 0,
            server_name: "x".into(),
            versions: BTreeMap::new(),
            database: Database {
                name: "d".into(),
                role: "r".into(),
                size: db.0,
                sha256: db.1,
                excluded_table_data: vec![],
                row_counts: BTreeMap::new(),
            },
            parts,
            skipped: vec![],
            elsewhere: vec![],
        };
        let json = serde_json::to_vec(&m).unwrap();
        let mut h = header(json.len() as u64, 0o600, 0);
        b.append_data(&mut h, MANIFEST, json.as_slice()).unwrap();
        b.into_inner().unwrap();
        path
    }

    fn refused(path: &Path, scratch: &Path) -> String {
        match check(path, scratch) {
            Ok(_) => panic!("{} passed the check", path.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn check_takes_regular_members_only_each_once_and_never_one_below_another() {
        use tar::EntryType::{Regular, Symlink};
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let ok = archive(
            t,
            &[(DUMP, Regular, b"dump"), ("state/ca/a", Regular, b"a")],
        );
        let c = check(&ok, t).unwrap();
        assert_eq!(c.manifest.parts.len(), 1);

        let link = archive(
            t,
            &[
                (DUMP, Regular, b"dump"),
                ("state/acme/l", Symlink, b""),
                ("state/acme/l/x", Regular, b"through the link"),
            ],
        );
        let e = refused(&link, t);
        assert!(e.contains("a Symlink member"), "{e}");

        let below = archive(
            t,
            &[
                (DUMP, Regular, b"dump"),
                ("state/acme/f", Regular, b"a file"),
                ("state/acme/f/x", Regular, b"below it"),
            ],
        );
        let e = refused(&below, t);
        assert!(
            e.contains("lies below state/acme/f, which is a file"),
            "{e}"
        );

        // The same name twice: the second would replace what the first restored.
        let twice = archive(
            t,
            &[
                (DUMP, Regular, b"dump"),
                ("state/ca/a", Regular, b"one"),
                ("state/ca/a", Regular, b"two"),
            ],
        );
        let e = refused(&twice, t);
        assert!(e.contains("twice"), "{e}");
    }

    /// A GNU sparse member is 10 KB in the file and as big as its header says when read: the
    /// check refuses it from its header, before one byte of it is written anywhere.
    #[test]
    fn a_sparse_or_oversized_member_is_refused_before_anything_is_written() {
        use tar::EntryType::Regular;
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let ok = archive(t, &[(DUMP, Regular, b"dumpdump")]);
        let bytes = std::fs::read(&ok).unwrap();

        // A well-formed GNU sparse dump: 512 bytes stored, declared as 1 TiB of holes then
        // those bytes (what a tar reader hands out: 1 TiB of zeros first).
        let p = t.join("sparse.tar");
        let mut b = tar::Builder::new(File::create(&p).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(512);
        h.set_mode(0o600);
        h.set_path(DUMP).unwrap();
        let g = h.as_gnu_mut().unwrap();
        g.set_real_size(1 << 40);
        g.sparse[0].set_offset((1 << 40) - 512);
        g.sparse[0].set_length(512);
        h.set_cksum();
        b.append(&h, &[1u8; 512][..]).unwrap();
        let json = serde_json::to_vec(&check(&ok, t).unwrap().manifest).unwrap();
        let mut h = header(json.len() as u64, 0o600, 0);
        b.append_data(&mut h, MANIFEST, json.as_slice()).unwrap();
        b.into_inner().unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() < 10_000);
        let scratch = t.join("scratch");
        fs_mkdir(&scratch);
        let e = refused(&p, &scratch);
        assert!(e.contains("GNUSparse"), "{e}");
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);

        // A regular header that claims more than the file holds.
        let mut big = bytes.clone();
        let mut g = tar::Header::from_byte_slice(&big[..512]).clone();
        g.set_size(3 << 30);
        g.set_cksum();
        big[..512].copy_from_slice(g.as_bytes());
        let p = t.join("big.tar");
        std::fs::write(&p, &big).unwrap();
        let e = refused(&p, &scratch);
        assert!(e.contains("more than the file holds"), "{e}");

        // A member whose size differs from the manifest's (a hash recomputed for a bigger
        // file, but the manifest left as it was).
        let mut m: Manifest = {
            let c = check(&ok, t).unwrap();
            c.manifest
        };
        m.database.size = 4;
        let json = serde_json::to_vec(&m).unwrap();
        let p = t.join("size.tar");
        let mut b = tar::Builder::new(File::create(&p).unwrap());
        let mut h = header(8, 0o600, 0);
        b.append_data(&mut h, DUMP, &b"dumpdump"[..]).unwrap();
        let mut h = header(json.len() as u64, 0o600, 0);
        b.append_data(&mut h, MANIFEST, json.as_slice()).unwrap();
        b.into_inner().unwrap();
        let e = refused(&p, &scratch);
        assert!(e.contains("8 bytes, the manifest says 4"), "{e}");
    }

    #[test]
    fn a_file_that_shrinks_while_read_is_padded_to_its_header() {
        let mut r = Padded::new(&b"abc"[..], 6);
        let mut out = vec![];
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc\0\0\0");
        assert!(r.padded);
        let mut r = Padded::new(&b"abcdef"[..], 4);
        let mut out = vec![];
        r.read_to_end(&mut out).unwrap();
        assert_eq!((out.as_slice(), r.padded), (&b"abcd"[..], false));
    }
}
