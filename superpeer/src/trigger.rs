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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Spanned;

use mvm_component::profile::line_of;

use crate::proto::TemplateSpec;

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

/// A comparison's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// A metric a condition reads: of the group (`pending_vertices`, `mean.load`), or of one node
/// (`node_load{node="n1"}`, `free_disk{node="n1"}`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Metric {
    /// Its name.
    pub name: String,
    /// The node, for a node's metric.
    pub node: Option<String>,
}

/// The group's metrics a condition may read (besides `mean.P`, `sum.P`, `min.P`, `max.P` of
/// each probe `P`).
pub const GROUP_METRICS: &[&str] = &[
    "nodes",
    "slots",
    "free_slots",
    "running_jobs",
    "pending_jobs",
    "pending_vertices",
    "mean_load",
    "max_load",
    "guests",
    "idle_guests",
];

/// A node's metrics a condition may read with `{node="NAME"}` (besides its probes, by name).
pub const NODE_METRICS: &[&str] = &[
    "node_load",
    "node_vertices",
    "node_slots",
    "node_free_slots",
];

impl Metric {
    fn check(&self) -> Result<(), String> {
        let probe = |p: &str| crate::node::monitor::known(p);
        let ok = match &self.node {
            None => {
                GROUP_METRICS.contains(&self.name.as_str())
                    || self.name.split_once('.').is_some_and(|(agg, p)| {
                        ["mean", "sum", "min", "max"].contains(&agg) && probe(p)
                    })
            }
            Some(_) => NODE_METRICS.contains(&self.name.as_str()) || probe(&self.name),
        };
        if ok {
            return Ok(());
        }
        let probes: Vec<&str> = crate::node::monitor::PROBES.iter().map(|p| p.0).collect();
        Err(match &self.node {
            None => format!(
                "no group metric '{}' (known: {}, and mean., sum., min., max. of a probe: {})",
                self.name,
                GROUP_METRICS.join(", "),
                probes.join(", ")
            ),
            Some(_) => format!(
                "no node metric '{}' (known: {}, and the probes {})",
                self.name,
                NODE_METRICS.join(", "),
                probes.join(", ")
            ),
        })
    }
}

/// One comparison of a condition.
#[derive(Debug, Clone, PartialEq)]
struct Cmp {
    metric: Metric,
    op: Op,
    value: f64,
}

/// A trigger's condition: comparisons of metrics with numbers, joined by `and`. A metric with
/// no value now (a probe no node publishes, a node not registered) makes it false.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition(Vec<Cmp>);

/// The values a condition reads now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values {
    /// The group's, by name.
    pub group: BTreeMap<String, f64>,
    /// Each node's, by name and node.
    pub nodes: BTreeMap<(String, String), f64>,
}

impl Values {
    fn get(&self, m: &Metric) -> Option<f64> {
        match &m.node {
            None => self.group.get(&m.name).copied(),
            Some(n) => self.nodes.get(&(m.name.clone(), n.clone())).copied(),
        }
    }
}

