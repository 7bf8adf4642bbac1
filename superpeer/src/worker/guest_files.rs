//! A job's files in a worker that does not share its node's file system (a Xen guest's,
//! reached through its agent): the node sends the inputs with the job, the worker lays them
//! out in sandboxes of its own (a directory per local vertex, preopened as the vertex's `.`),
//! and when the part ends, well or not, gives back the files matching the output patterns,
//! for the node to put in its own sandboxes and take as it does any part's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use mvm_component::files::{Patterns, check_path, find_outputs};

use super::{GuestFiles, GuestOutput};

/// The sandboxes of a worker's part, removed with it.
pub(super) struct GuestSandboxes {
    _root: tempfile::TempDir,
    /// Each local vertex's directory.
    pub(super) dirs: BTreeMap<String, PathBuf>,
    outputs: Patterns,
    bound: u64,
}

impl GuestSandboxes {
    /// Makes a sandbox for each of `vertices` and lays `files`' inputs out in each.
    ///
    /// # Errors
    /// A path that may not be used in a sandbox, bad output patterns, or a file that cannot
    /// be written.
    pub(super) fn lay_out(files: &GuestFiles, vertices: &[String]) -> Result<Self, String> {
        let outputs = Patterns::new(&files.outputs)?;
        let root = tempfile::Builder::new()
            .prefix("mvm-sandboxes-")
            .tempdir()
            .map_err(|e| format!("making the sandboxes: {e}"))?;
        let mut dirs = BTreeMap::new();
        for (i, v) in vertices.iter().enumerate() {
            let dir = root.path().join(crate::files::dir_name(i, v));
            for (path, bytes) in &files.inputs {
                check_path(path).map_err(|e| format!("input file {e}"))?;
                let to = dir.join(path);
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("input file '{path}': {e}"))?;
                }
                std::fs::write(&to, bytes).map_err(|e| format!("input file '{path}': {e}"))?;
            }
            std::fs::create_dir_all(&dir).map_err(|e| format!("vertex '{v}': {e}"))?;
            dirs.insert(v.clone(), dir);
        }
        Ok(GuestSandboxes {
            _root: root,
            dirs,
            outputs,
            bound: files.output_bytes,
        })
    }

    /// The files matching the output patterns in each sandbox, in path order: their bytes
    /// while the vertex's bound holds, then their size only; and what could not be read.
    pub(super) fn outputs(&self) -> (Vec<GuestOutput>, Vec<String>) {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for (vertex, dir) in &self.dirs {
            let found = match find_outputs(dir, &self.outputs, self.bound) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(format!("vertex '{vertex}': reading its sandbox: {e}"));
                    continue;
                }
            };
            for f in found.files {
                match std::fs::read(&f.abs) {
                    Ok(bytes) => out.push(GuestOutput {
                        vertex: vertex.clone(),
                        path: f.path,
                        size: bytes.len() as u64,
                        bytes: Some(bytes.into()),
                    }),
                    Err(e) => problems.push(format!("vertex '{vertex}': {}: {e}", f.path)),
                }
            }
            for path in found.left_out {
                let size = std::fs::metadata(dir.join(&path)).map_or(0, |m| m.len());
                out.push(GuestOutput {
                    vertex: vertex.clone(),
                    path,
                    size,
                    bytes: None,
                });
            }
        }
        (out, problems)
    }
}

/// Puts what a worker in a guest gave back into the node's own sandboxes (`dirs`, by vertex):
/// each file kept with its bytes, each over its vertex's bound as a file of its size with no
/// bytes written (sparse), so that taking the outputs there finds the same files, and leaves
/// out the same ones. Blocking.
///
/// # Errors
/// A vertex not in `dirs`, a path that may not be used in a sandbox, or a file that cannot be
/// written.
pub(crate) fn mirror(
    dirs: &BTreeMap<String, PathBuf>,
    files: &[GuestOutput],
) -> Result<(), String> {
    for f in files {
        let Some(dir) = dirs.get(&f.vertex) else {
            return Err(format!("a file of vertex '{}', not of this part", f.vertex));
        };
        check_path(&f.path).map_err(|e| format!("output file {e}"))?;
        let to = dir.join(&f.path);
        let named = |e: std::io::Error| format!("output file '{}': {e}", f.path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(named)?;
        }
        match &f.bytes {
            Some(b) => std::fs::write(&to, b).map_err(named)?,
            None => std::fs::File::create(&to)
                .and_then(|file| file.set_len(f.size))
                .map_err(named)?,
        }
    }
    Ok(())
}
