//! The DOT parser: tokens to a raw graph with lines, applying Graphviz's scoping of default
//! attribute statements (`node [...]`, `edge [...]` apply to what is created after them, in
//! their subgraph and the subgraphs inside it).

use std::collections::HashMap;

use super::Diagnostic;
use super::lex::{IdKind, Tok};

/// An attribute as written: name, value, line.
pub(crate) type Attr = (String, String, u32);

/// A node: its name, the line it first appeared on, and its attributes in order of writing
/// (defaults first, later statements after).
#[derive(Debug, Clone)]
pub(crate) struct RawNode {
    pub(crate) name: String,
    pub(crate) line: u32,
    pub(crate) attrs: Vec<Attr>,
}

/// An edge between two node ports.
#[derive(Debug, Clone)]
pub(crate) struct RawEdge {
    pub(crate) tail: (usize, Option<String>),
    pub(crate) head: (usize, Option<String>),
    pub(crate) attrs: Vec<Attr>,
    pub(crate) line: u32,
}

/// What the parser read.
#[derive(Debug, Default)]
pub(crate) struct RawGraph {
    pub(crate) directed: bool,
    pub(crate) header_line: u32,
    pub(crate) name: Option<String>,
    pub(crate) attrs: Vec<Attr>,
    pub(crate) nodes: Vec<RawNode>,
    pub(crate) edges: Vec<RawEdge>,
    index: HashMap<String, usize>,
}

#[derive(Clone, Default)]
struct Scope {
    node: Vec<Attr>,
    edge: Vec<Attr>,
}

/// One end of an edge statement: a node with an optional port, or the nodes of a subgraph.
enum End {
    Node(usize, Option<String>),
    Group(Vec<usize>),
}

struct Parser<'a> {
    toks: &'a [(Tok, u32)],
    pos: usize,
    g: RawGraph,
    last_line: u32,
    /// Subgraphs open around the statement being read.
    depth: usize,
}

/// How deep subgraphs may nest (each level is read by a recursive call: deeper nesting from a
/// hostile file would overflow a thread's stack).
pub(crate) const MAX_DEPTH: usize = 32;

type PResult<T> = Result<T, Diagnostic>;

/// Parses a token list into a raw graph.
pub(crate) fn parse(toks: &[(Tok, u32)]) -> PResult<RawGraph> {
    let last_line = toks.last().map_or(1, |t| t.1);
    let mut p = Parser {
        toks,
        pos: 0,
        g: RawGraph::default(),
        last_line,
        depth: 0,
    };
    p.graph()?;
    Ok(p.g)
}

