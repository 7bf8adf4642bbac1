//! Daemons on separate hosts: network namespaces joined by veth links to a bridge (root only,
//! as on the CI machine). A job runs across them; then one node's link is cut mid-job. And a
//! checkpoint's files go up over a link held slow with `tc`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::run::{build_jobs, json, root, same_traffic};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces `<tag>-br` (a bridge) and one per host, each with a veth to the bridge.
struct Hosts {
    tag: String,
    hosts: Vec<String>,
    subnet: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Hosts {
    fn new(n: usize) -> Hosts {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        assert_eq!(uid, 0, "this test needs root (ip netns)");
        // Tests of one process run at once: each set of hosts has its own names.
        static SETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = std::process::id() % 10_000;
        let set = SETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("mvm{id}s{set}");
        let subnet = format!("10.231.{}", id % 250);
        let mut h = Hosts {
            tag: tag.clone(),
            hosts: Vec::new(),
            subnet: subnet.clone(),
            children: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let br = format!("{tag}-br");
        ip(&["netns", "add", &br]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{tag}-h{i}");
            ip(&["netns", "add", &ns]);
            h.hosts.push(ns.clone());
            let (a, b) = (format!("{tag}h{i}"), format!("{tag}b{i}"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
            ip(&["link", "set", &a, "netns", &ns]);
            ip(&["link", "set", &b, "netns", &br]);
            ip(&["-n", &br, "link", "set", &b, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{subnet}.{}/24", i + 1),
                "dev",
                &a,
            ]);
            ip(&["-n", &ns, "link", "set", &a, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        h
    }

    fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// Cuts host `i`'s link (its bridge port goes down).
    fn cut(&self, i: usize) {
        self.link(i, "down");
    }

    /// Joins host `i`'s link again.
    fn heal(&self, i: usize) {
        self.link(i, "up");
    }

    fn link(&self, i: usize, state: &str) {
        ip(&[
            "-n",
            &format!("{}-br", self.tag),
            "link",
            "set",
            &format!("{}b{i}", self.tag),
            state,
        ]);
    }

    fn mvm(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i], env!("CARGO_BIN_EXE_mvm")])
            .args(args)
            .env("MVM_CACHE_DIR", self.dir.path().join("cache"))
            .env("MVM_LAB_DIR", self.dir.path().join("lab"))
            .env_remove("MVM_BROKER")
            .current_dir(root());
        c
    }

    fn run(&self, i: usize, args: &[&str]) -> Output {
        self.mvm(i, args).output().expect("mvm runs")
    }

    /// Starts a daemon on host `i`; its dial address (TCP) once it listens.
    fn daemon(&mut self, i: usize, args: &[&str]) -> String {
        let mut cmd = self.mvm(i, args);
        let listen = format!("/ip4/{}/tcp/0", self.addr(i));
        let (child, addr) = spawn_daemon(&mut cmd, self.dir.path(), &format!("d{i}"), &listen);
        self.children.push(child);
        addr
    }
}

/// Starts a daemon (`cmd` is `mvm node …` or `mvm superpeer …`, perhaps behind `ip netns
/// exec`) named `name` with its state, log and address file in `dir`, listening on `listen`,
/// with lab timings; the process and its first dial address once it listens.
pub(crate) fn spawn_daemon(
    cmd: &mut Command,
    dir: &Path,
    name: &str,
    listen: &str,
) -> (Child, String) {
    let addr_file = dir.join(format!("{name}.addr"));
    let state: PathBuf = dir.join(name);
    let superpeer = cmd.get_args().any(|a| a == "superpeer");
    identity(dir, name, superpeer);
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let child = cmd
        .args([
            "--name",
            name,
            "--listen",
            listen,
            "--heartbeat-ms",
            "200",
            "--lost-after-ms",
            "1500",
        ])
        .arg("--dir")
        .arg(&state)
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("daemon starts");
    let addr = wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(&addr_file)
            .ok()
            .filter(|s| !s.is_empty())
    })
    .lines()
    .next()
    .expect("an address")
    .to_owned();
    (child, addr)
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self
            .hosts
            .iter()
            .chain(std::iter::once(&format!("{}-br", self.tag)))
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The test PKI in `dir`, made once: a CA of domain `lab` (`ca/`) and the user the CLI
/// uses by default (`lab/user`, role admin, as `mvm lab` makes it); then an identity for
/// daemon `name` in its state directory `dir/name` (role `superpeer` for a super-peer).
pub(crate) fn identity(dir: &Path, name: &str, superpeer: bool) {
    let mvm = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
            .args(args)
            .output()
            .expect("mvm runs");
        assert!(out.status.success(), "mvm {args:?}: {out:?}");
    };
    let path = |p: PathBuf| p.to_str().expect("utf-8").to_owned();
    let ca = path(dir.join("ca"));
    if !dir.join("ca/ca.crt").exists() {
        mvm(&["ca", "init", "--domain", "lab", "--dir", &ca]);
        let user = path(dir.join("lab/user"));
        mvm(&[
            "ca", "issue", "--ca", &ca, "--out", &user, "--roles", "admin", "user", "tester",
        ]);
    }
    if !dir.join(name).join("cert.pem").exists() {
        let out = path(dir.join(name));
        let mut args = vec!["ca", "issue", "--ca", &ca, "--out", &out, "node", name];
        if superpeer {
            args.extend(["--roles", "superpeer"]);
        }
        mvm(&args);
    }
}

pub(crate) fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn write_lab(dir: &Path, broker: &str) {
    std::fs::create_dir_all(dir.join("lab")).expect("lab dir");
    let info = serde_json::json!({ "broker": broker, "pids": [], "members": [] });
    std::fs::write(dir.join("lab/lab.json"), info.to_string()).expect("lab.json");
}

#[test]
fn nodes_in_separate_network_namespaces_run_a_job_and_survive_a_cut_link() {
    build_jobs();
    let mut h = Hosts::new(4);
    let broker = h.daemon(0, &["superpeer"]);
    assert!(broker.contains(&h.addr(0)), "{broker}");
    // Hosts 1 and 2 link directly across the veths (agreed over libp2p): sealed, since host 2
    // takes only sealed links (the default) though host 1 would take plain ones; host 3 takes
    // none, so its channels with them fall back to libp2p streams.
    for i in 1..4 {
        let mut args = vec!["node", "--bootstrap", &broker];
        match i {
            1 => args.extend(["--links", "plain"]),
            3 => args.extend(["--links", "streams"]),
            _ => {}
        }
        h.daemon(i, &args);
    }
    write_lab(h.dir.path(), &broker);
    let live = |h: &Hosts| -> Option<serde_json::Value> {
        let out = h.run(0, &["lab", "status", "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("json"))
    };
    wait_for(Duration::from_secs(30), || {
        live(&h).filter(|g| g["nodes"].as_array().is_some_and(|n| n.len() == 3))
    });
    // The FFT across three hosts, submitted from the super-peer's host: direct links and
    // streams in one job.
    let v = json(&h.run(0, &["submit", "--wait", "examples/fft8.toml", "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["parts"].as_array().expect("parts").len(), 3);
    let remote = |direct: bool| -> u64 {
        v["traffic"]
            .as_array()
            .expect("traffic")
            .iter()
            .filter(|t| t["remote"] == true && t["direct"] == direct)
            .map(|t| t["items"].as_u64().expect("items"))
            .sum()
    };
    assert!(remote(true) > 0, "hosts 1 and 2 linked directly: {v}");
    assert!(remote(false) > 0, "host 3 used libp2p streams: {v}");
    let direct: Vec<&serde_json::Value> = v["traffic"]
        .as_array()
        .expect("traffic")
        .iter()
        .filter(|t| t["direct"] == true)
        .collect();
    assert!(
        direct.iter().all(|t| t["sealed"] == true),
        "a plain link only when both ends take one: {v}"
    );
    // A long job with checkpoints, then the link of a host it runs on is cut for 10 s once one
    // is stored: within the heartbeat bound, the job's run is given up and it runs again on
    // the two other hosts from its checkpoint (its profile's default retries), and ends with
    // an undisturbed run's output and traffic, edge by edge; the part left on the host cut off
    // does not disturb it when the link is back.
    let profile = |name: &str, extra: &str| {
        let p = h.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = \"{name}\"\ntopology = \"{0}/topologies/pipeline-4.dot\"\n[components]\nsource = \"{0}/jobs/build/pipe_source.wasm\"\nstage = \"{0}/jobs/build/pipe_stage.wasm\"\nsink = \"{0}/jobs/build/pipe_sink.wasm\"\n[parameters]\ncount = 1500000\nfactor = 3\n[requirements]\nnodes = 2\n[limits]\nwall = \"300s\"\n{extra}",
                root().display()
            ),
        )
        .expect("profile");
        p
    };
    let long = profile("long", "[checkpoint]\ninterval = \"1s\"\n");
    let v = json(&h.run(0, &["submit", long.to_str().expect("utf-8"), "-o", "json"]));
    let job = v["job"].as_str().expect("job").to_owned();
    let state = |h: &Hosts| {
        let v = json(&h.run(0, &["status", &job, "-o", "json"]));
        v[0].clone()
    };
    let s = wait_for(Duration::from_secs(30), || {
        let s = state(&h);
        (s["state"] == "running" && s["checkpoints"].as_array().is_some_and(|c| !c.is_empty()))
            .then_some(s)
    });
    // The host of the job's first part (`dN`).
    let name = s["parts"][0]["name"]
        .as_str()
        .expect("a part's node")
        .to_owned();
    let victim: usize = name[1..].parse().expect("dN");
    let cut = Instant::now();
    h.cut(victim);
    let s = wait_for(Duration::from_secs(20), || {
        let s = state(&h);
        (s["state"] == "running" && s["attempt"] == 1).then_some(s)
    });
    assert!(
        cut.elapsed() < Duration::from_secs(10),
        "running again took {:?}",
        cut.elapsed()
    );
    let why = s["restarts"][0]["why"].as_str().unwrap_or_default();
    assert!(why.contains(&name), "names the node cut off: {s}");
    assert!(
        s["restarts"][0]["from_cut"].as_u64().is_some(),
        "from its checkpoint: {s}"
    );
    assert_eq!(s["parts"].as_array().map(Vec::len), Some(2), "{s}");
    assert!(
        s["parts"]
            .as_array()
            .expect("parts")
            .iter()
            .all(|p| p["name"] != name.as_str()),
        "{s}"
    );
    // The link comes back 10 s after the cut.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed()));
    h.heal(victim);
    let end = wait_for(Duration::from_secs(240), || {
        let s = state(&h);
        (s["state"] == "done" || s["state"] == "failed").then_some(s)
    });
    assert_eq!(end["state"], "done", "{end}");
    let quiet = profile("quiet", "");
    let quiet = json(&h.run(
        0,
        &[
            "submit",
            "--wait",
            quiet.to_str().expect("utf-8"),
            "-o",
            "json",
        ],
    ));
    assert_eq!(quiet["state"], "done", "{quiet}");
    assert_eq!(
        end["outputs"], quiet["outputs"],
        "the undisturbed run's output"
    );
    same_traffic(&end, &quiet);
    // The host cut off registers again, and the next job runs on all three.
    wait_for(Duration::from_secs(30), || {
        live(&h).filter(|g| {
            g["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 3 && n.iter().all(|x| x["lost"] == false))
        })
    });
    let v = json(&h.run(0, &["submit", "--wait", "examples/fft8.toml", "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["parts"].as_array().expect("parts").len(), 3, "{v}");
}

/// Writes `big.bin` (`chunks` × 64 KiB) in its sandbox, then yields (a pause point) for
/// `secs` seconds.
fn big_writer(chunks: u32, secs: u64) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "mvm" "yield" (func $yield))
  (memory (export "memory") 2)
  (data (i32.const 0) "big.bin")
  (func $now (result i64)
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 32))) (i64.load (i32.const 32)))
  (func (export "_start") (local $i i32) (local $end i64)
    (loop $fill
      (i32.store (i32.add (i32.const 65536) (local.get $i))
        (i32.mul (local.get $i) (i32.const 0x9e3779b1)))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br_if $fill (i32.lt_u (local.get $i) (i32.const 65536))))
    (drop (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 9)
      (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 100)))
    (i32.store (i32.const 108) (i32.const 65536))
    (i32.store (i32.const 112) (i32.const 65536))
    (local.set $i (i32.const 0))
    (loop $w
      (drop (call $write (i32.load (i32.const 100)) (i32.const 108) (i32.const 1) (i32.const 104)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $w (i32.lt_u (local.get $i) (i32.const {chunks}))))
    (drop (call $close (i32.load (i32.const 100))))
    (local.set $end (i64.add (call $now) (i64.const {ns})))
    (loop $wait (call $yield) (br_if $wait (i64.lt_u (call $now) (local.get $end))))))"#,
        ns = secs * 1_000_000_000
    )
}

/// A checkpoint whose files take longer than a cut's usual 20 s to go up, over a node's link
/// held to 1.5 MB/s (`tc`'s token bucket on its veth): 40 MiB its vertex wrote, ~28 s. The
/// broker gives the cut as long as the job's bound on them takes at 1 MiB/s, and keeps it.
#[test]
fn a_checkpoint_whose_files_take_longer_than_a_cut_s_usual_limit_over_a_slow_link_is_kept() {
    let mut h = Hosts::new(2);
    let broker = h.daemon(0, &["superpeer"]);
    h.daemon(1, &["node", "--bootstrap", &broker]);
    write_lab(h.dir.path(), &broker);
    wait_for(Duration::from_secs(30), || {
        let out = h.run(0, &["lab", "status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 1)
            .then_some(())
    });
    let d = h.dir.path();
    std::fs::write(d.join("big.wat"), big_writer(640, 120)).expect("module");
    std::fs::write(
        d.join("one.dot"),
        "digraph one { v [component=\"big\"]; }\n",
    )
    .expect("dot");
    let profile = d.join("big.toml");
    std::fs::write(
        &profile,
        format!(
            "name = \"big\"\ntopology = \"{0}/one.dot\"\n[components]\nbig = \"{0}/big.wat\"\n\
             [files]\noutputs = [\"*.bin\"]\nmax_output = \"64MiB\"\n\
             [checkpoint]\ninterval = \"1h\"\n[limits]\nwall = \"300s\"\n",
            d.display()
        ),
    )
    .expect("profile");
    let v = json(&h.run(
        0,
        &["submit", profile.to_str().expect("utf-8"), "-o", "json"],
    ));
    let job = v["job"].as_str().expect("job").to_owned();
    let state = |h: &Hosts| json(&h.run(0, &["status", &job, "-o", "json"]))[0].clone();
    wait_for(Duration::from_secs(30), || {
        (state(&h)["state"] == "running").then_some(())
    });
    // Its 40 MiB are written in well under a second here; then the node's link slows.
    std::thread::sleep(Duration::from_secs(3));
    let tbf = format!(
        "netns exec {} tc qdisc add dev {}h1 root tbf rate 12mbit burst 32kb latency 200ms",
        h.hosts[1], h.tag
    );
    ip(&tbf.split(' ').collect::<Vec<_>>());
    let t = Instant::now();
    let out = h.run(0, &["checkpoint", &job]);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "the checkpoint after {took:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took > Duration::from_secs(20),
        "the link was not slow: {took:?}"
    );
    let s = state(&h);
    let cut = &s["checkpoints"][0];
    let files = cut["parts"][0]["files"].as_array().expect("its files");
    assert!(
        files
            .iter()
            .any(|f| f["path"] == "big.bin" && f["size"] == 640 * 65536),
        "{cut}"
    );
    let out = h.run(0, &["cancel", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
