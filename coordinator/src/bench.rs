//! `amity bench federated`: what DiLoCo and compression cost in quality and save in bytes.
//!
//! Every run trains the tiny preset on the same synthetic world with the same total samples
//! (`workers x rounds x local_steps x batch`), then fits the JEPA core's frozen-encoder probes:
//!
//! - `ddp-fp32`: the baseline, one optimiser step per global batch with dense fp32 gradient
//!   synchronisation every step (counted as `2 x 4 bytes x params` per worker per step, what a
//!   ring all-reduce moves);
//! - `diloco-fp32`, `diloco-int8`, `diloco-topk-int8-ef` (by default top-5% + int8 up with
//!   error feedback, top-10% + int8 deltas down), each under the local-EMA target policy;
//! - `diloco-fp32-coordinator-ema` and `diloco-topk-int8-ef-coordinator-ema`: the other
//!   target-encoder policy;
//! - with `non_iid`, `ddp-fp32` and `diloco-topk-int8-ef` again where each worker only ever
//!   sees videos whose first object has "its" colours.
//!
//! The federated runs go through the real [`Core`] (sans-IO, so no sockets are needed) with
//! each worker's update compressed and decoded exactly as on the wire.

use std::sync::Arc;

use amity_shared::codec::{self, CodecSpec, ErrorFeedback};
use amity_shared::config::Config;
use amity_shared::data::ClipSource;
use amity_shared::eval::{ProbeSet, probe_report};
use amity_shared::federated::{LocalRoundOptions, RoundBudget, TargetPolicy, local_round};
use amity_shared::synth::{SynthConfig, generate};
use amity_shared::train::Trainer;
use burn::tensor::Device;
use serde::Serialize;

use crate::config::CoreConfig;
use crate::core::{Action, ArrivedUpdate, Core, Event, JoinInfo};

/// Bench settings.
#[derive(Debug, Clone)]
pub struct FederatedBenchOptions {
    /// Simulated workers.
    pub workers: usize,
    /// Outer rounds.
    pub rounds: u64,
    /// Local steps per round.
    pub local_steps: u64,
    /// Clips per local step.
    pub batch: usize,
    /// Also run the non-IID split.
    pub non_iid: bool,
    /// Probe videos (fit / score).
    pub probe_videos: (usize, usize),
    /// Uplink and downlink codecs of the compressed run.
    pub compressed: (String, String),
    /// Run only these runs (all when empty).
    pub only: Vec<String>,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Run name.
    pub name: String,
    /// Bytes on the wire, both directions, all workers.
    pub bytes: u64,
    /// Final training loss (mean over the last round's workers, or the last step).
    pub loss: f64,
    /// Velocity-probe R² of the final target encoder.
    pub velocity_r2: f64,
}

/// The bench's result.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedReport {
    /// Always `federated`.
    pub bench: &'static str,
    /// Every run.
    pub runs: Vec<RunReport>,
    /// Bytes of `ddp-fp32` over bytes of `diloco-topk-int8-ef` (null when either was not run).
    pub reduction: Option<f64>,
    /// Velocity R² of `ddp-fp32` minus that of `diloco-topk-int8-ef`.
    pub r2_gap: Option<f64>,
}

fn run_config(opts: &FederatedBenchOptions) -> Config {
    let mut run = Config::preset("tiny").expect("preset");
    run.train.batch = opts.batch;
    // The inner schedule spans the run's local steps.
    run.train.steps = opts.rounds * opts.local_steps;
    run.train.warmup = (run.train.steps / 10).max(1);
    run
}

