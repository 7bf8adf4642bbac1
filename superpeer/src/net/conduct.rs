//! How authenticated peers behave: what a well-behaved peer never does (a frame over the size
//! limit, a frame that does not arrive, one that is not a message of the protocol, more
//! streams than it may hold, answers it does not read, more requests than its quota) is an
//! offence; a peer with
//! [`STRIKES`] offences within [`STRIKE_WINDOW`] is cut off: its connections are closed and
//! refused, both ways, for [`NetConfig::block_for`](super::NetConfig::block_for), with a log
//! line that says who it was and what it did, and a count per offence for the metrics.
//!
//! One offence is not enough: a peer of another version may send one message this daemon
//! cannot read, and a link may stall once.
//!
//! Requests are shaped to a quota per peer (a token bucket of
//! [`NetConfig::request_rate`](super::NetConfig::request_rate) a second for users, ten times
//! that for daemons, two seconds deep): a request over it waits, unread with the rest of its
//! stream, until the bucket has a token again, so what a peer costs the daemon is bounded by
//! its quota whatever it sends (and by the control streams' requests in flight). A peer held
//! back so for [`FLOOD_EVERY`] is a flood offence, counted again every [`FLOOD_EVERY`] that it
//! stays over: one that keeps its quota full for [`STRIKES`] times that (plus the bucket's two
//! seconds) is cut off. A user who needs more (a benchmark's client) is given a higher quota
//! by the daemon's `--request-rate`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mvm_component::policy::Principal;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::Command;

/// Offences within [`STRIKE_WINDOW`] that cut a peer off.
pub const STRIKES: usize = 3;

/// How long an offence counts.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(60);

/// How many seconds of its request quota a peer may use at once (the bucket's depth).
const BURST_SECS: f64 = 2.0;

/// How long a peer held back by its quota makes one flood offence.
pub const FLOOD_EVERY: Duration = Duration::from_secs(3);

/// How many times a user's quota a daemon (a node or super-peer) has.
const DAEMON_QUOTA: f64 = 10.0;

/// What an authenticated peer did that a well-behaved one never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Offence {
    /// A frame over the size limit.
    Oversized,
    /// A frame begun and not ended at the least rate (a slow loris, or an endless frame).
    SlowFrame,
    /// A frame that is not a message of the protocol.
    Malformed,
    /// More control streams open at once than a peer may hold.
    TooManyStreams,
    /// Answers not read at the least rate (a slow loris on the other side).
    SlowReader,
    /// Requests held back by its quota, for [`FLOOD_EVERY`].
    Flood,
}

impl Offence {
    /// Every offence.
    pub const ALL: [Offence; 6] = [
        Offence::Oversized,
        Offence::SlowFrame,
        Offence::Malformed,
        Offence::TooManyStreams,
        Offence::SlowReader,
        Offence::Flood,
    ];

    /// Its name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Offence::Oversized => "oversized-frame",
            Offence::SlowFrame => "slow-frame",
            Offence::Malformed => "malformed-frame",
            Offence::TooManyStreams => "too-many-streams",
            Offence::SlowReader => "slow-reader",
            Offence::Flood => "flood",
        }
    }
}

impl std::fmt::Display for Offence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A peer cut off, as the daemon's status and metrics show it.
#[derive(Debug, Clone)]
pub struct CutOff {
    /// The peer.
    pub peer: PeerId,
    /// Who its certificate said it was.
    pub principal: Principal,
    /// The offence that cut it off.
    pub offence: Offence,
    /// When its block ends.
    pub until: Instant,
}

/// One peer's record.
#[derive(Debug)]
struct Record {
    /// Its offences within the window, oldest first.
    strikes: VecDeque<Instant>,
    /// Requests it may still make now (a token bucket, refilled at the quota).
    tokens: f64,
    /// When the bucket was last refilled.
    refilled: Instant,
    /// When it was first held back by its quota, in the stretch of being held back it is in
    /// (or when a flood was last counted), if it is in one.
    held_since: Option<Instant>,
}

impl Record {
    /// A blank record with a bucket of `tokens`.
    fn new(tokens: f64, now: Instant) -> Record {
        Record {
            strikes: VecDeque::new(),
            tokens,
            refilled: now,
            held_since: None,
        }
    }
}

