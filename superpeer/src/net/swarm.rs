//! Building the swarm: transports, behaviours, listeners; then its task is started.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::Transport as _;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{allow_block_list, gossipsub, identify, noise, ping, tcp, yamux};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::actor::{Actor, Behaviour};
use super::conduct::Conduct;
use super::gate::Gated;
use super::hello::{self, Known};
use super::{AlreadyAccepted, GROUPS_TOPIC, Inbound, Net, NetConfig, ports};
use crate::pki::Credentials;
use crate::proto;
use crate::rpc::{self, Links};

/// An error of the swarm builder's steps.
type BuildError = Box<dyn std::error::Error + Send + Sync>;

/// Why a daemon's network does not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TCP transport (with noise and yamux) cannot be set up.
    #[error("cannot set up TCP: {0}")]
    Tcp(#[source] BuildError),
    /// The behaviours (gossipsub, identify, ping, the certificate exchange) cannot be set up.
    #[error("cannot set up the behaviours: {0}")]
    Behaviours(#[source] BuildError),
    /// An address cannot be listened on.
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        /// The address.
        addr: libp2p::Multiaddr,
        /// Why.
        #[source]
        error: libp2p::TransportError<std::io::Error>,
    },
    /// A listener closed before it had an address.
    #[error("a listener closed before it had an address{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    ListenerClosed(#[source] Option<std::io::Error>),
    /// A listener failed before it had an address.
    #[error("a listener failed: {0}")]
    ListenerFailed(#[source] std::io::Error),
    /// Some listener had no address in time.
    #[error("no listen address after {0:?}")]
    NoAddress(Duration),
    /// Control streams are accepted already.
    #[error(transparent)]
    Accept(#[from] AlreadyAccepted),
}

/// How long the listeners may take to have their addresses.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

impl Net {
    /// Builds the swarm, starts listening, and runs it on a task; returns once every listener
    /// has an address. Inbound requests arrive on the returned channel.
    ///
    /// # Errors
    /// A transport cannot be set up or an address cannot be listened on.
    pub async fn start(
        creds: &Credentials,
        config: &NetConfig,
    ) -> Result<(Net, mpsc::Receiver<Inbound>), StartError> {
        let key: Keypair = creds.key.clone();
        let max_frame = config.max_frame;
        let timeout = config.request_timeout;
        let idle = config.idle_timeout;
        let creds = Arc::new(creds.clone());
        let known = Known::default();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_quic()
            .with_other_transport(|key| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    ports::NewPorts(tcp::tokio::Transport::new(
                        tcp::Config::default().nodelay(true),
                    ))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
                )
            })
            .map_err(|e| StartError::Tcp(e.into()))?
            .with_behaviour(|key| {
                let gossip_config = gossipsub::ConfigBuilder::default()
                    .heartbeat_interval(Duration::from_millis(500))
                    .max_transmit_size(256 << 10)
                    .build()
                    .map_err(|e| format!("gossipsub configuration: {e}"))?;
                let mut gossip = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_config,
                )
                .map_err(|e| format!("gossipsub: {e}"))?;
                gossip
                    .subscribe(&gossipsub::IdentTopic::new(GROUPS_TOPIC))
                    .map_err(|e| format!("gossipsub subscription: {e}"))?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                    blocked: allow_block_list::Behaviour::default(),
                    limits: libp2p::connection_limits::Behaviour::new(super::actor::limits()),
                    hello: hello::Behaviour::new(
                        creds.clone(),
                        config.hello_timeout,
                        known.clone(),
                    ),
                    gossip: Gated::new(gossip),
                    identify: Gated::new(identify::Behaviour::new(identify::Config::new(
                        "/mvm/1".into(),
                        key.public(),
                    ))),
                    ping: Gated::new(ping::Behaviour::default()),
                    stream: libp2p_stream::Behaviour::new(),
                })
            })
            .map_err(|e| StartError::Behaviours(e.into()))?
            .with_swarm_config(|c| {
                // Optimistic protocol negotiation on outbound streams: a hello, control or
                // queue stream costs no extra round trip to agree on its protocol.
                c.with_idle_connection_timeout(idle)
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
                    .with_max_negotiating_inbound_streams(1024)
            })
            .build();
        let mut pending = Vec::new();
        for a in &config.listen {
            pending.push(
                swarm
                    .listen_on(a.clone())
                    .map_err(|error| StartError::Listen {
                        addr: a.clone(),
                        error,
                    })?,
            );
        }
        let mut addrs = Vec::new();
        let deadline = tokio::time::sleep(LISTEN_WAIT);
        tokio::pin!(deadline);
        while !pending.is_empty() {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::NewListenAddr { listener_id, address } => {
                        pending.retain(|l| *l != listener_id);
                        addrs.push(address);
                    }
                    SwarmEvent::ListenerClosed { reason, .. } => {
                        return Err(StartError::ListenerClosed(reason.err()));
                    }
                    SwarmEvent::ListenerError { error, .. } => {
                        return Err(StartError::ListenerFailed(error));
                    }
                    _ => {}
                },
                () = &mut deadline => return Err(StartError::NoAddress(LISTEN_WAIT)),
            }
        }
        let streams = swarm.behaviour().stream.new_control();
        let peer = *swarm.local_peer_id();
        let (commands, rx) = mpsc::channel(1024);
        let (inbound_tx, inbound) = mpsc::channel(1024);
        let (gossip_tx, gossip_rx) = mpsc::channel(256);
        let hellos_lost = Arc::new(AtomicU64::new(0));
        let conduct = Conduct::new(config.request_rate, config.block_for, commands.downgrade());
        let actor = Actor {
            known: known.clone(),
            waiting: HashMap::new(),
            hello_tries: HashMap::new(),
            hellos_lost: hellos_lost.clone(),
            gossip: gossip_tx,
            swarm,
            commands: rx,
            self_commands: commands.downgrade(),
        };
        let net = Net {
            commands,
            peer,
            addrs,
            streams,
            gossip: Arc::new(Mutex::new(Some(gossip_rx))),
            known,
            principal: creds.principal.clone(),
            trust: creds.trust.clone(),
            links: Links::new(max_frame, timeout),
            hellos_lost,
            timeout,
            conduct: conduct.clone(),
        };
        // Control streams come through the one acceptor that checks who opened them.
        let incoming = net.accept(proto::RPC_PROTOCOL)?;
        tokio::spawn(actor.run());
        tokio::spawn(rpc::accept(incoming, inbound_tx, max_frame, conduct));
        Ok((net, inbound))
    }
}
