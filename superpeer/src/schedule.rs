//! Scheduling: which nodes may run a job, how they rank, and where each vertex goes.
//!
//! A pure decision (GridWay's requirement-and-rank, `003_*` section 4.1, then graph
//! partitioning): [`filter`] keeps the nodes that meet the requirements and says why each other
//! one was left out, [`Rank`] orders them by an expression over node properties, and [`place`]
//! splits the topology into balanced parts that cut as little channel weight as possible, each
//! within its node's free slots.

use std::collections::VecDeque;

use crate::proto::Requirements;

/// A node the broker may place vertices on.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its name, for messages.
    pub name: String,
    /// CPUs.
    pub cpus: u32,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    /// Free memory, bytes.
    pub free_memory_bytes: u64,
    /// 1-minute load average.
    pub load: f64,
    /// Architecture.
    pub arch: String,
    /// Image ids it offers.
    pub images: Vec<String>,
    /// Vertex slots in all.
    pub slots: u32,
    /// Vertex slots not taken by running jobs.
    pub free_slots: u32,
}

/// The nodes (indices into `nodes`) that meet `req`, and a reason for each that does not.
pub fn filter(nodes: &[Candidate], req: &Requirements) -> (Vec<usize>, Vec<String>) {
    let mut ok = Vec::new();
    let mut why = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let reason = if let Some(img) = req
            .image
            .as_deref()
            .filter(|i| !n.images.iter().any(|x| x == i))
        {
            Some(format!("does not offer image '{img}'"))
        } else if let Some(c) = req.vcpus.filter(|&c| n.cpus < c) {
            Some(format!("has {} CPUs, the job needs {c}", n.cpus))
        } else if let Some(m) = req.memory_bytes.filter(|&m| n.free_memory_bytes < m) {
            Some(format!(
                "has {} MiB free, the job needs {} MiB",
                n.free_memory_bytes >> 20,
                m >> 20
            ))
        } else if let Some(a) = req.arch.as_deref().filter(|a| *a != n.arch) {
            Some(format!("is {}, the job needs {a}", n.arch))
        } else if n.free_slots == 0 {
            Some("has no free vertex slot".to_owned())
        } else {
            None
        };
        match reason {
            None => ok.push(i),
            Some(r) => why.push(format!("node {}: {r}", n.name)),
        }
    }
    (ok, why)
}

/// A parsed rank expression: arithmetic and comparisons over node properties.
///
/// Properties: `cpus`, `memory` and `free_memory` (MiB), `load`, `slots`, `free_slots`.
/// Operators, loosest first: `< <= > >= == !=` (1 or 0), `+ -`, `* /`, unary `-`, parentheses.
#[derive(Debug, Clone, PartialEq)]
pub struct Rank(Expr);

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Num(f64),
    Var(Var),
    Neg(Box<Expr>),
    Bin(Op, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Cpus,
    Memory,
    FreeMemory,
    Load,
    Slots,
    FreeSlots,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// The names a rank expression may use.
pub const RANK_PROPERTIES: &str = "cpus, memory, free_memory, load, slots, free_slots";

/// Why a rank expression does not parse, or a job cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A rank expression does not parse at `column` (1-based, in bytes).
    #[error("rank expression, column {column}: {problem}")]
    Rank {
        /// Where.
        column: usize,
        /// What is wrong there.
        problem: RankProblem,
    },
    /// More vertices than all the nodes' free slots.
    #[error("{vertices} vertices do not fit in the {slots} free slots of {nodes} nodes")]
    TooFewSlots {
        /// The job's vertices.
        vertices: usize,
        /// The free slots of all the nodes.
        slots: u64,
        /// The nodes.
        nodes: usize,
    },
    /// More vertices than the free slots of the nodes the job may use.
    #[error("{vertices} vertices do not fit in the {slots} free slots of the {nodes} best nodes")]
    TooFewSlotsOnBest {
        /// The job's vertices.
        vertices: usize,
        /// The free slots of the best nodes.
        slots: u64,
        /// How many nodes the job may use.
        nodes: usize,
    },
}

