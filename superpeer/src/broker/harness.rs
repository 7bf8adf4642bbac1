//! An in-process lab for lifecycle tests (libp2p's `swarm-test` is the model): super-peers
//! and nodes as real daemons on one tokio runtime, with ephemeral identities of one domain CA,
//! talking libp2p over loopback; a daemon is stopped by its shutdown signal, after which it
//! answers nothing (its job log stops, its swarm closes).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mvm_component::policy::PrincipalKind;
use tokio::sync::oneshot;

use crate::client::{Client, Prepared};
use crate::daemon::{Daemon, DaemonConfig};
use crate::net::NetConfig;
use crate::pki::{Ca, Credentials, Subject};
use crate::proto::{JobState, JobStatus, LimitSpec, Requirements, Submission};

/// A daemon running on the test's runtime.
pub(crate) struct Running {
    /// Its `/…/p2p/PEER` address.
    pub(crate) addr: String,
    /// How it was started, to start it again.
    creds: Credentials,
    config: DaemonConfig,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops it and waits until it has.
    pub(crate) async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
            let _ = (&mut self.task).await;
        }
    }

    /// Starts it again as it was (identity, address, state directory).
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
}

/// Super-peers and nodes of one group.
pub(crate) struct Lab {
    _dir: tempfile::TempDir,
    ca: Ca,
    pub(crate) superpeers: Vec<Running>,
    pub(crate) nodes: Vec<Running>,
    /// The super-peers' addresses, for nodes to register.
    bootstrap: Vec<String>,
}

fn creds(ca: &Ca, kind: PrincipalKind, name: &str, roles: &[&str]) -> Credentials {
    let subject = Subject {
        kind,
        name: name.into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
    };
    Credentials::ephemeral(ca, &subject).expect("credentials")
}

fn fast(config: DaemonConfig) -> DaemonConfig {
    DaemonConfig {
        heartbeat: Duration::from_millis(100),
        lost_after: Duration::from_millis(1000),
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            ..NetConfig::default()
        },
        ..config
    }
}

async fn run(creds: &Credentials, config: DaemonConfig) -> Running {
    let daemon = Daemon::start(creds, config.clone())
        .await
        .expect("daemon starts");
    let addr = daemon.dial_addrs()[0].clone();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(daemon.run(async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        creds: creds.clone(),
        config,
        stop: Some(tx),
        task,
    }
}

impl Lab {
    /// `superpeers` replicas of the group's job log (each knowing the others by fixed ports)
    /// and a node per entry of `slots`, all registered.
    pub(crate) async fn start(superpeers: usize, slots: &[u32]) -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(&dir.path().join("ca"), "default", 30).expect("ca");
        // Ports chosen first, so that each replica is told the others' addresses.
        let sps: Vec<(Credentials, u16)> = (0..superpeers)
            .map(|i| {
                let c = creds(&ca, PrincipalKind::Node, &format!("sp{i}"), &["superpeer"]);
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port();
                (c, port)
            })
            .collect();
        let addr =
            |(c, port): &(Credentials, u16)| format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", c.peer());
        let mut lab = Lab {
            _dir: dir,
            ca,
            superpeers: Vec::new(),
            nodes: Vec::new(),
            bootstrap: Vec::new(),
        };
        for (i, sp) in sps.iter().enumerate() {
            let mut config = fast(DaemonConfig {
                name: format!("sp{i}"),
                broker: true,
                state_dir: Some(lab._dir.path().join(format!("sp{i}"))),
                slots: 0,
                replicas: sps
                    .iter()
                    .filter(|o| o.0.peer() != sp.0.peer())
                    .map(addr)
                    .collect(),
                ..DaemonConfig::default()
            });
            config.net.listen = vec![
                format!("/ip4/127.0.0.1/tcp/{}", sp.1)
                    .parse()
                    .expect("addr"),
            ];
            lab.superpeers.push(run(&sp.0, config).await);
        }
        lab.bootstrap = sps.iter().map(addr).collect();
        for s in slots {
            lab.add_node(*s).await;
        }
        lab.registered(slots.len()).await;
        lab
    }

    /// Starts one more node, with `slots` vertex slots, named `n` and its index.
    pub(crate) async fn add_node(&mut self, slots: u32) {
        let name = format!("n{}", self.nodes.len());
        let c = creds(&self.ca, PrincipalKind::Node, &name, &[]);
        let config = fast(DaemonConfig {
            name,
            slots,
            bootstrap: self.bootstrap.clone(),
            ..DaemonConfig::default()
        });
        self.nodes.push(run(&c, config).await);
    }

    /// A user of the group's domain, with role `researcher`.
    pub(crate) fn user(&self) -> Credentials {
        creds(&self.ca, PrincipalKind::User, "alice", &["researcher"])
    }

    /// A client of the group's leader, as [`Lab::user`].
    pub(crate) async fn client(&self) -> Client {
        let user = self.user();
        let addrs: Vec<String> = self
            .superpeers
            .iter()
            .filter(|s| s.stop.is_some())
            .map(|s| s.addr.clone())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Client::find(&user, &addrs).await {
                Ok(c) => return c,
                Err(e) => assert!(Instant::now() < deadline, "no leader: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the leader knows `n` live nodes.
    pub(crate) async fn registered(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(g) = self.client().await.group().await
                && g.nodes.iter().filter(|x| !x.lost).count() >= n
            {
                return;
            }
            assert!(Instant::now() < deadline, "{n} nodes did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The index of the super-peer that leads now.
    pub(crate) async fn leader(&self) -> usize {
        let c = self.client().await;
        let leader = c.broker().to_string();
        self.superpeers
            .iter()
            .position(|s| s.addr.ends_with(&leader))
            .expect("the leader is one of the lab's super-peers")
    }
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
    let module = Bytes::from_static(wat.as_bytes());
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

/// Items moved between a job's vertices.
pub(crate) fn items(s: &JobStatus) -> u64 {
    s.traffic.iter().map(|t| t.items).sum()
}
