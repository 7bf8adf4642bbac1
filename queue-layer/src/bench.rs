//! Benchmarks of the queue layer, run by `mvm bench queue`.
//!
//! Each figure is measured beside its reference in the same run: queue throughput beside a
//! crossbeam bounded channel of the same capacity and item type, and a remote endpoint over
//! loopback TCP beside raw TCP moving the same bytes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::queue::{Config, Queue};
use crate::remote::{self, Options};

/// How much work each measurement does.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Items per 1-producer-1-consumer run.
    pub items: u64,
    /// Queue and channel capacity.
    pub capacity: usize,
    /// Bytes per TCP run.
    pub tcp_bytes: u64,
    /// Item size for the TCP runs.
    pub tcp_item: usize,
    /// Runs per measurement: throughputs alternate with their reference in `2 * runs - 1`
    /// back-to-back pairs; the best of each and the median of the pairs are reported.
    pub runs: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            items: 2_000_000,
            capacity: 1024,
            tcp_bytes: 512 << 20,
            tcp_item: 64 << 10,
            runs: 3,
        }
    }
}

impl Params {
    /// A small configuration, for tests of the benchmark itself.
    pub fn quick() -> Params {
        Params {
            items: 20_000,
            capacity: 64,
            tcp_bytes: 8 << 20,
            tcp_item: 64 << 10,
            runs: 1,
        }
    }
}

/// The figures of `mvm bench queue`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Item size of the throughput runs, in bytes.
    pub item_bytes: usize,
    /// Capacity of queue and channel.
    pub capacity: usize,
    /// FIFO queue, one producer and one consumer thread: items per second.
    pub fifo_items_per_sec: f64,
    /// Priority queue, same: items per second.
    pub priority_items_per_sec: f64,
    /// crossbeam bounded channel, same: items per second.
    pub crossbeam_items_per_sec: f64,
    /// fifo / crossbeam of the best runs.
    pub fifo_vs_crossbeam: f64,
    /// fifo / crossbeam of each pair of runs made back to back: both swing by a third or more
    /// between runs here, crossbeam's the more, so pairs are compared, not the best of each.
    pub fifo_vs_crossbeam_pairs: Vec<f64>,
    /// The median of the pairs (goal: at least 0.5).
    pub fifo_vs_crossbeam_median: f64,
    /// Item size of the TCP runs, in bytes.
    pub tcp_item_bytes: usize,
    /// Queue → export → loopback TCP → import → queue: MB/s (10^6 bytes).
    pub remote_mb_per_sec: f64,
    /// Raw loopback TCP, writing and reading the same bytes: MB/s.
    pub raw_tcp_mb_per_sec: f64,
    /// remote / raw TCP of the best runs (goal: at least 0.7).
    pub remote_vs_raw_tcp: f64,
    /// remote / raw TCP of each pair of runs made back to back; loopback TCP on a small VM
    /// varies several-fold between runs, so pairs are compared, not distant runs.
    pub remote_vs_raw_tcp_pairs: Vec<f64>,
    /// The median of the pairs.
    pub remote_vs_raw_tcp_median: f64,
    /// Queue → direct link over loopback TCP → queue, the producer and consumer threads doing
    /// the socket I/O themselves: MB/s.
    pub direct_mb_per_sec: f64,
    /// direct / raw TCP of each pair of runs made back to back.
    pub direct_vs_raw_tcp_pairs: Vec<f64>,
    /// The median of the pairs (goal, as for the remote endpoint: at least 0.7).
    pub direct_vs_raw_tcp_median: f64,
    /// One-way latency of 8 B items through direct links, two polling threads: microseconds.
    pub direct_8b_us: f64,
    /// One-way latency of 8 B over raw loopback TCP, blocking reads: microseconds.
    pub raw_tcp_8b_us: f64,
    /// The same with both sides polling non-blocking reads: microseconds.
    pub raw_tcp_polling_8b_us: f64,
}

fn best<F: FnMut() -> f64>(runs: u32, mut f: F) -> f64 {
    (0..runs.max(1)).map(|_| f()).fold(0.0, f64::max)
}

fn rate(count: f64, elapsed: Duration) -> f64 {
    count / elapsed.as_secs_f64().max(1e-9)
}

/// Times one producer thread calling `send(i)` for `i` in `0..items` (stopping early if it
/// returns `false`) against this thread calling `recv` until it returns `false`. Both the queue
/// and the reference channel go through this one harness, so they are measured alike.
fn one_to_one(
    items: u64,
    send: impl Fn(u64) -> bool + Send + 'static,
    recv: impl Fn() -> bool,
) -> f64 {
    let start = Instant::now();
    let producer = thread::spawn(move || {
        for i in 0..items {
            if !send(i) {
                break;
            }
        }
    });
    let mut n = 0u64;
    while recv() {
        n += 1;
    }
    let elapsed = start.elapsed();
    let _ = producer.join();
    rate(n as f64, elapsed)
}

