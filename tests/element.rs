//! Element Web end to end: the real binary installs signed releases from a local release
//! server, serves them over TLS with the cache, compression and security rules, switches
//! releases under load, refuses bad releases while the current one keeps serving, and rolls
//! back. Headless Chromium loads the page with no CSP violation.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::element::{Entry, ReleaseServer, TestKey, bundle_hash, good_tarball, tarball};
use common::{Lab, require, require_appliance, wait_until};

struct Got {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Got {
    fn h(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

fn element_url(lab: &Lab, path: &str) -> String {
    format!(
        "https://element.{}:{}{path}",
        lab.server_name, lab.https_port
    )
}

/// One GET with curl (a real HTTP client; no automatic decompression), trusting the lab CA.
fn get(lab: &Lab, path: &str, headers: &[&str]) -> Got {
    let d = tempfile::tempdir().unwrap();
    let (hf, bf) = (d.path().join("h"), d.path().join("b"));
    let mut c = lab.curl();
    c.arg("--path-as-is").arg("--cacert").arg(lab.ca_root());
    c.arg("-D").arg(&hf).arg("-o").arg(&bf);
    for h in headers {
        c.args(["-H", h]);
    }
    let out = c.arg(element_url(lab, path)).output().unwrap();
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&hf).unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Got {
        status,
        headers,
        body: std::fs::read(&bf).unwrap_or_default(),
    }
}

fn element_status(lab: &Lab) -> serde_json::Value {
    lab.status()["element"].clone()
}

fn served_version(lab: &Lab) -> String {
    let g = get(lab, "/version", &[]);
    assert_eq!(g.status, 200);
    String::from_utf8(g.body).unwrap().trim().to_string()
}

fn lab_with_releases(name: &str, server: &ReleaseServer, key: &TestKey) -> Lab {
    let lab = Lab::new(name);
    let key_path = lab.path("test-release-key.asc");
    std::fs::write(&key_path, key.public_armored()).unwrap();
    lab.write_config(&format!(
        "[tls]\nmode = \"internal\"\n[element]\ntest_mode = true\nrelease_url = \"{}\"\ntest_release_key = \"{}\"\ncheck_interval = \"1h\"\n",
        server.latest_url(),
        key_path.display()
    ));
    lab
}

/// A release server with a signed 1.0.0, and a running lab that has installed it.
fn serving_1_0_0(name: &str) -> (ReleaseServer, TestKey, Lab, common::Running) {
    let server = ReleaseServer::start();
    let key = TestKey::new("Test Releases <releases@test>");
    let t1 = good_tarball("1.0.0");
    server.publish("1.0.0", &t1, &key.sign(&t1));
    let lab = lab_with_releases(name, &server, &key);
    let run = lab.start();
    wait_until("Element 1.0.0 installed", Duration::from_secs(60), || {
        element_status(&lab)["version"] == "1.0.0"
    });
    (server, key, lab, run)
}

/// `element update` must fail with `expect` in its message, and change nothing served.
fn refused(lab: &Lab, what: &str, expect: &str, serving: &str) {
    let out = lab.run_cmd(&["element", "update"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: update was accepted");
    assert!(
        err.contains(expect),
        "{what}: expected {expect:?} in the error, got: {err}"
    );
    assert_eq!(
        served_version(lab),
        serving,
        "{what}: the served version changed"
    );
    assert_eq!(
        get(lab, "/", &[]).status,
        200,
        "{what}: index.html not served"
    );
    let problems = lab.status()["problems"].clone();
    assert!(
        problems
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["key"] == "element-update"),
        "{what}: no alert for the admins: {problems}"
    );
    let st = element_status(lab);
    assert_eq!(st["version"], serving.trim_start_matches('v'));
    assert!(
        st["last_error"].as_str().unwrap_or("").contains(expect),
        "{what}: status shows {st}"
    );
}

#[test]
fn element_is_installed_served_updated_and_rolled_back() {
    if !require_appliance() {
        return;
    }
    // Installed on first start from the release server (this build bundles none).
    let (server, key, lab, run) = serving_1_0_0("element");
    assert_eq!(served_version(&lab), "v1.0.0");

    // index.html: no-cache, security headers, Element's hosting advice.
    let idx = get(&lab, "/", &[]);
    assert_eq!(idx.status, 200);
    assert!(String::from_utf8_lossy(&idx.body).contains(&bundle_hash("1.0.0")));
    assert_eq!(idx.h("cache-control"), "no-cache");
    assert_eq!(idx.h("x-frame-options"), "SAMEORIGIN");
    assert_eq!(idx.h("x-content-type-options"), "nosniff");
    assert_eq!(idx.h("referrer-policy"), "strict-origin-when-cross-origin");
    let csp = idx.h("content-security-policy");
    assert!(csp.contains("frame-ancestors 'self'") && csp.contains("'wasm-unsafe-eval'"));
    assert!(idx.h("content-type").starts_with("text/html"));
    for p in ["/version", "/i18n/en_EN.json", "/index.html"] {
        assert_eq!(get(&lab, p, &[]).h("cache-control"), "no-cache", "{p}");
    }

    // config.json for this server; config.<host>.json is a real 404 so Element falls back.
    let cj = get(&lab, "/config.json", &[]);
    assert_eq!(cj.status, 200);
    assert_eq!(cj.h("cache-control"), "no-cache");
    let cfg: serde_json::Value = serde_json::from_slice(&cj.body).unwrap();
    assert_eq!(
        cfg["default_server_config"]["m.homeserver"]["server_name"],
        "matrix.test"
    );
    assert_eq!(
        cfg["default_server_config"]["m.homeserver"]["base_url"],
        format!("https://matrix.matrix.test:{}", lab.https_port)
    );
    let host_cfg = format!("/config.element.{}.json", lab.server_name);
    assert_eq!(get(&lab, &host_cfg, &[]).status, 404);

    // A hashed bundle: immutable; br, gzip or identity by Accept-Encoding, each decoding to
    // the same bytes; ETag revalidation answers 304 without a body.
    let bundle = format!("/bundles/{}/app.js", bundle_hash("1.0.0"));
    let plain = get(&lab, &bundle, &[]);
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.h("cache-control"),
        "public, max-age=31536000, immutable"
    );
    assert_eq!(plain.h("content-encoding"), "");
    assert_eq!(plain.h("vary"), "Accept-Encoding");
    let browser = "Accept-Encoding: gzip, deflate, br, zstd";
    let br = get(&lab, &bundle, &[browser]);
    assert_eq!(br.h("content-encoding"), "br");
    assert!(br.body.len() * 5 < plain.body.len(), "br is not smaller");
    let mut unbr = Vec::new();
    brotli::Decompressor::new(br.body.as_slice(), 4096)
        .read_to_end(&mut unbr)
        .unwrap();
    assert_eq!(unbr, plain.body);
    let gz = get(&lab, &bundle, &["Accept-Encoding: gzip"]);
    assert_eq!(gz.h("content-encoding"), "gzip");
    let mut ungz = Vec::new();
    flate2::read::GzDecoder::new(gz.body.as_slice())
        .read_to_end(&mut ungz)
        .unwrap();
    assert_eq!(ungz, plain.body);
    assert_ne!(
        br.h("etag"),
        gz.h("etag"),
        "each representation has its own ETag"
    );
    let inm = format!("If-None-Match: {}", br.h("etag"));
    let revalidated = get(&lab, &bundle, &[browser, &inm]);
    assert_eq!(revalidated.status, 304);
    assert!(revalidated.body.is_empty());
    assert_eq!(revalidated.h("etag"), br.h("etag"));
    let stale = get(&lab, &bundle, &[browser, "If-None-Match: \"other\""]);
    assert_eq!(stale.status, 200);
    assert_eq!(
        get(&lab, "/img/element-logo.1a2b3c4.svg", &[]).h("cache-control"),
        "public, max-age=31536000, immutable"
    );

    // HEAD: the GET's headers and length, no body.
    let head = lab
        .curl()
        .args(["-I", "--cacert"])
        .arg(lab.ca_root())
        .arg(element_url(&lab, &bundle))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
    assert!(
        head.contains(&format!("content-length: {}", plain.body.len())),
        "{head}"
    );

    // Nothing outside the tree, and no method but GET/HEAD.
    for p in [
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/bundles/..%2f..%2fmanifest.json",
        "/manifest.json",
        "/.%2e/1.0.0/manifest.json",
        "/nope.js",
    ] {
        let g = get(&lab, p, &[]);
        assert_eq!(g.status, 404, "{p}");
        assert!(!String::from_utf8_lossy(&g.body).contains("root:"), "{p}");
    }
    let post = lab
        .curl()
        .args([
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "--cacert",
        ])
        .arg(lab.ca_root())
        .arg(element_url(&lab, "/"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&post.stdout), "405");

    // A newer release: --check only reports it; update installs it without a restart.
    let t11 = good_tarball("1.1.0");
    server.publish("1.1.0", &t11, &key.sign(&t11));
    let pid = lab.status()["pid"].clone();
    let check = lab.ok(&["element", "update", "--check"]);
    assert!(check.contains("1.1.0 is available"), "{check}");
    assert_eq!(served_version(&lab), "v1.0.0");
    let upd = lab.ok(&["element", "update"]);
    assert!(upd.contains("installed 1.1.0"), "{upd}");
    assert_eq!(served_version(&lab), "v1.1.0");
    assert_eq!(element_status(&lab)["previous"], "1.0.0");
    assert_eq!(lab.status()["pid"], pid, "the update restarted the service");
    // Tabs still running 1.0.0 can load its chunks.
    assert_eq!(get(&lab, &bundle, &[]).status, 200);
    let up_to_date = lab.ok(&["element", "update"]);
    assert!(up_to_date.contains("1.1.0 is the latest"), "{up_to_date}");

    // Switching under load: every request during the switch succeeds, and each index.html
    // names a bundle that is served.
    let t12 = good_tarball("1.2.0");
    server.publish("1.2.0", &t12, &key.sign(&t12));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let hammers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, count) = (stop.clone(), count.clone());
            let mut c = lab.curl();
            c.arg("--cacert").arg(lab.ca_root());
            let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into()).collect();
            let base = element_url(&lab, "");
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // One connection, several requests: index, then the bundle it names.
                    let out = Command::new("curl")
                        .args(&args)
                        .args(["-f", "--compressed"])
                        .arg(format!("{base}/"))
                        .arg(format!("{base}/version"))
                        .output()
                        .unwrap();
                    count.fetch_add(2, Ordering::Relaxed);
                    if !out.status.success() {
                        failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
                        continue;
                    }
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    if let Some(h) = text.split("bundles/").nth(1).map(|s| s[..16].to_string()) {
                        let b = Command::new("curl")
                            .args(&args)
                            .args(["-f", "-o", "/dev/null"])
                            .arg(format!("{base}/bundles/{h}/app.js"))
                            .output()
                            .unwrap();
                        count.fetch_add(1, Ordering::Relaxed);
                        if !b.status.success() {
                            failures.push(format!(
                                "bundle {h}: {}",
                                String::from_utf8_lossy(&b.stderr)
                            ));
                        }
                    } else {
                        failures.push(format!("index without a bundle: {text}"));
                    }
                }
                failures
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let upd = lab.ok(&["element", "update"]);
    assert!(upd.contains("installed 1.2.0"), "{upd}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = hammers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let n = count.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {n} requests failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(n >= 20, "only {n} requests made during the switch");
    assert_eq!(served_version(&lab), "v1.2.0");
    // Only the current and previous releases stay on disk.
    let element_dir = lab.state().join("element");
    assert!(element_dir.join("1.1.0/manifest.json").exists());
    assert!(!element_dir.join("1.0.0").exists());

    // Bad releases are refused; 1.2.0 keeps serving through each.
    let t13 = good_tarball("1.3.0");
    let other_sig = key.sign(b"some other file");
    server.publish("1.3.0", &t13, &other_sig);
    refused(&lab, "bad signature", "does not verify", "v1.2.0");
    let stranger = TestKey::new("Mallory <m@test>");
    server.publish("1.3.0", &t13, &stranger.sign(&t13));
    refused(&lab, "another key", "does not verify", "v1.2.0");
    let truncated = &t13[..t13.len() * 2 / 3];
    server.publish("1.3.0", truncated, &key.sign(truncated));
    refused(&lab, "truncated tarball", "damaged", "v1.2.0");
    server.publish_with("1.3.0", truncated, &key.sign(truncated), t13.len());
    refused(&lab, "short download", "the release lists", "v1.2.0");
    let mut files: Vec<Entry> = common::element::element_files("1.3.0")
        .into_iter()
        .map(|(n, d)| Entry::File(n, d))
        .collect();
    files.push(Entry::RawFile("../../escape.txt".into(), b"x".to_vec()));
    let dotdot = tarball("1.3.0", &files);
    server.publish("1.3.0", &dotdot, &key.sign(&dotdot));
    refused(&lab, "../ entry", "leaves the release directory", "v1.2.0");
    files.pop();
    files.push(Entry::Symlink("link".into(), "../../../etc/passwd".into()));
    let link = tarball("1.3.0", &files);
    server.publish("1.3.0", &link, &key.sign(&link));
    refused(&lab, "link escape", "outside the release", "v1.2.0");
    let old = good_tarball("1.1.5");
    server.publish("1.1.5", &old, &key.sign(&old));
    refused(&lab, "older release", "older than the installed", "v1.2.0");
    assert!(
        !lab.path("escape.txt").exists() && !lab.state().join("escape.txt").exists(),
        "a ../ entry was written"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&element_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    let human = lab.ok(&["status"]);
    assert!(human.contains("last update failed"), "{human}");

    // Rollback to 1.1.0 holds 1.2.0 back; a newer release lifts the hold.
    let rb = lab.ok(&["element", "rollback"]);
    assert!(rb.contains("rolled back from 1.2.0 to 1.1.0"), "{rb}");
    assert_eq!(served_version(&lab), "v1.1.0");
    server.publish("1.2.0", &t12, &key.sign(&t12));
    let held = lab.ok(&["element", "update"]);
    assert!(held.contains("held back"), "{held}");
    assert_eq!(served_version(&lab), "v1.1.0");
    server.publish("1.3.0", &t13, &key.sign(&t13));
    let upd = lab.ok(&["element", "update"]);
    assert!(upd.contains("installed 1.3.0"), "{upd}");
    assert_eq!(served_version(&lab), "v1.3.0");
    assert_eq!(element_status(&lab)["last_error"], serde_json::Value::Null);
    assert_eq!(
        lab.status()["problems"],
        serde_json::json!([]),
        "the alert was not cleared"
    );
    drop(run);

    // A restart serves what was installed, before any check.
    let _run = lab.start();
    assert_eq!(served_version(&lab), "v1.3.0");
}

/// A validly signed release is only as new as what it contains: an older tarball under a newer
/// tag (or one whose directory and version file disagree) is refused, as is a release answer
/// too big to be GitHub's; the installed release keeps serving through each.
#[test]
fn a_signed_older_release_under_a_newer_tag_and_an_oversize_answer_are_refused() {
    if !require_appliance() {
        return;
    }
    let (server, key, lab, run) = serving_1_0_0("element-downgrade");
    assert!(
        run.log_text().contains("element.test_mode is on"),
        "the test switch is not logged as a warning"
    );

    // Release 0.9.0, signed by the trusted key, published as v1.1.0.
    let old = good_tarball("0.9.0");
    server.publish("1.1.0", &old, &key.sign(&old));
    refused(
        &lab,
        "older tarball, newer tag",
        "is not Element 1.1.0",
        "v1.0.0",
    );
    // The directory says 1.1.0, the version file 0.9.0.
    let files: Vec<Entry> = common::element::element_files("0.9.0")
        .into_iter()
        .map(|(n, d)| Entry::File(n, d))
        .collect();
    let mixed = tarball("1.1.0", &files);
    server.publish("1.1.0", &mixed, &key.sign(&mixed));
    refused(
        &lab,
        "version file disagrees",
        "version file says 0.9.0",
        "v1.0.0",
    );
    assert!(
        !lab.state().join("element/0.9.0").exists() && !lab.state().join("element/1.1.0").exists(),
        "a refused release stayed on disk"
    );

    // An answer past 1 MiB (GitHub's are a few kB) is not read to the end.
    let t2 = good_tarball("1.2.0");
    server.publish("1.2.0", &t2, &key.sign(&t2));
    let latest = String::from_utf8(server.get("/releases/latest").unwrap()).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&latest).unwrap();
    json["body"] = "release notes ".repeat(100_000).into();
    server.put("/releases/latest", json.to_string().into_bytes());
    refused(&lab, "oversize release JSON", "larger than", "v1.0.0");

    // A good release still installs afterwards.
    server.publish("1.2.0", &t2, &key.sign(&t2));
    let upd = lab.ok(&["element", "update"]);
    assert!(upd.contains("installed 1.2.0"), "{upd}");
    assert_eq!(served_version(&lab), "v1.2.0");
}

