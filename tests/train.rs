//! `amity train` as a user runs it: synthetic data or a folder of frame folders, a checkpoint
//! that loads back, and clear errors for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use amity_shared::checkpoint::Checkpoint;
use amity_shared::synth::{SynthConfig, generate};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("amity-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn amity(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amity"))
        .args(args)
        .output()
        .expect("amity runs")
}

fn write_frame_folders(root: &Path, videos: u64, frames: usize) {
    let cfg = SynthConfig::for_size(48, frames);
    for v in 0..videos {
        let dir = root.join(format!("video{v:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        let video = generate(&cfg, v);
        for f in 0..frames {
            let img = image::RgbImage::from_raw(48, 48, video.frame(f).to_vec()).unwrap();
            img.save(dir.join(format!("{f:04}.png"))).unwrap();
        }
    }
}

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

#[test]
fn trains_on_frame_folders_and_names_a_bad_frame() {
    let data = scratch("frames");
    write_frame_folders(&data, 3, 12);
    let out = scratch("frames-out");
    let o = amity(&[
        "train",
        "--store",
        data.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "2",
        "--no-probe",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("data: 15 clips"), "{stderr}"); // 12 frames, 8 per clip: 5 starts each
    std::fs::write(data.join("video01/0005.png"), b"truncated").unwrap();
    let o = amity(&[
        "train",
        "--store",
        data.to_str().unwrap(),
        "--steps",
        "1",
        "--no-probe",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("video01/0005.png") && stderr.contains("cannot decode"),
        "{stderr}"
    );
}
