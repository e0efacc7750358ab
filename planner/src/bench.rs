//! `amity bench plan`: success rates per environment of the latent planner on the latent
//! energy alone (the headline: the world model's own judgement), with the read-out terms, and
//! on two levels with the learnt subgoal proposer or the hand-written contact rule on top
//! (PushBlock), beside a random policy and an oracle that plans on the true simulator; plus
//! planning time per action and the energy landscape's Spearman correlation with the true
//! distance to the goal. Each of these is a [`PlanRow`]; the bench runs those asked for.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::Device;
use serde::Serialize;

use amity_shared::checkpoint::Checkpoint;
use amity_shared::model::host_f32;
use amity_shared::rng::Rng;

use crate::PlannerError;
use crate::env::{EnvKind, make};
use crate::plan::optimise::{Method, Returns, SearchConfig};
use crate::plan::{
    HighLevel, LatentEnergy, LatentPlanner, OraclePlanner, Policy, RandomPolicy, ReadoutWeights,
    run_episode, two_level_settings,
};
use crate::world::data::{Trajectory, collect};
use crate::world::encode::FrameEncoder;
use crate::world::{FitReport, WorldModel, WorldModelConfig};

/// What the bench runs.
#[derive(Debug, Clone)]
pub struct PlanBenchOptions {
    /// Evaluation episodes per environment and policy.
    pub episodes: usize,
    /// Actions per episode at most.
    pub max_steps: usize,
    /// Episodes collected to train the world model.
    pub collect_episodes: usize,
    /// Actions per collected episode.
    pub collect_steps: usize,
    /// The predictor and its training.
    pub world: WorldModelConfig,
    /// The search.
    pub search: SearchConfig,
    /// Which optimiser.
    pub method: Method,
    /// How predicted latents are compared with the goal's.
    pub energy: LatentEnergy,
    /// Weights of the read-out terms for the second latent run, each `None` for the
    /// environment's default ([`ReadoutWeights::default_for`]); with all three 0 the run is
    /// skipped.
    pub position_weight: Option<f32>,
    /// See `position_weight`.
    pub object_weight: Option<f32>,
    /// See `position_weight`.
    pub arena_weight: Option<f32>,
    /// The rows to run.
    pub rows: Vec<PlanRow>,
    /// Search settings the `latent` row runs again with, on the same world model, after the
    /// rows (empty: none).
    pub sweep: Vec<SweepPoint>,
}

/// One point of a search sweep: candidates per iteration, iterations, and what the search
/// returns. Written `96x3` (the search's `returns`) or `96x6:mean` / `96x3:best`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPoint {
    /// Candidate sequences per iteration.
    pub samples: usize,
    /// Iterations per plan.
    pub iterations: usize,
    /// What the search returns (`None`: the bench's own setting).
    pub returns: Option<Returns>,
}

impl SweepPoint {
    /// `search` with this point's settings.
    pub fn apply(&self, search: &SearchConfig) -> SearchConfig {
        SearchConfig {
            samples: self.samples,
            iterations: self.iterations,
            // CEM refits to its elites: never more of them than there are candidates.
            elites: search.elites.min(self.samples),
            returns: self.returns.unwrap_or(search.returns),
            ..search.clone()
        }
    }
}

impl std::fmt::Display for SweepPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.samples, self.iterations)?;
        match self.returns {
            Some(r) => write!(f, ":{r}"),
            None => Ok(()),
        }
    }
}

/// Why a sweep point did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "sweep point {got:?}: expected SAMPLESxITERATIONS with both at least 1, optionally :mean or :best (for example 96x6:mean)"
)]
pub struct BadSweepPoint {
    /// What was given.
    pub got: String,
}

