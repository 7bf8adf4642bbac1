//! A node's OS layer: the execution environment a woken node ensures before its vertices run.
//!
//! When a job's profile names an image (`requirements.image`), every node placed in the job
//! acquires a guest of that image from its own repository through its driver (the host's
//! control groups by default, Xen where configured), in the job's VM mode, before anything is
//! instantiated; the guest is released (kept, saved, or torn down) when the job's part ends,
//! however it ends. A job that names no image, or the image `host`, runs on the host as it is.

use std::path::PathBuf;
use std::sync::Arc;

use mvm_os::host::HostDriver;
use mvm_os::image::{ImageError, ImageId, Repository};
use mvm_os::liveness::{Died, Monitor};
use mvm_os::provision::{Environments, GuestRequest, Lease, ProvisionError, Provisioner, VmMode};
use mvm_os::storage::{Storage, StorageError, StorageSpec};
use mvm_os::xen::{XenConfig, XenDriver};
use mvm_os::{Driver, DriverError};

use crate::proto::{EnvSpec, JobId};
use crate::worker::WorkerCommand;

/// Why a node's OS layer cannot be opened, or a job's environment acquired.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The guest driver cannot be set up.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The image repository cannot be opened, or has no such image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The guests' storage cannot be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An image named neither `name:version` nor `name:version@sha256:HEX`.
    #[error("'{0}' is not an image id")]
    NotAnId(String),
    /// No guest could be provisioned.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// Every guest kept for this environment serves another job.
    #[error("every guest slot of this environment is in use")]
    InUse,
}

/// Which guest driver a node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverKind {
    /// Control groups of this host, under a parent group of this name.
    Host {
        /// The parent group, e.g. `mvm`.
        cgroup: String,
    },
    /// Xen guests through `xl` (the node runs in dom0).
    Xen,
}

/// A node's OS layer configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsConfig {
    /// The driver.
    pub driver: DriverKind,
    /// Its directory: `images/` (the repository), `guests/` (storage), `checkpoints/`, `xen/`.
    pub dir: PathBuf,
    /// How a part whose guest is a group of this host's processes (the host driver) is run in
    /// a process of its own inside the guest (`mvm worker`); none: in the node's own process,
    /// where the guest's limits do not bind it.
    pub worker: Option<WorkerCommand>,
}

/// The node's environments, built from an [`OsConfig`].
pub(crate) struct NodeOs {
    envs: Arc<Environments>,
    repo: Repository,
    worker: Option<WorkerCommand>,
    /// Watches every guest a job holds (SmartDomains' liveness monitor).
    monitor: Arc<Monitor>,
    /// The guests that died behind the node's back, until the node takes them.
    deaths: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Died>>>,
}

/// How often the node's liveness monitor looks at the guests jobs hold.
const LIVENESS: std::time::Duration = std::time::Duration::from_millis(500);

impl NodeOs {
    /// Opens the repository and storage and builds the driver.
    pub(crate) fn open(c: &OsConfig) -> Result<NodeOs, EnvError> {
        let driver: Arc<dyn Driver> = match &c.driver {
            DriverKind::Host { cgroup } => Arc::new(HostDriver::new(cgroup)),
            DriverKind::Xen => Arc::new(XenDriver::new(XenConfig::new(c.dir.join("xen")))?),
        };
        let repo = Repository::open(c.dir.join("images"))?;
        let storage = Storage::new(c.dir.join("guests"))?;
        let prov = Arc::new(Provisioner::new(driver, repo.clone(), storage));
        let (monitor, deaths) = Monitor::start(prov.clone(), LIVENESS);
        Ok(NodeOs {
            envs: Arc::new(Environments::new(prov, c.dir.join("checkpoints"))),
            repo,
            worker: c.worker.clone(),
            monitor: Arc::new(monitor),
            deaths: parking_lot::Mutex::new(Some(deaths)),
        })
    }

    /// The guests held by jobs that die behind the node's back, each once (to be taken once).
    pub(crate) fn deaths(&self) -> Option<tokio::sync::mpsc::Receiver<Died>> {
        self.deaths.lock().take()
    }

    /// How parts run in workers inside their guests, if they do.
    pub(crate) fn worker(&self) -> Option<&WorkerCommand> {
        self.worker.as_ref()
    }

    /// The image ids this node offers: every image in its repository, as the full id and as
    /// `name:version`.
    pub(crate) fn images(&self) -> Vec<String> {
        let mut out = Vec::new();
        for i in self.repo.list().unwrap_or_default() {
            out.push(i.id.to_string());
            out.push(format!("{}:{}", i.id.name, i.id.version));
        }
        out
    }

