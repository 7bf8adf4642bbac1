//! What each principal has put at a super-peer that no job names yet, bounded: a user (or a
//! peer) cannot fill the disk with files it never submits a job for. Every put must also leave
//! [`DISK_RESERVE`] free on the store's file system, counting the transfers under way, so that
//! the job log beside it can still be written.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::proto::{Failure, FailureKind, Hash};

/// The free space a put must leave on the file store's file system: this, or a twentieth of
/// the file system, whichever is less.
pub const DISK_RESERVE: u64 = 1 << 30;

/// The default of [`Unclaimed`]'s quota: a job's most input bytes, so that any one job's
/// inputs can always be sent.
pub const DEFAULT_QUOTA: u64 = mvm_component::files::MAX_INPUT_BYTES;

/// What [`Unclaimed::admit`] asks of the store and of the job log.
pub(crate) trait Holding {
    /// The size of the file of `hash`, if the store holds it.
    fn held(&self, hash: &Hash) -> Option<u64>;
    /// Which of `hashes` a job names.
    fn named(&self, hashes: &[Hash]) -> HashSet<Hash>;
    /// Bytes free on the store's disk, and its size, if known.
    fn free(&self) -> Option<(u64, u64)>;
}

/// A file one principal put, or is putting.
#[derive(Debug, Clone, Copy)]
struct Put {
    size: u64,
    /// When it was last asked to be put.
    at: Instant,
    /// Transfers of it under way.
    flying: u32,
}

/// The files each principal put that no job names yet, and the transfers under way.
#[derive(Debug)]
pub(crate) struct Unclaimed {
    quota: u64,
    reserve: u64,
    /// How long a file no job names counts against whoever put it (then it is let go).
    keep: Duration,
    by: Mutex<HashMap<String, HashMap<Hash, Put>>>,
}

impl Unclaimed {
    /// At most `quota` bytes per principal, leaving `reserve` free, for `keep` after a put.
    pub(crate) fn new(quota: u64, reserve: u64, keep: Duration) -> Unclaimed {
        Unclaimed {
            quota,
            reserve,
            keep,
            by: Mutex::default(),
        }
    }

    /// Whether `who` may put file `hash` of `size` bytes now: its unclaimed files and
    /// transfers under way with it stay within the quota (if `bounded`), and the disk keeps
    /// its reserve,
    /// as `at` tells. A file already held needs no room; otherwise the put is counted until
    /// [`Unclaimed::ended`].
    ///
    /// # Errors
    /// Over the quota, or the reserve.
    pub(crate) fn admit(
        &self,
        who: &str,
        bounded: bool,
        hash: Hash,
        size: u64,
        at: &dyn Holding,
    ) -> Result<(), Failure> {
        if at.held(&hash) == Some(size) {
            return Ok(());
        }
        let now = Instant::now();
        let mut by = self.by.lock();
        // What no longer counts goes: everyone's files past their time, and this principal's
        // files no longer held.
        by.retain(|_, puts| {
            puts.retain(|_, p| p.flying > 0 || now - p.at < self.keep);
            !puts.is_empty()
        });
        if let Some(puts) = by.get_mut(who) {
            puts.retain(|h, p| p.flying > 0 || at.held(h) == Some(p.size));
        }
        let flying: u64 = by
            .values()
            .flat_map(HashMap::values)
            .filter(|p| p.flying > 0)
            .map(|p| p.size)
            .sum();
        let mine = by.entry(who.to_owned()).or_default();
        if mine.len() >= mvm_component::files::MAX_FILES && !mine.contains_key(&hash) {
            return Err(Failure::new(
                FailureKind::Refused,
                format!(
                    "{who} holds {} files here that no job names yet (at most {}): submit the \
                     jobs that name them first",
                    mine.len(),
                    mvm_component::files::MAX_FILES
                ),
            ));
        }
        let sum = |puts: &HashMap<Hash, Put>| -> u64 {
            puts.iter()
                .filter(|(h, _)| **h != hash)
                .map(|(_, p)| p.size)
                .sum()
        };
        if bounded && sum(mine).saturating_add(size) > self.quota {
            let stored: Vec<Hash> = mine
                .iter()
                .filter(|(_, p)| p.flying == 0)
                .map(|(h, _)| *h)
                .collect();
            let claimed = at.named(&stored);
            mine.retain(|h, _| !claimed.contains(h));
            let unclaimed = sum(mine);
            if unclaimed.saturating_add(size) > self.quota {
                return Err(Failure::new(
                    FailureKind::Refused,
                    format!(
                        "{who} holds {unclaimed} bytes of files here that no job names yet; \
                         a file of {size} more is over the {} allowed: submit the jobs that \
                         name them first (files no job names go an hour after they came)",
                        self.quota
                    ),
                ));
            }
        }
        let room = at
            .free()
            .map(|(free, total)| (free, self.reserve.min(total / 20)));
        if let Some((free, reserve)) = room
            && free.saturating_sub(flying) < size.saturating_add(reserve)
        {
            return Err(Failure::new(
                FailureKind::Unavailable,
                format!(
                    "no room for a file of {size} bytes: {free} bytes are free on the disk, \
                     {flying} of them promised to transfers under way, and {reserve} are kept \
                     free"
                ),
            ));
        }
        let p = mine.entry(hash).or_insert(Put {
            size,
            at: now,
            flying: 0,
        });
        p.size = size;
        p.at = now;
        p.flying += 1;
        Ok(())
    }

