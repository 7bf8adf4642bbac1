//! The host ABI: the import module `mvm` a job calls to use its ports and parameters.
//!
//! A job never names a peer, rank or address: it sends to and receives from its own named
//! ports, and the topology decides where they lead. Pointers and lengths are `i32` offsets into
//! the job's exported `memory`.
//!
//! | import | signature | result |
//! |---|---|---|
//! | `send(port, port_len, data, data_len)` | `(i32, i32, i32, i32) -> i32` | `0` sent (to every channel of the port); `-1` no such output port; `-2` no receiver is left; `-3` the item is too large; `-5` the queue is full and refuses (policy `fail`) |
//! | `recv(port, port_len, buf, buf_cap)` | `(i32, i32, i32, i32) -> i64` | waits for an item; `>= 0` its length: copied when it fits in `buf_cap`, otherwise nothing is copied and the item is kept for the next call; `-1` no such input port; `-2` end of stream; `-4` the item did not decode (logged with queue and codec) |
//! | `try_recv(port, port_len, buf, buf_cap)` | `(i32, i32, i32, i32) -> i64` | as `recv` without waiting; `-3` nothing there now |
//! | `ports(buf, buf_cap)` | `(i32, i32) -> i32` | writes one line per port, `in NAME` or `out NAME`; returns the length (the same too-small rule) |
//! | `param(name, name_len, buf, buf_cap)` | `(i32, i32, i32, i32) -> i32` | the parameter's value (vertex attribute, else job parameter); its length (the same rule); `-1` if there is none |
//! | `log(level, msg, msg_len)` | `(i32, i32, i32) -> ()` | logs through the node: 0 error, 1 warn, 2 info, 3 debug |
//! | `yield()` | `() -> ()` | nothing, except in a job that asked for checkpoints: there a compute loop that calls it can be paused (see [`super::checkpoint`]) |
//!
//! Items arrive in the base format of the channel's codec: transforms such as `zstd` are
//! applied and removed by the node. WASI preview 1 gives stdout, stderr, args, environment and
//! clocks. stdout, stderr and `mvm.log` messages go line by line into the part's log book
//! ([`super::logs`]); stdout is the vertex's result too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use mvm_queue::codec::Codec;
use mvm_queue::queue::{Receiver, RecvFailure, SendFailure, Sender};
use parking_lot::Mutex;
use wasmtime::{Caller, Extern, Linker, Memory};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use super::checkpoint;
use super::checkpoint::image::{Count, VertexCounts};
use super::logs::LogStream;

/// An input port: the queue it receives from, its codec, and an item kept back for a larger
/// buffer.
pub(crate) struct InPort {
    pub(crate) rx: Receiver<Bytes>,
    pub(crate) codec: Codec,
    pub(crate) kept: Mutex<Option<Bytes>>,
    /// An item may come within a poll: every channel into the port comes from a vertex on
    /// this node, or over a direct link that the polling receive reads itself (one through a
    /// node's network tasks takes longer than any poll).
    pub(crate) local: bool,
}

/// An output port: every channel it feeds.
pub(crate) struct OutPort {
    pub(crate) channels: Vec<(Sender<Bytes>, Codec)>,
    /// Where its channels' counts start in [`VertexState::counts`].
    pub(crate) first: usize,
}

impl OutPort {
    /// Where channel `c` goes, `vertex:port`, from its queue's name (`JOB/vertex:port`, or
    /// `JOB/vertex:port>out` for an outbox), whose job prefix is `prefix` bytes long.
    fn to(&self, c: usize, prefix: usize) -> Option<&str> {
        let name = self.channels.get(c)?.0.queue_name();
        let name = name.get(prefix..)?;
        Some(name.strip_suffix(">out").unwrap_or(name))
    }
}

/// What a vertex's job can reach.
pub(crate) struct VertexIo {
    pub(crate) vertex: String,
    pub(crate) inputs: Ports<InPort>,
    pub(crate) outputs: Ports<OutPort>,
    pub(crate) component: String,
    /// The vertex's own attributes (they override job parameters).
    pub(crate) attributes: BTreeMap<String, String>,
    /// The job's parameters, shared by its vertices.
    pub(crate) params: Arc<BTreeMap<String, String>>,
    /// Its part's pause control, when the part is checkpointable.
    pub(crate) pause: Option<Arc<super::checkpoint::pause::PauseCtl>>,
    /// The length of the job's prefix (`JOB/`) in its queues' names.
    pub(crate) prefix: usize,
    /// Its place in its part's log book.
    pub(crate) log: Option<super::logs::VertexLog>,
    /// Its sandbox directory, preopened as `.` (none: it reaches no files).
    pub(crate) sandbox: Option<std::path::PathBuf>,
}

