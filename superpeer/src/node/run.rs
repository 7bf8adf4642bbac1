//! The node's loop, and running a prepared part: its outgoing channels, its vertices, its
//! report to the group's leader, and its end.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use libp2p::PeerId;
use mvm_queue::queue::Receiver;
use mvm_queue::remote::{self, Hold, Options as RemoteOptions, direct};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::parts::{Body, Effect, Input, InputKey, Launch, Relink, Relinked};
use super::streams::{Channel, open_channel, run_link};
use super::{ChannelError, LinkDone, LinkProblem, LinkResult, Msg, Node};
use crate::proto::{
    FailureKind, JobId, NodeRequest, PART_HOLD, PartReport, Request, Response, StreamHeader,
};

impl Node {
    /// Runs the node's parts until the task is aborted: the one owner of its [`Parts`], and
    /// the one place that carries out their effects. Runs once: a second call returns at once.
    pub(crate) async fn run(self: Arc<Self>) {
        let Some((mut parts, mut inputs)) = self.parked.lock().take() else {
            tracing::error!("the node's loop is already running");
            return;
        };
        let mut tasks: JoinSet<Option<Input>> = JoinSet::new();
        let mut ship = tokio::time::interval(super::logs::SHIP);
        ship.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let input = tokio::select! {
                _ = ship.tick() => {
                    let node = self.clone();
                    tasks.spawn(async move {
                        node.ship_logs().await;
                        None
                    });
                    continue;
                }
                msg = inputs.recv() => match msg {
                    Some(Msg::Input(input)) => input,
                    Some(Msg::Attach(job, key, task)) => Input::Attach {
                        job,
                        tasks: Vec::new(),
                        links: vec![(key, false, task)],
                    },
                    None => return,
                },
                Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                    Ok(Some(input)) => input,
                    _ => continue,
                },
            };
            let mut effects = parts.on(input);
            while !effects.is_empty() {
                let mut next = Vec::new();
                for effect in effects {
                    next.extend(self.carry_out(&mut tasks, effect));
                }
                effects = next.into_iter().flat_map(|i| parts.on(i)).collect();
            }
        }
    }

    /// Carries out one effect of the parts; what comes of it is an input on `tasks`, or (the
    /// handles of a part's tasks) an input at once.
    fn carry_out(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Option<Input>>,
        effect: Effect,
    ) -> Option<Input> {
        match effect {
            Effect::Reply(reply, response) => {
                let _ = reply.send(response); // the asker may have gone
            }
            Effect::Prepare { from, spec } => {
                let node = self.clone();
                tasks.spawn(async move {
                    let ready = node.prepare_part(from, &spec).await;
                    Some(Input::Prepared {
                        job: spec.job,
                        attempt: spec.attempt,
                        ready,
                    })
                });
            }
            Effect::Run {
                job,
                attempt,
                launch,
            } => {
                let (handles, links) = self.launch(tasks, job.clone(), attempt, *launch);
                return Some(Input::Attach {
                    job,
                    tasks: handles,
                    links,
                });
            }
            Effect::Hold { job, attempt } => {
                tasks.spawn(async move {
                    tokio::time::sleep(PART_HOLD).await;
                    Some(Input::HoldOver { job, attempt })
                });
            }
            Effect::Stop {
                job,
                attempt,
                reason,
                tasks: of_part,
            } => {
                for t in of_part {
                    t.abort();
                }
                let left = self.queues.destroy_job(&super::space(&job, attempt));
                tracing::debug!(%job, attempt, %reason, queues = left.len(), "part removed");
                // What a part stopped before its report still held.
                let lines = self.logs.last(&job, attempt);
                if !lines.is_empty() {
                    let node = self.clone();
                    tasks.spawn(async move {
                        node.ship(job, attempt, lines).await;
                        None
                    });
                }
            }
            Effect::Abort(tasks) => {
                for t in tasks {
                    t.abort();
                }
            }
            Effect::Epilog {
                job,
                attempt,
                broker,
                sandbox,
                files,
            } => {
                let node = self.clone();
                tasks.spawn(async move {
                    if let Some(problem) =
                        node.epilog(&job, attempt, broker, &sandbox, &files).await
                    {
                        tracing::warn!(%job, attempt, %problem, "the output files of a stopped part");
                    }
                    None
                });
            }
            Effect::Checkpoint {
                marks,
                save,
                cut,
                hold,
                reply,
                release,
            } => {
                let node = self.clone();
                tasks.spawn(async move {
                    let taken = match super::checkpoint::take(&marks, cut, save.as_ref()).await {
                        Ok(t) => node.send_saved(t, save.as_ref(), cut).await,
                        Err(f) => Err(f),
                    };
                    match taken {
                        Ok(answer) => {
                            let _ = reply.send(answer);
                            // The sending ends go on once every part of the cut is saved (or
                            // after a while); not if the part went, or a move let them go.
                            if !matches!(tokio::time::timeout(hold, release).await, Ok(Err(_))) {
                                super::checkpoint::let_go(&marks);
                            }
                        }
                        Err(f) => {
                            super::checkpoint::let_go(&marks);
                            let _ = reply.send(Response::Error(f));
                        }
                    }
                    None
                });
            }
            Effect::Leave {
                job,
                attempt,
                marks,
                save,
                cut,
                reply,
            } => {
                let node = self.clone();
                tasks.spawn(async move {
                    let left = super::checkpoint::leave(&marks, cut, save.as_ref()).await;
                    let (r, pause) = match left {
                        Ok((t, pause)) => match node.send_saved(t, save.as_ref(), cut).await {
                            Ok(answer) => (answer, Some(pause)),
                            // Given up: the broker resumes the part where it is.
                            Err(f) => (Response::Error(f), Some(pause)),
                        },
                        Err(f) => (Response::Error(f), None),
                    };
                    let _ = reply.send(r);
                    Some(Input::Left {
                        job,
                        attempt,
                        pause,
                    })
                });
            }
            Effect::HoldLinks {
                holds,
                drains,
                cut,
                reply,
            } => {
                tasks.spawn(async move {
                    let r = match super::checkpoint::hold_links(&holds, &drains, cut).await {
                        Ok(()) => Response::Ok,
                        Err(f) => Response::Error(f),
                    };
                    let _ = reply.send(r);
                    None
                });
            }
            Effect::Release { holds, drains } => {
                for h in holds {
                    h.release();
                }
                for d in drains {
                    d.release();
                }
            }
            Effect::Relink(r) => return Some(self.relink(tasks, *r)),
            Effect::MoveWait { job, attempt, wait } => {
                tasks.spawn(async move {
                    tokio::time::sleep(wait).await;
                    Some(Input::MoveOver { job, attempt })
                });
            }
            Effect::Report { broker, report } => {
                let node = self.clone();
                tasks.spawn(async move {
                    node.report_to_leader(broker, *report).await;
                    None
                });
            }
        }
        None
    }

    /// Sends the files a checkpoint `cut` saved to the super-peer that asked for it, then
    /// gives the answer that names them.
    async fn send_saved(
        &self,
        taken: super::checkpoint::Taken,
        save: Option<&super::part::Save>,
        cut: u64,
    ) -> Result<Response, crate::proto::Failure> {
        let (hash, blob, files) = taken;
        if let (Some(files), Some(save), Some(store)) = (&files, save, &self.config.files) {
            let to = save.to;
            // Inputs unchanged since they were laid out are in the node's store.
            let saved = &save.sandbox.saved;
            let path_of = |h: &crate::proto::Hash| {
                if saved.has(h) {
                    saved.path(h)
                } else {
                    store.path(h)
                }
            };
            crate::files::send_all(&self.site.net, to, files, path_of)
                .await
                .map_err(|f| {
                    crate::proto::Failure::new(f.kind, format!("checkpoint {cut}: {}", f.message))
                })?;
        }
        Ok(Response::Checkpoint { hash, blob, files })
    }

    /// Starts a part: its outgoing channels, and its vertices under a supervisor whose end is
    /// the part's report. The handles of its tasks, and of its outgoing channels by end.
    fn launch(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Option<Input>>,
        job: JobId,
        attempt: u32,
        mut launch: Launch,
    ) -> (Vec<AbortHandle>, Vec<(InputKey, bool, AbortHandle)>) {
        let mut links = Vec::new();
        let outputs = match &mut launch.prepared {
            Body::Here(p) => std::mem::take(&mut p.remote_outputs),
            Body::Worker(w) => std::mem::take(&mut w.remote_outputs),
        };
        for (i, out) in outputs.into_iter().enumerate() {
            let (peer, addrs) = launch.parts[out.to].clone();
            let key = (out.vertex.clone(), out.port.clone(), peer);
            let outlet = Outlet {
                vertex: out.vertex,
                port: out.port,
                receiver: out.receiver,
                peer,
                addrs,
                hold: launch.holds.get(i).cloned().unwrap_or_default(),
                direct: self.links.is_some(),
            };
            let task = self.spawn_outlet(tasks, &job, attempt, outlet, launch.links.clone());
            links.push((key, true, task));
        }
        let node = self.clone();
        let Launch {
            prepared,
            links_rx,
            expected,
            guest,
            sandbox,
            files,
            broker,
            ..
        } = launch;
        self.logs.put(job.clone(), attempt, prepared.logs());
        let supervisor = tasks.spawn(async move {
            let space = super::space(&job, attempt);
            let mut outcome = node
                .supervise(&space, prepared, links_rx, &expected, guest)
                .await;
            // The epilog, also for a part that failed: what its vertices wrote is kept.
            if let (Some(sandbox), Some(files)) = (sandbox, &files)
                && let Some(problem) = node.epilog(&job, attempt, broker, &sandbox, files).await
                && outcome.is_ok()
            {
                outcome = Err(crate::proto::VertexFailure {
                    vertex: String::new(),
                    cause: problem,
                    kind: crate::proto::ErrorKind::Files,
                });
            }
            let logs = node.logs.last(&job, attempt);
            Some(Input::Ended {
                report: PartReport {
                    job,
                    attempt,
                    outcome,
                    logs,
                },
            })
        });
        (vec![supervisor], links)
    }

    /// Starts the link of one remote output of run `attempt` of `job`; it reports its end on
    /// `links`.
    fn spawn_outlet(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Option<Input>>,
        job: &JobId,
        attempt: u32,
        outlet: Outlet,
        links: mpsc::Sender<LinkResult>,
    ) -> AbortHandle {
        let Outlet {
            vertex,
            port,
            receiver,
            peer,
            addrs,
            hold,
            direct,
        } = outlet;
        let mut control = self.site.net.streams();
        let net = self.site.net.clone();
        let header = StreamHeader {
            job: job.clone(),
            vertex: vertex.clone(),
            port: port.clone(),
            direct,
            plain: direct && self.links.as_ref().is_some_and(|l| l.plain()),
            attempt,
        };
        tasks.spawn(async move {
            let r: Result<(bool, bool, remote::Report), LinkProblem> = async {
                // Streams from a peer whose certificate has not passed are dropped: exchange
                // certificates first (this also makes the addresses known to the swarm).
                net.authenticate(peer, &addrs)
                    .await
                    .map_err(LinkProblem::Authenticate)?;
                let channel = open_channel(&mut control, peer, &header).await?;
                let (direct, sealed) = match &channel {
                    Channel::Direct { plain, .. } => (true, !plain),
                    Channel::Stream(_) => (false, false),
                };
                let rep = match channel {
                    Channel::Stream(s) => remote::export_stream_with(
                        &receiver,
                        s.compat(),
                        &RemoteOptions::default(),
                        &hold,
                    )
                    .await
                    .map_err(|e| LinkProblem::Transfer(e.to_string()))?,
                    Channel::Direct {
                        port,
                        secret,
                        plain,
                    } => {
                        let sock = crate::links::connect(&addrs, port, &secret)
                            .await
                            .map_err(|e| LinkProblem::Transfer(e.to_string()))?;
                        let wire = super::streams::wire(&secret, plain);
                        run_link(|done| direct::outlet_with(receiver, sock, wire, &hold, done))
                            .await?
                    }
                };
                Ok((direct, sealed, rep))
            }
            .await;
            let r: LinkResult = match r {
                Ok((direct, sealed, rep)) => Ok(LinkDone {
                    vertex,
                    port,
                    out: true,
                    direct,
                    sealed,
                    items: rep.items,
                    bytes: rep.bytes,
                }),
                Err(problem) => Err(ChannelError {
                    vertex,
                    port,
                    peer,
                    out: true,
                    problem,
                }),
            };
            let _ = links.try_send(r);
            None
        })
    }

    /// Moves a part's links held for a move to the part's new node: each old link stops (a
    /// new queue handle is taken first, so that its queue does not end), outputs are linked
    /// anew from their outboxes over a stream, and inputs wait for a stream from the new node
    /// (given, first, what the old link delivered past its queue's room). A link that had
    /// ended is linked again too (its end crosses the new link), and the part's supervisor
    /// waits for one more.
    fn relink(self: &Arc<Self>, tasks: &mut JoinSet<Option<Input>>, r: Relink) -> Input {
        let Relink {
            job,
            attempt,
            outs,
            ins,
            to,
            addrs,
            links,
            expected,
            reply,
        } = r;
        let space = super::space(&job, attempt);
        let stop = |old: Option<AbortHandle>| {
            if let Some(t) = old {
                if t.is_finished() {
                    expected.fetch_add(1, Ordering::AcqRel);
                }
                t.abort();
            }
        };
        let mut new_ins = Vec::new();
        let mut from = to;
        for ((vertex, port, peer), old, drain, unopened) in ins {
            from = peer;
            let Some(h) = self.queues.get(&space, &format!("{vertex}:{port}")) else {
                continue;
            };
            let sender = h.queue.sender();
            stop(old);
            drop(unopened);
            new_ins.push(((vertex, port, to), sender, drain.held()));
        }
        let mut new_outs = Vec::new();
        for ((vertex, port, peer), old) in outs {
            from = peer;
            let Some(h) = self.queues.get(&space, &format!("{vertex}:{port}>out")) else {
                continue;
            };
            let receiver = h.queue.receiver();
            stop(old);
            let hold = Hold::new();
            let outlet = Outlet {
                vertex: vertex.clone(),
                port: port.clone(),
                receiver,
                peer: to,
                addrs: addrs.clone(),
                hold: hold.clone(),
                // The queue may have had a direct link, and takes one for its life.
                direct: false,
            };
            let task = self.spawn_outlet(tasks, &job, attempt, outlet, links.clone());
            new_outs.push(((vertex, port, to), hold, task));
        }
        Input::Relinked(Box::new(Relinked {
            job,
            attempt,
            from,
            ins: new_ins,
            outs: new_outs,
            reply,
        }))
    }

    /// Ends every part held (the daemon is shutting down; the loop, and with it every task of
    /// every part, has ended).
    pub(crate) fn terminate_all(&self) {
        for space in self.held.spaces() {
            self.queues.destroy_job(&space);
        }
    }

    /// Sends a part's report to the group's broker: the super-peer this node follows now, which is
    /// `placed_by` unless the group's leader has changed. A report not taken (the super-peer is
    /// lost, or no longer leads) is sent again to whichever this node follows next, for a while.
    /// The epilog of a part of run `attempt` of `job`: the output files its vertices left,
    /// sent to the group's leader and recorded with the job. What went wrong, if anything.
    async fn epilog(
        self: &Arc<Self>,
        job: &JobId,
        attempt: u32,
        placed_by: PeerId,
        sandbox: &crate::files::Sandbox,
        files: &crate::proto::FileSpec,
    ) -> Option<String> {
        let store = self.config.files.as_ref()?;
        let to = self
            .superpeer
            .read()
            .as_ref()
            .map_or(placed_by, |(p, _)| *p);
        let (outputs, mut problem) =
            crate::files::take_outputs(&self.site.net, to, store, sandbox, files).await;
        if !outputs.is_empty() {
            let count = outputs.len();
            let request = Request::Node(NodeRequest::Outputs {
                job: job.clone(),
                attempt,
                files: outputs,
            });
            match self.site.call(to, &[], request).await {
                Ok(_) => tracing::debug!(%job, attempt, count, "output files recorded"),
                Err(f) => {
                    let why = format!("output files not recorded: {}", f.message);
                    problem = Some(problem.map_or(why.clone(), |p| format!("{p}; {why}")));
                }
            }
        }
        problem
    }

    async fn report_to_leader(self: &Arc<Self>, placed_by: PeerId, report: PartReport) {
        let job = report.job.clone();
        let request = Request::Node(NodeRequest::Report(Box::new(report)));
        let give_up = tokio::time::Instant::now() + self.site.lost_after * 10;
        loop {
            let to = self
                .superpeer
                .read()
                .as_ref()
                .map_or(placed_by, |(p, _)| *p);
            match self.site.call(to, &[], request.clone()).await {
                Ok(_) => return,
                Err(f) if f.kind != FailureKind::Unavailable && to == placed_by => {
                    tracing::warn!(%job, error = %f, "the broker refused the report");
                    return;
                }
                Err(f) if tokio::time::Instant::now() >= give_up => {
                    tracing::warn!(%job, error = %f, "cannot report to the broker");
                    return;
                }
                Err(f) => {
                    tracing::debug!(%job, error = %f, "report not taken; sending it again");
                    tokio::time::sleep(self.site.heartbeat).await;
                }
            }
        }
    }
}

/// One remote output to link: the remote vertex and port it feeds, its outbox, the node that
/// runs them and where it listens, its hold, and whether a direct link is wanted.
struct Outlet {
    vertex: String,
    port: String,
    receiver: Receiver<Bytes>,
    peer: PeerId,
    addrs: Vec<libp2p::Multiaddr>,
    hold: Hold,
    direct: bool,
}
