//! `mvm top`: a live terminal view (ratatui) of a group as its leading super-peer sees it —
//! its nodes (load, memory, vertices, warm guests), its jobs (state, progress, items per
//! second) and the deepest queues of the running jobs, from the nodes' heartbeats — refreshed
//! every `--interval`; `q` (or Esc, or Ctrl-C) quits. It draws on the terminal it runs in, so
//! it works over SSH.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mvm_superpeer::client::Client;
use mvm_superpeer::proto::{GroupInfo, JobStatus, NodeView};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};

use super::job::{BrokerArg, connect, runtime};
use crate::exit::{Failure, USAGE};

/// Arguments of `mvm top`.
#[derive(Debug, clap::Args)]
pub(crate) struct TopArgs {
    /// How often to ask the super-peer (e.g. `1s`, `500ms`; at least 100ms).
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    interval: String,
    #[command(flatten)]
    broker: BrokerArg,
}

/// The most rows of the queues table.
const QUEUES: usize = 10;

/// What the view shows, and what it keeps to compute rates.
#[derive(Default)]
struct View {
    group: Option<GroupInfo>,
    jobs: Vec<JobStatus>,
    /// Per job: items its queues had carried at the last sample, when, and the rate since.
    rates: HashMap<String, (u64, Instant, f64)>,
    /// Why the last refresh failed, if it did.
    error: Option<String>,
    /// When the last refresh was (UTC, time of day).
    at: String,
}

/// The time of day now, UTC (`HH:MM:SS UTC`).
fn time_of_day() -> String {
    let t = super::logs::rfc3339(mvm_component::runtime::logs::now_ms());
    format!("{} UTC", t.get(11..19).unwrap_or_default())
}

impl View {
    /// Takes a new sample of the group and its jobs.
    fn update(&mut self, group: GroupInfo, jobs: Vec<JobStatus>, now: Instant) {
        let mut totals: HashMap<&str, u64> = HashMap::new();
        for n in group.nodes.iter().filter(|n| !n.lost) {
            for t in &n.traffic {
                *totals.entry(t.job.as_str()).or_default() += t.items;
            }
        }
        let mut rates = HashMap::new();
        for (job, items) in totals {
            let sample = match self.rates.get(job) {
                // No heartbeat since: the sample and its rate stay until one says otherwise.
                Some(&kept) if items == kept.0 => kept,
                Some(&(before, at, _)) if items > before => {
                    let dt = now.duration_since(at).as_secs_f64();
                    let rate = if dt > 0.0 {
                        (items - before) as f64 / dt
                    } else {
                        0.0
                    };
                    (items, now, rate)
                }
                _ => (items, now, 0.0),
            };
            rates.insert(job.to_owned(), sample);
        }
        self.rates = rates;
        self.group = Some(group);
        self.jobs = jobs;
        self.error = None;
        self.at = time_of_day();
    }

    /// Jobs to show: those not ended, by id, then the most recent ended ones.
    fn shown_jobs(&self) -> Vec<&JobStatus> {
        let mut live: Vec<&JobStatus> = self.jobs.iter().filter(|j| !j.state.is_final()).collect();
        live.sort_by_key(|j| j.job.to_string());
        let mut ended: Vec<&JobStatus> = self.jobs.iter().filter(|j| j.state.is_final()).collect();
        ended.sort_by_key(|j| std::cmp::Reverse(j.job.to_string()));
        live.extend(ended.into_iter().take(5));
        live
    }
}

fn mib(b: u64) -> String {
    format!("{} MiB", b >> 20)
}

fn node_row(n: &NodeView) -> Row<'static> {
    let warm: u32 = n.warm.values().sum();
    Row::new(vec![
        Cell::from(n.name.clone()),
        Cell::from(if n.lost { "lost" } else { "up" }),
        Cell::from(format!("{:.2}", n.load)),
        Cell::from(format!(
            "{} / {}",
            mib(n.free_memory_bytes),
            mib(n.memory_bytes)
        )),
        Cell::from(format!("{} / {}", n.running, n.slots)),
        Cell::from(n.cpus.to_string()),
        Cell::from(warm.to_string()),
    ])
}

