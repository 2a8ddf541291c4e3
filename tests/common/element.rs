//! A local stand-in for Element's GitHub releases (GitHub is unreachable here, and no
//! packaged Element build exists: LAB.md): synthetic release tarballs shaped like
//! element-web's package.sh output, signed with a test OpenPGP key shaped like Element's
//! (a certifying primary key and a signing subkey), served with a GitHub-API-shaped
//! `releases/latest` answer.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use pgp::composed::{
    ArmorOptions, DetachedSignature, EncryptionCaps, KeyType, SecretKeyParamsBuilder,
    SignedPublicKey, SignedSecretKey, SubkeyParamsBuilder,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::types::Password;

pub struct TestKey {
    secret: SignedSecretKey,
}

impl TestKey {
    pub fn new(uid: &str) -> TestKey {
        let mut sub = SubkeyParamsBuilder::default();
        sub.key_type(KeyType::Ed25519Legacy)
            .can_sign(true)
            .can_encrypt(EncryptionCaps::None)
            .can_authenticate(false);
        let mut p = SecretKeyParamsBuilder::default();
        p.key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(false)
            .can_encrypt(EncryptionCaps::None)
            .primary_user_id(uid.into())
            .subkeys(vec![sub.build().unwrap()]);
        let secret = p
            .build()
            .unwrap()
            .generate(rand::thread_rng())
            .expect("generating a test key");
        TestKey { secret }
    }

    pub fn fingerprint(&self) -> String {
        use pgp::types::KeyDetails;
        format!("{:X}", self.secret.fingerprint())
    }

    pub fn public_armored(&self) -> String {
        SignedPublicKey::from(self.secret.clone())
            .to_armored_string(ArmorOptions::default())
            .unwrap()
    }

    /// An armored detached signature by the signing subkey, as Element's releases are made.
    pub fn sign(&self, data: &[u8]) -> Vec<u8> {
        DetachedSignature::sign_binary_data(
            rand::thread_rng(),
            &self.secret.secret_subkeys[0].key,
            &Password::empty(),
            HashAlgorithm::Sha256,
            data,
        )
        .unwrap()
        .to_armored_bytes(ArmorOptions::default())
        .unwrap()
    }
}

/// The bundle hash webpack would give this version's build.
pub fn bundle_hash(version: &str) -> String {
    format!("{:0>16}", version.replace('.', "a"))
}

/// A small Element-shaped build: index.html with Element's own meta CSP, hashed bundles/,
/// i18n/, a hashed image, `version`. Its script exercises what Element needs of the policy
/// (fetching config.json and version, wasm, a blob worker, inline styles) and reports any
/// CSP violation into the page.
pub fn element_files(version: &str) -> Vec<(String, Vec<u8>)> {
    let h = bundle_hash(version);
    let index = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self' 'wasm-unsafe-eval' https://www.recaptcha.net https://www.gstatic.com; img-src * blob: data:; connect-src * blob: data:; font-src 'self' data:; media-src * blob: data:; child-src * blob: data:; worker-src 'self' blob:; frame-src * blob: data:; form-action 'self'; manifest-src 'self';">
<title>Element</title>
<link rel="stylesheet" href="bundles/{h}/theme-light.css">
</head><body style="margin:0">
<div id="status">loading</div><div id="csp"></div>
<img src="img/element-logo.1a2b3c4.svg" alt="">
<script src="bundles/{h}/app.js"></script>
</body></html>
"#
    );
    // Big enough that compression matters, like Element's multi-MB bundles.
    let filler: String = (0..4000)
        .map(|i| format!("function f{i}(a) {{ return a + {i}; }}\n"))
        .collect();
    let app = format!(
        r#"document.addEventListener("securitypolicyviolation", (e) => {{
  document.getElementById("csp").textContent += "CSP-VIOLATION " + e.violatedDirective + " " + e.blockedURI + "; ";
}});
(async () => {{
  const out = [];
  const cfg = await (await fetch("config.json")).json();
  out.push("server=" + cfg.default_server_config["m.homeserver"].server_name);
  out.push("version=" + (await (await fetch("version")).text()).trim());
  await WebAssembly.instantiate(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0]));
  out.push("wasm=ok");
  const w = new Worker(URL.createObjectURL(new Blob(["postMessage(1)"], {{ type: "text/javascript" }})));
  await new Promise((r) => (w.onmessage = r));
  out.push("worker=ok");
  const s = document.createElement("div");
  s.style.color = "red";
  document.body.appendChild(s);
  const en = await (await fetch("i18n/en_EN.json")).json();
  out.push("i18n=" + en.hello);
  document.getElementById("status").textContent = "READY " + out.join(" ");
}})().catch((e) => (document.getElementById("status").textContent = "ERROR " + e));
{filler}"#
    );
    vec![
        ("index.html".into(), index.into_bytes()),
        ("version".into(), format!("v{version}\n").into_bytes()),
        (format!("bundles/{h}/app.js"), app.into_bytes()),
        (
            format!("bundles/{h}/theme-light.css"),
            "body { font-family: sans-serif; }\n"
                .repeat(100)
                .into_bytes(),
        ),
        (
            "img/element-logo.1a2b3c4.svg".into(),
            br#"<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"></svg>"#.to_vec(),
        ),
        ("i18n/en_EN.json".into(), br#"{"hello": "Hello"}"#.to_vec()),
        ("config.sample.json".into(), b"{}".to_vec()),
    ]
}