impl std::str::FromStr for SweepPoint {
    type Err = BadSweepPoint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSweepPoint { got: s.to_owned() };
        let (counts, returns) = match s.split_once(':') {
            Some((c, r)) => (c, Some(r.parse::<Returns>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let (samples, iterations) = counts.split_once('x').ok_or_else(bad)?;
        let count = |t: &str| t.parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(bad);
        Ok(SweepPoint {
            samples: count(samples)?,
            iterations: count(iterations)?,
            returns,
        })
    }
}

/// The `latent` row at one [`SweepPoint`].
#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    /// The point, as written on the command line.
    pub point: String,
    /// Candidates per iteration.
    pub samples: usize,
    /// Iterations per plan.
    pub iterations: usize,
    /// What the search returned (`mean` or `best`).
    pub returns: String,
    /// Success rate.
    pub success: f64,
    /// Milliseconds per action.
    pub ms_per_action: f64,
    /// Episodes in which the agent entered a forbidden zone.
    pub forbidden_entries: usize,
}

/// A row of the bench: one policy run over the episodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanRow {
    /// The latent planner on the latent energy alone (the world model's own judgement).
    Latent,
    /// The latent planner with the read-out terms added to its energy.
    Readout,
    /// Two levels, the task's hand-written contact rule on top (environments with one).
    Rule,
    /// Two levels, the world model's learnt subgoal proposer on top (environments with an
    /// object).
    Learnt,
    /// Uniform random actions.
    Random,
    /// The same search on the true simulator.
    Oracle,
}

impl PlanRow {
    /// Every row, in the order `--rows` lists them by default.
    pub const ALL: [PlanRow; 6] = [
        PlanRow::Latent,
        PlanRow::Readout,
        PlanRow::Rule,
        PlanRow::Learnt,
        PlanRow::Random,
        PlanRow::Oracle,
    ];
    const NAMES: [&'static str; 6] = ["latent", "readout", "rule", "learnt", "random", "oracle"];

    /// Its name on the command line and in the JSON line.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

impl std::fmt::Display for PlanRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PlanRow {
    type Err = amity_shared::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PlanRow::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| amity_shared::UnknownName {
                what: "bench row",
                got: s.to_owned(),
                expected: &PlanRow::NAMES,
            })
    }
}

/// One environment's figures. A row not run (not asked for, or not applicable: `rule` and
/// `learnt` need an object, `readout` its weights) is `None`.
#[derive(Debug, Clone, Serialize)]
pub struct EnvReport {
    /// Success rate of the latent planner on the latent energy alone: the headline.
    pub latent: Option<f64>,
    /// The latent planner with the read-out terms (the position term and, where the
    /// environment has an object, the object term, and the arena term) added to its energy.
    pub readout: Option<f64>,
    /// The two-level planner with the task's contact rule as its high level
    /// ([`HighLevel::Rule`]).
    pub rule: Option<f64>,
    /// The two-level planner with the world model's learnt subgoal proposer as its high level
    /// ([`HighLevel::Learnt`]).
    pub learnt: Option<f64>,
    /// Random policy success rate.
    pub random: Option<f64>,
    /// Oracle (true simulator) success rate.
    pub oracle: Option<f64>,
    /// The slowest world-model planner row's milliseconds per action (the goal is under 1 s).
    pub ms_per_action: f64,
    /// Milliseconds per action of each world-model planner row run.
    pub ms_per_action_by_row: BTreeMap<String, f64>,
    /// Spearman correlation of one-step latent energy with the true distance to the goal,
    /// the frames predicted by the world model.
    pub spearman_predicted: f64,
    /// The same with the frames really reached encoded (the encoder alone, no predictor).
    pub spearman_reached: f64,
    /// The landscape after each predictor step, the predictor's fidelity to the encoder
    /// included (see [`LandscapeStep`]).
    pub landscape_steps: Vec<LandscapeStep>,
    /// Episodes in which a world-model planner's agent entered a forbidden zone (all its rows).
    pub forbidden_entries: usize,
    /// Position-probe R² on held-out frames.
    pub probe_r2: f64,
    /// Two-step rollout error before and after training the predictor.
    pub rollout_error: (f64, f64),
    /// Seconds to train the predictor.
    pub train_seconds: f64,
    /// Per predictor step of an open-loop rollout on held-out episodes, the positions' mean
    /// errors (arena units).
    pub rollout_drift: Vec<Drift>,
    /// The learnt subgoal proposer's held-out error and its "stay still" baseline (arena
    /// units), when the world model has one.
    pub subgoal_error: Option<(f64, f64)>,
    /// The `latent` row at each point of the search sweep (empty without one).
    pub sweep: Vec<SweepResult>,
}

