//! A daemon's policies: where they come from, the version in force, and how a new version
//! is taken in at run time.
//!
//! The top super-peer of a domain holds the files ([`PolicySource::Dir`], re-read on
//! `mvm policy reload` and when the files change) or the embedded default; other super-peers
//! and nodes fetch the bundle from a super-peer ([`PolicySource::Fetch`]) by version and
//! digest, and take a new one without restarting.

use crate::proto::PeerRequest;
use std::path::PathBuf;
use std::sync::Arc;

use mvm_component::policy::{Bundle, BundleError, Cached, Engine, OsoEngine, Principal};
use parking_lot::{Mutex, RwLock};

use crate::proto::{Failure, Hash, Request, Response};

/// How many answers a loaded version remembers.
const CACHE: usize = 1 << 16;

/// Why policies cannot be loaded, read again or fetched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// A bundle (the embedded default, or one fetched) does not load.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The files of a policy directory cannot be read, or do not load.
    #[error("{}", .error.in_dir(.dir))]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why, naming the file and place.
        error: BundleError,
    },
    /// A fetched bundle whose digest is not the one it came with.
    #[error("the fetched policies do not match their digest")]
    Digest,
    /// The configured source is not the address of a super-peer.
    #[error("the policy source: {0}")]
    Source(crate::net::AddrError),
    /// The source answered with something other than policies.
    #[error("{0} answered a policy request with something else")]
    Answer(libp2p::PeerId),
    /// The source could not be asked, or refused.
    #[error("policies from {peer}: {}", .failure.message)]
    Fetch {
        /// The source.
        peer: libp2p::PeerId,
        /// Its failure.
        failure: Failure,
    },
    /// Policies asked for by someone other than a node.
    #[error("{0} is not a node; policies go to nodes only")]
    NotANode(Box<Principal>),
    /// A reload asked for by someone the policies do not let administer the domain.
    #[error("{0}")]
    Denied(String),
    /// A reload asked of a daemon that holds no policy directory.
    #[error("{peer} holds no policy directory (its policies: {policies:?})")]
    NoDirectory {
        /// The daemon.
        peer: libp2p::PeerId,
        /// Where its policies come from.
        policies: PolicySource,
    },
}

impl PolicyError {
    fn in_dir(dir: &std::path::Path) -> impl FnOnce(BundleError) -> PolicyError + '_ {
        move |error| PolicyError::Dir {
            dir: dir.to_owned(),
            error,
        }
    }
}

/// Where a daemon's policies come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The embedded default for the daemon's domain: its certified members may do anything
    /// to its resources, and nobody else anything.
    Default,
    /// A policy directory (`inter-domain.polar`, `DOMAIN/*.polar`, `node.polar`), held here.
    Dir(PathBuf),
    /// Fetched from the super-peer at this address (`/…/p2p/PEER`), or from the daemon's own
    /// super-peer when `None`.
    Fetch(Option<String>),
}

/// The embedded default bundle for `domain`.
pub fn default_bundle(domain: &str) -> Bundle {
    let mut b = Bundle::default();
    b.files.insert(
        format!("{domain}/default.polar"),
        format!(
            "# The embedded default of domain {domain}: every certified member of the domain\n\
             # may do anything to its resources.\n\
             allow(actor, _action: String, resource) if actor.domain = \"{domain}\" and \
             resource.domain = \"{domain}\";\n"
        ),
    );
    b.files.insert(
        "node.polar".into(),
        "# The embedded default: a node runs jobs for its own domain.\n\
         allow(actor, \"run\", node: Node) if actor.domain = node.domain;\n\
         # Its monitoring: what it publishes to its super-peer, and how often (ms).\n\
         probe(\"load\", 2000);\n\
         probe(\"free_memory\", 2000);\n\
         probe(\"vertices\", 1000);\n\
         probe(\"queue_depth\", 1000);\n\
         probe(\"backlog\", 1000);\n"
            .into(),
    );
    b
}

/// One loaded version.
pub(crate) struct Loaded {
    /// Its version (0: none yet; every request is denied).
    pub(crate) version: u64,
    /// The bundle's digest.
    pub(crate) digest: Hash,
    /// The files.
    pub(crate) bundle: Arc<Bundle>,
    /// The engine answering from it.
    pub(crate) engine: Arc<dyn Engine>,
}

