//! PostgreSQL on a server of its own (issue #26 item 4): a second, private PostgreSQL this test
//! starts, which takes only verified TLS logins over TCP (`hostnossl ... reject`), like a
//! database box on the LAN. The appliance provisions nothing on this host's PostgreSQL then:
//! either a superuser login provisions once (`provision-db --superuser-dsn`), or the role and
//! database were made by the server's administrator (`password_file`).

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::{Lab, TestCa, psql, require_appliance};
use serde_json::Value;

/// A PostgreSQL server of the test's own, on a free port and a socket in its directory.
struct ExternalPg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl ExternalPg {
    /// initdb (the default locale C.UTF-8, as on Debian), a server certificate for
    /// `localhost` signed by `ca`, TLS only over TCP.
    fn start(ca: &TestCa) -> ExternalPg {
        let version = fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .expect("a PostgreSQL version in /usr/lib/postgresql");
        let bin = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        let dir = tempfile::Builder::new()
            .prefix("hm-extpg-")
            .tempdir()
            .unwrap();
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        nix::unistd::chown(dir.path(), Some(pg.uid), Some(pg.gid)).unwrap();
        let data = dir.path().join("data");
        let st = common::as_user("postgres", bin.join("initdb").to_str().unwrap())
            .args([
                "--no-instructions",
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
            ])
            .args(["--auth-local=peer", "--auth-host=reject"])
            .args(["--encoding=UTF8", "--locale=C.UTF-8"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "initdb failed");
        let (cert, key) = ca.leaf(&["localhost".to_string(), "127.0.0.1".to_string()]);
        for (name, body) in [("server.crt", cert), ("server.key", key)] {
            let p = data.join(name);
            fs::write(&p, body).unwrap();
            nix::unistd::chown(&p, Some(pg.uid), Some(pg.gid)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let port = common::free_port();
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        write!(
            conf,
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nmax_connections = 60\n",
            dir.path().display()
        )
        .unwrap();
        fs::write(
            data.join("pg_hba.conf"),
            "local all postgres peer\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let ext = ExternalPg { dir, bin, port };
        let st = common::as_user("postgres", ext.bin.join("pg_ctl").to_str().unwrap())
            .args(["-D", data.to_str().unwrap(), "-l"])
            .arg(ext.dir.path().join("log"))
            .args(["-w", "-s", "start"])
            .current_dir(ext.dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "pg_ctl start failed: {}", ext.log());
        ext
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// psql as this server's superuser over its socket; trimmed stdout.
    fn psql(&self, db: &str, sql: &str) -> String {
        let out = common::as_user("postgres", "psql")
            .current_dir(self.dir.path())
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// psql over TCP the way a client on the LAN connects: `sslmode` as given.
    fn psql_tcp(&self, conninfo: &str, password: &str, sql: &str) -> Output {
        Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!("host=localhost port={} {conninfo}", self.port))
            .args(["-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    }

    /// Synapse's sessions: (over TLS, in plain text).
    fn sessions_of(&self, role: &str) -> (i64, i64) {
        let row = self.psql(
            "postgres",
            &format!(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = '{role}'"
            ),
        );
        let (a, b) = row.split_once('|').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    }
}

impl Drop for ExternalPg {
    fn drop(&mut self) {
        let _ = common::as_user("postgres", self.bin.join("pg_ctl").to_str().unwrap())
            .args(["-D", self.dir.path().join("data").to_str().unwrap()])
            .args(["-m", "immediate", "-s", "stop"])
            .current_dir(self.dir.path())
            .status();
    }
}

fn fails(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{what} must fail: {text}");
    text
}

/// The lab's `[postgres]` keys for the external server; the CA lives in the lab (0644).
fn point_at(lab: &Lab, ext: &ExternalPg, ca_pem: &str, extra: &str) {
    let ca = lab.path("pg-ca.pem");
    fs::write(&ca, ca_pem).unwrap();
    fs::set_permissions(&ca, fs::Permissions::from_mode(0o644)).unwrap();
    *lab.postgres_extra.borrow_mut() = format!(
        "host = \"localhost\"\nport = {}\ntls = \"verify\"\nca_file = \"{}\"\nprovision = false\n{extra}",
        ext.port,
        ca.display()
    );
    lab.write_config("[tls]\nmode = \"internal\"\n");
}

fn doctor_postgres(lab: &Lab) -> Vec<Value> {
    let out = lab.run_cmd(&["doctor", "--json", "--only", "postgres"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("doctor: {}", String::from_utf8_lossy(&out.stdout)));
    v["checks"].as_array().unwrap().clone()
}

fn check<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

#[test]
fn provisioned_once_by_a_superuser_login_then_run_restored_and_verified_over_tls() {
    if !require_appliance() {
        return;
    }
    let ca = TestCa::new("LAN database CA");
    let ext = ExternalPg::start(&ca);
    ext.psql(
        "postgres",
        "CREATE ROLE dbadmin SUPERUSER LOGIN PASSWORD 'dbadmin-pw'",
    );
    // The server itself refuses plain text, so every login below that works was TLS.
    let plain = fails(
        ext.psql_tcp(
            "user=dbadmin dbname=postgres sslmode=disable",
            "dbadmin-pw",
            "SELECT 1",
        ),
        "a plain-text login",
    );
    assert!(plain.contains("no encryption"), "{plain}");

    let lab = Lab::new("extpg");
    point_at(&lab, &ext, &ca.pem, "");
    lab.ok(&["check-config"]);
    // Nothing there yet, and provision = false creates nothing: the error says what to ask for.
    let nothing = fails(
        lab.run_cmd(&["provision-db"]),
        "provision-db on an empty server",
    );
    assert!(nothing.contains("provision = false"), "{nothing}");
    assert!(nothing.contains("TLS verified"), "{nothing}");

    // Once, with the administrator's login; its password from PGPASSWORD, not the command line.
    let dsn = format!(
        "host=localhost port={} user=dbadmin dbname=postgres",
        ext.port
    );
    let out = lab
        .cmd(&["provision-db", "--superuser-dsn", &dsn])
        .env("PGPASSWORD", "dbadmin-pw")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("created the role") && said.contains("created the database"),
        "{said}"
    );
    assert_eq!(
        ext.psql(
            "postgres",
            &format!(
                "SELECT pg_encoding_to_char(encoding), datcollate, datctype, pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{}'",
                lab.db
            )
        ),
        format!("UTF8|C|C|{}", lab.db)
    );
    let second = lab.ok(&["provision-db"]);
    assert!(second.contains("made elsewhere are usable"), "{second}");
    // This host's PostgreSQL got nothing.
    assert_eq!(
        psql(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{}'",
            lab.db
        )),
        "0"
    );

    let run = lab.start();
    let pw = lab.add_user("alice", false);
    lab.front_matrix().login("alice", &pw);
    assert!(
        ext.psql(
            &lab.db,
            "SELECT count(*) FROM users WHERE name = '@alice:matrix.test'"
        ) == "1"
    );
    let (tls, plain) = ext.sessions_of(&lab.db);
    assert!(
        tls >= 1 && plain == 0,
        "Synapse's sessions: {tls} TLS, {plain} plain"
    );
    let checks = doctor_postgres(&lab);
    assert_eq!(check(&checks, "postgres")["status"], "pass", "{checks:?}");
    let latency = check(&checks, "postgres:latency");
    assert_eq!(latency["status"], "pass", "{checks:?}");
    assert!(
        latency["seen"].as_str().unwrap().contains("TLS verified"),
        "{latency}"
    );

    // A backup over the same TLS; verify reads the dump through (no scratch database here).
    fs::create_dir_all(lab.path("backups")).unwrap();
    let made = lab.ok(&["backup", "--to", lab.path("backups").to_str().unwrap()]);
    let file = fs::read_dir(lab.path("backups"))
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| p.extension().is_some_and(|e| e == "tar"))
        .unwrap_or_else(|| panic!("no backup file: {made}"));
    let verified = lab.ok(&["backup", "verify", file.to_str().unwrap()]);
    assert!(verified.contains("not test-restored"), "{verified}");
    drop(run);

    // The database is not empty: a restore may not drop it, and says how to empty it.
    let refused = fails(
        lab.run_cmd(&["restore", file.to_str().unwrap(), "--force"]),
        "a restore into the full database",
    );
    assert!(refused.contains("DROP OWNED BY CURRENT_USER"), "{refused}");
    assert_ne!(ext.psql(&lab.db, "SELECT count(*) FROM users"), "0");
    // The fix it names, as the role, over verified TLS.
    let secret = fs::read_to_string(lab.state().join("secrets/postgres_password")).unwrap();
    let conn = format!(
        "dbname={db} user={db} sslmode=verify-full sslrootcert={}",
        lab.path("pg-ca.pem").display(),
        db = lab.db
    );
    let emptied = ext.psql_tcp(&conn, secret.trim(), "DROP OWNED BY CURRENT_USER");
    assert!(
        emptied.status.success(),
        "{}",
        String::from_utf8_lossy(&emptied.stderr)
    );
    let restored = lab.ok(&["restore", file.to_str().unwrap()]);
    eprintln!("restore: {restored}");
    assert_eq!(
        ext.psql(
            &lab.db,
            "SELECT count(*) FROM users WHERE name = '@alice:matrix.test'"
        ),
        "1"
    );
    let _run = lab.start();
    lab.front_matrix().login("alice", &pw);
}

#[test]
fn a_role_made_elsewhere_logs_in_with_its_own_password_and_a_wrong_ca_is_refused() {
    if !require_appliance() {
        return;
    }
    let ca = TestCa::new("LAN database CA");
    let ext = ExternalPg::start(&ca);
    let lab = Lab::new("extrole");
    // A password with the characters libpq's passfile escapes.
    let password = r"it's:a\pass:word";
    let pw_file = lab.path("pg.pw");
    fs::write(&pw_file, format!("{password}\n")).unwrap();
    fs::set_permissions(&pw_file, fs::Permissions::from_mode(0o600)).unwrap();
    ext.psql(
        "postgres",
        &format!(
            "CREATE ROLE {} LOGIN PASSWORD '{}'",
            lab.db,
            password.replace('\'', "''")
        ),
    );
    // The administrator's first try: Debian's default locale, which Synapse refuses.
    ext.psql(
        "postgres",
        &format!("CREATE DATABASE {db} OWNER {db}", db = lab.db),
    );
    point_at(
        &lab,
        &ext,
        &ca.pem,
        &format!("password_file = \"{}\"\n", pw_file.display()),
    );
    let wrong = fails(lab.run_cmd(&["provision-db"]), "a C.UTF-8 database");
    assert!(
        wrong.contains("collation C.UTF-8") && wrong.contains("--locale=C"),
        "{wrong}"
    );
    ext.psql("postgres", &format!("DROP DATABASE {}", lab.db));
    ext.psql(
        "postgres",
        &format!(
            "CREATE DATABASE {db} OWNER {db} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
            db = lab.db
        ),
    );
    let ok = lab.ok(&["provision-db"]);
    assert!(ok.contains("made elsewhere are usable"), "{ok}");

    // Synapse logs in with the operator's password through its passfile.
    let run = lab.start();
    let alice = lab.add_user("alice", false);
    lab.front_matrix().login("alice", &alice);
    let (tls, plain) = ext.sessions_of(&lab.db);
    assert!(
        tls >= 1 && plain == 0,
        "Synapse's sessions: {tls} TLS, {plain} plain"
    );
    drop(run);

    // A certificate the configured CA did not sign: no login, and the message says where.
    let other = TestCa::new("someone else's CA");
    point_at(
        &lab,
        &ext,
        &other.pem,
        &format!("password_file = \"{}\"\n", pw_file.display()),
    );
    let refused = fails(
        lab.run_cmd(&["provision-db"]),
        "a server the CA did not sign",
    );
    assert!(
        refused.contains("certificate") && refused.contains("TLS verified"),
        "{refused}"
    );
    // A CA file Synapse's user cannot read is a config problem, named before anything starts.
    fs::set_permissions(lab.path("pg-ca.pem"), fs::Permissions::from_mode(0o600)).unwrap();
    let unreadable = fails(lab.run_cmd(&["check-config"]), "an unreadable CA");
    assert!(unreadable.contains("postgres.ca_file"), "{unreadable}");
}
