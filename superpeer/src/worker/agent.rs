//! The MVM agent of a guest that is a domain of its own (Xen): a process its image starts at
//! boot (`mvm agent`), listening on the guest's address on its node's guest network. The node
//! proxies for it (OpenCCS's host agent and guest agent): the agent has no certificate and
//! never speaks to the overlay; the node reaches it over the bridge that only the node's
//! guests share, and a key the node made for this guest alone, given on the guest's kernel
//! command line, proves a connection comes from its node.
//!
//! A connection begins with the node's [`AgentHello`] and the agent's [`AgentReply`] (each a
//! frame as the worker's). When the hello asks for a worker, the agent starts one (`mvm
//! worker`) with the connection as its standard input and output: from there on the node and
//! the worker speak the worker protocol of [`super`] across the guest network, the part's
//! links' items with it. When the hello only asks whether the agent is there (a guest
//! booting), the agent answers and closes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{WorkerCommand, frame, read_body};

/// The port agents listen on.
pub const AGENT_PORT: u16 = 7047;

/// The largest hello or reply.
const MAX_HELLO: usize = 4096;

/// How long an agent waits for a connection's hello.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// The first message on a connection to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentHello {
    /// The guest's key (from its kernel command line).
    pub key: String,
    /// Start a worker on this connection (else: only say the agent is there).
    pub worker: bool,
}

/// The agent's answer to a hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AgentReply {
    /// The agent is there; with the process id of the worker it started, when it started one.
    Ready {
        /// The worker's process id in the guest.
        worker: Option<u32>,
    },
    /// Refused: why.
    Refused(String),
}

/// An agent as its node reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAddr {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The guest's key.
    pub key: String,
}

/// Serves connections on `listener` until it fails: each hello with `key` gets a worker
/// started by `worker` (or, for a probe, an answer). Every start and end of a worker is
/// written to standard error (the guest's console), as `MVM_AGENT worker pid=N …`.
///
/// # Errors
/// The listener fails.
pub fn serve_agent(listener: TcpListener, key: &str, worker: &WorkerCommand) -> io::Result<()> {
    eprintln!("MVM_AGENT listening on {}", listener.local_addr()?);
    loop {
        let (conn, from) = listener.accept()?;
        let (key, worker) = (key.to_owned(), worker.clone());
        std::thread::spawn(move || {
            if let Err(e) = connection(conn, &key, &worker) {
                eprintln!("MVM_AGENT connection from {from}: {e}");
            }
        });
    }
}

/// One connection: its hello, then a worker on it or the answer to a probe.
fn connection(mut conn: TcpStream, key: &str, worker: &WorkerCommand) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(HELLO_WAIT))?;
    let hello: AgentHello = crate::proto::decode(&read_body(&mut conn, MAX_HELLO)?)?;
    if !same(hello.key.as_bytes(), key.as_bytes()) {
        let refused = AgentReply::Refused("not this guest's key".into());
        conn.write_all(&frame(&refused, MAX_HELLO)?)?;
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a hello without this guest's key",
        ));
    }
    if !hello.worker {
        return conn.write_all(&frame(&AgentReply::Ready { worker: None }, MAX_HELLO)?);
    }
    conn.set_read_timeout(None)?;
    let fd = OwnedFd::from(conn.try_clone()?);
    let spawned = std::process::Command::new(&worker.program)
        .args(&worker.args)
        .stdin(Stdio::from(fd.try_clone()?))
        .stdout(Stdio::from(fd))
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let why = format!("cannot start a worker ({}): {e}", worker.program.display());
            conn.write_all(&frame(&AgentReply::Refused(why.clone()), MAX_HELLO)?)?;
            return Err(io::Error::other(why));
        }
    };
    // The worker reads its job first: this answer is on the connection before anything of it.
    let pid = child.id();
    eprintln!("MVM_AGENT worker pid={pid} started");
    conn.write_all(&frame(&AgentReply::Ready { worker: Some(pid) }, MAX_HELLO)?)?;
    drop(conn);
    let status = child.wait()?;
    eprintln!("MVM_AGENT worker pid={pid} ended: {status}");
    Ok(())
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// A new guest key: 128 random bits, in hex.
///
/// # Errors
/// The system's random source cannot be read.
pub fn new_key() -> io::Result<String> {
    let mut k = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
    Ok(hex::encode(k))
}

/// Says hello to the agent at `agent` and reads its answer (`worker`: asking for a worker on
/// this connection): the connection, and the worker's process id.
///
/// # Errors
/// It cannot be reached, refuses, or answers something else.
pub async fn hello(
    agent: &AgentAddr,
    worker: bool,
) -> io::Result<(tokio::net::TcpStream, Option<u32>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(agent.addr).await?;
        conn.set_nodelay(true)?;
        let hello = AgentHello {
            key: agent.key.clone(),
            worker,
        };
        conn.write_all(&frame(&hello, MAX_HELLO)?).await?;
        let mut len = [0u8; 4];
        conn.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_HELLO {
            return Err(super::too_long(len, MAX_HELLO));
        }
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).await?;
        Ok::<_, io::Error>((conn, body))
    };
    let (conn, body) = tokio::time::timeout(HELLO_WAIT, exchange)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from the agent within {HELLO_WAIT:?}"),
            )
        })??;
    match crate::proto::decode::<AgentReply>(&body)? {
        AgentReply::Ready { worker } => Ok((conn, worker)),
        AgentReply::Refused(why) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the agent refused: {why}"),
        )),
    }
}

/// Waits until the agent at `agent` answers (its guest has booted), trying every 200 ms for
/// `within` at most.
///
/// # Errors
/// It has not answered by then: the last error.
pub async fn ready(agent: &AgentAddr, within: Duration) -> io::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let e = match hello(agent, false).await {
            Ok(_) => return Ok(()),
            // A refusal will not change.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(e),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "the agent at {} did not answer within {within:?}: {e}",
                    agent.addr
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
