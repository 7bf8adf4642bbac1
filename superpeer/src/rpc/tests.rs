//! Tests of control streams.

/// Frames and their encoding.
mod frames {
    use crate::net::conduct::Offence;
    use crate::proto::{Failure, FailureKind};
    use crate::rpc::*;

    #[test]
    fn a_failed_link_tells_every_awaited_answer_why_and_takes_no_more() {
        let (frames, _rx) = mpsc::channel(1);
        let link = Link {
            frames,
            pending: Mutex::new(Some(HashMap::new())),
        };
        let mut waiting = Vec::new();
        for id in 0..3 {
            let (tx, rx) = oneshot::channel();
            link.pending.lock().as_mut().expect("open").insert(id, tx);
            waiting.push(rx);
        }
        link.fail(&StreamError::PeerGone);
        for mut rx in waiting {
            let why = rx.try_recv().expect("an answer").expect_err("a failure");
            assert!(matches!(why, StreamError::PeerGone), "{why}");
        }
        assert!(
            link.pending.lock().is_none(),
            "a failed link takes no request"
        );
        let e = NetError::new(PeerId::random(), StreamError::Closed.into());
        assert!(
            e.to_string().ends_with(": the control stream closed"),
            "{e}"
        );
        assert_eq!(Failure::from(e).kind, FailureKind::Unavailable);
    }

    /// A peer that starts a frame of `len` bytes, sends `sent` of them, and then nothing.
    struct Trickle {
        head: Vec<u8>,
        at: usize,
    }

