use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

fn fifo(cap: usize) -> Queue<Vec<u8>> {
    Queue::new("t", Config::fifo(cap)).expect("valid")
}

fn item(n: u32) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

fn num(v: &[u8]) -> u32 {
    u32::from_le_bytes(v.try_into().expect("4 bytes"))
}

#[test]
fn fifo_keeps_order_and_ends_after_last_sender() {
    let q = fifo(8);
    let (tx, rx) = (q.sender(), q.receiver());
    let tx2 = tx.clone();
    for i in 0..5 {
        tx.send(item(i)).expect("room");
    }
    drop(tx);
    assert!(!q.is_closed(), "a sender is still open");
    tx2.send(item(5)).expect("room");
    tx2.close();
    assert!(q.is_closed());
    let got: Vec<u32> = std::iter::from_fn(|| rx.recv().ok())
        .map(|v| num(&v))
        .collect();
    assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
    let e = rx.recv().expect_err("end of stream");
    assert_eq!(e.failure, RecvFailure::Closed);
    assert_eq!(e.queue.as_ref(), "t");
}

#[test]
fn poll_reports_empty_then_the_item_then_the_end() {
    let q = fifo(4);
    let (tx, rx) = (q.sender(), q.receiver());
    assert_eq!(rx.poll(), Err(RecvFailure::Empty));
    tx.send(item(7)).expect("room");
    drop(tx);
    assert_eq!(rx.poll().map(|v| num(&v)), Ok(7));
    assert_eq!(rx.poll(), Err(RecvFailure::Closed));
}

#[test]
fn a_polling_consumer_gets_every_item_in_order_before_the_end() {
    // `poll` does not wait for a send under way; it must still never lose or reorder an item,
    // and report the end only after the last one.
    let q = fifo(8);
    let (tx, rx) = (q.sender(), q.receiver());
    let n = 100_000u32;
    let producer = std::thread::spawn(move || {
        for i in 0..n {
            tx.send(item(i)).expect("room");
        }
    });
    let mut next = 0;
    loop {
        match rx.poll() {
            Ok(v) => {
                assert_eq!(num(&v), next);
                next += 1;
            }
            Err(RecvFailure::Empty) => std::hint::spin_loop(),
            Err(RecvFailure::Closed) => break,
            Err(f) => panic!("{f:?}"),
        }
    }
    producer.join().expect("producer");
    assert_eq!(next, n);
}

#[test]
fn a_closed_queue_refuses_sends_with_the_item() {
    let q = fifo(2);
    let tx = q.sender();
    let _rx = q.receiver();
    q.close();
    let e = tx.send(item(9)).expect_err("closed");
    assert_eq!(e.failure, SendFailure::Closed);
    assert_eq!(num(&e.item), 9);
    assert!(e.to_string().contains("queue 't'"), "{e}");
}

#[test]
fn sends_fail_when_every_receiver_has_gone() {
    let q = fifo(2);
    let tx = q.sender();
    let rx = q.receiver();
    drop(rx);
    assert!(tx.has_no_receivers());
    assert_eq!(
        tx.send(item(1)).expect_err("nobody").failure,
        SendFailure::NoReceivers
    );
    let _rx = q.receiver();
    tx.send(item(1)).expect("a receiver is back");
}

#[test]
fn blocked_producer_wakes_when_a_receiver_leaves() {
    let q = fifo(1);
    let tx = q.sender();
    let rx = q.receiver();
    tx.send(item(0)).expect("room");
    let h = thread::spawn(move || tx.send(item(1)).expect_err("receivers gone").failure);
    thread::sleep(Duration::from_millis(50));
    drop(rx);
    assert_eq!(h.join().expect("no panic"), SendFailure::NoReceivers);
}

