//! Input files fetched from another node that holds them rather than from the super-peer:
//! the broker names, in a part's spec, the live nodes it placed jobs with the same inputs on
//! before, and a node that lacks an input asks them first. Seen through the nodes' metrics
//! (`mvm_file_bytes_served`).

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::harness::{Lab, finished, sleeping, until};
use crate::client::read_profile;
use crate::proto::JobState;

/// A loopback address no one listens on now.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The bytes of files the daemon serving metrics at `at` sent from its `store` store.
async fn served(at: SocketAddr, store: &str) -> u64 {
    let mut conn = tokio::net::TcpStream::connect(at).await.expect("metrics");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: lab\r\n\r\n")
        .await
        .expect("ask");
    let mut text = String::new();
    conn.read_to_string(&mut text).await.expect("metrics read");
    let key = format!("mvm_file_bytes_served_total{{store=\"{store}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

/// [`served`], once it has come to `want` (a server counts a file once its last byte is out,
/// which may be a moment after the fetcher has it all), or after 10 s.
async fn served_once(at: SocketAddr, store: &str, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n = served(at, store).await;
        if n >= want || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_placed_later_fetches_the_inputs_from_the_node_that_holds_them() {
    let mut lab = Lab::start(1, &[]).await;
    let (at0, at1) = (free_addr(), free_addr());
    lab.add_node_with(4, |c| c.metrics = Some(at0)).await;
    let c = lab.client().await;
    let job = read_profile(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wordcount/wordcount.toml"),
    )
    .expect("the example reads");
    let inputs = &job.submission.files.as_ref().expect("files").inputs;
    let size: u64 = inputs.iter().map(|i| i.size).sum();
    assert!(size > 0 && inputs.len() > 1, "{inputs:?}");
    // n0 runs the word count first: it fetches the inputs from the super-peer and keeps them.
    let s = finished(&c, &job).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    assert_eq!(served(at0, "node").await, 0);
    // n0's four slots are kept busy; n1 comes, and the word count again goes there.
    let mut naps = Vec::new();
    for _ in 0..4 {
        let s = c.submit(&sleeping("nap", 60_000)).await.expect("submit");
        naps.push(until(&c, &s.job, |st| st == JobState::Running).await.job);
    }
    lab.add_node_with(4, |c| c.metrics = Some(at1)).await;
    lab.registered(2).await;
    let again = finished(&c, &job).await;
    assert_eq!(again.state, JobState::Done, "{again:?}");
    let n1 = lab.nodes[1].peer;
    assert!(again.parts.iter().all(|p| p.node == n1), "{again:?}");
    // Every input n1 lacked came from n0, each once.
    assert_eq!(served_once(at0, "node", size).await, size);
    assert_eq!(served(at1, "node").await, 0);
    for j in &naps {
        c.cancel(j).await.expect("cancel");
    }
}
