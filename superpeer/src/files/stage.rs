//! A node's side of a job's files: the prolog (inputs fetched by hash, only those the node
//! lacks, and laid out in a sandbox per vertex) and the epilog (outputs found by pattern in
//! each sandbox, kept, and uploaded to the leader).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use libp2p::PeerId;

use super::FileStore;
use crate::net::Net;
use crate::proto::{Failure, FailureKind, FileSpec, Hash, JobId, Member, OutputFile};

/// A part's sandboxes: a directory per local vertex under one root, removed (with whatever the
/// vertices left) when the last holder lets go.
#[derive(Debug)]
pub(crate) struct Sandbox {
    root: PathBuf,
    /// Each local vertex's directory.
    pub(crate) vertices: BTreeMap<String, PathBuf>,
    /// The hash of each file laid out or saved, with its size and time of change then: a
    /// checkpoint hashes again only the files that changed since.
    known: parking_lot::Mutex<HashMap<PathBuf, (u64, SystemTime, Hash)>>,
    /// The copies a checkpoint keeps of the files (those of the last checkpoint), under the
    /// root beside the vertices' directories (none of which sees it): the part's own, gone
    /// with it.
    pub(crate) saved: FileStore,
}

/// The directory of [`Sandbox::saved`] under the root (no vertex directory is named so: those
/// start with their index).
const SAVED: &str = ".saved";

/// The size and time of last change of the file at `path`.
fn stamp(path: &std::path::Path) -> std::io::Result<(u64, SystemTime)> {
    let m = std::fs::metadata(path)?;
    Ok((m.len(), m.modified()?))
}

impl Sandbox {
    /// Every regular file in the vertices' sandboxes now (symbolic links are left out), kept
    /// in `store`: what a checkpoint restores. At most `bound` bytes per vertex. Blocking;
    /// the part is paused meanwhile.
    ///
    /// # Errors
    /// A sandbox over the bound, or a file that cannot be read or kept.
    pub(crate) fn save(&self, bound: u64) -> Result<Vec<OutputFile>, String> {
        let store = &self.saved;
        let all = mvm_component::files::Patterns::new(&["**"])?;
        let mut known = self.known.lock();
        let mut files = Vec::new();
        for (vertex, dir) in &self.vertices {
            let found = mvm_component::files::find_outputs(dir, &all, bound)
                .map_err(|e| format!("vertex '{vertex}': reading its sandbox: {e}"))?;
            if !found.left_out.is_empty() {
                return Err(format!(
                    "vertex '{vertex}': {} bytes in its sandbox, over the {bound} a \
                     checkpoint keeps (its inputs' bytes and its output bound)",
                    found.bytes
                ));
            }
            for f in found.files {
                let now =
                    stamp(&f.abs).map_err(|e| format!("vertex '{vertex}': {}: {e}", f.path))?;
                // Unchanged since it was laid out (an input, in the node's store) or saved.
                let hash = match known.get(&f.abs) {
                    Some((size, at, hash)) if (*size, *at) == now => *hash,
                    _ => {
                        let (hash, _) = store
                            .put_file(&f.abs)
                            .map_err(|e| format!("vertex '{vertex}': {}: {e}", f.path))?;
                        known.insert(f.abs.clone(), (now.0, now.1, hash));
                        hash
                    }
                };
                files.push(OutputFile {
                    vertex: vertex.clone(),
                    path: f.path,
                    hash,
                    size: now.0,
                });
            }
        }
        // Only the last checkpoint's copies are kept.
        let kept: std::collections::HashSet<Hash> = files.iter().map(|f| f.hash).collect();
        for (hash, _) in store.list() {
            if !kept.contains(&hash) {
                store.remove(&hash);
            }
        }
        known.retain(|_, (_, _, h)| kept.contains(h));
        Ok(files)
    }
}

