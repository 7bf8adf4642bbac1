//! A bare libp2p peer for tests: it speaks the transports and opens streams, but does nothing
//! of the certificate exchange by itself (it takes the daemon's `Hello` stream and never
//! answers), so that a test can act as a stranger, or say by hand what a peer says.

use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Stream};
use tokio::sync::mpsc;

use mvm_component::policy::PrincipalKind;

use super::{Inbound, Net, NetConfig};
use crate::pki::{Ca, Credentials, Subject};
use crate::proto::{self, HELLO_PROTOCOL, Response};

/// A node daemon's network named `name`, listening on loopback TCP, with `config` otherwise;
/// the requests it gets arrive on the receiver.
pub(crate) async fn daemon(
    ca: &Ca,
    name: &str,
    config: NetConfig,
) -> (Net, mpsc::Receiver<Inbound>) {
    let subject = Subject {
        kind: PrincipalKind::Node,
        name: name.into(),
        roles: Vec::new(),
    };
    let creds = Credentials::ephemeral(ca, &subject).expect("creds");
    let config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        ..config
    };
    Net::start(&creds, &config).await.expect("start")
}

/// A daemon that answers every request with `Ok`.
pub(crate) async fn answering(ca: &Ca, name: &str) -> Net {
    let (net, mut inbound) = daemon(ca, name, NetConfig::default()).await;
    tokio::spawn(async move {
        while let Some(i) = inbound.recv().await {
            i.reply(Response::Ok).await;
        }
    });
    net
}

/// What happened to the bare peer's connections.
#[derive(Debug)]
pub(crate) enum Seen {
    /// A connection opened.
    Opened,
    /// A connection closed.
    Closed,
    /// The daemon opened its `Hello` stream (so it has the connection).
    Hello,
}

/// A bare peer connected to a daemon.
pub(crate) struct Bare {
    /// Its peer id.
    pub(crate) peer: PeerId,
    /// For opening streams.
    pub(crate) control: libp2p_stream::Control,
    /// Its connections opening and closing.
    pub(crate) seen: mpsc::Receiver<Seen>,
}

impl Bare {
    /// A peer with `key` that dials `to`, and waits until connected.
    pub(crate) async fn connect(key: Keypair, to: &Net) -> Bare {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .expect("tcp")
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let mut control = swarm.behaviour().new_control();
        let (tx, mut seen) = mpsc::channel(16);
        // The daemon's `Hello` streams are taken, and held unanswered.
        let mut hellos = control.accept(HELLO_PROTOCOL).expect("accepting hellos");
        let said = tx.clone();
        tokio::spawn(async move {
            let mut held: Vec<Stream> = Vec::new();
            while let Some((_, s)) = hellos.next().await {
                held.push(s);
                let _ = said.send(Seen::Hello).await;
            }
        });
        let peer = *swarm.local_peer_id();
        let addr = to.addrs().first().expect("an address").clone();
        swarm
            .dial(super::with_peer(&addr, to.peer()))
            .expect("dial");
        tokio::spawn(async move {
            loop {
                let s = match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => Seen::Opened,
                    SwarmEvent::ConnectionClosed { .. } => Seen::Closed,
                    _ => continue,
                };
                if tx.send(s).await.is_err() {
                    return;
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
        assert!(matches!(first, Ok(Some(Seen::Opened))), "{first:?}");
        Bare {
            peer,
            control,
            seen,
        }
    }

    /// Opens a stream of `protocol` to `to`.
    pub(crate) async fn open(&mut self, to: PeerId, protocol: libp2p::StreamProtocol) -> Stream {
        self.control
            .open_stream(to, protocol)
            .await
            .expect("a stream opens")
    }

    /// Waits up to 10 s for the daemon's `Hello` stream.
    pub(crate) async fn hello(&mut self) {
        let heard = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(s) = self.seen.recv().await {
                if matches!(s, Seen::Hello) {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(matches!(heard, Ok(true)), "no Hello stream from the daemon");
    }

    /// Waits up to `within` for the connection to close; how long it took.
    pub(crate) async fn closed(&mut self, within: Duration) -> Option<Duration> {
        let t = std::time::Instant::now();
        tokio::time::timeout(within, async {
            while let Some(s) = self.seen.recv().await {
                if matches!(s, Seen::Closed) {
                    return Some(t.elapsed());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}

/// Whether `stream` ends (or fails) within 10 s without a byte: the other side dropped it.
pub(crate) async fn dropped(stream: &mut Stream) -> bool {
    use futures::AsyncReadExt;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    matches!(read, Ok(Ok(0) | Err(_)))
}

/// A control-stream frame carrying `request` as id 1 (as the `rpc` module writes it).
pub(crate) fn request_frame(request: &proto::Request) -> Vec<u8> {
    crate::rpc::encode(1, request, proto::MAX_FRAME).expect("encodes")
}
