//! Robust aggregation of pseudo-gradients and the outer optimiser: plain maths on flat vectors.
//!
//! Screening first, and every test holds with one or two workers (one of them hostile):
//! - an update with a NaN or infinity is rejected;
//! - so is one whose root-mean-square value exceeds the absolute cap `max_rms` (an honest
//!   pseudo-gradient moves weights by far less than 1 each; a huge-but-finite update would
//!   overflow the outer step);
//! - so is one whose L2 norm is more than `reject_ratio` times the reference norm: the *lower*
//!   median of this round's norms and recent accepted ones, so that with two updates the smaller
//!   sets the bar (a hostile update can then at worst get an honest one rejected, never pass
//!   itself off as the reference);
//! - with three or more updates, one whose cosine with the sum of the others is below
//!   `min_agreement` (0: it points against them) is rejected, the worst first and one at a
//!   time, until the rest agree. A sign-flipped update at the honest norm passes every norm
//!   test but points against the others. Measured (`amity bench federated`, 3 workers, seed 0
//!   and 1, H = 20 and 50, IID and not): honest updates agree at +0.29 to +0.66 with the
//!   others, a flipped one at -0.72, noise at 0.00; with the screen the velocity R2 under a
//!   flip is 0.318 against 0.316 without an attacker (-0.016 without the screen). In
//!   `amity demo` (long time-budgeted rounds of unequal workers) honest agreement fell to
//!   +0.03 in the first round, so the limit is 0, not higher: noise (cosine near 0) is not
//!   reliably caught. With two updates there is no majority to agree with;
//! - a claimed weight (samples processed) above `weight_cap` times the lower median weight is
//!   cut to it: no claim of work buys more than that share of the mean.
//!
//! Each accepted update is clipped to `clip_ratio` (1) times the lower median norm of the
//! round's accepted updates, so that an update scaled up below `reject_ratio` counts as much as
//! an ordinary one (bench, worker 0 sending 3x its update: velocity R2 0.206 without clipping,
//! 0.320 with it at H = 50 and 0.296 at H = 20, against 0.316 and 0.301 without an attacker;
//! `amity demo` with clipping: 0.304). The reference is this round's norms alone: against the
//! history, which holds clipped norms, the limit ratcheted down until a run at H = 20 stopped
//! learning (R2 -0.03). The rest are averaged, weighted by the samples each processed
//! (default), or by a coordinate-wise trimmed mean. The outer step is SGD with Nesterov momentum (lr 0.7, momentum 0.5
//! by default; DiLoCo's 0.9 suits runs of hundreds of rounds); with lr 1 and no momentum it is
//! FedAvg.
//!
//! **Memory is O(model), not O(workers x model).** An update is an [`UpdateValues`]: the
//! coordinator's shell hands the core a handle that reads and decodes the update from the
//! content store on demand, so nothing of an update is held between its arrival and the close.
//! Screening and the weighted mean then stream: one pass over every update for the finite, RMS
//! and norm screens, two for the agreement screen (the sum of all, then each update against it;
//! two more per update it rejects), one for the mean, each visiting only the values the codec
//! sent ([`Entries::for_each`]). Scalars per update and two model-sized vectors are all that is
//! held. The trimmed mean alone holds every accepted update densely. `amity bench scale`
//! measures this with 1000 simulated workers.

use amity_shared::federated::codec::Entries;
use serde::{Deserialize, Serialize};

mod screen;
mod values;

pub use screen::{Alignment, screen};
pub use values::{ReadUpdate, StoredUpdate, UpdateValues};

/// How accepted updates are combined (a config table may set any subset of its keys).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// `mean` (weighted by samples) or `trimmed-mean`.
    pub rule: AggregationRule,
    /// Fraction cut from each end per coordinate by `trimmed-mean`.
    pub trim: f64,
    /// Clip every accepted update's norm to this multiple of the lower median norm of the
    /// round's accepted updates (0: no clipping).
    pub clip_ratio: f64,
    /// Reject updates whose norm exceeds this multiple of the reference (lower median) norm.
    pub reject_ratio: f64,
    /// Reject updates whose root-mean-square value exceeds this, whatever the others send.
    #[serde(default = "default_max_rms")]
    pub max_rms: f64,
    /// An update weighs at most this multiple of the lower median weight of the round.
    #[serde(default = "default_weight_cap")]
    pub weight_cap: f64,
    /// With three or more updates in a round, one whose cosine with the sum of the others is
    /// below this is rejected, the worst first, until the rest agree (a sign-flipped update
    /// points against the honest ones; -1 turns the screen off).
    #[serde(default = "default_min_agreement")]
    pub min_agreement: f64,
    /// Held-out clips the coordinator scores every update on (0, the default: no scoring; see
    /// [`crate::scoring`]).
    #[serde(default = "default_held_out_clips")]
    pub held_out_clips: usize,
    /// An update that raises the held-out loss by more than this fraction of it is rejected;
    /// one that raises it by less is down-weighted in proportion.
    #[serde(default = "default_score_tolerance")]
    pub score_tolerance: f64,
}