fn rate(
    kind: EnvKind,
    size: usize,
    episodes: usize,
    max_steps: usize,
    policy: &mut dyn Policy,
) -> (f64, f64, usize) {
    let mut env = make(kind, size);
    let (mut wins, mut ms, mut entries) = (0usize, 0.0, 0usize);
    for e in 0..episodes {
        let ep = run_episode(env.as_mut(), 900_000 + e as u64, policy, max_steps, false);
        wins += ep.success as usize;
        ms += ep.ms_per_action;
        entries += ep.entered_forbidden as usize;
    }
    (wins as f64 / episodes as f64, ms / episodes as f64, entries)
}

/// Spearman rank correlation.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for k in i..=j {
                r[idx[k]] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt().max(1e-12)
}

/// What the energy-landscape check measured: Spearman correlations, each taken per start state
/// over its candidates and then averaged over the start states.
#[derive(Debug, Clone, Default)]
pub struct Landscape {
    /// The goal energy the planner ranks candidates by (latent distance of the last predicted
    /// latents) against the true distance to the goal where the candidate really ends.
    pub predicted: f64,
    /// The same energy on the frames really reached, encoded (the encoder alone).
    pub reached: f64,
    /// The same figures after each predictor step of the rollout, the step's own distances.
    pub steps: Vec<LandscapeStep>,
}

/// The energy landscape after one predictor step (see [`Landscape`]).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LandscapeStep {
    /// Predicted latents' distance to the goal against the true distance.
    pub predicted: f64,
    /// The encoded real frame's distance against the true distance.
    pub reached: f64,
    /// Predicted latents' distance against the encoded real frame's: does the predictor rank
    /// candidates as the encoder would on what really happens? Low here beside a high
    /// `reached` puts the blame on the predictor.
    pub fidelity: f64,
}

/// The energy-landscape check: from `states` seeded start states, `actions` random constant
/// action sequences of the planning horizon each; the Spearman correlation (per state, then
/// averaged) between the latent energy and the true distance to the goal after executing them;
/// and the same for the energy of the frames really reached (encoder alone, no predictor): a
/// low first figure beside a high second one points at the predictor, two low ones at the
/// encoder. Each predictor step is measured too (see [`LandscapeStep`]).
pub fn energy_landscape(
    wm: &WorldModel,
    kind: EnvKind,
    cfg: &SearchConfig,
    energy: LatentEnergy,
    states: usize,
    actions: usize,
) -> Landscape {
    let mut env = make(kind, wm.encoder.size());
    let h = cfg.horizon;
    let mut out = Landscape {
        steps: vec![LandscapeStep::default(); h],
        ..Landscape::default()
    };
    let mut planner = LatentPlanner::new(wm, Method::Cem, cfg.clone(), energy, 0);
    let f64s = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
    for s in 0..states {
        env.reset(800_000 + s as u64);
        planner.begin(env.as_ref());
        let mut rng = Rng::new(s as u64);
        let cands: Vec<Vec<[f32; 2]>> = (0..actions)
            .map(|_| {
                let a = [
                    (rng.uniform() * 2.0 - 1.0) as f32,
                    (rng.uniform() * 2.0 - 1.0) as f32,
                ];
                vec![a; h]
            })
            .collect();
        let z0 = wm.encoder.encode(&[&env.render()]);
        // The goal energy alone: the guardrails' penalties are not part of the landscape.
        let parts = planner.energy_parts(&z0, env.proprio(), &cands);
        let state = env.state();
        // Per step, per candidate: the true distance and the frame really reached.
        let mut truth = vec![Vec::with_capacity(actions); h];
        let mut reached = vec![Vec::with_capacity(actions); h];
        let mut sim = env.boxed_clone();
        for c in &cands {
            sim.set_state(&state);
            for (k, a) in c.iter().enumerate() {
                for _ in 0..wm.config.frameskip.max(1) {
                    sim.step(*a);
                }
                reached[k].push(sim.render());
                // Distance of the agent to where the goal image has it (PointMaze) or of the
                // block to the pad (PushBlock): the environment's own measure, before the
                // success radius.
                truth[k].push(
                    sim.goal_distance() as f64
                        + 1e-3 * crate::env::dist(sim.agent(), env.agent()) as f64,
                );
            }
        }
        // The encoder alone: the same distance from the frames actually reached.
        let enc: Vec<Vec<f64>> = reached
            .iter()
            .map(|frames| {
                let frames: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                f64s(&planner.goal_distance(wm.encoder.encode(&frames)))
            })
            .collect();
        let [n, _, p, d] = parts.predicted.dims();
        for (k, step) in out.steps.iter_mut().enumerate() {
            let at_k = parts.predicted.clone().narrow(1, k, 1).reshape([n, p, d]);
            let pred = f64s(&planner.goal_distance(at_k));
            step.predicted += spearman(&pred, &truth[k]) / states as f64;
            step.reached += spearman(&enc[k], &truth[k]) / states as f64;
            step.fidelity += spearman(&pred, &enc[k]) / states as f64;
        }
        out.predicted += spearman(&f64s(&parts.goal), &truth[h - 1]) / states as f64;
        out.reached += spearman(&enc[h - 1], &truth[h - 1]) / states as f64;
    }
    out
}