/// How an archive entry is written; the unsafe kinds are what the updater must refuse.
pub enum Entry {
    File(String, Vec<u8>),
    /// A raw name, written without the tar crate's path checks (e.g. containing `..`).
    RawFile(String, Vec<u8>),
    Symlink(String, String),
}

/// A `.tar.gz` like package.sh makes: everything under `element-v<version>/`.
pub fn tarball(version: &str, entries: &[Entry]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let top = format!("element-v{version}");
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(0);
        match e {
            Entry::File(name, data) => {
                h.set_size(data.len() as u64);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, format!("{top}/{name}"), data.as_slice())
                    .unwrap();
            }
            Entry::RawFile(name, data) => {
                let full = format!("{top}/{name}");
                h.set_size(data.len() as u64);
                h.set_entry_type(tar::EntryType::Regular);
                let raw = &mut h.as_old_mut().name;
                raw[..full.len()].copy_from_slice(full.as_bytes());
                h.set_cksum();
                b.append(&h, data.as_slice()).unwrap();
            }
            Entry::Symlink(name, target) => {
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, format!("{top}/{name}"), target)
                    .unwrap();
            }
        }
    }
    b.into_inner().unwrap().finish().unwrap()
}

pub fn good_tarball(version: &str) -> Vec<u8> {
    let entries: Vec<Entry> = element_files(version)
        .into_iter()
        .map(|(n, d)| Entry::File(n, d))
        .collect();
    tarball(version, &entries)
}

/// Serves `/releases/latest` and the assets it names, over plain HTTP on 127.0.0.1.
pub struct ReleaseServer {
    pub port: u16,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl ReleaseServer {
    pub fn start() -> ReleaseServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let f = files.clone();
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(mut s) = stream else { continue };
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    let mut line = String::new();
                    if r.read_line(&mut line).is_err() {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let body = f.lock().unwrap().get(&path).cloned();
                    let _ = match body {
                        Some(b) => s
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                    b.len()
                                )
                                .as_bytes(),
                            )
                            .and_then(|_| s.write_all(&b)),
                        None => s.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        ),
                    };
                });
            }
        });
        ReleaseServer { port, files }
    }

    pub fn put(&self, path: &str, body: Vec<u8>) {
        self.files.lock().unwrap().insert(path.into(), body);
    }

    pub fn get(&self, path: &str) -> Option<Vec<u8>> {
        self.files.lock().unwrap().get(path).cloned()
    }

    pub fn latest_url(&self) -> String {
        format!("http://127.0.0.1:{}/releases/latest", self.port)
    }

    /// Makes `v<version>` the latest release with this tarball and signature; `listed_size`
    /// is what the API claims (normally the tarball's length).
    pub fn publish_with(&self, version: &str, tarball: &[u8], sig: &[u8], listed_size: usize) {
        let name = format!("element-v{version}.tar.gz");
        let base = format!("http://127.0.0.1:{}/download/v{version}", self.port);
        let json = serde_json::json!({
            "tag_name": format!("v{version}"),
            "prerelease": false,
            "assets": [
                {"name": name, "browser_download_url": format!("{base}/{name}"), "size": listed_size},
                {"name": format!("{name}.asc"), "browser_download_url": format!("{base}/{name}.asc"), "size": sig.len()},
            ]
        });
        let mut f = self.files.lock().unwrap();
        f.insert(format!("/download/v{version}/{name}"), tarball.to_vec());
        f.insert(format!("/download/v{version}/{name}.asc"), sig.to_vec());
        f.insert("/releases/latest".into(), json.to_string().into_bytes());
    }

    pub fn publish(&self, version: &str, tarball: &[u8], sig: &[u8]) {
        self.publish_with(version, tarball, sig, tarball.len())
    }
}
