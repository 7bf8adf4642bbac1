//! Guests as a storage back-end plus a domain (SmartDomains), and the three ways a job uses
//! them (GridWay's VM modes).
//!
//! [`Provisioner::provision`] deploys a guest's storage from the image repository and creates
//! its domain; [`Provisioner::teardown`] destroys the domain and always releases the storage,
//! also after a failure half-way through create. [`Environments`] hands guests to jobs:
//! persistent (one guest reused across jobs), save/restore (checkpointed between jobs) or
//! stop/start (a fresh guest per job).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::driver::{Driver, DriverError, GuestInfo};
use crate::guest::{Disk, GuestSpec, Mode};
use crate::image::{ImageError, Repository};
use crate::storage::{Storage, StorageError, StorageSpec};

/// What a guest should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRequest {
    /// Its name.
    pub name: String,
    /// Its storage: image, disk and swap sizes.
    pub storage: StorageSpec,
    /// The virtualization mode (Xen).
    #[serde(default = "pv")]
    pub mode: Mode,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// A kernel command line that replaces the image's.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// CPU weight.
    #[serde(default)]
    pub weight: Option<u32>,
    /// CPU cap, percent of one CPU.
    #[serde(default)]
    pub cap: Option<u32>,
    /// Network interfaces (Xen; the host driver's guests share the host's network).
    #[serde(default)]
    pub nics: Vec<crate::guest::Nic>,
}

fn pv() -> Mode {
    Mode::Pv
}

/// Provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The driver failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The storage could not be made or released.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The image cannot run on this driver.
    #[error("image {image} does not list the '{driver}' driver (it lists {listed:?})")]
    WrongDriver {
        /// The image.
        image: String,
        /// This node's driver.
        driver: String,
        /// The drivers the image lists.
        listed: Vec<String>,
    },
}

impl From<ImageError> for ProvisionError {
    fn from(e: ImageError) -> ProvisionError {
        ProvisionError::Storage(StorageError::Image(e))
    }
}

/// Makes and removes whole guests.
pub struct Provisioner {
    driver: Arc<dyn Driver>,
    repo: Repository,
    storage: Storage,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("driver", &self.driver.kind())
            .field("repo", &self.repo)
            .field("storage", &self.storage)
            .finish()
    }
}

impl Provisioner {
    /// Guests on `driver` from images in `repo`, with storage in `storage`.
    pub fn new(driver: Arc<dyn Driver>, repo: Repository, storage: Storage) -> Provisioner {
        Provisioner {
            driver,
            repo,
            storage,
        }
    }

    /// The driver.
    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Deploys the guest's storage and creates its domain. On error nothing is left.
    ///
    /// # Errors
    /// The image is unknown, corrupt or not for this driver; storage or the driver failed.
    pub fn provision(&self, req: &GuestRequest) -> Result<GuestInfo, ProvisionError> {
        let image = self.repo.get(&req.storage.image)?;
        let kind = self.driver.kind();
        if !image.metadata.drivers.iter().any(|d| d == kind) {
            return Err(ProvisionError::WrongDriver {
                image: image.id.to_string(),
                driver: kind.into(),
                listed: image.metadata.drivers.clone(),
            });
        }
        // Xen serves disks as block devices: it wants raw files.
        let vol = self
            .storage
            .deploy(&self.repo, &req.name, &req.storage, kind == "xen")?;
        let mut disks = vec![Disk {
            target: vol.disk.clone(),
            vdev: "xvda".into(),
            format: vol.format.clone(),
            read_only: false,
        }];
        if let Some(swap) = &vol.swap {
            disks.push(Disk {
                target: swap.clone(),
                vdev: "xvdb".into(),
                format: "raw".into(),
                read_only: false,
            });
        }
        let spec = GuestSpec {
            name: req.name.clone(),
            mode: req.mode,
            kernel: vol.kernel.clone(),
            ramdisk: vol.ramdisk.clone(),
            cmdline: req.cmdline.clone().or(vol.cmdline.clone()),
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disks,
            nics: req.nics.clone(),
            weight: req.weight,
            cap: req.cap,
        };
        match self.driver.create(&spec) {
            Ok(info) => Ok(info),
            Err(e) => {
                if let Err(se) = self.storage.release(&req.name) {
                    tracing::warn!(guest = %req.name, "storage left after a failed create: {se}");
                }
                Err(e.into())
            }
        }
    }

    /// Destroys the guest's domain (if it is there) and releases its storage (always).
    ///
    /// # Errors
    /// The driver or the storage failed; the storage is released even when the driver failed.
    pub fn teardown(&self, name: &str) -> Result<(), ProvisionError> {
        let domain = match self.driver.destroy(name) {
            Ok(()) | Err(DriverError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        };
        let storage = self.storage.release(name);
        domain?;
        storage?;
        Ok(())
    }
}

/// How guests are used across jobs (GridWay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmMode {
    /// One guest kept running and reused by job after job.
    Persistent,
    /// The guest is saved to a checkpoint after a job and restored for the next.
    SaveRestore,
    /// A fresh guest per job, torn down after it.
    StopStart,
}