fn keyword(t: &Tok, word: &str) -> bool {
    matches!(t, Tok::Id(s, IdKind::Plain) if s.eq_ignore_ascii_case(word))
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Id(s, IdKind::Quoted) => format!("\"{s}\""),
        Tok::Id(s, IdKind::Html) => format!("<{s}>"),
        Tok::Id(s, _) => format!("'{s}'"),
        Tok::LBrace => "'{'".into(),
        Tok::RBrace => "'}'".into(),
        Tok::LBracket => "'['".into(),
        Tok::RBracket => "']'".into(),
        Tok::Semi => "';'".into(),
        Tok::Comma => "','".into(),
        Tok::Colon => "':'".into(),
        Tok::Eq => "'='".into(),
        Tok::Directed => "'->'".into(),
        Tok::Undirected => "'--'".into(),
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }

    fn peek2(&self) -> Option<&Tok> {
        self.toks.get(self.pos + 1).map(|t| &t.0)
    }

    fn line(&self) -> u32 {
        self.toks.get(self.pos).map_or(self.last_line, |t| t.1)
    }

    fn error<T>(&self, message: impl Into<String>) -> PResult<T> {
        Err(Diagnostic {
            line: self.line(),
            message: message.into(),
        })
    }

    fn unexpected<T>(&self, wanted: &str) -> PResult<T> {
        match self.peek() {
            Some(t) => self.error(format!("expected {wanted}, found {}", describe(t))),
            None => self.error(format!("expected {wanted}, found the end of the file")),
        }
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, t: &Tok, wanted: &str) -> PResult<()> {
        if self.eat(t) {
            Ok(())
        } else {
            self.unexpected(wanted)
        }
    }

    fn id(&mut self, wanted: &str) -> PResult<String> {
        match self.peek() {
            Some(Tok::Id(s, _)) => {
                let s = s.clone();
                self.pos += 1;
                Ok(s)
            }
            _ => self.unexpected(wanted),
        }
    }

    fn graph(&mut self) -> PResult<()> {
        if self.toks.is_empty() {
            return self.error("the file is empty: expected 'digraph NAME { ... }'");
        }
        self.g.header_line = self.line();
        if self.peek().is_some_and(|t| keyword(t, "strict")) {
            self.pos += 1;
        }
        match self.peek() {
            Some(t) if keyword(t, "digraph") => self.g.directed = true,
            Some(t) if keyword(t, "graph") => self.g.directed = false,
            _ => return self.unexpected("'digraph'"),
        }
        self.pos += 1;
        if let Some(Tok::Id(..)) = self.peek() {
            self.g.name = Some(self.id("a graph name")?);
        }
        self.expect(&Tok::LBrace, "'{'")?;
        let mut scope = Scope::default();
        self.stmts(&mut scope, &mut Vec::new())?;
        self.expect(&Tok::RBrace, "'}'")?;
        if self.pos < self.toks.len() {
            return self.error("text after the end of the graph");
        }
        Ok(())
    }

    /// Statements up to (not including) the closing brace; `members` collects the nodes seen.
    fn stmts(&mut self, scope: &mut Scope, members: &mut Vec<usize>) -> PResult<()> {
        loop {
            match self.peek() {
                None | Some(Tok::RBrace) => return Ok(()),
                Some(_) => {
                    self.stmt(scope, members)?;
                    self.eat(&Tok::Semi);
                }
            }
        }
    }

    fn stmt(&mut self, scope: &mut Scope, members: &mut Vec<usize>) -> PResult<()> {
        let Some(t) = self.peek() else {
            return self.unexpected("a statement");
        };
        let is_attr_keyword = |w| keyword(t, w) && self.peek2() == Some(&Tok::LBracket);
        if is_attr_keyword("graph") {
            self.pos += 1;
            let attrs = self.attr_lists()?;
            self.g.attrs.extend(attrs);
            return Ok(());
        }
        if is_attr_keyword("node") {
            self.pos += 1;
            let attrs = self.attr_lists()?;
            scope.node.extend(attrs);
            return Ok(());
        }
        if is_attr_keyword("edge") {
            self.pos += 1;
            let attrs = self.attr_lists()?;
            scope.edge.extend(attrs);
            return Ok(());
        }
        if matches!(t, Tok::Id(..)) && self.peek2() == Some(&Tok::Eq) && !keyword(t, "subgraph") {
            let line = self.line();
            let k = self.id("a name")?;
            self.pos += 1;
            let v = self.id("a value")?;
            self.g.attrs.push((k, v, line));
            return Ok(());
        }
        if keyword(t, "node") || keyword(t, "edge") || keyword(t, "graph") {
            return self.error(format!(
                "'{}' must be followed by an attribute list '[...]'",
                describe(t)
            ));
        }
        // A node or edge statement.
        let line = self.line();
        let first = self.end(scope, members)?;
        if matches!(self.peek(), Some(Tok::Directed | Tok::Undirected)) {
            let mut ends = vec![first];
            while let Some(op) = self.peek().cloned() {
                if !matches!(op, Tok::Directed | Tok::Undirected) {
                    break;
                }
                if op == Tok::Undirected && self.g.directed {
                    return self.error("'--' in a digraph: channels are directed, write '->'");
                }
                if op == Tok::Directed && !self.g.directed {
                    return self.error("'->' in an undirected graph: write 'digraph'");
                }
                self.pos += 1;
                ends.push(self.end(scope, members)?);
            }
            let mut attrs = scope.edge.clone();
            if self.peek() == Some(&Tok::LBracket) {
                attrs.extend(self.attr_lists()?);
            }
            for pair in ends.windows(2) {
                for tail in expand(&pair[0]) {
                    for head in expand(&pair[1]) {
                        self.g.edges.push(RawEdge {
                            tail: tail.clone(),
                            head,
                            attrs: attrs.clone(),
                            line,
                        });
                    }
                }
            }
        } else {
            match first {
                End::Node(n, port) => {
                    if port.is_some() {
                        return Err(Diagnostic {
                            line,
                            message: "a port belongs on an edge end, not on a node statement"
                                .into(),
                        });
                    }
                    if self.peek() == Some(&Tok::LBracket) {
                        let attrs = self.attr_lists()?;
                        self.g.nodes[n].attrs.extend(attrs);
                    }
                }
                End::Group(_) => {}
            }
        }
        Ok(())
    }

    /// A node (with optional port) or a subgraph.
    fn end(&mut self, scope: &Scope, members: &mut Vec<usize>) -> PResult<End> {
        match self.peek() {
            Some(Tok::LBrace) => self.subgraph(scope, members),
            Some(t) if keyword(t, "subgraph") => self.subgraph(scope, members),
            Some(Tok::Id(..)) => {
                let line = self.line();
                let name = self.id("a node name")?;
                let n = self.node(name, line, scope);
                members.push(n);
                let mut port = None;
                if self.eat(&Tok::Colon) {
                    port = Some(self.id("a port name after ':'")?);
                    if self.eat(&Tok::Colon) {
                        self.id("a compass point after ':'")?; // placement only: ignored
                    }
                }
                Ok(End::Node(n, port))
            }
            _ => self.unexpected("a node name or a subgraph"),
        }
    }

    fn subgraph(&mut self, scope: &Scope, members: &mut Vec<usize>) -> PResult<End> {
        if self.peek().is_some_and(|t| keyword(t, "subgraph")) {
            self.pos += 1;
            if let Some(Tok::Id(..)) = self.peek() {
                self.pos += 1;
            }
        }
        self.expect(&Tok::LBrace, "'{' to open the subgraph")?;
        if self.depth >= MAX_DEPTH {
            return self.error(format!("subgraphs nested more than {MAX_DEPTH} deep"));
        }
        let mut inner = scope.clone();
        let mut own = Vec::new();
        self.depth += 1;
        let read = self.stmts(&mut inner, &mut own);
        self.depth -= 1;
        read?;
        self.expect(&Tok::RBrace, "'}' to close the subgraph")?;
        members.extend_from_slice(&own);
        own.sort_unstable();
        own.dedup();
        Ok(End::Group(own))
    }

    /// The node named `name`, created with the scope's defaults if new.
    fn node(&mut self, name: String, line: u32, scope: &Scope) -> usize {
        if let Some(&n) = self.g.index.get(&name) {
            return n;
        }
        let n = self.g.nodes.len();
        self.g.index.insert(name.clone(), n);
        self.g.nodes.push(RawNode {
            name,
            line,
            attrs: scope.node.clone(),
        });
        n
    }

    /// One or more `[a=b, c=d; e=f]` lists.
    fn attr_lists(&mut self) -> PResult<Vec<Attr>> {
        let mut attrs = Vec::new();
        while self.eat(&Tok::LBracket) {
            loop {
                if self.eat(&Tok::RBracket) {
                    break;
                }
                let line = self.line();
                let k = self.id("an attribute name or ']'")?;
                self.expect(&Tok::Eq, &format!("'=' after attribute '{k}'"))?;
                let v = self.id(&format!("a value for attribute '{k}'"))?;
                attrs.push((k, v, line));
                if !self.eat(&Tok::Comma) {
                    self.eat(&Tok::Semi);
                }
            }
        }
        Ok(attrs)
    }
}

