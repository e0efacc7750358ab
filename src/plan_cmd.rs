//! `amity plan ...` and `amity surprise`: what downstream users do with a released encoder
//! (their benches are in `bench/plan.rs` and `bench/surprise.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Args, Subcommand};

use amity_planner::env::{ARENA, EnvKind, WaypointRule, make};
use amity_planner::plan::optimise::{Method, SearchConfig};
use amity_planner::plan::{
    HighLevel, LatentEnergy, LatentPlanner, ReadoutWeights, run_episode, two_level_settings,
};
use amity_planner::surprise::{Forecaster, Scoring, curves};
use amity_planner::world::data::{collect, load, save};
use amity_planner::world::encode::FrameEncoder;
use amity_planner::world::{WorldModel, WorldModelConfig};
use amity_shared::checkpoint::Checkpoint;
use amity_shared::device::Backend;
use amity_shared::train::Trainer;

/// `amity plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub command: PlanCommand,
}

/// The planning tasks.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Record episodes (frames, actions, states) with random and noisy scripted actions.
    Collect {
        /// `pointmaze` or `pushblock`.
        #[arg(long)]
        env: EnvKind,
        /// Episodes.
        #[arg(long, default_value_t = 200)]
        episodes: usize,
        /// Actions per episode.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Frame side in pixels (the encoder's).
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// Seed of every episode.
        #[arg(long, default_value_t = 11)]
        seed: u64,
        /// Output folder (a content store of shards plus `dataset.json`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Train the action-conditioned predictor on a frozen encoder.
    Train {
        /// A dataset from `amity plan collect`.
        #[arg(long)]
        data: PathBuf,
        /// The encoder: a release folder or a checkpoint file.
        #[arg(long)]
        ckpt: PathBuf,
        /// Where the world model goes (default: `world-<env>.safetensors` beside the encoder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Optimiser steps.
        #[arg(long, default_value_t = 1500)]
        steps: u64,
        /// Compute backend of the training (the saved world model plans on any backend).
        #[arg(long, default_value = "flex")]
        backend: String,
    },
    /// Run episodes with the latent planner; print success and time per action; write a PNG
    /// strip of the real rollout with the planner's expected agent path drawn on it.
    Run {
        /// `pointmaze` or `pushblock`.
        #[arg(long)]
        env: EnvKind,
        /// The encoder: a release folder or a checkpoint file.
        #[arg(long)]
        ckpt: PathBuf,
        /// The world model (default: `world-<env>.safetensors` beside the encoder).
        #[arg(long)]
        world: Option<PathBuf>,
        /// Episodes.
        #[arg(long, default_value_t = 5)]
        episodes: usize,
        /// Actions per episode at most.
        #[arg(long, default_value_t = 40)]
        max_steps: usize,
        /// `cem`, `mppi` or `gd` (gradient descent on the actions).
        #[arg(long, default_value = "cem")]
        planner: Method,
        /// Weight (per arena unit) of the position term (the predicted state against where the
        /// probe puts the agent in the goal image) added to the latent energy of a one-level
        /// plan. Default per environment, as `amity bench plan` measured them: PointMaze 0.5,
        /// PushBlock 0 (see `ReadoutWeights::default_for`). All three weights 0 plan on the
        /// latent distance alone.
        #[arg(long)]
        position_weight: Option<f32>,
        /// Weight (per arena unit) of the object term (where the object probe puts the task's
        /// object in the predicted final latents against the goal image; PushBlock's block).
        /// Default: PushBlock 2.
        #[arg(long)]
        object_weight: Option<f32>,
        /// Weight (per arena unit) of the arena term (predicted positions outside the arena,
        /// where nothing can be: the world model extrapolating). Default: PointMaze 0,
        /// PushBlock 1.
        #[arg(long)]
        arena_weight: Option<f32>,
        /// Planning levels: 2 (an environment with an object to move: PushBlock) lets a high
        /// level (`--high-level`) pick the agent's waypoints from the agent's position and where
        /// the frozen probes read the block in the frame and in the goal image, and the latent
        /// planner reach them with its measured settings (position 3, arena 1, a search every
        /// step over 4 predictor steps); 1 plans on the energy alone. Default: 2 where the
        /// environment has an object (PushBlock), else 1.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        levels: Option<u8>,
        /// What picks the waypoints of a two-level plan: `learnt` (the world model's subgoal
        /// proposer, trained with it from the collected episodes) or `rule` (the environment's
        /// hand-written contact rule).
        #[arg(long, value_enum, default_value_t = HighLevelArg::Learnt)]
        high_level: HighLevelArg,
        /// The PNG strip of the first episode.
        #[arg(long, default_value = "plan.png")]
        out: PathBuf,
    },
}

