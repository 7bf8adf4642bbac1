//! Revocation: a domain's CA revokes certificates by serial number in an X.509 certificate
//! revocation list it signs (`ca.crl` beside `ca.crt`, PEM; `mvm ca revoke`). Every revocation
//! writes a new list whose CRL number is one higher, holding every serial revoked so far.
//!
//! A daemon holds the newest list of each domain it trusts ([`Trust::adopt_crl`]): it takes a
//! list only if a CA it trusts signed it and its number is higher than the one it holds, so a
//! peer that hands lists on can withhold a newer one but never forge or roll one back. A
//! certificate whose serial is on its issuer's list is refused ([`AuthError::Revoked`]).
//!
//! [`Trust::adopt_crl`]: super::Trust::adopt_crl
//! [`AuthError::Revoked`]: super::AuthError::Revoked

use std::collections::BTreeSet;
use std::path::Path;

use bytes::Bytes;
use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use x509_parser::prelude::{CertificateRevocationList, FromDer};

use super::{Ca, PkiError};

/// The revocation list's file in a CA directory.
pub const CRL_FILE: &str = "ca.crl";

/// The largest revocation list taken (PEM or DER): some 20,000 serials.
pub const MAX_CRL: usize = 1 << 20;

/// One domain's revocation list, as a daemon holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    /// The domain of the CA that signed it.
    pub domain: String,
    /// Its CRL number: higher is newer.
    pub number: u64,
    /// The serials it revokes (without leading zero bytes).
    pub serials: BTreeSet<Vec<u8>>,
    /// The list as signed (DER), to hand on.
    pub der: Bytes,
}

impl Crl {
    /// Whether it revokes the certificate of serial `serial` (hex, as a job's `owner_cert`
    /// records it; leading zero bytes aside); false for a serial that is not hex.
    pub fn revokes(&self, serial: &str) -> bool {
        hex::decode(serial).is_ok_and(|raw| self.serials.contains(&normal(&raw)))
    }
}

/// A revocation list that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrlError {
    /// Not PEM.
    #[error("not PEM: {0}")]
    Pem(String),
    /// PEM of something else.
    #[error("a PEM '{0}', not an X509 CRL")]
    Label(String),
    /// Larger than [`MAX_CRL`].
    #[error("a revocation list of {0} bytes (at most {MAX_CRL})")]
    Size(usize),
    /// Not a revocation list.
    #[error("not a revocation list: {0}")]
    Der(String),
    /// Signed by no CA trusted here.
    #[error("issued by '{0}', a CA not trusted here")]
    UnknownCa(String),
    /// The signature does not verify.
    #[error("its signature does not verify against the CA of domain {0}")]
    Signature(String),
    /// No CRL number, or one too large.
    #[error("it has no CRL number, or one of more than 64 bits")]
    Number,
}

/// What `mvm ca revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The new list's number.
    pub number: u64,
    /// How many serials it revokes.
    pub count: usize,
    /// Whether the serial was already revoked (the list is written again all the same).
    pub already: bool,
}

/// A serial without leading zero bytes (an INTEGER's content may carry one).
pub(crate) fn normal(serial: &[u8]) -> Vec<u8> {
    let first = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
    serial[first..].to_vec()
}

/// The DER of a revocation list written as PEM.
///
/// # Errors
/// Not PEM of an `X509 CRL`, or too large.
pub fn crl_der(text: &str) -> Result<Vec<u8>, CrlError> {
    if text.len() > MAX_CRL {
        return Err(CrlError::Size(text.len()));
    }
    let (_, p) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| CrlError::Pem(e.to_string()))?;
    if p.label != "X509 CRL" {
        return Err(CrlError::Label(p.label));
    }
    Ok(p.contents)
}

/// The serial number of a certificate (PEM), as a revocation names it.
///
/// # Errors
/// Not a certificate.
pub fn serial_of(cert_pem: &str) -> Result<Vec<u8>, super::TrustError> {
    let der = super::parse_pem(cert_pem)?;
    serial_of_der(&der).ok_or_else(|| super::TrustError::Der("no X.509 certificate".into()))
}

/// The serial number of a certificate (DER), as a revocation names it (`None`: not a
/// certificate).
pub fn serial_of_der(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::prelude::X509Certificate::from_der(der).ok()?;
    Some(normal(cert.raw_serial()))
}

/// A list's number and entries (serial, when revoked).
type Entries = (u64, Vec<(Vec<u8>, time::OffsetDateTime)>);

/// Reads the entries of the list in `text` (this CA's own, so its signature is not checked).
fn entries(text: &str) -> Result<Entries, CrlError> {
    let der = crl_der(text)?;
    let (_, crl) =
        CertificateRevocationList::from_der(&der).map_err(|e| CrlError::Der(e.to_string()))?;
    let number = number(&crl)?;
    let list = crl
        .iter_revoked_certificates()
        .map(|r| {
            let at = time::OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
            (normal(r.raw_serial()), at)
        })
        .collect();
    Ok((number, list))
}

/// A list's CRL number.
pub(crate) fn number(crl: &CertificateRevocationList<'_>) -> Result<u64, CrlError> {
    let n = crl.crl_number().ok_or(CrlError::Number)?;
    match n.to_u64_digits().as_slice() {
        [] => Ok(0),
        [d] => Ok(*d),
        _ => Err(CrlError::Number),
    }
}

impl Ca {
    /// Revokes the certificate with serial `serial`: writes `dir`'s revocation list
    /// ([`CRL_FILE`]) again with it added, numbered one higher than the last, signed.
    ///
    /// # Errors
    /// The existing list cannot be read, or the new one cannot be signed or written.
    pub fn revoke(&self, dir: &Path, serial: &[u8]) -> Result<Revoked, PkiError> {
        let path = dir.join(CRL_FILE);
        let (last, mut list) = match std::fs::read_to_string(&path) {
            Ok(text) => entries(&text).map_err(|e| PkiError::at(&path)(e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, Vec::new()),
            Err(e) => return Err(PkiError::at(&path)(e)),
        };
        let serial = normal(serial);
        let now = time::OffsetDateTime::now_utc();
        let already = list.iter().any(|(s, _)| *s == serial);
        if !already {
            list.push((serial, now));
        }
        let number = last + 1;
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(3650),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: list
                .iter()
                .map(|(s, at)| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: *at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(PkiError::make("sign the revocation list"))?;
        let pem = crl
            .pem()
            .map_err(PkiError::make("encode the revocation list"))?;
        // Written beside and renamed over, so a daemon reading it never sees half of it.
        let tmp = dir.join(format!(".{CRL_FILE}.new"));
        let _ = std::fs::remove_file(&tmp);
        super::write_new(&tmp, pem.as_bytes(), 0o644)?;
        std::fs::rename(&tmp, &path).map_err(PkiError::at(&path))?;
        Ok(Revoked {
            number,
            count: list.len(),
            already,
        })
    }
}
