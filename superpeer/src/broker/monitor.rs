//! The broker's side of monitoring: the latest probe samples of each node, the group's
//! metrics made from them, and the scheduling policy the domain's rules choose from those
//! metrics at every tick (the MVM paper's super-peer, which adjusts its scheduling policy from
//! each monitoring result).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mvm_component::policy::Metrics;

use super::core::Core;
use crate::proto::{ProbeSample, SchedulingView};
use crate::schedule::Policy;

/// The latest sample of each probe of one node (and of each job, for a probe with a value
/// per job), with when it came.
#[derive(Debug, Default)]
pub(super) struct Probes(BTreeMap<(String, Option<String>), (ProbeSample, Instant)>);

/// How many of its intervals a sample outlives before it is dropped as stale (its probe was
/// turned off, or its job ended), beyond the silence after which a node is lost.
const STALE_AFTER: u32 = 3;

impl Probes {
    /// Takes the samples of a heartbeat: each probe's come whole, in place of its older ones.
    pub(super) fn put(&mut self, now: Instant, samples: Vec<ProbeSample>) {
        for s in &samples {
            self.0.retain(|(probe, _), _| *probe != s.probe);
        }
        for s in samples {
            self.0.insert((s.probe.clone(), s.job.clone()), (s, now));
        }
    }

    /// Drops the samples that have not been renewed for [`STALE_AFTER`] of their intervals
    /// and `grace` more.
    pub(super) fn expire(&mut self, now: Instant, grace: Duration) {
        self.0.retain(|_, (s, at)| {
            let life = Duration::from_millis(s.interval_ms).saturating_mul(STALE_AFTER) + grace;
            now.saturating_duration_since(*at) <= life
        });
    }

    /// The samples held, by probe then job.
    pub(super) fn samples(&self) -> Vec<ProbeSample> {
        self.0.values().map(|(s, _)| s.clone()).collect()
    }

    /// Each probe's value on the node: a probe with a value per job counts as their sum.
    fn values(&self) -> BTreeMap<&str, f64> {
        let mut out: BTreeMap<&str, f64> = BTreeMap::new();
        for ((probe, _), (s, _)) in &self.0 {
            *out.entry(probe.as_str()).or_insert(0.0) += s.value;
        }
        out
    }
}

/// The scheduling policy in force, and what chose it.
#[derive(Debug)]
pub(super) struct Steering {
    /// The policy.
    pub(super) policy: Policy,
    /// Since when (milliseconds since the Unix epoch).
    since_ms: u64,
    /// What chose it.
    by: String,
    /// The metrics it was last chosen from.
    metrics: BTreeMap<String, f64>,
    /// The last error of the rules (logged once until they work again).
    failing: Option<String>,
    /// How many times it has switched.
    pub(super) switches: u64,
}

impl Default for Steering {
    fn default() -> Self {
        Steering {
            policy: Policy::Rank,
            since_ms: mvm_component::runtime::logs::now_ms(),
            by: "the default (no scheduling rule has been asked yet)".into(),
            metrics: BTreeMap::new(),
            failing: None,
            switches: 0,
        }
    }
}

