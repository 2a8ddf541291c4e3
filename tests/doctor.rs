//! `homelab-matrix doctor` against a real appliance (Synapse, PostgreSQL, coturn, the front
//! door): a correct one passes every check that can pass on this machine (what needs the
//! internet says "no internet" as a warning), and each broken setup is caught by its check,
//! with the fix.

// This test process drives the binary from outside: std's process API is right here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::process::Output;

use common::twohost::TwoHost;
use common::{Lab, require_appliance};
use serde_json::Value;

/// `doctor` with the lab's names resolved to 127.0.0.1 (the lab has no DNS), plus `overrides`
/// (NAME=ADDR, applied after, so they win).
fn doctor(lab: &Lab, args: &[&str], overrides: &[&str]) -> (Option<i32>, String) {
    let mut all: Vec<String> = vec!["doctor".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let names = [
        lab.server_name.clone(),
        lab.matrix_host(),
        format!("element.{}", lab.server_name),
        format!("turn.{}", lab.server_name),
    ];
    for n in names {
        let over = overrides.iter().find(|o| o.starts_with(&format!("{n}=")));
        all.push("--resolve".into());
        all.push(over.map_or(format!("{n}=127.0.0.1"), |o| o.to_string()));
    }
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out: Output = lab.run_cmd(&refs);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &*String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// The report line of check `name` (its mark and what was seen) and the fix line after it.
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    let start = text
        .lines()
        .position(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{text}"));
    let begin = text.lines().take(start).map(|l| l.len() + 1).sum::<usize>();
    let mut end = begin + text.lines().nth(start).unwrap().len();
    if let Some(next) = text.lines().nth(start + 1)
        && next.trim_start().starts_with("fix:")
    {
        end += 1 + next.len();
    }
    &text[begin..end]
}

/// A full doctor run against another database `<lab db>_<suffix>` of the lab's role, made
/// with `locale` (e.g. "LC_COLLATE 'C' LC_CTYPE 'C'") and then `setup` run in it; the config
/// and the database are put back after.
fn postgres_check_on(
    lab: &Lab,
    suffix: &str,
    locale: &str,
    setup: Option<&str>,
) -> (Option<i32>, String) {
    let other = format!("{}_{suffix}", lab.db);
    common::psql(&format!(
        "CREATE DATABASE \"{other}\" OWNER \"{}\" ENCODING 'UTF8' {locale} TEMPLATE template0",
        lab.db
    ));
    if let Some(sql) = setup {
        common::psql_in(&other, sql);
    }
    let good = fs::read_to_string(&lab.config).unwrap();
    fs::write(
        &lab.config,
        good.replace(
            &format!("database = \"{}\"", lab.db),
            &format!("database = \"{other}\""),
        ),
    )
    .unwrap();
    let got = doctor(lab, &[], &[]);
    fs::write(&lab.config, &good).unwrap();
    common::psql(&format!("DROP DATABASE \"{other}\""));
    got
}

/// The checks a report shows as failed (❌), in report order.
fn failed(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("❌"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect()
}

fn assert_mark(text: &str, name: &str, mark: &str) {
    let l = line(text, name);
    assert!(
        l.starts_with(mark),
        "{name}: expected {mark}, got:\n{l}\n\nfull report:\n{text}"
    );
}

#[test]
fn a_correct_appliance_passes_and_each_break_is_caught_with_its_fix() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("doctor");
    // The test peer of turn-relay is this host, on loopback: coturn denies that unless allowed.
    *lab.turn_extra.borrow_mut() = "allowed_peer_ips = [\"127.0.0.1\"]\n".into();
    lab.write_config("[tls]\nmode = \"internal\"\n");
    let _run = lab.start();

    let (code, text) = doctor(&lab, &[], &[]);
    eprintln!("{text}");
    for n in [
        "matrix.test",
        "matrix.matrix.test",
        "element.matrix.test",
        "turn.matrix.test",
    ] {
        assert_mark(&text, &format!("tls:{n}"), "✅");
    }
    assert!(
        line(&text, "tls:matrix.matrix.test").contains("clients must trust its root"),
        "{text}"
    );
    for name in [
        "turn-tls",
        "turn",
        "turn-relay",
        "delegation-server",
        "delegation-client",
        "federation-in",
        "synapse",
        "postgres",
    ] {
        assert_mark(&text, name, "✅");
    }
    // Free space is the shared machine's: anything but a failure.
    for name in ["disk:media", "disk:database"] {
        assert!(!line(&text, name).starts_with("❌"), "{text}");
    }
    assert!(
        line(&text, "federation-in").contains("signed by our key ed25519:"),
        "{text}"
    );
    assert!(
        line(&text, "turn").contains("allocated relay 127.0.0.1:"),
        "{text}"
    );
    assert!(
        line(&text, "turn-relay").contains("went through relay 127.0.0.1:"),
        "{text}"
    );
    assert!(line(&text, "postgres").contains("collation C"), "{text}");
    // This machine has no internet: said as such, a warning, not a failure.
    for name in [
        "federation-out",
        "clock",
        "dns:matrix.test",
        "dns:turn.matrix.test",
        "ports",
    ] {
        assert_mark(&text, name, "⚠️");
        assert!(line(&text, name).contains("no internet"), "{text}");
    }
    assert_eq!(code, Some(0), "{text}");
    // `status` shows the last full run and when it ran.
    let st = lab.ok(&["status"]);
    // The run just ended: a second may have ticked over since.
    let doctor_line = st
        .lines()
        .find(|l| l.starts_with("DOCTOR: last run "))
        .unwrap_or_else(|| panic!("no DOCTOR line: {st}"));
    let age = doctor_line["DOCTOR: last run ".len()..]
        .split_once("s ago:")
        .and_then(|(n, _)| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{doctor_line}"));
    assert!(age <= 5 && doctor_line.ends_with(" 0 failed"), "{st}");
    let summary = lab.status()["doctor"]["summary"].clone();
    assert!(summary.as_str().unwrap().ends_with("0 failed"), "{summary}");

    // --json parses and has the same checks; --only runs one family; usage errors exit 2.
    let (code, json) = doctor(&lab, &["--json", "--only", "tls"], &[]);
    assert_eq!(code, Some(0), "{json}");
    let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 4, "{json}");
    assert!(
        checks
            .iter()
            .all(|c| c["name"].as_str().unwrap().starts_with("tls:") && c["status"] == "pass"),
        "{json}"
    );
    let (code, text) = doctor(&lab, &["--only", "nonsense"], &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("delegation-server"),
        "the usage error lists the checks: {text}"
    );

    // The Matrix host resolving elsewhere: delegation points at an address with no server.
    let (code, text) = doctor(
        &lab,
        &["--only", "delegation-server"],
        &["matrix.matrix.test=127.0.0.2"],
    );
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "delegation-server");
    assert!(
        l.starts_with("❌") && l.contains("127.0.0.2") && l.contains("fix:"),
        "{text}"
    );

    // A database with the wrong collation (Synapse refuses it: docs/postgres.md).
    let (code, text) =
        postgres_check_on(&lab, "c", "LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'", None);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(failed(&text), ["postgres"], "{text}");
    let l = line(&text, "postgres");
    assert!(
        l.starts_with("❌") && l.contains("collation C.UTF-8"),
        "{text}"
    );
    assert!(l.contains("LC_COLLATE 'C'"), "the fix says how: {text}");

    // A PostgreSQL below Synapse's floor, faked: in a copy of the database, a current_setting
    // ahead of pg_catalog's on the search_path answers version 13 to the doctor's query.
    let fake = format!(
        "CREATE SCHEMA fake; GRANT USAGE ON SCHEMA fake TO \"{db}\"; \
         CREATE FUNCTION fake.current_setting(text) RETURNS text LANGUAGE sql AS \
         $$ SELECT CASE $1 WHEN 'server_version_num' THEN '130011' WHEN 'server_version' THEN '13.11' \
         ELSE pg_catalog.current_setting($1) END $$; \
         ALTER DATABASE \"{db}_old\" SET search_path = fake, pg_catalog, public",
        db = lab.db
    );
    let (code, text) = postgres_check_on(&lab, "old", "LC_COLLATE 'C' LC_CTYPE 'C'", Some(&fake));
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(failed(&text), ["postgres"], "{text}");
    let l = line(&text, "postgres");
    assert!(
        l.starts_with("❌")
            && l.contains("PostgreSQL 13.11")
            && l.contains("Synapse needs PostgreSQL 14 or newer"),
        "{text}"
    );
    assert!(l.contains("fix: upgrade PostgreSQL"), "{text}");

    // A full disk under the media store (a 2 MiB tmpfs, filled): disk:media fails, with the
    // path; the database's disk is another and stays as it was.
    let media = lab.state().join("synapse-data/media_store");
    let mount = common::TmpfsMount::new(&media, "2m");
    mount.fill("filler");
    let (code, text) = doctor(&lab, &[], &[]);
    drop(mount);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(failed(&text), ["disk:media"], "{text}");
    let l = line(&text, "disk:media");
    assert!(
        l.starts_with("❌") && l.contains("0.0 GiB free of 0.0 GiB") && l.contains("almost full"),
        "{text}"
    );
    assert!(
        l.contains(&format!(
            "fix: free space on the file system of {}",
            media.display()
        )),
        "{text}"
    );
    assert!(!line(&text, "disk:database").starts_with("❌"), "{text}");

    // Synapse not answering (stopped, so the supervisor does not restart it under us).
    let pid = lab.synapse_status()["pid"].as_i64().unwrap() as i32;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (code, text) = doctor(&lab, &["--only", "synapse"], &[]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "synapse");
    assert!(
        l.starts_with("❌") && l.contains("does not answer") && l.contains("fix:"),
        "{text}"
    );

    // The relay range blocked by a firewall: the allocation still works, the packet does not
    // come through, and turn-relay alone says to open the range.
    if common::require(
        "nft",
        std::path::Path::new("/usr/sbin/nft").exists(),
        "apt install nftables",
    ) {
        let (lo, hi) = lab.relay_ports;
        let fw = common::Firewall::new(&[format!("ip daddr 127.0.0.1 udp dport {lo}-{hi} drop")]);
        let (code, text) = doctor(&lab, &[], &[]);
        drop(fw);
        assert_eq!(code, Some(1), "{text}");
        assert_eq!(failed(&text), ["turn-relay"], "{text}");
        let l = line(&text, "turn-relay");
        assert!(
            l.starts_with("❌") && l.contains("did not come through coturn"),
            "{text}"
        );
        assert!(
            l.contains(&format!("fix: open UDP {lo}-{hi} (turn.min_port..max_port")),
            "{text}"
        );
        assert_mark(&text, "turn", "✅");
    }

    // The last full run, which the --only run below must leave in `status`.
    let summary = lab.status()["doctor"]["summary"].clone();

    // coturn with another secret than Synapse's: the relay is refused, 401.
    let conf = walk(&lab.state(), "turnserver.conf").expect("coturn's rendered config");
    let text = fs::read_to_string(&conf).unwrap();
    let secret_line = text
        .lines()
        .find(|l| l.starts_with("static-auth-secret="))
        .unwrap();
    fs::write(
        &conf,
        text.replace(secret_line, "static-auth-secret=not-synapses"),
    )
    .unwrap();
    let coturn = |st: &Value| {
        st["children"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "coturn")
            .cloned()
            .unwrap()
    };
    let old = coturn(&lab.status())["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    common::wait_until(
        "coturn restarted",
        std::time::Duration::from_secs(30),
        || {
            let c = coturn(&lab.status());
            c["state"] == "running" && c["pid"].as_i64() != Some(old as i64)
        },
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (code, text) = doctor(&lab, &["--only", "turn"], &[]);
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "turn");
    assert!(l.starts_with("❌") && l.contains("401"), "{text}");
    assert!(
        l.contains("static-auth-secret and Synapse's turn_shared_secret differ"),
        "{text}"
    );
    // --only runs are not the whole picture: `status` still shows the last full run.
    assert_eq!(lab.status()["doctor"]["summary"], summary);
}

#[test]
fn a_name_resolving_elsewhere_and_a_certificate_for_another_name_fail_with_their_fix() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("doctor-cert");
    let files = lab.path("tls");
    let ca = common::TestCa::new("operator CA");
    let (cert, key) = ca.leaf(&["other.test".to_string()]);
    let d = files.join("matrix.matrix.test");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("fullchain.pem"), cert).unwrap();
    fs::write(d.join("privkey.pem"), key).unwrap();
    // The public address known without STUN, so that DNS can be judged.
    *lab.turn_extra.borrow_mut() = "external_ip = \"127.0.0.1\"\n".into();
    lab.write_config(&format!(
        "[tls]\nmode = \"files\"\nfiles_dir = \"{}\"\n",
        files.display()
    ));
    let _run = lab.start();

    // With the public address known (and this host's own), every port answers there.
    let (code, text) = doctor(&lab, &["--only", "ports"], &[]);
    eprintln!("{text}");
    assert_eq!(code, Some(0), "{text}");
    let l = line(&text, "ports");
    assert!(l.starts_with("✅"), "{text}");
    for p in [lab.https_port, lab.federation_port, lab.turn_tls_port] {
        assert!(l.contains(&format!("{p}/tcp")), "{p}: {text}");
    }
    assert!(
        l.contains(&format!("{}/udp (TURN)", lab.turn_port)),
        "{text}"
    );

    // The federation port closed by a firewall (a TCP reset, as a host firewall's REJECT):
    // the ports check names it and says to open it.
    if common::require(
        "nft",
        std::path::Path::new("/usr/sbin/nft").exists(),
        "apt install nftables",
    ) {
        let fed = lab.federation_port;
        let fw = common::Firewall::new(&[format!(
            "ip daddr 127.0.0.1 tcp dport {fed} reject with tcp reset"
        )]);
        let (code, text) = doctor(&lab, &["--only", "ports"], &[]);
        drop(fw);
        assert_eq!(code, Some(1), "{text}");
        let l = line(&text, "ports");
        assert!(
            l.starts_with("❌")
                && l.contains(&format!("{fed}/tcp (federation): Connection refused")),
            "{text}"
        );
        assert!(
            l.contains(&format!(
                "open: {}/tcp (http), {}/tcp (https)",
                lab.http_port, lab.https_port
            )),
            "{text}"
        );
        assert!(l.contains("the local firewall open?"), "{text}");
    }

    // A name resolving elsewhere is caught by its DNS check, which says where.
    let (code, text) = doctor(&lab, &["--only", "dns"], &["element.matrix.test=127.0.0.2"]);
    eprintln!("{text}");
    assert_eq!(code, Some(1), "{text}");
    assert_mark(&text, "dns:matrix.test", "✅");
    let l = line(&text, "dns:element.matrix.test");
    assert!(
        l.starts_with("❌") && l.contains("127.0.0.2, not this host's public address 127.0.0.1"),
        "{text}"
    );
    assert!(
        l.contains("point the A record of element.matrix.test at 127.0.0.1"),
        "{text}"
    );

    let (code, text) = doctor(&lab, &["--only", "tls"], &[]);
    eprintln!("{text}");
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "tls:matrix.matrix.test");
    assert!(
        l.starts_with("❌") && l.contains("is for other.test, not matrix.matrix.test"),
        "{text}"
    );
    assert!(
        l.contains("fullchain.pem"),
        "the fix names the file: {text}"
    );
    // The names without files get the internal CA's stand-in: a warning, not a pass.
    assert_mark(&text, "tls:element.matrix.test", "⚠️");
}