/// Release and key URLs are https; a loopback http server and a test key need the explicit
/// `element.test_mode`, and each refusal names the key and the fix.
#[test]
fn element_test_settings_are_refused_outside_test_mode() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("element-testmode");
    let check = |element: &str| {
        lab.write_config(&format!("[tls]\nmode = \"internal\"\n[element]\n{element}"));
        let out = lab.run_cmd(&["check-config"]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + String::from_utf8_lossy(&out.stdout).as_ref(),
        )
    };
    let http = "release_url = \"http://127.0.0.1:9/releases/latest\"\n";
    let (code, err) = check(http);
    assert_eq!(code, Some(2), "http release_url accepted: {err}");
    assert!(
        err.contains("element.release_url") && err.contains("https://") && err.contains("fix:"),
        "{err}"
    );
    let key = "test_release_key = \"/tmp/key.asc\"\n";
    let (code, err) = check(key);
    assert_eq!(code, Some(2), "test_release_key accepted: {err}");
    assert!(
        err.contains("element.test_release_key")
            && err.contains("element.test_mode = true")
            && err.contains("fix:"),
        "{err}"
    );
    let (code, err) = check("release_url = \"http://example.com/latest\"\ntest_mode = true\n");
    assert_eq!(code, Some(2), "http to a non-loopback host accepted: {err}");
    assert!(err.contains("not on loopback"), "{err}");
    let (code, err) = check(&format!("{http}{key}test_mode = true\n"));
    assert_eq!(code, Some(0), "the test switch does not allow them: {err}");
}

