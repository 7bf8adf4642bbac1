//! The OS layer on a woken node: a job whose profile names an image runs after its node made a
//! guest of that image (the host driver: a control group, with the image's disk as storage),
//! kept between jobs, fresh per job, or torn down with the node, as the profile's VM mode says.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::groups::Groups;
use crate::netns::{wait_for, write_lab};
use crate::run::{build_jobs, json, root};

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
    let mut g = Groups::new();
    let os = g.dir.path().join("n1os");
    let group = format!("mvm-envtest-{}", std::process::id());
    // The image: a 1 MiB disk in n1's repository.
    let disk = g.dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let id = import(&g, &os, "env:1", &disk);
    assert!(id.starts_with("env:1@sha256:"), "{id}");

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
            &group,
        ],
    );
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

    // Stop/start, by full id: a fresh guest for the job, gone when it ends.
    let s = profile(g.dir.path(), "fresh", &format!("image = \"{id}\""));
    let v = json(&g.run(&["submit", "--wait", &s, "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    wait_for(Duration::from_secs(10), || {
        (guests(&os) == kept).then_some(())
    });
    assert_eq!(cgroups(&group), kept);

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
        (guests(&os) == kept).then_some(())
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
    for base in [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/freezer",
        "/sys/fs/cgroup/cpuset",
        "/sys/fs/cgroup",
    ] {
        let _ = std::fs::remove_dir(Path::new(base).join(&group));
    }
}
