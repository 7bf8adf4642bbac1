//! A user's bidding agent: Feldman, Lai and Zhang's best response ("A price-anticipating
//! resource allocation mechanism for distributed shared clusters", EC 2005), the bids that
//! spread a budget over hosts so as to get the most of what the user values, given what the
//! others bid (`000_*` section 3: Tycoon's clients bid by it).
//!
//! A user with budget rate `X` and, on each host `j`, a weight (valuation) `w_j` and the sum
//! `y_j` of the other users' bids maximizes `Σ_j w_j x_j / (x_j + y_j)` subject to
//! `Σ_j x_j = X`, `x_j ≥ 0`. The closed form: sort the hosts by `w_j / y_j` decreasing, take
//! the largest `k` such that `√(w_k / y_k) > Σ_{i≤k} √(w_i y_i) / (X + Σ_{i≤k} y_i)`, and bid
//! `x_j = √(w_j y_j) (X + Σ_{i≤k} y_i) / Σ_{i≤k} √(w_i y_i) − y_j` on the first `k`, nothing
//! on the others. At that point every host bid on has the same marginal utility
//! `w_j y_j / (x_j + y_j)²`, and no other host a higher one.
//!
//! Units are the caller's (credits or micro-credits per second alike): the bids are in the
//! budget's and the prices' unit.

/// One host as a bidding user sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Host {
    /// What the whole host is worth to the user (at least 0; 0: the user bids nothing on it).
    pub weight: f64,
    /// The sum of the other users' bids on the host (at least 0), in the budget's unit.
    pub price: f64,
}

/// Why no best response is given.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum ResponseError {
    /// Negative, NaN or infinite.
    #[error("a budget is a finite number of at least 0, not {0}")]
    Budget(f64),
    /// Not over 0, NaN or infinite.
    #[error("a price floor is a finite number over 0, not {0}")]
    Floor(f64),
    /// A host's weight is negative, NaN or infinite.
    #[error("host {host}: a weight is a finite number of at least 0, not {weight}")]
    Weight {
        /// The host's index.
        host: usize,
        /// Its weight.
        weight: f64,
    },
    /// A host's price is negative, NaN or infinite.
    #[error("host {host}: a price is a finite number of at least 0, not {price}")]
    Price {
        /// The host's index.
        host: usize,
        /// Its price.
        price: f64,
    },
}

/// The user's best response: its bid on each host of `hosts` (in their order), spending all
/// of `budget` unless no host is worth anything to it.
///
/// A host's price is taken as at least `floor` (over 0): on a host nobody else bids on, any
/// bid would take the whole host, and the smallest bid does not exist; with the floor, the
/// user bids there as if the others bid `floor`, a small bid when the floor is small (the
/// smallest bid the auctioneer takes is a good floor: 1 micro-credit per second). Hosts of
/// weight 0 get no bid; with no host of weight over 0, or a budget of 0, every bid is 0 (the
/// budget is not spent); no hosts, no bids.
///
/// # Errors
/// A budget, weight or price that is negative, NaN or infinite, or a floor not over 0.
pub fn best_response(budget: f64, hosts: &[Host], floor: f64) -> Result<Vec<f64>, ResponseError> {
    check(budget, hosts, floor)?;
    Ok(respond(budget, hosts, floor))
}

/// [`best_response`] on at most `limit` hosts (a job of `limit` parts can use no more): the
/// best response; when it bids on more than `limit` hosts, the `limit` hosts with the largest
/// bids are kept (the first in `hosts` among equal bids) and the best response over only those
/// is given. Not always the best over every choice of `limit` hosts, but close when the hosts
/// left out got small bids. A limit of 0: no bids.
///
/// # Errors
/// As [`best_response`].
pub fn best_response_limited(
    budget: f64,
    hosts: &[Host],
    floor: f64,
    limit: usize,
) -> Result<Vec<f64>, ResponseError> {
    check(budget, hosts, floor)?;
    let bids = respond(budget, hosts, floor);
    if bids.iter().filter(|&&x| x > 0.0).count() <= limit {
        return Ok(bids);
    }
    let mut order: Vec<usize> = (0..hosts.len()).collect();
    // Largest bid first; a stable sort keeps the hosts' order among equal bids.
    order.sort_by(|&a, &b| bids[b].total_cmp(&bids[a]));
    order.truncate(limit);
    order.sort_unstable();
    let kept: Vec<Host> = order.iter().map(|&j| hosts[j]).collect();
    let mut out = vec![0.0; hosts.len()];
    for (&j, x) in order.iter().zip(respond(budget, &kept, floor)) {
        out[j] = x;
    }
    Ok(out)
}

