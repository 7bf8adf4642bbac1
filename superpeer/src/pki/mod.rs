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
use libp2p::identity::{DecodingError, Keypair};
use mvm_component::policy::{Principal, PrincipalKind};
use x509_parser::prelude::{FromDer, X509Certificate};

mod ca;
mod revoke;
mod trust;

pub use ca::{Ca, ca_files};
pub use revoke::{CRL_FILE, Crl, CrlError, MAX_CRL, Revoked, crl_der, serial_of, serial_of_der};
pub use trust::{AuthError, Trust, TrustError};
use trust::{key_peer, parse_pem};

/// Why a certificate or a CA cannot be made, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file that cannot be read, written or used.
    #[error("{}: {error}", .path.display())]
    File {
        /// The file (or directory).
        path: PathBuf,
        /// Why.
        error: FileError,
    },
    /// A file that would be overwritten.
    #[error("{}: already exists; not overwriting it (remove it first)", .0.display())]
    Exists(PathBuf),
    /// A domain, name or role that is not a valid name.
    #[error("{field} '{value}': a name is 1–64 of [A-Za-z0-9._-], not starting with '.' or '-'")]
    Name {
        /// Which, e.g. `the domain`.
        field: &'static str,
        /// The name given.
        value: String,
    },
    /// An identity directory without a certificate.
    #[error(
        "{}: no certificate; issue one with `mvm ca issue --ca CA-DIR --out {} node|user NAME`",
        .cert.display(),
        .dir.display()
    )]
    NoCertificate {
        /// The certificate file looked for.
        cert: PathBuf,
        /// The identity directory.
        dir: PathBuf,
    },
    /// A key that is not ed25519.
    #[error("only ed25519 keys can be certified")]
    NotEd25519,
    /// Making a key, a name or a signature failed.
    #[error("cannot {doing}: {error}")]
    Make {
        /// What, e.g. `sign the CA certificate`.
        doing: &'static str,
        /// Why.
        error: rcgen::Error,
    },
    /// A key cannot be encoded.
    #[error("cannot encode the key: {0}")]
    Encode(DecodingError),
    /// A certificate made in memory is not PEM of a certificate, or its CA's is not a CA's.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// A certificate made in memory is refused.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// What is wrong with a file of an identity or a CA.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It cannot be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// It is not a libp2p key.
    #[error("not a libp2p key: {0}")]
    Key(#[from] DecodingError),
    /// It is not PEM of a certificate, or of a CA's.
    #[error(transparent)]
    Certificate(#[from] TrustError),
    /// Its certificate would be refused by a peer.
    #[error(transparent)]
    Refused(#[from] AuthError),
    /// A CA's file that cannot be used to sign.
    #[error(transparent)]
    Ca(#[from] rcgen::Error),
    /// A revocation list that cannot be read.
    #[error(transparent)]
    Crl(#[from] CrlError),
    /// A CA's key file that does not hold the key of its certificate.
    #[error("not the key of ca.crt")]
    KeyMismatch,
}

impl PkiError {
    /// `error` about the file `path`.
    fn at<E: Into<FileError>>(path: &Path) -> impl FnOnce(E) -> PkiError + '_ {
        move |error| PkiError::File {
            path: path.to_owned(),
            error: error.into(),
        }
    }

    fn make(doing: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
        move |error| PkiError::Make { doing, error }
    }
}

pub use mvm_component::policy::name_ok;

fn check_name(field: &'static str, value: &str) -> Result<(), PkiError> {
    if name_ok(value) {
        Ok(())
    } else {
        Err(PkiError::Name {
            field,
            value: value.to_owned(),
        })
    }
}

/// Writes a new file with `mode`; refuses to replace one.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_owned())
            } else {
                PkiError::at(path)(e)
            }
        })?;
    f.write_all(bytes).map_err(PkiError::at(path))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists((*p).to_owned())),
        None => Ok(()),
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
            return Err(PkiError::NoCertificate {
                cert: cert_path,
                dir: dir.to_owned(),
            });
        }
        let bytes = std::fs::read(&key_path).map_err(PkiError::at(&key_path))?;
        let key = Keypair::from_protobuf_encoding(&bytes).map_err(PkiError::at(&key_path))?;
        let text = std::fs::read_to_string(&cert_path).map_err(PkiError::at(&cert_path))?;
        let cert = parse_pem(&text).map_err(PkiError::at(&cert_path))?;
        let mut t = Trust::default();
        t.add_file(&ca_path)?;
        for p in trust {
            t.add_file(p)?;
        }
        let principal = t
            .verify(&cert, &key.public().to_peer_id())
            .map_err(PkiError::at(&cert_path))?;
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
        let cert = parse_pem(&pem)?;
        let mut trust = Trust::default();
        trust.add_pem(ca.cert_pem())?;
        let principal = trust.verify(&cert, &key.public().to_peer_id())?;
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

/// The identity a certificate file names, checked against the CA files `trust` (for
/// `mvm policy query --actor CERT`; the key binding is not checked, as there is no peer).
///
/// # Errors
/// The file cannot be read, or the certificate is refused.
pub fn read_principal(cert: &Path, trust: &Trust) -> Result<Principal, PkiError> {
    let text = std::fs::read_to_string(cert).map_err(PkiError::at(cert))?;
    let der = parse_pem(&text).map_err(PkiError::at(cert))?;
    let (_, x) = X509Certificate::from_der(&der)
        .map_err(|e| PkiError::at(cert)(TrustError::Der(e.to_string())))?;
    let peer = key_peer(&x).map_err(PkiError::at(cert))?;
    trust.verify(&der, &peer).map_err(PkiError::at(cert))
}

#[cfg(test)]
mod tests;
