//! A directory of files by content hash, and taking a file in from a stream, checked against
//! its hash before it is kept.

use std::io;
use std::path::{Path, PathBuf};

use futures::{AsyncRead, AsyncReadExt};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::proto::Hash;

/// How much of a file is read or written at once.
pub(crate) const CHUNK: usize = 256 << 10;

/// Why a file was not taken in.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream ended early or broke.
    #[error("the transfer broke after {got} of {size} bytes: {error}")]
    Broke {
        /// Bytes taken.
        got: u64,
        /// Bytes expected.
        size: u64,
        /// Why.
        error: io::Error,
    },
    /// The bytes do not hash to the file's hash.
    #[error("the {size} bytes received hash to {got}, not {want}")]
    Mismatch {
        /// Their hash.
        got: Hash,
        /// The hash expected.
        want: Hash,
        /// Their size.
        size: u64,
    },
    /// The file could not be written.
    #[error("{}: {error}", .path.display())]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
}

/// Takes `size` bytes from `from` into the file `to` (through a temporary file beside it,
/// renamed once the bytes hash to `hash`); nothing is left at `to` when they do not.
///
/// # Errors
/// The stream breaks or ends early, the bytes do not match, or the file cannot be written.
pub async fn receive<R: AsyncRead + Unpin>(
    from: &mut R,
    hash: Hash,
    size: u64,
    to: &Path,
) -> Result<(), ReceiveError> {
    let write = |error| ReceiveError::Write {
        path: to.to_owned(),
        error,
    };
    let tmp = temporary(to);
    let mut file = tokio::fs::File::create(&tmp).await.map_err(write)?;
    let taken = async {
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while got < size {
            let want = usize::try_from(size - got).unwrap_or(CHUNK).min(CHUNK);
            let n = match from.read(&mut buf[..want]).await {
                Ok(0) => {
                    let error = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Err(ReceiveError::Broke { got, size, error });
                }
                Ok(n) => n,
                Err(error) => return Err(ReceiveError::Broke { got, size, error }),
            };
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).await.map_err(write)?;
            got += n as u64;
        }
        file.flush().await.map_err(write)?;
        let got = Hash::from(<[u8; 32]>::from(hasher.finalize()));
        if got != hash {
            return Err(ReceiveError::Mismatch {
                got,
                want: hash,
                size,
            });
        }
        tokio::fs::rename(&tmp, to).await.map_err(write)
    }
    .await;
    if taken.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    taken
}

/// A temporary name beside `path`, unique to this process and call.
fn temporary(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".part{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// The content hash and size of a file, read in chunks.
///
/// # Errors
/// It cannot be read.
pub fn hash_file(path: &Path) -> io::Result<(Hash, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((Hash::from(<[u8; 32]>::from(hasher.finalize())), size))
}

/// Files by content hash in a directory: each at `DIR/HASH`, written whole or not at all.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    /// Bytes of files sent whole to those who got them.
    served: std::sync::atomic::AtomicU64,
    /// The files laid out as jobs' inputs since it was opened (a node serves only these).
    inputs: parking_lot::Mutex<std::collections::HashSet<Hash>>,
}

