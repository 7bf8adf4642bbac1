//! A job's files between daemons: inputs uploaded by the submitter to its group's leading
//! super-peer, fetched from there by each node placed for the job (only what it lacks) and
//! laid out in its vertices' sandboxes; outputs taken from the sandboxes when the part ends,
//! uploaded to the leader and recorded with the job; read back by the job's owner
//! (`mvm fetch`). Everything travels by content hash on its own stream
//! ([`FILES_PROTOCOL`](crate::proto::FILES_PROTOCOL)), streamed and checked against the hash
//! before it is kept, never inside a control frame. The leader passes every file it takes to
//! the other replicas of the group's job log, so that whichever leads next holds it.
//!
//! - `store`: the files by hash in a directory.
//! - `serve`: the super-peer's side.
//! - `stage`: the node's side (fetching inputs, laying out sandboxes, taking outputs).
//! - `unclaimed`: what each principal may hold at a super-peer that no job names yet.

mod serve;
mod stage;
mod store;
mod unclaimed;

pub(crate) use serve::{Access, NodeFiles, serve};
pub(crate) use stage::{Sandbox, dir_name, send_all, stage_in, take_outputs};
pub use store::{FileStore, ReceiveError, hash_file, receive};
pub use unclaimed::{DEFAULT_QUOTA, DISK_RESERVE};
pub(crate) use unclaimed::{Holding, Unclaimed};

use std::path::Path;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId};

use crate::net::Net;
use crate::proto::{
    FILES_PROTOCOL, Failure, FailureKind, FileAnswer, FileRequest, Hash, JobId, MAX_HEADER,
    read_frame, write_frame,
};

/// Files sent or fetched at once (each on a stream of its own).
pub const AT_ONCE: usize = 4;

/// The slowest a transfer may go (bytes a second) before it is cut, after a grace period.
pub(crate) const MIN_RATE: u64 = 1 << 20;

/// How long a transfer of `size` bytes may take: 30 s, then [`MIN_RATE`].
pub(crate) fn allowed(size: u64) -> Duration {
    Duration::from_secs(30 + size / MIN_RATE)
}

/// Runs `transfer` on each of `items`, at most [`AT_ONCE`] at a time, and stops at the first
/// failure (the others are dropped); what each gave, in the order they ended.
///
/// # Errors
/// The first transfer's failure, or a transfer task that panicked.
pub(crate) async fn at_once<T, R, Fut>(
    items: impl IntoIterator<Item = T>,
    transfer: impl Fn(T) -> Fut,
) -> Result<Vec<R>, Failure>
where
    R: Send + 'static,
    Fut: Future<Output = Result<R, Failure>> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    let mut items = items.into_iter();
    let mut done = Vec::new();
    loop {
        while running.len() < AT_ONCE
            && let Some(item) = items.next()
        {
            running.spawn(transfer(item));
        }
        match running.join_next().await {
            None => return Ok(done),
            Some(Ok(Ok(r))) => done.push(r),
            Some(Ok(Err(f))) => return Err(f),
            Some(Err(e)) => return Err(Failure::new(FailureKind::Failed, e.to_string())),
        }
    }
}

/// How long a peer has to answer a transfer's request or confirm its bytes.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// Opens a file stream to `peer` (dialing `addrs`, authenticating, if not connected).
async fn open(net: &Net, peer: PeerId, addrs: &[Multiaddr]) -> Result<libp2p::Stream, Failure> {
    let unavailable = |m: String| Failure::new(FailureKind::Unavailable, m);
    net.authenticate(peer, addrs)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut control = net.streams();
    // The dial runs in the swarm's task: the stream can be opened once it has connected.
    let mut tries = 0u32;
    loop {
        match control.open_stream(peer, FILES_PROTOCOL).await {
            Ok(s) => return Ok(s),
            Err(e) if tries >= 100 => {
                return Err(unavailable(format!(
                    "cannot open a file stream to {peer}: {e}"
                )));
            }
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one answer of a transfer, in time.
async fn answer(stream: &mut libp2p::Stream, peer: PeerId) -> Result<FileAnswer, Failure> {
    match tokio::time::timeout(ANSWER_WAIT, read_frame(stream, MAX_HEADER)).await {
        Ok(Ok(FileAnswer::Error(f))) => Err(f),
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => Err(Failure::new(
            FailureKind::Unavailable,
            format!("{peer}: the file stream broke: {e}"),
        )),
        Err(_) => Err(Failure::new(
            FailureKind::Unavailable,
            format!(
                "{peer}: no answer on the file stream within {} s",
                ANSWER_WAIT.as_secs()
            ),
        )),
    }
}

/// How many times a transfer that broke is tried in all: libp2p-stream drops an inbound
/// stream when its acceptor is busy (as `node::streams` finds), so a burst of transfers to one
/// super-peer loses some at their start.
const TRIES: u32 = 30;

/// Runs `transfer` again, after a short wait growing with each try, while it fails for want
/// of the peer, `most` times in all.
async fn retried<T, F: Future<Output = Result<T, Failure>>>(
    most: u32,
    mut transfer: impl FnMut() -> F,
) -> Result<T, Failure> {
    let mut tries = 1;
    loop {
        match transfer().await {
            Err(f) if f.kind == FailureKind::Unavailable && tries < most => {
                tracing::debug!(error = %f.message, "a file transfer broke; again");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(tries))).await;
                tries += 1;
            }
            r => return r,
        }
    }
}

/// Sends the file at `path` (of content `hash` and `size` bytes) to `peer`, unless it holds
/// it already; whether the bytes went.
///
/// # Errors
/// The peer cannot be reached or refuses, the file cannot be read, or the transfer breaks.
pub async fn put(
    net: &Net,
    peer: PeerId,
    addrs: &[Multiaddr],
    path: &Path,
    hash: Hash,
    size: u64,
) -> Result<bool, Failure> {
    retried(TRIES, || put_once(net, peer, addrs, path, hash, size)).await
}

async fn put_once(
    net: &Net,
    peer: PeerId,
    addrs: &[Multiaddr],
    path: &Path,
    hash: Hash,
    size: u64,
) -> Result<bool, Failure> {
    let broke = |e: std::io::Error| {
        Failure::new(
            FailureKind::Unavailable,
            format!("{peer}: sending {}: {e}", path.display()),
        )
    };
    let mut stream = open(net, peer, addrs).await?;
    write_frame(&mut stream, &FileRequest::Put { hash, size }, MAX_HEADER)
        .await
        .map_err(broke)?;
    match answer(&mut stream, peer).await? {
        FileAnswer::Have => return Ok(false),
        FileAnswer::Send => {}
        other => return Err(unexpected(peer, &other)),
    }
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Failure::new(FailureKind::Input, format!("{}: {e}", path.display())))?;
    let mut buf = vec![0u8; store::CHUNK];
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left)
            .unwrap_or(store::CHUNK)
            .min(store::CHUNK);
        let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf[..want])
            .await
            .map_err(broke)?;
        if n == 0 {
            return Err(Failure::new(
                FailureKind::Input,
                format!("{}: it shrank while it was sent", path.display()),
            ));
        }
        stream.write_all(&buf[..n]).await.map_err(broke)?;
        left -= n as u64;
    }
    stream.flush().await.map_err(broke)?;
    match answer(&mut stream, peer).await? {
        FileAnswer::Stored => {
            let _ = stream.close().await;
            Ok(true)
        }
        other => Err(unexpected(peer, &other)),
    }
}

