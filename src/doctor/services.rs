//! The parts behind the front door: Synapse's version, PostgreSQL (version against Synapse's
//! floor, encoding and collation), free disk space, the clock, and Element's state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::delegation::error_chain;
use super::{Check, Ctx, now_secs};
use crate::synapse::Layout;
use crate::units::human_duration;

/// Synapse refuses older servers: synapse/storage/engines/postgres.py (1.163: "Synapse
/// requires PostgreSQL 14 or above").
pub const POSTGRES_FLOOR: u32 = 140_000;

pub async fn synapse(ctx: &Ctx<'_>) -> Check {
    const NAME: &str = "synapse";
    let url = format!(
        "{}/_synapse/admin/v1/server_version",
        ctx.cfg.synapse_local_url()
    );
    let state = ctx.child_state("synapse");
    match super::net::get_json(
        ctx.net.http().get(&url),
        NAME,
        &format!("Synapse ({state}) at {url}"),
        "see Synapse's log: `journalctl -u homelab-matrix`",
        "see `homelab-matrix status` and Synapse's log (`journalctl -u homelab-matrix`); `systemctl restart homelab-matrix` once the cause is fixed",
    )
    .await
    {
        Ok(v) => Check::pass(
            NAME,
            format!(
                "Synapse {} answers on {} ({state})",
                v["server_version"].as_str().unwrap_or("?"),
                ctx.cfg.synapse_local_url()
            ),
        ),
        Err(c) => c,
    }
}

/// What a database Synapse runs on must be (Synapse's docs/postgres.md "Set up database"):
/// at least the floor, UTF8, collation and ctype C; and on the newest PostgreSQL installed
/// (`newer`: one a dist-upgrade put beside it, postgres::clusters), or a warning says how.
pub fn judge_postgres(
    version_num: u32,
    version: &str,
    encoding: &str,
    collate: &str,
    ctype: &str,
    database: &str,
    newer: Option<u32>,
) -> Check {
    const NAME: &str = "postgres";
    let seen = format!(
        "PostgreSQL {version}, database {database:?}: encoding {encoding}, collation {collate}, ctype {ctype}"
    );
    if version_num < POSTGRES_FLOOR {
        return Check::fail(
            NAME,
            format!(
                "{seen}; Synapse needs PostgreSQL {} or newer",
                POSTGRES_FLOOR / 10_000
            ),
            "upgrade PostgreSQL (Debian: install postgresql-15 and `pg_upgradecluster`), then restart homelab-matrix",
        );
    }
    if encoding != "UTF8" || collate != "C" || ctype != "C" {
        return Check::fail(
            NAME,
            format!("{seen}; Synapse needs UTF8 with collation and ctype C"),
            format!(
                "recreate the database: CREATE DATABASE \"{database}\" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0 (a new server: drop it and run `homelab-matrix provision-db`; with data: dump, recreate, restore; see Synapse's docs/postgres.md)"
            ),
        );
    }
    if let Some(newer) = newer {
        return Check::warn(
            NAME,
            format!(
                "{seen}; PostgreSQL {newer} is installed beside it (a dist-upgrade), and the database still lives on {}",
                version_num / 10_000
            ),
            "homelab-matrix postgres upgrade (a snapshot first; the old cluster is kept, stopped, until you drop it)",
        );
    }
    Check::pass(
        NAME,
        format!("{seen} (Synapse needs {}+)", POSTGRES_FLOOR / 10_000),
    )
}