/// One predictor step of [`rollout_drift`]: mean distances (arena units) from the truth.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Drift {
    /// The position probe on the predicted latents, against the true agent position.
    pub predicted: f64,
    /// The predictor's state output.
    pub state: f64,
    /// The probe on the true frame's latents (the probe's own error, the floor).
    pub real: f64,
    /// The object probe on the predicted latents, against the true object position (for an
    /// environment with an object).
    pub object: Option<f64>,
}

/// How far the world model's idea of the scene drifts over an open-loop rollout: from the
/// first frame of each of `trajs` (not seen in training), the predictor rolls out over the
/// recorded actions; per predictor step, see [`Drift`].
pub fn rollout_drift(wm: &WorldModel, trajs: &[Trajectory], steps: usize) -> Vec<Drift> {
    use burn::tensor::{Tensor, TensorData};
    let skip = wm.config.frameskip.max(1);
    let n = trajs.len();
    let steps = steps.min(trajs.first().map_or(0, |t| t.steps() / skip));
    if n == 0 || steps == 0 {
        return Vec::new();
    }
    let size = wm.encoder.size();
    let device = wm.encoder.device();
    let at = |k: usize| -> Vec<&[u8]> { trajs.iter().map(|t| t.frame(k * skip, size)).collect() };
    let z0 = wm.encoder.encode(&at(0));
    let [_, p, d] = z0.dims();
    let mut z = z0.unsqueeze_dim::<4>(1);
    let s0: Vec<f32> = trajs.iter().flat_map(|t| t.proprio[0]).collect();
    let mut s = Tensor::<3>::from_data(TensorData::new(s0, [n, 1, 4]), &device);
    let acts: Vec<f32> = trajs
        .iter()
        .flat_map(|t| t.actions[..steps * skip].iter().flatten().copied())
        .collect();
    let acts = Tensor::<3>::from_data(TensorData::new(acts, [n, steps, 2 * skip]), &device);
    let history = wm.config.history();
    let mut out = Vec::new();
    for k in 0..steps {
        let (zn, sn) = wm
            .predictor
            .next_step(history, z.clone(), s.clone(), acts.clone());
        let host = host_f32(zn.clone().reshape([n, p * d]));
        let predicted = wm.probe_positions(&host);
        let objects = wm.object_positions(&host);
        let states = host_f32(sn.clone().reshape([n, 4]));
        let real = wm.probe_positions(&wm.encoder.encode_host(&at(k + 1)));
        let mut e = [0.0f64; 4];
        for (i, t) in trajs.iter().enumerate() {
            let f = (k + 1) * skip;
            let truth = t.agent[f];
            let st = crate::env::proprio_position(&states[4 * i..4 * i + 4]);
            e[0] += crate::env::dist(predicted[i], truth) as f64;
            e[1] += crate::env::dist(st, truth) as f64;
            e[2] += crate::env::dist(real[i], truth) as f64;
            if let (Some(o), Some(truth)) = (&objects, t.object.get(f)) {
                e[3] += crate::env::dist(o[i], *truth) as f64;
            }
        }
        let e = e.map(|v| v / n as f64);
        out.push(Drift {
            predicted: e[0],
            state: e[1],
            real: e[2],
            object: objects.is_some().then_some(e[3]),
        });
        z = Tensor::cat(vec![z, zn], 1);
        s = Tensor::cat(vec![s, sn], 1);
    }
    out
}

