//! Backup and restore under attack (issue #24 items 1-4), with the real binary, Synapse and
//! PostgreSQL: a compromised Synapse (matrix-synapse, through setpriv) plants a 19,000-deep
//! tree and sparse files in its media store before the service's own daily backup; then
//! hostile backup files (a link with a file "through" it, a GNU sparse dump of 1 TiB, a dump
//! that does not restore) are refused or fail and leave every file and the database as they
//! were; the real backup then restores with sane modes over the child's tree.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Lab, pid_alive, psql_in, require_appliance, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Runs a command as matrix-synapse, the way a compromised Synapse would; it must succeed.
fn as_child(args: &[&str]) {
    let st = common::as_user("matrix-synapse", args[0])
        .args(&args[1..])
        .status()
        .unwrap();
    assert!(st.success(), "as matrix-synapse: {args:?}");
}

fn backups(lab: &Lab) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(lab.path("backups"))
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "tar"));
    v.sort();
    v
}

/// Every file of root's areas, the signing key, the config and synapse.d, with mode and
/// contents: what a refused restore must leave exactly as it was.
fn fingerprint(lab: &Lab) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(p: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        let Ok(m) = fs::symlink_metadata(p) else {
            return;
        };
        if m.is_dir() {
            for e in fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), out);
            }
        } else {
            let data = fs::read(p).unwrap_or_default();
            out.insert(p.display().to_string(), (m.mode(), data));
        }
    }
    let mut out = BTreeMap::new();
    for area in ["secrets", "acme", "ca", "bot"] {
        walk(&lab.state().join(area), &mut out);
    }
    walk(&lab.state().join("synapse-data/signing.key"), &mut out);
    walk(&lab.config, &mut out);
    walk(&lab.path("synapse.d"), &mut out);
    assert!(out.len() > 10, "{:?}", out.keys());
    out
}

/// The users the database holds (the appliance's own accounts).
fn users(lab: &Lab) -> String {
    psql_in(
        &lab.db,
        "SELECT string_agg(name, ',' ORDER BY name) FROM users",
    )
}

/// A backup file's members: name, header and data (a long name, a GNU 'L' member in the
/// file, is folded into its entry by the reader and made again by append_data).
fn members(file: &Path) -> Vec<(String, tar::Header, Vec<u8>)> {
    let mut ar = tar::Archive::new(fs::File::open(file).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = vec![];
            e.read_to_end(&mut data).unwrap();
            (name, e.header().clone(), data)
        })
        .collect()
}

/// Writes `file` again as `out`, with `edit` applied to its manifest and its members (name,
/// header, data); every member's hash and size in the manifest are recomputed, as an attacker
/// who knows the format would.
fn forge(
    file: &Path,
    out: &Path,
    edit: impl FnOnce(&mut Vec<(String, tar::Header, Vec<u8>)>, &mut Value),
) {
    let mut list = members(file);
    let (_, _, json) = list.pop().expect("the manifest, last");
    let mut manifest: Value = serde_json::from_slice(&json).unwrap();
    edit(&mut list, &mut manifest);
    let sha = |d: &[u8]| {
        ring::digest::digest(&ring::digest::SHA256, d)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut parts = vec![];
    for (name, h, data) in &list {
        if h.entry_type() != tar::EntryType::Regular {
            continue;
        }
        if name == "database.pgdump" {
            manifest["database"]["size"] = data.len().into();
            manifest["database"]["sha256"] = sha(data).into();
        } else {
            parts.push(serde_json::json!({
                "path": name, "size": data.len(), "sha256": sha(data),
                "mode": h.mode().unwrap(),
            }));
        }
    }
    manifest["parts"] = parts.into();
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    for (name, h, data) in &list {
        let mut h = h.clone();
        match h.entry_type() {
            tar::EntryType::Symlink => {
                let target = h.link_name().unwrap().unwrap().into_owned();
                b.append_link(&mut h, name, target).unwrap();
            }
            tar::EntryType::GNUSparse => {
                h.set_path(name).unwrap();
                h.set_cksum();
                b.append(&h, data.as_slice()).unwrap();
            }
            _ => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, data.as_slice()).unwrap();
            }
        }
    }
    let json = serde_json::to_vec(&manifest).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(json.len() as u64);
    h.set_mode(0o600);
    b.append_data(&mut h, "manifest.json", json.as_slice())
        .unwrap();
    b.into_inner().unwrap();
}

fn regular(mode: u32, size: usize) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(size as u64);
    h
}

