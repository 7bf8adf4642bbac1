//! A job's parts: what a node is sent to prepare its part, and what it reports of it.

use std::collections::BTreeMap;

use bytes::Bytes;
use mvm_component::policy::Principal;
use serde::{Deserialize, Serialize};

use mvm_queue::queue::Config as QueueConfig;

use super::check::{CheckError, check_len};
use super::{EnvSpec, ErrorKind, FileSpec, Hash, JobId, LimitSpec, Member, OutputFile};

/// A node's part of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartSpec {
    /// The job id.
    pub job: JobId,
    /// The topology's file name and text (the whole graph; the node runs its part).
    pub topology_file: String,
    /// The topology.
    pub topology: String,
    /// Queue defaults.
    pub queue: QueueConfig,
    /// Component name → module hash (only components of this part's vertices).
    pub components: BTreeMap<String, Hash>,
    /// Job parameters.
    pub parameters: BTreeMap<String, String>,
    /// Limits.
    pub limits: LimitSpec,
    /// Part index of every vertex, in topology order.
    pub placement: Vec<u32>,
    /// The peer id and addresses of every part.
    pub parts: Vec<Member>,
    /// This node's part.
    pub here: u32,
    /// Start right after preparing (a job of one part needs no second phase).
    #[serde(default)]
    pub start: bool,
    /// The environment to ensure first (none: the host as it is).
    #[serde(default)]
    pub environment: Option<EnvSpec>,
    /// The job's owner, for the node-level policy.
    pub owner: Principal,
    /// The digest of the policies the broker decided with; a node that holds other ones
    /// fetches the broker's before it decides.
    pub policy_digest: Hash,
    /// Which run of the job this part belongs to (0 first; each re-run after a lost node
    /// counts one more). A node holds one run of a job: a later one replaces an earlier one.
    #[serde(default)]
    pub attempt: u32,
    /// Make the part's modules pausable, for checkpoints.
    #[serde(default)]
    pub checkpoint: bool,
    /// Start the part from this checkpoint blob (fetched from the broker) instead of from the
    /// beginning.
    #[serde(default)]
    pub restore: Option<Hash>,
    /// With `restore`, for a job with files: what its vertices' sandboxes held at the
    /// checkpoint, laid out in place of the inputs (fetched by hash, from the broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_files: Option<Vec<OutputFile>>,
    /// The part's links will be libp2p streams even where the node offers direct links (a
    /// part moved in): it runs on the shared pool, never on dedicated threads (see
    /// `Prepared::direct_remote_links` in the component layer).
    #[serde(default)]
    pub streams: bool,
    /// The job's files: inputs the node fetches (by hash, from the broker) and lays out in
    /// each vertex's sandbox, outputs it takes back when the part ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileSpec>,
    /// Nodes that serve the environment's image: a node that lacks it fetches it from one of
    /// them first (checked against the image id's digest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_from: Vec<Member>,
    /// Nodes that may hold the job's input files (they prepared a part of a job with them
    /// before): a node that lacks an input asks them for it, in order, and the broker last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_from: Vec<Member>,
}

/// How a part of a job ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartReport {
    /// The job id.
    pub job: JobId,
    /// The run of the job the part belongs to ([`PartSpec::attempt`]).
    #[serde(default)]
    pub attempt: u32,
    /// Success (vertex outputs and traffic) or the first failure.
    pub outcome: Result<PartResult, VertexFailure>,
    /// The lines its vertices wrote that were not shipped before (also when it failed).
    #[serde(default)]
    pub logs: Vec<super::LogLine>,
}

impl PartReport {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), CheckError> {
        super::check::check_lines(&self.logs)?;
        if let Ok(res) = &self.outcome {
            check_len("outputs", res.outputs.len())?;
            check_len("traffic entries", res.traffic.len())?;
            check_len("edges", res.edges.len())?;
            check_len("ports", res.received.len())?;
            if let Some(g) = &res.guest {
                super::check::check_name("the guest's name", &g.name)?;
                super::check::check_name("the guest's driver", &g.driver)?;
            }
        }
        Ok(())
    }
}

/// A part's results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartResult {
    /// Each local vertex's stdout.
    pub outputs: Vec<(String, Bytes)>,
    /// Traffic by edge kind.
    pub traffic: Vec<Traffic>,
    /// What each edge out of a local vertex carried, over the vertex's whole life.
    #[serde(default)]
    pub edges: Vec<EdgeTraffic>,
    /// What each input port of a local vertex took, over the vertex's whole life.
    #[serde(default)]
    pub received: Vec<PortTraffic>,
    /// Wall time of the part, milliseconds.
    pub wall_ms: u64,
    /// The guest it ran in, when its job named an image.
    #[serde(default)]
    pub guest: Option<GuestIdentity>,
}

/// The guest a part ran in, as its node knew it at the part's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIdentity {
    /// The guest's name: the domain's with Xen, the control group's with the host driver.
    pub name: String,
    /// The hypervisor's id for it then (Xen's domid), where there is one.
    pub id: Option<u32>,
    /// The driver: `host` or `xen`.
    pub driver: String,
    /// The process id of the part's worker, when it ran in one.
    pub worker: Option<u32>,
    /// The boot id of the kernel that worker ran under: a Xen guest's own, not its node's.
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// What one edge of a job's topology carried, as its sending vertex counted it: the items its
/// channel took. A vertex restored from a checkpoint counts on from the checkpoint's figures,
/// so a job restored or moved counts every item once, as an undisturbed run does.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EdgeTraffic {
    /// The sending end, `vertex:port`.
    pub from: String,
    /// The receiving end, `vertex:port`.
    pub to: String,
    /// Items.
    pub items: u64,
    /// Bytes, as queued (encoded by the edge's codec).
    pub bytes: u64,
}

/// What one input port took from its queue (every edge into it), counted as
/// [`EdgeTraffic`] is.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortTraffic {
    /// The port, `vertex:port`.
    pub port: String,
    /// Items.
    pub items: u64,
    /// Bytes, as queued.
    pub bytes: u64,
}

/// Items and bytes moved through one kind of edge.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Traffic {
    /// Queue kind (`fifo`, `priority`).
    pub kind: String,
    /// Codec.
    pub codec: String,
    /// Whether the edge crosses nodes.
    pub remote: bool,
    /// Whether those remote items went over direct links (not libp2p streams).
    #[serde(default)]
    pub direct: bool,
    /// Whether those direct links were sealed (authenticated and encrypted), not plain.
    #[serde(default)]
    pub sealed: bool,
    /// Items.
    pub items: u64,
    /// Bytes (encoded).
    pub bytes: u64,
}

/// The first failure of a part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VertexFailure {
    /// The vertex (empty when no single vertex is to blame, e.g. a broken stream).
    pub vertex: String,
    /// Why, for people.
    pub cause: String,
    /// What kind of failure it was.
    pub kind: ErrorKind,
}
