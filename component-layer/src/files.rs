//! A job's files (GridWay's prolog and epilog, done for each vertex): every vertex runs in a
//! sandbox directory of its own, preopened as its WASI `.` and nothing else reachable; the
//! job's input files are laid out in it at the paths the profile gives, and the files it
//! leaves there that match the profile's output patterns are taken back, within a bound.
//!
//! Paths inside a sandbox are checked before anything is laid out or taken: relative, `/`
//! between components, none empty, `.` or `..`, no NUL or backslash; symbolic links are
//! neither followed nor taken back, so nothing outside the sandbox is read or written.

use std::io;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// The most input files, or output patterns, a job may name.
pub const MAX_FILES: usize = 10_000;

/// The longest path inside a sandbox, in bytes.
pub const MAX_PATH: usize = 1024;

/// The bytes of output files a job keeps per vertex when its profile does not say.
pub const DEFAULT_OUTPUT_BYTES: u64 = 64 << 20;

/// The most bytes of output files a job may keep per vertex.
pub const MAX_OUTPUT_BYTES: u64 = 4 << 30;

/// The bytes of input files a job may take when its profile does not say.
pub const DEFAULT_INPUT_BYTES: u64 = 1 << 30;

/// The most bytes of input files a job may take.
pub const MAX_INPUT_BYTES: u64 = 64 << 30;

/// A path that may not be used inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Nothing at all.
    #[error("an empty path")]
    Empty,
    /// Over [`MAX_PATH`] bytes.
    #[error("a path of {0} bytes (at most {MAX_PATH})")]
    TooLong(usize),
    /// Starts with `/`.
    #[error("'{0}' is absolute: paths are relative to the sandbox")]
    Absolute(String),
    /// Has a `..` component.
    #[error("'{0}' climbs out of the sandbox ('..')")]
    Climbs(String),
    /// An empty or `.` component, a NUL or a backslash.
    #[error("'{0}' is not a plain path (empty or '.' components, NUL or '\\')")]
    Malformed(String),
}

/// Checks a path inside a sandbox (`data/table.csv`); a trailing `/` is allowed (a directory).
///
/// # Errors
/// The first rule it breaks.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong(path.len()));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.to_owned()));
    }
    if path.contains(['\0', '\\']) {
        return Err(PathError::Malformed(path.to_owned()));
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    for c in trimmed.split('/') {
        match c {
            ".." => return Err(PathError::Climbs(path.to_owned())),
            "" | "." => return Err(PathError::Malformed(path.to_owned())),
            _ => {}
        }
    }
    Ok(())
}

/// The output patterns of a job, compiled: globs over paths inside a sandbox (`out/*.txt`;
/// `*` stays within one component, `**` crosses them; `out/` takes everything under `out`).
#[derive(Debug, Clone)]
pub struct Patterns {
    set: GlobSet,
}

impl Patterns {
    /// Compiles patterns.
    ///
    /// # Errors
    /// A pattern that breaks the rules of [`check_path`] or is not a glob, naming it.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Patterns, String> {
        if patterns.len() > MAX_FILES {
            return Err(format!(
                "{} output patterns (at most {MAX_FILES})",
                patterns.len()
            ));
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            let p = p.as_ref();
            check_path(p).map_err(|e| format!("output pattern {e}"))?;
            let full = if p.ends_with('/') {
                format!("{p}**")
            } else {
                p.to_owned()
            };
            let glob = GlobBuilder::new(&full)
                .literal_separator(true)
                .backslash_escape(false)
                .build()
                .map_err(|e| format!("output pattern '{p}': {}", e.kind()))?;
            b.add(glob);
        }
        let set = b.build().map_err(|e| format!("output patterns: {e}"))?;
        Ok(Patterns { set })
    }

    /// Whether a path inside a sandbox is an output.
    pub fn matches(&self, path: &str) -> bool {
        self.set.is_match(path)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// An output file found in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its path inside the sandbox.
    pub path: String,
    /// Where it is.
    pub abs: PathBuf,
    /// Its size.
    pub size: u64,
}

/// What a search for outputs found: the files that fit in the bound (by path order), and
/// what did not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outputs {
    /// The files kept.
    pub files: Vec<Found>,
    /// Bytes of every matching file, kept or not.
    pub bytes: u64,
    /// Matching files left out because they went over the bound.
    pub left_out: Vec<String>,
}

/// Finds the regular files under `sandbox` whose paths match `patterns`, in path order, and
/// keeps those that fit in `bound` bytes together. Symbolic links and anything else that is
/// not a regular file are skipped (never followed).
///
/// # Errors
/// The sandbox cannot be read.
pub fn find_outputs(sandbox: &Path, patterns: &Patterns, bound: u64) -> io::Result<Outputs> {
    let mut out = Outputs::default();
    if patterns.is_empty() {
        return Ok(out);
    }
    let mut kept = 0u64;
    let walk = walkdir::WalkDir::new(sandbox)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1);
    for entry in walk {
        let entry = entry.map_err(io::Error::other)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(sandbox) else {
            continue;
        };
        let Some(rel) = rel.to_str().map(str::to_owned) else {
            continue; // not UTF-8: no pattern names it
        };
        if check_path(&rel).is_err() || !patterns.matches(&rel) {
            continue;
        }
        let size = entry.metadata().map_err(io::Error::other)?.len();
        out.bytes = out.bytes.saturating_add(size);
        if kept.saturating_add(size) > bound || out.files.len() >= MAX_FILES {
            out.left_out.push(rel);
            continue;
        }
        kept += size;
        out.files.push(Found {
            path: rel,
            abs: entry.into_path(),
            size,
        });
    }
    Ok(out)
}

