//! The quick start's first second (issue #25 item 5): on a machine without a Rust toolchain
//! it stops before installing anything, with the exact commands to get one; with one, its
//! checks pass. `--check` runs the same checks the real run makes first, and stops there.

// This test drives the script from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Command;

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