fn walk(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir()
            && let Some(found) = walk(&p, name)
        {
            return Some(found);
        }
    }
    None
}

/// A web server that is not the appliance, at `ip`:`port` for `name` (certificate from the
/// lab's internal CA, so that only what it serves is wrong): openssl's s_server serving the
/// files under `files` as text/plain, without CORS headers.
struct OtherWebServer {
    child: std::process::Child,
}

/// A certificate for `name` from the lab's internal CA, in `d` (cert.pem, key.pem).
fn lab_cert(lab: &Lab, d: &std::path::Path, name: &str) {
    let ca = lab.state().join("ca");
    let sh = format!(
        "set -e; cd {d}; openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -subj /CN={name} -out req.pem 2>/dev/null; \
         printf 'subjectAltName=DNS:{name}\\n' > ext; \
         openssl x509 -req -in req.pem -CA {ca}/root.pem -CAkey {ca}/root.key -CAcreateserial -days 2 -extfile ext -out cert.pem 2>/dev/null",
        d = d.display(),
        ca = ca.display()
    );
    let st = std::process::Command::new("sh")
        .args(["-c", &sh])
        .status()
        .unwrap();
    assert!(st.success(), "making a certificate for {name}");
}

/// Writes `files` under `d`/www; returns that directory.
fn www(d: &std::path::Path, files: &[(&str, &str)]) -> std::path::PathBuf {
    let www = d.join("www");
    for (path, body) in files {
        let f = www.join(path.trim_start_matches('/'));
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(f, body).unwrap();
    }
    fs::create_dir_all(&www).unwrap();
    www
}