#[derive(Debug)]
enum Held {
    /// Running; `busy` while a job has it.
    Running { busy: bool },
    /// Saved to this checkpoint; its storage is kept.
    Saved(PathBuf),
}

/// A guest a job holds, from [`Environments::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The guest's name.
    pub name: String,
    /// The mode it was acquired in.
    pub mode: VmMode,
    /// Whether this acquire made or restored it (false: a persistent guest was reused).
    pub fresh: bool,
}

/// Guests handed to jobs in one of the three modes.
#[derive(Debug)]
pub struct Environments {
    prov: Arc<Provisioner>,
    checkpoints: PathBuf,
    held: Mutex<BTreeMap<String, Held>>,
}

impl Environments {
    /// Environments over `prov`, with checkpoints in `checkpoints`.
    pub fn new(prov: Arc<Provisioner>, checkpoints: impl Into<PathBuf>) -> Environments {
        Environments {
            prov,
            checkpoints: checkpoints.into(),
            held: Mutex::new(BTreeMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The driver the guests are made with.
    pub fn driver(&self) -> &Arc<dyn Driver> {
        self.prov.driver()
    }

    /// The checkpoint file of guest `name`.
    pub fn checkpoint(&self, name: &str) -> PathBuf {
        self.checkpoints.join(format!("{name}.chk"))
    }

    /// Gives a job the guest `req` describes: reuses a persistent one, restores a saved one, or
    /// provisions it.
    ///
    /// # Errors
    /// The guest is held by another job, or provisioning or restore failed.
    pub fn acquire(&self, req: &GuestRequest, mode: VmMode) -> Result<Lease, ProvisionError> {
        let prior = self.held().remove(&req.name);
        let lease = |fresh| Lease {
            name: req.name.clone(),
            mode,
            fresh,
        };
        match prior {
            Some(Held::Running { busy: true }) => {
                self.held()
                    .insert(req.name.clone(), Held::Running { busy: true });
                Err(DriverError::Exists(req.name.clone()).into())
            }
            Some(Held::Running { busy: false }) if self.alive(&req.name) => {
                self.held()
                    .insert(req.name.clone(), Held::Running { busy: true });
                Ok(lease(false))
            }
            Some(Held::Saved(ck)) => {
                match self.prov.driver().restore(&req.name, &ck) {
                    Ok(_) => {
                        let _ = std::fs::remove_file(&ck);
                        self.held()
                            .insert(req.name.clone(), Held::Running { busy: true });
                        Ok(lease(true))
                    }
                    Err(e) => {
                        // The checkpoint stays for another try; the guest is not held.
                        self.held().insert(req.name.clone(), Held::Saved(ck));
                        Err(e.into())
                    }
                }
            }
            _ => {
                // Whatever is left of an earlier guest of that name goes first.
                let _ = self.prov.teardown(&req.name);
                self.prov.provision(req)?;
                self.held()
                    .insert(req.name.clone(), Held::Running { busy: true });
                Ok(lease(true))
            }
        }
    }

    fn alive(&self, name: &str) -> bool {
        self.prov
            .driver()
            .inspect(name)
            .is_ok_and(|g| !g.state.is_dead())
    }

    /// Ends a job's hold: keeps the guest (persistent), saves it (save/restore) or tears it
    /// down (stop/start).
    ///
    /// # Errors
    /// Save or teardown failed; after a failed save the guest is torn down.
    pub fn release(&self, lease: &Lease) -> Result<(), ProvisionError> {
        let name = &lease.name;
        match lease.mode {
            VmMode::Persistent => {
                self.held()
                    .insert(name.clone(), Held::Running { busy: false });
                Ok(())
            }
            VmMode::SaveRestore => {
                let ck = self.checkpoint(name);
                let saved = std::fs::create_dir_all(&self.checkpoints)
                    .map_err(DriverError::io(&self.checkpoints))
                    .and_then(|()| self.prov.driver().save(name, &ck));
                match saved {
                    Ok(()) => {
                        self.held().insert(name.clone(), Held::Saved(ck));
                        Ok(())
                    }
                    Err(e) => {
                        self.held().remove(name);
                        let _ = self.prov.teardown(name);
                        Err(e.into())
                    }
                }
            }
            VmMode::StopStart => {
                self.held().remove(name);
                self.prov.teardown(name)
            }
        }
    }

    /// Tears down every guest held here, running or saved, and removes their checkpoints.
    pub fn shutdown(&self) {
        let all: Vec<(String, Held)> = std::mem::take(&mut *self.held()).into_iter().collect();
        for (name, h) in all {
            if let Held::Saved(ck) = h {
                let _ = std::fs::remove_file(ck);
            }
            if let Err(e) = self.prov.teardown(&name) {
                tracing::warn!(guest = %name, "teardown at shutdown: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
