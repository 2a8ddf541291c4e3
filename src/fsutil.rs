//! File-system helpers every module shares: atomic writes and directories with the owner and
//! mode DESIGN.md §3 gives them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use nix::unistd::{Gid, Uid, chown};

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
}

/// Creates `dir` (and missing parents) and then sets its owner and mode, also when it already
/// existed, so a wrong mode left by hand is corrected at every start.
pub fn ensure_dir(dir: &Path, owner: Owner, mode: u32) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    set_owner_mode(dir, owner, mode)
}

pub fn set_owner_mode(path: &Path, owner: Owner, mode: u32) -> Result<()> {
    chown(path, Some(owner.uid), Some(owner.gid))
        .with_context(|| format!("changing owner of {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("changing mode of {}", path.display()))
}

/// Writes `contents` to `path` so that readers see the old file or the new one, never half of
/// one: a temp file beside it (created with `mode`, so a secret is never briefly readable),
/// fsync, chown, rename, then fsync of the directory so the rename survives a power cut.
pub fn write_atomic(path: &Path, contents: &[u8], owner: Owner, mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(contents)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        set_owner_mode(&tmp, owner, mode)?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes only when the contents differ; returns whether it wrote. Keeps mtimes (and Synapse's
/// view of "changed") stable across restarts.
pub fn write_if_changed(path: &Path, contents: &[u8], owner: Owner, mode: u32) -> Result<bool> {
    if fs::read(path).is_ok_and(|old| old == contents) {
        set_owner_mode(path, owner, mode)?;
        return Ok(false);
    }
    write_atomic(path, contents, owner, mode)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        let me = Owner {
            uid: Uid::current(),
            gid: Gid::current(),
        };
        write_atomic(&p, b"one", me, 0o600).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert!(!write_if_changed(&p, b"one", me, 0o600).unwrap());
        assert!(write_if_changed(&p, b"two", me, 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // No temp files are left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
