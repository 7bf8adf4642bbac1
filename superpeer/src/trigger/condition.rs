//! A trigger's condition: comparisons of the group's and its nodes' metrics, joined by
//! `and`, and the values they are asked against.

use std::collections::BTreeMap;

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
