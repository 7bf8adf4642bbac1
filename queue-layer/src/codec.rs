//! Codecs: how a node encodes values into queue items and decodes them back.
//!
//! A codec name is a chain written `transform+...+format`, e.g. `cbor`, `zstd+cbor`: one base
//! *format* (how a value becomes bytes) wrapped by zero or more *transforms* (bytes to bytes,
//! such as compression), the leftmost outermost. The [`Registry`] knows the built-in formats
//! `raw`, `json`, `cbor` and `postcard`, the transform `zstd`, and anything a node registers.
//! Names are resolved once, when a queue or topology is validated; an unknown name is an error
//! then, never at first use.
//!
//! ```
//! use mvm_queue::codec::Registry;
//!
//! let codec = Registry::new().resolve("zstd+cbor")?;
//! let bytes = codec.encode(&(1.5f64, -2.0f64))?;
//! let back: (f64, f64) = codec.decode(&bytes)?;
//! assert_eq!(back, (1.5, -2.0));
//! # Ok::<(), mvm_queue::CodecError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use ciborium::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest decoded item a transform may produce by default (guards against decompression
/// bombs): 64 MiB, the default queue byte capacity.
pub const DEFAULT_DECODE_LIMIT: usize = 64 << 20;

/// A codec could not be resolved, or could not encode or decode a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The name has an empty part or is empty.
    #[error("bad codec name '{name}': write format or transform+...+format")]
    BadName {
        /// The name as written.
        name: String,
    },
    /// A part of the name is not registered.
    #[error("unknown codec '{name}': no {role} named '{part}' (known: {known})")]
    Unknown {
        /// The whole name as written.
        name: String,
        /// The part that is not known.
        part: String,
        /// "format" or "transform".
        role: &'static str,
        /// The names that are known for that role.
        known: String,
    },
    /// A registration reused a name.
    #[error("codec part '{0}' is already registered")]
    Duplicate(String),
    /// A value could not be encoded.
    #[error("codec '{codec}' cannot encode this value: {reason}")]
    Encode {
        /// The codec's name.
        codec: String,
        /// What went wrong.
        reason: String,
    },
    /// Bytes could not be decoded.
    #[error("codec '{codec}' cannot decode this item: {reason}")]
    Decode {
        /// The codec's name.
        codec: String,
        /// What went wrong.
        reason: String,
    },
}

/// A base format: turns a self-describing value into bytes and back. Implement it to register
/// a format of your own; the built-in ones are faster paths that serde drives directly.
pub trait Format: Send + Sync + 'static {
    /// Encodes a value.
    ///
    /// # Errors
    /// The value cannot be written in this format; the message says why.
    fn encode(&self, value: &Value) -> Result<Vec<u8>, String>;

    /// Decodes bytes into a value.
    ///
    /// # Errors
    /// The bytes are not valid in this format; the message says why.
    fn decode(&self, bytes: &[u8]) -> Result<Value, String>;
}

/// A byte-to-byte transform (compression, for example) wrapped around a format.
pub trait Transform: Send + Sync + 'static {
    /// Applies the transform (on encode).
    ///
    /// # Errors
    /// The transform failed; the message says why.
    fn apply(&self, bytes: &[u8]) -> Result<Vec<u8>, String>;

    /// Undoes the transform (on decode), producing at most `limit` bytes.
    ///
    /// # Errors
    /// The bytes are not valid, or would grow past `limit`.
    fn invert(&self, bytes: &[u8], limit: usize) -> Result<Vec<u8>, String>;
}

/// zstd compression at a fixed level.
#[derive(Debug, Clone, Copy)]
pub struct Zstd {
    /// The compression level (1–22; 3 is zstd's default).
    pub level: i32,
}

impl Transform for Zstd {
    fn apply(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        zstd::bulk::compress(bytes, self.level).map_err(|e| e.to_string())
    }

    fn invert(&self, bytes: &[u8], limit: usize) -> Result<Vec<u8>, String> {
        zstd::bulk::decompress(bytes, limit).map_err(|e| format!("zstd: {e}"))
    }
}

#[derive(Clone)]
enum Base {
    Raw,
    Json,
    Cbor,
    Postcard,
    Custom(Arc<dyn Format>),
}

impl Base {
    fn is_self_describing(&self) -> bool {
        !matches!(self, Base::Postcard)
    }
}

