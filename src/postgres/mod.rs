//! PostgreSQL provisioning: the role Synapse logs in as and its database, created exactly like
//! `createdb --encoding=UTF8 --locale=C --template=template0 --owner=synapse synapse`.
//!
//! Synapse refuses any other collation ("Database has incorrect collation", see Synapse's
//! docs/postgres.md, "Set up database"), and Debian clusters default to C.UTF-8, so the database
//! is always created from template0 with an explicit C locale.
//!
//! The superuser connection uses peer authentication over the unix socket, which only works for
//! the OS user of the same name. So the supervisor re-executes this binary as that user
//! (`provision-db-helper`, hidden) and talks to it over stdin/stdout; with `superuser_dsn` set,
//! provisioning runs in-process instead. Every step checks first, so a second run changes nothing.
//!
//! An external server (`provision = false`): its administrator made the role and database, so
//! nothing is created; the same checks run as the role itself (its login, the encoding and
//! collation, that it may create Synapse's tables), and fail with what to ask for.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::config::Config;
use crate::secrets::{Kind, Secret, Secrets};
pub mod clusters;
pub mod tls;

use crate::supervisor::{self, Command, RunAs};

/// What the helper is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub socket_dir: String,
    pub port: u16,
    pub superuser: String,
    pub role: String,
    pub database: String,
    pub password: String,
    /// Where Synapse connects (TCP, password): provisioning proves that login works.
    pub tcp_host: String,
    pub tcp_port: u16,
    /// The roots the TCP login's TLS is verified against; None: no TLS (`postgres.tls`).
    #[serde(default)]
    pub tls_roots: Option<String>,
}

/// What provisioning changed. All false on a second run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub role_created: bool,
    pub role_password_set: bool,
    pub role_login_granted: bool,
    pub database_created: bool,
    /// Nothing was provisioned (`provision = false`): a role and database made elsewhere passed.
    #[serde(default)]
    pub checked_only: bool,
}

impl Report {
    pub fn changed(&self) -> bool {
        self.role_created
            || self.role_password_set
            || self.role_login_granted
            || self.database_created
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = vec![];
        if self.role_created {
            parts.push("created the role");
        }
        if self.role_password_set {
            parts.push("set the role's password");
        }
        if self.role_login_granted {
            parts.push("allowed the role to log in");
        }
        if self.database_created {
            parts.push("created the database (UTF8, C locale)");
        }
        if self.checked_only {
            f.write_str("the role and database made elsewhere are usable (provision = false: nothing created)")
        } else if parts.is_empty() {
            f.write_str("role and database already in place; nothing changed")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Why provisioning failed. Every message says what to do next.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq, Eq)]
pub enum ProvisionError {
    #[error(
        "database {database:?} exists with encoding {encoding}, collation {collate} and ctype {ctype}; Synapse needs UTF8 with collation and ctype C.\n    fix: if it holds nothing yet, drop it (runuser -u postgres -- dropdb {database}) and start homelab-matrix again to recreate it; otherwise dump it (pg_dump), drop it, recreate it with `createdb --encoding=UTF8 --locale=C --template=template0 --owner={role} {database}` and restore the dump"
    )]
    WrongLocale {
        database: String,
        role: String,
        encoding: String,
        collate: String,
        ctype: String,
    },
    #[error(
        "database {database:?} belongs to {owner:?}, not to {role:?}, so Synapse could not create its tables.\n    fix: if it is Synapse's database, run: runuser -u postgres -- psql -c 'ALTER DATABASE \"{database}\" OWNER TO \"{role}\"'; otherwise set postgres.database to another name"
    )]
    WrongOwner {
        database: String,
        owner: String,
        role: String,
    },
    #[error("cannot connect to PostgreSQL as {user} ({via}): {message}\n    fix: {fix}")]
    Connect {
        user: String,
        via: String,
        message: String,
        fix: String,
    },
    #[error("PostgreSQL refused {what}: {message}\n    fix: {fix}")]
    Sql {
        what: String,
        message: String,
        fix: String,
    },
    #[error("the provisioning helper failed: {0}")]
    Helper(String),
}

impl Request {
    pub fn from_config(cfg: &Config, password: &Secret) -> Request {
        Request {
            socket_dir: cfg.postgres.socket_dir.clone(),
            port: cfg.postgres.port,
            superuser: cfg.postgres.superuser.clone(),
            role: cfg.postgres.user.clone(),
            database: cfg.postgres.database.clone(),
            password: password.expose().to_string(),
            tcp_host: cfg.postgres.host.clone(),
            tcp_port: cfg.postgres.port,
            tls_roots: cfg
                .postgres
                .tls_verify()
                .then(|| cfg.postgres.ca_path().to_string()),
        }
    }
}

