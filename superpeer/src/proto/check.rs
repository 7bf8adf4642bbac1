//! The checks of every message: bounded strings and lists, names, principals and parts.
//!
//! Ids and hashes need none: they are typed ([`super::JobId`], [`Hash`](struct@super::Hash)),
//! and a message with a malformed one does not decode.

use std::collections::BTreeMap;

use mvm_component::policy::{BundleError, Principal};

use super::{
    BrokerRequest, ClientRequest, Hash, Hello, MAX_CERT, MAX_REASON, NodeRequest, PeerRequest,
    Request, Response, Verdict,
};

/// The shortest checkpoint interval a submission may ask for (as a profile).
const MIN_INTERVAL_MS: u64 = 100;
/// The most checkpoints a job may keep.
const MAX_KEEP: u32 = 100;

/// Why a message is refused: its first bad field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// A principal's name, domain or a role is not a valid name, or it has too many roles.
    #[error("a principal with a bad name, domain or role: {0}")]
    Principal(Box<Principal>),
    /// A certificate that is empty or too large.
    #[error("a certificate of {0} bytes (1 to {MAX_CERT})")]
    CertSize(usize),
    /// A refusal's reason that is too long.
    #[error("a reason of {0} bytes (at most {MAX_REASON})")]
    ReasonSize(usize),
    /// A name, id or port that is empty, too long, or has control characters.
    #[error("{field} must be 1 to {MAX_NAME} printable characters")]
    Name {
        /// Which field, e.g. `the job name`.
        field: &'static str,
    },
    /// A list, map or string with more entries than any message may carry.
    #[error("too many {field} ({count})")]
    TooMany {
        /// What is counted, e.g. `hashes`.
        field: &'static str,
        /// How many there are.
        count: usize,
    },
    /// A part spec for a part that is not in its list of parts.
    #[error("part {here} does not exist ({parts} parts)")]
    NoSuchPart {
        /// The part the spec is for.
        here: u32,
        /// How many parts there are.
        parts: usize,
    },
    /// A guest template with a value out of range.
    #[error("guest template '{name}': {problem}")]
    Template {
        /// The template's name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A placement that puts a vertex on a part that does not exist.
    #[error("placement names part {part} of {parts}")]
    PlacementPart {
        /// The part named.
        part: u32,
        /// How many parts there are.
        parts: usize,
    },
    /// Checkpoints asked for more often than a node can take them, or none kept.
    #[error("checkpoints every {interval_ms} ms keeping {keep} (at least every {min} ms, keeping 1 to {MAX_KEEP})", min = MIN_INTERVAL_MS)]
    Checkpoint {
        /// The interval asked for.
        interval_ms: u64,
        /// How many to keep.
        keep: u32,
    },
    /// A policy bundle whose files do not fit the layout.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A job's files that break a rule: a path outside the sandbox, a bad pattern, a bound.
    #[error("files: {0}")]
    Files(String),
    /// A checkpoint or move that gives its files longer than [`super::MAX_SAVE_MS`].
    #[error("{0} ms for a part's saved files (at most {max})", max = super::MAX_SAVE_MS)]
    SaveWait(u64),
}

/// Checks how long a broker gives a part's saved files ([`super::MAX_SAVE_MS`] at most).
fn check_save_ms(within_ms: Option<u64>) -> Result<(), CheckError> {
    match within_ms {
        Some(ms) if ms > super::MAX_SAVE_MS => Err(CheckError::SaveWait(ms)),
        _ => Ok(()),
    }
}

