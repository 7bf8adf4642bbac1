//! The broker's triggers ([`crate::trigger`]): at every tick of the leader, the group's
//! metrics become the values the triggers' conditions read, and the actions of those that fire
//! become effects: guests made on nodes with room (each running a node of the group, with an
//! identity this super-peer issues from the domain's CA), idle guests torn down, nodes drained
//! or undrained, commands run.

use std::collections::HashSet;
use std::sync::Arc;

use libp2p::PeerId;
use mvm_component::policy::{Metrics, PrincipalKind};

use super::core::{Core, Effect, Then};
use crate::pki::{Ca, Subject};
use crate::proto::{BrokerRequest, GrowSpec, Response, TemplateSpec};
use crate::trigger::{Action, Trigger, Triggers, Values};

/// How long an issued guest certificate is valid, in days.
const GUEST_CERT_DAYS: i64 = 7;

/// The broker's triggers and what their actions need.
#[derive(Default)]
pub(crate) struct Triggering {
    /// The triggers.
    pub(crate) triggers: Triggers,
    /// The domain's CA, to issue the identities of the nodes in the guests triggers make.
    pub(crate) issuer: Option<Arc<Ca>>,
    /// Guests made so far (numbers their names).
    made: u64,
    /// Guests being torn down: nothing more is placed on their nodes.
    pub(super) retiring: HashSet<PeerId>,
}

impl Triggering {
    /// These triggers, issuing guest identities from `issuer`.
    pub(crate) fn new(triggers: Vec<Trigger>, issuer: Option<Arc<Ca>>) -> Triggering {
        Triggering {
            triggers: Triggers::new(triggers),
            issuer,
            made: 0,
            retiring: HashSet::new(),
        }
    }
}

impl Core {
    /// The values the triggers read: the group's metrics (with its guests and idle guests)
    /// and each live node's.
    fn trigger_values(&self, m: &Metrics) -> Values {
        let mut v = Values {
            group: super::monitor::flat(m),
            ..Values::default()
        };
        let (mut guests, mut idle) = (0.0, 0.0);
        for (peer, n) in self.members.live() {
            let name = n.info.name.clone();
            let held = self.log.read(|s| s.reserved(peer));
            if n.info.guest_of.is_some() {
                guests += 1.0;
                if held == 0
                    && n.info.load.vertices == 0
                    && !self.triggering.retiring.contains(peer)
                {
                    idle += 1.0;
                }
            }
            let free = self.free_slots(peer, n.info.slots);
            for (k, x) in [
                ("node_load", n.info.load.load),
                ("node_vertices", f64::from(held)),
                ("node_slots", f64::from(n.info.slots)),
                ("node_free_slots", f64::from(free)),
            ] {
                v.nodes.insert((k.to_owned(), name.clone()), x);
            }
            for s in n.probes.samples() {
                *v.nodes.entry((s.probe, name.clone())).or_insert(0.0) += s.value;
            }
        }
        v.group.insert("guests".into(), guests);
        v.group.insert("idle_guests".into(), idle);
        v
    }

    /// Asks the triggers with the group's metrics `m`, and carries out the actions of those
    /// that fire.
    pub(super) fn fire_triggers(&mut self, out: &mut Vec<Effect>, m: &Metrics) {
        if self.triggering.triggers.is_empty() {
            return;
        }
        let values = self.trigger_values(m);
        let fired = self.triggering.triggers.on(self.now, &values);
        for t in fired {
            tracing::info!(trigger = %t.name, action = ?t.action, "trigger fired");
            match &t.action {
                Action::CreateGuests {
                    template,
                    count,
                    slots,
                } => self.create_guests(out, &t, template, *count, *slots),
                Action::DestroyIdleGuests { count } => self.destroy_idle(out, *count),
                Action::Drain(node) | Action::Undrain(node) => {
                    let drain = matches!(t.action, Action::Drain(_));
                    // Nobody waits for the answer: the drain is logged.
                    let (reply, _) = tokio::sync::oneshot::channel();
                    self.drain(out, node, drain, reply);
                }
                Action::Command(argv) => {
                    let env = values
                        .group
                        .iter()
                        .map(|(k, x)| {
                            let k = k.replace('.', "_").to_uppercase();
                            (format!("MVM_{k}"), x.to_string())
                        })
                        .chain([
                            ("MVM_TRIGGER".to_owned(), t.name.clone()),
                            ("MVM_GROUP".to_owned(), self.site.group.clone()),
                        ])
                        .collect();
                    out.push(Effect::Exec {
                        trigger: t.name.clone(),
                        argv: argv.clone(),
                        env,
                    });
                }
            }
        }
    }

