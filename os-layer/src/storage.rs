//! A guest's storage back-end (SmartDomains): its writable disk made from a repository image,
//! its swap, and the kernel and ramdisk it boots, all under one directory per guest, so that
//! releasing the guest brings the host back to where it was.
//!
//! ```text
//! ROOT/NAME/disk.raw | disk.qcow2   the image's copy (raw), decompressed copy (raw+zstd),
//!                                   or copy-on-write overlay (qcow2, by qemu-img)
//! ROOT/NAME/swap                    a swap area of the size asked for
//! ```
//! Kernel and ramdisk are images too, used read-only from the repository after a digest check.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::image::{ImageError, ImageId, Repository};
use crate::loopdev;

/// What storage a guest gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSpec {
    /// The image its disk is made from.
    #[serde(with = "id_string")]
    pub image: ImageId,
    /// The disk's size in MiB; the image's size when absent. Never smaller than the image.
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// A swap area of this many MiB, when given.
    #[serde(default)]
    pub swap_mib: Option<u64>,
}

mod id_string {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::image::ImageId;

    pub(super) fn serialize<S: Serializer>(id: &ImageId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ImageId, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A guest's deployed storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The guest's storage directory.
    pub dir: PathBuf,
    /// Its disk.
    pub disk: PathBuf,
    /// The disk's format: `raw` or `qcow2`.
    pub format: String,
    /// Its swap area.
    pub swap: Option<PathBuf>,
    /// The kernel to boot, from the image's metadata.
    pub kernel: Option<PathBuf>,
    /// The ramdisk, from the image's metadata.
    pub ramdisk: Option<PathBuf>,
    /// The kernel command line from the image's metadata.
    pub cmdline: Option<String>,
}

/// A storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The image, or one it names, is unknown or corrupt.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The guest has storage already.
    #[error("guest '{0}' has storage already")]
    Exists(String),
    /// A size is impossible.
    #[error("guest '{guest}': {message}")]
    Size {
        /// The guest.
        guest: String,
        /// What is wrong.
        message: String,
    },
    /// A file could not be made or removed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// `qemu-img` failed.
    #[error("`{command}` failed: {stderr}")]
    Tool {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// Guests' storage under one root directory.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

fn valid_guest(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with('.')
}

impl Storage {
    /// Storage under `root` (created if needed).
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(root: impl Into<PathBuf>) -> Result<Storage, StorageError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(Storage { root })
    }

    /// The directory of guest `name`'s storage.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Whether guest `name` has storage here.
    pub fn exists(&self, name: &str) -> bool {
        self.dir(name).exists()
    }

    /// The guests that have storage here.
    pub fn list(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| valid_guest(n))
            .collect();
        out.sort();
        out
    }