/// The role's password: `postgres.password_file` when set (a role made elsewhere, or one
/// whose password the operator chose), else the generated secret.
pub fn password(cfg: &Config, secrets: &Secrets) -> anyhow::Result<Secret> {
    let file = &cfg.postgres.password_file;
    if file.is_empty() {
        return secrets.get(Kind::PostgresPassword);
    }
    crate::config::first_line(std::path::Path::new(file))
        .map(Secret::new)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "postgres.password_file {file} cannot be read or is empty; write the role's password into it on one line (chmod 600)"
            )
        })
}

/// Provisions as the config says: in-process with `superuser_dsn`, else through the helper.
pub async fn provision(cfg: &Config, password: &Secret) -> Result<Report, ProvisionError> {
    let req = Request::from_config(cfg, password);
    if !cfg.postgres.provision {
        return check_existing(&req).await;
    }
    if !cfg.postgres.superuser_dsn.is_empty() {
        let mut pg: tokio_postgres::Config = cfg
            .postgres
            .superuser_dsn
            .parse()
            .map_err(|e| ProvisionError::Helper(format!("postgres.superuser_dsn: {e}")))?;
        if pg.get_dbname().is_none() {
            pg.dbname("postgres");
        }
        // As libpq would: a DSN without its password takes PGPASSWORD (docs 34.15), so the
        // password need not sit in a config file or a command line.
        if pg.get_password().is_none()
            && let Ok(pw) = std::env::var("PGPASSWORD")
        {
            pg.password(pw);
        }
        let via = match &req.tls_roots {
            Some(_) => "postgres.superuser_dsn, TLS verified",
            None => "postgres.superuser_dsn",
        };
        return provision_with(&pg, via, req.tls_roots.as_deref(), &req).await;
    }
    run_helper(cfg, &req).await
}

