//! The serving side of file transfers. A super-peer's: files put by submitters (inputs), by
//! nodes (outputs) and by the leader (to the other replicas), and files got by nodes (inputs)
//! and owners (outputs), each as its [`Access`] allows. A node's ([`NodeFiles`]): the inputs
//! it holds, got by the other nodes of its domain.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use mvm_component::policy::Principal;

use super::store::{CHUNK, FileStore, ReceiveError};
use super::{MIN_RATE, allowed};
use crate::net::Net;
use crate::proto::{
    FILES_PROTOCOL, Failure, FailureKind, FileAnswer, FileRequest, Hash, JobId, MAX_HEADER,
    read_frame, write_frame,
};

/// Transfers served at once; a stream beyond them is refused as busy.
const MAX_TRANSFERS: usize = 64;

/// How long an opener has to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// Who may put and get which files.
pub(crate) trait Access: Send + Sync + 'static {
    /// Whether `who` (at `peer`) may put file `hash` of `size` bytes; if so, [`Access::put_ended`]
    /// is called when the transfer ends.
    fn may_put(&self, peer: PeerId, who: &Principal, hash: &Hash, size: u64)
    -> Result<(), Failure>;
    /// A put [`Access::may_put`] let begin has ended, however it did.
    fn put_ended(&self, who: &Principal, hash: &Hash);
    /// Whether `who` (at `peer`) may get file `hash` of job `job`.
    fn may_get(
        &self,
        peer: PeerId,
        who: &Principal,
        job: &JobId,
        hash: &Hash,
    ) -> Result<(), Failure>;
    /// File `hash` of `size` bytes was put by `peer` and kept.
    fn stored(&self, peer: PeerId, hash: Hash, size: u64);
}

/// Serves file transfers on `net` from and into `store` until the network stops.
pub(crate) async fn serve(net: Net, store: Arc<FileStore>, access: Arc<dyn Access>) {
    let mut incoming = match net.accept(FILES_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "file transfers are not accepted");
            return;
        }
    };
    let mut running = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            next = incoming.next() => {
                let Some((peer, who, mut stream)) = next else { break };
                if running.len() >= MAX_TRANSFERS {
                    tracing::warn!(%peer, "too many file transfers at once; one refused");
                    running.spawn(async move {
                        let busy = FileAnswer::Error(Failure::new(
                            FailureKind::Unavailable,
                            "this daemon is busy with other transfers: try again",
                        ));
                        let _ = tokio::time::timeout(
                            REQUEST_WAIT,
                            write_frame(&mut stream, &busy, MAX_HEADER),
                        )
                        .await;
                    });
                    continue;
                }
                let (store, access) = (store.clone(), access.clone());
                running.spawn(async move {
                    if let Err(e) = transfer(peer, &who, &mut stream, &store, &*access).await {
                        tracing::warn!(%peer, error = %e, "file transfer");
                        let _ = write_frame(&mut stream, &FileAnswer::Error(e), MAX_HEADER).await;
                    }
                });
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
}

async fn transfer(
    peer: PeerId,
    who: &Principal,
    stream: &mut libp2p::Stream,
    store: &FileStore,
    access: &dyn Access,
) -> Result<(), Failure> {
    let broke = |e: std::io::Error| Failure::new(FailureKind::Unavailable, e.to_string());
    let req = match tokio::time::timeout(REQUEST_WAIT, read_frame(stream, MAX_HEADER)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(Failure::new(
                FailureKind::Input,
                format!("a bad file request: {e}"),
            ));
        }
        Err(_) => return Err(Failure::new(FailureKind::Input, "no file request in time")),
    };
    match req {
        FileRequest::Put { hash, size } => {
            access.may_put(peer, who, &hash, size)?;
            let took = take(peer, stream, store, access, hash, size).await;
            access.put_ended(who, &hash);
            took
        }
        FileRequest::Get { job, hash } => {
            access.may_get(peer, who, &job, &hash)?;
            let path = store.path(&hash);
            let Ok(mut file) = tokio::fs::File::open(&path).await else {
                return Err(Failure::new(
                    FailureKind::NotFound,
                    format!("file {hash} of job {job} is not held here"),
                ));
            };
            let size = file.metadata().await.map_err(broke)?.len();
            write_frame(stream, &FileAnswer::Size(size), MAX_HEADER)
                .await
                .map_err(broke)?;
            let sent = tokio::time::timeout(allowed(size), async {
                let mut buf = vec![0u8; CHUNK];
                let mut left = size;
                while left > 0 {
                    let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                    let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf[..want]).await?;
                    if n == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                    }
                    stream.write_all(&buf[..n]).await?;
                    left -= n as u64;
                }
                stream.flush().await
            });
            match sent.await {
                Ok(Ok(())) => {
                    // Served once every byte is out: the fetcher reads exactly `size` bytes and
                    // may drop its end before this close is answered.
                    store.count_served(size);
                    let _ = tokio::time::timeout(REQUEST_WAIT, stream.close()).await;
                    Ok(())
                }
                // The stream is broken: nothing more can be said on it.
                Ok(Err(e)) => {
                    tracing::warn!(%peer, %hash, error = %e, "sending a file");
                    Ok(())
                }
                Err(_) => {
                    tracing::warn!(%peer, %hash, "sending a file: too slow; cut");
                    Ok(())
                }
            }
        }
    }
}

