//! Calls: coturn under the supervisor, wired to Synapse. Credentials come from Synapse through
//! the front door and make a real TURN allocation with coturn's own client.

// This test process drives turnutils, curl and the binary from outside: std's process API.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Lab, proc_uid, require, require_appliance, wait_until};
use serde_json::json;

fn uclient(lab: &Lab, user: &str, password: &str, peer_port: u16) -> (bool, String) {
    let out = Command::new("turnutils_uclient")
        .args(["-u", user, "-w", password, "-p", &lab.turn_port.to_string()])
        .args([
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-n",
            "10",
            "-m",
            "1",
            "-c",
        ])
        .arg("127.0.0.1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let received = tot_recv_msgs(&text);
    (received > 0, text)
}

#[test]
fn synapse_credentials_make_a_real_turn_allocation_and_coturn_is_supervised() {
    if !require_appliance()
        || !require(
            "coturn",
            std::path::Path::new("/usr/bin/turnutils_uclient").exists(),
            "apt-get install coturn (packaging/install-deps does)",
        )
    {
        return;
    }
    let lab = Lab::new("turn");
    // The test's loopback peer needs an exception to the denied ranges; the default has none.
    *lab.turn_extra.borrow_mut() = "allowed_peer_ips = [\"127.0.0.1\"]\n".into();
    lab.write_config("[tls]\nmode = \"internal\"\n");
    let _run = lab.start();
    let st = lab.status();
    let coturn = st["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "coturn")
        .cloned()
        .expect("a coturn child");
    assert_eq!(coturn["state"], "running", "{coturn}");
    assert_eq!(coturn["user"], "turnserver");
    let pid = coturn["pid"].as_i64().unwrap() as i32;
    let turn_uid = nix::unistd::User::from_name("turnserver")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    assert_eq!(proc_uid(pid), turn_uid);
    // coturn listens on the two advertised ports only: no RFC 5780 alternates at port+1
    // (3479, 5350 on a real box), which would take ports nobody opened or expects.
    let ss = std::process::Command::new("ss")
        .args(["-H", "-lntup"])
        .output()
        .unwrap();
    let mut ports: Vec<u16> = String::from_utf8_lossy(&ss.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(4)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(
        ports,
        [lab.turn_port, lab.turn_tls_port],
        "{}",
        String::from_utf8_lossy(&ss.stdout)
    );
    assert!(
        st["turn_uris"].to_string().contains(&format!(
            "turns:turn.matrix.test:{}?transport=tcp",
            lab.turn_tls_port
        )),
        "{st}"
    );

    // TURN credentials from Synapse, fetched through the front door as a client would.
    let pw = lab.path("alice.pw");
    std::fs::write(&pw, "alice-password-1\n").unwrap();
    lab.ok(&[
        "user",
        "add",
        "alice",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    let base = lab.https_base();
    let ca = lab.ca_root();
    let out = lab
        .curl()
        .args(["-H", "Content-Type: application/json", "--cacert"])
        .arg(&ca)
        .arg("--data")
        .arg(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "alice-password-1"}).to_string())
        .arg(format!("{base}/_matrix/client/v3/login"))
        .output()
        .unwrap();
    let login: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = login["access_token"].as_str().unwrap();
    let out = lab
        .curl()
        .args(["-H", &format!("Authorization: Bearer {token}"), "--cacert"])
        .arg(&ca)
        .arg(format!("{base}/_matrix/client/v3/voip/turnServer"))
        .output()
        .unwrap();
    let creds: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
    let (user, password) = (
        creds["username"].as_str().unwrap(),
        creds["password"].as_str().unwrap(),
    );
    assert_eq!(creds["ttl"], 86400, "{creds}");
    assert_eq!(creds["uris"].as_array().unwrap().len(), 3, "{creds}");

    // A UDP echo peer on loopback, relayed to through coturn.
    let peer_port = common::free_port();
    let mut peer = udp_echo_peer(peer_port);
    let (ok, text) = uclient(&lab, user, password, peer_port);
    assert!(ok, "no data relayed with Synapse's credentials:\n{text}");
    let (ok, text) = uclient(&lab, user, "not-the-password", peer_port);
    assert!(!ok, "wrong credentials were relayed:\n{text}");
    let _ = peer.kill();
    let _ = peer.wait();

    // A killed coturn is restarted by the supervisor.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("coturn to be restarted", Duration::from_secs(30), || {
        let st = lab.status();
        let c = st["children"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "coturn")
            .cloned()
            .unwrap();
        c["state"] == "running"
            && c["pid"].as_i64() != Some(pid as i64)
            && c["restarts"].as_u64() >= Some(1)
    });
}

#[test]
fn relaying_into_denied_ranges_is_refused() {
    if !require_appliance()
        || !require(
            "coturn",
            std::path::Path::new("/usr/bin/turnutils_uclient").exists(),
            "apt-get install coturn (packaging/install-deps does)",
        )
    {
        return;
    }
    // The default config: loopback (like every private range) is denied. Only loopback is
    // used as the target here: were the denial broken, no packet leaves this host.
    let lab = Lab::new("turndeny");
    // external_ip = "auto" asks a real STUN server (coturn in STUN-only mode) for our address.
    let stun_port = common::free_port();
    let mut stun = Command::new("turnserver")
        .args([
            "-n",
            "--stun-only",
            "--no-cli",
            "--listening-ip",
            "127.0.0.1",
            "--listening-port",
            &stun_port.to_string(),
        ])
        .args(["--log-file", "stdout"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ready once it answers a Binding request.
    let rt = tokio::runtime::Runtime::new().unwrap();
    wait_until("the STUN server to answer", Duration::from_secs(15), || {
        rt.block_on(homelab_matrix::stun::binding(
            &format!("127.0.0.1:{stun_port}"),
            Duration::from_secs(1),
        ))
        .is_ok()
    });
    *lab.turn_extra.borrow_mut() = format!("stun_server = \"127.0.0.1:{stun_port}\"\n");
    lab.write_config("[tls]\nmode = \"internal\"\n");
    let run = lab.start();
    let _ = stun.kill();
    let _ = stun.wait();
    // Seen from the STUN server we are 127.0.0.1, our own address: no NAT, no external-ip.
    assert!(
        run.log_text().contains("public address from STUN"),
        "{}",
        run.log_text()
            .lines()
            .filter(|l| l.contains("STUN") || l.contains("public address") || l.contains("ready"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let conf = std::fs::read_to_string(lab.state().join("coturn/turnserver.conf")).unwrap();
    assert!(!conf.contains("external-ip"), "{conf}");
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let (user, password) = rest_credentials(&lab, expiry);
    let peer_port = common::free_port();
    let mut peer = udp_echo_peer(peer_port);
    let (ok, text) = uclient(&lab, &user, &password, peer_port);
    let _ = peer.kill();
    let _ = peer.wait();
    assert!(!ok, "coturn relayed to a loopback peer:\n{text}");
    assert!(
        text.contains("403") || text.to_lowercase().contains("forbidden"),
        "not refused by coturn:\n{text}"
    );
}

/// The issuer of the certificate coturn presents on its TLS port.
fn turn_tls_issuer(lab: &Lab) -> String {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "openssl s_client -connect 127.0.0.1:{} -servername turn.matrix.test </dev/null 2>/dev/null | openssl x509 -noout -issuer",
                lab.turn_tls_port
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_new_turn_certificate_reaches_coturn_without_a_restart_or_a_dropped_allocation() {
    if !require_appliance()
        || !require(
            "coturn",
            std::path::Path::new("/usr/bin/turnutils_uclient").exists(),
            "apt-get install coturn (packaging/install-deps does)",
        )
    {
        return;
    }
    let lab = Lab::new("turncert");
    let files = lab.path("tls");
    let names: Vec<String> = [
        "matrix.test",
        "matrix.matrix.test",
        "element.matrix.test",
        "turn.matrix.test",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let write_certs = |tag: &str| {
        let ca = common::TestCa::new(&format!("operator CA {tag}"));
        for n in &names {
            let (cert, key) = ca.leaf(std::slice::from_ref(n));
            let d = files.join(n);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("fullchain.pem"), cert).unwrap();
            std::fs::write(d.join("privkey.pem"), key).unwrap();
        }
    };
    write_certs("one");
    *lab.turn_extra.borrow_mut() = "allowed_peer_ips = [\"127.0.0.1\"]\n".into();
    lab.write_config(&format!(
        "[tls]\nmode = \"files\"\nfiles_dir = \"{}\"\n",
        files.display()
    ));
    let run = lab.start();
    let coturn_pid = || {
        lab.status()["children"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "coturn")
            .unwrap()["pid"]
            .as_i64()
    };
    let pid = coturn_pid();
    assert!(
        turn_tls_issuer(&lab).contains("operator CA one"),
        "{}",
        turn_tls_issuer(&lab)
    );

    // An allocation relaying throughout the reload (about 10 s of packets every 20 ms).
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let (user, password) = rest_credentials(&lab, expiry);
    let peer_port = common::free_port();
    let mut peer = udp_echo_peer(peer_port);
    let client = Command::new("turnutils_uclient")
        .args([
            "-u",
            &user,
            "-w",
            &password,
            "-p",
            &lab.turn_port.to_string(),
        ])
        .args([
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-n",
            "500",
            "-z",
            "20",
            "-m",
            "1",
            "-c",
            "127.0.0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));

    write_certs("two");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    while !turn_tls_issuer(&lab).contains("operator CA two") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "coturn does not present the new certificate ({}):\n{}",
            turn_tls_issuer(&lab),
            run.log_text()
                .lines()
                .filter(|l| !l.contains("child=coturn") && !l.contains("child=synapse"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        coturn_pid(),
        pid,
        "coturn was restarted instead of reloading"
    );

    let out = client.wait_with_output().unwrap();
    let _ = peer.kill();
    let _ = peer.wait();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // About 10 s of packets, the reload 2 s in: at most about 120 can arrive before it, so 300
    // or more means the allocation went on relaying after it. (A brief stall while coturn
    // rebuilds its TLS contexts on a loaded machine is allowed; losing the allocation is not.)
    let received = tot_recv_msgs(&text);
    assert!(
        received >= 300,
        "the allocation did not survive the reload ({received}/500 relayed):\n{text}"
    );
}

/// coturn's UDP echo peer on 127.0.0.1:`port`, given a moment to bind.
fn udp_echo_peer(port: u16) -> std::process::Child {
    let peer = Command::new("turnutils_peer")
        .args(["-p", &port.to_string(), "-L", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    peer
}

/// Blackhole routes for the duration of a test: should coturn's denial ever fail, packets to
/// these addresses are dropped on this host instead of leaving it.
struct Blackholes(Vec<&'static str>);

impl Blackholes {
    fn new(addrs: Vec<&'static str>) -> Blackholes {
        for a in &addrs {
            let _ = Command::new("ip")
                .args(["route", "del", "blackhole", a])
                .output();
            let out = Command::new("ip")
                .args(["route", "add", "blackhole", a])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip route add blackhole {a}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Blackholes(addrs)
    }
}

impl Drop for Blackholes {
    fn drop(&mut self) {
        for a in &self.0 {
            let _ = Command::new("ip")
                .args(["route", "del", "blackhole", a])
                .output();
        }
    }
}

/// TURN REST credentials (Synapse docs/turn-howto.md): "<expiry>:<user>" and
/// base64(HMAC-SHA1(secret, username)).
fn rest_credentials(lab: &Lab, expiry: u64) -> (String, String) {
    let secret = std::fs::read_to_string(lab.state().join("secrets/turn_shared_secret")).unwrap();
    let user = format!("{expiry}:@alice:matrix.test");
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "printf '%s' '{user}' | openssl dgst -binary -sha1 -hmac '{}' | base64",
                secret.trim()
            ),
        ])
        .output()
        .unwrap();
    (
        user,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

#[test]
fn expired_credentials_and_private_or_metadata_peers_are_refused() {
    if !require_appliance()
        || !require(
            "coturn",
            std::path::Path::new("/usr/bin/turnutils_uclient").exists(),
            "apt-get install coturn (packaging/install-deps does)",
        )
        || !require("root", common::is_root(), "blackhole routes need root")
    {
        return;
    }
    let _guard = Blackholes::new(vec!["10.0.0.1", "169.254.169.254"]);
    let lab = Lab::new("turnpeers");
    let _run = lab.start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    // Expired: a correctly signed username whose time has passed. (The same helper's valid
    // credentials get as far as coturn's peer check below, so this refusal is the expiry.)
    let (user, password) = rest_credentials(&lab, now - 60);
    let (ok, text) = uclient(&lab, &user, &password, 3480);
    assert!(!ok, "expired credentials were accepted:\n{text}");
    assert!(
        text.contains("401")
            || text.to_lowercase().contains("unauthorized")
            || text.contains("Cannot complete Allocation"),
        "{text}"
    );

    // Valid credentials, denied peers: a private address and the cloud metadata address.
    let (user, password) = rest_credentials(&lab, now + 3600);
    for peer in ["10.0.0.1", "169.254.169.254"] {
        let out = Command::new("turnutils_uclient")
            .args([
                "-u",
                &user,
                "-w",
                &password,
                "-p",
                &lab.turn_port.to_string(),
            ])
            .args([
                "-e",
                peer,
                "-r",
                "3480",
                "-n",
                "3",
                "-m",
                "1",
                "-c",
                "127.0.0.1",
            ])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("403") || text.to_lowercase().contains("forbidden"),
            "relaying to {peer} was not refused:\n{text}"
        );
    }
}

/// What `turnutils_uclient` reports as received. Progress lines come first and the summary
/// line has the totals: take the largest.
fn tot_recv_msgs(text: &str) -> u32 {
    text.lines()
        .filter_map(|l| l.split("tot_recv_msgs=").nth(1))
        .filter_map(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u32>()
                .ok()
        })
        .max()
        .unwrap_or(0)
}
