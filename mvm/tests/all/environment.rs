//! The OS layer on a woken node: a job whose profile names an image runs after its node made a
//! guest of that image (the host driver: a control group, with the image's disk as storage),
//! kept between jobs, fresh per job, or torn down with the node, as the profile's VM mode says.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::groups::Groups;
use crate::netns::{wait_for, write_lab};
use crate::run::{build_jobs, json, root};

/// Micro-credits to a credit.
const MICRO: u64 = 1_000_000;

/// The guests (storage directories) node `os` holds now.
fn guests(os: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(os.join("guests"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The host driver's groups under `/sys/fs/cgroup/cpu/GROUP` (v1) or `/sys/fs/cgroup/GROUP`.
fn cgroups(group: &str) -> Vec<String> {
    let base = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup"]
        .iter()
        .map(|b| PathBuf::from(b).join(group))
        .find(|p| p.is_dir());
    let mut v: Vec<String> = base
        .and_then(|b| std::fs::read_dir(b).ok())
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The host driver's parent group `0` of a test, removed (in every hierarchy) when dropped,
/// also when the test fails: declared before the daemons, it is dropped after them.
struct ParentGroup(String);

impl Drop for ParentGroup {
    fn drop(&mut self) {
        for base in [
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/freezer",
            "/sys/fs/cgroup/cpuset",
            "/sys/fs/cgroup",
        ] {
            let parent = Path::new(base).join(&self.0);
            // Guests a killed node left behind (their processes gone), then the parent.
            for d in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if d.path().is_dir() {
                    let _ = std::fs::remove_dir(d.path());
                }
            }
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Imports `disk` as image `name` (for the host driver) into the repository in `os`; its id.
fn import(g: &Groups, os: &Path, name: &str, disk: &Path) -> String {
    let out = g.run(&[
        "image",
        "import",
        "--os-dir",
        os.to_str().expect("utf-8"),
        name,
        disk.to_str().expect("utf-8"),
        "--drivers",
        "host",
    ]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A super-peer `sp` and a node `n1` whose repository in `os` holds image `env:1` (a 1 MiB
/// disk, for the host driver) and whose guests are groups under `group`: the super-peer's
/// address and the image's id.
fn with_image_node(g: &mut Groups, os: &Path, group: &str) -> (String, String) {
    let disk = g.dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let id = import(g, os, "env:1", &disk);
    let sp = g.daemon("sp", &["superpeer"]);
    let os_arg = os.to_str().expect("utf-8").to_owned();
    g.daemon(
        "n1",
        &[
            "node",
            "--bootstrap",
            &sp,
            "--os-dir",
            &os_arg,
            "--cgroup",
            group,
        ],
    );
    (sp, id)
}

fn profile(dir: &Path, name: &str, requirements: &str) -> String {
    let p = dir.join(format!("{name}.toml"));
    let r = root();
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\ntopology = \"{0}/topologies/pipeline-4.dot\"\n\
             [components]\nsource = \"{0}/jobs/build/pipe_source.wasm\"\n\
             stage = \"{0}/jobs/build/pipe_stage.wasm\"\nsink = \"{0}/jobs/build/pipe_sink.wasm\"\n\
             [parameters]\ncount = 10\nfactor = 2\n[requirements]\n{requirements}\n",
            r.display()
        ),
    )
    .expect("profile");
    p.display().to_string()
}

#[test]
fn a_job_naming_an_image_runs_in_a_guest_its_node_makes_keeps_or_removes_by_vm_mode() {
    build_jobs();
    let group = format!("mvm-envtest-{}", std::process::id());
    let _parent = ParentGroup(group.clone());
    let mut g = Groups::new();
    let os = g.dir.path().join("n1os");
    let disk = g.dir.path().join("disk.raw");
    let (sp, id) = with_image_node(&mut g, &os, &group);
    assert!(id.starts_with("env:1@sha256:"), "{id}");
    g.daemon("n2", &["node", "--bootstrap", &sp]);
    write_lab(g.dir.path(), &sp);
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        (v["nodes"].as_array()?.len() == 2).then_some(())
    });

    // Persistent: only n1 offers the image; its guest stays after the job and serves the next.
    let p = profile(
        g.dir.path(),
        "keep",
        "image = \"env:1\"\nvm_mode = \"persistent\"",
    );
    let v = json(&g.run(&["submit", "--wait", &p, "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["parts"][0]["name"], "n1", "{v}");
    let kept = guests(&os);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(std::fs::metadata(os.join("guests").join(&kept[0]).join("disk.raw")).is_ok());
    assert_eq!(cgroups(&group), kept, "the guest is a control group too");
    let v = json(&g.run(&["submit", "--wait", &p, "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(guests(&os), kept, "the same guest served the second job");

    // An offer names the image by its full id, and its agreement runs the job in it.
    let o = profile(g.dir.path(), "offered", "image = \"env:1\"");
    let text = std::fs::read_to_string(&o).expect("profile");
    std::fs::write(&o, format!("estimate = \"1m\"\n{text}")).expect("profile");
    let offers = json(&g.run(&["offer", &o, "--deadline", "5m", "-o", "json"]));
    assert_eq!(offers[0]["image"], id.as_str(), "{offers}");
    let offer = offers[0]["id"].as_str().expect("id").to_owned();
    let a = json(&g.run(&["accept", "--wait", &offer, "-o", "json"]));
    assert_eq!(a["state"], "met", "{a}");
    let v = json(&g.run(&["status", &offer, "-o", "json"]));
    assert_eq!(v[0]["parts"][0]["name"], "n1", "{v}");

    // Stop/start, by full id: a fresh guest for the job, gone when it ends.
    let s = profile(g.dir.path(), "fresh", &format!("image = \"{id}\""));
    let v = json(&g.run(&["submit", "--wait", &s, "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    wait_for(Duration::from_secs(10), || {
        (guests(&os) == kept).then_some(())
    });
    assert_eq!(cgroups(&group), kept);

    // Save/restore with the host driver: after the job its group goes and its storage stays
    // (with its checkpoint: what the guest was); the next job gets the same guest back.
    let sr = profile(
        g.dir.path(),
        "saved",
        "image = \"env:1\"\nvm_mode = \"save-restore\"",
    );
    let v = json(&g.run(&["submit", "--wait", &sr, "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    let saved = wait_for(Duration::from_secs(10), || {
        let now = guests(&os);
        (now.len() == kept.len() + 1 && cgroups(&group) == kept).then_some(now)
    });
    let guest = saved
        .iter()
        .find(|g| !kept.contains(g))
        .expect("the saved guest")
        .clone();
    assert!(
        os.join("checkpoints")
            .join(format!("{guest}.chk"))
            .is_file()
    );
    let disk_before = std::fs::metadata(os.join("guests").join(&guest).join("disk.raw"))
        .and_then(|m| m.modified())
        .expect("the saved guest's disk");
    let v = json(&g.run(&["submit", "--wait", &sr, "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    wait_for(Duration::from_secs(10), || {
        (guests(&os) == saved && cgroups(&group) == kept).then_some(())
    });
    let disk_after = std::fs::metadata(os.join("guests").join(&guest).join("disk.raw"))
        .and_then(|m| m.modified())
        .expect("the restored guest's disk");
    assert_eq!(disk_before, disk_after, "the same storage, not a new copy");

    // An image nobody offers: refused, naming it.
    let m = profile(g.dir.path(), "missing", "image = \"nope:1\"");
    let out = g.run(&["submit", &m]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope:1"),
        "{out:?}"
    );

    // An image imported while the node runs is offered from its next heartbeat on.
    import(&g, &os, "env:2", &disk);
    let late = profile(g.dir.path(), "late", "image = \"env:2\"");
    let v = wait_for(Duration::from_secs(10), || {
        let out = g.run(&["submit", "--wait", &late, "-o", "json"]);
        out.status.success().then(|| json(&out))
    });
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["parts"][0]["name"], "n1", "{v}");
    wait_for(Duration::from_secs(10), || {
        (guests(&os) == saved).then_some(())
    });

    // Another node fetches the image from n1, verified by digest.
    let n1_addr = std::fs::read_to_string(g.dir.path().join("n1.addr")).expect("n1 address");
    let n1_addr = n1_addr.lines().next().expect("an address").to_owned();
    let other = g.dir.path().join("otheros");
    let other_arg = other.to_str().expect("utf-8").to_owned();
    let out = g.run(&[
        "image", "fetch", "--os-dir", &other_arg, "--from", &n1_addr, &id,
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = g.run(&["image", "list", "--os-dir", &other_arg, "-o", "json"]);
    assert_eq!(json(&out)[0]["id"], id.as_str(), "{out:?}");
    assert!(
        g.run(&["image", "verify", "--os-dir", &other_arg, &id])
            .status
            .success()
    );
    // Bytes that do not match the id are refused and nothing is kept.
    let digest = id.rsplit(':').next().expect("digest");
    std::fs::write(os.join("images/blobs").join(digest), vec![1u8; 1 << 20]).expect("tamper");
    let third = g.dir.path().join("thirdos");
    let third_arg = third.to_str().expect("utf-8").to_owned();
    let out = g.run(&[
        "image", "fetch", "--os-dir", &third_arg, "--from", &n1_addr, &id,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("corrupt"),
        "{out:?}"
    );
    let out = g.run(&["image", "list", "--os-dir", &third_arg, "-o", "json"]);
    assert_eq!(json(&out), serde_json::json!([]), "{out:?}");

    // The node stops: the guest it kept goes with it, storage and control group.
    let n1 = &g.children[1];
    let _ = std::process::Command::new("kill")
        .arg(n1.id().to_string())
        .status();
    wait_for(Duration::from_secs(20), || {
        (guests(&os).is_empty() && cgroups(&group).is_empty()).then_some(())
    });
}

/// Counts to 1.5 billion (about a second), then prints "spun".
const SPIN: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "spun")
  (func (export "_start") (local $i i64)
    (loop $l
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $l (i64.lt_u (local.get $i) (i64.const 1500000000))))
    (i32.store (i32.const 16) (i32.const 100))
    (i32.store (i32.const 20) (i32.const 4))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 32)))))"#;

/// Grows its memory to 60 MiB and writes every page of it.
const HOG: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (local $p i32)
    (drop (memory.grow (i32.const 959)))
    (loop $l
      (i32.store (local.get $p) (i32.const 1))
      (local.set $p (i32.add (local.get $p) (i32.const 4096)))
      (br_if $l (i32.lt_u (local.get $p) (i32.const 62914560))))))"#;

/// Counts to 20 billion (about 10 s; it has a memory, so that it can be checkpointed).
const WATCHED: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (local $i i64)
    (loop $l
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $l (i64.lt_u (local.get $i) (i64.const 20000000000))))))"#;

/// Spins until stopped.
const FOREVER: &str = r#"(module (func (export "_start") (loop $l (br $l))))"#;

/// A one-vertex job of module `wat` in a guest of image `env:1`, with `extra` profile lines.
fn one_vertex(dir: &Path, name: &str, wat: &str, extra: &str) -> String {
    std::fs::write(dir.join(format!("{name}.wat")), wat).expect("module");
    std::fs::write(
        dir.join(format!("{name}.dot")),
        format!("digraph {name} {{ v [component=\"{name}\"]; }}\n"),
    )
    .expect("topology");
    let p = dir.join(format!("{name}.toml"));
    let d = dir.display();
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\ntopology = \"{d}/{name}.dot\"\n[components]\n{name} = \"{d}/{name}.wat\"\n{extra}"
        ),
    )
    .expect("profile");
    p.display().to_string()
}

/// The processes in guest `guest` of parent group `group`, in every hierarchy it has.
fn guest_procs(group: &str, guest: &str) -> Vec<(PathBuf, Vec<u32>)> {
    ["cpu", "cpuacct", "memory", "cpuset", "freezer", ""]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c).join(group).join(guest))
        .filter(|d| d.join("cgroup.procs").is_file())
        .map(|d| {
            let procs = std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            (d, procs)
        })
        .collect()
}

/// A guest under `group` that holds a worker of node `node`, and the worker (a process is in
/// its guest from before its exec: one that has not exec'd yet does not count).
fn worker_in(group: &str, node: u32) -> Option<(String, u32)> {
    cgroups(group).into_iter().find_map(|guest| {
        let procs = guest_procs(group, &guest);
        let pid = procs.first()?.1.iter().copied().find(|&p| {
            parent_and_args(p)
                .is_some_and(|(pp, a)| pp == node && a.get(1).map(String::as_str) == Some("worker"))
        })?;
        Some((guest, pid))
    })
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|st| !st.trim_start().starts_with('Z'))
    })
}

