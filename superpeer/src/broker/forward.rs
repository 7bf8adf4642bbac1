//! Forwarding: a job this group cannot place goes to another group's super-peer that can.

use crate::proto::ClientRequest;
use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::Principal;

use super::admit::inter_domain_allows;
use super::{Broker, fail};
use crate::proto::{FailureKind, GroupSummary, Request, Response, Submission};

impl Broker {
    /// Sends a job this group cannot place to another group's super-peer that can: the same
    /// domain, or a domain this super-peer trusts; the one with the most free slots first.
    pub(super) async fn forward(
        &self,
        mut s: Submission,
        owner: Principal,
        vertices: usize,
        why: &str,
    ) -> Response {
        let r = &s.requirements;
        let mut fits: Vec<GroupSummary> = self
            .groups()
            .into_iter()
            .filter(|g| {
                (g.domain == self.site.domain || inter_domain_allows(&self.site, &owner, g))
                    && g.free_slots as usize >= vertices
                    && r.image.as_ref().is_none_or(|i| g.images.contains(i))
                    && r.arch.as_ref().is_none_or(|a| g.archs.contains(a))
            })
            .collect();
        fits.sort_by_key(|g| std::cmp::Reverse(g.free_slots));
        let mut tried = Vec::new();
        for g in fits {
            let Ok(peer) = g.broker.parse::<PeerId>() else {
                continue;
            };
            let addrs: Vec<Multiaddr> = g
                .addrs
                .iter()
                .filter_map(|a| crate::net::split_peer(a).ok().map(|(_, a)| a))
                .collect();
            let hashes: Vec<String> = s.components.values().cloned().collect();
            let Ok(Response::Missing { hashes: missing }) = self
                .site
                .net
                .call(
                    peer,
                    &addrs,
                    Request::Client(ClientRequest::Missing { hashes }),
                )
                .await
            else {
                tried.push(format!("group {} did not answer", g.group));
                continue;
            };
            s.modules = missing.iter().filter_map(|h| self.modules.get(h)).collect();
            s.hops = s.hops.saturating_add(1);
            s.on_behalf = Some(owner.clone());
            s.wait = false;
            match self
                .site
                .net
                .call(
                    peer,
                    &addrs,
                    Request::Client(ClientRequest::Submit(Box::new(s.clone()))),
                )
                .await
            {
                Ok(Response::Submitted(mut st)) => {
                    tracing::info!(job = %st.job, group = %g.group, "job forwarded");
                    if st.broker_addrs.is_empty() {
                        st.broker_addrs = g.addrs.clone();
                    }
                    return Response::Submitted(st);
                }
                Ok(_) => tried.push(format!("group {} gave no job", g.group)),
                Err(f) => tried.push(format!("group {}: {}", g.group, f.message)),
            }
            s.hops = s.hops.saturating_sub(1);
        }
        let tail = if tried.is_empty() {
            String::from("; no other group known to this super-peer can take it")
        } else {
            format!("; forwarding failed: {}", tried.join("; "))
        };
        fail(FailureKind::Unavailable, format!("{why}{tail}"))
    }
}
