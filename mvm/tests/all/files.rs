//! A job's files on a lab of daemon processes: `mvm submit --wait --output-dir` and `mvm fetch`
//! with the word-count example over three nodes, a failed job's outputs kept, bad inputs
//! refused with the file named, and no sandbox left on any node.

use std::path::Path;

use crate::lab::Lab;
use crate::run::{json, root};

/// The files under `dir`, relative, in order.
fn tree(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                v.push(p.strip_prefix(dir).expect("under").display().to_string());
            }
        }
    }
    v.sort();
    v
}

#[test]
fn word_count_files_cross_three_nodes_and_a_failed_job_keeps_its_outputs() {
    let lab = Lab::up(3);
    let d = lab.dir.path();
    let example = root().join("examples/wordcount/wordcount.toml");
    let res = d.join("res");
    let out = lab.mvm(&[
        "submit",
        "--wait",
        "--output-dir",
        res.to_str().expect("utf-8"),
        example.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "words 80\n");
    assert_eq!(
        tree(&res),
        [
            "m0/out/counts.txt",
            "m1/out/counts.txt",
            "m2/out/counts.txt",
            "sum/out/total.txt"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(res.join("sum/out/total.txt")).expect("total"),
        "80\n"
    );

    // The same job made to fail: its sum writes a partial result, then exits 2.
    std::fs::create_dir_all(d.join("input")).expect("mkdir");
    for e in std::fs::read_dir(root().join("examples/wordcount/input"))
        .expect("inputs")
        .flatten()
    {
        std::fs::copy(e.path(), d.join("input").join(e.file_name())).expect("copy");
    }
    let failing = lab.profile(
        "failing.toml",
        "name = \"failing\"\ntopology = \"ROOT/examples/wordcount/wordcount-3.dot\"\n[components]\nmap = \"ROOT/jobs/build/wordcount_map.wasm\"\nsum = \"ROOT/jobs/build/wordcount_sum.wasm\"\n[parameters]\nfail = 1\n[files]\ninputs = [\"input/\"]\noutputs = [\"out/\"]\n",
    );
    let out = lab.mvm(&[
        "submit",
        "--wait",
        "-o",
        "json",
        failing.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["state"], "failed", "{v}");
    let job = v["job"].as_str().expect("job id");
    let kept = d.join("kept");
    let f = json(&lab.mvm(&[
        "fetch",
        job,
        "--output-dir",
        kept.to_str().expect("utf-8"),
        "-o",
        "json",
    ]));
    assert!(f["files"].as_array().is_some_and(|a| a.len() >= 4), "{f}");
    assert_eq!(
        std::fs::read_to_string(kept.join("sum/out/partial.txt")).expect("partial"),
        "partial 80\n"
    );

    // Inputs outside the profile's tree: refused before anything is sent, naming the file.
    let bad = lab.profile(
        "bad.toml",
        "name = \"bad\"\ntopology = \"ROOT/examples/wordcount/wordcount-3.dot\"\n[components]\nmap = \"ROOT/jobs/build/wordcount_map.wasm\"\nsum = \"ROOT/jobs/build/wordcount_sum.wasm\"\n[files]\ninputs = [\"../secrets/\"]\n",
    );
    let out = lab.mvm(&["submit", bad.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("climbs out of the sandbox"),
        "{err}"
    );

    // Nothing is left in any node's sandboxes once the jobs have ended.
    let lab_dir = d.join("lab");
    let mut looked = 0;
    for e in std::fs::read_dir(&lab_dir).expect("lab dir").flatten() {
        let sandboxes = e.path().join("sandboxes");
        if sandboxes.is_dir() {
            looked += 1;
            let left = tree(&sandboxes);
            assert!(left.is_empty(), "{}: {left:?}", sandboxes.display());
        }
    }
    assert!(
        looked >= 3,
        "every node's sandboxes were looked at ({looked})"
    );
}