fn wait_listening(ip: &str, port: u16) {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    common::wait_until(
        "the web server listening",
        std::time::Duration::from_secs(10),
        || std::net::TcpStream::connect(addr).is_ok(),
    );
}

impl OtherWebServer {
    fn start(lab: &Lab, name: &str, ip: &str, port: u16, files: &[(&str, &str)]) -> OtherWebServer {
        let d = lab.path(&format!("web-{name}"));
        let www = www(&d, files);
        lab_cert(lab, &d, name);
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("{ip}:{port}"))
            .arg("-cert")
            .arg(d.join("cert.pem"))
            .arg("-key")
            .arg(d.join("key.pem"))
            .current_dir(&www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("running openssl s_server");
        wait_listening(ip, port);
        OtherWebServer { child }
    }

    /// The same, but its files served as JSON with CORS headers, as a well-made (and here
    /// hostile) well-known server does: Python's http.server over TLS.
    fn json(lab: &Lab, name: &str, ip: &str, port: u16, files: &[(&str, &str)]) -> OtherWebServer {
        let d = lab.path(&format!("json-{name}"));
        let www = www(&d, files);
        lab_cert(lab, &d, name);
        let py = format!(
            "import http.server as h, ssl\n\
             class H(h.SimpleHTTPRequestHandler):\n  \
               def end_headers(s):\n    \
                 s.send_header('Access-Control-Allow-Origin', '*'); s.send_header('Content-Type', 'application/json'); super().end_headers()\n  \
               def log_message(s, *a): pass\n\
             c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain('{d}/cert.pem', '{d}/key.pem')\n\
             s = h.ThreadingHTTPServer(('{ip}', {port}), H); s.socket = c.wrap_socket(s.socket, server_side=True)\n\
             s.serve_forever()\n",
            d = d.display()
        );
        let child = std::process::Command::new("python3")
            .args(["-c", &py])
            .current_dir(&www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("running python3's http.server");
        wait_listening(ip, port);
        OtherWebServer { child }
    }
}

impl Drop for OtherWebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn server_discovery_follows_srv_records_and_a_missing_or_corsless_well_known_fails() {
    if !require_appliance()
        || !common::require(
            "dnsmasq",
            std::path::Path::new(common::Dns::DNSMASQ).exists(),
            "apt install dnsmasq-base",
        )
    {
        return;
    }
    let lab = Lab::new("doctor-srv");
    let _run = lab.start();
    let fed = lab.federation_port;
    // The server_name's web server is elsewhere (nothing at 127.0.0.2): no well-known, so a
    // remote server looks up SRV records for the server_name (spec step 4).
    let elsewhere = ["matrix.test=127.0.0.2"];
    let run = |dns: &common::Dns, only: &str| {
        let ns = dns.addr.to_string();
        doctor(&lab, &["--only", only, "--nameserver", &ns], &elsewhere)
    };