fn draw(f: &mut ratatui::Frame<'_>, v: &View) {
    let head = Style::default().add_modifier(Modifier::BOLD);
    let nodes: Vec<&NodeView> = v.group.iter().flat_map(|g| g.nodes.iter()).collect();
    let jobs = v.shown_jobs();
    let [top, nodes_area, jobs_area, queues_area, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(u16::try_from(nodes.len().min(12)).unwrap_or(12) + 3),
        Constraint::Min(5),
        Constraint::Length(u16::try_from(QUEUES).unwrap_or(10) + 3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let running = v.jobs.iter().filter(|j| !j.state.is_final()).count();
    let title = match &v.group {
        Some(g) => format!(
            "mvm top — group {}, broker {}, {} nodes, {} jobs not ended, {} other groups — {}",
            g.group,
            g.broker
                .map_or_else(|| "?".into(), |p| short(&p.to_string())),
            g.nodes.len(),
            running,
            g.groups.len(),
            v.at,
        ),
        None => "mvm top — asking the super-peer…".into(),
    };
    f.render_widget(Paragraph::new(Line::from(title).style(head)), top);

    let widths = [
        Constraint::Length(14),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(22),
        Constraint::Length(10),
        Constraint::Length(5),
        Constraint::Length(5),
    ];
    let table = Table::new(nodes.iter().map(|n| node_row(n)), widths)
        .header(
            Row::new([
                "node",
                "state",
                "load",
                "memory free / all",
                "vertices",
                "cpus",
                "warm",
            ])
            .style(head),
        )
        .block(Block::default().borders(Borders::ALL).title("nodes"));
    f.render_widget(table, nodes_area);

    let rows = jobs.iter().map(|j| {
        let rate = v
            .rates
            .get(&j.job.to_string())
            .map_or(0.0, |r| if j.state.is_final() { 0.0 } else { r.2 });
        Row::new(vec![
            Cell::from(j.job.to_string()),
            Cell::from(j.name.clone()),
            Cell::from(j.owner.clone()),
            Cell::from(format!("{:?}", j.state).to_lowercase()),
            Cell::from(format!("{}/{}", j.vertices_done, j.vertices)),
            Cell::from(format!("{rate:.0}")),
            Cell::from(format!("{:.1} s", j.wall_ms as f64 / 1000.0)),
        ])
    });
    let widths = [
        Constraint::Length(16),
        Constraint::Length(16),
        Constraint::Length(16),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(10),
    ];
    let table = Table::new(rows, widths)
        .header(
            Row::new([
                "job", "name", "owner", "state", "vertices", "items/s", "wall",
            ])
            .style(head),
        )
        .block(Block::default().borders(Borders::ALL).title("jobs"));
    f.render_widget(table, jobs_area);

    let mut queues: Vec<(&str, &mvm_superpeer::proto::QueueSample)> = nodes
        .iter()
        .filter(|n| !n.lost)
        .flat_map(|n| n.queues.iter().map(move |q| (n.name.as_str(), q)))
        .collect();
    queues.sort_by_key(|q| std::cmp::Reverse(q.1.depth));
    let rows = queues.into_iter().take(QUEUES).map(|(node, q)| {
        Row::new(vec![
            Cell::from(node.to_owned()),
            Cell::from(q.job.clone()),
            Cell::from(q.queue.clone()),
            Cell::from(q.depth.to_string()),
            Cell::from(q.depth_bytes.to_string()),
        ])
    });
    let widths = [
        Constraint::Length(14),
        Constraint::Length(16),
        Constraint::Length(24),
        Constraint::Length(8),
        Constraint::Length(10),
    ];
    let table = Table::new(rows, widths)
        .header(Row::new(["node", "job", "queue", "depth", "bytes"]).style(head))
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title("deepest queues"),
        );
    f.render_widget(table, queues_area);

    let footer = match &v.error {
        Some(e) => format!("q quits — the last refresh failed: {e}"),
        None => "q quits".into(),
    };
    f.render_widget(Paragraph::new(footer), foot);
}

/// The first and last characters of a long id.
fn short(id: &str) -> String {
    if id.len() <= 16 {
        return id.to_owned();
    }
    format!("{}…{}", &id[..8], &id[id.len() - 6..])
}

/// Whether a key ends the view.
fn quits(e: &Event) -> bool {
    match e {
        Event::Key(k) if k.kind == KeyEventKind::Press => {
            matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL))
        }
        _ => false,
    }
}

