//! A market of bidding agents on the real auctioneers: `hosts` hosts, each with its
//! [`Auctioneer`], and `users` users, each spreading an equal budget over them by
//! [`best_response`](super::agent::best_response) to the prices the auctioneers give.
//!
//! User `i` values host `j` at `w_ij`, drawn uniform in (0, 1] from a seeded generator and
//! normalized so that each user values all hosts at 1 in sum (Zhang's balanced game: equal
//! budgets and equal total valuations; a best response does not change when a user's weights
//! are scaled, only the efficiency's sum over users does). Its utility is
//! `u_i = Σ_j w_ij s_ij`, `s_ij` its share of host `j` as the auctioneer gives it.
//!
//! Every bid goes through [`Auctioneer::bid`] (the part named after the user, the rate in
//! whole micro-credits, rounded so that a user's bids sum to its budget exactly; a bid of 0
//! is removed with [`Auctioneer::end`]); the price a user sees on a host is
//! [`Auctioneer::price`] less its own bid, with 1 micro-credit (the smallest bid taken) as
//! the floor of a host nobody else bids on; the shares are [`Auctioneer::shares`].
//!
//! The dynamics: every user spreads its budget equally over the hosts (uniform bidding, also
//! measured), then in rounds each user in turn bids its best response to the prices of the
//! moment, until in a round every user's best response was within [`CONVERGED`] of its
//! budget of its bids (an equilibrium, to that precision), or [`MAX_ROUNDS`] rounds. Best
//! responses can overshoot and cycle (with two users, typically), so the users move only a
//! fraction of the way from their bids to their best responses: 1 at first, halved (down to
//! [`MIN_STEP`]) after a round whose largest distance grew, and a quarter larger (up to 1)
//! after one where it shrank; a fixed point is still an equilibrium. Deterministic given the seed.
//!
//! Measured: the efficiency `Σ_i u_i / OPT`, with `OPT = Σ_j max_i w_ij` (each host to the user
//! who values it most), and the envy `min_{i≠k} u_i(s_i) / u_i(s_k)` (1: nobody would rather
//! have another's shares). Zhang ("The efficiency and fairness of a fixed budget resource
//! allocation game", ICALP 2005) shows, at equilibrium: efficiency at least 3/4 with one
//! resource or two players (linear utilities), Θ(1/√m) in general for m players; envy at
//! least 2√2 − 2 ≈ 0.828.

use super::agent::{Host, ResponseError, best_response};
use super::{Auctioneer, Bid, BidError, MAX_RATE};

/// A round in which every user's best response was within this fraction of its budget of its
/// bids, on every host, ends the dynamics.
pub const CONVERGED: f64 = 1e-4;

/// The least fraction of the way to its best response a user moves in a round.
pub const MIN_STEP: f64 = 1.0 / 256.0;

/// The most rounds of best responses.
pub const MAX_ROUNDS: u32 = 500;

/// The smallest price a user sees on a host, micro-credits per second: the smallest bid the
/// auctioneer takes.
pub const FLOOR: f64 = 1.0;

/// Zhang's bound on the efficiency at equilibrium with one host, or with two users.
pub const EFFICIENCY_BOUND: f64 = 0.75;

/// Zhang's bound on the envy at equilibrium (2√2 − 2).
pub const ENVY_BOUND: f64 = 0.828_427_124_746_190_1;

/// A market to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Hosts, each with its auctioneer (at least 1).
    pub hosts: usize,
    /// Users (at least 1).
    pub users: usize,
    /// Each user's budget, micro-credits per second (1 to [`MAX_RATE`]).
    pub budget: u64,
    /// The seed of the users' weights.
    pub seed: u64,
}

impl Default for Setting {
    /// 100 hosts and 40 users of 1 credit per second each, seed 1.
    fn default() -> Self {
        Setting {
            hosts: 100,
            users: 40,
            budget: crate::proto::MICRO,
            seed: 1,
        }
    }
}

