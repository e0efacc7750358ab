//! `amity bench plan`: the planners of `amity-planner` on its two environments, every row on
//! one world model per environment, against a random encoder's (see
//! [`amity_planner::bench`] for what each figure measures).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use amity_planner::bench::{PlanBenchOptions, PlanRow, SweepPoint, bench_env, pretrain_encoder};
use amity_planner::env::EnvKind;
use amity_planner::plan::optimise::{Method, Returns, SearchConfig};
use amity_planner::plan::{LatentEnergy, Metric};
use amity_planner::world::WorldModelConfig;

use crate::plan_cmd::load_checkpoint;

/// `amity bench plan`.
#[derive(Debug, Args)]
pub struct PlanBenchArgs {
    /// The encoder (a release folder or checkpoint); default: the tiny preset pretrained on
    /// each environment's own videos for `--pretrain-steps`.
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// Encoder pretraining steps when no `--ckpt` is given.
    #[arg(long, default_value_t = 300)]
    pub pretrain_steps: u64,
    /// Patch side (pixels) of the encoder pretrained when no `--ckpt` is given: 8 (the tiny
    /// preset's own) makes a 4x4 token grid of the 32-pixel frames; 4 an 8x8 grid, on which
    /// the latent energy of really reached frames ranks far better (PointMaze: Spearman 0.95
    /// against 0.70, see `LatentEnergy`) for about 5x the predictor's training time.
    #[arg(long, default_value_t = 8, value_parser = parse_patch)]
    pub encoder_patch: usize,
    /// Where to save each environment's pretrained encoder (`<path>.<env>.safetensors`), to
    /// bench it again with `--ckpt` without pretraining.
    #[arg(long)]
    pub save_ckpt: Option<PathBuf>,
    /// How the latent energy compares smoothed token maps: `l2` or `l1`.
    #[arg(long, default_value = "l2")]
    pub metric: Metric,
    /// Width of the Gaussian that smooths token maps before they are compared, as a fraction
    /// of the token grid's width (0: tokens as they are).
    #[arg(long, default_value_t = 0.25, value_parser = parse_blur)]
    pub blur: f32,
    /// Environments.
    #[arg(long, value_delimiter = ',', default_value = "pointmaze,pushblock")]
    pub env: Vec<EnvKind>,
    /// Evaluation episodes per environment and policy.
    #[arg(long, default_value_t = 50, value_parser = parse_episodes)]
    pub episodes: usize,
    /// Actions per episode at most.
    #[arg(long, default_value_t = 40)]
    pub max_steps: usize,
    /// Predictor training steps.
    #[arg(long, default_value_t = 1500)]
    pub world_steps: u64,
    /// Autoregressive steps of the predictor's rollout loss (V-JEPA 2-AC: 2), up to the
    /// predictor steps a collected episode holds (6 at 20 actions and frameskip 3). Measured on
    /// PointMaze (20 episodes, the same encoder): 6 left latent success within noise (0.25
    /// against 0.20) and made the predicted energies rank worse (Spearman -0.19 against 0.18).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(2..=8))]
    pub rollout_steps: u64,
    /// Weight of the predictor's energy-consistency loss (the planner's latent energy of its
    /// predictions against that of the real frames; 0: off). Measured on PointMaze (one
    /// encoder): weight 1 made the predicted energies rank the true distance at 0.68 instead of
    /// 0.18; latent success on 50 episodes 0.24 against 0.10.
    #[arg(long, default_value_t = 0.0, value_parser = parse_weight)]
    pub energy_weight: f64,
    /// `cem`, `mppi` or `gd` (gradient descent on the actions).
    #[arg(long, default_value = "cem")]
    pub planner: Method,
    /// Weight (per arena unit) of the position term (the predicted state against where the
    /// probe puts the agent in the goal image) in a second latent planner run beside the pure
    /// latent energy. Default per environment: PointMaze 0.5, PushBlock 0 (see
    /// `ReadoutWeights::default_for`); all three weights 0 skip the run.
    #[arg(long)]
    pub position_weight: Option<f32>,
    /// Weight (per arena unit) of the object term (the object probe on the predicted latents
    /// against the goal image; environments with an object) in that second run. Default:
    /// PushBlock 2.
    #[arg(long)]
    pub object_weight: Option<f32>,
    /// Weight (per arena unit) of the arena term (predicted positions outside the arena) in
    /// that second run. Default: PointMaze 0, PushBlock 1.
    #[arg(long)]
    pub arena_weight: Option<f32>,
    /// Skip the randomly initialised encoder's run.
    #[arg(long)]
    pub no_random_encoder: bool,
    /// Candidate sequences per search iteration (default: the search's own, 96).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Search iterations per plan (default: the search's own, 3).
    #[arg(long)]
    pub iterations: Option<usize>,
    /// What the search returns: `best` (the lowest-energy sample seen) or `mean` (the
    /// distribution's final mean, V-JEPA 2-AC; it needs more iterations than the default 3).
    #[arg(long, default_value = "best")]
    pub returns: Returns,
    /// The rows to run, of `latent` (latent energy alone, the headline), `readout` (with the
    /// read-out terms), `rule` and `learnt` (PushBlock on two levels, the contact rule or the
    /// learnt subgoal proposer on top), `random`, `oracle`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "latent,readout,rule,learnt,random,oracle"
    )]
    pub rows: Vec<PlanRow>,
    /// Search settings to run the `latent` row again with, on the same world model, after the
    /// rows: a comma-separated list of `SAMPLESxITERATIONS`, each optionally `:mean` or `:best`
    /// (for example `48x3,96x3,96x6:mean`). Each point costs as much as a row.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<SweepPoint>,
}

