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
    /// Runs of each measurement; the best is reported.
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
    /// fifo / crossbeam (goal: at least 0.5).
    pub fifo_vs_crossbeam: f64,
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
    let q: Queue<[u8; 8]> = Queue::new("bench", config)?;
    let (tx, rx) = (q.sender(), q.receiver());
    // The sender moves into the producer thread; its drop there closes the queue.
    Ok(one_to_one(
        items,
        move |i| tx.send_priority(i.to_le_bytes(), (i % 7) as i64).is_ok(),
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
    rt.block_on(exporter)??;
    rt.block_on(importer)??;
    Ok(rate(got as f64 / 1e6, elapsed))
}

/// Runs every measurement.
///
/// # Errors
/// A measurement could not run (sockets, configuration).
pub fn run(p: Params) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    let fifo = best(p.runs, || {
        queue_throughput(Config::fifo(p.capacity), p.items).unwrap_or(0.0)
    });
    let prio = best(p.runs, || {
        queue_throughput(Config::priority(p.capacity), p.items / 4).unwrap_or(0.0)
    });
    let cb = best(p.runs, || crossbeam_throughput(p.capacity, p.items));
    let (mut raw, mut remote, mut pairs) = (0.0f64, 0.0f64, Vec::new());
    for _ in 0..p.runs.max(1) {
        let r = raw_tcp(p.tcp_bytes, p.tcp_item)?;
        let q = remote_tcp(p.tcp_bytes, p.tcp_item)?;
        raw = raw.max(r);
        remote = remote.max(q);
        pairs.push(q / r.max(1e-9));
    }
    let mut sorted = pairs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    Ok(Report {
        item_bytes: 8,
        capacity: p.capacity,
        fifo_items_per_sec: fifo,
        priority_items_per_sec: prio,
        crossbeam_items_per_sec: cb,
        fifo_vs_crossbeam: fifo / cb.max(1e-9),
        tcp_item_bytes: p.tcp_item,
        remote_mb_per_sec: remote,
        raw_tcp_mb_per_sec: raw,
        remote_vs_raw_tcp: remote / raw.max(1e-9),
        remote_vs_raw_tcp_pairs: pairs,
        remote_vs_raw_tcp_median: median,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_run_moves_everything_and_reports_rates() {
        let r = run(Params::quick()).expect("runs");
        assert!(r.fifo_items_per_sec > 0.0 && r.priority_items_per_sec > 0.0);
        assert!(r.crossbeam_items_per_sec > 0.0 && r.raw_tcp_mb_per_sec > 0.0);
        assert!(r.remote_mb_per_sec > 0.0);
        let json = serde_json::to_value(&r).expect("serializes");
        assert!(json.get("fifo_vs_crossbeam").is_some());
    }
}
