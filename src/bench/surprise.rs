//! `amity bench surprise`: the surprise detector on counterbalanced violation quadruplets and
//! on the first detector's pairs (see [`amity_planner::surprise_bench`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use amity_planner::surprise::Scoring;
use amity_planner::surprise_bench::{
    QuadrupletScores, SurpriseBenchOptions, SurpriseBenchReport, SurpriseScores, pretrain_tiny,
    run as run_surprise_bench,
};
use amity_shared::checkpoint::Checkpoint;
use amity_shared::device::Backend;

use crate::plan_cmd::load_checkpoint;

/// `amity bench surprise`.
#[derive(Debug, Args)]
pub struct SurpriseBenchArgs {
    /// The encoder and predictor (a release folder or checkpoint); default: the tiny preset,
    /// with a 128-wide predictor and a time mask set, pretrained for `--train-steps` on
    /// synthetic clips with walls and full occlusions (about 15 minutes on 2 cores).
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// Pretraining steps when no `--ckpt` is given.
    #[arg(long, default_value_t = 1500)]
    pub train_steps: u64,
    /// Violation pairs (the kinds take turns), scored as the first detector was.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Counterbalanced test quadruplets (the five kinds take turns).
    #[arg(long, default_value_t = 100)]
    pub quadruplets: usize,
    /// Validation quadruplets (other seeds) the headline's scoring is chosen on.
    #[arg(long, default_value_t = 40)]
    pub validation: usize,
    /// Frames per video.
    #[arg(long, default_value_t = 32)]
    pub frames: usize,
    /// Compute backend of the pretraining and scoring.
    #[arg(long, default_value = "flex")]
    pub backend: String,
    /// Where to save the bench's pretrained checkpoint (when no `--ckpt` is given), to score it
    /// again later with `--ckpt` without pretraining again.
    #[arg(long)]
    pub save_ckpt: Option<PathBuf>,
}

/// Runs `amity bench surprise`.
pub fn bench_surprise(a: SurpriseBenchArgs) -> Result<()> {
    let backend = Backend::parse_available(&a.backend)?;
    let device = backend.device(0)?;
    let checkpoint = match &a.ckpt {
        Some(p) => Some(load_checkpoint(p)?),
        None => None,
    };
    let checkpoint = match checkpoint {
        Some(c) => c,
        None => {
            println!(
                "pretraining the tiny preset (predictor {} wide) on synthetic clips for {} steps on {backend}",
                amity_planner::surprise_bench::PREDICTOR_WIDTH,
                a.train_steps
            );
            let every = (a.train_steps / 10).max(1);
            let trainer = pretrain_tiny(a.train_steps, &device, &mut |s, loss| {
                if s % every == 0 {
                    println!("  step {s}: loss {loss:.4}");
                }
            });
            let config = trainer.config().clone();
            let ckpt = Checkpoint {
                model: trainer.model_flat(),
                target: trainer.target_flat(),
                meta: [("steps".to_owned(), a.train_steps.to_string())].into(),
                config,
            };
            if let Some(path) = &a.save_ckpt {
                ckpt.save(path)?;
                println!("pretrained checkpoint saved to {}", path.display());
            }
            ckpt
        }
    };
    let opts = SurpriseBenchOptions {
        pairs: a.pairs,
        quadruplets: a.quadruplets,
        validation: a.validation,
        frames: a.frames,
        checkpoint,
        device,
    };
    let r = run_surprise_bench(&opts, &mut |line| println!("  {line}"));
    print_surprise_report(&r, a.frames);
    Ok(())
}

/// The surprise bench's tables, then its JSON line.
fn print_surprise_report(r: &SurpriseBenchReport, frames: usize) {
    println!(
        "{} quadruplets (+{} for validation) and {} pairs of {} frames ({:.1} s to score)",
        r.quadruplets, r.validation, r.pairs, frames, r.seconds
    );
    println!("relative accuracy of every scoring (trained encoder):");
    println!("  {:>10} {:>6}  scoring", "validation", "test");
    for row in &r.scorings {
        println!(
            "  {:>10.3} {:>6.3}  {}",
            row.validation, row.test, row.scoring
        );
    }
    println!("counterbalanced quadruplets, scored by {}:", r.scoring);
    println!(
        "{:<16} {:>10} {:>10} {:>12}",
        "", "trained", "random", "persistence"
    );
    let quad = [
        &r.counterbalanced,
        &r.counterbalanced_random,
        &r.counterbalanced_persistence,
    ];
    let qrow = |name: &str, f: &dyn Fn(&QuadrupletScores) -> f64| {
        println!(
            "{name:<16} {:>10.3} {:>10.3} {:>12.3}",
            f(quad[0]),
            f(quad[1]),
            f(quad[2])
        );
    };
    qrow("relative acc.", &|s| s.relative_accuracy);
    qrow("AUROC", &|s| s.auroc);
    for (i, (kind, _)) in r.counterbalanced.per_kind_relative.iter().enumerate() {
        qrow(kind, &|s| s.per_kind_relative[i].1);
    }
    println!(
        "violation pairs (the first detector's benchmark), scored by {}:",
        Scoring::PAIRED
    );
    println!(
        "{:<16} {:>10} {:>10} {:>12}",
        "", "trained", "random", "persistence"
    );
    let row = |name: &str, f: &dyn Fn(&SurpriseScores) -> f64| {
        println!(
            "{name:<16} {:>10.3} {:>10.3} {:>12.3}",
            f(&r.trained),
            f(&r.random),
            f(&r.persistence)
        );
    };
    row("paired acc.", &|s| s.paired_accuracy);
    row("AUROC", &|s| s.auroc);
    row("energy (poss.)", &|s| s.possible_energy);
    row("ties (shared)", &|s| s.ties);
    for (i, (kind, _)) in r.trained.per_kind.iter().enumerate() {
        row(kind, &|s| s.per_kind[i].1);
    }
    let quad_json = |s: &QuadrupletScores| {
        serde_json::json!({
            "relative_accuracy": s.relative_accuracy,
            "auroc": s.auroc,
            "per_kind_relative": kind_map(&s.per_kind_relative),
        })
    };
    let pair_json = |s: &SurpriseScores| {
        serde_json::json!({
            "paired_accuracy": s.paired_accuracy,
            "auroc": s.auroc,
            "possible_energy": s.possible_energy,
            "ties": s.ties,
        })
    };
    let per_kind = kind_map(&r.counterbalanced.per_kind_relative);
    println!(
        "{}",
        serde_json::json!({
            "bench": "surprise",
            "relative_accuracy": r.counterbalanced.relative_accuracy,
            "per_kind_relative": per_kind,
            "paired_accuracy": r.trained.paired_accuracy,
            "auroc": r.counterbalanced.auroc,
            "scoring": r.scoring,
            "quadruplets": r.quadruplets,
            "paired": pair_json(&r.trained),
            "paired_per_kind": r.trained.per_kind,
            "random_init": { "counterbalanced": quad_json(&r.counterbalanced_random), "paired": pair_json(&r.random) },
            "persistence": { "counterbalanced": quad_json(&r.counterbalanced_persistence), "paired": pair_json(&r.persistence) },
        })
    );
}

/// `[(kind, figure)]` as a JSON object.
fn kind_map(rows: &[(String, f64)]) -> serde_json::Map<String, serde_json::Value> {
    rows.iter().map(|(k, v)| (k.clone(), (*v).into())).collect()
}
