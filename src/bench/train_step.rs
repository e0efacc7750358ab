//! `amity bench train-step`: the median V-JEPA step time beside PyTorch's on the same shapes.
//!
//! The PyTorch side is the fixed reference script `shared/bench/torch_vjepa.py` (one predictor
//! pass per step, exact GELU, AdamW, EMA), run as a subprocess in the same invocation. To compare
//! the same work, Amity's step is timed with a **single** mask set (V-JEPA's long-range set) and
//! the reference is given exactly the batch, context and target token counts that set produced;
//! the full two-set V-JEPA step is timed as well and reported beside it. The single-set step is
//! timed a second time with burn's own CPU operations in place of `amity_shared::kernels`, so
//! that the kernels' gain is measured side by side in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use amity_shared::device::{Backend, Device};
use serde::Serialize;

use amity_shared::config::Config;
use amity_shared::config::MaskSetConfig;
use amity_shared::data::ClipBatch;
use amity_shared::data::synth::{SynthConfig, generate};
use amity_shared::kernels::{Kernels, set_kernels};
use amity_shared::train::MultiBlockMasker;
use amity_shared::train::Trainer;

use amity_shared::stats::median;
use anyhow::Result;

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainStepOptions {
    /// Preset name.
    pub preset: String,
    /// Clips per step (default: the preset's).
    pub batch: Option<usize>,
    /// Timed steps (after warm-up).
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// The reference script; `None` skips PyTorch.
    pub torch_script: Option<PathBuf>,
    /// The Python interpreter with torch.
    pub python: Option<PathBuf>,
    /// CPU threads for PyTorch (match the machine).
    pub threads: usize,
    /// The backend Amity's step runs on.
    pub backend: Backend,
    /// PyTorch's device for the reference (`cpu`, `cuda`).
    pub torch_device: String,
    /// CPU kernels to time: `Amity` or `Burn` give `amity_ms` and the full step; `Both` gives
    /// them with Amity's and adds `burn_kernels_ms` with burn's operations.
    pub kernels: KernelsToTime,
}

/// The figures of one run; serialised as the bench's last line.
#[derive(Debug, Clone, Serialize)]
pub struct TrainStepReport {
    /// Always `train-step`.
    pub bench: &'static str,
    /// Preset measured.
    pub preset: String,
    /// Backend measured.
    pub backend: String,
    /// Clips per step.
    pub batch: usize,
    /// Tokens per clip.
    pub tokens: usize,
    /// Context tokens of the single-set step.
    pub ctx: usize,
    /// Target tokens of the single-set step.
    pub tgt: usize,
    /// Median single-set step, Amity (the figure compared with PyTorch).
    pub amity_ms: f64,
    /// Median single-set step, PyTorch reference; `null` when torch was not found.
    pub torch_ms: Option<f64>,
    /// `amity_ms / torch_ms` (below 1 means Amity is faster).
    pub ratio: Option<f64>,
    /// The CPU kernels `amity_ms` and the full step ran with: `amity` (`amity_shared::kernels`)
    /// or `burn` (burn's own operations in their place).
    pub kernels: &'static str,
    /// Median single-set step with burn's own CPU operations in place of Amity's kernels, timed
    /// in the same run: the kernels' baseline (`null` when not asked for).
    pub burn_kernels_ms: Option<f64>,
    /// `burn_kernels_ms / amity_ms` (above 1 means the kernels help).
    pub kernel_speedup: Option<f64>,
    /// Median full V-JEPA step (both mask sets), Amity.
    pub amity_full_step_ms: f64,
    /// The CPU both ran on (`model name` in `/proc/cpuinfo`; `null` where it cannot be read).
    /// The ratio moves with it (see the README: `small` measured 0.83-0.90 on a Zen 4 with
    /// AVX-512 and 1.73 on a Zen 3 with AVX2).
    pub cpu: Option<String>,
    /// The vector unit our kernels run on (`avx512f`, `avx2` with FMA, or `none`:
    /// [`amity_shared::kernels::vector_unit`]); ours and PyTorch's pick their code paths by it.
    pub simd: &'static str,
    /// CPU threads both were given.
    pub threads: usize,
}

/// The CPU's model name from `/proc/cpuinfo` (Linux), if it can be read.
fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn time_steps(
    config: Config,
    device: &Device,
    batches: &[ClipBatch],
    warmup: usize,
    steps: usize,
) -> f64 {
    let mut trainer = Trainer::new(config, device);
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let batch = &batches[i % batches.len()];
        let t0 = Instant::now();
        trainer.step(batch);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    median(&times)
}

/// Which CPU kernels the bench times (`--kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelsToTime {
    /// Amity's, then burn's operations in their place, side by side.
    Both,
    /// Amity's only (one kind per process, for profilers such as callgrind).
    Amity,
    /// burn's operations only.
    Burn,
}

