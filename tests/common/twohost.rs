//! Two appliances on two "hosts": `a.test` and `b.test`, each a real `homelab-matrix run` in
//! its own network namespace, joined by a veth pair with addresses from 10.232.k.0/24 (k unique
//! per pair, across test processes too: the namespace name holds it, and `ip netns add` refuses
//! a name that exists). Each namespace has `lo` up and its own hosts file
//! (`/etc/netns/<ns>/hosts`, which `ip netns exec` bind-mounts over /etc/hosts) naming both
//! servers' names. Each appliance has its internal CA; each Synapse trusts the other's for
//! federation (`federation_custom_ca_list`) and may reach the pair's range
//! (`ip_range_whitelist`), both through synapse.d in the test only.
//!
//! PostgreSQL stays on this host: provisioning uses its unix socket (paths cross network
//! namespaces), and Synapse's TCP login to 127.0.0.1:5432 inside a namespace is relayed by the
//! test process to 127.0.0.1:5432 here (a socket belongs to the namespace it was made in, so a
//! thread that `setns`es makes one there and another here).
//!
//! The test reaches a namespace's loopback ports through the same kind of relay
//! ([`Host::forward`]). Everything (processes, relays, namespaces with their veth, hosts files)
//! goes on drop, panics included.

use std::fs;
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Lab, Matrix, Running, start_until_ready};

/// Config tables every two-host appliance gets (before `[listen]`): the internal CA, and no
/// bot, TURN relay or Element updater, which federation does not need and which would only
/// slow both starts down.
pub const BASE_EXTRA: &str =
    "[tls]\nmode = \"internal\"\n[bot]\nenabled = false\n[element]\nauto_update = false\n";

/// The federation trust file each Synapse gets in synapse.d.
pub const TRUST_YAML: &str = "50-twohost-federation.yaml";

/// What a pair needs: `require_appliance`'s, and network namespaces (root with
/// CAP_SYS_ADMIN, iproute2). Fails under CI when missing, else skips loudly.
pub fn require_twohost() -> bool {
    super::require_appliance()
        && super::require(
            "network namespaces",
            Command::new("unshare")
                .args(["--net", "true"])
                .status()
                .is_ok_and(|s| s.success())
                && Command::new("ip")
                    .args(["netns", "list"])
                    .status()
                    .is_ok_and(|s| s.success()),
            "`unshare --net true` or `ip netns list` fails: run as root where new network namespaces may be made, with iproute2 installed",
        )
}

/// One appliance in its namespace.
pub struct Host {
    /// `a.test` or `b.test`: the server_name.
    pub server_name: String,
    /// The network namespace (`ip netns` name).
    pub ns: String,
    /// This host's address on the veth link.
    pub ip: String,
    pub lab: Lab,
    pub run: Option<Running>,
    /// Listen addresses of `[listen]`, written by `write_config` (default 0.0.0.0 each).
    pub listen_http: String,
    pub listen_https: String,
    pub listen_federation: String,
    /// Config tables before `[listen]` (default `BASE_EXTRA`).
    pub extra: String,
    relays: Mutex<Vec<Relay>>,
    dns: Mutex<Option<DnsStub>>,
}

