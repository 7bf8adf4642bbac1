//! The image repository: execution-environment images with stable ids (OpenCCS).
//!
//! An image id names an image and pins its content: `name:version@sha256:HEX`. The repository
//! is a directory:
//!
//! ```text
//! DIR/blobs/HEX             the image bytes, named by their SHA-256
//! DIR/manifests/NAME/VERSION.json   its digest and metadata
//! ```
//!
//! Bytes enter only through [`Repository::import`] (a local file) or [`Repository::receive`]
//! (bytes fetched from another node or an image server): both hash while they copy into a
//! temporary file and move it into place only when the digest matches, so a corrupt or
//! truncated transfer never becomes an image.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A stable image id; in serde, its text (parsed, so a bad one does not decode).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageId {
    /// The image's name (`[a-z0-9._-]`, starting with a letter or digit).
    pub name: String,
    /// Its version (`[A-Za-z0-9._+-]`).
    pub version: String,
    /// The SHA-256 of its bytes, lowercase hex.
    pub digest: String,
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}@sha256:{}", self.name, self.version, self.digest)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

fn valid_version(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
}

fn valid_digest(s: &str) -> bool {
    s.len() == 64
        && s.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

impl FromStr for ImageId {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<ImageId, ImageError> {
        let bad = || ImageError::BadId(s.to_owned());
        let (nv, digest) = s.split_once("@sha256:").ok_or_else(bad)?;
        let (name, version) = nv.split_once(':').ok_or_else(bad)?;
        if !(valid_name(name) && valid_version(version) && valid_digest(digest)) {
            return Err(bad());
        }
        Ok(ImageId {
            name: name.into(),
            version: version.into(),
            digest: digest.into(),
        })
    }
}

impl TryFrom<String> for ImageId {
    type Error = ImageError;

    fn try_from(s: String) -> Result<ImageId, ImageError> {
        s.parse()
    }
}

impl From<ImageId> for String {
    fn from(id: ImageId) -> String {
        id.to_string()
    }
}

/// What an image is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `x86_64`.
    pub arch: String,
    /// The kernel it boots, when the driver loads one (Xen PV/PVH): the id of another image
    /// in the repository (`name:version@sha256:HEX`), so the kernel is verified like any image.
    #[serde(default)]
    pub kernel: Option<String>,
    /// The initial ramdisk it boots with, as the id of another image.
    #[serde(default)]
    pub ramdisk: Option<String>,
    /// The kernel command line it needs (e.g. `root=/dev/xvda console=hvc0`).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The drivers that can run it, e.g. `["xen", "host"]`.
    pub drivers: Vec<String>,
    /// Its guest boots an MVM agent (`mvm agent`) that runs the parts of the jobs placed in
    /// it (Xen): the node gives the guest an interface on its guest network.
    #[serde(default)]
    pub agent: bool,
    /// How the bytes are stored: `raw`, `qcow2`, or `raw+zstd` (decompressed at deploy).
    pub format: String,
}

#[cfg(test)]
impl Metadata {
    /// Linux on x86_64 in `format`, for `drivers`: the metadata the tests start from.
    pub(crate) fn example(format: &str, drivers: &[&str]) -> Metadata {
        Metadata {
            os: "linux".into(),
            arch: "x86_64".into(),
            kernel: None,
            ramdisk: None,
            cmdline: None,
            agent: false,
            drivers: drivers.iter().map(|d| (*d).to_owned()).collect(),
            format: format.into(),
        }
    }
}

/// A manifest on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    digest: String,
    size: u64,
    metadata: Metadata,
}

/// An image in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Its id.
    pub id: ImageId,
    /// Its metadata.
    pub metadata: Metadata,
    /// Its size in bytes.
    pub size: u64,
    /// Where its bytes are.
    pub path: PathBuf,
}

