//! Replicas of a job log on real libp2p daemons (loopback TCP, certificates of one domain CA)
//! in one process: election, replication, a killed leader, a leader cut off from the others,
//! and a whole group restarted from its stores.

use crate::proto::PeerRequest;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_component::policy::{Principal, PrincipalKind};
use parking_lot::Mutex;

use super::state::{JobRecord, PartRecord, Resources};
use super::*;
use crate::net::NetConfig;
use crate::pki::{Ca, Credentials, Subject};
use crate::proto::{JobId, JobState, Request};

/// One replica: its daemon's network, its log, and the task that hands it messages.
struct Member {
    creds: Credentials,
    listen: Multiaddr,
    dir: PathBuf,
    net: Net,
    log: JobLog,
    pump: tokio::task::JoinHandle<()>,
    /// Peers whose messages this replica drops (a cut link), both ways when set on both sides.
    cut: Arc<Mutex<HashSet<PeerId>>>,
}

fn fast() -> LogConfig {
    LogConfig {
        heartbeat: Duration::from_millis(100),
        election_timeout: (Duration::from_millis(400), Duration::from_millis(800)),
        snapshot_every: 50,
    }
}

async fn start(creds: Credentials, listen: Multiaddr, dir: PathBuf) -> Member {
    let config = NetConfig {
        listen: vec![listen],
        request_timeout: Duration::from_secs(2),
        ..NetConfig::default()
    };
    let (net, mut inbound) = Net::start(&creds, &config).await.expect("net");
    let listen = net.addrs()[0].clone();
    let log = JobLog::open(&dir, net.clone(), &fast())
        .await
        .expect("open");
    let cut: Arc<Mutex<HashSet<PeerId>>> = Arc::default();
    let pump = tokio::spawn({
        let (log, cut) = (log.clone(), cut.clone());
        async move {
            while let Some(i) = inbound.recv().await {
                let Request::Peer(PeerRequest::Raft(rpc)) = i.request.clone() else {
                    continue;
                };
                if cut.lock().contains(&i.peer) {
                    continue; // dropped unanswered: the sender's call fails
                }
                let log = log.clone();
                tokio::spawn(async move {
                    let r = log
                        .serve(i.peer, &i.principal.clone(), "physics", rpc)
                        .await;
                    i.reply(r).await;
                });
            }
        }
    });
    Member {
        creds,
        listen,
        dir,
        net,
        log,
        pump,
        cut,
    }
}

impl Member {
    fn replica(&self) -> Replica {
        Replica::new(self.net.peer(), self.net.addrs())
    }

    /// Kills the replica: its log stops, and its swarm's sockets close.
    async fn kill(self) -> (Credentials, Multiaddr, PathBuf) {
        self.pump.abort();
        self.log.shutdown().await;
        (self.creds, self.listen, self.dir)
    }
}

async fn group(n: usize, dir: &Path) -> Vec<Member> {
    let ca = Ca::init(&dir.join("ca"), "physics", 30).expect("ca");
    let mut members = Vec::new();
    for i in 0..n {
        let subject = Subject {
            kind: PrincipalKind::Node,
            name: format!("sp{i}"),
            roles: vec!["superpeer".into()],
        };
        let creds = Credentials::ephemeral(&ca, &subject).expect("creds");
        let listen = "/ip4/127.0.0.1/tcp/0".parse().expect("addr");
        members.push(start(creds, listen, dir.join(format!("sp{i}"))).await);
    }
    let replicas: Vec<Replica> = members.iter().map(Member::replica).collect();
    for m in &members {
        m.log.initialize(&replicas).await.expect("initialize");
    }
    members
}

/// A job of its own id, named `name`.
fn submit(name: &str) -> Command {
    Command::Submit(Box::new(JobRecord {
        id: JobId::new(name, 1, 0),
        name: "j".into(),
        owner_cert: None,
        owner: Principal {
            kind: PrincipalKind::User,
            name: "alice".into(),
            domain: "physics".into(),
            roles: Vec::new(),
        },
        resources: Resources {
            vcpus: 1,
            memory_mib: 0,
            vertices: 1,
        },
        image: "host".into(),
        priority: 0,
        submitted_ms: 1,
        state: JobState::Preparing,
        held: false,
        parts: vec![PartRecord {
            bid: None,
            guest: None,
            node: PeerId::random(),
            vertices: vec!["v".into()],
            done: false,
        }],
        outputs: Vec::new(),
        traffic: Vec::new(),
        edges: Vec::new(),
        received: Vec::new(),
        ended: None,
        submission: None,
        version: 0,
        retries: 0,
        attempt: 0,
        restarts: Vec::new(),
        checkpoint: None,
        checkpoints: Vec::new(),
        moves: Vec::new(),
        log_bytes: 0,
        logs: Vec::new(),
        files: None,
        written: Vec::new(),
        written_attempt: 0,
        array: None,
        after: Vec::new(),
        after_ok: Vec::new(),
        estimate_ms: None,
        started_ms: None,
        agreement: false,
        bid: None,
        channels: Vec::new(),
    }))
}