impl VertexIo {
    /// A parameter: `vertex` and `component` name the vertex, then its attributes, then the
    /// job's parameters.
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        match name {
            "vertex" => Some(&self.vertex),
            "component" => Some(&self.component),
            _ => self
                .attributes
                .get(name)
                .or_else(|| self.params.get(name))
                .map(String::as_str),
        }
    }

    /// One line per port, `in NAME` or `out NAME`.
    pub(crate) fn port_list(&self) -> String {
        let ins = self.inputs.0.iter().map(|(n, _)| ("in", n));
        let outs = self.outputs.0.iter().map(|(n, _)| ("out", n));
        ins.chain(outs).fold(String::new(), |mut s, (dir, n)| {
            s.push_str(dir);
            s.push(' ');
            s.push_str(n);
            s.push('\n');
            s
        })
    }
}

/// A vertex's ports of one direction, found by name without allocating: jobs have few ports,
/// so a scan beats hashing, and the name is compared in place in the job's memory.
pub(crate) struct Ports<T>(pub(crate) Vec<(Box<str>, T)>);

impl<T> Ports<T> {
    /// The index of the port of this name.
    pub(crate) fn position(&self, name: &[u8]) -> Option<usize> {
        self.0.iter().position(|(n, _)| n.as_bytes() == name)
    }

    /// The port at an index from [`Ports::position`].
    pub(crate) fn at(&self, i: usize) -> Option<&T> {
        self.0.get(i).map(|(_, p)| p)
    }
}

/// The store data of one vertex.
pub(crate) struct VertexState {
    /// Built on the first WASI call: most vertices only use their ports, and a WASI context
    /// (descriptor table, streams, random source, clocks) is the largest part of setting one up.
    pub(crate) wasi: Option<WasiP1Ctx>,
    /// Where the job's stdout goes.
    pub(crate) stdout: MemoryOutputPipe,
    pub(crate) limits: super::Limiter,
    pub(crate) io: Arc<VertexIo>,
    /// The job's exported memory, found once after instantiation.
    pub(crate) memory: Option<Memory>,
    /// The most a receive polls before parking, in nanoseconds (0: never; on the shared pool).
    pub(crate) spin: u32,
    /// What it wrote to stdout before the checkpoint it was restored from.
    pub(crate) stdout_before: Bytes,
    /// How it pauses, when it is checkpointable.
    pub(crate) pausing: Option<super::checkpoint::pause::Pausing>,
    /// What it took from each input port (by index), then what it put on each output
    /// channel (from [`OutPort::first`]); restored with it from a checkpoint.
    pub(crate) counts: Vec<Count>,
}

impl VertexState {
    /// Its counts by port and edge.
    pub(crate) fn traffic(&self) -> VertexCounts {
        let io = &self.io;
        let at = |i: usize| self.counts.get(i).copied().unwrap_or_default();
        VertexCounts {
            received: (io.inputs.0.iter().enumerate())
                .map(|(i, (port, _))| (port.to_string(), at(i)))
                .collect(),
            sent: (io.outputs.0.iter())
                .flat_map(|(port, p)| {
                    (0..p.channels.len()).map(move |c| {
                        let to = p.to(c, io.prefix).unwrap_or_default().to_owned();
                        (port.to_string(), to, at(p.first + c))
                    })
                })
                .collect(),
        }
    }

    /// Takes the counts of `saved` (a vertex restored from a checkpoint).
    ///
    /// # Errors
    /// A port or an edge this vertex does not have.
    pub(crate) fn set_traffic(&mut self, saved: &VertexCounts) -> Result<(), String> {
        for (port, c) in &saved.received {
            let i = self.io.inputs.position(port.as_bytes());
            let slot = i.and_then(|i| self.counts.get_mut(i));
            *slot.ok_or_else(|| {
                format!("the checkpoint counts items into no input port '{port}'")
            })? = *c;
        }
        for (port, to, c) in &saved.sent {
            let io = &self.io;
            let i = io
                .outputs
                .position(port.as_bytes())
                .and_then(|i| io.outputs.at(i));
            let at = i.and_then(|p| {
                let c = (0..p.channels.len()).find(|&c| p.to(c, io.prefix) == Some(to.as_str()))?;
                Some(p.first + c)
            });
            let Some(slot) = at.and_then(|i| self.counts.get_mut(i)) else {
                return Err(format!(
                    "the checkpoint counts items from '{port}' to '{to}', an edge this vertex \
                     does not have"
                ));
            };
            *slot = *c;
        }
        Ok(())
    }