/// The conduct of every peer, shared by the control streams' acceptor and the swarm's handles.
pub(crate) struct Conduct {
    /// Requests a peer may make per second (`0`: no quota).
    rate: f64,
    /// How long a cut-off peer stays blocked.
    block_for: Duration,
    /// Each peer's record.
    peers: Mutex<HashMap<PeerId, Record>>,
    /// The peers cut off whose block has not ended.
    cut: Mutex<Vec<CutOff>>,
    /// Offences counted, by [`Offence::ALL`]'s order.
    counted: [AtomicU64; Offence::ALL.len()],
    /// Peers cut off, by the offence that did it.
    cut_by: [AtomicU64; Offence::ALL.len()],
    /// The swarm task, to block and unblock peers; weak, so as not to keep it running.
    commands: mpsc::WeakSender<Command>,
}

/// The index of an offence in the counters.
fn slot(o: Offence) -> usize {
    Offence::ALL.iter().position(|x| *x == o).unwrap_or(0)
}

impl Conduct {
    /// A record keeper with a quota of `rate` requests a second per peer and blocks of
    /// `block_for`, blocking through `commands`.
    pub(crate) fn new(
        rate: u32,
        block_for: Duration,
        commands: mpsc::WeakSender<Command>,
    ) -> Arc<Conduct> {
        Arc::new(Conduct {
            rate: f64::from(rate),
            block_for,
            peers: Mutex::default(),
            cut: Mutex::default(),
            counted: Default::default(),
            cut_by: Default::default(),
            commands,
        })
    }

    /// Takes one request of `peer` from its quota: how long to hold it (and its stream) back
    /// first, if the peer is over its quota.
    pub(crate) fn request(&self, peer: &PeerId, principal: &Principal) -> Option<Duration> {
        if self.rate <= 0.0 {
            return None;
        }
        let rate = if principal.kind == mvm_component::policy::PrincipalKind::User {
            self.rate
        } else {
            self.rate * DAEMON_QUOTA
        };
        let now = Instant::now();
        let (wait, flooded) = {
            let mut peers = self.peers.lock();
            let r = peers
                .entry(*peer)
                .or_insert_with(|| Record::new(rate * BURST_SECS, now));
            let elapsed = now.duration_since(r.refilled).as_secs_f64();
            r.tokens = (r.tokens + elapsed * rate).min(rate * BURST_SECS);
            r.refilled = now;
            r.tokens -= 1.0;
            // Held back (or as good as) while its bucket holds less than a tenth of a second's
            // worth: a timer's tick can give back more than the wait it slept, and a peer that
            // takes every token as it comes floods as much as one that waits for them.
            if r.tokens >= rate / 10.0 {
                r.held_since = None;
                return None;
            }
            if r.tokens >= 0.0 {
                let since = *r.held_since.get_or_insert(now);
                if now.duration_since(since) < FLOOD_EVERY {
                    return None;
                }
            }
            let since = *r.held_since.get_or_insert(now);
            let flooded = now.duration_since(since) >= FLOOD_EVERY;
            if flooded {
                r.held_since = Some(now);
            }
            (Duration::from_secs_f64(r.tokens.min(0.0) / -rate), flooded)
        };
        if flooded {
            self.offend(peer, principal, Offence::Flood);
        }
        (!wait.is_zero()).then_some(wait)
    }

