//! Hostile peers on control streams, between real swarms: bad frames, floods, slow lorises
//! both ways, and strangers: each offender cut off, everyone else served.

use std::time::Duration;

use futures::io::AsyncWriteExt;

use super::tests::network::subject;
use crate::net::testing;
use crate::net::{Net, NetConfig};
use crate::pki::{Ca, Credentials};
use crate::proto::{self, Request, Response};
use mvm_component::policy::PrincipalKind;

/// Two users of `ca`'s domain, mallory and alice, with networks of their own.
async fn users(ca: &Ca) -> (Net, Net) {
    let start = |name: &str| {
        let creds = Credentials::ephemeral(ca, &subject(PrincipalKind::User, name)).expect("creds");
        async move {
            Net::start(&creds, &NetConfig::default())
                .await
                .expect("client")
                .0
        }
    };
    tokio::join!(start("mallory"), start("alice"))
}

/// An authenticated peer that sends frames over the limit, one per stream, is cut off at
/// its third: its connection is closed, its requests fail while it is blocked and are
/// served again after; another peer is served throughout, and the daemon says who it cut
/// off and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_bad_frames_is_cut_off_for_a_while() {
    use crate::net::{Offence, STRIKES};
    use futures::io::AsyncReadExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
    let block_for = Duration::from_secs(3);
    let config = NetConfig {
        block_for,
        ..NetConfig::default()
    };
    let (server, mut inbound) = testing::daemon(&ca, "n", config).await;
    tokio::spawn(async move {
        while let Some(i) = inbound.recv().await {
            i.reply(Response::Ok).await;
        }
    });
    let (mallory, alice) = users(&ca).await;
    let (peer, addrs) = (server.peer(), server.addrs().to_vec());
    let ok = |r: Result<Response, crate::net::NetError>| matches!(r, Ok(Response::Ok));
    assert!(ok(mallory.request(peer, &addrs, Request::Group).await));
    assert!(ok(alice.request(peer, &addrs, Request::Group).await));
    let mut control = mallory.streams();
    for strike in 1..=STRIKES {
        let mut s = control
            .open_stream(peer, proto::RPC_PROTOCOL)
            .await
            .expect("opened");
        // The acceptor's Ok, then a frame that claims 4 GiB.
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.expect("taken");
        let mut taken = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut taken).await.expect("taken");
        s.write_all(&u32::MAX.to_be_bytes()).await.expect("written");
        s.flush().await.expect("flushed");
        assert!(
            testing::dropped(&mut s).await,
            "strike {strike}: still open"
        );
        if strike < STRIKES {
            assert!(server.cut_off().is_empty(), "cut off at strike {strike}");
        }
    }
    let cut = server.cut_off();
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert_eq!(cut[0].peer, mallory.peer());
    assert_eq!(cut[0].offence, Offence::Oversized);
    assert_eq!(cut[0].principal.name, "mallory");
    let counted = server.offences();
    assert!(
        counted.contains(&(Offence::Oversized, STRIKES as u64, 1)),
        "{counted:?}"
    );
    let blocked_at = std::time::Instant::now();
    let deadline = blocked_at + Duration::from_secs(10);
    while server.identity(&mallory.peer()).is_some() {
        assert!(std::time::Instant::now() < deadline, "still connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = mallory.request(peer, &addrs, Request::Group).await;
    assert!(refused.is_err(), "served while blocked: {refused:?}");
    assert!(ok(alice.request(peer, &addrs, Request::Group).await));
    // Served again once the block has ended.
    tokio::time::sleep(block_for.saturating_sub(blocked_at.elapsed())).await;
    let mut again = false;
    for _ in 0..50 {
        if ok(mallory.request(peer, &addrs, Request::Group).await) {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again, "not served after its block");
    assert!(server.cut_off().is_empty());
}

/// A flooding peer is held to its quota (what it costs the daemon is bounded by it), and
/// cut off once it has kept its quota full for a while; a peer within its quota is served
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_held_to_its_quota_then_cut_off() {
    use crate::net::FLOOD_EVERY;
    use crate::net::hostile::Attack;
    use crate::net::{Offence, STRIKES};

    let rate = 100;
    let config = NetConfig {
        request_rate: rate,
        ..NetConfig::default()
    };
    let t = std::time::Instant::now();
    let (server, tally, failed, served, _dir) =
        attacked(Attack::Flood, Duration::from_secs(40), config).await;
    let took = t.elapsed();
    let cut = server.cut_off();
    assert_eq!(cut.len(), 1, "not cut off in {took:?}: {tally:?}");
    assert_eq!(cut[0].offence, Offence::Flood);
    // Two seconds of its bucket, then STRIKES offences FLOOD_EVERY apart.
    let least = FLOOD_EVERY * STRIKES as u32;
    assert!(
        took >= least && took < least + Duration::from_secs(10),
        "cut off after {took:?}"
    );
    // Served at most its quota (and the bucket), however much it sent.
    let most = f64::from(rate) * (took.as_secs_f64() + 2.0) + 10.0;
    assert!(
        (served as f64) <= most,
        "{served} requests served in {took:?}, {most} at most"
    );
    // It kept its quota full (held back, not idle).
    let least = f64::from(rate) * (took.as_secs_f64() - 2.0) * 0.8;
    assert!(
        served as f64 >= least,
        "{served} requests served in {took:?}: {tally:?}"
    );
    assert!(tally.cut_off, "served after the cut: {tally:?}");
    assert_eq!(failed, 0, "the other user's requests failed");
}

/// Runs `attack` from an authenticated user (mallory) against a daemon with `config` that
/// answers everything, for at most `within` or until it cuts someone off, while another
/// user asks every 200 ms; gives the daemon, the attack's tally, how many of the other
/// user's requests failed, and how many of mallory's the daemon was handed.
async fn attacked(
    attack: crate::net::hostile::Attack,
    within: Duration,
    config: NetConfig,
) -> (
    Net,
    crate::net::hostile::Tally,
    usize,
    usize,
    tempfile::TempDir,
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
    let (server, mut inbound) = testing::daemon(&ca, "n", config).await;
    let served = std::sync::Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let served = served.clone();
        async move {
            while let Some(i) = inbound.recv().await {
                if i.principal.name == "mallory" {
                    served.fetch_add(1, Ordering::Relaxed);
                }
                i.reply(Response::Ok).await;
            }
        }
    });
    let (mallory, alice) = users(&ca).await;
    let (peer, addrs) = (server.peer(), server.addrs().to_vec());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let watch = {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move {
            while server.cut_off().is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    let user = {
        let (alice, addrs, stop) = (alice.clone(), addrs.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failed = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = alice.request(peer, &addrs, Request::Group).await;
                if !matches!(r, Ok(Response::Ok)) {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            failed
        })
    };
    let until = std::time::Instant::now() + within;
    let tally = crate::net::hostile::run(&mallory, peer, &addrs, attack, until, &stop).await;
    stop.store(true, Ordering::Relaxed);
    watch.abort();
    let failed = user.await.expect("joined");
    let served = served.load(Ordering::Relaxed);
    (server, tally, failed, served, dir)
}

/// A peer that never reads its answers, and one that begins frames it never ends, are
/// cut off within a bound (three strikes of the frame grace, 10 s, and the claimed length
/// at the least rate), while another user is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_lorises_both_ways_are_cut_off() {
    use crate::net::Offence;
    use crate::net::hostile::Attack;

    for (attack, offence) in [
        (Attack::SlowReader, Offence::SlowReader),
        (Attack::Endless, Offence::SlowFrame),
    ] {
        let t = std::time::Instant::now();
        // No quota: the slow reader also sends as fast as it can, and would be cut off for
        // that first under a quota.
        let config = NetConfig {
            request_rate: 0,
            ..NetConfig::default()
        };
        let (server, tally, failed, _, _dir) =
            attacked(attack, Duration::from_secs(90), config).await;
        let cut = server.cut_off();
        assert_eq!(
            cut.len(),
            1,
            "{attack:?} not cut off in {:?}: {tally:?}",
            t.elapsed()
        );
        assert_eq!(cut[0].offence, offence);
        // Three strikes of the frame grace (10 s) each, on streams that may be given up
        // with their connection and opened again.
        assert!(
            t.elapsed() < Duration::from_secs(75),
            "{attack:?}: {:?}",
            t.elapsed()
        );
        assert!(tally.cut_off, "{attack:?}: served after the cut: {tally:?}");
        assert_eq!(failed, 0, "{attack:?}: the other user's requests failed");
    }
}

/// Unauthenticated TCP connections, a thousand a second (half silent, half sending
/// garbage), do not keep an authenticated user from being served, and cut nobody off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_do_not_keep_users_out() {
    use crate::net::hostile::Attack;

    let (server, tally, failed, _, _dir) = attacked(
        Attack::Strangers,
        Duration::from_secs(8),
        NetConfig::default(),
    )
    .await;
    assert!(tally.sent >= 1000, "{tally:?}");
    assert_eq!(
        failed, 0,
        "the user's requests failed while strangers connected"
    );
    assert!(server.cut_off().is_empty());
}
