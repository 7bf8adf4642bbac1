//! Remote channels: opening one towards the node that consumes it, accepting the ones this
//! node consumes, and direct links.

use std::sync::Arc;

use bytes::Bytes;
use futures::AsyncWriteExt;
use libp2p::PeerId;
use mvm_queue::queue::Sender;
use mvm_queue::remote::{self, Options as RemoteOptions, direct};
use tokio::sync::oneshot;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::parts::Input;
use super::{ChannelError, LinkDone, LinkProblem, Msg, Node};
use crate::links::LinkSecret;
use crate::proto::{ACK_DIRECT, ACK_OK, ACK_PLAIN, ACK_UNKNOWN, StreamHeader};
use mvm_queue::remote::seal::SECRET_LEN;

/// How a remote channel's items go, as its acceptor answered.
pub(super) enum Channel {
    /// On this libp2p stream.
    Stream(libp2p::Stream),
    /// Over a direct link to this port, keyed from this secret (plain or sealed).
    Direct {
        port: u16,
        secret: LinkSecret,
        plain: bool,
    },
}

/// Opens the stream of one remote channel and waits for the acceptor's acknowledgement.
///
/// libp2p-stream drops an inbound stream when its acceptor is busy, so a stream that closes
/// before the acknowledgement is opened again (a bounded number of times).
pub(super) async fn open_channel(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    header: &StreamHeader,
) -> Result<Channel, LinkProblem> {
    let mut last = LinkProblem::Open(String::from("no attempt"));
    for attempt in 0..50u64 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2 * attempt)).await;
        }
        let mut s = match control
            .open_stream(peer, crate::proto::QUEUE_PROTOCOL)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                last = LinkProblem::Open(e.to_string());
                continue;
            }
        };
        if let Err(e) = crate::proto::write_frame(&mut s, header, crate::proto::MAX_HEADER).await {
            last = LinkProblem::Handshake(e);
            continue;
        }
        let mut ack = [0u8; 1];
        let read = tokio::time::timeout(
            ACK_WAIT,
            futures::AsyncReadExt::read_exact(&mut s, &mut ack),
        )
        .await;
        match read {
            Ok(Ok(())) if ack[0] == ACK_OK => return Ok(Channel::Stream(s)),
            Ok(Ok(()))
                if header.direct
                    && (ack[0] == ACK_DIRECT || header.plain && ack[0] == ACK_PLAIN) =>
            {
                let mut rest = [0u8; 2 + SECRET_LEN];
                match futures::AsyncReadExt::read_exact(&mut s, &mut rest).await {
                    Ok(()) => {
                        let port = u16::from_le_bytes([rest[0], rest[1]]);
                        let mut secret = [0u8; SECRET_LEN];
                        secret.copy_from_slice(&rest[2..]);
                        let _ = s.close().await;
                        return Ok(Channel::Direct {
                            port,
                            secret: LinkSecret::from_bytes(secret),
                            plain: ack[0] == ACK_PLAIN,
                        });
                    }
                    Err(e) => last = LinkProblem::Handshake(e),
                }
            }
            Ok(Ok(())) => {
                return Err(LinkProblem::Unexpected {
                    job: header.job.clone(),
                });
            }
            Ok(Err(e)) => last = LinkProblem::Handshake(e),
            Err(_) => last = LinkProblem::NoAck(ACK_WAIT),
        }
    }
    Err(last)
}

