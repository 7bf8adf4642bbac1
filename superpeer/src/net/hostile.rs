//! A hostile peer, for the benchmark that measures what one does to a daemon (`mvm bench
//! hostile`) and for tests: each [`Attack`] is what the `conduct` module and the control
//! streams' bounds are there to withstand. Not part of the API.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::io::{AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use super::Net;
use crate::proto::{self, Request, Response};

/// What the hostile peer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Requests as fast as its control streams carry them, 256 at a time.
    Flood,
    /// Control streams opened (one after another, each taken by the daemon) as fast as it
    /// can, each held open.
    Streams,
    /// A frame that claims 4 GiB on each of its streams.
    Oversized,
    /// A frame that claims 64 KiB and sends a byte a second, on every stream it may hold.
    Endless,
    /// Requests sent on every stream it may hold, and no answer read (a slow loris).
    SlowReader,
    /// Unauthenticated: TCP connections to the daemon's listening port, 100 silent and 100
    /// sending garbage every 200 ms, each held for 5 s (about 2,000 open at once).
    Strangers,
}

impl Attack {
    /// Every attack.
    pub const ALL: [Attack; 6] = [
        Attack::Flood,
        Attack::Streams,
        Attack::Oversized,
        Attack::Endless,
        Attack::SlowReader,
        Attack::Strangers,
    ];

    /// Its name (as `mvm bench hostile` takes it).
    pub fn name(self) -> &'static str {
        match self {
            Attack::Flood => "flood",
            Attack::Streams => "streams",
            Attack::Oversized => "oversized",
            Attack::Endless => "endless",
            Attack::SlowReader => "slow-reader",
            Attack::Strangers => "strangers",
        }
    }
}

impl std::str::FromStr for Attack {
    type Err = String;
    fn from_str(s: &str) -> Result<Attack, String> {
        Attack::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("no attack '{s}' (one of flood, streams, oversized, endless, slow-reader, strangers)"))
    }
}

/// What the hostile peer saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Requests, streams or connections it sent or opened.
    pub sent: u64,
    /// Requests answered `Ok`-like (not an error).
    pub answered: u64,
    /// Requests answered with an error (`busy`, mostly).
    pub refused: u64,
    /// Requests or streams that failed on the way (closed, refused connections).
    pub failed: u64,
    /// Whether, at the end, its requests were refused at the connection (it was cut off and is
    /// blocked).
    pub cut_off: bool,
    /// Seconds from the start to its first failure on the way, if any.
    pub first_failure_secs: Option<f64>,
}

/// When the attack is to end: at `until`, or once `stop` is set.
#[derive(Clone, Copy)]
struct End<'a> {
    until: Instant,
    stop: &'a AtomicBool,
}

