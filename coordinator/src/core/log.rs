//! What the core records: the command log's entries, each closed round's summary and the
//! per-institution accounting a release's provenance is built from.

use amity_shared::federated::LossStats;
use amity_shared::store::BlobId;
use serde::{Deserialize, Serialize};

use crate::aggregate;

/// An entry of the command log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LogEntry {
    /// An update was accepted for aggregation (its blob is in the store).
    UpdateAccepted {
        /// Round it counts towards.
        round: u64,
        /// The round it was trained in.
        trained_round: u64,
        /// Sender's certificate name.
        from: String,
        /// Blob.
        blob: BlobId,
        /// Wire bytes.
        bytes: u64,
        /// Clips.
        samples: u64,
        /// Steps.
        steps: u64,
        /// Losses.
        loss: LossStats,
        /// Shards it trained on.
        shards: Vec<BlobId>,
    },
    /// A round closed; its resulting state is the snapshot blob.
    RoundClosed {
        /// The round.
        round: u64,
        /// Snapshot blob.
        snapshot: BlobId,
        /// Parameters hash after the round.
        params: BlobId,
        /// The global-state blob the snapshot names for its parameters (absent in logs
        /// written before snapshots named one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<BlobId>,
    },
    /// An operator decision (applied on a restart after the snapshot it follows).
    Operator(super::OperatorAction),
}

/// What a closed round did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// Round number.
    pub round: u64,
    /// Updates aggregated.
    pub accepted: Vec<String>,
    /// Updates rejected, with reasons.
    pub rejected: Vec<(String, String)>,
    /// Workers expected but silent.
    pub missing: Vec<String>,
    /// Clips processed in the round.
    pub samples: u64,
    /// Local steps, summed over workers.
    pub steps: u64,
    /// Sample-weighted mean of the workers' mean losses (NaN, `null` in JSON, when no update
    /// was accepted).
    #[serde(deserialize_with = "amity_shared::stats::f64_or_nan")]
    pub loss: f64,
    /// Sample-weighted mean of the workers' predict-the-mean baselines
    /// ([`LossStats::baseline`](amity_shared::federated::LossStats::baseline)): `loss / baseline`
    /// is the share of the target's spread left unexplained, comparable across rounds while the
    /// EMA target changes. NaN when no update was accepted, and in logs from before it existed.
    #[serde(
        default = "amity_shared::stats::nan",
        deserialize_with = "amity_shared::stats::f64_or_nan"
    )]
    pub baseline: f64,
    /// Bytes of updates received.
    pub bytes_up: u64,
    /// Bytes of state sent for this round (delta or full, per worker).
    pub bytes_down: u64,
    /// What DDP's dense fp32 synchronisation of every local step would have moved (the
    /// model's gradients up and down, 8 bytes a parameter a step; not the EMA target, which
    /// DDP computes on every replica).
    pub dense_bytes: u64,
    /// Parameters hash after the round.
    pub params: BlobId,
    /// Corpus epoch.
    pub epoch: u64,
    /// Norm of the outer optimiser's step over the norm of the mean pseudo-gradient (model
    /// part): 1 for plain averaging at outer lr 1; Nesterov momentum makes it grow over rounds.
    #[serde(default, deserialize_with = "amity_shared::stats::f64_or_nan")]
    pub outer_step_ratio: f64,
    /// Whether the round was a flush (dense updates both ways, before a checkpoint or the end).
    #[serde(default)]
    pub flush: bool,
    /// The held-out loss of the model before the round's step (contribution scoring on).
    #[serde(default)]
    pub held_out_loss: Option<f64>,
    /// Each scored update's relative change of the held-out loss when applied alone
    /// (negative: it helps).
    #[serde(default)]
    pub scores: Vec<(String, f64)>,
    /// How each update pointed relative to the recent global steps and to the others.
    #[serde(default)]
    pub alignment: Vec<aggregate::Alignment>,
    /// Set once the per-worker lists above (accepted, rejected, missing, scores, alignment)
    /// were dropped, [`DETAIL_ROUNDS`] rounds after the close or sooner when many workers fill
    /// [`DETAIL_ENTRIES`], so that the history every
    /// snapshot and status carries grows by a few numbers per round rather than by the number
    /// of workers: their counts stay here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinned: Option<ThinnedCounts>,
}

