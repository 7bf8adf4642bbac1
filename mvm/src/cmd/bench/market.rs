//! `mvm bench market`: the market's bidding agents on the real auctioneers (one per host), at
//! their equilibrium and bidding uniformly, beside Zhang's bounds (ICALP 2005); see
//! `mvm_superpeer::market::sim`.

use std::time::Instant;

use mvm_superpeer::market::sim::{self, EFFICIENCY_BOUND, ENVY_BOUND, Envy, Setting};
use serde::Serialize;

use crate::exit::Failure;

/// The most `hosts × users`: the simulation holds a few numbers per pair, and a round costs
/// about `users² × hosts`.
const MAX_PAIRS: u64 = 1_000_000;

/// What `mvm bench market` reports.
#[derive(Debug, Serialize)]
pub(crate) struct MarketReport {
    hosts: usize,
    users: usize,
    seed: u64,
    /// Each user's budget, credits per second.
    budget_credits: f64,
    efficiency: Efficiency,
    envy: EnvyReport,
    /// Rounds of best responses to the equilibrium.
    rounds: u32,
    /// Whether every user's bids ended within 10^-4 of its budget of its best response.
    converged: bool,
    /// The largest distance of a bid from its best response in the last round, as a fraction
    /// of the budget.
    last_change: f64,
    /// Hosts each user bids on at the equilibrium, on average.
    hosts_per_user: f64,
    /// Seconds of the main setting's simulation.
    seconds: f64,
}

/// `Σ_i u_i / OPT`.
#[derive(Debug, Serialize)]
struct Efficiency {
    agent: f64,
    uniform: f64,
    /// One host, the same users.
    one_host: Small,
    /// The same hosts, two users.
    two_users: Small,
    bounds: Bounds,
}

/// A small setting, where Zhang's 3/4 applies.
#[derive(Debug, Serialize)]
struct Small {
    hosts: usize,
    users: usize,
    agent: f64,
    uniform: f64,
    rounds: u32,
    converged: bool,
}

/// Zhang's bounds on the efficiency at equilibrium.
#[derive(Debug, Serialize)]
struct Bounds {
    /// With one host, or two users.
    one_host_or_two_users: f64,
    /// With m users in general.
    m_users: &'static str,
    /// 1/√m for this many users (the order, not a bound with its constant).
    inv_sqrt_m: f64,
}

/// `min_{i≠k} u_i(own shares) / u_i(k's shares)`.
#[derive(Debug, Serialize)]
struct EnvyReport {
    agent: f64,
    uniform: f64,
    /// The pairs where the least is reached.
    worst: Worst,
    /// Zhang's bound at equilibrium (2√2 − 2).
    bound: f64,
}

#[derive(Debug, Serialize)]
struct Worst {
    agent: Pair,
    uniform: Pair,
}

/// User `user` envies user `of` the most (none with one user).
#[derive(Debug, Serialize)]
struct Pair {
    user: Option<usize>,
    of: Option<usize>,
}

impl From<Envy> for Pair {
    fn from(e: Envy) -> Self {
        Pair {
            user: e.user,
            of: e.of,
        }
    }
}

/// Simulates `hosts × users` from `seed`, and the small settings beside.
pub(crate) fn run(hosts: u32, users: u32, seed: u64) -> Result<MarketReport, Failure> {
    if !(1..=10_000).contains(&hosts) || !(1..=10_000).contains(&users) {
        return Err(Failure::input(anyhow::anyhow!(
            "bench market: --hosts and --users are from 1 to 10000, not {hosts} and {users}"
        )));
    }
    if u64::from(hosts) * u64::from(users) > MAX_PAIRS {
        return Err(Failure::input(anyhow::anyhow!(
            "bench market: --hosts × --users is at most {MAX_PAIRS}, not {}",
            u64::from(hosts) * u64::from(users)
        )));
    }
    let setting = Setting {
        hosts: hosts as usize,
        users: users as usize,
        seed,
        ..Setting::default()
    };
    let simulate = |s: &Setting| {
        sim::run(s).map_err(|e| Failure::failed(anyhow::anyhow!("bench market: {e}")))
    };
    let t = Instant::now();
    let main = simulate(&setting)?;
    let seconds = t.elapsed().as_secs_f64();
    let small = |s: Setting| -> Result<Small, Failure> {
        let r = simulate(&s)?;
        Ok(Small {
            hosts: s.hosts,
            users: s.users,
            agent: r.agent.efficiency,
            uniform: r.uniform.efficiency,
            rounds: r.rounds,
            converged: r.converged,
        })
    };
    let one_host = small(Setting {
        hosts: 1,
        ..setting
    })?;
    let two_users = small(Setting {
        users: 2,
        ..setting
    })?;
    Ok(MarketReport {
        hosts: setting.hosts,
        users: setting.users,
        seed,
        budget_credits: setting.budget as f64 / mvm_superpeer::proto::MICRO as f64,
        efficiency: Efficiency {
            agent: main.agent.efficiency,
            uniform: main.uniform.efficiency,
            one_host,
            two_users,
            bounds: Bounds {
                one_host_or_two_users: EFFICIENCY_BOUND,
                m_users: "Θ(1/√m)",
                inv_sqrt_m: 1.0 / f64::from(users).sqrt(),
            },
        },
        envy: EnvyReport {
            agent: main.agent.envy.ratio,
            uniform: main.uniform.envy.ratio,
            worst: Worst {
                agent: main.agent.envy.into(),
                uniform: main.uniform.envy.into(),
            },
            bound: ENVY_BOUND,
        },
        rounds: main.rounds,
        converged: main.converged,
        last_change: main.last_change,
        hosts_per_user: main.hosts_per_user,
        seconds,
    })
}

/// The report for people.
pub(crate) fn text(r: &MarketReport) -> String {
    let pair = |p: &Pair| match (p.user, p.of) {
        (Some(u), Some(o)) => format!("user {u} of user {o}"),
        _ => "no pair".to_owned(),
    };
    let small = |s: &Small| {
        format!(
            "  efficiency, {:<15}  {:>7.3}  {:>7.3}  >= {} (one host or two users){}\n",
            format!("{} x {}", s.hosts, s.users),
            s.agent,
            s.uniform,
            r.efficiency.bounds.one_host_or_two_users,
            if s.converged { "" } else { "; not converged" }
        )
    };
    format!(
        "market of {} hosts x {} users (seed {}, budgets {} credit/s each): equilibrium after {} \
         rounds ({}), {:.2} s; {:.1} hosts bid on per user\n  \
         {:<27}  {:>7}  {:>7}  Zhang (ICALP 2005), at equilibrium\n  \
         {:<27}  {:>7.3}  {:>7.3}  Θ(1/√m) for m users (1/√m = {:.3})\n\
         {}{}  \
         {:<27}  {:>7.3}  {:>7.3}  >= {:.3}; worst: {} (agent), {} (uniform)",
        r.hosts,
        r.users,
        r.seed,
        r.budget_credits,
        r.rounds,
        if r.converged {
            "converged"
        } else {
            "NOT converged"
        },
        r.seconds,
        r.hosts_per_user,
        "",
        "agent",
        "uniform",
        "efficiency",
        r.efficiency.agent,
        r.efficiency.uniform,
        r.efficiency.bounds.inv_sqrt_m,
        small(&r.efficiency.one_host),
        small(&r.efficiency.two_users),
        "envy",
        r.envy.agent,
        r.envy.uniform,
        r.envy.bound,
        pair(&r.envy.worst.agent),
        pair(&r.envy.worst.uniform),
    )
}