impl Condition {
    /// Parses `METRIC OP NUMBER [and METRIC OP NUMBER]…`, OP one of `< <= > >= = == !=`.
    ///
    /// # Errors
    /// What is wrong, and where (a column, 1-based).
    pub fn parse(text: &str) -> Result<Condition, String> {
        let mut cmps = Vec::new();
        let mut rest = text;
        let col = |rest: &str| text.len() - rest.len() + 1;
        loop {
            rest = rest.trim_start();
            let start = col(rest);
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            if name.is_empty() {
                return Err(format!("column {start}: expected a metric"));
            }
            rest = &rest[end..];
            let mut node = None;
            if let Some(r) = rest.strip_prefix('{') {
                let close = r
                    .find('}')
                    .ok_or_else(|| format!("column {}: '{{' is not closed", col(rest)))?;
                let label = r[..close].trim();
                let value = label
                    .strip_prefix("node")
                    .map(str::trim_start)
                    .and_then(|l| l.strip_prefix('='))
                    .map(str::trim)
                    .and_then(|v| v.strip_prefix('"'))
                    .and_then(|v| v.strip_suffix('"'))
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        format!(
                            "column {}: expected {{node=\"NAME\"}}, found {{{label}}}",
                            col(rest)
                        )
                    })?;
                node = Some(value.to_owned());
                rest = &r[close + 1..];
            }
            let metric = Metric {
                name: name.to_owned(),
                node,
            };
            metric.check().map_err(|m| format!("column {start}: {m}"))?;
            rest = rest.trim_start();
            let (op, len) = [
                ("<=", Op::Le),
                (">=", Op::Ge),
                ("==", Op::Eq),
                ("!=", Op::Ne),
                ("<", Op::Lt),
                (">", Op::Gt),
                ("=", Op::Eq),
            ]
            .iter()
            .find(|(s, _)| rest.starts_with(s))
            .map(|(s, o)| (*o, s.len()))
            .ok_or_else(|| {
                format!(
                    "column {}: expected one of < <= > >= = != after '{name}'",
                    col(rest)
                )
            })?;
            rest = rest[len..].trim_start();
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let value: f64 = rest[..end]
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| format!("column {}: expected a number", col(rest)))?;
            rest = &rest[end..];
            cmps.push(Cmp { metric, op, value });
            let r = rest.trim_start();
            if r.is_empty() {
                return Ok(Condition(cmps));
            }
            rest = r
                .strip_prefix("and")
                .filter(|r| r.starts_with(char::is_whitespace))
                .ok_or_else(|| format!("column {}: expected 'and' or the end", col(r)))?;
        }
    }

    /// Whether it holds for `v`.
    pub fn holds(&self, v: &Values) -> bool {
        self.0.iter().all(|c| {
            v.get(&c.metric).is_some_and(|x| match c.op {
                Op::Lt => x < c.value,
                Op::Le => x <= c.value,
                Op::Gt => x > c.value,
                Op::Ge => x >= c.value,
                Op::Eq => (x - c.value).abs() < 1e-9,
                Op::Ne => (x - c.value).abs() >= 1e-9,
            })
        })
    }
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
mod tests {
    use super::*;

    fn values(group: &[(&str, f64)], nodes: &[(&str, &str, f64)]) -> Values {
        Values {
            group: group.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            nodes: nodes
                .iter()
                .map(|(m, n, v)| (((*m).to_owned(), (*n).to_owned()), *v))
                .collect(),
        }
    }

