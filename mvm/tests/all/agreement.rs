//! Agreements on a lab of daemon processes: `mvm offer` plans a job with a promised finish,
//! `mvm accept --wait` follows the agreement to `met`; another agreement's node is killed
//! (a real process, `kill -9`) while its job runs without checkpoints, and `mvm agreements`
//! shows it violated at once, with the reason.

use std::time::{Duration, Instant};

use crate::lab::{Lab, kill_a_node_of, wait_state};
use crate::run::json;

/// The one offer `mvm offer` gives for `profile` with `args`.
fn offer(lab: &Lab, profile: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["offer", profile.to_str().expect("utf-8"), "-o", "json"];
    all.extend_from_slice(args);
    let v = json(&lab.mvm(&all));
    let list = v.as_array().expect("offers");
    assert_eq!(list.len(), 1, "{v}");
    list[0].clone()
}

#[test]
fn an_agreement_is_offered_accepted_and_met_and_another_is_violated_by_a_killed_node() {
    let lab = Lab::up(2);
    let p = lab.pipeline("agreed", 1000, 2, "");
    let text = std::fs::read_to_string(&p).expect("profile");
    std::fs::write(&p, format!("estimate = \"1m\"\n{text}")).expect("profile");
    let o = offer(&lab, &p, &["--deadline", "5m", "--start-after", "1s"]);
    assert_eq!(o["state"], "offered", "{o}");
    assert_eq!(o["estimate_ms"], 60_000, "{o}");
    assert_eq!(o["vertices"], 4, "{o}");
    let (start, finish) = (o["start_ms"].as_u64(), o["finish_ms"].as_u64());
    assert_eq!(finish, start.map(|s| s + 60_000), "{o}");
    let id = o["id"].as_str().expect("id").to_owned();
    let out = lab.mvm(&["accept", "--wait", &id, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(a["state"], "met", "{a}");
    // Its job ran the pipeline: count × factor² × n(n+1)/2 for n = 1000.
    let s = crate::lab::status(&lab, &id);
    assert_eq!(s["state"], "done", "{s}");
    let sink = s["outputs"].to_string();
    assert!(sink.contains("items 1000 sum 4504500"), "{s}");

    // A ring that runs for hours, whose agreement promises an hour, without checkpoints.
    let p = lab.profile(
        "fragile.toml",
        r#"name = "fragile"
topology = "ROOT/topologies/ring-8.dot"
retries = 1
estimate = "1h"
[components]
token = "ROOT/jobs/wat/token.wat"
[parameters]
hops = 1000000000
[requirements]
nodes = 1
[limits]
wall = "300s"
"#,
    );
    let o = offer(&lab, &p, &[]);
    let id = o["id"].as_str().expect("id").to_owned();
    let text = lab.mvm(&["accept", &id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with(&format!("agreement {id} (accepted)")),
        "{text}"
    );
    let s = wait_state(&lab, &id, |s| s == "running", Duration::from_secs(30));
    let killed = Instant::now();
    let node = kill_a_node_of(&lab, &s);
    let deadline = Instant::now() + Duration::from_secs(30);
    let a = loop {
        let v = json(&lab.mvm(&["agreements", "-o", "json"]));
        let a = v
            .as_array()
            .expect("list")
            .iter()
            .find(|a| a["id"] == id.as_str())
            .cloned()
            .expect("listed");
        if a["state"] != "running" {
            break a;
        }
        assert!(Instant::now() < deadline, "never violated: {a}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(a["state"], "violated", "{a}");
    let reason = a["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&node) && reason.contains("no checkpoint"),
        "{a}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(20),
        "said at once, not at the promised finish an hour on"
    );
    let text = lab.mvm(&["agreements"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&id) && l.contains("violated")),
        "{text}"
    );
    // The job's own status says so too.
    let text = lab.mvm(&["status", &id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("agreement violated (node"), "{text}");
    let _ = lab.mvm(&["cancel", &id]);
}