/// A process's parent and command line.
fn parent_and_args(pid: u32) -> Option<(u32, Vec<String>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()?;
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args = args
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some((ppid, args))
}

#[test]
fn a_part_in_a_guest_runs_in_a_worker_inside_its_control_groups_and_its_memory_limit_binds() {
    let group = format!("mvm-worktest-{}", std::process::id());
    let _parent = ParentGroup(group.clone());
    let mut g = Groups::new();
    let os = g.dir.path().join("n1os");
    let (sp, _) = with_image_node(&mut g, &os, &group);
    let node_pid = g.children[1].id();
    write_lab(g.dir.path(), &sp);
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        (v["nodes"].as_array()?.len() == 1).then_some(())
    });

    // While the job runs, its guest's groups hold one process: a worker the node started.
    // A guest's weight out of range, or a weight without a guest: refused, naming the file.
    for (name, req) in [
        ("w0", "[requirements]\nimage = \"env:1\"\ncpu_weight = 0\n"),
        ("nog", "[requirements]\ncpu_cap = 50\n"),
    ] {
        let bad = one_vertex(g.dir.path(), name, SPIN, req);
        let out = g.run(&["submit", &bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            err.contains(&format!("{name}.toml")) && err.contains("requirements.cpu_"),
            "{err}"
        );
    }
    let spin = one_vertex(
        g.dir.path(),
        "spin",
        SPIN,
        "[requirements]\nimage = \"env:1\"\ncpu_weight = 768\n",
    );
    let submit = g.mvm(&["submit", "--wait", &spin, "-o", "json"]);
    let waiter = std::thread::spawn(move || {
        let mut submit = submit;
        submit.output().expect("mvm runs")
    });
    let (guest, worker) = wait_for(Duration::from_secs(20), || worker_in(&group, node_pid));
    // The profile's CPU weight is the guest's (Xen's 768: v1 shares 3072, v2 weight 300).
    let v1 = Path::new("/sys/fs/cgroup/cpu")
        .join(&group)
        .join(&guest)
        .join("cpu.shares");
    let v2 = Path::new("/sys/fs/cgroup")
        .join(&group)
        .join(&guest)
        .join("cpu.weight");
    let weight = std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .expect("the guest's CPU weight");
    assert!(["3072", "300"].contains(&weight.trim()), "{weight}");
    for (dir, pids) in guest_procs(&group, &guest) {
        assert_eq!(pids, vec![worker], "{}", dir.display());
    }
    let v = json(&waiter.join().expect("submitter"));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["outputs"], serde_json::json!([["v", "spun"]]), "{v}");
    assert!(!alive(worker), "the worker is gone");
    // The part's report names its guest and worker: the group and process seen above.
    let g0 = &v["parts"][0]["guest"];
    assert_eq!(
        (
            g0["name"].as_str(),
            g0["driver"].as_str(),
            g0["worker"].as_u64()
        ),
        (Some(guest.as_str()), Some("host"), Some(u64::from(worker))),
        "{v}"
    );

    // A job over its guest's memory limit: its worker is killed, the part fails saying so,
    // and the node goes on.
    let hog = one_vertex(
        g.dir.path(),
        "hog",
        HOG,
        "[requirements]\nimage = \"env:1\"\nmemory = \"24MiB\"\n[limits]\nmemory = \"64MiB\"\n",
    );
    let out = g.run(&["submit", "--wait", &hog, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json status");
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("memory limit") && error.contains("worker"),
        "{v}"
    );
    let v = json(&g.run(&["submit", "--wait", &spin, "-o", "json"]));
    assert_eq!(v["state"], "done", "the node runs the next job: {v}");

    // A job over two nodes, each part in a worker in its node's guest: the links between the
    // parts go worker to node, node to node, node to worker. (n2's guests are in a group of
    // their own: on one host, two nodes would name a job's guests alike.)
    build_jobs();
    let group2 = format!("{group}-n2");
    let _parent2 = ParentGroup(group2.clone());
    let os2 = g.dir.path().join("n2os");
    import(&g, &os2, "env:1", &g.dir.path().join("disk.raw"));
    let os2_arg = os2.to_str().expect("utf-8").to_owned();
    g.daemon(
        "n2",
        &[
            "node",
            "--bootstrap",
            &sp,
            "--os-dir",
            &os2_arg,
            "--cgroup",
            &group2,
        ],
    );
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        (v["nodes"].as_array()?.len() == 2).then_some(())
    });
    let count = "count = 300000";
    let on_host = profile(g.dir.path(), "two-host", "nodes = 2");
    let in_guests = profile(g.dir.path(), "two", "nodes = 2\nimage = \"env:1\"");
    for p in [&on_host, &in_guests] {
        let text = std::fs::read_to_string(p).expect("profile");
        std::fs::write(p, text.replace("count = 10", count)).expect("profile");
    }
    let submit = g.mvm(&["submit", "--wait", &in_guests, "-o", "json"]);
    let waiter = std::thread::spawn(move || {
        let mut submit = submit;
        submit.output().expect("mvm runs")
    });
    let node2_pid = g.children[2].id();
    wait_for(Duration::from_secs(20), || {
        let seen = worker_in(&group, node_pid).is_some() && worker_in(&group2, node2_pid).is_some();
        seen.then_some(())
    });
    let v = json(&waiter.join().expect("submitter"));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["parts"].as_array().map(Vec::len), Some(2), "{v}");
    let host = json(&g.run(&["submit", "--wait", &on_host, "-o", "json"]));
    assert_eq!(host["state"], "done", "{host}");
    assert_eq!(
        v["outputs"], host["outputs"],
        "the same results in guests as on the host"
    );
    assert_eq!(v["edges"], host["edges"], "the same per-edge counts");

    // A guest destroyed behind the node's back mid-job (its worker moved out of its groups
    // first, so that they can be removed; the worker runs on): the node's liveness monitor
    // sees it, the part fails at once, and the worker goes with it.
    let watched = one_vertex(
        g.dir.path(),
        "watched",
        WATCHED,
        "[requirements]\nimage = \"env:1\"\n[checkpoint]\ninterval = \"120s\"\n",
    );
    let text = std::fs::read_to_string(&watched).expect("profile");
    std::fs::write(
        &watched,
        text.replace("[components]", "retries = 0\n[components]"),
    )
    .expect("profile");
    // (The guests of the jobs before are gone first: the first guest seen is this job's.)
    wait_for(Duration::from_secs(20), || {
        (cgroups(&group).is_empty() && cgroups(&group2).is_empty()).then_some(())
    });
    let submit = g.mvm(&["submit", "--wait", &watched, "-o", "json"]);
    let waiter = std::thread::spawn(move || {
        let mut submit = submit;
        submit.output().expect("mvm runs")
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // (Either node may run it: both offer the image.)
    let (grp, guest) = loop {
        let found = [&group, &group2]
            .into_iter()
            .find_map(|grp| Some((grp.clone(), cgroups(grp).into_iter().next()?)));
        if let Some(found) = found {
            break found;
        }
        if waiter.is_finished() || std::time::Instant::now() > deadline {
            let out = waiter.join().expect("submitter");
            panic!("the job ended (or hung) before its guest was seen: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // (Past the part's start, which follows its guest's making at once.)
    std::thread::sleep(Duration::from_secs(1));
    let mut moved = Vec::new();
    for (dir, pids) in guest_procs(&grp, &guest) {
        assert_eq!(pids.len(), 1, "{}: one worker", dir.display());
        let parent = dir.parent().expect("the parent group").join("cgroup.procs");
        std::fs::write(&parent, pids[0].to_string()).expect("move the worker out");
        moved.extend(pids);
        std::fs::remove_dir(&dir).expect("remove the guest's group");
    }
    wait_for(Duration::from_secs(20), || {
        waiter.is_finished().then_some(())
    });
    let out = waiter.join().expect("submitter");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json status");
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("died behind the node's back"), "{v}");
    for pid in moved {
        wait_for(Duration::from_secs(5), || (!alive(pid)).then_some(()));
    }

    // A node killed mid-job takes its worker with it (the worker sees its pipe close).
    let forever = one_vertex(
        g.dir.path(),
        "forever",
        FOREVER,
        "[requirements]\nimage = \"env:1\"\n",
    );
    let out = g.run(&["submit", &forever]);
    assert!(out.status.success(), "{out:?}");
    let (at, worker) = wait_for(Duration::from_secs(20), || {
        let on = |grp: &str, node, at| worker_in(grp, node).map(|(_, w)| (at, w));
        on(&group, node_pid, 1).or_else(|| on(&group2, node2_pid, 2))
    });
    let node = &mut g.children[at];
    node.kill().expect("kill the node");
    node.wait().expect("reap the node");
    wait_for(Duration::from_secs(5), || (!alive(worker)).then_some(()));
}

/// Writes `text` to `dir/name`; the path as a string.
fn file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

#[test]
fn a_node_keeps_guests_of_a_template_warm_and_jobs_that_name_it_go_there_and_take_one() {
    let group = format!("mvm-warmtest-{}", std::process::id());
    let group2 = format!("{group}-n2");
    let (_parent, _parent2) = (ParentGroup(group.clone()), ParentGroup(group2.clone()));
    let mut g = Groups::new();
    let d = g.dir.path().to_owned();
    file(&d, "base.toml", "image = \"env:1\"\nmemory = \"64MiB\"\n");
    let warm = file(&d, "warm.toml", "extends = \"base\"\ncpu_weight = 512\n");
    let pool = file(
        &d,
        "pool.toml",
        "[[warm]]\ntemplate = \"warm.toml\"\nguests = 2\n",
    );
    let checked = json(&g.run(&["env", "check", "--pool", &pool, "-o", "json"]));
    let key = checked[0]["key"].as_str().expect("a key").to_owned();
    assert_eq!(checked[0]["template"]["shape"]["weight"], 512, "{checked}");
    // A pool file with a bad count: the node refuses to start, naming the file and line.
    let bad_pool = file(
        &d,
        "bad-pool.toml",
        "[[warm]]\ntemplate = \"warm.toml\"\nguests = 0\n",
    );
    let out = g.run(&[
        "node",
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/1",
        "--os-dir",
        "/nonexistent",
        "--pool",
        &bad_pool,
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad-pool.toml:3"),
        "{out:?}"
    );

    // n1 has more free slots (the default rank's first) and no pool; n2 keeps two warm guests.
    let os = d.join("n1os");
    let disk = d.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    import(&g, &os, "env:1", &disk);
    let os2 = d.join("n2os");
    import(&g, &os2, "env:1", &disk);
    let sp = g.daemon("sp", &["superpeer"]);
    let os2_arg = os2.display().to_string();
    os_node(&mut g, "n1", &sp, &os, &group, 4096);
    g.daemon(
        "n2",
        &[
            "node",
            "--bootstrap",
            &sp,
            "--os-dir",
            &os2_arg,
            "--cgroup",
            &group2,
            "--pool",
            &pool,
        ],
    );
    let n2_pid = g.children[2].id();
    write_lab(&d, &sp);
    // The pool is full before any job: two guests of the template's shape, with its weight,
    // and the super-peer hears of them.
    let made = wait_for(Duration::from_secs(30), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        let n2 = v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "n2")?
            .clone();
        let warm = cgroups(&group2);
        (n2["warm"][&key] == 2 && warm.len() == 2).then_some(warm)
    });
    for guest in &made {
        assert!(guest.starts_with(&format!("mvm-w{key}-")), "{made:?}");
        let shares = std::fs::read_to_string(
            Path::new("/sys/fs/cgroup/cpu")
                .join(&group2)
                .join(guest)
                .join("cpu.shares"),
        )
        .or_else(|_| {
            std::fs::read_to_string(
                Path::new("/sys/fs/cgroup")
                    .join(&group2)
                    .join(guest)
                    .join("cpu.weight"),
            )
        })
        .expect("the guest's CPU weight");
        // Xen's 512: v1 shares 2048, v2 weight 200.
        assert!(["2048", "200"].contains(&shares.trim()), "{shares}");
    }
    assert!(cgroups(&group).is_empty(), "n1 keeps none");

    // A profile that names the template and an image as well: refused, naming the line.
    let both = one_vertex(
        &d,
        "both",
        FOREVER,
        &format!("[requirements]\nenvironment = \"{warm}\"\nimage = \"env:1\"\n"),
    );
    let out = g.run(&["submit", &both]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("both.toml:7: requirements.image"),
        "{out:?}"
    );

    // A job that names the template goes to n2 and runs in one of its warm guests; another is
    // made at once to keep two free.
    let spin = one_vertex(
        &d,
        "spin",
        FOREVER,
        &format!("[requirements]\nenvironment = \"{warm}\"\n"),
    );
    let v = json(&g.run(&["submit", &spin, "-o", "json"]));
    let job = v["job"].as_str().expect("job").to_owned();
    let (guest, _) = wait_for(Duration::from_secs(20), || worker_in(&group2, n2_pid));
    assert!(made.contains(&guest), "{guest} is not one of {made:?}");
    let refilled = wait_for(Duration::from_secs(20), || {
        let now = cgroups(&group2);
        (now.len() == 3).then_some(now)
    });
    assert!(
        refilled
            .iter()
            .all(|g| g.starts_with(&format!("mvm-w{key}-"))),
        "{refilled:?}"
    );
    let s = json(&g.run(&["status", &job, "-o", "json"]));
    assert_eq!(s[0]["parts"][0]["name"], "n2", "{s}");
    // Stop-start: its guest goes with it.
    let out = g.run(&["cancel", &job]);
    assert!(out.status.success(), "{out:?}");
    let after = wait_for(Duration::from_secs(20), || {
        let now = cgroups(&group2);
        (now.len() == 2 && !now.contains(&guest)).then_some(now)
    });

    // Persistent: the job gives its warm guest back, to be the next one taken (the oldest
    // free one goes instead: the pool keeps two).
    let keep = one_vertex(
        &d,
        "keep",
        FOREVER,
        &format!("[requirements]\nenvironment = \"{warm}\"\nvm_mode = \"persistent\"\n"),
    );
    let mut used = None;
    for round in 0..2 {
        let v = json(&g.run(&["submit", &keep, "-o", "json"]));
        let job = v["job"].as_str().expect("job").to_owned();
        let (guest, _) = wait_for(Duration::from_secs(20), || worker_in(&group2, n2_pid));
        match &used {
            None => assert!(after.contains(&guest), "{guest} is not one of {after:?}"),
            Some(u) => assert_eq!(&guest, u, "round {round}: the guest given back"),
        }
        used = Some(guest.clone());
        assert!(g.run(&["cancel", &job]).status.success());
        let now = wait_for(Duration::from_secs(20), || {
            let now = cgroups(&group2);
            let idle = guest_procs(&group2, &guest)
                .iter()
                .all(|(_, p)| p.is_empty());
            (now.len() == 2 && now.contains(&guest) && idle).then_some(now)
        });
        assert!(
            now.iter().all(|g| g.starts_with(&format!("mvm-w{key}-"))),
            "{now:?}"
        );
    }
    wait_for(Duration::from_secs(10), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        let n2 = v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "n2")?
            .clone();
        (n2["warm"][&key] == 2).then_some(())
    });
    // A job that names an image only runs where the default rank puts it: n1.
    let plain = one_vertex(&d, "plain", SPIN, "[requirements]\nimage = \"env:1\"\n");
    let v = json(&g.run(&["submit", "--wait", &plain, "-o", "json"]));
    assert_eq!(v["parts"][0]["name"], "n1", "{v}");
}

