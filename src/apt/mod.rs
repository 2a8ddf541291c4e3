//! The Debian packages the appliance is made of: which versions dpkg has installed, the
//! package files kept from each install so an upgrade can be undone (debian/keep-debs, an apt
//! hook, keeps them), whether dpkg is busy, and unattended upgrades from our repository.
//!
//! A foundation for `backup` (the upgrade check and the rollback): it imports no feature.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::supervisor::{self, Command};

pub mod unattended;

/// The packages whose upgrade can change what runs: ours, the Synapse venv's, matrix.org's.
pub const PACKAGES: [&str; 3] = [
    "homelab-matrix",
    "homelab-matrix-synapse-venv",
    "matrix-synapse-py3",
];
/// Where debian/keep-debs (apt's DPkg::Pre-Install-Pkgs hook) and the postinst keep each
/// version of `PACKAGES` that apt installs: the way back after an upgrade that never worked.
pub const KEPT_DIR: &str = "/var/cache/homelab-matrix/packages";
/// dpkg's locks: apt holds the frontend one for a whole run, dpkg the other (dpkg(1) "FILES").
const DPKG_LOCKS: [&str; 2] = ["/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock"];

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub version: String,
    /// `apt-mark hold`: apt upgrades it no more (a rollback holds what it went back to).
    pub held: bool,
}

/// The installed ones of `names`, from stanzas of dpkg's status (as `dpkg-query -W` prints them
/// for [`installed`]; Status is "want ok state", want "install" or "hold"). A package counts
/// from "unpacked" on, with the version of the files on disk: apt restarts the service from a
/// postinst, while that package is half-configured. Config files alone are not installed.
pub fn installed_in(status: &str, names: &[&str]) -> BTreeMap<String, Installed> {
    let mut out = BTreeMap::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(str::trim)
            })
        };
        if let (Some(p), Some(st), Some(v)) = (field("Package"), field("Status"), field("Version"))
            && names.contains(&p)
        {
            let mut words = st.split(' ');
            let (want, state) = (words.next(), words.nth(1));
            let held = match want {
                Some("install") => false,
                Some("hold") => true,
                _ => continue,
            };
            if !matches!(
                state,
                Some(
                    "installed"
                        | "unpacked"
                        | "half-configured"
                        | "triggers-awaited"
                        | "triggers-pending"
                )
            ) {
                continue;
            }
            out.insert(
                p.to_string(),
                Installed {
                    version: v.to_string(),
                    held,
                },
            );
        }
    }
    out
}

/// The installed ones of `PACKAGES`; none on a box without dpkg (a source install). Asked of
/// dpkg-query, which reads dpkg's journal of a run under way too, not only the status file.
pub async fn installed() -> BTreeMap<String, Installed> {
    let mut cmd = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=Package: ${Package}\nStatus: ${Status}\nVersion: ${Version}\n\n");
    for p in PACKAGES {
        cmd = cmd.arg(p);
    }
    // It exits 1 for a name it does not know (matrix-synapse-py3, mostly) and still prints
    // the others.
    match supervisor::run_helper(cmd, b"", Duration::from_secs(30)).await {
        Ok(out) => installed_in(&String::from_utf8_lossy(&out.stdout), &PACKAGES),
        Err(_) => BTreeMap::new(),
    }
}

/// Name to version of the installed ones of `PACKAGES`.
pub async fn versions() -> BTreeMap<String, String> {
    installed()
        .await
        .into_iter()
        .map(|(k, v)| (k, v.version))
        .collect()
}

/// The name apt gives a package file (`name_version_arch.deb`, the epoch's colon as %3a), which
/// keep-debs uses too.
pub fn deb_file_name(name: &str, version: &str, arch: &str) -> String {
    format!("{name}_{}_{arch}.deb", version.replace(':', "%3a"))
}

/// The kept package file of `name` at `version` in `dir`, for any architecture.
pub fn find_kept(dir: &Path, name: &str, version: &str) -> Option<PathBuf> {
    let prefix = format!("{name}_{}_", version.replace(':', "%3a"));
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            (n.starts_with(&prefix) && n.ends_with(".deb")).then(|| dir.join(n))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Whether apt or dpkg is running: one of dpkg's locks is held (they are fcntl locks; F_GETLK
/// asks without taking one, so a read-only descriptor will do).
pub fn dpkg_busy() -> bool {
    DPKG_LOCKS
        .iter()
        .any(|p| crate::fsutil::lock_held(Path::new(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_installed_packages_of_ours_are_read_from_dpkg_status() {
        let status = "Package: homelab-matrix\nStatus: install ok half-configured\nPriority: optional\nVersion: 1:0.2.0-1\n\n\
                      Package: homelab-matrix-synapse-venv\nStatus: deinstall ok config-files\nVersion: 0.1.0\n\n\
                      Package: homelab-matrix-synapse-venv\nStatus: install ok half-installed\nVersion: 0.1.1\n\n\
                      Package: matrix-synapse\nStatus: install ok installed\nVersion: 1.0\n\n\
                      Package: coturn\nStatus: install ok installed\nVersion: 4.6.1\n\n\
                      Package: matrix-synapse-py3\nVersion: 1.163.2+bookworm1\nStatus: hold ok installed\nDepends: a,\n b\n";
        let got = installed_in(status, &PACKAGES);
        let i = |v: &str, held| Installed {
            version: v.into(),
            held,
        };
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![
                ("homelab-matrix".into(), i("1:0.2.0-1", false)),
                ("matrix-synapse-py3".into(), i("1.163.2+bookworm1", true))
            ]
        );
    }

    #[test]
    fn a_kept_package_is_found_by_name_and_version() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            deb_file_name("homelab-matrix", "1:0.2.0", "arm64"),
            deb_file_name("homelab-matrix", "0.2.0+1", "amd64"),
            deb_file_name("homelab-matrix-synapse-venv", "0.2.0", "all"),
        ] {
            std::fs::write(d.path().join(n), b"").unwrap();
        }
        assert_eq!(
            find_kept(d.path(), "homelab-matrix", "1:0.2.0").unwrap(),
            d.path().join("homelab-matrix_1%3a0.2.0_arm64.deb")
        );
        // A version is matched whole, not as a prefix of another.
        assert!(find_kept(d.path(), "homelab-matrix", "0.2.0").is_none());
        assert!(find_kept(d.path(), "homelab-matrix-synapse-venv", "0.2.0").is_some());
    }

    #[test]
    fn a_held_fcntl_lock_makes_dpkg_busy() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        std::fs::write(&p, b"").unwrap();
        use crate::fsutil::lock_held;
        assert!(!lock_held(&p));
        assert!(!lock_held(&d.path().join("missing")));
        // POSIX locks are per process, but an open file description's lock (F_OFD_SETLK, what
        // a lock of apt's in another process looks like to us) conflicts even with our own.
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        // SAFETY: as in lock_held.
        let mut fl: nix::libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = nix::libc::F_WRLCK as _;
        fl.l_whence = nix::libc::SEEK_SET as _;
        // SAFETY: an open descriptor and a live flock.
        assert_eq!(
            unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_OFD_SETLK, &mut fl) },
            0
        );
        assert!(lock_held(&p));
        drop(f);
        assert!(!lock_held(&p));
    }
}
