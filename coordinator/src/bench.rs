//! `amity bench federated`: does the federated run learn what one trainer learns, and at what
//! cost in bytes?
//!
//! Every run trains the tiny preset on the same synthetic world with the same samples: each of
//! `workers` draws `steps` local batches of `batch` clips from its own stream, then the frozen
//! target encoder's velocity probe is fitted (the JEPA core's standard probe set).
//!
//! - `central`: the reference, one trainer taking `steps` steps on the global batch (every
//!   worker's batch of that step together). It is also the quality of DDP with fp32 gradient
//!   synchronisation every step (the same computation), whose bytes are counted as a ring
//!   all-reduce moves them: `2 x 4 bytes x params` per worker per step.
//! - one federated run per *variant* and per H (local steps per round, `steps / H` rounds)
//!   through the real [`Core`] (sans-IO, no sockets), each worker's update encoded and decoded
//!   exactly as on the wire, flush round included.
//! - with `non_iid`, all of it again where each worker only ever sees videos whose first
//!   object has "its" colours (the central run then trains on the union of those pools).
//! - over several seeds (model init, masks and data), reported as mean and spread.
//!
//! A variant is the defaults of [`CoreConfig::new`] with some keys changed, written
//! `up=fp32,down=fp32`, `policy=local-ema`, `lr=1,mu=0`, `objective=sigreg`, or `default`.
//! `attack=flip` (or `noise:S`, `scale:K`) makes worker 0 hostile, so that a variant's screens
//! (`agree=`, `clip=`) can be judged by the probe with and without the attacker.

use std::sync::Arc;

use amity_shared::codec::{self, CodecSpec, ErrorFeedback};
use amity_shared::config::{Config, Objective};
use amity_shared::data::ClipSource;
use amity_shared::eval::{ProbeSet, probe_report};
use amity_shared::federated::{
    GlobalParams, LocalRoundOptions, RoundBudget, RunProgress, TargetPolicy, local_round,
    worker_seed,
};
use amity_shared::synth::{SynthConfig, generate};
use amity_shared::train::Trainer;
use burn::tensor::Device;
use serde::Serialize;

use crate::aggregate::OuterConfig;
use crate::config::CoreConfig;
use crate::core::{Action, ArrivedUpdate, Core, Event, JoinInfo, WorkerId};
use crate::scoring::HeldOut;

/// One federated configuration: the coordinator defaults with some keys changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// How it was written (`default`, `up=fp32,down=fp32`, ...): its name in the report.
    pub name: String,
    /// Uplink codec.
    pub up: CodecSpec,
    /// Downlink codec.
    pub down: CodecSpec,
    /// Target-encoder policy.
    pub policy: TargetPolicy,
    /// Outer optimiser.
    pub outer: OuterConfig,
    /// The anti-collapse objective of the inner steps.
    pub objective: Objective,
    /// Held-out clips the coordinator scores updates on (0: no contribution scoring).
    pub held_out: usize,
    /// Whether the last round flushes every residual densely.
    pub flush: bool,
    /// What worker 0 does to its update (a hostile institution), if anything.
    pub attack: Attack,
    /// Aggregation settings (screens).
    pub aggregation: crate::aggregate::AggregationConfig,
}

/// A model attack by worker 0: what it does to its (decoded) update before the coordinator sees
/// it. Written `none`, `flip`, `scale:K` or `noise:S`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// An honest worker 0.
    None,
    /// The update negated (at the honest norm: norm screens cannot see it).
    Flip,
    /// The update times `K`.
    Scale(f32),
    /// Gaussian noise of `S` times the update's own root-mean-square value, in its place.
    Noise(f32),
}

impl std::str::FromStr for Attack {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let arg = |v: &str| v.parse::<f32>().map_err(|_| ());
        match s.split_once(':') {
            None if s == "none" => Ok(Attack::None),
            None if s == "flip" => Ok(Attack::Flip),
            Some(("scale", k)) => Ok(Attack::Scale(arg(k)?)),
            Some(("noise", k)) => Ok(Attack::Noise(arg(k)?)),
            _ => Err(()),
        }
    }
}