/// One producer thread sends `items` 8-byte items through a queue of `config`; one consumer
/// thread takes them. Returns items per second.
///
/// # Errors
/// The configuration is invalid.
pub fn queue_throughput(config: Config, items: u64) -> Result<f64, crate::queue::ConfigError> {
    // Priorities only where they mean something: a FIFO is sent what crossbeam is.
    let prioritized = config.kind == crate::queue::Kind::Priority;
    let q: Queue<[u8; 8]> = Queue::new("bench", config)?;
    let (tx, rx) = (q.sender(), q.receiver());
    // The sender moves into the producer thread; its drop there closes the queue.
    Ok(one_to_one(
        items,
        move |i| {
            let priority = if prioritized { (i % 7) as i64 } else { 0 };
            tx.send_priority(i.to_le_bytes(), priority).is_ok()
        },
        || rx.recv().is_ok(),
    ))
}

/// The same with a crossbeam bounded channel. Returns items per second.
pub fn crossbeam_throughput(capacity: usize, items: u64) -> f64 {
    let (tx, rx) = crossbeam_channel::bounded::<[u8; 8]>(capacity);
    one_to_one(
        items,
        move |i| tx.send(i.to_le_bytes()).is_ok(),
        || rx.recv().is_ok(),
    )
}

/// Raw TCP on loopback: one thread writes `total` bytes in `chunk`-sized writes, the other
/// reads them. Returns MB/s.
///
/// # Errors
/// Socket failures.
pub fn raw_tcp(total: u64, chunk: usize) -> std::io::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let writer = thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let buf = vec![0x5au8; chunk];
        let mut left = total;
        while left > 0 {
            let n = usize::try_from(left.min(chunk as u64)).unwrap_or(chunk);
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut s, _) = l.accept()?;
    let start = Instant::now();
    let mut buf = vec![0u8; chunk];
    let mut got = 0u64;
    while got < total {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = start.elapsed();
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    Ok(rate(got as f64 / 1e6, elapsed))
}

/// A producer thread sends `count` copies of `payload` into `tx`; this thread takes them from
/// `rx` until its end-of-stream. MB/s since `start`.
fn stream(
    tx: crate::queue::Sender<Bytes>,
    rx: &crate::queue::Receiver<Bytes>,
    count: u64,
    payload: &Bytes,
    start: Instant,
) -> f64 {
    let payload = payload.clone();
    let producer = thread::spawn(move || {
        for _ in 0..count {
            if tx.send(payload.clone()).is_err() {
                break;
            }
        }
    });
    let mut got = 0u64;
    while let Ok(v) = rx.recv() {
        got += v.len() as u64;
    }
    let elapsed = start.elapsed();
    let _ = producer.join();
    rate(got as f64 / 1e6, elapsed)
}

/// A queue extended over loopback TCP: a producer thread fills a local queue, an exporter and
/// an importer move the items, a consumer thread drains the far queue. Returns MB/s.
///
/// # Errors
/// Socket or protocol failures.
pub fn remote_tcp(
    total: u64,
    item: usize,
) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let count = total / item as u64;
    let src: Queue<Bytes> = Queue::new("src", Config::fifo(64))?;
    let dst: Queue<Bytes> = Queue::new("dst", Config::fifo(64))?;
    let (tx, rx_src) = (src.sender(), src.receiver());
    let (tx_dst, rx) = (dst.sender(), dst.receiver());
    let payload = Bytes::from(vec![0x5au8; item]);
    let (a, b) = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (a, b) = (a?, b?.0);
        a.set_nodelay(true)?;
        b.set_nodelay(true)?;
        Ok::<_, std::io::Error>((a, b))
    })?;
    let opts = Options::default();
    let start = Instant::now();
    let exporter = rt.spawn(async move {
        let (r, w) = a.into_split();
        remote::export(&rx_src, r, w, &opts).await
    });
    let importer = rt.spawn(async move {
        let (r, w) = b.into_split();
        remote::import(tx_dst, r, w, &opts).await
    });
    let mb_per_sec = stream(tx, &rx, count, &payload, start);
    rt.block_on(exporter)??;
    rt.block_on(importer)??;
    Ok(mb_per_sec)
}

/// Two loopback sockets, connected.
fn socket_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    Ok((a, b))
}

