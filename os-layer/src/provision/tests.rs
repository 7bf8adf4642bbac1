//! Whole guests, the VM modes and the liveness monitor on the host driver over this machine's
//! real control groups. The same paths on Xen, with save/restore, run in `tests/xen.rs`.

use std::fs;
use std::time::Duration;

use super::*;
use crate::host::HostDriver;
use crate::image::Metadata;
use crate::liveness::Monitor;

struct Lab {
    _dir: tempfile::TempDir,
    prov: Arc<Provisioner>,
    host: Arc<HostDriver>,
    req: GuestRequest,
    group: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for g in self.host.list().unwrap_or_default() {
            let _ = self.host.destroy(&g.name);
        }
        for c in ["cpu", "cpuacct", "memory", "freezer", "cpuset", ""] {
            let _ = fs::remove_dir(format!("/sys/fs/cgroup/{c}/{}", self.group));
        }
    }
}

fn lab(tag: &str, drivers: &[&str]) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::open(dir.path().join("repo")).unwrap();
    let img = dir.path().join("img");
    fs::write(&img, vec![5u8; 1 << 20]).unwrap();
    let id = repo
        .import("env", "1", &img, Metadata::example("raw", drivers))
        .unwrap();
    let group = format!("mvm-test-{}-{tag}", std::process::id());
    let host = Arc::new(HostDriver::new(&group));
    let storage = Storage::new(dir.path().join("guests")).unwrap();
    let prov = Arc::new(Provisioner::new(host.clone(), repo, storage));
    let req = GuestRequest {
        name: "env1".into(),
        storage: StorageSpec {
            image: id,
            disk_mib: Some(2),
            swap_mib: Some(1),
        },
        mode: Mode::Pv,
        vcpus: 1,
        memory_mib: 64,
        cmdline: None,
        weight: Some(512),
        cap: None,
        nics: Vec::new(),
    };
    Lab {
        _dir: dir,
        prov,
        host,
        req,
        group,
    }
}

#[test]
fn a_guest_is_storage_plus_domain_and_teardown_removes_both() {
    let l = lab("p", &["host"]);
    let info = l.prov.provision(&l.req).unwrap();
    assert_eq!(info.name, "env1");
    let dir = l.prov.storage().dir("env1");
    assert_eq!(
        fs::metadata(dir.join("disk.raw")).unwrap().len(),
        2 << 20,
        "the disk is the image grown to disk_mib"
    );
    assert!(dir.join("swap").exists());
    assert_eq!(l.host.sched("env1").unwrap().weight, 512);
    // A second guest of that name is refused and the first keeps its storage.
    assert!(l.prov.provision(&l.req).is_err());
    assert!(dir.join("disk.raw").exists());
    l.prov.teardown("env1").unwrap();
    assert!(!dir.exists());
    assert!(l.host.list().unwrap().is_empty());
    // Teardown of nothing is fine.
    l.prov.teardown("env1").unwrap();
}

#[test]
fn a_failed_create_leaves_no_storage_and_the_wrong_driver_is_refused() {
    let l = lab("f", &["host"]);
    let mut bad = l.req.clone();
    bad.memory_mib = 1; // refused by the driver, after storage was made
    assert!(matches!(
        l.prov.provision(&bad),
        Err(ProvisionError::Driver(DriverError::Spec(_)))
    ));
    assert!(!l.prov.storage().exists("env1"));

    let x = lab("x", &["xen"]);
    match x.prov.provision(&x.req) {
        Err(ProvisionError::WrongDriver { driver, .. }) => assert_eq!(driver, "host"),
        other => panic!("{other:?}"),
    }
    assert!(!x.prov.storage().exists("env1"));
}

#[test]
fn persistent_guests_are_reused_and_stop_start_guests_are_fresh() {
    let l = lab("m", &["host"]);
    let env = Environments::new(l.prov.clone(), l._dir.path().join("ck"));
    let a = env.acquire(&l.req, VmMode::Persistent).unwrap();
    assert!(a.fresh);
    // Held by a job: nobody else gets it.
    assert!(env.acquire(&l.req, VmMode::Persistent).is_err());
    env.release(&a).unwrap();
    assert_eq!(l.host.list().unwrap().len(), 1, "kept running between jobs");
    let b = env.acquire(&l.req, VmMode::Persistent).unwrap();
    assert!(!b.fresh, "the same guest is reused");
    env.release(&b).unwrap();
    env.shutdown();
    assert!(l.host.list().unwrap().is_empty());

    let c = env.acquire(&l.req, VmMode::StopStart).unwrap();
    assert!(c.fresh);
    env.release(&c).unwrap();
    assert!(l.host.list().unwrap().is_empty());
    assert!(!l.prov.storage().exists("env1"));

    // Save/restore: the group goes after the job, its storage stays, and the next job gets
    // the guest back with that storage.
    let d = env.acquire(&l.req, VmMode::SaveRestore).unwrap();
    assert!(d.fresh);
    let marker = l.prov.storage().dir("env1").join("kept");
    std::fs::write(&marker, b"state").unwrap();
    env.release(&d).unwrap();
    assert!(l.host.list().unwrap().is_empty(), "no group while saved");
    assert!(l.prov.storage().exists("env1"));
    let e = env.acquire(&l.req, VmMode::SaveRestore).unwrap();
    assert!(e.fresh, "restored");
    assert_eq!(l.host.list().unwrap().len(), 1);
    assert_eq!(std::fs::read(&marker).unwrap(), b"state");
    env.release(&e).unwrap();
    env.shutdown();
    assert!(l.host.list().unwrap().is_empty());
    assert!(!l.prov.storage().exists("env1"));
}

#[test]
fn the_monitor_cleans_up_a_guest_destroyed_behind_its_back() {
    let l = lab("l", &["host"]);
    l.prov.provision(&l.req).unwrap();
    let (mon, mut deaths) = Monitor::start(l.prov.clone(), Duration::from_millis(50));
    mon.watch("env1");
    // Someone else removes the guest's domain; its storage is still there.
    l.host.destroy("env1").unwrap();
    assert!(l.prov.storage().exists("env1"));
    let died = deaths.blocking_recv().unwrap();
    assert_eq!(died.name, "env1");
    assert_eq!(died.last, None);
    assert_eq!(died.cleanup, Ok(()));
    assert!(!l.prov.storage().exists("env1"), "the monitor released it");
    assert!(mon.watched().is_empty());
}
