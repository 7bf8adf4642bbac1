//! Bytes by content hash, as the broker keeps them for nodes to fetch: modules, and the blobs
//! of checkpoints.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::proto::Hash;

/// A content-addressed store of module bytes: in memory, and in a directory when given.
#[derive(Debug, Default)]
pub struct ModuleStore {
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<Hash, Bytes>>,
}

impl ModuleStore {
    /// A store kept in `dir` (created when missing) or only in memory.
    pub fn new(dir: Option<PathBuf>) -> ModuleStore {
        ModuleStore {
            dir,
            memory: Mutex::new(HashMap::new()),
        }
    }

    /// Adds module bytes; returns their hash.
    pub fn put(&self, bytes: Bytes) -> Hash {
        let h = Hash::of(&bytes);
        if let Some(dir) = &self.dir {
            let path = dir.join(h.to_string());
            if !path.exists() {
                let tmp = dir.join(format!("{h}.tmp{}", std::process::id()));
                let written = std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&tmp, &bytes))
                    .and_then(|()| std::fs::rename(&tmp, &path));
                if let Err(e) = written {
                    tracing::warn!(path = %path.display(), error = %e, "cannot keep a module on disk");
                }
            }
        }
        self.memory.lock().insert(h, bytes);
        h
    }

    /// The bytes of `hash`, if held (checked against the hash when read from disk).
    pub fn get(&self, hash: &Hash) -> Option<Bytes> {
        if let Some(b) = self.memory.lock().get(hash) {
            return Some(b.clone());
        }
        let path = self.dir.as_ref()?.join(hash.to_string());
        let bytes = Bytes::from(std::fs::read(path).ok()?);
        if Hash::of(&bytes) != *hash {
            tracing::warn!(%hash, "a module on disk does not match its hash; ignored");
            return None;
        }
        self.memory.lock().insert(*hash, bytes.clone());
        Some(bytes)
    }

    /// Forgets `hash` (in memory and on disk).
    pub fn remove(&self, hash: &Hash) {
        self.memory.lock().remove(hash);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(hash.to_string()));
        }
    }

    /// Whether `hash` is held.
    pub fn has(&self, hash: &Hash) -> bool {
        self.memory.lock().contains_key(hash)
            || self
                .dir
                .as_ref()
                .is_some_and(|d| d.join(hash.to_string()).exists())
    }
}
