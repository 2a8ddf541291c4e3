//! The signed apt repository (issue #25 item 3): `packaging/release` turns packages into a
//! reprepro tree signed by a release key, served over HTTP on loopback; the real apt, with
//! its own lists and keyrings apart from this host's, refuses it unsigned and signed by
//! another key, accepts it with the published keyring (deb822 `Signed-By`), downloads a
//! package whose hash the signed index vouches for (and refuses a tampered one), and sees a
//! newer version once it is published. Both releases and both architectures.
//!
//! The packages here are small stand-ins with the real names (what apt checks is the
//! repository, not the program); installing the real ones from this repository into the
//! pristine containers is the package test's part.

// This test drives apt, gpg and the scripts from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use common::aptrepo::{Apt, deb, key, release, run, serve, stop_agent};

use std::fs;
use std::process::{Command, Output};

fn have(p: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {p}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn apt_takes_the_repository_only_with_its_release_key() {
    if !common::require("root", common::is_root(), "apt and reprepro run as root")
        || !common::require(
            "apt, gpg, dpkg-deb",
            have("apt-get") && have("gpg") && have("dpkg-deb"),
            "apt-get install gnupg (packaging/release installs reprepro itself)",
        )
    {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("hm-rel-")
        .tempdir()
        .unwrap();
    let t = tmp.path();
    let (good, other) = (t.join("g1"), t.join("g2"));
    let fpr = key(&good, "homelab-matrix release");
    let other_fpr = key(&other, "someone else");
    let pkgs = t.join("pkgs");
    fs::create_dir_all(&pkgs).unwrap();
    let v1 = |arch| deb(&pkgs, "homelab-matrix", "0.1.0", arch);
    let venv1 = deb(&pkgs, "homelab-matrix-synapse-venv", "0.1.0", "all");
    let repo = t.join("repo");
    release(
        &good,
        &repo,
        &fpr,
        &[
            ("bookworm", vec![v1("amd64"), v1("arm64"), venv1.clone()]),
            ("trixie", vec![v1("amd64"), v1("arm64"), venv1.clone()]),
        ],
    );
    for p in [
        "dists/bookworm/InRelease",
        "dists/trixie/Release.gpg",
        "dists/trixie/main/binary-arm64/Packages.gz",
        "dists/bookworm/main/binary-amd64/Packages.gz",
        "homelab-matrix-archive-keyring.gpg",
    ] {
        assert!(repo.join(p).is_file(), "{p}");
    }
    let keyring = repo.join("homelab-matrix-archive-keyring.gpg");
    // The same tree, signed by someone else, and one with no signature at all.
    let forged = t.join("forged");
    release(
        &other,
        &forged,
        &other_fpr,
        &[("trixie", vec![v1("amd64"), venv1.clone()])],
    );
    let unsigned = t.join("unsigned");
    run(Command::new("cp").arg("-a").arg(&repo).arg(&unsigned));
    for d in ["bookworm", "trixie"] {
        fs::remove_file(unsigned.join(format!("dists/{d}/InRelease"))).unwrap();
        fs::remove_file(unsigned.join(format!("dists/{d}/Release.gpg"))).unwrap();
    }

    let apt = Apt::new(&t.join("apt"));
    let (_s1, port) = serve(&repo);
    let (_s2, forged_port) = serve(&forged);
    let (_s3, unsigned_port) = serve(&unsigned);

    // No key given: apt has none that signed it.
    apt.source(port, "trixie", None);
    let o = apt.update("amd64");
    assert!(!o.status.success(), "{}", said(&o));
    assert!(said(&o).contains("NO_PUBKEY"), "{}", said(&o));
    // Signed by another key than the keyring names.
    apt.source(forged_port, "trixie", Some(&keyring));
    let o = apt.update("amd64");
    assert!(!o.status.success(), "{}", said(&o));
    assert!(said(&o).contains("NO_PUBKEY"), "{}", said(&o));
    // Not signed at all.
    apt.source(unsigned_port, "trixie", Some(&keyring));
    let o = apt.update("amd64");
    assert!(!o.status.success(), "{}", said(&o));
    assert!(said(&o).contains("is not signed"), "{}", said(&o));

    for (suite, arch) in [
        ("trixie", "amd64"),
        ("bookworm", "arm64"),
        ("trixie", "arm64"),
    ] {
        apt.source(port, suite, Some(&keyring));
        let o = apt.update(arch);
        assert!(o.status.success(), "{suite}/{arch}: {}", said(&o));
        assert_eq!(
            apt.candidate(arch, "homelab-matrix"),
            "0.1.0",
            "{suite}/{arch}"
        );
        assert_eq!(apt.candidate(arch, "homelab-matrix-synapse-venv"), "0.1.0");
    }
    // What the signed index vouches for downloads; a tampered file in the pool does not.
    apt.source(port, "trixie", Some(&keyring));
    assert!(apt.update("amd64").status.success());
    run(apt
        .cmd("apt-get", "amd64")
        .args(["-q", "download", "homelab-matrix"]));
    let got = apt.dir.join("dl/homelab-matrix_0.1.0_amd64.deb");
    assert!(got.is_file());
    fs::remove_file(&got).unwrap();
    let pool = repo.join("pool/main/h/homelab-matrix/homelab-matrix_0.1.0_amd64.deb");
    let original = fs::read(&pool).unwrap();
    // The same size, one byte changed: only the hash tells.
    let mut tampered = original.clone();
    *tampered.last_mut().unwrap() ^= 0xff;
    fs::write(&pool, &tampered).unwrap();
    let o = apt
        .cmd("apt-get", "amd64")
        .args(["-q", "download", "homelab-matrix"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", said(&o));
    assert!(said(&o).contains("Hash Sum mismatch"), "{}", said(&o));
    fs::write(&pool, &original).unwrap();

    // A newer version, published into the same tree, is apt's candidate after an update.
    release(
        &good,
        &repo,
        &fpr,
        &[(
            "trixie",
            vec![deb(&pkgs, "homelab-matrix", "0.2.0", "amd64")],
        )],
    );
    assert!(apt.update("amd64").status.success());
    assert_eq!(apt.candidate("amd64", "homelab-matrix"), "0.2.0");
    // bookworm's is untouched.
    apt.source(port, "bookworm", Some(&keyring));
    assert!(apt.update("amd64").status.success());
    assert_eq!(apt.candidate("amd64", "homelab-matrix"), "0.1.0");

    for home in [&good, &other] {
        stop_agent(home);
    }
}