/// A resolved codec: a format and its transforms, ready to use. Cheap to clone.
#[derive(Clone)]
pub struct Codec {
    name: Arc<str>,
    base: Base,
    /// Outermost first, as written in the name.
    transforms: Arc<[Arc<dyn Transform>]>,
    decode_limit: usize,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Codec {
    /// The codec's name, as resolved.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether items can be decoded without knowing their type (everything but postcard).
    pub fn is_self_describing(&self) -> bool {
        self.base.is_self_describing()
    }

    fn encode_error(&self, reason: impl fmt::Display) -> CodecError {
        CodecError::Encode {
            codec: self.name.to_string(),
            reason: reason.to_string(),
        }
    }

    fn decode_error(&self, reason: impl fmt::Display) -> CodecError {
        CodecError::Decode {
            codec: self.name.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Encodes a value into an item.
    ///
    /// # Errors
    /// [`CodecError::Encode`]: the value does not fit the format (for `raw`, anything but bytes
    /// or text).
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        let bytes = match &self.base {
            Base::Json => serde_json::to_vec(value).map_err(|e| self.encode_error(e))?,
            Base::Cbor => {
                let mut out = Vec::new();
                ciborium::into_writer(value, &mut out).map_err(|e| self.encode_error(e))?;
                out
            }
            Base::Postcard => postcard::to_stdvec(value).map_err(|e| self.encode_error(e))?,
            Base::Raw => {
                let v = Value::serialized(value).map_err(|e| self.encode_error(e))?;
                raw_bytes(v).map_err(|e| self.encode_error(e))?
            }
            Base::Custom(f) => {
                let v = Value::serialized(value).map_err(|e| self.encode_error(e))?;
                f.encode(&v).map_err(|e| self.encode_error(e))?
            }
        };
        self.wrap(bytes)
    }

    /// Decodes an item into a value of type `T`.
    ///
    /// # Errors
    /// [`CodecError::Decode`]: the bytes are not valid for this codec or for `T`.
    pub fn decode<T: DeserializeOwned>(&self, item: &[u8]) -> Result<T, CodecError> {
        let inner = self.unwrap(item)?;
        match &self.base {
            Base::Json => serde_json::from_slice(&inner).map_err(|e| self.decode_error(e)),
            Base::Cbor => ciborium::from_reader(&inner[..]).map_err(|e| self.decode_error(e)),
            Base::Postcard => postcard::from_bytes(&inner).map_err(|e| self.decode_error(e)),
            Base::Raw => Value::Bytes(inner.to_vec())
                .deserialized()
                .map_err(|e| self.decode_error(e)),
            Base::Custom(f) => {
                let v = f.decode(&inner).map_err(|e| self.decode_error(e))?;
                v.deserialized().map_err(|e| self.decode_error(e))
            }
        }
    }

    /// Decodes an item without knowing its type, for display and inspection.
    ///
    /// # Errors
    /// [`CodecError::Decode`]: invalid bytes, or a format that is not self-describing.
    pub fn decode_value(&self, item: &[u8]) -> Result<Value, CodecError> {
        if !self.is_self_describing() {
            return Err(self.decode_error("the format is not self-describing; decode a known type"));
        }
        let inner = self.unwrap(item)?;
        match &self.base {
            Base::Raw => Ok(Value::Bytes(inner.to_vec())),
            Base::Custom(f) => f.decode(&inner).map_err(|e| self.decode_error(e)),
            Base::Json => {
                let j: serde_json::Value =
                    serde_json::from_slice(&inner).map_err(|e| self.decode_error(e))?;
                Value::serialized(&j).map_err(|e| self.decode_error(e))
            }
            _ => ciborium::from_reader(&inner[..]).map_err(|e| self.decode_error(e)),
        }
    }

    /// Applies the transforms to bytes already in the base format (what a job wrote).
    ///
    /// # Errors
    /// [`CodecError::Encode`] when a transform fails.
    pub fn wrap(&self, bytes: impl Into<Vec<u8>>) -> Result<Bytes, CodecError> {
        let mut bytes = bytes.into();
        for t in self.transforms.iter().rev() {
            bytes = t.apply(&bytes).map_err(|e| self.encode_error(e))?;
        }
        Ok(Bytes::from(bytes))
    }

    /// Undoes the transforms, giving the bytes in the base format (what a job reads).
    ///
    /// # Errors
    /// [`CodecError::Decode`] when a transform fails or its output would pass the limit.
    pub fn unwrap(&self, item: &[u8]) -> Result<Bytes, CodecError> {
        if self.transforms.is_empty() {
            return Ok(Bytes::copy_from_slice(item));
        }
        let mut bytes = item.to_vec();
        for t in self.transforms.iter() {
            bytes = t
                .invert(&bytes, self.decode_limit)
                .map_err(|e| self.decode_error(e))?;
        }
        Ok(Bytes::from(bytes))
    }

    /// Whether the codec has transforms (so a job's bytes differ from the queue's).
    pub fn has_transforms(&self) -> bool {
        !self.transforms.is_empty()
    }
}

fn raw_bytes(v: Value) -> Result<Vec<u8>, &'static str> {
    match v {
        Value::Bytes(b) => Ok(b),
        Value::Text(s) => Ok(s.into_bytes()),
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::Integer(n) => u8::try_from(n).map_err(|_| "raw carries bytes only"),
                _ => Err("raw carries bytes only"),
            })
            .collect(),
        _ => Err("raw carries bytes or text only"),
    }
}

