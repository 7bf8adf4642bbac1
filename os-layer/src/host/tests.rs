//! The host driver on this machine's real control groups (the tests run as root).

use std::process::{Child, Command};

use super::*;

fn spec(name: &str) -> GuestSpec {
    GuestSpec::example(name)
}

/// A driver under a parent group of its own, removed at the end.
struct Fixture {
    driver: HostDriver,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let group = format!("mvm-test-{}-{tag}", std::process::id());
        Fixture {
            driver: HostDriver::new(&group),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for g in self.driver.list().unwrap_or_default() {
            let _ = self.driver.destroy(&g.name);
        }
        let parents: Vec<PathBuf> = self
            .driver
            .dirs("x")
            .iter()
            .filter_map(|d| d.parent().map(Path::to_owned))
            .collect();
        for p in parents {
            let _ = fs::remove_dir(p);
        }
    }
}

/// A process that appends a line to `file` every 20 ms.
fn ticker(file: &Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while :; do echo x >> '{}'; sleep 0.02; done",
            file.display()
        ))
        .spawn()
        .unwrap()
}

fn size(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_host_guest_is_a_control_group_with_limits_pause_and_teardown() {
    let f = Fixture::new("a");
    let d = &f.driver;
    assert!(
        !matches!(d.cgroups(), Cgroups::None),
        "this machine (root) has writable cgroups; the host driver must use them"
    );
    let mut s = spec("g1");
    s.weight = Some(512);
    s.memory_mib = 96;
    let info = d.create(&s).unwrap();
    assert_eq!(info.name, "g1");
    assert!(matches!(d.create(&s), Err(DriverError::Exists(_))));
    assert_eq!(
        d.sched("g1").unwrap(),
        Sched {
            weight: 512,
            cap: 0
        }
    );
    // The limits are in the kernel's files, not only in the driver.
    match d.cgroups() {
        Cgroups::V1 { cpu, memory, .. } => {
            assert_eq!(read(&cpu.join("g1/cpu.shares")).unwrap(), "2048");
            if let Some(m) = memory {
                assert_eq!(
                    read(&m.join("g1/memory.limit_in_bytes")).unwrap(),
                    (96u64 << 20).to_string()
                );
            }
        }
        Cgroups::V2 { root } => {
            assert_eq!(read(&root.join("g1/cpu.weight")).unwrap(), "200");
            assert_eq!(
                read(&root.join("g1/memory.max")).unwrap(),
                (96u64 << 20).to_string()
            );
        }
        Cgroups::None => unreachable!(),
    }
    d.set_sched(
        "g1",
        Sched {
            weight: 768,
            cap: 50,
        },
    )
    .unwrap();
    assert_eq!(
        d.sched("g1").unwrap(),
        Sched {
            weight: 768,
            cap: 50
        }
    );
    d.set_memory("g1", 128).unwrap();
    assert_eq!(d.inspect("g1").unwrap().memory_mib, 128);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ticks");
    let mut child = ticker(&out);
    d.attach("g1", child.id()).unwrap();
    // The ticker (a shell) is in the group, with at most the `sleep` it runs now: a process
    // forked in a group is in the group.
    let ps = d.processes("g1").unwrap();
    assert!(ps.contains(&child.id()), "{ps:?}");
    for p in ps.iter().filter(|&&p| p != child.id()) {
        // Gone meanwhile, or the shell's child.
        if let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) {
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().nth(1));
            assert_eq!(ppid, Some(child.id().to_string().as_str()), "{p}: {stat}");
        }
    }
    assert_eq!(d.inspect("g1").unwrap().state, State::Running);

    d.pause("g1").unwrap();
    // Freezing is asynchronous (cgroup v1's freezer says FREEZING until every task is frozen;
    // a loaded machine takes a while).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.inspect("g1").unwrap().state != State::Paused {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never froze"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let a = size(&out);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(size(&out), a, "a paused guest's process does not run");
    d.unpause("g1").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(size(&out) > a, "an unpaused guest's process runs again");

    assert_eq!(d.list().unwrap().len(), 1);
    // Destroy kills what runs in the guest (also when paused) and removes the group.
    d.pause("g1").unwrap();
    // The node that starts processes in a guest reaps them; so does this test.
    let reaper = std::thread::spawn(move || child.wait().unwrap());
    d.destroy("g1").unwrap();
    let status = reaper.join().unwrap();
    assert!(!status.success());
    assert!(matches!(d.inspect("g1"), Err(DriverError::NotFound(_))));
    assert!(d.dirs("g1").iter().all(|p| !p.exists()));
    assert!(d.list().unwrap().is_empty());
    assert!(matches!(d.destroy("g1"), Err(DriverError::NotFound(_))));
}

