//! Control streams: one long-lived libp2p stream from a daemon to each authenticated peer it
//! sends requests to, carrying every request to that peer and its answer, many at once.
//!
//! The one control transport. (libp2p's request-response protocol, used before, opened a yamux
//! stream per request: the stream's opening, its protocol, the request and its close, then the
//! answer and its close, most of them a yamux frame, a noise message and a `send` of their
//! own, and two timers on each side.) A control stream carries a request as one frame and its
//! answer as one frame, and frames that are ready together go out in one write.
//!
//! A stream is opened only to a peer with which both certificates have passed on a connection
//! (see the `net` module), by the first request to it; requests made meanwhile wait for that
//! opening. Its acceptor gets it through [`crate::net::Net::accept`], which drops unread the
//! streams of peers that have not passed: the stream dies with the connection, and so does the
//! identity. Answers come back on the stream of their request, matched by id.
//!
//! Frame: `len` (u32, big-endian; of what follows), `id` (u64, big-endian), the CBOR message.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use libp2p::{PeerId, Stream};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use mvm_component::policy::Principal;

use crate::net::conduct::{Conduct, Offence};
use crate::net::{self, Inbound, NetError, NetProblem, Reply};
use crate::proto::{self, Failure, FailureKind, Request, Response};

/// Bytes of frames written in one go at most (more wait for the next write).
const BATCH: usize = 256 << 10;

/// Frames waiting for a stream's writer at most; more wait to be queued.
const QUEUED: usize = 1024;

/// Requests of one inbound control stream in flight at most: its peer's next request is read
/// once one of them is answered (the peer is slowed down, not the daemon's other peers).
pub(crate) const IN_FLIGHT: usize = 64;

/// Inbound control streams one peer may hold open at once (it needs one); more are closed as
/// they open.
pub(crate) const STREAMS_PER_PEER: usize = 4;

/// The least rate at which a frame, once begun, must arrive: a peer that starts a frame and
/// then trickles it (or stops) loses the stream, as a slow loris would.
const MIN_RATE: usize = 64 << 10;

/// How long a frame, once begun, may take at the least.
const FRAME_GRACE: Duration = Duration::from_secs(10);

/// Encodes one frame.
pub(crate) fn encode<T: Serialize>(id: u64, msg: &T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = proto::encode_after(12, msg, max)?;
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf[4..12].copy_from_slice(&id.to_be_bytes());
    Ok(buf)
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// Its length is over the limit (or under the id's 8 bytes).
    #[error("a frame of {len} bytes (the limit is {max} plus 8)")]
    Oversized {
        /// The length it claimed.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// It did not arrive at the least rate.
    #[error("a frame of {len} bytes not whole after {secs} s")]
    Slow {
        /// The length it claimed.
        len: usize,
        /// How long it was given.
        secs: u64,
    },
    /// It is not a message of the protocol.
    #[error("{0}")]
    Malformed(#[source] io::Error),
    /// The stream failed, or ended inside a frame.
    #[error("{0}")]
    Io(#[source] io::Error),
}

impl ReadError {
    /// The offence it is, if its peer is the one to blame.
    fn offence(&self) -> Option<Offence> {
        match self {
            ReadError::Oversized { .. } => Some(Offence::Oversized),
            ReadError::Slow { .. } => Some(Offence::SlowFrame),
            ReadError::Malformed(_) => Some(Offence::Malformed),
            ReadError::Io(_) => None,
        }
    }
}

impl From<ReadError> for io::Error {
    fn from(e: ReadError) -> io::Error {
        let kind = match &e {
            ReadError::Oversized { .. } | ReadError::Malformed(_) => io::ErrorKind::InvalidData,
            ReadError::Slow { .. } => io::ErrorKind::TimedOut,
            ReadError::Io(e) => return io::Error::new(e.kind(), e.to_string()),
        };
        io::Error::new(kind, e.to_string())
    }
}

/// Reads one frame; `None` at a clean end between frames.
async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<Option<(u64, T)>> {
    read_frame(r, max).await.map_err(io::Error::from)
}

/// As [`read`], saying whose fault an error is.
async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<(u64, T)>, ReadError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ReadError::Io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(8..=max.saturating_add(8)).contains(&len) {
        return Err(ReadError::Oversized { len, max });
    }
    // Memory grows with what arrives, not with what the length claims, and what arrives must
    // keep coming: a peer cannot hold megabytes of this daemon's memory with a few bytes sent.
    let deadline = FRAME_GRACE + Duration::from_secs((len / MIN_RATE) as u64);
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    let mut limited = (&mut *r).take(len as u64);
    let body = limited.read_to_end(&mut buf);
    match tokio::time::timeout(deadline, body).await {
        Ok(Ok(n)) if n == len => {}
        Ok(Ok(n)) => {
            return Err(ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the stream ended {n} bytes into a frame of {len}"),
            )));
        }
        Ok(Err(e)) => return Err(ReadError::Io(e)),
        Err(_) => {
            let secs = deadline.as_secs();
            return Err(ReadError::Slow { len, secs });
        }
    }
    let (id, body) = buf.split_at(8);
    let id = u64::from_be_bytes(id.try_into().unwrap_or([0; 8]));
    let message = proto::decode(body).map_err(ReadError::Malformed)?;
    Ok(Some((id, message)))
}

