//! Checkpoint marks on both transports: hold the sending end, drain the receiving end to the
//! MARK, account for every item, release, and check that the consumer still gets every item
//! exactly once and in order. Real TCP on loopback for both.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mvm_queue::queue::{Config, Entry, Queue, Receiver, RecvFailure, SendFailure, Sender};
use mvm_queue::remote::direct::{self, Link};
use mvm_queue::remote::seal::LinkSecret;
use mvm_queue::remote::{self, Drain, Hold, MarkError, Marked, Options, RemoteError, Report};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Transport {
    Stream,
    Direct,
    /// A direct link in sealed records.
    Sealed,
}

/// A test of a scenario over each transport.
macro_rules! on_all {
    ($scenario:ident: $stream:ident, $direct:ident, $sealed:ident) => {
        #[test]
        fn $stream() {
            $scenario(Transport::Stream);
        }

        #[test]
        fn $direct() {
            $scenario(Transport::Direct);
        }

        #[test]
        fn $sealed() {
            $scenario(Transport::Sealed);
        }
    };
}

fn queue(name: &str, cap: usize) -> Queue<Bytes> {
    Queue::new(name, Config::fifo(cap)).expect("valid config")
}

fn item(n: u32) -> Bytes {
    let mut v = vec![(n % 251) as u8; 4 + (n % 13) as usize];
    v[..4].copy_from_slice(&n.to_le_bytes());
    Bytes::from(v)
}

fn num(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// A small deterministic generator; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("MVM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: MVM_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// An outbox, a link of one transport, an inbox, and the link's two controls.
struct Lab {
    rt: Runtime,
    outbox: Queue<Bytes>,
    inbox: Queue<Bytes>,
    hold: Hold,
    drain: Drain,
    ends: Ends,
}

enum Ends {
    Stream {
        export: JoinHandle<Result<Report, RemoteError>>,
        import: JoinHandle<Result<Report, RemoteError>>,
    },
    Direct {
        _links: (Link, Link),
        out: mpsc::Receiver<Result<Report, RemoteError>>,
        inn: mpsc::Receiver<Result<Report, RemoteError>>,
    },
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    (a, b)
}

fn on_done() -> (direct::OnDone, mpsc::Receiver<Result<Report, RemoteError>>) {
    let (tx, rx) = mpsc::channel();
    (
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
        rx,
    )
}

impl Lab {
    fn new(t: Transport, out_cap: usize, in_cap: usize, options: Options) -> Lab {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (outbox, inbox) = (queue("out", out_cap), queue("in", in_cap));
        let (hold, drain) = (Hold::new(), Drain::new());
        let (a, b) = tcp_pair();
        let ends = match t {
            Transport::Stream => {
                let _guard = rt.enter();
                let a = tokio_stream(a);
                let b = tokio_stream(b);
                let (rx, h) = (outbox.receiver(), hold.clone());
                let export =
                    rt.spawn(async move { remote::export_stream_with(&rx, a, &options, &h).await });
                let (tx, d) = (inbox.sender(), drain.clone());
                let import =
                    rt.spawn(async move { remote::import_stream_with(tx, b, &options, &d).await });
                Ends::Stream { export, import }
            }
            Transport::Direct | Transport::Sealed => {
                let wire = match t {
                    Transport::Sealed => {
                        direct::Wire::Sealed(LinkSecret::random().expect("random").key())
                    }
                    _ => direct::Wire::Plain,
                };
                let (od, out) = on_done();
                let (id, inn) = on_done();
                let o = direct::outlet_with(outbox.receiver(), a, wire.clone(), &hold, od)
                    .expect("outlet");
                let i = direct::inlet_with(inbox.sender(), b, 1 << 20, wire.clone(), &drain, id)
                    .expect("inlet");
                Ends::Direct {
                    _links: (o, i),
                    out,
                    inn,
                }
            }
        };
        Lab {
            rt,
            outbox,
            inbox,
            hold,
            drain,
            ends,
        }
    }

    /// Holds the sending end and drains the receiving end for mark `n`, both at once.
    fn checkpoint(&self, n: u64) -> (Result<Marked, MarkError>, Result<Marked, MarkError>) {
        self.rt.block_on(async {
            tokio::time::timeout(LIMIT, async {
                tokio::join!(self.hold.hold(n), self.drain.drain(n))
            })
            .await
            .expect("hold and drain complete in time")
        })
    }

    fn release(&self) {
        self.hold.release();
        self.drain.release();
    }

    /// How the two ends finished: (sending, receiving).
    fn finish(self) -> (Result<Report, RemoteError>, Result<Report, RemoteError>) {
        match self.ends {
            Ends::Stream { export, import } => self.rt.block_on(async {
                tokio::time::timeout(LIMIT, async {
                    let (e, i) = tokio::join!(export, import);
                    (e.expect("no panic"), i.expect("no panic"))
                })
                .await
                .expect("the stream ends in time")
            }),
            Ends::Direct { out, inn, .. } => (
                out.recv_timeout(LIMIT).expect("outlet reports"),
                inn.recv_timeout(LIMIT).expect("inlet reports"),
            ),
        }
    }
}

fn tokio_stream(s: TcpStream) -> tokio::net::TcpStream {
    s.set_nonblocking(true).expect("non-blocking");
    tokio::net::TcpStream::from_std(s).expect("tokio stream")
}

/// Where threads stop while a checkpoint is taken (the vertices' blocking points).
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
    active: usize,
}

