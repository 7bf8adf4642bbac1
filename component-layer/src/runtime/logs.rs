//! What a part's vertices write while they run: each vertex's stdout and stderr (WASI) and its
//! `mvm.log` messages, as numbered lines, kept in a [`LogBook`] per part until whoever ships
//! them ([`LogBook::take`]) takes them. Lines are numbered per vertex from 0; a part restored
//! from a checkpoint (moved to another node while it runs) numbers on from a later epoch (the
//! high bits, [`EPOCH_BITS`]: the time of the restore), so that the lines of the vertex before
//! and after have different numbers. Within an epoch, a gap in the numbers is lines dropped
//! because the vertex wrote more than its bound before they were taken.
//!
//! stdout still goes to the vertex's result too (its whole output, up to 1 MiB); the book
//! has it line by line as it is written.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// The longest line kept; a longer one is cut into lines of this length.
pub const MAX_LINE: usize = 4096;

/// The bound of a vertex's log when the job gives none: bytes of lines kept per vertex.
pub const DEFAULT_BOUND: usize = 64 << 10;

/// The low bits of a line's number count lines within an epoch; the high ones are the epoch.
pub const EPOCH_BITS: u32 = 22;

/// The epoch of a line's number: lines of one epoch were numbered by one book.
pub fn epoch(seq: u64) -> u64 {
    seq >> EPOCH_BITS
}

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LogStream {
    /// The vertex's standard output.
    Stdout,
    /// Its standard error.
    Stderr,
    /// An `mvm.log` message (its level first: `error`, `warn`, `info` or `debug`).
    Log,
}

impl LogStream {
    /// Its name, as `mvm logs` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Log => "log",
        }
    }
}

impl std::fmt::Display for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line a vertex wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The vertex.
    pub vertex: String,
    /// Its number among the vertex's lines (from 0, one stream's and another's together).
    pub seq: u64,
    /// When it was written, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Where it came from.
    pub stream: LogStream,
    /// The line, without its newline (bytes that are not UTF-8 replaced).
    pub text: String,
}

impl LogLine {
    /// What it weighs against a bound.
    pub fn weight(&self) -> usize {
        self.text.len() + 32
    }
}

/// One vertex's lines not yet taken.
#[derive(Default)]
struct Pending {
    name: String,
    lines: VecDeque<LogLine>,
    bytes: usize,
    next: u64,
    /// The unfinished last line of stdout and of stderr.
    partial: [Vec<u8>; 2],
}

impl Pending {
    /// Keeps `line`, the oldest going past `bound` bytes.
    fn keep(&mut self, line: LogLine, bound: usize) {
        self.bytes += line.weight();
        self.lines.push_back(line);
        while self.bytes > bound {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.weight(),
                None => break,
            }
        }
    }
}

/// The lines of a part's vertices, from their writes to whoever takes them.
pub struct LogBook {
    bound: usize,
    echo: bool,
    vertices: Mutex<Vec<Pending>>,
}

impl std::fmt::Debug for LogBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogBook")
            .field("vertices", &self.vertices())
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

