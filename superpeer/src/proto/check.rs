//! The checks of every message: bounded strings and lists, well-formed ids and hashes.

use std::collections::BTreeMap;

use mvm_component::policy::{BundleError, Principal};

use super::{
    BrokerRequest, ClientRequest, Hello, MAX_CERT, MAX_REASON, NodeRequest, PeerRequest, Request,
    Response, Verdict,
};

/// Why a message is refused: its first bad field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// A principal's name, domain or a role is not a valid name, or it has too many roles.
    #[error("a principal with a bad name, domain or role: {0}")]
    Principal(Box<Principal>),
    /// A policy digest that is neither empty nor 64 hex digits.
    #[error("a policy digest is 64 hex digits, not '{}'", .0.escape_default())]
    Digest(String),
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
    /// Not a content hash.
    #[error("bad module hash '{}'", .0.escape_default())]
    Hash(String),
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
    /// A placement that puts a vertex on a part that does not exist.
    #[error("placement names part {part} of {parts}")]
    PlacementPart {
        /// The part named.
        part: u32,
        /// How many parts there are.
        parts: usize,
    },
    /// A policy bundle whose files do not fit the layout.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

pub(super) fn check_principal(p: &Principal) -> Result<(), CheckError> {
    let ok = mvm_component::policy::name_ok;
    if ok(&p.name) && ok(&p.domain) && p.roles.len() <= 64 && p.roles.iter().all(|r| ok(r)) {
        Ok(())
    } else {
        Err(CheckError::Principal(Box::new(p.clone())))
    }
}

pub(super) fn check_digest(d: &str) -> Result<(), CheckError> {
    if d.is_empty() || (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(())
    } else {
        Err(CheckError::Digest(d.to_owned()))
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

/// Checks a content hash: 64 lowercase hex digits.
///
/// # Errors
/// [`CheckError::Hash`] when it is not one.
pub fn check_hash(s: &str) -> Result<(), CheckError> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(CheckError::Hash(s.to_owned()));
    }
    Ok(())
}

pub(super) fn check_len(field: &'static str, count: usize) -> Result<(), CheckError> {
    if count > MAX_ENTRIES {
        return Err(CheckError::TooMany { field, count });
    }
    Ok(())
}

pub(super) fn check_params(p: &BTreeMap<String, String>) -> Result<(), CheckError> {
    check_len("parameters", p.len())?;
    p.keys().try_for_each(|k| check_name("a parameter name", k))
}

pub(super) fn check_components(c: &BTreeMap<String, String>) -> Result<(), CheckError> {
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
            Request::Peer(PeerRequest::Policy { have }) => check_digest(have),
            Request::Peer(PeerRequest::Raft(_)) => Ok(()),
        }
    }
}

impl ClientRequest {
    fn validate(&self) -> Result<(), CheckError> {
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
                check_params(&s.parameters)
            }
            ClientRequest::Status { .. }
            | ClientRequest::Wait { .. }
            | ClientRequest::Cancel { .. }
            | ClientRequest::Hold { .. }
            | ClientRequest::PolicyReload => Ok(()),
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
                check_name("the architecture", &n.arch)
            }
            NodeRequest::Heartbeat(l) => {
                check_len("images", l.images.len())?;
                check_len("jobs", l.jobs.len())
            }
            NodeRequest::Fetch { hash } => check_hash(hash),
            NodeRequest::Report(r) => r.validate(),
        }
    }
}

