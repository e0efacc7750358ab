//! `amity train`: V-JEPA pretraining on this machine alone.
//!
//! Writes `<out>/checkpoint.safetensors`, `<out>/config.toml` (the exact config: rerun with
//! `--config` to reproduce) and `<out>/metrics.jsonl` (one line per logged step).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;

use amity_shared::checkpoint::Checkpoint;
use amity_shared::config::Config;
use amity_shared::corpus::manifest::MANIFEST_FILE;
use amity_shared::data::{ClipSource, Prefetcher};
use amity_shared::device::Backend;
use amity_shared::eval::{ProbeReport, ProbeSet, probe_report, telemetry};
use amity_shared::model::flat::ParamLayout;
use amity_shared::train::Trainer;

/// `amity train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Model and recipe preset: tiny (CPU), small, vit-l.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// A TOML config (as written to `<out>/config.toml`); overrides --preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Optimiser steps (the schedules are laid out over them).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Clips per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Seed of every random choice.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Training data: a shard store written by `amity corpus ingest`. Without it, fresh
    /// synthetic moving-shapes clips are generated.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Compute backend.
    #[arg(long, default_value = "flex")]
    pub backend: String,
    /// Log a line every this many steps (telemetry every ten lines).
    #[arg(long, default_value_t = 50)]
    pub log_every: u64,
    /// Skip the synthetic-world probes at the end.
    #[arg(long)]
    pub no_probe: bool,
    /// Also fit the probes every this many steps and log them (metrics.jsonl records with a
    /// `probe` field): the standard probe's velocity score rises early and can fade later in a
    /// run, so one figure at the end does not tell the curve. 0: only at the end.
    #[arg(long, default_value_t = 0, conflicts_with = "no_probe")]
    pub probe_every: u64,
    /// Probe videos: fitted, held out.
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [600, 300])]
    pub probe_videos: Vec<usize>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// The clips to train on: the shard store given, else the synthetic stream (said on stderr).
fn clip_source(args: &TrainArgs, config: &Config) -> Result<ClipSource> {
    let source = match &args.store {
        None => ClipSource::synthetic(&config.model),
        Some(dir) => {
            if !dir.join(MANIFEST_FILE).exists() {
                bail!(
                    "{}: not a shard store (no {MANIFEST_FILE}); make one with \
                     `amity corpus ingest <videos> --store {} --preset {}`",
                    dir.display(),
                    dir.display(),
                    config.preset
                );
            }
            ClipSource::shards(dir, &config.model, None)?
        }
    };
    match source.len() {
        Some(n) => eprintln!(
            "data: {n} clips from {}",
            args.store
                .as_deref()
                .map_or("?".into(), |p| p.display().to_string())
        ),
        None => eprintln!("data: fresh synthetic moving-shapes clips"),
    }
    Ok(source)
}