/// The directory a vertex's output files go in when they are brought back (`DIR/VERTEX/…`):
/// its name, with `/`, `\` and NUL replaced and `.`/`..` prefixed, so that it is always one
/// component.
pub fn vertex_dir(vertex: &str) -> String {
    let name: String = vertex
        .chars()
        .map(|c| {
            if matches!(c, '/' | '\\' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    match name.as_str() {
        "" | "." | ".." => format!("_{name}"),
        _ => name,
    }
}

/// Lays input files out in a sandbox (made if missing): each `(path, source)` is copied to
/// `sandbox/path`, its directories made. A copy, not a link: a vertex that writes to an input
/// changes its own copy only.
///
/// # Errors
/// A path that breaks the rules of [`check_path`], or one that cannot be written.
pub fn lay_out(sandbox: &Path, inputs: &[(String, PathBuf)]) -> io::Result<()> {
    std::fs::create_dir_all(sandbox)?;
    for (path, source) in inputs {
        check_path(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let to = sandbox.join(path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(source, &to).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_sandbox_are_refused() {
        for good in ["a", "data/", "data/x.csv", "a/b/c.txt", "..a", "a..b/c"] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
        assert_eq!(check_path(""), Err(PathError::Empty));
        assert!(matches!(
            check_path("/etc/passwd"),
            Err(PathError::Absolute(_))
        ));
        for climbs in ["..", "../x", "a/../../x", "a/.."] {
            assert!(
                matches!(check_path(climbs), Err(PathError::Climbs(_))),
                "{climbs}"
            );
        }
        for bad in ["a//b", "./a", "a/./b", "a\\b", "a\0b", "/"] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            check_path(&"a".repeat(MAX_PATH + 1)),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn outputs_are_found_by_pattern_within_their_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = dir.path();
        std::fs::create_dir_all(s.join("out/deep")).expect("mkdir");
        std::fs::write(s.join("out/a.txt"), b"aaaa").expect("write");
        std::fs::write(s.join("out/b.txt"), b"bbbbbb").expect("write");
        std::fs::write(s.join("out/c.bin"), b"c").expect("write");
        std::fs::write(s.join("out/deep/d.txt"), b"dd").expect("write");
        std::fs::write(s.join("notes.txt"), b"n").expect("write");
        std::os::unix::fs::symlink("/etc/hostname", s.join("out/link.txt")).expect("symlink");
        let p = Patterns::new(&["out/*.txt"]).expect("valid");
        let found = find_outputs(s, &p, 1 << 20).expect("found");
        let names: Vec<&str> = found.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            names,
            ["out/a.txt", "out/b.txt"],
            "* stays in one directory; no links"
        );
        assert_eq!(found.bytes, 10);
        let all = Patterns::new(&["out/", "notes.txt"]).expect("valid");
        let found = find_outputs(s, &all, 1 << 20).expect("found");
        let names: Vec<&str> = found.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "notes.txt",
                "out/a.txt",
                "out/b.txt",
                "out/c.bin",
                "out/deep/d.txt"
            ]
        );
        // A bound of 7 bytes keeps what fits, in path order, and says what did not.
        let found = find_outputs(s, &all, 7).expect("found");
        let names: Vec<&str> = found.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["notes.txt", "out/a.txt", "out/c.bin"]);
        assert_eq!(found.left_out, ["out/b.txt", "out/deep/d.txt"]);
        assert_eq!(found.bytes, 14);
        for bad in ["../x", "/abs/*", "a//b", "out/[z-a]"] {
            assert!(Patterns::new(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_vertex_s_directory_is_always_one_component() {
        assert_eq!(vertex_dir("sum"), "sum");
        assert_eq!(vertex_dir("../etc"), ".._etc");
        assert_eq!(vertex_dir(".."), "_..");
        assert_eq!(vertex_dir(""), "_");
        assert_eq!(vertex_dir("a\\b\0c"), "a_b_c");
    }

    #[test]
    fn inputs_are_copied_into_the_sandbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.txt");
        std::fs::write(&src, b"hello").expect("write");
        let sandbox = dir.path().join("box");
        lay_out(
            &sandbox,
            &[
                ("data/in.txt".into(), src.clone()),
                ("top.txt".into(), src.clone()),
            ],
        )
        .expect("laid out");
        assert_eq!(
            std::fs::read(sandbox.join("data/in.txt")).expect("read"),
            b"hello"
        );
        std::fs::write(sandbox.join("top.txt"), b"changed").expect("write");
        assert_eq!(
            std::fs::read(&src).expect("read"),
            b"hello",
            "a copy, not a link"
        );
        let e = lay_out(&sandbox, &[("../escape".into(), src)]).expect_err("climbs");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(!dir.path().join("escape").exists());
    }
}