fn expand(end: &End) -> Vec<(usize, Option<String>)> {
    match end {
        End::Node(n, p) => vec![(*n, p.clone())],
        End::Group(ns) => ns.iter().map(|n| (*n, None)).collect(),
    }
}

impl RawGraph {
    /// Consumes a token stream; used by tests.
    #[cfg(test)]
    pub(crate) fn from_src(src: &str) -> PResult<RawGraph> {
        let toks = super::lex::lex(src).map_err(|e| Diagnostic {
            line: e.line,
            message: e.message,
        })?;
        parse(&toks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_later_nodes_in_scope() {
        let g = RawGraph::from_src(
            "digraph { a; node [component=x]; b; subgraph s { node [component=y]; c } d -> e [w=1] }",
        )
        .expect("parses");
        let comp = |n: &str| {
            let node = g.nodes.iter().find(|x| x.name == n).expect("node");
            node.attrs
                .iter()
                .rev()
                .find(|a| a.0 == "component")
                .map(|a| a.1.clone())
        };
        assert_eq!(comp("a"), None);
        assert_eq!(comp("b").as_deref(), Some("x"));
        assert_eq!(comp("c").as_deref(), Some("y"));
        assert_eq!(
            comp("d").as_deref(),
            Some("x"),
            "the subgraph's default ended with it"
        );
        assert_eq!(g.edges.len(), 1);
    }

    #[test]
    fn chains_subgraph_ends_and_ports() {
        let g = RawGraph::from_src("digraph { a:o -> b:i -> c:i:n; x -> {y z} }").expect("parses");
        assert_eq!(g.edges.len(), 4);
        assert_eq!(g.edges[0].tail.1.as_deref(), Some("o"));
        assert_eq!(
            g.edges[1].head.1.as_deref(),
            Some("i"),
            "compass point ignored"
        );
    }

    #[test]
    fn syntax_errors_have_lines() {
        let e = RawGraph::from_src("digraph {\n a -> \n}").expect_err("dangling edge");
        assert_eq!(e.line, 3);
        let e = RawGraph::from_src("digraph {\n a [x=]\n}").expect_err("missing value");
        assert!(
            e.message.contains("value for attribute 'x'"),
            "{}",
            e.message
        );
        let e = RawGraph::from_src("digraph { a -- b }").expect_err("undirected op");
        assert!(e.message.contains("'--'"));
        assert!(RawGraph::from_src("digraph { a } extra").is_err());
        assert!(RawGraph::from_src("digraph { a ").is_err());
        assert!(RawGraph::from_src("").is_err());
    }

    #[test]
    fn subgraphs_nest_at_most_max_depth_deep_and_deeper_is_an_error_not_a_crash() {
        let nested = |n: usize| format!("digraph {{\n{} a {}}}", "{ ".repeat(n), "} ".repeat(n));
        let g = RawGraph::from_src(&nested(MAX_DEPTH)).expect("as deep as allowed");
        assert_eq!(g.nodes.len(), 1);
        // Found by the fuzzer: a few hundred '{' overflowed the stack.
        for n in [MAX_DEPTH + 1, 100_000] {
            let e = RawGraph::from_src(&nested(n)).expect_err("too deep");
            assert_eq!(e.line, 2);
            assert!(
                e.message.contains("nested more than 32 deep"),
                "{}",
                e.message
            );
        }
    }
}