/// Runs `homelab-matrix ARGS`, which must fail; its stderr.
fn fails(lab: &Lab, args: &[&str]) -> String {
    let out = lab.run_cmd(args);
    assert!(
        !out.status.success(),
        "homelab-matrix {args:?} succeeded but must not:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_hostile_synapse_and_hostile_backup_files_break_nothing() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("backup-attack");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The service's own daily backup: the next whole minute at least 100 s from now (UTC),
    // time enough to start and plant.
    let at = (now + 100).div_ceil(60) * 60;
    lab.write_config(&format!(
        "[tls]\nmode = \"internal\"\n[backup]\ndir = \"{}\"\ntime = \"{:02}:{:02}\"\n",
        lab.path("backups").display(),
        at / 3600 % 24,
        at / 60 % 60
    ));
    // An operator's override left world-writable: a restore must not bring that back.
    let loose = lab.path("synapse.d/50-loose.yaml");
    fs::write(&loose, "# presence stays off\n").unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o666)).unwrap();
    let mut run = lab.start();
    let pid = run.pid();

    // matrix-synapse, compromised: a 19,000-deep tree (made level by level: its path is far
    // past PATH_MAX) and six 250 MiB sparse files that take no disk.
    let local = lab.state().join("synapse-data/media_store/local_content");
    let script = format!(
        "import os\nos.makedirs({l:?}, exist_ok=True)\nos.chdir({l:?})\nos.mkdir('deep')\nos.chdir('deep')\n\
         for _ in range(19000):\n    os.mkdir('d')\n    os.chdir('d')\nopen('bottom', 'w').write('x')\n\
         for i in range(6):\n    f = open(os.path.join({l:?}, 'sparse%d' % i), 'wb')\n    f.truncate(250 << 20)\n    f.close()\n",
        l = local.display().to_string()
    );
    as_child(&["/usr/bin/python3", "-c", &script]);

    let within = Duration::from_secs(at.saturating_sub(now) + 240);
    let mut backup = Value::Null;
    wait_until("the daily backup", within, || {
        backup = lab.status()["backup"].clone();
        !backup["good"].is_null() || !backup["failure"].is_null()
    });
    assert!(backup["failure"].is_null(), "{backup}");
    // The same supervisor: it survived the walk (it died of a stack overflow before).
    assert!(pid_alive(pid), "the service died:\n{}", run.log_tail());
    assert_eq!(lab.status()["phase"], "ready");
    let file = PathBuf::from(backup["good"]["file"].as_str().unwrap());
    assert_eq!(backups(&lab), std::slice::from_ref(&file));
    // The sparse files are not in it: the backup is small, and says what it left out.
    let size = fs::metadata(&file).unwrap().len();
    assert!(size < 50 << 20, "{size} bytes");
    let skipped = backup["good"]["skipped"].to_string();
    assert!(skipped.contains("levels deep"), "{skipped}");
    assert_eq!(skipped.matches("a sparse file").count(), 6, "{skipped}");
    run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60));

    let before = fingerprint(&lab);
    let users_before = users(&lab);
    let refuse = |forged: &Path, says: &str| {
        let e = fails(&lab, &["restore", forged.to_str().unwrap()]);
        assert!(e.contains(says), "{e}");
        assert_eq!(fingerprint(&lab), before, "a refused restore changed files");
        assert_eq!(users(&lab), users_before);
        e
    };

    // A link, then a file "through" it: refused by its member types, nothing touched.
    let through = lab.path("through.tar");
    forge(&file, &through, |list, _| {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_link_name("/etc").unwrap();
        link.set_size(0);
        list.insert(1, ("state/acme/evil".into(), link, vec![]));
        list.insert(
            2,
            (
                "state/acme/evil/planted-by-backup".into(),
                regular(0o644, 4),
                b"evil".to_vec(),
            ),
        );
    });
    refuse(&through, "a Symlink member");
    assert!(!Path::new("/etc/planted-by-backup").exists());

    // A 10 KB file whose dump is GNU sparse, 1 TiB of holes: refused from its header.
    let sparse = lab.path("sparse.tar");
    forge(&file, &sparse, |list, _| {
        let (_, h, data) = &mut list[0];
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(512);
        let g = h.as_gnu_mut().unwrap();
        g.set_real_size(1 << 40);
        g.sparse[0].set_offset((1 << 40) - 512);
        g.sparse[0].set_length(512);
        *data = vec![0u8; 512];
    });
    assert!(fs::metadata(&sparse).unwrap().len() < size);
    refuse(&sparse, "GNUSparse");
    let e = fails(&lab, &["backup", "verify", sparse.to_str().unwrap()]);
    assert!(e.contains("GNUSparse"), "{e}");
    // No scratch copy of it anywhere: the state dir holds no file that large.
    let big: Vec<String> = fs::read_dir(lab.state())
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            (e.metadata().ok()?.len() > 100 << 20).then(|| e.path().display().to_string())
        })
        .collect();
    assert!(big.is_empty(), "{big:?}");

    // A dump that passes every hash (recomputed) but is no dump: pg_restore fails, and the
    // appliance, its files and its database are as they were.
    let garbage = lab.path("garbage.tar");
    forge(&file, &garbage, |list, _| {
        list[0].2 = b"PGDMP but not really".to_vec();
    });
    let e = fails(&lab, &["restore", garbage.to_str().unwrap()]);
    assert!(e.contains("as they were"), "{e}");
    assert_eq!(fingerprint(&lab), before);
    assert_eq!(users(&lab), users_before);

    // The real backup restores over the child's tree, and the loose override comes back
    // root's and writable by root alone.
    let out = lab.ok(&["restore", file.to_str().unwrap()]);
    assert!(out.contains("restored the daily backup"), "{out}");
    let m = fs::metadata(&loose).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o644));
    assert!(!local.join("deep").exists());
    assert!(!local.join("sparse0").exists());
    assert_eq!(users(&lab), users_before);
    // And the appliance starts on it: the restored password is the role's.
    let _run = lab.start();
    assert_eq!(lab.status()["phase"], "ready");
}
