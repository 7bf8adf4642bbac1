//! Two groups, each with its super-peer: summaries gossiped between the super-peers, and a job
//! that one group cannot place forwarded to the other.

use std::process::{Child, Command, Output};
use std::time::Duration;

use crate::netns::{spawn_daemon, wait_for, write_lab};
use crate::run::{build_jobs, json, root};

/// Daemons started one by one, each a real `mvm` process, killed at the end.
pub(crate) struct Groups {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) children: Vec<Child>,
}

impl Groups {
    pub(crate) fn new() -> Groups {
        Groups {
            dir: tempfile::tempdir().expect("tempdir"),
            children: Vec::new(),
        }
    }

    pub(crate) fn mvm(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mvm"));
        c.args(args)
            .env("MVM_CACHE_DIR", self.dir.path().join("cache"))
            .env("MVM_LAB_DIR", self.dir.path().join("lab"))
            .env_remove("MVM_BROKER")
            .current_dir(root());
        c
    }

    pub(crate) fn daemon(&mut self, name: &str, args: &[&str]) -> String {
        let mut cmd = self.mvm(args);
        let (child, addr) = spawn_daemon(&mut cmd, self.dir.path(), name, "/ip4/127.0.0.1/tcp/0");
        self.children.push(child);
        addr
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.mvm(args).output().expect("mvm runs")
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn part_names(v: &serde_json::Value) -> Vec<String> {
    v["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn a_job_too_big_for_its_group_is_forwarded_to_another_groups_super_peer() {
    build_jobs();
    let mut g = Groups::new();
    let a = g.daemon("spa", &["superpeer", "--group", "a"]);
    let b = g.daemon("spb", &["superpeer", "--group", "b", "--peer", &a]);
    g.daemon(
        "a0",
        &["node", "--group", "a", "--bootstrap", &a, "--slots", "4"],
    );
    g.daemon("b0", &["node", "--group", "b", "--bootstrap", &b]);
    g.daemon("b1", &["node", "--group", "b", "--bootstrap", &b]);
    write_lab(g.dir.path(), &a);
    // A hears B's summary: two nodes, free slots.
    wait_for(Duration::from_secs(20), || {
        let out = g.run(&["lab", "status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let ok = v["nodes"].as_array()?.len() == 1
            && v["groups"]
                .as_array()?
                .iter()
                .any(|x| x["group"] == "b" && x["nodes"] == 2);
        ok.then_some(())
    });
    // 28 vertices do not fit in group a's 4 slots: group b runs them.
    let v = json(&g.run(&["submit", "--wait", "examples/fft8.toml", "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    let mut names = part_names(&v);
    names.sort();
    assert_eq!(names, ["b0", "b1"], "{v}");
    // 4 vertices fit at home.
    let v = json(&g.run(&["submit", "--wait", "examples/pipeline.toml", "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(part_names(&v), ["a0"], "{v}");
    // Requirements no group meets: the refusal says so (exit 1), naming the home group.
    let p = g.dir.path().join("arm.toml");
    std::fs::write(
        &p,
        format!(
            "name = \"arm\"\ntopology = \"{0}/topologies/ring-8.dot\"\n[components]\ntoken = \"{0}/jobs/wat/token.wat\"\n[requirements]\narch = \"aarch64\"\n",
            root().display()
        ),
    )
    .expect("profile");
    let out = g.run(&["submit", p.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("group a") && err.contains("aarch64") && err.contains("no other group"),
        "{err}"
    );
}

/// Writes a ring profile of `hops` hops into `dir`.
fn ring(dir: &std::path::Path, name: &str, hops: u64, extra: &str) -> String {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\n{extra}topology = \"{0}/topologies/ring-8.dot\"\n[components]\ntoken = \"{0}/jobs/wat/token.wat\"\n[parameters]\nhops = {hops}\n[limits]\nwall = \"120s\"\n",
            root().display()
        ),
    )
    .expect("profile");
    p.display().to_string()
}

fn state_of(g: &Groups, job: &str) -> serde_json::Value {
    json(&g.run(&["status", job, "-o", "json"]))[0].clone()
}

#[test]
fn a_job_that_does_not_fit_now_waits_in_order_and_hold_and_release_steer_it() {
    build_jobs();
    let mut g = Groups::new();
    let sp = g.daemon("sp", &["superpeer"]);
    g.daemon("n0", &["node", "--bootstrap", &sp, "--slots", "8"]);
    write_lab(g.dir.path(), &sp);
    wait_for(Duration::from_secs(20), || {
        let v: serde_json::Value =
            serde_json::from_slice(&g.run(&["lab", "status", "-o", "json"]).stdout).ok()?;
        (v["nodes"].as_array()?.len() == 1).then_some(())
    });
    let dir = g.dir.path();
    // The ring takes the node's 8 slots for as long as it runs.
    let long = json(&g.run(&[
        "submit",
        &ring(dir, "long", 2_000_000_000, ""),
        "-o",
        "json",
    ]));
    let long = long["job"].as_str().expect("job").to_owned();
    // Two more: they fit the group, not now; they wait, the higher priority first.
    let low = json(&g.run(&["submit", &ring(dir, "low", 800, ""), "-o", "json"]));
    let high = json(&g.run(&[
        "submit",
        &ring(dir, "high", 1_000_000, "priority = 5\n"),
        "-o",
        "json",
    ]));
    for v in [&low, &high] {
        assert_eq!(v["state"], "pending", "{v}");
    }
    let (low, high) = (
        low["job"].as_str().expect("job").to_owned(),
        high["job"].as_str().expect("job").to_owned(),
    );
    let why = state_of(&g, &low);
    assert!(
        why["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("n0") && w.contains("slot")),
        "a pending job says what each node lacks: {why}"
    );
    let pending = json(&g.run(&["status", "--state", "pending", "-o", "json"]));
    assert_eq!(
        pending.as_array().map(Vec::len),
        Some(2),
        "pending: {pending}"
    );
    let out = g.run(&["hold", &long]);
    assert_eq!(out.status.code(), Some(2), "a running job cannot be held");
    // Room: the higher priority goes first, though submitted later.
    json(&g.run(&["cancel", &long, "-o", "json"]));
    wait_for(Duration::from_secs(30), || {
        (state_of(&g, &high)["state"] == "running").then_some(())
    });
    assert_eq!(state_of(&g, &low)["state"], "pending");
    // Held, the low one waits even when there is room again; released, it runs.
    json(&g.run(&["hold", &low, "-o", "json"]));
    assert!(
        state_of(&g, &low)["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("held"))
    );
    wait_for(Duration::from_secs(60), || {
        (state_of(&g, &high)["state"] == "done").then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(state_of(&g, &low)["state"], "pending");
    json(&g.run(&["release", &low, "-o", "json"]));
    wait_for(Duration::from_secs(30), || {
        (state_of(&g, &low)["state"] == "done").then_some(())
    });
    let v = state_of(&g, &low);
    assert_eq!(crate::lab::items_moved(&v), 800, "{v}");
    // A job that no node could hold even if all were free is not queued: refused at once.
    let out = g.run(&["submit", "examples/fft8.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no other group"));
}
