use std::time::Duration;

use super::actor::{HELLO_RETRIES, hello_backoff};
use super::testing::{Bare, answering, dropped};
use super::*;
use crate::pki::Ca;

#[test]
fn the_two_sides_of_a_pair_retry_hellos_at_different_moments() {
    for _ in 0..20 {
        let (a, b) = (PeerId::random(), PeerId::random());
        let ab: Vec<Duration> = (1..=HELLO_RETRIES)
            .map(|t| hello_backoff(&a, &b, t))
            .collect();
        let ba: Vec<Duration> = (1..=HELLO_RETRIES)
            .map(|t| hello_backoff(&b, &a, t))
            .collect();
        assert_ne!(ab, ba, "the two sides would meet again");
        for (t, d) in ab.iter().enumerate() {
            let base = Duration::from_millis(50 * (t as u64 + 1));
            assert!(*d >= base && *d < base + Duration::from_millis(64));
        }
        // The same pair waits the same on the same side: reproducible.
        assert_eq!(hello_backoff(&a, &b, 3), hello_backoff(&a, &b, 3));
    }
}

/// Two daemons that dial each other at the same moment, 500 times over with fresh daemons
/// (fresh ports): every request is answered, and no connection is lost before passing. Dialing from
/// the listening port (libp2p's default) let the two dials meet as one TCP connection by
/// simultaneous open, whose handshake failed on both sides: a multi-node job failed with
/// "Failed to dial the requested peer" now and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_dialing_each_other_at_once_always_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
    let rounds = 500;
    for round in 0..rounds {
        let (a, b) = tokio::join!(answering(&ca, "a"), answering(&ca, "b"));
        let (ab, ba) = tokio::join!(
            a.request(b.peer(), b.addrs(), Request::Group),
            b.request(a.peer(), a.addrs(), Request::Group),
        );
        assert!(
            matches!(ab, Ok(Response::Ok)),
            "round {round}: a -> b: {ab:?}"
        );
        assert!(
            matches!(ba, Ok(Response::Ok)),
            "round {round}: b -> a: {ba:?}"
        );
        assert_eq!(
            (a.hellos_lost(), b.hellos_lost()),
            (0, 0),
            "round {round}: a connection failed while being set up"
        );
    }
}

/// A request to a peer whose process is gone (its port closed) fails at once: the refused
/// connection is the answer, not a timeout. Clients and nodes look for the next leader on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_closed_port_fails_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
    let a = answering(&ca, "a").await;
    let gone = answering(&ca, "gone").await;
    let (peer, addrs) = (gone.peer(), gone.addrs().to_vec());
    drop(gone);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    let r = a.request(peer, &addrs, Request::Group).await;
    assert!(
        matches!(&r, Err(e) if e.peer == peer && matches!(e.problem, NetProblem::Connect(_))),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "took {:?}",
        t.elapsed()
    );
}

/// A blocked peer is cut off both ways: the open connection closes, requests either way fail
/// (as a refused dial does, at once), and after the unblock they are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_peer_is_refused_both_ways_until_unblocked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
    let (a, b) = tokio::join!(answering(&ca, "a"), answering(&ca, "b"));
    let ok = |r: &Result<Response, NetError>| matches!(r, Ok(Response::Ok));
    // Two requests: the second goes on the control stream, which the block must end too.
    for _ in 0..2 {
        assert!(ok(&a.request(b.peer(), b.addrs(), Request::Group).await));
    }
    assert!(b.identity(&a.peer()).is_some());
    a.block(b.peer()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.identity(&a.peer()).is_some() || a.identity(&b.peer()).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ab = a.request(b.peer(), b.addrs(), Request::Group).await;
    assert!(ab.is_err(), "{ab:?}");
    let ba = b.request(a.peer(), a.addrs(), Request::Group).await;
    assert!(ba.is_err(), "{ba:?}");
    a.unblock(b.peer()).await;
    assert!(ok(&b.request(a.peer(), a.addrs(), Request::Group).await));
    assert!(ok(&a.request(b.peer(), b.addrs(), Request::Group).await));
}

/// A stream from a peer that has not passed is dropped unread by `Net::accept` (its opener
/// finds it closed); once a peer has passed, its streams come through, with who it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_accepted_only_from_peers_that_have_passed() {
    use futures::{AsyncWriteExt, StreamExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
    let (a, b) = tokio::join!(answering(&ca, "a"), answering(&ca, "b"));
    let mut incoming = a.accept(crate::proto::QUEUE_PROTOCOL).expect("accepting");
    assert!(
        a.accept(crate::proto::QUEUE_PROTOCOL).is_err(),
        "accepted once only"
    );
    // The acceptor takes every stream that passes, as a daemon does.
    let (tx, mut accepted) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Some((peer, who, s)) = incoming.next().await {
            let _ = tx.send((peer, who, s)).await;
        }
    });
    // Connected, without sending a certificate.
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut stranger = Bare::connect(key, &a).await;
    assert!(a.identity(&stranger.peer).is_none(), "it has not passed");
    let mut s = stranger.open(a.peer(), crate::proto::QUEUE_PROTOCOL).await;
    let _ = s.write_all(b"x").await;
    assert!(dropped(&mut s).await, "the stream was dropped");
    assert!(accepted.try_recv().is_err(), "nothing was accepted");
    // Passed: the next stream comes through, with b's identity.
    b.authenticate(a.peer(), a.addrs()).await.expect("b passes");
    let mut s = b
        .streams()
        .open_stream(a.peer(), crate::proto::QUEUE_PROTOCOL)
        .await
        .expect("a stream");
    s.write_all(b"x").await.expect("written");
    let (peer, who, _) = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("in time")
        .expect("a stream");
    assert_eq!((peer, who.name.as_str()), (b.peer(), "b"));
}

/// An address no transport listens on stops the start, with the address and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_that_cannot_listen_does_not_start_and_says_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
    let subject = crate::pki::Subject {
        kind: mvm_component::policy::PrincipalKind::Node,
        name: "n".into(),
        roles: Vec::new(),
    };
    let creds = crate::pki::Credentials::ephemeral(&ca, &subject).expect("creds");
    let config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0".parse().expect("addr")],
        ..NetConfig::default()
    };
    let Err(e) = Net::start(&creds, &config).await else {
        panic!("plain UDP is no transport of ours");
    };
    assert!(matches!(e, StartError::Listen { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("cannot listen on /ip4/127.0.0.1/udp/0: "),
        "{e}"
    );
    assert_eq!(Failure::from(e).kind, FailureKind::Unavailable);
}
