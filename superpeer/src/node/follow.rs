//! Following the group's super-peer: registration, heartbeats with this node's load, and
//! finding the replica of the group's job log that leads when the one followed is lost. What
//! to do is the [`Follow`] machine's to decide (no clock, no I/O); `Node::follow` carries it
//! out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

use super::Node;
use crate::proto::{
    FailureKind, GroupInfo, JobId, JobTraffic, MAX_QUEUE_SAMPLES, Member, NodeInfo, NodeLoad,
    NodeRequest, QueueSample, Request, Response,
};

/// What came of a request to the super-peer.
#[derive(Debug)]
pub(super) enum Heard {
    /// An answer (any answer, even a refusal, shows it is alive).
    Answer(Box<Response>),
    /// The request failed at once: the connection was refused or closed (the process is gone).
    Refused,
    /// No answer within `lost_after`.
    Silent,
}

/// What happens to a node following its super-peer.
#[derive(Debug)]
pub(super) enum Input {
    /// A heartbeat interval has passed.
    Tick,
    /// What came of the request to `from`.
    Heard { from: PeerId, heard: Heard },
    /// The leader looked for, if found.
    Found(Option<(PeerId, Vec<Multiaddr>)>),
}

/// What the node must do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Effect {
    /// Send `to` a registration, or a heartbeat.
    Send {
        to: PeerId,
        addrs: Vec<Multiaddr>,
        register: bool,
    },
    /// Stop this node's part of `job`, of run `upto` or before, which the leader `from` does
    /// not know running.
    Stop { from: PeerId, job: JobId, upto: u32 },
    /// The group's replicas, as the super-peer listed them (leader first).
    Members(Vec<Member>),
    /// Look for the leader among these addresses (and the bootstrap ones).
    Look { known: Vec<Multiaddr> },
    /// Follow this super-peer from now on.
    Follow((PeerId, Vec<Multiaddr>)),
}

/// A node's view of the super-peer it follows.
pub(super) struct Follow {
    superpeer: Option<(PeerId, Vec<Multiaddr>)>,
    /// The group's replicas, as last heard.
    members: Vec<Member>,
    registered: bool,
    last_answer: Instant,
    lost_after: Duration,
}

impl Follow {
    /// Following `superpeer` (none: nothing to do), unregistered, at `now`.
    pub(super) fn new(
        superpeer: Option<(PeerId, Vec<Multiaddr>)>,
        lost_after: Duration,
        now: Instant,
    ) -> Follow {
        Follow {
            superpeer,
            members: Vec::new(),
            registered: false,
            last_answer: now,
            lost_after,
        }
    }

    /// Takes `input` at `now`.
    pub(super) fn on(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        match input {
            Input::Tick => self.send().into_iter().collect(),
            Input::Heard { from, heard } => self.heard(now, from, heard),
            Input::Found(next) => match next {
                Some(next) if self.superpeer.as_ref().is_none_or(|(p, _)| *p != next.0) => {
                    self.superpeer = Some(next.clone());
                    self.registered = false;
                    self.last_answer = now;
                    // Register there now, not at the next tick.
                    let mut out = vec![Effect::Follow(next)];
                    out.extend(self.send());
                    out
                }
                _ => Vec::new(),
            },
        }
    }

    /// The request due to the super-peer followed: a registration until it has taken one.
    fn send(&self) -> Option<Effect> {
        self.superpeer.as_ref().map(|(to, addrs)| Effect::Send {
            to: *to,
            addrs: addrs.clone(),
            register: !self.registered,
        })
    }