/// Off by default: measured in `amity demo`, the held-out JEPA loss against the coordinator's
/// fixed target swings from -26% to +23% for honest updates of one round (the target moves
/// between rounds), so a fixed tolerance rejects honest work; see [`crate::scoring`].
fn default_held_out_clips() -> usize {
    0
}

fn default_score_tolerance() -> f64 {
    0.02
}

fn default_max_rms() -> f64 {
    1.0
}

fn default_weight_cap() -> f64 {
    4.0
}

fn default_min_agreement() -> f64 {
    0.0
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig {
            rule: AggregationRule::Mean,
            trim: 0.2,
            clip_ratio: 1.0,
            reject_ratio: 10.0,
            max_rms: default_max_rms(),
            weight_cap: default_weight_cap(),
            min_agreement: default_min_agreement(),
            held_out_clips: default_held_out_clips(),
            score_tolerance: default_score_tolerance(),
        }
    }
}

/// The combination rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationRule {
    /// Mean weighted by samples processed.
    Mean,
    /// Per-coordinate mean after dropping the `trim` fraction of largest and smallest values.
    TrimmedMean,
}

/// The outer optimiser's settings (a config table may set any subset of its keys).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OuterConfig {
    /// Outer learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov (true) or heavy-ball momentum.
    pub nesterov: bool,
}

impl Default for OuterConfig {
    /// DiLoCo's lr 0.7 with Nesterov momentum 0.5, not DiLoCo's 0.9: over the 5 to 50 rounds of
    /// our runs a momentum of 0.9 makes the outer step up to 4.4x the mean pseudo-gradient and
    /// the released encoder lost most of what it learnt (`amity bench federated`, 300 local
    /// steps at H = 50, fp32: velocity R2 0.111 at 0.9, 0.269 at 0.5, 0.207 without momentum,
    /// 0.383 for the central reference; with the default codec 0.104 at 0.9, 0.286 at 0.5).
    fn default() -> Self {
        OuterConfig {
            lr: 0.7,
            momentum: 0.5,
            nesterov: true,
        }
    }
}

/// One update offered to aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Who sent it (certificate name).
    pub from: String,
    /// The pseudo-gradient, read when aggregation needs it.
    pub values: UpdateValues,
    /// Its weight (samples processed, times any staleness discount).
    pub weight: f64,
    /// What its values are multiplied by when combined: 1, or less where [`screen`] clipped
    /// its norm.
    pub scale: f32,
    /// Its L2 norm as combined (after clipping); set by [`screen`].
    pub norm: f64,
}

impl Candidate {
    /// An update from `from` of weight `weight`, not yet screened.
    pub fn new(from: impl Into<String>, values: impl Into<UpdateValues>, weight: f64) -> Self {
        Candidate {
            from: from.into(),
            values: values.into(),
            weight,
            scale: 1.0,
            norm: 0.0,
        }
    }

    /// Its values, or why they could not be read back (naming the sender).
    fn read(&self) -> Result<std::borrow::Cow<'_, Entries>, String> {
        self.values
            .read()
            .map_err(|e| format!("the update from {} could not be read back: {e}", self.from))
    }
}

