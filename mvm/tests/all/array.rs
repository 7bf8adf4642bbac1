//! Arrays and dependencies on a lab of daemon processes: `mvm submit --wait` of a sweep,
//! `mvm status ARRAY`, `--after-ok` on an array, and a dependent cancelled when the job it
//! needs fails.

use std::time::Duration;

use crate::lab::{Lab, status, wait_state};
use crate::run::{json, root};

#[test]
fn a_sweep_runs_as_an_array_and_dependents_follow_or_are_cancelled() {
    let lab = Lab::up(2);
    let sweep = root().join("examples/pipeline-sweep.toml");
    let out = lab.mvm(&["submit", "--wait", sweep.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    // count × factor, in the sweep's order: sum = factor² × count(count+1)/2.
    let want: Vec<String> = [10u64, 100, 1000]
        .iter()
        .flat_map(|&n| [2u64, 3].map(move |f| format!("items {n} sum {}", f * f * n * (n + 1) / 2)))
        .collect();
    assert_eq!(lines, want);
    let jobs = json(&lab.mvm(&["status", "-o", "json"]));
    let array = jobs[0]["array"][0]
        .as_str()
        .expect("an array id")
        .to_owned();
    let text = lab.mvm(&["status", &array]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with(&format!("array {array}: 6 jobs: 6 done")),
        "{text}"
    );

    // Runs after the whole array ended well.
    let pipeline = root().join("examples/pipeline.toml");
    let v = json(&lab.mvm(&[
        "submit",
        "--after-ok",
        &array,
        pipeline.to_str().expect("utf-8"),
        "-o",
        "json",
    ]));
    let after = v["job"].as_str().expect("job").to_owned();
    wait_state(&lab, &after, |s| s == "done", Duration::from_secs(60));

    // A job that fails, and one that needed it to end well: cancelled, naming it.
    let d = lab.dir.path();
    std::fs::write(
        d.join("one.dot"),
        "digraph one { v [component=\"exit\"]; }\n",
    )
    .expect("dot");
    std::fs::write(
        d.join("exit3.wat"),
        "(module (import \"wasi_snapshot_preview1\" \"proc_exit\" (func $exit (param i32))) \
         (memory (export \"memory\") 1) (func (export \"_start\") (call $exit (i32.const 3))))",
    )
    .expect("wat");
    let boom = lab.profile(
        "boom.toml",
        &format!(
            "name = \"boom\"\ntopology = \"{0}/one.dot\"\n[components]\nexit = \"{0}/exit3.wat\"\n",
            d.display()
        ),
    );
    let v = json(&lab.mvm(&["submit", boom.to_str().expect("utf-8"), "-o", "json"]));
    let boom_id = v["job"].as_str().expect("job").to_owned();
    let out = lab.mvm(&[
        "submit",
        "--after-ok",
        &boom_id,
        pipeline.to_str().expect("utf-8"),
        "-o",
        "json",
    ]);
    let code = out.status.code();
    // Placed before boom ended: pending, then cancelled; after it ended: refused at once.
    if code == Some(0) {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let dep = v["job"].as_str().expect("job").to_owned();
        wait_state(&lab, &dep, |s| s == "cancelled", Duration::from_secs(60));
        let s = status(&lab, &dep);
        assert!(
            s["error"].as_str().is_some_and(|e| e.contains(&boom_id)),
            "{s}"
        );
    } else {
        assert_eq!(code, Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains(&boom_id));
    }
    let b = wait_state(
        &lab,
        &boom_id,
        |s| s != "pending" && s != "preparing" && s != "running",
        Duration::from_secs(60),
    );
    assert_eq!(b["state"], "failed", "{b}");
}