impl FileStore {
    /// The store in `dir`, made if missing; temporary files a crash left behind go.
    ///
    /// # Errors
    /// The directory cannot be made or read.
    pub fn open(dir: &Path) -> io::Result<FileStore> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().contains(".part") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(FileStore {
            dir: dir.to_owned(),
            served: std::sync::atomic::AtomicU64::new(0),
            inputs: parking_lot::Mutex::default(),
        })
    }

    /// Where the file of `hash` is (or would be).
    pub fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_string())
    }

    /// The size of the file of `hash`, if held.
    pub fn size(&self, hash: &Hash) -> Option<u64> {
        std::fs::metadata(self.path(hash))
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len())
    }

    /// Bytes free to unprivileged writers on the store's file system, and its size, if it can
    /// be asked.
    pub fn free_space(&self) -> Option<(u64, u64)> {
        let s = rustix::fs::statvfs(&self.dir).ok()?;
        Some((
            s.f_bavail.saturating_mul(s.f_frsize),
            s.f_blocks.saturating_mul(s.f_frsize),
        ))
    }

    /// Makes the file of `hash` as new as one just put (its time of change now), so that what
    /// lets go of old files no job names spares it a while.
    pub fn touch(&self, hash: &Hash) {
        if let Ok(f) = std::fs::File::options().write(true).open(self.path(hash)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Whether the file of `hash` is held.
    pub fn has(&self, hash: &Hash) -> bool {
        self.size(hash).is_some()
    }

    /// Takes `size` bytes of the file `hash` from `from` ([`receive`]).
    ///
    /// # Errors
    /// As [`receive`].
    pub async fn receive<R: AsyncRead + Unpin>(
        &self,
        from: &mut R,
        hash: Hash,
        size: u64,
    ) -> Result<(), ReceiveError> {
        receive(from, hash, size, &self.path(&hash)).await
    }

    /// Keeps a copy of the file at `path`; its hash and size. Blocking.
    ///
    /// # Errors
    /// It cannot be read, or the copy cannot be written.
    pub fn put_file(&self, path: &Path) -> io::Result<(Hash, u64)> {
        let (hash, size) = hash_file(path)?;
        let to = self.path(&hash);
        if !to.exists() {
            let tmp = temporary(&to);
            std::fs::copy(path, &tmp)
                .and_then(|_| std::fs::rename(&tmp, &to))
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })?;
        }
        Ok((hash, size))
    }

    /// File `hash` was laid out as a job's input.
    pub(crate) fn mark_input(&self, hash: Hash) {
        self.inputs.lock().insert(hash);
    }

    /// Whether file `hash` was laid out as a job's input since the store was opened.
    pub(crate) fn is_input(&self, hash: &Hash) -> bool {
        self.inputs.lock().contains(hash)
    }

    /// Bytes of files sent whole from this store since it was opened.
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `bytes` of a file were sent whole.
    pub(crate) fn count_served(&self, bytes: u64) {
        self.served
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets the file of `hash`.
    pub fn remove(&self, hash: &Hash) {
        let _ = std::fs::remove_file(self.path(hash));
    }

    /// Every hash held, with its size.
    pub fn list(&self) -> Vec<(Hash, u64)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let hash = e.file_name().to_str()?.parse::<Hash>().ok()?;
                Some((hash, e.metadata().ok()?.len()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_is_kept_only_whole_and_matching_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("store");
        let bytes = vec![7u8; 3 * CHUNK + 5];
        let hash = Hash::of(&bytes);
        store
            .receive(&mut &bytes[..], hash, bytes.len() as u64)
            .await
            .expect("kept");
        assert_eq!(store.size(&hash), Some(bytes.len() as u64));
        assert_eq!(std::fs::read(store.path(&hash)).expect("read"), bytes);
        // Short, or not the bytes named: nothing kept, nothing left behind.
        let other = Hash::of(b"other");
        let e = store
            .receive(&mut &b"oth"[..], other, 5)
            .await
            .expect_err("short");
        assert!(
            matches!(
                e,
                ReceiveError::Broke {
                    got: 3,
                    size: 5,
                    ..
                }
            ),
            "{e}"
        );
        let e = store
            .receive(&mut &b"wrong"[..], other, 5)
            .await
            .expect_err("mismatch");
        assert!(matches!(e, ReceiveError::Mismatch { .. }), "{e}");
        assert!(!store.has(&other));
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
        let src = dir.path().join("src");
        std::fs::write(&src, b"other").expect("write");
        let store2 = FileStore::open(&dir.path().join("two")).expect("store");
        assert_eq!(store2.put_file(&src).expect("put"), (other, 5));
        assert_eq!(store2.list(), [(other, 5)]);
    }
}
