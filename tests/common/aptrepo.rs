//! A signed apt repository as the project publishes one: a throwaway release key,
//! `packaging/release` (reprepro) for the tree, and the tree over HTTP on loopback. Used by the
//! repository test (stand-in packages, apt on this host) and the package test (the real
//! packages, apt in a pristine container that shares this host's network).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `c`; its output, or a panic with all it said.
pub fn run(c: &mut Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A throwaway release key in a keyring of its own (GNUPGHOME `home`); its fingerprint.
pub fn key(home: &Path, name: &str) -> String {
    fs::create_dir_all(home).unwrap();
    fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gpg = || {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", home).arg("--batch");
        c
    };
    run(gpg().args(["--passphrase", "", "--quick-gen-key"]).args([
        &format!("{name} <release@homelab-matrix.test>"),
        "ed25519",
        "sign",
        "never",
    ]));
    let out = run(gpg().args(["--with-colons", "--list-secret-keys"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("fpr:::::::::"))
        .map(|f| f.trim_end_matches(':').to_string())
        .expect("a fingerprint")
}

/// `packaging/release` into `repo`, signed with `fpr` from `gnupg`: (codename, packages).
pub fn release(gnupg: &Path, repo: &Path, fpr: &str, dists: &[(&str, Vec<PathBuf>)]) {
    let mut c = Command::new(format!("{ROOT}/packaging/release"));
    c.env("GNUPGHOME", gnupg)
        .arg("--repo")
        .arg(repo)
        .args(["--key", fpr]);
    for (d, debs) in dists {
        c.args(["--dist", d]).args(debs);
    }
    run(&mut c);
}

/// A minimal package named `name`, version `version`, architecture `arch`.
pub fn deb(dir: &Path, name: &str, version: &str, arch: &str) -> PathBuf {
    let root = dir.join(format!("{name}-{version}-{arch}"));
    fs::create_dir_all(root.join("DEBIAN")).unwrap();
    fs::create_dir_all(root.join(format!("usr/share/doc/{name}"))).unwrap();
    fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nSection: net\nPriority: optional\nMaintainer: t <t@t>\nDescription: stand-in\n stand-in for the repository test\n"
        ),
    )
    .unwrap();
    fs::write(root.join(format!("usr/share/doc/{name}/README")), version).unwrap();
    let out = dir.join(format!("{name}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&out));
    out
}

/// `deb` rebuilt into `dir` as `version`, its postinst replaced by `postinst` when given (and
/// its triggers dropped with it): a release made from this build, good or deliberately broken.
/// One field of a package's control file (`dpkg-deb -f`).
pub fn field(deb: &Path, f: &str) -> String {
    let out = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(f));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn repack(deb: &Path, dir: &Path, version: &str, postinst: Option<&str>) -> PathBuf {
    let root = dir.join(format!("repack-{version}"));
    let _ = fs::remove_dir_all(&root);
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&root));
    let control = root.join("DEBIAN/control");
    let text = fs::read_to_string(&control).unwrap();
    let field = |f: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(f)?.strip_prefix(": "))
            .unwrap()
            .to_string()
    };
    let (name, arch) = (field("Package"), field("Architecture"));
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&control, text).unwrap();
    if let Some(script) = postinst {
        let p = root.join("DEBIAN/postinst");
        fs::write(&p, script).unwrap();
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let _ = fs::remove_file(root.join("DEBIAN/triggers"));
    }
    let out = dir.join(format!("{name}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["-Zgzip", "--root-owner-group", "--build"])
        .arg(&root)
        .arg(&out));
    fs::remove_dir_all(&root).unwrap();
    out
}

/// apt with its own sources, lists, cache and (empty) trusted keys: nothing of this host's.
pub struct Apt {
    pub dir: PathBuf,
}

impl Apt {
    pub fn new(dir: &Path) -> Apt {
        for d in [
            "sources",
            "lists/partial",
            "cache/archives/partial",
            "trusted",
            "dl",
        ] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        Apt {
            dir: dir.to_owned(),
        }
    }

    /// One deb822 source for `suite`, with `Signed-By` when a keyring is given.
    pub fn source(&self, port: u16, suite: &str, keyring: Option<&Path>) {
        let _ = fs::remove_dir_all(self.dir.join("lists"));
        fs::create_dir_all(self.dir.join("lists/partial")).unwrap();
        let signed = keyring.map_or(String::new(), |k| format!("Signed-By: {}\n", k.display()));
        fs::write(
            self.dir.join("sources/homelab-matrix.sources"),
            format!(
                "Types: deb\nURIs: http://127.0.0.1:{port}/\nSuites: {suite}\nComponents: main\n{signed}"
            ),
        )
        .unwrap();
    }

    /// Its settings, as `Key=Value` for `-o`: nothing of this host's but dpkg's status.
    fn options(&self, arch: &str) -> Vec<String> {
        let d = self.dir.display();
        vec![
            "Dir::Etc::SourceList=/dev/null".to_string(),
            format!("Dir::Etc::SourceParts={d}/sources"),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::Etc::Trusted=/dev/null".to_string(),
            format!("Dir::Etc::TrustedParts={d}/trusted"),
            "Dir::Etc::Preferences=/dev/null".to_string(),
            "Dir::Etc::PreferencesParts=/dev/null".to_string(),
            format!("APT::Architecture={arch}"),
            "APT::Architectures=".to_string(),
            format!("APT::Architectures::={arch}"),
            "APT::Sandbox::User=root".to_string(),
            "Acquire::Languages=none".to_string(),
        ]
    }

    pub fn cmd(&self, tool: &str, arch: &str) -> Command {
        let mut c = Command::new(tool);
        for o in self.options(arch) {
            c.arg("-o").arg(o);
        }
        c.current_dir(self.dir.join("dl"));
        c
    }

    /// The same settings as a file for `APT_CONFIG`, for a script that runs apt itself.
    pub fn config_file(&self, arch: &str) -> PathBuf {
        let mut text = String::new();
        for o in self.options(arch) {
            let (k, v) = o.split_once('=').unwrap();
            if v.is_empty() {
                text.push_str(&format!("#clear {k};\n"));
            } else {
                text.push_str(&format!("{k} \"{v}\";\n"));
            }
        }
        let path = self.dir.join("apt.conf");
        fs::write(&path, text).unwrap();
        path
    }

    pub fn update(&self, arch: &str) -> Output {
        self.cmd("apt-get", arch)
            .args(["-q", "update"])
            .output()
            .unwrap()
    }

    pub fn candidate(&self, arch: &str, pkg: &str) -> String {
        let out = run(self.cmd("apt-cache", arch).args(["policy", pkg]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate: ").map(str::to_string))
            .unwrap_or_default()
    }
}

/// The HTTP server of a repository; stopped when dropped.
pub struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `repo` over HTTP on 127.0.0.1 (Python's http.server: apt needs only GET); the port.
pub fn serve(repo: &Path) -> (Served, u16) {
    let port = super::free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(repo)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    super::wait_until(
        "the repository's HTTP server",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    (Served(child), port)
}

/// Stops the gpg-agent that `key` started for `home` (it would outlive the test).
pub fn stop_agent(home: &Path) {
    let _ = Command::new("gpgconf")
        .env("GNUPGHOME", home)
        .args(["--kill", "gpg-agent"])
        .status();
}
