//! The database side of backups: a dump and its row counts from one snapshot, a restore into a
//! database, and the few statements that need PostgreSQL's superuser (create and drop a
//! database).
//!
//! One snapshot: a REPEATABLE READ transaction exports it (`pg_export_snapshot()`, PostgreSQL
//! docs 9.27.5 "Snapshot Synchronization Functions"), counts every table in it, and stays open
//! while `pg_dump --snapshot` dumps exactly that state; so `verify` can demand exact counts even
//! while messages are being sent. The dump skips `e2e_one_time_keys_json`'s rows: one-time keys
//! must never be handed out twice (Synapse docs, "Backups": "exclude-table-data").

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio_postgres::Client;

use crate::config::Config;
use crate::postgres::{ident, literal};
use crate::secrets::Secret;
use crate::supervisor::{self, Command, RunAs};

/// Rows Synapse must not get back (its one-time keys).
pub const EXCLUDED_DATA: &[&str] = &["e2e_one_time_keys_json"];
/// Generous bounds for big databases on slow disks.
const DUMP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Connects as the role Synapse uses, over TCP with its password (as Synapse does).
pub async fn connect(cfg: &Config, password: &Secret, dbname: &str) -> Result<Client> {
    let mut req = crate::postgres::Request::from_config(cfg, password);
    req.database = dbname.to_string();
    let (client, _conn) = crate::postgres::session_as_synapse(&req)
        .await
        .with_context(|| {
            format!(
                "connecting to database {dbname} as {} on {}:{}; is PostgreSQL running (pg_lsclusters)?",
                cfg.postgres.user, cfg.postgres.host, cfg.postgres.port
            )
        })?;
    Ok(client)
}

/// An open exported snapshot with its row counts; dropping it ends the transaction.
pub struct Snapshot {
    client: Client,
    pub id: String,
    pub counts: BTreeMap<String, i64>,
    pub server_version: String,
}

impl Snapshot {
    pub async fn open(cfg: &Config, password: &Secret) -> Result<Snapshot> {
        let client = connect(cfg, password, &cfg.postgres.database).await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .context("starting the backup's snapshot")?;
        let id: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .context("exporting the backup's snapshot")?
            .get(0);
        let server_version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
        let counts = count_rows(&client).await?;
        Ok(Snapshot {
            client,
            id,
            counts,
            server_version,
        })
    }

    pub async fn close(self) {
        let _ = self.client.batch_execute("COMMIT").await;
    }
}

/// Rows of every table in schema public, except the ones whose data is left out.
pub async fn count_rows(client: &Client) -> Result<BTreeMap<String, i64>> {
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .context("listing the tables")?
        .iter()
        .map(|r| r.get(0))
        .filter(|t: &String| !EXCLUDED_DATA.contains(&t.as_str()))
        .collect();
    let mut counts = BTreeMap::new();
    if tables.is_empty() {
        return Ok(counts);
    }
    let sql = tables
        .iter()
        .map(|t| format!("SELECT {}::text, count(*) FROM {}", literal(t), ident(t)))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    for row in client.query(&sql, &[]).await.context("counting rows")? {
        counts.insert(row.get::<_, String>(0), row.get::<_, i64>(1));
    }
    Ok(counts)
}

fn pg_env(cmd: Command, cfg: &Config, password: &Secret) -> Command {
    tls_env(cmd.env("PGPASSWORD", password.expose()), cfg).env("PGCONNECT_TIMEOUT", "10")
}

/// libpq's TLS as `postgres.tls` says, the way Synapse's psycopg2 gets it (PostgreSQL docs
/// 34.15, PGSSLMODE and PGSSLROOTCERT).
fn tls_env(cmd: Command, cfg: &Config) -> Command {
    if cfg.postgres.tls_verify() {
        cmd.env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", cfg.postgres.ca_path())
    } else {
        cmd
    }
}

/// libpq's connection options, the same for psql, pg_dump and pg_restore.
fn pg_target(cmd: Command, host: &str, port: u16, user: &str, dbname: &str) -> Command {
    cmd.arg("--host")
        .arg(host)
        .arg("--port")
        .arg(port.to_string())
        .arg("--username")
        .arg(user)
        .arg("--dbname")
        .arg(dbname)
}

/// As the role Synapse uses, over TCP (the password comes from `pg_env`).
fn conn_args(cmd: Command, cfg: &Config, dbname: &str) -> Command {
    let p = &cfg.postgres;
    pg_target(cmd, &p.host, p.port, &p.user, dbname).arg("--no-password")
}

/// `pg_dump -Fc` of the snapshot into `out`.
pub async fn dump(
    cfg: &Config,
    password: &Secret,
    snapshot: &str,
    out: &mut tokio::fs::File,
) -> Result<()> {
    let mut cmd = conn_args(Command::new("pg_dump"), cfg, &cfg.postgres.database)
        .arg("--format=custom")
        .arg(format!("--snapshot={snapshot}"));
    for t in EXCLUDED_DATA {
        cmd = cmd.arg(format!("--exclude-table-data={t}"));
    }
    run_pg(pg_env(cmd, cfg, password), None, out, "pg_dump").await
}

