//! The wire format of a remote queue endpoint: length-prefixed frames.
//!
//! ```text
//! frame   = len:u32le kind:u8 body          (len counts kind and body)
//! HELLO   = magic:"MVMQ" version:u16le window_items:u32le window_bytes:u64le max_item:u64le
//! DATA    = priority:i64le payload           (sender -> receiver)
//! CREDIT  = items:u32le bytes:u64le          (receiver -> sender: these frames are processed)
//! END     =                                  (sender -> receiver: no more data)
//! END_ACK =                                  (receiver -> sender: everything is processed)
//! RETURN  = priority:i64le payload           (receiver -> sender: an item it cannot deliver)
//! STOP    =                                  (receiver -> sender: it takes nothing more)
//! WANT    =                                  (sender -> receiver: credit what you processed now)
//! MARK    = number:u64le                     (sender -> receiver: a checkpoint's cut is here)
//! ```
//!
//! A receiver credits a quarter of its window at a time; a sender that cannot go on without
//! the rest (its window is used up, or its queue has ended) asks for it with WANT.
//!
//! A sender writes MARK only when its end is held for a checkpoint ([`super::Hold`]): every
//! DATA frame before it belongs to the cut, none after it. A receiver that was not asked to
//! drain ([`super::Drain`]) records the number and reads on. Version 3 added MARK.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::RemoteError;

/// The protocol version this build speaks.
pub(crate) const VERSION: u16 = 3;
const MAGIC: &[u8; 4] = b"MVMQ";
/// Bytes before a DATA or RETURN payload: kind and priority.
pub(crate) const ITEM_OVERHEAD: usize = 1 + 8;
const HELLO_LEN: usize = 1 + 4 + 2 + 4 + 8 + 8;

const HELLO: u8 = 0;
pub(crate) const DATA: u8 = 1;
const CREDIT: u8 = 2;
pub(crate) const END: u8 = 3;
const END_ACK: u8 = 4;
const RETURN: u8 = 5;
const STOP: u8 = 6;
const WANT: u8 = 7;
pub(crate) const MARK: u8 = 8;
/// The length of a MARK frame's body (its kind and number).
pub(crate) const MARK_LEN: usize = 1 + 8;

/// The handshake each side sends first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: u16,
    pub(crate) window_items: u32,
    pub(crate) window_bytes: u64,
    pub(crate) max_item: u64,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Hello(Hello),
    Data { priority: i64, payload: Bytes },
    Credit { items: u32, bytes: u64 },
    End,
    EndAck,
    Return { priority: i64, payload: Bytes },
    Stop,
    Want,
    Mark(u64),
}

/// How much a reader asks the stream for at once.
const READ_CHUNK: usize = 1 << 20;
/// The least a read asks for.
const READ_MIN: usize = 16 << 10;

/// Reads frames from a byte stream. Cancel-safe: a `next` future dropped mid-frame loses
/// nothing, because bytes are kept in the reader's buffer until a whole frame is there.
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_frame: usize,
    /// The length of the last frame read (with its length prefix), the guess for the next.
    last: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R, max_item: u64) -> FrameReader<R> {
        let max_frame = usize::try_from(max_item)
            .unwrap_or(usize::MAX)
            .saturating_add(ITEM_OVERHEAD);
        FrameReader {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            max_frame: max_frame.max(HELLO_LEN),
            last: 0,
        }
    }

    /// Raises the largest frame accepted (after the peer's hello says how large items may be).
    pub(crate) fn set_max_item(&mut self, max_item: u64) {
        let max_frame = usize::try_from(max_item)
            .unwrap_or(usize::MAX)
            .saturating_add(ITEM_OVERHEAD);
        self.max_frame = max_frame.max(HELLO_LEN);
    }

    /// Whether a whole frame is buffered (so `next` would not wait for the network).
    pub(crate) fn has_frame(&self) -> bool {
        self.frame_len()
            .is_some_and(|len| self.buf.len() >= 4 + len)
    }

    fn frame_len(&self) -> Option<usize> {
        let head: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(head)).ok()
    }

    /// The next frame, or `None` at a clean end of the stream between frames.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, RemoteError> {
        loop {
            // How much to ask for: the rest of the frame when its length is known, else as much
            // as the last frame (streams tend to carry items of one size: one read per item,
            // not one for its head and another for the rest), and at least a small chunk.
            // Never the whole spare capacity: a reader that cannot take uninitialized memory
            // (e.g. a futures stream behind tokio-util's compat) zeroes all it is offered on
            // every read, which cost ~100 µs per item at 1 MiB.
            let mut want = READ_MIN.max(self.last.min(READ_CHUNK));
            if let Some(len) = self.frame_len() {
                if len == 0 || len > self.max_frame {
                    return Err(RemoteError::Protocol(format!(
                        "frame of {len} bytes (largest allowed {})",
                        self.max_frame
                    )));
                }
                if self.buf.len() >= 4 + len {
                    self.last = 4 + len;
                    self.buf.advance(4);
                    let body = self.buf.split_to(len).freeze();
                    return decode(body).map(Some);
                }
                self.buf.reserve(4 + len - self.buf.len());
                want = want.max(4 + len - self.buf.len());
            }
            // Read into large buffers: frames are split off as views of them, so a stream of
            // 64 KiB items costs one allocation and a few reads per megabyte, not per item.
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self
                .io
                .read_buf(&mut (&mut self.buf).limit(want))
                .await
                .map_err(RemoteError::io("read"))?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RemoteError::Protocol(
                        "stream ended in the middle of a frame".into(),
                    ))
                };
            }
        }
    }
}

