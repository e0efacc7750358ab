use super::*;
use amity_shared::stats::median;

fn cand(from: &str, values: Vec<f32>, weight: f64) -> Candidate {
    Candidate::new(from, values, weight)
}

#[test]
fn each_screen_s_reason_has_its_kind() {
    let cfg = AggregationConfig::default();
    let small = |k: f32| vec![0.01 + k, 0.02, -0.01, 0.005];
    let cands = vec![
        cand("a", small(0.0), 1.0),
        cand("b", small(0.001), 1.0),
        cand("c", small(-0.001), 1.0),
        cand("nan", vec![f32::NAN, 0.0, 0.0, 0.0], 1.0),
        cand("big", vec![10.0; 4], 1.0),
        cand("long", small(0.0).iter().map(|v| v * 50.0).collect(), 1.0),
    ];
    let (_, out, _) = screen(cands, &[], &[], &cfg);
    let kinds: Vec<(&str, &str)> = out
        .iter()
        .map(|(c, why)| (c.from.as_str(), rejection_kind(why)))
        .collect();
    assert_eq!(
        kinds,
        [("nan", "non_finite"), ("big", "rms_cap"), ("long", "norm")]
    );
    assert_eq!(
        rejection_kind("points away from the others"),
        "disagreement"
    );
    assert_eq!(rejection_kind("something new"), "other");
}

#[test]
fn updates_that_point_away_from_the_others_are_rejected_one_at_a_time() {
    let cfg = AggregationConfig::default();
    // Small values: the RMS cap (1.0) is not what this is about.
    let honest = |k: f32| vec![0.1 + k, 0.2 - k, -0.1, 0.05 + k];
    let flipped: Vec<f32> = honest(0.0).iter().map(|v| -v).collect();
    let noise = vec![0.2, -0.12, 0.0, 0.0]; // slightly against the honest direction
    // Two honest and a flipped one: the flipped one goes, although it drags the honest
    // ones' agreement with "the others" below zero too.
    let cands = vec![
        cand("a", honest(0.01), 1.0),
        cand("x", flipped.clone(), 1.0),
        cand("b", honest(-0.01), 1.0),
    ];
    let (ok, out, _) = screen(cands, &[], &[], &cfg);
    let names: Vec<&str> = ok.iter().map(|c| c.from.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(out[0].1.contains("points away"), "{}", out[0].1);
    // Three honest, a flipped and a noise update: both hostile ones go.
    let cands = vec![
        cand("a", honest(0.01), 1.0),
        cand("b", honest(-0.01), 1.0),
        cand("c", honest(0.02), 1.0),
        cand("x", flipped.clone(), 1.0),
        cand("n", noise, 1.0),
    ];
    let (ok, out, _) = screen(cands, &[], &[], &cfg);
    assert_eq!(ok.len(), 3);
    let mut gone: Vec<&str> = out.iter().map(|(c, _)| c.from.as_str()).collect();
    gone.sort();
    assert_eq!(gone, ["n", "x"]);
    // With two updates there is no majority to agree with: nothing is judged.
    let cands = vec![cand("a", honest(0.0), 1.0), cand("x", flipped, 1.0)];
    assert_eq!(screen(cands, &[], &[], &cfg).0.len(), 2);
    // Off.
    let off = AggregationConfig {
        min_agreement: -1.0,
        ..cfg
    };
    let cands = vec![
        cand("a", honest(0.01), 1.0),
        cand("x", honest(0.0).iter().map(|v| -v).collect(), 1.0),
        cand("b", honest(-0.01), 1.0),
    ];
    assert_eq!(screen(cands, &[], &[], &off).0.len(), 3);
}

#[test]
fn alignment_sees_a_flipped_update_against_history_and_peers() {
    let honest = |k: f32| vec![1.0 + k, 2.0, -1.0, 0.5 - k];
    let flipped: Vec<f32> = honest(0.0).iter().map(|v| -v).collect();
    let cands = vec![
        cand("a", honest(0.1), 1.0),
        cand("b", honest(-0.1), 1.0),
        cand("x", flipped, 1.0),
    ];
    let cfg = AggregationConfig {
        max_rms: f64::INFINITY,
        ..Default::default()
    };
    let history = honest(0.0);
    let (_, _, al) = screen(cands.clone(), &[], &history[..3], &cfg);
    assert!(al[0].with_history.unwrap() > 0.9 && al[1].with_history.unwrap() > 0.9);
    assert!(al[2].with_history.unwrap() < -0.9);
    assert!(al[2].with_others.unwrap() < 0.0);
    // Nothing to compare with: no momentum yet, a lone update.
    let (_, _, lone) = screen(cands[..1].to_vec(), &[], &[], &cfg);
    assert_eq!((lone[0].with_history, lone[0].with_others), (None, None));
}

/// A handle that reads a sparse update back from "disk" (here bytes), as the coordinator's
/// store does, and fails once told to.
#[derive(Debug)]
struct FromBytes {
    bytes: Vec<u8>,
    parts: Vec<usize>,
    broken: std::sync::atomic::AtomicBool,
}

impl ReadUpdate for FromBytes {
    fn len(&self) -> usize {
        self.parts.iter().sum()
    }
    fn read(&self) -> Result<Entries, String> {
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the blob is gone".into());
        }
        amity_shared::federated::codec::decode_parts_entries(&self.bytes, &self.parts)
            .map_err(|e| e.to_string())
    }
}

