//! Sealed direct links over real TCP on loopback: items cross as on a plain link, and a man in
//! the middle (a proxy between the two ends that parses the records) who changes, replays,
//! reorders, drops or cuts them fails the link with a clear error; nothing after the tampered
//! record reaches the consumer.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mvm_queue::queue::{Config, Queue, RecvFailure};
use mvm_queue::remote::direct::{self, Link, Wire};
use mvm_queue::remote::seal::{LinkSecret, RECORD};
use mvm_queue::remote::{Drain, Hold, RemoteError, Report};

use crate::direct::{done, item, tcp_pair, wait};

/// What the man in the middle does to the record numbered `at` (counting from 0).
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// Passes everything on.
    None,
    /// Flips a bit of its ciphertext.
    Flip,
    /// Sends it twice.
    Replay,
    /// Sends the next record before it.
    Swap,
    /// Leaves it out.
    Drop,
    /// Closes the connection before it.
    Cut,
    /// Sends half of it, then closes the connection.
    CutInside,
}

/// A proxy between `from` (the outlet's socket) and `to` (the inlet's), record by record.
fn man_in_the_middle(mut from: TcpStream, mut to: TcpStream, at: u64, attack: Attack) {
    std::thread::spawn(move || {
        let read_record = |from: &mut TcpStream| -> Option<Vec<u8>> {
            let mut head = [0u8; 4];
            from.read_exact(&mut head).ok()?;
            let len = u32::from_le_bytes(head) as usize;
            let mut r = head.to_vec();
            r.resize(4 + len, 0);
            from.read_exact(&mut r[4..]).ok()?;
            Some(r)
        };
        let mut n = 0u64;
        while let Some(mut r) = read_record(&mut from) {
            if n == at {
                match attack {
                    Attack::None => {}
                    Attack::Flip => r[4] ^= 0x20,
                    Attack::Replay => {
                        let _ = to.write_all(&r);
                    }
                    Attack::Swap => {
                        if let Some(next) = read_record(&mut from) {
                            let _ = to.write_all(&next);
                            n += 1;
                        }
                    }
                    Attack::Drop => {
                        n += 1;
                        continue;
                    }
                    Attack::Cut => break,
                    Attack::CutInside => {
                        let _ = to.write_all(&r[..r.len() / 2]);
                        break;
                    }
                }
            }
            if to.write_all(&r).is_err() {
                break;
            }
            n += 1;
        }
        let _ = to.shutdown(Shutdown::Write);
        // Keep reading so the outlet is not left blocked.
        let mut sink = [0u8; 1 << 16];
        while matches!(from.read(&mut sink), Ok(k) if k > 0) {}
    });
}

/// A sealed link through a man in the middle; `items` (sent one at a time, each flushed
/// before the next, so that each is a record of its own) and how the ends report.
struct Run {
    got: Vec<u32>,
    inlet: Result<Report, RemoteError>,
}

fn run(attack: Attack, at: u64, sizes: &[usize], key_of_inlet: Option<LinkSecret>) -> Run {
    let secret = LinkSecret::random().expect("random");
    let (a, m1) = tcp_pair();
    let (m2, b) = tcp_pair();
    man_in_the_middle(m1, m2, at, attack);
    let outbox: Queue<Bytes> = Queue::new("out", Config::fifo(4)).expect("queue");
    let inbox: Queue<Bytes> = Queue::new("in", Config::fifo(1024)).expect("queue");
    let (od, _out_done) = done();
    let (id, in_done) = done();
    let in_key = key_of_inlet.unwrap_or_else(|| secret.clone()).key();
    let _o: Link = direct::outlet_with(
        outbox.receiver(),
        a,
        Wire::Sealed(secret.key()),
        &Hold::new(),
        od,
    )
    .expect("outlet");
    let _i: Link = direct::inlet_with(
        inbox.sender(),
        b,
        1 << 20,
        Wire::Sealed(in_key),
        &Drain::new(),
        id,
    )
    .expect("inlet");
    let tx = outbox.sender();
    let rx = inbox.receiver();
    let mut got = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let i = u32::try_from(i).expect("few");
        if tx.send(item(i, len)).is_err() {
            break;
        }
        // One record per item: wait until it crossed (or the link failed).
        match rx.recv_deadline(Instant::now() + Duration::from_millis(500)) {
            Ok(e) => got.push(u32::from_le_bytes(e.item[..4].try_into().expect("4"))),
            Err(e) if e.failure == RecvFailure::Closed => break,
            Err(_) => {}
        }
    }
    drop(tx);
    while let Ok(e) = rx.recv_deadline(Instant::now() + Duration::from_secs(5)) {
        got.push(u32::from_le_bytes(e.item[..4].try_into().expect("4")));
    }
    Run {
        got,
        inlet: wait(&in_done),
    }
}

fn sealed_error(r: &Run) -> String {
    match &r.inlet {
        Err(e @ RemoteError::Sealed(_)) => e.to_string(),
        other => panic!(
            "expected a sealed-link error, got {other:?} (items {:?})",
            r.got
        ),
    }
}