/// Per-worker training clips: IID (each worker its own seeds) or skewed by colour.
fn sources(run: &Config, workers: usize, non_iid: bool) -> Vec<ClipSource> {
    let synth = SynthConfig::for_size(run.model.image_size, run.model.frames);
    if !non_iid {
        return (0..workers)
            .map(|_| ClipSource::Synthetic(synth.clone()))
            .collect();
    }
    let mut pools: Vec<Vec<Vec<u8>>> = vec![Vec::new(); workers];
    let per = 400;
    let mut seed = 50_000_000u64;
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

fn ddp(opts: &FederatedBenchOptions, probes: &ProbeSet, non_iid: bool) -> RunReport {
    let run = run_config(opts);
    let device = Device::flex();
    let mut t = Trainer::new(run.clone(), &device);
    let srcs = sources(&run, opts.workers, non_iid);
    let steps = opts.rounds * opts.local_steps;
    let mut loss = 0.0;
    for step in 0..steps {
        // The global batch is every worker's local batch.
        let parts: Vec<_> = srcs
            .iter()
            .enumerate()
            .map(|(w, s)| s.batch(run.train.seed + w as u64, step, opts.batch, &run.model))
            .collect();
        let mut batch = parts[0].clone();
        for p in &parts[1..] {
            batch.batch += p.batch;
            batch.patches.extend_from_slice(&p.patches);
        }
        loss = t.step(&batch).loss;
    }
    let params = (t.model_flat().len()) as u64;
    RunReport {
        name: if non_iid {
            "ddp-fp32-non-iid"
        } else {
            "ddp-fp32"
        }
        .into(),
        bytes: steps * opts.workers as u64 * params * 4 * 2,
        loss,
        velocity_r2: probe_report(&t, probes).velocity_r2,
    }
}

fn diloco(
    opts: &FederatedBenchOptions,
    probes: &ProbeSet,
    name: &str,
    up: &str,
    down: &str,
    policy: TargetPolicy,
    non_iid: bool,
) -> RunReport {
    let run = run_config(opts);
    let device = Device::flex();
    let mut cfg = CoreConfig::new(run.clone());
    cfg.codec = up.parse().expect("codec name");
    cfg.downlink_codec = down.parse().expect("codec name");
    cfg.target_policy = policy;
    cfg.rounds.steps = opts.local_steps;
    cfg.rounds.min_workers = opts.workers;
    cfg.rounds.max_rounds = opts.rounds;
    cfg.checkpoint_every = 0;
    let init = Trainer::new(run.clone(), &device);
    let start = amity_shared::federated::GlobalParams {
        model: init.model_flat(),
        target: init.target_flat(),
    };
    let (mut core, _) = Core::new(cfg, start, &[]);
    let srcs = sources(&run, opts.workers, non_iid);
    let mut trainers: Vec<Trainer> = (0..opts.workers)
        .map(|_| Trainer::new(run.clone(), &device))
        .collect();
    let mut feedback = vec![ErrorFeedback::new(); opts.workers];
    let spec: CodecSpec = up.parse().expect("codec name");
    for w in 0..opts.workers {
        core.handle(
            Event::Joined {
                worker: w as u64,
                info: JoinInfo {
                    name: format!("w{w}"),
                    backend: "flex".into(),
                    samples_per_s: 1.0,
                    local_shards: Vec::new(),
                },
            },
            0,
        );
    }
    let mut now = 0;
    let mut bytes = 0u64;
    while !core.finished() {
        let round = core.round();
        let start = core.params().clone();
        for w in 0..opts.workers {
            let ropts = LocalRoundOptions {
                budget: RoundBudget::steps(opts.local_steps),
                policy,
                seed: run.train.seed + w as u64,
                slowdown: 1.0,
            };
            let u = local_round(
                &mut trainers[w],
                &start,
                &srcs[w],
                &ropts,
                |_, _| {},
                || false,
            )
            .expect("layouts match");
            let parts = core.update_parts();
            let (wire, _) = feedback[w].encode_parts(&spec, &u.wire_values(), &parts);
            let values = codec::decode_parts(&wire, &parts).expect("own encoding");
            now += 1;
            let acts = core.handle(
                Event::Update {
                    worker: w as u64,
                    update: ArrivedUpdate {
                        round,
                        blob: amity_shared::store::BlobId::of(&wire),
                        bytes: wire.len() as u64,
                        samples: u.samples,
                        steps: u.steps,
                        loss: u.loss,
                        values,
                    },
                },
                now,
            );
            for a in acts {
                if let Action::RoundClosed(s) = a {
                    bytes += s.bytes_up + s.bytes_down;
                }
            }
        }
    }
    let last = core.history().last().map_or(f64::NAN, |s| s.loss);
    let final_params = core.params();
    let t = Trainer::from_flat(
        run.clone(),
        &final_params.model,
        Some(&final_params.target),
        &device,
    )
    .expect("layouts match");
    RunReport {
        name: name.into(),
        bytes,
        loss: last,
        velocity_r2: probe_report(&t, probes).velocity_r2,
    }
}

/// Runs every configuration, printing each as it finishes.
pub fn federated(opts: &FederatedBenchOptions, print: &dyn Fn(&RunReport)) -> FederatedReport {
    let run = run_config(opts);
    let probes = ProbeSet::synthetic(
        &SynthConfig::for_size(run.model.image_size, run.model.frames),
        opts.probe_videos.0,
        opts.probe_videos.1,
    );
    let mut runs = Vec::new();
    let wanted = |name: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == name);
    let mut push = |r: RunReport| {
        print(&r);
        runs.push(r);
    };
    use TargetPolicy::{CoordinatorEma, LocalEma};
    let (up, down) = (opts.compressed.0.as_str(), opts.compressed.1.as_str());
    let plan: [(&str, &str, &str, TargetPolicy, bool); 6] = [
        ("diloco-fp32", "fp32", "fp32", LocalEma, false),
        (
            "diloco-fp32-coordinator-ema",
            "fp32",
            "fp32",
            CoordinatorEma,
            false,
        ),
        ("diloco-int8", "int8", "int8", LocalEma, false),
        ("diloco-topk-int8-ef", up, down, LocalEma, false),
        (
            "diloco-topk-int8-ef-coordinator-ema",
            up,
            down,
            CoordinatorEma,
            false,
        ),
        ("diloco-topk-int8-ef-non-iid", up, down, LocalEma, true),
    ];
    if wanted("ddp-fp32") {
        push(ddp(opts, &probes, false));
    }
    for (name, u, d, policy, non_iid) in plan {
        if wanted(name) && (!non_iid || opts.non_iid) {
            push(diloco(opts, &probes, name, u, d, policy, non_iid));
        }
    }
    if opts.non_iid && wanted("ddp-fp32-non-iid") {
        push(ddp(opts, &probes, true));
    }
    let find = |n: &str| runs.iter().find(|r| r.name == n);
    let (a, d) = (find("ddp-fp32"), find("diloco-topk-int8-ef"));
    let both = a.zip(d);
    FederatedReport {
        bench: "federated",
        reduction: both.map(|(a, d)| a.bytes as f64 / d.bytes.max(1) as f64),
        r2_gap: both.map(|(a, d)| a.velocity_r2 - d.velocity_r2),
        runs,
    }
}