/// How long the opener of a remote channel waits for its acknowledgement.
const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Node {
    /// Accepts queue-data streams: reads the header, checks the sender is the part that feeds
    /// that port, and imports into the local queue.
    pub(crate) async fn accept_streams(self: Arc<Self>) {
        let node = self;
        let mut incoming = match node.site.net.accept(crate::proto::QUEUE_PROTOCOL) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(error = %e, "queue streams are not accepted");
                return;
            }
        };
        // Streams whose header is being read: ended with this task, and bounded.
        let mut opening = tokio::task::JoinSet::new();
        while let Some((peer, _, mut stream)) = futures::StreamExt::next(&mut incoming).await {
            while opening.try_join_next().is_some() {}
            if opening.len() >= MAX_OPENING {
                tracing::warn!(%peer, "too many queue streams opening at once; dropped");
                continue;
            }
            let node = node.clone();
            opening.spawn(async move {
                let header = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    crate::proto::read_frame::<StreamHeader, _>(
                        &mut stream,
                        crate::proto::MAX_HEADER,
                    ),
                )
                .await;
                let header = match header {
                    Ok(Ok(h)) => h,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "bad queue stream header");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "no queue stream header within 10 s");
                        return;
                    }
                };
                let key = (header.vertex.clone(), header.port.clone(), peer);
                let (reply, answer) = oneshot::channel();
                let ask = Msg::Input(Input::Inbound {
                    job: header.job.clone(),
                    attempt: header.attempt,
                    key: key.clone(),
                    reply,
                });
                let taken = match node.inputs.send(ask).await {
                    Ok(()) => answer.await.ok().flatten(),
                    Err(_) => None,
                };
                let Some((tx, links, drain, first)) = taken else {
                    tracing::warn!(%peer, job = %header.job, vertex = %header.vertex, port = %header.port,
                        "a queue stream for no expected channel; refused");
                    let _ = stream.write_all(&[ACK_UNKNOWN]).await;
                    let _ = stream.close().await;
                    return;
                };
                // A direct link when both sides want one: the answer carries where to connect
                // and the link's secret, and the items go there; plain only when both sides
                // take plain links, else sealed.
                // An input linked again by a move takes a stream: its queue may have had a
                // direct link, and takes one for its life.
                let direct = match &node.links {
                    Some(l) if header.direct && first.is_none() => match l.expect() {
                        Ok((secret, conn)) => Some((l.port(), secret, l.plain() && header.plain, conn)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot make a link secret; using the stream");
                            None
                        }
                    },
                    _ => None,
                };
                let mut answer = vec![match &direct {
                    None => ACK_OK,
                    Some((_, _, true, _)) => ACK_PLAIN,
                    Some(_) => ACK_DIRECT,
                }];
                if let Some((port, secret, _, _)) = &direct {
                    answer.extend_from_slice(&port.to_le_bytes());
                    answer.extend_from_slice(secret.as_bytes());
                }
                if let Err(e) = async {
                    stream.write_all(&answer).await?;
                    stream.flush().await
                }
                .await
                {
                    // The opener retries; give the sender back for its next attempt.
                    tracing::debug!(%peer, error = %e, "queue stream lost before its acknowledgement");
                    let back = Input::GiveBack {
                        job: header.job.clone(),
                        attempt: header.attempt,
                        key,
                        sender: tx,
                        first,
                    };
                    let _ = node.inputs.send(Msg::Input(back)).await;
                    return;
                }
                let job = header.job.clone();
                let attached = key.clone();
                let import = tokio::spawn(async move {
                    // What the input's old link delivered past its queue's room, before a
                    // move: first, in order.
                    for entry in first.into_iter().flatten() {
                        if tx.send_entry_async(entry).await.is_err() {
                            break;
                        }
                    }
                    let is_direct = direct.is_some();
                    let is_sealed = matches!(direct, Some((_, _, false, _)));
                    let r = match direct {
                        None => remote::import_stream_with(
                            tx,
                            stream.compat(),
                            &RemoteOptions::default(),
                            &drain,
                        )
                        .await
                        .map_err(|e| LinkProblem::Transfer(e.to_string())),
                        Some((_, secret, plain, conn)) => {
                            let _ = stream.close().await;
                            accept_link(tx, conn, wire(&secret, plain), &drain).await
                        }
                    };
                    let r = r
                        .map(|rep| LinkDone {
                            vertex: header.vertex.clone(),
                            port: header.port.clone(),
                            out: false,
                            direct: is_direct,
                            sealed: is_sealed,
                            items: rep.items,
                            bytes: rep.bytes,
                        })
                        .map_err(|problem| ChannelError {
                            vertex: header.vertex.clone(),
                            port: header.port.clone(),
                            peer,
                            out: false,
                            problem,
                        });
                    let _ = links.try_send(r);
                });
                if node
                    .inputs
                    .send(Msg::Attach(job, attached, import.abort_handle()))
                    .await
                    .is_err()
                {
                    import.abort();
                }
            });
        }
    }
}

/// Queue streams whose headers may be read at once (the opener of one dropped opens it again).
const MAX_OPENING: usize = 1024;

/// Waits for the connection of a direct link into `tx`'s queue and runs the link to its end.
async fn accept_link(
    tx: Sender<Bytes>,
    conn: oneshot::Receiver<std::net::TcpStream>,
    wire: direct::Wire,
    drain: &mvm_queue::remote::Drain,
) -> Result<remote::Report, LinkProblem> {
    let sock = tokio::time::timeout(crate::links::SECRET_LIFETIME, conn)
        .await
        .map_err(|_| LinkProblem::NotConnected(crate::links::SECRET_LIFETIME))?
        .map_err(|_| LinkProblem::ListenerGone)?;
    let max = RemoteOptions::default().max_item;
    run_link(|done| direct::inlet_with(tx, sock, max, wire, drain, done)).await
}

/// How a direct link keyed from `secret` carries its bytes.
pub(super) fn wire(secret: &LinkSecret, plain: bool) -> direct::Wire {
    if plain {
        direct::Wire::Plain
    } else {
        direct::Wire::Sealed(secret.key())
    }
}

/// Starts one side of a direct link and waits for its report. The link is held meanwhile, so
/// aborting the waiting task drops (and stops) it.
pub(super) async fn run_link(
    start: impl FnOnce(direct::OnDone) -> std::io::Result<direct::Link>,
) -> Result<remote::Report, LinkProblem> {
    let (done, rx) = oneshot::channel();
    let _link = start(Box::new(move |r| {
        let _ = done.send(r);
    }))
    .map_err(|e| LinkProblem::Transfer(e.to_string()))?;
    rx.await
        .map_err(|_| LinkProblem::Transfer("the link ended without a report".into()))?
        .map_err(|e| LinkProblem::Transfer(e.to_string()))
}
