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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;
use mvm_component::policy::PrincipalKind;
use tokio::sync::oneshot;

use crate::client::{Client, Prepared};
use crate::daemon::{Daemon, DaemonConfig};
use crate::net::{Net, NetConfig};
use crate::pki::{Ca, Credentials, Subject};
use crate::policy::PolicySource;
use crate::proto::{GroupInfo, JobState, JobStatus, LimitSpec, Requirements, Submission};

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

fn creds(
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
        direct_links: false,
        ..config
    }
}

async fn run(creds: &Credentials, config: DaemonConfig) -> Running {
    let daemon = Daemon::start(creds, config.clone())
        .await
        .expect("daemon starts");
    let addr = daemon.dial_addrs()[0].clone();
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

/// A lab before it starts: its CA and its super-peers' identities and ports are chosen, so
/// that labs can be told about each other ([`Setup::link`]) before any of them runs.
pub(crate) struct Setup {
    dir: tempfile::TempDir,
    ca: Arc<Ca>,
    domain: String,
    group: String,
    trust: Vec<String>,
    policies: Option<PathBuf>,
    peers: Vec<String>,
    sps: Vec<(Credentials, u16)>,
    slots: Vec<u32>,
    /// Super-peers configured but not started.
    absent: Vec<usize>,
}

impl Setup {
    /// `superpeers` replicas of group `default` of domain `default`, and a node per entry of
    /// `slots`, with the embedded default policies.
    pub(crate) fn new(superpeers: usize, slots: &[u32]) -> Setup {
        Setup::in_domain("default", superpeers, slots)
    }

    /// As [`Setup::new`], in a domain of its own (a CA of its own).
    pub(crate) fn in_domain(domain: &str, superpeers: usize, slots: &[u32]) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(&dir.path().join("ca"), domain, 30).expect("ca");
        Setup::with_ca(dir, Arc::new(ca), superpeers, slots)
    }

    /// Another group of `other`'s domain (its CA), named `group`.
    pub(crate) fn beside(other: &Setup, group: &str, superpeers: usize, slots: &[u32]) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Setup::with_ca(dir, other.ca.clone(), superpeers, slots);
        s.group = group.into();
        s
    }

    fn with_ca(dir: tempfile::TempDir, ca: Arc<Ca>, superpeers: usize, slots: &[u32]) -> Setup {
        // Ports chosen first, so that each replica is told the others' addresses.
        let sps = (0..superpeers)
            .map(|i| {
                let name = format!("sp{i}");
                let c = creds(&ca, &[], PrincipalKind::Node, &name, &["superpeer"]);
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                (c, port)
            })
            .collect();
        Setup {
            dir,
            domain: ca.domain().to_owned(),
            ca,
            group: "default".into(),
            trust: Vec::new(),
            policies: None,
            peers: Vec::new(),
            sps,
            slots: slots.to_vec(),
            absent: Vec::new(),
        }
    }

    /// Leaves out the founding replica (the one of the lowest peer id, which starts a new job
    /// log): the others know it, but it does not start with them ([`Running::restart`] starts
    /// it).
    pub(crate) fn without_founder(mut self) -> Setup {
        let founder = (0..self.sps.len()).min_by_key(|&i| self.sps[i].0.peer());
        self.absent.extend(founder);
        self
    }

    /// Names the group.
    pub(crate) fn group(mut self, name: &str) -> Setup {
        self.group = name.into();
        self
    }

    /// Policy files (`inter-domain.polar`, `DOMAIN/NAME.polar`, `node.polar` and their text),
    /// written into the lab's directory: its super-peers hold them, its nodes fetch them.
    pub(crate) fn policies(mut self, files: &[(&str, &str)]) -> Setup {
        let dir = write_policies(self.dir.path(), "policies", files);
        self.policies = Some(dir);
        self
    }

    /// The repository's example policies (domains `physics` and `biology`).
    pub(crate) fn example_policies(mut self) -> Setup {
        self.policies = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"));
        self
    }

    /// The super-peers of `a` and `b` know each other (they exchange group summaries) and
    /// every daemon and user of each trusts the other's CA.
    pub(crate) fn link(a: &mut Setup, b: &mut Setup) {
        let (a_pem, b_pem) = (a.ca.cert_pem().to_owned(), b.ca.cert_pem().to_owned());
        a.trust.push(b_pem.clone());
        b.trust.push(a_pem.clone());
        for (c, _) in &mut a.sps {
            c.trust.add_pem(&b_pem).expect("a CA certificate");
        }
        for (c, _) in &mut b.sps {
            c.trust.add_pem(&a_pem).expect("a CA certificate");
        }
        a.peers.extend(b.addrs());
        b.peers.extend(a.addrs());
    }

    fn addrs(&self) -> Vec<String> {
        self.sps
            .iter()
            .map(|(c, port)| format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", c.peer()))
            .collect()
    }

    /// Starts the super-peers, then the nodes, and waits until every node has registered.
    pub(crate) async fn start(self) -> Lab {
        let bootstrap = self.addrs();
        let mut lab = Lab {
            ca: self.ca,
            domain: self.domain,
            group: self.group,
            trust: self.trust,
            policies: self.policies,
            superpeers: Vec::new(),
            nodes: Vec::new(),
            bootstrap: bootstrap.clone(),
            cut: Vec::new(),
            dir: self.dir,
        };
        for (i, (c, port)) in self.sps.iter().enumerate() {
            let mut config = fast(DaemonConfig {
                name: format!("sp{i}"),
                group: lab.group.clone(),
                domain: lab.domain.clone(),
                policies: lab
                    .policies
                    .clone()
                    .map_or(PolicySource::Default, PolicySource::Dir),
                broker: true,
                state_dir: Some(lab.dir.path().join(format!("sp{i}"))),
                slots: 0,
                replicas: bootstrap
                    .iter()
                    .filter(|a| **a != bootstrap[i])
                    .cloned()
                    .collect(),
                peers: self.peers.clone(),
                ..DaemonConfig::default()
            });
            config.net.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr")];
            if self.absent.contains(&i) {
                lab.superpeers.push(Running {
                    addr: bootstrap[i].clone(),
                    peer: c.peer(),
                    creds: c.clone(),
                    config,
                    net: None,
                    stop: None,
                    task: tokio::spawn(async {}),
                });
                continue;
            }
            lab.superpeers.push(run(c, config).await);
        }
        for s in &self.slots {
            lab.add_node(*s).await;
        }
        lab.registered(self.slots.len()).await;
        lab
    }
}