#[test]
fn fail_policy_refuses_when_full_and_counts() {
    let q: Queue<Vec<u8>> = Queue::new(
        "f",
        Config {
            overflow: Overflow::Fail,
            ..Config::fifo(2)
        },
    )
    .expect("valid");
    let (tx, _rx) = (q.sender(), q.receiver());
    tx.send(item(0)).expect("room");
    tx.send(item(1)).expect("room");
    let e = tx.send(item(2)).expect_err("full");
    assert_eq!(e.failure, SendFailure::Full);
    assert_eq!(num(&e.item), 2);
    assert_eq!(q.stats().rejected, 1);
}

#[test]
fn drop_oldest_evicts_the_head_and_counts() {
    let q: Queue<Vec<u8>> = Queue::new(
        "d",
        Config {
            overflow: Overflow::DropOldest,
            ..Config::fifo(3)
        },
    )
    .expect("valid");
    let (tx, rx) = (q.sender(), q.receiver());
    for i in 0..5 {
        tx.send(item(i)).expect("never blocks");
    }
    let s = q.stats();
    assert_eq!((s.dropped_items, s.dropped_bytes, s.depth), (2, 8, 3));
    drop(tx);
    let got: Vec<u32> = std::iter::from_fn(|| rx.recv().ok())
        .map(|v| num(&v))
        .collect();
    assert_eq!(got, vec![2, 3, 4]);
}

#[test]
fn drop_oldest_on_priority_evicts_what_would_be_served_last() {
    let cfg = Config {
        overflow: Overflow::DropOldest,
        ..Config::priority(2)
    };
    let q: Queue<Vec<u8>> = Queue::new("p", cfg).expect("valid");
    let (tx, rx) = (q.sender(), q.receiver());
    tx.send_priority(item(1), 1).expect("room");
    tx.send_priority(item(5), 5).expect("room");
    tx.send_priority(item(3), 3).expect("evicts priority 1");
    drop(tx);
    let got: Vec<u32> = std::iter::from_fn(|| rx.recv().ok())
        .map(|v| num(&v))
        .collect();
    assert_eq!(got, vec![5, 3]);
    assert_eq!(q.stats().dropped_items, 1);
}

#[test]
fn a_blocked_producer_takes_a_single_freed_slot() {
    // While it spins, a blocked producer waits for several free slots (so that it does not
    // write next to the consumer); it must still go in when only one ever frees.
    for (cap, pause) in [(1, 0), (2, 0), (64, 0), (1024, 0), (64, 50), (1024, 50)] {
        let q = fifo(cap);
        let (tx, rx) = (q.sender(), q.receiver());
        for i in 0..cap as u32 {
            tx.send(item(i)).expect("room");
        }
        let full = tx.try_send(item(99)).expect_err("full");
        assert_eq!(full.failure, SendFailure::Full);
        assert_eq!(
            q.stats().high_water,
            cap as u64,
            "a full FIFO records its depth"
        );
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let h = thread::spawn(move || {
            let sent = tx.send(item(cap as u32));
            let _ = done_tx.send(sent.is_ok());
            tx
        });
        // At once (likely inside the producer's spin) or once it sleeps, and then never again
        // until it is done.
        thread::sleep(Duration::from_millis(pause));
        assert_eq!(num(&rx.recv().expect("item")), 0);
        assert_eq!(
            done_rx.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "capacity {cap}: the send went in"
        );
        drop(h.join().expect("no panic"));
        let rest: Vec<u32> = std::iter::from_fn(|| rx.recv().ok())
            .map(|v| num(&v))
            .collect();
        assert_eq!(rest, (1..=cap as u32).collect::<Vec<_>>(), "capacity {cap}");
    }
}

