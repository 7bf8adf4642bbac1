//! The checks of every message: bounded strings and lists, well-formed ids and hashes.

use std::collections::BTreeMap;

use mvm_component::policy::Principal;

use super::{
    BrokerRequest, ClientRequest, Hello, MAX_CERT, MAX_REASON, NodeRequest, PeerRequest, Request,
    Response, VM_MODES, Verdict,
};

pub(super) fn check_principal(p: &Principal) -> Result<(), String> {
    let ok = mvm_component::policy::name_ok;
    if ok(&p.name) && ok(&p.domain) && p.roles.len() <= 64 && p.roles.iter().all(|r| ok(r)) {
        Ok(())
    } else {
        Err(format!("a principal with a bad name, domain or role: {p}"))
    }
}

pub(super) fn check_digest(d: &str) -> Result<(), String> {
    if d.is_empty() || (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(())
    } else {
        Err("a policy digest is 64 hex digits".into())
    }
}

/// Checks a certificate's size (its content is checked by [`crate::pki::Trust::verify`]).
pub(super) fn check_cert(cert: &[u8]) -> Result<(), String> {
    if cert.is_empty() || cert.len() > MAX_CERT {
        Err(format!(
            "a certificate of {} bytes (1 to {MAX_CERT})",
            cert.len()
        ))
    } else {
        Ok(())
    }
}

/// Longest name, id or port accepted in a message.
const MAX_NAME: usize = 256;
/// Most entries of any list or map in a message.
const MAX_ENTRIES: usize = 1 << 20;

pub(super) fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME} printable characters"
        ));
    }
    Ok(())
}

/// Checks a job id: 1–128 characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// Why it is not one.
pub fn check_job_id(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!("bad job id '{}'", s.escape_default()));
    }
    Ok(())
}

/// Checks a content hash: 64 lowercase hex digits.
///
/// # Errors
/// Why it is not one.
pub fn check_hash(s: &str) -> Result<(), String> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("bad module hash '{}'", s.escape_default()));
    }
    Ok(())
}

pub(super) fn check_len(what: &str, n: usize) -> Result<(), String> {
    if n > MAX_ENTRIES {
        return Err(format!("too many {what} ({n})"));
    }
    Ok(())
}

pub(super) fn check_params(p: &BTreeMap<String, String>) -> Result<(), String> {
    check_len("parameters", p.len())?;
    p.keys().try_for_each(|k| check_name("a parameter name", k))
}

pub(super) fn check_components(c: &BTreeMap<String, String>) -> Result<(), String> {
    check_len("components", c.len())?;
    for (name, hash) in c {
        check_name("a component name", name)?;
        check_hash(hash)?;
    }
    Ok(())
}

impl Hello {
    /// Checks the certificate's size.
    ///
    /// # Errors
    /// It is empty or too large.
    pub fn validate(&self) -> Result<(), String> {
        check_cert(&self.cert)
    }
}

impl Verdict {
    /// Checks the reason's length.
    ///
    /// # Errors
    /// The reason is too long.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Verdict::Refused(why) if why.len() > MAX_REASON => Err(format!(
                "a reason of {} bytes (at most {MAX_REASON})",
                why.len()
            )),
            _ => Ok(()),
        }
    }
}

impl Request {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::Group | Request::Leader => Ok(()),
            Request::Client(r) => r.validate(),
            Request::Node(r) => r.validate(),
            Request::Broker(r) => r.validate(),
            Request::Peer(PeerRequest::Policy { have }) => check_digest(have),
            Request::Peer(PeerRequest::Raft(_)) => Ok(()),
        }
    }
}

impl ClientRequest {
    fn validate(&self) -> Result<(), String> {
        match self {
            ClientRequest::Missing { hashes } => {
                check_len("hashes", hashes.len())?;
                hashes.iter().try_for_each(|h| check_hash(h))
            }
            ClientRequest::Submit(s) => {
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
                if let Some(m) = &s.requirements.vm_mode
                    && !VM_MODES.contains(&m.as_str())
                {
                    return Err(format!("unknown VM mode '{m}'"));
                }
                check_params(&s.parameters)
            }
            ClientRequest::Status { job } => job.as_deref().map_or(Ok(()), check_job_id),
            ClientRequest::Wait { job, .. }
            | ClientRequest::Cancel { job }
            | ClientRequest::Hold { job, .. } => check_job_id(job),
            ClientRequest::PolicyReload => Ok(()),
        }
    }
}

impl NodeRequest {
    fn validate(&self) -> Result<(), String> {
        match self {
            NodeRequest::Register(n) => {
                check_name("the node name", &n.name)?;
                check_name("the group", &n.group)?;
                check_name("the domain", &n.domain)?;
                check_len("addresses", n.addrs.len())?;
                check_len("images", n.images.len())?;
                check_name("the architecture", &n.arch)
            }
            NodeRequest::Heartbeat(l) => {
                check_len("images", l.images.len())?;
                check_len("jobs", l.jobs.len())?;
                l.jobs.iter().try_for_each(|j| check_job_id(j))
            }
            NodeRequest::Fetch { hash } => check_hash(hash),
            NodeRequest::Report(r) => r.validate(),
        }
    }
}