    let dns = common::Dns::start(&[format!(
        "_matrix-fed._tcp.matrix.test,matrix.matrix.test,{fed}"
    )]);
    let (code, text) = run(&dns, "delegation-server");
    eprintln!("{text}");
    assert_eq!(code, Some(0), "{text}");
    let l = line(&text, "delegation-server");
    assert!(
        l.starts_with("✅")
            && l.contains("no well-known")
            && l.contains(&format!(
                "SRV _matrix-fed._tcp.matrix.test → matrix.matrix.test:{fed}"
            )),
        "{text}"
    );
    // federation-in fetches the keys the same way: from the SRV target, for the server_name.
    let (code, text) = run(&dns, "federation-in");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        line(&text, "federation-in")
            .contains(&format!("via matrix.matrix.test:{fed}; signed by our key")),
        "{text}"
    );
    drop(dns);

    // Only the deprecated _matrix._tcp record: followed, with a warning to rename it.
    let dns = common::Dns::start(&[format!("_matrix._tcp.matrix.test,matrix.matrix.test,{fed}")]);
    let (code, text) = run(&dns, "delegation-server");
    assert_eq!(code, Some(0), "{text}");
    let l = line(&text, "delegation-server");
    assert!(
        l.starts_with("⚠️") && l.contains("(a deprecated record)"),
        "{text}"
    );
    assert!(
        l.contains("fix: rename the SRV record to _matrix-fed._tcp.matrix.test"),
        "{text}"
    );
    drop(dns);