#[test]
fn an_operator_element_json_is_merged_and_a_broken_one_is_named() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("element-json");
    std::fs::write(lab.path("element.json"), "{\"brand\": \"Our chat\",").unwrap();
    let out = lab.run_cmd(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("element.json") && err.contains("not valid JSON") && err.contains("fix:"),
        "{err}"
    );
    std::fs::write(
        lab.path("element.json"),
        "{\"brand\": \"Our chat\", \"setting_defaults\": {\"custom\": 1}}",
    )
    .unwrap();
    let _run = lab.start();
    // Nothing installed (no network to GitHub here): the waiting page, and config.json works.
    let page = get(&lab, "/", &[]);
    assert_eq!(page.status, 503);
    assert!(String::from_utf8_lossy(&page.body).contains("Element is being installed"));
    assert_eq!(page.h("retry-after"), "15");
    let cfg: serde_json::Value =
        serde_json::from_slice(&get(&lab, "/config.json", &[]).body).unwrap();
    assert_eq!(cfg["brand"], "Our chat");
    assert_eq!(cfg["setting_defaults"]["custom"], 1);
    assert_eq!(cfg["setting_defaults"]["UIFeature.passwordReset"], false);
    assert_eq!(cfg["disable_guests"], true);
}

/// Debian's chromium, headless, trusting the lab CA through its own NSS database.
#[test]
fn chromium_loads_element_with_no_csp_violation() {
    if !require_appliance() {
        return;
    }
    let have = Command::new("chromium").arg("--version").output().is_ok()
        && Command::new("certutil").arg("-H").output().is_ok();
    if !require(
        "chromium and certutil",
        have,
        "apt-get install chromium libnss3-tools (packaging/install-deps does)",
    ) {
        return;
    }
    let server = ReleaseServer::start();
    let key = TestKey::new("Test Releases <releases@test>");
    let t = good_tarball("2.0.0");
    server.publish("2.0.0", &t, &key.sign(&t));
    let lab = lab_with_releases("element-chromium", &server, &key);
    let _run = lab.start();
    wait_until("Element 2.0.0 installed", Duration::from_secs(60), || {
        element_status(&lab)["version"] == "2.0.0"
    });

    let home = lab.path("chromium-home");
    let nssdb = home.join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).unwrap();
    let db = format!("sql:{}", nssdb.display());
    let ok = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ok(Command::new("certutil").args(["-N", "--empty-password", "-d", &db]));
    ok(Command::new("certutil")
        .args([
            "-A",
            "-t",
            "C,,",
            "-n",
            "homelab-matrix lab",
            "-d",
            &db,
            "-i",
        ])
        .arg(lab.ca_root()));

    let out = Command::new("timeout")
        .args([
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!(
            "--host-resolver-rules=MAP element.{} 127.0.0.1",
            lab.server_name
        ))
        .arg(format!(
            "--user-data-dir={}",
            home.join("profile").display()
        ))
        .args(["--virtual-time-budget=15000", "--dump-dom"])
        .arg(element_url(&lab, "/"))
        .env("HOME", &home)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        dom.contains("READY server=matrix.test version=v2.0.0 wasm=ok worker=ok i18n=Hello"),
        "the page did not finish loading.\nDOM: {dom}\nlog: {log}"
    );
    assert!(!dom.contains("CSP-VIOLATION"), "{dom}");
    for bad in ["Content Security Policy", "Refused to", "ERR_CERT"] {
        assert!(!log.contains(bad), "chromium logged {bad:?}:\n{log}");
    }
}