#[test]
fn stored_sparse_updates_aggregate_as_their_dense_decoding_does() {
    use amity_shared::federated::codec::{CodecSpec, decode_parts, encode_parts};
    use std::sync::Arc;
    let parts = vec![6000, 3000];
    let spec = CodecSpec::SPARSELOCO;
    let mut stored = Vec::new();
    let mut dense = Vec::new();
    for w in 0..5u32 {
        let v: Vec<f32> = (0..9000u32)
            .map(|i| ((i * 37 + w * 11) % 101) as f32 * 1e-4 - 2e-3 + 1e-3)
            .collect();
        let bytes = encode_parts(&spec, &v, &parts);
        let name = format!("w{w}");
        dense.push(cand(
            &name,
            decode_parts(&bytes, &parts).unwrap(),
            1.0 + w as f64,
        ));
        let reader = FromBytes {
            bytes,
            parts: parts.clone(),
            broken: false.into(),
        };
        stored.push(Candidate::new(
            name,
            UpdateValues::Stored(Arc::new(reader)),
            1.0 + w as f64,
        ));
    }
    let cfg = AggregationConfig::default();
    let (a, ra, la) = screen(dense, &[], &[], &cfg);
    let (b, rb, lb) = screen(stored.clone(), &[], &[], &cfg);
    assert_eq!((ra.len(), rb.len()), (0, 0));
    assert_eq!(la, lb);
    let norms = |c: &[Candidate]| c.iter().map(|c| (c.norm, c.scale)).collect::<Vec<_>>();
    assert_eq!(norms(&a), norms(&b));
    assert_eq!(combine(&a, &cfg).unwrap(), combine(&b, &cfg).unwrap());
    // An update that can no longer be read is rejected with the reason, not a panic.
    let broken = FromBytes {
        bytes: Vec::new(),
        parts: parts.clone(),
        broken: true.into(),
    };
    stored[2] = Candidate::new("w2", UpdateValues::Stored(Arc::new(broken)), 3.0);
    let (ok, out, _) = screen(stored, &[], &[], &cfg);
    assert_eq!(ok.len(), 4);
    assert_eq!(out[0].0.from, "w2");
    assert!(
        out[0]
            .1
            .contains("could not be read back: the blob is gone"),
        "{}",
        out[0].1
    );
}

#[test]
fn weighted_mean_weights_by_samples() {
    let a = cand("a", vec![1.0, 0.0], 3.0);
    let b = cand("b", vec![0.0, 1.0], 1.0);
    let m = combine(&[a, b], &AggregationConfig::default()).unwrap();
    assert_eq!(m, vec![0.75, 0.25]);
    assert!(combine(&[], &AggregationConfig::default()).is_err());
}

