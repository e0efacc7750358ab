//! Turning a checkpoint into a release: weights, config, model card (with measured evaluation),
//! signed manifest.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use serde::Deserialize;

use crate::card::{CardInfo, Contributor, CorpusInfo, EvalResult, render};
use crate::sign::ReleaseKey;
use crate::{CARD, CONFIG, MODEL, ReleaseError, Signed, write_release};
use amity_shared::checkpoint::{Checkpoint, layouts};
use amity_shared::eval::{ProbeSet, probe_report};
use amity_shared::train::Trainer;

/// What a release is made of, besides the checkpoint.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Release name.
    pub name: String,
    /// Publisher (the coordinator's name).
    pub publisher: String,
    /// The corpus, when known.
    pub corpus: Option<CorpusInfo>,
    /// Evaluation results already measured (the probes are added by [`publish`] when
    /// `probe_videos > 0`).
    pub evaluation: Vec<EvalResult>,
    /// Videos for the probe evaluation (2/3 fit, 1/3 scored); 0 skips it.
    pub probe_videos: usize,
    /// Licence (SPDX id).
    pub licence: String,
}

/// One institution's line in the checkpoint's `amity.provenance` metadata.
#[derive(Debug, Deserialize)]
struct ProvenanceLine {
    #[serde(default)]
    samples: u64,
    #[serde(default)]
    steps: u64,
    #[serde(default)]
    updates: u64,
    #[serde(default)]
    rejected: u64,
    #[serde(default)]
    scored: u64,
    #[serde(default)]
    loss_change: f64,
}

/// The contributors recorded in a checkpoint's metadata, largest first.
pub fn contributors(ckpt: &Checkpoint) -> Vec<Contributor> {
    let Some(text) = ckpt.meta.get("provenance") else {
        return Vec::new();
    };
    let lines: BTreeMap<String, ProvenanceLine> = serde_json::from_str(text).unwrap_or_default();
    let mut out: Vec<Contributor> = lines
        .into_iter()
        .filter(|(_, p)| p.updates > 0)
        .map(|(name, p)| Contributor {
            name,
            samples: p.samples,
            steps: p.steps,
            updates: p.updates,
            rejected: p.rejected,
            score: (p.scored > 0).then(|| p.loss_change / p.scored as f64),
        })
        .collect();
    out.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.name.cmp(&b.name)));
    out
}

/// Frozen-encoder probes on held-out synthetic videos, for the checkpoint and for a randomly
/// initialised encoder of the same shape.
pub fn probe_evaluation(ckpt: &Checkpoint, videos: usize) -> Result<Vec<EvalResult>, ReleaseError> {
    let device = Device::flex();
    let trained = Trainer::from_checkpoint(ckpt, &device)
        .map_err(|e| ReleaseError::Invalid(format!("checkpoint weights: {e}")))?;
    let random = Trainer::new(ckpt.config.clone(), &device);
    let n_test = (videos / 3).max(2);
    let set = ProbeSet::for_model(&ckpt.config.model, videos - n_test.min(videos), n_test);
    let (a, b) = (probe_report(&trained, &set), probe_report(&random, &set));
    let protocol = format!(
        "ridge probe on frozen target-encoder features, {} synthetic moving-shape videos fitted, {} held out",
        set.train.len(),
        set.test.len()
    );
    let row = |metric: &str, value: f64, random: f64| EvalResult {
        metric: metric.into(),
        value,
        random_init: Some(random),
        protocol: protocol.clone(),
    };
    Ok(vec![
        row("velocity_r2", a.velocity_r2, b.velocity_r2),
        row("position_r2", a.position_r2, b.position_r2),
        row("shape_accuracy", a.shape_acc, b.shape_acc),
        row("colour_accuracy", a.colour_acc, b.colour_acc),
    ])
}

/// Writes the release of checkpoint file `checkpoint` into `out` (which must not exist) and
/// signs it with `key`.
pub fn publish(
    checkpoint: &Path,
    out: &Path,
    opts: &PublishOptions,
    key: &ReleaseKey,
) -> Result<Signed, ReleaseError> {
    let bytes = std::fs::read(checkpoint).map_err(|source| ReleaseError::Io {
        path: checkpoint.to_owned(),
        source,
    })?;
    let ckpt = Checkpoint::from_bytes(&bytes, &checkpoint.display().to_string())
        .map_err(|e| ReleaseError::Invalid(e.to_string()))?;
    let round = ckpt
        .meta
        .get("round")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let mut evaluation = opts.evaluation.clone();
    if opts.probe_videos > 0 {
        evaluation.extend(probe_evaluation(&ckpt, opts.probe_videos)?);
    }
    let measured: Vec<&str> = evaluation.iter().map(|e| e.metric.as_str()).collect();
    let not_measured = [
        ("surprise_paired_accuracy", "surprise paired accuracy"),
        ("planning_success", "planning success"),
        ("velocity_r2", "frozen-encoder probes"),
    ]
    .iter()
    .filter(|(m, _)| !measured.contains(m))
    .map(|(_, what)| (*what).to_owned())
    .collect();
    let (model_layout, target_layout) = layouts(&ckpt.config);
    let info = CardInfo {
        name: opts.name.clone(),
        publisher: opts.publisher.clone(),
        config: ckpt.config.clone(),
        round,
        params: ckpt.meta.get("params").cloned(),
        parameters: (
            target_layout.total,
            model_layout.total - target_layout.total,
        ),
        corpus: opts.corpus.clone(),
        contributors: contributors(&ckpt),
        evaluation,
        not_measured,
        licence: opts.licence.clone(),
    };
    let card = render(&info);
    let mut config = serde_json::to_vec_pretty(&ckpt.config).expect("a config serialises");
    config.push(b'\n');
    write_release(
        out,
        &opts.name,
        &opts.publisher,
        round,
        &[
            (MODEL, bytes.as_slice()),
            (CONFIG, config.as_slice()),
            (CARD, card.as_bytes()),
        ],
        key,
    )
}