    impl futures::io::AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let rest = &self.head[self.at..];
            if rest.is_empty() {
                return std::task::Poll::Pending;
            }
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.at += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    /// A runtime whose clock moves only when every task waits.
    fn paused() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_frame_begun_and_not_finished_in_time_is_an_error_and_an_idle_stream_is_not() {
        let rt = paused();
        rt.block_on(async {
            // 64 MiB claimed, 100 bytes sent: the read gives up after the grace and the
            // claimed size at the least rate (10 s + 1024 s), having held what arrived.
            let mut head = (64u32 << 20).to_be_bytes().to_vec();
            head.extend_from_slice(&[0; 100]);
            let mut r = Trickle { head, at: 0 };
            let started = tokio::time::Instant::now();
            let e = read_frame::<Request, _>(&mut r, 64 << 20)
                .await
                .expect_err("a trickled frame");
            assert_eq!(e.offence(), Some(Offence::SlowFrame), "{e}");
            assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_secs(1034) && waited < Duration::from_secs(1040),
                "{waited:?}"
            );
            // An idle stream between frames is no error: it waits.
            let mut idle = Trickle {
                head: Vec::new(),
                at: 0,
            };
            let waited = tokio::time::timeout(
                Duration::from_secs(3600),
                read::<Request, _>(&mut idle, 1024),
            )
            .await;
            assert!(waited.is_err(), "an idle stream ended");
        });
    }

    /// A checkpoint (or a move's leaving step) whose files the broker gives long to go up is
    /// awaited that long and 10 s more; any other request, or one that gives less than the
    /// usual timeout, for the usual timeout.
    #[test]
    fn a_save_given_long_is_awaited_longer_than_the_request_timeout_and_others_are_not() {
        use crate::proto::{BrokerRequest, MoveStep};
        let rt = paused();
        rt.block_on(async {
            let usual = Duration::from_secs(60);
            let links = Links::new(1 << 20, usual);
            let (frames, mut sent) = mpsc::channel(4);
            let link = Arc::new(Link {
                frames,
                pending: Mutex::new(Some(HashMap::new())),
            });
            // The peer answers whatever it was asked 5 minutes after it reads a request.
            let peer = link.clone();
            tokio::spawn(async move {
                while sent.recv().await.is_some() {
                    tokio::time::sleep(Duration::from_secs(300)).await;
                    let asked: Vec<_> = peer
                        .pending
                        .lock()
                        .as_mut()
                        .map(|p| p.drain().collect())
                        .unwrap_or_default();
                    for (_, tx) in asked {
                        let _ = tx.send(Ok(Response::Ok));
                    }
                }
            });
            let checkpoint = |within_ms| {
                Request::Broker(BrokerRequest::Checkpoint {
                    job: "j-1-1".parse().expect("a job id"),
                    attempt: 0,
                    cut: 1,
                    within_ms,
                })
            };
            let leave = |within_ms| {
                Request::Broker(BrokerRequest::Move {
                    job: "j-1-1".parse().expect("a job id"),
                    attempt: 0,
                    step: MoveStep::Leave { cut: 2, within_ms },
                })
            };
            let who = PeerId::random();
            let timed_out = |s: Sent| match s {
                Sent::Done(Err(NetError {
                    problem: NetProblem::NoAnswer(d),
                    ..
                })) => Some(d),
                _ => None,
            };
            for r in [Request::Group, checkpoint(None), leave(Some(1_000))] {
                let t = tokio::time::Instant::now();
                let s = links.send(who, &link, r).await;
                assert_eq!(timed_out(s), Some(usual));
                assert_eq!(t.elapsed(), usual);
            }
            // The peer, asleep over requests queued before, answers each of these when it next
            // wakes: later than the usual timeout, within 10 minutes.
            for r in [checkpoint(Some(3_600_000)), leave(Some(600_000))] {
                let t = tokio::time::Instant::now();
                let s = links.send(who, &link, r).await;
                assert!(matches!(s, Sent::Done(Ok(Response::Ok))), "answered");
                let took = t.elapsed();
                assert!(took > usual && took <= Duration::from_secs(600), "{took:?}");
            }
            // Given more than the usual timeout but less than the peer takes: the given time,
            // and 10 s more.
            let t = tokio::time::Instant::now();
            let s = links.send(who, &link, checkpoint(Some(100_000))).await;
            assert_eq!(timed_out(s), Some(Duration::from_secs(110)));
            assert_eq!(t.elapsed(), Duration::from_secs(110));
        });
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let a = encode(7, &Response::Ok, 1024).expect("encodes");
            let b = encode(u64::MAX, &Response::Ok, 1024).expect("encodes");
            let mut both = futures::io::Cursor::new([a.clone(), b].concat());
            let m = read::<Response, _>(&mut both, 1024).await.expect("reads");
            assert!(matches!(m, Some((7, Response::Ok))));
            let m = read::<Response, _>(&mut both, 1024).await.expect("reads");
            assert!(matches!(m, Some((u64::MAX, Response::Ok))));
            assert!(
                read::<Response, _>(&mut both, 1024)
                    .await
                    .expect("end")
                    .is_none()
            );
            // Cut short inside a frame: an error, not a clean end.
            let mut cut = futures::io::Cursor::new(a[..a.len() - 1].to_vec());
            assert!(read::<Response, _>(&mut cut, 1024).await.is_err());
            // A length over the limit is refused before anything is read into memory.
            let mut big = futures::io::Cursor::new(u32::MAX.to_be_bytes().to_vec());
            let e = read::<Response, _>(&mut big, 1024)
                .await
                .expect_err("too big");
            assert!(e.to_string().contains("limit"), "{e}");
            // Garbage in a well-formed frame.
            let mut junk = 9u32.to_be_bytes().to_vec();
            junk.extend_from_slice(&[0; 8]);
            junk.push(0xff);
            let mut junk = futures::io::Cursor::new(junk);
            let e = read_frame::<Response, _>(&mut junk, 1024)
                .await
                .expect_err("junk");
            assert_eq!(e.offence(), Some(Offence::Malformed), "{e}");
            // Whose fault: the peer's for a frame too big, not for a stream cut short.
            let mut big = futures::io::Cursor::new(u32::MAX.to_be_bytes().to_vec());
            let e = read_frame::<Response, _>(&mut big, 1024)
                .await
                .expect_err("too big");
            assert_eq!(e.offence(), Some(Offence::Oversized), "{e}");
            let mut cut = futures::io::Cursor::new(a[..a.len() - 1].to_vec());
            let e = read_frame::<Response, _>(&mut cut, 1024)
                .await
                .expect_err("cut");
            assert_eq!(e.offence(), None, "{e}");
        });
        assert!(
            encode(1, &"x".repeat(2000), 1024).is_err(),
            "over the limit"
        );
        // An answer over the limit goes as an error answer that fits.
        let big = Response::Error(Failure::new(FailureKind::Failed, "y".repeat(5000)));
        let f = encode_answer(3, &big, 1024);
        assert!(f.len() < 1024 + 12 && f.len() > 12);
    }
}

