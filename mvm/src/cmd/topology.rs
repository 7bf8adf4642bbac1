//! `mvm topology`: check, generate and draw topology graph files.

use std::path::PathBuf;
use std::process::Command;

use clap::Subcommand;
use mvm_component::topology::{Options, Topology, generate};
use mvm_queue::codec::Registry;
use mvm_queue::queue::Config;
use serde::Serialize;

use crate::exit::Failure;
use crate::{Output, OutputArg};

/// Arguments of `mvm topology`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Check topology files: exit 0, or 2 with a `FILE:LINE: message` line per problem.
    Check {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Write a topology of a common shape as DOT on standard output.
    Gen {
        /// ring | pipeline | star | mesh | torus | hypercube | tree | butterfly
        shape: String,
        /// Vertices (ring, pipeline), leaves (star), ROWSxCOLS or N (mesh, torus), dimension
        /// (hypercube), vertices (tree), points, a power of two (butterfly).
        size: String,
    },
    /// Draw a topology with Graphviz `dot`, ports shown at the ends of the edges.
    Render {
        /// The topology file.
        file: PathBuf,
        /// The picture to write; its extension (svg, png, pdf) picks the format.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
}

#[derive(Serialize)]
struct Checked {
    file: String,
    ok: bool,
    vertices: usize,
    channels: usize,
    problems: Vec<String>,
}

fn options(reg: &Registry) -> Options<'_> {
    Options {
        codecs: reg,
        queue_defaults: Config::default(),
    }
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let reg = Registry::new();
    match args.which {
        Which::Check { files, out } => {
            let mut results = Vec::new();
            for f in &files {
                let r = match Topology::load(f, &options(&reg)) {
                    Ok(t) => Checked {
                        file: f.display().to_string(),
                        ok: true,
                        vertices: t.vertices.len(),
                        channels: t.channels.len(),
                        problems: Vec::new(),
                    },
                    Err(e) => Checked {
                        file: f.display().to_string(),
                        ok: false,
                        vertices: 0,
                        channels: 0,
                        problems: e.to_string().lines().map(str::to_owned).collect(),
                    },
                };
                results.push(r);
            }
            let failed = results.iter().filter(|r| !r.ok).count();
            match out.output {
                Output::Json => crate::cmd::print(&results, Output::Json, |_| String::new())?,
                Output::Text => {
                    for r in &results {
                        if r.ok {
                            println!(
                                "{}: ok ({} vertices, {} channels)",
                                r.file, r.vertices, r.channels
                            );
                        } else {
                            for p in &r.problems {
                                eprintln!("{p}");
                            }
                        }
                    }
                }
            }
            if failed > 0 {
                return Err(Failure::quiet(crate::exit::USAGE));
            }
            Ok(())
        }
        Which::Gen { shape, size } => {
            let dot = generate::generate(&shape, &size)
                .map_err(|e| Failure::input(anyhow::anyhow!("topology gen: {e}")))?;
            print!("{dot}");
            Ok(())
        }
        Which::Render { file, out } => {
            let t = Topology::load(&file, &options(&reg)).map_err(Failure::input)?;
            let format = out
                .extension()
                .and_then(|e| e.to_str())
                .filter(|e| ["svg", "png", "pdf"].contains(e))
                .ok_or_else(|| {
                    Failure::input(anyhow::anyhow!(
                        "topology render: {}: the output must end in .svg, .png or .pdf",
                        out.display()
                    ))
                })?;
            let mut child = Command::new("dot")
                .arg(format!("-T{format}"))
                .arg("-o")
                .arg(&out)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| {
                    Failure::failed(anyhow::anyhow!(
                        "topology render: cannot run Graphviz 'dot' ({e}); scripts/setup installs it"
                    ))
                })?;
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                stdin
                    .write_all(t.to_render_dot().as_bytes())
                    .map_err(Failure::failed)?;
            }
            let status = child.wait().map_err(Failure::failed)?;
            if !status.success() {
                return Err(Failure::failed(anyhow::anyhow!(
                    "topology render: 'dot' failed ({status})"
                )));
            }
            println!("{}", out.display());
            Ok(())
        }
    }
}