/// A frame for a stream's writer, with the slot of the request it answers (given back once it
/// is written: a peer that reads nothing gets nothing more read from it).
pub(crate) type Frame = (Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>);

/// Reads `bytes` as a control stream's frames (answers if `answers`, else requests), checking
/// what decodes as a daemon does, until the end or an error: the fuzz target's entry.
pub(crate) fn fuzz_frames(mut bytes: &[u8], answers: bool, rt: &tokio::runtime::Runtime) {
    rt.block_on(async {
        for _ in 0..64 {
            if answers {
                match read_frame::<Response, _>(&mut bytes, 1 << 16).await {
                    Ok(Some((_, r))) => drop(std::hint::black_box(r.validate())),
                    Ok(None) => return,
                    Err(e) => {
                        std::hint::black_box(e.offence());
                        return;
                    }
                }
            } else {
                match read_frame::<Request, _>(&mut bytes, 1 << 16).await {
                    Ok(Some((_, r))) => drop(std::hint::black_box(r.validate())),
                    Ok(None) => return,
                    Err(e) => {
                        std::hint::black_box(e.offence());
                        return;
                    }
                }
            }
        }
    });
}

/// Writes the frames handed to it, those that are ready together in one write, until every
/// sender is gone or a write fails. A write must go out at the least rate: a peer that stops
/// reading (a slow loris) fails its stream with `TimedOut`.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut frames: mpsc::Receiver<Frame>,
) -> io::Result<()> {
    let mut slots = Vec::new();
    while let Some((first, slot)) = frames.recv().await {
        let mut buf = first;
        slots.extend(slot);
        while buf.len() < BATCH {
            match frames.try_recv() {
                Ok((f, slot)) => {
                    buf.extend_from_slice(&f);
                    slots.extend(slot);
                }
                Err(_) => break,
            }
        }
        let deadline = FRAME_GRACE + Duration::from_secs((buf.len() / MIN_RATE) as u64);
        let write = async {
            w.write_all(&buf).await?;
            w.flush().await
        };
        match tokio::time::timeout(deadline, write).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} bytes not taken by the peer in {} s",
                        buf.len(),
                        deadline.as_secs()
                    ),
                ));
            }
        }
        slots.clear();
    }
    w.close().await
}