/// Sends `files` (each once, from where `path_of` says it is) to `to` (the group's leader).
///
/// # Errors
/// The first that cannot be sent.
pub(crate) async fn send_all(
    net: &Net,
    to: PeerId,
    files: &[OutputFile],
    path_of: impl Fn(&Hash) -> PathBuf,
) -> Result<(), Failure> {
    let mut sent = BTreeSet::new();
    for f in files {
        if sent.insert(f.hash) {
            super::put(net, to, &[], &path_of(&f.hash), f.hash, f.size)
                .await
                .map_err(|e| {
                    let m = format!("vertex '{}': {}: {}", f.vertex, f.path, e.message);
                    Failure::new(e.kind, m)
                })?;
        }
    }
    Ok(())
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let root = std::mem::take(&mut self.root);
        let remove = move || {
            if let Err(e) = std::fs::remove_dir_all(&root)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %root.display(), error = %e, "cannot remove a sandbox");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

/// A directory name for a vertex: its name with anything but letters, digits, `-`, `_` and
/// `.` replaced, after its index (so that two names never meet).
pub(crate) fn dir_name(index: usize, vertex: &str) -> String {
    let clean: String = vertex
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{index}-{clean}")
}

/// The prolog: fetches the inputs of `spec` that `store` lacks, each from the first of
/// `sources` (other nodes that may hold it) that sends it whole, or else from `from` (the
/// group's leader), then lays them out in a sandbox for each of `vertices` under `root`. A
/// part restored from a checkpoint gets instead the files its sandboxes held then
/// (`restored`), from the leader unless they are inputs. Nothing is left under `root` when it
/// fails.
///
/// # Errors
/// An input that cannot be fetched or does not match its hash, or a sandbox that cannot be
/// written.
#[allow(
    clippy::too_many_arguments,
    reason = "where the files come from, where they go, and for which vertices"
)]
pub(crate) async fn stage_in(
    net: &Net,
    from: PeerId,
    sources: &[Member],
    store: &Arc<FileStore>,
    root: PathBuf,
    job: &JobId,
    vertices: &[String],
    spec: &FileSpec,
    restored: Option<&[OutputFile]>,
) -> Result<Sandbox, Failure> {
    let saved = FileStore::open(&root.join(SAVED)).map_err(|e| {
        Failure::new(
            FailureKind::Failed,
            format!("making the sandboxes' directory: {e}"),
        )
    })?;
    let sandbox = Sandbox {
        vertices: vertices
            .iter()
            .enumerate()
            .map(|(i, v)| (v.clone(), root.join(dir_name(i, v))))
            .collect(),
        root,
        known: parking_lot::Mutex::default(),
        saved,
    };
    // What each vertex's sandbox gets: the inputs, or what it held at the checkpoint.
    let layout: Vec<(String, String, Hash, u64)> = match restored {
        None => vertices
            .iter()
            .flat_map(|v| {
                let inputs = spec.inputs.iter();
                inputs.map(|i| (v.clone(), i.path.clone(), i.hash, i.size))
            })
            .collect(),
        Some(files) => files
            .iter()
            .filter(|f| sandbox.vertices.contains_key(&f.vertex))
            .map(|f| (f.vertex.clone(), f.path.clone(), f.hash, f.size))
            .collect(),
    };
    let lacking: BTreeMap<_, _> = layout
        .iter()
        .filter(|(_, _, hash, size)| store.size(hash) != Some(*size))
        .map(|(_, path, hash, size)| (*hash, (path.clone(), *size)))
        .collect();
    super::at_once(lacking, |(hash, (path, size))| {
        let (net, store, job) = (net.clone(), store.clone(), job.clone());
        // Only inputs are held by other nodes.
        let input = spec.inputs.iter().any(|i| i.hash == hash);
        let sources = if input { sources.to_vec() } else { Vec::new() };
        async move {
            let to = store.path(&hash);
            if input && super::get_from_holders(&net, &sources, &job, hash, size, &to).await {
                return Ok(size);
            }
            super::get(&net, from, &[], &job, hash, &to)
                .await
                .map_err(|f| Failure::new(f.kind, format!("input file '{path}': {}", f.message)))
        }
    })
    .await?;
    // What the node now holds as inputs it may serve to the other nodes of its domain.
    for i in spec.inputs.iter().filter(|i| store.has(&i.hash)) {
        store.mark_input(i.hash);
    }
    let mut by_vertex: BTreeMap<PathBuf, Vec<(String, PathBuf, Hash)>> = sandbox
        .vertices
        .values()
        .map(|d| (d.clone(), Vec::new()))
        .collect();
    for (vertex, path, hash, _) in layout {
        if let Some(list) = sandbox
            .vertices
            .get(&vertex)
            .and_then(|d| by_vertex.get_mut(d))
        {
            list.push((path, store.path(&hash), hash));
        }
    }
    let root = sandbox.root.clone();
    let laid = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&root)?;
        let mut known = HashMap::new();
        for (dir, files) in by_vertex {
            let inputs: Vec<(String, PathBuf)> = files
                .iter()
                .map(|(p, from, _)| (p.clone(), from.clone()))
                .collect();
            mvm_component::files::lay_out(&dir, &inputs)?;
            for (path, _, hash) in files {
                let at = dir.join(&path);
                let (size, changed) = stamp(&at)?;
                known.insert(at, (size, changed, hash));
            }
        }
        Ok::<_, std::io::Error>(known)
    })
    .await;
    match laid {
        Ok(Ok(known)) => {
            *sandbox.known.lock() = known;
            Ok(sandbox)
        }
        Ok(Err(e)) => Err(Failure::new(
            FailureKind::Failed,
            format!("laying out the input files: {e}"),
        )),
        Err(e) => Err(Failure::new(
            FailureKind::Failed,
            format!("laying out: {e}"),
        )),
    }
}

