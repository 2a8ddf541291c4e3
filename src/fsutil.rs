//! File-system helpers every module shares: atomic writes and directories with the owner and
//! mode DESIGN.md §3 gives them.
//!
//! Root never writes, chowns or deletes through a path someone else can change (DESIGN.md §3):
//! every operation goes through an open directory descriptor ([`Dir`]). A directory is opened
//! with `O_DIRECTORY|O_NOFOLLOW`, so its last component is never a symlink (the components above
//! it may be: those are the operator's); files are made under a random name with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`, owned and moded on the open descriptor, fsynced and renamed into
//! place with `renameat`; an old file is read with `O_NOFOLLOW` and only when it is a regular
//! file with one link; entries are deleted with `unlinkat`, never following or recursing into a
//! symlink. A child that can write in a directory can still rename or replace what root wrote
//! there, but it cannot make root write, chown or delete anything else.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, fsync, unlinkat};
use ring::rand::{SecureRandom, SystemRandom};

/// An exclusive lock on all of `f` for as long as its open file description lives (F_OFD_SETLK:
/// not inherited by children, which get no copy of a close-on-exec descriptor, and released
/// when the process dies). Ok(false) when another holds it.
pub fn try_lock(f: &fs::File) -> std::io::Result<bool> {
    let mut fl = whole_file(nix::libc::F_WRLCK);
    // SAFETY: F_OFD_SETLK on an open descriptor with a pointer to a live flock.
    match unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_OFD_SETLK, &mut fl) } {
        0 => Ok(true),
        _ => match std::io::Error::last_os_error() {
            e if matches!(
                e.raw_os_error(),
                Some(nix::libc::EAGAIN | nix::libc::EACCES)
            ) =>
            {
                Ok(false)
            }
            e => Err(e),
        },
    }
}

/// Whether someone holds a lock on `path` (fcntl's, or an OFD lock as `try_lock` takes): F_GETLK
/// asks without taking one, so a read-only descriptor will do and no taker is ever refused
/// because someone asked.
pub fn lock_held(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    let mut fl = whole_file(nix::libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK on an open descriptor with a pointer to a live flock (l_pid 0).
    let r = unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_OFD_GETLK, &mut fl) };
    r == 0 && i32::from(fl.l_type) != nix::libc::F_UNLCK
}

fn whole_file(kind: i32) -> nix::libc::flock {
    // SAFETY: a zeroed flock is a valid value (the whole file from offset 0, l_pid 0).
    let mut fl: nix::libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as _;
    fl.l_whence = nix::libc::SEEK_SET as _;
    fl
}

/// Who owns a file or directory we create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: Uid,
    pub gid: Gid,
}

impl Owner {
    pub fn root() -> Owner {
        Owner {
            uid: Uid::from_raw(0),
            gid: Gid::from_raw(0),
        }
    }