/// A repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not a valid id.
    #[error("'{0}' is not an image id (write name:version@sha256:HEX)")]
    BadId(String),
    /// No such image here.
    #[error("unknown image {0}")]
    Unknown(String),
    /// The bytes do not have the digest they should.
    #[error("image {id} is corrupt: its bytes hash to sha256:{found}")]
    Corrupt {
        /// The image expected.
        id: String,
        /// What the bytes hash to.
        found: String,
    },
    /// The name and version exist with other content.
    #[error("{name}:{version} exists already with digest {existing}")]
    Conflict {
        /// The name.
        name: String,
        /// The version.
        version: String,
        /// The digest it has.
        existing: String,
    },
    /// The metadata does not say which drivers can run the image, or names no format.
    #[error("image metadata: {0}")]
    BadMetadata(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A manifest is unreadable.
    #[error("{path}: bad manifest: {message}")]
    BadManifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The repository in one directory.
#[derive(Debug, Clone)]
pub struct Repository {
    dir: PathBuf,
}

impl Repository {
    /// Opens (creating if needed) the repository in `dir`.
    ///
    /// # Errors
    /// The directories cannot be created.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Repository, ImageError> {
        let dir = dir.into();
        for sub in ["blobs", "manifests", "incoming"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Repository { dir })
    }

    fn blob(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs").join(digest)
    }

    fn manifest_path(&self, name: &str, version: &str) -> PathBuf {
        self.dir
            .join("manifests")
            .join(name)
            .join(format!("{version}.json"))
    }

    /// Copies `src` into a temporary file while hashing it; returns the file, digest and size.
    fn take_in(
        &self,
        src: &mut dyn Read,
    ) -> Result<(tempfile::NamedTempFile, String, u64), ImageError> {
        let incoming = self.dir.join("incoming");
        let mut tmp = tempfile::NamedTempFile::new_in(&incoming).map_err(io_err(&incoming))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = src.read(&mut buf).map_err(io_err(&incoming))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
            size += n as u64;
        }
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        Ok((tmp, hex::encode(hasher.finalize()), size))
    }

    fn store(
        &self,
        name: &str,
        version: &str,
        tmp: tempfile::NamedTempFile,
        digest: String,
        size: u64,
        metadata: Metadata,
    ) -> Result<ImageId, ImageError> {
        if !valid_name(name) || !valid_version(version) {
            return Err(ImageError::BadId(format!("{name}:{version}")));
        }
        if metadata.drivers.is_empty() {
            return Err(ImageError::BadMetadata(
                "no driver can run it (drivers is empty)".into(),
            ));
        }
        if !["raw", "qcow2", "raw+zstd"].contains(&metadata.format.as_str()) {
            return Err(ImageError::BadMetadata(format!(
                "unknown format '{}' (raw, qcow2, raw+zstd)",
                metadata.format
            )));
        }
        let mpath = self.manifest_path(name, version);
        if let Ok(existing) = self.read_manifest(&mpath)
            && existing.digest != digest
        {
            return Err(ImageError::Conflict {
                name: name.into(),
                version: version.into(),
                existing: existing.digest,
            });
        }
        let blob = self.blob(&digest);
        tmp.persist(&blob).map_err(|e| ImageError::Io {
            path: blob.clone(),
            source: e.error,
        })?;
        let dir = mpath
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| self.dir.join("manifests"));
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let manifest = Manifest {
            digest: digest.clone(),
            size,
            metadata,
        };
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::BadManifest {
            path: mpath.clone(),
            message: e.to_string(),
        })?;
        let tmp_m = mpath.with_extension("json.tmp");
        fs::write(&tmp_m, text).map_err(io_err(&tmp_m))?;
        fs::rename(&tmp_m, &mpath).map_err(io_err(&mpath))?;
        Ok(ImageId {
            name: name.into(),
            version: version.into(),
            digest,
        })
    }

    /// Imports a local image file under `name:version`.
    ///
    /// # Errors
    /// Bad name or metadata, unreadable file, or the name and version exist with other bytes.
    pub fn import(
        &self,
        name: &str,
        version: &str,
        file: &Path,
        metadata: Metadata,
    ) -> Result<ImageId, ImageError> {
        let mut f = fs::File::open(file).map_err(io_err(file))?;
        let (tmp, digest, size) = self.take_in(&mut f)?;
        self.store(name, version, tmp, digest, size, metadata)
    }

    /// Receives image `id` from another node or an image server: the bytes are kept only if they
    /// hash to the id's digest.
    ///
    /// # Errors
    /// [`ImageError::Corrupt`] when the bytes do not match (nothing is kept), or as `import`.
    pub fn receive(
        &self,
        id: &ImageId,
        bytes: &mut dyn Read,
        metadata: Metadata,
    ) -> Result<Image, ImageError> {
        let (tmp, digest, size) = self.take_in(bytes)?;
        if digest != id.digest {
            return Err(ImageError::Corrupt {
                id: id.to_string(),
                found: digest,
            });
        }
        self.store(&id.name, &id.version, tmp, digest, size, metadata)?;
        self.get(id)
    }

    fn read_manifest(&self, path: &Path) -> Result<Manifest, ImageError> {
        let text = fs::read(path).map_err(io_err(path))?;
        serde_json::from_slice(&text).map_err(|e| ImageError::BadManifest {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The image `id`, if this repository has exactly that content.
    ///
    /// # Errors
    /// [`ImageError::Unknown`] when the name, version or digest is not here.
    pub fn get(&self, id: &ImageId) -> Result<Image, ImageError> {
        let unknown = || ImageError::Unknown(id.to_string());
        let m = self
            .read_manifest(&self.manifest_path(&id.name, &id.version))
            .map_err(|_| unknown())?;
        if m.digest != id.digest {
            return Err(unknown());
        }
        let path = self.blob(&id.digest);
        if !path.exists() {
            return Err(unknown());
        }
        Ok(Image {
            id: id.clone(),
            metadata: m.metadata,
            size: m.size,
            path,
        })
    }

    /// The id of `name:version`.
    ///
    /// # Errors
    /// [`ImageError::Unknown`].
    pub fn resolve(&self, name: &str, version: &str) -> Result<ImageId, ImageError> {
        let m = self
            .read_manifest(&self.manifest_path(name, version))
            .map_err(|_| ImageError::Unknown(format!("{name}:{version}")))?;
        Ok(ImageId {
            name: name.into(),
            version: version.into(),
            digest: m.digest,
        })
    }

    /// Re-hashes an image's bytes.
    ///
    /// # Errors
    /// [`ImageError::Corrupt`] when they changed since they were stored, or unknown.
    pub fn verify(&self, id: &ImageId) -> Result<(), ImageError> {
        let img = self.get(id)?;
        let mut f = fs::File::open(&img.path).map_err(io_err(&img.path))?;
        let mut hasher = Sha256::new();
        io::copy(&mut f, &mut hasher).map_err(io_err(&img.path))?;
        let found = hex::encode(hasher.finalize());
        if found == id.digest {
            Ok(())
        } else {
            Err(ImageError::Corrupt {
                id: id.to_string(),
                found,
            })
        }
    }

    /// Every image here, which a node publishes as the ids it supports.
    ///
    /// # Errors
    /// A manifest directory cannot be read.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let root = self.dir.join("manifests");
        let mut out = Vec::new();
        for name in fs::read_dir(&root).map_err(io_err(&root))? {
            let name = name.map_err(io_err(&root))?.path();
            let Some(n) = name.file_name().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            for v in fs::read_dir(&name).map_err(io_err(&name))? {
                let v = v.map_err(io_err(&name))?.path();
                let Some(version) = v
                    .file_name()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.strip_suffix(".json"))
                    .map(str::to_owned)
                else {
                    continue;
                };
                let m = self.read_manifest(&v)?;
                let id = ImageId {
                    name: n.clone(),
                    version,
                    digest: m.digest,
                };
                out.push(Image {
                    path: self.blob(&id.digest),
                    id,
                    metadata: m.metadata,
                    size: m.size,
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata::example("raw", &["xen"])
    }

    #[test]
    fn ids_parse_and_print_and_bad_ones_are_refused() {
        let d = "a".repeat(64);
        let s = format!("debian-pv:12.5@sha256:{d}");
        let id: ImageId = s.parse().expect("valid");
        assert_eq!(
            (id.name.as_str(), id.version.as_str()),
            ("debian-pv", "12.5")
        );
        assert_eq!(id.to_string(), s);
        for bad in [
            "debian",
            "debian:1",
            &format!("Debian:1@sha256:{d}"),
            &format!("x:1@sha256:{}", "g".repeat(64)),
            &format!("x:@sha256:{d}"),
            &format!("x:1@sha256:{}", "a".repeat(63)),
        ] {
            assert!(bad.parse::<ImageId>().is_err(), "{bad}");
        }
        // In serde it is its text, and a bad one does not decode.
        let json = serde_json::to_string(&id).expect("encodes");
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<ImageId>(&json).expect("decodes"), id);
        let e = serde_json::from_str::<ImageId>("\"debian:1\"").expect_err("not pinned");
        assert!(e.to_string().contains("is not an image id"), "{e}");
    }

    #[test]
    fn import_get_list_verify_and_detect_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open(dir.path().join("repo")).expect("open");
        let src = dir.path().join("disk.img");
        fs::write(&src, b"a tiny disk image").expect("write");
        let id = repo.import("tiny", "1.0", &src, meta()).expect("import");
        assert_eq!(id.digest, hex::encode(Sha256::digest(b"a tiny disk image")));
        assert_eq!(repo.resolve("tiny", "1.0").expect("known"), id);
        let img = repo.get(&id).expect("known");
        assert_eq!(
            (img.size, img.metadata.drivers.clone()),
            (17, vec!["xen".to_owned()])
        );
        repo.verify(&id).expect("intact");
        assert_eq!(repo.list().expect("lists").len(), 1);
        // Same name and version, other bytes: refused.
        fs::write(&src, b"other bytes").expect("write");
        assert!(matches!(
            repo.import("tiny", "1.0", &src, meta()),
            Err(ImageError::Conflict { .. })
        ));
        // Tampered on disk: verify says so.
        fs::write(&img.path, b"tampered").expect("write");
        let e = repo.verify(&id).expect_err("corrupt");
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");
        // Unknown digest, name or version.
        let other = ImageId {
            digest: "b".repeat(64),
            ..id.clone()
        };
        assert!(matches!(repo.get(&other), Err(ImageError::Unknown(_))));
        assert!(matches!(
            repo.resolve("nope", "1"),
            Err(ImageError::Unknown(_))
        ));
    }

    #[test]
    fn received_bytes_are_kept_only_when_they_match_the_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open(dir.path()).expect("open");
        let bytes = b"fetched image".to_vec();
        let id = ImageId {
            name: "f".into(),
            version: "2".into(),
            digest: hex::encode(Sha256::digest(&bytes)),
        };
        let bad = b"fetched imagE".to_vec();
        let e = repo
            .receive(&id, &mut &bad[..], meta())
            .expect_err("wrong bytes");
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");
        assert!(repo.get(&id).is_err(), "nothing kept");
        assert_eq!(
            fs::read_dir(dir.path().join("incoming"))
                .expect("dir")
                .count(),
            0,
            "no temporary left"
        );
        let img = repo
            .receive(&id, &mut &bytes[..], meta())
            .expect("matching bytes");
        assert_eq!(fs::read(&img.path).expect("read"), bytes);
    }

    #[test]
    fn bad_metadata_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open(dir.path()).expect("open");
        let src = dir.path().join("d");
        fs::write(&src, b"x").expect("write");
        let m = Metadata {
            drivers: vec![],
            ..meta()
        };
        assert!(matches!(
            repo.import("a", "1", &src, m),
            Err(ImageError::BadMetadata(_))
        ));
        let m = Metadata {
            format: "vmdk".into(),
            ..meta()
        };
        assert!(matches!(
            repo.import("a", "1", &src, m),
            Err(ImageError::BadMetadata(_))
        ));
        assert!(matches!(
            repo.import("A", "1", &src, meta()),
            Err(ImageError::BadId(_))
        ));
    }
}
