//! Admission: who owns a submitted job, whether the policy lets them run it here, and what it
//! holds (resources of its owner, slots of nodes) while its placement is on its way to the log
//! (the [`Ledger`]).

use std::collections::HashMap;

use libp2p::PeerId;
use mvm_component::policy::{self as pol, Principal, PrincipalKind, Question, Resource};

use super::core::Core;
use crate::joblog::JobLog;
use crate::joblog::state::Resources;
use crate::proto::{Failure, FailureKind, GroupSummary, JobId, Response, Submission};
use crate::site::Site;

/// What placements under way hold before the log has their jobs: per job, its owner's
/// resources and its nodes' slots, until the job's entry has been applied (or refused).
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Vertex slots, per node.
    slots: HashMap<PeerId, u32>,
    /// Resources, per owner (`name@domain`).
    held: HashMap<String, Resources>,
    /// What each job holds.
    jobs: HashMap<JobId, Held>,
}

/// What one job holds.
#[derive(Debug, Default)]
struct Held {
    /// Its owner's key (empty when the log holds its resources already).
    owner: String,
    resources: Resources,
    /// Slots, per node.
    slots: Vec<(PeerId, u32)>,
}

impl Ledger {
    /// Slots of `node` held.
    pub(super) fn slots(&self, node: &PeerId) -> u32 {
        self.slots.get(node).copied().unwrap_or(0)
    }

    /// Resources of `owner` held.
    fn held(&self, owner: &str) -> Resources {
        self.held.get(owner).copied().unwrap_or_default()
    }

    /// `job` holds `resources` of `owner`.
    fn hold(&mut self, job: &JobId, owner: String, resources: Resources) {
        let h = self.held.entry(owner.clone()).or_default();
        h.vcpus += resources.vcpus;
        h.memory_mib += resources.memory_mib;
        h.vertices += resources.vertices;
        self.jobs.entry(job.to_owned()).or_insert(Held {
            owner,
            resources,
            slots: Vec::new(),
        });
    }

    /// `job` holds `n` more slots of `node`.
    pub(super) fn hold_slots(&mut self, job: &JobId, node: PeerId, n: u32) {
        *self.slots.entry(node).or_insert(0) += n;
        self.jobs
            .entry(job.to_owned())
            .or_default()
            .slots
            .push((node, n));
    }

    /// Gives back what `job` holds (the log holds it now, or the job was not recorded).
    pub(super) fn release(&mut self, job: &JobId) {
        let Some(Held {
            owner,
            resources: r,
            slots,
        }) = self.jobs.remove(job)
        else {
            return;
        };
        if let Some(h) = self.held.get_mut(&owner) {
            h.vcpus -= r.vcpus;
            h.memory_mib -= r.memory_mib;
            h.vertices -= r.vertices;
            if *h == Resources::default() {
                self.held.remove(&owner);
            }
        }
        for (node, n) in slots {
            if let Some(s) = self.slots.get_mut(&node) {
                *s = s.saturating_sub(n);
                if *s == 0 {
                    self.slots.remove(&node);
                }
            }
        }
    }
}