    // No well-known and no SRV record: the last resort, matrix.test on the federation port,
    // does not answer; delegation-server fails and says to serve the well-known.
    let dns = common::Dns::start(&[]);
    let (code, text) = run(&dns, "delegation-server");
    eprintln!("{text}");
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "delegation-server");
    assert!(
        l.starts_with("❌")
            && l.contains("no well-known")
            && l.contains("no SRV record")
            && l.contains(&format!(
                "matrix.test:{fed} (127.0.0.2) does not answer federation"
            )),
        "{text}"
    );
    assert!(
        l.contains("fix: serve {\"m.server\": ")
            && l.contains("at https://matrix.test/.well-known/matrix/server"),
        "{text}"
    );

    // The server_name's web server is another one, whose client well-known has no CORS
    // header: delegation-client fails with the header to add.
    let base = format!("https://{}:{}", lab.matrix_host(), lab.https_port);
    let _web = OtherWebServer::start(
        &lab,
        "matrix.test",
        "127.0.0.2",
        lab.https_port,
        &[(
            ".well-known/matrix/client",
            &format!("{{\"m.homeserver\": {{\"base_url\": \"{base}\"}}}}"),
        )],
    );
    let (code, text) = run(&dns, "delegation-client");
    eprintln!("{text}");
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "delegation-client");
    assert!(
        l.starts_with("❌") && l.contains("has no CORS header"),
        "{text}"
    );
    assert!(l.contains("with Access-Control-Allow-Origin: *"), "{text}");
}