/// A direct link ([`remote::direct`]) from queue `a` to queue `b` over loopback TCP.
fn direct_pair(
    a: &Queue<Bytes>,
    b: &Queue<Bytes>,
) -> Result<[remote::direct::Link; 2], Box<dyn std::error::Error + Send + Sync>> {
    let (s, t) = socket_pair()?;
    let out = remote::direct::outlet(a.receiver(), s, Box::new(|_| {}))?;
    let inl = remote::direct::inlet(b.sender(), t, 64 << 20, Box::new(|_| {}))?;
    Ok([out, inl])
}

/// The same as [`remote_tcp`] through a direct link: the producer thread writes the socket,
/// the consumer thread reads it. Returns MB/s.
///
/// # Errors
/// Socket failures.
pub fn direct_tcp(
    total: u64,
    item: usize,
) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
    let count = total / item as u64;
    let src: Queue<Bytes> = Queue::new("src", Config::fifo(64))?;
    let dst: Queue<Bytes> = Queue::new("dst", Config::fifo(64))?;
    let links = direct_pair(&src, &dst)?;
    let (tx, rx) = (src.sender(), dst.receiver());
    let payload = Bytes::from(vec![0x5au8; item]);
    let mb_per_sec = stream(tx, &rx, count, &payload, Instant::now());
    drop(links);
    Ok(mb_per_sec)
}

/// One-way latency of 8-byte items through two direct links (a ping-pong between two threads
/// that poll their queues, as vertices on dedicated threads do), in microseconds.
///
/// # Errors
/// Socket failures.
pub fn direct_latency(rounds: u32) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
    let q = |n: &str| Queue::<Bytes>::new(n, Config::fifo(4));
    let (a_out, b_in, b_out, a_in) = (q("a>")?, q("b<")?, q("b>")?, q("a<")?);
    let _ab = direct_pair(&a_out, &b_in)?;
    let _ba = direct_pair(&b_out, &a_in)?;
    let spin = |rx: &crate::queue::Receiver<Bytes>| loop {
        match rx.poll() {
            Ok(v) => return Some(v),
            Err(crate::queue::RecvFailure::Empty) => std::hint::spin_loop(),
            Err(_) => return None,
        }
    };
    let (btx, brx) = (b_out.sender(), b_in.receiver());
    let echo = thread::spawn(move || {
        while let Some(v) = spin(&brx) {
            if btx.send(v).is_err() {
                break;
            }
        }
    });
    let (atx, arx) = (a_out.sender(), a_in.receiver());
    let item = Bytes::from_static(&[7u8; 8]);
    let one = || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        atx.send(item.clone())?;
        spin(&arx).ok_or("the echo ended")?;
        Ok(())
    };
    for _ in 0..rounds / 10 {
        one()?;
    }
    let start = Instant::now();
    for _ in 0..rounds {
        one()?;
    }
    let one_way = start.elapsed().as_secs_f64() / f64::from(rounds.max(1)) / 2.0;
    drop(atx);
    let _ = echo.join();
    Ok(one_way * 1e6)
}

/// One-way latency of 8 bytes over raw loopback TCP, blocking reads, in microseconds.
///
/// # Errors
/// Socket failures.
pub fn raw_tcp_latency(rounds: u32) -> std::io::Result<f64> {
    let (mut a, mut b) = socket_pair()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    let echo = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; 8];
        loop {
            if let Err(e) = b.read_exact(&mut buf) {
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            b.write_all(&buf)?;
        }
    });
    let mut buf = [7u8; 8];
    let start = Instant::now();
    for _ in 0..rounds {
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
    }
    let one_way = start.elapsed().as_secs_f64() / f64::from(rounds.max(1)) / 2.0;
    drop(a);
    echo.join()
        .map_err(|_| std::io::Error::other("echo panicked"))??;
    Ok(one_way * 1e6)
}

/// One-way latency of 8 bytes over raw loopback TCP, both sides polling with non-blocking
/// reads (as MPICH's TCP channel does), in microseconds: the floor for a direct link.
///
/// # Errors
/// Socket failures.
pub fn raw_tcp_polling_latency(rounds: u32) -> std::io::Result<f64> {
    let (mut a, mut b) = socket_pair()?;
    for s in [&a, &b] {
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
    }
    fn read8(s: &mut TcpStream, buf: &mut [u8; 8]) -> std::io::Result<bool> {
        let mut got = 0;
        while got < 8 {
            match s.read(&mut buf[got..]) {
                Ok(0) => return Ok(false),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
    let echo = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; 8];
        while read8(&mut b, &mut buf)? {
            b.write_all(&buf)?;
        }
        Ok(())
    });
    let mut buf = [7u8; 8];
    let start = Instant::now();
    for _ in 0..rounds {
        a.write_all(&buf)?;
        read8(&mut a, &mut buf)?;
    }
    let one_way = start.elapsed().as_secs_f64() / f64::from(rounds.max(1)) / 2.0;
    drop(a);
    echo.join()
        .map_err(|_| std::io::Error::other("echo panicked"))??;
    Ok(one_way * 1e6)
}