    /// Counts an offence of `peer`; with [`STRIKES`] of them within the window, cuts it off.
    pub(crate) fn offend(&self, peer: &PeerId, principal: &Principal, offence: Offence) {
        let now = Instant::now();
        self.counted[slot(offence)].fetch_add(1, Ordering::Relaxed);
        let strikes = {
            let mut peers = self.peers.lock();
            let r = peers
                .entry(*peer)
                .or_insert_with(|| Record::new(self.rate * BURST_SECS, now));
            while r
                .strikes
                .front()
                .is_some_and(|t| now.duration_since(*t) > STRIKE_WINDOW)
            {
                r.strikes.pop_front();
            }
            r.strikes.push_back(now);
            let n = r.strikes.len();
            if n >= STRIKES {
                // A fresh start once the block ends.
                peers.remove(peer);
            }
            n
        };
        if strikes < STRIKES {
            tracing::info!(%peer, %principal, %offence, strikes, "a peer's offence");
            return;
        }
        let until = now + self.block_for;
        {
            let mut cut = self.cut.lock();
            cut.retain(|c| c.peer != *peer && c.until > now);
            cut.push(CutOff {
                peer: *peer,
                principal: principal.clone(),
                offence,
                until,
            });
        }
        self.cut_by[slot(offence)].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            %peer, %principal, %offence, strikes,
            block_secs = self.block_for.as_secs(),
            "a peer cut off: its connections are closed and refused"
        );
        let Some(commands) = self.commands.upgrade() else {
            return;
        };
        let peer = *peer;
        let block_for = self.block_for;
        tokio::spawn(async move {
            let blocked = true;
            if commands
                .send(Command::Block { peer, blocked })
                .await
                .is_err()
            {
                return;
            }
            let weak = commands.downgrade();
            drop(commands);
            tokio::time::sleep(block_for).await;
            if let Some(commands) = weak.upgrade() {
                let blocked = false;
                let _ = commands.send(Command::Block { peer, blocked }).await;
            }
        });
    }

    /// Forgets a peer's record once it has no stream open, nothing against it and a full
    /// quota (so that closing its streams and opening new ones gives a flooder nothing).
    pub(crate) fn forget_if_clean(&self, peer: &PeerId) {
        let now = Instant::now();
        let mut peers = self.peers.lock();
        let clean = peers.get(peer).is_some_and(|r| {
            let refilled = r.tokens + now.duration_since(r.refilled).as_secs_f64() * self.rate;
            r.strikes.is_empty() && r.held_since.is_none() && refilled >= self.rate * BURST_SECS
        });
        if clean {
            peers.remove(peer);
        }
    }

    /// The peers cut off whose block has not ended.
    pub(crate) fn cut_off(&self) -> Vec<CutOff> {
        let now = Instant::now();
        let mut cut = self.cut.lock();
        cut.retain(|c| c.until > now);
        cut.clone()
    }

    /// Offences counted since the start, and peers cut off, per offence.
    pub(crate) fn counts(&self) -> Vec<(Offence, u64, u64)> {
        Offence::ALL
            .iter()
            .map(|o| {
                let i = slot(*o);
                (
                    *o,
                    self.counted[i].load(Ordering::Relaxed),
                    self.cut_by[i].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_component::policy::PrincipalKind;

    fn who(kind: PrincipalKind) -> Principal {
        Principal {
            kind,
            name: "mallory".into(),
            domain: "physics".into(),
            roles: Vec::new(),
        }
    }

    /// A peer that takes every request its quota gives, however fast the timer, is a flood
    /// offence each FLOOD_EVERY and is cut off at the third; one at half its quota never is.
    #[tokio::test]
    async fn a_peer_that_keeps_its_quota_full_floods_and_one_within_it_does_not() {
        let (tx, _rx) = mpsc::channel(16);
        let rate = 2_000;
        let conduct = Conduct::new(rate, Duration::from_secs(60), tx.downgrade());
        let (flooder, calm) = (PeerId::random(), PeerId::random());
        let user = who(PrincipalKind::User);
        let start = Instant::now();
        let mut served = 0u64;
        while conduct.cut_off().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(15), "not cut off");
            if let Some(wait) = conduct.request(&flooder, &user) {
                tokio::time::sleep(wait).await;
            }
            served += 1;
            // The calm peer: a request every millisecond, half its quota.
            if served.is_multiple_of(4) {
                assert_eq!(
                    conduct.request(&calm, &user),
                    None,
                    "the calm peer was held"
                );
            }
        }
        let took = start.elapsed();
        assert!(
            took >= FLOOD_EVERY * STRIKES as u32,
            "cut off after {took:?}"
        );
        let most = f64::from(rate) * (took.as_secs_f64() + BURST_SECS) * 1.05;
        assert!((served as f64) <= most, "{served} served in {took:?}");
        let cut = conduct.cut_off();
        assert_eq!((cut[0].peer, cut[0].offence), (flooder, Offence::Flood));
        // A daemon has ten times a user's quota.
        let node = who(PrincipalKind::Node);
        let n = PeerId::random();
        let held = (0..rate * 10)
            .filter(|_| conduct.request(&n, &node).is_some())
            .count();
        assert!(
            held < 1000,
            "a node held back {held} times within its burst"
        );
    }
}
