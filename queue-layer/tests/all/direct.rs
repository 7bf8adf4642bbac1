//! Direct links over real TCP on loopback, driven by the queues' own threads.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mvm_queue::queue::{Config, Queue, RecvFailure};
use mvm_queue::remote::direct::{self, Link};
use mvm_queue::remote::{RemoteError, Report};

fn queue(name: &str, cap: usize) -> Queue<Bytes> {
    Queue::new(name, Config::fifo(cap)).expect("valid config")
}

/// Two ends of a loopback TCP connection.
pub(crate) fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (a, b)
}

/// Where a link end reports how it ended.
pub(crate) type Done = mpsc::Receiver<Result<Report, RemoteError>>;

/// A link end's report callback, and where it arrives.
pub(crate) fn done() -> (direct::OnDone, Done) {
    let (tx, rx) = mpsc::channel();
    (
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
        rx,
    )
}

/// An outbox → link → inbox pair; the links and how they end.
struct Pair {
    outbox: Queue<Bytes>,
    inbox: Queue<Bytes>,
    _links: (Link, Link),
    out_done: Done,
    in_done: Done,
}

fn pair(out_cap: usize, in_cap: usize) -> Pair {
    let (a, b) = tcp_pair();
    let outbox = queue("out", out_cap);
    let inbox = queue("in", in_cap);
    let (od, out_done) = done();
    let (id, in_done) = done();
    let out = direct::outlet(outbox.receiver(), a, od).expect("outlet");
    let inl = direct::inlet(inbox.sender(), b, 64 << 20, id).expect("inlet");
    Pair {
        outbox,
        inbox,
        _links: (out, inl),
        out_done,
        in_done,
    }
}

/// Item `n` of `len` bytes (at least 4): its number, then filler.
pub(crate) fn item(n: u32, len: usize) -> Bytes {
    let mut v = vec![(n % 251) as u8; len.max(4)];
    v[..4].copy_from_slice(&n.to_le_bytes());
    Bytes::from(v)
}

/// How the link end reported (within 20 s).
pub(crate) fn wait(d: &Done) -> Result<Report, RemoteError> {
    d.recv_timeout(Duration::from_secs(20))
        .expect("the link reports within 20 s")
}