/// Why a job is not admitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum AdmitError {
    /// A user's job names another owner on behalf of whom it is sent.
    #[error("{caller} is not a super-peer; only super-peers forward jobs")]
    NotASuperPeer {
        /// Who sent it.
        caller: Box<Principal>,
    },
    /// The profile names an owner or domain other than the certificate's.
    #[error("the profile names owner {owner}@{domain}, but the certificate is {caller}")]
    ClaimsOther {
        /// Who sent it.
        caller: Box<Principal>,
        /// The owner the profile names.
        owner: String,
        /// The domain the profile names.
        domain: String,
    },
    /// A super-peer forwards a job of another domain's user.
    #[error(
        "{caller} cannot forward a job on behalf of {owner}: a super-peer forwards only jobs \
         of users of its own domain"
    )]
    ForeignOwner {
        /// The forwarding super-peer.
        caller: Box<Principal>,
        /// The owner it names.
        owner: Box<Principal>,
    },
    /// A node (or a super-peer not forwarding) submits a job of its own.
    #[error(
        "{caller} submits no jobs of its own (a super-peer, with role superpeer, forwards a \
         user's job)"
    )]
    NoOwnJobs {
        /// Who sent it.
        caller: Box<Principal>,
    },
    /// A forwarded job that does not name the certificate its owner sent it with (without it,
    /// no revocation list can be checked).
    #[error(
        "{caller} forwards {owner}'s job without the serial of the certificate {owner} sent it \
         with (an even number of hex digits, at most 40)"
    )]
    NoOwnerCert {
        /// The forwarding super-peer.
        caller: Box<Principal>,
        /// The owner it names.
        owner: Box<Principal>,
    },
    /// The certificate its owner sent it with is revoked (a job forwarded by another domain's
    /// super-peer that had not yet taken the list).
    #[error("{owner}'s certificate (serial {serial}) is revoked by the CA of domain {}", owner.domain)]
    Revoked {
        /// The owner.
        owner: Box<Principal>,
        /// The certificate's serial, hex.
        serial: String,
    },
    /// The policy refuses it.
    #[error("refused by policy: {0}")]
    Policy(String),
    /// Its bid or budget is above what its owner holds.
    #[error("{bid} is above {payer}'s balance of {held} (see `mvm bank balance`)")]
    Bid {
        /// The bid or budget, in words.
        bid: String,
        /// The paying account.
        payer: String,
        /// What it holds, in credits.
        held: String,
    },
}

/// A job not admitted, by name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("job {job}: {error}")]
pub(crate) struct Refusal {
    /// The job's name.
    pub(crate) job: String,
    /// Why.
    #[source]
    pub(crate) error: AdmitError,
}

/// The key of an owner in the tallies.
pub(super) fn owner_key(p: &Principal) -> String {
    format!("{}@{}", p.name, p.domain)
}

impl Core {
    /// The owner of `s`, sent by `who` ([`owner_of`]), unless a revocation list this daemon
    /// holds revokes the certificate the owner sent it with. A forwarded job must name that
    /// certificate's serial.
    pub(super) fn owner(&self, who: &Principal, s: &Submission) -> Result<Principal, AdmitError> {
        let owner = owner_of(who, s)?;
        let forwarded = who.kind == PrincipalKind::Node;
        match &s.owner_cert {
            Some(serial) if self.site.net.trust().is_revoked(&owner.domain, serial) => {
                Err(AdmitError::Revoked {
                    owner: Box::new(owner),
                    serial: serial.clone(),
                })
            }
            Some(serial) if !forwarded || is_serial(serial) => Ok(owner),
            None if !forwarded => Ok(owner),
            _ => Err(AdmitError::NoOwnerCert {
                caller: Box::new(who.clone()),
                owner: Box::new(owner),
            }),
        }
    }

    /// Asks the policy whether `owner` may submit `s` (and use its image) here as `job`,
    /// counting what the owner's jobs in the log and placements under way hold; if so, the
    /// job's resources are held in the ledger until it is released.
    pub(super) fn authorize(
        &mut self,
        job: &JobId,
        owner: &Principal,
        s: &Submission,
        vertices: usize,
    ) -> Result<Resources, AdmitError> {
        let engine = self.site.policies.current().engine.clone();
        let r = &s.requirements;
        let domain = self.site.domain.clone();
        let asked = Resources {
            vcpus: i64::from(r.vcpus.unwrap_or(1)),
            memory_mib: i64::try_from(r.memory_bytes.unwrap_or(0) >> 20).unwrap_or(i64::MAX),
            vertices: i64::try_from(vertices).unwrap_or(i64::MAX),
        };
        let key = owner_key(owner);
        let logged = self.log.read(|st| st.held(owner));
        let pending = self.ledger.held(&key);
        let image = r.image.clone().unwrap_or_else(|| "host".into());
        let facts = pol::Job {
            name: s.name.clone(),
            owner: owner.name.clone(),
            owner_domain: owner.domain.clone(),
            domain: domain.clone(),
            vcpus: asked.vcpus,
            memory_mib: asked.memory_mib,
            vertices: asked.vertices,
            image: image.clone(),
            user_vcpus: logged.vcpus + pending.vcpus + asked.vcpus,
            user_memory_mib: logged.memory_mib + pending.memory_mib + asked.memory_mib,
            user_vertices: logged.vertices + pending.vertices + asked.vertices,
        };
        engine
            .decide(&Question {
                actor: owner.clone(),
                action: "submit".into(),
                resource: Resource::Job(facts.clone()),
            })
            .into_result()
            .map_err(AdmitError::Policy)?;
        let asks = match (r.bid, r.market) {
            (Some(rate), _) => Some((
                rate,
                format!(
                    "a bid of {} credits a CPU-second",
                    crate::proto::format_credits(rate)
                ),
            )),
            (None, Some(m)) => Some((
                m.budget,
                format!(
                    "a budget of {} credits",
                    crate::proto::format_credits(m.budget)
                ),
            )),
            (None, None) => None,
        };
        if let Some((rate, what)) = asks {
            engine
                .decide(&Question {
                    actor: owner.clone(),
                    action: "bid".into(),
                    resource: Resource::Job(facts),
                })
                .into_result()
                .map_err(AdmitError::Policy)?;
            let payer = crate::proto::account_of(owner);
            let held = self.log.read(|st| st.bank().balance(&payer));
            if held < rate {
                return Err(AdmitError::Bid {
                    bid: what,
                    payer,
                    held: crate::proto::format_credits(held),
                });
            }
        }
        if image != "host" {
            engine
                .decide(&Question {
                    actor: owner.clone(),
                    action: "use-image".into(),
                    resource: Resource::Image(pol::Image { id: image, domain }),
                })
                .into_result()
                .map_err(AdmitError::Policy)?;
        }
        self.ledger.hold(job, key, asked);
        Ok(asked)
    }
}