/// Issue #24 item 7: a well-known is someone else's word. One naming loopback (a client
/// base_url over plain http with a path and fragment of its choosing, then an https one at a
/// loopback address; an m.server at a loopback address and port) gets a failed check naming
/// the fix, and no connection reaches the port it named.
#[test]
fn a_hostile_well_known_does_not_send_the_doctor_to_loopback() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("doctor-ssrf");
    let _run = lab.start();
    // What the well-known wants the doctor to knock on: a port on loopback nothing of ours
    // listens on, recording whoever connects.
    let trap = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let port = trap.local_addr().unwrap().port();
    let knocked = || match trap.accept() {
        Ok((_, from)) => Some(from),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("{e}"),
    };
    let elsewhere = ["matrix.test=127.0.0.2"];
    for (base, refused) in [
        (
            format!("http://127.0.0.3:{port}/_synapse/admin/v1/steal?x=1#"),
            "is not an https:// URL",
        ),
        (
            format!("https://127.0.0.3:{port}/"),
            "127.0.0.3 is not a public address",
        ),
    ] {
        let web = OtherWebServer::json(
            &lab,
            "matrix.test",
            "127.0.0.2",
            lab.https_port,
            &[
                (
                    ".well-known/matrix/client",
                    &format!("{{\"m.homeserver\": {{\"base_url\": \"{base}\"}}}}"),
                ),
                (
                    ".well-known/matrix/server",
                    &format!("{{\"m.server\": \"127.0.0.3:{port}\"}}"),
                ),
            ],
        );
        let run = |only: &str| {
            let (code, text) = doctor(&lab, &["--only", only], &elsewhere);
            eprintln!("{text}");
            assert_eq!(code, Some(1), "{text}");
            line(&text, only).to_string()
        };
        let l = run("delegation-client");
        assert!(
            l.starts_with("❌") && l.contains(refused) && l.contains("fix: serve "),
            "{l}"
        );
        for check in ["delegation-server", "federation-in"] {
            let l = run(check);
            assert!(
                l.starts_with("❌")
                    && l.contains(&format!("127.0.0.3:{port}"))
                    && l.contains("not a public address"),
                "{l}"
            );
        }
        drop(web);
        assert_eq!(knocked(), None, "the doctor connected to the trap");
    }
    // The trap records: the same connection from here is seen.
    let _probe = std::net::TcpStream::connect(("127.0.0.3", port)).unwrap();
    common::wait_until(
        "the trap sees a connection",
        std::time::Duration::from_secs(5),
        || knocked().is_some(),
    );
}

