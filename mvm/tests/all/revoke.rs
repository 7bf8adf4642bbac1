//! Revocation through the network: a lab's CA revokes a user's and a node's certificates with
//! `mvm ca revoke`; the lab's super-peers read the list, the user is refused at its next
//! connection, and the node's connections are closed (it is lost, and stays so), while the
//! others go on.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::lab::{Lab, http_get, sample};
use crate::run::json;

/// `mvm status` as the user whose identity is in `who`.
fn status_as(lab: &Lab, who: &Path) -> std::process::Output {
    lab.mvm(&[
        "status",
        "--identity",
        who.to_str().expect("utf-8"),
        "-o",
        "json",
    ])
}

/// The lab's view of node `name`: whether it is lost.
fn lost(lab: &Lab, name: &str) -> bool {
    let g = json(&lab.mvm(&["lab", "status", "-o", "json"]));
    g["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == name)
        .is_none_or(|n| n["lost"] == true)
}

#[test]
fn a_revoked_user_is_refused_and_a_revoked_nodes_connections_are_closed_within_the_bound() {
    let lab = Lab::up(2);
    let dir = lab.dir.path().join("lab");
    let ca = dir.join("ca");
    let mallory = lab.dir.path().join("mallory");
    let out = lab.mvm(&[
        "ca",
        "issue",
        "--ca",
        ca.to_str().expect("utf-8"),
        "--out",
        mallory.to_str().expect("utf-8"),
        "--roles",
        "admin",
        "user",
        "mallory",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = status_as(&lab, &mallory);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!lost(&lab, "node1"));

    let revoke = |cert: &Path| {
        let out = lab.mvm(&[
            "ca",
            "revoke",
            "--ca",
            ca.to_str().expect("utf-8"),
            cert.to_str().expect("utf-8"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = revoke(&mallory.join("cert.pem"));
    assert!(
        said.contains("revoked") && said.contains("list 1"),
        "{said}"
    );
    let revoked_at = Instant::now();
    let said = revoke(&dir.join("node1").join("cert.pem"));
    assert!(said.contains("list 2 (2 revoked)"), "{said}");

    // The user: refused at its next connection, within an interval of the super-peers' reading
    // (twice the lab's 200 ms heartbeat, at least 500 ms) and a connection's set-up.
    let refused = loop {
        let out = status_as(&lab, &mallory);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(10),
            "mallory still served 10 s after the revocation"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let user_after = revoked_at.elapsed();
    assert!(refused.contains("revoked"), "{refused}");
    // The node: its connections closed, so its heartbeats stop and it is lost (after the lab's
    // 1.5 s of silence); it cannot connect again.
    while !lost(&lab, "node1") {
        assert!(
            revoked_at.elapsed() < Duration::from_secs(15),
            "node1 still in the group 15 s after the revocation"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let node_after = revoked_at.elapsed();
    eprintln!(
        "MVM_REVOCATION user refused after {} ms, node lost after {} ms",
        user_after.as_millis(),
        node_after.as_millis()
    );
    let log: String = ["superpeer", "superpeer1", "superpeer2"]
        .iter()
        .map(|n| std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default())
        .collect();
    assert!(
        log.contains("connections closed") && log.contains("revoked by the CA of domain lab"),
        "no super-peer logged closing node1's connections"
    );
    // node0, which holds no file, fetched the list from its super-peer (and so would refuse
    // node1 too).
    let st = json(&lab.mvm(&["lab", "status", "-o", "json"]));
    let node0 = st["daemons"]
        .as_array()
        .expect("daemons")
        .iter()
        .find(|d| d["name"] == "node0")
        .and_then(|d| d["metrics"].as_str())
        .expect("node0's metrics")
        .to_owned();
    loop {
        let (_, text) = http_get(&node0, "/metrics");
        if sample(&text, "mvm_revocation_list", &["domain=\"lab\""]) == Some(2.0) {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(15),
            "node0 holds no list 2: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(lost(&lab, "node1"), "node1 came back");
    // Everyone else goes on: the lab's own user is served, and a job runs on node0.
    let p = lab.pipeline("after", 200, 1, "");
    let v = json(&lab.mvm(&["submit", "--wait", p.to_str().expect("utf-8"), "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
}

#[test]
fn ca_revoke_refuses_bad_input_naming_it_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mvm = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mvm"))
            .args(args)
            .output()
            .expect("mvm runs")
    };
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().expect("utf-8");
    assert!(
        mvm(&["ca", "init", "--domain", "physics", "--dir", ca_s])
            .status
            .success()
    );
    for (args, says) in [
        (vec!["--serial", "zz"], "--serial 'zz'"),
        (vec!["--serial", ""], "--serial ''"),
        (vec!["/nonexistent/cert.pem"], "/nonexistent/cert.pem"),
        (vec![], "required"),
    ] {
        let mut a = vec!["ca", "revoke", "--ca", ca_s];
        a.extend(args.iter().copied());
        let out = mvm(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{a:?}: {err}");
        assert!(err.contains(says), "{a:?}: {err}");
    }
    let crl = ca.join("ca.crl");
    assert!(!crl.exists(), "a refused revocation wrote a list");
    let out = mvm(&["ca", "revoke", "--ca", ca_s, "--serial", "0a1b2c"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("serial 0a1b2c revoked"));
    assert!(
        std::fs::read_to_string(&crl)
            .expect("list")
            .contains("BEGIN X509 CRL")
    );
    // A corrupt list is named, and left as it is.
    std::fs::write(&crl, "junk").expect("write");
    let out = mvm(&["ca", "revoke", "--ca", ca_s, "--serial", "0a"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ca.crl") && err.contains("not PEM"), "{err}");
    assert_eq!(std::fs::read_to_string(&crl).expect("list"), "junk");
}