impl Attack {
    /// Applies the attack to `values` (round `round` seeds the noise).
    fn apply(self, values: &mut [f32], round: u64) {
        match self {
            Attack::None => {}
            Attack::Flip => values.iter_mut().for_each(|v| *v = -*v),
            Attack::Scale(k) => values.iter_mut().for_each(|v| *v *= k),
            Attack::Noise(s) => {
                let rms = (values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
                    / values.len().max(1) as f64)
                    .sqrt();
                let mut rng = amity_shared::rng::Rng::derive(0xa77ac, &[round]);
                values
                    .iter_mut()
                    .for_each(|v| *v = (s as f64 * rms * rng.normal()) as f32);
            }
        }
    }
}

/// A variant that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad variant `{0}`: expected `default` or key=value pairs joined by `,` with keys up, down \
     (codec names), policy (local-ema, coordinator-ema), lr, mu (outer SGD), nesterov \
     (true/false), objective (ema, vicreg, sigreg), held_out (clips scored on, 0: off), flush \
     (true/false), attack (none, flip, scale:K, noise:S: worker 0 hostile), agree (min_agreement), \
     clip (clip_ratio)"
)]
pub struct BadVariant(pub String);

impl std::str::FromStr for Variant {
    type Err = BadVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadVariant(s.to_owned());
        let core = CoreConfig::new(Config::preset("tiny").expect("preset"));
        let mut v = Variant {
            name: s.to_owned(),
            up: core.codec,
            down: core.downlink_codec,
            policy: core.target_policy,
            outer: core.outer,
            objective: core.run.train.objective,
            held_out: core.aggregation.held_out_clips,
            flush: core.rounds.flush,
            attack: Attack::None,
            aggregation: core.aggregation,
        };
        if s == "default" {
            return Ok(v);
        }
        for pair in s.split(',') {
            let (k, val) = pair.split_once('=').ok_or_else(bad)?;
            match k {
                "up" => v.up = val.parse().map_err(|_| bad())?,
                "down" => v.down = val.parse().map_err(|_| bad())?,
                "policy" => {
                    v.policy = serde_json::from_value(serde_json::Value::String(val.into()))
                        .map_err(|_| bad())?
                }
                "objective" => {
                    v.objective = serde_json::from_value(serde_json::Value::String(val.into()))
                        .map_err(|_| bad())?
                }
                "lr" => v.outer.lr = val.parse().map_err(|_| bad())?,
                "mu" => v.outer.momentum = val.parse().map_err(|_| bad())?,
                "nesterov" => v.outer.nesterov = val.parse().map_err(|_| bad())?,
                "held_out" => v.held_out = val.parse().map_err(|_| bad())?,
                "flush" => v.flush = val.parse().map_err(|_| bad())?,
                "attack" => v.attack = val.parse().map_err(|_| bad())?,
                "agree" => v.aggregation.min_agreement = val.parse().map_err(|_| bad())?,
                "clip" => v.aggregation.clip_ratio = val.parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        Ok(v)
    }
}

/// Bench settings.
#[derive(Debug, Clone)]
pub struct FederatedBenchOptions {
    /// Simulated workers.
    pub workers: usize,
    /// Local steps each worker takes over the whole run (the sample total is
    /// `workers x steps x batch` for every run).
    pub steps: u64,
    /// Local steps per round (DiLoCo's H) to run each variant at; each must divide `steps`.
    pub local_steps: Vec<u64>,
    /// Clips per local step and worker.
    pub batch: usize,
    /// Seeds (model init, masks, data); every configuration runs once per seed.
    pub seeds: Vec<u64>,
    /// Also run the non-IID split.
    pub non_iid: bool,
    /// Probe videos (fit / score).
    pub probe_videos: (usize, usize),
    /// The federated variants; the first is the one `r2_default` and `reduction` report
    /// (empty: only the central runs).
    pub variants: Vec<Variant>,
    /// The EMA momentum at the start of every run (`None`: the tiny preset's).
    pub ema_start: Option<f64>,
    /// Run the central reference (without it `r2_central` and `r2_gap` are not known).
    pub central: bool,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `central` or the variant's name.
    pub name: String,
    /// Local steps per round (0 for `central`).
    pub h: u64,
    /// `iid` or `non-iid`.
    pub split: &'static str,
    /// The seed.
    pub seed: u64,
    /// Bytes on the wire, both directions, all workers (for `central`: DDP fp32's).
    pub bytes: u64,
    /// Final training loss (mean over the last round's workers, or the last step).
    pub loss: f64,
    /// Velocity-probe R² of the final target encoder.
    pub velocity_r2: f64,
    /// Largest outer-step norm over mean-pseudo-gradient norm of the run's rounds (0 for
    /// `central`).
    pub max_outer_step_ratio: f64,
    /// Worker 0's updates rejected (under an attack: the attack caught).
    pub rejected_w0: usize,
    /// Updates of the other workers rejected.
    pub rejected_others: usize,
    /// Lowest cosine of worker 0's updates with the recent global steps, and of the others'
    /// (ordinary rounds; NaN for `central`).
    pub min_history_cos: (f64, f64),
    /// Lowest cosine of worker 0's updates with the rest of their round, and of the others'.
    pub min_peer_cos: (f64, f64),
}

/// A configuration's runs over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// `central` or the variant's name.
    pub name: String,
    /// Local steps per round (0 for `central`).
    pub h: u64,
    /// `iid` or `non-iid`.
    pub split: &'static str,
    /// Mean velocity R² over the seeds.
    pub r2_mean: f64,
    /// Sample standard deviation of the velocity R² (0 with one seed).
    pub r2_sd: f64,
    /// Mean bytes.
    pub bytes: f64,
    /// DDP fp32 bytes over these bytes.
    pub reduction: f64,
    /// Mean final loss.
    pub loss: f64,
}

