//! The arm64 package (issue #25 item 2): cross-built on this amd64 host by
//! `packaging/debs --arch arm64`, then run under qemu-user (binfmt, Debian's
//! qemu-user-static): the binary in the package is an aarch64 ELF that tells its version,
//! accepts a valid config and refuses a bad one naming the key, as the amd64 one does. The
//! library's unit tests also run under qemu-user in `packaging/run-tests`. What this does not
//! prove: the package installed in an arm64 Debian with systemd, and Synapse under it (tried
//! by hand under nspawn with a patched emulation stack; README "Installing the package").

// This test drives the packaging scripts and the binary from outside.
#![allow(clippy::disallowed_methods)]

mod common;

use common::aptrepo;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The arm64 package for `release`, built once per source state (packaging/debs caches it).
fn arm64_deb(release: &str) -> PathBuf {
    let out = Command::new(format!("{ROOT}/packaging/debs"))
        .args(["--arch", "arm64", "--release", release])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "packaging/debs --arch arm64 failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let deb = text
        .lines()
        .find(|l| l.ends_with("_arm64.deb"))
        .unwrap_or_else(|| panic!("no arm64 package in {text}"));
    PathBuf::from(deb)
}

#[test]
fn the_arm64_package_runs_under_qemu() {
    let binfmt = Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists()
        || Path::new("/usr/bin/qemu-aarch64-static").exists();
    if !common::require(
        "root",
        common::is_root(),
        "the cross build installs its tools",
    ) || !common::require(
        "qemu-user",
        binfmt,
        "apt-get install qemu-user-static binfmt-support (packaging/build-deb --arch arm64 sets it up)",
    ) {
        return;
    }
    // Debian 13's package: the same program, packaged by trixie's own tools.
    let trixie = arm64_deb("trixie");
    let deb = arm64_deb("bookworm");
    for (deb, n) in [(&deb, 12), (&trixie, 13)] {
        assert_eq!(aptrepo::field(deb, "Architecture"), "arm64");
        assert_eq!(aptrepo::field(deb, "Package"), "homelab-matrix");
        let version = aptrepo::field(deb, "Version");
        assert!(version.ends_with(&format!("+deb{n}")), "{version}");
        // dpkg-shlibdeps read the arm64 libc: the dependency names Debian's libc6.
        let depends = aptrepo::field(deb, "Depends");
        assert!(depends.contains("libc6 (>="), "{depends}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());
    let bin = root.join("usr/bin/homelab-matrix");
    let elf = fs::read(&bin).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    // e_machine 183: EM_AARCH64.
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183);

    let out = Command::new(&bin).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{v}");
    assert!(
        v.contains(&format!("homelab-matrix {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );

    let good = tmp.path().join("good.toml");
    fs::write(
        &good,
        format!(
            "server_name = \"pi.example\"\n[tls]\nmode = \"internal\"\n[state]\ndir = \"{}\"\n",
            tmp.path().join("state").display()
        ),
    )
    .unwrap();
    let check_config = |config: &Path| {
        Command::new(&bin)
            .args(["check-config", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = check_config(&good);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = tmp.path().join("bad.toml");
    fs::write(
        &bad,
        "server_name = \"pi.example\"\n[tls]\nmode = \"sometimes\"\n",
    )
    .unwrap();
    let out = check_config(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("tls.mode"), "{err}");
}