    /// Acquires the guest `env` asks for, for job `job`. Blocks: call from `spawn_blocking`.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        job: &JobId,
        env: &EnvSpec,
    ) -> Result<EnvLease, EnvError> {
        let image: ImageId = if env.image.contains("@sha256:") {
            env.image.parse()?
        } else {
            let (name, version) = env
                .image
                .split_once(':')
                .ok_or_else(|| EnvError::NotAnId(env.image.clone()))?;
            self.repo.resolve(name, version)?
        };
        let mode = env.mode;
        let request = |name: String| GuestRequest {
            name,
            storage: StorageSpec {
                image: image.clone(),
                disk_mib: None,
                swap_mib: None,
            },
            mode: mvm_os::guest::Mode::Pv,
            vcpus: env.vcpus.max(1),
            memory_mib: env.memory_mib.max(16),
            cmdline: None,
            weight: env.weight,
            cap: env.cap,
        };
        let lease = match mode {
            // One guest per job.
            VmMode::StopStart => self
                .envs
                .acquire(&request(format!("mvm-{}", short(job.as_str()))), mode)?,
            // Guests kept between jobs are named after what they are, so the next job with the
            // same needs finds them; a second job at once takes the next slot.
            VmMode::Persistent | VmMode::SaveRestore => {
                let key = short(&format!(
                    "{}-{}-{}-{:?}-{:?}-{:?}",
                    image.digest, env.vcpus, env.memory_mib, env.mode, env.weight, env.cap
                ));
                let mut got = Err(EnvError::InUse);
                for slot in 0..16 {
                    match self
                        .envs
                        .acquire(&request(format!("mvm-{key}-{slot}")), mode)
                    {
                        Err(ProvisionError::Driver(DriverError::Exists(_))) => {}
                        other => {
                            got = other.map_err(EnvError::from);
                            break;
                        }
                    }
                }
                got?
            }
        };
        tracing::info!(%job, guest = %lease.name, fresh = lease.fresh, ?mode, "environment ready");
        self.monitor.watch(&lease.name);
        Ok(EnvLease {
            envs: self.envs.clone(),
            monitor: self.monitor.clone(),
            lease: Some(lease),
        })
    }

    /// Tears down every guest held (the node is shutting down).
    pub(crate) fn shutdown(&self) {
        self.envs.shutdown();
    }
}

/// A short, name-safe digest of `s`.
fn short(s: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(s.as_bytes())[..6])
}

/// A job's hold on its guest; released when dropped (kept, saved or torn down by its mode).
pub(crate) struct EnvLease {
    envs: Arc<Environments>,
    monitor: Arc<Monitor>,
    lease: Option<Lease>,
}

impl EnvLease {
    /// The guest, to name it and ask about it while the lease is held elsewhere.
    pub(crate) fn guest(&self) -> GuestRef {
        GuestRef {
            envs: self.envs.clone(),
            name: self
                .lease
                .as_ref()
                .map(|l| l.name.clone())
                .unwrap_or_default(),
        }
    }

    /// Where a process joins the guest, when the guest is a group of this host's processes
    /// (the host driver): the `cgroup.procs` file of each of its control groups.
    pub(crate) fn join_files(&self) -> Option<Vec<PathBuf>> {
        let name = &self.lease.as_ref()?.name;
        match self.envs.driver().join_files(name) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(guest = %name, error = %e, "cannot tell how to join the guest");
                None
            }
        }
    }
}

/// A guest held by a lease, by name.
#[derive(Clone)]
pub(crate) struct GuestRef {
    envs: Arc<Environments>,
    name: String,
}

impl GuestRef {
    /// Its name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Its count of processes killed for its memory limit, where the driver tells.
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        self.envs.driver().oom_kills(&self.name)
    }
}

impl Drop for EnvLease {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        // Its end (kept, saved or torn down) is not a death.
        self.monitor.unwatch(&lease.name);
        let envs = self.envs.clone();
        let release = move || {
            if let Err(e) = envs.release(&lease) {
                tracing::warn!(guest = %lease.name, "releasing the environment: {e}");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(release);
            }
            Err(_) => release(),
        }
    }
}

/// Serves this node's images to peers that ask (`/mvm/image/1`): the bytes go as they are
/// stored; the receiver keeps them only if they hash to the id it asked for.
pub(crate) async fn serve_images(site: Arc<crate::site::Site>, os: Arc<NodeOs>) {
    use futures::{AsyncWriteExt, StreamExt};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    let mut incoming = match site.net.accept(crate::proto::IMAGE_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "image requests are not accepted");
            return;
        }
    };
    // Transfers under way: ended with this task.
    let mut sending = tokio::task::JoinSet::new();
    while let Some((peer, who, mut stream)) = incoming.next().await {
        while sending.try_join_next().is_some() {}
        let os = os.clone();
        let site = site.clone();
        sending.spawn(async move {
            let req = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                crate::proto::read_frame::<crate::proto::ImageRequest, _>(
                    &mut stream,
                    crate::proto::MAX_HEADER,
                ),
            )
            .await;
            let Ok(Ok(req)) = req else {
                tracing::warn!(%peer, "no image request");
                return;
            };
            let allowed = site
                .policies
                .current()
                .engine
                .decide(&mvm_component::policy::Question {
                    actor: who.clone(),
                    action: "use-image".into(),
                    resource: mvm_component::policy::Resource::Image(
                        mvm_component::policy::Image {
                            id: req.id.to_string(),
                            domain: site.domain.clone(),
                        },
                    ),
                })
                .into_result();
            let refused = allowed.is_err();
            let found = allowed.and_then(|()| os.repo.get(&req.id).map_err(|e| e.to_string()));
            let header = crate::proto::ImageHeader {
                image: found
                    .as_ref()
                    .map(|i| (i.metadata.clone(), i.size))
                    .map_err(Clone::clone),
                refused,
            };
            if crate::proto::write_frame(&mut stream, &header, crate::proto::MAX_HEADER)
                .await
                .is_err()
            {
                return;
            }
            if let Ok(image) = found {
                let sent = async {
                    let f = tokio::fs::File::open(&image.path).await?;
                    futures::io::copy(&mut f.compat(), &mut stream).await?;
                    stream.close().await
                }
                .await;
                if let Err(e) = sent {
                    tracing::warn!(%peer, image = %req.id, "sending the image: {e}");
                } else {
                    tracing::info!(%peer, image = %req.id, bytes = image.size, "image sent");
                }
            }
        });
    }
}
