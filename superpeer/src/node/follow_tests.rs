//! The following machine on its own, with time given and answers made up.

use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

use super::{Effect, Follow, Heard, Input};
use crate::proto::{Failure, FailureKind, Member, Response};

const LOST: Duration = Duration::from_secs(3);

fn addr(port: u16) -> Multiaddr {
    format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr")
}

fn member(peer: PeerId, port: u16) -> Member {
    Member {
        peer,
        addrs: vec![
            format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
                .parse()
                .expect("an address"),
        ],
        eligible: true,
    }
}

fn beat(known: bool, members: Vec<Member>, stop: &[&str]) -> Heard {
    Heard::Answer(Box::new(Response::Heartbeat {
        known,
        members,
        stop: stop.iter().map(|s| ((*s).into(), u32::MAX)).collect(),
        charged: None,
        broke: Vec::new(),
    }))
}

fn registered(members: Vec<Member>) -> Heard {
    Heard::Answer(Box::new(Response::Registered {
        heartbeat_ms: 1000,
        members,
    }))
}

fn send(to: PeerId, port: u16, register: bool) -> Effect {
    Effect::Send {
        to,
        addrs: vec![addr(port)],
        register,
    }
}

fn looks(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Look { .. }))
}

#[test]
fn a_node_registers_then_beats_and_registers_again_when_forgotten() {
    let t0 = Instant::now();
    let sp = PeerId::random();
    let mut f = Follow::new(Some((sp, vec![addr(1)])), LOST, t0);
    assert_eq!(f.on(t0, Input::Tick), vec![send(sp, 1, true)]);
    let out = f.on(
        t0,
        Input::Heard {
            from: sp,
            heard: registered(vec![member(sp, 1)]),
        },
    );
    assert_eq!(out, vec![Effect::Members(vec![member(sp, 1)])]);
    assert_eq!(f.on(t0, Input::Tick), vec![send(sp, 1, false)]);
    // The super-peer restarted and forgot this node; and it names a job to stop.
    let out = f.on(
        t0,
        Input::Heard {
            from: sp,
            heard: beat(false, vec![member(sp, 1)], &["j-1-1"]),
        },
    );
    assert!(out.contains(&Effect::Stop {
        from: sp,
        job: "j-1-1".into(),
        upto: u32::MAX,
    }));
    assert!(!looks(&out), "it still leads: it lists itself first");
    assert_eq!(f.on(t0, Input::Tick), vec![send(sp, 1, true)]);
}

#[test]
fn silence_for_lost_after_sends_the_node_looking_and_it_follows_what_it_finds_at_once() {
    let t0 = Instant::now();
    let (sp, other) = (PeerId::random(), PeerId::random());
    let mut f = Follow::new(Some((sp, vec![addr(1)])), LOST, t0);
    f.on(
        t0,
        Input::Heard {
            from: sp,
            heard: registered(vec![member(sp, 1), member(other, 2)]),
        },
    );
    let soon = t0 + LOST / 2;
    assert!(!looks(&f.on(
        soon,
        Input::Heard {
            from: sp,
            heard: Heard::Silent
        }
    )));
    let late = t0 + LOST;
    let out = f.on(
        late,
        Input::Heard {
            from: sp,
            heard: Heard::Silent,
        },
    );
    let Some(Effect::Look { known }) = out.into_iter().find(|e| matches!(e, Effect::Look { .. }))
    else {
        panic!("no look after lost_after of silence");
    };
    assert_eq!(known.len(), 2, "both replicas' addresses: {known:?}");
    let out = f.on(late, Input::Found(Some((other, vec![addr(2)]))));
    assert_eq!(
        out,
        vec![Effect::Follow((other, vec![addr(2)])), send(other, 2, true)],
        "it follows the leader and registers there at once"
    );
    // A late answer of the old one changes nothing.
    assert!(
        f.on(
            late,
            Input::Heard {
                from: sp,
                heard: Heard::Refused
            }
        )
        .is_empty()
    );
    assert_eq!(f.on(late, Input::Tick), vec![send(other, 2, true)]);
}

#[test]
fn a_refused_connection_looks_at_once_only_when_other_replicas_are_known() {
    let t0 = Instant::now();
    let (sp, other) = (PeerId::random(), PeerId::random());
    let mut alone = Follow::new(Some((sp, vec![addr(1)])), LOST, t0);
    alone.on(
        t0,
        Input::Heard {
            from: sp,
            heard: registered(vec![member(sp, 1)]),
        },
    );
    assert!(!looks(&alone.on(
        t0,
        Input::Heard {
            from: sp,
            heard: Heard::Refused
        }
    )));
    let mut group = Follow::new(Some((sp, vec![addr(1)])), LOST, t0);
    group.on(
        t0,
        Input::Heard {
            from: sp,
            heard: registered(vec![member(sp, 1), member(other, 2)]),
        },
    );
    assert!(looks(&group.on(
        t0,
        Input::Heard {
            from: sp,
            heard: Heard::Refused
        }
    )));
}

#[test]
fn a_replica_that_does_not_lead_sends_the_node_to_the_leader_it_names() {
    let t0 = Instant::now();
    let (sp, leader) = (PeerId::random(), PeerId::random());
    let mut f = Follow::new(Some((sp, vec![addr(1)])), LOST, t0);
    let out = f.on(
        t0,
        Input::Heard {
            from: sp,
            heard: beat(false, vec![member(leader, 2), member(sp, 1)], &[]),
        },
    );
    assert!(looks(&out), "it names another leader first");
    let mut g = Follow::new(Some((sp, vec![addr(1)])), LOST, t0);
    let unavailable = Heard::Answer(Box::new(Response::Error(Failure::new(
        FailureKind::Unavailable,
        "not the leader",
    ))));
    assert!(looks(&g.on(
        t0,
        Input::Heard {
            from: sp,
            heard: unavailable
        }
    )));
    // Found nothing, or itself: it stays, and asks again at the next tick.
    assert!(g.on(t0, Input::Found(None)).is_empty());
    assert!(g.on(t0, Input::Found(Some((sp, vec![addr(1)])))).is_empty());
    assert_eq!(g.on(t0, Input::Tick), vec![send(sp, 1, true)]);
}

#[test]
fn a_node_that_follows_nobody_does_nothing() {
    let t0 = Instant::now();
    let mut f = Follow::new(None, LOST, t0);
    assert!(f.on(t0, Input::Tick).is_empty());
    assert!(
        f.on(
            t0 + LOST * 2,
            Input::Heard {
                from: PeerId::random(),
                heard: Heard::Silent
            }
        )
        .is_empty()
    );
}
