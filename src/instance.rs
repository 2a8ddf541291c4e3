//! One instance per state directory. `run` (and whatever needs the service stopped, such as
//! `restore`) holds an exclusive lock on `<state>/instance.lock` for as long as it runs, taken
//! before it touches PostgreSQL, Synapse's config or the control socket. The lock, not whether
//! the control socket answers, says whether the service runs: a socket lost or removed must
//! not make a running server look stopped.
//!
//! The lock is an open file description's (`fsutil::try_lock`): the kernel drops it when the
//! process dies, however it dies, so it is never stale; the children never inherit it. The
//! file holds the holder's pid and what it does, for the message a second one gets.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::fsutil::{self, Dir};

pub const LOCK_FILE: &str = "instance.lock";

/// Who holds the lock, as its file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<i32>,
    /// `run`, `restore`.
    pub what: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "`homelab-matrix {}` (pid {pid})", self.what),
            None => write!(f, "another homelab-matrix"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{holder} already runs on the state directory {state}; `homelab-matrix status` reaches it (control socket {socket}). To start this one instead, stop that one first (systemctl stop homelab-matrix{kill})",
        kill = holder.pid.map(|p| format!(", or kill {p}")).unwrap_or_default()
    )]
    Held {
        holder: Holder,
        state: PathBuf,
        socket: PathBuf,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct Instance {
    _file: std::fs::File,
}

impl Instance {
    /// Takes the lock on `state` for `what`, or says who holds it. `socket` is the control
    /// socket, named in the message.
    pub fn lock(state: &Path, what: &str, socket: &Path) -> Result<Instance, Error> {
        let dir = Dir::open(state)?;
        let mut file = dir.open_lock(LOCK_FILE)?;
        let path = dir.join(LOCK_FILE);
        if !fsutil::try_lock(&file).with_context(|| format!("locking {}", path.display()))? {
            return Err(Error::Held {
                holder: read_holder(&mut file),
                state: state.to_owned(),
                socket: socket.to_owned(),
            });
        }
        let me = format!("{} {what}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Instance { _file: file })
    }

    /// Who holds the lock on `state`, if anyone (asked without taking it).
    pub fn holder(state: &Path) -> Option<Holder> {
        let path = state.join(LOCK_FILE);
        if !fsutil::lock_held(&path) {
            return None;
        }
        let holder = Dir::open(state)
            .ok()
            .and_then(|d| d.open_regular(LOCK_FILE.as_ref()).ok().flatten())
            .map(|(mut f, _)| read_holder(&mut f));
        Some(holder.unwrap_or(Holder {
            pid: None,
            what: String::new(),
        }))
    }
}

fn read_holder(f: &mut std::fs::File) -> Holder {
    let mut text = String::new();
    let _ = f.rewind();
    let _ = f.take(256).read_to_string(&mut text);
    parse(&text)
}

/// `<pid> <what>`; a holder that has not written yet (or a damaged file) has no pid.
fn parse(text: &str) -> Holder {
    let mut words = text.split_whitespace();
    let pid = words.next().and_then(|p| p.parse().ok()).filter(|p| *p > 0);
    let what = words.next().filter(|_| pid.is_some()).unwrap_or("");
    Holder {
        pid,
        what: what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holder_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("control.sock");
        assert_eq!(Instance::holder(d.path()), None);
        let first = Instance::lock(d.path(), "run", &sock).unwrap();
        let me = Holder {
            pid: Some(std::process::id() as i32),
            what: "run".into(),
        };
        assert_eq!(Instance::holder(d.path()), Some(me.clone()));
        // Refused even in the same process: the lock is the open file description's.
        match Instance::lock(d.path(), "restore", &sock) {
            Err(Error::Held { holder, .. }) => assert_eq!(holder, me),
            other => panic!("not refused: {other:?}"),
        }
        let msg = Instance::lock(d.path(), "run", &sock)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("homelab-matrix status"), "{msg}");
        drop(first);
        assert_eq!(Instance::holder(d.path()), None);
        let again = Instance::lock(d.path(), "restore", &sock).unwrap();
        assert_eq!(Instance::holder(d.path()).unwrap().what, "restore");
        drop(again);
    }

    #[test]
    fn a_symlink_for_the_lock_file_is_refused_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, d.path().join(LOCK_FILE)).unwrap();
        let e = Instance::lock(d.path(), "run", &d.path().join("s")).unwrap_err();
        assert!(matches!(e, Error::Other(_)), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn holder_lines_parse() {
        assert_eq!(
            parse("123 run\n"),
            Holder {
                pid: Some(123),
                what: "run".into()
            }
        );
        assert_eq!(parse("").pid, None);
        assert_eq!(parse("x run").pid, None);
        assert_eq!(parse("-1 run").pid, None);
    }
}
