//! `amity bench scale`: the coordinator's sans-IO core with a thousand simulated workers.
//!
//! The real `Core` is driven as the server drives it, without sockets: every worker joins, each
//! round is announced to all, and every worker's update arrives as the server hands it over,
//! a handle on a blob of the content store ([`StoredUpdate`], read back and decoded when the
//! round closes). The updates are synthetic but encoded with the run's codec (SparseLoCo by
//! default) at the preset's real length: a direction all workers share plus each one's own noise,
//! so that the agreement screen sees what honest workers send (`--flipped` adds sign-flipped
//! ones for it to reject).
//!
//! Measured per round: the time from the last update's arrival to the round closed (the
//! `handle` call that delivers it, which screens, aggregates, takes the outer step, encodes the
//! state delta and writes the snapshot), the heap's peak during the round above the core at rest
//! before it, over the model state (parameters and target in fp32), counted by the binary's
//! allocator ([`crate::heap`]) (the peak in all, the core's own state of about 2.5 model states
//! included, is reported beside it), and the close's throughput over the dense bytes of all
//! updates beside a `memcpy` of as many bytes through buffers larger than the caches (the
//! machine's memory bandwidth).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use amity_coordinator::aggregate::StoredUpdate;
use amity_coordinator::config::CoreConfig;
use amity_coordinator::core::{Action, ArrivedUpdate, Core, Event, JoinInfo, WorkerId};
use amity_shared::config::Config;
use amity_shared::federated::codec::{self, CodecSpec};
use amity_shared::federated::{GlobalParams, LossStats};
use amity_shared::rng::Rng;
use amity_shared::store::{BlobId, BlobStore, LocalStore};

use crate::heap;

/// `amity bench scale`.
#[derive(Debug, Args)]
pub struct ScaleBenchArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Model preset (sets the update's length).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// The uplink codec (default: the coordinator's default).
    #[arg(long)]
    pub codec: Option<String>,
    /// Workers that send their update sign-flipped (the agreement screen rejects them, one
    /// pass over all updates each).
    #[arg(long, default_value_t = 0)]
    pub flipped: usize,
    /// Rounds measured (the first has no outer momentum yet; later ones do).
    #[arg(long, default_value_t = 2)]
    pub rounds: u64,
    /// Where the updates' blobs are written (default: a folder in the temporary directory).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
}

/// One round's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RoundFigures {
    /// Round.
    pub round: u64,
    /// Milliseconds from the last update's arrival to the round closed.
    pub close_ms: f64,
    /// Mean microseconds the core took per earlier arrival.
    pub arrival_us: f64,
    /// The heap's peak during the round, bytes above the core at rest (before the round or
    /// after it, the larger): what the round itself needs (its updates' handles, aggregation,
    /// the step, the blobs it stores).
    pub peak_bytes: i64,
    /// The heap's peak during the round, bytes in all since before the model state was made
    /// (the core's own state included).
    pub total_peak_bytes: i64,
    /// Bytes of the blobs the close hands the shell to store (global state, state delta,
    /// snapshot), part of the peak.
    pub output_bytes: i64,
    /// Updates accepted and rejected.
    pub accepted: usize,
    /// Updates rejected.
    pub rejected: usize,
}

/// The figures; the last stdout line.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Always `scale`.
    pub bench: &'static str,
    /// Preset.
    pub preset: String,
    /// Codec of the updates.
    pub codec: String,
    /// Simulated workers.
    pub workers: usize,
    /// Values per update (model, then target).
    pub values: usize,
    /// The model state: parameters and target, fp32 bytes.
    pub model_state_bytes: u64,
    /// Encoded bytes of one update (mean).
    pub update_bytes: u64,
    /// The slowest round's close, milliseconds.
    pub close_ms: f64,
    /// The highest heap peak of a round above the core at rest, over the model state.
    pub peak_mem_ratio: f64,
    /// The highest heap peak in all (the core's own state included), over the model state.
    pub total_peak_ratio: f64,
    /// The core's heap at rest after the last round over the model state.
    pub rest_mem_ratio: f64,
    /// Dense bytes of all updates over the slowest close, GB/s.
    pub agg_gbps: f64,
    /// `memcpy` of as many bytes through 256 MiB buffers, GB/s.
    pub memcpy_gbps: f64,
    /// `agg_gbps / memcpy_gbps`.
    pub agg_vs_memcpy: f64,
    /// Every round.
    pub rounds: Vec<RoundFigures>,
}

