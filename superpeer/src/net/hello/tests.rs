//! The certificate exchange against peers that do it wrong: a bare libp2p peer speaks for them.

use std::time::Duration;

use futures::AsyncWriteExt;
use mvm_component::policy::PrincipalKind;

use crate::net::NetConfig;
use crate::net::testing::{Bare, daemon, dropped, request_frame};
use crate::pki::{Ca, Credentials, Subject};
use crate::proto::{self, HELLO_PROTOCOL, Hello, MAX_HELLO, Request, Verdict};

/// A certificate authority in a temporary directory.
fn ca(dir: &tempfile::TempDir, domain: &str) -> Ca {
    Ca::init(&dir.path().join(domain), domain, 30).expect("init")
}

/// A peer whose certificate is from a CA the daemon does not trust is told why, its connection
/// is closed at once (not at the deadline), and nothing it sends is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_peer_is_told_why_closed_and_never_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (physics, biology) = (ca(&dir, "physics"), ca(&dir, "biology"));
    let config = NetConfig {
        hello_timeout: Duration::from_secs(30),
        ..NetConfig::default()
    };
    let (server, mut inbound) = daemon(&physics, "sp", config).await;
    let subject = Subject {
        kind: PrincipalKind::User,
        name: "eve".into(),
        roles: Vec::new(),
    };
    let eve = Credentials::ephemeral(&biology, &subject).expect("creds");
    let mut bare = Bare::connect(eve.key.clone(), &server).await;
    // A control request first, then the certificate.
    let mut rpc = bare.open(server.peer(), proto::RPC_PROTOCOL).await;
    let _ = rpc.write_all(&request_frame(&Request::Group)).await;
    let mut hello = bare.open(server.peer(), HELLO_PROTOCOL).await;
    let cert = eve.cert.clone().into();
    proto::write_frame(&mut hello, &Hello { cert }, MAX_HELLO)
        .await
        .expect("sent");
    let verdict: Verdict = proto::read_frame(&mut hello, MAX_HELLO)
        .await
        .expect("a verdict");
    match verdict {
        Verdict::Refused(why) => {
            assert!(
                why.contains("refuses") && why.contains("unknown CA"),
                "{why}"
            );
        }
        Verdict::Passed => panic!("an untrusted certificate passed"),
    }
    drop(hello);
    assert!(dropped(&mut rpc).await, "its control stream was dropped");
    let closed = bare.closed(Duration::from_secs(10)).await;
    assert!(closed.is_some(), "the connection stayed open");
    assert!(server.identity(&bare.peer).is_none());
    assert!(inbound.try_recv().is_err(), "nothing reached the daemon");
}

/// A peer that connects and never sends its certificate is disconnected at the deadline, and
/// a request to it fails saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_certificate_is_disconnected_after_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deadline = Duration::from_secs(1);
    let config = NetConfig {
        hello_timeout: deadline,
        ..NetConfig::default()
    };
    let (server, mut inbound) = daemon(&ca(&dir, "physics"), "sp", config).await;
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut bare = Bare::connect(key, &server).await;
    // The daemon has the connection (a request to a peer it has no address of and is not
    // connected to fails at once).
    bare.hello().await;
    let ask = tokio::spawn({
        let (server, peer) = (server.clone(), bare.peer);
        async move { server.request(peer, &[], Request::Group).await }
    });
    let took = bare.closed(Duration::from_secs(10)).await;
    let took = took.expect("the connection closed");
    assert!(took >= deadline / 2, "closed before the deadline: {took:?}");
    let e = ask
        .await
        .expect("join")
        .expect_err("no answer from a stranger");
    assert!(
        matches!(&e.problem, crate::net::NetProblem::Hello(why) if why.contains("no certificate within 1 s")),
        "{e}"
    );
    assert!(server.identity(&bare.peer).is_none());
    assert!(inbound.try_recv().is_err());
}

/// A `Hello` frame over the bound is refused by its length alone: the connection is closed at
/// once, long before the deadline, without its bytes being read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_over_the_bound_is_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = NetConfig {
        hello_timeout: Duration::from_secs(30),
        ..NetConfig::default()
    };
    let (server, _inbound) = daemon(&ca(&dir, "physics"), "sp", config).await;
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut bare = Bare::connect(key, &server).await;
    let mut hello = bare.open(server.peer(), HELLO_PROTOCOL).await;
    let len = u32::try_from(MAX_HELLO + 1).expect("fits");
    hello.write_all(&len.to_be_bytes()).await.expect("written");
    hello.flush().await.expect("flushed");
    // The frame's bytes follow, as far as the daemon takes them.
    let body = tokio::spawn(async move {
        let chunk = vec![0u8; 16 << 10];
        for _ in 0..(MAX_HELLO / chunk.len() + 1) {
            if hello.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = hello.flush().await;
    });
    let took = bare.closed(Duration::from_secs(10)).await;
    assert!(took.is_some(), "the connection stayed open");
    assert!(server.identity(&bare.peer).is_none());
    body.abort();
}
