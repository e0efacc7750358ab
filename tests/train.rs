//! `amity train` as a user runs it: synthetic data and a checkpoint that loads back (training
//! from a shard store is exercised in `tests/corpus.rs`).

use crate::common::{amity, scratch};

use amity_shared::checkpoint::Checkpoint;

#[test]
fn trains_on_synthetic_clips_and_writes_a_loadable_checkpoint() {
    let out = scratch("synth");
    let o = amity(&[
        "train",
        "--steps",
        "4",
        "--batch",
        "4",
        "--no-probe",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = Checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ckpt.config.train.steps, 4);
    assert_eq!(ckpt.meta.get("steps").map(String::as_str), Some("4"));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 2);
    // The written config reproduces the run.
    let again = scratch("synth-again");
    let o = amity(&[
        "train",
        "--config",
        out.join("config.toml").to_str().unwrap(),
        "--no-probe",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt2 = Checkpoint::load(&again.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ckpt.model, ckpt2.model, "same config, same parameters");
}
