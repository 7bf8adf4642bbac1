//! A node's charges for its bidding guests' CPU time, kept until the bank has them: each
//! heartbeat's metering is a batch, numbered from the node's start; every heartbeat carries the
//! batches not yet taken, and its answer says which were (the bank takes each once, by number).

use std::collections::VecDeque;

use crate::proto::{ChargeBatch, ChargeLine, MAX_CHARGE_BATCHES, MAX_CHARGE_LINES};

/// The batches not yet in the bank.
pub(crate) struct Charges {
    boot: u64,
    seq: u64,
    unsent: VecDeque<ChargeBatch>,
}

impl Charges {
    /// None yet, for a node started at `boot` (milliseconds since the Unix epoch).
    pub(crate) fn new(boot: u64) -> Charges {
        Charges {
            boot,
            seq: 0,
            unsent: VecDeque::new(),
        }
    }

    /// A heartbeat's metering: a new batch (none for no lines). Past [`MAX_CHARGE_BATCHES`]
    /// untaken, the oldest is merged into the next (which keeps its later number, so the
    /// bank takes the merged lines once).
    pub(crate) fn push(&mut self, lines: Vec<ChargeLine>) {
        if lines.is_empty() {
            return;
        }
        self.seq += 1;
        self.unsent.push_back(ChargeBatch {
            boot: self.boot,
            seq: self.seq,
            lines: merged(lines),
        });
        while self.unsent.len() > MAX_CHARGE_BATCHES {
            let (Some(old), Some(next)) = (self.unsent.pop_front(), self.unsent.front_mut()) else {
                break;
            };
            let mut lines = old.lines;
            lines.append(&mut next.lines);
            next.lines = merged(lines);
        }
    }

    /// The batches to send.
    pub(crate) fn unsent(&self) -> Vec<ChargeBatch> {
        self.unsent.iter().cloned().collect()
    }

    /// The bank has taken this node's batches up to `(boot, seq)`.
    pub(crate) fn taken(&mut self, upto: (u64, u64)) {
        self.unsent.retain(|b| (b.boot, b.seq) > upto);
    }
}

/// `lines` with those of one job, payer and rate summed (at most [`MAX_CHARGE_LINES`]: more
/// is not possible with a node's few guests, but a merge never grows past it).
fn merged(lines: Vec<ChargeLine>) -> Vec<ChargeLine> {
    let mut out: Vec<ChargeLine> = Vec::with_capacity(lines.len());
    for l in lines {
        if let Some(o) = out
            .iter_mut()
            .find(|o| o.job == l.job && o.payer == l.payer && o.rate == l.rate)
        {
            o.cpu_us = o.cpu_us.saturating_add(l.cpu_us);
            o.micro = o.micro.saturating_add(l.micro);
        } else if out.len() < MAX_CHARGE_LINES {
            out.push(l);
        } else {
            tracing::warn!(job = %l.job, "a charge batch is full: a line is dropped");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(job: &str, micro: u64) -> ChargeLine {
        ChargeLine {
            job: job.parse().expect("a job id"),
            payer: "user:a@d".into(),
            rate: 2,
            cpu_us: micro * 500_000,
            micro,
        }
    }

    #[test]
    fn batches_are_kept_until_taken_and_merged_past_the_limit_without_losing_a_charge() {
        let mut c = Charges::new(7);
        c.push(Vec::new());
        assert!(c.unsent().is_empty(), "nothing metered, no batch");
        for _ in 0..MAX_CHARGE_BATCHES + 3 {
            c.push(vec![line("j-1-1", 1), line("j-1-2", 2), line("j-1-1", 1)]);
        }
        let u = c.unsent();
        assert_eq!(u.len(), MAX_CHARGE_BATCHES);
        let owed: u64 = u.iter().flat_map(|b| &b.lines).map(|l| l.micro).sum();
        assert_eq!(
            owed,
            4 * (MAX_CHARGE_BATCHES as u64 + 3),
            "merged, none lost"
        );
        assert_eq!(u[0].lines.len(), 2, "one line per job");
        assert_eq!(u.last().map(|b| (b.boot, b.seq)), Some((7, 19)));
        c.taken((7, 18));
        assert_eq!(c.unsent().len(), 1);
        c.taken((7, 19));
        assert!(c.unsent().is_empty());
    }
}