async fn run_helper(cfg: &Config, req: &Request) -> Result<Report, ProvisionError> {
    let exe = std::env::current_exe()
        .map_err(|e| ProvisionError::Helper(format!("finding my own executable: {e}")))?;
    let run_as = RunAs::lookup(&cfg.postgres.superuser)
        .map_err(|e| ProvisionError::Helper(format!("{e:#}")))?;
    let mut cmd = Command::new(exe).arg("provision-db-helper");
    cmd.run_as = Some(run_as);
    let input = serde_json::to_vec(req).expect("request serializes");
    let out = supervisor::run_helper(cmd, &input, Duration::from_secs(120))
        .await
        .map_err(|e| ProvisionError::Helper(format!("{e:#}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines() {
        tracing::info!(child = "provision-db", "{line}");
    }
    match serde_json::from_slice::<Result<Report, ProvisionError>>(&out.stdout) {
        Ok(r) => r,
        Err(_) => Err(ProvisionError::Helper(format!(
            "{} and printed no result; is this binary readable and executable by the {} user? {}",
            out.exit,
            req.superuser,
            stderr.trim()
        ))),
    }
}

/// The helper's main: one JSON request on stdin, one JSON result on stdout. Exit 0 on success.
pub async fn helper_main() -> i32 {
    use std::io::Read;
    let mut input = vec![];
    let result = match std::io::stdin().read_to_end(&mut input) {
        Err(e) => Err(ProvisionError::Helper(format!("reading the request: {e}"))),
        Ok(_) => match serde_json::from_slice::<Request>(&input) {
            Err(e) => Err(ProvisionError::Helper(format!("bad request: {e}"))),
            Ok(req) => {
                let mut pg = tokio_postgres::Config::new();
                pg.host_path(&req.socket_dir)
                    .port(req.port)
                    .user(&req.superuser)
                    .dbname("postgres");
                let via = format!("unix socket in {}, peer authentication", req.socket_dir);
                provision_with(&pg, &via, None, &req).await
            }
        },
    };
    let code = i32::from(result.is_err());
    println!(
        "{}",
        serde_json::to_string(&result).expect("result serializes")
    );
    code
}

/// The provisioning steps proper, given a superuser connection config.
pub async fn provision_with(
    su: &tokio_postgres::Config,
    via: &str,
    tls_roots: Option<&str>,
    req: &Request,
) -> Result<Report, ProvisionError> {
    let client = connect(su, via, tls_roots, &req.superuser).await?;
    let mut report = Report::default();
    let sql_err = |what: &str, e: tokio_postgres::Error| ProvisionError::Sql {
        what: what.to_string(),
        message: db_message(&e),
        fix: format!(
            "check that {} is a superuser (or has CREATEROLE and CREATEDB)",
            req.superuser
        ),
    };

    let role = client
        .query_opt(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
            &[&req.role],
        )
        .await
        .map_err(|e| sql_err("reading pg_roles", e))?;
    match role {
        None => {
            // The verifier is computed here, so the password itself never reaches the server
            // (or its statement log).
            let verifier = postgres_protocol::password::scram_sha_256(req.password.as_bytes());
            client
                .batch_execute(&format!(
                    "CREATE ROLE {} LOGIN PASSWORD {}",
                    ident(&req.role),
                    literal(&verifier)
                ))
                .await
                .map_err(|e| sql_err("CREATE ROLE", e))?;
            report.role_created = true;
        }
        Some(row) => {
            if !row.get::<_, bool>(0) {
                client
                    .batch_execute(&format!("ALTER ROLE {} LOGIN", ident(&req.role)))
                    .await
                    .map_err(|e| sql_err("ALTER ROLE ... LOGIN", e))?;
                report.role_login_granted = true;
            }
        }
    }

    let db = client
        .query_opt(
            "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text, pg_get_userbyid(datdba)::text \
             FROM pg_database WHERE datname = $1",
            &[&req.database],
        )
        .await
        .map_err(|e| sql_err("reading pg_database", e))?;
    match db {
        None => {
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {} WITH OWNER {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
                    ident(&req.database),
                    ident(&req.role)
                ))
                .await
                .map_err(|e| sql_err("CREATE DATABASE", e))?;
            report.database_created = true;
        }
        Some(row) => {
            let (encoding, collate, ctype, owner): (String, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            fits_synapse(req, encoding, collate, ctype)?;
            if owner != req.role {
                return Err(ProvisionError::WrongOwner {
                    database: req.database.clone(),
                    owner,
                    role: req.role.clone(),
                });
            }
        }
    }

    // Prove the login Synapse will make. A role made earlier (by hand, or before the secret was
    // regenerated) may have another password: then set ours.
    if let Err(e) = login_as_synapse(req).await {
        if !is_auth_failure(&e) {
            return Err(tcp_error(req, &e));
        }
        let verifier = postgres_protocol::password::scram_sha_256(req.password.as_bytes());
        client
            .batch_execute(&format!(
                "ALTER ROLE {} PASSWORD {}",
                ident(&req.role),
                literal(&verifier)
            ))
            .await
            .map_err(|e| sql_err("ALTER ROLE ... PASSWORD", e))?;
        report.role_password_set = true;
        login_as_synapse(req)
            .await
            .map_err(|e| tcp_error(req, &e))?;
    }
    Ok(report)
}

async fn connect(
    cfg: &tokio_postgres::Config,
    via: &str,
    tls_roots: Option<&str>,
    user: &str,
) -> Result<Client, ProvisionError> {
    let (client, _task) = open(cfg, tls_roots)
        .await
        .map_err(|e| ProvisionError::Connect {
            user: user.to_string(),
            via: via.to_string(),
            message: error_message(&e),
            fix: "is PostgreSQL running? Check with pg_lsclusters and start it with `systemctl start postgresql` (or pg_ctlcluster <version> main start)".into(),
        })?;
    Ok(client)
}

/// Connects, with verified TLS when `tls_roots` names the roots (then a server without TLS is
/// refused), and drives the connection in a task that ends once the client is dropped.
pub async fn open(
    pg: &tokio_postgres::Config,
    tls_roots: Option<&str>,
) -> anyhow::Result<(Client, tokio::task::JoinHandle<()>)> {
    let (client, task) = match tls_roots {
        None => {
            let (client, conn) = pg.connect(NoTls).await?;
            (client, tokio::spawn(async move { drive(conn.await) }))
        }
        Some(roots) => {
            let tls = tls::Verified::from_roots(std::path::Path::new(roots))?;
            let mut pg = pg.clone();
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, conn) = pg.connect(tls).await?;
            (client, tokio::spawn(async move { drive(conn.await) }))
        }
    };
    Ok((client, task))
}

fn drive(end: Result<(), tokio_postgres::Error>) {
    if let Err(e) = end {
        tracing::debug!("PostgreSQL connection closed: {e}");
    }
}

/// A session logged in the way Synapse logs in (TCP, its role's password), and the task that
/// drives its connection (it ends once the client is dropped).
pub async fn session_as_synapse(
    req: &Request,
) -> anyhow::Result<(Client, tokio::task::JoinHandle<()>)> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&req.tcp_host)
        .port(req.tcp_port)
        .user(&req.role)
        .password(req.password.as_bytes())
        .dbname(&req.database)
        .connect_timeout(Duration::from_secs(10));
    open(&pg, req.tls_roots.as_deref()).await
}