    /// All it wrote to stdout: before its checkpoint, then since.
    pub(crate) fn output(&self) -> Bytes {
        let since = self.stdout.contents();
        if self.stdout_before.is_empty() {
            return since;
        }
        let mut all = Vec::with_capacity(self.stdout_before.len() + since.len());
        all.extend_from_slice(&self.stdout_before);
        all.extend_from_slice(&since);
        Bytes::from(all)
    }
}

const NO_PORT: i64 = -1;
const END: i64 = -2;
const EMPTY: i64 = -3;
const BAD_ITEM: i64 = -4;

fn memory(caller: &mut Caller<'_, VertexState>) -> wasmtime::Result<Memory> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => wasmtime::bail!("the job exports no memory named 'memory'"),
    }
}

fn range(ptr: i32, len: i32, size: usize, what: &str) -> wasmtime::Result<std::ops::Range<usize>> {
    let (Ok(p), Ok(l)) = (usize::try_from(ptr), usize::try_from(len)) else {
        wasmtime::bail!("{what}: negative pointer or length ({ptr}, {len})");
    };
    match p.checked_add(l) {
        Some(end) if end <= size => Ok(p..end),
        _ => {
            wasmtime::bail!("{what}: {l} bytes at {p} are outside the job's memory of {size} bytes")
        }
    }
}

fn read(
    caller: &mut Caller<'_, VertexState>,
    ptr: i32,
    len: i32,
    what: &str,
) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(caller)?;
    let data = mem.data(&*caller);
    let r = range(ptr, len, data.len(), what)?;
    Ok(data[r].to_vec())
}

/// Finds a port by the name at `ptr..ptr+len` of the job's memory; its index in `which`.
fn port_index<T>(
    caller: &mut Caller<'_, VertexState>,
    which: fn(&VertexIo) -> &Ports<T>,
    ptr: i32,
    len: i32,
    what: &str,
) -> wasmtime::Result<Option<usize>> {
    let mem = memory(caller)?;
    let (data, state) = mem.data_and_store_mut(&mut *caller);
    let r = range(ptr, len, data.len(), what)?;
    Ok(which(&state.io).position(&data[r]))
}

fn read_str(
    caller: &mut Caller<'_, VertexState>,
    ptr: i32,
    len: i32,
    what: &str,
) -> wasmtime::Result<String> {
    let bytes = read(caller, ptr, len, what)?;
    String::from_utf8(bytes).map_err(|_| wasmtime::format_err!("{what}: the name is not UTF-8"))
}

/// Copies `bytes` to the job's buffer if they fit; returns the length either way.
fn give(
    caller: &mut Caller<'_, VertexState>,
    buf: i32,
    cap: i32,
    bytes: &[u8],
    what: &str,
) -> wasmtime::Result<i64> {
    let mem = memory(caller)?;
    let data = mem.data_mut(&mut *caller);
    let r = range(buf, cap, data.len(), what)?;
    if bytes.len() <= r.len() {
        data[r.start..r.start + bytes.len()].copy_from_slice(bytes);
    }
    Ok(i64::try_from(bytes.len()).unwrap_or(i64::MAX))
}

/// Delivers a received item to input `i`'s job buffer, keeping it when the buffer is too small.
fn deliver(
    caller: &mut Caller<'_, VertexState>,
    i: usize,
    item: Bytes,
    buf: i32,
    cap: i32,
) -> wasmtime::Result<i64> {
    if let Some(c) = caller.data_mut().counts.get_mut(i) {
        c.add(item.len());
    }
    let plain = match caller.data().io.inputs.at(i) {
        Some(port) if port.codec.has_transforms() => match port.codec.unwrap(&item) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(queue = %port.rx.queue_name(), error = %e, "an item did not decode; skipped");
                return Ok(BAD_ITEM);
            }
        },
        _ => item,
    };
    give_or_keep(caller, i, plain, buf, cap)
}

