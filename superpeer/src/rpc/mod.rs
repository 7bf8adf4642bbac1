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

use futures::io::{AsyncReadExt, BufReader, ReadHalf, WriteHalf};
use libp2p::{PeerId, Stream};
use parking_lot::Mutex;

use tokio::sync::{mpsc, oneshot};

use crate::net::{NetError, NetProblem};
use crate::proto::{self, Request, Response};

mod frame;
mod serve;

pub(crate) use frame::{Frame, IN_FLIGHT, STREAMS_PER_PEER, encode, fuzz_frames};
use frame::{QUEUED, read, read_frame, write_frames};
pub(crate) use serve::{accept, encode_answer};

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

    /// Sends `request` on `link`, the stream to `peer`, and waits for the answer: for the
    /// links' timeout, or longer if the request says so ([`Request::answer_within`]).
    pub(crate) async fn send(&self, peer: PeerId, link: &Arc<Link>, request: Request) -> Sent {
        let error = |problem: NetProblem| NetError::new(peer, problem);
        let timeout = request
            .answer_within()
            .map_or(self.timeout, |t| t.max(self.timeout));
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
        let answer = match tokio::time::timeout(timeout, rx).await {
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
                Err(error(NetProblem::NoAnswer(timeout)))
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

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;
