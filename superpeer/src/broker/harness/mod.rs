//! An in-process lab for lifecycle tests (libp2p's `swarm-test` is the model): super-peers
//! and nodes as real daemons on one tokio runtime, with ephemeral identities of one domain CA,
//! talking libp2p over loopback; a daemon is stopped by its shutdown signal, after which it
//! answers nothing (its job log stops, its swarm closes).
//!
//! A lab is one group ([`Lab::start`]), or is set up first ([`Setup`]): its domain, group name,
//! policy directory, and other groups whose super-peers it knows (and whose CA it trusts).
//! [`Lab::partition`] cuts daemons off from the others with the production swarm's block list
//! (open connections close, new ones are refused, both ways), until [`Lab::heal`]; direct links
//! (plain TCP between nodes) are off, so a cut leaves no data path. Everything waits on state
//! polled against a deadline, never on a fixed sleep.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mvm_component::policy::PrincipalKind;
use tokio::sync::oneshot;

use crate::client::Client;
use crate::daemon::{Daemon, DaemonConfig};
use crate::net::{Net, NetConfig};
use crate::pki::{Ca, Credentials, Subject};
use crate::policy::PolicySource;
use crate::proto::GroupInfo;

pub(super) mod jobs;
mod setup;

use setup::write_policies;

pub(crate) use jobs::*;
pub(crate) use setup::Setup;

/// How long any wait of the lab lasts at most before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// A daemon running on the test's runtime.
pub(crate) struct Running {
    /// Its `/…/p2p/PEER` address.
    pub(crate) addr: String,
    /// Its peer id.
    pub(crate) peer: PeerId,
    /// How it was started, to start it again.
    creds: Credentials,
    config: DaemonConfig,
    /// Its swarm, while it runs (held no longer: a handle keeps the swarm open).
    net: Option<Net>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops it and waits until it has.
    pub(crate) async fn stop(&mut self) {
        self.net = None;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
            let _ = (&mut self.task).await;
        }
    }

    /// Starts it again as it was (identity, address, state directory), cut off from no one.
    pub(crate) async fn restart(&mut self) {
        self.stop().await;
        *self = run(&self.creds, self.config.clone()).await;
    }

    /// Starts it again with an empty state directory, as after its disk was replaced.
    pub(crate) async fn restart_without_state(&mut self) {
        self.stop().await;
        let mut config = self.config.clone();
        config.state_dir = config.state_dir.map(|d| d.with_extension("replaced"));
        *self = run(&self.creds, config).await;
    }

    /// Its network handle, while it runs.
    pub(crate) fn net(&self) -> Option<&Net> {
        self.net.as_ref()
    }

    /// Whether it runs.
    pub(crate) fn is_up(&self) -> bool {
        self.stop.is_some()
    }
}

/// A daemon of a lab, for [`Lab::partition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Who {
    /// The super-peer of this index.
    Sp(usize),
    /// The node of this index.
    Node(usize),
}

pub(super) fn creds(
    ca: &Ca,
    trust: &[String],
    kind: PrincipalKind,
    name: &str,
    roles: &[&str],
) -> Credentials {
    let subject = Subject {
        kind,
        name: name.into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
    };
    let mut c = Credentials::ephemeral(ca, &subject).expect("credentials");
    for pem in trust {
        c.trust.add_pem(pem).expect("a CA certificate");
    }
    c
}

fn fast(config: DaemonConfig) -> DaemonConfig {
    DaemonConfig {
        heartbeat: Duration::from_millis(100),
        lost_after: Duration::from_millis(1000),
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            ..NetConfig::default()
        },
        // Remote channels on libp2p streams only, so that a partition cuts every data path.
        links: crate::links::Links::Streams,
        ..config
    }
}