/// Copies a decoded item to the job's buffer, or keeps it at input `i` for the next receive
/// when the buffer is too small; its length either way.
fn give_or_keep(
    caller: &mut Caller<'_, VertexState>,
    i: usize,
    plain: Bytes,
    buf: i32,
    cap: i32,
) -> wasmtime::Result<i64> {
    let n = give(caller, buf, cap, &plain, "mvm.recv")?;
    if plain.len() > usize::try_from(cap).unwrap_or(0)
        && let Some(port) = caller.data().io.inputs.at(i)
    {
        *port.kept.lock() = Some(plain);
    }
    Ok(n)
}

/// What a receive found without waiting.
enum Found {
    /// An item kept back for a larger buffer (already decoded).
    Kept(Bytes),
    /// An item from the queue, or why there is none.
    Queue(Result<Bytes, RecvFailure>),
    /// Nothing yet: wait.
    Wait,
}

/// What a wait in a pausable vertex watches: the last pause it took part in (`None` for a
/// plain vertex). The part's pause control is reached through the vertex's ports
/// ([`VertexIo::pause`]), which a wait holds anyway: no shared count is touched per wait.
fn waiting_since<const PAUSABLE: bool>(state: &VertexState) -> Option<u64> {
    if !PAUSABLE {
        return None;
    }
    state.pausing.as_ref().map(|p| p.seen)
}

// `PAUSABLE`: the vertex's module was made checkpointable, and a receive or send is a pause
// point. Plain vertices get the `false` instances, with no pause path at all. The pause paths
// are boxed where they are awaited: they call into the instance, and their futures would
// otherwise make every `recv` and `send` future (boxed per call by the linker) larger.
async fn receive<const PAUSABLE: bool>(
    mut caller: Caller<'_, VertexState>,
    (pp, pl, buf, cap): (i32, i32, i32, i32),
    wait: bool,
) -> wasmtime::Result<i64> {
    // A pause point (`recv`; `try_recv` is not one): nothing is taken before this.
    if PAUSABLE
        && wait
        && checkpoint::at_pause_point(caller.data())
        && Box::pin(checkpoint::pause_point(&mut caller)).await?
    {
        return Ok(0);
    }
    let Some(i) = port_index(&mut caller, |io| &io.inputs, pp, pl, "mvm.recv port")? else {
        return Ok(NO_PORT);
    };
    // What can be had without waiting, looked up in place: the vertex's ports are shared (and
    // their reference count touched) only to wait.
    let found = {
        let state = caller.data();
        match state.io.inputs.at(i) {
            None => return Ok(NO_PORT),
            Some(port) => match port.kept.lock().take() {
                Some(item) => Found::Kept(item),
                // On the shared pool, no polling before parking: the waking sender's worker
                // runs this task next (tokio's LIFO slot), so a hand-off stays on one thread,
                // and a poll would block it. On a dedicated thread, nothing else waits for
                // this core; only items from local vertices are polled for.
                None if wait => {
                    let budget = if port.local { state.spin } else { 0 };
                    poll(port, budget).map_or(Found::Wait, |item| Found::Queue(Ok(item)))
                }
                None => Found::Queue(port.rx.try_recv().map_err(|e| e.failure)),
            },
        }
    };
    let got = match found {
        Found::Kept(item) => return give_or_keep(&mut caller, i, item, buf, cap),
        Found::Queue(got) => got,
        Found::Wait => {
            let io = caller.data().io.clone();
            let Some(port) = io.inputs.at(i) else {
                return Ok(NO_PORT);
            };
            match (waiting_since::<PAUSABLE>(caller.data()), io.pause.as_ref()) {
                // A pause asked for while waiting (the pause wakes the part's queues): the
                // wait is given up (nothing was taken), and the receive is made again once the
                // vertex is rewound.
                (Some(seen), Some(ctl)) => {
                    match port.rx.recv_async_unless(|| ctl.wanted(seen)).await {
                        Some(got) => got.map_err(|e| e.failure),
                        None => {
                            Box::pin(checkpoint::begin_unwind(&mut caller)).await?;
                            return Ok(0);
                        }
                    }
                }
                _ => port.rx.recv_async().await.map_err(|e| e.failure),
            }
        }
    };
    match got {
        Ok(item) => deliver(&mut caller, i, item, buf, cap),
        Err(RecvFailure::Closed) => Ok(END),
        Err(RecvFailure::Empty | RecvFailure::Timeout) => Ok(EMPTY),
    }
}

