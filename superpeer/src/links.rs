//! Direct links between nodes: a remote channel's items over a plain TCP connection that the
//! vertices read and write themselves ([`mvm_queue::remote::direct`]), for latency close to
//! MPI over TCP.
//!
//! The link is agreed on the channel's libp2p stream, which is authenticated and encrypted:
//! the accepting node answers with the port of its link listener and a fresh 256-bit token;
//! the opening node connects and presents the token, which is good for that one channel, once,
//! for [`TOKEN_LIFETIME`]. The connection itself is neither encrypted nor integrity-protected:
//! nodes use direct links only when configured to ([`crate::DaemonConfig::direct_links`]), for
//! networks they trust, like MPI's. Without them, items go over the libp2p stream.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// A token's length in bytes.
pub(crate) const TOKEN_LEN: usize = 32;
/// How long a token waits for its connection.
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(10);

/// Why a direct link cannot be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// None of the peer's addresses is an IP address.
    #[error("the peer has no IP address to link to")]
    NoIp,
    /// The peer's listener did not accept in time.
    #[error("link to {to}: no connection within {TOKEN_LIFETIME:?}")]
    Timeout {
        /// The listener's address.
        to: SocketAddr,
    },
    /// Connecting, or presenting the token, failed.
    #[error("link to {to}: {error}")]
    Io {
        /// The listener's address.
        to: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// A one-time secret that names a pending link.
pub(crate) type Token = [u8; TOKEN_LEN];

/// The link listener of a node and the links it waits for.
pub(crate) struct Listener {
    port: u16,
    pending: Mutex<HashMap<Token, (Instant, oneshot::Sender<std::net::TcpStream>)>>,
}

impl Listener {
    /// Listens on `ip` (the node's network address, or any) at a free port, and accepts in the
    /// background until the runtime ends.
    pub(crate) async fn start(ip: IpAddr) -> std::io::Result<Arc<Listener>> {
        let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let me = Arc::new(Listener {
            port: l.local_addr()?.port(),
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

    /// A new token, and where its connection will come.
    pub(crate) fn expect(
        &self,
    ) -> std::io::Result<(Token, oneshot::Receiver<std::net::TcpStream>)> {
        let mut token = [0u8; TOKEN_LEN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut token)?;
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock();
        pending.retain(|_, (t, _)| t.elapsed() < TOKEN_LIFETIME);
        pending.insert(token, (Instant::now(), tx));
        Ok((token, rx))
    }

    /// Reads a connection's token and hands the connection to whoever expects it; anything
    /// else is closed.
    async fn admit(&self, mut sock: tokio::net::TcpStream, from: SocketAddr) {
        let mut token = [0u8; TOKEN_LEN];
        let read = tokio::time::timeout(TOKEN_LIFETIME, sock.read_exact(&mut token)).await;
        if !matches!(read, Ok(Ok(_))) {
            tracing::debug!(%from, "a link connection without a token; closed");
            return;
        }
        let Some((since, tx)) = self.pending.lock().remove(&token) else {
            tracing::warn!(%from, "a link connection with an unknown token; closed");
            return;
        };
        if since.elapsed() >= TOKEN_LIFETIME {
            tracing::warn!(%from, "a link connection with an expired token; closed");
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
/// the peer is reached at), and presents `token`.
pub(crate) async fn connect(
    addrs: &[Multiaddr],
    port: u16,
    token: &Token,
) -> Result<std::net::TcpStream, LinkError> {
    use tokio::io::AsyncWriteExt;
    let ip = addrs
        .iter()
        .filter_map(ip_of)
        .find(|ip| !ip.is_unspecified())
        .ok_or(LinkError::NoIp)?;
    let to = SocketAddr::new(ip, port);
    let io = |error| LinkError::Io { to, error };
    let mut s = tokio::time::timeout(TOKEN_LIFETIME, tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| LinkError::Timeout { to })?
        .map_err(io)?;
    s.write_all(token).await.map_err(io)?;
    s.into_std().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_admits_one_connection_and_others_are_refused() {
        let l = Listener::start(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .await
            .expect("listens");
        let (token, rx) = l.expect().expect("token");
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("addr");
        // A wrong token is refused: nothing arrives for the right one.
        let wrong = [0u8; TOKEN_LEN];
        let _bad = connect(std::slice::from_ref(&addr), l.port(), &wrong)
            .await
            .expect("connects");
        let s = connect(std::slice::from_ref(&addr), l.port(), &token)
            .await
            .expect("connects");
        let got = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("in time")
            .expect("admitted");
        assert_eq!(
            got.peer_addr().expect("peer").port(),
            s.local_addr().expect("local").port(),
            "the connection that presented the token"
        );
        // The token was used up.
        let (_, rx2) = l.expect().expect("token");
        let _again = connect(std::slice::from_ref(&addr), l.port(), &token)
            .await
            .expect("connects");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx2)
                .await
                .is_err(),
            "a used token admits nothing"
        );
    }

    #[tokio::test]
    async fn a_link_error_names_the_address() {
        let dns: Multiaddr = "/dns4/example.org/tcp/1".parse().expect("addr");
        let e = connect(&[dns], 1, &[0; TOKEN_LEN])
            .await
            .expect_err("no IP");
        assert!(matches!(e, LinkError::NoIp), "{e:?}");
        // A port nobody listens on: refused, and the message says where.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let ip: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("addr");
        let e = connect(&[ip], port, &[0; TOKEN_LEN])
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