#[test]
fn byte_capacity_blocks_until_room() {
    let cfg = Config {
        capacity_bytes: 10,
        ..Config::fifo(100)
    };
    let q: Queue<Vec<u8>> = Queue::new("b", cfg).expect("valid");
    let (tx, rx) = (q.sender(), q.receiver());
    tx.send(vec![0; 6]).expect("room");
    assert_eq!(
        tx.try_send(vec![0; 6]).expect_err("bytes full").failure,
        SendFailure::Full
    );
    tx.send(vec![0; 4]).expect("exactly fits");
    let e = tx.send(vec![0; 11]).expect_err("never fits");
    assert_eq!(
        e.failure,
        SendFailure::TooLarge {
            size: 11,
            limit: 10
        }
    );
    let h = thread::spawn(move || {
        tx.send(vec![1; 6]).expect("room after a receive");
        tx
    });
    thread::sleep(Duration::from_millis(50));
    assert_eq!(rx.recv().expect("item").len(), 6);
    let tx = h.join().expect("no panic");
    drop(tx);
    let sizes: Vec<usize> = std::iter::from_fn(|| rx.recv().ok())
        .map(|v| v.len())
        .collect();
    assert_eq!(sizes, vec![4, 6]);
    let s = q.stats();
    assert!(
        s.blocked >= Duration::from_millis(20),
        "blocked time recorded: {:?}",
        s.blocked
    );
    assert_eq!(s.high_water, 2);
}

#[test]
fn timeouts_return_the_item() {
    let q = fifo(1);
    let (tx, rx) = (q.sender(), q.receiver());
    let e = rx
        .recv_deadline(Instant::now() + Duration::from_millis(20))
        .expect_err("empty");
    assert_eq!(e.failure, RecvFailure::Timeout);
    tx.send(item(0)).expect("room");
    let e = tx
        .send_deadline(
            Entry::new(item(1), 0),
            Instant::now() + Duration::from_millis(20),
        )
        .expect_err("full");
    assert_eq!((e.failure, num(&e.item)), (SendFailure::Timeout, 1));
    assert_eq!(rx.try_recv().map(|v| num(&v)), Ok(0));
    assert_eq!(
        rx.try_recv().expect_err("empty").failure,
        RecvFailure::Empty
    );
}

#[test]
fn priority_serves_highest_first_fifo_among_equals() {
    let q: Queue<Vec<u8>> = Queue::new("p", Config::priority(16)).expect("valid");
    let (tx, rx) = (q.sender(), q.receiver());
    for (n, p) in [(0, 1), (1, 5), (2, 1), (3, 5), (4, -2), (5, 9)] {
        tx.send_priority(item(n), p).expect("room");
    }
    drop(tx);
    let got: Vec<(u32, i64)> = std::iter::from_fn(|| rx.recv_deadline(far()).ok())
        .map(|e| (num(&e.item), e.priority))
        .collect();
    assert_eq!(got, vec![(5, 9), (1, 5), (3, 5), (0, 1), (2, 1), (4, -2)]);
}

#[test]
fn aging_lets_old_low_priority_items_through() {
    // With aging 2, an item gains a level for every 2 later arrivals.
    let cfg = Config {
        aging: Some(2),
        ..Config::priority(64)
    };
    let q: Queue<Vec<u8>> = Queue::new("a", cfg).expect("valid");
    let (tx, rx) = (q.sender(), q.receiver());
    tx.send_priority(item(999), 0).expect("room");
    for n in 0..10 {
        tx.send_priority(item(n), 3).expect("room");
    }
    drop(tx);
    let order: Vec<u32> = std::iter::from_fn(|| rx.recv().ok())
        .map(|v| num(&v))
        .collect();
    let pos = order.iter().position(|&n| n == 999).expect("served");
    // Without aging it would be last (position 10). Ranks are p*2 - seq: item 999 has 0, item n
    // (seq n+1) has 5 - n, so 999 ties item 5 and wins the tie by age: it is served sixth.
    assert_eq!(pos, 5, "order {order:?}");

    // And without aging, strictly last.
    let q: Queue<Vec<u8>> = Queue::new("n", Config::priority(64)).expect("valid");
    let (tx, rx) = (q.sender(), q.receiver());
    tx.send_priority(item(999), 0).expect("room");
    for n in 0..10 {
        tx.send_priority(item(n), 3).expect("room");
    }
    drop(tx);
    let order: Vec<u32> = std::iter::from_fn(|| rx.recv().ok())
        .map(|v| num(&v))
        .collect();
    assert_eq!(order.last(), Some(&999));
}

