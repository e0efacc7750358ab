//! `amity train` as a user runs it: synthetic data and a checkpoint that loads back (training
//! from a shard store is exercised in `tests/corpus.rs`).

use crate::common::{amity, scratch};

use amity_shared::checkpoint::Checkpoint;

/// `amity train <flags> --out <out>`.
fn train(flags: &[&str], out: &std::path::Path) -> std::process::Output {
    let mut args = vec!["train"];
    args.extend_from_slice(flags);
    args.extend(["--out", out.to_str().unwrap()]);
    amity(&args)
}

#[test]
fn trains_on_synthetic_clips_and_writes_a_loadable_checkpoint() {
    let out = scratch("synth");
    let o = train(&["--steps", "4", "--batch", "4", "--no-probe"], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = Checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ckpt.config.train.steps, 4);
    assert_eq!(ckpt.meta.get("steps").map(String::as_str), Some("4"));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 2);
    // The written config reproduces the run.
    let again = scratch("synth-again");
    let config = out.join("config.toml");
    let o = train(
        &["--config", config.to_str().unwrap(), "--no-probe"],
        &again,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt2 = Checkpoint::load(&again.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ckpt.model, ckpt2.model, "same config, same parameters");
}

#[test]
fn probes_every_n_steps_into_the_metrics_when_asked() {
    let out = scratch("probe-every");
    let flags = [
        "--steps",
        "4",
        "--batch",
        "4",
        "--probe-every",
        "2",
        "--probe-videos",
        "20",
        "10",
    ];
    let o = train(&flags, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let probed: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("probe").is_some())
        .collect();
    let steps: Vec<u64> = probed.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 3], "after steps 2 and 4: {metrics}");
    for r in &probed {
        let v = r["probe"]["velocity_r2"].as_f64().unwrap();
        assert!(v.is_finite() && v <= 1.0, "{r}");
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("probe     trained"));

    let o = train(&["--no-probe", "--probe-every", "2"], &out);
    assert!(!o.status.success(), "--probe-every needs the probes");
    let o = train(&["--probe-videos", "5", "10"], &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--probe-videos takes two counts"),
        "{err}"
    );
}
