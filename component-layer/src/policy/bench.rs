//! `mvm bench policy`: how long one decision takes, from oso and from the cache.

use std::time::Instant;

use super::{
    ACTIONS, Bundle, BundleError, Cached, Domain, Engine, Image, Job, Node, OsoEngine, Principal,
    PrincipalKind, Question, Resource,
};

/// Latency of one decision, and decisions per second.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Decisions per second, one thread.
    pub per_sec: f64,
}

/// The benchmark's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Distinct questions asked (every role, action and resource kind over the bundle's
    /// domains and one foreign domain).
    pub questions: usize,
    /// How many of them are allowed.
    pub allowed: usize,
    /// oso itself, every question answered afresh.
    pub oso: Figures,
    /// Through the decision cache of one policy version (every question asked before).
    pub cached: Figures,
    /// Decisions per second through the cache from 2 threads at once.
    pub cached_per_sec_2_threads: f64,
    /// The goal for the cached p50, microseconds.
    pub goal_p50_us: f64,
}

/// The questions: users of each role in each domain (and a stranger's), nodes, every action,
/// over jobs, images, nodes and domains of each domain.
pub fn questions(bundle: &Bundle) -> Vec<Question> {
    let mut domains = bundle.domains();
    domains.push("elsewhere".into());
    let mut actors = Vec::new();
    for d in &domains {
        for roles in [vec!["member"], vec!["researcher"], vec!["admin"]] {
            actors.push(Principal {
                kind: PrincipalKind::User,
                name: format!("{}-{d}", roles[0]),
                domain: d.clone(),
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            });
        }
        actors.push(Principal {
            kind: PrincipalKind::Node,
            name: format!("sp-{d}"),
            domain: d.clone(),
            roles: vec!["superpeer".into()],
        });
    }
    let mut out = Vec::new();
    for a in &actors {
        for d in &domains {
            let resources = [
                Resource::Job(Job {
                    name: "ring".into(),
                    owner: a.name.clone(),
                    owner_domain: a.domain.clone(),
                    domain: d.clone(),
                    vcpus: 2,
                    memory_mib: 512,
                    vertices: 16,
                    image: "host".into(),
                    user_vcpus: 2,
                    user_memory_mib: 512,
                    user_vertices: 16,
                }),
                Resource::Image(Image {
                    id: "debian:12".into(),
                    domain: d.clone(),
                }),
                Resource::Node(Node {
                    name: "n1".into(),
                    domain: d.clone(),
                    roles: Vec::new(),
                    group: "g".into(),
                }),
                Resource::Domain(Domain::named(d)),
            ];
            for r in resources {
                for action in ACTIONS {
                    out.push(Question {
                        actor: a.clone(),
                        action: action.into(),
                        resource: r.clone(),
                    });
                }
            }
        }
    }
    out
}

fn figures(mut ns: Vec<u64>, total_secs: f64) -> Figures {
    ns.sort_unstable();
    let at = |q: f64| {
        let i = ((ns.len() as f64 - 1.0) * q).round() as usize;
        ns.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    Figures {
        p50_us: at(0.5),
        p99_us: at(0.99),
        per_sec: ns.len() as f64 / total_secs.max(1e-9),
    }
}

fn time(engine: &dyn Engine, qs: &[Question], rounds: usize) -> Figures {
    let mut ns = Vec::with_capacity(qs.len() * rounds);
    let start = Instant::now();
    for _ in 0..rounds {
        for q in qs {
            let t = Instant::now();
            std::hint::black_box(engine.decide(q));
            ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    figures(ns, start.elapsed().as_secs_f64())
}

/// Runs the benchmark on `bundle`: `rounds` passes over the questions through oso, and 50
/// times as many through the cache.
///
/// # Errors
/// The bundle does not load.
pub fn run(bundle: &Bundle, rounds: usize) -> Result<Report, BundleError> {
    let qs = questions(bundle);
    let oso = OsoEngine::load(bundle, 1)?;
    let rounds = rounds.max(1);
    let allowed = qs.iter().filter(|q| oso.decide(q).allowed()).count();
    let fresh = time(&oso, &qs, rounds);
    let cached = Cached::new(oso, 1 << 16);
    for q in &qs {
        cached.decide(q);
    }
    let hits = time(&cached, &qs, rounds * 50);
    let start = Instant::now();
    let per_thread = qs.len() * rounds * 50;
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for i in 0..per_thread {
                    std::hint::black_box(cached.decide(&qs[i % qs.len()]));
                }
            });
        }
    });
    let both = (2 * per_thread) as f64 / start.elapsed().as_secs_f64().max(1e-9);
    Ok(Report {
        questions: qs.len(),
        allowed,
        oso: fresh,
        cached: hits,
        cached_per_sec_2_threads: both,
        goal_p50_us: 10.0,
    })
}
