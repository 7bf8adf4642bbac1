//! Sealed direct links: a [`direct`](super::direct) link's bytes in authenticated, encrypted
//! records (AES-256-GCM, from `ring`, which uses the CPU's AES and carry-less multiply
//! instructions where it has them).
//!
//! A link is keyed from a [`LinkSecret`] that the two nodes agreed over a channel that is
//! itself authenticated and encrypted (the libp2p stream between them): the connecting side
//! presents the secret's [`id`](LinkSecret::id) in the clear, and both derive the record key
//! from it with HKDF-SHA-256. The id reveals nothing of the key, and each link has a secret of
//! its own, used once.
//!
//! A record is `len: u32le` (the ciphertext's length, tag included), then the ciphertext of up
//! to [`RECORD`] bytes of the link's frames, then the 16-byte tag. The length is the record's
//! associated data and its nonce is its number on the link (counting from 0), so a record that
//! is forged, changed, replayed, reordered or dropped fails to open, and the link fails with
//! [`RemoteError::Sealed`]. A link cut short ends without its END frame, which only a sealed
//! record can carry: the inlet reports it broken.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::{SecureRandom, SystemRandom};

use super::RemoteError;

/// The most plaintext bytes in one record.
pub const RECORD: usize = 64 << 10;
/// A record's length prefix.
const HEAD: usize = 4;
/// A record's tag.
const TAG: usize = 16;
/// What a record adds to its plaintext on the wire.
pub const RECORD_OVERHEAD: usize = HEAD + TAG;
/// A secret's (and an id's) length in bytes.
pub const SECRET_LEN: usize = 32;

/// The secret two nodes agree for one link, over an authenticated and encrypted channel.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkSecret([u8; SECRET_LEN]);

impl std::fmt::Debug for LinkSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSecret(..)")
    }
}

impl LinkSecret {
    /// A new secret from the system's random number generator.
    ///
    /// # Errors
    /// The generator failed.
    pub fn random() -> std::io::Result<LinkSecret> {
        let mut s = [0u8; SECRET_LEN];
        SystemRandom::new()
            .fill(&mut s)
            .map_err(|_| std::io::Error::other("the system's random number generator failed"))?;
        Ok(LinkSecret(s))
    }

    /// The secret of these bytes (as received from the other node).
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> LinkSecret {
        LinkSecret(bytes)
    }

    /// The secret's bytes, to send to the other node over a secure channel.
    pub fn as_bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// What the connecting side presents to name the link: derived from the secret, and
    /// telling nothing of the record key.
    pub fn id(&self) -> [u8; SECRET_LEN] {
        self.derive(b"mvm direct link id")
    }

    /// The key of the link's records.
    pub fn key(&self) -> SealKey {
        SealKey(self.derive(b"mvm direct link key AES-256-GCM"))
    }

    fn derive(&self, info: &[u8]) -> [u8; SECRET_LEN] {
        let mut out = [0u8; SECRET_LEN];
        let prk = Salt::new(HKDF_SHA256, b"mvm link").extract(&self.0);
        // HKDF-SHA-256 expands to up to 255 × 32 bytes: 32 always fit.
        if let Ok(okm) = prk.expand(&[info], HKDF_SHA256) {
            let _ = okm.fill(&mut out);
        }
        out
    }
}

/// A link's record key.
#[derive(Clone)]
pub struct SealKey([u8; SECRET_LEN]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    fn aead(&self) -> LessSafeKey {
        // A 32-byte key is what AES-256-GCM takes: this cannot fail.
        let key = UnboundKey::new(&AES_256_GCM, &self.0)
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes a 32-byte key"));
        LessSafeKey::new(key)
    }
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The writing side of a sealed link: seals frames into records, numbered from 0.
pub struct Sealer {
    key: LessSafeKey,
    seq: u64,
    buf: BytesMut,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("seq", &self.seq).finish()
    }
}

impl Sealer {
    /// A sealer with `key`, at the link's first record.
    pub fn new(key: &SealKey) -> Sealer {
        Sealer {
            key: key.aead(),
            seq: 0,
            buf: BytesMut::new(),
        }
    }