/// A's doctor, run on B: its config and state (shared by the file system), B's network.
fn doctor_from(pair: &TwoHost, args: &[&str]) -> (Option<i32>, String) {
    let out = pair
        .b
        .exec(common::bin())
        .arg("--config")
        .arg(&pair.a.lab.config)
        .arg("doctor")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running homelab-matrix doctor");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &*String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn from_another_host_the_ports_and_inbound_federation_are_seen_and_outbound_reaches_it() {
    if !require_appliance()
        || !common::require(
            "nft",
            std::path::Path::new("/usr/sbin/nft").exists(),
            "apt install nftables",
        )
    {
        return;
    }
    let mut pair = TwoHost::new("doctor2");
    // A's public address is its address on the link (TURN itself stays off in the pair).
    let a_ip = pair.a.ip.clone();
    pair.a
        .lab
        .turn_extra
        .replace(format!("enabled = false\nexternal_ip = \"{a_ip}\"\n"));
    pair.start();

    // From B: A's names resolve to A, its ports answer, and a remote server's path to A's keys
    // (discovery, TLS, signature) works.
    let (code, text) = doctor_from(&pair, &["--outside", "--only", "dns"]);
    eprintln!("{text}");
    assert_eq!(code, Some(0), "{text}");
    assert_mark(&text, "dns:a.test", "✅");
    let (code, text) = doctor_from(&pair, &["--outside", "--only", "ports"]);
    eprintln!("{text}");
    assert_eq!(code, Some(0), "{text}");
    let l = line(&text, "ports");
    assert!(
        l.starts_with("✅")
            && l.contains("80/tcp (http), 443/tcp (https), 8448/tcp (federation)")
            && l.contains("seen from another network"),
        "{text}"
    );
    let (code, text) = doctor_from(&pair, &["--only", "federation-in"]);
    eprintln!("{text}");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        line(&text, "federation-in")
            .contains("https://matrix.a.test/_matrix/key/v2/server via matrix.a.test:443; signed by our key ed25519:"),
        "{text}"
    );

    // On A, the outbound check pointed at B: A's Synapse fetches B's keys over federation.
    let out = pair
        .a
        .cli(&["doctor", "--only", "federation-out", "--remote", "b.test"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    let l = line(&text, "federation-out");
    assert!(
        l.starts_with("✅") && l.contains("Synapse fetched b.test's keys (ed25519:"),
        "{text}"
    );

    // 8448 closed by A's firewall: B sees it, and with --outside that is a failure, not a
    // router's missing loopback.
    let fw = common::Firewall::new_in(
        Some(&pair.a.ns),
        &["tcp dport 8448 reject with tcp reset".to_string()],
    );
    let (code, text) = doctor_from(&pair, &["--outside", "--only", "ports"]);
    drop(fw);
    eprintln!("{text}");
    assert_eq!(code, Some(1), "{text}");
    let l = line(&text, "ports");
    assert!(
        l.starts_with("❌")
            && l.contains("8448/tcp (federation): Connection refused")
            && l.contains("open: 80/tcp (http), 443/tcp (https)"),
        "{text}"
    );
    assert!(
        l.contains("fix: open these ports to the internet"),
        "{text}"
    );
}
