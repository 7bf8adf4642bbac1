//! Control-stream frames: their encoding, reading them (each within its size and at a least
//! rate), and writing the ones ready together in one go.

use std::io;
use std::time::Duration;

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::net::conduct::Offence;
use crate::proto::{self, Request, Response};

/// Bytes of frames written in one go at most (more wait for the next write).
pub(super) const BATCH: usize = 256 << 10;

/// Frames waiting for a stream's writer at most; more wait to be queued.
pub(super) const QUEUED: usize = 1024;

/// Requests of one inbound control stream in flight at most: its peer's next request is read
/// once one of them is answered (the peer is slowed down, not the daemon's other peers).
pub(crate) const IN_FLIGHT: usize = 64;

/// Inbound control streams one peer may hold open at once (it needs one); more are closed as
/// they open.
pub(crate) const STREAMS_PER_PEER: usize = 4;

/// The least rate at which a frame, once begun, must arrive: a peer that starts a frame and
/// then trickles it (or stops) loses the stream, as a slow loris would.
pub(super) const MIN_RATE: usize = 64 << 10;

/// How long a frame, once begun, may take at the least.
pub(super) const FRAME_GRACE: Duration = Duration::from_secs(10);

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
pub(super) enum ReadError {
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
    pub(super) fn offence(&self) -> Option<Offence> {
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
pub(super) async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<Option<(u64, T)>> {
    read_frame(r, max).await.map_err(io::Error::from)
}

/// As [`read`], saying whose fault an error is.
pub(super) async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
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
pub(super) async fn write_frames<W: AsyncWrite + Unpin>(
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