/// Writes policy `files` into `DIR/name`, and gives that directory.
fn write_policies(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = dir.join(name);
    for (file, text) in files {
        let path = root.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("a policy directory");
        }
        std::fs::write(&path, text).expect("a policy file");
    }
    root
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

/// A token ring of 8 vertices passing `hops` tokens, on at most `nodes` nodes.
pub(crate) fn ring(name: &str, hops: u64, nodes: Option<u32>, priority: i32) -> Prepared {
    let token = Bytes::from_static(include_bytes!("../../../jobs/wat/token.wat"));
    let hash = crate::modules::hash(&token);
    Prepared {
        submission: Submission {
            name: name.into(),
            topology_file: "ring-8.dot".into(),
            topology: include_str!("../../../topologies/ring-8.dot").into(),
            components: BTreeMap::from([("token".to_owned(), hash.clone())]),
            parameters: BTreeMap::from([("hops".to_owned(), hops.to_string())]),
            limits: LimitSpec {
                wall_ms: Some(120_000),
                ..LimitSpec::default()
            },
            requirements: Requirements {
                nodes,
                ..Requirements::default()
            },
            priority,
            ..Submission::default()
        },
        modules: BTreeMap::from([(hash, token)]),
    }
}

/// A ring that runs until cancelled (on at most `nodes` nodes), once it runs.
pub(crate) async fn running(c: &Client, nodes: Option<u32>) -> JobStatus {
    let s = c
        .submit(&ring("long", 2_000_000_000, nodes, 0))
        .await
        .expect("submit");
    until(c, &s.job, |st| st == JobState::Running).await
}

/// Submits `job`, waiting for its end, and gives its final status.
pub(crate) async fn finished(c: &Client, job: &Prepared) -> JobStatus {
    let s = c.submit_and_wait(job).await.expect("submit");
    until(c, &s.job, JobState::is_final).await
}

/// Waits until `job`'s state passes `pred`.
pub(crate) async fn until(c: &Client, job: &str, pred: impl Fn(JobState) -> bool) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut v) = c.status(Some(job)).await
            && let Some(s) = v.pop()
            && pred(s.state)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "job {job} never got there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job of one vertex running `wat` (a module exporting `run`).
pub(crate) fn one(name: &str, wat: &'static str) -> Prepared {
    one_of(name, Bytes::from_static(wat.as_bytes()))
}

/// A job of one vertex running `module` (WAT or binary, exporting `run` or `_start`).
pub(crate) fn one_of(name: &str, module: Bytes) -> Prepared {
    let hash = crate::modules::hash(&module);
    Prepared {
        submission: Submission {
            name: name.into(),
            topology_file: "one.dot".into(),
            topology: "digraph one { v [component=\"c\"]; }\n".into(),
            components: BTreeMap::from([("c".to_owned(), hash.clone())]),
            ..Submission::default()
        },
        modules: BTreeMap::from([(hash, module)]),
    }
}

/// A job of one vertex that sleeps `ms` milliseconds without using the CPU, then prints
/// `slept` and ends.
pub(crate) fn sleeping(name: &str, ms: u64) -> Prepared {
    let module = Bytes::from_static(include_bytes!("../../../jobs/wat/sleep.wat"));
    let mut job = one_of(name, module);
    job.submission.parameters = BTreeMap::from([("ms".to_owned(), ms.to_string())]);
    job
}

/// Items moved between a job's vertices.
pub(crate) fn items(s: &JobStatus) -> u64 {
    s.traffic.iter().map(|t| t.items).sum()
}
