//! A real ACME server for tests: Debian's pebble, with pebble-challtestsrv as its DNS (every
//! name resolves to 127.0.0.1). All on loopback and free ports (LAB.md §4 and its gotchas).

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        let deadline = Instant::now() + Duration::from_secs(20);
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