    /// The super-peer's answer, or silence: registered or not, jobs to stop, and whether to
    /// look for the leader (the super-peer says another leads, refuses the connection while
    /// other replicas are known, or has been silent for `lost_after`).
    fn heard(&mut self, now: Instant, from: PeerId, heard: Heard) -> Vec<Effect> {
        let Some((sp, _)) = &self.superpeer else {
            return Vec::new();
        };
        let sp = *sp;
        if from != sp {
            return Vec::new(); // an answer of one no longer followed
        }
        let mut out = Vec::new();
        let mut elsewhere = matches!(heard, Heard::Refused) && self.members.len() > 1;
        if matches!(heard, Heard::Answer(_)) {
            self.last_answer = now;
        }
        let answer = match heard {
            Heard::Answer(r) => Some(*r),
            Heard::Refused => None,
            Heard::Silent => {
                tracing::debug!(superpeer = %sp, "super-peer did not answer");
                None
            }
        };
        match answer {
            Some(Response::Registered { members, .. }) => {
                tracing::info!(superpeer = %sp, "registered");
                self.registered = true;
                self.members.clone_from(&members);
                out.push(Effect::Members(members));
            }
            Some(Response::Heartbeat {
                known,
                members,
                stop,
                ..
            }) => {
                self.registered = known;
                out.extend(stop.into_iter().map(|(job, upto)| Effect::Stop {
                    from: sp,
                    job,
                    upto,
                }));
                // A replica that does not lead lists the leader first.
                elsewhere = !known && members.first().is_some_and(|m| m.peer != sp);
                self.members.clone_from(&members);
                out.push(Effect::Members(members));
            }
            Some(Response::Error(f)) if f.kind == FailureKind::Unavailable => {
                self.registered = false;
                elsewhere = true;
            }
            Some(_) | None => self.registered = false,
        }
        if elsewhere || now.saturating_duration_since(self.last_answer) >= self.lost_after {
            if !elsewhere {
                tracing::warn!(superpeer = %sp, "super-peer lost; looking for the group's leader");
            }
            let known = self.members.iter().flat_map(|m| m.addrs.clone()).collect();
            out.push(Effect::Look { known });
        }
        out
    }
}

impl Node {
    /// Whether `peer` is a super-peer of this node's group: the one it follows, another
    /// replica of the group's job log it has heard of (the leader may have changed since), or
    /// this daemon.
    pub(crate) fn is_superpeer(&self, peer: PeerId) -> bool {
        peer == self.site.peer()
            || self
                .superpeer
                .read()
                .as_ref()
                .is_some_and(|(p, _)| *p == peer)
            || self.members.lock().iter().any(|m| m.peer == peer)
    }

    /// The group as this node knows it: which super-peer it follows.
    pub(crate) fn view(&self) -> GroupInfo {
        let sp = self.superpeer();
        GroupInfo {
            group: self.site.group.clone(),
            broker: sp.as_ref().map(|(p, _)| *p),
            broker_addrs: sp
                .map(|(p, a)| a.iter().map(|a| crate::net::with_peer(a, p)).collect())
                .unwrap_or_default(),
            is_broker: false,
            nodes: Vec::new(),
            groups: Vec::new(),
            scheduling: None,
        }
    }

    /// Its deepest queues of running jobs now, and what each job's queues have carried (a
    /// run's namespace, `JOB~N`, counted as its job).
    fn queue_samples(&self) -> (Vec<QueueSample>, Vec<JobTraffic>) {
        let stats = self.queues.list(None);
        let split = |name: &str| -> (String, String) {
            let (job, queue) = super::job_queue(name).unwrap_or(("", name));
            (job.to_owned(), queue.to_owned())
        };
        let mut traffic: Vec<JobTraffic> = Vec::new();
        for s in &stats {
            let (job, _) = split(&s.name);
            match traffic.iter_mut().find(|t| t.job == job) {
                Some(t) => {
                    t.items += s.items_out;
                    t.bytes += s.bytes_out;
                }
                None => traffic.push(JobTraffic {
                    job,
                    items: s.items_out,
                    bytes: s.bytes_out,
                }),
            }
        }
        let mut deepest: Vec<&mvm_queue::queue::Stats> = stats.iter().collect();
        deepest.sort_by(|a, b| b.depth.cmp(&a.depth).then_with(|| a.name.cmp(&b.name)));
        let queues = deepest
            .into_iter()
            .take(MAX_QUEUE_SAMPLES)
            .map(|s| {
                let (job, queue) = split(&s.name);
                QueueSample {
                    job,
                    queue,
                    depth: s.depth,
                    depth_bytes: s.depth_bytes,
                }
            })
            .collect();
        (queues, traffic)
    }

