//! Revocation lists kept current, as policies are ([`crate::policy`]): a daemon given a list's
//! file (`mvm node --crl FILE`: the domain's super-peers, reading their CA directory's
//! `ca.crl`, which `mvm ca revoke` writes) re-reads it; every other daemon asks the super-peer
//! it takes its policies from, or else the one it follows, for the lists newer than its own
//! (`PeerRequest::Revocations`), and hands them on when asked. A daemon takes a list only if a
//! CA it trusts signed it and it is newer than the one held ([`crate::pki::Trust::adopt_crl`]).
//!
//! A list taken refuses the certificates it revokes at the next connection, and closes the
//! connections of the peers they identify at once ([`crate::net::Net::recheck`]). So a peer
//! revoked at the CA is cut off from a daemon within one interval of [`interval`] after the
//! list reaches it: one interval for the file's holder to read it, and one more for each
//! super-peer it passes through on the way.
//!
//! Between domains, lists travel with the group summaries super-peers gossip: each says the
//! number of its own domain's list it holds ([`crate::proto::GroupSummary::crl`]), and a
//! super-peer that holds an older one of a domain it trusts (or none) asks that super-peer for
//! it ([`fetch`]), at most once at a time per domain. A list a domain's CA signs so reaches a
//! trusting domain's super-peer within two of its heartbeats after the signing domain's
//! super-peer has read it, and that domain's nodes one [`interval`] later.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use crate::pki::Crl;
use crate::proto::{Hash, PeerRequest, Request, Response};
use crate::site::Site;

/// How often a daemon reads its list's file or asks for newer lists: twice its heartbeat, at
/// least half a second (as policies).
pub(crate) fn interval(heartbeat: Duration) -> Duration {
    (heartbeat * 2).max(Duration::from_millis(500))
}

/// `PeerRequest::Revocations`: the lists held that are newer than the asker's (to anyone
/// authenticated: they are signed, and say nothing secret).
pub(crate) fn serve(site: &Site, held: &BTreeMap<String, u64>) -> Response {
    let crls = site
        .net
        .trust()
        .crls()
        .into_iter()
        .filter(|c| held.get(&c.domain).is_none_or(|n| *n < c.number))
        .map(|c| c.der)
        .collect();
    Response::Revocations { crls }
}

/// Takes the lists in `ders`, logging each taken and what it refused, then closes the
/// connections of the peers they revoke; returns the lists taken.
async fn take(site: &Site, ders: &[bytes::Bytes], from: &str) -> Vec<Crl> {
    let mut taken = Vec::new();
    for der in ders {
        match site.net.trust().adopt_crl(der) {
            Ok(Some(crl)) => {
                tracing::info!(
                    domain = %crl.domain,
                    number = crl.number,
                    revoked = crl.serials.len(),
                    from,
                    "a revocation list taken"
                );
                taken.push(crl);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(from, error = %e, "a revocation list refused"),
        }
    }
    if !taken.is_empty() {
        for (peer, who, why) in site.net.recheck().await {
            tracing::warn!(%peer, %who, "connections closed: {why}");
        }
    }
    taken
}

/// Asks the super-peer `peer` for the lists it holds that are newer than this daemon's, and
/// takes them (as [`sync`] does); returns the lists taken.
pub(crate) async fn fetch(site: &Site, peer: PeerId, addrs: &[Multiaddr]) -> Vec<Crl> {
    let held = site.net.trust().crl_numbers();
    let ask = Request::Peer(PeerRequest::Revocations { held });
    match site.net.call(peer, addrs, ask).await {
        Ok(Response::Revocations { crls }) => take(site, &crls, &peer.to_string()).await,
        Ok(_) => {
            tracing::debug!(%peer, "an answer that is no revocation list");
            Vec::new()
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "revocation lists not fetched");
            Vec::new()
        }
    }
}

/// Reads the list in `file` if its contents changed since `last` (their digest), which it
/// updates: none there yet is nothing revoked, and a bad file is logged once.
fn read(file: &std::path::Path, last: &mut Option<Hash>) -> Option<bytes::Bytes> {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the revocation list");
            return None;
        }
    };
    let digest = Hash::of(&text);
    if *last == Some(digest) {
        return None;
    }
    *last = Some(digest);
    let der = std::str::from_utf8(&text)
        .map_err(|e| e.to_string())
        .and_then(|t| crate::pki::crl_der(t).map_err(|e| e.to_string()));
    match der {
        Ok(d) => Some(d.into()),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "a bad revocation list file");
            None
        }
    }
}

/// Keeps the revocation lists current: re-reads `file` when given one, else asks the policy
/// source or the super-peer `superpeer` gives; gives the lists taken to `taken` (a super-peer's
/// broker, for its owners' jobs). Runs until the task is aborted.
pub(crate) async fn sync(
    site: Arc<Site>,
    file: Option<PathBuf>,
    superpeer: impl Fn() -> Option<(PeerId, Vec<Multiaddr>)>,
    taken: impl Fn(Vec<Crl>),
) {
    let mut tick = tokio::time::interval(interval(site.heartbeat));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tick.tick().await;
        let (ders, from) = if let Some(f) = &file {
            match read(f, &mut last) {
                Some(der) => (vec![der], f.display().to_string()),
                None => continue,
            }
        } else {
            let Ok(Some((peer, addrs))) = crate::policy::upstream(&site, superpeer()) else {
                continue;
            };
            let held = site.net.trust().crl_numbers();
            let ask = Request::Peer(PeerRequest::Revocations { held });
            match site.net.call(peer, &addrs, ask).await {
                Ok(Response::Revocations { crls }) => (crls, peer.to_string()),
                Ok(_) => {
                    tracing::debug!(%peer, "an answer that is no revocation list");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "revocation lists not fetched");
                    continue;
                }
            }
        };
        let t = take(&site, &ders, &from).await;
        if !t.is_empty() {
            taken(t);
        }
    }
}
