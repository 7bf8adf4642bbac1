//! Forwarding: a job this group cannot place goes to another group's super-peer that can.

use libp2p::Multiaddr;
use mvm_component::policy::Principal;

use super::fail;
use super::plan::PlaceError;
use crate::modules::ModuleStore;
use crate::proto::{ClientRequest, FailureKind, GroupSummary, Hash, Request, Response, Submission};
use crate::site::Site;

/// Offers a job this group cannot place to the super-peers of the groups in `to` (see
/// `Core::forward_to`), in order, until one takes it — or, with `offer`, until one offers to
/// run it as asked; as that one's owner of record, with the modules it lacks and its input
/// files (from `files`), one hop further.
#[allow(
    clippy::too_many_arguments,
    reason = "what is forwarded, where, why, and whether as an offer"
)]
pub(super) async fn forward(
    site: &Site,
    modules: &ModuleStore,
    files: &crate::files::FileStore,
    mut s: Submission,
    owner: Principal,
    to: Vec<GroupSummary>,
    why: &PlaceError,
    offer: Option<super::agree::Ask>,
) -> Response {
    let mut tried = Vec::new();
    for g in to {
        let peer = g.broker;
        let addrs: Vec<Multiaddr> = g
            .addrs
            .iter()
            .filter_map(|a| crate::net::split_addr(a).map(|(_, a)| a))
            .collect();
        let hashes: Vec<Hash> = s.components.values().copied().collect();
        let Ok(Response::Missing { hashes: missing }) = site
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
        let inputs = s.files.iter().flat_map(|f| &f.inputs);
        let mut sent = Ok(());
        for i in inputs {
            let path = files.path(&i.hash);
            if let Err(f) = crate::files::put(&site.net, peer, &addrs, &path, i.hash, i.size).await
            {
                sent = Err(format!("input file '{}': {}", i.path, f.message));
                break;
            }
        }
        if let Err(e) = sent {
            tried.push(format!("group {}: {e}", g.group));
            continue;
        }
        s.modules = missing.iter().filter_map(|h| modules.get(h)).collect();
        s.hops = s.hops.saturating_add(1);
        s.on_behalf = Some(owner.clone());
        s.wait = false;
        let request = match &offer {
            None => ClientRequest::Submit(Box::new(s.clone())),
            Some(ask) => ClientRequest::Offer {
                submission: Box::new(s.clone()),
                deadline_ms: ask.deadline_ms,
                start_after_ms: ask.start_after_ms,
                valid_ms: Some(ask.valid_ms),
            },
        };
        match site.net.call(peer, &addrs, Request::Client(request)).await {
            Ok(Response::Agreements(mut v)) if offer.is_some() && !v.is_empty() => {
                tracing::info!(group = %g.group, offers = v.len(), "offers from another group");
                for a in &mut v {
                    if a.broker_addrs.is_empty() {
                        a.broker_addrs.clone_from(&g.addrs);
                    }
                }
                return Response::Agreements(v);
            }
            Ok(Response::Submitted(mut st)) if offer.is_none() => {
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
