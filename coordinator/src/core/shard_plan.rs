//! Which shards a round hands out: every shard once per epoch, in a seeded order, with
//! institutions' own shards kept for their owners.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use amity_shared::rng::Rng;
use amity_shared::store::BlobId;
use serde::{Deserialize, Serialize};

/// The scheduling of shards over epochs: each shard once per epoch, in a seeded order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardPlan {
    /// Every shard, with its owner when an institution holds it itself.
    pub shards: BTreeMap<BlobId, (u64, Option<String>)>,
    /// Current epoch.
    pub epoch: u64,
    /// Shards not yet handed out this epoch, in order.
    pub queue: VecDeque<BlobId>,
    /// Shards trained (update accepted) this epoch.
    pub covered: BTreeSet<BlobId>,
    /// Epochs completed.
    pub epochs_done: u64,
}

impl ShardPlan {
    /// Clips in every scheduled shard.
    pub fn clips(&self) -> u64 {
        self.shards.values().map(|(clips, _)| clips).sum()
    }

    /// Clips in the shards trained this epoch.
    pub fn covered_clips(&self) -> u64 {
        self.covered
            .iter()
            .filter_map(|id| self.shards.get(id))
            .map(|(clips, _)| clips)
            .sum()
    }

    pub(super) fn refill(&mut self, seed: u64) {
        let queued: BTreeSet<&BlobId> = self.queue.iter().collect();
        let mut ids: Vec<BlobId> = self
            .shards
            .keys()
            .filter(|id| !queued.contains(id))
            .copied()
            .collect();
        Rng::derive(seed, &[0x5a4d, self.epoch]).shuffle(&mut ids);
        self.queue.extend(ids);
    }

    /// Puts the `assigned` shards that are not in `trained` back at the front of the queue, in
    /// their order.
    pub(super) fn requeue(&mut self, assigned: Vec<BlobId>, trained: &BTreeSet<BlobId>) {
        for id in assigned.into_iter().rev() {
            if !trained.contains(&id) {
                self.queue.push_front(id);
            }
        }
    }

    fn may_train(&self, id: &BlobId, name: &str) -> bool {
        match self.shards.get(id) {
            Some((_, None)) => true,
            Some((_, Some(owner))) => owner == name,
            None => false,
        }
    }

    /// Takes up to `n` shards `name` may train, starting a new epoch when this one is used up.
    pub(super) fn take(&mut self, n: usize, name: &str, seed: u64) -> Vec<BlobId> {
        let mut out = Vec::new();
        // An institution's own shards first: they cost no transfer.
        let mut i = 0;
        while out.len() < n && i < self.queue.len() {
            if matches!(self.shards.get(&self.queue[i]), Some((_, Some(o))) if o == name) {
                out.extend(self.queue.remove(i));
            } else {
                i += 1;
            }
        }
        for pass in 0..2 {
            let mut i = 0;
            while out.len() < n && i < self.queue.len() {
                if self.may_train(&self.queue[i], name) {
                    out.extend(self.queue.remove(i));
                } else {
                    i += 1;
                }
            }
            if out.len() == n || pass == 1 {
                break;
            }
            // This epoch has nothing left for this worker: open the next one (shards still in
            // flight are not queued twice).
            if self.covered.len() + self.queue.len() < self.shards.len() && !self.queue.is_empty() {
                break;
            }
            self.epoch += 1;
            self.epochs_done += (!self.covered.is_empty()) as u64;
            self.covered.clear();
            self.refill(seed);
        }
        out
    }
}
