//! The Polar classes a policy sees: one actor class per principal kind, one per resource.
//!
//! Every class has a `domain` attribute, so an inter-domain rule can compare
//! `actor.domain` with `resource.domain` whatever the resource is.

use oso::PolarClass;

/// A user, as Polar class `User`: `name`, `domain`, `roles` (a list of strings).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PolarClass)]
pub struct User {
    /// Name in its domain.
    #[polar(attribute)]
    pub name: String,
    /// Its domain.
    #[polar(attribute)]
    pub domain: String,
    /// Roles from its certificate.
    #[polar(attribute)]
    pub roles: Vec<String>,
}

/// A node or super-peer, as Polar class `Node` (an actor when it acts for its group, a
/// resource when a job is to run on it): `name`, `domain`, `roles`, `group`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PolarClass)]
pub struct Node {
    /// Name in its domain.
    #[polar(attribute)]
    pub name: String,
    /// Its domain.
    #[polar(attribute)]
    pub domain: String,
    /// Roles from its certificate (e.g. `superpeer`).
    #[polar(attribute)]
    pub roles: Vec<String>,
    /// Its group (empty when not known).
    #[polar(attribute)]
    pub group: String,
}

/// A domain as a whole, as Polar class `Domain`: `name`, `domain` (the same).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PolarClass)]
pub struct Domain {
    /// The domain's name.
    #[polar(attribute)]
    pub name: String,
    /// The same name, so every class has `domain`.
    #[polar(attribute)]
    pub domain: String,
}

impl Domain {
    /// The domain `name`.
    pub fn named(name: &str) -> Domain {
        Domain {
            name: name.to_owned(),
            domain: name.to_owned(),
        }
    }
}

/// A group of nodes, as Polar class `Group`: `name`, `domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PolarClass)]
pub struct Group {
    /// The group's name.
    #[polar(attribute)]
    pub name: String,
    /// Its domain.
    #[polar(attribute)]
    pub domain: String,
}

/// An image of a repository, as Polar class `Image`: `id`, `domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PolarClass)]
pub struct Image {
    /// Its id (`host`, or `sha256:…`).
    #[polar(attribute)]
    pub id: String,
    /// The domain whose node holds it.
    #[polar(attribute)]
    pub domain: String,
}

/// A job, as Polar class `Job`: what it asks for, and what its owner would then hold in the
/// domain (`user_*`: this job plus the owner's running jobs there), for sharing limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PolarClass)]
pub struct Job {
    /// The profile's name.
    #[polar(attribute)]
    pub name: String,
    /// Its owner's name.
    #[polar(attribute)]
    pub owner: String,
    /// The owner's domain.
    #[polar(attribute)]
    pub owner_domain: String,
    /// The domain it runs in (the broker's).
    #[polar(attribute)]
    pub domain: String,
    /// vCPUs it asks for.
    #[polar(attribute)]
    pub vcpus: i64,
    /// Memory it asks for, MiB.
    #[polar(attribute)]
    pub memory_mib: i64,
    /// Its vertices.
    #[polar(attribute)]
    pub vertices: i64,
    /// The image it runs on (`host` when none).
    #[polar(attribute)]
    pub image: String,
    /// The owner's vCPUs in the domain with this job.
    #[polar(attribute)]
    pub user_vcpus: i64,
    /// The owner's memory in the domain with this job, MiB.
    #[polar(attribute)]
    pub user_memory_mib: i64,
    /// The owner's vertices in the domain with this job.
    #[polar(attribute)]
    pub user_vertices: i64,
}

/// A group's latest monitoring results, as Polar class `Metrics`: what a domain's
/// `scheduling(metrics, POLICY)` rules decide from (the MVM paper's scheduling policy
/// adjusted from each monitoring result).
///
/// `mean`, `sum`, `min` and `max` are dictionaries from a probe's name to that aggregate over
/// the live nodes that publish it (a probe with one value per job, such as `backlog`, counts
/// as the sum of its values on a node): `m.mean.load < 0.2`, `m.sum.queue_depth > 1000`. A
/// probe no node publishes is not in them, and a rule that reads it does not hold.
#[derive(Debug, Clone, Default, PartialEq, PolarClass)]
pub struct Metrics {
    /// The group's name.
    #[polar(attribute)]
    pub group: String,
    /// Its domain.
    #[polar(attribute)]
    pub domain: String,
    /// The scheduling policy in force (`rank` when no rule has chosen one), so that a rule can
    /// keep it while a value moves a little (hysteresis).
    #[polar(attribute)]
    pub scheduling: String,
    /// Live nodes.
    #[polar(attribute)]
    pub nodes: i64,
    /// Vertex slots of the live nodes.
    #[polar(attribute)]
    pub slots: i64,
    /// Of those, the slots no job holds.
    #[polar(attribute)]
    pub free_slots: i64,
    /// Jobs running (or being prepared).
    #[polar(attribute)]
    pub running_jobs: i64,
    /// Jobs waiting in the group's queue.
    #[polar(attribute)]
    pub pending_jobs: i64,
    /// The vertices of the waiting jobs.
    #[polar(attribute)]
    pub pending_vertices: i64,
    /// The mean 1-minute load average of the live nodes (from their heartbeats).
    #[polar(attribute)]
    pub mean_load: f64,
    /// The highest.
    #[polar(attribute)]
    pub max_load: f64,
    /// Each published probe's mean over the nodes that publish it.
    #[polar(attribute)]
    pub mean: std::collections::BTreeMap<String, f64>,
    /// Its sum.
    #[polar(attribute)]
    pub sum: std::collections::BTreeMap<String, f64>,
    /// Its smallest value.
    #[polar(attribute)]
    pub min: std::collections::BTreeMap<String, f64>,
    /// Its largest value.
    #[polar(attribute)]
    pub max: std::collections::BTreeMap<String, f64>,
}

/// Registers every class with `oso`.
pub(crate) fn register(oso: &mut oso::Oso) -> Result<(), String> {
    for class in [
        User::get_polar_class(),
        Node::get_polar_class(),
        Domain::get_polar_class(),
        Group::get_polar_class(),
        Image::get_polar_class(),
        Job::get_polar_class(),
        Metrics::get_polar_class(),
    ] {
        oso.register_class(class).map_err(|e| e.to_string())?;
    }
    Ok(())
}