/// Polls `port` for up to `budget` ns; `None` if nothing came.
///
/// The budget is fixed, not adapted: a budget that shrinks after a poll that found nothing
/// locks two vertices into parking, because a parked partner's wake-up takes longer than the
/// shrunken poll.
fn poll(port: &InPort, budget: u32) -> Option<Bytes> {
    if budget == 0 {
        return None;
    }
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        match port.rx.poll() {
            Err(RecvFailure::Empty) => {}
            Ok(item) => return Some(item),
            // The end of the stream, as the waiting receive reports it.
            Err(_) => return None,
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(64) && start.elapsed().as_nanos() >= u128::from(budget) {
            return None;
        }
        std::hint::spin_loop();
    }
}

async fn send<const PAUSABLE: bool>(
    mut caller: Caller<'_, VertexState>,
    (pp, pl, dp, dl): (i32, i32, i32, i32),
) -> wasmtime::Result<i32> {
    if PAUSABLE
        && checkpoint::at_pause_point(caller.data())
        && Box::pin(checkpoint::pause_point(&mut caller)).await?
    {
        return Ok(0);
    }
    let Some(i) = port_index(&mut caller, |io| &io.outputs, pp, pl, "mvm.send port")? else {
        return Ok(-1);
    };
    // A send that paused part way goes on at the first channel that did not have the item.
    let first = match caller.data_mut().pausing.as_mut() {
        Some(p) if PAUSABLE => match p.sending.take() {
            Some((port, done)) if port == i => done,
            _ => 0,
        },
        _ => 0,
    };
    let plain = {
        let mem = memory(&mut caller)?;
        let data = mem.data(&caller);
        let r = range(dp, dl, data.len(), "mvm.send data")?;
        Bytes::copy_from_slice(&data[r])
    };
    let (channels, counted) = caller
        .data()
        .io
        .outputs
        .at(i)
        .map_or((0, 0), |p| (p.channels.len(), p.first));
    let mut plain = Some(plain);
    for c in first..channels {
        // One attempt in place; the vertex's ports are shared (and their reference count
        // touched) only to wait for room.
        let attempt = {
            let Some((tx, codec)) = caller
                .data()
                .io
                .outputs
                .at(i)
                .and_then(|p| p.channels.get(c))
            else {
                break;
            };
            let Some(p) = plain.as_ref() else { break };
            let item = if codec.has_transforms() {
                codec
                    .wrap(p.to_vec())
                    .map_err(|e| wasmtime::format_err!("mvm.send: {e}"))?
            } else if c + 1 == channels {
                // The last channel takes the bytes: a clone would allocate a shared header.
                plain.take().unwrap_or_default()
            } else {
                p.clone()
            };
            let len = item.len();
            (tx.attempt(item), len)
        };
        let (attempt, len) = attempt;
        let sent = match attempt {
            Ok(None) => Ok(()),
            Ok(Some(item)) => {
                let io = caller.data().io.clone();
                let pause = waiting_since::<PAUSABLE>(caller.data()).zip(io.pause.as_ref());
                match (io.outputs.at(i).and_then(|p| p.channels.get(c)), pause) {
                    (Some((tx, _)), None) => tx.send_async(item).await.map_err(|e| e.failure),
                    // A pause asked for while waiting for room: this channel did not take the
                    // item; the send goes on from it once the vertex is rewound.
                    (Some((tx, _)), Some((seen, ctl))) => {
                        match tx.send_async_unless(item, || ctl.wanted(seen)).await {
                            Ok(None) => Ok(()),
                            Ok(Some(_)) => {
                                if let Some(p) = caller.data_mut().pausing.as_mut() {
                                    p.sending = Some((i, c));
                                }
                                Box::pin(checkpoint::begin_unwind(&mut caller)).await?;
                                return Ok(0);
                            }
                            Err(e) => Err(e.failure),
                        }
                    }
                    (None, _) => Ok(()),
                }
            }
            Err(e) => Err(e.failure),
        };
        if let Err(f) = sent {
            return Ok(match f {
                SendFailure::NoReceivers | SendFailure::Closed => -2,
                SendFailure::TooLarge { .. } => -3,
                SendFailure::Full | SendFailure::Timeout => -5,
            });
        }
        if let Some(count) = caller.data_mut().counts.get_mut(counted + c) {
            count.add(len);
        }
    }
    Ok(0)
}