    /// The queues of `job`'s part here now (every run of it), for the web view.
    pub(crate) fn queues_of(&self, job: &JobId) -> Vec<crate::proto::QueueStat> {
        let id = job.as_str();
        self.queues
            .list(None)
            .into_iter()
            .filter_map(|s| {
                let (of, queue) = super::job_queue(&s.name)?;
                (of == id).then(|| crate::proto::QueueStat {
                    queue: queue.to_owned(),
                    depth: s.depth,
                    items_in: s.items_in,
                    bytes_in: s.bytes_in,
                })
            })
            .collect()
    }

    /// This node's properties now.
    fn load(&self) -> NodeLoad {
        use mvm_os::probe::{FreeMemory, Load, Probe};
        let interval = self.site.heartbeat;
        let free = FreeMemory { interval }.sample().unwrap_or(0.0);
        let load = Load { interval }.sample().unwrap_or(0.0);
        let (queues, traffic) = self.queue_samples();
        NodeLoad {
            free_memory_bytes: free as u64,
            load,
            vertices: self.vertices(),
            images: self.images(),
            jobs: self.job_ids(),
            warm: self.os.as_ref().map(|os| os.warm()).unwrap_or_default(),
            queues,
            traffic,
            probes: self.probes.take(),
            charges: Vec::new(),
            price: 0,
            bidders: Vec::new(),
            floor: 0,
        }
    }

    /// A heartbeat's load: [`Node::load`] with what the node's auctioneer metered (a new
    /// batch of charges, kept with those the bank has not taken), its price and its bidders.
    async fn beat(&self) -> NodeLoad {
        let mut load = self.load();
        load.floor = self.floor();
        let Some(os) = self.os.clone() else {
            return load;
        };
        match tokio::task::spawn_blocking(move || os.market().meter()).await {
            Ok((lines, price, bidders)) => {
                let mut c = self.charges.lock();
                c.push(lines);
                load.charges = c.unsent();
                load.price = price;
                load.bidders = bidders;
            }
            Err(e) => tracing::warn!("metering the bidding guests: {e}"),
        }
        load
    }

    /// The leader's answer to a heartbeat: the charges the bank took go, and the payers with
    /// no credit left bid the floor rate.
    async fn beat_answered(&self, charged: Option<(u64, u64)>, broke: Vec<String>) {
        if let Some(upto) = charged {
            self.charges.lock().taken(upto);
        }
        let Some(os) = self.os.clone() else {
            return;
        };
        if let Err(e) = tokio::task::spawn_blocking(move || os.market().set_broke(broke)).await {
            tracing::warn!("setting the bids of payers without credit: {e}");
        }
    }

    /// The image ids this node offers now: the configured ones and its repository's (read
    /// again each time, so that an image imported while the node runs is offered).
    fn images(&self) -> Vec<String> {
        let mut v = self.config.images.clone();
        if let Some(os) = &self.os {
            v.extend(os.images());
        }
        v
    }

    fn info(&self) -> NodeInfo {
        let load = self.load();
        NodeInfo {
            name: self.site.name.clone(),
            group: self.site.group.clone(),
            domain: self.site.domain.clone(),
            addrs: self.site.net.dial_addrs(),
            cpus: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
            memory_bytes: mvm_os::probe::total_memory().unwrap_or(0),
            arch: std::env::consts::ARCH.to_owned(),
            images: load.images.clone(),
            slots: self.config.slots,
            eligible: self.config.eligible,
            load,
            guest_of: self.config.guest_of,
            fetches_images: self.os.is_some(),
        }
    }