impl Gate {
    fn join(&self) {
        self.state.lock().expect("gate").active += 1;
    }

    fn leave(&self) {
        self.state.lock().expect("gate").active -= 1;
        self.cv.notify_all();
    }

    /// Stops here while paused.
    fn point(&self) {
        let mut s = self.state.lock().expect("gate");
        if !s.paused {
            return;
        }
        s.parked += 1;
        self.cv.notify_all();
        while s.paused {
            s = self.cv.wait(s).expect("gate");
        }
        s.parked -= 1;
    }

    /// Pauses every active thread (returns once they are all stopped).
    fn pause(&self) {
        let mut s = self.state.lock().expect("gate");
        s.paused = true;
        while s.parked < s.active {
            s = self.cv.wait(s).expect("gate");
        }
    }

    fn resume(&self) {
        self.state.lock().expect("gate").paused = false;
        self.cv.notify_all();
    }
}

/// Pushes items `0..n`, stopping at the gate between attempts; `sent` counts what went in.
/// The outbox closes after the last.
fn producer(tx: Sender<Bytes>, n: u32, gate: Arc<Gate>, sent: Arc<AtomicU32>) {
    gate.join();
    std::thread::spawn(move || {
        for i in 0..n {
            let mut e = Entry::new(item(i), 0);
            loop {
                gate.point();
                match tx.send_deadline(e, Instant::now() + Duration::from_millis(2)) {
                    Ok(()) => break,
                    Err(err) if err.failure == SendFailure::Timeout => {
                        e = Entry::new(err.item, 0);
                    }
                    Err(err) => panic!("producer: {err}"),
                }
            }
            sent.store(i + 1, Ordering::SeqCst);
        }
        drop(tx);
        gate.leave();
    });
}

/// Takes items until end-of-stream, stopping at the gate; now and then slowly.
fn consumer(
    rx: Receiver<Bytes>,
    gate: Arc<Gate>,
    got: Arc<Mutex<Vec<u32>>>,
    seed: u64,
) -> std::thread::JoinHandle<()> {
    gate.join();
    std::thread::spawn(move || {
        let mut rng = Rng(seed | 1);
        loop {
            gate.point();
            match rx.recv_deadline(Instant::now() + Duration::from_millis(2)) {
                Ok(e) => {
                    got.lock().expect("got").push(num(&e.item));
                    if rng.below(2000) == 0 {
                        std::thread::sleep(Duration::from_millis(3));
                    }
                }
                Err(e) if e.failure == RecvFailure::Timeout => {}
                Err(e) if e.failure == RecvFailure::Closed => break,
                Err(e) => panic!("consumer: {e}"),
            }
        }
        gate.leave();
    })
}

