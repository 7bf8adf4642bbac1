//! Identity: domain certificate authorities, the node and user certificates they issue, and
//! the check every peer's certificate goes through.
//!
//! A certificate's key *is* its holder's libp2p key (ed25519): the connection's handshake
//! proves the peer holds it, and the certificate binds that key (its peer id) to a name, a
//! domain and roles. Names, kind, roles and peer id are in the subject alternative names as
//! `urn:mvm:user:NAME` or `urn:mvm:node:NAME`, `urn:mvm:role:ROLE` and `urn:mvm:peer:ID`; the
//! domain is the issuing CA's, and a certificate that claims another is refused.
//!
//! Files: a CA directory holds `ca.crt` (0644) and `ca.key` (0600); an identity directory
//! holds `key` (the libp2p key, 0600), `cert.pem` and `ca.pem` (its CA, trusted). Nothing is
//! ever overwritten.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use mvm_component::policy::{Principal, PrincipalKind};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why a certificate or a CA cannot be made, read or trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PkiError(pub String);

fn err(m: impl Into<String>) -> PkiError {
    PkiError(m.into())
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> PkiError {
    err(format!("{}: {e}", path.display()))
}

pub use mvm_component::policy::name_ok;

fn check_name(what: &str, s: &str) -> Result<(), PkiError> {
    if name_ok(s) {
        Ok(())
    } else {
        Err(err(format!(
            "{what} '{s}': a name is 1–64 of [A-Za-z0-9._-], not starting with '.' or '-'"
        )))
    }
}

/// Writes a new file with `mode`; refuses to replace one.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                err(format!(
                    "{}: already exists; not overwriting it (remove it first)",
                    path.display()
                ))
            } else {
                io_err(path, e)
            }
        })?;
    f.write_all(bytes).map_err(|e| io_err(path, e))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    for p in paths {
        if p.exists() {
            return Err(err(format!(
                "{}: already exists; not overwriting it (remove it first)",
                p.display()
            )));
        }
    }
    Ok(())
}

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
    issuer: Issuer<'static, KeyPair>,
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
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| err(format!("cannot make a key: {e}")))?;
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
            .map_err(|e| err(format!("cannot sign the CA certificate: {e}")))?;
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
        let cert_pem = std::fs::read_to_string(&crt).map_err(|e| io_err(&crt, e))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| io_err(&key_path, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| io_err(&key_path, e))?;
        let anchor = Anchor::from_pem(&cert_pem).map_err(|e| io_err(&crt, e))?;
        if anchor.spki_raw != key.public_key_raw() {
            return Err(io_err(&key_path, "not the key of ca.crt"));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| io_err(&crt, e))?;
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
            .map_err(|_| err("only ed25519 keys can be certified"))?;
        let peer = key.to_peer_id();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, subject.name.clone());
        p.distinguished_name
            .push(DnType::OrganizationName, self.domain.clone());
        let uri = |s: String| -> Result<SanType, PkiError> {
            Ok(SanType::URI(s.try_into().map_err(|e| err(format!("{e}")))?))
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
            .map_err(|e| err(format!("cannot sign: {e}")))?;
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
                let bytes = std::fs::read(p).map_err(|e| io_err(p, e))?;
                Keypair::from_protobuf_encoding(&bytes)
                    .map_err(|e| io_err(p, format!("not a libp2p key: {e}")))?
            }
            None => Keypair::generate_ed25519(),
        };
        let pem = self.certify(subject, &key.public(), days)?;
        std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
        if new_key {
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| err(format!("cannot encode the key: {e}")))?;
            write_new(&key_path, &bytes, 0o600)?;
        }
        write_new(&cert_path, pem.as_bytes(), 0o644)?;
        write_new(&ca_path, self.cert_pem.as_bytes(), 0o644)?;
        Ok(subject.principal(&self.domain))
    }
}

/// Who a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// User or node.
    pub kind: PrincipalKind,
    /// The name.
    pub name: String,
    /// The roles.
    pub roles: Vec<String>,
}

impl Subject {
    fn principal(&self, domain: &str) -> Principal {
        let mut roles = self.roles.clone();
        roles.sort();
        roles.dedup();
        Principal {
            kind: self.kind,
            name: self.name.clone(),
            domain: domain.to_owned(),
            roles,
        }
    }
}

/// A trusted domain CA.
#[derive(Debug, Clone)]
struct Anchor {
    domain: String,
    der: Vec<u8>,
    subject_raw: Vec<u8>,
    spki_raw: Vec<u8>,
}

fn parse_pem(text: &str) -> Result<Vec<u8>, String> {
    let (_, p) =
        x509_parser::pem::parse_x509_pem(text.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    if p.label != "CERTIFICATE" {
        return Err(format!("a PEM '{}', not a CERTIFICATE", p.label));
    }
    Ok(p.contents)
}

fn org(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_owned)
}

