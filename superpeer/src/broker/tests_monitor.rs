//! The monitoring policy through real daemons in one process ([`super::harness`]): nodes run
//! the probes their policies name and publish them to the super-peer, whose domain's
//! `scheduling` rules switch the group's scheduling policy from them, which changes where the
//! next job goes; a change of the policy files takes effect while the daemons run.

use super::harness::{Lab, Setup, group_until, running};
use crate::proto::{GroupInfo, JobStatus};

/// Every member of the domain may do anything in it.
const MEMBERS: &str =
    "allow(actor, _action: String, resource) if actor.domain = resource.domain;\n";

/// Nodes run their domain's jobs and publish how many vertices they hold, every 200 ms.
const NODES: &str = "allow(user: User, \"run\", node: Node) if user.domain = node.domain;\n\
                     probe(\"vertices\", 200);\n";

/// Pack while no node holds a vertex, spread otherwise.
const SCHEDULING: &str = "scheduling(m: Metrics, \"pack\") if m.sum.vertices = 0;\n\
                          scheduling(_m: Metrics, \"spread\");\n";

fn policy(g: &GroupInfo) -> &str {
    g.scheduling.as_ref().map_or("", |s| s.policy.as_str())
}

/// Whether every node of `g` has published probe `probe`.
fn published(g: &GroupInfo, probe: &str) -> bool {
    !g.nodes.is_empty()
        && g.nodes
            .iter()
            .all(|n| n.probes.iter().any(|p| p.probe == probe))
}

fn nodes_of(s: &JobStatus) -> usize {
    let mut names: Vec<&str> = s.parts.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitoring_rule_switches_the_scheduling_policy_and_the_next_job_goes_elsewhere() {
    let files = [
        ("default/members.polar", MEMBERS),
        ("default/scheduling.polar", SCHEDULING),
        ("node.polar", NODES),
    ];
    let lab: Lab = Setup::new(1, &[16, 16]).policies(&files).start().await;
    let c = lab.client().await;
    // The nodes publish their vertices (none): the rules choose pack.
    let g = group_until(&c, "every node publishes its vertices, and pack", |g| {
        published(g, "vertices") && policy(g) == "pack"
    })
    .await;
    let s = g.scheduling.as_ref().expect("a super-peer's answer");
    assert!(s.by.contains("scheduling rules"), "{s:?}");
    assert_eq!(s.metrics.get("sum.vertices"), Some(&0.0), "{s:?}");
    assert!(
        g.nodes
            .iter()
            .all(|n| n.probes.iter().all(|p| p.probe == "vertices")),
        "only the probes the policy names run: {:?}",
        g.nodes
    );
    // An 8-vertex ring under pack: one node.
    let a = running(&c, None).await;
    assert_eq!(nodes_of(&a), 1, "{a:?}");
    // Its vertices are published; the rules switch to spread, and the same job now goes
    // over both nodes (under pack it would take the other's free half of one node).
    group_until(&c, "spread once a node holds vertices", |g| {
        policy(g) == "spread"
    })
    .await;
    let b = running(&c, None).await;
    assert_eq!(nodes_of(&b), 2, "{b:?}");
    // The policy files change while the daemons run: pack always, and the nodes add a probe.
    lab.policy_dir(
        "policies",
        &[
            (
                "default/scheduling.polar",
                "scheduling(_m: Metrics, \"pack\");\n",
            ),
            (
                "node.polar",
                &format!("{NODES}probe(\"queue_depth\", 300);\n"),
            ),
        ],
    );
    let g = group_until(&c, "pack again, and queue depths published", |g| {
        policy(g) == "pack" && published(g, "queue_depth")
    })
    .await;
    assert!(
        published(&g, "vertices"),
        "the probes of before stay: {g:?}"
    );
    // Free now: 0 and 8 (a), or 4 and 4 (b on both): pack puts the next ring where it fits
    // whole if it can, on as few nodes as it can.
    let free: Vec<u32> = g.nodes.iter().map(|n| n.slots - n.vertices).collect();
    let want = if free.iter().any(|&f| f >= 8) { 1 } else { 2 };
    let d = running(&c, None).await;
    assert_eq!(nodes_of(&d), want, "free slots {free:?}: {d:?}");
    for job in [&a.job, &b.job, &d.job] {
        c.cancel(job).await.expect("cancel");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_run_a_command_with_the_metrics_and_drain_a_node_once_their_condition_holds() {
    let out = tempfile::tempdir().expect("tempdir");
    let file = out.path().join("fired");
    let notify = format!(
        "when = \"nodes >= 2 and sum.vertices = 0\"\ncooldown = \"1h\"\n\
         action = {{ command = [\"sh\", \"-c\", \"echo $MVM_TRIGGER $MVM_NODES $MVM_SUM_VERTICES >> {}\"] }}\n",
        file.display()
    );
    // n1 is drained once it runs a vertex: held for a little while.
    let drain = "when = \"node_vertices{node=\\\"n1\\\"} > 0\"\nfor = \"300ms\"\n\
                 action = { drain = \"n1\" }\n";
    let lab: Lab = Setup::new(1, &[4, 16])
        .triggers(&[("notify.toml", notify.as_str()), ("drain-n1.toml", drain)])
        .start()
        .await;
    let c = lab.client().await;
    // The command ran once (its cool-down is an hour), with the metrics in its environment.
    let lines = super::harness::eventually("the command's line", async || {
        let text = std::fs::read_to_string(&file).ok()?;
        (!text.is_empty()).then_some(text)
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        lines,
        "once"
    );
    assert_eq!(lines.trim(), "notify 2 0");
    // A ring of 8 on one node can only go to n1; then n1 still has the most free slots (8
    // against 4), so a one-vertex job would go there — until the trigger drains n1.
    let a = running(&c, Some(1)).await;
    assert_eq!(a.parts[0].name, "n1", "{a:?}");
    super::harness::eventually("a job placed on n0 once n1 is drained", async || {
        let b = c.submit(&super::harness::sleeping("after", 0)).await.ok()?;
        let s = super::harness::until(&c, &b.job, crate::proto::JobState::is_final).await;
        (s.parts.iter().all(|p| p.name == "n0")).then_some(())
    })
    .await;
    c.cancel(&a.job).await.expect("cancel");
}
