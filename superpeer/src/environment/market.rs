//! The node's auctioneer (Tycoon's): bids for the node's CPU set its guests' weights, and
//! their use is metered for the bank.

use std::collections::HashMap;
use std::sync::Arc;

use mvm_os::provision::Environments;

use super::EnvError;

/// A node's auctioneer (Tycoon) and the guests whose weights it sets: every bid made, changed
/// or ended sets every bidding guest's weight to its rate's proportion. It meters each bidding
/// guest's CPU time for the bank (each heartbeat, and at a bid's change or end), and holds the
/// guests of a payer the bank says has no credit left at [`FLOOR_RATE`] until it has some.
pub(crate) struct Market {
    pub(super) state: parking_lot::Mutex<MarketState>,
    pub(super) envs: Arc<Environments>,
}

/// The rate a guest whose payer has no credit left bids, micro-credits per CPU-second: the
/// least share, and nothing charged while the payer holds nothing.
pub const FLOOR_RATE: u64 = 1;

#[derive(Default)]
pub(super) struct MarketState {
    auction: crate::market::Auctioneer,
    /// Per bidding guest: its job, its payer and the rate it asked for.
    asked: HashMap<String, Asked>,
    /// The payers the bank last said have no credit.
    broke: std::collections::HashSet<String>,
    /// Charges metered at a bid's change or end, not yet taken by a heartbeat.
    owed: Vec<crate::proto::ChargeLine>,
}

impl MarketState {
    /// The rate `payer`'s guest bids for an asked `rate`: the floor while it has no credit.
    pub(super) fn rate_for(&self, payer: &str, rate: u64) -> u64 {
        if self.broke.contains(payer) {
            FLOOR_RATE
        } else {
            rate
        }
    }
}

struct Asked {
    job: crate::proto::JobId,
    payer: String,
    rate: u64,
}

impl Market {
    /// Sets each bidding guest's weight as the bids ask (keeping its cap).
    pub(super) fn reweigh(&self, auction: &crate::market::Auctioneer) {
        let driver = self.envs.driver();
        for (name, weight) in auction.weights() {
            tracing::debug!(guest = %name, weight, "a bidding guest's weight");
            let cap = driver.sched(&name).map_or(0, |s| s.cap);
            if let Err(e) = driver.set_sched(&name, mvm_os::driver::Sched { weight, cap }) {
                tracing::warn!(guest = %name, "setting a guest's weight from the bids: {e}");
            }
        }
    }

    /// The CPU seconds guest `guest` has used (0 when the driver cannot tell).
    pub(super) fn cpu(&self, guest: &str) -> f64 {
        self.envs
            .driver()
            .inspect(guest)
            .map_or(0.0, |g| g.cpu_seconds)
    }

    /// Meters guest `guest` (at its rate until now) into `st.owed`.
    pub(super) fn meter_into(&self, st: &mut MarketState, guest: &str) {
        let cpu = self.cpu(guest);
        if let Some(line) = charge_line(st, guest, cpu) {
            st.owed.push(line);
        }
    }

