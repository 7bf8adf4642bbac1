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
    let topo_path = Profile::resolve(&args.profile, &profile.topology);
    let options = Options {
        codecs: &codecs,
        queue_defaults: profile.queue.clone(),
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
    let spec = JobSpec {
        id: profile.name.clone(),
        topology: &topology,
        modules,
        params: profile.parameter_strings(),
        limits,
        owner: None,
    };
    let queues = Controller::new(QueueLimits::default(), Arc::new(codecs.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    let report = rt
        .block_on(runtime.run(&spec, &queues, &AllowAll))
        .map_err(|e| {
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
