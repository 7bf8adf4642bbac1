//! A daemon's Prometheus metrics (`--metrics ADDR`): read from its state at each scrape (the
//! `prometheus-client` crate's collectors), so that serving them costs the daemon's work
//! nothing between scrapes.
//!
//! - a super-peer: its jobs by state in the group's job log (`mvm_jobs`), whether its replica
//!   leads the log (`mvm_log_leader`), the log's last applied index (`mvm_log_applied`);
//! - a node: each queue of its running jobs — depth, items and bytes in and out, items
//!   dropped or refused (`mvm_queue_*`, labelled by job, queue and kind: FIFO or priority; a
//!   node's end of a remote link is a queue too) — and its free warm guests per template
//!   (`mvm_guests_warm`);
//! - every daemon: the number of the revocation list it holds of each domain
//!   (`mvm_revocation_list`); authenticated peers' offences (`mvm_peer_offences`) and those
//!   cut off for them (`mvm_peers_cut_off`), by offence; bytes of jobs' files its stores sent
//!   whole (`mvm_file_bytes_served`: a super-peer's, the group's files; a node's, the inputs it
//!   holds, to other nodes).
//!
//! Served over plain HTTP (`GET /metrics`, OpenMetrics text) on the address given: a scrape
//! endpoint for a trusted monitoring network, as Prometheus exporters are.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::broker::Broker;
use crate::node::Node;

/// What a daemon's metrics are read from.
#[derive(Clone)]
pub(crate) struct Sources {
    /// Its node.
    pub(crate) node: Arc<Node>,
    /// Its broker, on a super-peer.
    pub(crate) broker: Option<Arc<Broker>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("broker", &self.broker.is_some())
            .finish_non_exhaustive()
    }
}

