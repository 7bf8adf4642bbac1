//! Direct links between nodes: a remote channel's items over a TCP connection of its own that
//! the vertices read and write themselves ([`mvm_queue::remote::direct`]), for latency close to
//! MPI over TCP.
//!
//! The link is agreed on the channel's libp2p stream, which is authenticated (the domains'
//! certificates) and encrypted: the accepting node answers with the port of its link listener
//! and a fresh 256-bit secret ([`LinkSecret`]); the opening node connects and presents the
//! secret's id, which is good for that one channel, once, for [`SECRET_LIFETIME`]. Both derive
//! the link's key from the secret: a sealed link ([`Links::Sealed`], the default) carries its
//! frames in AES-256-GCM records numbered on the link, so that what is read, forged, replayed,
//! reordered or cut on the way is refused ([`mvm_queue::remote::seal`]). A plain link
//! ([`Links::Plain`], when both nodes are configured so) is neither encrypted nor
//! integrity-protected, for networks the nodes trust, like MPI's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
pub(crate) use mvm_queue::remote::seal::LinkSecret;
use mvm_queue::remote::seal::SECRET_LEN;
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// How long a link's secret waits for its connection.
pub(crate) const SECRET_LIFETIME: Duration = Duration::from_secs(10);

/// How a node's remote channels to other nodes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Links {
    /// On libp2p streams (noise, yamux), beside the control traffic.
    Streams,
    /// On direct links in sealed records (authenticated and encrypted); on a stream to a node
    /// that takes none.
    #[default]
    Sealed,
    /// On plain direct links to nodes that take plain ones too (sealed to the others): for
    /// networks trusted not to read or change the items.
    Plain,
}

