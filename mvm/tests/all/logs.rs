//! `mvm logs` on a lab of daemon processes: a running job's lines followed as its vertices
//! write them on two nodes, and a failed job's lines kept (the failing part's, and those of
//! the part on the other node that was stopped because of it).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::{Lab, status, wait_state};
use crate::run::json;

/// A job of two vertices `a` and `b` of `jobs/wat/chatter.wat`, one per node, with `attrs` on
/// `b` and `params` as its parameters.
fn chatter(lab: &Lab, name: &str, b_attrs: &str, params: &str) -> String {
    let dot = lab.dir.path().join(format!("{name}.dot"));
    std::fs::write(
        &dot,
        format!(
            "digraph {name} {{\n  a [component=\"chatter\"];\n  b [component=\"chatter\"{b_attrs}];\n}}\n"
        ),
    )
    .expect("topology");
    let p = lab.profile(
        &format!("{name}.toml"),
        &format!(
            "name = \"{name}\"\ntopology = \"{}\"\n[components]\nchatter = \"ROOT/jobs/wat/chatter.wat\"\n[parameters]\n{params}\n[requirements]\nnodes = 2\n[limits]\nwall = \"120s\"\n",
            dot.display()
        ),
    );
    let v = json(&lab.mvm(&["submit", p.to_str().expect("utf-8"), "-o", "json"]));
    v["job"].as_str().expect("a job id").to_owned()
}

/// `mvm logs JOB -o json` (with `extra`): its lines as (vertex, stream, text, seq).
fn lines(lab: &Lab, job: &str, extra: &[&str]) -> Vec<(String, String, String, u64)> {
    let mut args = vec!["logs", job, "-o", "json"];
    args.extend_from_slice(extra);
    let out = lab.mvm(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(parse)
        .collect()
}

fn parse(line: &str) -> (String, String, String, u64) {
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    let s = |k: &str| v[k].as_str().expect(k).to_owned();
    (
        s("vertex"),
        s("stream"),
        s("text"),
        v["seq"].as_u64().expect("seq"),
    )
}

/// The texts of `vertex`'s lines of `stream`, in order.
fn texts(all: &[(String, String, String, u64)], vertex: &str, stream: &str) -> Vec<String> {
    all.iter()
        .filter(|l| l.0 == vertex && l.1 == stream)
        .map(|l| l.2.clone())
        .collect()
}

fn expected(prefix: &str, n: u64) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn logs_are_followed_while_a_job_runs_on_two_nodes_and_kept_when_a_job_fails() {
    let lab = Lab::up(2);

    // Ten lines a vertex, one every 500 ms: `--follow` prints the first ones while it runs.
    let job = chatter(&lab, "talk", "", "lines = 10\nms = 500");
    let mut follow = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["logs", &job, "--follow", "-o", "json"])
        .env("MVM_LAB_DIR", lab.dir.path().join("lab"))
        .env_remove("MVM_BROKER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mvm logs --follow");
    let mut out = BufReader::new(follow.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("a first line");
    let running = status(&lab, &job);
    assert_eq!(
        running["state"], "running",
        "a line came while the job runs: {first} {running}"
    );
    let nodes: Vec<&str> = running["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| p["name"].as_str().expect("node name"))
        .collect();
    assert_eq!(nodes.len(), 2, "a vertex on each node: {running}");
    let mut followed = vec![parse(&first)];
    for line in out.lines() {
        followed.push(parse(&line.expect("a line")));
    }
    let code = follow.wait().expect("follow ends");
    assert!(code.success(), "--follow ends well with the job");
    assert_eq!(status(&lab, &job)["state"], "done");
    for v in ["a", "b"] {
        assert_eq!(texts(&followed, v, "stdout"), expected("out ", 10), "{v}");
        assert_eq!(texts(&followed, v, "stderr"), expected("err ", 10), "{v}");
        assert_eq!(
            texts(&followed, v, "log"),
            expected("info: note ", 10),
            "{v}"
        );
        let seqs: Vec<u64> = followed.iter().filter(|l| l.0 == v).map(|l| l.3).collect();
        assert_eq!(
            seqs,
            (0..30).collect::<Vec<u64>>(),
            "each line once, in order: {v}"
        );
    }
    // Read again after its end: the same lines, from the job log.
    assert_eq!(lines(&lab, &job, &[]).len(), 60);
    let b = lines(&lab, &job, &["--vertex", "b"]);
    assert!(b.iter().all(|l| l.0 == "b") && b.len() == 30, "{b:?}");
    let text = lab.mvm(&["logs", &job, "--vertex", "a"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("[a] out 9\n"), "{text}");
    assert!(text.contains("[a stderr] err 9\n"), "{text}");
    assert!(text.contains("[a log] info: note 9\n"), "{text}");
    let since = lines(&lab, &job, &["--since", "1h"]);
    assert_eq!(since.len(), 60);

    // `b` fails after three lines while `a` still writes on the other node: the job fails,
    // and what both wrote is kept.
    let job = chatter(
        &lab,
        "oops",
        ", lines=\"3\", fail=\"1\"",
        "lines = 40\nms = 250",
    );
    let failed = wait_state(
        &lab,
        &job,
        |s| s != "running" && s != "preparing" && s != "pending",
        Duration::from_secs(60),
    );
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().expect("error").contains("'b'"),
        "{failed}"
    );
    // `a`'s part was stopped; its node ships what it held within a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let all = loop {
        let all = lines(&lab, &job, &[]);
        if texts(&all, "a", "stdout").len() >= 2 || Instant::now() > deadline {
            break all;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(texts(&all, "b", "stdout"), expected("out ", 3));
    assert_eq!(texts(&all, "b", "stderr"), expected("err ", 3));
    assert_eq!(texts(&all, "b", "log"), expected("info: note ", 3));
    let a = texts(&all, "a", "stdout");
    assert!(a.len() >= 2 && a.len() < 40, "a was stopped mid-way: {a:?}");
    assert_eq!(a, expected("out ", a.len() as u64), "from its first line");
    // Bad input names itself.
    let bad = lab.mvm(&["logs", &job, "--since", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since"));
}
