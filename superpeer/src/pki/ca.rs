//! Domain certificate authorities: made once, then issuing node and user certificates.

use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use mvm_component::policy::Principal;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};

use super::trust::Anchor;
use super::{FileError, PkiError, Subject, check_name, refuse_existing, write_new};

fn serial(seed: &[u8]) -> SerialNumber {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(seed);
    h.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    h.update(std::process::id().to_le_bytes());
    let mut bytes = h.finalize()[..16].to_vec();
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

/// How long a certificate is valid, from an hour ago (clocks differ) to `days` from now.
fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(days),
    )
}

/// A libp2p ed25519 public key as a certificate's subject key.
struct Ed25519Public(Vec<u8>);

impl PublicKeyData for Ed25519Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// A domain's certificate authority, loaded with its key.
pub struct Ca {
    domain: String,
    cert_pem: String,
    pub(super) issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// The files of a CA directory.
pub fn ca_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.crt"), dir.join("ca.key"))
}

impl Ca {
    /// Creates the CA of `domain` in `dir` (`ca.crt`, `ca.key`), valid for `days`.
    ///
    /// # Errors
    /// A bad domain name, an existing CA there, or a file that cannot be written.
    pub fn init(dir: &Path, domain: &str, days: i64) -> Result<Ca, PkiError> {
        check_name("the domain", domain)?;
        let (crt, key_path) = ca_files(dir);
        refuse_existing(&[&crt, &key_path])?;
        std::fs::create_dir_all(dir).map_err(PkiError::at(dir))?;
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(PkiError::make("make a key"))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, format!("MVM CA of domain {domain}"));
        p.distinguished_name
            .push(DnType::OrganizationName, domain.to_owned());
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.serial_number = Some(serial(key.public_key_raw()));
        (p.not_before, p.not_after) = validity(days);
        let cert = p
            .self_signed(&key)
            .map_err(PkiError::make("sign the CA certificate"))?;
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&crt, cert.pem().as_bytes(), 0o644)?;
        Ok(Ca {
            domain: domain.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        })
    }

    /// Loads the CA in `dir`.
    ///
    /// # Errors
    /// A missing or unreadable file, or a certificate that is not a CA's.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let (crt, key_path) = ca_files(dir);
        let cert_pem = std::fs::read_to_string(&crt).map_err(PkiError::at(&crt))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(PkiError::at(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(PkiError::at(&key_path))?;
        let anchor = Anchor::from_pem(&cert_pem).map_err(PkiError::at(&crt))?;
        if anchor.spki_raw != key.public_key_raw() {
            return Err(PkiError::at(&key_path)(FileError::KeyMismatch));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(PkiError::at(&crt))?;
        Ok(Ca {
            domain: anchor.domain,
            cert_pem,
            issuer,
        })
    }

    /// The CA's domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `subject` holding `key`, valid for `days`, PEM.
    ///
    /// # Errors
    /// A bad name or role, or a key that is not ed25519.
    pub fn certify(
        &self,
        subject: &Subject,
        key: &libp2p::identity::PublicKey,
        days: i64,
    ) -> Result<String, PkiError> {
        let (from, to) = validity(days);
        self.certify_between(subject, key, from, to)
    }

    /// As [`Ca::certify`], valid between two instants (tests make expired certificates).
    pub(crate) fn certify_between(
        &self,
        subject: &Subject,
        key: &libp2p::identity::PublicKey,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<String, PkiError> {
        check_name("the name", &subject.name)?;
        for r in &subject.roles {
            check_name("the role", r)?;
        }
        let ed = key
            .clone()
            .try_into_ed25519()
            .map_err(|_| PkiError::NotEd25519)?;
        let peer = key.to_peer_id();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, subject.name.clone());
        p.distinguished_name
            .push(DnType::OrganizationName, self.domain.clone());
        let uri = |s: String| -> Result<SanType, PkiError> {
            Ok(SanType::URI(
                s.try_into().map_err(PkiError::make("name the subject"))?,
            ))
        };
        let mut sans = vec![
            uri(format!(
                "urn:mvm:{}:{}",
                subject.kind.as_str(),
                subject.name
            ))?,
            uri(format!("urn:mvm:peer:{peer}"))?,
        ];
        for r in &subject.roles {
            sans.push(uri(format!("urn:mvm:role:{r}"))?);
        }
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.serial_number = Some(serial(&ed.to_bytes()));
        p.not_before = not_before;
        p.not_after = not_after;
        let cert = p
            .signed_by(&Ed25519Public(ed.to_bytes().to_vec()), &self.issuer)
            .map_err(PkiError::make("sign"))?;
        Ok(cert.pem())
    }

    /// Issues an identity into `out` (`key`, `cert.pem`, `ca.pem`): for a new key, or for the
    /// libp2p key already in `key` (`existing`, e.g. a node's from an earlier run).
    ///
    /// # Errors
    /// A bad name, an existing file, or a file that cannot be written.
    pub fn issue(
        &self,
        subject: &Subject,
        out: &Path,
        existing: Option<&Path>,
        days: i64,
    ) -> Result<Principal, PkiError> {
        let key_path = out.join("key");
        let cert_path = out.join("cert.pem");
        let ca_path = out.join("ca.pem");
        let new_key = existing.is_none_or(|e| e != key_path);
        refuse_existing(&[&cert_path, &ca_path])?;
        if new_key {
            refuse_existing(&[&key_path])?;
        }
        let key = match existing {
            Some(p) => {
                let bytes = std::fs::read(p).map_err(PkiError::at(p))?;
                Keypair::from_protobuf_encoding(&bytes).map_err(PkiError::at(p))?
            }
            None => Keypair::generate_ed25519(),
        };
        let pem = self.certify(subject, &key.public(), days)?;
        std::fs::create_dir_all(out).map_err(PkiError::at(out))?;
        if new_key {
            let bytes = key.to_protobuf_encoding().map_err(PkiError::Encode)?;
            write_new(&key_path, &bytes, 0o600)?;
        }
        write_new(&cert_path, pem.as_bytes(), 0o644)?;
        write_new(&ca_path, self.cert_pem.as_bytes(), 0o644)?;
        Ok(subject.principal(&self.domain))
    }
}