/// The bench's result: its last JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedReport {
    /// Always `federated`.
    pub bench: &'static str,
    /// Seeds run.
    pub seeds: usize,
    /// DDP fp32 bytes over the default variant's, at its worst H and split.
    pub reduction: f64,
    /// Mean velocity R² of the centralised reference (IID).
    pub r2_central: f64,
    /// Mean velocity R² of the default variant, worst over H and split.
    pub r2_default: f64,
    /// Mean velocity R² of a random (untrained) encoder.
    pub r2_random: f64,
    /// `r2_central - r2_default`, worst over every variant, H and split (each against the
    /// central run of its split).
    pub r2_gap: f64,
    /// Every configuration over the seeds.
    pub groups: Vec<GroupReport>,
    /// Every run.
    pub runs: Vec<RunReport>,
}

fn run_config(opts: &FederatedBenchOptions, seed: u64, objective: Objective) -> Config {
    let mut run = Config::preset("tiny").expect("preset");
    run.train.batch = opts.batch;
    run.train.seed = seed;
    run.train.objective = objective;
    // The schedules span the run: `steps` local steps, a tenth of them warm-up.
    run.train.steps = opts.steps;
    run.train.warmup = (opts.steps / 10).max(1);
    if let Some(m) = opts.ema_start {
        run.train.ema_start = m;
    }
    run
}

/// Per-worker training clips: IID (each worker its own stream of fresh videos) or skewed by
/// colour.
fn sources(run: &Config, workers: usize, non_iid: bool) -> Vec<ClipSource> {
    let synth = SynthConfig::for_size(run.model.image_size, run.model.frames);
    if !non_iid {
        return (0..workers)
            .map(|_| ClipSource::Synthetic(synth.clone()))
            .collect();
    }
    let mut pools: Vec<Vec<Vec<u8>>> = vec![Vec::new(); workers];
    let per = 400;
    let mut seed = 50_000_000u64 + run.train.seed * 1_000_000;
    while pools.iter().any(|p| p.len() < per) {
        let v = generate(&synth, seed);
        seed += 1;
        let w = v.labels.objects[0].colour % workers;
        if pools[w].len() < per {
            pools[w].push(v.pixels);
        }
    }
    pools
        .into_iter()
        .map(|p| ClipSource::Memory(Arc::new(p)))
        .collect()
}

fn split_name(non_iid: bool) -> &'static str {
    if non_iid { "non-iid" } else { "iid" }
}