/// Runs pg_dump or pg_restore to its end; its stderr becomes the error.
async fn run_pg<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
    cmd: Command,
    input: Option<tokio::fs::File>,
    out: &mut W,
    what: &str,
) -> Result<()> {
    let (exit, stderr) = supervisor::run_helper_io(cmd, input, out, DUMP_TIMEOUT)
        .await
        .with_context(|| format!("running {what} (Debian package postgresql-client)"))?;
    if !exit.success() {
        bail!(
            "{what} failed ({exit}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(())
}

/// `pg_restore` of `dump` into `dbname`, as the role (so it owns every table, as Synapse needs).
pub async fn restore(
    cfg: &Config,
    password: &Secret,
    dbname: &str,
    dump: std::fs::File,
) -> Result<()> {
    let cmd = conn_args(Command::new("pg_restore"), cfg, dbname)
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg("--exit-on-error")
        .arg("--single-transaction");
    run_pg(
        pg_env(cmd, cfg, password),
        Some(tokio::fs::File::from_std(dump)),
        &mut tokio::io::sink(),
        "pg_restore",
    )
    .await
    .with_context(|| format!("restoring the dump into {dbname}"))
}

/// Reads the dump through (`pg_restore --list`): its table of contents parses, so the archive
/// is whole, without a database to restore into.
pub async fn list(dump: std::fs::File) -> Result<()> {
    run_pg(
        Command::new("pg_restore").arg("--list"),
        Some(tokio::fs::File::from_std(dump)),
        &mut tokio::io::sink(),
        "pg_restore --list",
    )
    .await
}

/// Runs one statement as PostgreSQL's superuser with psql in database `dbname`: over the
/// socket with peer authentication as that OS user, or with `postgres.superuser_dsn` when it
/// is set (as provisioning does). Returns psql's unaligned output.
pub async fn superuser_sql(cfg: &Config, dbname: &str, sql: &str) -> Result<String> {
    let mut cmd = Command::new("psql")
        .arg("-X")
        .arg("-q")
        .arg("-A")
        .arg("-t")
        .arg("-v")
        .arg("ON_ERROR_STOP=1");
    let dsn = &cfg.postgres.superuser_dsn;
    if dsn.is_empty() {
        let p = &cfg.postgres;
        cmd = pg_target(cmd, &p.socket_dir, p.port, &p.superuser, dbname);
        cmd.run_as = Some(RunAs::lookup(&cfg.postgres.superuser)?);
    } else if dsn.contains("://") {
        cmd = tls_env(cmd, cfg);
        let sep = if dsn.contains('?') { '&' } else { '?' };
        cmd = cmd
            .arg("--dbname")
            .arg(format!("{dsn}{sep}dbname={dbname}"));
    } else {
        // In a key=value connection string a later key wins (libpq docs, 34.1.1).
        cmd = tls_env(cmd, cfg)
            .arg("--dbname")
            .arg(format!("{dsn} dbname={dbname}"));
    }
    let out = supervisor::run_helper(cmd.arg("-c").arg(sql), b"", Duration::from_secs(600))
        .await
        .context("running psql (Debian package postgresql-client)")?;
    if !out.exit.success() {
        bail!(
            "PostgreSQL refused {sql:?}: {}\n    fix: check that {} is PostgreSQL's superuser and PostgreSQL runs (pg_lsclusters)",
            String::from_utf8_lossy(&out.stderr).trim(),
            cfg.postgres.superuser
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Creates `name` as Synapse's database must be (UTF8, C, template0; Synapse docs
/// "Using Postgres"), owned by the role.
pub async fn create_database(cfg: &Config, name: &str) -> Result<()> {
    superuser_sql(
        cfg,
        "postgres",
        &format!(
            "CREATE DATABASE {} WITH OWNER {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
            ident(name),
            ident(&cfg.postgres.user)
        ),
    )
    .await
    .map(drop)
}

pub async fn drop_database(cfg: &Config, name: &str) -> Result<()> {
    superuser_sql(
        cfg,
        "postgres",
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(name)),
    )
    .await
    .map(drop)
}

/// What the database holds that a restore would destroy: `None` when it does not exist;
/// else the number of its users besides the appliance's own two accounts (a freshly installed
/// appliance has only those; a database without Synapse's tables counts 0). Asked as the
/// superuser: after a purge the role may be gone too.
pub async fn users_besides_ours(cfg: &Config) -> Result<Option<i64>> {
    let db = &cfg.postgres.database;
    let exists = superuser_sql(
        cfg,
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_database WHERE datname = {}",
            literal(db)
        ),
    )
    .await?;
    if exists != "1" {
        return Ok(None);
    }
    let has_users =
        superuser_sql(cfg, db, "SELECT to_regclass('public.users') IS NOT NULL").await?;
    if has_users != "t" {
        return Ok(Some(0));
    }
    let ours = [
        format!(
            "@{}:{}",
            crate::synapse::admin::SERVICE_LOCALPART,
            cfg.server_name
        ),
        format!("@{}:{}", cfg.bot.localpart, cfg.server_name),
    ];
    let n = superuser_sql(
        cfg,
        db,
        &format!(
            "SELECT count(*) FROM users WHERE name <> {} AND name <> {}",
            literal(&ours[0]),
            literal(&ours[1])
        ),
    )
    .await?;
    n.parse::<i64>()
        .map(Some)
        .with_context(|| format!("counting the users of {db}: psql said {n:?}"))
}

/// Tables in the database's schema public, asked as the role (a database made elsewhere).
pub async fn table_count(cfg: &Config, password: &Secret) -> Result<i64> {
    let client = connect(cfg, password, &cfg.postgres.database).await?;
    Ok(client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .context("counting the database's tables")?
        .get(0))
}

/// Empties the tables whose rows were left out, before Synapse's first start after a restore
/// (Synapse docs, "Backups": TRUNCATE e2e_one_time_keys_json).
pub async fn truncate_excluded(cfg: &Config, password: &Secret, dbname: &str) -> Result<()> {
    let client = connect(cfg, password, dbname).await?;
    for t in EXCLUDED_DATA {
        client
            .batch_execute(&format!("TRUNCATE {}", ident(t)))
            .await
            .with_context(|| format!("TRUNCATE {t}"))?;
    }
    Ok(())
}
