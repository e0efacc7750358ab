//! `amity bench federated`: does the federated run learn what one trainer learns, and at what
//! cost in bytes? The command (arguments, table, plot); the runs are in [`runs`], the in-process
//! federation of real coordinator and worker cores they go through in [`harness`].

mod harness;
mod plot;
mod runs;
mod variant;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Result, bail};
use clap::Args;

use runs::{FederatedBenchOptions, federated};
use variant::Variant;

/// `amity bench federated`.
#[derive(Debug, Args)]
pub struct FederatedBenchArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Local steps each worker takes over the run (the same samples for every run).
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// Local steps per round (DiLoCo's H), comma-separated; each must divide --steps.
    #[arg(long, value_delimiter = ',', default_value = "20,50,100")]
    pub local_steps: Vec<u64>,
    /// Clips per local step and worker.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Seeds, comma-separated: every configuration runs once per seed.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Skip the non-IID (colour-skewed) runs.
    #[arg(long)]
    pub iid_only: bool,
    /// Federated variants, separated by spaces or given once per flag: `default` (the
    /// coordinator's defaults), `none` (central runs only) or key=value pairs joined by `,`
    /// (keys up, down, policy, lr, mu, nesterov, objective, held_out, flush, attack), e.g.
    /// `up=fp32,down=fp32` or `attack=flip` (worker 0 negates its updates). The first is the
    /// one `r2_default` and `reduction` report.
    #[arg(long = "variant", default_values = ["default", "up=fp32,down=fp32"])]
    pub variants: Vec<String>,
    /// PNG of velocity R2 against bytes on the wire, one point per configuration.
    #[arg(long, default_value = "bench-federated.png")]
    pub plot: PathBuf,
    /// Probe videos: fitted, held out (as the learning test's probe).
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [1000, 500])]
    pub probe_videos: Vec<usize>,
    /// EMA momentum at the start of the run (default: the tiny preset's), for every run alike.
    #[arg(long)]
    pub ema_start: Option<f64>,
    /// Skip the central reference runs (for sweeps over variants; the gap is then not known).
    #[arg(long)]
    pub skip_central: bool,
}

/// `amity bench federated`: every configuration over every seed, a summary table, the PNG of
/// R² against bytes, and the JSON line last.
pub fn run(a: FederatedBenchArgs) -> Result<()> {
    if a.workers == 0 || a.batch == 0 || a.seeds.is_empty() || a.local_steps.is_empty() {
        bail!("--workers, --batch, --seeds and --local-steps must not be zero or empty");
    }
    if let Some(h) = a
        .local_steps
        .iter()
        .find(|&&h| h == 0 || !a.steps.is_multiple_of(h))
    {
        bail!("--local-steps {h} does not divide --steps {}", a.steps);
    }
    let variants = a
        .variants
        .iter()
        .flat_map(|v| v.split_whitespace())
        .filter(|v| *v != "none")
        .map(|v| v.parse::<Variant>())
        .collect::<Result<Vec<_>, _>>()?;
    let opts = FederatedBenchOptions {
        workers: a.workers,
        steps: a.steps,
        local_steps: a.local_steps.clone(),
        batch: a.batch,
        seeds: a.seeds.clone(),
        non_iid: !a.iid_only,
        probe_videos: crate::train_cmd::probe_counts(&a.probe_videos)?,
        variants,
        ema_start: a.ema_start,
        central: !a.skip_central,
    };
    let splits = if opts.non_iid { 2 } else { 1 };
    let total = opts.seeds.len()
        * splits
        * (opts.central as usize + opts.local_steps.len() * opts.variants.len());
    println!(
        "federated: {} workers x {} local steps x batch {} (tiny preset), H in {:?}, seeds {:?}: \
         {total} runs",
        a.workers, a.steps, a.batch, a.local_steps, a.seeds
    );
    let done = std::sync::atomic::AtomicUsize::new(0);
    let began = std::time::Instant::now();
    let report = federated(&opts, &|r| {
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        println!(
            "  [{n}/{total} {:>5.0} s] {:<28} H {:>3} {:<7} seed {}  bytes {:>12} ({:.0}x without \
             flushes; the flush moved {:.2} of the run's distance)  loss {:.4} ({:.3} of the mean's; released {:.3})  \
             velocity R2 {:.3}  max outer/mean {:.2}  rejected w0 {} others {}  min cos \
             history {:+.2}/{:+.2} peers {:+.2}/{:+.2} (w0/others)",
            began.elapsed().as_secs_f64(),
            r.name,
            r.h,
            r.split,
            r.seed,
            r.bytes,
            r.reduction_steady,
            r.flush_share,
            r.loss,
            r.loss_over_mean,
            r.released_over_mean,
            r.velocity_r2,
            r.max_outer_step_ratio,
            r.rejected_w0,
            r.rejected_others,
            r.min_history_cos.0,
            r.min_history_cos.1,
            r.min_peer_cos.0,
            r.min_peer_cos.1,
        )
    });
    println!(
        "\n{:<28} {:>4} {:<7} {:>16} {:>10} {:>10} {:>6} {:>9} {:>10} {:>10}",
        "configuration",
        "H",
        "split",
        "velocity R2",
        "reduction",
        "no flush",
        "flush",
        "loss",
        "loss/mean",
        "released"
    );
    for g in &report.groups {
        println!(
            "{:<28} {:>4} {:<7} {:>8.3} ± {:<5.3} {:>9.0}x {:>9.0}x {:>6.2} {:>9.4} {:>10.3} {:>10.3}",
            g.name,
            g.h,
            g.split,
            g.r2_mean,
            g.r2_sd,
            g.reduction,
            g.reduction_steady,
            g.flush_share,
            g.loss,
            g.loss_over_mean,
            g.released_over_mean
        );
    }
    println!(
        "random encoder R2 {:.3}; central {:.3}; default variant worst {:.3} (gap {:+.3} worst \
         over all); default sends {:.0}x fewer bytes than DDP fp32 at its worst H ({:.0}x in its \
         ordinary rounds; `no flush`: the same without flush rounds, `flush`: the share of the \
         model's travel taken in the last round)",
        report.r2_random,
        report.r2_central,
        report.r2_default,
        report.r2_gap,
        report.reduction,
        report.reduction_steady
    );
    plot::r2_against_bytes(&a.plot, &report)?;
    println!("plot: {}", a.plot.display());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
