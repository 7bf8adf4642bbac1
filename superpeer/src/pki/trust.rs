//! The check every peer's certificate goes through: issued by a trusted domain CA, for the
//! key the peer holds, with well-formed names.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind};
use x509_parser::prelude::{CertificateRevocationList, FromDer, GeneralName, X509Certificate};

use super::revoke::{self, Crl, CrlError, MAX_CRL};
use super::{PkiError, name_ok};

/// A trusted domain CA.
#[derive(Debug, Clone)]
pub(super) struct Anchor {
    pub(super) domain: String,
    pub(super) der: Vec<u8>,
    pub(super) subject_raw: Vec<u8>,
    pub(super) spki_raw: Vec<u8>,
}

/// Why a CA certificate cannot be trusted, or a PEM file read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// Not PEM.
    #[error("not PEM: {0}")]
    Pem(String),
    /// PEM of something else.
    #[error("a PEM '{0}', not a CERTIFICATE")]
    Label(String),
    /// Not an X.509 certificate.
    #[error("not a certificate: {0}")]
    Der(String),
    /// A certificate that is not a CA's.
    #[error("not a CA certificate")]
    NotCa,
    /// A CA certificate whose self-signature fails.
    #[error("its self-signature does not verify: {0}")]
    SelfSignature(String),
    /// A CA certificate that names no domain.
    #[error("it names no domain (O=)")]
    NoDomain,
    /// A CA certificate whose domain is not a valid name.
    #[error("its domain '{0}' is not a valid name")]
    Domain(String),
}

pub(super) fn parse_pem(text: &str) -> Result<Vec<u8>, TrustError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| TrustError::Pem(e.to_string()))?;
    if p.label != "CERTIFICATE" {
        return Err(TrustError::Label(p.label));
    }
    Ok(p.contents)
}

pub(super) fn org(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_owned)
}

impl Anchor {
    pub(super) fn from_pem(text: &str) -> Result<Anchor, TrustError> {
        Anchor::from_der(parse_pem(text)?)
    }

    fn from_der(der: Vec<u8>) -> Result<Anchor, TrustError> {
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| TrustError::Der(e.to_string()))?;
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca);
        if !is_ca {
            return Err(TrustError::NotCa);
        }
        cert.verify_signature(None)
            .map_err(|e| TrustError::SelfSignature(e.to_string()))?;
        let domain = org(&cert).ok_or(TrustError::NoDomain)?;
        if !name_ok(&domain) {
            return Err(TrustError::Domain(domain));
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

/// The domain CAs a daemon trusts, and the newest revocation list of each that it holds.
/// Clones share the lists: one taken is seen by every clone at once.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    anchors: Vec<Anchor>,
    revoked: Arc<RwLock<BTreeMap<String, Crl>>>,
}

/// Why a peer's certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not an X.509 certificate.
    #[error("certificate refused: not an X.509 certificate: {0}")]
    Der(String),
    /// Bytes after the certificate.
    #[error("certificate refused: trailing bytes after the certificate")]
    Trailing,
    /// Issued by a CA that is not trusted.
    #[error("certificate refused: issued by an unknown CA ({issuer}); trusted: {}", .trusted.join(", "))]
    UnknownCa {
        /// The issuer's name.
        issuer: String,
        /// The trusted domains.
        trusted: Vec<String>,
    },
    /// A signature that no trusted CA of that name made.
    #[error(
        "certificate refused: its signature does not verify against the CA of domain {0} \
         (tampered, or signed by another key)"
    )]
    Signature(String),
    /// Not valid now.
    #[error("certificate refused: not valid now (valid from {from} to {to})")]
    Validity {
        /// Valid from.
        from: String,
        /// Valid to.
        to: String,
    },
    /// The issuing CA has expired.
    #[error("certificate refused: the CA of domain {0} has expired")]
    CaExpired(String),
    /// A CA's certificate offered as a peer's.
    #[error("certificate refused: a CA certificate cannot identify a peer")]
    Ca,
    /// It claims a domain other than its CA's.
    #[error(
        "certificate refused: it claims domain {claimed} but was issued by the CA of domain \
         {issuer}"
    )]
    Domain {
        /// The domain it claims (empty: none).
        claimed: String,
        /// Its CA's domain.
        issuer: String,
    },
    /// It names no user or node.
    #[error("certificate refused: it names no MVM user or node")]
    NoName,
    /// Its CA has revoked it.
    #[error("certificate refused: revoked by the CA of domain {domain} (serial {serial})")]
    Revoked {
        /// The CA's domain.
        domain: String,
        /// The certificate's serial, hex.
        serial: String,
    },
    /// It certifies a key that is not ed25519.
    #[error("certificate refused: it does not certify an ed25519 key")]
    Key,
    /// It certifies another peer's key.
    #[error(
        "certificate refused: it is bound to peer {bound}, not to {peer} (another's certificate)"
    )]
    OtherPeer {
        /// The peer whose key it certifies.
        bound: Box<PeerId>,
        /// The peer that offered it.
        peer: Box<PeerId>,
    },
    /// Its peer id name is not that of its key.
    #[error("certificate refused: its peer id does not match its key")]
    PeerId,
}

impl Trust {
    /// Adds the CA certificate in `path` (PEM).
    ///
    /// # Errors
    /// The file cannot be read, or is not a valid CA certificate.
    pub fn add_file(&mut self, path: &Path) -> Result<(), PkiError> {
        let text = std::fs::read_to_string(path).map_err(PkiError::at(path))?;
        self.add_pem(&text).map_err(PkiError::at(path))
    }