impl Loaded {
    fn load(bundle: Bundle, version: u64) -> Result<Loaded, mvm_component::policy::BundleError> {
        let engine = OsoEngine::load(&bundle, version)?;
        Ok(Loaded {
            version,
            digest: Hash::from(bundle.sha256()),
            bundle: Arc::new(bundle),
            engine: Arc::new(Cached::new(engine, CACHE)),
        })
    }
}

/// The policies in force, and where they come from.
pub(crate) struct Policies {
    source: PolicySource,
    current: RwLock<Arc<Loaded>>,
    /// The digest of the last directory contents that failed to load (logged once).
    failed: Mutex<Option<Hash>>,
}

impl Policies {
    /// Loads the policies of `source` (a fetched source starts empty: everything is denied
    /// until the first bundle arrives).
    pub(crate) fn open(source: PolicySource, domain: &str) -> Result<Policies, PolicyError> {
        let first = match &source {
            PolicySource::Default => Loaded::load(default_bundle(domain), 1)?,
            PolicySource::Dir(d) => {
                let b = Bundle::read_dir(d).map_err(PolicyError::in_dir(d))?;
                Loaded::load(b, 1).map_err(PolicyError::in_dir(d))?
            }
            PolicySource::Fetch(_) => Loaded::load(Bundle::default(), 0)?,
        };
        Ok(Policies {
            source,
            current: RwLock::new(Arc::new(first)),
            failed: Mutex::new(None),
        })
    }

    /// The version in force.
    pub(crate) fn current(&self) -> Arc<Loaded> {
        self.current.read().clone()
    }

    /// Where they come from.
    pub(crate) fn source(&self) -> &PolicySource {
        &self.source
    }

    /// Re-reads a policy directory; a change becomes the next version. Returns the version in
    /// force, and whether it is new.
    ///
    /// # Errors
    /// The files do not load (the version in force stays).
    pub(crate) fn reload(&self) -> Result<(Arc<Loaded>, bool), PolicyError> {
        let PolicySource::Dir(dir) = &self.source else {
            return Ok((self.current(), false));
        };
        let bundle = Bundle::read_dir(dir).map_err(PolicyError::in_dir(dir))?;
        let cur = self.current();
        let digest = Hash::from(bundle.sha256());
        if digest == cur.digest {
            return Ok((cur, false));
        }
        match Loaded::load(bundle, cur.version + 1) {
            Ok(l) => {
                let l = Arc::new(l);
                *self.current.write() = l.clone();
                *self.failed.lock() = None;
                tracing::info!(version = l.version, digest = %l.digest, "policies reloaded");
                Ok((l, true))
            }
            Err(e) => {
                let mut failed = self.failed.lock();
                if *failed != Some(digest) {
                    tracing::error!(error = %e, "the changed policies do not load; keeping version {}", cur.version);
                    *failed = Some(digest);
                }
                Err(PolicyError::in_dir(dir)(e))
            }
        }
    }

    /// Takes a bundle fetched from a super-peer, if it is newer and its digest is right.
    ///
    /// # Errors
    /// The digest does not match, or the bundle does not load.
    pub(crate) fn adopt(
        &self,
        version: u64,
        digest: &Hash,
        bundle: Bundle,
    ) -> Result<bool, PolicyError> {
        if Hash::from(bundle.sha256()) != *digest {
            return Err(PolicyError::Digest);
        }
        let cur = self.current();
        if cur.digest == *digest && cur.version == version {
            return Ok(false);
        }
        let l = Loaded::load(bundle, version)?;
        tracing::info!(version, %digest, "policies taken from the super-peer");
        *self.current.write() = Arc::new(l);
        Ok(true)
    }
}

/// `PeerRequest::Policy`: the bundle in force, to nodes and super-peers (not to users).
pub(crate) fn serve(site: &crate::site::Site, asker: &Principal, have: Option<&Hash>) -> Response {
    if asker.kind != mvm_component::policy::PrincipalKind::Node {
        return Response::Error(PolicyError::NotANode(Box::new(asker.clone())).into());
    }
    let cur = site.policies.current();
    Response::Policy {
        version: cur.version,
        digest: cur.digest,
        bundle: (have != Some(&cur.digest)).then(|| (*cur.bundle).clone()),
    }
}