/// Runs `amity train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_toml_file(path)?,
        None => Config::preset(&args.preset)?,
    };
    if let Some(steps) = args.steps {
        config.train.steps = steps;
        config.train.warmup = config.train.warmup.min(steps / 10).max(1);
    }
    if let Some(b) = args.batch {
        config.train.batch = b;
    }
    if let Some(s) = args.seed {
        config.train.seed = s;
    }
    config.validate()?;
    let backend = Backend::parse_available(&args.backend)?;
    let device = backend.device(0)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;

    let source = clip_source(&args, &config)?;
    std::fs::write(args.out.join("config.toml"), config.to_toml())
        .with_context(|| format!("cannot write {}", args.out.join("config.toml").display()))?;

    let (n_fit, n_held) = probe_counts(&args.probe_videos)?;
    let probes = (!args.no_probe).then(|| ProbeSet::for_model(&config.model, n_fit, n_held));
    let mut trainer = Trainer::new(config.clone(), &device);
    let before = probes.as_ref().map(|p| probe_report(&trainer, p));
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;

    eprintln!(
        "training preset {} on {backend}: {} steps of {} clips, {} params",
        config.preset,
        config.train.steps,
        config.train.batch,
        ParamLayout::of(trainer.model()).total
    );
    let start = Instant::now();
    let log_every = args.log_every.max(1);
    let batches = Prefetcher::spawn(
        source,
        config.model.clone(),
        config.train.seed,
        config.train.batch,
        0..config.train.steps,
        2,
    );
    // The last periodic probe is the final one: it is not fitted twice.
    let mut final_report = None;
    for (step, batch) in (0..config.train.steps).zip(batches) {
        let s = trainer.step(&batch);
        let last = step + 1 == config.train.steps;
        if step % log_every == 0 || last {
            let rate = (step + 1) as f64 / start.elapsed().as_secs_f64();
            let mut line = format!(
                "step {step:>6} loss {:.4} predict-the-mean {:.4} lr {:.2e} ema {:.4} {rate:.2} steps/s",
                s.loss, s.mean_baseline, s.lr, s.ema
            );
            let mut record = serde_json::json!({
                "step": step, "loss": s.loss, "mean_baseline": s.mean_baseline,
                "vicreg": s.vicreg, "grad_norm": s.grad_norm, "lr": s.lr, "ema": s.ema,
                "steps_per_s": rate,
            });
            if let Some(p) = &probes
                && (step % (10 * log_every) == 0 || last)
            {
                let t = telemetry(&trainer, p, 256);
                line += &format!(
                    " | feature std {:.3} (min {:.3}) RankMe {:.2} (centred {:.2})",
                    t.feature_std, t.feature_std_min, t.rankme, t.rankme_centred
                );
                record["feature_std"] = t.feature_std.into();
                record["feature_std_min"] = t.feature_std_min.into();
                record["rankme"] = t.rankme.into();
                record["rankme_centred"] = t.rankme_centred.into();
            }
            eprintln!("{line}");
            writeln!(metrics, "{record}")
                .with_context(|| format!("cannot write {}", metrics_path.display()))?;
        }
        if let Some(p) = &probes
            && args.probe_every > 0
            && ((step + 1) % args.probe_every == 0 || last)
        {
            final_report = Some(periodic_probe(
                &trainer,
                p,
                step,
                &mut metrics,
                &metrics_path,
            )?);
        }
    }
    let ckpt = Checkpoint {
        config: config.clone(),
        model: trainer.model_flat(),
        target: trainer.target_flat(),
        meta: [("steps".to_owned(), config.train.steps.to_string())].into(),
    };
    let ckpt_path = args.out.join("checkpoint.safetensors");
    ckpt.save(&ckpt_path)?;
    if let (Some(p), Some(before)) = (&probes, before) {
        let after = final_report.unwrap_or_else(|| probe_report(&trainer, p));
        for (name, r) in [("random init", before), ("trained", after)] {
            println!(
                "probe {name:>11}: velocity R2 {:.3}  position R2 {:.3}  shape {:.3}  colour {:.3}",
                r.velocity_r2, r.position_r2, r.shape_acc, r.colour_acc
            );
        }
    }
    println!("checkpoint: {}", ckpt_path.display());
    Ok(())
}

/// Fits the probes after `step` (0-based), logs them and appends their `metrics.jsonl` record.
fn periodic_probe(
    trainer: &Trainer,
    set: &ProbeSet,
    step: u64,
    metrics: &mut std::fs::File,
    metrics_path: &std::path::Path,
) -> Result<ProbeReport> {
    let r = probe_report(trainer, set);
    eprintln!(
        "probe after {} steps: velocity R2 {:.3}  position R2 {:.3}  shape {:.3}  colour {:.3}",
        step + 1,
        r.velocity_r2,
        r.position_r2,
        r.shape_acc,
        r.colour_acc
    );
    let record = serde_json::json!({ "step": step, "probe": r });
    writeln!(metrics, "{record}")
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    Ok(r)
}

/// The two counts of a `--probe-videos` flag (fitted, held out), checked: every command that
/// probes takes them the same way.
pub fn probe_counts(counts: &[usize]) -> Result<(usize, usize)> {
    match counts[..] {
        [f, h] if f >= 10 && h >= 2 => Ok((f, h)),
        _ => bail!("--probe-videos takes two counts: at least 10 fitted and 2 held out"),
    }
}
