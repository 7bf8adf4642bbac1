//! Virtual topologies: Graphviz DOT files that say which component runs on each vertex and
//! which ports the channels join, kept outside the jobs' code.
//!
//! ```dot
//! digraph ring {
//!     node [component="token"];          // a default for the vertices below
//!     a; b; c;
//!     a:out -> b:in;                     // a channel from port `out` of a to port `in` of b
//!     b:out -> c:in [queue=priority, codec="zstd+cbor", capacity=64];
//!     c:out -> a:in;
//! }
//! ```
//!
//! Rules beyond DOT: the graph is a `digraph`; every vertex has a `component`; a channel's ends
//! default to ports `out` (tail) and `in` (head); a port is either an input or an output of its
//! vertex; several channels into one input port share its queue (so they must agree on its
//! settings); several channels out of one output port each get every item (broadcast). Edge
//! attributes `queue`, `codec`, `capacity`, `capacity_bytes`, `overflow`, `aging` and
//! `max_item_bytes` configure the channel's queue; every other vertex or edge attribute is kept
//! and readable by the job as a parameter.

mod lex;
mod parse;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use mvm_queue::codec::Registry;
use mvm_queue::queue::{Config, Kind, Overflow};
use serde::Serialize;

use crate::profile::parse_size;
use parse::{Attr, RawGraph};

pub mod generate;

/// A problem at a line of a topology file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The line (1-based).
    pub line: u32,
    /// What is wrong.
    pub message: String,
}

/// A topology file that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The file, as named by the caller.
    pub file: String,
    /// The problems, in line order.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}", self.file, d.line, d.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// One vertex: a task running a component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vertex {
    /// Its name (unique in the topology).
    pub name: String,
    /// The component that runs on it.
    pub component: String,
    /// Every other attribute, readable by the job as a parameter.
    pub attributes: BTreeMap<String, String>,
    /// The line it first appeared on.
    pub line: u32,
}

/// One end of a channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct End {
    /// The vertex's index in [`Topology::vertices`].
    pub vertex: usize,
    /// The port's name.
    pub port: String,
}

/// A channel: a queue from an output port to an input port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Channel {
    /// Where items are sent.
    pub from: End,
    /// Where items are received.
    pub to: End,
    /// The queue's configuration.
    pub queue: Config,
    /// Every attribute that is not a queue setting (e.g. `weight` for placement).
    pub attributes: BTreeMap<String, String>,
    /// The line of its edge statement.
    pub line: u32,
}

/// One vertex's ports: the channels into each input port and out of each output port.
#[derive(Debug, Clone, Default)]
pub struct VertexPorts<'a> {
    /// Input ports by name.
    pub inputs: BTreeMap<&'a str, Vec<&'a Channel>>,
    /// Output ports by name.
    pub outputs: BTreeMap<&'a str, Vec<&'a Channel>>,
}

/// A validated topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// The graph's name, if it has one.
    pub name: Option<String>,
    /// Graph-level attributes.
    pub attributes: BTreeMap<String, String>,
    /// The vertices, in order of first appearance.
    pub vertices: Vec<Vertex>,
    /// The channels, in order of appearance.
    pub channels: Vec<Channel>,
}

/// What a topology is checked against.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// The codecs channels may name.
    pub codecs: &'a Registry,
    /// The queue settings of channels that set nothing themselves.
    pub queue_defaults: Config,
}

const QUEUE_KEYS: [&str; 8] = [
    "queue",
    "codec",
    "capacity",
    "capacity_bytes",
    "capacity-bytes",
    "overflow",
    "aging",
    "max_item_bytes",
];

