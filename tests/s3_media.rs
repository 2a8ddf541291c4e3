//! Media on S3 (issue #26 item 4): the real appliance with synapse-s3-storage-provider in
//! Synapse's venv, against moto's S3 server (a real S3 API implementation from PyPI) this
//! test starts on loopback. An upload lands in the bucket before it is answered, a download
//! whose local copy is gone comes back from the bucket, a backup says it does not hold the
//! media, and with the store down an upload fails instead of living on this disk alone.

// This test process drives the binary from outside: std's process API is the right tool here.
#![allow(clippy::disallowed_methods)]

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Lab, require, require_appliance, wait_until};
use serde_json::Value;

const MOTO: &str = "/opt/venvs/moto/bin/moto_server";
const BUCKET: &str = "hm-media";
const SECRET: &str = "s3-secret-never-in-yaml";

/// moto in server mode on a free loopback port; killed when dropped (it keeps everything in
/// memory, so nothing is left behind).
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = common::free_port();
        let child = Command::new(MOTO)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let moto = Moto { child, port };
        wait_until("moto answers", Duration::from_secs(30), || {
            Command::new("curl")
                .args(["-fs", "-o", "/dev/null"])
                .arg(format!("{}/moto-api/", moto.url()))
                .status()
                .is_ok_and(|s| s.success())
        });
        moto
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// boto3 (moto's venv) against this server; stdout.
    fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3, sys\nc = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='AKIDTEST', aws_secret_access_key='{SECRET}')\n{code}\n",
            self.url()
        );
        let out = Command::new("/opt/venvs/moto/bin/python")
            .args(["-c", &script])
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn keys(&self) -> Vec<String> {
        self.boto(&format!(
            "for o in c.list_objects_v2(Bucket='{BUCKET}').get('Contents', []): print(o['Key'])"
        ))
        .lines()
        .map(str::to_string)
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn provider_installed() -> bool {
    Command::new("/opt/venvs/matrix-synapse/bin/python")
        .args(["-c", "import s3_storage_provider"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// curl through the front door, trusting the lab's CA: (status, body).
fn front(lab: &Lab, args: &[&str], path: &str) -> (u16, Vec<u8>) {
    let out = lab
        .curl()
        .arg("--cacert")
        .arg(lab.ca_root())
        .args(["-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("{}{path}", lab.https_base()))
        .output()
        .unwrap();
    let mut body = out.stdout;
    let nl = body
        .iter()
        .rposition(|&b| b == b'\n')
        .expect("curl's status line");
    let code = String::from_utf8_lossy(&body[nl + 1..])
        .parse()
        .unwrap_or(0);
    body.truncate(nl);
    (code, body)
}

/// `doctor --only media`'s one check.
fn media_check(lab: &Lab) -> Value {
    let out = lab.run_cmd(&["doctor", "--json", "--only", "media"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("doctor: {}", String::from_utf8_lossy(&out.stdout)));
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "media:s3")
        .cloned()
        .unwrap_or_else(|| panic!("no media:s3 check: {v}"))
}

fn upload(lab: &Lab, token: &str, data: &[u8]) -> (u16, Value) {
    let file = lab.path("upload.bin");
    fs::write(&file, data).unwrap();
    let (code, out) = front(
        lab,
        &[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "content-type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
        "/_matrix/media/v3/upload?filename=note.bin",
    );
    (code, serde_json::from_slice(&out).unwrap_or(Value::Null))
}

#[test]
fn media_lands_in_the_bucket_comes_back_from_it_and_the_backup_says_so() {
    scenario(0);
}

/// The same with workers: the media repository worker is the process that talks to S3.
#[test]
fn with_workers_the_media_worker_stores_in_the_bucket() {
    scenario(2);
}

fn scenario(workers: u32) {
    if !require_appliance()
        || !require(
            "moto",
            std::path::Path::new(MOTO).exists(),
            "packaging/install-test-deps installs moto[server] into /opt/venvs/moto",
        )
        || !require(
            "redis-server",
            workers == 0 || std::path::Path::new("/usr/bin/redis-server").exists(),
            "apt install redis-server (packaging/install-deps does)",
        )
        || !require(
            "synapse-s3-storage-provider",
            provider_installed(),
            "packaging/install-test-deps installs it into /opt/venvs/matrix-synapse",
        )
    {
        return;
    }
    let moto = Moto::start();
    moto.boto(&format!("c.create_bucket(Bucket='{BUCKET}')"));

    let lab = Lab::new(&format!("s3w{workers}"));
    // Worker ports of the lab's own, so parallel labs never collide.
    let base = common::free_ports(2);
    *lab.synapse_extra.borrow_mut() = format!("workers = {workers}\nworker_base_port = {base}\n");
    *lab.turn_extra.borrow_mut() = "enabled = false\n".into();
    let secret_file = lab.path("s3.secret");
    fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o600)).unwrap();
    lab.write_config(&format!(
        "[tls]\nmode = \"internal\"\n[backup]\ndir = \"{}\"\n[media.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nprefix = \"lab/\"\naccess_key_id = \"AKIDTEST\"\nsecret_access_key_file = \"{}\"\n",
        lab.path("backups").display(),
        moto.url(),
        secret_file.display()
    ));
    lab.ok(&["check-config"]);
    let run = lab.start();
    assert!(
        run.log_text()
            .contains("media on S3 through synapse-s3-storage-provider 1."),
        "{}",
        run.log_tail()
    );

    // The secret is in no YAML Synapse reads, only in its credentials file (root's, 0640).
    let synapse_dir = lab.state().join("synapse");
    let yaml = fs::read_to_string(synapse_dir.join("homeserver.yaml")).unwrap();
    assert!(
        yaml.contains("s3_storage_provider.S3StorageProviderBackend"),
        "{yaml}"
    );
    assert!(!yaml.contains(SECRET));
    let creds = synapse_dir.join("secrets/s3_credentials");
    let meta = fs::metadata(&creds).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o640));
    assert!(fs::read_to_string(&creds).unwrap().contains(SECRET));

    let pw = lab.add_user("alice", false);
    let token = lab.front_matrix().login("alice", &pw);
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (code, v) = upload(&lab, &token, &data);
    assert_eq!(code, 200, "{v}");
    let mxc = v["content_uri"].as_str().unwrap();
    let id = mxc.rsplit('/').next().unwrap();
    // In the bucket as Synapse lays out its media store (local_content/ab/cd/rest), under
    // the prefix, byte for byte, by the time the upload was answered.
    let key = format!("lab/local_content/{}/{}/{}", &id[..2], &id[2..4], &id[4..]);
    assert!(moto.keys().contains(&key), "{key} not in {:?}", moto.keys());
    let stored = moto.boto(&format!(
        "sys.stdout.write(c.get_object(Bucket='{BUCKET}', Key='{key}')['Body'].read().hex())"
    ));
    assert_eq!(
        stored,
        data.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );

    // The local copy is only a cache: gone, the download comes from the bucket.
    let local = lab
        .state()
        .join("synapse-data/media_store/local_content")
        .join(&id[..2])
        .join(&id[2..4])
        .join(&id[4..]);
    assert!(local.exists(), "{}", local.display());
    fs::remove_file(&local).unwrap();
    let auth = format!("Authorization: Bearer {token}");
    let (code, body) = front(
        &lab,
        &["-H", &auth],
        &format!("/_matrix/client/v1/media/download/matrix.test/{id}"),
    );
    assert_eq!(code, 200);
    assert!(body == data, "the download differs from the upload");

    // The backup holds no media and says where it is.
    let made = lab.ok(&["backup"]);
    assert!(
        made.contains(&format!(
            "not in this backup: media and thumbnails: they live in S3 bucket \"{BUCKET}\""
        )),
        "{made}"
    );
    let file = fs::read_dir(lab.path("backups"))
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| p.extension().is_some_and(|e| e == "tar"))
        .unwrap();
    let list = Command::new("tar").arg("-tf").arg(&file).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("signing.key"), "{list}");
    assert!(!list.contains("media_store"), "{list}");

    let doctor = media_check(&lab);
    assert_eq!(doctor["status"], "pass", "{doctor}");
    assert!(
        doctor["seen"].as_str().unwrap().contains("read back"),
        "{doctor}"
    );

    // The store down: the upload fails (the client retries) rather than living here alone,
    // and the doctor says so.
    drop(moto);
    let (code, v) = upload(&lab, &token, b"while the store is down");
    assert!(code >= 500, "an upload with S3 down got {code}: {v}");
    assert!(v.get("content_uri").is_none(), "{v}");
    let st = lab.status();
    assert_eq!(lab.synapse_status()["state"], "running", "{st}");
    let doctor = media_check(&lab);
    assert_eq!(doctor["status"], "fail", "{doctor}");
    assert!(
        doctor["fix"]
            .as_str()
            .unwrap()
            .contains("every upload fails"),
        "{doctor}"
    );
    drop(run);
}