/// What picks the waypoints of a two-level plan (`amity plan run --high-level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HighLevelArg {
    /// The world model's learnt subgoal proposer.
    Learnt,
    /// The environment's hand-written contact rule.
    Rule,
}

/// `amity surprise`.
#[derive(Debug, Args)]
pub struct SurpriseArgs {
    /// A video file or a folder of frames.
    pub video: PathBuf,
    /// The encoder and predictor: a release folder or a checkpoint file.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Frames between windows.
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Spike threshold, in robust standard deviations above the median.
    #[arg(long, default_value_t = 3.5)]
    pub threshold: f32,
    /// The plot.
    #[arg(long, default_value = "surprise.png")]
    pub plot: PathBuf,
}

/// A checkpoint from a release folder (verified) or a checkpoint file.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    if path.is_dir() {
        Ok(amity_release::load_model(path)?)
    } else {
        Ok(Checkpoint::load(path)?)
    }
}

fn beside(ckpt: &Path, kind: EnvKind) -> PathBuf {
    let dir = if ckpt.is_dir() {
        ckpt.to_owned()
    } else {
        ckpt.parent().map(Path::to_owned).unwrap_or_default()
    };
    dir.join(format!("world-{kind}.safetensors"))
}

/// Runs `amity plan`.
pub fn plan(args: PlanArgs) -> Result<()> {
    match args.command {
        PlanCommand::Collect {
            env,
            episodes,
            steps,
            size,
            seed,
            out,
        } => {
            let trajs = collect(env, size, episodes, steps, seed);
            let index = save(&out, env, size, &trajs)?;
            println!(
                "{env}: {episodes} episodes x {steps} actions at {size}x{size} -> {} shard(s) and {}",
                index.shards.len(),
                out.join("dataset.json").display()
            );
        }
        PlanCommand::Train {
            data,
            ckpt,
            out,
            steps,
            backend,
        } => train_world(&data, &ckpt, out, steps, &backend)?,
        PlanCommand::Run {
            env,
            ckpt,
            world,
            episodes,
            max_steps,
            planner,
            position_weight,
            object_weight,
            arena_weight,
            levels,
            high_level,
            out,
        } => {
            let rule = match (levels, env.waypoint_rule()) {
                (Some(1), _) | (None, None) => None,
                (_, Some(rule)) => Some(rule),
                (Some(_), None) => bail!(
                    "--levels 2 needs an environment with an object to move (pushblock); {env} has none"
                ),
            };
            if rule.is_some()
                && (position_weight.is_some() || object_weight.is_some() || arena_weight.is_some())
            {
                bail!(
                    "the weight flags set the one-level energy; {env} plans on two levels \
                     (pass --levels 1 to plan on one level with them)"
                );
            }
            let checkpoint = load_checkpoint(&ckpt)?;
            let device = Device::flex();
            let path = world.unwrap_or_else(|| beside(&ckpt, env));
            let wm = WorldModel::load(&path, &checkpoint, &device).with_context(|| {
                format!(
                    "loading the world model {} (train one with `amity plan train`)",
                    path.display()
                )
            })?;
            let mut p = if let Some(rule) = rule {
                let high = pick_high_level(high_level, rule, &wm, &path)?;
                LatentPlanner::two_level(
                    &wm,
                    planner,
                    &SearchConfig::default(),
                    LatentEnergy::default(),
                    1,
                    high,
                )
            } else {
                let weights =
                    ReadoutWeights::default_with(env, position_weight, object_weight, arena_weight);
                one_level(&wm, planner, weights)
            };
            let mut e = make(env, wm.encoder.size());
            let mut wins = 0;
            for i in 0..episodes {
                let ep = run_episode(e.as_mut(), 900_000 + i as u64, &mut p, max_steps, i == 0);
                wins += ep.success as usize;
                println!(
                    "episode {i}: {} in {} actions, {:.0} ms per action{}",
                    if ep.success { "success" } else { "failure" },
                    ep.steps,
                    ep.ms_per_action,
                    if ep.entered_forbidden {
                        " (entered a forbidden zone)"
                    } else {
                        ""
                    }
                );
                if i == 0 {
                    strip(&out, wm.encoder.size(), &ep.frames, &ep.expected)?;
                }
            }
            println!(
                "{env}: {wins}/{episodes} successes; rollout of episode 0 in {}",
                out.display()
            );
        }
    }
    Ok(())
}

