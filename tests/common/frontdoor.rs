//! A front door run in-process from the library in front of a recording upstream, for tests
//! that assert on the exact bytes the upstream receives (which Synapse would not let them see).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use homelab_matrix::certs::{Cert, CertStore, Source};
use homelab_matrix::config::Config;
use homelab_matrix::http::{Bound, FrontDoor, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// What the upstream saw of one request.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub head: String,
    pub body_len: usize,
}

/// A plain HTTP/1.1 upstream that records every request and answers 200 "ok".
pub struct Recorder {
    pub port: u16,
    /// TCP connections accepted so far.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Bytes of body received so far by the request in progress.
    pub progress: Arc<Mutex<usize>>,
}

pub async fn recorder() -> Recorder {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(vec![]));
    let progress = Arc::new(Mutex::new(0usize));
    let (s2, p2) = (seen.clone(), progress.clone());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a2 = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = l.accept().await.unwrap();
            a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (seen, progress) = (s2.clone(), p2.clone());
            tokio::spawn(async move {
                loop {
                    let Some(buf) = read_head(&mut sock).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let lower = head.to_ascii_lowercase();
                    let mut body_len = 0usize;
                    *progress.lock().unwrap() = 0;
                    let mut chunk = vec![0u8; 65536];
                    if let Some(cl) = lower
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                    {
                        while body_len < cl {
                            let want = (cl - body_len).min(chunk.len());
                            let n = sock.read(&mut chunk[..want]).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            body_len += n;
                            *progress.lock().unwrap() = body_len;
                        }
                    } else if lower.contains("transfer-encoding: chunked") {
                        // Count raw bytes until the terminating chunk; good enough for tests.
                        let mut tail = vec![];
                        loop {
                            let n = sock.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            body_len += n;
                            *progress.lock().unwrap() = body_len;
                            tail.extend_from_slice(&chunk[..n]);
                            if tail.len() > 16 {
                                tail.drain(..tail.len() - 16);
                            }
                            if tail.ends_with(b"0\r\n\r\n") {
                                break;
                            }
                        }
                    }
                    seen.lock().unwrap().push(Seen {
                        head: head.clone(),
                        body_len,
                    });
                    // A long-poll stand-in: answer only after 3 s of silence, or `delay` ms.
                    if head.contains("?slow") {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    if let Some(ms) = query_param(&head, "delay") {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    Recorder {
        port,
        accepted,
        seen,
        progress,
    }
}

/// A request head, read a byte at a time (so nothing of the body is taken); None at EOF.
pub async fn read_head(sock: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = vec![];
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if sock.read(&mut b).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

/// A numeric query parameter of the request line in `head`.
pub fn query_param(head: &str, name: &str) -> Option<u64> {
    let target = head.split(' ').nth(1)?;
    let (_, q) = target.split_once('?')?;
    q.split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// TCP connections to `port` in state ESTABLISHED, as the kernel sees them on the listening
/// side (`ss`): accurate even while a process has not yet noticed a close.
pub fn established_to(port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("running ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Samples `established_to(port)` until dropped; `max()` is the most seen at once.
pub struct PeakConnections {
    max: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl PeakConnections {
    pub fn watch(port: u16) -> PeakConnections {
        let max = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, st) = (max.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::SeqCst) {
                m.fetch_max(established_to(port), std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        PeakConnections { max, stop }
    }
    pub fn max(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for PeakConnections {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Recorder {
    /// Waits until the upstream has seen `n` requests.
    pub async fn wait_seen(&self, n: usize) {
        let t0 = Instant::now();
        while self.seen.lock().unwrap().len() < n {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the upstream never saw {n} requests"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A recorder and, on loopback in front of it, a front door with `limits`.
pub async fn door_with(limits: Limits) -> (Recorder, Door) {
    let rec = recorder().await;
    let d = door(rec.port, limits, "127.0.0.1").await;
    (rec, d)
}

/// A request the :80 listener answers with a redirect.
pub const GET_ROOT: &[u8] = b"GET / HTTP/1.1\r\nHost: matrix.example.test\r\n\r\n";

pub struct Door {
    pub https: u16,
    pub http: u16,
    pub federation: u16,
    pub ca: std::path::PathBuf,
    /// The CA's certificate, for in-process clients.
    pub ca_pem: String,
    pub dir: tempfile::TempDir,
    pub stop: watch::Sender<bool>,
    pub store: Arc<CertStore>,
}

pub const HOST: &str = "matrix.example.test";

pub async fn door(upstream_port: u16, limits: Limits, listen_ip: &str) -> Door {
    let dir = tempfile::tempdir().unwrap();
    let (h, s, f) = (super::free_port(), super::free_port(), super::free_port());
    let cfg = Config::from_toml(&format!(
        "server_name = \"example.test\"\n[listen]\nhttp = \"{listen_ip}:{h}\"\nhttps = \"{listen_ip}:{s}\"\nfederation = \"{listen_ip}:{f}\"\n[synapse]\nport = {upstream_port}\nmax_upload_size = \"4M\"\n"
    ))
    .unwrap();
    // A throwaway CA and one certificate for every served name.
    let test_ca = super::TestCa::new("proxy test CA");
    let (leaf_pem, key_pem) = test_ca.leaf(&cfg.served_names());
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &test_ca.pem).unwrap();
    let store = CertStore::new(&dir.path().join("certs"), HOST);
    let cert = Arc::new(Cert::parse(&leaf_pem, &key_pem, Source::Files).unwrap());
    for n in cfg.served_names() {
        store.publish(&n, cert.clone());
    }
    let bound = Bound::bind(&cfg).await.unwrap();
    let routes = homelab_matrix::app::routes(&cfg, &store, s, &limits, None);
    let front = FrontDoor::new(routes, s);
    let tls = homelab_matrix::tls::acceptor(store.clone());
    let (stop, rx) = watch::channel(false);
    tokio::spawn(front.serve(bound, tls, limits, rx, Duration::from_secs(1)));
    Door {
        https: s,
        http: h,
        federation: f,
        ca_pem: test_ca.pem.clone(),
        ca,
        dir,
        stop,
        store,
    }
}

impl Door {
    pub fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "30", "--cacert"])
            .arg(&self.ca);
        for port in [self.https, self.http, self.federation] {
            for name in [HOST, "example.test", "element.example.test"] {
                c.arg("--resolve").arg(format!("{name}:{port}:127.0.0.1"));
            }
        }
        c
    }
}

pub fn run(mut c: Command) -> (String, String) {
    let out = c.output().expect("running a client");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
