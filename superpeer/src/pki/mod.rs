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
use x509_parser::prelude::{FromDer, X509Certificate};

mod ca;
mod trust;

pub use ca::{Ca, ca_files};
pub use trust::{AuthError, Trust, TrustError};
use trust::{key_peer, parse_pem};

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
        let cert = parse_pem(&pem).map_err(|e| err(e.to_string()))?;
        let mut trust = Trust::default();
        trust
            .add_pem(ca.cert_pem())
            .map_err(|e| err(e.to_string()))?;
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