fn decode(mut body: Bytes) -> Result<Frame, RemoteError> {
    let kind = body.get_u8();
    let need = |body: &Bytes, n: usize, what: &str| {
        if body.len() < n {
            Err(RemoteError::Protocol(format!(
                "{what} frame too short ({} bytes)",
                body.len()
            )))
        } else {
            Ok(())
        }
    };
    let exact = |body: &Bytes, n: usize, what: &str| {
        if body.len() == n {
            Ok(())
        } else {
            Err(RemoteError::Protocol(format!(
                "{what} frame of {} bytes, expected {n}",
                body.len()
            )))
        }
    };
    Ok(match kind {
        HELLO => {
            exact(&body, HELLO_LEN - 1, "HELLO")?;
            if &body[..4] != MAGIC {
                return Err(RemoteError::Protocol(
                    "not an MVM queue stream (bad magic)".into(),
                ));
            }
            body.advance(4);
            Frame::Hello(Hello {
                version: body.get_u16_le(),
                window_items: body.get_u32_le(),
                window_bytes: body.get_u64_le(),
                max_item: body.get_u64_le(),
            })
        }
        DATA | RETURN => {
            need(&body, 8, if kind == DATA { "DATA" } else { "RETURN" })?;
            let priority = body.get_i64_le();
            if kind == DATA {
                Frame::Data {
                    priority,
                    payload: body,
                }
            } else {
                Frame::Return {
                    priority,
                    payload: body,
                }
            }
        }
        CREDIT => {
            exact(&body, 12, "CREDIT")?;
            Frame::Credit {
                items: body.get_u32_le(),
                bytes: body.get_u64_le(),
            }
        }
        END => {
            exact(&body, 0, "END")?;
            Frame::End
        }
        END_ACK => {
            exact(&body, 0, "END_ACK")?;
            Frame::EndAck
        }
        STOP => {
            exact(&body, 0, "STOP")?;
            Frame::Stop
        }
        WANT => {
            exact(&body, 0, "WANT")?;
            Frame::Want
        }
        MARK => {
            exact(&body, MARK_LEN - 1, "MARK")?;
            Frame::Mark(body.get_u64_le())
        }
        other => return Err(RemoteError::Protocol(format!("unknown frame kind {other}"))),
    })
}

/// Writes frames into a buffer and flushes it to a byte stream; large payloads go straight to
/// the stream without a copy.
pub(crate) struct FrameWriter<W> {
    io: W,
    buf: BytesMut,
}

