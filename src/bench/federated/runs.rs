//! `amity bench federated`: does the federated run learn what one trainer learns, and at what
//! cost in bytes?
//!
//! Every run trains the tiny preset on the same synthetic world with as many samples: each of
//! `workers` draws `steps` local batches of `batch` clips from its own stream, then the frozen
//! target encoder's velocity probe is fitted (the JEPA core's standard probe set). A federated
//! worker mixes the round into its batch seed as a deployed worker does, so its batches are
//! other draws from the same stream than the central run's.
//!
//! - `central`: the reference, one trainer taking `steps` steps on the global batch (every
//!   worker's batch of that step together). It is also the quality of DDP with fp32 gradient
//!   synchronisation every step (the same computation), whose bytes are counted as a ring
//!   all-reduce moves them: `2 x 4 bytes x params` per worker per step.
//! - one federated run per *variant* and per H (local steps per round, `steps / H` rounds)
//!   through the real coordinator core and one real worker core per worker, wired in process
//!   ([`Federation`]): registration, state deltas, schedules, error feedback and flush rounds
//!   are the deployed code's, only the sockets are missing.
//! - with `non_iid`, all of it again where each worker only ever sees videos whose first
//!   object has "its" colours (the central run then trains on the union of those pools).
//! - over several seeds (model init, masks and data), reported as mean and spread.
//!
//! A [`Variant`] is the defaults of [`CoreConfig::new`] with some keys changed, written
//! `up=fp32,down=fp32`, `policy=local-ema`, `lr=1,mu=0`, `objective=sigreg`, or `default`.
//! `attack=flip` (or `noise:S`, `scale:K`) makes worker 0 hostile, so that a variant's screens
//! (`agree=`, `clip=`) can be judged by the probe with and without the attacker.

use std::sync::Arc;

use amity_shared::config::{Config, Objective};
use amity_shared::data::ClipSource;
use amity_shared::data::synth::{SynthConfig, generate};
use amity_shared::eval::{ProbeSet, loss_over_mean, probe_report};
use amity_shared::federated::worker_seed;
use amity_shared::train::Trainer;
use burn::tensor::Device;
use serde::Serialize;

use amity_coordinator::config::CoreConfig;
use amity_coordinator::core::RoundSummary;

use super::harness::{Federation, bench_config};
use super::variant::Variant;

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
    /// The final loss over what predicting the mean target scores on the same steps (the last
    /// round's, or `central`'s last [`CENTRAL_TAIL`] steps): below 1 the predictor explains part
    /// of the target. The loss alone also falls when the target encoder's features narrow.
    pub loss_over_mean: f64,
    /// The final model's predictor loss over predicting the mean, on held-out clips
    /// ([`loss_over_mean`]): what is released, where [`RunReport::loss_over_mean`] is what
    /// the workers saw while training.
    pub released_over_mean: f64,
    /// Velocity-probe R² of the final target encoder.
    pub velocity_r2: f64,
    /// Largest outer-step norm over mean-pseudo-gradient norm of the run's rounds (0 for
    /// `central`).
    pub max_outer_step_ratio: f64,
    /// DDP fp32's bytes over ours in the ordinary rounds, flush rounds left out: what a long
    /// run, where one flush is spread over hundreds of rounds, saves (1 for `central`).
    pub reduction_steady: f64,
    /// How far the last round (the flush) moved the model over how far the run moved it
    /// ([`Outcome::flush_share`](super::harness::Outcome::flush_share); NaN for `central`).
    pub flush_share: f64,
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
    /// Mean [`RunReport::reduction_steady`].
    pub reduction_steady: f64,
    /// Mean [`RunReport::flush_share`].
    pub flush_share: f64,
    /// Mean final loss.
    pub loss: f64,
    /// Mean final loss over predicting the mean.
    pub loss_over_mean: f64,
    /// Mean held-out loss over predicting the mean of the final models.
    pub released_over_mean: f64,
}

/// The steps at the end of a central run whose loss and predict-the-mean baseline are summed
/// for its [`RunReport::loss_over_mean`].
pub const CENTRAL_TAIL: u64 = 20;