/// One trainer on the global batch: what every worker draws at that step, together.
fn central(opts: &FederatedBenchOptions, probes: &ProbeSet, seed: u64, non_iid: bool) -> RunReport {
    let run = run_config(opts, seed, Objective::Ema);
    let device = Device::flex();
    let mut t = Trainer::new(run.clone(), &device);
    let srcs = sources(&run, opts.workers, non_iid);
    let mut loss = 0.0;
    for step in 0..opts.steps {
        let parts: Vec<_> = srcs
            .iter()
            .enumerate()
            .map(|(w, s)| {
                let seed = worker_seed(run.train.seed, w as u64);
                s.batch(seed, step, opts.batch, &run.model)
            })
            .collect();
        let mut batch = parts[0].clone();
        for p in &parts[1..] {
            batch.batch += p.batch;
            batch.patches.extend_from_slice(&p.patches);
        }
        loss = t.step(&batch).loss;
    }
    let params = t.model_flat().len() as u64;
    RunReport {
        name: "central".into(),
        h: 0,
        split: split_name(non_iid),
        seed,
        bytes: ddp_bytes(opts, params),
        loss,
        velocity_r2: probe_report(&t, probes).velocity_r2,
        max_outer_step_ratio: 0.0,
        rejected_w0: 0,
        rejected_others: 0,
        min_history_cos: (f64::NAN, f64::NAN),
        min_peer_cos: (f64::NAN, f64::NAN),
    }
}

/// What DDP with fp32 gradients all-reduced every step moves, all workers together.
fn ddp_bytes(opts: &FederatedBenchOptions, params: u64) -> u64 {
    opts.steps * opts.workers as u64 * params * 4 * 2
}

/// The coordinator core of one federated bench run: the variant's settings, `rounds` rounds of
/// `h` steps, and every worker joined.
fn bench_core(
    opts: &FederatedBenchOptions,
    variant: &Variant,
    run: &Config,
    h: u64,
    rounds: u64,
) -> Core {
    let mut cfg = CoreConfig::new(run.clone());
    cfg.codec = variant.up;
    cfg.downlink_codec = variant.down;
    cfg.target_policy = variant.policy;
    cfg.outer = variant.outer;
    cfg.rounds.steps = h;
    cfg.rounds.min_workers = opts.workers;
    cfg.rounds.max_rounds = rounds;
    cfg.checkpoint_every = 0;
    cfg.aggregation = variant.aggregation;
    cfg.aggregation.held_out_clips = variant.held_out;
    cfg.rounds.flush = variant.flush;
    let (mut core, _) = Core::new(cfg, GlobalParams::seeded(run), &[]);
    if variant.held_out > 0 {
        // Held-out clips like the coordinator's: synthetic, from a stream no worker draws.
        let source = ClipSource::synthetic(&run.model);
        core.set_scorer(Box::new(HeldOut::new(run, &source, variant.held_out)));
    }
    for w in 0..opts.workers {
        let info = JoinInfo {
            name: format!("w{w}"),
            backend: "flex".into(),
            samples_per_s: 1.0,
            local_shards: Vec::new(),
        };
        core.handle(
            Event::Joined {
                worker: WorkerId(w as u64),
                info,
            },
            0,
        );
    }
    core
}