/// Runs the bench, printing progress to stderr.
pub fn run(args: ScaleBenchArgs) -> Result<ScaleReport> {
    if args.workers < 3 || args.flipped * 2 >= args.workers || args.rounds == 0 {
        bail!("needs at least 3 workers, fewer than half of them flipped, and 1 round or more");
    }
    let run = Config::preset(&args.preset)?;
    let mut cfg = CoreConfig::new(run.clone());
    if let Some(name) = &args.codec {
        cfg.codec = name.parse().context("--codec")?;
    }
    cfg.rounds.min_workers = args.workers;
    cfg.rounds.steps = 50;
    cfg.rounds.max_rounds = 0;
    let scratch = args.scratch.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("amity-bench-scale-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&scratch);
    let store =
        LocalStore::open(&scratch).with_context(|| format!("store in {}", scratch.display()))?;
    let result = measure(&args, cfg, &store);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn measure(args: &ScaleBenchArgs, cfg: CoreConfig, store: &LocalStore) -> Result<ScaleReport> {
    let codec = cfg.codec;
    heap::start();
    let params = GlobalParams::seeded(&cfg.run);
    let model_state_bytes = 4 * (params.model.len() + params.target.len()) as u64;
    let (mut core, _) = Core::new(cfg, params, &[]);
    let parts: Arc<[usize]> = core.update_parts().into();
    let values: usize = parts.iter().sum();
    eprintln!(
        "scale: {} workers, preset {} ({values} values per update, model state {:.1} MiB), codec {codec}",
        args.workers,
        args.preset,
        model_state_bytes as f64 / (1 << 20) as f64
    );
    let mut now = 1_000u64;
    for w in 0..args.workers {
        let info = JoinInfo {
            name: format!("w{w:04}"),
            backend: "flex".into(),
            samples_per_s: 10.0,
            local_shards: Vec::new(),
        };
        core.handle(
            Event::Joined {
                worker: WorkerId(w as u64),
                info,
            },
            now,
        );
    }
    let mut rounds = Vec::new();
    let mut update_bytes = 0u64;
    for r in 0..args.rounds {
        let round = core.round();
        let blobs = write_updates(args, &codec, &parts, r, store)?;
        update_bytes = blobs.iter().map(|b| b.1).sum::<u64>() / blobs.len() as u64;
        let f = deliver(&mut core, store, &parts, blobs, &mut now, args.workers)?;
        let mib = |b: i64| b as f64 / (1 << 20) as f64;
        let ratio = |b: i64| b as f64 / model_state_bytes as f64;
        eprintln!(
            "round {round}: closed in {:.0} ms after the last update ({:.0} us per earlier \
             arrival); the round's heap peak {:.1} MiB above the core at rest ({:.2}x the model \
             state), {:.1} MiB in all ({:.2}x); {} accepted, {} rejected",
            f.close_ms,
            f.arrival_us,
            mib(f.peak_bytes),
            ratio(f.peak_bytes),
            mib(f.total_peak_bytes),
            ratio(f.total_peak_bytes),
            f.accepted,
            f.rejected
        );
        rounds.push(f);
    }
    let rest = heap::live();
    drop(core);
    let close_ms = rounds.iter().map(|r| r.close_ms).fold(0.0, f64::max);
    let peak = rounds.iter().map(|r| r.peak_bytes).max().unwrap_or(0);
    let total_peak = rounds.iter().map(|r| r.total_peak_bytes).max().unwrap_or(0);
    let dense = 4 * (values * args.workers) as u64;
    let agg_gbps = dense as f64 / (close_ms / 1e3) / 1e9;
    let memcpy_gbps = memcpy_bandwidth(dense);
    eprintln!(
        "close over {:.2} GB of dense updates: {agg_gbps:.2} GB/s; memcpy {memcpy_gbps:.2} GB/s",
        dense as f64 / 1e9
    );
    Ok(ScaleReport {
        bench: "scale",
        preset: args.preset.clone(),
        codec: codec.to_string(),
        workers: args.workers,
        values,
        model_state_bytes,
        update_bytes,
        close_ms,
        peak_mem_ratio: peak as f64 / model_state_bytes as f64,
        total_peak_ratio: total_peak as f64 / model_state_bytes as f64,
        rest_mem_ratio: rest as f64 / model_state_bytes as f64,
        agg_gbps,
        memcpy_gbps,
        agg_vs_memcpy: agg_gbps / memcpy_gbps,
        rounds,
    })
}

/// Delivers one round's updates (`blobs`, in worker order) to `core` as the server would, and
/// measures the round: the close (the call that delivers the last update), the earlier
/// arrivals and the heap's peak.
fn deliver(
    core: &mut Core,
    store: &LocalStore,
    parts: &Arc<[usize]>,
    blobs: Vec<(BlobId, u64)>,
    now: &mut u64,
    workers: usize,
) -> Result<RoundFigures> {
    let round = core.round();
    let steps = core.config().rounds.steps;
    let batch = core.config().run.train.batch as u64;
    let rest = heap::live();
    heap::reset_peak();
    let mut arrivals = 0.0;
    let mut close = None;
    let mut output = 0i64;
    for (w, (blob, bytes)) in blobs.into_iter().enumerate() {
        *now += 1;
        let update = ArrivedUpdate {
            round,
            blob,
            bytes,
            samples: batch * steps,
            steps,
            loss: LossStats {
                mean: 0.5,
                first: 0.6,
                last: 0.4,
                baseline: 0.7,
            },
            values: StoredUpdate::new(store.clone(), blob, parts.clone()).into_values(),
        };
        let t0 = Instant::now();
        let actions = core.handle(
            Event::Update {
                worker: WorkerId(w as u64),
                update,
            },
            *now,
        );
        let took = t0.elapsed().as_secs_f64();
        match actions.iter().find_map(|a| match a {
            Action::RoundClosed(s) => Some(s.clone()),
            _ => None,
        }) {
            Some(summary) => {
                // What the close hands the shell to store (state, delta, snapshot): part of
                // the peak, the rest is the close's working memory.
                let stored: Vec<(&str, usize)> = actions
                    .iter()
                    .filter_map(|a| match a {
                        Action::StoreBlob { what, bytes } => Some((*what, bytes.len())),
                        _ => None,
                    })
                    .collect();
                output = stored.iter().map(|(_, n)| *n as i64).sum();
                eprintln!(
                    "  round {round} stores {}",
                    stored
                        .iter()
                        .map(|(w, n)| format!("{w} {:.2} MiB", *n as f64 / (1 << 20) as f64))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                close = Some((took, summary))
            }
            None => arrivals += took,
        }
    }
    let Some((took, summary)) = close else {
        bail!("round {round} did not close after every worker's update");
    };
    Ok(RoundFigures {
        round,
        close_ms: took * 1e3,
        arrival_us: arrivals * 1e6 / (workers - 1) as f64,
        // Above the state the round starts from or the one it leaves, whichever is larger
        // (the first round allocates the outer momentum and the downlink residual).
        peak_bytes: (heap::peak() - rest.max(heap::live())) as i64,
        total_peak_bytes: heap::peak() as i64,
        output_bytes: output,
        accepted: summary.accepted.len(),
        rejected: summary.rejected.len(),
    })
}

/// Encodes and stores every worker's update for round `r` (two threads); returns each one's
/// blob id and encoded size, in worker order. Not counted: the bench's own work.
fn write_updates(
    args: &ScaleBenchArgs,
    codec: &CodecSpec,
    parts: &[usize],
    r: u64,
    store: &LocalStore,
) -> Result<Vec<(BlobId, u64)>> {
    let len: usize = parts.iter().sum();
    let mut rng = Rng::derive(0x5ca1e, &[r]);
    let shared: Vec<f32> = (0..len).map(|_| 1e-3 * rng.normal() as f32).collect();
    let t0 = Instant::now();
    let threads = 2;
    let per = args.workers.div_ceil(threads);
    let chunks: Vec<Result<Vec<(BlobId, u64)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let shared = &shared;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for w in t * per..((t + 1) * per).min(args.workers) {
                        let mut rng = Rng::derive(0x5ca1e, &[r, w as u64 + 1]);
                        let sign = if w < args.flipped { -1.0 } else { 1.0 };
                        let v: Vec<f32> = shared
                            .iter()
                            .map(|s| sign * (s + 1e-3 * rng.normal() as f32))
                            .collect();
                        let bytes = codec::encode_parts(codec, &v, parts);
                        let stored = store.put(&bytes)?;
                        out.push((stored.id, bytes.len() as u64));
                        if t == 0 && out.len() % 100 == 0 {
                            eprintln!(
                                "  round {r}: {} of {} updates encoded",
                                out.len() * threads,
                                args.workers
                            );
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("an encoding thread panicked"))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(args.workers);
    for c in chunks {
        all.extend(c?);
    }
    eprintln!(
        "  round {r}: {} updates encoded and stored in {:.1} s",
        all.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(all)
}

/// GB/s of `memcpy` moving `bytes` in all between two 256 MiB buffers (larger than any cache),
/// the best of three runs.
fn memcpy_bandwidth(bytes: u64) -> f64 {
    const BUF: usize = 256 << 20;
    let src = vec![1u8; BUF];
    let mut dst = vec![0u8; BUF];
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut left = bytes as usize;
        while left > 0 {
            let n = left.min(BUF);
            dst[..n].copy_from_slice(&src[..n]);
            left -= n;
        }
        std::hint::black_box(&dst);
        best = best.max(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}
