//! The live web view of a super-peer (`--http ADDR`, off by default; axum over plain HTTP,
//! read-only): the group's nodes and their load, the jobs and their states, and for a running
//! job its topology drawn — vertices by node, channels with items per second and queue
//! depth — updated by server-sent events every second.
//!
//! It is behind the same certificates and policy as the CLI: `mvm web` asks the super-peer, over
//! a connection its certificate authenticated, for a login link ([`ClientRequest::WebLogin`]);
//! the link's token becomes an HTTP-only session cookie naming that principal, and every
//! answer is what `mvm status` would give it (jobs it may `read-results` of; the group's nodes,
//! which any authenticated peer may read).
//!
//! [`ClientRequest::WebLogin`]: crate::proto::ClientRequest::WebLogin

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response as HttpResponse};
use mvm_component::policy::Principal;
use parking_lot::Mutex;
use serde::Serialize;

use super::Broker;
use crate::proto::{BrokerRequest, FailureKind, JobState, JobStatus, Request, Response};

/// How long a session lasts.
const SESSION: Duration = Duration::from_secs(12 * 3600);

/// The most sessions held at once (the oldest go first).
const MAX_SESSIONS: usize = 4096;

/// How often the view is sent on an event stream.
const EVERY: Duration = Duration::from_secs(1);

/// The name of the session cookie.
const COOKIE: &str = "mvm_session";

/// The page.
const PAGE: &str = include_str!("web.html");

/// The sessions of a super-peer's web view, and where it is served.
#[derive(Default)]
pub(crate) struct Sessions {
    /// The view's base URL (`http://ADDR`), once it is served.
    url: OnceLock<String>,
    map: Mutex<HashMap<String, (Principal, Instant)>>,
    /// Items counted so far (a job's, or a channel's), when, and the rate last worked out.
    rates: Mutex<HashMap<String, (Instant, u64, f64)>>,
}

/// The shortest time over which a rate is worked out again.
const RATE_SPAN: Duration = Duration::from_millis(500);

/// The most counters whose rates are followed.
const MAX_RATES: usize = 1 << 16;

impl Sessions {
    /// Items per second of the counter `key`, now at `items`: over the time since it was last
    /// seen at least [`RATE_SPAN`] ago (0 when first seen).
    fn rate(&self, key: String, items: u64) -> f64 {
        let now = Instant::now();
        let mut rates = self.rates.lock();
        if rates.len() >= MAX_RATES {
            rates.clear();
        }
        let e = rates.entry(key).or_insert((now, items, 0.0));
        let dt = now.saturating_duration_since(e.0);
        if dt >= RATE_SPAN {
            e.2 = items.saturating_sub(e.1) as f64 / dt.as_secs_f64();
            e.0 = now;
            e.1 = items;
        }
        e.2
    }
}

impl Sessions {
    /// Serves the view at `url` (`http://ADDR`).
    pub(crate) fn serving_at(&self, url: String) {
        let _ = self.url.set(url);
    }

