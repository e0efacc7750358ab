//! Collapse telemetry of the shared model, for the dashboard and `/metrics`: after each round the
//! target encoder (what probes, releases and the planner read) embeds a fixed set of held-out
//! clips, and the per-dimension std of its features and the RankMe of the clip embeddings are
//! recorded. A collapsing run shows both falling towards 0 and 1.
//!
//! The measurement runs on a thread of its own, so the driver never waits for a forward pass.
//! It reads the model, it never changes it: it is this process's observation, not replicated
//! state (a replica that just joined has only the rounds since).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use amity_shared::config::Config;
use amity_shared::data::ClipSource;
use amity_shared::rng::Rng;
use amity_shared::train::Trainer;
use burn::tensor::Device;
use serde::Serialize;

/// One round's telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoundTelemetry {
    /// The round after which it was measured.
    pub round: u64,
    /// Mean over dimensions of the per-dimension std of the target encoder's token features.
    pub feature_std: f64,
    /// The smallest per-dimension std.
    pub feature_std_min: f64,
    /// RankMe effective rank of the clip-pooled embeddings (1: collapsed; at most the clips).
    pub rankme: f64,
    /// The same of the embeddings less their mean: the directions the clips differ in, which a
    /// large mean they all share does not hide (`stats::rankme_centred`).
    pub rankme_centred: f64,
}

/// The seed label of the telemetry clips (distinct from training and scoring streams).
const TELEMETRY: u64 = 0x7e1e_3e7e;

/// Measures telemetry in the background; results land in [`Probe::results`].
#[derive(Debug)]
pub(crate) struct Probe {
    jobs: mpsc::Sender<(u64, Vec<f32>)>,
    results: Arc<Mutex<Vec<RoundTelemetry>>>,
}

impl Probe {
    /// Starts the measuring thread: `clips` clips of `source` for `run`'s model.
    pub(crate) fn start(run: Config, source: ClipSource, clips: usize) -> Self {
        let (jobs, rx) = mpsc::channel::<(u64, Vec<f32>)>();
        let results = Arc::new(Mutex::new(Vec::new()));
        let out = results.clone();
        let spawned = std::thread::Builder::new()
            .name("amity-telemetry".into())
            .spawn(move || {
                let device = Device::flex();
                let seed = Rng::derive(run.train.seed, &[TELEMETRY]).next_u64();
                let batch = source.batch(seed, 0, clips.max(2), &run.model);
                let mut trainer = Trainer::new(run, &device);
                while let Ok((round, target)) = rx.recv() {
                    // Only the newest job matters when rounds close faster than this measures.
                    let (round, target) = rx.try_iter().last().unwrap_or((round, target));
                    if let Err(e) = trainer.load_target_flat(&target) {
                        tracing::warn!("telemetry: {e}");
                        continue;
                    }
                    let t = trainer.telemetry(&batch);
                    out.lock().expect("telemetry lock").push(RoundTelemetry {
                        round,
                        feature_std: t.feature_std,
                        feature_std_min: t.feature_std_min,
                        rankme: t.rankme,
                        rankme_centred: t.rankme_centred,
                    });
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("telemetry thread: {e}; no collapse telemetry");
        }
        Probe { jobs, results }
    }

    /// Measures the target encoder `target` (flat) as it stands after `round`.
    pub(crate) fn measure(&self, round: u64, target: &[f32]) {
        let _ = self.jobs.send((round, target.to_vec()));
    }

    /// Every measurement so far, oldest first.
    pub(crate) fn results(&self) -> Vec<RoundTelemetry> {
        self.results.lock().expect("telemetry lock").clone()
    }
}
