//! `mvm run`: runs a whole job on this node.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use mvm_component::profile::Profile;
use mvm_component::runtime::{AllowAll, JobSpec, Runtime, RuntimeConfig};
use mvm_component::topology::{Options, Topology};
use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use serde::Serialize;

use crate::exit::{Failure, REFUSED};
use crate::{Output, OutputArg};

/// Arguments of `mvm run`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The job profile (TOML).
    profile: PathBuf,
    /// Where compiled modules are cached (default: $XDG_CACHE_HOME/mvm or ~/.cache/mvm).
    #[arg(long, env = "MVM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Where the job's output files go (its profile's `[files] outputs`), each at
    /// DIR/VERTEX/PATH (default: ./NAME, the job's name).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArg,
}

#[derive(Serialize)]
struct VertexOut {
    vertex: String,
    stdout: String,
}

#[derive(Serialize)]
struct RunOut {
    job: String,
    wall_secs: f64,
    vertices: Vec<VertexOut>,
    queues: Vec<mvm_queue::Stats>,
}

/// Makes a sandbox under `root` for every vertex of `topology` and lays the inputs of `f` out
/// in each (from where `local` says they are).
fn lay_out(
    root: &std::path::Path,
    topology: &Topology,
    f: &mvm_superpeer::proto::FileSpec,
    local: &mvm_superpeer::client::LocalFiles,
) -> Result<std::collections::BTreeMap<String, PathBuf>, Failure> {
    let inputs: Vec<(String, PathBuf)> = f
        .inputs
        .iter()
        .filter_map(|i| local.get(&i.hash).map(|(p, _)| (i.path.clone(), p.clone())))
        .collect();
    if inputs.len() != f.inputs.len() {
        return Err(Failure::input(anyhow::anyhow!(
            "inputs named by hash only are held by a lab, not here: use mvm submit"
        )));
    }
    let mut sandboxes = std::collections::BTreeMap::new();
    for (i, v) in topology.vertices.iter().enumerate() {
        let dir = root.join(i.to_string());
        mvm_component::files::lay_out(&dir, &inputs)
            .map_err(|e| Failure::failed(anyhow::anyhow!("vertex '{}': {e}", v.name)))?;
        sandboxes.insert(v.name.clone(), dir);
    }
    Ok(sandboxes)
}

/// Copies the output files each vertex left in its sandbox to `dir/VERTEX/PATH`; what was
/// copied. Outputs over their bound are left out, saying so.
fn take_outputs(
    sandboxes: &std::collections::BTreeMap<String, PathBuf>,
    f: &mvm_superpeer::proto::FileSpec,
    dir: &std::path::Path,
) -> Result<Vec<PathBuf>, Failure> {
    let patterns = mvm_component::files::Patterns::new(&f.outputs)
        .map_err(|e| Failure::input(anyhow::anyhow!(e)))?;
    let mut kept = Vec::new();
    for (vertex, sandbox) in sandboxes {
        let found = mvm_component::files::find_outputs(sandbox, &patterns, f.output_bytes)
            .map_err(Failure::failed)?;
        if !found.left_out.is_empty() {
            eprintln!(
                "vertex '{vertex}': {} bytes of output files, over the bound of {}: left out {}",
                found.bytes,
                f.output_bytes,
                found.left_out.join(", ")
            );
        }
        for file in found.files {
            let to = dir
                .join(mvm_component::files::vertex_dir(vertex))
                .join(&file.path);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(Failure::failed)?;
            }
            std::fs::copy(&file.abs, &to)
                .map_err(|e| Failure::failed(anyhow::anyhow!("{}: {e}", to.display())))?;
            kept.push(to);
        }
    }
    Ok(kept)
}

/// The default module cache directory.
pub(crate) fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("mvm").join("modules"))
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let file = args.profile.display().to_string();
    let (profile, src) = Profile::load(&args.profile).map_err(Failure::input)?;
    let limits = profile.limits(&file, &src).map_err(Failure::input)?;
    let codecs = Registry::new();
    let queue_defaults = profile
        .queue_defaults(&file, &src, &codecs)
        .map_err(Failure::input)?;
    let topo_path = Profile::resolve(&args.profile, &profile.topology);
    let options = Options {
        codecs: &codecs,
        queue_defaults,
    };
    let topology = Topology::load(&topo_path, &options).map_err(Failure::input)?;
    for v in &topology.vertices {
        if !profile.components.contains_key(&v.component) {
            return Err(Failure::input(anyhow::anyhow!(
                "{file}: component '{}' of vertex '{}' ({}:{}) has no module in [components]",
                v.component,
                v.name,
                topo_path.display(),
                v.line
            )));
        }
    }
    let cache_dir = args.cache_dir.or_else(default_cache_dir);
    let runtime = Runtime::new(&RuntimeConfig {
        cache_dir,
        ..RuntimeConfig::default()
    })
    .map_err(Failure::failed)?;
    let mut modules = HashMap::new();
    for (component, path) in &profile.components {
        let path = Profile::resolve(&args.profile, path);
        let (module, _, _) = runtime.cache().load_file(&path).map_err(Failure::input)?;
        modules.insert(component.clone(), module);
    }
    // The prolog: each vertex's sandbox, with the inputs laid out in it.
    let files =
        mvm_superpeer::client::read_profile(&args.profile).map_err(crate::cmd::job::wire)?;
    let scratch = tempfile::tempdir().map_err(Failure::failed)?;
    let sandboxes = match &files.submission.files {
        None => Default::default(),
        Some(f) => lay_out(scratch.path(), &topology, f, &files.inputs)?,
    };
    let spec = JobSpec {
        id: profile.name.clone(),
        topology: &topology,
        modules,
        params: profile.parameter_strings(),
        limits,
        owner: None,
        sandboxes,
    };
    let queues = Controller::new(QueueLimits::default(), Arc::new(codecs.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    let report = rt.block_on(runtime.run(&spec, &queues, &AllowAll));
    // The epilog, also when the job failed: its output files copied out.
    if let Some(f) = &files.submission.files {
        let dir = args
            .output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(&profile.name));
        let kept = take_outputs(&spec.sandboxes, f, &dir)?;
        if !kept.is_empty() {
            eprintln!("{} output files in {}", kept.len(), dir.display());
        }
    }
    let report = report.map_err(|e| {
        let denied = e.denied();
        let f = Failure::failed(anyhow::anyhow!("job '{}': {e}", profile.name));
        if denied {
            Failure { code: REFUSED, ..f }
        } else {
            f
        }
    })?;
    let out = RunOut {
        job: profile.name.clone(),
        wall_secs: report.wall.as_secs_f64(),
        vertices: report
            .vertices
            .iter()
            .map(|v| VertexOut {
                vertex: v.vertex.clone(),
                stdout: String::from_utf8_lossy(&v.stdout).into_owned(),
            })
            .collect(),
        queues: report.queues,
    };
    match args.out.output {
        Output::Json => crate::cmd::print(&out, Output::Json, |_| String::new())?,
        Output::Text => {
            for v in &out.vertices {
                print!("{}", v.stdout);
            }
            let items: u64 = out.queues.iter().map(|q| q.items_in).sum();
            let bytes: u64 = out.queues.iter().map(|q| q.bytes_in).sum();
            eprintln!(
                "job '{}': {} vertices, {} queues, {items} items / {bytes} bytes moved, {:.3} s",
                out.job,
                out.vertices.len(),
                out.queues.len(),
                out.wall_secs
            );
        }
    }
    Ok(())
}