/// A ring of 8 vertices passing a token 100,000 hops over 3 of 4 nodes, each part in a worker
/// inside its node's guest, with checkpoints: its second part migrated to the free node while
/// it runs, a checkpoint taken, then the node of its first part killed (`SIGKILL`, its worker
/// with it). It ends in its second run, restored from a checkpoint in new workers, as an
/// undisturbed run ends, edge by edge.
#[test]
fn a_ring_in_workers_checkpointed_migrated_and_killed_ends_as_an_undisturbed_run() {
    let tag = format!("mvm-ringtest-{}", std::process::id());
    let groups: Vec<String> = (0..4).map(|i| format!("{tag}-n{i}")).collect();
    let _parents: Vec<ParentGroup> = groups.iter().cloned().map(ParentGroup).collect();
    let mut g = Groups::new();
    let d = g.dir.path().to_owned();
    let disk = d.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let sp = g.daemon("sp", &["superpeer"]);
    let mut pids = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let os = d.join(format!("n{i}os"));
        import(&g, &os, "env:1", &disk);
        let os = os.display().to_string();
        g.daemon(
            &format!("n{i}"),
            &[
                "node",
                "--bootstrap",
                &sp,
                "--os-dir",
                &os,
                "--cgroup",
                group,
            ],
        );
        pids.push(g.children.last().expect("a node").id());
    }
    write_lab(&d, &sp);
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        (v["nodes"].as_array()?.len() == 4).then_some(())
    });
    let profile = |name: &str, extra: &str| {
        let p = d.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = \"{name}\"\ntopology = \"{0}/topologies/ring-8.dot\"\n[components]\ntoken = \"{0}/jobs/wat/token.wat\"\n[parameters]\nhops = 100000\n[requirements]\nnodes = 3\nimage = \"env:1\"\n[limits]\nwall = \"300s\"\n{extra}",
                root().display()
            ),
        )
        .expect("profile");
        p.display().to_string()
    };
    let saved = profile("saved", "[checkpoint]\ninterval = \"1s\"\n");
    let plain = profile("plain", "");
    let status = |job: &str| json(&g.run(&["status", job, "-o", "json"]))[0].clone();
    let v = json(&g.run(&["submit", &saved, "-o", "json"]));
    let job = v["job"].as_str().expect("id").to_owned();
    let s = wait_for(Duration::from_secs(30), || {
        let s = status(&job);
        (s["state"] == "running").then_some(s)
    });
    let on: Vec<String> = (s["parts"].as_array().expect("parts").iter())
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(on.len(), 3, "{s}");
    // Every part runs in a worker inside its node's guest.
    let index = |name: &str| name[1..].parse::<usize>().expect("nN");
    for n in &on {
        let i = index(n);
        wait_for(Duration::from_secs(10), || worker_in(&groups[i], pids[i]));
    }
    // The second part moves to the free node, into a worker there.
    let free = (0..4)
        .map(|i| format!("n{i}"))
        .find(|n| !on.contains(n))
        .expect("a free node");
    let vertex = s["parts"][1]["vertices"][0].as_str().expect("a vertex");
    let out = g.run(&["migrate", &job, "--vertex", vertex, "--to", &free]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(&job);
    assert_eq!(s["state"], "running", "moved while it ran: {s}");
    assert_eq!(s["parts"][1]["name"], free.as_str(), "{s}");
    let f = index(&free);
    wait_for(Duration::from_secs(10), || worker_in(&groups[f], pids[f]));
    // A checkpoint now, then the first part's node killed.
    let out = g.run(&["checkpoint", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(&job);
    assert_eq!(
        s["state"], "running",
        "the job outlived its checkpoint: {s}"
    );
    let cut = (s["checkpoints"].as_array().and_then(|c| c.last()))
        .and_then(|c| c["cut"].as_u64())
        .unwrap_or_else(|| panic!("a checkpoint listed: {s}"));
    let victim = index(s["parts"][0]["name"].as_str().expect("a node"));
    let (_, worker) = worker_in(&groups[victim], pids[victim]).expect("the victim's worker");
    let node = &mut g.children[1 + victim];
    node.kill().expect("kill the node");
    node.wait().expect("reap the node");
    wait_for(Duration::from_secs(5), || (!alive(worker)).then_some(()));
    let status = |job: &str| json(&g.run(&["status", job, "-o", "json"]))[0].clone();
    let end = wait_for(Duration::from_secs(120), || {
        let s = status(&job);
        (s["state"] == "done" || s["state"] == "failed").then_some(s)
    });
    assert_eq!(
        (&end["state"], &end["attempt"]),
        (&"done".into(), &1.into()),
        "{end}"
    );
    let from = end["restarts"][0]["from_cut"].as_u64();
    assert!(
        from.is_some_and(|f| f >= cut),
        "restored from a checkpoint: {end}"
    );
    let quiet = json(&g.run(&["submit", "--wait", &plain, "-o", "json"]));
    assert_eq!(quiet["state"], "done", "{quiet}");
    assert_eq!(end["outputs"], quiet["outputs"]);
    crate::run::same_traffic(&end, &quiet);
}

/// The CPU weight of each guest under `group` (cgroup v1 `cpu.shares` or v2 `cpu.weight`),
/// sorted.
fn guest_weights(group: &str) -> Vec<u64> {
    let (dir, file) = if Path::new("/sys/fs/cgroup/cpu").join(group).is_dir() {
        (Path::new("/sys/fs/cgroup/cpu").join(group), "cpu.shares")
    } else {
        (Path::new("/sys/fs/cgroup").join(group), "cpu.weight")
    };
    let mut v: Vec<u64> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| std::fs::read_to_string(e.path().join(file)).ok())
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// A super-peer and node n1 with image `env:1`, guests under control group `group`, n1
/// registered; and the super-peer's address.
fn one_market_node(group: &str) -> (Groups, String) {
    let mut g = Groups::new();
    let os = g.dir.path().join("n1os");
    let (sp, _) = with_image_node(&mut g, &os, group);
    write_lab(g.dir.path(), &sp);
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        (v["nodes"].as_array()?.len() == 1).then_some(())
    });
    (g, sp)
}

