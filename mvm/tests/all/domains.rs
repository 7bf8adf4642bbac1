//! Two domains through the real network, each daemon a process: physics' super-peer (no nodes
//! of its own) and biology's group, each with its own CA and the shipped policies, trusting
//! each other's CA. A physics researcher's job is placed by biology's group under the
//! inter-domain agreement and its results read back; a physics admin's (whom the agreement
//! does not cover) is refused; forged `on behalf of` submissions are refused by biology.

use std::time::Duration;

use mvm_superpeer::client::{Client, read_profile};
use mvm_superpeer::pki::Credentials;

use crate::netns::wait_for;
use crate::policy::{ok, two_domains};
use crate::run::{json, root};

#[test]
fn a_physics_job_runs_in_biology_under_the_agreement_and_what_it_does_not_cover_is_refused() {
    let (mut g, d) = two_domains();
    let p = |x: &str| d.join(x).to_str().expect("utf-8").to_owned();
    let policies = d.join("policies");
    let issue = |ca: &str, out: &str, roles: &str, kind: &str| {
        ok(&g.run(&[
            "ca",
            "issue",
            "--ca",
            &p(ca),
            "--out",
            &p(out),
            "--roles",
            roles,
            kind,
            out,
        ]))
    };
    issue("ca", "alice", "researcher", "user");
    issue("ca", "pat", "admin", "user");
    issue("ca", "n9", "member", "node");
    issue("bca", "bsp", "superpeer", "node");
    issue("bca", "b0", "member", "node");
    let (pca, bca) = (p("ca/ca.crt"), p("bca/ca.crt"));
    let pol = policies.to_str().expect("utf-8");
    let (pcrl, bcrl) = (p("ca/ca.crl"), p("bca/ca.crl"));
    let sp = g.daemon(
        "sp",
        &[
            "superpeer",
            "--policies",
            pol,
            "--trust",
            &bca,
            "--crl",
            &pcrl,
        ],
    );
    let bsp = g.daemon(
        "bsp",
        &[
            "superpeer",
            "--group",
            "bio",
            "--policies",
            pol,
            "--trust",
            &pca,
            "--crl",
            &bcrl,
            "--peer",
            &sp,
        ],
    );
    g.daemon(
        "b0",
        &[
            "node",
            "--group",
            "bio",
            "--bootstrap",
            &bsp,
            "--trust",
            &pca,
        ],
    );
    // Physics' super-peer hears of biology's group and its node.
    let status = |who: &str| g.run(&["lab", "status", "-o", "json", "--identity", &p(who)]);
    std::fs::create_dir_all(d.join("lab")).expect("lab dir");
    std::fs::write(
        d.join("lab/lab.json"),
        serde_json::json!({ "broker": sp, "pids": [], "members": [] }).to_string(),
    )
    .expect("lab.json");
    wait_for(Duration::from_secs(30), || {
        let v: serde_json::Value = serde_json::from_slice(&status("pat").stdout).ok()?;
        let heard = v["groups"]
            .as_array()?
            .iter()
            .any(|x| x["group"] == "bio" && x["domain"] == "biology" && x["nodes"] == 1);
        heard.then_some(())
    });

    // Alice's pipeline: physics has no node for it, so its super-peer forwards it to biology's
    // group, which places it under the agreement; she reads its results through physics.
    let submit = |who: &str, extra: &[&str]| {
        let id = p(who);
        let mut args = vec![
            "submit",
            "examples/pipeline.toml",
            "--identity",
            &id,
            "--broker",
            &sp,
            "--trust",
            &bca,
        ];
        args.extend(extra);
        g.run(&args)
    };
    let v = json(&submit("alice", &["--wait", "-o", "json"]));
    assert_eq!(v["state"], "done", "{v}");
    let parts: Vec<&str> = v["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(parts, ["b0"], "{v}");
    let outputs = v["outputs"].to_string();
    assert!(outputs.contains("items"), "no results read back: {v}");

    // Pat, a physics admin but no researcher: physics would run it, but the agreement does not
    // cover him, and no group may take it.
    let out = submit("pat", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("no other group") || err.contains("inter-domain"),
        "{err}"
    );

    // Forged `on behalf of`, straight to biology's super-peer: from a user, and from a physics
    // node that is no super-peer.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let job = read_profile(&root().join("examples/pipeline.toml")).expect("profile");
    let alice = Credentials::load(&d.join("alice"), &[]).expect("alice");
    for (who, why) in [
        ("alice", "is not a super-peer"),
        ("n9", "submits no jobs of its own"),
    ] {
        let creds = Credentials::load(&d.join(who), &[d.join("bca/ca.crt")]).expect("creds");
        let mut forged = job.clone();
        forged.submission.on_behalf = Some(alice.principal.clone());
        forged.submission.hops = 1;
        let e = rt
            .block_on(async {
                let c = Client::find(&creds, std::slice::from_ref(&bsp)).await?;
                c.submit(&forged).await
            })
            .expect_err("a forged submission");
        assert!(e.message.contains(why), "{who}: {e:?}");
    }

    // Physics' CA revokes alice. Biology's super-peer, which reads its own domain's list from
    // its CA, takes physics' from physics' super-peer (whose summaries say it has a newer one)
    // and refuses her from then on.
    ok(&g.run(&["ca", "revoke", "--ca", &p("ca"), &p("alice/cert.pem")]));
    let alice = Credentials::load(&d.join("alice"), &[d.join("bca/ca.crt")]).expect("alice");
    let refused = wait_for(Duration::from_secs(30), || {
        let asked = rt.block_on(async {
            let c = Client::find(&alice, std::slice::from_ref(&bsp)).await?;
            c.status(None).await
        });
        // (A connection of hers open before is closed: what is asked on it fails otherwise.)
        asked.err().filter(|e| e.message.contains("revoked"))
    });
    assert!(
        refused.message.contains("by the CA of domain physics"),
        "{refused:?}"
    );
}
