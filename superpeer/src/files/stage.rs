//! A node's side of a job's files: the prolog (inputs fetched by hash, only those the node
//! lacks, and laid out in a sandbox per vertex) and the epilog (outputs found by pattern in
//! each sandbox, kept, and uploaded to the leader).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use libp2p::PeerId;

use super::FileStore;
use crate::net::Net;
use crate::proto::{Failure, FailureKind, FileSpec, JobId, Member, OutputFile};

/// A part's sandboxes: a directory per local vertex under one root, removed (with whatever the
/// vertices left) when the last holder lets go.
#[derive(Debug)]
pub(crate) struct Sandbox {
    root: PathBuf,
    /// Each local vertex's directory.
    pub(crate) vertices: BTreeMap<String, PathBuf>,
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
fn dir_name(index: usize, vertex: &str) -> String {
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
/// group's leader), then lays them out in a sandbox for each of `vertices` under `root`. Nothing is
/// left under `root` when it fails.
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
) -> Result<Sandbox, Failure> {
    let sandbox = Sandbox {
        vertices: vertices
            .iter()
            .enumerate()
            .map(|(i, v)| (v.clone(), root.join(dir_name(i, v))))
            .collect(),
        root,
    };
    let lacking: BTreeMap<_, _> = spec
        .inputs
        .iter()
        .filter(|i| store.size(&i.hash) != Some(i.size))
        .map(|i| (i.hash, (i.path.clone(), i.size)))
        .collect();
    super::at_once(lacking, |(hash, (path, size))| {
        let (net, store, job) = (net.clone(), store.clone(), job.clone());
        let sources = sources.to_vec();
        async move {
            let to = store.path(&hash);
            if super::get_from_holders(&net, &sources, &job, hash, size, &to).await {
                return Ok(size);
            }
            super::get(&net, from, &[], &job, hash, &to)
                .await
                .map_err(|f| Failure::new(f.kind, format!("input file '{path}': {}", f.message)))
        }
    })
    .await?;
    // What the node now holds as inputs it may serve to the other nodes of its domain.
    for i in &spec.inputs {
        store.mark_input(i.hash);
    }
    let inputs: Vec<(String, PathBuf)> = spec
        .inputs
        .iter()
        .map(|i| (i.path.clone(), store.path(&i.hash)))
        .collect();
    let dirs: Vec<PathBuf> = sandbox.vertices.values().cloned().collect();
    let root = sandbox.root.clone();
    let laid = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&root)?;
        for d in &dirs {
            mvm_component::files::lay_out(d, &inputs)?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    match laid {
        Ok(Ok(())) => Ok(sandbox),
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
