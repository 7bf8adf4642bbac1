//! Remote endpoints over an in-memory duplex and over real TCP on loopback.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use mvm_queue::queue::{Config, Entry, Queue};
use mvm_queue::remote::{self, Options, RemoteError};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

fn queue(name: &str, cap: usize) -> Queue<Bytes> {
    Queue::new(name, Config::fifo(cap)).expect("valid config")
}

fn item(n: u32, len: usize) -> Bytes {
    let mut v = vec![0u8; len.max(4)];
    v[..4].copy_from_slice(&n.to_le_bytes());
    Bytes::from(v)
}

fn num(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = l.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    (a.expect("connect"), b.expect("accept").0)
}

/// Moves `n` items of `len` bytes from a source queue over `a`/`b` into a sink queue, with a
/// slow or fast consumer, and checks order and completeness.
async fn pipe<S>(a: S, b: S, n: u32, len: usize, opts: Options, sink_cap: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let src = queue("src", 64);
    let dst = queue("dst", sink_cap);
    let (tx, rx_src) = (src.sender(), src.receiver());
    let (tx_dst, rx) = (dst.sender(), dst.receiver());
    let producer = tokio::spawn(async move {
        for i in 0..n {
            tx.send_async(item(i, len)).await.expect("sink alive");
        }
    });
    let exporter = tokio::spawn(async move { remote::export_stream(&rx_src, a, &opts).await });
    let importer = tokio::spawn(async move { remote::import_stream(tx_dst, b, &opts).await });
    let mut next = 0;
    while let Ok(v) = rx.recv_async().await {
        assert_eq!(num(&v), next, "in order");
        assert_eq!(v.len(), len.max(4));
        next += 1;
    }
    assert_eq!(next, n, "nothing lost");
    producer.await.expect("no panic");
    let out = exporter.await.expect("no panic").expect("export ok");
    let inn = importer.await.expect("no panic").expect("import ok");
    assert_eq!((out.items, inn.items), (u64::from(n), u64::from(n)));
    assert_eq!(out.returned, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_over_duplex_in_order() {
    let (a, b) = tokio::io::duplex(8 * 1024);
    pipe(a, b, 20_000, 8, Options::default(), 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_over_tcp_large_items() {
    let (a, b) = tcp_pair().await;
    pipe(a, b, 300, 200_000, Options::default(), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_with_tiny_windows() {
    let (a, b) = tcp_pair().await;
    let opts = Options {
        window_items: 1,
        window_bytes: 1,
        ..Options::default()
    };
    pipe(a, b, 500, 100, opts, 1).await;
}

/// An `AsyncWrite` that counts the bytes written through it.
struct Counting<W> {
    inner: W,
    written: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.written
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Moves `sizes` over loopback TCP with `opts`, within 20 s; returns how many bytes the
/// importer wrote back (hello, credits, end acknowledgement).
async fn importer_writes(sizes: &[usize], opts: Options) -> usize {
    let (a, b) = tcp_pair().await;
    let src = queue("src", 64);
    let dst = queue("dst", 64);
    let (tx, rx_src) = (src.sender(), src.receiver());
    let (tx_dst, rx) = (dst.sender(), dst.receiver());
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let e = tokio::spawn(async move { remote::export_stream(&rx_src, a, &opts).await });
    let i = tokio::spawn(async move {
        let (r, w) = b.into_split();
        let w = Counting {
            inner: w,
            written: counter,
        };
        remote::import(tx_dst, r, w, &opts).await
    });
    let feed: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(n, &len)| item(n as u32, len))
        .collect();
    let p = tokio::spawn(async move {
        for v in feed {
            tx.send_async(v).await.expect("sink alive");
        }
    });
    let n = sizes.len() as u32;
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        let mut next = 0;
        while let Ok(v) = rx.recv_async().await {
            assert_eq!(num(&v), next, "in order");
            next += 1;
        }
        next
    })
    .await
    .expect("the stream does not stall");
    assert_eq!(got, n, "nothing lost");
    p.await.expect("no panic");
    e.await.expect("no panic").expect("export ok");
    i.await.expect("no panic").expect("import ok");
    written.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_goes_back_in_batches() {
    // 64 KiB items arrive one per read, so the importer is idle after each: credit must still
    // go back a quarter of the window at a time, not one frame per item. (The end, where the
    // exporter asks for the rest, also needs every item credited: the import would not finish.)
    const CREDIT_FRAME: usize = 4 + 1 + 12;
    let n = 2000;
    let written = importer_writes(&vec![64 << 10; n], Options::default()).await;
    let credits = written / CREDIT_FRAME;
    assert!(
        credits < n / 8,
        "{credits} credit frames for {n} items: not batched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_too_large_for_the_rest_of_the_window_still_gets_credit() {
    // A window of 1000 bytes: after a 100-byte item, a 950-byte one does not fit until the
    // 100 bytes are credited, and 100 bytes are less than the quarter of the window that is
    // credited at once. The exporter must ask for them, and get them.
    let sizes: Vec<usize> = (0..400)
        .map(|k| if k % 2 == 0 { 100 } else { 950 })
        .collect();
    let opts = Options {
        window_bytes: 1000,
        ..Options::default()
    };
    importer_writes(&sizes, opts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_crosses_the_wire() {
    // A consumer that takes nothing: the producer must block once the sink queue, the window
    // and the source queue are full, instead of memory growing.
    let (a, b) = tcp_pair().await;
    let src = queue("src", 8);
    let dst = queue("dst", 4);
    let opts = Options {
        window_items: 16,
        ..Options::default()
    };
    let (tx, rx_src) = (src.sender(), src.receiver());
    let (tx_dst, rx) = (dst.sender(), dst.receiver());
    tokio::spawn(async move { remote::export_stream(&rx_src, a, &opts).await });
    tokio::spawn(async move { remote::import_stream(tx_dst, b, &opts).await });
    let producer = tokio::spawn(async move {
        let mut sent = 0u32;
        for i in 0..10_000 {
            if tokio::time::timeout(Duration::from_millis(300), tx.send_async(item(i, 64)))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    let sent = producer.await.expect("no panic");
    // src (8) + exporter's pending (1) + window (16) + dst (4): nothing beyond that.
    assert!(
        sent <= 8 + 1 + 16 + 4,
        "producer got {sent} items out: no backpressure"
    );
    assert!(sent >= 4, "items flowed at first: {sent}");
    assert!(dst.stats().high_water <= 4);
    assert!(
        src.stats().blocked > Duration::ZERO,
        "producer time blocked recorded"
    );
    // The consumer wakes up: everything sent arrives, in order.
    let mut got = 0;
    while got < sent {
        let v = tokio::time::timeout(Duration::from_secs(5), rx.recv_async())
            .await
            .expect("flows")
            .expect("item");
        assert_eq!(num(&v), got);
        got += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_end_with_items_in_flight_delivers_all() {
    // The producer closes right after a burst: whatever is in flight must still arrive.
    for _ in 0..20 {
        let (a, b) = tokio::io::duplex(512);
        let src = queue("src", 256);
        let dst = queue("dst", 256);
        let (tx, rx_src) = (src.sender(), src.receiver());
        let (tx_dst, rx) = (dst.sender(), dst.receiver());
        for i in 0..200 {
            tx.send(item(i, 32)).expect("room");
        }
        drop(tx);
        let opts = Options::default();
        let e = tokio::spawn(async move { remote::export_stream(&rx_src, a, &opts).await });
        let i = tokio::spawn(async move { remote::import_stream(tx_dst, b, &opts).await });
        let mut got = Vec::new();
        while let Ok(v) = rx.recv_async().await {
            got.push(num(&v));
        }
        assert_eq!(got, (0..200).collect::<Vec<_>>());
        e.await.expect("no panic").expect("clean");
        i.await.expect("no panic").expect("clean");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_stream_puts_unacknowledged_items_back() {
    let (a, b) = tcp_pair().await;
    let src = queue("src", 1000);
    // A small sink: the importer blocks on it, so the window's items stay unacknowledged.
    let dst = queue("dst", 10);
    let (tx, rx_src) = (src.sender(), src.receiver());
    for i in 0..1000 {
        tx.send(item(i, 16)).expect("room");
    }
    let opts = Options {
        window_items: 64,
        ..Options::default()
    };
    let exporter = tokio::spawn(async move {
        let r = remote::export_stream(&rx_src, a, &opts).await;
        (r, rx_src)
    });
    // An importer that reads some items, then vanishes without the closing handshake.
    let (tx_dst, rx) = (dst.sender(), dst.receiver());
    let importer = tokio::spawn(async move { remote::import_stream(tx_dst, b, &opts).await });
    let mut received = Vec::new();
    while received.len() < 100 {
        received.push(num(&rx.recv_async().await.expect("items arrive")));
    }
    importer.abort();
    let (result, _rx_src) = exporter.await.expect("no panic");
    let requeued = match result {
        Err(RemoteError::Broken { requeued }) => requeued,
        other => panic!("expected a broken stream, got {other:?}"),
    };
    assert!(requeued > 0, "some items were in flight");
    // Every item is delivered or back in the source queue: none lost. Items the importer had
    // delivered but not yet acknowledged when it died are also put back (at-least-once across a
    // failure: in a real crash they die with the node), so duplicates are bounded by the window.
    drop(tx);
    let mut all = received;
    while let Ok(v) = rx.try_recv() {
        all.push(num(&v));
    }
    all.extend(src.drain().iter().map(|e| num(&e.item)));
    let unique: HashSet<u32> = all.iter().copied().collect();
    assert_eq!(unique.len(), 1000, "every item accounted for");
    assert!(
        all.len() - 1000 <= 64,
        "{} duplicates, more than the window",
        all.len() - 1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_cross_the_wire() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let src: Queue<Bytes> = Queue::new("src", Config::priority(16)).expect("valid");
    let dst: Queue<Bytes> = Queue::new("dst", Config::priority(16)).expect("valid");
    let (tx, rx_src) = (src.sender(), src.receiver());
    for (n, p) in [(1, 1), (2, 7), (3, 3)] {
        tx.send_priority(item(n, 4), p).expect("room");
    }
    drop(tx);
    let (tx_dst, rx) = (dst.sender(), dst.receiver());
    let opts = Options::default();
    let e = tokio::spawn(async move { remote::export_stream(&rx_src, a, &opts).await });
    remote::import_stream(tx_dst, b, &opts)
        .await
        .expect("clean");
    e.await.expect("no panic").expect("clean");
    let mut got = Vec::new();
    while let Ok(en) = rx.try_recv_entry() {
        got.push((num(&en.item), en.priority));
    }
    assert_eq!(got, vec![(2, 7), (3, 3), (1, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_sharing_delivers_each_item_to_exactly_one_consumer() {
    const N: u32 = 3000;
    let shared = queue("work", 64);
    let tx = shared.sender();
    // One local consumer and two remote ones over TCP; the second remote one leaves early.
    let local = shared.receiver();
    let mut remotes = Vec::new();
    for r in 0..2 {
        let (a, b) = tcp_pair().await;
        let rx_shared = shared.receiver();
        let opts = Options::work_sharing();
        tokio::spawn(async move { remote::export_stream(&rx_shared, a, &opts).await });
        let inbox = queue(&format!("inbox{r}"), 1);
        let (tx_in, rx_in) = (inbox.sender(), inbox.receiver());
        let imp = tokio::spawn(async move { remote::import_stream(tx_in, b, &opts).await });
        remotes.push((rx_in, imp));
    }
    let producer = tokio::spawn(async move {
        for i in 0..N {
            tx.send_async(item(i, 8)).await.expect("consumers alive");
        }
    });
    let local_task = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Ok(v) = local.recv_async().await {
            got.push(num(&v));
            if got.len() % 16 == 0 {
                tokio::task::yield_now().await;
            }
        }
        got
    });
    let mut tasks = Vec::new();
    for (idx, (rx_in, imp)) in remotes.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Ok(v) = rx_in.recv_async().await {
                got.push(num(&v));
                if idx == 1 && got.len() == 50 {
                    break; // leaves early: what it holds must go back to the others
                }
            }
            drop(rx_in);
            let report = imp.await.expect("no panic");
            (got, report)
        }));
    }
    producer.await.expect("no panic");
    let mut all = local_task.await.expect("no panic");
    let mut leaver_returned = 0;
    for t in tasks {
        let (got, report) = t.await.expect("no panic");
        let report = report.expect("clean import");
        if report.stopped {
            leaver_returned = report.returned;
        }
        all.extend(got);
    }
    let unique: HashSet<u32> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        N as usize,
        "no duplicates, none lost ({leaver_returned} handed back)"
    );
    assert_eq!(unique.len(), N as usize);
}

#[tokio::test]
async fn a_peer_that_is_not_mvm_is_refused() {
    let (a, mut b) = tokio::io::duplex(1024);
    let q = queue("q", 4);
    let rx = q.receiver();
    let peer = tokio::spawn(async move {
        b.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        b
    });
    let e = remote::export_stream(&rx, a, &Options::default())
        .await
        .expect_err("not our protocol");
    assert!(matches!(e, RemoteError::Protocol(_)), "{e}");
    drop(peer.await);
}

#[tokio::test]
async fn a_silent_peer_times_out() {
    let (a, _b) = tokio::io::duplex(1024);
    let q = queue("q", 4);
    let opts = Options {
        handshake_timeout: Duration::from_millis(50),
        ..Options::default()
    };
    let e = remote::import_stream(q.sender(), a, &opts)
        .await
        .expect_err("silent");
    assert!(matches!(e, RemoteError::HandshakeTimeout(_)), "{e}");
}

#[tokio::test]
async fn items_larger_than_the_peer_accepts_stay_home() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let src = queue("src", 4);
    let dst = queue("dst", 4);
    let tx = src.sender();
    tx.send(item(1, 5000)).expect("room");
    let rx_src = src.receiver();
    let small = Options {
        max_item: 1000,
        ..Options::default()
    };
    let tx_dst = dst.sender();
    let _rx = dst.receiver();
    let imp = tokio::spawn(async move { remote::import_stream(tx_dst, b, &small).await });
    let e = remote::export_stream(&rx_src, a, &Options::default())
        .await
        .expect_err("too large");
    assert!(
        matches!(
            e,
            RemoteError::TooLarge {
                size: 5000,
                limit: 1000
            }
        ),
        "{e}"
    );
    assert_eq!(src.len(), 1, "the item is back in its queue");
    imp.abort();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn any_sizes_and_windows_arrive_in_order(
        sizes in proptest::collection::vec(0usize..3000, 1..60),
        window_items in 1u32..8,
        window_bytes in 1u64..5000,
        pipe_buf in 16usize..4096,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async move {
            let (a, b) = tokio::io::duplex(pipe_buf);
            let src = queue("src", 8);
            let dst = queue("dst", 2);
            let (tx, rx_src) = (src.sender(), src.receiver());
            let (tx_dst, rx) = (dst.sender(), dst.receiver());
            let opts = Options { window_items, window_bytes, ..Options::default() };
            let e = tokio::spawn(async move { remote::export_stream(&rx_src, a, &opts).await });
            let i = tokio::spawn(async move { remote::import_stream(tx_dst, b, &opts).await });
            let expect: Vec<Bytes> = sizes.iter().enumerate().map(|(n, s)| {
                let mut v = vec![0u8; *s];
                v.iter_mut().enumerate().for_each(|(k, x)| *x = (n + k) as u8);
                Bytes::from(v)
            }).collect();
            let feed = expect.clone();
            let p = tokio::spawn(async move {
                for (n, v) in feed.into_iter().enumerate() {
                    tx.send_entry_async(Entry::new(v, n as i64)).await.expect("alive");
                }
            });
            let mut got = Vec::new();
            while let Ok(v) = rx.recv_async().await { got.push(v); }
            p.await.expect("no panic");
            e.await.expect("no panic").expect("clean");
            i.await.expect("no panic").expect("clean");
            assert_eq!(got, expect);
        });
    }
}
