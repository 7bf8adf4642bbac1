//! A worker's process (or its guest's agent) seen from the node: how it ended, and the feed
//! of its inputs.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use mvm_queue::queue::Receiver;
use tokio::sync::{Semaphore, mpsc};

use super::{FeedCmd, Proc};
use crate::environment::GuestRef;
use crate::proto::{ErrorKind, VertexFailure};
use crate::worker::{BATCH, ToWorker};

impl Proc {
    /// The failure of a worker whose exchange broke off (`read`) before its end: how its
    /// process ended, or, through an agent, whether its guest is still there.
    pub(super) async fn died(
        &mut self,
        pid: u32,
        guest: &GuestRef,
        oom_before: Option<u64>,
        read: &io::Error,
    ) -> VertexFailure {
        match self {
            Proc::Child(child) => {
                let status = child.wait().await;
                let oom = matches!((oom_before, guest.oom_kills()), (Some(a), Some(b)) if b > a);
                died(pid, guest.name(), status, oom, read)
            }
            Proc::Agent(addr) => {
                let g = guest.clone();
                let state = tokio::task::spawn_blocking(move || g.state())
                    .await
                    .ok()
                    .flatten();
                match state {
                    Some(s) if s.is_alive() || s == mvm_os::State::Paused => VertexFailure {
                        vertex: String::new(),
                        cause: format!(
                            "the part's worker (pid {pid}) in guest {}, through its agent at {addr}, broke off without its report ({read})",
                            guest.name()
                        ),
                        kind: ErrorKind::Other,
                    },
                    // The guest went: as the liveness monitor says it.
                    gone => VertexFailure {
                        vertex: String::new(),
                        cause: format!(
                            "its guest {} died behind the node's back: {}",
                            guest.name(),
                            gone.map_or_else(
                                || "it vanished".to_owned(),
                                |s| format!("it was {s:?}")
                            )
                        ),
                        kind: ErrorKind::Lost,
                    },
                }
            }
        }
    }
}

/// Feeds remote input `link`'s items from the node's queue `r` to the worker, as its credit
/// allows, until the link ends; stops and goes on as `ctl` says.
pub(super) async fn feed(
    link: u32,
    r: Receiver<Bytes>,
    mut ctl: mpsc::Receiver<FeedCmd>,
    credit: Arc<Semaphore>,
    tx: mpsc::Sender<ToWorker>,
) {
    let mut pending: VecDeque<Bytes> = VecDeque::new();
    let (mut frozen, mut ended) = (false, false);
    let on = |c: Option<FeedCmd>, pending: &mut VecDeque<Bytes>, frozen: &mut bool| match c {
        Some(FeedCmd::Freeze(ack)) => {
            while let Ok(i) = r.try_recv() {
                pending.push_back(i);
            }
            let _ = ack.send(pending.iter().cloned().collect());
            *frozen = true;
            true
        }
        Some(FeedCmd::Thaw) => {
            *frozen = false;
            true
        }
        None => false,
    };
    loop {
        if frozen {
            if !on(ctl.recv().await, &mut pending, &mut frozen) {
                return;
            }
            continue;
        }
        if pending.is_empty() {
            if ended {
                let _ = tx.send(ToWorker::Closed { link }).await;
                return;
            }
            tokio::select! {
                biased;
                c = ctl.recv() => if !on(c, &mut pending, &mut frozen) { return },
                i = r.recv_async() => match i {
                    Ok(i) => {
                        pending.push_back(i);
                        while pending.len() < BATCH {
                            match r.try_recv() {
                                Ok(i) => pending.push_back(i),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(_) => ended = true,
                },
            }
            continue;
        }
        let n = pending.len().min(BATCH);
        tokio::select! {
            biased;
            c = ctl.recv() => if !on(c, &mut pending, &mut frozen) { return },
            p = credit.acquire_many(u32::try_from(n).unwrap_or(u32::MAX)) => {
                let Ok(p) = p else { return };
                p.forget();
                let items = pending.drain(..n).collect();
                if tx.send(ToWorker::Items { link, items }).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The failure of a worker that ended without its end.
pub(in crate::worker) fn died(
    pid: u32,
    guest: &str,
    status: io::Result<std::process::ExitStatus>,
    oom: bool,
    read: &io::Error,
) -> VertexFailure {
    use std::os::unix::process::ExitStatusExt;

    let who = format!("the part's worker (pid {pid}) in guest {guest}");
    let how = match &status {
        Ok(s) => match (s.code(), s.signal()) {
            (_, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
            (Some(c), None) => format!("exited with status {c} without its report"),
            (None, None) => format!("ended ({s}) without its report"),
        },
        Err(e) => format!("cannot be waited for ({e})"),
    };
    if oom {
        return VertexFailure {
            vertex: String::new(),
            cause: format!(
                "{who} {how}: its guest's memory limit was reached, and the kernel killed it"
            ),
            kind: ErrorKind::Memory,
        };
    }
    VertexFailure {
        vertex: String::new(),
        cause: format!("{who} {how} (reading its report: {read})"),
        kind: ErrorKind::Other,
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "a signal",
    }
}
