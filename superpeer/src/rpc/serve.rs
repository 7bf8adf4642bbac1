//! The serving side of control streams: each inbound stream of a peer that has passed read,
//! its requests handed to the daemon (a bounded number in flight), and their answers written
//! back on it.

use std::collections::HashMap;
use std::sync::Arc;

use std::io;

use futures::io::{AsyncReadExt, BufReader};
use libp2p::{PeerId, Stream};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use mvm_component::policy::Principal;

use super::{IN_FLIGHT, STREAMS_PER_PEER, encode, read_frame, write_frames};
use crate::net::conduct::{Conduct, Offence};
use crate::net::{self, Inbound, Reply};
use crate::proto::{Failure, FailureKind, Request, Response};

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