    /// Registers with the super-peer and sends heartbeats, as the [`Follow`] machine decides:
    /// one request each heartbeat, its answer (or silence within `lost_after`) given back to
    /// the machine, and the leader looked for when the machine says so. Runs until the task is
    /// aborted.
    pub(crate) async fn follow(self: Arc<Self>) {
        let mut machine = Follow::new(self.superpeer(), self.site.lost_after, Instant::now());
        let mut tick = tokio::time::interval(self.site.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut effects = Vec::new();
        loop {
            if effects.is_empty() {
                tick.tick().await;
                effects = machine.on(Instant::now(), Input::Tick);
            }
            let mut next = Vec::new();
            for effect in std::mem::take(&mut effects) {
                let input = match effect {
                    Effect::Send {
                        to,
                        addrs,
                        register,
                    } => {
                        let request = if register {
                            Request::Node(NodeRequest::Register(Box::new(self.info())))
                        } else {
                            Request::Node(NodeRequest::Heartbeat(self.beat().await))
                        };
                        let heard = match tokio::time::timeout(
                            self.site.lost_after,
                            self.site.request(to, &addrs, request),
                        )
                        .await
                        {
                            Ok(Ok(r)) => {
                                if let Response::Heartbeat { charged, broke, .. } = &r {
                                    self.beat_answered(*charged, broke.clone()).await;
                                }
                                Heard::Answer(Box::new(r))
                            }
                            // It fails at once: the connection is refused or closed.
                            Ok(Err(_)) => Heard::Refused,
                            Err(_) => Heard::Silent,
                        };
                        Input::Heard { from: to, heard }
                    }
                    Effect::Look { known } => Input::Found(self.find_leader(known).await),
                    Effect::Stop { from, job, upto } => {
                        tracing::warn!(%job, "the leader has no such job running; stopping its part");
                        self.terminate(from, true, job, upto, "unknown to the leader".into())
                            .await;
                        continue;
                    }
                    Effect::Members(members) => {
                        *self.members.lock() = members;
                        continue;
                    }
                    Effect::Follow(to) => {
                        tracing::info!(superpeer = %to.0, "following the group's leader");
                        *self.superpeer.write() = Some(to);
                        continue;
                    }
                };
                next.extend(machine.on(Instant::now(), input));
            }
            effects = next;
        }
    }

    /// The replica of the group's job log that leads now, as the replicas this node knows of
    /// (`known`, from the last answers of its super-peer, then its bootstrap addresses) say: the first
    /// answer that comes as broker, or names one. All are asked at once, so a replica that is
    /// gone and does not refuse the connection costs no more than one `lost_after`.
    async fn find_leader(&self, known: Vec<Multiaddr>) -> Option<(PeerId, Vec<Multiaddr>)> {
        use futures::StreamExt as _;
        let mut tried = std::collections::HashSet::new();
        let mut probes = futures::stream::FuturesUnordered::new();
        let bootstrap = self.config.bootstrap.iter().cloned();
        for (peer, addr) in known
            .iter()
            .filter_map(crate::net::split_addr)
            .chain(bootstrap)
        {
            if !tried.insert(peer) {
                continue;
            }
            probes.push(async move {
                let at = [addr.clone()];
                let probe = self.site.request(peer, &at, Request::Leader);
                let group = tokio::time::timeout(self.site.lost_after, probe)
                    .await
                    .ok()
                    .and_then(Result::ok);
                let Some(Response::Group(g)) = group else {
                    return None;
                };
                if g.is_broker {
                    return Some((peer, vec![addr]));
                }
                let (l, la) = g.broker_addrs.iter().find_map(crate::net::split_addr)?;
                (g.broker == Some(l)).then(|| (l, vec![la]))
            });
        }
        while let Some(answer) = probes.next().await {
            if answer.is_some() {
                return answer;
            }
        }
        None
    }
}

#[cfg(test)]
#[path = "follow_tests.rs"]
mod tests;