impl Steering {
    /// As the group's answer shows it.
    pub(super) fn view(&self) -> SchedulingView {
        SchedulingView {
            policy: self.policy.name().to_owned(),
            since_ms: self.since_ms,
            by: self.by.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// What the broker's loop publishes of its monitoring at each tick, for its metrics.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    /// The scheduling policy in force, and what chose it.
    pub(crate) scheduling: SchedulingView,
    /// How many times it has switched since this replica started.
    pub(crate) switches: u64,
    /// Each live node's name and its latest probe samples.
    pub(crate) probes: Vec<(String, Vec<ProbeSample>)>,
}

/// `m` flattened for people: `nodes`, `mean_load`, `mean.free_disk`, ….
pub(super) fn flat(m: &Metrics) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = [
        ("nodes", m.nodes as f64),
        ("slots", m.slots as f64),
        ("free_slots", m.free_slots as f64),
        ("running_jobs", m.running_jobs as f64),
        ("pending_jobs", m.pending_jobs as f64),
        ("pending_vertices", m.pending_vertices as f64),
        ("mean_load", m.mean_load),
        ("max_load", m.max_load),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (agg, map) in [
        ("mean", &m.mean),
        ("sum", &m.sum),
        ("min", &m.min),
        ("max", &m.max),
    ] {
        for (probe, v) in map {
            out.insert(format!("{agg}.{probe}"), *v);
        }
    }
    out
}

impl Core {
    /// The group's metrics now, as its domain's rules see them.
    pub(super) fn metrics(&self) -> Metrics {
        let mut m = Metrics {
            group: self.site.group.clone(),
            domain: self.site.domain.clone(),
            scheduling: self.steering.policy.name().to_owned(),
            ..Metrics::default()
        };
        let mut loads = Vec::new();
        let mut per_probe: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let live: Vec<_> = self.members.live().collect();
        for (peer, n) in &live {
            m.nodes += 1;
            m.slots += i64::from(n.info.slots);
            m.free_slots += i64::from(self.free_slots(peer, n.info.slots));
            loads.push(n.info.load.load);
            for (probe, v) in n.probes.values() {
                per_probe.entry(probe).or_default().push(v);
            }
        }
        if !loads.is_empty() {
            m.mean_load = loads.iter().sum::<f64>() / loads.len() as f64;
            m.max_load = loads.iter().copied().fold(f64::MIN, f64::max);
        }
        for (probe, vs) in per_probe {
            let sum: f64 = vs.iter().sum();
            m.sum.insert(probe.to_owned(), sum);
            m.mean.insert(probe.to_owned(), sum / vs.len() as f64);
            m.min.insert(
                probe.to_owned(),
                vs.iter().copied().fold(f64::MAX, f64::min),
            );
            m.max.insert(
                probe.to_owned(),
                vs.iter().copied().fold(f64::MIN, f64::max),
            );
        }
        self.log.read(|s| {
            let waiting = s.waiting();
            m.pending_jobs = i64::try_from(waiting).unwrap_or(i64::MAX);
            m.running_jobs = i64::try_from(s.not_ended().saturating_sub(waiting)).unwrap_or(0);
            m.pending_vertices = s.pending().map(|j| j.resources.vertices).sum();
        });
        m
    }

    /// Asks the domain's `scheduling` rules which policy the group places by now, from its
    /// metrics, and switches to it. A rule that cannot be evaluated, or names no policy, keeps
    /// the one in force (and is logged once).
    pub(super) fn steer(&mut self) -> Metrics {
        let m = self.metrics();
        let engine = self.site.policies.current().engine.clone();
        let chosen = engine.scheduling(&m).and_then(|name| match name {
            None => Ok(None),
            Some(n) => n.parse::<Policy>().map(Some),
        });
        let (policy, by) = match chosen {
            Ok(Some(p)) => {
                self.steering.failing = None;
                (p, format!("the scheduling rules of domain {}", m.domain))
            }
            Ok(None) => {
                self.steering.failing = None;
                (
                    Policy::Rank,
                    format!(
                        "the default: no scheduling rule of domain {} holds",
                        m.domain
                    ),
                )
            }
            Err(e) => {
                if self.steering.failing.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "the scheduling rules cannot be evaluated; keeping {}", self.steering.policy);
                    self.steering.failing = Some(e);
                }
                return m;
            }
        };
        let s = &mut self.steering;
        s.metrics = flat(&m);
        if policy != s.policy {
            tracing::info!(from = %s.policy, to = %policy, mean_load = m.mean_load, pending_vertices = m.pending_vertices, "scheduling policy switched");
            s.policy = policy;
            s.since_ms = mvm_component::runtime::logs::now_ms();
            s.switches += 1;
        }
        s.by = by;
        let published = Published {
            scheduling: s.view(),
            switches: s.switches,
            probes: self
                .members
                .live()
                .map(|(_, n)| (n.info.name.clone(), n.probes.samples()))
                .collect(),
        };
        *self.view.monitor.lock() = Some(published);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(probe: &str, job: Option<&str>, value: f64, interval_ms: u64) -> ProbeSample {
        ProbeSample {
            probe: probe.into(),
            job: job.map(str::to_owned),
            value,
            at_ms: 0,
            interval_ms,
        }
    }

    #[test]
    fn a_node_s_probes_keep_the_latest_sum_per_job_values_and_go_stale() {
        let t0 = Instant::now();
        let mut p = Probes::default();
        p.put(
            t0,
            vec![
                sample("load", None, 0.5, 1000),
                sample("backlog", Some("a"), 3.0, 1000),
                sample("backlog", Some("b"), 4.0, 1000),
            ],
        );
        assert_eq!(p.values().get("backlog"), Some(&7.0));
        // Job a ended: the next backlog sample has b only.
        p.put(
            t0 + Duration::from_millis(500),
            vec![sample("backlog", Some("b"), 1.0, 1000)],
        );
        assert_eq!(p.values().get("backlog"), Some(&1.0));
        assert_eq!(p.values().get("load"), Some(&0.5));
        // Load is not renewed (turned off): gone after three intervals and the grace.
        p.expire(t0 + Duration::from_millis(4000), Duration::from_secs(1));
        assert_eq!(p.values().get("load"), Some(&0.5));
        p.expire(t0 + Duration::from_millis(4100), Duration::from_secs(1));
        assert_eq!(p.values().get("load"), None);
        assert_eq!(p.samples().len(), 1);
    }
}