/// The most recent rounds whose summaries keep their per-worker lists; older ones keep counts
/// ([`RoundSummary::thin`]).
pub const DETAIL_ROUNDS: usize = 64;

/// The most per-worker entries the detailed summaries hold together (the newest always keeps
/// its lists): at 1000 workers a summary has ~2000 (~200 KB as JSON, a tenth of the tiny
/// preset's model state, written in every snapshot), so only the last two or three keep them.
pub const DETAIL_ENTRIES: usize = 4096;

/// Thins every summary but the newest ones that fit in [`DETAIL_ROUNDS`] and
/// [`DETAIL_ENTRIES`].
pub(super) fn thin_history(history: &mut [RoundSummary]) {
    let mut entries = 0;
    for (age, summary) in history.iter_mut().rev().enumerate() {
        if summary.thinned.is_some() {
            // Everything older was thinned before it.
            break;
        }
        entries += summary.entries();
        if age > 0 && (age >= DETAIL_ROUNDS || entries > DETAIL_ENTRIES) {
            summary.thin();
        }
    }
}

/// What a thinned [`RoundSummary`] keeps of its per-worker lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinnedCounts {
    /// Updates aggregated.
    pub accepted: u64,
    /// Workers expected but silent.
    pub missing: u64,
    /// Updates rejected, by kind ([`aggregate::rejection_kind`]).
    pub rejected: std::collections::BTreeMap<String, u64>,
}

impl RoundSummary {
    /// Drops the per-worker lists, keeping their counts (idempotent).
    pub fn thin(&mut self) {
        if self.thinned.is_some() {
            return;
        }
        let counts = ThinnedCounts {
            accepted: self.accepted.len() as u64,
            missing: self.missing.len() as u64,
            rejected: self.rejected_by_kind(),
        };
        self.accepted = Vec::new();
        self.rejected = Vec::new();
        self.missing = Vec::new();
        self.scores = Vec::new();
        self.alignment = Vec::new();
        self.thinned = Some(counts);
    }

    /// Per-worker entries in the lists.
    fn entries(&self) -> usize {
        self.accepted.len()
            + self.rejected.len()
            + self.missing.len()
            + self.scores.len()
            + self.alignment.len()
    }

    /// The loss over its predict-the-mean baseline: below 1 the workers' predictor explained
    /// part of the target (NaN where the baseline was not reported).
    pub fn loss_over_mean(&self) -> f64 {
        self.loss / self.baseline
    }

    /// Updates aggregated (thinned or not).
    pub fn accepted_count(&self) -> u64 {
        self.thinned
            .as_ref()
            .map_or(self.accepted.len() as u64, |t| t.accepted)
    }

    /// Updates rejected, by kind ([`aggregate::rejection_kind`]), thinned or not.
    pub fn rejected_by_kind(&self) -> std::collections::BTreeMap<String, u64> {
        if let Some(t) = &self.thinned {
            return t.rejected.clone();
        }
        let mut by_kind = std::collections::BTreeMap::new();
        for (_, why) in &self.rejected {
            *by_kind
                .entry(aggregate::rejection_kind(why).to_owned())
                .or_default() += 1;
        }
        by_kind
    }
}

/// Per-institution accounting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Clips contributed.
    pub samples: u64,
    /// Local steps contributed.
    pub steps: u64,
    /// Updates accepted.
    pub updates: u64,
    /// Updates rejected.
    pub rejected: u64,
    /// Shard-trainings contributed (a shard trained in two epochs counts twice).
    pub shards: u64,
    /// Updates scored on the held-out clips.
    #[serde(default)]
    pub scored: u64,
    /// Sum of their relative changes of the held-out loss (negative: they helped); over
    /// `scored`, the institution's mean contribution score.
    #[serde(default, deserialize_with = "amity_shared::stats::f64_or_nan")]
    pub loss_change: f64,
}
