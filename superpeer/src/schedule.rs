//! Scheduling: which nodes may run a job, how they rank, and where each vertex goes.
//!
//! A pure decision (GridWay's requirement-and-rank, `003_*` section 4.1, then graph
//! partitioning): [`filter`] keeps the nodes that meet the requirements and says why each other
//! one was left out, [`Rank`] orders them by an expression over node properties, and [`place`]
//! splits the topology into balanced parts that cut as little channel weight as possible, each
//! within its node's free slots.

use std::collections::VecDeque;

use crate::proto::Requirements;

mod rank;

pub use rank::{RANK_PROPERTIES, Rank, RankProblem};

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
    /// The least bid its market takes, micro-credits per CPU-second (its domain's
    /// `floor_price`; 0: none).
    pub floor: u64,
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
            req.bid.filter(|&b| b < n.floor).map(|b| {
                format!(
                    "takes bids of at least {} credits a CPU-second, the job bids {}",
                    crate::proto::format_credits(n.floor),
                    crate::proto::format_credits(b)
                )
            })
        };
        match reason {
            None => ok.push(i),
            Some(r) => why.push(format!("node {}: {r}", n.name)),
        }
    }
    (ok, why)
}

/// How a group chooses among the nodes that meet a job's requirements: its domain's
/// scheduling policy (named by the policy's `scheduling(metrics, POLICY)` rules, and switched
/// by them as the group's metrics change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// The job's own rank (its profile's `rank`, or the default: free slots, then free
    /// memory) orders the nodes; the job spreads over as many as it may use.
    #[default]
    Rank,
    /// The nodes with the most free slots first, as many as the job may use: vertices spread
    /// evenly, nodes fill alike.
    Spread,
    /// The fewest nodes that hold the job, the fullest that fit first: busy nodes fill up,
    /// and whole nodes stay free for large jobs (or to be let go).
    Pack,
    /// The nodes with the lowest load first (from their heartbeats), as many as the job may
    /// use.
    LeastLoaded,
}

/// The names of the scheduling policies.
pub const POLICIES: &str = "rank, spread, pack, least-loaded";

impl Policy {
    /// Its name in policies.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Rank => "rank",
            Policy::Spread => "spread",
            Policy::Pack => "pack",
            Policy::LeastLoaded => "least-loaded",
        }
    }

    /// The order to offer `ok` (indices into `all`) to [`place`] in, and how many of them
    /// the job's `vertices` may be spread over (at most `max_nodes`). Ties keep `rank`'s
    /// order.
    pub fn arrange(
        self,
        rank: &Rank,
        all: &[Candidate],
        ok: Vec<usize>,
        vertices: usize,
        max_nodes: usize,
    ) -> (Vec<usize>, usize) {
        let mut order = rank.order(all, ok);
        match self {
            Policy::Rank => {}
            Policy::Spread => {
                order.sort_by_key(|&i| std::cmp::Reverse(all[i].free_slots));
            }
            Policy::LeastLoaded => {
                order.sort_by(|&a, &b| all[a].load.total_cmp(&all[b].load));
            }
            Policy::Pack => {
                // Greedy: while no single node holds what is left, the roomiest takes what
                // it can (the fewest nodes); then the node with the least room that holds
                // the rest (best fit).
                let mut left = vertices;
                let mut rest = order.clone();
                let mut chosen = Vec::new();
                while left > 0 && !rest.is_empty() && chosen.len() < max_nodes {
                    let fits = rest
                        .iter()
                        .enumerate()
                        .filter(|(_, i)| all[**i].free_slots as usize >= left)
                        .min_by_key(|(_, i)| all[**i].free_slots);
                    let at = match fits {
                        Some((at, _)) => at,
                        None => rest
                            .iter()
                            .enumerate()
                            .max_by_key(|(_, i)| all[**i].free_slots)
                            .map_or(0, |(at, _)| at),
                    };
                    let i = rest.remove(at);
                    left = left.saturating_sub(all[i].free_slots as usize);
                    chosen.push(i);
                }
                if left > 0 {
                    // Does not fit: as the others, so that `place` says why.
                    return (order, max_nodes);
                }
                let used = chosen.len();
                chosen.extend(rest);
                return (chosen, used.max(1));
            }
        }
        (order, max_nodes)
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Policy, String> {
        Ok(match s {
            "rank" => Policy::Rank,
            "spread" => Policy::Spread,
            "pack" => Policy::Pack,
            "least-loaded" => Policy::LeastLoaded,
            other => {
                return Err(format!(
                    "no scheduling policy named '{other}' (known: {POLICIES})"
                ));
            }
        })
    }
}

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