#[test]
fn items_cross_in_order_with_backpressure_then_end() {
    let p = pair(8, 4);
    let tx = p.outbox.sender();
    let n = 3000u32;
    let sizes = |i: u32| [0usize, 8, 5000, 70_000][(i % 4) as usize];
    let producer = std::thread::spawn(move || {
        for i in 0..n {
            tx.send_priority(item(i, sizes(i)), i64::from(i))
                .expect("the link takes it");
        }
    });
    let rx = p.inbox.receiver();
    let mut got = 0u32;
    loop {
        match rx.recv_deadline(Instant::now() + Duration::from_secs(20)) {
            Ok(e) => {
                assert_eq!(u32::from_le_bytes(e.item[..4].try_into().expect("4")), got);
                assert_eq!(e.item.len(), sizes(got).max(4));
                assert_eq!(e.priority, i64::from(got), "priority crosses");
                got += 1;
                if got.is_multiple_of(500) {
                    // A slow consumer now and then: the producer must wait, not grow memory.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Err(e) if e.failure == RecvFailure::Closed => break,
            Err(e) => panic!("{e}"),
        }
    }
    producer.join().expect("producer");
    assert_eq!(got, n, "every item, then end-of-stream");
    let out = wait(&p.out_done).expect("outlet ends cleanly");
    let inn = wait(&p.in_done).expect("inlet ends cleanly");
    assert_eq!((out.items, inn.items), (u64::from(n), u64::from(n)));
    assert_eq!(out.bytes, inn.bytes);
    let s = p.outbox.stats();
    assert!(s.high_water <= 8, "outbox bounded: {}", s.high_water);
    assert!(p.inbox.stats().high_water <= 4);
    assert!(
        s.blocked > Duration::ZERO,
        "the producer waited for the slow consumer"
    );
}

#[test]
fn a_consumer_that_waits_is_woken_by_the_helper() {
    let p = pair(4, 4);
    let rx = p.inbox.receiver();
    let consumer = std::thread::spawn(move || rx.recv().map(|b| b.len()));
    // Let the consumer park on the empty inbox before anything is sent.
    std::thread::sleep(Duration::from_millis(100));
    p.outbox.sender().send(item(7, 100)).expect("send");
    assert_eq!(consumer.join().expect("consumer"), Ok(100));
}

#[test]
fn a_broken_connection_fails_both_ends_and_says_how_much_crossed() {
    let (a, b) = tcp_pair();
    let inbox = queue("in", 16);
    let (id, in_done) = done();
    let _link = direct::inlet(inbox.sender(), b, 1 << 20, id).expect("inlet");
    let outbox = queue("out", 16);
    let (od, _out_done) = done();
    let out = direct::outlet(outbox.receiver(), a, od).expect("outlet");
    let tx = outbox.sender();
    for i in 0..5 {
        tx.send(item(i, 10)).expect("send");
    }
    let rx = inbox.receiver();
    for _ in 0..5 {
        rx.recv_deadline(Instant::now() + Duration::from_secs(10))
            .expect("delivered");
    }
    // The sending node goes away without END.
    drop(out);
    match wait(&in_done) {
        Err(RemoteError::Broken { .. } | RemoteError::Io { .. }) => {}
        other => panic!("expected a broken link, got {other:?}"),
    }
    assert_eq!(
        rx.recv_deadline(Instant::now() + Duration::from_secs(5))
            .map_err(|e| e.failure),
        Err(RecvFailure::Closed),
        "the inbox ends with its link"
    );
}

#[test]
fn a_consumer_that_leaves_does_not_block_the_producer() {
    let p = pair(4, 2);
    drop(p.inbox.receiver());
    let tx = p.outbox.sender();
    for i in 0..200 {
        // Into the outbox; the far side reads and drops them for nobody.
        tx.send(item(i, 1000)).expect("send");
    }
    drop(tx);
    let out = wait(&p.out_done).expect("outlet ends");
    let inn = wait(&p.in_done).expect("inlet ends");
    assert_eq!(out.items, 200);
    assert_eq!(inn.items, 200);
    assert_eq!(inn.discarded, 200, "counted, not lost silently");
}

#[test]
fn garbage_on_the_wire_is_a_protocol_error() {
    let (mut a, b) = tcp_pair();
    let inbox = queue("in", 4);
    let (id, in_done) = done();
    let _link = direct::inlet(inbox.sender(), b, 1024, id).expect("inlet");
    // A frame longer than the largest item allowed.
    a.write_all(&100_000u32.to_le_bytes()).expect("write");
    match wait(&in_done) {
        Err(RemoteError::Protocol(m)) => assert!(m.contains("100000"), "{m}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let (mut a, b) = tcp_pair();
    let inbox = queue("in2", 4);
    let (id, in_done) = done();
    let _link = direct::inlet(inbox.sender(), b, 1024, id).expect("inlet");
    // A frame of an unknown kind.
    a.write_all(&[1, 0, 0, 0, 99]).expect("write");
    match wait(&in_done) {
        Err(RemoteError::Protocol(m)) => assert!(m.contains("kind 99"), "{m}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn a_queue_closed_before_its_link_exists_still_ends_the_link() {
    let (a, b) = tcp_pair();
    let outbox = queue("out", 4);
    let tx = outbox.sender();
    tx.send(item(1, 8)).expect("send");
    drop(tx);
    let inbox = queue("in", 4);
    let (id, in_done) = done();
    let (od, out_done) = done();
    let _i = direct::inlet(inbox.sender(), b, 1024, id).expect("inlet");
    let _o = direct::outlet(outbox.receiver(), a, od).expect("outlet");
    assert_eq!(wait(&out_done).expect("ends").items, 1);
    assert_eq!(wait(&in_done).expect("ends").items, 1);
    let rx = inbox.receiver();
    assert_eq!(rx.try_recv().map(|b| b.len()), Ok(8));
    assert_eq!(
        rx.try_recv().map_err(|e| e.failure),
        Err(RecvFailure::Closed)
    );
}

#[test]
fn a_reader_that_goes_away_fails_the_idle_writer() {
    let (a, b) = tcp_pair();
    let outbox = queue("out", 4);
    let (od, out_done) = done();
    let _out = direct::outlet(outbox.receiver(), a, od).expect("outlet");
    let inbox = queue("in", 4);
    let (id, _in_done) = done();
    let inl = direct::inlet(inbox.sender(), b, 1024, id).expect("inlet");
    let tx = outbox.sender();
    tx.send(item(1, 8)).expect("send");
    // Nothing more is sent (the producer stays); the reading node goes away.
    drop(inl);
    let r = wait(&out_done);
    assert!(
        matches!(r, Err(RemoteError::Broken { .. })),
        "the writer hears of it without writing: {r:?}"
    );
    // And its producers are told: the outbox has no consumer any more.
    let e = tx.send(item(2, 8)).expect_err("nobody takes it");
    assert_eq!(e.failure, mvm_queue::queue::SendFailure::NoReceivers);
}

#[test]
fn links_from_several_nodes_feed_one_queue_and_it_ends_after_the_last() {
    // Three senders (three nodes' outboxes) into one inbox, each over a link of its own.
    let inbox = queue("in", 4);
    let mut links = Vec::new();
    let mut dones = Vec::new();
    let mut producers = Vec::new();
    let n = 500u32;
    for s in 0..3u32 {
        let (a, b) = tcp_pair();
        let outbox = queue(&format!("out{s}"), 8);
        let (od, out_done) = done();
        let (id, in_done) = done();
        links.push(direct::outlet(outbox.receiver(), a, od).expect("outlet"));
        links.push(direct::inlet(inbox.sender(), b, 1 << 20, id).expect("a further inlet"));
        dones.push((out_done, in_done));
        let tx = outbox.sender();
        producers.push(std::thread::spawn(move || {
            for i in 0..n {
                tx.send(item(s * n + i, 16)).expect("the link takes it");
            }
        }));
    }
    let rx = inbox.receiver();
    let mut seen = vec![0u32; 3];
    loop {
        match rx.recv_deadline(Instant::now() + Duration::from_secs(20)) {
            Ok(e) => {
                let k = u32::from_le_bytes(e.item[..4].try_into().expect("4"));
                let (s, i) = ((k / n) as usize, k % n);
                assert_eq!(i, seen[s], "each sender's items in order");
                seen[s] += 1;
            }
            Err(e) if e.failure == RecvFailure::Closed => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(seen, [n, n, n], "every item of every sender, then the end");
    for p in producers {
        p.join().expect("producer");
    }
    for (o, i) in &dones {
        assert_eq!(wait(o).expect("outlet").items, u64::from(n));
        assert_eq!(wait(i).expect("inlet").items, u64::from(n));
    }
}
