//! Root never writes through a path a child can change (DESIGN.md §3, issue #11 item 1).
//!
//! As a compromised Synapse or coturn would, the tests plant symlinks to root-owned canary
//! files and directories (at every temp name the old code used, at each file root writes, at
//! the directories), then make root re-render: SIGHUP with a changed override, and a restart.
//! Every canary must stay byte for byte, with its owner, mode and mtime. A second test lays out
//! the old layout (the child owning `state/synapse` and `state/coturn`, with plants inside) and
//! upgrades it: canaries untouched, the new owners and modes exact, Synapse's signing key and
//! media kept.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{Lab, as_user, require, require_appliance, wait_until};
use nix::sys::signal::Signal;

const SYNAPSE_USER: &str = "matrix-synapse";
const TURN_USER: &str = "turnserver";

fn ids(user: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("no system user {user}"));
    (u.uid.as_raw(), u.gid.as_raw())
}

/// What a canary looked like when made.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    contents: Option<Vec<u8>>,
    entries: Option<BTreeSet<String>>,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: (i64, i64),
    ino: u64,
}

impl Seen {
    fn summary(&self) -> String {
        let what = match (&self.contents, &self.entries) {
            (Some(c), _) => {
                let t = String::from_utf8_lossy(c);
                format!("{:?}", t.chars().take(40).collect::<String>())
            }
            (_, Some(e)) => format!("entries {e:?}"),
            _ => "?".into(),
        };
        format!(
            "{what} {}:{} {:o} mtime {}",
            self.uid, self.gid, self.mode, self.mtime.0
        )
    }
}

/// A root-owned file or directory that nothing may touch.
struct Canary {
    path: PathBuf,
    seen: Seen,
}

impl Canary {
    fn look(path: &Path) -> Seen {
        let m = fs::symlink_metadata(path).unwrap();
        Seen {
            contents: m.is_file().then(|| fs::read(path).unwrap()),
            entries: m.is_dir().then(|| {
                fs::read_dir(path)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            }),
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode() & 0o7777,
            mtime: (m.mtime(), m.mtime_nsec()),
            ino: m.ino(),
        }
    }