/// Why a control stream is not there to carry a request, or stopped carrying answers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    /// The stream could not be opened.
    #[error("cannot open a control stream: {0}")]
    Open(Arc<libp2p_stream::OpenStreamError>),
    /// The acceptor's first frame was not the `Ok` that says it took the stream.
    #[error("the acceptor's first frame on the control stream is not its Ok")]
    NotTaken,
    /// The acceptor dropped the stream unread, every time it was opened.
    #[error("the acceptor dropped the control stream unread")]
    Dropped,
    /// The stream was not taken in time.
    #[error("no control stream within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// Whoever opened the stream stopped before saying how it went.
    #[error("the opening of the control stream was abandoned")]
    Abandoned,
    /// The stream closed.
    #[error("the control stream closed")]
    Closed,
    /// Reading or writing the stream failed.
    #[error("the control stream failed: {0}")]
    Failed(Arc<io::Error>),
    /// The peer was declared lost.
    #[error("the peer is gone")]
    PeerGone,
}

/// The answers awaited on one outbound stream; `None` once the stream has failed.
type Pending = Mutex<Option<HashMap<u64, oneshot::Sender<Result<Response, StreamError>>>>>;

/// One outbound control stream.
pub(crate) struct Link {
    frames: mpsc::Sender<Frame>,
    pending: Pending,
}

impl Link {
    /// Ends the link: every awaited answer fails with `why`.
    fn fail(&self, why: &StreamError) {
        let pending = self.pending.lock().take();
        for (_, tx) in pending.into_iter().flatten() {
            let _ = tx.send(Err(why.clone()));
        }
    }
}

/// What became of a request offered to a control stream.
pub(crate) enum Sent {
    /// It went: the answer, or why none came.
    Done(Result<Response, NetError>),
    /// The stream had closed before the request went on it: it may go on a new one.
    NotSent(Request),
}

/// Whoever waits for a control stream being opened.
type Opener = oneshot::Sender<Result<Arc<Link>, StreamError>>;

/// Where a daemon stands with its control stream to one peer.
enum Slot {
    /// Being opened (by the task of opening number `n`), with the requests that wait for it.
    Opening {
        n: u64,
        task: tokio::task::AbortHandle,
        waiting: Vec<Opener>,
    },
    /// Open, and taken by the acceptor.
    Open(Arc<Link>),
}

/// How many times a control stream that the acceptor dropped unread is opened again (20 ms
/// later, then twice as long each time: 1.3 s in all). An acceptor drops the streams that
/// arrive while it is taking one in (libp2p-stream queues none): a burst of nodes at a
/// super-peer.
const OPEN_RETRIES: u32 = 6;

/// How long one try at opening a control stream may take before it is given up and made
/// again (within the request timeout). A stream opened on a connection that has died without
/// its closing being seen yet (a cut link) hangs; the next try may be made on a live one.
const OPEN_TRY: Duration = Duration::from_secs(5);

/// The outbound control streams of a daemon, by peer.
pub(crate) struct Links {
    slots: Mutex<HashMap<PeerId, Slot>>,
    next_id: AtomicU64,
    /// Openings started so far (numbers them).
    openings: AtomicU64,
    /// Requests sent on control streams so far.
    pub(crate) sent: AtomicU64,
    max_frame: usize,
    timeout: Duration,
}

impl Links {
    /// No streams yet; frames of at most `max_frame` bytes, answers awaited for `timeout`.
    pub(crate) fn new(max_frame: usize, timeout: Duration) -> Arc<Links> {
        Arc::new(Links {
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            openings: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            max_frame,
            timeout,
        })
    }

    /// The open stream to `peer`, if there is one.
    pub(crate) fn get(&self, peer: &PeerId) -> Option<Arc<Link>> {
        match self.slots.lock().get(peer) {
            Some(Slot::Open(l)) => Some(l.clone()),
            _ => None,
        }
    }