fn diloco(
    opts: &FederatedBenchOptions,
    probes: &ProbeSet,
    variant: &Variant,
    h: u64,
    seed: u64,
    non_iid: bool,
) -> RunReport {
    let run = run_config(opts, seed, variant.objective);
    let device = Device::flex();
    let rounds = opts.steps / h;
    let mut core = bench_core(opts, variant, &run, h, rounds);
    let srcs = sources(&run, opts.workers, non_iid);
    let mut trainers: Vec<Trainer> = (0..opts.workers)
        .map(|_| Trainer::new(run.clone(), &device))
        .collect();
    let mut feedback = vec![ErrorFeedback::new(); opts.workers];
    let (mut now, mut bytes, mut max_ratio) = (0, 0u64, 0.0f64);
    while !core.finished() {
        let round = core.round();
        let flush = core.is_flush_round(round);
        let start = core.params().clone();
        for (w, trainer) in trainers.iter_mut().enumerate() {
            let ropts = LocalRoundOptions {
                budget: RoundBudget::steps(h),
                policy: variant.policy,
                seed: run.train.seed,
                worker: w as u64,
                progress: RunProgress {
                    round,
                    planned_rounds: rounds,
                },
                slowdown: 1.0,
            };
            let u = local_round(trainer, &start, &srcs[w], &ropts, |_, _| {}, || false)
                .expect("layouts match");
            let parts = core.update_parts();
            let spec = if flush {
                variant.up.dense()
            } else {
                variant.up
            };
            let (wire, _) = feedback[w].encode_parts(&spec, &u.wire_values(), &parts);
            let mut values = codec::decode_parts(&wire, &parts).expect("own encoding");
            if w == 0 {
                variant.attack.apply(&mut values, round);
            }
            now += 1;
            let update = ArrivedUpdate {
                round,
                blob: amity_shared::store::BlobId::of(&wire),
                bytes: wire.len() as u64,
                samples: u.samples,
                steps: u.steps,
                loss: u.loss,
                values,
            };
            let acts = core.handle(
                Event::Update {
                    worker: WorkerId(w as u64),
                    update,
                },
                now,
            );
            for a in acts {
                if let Action::RoundClosed(s) = a {
                    bytes += s.bytes_up + s.bytes_down;
                    max_ratio = max_ratio.max(s.outer_step_ratio);
                }
            }
        }
    }
    let last = core.history().last().map_or(f64::NAN, |s| s.loss);
    let screens = Screens::of(core.history());
    let p = core.params();
    let t = Trainer::from_flat(run, &p.model, Some(&p.target), &device).expect("layouts match");
    RunReport {
        name: variant.name.clone(),
        h,
        split: split_name(non_iid),
        seed,
        bytes,
        loss: last,
        velocity_r2: probe_report(&t, probes).velocity_r2,
        max_outer_step_ratio: max_ratio,
        rejected_w0: screens.rejected_w0,
        rejected_others: screens.rejected_others,
        min_history_cos: screens.hist,
        min_peer_cos: screens.peer,
    }
}

/// What the screens did over a run: rejections of worker 0 (the attacker, when there is one)
/// and of the others, and the lowest alignments (with history, with peers) of each.
struct Screens {
    rejected_w0: usize,
    rejected_others: usize,
    hist: (f64, f64),
    peer: (f64, f64),
}

