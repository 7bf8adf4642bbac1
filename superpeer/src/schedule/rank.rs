//! Rank expressions (GridWay's `RANK`): arithmetic and comparisons over a node's properties,
//! parsed once per job and evaluated per candidate node.

use super::{Candidate, ScheduleError};

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