    /// Root as owner, `gid` as group: files a child reads through its group but cannot change.
    pub fn root_with_group(gid: Gid) -> Owner {
        Owner {
            uid: Uid::from_raw(0),
            gid,
        }
    }
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// An open directory. Everything done through it is relative to its descriptor, so a path
/// component renamed or replaced by a symlink after it was opened cannot redirect a write.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens `path`, whose last component must be a directory, not a symlink to one.
    pub fn open(path: &Path) -> Result<Dir> {
        match open(path, dir_flags(), Mode::empty()) {
            Ok(fd) => Ok(Dir {
                fd,
                path: path.to_owned(),
            }),
            Err(Errno::ELOOP | Errno::ENOTDIR)
                if fs::symlink_metadata(path).is_ok_and(|m| !m.is_dir()) =>
            {
                bail!("{}", not_a_dir(path))
            }
            Err(e) => Err(e).with_context(|| format!("opening directory {}", path.display())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Sets this directory's owner and mode on its descriptor (only what differs, so an
    /// unchanged directory keeps its ctime).
    pub fn set_owner_mode(&self, owner: Owner, mode: u32) -> Result<()> {
        set_fd_owner_mode(&self.fd, owner, mode).with_context(|| {
            format!(
                "setting owner and mode of directory {}",
                self.path.display()
            )
        })
    }

    /// The subdirectory `name`, made when missing, then owned and moded through its own
    /// descriptor, also when it already existed (a mode left wrong by hand is corrected, and a
    /// directory a child owned in an older layout is taken back before anything is read in it).
    ///
    /// A symlink or file where the directory should be is an error, unless it belongs to
    /// someone else and this directory only its owner can write: then it was left there while a
    /// child could still write here (the older layout), and it is removed, not followed.
    pub fn ensure_sub(&self, name: &str, owner: Owner, mode: u32) -> Result<Dir> {
        let path = self.join(name);
        for first in [true, false] {
            match mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating directory {}", path.display()));
                }
            }
            match openat(&self.fd, name, dir_flags(), Mode::empty()) {
                Ok(fd) => {
                    let d = Dir { fd, path };
                    d.set_owner_mode(owner, mode)?;
                    return Ok(d);
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) if first && self.remove_foreign(name)? => {}
                Err(Errno::ELOOP | Errno::ENOTDIR) => bail!("{}", not_a_dir(&path)),
                Err(e) => {
                    return Err(e).with_context(|| format!("opening directory {}", path.display()));
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Removes the non-directory `name` when someone other than us owns it while only we can
    /// write this directory (see `ensure_sub`). Returns whether it did.
    fn remove_foreign(&self, name: &str) -> Result<bool> {
        let me = Uid::effective().as_raw();
        let here = fstat(&self.fd).with_context(|| format!("stat {}", self.path.display()))?;
        let Ok(st) = fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            return Ok(false);
        };
        let only_we_write = here.st_uid == me && here.st_mode & 0o022 == 0;
        if st.st_uid == me || !only_we_write || file_type(&st) == SFlag::S_IFDIR {
            return Ok(false);
        }
        tracing::warn!(
            path = %self.join(name).display(),
            "removing an entry another user left where a directory belongs (not following it)"
        );
        self.remove(name)?;
        Ok(true)
    }

    /// Writes `contents` to `name` so that readers see the old file or the new one, never half
    /// of one: a new temp file under a random name (`O_EXCL|O_NOFOLLOW`, created 0600 so a
    /// secret is never briefly readable), owner and mode set on its descriptor, fsync,
    /// `renameat` over `name` (a symlink there is replaced, never followed), fsync of the
    /// directory so the rename survives a power cut.
    pub fn write_atomic(&self, name: &str, contents: &[u8], owner: Owner, mode: u32) -> Result<()> {
        let mut f = self.create_atomic(name, owner, mode)?;
        f.file()
            .write_all(contents)
            .with_context(|| format!("writing {}", self.join(name).display()))?;
        f.commit()
    }

    /// A new file that becomes `name` only at [`AtomicFile::commit`]: written under a random
    /// temp name (`O_EXCL|O_NOFOLLOW`, 0600), for contents too large to hold in memory (a
    /// backup). Dropped uncommitted, the temp file is removed, so a failure leaves no half file.
    pub fn create_atomic(&self, name: &str, owner: Owner, mode: u32) -> Result<AtomicFile<'_>> {
        let tmp = temp_name(name)?;
        let fd = openat(
            &self.fd,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .with_context(|| format!("creating a temp file for {}", self.join(name).display()))?;
        Ok(AtomicFile {
            dir: self,
            file: Some(fs::File::from(fd)),
            tmp,
            name: name.to_string(),
            owner,
            mode,
        })
    }

    /// The existing subdirectory `name`, opened without following a symlink and without
    /// creating or changing anything (for reading a child's tree). `None` when it is missing
    /// or not a real directory.
    pub fn open_sub(&self, name: &OsStr) -> Result<Option<Dir>> {
        match openat(&self.fd, name, dir_flags(), Mode::empty()) {
            Ok(fd) => Ok(Some(Dir {
                fd,
                path: self.path.join(name),
            })),
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => Ok(None),
            Err(e) => Err(e)
                .with_context(|| format!("opening directory {}", self.path.join(name).display())),
        }
    }

    /// Connects to the unix socket `name` when it is a socket owned by `owner`, never following
    /// a symlink (its owner may have planted one to another service's socket); `None` for
    /// anything else. The socket is opened O_PATH and connected to through /proc/self/fd, so
    /// what is checked is what is connected to.
    pub fn connect_socket(
        &self,
        name: &str,
        owner: Uid,
    ) -> Result<Option<std::os::unix::net::UnixStream>> {
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("opening {}", self.path.join(name).display()));
            }
        };
        let st = fstat(&fd).with_context(|| format!("stat {}", self.path.join(name).display()))?;
        if file_type(&st) != SFlag::S_IFSOCK || st.st_uid != owner.as_raw() {
            return Ok(None);
        }
        let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let stream = std::os::unix::net::UnixStream::connect(&via)
            .with_context(|| format!("connecting to {}", self.path.join(name).display()))?;
        Ok(Some(stream))
    }

    /// Opens `name` for reading when it is a regular file with one link, never following a
    /// symlink nor blocking on a FIFO; `None` for anything else (see [`Dir::read_regular`]).
    pub fn open_regular(&self, name: &OsStr) -> Result<Option<(fs::File, FileStat)>> {
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let fd = match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENXIO | Errno::EISDIR) => return Ok(None),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("opening {}", self.path.join(name).display()));
            }
        };
        let st = fstat(&fd).with_context(|| format!("stat {}", self.path.join(name).display()))?;
        if file_type(&st) != SFlag::S_IFREG || st.st_nlink != 1 {
            return Ok(None);
        }
        Ok(Some((fs::File::from(fd), st)))
    }

    /// The lock file `name`, made (0644, ours) when missing, for `try_lock`. One that is not a
    /// regular file of ours with one link (a symlink, a hard link, another user's file) is an
    /// error, never followed or written.
    pub fn open_lock(&self, name: &str) -> Result<fs::File> {
        let path = self.join(name);
        let flags = OFlag::O_RDWR
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let fd =
            openat(&self.fd, name, flags, Mode::from_bits_truncate(0o644)).with_context(|| {
                format!(
                    "opening the lock file {}; if it is not a regular file, remove it",
                    path.display()
                )
            })?;
        let st = fstat(&fd).with_context(|| format!("stat {}", path.display()))?;
        if file_type(&st) != SFlag::S_IFREG
            || st.st_nlink != 1
            || st.st_uid != Uid::effective().as_raw()
        {
            bail!(
                "{} is not a regular file of this user's with one link; remove it and try again",
                path.display()
            );
        }
        Ok(fs::File::from(fd))
    }

    /// Writes only when the contents differ; returns whether it wrote. Keeps mtimes (and
    /// Synapse's view of "changed") stable across restarts. An old entry that is not a regular
    /// file with one link (a symlink, a FIFO, a hard link to something else) is never read,
    /// chowned or written through: it is replaced. So is one owned by another user than
    /// `owner` (a child's file from the older layout): a child may still hold it open for
    /// writing, so it is not taken over in place but replaced by a new file.
    pub fn write_if_changed(
        &self,
        name: &str,
        contents: &[u8],
        owner: Owner,
        mode: u32,
    ) -> Result<bool> {
        if let Some((old, f)) = self.read_regular(name, contents.len() as u64 + 1)?
            && old == contents
            && fstat(&f).is_ok_and(|st| st.st_uid == owner.uid.as_raw())
        {
            set_fd_owner_mode(&f, owner, mode).with_context(|| {
                format!("setting owner and mode of {}", self.join(name).display())
            })?;
            return Ok(false);
        }
        self.write_atomic(name, contents, owner, mode)?;
        Ok(true)
    }

    /// Reads at most `limit` bytes of `name` when it is a regular file with one link, without
    /// following a symlink or blocking on a FIFO. `None` when it is missing or anything else.
    pub fn read_regular(&self, name: &str, limit: u64) -> Result<Option<(Vec<u8>, fs::File)>> {
        let Some((f, _)) = self.open_regular(OsStr::new(name))? else {
            return Ok(None);
        };
        let mut buf = vec![];
        (&f).take(limit)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", self.join(name).display()))?;
        Ok(Some((buf, f)))
    }

    /// The names in this directory (without `.` and `..`), read through a fresh descriptor of
    /// it.
    pub fn entries(&self) -> Result<Vec<OsString>> {
        let mut d = nix::dir::Dir::openat(&self.fd, ".", dir_flags(), Mode::empty())
            .with_context(|| format!("reading directory {}", self.path.display()))?;
        let mut names = vec![];
        for e in d.iter() {
            let e = e.with_context(|| format!("reading directory {}", self.path.display()))?;
            let n = OsStr::from_bytes(e.file_name().to_bytes());
            if n != "." && n != ".." {
                names.push(n.to_owned());
            }
        }
        Ok(names)
    }

    /// Whether `name` exists (a dangling symlink counts: it is an entry).
    pub fn contains(&self, name: &OsStr) -> bool {
        fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
    }

    /// Removes every entry for which `keep` is false, without following any. Returns whether
    /// it removed one.
    pub fn remove_all_but(&self, keep: impl Fn(&OsStr) -> bool) -> Result<bool> {
        let mut removed = false;
        for name in self.entries()? {
            if !keep(&name) {
                self.remove(&name)?;
                removed = true;
            }
        }
        Ok(removed)
    }

    /// Removes `name` without following it: a symlink is unlinked itself; a real directory
    /// is emptied through its own descriptor, descending only into real directories. A
    /// directory with a file system mounted on it (rmdir says EBUSY: an operator's media
    /// disk, say) is emptied and stays, so that what is put there again lands on that disk;
    /// so do the directories above it (ENOTEMPTY once all else in them is gone).
    ///
    /// The walk keeps its own stack, never the thread's: a child can make a tree of any
    /// depth (a 19,000-deep one overflowed a recursive walk). Below [`MAX_OPEN_LEVELS`] open
    /// levels, a deeper directory is moved up into `name` itself (renameat between two
    /// descriptors of the tree being removed) and removed from there, so the descriptors held
    /// stay bounded too.
    pub fn remove<P: AsRef<OsStr> + ?Sized>(&self, name: &P) -> Result<()> {
        let name = name.as_ref();
        let path = self.path.join(name);
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EISDIR | Errno::EPERM) => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        /// One open directory of the walk, the names in it still to remove, and its own
        /// name in the level above.
        struct Level {
            dir: Dir,
            left: Vec<OsString>,
            name: OsString,
        }
        let open = |parent: &Dir, n: &OsStr| -> Result<Level> {
            let p = parent.path.join(n);
            let fd = openat(&parent.fd, n, dir_flags(), Mode::empty())
                .with_context(|| format!("removing {}", p.display()))?;
            let dir = Dir { fd, path: p };
            Ok(Level {
                left: dir.entries()?,
                dir,
                name: n.to_owned(),
            })
        };
        let mut stack = vec![open(self, name)?];
        while let Some(level) = stack.last_mut() {
            let Some(n) = level.left.pop() else {
                let done = stack.pop().expect("a level");
                let parent = stack.last().map_or(self, |l| &l.dir);
                match unlinkat(&parent.fd, done.name.as_os_str(), UnlinkatFlags::RemoveDir) {
                    Ok(()) | Err(Errno::ENOENT | Errno::EBUSY | Errno::ENOTEMPTY) => continue,
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("removing directory {}", done.dir.path.display())
                        });
                    }
                }
            };
            match unlinkat(&level.dir.fd, n.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => continue,
                Err(Errno::EISDIR | Errno::EPERM) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("removing {}", level.dir.path.join(&n).display())
                    });
                }
            }
            if stack.len() >= MAX_OPEN_LEVELS {
                let moved = temp_name("removed")?;
                let (top, rest) = stack.split_first_mut().expect("a level");
                let here = rest.last().expect("deeper than the top");
                // A mount point (EBUSY, EXDEV) is not moved: it is descended into instead.
                if renameat(&here.dir.fd, n.as_os_str(), &top.dir.fd, moved.as_str()).is_ok() {
                    top.left.push(moved.into());
                    continue;
                }
            }
            let sub = open(&stack.last().expect("a level").dir, &n)?;
            stack.push(sub);
        }
        Ok(())
    }

    /// Moves `name` (whatever it is, never following it) to `to/new_name`.
    pub fn rename_to(&self, name: &str, to: &Dir, new_name: &str) -> Result<()> {
        renameat(&self.fd, name, &to.fd, new_name).with_context(|| {
            format!(
                "moving {} to {}",
                self.join(name).display(),
                to.join(new_name).display()
            )
        })?;
        fsync(&to.fd).with_context(|| format!("syncing directory {}", to.path.display()))?;
        fsync(&self.fd).with_context(|| format!("syncing directory {}", self.path.display()))
    }
}

