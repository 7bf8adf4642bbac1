//! Authorization: role-based policies at three levels, written in Polar and decided by oso.
//!
//! A policy [`Bundle`] is a set of `.polar` files:
//! - `inter-domain.polar`: what principals of one domain may do to resources of another
//!   (consulted only when the two domains differ);
//! - `DOMAIN/*.polar`: each domain's own rules over its resources (user → role comes from the
//!   principal's certificate; role → permission is written here), and its resource-sharing
//!   limits (`limit(actor, "vcpus" | "memory_mib" | "vertices", N)`);
//! - `node.polar`: node-level defaults: who a node runs jobs for (`allow(actor, "run", node)`),
//!   and its settings (`queue_kind(K)`, `codec(C)`, `max_queues(N)`).
//!
//! The monitoring policy is written in the same files: `probe(NAME, MS)` in `node.polar` (the
//! probes every node runs, and how often) and `probe(node, NAME, MS)` in a domain's (its
//! nodes' own, overriding; `0` turns one off); `scheduling(metrics, POLICY)` in a domain's
//! chooses how its groups place jobs from their latest [`Metrics`].
//!
//! Deny is the default at every level. A question goes through the [`Engine`] trait; the
//! [`Cached`] engine remembers each answer for the life of one loaded policy version, since
//! oso takes tens of microseconds per question.

pub mod bench;
mod bundle;
mod classes;
mod engine;
#[cfg(test)]
mod tests;

pub use bundle::{Bundle, BundleError, Location, MAX_FILE, MAX_FILES, name_ok};
pub use classes::{Domain, Group, Image, Job, Metrics, Node, User};
pub use engine::{NodeSettings, OsoEngine};

use std::collections::HashMap;
use std::hash::Hash;

use parking_lot::RwLock;

/// What a certificate says a principal is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Principal {
    /// A person or a machine.
    pub kind: PrincipalKind,
    /// Its name in its domain.
    pub name: String,
    /// Its domain.
    pub domain: String,
    /// Its roles (sorted, deduplicated).
    pub roles: Vec<String>,
}

/// The two kinds of principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    /// A user (Polar class `User`).
    User,
    /// A node or super-peer (Polar class `Node`).
    Node,
}

impl PrincipalKind {
    /// `user` or `node`.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Node => "node",
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}@{}", self.kind.as_str(), self.name, self.domain)?;
        if !self.roles.is_empty() {
            write!(f, " (roles {})", self.roles.join(", "))?;
        }
        Ok(())
    }
}

/// What a question is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A domain as a whole (e.g. `administer`).
    Domain(Domain),
    /// A group of nodes.
    Group(Group),
    /// A node.
    Node(Node),
    /// An image of a node's repository.
    Image(Image),
    /// A job.
    Job(Job),
}

impl Resource {
    /// The domain that owns it, whose policy decides.
    pub fn domain(&self) -> &str {
        match self {
            Resource::Domain(d) => &d.name,
            Resource::Group(g) => &g.domain,
            Resource::Node(n) => &n.domain,
            Resource::Image(i) => &i.domain,
            Resource::Job(j) => &j.domain,
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Domain(d) => write!(f, "domain {}", d.name),
            Resource::Group(g) => write!(f, "group {}@{}", g.name, g.domain),
            Resource::Node(n) => write!(f, "node {}@{}", n.name, n.domain),
            Resource::Image(i) => write!(f, "image {}@{}", i.id, i.domain),
            Resource::Job(j) => write!(f, "job {}@{}", j.name, j.domain),
        }
    }
}

/// The actions the shipped policies speak of (a policy may use others).
pub const ACTIONS: [&str; 6] = [
    "submit",
    "use-image",
    "read-results",
    "cancel",
    "administer",
    "run",
];

/// One question: may `actor` do `action` to `resource`?
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Question {
    /// Who asks.
    pub actor: Principal,
    /// What it wants to do.
    pub action: String,
    /// To what.
    pub resource: Resource,
}

