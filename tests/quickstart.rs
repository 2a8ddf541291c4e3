//! The quick start's first second (issue #25 item 5): on a machine without a Rust toolchain
//! it stops before installing anything, with the exact commands to get one; with one, its
//! checks pass. Where an apt repository offers the package (the README's install steps), it
//! takes that, and needs no Rust. `--check` runs the same checks the real run makes first, and
//! stops there.

// This test drives the script from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Command;

use common::aptrepo;

fn quickstart(path: &str, home: &std::path::Path) -> std::process::Output {
    Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/quickstart"))
        .arg("--check")
        .env_clear()
        .env("PATH", path)
        .env("HOME", home)
        .output()
        .unwrap()
}

#[test]
fn without_rust_the_quick_start_stops_first_with_the_command_to_get_it() {
    if !common::require("root", common::is_root(), "the quick start runs as root") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    // Debian's PATH without rustup's place, and a HOME without ~/.cargo.
    let out = quickstart("/usr/sbin:/usr/bin:/sbin:/bin", home.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95"),
        "{err}"
    );
    assert!(err.contains("Nothing was installed yet"), "{err}");
    // The first thing it does is this check: no install step ran.
    assert!(!err.contains("apt-get"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // rustup's toolchain in ~/.cargo is found without PATH naming it.
    let cargo_home = std::path::Path::new(&std::env::var("HOME").unwrap()).join(".cargo/bin");
    if cargo_home.join("cargo").exists() {
        let root = std::path::Path::new(&std::env::var("HOME").unwrap()).to_owned();
        let out = quickstart("/usr/sbin:/usr/bin:/sbin:/bin", &root);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("ready to build and install"), "{said}");
    }
}

#[test]
fn where_a_repository_offers_the_package_the_quick_start_installs_it_without_rust() {
    if !common::require("root", common::is_root(), "the quick start runs as root") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let gnupg = t.join("gnupg");
    let fpr = aptrepo::key(&gnupg, "homelab-matrix release");
    let pkgs = t.join("pkgs");
    std::fs::create_dir_all(&pkgs).unwrap();
    let repo = t.join("repo");
    aptrepo::release(
        &gnupg,
        &repo,
        &fpr,
        &[(
            "bookworm",
            vec![aptrepo::deb(&pkgs, "homelab-matrix", "0.9.1", "amd64")],
        )],
    );
    aptrepo::stop_agent(&gnupg);
    let (_served, port) = aptrepo::serve(&repo);
    // apt with this repository configured (and nothing else of this host's), as the README's
    // install steps leave it.
    let apt = aptrepo::Apt::new(&t.join("apt"));
    apt.source(
        port,
        "bookworm",
        Some(&repo.join("homelab-matrix-archive-keyring.gpg")),
    );
    let o = apt.update("amd64");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let home = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/quickstart"))
        .arg("--check")
        .env_clear()
        // No Rust anywhere: the repository's package needs none.
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", home.path())
        .env("APT_CONFIG", apt.config_file("amd64"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        said.trim(),
        format!(
            "quickstart: ready to install homelab-matrix 0.9.1 from http://127.0.0.1:{port} bookworm/main amd64 Packages"
        )
    );
}
