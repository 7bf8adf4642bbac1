//! Which nodes hold which input files: the nodes that prepared a part of a job with an input
//! keep it in their file stores for their next jobs, so a node placed later for a job with the same input
//! (another point of a sweep, a job run again) can fetch it from one of them instead of from
//! the super-peer ([`crate::proto::PartSpec::files_from`]). A hint, not a record: it is not in
//! the job log, it forgets the oldest files past a bound, and a node named may have let the
//! file go (the fetching node then asks the next one, and the super-peer last). Only live
//! nodes are named.

use std::collections::{HashMap, VecDeque};

use libp2p::PeerId;

use crate::proto::Hash;

/// The most nodes remembered per file (the newest).
const PER_FILE: usize = 3;
/// The most files remembered (the oldest forgotten first).
const FILES: usize = 4096;

/// The nodes that were sent each input file's job, newest first.
#[derive(Debug, Default)]
pub(super) struct Holders {
    by_file: HashMap<Hash, VecDeque<PeerId>>,
    /// Files in the order they were first remembered.
    order: VecDeque<Hash>,
}

impl Holders {
    /// The nodes that may hold any of `files`, newest first, each once.
    pub(super) fn of(&self, files: impl IntoIterator<Item = Hash>) -> Vec<PeerId> {
        let mut out: Vec<PeerId> = Vec::new();
        for f in files {
            for p in self.by_file.get(&f).into_iter().flatten() {
                if !out.contains(p) {
                    out.push(*p);
                }
            }
        }
        out
    }

    /// `peer` prepared a part of a job with `file`: it holds it.
    pub(super) fn add(&mut self, file: Hash, peer: PeerId) {
        let known = self.by_file.contains_key(&file);
        let peers = self.by_file.entry(file).or_default();
        peers.retain(|p| *p != peer);
        peers.push_front(peer);
        peers.truncate(PER_FILE);
        if !known {
            self.order.push_back(file);
            while self.order.len() > FILES {
                if let Some(old) = self.order.pop_front() {
                    self.by_file.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_holders_are_named_first_each_once_and_the_oldest_files_are_forgotten() {
        let mut h = Holders::default();
        let (a, b, c, d) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let (f, g) = (Hash::of(b"f"), Hash::of(b"g"));
        for p in [a, b, c, d] {
            h.add(f, p);
        }
        h.add(g, a);
        assert_eq!(h.of([f]), vec![d, c, b], "at most three, newest first");
        assert_eq!(h.of([f, g]), vec![d, c, b, a]);
        h.add(f, b);
        assert_eq!(h.of([f]), vec![b, d, c], "named again: newest");
        for i in 0..FILES {
            h.add(Hash::of(&i.to_le_bytes()), a);
        }
        assert!(h.of([f, g]).is_empty(), "the oldest files are forgotten");
        assert_eq!(h.of([Hash::of(&(FILES - 1).to_le_bytes())]), vec![a]);
    }
}
