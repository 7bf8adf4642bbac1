//! Typed ids: job ids and content hashes, parsed once where they enter (a message, a command
//! line) and never checked again.
//!
//! Both travel as strings (CBOR text), so the wire stays readable; a message carrying a
//! malformed one does not decode.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The longest job name kept in a job id.
const MAX_NAME: usize = 64;

/// The longest bad input an [`IdError`] quotes.
const MAX_SHOWN: usize = 80;

/// A job's id, unique in its group: `NAME-TERM-SEQ`, the job's name (1 to 64 characters of
/// `[A-Za-z0-9._-]`), then the term of the leader that admitted it and that leader's count of
/// submissions, both in lowercase hex (e.g. `fft8-1-2a`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// The id of the `seq`th job admitted by the leader of `term`, named after `name` (its
    /// characters outside `[A-Za-z0-9._-]` become `_`; `job` when it is empty).
    pub fn new(name: &str, term: u64, seq: u64) -> JobId {
        let name: String = name
            .chars()
            .map(|c| if name_char(c) { c } else { '_' })
            .take(MAX_NAME)
            .collect();
        let name = if name.is_empty() { "job" } else { &name };
        JobId(format!("{name}-{term:x}-{seq:x}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Whether `s` is a number as a job id writes it: 1 to 16 lowercase hex digits.
fn hex_number(s: &str) -> bool {
    (1..=16).contains(&s.len()) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl FromStr for JobId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<JobId, IdError> {
        let mut fields = s.rsplitn(3, '-');
        let (seq, term, name) = (fields.next(), fields.next(), fields.next());
        let ok = match (name, term, seq) {
            (Some(name), Some(term), Some(seq)) => {
                (1..=MAX_NAME).contains(&name.len())
                    && name.chars().all(name_char)
                    && hex_number(term)
                    && hex_number(seq)
            }
            _ => false,
        };
        if ok {
            Ok(JobId(s.to_owned()))
        } else {
            Err(IdError::JobId(shown(s)))
        }
    }
}

impl TryFrom<String> for JobId {
    type Error = IdError;

    fn try_from(s: String) -> Result<JobId, IdError> {
        s.parse()
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for JobId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for JobId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for JobId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Tests write job ids as literals: one that is not an id fails the test.
#[cfg(test)]
impl From<&str> for JobId {
    fn from(s: &str) -> JobId {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A content hash: the SHA-256 of a module's bytes or of a policy bundle, written as 64
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hash([u8; 32]);

impl Hash {
    /// The SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(sha2::Sha256::digest(bytes).into())
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for Hash {
    fn from(digest: [u8; 32]) -> Hash {
        Hash(digest)
    }
}

impl FromStr for Hash {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Hash, IdError> {
        let mut digest = [0u8; 32];
        let lower = s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !lower || hex::decode_to_slice(s, &mut digest).is_err() {
            return Err(IdError::Hash(shown(s)));
        }
        Ok(Hash(digest))
    }
}

impl TryFrom<String> for Hash {
    type Error = IdError;

    fn try_from(s: String) -> Result<Hash, IdError> {
        s.parse()
    }
}

impl From<Hash> for String {
    fn from(h: Hash) -> String {
        h.to_string()
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

/// Text that is not the id it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not a job id.
    #[error(
        "job id `{0}`: expected NAME-TERM-SEQ (a name of 1 to 64 characters of [A-Za-z0-9._-], \
         then two lowercase hex numbers, e.g. fft8-1-2a)"
    )]
    JobId(String),
    /// Not a content hash.
    #[error("hash `{0}`: expected 64 lowercase hex digits (a SHA-256)")]
    Hash(String),
}

/// `s` as an error quotes it: escaped, and cut short when long.
fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_SHOWN)
        .flat_map(char::escape_default)
        .collect();
    if s.chars().nth(MAX_SHOWN).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
        let mut buf = Vec::new();
        ciborium::into_writer(v, &mut buf).expect("encodes");
        buf
    }

    #[test]
    fn a_job_id_round_trips_through_text_and_cbor() {
        let id = JobId::new("fft 8/ö", 3, 42);
        assert_eq!(id.as_str(), "fft_8__-3-2a");
        assert_eq!(id.to_string().parse::<JobId>(), Ok(id.clone()));
        let bytes = cbor(&id);
        // On the wire it is the text, as before it was typed.
        assert_eq!(bytes, cbor(&"fft_8__-3-2a"));
        let back: JobId = ciborium::from_reader(bytes.as_slice()).expect("decodes");
        assert_eq!(back, id);
        assert_eq!(JobId::new("", 0, 0).as_str(), "job-0-0");
        assert_eq!(JobId::new(&"x".repeat(100), 1, 1).as_str().len(), 64 + 4);
        // A name may hold dashes: the term and the count are the last two fields.
        assert!("my-job-v2-1-ff".parse::<JobId>().is_ok());
    }

    #[test]
    fn a_bad_job_id_is_refused_with_what_it_was() {
        for bad in [
            "",
            "x7",
            "j-1",
            "j--1",
            "-1-2",
            "j-1-",
            "j-G-1",
            "j-1-2A",
            "a b-1-2",
            "j-1-2\n",
            "j-11111111111111111-1",
        ] {
            assert!(bad.parse::<JobId>().is_err(), "{bad:?} accepted");
        }
        let e = "x7".parse::<JobId>().expect_err("no term or count");
        assert_eq!(e, IdError::JobId("x7".into()));
        assert!(
            e.to_string()
                .starts_with("job id `x7`: expected NAME-TERM-SEQ"),
            "{e}"
        );
        let e = "a\nb".parse::<JobId>().expect_err("a control character");
        assert!(e.to_string().starts_with("job id `a\\nb`"), "{e}");
        let e = "y".repeat(1000).parse::<JobId>().expect_err("too long");
        assert!(
            e.to_string().contains(&format!("`{}…`", "y".repeat(80))),
            "{e}"
        );
        let e = ciborium::from_reader::<JobId, _>(cbor(&"x7").as_slice()).expect_err("bad id");
        assert!(e.to_string().contains("job id `x7`"), "{e}");
    }

    #[test]
    fn a_hash_round_trips_as_hex_and_bad_ones_are_refused() {
        let h = Hash::of(b"module");
        let hex = h.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex.parse::<Hash>(), Ok(h));
        let bytes = cbor(&h);
        assert_eq!(bytes, cbor(&hex));
        let back: Hash = ciborium::from_reader(bytes.as_slice()).expect("decodes");
        assert_eq!(back, h);
        for bad in [
            "",
            "ab",
            &"A".repeat(64),
            &"g".repeat(64),
            &"a".repeat(65),
            "é".repeat(32).as_str(),
        ] {
            assert!(bad.parse::<Hash>().is_err(), "{bad:?} accepted");
        }
        let e = "ab".parse::<Hash>().expect_err("short");
        assert_eq!(
            e.to_string(),
            "hash `ab`: expected 64 lowercase hex digits (a SHA-256)"
        );
        let e = ciborium::from_reader::<Hash, _>(cbor(&"ab").as_slice()).expect_err("short");
        assert!(e.to_string().contains("hash `ab`"), "{e}");
    }
}
