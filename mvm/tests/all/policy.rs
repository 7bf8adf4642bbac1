//! Identity and policy through the real network path: the shipped two-domain policies held
//! by a super-peer of domain physics, users of both domains, nodes that fetch the policies.

use std::path::Path;
use std::time::Duration;

use crate::groups::Groups;
use crate::netns::wait_for;
use crate::run::{build_jobs, json, root};

pub(crate) fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn copy_policies(to: &Path) {
    let from = root().join("policies");
    for e in walk(&from) {
        let rel = e.strip_prefix(&from).expect("inside");
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&e, &dest).expect("copy");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

/// `mvm submit` as `who` (an identity directory under the test's), extra args appended.
fn submit(g: &Groups, who: &str, profile: &str, extra: &[&str]) -> std::process::Output {
    let id = g.dir.path().join(who);
    let mut args = vec!["submit", profile, "--identity", id.to_str().expect("utf-8")];
    args.extend(extra);
    g.run(&args)
}

/// `mvm submit --wait` as `who`, which must end done.
fn runs_to_done(g: &Groups, who: &str, profile: &Path) {
    let profile = profile.to_str().expect("utf-8");
    let v = json(&submit(g, who, profile, &["--wait", "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
}

/// A test directory with the shipped policies (DIR/policies), the physics CA (DIR/ca: the
/// daemons' identities are issued from it unless issued before) and biology's (DIR/bca).
pub(crate) fn two_domains() -> (Groups, std::path::PathBuf) {
    build_jobs();
    let g = Groups::new();
    let d = g.dir.path().to_owned();
    let p = |x: &str| d.join(x).to_str().expect("utf-8").to_owned();
    copy_policies(&d.join("policies"));
    ok(&g.run(&["ca", "init", "--domain", "physics", "--dir", &p("ca")]));
    ok(&g.run(&["ca", "init", "--domain", "biology", "--dir", &p("bca")]));
    (g, d)
}

#[test]
fn the_two_domain_lab_is_enforced_at_the_broker_and_on_the_nodes() {
    let (mut g, d) = two_domains();
    let p = |x: &str| d.join(x).to_str().expect("utf-8").to_owned();
    let policies = d.join("policies");
    for (ca, who, roles) in [
        ("ca", "alice", "researcher"),
        ("ca", "bob", "member"),
        ("ca", "pat", "admin"),
        ("bca", "carol", "researcher"),
    ] {
        ok(&g.run(&[
            "ca",
            "issue",
            "--ca",
            &p(ca),
            "--out",
            &p(who),
            "--roles",
            roles,
            "user",
            who,
        ]));
    }
    // n0 serves an image from its repository.
    let os = p("n0os");
    let disk = d.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 4096]).expect("disk");
    let id = ok(&g.run(&[
        "image",
        "import",
        "--os-dir",
        &os,
        "env:1",
        disk.to_str().expect("utf-8"),
    ]))
    .trim()
    .to_owned();
    let sp = g.daemon(
        "sp",
        &["superpeer", "--policies", policies.to_str().expect("utf-8")],
    );
    let n0 = g.daemon("n0", &["node", "--bootstrap", &sp, "--os-dir", &os]);
    g.daemon("n1", &["node", "--bootstrap", &sp]);
    // Group b's super-peer takes its policies from sp, and serves them to its node.
    let spb = g.daemon("spb", &["superpeer", "--group", "b", "--policy-from", &sp]);
    g.daemon("b0", &["node", "--group", "b", "--bootstrap", &spb]);
    let pat = p("pat");
    for (broker, lab, nodes) in [(&sp, "lab", 2), (&spb, "labb", 1)] {
        std::fs::create_dir_all(d.join(lab)).expect("lab dir");
        std::fs::write(
            d.join(lab).join("lab.json"),
            serde_json::json!({ "broker": broker, "pids": [], "members": [] }).to_string(),
        )
        .expect("lab.json");
        wait_for(Duration::from_secs(20), || {
            let out = g.run(&[
                "lab",
                "status",
                "-o",
                "json",
                "--identity",
                &pat,
                "--dir",
                &p(lab),
            ]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["nodes"].as_array()?.len() == nodes).then_some(())
        });
    }

    // The image is served to whom n0's policy lets use it: a researcher, not a member.
    let fetch = |who: &str, into: &str| {
        g.run(&[
            "image",
            "fetch",
            "--os-dir",
            &p(into),
            "--from",
            &n0,
            &id,
            "--identity",
            &p(who),
        ])
    };
    let out = fetch("bob", "bobos");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("use-image"),
        "{out:?}"
    );
    ok(&fetch("alice", "aliceos"));

    // Group b decides with the policies it fetched from sp.
    let out = g.run(&[
        "submit",
        "examples/pipeline.toml",
        "--identity",
        &p("bob"),
        "--broker",
        &spb,
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy of domain physics"));
    let v = json(&g.run(&[
        "submit",
        "examples/pipeline.toml",
        "--identity",
        &p("alice"),
        "--broker",
        &spb,
        "--wait",
        "-o",
        "json",
    ]));
    assert_eq!(v["state"], "done", "{v}");

    // A researcher's job runs (the nodes took the node-level policy from the super-peer).
    let v = json(&submit(
        &g,
        "alice",
        "examples/pipeline.toml",
        &["--wait", "-o", "json"],
    ));
    assert_eq!(v["state"], "done", "{v}");
    let job = v["job"].as_str().expect("job id").to_owned();

    // Refusals at the broker: exit 3 with the reason, nothing placed.
    let refused = |who: &str, profile: &str, why: &str| {
        let out = submit(&g, who, profile, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{who}: {err}");
        assert!(err.contains(why), "{who}: '{err}' lacks '{why}'");
    };
    refused("bob", "examples/pipeline.toml", "policy of domain physics");
    let big = d.join("big.toml");
    std::fs::write(
        &big,
        format!(
            "name = \"big\"\ntopology = \"{0}/topologies/ring-8.dot\"\n[components]\ntoken = \"{0}/jobs/wat/token.wat\"\n[requirements]\nvcpus = 20\n",
            root().display()
        ),
    )
    .expect("profile");
    refused("alice", big.to_str().expect("utf-8"), "16 vCPUs");
    let claims = d.join("claims.toml");
    std::fs::write(
        &claims,
        format!(
            "name = \"claims\"\nowner = \"pat\"\ntopology = \"{0}/topologies/ring-8.dot\"\n[components]\ntoken = \"{0}/jobs/wat/token.wat\"\n",
            root().display()
        ),
    )
    .expect("profile");
    refused(
        "alice",
        claims.to_str().expect("utf-8"),
        "the certificate is user alice",
    );
    // Limits count what the owner holds at once: a running 40-vertex ring, then another is
    // over the 64 vertices a researcher may hold; once the first is cancelled, it fits.
    let ring40 = d.join("ring40.dot");
    let out = ok(&g.run(&["topology", "gen", "ring", "40"]));
    std::fs::write(&ring40, out).expect("ring40");
    let long = d.join("long.toml");
    std::fs::write(
        &long,
        format!(
            "name = \"long\"\ntopology = \"{}\"\n[components]\ntoken = \"{}/jobs/wat/token.wat\"\n[parameters]\nhops = 1000000000\n",
            ring40.display(),
            root().display()
        ),
    )
    .expect("profile");
    let long = long.to_str().expect("utf-8");
    let v = json(&submit(&g, "alice", long, &["-o", "json"]));
    let first = v["job"].as_str().expect("job id").to_owned();
    refused("alice", long, "would hold 80");
    ok(&g.run(&["cancel", &first, "--identity", &p("alice"), "--broker", &sp]));
    let v = json(&submit(&g, "alice", long, &["-o", "json"]));
    let second = v["job"].as_str().expect("job id").to_owned();
    ok(&g.run(&[
        "cancel",
        &second,
        "--identity",
        &p("alice"),
        "--broker",
        &sp,
    ]));
    // Carol's CA is not one physics trusts: refused before any request is read.
    let carol = p("carol");
    let trust = p("ca/ca.crt");
    let out = g.run(&[
        "submit",
        "examples/pipeline.toml",
        "--identity",
        &carol,
        "--trust",
        &trust,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("unknown CA"), "{err}");
    // Results: a member of physics reads them; the refused jobs were never placed.
    let out = g.run(&[
        "status",
        &job,
        "--identity",
        &p("bob"),
        "--broker",
        &sp,
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&g.run(&[
        "status",
        "--identity",
        &p("alice"),
        "--broker",
        &sp,
        "-o",
        "json",
    ]));
    assert_eq!(
        v.as_array().map(Vec::len),
        Some(3),
        "the pipeline and two cancelled rings: {v}"
    );

    // Node level: the super-peer's node.polar allows 1 queue per part; the nodes fetch the
    // new version before they decide, and the pipeline (3 queues) is refused.
    let node_polar = policies.join("node.polar");
    let text = std::fs::read_to_string(&node_polar).expect("node.polar");
    std::fs::write(
        &node_polar,
        text.replace("max_queues(256);", "max_queues(1);"),
    )
    .expect("write");
    // Reloading is for administrators; bob is refused, pat gets the new version.
    let out = g.run(&["policy", "reload", "--identity", &p("bob")]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v = json(&g.run(&["policy", "reload", "--identity", &pat, "-o", "json"]));
    assert_eq!(v["version"], 2, "{v}");
    let out = submit(
        &g,
        "alice",
        "examples/pipeline.toml",
        &["--wait", "-o", "json"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("node-level policy") && err.contains("allows 1"),
        "{err}"
    );
    // Nothing was left behind on the nodes: the next (small) job runs.
    let one = d.join("one.toml");
    std::fs::write(
        &one,
        format!(
            "name = \"one\"\ntopology = \"{0}/topologies/pipeline-4.dot\"\n[components]\nsource = \"{0}/jobs/build/pipe_source.wasm\"\nstage = \"{0}/jobs/build/pipe_stage.wasm\"\nsink = \"{0}/jobs/build/pipe_sink.wasm\"\n[parameters]\ncount = 3\nfactor = 1\n[requirements]\nnodes = 2\n",
            root().display()
        ),
    )
    .expect("profile");
    std::fs::write(&node_polar, text).expect("restore");
    let v = json(&g.run(&["policy", "reload", "--identity", &pat, "-o", "json"]));
    assert_eq!(v["version"], 3, "{v}");
    runs_to_done(&g, "alice", &one);
    // A broken edit is refused with file and line; the version in force stays.
    std::fs::write(
        policies.join("physics/broken.polar"),
        "allow(x) if\n  x = ;\n",
    )
    .expect("write");
    let out = g.run(&["policy", "reload", "--identity", &pat]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("physics/broken.polar:2"), "{err}");
    runs_to_done(&g, "alice", &one);
}