/// Now, in milliseconds since the Unix epoch (the time lines are stamped with).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl LogBook {
    /// A book for vertices `names` that keeps at most `bound` bytes of lines per vertex until
    /// they are taken (the oldest go first). With `echo`, each stderr line is also written to
    /// this process's stderr as it comes (a job run by `mvm run`).
    pub fn new(names: Vec<String>, bound: usize, echo: bool) -> Arc<LogBook> {
        let vertices = names
            .into_iter()
            .map(|name| Pending {
                name,
                ..Pending::default()
            })
            .collect();
        Arc::new(LogBook {
            bound: bound.max(2 * (MAX_LINE + 32)),
            echo,
            vertices: Mutex::new(vertices),
        })
    }

    /// The vertices, in the order the book keeps them.
    pub fn vertices(&self) -> Vec<String> {
        self.vertices
            .lock()
            .iter()
            .map(|p| p.name.clone())
            .collect()
    }

    /// Numbers every vertex's next lines from `epoch` on (a part restored from a checkpoint:
    /// its lines before were numbered elsewhere, in an earlier epoch).
    pub fn start_epoch(&self, epoch: u64) {
        let first = epoch << EPOCH_BITS;
        for p in self.vertices.lock().iter_mut() {
            p.next = p.next.max(first);
        }
    }

    /// Its bound per vertex, in bytes.
    pub fn bound(&self) -> usize {
        self.bound
    }

    fn push(&self, p: &mut Pending, stream: LogStream, text: String, at_ms: u64) {
        if self.echo && stream == LogStream::Stderr {
            eprintln!("{text}");
        }
        let line = LogLine {
            vertex: p.name.clone(),
            seq: p.next,
            at_ms,
            stream,
            text,
        };
        p.next += 1;
        p.keep(line, self.bound);
    }

    /// What vertex `slot` wrote on `stream` (stdout or stderr): whole lines become lines, the
    /// rest waits for its newline (or [`LogBook::finish`]).
    pub(crate) fn write(&self, slot: usize, stream: LogStream, bytes: &[u8]) {
        let which = usize::from(stream == LogStream::Stderr);
        let at = now_ms();
        let mut vs = self.vertices.lock();
        let Some(p) = vs.get_mut(slot) else {
            return;
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = MAX_LINE - p.partial[which].len();
            let upto = rest.len().min(room);
            match rest[..upto].iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    p.partial[which].extend_from_slice(&rest[..nl]);
                    rest = &rest[nl + 1..];
                }
                None => {
                    p.partial[which].extend_from_slice(&rest[..upto]);
                    rest = &rest[upto..];
                    if p.partial[which].len() < MAX_LINE {
                        break;
                    }
                }
            }
            let done = std::mem::take(&mut p.partial[which]);
            let text = String::from_utf8_lossy(&done).into_owned();
            self.push(p, stream, text, at);
        }
    }

    /// A whole line of vertex `slot`'s (an `mvm.log` message), cut at [`MAX_LINE`].
    pub(crate) fn line(&self, slot: usize, stream: LogStream, mut text: String) {
        if text.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let at = now_ms();
        let mut vs = self.vertices.lock();
        if let Some(p) = vs.get_mut(slot) {
            self.push(p, stream, text, at);
        }
    }

    /// Ends every unfinished line (the vertices have ended).
    pub fn finish(&self) {
        let at = now_ms();
        let mut vs = self.vertices.lock();
        for p in vs.iter_mut() {
            for (which, stream) in [(0, LogStream::Stdout), (1, LogStream::Stderr)] {
                if !p.partial[which].is_empty() {
                    let done = std::mem::take(&mut p.partial[which]);
                    let text = String::from_utf8_lossy(&done).into_owned();
                    self.push(p, stream, text, at);
                }
            }
        }
    }

    /// Every line not yet taken, each vertex's in order.
    pub fn take(&self) -> Vec<LogLine> {
        let mut vs = self.vertices.lock();
        let mut out = Vec::new();
        for p in vs.iter_mut() {
            out.extend(p.lines.drain(..));
            p.bytes = 0;
        }
        out
    }

    /// Lines numbered elsewhere (a worker's, as its node holds them), to be taken here.
    pub fn extend(&self, lines: impl IntoIterator<Item = LogLine>) {
        let mut vs = self.vertices.lock();
        for line in lines {
            let slot = match vs.iter().position(|p| p.name == line.vertex) {
                Some(s) => s,
                None => {
                    vs.push(Pending {
                        name: line.vertex.clone(),
                        ..Pending::default()
                    });
                    vs.len() - 1
                }
            };
            let p = &mut vs[slot];
            p.next = p.next.max(line.seq + 1);
            p.keep(line, self.bound);
        }
    }
}

/// A vertex's place in its part's book.
#[derive(Clone)]
pub(crate) struct VertexLog {
    pub(crate) book: Arc<LogBook>,
    pub(crate) slot: usize,
}

/// A WASI output stream of a vertex: into its book as lines and, for stdout, into the pipe
/// that is its result too.
#[derive(Clone)]
pub(crate) struct Tee {
    pub(crate) pipe: Option<MemoryOutputPipe>,
    pub(crate) log: VertexLog,
    pub(crate) stream: LogStream,
}

impl OutputStream for Tee {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.log.book.write(self.log.slot, self.stream, &bytes);
        match &mut self.pipe {
            Some(p) => p.write(bytes),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        match &mut self.pipe {
            Some(p) => p.check_write(),
            None => Ok(1 << 20),
        }
    }
}