/// The answer refusing `who` to `action` (`read-results`, `cancel`) job `id`, if the policy
/// refuses (or there is no such job).
pub(super) fn refusal(
    site: &Site,
    log: &JobLog,
    who: &Principal,
    action: &str,
    id: &JobId,
) -> Option<Response> {
    let Some(facts) = log.read(|s| s.job(id).map(|j| facts_of(&site.domain, j))) else {
        return Some(super::fail(
            crate::proto::FailureKind::NotFound,
            format!("no job {id}"),
        ));
    };
    site.policies
        .current()
        .engine
        .decide(&Question {
            actor: who.clone(),
            action: action.into(),
            resource: Resource::Job(facts),
        })
        .into_result()
        .err()
        .map(|why| {
            super::fail(
                crate::proto::FailureKind::Refused,
                format!("job {id}: {why}"),
            )
        })
}

/// What the policy is told of a job in the log (for reading and cancelling it).
pub(super) fn facts_of(domain: &str, j: &crate::joblog::state::JobRecord) -> pol::Job {
    pol::Job {
        name: j.name.clone(),
        owner: j.owner.name.clone(),
        owner_domain: j.owner.domain.clone(),
        domain: domain.to_owned(),
        vcpus: j.resources.vcpus,
        memory_mib: j.resources.memory_mib,
        vertices: j.resources.vertices,
        image: j.image.clone(),
        user_vcpus: j.resources.vcpus,
        user_memory_mib: j.resources.memory_mib,
        user_vertices: j.resources.vertices,
    }
}

/// Who owns a submitted job: the user who sends it, or the user of its own domain that a
/// forwarding super-peer authenticated. The profile's owner and domain, when given, must be
/// the certificate's.
pub(super) fn owner_of(caller: &Principal, s: &Submission) -> Result<Principal, AdmitError> {
    match caller.kind {
        PrincipalKind::User => {
            if s.on_behalf.is_some() {
                return Err(AdmitError::NotASuperPeer {
                    caller: Box::new(caller.clone()),
                });
            }
            let claims_other = s.owner.as_ref().is_some_and(|o| *o != caller.name)
                || s.domain.as_ref().is_some_and(|d| *d != caller.domain);
            if claims_other {
                return Err(AdmitError::ClaimsOther {
                    caller: Box::new(caller.clone()),
                    owner: s.owner.clone().unwrap_or_else(|| caller.name.clone()),
                    domain: s.domain.clone().unwrap_or_else(|| caller.domain.clone()),
                });
            }
            Ok(caller.clone())
        }
        PrincipalKind::Node => match &s.on_behalf {
            // A super-peer speaks only for the users it authenticated: its own domain's. (The
            // owner's use of this domain is then the inter-domain policy's to decide.)
            Some(owner) if owner.domain != caller.domain => Err(AdmitError::ForeignOwner {
                caller: Box::new(caller.clone()),
                owner: Box::new(owner.clone()),
            }),
            Some(owner) if s.hops > 0 && caller.roles.iter().any(|r| r == "superpeer") => {
                Ok(owner.clone())
            }
            _ => Err(AdmitError::NoOwnJobs {
                caller: Box::new(caller.clone()),
            }),
        },
    }
}