/// Why `asker` may not `administer` the site's domain (to `what`, for the refusal), if not.
pub(crate) fn admin_refusal(
    site: &crate::site::Site,
    asker: &Principal,
    what: &str,
) -> Option<Response> {
    use mvm_component::policy::{Domain, Question, Resource};
    let q = Question {
        actor: asker.clone(),
        action: "administer".into(),
        resource: Resource::Domain(Domain::named(&site.domain)),
    };
    match site.policies.current().engine.decide(&q) {
        mvm_component::policy::Decision::Deny(why) => {
            let why = format!("{what}: {why}");
            Some(Response::Error(PolicyError::Denied(why).into()))
        }
        _ => None,
    }
}

/// `ClientRequest::PolicyReload`, from someone allowed to `administer` the domain.
pub(crate) fn reload(site: &crate::site::Site, asker: &Principal) -> Response {
    use mvm_component::policy::{Domain, Question, Resource};
    let domain = &site.domain;
    let cur = site.policies.current();
    let q = Question {
        actor: asker.clone(),
        action: "administer".into(),
        resource: Resource::Domain(Domain::named(domain)),
    };
    if let mvm_component::policy::Decision::Deny(why) = cur.engine.decide(&q) {
        return Response::Error(PolicyError::Denied(why).into());
    }
    if !matches!(site.policies.source(), PolicySource::Dir(_)) {
        let e = PolicyError::NoDirectory {
            peer: site.peer(),
            policies: site.policies.source().clone(),
        };
        return Response::Error(e.into());
    }
    match site.policies.reload() {
        Ok((l, _)) => Response::Policy {
            version: l.version,
            digest: l.digest,
            bundle: None,
        },
        Err(e) => Response::Error(e.into()),
    }
}

/// The super-peer a daemon takes what its domain hands down from (policies, revocation
/// lists): the one its policies are fetched from (`--policy-from`), or else `superpeer`, the
/// one it follows; none when that is the daemon itself.
///
/// # Errors
/// A `--policy-from` address that names no peer.
pub(crate) fn upstream(
    site: &crate::site::Site,
    superpeer: Option<(libp2p::PeerId, Vec<libp2p::Multiaddr>)>,
) -> Result<Option<(libp2p::PeerId, Vec<libp2p::Multiaddr>)>, crate::net::AddrError> {
    let source = match site.policies.source() {
        PolicySource::Fetch(Some(addr)) => {
            let (p, a) = crate::net::split_peer(addr)?;
            Some((p, vec![a]))
        }
        _ => superpeer,
    };
    Ok(source.filter(|(p, _)| *p != site.peer()))
}

/// Fetches the policies from the source super-peer now (the one configured, or else
/// `superpeer`, the one this node follows), if they differ from the ones held. Returns whether
/// a new version was taken.
///
/// # Errors
/// The super-peer cannot be asked, or what it sends does not load.
pub(crate) async fn fetch_now(
    site: &crate::site::Site,
    superpeer: Option<(libp2p::PeerId, Vec<libp2p::Multiaddr>)>,
) -> Result<bool, PolicyError> {
    if !matches!(site.policies.source(), PolicySource::Fetch(_)) {
        return Ok(false);
    }
    let Some((peer, addrs)) = upstream(site, superpeer).map_err(PolicyError::Source)? else {
        return Ok(false);
    };
    let have = Some(site.policies.current().digest);
    match site
        .net
        .call(peer, &addrs, Request::Peer(PeerRequest::Policy { have }))
        .await
    {
        Ok(Response::Policy {
            version,
            digest,
            bundle: Some(bundle),
        }) => site.policies.adopt(version, &digest, bundle),
        Ok(Response::Policy { .. }) => Ok(false),
        Ok(_) => Err(PolicyError::Answer(peer)),
        Err(failure) => Err(PolicyError::Fetch { peer, failure }),
    }
}

/// Keeps the policies current: a holder re-reads its directory, a fetcher asks its source (or
/// the super-peer that `superpeer` gives). Runs until the task is aborted.
pub(crate) async fn sync(
    site: std::sync::Arc<crate::site::Site>,
    superpeer: impl Fn() -> Option<(libp2p::PeerId, Vec<libp2p::Multiaddr>)>,
) {
    if *site.policies.source() == PolicySource::Default {
        return;
    }
    let every = (site.heartbeat * 2).max(std::time::Duration::from_millis(500));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match site.policies.source() {
            PolicySource::Dir(_) => {
                let _ = site.policies.reload();
            }
            _ => {
                if let Err(e) = fetch_now(&site, superpeer()).await {
                    tracing::debug!(error = %e, "policies not fetched");
                }
            }
        }
    }
}