/// Why a direct link cannot be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// None of the peer's addresses is an IP address.
    #[error("the peer has no IP address to link to")]
    NoIp,
    /// The peer's listener did not accept in time.
    #[error("link to {to}: no connection within {SECRET_LIFETIME:?}")]
    Timeout {
        /// The listener's address.
        to: SocketAddr,
    },
    /// Connecting, or presenting the link's id, failed.
    #[error("link to {to}: {error}")]
    Io {
        /// The listener's address.
        to: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// What names a pending link on the wire: its secret's id.
type LinkId = [u8; SECRET_LEN];

/// The link listener of a node and the links it waits for.
pub(crate) struct Listener {
    port: u16,
    plain: bool,
    pending: Mutex<HashMap<LinkId, (Instant, oneshot::Sender<std::net::TcpStream>)>>,
}

impl Listener {
    /// Listens on `ip` (the node's network address, or any) at a free port, and accepts in the
    /// background until the runtime ends; `plain`: this node takes plain links.
    pub(crate) async fn start(ip: IpAddr, plain: bool) -> std::io::Result<Arc<Listener>> {
        let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let me = Arc::new(Listener {
            port: l.local_addr()?.port(),
            plain,
            pending: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                let (sock, from) = match l.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // E.g. out of descriptors: do not spin on it.
                        tracing::warn!(error = %e, "cannot accept a link connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(me) = weak.upgrade() else { return };
                tokio::spawn(async move { me.admit(sock, from).await });
            }
        });
        Ok(me)
    }

    /// The port peers connect to.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Whether this node takes plain links (from nodes that ask for one).
    pub(crate) fn plain(&self) -> bool {
        self.plain
    }

    /// A new link's secret, and where its connection will come.
    pub(crate) fn expect(
        &self,
    ) -> std::io::Result<(LinkSecret, oneshot::Receiver<std::net::TcpStream>)> {
        let secret = LinkSecret::random()?;
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock();
        pending.retain(|_, (t, _)| t.elapsed() < SECRET_LIFETIME);
        pending.insert(secret.id(), (Instant::now(), tx));
        Ok((secret, rx))
    }

    /// Reads the id a connection presents and hands the connection to whoever expects it;
    /// anything else is closed.
    async fn admit(&self, mut sock: tokio::net::TcpStream, from: SocketAddr) {
        let mut id = [0u8; SECRET_LEN];
        let read = tokio::time::timeout(SECRET_LIFETIME, sock.read_exact(&mut id)).await;
        if !matches!(read, Ok(Ok(_))) {
            tracing::debug!(%from, "a link connection without an id; closed");
            return;
        }
        let Some((since, tx)) = self.pending.lock().remove(&id) else {
            tracing::warn!(%from, "a link connection with an unknown id; closed");
            return;
        };
        if since.elapsed() >= SECRET_LIFETIME {
            tracing::warn!(%from, "a link connection with an expired id; closed");
            return;
        }
        match sock.into_std() {
            Ok(s) => {
                let _ = tx.send(s);
            }
            Err(e) => tracing::warn!(%from, error = %e, "cannot take over a link connection"),
        }
    }
}

/// The IP address to listen for links on: that of the first listen address, or any.
pub(crate) fn listen_ip(listen: &[Multiaddr]) -> IpAddr {
    listen
        .iter()
        .find_map(ip_of)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn ip_of(a: &Multiaddr) -> Option<IpAddr> {
    a.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Connects to a peer's link listener at `port`, on the first IP address among `addrs` (those
/// the peer is reached at), and presents the id of the link's `secret`.
pub(crate) async fn connect(
    addrs: &[Multiaddr],
    port: u16,
    secret: &LinkSecret,
) -> Result<std::net::TcpStream, LinkError> {
    use tokio::io::AsyncWriteExt;
    let ip = addrs
        .iter()
        .filter_map(ip_of)
        .find(|ip| !ip.is_unspecified())
        .ok_or(LinkError::NoIp)?;
    let to = SocketAddr::new(ip, port);
    let io = |error| LinkError::Io { to, error };
    let mut s = tokio::time::timeout(SECRET_LIFETIME, tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| LinkError::Timeout { to })?
        .map_err(io)?;
    s.write_all(&secret.id()).await.map_err(io)?;
    s.into_std().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_secret_s_id_admits_one_connection_and_others_are_refused() {
        let l = Listener::start(IpAddr::V4(Ipv4Addr::LOCALHOST), false)
            .await
            .expect("listens");
        let (secret, rx) = l.expect().expect("secret");
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("addr");
        // Another secret's id is refused, and so is the secret itself presented as an id.
        let wrong = LinkSecret::from_bytes([0u8; SECRET_LEN]);
        let _bad = connect(std::slice::from_ref(&addr), l.port(), &wrong)
            .await
            .expect("connects");
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", l.port()))
            .await
            .expect("connects");
        tokio::io::AsyncWriteExt::write_all(&mut raw, secret.as_bytes())
            .await
            .expect("writes");
        let s = connect(std::slice::from_ref(&addr), l.port(), &secret)
            .await
            .expect("connects");
        let got = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("in time")
            .expect("admitted");
        assert_eq!(
            got.peer_addr().expect("peer").port(),
            s.local_addr().expect("local").port(),
            "the connection that presented the id"
        );
        // The id was used up.
        let (_, rx2) = l.expect().expect("secret");
        let _again = connect(std::slice::from_ref(&addr), l.port(), &secret)
            .await
            .expect("connects");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx2)
                .await
                .is_err(),
            "a used id admits nothing"
        );
    }

    #[tokio::test]
    async fn a_link_error_names_the_address() {
        let dns: Multiaddr = "/dns4/example.org/tcp/1".parse().expect("addr");
        let e = connect(&[dns], 1, &LinkSecret::from_bytes([0; SECRET_LEN]))
            .await
            .expect_err("no IP");
        assert!(matches!(e, LinkError::NoIp), "{e:?}");
        // A port nobody listens on: refused, and the message says where.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let ip: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("addr");
        let e = connect(&[ip], port, &LinkSecret::from_bytes([0; SECRET_LEN]))
            .await
            .expect_err("refused");
        assert!(
            matches!(&e, LinkError::Io { to, .. } if to.port() == port),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("link to 127.0.0.1:{port}: ")),
            "{e}"
        );
    }

    #[test]
    fn the_listen_ip_is_the_first_listen_address() {
        let a: Multiaddr = "/ip4/10.0.0.2/tcp/0".parse().expect("addr");
        assert_eq!(listen_ip(&[a]), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(listen_ip(&[]).is_unspecified());
    }
}
