//! The node's monitoring (the MVM paper's monitoring policy, the VM manager's property
//! probes): the probes its policies name, each sampled at its own interval, and their samples
//! carried to the super-peer by the next heartbeat. The plan is read again whenever the
//! policies in force change version, so a new monitoring policy takes effect without a
//! restart.
//!
//! When each probe is due is the [`Timetable`]'s to say (no clock of its own); `Node::monitor`
//! samples what is due, off the runtime's threads (a probe may run `xl list`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Node;
use crate::proto::{MAX_PROBE_SAMPLES, ProbeSample};

/// The probes a node has: each one's name, and what it measures.
pub const PROBES: &[(&str, &str)] = &[
    ("load", "the 1-minute load average"),
    ("free_memory", "available memory, bytes"),
    (
        "free_disk",
        "free space under the node's data directory, bytes",
    ),
    (
        "running_guests",
        "guests alive on the node's driver (0 without an OS layer)",
    ),
    ("warm_guests", "warm guests free, over every template"),
    ("vertices", "vertices of the parts held"),
    ("queue_depth", "items held in the queues of running jobs"),
    ("queue_bytes", "bytes held in the queues of running jobs"),
    (
        "backlog",
        "items held in each running job's queues on the node (a value per job)",
    ),
];

/// Whether `name` is a probe a node has.
pub(crate) fn known(name: &str) -> bool {
    PROBES.iter().any(|(n, _)| *n == name)
}

/// The shortest interval a probe runs at, whatever the policy says.
pub(super) const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// How often the policies are looked at for a new version when no probe is due sooner.
const POLICY_CHECK: Duration = Duration::from_secs(1);

/// When each probe of a plan is next due.
#[derive(Debug, Default)]
pub(super) struct Timetable {
    plan: BTreeMap<String, Duration>,
    next: BTreeMap<String, Instant>,
}

impl Timetable {
    /// Takes a new plan at `now`: a probe new to it is due at once; one whose interval
    /// shortened is due no later than one new interval from now; one left out is dropped.
    pub(super) fn set(&mut self, now: Instant, plan: BTreeMap<String, Duration>) {
        self.next.retain(|name, _| plan.contains_key(name));
        for (name, every) in &plan {
            let due = self.next.entry(name.clone()).or_insert(now);
            *due = (*due).min(now + *every);
        }
        self.plan = plan;
    }

    /// The probes due at `now`, each moved on to its next time (a probe that fell behind is
    /// not sampled twice to catch up).
    pub(super) fn due(&mut self, now: Instant) -> Vec<(String, Duration)> {
        let mut out = Vec::new();
        for (name, at) in &mut self.next {
            if *at <= now {
                let every = self.plan.get(name).copied().unwrap_or(MIN_INTERVAL);
                *at = if *at + every <= now {
                    now + every
                } else {
                    *at + every
                };
                out.push((name.clone(), every));
            }
        }
        out
    }

    /// When the next probe is due, if any runs.
    pub(super) fn next(&self) -> Option<Instant> {
        self.next.values().min().copied()
    }

    /// The plan in force.
    pub(super) fn plan(&self) -> &BTreeMap<String, Duration> {
        &self.plan
    }
}

/// The samples taken since the last heartbeat: the latest of each probe (and job).
#[derive(Debug, Default)]
pub(super) struct Fresh(Mutex<BTreeMap<(String, Option<String>), ProbeSample>>);

impl Fresh {
    /// Keeps `samples`, each in place of an older one of its probe. A probe's samples come
    /// whole: the job values of one not in `samples` are dropped with the old.
    pub(super) fn put(&self, samples: Vec<ProbeSample>) {
        let mut fresh = self.0.lock();
        for s in &samples {
            fresh.retain(|(probe, _), _| *probe != s.probe);
        }
        for s in samples {
            fresh.insert((s.probe.clone(), s.job.clone()), s);
        }
    }

    /// The samples to send, at most [`MAX_PROBE_SAMPLES`] (those of jobs last, so that a node
    /// with many jobs still publishes every probe of its own); the rest wait for the next
    /// heartbeat.
    pub(super) fn take(&self) -> Vec<ProbeSample> {
        let mut fresh = self.0.lock();
        let mut keys: Vec<(String, Option<String>)> = fresh.keys().cloned().collect();
        keys.sort_by_key(|(_, job)| job.is_some());
        keys.truncate(MAX_PROBE_SAMPLES);
        keys.iter().filter_map(|k| fresh.remove(k)).collect()
    }
}