/// The codecs a node knows, by name.
#[derive(Clone)]
pub struct Registry {
    formats: BTreeMap<String, Base>,
    transforms: BTreeMap<String, Arc<dyn Transform>>,
    decode_limit: usize,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("formats", &self.formats.keys().collect::<Vec<_>>())
            .field("transforms", &self.transforms.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// A registry with the built-in formats (`raw`, `json`, `cbor`, `postcard`) and the `zstd`
    /// transform.
    pub fn new() -> Registry {
        let formats = [
            ("raw", Base::Raw),
            ("json", Base::Json),
            ("cbor", Base::Cbor),
            ("postcard", Base::Postcard),
        ]
        .into_iter()
        .map(|(n, b)| (n.to_owned(), b))
        .collect();
        let mut transforms: BTreeMap<String, Arc<dyn Transform>> = BTreeMap::new();
        transforms.insert("zstd".to_owned(), Arc::new(Zstd { level: 3 }));
        Registry {
            formats,
            transforms,
            decode_limit: DEFAULT_DECODE_LIMIT,
        }
    }

    /// Sets the largest item a transform may decode to.
    pub fn with_decode_limit(mut self, limit: usize) -> Registry {
        self.decode_limit = limit;
        self
    }

    fn check_new(&self, name: &str) -> Result<(), CodecError> {
        if name.is_empty() || name.contains('+') {
            return Err(CodecError::BadName {
                name: name.to_owned(),
            });
        }
        if self.formats.contains_key(name) || self.transforms.contains_key(name) {
            return Err(CodecError::Duplicate(name.to_owned()));
        }
        Ok(())
    }

    /// Registers a base format under `name`.
    ///
    /// # Errors
    /// The name is taken or malformed.
    pub fn register_format(
        &mut self,
        name: &str,
        format: Arc<dyn Format>,
    ) -> Result<(), CodecError> {
        self.check_new(name)?;
        self.formats.insert(name.to_owned(), Base::Custom(format));
        Ok(())
    }

    /// Registers a transform under `name`.
    ///
    /// # Errors
    /// The name is taken or malformed.
    pub fn register_transform(
        &mut self,
        name: &str,
        transform: Arc<dyn Transform>,
    ) -> Result<(), CodecError> {
        self.check_new(name)?;
        self.transforms.insert(name.to_owned(), transform);
        Ok(())
    }

    /// The names of the known formats.
    pub fn formats(&self) -> impl Iterator<Item = &str> {
        self.formats.keys().map(String::as_str)
    }

    /// The names of the known transforms.
    pub fn transforms(&self) -> impl Iterator<Item = &str> {
        self.transforms.keys().map(String::as_str)
    }

    /// Resolves a codec name such as `zstd+cbor`.
    ///
    /// # Errors
    /// [`CodecError::BadName`] or [`CodecError::Unknown`], naming the part not known.
    pub fn resolve(&self, name: &str) -> Result<Codec, CodecError> {
        let parts: Vec<&str> = name.split('+').map(str::trim).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(CodecError::BadName {
                name: name.to_owned(),
            });
        }
        let Some((format, wrappers)) = parts.split_last() else {
            return Err(CodecError::BadName {
                name: name.to_owned(),
            });
        };
        let base = self
            .formats
            .get(*format)
            .cloned()
            .ok_or_else(|| CodecError::Unknown {
                name: name.to_owned(),
                part: (*format).to_owned(),
                role: "format",
                known: self.formats().collect::<Vec<_>>().join(", "),
            })?;
        let transforms = wrappers
            .iter()
            .map(|w| {
                self.transforms
                    .get(*w)
                    .cloned()
                    .ok_or_else(|| CodecError::Unknown {
                        name: name.to_owned(),
                        part: (*w).to_owned(),
                        role: "transform",
                        known: self.transforms().collect::<Vec<_>>().join(", "),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Codec {
            name: parts.join("+").into(),
            base,
            transforms: transforms.into(),
            decode_limit: self.decode_limit,
        })
    }
}

/// An item that could not be turned into a value: which queue, which codec, why, and the item
/// itself, so nothing is lost. The queue goes on working.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ItemError {
    /// The queue has no item to give (end-of-stream, or empty for a non-blocking receive).
    #[error(transparent)]
    Recv(#[from] crate::queue::RecvError),
    /// The item did not decode.
    #[error("queue '{queue}': {source}")]
    Decode {
        /// The queue's name.
        queue: Arc<str>,
        /// The codec's error (it names the codec).
        source: Box<CodecError>,
        /// The item as it was in the queue.
        item: Bytes,
    },
}

/// A value could not be sent: encoding failed, or the queue refused the item.
#[derive(Debug, thiserror::Error)]
pub enum ValueSendError {
    /// The value did not encode.
    #[error("queue '{queue}': {source}")]
    Encode {
        /// The queue's name.
        queue: Arc<str>,
        /// The codec's error.
        source: CodecError,
    },
    /// The queue refused the encoded item.
    #[error(transparent)]
    Send(#[from] crate::queue::SendError<Bytes>),
}

impl crate::queue::Sender<Bytes> {
    /// Encodes `value` with `codec` and sends it (blocking as the queue's policy says).
    ///
    /// # Errors
    /// Encoding failed, or the send did.
    pub fn send_value<T: Serialize + ?Sized>(
        &self,
        codec: &Codec,
        value: &T,
    ) -> Result<(), ValueSendError> {
        let item = codec
            .encode(value)
            .map_err(|source| ValueSendError::Encode {
                queue: self.queue_name().clone(),
                source,
            })?;
        Ok(self.send(item)?)
    }
}

impl crate::queue::Receiver<Bytes> {
    /// Receives the next item and decodes it with `codec`.
    ///
    /// # Errors
    /// End-of-stream, or [`ItemError::Decode`] for an item that did not decode (the item is in
    /// the error, and the next call receives the next item).
    pub fn recv_value<T: DeserializeOwned>(&self, codec: &Codec) -> Result<T, ItemError> {
        let item = self.recv()?;
        codec.decode(&item).map_err(|source| ItemError::Decode {
            queue: self.queue_name().clone(),
            source: Box::new(source),
            item,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        id: u32,
        re: f64,
        im: f64,
        tag: String,
        data: Vec<u8>,
    }

    fn all_names() -> Vec<&'static str> {
        vec![
            "json",
            "cbor",
            "postcard",
            "zstd+json",
            "zstd+cbor",
            "zstd+postcard",
            "zstd+zstd+cbor",
        ]
    }

    proptest! {
        #[test]
        fn typed_values_round_trip(id: u32, re in -1e12f64..1e12, im in -1e12f64..1e12,
                                   tag in ".{0,40}", data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let reg = Registry::new();
            let v = Sample { id, re, im, tag, data };
            for name in all_names() {
                let c = reg.resolve(name).expect("known codec");
                let bytes = c.encode(&v).expect("encodes");
                let back: Sample = c.decode(&bytes).expect("decodes");
                prop_assert_eq!(&back, &v, "codec {}", name);
            }
        }

        #[test]
        fn raw_round_trips_bytes(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let reg = Registry::new();
            for name in ["raw", "zstd+raw"] {
                let c = reg.resolve(name).expect("known codec");
                let bytes = c.encode(&serde_bytes_like(&data)).expect("encodes");
                if name == "raw" { prop_assert_eq!(&bytes[..], &data[..]); }
                let back: Bytes = c.decode(&bytes).expect("decodes");
                prop_assert_eq!(&back[..], &data[..]);
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..500)) {
            let reg = Registry::new();
            for name in all_names() {
                let c = reg.resolve(name).expect("known codec");
                let _ = c.decode::<Sample>(&data);
                let _ = c.decode_value(&data);
            }
        }
    }

    fn serde_bytes_like(data: &[u8]) -> Bytes {
        Bytes::copy_from_slice(data)
    }

    #[test]
    fn unknown_names_are_refused_with_the_part() {
        let reg = Registry::new();
        let e = reg.resolve("zstd+cbr").expect_err("unknown format");
        assert!(
            matches!(&e, CodecError::Unknown { part, role: "format", .. } if part == "cbr"),
            "{e}"
        );
        assert!(
            e.to_string().contains("known: cbor, json, postcard, raw"),
            "{e}"
        );
        let e = reg.resolve("lz4+cbor").expect_err("unknown transform");
        assert!(matches!(&e, CodecError::Unknown { part, role: "transform", .. } if part == "lz4"));
        assert!(matches!(reg.resolve(""), Err(CodecError::BadName { .. })));
        assert!(matches!(
            reg.resolve("zstd++cbor"),
            Err(CodecError::BadName { .. })
        ));
    }

    #[test]
    fn decode_errors_name_the_codec() {
        let c = Registry::new().resolve("zstd+cbor").expect("known");
        let e = c.decode::<Sample>(b"not zstd").expect_err("garbage");
        assert!(e.to_string().contains("zstd+cbor"), "{e}");
    }

    #[test]
    fn zstd_compresses_and_limits_decoded_size() {
        let reg = Registry::new().with_decode_limit(1000);
        let c = reg.resolve("zstd+raw").expect("known");
        let big = Bytes::from(vec![7u8; 100_000]);
        let small = c.encode(&big).expect("encodes");
        assert!(small.len() < 1000, "compressed to {}", small.len());
        let e = c.decode::<Bytes>(&small).expect_err("over the limit");
        assert!(matches!(e, CodecError::Decode { .. }));
    }

    #[test]
    fn raw_refuses_structured_values() {
        let c = Registry::new().resolve("raw").expect("known");
        assert!(matches!(
            c.encode(&(1, 2.5)),
            Err(CodecError::Encode { .. })
        ));
        assert_eq!(&c.encode("text").expect("text is bytes")[..], b"text");
    }

    #[test]
    fn custom_formats_and_transforms_register() {
        struct Rev;
        impl Transform for Rev {
            fn apply(&self, b: &[u8]) -> Result<Vec<u8>, String> {
                Ok(b.iter().rev().copied().collect())
            }
            fn invert(&self, b: &[u8], _limit: usize) -> Result<Vec<u8>, String> {
                self.apply(b)
            }
        }
        struct Cbor2;
        impl Format for Cbor2 {
            fn encode(&self, v: &Value) -> Result<Vec<u8>, String> {
                let mut out = Vec::new();
                ciborium::into_writer(v, &mut out).map_err(|e| e.to_string())?;
                Ok(out)
            }
            fn decode(&self, b: &[u8]) -> Result<Value, String> {
                ciborium::from_reader(b).map_err(|e| e.to_string())
            }
        }
        let mut reg = Registry::new();
        reg.register_transform("rev", Arc::new(Rev))
            .expect("new name");
        reg.register_format("mine", Arc::new(Cbor2))
            .expect("new name");
        assert!(matches!(
            reg.register_format("cbor", Arc::new(Cbor2)),
            Err(CodecError::Duplicate(_))
        ));
        let c = reg.resolve("rev+mine").expect("registered");
        let v = vec![1u32, 2, 3];
        let back: Vec<u32> = c.decode(&c.encode(&v).expect("encodes")).expect("decodes");
        assert_eq!(back, v);
        let plain = reg
            .resolve("cbor")
            .expect("known")
            .encode(&v)
            .expect("encodes");
        assert_eq!(
            c.unwrap(&c.encode(&v).expect("encodes")).expect("unwraps"),
            plain
        );
    }

    #[test]
    fn decode_value_reads_self_describing_items() {
        let reg = Registry::new();
        let v = (1.0f64, 2.0f64);
        for name in ["json", "cbor", "zstd+cbor"] {
            let c = reg.resolve(name).expect("known");
            let got = c
                .decode_value(&c.encode(&v).expect("encodes"))
                .expect("decodes");
            assert!(
                matches!(got, Value::Array(ref a) if a.len() == 2),
                "{name}: {got:?}"
            );
        }
        let p = reg.resolve("postcard").expect("known");
        assert!(p.decode_value(&p.encode(&v).expect("encodes")).is_err());
    }
}