/// Payloads at least this large skip the buffer.
const DIRECT: usize = 16 * 1024;
/// The buffer is flushed when it grows past this.
const FLUSH_AT: usize = 64 * 1024;

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(crate) fn new(io: W) -> FrameWriter<W> {
        FrameWriter {
            io,
            buf: BytesMut::with_capacity(FLUSH_AT + 1024),
        }
    }

    fn head(&mut self, kind: u8, body_len: usize) -> Result<(), RemoteError> {
        let len = u32::try_from(1 + body_len).map_err(|_| {
            RemoteError::Protocol(format!("item of {body_len} bytes is too large for a frame"))
        })?;
        self.buf.put_u32_le(len);
        self.buf.put_u8(kind);
        Ok(())
    }

    pub(crate) async fn hello(&mut self, h: Hello) -> Result<(), RemoteError> {
        self.head(HELLO, HELLO_LEN - 1)?;
        self.buf.put_slice(MAGIC);
        self.buf.put_u16_le(h.version);
        self.buf.put_u32_le(h.window_items);
        self.buf.put_u64_le(h.window_bytes);
        self.buf.put_u64_le(h.max_item);
        self.flush().await
    }

    async fn item(&mut self, kind: u8, priority: i64, payload: &[u8]) -> Result<(), RemoteError> {
        self.head(kind, 8 + payload.len())?;
        self.buf.put_i64_le(priority);
        if payload.len() >= DIRECT {
            // What is buffered and the payload in one vectored write: a small write of its own
            // would go out as a packet of its own (the streams are no-delay).
            let mut out = Buf::chain(&self.buf[..], payload);
            self.io
                .write_all_buf(&mut out)
                .await
                .map_err(RemoteError::io("write"))?;
            self.buf.clear();
        } else {
            self.buf.put_slice(payload);
            if self.buf.len() >= FLUSH_AT {
                self.write_buf().await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn data(&mut self, priority: i64, payload: &[u8]) -> Result<(), RemoteError> {
        self.item(DATA, priority, payload).await
    }

    pub(crate) async fn give_back(
        &mut self,
        priority: i64,
        payload: &[u8],
    ) -> Result<(), RemoteError> {
        self.item(RETURN, priority, payload).await
    }

    pub(crate) fn credit(&mut self, items: u32, bytes: u64) -> Result<(), RemoteError> {
        self.head(CREDIT, 12)?;
        self.buf.put_u32_le(items);
        self.buf.put_u64_le(bytes);
        Ok(())
    }

    pub(crate) fn end(&mut self) -> Result<(), RemoteError> {
        self.head(END, 0)
    }

    pub(crate) fn end_ack(&mut self) -> Result<(), RemoteError> {
        self.head(END_ACK, 0)
    }

    pub(crate) fn stop(&mut self) -> Result<(), RemoteError> {
        self.head(STOP, 0)
    }

    pub(crate) fn want(&mut self) -> Result<(), RemoteError> {
        self.head(WANT, 0)
    }

    pub(crate) fn mark(&mut self, number: u64) -> Result<(), RemoteError> {
        self.head(MARK, MARK_LEN - 1)?;
        self.buf.put_u64_le(number);
        Ok(())
    }

    async fn write_buf(&mut self) -> Result<(), RemoteError> {
        if !self.buf.is_empty() {
            self.io
                .write_all(&self.buf)
                .await
                .map_err(RemoteError::io("write"))?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes everything buffered and flushes the stream.
    pub(crate) async fn flush(&mut self) -> Result<(), RemoteError> {
        self.write_buf().await?;
        self.io.flush().await.map_err(RemoteError::io("flush"))
    }

    /// Flushes and shuts the write side down (a clean end for the peer).
    pub(crate) async fn shutdown(&mut self) -> Result<(), RemoteError> {
        self.flush().await?;
        self.io
            .shutdown()
            .await
            .map_err(RemoteError::io("shutdown"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_garbage_is_refused() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a);
        let hello = Hello {
            version: VERSION,
            window_items: 7,
            window_bytes: 9,
            max_item: 1000,
        };
        w.hello(hello).await.expect("write");
        w.data(-3, b"abc").await.expect("write");
        w.data(5, &vec![1u8; 20_000]).await.expect("write");
        w.credit(2, 40).expect("write");
        w.give_back(1, b"z").await.expect("write");
        w.end().expect("write");
        w.end_ack().expect("write");
        w.stop().expect("write");
        w.want().expect("write");
        w.mark(u64::MAX - 1).expect("write");
        w.shutdown().await.expect("shutdown");
        let mut r = FrameReader::new(b, 100_000);
        assert_eq!(r.next().await.expect("ok"), Some(Frame::Hello(hello)));
        assert_eq!(
            r.next().await.expect("ok"),
            Some(Frame::Data {
                priority: -3,
                payload: Bytes::from_static(b"abc")
            })
        );
        assert!(
            matches!(r.next().await.expect("ok"), Some(Frame::Data { priority: 5, payload }) if payload.len() == 20_000)
        );
        assert_eq!(
            r.next().await.expect("ok"),
            Some(Frame::Credit {
                items: 2,
                bytes: 40
            })
        );
        assert_eq!(
            r.next().await.expect("ok"),
            Some(Frame::Return {
                priority: 1,
                payload: Bytes::from_static(b"z")
            })
        );
        assert_eq!(r.next().await.expect("ok"), Some(Frame::End));
        assert_eq!(r.next().await.expect("ok"), Some(Frame::EndAck));
        assert_eq!(r.next().await.expect("ok"), Some(Frame::Stop));
        assert_eq!(r.next().await.expect("ok"), Some(Frame::Want));
        assert_eq!(r.next().await.expect("ok"), Some(Frame::Mark(u64::MAX - 1)));
        assert_eq!(r.next().await.expect("ok"), None);
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let mut r = FrameReader::new(&[0xff, 0xff, 0xff, 0x7f, 1][..], 1000);
        assert!(
            matches!(r.next().await, Err(RemoteError::Protocol(m)) if m.contains("largest allowed"))
        );
        let mut r = FrameReader::new(&[10, 0, 0, 0, 1, 2][..], 1000);
        assert!(
            matches!(r.next().await, Err(RemoteError::Protocol(m)) if m.contains("middle of a frame"))
        );
        let mut r = FrameReader::new(&[1, 0, 0, 0, 99][..], 1000);
        assert!(
            matches!(r.next().await, Err(RemoteError::Protocol(m)) if m.contains("unknown frame kind"))
        );
        let mut r = FrameReader::new(&[3, 0, 0, 0, 2, 1, 2][..], 1000);
        assert!(matches!(r.next().await, Err(RemoteError::Protocol(m)) if m.contains("CREDIT")));
        let mut r = FrameReader::new(&[5, 0, 0, 0, 8, 1, 2, 3, 4][..], 1000);
        assert!(matches!(r.next().await, Err(RemoteError::Protocol(m)) if m.contains("MARK")));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            rt.block_on(async {
                let mut r = FrameReader::new(&data[..], 64);
                for _ in 0..50 {
                    match r.next().await { Ok(Some(_)) => {}, _ => break }
                }
            });
        }
    }
}