    /// Makes guest `name`'s storage from `spec`. `raw_only` asks for a raw disk even from a
    /// qcow2 image (a driver that serves disks as block devices). On error nothing is left.
    ///
    /// # Errors
    /// Unknown or corrupt image, a disk smaller than the image, existing storage, or I/O.
    pub fn deploy(
        &self,
        repo: &Repository,
        name: &str,
        spec: &StorageSpec,
        raw_only: bool,
    ) -> Result<Volume, StorageError> {
        if !valid_guest(name) {
            return Err(StorageError::Size {
                guest: name.into(),
                message: "a guest name is 1 to 64 of [A-Za-z0-9._-], not starting with '.'".into(),
            });
        }
        let image = repo.get(&spec.image)?;
        repo.verify(&spec.image)?;
        let boot = |id: &Option<String>| -> Result<Option<PathBuf>, StorageError> {
            let Some(id) = id else { return Ok(None) };
            let id: ImageId = id.parse()?;
            repo.verify(&id)?;
            Ok(Some(repo.get(&id)?.path))
        };
        let kernel = boot(&image.metadata.kernel)?;
        let ramdisk = boot(&image.metadata.ramdisk)?;
        let dir = self.dir(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StorageError::Exists(name.into()));
            }
            Err(e) => return Err(io_err(&dir)(e)),
        }
        let made = self.fill(&dir, name, &image, spec, raw_only);
        match made {
            Ok((disk, format, swap)) => Ok(Volume {
                dir,
                disk,
                format,
                swap,
                kernel,
                ramdisk,
                cmdline: image.metadata.cmdline.clone(),
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn fill(
        &self,
        dir: &Path,
        name: &str,
        image: &crate::image::Image,
        spec: &StorageSpec,
        raw_only: bool,
    ) -> Result<(PathBuf, String, Option<PathBuf>), StorageError> {
        let (disk, format) = match image.metadata.format.as_str() {
            "qcow2" if !raw_only => {
                let disk = dir.join("disk.qcow2");
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    &image.path.display().to_string(),
                    &disk.display().to_string(),
                ])?;
                (disk, "qcow2")
            }
            "qcow2" => {
                let disk = dir.join("disk.raw");
                qemu_img(&[
                    "convert",
                    "-q",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    &image.path.display().to_string(),
                    &disk.display().to_string(),
                ])?;
                (disk, "raw")
            }
            "raw+zstd" => {
                let disk = dir.join("disk.raw");
                let src = File::open(&image.path).map_err(io_err(&image.path))?;
                let mut dst = File::create(&disk).map_err(io_err(&disk))?;
                zstd::stream::copy_decode(src, &mut dst).map_err(io_err(&image.path))?;
                dst.flush().map_err(io_err(&disk))?;
                (disk, "raw")
            }
            _ => {
                let disk = dir.join("disk.raw");
                fs::copy(&image.path, &disk).map_err(io_err(&disk))?;
                (disk, "raw")
            }
        };
        if let Some(mib) = spec.disk_mib {
            let want = mib * MIB;
            let have = if format == "raw" {
                fs::metadata(&disk).map_err(io_err(&disk))?.len()
            } else {
                qcow2_size(&disk)?
            };
            if want < have {
                return Err(StorageError::Size {
                    guest: name.into(),
                    message: format!(
                        "disk_mib {mib} is smaller than image {} ({} MiB)",
                        image.id,
                        have.div_ceil(MIB)
                    ),
                });
            }
            if want > have {
                if format == "raw" {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&disk)
                        .map_err(io_err(&disk))?;
                    f.set_len(want).map_err(io_err(&disk))?;
                } else {
                    qemu_img(&[
                        "resize",
                        "-q",
                        &disk.display().to_string(),
                        &want.to_string(),
                    ])?;
                }
            }
        }
        let swap = match spec.swap_mib {
            Some(0) | None => None,
            Some(mib) => {
                let swap = dir.join("swap");
                make_swap(&swap, mib * MIB)?;
                Some(swap)
            }
        };
        Ok((disk, format.to_owned(), swap))
    }

    /// Removes guest `name`'s storage: detaches any loop device still on its files, then
    /// deletes its directory. Releasing storage that is not there is not an error.
    ///
    /// # Errors
    /// The directory cannot be removed.
    pub fn release(&self, name: &str) -> Result<(), StorageError> {
        if !valid_guest(name) {
            return Ok(());
        }
        let dir = self.dir(name);
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                loopdev::detach_all(&e.path());
            }
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }
}