#[test]
fn many_producers_many_consumers_deliver_each_item_once() {
    let q = fifo(16);
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let tx = q.sender();
            thread::spawn(move || {
                for i in 0..5000u32 {
                    tx.send(item(p * 1_000_000 + i)).expect("receivers alive");
                }
            })
        })
        .collect();
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let rx = q.receiver();
            thread::spawn(move || {
                std::iter::from_fn(|| rx.recv().ok())
                    .map(|v| num(&v))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for p in producers {
        p.join().expect("no panic");
    }
    let all: Vec<Vec<u32>> = consumers
        .into_iter()
        .map(|c| c.join().expect("no panic"))
        .collect();
    let total: usize = all.iter().map(Vec::len).sum();
    let unique: HashSet<u32> = all.iter().flatten().copied().collect();
    assert_eq!(total, 20_000);
    assert_eq!(unique.len(), 20_000);
    // Per producer, each consumer sees that producer's items in order.
    for seen in &all {
        for p in 0..4u32 {
            let mine: Vec<u32> = seen
                .iter()
                .copied()
                .filter(|n| n / 1_000_000 == p)
                .collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "per-producer order kept"
            );
        }
    }
    let s = q.stats();
    assert_eq!((s.items_in, s.items_out, s.depth), (20_000, 20_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_send_and_receive_wait_without_threads() {
    let q = fifo(2);
    let (tx, rx) = (q.sender(), q.receiver());
    let prod = tokio::spawn(async move {
        for i in 0..1000 {
            tx.send_async(item(i)).await.expect("alive");
        }
    });
    let mut got = Vec::new();
    while let Ok(v) = rx.recv_async().await {
        got.push(num(&v));
    }
    prod.await.expect("no panic");
    assert_eq!(got, (0..1000).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_send_until_gives_the_entry_back_when_stopped() {
    let q = fifo(1);
    let (tx, rx) = (q.sender(), q.receiver());
    let sent = tx.send_entry_until(Entry::new(item(1), 3), std::future::pending());
    assert_eq!(sent.await.expect("room").map(|e| e.item), None);
    // Full: the stop comes first, and the entry comes back whole, not sent.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let waiting = tx.send_entry_until(Entry::new(item(2), 5), async {
        let _ = stopped.await;
    });
    let (back, ()) = tokio::join!(waiting, async {
        tokio::task::yield_now().await;
        let _ = stop.send(());
    });
    let back = back.expect("no failure").expect("given back");
    assert_eq!((num(&back.item), back.priority), (2, 5));
    assert_eq!(q.len(), 1, "nothing more went in");
    // Room made while it waits: it is sent.
    let waiting = tx.send_entry_until(back, std::future::pending());
    let (sent, got) = tokio::join!(waiting, async { rx.recv_async().await });
    assert_eq!(sent.expect("room").map(|e| e.item), None);
    assert_eq!(got.map(|v| num(&v)), Ok(1));
    assert_eq!(rx.try_recv().map(|v| num(&v)), Ok(2));
}

#[tokio::test]
async fn receivers_gone_future_completes() {
    let q = fifo(2);
    let tx = q.sender();
    let rx = q.receiver();
    let waiter = tokio::spawn(async move {
        tx.receivers_gone().await;
        tx.has_no_receivers()
    });
    tokio::task::yield_now().await;
    drop(rx);
    assert!(waiter.await.expect("no panic"));
}

#[tokio::test]
async fn closed_future_completes_when_the_last_sender_goes() {
    let q = fifo(2);
    let (a, b) = (q.sender(), q.sender());
    a.send(item(1)).expect("room");
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.closed_async().await })
    };
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(!waiter.is_finished(), "one sender is left");
    drop(b);
    tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
        .await
        .expect("completes at the close")
        .expect("no panic");
    assert_eq!(q.len(), 1, "the item is still there");
}