impl Topology {
    /// Reads and checks a topology file.
    ///
    /// # Errors
    /// The file cannot be read, is not text, or has problems; each is reported with its line.
    pub fn load(path: &Path, options: &Options<'_>) -> Result<Topology, Error> {
        let file = path.display().to_string();
        let fail = |line, message: String| Error {
            file: file.clone(),
            diagnostics: vec![Diagnostic { line, message }],
        };
        let bytes = std::fs::read(path).map_err(|e| fail(1, format!("cannot read: {e}")))?;
        let src = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            fail(
                u32::try_from(line).unwrap_or(u32::MAX),
                format!("not a text file (invalid UTF-8 at byte {at})"),
            )
        })?;
        Topology::parse(&src, options).map_err(|diagnostics| Error { file, diagnostics })
    }

    /// Parses and checks the DOT source of `file` (a name for errors: the source may come
    /// from a message rather than a file).
    ///
    /// # Errors
    /// Every problem found, each with the file and its line.
    pub fn parse_named(file: &str, src: &str, options: &Options<'_>) -> Result<Topology, Error> {
        Topology::parse(src, options).map_err(|diagnostics| Error {
            file: file.to_owned(),
            diagnostics,
        })
    }

    /// Parses and checks DOT source.
    ///
    /// # Errors
    /// Every problem found, each with its line; a syntax error stops at the first.
    pub fn parse(src: &str, options: &Options<'_>) -> Result<Topology, Vec<Diagnostic>> {
        let toks = lex::lex(src).map_err(|e| {
            vec![Diagnostic {
                line: e.line,
                message: e.message,
            }]
        })?;
        let raw = parse::parse(&toks).map_err(|d| vec![d])?;
        build(raw, options)
    }

    /// The index of the vertex named `name`.
    pub fn vertex_index(&self, name: &str) -> Option<usize> {
        self.vertices.iter().position(|v| v.name == name)
    }

    /// The channels into vertex `v`, by input port.
    pub fn inputs(&self, v: usize) -> BTreeMap<&str, Vec<&Channel>> {
        let mut m: BTreeMap<&str, Vec<&Channel>> = BTreeMap::new();
        for c in self.channels.iter().filter(|c| c.to.vertex == v) {
            m.entry(c.to.port.as_str()).or_default().push(c);
        }
        m
    }

    /// The channels out of vertex `v`, by output port.
    pub fn outputs(&self, v: usize) -> BTreeMap<&str, Vec<&Channel>> {
        let mut m: BTreeMap<&str, Vec<&Channel>> = BTreeMap::new();
        for c in self.channels.iter().filter(|c| c.from.vertex == v) {
            m.entry(c.from.port.as_str()).or_default().push(c);
        }
        m
    }

    /// Every vertex's input and output ports with their channels, built in one pass over the
    /// channels (calling [`Topology::inputs`] per vertex would be quadratic).
    pub fn port_index(&self) -> Vec<VertexPorts<'_>> {
        let mut idx: Vec<VertexPorts<'_>> = (0..self.vertices.len())
            .map(|_| VertexPorts::default())
            .collect();
        for c in &self.channels {
            idx[c.to.vertex]
                .inputs
                .entry(c.to.port.as_str())
                .or_default()
                .push(c);
            idx[c.from.vertex]
                .outputs
                .entry(c.from.port.as_str())
                .or_default()
                .push(c);
        }
        idx
    }

    /// The topology as a petgraph graph: node weights are vertex indices, edge weights channel
    /// indices (for placement and partitioning).
    pub fn graph(&self) -> petgraph::Graph<usize, usize> {
        let mut g = petgraph::Graph::with_capacity(self.vertices.len(), self.channels.len());
        let nodes: Vec<_> = (0..self.vertices.len()).map(|i| g.add_node(i)).collect();
        for (i, c) in self.channels.iter().enumerate() {
            g.add_edge(nodes[c.from.vertex], nodes[c.to.vertex], i);
        }
        g
    }

    /// Renders the topology as DOT for Graphviz drawing: ports appear as edge end labels and
    /// components under vertex names.
    pub fn to_render_dot(&self) -> String {
        let mut s = String::from(
            "digraph {\n  node [shape=box, fontname=\"Helvetica\"];\n  edge [fontsize=9, fontname=\"Helvetica\"];\n",
        );
        for v in &self.vertices {
            s.push_str(&format!(
                "  {} [label={}];\n",
                quote(&v.name),
                quote(&format!("{}\n({})", v.name, v.component))
            ));
        }
        for c in &self.channels {
            let (a, b) = (
                &self.vertices[c.from.vertex].name,
                &self.vertices[c.to.vertex].name,
            );
            let mut label = String::new();
            if c.queue.kind != Kind::Fifo || c.queue.codec != mvm_queue::queue::DEFAULT_CODEC {
                label = format!("{} {}", c.queue.kind, c.queue.codec);
            }
            s.push_str(&format!(
                "  {} -> {} [taillabel={}, headlabel={}, label={}];\n",
                quote(a),
                quote(b),
                quote(&c.from.port),
                quote(&c.to.port),
                quote(&label)
            ));
        }
        s.push_str("}\n");
        s
    }
}

/// Quotes a DOT identifier.
pub fn quote(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}

fn last<'a>(attrs: &'a [Attr], key: &str) -> Option<&'a Attr> {
    attrs.iter().rev().find(|a| a.0 == key)
}