/// Takes the body of a put the access allowed: `Have` if the store holds the file already,
/// else `Send`, the bytes checked against `hash`, and `Stored`.
async fn take(
    peer: PeerId,
    stream: &mut libp2p::Stream,
    store: &FileStore,
    access: &dyn Access,
    hash: Hash,
    size: u64,
) -> Result<(), Failure> {
    let broke = |e: std::io::Error| Failure::new(FailureKind::Unavailable, e.to_string());
    if store.size(&hash) == Some(size) {
        // Put again (for a job, a checkpoint or a move to name soon): not let go meanwhile.
        store.touch(&hash);
        write_frame(stream, &FileAnswer::Have, MAX_HEADER)
            .await
            .map_err(broke)?;
        return Ok(());
    }
    write_frame(stream, &FileAnswer::Send, MAX_HEADER)
        .await
        .map_err(broke)?;
    let mut body = stream.take(size);
    let took = tokio::time::timeout(allowed(size), store.receive(&mut body, hash, size));
    match took.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let kind = match e {
                ReceiveError::Mismatch { .. } => FailureKind::Input,
                ReceiveError::Broke { .. } => FailureKind::Unavailable,
                ReceiveError::Write { .. } => FailureKind::Failed,
            };
            return Err(Failure::new(kind, format!("file {hash}: {e}")));
        }
        Err(_) => {
            return Err(Failure::new(
                FailureKind::Unavailable,
                format!("file {hash}: slower than {} KiB/s; cut", MIN_RATE >> 10),
            ));
        }
    }
    access.stored(peer, hash, size);
    let stream = body.into_inner();
    write_frame(stream, &FileAnswer::Stored, MAX_HEADER)
        .await
        .map_err(broke)?;
    let _ = stream.close().await;
    tracing::debug!(%peer, %hash, size, "file taken");
    Ok(())
}

/// What a node's file store lets others do: the nodes of its domain get the files it laid out
/// as jobs' inputs since it started (not the outputs it keeps while it uploads them); nothing
/// is put.
pub(crate) struct NodeFiles {
    /// The node's domain.
    pub(crate) domain: String,
    /// Its store.
    pub(crate) store: Arc<FileStore>,
}

impl Access for NodeFiles {
    fn may_put(
        &self,
        _peer: PeerId,
        who: &Principal,
        _hash: &Hash,
        _size: u64,
    ) -> Result<(), Failure> {
        Err(Failure::new(
            FailureKind::Refused,
            format!("{who} may not put files at a node (only at a super-peer)"),
        ))
    }

    fn put_ended(&self, _who: &Principal, _hash: &Hash) {}

    fn may_get(
        &self,
        _peer: PeerId,
        who: &Principal,
        job: &JobId,
        hash: &Hash,
    ) -> Result<(), Failure> {
        if who.kind != mvm_component::policy::PrincipalKind::Node || who.domain != self.domain {
            return Err(Failure::new(
                FailureKind::Refused,
                format!(
                    "{who} may not get files from a node of domain {}",
                    self.domain
                ),
            ));
        }
        if !self.store.is_input(hash) || !self.store.has(hash) {
            return Err(Failure::new(
                FailureKind::NotFound,
                format!("file {hash} of job {job} is not held here"),
            ));
        }
        Ok(())
    }

    fn stored(&self, _peer: PeerId, _hash: Hash, _size: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_component::policy::PrincipalKind;

    fn who(kind: PrincipalKind, domain: &str) -> Principal {
        Principal {
            kind,
            name: "n1".into(),
            domain: domain.into(),
            roles: Vec::new(),
        }
    }

    #[test]
    fn a_node_serves_only_the_inputs_it_laid_out_only_to_its_domains_nodes_and_takes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(FileStore::open(dir.path()).expect("store"));
        let src = dir.path().join("f");
        std::fs::write(&src, b"an input").expect("write");
        let (input, _) = store.put_file(&src).expect("kept");
        std::fs::write(&src, b"an output").expect("write");
        let (output, _) = store.put_file(&src).expect("kept");
        store.mark_input(input);
        let node = NodeFiles {
            domain: "physics".into(),
            store: store.clone(),
        };
        let (peer, job) = (PeerId::random(), JobId::from("j-1-1"));
        let ours = who(PrincipalKind::Node, "physics");
        assert!(node.may_get(peer, &ours, &job, &input).is_ok());
        // An output it keeps while it uploads it, or a file it does not hold: not found.
        for h in [output, Hash::of(b"nothing")] {
            let e = node.may_get(peer, &ours, &job, &h).expect_err("not served");
            assert_eq!(e.kind, FailureKind::NotFound, "{e:?}");
        }
        // Users and other domains' nodes get nothing; no one puts anything.
        for w in [
            who(PrincipalKind::User, "physics"),
            who(PrincipalKind::Node, "biology"),
        ] {
            let e = node.may_get(peer, &w, &job, &input).expect_err("refused");
            assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
        }
        let e = node.may_put(peer, &ours, &input, 1).expect_err("refused");
        assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
    }
}
