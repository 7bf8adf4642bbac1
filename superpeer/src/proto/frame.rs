//! Frames: CBOR messages behind a 4-byte big-endian length, the messages of the certificate
//! exchange, and the headers of queue-data and image streams.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

/// Asks a node for an image's bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRequest {
    /// The image (`name:version@sha256:HEX` on the wire).
    pub id: mvm_os::image::ImageId,
}

/// A node's answer: the image's metadata and size (then that many bytes), or why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageHeader {
    /// The metadata and byte count, or the reason it is not sent.
    pub image: Result<(mvm_os::image::Metadata, u64), String>,
    /// Whether the reason is the serving node's policy.
    #[serde(default)]
    pub refused: bool,
}

/// The first frame of a file transfer ([`super::FILES_PROTOCOL`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileRequest {
    /// Take a file: `size` bytes follow once the receiver answers [`FileAnswer::Send`].
    Put {
        /// Its content hash.
        hash: super::Hash,
        /// Its size.
        size: u64,
    },
    /// Send a file of job `job` (an input or output of it).
    Get {
        /// The job it belongs to.
        job: super::JobId,
        /// Its content hash.
        hash: super::Hash,
    },
}

/// The receiver's answers on a file transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileAnswer {
    /// To a `Put`: already held, send nothing.
    Have,
    /// To a `Put`: send the bytes.
    Send,
    /// After a `Put`'s bytes: they matched the hash and are kept.
    Stored,
    /// To a `Get`: this many bytes follow.
    Size(u64),
    /// Refused, or failed.
    Error(super::Failure),
}

/// The largest control frame by default (a submission carries its modules).
pub const MAX_FRAME: usize = 64 << 20;

/// The largest certificate a [`Hello`] may carry.
pub const MAX_CERT: usize = 16 << 10;

/// The largest frame of the certificate exchange: all that is read from a peer before its
/// certificate has passed.
pub const MAX_HELLO: usize = 64 << 10;

/// The longest reason a [`Verdict`] may give.
pub const MAX_REASON: usize = 4 << 10;

/// What each side of a new connection sends on the stream it opens ([`super::HELLO_PROTOCOL`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's certificate (DER).
    pub cert: bytes::Bytes,
}

/// The answer to a [`Hello`]: whether the receiver takes the certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// It passed: the receiver now serves the sender's streams.
    Passed,
    /// It is refused, and why; the receiver closes the connection.
    Refused(String),
}

/// The first bytes of a queue-data stream: which remote channel it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// The job id.
    pub job: super::JobId,
    /// The destination vertex.
    pub vertex: String,
    /// Its input port.
    pub port: String,
    /// The opener asks for a direct link ([`ACK_DIRECT`]) instead of data on this stream.
    #[serde(default)]
    pub direct: bool,
    /// The opener takes a plain direct link ([`ACK_PLAIN`]), if the acceptor does too.
    #[serde(default)]
    pub plain: bool,
    /// The run of the job the opener's part belongs to: a stream from another run is refused.
    #[serde(default)]
    pub attempt: u32,
}

/// The acceptor's answer to a stream header: the channel is expected; its items follow on
/// this stream.
pub const ACK_OK: u8 = 0;
/// The acceptor's answer to a stream header: no such channel here.
pub const ACK_UNKNOWN: u8 = 1;
/// The acceptor's answer to a stream header that asked for a direct link: the channel is
/// expected, on a sealed direct link. Followed by the link listener's port (`u16le`) and the
/// link's 32-byte secret (whose id the opener presents there, and from which both derive the
/// key); the stream then ends.
pub const ACK_DIRECT: u8 = 2;
/// As [`ACK_DIRECT`], for a plain direct link (both nodes take them).
pub const ACK_PLAIN: u8 = 3;

/// The largest stream header.
pub const MAX_HEADER: usize = 4 << 10;

/// Reads one CBOR frame of at most `max` bytes.
///
/// # Errors
/// I/O errors, an oversized frame, or bytes that do not decode as `T`.
pub async fn read_frame<T, R>(io: &mut R, max: usize) -> io::Result<T>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    decode(&buf)
}

/// Decodes one CBOR message.
///
/// # Errors
/// The bytes do not decode as `T`.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    ciborium::from_reader(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))
}

/// Writes one CBOR frame.
///
/// # Errors
/// I/O errors, or a message over `max` bytes.
pub async fn write_frame<T, W>(io: &mut W, msg: &T, max: usize) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let mut buf = encode_after(4, msg, max)?;
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    io.write_all(&buf).await?;
    io.flush().await
}

/// `head` zero bytes (for the caller's header), then `msg` in CBOR.
///
/// # Errors
/// The message does not encode, or is over `max` bytes.
pub(crate) fn encode_after<T: Serialize>(head: usize, msg: &T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; head];
    ciborium::into_writer(msg, &mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let len = buf.len() - head;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes is over the limit of {max}"),
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{BrokerRequest, Request};

    #[test]
    fn frames_round_trip_and_oversized_or_garbage_frames_are_errors() {
        futures::executor::block_on(async {
            let req = Request::Broker(BrokerRequest::Terminate {
                job: "fft8-1-1".parse().expect("a job id"),
                attempt: 0,
                reason: "done".into(),
            });
            let mut buf = Vec::new();
            write_frame(&mut buf, &req, 1024).await.expect("written");
            let back: Request = read_frame(&mut buf.as_slice(), 1024).await.expect("read");
            assert!(
                matches!(back, Request::Broker(BrokerRequest::Terminate { job, .. }) if job.as_str() == "fft8-1-1")
            );
            let e = read_frame::<Request, _>(&mut buf.as_slice(), 4)
                .await
                .expect_err("too big");
            assert!(e.to_string().contains("over the limit"), "{e}");
            let garbage = [0, 0, 0, 3, 0xff, 0x00, 0x13];
            let e = read_frame::<Request, _>(&mut garbage.as_slice(), 1024)
                .await
                .expect_err("garbage");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            let e = write_frame(&mut Vec::new(), &req, 4)
                .await
                .expect_err("too big");
            assert!(e.to_string().contains("over the limit"), "{e}");
        });
    }
}