pub(crate) fn top(args: TopArgs) -> Result<(), Failure> {
    let interval = mvm_component::profile::parse_duration(&args.interval)
        .filter(|d| *d >= Duration::from_millis(100))
        .ok_or_else(|| Failure {
            code: USAGE,
            error: anyhow::anyhow!(
                "--interval must be a duration of at least 100ms (e.g. \"1s\"), not '{}'",
                args.interval
            ),
        })?;
    let rt = runtime()?;
    let client = rt.block_on(connect(&args.broker))?;
    let mut terminal = ratatui::try_init().map_err(Failure::failed)?;
    let r = run(&rt, &client, &mut terminal, interval);
    ratatui::restore();
    r
}

fn run(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    terminal: &mut ratatui::DefaultTerminal,
    interval: Duration,
) -> Result<(), Failure> {
    let mut view = View::default();
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            let (group, jobs) = rt.block_on(async {
                tokio::join!(
                    tokio::time::timeout(interval.max(Duration::from_secs(2)), client.group()),
                    tokio::time::timeout(interval.max(Duration::from_secs(2)), client.status(None)),
                )
            });
            match (group, jobs) {
                (Ok(Ok(g)), Ok(Ok(j))) => view.update(g, j, Instant::now()),
                (Ok(Err(e)), _) | (_, Ok(Err(e))) => view.error = Some(e.message),
                _ => view.error = Some("no answer in time".into()),
            }
            next = Instant::now() + interval;
        }
        terminal.draw(|f| draw(f, &view)).map_err(Failure::failed)?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait.min(Duration::from_millis(200))).map_err(Failure::failed)? {
            let e = event::read().map_err(Failure::failed)?;
            if quits(&e) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_superpeer::proto::JobTraffic;

    fn node(name: &str, items: u64) -> NodeView {
        NodeView {
            peer: libp2p::PeerId::random(),
            name: name.into(),
            lost: false,
            vertices: 0,
            running: 0,
            slots: 4,
            warm: Default::default(),
            cpus: 2,
            memory_bytes: 1 << 30,
            free_memory_bytes: 1 << 29,
            load: 0.5,
            queues: Vec::new(),
            traffic: vec![JobTraffic {
                job: "j-1-1".into(),
                items,
                bytes: items * 8,
            }],
            probes: Vec::new(),
            price: 0,
            bidders: 0,
            floor: 0,
        }
    }

    fn group(nodes: Vec<NodeView>) -> GroupInfo {
        GroupInfo {
            group: "g".into(),
            broker: None,
            broker_addrs: Vec::new(),
            is_broker: true,
            nodes,
            groups: Vec::new(),
            scheduling: None,
        }
    }

    #[test]
    fn a_jobs_rate_is_what_its_queues_on_every_node_carried_between_heartbeats() {
        let mut v = View::default();
        let t0 = Instant::now();
        v.update(group(vec![node("a", 100), node("b", 50)]), Vec::new(), t0);
        assert_eq!(v.rates["j-1-1"].2, 0.0, "no rate from one sample");
        let t1 = t0 + Duration::from_secs(2);
        v.update(group(vec![node("a", 300), node("b", 250)]), Vec::new(), t1);
        assert_eq!(v.rates["j-1-1"].2, 200.0);
        // No heartbeat since: the rate stays.
        v.update(
            group(vec![node("a", 300), node("b", 250)]),
            Vec::new(),
            t1 + Duration::from_secs(1),
        );
        assert_eq!(v.rates["j-1-1"].2, 200.0);
    }
}