    /// A login link for `who` ([`Response::WebLogin`]), or why there is none.
    pub(crate) fn login(&self, who: &Principal) -> Response {
        let Some(url) = self.url.get() else {
            return super::fail(
                FailureKind::Unavailable,
                "this super-peer serves no web view (start it with --http ADDR)",
            );
        };
        let token = match crate::worker::agent::new_key() {
            Ok(t) => t,
            Err(e) => return super::fail(FailureKind::Failed, format!("a token: {e}")),
        };
        let now = Instant::now();
        let mut map = self.map.lock();
        map.retain(|_, (_, until)| *until > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(token.clone(), (who.clone(), now + SESSION));
        Response::WebLogin {
            url: format!("{url}/login?token={token}"),
            expires_ms: super::now_ms()
                .saturating_add(u64::try_from(SESSION.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The principal of a session token, while it lasts.
    fn who(&self, token: &str) -> Option<Principal> {
        let map = self.map.lock();
        map.get(token)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(p, _)| p.clone())
    }
}

/// The session token of a request: its cookie, or an `Authorization: Bearer` header.
fn token(headers: &HeaderMap) -> Option<String> {
    if let Some(b) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(b.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_owned)
        })
}

/// A node as the page draws it.
#[derive(Serialize)]
struct NodeOut {
    name: String,
    lost: bool,
    load: f64,
    cpus: u32,
    memory_bytes: u64,
    free_memory_bytes: u64,
    vertices: u32,
    slots: u32,
}

/// A job as the page lists it.
#[derive(Serialize)]
struct JobOut {
    job: String,
    name: String,
    state: JobState,
    owner: String,
    vertices: u32,
    vertices_done: u32,
    wall_ms: u64,
    nodes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Items its queues have carried, over every node (from the nodes' heartbeats).
    items: u64,
    /// Items per second lately.
    rate: f64,
}

/// A channel of the job drawn, with its receiving queue's figures.
#[derive(Serialize)]
struct ChannelOut {
    from: String,
    to: String,
    /// Items held now in the queue (and a link's outbox) of its receiving port.
    depth: u64,
    /// Items sent into that queue so far.
    items: u64,
    /// Items per second lately.
    rate: f64,
}

/// The running job drawn.
#[derive(Serialize)]
struct TopologyOut {
    job: String,
    name: String,
    /// `(vertex, node)`.
    vertices: Vec<(String, String)>,
    channels: Vec<ChannelOut>,
}

/// What the page shows, as one user may see it.
#[derive(Serialize)]
struct ViewOut {
    group: String,
    user: String,
    leader: bool,
    at_ms: u64,
    nodes: Vec<NodeOut>,
    jobs: Vec<JobOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topology: Option<TopologyOut>,
}

#[derive(serde::Deserialize)]
struct JobQuery {
    job: Option<String>,
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    token: String,
    /// A job to show first.
    job: Option<String>,
}

impl Broker {
    /// The view as `who` may see it, with job `selected`'s topology when it runs.
    async fn web_view(&self, who: &Principal, selected: Option<&str>) -> ViewOut {
        let group = self.group().await;
        let jobs = match self.status(who, None) {
            Response::Status(v) => v,
            _ => Vec::new(),
        };
        let items: HashMap<&str, u64> =
            group
                .nodes
                .iter()
                .flat_map(|n| n.traffic.iter())
                .fold(HashMap::new(), |mut m, t| {
                    *m.entry(t.job.as_str()).or_default() += t.items;
                    m
                });
        let topology = match selected {
            Some(id) => match jobs.iter().find(|j| j.job.as_str() == id) {
                Some(j) if j.state == JobState::Running => Some(self.topology(j).await),
                _ => None,
            },
            None => None,
        };
        ViewOut {
            group: group.group.clone(),
            user: who.to_string(),
            leader: self.log.is_leader(),
            at_ms: super::now_ms(),
            nodes: group
                .nodes
                .iter()
                .map(|n| NodeOut {
                    name: n.name.clone(),
                    lost: n.lost,
                    load: n.load,
                    cpus: n.cpus,
                    memory_bytes: n.memory_bytes,
                    free_memory_bytes: n.free_memory_bytes,
                    vertices: n.vertices,
                    slots: n.slots,
                })
                .collect(),
            jobs: jobs
                .iter()
                .map(|j| {
                    let mut nodes: Vec<String> = j.parts.iter().map(|p| p.name.clone()).collect();
                    nodes.dedup();
                    let items = items.get(j.job.as_str()).copied().unwrap_or(0);
                    JobOut {
                        job: j.job.to_string(),
                        name: j.name.clone(),
                        state: j.state,
                        owner: j.owner.clone(),
                        vertices: j.vertices,
                        vertices_done: j.vertices_done,
                        wall_ms: j.wall_ms,
                        nodes,
                        error: j.error.clone(),
                        items,
                        rate: if j.state == JobState::Running {
                            self.web.rate(j.job.to_string(), items)
                        } else {
                            0.0
                        },
                    }
                })
                .collect(),
            topology,
        }
    }

    /// Running job `j` drawn: its vertices by node, and each channel with the figures of its
    /// receiving queue, asked of the job's nodes now.
    async fn topology(&self, j: &JobStatus) -> TopologyOut {
        let mut queues: HashMap<String, (u64, u64)> = HashMap::new();
        let mut peers: Vec<libp2p::PeerId> = j.parts.iter().map(|p| p.node).collect();
        peers.dedup();
        let asks = peers.into_iter().map(|peer| {
            let job = j.job.clone();
            async move {
                let r = tokio::time::timeout(
                    EVERY,
                    self.site
                        .call(peer, &[], Request::Broker(BrokerRequest::Queues { job })),
                )
                .await;
                match r {
                    Ok(Ok(Response::Queues(v))) => v,
                    _ => Vec::new(),
                }
            }
        });
        for q in futures::future::join_all(asks).await.into_iter().flatten() {
            let port = q.queue.split('>').next().unwrap_or(&q.queue).to_owned();
            let e = queues.entry(port).or_default();
            e.0 += q.depth;
            if !q.queue.contains('>') {
                e.1 += q.items_in;
            }
        }
        TopologyOut {
            job: j.job.to_string(),
            name: j.name.clone(),
            vertices: j
                .parts
                .iter()
                .flat_map(|p| p.vertices.iter().map(|v| (v.clone(), p.name.clone())))
                .collect(),
            channels: j
                .channels
                .iter()
                .map(|(from, to)| {
                    let (depth, items) = queues.get(to).copied().unwrap_or_default();
                    ChannelOut {
                        from: from.clone(),
                        to: to.clone(),
                        depth,
                        items,
                        rate: self.web.rate(format!("{}|{from}>{to}", j.job), items),
                    }
                })
                .collect(),
        }
    }
}

/// Who the request is from, if from someone with a session.
fn authenticated(b: &Broker, headers: &HeaderMap) -> Option<Principal> {
    token(headers).and_then(|t| b.web.who(&t))
}

/// The answer to a request from nobody.
fn unauthorized() -> HttpResponse {
    (
        StatusCode::UNAUTHORIZED,
        "no session: log in with the link `mvm web` prints\n",
    )
        .into_response()
}

/// The page, with the view as it is now in it (drawn at once; the events update it).
async fn page(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Query(q): Query<JobQuery>,
) -> HttpResponse {
    match authenticated(&b, &headers) {
        Some(who) => {
            let v = b.web_view(&who, q.job.as_deref()).await;
            // JSON inside a script element: no `</` may close it early.
            let json = serde_json::to_string(&v)
                .unwrap_or_else(|_| "null".into())
                .replace("</", "<\\/");
            Html(PAGE.replace("/*INITIAL*/null", &json)).into_response()
        }
        None => unauthorized(),
    }
}

async fn login(State(b): State<Arc<Broker>>, Query(q): Query<LoginQuery>) -> HttpResponse {
    if b.web.who(&q.token).is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            "this login link is not valid (any more)\n",
        )
            .into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        q.token,
        SESSION.as_secs()
    );
    let to = match &q.job {
        Some(j) if j.parse::<crate::proto::JobId>().is_ok() => format!("/?job={j}"),
        _ => "/".to_owned(),
    };
    ([(header::SET_COOKIE, cookie)], Redirect::to(&to)).into_response()
}

async fn view(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Query(q): Query<JobQuery>,
) -> HttpResponse {
    match authenticated(&b, &headers) {
        Some(who) => axum::Json(b.web_view(&who, q.job.as_deref()).await).into_response(),
        None => unauthorized(),
    }
}

async fn events(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Query(q): Query<JobQuery>,
) -> HttpResponse {
    let Some(who) = authenticated(&b, &headers) else {
        return unauthorized();
    };
    let token = token(&headers).unwrap_or_default();
    let stream = futures::stream::unfold(
        (b, who, token, q.job, true),
        |(b, who, token, job, first)| async move {
            if !first {
                tokio::time::sleep(EVERY).await;
            }
            // A session that ended ends its stream.
            b.web.who(&token)?;
            let v = b.web_view(&who, job.as_deref()).await;
            let data = serde_json::to_string(&v).unwrap_or_default();
            let event: Result<Event, Infallible> = Ok(Event::default().event("view").data(data));
            Some((event, (b, who, token, job, false)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Serves the web view of `broker` on `listener` until the task is aborted.
pub(crate) async fn serve(listener: tokio::net::TcpListener, broker: Arc<Broker>) {
    if let Ok(a) = listener.local_addr() {
        broker.web.serving_at(format!("http://{a}"));
    }
    let app = axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/login", axum::routing::get(login))
        .route("/api/view", axum::routing::get(view))
        .route("/api/events", axum::routing::get(events))
        .with_state(broker);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the web view stopped");
    }
}