/// An answer, with the reason when it is a denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Denied, and why (names the level and the rule that is missing or exceeded).
    Deny(String),
}

impl Decision {
    /// Whether it allows.
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// `Ok(())`, or the reason as an error.
    ///
    /// # Errors
    /// The denial's reason.
    pub fn into_result(self) -> Result<(), String> {
        match self {
            Decision::Allow => Ok(()),
            Decision::Deny(r) => Err(r),
        }
    }
}

/// Answers questions from one version of the policies.
pub trait Engine: Send + Sync {
    /// The answer to `q`.
    fn decide(&self, q: &Question) -> Decision;
    /// The inter-domain level's answer alone (allowed when the domains are the same), for a
    /// super-peer choosing another domain's group to forward to (that group decides the rest).
    fn inter_domain(&self, q: &Question) -> Decision;
    /// The node-level settings.
    fn node_settings(&self) -> &NodeSettings;
    /// The version of the policies it answers from.
    fn version(&self) -> u64;
    /// What the policy of `domain` says of checkpoints for `actor`'s jobs (nothing, unless the
    /// engine reads policies that say it).
    ///
    /// # Errors
    /// A rule that cannot be evaluated.
    fn job_rules(&self, actor: &Principal, domain: &str) -> Result<JobRules, String> {
        let _ = (actor, domain);
        Ok(JobRules::default())
    }
    /// The probes `node` runs and their intervals in milliseconds: `probe(NAME, MS)` of
    /// `node.polar`, overridden name by name by `probe(node, NAME, MS)` of the node's domain
    /// (the shortest interval where several hold; `0` turns a probe off).
    ///
    /// # Errors
    /// A rule that cannot be evaluated, or an interval that is no number of milliseconds.
    fn probes(&self, node: &Node) -> Result<std::collections::BTreeMap<String, u64>, String> {
        let _ = node;
        Ok(std::collections::BTreeMap::new())
    }
    /// The floor prices `floor_price(node, PRICE)` of `node`'s domain gives it (credits per
    /// CPU-second, as strings; the caller takes the highest): the least bid its market takes.
    ///
    /// # Errors
    /// A rule that cannot be evaluated, or a price that is not a string.
    fn floor_prices(&self, node: &Node) -> Result<Vec<String>, String> {
        let _ = node;
        Ok(Vec::new())
    }
    /// The scheduling policy the domain of `metrics` chooses for its group now: the first
    /// answer of `scheduling(metrics, POLICY)` (rules are tried in file order), or none.
    ///
    /// # Errors
    /// A rule that cannot be evaluated, or an answer that is not a string.
    fn scheduling(&self, metrics: &Metrics) -> Result<Option<String>, String> {
        let _ = metrics;
        Ok(None)
    }
    /// How many questions it has answered, and how (none, unless it counts them).
    fn stats(&self) -> Option<EngineStats> {
        None
    }
}

/// How many questions an engine has answered since it was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Questions allowed.
    pub allowed: u64,
    /// Questions denied.
    pub denied: u64,
    /// Answers taken from the cache.
    pub cache_hits: u64,
    /// Answers the cache did not have (asked of oso).
    pub cache_misses: u64,
}

/// What a domain's policy says of an actor's jobs beyond yes or no: of checkpoints, as the MVM
/// paper's checkpoint policy does (how often a job that asks for none is checkpointed, and how
/// often one may ask to be), and how large an array of jobs may be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobRules {
    /// The interval of a job whose profile asks for no checkpoints, in milliseconds
    /// (`checkpoint_interval(actor, MS)`; the smallest that holds).
    pub default_ms: Option<u64>,
    /// The shortest interval a job may ask for, in milliseconds
    /// (`min_checkpoint_interval(actor, MS)`; the largest that holds).
    pub min_interval_ms: Option<u64>,
    /// The most jobs one array (a profile's `[sweep]`) may have (`max_array(actor, N)`; the
    /// smallest that holds).
    pub max_array: Option<u64>,
    /// What becomes of the actor's running jobs when the certificate they were submitted with
    /// is revoked (`revoked_jobs(actor, "cancel")` or `"finish"`; cancel where both hold;
    /// none: they finish).
    pub on_revoked: Option<RevokedJobs>,
}