pub async fn postgres(ctx: &Ctx<'_>) -> Check {
    let p = &ctx.cfg.postgres;
    let client = match ctx.postgres().await {
        Ok(c) => c,
        Err(e) => {
            return Check::fail(
                "postgres",
                format!(
                    "cannot log in to {}:{} as {} (database {}): {e}",
                    p.host, p.port, p.user, p.database,
                ),
                if p.on_this_host() {
                    "is PostgreSQL running (`systemctl status postgresql`)? `homelab-matrix provision-db` creates the role and database"
                } else {
                    "check that the server answers on postgres.host and port, that the role may log in from this host with the password the appliance has (postgres.password_file), and that its certificate is signed by postgres.ca_file (`homelab-matrix provision-db` says which)"
                },
            );
        }
    };
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, current_setting('server_version'), \
             pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text \
             FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await;
    // A server of this host (not one named by superuser_dsn): Debian's clusters say whether
    // a newer major is installed beside it.
    let newer = if p.on_this_host() {
        let clusters = crate::postgres::clusters::list().await.unwrap_or_default();
        crate::postgres::clusters::behind(
            &clusters,
            p.port,
            crate::postgres::clusters::newest_installed(),
        )
        .map(|(_, n)| n)
    } else {
        None
    };
    match row {
        Ok(r) => judge_postgres(
            r.get::<_, i32>(0) as u32,
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            &p.database,
            newer,
        ),
        Err(e) => Check::fail(
            "postgres",
            format!("querying PostgreSQL: {e}"),
            "see PostgreSQL's log",
        ),
    }
}

/// Round trips to PostgreSQL, the median of several: Synapse makes many queries one after
/// another for a single request, so each millisecond here is paid many times over.
pub async fn postgres_latency(ctx: &Ctx<'_>) -> Check {
    let p = &ctx.cfg.postgres;
    let Ok(client) = ctx.postgres().await else {
        return Check::fail(
            "postgres:latency",
            "no session (see the postgres check)",
            "fix the postgres check first",
        );
    };
    let mut times = vec![];
    for _ in 0..7 {
        let t = std::time::Instant::now();
        if let Err(e) = client.simple_query("SELECT 1").await {
            return Check::fail(
                "postgres:latency",
                format!("SELECT 1 failed: {e}"),
                "see the PostgreSQL server's log",
            );
        }
        times.push(t.elapsed());
    }
    times.sort();
    judge_latency(&p.host, p.port, p.tls_verify(), times[times.len() / 2])
}

/// Above this a round trip warns: a LAN answers in well under a millisecond; a few
/// milliseconds per query makes a /sync of a busy account take seconds.
const LATENCY_WARN: Duration = Duration::from_millis(10);

pub fn judge_latency(host: &str, port: u16, tls: bool, median: Duration) -> Check {
    let seen = format!(
        "{host}:{port} ({}): a round trip takes {:.2} ms (median of 7)",
        if tls { "TLS verified" } else { "no TLS" },
        median.as_secs_f64() * 1000.0
    );
    if median >= LATENCY_WARN {
        return Check::warn(
            "postgres:latency",
            format!("{seen}; Synapse waits for that on every one of its queries"),
            "put PostgreSQL on this host or the same LAN segment (a database across the internet or a slow VPN makes every request slow)",
        );
    }
    Check::pass("postgres:latency", seen)
}

/// Media on S3: the provider's version, then the bucket as Synapse's processes reach it.
pub async fn media_s3(ctx: &Ctx<'_>) -> Check {
    use crate::synapse::s3;
    let s3cfg = &ctx.cfg.media.s3;
    let version = match s3::check_provider(ctx.cfg).await {
        Ok(v) => v,
        Err(e) => {
            let text = format!("{e:#}");
            let (seen, fix) = text.split_once("\n    fix: ").unwrap_or((&text, ""));
            return Check::fail("media:s3", seen.to_string(), fix.to_string());
        }
    };
    let at = if s3cfg.endpoint.is_empty() {
        "AWS".to_string()
    } else {
        s3cfg.endpoint.clone()
    };
    match s3::probe(ctx.cfg).await {
        Ok(()) => Check::pass(
            "media:s3",
            format!(
                "bucket {:?} at {at}: written, read back and deleted a probe as Synapse's user ({} {version})",
                s3cfg.bucket,
                s3::PROVIDER_PACKAGE
            ),
        ),
        Err(e) => Check::fail(
            "media:s3",
            format!("bucket {:?} at {at}: {e:#}", s3cfg.bucket),
            "check media.s3 (bucket, endpoint, region) and that the access key may list, read, write and delete in the bucket; while this fails every upload fails",
        ),
    }
}

/// Below this much free space a check fails; below `WARN_BYTES` or `WARN_FRACTION` of the
/// file system it warns (PostgreSQL stops writing on a full disk; Synapse then fails requests).
const FAIL_BYTES: u64 = 512 << 20;
const WARN_BYTES: u64 = 2 << 30;
const WARN_FRACTION: f64 = 0.05;

