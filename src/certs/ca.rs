//! The internal CA (`tls.mode = "internal"`, and the stand-in until ACME delivers): made once
//! in `state/ca`, it signs a certificate for every served name. Its `root.pem` is what browsers
//! and clients of a LAN setup trust.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::{Cert, Source};
use crate::fsutil::{Owner, ensure_dir, set_owner_mode, write_atomic};

pub struct InternalCa {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    pub root_path: PathBuf,
}

impl InternalCa {
    /// Loads the CA from `dir`, creating it on first use (key 0600, root.pem 0644).
    pub fn load_or_create(dir: &Path, server_name: &str) -> Result<InternalCa> {
        ensure_dir(dir, Owner::root(), 0o700)?;
        let key_path = dir.join("root.key");
        let root_path = dir.join("root.pem");
        if !key_path.exists() || !root_path.exists() {
            let key = KeyPair::generate().context("generating the CA key")?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(
                DnType::CommonName,
                format!("homelab-matrix local CA for {server_name}"),
            );
            dn.push(DnType::OrganizationName, "homelab-matrix");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(3650);
            let cert = params
                .self_signed(&key)
                .context("signing the CA certificate")?;
            write_atomic(
                &key_path,
                key.serialize_pem().as_bytes(),
                Owner::root(),
                0o600,
            )?;
            write_atomic(&root_path, cert.pem().as_bytes(), Owner::root(), 0o644)?;
            tracing::info!(root = %root_path.display(), "created the internal CA");
        }
        set_owner_mode(&key_path, Owner::root(), 0o600)?;
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let root_pem = std::fs::read_to_string(&root_path)
            .with_context(|| format!("reading {}", root_path.display()))?;
        let key = KeyPair::from_pem(&key_pem).context("loading the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(&root_pem, key).context("loading the CA certificate")?;
        Ok(InternalCa {
            root_pem,
            issuer,
            root_path,
        })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A leaf for `names`, valid for `validity` (minus a day of clock-skew slack up front).
    pub fn issue(&self, names: &[String], validity: Duration) -> Result<Cert> {
        let key = KeyPair::generate().context("generating a key")?;
        let mut params = CertificateParams::new(names.to_vec()).context("certificate names")?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::seconds(validity.as_secs() as i64);
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a certificate")?;
        Cert::parse(&cert.pem(), &key.serialize_pem(), Source::Internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaves_that_chain_to_the_root() {
        let d = tempfile::tempdir().unwrap();
        if !nix::unistd::Uid::effective().is_root() {
            return; // chown to root needs root; the integration tests cover this path
        }
        let ca = InternalCa::load_or_create(d.path(), "example.com").unwrap();
        let leaf = ca
            .issue(&["matrix.example.com".into()], Duration::from_secs(86400))
            .unwrap();
        assert_eq!(leaf.names, vec!["matrix.example.com"]);
        assert!(leaf.issuer.contains("homelab-matrix local CA"));
        // Loading again gives the same CA, not a new one.
        let again = InternalCa::load_or_create(d.path(), "example.com").unwrap();
        assert_eq!(again.root_pem(), ca.root_pem());
        // Verify the chain with webpki against the root as trust anchor.
        let root = rustls_pki_types::CertificateDer::from(pem_der(ca.root_pem()));
        let anchor = webpki::anchor_from_trusted_cert(&root).unwrap();
        let leaf_der = rustls_pki_types::CertificateDer::from(pem_der(&leaf.chain_pem));
        let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .unwrap();
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}