#[test]
fn requeue_serves_returned_items_again() {
    let q = fifo(2);
    let (tx, rx) = (q.sender(), q.receiver());
    tx.send(item(1)).expect("room");
    tx.send(item(2)).expect("room");
    let first = rx.try_recv_entry().expect("item");
    q.requeue([first]);
    assert_eq!(q.len(), 2);
    let s = q.stats();
    assert_eq!((s.requeued, s.items_out), (1, 0));
    drop(tx);
    let got: Vec<u32> = std::iter::from_fn(|| rx.recv().ok())
        .map(|v| num(&v))
        .collect();
    assert_eq!(got.len(), 2);
    assert!(got.contains(&1) && got.contains(&2));
}

#[test]
fn an_idle_blocked_receiver_does_not_spin() {
    // A receiver blocked on an empty queue for 300 ms must use (almost) no CPU of its own.
    let q = fifo(2);
    let rx = q.receiver();
    let tx = q.sender();
    let h = thread::spawn(move || {
        let before = thread_cpu_time();
        let got = rx.recv().map(|v| num(&v));
        (got, thread_cpu_time().saturating_sub(before))
    });
    thread::sleep(Duration::from_millis(300));
    tx.send(item(7)).expect("room");
    let (got, used) = h.join().expect("no panic");
    assert_eq!(got, Ok(7));
    assert!(
        used < Duration::from_millis(60),
        "the waiting thread used {used:?} of CPU"
    );
}

/// utime + stime of the calling thread, from /proc (Linux clock ticks of 10 ms).
fn thread_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("Linux /proc");
    let after = stat.rsplit(')').next().unwrap_or("");
    // After the command name: state, then numbers; utime and stime are the 12th and 13th fields.
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| {
        f.get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .expect("a number")
    };
    Duration::from_millis((num(11) + num(12)) * 10)
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// A model of a bounded queue, to check the real one against.
#[derive(Debug, Clone)]
enum Op {
    Send(u8, i8),
    Recv,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            (any::<u8>(), -3i8..3).prop_map(|(v, p)| Op::Send(v, p)),
            Just(Op::Recv)
        ],
        0..200,
    )
}