/// With the node paused and the link at its mark: every item sent is exactly once, in order,
/// in what was consumed, the inbox, the held items or the outbox. Puts the queues' items back.
/// Returns (inbox, held) counts.
fn account(lab: &Lab, consumed: &[u32], sent: u32) -> (usize, usize) {
    let inbox = lab.inbox.drain();
    let held = lab.drain.held();
    let outbox = lab.outbox.drain();
    let all: Vec<u32> = consumed
        .iter()
        .copied()
        .chain(inbox.iter().map(|e| num(&e.item)))
        .chain(held.iter().map(|e| num(&e.item)))
        .chain(outbox.iter().map(|e| num(&e.item)))
        .collect();
    let expected: Vec<u32> = (0..sent).collect();
    if all != expected {
        let at = all
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(all.len().min(expected.len()));
        panic!(
            "cut is not exact: {} items accounted for, {sent} sent; first difference at {at} \
             (consumed {}, inbox {}, held {}, outbox {})",
            all.len(),
            consumed.len(),
            inbox.len(),
            held.len(),
            outbox.len()
        );
    }
    assert_eq!(
        lab.drain.held().len(),
        held.len(),
        "reading held items keeps them"
    );
    let counts = (inbox.len(), held.len());
    lab.inbox.requeue(inbox);
    lab.outbox.requeue(outbox);
    counts
}

fn recv(rx: &Receiver<Bytes>) -> Result<u32, RecvFailure> {
    rx.recv_deadline(Instant::now() + LIMIT)
        .map(|e| num(&e.item))
        .map_err(|e| e.failure)
}

/// Takes `items` from the inbox: each once, in order.
fn take_in_order(rx: &Receiver<Bytes>, items: std::ops::Range<u32>) {
    for i in items {
        assert_eq!(recv(rx), Ok(i), "every item once, in order");
    }
}

/// The inbox ends after its last item, and both ends of the link report `n` items, cleanly.
fn ends_cleanly(lab: Lab, rx: &Receiver<Bytes>, n: u32) {
    assert_eq!(recv(rx), Err(RecvFailure::Closed), "end-of-stream");
    let (out, inn) = lab.finish();
    assert_eq!(out.expect("sending end ends cleanly").items, u64::from(n));
    assert_eq!(inn.expect("receiving end ends cleanly").items, u64::from(n));
}

/// A producer pushes 100,000 items into a link whose inbox (16 items) the test consumes
/// itself; at a random moment it stops consuming, pauses the producer and takes a checkpoint.
fn cut_at_a_random_moment(t: Transport) {
    let mut rng = Rng::new(&format!("cut_at_a_random_moment({t:?})"));
    let n = 100_000u32;
    let lab = Lab::new(t, 64, 16, Options::default());
    let (gate, sent) = (Arc::new(Gate::default()), Arc::new(AtomicU32::new(0)));
    producer(lab.outbox.sender(), n, gate.clone(), sent.clone());
    let rx = lab.inbox.receiver();
    // Consume a random number of items (none, a fifth of the time).
    let k = if rng.below(5) == 0 {
        0
    } else {
        rng.below(u64::from(n / 2)) as u32
    };
    let mut consumed = Vec::new();
    for i in 0..k {
        assert_eq!(recv(&rx), Ok(i), "in order before the checkpoint");
        consumed.push(i);
    }
    // The consumer stops; the pipeline fills for a random while.
    std::thread::sleep(Duration::from_millis(rng.below(30)));
    gate.pause();
    let (h, d) = lab.checkpoint(1);
    assert_eq!(h, Ok(Marked::Mark), "the sending end wrote its MARK");
    assert_eq!(d, Ok(Marked::Mark), "the receiving end read it");
    let (inbox, held) = account(&lab, &consumed, sent.load(Ordering::SeqCst));
    eprintln!("k={k}: inbox {inbox}, held {held}");
    if let Transport::Stream = t {
        // What the drain kept was in flight when the exporter was held: at most its window.
        // (Items in the inbox may have been credited already.)
        assert!(
            held <= 256,
            "no more than the window in flight: {held} held"
        );
    }
    lab.release();
    gate.resume();
    take_in_order(&rx, k..n);
    ends_cleanly(lab, &rx, n);
}

