//! The broker's event loop: the one owner of its machine ([`Core`]), and the one place that
//! carries out its effects and spawns its tasks. Inputs come from requests (through the
//! broker's channel), from the tick, from the gossip of other groups' summaries, and from the
//! loop's own tasks (nodes' answers, log outcomes). Its tasks end with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use libp2p::{Multiaddr, PeerId};
use parking_lot::Mutex;
use tokio::task::JoinSet;

use super::Broker;
use super::core::{Core, Effect, Input};
use crate::net::{GROUPS_TOPIC, Gossip};
use crate::proto::{GroupSummary, Request};

/// How long before a revocation list asked for of another group's super-peer is asked for
/// again, when it did not come or was refused.
const CRL_AGAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a replica that comes to lead waits for its log to be applied before it looks at
/// its jobs against the revocation lists it holds.
const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// Every how many ticks the files no job refers to are looked for.
const FILES_EVERY: u64 = 120;

impl Broker {
    /// Runs the broker until the task is aborted: ticks every heartbeat; every second one, the
    /// leader publishes its group's summary and dials `peers` (other groups' super-peers,
    /// `/…/p2p/PEER`), and every summary heard from them is taken. Runs once: a second call
    /// returns at once.
    pub(crate) async fn run(self: Arc<Self>, peers: Vec<String>) {
        let Some((mut core, mut inputs)) = self.parked.lock().take() else {
            tracing::error!("the broker's loop is already running");
            return;
        };
        let peers: Vec<(PeerId, Multiaddr)> = peers
            .iter()
            .filter_map(|p| match crate::net::split_peer(p) {
                Ok(x) => Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a super-peer address");
                    None
                }
            })
            .collect();
        let mut gossip = self.site.net.take_gossip();
        // The revocation list last asked for of each domain, and when.
        let asked = Mutex::new(BTreeMap::new());
        let mut tick = tokio::time::interval(self.site.heartbeat);
        let mut round = 0u64;
        // Whether this replica led at the last tick: one that comes to lead looks at the jobs
        // in the log against the revocation lists it took while it followed.
        let mut led = false;
        let mut tasks: JoinSet<Option<Input>> = JoinSet::new();
        // Jobs' files, put and got on streams of their own (ended with the loop).
        let access = super::files::FileAccess::new(
            self.site.clone(),
            self.log.clone(),
            self.files.clone(),
            self.files_quota,
            self.view.clone(),
        );
        let (net, store) = (self.site.net.clone(), self.files.clone());
        tasks.spawn(async move {
            crate::files::serve(net, store, Arc::new(access)).await;
            None
        });
        loop {
            let input = tokio::select! {
                Some(input) = inputs.recv() => input,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                    Ok(Some(input)) => input,
                    _ => continue,
                },
                _ = tick.tick() => {
                    round += 1;
                    let leads = self.log.is_leader();
                    if leads && !led {
                        // Once what its log holds is applied (what the last leader committed
                        // included), or after a while.
                        let me = self.clone();
                        tasks.spawn(async move {
                            let last = me.log.last_index();
                            if me.log.applied() < last {
                                let wait = me.log.changed(last.saturating_sub(1));
                                let _ = tokio::time::timeout(CATCH_UP, wait).await;
                            }
                            me.revoked(&me.site.net.trust().crls()).await;
                            None
                        });
                    }
                    led = leads;
                    if round.is_multiple_of(2) && leads {
                        self.publish(&mut tasks, &core, &peers);
                    }
                    if round.is_multiple_of(FILES_EVERY) {
                        let (log, store) = (self.log.clone(), self.files.clone());
                        tasks.spawn(async move {
                            let _ = tokio::task::spawn_blocking(move || {
                                Broker::collect_files(&log, &store);
                            })
                            .await;
                            None
                        });
                    }
                    Input::Tick
                }
                msg = async { gossip.as_mut()?.recv().await }, if gossip.is_some() => match msg {
                    Some(msg) => match self.heard(&msg) {
                        Some(s) => {
                            self.crl_behind(&mut tasks, &s, &asked);
                            Input::Heard(s)
                        }
                        None => continue,
                    },
                    None => {
                        gossip = None;
                        continue;
                    }
                },
            };
            for effect in core.on(Instant::now(), input) {
                self.carry_out(&mut tasks, effect);
            }
        }
    }

    /// Carries out one effect of the machine; what comes of it is an input on `tasks`.
    fn carry_out(&self, tasks: &mut JoinSet<Option<Input>>, effect: Effect) {
        match effect {
            Effect::Reply(reply, response) => {
                let _ = reply.send(response); // the asker may have gone
            }
            Effect::Send {
                peer,
                addrs,
                request,
                then,
            } => {
                let site = self.site.clone();
                tasks.spawn(async move {
                    let answer = site.call(peer, &addrs, Request::Broker(request)).await;
                    Some(Input::Answered { then, peer, answer })
                });
            }
            Effect::Record { command, then } => {
                let log = self.log.clone();
                tasks.spawn(async move {
                    let outcome = log.propose(command).await;
                    Some(Input::Recorded { then, outcome })
                });
            }
            Effect::Disconnect(peer) => {
                let net = self.site.net.clone();
                tasks.spawn(async move {
                    net.disconnect(peer).await;
                    None
                });
            }
            Effect::Forward {
                reply,
                submission,
                owner,
                to,
                why,
                offer,
            } => {
                let (site, modules) = (self.site.clone(), self.modules.clone());
                let files = self.files.clone();
                tasks.spawn(async move {
                    let r = super::forward::forward(
                        &site,
                        &modules,
                        &files,
                        *submission,
                        owner,
                        to,
                        &why,
                        offer,
                    )
                    .await;
                    let _ = reply.send(r);
                    None
                });
            }
            Effect::Found(replicas) => {
                let log = self.log.clone();
                tasks.spawn(async move {
                    if let Err(e) = log.initialize(&replicas).await {
                        tracing::warn!(error = %e, "cannot start the job log");
                    }
                    None
                });
            }
            Effect::Exec { trigger, argv, env } => {
                tasks.spawn(async move {
                    run_command(&trigger, &argv, env).await;
                    None
                });
            }
            Effect::Blobs { put, forget } => {
                let me = self.site.net.peer();
                for r in self.log.replicas() {
                    let Ok(peer) = r.peer.parse::<PeerId>() else {
                        continue;
                    };
                    if peer == me {
                        continue;
                    }
                    let addrs: Vec<libp2p::Multiaddr> =
                        r.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    let request = Request::Peer(crate::proto::PeerRequest::Blobs {
                        put: put.clone(),
                        forget: forget.clone(),
                    });
                    let site = self.site.clone();
                    tasks.spawn(async move {
                        if let Err(f) = site.call(peer, &addrs, request).await {
                            tracing::warn!(%peer, error = %f.message, "checkpoint blobs not replicated");
                        }
                        None
                    });
                }
            }
        }
    }

    /// Keeps the other groups' super-peers connected and tells them this group's summary (only
    /// the leader speaks for the group).
    fn publish(
        &self,
        tasks: &mut JoinSet<Option<Input>>,
        core: &Core,
        peers: &[(PeerId, Multiaddr)],
    ) {
        let mut data = Vec::new();
        if ciborium::into_writer(&core.summary(), &mut data).is_err() {
            return;
        }
        let net = self.site.net.clone();
        let peers = peers.to_vec();
        tasks.spawn(async move {
            for (peer, addr) in peers {
                net.dial(peer, vec![addr.clone()]).await;
                // Summaries count only from super-peers whose certificates have passed.
                if net.identity(&peer).is_none()
                    && let Err(e) = net.authenticate(peer, &[addr]).await
                {
                    tracing::warn!(%peer, error = %e, "a super-peer is not authenticated");
                }
            }
            net.publish(GROUPS_TOPIC, data).await;
            None
        });
    }

    /// Fetches the revocation list of a summary's domain from its super-peer (a daemon with the
    /// `superpeer` role) when that one says it holds a newer list than this daemon does, and
    /// hands what it takes to [`Broker::revoked`]. A list of a number already asked for is
    /// asked for again only after [`CRL_AGAIN`] (a list that does not come, or is refused, is
    /// not asked for at every summary).
    fn crl_behind(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Option<Input>>,
        s: &GroupSummary,
        asked: &Mutex<BTreeMap<String, (u64, Instant)>>,
    ) {
        let Some(number) = s.crl else { return };
        let superpeer = self
            .site
            .net
            .identity(&s.broker)
            .is_some_and(|id| id.roles.iter().any(|r| r == "superpeer"));
        let held = self.site.net.trust().crl_number(&s.domain);
        if !superpeer || held.is_some_and(|h| h >= number) {
            return;
        }
        {
            let mut asked = asked.lock();
            let now = Instant::now();
            if asked
                .get(&s.domain)
                .is_some_and(|(n, at)| *n >= number && now.duration_since(*at) < CRL_AGAIN)
            {
                return;
            }
            asked.insert(s.domain.clone(), (number, now));
        }
        let me = self.clone();
        let (peer, addrs): (PeerId, Vec<Multiaddr>) = (
            s.broker,
            s.addrs
                .iter()
                .filter_map(|a| crate::net::split_addr(a).map(|(_, a)| a))
                .collect(),
        );
        tasks.spawn(async move {
            let taken = crate::revocation::fetch(&me.site, peer, &addrs).await;
            if !taken.is_empty() {
                me.revoked(&taken).await;
            }
            None
        });
    }

    /// A group summary heard on the gossip topic, if it counts: only from the daemon it names as
    /// its super-peer, whose node certificate has passed and is of the summary's domain, and
    /// not this one's own. (The `superpeer` role is not asked for here: a node elected
    /// super-peer may lack it. Revocation lists are fetched only from daemons that have it,
    /// [`Broker::crl_behind`].)
    fn heard(&self, msg: &Gossip) -> Option<GroupSummary> {
        if msg.topic != GROUPS_TOPIC {
            return None;
        }
        let summary: Result<GroupSummary, _> = ciborium::from_reader(msg.data.as_slice());
        match summary {
            Ok(s)
                if s.validate().is_ok()
                    && msg.source == Some(s.broker)
                    && s.broker != self.site.net.peer()
                    && msg
                        .source
                        .and_then(|p| self.site.net.identity(&p))
                        .is_some_and(|id| {
                            id.kind == mvm_component::policy::PrincipalKind::Node
                                && id.domain == s.domain
                        }) =>
            {
                Some(s)
            }
            _ => {
                tracing::debug!(source = ?msg.source, "ignoring a bad group summary");
                None
            }
        }
    }
}

/// How long a trigger's command may run before it is killed.
const COMMAND_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs a trigger's command (`argv`) with `env` added to its environment, and logs how it
/// ended (with the end of what it wrote to stderr); one that runs over [`COMMAND_LIMIT`] is
/// killed.
async fn run_command(trigger: &str, argv: &[String], env: Vec<(String, String)>) {
    let Some((program, args)) = argv.split_first() else {
        return;
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%trigger, %program, error = %e, "the trigger's command does not start");
            return;
        }
    };
    match tokio::time::timeout(COMMAND_LIMIT, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(%trigger, %program, "the trigger's command ran");
        }
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String = err
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            tracing::warn!(%trigger, %program, status = %out.status, stderr = %tail.trim(), "the trigger's command failed");
        }
        Ok(Err(e)) => tracing::warn!(%trigger, %program, error = %e, "the trigger's command"),
        Err(_) => {
            tracing::warn!(%trigger, %program, "the trigger's command ran over {COMMAND_LIMIT:?} and was killed")
        }
    }
}
