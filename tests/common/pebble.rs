//! A real ACME server for tests: Debian's pebble, with pebble-challtestsrv as its DNS (every
//! name resolves to 127.0.0.1). All on loopback and free ports (LAB.md §4 and its gotchas).

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::pem::PemObject;

use super::free_port;

pub struct Pebble {
    pub dir: tempfile::TempDir,
    pub directory_url: String,
    /// The CA of pebble's own HTTPS listener: what the ACME client trusts.
    pub listener_ca: PathBuf,
    mgmt: String,
    dns: String,
    procs: Vec<Child>,
    validity: Option<u64>,
    http_port: u16,
    tls_port: u16,
}

pub fn available() -> bool {
    Command::new("sh")
        .args(["-c", "command -v pebble && command -v pebble-challtestsrv"])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Pebble {
    /// Validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` (our front door's).
    /// `validity`: certificate lifetime in seconds (pebble's default is 5 years).
    pub fn start(http_port: u16, tls_port: u16, validity: Option<u64>) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        // pebble from Debian ships no test certificates: make a CA and a 127.0.0.1 leaf.
        let ca = super::TestCa::new("pebble listener test CA");
        let (leaf, key) = ca.leaf(&["localhost".to_string(), "127.0.0.1".to_string()]);
        let listener_ca = dir.path().join("listener-ca.pem");
        fs::write(&listener_ca, &ca.pem).unwrap();
        fs::write(dir.path().join("listener.pem"), leaf).unwrap();
        fs::write(dir.path().join("listener.key"), key).unwrap();
        let mut p = Pebble {
            directory_url: String::new(),
            listener_ca,
            mgmt: String::new(),
            dns: format!("127.0.0.1:{}", free_port()),
            dir,
            procs: vec![],
            validity,
            http_port,
            tls_port,
        };
        p.spawn_dns();
        p.spawn_pebble();
        p
    }

    fn spawn_dns(&mut self) {
        let mgmt = format!("127.0.0.1:{}", free_port());
        let child = Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &self.dns,
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ])
            .args([
                "-management",
                &mgmt,
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting pebble-challtestsrv");
        self.procs.push(child);
    }

    /// Starts (or restarts) pebble itself. A restart makes a new CA hierarchy.
    pub fn spawn_pebble(&mut self) {
        let port = free_port();
        let mgmt = free_port();
        let mut conf = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": self.dir.path().join("listener.pem"),
            "privateKey": self.dir.path().join("listener.key"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(v) = self.validity {
            conf["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let path = self.dir.path().join("pebble.json");
        fs::write(&path, conf.to_string()).unwrap();
        let log = fs::File::create(self.dir.path().join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&path)
            .args(["-dnsserver", &self.dns, "-strict=false"])
            // Deterministic: no random validation sleeps, no rejected nonces, no authz reuse.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting pebble");
        self.procs.push(child);
        self.directory_url = format!("https://127.0.0.1:{port}/dir");
        self.mgmt = format!("https://127.0.0.1:{mgmt}");
        let deadline = super::deadline(Duration::from_secs(20));
        while !self
            .get(&self.directory_url)
            .is_some_and(|b| b.contains("newOrder"))
        {
            assert!(
                Instant::now() < deadline,
                "pebble did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn get(&self, url: &str) -> Option<String> {
        let out = Command::new("curl")
            .args(["-sfS", "--max-time", "5", "--cacert"])
            .arg(&self.listener_ca)
            .arg(url)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The root that issued certificates chain to (changes on every pebble start).
    pub fn issuing_root(&self) -> String {
        self.get(&format!("{}/roots/0", self.mgmt))
            .expect("pebble's root")
    }

    /// Stops pebble (the ACME server), leaving its DNS up.
    pub fn stop_pebble(&mut self) {
        if let Some(mut p) = self.procs.pop() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// The `[tls]` section of a config that uses this pebble.
    pub fn tls_section(&self, challenges: &[&str]) -> String {
        let list: Vec<String> = challenges.iter().map(|c| format!("\"{c}\"")).collect();
        format!(
            "[tls]\nmode = \"acme\"\nacme_email = \"admin@matrix.test\"\nacme_directory = \"{}\"\nacme_ca_roots = [\"{}\"]\nchallenges = [{}]\n",
            self.directory_url,
            self.listener_ca.display(),
            list.join(", ")
        )
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// A "CA" that accepts TCP connections and never answers (nor closes them).
pub struct StalledCa {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
}

impl StalledCa {
    pub fn start() -> StalledCa {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        std::thread::spawn(move || {
            let mut held = vec![];
            for s in l.incoming().flatten() {
                n.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        StalledCa { port, accepted }
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// What an `AriProxy` saw.
#[derive(Default)]
struct AriState {
    /// renewalInfo requests: certificate identifier and when.
    polls: Vec<(String, SystemTime)>,
    /// `replaces` of each newOrder request.
    replaces: Vec<String>,
    /// Certificates told to renew now (a window in the past).
    renew_now: HashSet<String>,
}

/// ACME Renewal Information (RFC 9773) in front of a pebble that has none (Debian's 2.4.0):
/// forwards everything to pebble (with our Host, so pebble's URLs point back here), adds
/// `renewalInfo` to the directory, answers renewalInfo itself (a window ten days ahead, or
/// in the past for certificates told to renew now, with `Retry-After`), records the
/// `replaces` of new orders and reflects it in the order, as RFC 9773 §5 has the CA do.
pub struct AriProxy {
    pub directory_url: String,
    state: Arc<Mutex<AriState>>,
}

impl AriProxy {
    pub fn start(pebble: &Pebble, retry_after: u64) -> AriProxy {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let me = format!("127.0.0.1:{}", l.local_addr().unwrap().port());
        let upstream = pebble.directory_url.trim_end_matches("/dir").to_string();
        let certs: Vec<_> =
            rustls_pki_types::CertificateDer::pem_file_iter(pebble.dir.path().join("listener.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_file(pebble.dir.path().join("listener.key"))
                .unwrap();
        let tls = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let ca = fs::read(&pebble.listener_ca).unwrap();
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let now = unix_now();
        let future = (now + 10 * 86400, now + 11 * 86400);
        let state: Arc<Mutex<AriState>> = Arc::default();
        let st = state.clone();
        let host = me.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (tls, http, up, me, st) = (
                    tls.clone(),
                    http.clone(),
                    upstream.clone(),
                    host.clone(),
                    st.clone(),
                );
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(tls).unwrap();
                    let mut s = rustls::StreamOwned::new(conn, s);
                    if let Some((method, path, headers, body)) = read_request(&mut s) {
                        let (status, hdrs, body) = ari_answer(
                            &method,
                            &path,
                            &headers,
                            body,
                            &http,
                            &up,
                            &me,
                            &st,
                            future,
                            retry_after,
                        );
                        let mut head = format!("HTTP/1.1 {status} X\r\n");
                        for (k, v) in hdrs {
                            head.push_str(&format!("{k}: {v}\r\n"));
                        }
                        head.push_str(&format!(
                            "Content-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        ));
                        let _ = s.write_all(head.as_bytes());
                        let _ = s.write_all(&body);
                        let _ = s.flush();
                        s.conn.send_close_notify();
                        let _ = s.flush();
                    }
                });
            }
        });
        AriProxy {
            directory_url: format!("https://{me}/dir"),
            state,
        }
    }

    /// Certificate identifiers polled, in order, with the time of each poll.
    pub fn polls(&self) -> Vec<(String, SystemTime)> {
        self.state.lock().unwrap().polls.clone()
    }

    pub fn replaces(&self) -> Vec<String> {
        self.state.lock().unwrap().replaces.clone()
    }

    pub fn renew_now(&self, ids: impl IntoIterator<Item = String>) {
        self.state.lock().unwrap().renew_now.extend(ids);
    }
}

type Head = Vec<(String, String)>;

fn read_request(s: &mut impl Read) -> Option<(String, String, Head, Vec<u8>)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 || head.len() > 65536 {
            return None;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Head = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((method, path, headers, body))
}

#[allow(clippy::too_many_arguments)]
fn ari_answer(
    method: &str,
    path: &str,
    headers: &Head,
    body: Vec<u8>,
    http: &reqwest::blocking::Client,
    upstream: &str,
    me: &str,
    state: &Mutex<AriState>,
    future: (u64, u64),
    retry_after: u64,
) -> (u16, Head, Vec<u8>) {
    if let Some(id) = path.strip_prefix("/ari/") {
        let mut st = state.lock().unwrap();
        st.polls.push((id.to_string(), SystemTime::now()));
        let now = unix_now();
        let (start, end) = if st.renew_now.contains(id) {
            (now - 7200, now - 3600)
        } else {
            future
        };
        let json =
            serde_json::json!({"suggestedWindow": {"start": rfc3339(start), "end": rfc3339(end)}});
        return (
            200,
            vec![
                ("Content-Type".into(), "application/json".into()),
                ("Retry-After".into(), retry_after.to_string()),
            ],
            json.to_string().into_bytes(),
        );
    }
    let replaces = (method == "POST" && path == "/order-plz")
        .then(|| jws_payload(&body))
        .flatten()
        .and_then(|p| p["replaces"].as_str().map(str::to_string));
    if let Some(r) = &replaces {
        state.lock().unwrap().replaces.push(r.clone());
    }
    let mut req = http
        .request(method.parse().unwrap(), format!("{upstream}{path}"))
        .header("Host", me)
        .body(body);
    if let Some((_, ct)) = headers.iter().find(|(k, _)| k == "content-type") {
        req = req.header("Content-Type", ct);
    }
    let Ok(rsp) = req.send() else {
        return (502, vec![], b"pebble unreachable".to_vec());
    };
    let status = rsp.status().as_u16();
    let hdrs: Head = rsp
        .headers()
        .iter()
        .filter(|(k, _)| {
            !["content-length", "transfer-encoding", "connection"].contains(&k.as_str())
        })
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let mut out = rsp.bytes().map(|b| b.to_vec()).unwrap_or_default();
    let patch = |out: &mut Vec<u8>, f: &dyn Fn(&mut serde_json::Value)| {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(out) {
            f(&mut v);
            *out = v.to_string().into_bytes();
        }
    };
    if path == "/dir" {
        let url = format!("https://{me}/ari");
        patch(&mut out, &|v| v["renewalInfo"] = url.clone().into());
    }
    if let Some(r) = &replaces
        && status == 201
    {
        patch(&mut out, &|v| v["replaces"] = r.clone().into());
    }
    (status, hdrs, out)
}

/// The JSON payload of a flattened JWS (RFC 7515 §7.2.2), as ACME posts it.
fn jws_payload(body: &[u8]) -> Option<serde_json::Value> {
    let jws: serde_json::Value = serde_json::from_slice(body).ok()?;
    serde_json::from_slice(&base64url(jws["payload"].as_str()?)?).ok()
}

fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = vec![];
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Some(out)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `2026-12-01T08:00:00Z` (RFC 3339) from unix seconds (H. Hinnant's civil_from_days).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
