//! Nodes, members and groups.

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use super::check::{CheckError, check_len, check_name};

/// What a node tells its super-peer when it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name (for people).
    pub name: String,
    /// Its group.
    pub group: String,
    /// Its domain.
    pub domain: String,
    /// Addresses it listens on.
    pub addrs: Vec<Multiaddr>,
    /// CPUs.
    pub cpus: u32,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    /// Architecture.
    pub arch: String,
    /// Image ids it can run.
    pub images: Vec<String>,
    /// The most vertices it runs at once.
    pub slots: u32,
    /// Whether it is a super-peer candidate (a replica of the group's job log).
    pub eligible: bool,
    /// Its current load.
    pub load: NodeLoad,
    /// The node whose guest it runs in, when a trigger made that guest (the node to ask to
    /// tear it down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_of: Option<PeerId>,
    /// Whether it keeps an image repository and fetches an image it lacks, before a job that
    /// needs it, from a node that serves it (GridWay's pre-wrapper).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fetches_images: bool,
}

/// A node's changing properties.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Free memory, bytes.
    pub free_memory_bytes: u64,
    /// 1-minute load average.
    pub load: f64,
    /// Vertices running now.
    pub vertices: u32,
    /// Image ids it offers now (images imported while it runs are offered from the next
    /// heartbeat on).
    #[serde(default)]
    pub images: Vec<String>,
    /// The jobs it runs parts of now (the leader answers which of them it must stop).
    #[serde(default)]
    pub jobs: Vec<super::JobId>,
    /// Its warm guests free now: template shape key → how many.
    #[serde(default)]
    pub warm: std::collections::BTreeMap<String, u32>,
    /// Its deepest queues of running jobs now (at most [`MAX_QUEUE_SAMPLES`]).
    #[serde(default)]
    pub queues: Vec<QueueSample>,
    /// What each running job's queues here have carried so far.
    #[serde(default)]
    pub traffic: Vec<JobTraffic>,
    /// The samples its probes took since its last heartbeat (at most [`MAX_PROBE_SAMPLES`]),
    /// as its monitoring policy runs them.
    #[serde(default)]
    pub probes: Vec<ProbeSample>,
    /// Its charges for bidding jobs' CPU time the bank has not yet taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub charges: Vec<super::ChargeBatch>,
    /// Its price: the sum of the bid rates on it, micro-credits per CPU-second.
    #[serde(default)]
    pub price: u64,
    /// The accounts whose jobs bid on it now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bidders: Vec<String>,
    /// The least bid it takes, micro-credits per CPU-second (its domain's `floor_price`).
    #[serde(default)]
    pub floor: u64,
}

/// The most queues a heartbeat lists.
pub const MAX_QUEUE_SAMPLES: usize = 8;

/// The most probe samples a heartbeat carries.
pub const MAX_PROBE_SAMPLES: usize = 64;

/// One sample of a node's probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSample {
    /// The probe, e.g. `free_memory`.
    pub probe: String,
    /// The job it is of, for a probe with a value per job (e.g. `backlog`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The value.
    pub value: f64,
    /// When it was taken (milliseconds since the Unix epoch, the node's clock).
    pub at_ms: u64,
    /// The probe's interval under the node's monitoring policy, in milliseconds (a sample
    /// older than a few of them is stale).
    pub interval_ms: u64,
}

/// A queue of a running job on a node, as its heartbeat gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSample {
    /// The job.
    pub job: String,
    /// The queue (`vertex:port`, or `vertex:port>out` for a link's outbox).
    pub queue: String,
    /// Items held now.
    pub depth: u64,
    /// Bytes held now.
    pub depth_bytes: u64,
}

/// What one running job's queues on a node have carried so far (counters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTraffic {
    /// The job.
    pub job: String,
    /// Items taken out of its queues.
    pub items: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A member of a group, as the super-peer lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Peer id.
    pub peer: PeerId,
    /// Addresses.
    pub addrs: Vec<Multiaddr>,
    /// Whether it is a super-peer candidate (a replica of the group's job log).
    pub eligible: bool,
}

/// A group as a daemon sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupInfo {
    /// The group's name.
    pub group: String,
    /// The super-peer's peer id, when known.
    pub broker: Option<PeerId>,
    /// Its addresses.
    pub broker_addrs: Vec<Multiaddr>,
    /// Whether the answering daemon is the super-peer.
    pub is_broker: bool,
    /// The registered nodes (the super-peer's view; a node lists what it last heard).
    pub nodes: Vec<NodeView>,
    /// Other groups, from their super-peers' summaries.
    #[serde(default)]
    pub groups: Vec<GroupSummary>,
    /// The scheduling policy in force (a super-peer's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingView>,
}