    /// The stream to `peer` (which must have passed), opening it unless it is open or being
    /// opened already.
    ///
    /// # Errors
    /// The stream cannot be opened, or the peer's acceptor does not take it.
    pub(crate) async fn open(
        self: &Arc<Self>,
        peer: PeerId,
        control: &libp2p_stream::Control,
    ) -> Result<Arc<Link>, NetError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut slots = self.slots.lock();
            match slots.get_mut(&peer) {
                Some(Slot::Open(l)) => return Ok(l.clone()),
                Some(Slot::Opening { waiting, .. }) => waiting.push(tx),
                None => {
                    let n = self.openings.fetch_add(1, Ordering::Relaxed);
                    let (links, control) = (self.clone(), control.clone());
                    let task = tokio::spawn(async move { links.run(peer, n, control).await });
                    let task = task.abort_handle();
                    let waiting = vec![tx];
                    slots.insert(peer, Slot::Opening { n, task, waiting });
                }
            }
        }
        let error = |e: StreamError| NetError::new(peer, NetProblem::Stream(e));
        match rx.await {
            Ok(r) => r.map_err(error),
            Err(_) => Err(error(StreamError::Abandoned)),
        }
    }

    /// Forgets `link` as the stream to `peer` (it has closed).
    pub(crate) fn forget(&self, peer: &PeerId, link: &Arc<Link>) {
        let mut slots = self.slots.lock();
        if matches!(slots.get(peer), Some(Slot::Open(l)) if Arc::ptr_eq(l, link)) {
            slots.remove(peer);
        }
    }

    /// Sends `request` on `link`, the stream to `peer`, and waits for the answer.
    pub(crate) async fn send(&self, peer: PeerId, link: &Arc<Link>, request: Request) -> Sent {
        let error = |problem: NetProblem| NetError::new(peer, problem);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = match encode(id, &request, self.max_frame) {
            Ok(f) => f,
            Err(e) => return Sent::Done(Err(error(NetProblem::Encode(Arc::new(e))))),
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = link.pending.lock();
            let Some(p) = pending.as_mut() else {
                return Sent::NotSent(request);
            };
            p.insert(id, tx);
        }
        if link.frames.send((frame, None)).await.is_err() {
            if let Some(p) = link.pending.lock().as_mut() {
                p.remove(&id);
            }
            return Sent::NotSent(request);
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        let answer = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(r))) => r
                .validate()
                .map(|()| r)
                .map_err(|e| error(NetProblem::Invalid(e))),
            Ok(Ok(Err(why))) => Err(error(NetProblem::Stream(why))),
            Ok(Err(_)) => Err(error(NetProblem::Stream(StreamError::Closed))),
            Err(_) => {
                if let Some(p) = link.pending.lock().as_mut() {
                    p.remove(&id);
                }
                Err(error(NetProblem::NoAnswer(self.timeout)))
            }
        };
        Sent::Done(answer)
    }

    /// Takes out of the slots opening number `n` to `peer` (unless it was closed meanwhile),
    /// with the requests that wait for it.
    fn opened(slots: &mut HashMap<PeerId, Slot>, peer: &PeerId, n: u64) -> Option<Vec<Opener>> {
        match slots.remove(peer) {
            Some(Slot::Opening { n: m, waiting, .. }) if m == n => Some(waiting),
            Some(other) => {
                slots.insert(*peer, other);
                None
            }
            None => None,
        }
    }

    /// Opens the stream to `peer` (opening number `n`) and serves it until it fails. Requests
    /// go on it only once the acceptor has said it took it (an `Ok` of id 0): one that does not
    /// take it has read no request. Whoever waits for the opening hears how it went.
    async fn run(self: Arc<Self>, peer: PeerId, n: u64, mut control: libp2p_stream::Control) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut tries = 0;
        let opened = loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break Err(StreamError::Timeout(self.timeout));
            }
            let this_try = (now + OPEN_TRY).min(deadline);
            let taken = tokio::time::timeout_at(this_try, self.take(peer, &mut control)).await;
            match taken {
                Ok(Err((e, true))) if tries < OPEN_RETRIES => {
                    tracing::debug!(%peer, error = %e, tries, "control stream not taken; again");
                    tokio::time::sleep(Duration::from_millis(20 << tries)).await;
                    tries += 1;
                }
                Ok(r) => break r.map_err(|(e, _)| e),
                Err(_) => {
                    tracing::info!(%peer, "a control stream not taken within {OPEN_TRY:?}; again");
                }
            }
        };
        let (mut r, w) = match opened {
            Ok(halves) => halves,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "no control stream");
                let waiting = Self::opened(&mut self.slots.lock(), &peer, n);
                for tx in waiting.into_iter().flatten() {
                    let _ = tx.send(Err(e.clone()));
                }
                return;
            }
        };
        let (frames, rx) = mpsc::channel(QUEUED);
        let link = Arc::new(Link {
            frames,
            pending: Mutex::new(Some(HashMap::new())),
        });
        let waiting = {
            let mut slots = self.slots.lock();
            let waiting = Self::opened(&mut slots, &peer, n);
            if waiting.is_some() {
                slots.insert(peer, Slot::Open(link.clone()));
            }
            waiting
        };
        // Closed while it was being opened: the peer is gone.
        let Some(waiting) = waiting else { return };
        for tx in waiting {
            let _ = tx.send(Ok(link.clone()));
        }
        let mut writer = tokio::spawn(write_frames(w, rx));
        let reader = async {
            loop {
                match read::<Response, _>(&mut r, self.max_frame).await {
                    Ok(Some((id, response))) => {
                        let tx = link.pending.lock().as_mut().and_then(|p| p.remove(&id));
                        if let Some(tx) = tx {
                            let _ = tx.send(Ok(response));
                        }
                    }
                    Ok(None) => return StreamError::Closed,
                    Err(e) => return StreamError::Failed(Arc::new(e)),
                }
            }
        };
        let why = tokio::select! {
            why = reader => why,
            w = &mut writer => match w {
                Ok(Err(e)) => StreamError::Failed(Arc::new(e)),
                _ => StreamError::Closed,
            },
        };
        tracing::debug!(%peer, %why, "control stream ended");
        self.forget(&peer, &link);
        link.fail(&why);
        writer.abort();
    }

    /// Opens a stream to `peer` and waits for the acceptor's `Ok`; an error says whether the
    /// stream was dropped before anything was read from it (it may be opened again).
    async fn take(
        &self,
        peer: PeerId,
        control: &mut libp2p_stream::Control,
    ) -> Result<(BufReader<ReadHalf<Stream>>, WriteHalf<Stream>), (StreamError, bool)> {
        let stream = control
            .open_stream(peer, proto::RPC_PROTOCOL)
            .await
            .map_err(|e| (StreamError::Open(Arc::new(e)), false))?;
        let (r, w) = stream.split();
        let mut r = BufReader::new(r);
        match read::<Response, _>(&mut r, self.max_frame).await {
            Ok(Some((0, Response::Ok))) => Ok((r, w)),
            Ok(Some(_)) => Err((StreamError::NotTaken, false)),
            Ok(None) => Err((StreamError::Dropped, true)),
            Err(e) => {
                let again = e.kind() != io::ErrorKind::InvalidData;
                Err((StreamError::Failed(Arc::new(e)), again))
            }
        }
    }

    /// Ends the stream to `peer`, or its opening, if any (the peer is lost): a request made
    /// after the peer is back opens a stream of its own, on a connection of the time.
    pub(crate) fn close(&self, peer: &PeerId) {
        match self.slots.lock().remove(peer) {
            Some(Slot::Open(l)) => l.fail(&StreamError::PeerGone),
            Some(Slot::Opening { task, waiting, .. }) => {
                task.abort();
                for tx in waiting {
                    let _ = tx.send(Err(StreamError::PeerGone));
                }
            }
            None => {}
        }
    }
}

