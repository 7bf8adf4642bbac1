//! Tycoon's auctioneer (`000_*` section 3): each host's CPU is shared among the parts bidding
//! for it, a part's share being its bid rate over the sum of the rates on the host, set
//! through the guests' scheduler weights and charged for the CPU time it used.
//!
//! Pure: the node feeds it bids and each guest's CPU seconds, and applies the weights it gives
//! through the OS layer; charges go to the bank.

use std::collections::BTreeMap;

pub mod agent;
pub mod sim;

/// The Xen-style weight the highest bid on a host gets: the default, 256; the others get
/// theirs in proportion, at least 1. So a host's bidding guests together never outweigh its
/// dom0, its daemon or its other guests more than guests of the default weight do (a top
/// weight 100 times the default starved a Xen dom0 under two spinning guests).
pub const TOP_WEIGHT: u32 = 256;

/// The highest bid rate taken, micro-credits per CPU-second (a million credits a second).
pub const MAX_RATE: u64 = 1_000_000 * crate::proto::MICRO;

/// A part's bid for the host's CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bid {
    /// The account that pays.
    pub payer: String,
    /// Micro-credits per CPU-second used.
    pub rate: u64,
}

/// Why a bid is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BidError {
    /// Zero, or over [`MAX_RATE`].
    #[error(
        "a bid rate is from 1 micro-credit to 10^6 credits a CPU-second, not {0} micro-credits"
    )]
    Rate(u64),
}

/// What a part owes for CPU time it used.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// The part (as the node names it).
    pub part: String,
    /// The account that pays.
    pub payer: String,
    /// CPU seconds used since the last charge.
    pub cpu_secs: f64,
    /// The bid rate charged, micro-credits per CPU-second.
    pub rate: u64,
    /// What they cost at the bid rate, micro-credits (rounded down; the rest is carried).
    pub micro: u64,
}

/// A host's auctioneer: the bids of the parts it runs, and what each has been charged for.
#[derive(Debug, Default)]
pub struct Auctioneer {
    bids: BTreeMap<String, Bid>,
    /// Per part: the CPU seconds charged for so far, and the fraction of a micro-credit owed
    /// but not charged yet.
    metered: BTreeMap<String, (f64, f64)>,
}

impl Auctioneer {
    /// Part `part` bids (a new bid, or a change of its rate).
    ///
    /// # Errors
    /// A rate of zero or over [`MAX_RATE`].
    pub fn bid(&mut self, part: &str, bid: Bid) -> Result<(), BidError> {
        if bid.rate == 0 || bid.rate > MAX_RATE {
            return Err(BidError::Rate(bid.rate));
        }
        self.bids.insert(part.to_owned(), bid);
        Ok(())
    }

    /// Part `part`'s guest had used `cpu_secs` CPU seconds when its bid was made: it is
    /// charged only for what it uses from then on (a guest may have run before, e.g. a warm
    /// or persistent one).
    pub fn metered_from(&mut self, part: &str, cpu_secs: f64) {
        let from = if cpu_secs.is_finite() { cpu_secs } else { 0.0 };
        self.metered.insert(part.to_owned(), (from, 0.0));
    }

    /// Part `part` has ended: its bid goes (what it used since its last charge is not
    /// charged: meter it first).
    pub fn end(&mut self, part: &str) {
        self.bids.remove(part);
        self.metered.remove(part);
    }

    /// Part `part`'s bid rate, if it bids.
    pub fn rate(&self, part: &str) -> Option<u64> {
        self.bids.get(part).map(|b| b.rate)
    }

    /// Whether part `part` bids.
    pub fn bids(&self, part: &str) -> bool {
        self.bids.contains_key(part)
    }

    /// The host's price: the sum of the bid rates on it, micro-credits per CPU-second.
    pub fn price(&self) -> u64 {
        self.bids
            .values()
            .map(|b| b.rate)
            .fold(0, u64::saturating_add)
    }