fn qemu_img(args: &[&str]) -> Result<(), StorageError> {
    let command = format!("qemu-img {}", args.join(" "));
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| StorageError::Tool {
            command: command.clone(),
            stderr: format!("cannot run qemu-img ({e}); install qemu-utils"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(StorageError::Tool {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn qcow2_size(disk: &Path) -> Result<u64, StorageError> {
    // A qcow2 header keeps the virtual size, big-endian, at byte 24.
    let f = File::open(disk).map_err(io_err(disk))?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 24).map_err(io_err(disk))?;
    Ok(u64::from_be_bytes(b))
}

/// Writes a Linux swap area (version 1 header, as `mkswap` writes) of `bytes`, sparse.
fn make_swap(path: &Path, bytes: u64) -> Result<(), StorageError> {
    let pages = bytes / PAGE;
    if pages < 10 {
        return Err(StorageError::Size {
            guest: path.display().to_string(),
            message: "a swap area needs at least 10 pages".into(),
        });
    }
    let f = File::create(path).map_err(io_err(path))?;
    f.set_len(pages * PAGE).map_err(io_err(path))?;
    let mut header = vec![0u8; PAGE as usize];
    header[1024..1028].copy_from_slice(&1u32.to_le_bytes()); // version
    let last = u32::try_from(pages - 1).unwrap_or(u32::MAX);
    header[1028..1032].copy_from_slice(&last.to_le_bytes()); // last_page
    header[PAGE as usize - 10..].copy_from_slice(b"SWAPSPACE2");
    f.write_all_at(&header, 0).map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Metadata;

    fn meta(format: &str) -> Metadata {
        Metadata::example(format, &["xen", "host"])
    }

    fn setup() -> (tempfile::TempDir, Repository, Storage) {
        let t = tempfile::tempdir().unwrap();
        let repo = Repository::open(t.path().join("repo")).unwrap();
        let st = Storage::new(t.path().join("guests")).unwrap();
        (t, repo, st)
    }

    #[test]
    fn a_raw_image_is_copied_grown_and_given_swap_then_released() {
        let (t, repo, st) = setup();
        let img = t.path().join("img");
        fs::write(&img, vec![7u8; 2 * MIB as usize]).unwrap();
        let k = t.path().join("k");
        fs::write(&k, b"kernel").unwrap();
        let kid = repo.import("kern", "1", &k, meta("raw")).unwrap();
        let mut m = meta("raw");
        m.kernel = Some(kid.to_string());
        m.cmdline = Some("console=hvc0".into());
        let id = repo.import("base", "1", &img, m).unwrap();
        let spec = StorageSpec {
            image: id,
            disk_mib: Some(4),
            swap_mib: Some(1),
        };
        let v = st.deploy(&repo, "g1", &spec, true).unwrap();
        assert_eq!(v.format, "raw");
        assert_eq!(fs::metadata(&v.disk).unwrap().len(), 4 * MIB);
        let bytes = fs::read(&v.disk).unwrap();
        assert!(bytes[..2 * MIB as usize].iter().all(|&b| b == 7));
        assert!(bytes[2 * MIB as usize..].iter().all(|&b| b == 0));
        let swap = fs::read(v.swap.as_ref().unwrap()).unwrap();
        assert_eq!(&swap[4086..4096], b"SWAPSPACE2");
        assert_eq!(fs::read(v.kernel.as_ref().unwrap()).unwrap(), b"kernel");
        assert_eq!(v.cmdline.as_deref(), Some("console=hvc0"));
        assert_eq!(st.list(), vec!["g1".to_owned()]);
        // A second deploy under the same name is refused and leaves the first alone.
        assert!(matches!(
            st.deploy(&repo, "g1", &spec, true),
            Err(StorageError::Exists(_))
        ));
        assert!(v.disk.exists());
        st.release("g1").unwrap();
        assert!(!v.dir.exists());
        assert!(st.list().is_empty());
        st.release("g1").unwrap();
    }

    #[test]
    fn a_compressed_image_is_decompressed_at_deploy() {
        let (t, repo, st) = setup();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let z = t.path().join("img.zst");
        fs::write(&z, zstd::encode_all(&data[..], 3).unwrap()).unwrap();
        let id = repo.import("packed", "1", &z, meta("raw+zstd")).unwrap();
        let spec = StorageSpec {
            image: id,
            disk_mib: None,
            swap_mib: None,
        };
        let v = st.deploy(&repo, "g2", &spec, true).unwrap();
        assert_eq!(fs::read(&v.disk).unwrap(), data);
        assert!(v.swap.is_none());
    }

    #[test]
    fn bad_requests_leave_nothing_behind() {
        let (t, repo, st) = setup();
        let img = t.path().join("img");
        fs::write(&img, vec![1u8; 3 * MIB as usize]).unwrap();
        let id = repo.import("base", "1", &img, meta("raw")).unwrap();
        let small = StorageSpec {
            image: id.clone(),
            disk_mib: Some(1),
            swap_mib: None,
        };
        assert!(matches!(
            st.deploy(&repo, "g3", &small, true),
            Err(StorageError::Size { .. })
        ));
        assert!(!st.dir("g3").exists());
        // A corrupt image is refused before anything is made.
        fs::write(repo.get(&id).unwrap().path, b"tampered").unwrap();
        let ok = StorageSpec {
            disk_mib: None,
            ..small
        };
        assert!(matches!(
            st.deploy(&repo, "g3", &ok, true),
            Err(StorageError::Image(ImageError::Corrupt { .. }))
        ));
        assert!(!st.dir("g3").exists());
        assert!(matches!(
            st.deploy(&repo, "../x", &ok, true),
            Err(StorageError::Size { .. })
        ));
    }

    #[test]
    fn a_qcow2_image_gets_an_overlay_or_a_raw_copy() {
        let (t, repo, st) = setup();
        let q = t.path().join("img.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("8M")
            .status()
            .expect("qemu-img (scripts/setup installs qemu-utils)");
        assert!(out.success());
        let id = repo.import("cow", "1", &q, meta("qcow2")).unwrap();
        let spec = StorageSpec {
            image: id,
            disk_mib: Some(16),
            swap_mib: None,
        };
        let v = st.deploy(&repo, "q1", &spec, false).unwrap();
        assert_eq!(v.format, "qcow2");
        assert_eq!(qcow2_size(&v.disk).unwrap(), 16 * MIB);
        let r = st.deploy(&repo, "q2", &spec, true).unwrap();
        assert_eq!(r.format, "raw");
        assert_eq!(fs::metadata(&r.disk).unwrap().len(), 16 * MIB);
    }
}