impl Anchor {
    fn from_pem(text: &str) -> Result<Anchor, String> {
        Anchor::from_der(parse_pem(text)?)
    }

    fn from_der(der: Vec<u8>) -> Result<Anchor, String> {
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| format!("not a certificate: {e}"))?;
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca);
        if !is_ca {
            return Err("not a CA certificate".into());
        }
        cert.verify_signature(None)
            .map_err(|e| format!("its self-signature does not verify: {e}"))?;
        let domain = org(&cert).ok_or("it names no domain (O=)")?;
        if !name_ok(&domain) {
            return Err(format!("its domain '{domain}' is not a valid name"));
        }
        let subject_raw = cert.subject().as_raw().to_vec();
        let spki_raw = cert.public_key().subject_public_key.data.to_vec();
        Ok(Anchor {
            domain,
            subject_raw,
            spki_raw,
            der,
        })
    }
}

/// The domain CAs a daemon trusts.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    anchors: Vec<Anchor>,
}

/// Why a peer's certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate refused: {0}")]
pub struct AuthError(pub String);

impl Trust {
    /// Adds the CA certificate in `path` (PEM).
    ///
    /// # Errors
    /// The file cannot be read, or is not a valid CA certificate.
    pub fn add_file(&mut self, path: &Path) -> Result<(), PkiError> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        self.add_pem(&text).map_err(|e| io_err(path, e))
    }

    /// Adds a CA certificate (PEM); one already trusted is not added twice.
    ///
    /// # Errors
    /// Not a valid CA certificate.
    pub fn add_pem(&mut self, text: &str) -> Result<(), String> {
        let a = Anchor::from_pem(text)?;
        if !self.anchors.iter().any(|b| b.der == a.der) {
            self.anchors.push(a);
        }
        Ok(())
    }

    /// The trusted domains.
    pub fn domains(&self) -> Vec<String> {
        let mut d: Vec<String> = self.anchors.iter().map(|a| a.domain.clone()).collect();
        d.sort();
        d.dedup();
        d
    }

    /// Checks `der` as the certificate of `peer`: issued by a trusted CA, signature intact,
    /// valid now, not a CA, and certifying `peer`'s own key. Returns who it certifies.
    ///
    /// # Errors
    /// Why it is refused.
    pub fn verify(&self, der: &[u8], peer: &PeerId) -> Result<Principal, AuthError> {
        let refuse = |m: String| AuthError(m);
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| refuse(format!("not an X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(refuse("trailing bytes after the certificate".into()));
        }
        let issuer_raw = cert.issuer().as_raw();
        let anchors: Vec<&Anchor> = self
            .anchors
            .iter()
            .filter(|a| a.subject_raw == issuer_raw)
            .collect();
        if anchors.is_empty() {
            return Err(refuse(format!(
                "issued by an unknown CA ({}); trusted: {}",
                cert.issuer(),
                self.domains().join(", ")
            )));
        }
        // Each candidate CA is parsed once: for the signature, then for its own validity.
        let (anchor, ca) = anchors
            .into_iter()
            .find_map(|a| {
                let (_, ca) = X509Certificate::from_der(&a.der).ok()?;
                cert.verify_signature(Some(ca.public_key()))
                    .is_ok()
                    .then_some((a, ca))
            })
            .ok_or_else(|| {
                refuse(format!(
                    "its signature does not verify against the CA of domain {} (tampered, or \
                     signed by another key)",
                    org(&cert).unwrap_or_default()
                ))
            })?;
        let validity = cert.validity();
        if !validity.is_valid() {
            return Err(refuse(format!(
                "not valid now (valid from {} to {})",
                validity.not_before, validity.not_after
            )));
        }
        if !ca.validity().is_valid() {
            return Err(refuse(format!(
                "the CA of domain {} has expired",
                anchor.domain
            )));
        }
        if cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca)
        {
            return Err(refuse("a CA certificate cannot identify a peer".into()));
        }
        match org(&cert) {
            Some(d) if d == anchor.domain => {}
            other => {
                return Err(refuse(format!(
                    "it claims domain {} but was issued by the CA of domain {}",
                    other.unwrap_or_default(),
                    anchor.domain
                )));
            }
        }
        let mut kind_name = None;
        let mut roles = Vec::new();
        let mut bound = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                let GeneralName::URI(u) = n else { continue };
                let Some(rest) = u.strip_prefix("urn:mvm:") else {
                    continue;
                };
                let (tag, value) = rest.split_once(':').unwrap_or((rest, ""));
                match tag {
                    "user" => kind_name = Some((PrincipalKind::User, value.to_owned())),
                    "node" => kind_name = Some((PrincipalKind::Node, value.to_owned())),
                    "role" if name_ok(value) => roles.push(value.to_owned()),
                    "peer" => bound = Some(value.to_owned()),
                    _ => {}
                }
            }
        }
        let (kind, name) = kind_name
            .filter(|(_, n)| name_ok(n))
            .ok_or_else(|| refuse("it names no MVM user or node".into()))?;
        // The certified key must be the peer's own: that is what the connection proved.
        let key_peer = key_peer(&cert).map_err(refuse)?;
        if key_peer != *peer {
            return Err(refuse(format!(
                "it is bound to peer {key_peer}, not to {peer} (another's certificate)"
            )));
        }
        if bound.as_deref().is_some_and(|b| b != peer.to_string()) {
            return Err(refuse("its peer id does not match its key".into()));
        }
        roles.sort();
        roles.dedup();
        Ok(Principal {
            kind,
            name,
            domain: anchor.domain.clone(),
            roles,
        })
    }
}