#[test]
fn screening_rejects_poison_and_outliers_and_names_why() {
    // The relative screen alone (these values are far above the absolute cap).
    let cfg = AggregationConfig {
        max_rms: f64::INFINITY,
        ..Default::default()
    };
    let good = |n: &str, s: f32| cand(n, vec![s, -s, s], 1.0);
    let nan = cand("nan", vec![f32::NAN, 0.0, 0.0], 1.0);
    let huge = cand("huge", vec![100.0, -100.0, 100.0], 1.0);
    let (ok, bad, _) = screen(
        vec![good("a", 1.0), good("b", 1.2), nan, huge],
        &[],
        &[],
        &cfg,
    );
    assert_eq!(
        ok.iter().map(|c| c.from.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(bad.len(), 2);
    assert!(bad[0].1.contains("NaN"));
    assert!(bad[1].1.contains("reference"), "{}", bad[1].1);
    // With two updates only, history keeps the reference honest.
    let (ok, bad, _) = screen(
        vec![good("a", 1.0), cand("huge", vec![100.0, 100.0, 100.0], 1.0)],
        &[1.7, 1.7, 1.7],
        &[],
        &cfg,
    );
    assert_eq!((ok.len(), bad.len()), (1, 1));
}

#[test]
fn clipping_caps_norms_and_trimmed_mean_ignores_extremes() {
    let cfg = AggregationConfig {
        clip_ratio: 1.0,
        rule: AggregationRule::TrimmedMean,
        trim: 0.25,
        max_rms: f64::INFINITY,
        ..Default::default()
    };
    let cands = vec![
        cand("a", vec![1.0], 1.0),
        cand("b", vec![2.0], 1.0),
        cand("c", vec![3.0], 1.0),
        cand("d", vec![9.0], 1.0),
    ];
    let (ok, bad, _) = screen(cands, &[], &[], &cfg);
    assert!(bad.is_empty());
    // Lower median norm 2: c and d clipped to 2.
    assert_eq!(
        ok.iter().map(|c| c.norm).collect::<Vec<_>>(),
        [1.0, 2.0, 2.0, 2.0]
    );
    assert_eq!(
        ok.iter().map(|c| c.scale).collect::<Vec<_>>(),
        [1.0, 1.0, 2.0 / 3.0, 2.0 / 9.0]
    );
    // Trim one from each end of [1, 2, 2, 2]: mean of [2, 2].
    assert_eq!(combine(&ok, &cfg).unwrap(), vec![2.0]);
}

#[test]
fn outer_step_is_fedavg_without_momentum_and_nesterov_with_it() {
    let mut plain = OuterOptimizer::new(OuterConfig {
        lr: 1.0,
        momentum: 0.0,
        nesterov: true,
    });
    assert_eq!(plain.step(&[0.5, -1.0]), vec![-0.5, 1.0]);
    let mut n = OuterOptimizer::new(OuterConfig {
        momentum: 0.9,
        ..OuterConfig::default()
    });
    // DiLoCo's: buf = g; step = -0.7 * (g + 0.9 g) = -1.33 g
    let s = n.step(&[1.0]);
    assert!((s[0] + 1.33).abs() < 1e-6, "{s:?}");
    // buf = 0.9 + 1 = 1.9; step = -0.7 * (1 + 0.9 * 1.9) = -1.897
    let s = n.step(&[1.0]);
    assert!((s[0] + 1.897).abs() < 1e-5, "{s:?}");
    assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
}

#[test]
fn one_or_two_workers_cannot_pass_huge_values_or_buy_weight() {
    let cfg = AggregationConfig::default();
    let honest = cand("honest", vec![0.01, -0.02, 0.01, 0.0], 64.0);
    // Finite but near f32::MAX: the absolute cap rejects it even alone.
    let huge = cand("huge", vec![3e38, -3e38, 3e38, 3e38], 64.0);
    let (ok, bad, _) = screen(vec![huge.clone()], &[], &[], &cfg);
    assert!(ok.is_empty());
    assert!(bad[0].1.contains("root-mean-square"), "{}", bad[0].1);
    let (ok, bad, _) = screen(vec![honest.clone(), huge], &[], &[], &cfg);
    assert_eq!(ok[0].from, "honest");
    assert_eq!(bad.len(), 1);
    // Scaled 50x, under the absolute cap: the lower median of two is the honest norm.
    let scaled = cand(
        "scaled",
        honest
            .values
            .to_dense()
            .unwrap()
            .iter()
            .map(|v| v * 50.0)
            .collect(),
        64.0,
    );
    let (ok, bad, _) = screen(vec![honest.clone(), scaled], &[], &[], &cfg);
    assert_eq!((ok.len(), bad.len()), (1, 1));
    assert_eq!(bad[0].0.from, "scaled");
    // Claiming u64::MAX samples buys at most `weight_cap` times the honest weight.
    let greedy = cand("greedy", vec![0.0, 0.0, 0.0, 0.02], u64::MAX as f64);
    let (ok, bad, _) = screen(vec![honest, greedy], &[], &[], &cfg);
    assert!(bad.is_empty());
    assert_eq!(ok[1].weight, 4.0 * 64.0);
    let mean = combine(&ok, &cfg).unwrap();
    assert!((mean[3] - 0.016).abs() < 1e-6, "{mean:?}");
}

#[test]
fn a_proposed_step_leaves_the_optimiser_unchanged() {
    let mut o = OuterOptimizer::new(OuterConfig::default());
    let (step, buf) = o.propose(&[1.0, 2.0]);
    assert!(o.momentum.is_empty());
    assert_eq!(o.step(&[1.0, 2.0]), step);
    assert_eq!(o.momentum, buf);
}