#[test]
fn items_of_every_size_cross_a_sealed_link_in_order_then_end() {
    let secret = LinkSecret::random().expect("random");
    let (a, b) = tcp_pair();
    let outbox: Queue<Bytes> = Queue::new("out", Config::fifo(8)).expect("queue");
    let inbox: Queue<Bytes> = Queue::new("in", Config::fifo(4)).expect("queue");
    let (od, out_done) = done();
    let (id, in_done) = done();
    let _o = direct::outlet_with(
        outbox.receiver(),
        a,
        Wire::Sealed(secret.key()),
        &Hold::new(),
        od,
    )
    .expect("outlet");
    let _i = direct::inlet_with(
        inbox.sender(),
        b,
        64 << 20,
        Wire::Sealed(secret.key()),
        &Drain::new(),
        id,
    )
    .expect("inlet");
    let n = 2000u32;
    // Items within a record, across two, and across many (a record holds 64 KiB).
    let sizes = |i: u32| [0usize, 8, 5000, RECORD + 1, 3 * RECORD + 17][(i % 5) as usize];
    let tx = outbox.sender();
    let producer = std::thread::spawn(move || {
        for i in 0..n {
            tx.send_priority(item(i, sizes(i)), i64::from(i))
                .expect("the link takes it");
        }
    });
    let rx = inbox.receiver();
    let mut got = 0u32;
    loop {
        match rx.recv_deadline(Instant::now() + Duration::from_secs(20)) {
            Ok(e) => {
                assert_eq!(u32::from_le_bytes(e.item[..4].try_into().expect("4")), got);
                assert_eq!(e.item.len(), sizes(got).max(4));
                assert!(
                    e.item[4..].iter().all(|&b| b == (got % 251) as u8),
                    "item {got} arrives as sent"
                );
                assert_eq!(e.priority, i64::from(got));
                got += 1;
            }
            Err(e) if e.failure == RecvFailure::Closed => break,
            Err(e) => panic!("{e}"),
        }
    }
    producer.join().expect("producer");
    assert_eq!(got, n);
    let out = wait(&out_done).expect("outlet ends cleanly");
    let inn = wait(&in_done).expect("inlet ends cleanly");
    assert_eq!((out.items, inn.items), (u64::from(n), u64::from(n)));
    assert_eq!(out.bytes, inn.bytes);
}

#[test]
fn an_honest_proxy_changes_nothing() {
    let r = run(Attack::None, 0, &[8, 8, 100, 8], None);
    assert_eq!(r.got, [0, 1, 2, 3]);
    assert_eq!(r.inlet.expect("ends cleanly").items, 4);
}

#[test]
fn a_changed_record_fails_the_link_and_nothing_of_it_is_delivered() {
    let r = run(Attack::Flip, 2, &[8, 8, 8, 8, 8], None);
    let e = sealed_error(&r);
    assert!(e.contains("record 2 failed authentication"), "{e}");
    assert_eq!(r.got, [0, 1], "only the items before the changed record");
}

#[test]
fn a_replayed_record_fails_the_link() {
    let r = run(Attack::Replay, 1, &[8, 8, 8, 8], None);
    let e = sealed_error(&r);
    assert!(e.contains("record 2 failed authentication"), "{e}");
    assert_eq!(r.got, [0, 1], "the replay is not delivered");
}

#[test]
fn reordered_records_fail_the_link() {
    let r = run(Attack::Swap, 1, &[8, 8, 8, 8], None);
    let e = sealed_error(&r);
    assert!(e.contains("record 1 failed authentication"), "{e}");
    assert_eq!(r.got, [0]);
}

#[test]
fn a_dropped_record_fails_the_link() {
    let r = run(Attack::Drop, 1, &[8, 8, 8, 8], None);
    let e = sealed_error(&r);
    assert!(e.contains("record 1 failed authentication"), "{e}");
    assert_eq!(r.got, [0]);
}

#[test]
fn a_link_cut_between_records_is_broken_not_ended() {
    let r = run(Attack::Cut, 2, &[8, 8, 8, 8], None);
    assert!(
        matches!(r.inlet, Err(RemoteError::Broken { .. })),
        "a cut link does not end cleanly: {:?}",
        r.inlet
    );
    assert_eq!(r.got, [0, 1]);
}

#[test]
fn a_link_cut_inside_a_record_says_so() {
    let r = run(Attack::CutInside, 1, &[8, 8, 8], None);
    let e = sealed_error(&r);
    assert!(e.contains("in the middle of a record"), "{e}");
    assert_eq!(r.got, [0]);
}

#[test]
fn an_end_with_another_key_opens_nothing() {
    let other = LinkSecret::random().expect("random");
    let r = run(Attack::None, 0, &[8, 8], Some(other));
    let e = sealed_error(&r);
    assert!(e.contains("record 0 failed authentication"), "{e}");
    assert!(r.got.is_empty());
}

#[test]
fn a_plain_writer_is_refused_by_a_sealed_reader() {
    let (a, b) = tcp_pair();
    let outbox: Queue<Bytes> = Queue::new("out", Config::fifo(4)).expect("queue");
    let inbox: Queue<Bytes> = Queue::new("in", Config::fifo(4)).expect("queue");
    let (od, _) = done();
    let (id, in_done) = done();
    let _o = direct::outlet(outbox.receiver(), a, od).expect("outlet");
    let _i = direct::inlet_with(
        inbox.sender(),
        b,
        1 << 20,
        Wire::Sealed(LinkSecret::random().expect("random").key()),
        &Drain::new(),
        id,
    )
    .expect("inlet");
    outbox.sender().send(item(0, 8)).expect("send");
    match wait(&in_done) {
        Err(RemoteError::Sealed(_)) => {}
        other => panic!("expected a sealed-link error, got {other:?}"),
    }
    assert_eq!(
        inbox
            .receiver()
            .recv_deadline(Instant::now() + Duration::from_secs(2))
            .map_err(|e| e.failure),
        Err(RecvFailure::Closed),
        "nothing delivered"
    );
}