/// The caller's own bank account, with `credits` minted into it (the embedded default policy
/// lets every member of the domain administer it).
fn funded(g: &Groups, credits: &str) -> String {
    let v = json(&g.run(&["bank", "balance", "-o", "json"]));
    let me = v["accounts"][0][0].as_str().expect("account").to_owned();
    let out = g.run(&["bank", "mint", &me, credits]);
    assert!(out.status.success(), "{out:?}");
    me
}

/// Every account's balance, micro-credits.
fn balances(g: &Groups) -> Vec<(String, u64)> {
    let v = json(&g.run(&["bank", "balance", "--all", "-o", "json"]));
    v["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .map(|a| {
            (
                a[0].as_str().expect("account").to_owned(),
                a[1].as_u64().expect("balance"),
            )
        })
        .collect()
}

/// The caller's charges, newest first, once no new one has come for two heartbeats.
fn settled_charges(g: &Groups) -> Vec<serde_json::Value> {
    let read = || {
        let v = json(&g.run(&["bank", "history", "--limit", "10000", "-o", "json"]));
        v["transactions"]
            .as_array()
            .expect("transactions")
            .iter()
            .filter(|t| t["kind"] == "charge")
            .cloned()
            .collect::<Vec<_>>()
    };
    let mut last = read();
    wait_for(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(2500));
        let now = read();
        let same = now.len() == last.len();
        last = now;
        same.then_some(())
    });
    last
}

