//! The oso engine: one knowledge base per scope (inter-domain, each domain, node).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use oso::{Oso, PolarValue, ToPolar};

use super::bundle::Scope;
use super::classes::{self, Node, User};
use super::{Bundle, BundleError, Decision, Engine, Location, Principal, PrincipalKind};
use super::{Question, Resource};

/// A node's settings from `node.polar`; a setting the file does not state does not restrict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSettings {
    /// `queue_kind(K)`: the queue kinds jobs may use.
    pub queue_kinds: Option<BTreeSet<String>>,
    /// `codec(C)`: the codecs jobs may use.
    pub codecs: Option<BTreeSet<String>>,
    /// `max_queues(N)`: the most queues one job's part may create on a node.
    pub max_queues: Option<u64>,
}

/// One scope's knowledge base.
struct Kb {
    oso: Oso,
}

/// Answers questions from one loaded [`Bundle`].
pub struct OsoEngine {
    version: u64,
    digest: String,
    inter: Option<Kb>,
    domains: HashMap<String, Kb>,
    node: Option<Kb>,
    settings: NodeSettings,
}

impl std::fmt::Debug for OsoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OsoEngine")
            .field("version", &self.version)
            .field("digest", &self.digest)
            .field("domains", &self.domains.keys().collect::<Vec<_>>())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn load(files: &[(&str, &str)]) -> Result<Kb, BundleError> {
    let mut oso = Oso::new();
    classes::register(&mut oso).map_err(|e| BundleError::Polar {
        at: Location {
            file: files.first().map(|f| f.0.to_owned()).unwrap_or_default(),
            line: 0,
            column: 0,
        },
        message: format!("cannot register the policy classes: {e}"),
    })?;
    // One text per scope (files of a scope may refer to each other's rules); offsets map an
    // error back to its file.
    let mut text = String::new();
    let mut starts = Vec::new();
    for (name, src) in files {
        starts.push((text.len(), *name));
        text.push_str(src);
        text.push('\n');
    }
    oso.load_str(&text).map_err(|e| {
        let (offset, message) = match &e {
            oso::OsoError::Polar(p) => (p.get_context().map(|c| c.left), p.0.to_string()),
            other => (None, other.to_string()),
        };
        let at = match offset {
            Some(off) => {
                let (start, file) = starts
                    .iter()
                    .rev()
                    .find(|(s, _)| *s <= off)
                    .copied()
                    .unwrap_or((0, files.first().map_or("", |f| f.0)));
                let before = &text[start..off.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before
                    .rfind('\n')
                    .map_or(before.len(), |i| before.len() - i - 1)
                    + 1;
                Location {
                    file: file.to_owned(),
                    line: u32::try_from(line).unwrap_or(u32::MAX),
                    column: u32::try_from(column).unwrap_or(u32::MAX),
                }
            }
            None => Location {
                file: files.iter().map(|f| f.0).collect::<Vec<_>>().join(", "),
                line: 0,
                column: 0,
            },
        };
        BundleError::Polar {
            at,
            message: message.trim().to_owned(),
        }
    })?;
    Ok(Kb { oso })
}

fn actor_value(p: &Principal) -> PolarValue {
    match p.kind {
        PrincipalKind::User => User {
            name: p.name.clone(),
            domain: p.domain.clone(),
            roles: p.roles.clone(),
        }
        .to_polar(),
        PrincipalKind::Node => Node {
            name: p.name.clone(),
            domain: p.domain.clone(),
            roles: p.roles.clone(),
            group: String::new(),
        }
        .to_polar(),
    }
}

fn resource_value(r: &Resource) -> PolarValue {
    match r {
        Resource::Domain(x) => x.clone().to_polar(),
        Resource::Group(x) => x.clone().to_polar(),
        Resource::Node(x) => x.clone().to_polar(),
        Resource::Image(x) => x.clone().to_polar(),
        Resource::Job(x) => x.clone().to_polar(),
    }
}

impl Kb {
    /// Whether `allow(actor, action, resource)` holds; a rule that fails to evaluate denies.
    fn allows(&self, q: &Question) -> Result<bool, String> {
        let args = (
            actor_value(&q.actor),
            q.action.clone(),
            resource_value(&q.resource),
        );
        let mut query = self
            .oso
            .query_rule("allow", args)
            .map_err(|e| e.to_string())?;
        match query.next() {
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(e.to_string()),
            None => Ok(false),
        }
    }

    /// What `each` makes of every result of `rule(args…)`, in the order the rules give them.
    fn results<T>(
        &self,
        rule: &str,
        args: impl oso::ToPolarList,
        mut each: impl FnMut(oso::ResultSet) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        let query = self.oso.query_rule(rule, args).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for r in query {
            match r {
                Ok(r) => out.push(each(r)?),
                // A policy that states no such rule states no such value.
                Err(e) if e.to_string().contains("undefined rule") => return Ok(Vec::new()),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(out)
    }

    /// Every value of the variable `x` in `args` for which `rule(args…)` holds.
    fn values<T: oso::FromPolar>(
        &self,
        rule: &str,
        args: impl oso::ToPolarList,
    ) -> Result<Vec<T>, String> {
        self.results(rule, args, |r| {
            r.get_typed::<T>("x").map_err(|e| format!("{rule}: {e}"))
        })
    }

    /// Every `(name, milliseconds)` pair for which `probe(args…, name, ms)` holds, in the
    /// order the rules give them.
    fn probe_pairs(&self, args: impl oso::ToPolarList) -> Result<Vec<(String, u64)>, String> {
        self.results("probe", args, |r| {
            let name: String = r.get_typed("name").map_err(|e| format!("probe: {e}"))?;
            let ms: i64 = r
                .get_typed("ms")
                .map_err(|e| format!("probe {name}: {e}"))?;
            let ms = u64::try_from(ms)
                .map_err(|_| format!("probe {name}: {ms} is not a number of milliseconds"))?;
            Ok((name, ms))
        })
    }
}

impl OsoEngine {
    /// Loads `bundle` as policy version `version`.
    ///
    /// # Errors
    /// The bundle's layout, or the first file that does not load, with its file and line.
    pub fn load(bundle: &Bundle, version: u64) -> Result<OsoEngine, BundleError> {
        bundle.check_layout()?;
        let mut scopes: BTreeMap<Scope, Vec<(&str, &str)>> = BTreeMap::new();
        for (path, text) in &bundle.files {
            scopes
                .entry(Bundle::scope(path)?)
                .or_default()
                .push((path.as_str(), text.as_str()));
        }
        let mut engine = OsoEngine {
            version,
            digest: bundle.digest(),
            inter: None,
            domains: HashMap::new(),
            node: None,
            settings: NodeSettings::default(),
        };
        for (scope, files) in scopes {
            let kb = load(&files)?;
            match scope {
                Scope::InterDomain => engine.inter = Some(kb),
                Scope::Node => {
                    engine.settings = settings(&kb).map_err(|message| BundleError::Polar {
                        at: Location {
                            file: "node.polar".into(),
                            line: 0,
                            column: 0,
                        },
                        message,
                    })?;
                    engine.node = Some(kb);
                }
                Scope::Domain(d) => {
                    engine.domains.insert(d, kb);
                }
            }
        }
        Ok(engine)
    }

    /// The digest of the bundle it was loaded from.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    fn limits(&self, kb: &Kb, q: &Question, job: &super::Job) -> Decision {
        let checks = [
            ("vcpus", "vCPUs", job.user_vcpus, job.vcpus),
            (
                "memory_mib",
                "MiB of memory",
                job.user_memory_mib,
                job.memory_mib,
            ),
            ("vertices", "vertices", job.user_vertices, job.vertices),
        ];
        for (key, what, total, this) in checks {
            let bounds = match kb.values::<i64>("limit", (actor_value(&q.actor), key, var())) {
                Ok(b) => b,
                Err(e) => {
                    return Decision::Deny(format!(
                        "domain {}: limit({key}) cannot be evaluated: {e}",
                        job.domain
                    ));
                }
            };
            if let Some(max) = bounds.into_iter().min()
                && total > max
            {
                return Decision::Deny(format!(
                    "the policy of domain {} limits {} to {max} {what}; with this job ({this}) \
                     they would hold {total}",
                    job.domain, q.actor,
                ));
            }
        }
        Decision::Allow
    }
}

fn var() -> PolarValue {
    PolarValue::Variable("x".into())
}

fn named(name: &str) -> PolarValue {
    PolarValue::Variable(name.into())
}

fn settings(kb: &Kb) -> Result<NodeSettings, String> {
    let set = |rule: &str| -> Result<Option<BTreeSet<String>>, String> {
        let v: Vec<String> = kb.values(rule, (var(),))?;
        Ok((!v.is_empty()).then(|| v.into_iter().collect()))
    };
    let max: Vec<i64> = kb.values("max_queues", (var(),))?;
    Ok(NodeSettings {
        queue_kinds: set("queue_kind")?,
        codecs: set("codec")?,
        max_queues: max.into_iter().min().map(|n| u64::try_from(n).unwrap_or(0)),
    })
}

impl Engine for OsoEngine {
    fn job_rules(&self, actor: &Principal, domain: &str) -> Result<super::JobRules, String> {
        let Some(kb) = self.domains.get(domain) else {
            return Ok(super::JobRules::default());
        };
        let ms = |rule: &str| -> Result<Vec<u64>, String> {
            let v: Vec<i64> = kb.values(rule, (actor_value(actor), var()))?;
            v.into_iter()
                .map(|n| {
                    u64::try_from(n)
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("{rule}: {n} is not a number of milliseconds"))
                })
                .collect()
        };
        Ok(super::JobRules {
            default_ms: ms("checkpoint_interval")?.into_iter().min(),
            min_interval_ms: ms("min_checkpoint_interval")?.into_iter().max(),
            max_array: {
                let v: Vec<i64> = kb.values("max_array", (actor_value(actor), var()))?;
                v.into_iter().min().map(|n| u64::try_from(n).unwrap_or(0))
            },
            on_revoked: {
                let v: Vec<String> = kb.values("revoked_jobs", (actor_value(actor), var()))?;
                if let Some(bad) = v.iter().find(|a| *a != "cancel" && *a != "finish") {
                    return Err(format!(
                        "revoked_jobs: '{bad}' is neither \"cancel\" nor \"finish\""
                    ));
                }
                if v.iter().any(|a| a == "cancel") {
                    Some(super::RevokedJobs::Cancel)
                } else {
                    v.first().map(|_| super::RevokedJobs::Finish)
                }
            },
        })
    }

    fn probes(&self, node: &Node) -> Result<BTreeMap<String, u64>, String> {
        let mut plan = BTreeMap::new();
        // The shortest interval of the pairs `pairs` gives for each name.
        let shortest = |pairs: Vec<(String, u64)>| {
            let mut m: BTreeMap<String, u64> = BTreeMap::new();
            for (name, ms) in pairs {
                let e = m.entry(name).or_insert(ms);
                *e = (*e).min(ms);
            }
            m
        };
        if let Some(kb) = &self.node {
            let pairs = kb
                .probe_pairs((named("name"), named("ms")))
                .map_err(|e| format!("node.polar: {e}"))?;
            plan = shortest(pairs);
        }
        if let Some(kb) = self.domains.get(&node.domain) {
            let pairs = kb
                .probe_pairs((node.clone().to_polar(), named("name"), named("ms")))
                .map_err(|e| format!("domain {}: {e}", node.domain))?;
            plan.extend(shortest(pairs));
        }
        plan.retain(|_, ms| *ms > 0);
        Ok(plan)
    }

    fn floor_prices(&self, node: &Node) -> Result<Vec<String>, String> {
        let Some(kb) = self.domains.get(&node.domain) else {
            return Ok(Vec::new());
        };
        kb.values::<String>("floor_price", (node.clone().to_polar(), var()))
            .map_err(|e| format!("domain {}: floor_price: {e}", node.domain))
    }

    fn scheduling(&self, metrics: &super::Metrics) -> Result<Option<String>, String> {
        let Some(kb) = self.domains.get(&metrics.domain) else {
            return Ok(None);
        };
        let mut query = kb
            .oso
            .query_rule("scheduling", (metrics.clone().to_polar(), var()))
            .map_err(|e| e.to_string())?;
        match query.next() {
            None => Ok(None),
            Some(Ok(r)) => r
                .get_typed::<String>("x")
                .map(Some)
                .map_err(|e| format!("scheduling: {e}")),
            Some(Err(e)) if e.to_string().contains("undefined rule") => Ok(None),
            Some(Err(e)) => Err(e.to_string()),
        }
    }

    fn decide(&self, q: &Question) -> Decision {
        let deny_error = |level: &str, e: String| {
            Decision::Deny(format!("the {level} policy cannot be evaluated: {e}"))
        };
        if let (Resource::Node(n), "run") = (&q.resource, q.action.as_str()) {
            let Some(kb) = &self.node else {
                return Decision::Deny("there is no node-level policy (node.polar)".into());
            };
            return match kb.allows(q) {
                Ok(true) => Decision::Allow,
                Ok(false) => Decision::Deny(format!(
                    "the node-level policy does not let {} run jobs on node {}",
                    q.actor, n.name
                )),
                Err(e) => deny_error("node-level", e),
            };
        }
        let domain = q.resource.domain();
        if let d @ Decision::Deny(_) = self.inter_domain(q) {
            return d;
        }
        let Some(kb) = self.domains.get(domain) else {
            return Decision::Deny(format!("domain {domain} has no policy here"));
        };
        match kb.allows(q) {
            Ok(true) => {}
            Ok(false) => {
                return Decision::Deny(format!(
                    "the policy of domain {domain} does not let {} {} {}",
                    q.actor, q.action, q.resource
                ));
            }
            Err(e) => return deny_error(&format!("domain {domain}"), e),
        }
        match (&q.resource, q.action.as_str()) {
            (Resource::Job(job), "submit") => self.limits(kb, q, job),
            _ => Decision::Allow,
        }
    }

    fn inter_domain(&self, q: &Question) -> Decision {
        if q.actor.domain == q.resource.domain() {
            return Decision::Allow;
        }
        let allowed = match &self.inter {
            Some(kb) => match kb.allows(q) {
                Ok(a) => a,
                Err(e) => {
                    return Decision::Deny(format!(
                        "the inter-domain policy cannot be evaluated: {e}"
                    ));
                }
            },
            None => false,
        };
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny(format!(
                "no inter-domain agreement lets {} {} {}",
                q.actor, q.action, q.resource
            ))
        }
    }

    fn node_settings(&self) -> &NodeSettings {
        &self.settings
    }

    fn version(&self) -> u64 {
        self.version
    }
}