/// The bench's result: its last JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedReport {
    /// Always `federated`.
    pub bench: &'static str,
    /// Seeds run.
    pub seeds: usize,
    /// DDP fp32 bytes over the default variant's, at its worst H and split.
    pub reduction: f64,
    /// The same without flush rounds ([`RunReport::reduction_steady`]), at its worst H and
    /// split: what a run of hundreds of rounds saves.
    pub reduction_steady: f64,
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
    let (mut tail_loss, mut tail_base) = (0.0, 0.0);
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
        let s = t.step(&batch);
        loss = s.loss;
        if step + CENTRAL_TAIL >= opts.steps {
            tail_loss += s.loss;
            tail_base += s.mean_baseline;
        }
    }
    let params = t.model_flat().len() as u64;
    RunReport {
        name: "central".into(),
        h: 0,
        split: split_name(non_iid),
        seed,
        bytes: ddp_bytes(opts, params),
        loss,
        loss_over_mean: tail_loss / tail_base,
        released_over_mean: loss_over_mean(&t, probes),
        velocity_r2: probe_report(&t, probes).velocity_r2,
        max_outer_step_ratio: 0.0,
        reduction_steady: 1.0,
        flush_share: f64::NAN,
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

/// One federated run: the variant's coordinator and `opts.workers` worker cores wired in
/// process ([`Federation`]), `steps / h` rounds of `h` local steps.
fn diloco(
    opts: &FederatedBenchOptions,
    probes: &ProbeSet,
    variant: &Variant,
    h: u64,
    seed: u64,
    non_iid: bool,
) -> RunReport {
    let run = run_config(opts, seed, variant.objective);
    let mut cfg = CoreConfig::new(run.clone());
    cfg.codec = variant.up;
    cfg.downlink_codec = variant.down;
    cfg.target_policy = variant.policy;
    cfg.outer = variant.outer;
    cfg.aggregation = variant.aggregation;
    cfg.aggregation.held_out_clips = variant.held_out;
    cfg.rounds.flush = variant.flush;
    let cfg = bench_config(cfg, opts.workers, h, opts.steps / h);
    let sources = sources(&run, opts.workers, non_iid);
    let out = Federation::new(cfg, sources, variant.held_out, variant.attack).run();
    let (last, over_mean) = out
        .history
        .last()
        .map_or((f64::NAN, f64::NAN), |s| (s.loss, s.loss_over_mean()));
    let screens = Screens::of(&out.history);
    let p = &out.params;
    let t =
        Trainer::from_flat(run, &p.model, Some(&p.target), &Device::flex()).expect("layouts match");
    RunReport {
        name: variant.name.clone(),
        h,
        split: split_name(non_iid),
        seed,
        bytes: out.bytes,
        loss: last,
        loss_over_mean: over_mean,
        released_over_mean: loss_over_mean(&t, probes),
        velocity_r2: probe_report(&t, probes).velocity_r2,
        max_outer_step_ratio: out.max_outer_step_ratio,
        reduction_steady: steady_reduction(&out.history, t.model_flat().len() as u64),
        flush_share: out.flush_share,
        rejected_w0: screens.rejected_w0,
        rejected_others: screens.rejected_others,
        min_history_cos: screens.hist,
        min_peer_cos: screens.peer,
    }
}

/// DDP fp32's bytes over ours in the ordinary rounds of `history` (NaN with none), for a model
/// of `params` values: DDP all-reduces them every local step, 4 bytes up and 4 down.
fn steady_reduction(history: &[RoundSummary], params: u64) -> f64 {
    let ordinary = history.iter().filter(|s| !s.flush);
    let (steps, bytes) = ordinary.fold((0u64, 0u64), |(st, b), s| {
        (st + s.steps, b + s.bytes_up + s.bytes_down)
    });
    if bytes == 0 {
        return f64::NAN;
    }
    (steps * params * 8) as f64 / bytes as f64
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
    fn of(history: &[RoundSummary]) -> Self {
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
    let probes = ProbeSet::for_model(&base.model, opts.probe_videos.0, opts.probe_videos.1);
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
        let mean =
            |f: fn(&RunReport) -> f64| same.iter().map(|o| f(o)).sum::<f64>() / same.len() as f64;
        let (loss_over_mean, released_over_mean) =
            (mean(|o| o.loss_over_mean), mean(|o| o.released_over_mean));
        groups.push(GroupReport {
            name: r.name.clone(),
            h: r.h,
            split: r.split,
            r2_mean,
            r2_sd,
            bytes,
            reduction: ddp / bytes.max(1.0),
            reduction_steady: mean(|o| o.reduction_steady),
            flush_share: mean(|o| o.flush_share),
            loss,
            loss_over_mean,
            released_over_mean,
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
        reduction_steady: worst(&mut defaults.iter().map(|g| g.reduction_steady), f64::min),
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