/// Why a market is not simulated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// No hosts or no users.
    #[error("a market has at least 1 host and 1 user, not {hosts} hosts and {users} users")]
    Size {
        /// Hosts asked for.
        hosts: usize,
        /// Users asked for.
        users: usize,
    },
    /// A budget of 0 or over [`MAX_RATE`].
    #[error("a budget is from 1 micro-credit to 10^6 credits a second, not {0} micro-credits")]
    Budget(u64),
    /// An auctioneer refused a bid (not expected: every bid is within the budget).
    #[error("a bid: {0}")]
    Bid(#[from] BidError),
    /// The agent gave no best response (not expected: every input is finite).
    #[error("a best response: {0}")]
    Response(#[from] ResponseError),
}

/// The worst envy: user `user` would value user `of`'s shares `1 / ratio` times its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Envy {
    /// `u_user(own shares) / u_user(of's shares)`, the least over every pair (1 with one
    /// user, or when nobody values another's shares).
    pub ratio: f64,
    /// The envious user (none when there is no pair).
    pub user: Option<usize>,
    /// The user envied.
    pub of: Option<usize>,
}

/// What an allocation is worth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// `Σ_i u_i / OPT`.
    pub efficiency: f64,
    /// `Σ_i u_i`.
    pub welfare: f64,
    /// `OPT = Σ_j max_i w_ij`.
    pub optimum: f64,
    /// The worst envy.
    pub envy: Envy,
}

/// One market simulated.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The market.
    pub setting: Setting,
    /// Every user spreading its budget equally over the hosts.
    pub uniform: Outcome,
    /// The last round of best responses (the equilibrium when converged).
    pub agent: Outcome,
    /// Rounds of best responses run.
    pub rounds: u32,
    /// Whether, in the last round, every user's bids were within [`CONVERGED`] of its budget of
    /// its best response (an equilibrium, to that precision).
    pub converged: bool,
    /// The largest distance of a bid from its user's best response in the last round, as a
    /// fraction of the user's budget.
    pub last_change: f64,
    /// The fraction of the way from its bids to its best response each user moved in the last
    /// round (1: the best response itself).
    pub step: f64,
    /// Each user's bids summed at the end, micro-credits per second.
    pub spent: Vec<u64>,
    /// Hosts each user bids on at the end, on average.
    pub hosts_per_user: f64,
}

/// Simulates the market `setting`.
///
/// # Errors
/// No hosts or users, or a budget of 0 or over [`MAX_RATE`].
pub fn run(setting: &Setting) -> Result<Report, SimError> {
    let Setting {
        hosts,
        users,
        budget,
        seed,
    } = *setting;
    if hosts == 0 || users == 0 {
        return Err(SimError::Size { hosts, users });
    }
    if budget == 0 || budget > MAX_RATE {
        return Err(SimError::Budget(budget));
    }
    let weights = weights(hosts, users, seed);
    let mut m = Market::new(hosts, users);

    let even = round_to(budget, &vec![1.0; hosts]);
    for i in 0..users {
        m.place(i, &even)?;
    }
    let uniform = m.outcome(&weights);

    let mut rounds = 0;
    let mut last_change = f64::INFINITY;
    let mut converged = false;
    let mut step = 1.0;
    let mut view = vec![
        Host {
            weight: 0.0,
            price: 0.0,
        };
        hosts
    ];
    let mut target = vec![0.0; hosts];
    while rounds < MAX_ROUNDS && !converged {
        rounds += 1;
        let mut change = 0.0f64;
        for (i, w) in weights.iter().enumerate() {
            for (j, h) in view.iter_mut().enumerate() {
                *h = Host {
                    weight: w[j],
                    price: m.auctions[j].price().saturating_sub(m.bids[i][j]) as f64,
                };
            }
            let best = best_response(budget as f64, &view, FLOOR)?;
            for ((t, b), &old) in target.iter_mut().zip(&best).zip(&m.bids[i]) {
                change = change.max((b - old as f64).abs());
                *t = old as f64 + step * (b - old as f64);
            }
            let bids = round_to(budget, &target);
            m.place(i, &bids)?;
        }
        let change = change / budget as f64;
        converged = change < CONVERGED;
        step = if change > last_change {
            (step / 2.0).max(MIN_STEP)
        } else {
            (step * 1.25).min(1.0)
        };
        last_change = change;
    }
    let agent = m.outcome(&weights);
    let spent = m
        .bids
        .iter()
        .map(|b| b.iter().copied().fold(0, u64::saturating_add))
        .collect();
    let bid_on = m.bids.iter().flatten().filter(|&&b| b > 0).count();
    Ok(Report {
        setting: *setting,
        uniform,
        agent,
        rounds,
        converged,
        last_change,
        step,
        spent,
        hosts_per_user: bid_on as f64 / users as f64,
    })
}

