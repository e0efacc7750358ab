//! The planner and the surprise detector from the command line, as downstream users run them
//! on a released encoder: collect trajectories, train a world model beside the encoder, plan
//! episodes and get a picture; score a video's surprise and get a plot.

use crate::common::{amity, ok, s, scratch, tiny_checkpoint};

#[test]
fn collect_train_and_plan_from_the_command_line() {
    let dir = scratch("plan");
    let ckpt = tiny_checkpoint(&dir);
    let data = dir.join("data");
    let out = ok(&amity(&[
        "plan",
        "collect",
        "--env",
        "pushblock",
        "--episodes",
        "12",
        "--steps",
        "20",
        "--out",
        s(&data),
    ]));
    assert!(out.contains("12 episodes x 20 actions"), "{out}");
    let out = ok(&amity(&[
        "plan",
        "train",
        "--data",
        s(&data),
        "--ckpt",
        s(&ckpt),
        "--steps",
        "20",
    ]));
    assert!(out.contains("2-step rollout error"), "{out}");
    // Pushes in the scripted episodes: the subgoal proposer is trained with the world model.
    assert!(
        out.contains("learnt subgoals: ") && out.contains("hindsight windows"),
        "{out}"
    );
    assert!(
        out.contains("training the pushblock world model on flex: 12 episodes"),
        "{out}"
    );
    let world = dir.join("train/world-pushblock.safetensors");
    assert!(world.exists(), "saved beside the encoder");
    let png = dir.join("plan.png");
    // One short PushBlock episode with `extra` flags, its strip written to `png`.
    let plan_run = |extra: &[&str]| {
        let mut args = vec!["plan", "run", "--env", "pushblock", "--ckpt", s(&ckpt)];
        args.extend(["--episodes", "1", "--max-steps", "3", "--out", s(&png)]);
        args.extend(extra);
        ok(&amity(&args))
    };
    // PushBlock has an object to move, so it plans on two levels unless told otherwise: the
    // subgoal proposer trained with the world model picks waypoints, the latent planner
    // reaches them; the hand-written contact rule can take its place.
    let out = plan_run(&[]);
    assert!(
        out.contains("episode 0:") && out.contains("ms per action"),
        "{out}"
    );
    assert!(
        out.contains("two levels: the learnt subgoal proposer picks"),
        "{out}"
    );
    let out = plan_run(&["--high-level", "rule"]);
    assert!(out.contains("two levels: the contact rule picks"), "{out}");
    assert!(image::open(&png).is_ok(), "a PNG strip of the rollout");
    // One level plans with the environment's measured read-out weights, as the bench does.
    let out = plan_run(&["--levels", "1"]);
    assert!(
        out.contains("read-out terms (position 0, object 2, arena 1)"),
        "{out}"
    );
    // `plan run` with `args` fails, saying `why`.
    let refused = |args: &[&str], why: &str| {
        let mut all = vec!["plan", "run", "--ckpt", s(&ckpt)];
        all.extend(args);
        let err = amity(&all);
        let stderr = String::from_utf8_lossy(&err.stderr);
        assert!(!err.status.success() && stderr.contains(why), "{stderr}");
    };
    // Weight flags set the one-level energy: with two levels they are refused, not ignored.
    refused(
        &["--env", "pushblock", "--object-weight", "1"],
        "pass --levels 1",
    );
    // PointMaze has no contact rule: two levels are refused before anything is loaded.
    refused(
        &["--env", "pointmaze", "--levels", "2"],
        "--levels 2 needs an environment",
    );
    // A world model for another encoder shape is refused with a clear message.
    refused(
        &["--env", "pushblock", "--world", s(&ckpt)],
        "loading the world model",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn surprise_scores_every_window_and_plots_them() {
    let dir = scratch("surprise");
    let ckpt = tiny_checkpoint(&dir);
    ok(&amity(&[
        "corpus",
        "synth",
        "--out",
        s(&dir.join("videos")),
        "--videos",
        "1",
        "--frames",
        "24",
        "--seed",
        "4",
        "--violations",
    ]));
    let video = std::fs::read_dir(dir.join("videos"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "mp4"))
        .expect("a synthetic video");
    let plot = dir.join("s.png");
    let out = ok(&amity(&[
        "surprise",
        s(&video),
        "--ckpt",
        s(&ckpt),
        "--plot",
        s(&plot),
    ]));
    // 24 frames, windows of 8 frames one frame apart: 17 windows.
    let windows = out
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<usize>().is_ok())
        })
        .count();
    assert_eq!(windows, 17, "{out}");
    assert!(out.contains("peak surprise"), "{out}");
    // Every window's persistence baseline beside its energy, and the verdict.
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with("0 "))
        .expect("window 0");
    // index, time, energy, persistence (and "<- spike" when it is one)
    assert!(matches!(row.split_whitespace().count(), 4 | 6), "{row}");
    assert!(out.contains("persistence baseline"), "{out}");
    assert!(image::open(&plot).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_surprise_bench_scores_the_predictor_beside_its_baselines() {
    let dir = scratch("surprise-bench");
    let ckpt = tiny_checkpoint(&dir);
    let out = ok(&amity(&[
        "bench",
        "surprise",
        "--ckpt",
        s(&ckpt),
        "--pairs",
        "6",
        "--quadruplets",
        "5",
        "--validation",
        "5",
        "--frames",
        "16",
    ]));
    let last = out.lines().last().expect("output");
    let json: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    assert_eq!(json["bench"], "surprise", "{last}");
    // A backend this build lacks is refused before any work, naming the ones it has.
    let err = amity(&["bench", "surprise", "--backend", "tpu", "--pairs", "1"]);
    assert!(!err.status.success());
    let msg = String::from_utf8_lossy(&err.stderr);
    assert!(
        msg.contains("unknown backend `tpu`") && msg.contains("flex"),
        "{msg}"
    );
    // The headline keys: the counterbalanced set (one quadruplet of each of the five kinds,
    // so every accuracy is 0, 0.5 or 1), and the paired figure kept beside it.
    let in_unit = |v: &serde_json::Value| v.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x));
    assert!(in_unit(&json["relative_accuracy"]), "{last}");
    assert!(in_unit(&json["auroc"]), "{last}");
    assert!(in_unit(&json["paired_accuracy"]), "{last}");
    let kinds = json["per_kind_relative"].as_object().expect("per kind");
    assert_eq!(kinds.len(), 5, "{last}");
    for kind in ["permanence", "solidity", "continuity", "shape", "colour"] {
        let acc = kinds[kind].as_f64().expect("an accuracy");
        assert!([0.0, 0.5, 1.0].contains(&acc), "{last}");
    }
    assert!(
        json["scoring"]
            .as_str()
            .is_some_and(|s| s.contains("windows"))
    );
    for scores in [
        &json["paired"],
        &json["random_init"]["paired"],
        &json["persistence"]["paired"],
    ] {
        let acc = scores["paired_accuracy"]
            .as_f64()
            .expect("a paired accuracy");
        assert!((0.0..=1.0).contains(&acc), "{last}");
        assert!(scores["auroc"].as_f64().is_some(), "{last}");
        let energy = scores["possible_energy"].as_f64().expect("an energy");
        assert!(energy.is_finite() && energy > 0.0, "{last}");
        let ties = scores["ties"].as_f64().expect("a share of ties");
        assert!((0.0..=1.0).contains(&ties), "{last}");
    }
    for baseline in [&json["random_init"], &json["persistence"]] {
        assert!(
            in_unit(&baseline["counterbalanced"]["relative_accuracy"]),
            "{last}"
        );
    }
    // One row per violation kind of the pairs, the three forecasters side by side; one row
    // per scoring (16) with its validation and test figures, besides the two tables' headings
    // and the JSON line naming theirs.
    assert_eq!(
        json["paired_per_kind"].as_array().map(Vec::len),
        Some(6),
        "{last}"
    );
    assert!(out.contains("persistence"), "{out}");
    assert_eq!(out.matches(" over windows").count(), 16 + 3, "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}