impl End<'_> {
    /// Whether it has come.
    fn come(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.until
    }

    /// Waits for it (checked every 50 ms).
    async fn wait(self) {
        while !self.come() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs `attack` on the daemon `peer` at `addrs` from `net` until `until`, or until `stop` is
/// set; at the end, asks once more to see whether it was cut off.
pub async fn run(
    net: &Net,
    peer: PeerId,
    addrs: &[Multiaddr],
    attack: Attack,
    until: Instant,
    stop: &AtomicBool,
) -> Tally {
    let start = Instant::now();
    let end = End { until, stop };
    let mut t = Tally::default();
    if attack == Attack::Strangers {
        strangers(addrs, end, &mut t).await;
        return t;
    }
    // Authenticated first, as a well-behaved peer would be.
    let _ = net.request(peer, addrs, Request::Group).await;
    let mut held = std::collections::VecDeque::new();
    let fail = |t: &mut Tally| {
        t.failed += 1;
        t.first_failure_secs
            .get_or_insert(start.elapsed().as_secs_f64());
    };
    while !end.come() {
        match attack {
            Attack::Flood => {
                let batch = (0..256).map(|_| net.request(peer, addrs, Request::Group));
                let batch = futures::future::join_all(batch);
                let Some(answers) = within(end, batch).await else {
                    break;
                };
                for r in answers {
                    t.sent += 1;
                    match r {
                        Ok(Response::Error(_)) => t.refused += 1,
                        Ok(_) => t.answered += 1,
                        Err(_) => fail(&mut t),
                    }
                }
                if t.first_failure_secs.is_some() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Attack::Streams => {
                // Held open, up to 10,000 (more are opened, and the oldest let go); those the
                // daemon closes unread are failures.
                for _ in 0..64 {
                    t.sent += 1;
                    match within(end, taken(net, peer, addrs)).await {
                        Some(Some(s)) => {
                            t.answered += 1;
                            held.push_back(s);
                        }
                        Some(None) => fail(&mut t),
                        None => break,
                    }
                    if held.len() > 10_000 {
                        held.pop_front();
                    }
                }
            }
            Attack::Oversized | Attack::Endless | Attack::SlowReader => {
                // Opened one after another (streams opened at once can be dropped unread
                // when the acceptor is busy), then abused together.
                let mut streams = Vec::new();
                for _ in 0..crate::rpc::STREAMS_PER_PEER - 1 {
                    t.sent += 1;
                    match taken(net, peer, addrs).await {
                        Some(s) => streams.push(s),
                        None => fail(&mut t),
                    }
                }
                let abused = streams.into_iter().map(|s| abuse(s, attack, end));
                futures::future::join_all(abused).await;
                if t.first_failure_secs.is_some() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Attack::Strangers => {}
        }
    }
    let last = net.request(peer, addrs, Request::Group).await;
    t.cut_off = last.is_err();
    t
}

/// What `f` comes to, unless the end comes first.
async fn within<T>(end: End<'_>, f: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::select! {
        t = f => Some(t),
        () = end.wait() => None,
    }
}

/// A control stream the daemon has taken (its `Ok` read), if one can be opened.
async fn taken(net: &Net, peer: PeerId, addrs: &[Multiaddr]) -> Option<libp2p::Stream> {
    // On a connection whose certificates have passed (a new one, if the last was closed),
    // or the stream is dropped unread.
    net.authenticate(peer, addrs).await.ok()?;
    let mut s = net
        .streams()
        .open_stream(peer, proto::RPC_PROTOCOL)
        .await
        .ok()?;
    // The acceptor's `Ok` frame.
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let mut ok = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut ok).await.ok()?;
    Some(s)
}

/// Abuses a control stream the daemon has taken, until it is closed or the end comes; a
/// write that does not go out in 15 s gives the stream up.
async fn abuse(mut s: libp2p::Stream, attack: Attack, end: End<'_>) {
    let _ = within(end, async {
        match attack {
            Attack::Oversized => {
                let _ = s.write_all(&u32::MAX.to_be_bytes()).await;
                let _ = s.flush().await;
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
            }
            Attack::Endless => {
                let _ = s.write_all(&(64u32 << 10).to_be_bytes()).await;
                loop {
                    if s.write_all(&[0]).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Attack::SlowReader => {
                let mut id = 0u64;
                loop {
                    let mut batch = Vec::new();
                    for _ in 0..64 {
                        id += 1;
                        match crate::rpc::encode(id, &Request::Group, proto::MAX_FRAME) {
                            Ok(f) => batch.extend(f),
                            Err(_) => return,
                        }
                    }
                    let write = async {
                        s.write_all(&batch).await?;
                        s.flush().await
                    };
                    match tokio::time::timeout(Duration::from_secs(15), write).await {
                        Ok(Ok(())) => {}
                        _ => return,
                    }
                }
            }
            _ => {}
        }
    })
    .await;
}

/// Connections that never authenticate: held silent, or sending garbage, until the end.
async fn strangers(addrs: &[Multiaddr], end: End<'_>, t: &mut Tally) {
    let Some(addr) = addrs.iter().find_map(tcp_addr) else {
        return;
    };
    let mut held = std::collections::VecDeque::new();
    while !end.come() {
        for i in 0..200u32 {
            t.sent += 1;
            match tokio::net::TcpStream::connect(addr).await {
                Ok(mut c) => {
                    if i >= 100 {
                        use tokio::io::AsyncWriteExt as _;
                        let _ = c.write_all(&[0x13; 4096]).await;
                    }
                    t.answered += 1;
                    held.push_back((Instant::now(), c));
                }
                Err(_) => t.failed += 1,
            }
        }
        while held
            .front()
            .is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(5))
        {
            held.pop_front();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The TCP socket address of a `/ip4/…/tcp/…` multiaddress.
fn tcp_addr(a: &Multiaddr) -> Option<std::net::SocketAddr> {
    use libp2p::multiaddr::Protocol;
    let mut ip = None;
    for p in a.iter() {
        match p {
            Protocol::Ip4(i) => ip = Some(std::net::IpAddr::V4(i)),
            Protocol::Ip6(i) => ip = Some(std::net::IpAddr::V6(i)),
            Protocol::Tcp(port) => return Some(std::net::SocketAddr::new(ip?, port)),
            _ => {}
        }
    }
    None
}