    /// A 0600 root file with known contents and an mtime in 2001.
    fn file(dir: &Path, name: &str) -> Canary {
        let path = dir.join(name);
        fs::write(&path, format!("canary {name}: root's, not to be touched\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let f = fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(978_307_200))
            .unwrap();
        drop(f);
        Canary {
            seen: Canary::look(&path),
            path,
        }
    }

    /// A 0700 root directory holding one 0600 file.
    fn dir(dir: &Path, name: &str) -> Canary {
        let path = dir.join(name);
        fs::create_dir(&path).unwrap();
        fs::write(path.join("precious"), "root's\n").unwrap();
        fs::set_permissions(path.join("precious"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        Canary {
            seen: Canary::look(&path),
            path,
        }
    }

    fn check(&self) -> Option<String> {
        let now = Canary::look(&self.path);
        (now != self.seen).then(|| {
            format!(
                "{} changed: was {}, now {}",
                self.path.display(),
                self.seen.summary(),
                now.summary()
            )
        })
    }
}

/// A root-only directory of canaries.
struct Canaries {
    dir: PathBuf,
    all: Vec<Canary>,
}

impl Canaries {
    fn new(lab: &Lab) -> Canaries {
        let dir = lab.path("canaries");
        fs::create_dir(&dir).unwrap();
        // The child can reach the canaries by path (like /etc/shadow) but not read them.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).unwrap();
        Canaries { dir, all: vec![] }
    }

    fn file(&mut self) -> PathBuf {
        let c = Canary::file(&self.dir, &format!("file{}", self.all.len()));
        let p = c.path.clone();
        self.all.push(c);
        p
    }

    fn dir(&mut self) -> PathBuf {
        let c = Canary::dir(&self.dir, &format!("dir{}", self.all.len()));
        let p = c.path.clone();
        self.all.push(c);
        p
    }

    fn assert_untouched(&self) {
        let changed: Vec<String> = self.all.iter().filter_map(|c| c.check()).collect();
        assert!(
            changed.is_empty(),
            "root wrote, chowned or deleted through a planted link ({} of {} canaries):\n{}",
            changed.len(),
            self.all.len(),
            changed.join("\n")
        );
    }
}

/// Plants each `link -> target` as `user`, moving an existing entry aside first (what an
/// attacker owning the directory does). Returns, per link, "OK" or the errno's name.
fn plant(user: &str, pairs: &[(PathBuf, PathBuf)]) -> Vec<(PathBuf, String)> {
    const SCRIPT: &str = r#"
import errno, os, sys
args = sys.argv[1:]
for target, link in zip(args[0::2], args[1::2]):
    try:
        if os.path.lexists(link):
            os.rename(link, link + ".moved")
        os.symlink(target, link)
        print("OK")
    except OSError as e:
        print(errno.errorcode[e.errno])
"#;
    let mut c = as_user(user, "/usr/bin/python3");
    c.arg("-c").arg(SCRIPT);
    for (target, link) in pairs {
        c.arg(target).arg(link);
    }
    let out = c.output().expect("running python3 as the child's user");
    assert!(
        out.status.success(),
        "planting as {user} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let results: Vec<String> = text.lines().map(str::to_string).collect();
    assert_eq!(results.len(), pairs.len(), "one result per plant: {text}");
    pairs.iter().map(|(_, l)| l.clone()).zip(results).collect()
}

/// Each plant under `root_dirs` must have been refused with EACCES (the directory is root's);
/// each elsewhere (the child's own directory) must have succeeded.
fn assert_plants(results: &[(PathBuf, String)], root_dirs: &[PathBuf]) {
    let mut wrong = vec![];
    for (link, r) in results {
        let in_root_dir = root_dirs.iter().any(|d| link.starts_with(d));
        let want = if in_root_dir { "EACCES" } else { "OK" };
        if r != want {
            wrong.push(format!("{}: {r}, expected {want}", link.display()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} plants by the child did not go as the layout says, e.g.:\n{}",
        wrong.len(),
        results.len(),
        wrong[..wrong.len().min(20)].join("\n")
    );
}

fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(!m.file_type().is_symlink(), "{} is a symlink", p.display());
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

const SYNAPSE_SECRETS: [&str; 5] = [
    "registration_shared_secret",
    "macaroon_secret_key",
    "form_secret",
    "turn_shared_secret",
    "worker_replication_secret",
];

/// The layout DESIGN.md §3 gives, asserted entry by entry.
fn assert_layout(lab: &Lab) {
    let (su, sg) = ids(SYNAPSE_USER);
    let (tu, tg) = ids(TURN_USER);
    let st = lab.state();
    let s = st.join("synapse");
    assert_eq!(owner_mode(&s), (0, sg, 0o750), "{}", s.display());
    assert_eq!(
        names(&s),
        set(&[
            "conf.d",
            "homeserver.yaml",
            "log.yaml",
            "secrets",
            "workers"
        ])
    );
    // The workers' own files (none without `[synapse] workers`): root's, read by the group.
    assert_eq!(owner_mode(&s.join("workers")), (0, sg, 0o750), "workers");
    for f in ["homeserver.yaml", "log.yaml"] {
        assert_eq!(owner_mode(&s.join(f)), (0, sg, 0o640), "{f}");
    }
    assert_eq!(owner_mode(&s.join("conf.d")), (0, sg, 0o750), "conf.d");
    for f in names(&s.join("conf.d")) {
        assert_eq!(
            owner_mode(&s.join("conf.d").join(&f)),
            (0, sg, 0o640),
            "{f}"
        );
    }
    let sec = s.join("secrets");
    assert_eq!(owner_mode(&sec), (0, sg, 0o750), "secrets");
    let mut want: Vec<&str> = SYNAPSE_SECRETS.to_vec();
    want.push("pgpass");
    assert_eq!(names(&sec), set(&want));
    for f in SYNAPSE_SECRETS {
        assert_eq!(owner_mode(&sec.join(f)), (0, sg, 0o640), "{f}");
    }
    // libpq ignores a group-readable passfile: this one file is Synapse's, in root's dir.
    assert_eq!(owner_mode(&sec.join("pgpass")), (su, sg, 0o600), "pgpass");
    let data = st.join("synapse-data");
    assert_eq!(owner_mode(&data), (su, sg, 0o700), "synapse-data");
    assert!(data.join("signing.key").is_file());
    assert!(data.join("media_store").is_dir());
    let c = st.join("coturn");
    assert_eq!(owner_mode(&c), (0, tg, 0o750), "coturn");
    assert_eq!(
        names(&c),
        set(&["fullchain.pem", "privkey.pem", "turnserver.conf"])
    );
    for f in names(&c) {
        assert_eq!(owner_mode(&c.join(&f)), (0, tg, 0o640), "coturn/{f}");
    }
    assert_eq!(
        owner_mode(&st.join("coturn-run")),
        (tu, tg, 0o700),
        "coturn-run"
    );
    wait_until("coturn's pid file", Duration::from_secs(20), || {
        st.join("coturn-run/turnserver.pid").is_file()
    });
}

fn require_all() -> bool {
    require_appliance()
        && require(
            "coturn",
            Path::new("/usr/bin/turnserver").exists(),
            "apt-get install coturn (packaging/install-deps does)",
        )
}

fn coturn_running(lab: &Lab) -> bool {
    lab.status()["children"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "coturn" && c["state"] == "running")
}

/// Changes the operator's Synapse override and sends the service SIGHUP: the reload
/// re-renders Synapse's config and restarts its processes.
fn change_override_and_reload(lab: &Lab, pid: i32) {
    fs::write(
        lab.path("synapse.d/50-privsep.yaml"),
        "url_preview_enabled: false\n",
    )
    .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP).unwrap();
}

#[test]
fn links_planted_by_the_children_are_never_written_through() {
    if !require_all() {
        return;
    }
    let lab = Lab::new("privsep");
    let mut run = lab.start();
    wait_until("coturn to run", Duration::from_secs(60), || {
        coturn_running(&lab)
    });
    let pid = run.pid();
    let st = lab.state();
    let s = st.join("synapse");
    let c = st.join("coturn");
    let data = st.join("synapse-data");
    let crun = st.join("coturn-run");
    let mut canaries = Canaries::new(&lab);

    // Files: each file root writes, and the temp name the old code used for it
    // (`.<name>.tmp.<supervisor pid>`).
    let mut synapse_files: Vec<PathBuf> = vec![s.join("homeserver.yaml"), s.join("log.yaml")];
    for f in SYNAPSE_SECRETS.iter().chain(&["pgpass"]) {
        synapse_files.push(s.join("secrets").join(f));
    }
    for f in ["90-test-ratelimits.yaml", "50-privsep.yaml"] {
        synapse_files.push(s.join("conf.d").join(f));
    }
    let mut synapse_pairs = vec![];
    for f in &synapse_files {
        let name = f.file_name().unwrap().to_string_lossy();
        let tmp = f.with_file_name(format!(".{name}.tmp.{pid}"));
        synapse_pairs.push((canaries.file(), tmp));
        synapse_pairs.push((canaries.file(), f.clone()));
    }
    // In Synapse's own directory a plant succeeds, and root must leave it alone.
    synapse_pairs.push((
        canaries.file(),
        data.join(format!(".homeserver.yaml.tmp.{pid}")),
    ));
    synapse_pairs.push((canaries.dir(), data.join("conf.d")));
    let mut turn_pairs = vec![];
    for f in ["turnserver.conf", "privkey.pem", "fullchain.pem"] {
        turn_pairs.push((canaries.file(), c.join(format!(".{f}.tmp.{pid}"))));
        turn_pairs.push((canaries.file(), c.join(f)));
        turn_pairs.push((canaries.file(), crun.join(format!(".{f}.tmp.{pid}"))));
    }
    turn_pairs.push((canaries.file(), c.join("turnserver.pid")));
    turn_pairs.push((canaries.file(), crun.join("turnserver.conf")));
    let mut results = plant(SYNAPSE_USER, &synapse_pairs);
    results.extend(plant(TURN_USER, &turn_pairs));

    // A changed override makes the SIGHUP re-render and restart Synapse.
    let before = lab.synapse_status()["pid"].as_i64();
    change_override_and_reload(&lab, pid);
    wait_until(
        "Synapse to restart with the new override",
        Duration::from_secs(90),
        || {
            let st = lab.synapse_status();
            st["state"] == "running" && st["pid"].as_i64() != before
        },
    );

    // Then the directories themselves, and a restart of the whole appliance with the
    // override changed again.
    let dir_pairs = vec![
        (canaries.dir(), s.join("secrets")),
        (canaries.dir(), s.join("conf.d")),
    ];
    results.extend(plant(SYNAPSE_USER, &dir_pairs));
    results.extend(plant(
        TURN_USER,
        &[
            (canaries.dir(), c.clone()),
            (canaries.file(), crun.join("x")),
        ],
    ));
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30))
            .code(),
        Some(0)
    );
    // The next supervisor's pid is not known yet: plant its old temp names for the next
    // 3000 pids, as an attacker would (one canary each for Synapse's and coturn's).
    let last: u32 = fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (hs_canary, turn_canary) = (canaries.file(), canaries.file());
    let range = (last + 1)..(last + 3000);
    let hs_pairs: Vec<_> = range
        .clone()
        .map(|p| {
            (
                hs_canary.clone(),
                s.join(format!(".homeserver.yaml.tmp.{p}")),
            )
        })
        .collect();
    let turn_pairs: Vec<_> = range
        .map(|p| {
            (
                turn_canary.clone(),
                c.join(format!(".turnserver.conf.tmp.{p}")),
            )
        })
        .collect();
    results.extend(plant(SYNAPSE_USER, &hs_pairs));
    results.extend(plant(TURN_USER, &turn_pairs));
    fs::write(
        lab.path("synapse.d/50-privsep.yaml"),
        "url_preview_enabled: false\n# changed\n",
    )
    .unwrap();
    let _run = lab.start();
    wait_until("coturn to run", Duration::from_secs(60), || {
        coturn_running(&lab)
    });

    canaries.assert_untouched();
    assert_plants(&results, &[s.clone(), c.clone()]);
    assert!(results.len() > 30, "{} plants tried", results.len());
    assert_layout(&lab);
    assert_eq!(
        fs::read_to_string(s.join("conf.d/50-privsep.yaml")).unwrap(),
        "url_preview_enabled: false\n# changed\n"
    );
}

/// `state/synapse` and `state/coturn` as the older layout left them: the child's own, with
/// links it planted inside, a real signing key and a media file.
#[test]
fn an_old_layout_is_taken_back_and_synapse_keeps_its_key_and_media() {
    if !require_all() {
        return;
    }
    let lab = Lab::new("privsep-up");
    let (su, sg) = ids(SYNAPSE_USER);
    let (tu, tg) = ids(TURN_USER);
    let st = lab.state();
    fs::create_dir(&st).unwrap();
    fs::set_permissions(&st, fs::Permissions::from_mode(0o755)).unwrap();
    let s = st.join("synapse");
    let mk = |p: &Path, uid: u32, gid: u32, mode: u32| {
        fs::create_dir_all(p).unwrap();
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    };
    mk(&s, su, sg, 0o750);
    // Synapse's copy of a secret, as the old layout kept it (the child's, 0600), with the
    // value the appliance's own secrets dir holds: replaced by a new root file, not chowned in
    // place (the child may still hold the old one open for writing).
    let form_secret = "7f".repeat(32);
    let root_secrets = st.join("secrets");
    mk(&root_secrets, 0, 0, 0o700);
    fs::write(root_secrets.join("form_secret"), &form_secret).unwrap();
    fs::set_permissions(
        root_secrets.join("form_secret"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    mk(&s.join("secrets"), su, sg, 0o700);
    let old_secret = s.join("secrets/form_secret");
    fs::write(&old_secret, &form_secret).unwrap();
    std::os::unix::fs::chown(&old_secret, Some(su), Some(sg)).unwrap();
    fs::set_permissions(&old_secret, fs::Permissions::from_mode(0o600)).unwrap();
    let old_secret_ino = fs::metadata(&old_secret).unwrap().ino();
    // A real signing key, made by Synapse's own tool, as Synapse left it.
    let key = s.join("signing.key");
    let out = as_user(SYNAPSE_USER, common::SYNAPSE_PYTHON)
        .args(["-m", "synapse._scripts.generate_signing_key", "-o"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key_bytes = fs::read(&key).unwrap();
    let key_id = String::from_utf8_lossy(&key_bytes)
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(":");
    let media = s.join("media_store/local_content/ab/cd");
    for p in [
        s.join("media_store"),
        s.join("media_store/local_content"),
        s.join("media_store/local_content/ab"),
        media.clone(),
    ] {
        mk(&p, su, sg, 0o750);
    }
    fs::write(media.join("efghijklmnop"), b"an uploaded picture").unwrap();
    std::os::unix::fs::chown(media.join("efghijklmnop"), Some(su), Some(sg)).unwrap();
    let c = st.join("coturn");
    mk(&c, tu, tg, 0o700);

    let mut canaries = Canaries::new(&lab);
    let mut synapse_pairs = vec![
        (canaries.file(), s.join("homeserver.yaml")),
        (canaries.file(), s.join("log.yaml")),
        (canaries.file(), s.join(".homeserver.yaml.tmp.4242")),
        (canaries.file(), s.join("homeserver.pid")),
        (canaries.file(), s.join("secrets/pgpass")),
        (canaries.file(), s.join("secrets/macaroon_secret_key")),
        (canaries.file(), s.join("secrets/.form_secret.tmp.4242")),
        (canaries.file(), s.join("secrets/stale")),
        // The whole conf.d is a link to a root directory.
        (canaries.dir(), s.join("conf.d")),
    ];
    synapse_pairs.push((canaries.dir(), s.join("media_store/local_content/evil")));
    let turn_pairs = vec![
        (canaries.file(), c.join("turnserver.conf")),
        (canaries.file(), c.join("privkey.pem")),
        (canaries.file(), c.join(".fullchain.pem.tmp.4242")),
        (canaries.file(), c.join("turnserver.pid")),
    ];
    let mut results = plant(SYNAPSE_USER, &synapse_pairs);
    results.extend(plant(TURN_USER, &turn_pairs));
    // The old layout is the child's: every plant succeeds.
    assert_plants(&results, &[]);

    let mut run = lab.start();
    wait_until("coturn to run", Duration::from_secs(60), || {
        coturn_running(&lab)
    });
    canaries.assert_untouched();
    assert_layout(&lab);
    let data = st.join("synapse-data");
    let m = fs::metadata(&old_secret).unwrap();
    assert_ne!(m.ino(), old_secret_ino, "the child's old file was replaced");
    assert_eq!(fs::read_to_string(&old_secret).unwrap(), form_secret);
    assert_eq!(
        fs::read(data.join("signing.key")).unwrap(),
        key_bytes,
        "the signing key moved byte for byte"
    );
    assert_eq!(
        fs::read(data.join("media_store/local_content/ab/cd/efghijklmnop")).unwrap(),
        b"an uploaded picture"
    );
    // Synapse's media stays its own (root never recursed into it).
    assert_eq!(
        owner_mode(&data.join("media_store/local_content/ab/cd/efghijklmnop")).0,
        su
    );
    // And Synapse serves that key: its server keys (federation API, /_matrix/key/v2/server).
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .arg(format!("{}/_matrix/key/v2/server", lab.synapse_url()))
        .output()
        .unwrap();
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        keys["verify_keys"].get(&key_id).is_some(),
        "Synapse does not serve {key_id}: {keys}"
    );
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30))
            .code(),
        Some(0)
    );
}

/// With workers: Redis's directory is Redis's (group Synapse's), the workers' files root's.
/// As the redis user and as Synapse, links are planted at every path root writes for the
/// workers, at Redis's directory itself, and at the sockets the children make in their own
/// directories; then a reload (a changed override: the main process and the worker re-rendered
/// and restarted) and a restart of the appliance. Every canary stays as it was, and the worker
/// and Redis come back on sockets of their own (a planted `dump.rdb` once kept Redis down).
#[test]
fn with_workers_root_never_writes_through_redis_or_the_workers_files() {
    const REDIS_USER: &str = "redis";
    if !require_appliance()
        || !require(
            "redis-server",
            Path::new("/usr/bin/redis-server").exists(),
            "apt-get install redis-server (packaging/install-deps does)",
        )
    {
        return;
    }
    let lab = Lab::new("privsep-w");
    let base = common::free_ports(1);
    *lab.synapse_extra.borrow_mut() = format!("workers = 1\nworker_base_port = {base}\n");
    *lab.turn_extra.borrow_mut() = "enabled = false\n".into();
    lab.write_config("[tls]\nmode = \"internal\"\n");
    let mut run = lab.start();
    let worker = "writer-sender-media-federation-client";
    let child = format!("synapse-{worker}");
    let worker_pid = |lab: &Lab| -> Option<i64> {
        let st = lab.status();
        st["children"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == child.as_str() && c["state"] == "running")
            .and_then(|c| c["pid"].as_i64())
    };
    wait_until("the worker to run", Duration::from_secs(60), || {
        worker_pid(&lab).is_some()
    });
    let st = lab.state();
    let s = st.join("synapse");
    let r = st.join("redis");
    let data = st.join("synapse-data");
    let yaml = s.join(format!("workers/{worker}.yaml"));
    let (ru, _) = ids(REDIS_USER);
    let (_, sg) = ids(SYNAPSE_USER);
    let layout = || {
        assert_eq!(owner_mode(&r), (ru, sg, 0o750), "{}", r.display());
        // Redis's working directory: root's and empty, nothing for Redis to load or save.
        let cwd = st.join("redis-cwd");
        assert_eq!(owner_mode(&cwd), (0, 0, 0o755), "{}", cwd.display());
        assert!(names(&cwd).is_empty(), "{:?}", names(&cwd));
        assert_eq!(owner_mode(&s.join("workers")), (0, sg, 0o750), "workers");
        assert_eq!(owner_mode(&yaml), (0, sg, 0o640), "{}", yaml.display());
        assert_eq!(
            owner_mode(&s.join("secrets/worker_replication_secret")),
            (0, sg, 0o640)
        );
    };
    layout();

    let pid = run.pid();
    let mut canaries = Canaries::new(&lab);
    // Where root writes, or what root made: the children cannot plant there.
    let mut refused = plant(
        SYNAPSE_USER,
        &[
            (canaries.file(), yaml.clone()),
            (
                canaries.file(),
                s.join(format!("workers/.{worker}.yaml.tmp.{pid}")),
            ),
            (canaries.file(), s.join("secrets/worker_replication_secret")),
            (canaries.dir(), s.join("workers")),
            (canaries.dir(), r.clone()),
        ],
    );
    refused.extend(plant(
        REDIS_USER,
        &[
            (canaries.dir(), r.clone()),
            (canaries.file(), st.join("redis-cwd/dump.rdb")),
            (canaries.file(), s.join("workers/stale.yaml")),
            (canaries.file(), s.join("homeserver.yaml")),
        ],
    ));
    assert_plants(&refused, std::slice::from_ref(&st));
    // In their own directories the plants succeed (over the live sockets, too); root must
    // never act on them.
    let mut own = plant(
        REDIS_USER,
        &[
            (canaries.file(), r.join("redis.sock")),
            // What Redis would load at a start if this were its working directory.
            (canaries.file(), r.join("dump.rdb")),
            (canaries.dir(), r.join("planted")),
        ],
    );
    own.extend(plant(
        SYNAPSE_USER,
        &[
            (
                canaries.file(),
                data.join(format!("{worker}.replication.sock")),
            ),
            (canaries.file(), data.join("main.replication.sock")),
        ],
    ));
    assert_plants(&own, &[]);

    // A reload that changes Synapse's config re-renders and restarts the main process and the
    // worker.
    let before = worker_pid(&lab);
    change_override_and_reload(&lab, pid);
    wait_until(
        "the worker restarted by the reload",
        Duration::from_secs(120),
        || worker_pid(&lab).is_some_and(|p| Some(p) != before),
    );
    assert_eq!(
        run.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
            .code(),
        Some(0)
    );
    let _run = lab.start();
    wait_until(
        "the worker after the restart",
        Duration::from_secs(60),
        || worker_pid(&lab).is_some(),
    );

    canaries.assert_untouched();
    layout();
    // Redis and the worker made their sockets again, in place of the links.
    for sock in [
        r.join("redis.sock"),
        data.join(format!("{worker}.replication.sock")),
    ] {
        use std::os::unix::fs::FileTypeExt;
        let m = fs::symlink_metadata(&sock).unwrap();
        assert!(
            m.file_type().is_socket(),
            "{} is not a socket",
            sock.display()
        );
    }
}