impl BrokerRequest {
    fn validate(&self) -> Result<(), CheckError> {
        match self {
            BrokerRequest::Start { .. } => Ok(()),
            BrokerRequest::Terminate { reason, .. } => check_len("reason bytes", reason.len()),
            BrokerRequest::Prepare(p) => {
                check_principal(&p.owner)?;
                check_name("the topology file name", &p.topology_file)?;
                check_components(&p.components)?;
                check_params(&p.parameters)?;
                check_len("placement entries", p.placement.len())?;
                check_len("parts", p.parts.len())?;
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
            Response::Missing { hashes } => {
                check_len("hashes", hashes.len())?;
                hashes.iter().try_for_each(|h| check_hash(h))
            }
            Response::Finished(r) => r.validate(),
            Response::Status(v) => check_len("jobs", v.len()),
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
            Response::Policy { digest, bundle, .. } => {
                check_digest(digest)?;
                bundle.as_ref().map_or(Ok(()), |b| Ok(b.check_layout()?))
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
    fn a_message_with_a_malformed_job_id_does_not_decode() {
        let cancel = |job: &str| {
            let mut buf = Vec::new();
            // The same message as `ClientRequest::Cancel`, with any text for its id.
            let msg = BTreeMap::from([(
                "client",
                BTreeMap::from([("cancel", BTreeMap::from([("job", job)]))]),
            )]);
            ciborium::into_writer(&msg, &mut buf).expect("encodes");
            crate::proto::decode::<Request>(&buf)
        };
        for bad in ["a/b", "", "j-1", "ok-1.x_y"] {
            let e = cancel(bad).expect_err(bad);
            assert!(e.to_string().contains("job id"), "{e}");
        }
        let e = cancel("a b-1-1").expect_err("a space");
        assert!(e.to_string().contains("job id `a b-1-1`: expected"), "{e}");
        let ok = cancel("ok.x_y-1-a").expect("a job id");
        assert!(
            matches!(ok, Request::Client(ClientRequest::Cancel { job }) if job.as_str() == "ok.x_y-1-a")
        );
    }

    #[test]
    fn validation_refuses_bad_hashes_and_parts() {
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
            job: "j-1-1".parse().expect("a job id"),
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
        assert_eq!(e, CheckError::PlacementPart { part: 2, parts: 2 });
        assert!(e.to_string().contains("part 2"), "{e}");
        let e = BrokerRequest::Prepare(Box::new(PartSpec {
            here: 2,
            placement: vec![0],
            ..part.clone()
        }))
        .validate()
        .expect_err("here out of range");
        assert_eq!(e, CheckError::NoSuchPart { here: 2, parts: 2 });
        assert!(e.to_string().contains("does not exist"), "{e}");
        // A VM mode is one of three, or the message does not parse.
        let env = |mode: &str| {
            format!(r#"{{"image":"env:1","vcpus":1,"memory_mib":64,"mode":"{mode}"}}"#)
        };
        let e = serde_json::from_str::<EnvSpec>(&env("forever")).expect_err("bad VM mode");
        assert!(e.to_string().contains("forever"), "{e}");
        let ok: EnvSpec = serde_json::from_str(&env("save-restore")).expect("a VM mode");
        assert_eq!(ok.mode, crate::proto::VmMode::SaveRestore);
    }

    #[test]
    fn a_check_error_names_the_field_and_the_value() {
        let e = NodeRequest::Register(crate::proto::NodeInfo {
            name: "n1".into(),
            group: "g\n".into(),
            domain: "lab".into(),
            addrs: Vec::new(),
            cpus: 1,
            memory_bytes: 1 << 30,
            arch: "x86_64".into(),
            images: Vec::new(),
            slots: 1,
            eligible: false,
            load: crate::proto::NodeLoad::default(),
        })
        .validate()
        .expect_err("a control character");
        assert_eq!(e, CheckError::Name { field: "the group" });
        assert!(e.to_string().starts_with("the group must be"), "{e}");
        let e = check_len("hashes", MAX_ENTRIES + 1).expect_err("too many");
        assert_eq!(
            e.to_string(),
            format!("too many hashes ({})", MAX_ENTRIES + 1)
        );
        let e = Hello {
            cert: bytes::Bytes::new(),
        }
        .validate()
        .expect_err("empty");
        assert_eq!(e, CheckError::CertSize(0));
        let e = Verdict::Refused("x".repeat(MAX_REASON + 1))
            .validate()
            .expect_err("too long");
        assert_eq!(e, CheckError::ReasonSize(MAX_REASON + 1));
        let e = Request::Peer(PeerRequest::Policy { have: "xy".into() })
            .validate()
            .expect_err("short");
        assert_eq!(e, CheckError::Digest("xy".into()));
    }

    #[test]
    fn a_check_error_is_a_failure_of_bad_input() {
        let f = crate::proto::Failure::from(CheckError::Hash("zz".into()));
        assert_eq!(f.kind, crate::proto::FailureKind::Input);
        assert_eq!(f.message, "bad module hash 'zz'");
    }
}
