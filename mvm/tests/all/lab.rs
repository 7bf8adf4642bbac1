//! Labs of real daemon processes on loopback: a super-peer and nodes talking libp2p, jobs
//! placed across them, a node killed mid-job, the demo, and its clean-up.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::run::{build_jobs, dft, json, root, same_traffic};

fn mvm(dir: &Path, args: &[&str]) -> Output {
    build_jobs();
    Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(args)
        .env("MVM_LAB_DIR", dir.join("lab"))
        .env("MVM_CACHE_DIR", dir.join("cache"))
        .env_remove("MVM_BROKER")
        .current_dir(root())
        .output()
        .expect("mvm runs")
}

/// A lab in a temporary directory, brought down on drop.
pub(crate) struct Lab {
    pub(crate) dir: tempfile::TempDir,
}

impl Lab {
    pub(crate) fn up(nodes: u32) -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = json(&mvm(
            dir.path(),
            &["lab", "up", "--nodes", &nodes.to_string(), "-o", "json"],
        ));
        assert_eq!(v["superpeers"], 3, "{v}");
        Lab { dir }
    }

    pub(crate) fn mvm(&self, args: &[&str]) -> Output {
        mvm(self.dir.path(), args)
    }

    /// The C pipeline of 4 vertices over `count` items on `nodes` nodes, as profile
    /// `NAME.toml` with `extra` at its end.
    pub(crate) fn pipeline(&self, name: &str, count: u64, nodes: u32, extra: &str) -> PathBuf {
        self.profile(
            &format!("{name}.toml"),
            &format!(
                "name = \"{name}\"\ntopology = \"ROOT/topologies/pipeline-4.dot\"\n[components]\nsource = \"ROOT/jobs/build/pipe_source.wasm\"\nstage = \"ROOT/jobs/build/pipe_stage.wasm\"\nsink = \"ROOT/jobs/build/pipe_sink.wasm\"\n[parameters]\ncount = {count}\nfactor = 3\n[requirements]\nnodes = {nodes}\n[limits]\nwall = \"300s\"\n{extra}"
            ),
        )
    }

    /// Submits `profile` and waits for its end: done; its status.
    fn finished(&self, profile: &Path) -> serde_json::Value {
        let p = profile.to_str().expect("utf-8");
        let v = json(&self.mvm(&["submit", "--wait", p, "-o", "json"]));
        assert_eq!(v["state"], "done", "{v}");
        v
    }

    /// Writes a profile into the lab's directory, with paths made absolute.
    pub(crate) fn profile(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        let text = text.replace("ROOT", &root().display().to_string());
        std::fs::write(&p, text).expect("write profile");
        p
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.mvm(&["lab", "down"]);
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

pub(crate) fn status(lab: &Lab, job: &str) -> serde_json::Value {
    let v = json(&lab.mvm(&["status", job, "-o", "json"]));
    v.as_array().expect("list")[0].clone()
}

pub(crate) fn wait_state(
    lab: &Lab,
    job: &str,
    pred: impl Fn(&str) -> bool,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s = status(lab, job);
        if pred(s["state"].as_str().expect("state")) {
            return s;
        }
        assert!(Instant::now() < deadline, "job {job} still {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Items that moved between the job's vertices, by its status.
pub(crate) fn items_moved(v: &serde_json::Value) -> u64 {
    v["traffic"]
        .as_array()
        .expect("traffic")
        .iter()
        .map(|t| t["items"].as_u64().expect("items"))
        .sum()
}

#[test]
fn an_fft_butterfly_runs_across_three_node_processes_and_matches_a_direct_dft() {
    let lab = Lab::up(3);
    let out = lab.mvm(&["submit", "--wait", "examples/fft8.toml", "-o", "json"]);
    let v = json(&out);
    assert_eq!(v["state"], "done");
    let parts = v["parts"].as_array().expect("parts");
    assert_eq!(parts.len(), 3, "vertices spread over every node: {v}");
    assert!(
        parts
            .iter()
            .all(|p| !p["vertices"].as_array().expect("v").is_empty())
    );
    let traffic = v["traffic"].as_array().expect("traffic");
    let remote: u64 = traffic
        .iter()
        .filter(|t| t["remote"] == true)
        .map(|t| t["items"].as_u64().expect("items"))
        .sum();
    let all: u64 = traffic
        .iter()
        .map(|t| t["items"].as_u64().expect("items"))
        .sum();
    // 8 sources + 3 stages of 4 butterflies sending 2 items each: 32 items in all.
    assert_eq!(all, 32, "{traffic:?}");
    assert!(remote > 0, "some channels cross nodes: {traffic:?}");
    // A lab's nodes link directly, in sealed records (the default): every remote item went
    // over a sealed direct link.
    assert!(
        traffic
            .iter()
            .filter(|t| t["remote"] == true)
            .all(|t| t["direct"] == true && t["sealed"] == true),
        "{traffic:?}"
    );
    let re = [1.0, 2.0, 0.5, -1.0, 0.0, 3.0, 2.5, 1.0];
    let im = [0.0, -0.5, 1.0, 0.0, 2.0, 0.0, -1.5, 0.25];
    let want = dft(&re, &im);
    let mut seen = 0;
    for (vertex, text) in v["outputs"].as_array().expect("outputs").iter().map(|o| {
        (
            o[0].as_str().expect("vertex").to_owned(),
            o[1].as_str().expect("text").to_owned(),
        )
    }) {
        if !vertex.starts_with("sink") {
            continue;
        }
        let f: Vec<f64> = text
            .split_whitespace()
            .map(|x| x.parse().expect("number"))
            .collect();
        let k = f[0] as usize;
        assert!(
            (f[1] - want[k].0).abs() < 1e-9 && (f[2] - want[k].1).abs() < 1e-9,
            "X[{k}] = {f:?}, want {:?}",
            want[k]
        );
        seen += 1;
    }
    assert_eq!(seen, 8);
}

#[test]
fn a_token_ring_crosses_nodes_and_status_and_bad_input_behave() {
    let lab = Lab::up(3);
    let p = lab.profile(
        "ring.toml",
        r#"name = "ring16"
topology = "ROOT/topologies/ring-8.dot"
[components]
token = "ROOT/jobs/wat/token.wat"
[parameters]
hops = 3000
[limits]
wall = "60s"
"#,
    );
    let v = json(&lab.mvm(&["submit", "--wait", p.to_str().expect("utf-8"), "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    let items = items_moved(&v);
    assert_eq!(items, 3000, "every hop is one item, counted once: {v}");
    let job = v["job"].as_str().expect("id").to_owned();
    // status knows it; cancel of an ended job is refused as bad input.
    assert_eq!(status(&lab, &job)["state"], "done");
    let out = lab.mvm(&["cancel", &job]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already ended"));
    let out = lab.mvm(&["status", "no-such-job"]);
    assert_eq!(out.status.code(), Some(2));
    // A profile whose topology names a component without a module: exit 2, file named.
    let bad = lab.profile(
        "bad.toml",
        r#"name = "bad"
topology = "ROOT/topologies/fft8-butterfly.dot"
[components]
source = "ROOT/jobs/wat/token.wat"
"#,
    );
    let out = lab.mvm(&["submit", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fft8-butterfly.dot:") && err.contains("butterfly"),
        "{err}"
    );
    // A rank expression that does not parse is refused before anything is sent.
    let bad = lab.profile(
        "rank.toml",
        r#"name = "rank"
topology = "ROOT/topologies/ring-8.dot"
[components]
token = "ROOT/jobs/wat/token.wat"
[requirements]
rank = "free_slots +"
"#,
    );
    let out = lab.mvm(&["submit", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rank.toml: rank expression"));
    // Requirements nobody meets: the broker says why for each node.
    let bad = lab.profile(
        "arch.toml",
        r#"name = "arch"
topology = "ROOT/topologies/ring-8.dot"
[components]
token = "ROOT/jobs/wat/token.wat"
[requirements]
arch = "riscv64"
"#,
    );
    let out = lab.mvm(&["submit", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node node0") && err.contains("riscv64"),
        "{err}"
    );
}

/// Without retries (`retries = 0`), a node killed mid-job fails the job, naming it.
#[test]
fn a_node_killed_mid_job_fails_the_job_and_the_next_job_runs_on_the_others() {
    let lab = Lab::up(3);
    let p = lab.profile(
        "long.toml",
        r#"name = "long"
topology = "ROOT/topologies/ring-8.dot"
retries = 0
[components]
token = "ROOT/jobs/wat/token.wat"
[parameters]
hops = 1000000000
[limits]
wall = "300s"
"#,
    );
    let v = json(&lab.mvm(&["submit", p.to_str().expect("utf-8"), "-o", "json"]));
    let job = v["job"].as_str().expect("id").to_owned();
    wait_state(&lab, &job, |s| s == "running", Duration::from_secs(30));
    // node1, by the lab's own account of its daemons.
    let st = json(&lab.mvm(&["lab", "status", "-o", "json"]));
    let victim = st["daemons"]
        .as_array()
        .expect("daemons")
        .iter()
        .find(|d| d["name"] == "node1")
        .and_then(|d| d["pid"].as_u64())
        .expect("node1's pid");
    let killed = Instant::now();
    // SAFETY-free: kill(1) is enough here.
    let s = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(s.success());
    let s = wait_state(&lab, &job, |s| s != "running", Duration::from_secs(30));
    assert_eq!(s["state"], "failed", "{s}");
    let error = s["error"].as_str().expect("error");
    assert!(error.contains("node"), "{error}");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "failed within the heartbeat bound"
    );
    // The lost node is marked so, and a new job runs on the two others.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let g = json(&lab.mvm(&["lab", "status", "-o", "json"]));
        let lost = g["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter(|n| n["lost"] == true)
            .count();
        let used: u64 = g["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["vertices"].as_u64().expect("n"))
            .sum();
        if lost == 1 {
            assert_eq!(used, 0, "no slot stays reserved by the failed job: {g}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed node is never marked lost: {g}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = json(&lab.mvm(&["submit", "--wait", "examples/ring.toml", "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["parts"].as_array().expect("parts").len(), 2);
}

/// With the default retries, a node killed (`SIGKILL`) mid-job has the job run again from its
/// start on the nodes left: it ends with the output and traffic of an undisturbed run, and
/// its status says what was restarted.
#[test]
fn a_node_killed_mid_job_has_its_job_run_again_on_the_others_with_an_undisturbed_output() {
    let lab = Lab::up(3);
    let hops = 300_000u64;
    let p = lab.profile(
        "again.toml",
        &format!(
            "name = \"again\"\ntopology = \"ROOT/topologies/ring-8.dot\"\n[components]\ntoken = \"ROOT/jobs/wat/token.wat\"\n[parameters]\nhops = {hops}\n[requirements]\nnodes = 2\n[limits]\nwall = \"120s\"\n"
        ),
    );
    let path = p.to_str().expect("utf-8");
    let v = json(&lab.mvm(&["submit", path, "-o", "json"]));
    let job = v["job"].as_str().expect("id").to_owned();
    let s = wait_state(&lab, &job, |s| s == "running", Duration::from_secs(30));
    let victim = kill_a_node_of(&lab, &s);
    let end = done_in_its_second_run(&lab, &job);
    assert_eq!(end["restarts"].as_array().map(Vec::len), Some(1), "{end}");
    assert!(
        end["parts"]
            .as_array()
            .expect("parts")
            .iter()
            .all(|p| p["name"] != victim.as_str()),
        "{end}"
    );
    assert_eq!(items_moved(&end), hops, "every hop is one item: {end}");
    let text = String::from_utf8_lossy(&lab.mvm(&["status", &job]).stdout).into_owned();
    assert!(text.contains("(run 2)"), "{text}");
    // The same job undisturbed gives the same outputs.
    let quiet = lab.finished(Path::new(path));
    assert_eq!(end["outputs"], quiet["outputs"]);
    same_traffic(&end, &quiet);
}

/// Waits for `job`'s end: done, in its second run; its status.
fn done_in_its_second_run(lab: &Lab, job: &str) -> serde_json::Value {
    let end = wait_state(
        lab,
        job,
        |s| s == "done" || s == "failed",
        Duration::from_secs(90),
    );
    assert_eq!(
        (&end["state"], &end["attempt"]),
        (&"done".into(), &1.into()),
        "{end}"
    );
    end
}

/// Kills (`SIGKILL`) the node of the first part of job `s`, by the lab's account of its
/// daemons; its name.
pub(crate) fn kill_a_node_of(lab: &Lab, s: &serde_json::Value) -> String {
    let victim = s["parts"][0]["name"]
        .as_str()
        .expect("a part's node")
        .to_owned();
    let st = json(&lab.mvm(&["lab", "status", "-o", "json"]));
    let pid = st["daemons"]
        .as_array()
        .expect("daemons")
        .iter()
        .find(|d| d["name"] == victim.as_str())
        .and_then(|d| d["pid"].as_u64())
        .unwrap_or_else(|| panic!("{victim}'s pid in {st}"));
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
    victim
}

/// A pipeline that asks for checkpoints: `mvm checkpoint` takes one at once, a node killed
/// (`SIGKILL`) after it has the job restored from its newest checkpoint on the nodes left, and
/// the job ends with an undisturbed run's output; `mvm status` lists the restart and the
/// checkpoints.
#[test]
fn a_node_killed_after_a_checkpoint_has_its_job_restored_from_it_with_an_undisturbed_output() {
    build_jobs();
    let lab = Lab::up(3);
    let profile = |name: &str, checkpoint: &str| lab.pipeline(name, 400_000, 2, checkpoint);
    let saved = profile("saved", "[checkpoint]\ninterval = \"1s\"\nkeep = 2\n");
    let v = json(&lab.mvm(&["submit", saved.to_str().expect("utf-8"), "-o", "json"]));
    let job = v["job"].as_str().expect("id").to_owned();
    wait_state(&lab, &job, |s| s == "running", Duration::from_secs(30));
    let out = lab.mvm(&["checkpoint", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("stored"), "{said}");
    let s = status(&lab, &job);
    assert_eq!(s["state"], "running", "{s}");
    let cut = s["checkpoints"]
        .as_array()
        .and_then(|c| c.last())
        .and_then(|c| c["cut"].as_u64())
        .unwrap_or_else(|| panic!("a checkpoint listed: {s}"));
    kill_a_node_of(&lab, &s);
    let end = done_in_its_second_run(&lab, &job);
    let from = end["restarts"][0]["from_cut"].as_u64();
    assert!(from.is_some_and(|f| f >= cut), "{end}");
    let text = String::from_utf8_lossy(&lab.mvm(&["status", &job]).stdout).into_owned();
    assert!(text.contains("restarted from checkpoint"), "{text}");
    let plain = profile("plain", "");
    let quiet = lab.finished(&plain);
    assert_eq!(end["outputs"], quiet["outputs"]);
    same_traffic(&end, &quiet);
    // A job that did not ask for checkpoints gets none.
    let out = lab.mvm(&["checkpoint", quiet["job"].as_str().expect("id")]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not ask"));
}

/// Runs a job (`body`: its profile without name and checkpoints, over 3 nodes) with checkpoints
/// in a lab of 4 node processes, and disturbs it: when `migrate`, moves its second part to the
/// free node while it runs; takes a checkpoint with `mvm checkpoint`; kills (`SIGKILL`) the
/// node of its first part. The job ends in its second run, restored from that checkpoint or a
/// later one, with the output of an undisturbed run of the same job without checkpoints and
/// the same items on every edge and port.
fn disturbed_run_ends_as_an_undisturbed_one(lab: &Lab, body: &str, migrate: bool) {
    let profile = |name: &str, extra: &str| {
        lab.profile(
            &format!("{name}.toml"),
            &format!("name = \"{name}\"\n{body}\n[limits]\nwall = \"300s\"\n{extra}"),
        )
    };
    let saved = profile("saved", "[checkpoint]\ninterval = \"1s\"\n");
    let plain = profile("plain", "");
    let v = json(&lab.mvm(&["submit", saved.to_str().expect("utf-8"), "-o", "json"]));
    let job = v["job"].as_str().expect("id").to_owned();
    let s = wait_state(lab, &job, |s| s == "running", Duration::from_secs(30));
    if migrate {
        let on: Vec<&str> = (s["parts"].as_array().expect("parts").iter())
            .map(|p| p["name"].as_str().expect("name"))
            .collect();
        let free = ["node0", "node1", "node2", "node3"]
            .into_iter()
            .find(|n| !on.contains(n))
            .expect("a node without a part");
        let vertex = s["parts"][1]["vertices"][0].as_str().expect("a vertex");
        let out = lab.mvm(&["migrate", &job, "--vertex", vertex, "--to", free]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = status(lab, &job);
        assert_eq!(s["state"], "running", "moved while it ran: {s}");
        assert_eq!(s["parts"][1]["name"], free, "{s}");
    }
    let out = lab.mvm(&["checkpoint", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(lab, &job);
    assert_eq!(
        s["state"], "running",
        "the job outlived its checkpoint: {s}"
    );
    let cut = (s["checkpoints"].as_array().and_then(|c| c.last()))
        .and_then(|c| c["cut"].as_u64())
        .unwrap_or_else(|| panic!("a checkpoint listed: {s}"));
    kill_a_node_of(lab, &s);
    let end = done_in_its_second_run(lab, &job);
    let from = end["restarts"][0]["from_cut"].as_u64();
    assert!(
        from.is_some_and(|f| f >= cut),
        "restored from a checkpoint: {end}"
    );
    let quiet = lab.finished(&plain);
    assert_eq!(end["outputs"], quiet["outputs"]);
    same_traffic(&end, &quiet);
}

/// A streaming FFT (the 8-point butterfly network over 40,000 frames) over 3 of 4 node
/// processes, with checkpoints: a node killed (`SIGKILL`) after a checkpoint has the job
/// restored from it on the nodes left, and it ends as an undisturbed run does, edge by edge.
#[test]
fn a_streaming_fft_killed_after_a_checkpoint_ends_as_an_undisturbed_run_edge_by_edge() {
    build_jobs();
    let lab = Lab::up(4);
    let body = "topology = \"ROOT/topologies/fft8-butterfly.dot\"\n[components]\nsource = \"ROOT/jobs/build/fft_source.wasm\"\nbutterfly = \"ROOT/jobs/build/fft_butterfly.wasm\"\nsink = \"ROOT/jobs/build/fft_sink.wasm\"\n[parameters]\ninput = [1.0, 2.0, 0.5, -1.0, 0.0, 3.0, 2.5, 1.0]\ninput_im = [0.0, -0.5, 1.0, 0.0, 2.0, 0.0, -1.5, 0.25]\nframes = 40000\n[requirements]\nnodes = 3";
    disturbed_run_ends_as_an_undisturbed_one(&lab, body, false);
}

/// A ring of 8 vertices passing a token 100,000 hops over 3 of 4 node processes, with
/// checkpoints: its second part migrated to the free node while it runs, then a node killed
/// (`SIGKILL`) after a checkpoint. It ends as an undisturbed run does, edge by edge.
#[test]
fn a_ring_migrated_then_killed_after_a_checkpoint_ends_as_an_undisturbed_run_edge_by_edge() {
    let lab = Lab::up(4);
    let body = "topology = \"ROOT/topologies/ring-8.dot\"\n[components]\ntoken = \"ROOT/jobs/wat/token.wat\"\n[parameters]\nhops = 100000\n[requirements]\nnodes = 3";
    disturbed_run_ends_as_an_undisturbed_one(&lab, body, true);
}

/// A pipeline that asks for checkpoints, in three parts over three of four node processes:
/// `mvm migrate` moves its second part to the fourth node while it runs, and `mvm node drain`
/// moves its first part off its node (to the node the second part left), which then takes no
/// new job until `mvm node undrain`. The job ends with an undisturbed run's output and
/// traffic, edge by edge, and `mvm status` lists both moves.
#[test]
fn a_part_migrated_and_a_node_drained_while_a_pipeline_runs_give_an_undisturbed_output() {
    build_jobs();
    let lab = Lab::up(4);
    let profile = |name: &str, checkpoint: &str| lab.pipeline(name, 1_500_000, 3, checkpoint);
    // Interval checkpoints far apart: a move waits for none.
    let moving = profile("moving", "[checkpoint]\ninterval = \"120s\"\n");
    let v = json(&lab.mvm(&["submit", moving.to_str().expect("utf-8"), "-o", "json"]));
    let job = v["job"].as_str().expect("id").to_owned();
    let s = wait_state(&lab, &job, |s| s == "running", Duration::from_secs(30));
    let names = |s: &serde_json::Value| -> Vec<String> {
        s["parts"]
            .as_array()
            .expect("parts")
            .iter()
            .map(|p| p["name"].as_str().expect("name").to_owned())
            .collect()
    };
    let before = names(&s);
    let free = ["node0", "node1", "node2", "node3"]
        .into_iter()
        .find(|n| !before.iter().any(|b| b == n))
        .expect("a node without a part");
    let second = s["parts"][1]["vertices"][0]
        .as_str()
        .expect("a vertex")
        .to_owned();

    // Bad moves are refused and change nothing.
    let out = lab.mvm(&["migrate", &job, "--vertex", "nope", "--to", free]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no vertex 'nope'"));
    let out = lab.mvm(&["migrate", &job, "--vertex", &second, "--to", &before[0]]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("runs a part"));

    let out = lab.mvm(&[
        "migrate", &job, "--vertex", &second, "--to", free, "-o", "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = json(&out);
    assert_eq!(moved["moves"].as_array().map(Vec::len), Some(1), "{moved}");
    let s = status(&lab, &job);
    assert_eq!(s["state"], "running", "moved while it ran: {s}");
    let after = |a: &str| vec![a.to_owned(), free.to_owned(), before[2].clone()];
    assert_eq!(names(&s), after(&before[0]), "{s}");

    // Draining the first part's node moves that part to the node the second part left.
    let out = lab.mvm(&["node", "drain", &before[0], "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drained = json(&out);
    assert_eq!(
        drained["moves"].as_array().map(Vec::len),
        Some(1),
        "{drained}"
    );
    let s = status(&lab, &job);
    assert_eq!(names(&s), after(&before[1]), "{s}");
    let text = String::from_utf8_lossy(&lab.mvm(&["status", &job]).stdout).into_owned();
    assert_eq!(text.matches("moved from").count(), 2, "{text}");

    // The drained node takes no new job; undrained, it does again.
    let plain = profile("plain", "");
    let plain = plain.to_str().expect("utf-8");
    let quiet = lab.finished(Path::new(plain));
    assert!(!names(&quiet).contains(&before[0]), "{quiet}");
    let out = lab.mvm(&["node", "undrain", &before[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let end = wait_state(
        &lab,
        &job,
        |s| s == "done" || s == "failed",
        Duration::from_secs(240),
    );
    assert_eq!(
        (&end["state"], &end["attempt"]),
        (&"done".into(), &0.into()),
        "{end}"
    );
    assert_eq!(end["outputs"], quiet["outputs"]);
    same_traffic(&end, &quiet);
    assert_eq!(end["moves"].as_array().map(Vec::len), Some(2), "{end}");
    // A job that did not ask for checkpoints cannot move.
    let out = lab.mvm(&[
        "migrate",
        quiet["job"].as_str().expect("id"),
        "--vertex",
        "p0",
        "--to",
        free,
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not ask"),
        "{out:?}"
    );
}

#[test]
fn the_demo_verifies_its_results_and_leaves_nothing_behind_also_when_interrupted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = mvm(tmp.path(), &["lab", "demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified: all 8 values match"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lab_dir = stderr
        .split(['(', ')'])
        .find(|s| s.contains("mvm-demo-"))
        .expect("the demo names its directory")
        .to_owned();
    assert!(!Path::new(&lab_dir).exists(), "{lab_dir} removed");
    assert!(no_process_mentions(&lab_dir), "no daemon of {lab_dir} left");
    // Interrupted with SIGINT once the lab is up: exit 130, nothing left.
    build_jobs();
    let child = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["lab", "demo", "--profile", "examples/fft16.toml"])
        .env("MVM_CACHE_DIR", tmp.path().join("cache"))
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    // Wait until its daemons are up (they mention its directory), then interrupt.
    let deadline = Instant::now() + Duration::from_secs(30);
    let dir = loop {
        if let Some(d) = demo_dirs()
            .into_iter()
            .find(|d| !no_process_mentions(d) && d != &lab_dir)
        {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "the demo's daemons never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let s = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(s.success());
    let out = child.wait_with_output().expect("wait");
    let status = out.status;
    // Either interrupted (130) or, on a fast machine, already done (0); never a leftover.
    assert!(
        matches!(status.code(), Some(130) | Some(0)),
        "{status:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !no_process_mentions(&dir) {
        assert!(Instant::now() < deadline, "daemons of {dir} left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!Path::new(&dir).exists(), "{dir} removed");
}

/// The demo directories in the temporary directory.
fn demo_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("mvm-demo-"))
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether no live process has `needle` in its command line.
fn no_process_mentions(needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && cmd.windows(needle.len()).any(|w| w == needle.as_bytes())
            && alive(pid)
        {
            return false;
        }
    }
    true
}

/// The user's own bank account and its balance.
fn own_account(lab: &Lab) -> (String, serde_json::Value) {
    let v = json(&lab.mvm(&["bank", "balance", "-o", "json"]));
    let a = &v["accounts"][0];
    (a[0].as_str().expect("account").to_owned(), a[1].clone())
}

#[test]
fn a_killed_leading_super_peer_is_replaced_and_a_running_job_completes_with_the_history_kept() {
    let lab = Lab::up(3);
    // Credits from before: minted, and some moved to another account.
    let (me, _) = own_account(&lab);
    let bob = format!("bob@{}", me.rsplit('@').next().expect("domain"));
    let mint = [
        "bank",
        "mint",
        me.as_str(),
        "100",
        "--request-id",
        "m1",
        "-o",
        "json",
    ];
    json(&lab.mvm(&mint));
    let give = [
        "bank",
        "transfer",
        bob.as_str(),
        "30.5",
        "--request-id",
        "t1",
        "-o",
        "json",
    ];
    let t = json(&lab.mvm(&give));
    let seq = t["transactions"][0]["seq"].clone();
    let over = lab.mvm(&["bank", "transfer", &bob, "70"]);
    assert_eq!(over.status.code(), Some(2), "more than the 69.5 left");
    assert!(String::from_utf8_lossy(&over.stderr).contains("less than"));
    // A job from before, in the job log.
    let before = json(&lab.mvm(&["submit", "--wait", "examples/fft8.toml", "-o", "json"]));
    assert_eq!(before["state"], "done", "{before}");
    let first = before["job"].as_str().expect("job").to_owned();
    // A long job over the three nodes.
    let hops = 600_000u64;
    let p = lab.profile(
        "long.toml",
        &format!(
            "name = \"long\"\ntopology = \"ROOT/topologies/ring-8.dot\"\n[components]\ntoken = \"ROOT/jobs/wat/token.wat\"\n[parameters]\nhops = {hops}\n[requirements]\nnodes = 3\n[limits]\nwall = \"120s\"\n"
        ),
    );
    let v = json(&lab.mvm(&["submit", p.to_str().expect("utf-8"), "-o", "json"]));
    let long = v["job"].as_str().expect("job").to_owned();
    wait_state(&lab, &long, |s| s == "running", Duration::from_secs(20));
    // The lab says which super-peer leads; kill it.
    let st = json(&lab.mvm(&["lab", "status", "-o", "json"]));
    let daemons = st["daemons"].as_array().expect("daemons");
    let leader = daemons
        .iter()
        .find(|d| d["role"] == "leader")
        .unwrap_or_else(|| panic!("no leader in {st}"));
    assert_eq!(
        daemons.iter().filter(|d| d["role"] == "replica").count(),
        2,
        "{st}"
    );
    let pid = leader["pid"].as_u64().expect("pid").to_string();
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .expect("kill")
            .success()
    );
    // Another replica leads within a bounded time, and the job goes on to its right end.
    let deadline = Instant::now() + Duration::from_secs(20);
    let next = loop {
        let out = lab.mvm(&["lab", "status", "-o", "json"]);
        if out.status.success() {
            let g: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            if let Some(d) = g["daemons"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["role"] == "leader"))
                .filter(|d| d["peer"] != leader["peer"])
            {
                break d.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new leader: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "{} leads {:?} after the kill",
        next["name"],
        killed.elapsed()
    );
    let end = wait_state(
        &lab,
        &long,
        |s| s != "running" && s != "preparing",
        Duration::from_secs(90),
    );
    assert_eq!(end["state"], "done", "{end}");
    assert_eq!(items_moved(&end), hops, "every hop is one item: {end}");
    // The history from before the kill is still there.
    let all = json(&lab.mvm(&["status", "-o", "json"]));
    let ids: Vec<&str> = all
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|j| j["job"].as_str())
        .collect();
    assert!(
        ids.contains(&first.as_str()) && ids.contains(&long.as_str()),
        "{all}"
    );
    // And new jobs run.
    let v = json(&lab.mvm(&["submit", "--wait", "examples/fft8.toml", "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    // The bank kept every credit, and the same transfer again is not applied twice.
    let again = json(&lab.mvm(&give));
    assert_eq!(again["transactions"][0]["seq"], seq, "{again}");
    json(&lab.mvm(&mint));
    let (_, left) = own_account(&lab);
    assert_eq!(left, 69_500_000, "micro-credits");
    let all = json(&lab.mvm(&["bank", "balance", "--all", "-o", "json"]));
    let total: u64 = all["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .map(|a| a[1].as_u64().expect("balance"))
        .sum();
    assert_eq!(total, 100_000_000, "credits only moved: {all}");
}

#[test]
fn the_demo_runs_over_quic_and_libp2p_streams_too() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let v = json(&mvm(
        tmp.path(),
        &[
            "lab",
            "demo",
            "--transport",
            "quic",
            "--links",
            "streams",
            "-o",
            "json",
        ],
    ));
    assert_eq!(v["verified"], true, "{v}");
    assert!(v["problems"].as_array().expect("problems").is_empty());
    assert_eq!(v["status"]["parts"].as_array().expect("parts").len(), 3);
    // Every remote item went over a libp2p stream (QUIC here), none over a direct link.
    let traffic = v["status"]["traffic"].as_array().expect("traffic");
    assert!(traffic.iter().any(|t| t["remote"] == true), "{v}");
    assert!(traffic.iter().all(|t| t["direct"] != true), "{v}");
}

#[test]
fn one_part_jobs_end_the_same_within_the_nodes_hold_and_after_it() {
    // `submit --wait` without a terminal takes one exchange: the broker answers at the job's
    // end, and a node answers the broker's prepare with the part's report when the part ends
    // within its hold (50 ms), or reports by itself later. Both ways must give the same result.
    let lab = Lab::up(2);
    let ring = |name: &str, hops: u64| {
        lab.profile(
            &format!("{name}.toml"),
            &format!(
                "name = \"{name}\"\ntopology = \"ROOT/topologies/ring-8.dot\"\n[components]\ntoken = \"ROOT/jobs/wat/token.wat\"\n[parameters]\nhops = {hops}\n[requirements]\nnodes = 1\n[limits]\nwall = \"60s\"\n"
            ),
        )
    };
    for (name, hops) in [("short", 80), ("long", 400_000)] {
        let p = ring(name, hops);
        let v = json(&lab.mvm(&["submit", "--wait", p.to_str().expect("utf-8"), "-o", "json"]));
        assert_eq!(v["state"], "done", "{name}: {v}");
        assert_eq!(v["parts"].as_array().map(Vec::len), Some(1), "{name}: {v}");
        let items = items_moved(&v);
        assert_eq!(items, hops, "{name}: every hop is one item: {v}");
        if name == "long" {
            assert!(
                v["wall_ms"].as_u64().is_some_and(|ms| ms > 50),
                "the long job must outlast the hold to test the later report: {v}"
            );
        }
    }
    // A part that fails within the hold fails the job, naming the vertex.
    let dir = lab.dir.path();
    std::fs::write(
        dir.join("trap.wat"),
        r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
    )
    .expect("write");
    std::fs::write(
        dir.join("one.dot"),
        "digraph one { lonely [component=\"trap\"]; }\n",
    )
    .expect("write");
    let p = lab.profile(
        "trap.toml",
        &format!(
            "name = \"trap\"\ntopology = \"{}\"\n[components]\ntrap = \"{}\"\n",
            dir.join("one.dot").display(),
            dir.join("trap.wat").display()
        ),
    );
    let out = lab.mvm(&["submit", "--wait", p.to_str().expect("utf-8"), "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json status");
    assert_eq!(v["state"], "failed", "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("lonely") && e.contains("unreachable")),
        "{v}"
    );
}

/// `GET path` from `url`'s host (`http://ADDR/…`): the status line and the body.
pub(crate) fn http_get(url: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let addr = url
        .strip_prefix("http://")
        .and_then(|u| u.split('/').next())
        .expect("an http URL");
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// The value of the first sample of `metric` whose line contains every one of `having`.
pub(crate) fn sample(text: &str, metric: &str, having: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .find(|l| having.iter().all(|h| l.contains(h)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_labs_daemons_serve_prometheus_metrics_of_jobs_and_of_running_queues() {
    let lab = Lab::up(2);
    let st = json(&lab.mvm(&["lab", "status", "-o", "json"]));
    let daemons = st["daemons"].as_array().expect("daemons");
    let url = |role: &str| -> Vec<String> {
        daemons
            .iter()
            .filter(|d| d["role"] == role)
            .map(|d| d["metrics"].as_str().expect("a metrics address").to_owned())
            .collect()
    };
    let (leader, replicas, nodes) = (url("leader"), url("replica"), url("node"));
    // The leader's web view, at `http`; without a session it answers nothing.
    let web = st["http"]
        .as_str()
        .expect("the leader's web view")
        .to_owned();
    let leader_daemon = daemons
        .iter()
        .find(|d| d["role"] == "leader")
        .expect("a leader");
    assert_eq!(leader_daemon["http"], web.as_str(), "{st}");
    let (status, _) = http_get(&web, "/api/view");
    assert!(status.contains("401"), "{status}");
    assert_eq!(
        (leader.len(), replicas.len(), nodes.len()),
        (1, 2, 2),
        "{st}"
    );

    // A running pipeline's queues on its nodes, counting on between scrapes.
    let p = lab.pipeline("metered", 50_000_000, 2, "");
    let v = json(&lab.mvm(&["submit", p.to_str().expect("utf-8"), "-o", "json"]));
    let job = v["job"].as_str().expect("id").to_owned();
    wait_state(&lab, &job, |s| s == "running", Duration::from_secs(60));
    let label = format!("job=\"{job}");
    let items = |url: &str| {
        let (status, text) = http_get(url, "/metrics");
        assert!(status.contains("200"), "{status}");
        text.lines()
            .filter(|l| l.starts_with("mvm_queue_items_in") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let first: f64 = loop {
        let n: f64 = nodes.iter().map(|u| items(u)).sum();
        if n > 0.0 {
            break n;
        }
        assert!(Instant::now() < deadline, "no queue of {job} counted items");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(500));
    let later: f64 = nodes.iter().map(|u| items(u)).sum();
    assert!(
        later > first,
        "items in {job}'s queues: {first}, then {later}"
    );
    let (_, text) = http_get(&nodes[0], "/metrics");
    assert!(
        text.contains("# TYPE mvm_queue_depth gauge") && text.ends_with("# EOF\n"),
        "{text}"
    );
    let out = lab.mvm(&["cancel", &job]);
    assert!(out.status.success(), "{out:?}");

    // The leader counts the job by state; only the leader leads.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = http_get(&leader[0], "/metrics");
        // The nodes' probes as the embedded monitoring policy runs them (from its first
        // heartbeats after a node has its policies).
        let probes = ["load", "free_memory", "vertices", "queue_depth"]
            .iter()
            .all(|probe| {
                let p = format!("probe=\"{probe}\"");
                ["node0", "node1"].iter().all(|n| {
                    let node = format!("node=\"{n}\"");
                    sample(&text, "mvm_probe", &[&node, &p]).is_some()
                })
            });
        if sample(&text, "mvm_jobs", &["state=\"cancelled\""]) == Some(1.0) && probes {
            assert_eq!(sample(&text, "mvm_log_leader", &[]), Some(1.0), "{text}");
            // The scheduling policy in force: the default, as no rule chooses one.
            assert_eq!(
                sample(&text, "mvm_scheduling_policy", &["policy=\"rank\""]),
                Some(1.0),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the leader's jobs: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for r in &replicas {
        let (_, text) = http_get(r, "/metrics");
        assert_eq!(sample(&text, "mvm_log_leader", &[]), Some(0.0), "{text}");
    }
    // A job that ends: its start is timed, its placement counted under the policy in force,
    // its edges' items counted by kind; the policy engine counts its answers.
    let p = lab.pipeline("short", 1000, 2, "");
    let out = lab.mvm(&["submit", "--wait", p.to_str().expect("utf-8"), "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let (_, text) = http_get(&leader[0], "/metrics");
    assert!(
        sample(&text, "mvm_job_start_seconds_count", &[]) >= Some(2.0),
        "{text}"
    );
    assert!(
        sample(&text, "mvm_placements_total", &["policy=\"rank\""]) >= Some(2.0),
        "{text}"
    );
    let items: f64 = text
        .lines()
        .filter(|l| l.starts_with("mvm_edge_items_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        items >= 3000.0,
        "a pipeline of 4 vertices carries 1000 items on 3 edges: {text}"
    );
    assert!(
        sample(&text, "mvm_policy_decisions_total", &["answer=\"allow\""]) > Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, "mvm_policy_cache_total", &["result=\"miss\""]) > Some(0.0),
        "{text}"
    );
    for name in [
        "mvm_checkpoints_total",
        "mvm_moves_total",
        "mvm_policy_version",
    ] {
        assert!(sample(&text, name, &[]).is_some(), "{name}: {text}");
    }
    // Only /metrics is served.
    let (status, _) = http_get(&nodes[0], "/other");
    assert!(status.contains("404"), "{status}");
}
