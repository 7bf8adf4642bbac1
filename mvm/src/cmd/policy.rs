//! `mvm policy`: check policy files, ask them a question, reload a super-peer's.

use std::path::PathBuf;

use mvm_component::policy::{self as pol, Bundle, Decision, Engine, OsoEngine, Question, Resource};
use serde::Serialize;

use crate::OutputArg;
use crate::exit::{Failure, REFUSED, input};

/// Arguments of `mvm policy`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, clap::Subcommand)]
enum Which {
    /// Load and check a policy directory; errors name the file and line.
    Check {
        /// The directory (`inter-domain.polar`, `DOMAIN/*.polar`, `node.polar`).
        dir: PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Ask the policies of DIR whether the holder of a certificate may do an action to a
    /// resource; prints allow or deny (with the reason), exit 0 or 3.
    Query {
        /// The policy directory.
        #[arg(long, default_value = "policies", value_name = "DIR")]
        policies: PathBuf,
        /// The actor's certificate (PEM), checked against its `ca.pem` or --trust.
        #[arg(long, value_name = "CERT")]
        actor: PathBuf,
        /// CA certificates to check it against (repeatable).
        #[arg(long = "trust", value_name = "FILE")]
        trust: Vec<PathBuf>,
        /// The action: submit, use-image, read-results, cancel, administer, run, …
        #[arg(long)]
        action: String,
        /// The resource, `KIND:NAME@DOMAIN`: `job:NAME@D` (owned by the actor), `image:ID@D`,
        /// `node:NAME@D`, `group:NAME@D`, or `domain:D`.
        #[arg(long)]
        resource: String,
        /// For a job: its vCPUs (and what the owner would hold with it).
        #[arg(long, default_value_t = 1)]
        vcpus: i64,
        /// For a job: its memory, MiB.
        #[arg(long, default_value_t = 0)]
        memory_mib: i64,
        /// For a job: its vertices.
        #[arg(long, default_value_t = 1)]
        vertices: i64,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Make the super-peer holding the policies read them again now (needs `administer` on
    /// its domain).
    Reload {
        #[command(flatten)]
        broker: crate::cmd::job::BrokerArg,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Serialize)]
struct CheckOut {
    dir: String,
    files: Vec<String>,
    domains: Vec<String>,
    digest: String,
    queue_kinds: Option<Vec<String>>,
    codecs: Option<Vec<String>>,
    max_queues: Option<u64>,
    /// The probes a node runs and their intervals in milliseconds: `node` for the defaults,
    /// and each domain's plan for its nodes (rules that name a node's name or group aside).
    probes: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// The monitoring plans of `engine`, each probe name checked against the probes a node has.
fn monitoring(
    engine: &OsoEngine,
    bundle: &Bundle,
) -> anyhow::Result<std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>> {
    let mut out = std::collections::BTreeMap::new();
    let known: Vec<&str> = mvm_superpeer::PROBES.iter().map(|p| p.0).collect();
    for domain in std::iter::once(String::new()).chain(bundle.domains()) {
        let node = pol::Node {
            name: String::new(),
            domain: domain.clone(),
            roles: Vec::new(),
            group: String::new(),
        };
        let place = if domain.is_empty() {
            "node.polar".to_owned()
        } else {
            format!("{domain}/*.polar")
        };
        let plan = engine
            .probes(&node)
            .map_err(|e| anyhow::anyhow!("{place}: the monitoring policy: {e}"))?;
        if let Some(bad) = plan.keys().find(|p| !known.contains(&p.as_str())) {
            anyhow::bail!(
                "{place}: probe '{bad}' is not a probe a node has (known: {})",
                known.join(", ")
            );
        }
        if !domain.is_empty() {
            // The rules with no group metrics yet, as a new group asks them first.
            let m = pol::Metrics {
                domain: domain.clone(),
                scheduling: "rank".into(),
                ..pol::Metrics::default()
            };
            if let Some(p) = engine
                .scheduling(&m)
                .map_err(|e| anyhow::anyhow!("{place}: the scheduling rules: {e}"))?
            {
                p.parse::<mvm_superpeer::schedule::Policy>()
                    .map_err(|e| anyhow::anyhow!("{place}: the scheduling rules: {e}"))?;
            }
        }
        out.insert(
            if domain.is_empty() {
                "node".into()
            } else {
                domain
            },
            plan,
        );
    }
    Ok(out)
}

#[derive(Serialize)]
struct QueryOut {
    actor: String,
    action: String,
    resource: String,
    allow: bool,
    reason: Option<String>,
}

/// Parses `KIND:NAME@DOMAIN`.
fn resource(text: &str, actor: &pol::Principal, q: (i64, i64, i64)) -> anyhow::Result<Resource> {
    let bad = || {
        anyhow::anyhow!(
            "--resource '{text}': expected KIND:NAME@DOMAIN (job, image, node, group) or domain:NAME"
        )
    };
    let (kind, rest) = text.split_once(':').ok_or_else(bad)?;
    if kind == "domain" {
        return Ok(Resource::Domain(pol::Domain::named(rest)));
    }
    let (name, domain) = rest.rsplit_once('@').ok_or_else(bad)?;
    let (name, domain) = (name.to_owned(), domain.to_owned());
    Ok(match kind {
        "job" => Resource::Job(pol::Job {
            name,
            owner: actor.name.clone(),
            owner_domain: actor.domain.clone(),
            domain,
            vcpus: q.0,
            memory_mib: q.1,
            vertices: q.2,
            image: "host".into(),
            user_vcpus: q.0,
            user_memory_mib: q.1,
            user_vertices: q.2,
        }),
        "image" => Resource::Image(pol::Image { id: name, domain }),
        "node" => Resource::Node(pol::Node {
            name,
            domain,
            roles: Vec::new(),
            group: String::new(),
        }),
        "group" => Resource::Group(pol::Group { name, domain }),
        _ => return Err(bad()),
    })
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    match args.which {
        Which::Check { dir, out } => {
            let bundle = Bundle::read_dir(&dir).map_err(|e| input(e.in_dir(&dir)))?;
            let e = OsoEngine::load(&bundle, 1).map_err(|e| input(e.in_dir(&dir)))?;
            let s = e.node_settings();
            // Its messages start with the file they are of, in `dir`.
            let probes =
                monitoring(&e, &bundle).map_err(|e| input(format!("{}/{e}", dir.display())))?;
            let report = CheckOut {
                dir: dir.display().to_string(),
                files: bundle.files.keys().cloned().collect(),
                domains: bundle.domains(),
                digest: bundle.digest(),
                queue_kinds: s.queue_kinds.as_ref().map(|k| k.iter().cloned().collect()),
                codecs: s.codecs.as_ref().map(|k| k.iter().cloned().collect()),
                max_queues: s.max_queues,
                probes,
            };
            crate::cmd::print(&report, out.output, |r| {
                format!(
                    "{}: {} files, domains {}, digest {}",
                    r.dir,
                    r.files.len(),
                    r.domains.join(", "),
                    r.digest
                )
            })
        }
        Which::Query {
            policies,
            actor,
            trust,
            action,
            resource: res,
            vcpus,
            memory_mib,
            vertices,
            out,
        } => {
            let t = crate::cmd::ca::trust_for(&actor, &trust)?;
            let who = mvm_superpeer::pki::read_principal(&actor, &t).map_err(|e| Failure {
                code: REFUSED,
                error: anyhow::anyhow!(e),
            })?;
            let resource =
                resource(&res, &who, (vcpus, memory_mib, vertices)).map_err(Failure::input)?;
            let bundle = Bundle::read_dir(&policies).map_err(|e| input(e.in_dir(&policies)))?;
            let engine = OsoEngine::load(&bundle, 1).map_err(|e| input(e.in_dir(&policies)))?;
            let d = engine.decide(&Question {
                actor: who.clone(),
                action: action.clone(),
                resource: resource.clone(),
            });
            let report = QueryOut {
                actor: who.to_string(),
                action,
                resource: resource.to_string(),
                allow: d.allowed(),
                reason: match &d {
                    Decision::Allow => None,
                    Decision::Deny(r) => Some(r.clone()),
                },
            };
            crate::cmd::print(&report, out.output, |r| match &r.reason {
                None => "allow".into(),
                Some(why) => format!("deny: {why}"),
            })?;
            if d.allowed() {
                Ok(())
            } else {
                Err(Failure::quiet(REFUSED))
            }
        }
        Which::Reload { broker, out } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(Failure::failed)?;
            let (version, digest) = rt.block_on(async {
                let c = crate::cmd::job::connect(&broker).await?;
                c.reload_policies().await.map_err(crate::cmd::job::wire)
            })?;
            #[derive(Serialize)]
            struct Reloaded {
                version: u64,
                digest: mvm_superpeer::proto::Hash,
            }
            crate::cmd::print(&Reloaded { version, digest }, out.output, |r| {
                format!("policy version {} ({})", r.version, r.digest)
            })
        }
    }
}