    /// Guest `guest` of `job` bids `rate` (micro-credits per CPU-second), paid by `payer`; a
    /// change of rate charges the time before it at the old one.
    pub(super) fn bid(
        &self,
        guest: &str,
        job: &crate::proto::JobId,
        payer: String,
        rate: u64,
    ) -> Result<(), EnvError> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let fresh = !st.auction.bids(guest);
        if !fresh {
            self.meter_into(st, guest);
        }
        let effective = st.rate_for(&payer, rate);
        st.auction
            .bid(
                guest,
                crate::market::Bid {
                    payer: payer.clone(),
                    rate: effective,
                },
            )
            .map_err(|e| EnvError::Bid(guest.to_owned(), e.to_string()))?;
        if fresh {
            let cpu = self.cpu(guest);
            st.auction.metered_from(guest, cpu);
        }
        tracing::debug!(%guest, %job, %payer, rate, effective, "a guest bids for the node's CPU");
        st.asked.insert(
            guest.to_owned(),
            Asked {
                job: job.clone(),
                payer,
                rate,
            },
        );
        self.reweigh(&st.auction);
        Ok(())
    }

    /// Guest `guest`'s bid ends (its job let it go): what it used since its last charge is
    /// owed.
    pub(super) fn end(&self, guest: &str) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if st.auction.bids(guest) {
            self.meter_into(st, guest);
            st.auction.end(guest);
            st.asked.remove(guest);
            self.reweigh(&st.auction);
        }
    }

    /// What every bidding guest used since its last charge, with what was owed at bids'
    /// changes and ends since the last call; the host's price (the sum of the bid rates);
    /// and the payers bidding. Blocks (asks the driver).
    pub(crate) fn meter(&self) -> (Vec<crate::proto::ChargeLine>, u64, Vec<String>) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let guests: Vec<String> = st.asked.keys().cloned().collect();
        for g in &guests {
            self.meter_into(st, g);
        }
        let mut payers: Vec<String> = st.asked.values().map(|a| a.payer.clone()).collect();
        payers.sort_unstable();
        payers.dedup();
        (std::mem::take(&mut st.owed), st.auction.price(), payers)
    }

    /// Job `job`'s guests here bid `rate` from now on (a change of bid by hand or by its
    /// agent): the time before is charged at the rate before. How many guests it changed.
    ///
    /// # Errors
    /// A rate the auctioneer refuses (nothing changed).
    pub(crate) fn rebid(&self, job: &crate::proto::JobId, rate: u64) -> Result<usize, EnvError> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if rate == 0 || rate > crate::market::MAX_RATE {
            return Err(EnvError::Bid(
                job.to_string(),
                crate::market::BidError::Rate(rate).to_string(),
            ));
        }
        let guests: Vec<(String, String)> = st
            .asked
            .iter()
            .filter(|(_, a)| &a.job == job)
            .map(|(g, a)| (g.clone(), a.payer.clone()))
            .collect();
        for (guest, payer) in &guests {
            self.meter_into(st, guest);
            let effective = st.rate_for(payer, rate);
            let bid = crate::market::Bid {
                payer: payer.clone(),
                rate: effective,
            };
            st.auction
                .bid(guest, bid)
                .map_err(|e| EnvError::Bid(guest.clone(), e.to_string()))?;
            if let Some(a) = st.asked.get_mut(guest) {
                a.rate = rate;
            }
        }
        if !guests.is_empty() {
            self.reweigh(&st.auction);
        }
        Ok(guests.len())
    }

    /// The bank says `broke` (of this node's payers) have no credit left: their guests bid
    /// [`FLOOR_RATE`], the others what they asked (time before a change is charged at the
    /// rate before it).
    pub(crate) fn set_broke(&self, broke: Vec<String>) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        st.broke = broke.into_iter().collect();
        let changes: Vec<(String, String, u64)> = st
            .asked
            .iter()
            .filter_map(|(g, a)| {
                let want = st.rate_for(&a.payer, a.rate);
                (st.auction.rate(g) != Some(want)).then(|| (g.clone(), a.payer.clone(), want))
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        for (guest, payer, rate) in changes {
            self.meter_into(st, &guest);
            if let Err(e) = st.auction.bid(&guest, crate::market::Bid { payer, rate }) {
                tracing::warn!(%guest, "changing a bid for the payer's credit: {e}");
            }
        }
        self.reweigh(&st.auction);
    }
}

/// What guest `guest` (having used `cpu` CPU seconds in all) owes since its last charge, as a
/// line of a charge batch.
fn charge_line(st: &mut MarketState, guest: &str, cpu: f64) -> Option<crate::proto::ChargeLine> {
    let c = st.auction.meter(guest, cpu)?;
    let job = st.asked.get(guest)?.job.clone();
    Some(crate::proto::ChargeLine {
        job,
        payer: c.payer,
        rate: c.rate,
        cpu_us: (c.cpu_secs * 1e6).round() as u64,
        micro: c.micro,
    })
}