on_all!(cut_at_a_random_moment: stream_cut_at_a_random_moment, direct_cut_at_a_random_moment, sealed_cut_at_a_random_moment);

/// With nothing consumed, a direct link has more in flight than the inbox holds: the drain
/// must read past the full inbox (in the socket buffers), and keep it.
#[test]
fn direct_drain_reads_past_a_full_inbox() {
    let lab = Lab::new(Transport::Direct, 64, 16, Options::default());
    let tx = lab.outbox.sender();
    // The outbox stays open.
    let open = lab.outbox.sender();
    // About 50 kB: it fits in the outbox and the loopback socket buffers.
    let n = 2000u32;
    let (gate, sent) = (Arc::new(Gate::default()), Arc::new(AtomicU32::new(0)));
    producer(tx, n, gate.clone(), sent.clone());
    // Wait until all are sent.
    until("the producer is not blocked", || {
        sent.load(Ordering::SeqCst) == n
    });
    let (h, d) = lab.checkpoint(7);
    assert_eq!((h, d), (Ok(Marked::Mark), Ok(Marked::Mark)));
    let (inbox, held) = account(&lab, &[], n);
    assert_eq!(inbox, 16);
    assert!(
        held > 1000,
        "the drain read on past the full inbox: {held} held"
    );
    lab.release();
    let rx = lab.inbox.receiver();
    take_in_order(&rx, 0..n);
    drop(open);
    ends_cleanly(lab, &rx, n);
}

/// Waits until `done` holds (for states no event announces), failing after the limit.
fn until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < LIMIT, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 50 checkpoints while a producer and a consumer run: each cut is exact, and the consumer
/// gets the same output as without them.
fn many_checkpoints(t: Transport) {
    let mut rng = Rng::new(&format!("many_checkpoints({t:?})"));
    let n = 100_000u32;
    let lab = Lab::new(t, 32, 16, Options::default());
    let (gate, sent) = (Arc::new(Gate::default()), Arc::new(AtomicU32::new(0)));
    let got = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    producer(lab.outbox.sender(), n, gate.clone(), sent.clone());
    let c = consumer(
        lab.inbox.receiver(),
        gate.clone(),
        got.clone(),
        rng.below(u64::MAX),
    );
    let (mut ended, mut held) = (0, 0);
    for mark in 1..=50u64 {
        std::thread::sleep(Duration::from_micros(rng.below(4000)));
        gate.pause();
        let (h, d) = lab.checkpoint(mark);
        match (h, d) {
            (Ok(Marked::Mark), Ok(Marked::Mark)) => {
                assert_eq!(lab.drain.last_mark(), Some(mark));
                assert_eq!(ended, 0, "a link that ended stays ended");
            }
            // The producer finished and the link ended before this checkpoint.
            (Ok(Marked::Ended), Ok(Marked::Ended)) => ended += 1,
            other => panic!("checkpoint {mark}: {other:?}"),
        }
        let consumed = got.lock().expect("got").clone();
        let (_, kept) = account(&lab, &consumed, sent.load(Ordering::SeqCst));
        held += kept;
        lab.release();
        gate.resume();
    }
    c.join().expect("consumer");
    eprintln!("{held} items held in all; {ended} checkpoints after the end");
    let got = got.lock().expect("got");
    assert_eq!(got.len(), n as usize, "every item exactly once");
    assert!(got.iter().copied().eq(0..n), "in order");
    let (out, inn) = lab.finish();
    assert_eq!(out.expect("sending end ends cleanly").items, u64::from(n));
    assert_eq!(inn.expect("receiving end ends cleanly").items, u64::from(n));
}