/// Checks a job's files: paths inside the sandbox, each input once, bounded counts and bytes,
/// patterns that compile.
pub(super) fn check_files(f: &super::FileSpec) -> Result<(), CheckError> {
    use mvm_component::files::{MAX_FILES, MAX_INPUT_BYTES, MAX_OUTPUT_BYTES, check_path};
    if f.inputs.len() > MAX_FILES {
        return Err(CheckError::TooMany {
            field: "input files",
            count: f.inputs.len(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for i in &f.inputs {
        check_path(&i.path).map_err(|e| CheckError::Files(e.to_string()))?;
        if i.path.ends_with('/') || !seen.insert(i.path.as_str()) {
            return Err(CheckError::Files(format!(
                "input '{}' is a directory or named twice",
                i.path
            )));
        }
    }
    if f.input_bytes() > MAX_INPUT_BYTES {
        return Err(CheckError::Files(format!(
            "{} bytes of input files (at most {MAX_INPUT_BYTES})",
            f.input_bytes()
        )));
    }
    if f.output_bytes > MAX_OUTPUT_BYTES {
        return Err(CheckError::Files(format!(
            "an output bound of {} bytes per vertex (at most {MAX_OUTPUT_BYTES})",
            f.output_bytes
        )));
    }
    mvm_component::files::Patterns::new(&f.outputs).map_err(CheckError::Files)?;
    Ok(())
}

/// Checks output files as a node reports them.
fn check_outputs(files: &[super::OutputFile]) -> Result<(), CheckError> {
    check_len("output files", files.len())?;
    for f in files {
        check_name("an output file's vertex", &f.vertex)?;
        mvm_component::files::check_path(&f.path).map_err(|e| CheckError::Files(e.to_string()))?;
    }
    Ok(())
}

pub(super) fn check_principal(p: &Principal) -> Result<(), CheckError> {
    let ok = mvm_component::policy::name_ok;
    if ok(&p.name) && ok(&p.domain) && p.roles.len() <= 64 && p.roles.iter().all(|r| ok(r)) {
        Ok(())
    } else {
        Err(CheckError::Principal(Box::new(p.clone())))
    }
}

/// Checks a certificate's size (its content is checked by [`crate::pki::Trust::verify`]).
pub(super) fn check_cert(cert: &[u8]) -> Result<(), CheckError> {
    if cert.is_empty() || cert.len() > MAX_CERT {
        Err(CheckError::CertSize(cert.len()))
    } else {
        Ok(())
    }
}

/// Longest name, id or port accepted in a message.
const MAX_NAME: usize = 256;
/// Most entries of any list or map in a message.
const MAX_ENTRIES: usize = 1 << 20;

pub(super) fn check_name(field: &'static str, s: &str) -> Result<(), CheckError> {
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) {
        return Err(CheckError::Name { field });
    }
    Ok(())
}

pub(super) fn check_len(field: &'static str, count: usize) -> Result<(), CheckError> {
    if count > MAX_ENTRIES {
        return Err(CheckError::TooMany { field, count });
    }
    Ok(())
}

/// The longest line of a log accepted: [`MAX_LINE`](mvm_component::runtime::logs::MAX_LINE)
/// bytes, each of which may have become a 3-byte replacement character.
const MAX_LOG_LINE: usize = 3 * mvm_component::runtime::logs::MAX_LINE;

/// Checks lines of a job's logs: a bounded list, each of a vertex, of a bounded length.
pub(super) fn check_lines(lines: &[super::LogLine]) -> Result<(), CheckError> {
    check_len("log lines", lines.len())?;
    for l in lines {
        check_name("a log line's vertex", &l.vertex)?;
        if l.text.len() > MAX_LOG_LINE {
            return Err(CheckError::TooMany {
                field: "bytes in a log line",
                count: l.text.len(),
            });
        }
    }
    Ok(())
}

pub(super) fn check_params(p: &BTreeMap<String, String>) -> Result<(), CheckError> {
    check_len("parameters", p.len())?;
    p.keys().try_for_each(|k| check_name("a parameter name", k))
}

pub(super) fn check_components(c: &BTreeMap<String, Hash>) -> Result<(), CheckError> {
    check_len("components", c.len())?;
    c.keys()
        .try_for_each(|name| check_name("a component name", name))
}

/// Checks a node's queue samples and job traffic: short lists of names.
fn check_samples(l: &super::NodeLoad) -> Result<(), CheckError> {
    if l.queues.len() > super::MAX_QUEUE_SAMPLES {
        return Err(CheckError::TooMany {
            field: "queue samples",
            count: l.queues.len(),
        });
    }
    check_len("job traffic", l.traffic.len())?;
    if l.probes.len() > super::MAX_PROBE_SAMPLES {
        return Err(CheckError::TooMany {
            field: "probe samples",
            count: l.probes.len(),
        });
    }
    for p in &l.probes {
        check_name("a probe sample's probe", &p.probe)?;
        if let Some(j) = &p.job {
            check_name("a probe sample's job", j)?;
        }
    }
    for q in &l.queues {
        check_name("a queue sample's job", &q.job)?;
        check_name("a queue sample's queue", &q.queue)?;
    }
    if l.charges.len() > super::MAX_CHARGE_BATCHES {
        return Err(CheckError::TooMany {
            field: "charge batches",
            count: l.charges.len(),
        });
    }
    for b in &l.charges {
        if b.lines.len() > super::MAX_CHARGE_LINES {
            return Err(CheckError::TooMany {
                field: "charge lines",
                count: b.lines.len(),
            });
        }
        for c in &b.lines {
            check_name("a charge's payer", &c.payer)?;
        }
    }
    check_len("bidders", l.bidders.len())?;
    l.bidders
        .iter()
        .try_for_each(|b| check_name("a bidder", b))?;
    l.traffic
        .iter()
        .try_for_each(|t| check_name("a job's traffic's job", &t.job))
}

/// Checks a node's warm guests: a bounded map of names.
fn check_warm(warm: &BTreeMap<String, u32>) -> Result<(), CheckError> {
    check_len("warm templates", warm.len())?;
    warm.keys()
        .try_for_each(|k| check_name("a warm template's key", k))
}

/// Checks a template's name and shape.
fn check_template(t: Option<&super::TemplateSpec>) -> Result<(), CheckError> {
    let Some(t) = t else { return Ok(()) };
    check_name("the template name", &t.name)?;
    t.shape.validate().map_err(|problem| CheckError::Template {
        name: t.name.clone(),
        problem,
    })
}

impl Hello {
    /// Checks the certificate's size.
    ///
    /// # Errors
    /// It is empty or too large.
    pub fn validate(&self) -> Result<(), CheckError> {
        check_cert(&self.cert)
    }
}

impl Verdict {
    /// Checks the reason's length.
    ///
    /// # Errors
    /// The reason is too long.
    pub fn validate(&self) -> Result<(), CheckError> {
        match self {
            Verdict::Refused(why) if why.len() > MAX_REASON => {
                Err(CheckError::ReasonSize(why.len()))
            }
            _ => Ok(()),
        }
    }
}

impl Request {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), CheckError> {
        match self {
            Request::Group | Request::Leader => Ok(()),
            Request::Client(r) => r.validate(),
            Request::Node(r) => r.validate(),
            Request::Broker(r) => r.validate(),
            Request::Peer(PeerRequest::Policy { .. } | PeerRequest::Raft(_)) => Ok(()),
            Request::Peer(PeerRequest::Revocations { held }) => {
                check_len("revocation lists", held.len())?;
                held.keys().try_for_each(|d| check_name("a domain", d))
            }
            Request::Peer(PeerRequest::Blobs { put, forget }) => {
                check_len("blobs", put.len())?;
                check_len("hashes", forget.len())
            }
        }
    }
}

impl ClientRequest {
    fn validate(&self) -> Result<(), CheckError> {
        match self {
            ClientRequest::Missing { hashes } => check_len("hashes", hashes.len()),
            ClientRequest::Submit(s) | ClientRequest::Offer { submission: s, .. } => {
                check_name("the job name", &s.name)?;
                if let Some(p) = &s.on_behalf {
                    check_principal(p)?;
                }
                if let Some(o) = &s.owner {
                    check_name("the owner", o)?;
                }
                if let Some(d) = &s.domain {
                    check_name("the domain", d)?;
                }
                check_name("the topology file name", &s.topology_file)?;
                check_components(&s.components)?;
                check_len("modules", s.modules.len())?;
                if let Some(c) = s.checkpoint
                    && (c.interval_ms < MIN_INTERVAL_MS || !(1..=MAX_KEEP).contains(&c.keep))
                {
                    return Err(CheckError::Checkpoint {
                        interval_ms: c.interval_ms,
                        keep: c.keep,
                    });
                }
                check_params(&s.parameters)?;
                if let Some(f) = &s.files {
                    check_files(f)?;
                }
                check_len("swept parameters", s.sweep.len())?;
                for (name, values) in &s.sweep {
                    check_name("a swept parameter", name)?;
                    check_len("values of a swept parameter", values.len())?;
                }
                if s.points() > mvm_component::profile::MAX_SWEEP_POINTS {
                    return Err(CheckError::TooMany {
                        field: "points of a sweep",
                        count: usize::try_from(s.points()).unwrap_or(usize::MAX),
                    });
                }
                check_len("dependencies", s.after.len() + s.after_ok.len())?;
                check_template(s.requirements.template.as_ref())
            }
            ClientRequest::Migrate {
                vertex, node, to, ..
            } => {
                if let Some(v) = vertex {
                    check_name("the vertex", v)?;
                }
                if let Some(n) = node {
                    check_name("the node", n)?;
                }
                check_name("the node to move to", to)
            }
            ClientRequest::Drain { node, .. } => check_name("the node", node),
            ClientRequest::Accept {
                on_behalf: Some(p), ..
            } => check_principal(p),
            ClientRequest::Logs { after, vertex, .. } => {
                check_len("log cursors", after.len())?;
                for c in after {
                    check_name("a log cursor's vertex", &c.vertex)?;
                }
                match vertex {
                    Some(v) => check_name("the vertex", v),
                    None => Ok(()),
                }
            }
            ClientRequest::Status { .. }
            | ClientRequest::Wait { .. }
            | ClientRequest::Checkpoint { .. }
            | ClientRequest::Cancel { .. }
            | ClientRequest::Hold { .. }
            | ClientRequest::Bid { .. }
            | ClientRequest::Accept {
                on_behalf: None, ..
            }
            | ClientRequest::Bank(_)
            | ClientRequest::Agreements { .. }
            | ClientRequest::PolicyReload
            | ClientRequest::WebLogin => Ok(()),
        }
    }
}

impl NodeRequest {
    fn validate(&self) -> Result<(), CheckError> {
        match self {
            NodeRequest::Register(n) => {
                check_name("the node name", &n.name)?;
                check_name("the group", &n.group)?;
                check_name("the domain", &n.domain)?;
                check_len("addresses", n.addrs.len())?;
                check_len("images", n.images.len())?;
                check_warm(&n.load.warm)?;
                check_samples(&n.load)?;
                check_name("the architecture", &n.arch)
            }
            NodeRequest::Heartbeat(l) => {
                check_len("images", l.images.len())?;
                check_warm(&l.warm)?;
                check_samples(l)?;
                check_len("jobs", l.jobs.len())
            }
            NodeRequest::Fetch { .. } | NodeRequest::FetchCheckpoint { .. } => Ok(()),
            NodeRequest::Report(r) => r.validate(),
            NodeRequest::Logs { lines, .. } => check_lines(lines),
            NodeRequest::Outputs { files, .. } => check_outputs(files),
        }
    }
}

impl BrokerRequest {
    fn validate(&self) -> Result<(), CheckError> {
        match self {
            BrokerRequest::Start { .. } | BrokerRequest::ReleaseCut { .. } => Ok(()),
            BrokerRequest::Checkpoint { within_ms, .. } => check_save_ms(*within_ms),
            BrokerRequest::Move { step, .. } => match step {
                super::MoveStep::Relink { addrs, .. } => check_len("addresses", addrs.len()),
                super::MoveStep::Leave { within_ms, .. } => check_save_ms(*within_ms),
                _ => Ok(()),
            },
            BrokerRequest::Terminate { reason, .. } => check_len("reason bytes", reason.len()),
            BrokerRequest::Shrink { name } => check_name("the guest", name),
            BrokerRequest::Queues { .. } | BrokerRequest::Bid { .. } => Ok(()),
            BrokerRequest::Grow(g) => {
                check_name("the guest", &g.name)?;
                check_template(Some(&g.template))?;
                check_len("bootstrap addresses", g.bootstrap.len())?;
                check_cert(g.cert.as_bytes())?;
                check_cert(g.ca.as_bytes())
            }
            BrokerRequest::Prepare(p) => {
                check_principal(&p.owner)?;
                check_name("the topology file name", &p.topology_file)?;
                check_components(&p.components)?;
                check_params(&p.parameters)?;
                check_len("placement entries", p.placement.len())?;
                check_len("parts", p.parts.len())?;
                check_len("nodes serving the image", p.image_from.len())?;
                check_len("nodes holding the inputs", p.files_from.len())?;
                if let Some(files) = &p.restore_files {
                    check_outputs(files)?;
                }
                if p.here as usize >= p.parts.len() {
                    return Err(CheckError::NoSuchPart {
                        here: p.here,
                        parts: p.parts.len(),
                    });
                }
                if let Some(&part) = p.placement.iter().find(|&&x| x as usize >= p.parts.len()) {
                    return Err(CheckError::PlacementPart {
                        part,
                        parts: p.parts.len(),
                    });
                }
                if let Some(e) = &p.environment {
                    check_len("image id bytes", e.image.len())?;
                    check_template(e.template.as_ref())?;
                }
                if let Some(f) = &p.files {
                    check_files(f)?;
                }
                Ok(())
            }
        }
    }
}

impl Response {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), CheckError> {
        match self {
            Response::Missing { hashes } => check_len("hashes", hashes.len()),
            Response::Finished(r) => r.validate(),
            Response::Status(v) => check_len("jobs", v.len()),
            Response::Bank(b) => {
                check_len("accounts", b.accounts.len())?;
                check_len("transactions", b.transactions.len())
            }
            Response::Agreements(v) => {
                check_len("agreements", v.len())?;
                for a in v {
                    check_len("nodes of an agreement", a.nodes.len())?;
                }
                Ok(())
            }
            Response::Moved(v) => check_len("moves", v.len()),
            Response::Queues(v) => check_len("queues", v.len()),
            Response::WebLogin { url, .. } => check_len("bytes of a link", url.len()),
            Response::Logs(l) => {
                check_len("log lines", l.lines.len())?;
                l.lines
                    .iter()
                    .try_for_each(|j| check_lines(std::slice::from_ref(&j.line)))
            }
            Response::Registered { members, .. } => check_len("members", members.len()),
            Response::Heartbeat { members, stop, .. } => {
                check_len("members", members.len())?;
                check_len("jobs", stop.len())
            }
            Response::Ok
            | Response::Submitted(_)
            | Response::Error(_)
            | Response::Group(_)
            | Response::Module(_)
            | Response::Raft(_) => Ok(()),
            Response::Checkpoint { files, .. } => files.as_deref().map_or(Ok(()), check_outputs),
            Response::Policy { bundle, .. } => {
                bundle.as_ref().map_or(Ok(()), |b| Ok(b.check_layout()?))
            }
            Response::Revocations { crls } => {
                check_len("revocation lists", crls.len())?;
                match crls.iter().find(|c| c.len() > crate::pki::MAX_CRL) {
                    Some(c) => Err(CheckError::TooMany {
                        field: "bytes in a revocation list",
                        count: c.len(),
                    }),
                    None => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
