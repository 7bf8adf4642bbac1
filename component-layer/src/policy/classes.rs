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

/// Registers every class with `oso`.
pub(crate) fn register(oso: &mut oso::Oso) -> Result<(), String> {
    for class in [
        User::get_polar_class(),
        Node::get_polar_class(),
        Domain::get_polar_class(),
        Group::get_polar_class(),
        Image::get_polar_class(),
        Job::get_polar_class(),
    ] {
        oso.register_class(class).map_err(|e| e.to_string())?;
    }
    Ok(())
}
