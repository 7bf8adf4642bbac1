//! A node's images, served to the peers that fetch them.

use std::sync::Arc;

use super::NodeOs;

/// Serves this node's images to peers that ask (`/mvm/image/1`): the bytes go as they are
/// stored; the receiver keeps them only if they hash to the id it asked for.
pub(crate) async fn serve_images(site: Arc<crate::site::Site>, os: Arc<NodeOs>) {
    use futures::{AsyncWriteExt, StreamExt};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    let mut incoming = match site.net.accept(crate::proto::IMAGE_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "image requests are not accepted");
            return;
        }
    };
    // Transfers under way: ended with this task.
    let mut sending = tokio::task::JoinSet::new();
    while let Some((peer, who, mut stream)) = incoming.next().await {
        while sending.try_join_next().is_some() {}
        let os = os.clone();
        let site = site.clone();
        sending.spawn(async move {
            let req = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                crate::proto::read_frame::<crate::proto::ImageRequest, _>(
                    &mut stream,
                    crate::proto::MAX_HEADER,
                ),
            )
            .await;
            let Ok(Ok(req)) = req else {
                tracing::warn!(%peer, "no image request");
                return;
            };
            let allowed = site
                .policies
                .current()
                .engine
                .decide(&mvm_component::policy::Question {
                    actor: who.clone(),
                    action: "use-image".into(),
                    resource: mvm_component::policy::Resource::Image(
                        mvm_component::policy::Image {
                            id: req.id.to_string(),
                            domain: site.domain.clone(),
                        },
                    ),
                })
                .into_result();
            let refused = allowed.is_err();
            let found = allowed.and_then(|()| os.repo.get(&req.id).map_err(|e| e.to_string()));
            let header = crate::proto::ImageHeader {
                image: found
                    .as_ref()
                    .map(|i| (i.metadata.clone(), i.size))
                    .map_err(Clone::clone),
                refused,
            };
            if crate::proto::write_frame(&mut stream, &header, crate::proto::MAX_HEADER)
                .await
                .is_err()
            {
                return;
            }
            if let Ok(image) = found {
                let sent = async {
                    let f = tokio::fs::File::open(&image.path).await?;
                    futures::io::copy(&mut f.compat(), &mut stream).await?;
                    stream.close().await
                }
                .await;
                if let Err(e) = sent {
                    tracing::warn!(%peer, image = %req.id, "sending the image: {e}");
                } else {
                    tracing::info!(%peer, image = %req.id, bytes = image.size, "image sent");
                }
            }
        });
    }
}