/// Runs the bench, printing progress to stderr.
pub fn train_step(opts: &TrainStepOptions) -> Result<TrainStepReport> {
    let mut config = Config::preset(&opts.preset)?;
    if let Some(b) = opts.batch {
        config.train.batch = b;
    }
    let b = config.train.batch;
    let synth = SynthConfig::for_size(config.model.image_size, config.model.frames);
    let batches: Vec<ClipBatch> = (0..4)
        .map(|k| {
            let videos: Vec<_> = (0..b)
                .map(|i| generate(&synth, (k * b + i) as u64))
                .collect();
            ClipBatch::from_clips(videos.iter().map(|v| v.pixels.as_slice()), &config.model)
        })
        .collect();

    let mut single = config.clone();
    single.train.masks = vec![MaskSetConfig::long_range()];
    let masker = MultiBlockMasker::new(single.model.grid(), single.train.masks.clone(), 0);
    let shapes: Vec<(usize, usize)> = (0..(opts.warmup + opts.steps) as u64)
        .map(|s| {
            let m = &masker.sample(s, b)[0];
            (m.n_context, m.n_target)
        })
        .collect();
    let ctx = median(&shapes.iter().map(|s| s.0 as f64).collect::<Vec<_>>()) as usize;
    let tgt = median(&shapes.iter().map(|s| s.1 as f64).collect::<Vec<_>>()) as usize;

    let (cpu, simd) = (cpu_model(), amity_shared::kernels::vector_unit());
    eprintln!(
        "amity: preset {} batch {b} tokens {} (single set: ctx {ctx} tgt {tgt}) on {} ({}, {} threads)",
        opts.preset,
        config.model.tokens(),
        cpu.as_deref().unwrap_or("an unnamed CPU"),
        simd,
        opts.threads
    );
    let device = opts.backend.device(0)?;
    let primary = match opts.kernels {
        KernelsToTime::Burn => Kernels::Burn,
        KernelsToTime::Both | KernelsToTime::Amity => Kernels::Amity,
    };
    set_kernels(primary);
    let amity_ms = time_steps(single.clone(), &device, &batches, opts.warmup, opts.steps);
    eprintln!("amity: single-set step median {amity_ms:.2} ms ({primary:?} kernels)");
    let burn_kernels_ms = if opts.kernels == KernelsToTime::Both {
        set_kernels(Kernels::Burn);
        let ms = time_steps(single, &device, &batches, opts.warmup, opts.steps);
        set_kernels(primary);
        eprintln!(
            "amity: single-set step with burn's operations instead of Amity's kernels median \
             {ms:.2} ms (kernels: {:.2}x)",
            ms / amity_ms
        );
        Some(ms)
    } else {
        None
    };
    let amity_full_step_ms = time_steps(config.clone(), &device, &batches, opts.warmup, opts.steps);
    eprintln!("amity: full V-JEPA step (2 mask sets) median {amity_full_step_ms:.2} ms");

    let torch_ms = match (&opts.torch_script, &opts.python) {
        (Some(script), Some(python)) => Some(run_reference(python, script, opts, b, ctx, tgt)?),
        _ => {
            eprintln!("torch: no Python with PyTorch found; torch_ms is null");
            None
        }
    };
    Ok(TrainStepReport {
        bench: "train-step",
        preset: opts.preset.clone(),
        backend: opts.backend.name().into(),
        batch: b,
        tokens: config.model.tokens(),
        ctx,
        tgt,
        amity_ms,
        ratio: torch_ms.map(|t| amity_ms / t),
        kernels: match primary {
            Kernels::Amity => "amity",
            Kernels::Burn => "burn",
        },
        burn_kernels_ms,
        kernel_speedup: burn_kernels_ms.map(|b| b / amity_ms),
        torch_ms,
        amity_full_step_ms,
        cpu,
        simd,
        threads: opts.threads,
    })
}

fn run_reference(
    python: &Path,
    script: &Path,
    opts: &TrainStepOptions,
    batch: usize,
    ctx: usize,
    tgt: usize,
) -> Result<f64> {
    let err = |reason: String| anyhow::anyhow!("PyTorch reference {}: {reason}", script.display());
    let out = Command::new(python)
        .arg(script)
        .args(["--preset", &opts.preset])
        .args(["--batch", &batch.to_string()])
        .args(["--ctx", &ctx.to_string(), "--tgt", &tgt.to_string()])
        .args(["--steps", &opts.steps.to_string()])
        .args(["--warmup", &opts.warmup.to_string()])
        .args(["--threads", &opts.threads.to_string()])
        .args(["--device", &opts.torch_device])
        .output()
        .map_err(|e| err(format!("cannot run {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(err(format!(
            "exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(last)
        .map_err(|e| err(format!("last line is not JSON ({e}): {last}")))?;
    let ms = v["median_ms"]
        .as_f64()
        .ok_or_else(|| err(format!("no median_ms in {last}")))?;
    eprintln!("torch: single-set step median {ms:.2} ms ({})", v["torch"]);
    Ok(ms)
}

/// Finds a Python that can `import torch`: `$AMITY_BENCH_PYTHON`, the venv that
/// `shared/bench/setup-torch.sh` creates, then `python3`.
pub fn find_torch_python() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("AMITY_BENCH_PYTHON") {
        candidates.push(p.into());
    }
    if let Some(venv) = std::env::var_os("AMITY_BENCH_VENV") {
        candidates.push(PathBuf::from(venv).join("bin/python"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/amity-bench-venv/bin/python"));
    }
    candidates.push("python3".into());
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
