//! Media on S3-compatible storage through synapse-s3-storage-provider (PyPI; its README and
//! `s3_storage_provider.py` at 1.7.0). The provider is a module inside every Synapse process
//! that serves media; the appliance renders its config, hands it the credentials as a file
//! and checks its version, as releases before 1.6.0 break uploads on Synapse 1.140+ (Synapse's
//! upgrade notes for 1.140).
//!
//! `store_synchronous`: an upload is answered only once it is in the bucket, so a store that is
//! down fails the upload (the client retries) instead of leaving it on this disk alone, which
//! the provider would only log. Local storage stays on (`enable_local_media_storage: false`
//! misbehaves, synapse#19413): the media store becomes a cache of the bucket.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::config::Config;
use crate::supervisor::{self, Command, RunAs};

/// The credentials file in Synapse's secrets directory (boto3's shared credentials format).
pub const CREDENTIALS: &str = "s3_credentials";

/// The oldest provider that uploads on this Synapse.
pub const PROVIDER_FLOOR: (u32, u32, u32) = (1, 6, 0);
pub const PROVIDER_PACKAGE: &str = "synapse-s3-storage-provider";

/// `media_storage_providers` (Synapse config manual, "media_storage_providers").
pub fn providers(cfg: &Config) -> Value {
    let s3 = &cfg.media.s3;
    let mut conf = json!({
        "bucket": s3.bucket,
        "storage_class": s3.storage_class,
    });
    for (key, v) in [
        ("endpoint_url", &s3.endpoint),
        ("region_name", &s3.region),
        ("prefix", &s3.prefix),
    ] {
        if !v.is_empty() {
            conf[key] = json!(v);
        }
    }
    json!([{
        "module": "s3_storage_provider.S3StorageProviderBackend",
        "store_local": true,
        "store_remote": true,
        "store_synchronous": true,
        "config": conf,
    }])
}

/// The credentials file's text (boto3 reads it through AWS_SHARED_CREDENTIALS_FILE), so the
/// secret is in no YAML file and on no command line.
pub fn credentials(cfg: &Config) -> Result<String> {
    let s3 = &cfg.media.s3;
    let secret = crate::config::first_line(std::path::Path::new(&s3.secret_access_key_file))
        .with_context(|| {
            format!(
                "media.s3.secret_access_key_file {} cannot be read or is empty; write the bucket's secret access key into it (chmod 600)",
                s3.secret_access_key_file
            )
        })?;
    Ok(format!(
        "[default]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
        s3.access_key_id
    ))
}

/// The environment every Synapse process gets with S3 on: the credentials file, and no look
/// for instance metadata at 169.254.169.254 (boto3's last resort, pointless off a cloud).
pub fn env(cfg: &Config, secrets_dir: &std::path::Path) -> Vec<(&'static str, String)> {
    if !cfg.media.s3.enabled() {
        return vec![];
    }
    vec![
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            secrets_dir.join(CREDENTIALS).display().to_string(),
        ),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

/// The installed provider's version, refused when missing or older than the floor.
pub async fn check_provider(cfg: &Config) -> Result<String> {
    let mut cmd = Command::new(&cfg.synapse.python).arg("-c").arg(format!(
        "import importlib.metadata as m, s3_storage_provider; print(m.version({PROVIDER_PACKAGE:?}))"
    ));
    cmd.run_as = RunAs::lookup(&cfg.synapse.user).ok();
    let out = supervisor::run_helper(cmd, b"", Duration::from_secs(60)).await?;
    let install = format!(
        "{} -m pip install '{PROVIDER_PACKAGE}>={}.{}.{}' (the homelab-matrix-synapse-venv package keeps it when it builds the venv again), or remove media.s3.bucket",
        cfg.synapse.python, PROVIDER_FLOOR.0, PROVIDER_FLOOR.1, PROVIDER_FLOOR.2
    );
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.exit.success() || v.is_empty() {
        bail!(
            "media.s3.bucket is set, but Synapse's Python cannot import {PROVIDER_PACKAGE}: {}\n    fix: {install}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    if version_tuple(&v) < PROVIDER_FLOOR {
        bail!(
            "{PROVIDER_PACKAGE} {v} is installed; before {}.{}.{} it breaks uploads on Synapse 1.140 and later\n    fix: {install}",
            PROVIDER_FLOOR.0,
            PROVIDER_FLOOR.1,
            PROVIDER_FLOOR.2
        );
    }
    Ok(v)
}

/// What Synapse's processes would do with the bucket, done once: as Synapse's user, with its
/// credentials file and boto3, head the bucket, write a probe object, read it back, delete it.
/// The error is boto3's last line (AccessDenied, NoSuchBucket, a connection error).
pub async fn probe(cfg: &Config) -> Result<()> {
    let s3 = &cfg.media.s3;
    let l = super::Layout::new(&cfg.state_dir());
    if !l.secrets().join(CREDENTIALS).exists() {
        bail!("no credentials file yet: start the service once, it writes one for Synapse");
    }
    // Values travel as arguments, never inside the program text.
    const PROBE: &str = "import sys, boto3\n\
b, e, r, k = sys.argv[1:5]\n\
c = boto3.client('s3', endpoint_url=e or None, region_name=r or None)\n\
c.head_bucket(Bucket=b)\n\
c.put_object(Bucket=b, Key=k, Body=b'homelab-matrix doctor')\n\
assert c.get_object(Bucket=b, Key=k)['Body'].read() == b'homelab-matrix doctor', 'read back differs'\n\
c.delete_object(Bucket=b, Key=k)\n";
    let mut cmd = Command::new(&cfg.synapse.python)
        .arg("-c")
        .arg(PROBE)
        .arg(&s3.bucket)
        .arg(&s3.endpoint)
        .arg(&s3.region)
        .arg(format!("{}homelab-matrix-doctor-probe", s3.prefix));
    for (k, v) in env(cfg, &l.secrets()) {
        cmd = cmd.env(k, v);
    }
    cmd.run_as = RunAs::lookup(&cfg.synapse.user).ok();
    let out = supervisor::run_helper(cmd, b"", Duration::from_secs(60)).await?;
    if !out.exit.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{}", err.trim().lines().last().unwrap_or("boto3 failed"));
    }
    Ok(())
}

fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut it = v
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert!(version_tuple("1.7.0") >= PROVIDER_FLOOR);
        assert!(version_tuple("1.6") >= PROVIDER_FLOOR);
        assert!(version_tuple("1.5.0") < PROVIDER_FLOOR);
        assert!(version_tuple("1.10.0") > version_tuple("1.9.3"));
    }

    #[test]
    fn providers_name_only_what_is_set() {
        let cfg = Config::from_toml(
            "server_name = \"a.b\"\n[media.s3]\nbucket = \"media\"\naccess_key_id = \"k\"\nsecret_access_key_file = \"/s\"\nendpoint = \"https://s3.example.com\"\n",
        )
        .unwrap();
        let p = providers(&cfg);
        assert_eq!(p[0]["store_synchronous"], true);
        assert_eq!(p[0]["config"]["endpoint_url"], "https://s3.example.com");
        assert!(p[0]["config"].get("region_name").is_none());
        assert_eq!(p[0]["config"]["storage_class"], "STANDARD");
    }
}