on_all!(many_checkpoints: stream_many_checkpoints, direct_many_checkpoints, sealed_many_checkpoints);

/// A MARK the receiving end was not asked for is recorded and ignored; one with a later number
/// than the drain's fails the drain, and after release the link goes on.
fn unasked_and_wrong_marks(t: Transport) {
    let lab = Lab::new(t, 16, 16, Options::default());
    let tx = lab.outbox.sender();
    let rx = lab.inbox.receiver();
    for i in 0..10 {
        tx.send(item(i)).expect("send");
    }
    // Held without a drain: the MARK goes out, and the receiver reads on past it.
    let h = lab.rt.block_on(lab.hold.hold(1));
    assert_eq!(h, Ok(Marked::Mark));
    assert_eq!(
        lab.rt.block_on(lab.hold.hold(2)),
        Err(MarkError::Busy(1)),
        "one mark at a time"
    );
    lab.hold.release();
    assert_eq!(
        lab.rt.block_on(lab.hold.hold(1)),
        Err(MarkError::Stale { mark: 1, last: 1 })
    );
    for i in 10..20 {
        tx.send(item(i)).expect("send");
    }
    take_in_order(&rx, 0..20);
    assert_eq!(lab.drain.last_mark(), Some(1), "recorded");
    // Drained for 2 while the sender marks 3: the drain fails, the link stops at the MARK.
    // (Drained first: a MARK read before the drain is asked for is only recorded, and a drain
    // for an earlier mark is then refused as stale.)
    let (d, h) = lab.rt.block_on(async {
        tokio::time::timeout(LIMIT, async {
            tokio::join!(lab.drain.drain(2), lab.hold.hold(3))
        })
        .await
        .expect("in time")
    });
    assert_eq!(h, Ok(Marked::Mark));
    assert_eq!(
        d,
        Err(MarkError::Mismatch {
            expected: 2,
            got: 3
        })
    );
    lab.release();
    for i in 20..40 {
        tx.send(item(i)).expect("send");
    }
    take_in_order(&rx, 20..40);
    // Hold and release with nothing in flight, drained too.
    assert_eq!(lab.checkpoint(4), (Ok(Marked::Mark), Ok(Marked::Mark)));
    assert!(lab.drain.held().is_empty());
    lab.release();
    tx.send(item(40)).expect("send");
    assert_eq!(recv(&rx), Ok(40));
    drop(tx);
    ends_cleanly(lab, &rx, 41);
}

on_all!(unasked_and_wrong_marks: stream_unasked_and_wrong_marks, direct_unasked_and_wrong_marks, sealed_unasked_and_wrong_marks);

/// The producers end (the outbox closes) while the link is held: nothing happens until
/// release, then the link ends cleanly after every item.
fn end_while_held(t: Transport) {
    let lab = Lab::new(t, 64, 8, Options::default());
    let tx = lab.outbox.sender();
    for i in 0..50 {
        tx.send(item(i)).expect("send");
    }
    assert_eq!(lab.checkpoint(1), (Ok(Marked::Mark), Ok(Marked::Mark)));
    drop(tx);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!lab.inbox.is_closed(), "held: the end does not cross");
    lab.release();
    let rx = lab.inbox.receiver();
    take_in_order(&rx, 0..50);
    ends_cleanly(lab, &rx, 50);
}

on_all!(end_while_held: stream_end_while_held, direct_end_while_held, sealed_end_while_held);