/// What becomes of a job whose owner's certificate is revoked (a domain's `revoked_jobs` rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedJobs {
    /// It runs to its end.
    Finish,
    /// It is cancelled.
    Cancel,
}

/// How many slots [`Tally`] spreads its counts over.
const SHARDS: usize = 16;

/// Answers counted by kind (from the cache or not, allowed or not: one count per answer),
/// spread over cache lines by thread: threads answering at once would otherwise contend for
/// one line, which costs more than a cached answer's lookup.
struct Tally(Box<[crossbeam_utils::CachePadded<[std::sync::atomic::AtomicU64; 4]>; SHARDS]>);

impl Default for Tally {
    fn default() -> Self {
        Tally(Box::new(std::array::from_fn(|_| {
            crossbeam_utils::CachePadded::new(Default::default())
        })))
    }
}

impl Tally {
    /// Counts an answer: from the cache (`hit`) or not, `allowed` or not.
    fn add(&self, hit: bool, allowed: bool) {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static SLOT: usize = NEXT.fetch_add(1, Relaxed) % SHARDS);
        let slot = SLOT.with(|s| *s);
        self.0[slot][usize::from(!hit) * 2 + usize::from(!allowed)].fetch_add(1, Relaxed);
    }

    /// The counts over every slot.
    fn stats(&self) -> EngineStats {
        let mut n = [0u64; 4];
        for shard in self.0.iter() {
            for (i, c) in shard.iter().enumerate() {
                n[i] += c.load(std::sync::atomic::Ordering::Relaxed);
            }
        }
        // [hit allowed, hit denied, miss allowed, miss denied]
        EngineStats {
            allowed: n[0] + n[2],
            denied: n[1] + n[3],
            cache_hits: n[0] + n[1],
            cache_misses: n[2] + n[3],
        }
    }
}

/// An engine that remembers its answers. Answers depend only on the question and the loaded
/// policy, and a new policy version is a new engine, so an entry is never stale.
pub struct Cached<E> {
    inner: E,
    /// Its answers, counted.
    tally: Tally,
    answers: RwLock<HashMap<Question, Decision>>,
    /// The checkpoint rules of each actor and domain, as for answers (a broker asks for them
    /// at every submission: two oso queries, about 56 µs, where the rest of its decision
    /// comes from the cache).
    rules: RwLock<HashMap<(Principal, String), JobRules>>,
    capacity: usize,
}

impl<E: std::fmt::Debug> std::fmt::Debug for Cached<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached")
            .field("inner", &self.inner)
            .field("answers", &self.answers.read().len())
            .finish()
    }
}