/// The hosts' auctioneers, and each user's bids as placed on them.
struct Market {
    auctions: Vec<Auctioneer>,
    /// `bids[i][j]`: user `i`'s rate on host `j`, micro-credits per second (0: none).
    bids: Vec<Vec<u64>>,
    /// Each user's part name on every host.
    parts: Vec<String>,
    /// Each user's account.
    payers: Vec<String>,
}

impl Market {
    fn new(hosts: usize, users: usize) -> Self {
        Market {
            auctions: (0..hosts).map(|_| Auctioneer::default()).collect(),
            bids: vec![vec![0; hosts]; users],
            parts: (0..users).map(|i| format!("u{i}")).collect(),
            payers: (0..users).map(|i| format!("user:u{i}@sim")).collect(),
        }
    }

    /// User `i` bids `rates` (one per host; 0: no bid); the largest change of a bid.
    fn place(&mut self, i: usize, rates: &[u64]) -> Result<u64, BidError> {
        let mut moved = 0;
        for (j, &rate) in rates.iter().enumerate() {
            let old = self.bids[i][j];
            if rate == old {
                continue;
            }
            if rate == 0 {
                self.auctions[j].end(&self.parts[i]);
            } else {
                let bid = Bid {
                    payer: self.payers[i].clone(),
                    rate,
                };
                self.auctions[j].bid(&self.parts[i], bid)?;
            }
            self.bids[i][j] = rate;
            moved = moved.max(rate.abs_diff(old));
        }
        Ok(moved)
    }

    /// The shares the auctioneers give, and what they are worth to the users valuing the
    /// hosts at `weights`.
    fn outcome(&self, weights: &[Vec<f64>]) -> Outcome {
        let users = self.bids.len();
        // shares[i][j]: user i's share of host j.
        let mut shares = vec![vec![0.0; self.auctions.len()]; users];
        for (j, a) in self.auctions.iter().enumerate() {
            for (part, share) in a.shares() {
                let user = part.strip_prefix('u').and_then(|n| n.parse::<usize>().ok());
                if let Some(row) = user.and_then(|i| shares.get_mut(i)) {
                    row[j] = share;
                }
            }
        }
        let value = |i: usize, k: usize| -> f64 {
            weights[i].iter().zip(&shares[k]).map(|(w, s)| w * s).sum()
        };
        let welfare: f64 = (0..users).map(|i| value(i, i)).sum();
        let optimum: f64 = (0..self.auctions.len())
            .map(|j| weights.iter().map(|w| w[j]).fold(0.0, f64::max))
            .sum();
        let mut envy = Envy {
            ratio: 1.0,
            user: None,
            of: None,
        };
        for i in 0..users {
            let own = value(i, i);
            for k in (0..users).filter(|&k| k != i) {
                let other = value(i, k);
                if other > 0.0 && (envy.user.is_none() || own / other < envy.ratio) {
                    envy = Envy {
                        ratio: own / other,
                        user: Some(i),
                        of: Some(k),
                    };
                }
            }
        }
        Outcome {
            efficiency: if optimum > 0.0 {
                welfare / optimum
            } else {
                0.0
            },
            welfare,
            optimum,
            envy,
        }
    }
}

/// `weights[i][j]`: user `i`'s value of host `j`, uniform in (0, 1] from `seed` and
/// normalized to sum 1 over the hosts.
fn weights(hosts: usize, users: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut state = seed;
    (0..users)
        .map(|_| {
            let raw: Vec<f64> = (0..hosts)
                .map(|_| ((splitmix(&mut state) >> 11) + 1) as f64 / (1u64 << 53) as f64)
                .collect();
            let sum: f64 = raw.iter().sum();
            raw.iter().map(|w| w / sum).collect()
        })
        .collect()
}