/// Builds and trains a world model for `kind` on the encoder of `ckpt`.
pub fn build_world_model(
    kind: EnvKind,
    ckpt: &Checkpoint,
    opts: &PlanBenchOptions,
    log: &mut dyn FnMut(String),
) -> Result<(WorldModel, FitReport, f64), PlannerError> {
    let device = Device::flex();
    let encoder = FrameEncoder::new(ckpt, &device).map_err(PlannerError::other)?;
    let trajs = collect(
        kind,
        encoder.size(),
        opts.collect_episodes,
        opts.collect_steps,
        11,
    );
    let t = Instant::now();
    let steps = opts.world.steps;
    let (wm, report) = WorldModel::fit(
        encoder,
        opts.world.clone(),
        &trajs,
        2000,
        &mut |s, tf, ro| {
            if s % (steps / 5).max(1) == 0 || s + 1 == steps {
                log(format!(
                    "  {kind}: predictor step {s}/{steps}: teacher forcing {tf:.4}, 2-step rollout {ro:.4}"
                ));
            }
        },
    );
    if let Some(r2) = report.object_probe_r2 {
        log(format!("  {kind}: object probe R2 {r2:.3}"));
    }
    if let Some(s) = &report.subgoal {
        log(format!(
            "  {kind}: learnt subgoals: {} hindsight windows; held-out error {:.2} arena units \
             ({} windows; the agent staying still: {:.2})",
            s.train_windows, s.error, s.held_windows, s.still_error
        ));
    }
    Ok((wm, report, t.elapsed().as_secs_f64()))
}

/// The policy of `row` on `wm` and what to call it, or `None` where the row does not apply
/// (`readout` with every weight 0, `rule` without a contact rule, `rule` and `learnt` without
/// an object).
fn row_policy<'a>(
    row: PlanRow,
    kind: EnvKind,
    wm: &'a WorldModel,
    opts: &PlanBenchOptions,
) -> Option<(Box<dyn Policy + 'a>, String)> {
    let latent = || LatentPlanner::new(wm, opts.method, opts.search.clone(), opts.energy, 1);
    let two_level =
        |high| LatentPlanner::two_level(wm, opts.method, &opts.search, opts.energy, 1, high);
    let weights = ReadoutWeights::default_with(
        kind,
        opts.position_weight,
        opts.object_weight,
        opts.arena_weight,
    );
    let object = wm.object_probe.is_some();
    Some(match row {
        PlanRow::Latent => (
            Box::new(latent()),
            "latent planner (latent energy alone)".into(),
        ),
        PlanRow::Readout if weights.any() => (
            Box::new(latent().with_readout_weights(weights)),
            format!(
                "latent planner + read-out terms (position {}, object {}, arena {})",
                weights.position, weights.object, weights.arena
            ),
        ),
        PlanRow::Rule if object => (
            Box::new(two_level(HighLevel::Rule(kind.waypoint_rule()?))),
            format!("two levels, contact rule on top ({})", two_level_settings()),
        ),
        PlanRow::Learnt if object => (
            Box::new(two_level(HighLevel::Learnt(wm.subgoals.as_ref()?))),
            format!(
                "two levels, learnt subgoals on top ({})",
                two_level_settings()
            ),
        ),
        PlanRow::Random => (Box::new(RandomPolicy::new(2)), "random policy".into()),
        PlanRow::Oracle => (
            Box::new(OraclePlanner::new(
                opts.method,
                opts.search.clone(),
                wm.config.frameskip,
                3,
            )),
            "oracle (the same search on the simulator)".into(),
        ),
        _ => return None,
    })
}