/// The high level `arg` asks for on `wm` (loaded from `path`), said on stdout; a world model
/// without a learnt proposer is refused by name.
fn pick_high_level<'a>(
    arg: HighLevelArg,
    rule: WaypointRule,
    wm: &'a WorldModel,
    path: &Path,
) -> Result<HighLevel<'a>> {
    let high = match (arg, &wm.subgoals) {
        (HighLevelArg::Rule, _) => HighLevel::Rule(rule),
        (HighLevelArg::Learnt, Some(m)) => HighLevel::Learnt(m),
        (HighLevelArg::Learnt, None) => bail!(
            "{}: this world model has no learnt subgoal proposer (no episode it was trained on \
             moved the block far enough to learn from, or it was written before there was one): \
             train it again with `amity plan train` on more or longer episodes, or pass \
             --high-level rule",
            path.display()
        ),
    };
    let what = match high {
        HighLevel::Learnt(_) => "the learnt subgoal proposer",
        HighLevel::Rule(_) => "the contact rule",
    };
    println!(
        "two levels: {what} picks the agent's waypoints, the latent planner reaches them ({})",
        two_level_settings()
    );
    Ok(high)
}

/// `amity plan train`: an action-conditioned world model on the frozen encoder of `ckpt`,
/// trained on the episodes in `data`.
fn train_world(
    data: &Path,
    ckpt: &Path,
    out: Option<PathBuf>,
    steps: u64,
    backend: &str,
) -> Result<()> {
    let backend = Backend::parse_available(backend)?;
    let device = backend.device(0)?;
    let (kind, size, trajs) = load(data)?;
    let checkpoint = load_checkpoint(ckpt)?;
    let encoder = FrameEncoder::new(&checkpoint, &device)?;
    if encoder.size() != size {
        bail!(
            "{}: frames are {size}x{size}, the encoder takes {}x{}; collect again with --size {}",
            data.display(),
            encoder.size(),
            encoder.size(),
            encoder.size()
        );
    }
    let cfg = WorldModelConfig {
        steps,
        ..WorldModelConfig::default()
    };
    println!(
        "training the {kind} world model on {backend}: {} episodes, {steps} steps",
        trajs.len()
    );
    let (wm, fit) = WorldModel::fit(encoder, cfg, &trajs, 2000, &mut |s, tf, ro| {
        if s % 100 == 0 || s + 1 == steps {
            println!("step {s}/{steps}: teacher forcing {tf:.4}, 2-step rollout {ro:.4}");
        }
    });
    let (r2, report) = (fit.probe_r2, fit.train);
    match (&fit.subgoal, fit.object_probe_r2) {
        (Some(s), _) => println!(
            "learnt subgoals: {} hindsight windows; held-out error {:.2} arena units (the agent \
             staying still: {:.2})",
            s.train_windows, s.error, s.still_error
        ),
        (None, Some(_)) => println!(
            "learnt subgoals: none (no episode moved the {kind} object far enough to learn \
             from: collect more or longer episodes; `plan run` needs --high-level rule)"
        ),
        (None, None) => {}
    }
    let path = out.unwrap_or_else(|| beside(ckpt, kind));
    wm.save(&path)?;
    println!(
        "{kind} world model: 2-step rollout error {:.4} -> {:.4} on held-out episodes; \
         position probe R2 {r2:.3}; saved to {}",
        report.rollout_before,
        report.rollout_after,
        path.display()
    );

    Ok(())
}