/// SplitMix64's next number.
pub(super) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `x` (at least 0) in proportion, as whole units summing to exactly `total` (the largest
/// remainders rounded up); all 0 when `x` sums to 0.
fn round_to(total: u64, x: &[f64]) -> Vec<u64> {
    let sum: f64 = x.iter().filter(|v| v.is_finite() && **v > 0.0).sum();
    if x.is_empty() || sum <= 0.0 {
        return vec![0; x.len()];
    }
    let exact: Vec<f64> = x
        .iter()
        .map(|&v| {
            if v.is_finite() && v > 0.0 {
                v / sum * total as f64
            } else {
                0.0
            }
        })
        .collect();
    let mut out: Vec<u64> = exact.iter().map(|v| v.floor() as u64).collect();
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let mut placed = out.iter().copied().fold(0, u64::saturating_add);
    // Up to the total by the largest remainders (each unit to a host with a share of it).
    for &j in order.iter().cycle().take(x.len().saturating_mul(2)) {
        if placed >= total {
            break;
        }
        if exact[j] > 0.0 {
            out[j] += 1;
            placed += 1;
        }
    }
    // Down to it from the largest, should the floating sums have overshot.
    while placed > total {
        let Some(top) = (0..out.len()).max_by_key(|&j| out[j]) else {
            break;
        };
        let cut = (placed - total).min(out[top]);
        out[top] -= cut;
        placed -= cut;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_equilibrium_beats_uniform_bidding_within_zhangs_bounds() {
        let setting = Setting {
            hosts: 20,
            users: 8,
            budget: crate::proto::MICRO,
            seed: 42,
        };
        let r = run(&setting).unwrap();
        let one_host = run(&Setting {
            hosts: 1,
            ..setting
        })
        .unwrap();
        let two_users = run(&Setting {
            users: 2,
            ..setting
        })
        .unwrap();
        assert!(r.converged, "{r:?}");
        assert!(r.agent.efficiency >= r.uniform.efficiency, "{r:?}");
        assert!(r.agent.envy.ratio >= ENVY_BOUND - 0.01, "{r:?}");
        // Equal budgets, uniform bids: equal shares, nobody envies anybody.
        assert!((r.uniform.envy.ratio - 1.0).abs() < 1e-9, "{r:?}");
        assert!(r.agent.efficiency <= 1.0 + 1e-9 && r.uniform.efficiency > 0.0);
        assert_eq!(r.spent, vec![setting.budget; setting.users]);

        for r in [&one_host, &two_users] {
            assert!(r.converged, "{r:?}");
            assert!(r.agent.efficiency >= EFFICIENCY_BOUND - 0.01, "{r:?}");
            assert_eq!(r.spent, vec![setting.budget; r.setting.users]);
        }
        // Deterministic given the seed.
        assert_eq!(run(&setting).unwrap(), r);
    }

    #[test]
    fn bad_settings_are_refused() {
        let ok = Setting::default();
        assert!(matches!(
            run(&Setting { hosts: 0, ..ok }),
            Err(SimError::Size { .. })
        ));
        assert!(matches!(
            run(&Setting { users: 0, ..ok }),
            Err(SimError::Size { .. })
        ));
        assert!(matches!(
            run(&Setting { budget: 0, ..ok }),
            Err(SimError::Budget(0))
        ));
        assert!(matches!(
            run(&Setting {
                budget: MAX_RATE + 1,
                ..ok
            }),
            Err(SimError::Budget(_))
        ));
    }

    #[test]
    fn a_single_user_takes_every_host() {
        let r = run(&Setting {
            hosts: 5,
            users: 1,
            budget: 1000,
            seed: 3,
        })
        .unwrap();
        assert!((r.agent.efficiency - 1.0).abs() < 1e-12, "{r:?}");
        assert_eq!(r.agent.envy.user, None);
        assert_eq!(r.spent, vec![1000]);
    }

    #[test]
    fn rounding_keeps_the_total() {
        assert_eq!(round_to(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(round_to(7, &[0.0, 2.0, f64::NAN, 1.0]), vec![0, 5, 0, 2]);
        assert_eq!(round_to(5, &[0.0, 0.0]), vec![0, 0]);
        assert_eq!(round_to(5, &[]), Vec::<u64>::new());
        let x = [0.1, 0.2, 0.3, 1e-9, 0.4];
        assert_eq!(round_to(1_000_001, &x).iter().sum::<u64>(), 1_000_001);
    }
}