/// What a super-peer tells the others about its group (gossiped every few heartbeats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The group.
    pub group: String,
    /// Its domain.
    pub domain: String,
    /// The super-peer's peer id.
    pub broker: PeerId,
    /// Its addresses (`/…/p2p/PEER`).
    pub addrs: Vec<Multiaddr>,
    /// Live nodes.
    pub nodes: u32,
    /// Free vertex slots over all nodes.
    pub free_slots: u32,
    /// Image ids offered by some node.
    pub images: Vec<String>,
    /// Architectures of the nodes.
    pub archs: Vec<String>,
    /// Its live nodes' prices (Tycoon's service location service).
    #[serde(default)]
    pub hosts: Vec<HostPrice>,
    /// The number of its domain's revocation list it holds: a super-peer holding an older
    /// one (or none) of a domain it trusts asks this one for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<u64>,
}

/// A node's price for its CPU, as the market lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPrice {
    /// The node.
    pub name: String,
    /// Its CPUs.
    pub cpus: u32,
    /// The sum of the bid rates on it, micro-credits per CPU-second.
    pub price: u64,
    /// How many accounts bid on it.
    pub bidders: u32,
    /// Its free vertex slots.
    pub free_slots: u32,
    /// The least bid it takes, micro-credits per CPU-second.
    #[serde(default)]
    pub floor: u64,
}

impl GroupSummary {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), CheckError> {
        check_name("the group", &self.group)?;
        check_name("the domain", &self.domain)?;
        check_len("addresses", self.addrs.len())?;
        check_len("images", self.images.len())?;
        check_len("hosts", self.hosts.len())?;
        self.hosts
            .iter()
            .try_for_each(|h| check_name("a host's name", &h.name))?;
        check_len("architectures", self.archs.len())
    }
}

/// A node as the super-peer sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// Peer id.
    pub peer: PeerId,
    /// Name.
    pub name: String,
    /// Whether it stopped answering.
    pub lost: bool,
    /// Vertices placed on it by running jobs.
    pub vertices: u32,
    /// Vertices it said it runs at its last heartbeat.
    #[serde(default)]
    pub running: u32,
    /// Its slots.
    pub slots: u32,
    /// Its warm guests free at its last heartbeat: template shape key → how many.
    #[serde(default)]
    pub warm: std::collections::BTreeMap<String, u32>,
    /// Its CPUs.
    #[serde(default)]
    pub cpus: u32,
    /// Its memory, bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Its free memory at its last heartbeat, bytes.
    #[serde(default)]
    pub free_memory_bytes: u64,
    /// Its 1-minute load average at its last heartbeat.
    #[serde(default)]
    pub load: f64,
    /// Its deepest queues at its last heartbeat.
    #[serde(default)]
    pub queues: Vec<QueueSample>,
    /// What its running jobs' queues had carried at its last heartbeat.
    #[serde(default)]
    pub traffic: Vec<JobTraffic>,
    /// The latest sample of each probe it publishes (and of each job's, for a probe with a
    /// value per job).
    #[serde(default)]
    pub probes: Vec<ProbeSample>,
    /// Its price at its last heartbeat: the sum of the bid rates on it, micro-credits per
    /// CPU-second.
    #[serde(default)]
    pub price: u64,
    /// How many accounts bid on it.
    #[serde(default)]
    pub bidders: u32,
    /// The least bid it takes, micro-credits per CPU-second.
    #[serde(default)]
    pub floor: u64,
}

/// The scheduling policy a group places jobs by, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulingView {
    /// The policy: `rank`, `spread`, `pack` or `least-loaded`.
    pub policy: String,
    /// Since when (milliseconds since the Unix epoch).
    pub since_ms: u64,
    /// What chose it: the domain's `scheduling` rule, or the default when none holds.
    pub by: String,
    /// The group's metrics it was last chosen from, as the rules see them (`mean_load`,
    /// `pending_vertices`, `mean.free_disk`, `max.queue_depth`, …).
    pub metrics: std::collections::BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_round_trips_and_one_with_a_bad_peer_id_does_not_decode() {
        let peer = PeerId::random();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
            .parse()
            .expect("an address");
        let m = Member {
            peer,
            addrs: vec![addr],
            eligible: true,
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&m, &mut buf).expect("encodes");
        assert_eq!(crate::proto::decode::<Member>(&buf).expect("decodes"), m);
        // The same member with bytes that are no peer id.
        let bad = ciborium::Value::Map(vec![
            (
                "peer".into(),
                ciborium::Value::Bytes(b"not a peer".to_vec()),
            ),
            ("addrs".into(), ciborium::Value::Array(Vec::new())),
            ("eligible".into(), true.into()),
        ]);
        let mut buf = Vec::new();
        ciborium::into_writer(&bad, &mut buf).expect("encodes");
        let e = crate::proto::decode::<Member>(&buf).expect_err("no peer id");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        // JSON (the CLI's output) keeps them as text.
        let json = serde_json::to_value(&m).expect("json");
        assert_eq!(json["peer"], peer.to_string());
    }
}