/// Serves the control streams `incoming` gives (those of peers that have passed, from
/// [`crate::net::Net::accept`]), handing their requests to the daemon as [`Inbound`]s, whose
/// answers go back on the same stream.
pub(crate) async fn accept(
    mut incoming: impl futures::Stream<Item = (PeerId, Principal, Stream)> + Unpin,
    inbound: mpsc::Sender<Inbound>,
    max_frame: usize,
    conduct: Arc<Conduct>,
) {
    let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    while let Some((peer, principal, stream)) = futures::StreamExt::next(&mut incoming).await {
        {
            let mut o = open.lock();
            let n = o.entry(peer).or_default();
            if *n >= STREAMS_PER_PEER {
                drop(o);
                tracing::info!(%peer, %principal, "a control stream over the {STREAMS_PER_PEER} a peer may hold open: closed");
                conduct.offend(&peer, &principal, Offence::TooManyStreams);
                continue;
            }
            *n += 1;
        }
        let inbound = inbound.clone();
        let open = open.clone();
        let conduct = conduct.clone();
        tokio::spawn(async move {
            serve(peer, principal, stream, inbound, max_frame, &conduct).await;
            let mut o = open.lock();
            if let Some(n) = o.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    o.remove(&peer);
                    conduct.forget_if_clean(&peer);
                }
            }
        });
    }
}

