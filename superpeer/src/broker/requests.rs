//! The broker's answers to requests: a client's (a user's, or a super-peer's forwarding a
//! job), a node's, and a replica's checkpoint blobs.

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind};

use super::core::Input;
use super::{Broker, admit, agree, array, fail, migrate, place};
use crate::proto::{ClientRequest, FailureKind, NodeRequest, Response, SUBMIT_HOLD};

impl Broker {
    /// Answers a client (a user, or a super-peer forwarding a job). Only the leader answers,
    /// except for which modules it lacks (any replica that has them can serve them).
    pub(crate) async fn client(&self, who: &Principal, request: ClientRequest) -> Response {
        if !matches!(request, ClientRequest::Missing { .. }) && !self.log.is_leader() {
            return self.not_leader();
        }
        match request {
            ClientRequest::WebLogin => self.web.login(who),
            ClientRequest::Missing { hashes } => Response::Missing {
                hashes: hashes
                    .iter()
                    .filter(|h| !self.modules.has(h))
                    .cloned()
                    .collect(),
            },
            ClientRequest::Submit(mut s) => {
                for b in std::mem::take(&mut s.modules) {
                    self.modules.put(b);
                }
                let checked = match place::check(&self.modules, &self.codecs, &s) {
                    Ok(c) => c,
                    Err(f) => return Response::Error(f),
                };
                let waits = !s.after.is_empty() || !s.after_ok.is_empty();
                if waits && let Err(f) = self.log.read(|st| array::check_dependencies(st, &s)) {
                    return Response::Error(f);
                }
                if let Some(r) = self.inputs_missing(&s) {
                    return r;
                }
                let wait = s.wait;
                let who = who.clone();
                let r = self
                    .ask(|reply| Input::Submit {
                        reply,
                        who,
                        submission: s,
                        checked: Box::new(checked),
                    })
                    .await;
                match r {
                    Response::Submitted(st) if wait && !st.state.is_final() => self.held(st).await,
                    r => r,
                }
            }
            ClientRequest::Offer {
                mut submission,
                deadline_ms,
                start_after_ms,
                valid_ms,
            } => {
                for b in std::mem::take(&mut submission.modules) {
                    self.modules.put(b);
                }
                let checked = match place::check(&self.modules, &self.codecs, &submission) {
                    Ok(c) => c,
                    Err(f) => return Response::Error(f),
                };
                if let Some(r) = self.inputs_missing(&submission) {
                    return r;
                }
                let who = who.clone();
                let r = self
                    .ask(|reply| Input::Offer {
                        reply,
                        who,
                        submission,
                        checked: Box::new(checked),
                        ask: agree::Ask {
                            deadline_ms,
                            start_after_ms,
                            valid_ms: valid_ms
                                .unwrap_or(crate::proto::OFFER_TTL_MS)
                                .min(crate::proto::MAX_OFFER_TTL_MS),
                        },
                    })
                    .await;
                if let Response::Agreements(v) = &r {
                    self.passed_on(v);
                }
                r
            }
            ClientRequest::Accept { offer, on_behalf } => {
                let acting = match on_behalf {
                    None => who.clone(),
                    Some(p) => match admit::speaks_for(who, &p) {
                        Ok(()) => p,
                        Err(e) => return Response::Error(e),
                    },
                };
                if let Some(r) = self.accept_remote(&acting, &offer).await {
                    return r;
                }
                self.ask(|reply| Input::Accept {
                    reply,
                    who: acting,
                    offer,
                })
                .await
            }
            ClientRequest::Agreements { all } => self.agreements(who, all),
            ClientRequest::Bank(r) => self.bank(who, r).await,
            ClientRequest::Status { job } => self.status(who, job.as_ref()),
            ClientRequest::Wait {
                job,
                after,
                until_end,
            } => {
                if let Some(r) = admit::refusal(&self.site, &self.log, who, "read-results", &job) {
                    return r;
                }
                self.wait(&job, after, until_end, SUBMIT_HOLD).await
            }
            ClientRequest::Cancel { job } => {
                // An array: each of its jobs not ended, as the policy lets the asker.
                if let Some(jobs) = self.log.read(|s| {
                    s.array(&job).map(|a| {
                        a.jobs
                            .iter()
                            .filter(|j| s.job(j).is_some_and(|r| !r.state.is_final()))
                            .cloned()
                            .collect::<Vec<_>>()
                    })
                }) {
                    for job in jobs {
                        let r = match admit::refusal(&self.site, &self.log, who, "cancel", &job) {
                            None => self.ask(|reply| Input::Cancel { reply, job }).await,
                            Some(r) => r,
                        };
                        if matches!(&r, Response::Error(f) if f.kind == FailureKind::Refused) {
                            return r;
                        }
                    }
                    return Response::Ok;
                }
                match admit::refusal(&self.site, &self.log, who, "cancel", &job) {
                    None => self.ask(|reply| Input::Cancel { reply, job }).await,
                    Some(r) => r,
                }
            }
            // Who may cancel a job may have it checkpointed.
            ClientRequest::Checkpoint { job } => {
                match admit::refusal(&self.site, &self.log, who, "cancel", &job) {
                    None => self.ask(|reply| Input::Checkpoint { reply, job }).await,
                    Some(r) => r,
                }
            }
            // Who may cancel a job may move its parts.
            ClientRequest::Migrate {
                job,
                vertex,
                node,
                to,
            } => {
                let which = match (vertex, node) {
                    (Some(v), None) => migrate::Which::Vertex(v),
                    (None, Some(n)) => migrate::Which::Node(n),
                    _ => {
                        return fail(
                            FailureKind::Input,
                            "name the part to move by one vertex or by its node, not both",
                        );
                    }
                };
                match admit::refusal(&self.site, &self.log, who, "cancel", &job) {
                    None => {
                        self.ask(|reply| Input::Migrate {
                            reply,
                            job,
                            which,
                            to,
                        })
                        .await
                    }
                    Some(r) => r,
                }
            }
            ClientRequest::Drain { node, drain } => {
                match crate::policy::admin_refusal(&self.site, who, "drain") {
                    None => self.ask(|reply| Input::Drain { reply, node, drain }).await,
                    Some(r) => r,
                }
            }
            ClientRequest::Bid { job, rate } => self.rebid(who, job, rate).await,
            // Who may cancel a job may hold it back.
            ClientRequest::Hold { job, held } => {
                match admit::refusal(&self.site, &self.log, who, "cancel", &job) {
                    None => self.ask(|reply| Input::Hold { reply, job, held }).await,
                    Some(r) => r,
                }
            }
            ClientRequest::PolicyReload => crate::policy::reload(&self.site, who),
            ClientRequest::Logs {
                job,
                after,
                since_ms,
                vertex,
            } => self.read_logs(who, &job, &after, since_ms, vertex.as_deref()),
        }
    }