/// The price `mvm market hosts` gives node n1, credits per CPU-second.
fn n1_price(g: &Groups) -> Option<String> {
    let v = json(&g.run(&["market", "hosts", "-o", "json"]));
    v.as_array()?
        .iter()
        .find(|h| h["name"] == "n1")
        .and_then(|h| h["price"].as_str().map(str::to_owned))
}

#[test]
fn bidding_jobs_pay_the_node_s_provider_for_the_cpu_they_use_and_never_more_than_they_hold() {
    let group = format!("mvm-chargetest-{}", std::process::id());
    let _parent = ParentGroup(group.clone());
    let (mut g, sp) = one_market_node(&group);
    // A node without guests: nothing bids there.
    g.daemon("n2", &["node", "--bootstrap", &sp]);
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        (v["nodes"].as_array()?.len() == 2).then_some(())
    });
    let me = funded(&g, "100");
    let minted = 100 * MICRO;
    let spin = r#"(module (func (export "_start") (loop $l (br $l))))"#;
    let dir = g.dir.path().to_owned();
    let spinner = |name: &str, bid: &str| {
        one_vertex(
            &dir,
            name,
            spin,
            &format!("[requirements]\nimage = \"env:1\"\nbid = \"{bid}\"\n"),
        )
    };
    // A bid above what its owner holds is refused at submission.
    let out = g.run(&["submit", &spinner("rich", "150")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("above"), "{err}");
    let state = |id: &str| {
        let v = json(&g.run(&["status", id, "-o", "json"]));
        v[0]["state"].as_str().unwrap_or_default().to_owned()
    };
    let submit = |p: &str| {
        let v = json(&g.run(&["submit", p, "-o", "json"]));
        let id = v["job"].as_str().expect("job").to_owned();
        wait_for(Duration::from_secs(20), || {
            (state(&id) == "running").then_some(())
        });
        id
    };
    let job = submit(&spinner("spin", "1"));
    wait_for(Duration::from_secs(10), || {
        (n1_price(&g)? == "1").then_some(())
    });
    // Hosts by price: the free one first (both have the machine's CPUs).
    let hosts = json(&g.run(&["market", "hosts", "-o", "json"]));
    let ranked: Vec<(&str, &str)> = hosts
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap_or(""),
                h["price"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(ranked, vec![("n2", "0"), ("n1", "1")], "{hosts}");
    std::thread::sleep(Duration::from_secs(2));
    // By hand: a bid above the balance is refused; one within it binds on the node at once.
    let out = g.run(&["bid", &job, "--rate", "500"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("balance"),
        "{out:?}"
    );
    assert!(g.run(&["bid", &job, "--rate", "2"]).status.success());
    wait_for(Duration::from_secs(10), || {
        (n1_price(&g)? == "2").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(g.run(&["cancel", &job]).status.success());
    let charges = settled_charges(&g);
    let micro = |t: &serde_json::Value, k: &str| t["usage"][k].as_u64().expect("usage");
    let charged: u64 = charges
        .iter()
        .map(|t| t["amount"].as_u64().expect("amount"))
        .sum();
    let metered: f64 = charges
        .iter()
        .map(|t| micro(t, "cpu_us") as f64 * micro(t, "rate") as f64 / 1e6)
        .sum();
    let cpu: f64 = charges
        .iter()
        .map(|t| micro(t, "cpu_us") as f64 / 1e6)
        .sum();
    assert!(cpu > 2.0, "the spinning guest used {cpu} CPU-s over ~5 s");
    assert!(
        (charged as f64 - metered).abs() <= 0.01 * metered,
        "charged {charged} for {metered} metered"
    );
    let rates: std::collections::BTreeSet<u64> = charges.iter().map(|t| micro(t, "rate")).collect();
    assert_eq!(
        rates,
        [MICRO, 2 * MICRO].into_iter().collect(),
        "charged at the first bid, then at the new one"
    );
    assert!(charges.iter().all(|t| t["from"] == me.as_str()));
    let provider = charges[0]["to"].as_str().expect("to").to_owned();
    assert!(provider.starts_with("node:n1@"), "{provider}");
    let b = balances(&g);
    let of = |a: &str| b.iter().find(|x| x.0 == a).map_or(0, |x| x.1);
    assert_eq!(of(&provider), charged, "the provider got what was charged");
    assert_eq!(
        b.iter().map(|x| x.1).sum::<u64>(),
        minted,
        "credits only moved"
    );
    // A payer with little left: charged all it holds, then its guest bids the floor.
    let domain = me.rsplit('@').next().expect("domain");
    let keep = 300_000; // 0.3 credits
    let give = format_micro(of(&me) - keep);
    let out = g.run(&["bank", "transfer", &format!("bob@{domain}"), &give]);
    assert!(out.status.success(), "{out:?}");
    let poor = submit(&spinner("poor", "0.2"));
    wait_for(Duration::from_secs(30), || {
        (n1_price(&g)? == "0.000001").then_some(())
    });
    let b = balances(&g);
    assert!(
        !b.iter().any(|x| x.0 == me),
        "{me} is emptied, and no further: {b:?}"
    );
    assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), minted);
    assert_eq!(
        state(&poor),
        "running",
        "a payer without credit still runs, at the floor"
    );
    assert!(g.run(&["cancel", &poor]).status.success());
}

/// Micro-credits as a decimal number of credits.
fn format_micro(m: u64) -> String {
    format!("{}.{:06}", m / MICRO, m % MICRO)
}

#[test]
fn jobs_that_bid_for_a_node_s_cpu_get_guest_weights_in_proportion_to_their_bids() {
    let group = format!("mvm-bidtest-{}", std::process::id());
    let _parent = ParentGroup(group.clone());
    let (g, _) = one_market_node(&group);
    let sleep = include_str!("../../../jobs/wat/sleep.wat");
    // Bids are paid from the owner's credits.
    funded(&g, "100");
    // A bid needs a guest, and is a number of credits: refused, naming the file.
    for (name, req, says) in [
        ("nog", "[requirements]\nbid = \"1\"\n", "requirements.bid"),
        (
            "nan",
            "[requirements]\nimage = \"env:1\"\nbid = \"NaN\"\n",
            "not an amount",
        ),
    ] {
        let bad = one_vertex(g.dir.path(), name, sleep, req);
        let out = g.run(&["submit", &bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            err.contains(&format!("{name}.toml")) && err.contains(says),
            "{err}"
        );
    }
    let job = |name: &str, bid: &str| {
        let p = one_vertex(
            g.dir.path(),
            name,
            sleep,
            &format!(
                "[parameters]\nms = 60000\n[requirements]\nimage = \"env:1\"\nbid = \"{bid}\"\n"
            ),
        );
        let v = json(&g.run(&["submit", &p, "-o", "json"]));
        v["job"].as_str().expect("job").to_owned()
    };
    let state = |id: &str| {
        let v = json(&g.run(&["status", id, "-o", "json"]));
        v[0]["state"].as_str().unwrap_or_default().to_owned()
    };
    let low = job("low", "1");
    wait_for(Duration::from_secs(20), || {
        (state(&low) == "running").then_some(())
    });
    // Alone, its bid is the top one.
    let (top_v1, top_v2) = (1024, 100);
    let w = guest_weights(&group);
    assert!(w == vec![top_v1] || w == vec![top_v2], "{w:?}");
    // A bid three times as high: the first guest's weight falls to a third of the top.
    let high = job("high", "3");
    wait_for(Duration::from_secs(20), || {
        (state(&high) == "running").then_some(())
    });
    let w = guest_weights(&group);
    assert!(
        w == vec![340, top_v1] || w == vec![33, top_v2],
        "weights 85 and 256, as v1 shares or v2 weights: {w:?}"
    );
    // The high bidder goes: the low one's weight is the top again.
    assert!(g.run(&["cancel", &high]).status.success());
    wait_for(Duration::from_secs(20), || {
        let w = guest_weights(&group);
        (w == vec![top_v1] || w == vec![top_v2]).then_some(())
    });
    assert!(g.run(&["cancel", &low]).status.success());
}

/// Starts node `name` of super-peer `sp` with its OS layer in `os`, guests under `group`,
/// and `slots` slots.
fn os_node(g: &mut Groups, name: &str, sp: &str, os: &Path, group: &str, slots: u32) {
    let os_arg = os.display().to_string();
    let slots = slots.to_string();
    g.daemon(
        name,
        &[
            "node",
            "--bootstrap",
            sp,
            "--os-dir",
            &os_arg,
            "--cgroup",
            group,
            "--slots",
            &slots,
        ],
    );
}

/// A ring of 8 token-passing vertices that runs until cancelled.
fn endless_ring(dir: &Path, name: &str) -> String {
    file(
        dir,
        &format!("{name}.toml"),
        &format!(
            "name = \"{name}\"\ntopology = \"{0}/topologies/ring-8.dot\"\n[components]\n\
             token = \"{0}/jobs/wat/token.wat\"\n[parameters]\nhops = 2000000000\n\
             [limits]\nwall = \"300s\"\n",
            root().display()
        ),
    )
}

/// The group's nodes by name, as its super-peer sees them.
fn node_names(g: &Groups) -> Vec<String> {
    let v = json(&g.run(&["lab", "status", "-o", "json"]));
    let mut names: Vec<String> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["lost"] == false)
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[test]
fn triggers_grow_the_group_with_guests_running_nodes_under_a_backlog_and_shrink_it_when_idle() {
    let group = format!("mvm-trigtest-{}", std::process::id());
    let _parent = ParentGroup(group.clone());
    let mut g = Groups::new();
    let d = g.dir.path().to_owned();
    let os = d.join("n1os");
    let disk = d.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    import(&g, &os, "env:1", &disk);
    // Grow by one guest of 8 slots while vertices wait; tear an idle guest down when nothing
    // waits.
    file(&d, "base.toml", "image = \"env:1\"\nmemory = \"512MiB\"\n");
    let triggers = d.join("triggers");
    std::fs::create_dir_all(&triggers).expect("mkdir");
    file(
        &triggers,
        "grow.toml",
        "when = \"pending_vertices > 0\"\nfor = \"500ms\"\ncooldown = \"30s\"\n[action]\n\
         create-guests = { template = \"../base.toml\", count = 1, slots = 8 }\n",
    );
    file(
        &triggers,
        "shrink.toml",
        "when = \"idle_guests > 0 and pending_vertices = 0\"\nfor = \"1s\"\ncooldown = \"5s\"\n\
         [action]\ndestroy-idle-guests = { count = 1 }\n",
    );
    let checked = json(&g.run(&[
        "trigger",
        "check",
        triggers.to_str().expect("utf-8"),
        "-o",
        "json",
    ]));
    assert_eq!(checked[0]["name"], "grow", "{checked}");
    assert_eq!(checked[1]["ok"], true, "{checked}");
    let t = triggers.to_str().expect("utf-8").to_owned();
    let ca = d.join("ca").to_str().expect("utf-8").to_owned();
    let sp = g.daemon("sp", &["superpeer", "--triggers", &t, "--issuer", &ca]);
    os_node(&mut g, "n1", &sp, &os, &group, 8);
    write_lab(&d, &sp);
    wait_for(Duration::from_secs(20), || {
        (node_names(&g) == ["n1"]).then_some(())
    });

    // A ring fills n1; a second waits, and the grow trigger makes a guest whose node takes it.
    let submit = |name: &str| {
        let v = json(&g.run(&["submit", &endless_ring(&d, name), "-o", "json"]));
        v["job"].as_str().expect("a job id").to_owned()
    };
    let status = |job: &str| json(&g.run(&["status", job, "-o", "json"]))[0].clone();
    let first = submit("first");
    wait_for(Duration::from_secs(30), || {
        (status(&first)["state"] == "running").then_some(())
    });
    let second = submit("second");
    let v = wait_for(Duration::from_secs(60), || {
        let v = status(&second);
        (v["state"] == "running").then_some(v)
    });
    let parts: Vec<&str> = v["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(parts.len(), 1, "{v}");
    let guest = parts[0].to_owned();
    assert!(
        guest.starts_with("n1-g"),
        "placed on the new guest's node: {v}"
    );
    assert_eq!(node_names(&g), ["n1".to_owned(), guest.clone()]);
    // The guest is a control group of n1's driver, and its node runs inside it.
    let guests_now = cgroups(&group);
    assert_eq!(guests_now.len(), 1, "{guests_now:?}");
    let procs = guest_procs(&group, &guests_now[0]);
    assert!(
        procs.iter().any(|(_, pids)| pids.iter().any(|&p| {
            parent_and_args(p).is_some_and(|(_, args)| args.iter().any(|a| a == &guest))
        })),
        "the guest's node process is in {procs:?}"
    );

    // Nothing waits and the guest is idle: the shrink trigger tears it down.
    for job in [&second, &first] {
        assert!(g.run(&["cancel", job]).status.success());
    }
    wait_for(Duration::from_secs(60), || {
        (node_names(&g) == ["n1"] && cgroups(&group).is_empty()).then_some(())
    });
    let v = json(&g.run(&["lab", "status", "-o", "json"]));
    assert!(
        v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["name"] != guest.as_str()),
        "the guest's node is forgotten, not lost: {v}"
    );
}

#[test]
fn a_node_placed_for_an_image_it_lacks_fetches_it_first_from_a_node_that_serves_it() {
    build_jobs();
    let group = format!("mvm-envfetch-{}", std::process::id());
    let _parent = ParentGroup(group.clone());
    let mut g = Groups::new();
    let os1 = g.dir.path().join("n1os");
    let (sp, id) = with_image_node(&mut g, &os1, &group);
    // n2 keeps a repository without the image, and ranks first (more slots).
    let os2 = g.dir.path().join("n2os");
    std::fs::create_dir_all(&os2).expect("mkdir");
    let os2_arg = os2.to_str().expect("utf-8").to_owned();
    g.daemon(
        "n2",
        &[
            "node",
            "--bootstrap",
            &sp,
            "--os-dir",
            &os2_arg,
            "--cgroup",
            &group,
            "--slots",
            "2048",
        ],
    );
    write_lab(g.dir.path(), &sp);
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["lab", "status", "-o", "json"]));
        (v["nodes"].as_array()?.len() == 2).then_some(())
    });
    let p = profile(
        g.dir.path(),
        "fetched",
        "image = \"env:1\"\nrank = \"slots\"\nnodes = 1",
    );
    let v = json(&g.run(&["submit", "--wait", &p, "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(
        v["parts"][0]["name"], "n2",
        "placed on the node that lacked it: {v}"
    );
    // n2's repository holds it now, by the same id (its bytes hashed to it).
    let out = g.run(&["image", "list", "--os-dir", &os2_arg, "-o", "json"]);
    let list = json(&out);
    assert!(
        list.as_array()
            .is_some_and(|a| a.iter().any(|i| i["id"].as_str() == Some(id.as_str()))),
        "{list}"
    );
}

#[test]
fn a_market_job_s_agent_bids_for_it_and_spends_its_budget_by_its_deadline_and_no_more() {
    let group = format!("mvm-agenttest-{}", std::process::id());
    let _parent = ParentGroup(group.clone());
    let (g, _) = one_market_node(&group);
    let me = funded(&g, "10");
    let spin = r#"(module (func (export "_start") (loop $l (br $l))))"#;
    let dir = g.dir.path().to_owned();
    let market = |name: &str, budget: &str| {
        one_vertex(
            &dir,
            name,
            spin,
            &format!(
                "[requirements]\nimage = \"env:1\"\n[market]\nbudget = {budget}\ndeadline = \"4s\"\n"
            ),
        )
    };
    // A budget above the balance, or a bad one, is refused.
    for (name, budget, says) in [
        ("big", "11", "above"),
        ("neg", "-1", "market.budget"),
        ("nan", "\"NaN\"", "market.budget"),
    ] {
        let out = g.run(&["submit", &market(name, budget)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{name}: {err}");
    }
    // 2 credits over 4 s: alone on n1, the agent bids it all there, 0.5 credits a CPU-second.
    let v = json(&g.run(&["submit", &market("agent", "2"), "-o", "json"]));
    let job = v["job"].as_str().expect("job").to_owned();
    wait_for(Duration::from_secs(20), || {
        (n1_price(&g)? == "0.5").then_some(())
    });
    // It spends the budget (its guest spins), then bids the floor; never more than the budget.
    wait_for(Duration::from_secs(30), || {
        (n1_price(&g)? == "0.000001").then_some(())
    });
    let out = g.run(&["bid", &job, "--rate", "1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("past what is left of its budget"),
        "{out:?}"
    );
    assert!(g.run(&["cancel", &job]).status.success());
    let charges = settled_charges(&g);
    let spent: u64 = charges
        .iter()
        .filter(|t| t["usage"]["job"] == job.as_str())
        .map(|t| t["amount"].as_u64().expect("amount"))
        .sum();
    assert_eq!(spent, 2 * MICRO, "the budget, to the micro-credit");
    let b = balances(&g);
    assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 10 * MICRO);
    assert_eq!(b.iter().find(|x| x.0 == me).map(|x| x.1), Some(8 * MICRO));
}

#[test]
fn a_node_s_floor_price_from_its_domain_s_policy_keeps_lower_bids_off_it() {
    let group = format!("mvm-floortest-{}", std::process::id());
    let _parent = ParentGroup(group.clone());
    let mut g = Groups::new();
    // The embedded default's rules, and a floor price for n1.
    let policies = g.dir.path().join("policies");
    std::fs::create_dir_all(policies.join("lab")).expect("policy dir");
    std::fs::write(
        policies.join("lab/default.polar"),
        "allow(actor, _action: String, resource) if actor.domain = \"lab\" and \
         resource.domain = \"lab\";\nfloor_price(node: Node, \"0.5\") if node.name = \"n1\";\n",
    )
    .expect("domain policy");
    std::fs::write(
        policies.join("node.polar"),
        "allow(actor, \"run\", node: Node) if actor.domain = node.domain;\n",
    )
    .expect("node policy");
    let disk = g.dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let os = g.dir.path().join("n1os");
    import(&g, &os, "env:1", &disk);
    let sp = g.daemon(
        "sp",
        &["superpeer", "--policies", policies.to_str().expect("utf-8")],
    );
    os_node(&mut g, "n1", &sp, &os, &group, 4);
    write_lab(g.dir.path(), &sp);
    wait_for(Duration::from_secs(20), || {
        let v = json(&g.run(&["market", "hosts", "-o", "json"]));
        (v[0]["floor"] == "0.5").then_some(())
    });
    funded(&g, "100");
    let spin = r#"(module (func (export "_start") (loop $l (br $l))))"#;
    let profile = |name: &str, rate: &str| {
        one_vertex(
            g.dir.path(),
            name,
            spin,
            &format!("[requirements]\nimage = \"env:1\"\nbid = \"{rate}\"\n"),
        )
    };
    let status = |id: &str| json(&g.run(&["status", id, "-o", "json"]))[0].clone();
    // Under every node's floor: refused, saying why.
    let out = g.run(&["submit", &profile("low", "0.1")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("n1: takes bids of at least 0.5"),
        "{err}"
    );
    // At the floor or above: it runs; by hand, a bid under the floor is refused.
    let v = json(&g.run(&["submit", &profile("high", "0.5"), "-o", "json"]));
    let high = v["job"].as_str().expect("job").to_owned();
    wait_for(Duration::from_secs(20), || {
        (status(&high)["state"] == "running").then_some(())
    });
    let out = g.run(&["bid", &high, "--rate", "0.2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("at least 0.5"),
        "{err}"
    );
    assert!(g.run(&["cancel", &high]).status.success());
}
