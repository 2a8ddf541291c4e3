//! PostgreSQL provisioning against the real server (peer auth through the helper).

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{Lab, psql, require};

#[test]
fn provisioning_twice_changes_nothing_the_second_time() {
    if !require(
        "root",
        common::is_root(),
        "the helper runs as the postgres user",
    ) || !require(
        "PostgreSQL",
        common::postgres_up(),
        "start it with pg_ctlcluster 15 main start",
    ) {
        return;
    }
    let lab = Lab::new("prov");
    let first = lab.ok(&["provision-db"]);
    assert!(first.contains("created the role"), "{first}");
    assert!(first.contains("created the database"), "{first}");
    let row = psql(&format!(
        "SELECT pg_encoding_to_char(encoding), datcollate, datctype, pg_get_userbyid(datdba) FROM pg_database WHERE datname='{}'",
        lab.db
    ));
    assert_eq!(row, format!("UTF8|C|C|{}", lab.db));
    let stored = psql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname='{}'",
        lab.db
    ));
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");

    let second = lab.ok(&["provision-db"]);
    assert!(second.contains("nothing changed"), "{second}");
    // The SCRAM verifier has a random salt: unchanged means the password was not set again.
    let stored_again = psql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname='{}'",
        lab.db
    ));
    assert_eq!(stored, stored_again);
}

#[test]
fn a_role_with_another_password_gets_ours() {
    if !require(
        "root",
        common::is_root(),
        "the helper runs as the postgres user",
    ) || !require(
        "PostgreSQL",
        common::postgres_up(),
        "start it with pg_ctlcluster 15 main start",
    ) {
        return;
    }
    let lab = Lab::new("pw");
    psql(&format!(
        "CREATE ROLE \"{}\" LOGIN PASSWORD 'something-else'",
        lab.db
    ));
    let out = lab.ok(&["provision-db"]);
    assert!(out.contains("set the role's password"), "{out}");
    assert!(!out.contains("created the role"), "{out}");
    assert!(lab.ok(&["provision-db"]).contains("nothing changed"));
}

#[test]
fn wrong_collation_is_refused_with_the_fix() {
    if !require(
        "root",
        common::is_root(),
        "the helper runs as the postgres user",
    ) || !require(
        "PostgreSQL",
        common::postgres_up(),
        "start it with pg_ctlcluster 15 main start",
    ) {
        return;
    }
    let lab = Lab::new("coll");
    psql(&format!("CREATE ROLE \"{}\" LOGIN", lab.db));
    // What a plain `createdb` gives on Debian: the cluster's C.UTF-8, which Synapse rejects.
    psql(&format!(
        "CREATE DATABASE \"{0}\" OWNER \"{0}\" ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TEMPLATE template0",
        lab.db
    ));
    let out = lab.run_cmd(&["provision-db"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("collation C.UTF-8"), "{err}");
    assert!(err.contains("--locale=C --template=template0"), "{err}");
    assert!(err.contains(&format!("dropdb {}", lab.db)), "{err}");
    // Refused, not "fixed": the database is still there, untouched.
    let row = psql(&format!(
        "SELECT datcollate FROM pg_database WHERE datname='{}'",
        lab.db
    ));
    assert_eq!(row, "C.UTF-8");
}