/// Whether `serial` reads as a certificate's serial: 1 to 20 bytes in hex (X.509 serials are
/// at most 20 bytes), as a revocation list can be checked against.
fn is_serial(serial: &str) -> bool {
    (2..=40).contains(&serial.len())
        && serial.len().is_multiple_of(2)
        && serial.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `caller` may act for `user`: a super-peer of `user`'s own domain (which
/// authenticated the user) passing on a request of theirs.
///
/// # Errors
/// `caller` is not a super-peer, or not of `user`'s domain.
pub(super) fn speaks_for(caller: &Principal, user: &Principal) -> Result<(), Failure> {
    let superpeer =
        caller.kind == PrincipalKind::Node && caller.roles.iter().any(|r| r == "superpeer");
    if superpeer && caller.domain == user.domain {
        Ok(())
    } else {
        Err(Failure::new(
            FailureKind::Refused,
            format!("{caller} may not act for {user}: only a super-peer of {user}'s domain may"),
        ))
    }
}

/// Whether the inter-domain policy lets `owner` submit to group `g` of another domain (that
/// group's super-peer decides by its domain's policy in turn).
pub(super) fn inter_domain_allows(site: &Site, owner: &Principal, g: &GroupSummary) -> bool {
    site.policies
        .current()
        .engine
        .inter_domain(&Question {
            actor: owner.clone(),
            action: "submit".into(),
            resource: Resource::Group(pol::Group {
                name: g.group.clone(),
                domain: g.domain.clone(),
            }),
        })
        .allowed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(kind: PrincipalKind, name: &str, domain: &str, roles: &[&str]) -> Principal {
        Principal {
            kind,
            name: name.into(),
            domain: domain.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    #[test]
    fn a_job_is_owned_by_its_user_or_by_the_user_its_own_super_peer_forwards() {
        let alice = who(PrincipalKind::User, "alice", "physics", &["researcher"]);
        let sp = who(PrincipalKind::Node, "sp", "physics", &["superpeer"]);
        let bio_sp = who(PrincipalKind::Node, "sp", "biology", &["superpeer"]);
        let node = who(PrincipalKind::Node, "n0", "physics", &[]);
        let plain = Submission::default();
        assert_eq!(owner_of(&alice, &plain), Ok(alice.clone()));
        let claims = Submission {
            owner: Some("bob".into()),
            ..Submission::default()
        };
        let e = owner_of(&alice, &claims).expect_err("another owner");
        assert!(
            matches!(&e, AdmitError::ClaimsOther { owner, domain, .. } if owner == "bob" && domain == "physics"),
            "{e:?}"
        );
        assert!(e.to_string().contains("names owner bob@physics"), "{e}");
        let forwarded = Submission {
            on_behalf: Some(alice.clone()),
            hops: 1,
            ..Submission::default()
        };
        assert_eq!(owner_of(&sp, &forwarded), Ok(alice.clone()));
        // Not for another domain's user, not without the role, not by a user, not unforwarded.
        let e = owner_of(&bio_sp, &forwarded).expect_err("another domain's user");
        assert!(matches!(&e, AdmitError::ForeignOwner { owner, .. } if **owner == alice));
        assert!(e.to_string().contains("its own domain"), "{e}");
        assert!(owner_of(&node, &forwarded).is_err());
        assert!(matches!(
            owner_of(&alice, &forwarded),
            Err(AdmitError::NotASuperPeer { .. })
        ));
        let unforwarded = Submission {
            hops: 0,
            ..forwarded
        };
        assert!(owner_of(&sp, &unforwarded).is_err());
        assert!(matches!(
            owner_of(&sp, &plain),
            Err(AdmitError::NoOwnJobs { .. })
        ));
    }
}