/// A PNG strip: the real frames (scaled up) with the planner's expected agent path as dots.
fn strip(path: &Path, size: usize, frames: &[Vec<u8>], expected: &[Vec<[f32; 2]>]) -> Result<()> {
    let scale = 4u32;
    let s = size as u32 * scale;
    let shown: Vec<usize> = (0..frames.len())
        .step_by((frames.len() / 12).max(1))
        .collect();
    let mut img = image::RgbImage::new(s * shown.len() as u32, s);
    for (col, &i) in shown.iter().enumerate() {
        let f = image::RgbImage::from_raw(size as u32, size as u32, frames[i].clone())
            .context("frame size")?;
        let big = image::imageops::resize(&f, s, s, image::imageops::FilterType::Nearest);
        image::imageops::replace(&mut img, &big, (col as u32 * s) as i64, 0);
        if let Some(path) = i.checked_sub(1).and_then(|k| expected.get(k)) {
            for p in path {
                let x = (p[0] / ARENA * s as f32) as i64 + (col as u32 * s) as i64;
                let y = ((ARENA - p[1]) / ARENA * s as f32) as i64;
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let (px, py) = (x + dx, y + dy);
                    if px >= (col as u32 * s) as i64
                        && px < ((col as u32 + 1) * s) as i64
                        && py >= 0
                        && py < s as i64
                    {
                        img.put_pixel(px as u32, py as u32, image::Rgb([255, 230, 0]));
                    }
                }
            }
        }
    }
    img.save(path).with_context(|| path.display().to_string())
}

/// Runs `amity surprise`.
pub fn surprise(args: SurpriseArgs) -> Result<()> {
    let ckpt = load_checkpoint(&args.ckpt)?;
    let steps = ckpt.config.model.grid().frames;
    if steps < 2 {
        bail!(
            "{}: a clip of this model is {steps} tubelet time step(s); surprise forecasts later              time steps from earlier ones and needs at least 2",
            args.ckpt.display()
        );
    }
    let trainer = Trainer::from_checkpoint(&ckpt, &Device::flex())?;
    let video = amity_shared::eval::embed::decode_for(&args.video, &ckpt.config)?;
    // Beside the predictor, the yardstick: a predictor that forecasts worse than "the scene
    // stays as last seen" has not learned how things move, and its spikes say little.
    let scoring = Scoring::DEFAULT;
    println!("scoring: {scoring}");
    let mut both = curves(
        &trainer,
        &scoring,
        &[Forecaster::Predictor, Forecaster::Persistence],
        &video.pixels,
        video.frames,
        args.stride,
    );
    let (still, c) = (both.remove(1), both.remove(0));
    if c.energy.is_empty() {
        bail!(
            "{}: {} frames, too short for one window of {} frames",
            args.video.display(),
            video.frames,
            ckpt.config.model.frames
        );
    }
    let spikes = c.spikes(args.threshold);
    let fps = ckpt.config.data.fps;
    println!(
        "{:>8} {:>8} {:>10} {:>12}",
        "window", "time", "energy", "persistence"
    );
    for (i, ((s, e), p)) in c
        .starts
        .iter()
        .zip(&c.energy)
        .zip(&still.energy)
        .enumerate()
    {
        let mark = if spikes.contains(&i) {
            "  <- spike"
        } else {
            ""
        };
        println!("{i:>8} {:>7.1}s {e:>10.4} {p:>12.4}{mark}", *s as f64 / fps);
    }
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    let (forecast, baseline) = (mean(&c.energy), mean(&still.energy));
    println!(
        "mean energy {forecast:.4}, persistence baseline {baseline:.4}: the predictor forecasts {}",
        if forecast < baseline {
            "better than the scene staying as last seen"
        } else {
            "no better than the scene staying as last seen (its spikes say little)"
        }
    );
    let values: Vec<f64> = c.energy.iter().map(|&e| e as f64).collect();
    crate::plot::line_chart_marked(&args.plot, &values, &spikes)?;
    println!(
        "peak surprise {:.4} at {:.1}s; {} spike(s) above {} robust deviations; plot: {}",
        c.peak(),
        c.starts[c
            .energy
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |x| x.0)] as f64
            / fps,
        spikes.len(),
        args.threshold,
        args.plot.display()
    );
    Ok(())
}

/// `amity plan run`'s one-level planner: the latent energy plus the read-out terms `weights` gives.
fn one_level(wm: &WorldModel, method: Method, weights: ReadoutWeights) -> LatentPlanner<'_> {
    if weights.any() {
        println!(
            "energy: latent distance + read-out terms (position {}, object {}, arena {})",
            weights.position, weights.object, weights.arena
        );
    } else {
        println!("energy: latent distance alone");
    }
    LatentPlanner::new(
        wm,
        method,
        SearchConfig::default(),
        LatentEnergy::default(),
        1,
    )
    .with_readout_weights(weights)
}