    /// Adds a CA certificate (PEM); one already trusted is not added twice.
    ///
    /// # Errors
    /// Not a valid CA certificate.
    pub fn add_pem(&mut self, text: &str) -> Result<(), TrustError> {
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
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| AuthError::Der(e.to_string()))?;
        if !rest.is_empty() {
            return Err(AuthError::Trailing);
        }
        let issuer_raw = cert.issuer().as_raw();
        let anchors: Vec<&Anchor> = self
            .anchors
            .iter()
            .filter(|a| a.subject_raw == issuer_raw)
            .collect();
        if anchors.is_empty() {
            return Err(AuthError::UnknownCa {
                issuer: cert.issuer().to_string(),
                trusted: self.domains(),
            });
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
            .ok_or_else(|| AuthError::Signature(org(&cert).unwrap_or_default()))?;
        let validity = cert.validity();
        if !validity.is_valid() {
            return Err(AuthError::Validity {
                from: validity.not_before.to_string(),
                to: validity.not_after.to_string(),
            });
        }
        if !ca.validity().is_valid() {
            return Err(AuthError::CaExpired(anchor.domain.clone()));
        }
        let serial = revoke::normal(cert.raw_serial());
        if self
            .revoked
            .read()
            .get(&anchor.domain)
            .is_some_and(|crl| crl.serials.contains(&serial))
        {
            return Err(AuthError::Revoked {
                domain: anchor.domain.clone(),
                serial: hex::encode(&serial),
            });
        }
        if cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca)
        {
            return Err(AuthError::Ca);
        }
        match org(&cert) {
            Some(d) if d == anchor.domain => {}
            other => {
                return Err(AuthError::Domain {
                    claimed: other.unwrap_or_default(),
                    issuer: anchor.domain.clone(),
                });
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
            .ok_or(AuthError::NoName)?;
        // The certified key must be the peer's own: that is what the connection proved.
        let key_peer = key_peer(&cert)?;
        if key_peer != *peer {
            return Err(AuthError::OtherPeer {
                bound: Box::new(key_peer),
                peer: Box::new(*peer),
            });
        }
        if bound.as_deref().is_some_and(|b| b != peer.to_string()) {
            return Err(AuthError::PeerId);
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

impl Trust {
    /// Takes the revocation list `der` if a trusted CA signed it and it is newer than the one
    /// held for that CA's domain: returns the list taken (`None`: the one held is as new).
    ///
    /// # Errors
    /// Not a revocation list of a trusted CA, or too large.
    pub fn adopt_crl(&self, der: &[u8]) -> Result<Option<Crl>, CrlError> {
        if der.len() > MAX_CRL {
            return Err(CrlError::Size(der.len()));
        }
        let (_, crl) =
            CertificateRevocationList::from_der(der).map_err(|e| CrlError::Der(e.to_string()))?;
        let issuer_raw = crl.issuer().as_raw();
        let anchor = self
            .anchors
            .iter()
            .filter(|a| a.subject_raw == issuer_raw)
            .find(|a| {
                X509Certificate::from_der(&a.der)
                    .is_ok_and(|(_, ca)| crl.verify_signature(ca.public_key()).is_ok())
            })
            .ok_or_else(|| {
                if self.anchors.iter().any(|a| a.subject_raw == issuer_raw) {
                    CrlError::Signature(crl.issuer().to_string())
                } else {
                    CrlError::UnknownCa(crl.issuer().to_string())
                }
            })?;
        let number = revoke::number(&crl)?;
        let taken = Crl {
            domain: anchor.domain.clone(),
            number,
            serials: crl
                .iter_revoked_certificates()
                .map(|r| revoke::normal(r.raw_serial()))
                .collect(),
            der: Bytes::copy_from_slice(der),
        };
        let mut held = self.revoked.write();
        if held.get(&anchor.domain).is_some_and(|h| h.number >= number) {
            return Ok(None);
        }
        held.insert(anchor.domain.clone(), taken.clone());
        Ok(Some(taken))
    }

    /// The revocation lists held, by domain.
    pub fn crls(&self) -> Vec<Crl> {
        self.revoked.read().values().cloned().collect()
    }

    /// The number of the list held for `domain`, if one is.
    pub fn crl_number(&self, domain: &str) -> Option<u64> {
        self.revoked.read().get(domain).map(|c| c.number)
    }

    /// Whether the list held for `domain` revokes the certificate of serial `serial` (hex, as a job's
    /// `owner_cert` records it); false for a serial that is not hex.
    pub fn is_revoked(&self, domain: &str, serial: &str) -> bool {
        self.revoked
            .read()
            .get(domain)
            .is_some_and(|c| c.revokes(serial))
    }

    /// The number of the list held for each domain that has one.
    pub fn crl_numbers(&self) -> BTreeMap<String, u64> {
        self.revoked
            .read()
            .iter()
            .map(|(d, c)| (d.clone(), c.number))
            .collect()
    }
}

/// The peer id of the ed25519 key a certificate certifies.
pub(super) fn key_peer(cert: &X509Certificate<'_>) -> Result<PeerId, AuthError> {
    let spki = &cert.public_key().subject_public_key.data;
    libp2p::identity::ed25519::PublicKey::try_from_bytes(spki)
        .map(|k| libp2p::identity::PublicKey::from(k).to_peer_id())
        .map_err(|_| AuthError::Key)
}