pub fn judge_disk(what: &str, path: &Path, free: u64, total: u64) -> Check {
    let name = format!("disk:{what}");
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    let seen = format!("{} free of {} on {}", gib(free), gib(total), path.display());
    let fix = format!(
        "free space on the file system of {} (old media: Synapse's purge_media_cache / media retention; PostgreSQL: VACUUM FULL), or grow it",
        path.display()
    );
    if free < FAIL_BYTES {
        Check::fail(name, format!("{seen}: almost full"), fix)
    } else if free < WARN_BYTES || (free as f64) < WARN_FRACTION * total as f64 {
        Check::warn(name, format!("{seen}: running low"), fix)
    } else {
        Check::pass(name, seen)
    }
}

pub async fn disk(ctx: &Ctx<'_>) -> Vec<Check> {
    // The database's data directory: only a superuser (or pg_read_all_settings) may ask; the
    // Debian default is the fallback.
    let mut db_dir = PathBuf::from("/var/lib/postgresql");
    if let Ok(c) = ctx.postgres().await
        && let Ok(r) = c.query_one("SHOW data_directory", &[]).await
    {
        db_dir = PathBuf::from(r.get::<_, String>(0));
    }
    let mut out = vec![];
    let mut disks = vec![("media", Layout::new(&ctx.cfg.state_dir()).media_store())];
    // A server elsewhere keeps its data on its own disks, which this host cannot see.
    if ctx.cfg.postgres.on_this_host() {
        disks.push(("database", db_dir));
    }
    for (what, path) in disks {
        // The store may not exist yet: its nearest existing parent holds it then.
        let mut p = path.as_path();
        while !p.exists() {
            p = p.parent().unwrap_or(Path::new("/"));
        }
        out.push(match crate::fsutil::space(p) {
            Ok((free, total)) => judge_disk(what, &path, free, total),
            Err(e) => Check::warn(
                format!("disk:{what}"),
                format!("cannot read the free space of {}: {e}", p.display()),
                "",
            ),
        });
    }
    out
}

/// "Tue, 01 Dec 2026 09:13:12 GMT" (RFC 9110 §5.6.7 IMF-fixdate) → Unix seconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let f: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, hms, "GMT"] = f.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|m| m == month)? as u8 + 1;
    let mut t = hms.split(':').map(|x| x.parse::<u8>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    let date =
        time::Date::from_calendar_date(year.parse().ok()?, m.try_into().ok()?, day.parse().ok()?)
            .ok()?;
    let time = time::Time::from_hms(h, mi, se).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}

/// Signatures (federation, ACME) and TOTP-like tokens break with a clock this far off.
const CLOCK_FAIL_SECS: i64 = 300;
const CLOCK_WARN_SECS: i64 = 30;