    /// Seals `plain` (the bytes of whole or partial frames, in order) into records of at most
    /// [`RECORD`] bytes each, as one buffer.
    ///
    /// # Errors
    /// The link has sealed 2⁶⁴ records (its nonces are used up).
    pub fn seal<'a, I>(&mut self, plain: I) -> Result<Bytes, RemoteError>
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: Clone,
    {
        let plain = plain.into_iter();
        let total: usize = plain.clone().map(<[u8]>::len).sum();
        let records = total.div_ceil(RECORD).max(1);
        self.buf.reserve(total + records * RECORD_OVERHEAD);
        let mut open: Option<usize> = None;
        for mut part in plain {
            while !part.is_empty() {
                let start = match open {
                    Some(s) => s,
                    None => {
                        let s = self.buf.len();
                        self.buf.put_u32_le(0);
                        open = Some(s);
                        s
                    }
                };
                let room = RECORD - (self.buf.len() - start - HEAD);
                let n = room.min(part.len());
                self.buf.put_slice(&part[..n]);
                part = &part[n..];
                if n == room {
                    self.close(start)?;
                    open = None;
                }
            }
        }
        if let Some(start) = open {
            self.close(start)?;
        }
        Ok(self.buf.split().freeze())
    }

    /// Seals the record whose head is at `start` (its plaintext runs to the buffer's end).
    fn close(&mut self, start: usize) -> Result<(), RemoteError> {
        let len = self.buf.len() - start - HEAD;
        let head = u32::try_from(len + TAG)
            .map_err(|_| RemoteError::Sealed(format!("a record of {len} bytes")))?
            .to_le_bytes();
        self.buf[start..start + HEAD].copy_from_slice(&head);
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or_else(|| RemoteError::Sealed("the link's record numbers are used up".into()))?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(seq), Aad::from(head), &mut self.buf[start + HEAD..])
            .map_err(|_| RemoteError::Sealed(format!("record {seq} cannot be sealed")))?;
        self.buf.put_slice(tag.as_ref());
        Ok(())
    }
}

/// The reading side of a sealed link: opens its records in order.
pub struct Opener {
    key: LessSafeKey,
    seq: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("seq", &self.seq).finish()
    }
}

impl Opener {
    /// An opener with `key`, at the link's first record.
    pub fn new(key: &SealKey) -> Opener {
        Opener {
            key: key.aead(),
            seq: 0,
        }
    }

    /// Records opened so far.
    pub fn opened(&self) -> u64 {
        self.seq
    }

    /// Opens the next record if `raw` holds all of it: takes it off `raw` and returns its
    /// plaintext (`None`: not all of it yet; `raw` has room reserved for the rest).
    ///
    /// # Errors
    /// The record's length is not one a sealer writes, or it fails to open: it was forged,
    /// changed, replayed, reordered, or one before it was dropped.
    pub fn open(&mut self, raw: &mut BytesMut) -> Result<Option<BytesMut>, RemoteError> {
        let Some(head) = raw.get(..HEAD) else {
            return Ok(None);
        };
        let mut h = [0u8; HEAD];
        h.copy_from_slice(head);
        let len = usize::try_from(u32::from_le_bytes(h)).unwrap_or(usize::MAX);
        if !(TAG + 1..=TAG + RECORD).contains(&len) {
            return Err(RemoteError::Sealed(format!(
                "record {} claims {len} bytes (a record holds 1 to {} bytes and its tag): \
                 not from the link's other end",
                self.seq,
                RECORD + TAG
            )));
        }
        if raw.len() < HEAD + len {
            raw.reserve(HEAD + len - raw.len());
            return Ok(None);
        }
        let mut record = raw.split_to(HEAD + len);
        let seq = self.seq;
        let plain = self
            .key
            .open_in_place(nonce(seq), Aad::from(h), &mut record[HEAD..])
            .map_err(|_| {
                RemoteError::Sealed(format!(
                    "record {seq} failed authentication: it was forged, changed, replayed or \
                     reordered, or one before it was dropped"
                ))
            })?
            .len();
        self.seq += 1;
        record.advance(HEAD);
        record.truncate(plain);
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Opener) {
        let key = LinkSecret::random().expect("random").key();
        (Sealer::new(&key), Opener::new(&key))
    }