impl Host {
    /// A command run inside this host's namespace (with its hosts file).
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// `homelab-matrix --config <this host's> ARGS`, inside the namespace (the CLI talks to
    /// Synapse on the namespace's loopback).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = self.exec(super::bin());
        c.arg("--config").arg(&self.lab.config).args(args);
        c.env_remove("NOTIFY_SOCKET").env_remove("RUST_LOG");
        c
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).output().expect("running homelab-matrix");
        assert!(
            out.status.success(),
            "{}: homelab-matrix {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            self.server_name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Registers `name` with `password` (shared-secret registration, as an operator does).
    pub fn add_user(&self, name: &str, password: &str) {
        let f = self.lab.path(&format!("pw-{name}"));
        fs::write(&f, format!("{password}\n")).unwrap();
        self.ok(&[
            "user",
            "add",
            name,
            "--password-file",
            &f.display().to_string(),
        ]);
    }

    /// `@name:<server_name>`
    pub fn mxid(&self, name: &str) -> String {
        format!("@{name}:{}", self.server_name)
    }

    /// A port on this test's 127.0.0.1 relayed to 127.0.0.1:`port` inside the namespace.
    pub fn forward(&self, port: u16) -> u16 {
        let local = super::free_port();
        let relay = Relay::start(
            None,
            SocketAddr::from(([127, 0, 0, 1], local)),
            Some(&self.ns),
            SocketAddr::from(([127, 0, 0, 1], port)),
        );
        self.relays.lock().unwrap().push(relay);
        local
    }

    /// Synapse's client API on its loopback listener inside the namespace, relayed here
    /// (plain HTTP, as `Lab::synapse_url` is): for the test's clients, not for federation.
    pub fn synapse_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.forward(self.lab.synapse_port))
    }

    /// A minimal client of this host's Synapse (through `synapse_url`).
    pub fn matrix(&self) -> Matrix {
        Matrix::new(&self.synapse_url())
    }

    /// A client of this host's front door (`https://matrix.<server_name>`, relayed here,
    /// trusting this host's CA): the way a user's client goes, and with workers the only way
    /// to every endpoint (the main process serves no media, nor what a stream writer writes).
    pub fn front_matrix(&self) -> Matrix {
        let ca = fs::read(self.lab.ca_root()).unwrap();
        Matrix::through(&self.lab.matrix_host(), self.forward(443), &ca)
    }

    /// For matrix-sdk, the same way as `front_matrix`.
    pub fn front_http(&self) -> reqwest::Client {
        let ca = fs::read(self.lab.ca_root()).unwrap();
        super::front_door_http(&self.lab.matrix_host(), self.forward(443), &ca)
    }

    /// The supervisor's output so far (its lines and its children's).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.lab.path("run.log")).unwrap_or_default()
    }

    /// Writes the config from `extra` and the listen addresses.
    pub fn write_config(&self) {
        self.lab.write_config_on("0.0.0.0", &self.extra);
        let text = fs::read_to_string(&self.lab.config).unwrap();
        let text = text
            .replace(
                "http = \"0.0.0.0:80\"",
                &format!("http = \"{}:80\"", self.listen_http),
            )
            .replace(
                "https = \"0.0.0.0:443\"",
                &format!("https = \"{}:443\"", self.listen_https),
            )
            .replace(
                "federation = \"0.0.0.0:8448\"",
                &format!("federation = \"{}:8448\"", self.listen_federation),
            );
        fs::write(&self.lab.config, text).unwrap();
    }

    /// The `run` command inside the namespace.
    fn run_command(&self) -> Command {
        let mut c = self.exec(super::bin());
        c.arg("--config").arg(&self.lab.config).arg("run");
        c.env_remove("RUST_LOG");
        c
    }

    /// Starts `run` and waits for READY=1.
    pub fn start(&mut self) {
        assert!(self.run.is_none(), "{} runs already", self.server_name);
        self.write_config();
        self.run = Some(start_until_ready(
            self.run_command(),
            &self.lab.path("notify.sock"),
            &self.lab.path("run.log"),
        ));
    }

    /// Stops `run` (SIGTERM, as systemd does) and waits for its exit.
    pub fn stop(&mut self) {
        if let Some(mut r) = self.run.take() {
            r.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30));
        }
    }
}

/// The pair: namespaces, link, hosts files and both appliances (configured; `start` starts
/// them).
pub struct TwoHost {
    pub a: Host,
    pub b: Host,
    /// The link's /24, for `ip_range_whitelist`.
    pub subnet: String,
    etc_dirs: Vec<PathBuf>,
}