proptest! {
    #[test]
    fn fifo_matches_a_model(ops in ops(), cap in 1usize..8, drop_oldest: bool) {
        let overflow = if drop_oldest { Overflow::DropOldest } else { Overflow::Fail };
        let q: Queue<Vec<u8>> = Queue::new("m", Config { overflow, ..Config::fifo(cap) }).expect("valid");
        let (tx, rx) = (q.sender(), q.receiver());
        let mut model = std::collections::VecDeque::new();
        let mut dropped = 0u64;
        for op in ops {
            match op {
                // A FIFO serves in order, and keeps the priorities it was sent (it does not
                // serve by them).
                Op::Send(v, p) => {
                    let r = tx.try_send_entry(Entry::new(vec![v], i64::from(p)));
                    if model.len() == cap {
                        if drop_oldest {
                            model.pop_front();
                            dropped += 1;
                            prop_assert!(r.is_ok());
                            model.push_back((v, i64::from(p)));
                        } else {
                            prop_assert_eq!(r.expect_err("full").failure, SendFailure::Full);
                        }
                    } else {
                        prop_assert!(r.is_ok());
                        model.push_back((v, i64::from(p)));
                    }
                }
                Op::Recv => {
                    let got = rx.try_recv_entry().ok().map(|e| (e.item[0], e.priority));
                    prop_assert_eq!(got, model.pop_front());
                }
            }
            prop_assert_eq!(q.len(), model.len());
            // One byte an item, in and out.
            prop_assert_eq!(q.stats().depth_bytes, model.len() as u64);
        }
        prop_assert_eq!(q.stats().dropped_items, dropped);
    }

    #[test]
    fn priority_matches_a_model(ops in ops(), cap in 1usize..8) {
        let q: Queue<Vec<u8>> = Queue::new("m", Config { overflow: Overflow::Fail, ..Config::priority(cap) }).expect("valid");
        let (tx, rx) = (q.sender(), q.receiver());
        // The model: (priority, arrival, value); serve max priority, then min arrival.
        let mut model: Vec<(i8, usize, u8)> = Vec::new();
        let mut arrivals = 0;
        for op in ops {
            match op {
                Op::Send(v, p) => {
                    let r = tx.try_send_entry(Entry::new(vec![v], i64::from(p)));
                    if model.len() == cap {
                        prop_assert!(r.is_err());
                    } else {
                        prop_assert!(r.is_ok());
                        model.push((p, arrivals, v));
                        arrivals += 1;
                    }
                }
                Op::Recv => {
                    let best = model.iter().enumerate()
                        .max_by(|(_, a), (_, b)| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
                        .map(|(i, _)| i);
                    let want = best.map(|i| model.remove(i).2);
                    prop_assert_eq!(rx.try_recv().ok().map(|v| v[0]), want);
                }
            }
        }
    }

    #[test]
    fn byte_capacity_is_never_exceeded(sizes in proptest::collection::vec(1usize..40, 1..100)) {
        let cfg = Config { capacity_bytes: 64, overflow: Overflow::Fail, ..Config::fifo(1000) };
        let q: Queue<Vec<u8>> = Queue::new("b", cfg).expect("valid");
        let (tx, rx) = (q.sender(), q.receiver());
        for (i, s) in sizes.into_iter().enumerate() {
            let _ = tx.try_send(vec![0; s]);
            prop_assert!(q.stats().depth_bytes <= 64);
            if i % 3 == 0 { let _ = rx.try_recv(); }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_that_may_stop_give_up_when_woken_with_stop_set_and_lose_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let q = fifo(2);
    let (tx, rx) = (q.sender(), q.receiver());
    let stop = Arc::new(AtomicBool::new(false));
    // A receiver waiting on an empty queue gives up, taking nothing.
    let waiting = {
        let (rx, stop) = (rx.clone(), stop.clone());
        tokio::spawn(async move { rx.recv_async_unless(|| stop.load(Ordering::SeqCst)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished(), "it waits while stop does not hold");
    stop.store(true, Ordering::SeqCst);
    q.wake();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken")
        .expect("joined");
    assert!(got.is_none(), "gave up: {got:?}");
    // A sender waiting for room on a full queue gives its item back, unsent.
    stop.store(false, Ordering::SeqCst);
    tx.send(item(1)).expect("room");
    tx.send(item(2)).expect("room");
    let sending = {
        let (tx, stop) = (tx.clone(), stop.clone());
        tokio::spawn(async move {
            tx.send_async_unless(item(3), || stop.load(Ordering::SeqCst))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!sending.is_finished(), "it waits for room");
    stop.store(true, Ordering::SeqCst);
    q.wake();
    let back = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("woken")
        .expect("joined")
        .expect("not refused");
    assert_eq!(back.as_deref().map(num), Some(3));
    assert_eq!(q.len(), 2);
    // Without stop, both waits complete as plain ones do.
    stop.store(false, Ordering::SeqCst);
    assert_eq!(
        rx.recv_async_unless(|| stop.load(Ordering::SeqCst))
            .await
            .map(|r| num(&r.expect("an item"))),
        Some(1)
    );
    let sent = tx.send_async_unless(item(4), || stop.load(Ordering::SeqCst));
    assert!(sent.await.expect("room").is_none());
    let rest: Vec<u32> = q.drain().iter().map(|e| num(&e.item)).collect();
    assert_eq!(rest, vec![2, 4]);
}