/// What is wrong at a place of a rank expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RankProblem {
    /// An opening parenthesis is not closed.
    #[error("expected ')'")]
    Unclosed,
    /// Digits and dots that are not a number.
    #[error("bad number '{0}'")]
    Number(String),
    /// A name that is not a property.
    #[error("unknown property '{0}' (known: {RANK_PROPERTIES})")]
    Property(String),
    /// Something else where an operand belongs.
    #[error("expected a number, a property or '('")]
    Operand,
    /// The expression ends where an operand belongs.
    #[error("unexpected end")]
    End,
    /// Text after a whole expression.
    #[error("unexpected text")]
    Trailing,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
    }

    fn err<T>(&self, problem: RankProblem) -> Result<T, ScheduleError> {
        Err(ScheduleError::Rank {
            column: self.pos + 1,
            problem,
        })
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.pos..].starts_with(tok.as_bytes()) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn compare(&mut self) -> Result<Expr, ScheduleError> {
        let lhs = self.sum()?;
        for (tok, op) in [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<", Op::Lt),
            (">", Op::Gt),
        ] {
            if self.eat(tok) {
                let rhs = self.sum()?;
                return Ok(Expr::Bin(op, Box::new(lhs), Box::new(rhs)));
            }
        }
        Ok(lhs)
    }

    fn sum(&mut self) -> Result<Expr, ScheduleError> {
        let mut e = self.product()?;
        loop {
            let op = if self.eat("+") {
                Op::Add
            } else if self.eat("-") {
                Op::Sub
            } else {
                return Ok(e);
            };
            e = Expr::Bin(op, Box::new(e), Box::new(self.product()?));
        }
    }

    fn product(&mut self) -> Result<Expr, ScheduleError> {
        let mut e = self.unary()?;
        loop {
            let op = if self.eat("*") {
                Op::Mul
            } else if self.eat("/") {
                Op::Div
            } else {
                return Ok(e);
            };
            e = Expr::Bin(op, Box::new(e), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, ScheduleError> {
        if self.eat("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let e = self.compare()?;
            if !self.eat(")") {
                return self.err(RankProblem::Unclosed);
            }
            return Ok(e);
        }
        self.ws();
        let start = self.pos;
        let s = self.s;
        match s.get(start) {
            Some(c) if c.is_ascii_digit() || *c == b'.' => {
                while s
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.pos += 1;
                }
                let text = String::from_utf8_lossy(&s[start..self.pos]);
                match text.parse() {
                    Ok(n) => Ok(Expr::Num(n)),
                    Err(_) => {
                        self.pos = start;
                        self.err(RankProblem::Number(text.into_owned()))
                    }
                }
            }
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                while s
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    self.pos += 1;
                }
                let name = String::from_utf8_lossy(&s[start..self.pos]);
                let var = match name.as_ref() {
                    "cpus" => Var::Cpus,
                    "memory" => Var::Memory,
                    "free_memory" => Var::FreeMemory,
                    "load" => Var::Load,
                    "slots" => Var::Slots,
                    "free_slots" => Var::FreeSlots,
                    _ => {
                        self.pos = start;
                        return self.err(RankProblem::Property(name.into_owned()));
                    }
                };
                Ok(Expr::Var(var))
            }
            Some(_) => self.err(RankProblem::Operand),
            None => self.err(RankProblem::End),
        }
    }
}

impl Rank {
    /// Parses a rank expression.
    ///
    /// # Errors
    /// Where and why it does not parse.
    pub fn parse(src: &str) -> Result<Rank, ScheduleError> {
        let mut p = Parser {
            s: src.as_bytes(),
            pos: 0,
        };
        let e = p.compare()?;
        p.ws();
        if p.pos != src.len() {
            return p.err(RankProblem::Trailing);
        }
        Ok(Rank(e))
    }

    /// The default rank: free vertex slots, then free memory.
    pub fn default_rank() -> Rank {
        Rank(Expr::Bin(
            Op::Add,
            Box::new(Expr::Bin(
                Op::Mul,
                Box::new(Expr::Var(Var::FreeSlots)),
                Box::new(Expr::Num(1e6)),
            )),
            Box::new(Expr::Var(Var::FreeMemory)),
        ))
    }

    /// The rank of node `n`.
    pub fn eval(&self, n: &Candidate) -> f64 {
        fn go(e: &Expr, n: &Candidate) -> f64 {
            let b = |x: bool| if x { 1.0 } else { 0.0 };
            match e {
                Expr::Num(x) => *x,
                Expr::Var(v) => match v {
                    Var::Cpus => f64::from(n.cpus),
                    Var::Memory => (n.memory_bytes >> 20) as f64,
                    Var::FreeMemory => (n.free_memory_bytes >> 20) as f64,
                    Var::Load => n.load,
                    Var::Slots => f64::from(n.slots),
                    Var::FreeSlots => f64::from(n.free_slots),
                },
                Expr::Neg(x) => -go(x, n),
                Expr::Bin(op, l, r) => {
                    let (l, r) = (go(l, n), go(r, n));
                    match op {
                        Op::Add => l + r,
                        Op::Sub => l - r,
                        Op::Mul => l * r,
                        Op::Div if r == 0.0 => 0.0,
                        Op::Div => l / r,
                        Op::Lt => b(l < r),
                        Op::Le => b(l <= r),
                        Op::Gt => b(l > r),
                        Op::Ge => b(l >= r),
                        Op::Eq => b(l == r),
                        Op::Ne => b(l != r),
                    }
                }
            }
        }
        let x = go(&self.0, n);
        if x.is_nan() { f64::NEG_INFINITY } else { x }
    }

    /// `nodes` (indices into `all`) ordered best first; ties keep their order.
    pub fn order(&self, all: &[Candidate], mut nodes: Vec<usize>) -> Vec<usize> {
        nodes.sort_by(|&a, &b| self.eval(&all[b]).total_cmp(&self.eval(&all[a])));
        nodes
    }
}

