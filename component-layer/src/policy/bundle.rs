//! A policy bundle: the `.polar` files of a policy directory, by relative path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The largest policy file, and the largest bundle.
pub const MAX_FILE: usize = 1 << 20;
/// The most files in a bundle.
pub const MAX_FILES: usize = 1024;

/// Where in a bundle something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, relative to the policy directory.
    pub file: String,
    /// 1-based line (0: the whole file).
    pub line: u32,
    /// 1-based column (0: the whole line).
    pub column: u32,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}", self.file),
            (l, 0) => write!(f, "{}:{l}", self.file),
            (l, c) => write!(f, "{}:{l}:{c}", self.file),
        }
    }
}

/// A policy bundle that cannot be read or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// A file or directory cannot be read.
    #[error("{path}: {message}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// A file's name or place is not one a bundle may hold.
    #[error("{file}: {message}")]
    Layout {
        /// The file, relative to the bundle.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A file does not load (syntax, unknown class, failed inline query).
    #[error("{at}: {message}")]
    Polar {
        /// Where.
        at: Location,
        /// oso's message, without its own position.
        message: String,
    },
}

impl BundleError {
    /// The error with the files named under `dir` (the directory the bundle was read from).
    pub fn in_dir(&self, dir: &Path) -> String {
        match self {
            BundleError::Io { .. } => self.to_string(),
            _ => format!("{}/{self}", dir.display()),
        }
    }
}

/// The scope of one file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scope {
    InterDomain,
    Node,
    Domain(String),
}

/// The `.polar` files of a policy directory, by path relative to it (`/`-separated).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bundle {
    /// Path → text.
    pub files: BTreeMap<String, String>,
}

/// Whether `s` is a valid name of a domain, user, node, role or policy file: 1–64 of
/// `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Bundle {
    /// Reads every `.polar` file of `dir`: `inter-domain.polar` and `node.polar` at the top,
    /// and `DOMAIN/*.polar` one level down. Other files (READMEs, certificates) are left out;
    /// a `.polar` file anywhere else is an error.
    ///
    /// # Errors
    /// A directory or file cannot be read, or a `.polar` file is misplaced or too large.
    pub fn read_dir(dir: &Path) -> Result<Bundle, BundleError> {
        let io = |path: &Path, e: std::io::Error| BundleError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let mut files = BTreeMap::new();
        for e in sorted_entries(dir)? {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let kind = e.file_type().map_err(|err| io(&path, err))?;
            if kind.is_dir() && name_ok(&name) {
                for f in sorted_entries(&path)? {
                    let fname = f.file_name().to_string_lossy().into_owned();
                    if fname.ends_with(".polar") {
                        let rel = format!("{name}/{fname}");
                        files.insert(rel, read_text(&f.path())?);
                    }
                }
            } else if name.ends_with(".polar") {
                files.insert(name, read_text(&path)?);
            }
        }
        let b = Bundle { files };
        b.check_layout()?;
        Ok(b)
    }

    /// Checks every path is `inter-domain.polar`, `node.polar` or `DOMAIN/NAME.polar`, and
    /// the sizes (a bundle from the network is checked the same way as one from disk).
    ///
    /// # Errors
    /// The first file that does not fit.
    pub fn check_layout(&self) -> Result<(), BundleError> {
        if self.files.len() > MAX_FILES {
            return Err(BundleError::Layout {
                file: String::new(),
                message: format!("more than {MAX_FILES} policy files"),
            });
        }
        let mut total = 0usize;
        for (path, text) in &self.files {
            total += text.len();
            if text.len() > MAX_FILE || total > 16 * MAX_FILE {
                return Err(BundleError::Layout {
                    file: path.clone(),
                    message: "too large".into(),
                });
            }
            Self::scope(path)?;
        }
        Ok(())
    }

    pub(crate) fn scope(path: &str) -> Result<Scope, BundleError> {
        let bad = |m: &str| BundleError::Layout {
            file: path.to_owned(),
            message: m.to_owned(),
        };
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["inter-domain.polar"] => Ok(Scope::InterDomain),
            ["node.polar"] => Ok(Scope::Node),
            [domain, file] if name_ok(domain) && name_ok(file) && file.ends_with(".polar") => {
                Ok(Scope::Domain((*domain).to_owned()))
            }
            _ => Err(bad(
                "a policy file is inter-domain.polar, node.polar, or DOMAIN/NAME.polar \
                 (names of [A-Za-z0-9._-])",
            )),
        }
    }

    /// The SHA-256 of the bundle (paths and texts, in order), in hex.
    pub fn digest(&self) -> String {
        hex::encode(self.sha256())
    }

    /// The SHA-256 of the bundle (paths and texts, in order).
    pub fn sha256(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for (path, text) in &self.files {
            h.update((path.len() as u64).to_le_bytes());
            h.update(path.as_bytes());
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        h.finalize().into()
    }

    /// The domains that have a policy in it.
    pub fn domains(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .files
            .keys()
            .filter_map(|p| match Self::scope(p) {
                Ok(Scope::Domain(d)) => Some(d),
                _ => None,
            })
            .collect();
        d.dedup();
        d
    }
}

/// The entries of `dir`, by name.
fn sorted_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>, BundleError> {
    let io = |e: std::io::Error| BundleError::Io {
        path: dir.to_owned(),
        message: e.to_string(),
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    Ok(entries)
}

fn read_text(path: &Path) -> Result<String, BundleError> {
    let meta = std::fs::metadata(path).map_err(|e| BundleError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if meta.len() > MAX_FILE as u64 {
        return Err(BundleError::Io {
            path: path.to_owned(),
            message: format!("larger than {MAX_FILE} bytes"),
        });
    }
    std::fs::read_to_string(path).map_err(|e| BundleError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    })
}
