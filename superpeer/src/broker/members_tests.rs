//! The membership machine on its own, with time given, not waited for.

use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{Effect, Input, Members, SUMMARY_TTL, TAKEOVER_GRACE};
use crate::proto::{GroupSummary, NodeInfo, NodeLoad};

const LOST: Duration = Duration::from_secs(3);

fn info(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        group: "g".into(),
        domain: "physics".into(),
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".parse().expect("an address")],
        cpus: 2,
        memory_bytes: 1 << 30,
        arch: "x86_64".into(),
        images: Vec::new(),
        slots: 4,
        eligible: false,
        load: NodeLoad::default(),
        guest_of: None,
        fetches_images: false,
    }
}

fn beat(peer: PeerId, unlisted: &[&str]) -> Input {
    Input::Heartbeat {
        peer,
        load: NodeLoad::default(),
        unlisted: unlisted.iter().map(|j| (*j).into()).collect(),
    }
}

fn lost(peer: PeerId, name: Option<&str>) -> Effect {
    Effect::Lost {
        peer,
        name: name.map(str::to_owned),
    }
}

#[test]
fn a_node_heard_within_lost_after_stays_and_a_silent_one_is_lost_once() {
    let t0 = Instant::now();
    let (a, b) = (PeerId::random(), PeerId::random());
    let mut m = Members::new(LOST);
    m.on(
        t0,
        Input::Register {
            peer: a,
            info: Box::new(info("a")),
        },
    );
    m.on(
        t0,
        Input::Register {
            peer: b,
            info: Box::new(info("b")),
        },
    );
    assert_eq!(m.live().count(), 2);
    assert_eq!(m.addrs(&a).len(), 1);
    assert!(m.label(&a).starts_with("a ("), "{}", m.label(&a));
    // `a` beats every second; `b` falls silent.
    for s in 1..=3 {
        let at = t0 + Duration::from_secs(s);
        assert!(m.on(at, beat(a, &[])).is_empty());
        assert!(m.on(at, Input::Tick).is_empty(), "nobody lost at {s} s");
    }
    let late = t0 + LOST + Duration::from_millis(1);
    assert_eq!(m.on(late, Input::Tick), vec![lost(b, Some("b"))]);
    assert!(m.on(late, Input::Tick).is_empty(), "lost only once");
    // A lost node's heartbeat is not taken: it must register again, and is live when it has.
    assert_eq!(m.on(late, beat(b, &[])), vec![Effect::Unknown(b)]);
    assert_eq!(m.live().count(), 1);
    assert_eq!(m.all().count(), 2, "a lost node stays listed");
    m.on(
        late,
        Input::Register {
            peer: b,
            info: Box::new(info("b")),
        },
    );
    assert!(m.on(late, beat(b, &[])).is_empty());
    assert_eq!(m.live().count(), 2);
}

#[test]
fn a_heartbeat_from_a_node_never_registered_asks_it_to_register() {
    let p = PeerId::random();
    let mut m = Members::new(LOST);
    assert_eq!(m.on(Instant::now(), beat(p, &[])), vec![Effect::Unknown(p)]);
    assert_eq!(m.label(&p), p.to_string());
    assert!(m.member(&p).addrs.is_empty());
}

#[test]
fn after_a_takeover_a_node_holding_parts_has_the_grace_to_register() {
    let t0 = Instant::now();
    let (slow, never, known) = (PeerId::random(), PeerId::random(), PeerId::random());
    let mut m = Members::new(LOST);
    m.on(
        t0,
        Input::Register {
            peer: known,
            info: Box::new(info("k")),
        },
    );
    m.on(
        t0,
        Input::TookOver {
            holding: vec![slow, never, known],
        },
    );
    // Longer than lost_after, within the grace: nobody is lost yet (`known` beats).
    let mid = t0 + LOST * 2;
    m.on(mid, beat(known, &[]));
    assert!(m.on(mid, Input::Tick).is_empty());
    m.on(
        mid,
        Input::Register {
            peer: slow,
            info: Box::new(info("s")),
        },
    );
    let end = t0 + LOST * TAKEOVER_GRACE + Duration::from_millis(1);
    m.on(end, beat(known, &[]));
    m.on(end, beat(slow, &[]));
    assert_eq!(m.on(end, Input::Tick), vec![lost(never, None)]);
}

#[test]
fn a_part_unlisted_for_lost_after_has_vanished_and_one_listed_again_has_not() {
    let t0 = Instant::now();
    let n = PeerId::random();
    let mut m = Members::new(LOST);
    m.on(
        t0,
        Input::Register {
            peer: n,
            info: Box::new(info("n")),
        },
    );
    m.on(t0, beat(n, &["j1-1-1", "j2-1-1"]));
    let at = t0 + Duration::from_secs(2);
    m.on(at, beat(n, &["j1-1-1"])); // j2 is listed again
    assert!(m.on(at, Input::Tick).is_empty());
    let later = t0 + LOST + Duration::from_millis(1);
    m.on(later, beat(n, &["j1-1-1", "j2-1-1"])); // j2 unlisted anew: its clock starts now
    assert_eq!(
        m.on(later, Input::Tick),
        vec![Effect::Vanished {
            job: "j1-1-1".into(),
            peer: n,
            name: "n".into()
        }]
    );
    assert!(m.on(later, Input::Tick).is_empty(), "reported once");
}

#[test]
fn group_summaries_expire_and_this_groups_own_is_left_out() {
    let t0 = Instant::now();
    let summary = |broker: PeerId, group: &str| GroupSummary {
        group: group.into(),
        domain: "physics".into(),
        broker,
        addrs: Vec::new(),
        nodes: 1,
        free_slots: 1,
        images: Vec::new(),
        archs: Vec::new(),
        hosts: Vec::new(),
        crl: None,
    };
    let mut m = Members::new(LOST);
    let (sp_a, sp_b, me) = (PeerId::random(), PeerId::random(), PeerId::random());
    m.on(t0, Input::Heard(summary(sp_b, "b")));
    m.on(t0, Input::Heard(summary(sp_a, "a")));
    m.on(t0, Input::Heard(summary(me, "mine")));
    let names: Vec<String> = m.groups(t0, &me).into_iter().map(|g| g.group).collect();
    assert_eq!(names, ["a", "b"]);
    let later = t0 + SUMMARY_TTL;
    m.on(later, Input::Heard(summary(sp_a, "a")));
    assert_eq!(m.groups(later, &me).len(), 1, "b's summary is too old");
    m.on(later, Input::Tick);
    assert_eq!(m.groups(later, &me).len(), 1);
}
