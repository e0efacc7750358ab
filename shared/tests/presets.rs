//! Presets too large to train here still build and run a forward pass (batch 1): encoder
//! features and a predictor pass with half the tokens as context.

use amity_shared::config::Config;
use amity_shared::data::ClipBatch;
use amity_shared::data::synth::{SynthConfig, generate};
use amity_shared::train::Trainer;
use burn::tensor::Device;

fn forward_once(preset: &str) {
    let config = Config::preset(preset).unwrap();
    let m = &config.model;
    let trainer = Trainer::new(config.clone(), &Device::flex());
    let video = generate(&SynthConfig::for_size(m.image_size, m.frames), 1);
    let batch = ClipBatch::from_clips([video.pixels.as_slice()], m);
    let features = trainer.pooled_features(&batch);
    assert_eq!(features.len(), m.width);
    assert!(features.iter().all(|v| v.is_finite()));
    let n = m.tokens() as u32;
    let context: Vec<u32> = (0..n / 2).collect();
    let target: Vec<u32> = (n / 2..n).collect();
    let energy = trainer.energy(&batch, &context, &target);
    assert_eq!(energy.len(), 1);
    assert!(energy[0].is_finite() && energy[0] > 0.0, "{energy:?}");
}

#[test]
fn small_preset_runs_a_forward_pass() {
    forward_once("small");
}

#[test]
fn vit_l_preset_runs_a_forward_pass() {
    forward_once("vit-l");
}