    /// Each part's share of the CPU: its rate over the sum of the rates.
    pub fn shares(&self) -> Vec<(String, f64)> {
        let sum = self.price() as f64;
        self.bids
            .iter()
            .map(|(p, b)| (p.clone(), b.rate as f64 / sum))
            .collect()
    }

    /// Each part's scheduler weight (Xen-style), in proportion to its rate: the highest bid
    /// gets [`TOP_WEIGHT`], every other at least 1.
    pub fn weights(&self) -> Vec<(String, u32)> {
        let top = self.bids.values().map(|b| b.rate).max().unwrap_or(1) as f64;
        self.bids
            .iter()
            .map(|(p, b)| {
                let w = (b.rate as f64 / top * f64::from(TOP_WEIGHT)).round();
                (p.clone(), (w as u32).clamp(1, TOP_WEIGHT))
            })
            .collect()
    }

    /// Part `part`'s guest has used `cpu_secs` CPU seconds in all: what the time since its
    /// last charge costs at its rate (none when it has no bid, or used nothing). Work-
    /// conserving: a part pays only for CPU time it used, however idle the host.
    pub fn meter(&mut self, part: &str, cpu_secs: f64) -> Option<Charge> {
        let bid = self.bids.get(part)?;
        let (charged, carry) = self.metered.entry(part.to_owned()).or_insert((0.0, 0.0));
        let used = cpu_secs - *charged;
        if !used.is_finite() || used <= 0.0 {
            return None;
        }
        let owed = used * bid.rate as f64 + *carry;
        let micro = owed.floor();
        *charged = cpu_secs;
        *carry = owed - micro;
        Some(Charge {
            part: part.to_owned(),
            payer: bid.payer.clone(),
            cpu_secs: used,
            rate: bid.rate,
            micro: micro as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bid(payer: &str, credits: u64) -> Bid {
        Bid {
            payer: payer.into(),
            rate: credits * crate::proto::MICRO,
        }
    }

    #[test]
    fn shares_and_weights_follow_the_bids() {
        let mut a = Auctioneer::default();
        a.bid("a", bid("user:a@d", 1)).expect("bid");
        a.bid("b", bid("user:b@d", 2)).expect("bid");
        a.bid("c", bid("user:c@d", 5)).expect("bid");
        let shares: Vec<f64> = a.shares().into_iter().map(|s| s.1).collect();
        assert_eq!(shares, vec![0.125, 0.25, 0.625]);
        let weights: Vec<u32> = a.weights().into_iter().map(|w| w.1).collect();
        assert_eq!(weights, vec![51, 102, 256]);
        assert_eq!(a.price(), 8 * crate::proto::MICRO);
        // A change of bid changes every share; an end removes the part.
        a.bid("c", bid("user:c@d", 1)).expect("rebid");
        assert_eq!(a.shares()[1].1, 0.5);
        a.end("b");
        assert_eq!(a.weights(), vec![("a".into(), 256), ("c".into(), 256)]);
        assert!(a.bid("d", bid("user:d@d", 0)).is_err());
    }

    #[test]
    fn parts_pay_their_rate_for_the_cpu_time_they_used_and_no_more() {
        let mut a = Auctioneer::default();
        a.bid(
            "a",
            Bid {
                payer: "user:a@d".into(),
                rate: 3,
            },
        )
        .expect("bid");
        // 0.5 s at 3 micro-credits a second: 1.5, charged 1 and 0.5 carried.
        let c = a.meter("a", 0.5).expect("charge");
        assert_eq!((c.micro, c.payer.as_str()), (1, "user:a@d"));
        assert!(a.meter("a", 0.5).is_none(), "nothing used since");
        let c = a.meter("a", 1.0).expect("charge");
        assert_eq!(c.micro, 2, "1.5 + the 0.5 carried");
        assert!(a.meter("unknown", 1.0).is_none());
    }
}