    #[test]
    fn conditions_parse_compare_and_name_the_column_of_a_mistake() {
        let c = Condition::parse("pending_vertices > 64 and node_load{node=\"n1\"} <= 3")
            .expect("parses");
        let v = |p: f64, l: f64| values(&[("pending_vertices", p)], &[("node_load", "n1", l)]);
        assert!(c.holds(&v(65.0, 3.0)));
        assert!(!c.holds(&v(64.0, 3.0)));
        assert!(!c.holds(&v(65.0, 3.5)));
        // A metric with no value now: the condition does not hold.
        assert!(!c.holds(&values(&[("pending_vertices", 100.0)], &[])));
        let c = Condition::parse("idle_guests=0 and mean.queue_depth != 1.5").expect("parses");
        assert!(c.holds(&values(
            &[("idle_guests", 0.0), ("mean.queue_depth", 2.0)],
            &[]
        )));
        let c = Condition::parse("free_disk{ node = \"a\" } < 1e9").expect("a node's probe");
        assert!(c.holds(&values(&[], &[("free_disk", "a", 5e8)])));
        for (bad, says) in [
            ("", "column 1: expected a metric"),
            ("pending > 3", "column 1: no group metric 'pending'"),
            ("mean.temperature > 3", "column 1: no group metric"),
            ("node_load > 3", "no group metric 'node_load'"),
            (
                "node_load{host=\"x\"} > 3",
                "column 10: expected {node=\"NAME\"}",
            ),
            ("node_load{node=\"x\" > 3", "'{' is not closed"),
            ("nodes >> 3", "column 8: expected a number"),
            ("nodes ~ 3", "column 7: expected one of"),
            (
                "nodes > 3 or nodes < 1",
                "column 11: expected 'and' or the end",
            ),
            ("nodes > 3 andnodes < 1", "expected 'and'"),
        ] {
            let e = Condition::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn trigger(when: &str, hold: u64, cooldown: u64) -> Trigger {
        Trigger {
            name: "t".into(),
            file: "t.toml".into(),
            when: Condition::parse(when).expect("parses"),
            hold: Duration::from_secs(hold),
            cooldown: Duration::from_secs(cooldown),
            action: Action::Drain("n1".into()),
        }
    }

    #[test]
    fn a_trigger_fires_once_its_condition_has_held_for_its_time_then_cools_down() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut ts = Triggers::new(vec![trigger("pending_vertices > 0", 10, 30)]);
        let busy = values(&[("pending_vertices", 8.0)], &[]);
        let idle = values(&[("pending_vertices", 0.0)], &[]);
        assert!(ts.on(s(0), &busy).is_empty());
        assert!(ts.on(s(9), &busy).is_empty());
        // Broken before its time: starts over.
        assert!(ts.on(s(10), &idle).is_empty());
        assert!(ts.on(s(11), &busy).is_empty());
        assert!(ts.on(s(20), &busy).is_empty());
        assert_eq!(ts.on(s(21), &busy).len(), 1);
        // Held again for 10 s, but within its cool-down: not yet.
        assert!(ts.on(s(31), &busy).is_empty());
        assert!(ts.on(s(50), &busy).is_empty());
        assert_eq!(ts.on(s(51), &busy).len(), 1);
        // `for` 0: at once.
        let mut now = Triggers::new(vec![trigger("nodes >= 1", 0, 0)]);
        assert_eq!(now.on(s(0), &values(&[("nodes", 1.0)], &[])).len(), 1);
        assert_eq!(now.on(s(0), &values(&[("nodes", 1.0)], &[])).len(), 1);
    }

    #[test]
    fn trigger_files_load_and_their_mistakes_name_the_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(
            d.join("base.toml"),
            "image = \"env:1\"\nmemory = \"64MiB\"\n",
        )
        .expect("template");
        let write = |name: &str, text: &str| {
            let p = d.join("triggers").join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write");
            p
        };
        let grow = write(
            "grow.toml",
            "# Grow under a backlog.\nwhen = \"pending_vertices > 64\"\nfor = \"10s\"\n\
             cooldown = \"2m\"\n[action]\ncreate-guests = { template = \"../base.toml\", count = 2, slots = 4 }\n",
        );
        let t = load(&grow).expect("loads");
        assert_eq!(t.name, "grow");
        assert_eq!(
            (t.hold, t.cooldown),
            (Duration::from_secs(10), Duration::from_secs(120))
        );
        let Action::CreateGuests {
            template,
            count,
            slots,
        } = &t.action
        else {
            panic!("{t:?}");
        };
        assert_eq!(
            (template.shape.image.as_str(), template.shape.memory_mib),
            ("env:1", 64)
        );
        assert_eq!((*count, *slots), (2, 4));
        write(
            "notify.toml",
            "when = \"idle_guests > 2 for 1m\"\naction = { command = [\"/bin/true\", \"x\"] }\n",
        );
        let all = load_dir(&d.join("triggers")).expect("loads");
        assert_eq!(
            all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["grow", "notify"]
        );
        assert_eq!(all[1].cooldown, DEFAULT_COOLDOWN);
        assert_eq!(
            all[1].hold,
            Duration::from_secs(60),
            "`for` in the condition"
        );
        for (text, line, says) in [
            (
                "when = \"nodes > 1\"\n\nfor = \"soon\"\naction = { drain = \"n1\" }\n",
                3,
                "for: 'soon' is not a duration",
            ),
            (
                "when = \"nodes > \"\naction = { drain = \"n1\" }\n",
                1,
                "when: column 9: expected a number",
            ),
            (
                "when = \"nodes > 1 for 2s\"\nfor = \"3s\"\naction = { drain = \"n1\" }\n",
                1,
                "keep one",
            ),
            (
                "when = \"nodes > 1\"\naction = { explode = 1 }\n",
                2,
                "unknown variant `explode`",
            ),
            (
                "when = \"nodes > 1\"\nsize = 3\naction = { drain = \"n1\" }\n",
                2,
                "unknown field `size`",
            ),
            (
                "when = \"nodes > 1\"\n[action]\ndestroy-idle-guests = { count = 0 }\n",
                2,
                "count must be 1 to 64",
            ),
            (
                "when = \"nodes > 1\"\n[action]\ncommand = []\n",
                2,
                "command names no program",
            ),
            (
                "when = \"nodes > 1\"\n[action]\ncreate-guests = { template = \"nope.toml\" }\n",
                2,
                "the guest template",
            ),
        ] {
            let p = write("bad.toml", text);
            let e = load(&p).expect_err(text);
            assert_eq!(
                (e.file.as_str(), e.line),
                (p.to_str().expect("utf-8"), line),
                "{e}"
            );
            assert!(e.message.contains(says), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("{}:{line}: ", p.display())),
                "{e}"
            );
        }
    }
}