/// `--encoder-patch`: a side that divides the tiny preset's 32-pixel frames.
fn parse_patch(s: &str) -> Result<usize, String> {
    let size = amity_shared::config::Config::preset("tiny")
        .map_err(|e| e.to_string())?
        .model
        .image_size;
    match s.parse::<usize>() {
        Ok(p) if p > 0 && size.is_multiple_of(p) => Ok(p),
        _ => Err(format!(
            "a patch side must divide the tiny preset's {size}-pixel frames (4 or 8, for example)"
        )),
    }
}

/// `--blur`: a finite fraction of the grid's width, 0 or more.
fn parse_blur(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(b) if b.is_finite() && b >= 0.0 => Ok(b),
        _ => Err(
            "the smoothing width is a fraction of the token grid's width, 0 or more \
                  (0.25, for example; 0: tokens as they are)"
                .into(),
        ),
    }
}

/// `--episodes`: success rates need at least one episode (0 used to print NaN).
fn parse_episodes(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("the number of evaluation episodes is a whole number, at least 1".into()),
    }
}

fn parse_weight(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if w.is_finite() && w >= 0.0 => Ok(w),
        _ => Err("a loss weight is a finite number, at least 0".into()),
    }
}

/// Runs `amity bench plan`.
pub fn bench_plan(a: PlanBenchArgs) -> Result<()> {
    let opts = PlanBenchOptions {
        episodes: a.episodes,
        max_steps: a.max_steps,
        collect_episodes: 600,
        collect_steps: 20,
        world: WorldModelConfig {
            steps: a.world_steps,
            rollout_steps: a.rollout_steps as usize,
            energy_weight: a.energy_weight,
            ..WorldModelConfig::default()
        },
        search: {
            let d = SearchConfig::default();
            SearchConfig {
                samples: a.samples.unwrap_or(d.samples),
                iterations: a.iterations.unwrap_or(d.iterations),
                returns: a.returns,
                ..d
            }
        },
        method: a.planner,
        energy: LatentEnergy {
            metric: a.metric,
            blur: a.blur,
        },
        position_weight: a.position_weight,
        object_weight: a.object_weight,
        arena_weight: a.arena_weight,
        rows: a.rows.clone(),
        sweep: a.sweep.clone(),
    };
    let mut log = |s: String| println!("{s}");
    let given = match &a.ckpt {
        Some(p) => Some(load_checkpoint(p)?),
        None => None,
    };
    println!("latent energy: {}", opts.energy);
    let mut json = serde_json::Map::new();
    json.insert("bench".into(), "plan".into());
    let mut random_json = serde_json::Map::new();
    for kind in &a.env {
        println!(
            "{kind}: {} episodes of at most {} actions per policy",
            a.episodes, a.max_steps
        );
        let ckpt = match &given {
            Some(c) => c.clone(),
            None => {
                let c = pretrain_encoder(*kind, a.pretrain_steps, a.encoder_patch, &mut log)?;
                if let Some(base) = &a.save_ckpt {
                    let path = base.with_extension(format!("{kind}.safetensors"));
                    c.save(&path)?;
                    println!("{kind}: pretrained encoder saved to {}", path.display());
                }
                c
            }
        };
        let r = bench_env(*kind, &ckpt, &opts, &mut log)?;
        let rate = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "{kind}: latent {}  readout {}  rule {}  learnt {}  random {}  oracle {}  \
             (slowest {:.0} ms/action, Spearman predicted {:.3}, reached {:.3}, {} forbidden entries)",
            rate(r.latent),
            rate(r.readout),
            rate(r.rule),
            rate(r.learnt),
            rate(r.random),
            rate(r.oracle),
            r.ms_per_action,
            r.spearman_predicted,
            r.spearman_reached,
            r.forbidden_entries
        );
        json.insert(kind.to_string(), serde_json::to_value(&r)?);
        if !a.no_random_encoder {
            println!("{kind}: the same with a randomly initialised encoder");
            let patch = ckpt.config.model.patch;
            let rnd = pretrain_encoder(*kind, 0, patch, &mut log)?;
            let r = bench_env(*kind, &rnd, &opts, &mut log)?;
            println!(
                "{kind} (random encoder): latent {}, Spearman predicted {:.3}",
                rate(r.latent),
                r.spearman_predicted
            );
            random_json.insert(kind.to_string(), serde_json::to_value(&r)?);
        }
    }
    if !random_json.is_empty() {
        json.insert("random_encoder".into(), random_json.into());
    }
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}