/// Adds the `mvm` module and WASI preview 1 to a linker: for checkpointable modules when
/// `pausable` (their `recv`, `send` and `yield` are pause points), for plain ones otherwise.
pub(crate) fn add_to_linker(
    linker: &mut Linker<VertexState>,
    pausable: bool,
) -> wasmtime::Result<()> {
    wasmtime_wasi::p1::add_to_linker_async(linker, |s: &mut VertexState| {
        let (stdout, io) = (&s.stdout, &s.io);
        s.wasi.get_or_insert_with(|| {
            let mut b = wasmtime_wasi::WasiCtxBuilder::new();
            match &io.log {
                Some(log) => {
                    let tee = |pipe, stream| super::logs::Tee {
                        pipe,
                        log: log.clone(),
                        stream,
                    };
                    b.stdout(tee(Some(stdout.clone()), LogStream::Stdout))
                        .stderr(tee(None, LogStream::Stderr));
                }
                None => {
                    b.stdout(stdout.clone()).inherit_stderr();
                }
            }
            if let Some(dir) = &io.sandbox
                && let Err(e) = b.preopened_dir(dir, ".", wasmtime_wasi::FsPerms::ReadWrite)
            {
                // Its files are then unreachable, which the vertex sees as a failed open.
                tracing::warn!(vertex = %io.vertex, dir = %dir.display(), error = %e, "cannot open the sandbox");
            }
            b.args(&[io.vertex.as_str()]).build_p1()
        })
    })?;
    if pausable {
        linker.func_wrap_async("mvm", "send", |caller, args: (i32, i32, i32, i32)| {
            Box::new(send::<true>(caller, args))
        })?;
        linker.func_wrap_async("mvm", "recv", |caller, args: (i32, i32, i32, i32)| {
            Box::new(receive::<true>(caller, args, true))
        })?;
    } else {
        linker.func_wrap_async("mvm", "send", |caller, args: (i32, i32, i32, i32)| {
            Box::new(send::<false>(caller, args))
        })?;
        linker.func_wrap_async("mvm", "recv", |caller, args: (i32, i32, i32, i32)| {
            Box::new(receive::<false>(caller, args, true))
        })?;
    }
    // A pause point for compute loops; otherwise nothing (the epoch tick already yields).
    linker.func_wrap_async(
        "mvm",
        "yield",
        |mut caller: Caller<'_, VertexState>, (): ()| {
            Box::new(async move {
                if checkpoint::at_pause_point(caller.data()) {
                    Box::pin(checkpoint::pause_point(&mut caller)).await?;
                }
                Ok(())
            })
        },
    )?;
    linker.func_wrap_async("mvm", "try_recv", |caller, args: (i32, i32, i32, i32)| {
        Box::new(receive::<false>(caller, args, false))
    })?;
    linker.func_wrap(
        "mvm",
        "ports",
        |mut caller: Caller<'_, VertexState>, buf: i32, cap: i32| {
            let list = caller.data().io.port_list();
            give(&mut caller, buf, cap, list.as_bytes(), "mvm.ports")
                .map(|n| i32::try_from(n).unwrap_or(i32::MAX))
        },
    )?;
    linker.func_wrap(
        "mvm",
        "param",
        |mut caller: Caller<'_, VertexState>,
         np: i32,
         nl: i32,
         buf: i32,
         cap: i32|
         -> wasmtime::Result<i32> {
            let name = read_str(&mut caller, np, nl, "mvm.param name")?;
            let io = caller.data().io.clone();
            match io.param(&name) {
                None => Ok(-1),
                Some(v) => give(&mut caller, buf, cap, v.as_bytes(), "mvm.param")
                    .map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
            }
        },
    )?;
    linker.func_wrap(
        "mvm",
        "log",
        |mut caller: Caller<'_, VertexState>, level: i32, p: i32, l: i32| -> wasmtime::Result<()> {
            let msg = read(&mut caller, p, l, "mvm.log")?;
            let msg = String::from_utf8_lossy(&msg);
            let io = caller.data().io.clone();
            let vertex = &io.vertex;
            let name = match level {
                0 => "error",
                1 => "warn",
                2 => "info",
                _ => "debug",
            };
            match level {
                0 => tracing::error!(%vertex, "{msg}"),
                1 => tracing::warn!(%vertex, "{msg}"),
                2 => tracing::info!(%vertex, "{msg}"),
                _ => tracing::debug!(%vertex, "{msg}"),
            }
            if let Some(log) = &io.log {
                log.book
                    .line(log.slot, LogStream::Log, format!("{name}: {msg}"));
            }
            Ok(())
        },
    )?;
    Ok(())
}
