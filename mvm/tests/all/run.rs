//! `mvm run` on the shipped examples, with results checked independently, and its refusals.

use std::process::{Command, Output};
use std::sync::Once;

pub(crate) fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the C example jobs once (scripts/build-jobs; needs clang for wasm32-wasi).
pub(crate) fn build_jobs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let s = Command::new("bash")
            .arg(root().join("scripts/build-jobs"))
            .status()
            .expect("bash runs");
        assert!(
            s.success(),
            "scripts/build-jobs failed: run scripts/setup first"
        );
    });
}

fn run(args: &[&str]) -> Output {
    build_jobs();
    let cache = std::env::temp_dir().join(format!("mvm-test-cache-{}", std::process::id()));
    Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(args)
        .env("MVM_CACHE_DIR", cache)
        .current_dir(root())
        .output()
        .expect("mvm runs")
}

pub(crate) fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

fn stdout_of(v: &serde_json::Value) -> String {
    v["vertices"]
        .as_array()
        .expect("vertices")
        .iter()
        .filter_map(|x| x["stdout"].as_str())
        .collect()
}

/// A direct DFT, independent of the butterfly network.
pub(crate) fn dft(re: &[f64], im: &[f64]) -> Vec<(f64, f64)> {
    let n = re.len();
    (0..n)
        .map(|k| {
            (0..n).fold((0.0, 0.0), |(ar, ai), j| {
                let t = -2.0 * std::f64::consts::PI * (j * k % n) as f64 / n as f64;
                (
                    ar + re[j] * t.cos() - im[j] * t.sin(),
                    ai + re[j] * t.sin() + im[j] * t.cos(),
                )
            })
        })
        .collect()
}

fn check_fft(profile: &str, re: &[f64], im: &[f64]) {
    let v = json(&run(&["run", profile, "-o", "json"]));
    let mut got = vec![None; re.len()];
    for line in stdout_of(&v).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let i: usize = f[0].parse().expect("index");
        got[i] = Some((
            f[1].parse::<f64>().expect("re"),
            f[2].parse::<f64>().expect("im"),
        ));
    }
    for (k, (want, have)) in dft(re, im).iter().zip(&got).enumerate() {
        let (r, i) = have.expect("every sink printed");
        assert!(
            (r - want.0).abs() < 1e-9 && (i - want.1).abs() < 1e-9,
            "{profile} X[{k}] = {r} {i}, DFT {want:?}"
        );
    }
}

#[test]
fn fft8_and_fft16_match_a_direct_dft_with_the_same_modules() {
    check_fft(
        "examples/fft8.toml",
        &[1.0, 2.0, 0.5, -1.0, 0.0, 3.0, 2.5, 1.0],
        &[0.0, -0.5, 1.0, 0.0, 2.0, 0.0, -1.5, 0.25],
    );
    let re: Vec<f64> = [0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0]
        .iter()
        .map(|&x| f64::from(x))
        .collect();
    check_fft("examples/fft16.toml", &re, &[0.0; 16]);
}

#[test]
fn pipeline_tree_and_ring_give_their_known_results() {
    let v = json(&run(&["run", "examples/pipeline.toml", "-o", "json"]));
    assert_eq!(stdout_of(&v), "items 100 sum 45450\n");
    let v = json(&run(&["run", "examples/tree-reduce.toml", "-o", "json"]));
    assert_eq!(stdout_of(&v), "total 7\n");
    let v = json(&run(&["run", "examples/ring.toml", "-o", "json"]));
    let moved: u64 = v["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .filter_map(|q| q["items_in"].as_u64())
        .sum();
    assert_eq!(moved, 1000);
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_str().expect("utf-8").to_owned()
}

#[test]
fn bad_profiles_exit_2_naming_file_and_line_and_failed_jobs_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topo = root().join("topologies/pipeline-4.dot");
    let topo = topo.to_str().expect("utf-8");
    let p = write(
        dir.path(),
        "unknown.toml",
        &format!("name = \"x\"\ntopology = \"{topo}\"\nflavour = 1\n[components]\n"),
    );
    let out = run(&["run", &p]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("mvm: {p}:3:")), "{err}");

    let p = write(
        dir.path(),
        "missing.toml",
        &format!("name = \"x\"\ntopology = \"{topo}\"\n[components]\nsource = \"s.wasm\"\n"),
    );
    let out = run(&["run", &p]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("component 'stage' of vertex 'p1'"));

    write(dir.path(), "junk.wasm", "\0asm garbage");
    let comps = "source = \"junk.wasm\"\nstage = \"junk.wasm\"\nsink = \"junk.wasm\"\n";
    let p = write(
        dir.path(),
        "junk.toml",
        &format!("name = \"x\"\ntopology = \"{topo}\"\n[components]\n{comps}"),
    );
    let out = run(&["run", &p]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("junk.wasm: not a valid WebAssembly module")
    );

    write(
        dir.path(),
        "trap.wat",
        r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
    );
    let ok = root().join("jobs/build");
    let comps = format!(
        "source = \"{}\"\nstage = \"trap.wat\"\nsink = \"{}\"\n",
        ok.join("pipe_source.wasm").display(),
        ok.join("pipe_sink.wasm").display()
    );
    let p = write(
        dir.path(),
        "trap.toml",
        &format!("name = \"t\"\ntopology = \"{topo}\"\n[components]\n{comps}"),
    );
    let out = run(&["run", &p]);
    assert_eq!(out.status.code(), Some(1));
    let trapped = String::from_utf8_lossy(&out.stderr).into_owned();

    // An unknown codec in the queue defaults is refused when the profile is checked, by
    // `run` and by `submit` (before any broker is asked), with the profile's line.
    let p = write(
        dir.path(),
        "codec.toml",
        &format!(
            "name = \"t\"\ntopology = \"{topo}\"\n[queue]\ncapacity = 8\ncodec = \"snappy+cbor\"\n[components]\n{comps}"
        ),
    );
    for args in [
        &["run", &p][..],
        &["submit", "--broker", "/ip4/127.0.0.1/udp/9/quic-v1", &p][..],
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with(&format!(
                "mvm: {p}:5: queue.codec: unknown codec 'snappy+cbor'"
            )),
            "{args:?}: {err}"
        );
    }
    let err = trapped;
    // Both stages run the trapping module; whichever traps first is named.
    assert!(
        (err.contains("vertex 'p1'") || err.contains("vertex 'p2'")) && err.contains("unreachable"),
        "{err}"
    );
}

/// Asserts that `end` moved what `quiet`, an undisturbed run, did: every edge and every input
/// port the same items and bytes, and something on each.
pub(crate) fn same_traffic(end: &serde_json::Value, quiet: &serde_json::Value) {
    let edges = quiet["edges"].as_array().expect("edges");
    assert!(
        !edges.is_empty() && edges.iter().all(|e| e["items"].as_u64() > Some(0)),
        "{quiet}"
    );
    assert_eq!(end["edges"], quiet["edges"], "edge by edge");
    assert_eq!(end["received"], quiet["received"], "port by port");
}