#[test]
fn a_guest_is_saved_once_its_processes_end_and_bad_requests_are_refused() {
    let f = Fixture::new("b");
    let d = &f.driver;
    let mut s = spec("g2");
    s.weight = Some(512);
    s.cap = Some(40);
    d.create(&s).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("g2.chk");
    // Running processes have no image to save: refused, and the guest stays.
    let mut child = ticker(&dir.path().join("ticks"));
    d.attach("g2", child.id()).unwrap();
    assert!(matches!(
        d.save("g2", &ck),
        Err(DriverError::Unsupported { .. })
    ));
    assert!(d.inspect("g2").is_ok() && !ck.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    while !d.processes("g2").unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Idle: saved as what it is, and gone; restored as it was, under its own name only.
    d.save("g2", &ck).unwrap();
    assert!(matches!(d.inspect("g2"), Err(DriverError::NotFound(_))));
    assert!(d.dirs("g2").iter().all(|p| !p.exists()));
    assert!(matches!(
        d.restore("other", &ck),
        Err(DriverError::Parse { .. })
    ));
    let back = d.restore("g2", &ck).unwrap();
    assert_eq!(
        (back.vcpus, back.memory_mib),
        (s.vcpus, u64::from(s.memory_mib))
    );
    assert_eq!(
        d.sched("g2").unwrap(),
        Sched {
            weight: 512,
            cap: 40
        }
    );
    std::fs::write(&ck, b"{not json").unwrap();
    d.destroy("g2").unwrap();
    assert!(matches!(
        d.restore("g2", &ck),
        Err(DriverError::Parse { .. })
    ));
    assert!(matches!(d.inspect("g2"), Err(DriverError::NotFound(_))));
    d.create(&spec("g2")).unwrap();
    assert!(matches!(
        d.migrate("g2", "elsewhere"),
        Err(DriverError::Unsupported { .. })
    ));
    assert!(matches!(
        d.set_sched("g2", Sched { weight: 0, cap: 0 }),
        Err(DriverError::Spec(_))
    ));
    let mut bad = spec("../escape");
    assert!(matches!(d.create(&bad), Err(DriverError::Spec(_))));
    bad.name = "ok".into();
    bad.memory_mib = 1;
    assert!(matches!(d.create(&bad), Err(DriverError::Spec(_))));
    assert!(matches!(d.pause("nope"), Err(DriverError::NotFound(_))));
    // A guest with no processes shuts down at once.
    d.shutdown("g2", Duration::from_secs(1)).unwrap();
    assert!(d.list().unwrap().is_empty());
}

#[test]
fn a_process_started_into_a_guest_is_in_it_from_its_first_instruction_and_its_memory_limit_binds() {
    let f = Fixture::new("c");
    let d = &f.driver;
    let mut s = spec("g3");
    s.memory_mib = 16;
    d.create(&s).unwrap();
    let files = d
        .join_files("g3")
        .unwrap()
        .expect("host guests are joined by processes");
    assert!(!files.is_empty());
    // The process prints the groups it is in before it does anything else.
    let mut cmd = Command::new("cat");
    cmd.arg("/proc/self/cgroup");
    join_on_exec(&mut cmd, &files).unwrap();
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let groups = String::from_utf8_lossy(&out.stdout);
    let at = format!("/mvm-test-{}-c/g3", std::process::id());
    let lines = groups.lines().filter(|l| l.ends_with(&at)).count();
    assert_eq!(
        lines,
        files.len(),
        "one line per hierarchy joined:\n{groups}"
    );
    // Over the limit: the kernel kills it, and the guest counts the kill.
    let before = d.oom_kills("g3").expect("a memory group");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("head -c 100000000 /dev/zero | tail > /dev/null");
    join_on_exec(&mut cmd, &files).unwrap();
    let status = cmd.status().unwrap();
    assert!(!status.success());
    assert!(d.oom_kills("g3").expect("a memory group") > before);
    // A group that cannot be joined fails the spawn, not the child's first instruction.
    let mut cmd = Command::new("true");
    assert!(join_on_exec(&mut cmd, &[PathBuf::from("/nonexistent/cgroup.procs")]).is_err());
    d.destroy("g3").unwrap();
}

#[test]
fn a_guest_counts_the_cpu_time_its_processes_use() {
    let f = Fixture::new("t");
    let d = &f.driver;
    d.create(&spec("g4")).unwrap();
    assert_eq!(d.inspect("g4").unwrap().cpu_seconds, 0.0);
    let files = d.join_files("g4").unwrap().expect("joined by processes");
    // Spins for about 0.3 s of CPU time, then ends.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("end=$(($(date +%s%N) + 300000000)); while [ $(date +%s%N) -lt $end ]; do :; done");
    join_on_exec(&mut cmd, &files).unwrap();
    assert!(cmd.status().unwrap().success());
    let used = d.inspect("g4").unwrap().cpu_seconds;
    assert!((0.1..5.0).contains(&used), "{used} s counted");
    d.destroy("g4").unwrap();
}

#[test]
fn without_cgroups_guests_are_the_host_itself() {
    let d = HostDriver::with(Cgroups::None);
    let mut s = spec("h");
    s.weight = Some(300);
    d.create(&s).unwrap();
    assert_eq!(d.inspect("h").unwrap().state, State::Running);
    assert_eq!(d.sched("h").unwrap().weight, 300);
    assert!(matches!(d.pause("h"), Err(DriverError::Unsupported { .. })));
    d.destroy("h").unwrap();
    assert!(d.list().unwrap().is_empty());
}