    fn open_all(o: &mut Opener, raw: &mut BytesMut) -> Result<Vec<u8>, RemoteError> {
        let mut out = Vec::new();
        while let Some(p) = o.open(raw)? {
            out.extend_from_slice(&p);
        }
        Ok(out)
    }

    #[test]
    fn records_round_trip_across_record_bounds_and_calls() {
        let (mut s, mut o) = pair();
        let big: Vec<u8> = (0..(RECORD * 2 + 77)).map(|i| (i % 251) as u8).collect();
        let a = s.seal([&b"hello"[..], &big[..10]]).expect("seal");
        let b = s.seal([&big[10..]]).expect("seal");
        // One record for the first call; three for the second (its 2 x RECORD + 67 bytes).
        assert_eq!(a.len(), 15 + RECORD_OVERHEAD);
        assert_eq!(b.len(), big.len() - 10 + 3 * RECORD_OVERHEAD);
        let mut raw = BytesMut::new();
        raw.extend_from_slice(&a);
        raw.extend_from_slice(&b[..100]);
        let mut got = open_all(&mut o, &mut raw).expect("open");
        raw.extend_from_slice(&b[100..]);
        got.extend(open_all(&mut o, &mut raw).expect("open"));
        let mut want = b"hello".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(got, want);
        assert_eq!(o.opened(), 4);
        assert!(raw.is_empty());
    }

    #[test]
    fn the_id_names_the_secret_and_tells_nothing_of_the_key() {
        let s = LinkSecret::random().expect("random");
        let t = LinkSecret::random().expect("random");
        assert_ne!(s, t);
        assert_eq!(s.id(), LinkSecret::from_bytes(*s.as_bytes()).id());
        assert_ne!(s.id(), t.id());
        assert_ne!(&s.id(), s.as_bytes());
        assert_ne!(s.id(), s.key().0, "the id is not the key");
    }

    #[test]
    fn forged_replayed_reordered_dropped_and_foreign_records_fail() {
        let key = LinkSecret::random().expect("random").key();
        let mut s = Sealer::new(&key);
        let r0 = s.seal([&b"zero"[..]]).expect("seal");
        let r1 = s.seal([&b"one"[..]]).expect("seal");
        let r2 = s.seal([&b"two"[..]]).expect("seal");
        let fails = |o: &mut Opener, bytes: &[u8]| {
            let mut raw = BytesMut::from(bytes);
            let e = open_all(o, &mut raw).expect_err("refused");
            assert!(matches!(e, RemoteError::Sealed(_)), "{e:?}");
            e.to_string()
        };
        // A flipped bit in the ciphertext, in the tag; a shorter length (its record is there,
        // whole, and fails).
        for (at, by) in [(HEAD, 1), (r0.len() - 1, 1), (0, 6)] {
            let mut bad = r0.to_vec();
            bad[at] ^= by;
            let msg = fails(&mut Opener::new(&key), &bad);
            assert!(msg.contains("record 0 "), "{msg}");
        }
        // Reordered: record 1 first.
        fails(&mut Opener::new(&key), &r1);
        // In order, then replayed.
        let mut o = Opener::new(&key);
        let mut raw = BytesMut::from(&r0[..]);
        assert_eq!(open_all(&mut o, &mut raw).expect("r0"), b"zero");
        let msg = fails(&mut o, &r0);
        assert!(msg.contains("record 1 failed authentication"), "{msg}");
        // Dropped: record 2 where 1 was due.
        let mut o2 = Opener::new(&key);
        open_all(&mut o2, &mut BytesMut::from(&r0[..])).expect("r0");
        fails(&mut o2, &r2);
        // Another link's key.
        let (_, mut other) = pair();
        fails(&mut other, &r0);
        // A length no sealer writes.
        let msg = fails(&mut Opener::new(&key), &[0, 0, 0, 0]);
        assert!(msg.contains("claims 0 bytes"), "{msg}");
        let msg = fails(&mut Opener::new(&key), &[255, 255, 255, 255]);
        assert!(msg.contains("not from the link's other end"), "{msg}");
    }
}