/// Package-build time: the pinned release is fetched only when its sha256, the key's
/// fingerprint and the signature all check out; otherwise nothing is written.
#[test]
fn fetch_pinned_checks_hash_key_and_signature_before_unpacking() {
    let server = ReleaseServer::start();
    let key = TestKey::new("Test Releases <releases@test>");
    let t = good_tarball("3.0.0");
    server.publish("3.0.0", &t, &key.sign(&t));
    server.put("/key.asc", key.public_armored().into_bytes());
    let d = tempfile::tempdir().unwrap();
    let fingerprint = key.fingerprint();
    let lock = |sha: &str, fp: &str| {
        let p = d.path().join("element.lock");
        let base = format!("http://127.0.0.1:{}", server.port);
        std::fs::write(
            &p,
            format!(
                "version = \"3.0.0\"\nurl = \"{base}/download/v3.0.0/element-v3.0.0.tar.gz\"\nsignature_url = \"{base}/download/v3.0.0/element-v3.0.0.tar.gz.asc\"\nsha256 = \"{sha}\"\nkey_url = \"{base}/key.asc\"\nkey_fingerprint = \"{fp}\"\n"
            ),
        )
        .unwrap();
        p
    };
    let out = d.path().join("embedded");
    std::fs::create_dir_all(&out).unwrap();
    let fetch = |lock: &std::path::Path| {
        Command::new(common::bin())
            .args(["element", "fetch-pinned", "--lock"])
            .arg(lock)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let sha = homelab_matrix::secrets::sha256_hex(&t);
    let other = TestKey::new("Other <o@test>").fingerprint();
    for (sha, fp, expect) in [
        ("0".repeat(64), &fingerprint, "sha256"),
        (sha.clone(), &other, "not the one pinned"),
    ] {
        let o = fetch(&lock(&sha, fp));
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(expect), "expected {expect:?}: {err}");
        assert!(!out.join("element").exists(), "written despite: {err}");
    }
    server.publish("3.0.0", &t, &key.sign(b"something else"));
    let o = fetch(&lock(&sha, &fingerprint));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not verify"));
    assert!(!out.join("element").exists());

    server.publish("3.0.0", &t, &key.sign(&t));
    // The updater's version rule: the lock's version must be the tarball's own.
    let wrong = std::fs::read_to_string(lock(&sha, &fingerprint))
        .unwrap()
        .replacen("version = \"3.0.0\"", "version = \"3.1.0\"", 1);
    let wrong_lock = d.path().join("wrong.lock");
    std::fs::write(&wrong_lock, wrong).unwrap();
    let o = fetch(&wrong_lock);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is not Element 3.1.0"),
        "{err}"
    );
    assert!(!out.join("element").exists());

    let o = fetch(&lock(&sha, &fingerprint));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.join("element/version")).unwrap(),
        "v3.0.0\n"
    );
    assert!(out.join("element/index.html").exists());
    assert!(out.join("keys/element-release-key.asc").exists());
}