/// Fetches file `hash` of job `job` from `peer` into `to`, checked against the hash; nothing
/// is left at `to` when it does not match. Its size.
///
/// # Errors
/// The peer cannot be reached, refuses or lacks the file, the transfer breaks, or the bytes
/// do not match.
pub async fn get(
    net: &Net,
    peer: PeerId,
    addrs: &[Multiaddr],
    job: &JobId,
    hash: Hash,
    to: &Path,
) -> Result<u64, Failure> {
    retried(TRIES, || get_once(net, peer, addrs, job, hash, to, None)).await
}

/// How long a node waits, for each input, for the other nodes named as holding it before it
/// asks the leader instead.
const HINTS_WAIT: Duration = Duration::from_secs(10);

/// How many times a node named as holding an input is asked while its stream breaks at its
/// start (a burst of fetches from one node loses some streams so).
const HOLDER_TRIES: u32 = 10;

/// Fetches input `hash` of `size` bytes of job `job` into `to` from the first of `holders`
/// (other nodes that may hold it) that sends it whole: each asked once (again, up to
/// [`HOLDER_TRIES`] in all, only while its stream breaks at its start, which libp2p-stream
/// does to a burst of streams), all of them
/// within [`HINTS_WAIT`] and the time the bytes take at the least rate. Whether one did;
/// nothing is left at `to` when none did.
pub(crate) async fn get_from_holders(
    net: &Net,
    holders: &[crate::proto::Member],
    job: &JobId,
    hash: Hash,
    size: u64,
    to: &Path,
) -> bool {
    let all = async {
        for m in holders {
            let got = retried(HOLDER_TRIES, || {
                get_once(net, m.peer, &m.addrs, job, hash, to, Some(size))
            });
            match got.await {
                Ok(_) => {
                    tracing::debug!(peer = %m.peer, %hash, size, "an input fetched from another node");
                    return true;
                }
                Err(f) => {
                    tracing::debug!(peer = %m.peer, %hash, error = %f.message, "an input not fetched from another node");
                }
            }
        }
        false
    };
    let within = HINTS_WAIT + Duration::from_secs(size / (1 << 20));
    tokio::time::timeout(within, all).await.unwrap_or(false)
}

/// One try of [`get`]; with `expect`, a size other than it is refused before anything is read.
async fn get_once(
    net: &Net,
    peer: PeerId,
    addrs: &[Multiaddr],
    job: &JobId,
    hash: Hash,
    to: &Path,
    expect: Option<u64>,
) -> Result<u64, Failure> {
    let mut stream = open(net, peer, addrs).await?;
    let req = FileRequest::Get {
        job: job.clone(),
        hash,
    };
    write_frame(&mut stream, &req, MAX_HEADER)
        .await
        .map_err(|e| Failure::new(FailureKind::Unavailable, format!("{peer}: {e}")))?;
    let size = match answer(&mut stream, peer).await? {
        FileAnswer::Size(n) if expect.is_none_or(|e| e == n) => n,
        FileAnswer::Size(n) => {
            return Err(Failure::new(
                FailureKind::Failed,
                format!("{peer} offers file {hash} of {n} bytes; it has {expect:?}"),
            ));
        }
        other => return Err(unexpected(peer, &other)),
    };
    let mut body = (&mut stream).take(size);
    receive(&mut body, hash, size, to).await.map_err(|e| {
        let kind = match e {
            ReceiveError::Broke { .. } => FailureKind::Unavailable,
            ReceiveError::Mismatch { .. } | ReceiveError::Write { .. } => FailureKind::Failed,
        };
        Failure::new(kind, format!("file {hash} from {peer}: {e}"))
    })?;
    Ok(size)
}

fn unexpected(peer: PeerId, a: &FileAnswer) -> Failure {
    Failure::new(
        FailureKind::Failed,
        format!("{peer}: an unexpected answer on the file stream: {a:?}"),
    )
}
