//! Peers' addresses: a multiaddress that ends in `/p2p/PEER` names the peer as well as where
//! it is.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// Why text is not the address of a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The text does not parse as a multiaddress.
    #[error("'{text}' is not a multiaddress: {reason}")]
    NotAMultiaddr {
        /// The text.
        text: String,
        /// What the parser said.
        reason: String,
    },
    /// A multiaddress that does not end in `/p2p/PEER`.
    #[error("'{0}' does not end in /p2p/PEER-ID")]
    NoPeer(Multiaddr),
}

/// Adds `/p2p/PEER` to an address that lacks it.
pub fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
        addr.clone()
    } else {
        addr.clone().with(Protocol::P2p(peer))
    }
}

/// Splits an address ending in `/p2p/PEER` into the peer and the address before it.
pub fn split_addr(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) => Some((peer, base)),
        _ => None,
    }
}

/// Splits `/…/p2p/PEER` into the peer and the address.
///
/// # Errors
/// The text is not a multiaddress ([`AddrError::NotAMultiaddr`]), or not one ending in
/// `/p2p/PEER` ([`AddrError::NoPeer`]).
pub fn split_peer(text: &str) -> Result<(PeerId, Multiaddr), AddrError> {
    let addr: Multiaddr =
        text.parse()
            .map_err(|e: libp2p::multiaddr::Error| AddrError::NotAMultiaddr {
                text: text.to_owned(),
                reason: e.to_string(),
            })?;
    split_addr(&addr).ok_or(AddrError::NoPeer(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_splits_into_its_peer_and_where_and_bad_ones_say_why() {
        let peer = PeerId::random();
        let text = format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}");
        let (p, a) = split_peer(&text).expect("a peer's address");
        assert_eq!(
            (p, a.to_string()),
            (peer, "/ip4/127.0.0.1/tcp/4001".to_owned())
        );
        assert_eq!(with_peer(&a, peer).to_string(), text);
        assert_eq!(with_peer(&with_peer(&a, peer), peer).to_string(), text);
        let e = split_peer("nowhere").expect_err("not a multiaddress");
        assert!(matches!(&e, AddrError::NotAMultiaddr { text, .. } if text == "nowhere"));
        assert!(
            e.to_string()
                .starts_with("'nowhere' is not a multiaddress: "),
            "{e}"
        );
        let e = split_peer("/ip4/127.0.0.1/tcp/4001").expect_err("no peer");
        assert_eq!(
            e.to_string(),
            "'/ip4/127.0.0.1/tcp/4001' does not end in /p2p/PEER-ID"
        );
    }
}
