//! `mvm env`: guest templates (`environments/*.toml`) and the warm pools made of them.

use std::path::PathBuf;

use clap::Subcommand;
use mvm_os::template::{self, Template};
use serde::Serialize;

use crate::exit::Failure;
use crate::{Output, OutputArg};

/// Arguments of `mvm env`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Check guest templates, and the templates they extend: exit 0 (printing what each
    /// resolves to), or 2 with a `FILE:LINE: message` line per file with a problem.
    Check {
        /// Template files, or pool files (`[[warm]]` tables) with `--pool`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The files are pool files (`mvm node --pool FILE`), checked with their templates.
        #[arg(long)]
        pool: bool,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// One template as checked.
#[derive(Serialize)]
struct Checked {
    file: String,
    ok: bool,
    /// What it resolves to.
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<Template>,
    /// Its shape's key (a node's warm guests of this key serve it).
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// Warm guests kept (pool files).
    #[serde(skip_serializing_if = "Option::is_none")]
    guests: Option<u32>,
    problems: Vec<String>,
}

impl Checked {
    fn ok(file: String, t: Template, guests: Option<u32>) -> Checked {
        Checked {
            file,
            ok: true,
            key: Some(t.key()),
            template: Some(t),
            guests,
            problems: Vec::new(),
        }
    }
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let Which::Check { files, pool, out } = args.which;
    let mut results = Vec::new();
    for f in &files {
        let file = f.display().to_string();
        let failed = |e: template::TemplateError| Checked {
            file: file.clone(),
            ok: false,
            template: None,
            key: None,
            guests: None,
            problems: vec![e.to_string()],
        };
        if pool {
            match template::load_pool(f) {
                Ok(pools) => results.extend(
                    pools
                        .into_iter()
                        .map(|p| Checked::ok(file.clone(), p.template, Some(p.guests))),
                ),
                Err(e) => results.push(failed(e)),
            }
        } else {
            results.push(match template::load(f) {
                Ok(t) => Checked::ok(file.clone(), t, None),
                Err(e) => failed(e),
            });
        }
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    match out.output {
        Output::Json => crate::cmd::print(&results, Output::Json, |_| String::new())?,
        Output::Text => {
            for r in &results {
                match &r.template {
                    Some(t) => println!("{}: ok ({})", r.file, describe(t, r.guests)),
                    None => r.problems.iter().for_each(|p| eprintln!("{p}")),
                }
            }
        }
    }
    if failed > 0 {
        return Err(Failure::quiet(crate::exit::USAGE));
    }
    Ok(())
}

/// A template in a few words: `compute: sci:1.0, 2 vCPUs, 512 MiB, key 1a2b…`.
fn describe(t: &Template, guests: Option<u32>) -> String {
    let s = &t.shape;
    let mut words = vec![
        format!("{}: {}", t.name, s.image),
        format!("{} vCPU{}", s.vcpus, if s.vcpus == 1 { "" } else { "s" }),
        format!("{} MiB", s.memory_mib),
    ];
    if let Some(d) = s.disk_mib {
        words.push(format!("disk {d} MiB"));
    }
    if let Some(w) = s.swap_mib {
        words.push(format!("swap {w} MiB"));
    }
    if let Some(w) = s.weight {
        words.push(format!("weight {w}"));
    }
    if let Some(c) = s.cap {
        words.push(format!("cap {c}%"));
    }
    if !s.network.is_empty() {
        words.push(format!("{} network interface(s)", s.network.len()));
    }
    if t.files.len() > 1 {
        let parents: Vec<String> = t.files[1..]
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        words.push(format!("extends {}", parents.join(" <- ")));
    }
    if let Some(g) = guests {
        words.push(format!("{g} kept warm"));
    }
    words.push(format!("key {}", t.key()));
    words.join(", ")
}