/// The queue configuration of an edge, or what is wrong with it.
fn queue_config(
    attrs: &[Attr],
    edge_line: u32,
    options: &Options<'_>,
) -> Result<Config, Diagnostic> {
    let mut c = options.queue_defaults.clone();
    let mut codec_set = false;
    let err = |a: &Attr, message: String| Diagnostic { line: a.2, message };
    for a in attrs {
        let (k, v) = (a.0.as_str(), a.1.as_str());
        match k {
            "queue" => {
                c.kind = Kind::parse(v).ok_or_else(|| {
                    err(
                        a,
                        format!("unknown queue kind '{v}' (known: fifo, priority)"),
                    )
                })?;
            }
            "codec" => {
                options
                    .codecs
                    .resolve(v)
                    .map_err(|e| err(a, e.to_string()))?;
                c.codec = v.to_owned();
                codec_set = true;
            }
            "capacity" => {
                c.capacity = v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    err(
                        a,
                        format!("capacity must be a whole number of items, at least 1, not '{v}'"),
                    )
                })?;
            }
            "capacity_bytes" | "capacity-bytes" => {
                c.capacity_bytes = parse_size(v).filter(|n| *n > 0).ok_or_else(|| {
                    err(a, format!("capacity_bytes must be a size in bytes (e.g. 65536 or 64KiB), not '{v}'"))
                })?;
            }
            "max_item_bytes" => {
                c.max_item_bytes = Some(parse_size(v).filter(|n| *n > 0).ok_or_else(|| {
                    err(
                        a,
                        format!("max_item_bytes must be a size in bytes, not '{v}'"),
                    )
                })?);
            }
            "overflow" => {
                c.overflow = Overflow::parse(v).ok_or_else(|| {
                    err(
                        a,
                        format!("unknown overflow policy '{v}' (known: block, fail, drop-oldest)"),
                    )
                })?;
            }
            "aging" => {
                c.aging = Some(v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    err(
                        a,
                        format!("aging must be a whole number of items, at least 1, not '{v}'"),
                    )
                })?);
            }
            _ => {}
        }
    }
    // A codec from the defaults (a profile's [queue]) is checked here too, so that no
    // channel is wired with a codec the node cannot resolve.
    if !codec_set {
        options.codecs.resolve(&c.codec).map_err(|e| Diagnostic {
            line: edge_line,
            message: format!("the default queue settings: {e}"),
        })?;
    }
    let line = attrs.last().map_or(edge_line, |a| a.2);
    c.validate().map_err(|e| Diagnostic {
        line,
        message: format!("queue settings: {e}"),
    })?;
    Ok(c)
}

fn build(raw: RawGraph, options: &Options<'_>) -> Result<Topology, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    if !raw.directed {
        errors.push(Diagnostic {
            line: raw.header_line,
            message: "an undirected graph: MVM channels have a direction, write 'digraph'".into(),
        });
    }
    if raw.nodes.is_empty() {
        errors.push(Diagnostic {
            line: raw.header_line,
            message: "the graph has no vertices".into(),
        });
    }
    let vertices: Vec<Vertex> = raw
        .nodes
        .iter()
        .map(|n| {
            let component = last(&n.attrs, "component").map(|a| a.1.clone());
            if component.as_deref().is_none_or(str::is_empty) {
                errors.push(Diagnostic {
                    line: n.line,
                    message: format!(
                        "vertex '{}' has no component (set component=\"...\" on it, or a 'node [component=...]' default before it)",
                        n.name
                    ),
                });
            }
            let attributes = n.attrs.iter().filter(|a| a.0 != "component").map(|a| (a.0.clone(), a.1.clone())).collect();
            Vertex { name: n.name.clone(), component: component.unwrap_or_default(), attributes, line: n.line }
        })
        .collect();

    let mut channels = Vec::with_capacity(raw.edges.len());
    // Port roles: (vertex, port) -> (is input, line of first use, queue of an input port).
    let mut roles: HashMap<(usize, String), (bool, u32, Option<Config>)> = HashMap::new();
    for e in &raw.edges {
        let queue = match queue_config(&e.attrs, e.line, options) {
            Ok(q) => q,
            Err(d) => {
                errors.push(d);
                continue;
            }
        };
        let from = End {
            vertex: e.tail.0,
            port: e.tail.1.clone().unwrap_or_else(|| "out".into()),
        };
        let to = End {
            vertex: e.head.0,
            port: e.head.1.clone().unwrap_or_else(|| "in".into()),
        };
        let mut ok = true;
        for (end, is_input) in [(&from, false), (&to, true)] {
            let key = (end.vertex, end.port.clone());
            match roles.get(&key) {
                None => {
                    roles.insert(key, (is_input, e.line, is_input.then(|| queue.clone())));
                }
                Some(&(was_input, line, _)) if was_input != is_input => {
                    let (now, then) = if is_input {
                        ("an input", "an output")
                    } else {
                        ("an output", "an input")
                    };
                    errors.push(Diagnostic {
                        line: e.line,
                        message: format!(
                            "port '{}:{}' is used as {now} here but as {then} at line {line}",
                            raw.nodes[end.vertex].name, end.port
                        ),
                    });
                    ok = false;
                }
                Some((_, line, Some(first))) if is_input => {
                    let line = *line;
                    if *first != queue {
                        errors.push(Diagnostic {
                            line: e.line,
                            message: format!(
                                "channels into '{}:{}' share one queue but set it differently here and at line {line}",
                                raw.nodes[end.vertex].name, end.port
                            ),
                        });
                        ok = false;
                    }
                }
                Some(_) => {} // fan-out: broadcast
            }
        }
        if ok {
            let attributes = e
                .attrs
                .iter()
                .filter(|a| !QUEUE_KEYS.contains(&a.0.as_str()))
                .map(|a| (a.0.clone(), a.1.clone()))
                .collect();
            channels.push(Channel {
                from,
                to,
                queue,
                attributes,
                line: e.line,
            });
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|d| d.line);
        return Err(errors);
    }
    Ok(Topology {
        name: raw.name,
        attributes: raw.attrs.into_iter().map(|a| (a.0, a.1)).collect(),
        vertices,
        channels,
    })
}

#[cfg(test)]
mod tests;