/// Runs the bench for one environment with the encoder of `ckpt`.
pub fn bench_env(
    kind: EnvKind,
    ckpt: &Checkpoint,
    opts: &PlanBenchOptions,
    log: &mut dyn FnMut(String),
) -> Result<EnvReport, PlannerError> {
    let (wm, fit, train_seconds) = build_world_model(kind, ckpt, opts, log)?;
    let (r2, subgoal) = (fit.probe_r2, fit.subgoal);
    let rollout = (fit.train.rollout_before, fit.train.rollout_after);
    let size = wm.encoder.size();
    let landscape = energy_landscape(&wm, kind, &opts.search, opts.energy, 10, 32);
    let (spearman, spearman_encoder) = (landscape.predicted, landscape.reached);
    log(format!(
        "  {kind}: energy landscape per predictor step (Spearman; predicted / reached vs the \
         true distance, fidelity predicted vs reached): {}",
        landscape
            .steps
            .iter()
            .map(|e| format!("{:.2}/{:.2}/{:.2}", e.predicted, e.reached, e.fidelity))
            .collect::<Vec<_>>()
            .join("  ")
    ));
    // Long enough for an open-loop rollout of the whole planning horizon.
    let plan_steps = opts.search.horizon * wm.config.frameskip.max(1);
    let held_out = collect(kind, size, 32, opts.collect_steps.max(plan_steps), 77);
    let drift = rollout_drift(&wm, &held_out, opts.search.horizon);
    log(format!(
        "  {kind}: open-loop drift per predictor step (arena units; agent: probe on predicted \
         latents / predictor state / probe on real frames{}): {}",
        if wm.object_probe.is_some() {
            "; object: probe on predicted latents"
        } else {
            ""
        },
        drift
            .iter()
            .map(|e| {
                let object = e.object.map(|o| format!("; {o:.2}")).unwrap_or_default();
                format!("{:.2}/{:.2}/{:.2}{object}", e.predicted, e.state, e.real)
            })
            .collect::<Vec<_>>()
            .join("  ")
    ));
    log(format!(
        "  {kind}: probe R2 {r2:.3}, rollout error {:.4} -> {:.4}, energy-landscape Spearman {spearman:.3} (encoder alone {spearman_encoder:.3})",
        rollout.0, rollout.1
    ));
    let mut report = EnvReport {
        latent: None,
        readout: None,
        rule: None,
        learnt: None,
        random: None,
        oracle: None,
        ms_per_action: 0.0,
        ms_per_action_by_row: BTreeMap::new(),
        spearman_predicted: spearman,
        spearman_reached: spearman_encoder,
        landscape_steps: landscape.steps,
        forbidden_entries: 0,
        probe_r2: r2,
        rollout_error: rollout,
        train_seconds,
        rollout_drift: drift,
        subgoal_error: subgoal.map(|s| (s.error, s.still_error)),
        sweep: Vec::new(),
    };
    for &row in &opts.rows {
        let Some((mut policy, what)) = row_policy(row, kind, &wm, opts) else {
            continue;
        };
        let (success, ms, entries) =
            rate(kind, size, opts.episodes, opts.max_steps, policy.as_mut());
        let world_model = !matches!(row, PlanRow::Random | PlanRow::Oracle);
        if world_model {
            log(format!(
                "  {kind}: {what}: {success:.2} ({ms:.0} ms/action, {entries} forbidden entries)"
            ));
            report.forbidden_entries += entries;
            report.ms_per_action = report.ms_per_action.max(ms);
            report.ms_per_action_by_row.insert(row.to_string(), ms);
        } else {
            log(format!("  {kind}: {what}: {success:.2}"));
        }
        let slot = match row {
            PlanRow::Latent => &mut report.latent,
            PlanRow::Readout => &mut report.readout,
            PlanRow::Rule => &mut report.rule,
            PlanRow::Learnt => &mut report.learnt,
            PlanRow::Random => &mut report.random,
            PlanRow::Oracle => &mut report.oracle,
        };
        *slot = Some(success);
    }
    for point in &opts.sweep {
        let search = point.apply(&opts.search);
        let returns = search.returns.to_string();
        let mut policy = LatentPlanner::new(&wm, opts.method, search, opts.energy, 1);
        let (success, ms, entries) = rate(kind, size, opts.episodes, opts.max_steps, &mut policy);
        log(format!(
            "  {kind}: sweep {point} (latent energy alone, returns {returns}): {success:.2} \
             ({ms:.0} ms/action, {entries} forbidden entries)"
        ));
        report.sweep.push(SweepResult {
            point: point.to_string(),
            samples: point.samples,
            iterations: point.iterations,
            returns,
            success,
            ms_per_action: ms,
            forbidden_entries: entries,
        });
    }
    Ok(report)
}