/// Directory descriptors [`Dir::remove`] holds open at most (one per level it is in).
pub const MAX_OPEN_LEVELS: usize = 64;

/// Free and total bytes of the file system `path` is on, as an unprivileged writer sees them
/// (statvfs(3): blocks available, not the root reserve).
pub fn space(path: &Path) -> nix::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path)?;
    let f = s.fragment_size();
    Ok((s.blocks_available() * f, s.blocks() * f))
}

/// A file being written by [`Dir::create_atomic`].
pub struct AtomicFile<'a> {
    dir: &'a Dir,
    file: Option<fs::File>,
    tmp: String,
    name: String,
    owner: Owner,
    mode: u32,
}

impl AtomicFile<'_> {
    pub fn file(&mut self) -> &mut fs::File {
        self.file.as_mut().expect("not committed yet")
    }

    /// Owner and mode on the descriptor, fsync, rename into place, fsync of the directory.
    pub fn commit(mut self) -> Result<()> {
        let f = self.file.take().expect("committed once");
        let path = self.dir.join(&self.name);
        set_fd_owner_mode(&f, self.owner, self.mode)
            .with_context(|| format!("setting owner and mode of {}", path.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
        renameat(
            &self.dir.fd,
            self.tmp.as_str(),
            &self.dir.fd,
            self.name.as_str(),
        )
        .with_context(|| format!("renaming a temp file to {}", path.display()))?;
        self.tmp.clear();
        fsync(&self.dir.fd)
            .with_context(|| format!("syncing directory {}", self.dir.path.display()))
    }
}

impl Drop for AtomicFile<'_> {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = unlinkat(&self.dir.fd, self.tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

fn not_a_dir(path: &Path) -> String {
    format!(
        "{} is a symbolic link or not a directory; homelab-matrix never writes through a link: replace it with the real directory (to keep this data on another disk, mount that disk here, or point state.dir at the real path), then restart",
        path.display()
    )
}

/// `.<name>.<64 random bits>.tmp`: a name no other process can guess in advance (the OS
/// CSPRNG, not the pid), and with `O_EXCL` never one that already exists.
fn temp_name(name: &str) -> Result<String> {
    let mut b = [0u8; 8];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the OS random number generator failed"))?;
    Ok(format!(".{name}.{:016x}.tmp", u64::from_le_bytes(b)))
}

fn set_fd_owner_mode<F: AsFd>(fd: F, owner: Owner, mode: u32) -> nix::Result<()> {
    let st = fstat(&fd)?;
    if st.st_uid != owner.uid.as_raw() || st.st_gid != owner.gid.as_raw() {
        fchown(&fd, Some(owner.uid), Some(owner.gid))?;
    }
    // chown(2) may clear set-id bits, so the mode is looked at after it.
    if fstat(&fd)?.st_mode & 0o7777 != mode {
        fchmod(&fd, Mode::from_bits_truncate(mode))?;
    }
    Ok(())
}

/// The parent directory of `path`, opened, and its last component.
fn split(path: &Path) -> Result<(Dir, &str)> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", path.display()))?;
    Ok((Dir::open(parent)?, name))
}

