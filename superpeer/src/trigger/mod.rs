//! Triggers (the VM manager's): a condition over the group's metrics that must hold for a
//! while, an action, and a cool-down. A super-peer started with `--triggers DIR` reads
//! `DIR/*.toml` and asks every trigger at each of its ticks; the [`Triggers`] machine says
//! which fire (no clock of its own), the broker carries out their actions.
//!
//! ```toml
//! # triggers/grow.toml
//! when = "pending_vertices > 64 and idle_guests = 0"
//! for = "10s"          # how long the condition must hold (default: at once)
//! cooldown = "60s"     # after it fires, how long before it may fire again (default 60 s)
//! [action]
//! create-guests = { template = "../environments/base.toml", count = 1, slots = 8 }
//! ```
//!
//! Actions: `create-guests` (guests of a template made on nodes with an OS layer, each running
//! a node of the group that registers with the broker and takes work), `destroy-idle-guests =
//! { count = N }` (guests made so that hold no vertex, torn down), `drain = "NODE"`,
//! `undrain = "NODE"`, and `command = ["PROGRAM", "ARG", …]` (run on the super-peer's host
//! with the metrics as `MVM_*` environment variables).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Spanned;

use mvm_component::profile::line_of;

use crate::proto::TemplateSpec;

mod condition;

pub use condition::{Condition, GROUP_METRICS, Metric, NODE_METRICS, Values};

/// A trigger file that does not load: the file, the line, and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct TriggerError {
    /// The file.
    pub file: String,
    /// The line (1-based).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// What a trigger does when it fires.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Makes `count` guests of `template` on the nodes with an OS layer that offer its image
    /// (the roomiest first), each running a node of the group with `slots` vertex slots.
    CreateGuests {
        /// The guest template.
        template: TemplateSpec,
        /// How many guests.
        count: u32,
        /// The vertex slots of each guest's node.
        slots: u32,
    },
    /// Tears down up to `count` guests made by triggers whose nodes hold no vertex.
    DestroyIdleGuests {
        /// How many at most.
        count: u32,
    },
    /// Drains the node of this name.
    Drain(String),
    /// Undrains it.
    Undrain(String),
    /// Runs this program with these arguments on the super-peer's host.
    Command(Vec<String>),
}

/// One trigger, as its file gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// Its name: the file's stem.
    pub name: String,
    /// Its file.
    pub file: PathBuf,
    /// The condition.
    pub when: Condition,
    /// How long the condition must hold before it fires.
    pub hold: Duration,
    /// How long after it fires before it may fire again.
    pub cooldown: Duration,
    /// What it does.
    pub action: Action,
}

/// The default cool-down.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);

/// The most guests one action makes or tears down.
pub const MAX_COUNT: u32 = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    when: Spanned<String>,
    #[serde(rename = "for")]
    hold: Option<Spanned<String>>,
    cooldown: Option<Spanned<String>>,
    action: Spanned<ActionFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
enum ActionFile {
    CreateGuests {
        template: String,
        #[serde(default = "one")]
        count: u32,
        #[serde(default = "eight")]
        slots: u32,
    },
    DestroyIdleGuests {
        #[serde(default = "one")]
        count: u32,
    },
    Drain(String),
    Undrain(String),
    Command(Vec<String>),
}

fn one() -> u32 {
    1
}

fn eight() -> u32 {
    8
}