/// Pretrains the tiny preset's JEPA, with patches of `patch` pixels, on clips of the
/// environment's own videos (collected with the same random and scripted policies): a
/// self-supervised encoder for that world, as a released encoder would be fine-tuned.
/// `steps = 0` returns the random initialisation.
///
/// The tiny preset's own patch of 8 pixels makes a 4x4 token grid on its 32-pixel frames, with
/// PointMaze's agent inside one patch: too coarse for a latent energy that ranks nearby
/// positions (see [`LatentEnergy`]). Patches of 4 make an 8x8 grid at four times the tokens.
pub fn pretrain_encoder(
    kind: EnvKind,
    steps: u64,
    patch: usize,
    log: &mut dyn FnMut(String),
) -> Result<Checkpoint, PlannerError> {
    use amity_shared::data::ClipBatch;
    use amity_shared::train::Trainer;
    let mut config = amity_shared::config::Config::preset("tiny").map_err(PlannerError::other)?;
    config.model.patch = patch;
    config.model.validate().map_err(PlannerError::other)?;
    let mut ckpt = crate::world::seeded_checkpoint(config);
    if steps == 0 {
        return Ok(ckpt);
    }
    ckpt.config.train.steps = steps;
    ckpt.config.train.warmup = (steps / 10).max(1);
    let m = ckpt.config.model.clone();
    let trajs = collect(kind, m.image_size, 160, 24, 23);
    let mut clips: Vec<Vec<u8>> = Vec::new();
    for t in &trajs {
        for start in (0..=t.steps() + 1 - m.frames).step_by(2) {
            clips.push(
                (start..start + m.frames)
                    .flat_map(|f| t.frame(f, m.image_size).to_vec())
                    .collect(),
            );
        }
    }
    let mut trainer = Trainer::new(ckpt.config.clone(), &Device::flex());
    let mut rng = Rng::new(ckpt.config.train.seed ^ 0x5eed);
    let b = ckpt.config.train.batch;
    for step in 0..steps {
        let picks: Vec<&[u8]> = (0..b)
            .map(|_| clips[rng.below(clips.len())].as_slice())
            .collect();
        let s = trainer.step(&ClipBatch::from_clips(picks, &ckpt.config.model));
        if step % (steps / 5).max(1) == 0 || step + 1 == steps {
            log(format!(
                "  {kind}: encoder pretraining step {step}/{steps}: loss {:.4}",
                s.loss
            ));
        }
    }
    ckpt.model = trainer.model_flat();
    ckpt.target = trainer.target_flat();
    Ok(ckpt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_points_parse_print_and_refuse_what_is_not_one() {
        let p: SweepPoint = "96x6:mean".parse().unwrap();
        assert_eq!(
            p,
            SweepPoint {
                samples: 96,
                iterations: 6,
                returns: Some(Returns::Mean)
            }
        );
        assert_eq!(p.to_string(), "96x6:mean");
        let q: SweepPoint = "48x3".parse().unwrap();
        assert_eq!((q.samples, q.iterations, q.returns), (48, 3, None));
        assert_eq!(q.to_string(), "48x3");
        for bad in [
            "96",
            "0x3",
            "96x0",
            "x3",
            "96x3:median",
            "96x3x2",
            "-1x3",
            "",
        ] {
            let err = bad.parse::<SweepPoint>().unwrap_err();
            assert!(
                err.to_string().contains("SAMPLESxITERATIONS"),
                "{bad}: {err}"
            );
        }
        // Applied to a search: the counts and returns change, fewer elites than samples never.
        let base = SearchConfig::default();
        let tiny: SweepPoint = "4x2:best".parse().unwrap();
        let s = tiny.apply(&base);
        assert_eq!((s.samples, s.iterations, s.returns), (4, 2, Returns::Best));
        assert_eq!(s.elites, base.elites.min(4));
        assert_eq!(s.horizon, base.horizon);
        assert_eq!(q.apply(&base).returns, base.returns);
    }

    #[test]
    fn rows_parse_by_name_and_unknown_ones_are_refused() {
        for row in PlanRow::ALL {
            assert_eq!(row.to_string().parse::<PlanRow>().unwrap(), row);
        }
        let err = "two_level".parse::<PlanRow>().unwrap_err().to_string();
        assert!(err.contains("two_level") && err.contains("learnt"), "{err}");
    }
}
