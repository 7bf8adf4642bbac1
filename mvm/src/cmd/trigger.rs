//! `mvm trigger`: trigger files (`triggers/*.toml`) for a super-peer's `--triggers DIR`.

use std::path::PathBuf;

use clap::Subcommand;
use mvm_superpeer::trigger::{self, Action, Trigger};
use serde::Serialize;

use crate::exit::Failure;
use crate::{Output, OutputArg};

/// Arguments of `mvm trigger`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Check trigger files (or every `*.toml` of a directory): exit 0, printing what each
    /// does, or 2 with a `FILE:LINE: message` line per file with a problem.
    Check {
        /// Trigger files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// One trigger as checked.
#[derive(Serialize)]
struct Checked {
    file: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// What it does, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    does: Option<String>,
    problems: Vec<String>,
}

/// A trigger in words: `when pending_vertices > 0 for 2s: make 1 guest of base (8 slots);
/// cool-down 30s`.
fn describe(t: &Trigger) -> String {
    let action = match &t.action {
        Action::CreateGuests {
            template,
            count,
            slots,
        } => format!(
            "make {count} guest(s) of {} ({}, {slots} slots each)",
            template.name, template.shape.image
        ),
        Action::DestroyIdleGuests { count } => format!("tear down up to {count} idle guest(s)"),
        Action::Drain(n) => format!("drain {n}"),
        Action::Undrain(n) => format!("undrain {n}"),
        Action::Command(argv) => format!("run {}", argv.join(" ")),
    };
    format!(
        "after its condition holds for {:?}: {action}; cool-down {:?}",
        t.hold, t.cooldown
    )
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let Which::Check { paths, out } = args.which;
    let mut results = Vec::new();
    for p in &paths {
        let loaded = if p.is_dir() {
            trigger::load_dir(p)
        } else {
            trigger::load(p).map(|t| vec![t])
        };
        match loaded {
            Ok(ts) => results.extend(ts.iter().map(|t| Checked {
                file: t.file.display().to_string(),
                ok: true,
                name: Some(t.name.clone()),
                does: Some(describe(t)),
                problems: Vec::new(),
            })),
            Err(e) => results.push(Checked {
                file: e.file.clone(),
                ok: false,
                name: None,
                does: None,
                problems: vec![e.to_string()],
            }),
        }
    }
    match out.output {
        Output::Json => crate::cmd::print(&results, Output::Json, |_| String::new())?,
        Output::Text => {
            for r in &results {
                match (&r.name, &r.does) {
                    (Some(n), Some(d)) => println!("{}: ok ({n}: {d})", r.file),
                    _ => r.problems.iter().for_each(|p| eprintln!("{p}")),
                }
            }
        }
    }
    if results.iter().any(|r| !r.ok) {
        return Err(Failure::quiet(crate::exit::USAGE));
    }
    Ok(())
}