/// A daemon's or client's identity: its key, its certificate, and the CAs it trusts.
#[derive(Clone)]
pub struct Credentials {
    /// The libp2p key the certificate certifies.
    pub key: Keypair,
    /// The certificate, DER.
    pub cert: Vec<u8>,
    /// Who the certificate says this is.
    pub principal: Principal,
    /// The CAs trusted (its own CA, and any added).
    pub trust: Trust,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("principal", &self.principal)
            .field("trust", &self.trust.domains())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads the identity in `dir` (`key`, `cert.pem`, `ca.pem`), trusting `ca.pem` and the
    /// CA certificates `trust`, and checks the certificate as a peer would.
    ///
    /// # Errors
    /// A missing or bad file, or a certificate its own CA would refuse.
    pub fn load(dir: &Path, trust: &[PathBuf]) -> Result<Credentials, PkiError> {
        let key_path = dir.join("key");
        let cert_path = dir.join("cert.pem");
        let ca_path = dir.join("ca.pem");
        if !cert_path.exists() {
            return Err(err(format!(
                "{}: no certificate; issue one with `mvm ca issue --ca CA-DIR --out {} node|user NAME`",
                cert_path.display(),
                dir.display()
            )));
        }
        let bytes = std::fs::read(&key_path).map_err(|e| io_err(&key_path, e))?;
        let key = Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| io_err(&key_path, format!("not a libp2p key: {e}")))?;
        let text = std::fs::read_to_string(&cert_path).map_err(|e| io_err(&cert_path, e))?;
        let cert = parse_pem(&text).map_err(|e| io_err(&cert_path, e))?;
        let mut t = Trust::default();
        t.add_file(&ca_path)?;
        for p in trust {
            t.add_file(p)?;
        }
        let principal = t
            .verify(&cert, &key.public().to_peer_id())
            .map_err(|e| io_err(&cert_path, e))?;
        Ok(Credentials {
            key,
            cert,
            principal,
            trust: t,
        })
    }

    /// Fresh credentials for `subject` with a new key, issued by `ca` and trusting only it,
    /// kept in memory (for tests and embedding; daemons load theirs from files).
    ///
    /// # Errors
    /// A bad name.
    pub fn ephemeral(ca: &Ca, subject: &Subject) -> Result<Credentials, PkiError> {
        let key = Keypair::generate_ed25519();
        let pem = ca.certify(subject, &key.public(), 365)?;
        let cert = parse_pem(&pem).map_err(err)?;
        let mut trust = Trust::default();
        trust.add_pem(ca.cert_pem()).map_err(err)?;
        let principal = trust
            .verify(&cert, &key.public().to_peer_id())
            .map_err(|e| err(e.to_string()))?;
        Ok(Credentials {
            key,
            cert,
            principal,
            trust,
        })
    }

    /// This identity's peer id.
    pub fn peer(&self) -> PeerId {
        self.key.public().to_peer_id()
    }
}

/// The peer id of the ed25519 key a certificate certifies.
fn key_peer(cert: &X509Certificate<'_>) -> Result<PeerId, String> {
    let spki = &cert.public_key().subject_public_key.data;
    libp2p::identity::ed25519::PublicKey::try_from_bytes(spki)
        .map(|k| libp2p::identity::PublicKey::from(k).to_peer_id())
        .map_err(|_| "it does not certify an ed25519 key".to_owned())
}

/// The identity a certificate file names, checked against the CA files `trust` (for
/// `mvm policy query --actor CERT`; the key binding is not checked, as there is no peer).
///
/// # Errors
/// The file cannot be read, or the certificate is refused.
pub fn read_principal(cert: &Path, trust: &Trust) -> Result<Principal, PkiError> {
    let text = std::fs::read_to_string(cert).map_err(|e| io_err(cert, e))?;
    let der = parse_pem(&text).map_err(|e| io_err(cert, e))?;
    let (_, x) = X509Certificate::from_der(&der).map_err(|e| io_err(cert, e))?;
    let peer = key_peer(&x).map_err(|e| io_err(cert, e))?;
    trust.verify(&der, &peer).map_err(|e| io_err(cert, e))
}

#[cfg(test)]
mod tests;