pub async fn clock(ctx: &Ctx<'_>) -> Check {
    const NAME: &str = "clock";
    // The ACME CA when we use one, else the remote server: an NTP-free estimate from the
    // Date header (one second resolution, plus the round trip).
    let url = if ctx.cfg.tls.mode() == crate::config::TlsMode::Acme {
        ctx.cfg.tls.acme_directory.clone()
    } else {
        format!("https://{}/", ctx.opts.remote)
    };
    let start = now_secs() as i64;
    let resp = ctx
        .net
        .http()
        .head(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let r = match resp {
        Ok(r) => r,
        Err(e) if super::net::offline(&e) => {
            return Check::warn(
                NAME,
                format!(
                    "no internet: {url} cannot be reached, the clock was not compared ({})",
                    error_chain(&e)
                ),
                "make sure NTP is on (`timedatectl`)",
            );
        }
        Err(e) => {
            return Check::warn(
                NAME,
                format!("{url}: {}", error_chain(&e)),
                "make sure NTP is on (`timedatectl`)",
            );
        }
    };
    let end = now_secs() as i64;
    let Some(theirs) = r
        .headers()
        .get("date")
        .and_then(|d| d.to_str().ok())
        .and_then(parse_http_date)
    else {
        return Check::warn(NAME, format!("{url} sent no usable Date header"), "");
    };
    let skew = (start + end) / 2 - theirs;
    let seen = format!("this host's clock is {skew:+}s from {url}'s Date header");
    if skew.abs() > CLOCK_FAIL_SECS {
        Check::fail(
            NAME,
            seen,
            "turn on NTP: `timedatectl set-ntp true` (systemd-timesyncd); federation signatures and ACME fail with a wrong clock",
        )
    } else if skew.abs() > CLOCK_WARN_SECS {
        Check::warn(NAME, seen, "turn on NTP: `timedatectl set-ntp true`")
    } else {
        Check::pass(NAME, seen)
    }
}

pub fn element(ctx: &Ctx<'_>) -> Check {
    const NAME: &str = "element";
    let Some(e) = ctx.status.as_ref().map(|s| s["element"].clone()) else {
        return Check::warn(
            NAME,
            "homelab-matrix is not running: Element's state is unknown",
            "start it: `systemctl start homelab-matrix`",
        );
    };
    let Some(version) = e["version"].as_str() else {
        return Check::warn(
            NAME,
            "no Element release installed yet",
            "run `homelab-matrix element update`",
        );
    };
    // Every release is installed only after its signature verified (element::install);
    // the bundled one was verified when the package was built.
    let origin = if e["bundled"].as_str() == Some(version) {
        "the package's bundled release, signature verified at build time"
    } else {
        "signature verified at install"
    };
    let checked = e["last_check"].as_u64().map_or_else(
        || "never checked for updates".to_string(),
        |t| {
            format!(
                "last update check {} ago{}",
                human_duration(Duration::from_secs(now_secs().saturating_sub(t))),
                e["last_result"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )
        },
    );
    let auto = if e["auto_update"] == true {
        "automatic updates on"
    } else {
        "automatic updates off"
    };
    let seen = format!("Element {version} ({origin}); {checked}; {auto}");
    match e["last_error"].as_str() {
        Some(err) => Check::warn(
            NAME,
            format!("{seen}; the last update failed: {err}"),
            "see `homelab-matrix status`; `homelab-matrix element update` retries now",
        ),
        None => Check::pass(NAME, seen),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn postgres_below_synapses_floor_or_with_a_wrong_locale_fails() {
        let near = judge_latency("db.lan", 5432, true, Duration::from_micros(400));
        assert_eq!(near.status, Status::Pass, "{near:?}");
        assert!(near.seen.contains("TLS verified") && near.seen.contains("0.40 ms"));
        let far = judge_latency("db.far", 5432, false, Duration::from_millis(30));
        assert_eq!(far.status, Status::Warn, "{far:?}");
        let ok = judge_postgres(150_014, "15.14", "UTF8", "C", "C", "synapse", None);
        assert_eq!(ok.status, Status::Pass, "{ok:?}");
        let old = judge_postgres(130_020, "13.20", "UTF8", "C", "C", "synapse", None);
        assert_eq!(old.status, Status::Fail);
        assert!(old.seen.contains("needs PostgreSQL 14"), "{old:?}");
        let loc = judge_postgres(
            150_014,
            "15.14",
            "UTF8",
            "en_US.UTF-8",
            "C",
            "synapse",
            None,
        );
        assert_eq!(loc.status, Status::Fail);
        assert!(loc.fix.unwrap().contains("LC_COLLATE 'C'"));
        // After a dist-upgrade: still good, but behind, with the command that moves it.
        let behind = judge_postgres(150_014, "15.14", "UTF8", "C", "C", "synapse", Some(17));
        assert_eq!(behind.status, Status::Warn, "{behind:?}");
        assert!(behind.seen.contains("PostgreSQL 17 is installed beside it"));
        assert!(
            behind
                .fix
                .unwrap()
                .contains("homelab-matrix postgres upgrade")
        );
    }

    #[test]
    fn a_nearly_full_disk_fails_and_a_tight_one_warns() {
        let p = Path::new("/x");
        assert_eq!(
            judge_disk("media", p, 100 << 20, 10 << 30).status,
            Status::Fail
        );
        assert_eq!(
            judge_disk("media", p, 1 << 30, 20 << 30).status,
            Status::Warn
        );
        assert_eq!(
            judge_disk("media", p, 5 << 30, 20 << 30).status,
            Status::Pass
        );
    }

    #[test]
    fn http_dates_parse() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:01:00 GMT"), Some(60));
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
