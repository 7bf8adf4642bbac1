//! What a checkpoint holds, and its encoding: a vertex's memory, globals and host state, and
//! the items waiting in a part's queues. A blob names its own hash: a corrupt or truncated one
//! is refused, never restored.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first bytes of an encoded part image.
pub(crate) const MAGIC: &[u8; 8] = b"MVMCKPT2";

/// Memory is saved in blocks of this size; blocks of zeros are left out.
pub(crate) const BLOCK: usize = 4096;

/// The value of a mutable global.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalValue {
    /// An `i32`.
    I32(i32),
    /// An `i64`.
    I64(i64),
    /// An `f32`, by its bits.
    F32(u32),
    /// An `f64`, by its bits.
    F64(u64),
}

/// A vertex's linear memory: its size and the blocks that are not all zeros.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryImage {
    /// Its size in bytes (a whole number of 64 KiB pages).
    pub size: u64,
    /// `(offset, bytes)` of each saved block, in order.
    pub blocks: Vec<(u64, Bytes)>,
}

impl MemoryImage {
    /// Saves `data`, leaving out blocks of zeros.
    pub(crate) fn save(data: &[u8]) -> MemoryImage {
        let blocks = data
            .chunks(BLOCK)
            .enumerate()
            .filter(|(_, b)| b.iter().any(|&x| x != 0))
            .map(|(i, b)| ((i * BLOCK) as u64, Bytes::copy_from_slice(b)))
            .collect();
        MemoryImage {
            size: data.len() as u64,
            blocks,
        }
    }

    /// Bytes saved (the blocks that are not zeros).
    pub fn stored_bytes(&self) -> usize {
        self.blocks.iter().map(|(_, b)| b.len()).sum()
    }
}

/// Where a vertex was when its part paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VertexPhase {
    /// Paused at a pause point, its call stack unwound into its memory.
    Paused {
        /// Its memory (with the unwound stack).
        memory: MemoryImage,
        /// Its mutable globals, by export name.
        globals: Vec<(String, GlobalValue)>,
        /// The address of Asyncify's data: two `u32` bounds, then the unwound stack.
        data: u32,
        /// Items taken from an input port's queue and kept back for a larger buffer.
        kept: Vec<(String, Bytes)>,
        /// A send that paused part way: its output port and how many of the port's channels
        /// had the item already.
        sending: Option<(String, u32)>,
    },
    /// Its code had returned: only its output remains.
    Ended,
}

/// Items, and their bytes as queued (encoded by the channel's codec), that passed one way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// Items.
    pub items: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Count {
    /// Counts one item of `len` bytes.
    pub(crate) fn add(&mut self, len: usize) {
        self.items += 1;
        self.bytes += len as u64;
    }
}

/// What one vertex moved over its life, across its checkpoints and restores: each edge it
/// sends on counts the items that edge's channel took, each input port the items the vertex
/// took from its queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexCounts {
    /// `(output port, "vertex:port" it goes to, count)`, per edge out of the vertex.
    pub sent: Vec<(String, String, Count)>,
    /// `(input port, count)`, per input port.
    pub received: Vec<(String, Count)>,
}

/// One vertex's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexImage {
    /// The vertex.
    pub vertex: String,
    /// What it wrote to stdout so far.
    pub stdout: Bytes,
    /// What it moved so far.
    pub counts: VertexCounts,
    /// Where it was.
    pub phase: VertexPhase,
}

/// The items waiting in one queue of a part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueImage {
    /// The queue's name within the job (`vertex:port`, or `vertex:port>out` for an outbox).
    pub name: String,
    /// Its items (as the queue holds them: encoded by the channel's codec) and priorities,
    /// in the order they would be served.
    pub items: Vec<(Bytes, i64)>,
}

/// A part's state at one pause: its vertices and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartImage {
    /// The job.
    pub job: String,
    /// The pause's number within the part (1, 2, …).
    pub number: u64,
    /// Each local vertex.
    pub vertices: Vec<VertexImage>,
    /// Each local queue.
    pub queues: Vec<QueueImage>,
}

/// A checkpoint blob that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Too short, or not a checkpoint.
    #[error("not an MVM checkpoint (no header)")]
    NotACheckpoint,
    /// The bytes do not match the hash they carry: corrupt or truncated.
    #[error("corrupt or truncated checkpoint: its hash is {found}, it says {expected}")]
    Hash {
        /// The hash the blob carries.
        expected: String,
        /// The hash of its bytes.
        found: String,
    },
    /// The hash matches but the contents do not decode (written by another version).
    #[error("checkpoint does not decode: {0}")]
    Decode(String),
    /// The image cannot be encoded.
    #[error("checkpoint cannot be encoded: {0}")]
    Encode(String),
}

impl PartImage {
    /// Encodes the image: a header, the SHA-256 of the body, the body.
    ///
    /// # Errors
    /// The image cannot be encoded.
    pub fn encode(&self) -> Result<Vec<u8>, ImageError> {
        let body = postcard::to_allocvec(self).map_err(|e| ImageError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + 32 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&Sha256::digest(&body));
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes a blob from [`PartImage::encode`], checking its hash first.
    ///
    /// # Errors
    /// Not a checkpoint, a hash that does not match, or contents that do not decode.
    pub fn decode(blob: &[u8]) -> Result<PartImage, ImageError> {
        let header = MAGIC.len() + 32;
        if blob.len() < header || &blob[..MAGIC.len()] != MAGIC {
            return Err(ImageError::NotACheckpoint);
        }
        let (expected, body) = (&blob[MAGIC.len()..header], &blob[header..]);
        let found = Sha256::digest(body);
        if found.as_slice() != expected {
            return Err(ImageError::Hash {
                expected: hex::encode(expected),
                found: hex::encode(found),
            });
        }
        postcard::from_bytes(body).map_err(|e| ImageError::Decode(e.to_string()))
    }

    /// Adds entries after the items of the queue named `queue`: what a link's receiving end
    /// kept when it was drained to its mark ([`mvm_queue::remote::Drain::held`]) comes after
    /// the items its queue held. `false` if the part has no such queue.
    pub fn append(
        &mut self,
        queue: &str,
        entries: impl IntoIterator<Item = mvm_queue::queue::Entry<Bytes>>,
    ) -> bool {
        match self.queues.iter_mut().find(|q| q.name == queue) {
            Some(q) => {
                q.items
                    .extend(entries.into_iter().map(|e| (e.item, e.priority)));
                true
            }
            None => false,
        }
    }
}