/// Control streams between real swarms: every request goes on a control stream, answers find
/// their requests whatever their order, a request dropped unanswered fails at once, and a
/// control stream from a peer that has not passed is dropped unread.
pub(super) mod network {
    use std::time::Duration;

    use futures::io::AsyncWriteExt;

    use crate::net::testing::{self, Bare, request_frame};
    use crate::net::{Net, NetConfig};
    use crate::pki::{Ca, Credentials, Subject};
    use crate::proto::NodeRequest;
    use crate::proto::{self, Hash, Request, Response};
    use mvm_component::policy::PrincipalKind;

    pub(in crate::rpc) fn subject(kind: PrincipalKind, name: &str) -> Subject {
        Subject {
            kind,
            name: name.into(),
            roles: vec!["researcher".into()],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_gets_a_few_control_streams_and_a_bounded_number_of_requests_in_flight() {
        use crate::rpc::{IN_FLIGHT, STREAMS_PER_PEER};
        use futures::io::AsyncReadExt;

        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
        let (server, mut inbound) = testing::daemon(&ca, "n", NetConfig::default()).await;
        let creds =
            Credentials::ephemeral(&ca, &subject(PrincipalKind::User, "mallory")).expect("creds");
        let (client, _) = Net::start(&creds, &NetConfig::default())
            .await
            .expect("client");
        let peer = server.peer();
        let addrs = server.addrs().to_vec();
        // Authenticated (and holding one control stream) by a first request.
        let first = tokio::spawn({
            let client = client.clone();
            async move { client.request(peer, &addrs, Request::Group).await }
        });
        let held = inbound.recv().await.expect("the first request");
        held.reply(Response::Ok).await;
        first.await.expect("joined").expect("answered");
        // More streams: the ones up to the limit are served (the acceptor's Ok comes first),
        // the others closed unread.
        let mut control = client.streams();
        let mut served = Vec::new();
        let mut closed = 0;
        // (Each stream over the limit is an offence: two of them do not cut the peer off.)
        for _ in 0..STREAMS_PER_PEER + 1 {
            let mut s = control
                .open_stream(peer, proto::RPC_PROTOCOL)
                .await
                .expect("opened");
            if testing::dropped(&mut s).await {
                closed += 1;
            } else {
                served.push(s);
            }
        }
        assert_eq!(
            (served.len(), closed),
            (STREAMS_PER_PEER - 1, 2),
            "streams served and closed"
        );
        // A flood on one stream: IN_FLIGHT requests reach the daemon, then no more until one
        // is answered.
        let s = &mut served[0];
        let mut flood = Vec::new();
        for id in 0..(IN_FLIGHT as u64 + 20) {
            flood.extend(crate::rpc::encode(id + 1, &Request::Group, 1024).expect("encodes"));
        }
        s.write_all(&flood).await.expect("written");
        s.flush().await.expect("flushed");
        let mut got = Vec::new();
        while let Ok(Some(i)) = tokio::time::timeout(Duration::from_secs(2), inbound.recv()).await {
            got.push(i);
        }
        assert_eq!(got.len(), IN_FLIGHT, "requests in flight from one stream");
        got.pop().expect("one").reply(Response::Ok).await;
        let next = tokio::time::timeout(Duration::from_secs(5), inbound.recv()).await;
        assert!(
            matches!(next, Ok(Some(_))),
            "the next request after an answer"
        );
        // The stream is still readable by its peer: answers come back on it.
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.expect("an answer");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_request_goes_on_a_control_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
        let config = NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            ..NetConfig::default()
        };
        let server_creds =
            Credentials::ephemeral(&ca, &subject(PrincipalKind::Node, "n")).expect("creds");
        let (server, mut inbound) = Net::start(&server_creds, &config).await.expect("server");
        let addrs = server.addrs().to_vec();
        // The server answers a fetch of hash H with H's bytes, holding every answer back until
        // eight have come in and then answering them in reverse, and drops a fetch of all 'e's
        // unanswered.
        let dropped: Hash = "e".repeat(64).parse().expect("a hash");
        let server_task = tokio::spawn({
            async move {
                let mut held = Vec::new();
                while let Some(i) = inbound.recv().await {
                    let Request::Node(NodeRequest::Fetch { hash }) = &i.request else {
                        i.reply(Response::Ok).await;
                        continue;
                    };
                    if *hash == dropped {
                        drop(i);
                        continue;
                    }
                    held.push(i);
                    if held.len() == 8 {
                        while let Some(i) = held.pop() {
                            let Request::Node(NodeRequest::Fetch { hash }) = &i.request else {
                                continue;
                            };
                            let bytes = hash.to_string().into_bytes().into();
                            i.reply(Response::Module(bytes)).await;
                        }
                    }
                }
            }
        });
        let client_creds =
            Credentials::ephemeral(&ca, &subject(PrincipalKind::User, "alice")).expect("creds");
        let (client, _) = Net::start(&client_creds, &NetConfig::default())
            .await
            .expect("client");
        let peer = server.peer();
        let fetch = |n: u32| NodeRequest::Fetch {
            hash: format!("{n:064x}").parse().expect("a hash"),
        };
        // Rounds of eight concurrent requests; the first eight wait together for the peer to
        // pass and for the one stream to open.
        for round in 0..20u32 {
            let mut asks = Vec::new();
            for k in 0..8 {
                let (client, addrs) = (client.clone(), addrs.clone());
                let n = round * 8 + k;
                asks.push(tokio::spawn(async move {
                    (n, client.request(peer, &addrs, fetch(n).into()).await)
                }));
            }
            for a in asks {
                let (n, r) = a.await.expect("join");
                match r {
                    Ok(Response::Module(b)) => {
                        assert_eq!(&b[..], format!("{n:064x}").as_bytes(), "answer to {n}");
                    }
                    other => panic!("request {n}: {other:?}"),
                }
            }
        }
        let on_streams = client.stream_requests();
        assert_eq!(
            on_streams,
            20 * 8,
            "every request went on the control stream"
        );
        // Dropped unanswered: an error at once, not after the request timeout.
        let t = std::time::Instant::now();
        let e = client
            .request(
                peer,
                &addrs,
                Request::Node(NodeRequest::Fetch { hash: dropped }),
            )
            .await
            .expect("an answer");
        assert!(
            matches!(&e, Response::Error(f) if f.message.contains("unanswered")),
            "{e:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(client.stream_requests(), on_streams + 1);

        // A peer that has not passed: its control stream is dropped unread, and its request
        // never reaches the daemon.
        let key = libp2p::identity::Keypair::generate_ed25519();
        let mut stranger = Bare::connect(key, &server).await;
        let mut s = stranger.open(peer, proto::RPC_PROTOCOL).await;
        let _ = s.write_all(&request_frame(&Request::Group)).await;
        assert!(
            testing::dropped(&mut s).await,
            "the acceptor said something to a stranger"
        );
        server_task.abort();
    }

    /// Many daemons sending their first request to one daemon at the same moment are all
    /// answered: the control streams its acceptor drops in the burst (libp2p-stream queues
    /// none while it takes one in) are opened again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_first_requests_is_all_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
        let server = crate::net::testing::answering(&ca, "sp").await;
        let mut clients = Vec::new();
        for n in 0..200 {
            let (c, _) =
                crate::net::testing::daemon(&ca, &format!("n{n}"), NetConfig::default()).await;
            clients.push(c);
        }
        // Connected and passed first, so that the streams open together.
        let (peer, addrs) = (server.peer(), server.addrs().to_vec());
        for c in &clients {
            c.authenticate(peer, &addrs).await.expect("passes");
        }
        let asks = clients
            .iter()
            .map(|c| c.request(peer, &addrs, Request::Group));
        for (n, r) in futures::future::join_all(asks)
            .await
            .into_iter()
            .enumerate()
        {
            assert!(matches!(r, Ok(Response::Ok)), "client {n}: {r:?}");
        }
    }

    /// An opening whose stream hangs untaken (opened on a connection that died unseen) is
    /// tried again within seconds, not left to the request timeout; and a peer declared lost
    /// takes its opening with it, so that a request made once it is back opens a stream of its
    /// own instead of waiting on the stale one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_opening_is_tried_again_and_a_lost_peer_ends_its_opening() {
        use futures::StreamExt;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use crate::rpc::{Links, OPEN_TRY, StreamError};

        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(&dir.path().join("ca"), "physics", 30).expect("init");
        // The bare peer never answers the certificate exchange: its connection is kept anyway.
        let config = NetConfig {
            hello_timeout: Duration::from_secs(120),
            ..NetConfig::default()
        };
        let (daemon, _inbound) = testing::daemon(&ca, "n", config).await;
        let key = libp2p::identity::Keypair::generate_ed25519();
        let mut bare = Bare::connect(key, &daemon).await;
        // The daemon has the connection once it opens its certificate exchange on it.
        bare.hello().await;
        // The bare peer's acceptor takes the first stream and says nothing on it; it takes
        // the second with the acceptor's Ok, and says nothing on any later one.
        let mut incoming = bare
            .control
            .clone()
            .accept(proto::RPC_PROTOCOL)
            .expect("accepting");
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let acceptor = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((_, mut s)) = incoming.next().await {
                if count.fetch_add(1, Ordering::SeqCst) == 1 {
                    let ok = crate::rpc::encode(0, &Response::Ok, 1024).expect("encodes");
                    s.write_all(&ok).await.expect("writes");
                    s.flush().await.expect("flushes");
                }
                held.push(s);
            }
        });
        let timeout = Duration::from_secs(60);
        let links = Links::new(1 << 20, timeout);
        let t = std::time::Instant::now();
        links
            .open(bare.peer, &daemon.streams())
            .await
            .expect("opened on the second try");
        assert!(
            t.elapsed() >= OPEN_TRY && t.elapsed() < OPEN_TRY * 2,
            "{:?}",
            t.elapsed()
        );
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        // Lost while being opened (the third stream is never taken): the request waiting for
        // the opening fails at once with the peer gone, and the next opening is a new one.
        links.close(&bare.peer);
        let opening = tokio::spawn({
            let (links, control) = (links.clone(), daemon.streams());
            async move { links.open(bare.peer, &control).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        let t = std::time::Instant::now();
        links.close(&bare.peer);
        let Err(e) = opening.await.expect("join") else {
            panic!("opened to a peer declared lost");
        };
        assert!(
            matches!(
                &e.problem,
                crate::net::NetProblem::Stream(StreamError::PeerGone)
            ),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        let again = tokio::spawn({
            let (links, control) = (links.clone(), daemon.streams());
            async move { links.open(bare.peer, &control).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            seen.load(Ordering::SeqCst),
            4,
            "a new opening, not the stale one"
        );
        again.abort();
        acceptor.abort();
    }
}