/// L2 norm, in f64.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// A short, stable label for a rejection reason written by the coordinator (the screens here,
/// contribution scoring, the shell's refusals), for a metric's `reason` label: `non_finite`,
/// `rms_cap`, `norm`, `disagreement`, `held_out_loss`, `refused` (did not decode or match its
/// announcement), else `other`.
pub fn rejection_kind(reason: &str) -> &'static str {
    const KINDS: [(&str, &str); 6] = [
        ("contains NaN", "non_finite"),
        ("root-mean-square value", "rms_cap"),
        ("norm ", "norm"),
        ("points away", "disagreement"),
        ("raises the held-out loss", "held_out_loss"),
        ("refused on arrival", "refused"),
    ];
    KINDS
        .iter()
        .find(|(start, _)| reason.starts_with(start))
        .map_or("other", |(_, kind)| kind)
}

/// Combines accepted updates over their whole length, each scaled by its `scale`: one pass
/// over each update's sent values for the weighted mean (memory: the result), every
/// update held at once for the trimmed mean (which sorts each coordinate across updates). Fails
/// when there is nothing to combine or an update cannot be read back.
pub fn combine(accepted: &[Candidate], cfg: &AggregationConfig) -> Result<Vec<f32>, String> {
    let len = accepted
        .first()
        .ok_or("no updates to combine")?
        .values
        .len();
    match cfg.rule {
        AggregationRule::Mean => {
            // Summed in f32, in a fixed order (every replica gets the same bits): the error of
            // a thousand f32 additions is far below what the codecs lose, and an f64 sum would
            // double the largest buffer of the round.
            let total: f64 = accepted.iter().map(|c| c.weight).sum();
            let mut out = vec![0.0f32; len];
            for c in accepted {
                let w = if total > 0.0 {
                    c.weight / total
                } else {
                    1.0 / accepted.len() as f64
                } as f32;
                let s = c.scale;
                c.read()?.for_each(|i, v| out[i] += w * (v * s));
            }
            Ok(out)
        }
        AggregationRule::TrimmedMean => {
            let n = accepted.len();
            let cut = ((cfg.trim * n as f64).floor() as usize).min((n - 1) / 2);
            let mut dense = Vec::with_capacity(n);
            for c in accepted {
                let mut v = c.read()?.to_dense();
                v.iter_mut().for_each(|x| *x *= c.scale);
                dense.push(v);
            }
            let mut column = vec![0.0f32; n];
            Ok((0..len)
                .map(|i| {
                    for (slot, v) in column.iter_mut().zip(&dense) {
                        *slot = v[i];
                    }
                    column.sort_by(f32::total_cmp);
                    let kept = &column[cut..n - cut];
                    kept.iter().map(|x| *x as f64).sum::<f64>() as f32 / kept.len() as f32
                })
                .collect())
        }
    }
}

/// SGD with (Nesterov) momentum over a flat vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OuterOptimizer {
    /// Settings.
    pub cfg: OuterConfig,
    /// The momentum buffer (empty until the first step).
    pub momentum: Vec<f32>,
}

impl OuterOptimizer {
    /// A fresh optimiser.
    pub fn new(cfg: OuterConfig) -> Self {
        OuterOptimizer {
            cfg,
            momentum: Vec::new(),
        }
    }

    /// The step to add to the parameters for the aggregated pseudo-gradient `g`:
    /// `buf = mu * buf + g`, then `-lr * (g + mu * buf)` (Nesterov) or `-lr * buf`.
    pub fn step(&mut self, g: &[f32]) -> Vec<f32> {
        let (step, momentum) = self.propose(g);
        self.momentum = momentum;
        step
    }

    /// [`OuterOptimizer::step`] without changing the optimiser: the step and the momentum
    /// buffer it would leave, for the caller to check (finite?) before keeping the buffer.
    pub fn propose(&self, g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut step = g.to_vec();
        let momentum = self.step_in_place(&mut step);
        (step, momentum)
    }

    /// [`OuterOptimizer::propose`] without a copy: replaces `g` by the step and returns the
    /// momentum buffer it would leave (the optimiser is unchanged).
    pub fn step_in_place(&self, g: &mut [f32]) -> Vec<f32> {
        let (lr, mu) = (self.cfg.lr as f32, self.cfg.momentum as f32);
        let mut momentum = if self.momentum.len() == g.len() {
            self.momentum.clone()
        } else {
            vec![0.0; g.len()]
        };
        for (b, g) in momentum.iter_mut().zip(g.iter_mut()) {
            *b = mu * *b + *g;
            let dir = if self.cfg.nesterov { *g + mu * *b } else { *b };
            *g = -lr * dir;
        }
        momentum
    }
}

#[cfg(test)]
mod tests;