/// The epilog: the files each vertex left in its sandbox that match the output patterns of
/// `spec`, within its bound, kept in `store` and uploaded to `to` (the group's leader). The
/// files, and what went wrong (outputs over their bound left out, a file that could not be
/// read or uploaded) for the part's report.
pub(crate) async fn take_outputs(
    net: &Net,
    to: PeerId,
    store: &Arc<FileStore>,
    sandbox: &Sandbox,
    spec: &FileSpec,
) -> (Vec<OutputFile>, Option<String>) {
    let patterns = match mvm_component::files::Patterns::new(&spec.outputs) {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return (Vec::new(), None),
        Err(e) => return (Vec::new(), Some(e)),
    };
    let (dirs, bound, keep) = (sandbox.vertices.clone(), spec.output_bytes, store.clone());
    let found = tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        let mut problems = Vec::new();
        for (vertex, dir) in &dirs {
            let outputs = match mvm_component::files::find_outputs(dir, &patterns, bound) {
                Ok(o) => o,
                Err(e) => {
                    problems.push(format!("vertex '{vertex}': reading its sandbox: {e}"));
                    continue;
                }
            };
            if !outputs.left_out.is_empty() {
                problems.push(format!(
                    "vertex '{vertex}': {} bytes of output files, over the bound of {bound}: \
                     left out {}",
                    outputs.bytes,
                    outputs.left_out.join(", ")
                ));
            }
            for f in outputs.files {
                match keep.put_file(&f.abs) {
                    Ok((hash, size)) => files.push(OutputFile {
                        vertex: vertex.clone(),
                        path: f.path,
                        hash,
                        size,
                    }),
                    Err(e) => problems.push(format!("vertex '{vertex}': {}: {e}", f.path)),
                }
            }
        }
        (files, problems)
    })
    .await;
    let (mut files, mut problems) = match found {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Some(format!("taking the output files: {e}"))),
    };
    let mut sent = BTreeSet::new();
    let mut failed = BTreeSet::new();
    for f in &files {
        if !sent.insert(f.hash) {
            continue;
        }
        if let Err(e) = super::put(net, to, &[], &store.path(&f.hash), f.hash, f.size).await {
            problems.push(format!("vertex '{}': {}: {}", f.vertex, f.path, e.message));
            failed.insert(f.hash);
        }
    }
    // Kept by the leader now (or lost): this node needs no copy, unless it is an input too.
    for h in sent
        .iter()
        .filter(|h| !spec.inputs.iter().any(|i| i.hash == **h))
    {
        store.remove(h);
    }
    files.retain(|f| !failed.contains(&f.hash));
    let problem = (!problems.is_empty()).then(|| problems.join("; "));
    (files, problem)
}
