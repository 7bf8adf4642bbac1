//! The check every peer's certificate goes through: issued by a trusted domain CA, for the
//! key the peer holds, with well-formed names.

use std::path::Path;

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{PkiError, io_err, name_ok};

/// A trusted domain CA.
#[derive(Debug, Clone)]
pub(super) struct Anchor {
    pub(super) domain: String,
    pub(super) der: Vec<u8>,
    pub(super) subject_raw: Vec<u8>,
    pub(super) spki_raw: Vec<u8>,
}

pub(super) fn parse_pem(text: &str) -> Result<Vec<u8>, String> {
    let (_, p) =
        x509_parser::pem::parse_x509_pem(text.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    if p.label != "CERTIFICATE" {
        return Err(format!("a PEM '{}', not a CERTIFICATE", p.label));
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
    pub(super) fn from_pem(text: &str) -> Result<Anchor, String> {
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

/// The peer id of the ed25519 key a certificate certifies.
pub(super) fn key_peer(cert: &X509Certificate<'_>) -> Result<PeerId, String> {
    let spki = &cert.public_key().subject_public_key.data;
    libp2p::identity::ed25519::PublicKey::try_from_bytes(spki)
        .map(|k| libp2p::identity::PublicKey::from(k).to_peer_id())
        .map_err(|_| "it does not certify an ed25519 key".to_owned())
}
