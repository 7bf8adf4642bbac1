//! Compiled modules, cached by the content hash of their source: in memory, and on disk as
//! serialized artifacts, so a second run (or a second process) skips compilation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

/// A module's content hash (SHA-256 of its `.wasm` or `.wat` bytes), as lowercase hex.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where a module came from, for figures and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Already compiled in this process.
    Memory,
    /// Deserialized from the disk cache.
    Disk,
    /// Compiled now.
    Compiled,
}

/// A module that could not be compiled or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The bytes are not a valid module (WebAssembly binary or text).
    #[error("{name}: not a valid WebAssembly module: {reason}")]
    Invalid {
        /// The module's name (usually its file).
        name: String,
        /// What the compiler said.
        reason: String,
    },
    /// The module cannot be made checkpointable.
    #[error("{name}: cannot be checkpointed: {source}")]
    Checkpoint {
        /// The module's name (usually its file).
        name: String,
        /// Why.
        source: super::checkpoint::RewriteError,
    },
    /// The module file could not be read.
    #[error("{name}: cannot read: {source}")]
    Read {
        /// The file.
        name: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The cache.
pub struct ModuleCache {
    engine: Engine,
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<String, Module>>,
}

impl std::fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ModuleCache {
    /// A cache for `engine`, keeping artifacts in `dir` when given.
    pub fn new(engine: Engine, dir: Option<PathBuf>) -> ModuleCache {
        ModuleCache {
            engine,
            dir,
            memory: Mutex::new(HashMap::new()),
        }
    }

    fn artifact(&self, hash: &str) -> Option<PathBuf> {
        // The engine's compatibility hash is in the name: an artifact from another wasmtime or
        // another configuration is never loaded.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&self.engine.precompile_compatibility_hash(), &mut h);
        let engine = std::hash::Hasher::finish(&h);
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{hash}-{engine:016x}.cwasm")))
    }

    /// The compiled module of content hash `hash`, if this cache has it (in memory or on disk),
    /// so a node can skip fetching bytes it has already compiled.
    pub fn get(&self, hash: &str) -> Option<Module> {
        self.lookup(hash).map(|(m, _)| m)
    }

    fn lookup(&self, hash: &str) -> Option<(Module, Source)> {
        if let Some(m) = self.memory.lock().get(hash) {
            return Some((m.clone(), Source::Memory));
        }
        let path = self.artifact(hash)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: the artifact was written by `Module::serialize` of an engine with the same
        // compatibility hash (it is in the file name), into a directory this node owns. A
        // tampered artifact could run arbitrary code, so the cache directory must not be
        // writable by others (it is created 0700).
        match unsafe { Module::deserialize_file(&self.engine, &path) } {
            Ok(m) => {
                self.memory.lock().insert(hash.to_owned(), m.clone());
                Some((m, Source::Disk))
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a bad cached artifact");
                None
            }
        }
    }

    /// The module for `bytes` (WebAssembly binary or text), named `name` in errors.
    ///
    /// # Errors
    /// The bytes are not a valid module.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<(Module, String, Source), CacheError> {
        let hash = content_hash(bytes);
        if let Some((m, source)) = self.lookup(&hash) {
            return Ok((m, hash, source));
        }
        let module = self.compile(name, &hash, bytes)?;
        Ok((module, hash, Source::Compiled))
    }

    /// Compiles `bytes` and keeps the module under `key`, in memory and on disk.
    fn compile(&self, name: &str, key: &str, bytes: &[u8]) -> Result<Module, CacheError> {
        let module = Module::new(&self.engine, bytes).map_err(|e| CacheError::Invalid {
            name: name.to_owned(),
            reason: format!("{e:#}"),
        })?;
        if let Some(path) = self.artifact(key)
            && let Err(e) = write_artifact(&path, &module)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled module");
        }
        self.memory.lock().insert(key.to_owned(), module.clone());
        Ok(module)
    }

    /// The module for `bytes` made checkpointable ([`super::checkpoint::instrument`]): rewritten
    /// once, then cached as any module, under the source's hash with a `+ckpt` mark. Returns the
    /// source's hash.
    ///
    /// # Errors
    /// The bytes are not a valid module, or it cannot be made checkpointable (no memory or
    /// entry point exported, no `wasm-opt`).
    pub fn load_checkpointable(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<(Module, String, Source), CacheError> {
        let hash = content_hash(bytes);
        let key = format!("{hash}+ckpt");
        if let Some((m, source)) = self.lookup(&key) {
            return Ok((m, hash, source));
        }
        let rewritten =
            super::checkpoint::instrument(bytes).map_err(|source| CacheError::Checkpoint {
                name: name.to_owned(),
                source,
            })?;
        let module = self.compile(name, &key, &rewritten)?;
        Ok((module, hash, Source::Compiled))
    }

    /// The module in the file `path`.
    ///
    /// # Errors
    /// The file cannot be read or is not a valid module.
    pub fn load_file(&self, path: &Path) -> Result<(Module, String, Source), CacheError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| CacheError::Read {
            name: name.clone(),
            source,
        })?;
        self.load(&name, &bytes)
    }

    /// Forgets the in-memory modules (the disk cache stays).
    pub fn clear_memory(&self) {
        self.memory.lock().clear();
    }
}

/// Writes an artifact atomically (temporary file, then rename), in a private directory.
fn write_artifact(path: &Path, module: &Module) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("artifact path has no directory"))?;
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let bytes = module.serialize().map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Shares a cache between runtimes of one engine.
pub type SharedCache = Arc<ModuleCache>;