/// Where `ip netns exec` takes a namespace's own /etc files from (ip-netns(8)).
fn etc_netns(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Adds namespaces `<prefix>a<k>` and `<prefix>b<k>` for the first free k; returns k.
fn add_namespaces() -> u32 {
    let start = std::process::id() % 250;
    for i in 0..250 {
        let k = (start + i) % 250 + 1;
        let a = format!("hm2a{k}");
        let ok = Command::new("ip")
            .args(["netns", "add", &a])
            .output()
            .expect("running ip (iproute2)")
            .status
            .success();
        if !ok {
            continue; // another pair (maybe another test process) has this k
        }
        let b = format!("hm2b{k}");
        let _ = Command::new("ip").args(["netns", "del", &b]).output();
        ip(&["netns", "add", &b]);
        return k;
    }
    panic!("no free two-host namespace number (hm2a1..hm2a250 all exist; `ip netns list`)");
}

impl TwoHost {
    /// Namespaces, link and hosts files; both appliances configured (`BASE_EXTRA`, listening on
    /// 0.0.0.0:80/443/8448 in their namespace) with their CAs made and each trusting the
    /// other's. `tag` names the labs' databases.
    pub fn new(tag: &str) -> TwoHost {
        let k = add_namespaces();
        let subnet = format!("10.232.{k}.0/24");
        let mk = |side: &str, octet: u8| {
            let server_name = format!("{side}.test");
            let mut lab = Lab::new(&format!("{tag}-{side}"));
            lab.server_name = server_name.clone();
            // Each host has its own ports: the standard ones, as discovery expects.
            lab.http_port = 80;
            lab.https_port = 443;
            lab.federation_port = 8448;
            lab.turn_extra.replace("enabled = false\n".into());
            Host {
                server_name,
                ns: format!("hm2{side}{k}"),
                ip: format!("10.232.{k}.{octet}"),
                lab,
                run: None,
                listen_http: "0.0.0.0".into(),
                listen_https: "0.0.0.0".into(),
                listen_federation: "0.0.0.0".into(),
                extra: BASE_EXTRA.into(),
                relays: Mutex::new(vec![]),
                dns: Mutex::new(None),
            }
        };
        let (a, b) = (mk("a", 1), mk("b", 2));
        // From here on, a panic tears down what there is.
        let pair = TwoHost {
            etc_dirs: vec![etc_netns(&a.ns), etc_netns(&b.ns)],
            a,
            b,
            subnet,
        };
        let (va, vb) = (format!("hm2v{k}a"), format!("hm2v{k}b"));
        ip(&[
            "link", "add", "name", &va, "netns", &pair.a.ns, "type", "veth", "peer", "name", &vb,
            "netns", &pair.b.ns,
        ]);
        let names = |h: &Host| {
            format!(
                "{ip} {s} matrix.{s} element.{s} turn.{s}\n",
                ip = h.ip,
                s = h.server_name
            )
        };
        let hosts = format!("127.0.0.1 localhost\n{}{}", names(&pair.a), names(&pair.b));
        for (h, dev) in [(&pair.a, &va), (&pair.b, &vb)] {
            ip(&[
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/24", h.ip),
                "dev",
                dev,
            ]);
            ip(&["-n", &h.ns, "link", "set", dev, "up"]);
            ip(&["-n", &h.ns, "link", "set", "lo", "up"]);
            let etc = etc_netns(&h.ns);
            fs::create_dir_all(&etc).unwrap();
            fs::write(etc.join("hosts"), &hosts).unwrap();
            // A name server that knows no name (the hosts file has ours): Synapse's SRV
            // lookups (`_matrix-fed._tcp`) and any other name get NXDOMAIN at once, as on
            // the internet, instead of waiting out resolver timeouts (a minute each).
            fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
            let dns = DnsStub::start(&h.ns);
            h.dns.lock().unwrap().replace(dns);
            // Synapse's login to PostgreSQL over TCP (the labs' `[postgres]` keeps the default
            // 127.0.0.1:5432), relayed to this host's.
            let pg = SocketAddr::from(([127, 0, 0, 1], 5432));
            let relay = Relay::start(Some(&h.ns), pg, None, pg);
            h.relays.lock().unwrap().push(relay);
        }
        for h in [&pair.a, &pair.b] {
            make_ca(h);
        }
        pair.trust_each_other();
        pair
    }

    /// synapse.d of each: trust the other's CA for federation, and allow the link's range
    /// (Synapse refuses private addresses by default, `ip_range_blacklist`).
    fn trust_each_other(&self) {
        for (me, peer) in [(&self.a, &self.b), (&self.b, &self.a)] {
            let ca = me.lab.path("peer-ca.pem");
            fs::copy(peer.lab.ca_root(), &ca).unwrap();
            fs::set_permissions(&ca, fs::Permissions::from_mode(0o644)).unwrap();
            fs::write(
                me.lab.path("synapse.d").join(TRUST_YAML),
                format!(
                    "# Test only: the peer's internal CA and the two-host link.\n\
                     federation_custom_ca_list: [\"{}\"]\n\
                     ip_range_whitelist: [\"{}\"]\n",
                    ca.display(),
                    self.subnet
                ),
            )
            .unwrap();
        }
    }

    /// A pair as `new` makes it, started (both at once).
    pub fn started(tag: &str) -> TwoHost {
        let mut pair = TwoHost::new(tag);
        pair.start();
        pair
    }

    /// Starts both appliances at once and waits for both READY=1.
    pub fn start(&mut self) {
        let (a, b) = (&mut self.a, &mut self.b);
        std::thread::scope(|s| {
            let ta = s.spawn(|| a.start());
            let tb = s.spawn(|| b.start());
            let (ra, rb) = (ta.join(), tb.join());
            if let Err(e) = ra {
                std::panic::resume_unwind(e);
            }
            if let Err(e) = rb {
                std::panic::resume_unwind(e);
            }
        });
    }

    /// Both hosts, for loops.
    pub fn hosts(&self) -> [&Host; 2] {
        [&self.a, &self.b]
    }
}

impl Drop for TwoHost {
    fn drop(&mut self) {
        // Processes first (their sockets hold the namespaces), then relays, then the rest.
        for h in [&mut self.a, &mut self.b] {
            if std::thread::panicking() {
                eprintln!(
                    "----- {} ({}): the last lines of its run.log -----\n{}",
                    h.server_name,
                    h.ip,
                    tail(&h.log_text(), 150)
                );
            }
            drop(h.run.take());
            h.relays.lock().unwrap().clear();
            h.dns.lock().unwrap().take();
        }
        for h in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
        }
        for d in &self.etc_dirs {
            let _ = fs::remove_dir_all(d);
        }
        // Both databases at once: each DROP DATABASE waits for a checkpoint (seconds on a
        // busy host).
        std::thread::scope(|s| {
            for db in [&self.a.lab.db, &self.b.lab.db] {
                s.spawn(|| super::drop_database(db));
            }
        });
    }
}