/// Creates `dir` (and missing parents) and then sets its owner and mode on its descriptor, also
/// when it already existed, so a wrong mode left by hand is corrected at every start. See
/// [`Dir::ensure_sub`] for a symlink in its place.
pub fn ensure_dir(dir: &Path, owner: Owner, mode: u32) -> Result<Dir> {
    if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(p).with_context(|| format!("creating directory {}", p.display()))?;
    }
    let (parent, name) = split(dir)?;
    parent.ensure_sub(name, owner, mode)
}

/// Sets the owner and mode of `path`, which must not be a symlink (a socket is fine).
pub fn set_owner_mode(path: &Path, owner: Owner, mode: u32) -> Result<()> {
    let (parent, name) = split(path)?;
    // O_PATH opens any type (a socket too) without reading it; with O_NOFOLLOW a symlink
    // yields the link itself, which is refused.
    let fd = openat(
        &parent.fd,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", path.display()))?;
    let st = fstat(&fd).with_context(|| format!("stat {}", path.display()))?;
    if file_type(&st) == SFlag::S_IFLNK {
        bail!(
            "{} is a symbolic link; homelab-matrix does not change owners or modes through links: remove it and restart",
            path.display()
        );
    }
    // fchown/fchmod refuse O_PATH descriptors: chown through AT_EMPTY_PATH, chmod through the
    // descriptor's /proc entry (what glibc's fchmodat does for AT_SYMLINK_NOFOLLOW).
    fchownat(
        &fd,
        "",
        Some(owner.uid),
        Some(owner.gid),
        AtFlags::AT_EMPTY_PATH,
    )
    .with_context(|| format!("changing owner of {}", path.display()))?;
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        proc.as_str(),
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .with_context(|| format!("changing mode of {}", path.display()))
}

/// [`Dir::write_atomic`] in `path`'s directory.
pub fn write_atomic(path: &Path, contents: &[u8], owner: Owner, mode: u32) -> Result<()> {
    let (dir, name) = split(path)?;
    dir.write_atomic(name, contents, owner, mode)
}

/// [`Dir::write_if_changed`] in `path`'s directory.
pub fn write_if_changed(path: &Path, contents: &[u8], owner: Owner, mode: u32) -> Result<bool> {
    let (dir, name) = split(path)?;
    dir.write_if_changed(name, contents, owner, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    fn me() -> Owner {
        Owner {
            uid: Uid::current(),
            gid: Gid::current(),
        }
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        write_atomic(&p, b"one", me(), 0o600).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert!(!write_if_changed(&p, b"one", me(), 0o600).unwrap());
        assert!(write_if_changed(&p, b"two", me(), 0o640).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        // No temp files are left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    /// A symlink at the final name is replaced by the new file; its target is not touched.
    #[test]
    fn a_symlink_at_the_name_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("canary");
        fs::write(&target, b"canary").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let p = d.path().join("homeserver.yaml");
        symlink(&target, &p).unwrap();
        // Even with the target's own contents: an unchanged symlink is not "unchanged".
        assert!(write_if_changed(&p, b"canary", me(), 0o644).unwrap());
        assert!(!fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o600);
        symlink(&target, d.path().join("other")).unwrap();
        write_atomic(&d.path().join("other"), b"new", me(), 0o644).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"canary");
        assert_eq!(fs::read(d.path().join("other")).unwrap(), b"new");
    }

    /// Another user's file with the very contents is replaced by a new one, not chowned in
    /// place: its owner may hold it open for writing. Needs root.
    #[test]
    fn a_foreign_file_is_replaced_not_taken_over() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("homeserver.yaml");
        fs::write(&p, b"same").unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        assert!(write_if_changed(&p, b"same", Owner::root(), 0o640).unwrap());
        let m = fs::metadata(&p).unwrap();
        assert_ne!(m.ino(), ino);
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o640));
        assert!(!write_if_changed(&p, b"same", Owner::root(), 0o640).unwrap());
    }

    /// A hard link (possible without protected_hardlinks) is replaced, never chowned.
    #[test]
    fn a_hard_link_is_replaced_not_chmodded() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("canary");
        fs::write(&target, b"same").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let p = d.path().join("file");
        fs::hard_link(&target, &p).unwrap();
        assert!(write_if_changed(&p, b"same", me(), 0o644).unwrap());
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&p).unwrap().nlink(), 1);
    }

    /// Temp files are made with O_EXCL under random names: two writes never share one, and
    /// an entry planted at a temp name is neither used nor followed.
    #[test]
    fn temp_names_are_random_and_exclusive() {
        let a = temp_name("x").unwrap();
        let b = temp_name("x").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(".x.") && a.ends_with(".tmp"), "{a}");
        let d = tempfile::tempdir().unwrap();
        let dir = Dir::open(d.path()).unwrap();
        let target = d.path().join("canary");
        fs::write(&target, b"canary").unwrap();
        symlink(&target, d.path().join(&a)).unwrap();
        let e = openat(
            &dir.fd,
            a.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )
        .unwrap_err();
        assert_eq!(e, Errno::EEXIST);
        dir.write_atomic("f", b"x", me(), 0o600).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"canary");
    }

    /// A symlinked directory is refused: neither opened, chowned nor written into.
    #[test]
    fn a_symlinked_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        let link = d.path().join("conf.d");
        symlink(&real, &link).unwrap();
        let e = ensure_dir(&link, me(), 0o755).unwrap_err().to_string();
        assert!(e.contains("conf.d is a symbolic link"), "{e}");
        assert!(e.contains("replace it with the real directory"), "{e}");
        assert!(Dir::open(&link).is_err());
        assert!(write_atomic(&link.join("x"), b"x", me(), 0o600).is_err());
        assert!(set_owner_mode(&link, me(), 0o755).is_err());
        assert_eq!(fs::metadata(&real).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::read_dir(&real).unwrap().count(), 0);
        // Directories above the last component may be links (the operator's).
        let above = d.path().join("above");
        symlink(&real, &above).unwrap();
        ensure_dir(&above.join("sub/deeper"), me(), 0o750).unwrap();
        assert!(real.join("sub/deeper").is_dir());
    }

    /// A symlink another user left where a directory belongs, in a directory only we write
    /// (a child's plant from the old layout), is removed and a real directory made; its
    /// target is untouched. Needs root to own a link as someone else.
    #[test]
    fn a_foreign_symlink_in_our_directory_is_replaced() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let real = d.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        let link = d.path().join("conf.d");
        symlink(&real, &link).unwrap();
        let nobody = Uid::from_raw(65534);
        fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            Some(nobody),
            None,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let dir = ensure_dir(&link, Owner::root(), 0o750).unwrap();
        assert_eq!(dir.path(), link);
        let m = fs::symlink_metadata(&link).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o777, 0o750);
        assert_eq!(fs::metadata(&real).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(&real).unwrap().uid(), 0);
    }

    /// Removal unlinks a symlink itself and never recurses through one.
    #[test]
    fn remove_never_follows() {
        let d = tempfile::tempdir().unwrap();
        let keep = d.path().join("keep");
        fs::create_dir(&keep).unwrap();
        fs::write(keep.join("precious"), b"p").unwrap();
        let work = d.path().join("work");
        fs::create_dir_all(work.join("sub")).unwrap();
        symlink(&keep, work.join("link")).unwrap();
        symlink(&keep, work.join("sub/link")).unwrap();
        fs::write(work.join("sub/file"), b"f").unwrap();
        let w = Dir::open(&work).unwrap();
        let mut names = w.entries().unwrap();
        names.sort();
        assert_eq!(names, vec![OsString::from("link"), OsString::from("sub")]);
        w.remove("link").unwrap();
        w.remove("sub").unwrap();
        w.remove("missing").unwrap();
        assert_eq!(w.entries().unwrap().len(), 0);
        assert_eq!(fs::read(keep.join("precious")).unwrap(), b"p");
    }

    /// A FIFO at the name is replaced without blocking on it.
    #[test]
    fn a_fifo_is_replaced_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600)).unwrap();
        assert!(write_if_changed(&p, b"x", me(), 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"x");
    }

    #[test]
    fn a_socket_is_connected_to_only_when_it_is_one_and_its_owners() {
        let d = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(d.path().join("s.sock")).unwrap();
        fs::write(d.path().join("file"), b"x").unwrap();
        symlink(d.path().join("s.sock"), d.path().join("link.sock")).unwrap();
        let dir = Dir::open(d.path()).unwrap();
        let me = Uid::current();
        let mut s = dir.connect_socket("s.sock", me).unwrap().expect("a socket");
        s.write_all(b"hi").unwrap();
        let (mut got, _) = listener.accept().unwrap();
        let mut buf = [0u8; 2];
        got.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let other = Uid::from_raw(me.as_raw() + 1);
        assert!(dir.connect_socket("s.sock", other).unwrap().is_none());
        assert!(dir.connect_socket("link.sock", me).unwrap().is_none());
        assert!(dir.connect_socket("file", me).unwrap().is_none());
        assert!(dir.connect_socket("absent", me).unwrap().is_none());
    }
}