/// The link's END comes before the MARK while the inbox is full: both ends complete with
/// `Ended`, the receiving end keeps what did not fit and closes the inbox only after
/// delivering it, once released.
///
/// A direct link writes END as soon as its queue ends. An exporter writes it only once every
/// item is credited, which a full inbox prevents until a first checkpoint credits the kept
/// items: there, the END comes at a later checkpoint.
fn end_before_the_mark(t: Transport) {
    let lab = Lab::new(t, 256, 8, Options::default());
    let tx = lab.outbox.sender();
    let n = 200;
    for i in 0..n {
        tx.send(item(i)).expect("send");
    }
    drop(tx);
    let mut mark = 1;
    loop {
        match lab.checkpoint(mark) {
            (Ok(Marked::Ended), Ok(Marked::Ended)) => break,
            (Ok(Marked::Mark), Ok(Marked::Mark)) if matches!(t, Transport::Stream) => {}
            other => panic!("checkpoint {mark}: {other:?}"),
        }
        assert!(mark < 50, "the END never came");
        account(&lab, &[], n);
        lab.release();
        std::thread::sleep(Duration::from_millis(10));
        mark += 1;
    }
    let (inbox, held) = account(&lab, &[], n);
    assert_eq!(inbox + held, n as usize);
    assert!(held > 0, "the inbox was full");
    assert!(!lab.inbox.is_closed(), "kept items come before the end");
    // Another checkpoint of the ended link completes at once, keeping what it keeps.
    lab.release();
    assert_eq!(
        lab.checkpoint(mark + 1),
        (Ok(Marked::Ended), Ok(Marked::Ended))
    );
    lab.release();
    let rx = lab.inbox.receiver();
    take_in_order(&rx, 0..n);
    ends_cleanly(lab, &rx, n);
}

on_all!(end_before_the_mark: stream_end_before_the_mark, direct_end_before_the_mark, sealed_end_before_the_mark);

/// Items a drained importer keeps are credited as processed: released, the exporter has its
/// whole window again although the consumer has taken nothing.
#[test]
fn stream_kept_items_are_credited() {
    let options = Options {
        window_items: 32,
        ..Options::default()
    };
    let lab = Lab::new(Transport::Stream, 1024, 4, options);
    let tx = lab.outbox.sender();
    let n = 1000;
    for i in 0..n {
        tx.send(item(i)).expect("send");
    }
    until("the exporter sends its window", || {
        lab.outbox.len() == n as usize - 32
    });
    assert_eq!(lab.checkpoint(1), (Ok(Marked::Mark), Ok(Marked::Mark)));
    let (inbox, held) = account(&lab, &[], n);
    assert_eq!((inbox, held), (4, 28), "the window was in flight");
    lab.release();
    // The consumer takes nothing; only the credit for what was kept lets more cross.
    until("the exporter gets credit for the kept items", || {
        lab.outbox.len() == n as usize - 64
    });
    let rx = lab.inbox.receiver();
    take_in_order(&rx, 0..n);
    drop(tx);
    ends_cleanly(lab, &rx, n);
}

/// With `credit_on_consume` (work sharing) an item waits in the queue for a consumer before
/// it is credited; a drain does not wait for the paused consumer.
#[test]
fn stream_drain_with_credit_on_consume() {
    let lab = Lab::new(Transport::Stream, 64, 4, Options::work_sharing());
    let tx = lab.outbox.sender();
    for i in 0..20 {
        tx.send(item(i)).expect("send");
    }
    // The importer waits for a consumer to take the first item before it credits it.
    until("the first item crosses", || lab.inbox.len() == 1);
    assert_eq!(lab.checkpoint(1), (Ok(Marked::Mark), Ok(Marked::Mark)));
    let (inbox, held) = account(&lab, &[], 20);
    assert_eq!((inbox, held), (1, 0), "a window of one item");
    lab.release();
    let rx = lab.inbox.receiver();
    take_in_order(&rx, 0..20);
    drop(tx);
    ends_cleanly(lab, &rx, 20);
}