/// The appliance's internal CA, made before its first start (where `certs::ca` keeps it:
/// `state/ca/root.key` 0600 and `root.pem` 0644), so that the peer's Synapse can be told to
/// trust it before either starts. The appliance loads it as its own.
fn make_ca(h: &Host) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let dir = h.lab.state().join("ca");
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(h.lab.state(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(
        DnType::CommonName,
        format!("homelab-matrix test CA for {}", h.server_name),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    let kp = dir.join("root.key");
    fs::write(&kp, key.serialize_pem()).unwrap();
    fs::set_permissions(&kp, fs::Permissions::from_mode(0o600)).unwrap();
    let rp = dir.join("root.pem");
    fs::write(&rp, cert.pem()).unwrap();
    fs::set_permissions(&rp, fs::Permissions::from_mode(0o644)).unwrap();
}

/// Moves the calling thread into network namespace `ns` (None: the one `home` is).
fn enter(ns: Option<&str>, home: &fs::File) {
    use nix::sched::{CloneFlags, setns};
    match ns {
        Some(ns) => {
            let f = fs::File::open(format!("/run/netns/{ns}"))
                .unwrap_or_else(|e| panic!("opening /run/netns/{ns}: {e}"));
            setns(&f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {ns}: {e}"));
        }
        None => setns(home, CloneFlags::CLONE_NEWNET).expect("setns back home"),
    }
}

/// A TCP relay across network namespaces: listens on `listen` in `listen_ns` and connects each
/// client to `to` in `to_ns` (None: this test's own). Stopped, with its connections, on drop.
struct Relay {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(
        listen_ns: Option<&str>,
        listen: SocketAddr,
        to_ns: Option<&str>,
        to: SocketAddr,
    ) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (lns, tns) = (listen_ns.map(str::to_string), to_ns.map(str::to_string));
        let (stop2, conns2) = (stop.clone(), conns.clone());
        // A thread of its own: setns changes only the calling thread's namespace, and the
        // threads it spawns inherit it.
        let thread = std::thread::spawn(move || {
            let home = fs::File::open("/proc/thread-self/ns/net").unwrap();
            enter(lns.as_deref(), &home);
            let l = TcpListener::bind(listen);
            enter(tns.as_deref(), &home);
            let l = match l {
                Ok(l) => l,
                Err(e) => {
                    ready_tx.send(Err(e)).unwrap();
                    return;
                }
            };
            l.set_nonblocking(true).unwrap();
            ready_tx.send(Ok(())).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(upstream) = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                        else {
                            continue; // dropping the client tells it
                        };
                        let mut c = conns2.lock().unwrap();
                        c.push(client.try_clone().unwrap());
                        c.push(upstream.try_clone().unwrap());
                        drop(c);
                        pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                        pipe(upstream, client);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("relay listening on {listen} in {listen_ns:?}: {e}"));
        Relay {
            stop,
            conns,
            thread: Some(thread),
        }
    }
}

/// Copies `from` to `to` in a thread, then passes the end of stream on.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A DNS server on 127.0.0.1:53 in a namespace that answers every query NXDOMAIN
/// (RFC 1035 §4.1.1: the query's ID and question, QR set, RCODE 3). Stopped on drop.
struct DnsStub {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsStub {
    fn start(ns: &str) -> DnsStub {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns2, stop2) = (ns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let home = fs::File::open("/proc/thread-self/ns/net").unwrap();
            enter(Some(&ns2), &home);
            let sock = match std::net::UdpSocket::bind(("127.0.0.1", 53)) {
                Ok(s) => s,
                Err(e) => {
                    ready_tx.send(Err(e)).unwrap();
                    return;
                }
            };
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            ready_tx.send(Ok(())).unwrap();
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::SeqCst) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(answer) = nxdomain(&buf[..n]) {
                    let _ = sock.send_to(&answer, from);
                }
            }
        });
        ready_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("DNS stub on 127.0.0.1:53 in {ns}: {e}"));
        DnsStub {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The NXDOMAIN answer to a one-question `query`; None if it is not one.
fn nxdomain(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: the name's labels up to the root, then QTYPE and QCLASS.
    let mut i = 12;
    while *query.get(i)? != 0 {
        i += 1 + query[i] as usize;
    }
    let end = i + 1 + 4;
    let mut a = query.get(..end)?.to_vec();
    a[2] = 0x80 | (query[2] & 0x01); // QR, opcode QUERY, RD as asked
    a[3] = 0x80 | 3; // RA, RCODE NXDOMAIN
    a[6..12].fill(0); // no answer, authority or additional records
    Some(a)
}

/// A path segment, percent-encoded (RFC 3986 §2.3: only unreserved characters stay).
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The joined members of `room`, as `token`'s user sees them.
pub fn joined(m: &Matrix, token: &str, room: &str) -> Vec<String> {
    let (st, v) = m.req(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/joined_members", seg(room)),
        Some(token),
        None,
    );
    assert_eq!(st, 200, "{v}");
    v["joined"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// `owner` (a client of one host, with `owner_token`) makes a private room named `name` and
/// invites `guest_id` of the other host; the invite crosses over federation, the guest (a
/// client of their host, `guest_token`) joins, and the owner's server sees them joined.
/// The room's ID.
pub fn invite_and_join(
    (owner, owner_token): (&Matrix, &str),
    (guest, guest_token, guest_id): (&Matrix, &str, &str),
    name: &str,
    within: Duration,
) -> String {
    let (st, v) = owner.req(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(owner_token),
        Some(serde_json::json!({"preset": "private_chat", "name": name, "invite": [guest_id]})),
    );
    assert_eq!(st, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_string();
    super::wait_until(&format!("{guest_id}'s invite to arrive"), within, || {
        let (st, v) = guest.req(
            "GET",
            "/_matrix/client/v3/sync?timeout=0",
            Some(guest_token),
            None,
        );
        st == 200 && v["rooms"]["invite"].get(&room).is_some()
    });
    let (st, v) = guest.req(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", seg(&room)),
        Some(guest_token),
        Some(serde_json::json!({})),
    );
    assert_eq!(st, 200, "{guest_id} joining {room}: {v}");
    super::wait_until(
        &format!("the room's server to see {guest_id} joined"),
        within,
        || {
            joined(owner, owner_token, &room)
                .iter()
                .any(|u| u == guest_id)
        },
    );
    room
}