/// Labels of one sample.
type Labels = Vec<(&'static str, String)>;

/// Encodes metric family `name` of `kind` from its samples.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((labels, first)) = samples.peek() else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    // A metric without labels is one sample, written as such.
    if labels.is_empty() {
        return match samples.next() {
            Some((_, metric)) => metric.encode(family),
            None => Ok(()),
        };
    }
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if let Some(b) = &self.broker {
            let by_state = b.log.read(|s| {
                let mut n: BTreeMap<String, i64> = BTreeMap::new();
                for j in s.jobs() {
                    *n.entry(format!("{:?}", j.state).to_lowercase())
                        .or_default() += 1;
                }
                n
            });
            family(
                &mut encoder,
                "mvm_jobs",
                "Jobs in the group's job log, by state",
                by_state
                    .into_iter()
                    .map(|(state, n)| (vec![("state", state)], ConstGauge::new(n))),
            )?;
            if let Some(m) = b.monitoring() {
                family(
                    &mut encoder,
                    "mvm_probe",
                    "The latest sample of each node's probes, as its monitoring policy runs them",
                    m.probes.iter().flat_map(|(node, samples)| {
                        samples.iter().map(move |s| {
                            let mut labels: Labels =
                                vec![("node", node.clone()), ("probe", s.probe.clone())];
                            if let Some(j) = &s.job {
                                labels.push(("job", j.clone()));
                            }
                            (labels, ConstGauge::new(s.value))
                        })
                    }),
                )?;
                family(
                    &mut encoder,
                    "mvm_scheduling_policy",
                    "The group's scheduling policy in force (1), as its domain's rules chose it",
                    [(
                        vec![("policy", m.scheduling.policy.clone())],
                        ConstGauge::new(1i64),
                    )],
                )?;
                family(
                    &mut encoder,
                    "mvm_scheduling_switches",
                    "How many times the scheduling rules have switched the group's policy",
                    [(Vec::new(), ConstCounter::new(m.switches))],
                )?;
            }
            self.broker_figures(&mut encoder, b)?;
            let leader = i64::from(b.log.is_leader());
            family(
                &mut encoder,
                "mvm_log_leader",
                "Whether this super-peer's replica leads the group's job log (and brokers)",
                [(Vec::new(), ConstGauge::new(leader))],
            )?;
        }
        let served = [
            ("superpeer", self.broker.as_ref().map(|b| b.files.served())),
            ("node", self.node.files().map(|s| s.served())),
        ];
        family(
            &mut encoder,
            "mvm_file_bytes_served",
            "Bytes of jobs' files sent whole, by the store they came from: a super-peer's (the \
             group's files) or a node's (inputs it holds, to the other nodes)",
            served.into_iter().filter_map(|(store, n)| {
                n.map(|n| (vec![("store", store.to_owned())], ConstCounter::new(n)))
            }),
        )?;
        let stats = self.node.queues.list(None);
        let labels = |s: &mvm_queue::queue::Stats| -> Labels {
            let (job, queue) = s.name.split_once('/').unwrap_or(("", s.name.as_str()));
            vec![
                ("job", job.to_owned()),
                ("queue", queue.to_owned()),
                ("kind", s.kind.as_str().to_owned()),
            ]
        };
        let gauge = |f: fn(&mvm_queue::queue::Stats) -> u64| {
            stats.iter().map(move |s| {
                (
                    labels(s),
                    ConstGauge::new(i64::try_from(f(s)).unwrap_or(i64::MAX)),
                )
            })
        };
        let counter = |f: fn(&mvm_queue::queue::Stats) -> u64| {
            stats
                .iter()
                .map(move |s| (labels(s), ConstCounter::new(f(s))))
        };
        family(
            &mut encoder,
            "mvm_queue_depth",
            "Items held now by a queue of a running job",
            gauge(|s| s.depth),
        )?;
        family(
            &mut encoder,
            "mvm_queue_depth_bytes",
            "Bytes held now by a queue of a running job",
            gauge(|s| s.depth_bytes),
        )?;
        family(
            &mut encoder,
            "mvm_queue_items_in",
            "Items sent into a queue of a running job",
            counter(|s| s.items_in),
        )?;
        family(
            &mut encoder,
            "mvm_queue_bytes_in",
            "Bytes sent into a queue of a running job",
            counter(|s| s.bytes_in),
        )?;
        family(
            &mut encoder,
            "mvm_queue_items_out",
            "Items taken out of a queue of a running job",
            counter(|s| s.items_out),
        )?;
        family(
            &mut encoder,
            "mvm_queue_dropped_items",
            "Items a queue of a running job dropped (drop-oldest)",
            counter(|s| s.dropped_items),
        )?;
        family(
            &mut encoder,
            "mvm_queue_rejected",
            "Sends a full queue of a running job refused",
            counter(|s| s.rejected),
        )?;
        family(
            &mut encoder,
            "mvm_revocation_list",
            "The number of the revocation list held, by the domain of the CA that signed it",
            self.node
                .site()
                .net
                .trust()
                .crl_numbers()
                .into_iter()
                .map(|(domain, n)| {
                    (
                        vec![("domain", domain)],
                        ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)),
                    )
                }),
        )?;
        let offences = self.node.site().net.offences();
        family(
            &mut encoder,
            "mvm_peer_offences",
            "Offences of authenticated peers (bad frames, floods), by offence",
            offences.iter().map(|(o, counted, _)| {
                (
                    vec![("offence", o.name().to_owned())],
                    ConstCounter::new(*counted),
                )
            }),
        )?;
        family(
            &mut encoder,
            "mvm_peers_cut_off",
            "Peers cut off and blocked for their offences, by the offence that did it",
            offences.iter().map(|(o, _, cut)| {
                (
                    vec![("offence", o.name().to_owned())],
                    ConstCounter::new(*cut),
                )
            }),
        )?;
        if let Some(os) = self.node.os() {
            family(
                &mut encoder,
                "mvm_guests_warm",
                "Free warm guests, by template key",
                os.warm()
                    .into_iter()
                    .map(|(key, n)| (vec![("template", key)], ConstGauge::new(i64::from(n)))),
            )?;
        }
        Ok(())
    }
}