impl Node {
    /// The probes this node's policies name, with their intervals (unknown names left out,
    /// and logged).
    fn monitoring_plan(&self) -> BTreeMap<String, Duration> {
        let engine = self.site.policies.current().engine.clone();
        let me = mvm_component::policy::Node {
            name: self.site.name.clone(),
            domain: self.site.domain.clone(),
            roles: self.site.net.principal().roles.clone(),
            group: self.site.group.clone(),
        };
        match engine.probes(&me) {
            Ok(plan) => plan
                .into_iter()
                .filter(|(name, _)| {
                    let ok = known(name);
                    if !ok {
                        let names: Vec<&str> = PROBES.iter().map(|p| p.0).collect();
                        tracing::warn!(
                            probe = %name,
                            "the monitoring policy names a probe this node does not have (it has {})",
                            names.join(", ")
                        );
                    }
                    ok
                })
                .map(|(name, ms)| (name, Duration::from_millis(ms).max(MIN_INTERVAL)))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "the monitoring policy cannot be evaluated; no probe runs");
                BTreeMap::new()
            }
        }
    }

    /// One sample of probe `name` (several for a probe with a value per job).
    fn sample(&self, name: &str, every: Duration) -> Result<Vec<ProbeSample>, String> {
        use mvm_os::probe::{FreeDisk, FreeMemory, Load, Probe};
        let at_ms = mvm_component::runtime::logs::now_ms();
        let interval_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let one = |value: f64| {
            vec![ProbeSample {
                probe: name.to_owned(),
                job: None,
                value,
                at_ms,
                interval_ms,
            }]
        };
        let queues = || {
            self.queues
                .list(None)
                .into_iter()
                .filter(|s| s.name.contains('/'))
        };
        let os = |e: mvm_os::probe::ProbeError| e.to_string();
        Ok(match name {
            "load" => one(Load { interval: every }.sample().map_err(os)?),
            "free_memory" => one(FreeMemory { interval: every }.sample().map_err(os)?),
            "free_disk" => one(FreeDisk {
                path: self.config.disk.clone(),
                interval: every,
            }
            .sample()
            .map_err(os)?),
            "running_guests" => one(match &self.os {
                Some(o) => o.guests_alive()? as f64,
                None => 0.0,
            }),
            "warm_guests" => one(self
                .os
                .as_ref()
                .map_or(0, |o| o.warm().values().map(|&n| u64::from(n)).sum())
                as f64),
            "vertices" => one(f64::from(self.vertices())),
            "queue_depth" => one(queues().map(|s| s.depth).sum::<u64>() as f64),
            "queue_bytes" => one(queues().map(|s| s.depth_bytes).sum::<u64>() as f64),
            "backlog" => {
                let mut per_job: BTreeMap<String, u64> = BTreeMap::new();
                for j in self.job_ids() {
                    per_job.insert(j.to_string(), 0);
                }
                for s in queues() {
                    if let Some(n) = super::job_queue(&s.name).and_then(|(j, _)| per_job.get_mut(j))
                    {
                        *n += s.depth;
                    }
                }
                per_job
                    .into_iter()
                    .map(|(job, n)| ProbeSample {
                        probe: name.to_owned(),
                        job: Some(job),
                        value: n as f64,
                        at_ms,
                        interval_ms,
                    })
                    .collect()
            }
            other => return Err(format!("no probe named '{other}'")),
        })
    }

    /// Runs the probes the policies name, each at its interval, keeping their samples for the
    /// next heartbeat. Runs until the task is aborted.
    pub(crate) async fn monitor(self: Arc<Self>) {
        let mut table = Timetable::default();
        let mut version = None;
        // A probe whose last sample failed, and why (logged once until it works again).
        let mut failing: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let now = Instant::now();
            let current = self.site.policies.current().version;
            if version != Some(current) {
                version = Some(current);
                let plan = self.monitoring_plan();
                if plan != *table.plan() {
                    tracing::info!(
                        policies = current,
                        probes = ?plan.iter().map(|(n, d)| format!("{n}/{}ms", d.as_millis())).collect::<Vec<_>>(),
                        "monitoring plan"
                    );
                }
                table.set(now, plan);
            }
            let due = table.due(now);
            if !due.is_empty() {
                let node = self.clone();
                let taken = tokio::task::spawn_blocking(move || {
                    due.into_iter()
                        .map(|(name, every)| {
                            let r = node.sample(&name, every);
                            (name, r)
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                let mut samples = Vec::new();
                for (name, r) in taken {
                    match r {
                        Ok(s) => {
                            failing.remove(&name);
                            samples.extend(s);
                        }
                        Err(e) => {
                            if failing.get(&name) != Some(&e) {
                                tracing::warn!(probe = %name, error = %e, "probe sample failed");
                                failing.insert(name, e);
                            }
                        }
                    }
                }
                self.probes.put(samples);
            }
            let wake = table
                .next()
                .map_or(POLICY_CHECK, |t| {
                    t.saturating_duration_since(Instant::now())
                })
                .min(POLICY_CHECK);
            tokio::time::sleep(wake).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(p: &[(&str, u64)]) -> BTreeMap<String, Duration> {
        p.iter()
            .map(|(n, ms)| ((*n).to_owned(), Duration::from_millis(*ms)))
            .collect()
    }

    fn names(due: Vec<(String, Duration)>) -> Vec<String> {
        due.into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn each_probe_is_due_at_its_own_interval_and_a_new_plan_takes_effect_at_once() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut t = Timetable::default();
        assert_eq!(t.next(), None, "no plan, nothing due");
        t.set(t0, plan(&[("load", 1000), ("free_disk", 5000)]));
        assert_eq!(
            names(t.due(t0)),
            ["free_disk", "load"],
            "new probes at once"
        );
        assert_eq!(t.next(), Some(ms(1000)));
        assert!(t.due(ms(999)).is_empty());
        assert_eq!(names(t.due(ms(1000))), ["load"]);
        assert_eq!(names(t.due(ms(2000))), ["load"]);
        // Late by more than an interval: sampled once, not caught up.
        assert_eq!(names(t.due(ms(4700))), ["load"]);
        assert_eq!(names(t.due(ms(5000))), ["free_disk"]);
        assert_eq!(t.next(), Some(ms(5700)));
        // The policy changes: load every 200 ms from now, free_disk off, vertices new.
        t.set(ms(5100), plan(&[("load", 200), ("vertices", 3000)]));
        assert_eq!(names(t.due(ms(5100))), ["vertices"]);
        assert_eq!(t.next(), Some(ms(5300)));
        assert_eq!(names(t.due(ms(5300))), ["load"]);
        assert_eq!(names(t.due(ms(5500))), ["load"]);
        assert!(t.due(ms(8000)).iter().all(|(n, _)| n != "free_disk"));
        // Off altogether.
        t.set(ms(9000), BTreeMap::new());
        assert_eq!(t.next(), None);
        assert!(t.due(ms(20_000)).is_empty());
    }

    fn sample(probe: &str, job: Option<&str>, value: f64) -> ProbeSample {
        ProbeSample {
            probe: probe.into(),
            job: job.map(str::to_owned),
            value,
            at_ms: 1,
            interval_ms: 1000,
        }
    }

    #[test]
    fn fresh_samples_keep_the_latest_replace_a_probe_whole_and_go_once() {
        let f = Fresh::default();
        f.put(vec![
            sample("load", None, 1.0),
            sample("backlog", Some("a"), 5.0),
        ]);
        f.put(vec![sample("load", None, 2.0)]);
        f.put(vec![sample("backlog", Some("b"), 7.0)]);
        let got = f.take();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.contains(&sample("load", None, 2.0)));
        assert!(
            got.contains(&sample("backlog", Some("b"), 7.0)),
            "job a's backlog went with the older sample of the probe"
        );
        assert!(f.take().is_empty(), "sent once");
        // Bounded: per-job values wait behind the node's own.
        let many: Vec<ProbeSample> = (0..MAX_PROBE_SAMPLES + 10)
            .map(|i| sample("backlog", Some(&format!("j{i}")), 1.0))
            .chain([sample("load", None, 3.0)])
            .collect();
        f.put(many);
        let first = f.take();
        assert_eq!(first.len(), MAX_PROBE_SAMPLES);
        assert!(first.contains(&sample("load", None, 3.0)));
        assert_eq!(f.take().len(), 11);
    }
}