/// A graph to place: `vertices` vertices and weighted edges between them.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Vertex count.
    pub vertices: usize,
    /// `(from, to, weight)`.
    pub edges: Vec<(usize, usize, u64)>,
}

/// Splits `g` over nodes with `capacity[i]` free slots each (ranked best first), using at most
/// `max_parts` of them: parts as even as the capacities allow, and a small cut. Returns the
/// node (index into `capacity`) of every vertex.
///
/// Parts are grown breadth-first from a seed, always taking the unplaced vertex most strongly
/// tied to the part, then refined by moving single vertices to the part they are most tied to
/// while the cut shrinks and no part grows over its bound.
///
/// # Errors
/// The capacities cannot hold every vertex.
pub fn place(g: &Graph, capacity: &[u32], max_parts: usize) -> Result<Vec<usize>, ScheduleError> {
    let n = g.vertices;
    let total: u64 = capacity.iter().map(|&c| u64::from(c)).sum();
    if (n as u64) > total {
        return Err(ScheduleError::TooFewSlots {
            vertices: n,
            slots: total,
            nodes: capacity.len(),
        });
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    // How many nodes: as many as allowed and useful, then drop any a fair share would not fit.
    let k = capacity.len().min(max_parts.max(1)).min(n);
    let used: Vec<usize> = (0..k).collect();
    let cap_sum: u64 = used.iter().map(|&i| u64::from(capacity[i])).sum();
    if (n as u64) > cap_sum {
        return Err(ScheduleError::TooFewSlotsOnBest {
            vertices: n,
            slots: cap_sum,
            nodes: k,
        });
    }
    // Targets: an even share, bounded by capacity, the rest spread over nodes with room.
    let mut target: Vec<usize> = used
        .iter()
        .map(|&i| (n / k).min(capacity[i] as usize))
        .collect();
    let mut left = n - target.iter().sum::<usize>();
    while left > 0 {
        let mut moved = false;
        for (t, &i) in target.iter_mut().zip(&used) {
            if left > 0 && *t < capacity[i] as usize {
                *t += 1;
                left -= 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let mut adj: Vec<Vec<(usize, u64)>> = vec![Vec::new(); n];
    for &(a, b, w) in &g.edges {
        if a != b && a < n && b < n {
            adj[a].push((b, w));
            adj[b].push((a, w));
        }
    }
    const NONE: usize = usize::MAX;
    let mut part = vec![NONE; n];
    let mut next_seed = 0;
    for (p, &want) in target.iter().enumerate() {
        // Gain of each unplaced vertex: its edge weight into part p.
        let mut tie = vec![0u64; n];
        let mut frontier = VecDeque::new();
        let mut size = 0;
        while size < want {
            // Take the frontier vertex most tied to the part; else a new seed.
            let best = frontier
                .iter()
                .copied()
                .filter(|&v| part[v] == NONE)
                .max_by_key(|&v| (tie[v], std::cmp::Reverse(v)));
            let v = match best {
                Some(v) => v,
                None => {
                    while next_seed < n && part[next_seed] != NONE {
                        next_seed += 1;
                    }
                    if next_seed == n {
                        break;
                    }
                    next_seed
                }
            };
            frontier.retain(|&u| u != v && part[u] == NONE);
            part[v] = p;
            size += 1;
            for &(u, w) in &adj[v] {
                if part[u] == NONE {
                    if tie[u] == 0 {
                        frontier.push_back(u);
                    }
                    tie[u] += w;
                }
            }
        }
    }
    // Refinement: move a vertex to the part it is most tied to when that lowers the cut and
    // both parts stay within a tenth of their targets (and capacity); a few passes.
    let bound: Vec<usize> = target
        .iter()
        .zip(&used)
        .map(|(&t, &i)| (t + t / 10).min(capacity[i] as usize))
        .collect();
    // Parts never empty out: a job spread over k nodes keeps k parts.
    let floor: Vec<usize> = target.iter().map(|&t| (t - t / 10).max(1)).collect();
    let mut sizes = vec![0usize; k];
    for &p in &part {
        sizes[p] += 1;
    }
    for _ in 0..4 {
        let mut improved = false;
        for v in 0..n {
            let mut w = vec![0u64; k];
            for &(u, x) in &adj[v] {
                w[part[u]] += x;
            }
            let here = part[v];
            let (best, &bw) = w
                .iter()
                .enumerate()
                .max_by_key(|(p, x)| (**x, *p == here))
                .unwrap_or((here, &0));
            if best != here
                && bw > w[here]
                && sizes[best] < bound[best]
                && sizes[here] > floor[here]
            {
                part[v] = best;
                sizes[best] += 1;
                sizes[here] -= 1;
                improved = true;
            }
        }
        if !improved {
            break;
        }
    }
    Ok(part.into_iter().map(|p| used[p]).collect())
}

/// The total weight of edges whose ends are on different nodes.
pub fn cut(g: &Graph, placement: &[usize]) -> u64 {
    g.edges
        .iter()
        .filter(|(a, b, _)| placement[*a] != placement[*b])
        .map(|(_, _, w)| w)
        .sum()
}

#[cfg(test)]
mod tests;