/// Serves one inbound control stream.
async fn serve(
    peer: PeerId,
    principal: Principal,
    stream: Stream,
    inbound: mpsc::Sender<Inbound>,
    max_frame: usize,
    conduct: &Conduct,
) {
    let (r, w) = stream.split();
    let (frames, rx) = mpsc::channel(IN_FLIGHT + 1);
    let mut writer = tokio::spawn(write_frames(w, rx));
    let answer = async |id: u64, response: Response, slot| {
        let _ = frames
            .send((encode_answer(id, &response, max_frame), slot))
            .await;
    };
    // Taken: the opener may send requests now.
    answer(0, Response::Ok, None).await;
    let mut r = BufReader::new(r);
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    // Every frame queued holds a slot: the queue never holds more than IN_FLIGHT frames and an
    // answer never waits for room in it.
    let reading = async {
        loop {
            // A peer with as many requests in flight as it may have is not read until one is
            // answered: it waits, the others do not.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let (id, request) = match read_frame::<Request, _>(&mut r, max_frame).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "inbound control stream failed");
                    if let Some(offence) = e.offence() {
                        conduct.offend(&peer, &principal, offence);
                    }
                    break;
                }
            };
            // Over its quota: held back, and its stream with it.
            if let Some(wait) = conduct.request(&peer, &principal) {
                tokio::time::sleep(wait).await;
            }
            if let Some(f) = net::invalid(&peer, &request) {
                answer(id, Response::Error(f), Some(slot)).await;
                continue;
            }
            let i = Inbound::new(
                peer,
                principal.clone(),
                request,
                Reply {
                    id,
                    frames: frames.clone(),
                    max_frame,
                    _slot: Some(slot),
                },
            );
            if let Err(e) = inbound.try_send(i) {
                let (i, f) = match e {
                    mpsc::error::TrySendError::Full(i) => (i, net::busy()),
                    mpsc::error::TrySendError::Closed(i) => (
                        i,
                        Failure::new(FailureKind::Unavailable, "this daemon is stopping"),
                    ),
                };
                i.reply(Response::Error(f)).await;
            }
        }
    };
    let written = tokio::select! {
        () = reading => None,
        w = &mut writer => Some(w),
    };
    // Answers still being made hold frame senders: the writer ends after the last one.
    drop(frames);
    let written = match written {
        Some(w) => w,
        None => writer.await,
    };
    if let Ok(Err(e)) = written {
        tracing::debug!(%peer, error = %e, "inbound control stream failed");
        if e.kind() == io::ErrorKind::TimedOut {
            conduct.offend(&peer, &principal, Offence::SlowReader);
        }
    }
}

/// Encodes an answer; one over the size limit becomes an error answer that says so.
pub(crate) fn encode_answer(id: u64, response: &Response, max_frame: usize) -> Vec<u8> {
    encode(id, response, max_frame).unwrap_or_else(|e| {
        let f = Failure::new(
            FailureKind::Failed,
            format!("the answer cannot be sent: {e}"),
        );
        encode(id, &Response::Error(f), max_frame).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;