impl Screens {
    fn of(history: &[crate::core::RoundSummary]) -> Self {
        let (mut rejected_w0, mut rejected_others) = (0, 0);
        let (mut hist, mut peer) = ((f64::NAN, f64::NAN), (f64::NAN, f64::NAN));
        let lower = |a: f64, b: Option<f64>| b.map_or(a, |b| if a.is_nan() { b } else { a.min(b) });
        for s in history {
            for (from, _) in &s.rejected {
                if from == "w0" {
                    rejected_w0 += 1;
                } else {
                    rejected_others += 1;
                }
            }
            if s.flush {
                continue;
            }
            for a in &s.alignment {
                if a.from == "w0" {
                    hist.0 = lower(hist.0, a.with_history);
                    peer.0 = lower(peer.0, a.with_others);
                } else {
                    hist.1 = lower(hist.1, a.with_history);
                    peer.1 = lower(peer.1, a.with_others);
                }
            }
        }
        Screens {
            rejected_w0,
            rejected_others,
            hist,
            peer,
        }
    }
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Runs every configuration over every seed, printing each run as it finishes.
pub fn federated(opts: &FederatedBenchOptions, print: &dyn Fn(&RunReport)) -> FederatedReport {
    let base = run_config(opts, 0, Objective::Ema);
    let probes = ProbeSet::synthetic(
        &SynthConfig::for_size(base.model.image_size, base.model.frames),
        opts.probe_videos.0,
        opts.probe_videos.1,
    );
    let splits: Vec<bool> = if opts.non_iid {
        vec![false, true]
    } else {
        vec![false]
    };
    let mut runs = Vec::new();
    let mut random = Vec::new();
    for &seed in &opts.seeds {
        let untrained = Trainer::new(run_config(opts, seed, Objective::Ema), &Device::flex());
        random.push(probe_report(&untrained, &probes).velocity_r2);
        for &non_iid in &splits {
            if opts.central {
                let r = central(opts, &probes, seed, non_iid);
                print(&r);
                runs.push(r);
            }
            for &h in &opts.local_steps {
                for v in &opts.variants {
                    let r = diloco(opts, &probes, v, h, seed, non_iid);
                    print(&r);
                    runs.push(r);
                }
            }
        }
    }
    let params = Trainer::new(base, &Device::flex()).model_flat().len() as u64;
    let ddp = ddp_bytes(opts, params) as f64;
    let mut groups: Vec<GroupReport> = Vec::new();
    for r in &runs {
        if groups
            .iter()
            .any(|g| g.name == r.name && g.h == r.h && g.split == r.split)
        {
            continue;
        }
        let same: Vec<&RunReport> = runs
            .iter()
            .filter(|o| o.name == r.name && o.h == r.h && o.split == r.split)
            .collect();
        let r2: Vec<f64> = same.iter().map(|o| o.velocity_r2).collect();
        let (r2_mean, r2_sd) = mean_sd(&r2);
        let bytes = same.iter().map(|o| o.bytes as f64).sum::<f64>() / same.len() as f64;
        let loss = same.iter().map(|o| o.loss).sum::<f64>() / same.len() as f64;
        groups.push(GroupReport {
            name: r.name.clone(),
            h: r.h,
            split: r.split,
            r2_mean,
            r2_sd,
            bytes,
            reduction: ddp / bytes.max(1.0),
            loss,
        });
    }
    let central_of = |split: &str| {
        groups
            .iter()
            .find(|g| g.name == "central" && g.split == split)
            .map_or(f64::NAN, |g| g.r2_mean)
    };
    let federated: Vec<&GroupReport> = groups.iter().filter(|g| g.name != "central").collect();
    let default_name = opts.variants.first().map(|v| v.name.as_str());
    let defaults: Vec<&&GroupReport> = federated
        .iter()
        .filter(|g| Some(g.name.as_str()) == default_name)
        .collect();
    let worst = |xs: &mut dyn Iterator<Item = f64>, pick: fn(f64, f64) -> f64| {
        xs.reduce(pick).unwrap_or(f64::NAN)
    };
    FederatedReport {
        bench: "federated",
        seeds: opts.seeds.len(),
        reduction: worst(&mut defaults.iter().map(|g| g.reduction), f64::min),
        r2_central: central_of("iid"),
        r2_default: worst(&mut defaults.iter().map(|g| g.r2_mean), f64::min),
        r2_random: mean_sd(&random).0,
        r2_gap: worst(
            &mut federated.iter().map(|g| central_of(g.split) - g.r2_mean),
            f64::max,
        ),
        groups,
        runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_from_the_defaults() {
        let d: Variant = "default".parse().unwrap();
        let v: Variant = "up=fp32,down=topk0.1/64+int8,policy=local-ema,lr=1,mu=0,objective=sigreg"
            .parse()
            .unwrap();
        assert_eq!(v.up, CodecSpec::FP32);
        assert_eq!(v.down, "topk0.1/64+int8".parse().unwrap());
        assert_eq!(v.policy, TargetPolicy::LocalEma);
        assert_eq!((v.outer.lr, v.outer.momentum), (1.0, 0.0));
        assert_eq!(v.outer.nesterov, d.outer.nesterov);
        assert_eq!(v.objective, Objective::Sigreg);
        for bad in ["up=zip", "lr", "colour=red", "policy=nobody", "attack=melt"] {
            assert!(bad.parse::<Variant>().is_err(), "{bad}");
        }
        let a: Variant = "attack=scale:-2".parse().unwrap();
        assert_eq!(a.attack, Attack::Scale(-2.0));
        let mut v = vec![1.0f32, -2.0];
        Attack::Flip.apply(&mut v, 0);
        assert_eq!(v, [-1.0, 2.0]);
        Attack::Noise(1.0).apply(&mut v, 0);
        assert!(v != [-1.0, 2.0] && v.iter().all(|x| x.is_finite()));
    }
}
