//! `amity bench probe`: how much of a checkpoint's probe scores is the encoder's and how much
//! the readout's.
//!
//! Every learning figure in this project is a ridge probe on the target encoder's features
//! averaged over space within each time step ([`Readout::SpaceMean`]), read against the same
//! probe on a random encoder. This bench fits the same probes through a readout that keeps where
//! in the frame a feature fired ([`Readout::Quadrants`]) as well, for the checkpoint and for the
//! random initialisation of its config, side by side: a random encoder that scores high through
//! the quadrants already holds the information, and the standard probe's gap then measures
//! whether training wrote it into the channels, not whether the encoder learnt it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::Args;

use amity_shared::checkpoint::Checkpoint;
use amity_shared::eval::{ProbeReport, ProbeSet, Readout, probe_report_through};
use amity_shared::train::Trainer;

/// `amity bench probe`.
#[derive(Debug, Args)]
pub struct ProbeBenchArgs {
    /// The checkpoint to probe (`amity train`'s, or a coordinator's
    /// `checkpoints/latest.safetensors`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Probe videos: fitted, held out (as the learning test's probe).
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [1000, 500])]
    pub probe_videos: Vec<usize>,
}

/// One readout's scores for the checkpoint and for a random encoder.
#[derive(Debug, serde::Serialize)]
struct ReadoutScores {
    readout: &'static str,
    trained: ProbeReport,
    random: ProbeReport,
}

/// `amity bench probe`: a table per readout, then the JSON line.
pub fn run(a: ProbeBenchArgs) -> Result<()> {
    let (n_train, n_test) = crate::train_cmd::probe_counts(&a.probe_videos)?;
    let began = Instant::now();
    let ckpt = Checkpoint::load(&a.checkpoint)
        .with_context(|| format!("reading the checkpoint {}", a.checkpoint.display()))?;
    let device = Device::flex();
    let trained = Trainer::from_checkpoint(&ckpt, &device)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    // The run's own random initialisation (its config's seed): what the demo and the learning
    // test read their probes against.
    let random = Trainer::new(ckpt.config.clone(), &device);
    let set = ProbeSet::for_model(&ckpt.config.model, n_train, n_test);
    println!(
        "probe: {} ({} preset), {n_train} videos fitted, {n_test} held out; readouts {}",
        a.checkpoint.display(),
        ckpt.config.preset,
        Readout::ALL.map(Readout::name).join(", ")
    );
    let mut scores = Vec::new();
    for readout in Readout::ALL {
        let report = |name: &str, t: &Trainer| {
            let r = probe_report_through(t, &set, readout);
            println!(
                "  [{:>4.0} s] {:<10} through {:<10} velocity R2 {:.3}, position R2 {:.3}",
                began.elapsed().as_secs_f64(),
                name,
                readout.name(),
                r.velocity_r2,
                r.position_r2
            );
            r
        };
        let t = report("trained", &trained);
        let r = report("random", &random);
        scores.push(ReadoutScores {
            readout: readout.name(),
            trained: t,
            random: r,
        });
    }
    print_table(&scores);
    let gap = |i: usize| scores[i].trained.velocity_r2 - scores[i].random.velocity_r2;
    println!(
        "{}",
        serde_json::json!({
            "bench": "probe",
            "checkpoint": a.checkpoint,
            "velocity_gap_space_mean": gap(0),
            "velocity_gap_quadrants": gap(1),
            "random_velocity_quadrants": scores[1].random.velocity_r2,
            "readouts": scores,
        })
    );
    Ok(())
}

/// Trained against random, one row per readout and probe.
fn print_table(scores: &[ReadoutScores]) {
    println!(
        "\n{:<11} {:<16} {:>8} {:>8} {:>8}",
        "readout", "probe", "trained", "random", "gap"
    );
    for s in scores {
        let rows = [
            ("velocity R2", s.trained.velocity_r2, s.random.velocity_r2),
            ("position R2", s.trained.position_r2, s.random.position_r2),
            ("shape accuracy", s.trained.shape_acc, s.random.shape_acc),
            ("colour accuracy", s.trained.colour_acc, s.random.colour_acc),
        ];
        for (name, t, r) in rows {
            println!(
                "{:<11} {:<16} {:>8.3} {:>8.3} {:>+8.3}",
                s.readout,
                name,
                t,
                r,
                t - r
            );
        }
    }
}