impl BrokerRequest {
    fn validate(&self) -> Result<(), String> {
        match self {
            BrokerRequest::Start { job } => check_job_id(job),
            BrokerRequest::Terminate { job, reason } => {
                check_job_id(job)?;
                check_len("reason bytes", reason.len())
            }
            BrokerRequest::Prepare(p) => {
                check_job_id(&p.job)?;
                check_principal(&p.owner)?;
                check_name("the topology file name", &p.topology_file)?;
                check_components(&p.components)?;
                check_params(&p.parameters)?;
                check_len("placement entries", p.placement.len())?;
                check_len("parts", p.parts.len())?;
                if p.here as usize >= p.parts.len() {
                    return Err(format!(
                        "part {} does not exist ({} parts)",
                        p.here,
                        p.parts.len()
                    ));
                }
                if let Some(bad) = p.placement.iter().find(|&&x| x as usize >= p.parts.len()) {
                    return Err(format!("placement names part {bad} of {}", p.parts.len()));
                }
                if let Some(e) = &p.environment {
                    check_len("image id bytes", e.image.len())?;
                    if !VM_MODES.contains(&e.mode.as_str()) {
                        return Err(format!("unknown VM mode '{}'", e.mode));
                    }
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
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Response::Missing { hashes } => {
                check_len("hashes", hashes.len())?;
                hashes.iter().try_for_each(|h| check_hash(h))
            }
            Response::Submitted(s) => check_job_id(&s.job),
            Response::Finished(r) => r.validate(),
            Response::Status(v) => {
                check_len("jobs", v.len())?;
                v.iter().try_for_each(|s| check_job_id(&s.job))
            }
            Response::Registered { members, .. } => check_len("members", members.len()),
            Response::Heartbeat { members, stop, .. } => {
                check_len("members", members.len())?;
                check_len("jobs", stop.len())?;
                stop.iter().try_for_each(|j| check_job_id(j))
            }
            Response::Ok
            | Response::Error(_)
            | Response::Group(_)
            | Response::Module(_)
            | Response::Raft(_) => Ok(()),
            Response::Policy { digest, bundle, .. } => {
                check_digest(digest)?;
                bundle
                    .as_ref()
                    .map_or(Ok(()), |b| b.check_layout().map_err(|e| e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mvm_queue::queue::Config as QueueConfig;

    use super::*;
    use crate::proto::{EnvSpec, LimitSpec, Member, PartSpec};

    #[test]
    fn validation_refuses_bad_ids_hashes_and_parts() {
        assert!(
            ClientRequest::Cancel { job: "a/b".into() }
                .validate()
                .is_err()
        );
        assert!(
            ClientRequest::Cancel { job: String::new() }
                .validate()
                .is_err()
        );
        assert!(
            ClientRequest::Cancel {
                job: "ok-1.x_y".into()
            }
            .validate()
            .is_ok()
        );
        assert!(NodeRequest::Fetch { hash: "ab".into() }.validate().is_err());
        assert!(
            NodeRequest::Fetch {
                hash: "A".repeat(64)
            }
            .validate()
            .is_err()
        );
        assert!(
            NodeRequest::Fetch {
                hash: "a".repeat(64)
            }
            .validate()
            .is_ok()
        );
        let part = PartSpec {
            job: "j".into(),
            topology_file: "t.dot".into(),
            topology: String::new(),
            queue: QueueConfig::default(),
            components: BTreeMap::new(),
            parameters: BTreeMap::new(),
            limits: LimitSpec::default(),
            placement: vec![0, 2],
            parts: vec![
                Member {
                    peer: "p".into(),
                    addrs: vec![],
                    eligible: true
                };
                2
            ],
            here: 1,
            start: false,
            environment: None,
            owner: mvm_component::policy::Principal {
                kind: mvm_component::policy::PrincipalKind::User,
                name: "alice".into(),
                domain: "lab".into(),
                roles: Vec::new(),
            },
            policy_digest: String::new(),
        };
        let e = BrokerRequest::Prepare(Box::new(part.clone()))
            .validate()
            .expect_err("part 2 of 2");
        assert!(e.contains("part 2"), "{e}");
        let e = BrokerRequest::Prepare(Box::new(PartSpec {
            here: 2,
            placement: vec![0],
            ..part.clone()
        }))
        .validate()
        .expect_err("here out of range");
        assert!(e.contains("does not exist"), "{e}");
        let e = BrokerRequest::Prepare(Box::new(PartSpec {
            placement: vec![0],
            environment: Some(EnvSpec {
                image: "env:1".into(),
                vcpus: 1,
                memory_mib: 64,
                mode: "forever".into(),
            }),
            ..part
        }))
        .validate()
        .expect_err("bad VM mode");
        assert!(e.contains("forever"), "{e}");
    }
}
