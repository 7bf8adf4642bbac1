//! A lab set up before it starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mvm_component::policy::PrincipalKind;

use super::{Lab, Running, creds, fast, run};
use crate::daemon::DaemonConfig;
use crate::pki::{Ca, Credentials};
use crate::policy::PolicySource;

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
    /// The super-peers' triggers.
    triggers: Vec<crate::trigger::Trigger>,
    /// The super-peers' quota of files no job names, per principal.
    files_quota: u64,
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
            triggers: Vec::new(),
            files_quota: crate::files::DEFAULT_QUOTA,
        }
    }

    /// The bytes of files each principal may hold at the super-peers that no job names.
    pub(crate) fn files_quota(mut self, bytes: u64) -> Setup {
        self.files_quota = bytes;
        self
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

    /// Triggers for the super-peers (files written into the lab's directory, as
    /// `NAME.toml` and their text).
    pub(crate) fn triggers(mut self, files: &[(&str, &str)]) -> Setup {
        let dir = write_policies(self.dir.path(), "triggers", files);
        self.triggers = crate::trigger::load_dir(&dir).expect("the triggers load");
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
                triggers: self.triggers.clone(),
                crl: Some(lab.crl_file()),
                files_quota: self.files_quota,
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
pub(super) fn write_policies(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
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