/// Reads one trigger file.
///
/// # Errors
/// The file cannot be read, is not TOML of a trigger, or has a bad condition, duration or
/// action; the error names the file and line.
pub fn load(path: &Path) -> Result<Trigger, TriggerError> {
    let file = path.display().to_string();
    let err = |line: usize, message: String| TriggerError {
        file: file.clone(),
        line,
        message,
    };
    let src = std::fs::read_to_string(path).map_err(|e| err(1, format!("cannot read: {e}")))?;
    let f: File = toml::from_str(&src).map_err(|e| {
        err(
            e.span().map_or(1, |s| line_of(&src, s.start)),
            e.message().to_owned(),
        )
    })?;
    let at = |s: std::ops::Range<usize>| line_of(&src, s.start);
    // `when = "COND for 10s"` says the same as `when = "COND"` with `for = "10s"`.
    let (cond, inline) = match f.when.get_ref().rsplit_once(" for ") {
        Some((c, d)) if mvm_component::profile::parse_duration(d).is_some() => {
            (c.to_owned(), mvm_component::profile::parse_duration(d))
        }
        _ => (f.when.get_ref().clone(), None),
    };
    if inline.is_some() && f.hold.is_some() {
        return Err(err(
            at(f.when.span()),
            "when: says `for` and the file has `for = …` too; keep one".into(),
        ));
    }
    let when = Condition::parse(&cond).map_err(|m| err(at(f.when.span()), format!("when: {m}")))?;
    let duration = |d: &Option<Spanned<String>>, key: &str, default: Duration| match d {
        None => Ok(default),
        Some(s) => mvm_component::profile::parse_duration(s.get_ref()).ok_or_else(|| {
            err(
                at(s.span()),
                format!(
                    "{key}: '{}' is not a duration (e.g. 500ms, 10s, 2m)",
                    s.get_ref()
                ),
            )
        }),
    };
    let hold = match inline {
        Some(d) => d,
        None => duration(&f.hold, "for", Duration::ZERO)?,
    };
    let cooldown = duration(&f.cooldown, "cooldown", DEFAULT_COOLDOWN)?;
    let line = at(f.action.span());
    let count_ok = |count: u32| {
        if (1..=MAX_COUNT).contains(&count) {
            Ok(count)
        } else {
            Err(err(
                line,
                format!("action: count must be 1 to {MAX_COUNT}, not {count}"),
            ))
        }
    };
    let action = match f.action.into_inner() {
        ActionFile::CreateGuests {
            template,
            count,
            slots,
        } => {
            let t = mvm_os::template::load(&resolve(path, Path::new(&template)))
                .map_err(|e| err(line, format!("action: the guest template: {e}")))?;
            if slots == 0 {
                return Err(err(line, "action: a guest's node needs slots > 0".into()));
            }
            Action::CreateGuests {
                template: TemplateSpec {
                    name: t.name,
                    shape: t.shape,
                },
                count: count_ok(count)?,
                slots,
            }
        }
        ActionFile::DestroyIdleGuests { count } => Action::DestroyIdleGuests {
            count: count_ok(count)?,
        },
        ActionFile::Drain(n) | ActionFile::Undrain(n) if n.is_empty() => {
            return Err(err(line, "action: a node's name is empty".into()));
        }
        ActionFile::Drain(n) => Action::Drain(n),
        ActionFile::Undrain(n) => Action::Undrain(n),
        ActionFile::Command(argv) => {
            if argv.first().is_none_or(String::is_empty) {
                return Err(err(line, "action: command names no program".into()));
            }
            Action::Command(argv)
        }
    };
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("trigger")
        .to_owned();
    Ok(Trigger {
        name,
        file: path.to_owned(),
        when,
        hold,
        cooldown,
        action,
    })
}

/// `p` relative to the directory of `file`.
fn resolve(file: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        file.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Reads every `*.toml` of `dir`, by name.
///
/// # Errors
/// The directory cannot be read, or a file does not load (the first, by name).
pub fn load_dir(dir: &Path) -> Result<Vec<Trigger>, TriggerError> {
    let rd = std::fs::read_dir(dir).map_err(|e| TriggerError {
        file: dir.display().to_string(),
        line: 1,
        message: format!("cannot read the directory: {e}"),
    })?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files.iter().map(|p| load(p)).collect()
}

/// The triggers of a super-peer and when each last held and fired.
#[derive(Debug, Default)]
pub struct Triggers {
    list: Vec<(Trigger, Option<Instant>, Option<Instant>)>,
}

impl Triggers {
    /// These triggers, none holding yet.
    pub fn new(list: Vec<Trigger>) -> Triggers {
        Triggers {
            list: list.into_iter().map(|t| (t, None, None)).collect(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The triggers that fire at `now` for `values`: each whose condition has held since
    /// `for` ago at least, and which has not fired within its cool-down. A trigger that fires
    /// must hold for its `for` again before it fires again.
    pub fn on(&mut self, now: Instant, values: &Values) -> Vec<Trigger> {
        let mut fired = Vec::new();
        for (t, since, last) in &mut self.list {
            if !t.when.holds(values) {
                *since = None;
                continue;
            }
            let from = *since.get_or_insert(now);
            let held = now.saturating_duration_since(from) >= t.hold;
            let cooled = last.is_none_or(|l| now.saturating_duration_since(l) >= t.cooldown);
            if held && cooled {
                *last = Some(now);
                *since = None;
                fired.push(t.clone());
            }
        }
        fired
    }
}

#[cfg(test)]
mod tests;
