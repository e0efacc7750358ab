//! Corpora as a user meets them: `amity corpus synth`, `ingest`, `verify`, then `amity train`
//! on the store; real MP4/WebM files made by the `ffmpeg` tool; damaged inputs and shards.

use crate::common::{amity, ok, s, scratch};

use std::process::Command;

use amity_shared::corpus::manifest::Manifest;
use amity_shared::corpus::video::ffmpeg_version;
use amity_shared::data::synth::{SynthConfig, generate};

/// FFmpeg must be present where the test script installed it; elsewhere its tests say so.
fn have_ffmpeg() -> bool {
    if ffmpeg_version().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("AMITY_REQUIRE_FFMPEG").is_none(),
        "AMITY_REQUIRE_FFMPEG is set but `ffmpeg` does not run (scripts/install-deps installs it)"
    );
    eprintln!("ffmpeg not installed: FFmpeg-path checks not run");
    false
}

#[test]
fn synth_ingest_verify_and_train_from_the_store() {
    let dir = scratch("e2e");
    let (videos, store, store2) = (dir.join("videos"), dir.join("store"), dir.join("store2"));
    ok(&amity(&[
        "corpus",
        "synth",
        "--out",
        s(&videos),
        "--videos",
        "6",
        "--frames",
        "24",
        "--seed",
        "4",
    ]));
    // A second copy of the corpus elsewhere must give the same shards.
    let copy = dir.join("elsewhere/videos");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(&videos).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
    }
    let out = ok(&amity(&[
        "corpus",
        "ingest",
        s(&videos),
        "--store",
        s(&store),
        "--decoder",
        "builtin",
        "--shard-mib",
        "0.25",
    ]));
    // 24 frames at 10 fps, 8-frame clips: 4 clips per video.
    assert!(out.contains("6 videos -> 24 clips"), "{out}");
    let m = Manifest::load(&store).unwrap();
    assert_eq!((m.videos, m.clips), (6, 24));
    assert!(m.labelled);
    assert!(
        m.shards.len() >= 2,
        "quarter-MiB shards: {}",
        m.shards.len()
    );
    ok(&amity(&[
        "corpus",
        "ingest",
        s(&copy),
        "--store",
        s(&store2),
        "--decoder",
        "builtin",
        "--shard-mib",
        "0.25",
        "--threads",
        "1",
    ]));
    assert_eq!(
        std::fs::read(store.join("manifest.json")).unwrap(),
        std::fs::read(store2.join("manifest.json")).unwrap(),
        "same input, same manifest"
    );
    // Re-ingesting into the same store adds nothing.
    let again = ok(&amity(&[
        "corpus",
        "ingest",
        s(&videos),
        "--store",
        s(&store),
        "--decoder",
        "builtin",
        "--shard-mib",
        "0.25",
    ]));
    assert!(again.contains("0 new"), "{again}");
    ok(&amity(&["corpus", "verify", "--store", s(&store)]));

    let train_out = dir.join("run");
    let t = ok(&amity(&[
        "train",
        "--store",
        s(&store),
        "--steps",
        "2",
        "--batch",
        "4",
        "--no-probe",
        "--out",
        s(&train_out),
    ]));
    assert!(t.contains("data: 24 clips"), "{t}");

    // A flipped byte in a shard: verify and train both refuse, naming the shard.
    let shard = &m.shards[0].id;
    let path = store
        .join("blobs")
        .join(&shard.to_hex()[..2])
        .join(shard.to_hex());
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    for args in [
        vec!["corpus", "verify", "--store", s(&store)],
        vec![
            "train",
            "--store",
            s(&store),
            "--steps",
            "1",
            "--no-probe",
            "--out",
            s(&train_out),
        ],
    ] {
        let o = amity(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("corrupt") && err.contains(&shard.to_hex()),
            "{err}"
        );
    }

    // A folder that is not a store gets advice.
    let o = amity(&[
        "train",
        "--store",
        s(&videos),
        "--steps",
        "1",
        "--out",
        s(&train_out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("amity corpus ingest"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_sources_are_skipped_and_reported_never_fatal() {
    let dir = scratch("skips");
    let input = dir.join("input");
    // Two frame folders (one with a broken frame), a broken MP4, a too-short video.
    let cfg = SynthConfig::for_size(48, 12);
    for v in 0..2u64 {
        let folder = input.join(format!("frames{v}"));
        std::fs::create_dir_all(&folder).unwrap();
        let video = generate(&cfg, v);
        for f in 0..12 {
            let img = image::RgbImage::from_raw(48, 48, video.frame(f).to_vec()).unwrap();
            img.save(folder.join(format!("{f:04}.png"))).unwrap();
        }
    }
    std::fs::write(input.join("frames1/0005.png"), b"truncated").unwrap();
    std::fs::write(
        input.join("broken.mp4"),
        b"\0\0\0\x18ftypisom but nothing else",
    )
    .unwrap();
    ok(&amity(&[
        "corpus",
        "synth",
        "--out",
        s(&input.join("short")),
        "--videos",
        "1",
        "--frames",
        "4",
    ]));
    // A hostile MP4 (security review M7): its timing table covers one sample of twelve, which
    // made the mp4 reader panic and took the whole ingest down.
    ok(&amity(&[
        "corpus",
        "synth",
        "--out",
        s(&input.join("hostile")),
        "--videos",
        "1",
        "--frames",
        "12",
    ]));
    let hostile = input.join("hostile/video_00000.mp4");
    let mut bytes = std::fs::read(&hostile).unwrap();
    let at = bytes.windows(4).position(|w| w == b"stts").unwrap();
    assert_eq!(
        &bytes[at + 8..at + 12],
        &1u32.to_be_bytes(),
        "one timing entry"
    );
    bytes[at + 12..at + 16].copy_from_slice(&1u32.to_be_bytes());
    std::fs::write(&hostile, bytes).unwrap();
    // A 2x400 frame: scaling its short side to the model's size would make a huge image.
    let thin = input.join("thin");
    std::fs::create_dir_all(&thin).unwrap();
    for f in 0..12 {
        image::RgbImage::new(2, 400)
            .save(thin.join(format!("{f:04}.png")))
            .unwrap();
    }
    let store = dir.join("store");
    let o = amity(&[
        "corpus",
        "ingest",
        s(&input),
        "--store",
        s(&store),
        "--decoder",
        "builtin",
    ]);
    let text = ok(&o);
    assert!(text.contains("1 videos -> 4 clips"), "{text}"); // 12 frames, 8 per clip, 4 clips
    assert!(text.contains("5 skipped"), "{text}");
    assert!(text.contains("damaged sample tables"), "{text}");
    assert!(text.contains("wider than 8:1"), "{text}");
    for name in [
        "frames1",
        "broken.mp4",
        "short/video_00000.mp4",
        "hostile/video_00000.mp4",
        "thin",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("skipped") && l.contains(name)),
            "{name} not reported: {text}"
        );
    }
    let m = Manifest::load(&store).unwrap();
    assert_eq!(m.skipped.len(), 5);
    assert!(m.skipped.iter().any(|s| s.reason.contains("0005.png")));
    assert!(!m.labelled, "frame folders without labels");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ffmpeg_reads_x264_with_b_frames_and_webm_the_builtin_decoder_says_why_not() {
    if !have_ffmpeg() {
        return;
    }
    let dir = scratch("ffmpeg");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let make = |args: &[&str]| {
        let o = Command::new("ffmpeg")
            .args([
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // Ordinary x264 (high profile, B-frames) at 25 fps, 320x240; VP9 in WebM.
    make(&[
        "-i",
        "testsrc2=size=320x240:rate=25:duration=3",
        "-c:v",
        "libx264",
        "-bf",
        "3",
        "-pix_fmt",
        "yuv420p",
        s(&input.join("x264.mp4")),
    ]);
    make(&[
        "-i",
        "testsrc2=size=320x240:rate=25:duration=3",
        "-c:v",
        "libvpx-vp9",
        "-b:v",
        "200k",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        s(&input.join("vp9.webm")),
    ]);
    let store = dir.join("store");
    let text = ok(&amity(&[
        "corpus",
        "ingest",
        s(&input),
        "--store",
        s(&store),
        "--decoder",
        "ffmpeg",
    ]));
    // 3 s resampled to 10 fps = 30 frames: 4 clips each.
    assert!(text.contains("2 videos -> 8 clips"), "{text}");

    // Nothing usable: the ingest fails, but the manifest records why for each file.
    let store_b = dir.join("store-builtin");
    let o = amity(&[
        "corpus",
        "ingest",
        s(&input),
        "--store",
        s(&store_b),
        "--decoder",
        "builtin",
    ]);
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && text.contains("no clip could be cut"),
        "{text}"
    );
    let m = Manifest::load(&store_b).unwrap();
    for s in &m.skipped {
        assert!(
            s.reason.contains("install FFmpeg"),
            "{}: {}",
            s.path,
            s.reason
        );
    }
    assert!(
        m.skipped.iter().any(|s| s.reason.contains("high")),
        "{:?}",
        m.skipped
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