/// `provision = false`: the role and database must be there and fit Synapse; asked as the role.
async fn check_existing(req: &Request) -> Result<Report, ProvisionError> {
    let (client, _task) = session_as_synapse(req)
        .await
        .map_err(|e| ProvisionError::Connect {
            user: req.role.clone(),
            via: via_tcp(req),
            message: error_message(&e),
            fix: format!(
                "postgres.provision = false: ask the server's administrator for a role {} that may log in with the password in postgres.password_file, and a database {} it owns (createdb --encoding=UTF8 --locale=C --template=template0 --owner={} {}); check postgres.host, port and tls",
                req.role, req.database, req.role, req.database
            ),
        })?;
    let sql_err = |what: &str, e: tokio_postgres::Error| ProvisionError::Sql {
        what: what.to_string(),
        message: db_message(&e),
        fix: "see the PostgreSQL server's log".into(),
    };
    let row = client
        .query_one(
            "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text, \
             has_schema_privilege(current_user, 'public', 'CREATE') \
             FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map_err(|e| sql_err("reading pg_database", e))?;
    let (encoding, collate, ctype, may_create): (String, String, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    fits_synapse(req, encoding, collate, ctype)?;
    if !may_create {
        return Err(ProvisionError::Sql {
            what: format!("{} creating tables in database {}", req.role, req.database),
            message: "the role has no CREATE privilege on schema public".into(),
            fix: format!(
                "ask the server's administrator to make {} the database's owner (ALTER DATABASE \"{}\" OWNER TO \"{}\") or to GRANT CREATE ON SCHEMA public TO \"{}\"",
                req.role, req.database, req.role, req.role
            ),
        });
    }
    Ok(Report {
        checked_only: true,
        ..Report::default()
    })
}

/// Synapse refuses any database but UTF8 with collation and ctype C (docs/postgres.md).
fn fits_synapse(
    req: &Request,
    encoding: String,
    collate: String,
    ctype: String,
) -> Result<(), ProvisionError> {
    if encoding != "UTF8" || collate != "C" || ctype != "C" {
        return Err(ProvisionError::WrongLocale {
            database: req.database.clone(),
            role: req.role.clone(),
            encoding,
            collate,
            ctype,
        });
    }
    Ok(())
}

fn via_tcp(req: &Request) -> String {
    format!(
        "TCP {}:{}, password{}, as Synapse will",
        req.tcp_host,
        req.tcp_port,
        if req.tls_roots.is_some() {
            ", TLS verified"
        } else {
            ""
        }
    )
}

async fn login_as_synapse(req: &Request) -> anyhow::Result<()> {
    let (client, task) = session_as_synapse(req).await?;
    client.simple_query("SELECT 1").await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

fn is_auth_failure(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tokio_postgres::Error>()
        .is_some_and(|e| e.code() == Some(&SqlState::INVALID_PASSWORD))
}

fn tcp_error(req: &Request, e: &anyhow::Error) -> ProvisionError {
    ProvisionError::Connect {
        user: req.role.clone(),
        via: via_tcp(req),
        message: error_message(e),
        fix: format!(
            "Synapse logs in over TCP with a password: PostgreSQL must listen on {} (listen_addresses) and pg_hba.conf must allow it, e.g. `host {} {} 127.0.0.1/32 scram-sha-256` (Debian's default allows all local TCP logins)",
            req.tcp_host, req.database, req.role
        ),
    }
}

/// The server's own message, or the TLS or connection failure with its causes.
pub fn error_message(e: &anyhow::Error) -> String {
    match e.downcast_ref::<tokio_postgres::Error>() {
        Some(pg) => db_message(pg),
        None => format!("{e:#}"),
    }
}

/// The server's own message when there is one (tokio-postgres' Display says only "db error").
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

/// SQL identifier quoting (names are validated plain names, but quote anyway).
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(ident("syn\"apse"), "\"syn\"\"apse\"");
        assert_eq!(literal("a'b"), "'a''b'");
    }

    #[test]
    fn report_says_nothing_changed() {
        assert_eq!(
            Report::default().to_string(),
            "role and database already in place; nothing changed"
        );
        assert!(!Report::default().changed());
    }

    #[test]
    fn errors_travel_as_json() {
        let e: Result<Report, ProvisionError> = Err(ProvisionError::WrongLocale {
            database: "d".into(),
            role: "r".into(),
            encoding: "UTF8".into(),
            collate: "C.UTF-8".into(),
            ctype: "C.UTF-8".into(),
        });
        let back: Result<Report, ProvisionError> =
            serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert!(back.unwrap_err().to_string().contains("--locale=C"));
    }
}