    /// Answers a node of this group's domain. Only the leader answers, except for module
    /// bytes; a replica that does not lead answers a heartbeat with the replicas, leader first.
    pub(crate) async fn node(
        &self,
        peer: PeerId,
        who: &Principal,
        request: NodeRequest,
    ) -> Response {
        if who.kind != PrincipalKind::Node || who.domain != self.site.domain {
            return fail(
                FailureKind::Refused,
                format!("{who} is not a node of domain {}", self.site.domain),
            );
        }
        if !matches!(
            request,
            NodeRequest::Fetch { .. } | NodeRequest::FetchCheckpoint { .. }
        ) && !self.log.is_leader()
        {
            return match request {
                NodeRequest::Heartbeat(_) => Response::Heartbeat {
                    known: false,
                    members: self.view.replicas.get(&self.log),
                    stop: Vec::new(),
                    charged: None,
                    broke: Vec::new(),
                },
                _ => self.not_leader(),
            };
        }
        match request {
            NodeRequest::Register(info) => {
                let who = who.clone();
                self.ask(|reply| Input::Register {
                    reply,
                    peer,
                    who,
                    info: *info,
                })
                .await
            }
            NodeRequest::Heartbeat(load) => {
                let account = crate::proto::account_of(who);
                self.ask(|reply| Input::Heartbeat {
                    reply,
                    peer,
                    account,
                    load,
                })
                .await
            }
            NodeRequest::Fetch { hash } => match self.modules.get(&hash) {
                Some(b) => Response::Module(b),
                None => fail(FailureKind::NotFound, format!("no module {hash}")),
            },
            NodeRequest::FetchCheckpoint { hash } => match self.blobs.get(&hash) {
                Some(blob) => Response::Checkpoint {
                    hash,
                    blob,
                    files: None,
                },
                None => fail(FailureKind::NotFound, format!("no checkpoint blob {hash}")),
            },
            NodeRequest::Report(report) => {
                self.ask(|reply| Input::Report {
                    reply,
                    peer,
                    report,
                })
                .await
            }
            NodeRequest::Outputs {
                job,
                attempt,
                files,
            } => self.outputs(peer, job, attempt, files).await,
            NodeRequest::Logs {
                job,
                attempt,
                lines,
            } => {
                self.ask(|reply| Input::Logs {
                    reply,
                    peer,
                    job,
                    attempt,
                    lines,
                })
                .await
            }
        }
    }

    /// Keeps checkpoint blobs sent by `peer`, which must be a replica of this group's job log,
    /// and forgets those it says no checkpoint refers to any more: so that whichever replica
    /// leads next can restore a job from its checkpoints.
    pub(crate) fn keep_blobs(
        &self,
        peer: PeerId,
        put: Vec<bytes::Bytes>,
        forget: &[crate::proto::Hash],
    ) -> Response {
        let me = peer.to_string();
        if !self.log.replicas().iter().any(|r| r.peer == me) {
            return fail(
                FailureKind::Refused,
                format!(
                    "{peer} is not a replica of group {}'s job log",
                    self.site.group
                ),
            );
        }
        for blob in put {
            self.blobs.put(blob);
        }
        for h in forget {
            self.blobs.remove(h);
        }
        Response::Ok
    }
}