/// The member that leads, once all the given ones agree on one.
async fn leader(members: &[&Member]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen: Vec<Option<PeerId>> = members.iter().map(|m| m.log.leader()).collect();
        if let Some(Some(l)) = seen.first()
            && seen.iter().all(|s| *s == Some(*l))
            && let Some(i) = members.iter().position(|m| m.net.peer() == *l)
        {
            return i;
        }
        assert!(Instant::now() < deadline, "no leader agreed on: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `m` has applied entry `index`.
async fn caught_up(m: &Member, index: u64) {
    tokio::time::timeout(
        Duration::from_secs(10),
        m.log.changed(index.saturating_sub(1)),
    )
    .await
    .expect("the replica catches up");
}

fn jobs(m: &Member) -> Vec<JobId> {
    m.log.read(|s| s.jobs().map(|j| j.id.clone()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_one_leader_and_apply_the_same_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members = group(3, dir.path()).await;
    let all: Vec<&Member> = members.iter().collect();
    let l = leader(&all).await;
    for i in 0..60 {
        let applied = members[l].log.propose(submit(&format!("j-{i}"))).await;
        assert_eq!(applied.expect("propose"), Applied::Done);
    }
    // A command that does not fit is refused in the same way everywhere, and changes nothing.
    let again = members[l]
        .log
        .propose(submit("j-0"))
        .await
        .expect("propose");
    assert!(matches!(again, Applied::Refused(w) if w.to_string().contains("exists already")));
    let index = members[l].log.applied();
    for m in &members {
        caught_up(m, index).await;
        assert_eq!(jobs(m).len(), 60, "{}", m.net.peer());
    }
    // A follower takes no command, and names the leader.
    let f = (l + 1) % 3;
    match members[f].log.propose(submit("x")).await {
        Err(LogError::NotLeader { leader }) => assert_eq!(leader, Some(members[l].net.peer())),
        other => panic!("a follower took a command: {other:?}"),
    }
    assert_eq!(members[f].log.replicas().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_with_every_committed_job_and_catches_up_on_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut members = group(3, dir.path()).await;
    let l = leader(&members.iter().collect::<Vec<_>>()).await;
    for i in 0..80 {
        members[l]
            .log
            .propose(submit(&format!("before-{i}")))
            .await
            .expect("propose");
    }
    let dead = members.remove(l);
    let killed = Instant::now();
    let (creds, listen, store) = dead.kill().await;
    let rest: Vec<&Member> = members.iter().collect();
    let n = leader(&rest).await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the next leader took {took:?}"
    );
    eprintln!("a new leader after {took:?}");
    assert_eq!(jobs(&members[n]).len(), 80, "a committed job was lost");
    members[n]
        .log
        .propose(submit("after"))
        .await
        .expect("the new leader commits");
    // The old leader comes back on its address with its store, and catches up as a follower.
    let back = start(creds, listen, store).await;
    let index = members[n].log.applied();
    caught_up(&back, index).await;
    assert_eq!(jobs(&back).len(), 81);
    assert!(jobs(&back).contains(&JobId::new("after", 1, 0)));
    assert_ne!(back.log.leader(), Some(back.net.peer()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_others_commits_nothing_while_they_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members = group(3, dir.path()).await;
    let l = leader(&members.iter().collect::<Vec<_>>()).await;
    members[l]
        .log
        .propose(submit("before"))
        .await
        .expect("propose");
    // Cut every link of the leader, both ways.
    let old = members[l].net.peer();
    for (i, m) in members.iter().enumerate() {
        if i == l {
            m.cut.lock().extend(members.iter().map(|o| o.net.peer()));
        } else {
            m.cut.lock().insert(old);
        }
    }
    // The cut-off leader cannot commit; the two others elect a leader of their own and can.
    let lonely = tokio::time::timeout(
        Duration::from_secs(3),
        members[l].log.propose(submit("lonely")),
    )
    .await;
    assert!(
        !matches!(lonely, Ok(Ok(Applied::Done))),
        "a replica cut off alone committed a job: {lonely:?}"
    );
    let rest: Vec<&Member> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != l)
        .map(|(_, m)| m)
        .collect();
    let n = leader(&rest).await;
    rest[n]
        .log
        .propose(submit("majority"))
        .await
        .expect("the majority commits");
    // Healed: the old leader follows the new one, and has the majority's job, not its own.
    for m in &members {
        m.cut.lock().clear();
    }
    let index = rest[n].log.applied();
    caught_up(&members[l], index).await;
    let seen = jobs(&members[l]);
    assert!(seen.contains(&JobId::new("majority", 1, 0)), "{seen:?}");
    assert!(!seen.contains(&JobId::new("lonely", 1, 0)), "{seen:?}");
    let all: Vec<&Member> = members.iter().collect();
    assert_ne!(members[leader(&all).await].net.peer(), old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_group_restarted_keeps_its_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members = group(3, dir.path()).await;
    let l = leader(&members.iter().collect::<Vec<_>>()).await;
    // More entries than a snapshot covers, so that the restart reads a snapshot and a log.
    for i in 0..120 {
        members[l]
            .log
            .propose(submit(&format!("j-{i}")))
            .await
            .expect("propose");
    }
    let index = members[l].log.applied();
    for m in &members {
        caught_up(m, index).await;
    }
    let mut stopped = Vec::new();
    for m in members {
        stopped.push(m.kill().await);
    }
    let mut members = Vec::new();
    for (creds, listen, store) in stopped {
        members.push(start(creds, listen, store).await);
    }
    let l = leader(&members.iter().collect::<Vec<_>>()).await;
    members[l]
        .log
        .propose(submit("after"))
        .await
        .expect("propose");
    let index = members[l].log.applied();
    for m in &members {
        caught_up(m, index).await;
        assert_eq!(jobs(m).len(), 121, "{}", m.net.peer());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_one_commits_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members = group(1, dir.path()).await;
    assert_eq!(leader(&[&members[0]]).await, 0);
    assert_eq!(
        members[0]
            .log
            .propose(submit("solo"))
            .await
            .expect("propose"),
        Applied::Done
    );
    assert_eq!(jobs(&members[0]), ["solo-1-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_replicas_of_the_domain_may_send_log_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members = group(1, dir.path()).await;
    let log = &members[0].log;
    let user = Principal {
        kind: PrincipalKind::User,
        name: "mallory".into(),
        domain: "physics".into(),
        roles: Vec::new(),
    };
    let vote = RaftRpc::Vote(Bytes::from_static(b"\xa0"));
    let r = log
        .serve(PeerId::random(), &user, "physics", vote.clone())
        .await;
    assert!(matches!(r, Response::Error(f) if f.kind == FailureKind::Refused));
    let stranger = Principal {
        kind: PrincipalKind::Node,
        ..user
    };
    let r = log
        .serve(PeerId::random(), &stranger, "physics", vote)
        .await;
    assert!(
        matches!(&r, Response::Error(f) if f.message.contains("not a replica")),
        "{r:?}"
    );
    let garbage = RaftRpc::Append(Bytes::from_static(b"\xff\x00"));
    let r = log
        .serve(members[0].net.peer(), &stranger, "physics", garbage)
        .await;
    assert!(
        matches!(&r, Response::Error(f) if f.kind == FailureKind::Input),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement"]
async fn measure_propose_throughput() {
    for n in [1usize, 3] {
        let dir = tempfile::tempdir().expect("tempdir");
        let members = group(n, dir.path()).await;
        let l = leader(&members.iter().collect::<Vec<_>>()).await;
        let log = members[l].log.clone();
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for c in 0..64 {
            let log = log.clone();
            set.spawn(async move {
                for i in 0..100 {
                    log.propose(submit(&format!("c{c}-{i}")))
                        .await
                        .expect("propose");
                }
            });
        }
        while set.join_next().await.is_some() {}
        let t = start.elapsed();
        eprintln!(
            "{n} replicas: 6400 proposals in {t:?}: {:.0}/s",
            6400.0 / t.as_secs_f64()
        );
    }
}