async fn run(creds: &Credentials, config: DaemonConfig) -> Running {
    let daemon = Daemon::start(creds, config.clone())
        .await
        .expect("daemon starts");
    let addr = daemon.dial_addrs()[0].to_string();
    let net = daemon.net();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(daemon.run(async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        peer: creds.peer(),
        creds: creds.clone(),
        config,
        net: Some(net),
        stop: Some(tx),
        task,
    }
}

/// Super-peers and nodes of one group.
pub(crate) struct Lab {
    dir: tempfile::TempDir,
    ca: Arc<Ca>,
    domain: String,
    group: String,
    /// Other domains' CA certificates, trusted by its users and nodes.
    trust: Vec<String>,
    policies: Option<PathBuf>,
    pub(crate) superpeers: Vec<Running>,
    pub(crate) nodes: Vec<Running>,
    /// The super-peers' addresses, for nodes to register.
    bootstrap: Vec<String>,
    /// The pairs cut off from each other.
    cut: Vec<(Who, Who)>,
}

impl Lab {
    /// `superpeers` replicas of the group's job log (each knowing the others by fixed ports)
    /// and a node per entry of `slots`, all registered.
    pub(crate) async fn start(superpeers: usize, slots: &[u32]) -> Lab {
        Setup::new(superpeers, slots).start().await
    }

    /// Starts one more node, with `slots` vertex slots, named `n` and its index.
    pub(crate) async fn add_node(&mut self, slots: u32) {
        self.add_node_with(slots, |_| {}).await;
    }

    /// As [`Lab::add_node`], with its configuration changed by `change` first.
    pub(crate) async fn add_node_with(
        &mut self,
        slots: u32,
        change: impl FnOnce(&mut DaemonConfig),
    ) {
        let name = format!("n{}", self.nodes.len());
        let c = creds(&self.ca, &self.trust, PrincipalKind::Node, &name, &[]);
        let mut config = fast(DaemonConfig {
            name,
            group: self.group.clone(),
            domain: self.domain.clone(),
            policies: match self.policies {
                Some(_) => PolicySource::Fetch(None),
                None => PolicySource::Default,
            },
            slots,
            bootstrap: self.bootstrap.clone(),
            ..DaemonConfig::default()
        });
        change(&mut config);
        self.nodes.push(run(&c, config).await);
    }

    /// The revocation list the lab's super-peers hold ([`Lab::revoke`] writes it).
    pub(crate) fn crl_file(&self) -> PathBuf {
        self.dir
            .path()
            .join("revocations")
            .join(crate::pki::CRL_FILE)
    }

    /// Revokes `who`'s certificate at the lab's CA: its super-peers take the list within two
    /// heartbeats, and the other daemons fetch it from them.
    pub(crate) fn revoke(&self, who: &Credentials) {
        let file = self.crl_file();
        let dir = file.parent().expect("a directory");
        std::fs::create_dir_all(dir).expect("mkdir");
        let serial = crate::pki::serial_of_der(&who.cert).expect("a certificate");
        self.ca.revoke(dir, &serial).expect("revoked");
    }

    /// A revocation list of the lab's CA that revokes `who` (DER), kept where none of the
    /// lab's daemons reads it.
    pub(crate) fn crl_revoking(&self, who: &Credentials) -> Vec<u8> {
        let dir = self.dir.path().join("revocations-elsewhere");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let serial = crate::pki::serial_of_der(&who.cert).expect("a certificate");
        self.ca.revoke(&dir, &serial).expect("revoked");
        let pem = std::fs::read_to_string(dir.join(crate::pki::CRL_FILE)).expect("the list");
        crate::pki::crl_der(&pem).expect("PEM")
    }

    /// Writes policy `files` into a directory of the lab named `name` (for a daemon of its
    /// own policies), and gives that directory.
    pub(crate) fn policy_dir(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        write_policies(self.dir.path(), name, files)
    }

    /// A user of the group's domain, with role `researcher`.
    pub(crate) fn user(&self) -> Credentials {
        self.user_as("alice", &["researcher"])
    }

    /// A user of the group's domain named `name`, with `roles`.
    pub(crate) fn user_as(&self, name: &str, roles: &[&str]) -> Credentials {
        creds(&self.ca, &self.trust, PrincipalKind::User, name, roles)
    }

    /// A client of the group's leader, as [`Lab::user`].
    pub(crate) async fn client(&self) -> Client {
        self.client_as(&self.user()).await
    }

    /// A client of the group's leader, as `user`.
    pub(crate) async fn client_as(&self, user: &Credentials) -> Client {
        let all: Vec<usize> = (0..self.superpeers.len()).collect();
        self.client_among(user, &all).await
    }

    /// A client of the super-peer that says it leads among super-peers `among` (running
    /// ones), as `user`. Only those are asked: one that names a leader elsewhere (which it may
    /// no longer reach) is not followed.
    pub(crate) async fn client_among(&self, user: &Credentials, among: &[usize]) -> Client {
        eventually("a leader among the super-peers asked", async || {
            for s in among
                .iter()
                .map(|&i| &self.superpeers[i])
                .filter(|s| s.is_up())
            {
                let Ok(c) = Client::new(user, &s.addr).await else {
                    continue;
                };
                if c.group().await.is_ok_and(|g| g.is_broker) {
                    return Some(c);
                }
            }
            None
        })
        .await
    }

    /// A client of super-peer `i` itself, leading or not, as [`Lab::user`].
    pub(crate) async fn client_of(&self, i: usize) -> Client {
        Client::new(&self.user(), &self.superpeers[i].addr)
            .await
            .expect("client")
    }

    /// Waits until the leader knows `n` live nodes.
    pub(crate) async fn registered(&self, n: usize) {
        // A new client each time: the leader may change meanwhile.
        eventually(&format!("{n} nodes registered"), async || {
            let g = self.client().await.group().await.ok()?;
            (g.nodes.iter().filter(|x| !x.lost).count() >= n).then_some(())
        })
        .await;
    }

    /// The index of the super-peer that leads now.
    pub(crate) async fn leader(&self) -> usize {
        let all: Vec<usize> = (0..self.superpeers.len()).collect();
        self.leader_among(&all).await
    }

    /// The index of the super-peer that says it leads among `among`.
    pub(crate) async fn leader_among(&self, among: &[usize]) -> usize {
        let c = self.client_among(&self.user(), among).await;
        self.superpeer_of(&c)
    }

    /// The index of the super-peer `c` talks to.
    pub(crate) fn superpeer_of(&self, c: &Client) -> usize {
        let peer = c.broker();
        self.superpeers
            .iter()
            .position(|s| s.peer == peer)
            .expect("one of the lab's super-peers")
    }

    /// Node `i`'s peer id as text (as errors name it).
    pub(crate) fn node_peer(&self, i: usize) -> String {
        self.nodes[i].peer.to_string()
    }

    fn running(&self, w: Who) -> Option<&Running> {
        match w {
            Who::Sp(i) => self.superpeers.get(i),
            Who::Node(i) => self.nodes.get(i),
        }
    }

    /// Cuts the daemons of `side` off from every other daemon of the lab, both ways: their
    /// swarms close the connections between them and refuse new ones until [`Lab::heal`].
    /// Clients are not cut off from anyone; a daemon restarted meanwhile is cut off from no
    /// one.
    pub(crate) async fn partition(&mut self, side: &[Who]) {
        let all = (0..self.superpeers.len())
            .map(Who::Sp)
            .chain((0..self.nodes.len()).map(Who::Node));
        let pairs: Vec<(Who, Who)> = all
            .filter(|o| !side.contains(o))
            .flat_map(|o| side.iter().map(move |s| (*s, o)))
            .collect();
        for (a, b) in pairs {
            self.cut(a, b).await;
        }
    }

    /// Cuts daemons `a` and `b` off from each other, both ways, until [`Lab::heal`].
    pub(crate) async fn cut(&mut self, a: Who, b: Who) {
        self.block(a, b, true).await;
        self.cut.push((a, b));
    }

    /// Ends every cut made by [`Lab::partition`] and [`Lab::cut`].
    pub(crate) async fn heal(&mut self) {
        for (a, b) in std::mem::take(&mut self.cut) {
            self.block(a, b, false).await;
        }
    }

    async fn block(&self, a: Who, b: Who, blocked: bool) {
        let (Some(ra), Some(rb)) = (self.running(a), self.running(b)) else {
            return;
        };
        for (from, to) in [(ra, rb.peer), (rb, ra.peer)] {
            match (&from.net, blocked) {
                (Some(n), true) => n.block(to).await,
                (Some(n), false) => n.unblock(to).await,
                (None, _) => {}
            }
        }
    }
}

/// Polls `probe` until it gives a value, failing the test after a while (saying `what` was
/// awaited).
pub(crate) async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the group as `c`'s super-peer sees it passes `pred`.
pub(crate) async fn group_until(
    c: &Client,
    what: &str,
    pred: impl Fn(&GroupInfo) -> bool,
) -> GroupInfo {
    eventually(what, async || c.group().await.ok().filter(|g| pred(g))).await
}

/// Two groups of one super-peer each that know each other, `small` (one node of `small`
/// slots) and `big` (one of `big` slots), started; and a client of the small one's, once it
/// has heard that the big one has `need` free slots.
pub(crate) async fn small_and_big(small: u32, big: u32, need: u32) -> (Lab, Lab, Client) {
    let mut s = Setup::new(1, &[small]).group("small");
    let mut b = Setup::beside(&s, "big", 1, &[big]);
    Setup::link(&mut s, &mut b);
    let (s, b) = (s.start().await, b.start().await);
    let c = s.client().await;
    group_until(&c, "the big group's summary", |g| {
        g.groups
            .iter()
            .any(|x| x.group == "big" && x.free_slots >= need)
    })
    .await;
    (s, b, c)
}