    /// Makes `count` guests of `template`, each on the live node (not itself a guest, not
    /// drained) that offers the template's image and has room for the guest's memory, the one
    /// with the most free memory first, round the nodes.
    fn create_guests(
        &mut self,
        out: &mut Vec<Effect>,
        t: &Trigger,
        template: &TemplateSpec,
        count: u32,
        slots: u32,
    ) {
        let Some(ca) = self.triggering.issuer.clone() else {
            tracing::error!(trigger = %t.name, "create-guests needs the super-peer to hold its domain's CA (--issuer DIR); nothing made");
            return;
        };
        let image = template.shape.image.as_str();
        let prefix = format!("{image}@");
        let memory = u64::from(template.shape.memory_mib.max(16)) << 20;
        let mut hosts: Vec<(PeerId, String, u64, Vec<libp2p::Multiaddr>)> = self
            .members
            .live()
            .filter(|(_, n)| n.info.guest_of.is_none() && n.info.load.free_memory_bytes >= memory)
            .filter(|(_, n)| {
                n.info
                    .images
                    .iter()
                    .any(|i| i == image || i.starts_with(&prefix))
            })
            .map(|(p, n)| {
                (
                    *p,
                    n.info.name.clone(),
                    n.info.load.free_memory_bytes,
                    n.addrs.clone(),
                )
            })
            .collect();
        self.log.read(|s| hosts.retain(|h| !s.is_drained(&h.0)));
        hosts.sort_by(|a, b| b.2.cmp(&a.2).then(a.1.cmp(&b.1)));
        if hosts.is_empty() {
            tracing::warn!(trigger = %t.name, image, memory_mib = memory >> 20, "no node offers the guest template's image with that much memory free; nothing made");
            return;
        }
        let bootstrap: Vec<String> = self
            .replicas()
            .iter()
            .flat_map(|m| m.addrs.iter().map(ToString::to_string))
            .collect();
        for i in 0..count as usize {
            let (host, host_name, _, addrs) = &hosts[i % hosts.len()];
            self.triggering.made += 1;
            let name = format!(
                "{host_name}-g{:x}-{}",
                self.log.term(),
                self.triggering.made
            );
            let key = libp2p::identity::Keypair::generate_ed25519();
            let subject = Subject {
                kind: PrincipalKind::Node,
                name: name.clone(),
                roles: vec!["guest".into()],
            };
            let issued = ca
                .certify(&subject, &key.public(), GUEST_CERT_DAYS)
                .map_err(|e| e.to_string())
                .and_then(|cert| {
                    key.to_protobuf_encoding()
                        .map(|k| (cert, k))
                        .map_err(|e| e.to_string())
                });
            let (cert, key) = match issued {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(trigger = %t.name, guest = %name, error = %e, "cannot issue the guest's identity");
                    continue;
                }
            };
            tracing::info!(trigger = %t.name, guest = %name, host = %host_name, "making a guest");
            out.push(Effect::Send {
                peer: *host,
                addrs: addrs.clone(),
                request: BrokerRequest::Grow(Box::new(GrowSpec {
                    name: name.clone(),
                    template: template.clone(),
                    slots,
                    key: key.into(),
                    cert,
                    ca: ca.cert_pem().to_owned(),
                    bootstrap: bootstrap.clone(),
                })),
                then: Then::Grown { guest: name },
            });
        }
    }

    /// Tears down up to `count` guests made by triggers whose nodes hold no vertex (by name).
    fn destroy_idle(&mut self, out: &mut Vec<Effect>, count: u32) {
        let mut idle: Vec<(String, PeerId, PeerId)> = self
            .members
            .live()
            .filter(|(p, n)| {
                n.info.load.vertices == 0
                    && !self.triggering.retiring.contains(*p)
                    && self.log.read(|s| s.reserved(p)) == 0
            })
            .filter_map(|(p, n)| n.info.guest_of.map(|h| (n.info.name.clone(), *p, h)))
            .collect();
        idle.sort();
        for (name, peer, host) in idle.into_iter().take(count as usize) {
            let addrs = self.members.member(&host).addrs;
            if addrs.is_empty() {
                tracing::warn!(guest = %name, %host, "the node that made the guest is not registered; cannot tear it down");
                continue;
            }
            tracing::info!(guest = %name, "tearing down an idle guest");
            self.triggering.retiring.insert(peer);
            out.push(Effect::Send {
                peer: host,
                addrs,
                request: BrokerRequest::Shrink { name: name.clone() },
                then: Then::Shrunk { guest: peer, name },
            });
        }
    }

    /// A node answered the making of guest `guest`.
    pub(super) fn grown(&mut self, guest: &str, answer: &Result<Response, crate::proto::Failure>) {
        match answer {
            Ok(Response::Ok) => tracing::info!(%guest, "guest made; its node registers"),
            Ok(Response::Error(f)) | Err(f) => {
                tracing::warn!(%guest, error = %f.message, "the guest was not made");
            }
            Ok(other) => tracing::warn!(%guest, ?other, "unexpected answer to a guest's making"),
        }
    }

    /// A node answered the tearing down of guest `name` (node `guest`): its node is forgotten.
    pub(super) fn shrunk(
        &mut self,
        guest: PeerId,
        name: &str,
        answer: &Result<Response, crate::proto::Failure>,
    ) {
        match answer {
            Ok(Response::Ok) => {
                tracing::info!(guest = %name, "idle guest torn down");
                self.members.forget(&guest);
            }
            Ok(Response::Error(f)) | Err(f) => {
                tracing::warn!(guest = %name, error = %f.message, "the guest was not torn down");
            }
            Ok(other) => tracing::warn!(guest = %name, ?other, "unexpected answer to a teardown"),
        }
        self.triggering.retiring.remove(&guest);
    }
}
