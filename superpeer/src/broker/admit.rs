//! Admission: who owns a submitted job, whether the policy lets them run it here, and what it
//! holds (resources of its owner, slots of nodes) while its placement is on the way to the log.

use std::collections::HashMap;
use std::sync::Arc;

use libp2p::PeerId;
use mvm_component::policy::{self as pol, Principal, PrincipalKind, Question, Resource};

use super::Broker;
use crate::joblog::state::Resources;
use crate::proto::{GroupSummary, Response, Submission};
use crate::site::Site;

/// What placements under way hold before the log has their jobs.
#[derive(Debug, Default)]
pub(super) struct Inflight {
    /// Vertex slots, per node.
    pub(super) slots: HashMap<PeerId, u32>,
    /// Resources, per owner (`name@domain`).
    pub(super) held: HashMap<String, Resources>,
}

/// A placement's hold on its owner's resources and its nodes' slots; given back when dropped
/// (by then the log holds them, or the job was not recorded).
pub(super) struct Reservation {
    broker: Arc<Broker>,
    owner: String,
    pub(super) resources: Resources,
    slots: Vec<(PeerId, u32)>,
}

impl Reservation {
    /// A reservation of slots only (for a job whose resources the log holds already).
    pub(super) fn slots_only(broker: &Arc<Broker>) -> Reservation {
        Reservation {
            broker: broker.clone(),
            owner: String::new(),
            resources: Resources::default(),
            slots: Vec::new(),
        }
    }

    /// Takes `n` more slots of `node` (the caller holds the broker's inflight lock).
    pub(super) fn take_slots(&mut self, inflight: &mut Inflight, node: PeerId, n: u32) {
        *inflight.slots.entry(node).or_insert(0) += n;
        self.slots.push((node, n));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut inflight = self.broker.inflight.lock();
        if let Some(h) = inflight.held.get_mut(&self.owner) {
            h.vcpus -= self.resources.vcpus;
            h.memory_mib -= self.resources.memory_mib;
            h.vertices -= self.resources.vertices;
            if *h == Resources::default() {
                inflight.held.remove(&self.owner);
            }
        }
        for (node, n) in &self.slots {
            if let Some(s) = inflight.slots.get_mut(node) {
                *s = s.saturating_sub(*n);
                if *s == 0 {
                    inflight.slots.remove(node);
                }
            }
        }
    }
}

/// The key of an owner in the tallies.
pub(super) fn owner_key(p: &Principal) -> String {
    format!("{}@{}", p.name, p.domain)
}

impl Broker {
    /// Asks the policy whether `owner` may submit `s` (and use its image) here, counting what
    /// the owner's jobs in the log and placements under way hold; if so, the job's resources
    /// count as held until the returned reservation is dropped.
    pub(super) fn authorize(
        self: &Arc<Self>,
        owner: &Principal,
        s: &Submission,
        vertices: usize,
    ) -> Result<(Reservation, pol::Job), String> {
        let engine = self.site.policies.current().engine.clone();
        let r = &s.requirements;
        let domain = self.site.domain.clone();
        let asked = Resources {
            vcpus: i64::from(r.vcpus.unwrap_or(1)),
            memory_mib: i64::try_from(r.memory_bytes.unwrap_or(0) >> 20).unwrap_or(i64::MAX),
            vertices: i64::try_from(vertices).unwrap_or(i64::MAX),
        };
        let key = owner_key(owner);
        // Decided and counted under one lock: two jobs at once cannot both slip under a limit.
        let mut inflight = self.inflight.lock();
        let logged = self.log.read(|st| st.held(owner));
        let pending = inflight.held.get(&key).copied().unwrap_or_default();
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
            .into_result()?;
        if image != "host" {
            engine
                .decide(&Question {
                    actor: owner.clone(),
                    action: "use-image".into(),
                    resource: Resource::Image(pol::Image { id: image, domain }),
                })
                .into_result()?;
        }
        let h = inflight.held.entry(key.clone()).or_default();
        h.vcpus += asked.vcpus;
        h.memory_mib += asked.memory_mib;
        h.vertices += asked.vertices;
        drop(inflight);
        let reservation = Reservation {
            broker: self.clone(),
            owner: key,
            resources: asked,
            slots: Vec::new(),
        };
        Ok((reservation, facts))
    }

    /// The answer refusing `who` to `action` (`read-results`, `cancel`) job `id`, if the
    /// policy refuses (or there is no such job).
    pub(super) fn refusal(&self, who: &Principal, action: &str, id: &str) -> Option<Response> {
        let Some(facts) = self
            .log
            .read(|s| s.job(id).map(|j| facts_of(&self.site.domain, j)))
        else {
            return Some(super::fail(
                crate::proto::FailureKind::NotFound,
                format!("no job {id}"),
            ));
        };
        self.site
            .policies
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

/// A job name made safe for a job id.
pub(super) fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() { "job".into() } else { s }
}

/// Who owns a submitted job: the user who sends it, or the user of its own domain that a
/// forwarding super-peer authenticated. The profile's owner and domain, when given, must be
/// the certificate's.
pub(super) fn owner_of(caller: &Principal, s: &Submission) -> Result<Principal, String> {
    match caller.kind {
        PrincipalKind::User => {
            if s.on_behalf.is_some() {
                return Err(format!(
                    "{caller} is not a super-peer; only super-peers forward jobs"
                ));
            }
            let claims_other = s.owner.as_ref().is_some_and(|o| *o != caller.name)
                || s.domain.as_ref().is_some_and(|d| *d != caller.domain);
            if claims_other {
                return Err(format!(
                    "the profile names owner {}@{}, but the certificate is {caller}",
                    s.owner.as_deref().unwrap_or(&caller.name),
                    s.domain.as_deref().unwrap_or(&caller.domain)
                ));
            }
            Ok(caller.clone())
        }
        PrincipalKind::Node => match &s.on_behalf {
            // A super-peer speaks only for the users it authenticated: its own domain's. (The
            // owner's use of this domain is then the inter-domain policy's to decide.)
            Some(owner) if owner.domain != caller.domain => Err(format!(
                "{caller} cannot forward a job on behalf of {owner}: a super-peer forwards only \
                 jobs of users of its own domain"
            )),
            Some(owner) if s.hops > 0 && caller.roles.iter().any(|r| r == "superpeer") => {
                Ok(owner.clone())
            }
            _ => Err(format!(
                "{caller} submits no jobs of its own (a super-peer, with role superpeer, \
                 forwards a user's job)"
            )),
        },
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
        assert!(owner_of(&alice, &claims).is_err_and(|e| e.contains("names owner bob")));
        let forwarded = Submission {
            on_behalf: Some(alice.clone()),
            hops: 1,
            ..Submission::default()
        };
        assert_eq!(owner_of(&sp, &forwarded), Ok(alice.clone()));
        // Not for another domain's user, not without the role, not by a user, not unforwarded.
        let e = owner_of(&bio_sp, &forwarded).expect_err("another domain's user");
        assert!(e.contains("its own domain"), "{e}");
        assert!(owner_of(&node, &forwarded).is_err());
        assert!(owner_of(&alice, &forwarded).is_err_and(|e| e.contains("not a super-peer")));
        let unforwarded = Submission {
            hops: 0,
            ..forwarded
        };
        assert!(owner_of(&sp, &unforwarded).is_err());
        assert!(owner_of(&sp, &plain).is_err());
    }
}