/// The inputs' checks of [`best_response`].
fn check(budget: f64, hosts: &[Host], floor: f64) -> Result<(), ResponseError> {
    if !(budget.is_finite() && budget >= 0.0) {
        return Err(ResponseError::Budget(budget));
    }
    if !(floor.is_finite() && floor > 0.0) {
        return Err(ResponseError::Floor(floor));
    }
    for (host, h) in hosts.iter().enumerate() {
        if !(h.weight.is_finite() && h.weight >= 0.0) {
            return Err(ResponseError::Weight {
                host,
                weight: h.weight,
            });
        }
        if !(h.price.is_finite() && h.price >= 0.0) {
            return Err(ResponseError::Price {
                host,
                price: h.price,
            });
        }
    }
    Ok(())
}

/// The closed form on checked inputs.
fn respond(budget: f64, hosts: &[Host], floor: f64) -> Vec<f64> {
    let mut bids = vec![0.0; hosts.len()];
    // The bids scale with the budget and the prices together, and not with the weights: both
    // are brought to at most 1 so that no product or sum overflows.
    let top_weight = hosts.iter().map(|h| h.weight).fold(0.0, f64::max);
    if budget <= 0.0 || top_weight <= 0.0 {
        return bids;
    }
    let scale = hosts
        .iter()
        .map(|h| h.price.max(floor))
        .fold(budget, f64::max);
    let x = budget / scale;
    let least = (floor / scale).max(f64::MIN_POSITIVE);
    // Per host worth anything: its index, √w, √y and √(w/y), the order of w/y.
    let mut cand: Vec<(usize, f64, f64, f64)> = hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| h.weight > 0.0)
        .map(|(j, h)| {
            let w = (h.weight / top_weight).sqrt();
            let y = (h.price / scale).max(least).sqrt();
            (j, w, y, w / y)
        })
        .collect();
    cand.sort_by(|a, b| b.3.total_cmp(&a.3));
    // Host k is bid on when √(w_k/y_k) exceeds Σ_{i<k} √(w_i y_i) / (X + Σ_{i<k} y_i) (the
    // same as the condition with i ≤ k); the hosts that are form a prefix of the order.
    let (mut root_sum, mut price_sum, mut k) = (0.0, 0.0, 0);
    for &(_, w, y, r) in &cand {
        if k > 0 && r <= root_sum / (x + price_sum) {
            break;
        }
        root_sum += w * y;
        price_sum += y * y;
        k += 1;
    }
    if root_sum <= 0.0 {
        return bids;
    }
    // x_j = y_j (√(w_j/y_j) / f − 1), with f = Σ √(w_i y_i) / (X + Σ y_i) over the first k.
    let f = root_sum / (x + price_sum);
    let mut spent = 0.0;
    for &(j, _, y, r) in &cand[..k] {
        let b = (y * y * (r / f - 1.0)).max(0.0);
        bids[j] = b;
        spent += b;
    }
    // Σ x_j = X exactly in theory; the rounding errors go in proportion.
    if spent > 0.0 {
        let adjust = x / spent * scale;
        for b in &mut bids {
            *b *= adjust;
        }
    }
    bids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a small deterministic generator for the tests' instances.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            super::super::sim::splitmix(&mut self.0)
        }

        /// Uniform in [lo, hi).
        fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn utility(hosts: &[Host], bids: &[f64]) -> f64 {
        hosts
            .iter()
            .zip(bids)
            .map(|(h, &x)| {
                if x + h.price > 0.0 {
                    h.weight * x / (x + h.price)
                } else {
                    0.0
                }
            })
            .sum()
    }

    /// The Euclidean projection of `v` onto {x ≥ 0, Σ x = total}.
    fn project(v: &[f64], total: f64) -> Vec<f64> {
        let mut u = v.to_vec();
        u.sort_by(|a, b| b.total_cmp(a));
        let (mut acc, mut theta) = (0.0, 0.0);
        for (i, &ui) in u.iter().enumerate() {
            acc += ui;
            let t = (acc - total) / (i + 1) as f64;
            if ui - t > 0.0 {
                theta = t;
            }
        }
        v.iter().map(|&x| (x - theta).max(0.0)).collect()
    }

    /// Projected gradient ascent from the uniform split: an optimizer independent of the
    /// closed form.
    fn numerical(budget: f64, hosts: &[Host]) -> Vec<f64> {
        let n = hosts.len();
        let least = hosts.iter().map(|h| h.price).fold(f64::INFINITY, f64::min);
        let top = hosts.iter().map(|h| h.weight).fold(0.0, f64::max);
        // 1 / the gradient's Lipschitz constant (|d²U/dx²| ≤ 2w/y²).
        let step = least * least / (2.0 * top);
        let mut x = vec![budget / n as f64; n];
        for _ in 0..50_000 {
            let g: Vec<f64> = hosts
                .iter()
                .zip(&x)
                .map(|(h, &xj)| h.weight * h.price / (xj + h.price).powi(2))
                .collect();
            let v: Vec<f64> = x.iter().zip(&g).map(|(a, b)| a + step * b).collect();
            x = project(&v, budget);
        }
        x
    }

    fn instance(rng: &mut Rng, n: usize) -> (f64, Vec<Host>) {
        let budget = rng.uniform(0.1, 3.0);
        let hosts = (0..n)
            .map(|_| Host {
                weight: rng.uniform(0.0, 1.0),
                price: rng.uniform(0.2, 2.0),
            })
            .collect();
        (budget, hosts)
    }

    #[test]
    fn matches_a_numerical_optimizer_on_random_instances() {
        let mut rng = Rng(7);
        for case in 0..60 {
            let n = 1 + case % 6;
            let (budget, hosts) = instance(&mut rng, n);
            let bids = best_response(budget, &hosts, 1e-9).unwrap();
            let num = numerical(budget, &hosts);
            let (u, v) = (utility(&hosts, &bids), utility(&hosts, &num));
            assert!(
                u >= v - 1e-9,
                "case {case}: closed form {u} below numerical {v}: {bids:?} vs {num:?}"
            );
            for (a, b) in bids.iter().zip(&num) {
                assert!(
                    (a - b).abs() < 1e-4 * budget,
                    "case {case}: {bids:?} vs {num:?}"
                );
            }
        }
    }

    #[test]
    fn no_random_split_does_better() {
        let mut rng = Rng(11);
        for case in 0..40 {
            let (budget, hosts) = instance(&mut rng, 2 + case % 5);
            let best = utility(&hosts, &best_response(budget, &hosts, 1e-9).unwrap());
            for _ in 0..500 {
                let cuts: Vec<f64> = hosts.iter().map(|_| rng.uniform(0.0, 1.0)).collect();
                let sum: f64 = cuts.iter().sum();
                let x: Vec<f64> = cuts.iter().map(|c| c / sum * budget).collect();
                assert!(utility(&hosts, &x) <= best + 1e-12, "case {case}");
            }
        }
    }

    #[test]
    fn spends_the_budget_with_equal_marginal_utilities() {
        let mut rng = Rng(3);
        for case in 0..200 {
            let (budget, hosts) = instance(&mut rng, 1 + case % 12);
            let bids = best_response(budget, &hosts, 1e-9).unwrap();
            let spent: f64 = bids.iter().sum();
            assert!((spent - budget).abs() < 1e-9 * budget, "case {case}");
            let marginal = |j: usize| {
                let h = hosts[j];
                h.weight * h.price / (bids[j] + h.price).powi(2)
            };
            let bid_on: Vec<usize> = (0..bids.len()).filter(|&j| bids[j] > 0.0).collect();
            assert!(!bid_on.is_empty());
            let lambda = marginal(bid_on[0]);
            for (j, &x) in bids.iter().enumerate() {
                assert!(x >= 0.0);
                if x > 0.0 {
                    assert!(
                        (marginal(j) - lambda).abs() < 1e-9 * lambda,
                        "case {case}: host {j}"
                    );
                } else {
                    assert!(
                        marginal(j) <= lambda * (1.0 + 1e-9),
                        "case {case}: host {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn hosts_worth_nothing_get_nothing() {
        let hosts = [
            Host {
                weight: 0.0,
                price: 0.001,
            },
            Host {
                weight: 1.0,
                price: 1.0,
            },
            Host {
                weight: 0.0,
                price: 0.0,
            },
        ];
        assert_eq!(
            best_response(2.0, &hosts, 1e-6).unwrap(),
            vec![0.0, 2.0, 0.0]
        );
        let nothing = [Host {
            weight: 0.0,
            price: 1.0,
        }; 3];
        assert_eq!(best_response(2.0, &nothing, 1e-6).unwrap(), vec![0.0; 3]);
    }

    #[test]
    fn edge_cases_give_no_bids_or_an_error_and_never_panic() {
        let h = |weight, price| Host { weight, price };
        assert_eq!(best_response(1.0, &[], 1e-6).unwrap(), Vec::<f64>::new());
        assert_eq!(
            best_response(0.0, &[h(1.0, 1.0), h(0.5, 0.0)], 1e-6).unwrap(),
            vec![0.0, 0.0]
        );
        assert!(matches!(
            best_response(f64::NAN, &[h(1.0, 1.0)], 1e-6),
            Err(ResponseError::Budget(b)) if b.is_nan()
        ));
        assert!(matches!(
            best_response(-1.0, &[], 1e-6),
            Err(ResponseError::Budget(_))
        ));
        assert!(matches!(
            best_response(f64::INFINITY, &[], 1e-6),
            Err(ResponseError::Budget(_))
        ));
        for floor in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                best_response(1.0, &[h(1.0, 1.0)], floor),
                Err(ResponseError::Floor(_))
            ));
        }
        assert!(matches!(
            best_response(1.0, &[h(1.0, 1.0), h(f64::NAN, 1.0)], 1e-6),
            Err(ResponseError::Weight { host: 1, weight }) if weight.is_nan()
        ));
        assert!(matches!(
            best_response(1.0, &[h(-0.5, 1.0)], 1e-6),
            Err(ResponseError::Weight { host: 0, .. })
        ));
        assert!(matches!(
            best_response(1.0, &[h(1.0, 1.0), h(1.0, f64::INFINITY)], 1e-6),
            Err(ResponseError::Price { host: 1, .. })
        ));
        assert!(matches!(
            best_response_limited(1.0, &[h(1.0, -1.0)], 1e-6, 1),
            Err(ResponseError::Price { host: 0, .. })
        ));
        // Huge and tiny magnitudes: finite bids that spend the budget.
        for (budget, price, floor) in [(1e300, 1e300, 1e-300), (1e-300, 1e-300, 1e-310)] {
            let bids = best_response(
                budget,
                &[h(1e300, price), h(1e-300, 0.0), h(1.0, price)],
                floor,
            )
            .unwrap();
            assert!(bids.iter().all(|b| b.is_finite() && *b >= 0.0), "{bids:?}");
            let spent: f64 = bids.iter().sum();
            assert!((spent - budget).abs() <= 1e-9 * budget, "{bids:?}");
        }
    }

    #[test]
    fn a_host_nobody_bids_on_gets_a_small_bid_at_the_floor() {
        let hosts = [
            Host {
                weight: 1.0,
                price: 0.0,
            },
            Host {
                weight: 1.0,
                price: 1.0,
            },
        ];
        let bids = best_response(1.0, &hosts, 1e-6).unwrap();
        // As if the price were the floor: √(1e-6)·(1 + 1 + 1e-6)/(1 + 1e-3) − 1e-6.
        let want = 1e-3 * (2.0 + 1e-6) / (1.0 + 1e-3) - 1e-6;
        assert!((bids[0] - want).abs() < 1e-12, "{bids:?}");
        assert!((bids[0] + bids[1] - 1.0).abs() < 1e-12);
        // It takes nearly all of the host.
        assert!(bids[0] / (bids[0] + 1e-6) > 0.999);
    }

    #[test]
    fn a_limit_keeps_the_largest_bids() {
        let mut rng = Rng(5);
        for case in 0..100 {
            let (budget, hosts) = instance(&mut rng, 2 + case % 10);
            let all = best_response(budget, &hosts, 1e-9).unwrap();
            let n = all.iter().filter(|&&x| x > 0.0).count();
            assert_eq!(
                best_response_limited(budget, &hosts, 1e-9, n).unwrap(),
                all,
                "case {case}"
            );
            if n < 2 {
                continue;
            }
            let limit = n - 1;
            let some = best_response_limited(budget, &hosts, 1e-9, limit).unwrap();
            assert!(some.iter().filter(|&&x| x > 0.0).count() <= limit);
            assert!((some.iter().sum::<f64>() - budget).abs() < 1e-9 * budget);
            // The host dropped is the one with the smallest bid of the unlimited response.
            let least = (0..all.len())
                .filter(|&j| all[j] > 0.0)
                .min_by(|&a, &b| all[a].total_cmp(&all[b]))
                .unwrap();
            assert_eq!(some[least], 0.0, "case {case}");
            // The best response over the hosts kept.
            let kept: Vec<usize> = (0..all.len()).filter(|&j| some[j] > 0.0).collect();
            let sub: Vec<Host> = kept.iter().map(|&j| hosts[j]).collect();
            let again = best_response(budget, &sub, 1e-9).unwrap();
            for (&j, x) in kept.iter().zip(again) {
                assert!((some[j] - x).abs() < 1e-12 * budget);
            }
            assert!(utility(&hosts, &some) <= utility(&hosts, &all) + 1e-12);
        }
        assert_eq!(
            best_response_limited(
                1.0,
                &[Host {
                    weight: 1.0,
                    price: 1.0
                }],
                1e-9,
                0
            )
            .unwrap(),
            vec![0.0]
        );
    }
}