    /// A transfer [`Unclaimed::admit`] let begin has ended, however it did: whether the file
    /// is kept is asked of the store (`at`), not of the transfer (whose last answer may not
    /// have been read).
    pub(crate) fn ended(&self, who: &str, hash: &Hash, at: &dyn Holding) {
        let mut by = self.by.lock();
        let Some(puts) = by.get_mut(who) else { return };
        if let Some(p) = puts.get_mut(hash) {
            p.flying = p.flying.saturating_sub(1);
            if p.flying == 0 && at.held(hash) != Some(p.size) {
                puts.remove(hash);
            }
        }
        if puts.is_empty() {
            by.remove(who);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A store holding `files`, a log naming `named`, a disk with `free` bytes free.
    #[derive(Default)]
    struct At {
        files: HashMap<Hash, u64>,
        named: HashSet<Hash>,
        free: Option<(u64, u64)>,
    }

    impl Holding for At {
        fn held(&self, hash: &Hash) -> Option<u64> {
            self.files.get(hash).copied()
        }
        fn named(&self, hashes: &[Hash]) -> HashSet<Hash> {
            hashes
                .iter()
                .copied()
                .filter(|h| self.named.contains(h))
                .collect()
        }
        fn free(&self) -> Option<(u64, u64)> {
            self.free
        }
    }

    #[test]
    fn a_principal_holds_at_most_its_quota_of_files_no_job_names() {
        let u = Unclaimed::new(10 * GIB, GIB, Duration::from_secs(3600));
        let (a, b, c, d) = (
            Hash::of(b"a"),
            Hash::of(b"b"),
            Hash::of(b"c"),
            Hash::of(b"d"),
        );
        let mut at = At::default();
        // Alice puts a (6 GiB, stored), then b (4 GiB) fits, c (1 GiB) more does not.
        u.admit("alice", true, a, 6 * GIB, &at).expect("fits");
        at.files.insert(a, 6 * GIB);
        u.ended("alice", &a, &at);
        u.admit("alice", true, b, 4 * GIB, &at).expect("fits");
        let e = u.admit("alice", true, c, GIB, &at).expect_err("over");
        assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
        assert!(
            e.message.contains("alice holds 10737418240 bytes")
                && e.message.contains("no job names"),
            "{e:?}"
        );
        // Not bounded (the group's own nodes), and bob: not counted with her.
        u.admit("alice", false, c, GIB, &at).expect("unbounded");
        u.ended("alice", &c, &at);
        u.admit("bob", true, c, GIB, &at).expect("another's quota");
        // A failed transfer frees its room; a file already held needs none.
        u.ended("alice", &b, &at);
        u.admit("alice", true, c, GIB, &at).expect("fits again");
        u.admit("alice", true, a, 6 * GIB, &at)
            .expect("held already");
        // Once a job names a, it no longer counts: 9 GiB more fit.
        assert!(u.admit("alice", true, d, 9 * GIB, &at).is_err());
        at.named.insert(a);
        u.admit("alice", true, d, 9 * GIB, &at).expect("a is named");
    }

    #[test]
    fn a_put_leaves_the_reserve_free_counting_transfers_under_way() {
        let u = Unclaimed::new(100 * GIB, GIB, Duration::from_secs(3600));
        let (a, b) = (Hash::of(b"a"), Hash::of(b"b"));
        let mut at = At {
            free: Some((5 * GIB, 100 * GIB)),
            ..At::default()
        };
        u.admit("alice", true, a, 3 * GIB, &at).expect("fits");
        // 5 GiB free, 3 promised to a: 1 GiB more would eat into the reserve, also for the
        // group's own nodes.
        for bounded in [true, false] {
            let e = u
                .admit("bob", bounded, b, GIB + 1, &at)
                .expect_err("no room");
            assert_eq!(e.kind, FailureKind::Unavailable, "{e:?}");
            assert!(e.message.contains("kept free"), "{e:?}");
        }
        u.admit("bob", true, b, GIB, &at).expect("just fits");
        // a stored (its bytes on the disk now, no longer promised), b failed.
        at.files.insert(a, 3 * GIB);
        u.ended("alice", &a, &at);
        u.ended("bob", &b, &at);
        at.free = Some((2 * GIB, 100 * GIB));
        u.admit("bob", true, b, GIB, &at).expect("fits");
        u.ended("bob", &b, &at);
        // On a small disk (10 GiB), a twentieth of it is kept free, not 1 GiB: with 2 GiB
        // free, 1.5 GiB fits and a byte more does not.
        at.free = Some((2 * GIB, 10 * GIB));
        u.admit("bob", true, b, 3 * GIB / 2 + 1, &at)
            .expect_err("into the reserve");
        u.admit("bob", true, b, 3 * GIB / 2, &at).expect("fits");
    }

    #[test]
    fn files_no_job_names_stop_counting_after_a_while() {
        let u = Unclaimed::new(2 * GIB, 0, Duration::from_millis(50));
        let (a, b) = (Hash::of(b"a"), Hash::of(b"b"));
        let mut at = At::default();
        u.admit("alice", true, a, 2 * GIB, &at).expect("fits");
        at.files.insert(a, 2 * GIB);
        u.ended("alice", &a, &at);
        assert!(u.admit("alice", true, b, 1, &at).is_err());
        std::thread::sleep(Duration::from_millis(80));
        u.admit("alice", true, b, GIB, &at).expect("a is let go");
    }
}