impl Sources {
    /// A super-peer's counts of its own: how long jobs took to start, placements by
    /// scheduling policy, checkpoints and moves, items and bytes per edge kind (from the job
    /// log), and its policy engine's answers.
    fn broker_figures(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        b: &Broker,
    ) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let f = b.figures();
        family(
            encoder,
            "mvm_job_start_seconds",
            "Seconds from a job's submission until it ran (every part started), as placed by this super-peer",
            [(Vec::new(), f.start.clone())],
        )?;
        let placements: Vec<(Labels, ConstCounter)> = f
            .placements
            .lock()
            .iter()
            .map(|(p, n)| (vec![("policy", (*p).to_owned())], ConstCounter::new(*n)))
            .collect();
        family(
            encoder,
            "mvm_placements",
            "Jobs placed, by the scheduling policy in force",
            placements,
        )?;
        family(
            encoder,
            "mvm_checkpoints",
            "Checkpoints of running jobs recorded",
            [(Vec::new(), ConstCounter::new(f.checkpoints.load(Relaxed)))],
        )?;
        family(
            encoder,
            "mvm_checkpoint_bytes",
            "Bytes of the checkpoints recorded",
            [(
                Vec::new(),
                ConstCounter::new(f.checkpoint_bytes.load(Relaxed)),
            )],
        )?;
        family(
            encoder,
            "mvm_moves",
            "Parts of running jobs moved to another node (migrations, drains)",
            [(Vec::new(), ConstCounter::new(f.moves.load(Relaxed)))],
        )?;
        // Items and bytes by edge kind, over the jobs the log remembers (counted as their
        // parts report them).
        let by_kind = b.log.read(|s| {
            let mut m: BTreeMap<(String, String, &'static str), (u64, u64)> = BTreeMap::new();
            for j in s.jobs() {
                for t in &j.traffic {
                    let link = match (t.remote, t.direct, t.sealed) {
                        (false, _, _) => "local",
                        (true, false, _) => "stream",
                        (true, true, false) => "direct",
                        (true, true, true) => "sealed",
                    };
                    let e = m
                        .entry((t.kind.clone(), t.codec.clone(), link))
                        .or_default();
                    e.0 += t.items;
                    e.1 += t.bytes;
                }
            }
            m
        });
        let labels = |(kind, codec, link): &(String, String, &'static str)| -> Labels {
            vec![
                ("kind", kind.clone()),
                ("codec", codec.clone()),
                ("link", (*link).to_owned()),
            ]
        };
        family(
            encoder,
            "mvm_edge_items",
            "Items carried by the channels of the jobs in the log, by queue kind, codec and link (local, stream, direct)",
            by_kind
                .iter()
                .map(|(k, (items, _))| (labels(k), ConstCounter::new(*items))),
        )?;
        family(
            encoder,
            "mvm_edge_bytes",
            "Bytes carried by those channels, encoded",
            by_kind
                .iter()
                .map(|(k, (_, bytes))| (labels(k), ConstCounter::new(*bytes))),
        )?;
        let policies = b.policies();
        family(
            encoder,
            "mvm_policy_version",
            "The version of the policies in force",
            [(
                Vec::new(),
                ConstGauge::new(i64::try_from(policies.version).unwrap_or(i64::MAX)),
            )],
        )?;
        if let Some(s) = policies.engine.stats() {
            family(
                encoder,
                "mvm_policy_decisions",
                "Policy questions answered since the version in force was loaded, by answer",
                [
                    (
                        vec![("answer", "allow".to_owned())],
                        ConstCounter::new(s.allowed),
                    ),
                    (
                        vec![("answer", "deny".to_owned())],
                        ConstCounter::new(s.denied),
                    ),
                ],
            )?;
            family(
                encoder,
                "mvm_policy_cache",
                "Policy answers taken from the cache (hit) or asked of oso (miss)",
                [
                    (
                        vec![("result", "hit".to_owned())],
                        ConstCounter::new(s.cache_hits),
                    ),
                    (
                        vec![("result", "miss".to_owned())],
                        ConstCounter::new(s.cache_misses),
                    ),
                ],
            )?;
        }
        Ok(())
    }
}

/// A registry of `sources`' metrics.
pub(crate) fn registry(sources: Sources) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(sources));
    r
}

/// The largest request read (the request line and headers).
const MAX_REQUEST: usize = 8 << 10;

/// Serves `registry` on `listener` (`GET /metrics`) until the task is aborted.
pub(crate) async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    // The answers end with this task.
    let mut answers = tokio::task::JoinSet::new();
    loop {
        while answers.try_join_next().is_some() {}
        let Ok((conn, from)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        answers.spawn(async move {
            if let Err(e) = answer(conn, &registry).await {
                tracing::debug!(%from, error = %e, "a metrics request");
            }
        });
    }
}

/// Answers one request on `conn`, then closes it.
async fn answer(mut conn: tokio::net::TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (status, kind, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics")) => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "the metrics do not encode\n".into(),
                ),
            }
        }
        (Some("GET"), _) => ("404 Not Found", "text/plain", "only /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// Binds `addr` for [`serve`].
///
/// # Errors
/// It cannot be bound.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
