//! Service level agreements (OpenCCS, `004_*` sections 2 and 3.1): what a broker offers to run
//! a job by, and the state of an agreement once an offer is accepted.

use serde::{Deserialize, Serialize};

use super::JobId;

/// Where an offer or agreement is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgreementState {
    /// Offered: its resources are held for it until it is accepted or expires.
    Offered,
    /// Accepted: its resources are reserved from its start; its job waits for it.
    Accepted,
    /// Its job runs.
    Running,
    /// Its job ended well by the promised finish.
    Met,
    /// The broker could not keep it (why is given).
    Violated,
    /// Offered, and not accepted before it expired.
    Expired,
    /// Its job was cancelled by its owner (or an administrator).
    Cancelled,
}

impl AgreementState {
    /// Whether nothing more happens to it.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            AgreementState::Offered | AgreementState::Accepted | AgreementState::Running
        )
    }

    /// Its name, as `mvm agreements` shows it.
    pub fn name(self) -> &'static str {
        match self {
            AgreementState::Offered => "offered",
            AgreementState::Accepted => "accepted",
            AgreementState::Running => "running",
            AgreementState::Met => "met",
            AgreementState::Violated => "violated",
            AgreementState::Expired => "expired",
            AgreementState::Cancelled => "cancelled",
        }
    }
}

/// An offer, or the agreement it became, as a client sees it. The offer's id is the id of
/// the job an accepted offer runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementInfo {
    /// The offer (and its job's) id.
    pub id: JobId,
    /// The profile's name.
    pub name: String,
    /// The owner, `name@domain`.
    pub owner: String,
    /// The group that made it.
    pub group: String,
    /// The domain of that group.
    pub domain: String,
    /// The execution environment: the image's full id (`name:version@sha256:HEX`), or `host`.
    pub image: String,
    /// CPUs asked for each guest.
    pub vcpus: u32,
    /// Memory asked for each guest, MiB.
    pub memory_mib: u64,
    /// Vertices (slots).
    pub vertices: u32,
    /// The nodes reserved, by name, with their vertex slots.
    pub nodes: Vec<(String, u32)>,
    /// The earliest start, milliseconds since the Unix epoch.
    pub start_ms: u64,
    /// The promised finish, milliseconds since the Unix epoch.
    pub finish_ms: u64,
    /// The run time the plan assumed, milliseconds, and where it came from.
    pub estimate_ms: u64,
    /// `profile` (its `estimate`) or `history` (earlier runs of the profile).
    pub estimate_from: String,
    /// The deadline the asker gave, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The price, when the group runs a market (none otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    /// When the offer lapses unless accepted, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// Its state.
    pub state: AgreementState,
    /// Why it was violated (or expired, or cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_ms: Option<u64>,
    /// When its state last changed to a final one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// The addresses of the super-peer that made it, when it is another group's than the
    /// asker's: follow it there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub broker_addrs: Vec<libp2p::Multiaddr>,
}

/// How long an offer is held for its asker by default, milliseconds.
pub const OFFER_TTL_MS: u64 = 60_000;

/// The longest an offer is held, milliseconds.
pub const MAX_OFFER_TTL_MS: u64 = 3_600_000;
