//! Images fetched from the nodes that serve them.

use libp2p::{Multiaddr, PeerId};

use crate::net::{Net, NetConfig, split_peer};
use crate::pki::Credentials;
use crate::proto::{Failure, FailureKind};

/// Fetches image `id` from the node at `addr` (`/…/p2p/PEER`) into `repo`. The bytes are kept
/// only if they hash to the id's digest; otherwise nothing is kept and the error says so.
///
/// # Errors
/// A bad address or id, the node does not have the image, the transfer broke, or the bytes do
/// not match the id.
pub async fn fetch_image(
    creds: &Credentials,
    addr: &str,
    id: &mvm_os::image::ImageId,
    repo: &mvm_os::image::Repository,
) -> Result<mvm_os::image::Image, Failure> {
    let (peer, a) = split_peer(addr)?;
    let (net, _inbound) = Net::start(creds, &NetConfig::default()).await?;
    fetch_image_from(&net, peer, &[a], id, repo).await
}

/// Fetches image `id` from `peer` (at `addrs`) over `net` into `repo`, as [`fetch_image`].
///
/// # Errors
/// As [`fetch_image`].
pub(crate) async fn fetch_image_from(
    net: &Net,
    peer: PeerId,
    addrs: &[Multiaddr],
    id: &mvm_os::image::ImageId,
    repo: &mvm_os::image::Repository,
) -> Result<mvm_os::image::Image, Failure> {
    use futures::AsyncReadExt;
    use std::io::Seek;

    // The node drops streams from peers whose certificate has not passed.
    net.authenticate(peer, addrs)
        .await
        .map_err(|e| Failure::new(FailureKind::Refused, e.to_string()))?;
    let unavailable = |m: String| Failure::new(FailureKind::Unavailable, m);
    let mut control = net.streams();
    // The dial runs in the swarm's task: the stream can be opened once it has connected.
    let mut tries = 0u32;
    let mut stream = loop {
        match control
            .open_stream(peer, crate::proto::IMAGE_PROTOCOL)
            .await
        {
            Ok(s) => break s,
            Err(e) if tries >= 100 => {
                return Err(unavailable(format!("cannot reach {peer}: {e}")));
            }
            Err(_) => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    let req = crate::proto::ImageRequest { id: id.clone() };
    crate::proto::write_frame(&mut stream, &req, crate::proto::MAX_HEADER)
        .await
        .map_err(|e| unavailable(format!("{peer}: {e}")))?;
    let header: crate::proto::ImageHeader =
        crate::proto::read_frame(&mut stream, crate::proto::MAX_HEADER)
            .await
            .map_err(|e| unavailable(format!("{peer}: {e}")))?;
    let kind = if header.refused {
        FailureKind::Refused
    } else {
        FailureKind::Input
    };
    let (metadata, size) = header
        .image
        .map_err(|m| Failure::new(kind, format!("{peer}: {m}")))?;
    // Into a temporary file first; the repository hashes it while taking it in.
    let mut tmp = tempfile::tempfile().map_err(|e| unavailable(e.to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    let mut body = stream.take(size);
    while left > 0 {
        let n = body
            .read(&mut buf)
            .await
            .map_err(|e| unavailable(format!("{peer}: {e}")))?;
        if n == 0 {
            return Err(unavailable(format!(
                "{peer}: the transfer ended {left} bytes short"
            )));
        }
        std::io::Write::write_all(&mut tmp, &buf[..n]).map_err(|e| unavailable(e.to_string()))?;
        left -= n as u64;
    }
    tmp.rewind().map_err(|e| unavailable(e.to_string()))?;
    let (repo, id) = (repo.clone(), id.clone());
    tokio::task::spawn_blocking(move || repo.receive(&id, &mut tmp, metadata))
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|e| Failure::new(FailureKind::Failed, e.to_string()))
}