#[async_trait::async_trait]
impl Pollable for Tee {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Tee {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = match &mut self.pipe {
            Some(p) => match std::pin::Pin::new(p).poll_write(cx, buf) {
                std::task::Poll::Ready(Ok(n)) => n,
                other => return other,
            },
            None => buf.len(),
        };
        self.log.book.write(self.log.slot, self.stream, &buf[..n]);
        std::task::Poll::Ready(Ok(n))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Tee {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Tee {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(bound: usize) -> Arc<LogBook> {
        LogBook::new(vec!["a".into(), "b".into()], bound, false)
    }

    fn texts(lines: &[LogLine]) -> Vec<(&str, u64, LogStream, &str)> {
        lines
            .iter()
            .map(|l| (l.vertex.as_str(), l.seq, l.stream, l.text.as_str()))
            .collect()
    }

    #[test]
    fn writes_become_numbered_lines_per_vertex_and_an_unfinished_line_waits() {
        let b = book(DEFAULT_BOUND);
        b.write(0, LogStream::Stdout, b"one\ntw");
        b.write(1, LogStream::Stderr, b"oops\n");
        b.line(0, LogStream::Log, "warn: careful".into());
        b.write(0, LogStream::Stdout, b"o\nthr");
        let got = b.take();
        assert_eq!(
            texts(&got),
            vec![
                ("a", 0, LogStream::Stdout, "one"),
                ("a", 1, LogStream::Log, "warn: careful"),
                ("a", 2, LogStream::Stdout, "two"),
                ("b", 0, LogStream::Stderr, "oops"),
            ]
        );
        assert!(b.take().is_empty(), "taken lines are gone");
        b.finish();
        assert_eq!(texts(&b.take()), vec![("a", 3, LogStream::Stdout, "thr")]);
    }

    #[test]
    fn a_long_line_is_cut_and_a_vertex_over_its_bound_loses_its_oldest_lines() {
        let b = book(0); // the smallest bound: two longest lines
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        b.write(0, LogStream::Stdout, &long);
        b.finish();
        let got = b.take();
        // Three lines were made (4096, 4096, 10 bytes); the bound keeps the last two.
        assert_eq!(
            got.iter()
                .map(|l| (l.seq, l.text.len()))
                .collect::<Vec<_>>(),
            vec![(1, MAX_LINE), (2, 10)]
        );
        // Numbers go on after a take.
        b.write(0, LogStream::Stderr, b"next\n");
        assert_eq!(b.take()[0].seq, 3);
    }

    #[test]
    fn lines_from_elsewhere_are_kept_by_vertex_and_a_new_epoch_numbers_on_past_them() {
        let b = book(DEFAULT_BOUND);
        let line = |vertex: &str, seq| LogLine {
            vertex: vertex.into(),
            seq,
            at_ms: 1,
            stream: LogStream::Stdout,
            text: "t".into(),
        };
        b.extend([line("b", 5), line("zz", 0), line("a", 0)]);
        let got = b.take();
        assert_eq!(
            got.iter()
                .map(|l| (l.vertex.as_str(), l.seq))
                .collect::<Vec<_>>(),
            vec![("a", 0), ("b", 5), ("zz", 0)]
        );
        b.start_epoch(3);
        b.write(0, LogStream::Stdout, b"restored\n");
        b.write(1, LogStream::Stdout, b"restored\n");
        let got = b.take();
        assert_eq!(epoch(got[0].seq), 3);
        assert_eq!(got[0].seq, 3 << EPOCH_BITS);
        assert_eq!(
            got[1].seq,
            3 << EPOCH_BITS,
            "past what b had, in the new epoch"
        );
    }

    #[test]
    fn a_tee_gives_stdout_to_its_pipe_and_its_book() {
        let b = book(DEFAULT_BOUND);
        let pipe = MemoryOutputPipe::new(1 << 10);
        let mut tee = Tee {
            pipe: Some(pipe.clone()),
            log: VertexLog {
                book: b.clone(),
                slot: 1,
            },
            stream: LogStream::Stdout,
        };
        tee.write(Bytes::from_static(b"hi\nthere\n"))
            .expect("write");
        assert_eq!(&pipe.contents()[..], b"hi\nthere\n");
        assert_eq!(
            texts(&b.take()),
            vec![
                ("b", 0, LogStream::Stdout, "hi"),
                ("b", 1, LogStream::Stdout, "there")
            ]
        );
    }
}