impl<E: Engine> Cached<E> {
    /// Wraps `inner`, remembering up to `capacity` answers (then it starts over).
    pub fn new(inner: E, capacity: usize) -> Self {
        Cached {
            inner,
            tally: Tally::default(),
            answers: RwLock::new(HashMap::new()),
            rules: RwLock::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The wrapped engine.
    pub fn inner(&self) -> &E {
        &self.inner
    }
}

impl<E: Engine> Engine for Cached<E> {
    fn decide(&self, q: &Question) -> Decision {
        if let Some(d) = self.answers.read().get(q) {
            self.tally.add(true, d.allowed());
            return d.clone();
        }
        let d = self.inner.decide(q);
        self.tally.add(false, d.allowed());
        let mut answers = self.answers.write();
        if answers.len() >= self.capacity {
            answers.clear();
        }
        answers.insert(q.clone(), d.clone());
        d
    }

    fn inter_domain(&self, q: &Question) -> Decision {
        self.inner.inter_domain(q)
    }

    fn node_settings(&self) -> &NodeSettings {
        self.inner.node_settings()
    }

    fn version(&self) -> u64 {
        self.inner.version()
    }

    fn probes(&self, node: &Node) -> Result<std::collections::BTreeMap<String, u64>, String> {
        self.inner.probes(node)
    }

    fn stats(&self) -> Option<EngineStats> {
        Some(self.tally.stats())
    }

    fn scheduling(&self, metrics: &Metrics) -> Result<Option<String>, String> {
        self.inner.scheduling(metrics)
    }

    fn floor_prices(&self, node: &Node) -> Result<Vec<String>, String> {
        self.inner.floor_prices(node)
    }

    fn job_rules(&self, actor: &Principal, domain: &str) -> Result<JobRules, String> {
        let key = (actor.clone(), domain.to_owned());
        if let Some(r) = self.rules.read().get(&key) {
            return Ok(*r);
        }
        // A rule that cannot be evaluated is asked again next time, as its error says.
        let r = self.inner.job_rules(actor, domain)?;
        let mut rules = self.rules.write();
        if rules.len() >= self.capacity {
            rules.clear();
        }
        rules.insert(key, r);
        Ok(r)
    }
}

/// The node-level hook of the component layer: before a job's part is instantiated on this
/// node, its owner must be allowed to `run` on the node, and its channels must keep to the
/// node's settings (queue kinds, codecs, most queues).
pub struct NodePolicy {
    engine: std::sync::Arc<dyn Engine>,
    node: Node,
}

impl std::fmt::Debug for NodePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePolicy")
            .field("version", &self.engine.version())
            .field("node", &self.node)
            .finish()
    }
}

impl NodePolicy {
    /// The hook of node `node`, deciding with `engine`.
    pub fn new(engine: std::sync::Arc<dyn Engine>, node: Node) -> Self {
        NodePolicy { engine, node }
    }
}

impl crate::runtime::PolicyHook for NodePolicy {
    fn check(
        &self,
        job: &crate::runtime::JobSpec<'_>,
        local: &[usize],
    ) -> Result<(), crate::runtime::Refusal> {
        use crate::runtime::Refusal;
        let whole = |reason: String| Refusal {
            vertex: String::new(),
            reason,
        };
        let Some(owner) = &job.owner else {
            return Err(whole("the job has no owner to authorize".into()));
        };
        self.engine
            .decide(&Question {
                actor: owner.clone(),
                action: "run".into(),
                resource: Resource::Node(self.node.clone()),
            })
            .into_result()
            .map_err(whole)?;
        let settings = self.engine.node_settings();
        let t = job.topology;
        let is_local = |v: usize| local.contains(&v);
        let mut queues = 0u64;
        for c in &t.channels {
            let (from, to) = (is_local(c.from.vertex), is_local(c.to.vertex));
            if !from && !to {
                continue;
            }
            // A local input port's queue, or the outbox of a remote one a local vertex feeds.
            queues += 1;
            let vertex = t.vertices[if to { c.to.vertex } else { c.from.vertex }]
                .name
                .clone();
            let kind = c.queue.kind.as_str();
            if let Some(kinds) = &settings.queue_kinds
                && !kinds.contains(kind)
            {
                return Err(Refusal {
                    vertex,
                    reason: format!(
                        "node {} does not allow {kind} queues (line {} of the topology)",
                        self.node.name, c.line
                    ),
                });
            }
            if let Some(codecs) = &settings.codecs
                && !codecs.contains(c.queue.codec.as_str())
            {
                return Err(Refusal {
                    vertex,
                    reason: format!(
                        "node {} does not allow the codec {} (line {} of the topology)",
                        self.node.name, c.queue.codec, c.line
                    ),
                });
            }
        }
        if let Some(max) = settings.max_queues
            && queues > max
        {
            return Err(whole(format!(
                "this part of the job needs {queues} queues on node {}; it allows {max}",
                self.node.name
            )));
        }
        Ok(())
    }
}