/// Runs every measurement.
///
/// # Errors
/// A measurement could not run (sockets, configuration).
pub fn run(p: Params) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    // FIFO and crossbeam alternate, in an odd number of back-to-back pairs.
    let (mut fifo, mut cb, mut fifo_pairs) = (0.0f64, 0.0f64, Vec::new());
    for _ in 0..pair_count(p.runs) {
        let f = queue_throughput(Config::fifo(p.capacity), p.items)?;
        let c = crossbeam_throughput(p.capacity, p.items);
        fifo = fifo.max(f);
        cb = cb.max(c);
        fifo_pairs.push(f / c.max(1e-9));
    }
    let prio = best(p.runs, || {
        queue_throughput(Config::priority(p.capacity), p.items / 4).unwrap_or(0.0)
    });
    let (raw1, remote, pairs) = beside_raw_tcp(p, remote_tcp)?;
    let (raw2, direct, direct_pairs) = beside_raw_tcp(p, direct_tcp)?;
    let raw = raw1.max(raw2);
    let rounds = u32::try_from(p.items / 100).unwrap_or(u32::MAX).max(100);
    let direct_8b_us = direct_latency(rounds)?;
    let raw_tcp_8b_us = raw_tcp_latency(rounds)?;
    let raw_tcp_polling_8b_us = raw_tcp_polling_latency(rounds)?;
    let median = median_of(&pairs);
    Ok(Report {
        item_bytes: 8,
        capacity: p.capacity,
        fifo_items_per_sec: fifo,
        priority_items_per_sec: prio,
        crossbeam_items_per_sec: cb,
        fifo_vs_crossbeam: fifo / cb.max(1e-9),
        fifo_vs_crossbeam_median: median_of(&fifo_pairs),
        fifo_vs_crossbeam_pairs: fifo_pairs,
        tcp_item_bytes: p.tcp_item,
        remote_mb_per_sec: remote,
        raw_tcp_mb_per_sec: raw,
        remote_vs_raw_tcp: remote / raw.max(1e-9),
        remote_vs_raw_tcp_pairs: pairs,
        remote_vs_raw_tcp_median: median,
        direct_mb_per_sec: direct,
        direct_vs_raw_tcp_median: median_of(&direct_pairs),
        direct_vs_raw_tcp_pairs: direct_pairs,
        direct_8b_us,
        raw_tcp_8b_us,
        raw_tcp_polling_8b_us,
    })
}

/// Runs `f` and raw TCP back to back in `2 * p.runs - 1` pairs: the best raw TCP, the best of
/// `f`, and the ratio of each pair.
fn beside_raw_tcp(
    p: Params,
    f: fn(u64, usize) -> Result<f64, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<(f64, f64, Vec<f64>), Box<dyn std::error::Error + Send + Sync>> {
    let (mut raw, mut best, mut pairs) = (0.0f64, 0.0f64, Vec::new());
    for _ in 0..pair_count(p.runs) {
        let r = raw_tcp(p.tcp_bytes, p.tcp_item)?;
        let q = f(p.tcp_bytes, p.tcp_item)?;
        raw = raw.max(r);
        best = best.max(q);
        pairs.push(q / r.max(1e-9));
    }
    Ok((raw, best, pairs))
}

/// How many back-to-back pairs `runs` asks for: an odd number, so the median is one of them.
fn pair_count(runs: u32) -> u32 {
    runs.max(1).saturating_mul(2) - 1
}

fn median_of(v: &[f64]) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_run_moves_everything_and_reports_rates() {
        let p = Params::quick();
        let r = run(p).expect("runs");
        assert!(r.fifo_items_per_sec > 0.0 && r.priority_items_per_sec > 0.0);
        assert!(r.crossbeam_items_per_sec > 0.0 && r.raw_tcp_mb_per_sec > 0.0);
        assert!(r.remote_mb_per_sec > 0.0 && r.direct_mb_per_sec > 0.0);
        assert!(r.direct_8b_us > 0.0 && r.raw_tcp_8b_us > 0.0);
        let json = serde_json::to_value(&r).expect("serializes");
        assert!(json.get("fifo_vs_crossbeam").is_some());
        assert_eq!(r.fifo_vs_crossbeam_pairs.len(), 2 * p.runs as usize - 1);
        assert!(r.fifo_vs_crossbeam_median > 0.0);
    }
}
