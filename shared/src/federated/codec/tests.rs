use super::*;
use crate::rng::Rng;
use proptest::prelude::*;

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal() as f32 * 0.01).collect()
}

fn all_specs() -> Vec<CodecSpec> {
    [
        "fp32",
        "fp16",
        "bf16",
        "int8",
        "int8/64",
        "topk0.01+fp32",
        "topk0.1+int8",
        "topk0.05+bf16",
        "int2/16",
        "topk0.1/64+int8",
        "sparseloco",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

#[test]
fn names_round_trip_and_bad_names_are_explained() {
    for spec in all_specs() {
        assert_eq!(spec.to_string().parse::<CodecSpec>().unwrap(), spec);
    }
    for bad in [
        "",
        "int4",
        "topk+int8",
        "topk2+int8",
        "int8/0",
        "topk0+fp16",
        "int2/0",
        "topk0.1/0+int8",
        "topk0.1/70000+int8",
        "topk0.1/x+int8",
    ] {
        let err = bad.parse::<CodecSpec>().unwrap_err().to_string();
        assert!(err.contains("topk0.01+int8"), "{err}");
    }
}

#[test]
fn fp32_is_exact_and_half_floats_are_close() {
    let v = gaussian(1000, 1);
    assert_eq!(decode(&encode(&CodecSpec::FP32, &v), 1000).unwrap(), v);
    for (name, rel) in [("fp16", 1e-3), ("bf16", 8e-3)] {
        let spec: CodecSpec = name.parse().unwrap();
        let bytes = encode(&spec, &v);
        assert_eq!(bytes.len(), HEADER + 2000);
        for (a, b) in v.iter().zip(decode(&bytes, 1000).unwrap()) {
            assert!((a - b).abs() <= rel * a.abs() + 1e-7, "{name}: {a} vs {b}");
        }
    }
}

#[test]
fn int8_error_is_within_half_a_step_of_each_blocks_scale() {
    let mut v = gaussian(1000, 2);
    v[10] = 0.5; // one outlier: only its block's resolution suffers
    let spec: CodecSpec = "int8/100".parse().unwrap();
    let out = decode(&encode(&spec, &v), 1000).unwrap();
    for (block, (a, b)) in v.chunks(100).zip(out.chunks(100)).enumerate() {
        let step = a.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= step * 0.5 + 1e-9,
                "block {block}: {x} vs {y}"
            );
        }
        if block > 0 {
            assert!(step < 0.001, "outlier leaked into block {block}");
        }
    }
}

#[test]
fn chunked_top_k_keeps_the_largest_of_every_chunk_in_two_bits() {
    let mut v = gaussian(10_000, 4);
    // One chunk of tiny values: global top-k would skip it, chunked top-k does not.
    for x in &mut v[4096..8192] {
        *x *= 1e-3;
    }
    let spec: CodecSpec = "sparseloco".parse().unwrap();
    assert_eq!(spec, CodecSpec::SPARSELOCO);
    assert_eq!(spec.to_string(), "sparseloco");
    let bytes = encode(&spec, &v);
    let out = decode(&bytes, v.len()).unwrap();
    for (n, (a, b)) in v.chunks(4096).zip(out.chunks(4096)).enumerate() {
        let kept: Vec<usize> = (0..a.len()).filter(|&i| b[i] != 0.0).collect();
        assert_eq!(kept.len(), spec.kept(a.len()), "chunk {n}");
        let smallest_kept = kept.iter().map(|&i| a[i].abs()).fold(f32::MAX, f32::min);
        let largest_dropped = (0..a.len())
            .filter(|i| b[*i] == 0.0)
            .map(|i| a[i].abs())
            .fold(0.0, f32::max);
        assert!(smallest_kept >= largest_dropped, "chunk {n}");
        // Two bits: sign right, within a third of the block's largest.
        let s = kept.iter().map(|&i| a[i].abs()).fold(0.0f32, f32::max);
        for &i in &kept {
            assert_eq!(a[i].signum(), b[i].signum());
            assert!(
                (a[i] - b[i]).abs() <= s / 3.0 * 1.0001,
                "{} vs {}",
                a[i],
                b[i]
            );
        }
    }
    // 64 + 64 + 29 kept (1/64 of 4096, 4096, 1808, rounded up): u16 counts and offsets,
    // one scale per 64 values, 2-bit values.
    let k = 64 + 64 + 29;
    assert_eq!(spec.kept(1808), 29);
    assert_eq!(
        bytes.len(),
        HEADER + 4 + 3 * 2 + k * 2 + 3 * 4 + k.div_ceil(4)
    );
    // A flush of a sparseloco run goes out as dense int8.
    assert_eq!(spec.dense(), "int8".parse().unwrap());
}

#[test]
fn chunked_indices_are_validated() {
    let v = gaussian(300, 5);
    let spec: CodecSpec = "topk0.1/100+fp32".parse().unwrap();
    let good = encode(&spec, &v);
    assert!(decode(&good, 300).is_ok());
    // Layout: header, chunk size, then chunk 0's count and offsets.
    let count0 = HEADER + 4;
    let off0 = count0 + 2;
    let mut cases = Vec::new();
    let mut b = good.clone();
    b[HEADER..HEADER + 4].copy_from_slice(&0u32.to_le_bytes());
    cases.push(("chunk size 0", b));
    let mut b = good.clone();
    b[count0..count0 + 2].copy_from_slice(&101u16.to_le_bytes());
    cases.push(("count past the chunk", b));
    let mut b = good.clone();
    b[off0..off0 + 2].copy_from_slice(&200u16.to_le_bytes());
    cases.push(("offset past the chunk", b));
    let mut b = good.clone();
    let second = [b[off0 + 2], b[off0 + 3]];
    b[off0..off0 + 2].copy_from_slice(&second);
    cases.push(("repeated offset", b));
    for (what, bytes) in cases {
        assert!(decode(&bytes, 300).is_err(), "{what} accepted");
    }
}

#[test]
fn top_k_keeps_exactly_k_of_the_largest() {
    let v = gaussian(10_000, 3);
    let spec: CodecSpec = "topk0.01+fp32".parse().unwrap();
    let out = decode(&encode(&spec, &v), v.len()).unwrap();
    let kept: Vec<usize> = (0..v.len()).filter(|&i| out[i] != 0.0).collect();
    assert_eq!(kept.len(), 100);
    let smallest_kept = kept.iter().map(|&i| v[i].abs()).fold(f32::MAX, f32::min);
    let largest_dropped = (0..v.len())
        .filter(|i| out[*i] == 0.0)
        .map(|i| v[i].abs())
        .fold(0.0, f32::max);
    assert!(smallest_kept >= largest_dropped);
    for &i in &kept {
        assert_eq!(out[i], v[i]);
    }
    // Ties (all equal) still keep exactly k.
    assert_eq!(top_k_indices(&[1.0; 50], 7).len(), 7);
}

#[test]
fn error_feedback_makes_the_sent_sum_track_the_true_sum() {
    let spec: CodecSpec = "topk0.01+int8".parse().unwrap();
    let mut ef = ErrorFeedback::new();
    let n = 2000;
    let mut true_sum = vec![0.0f64; n];
    let mut sent_sum = vec![0.0f64; n];
    let mut gaps = Vec::new();
    for round in 0..400u64 {
        // A consistent drift plus noise, as pseudo-gradients are.
        let noise = gaussian(n, 100 + round);
        let update: Vec<f32> = noise
            .iter()
            .enumerate()
            .map(|(i, z)| z + 0.001 * ((i % 7) as f32 - 3.0))
            .collect();
        let (_, sent) = ef.encode(&spec, update.clone());
        for i in 0..n {
            true_sum[i] += update[i] as f64;
            sent_sum[i] += sent[i] as f64;
        }
        let gap: f64 = true_sum
            .iter()
            .zip(&sent_sum)
            .map(|(t, s)| (t - s).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = true_sum.iter().map(|t| t * t).sum::<f64>().sqrt();
        gaps.push(gap / norm);
        // The gap is exactly the residual: nothing is lost, only delayed.
        let r: f64 = ef
            .residual()
            .iter()
            .map(|r| (*r as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((r - gap).abs() <= 1e-3 * norm.max(1.0), "{r} vs {gap}");
    }
    // Relative gap shrinks as the sums grow (the residual stays bounded).
    assert!(gaps[399] < 0.5 * gaps[20], "{} vs {}", gaps[399], gaps[20]);
    assert!(gaps[399] < 0.15, "{}", gaps[399]);

    // Without feedback, top-k alone loses most of the sum for good.
    let mut lost_sum = vec![0.0f64; n];
    for round in 0..50u64 {
        let u = gaussian(n, 100 + round);
        let sent = decode(&encode(&spec, &u), n).unwrap();
        for i in 0..n {
            lost_sum[i] += (u[i] - sent[i]) as f64;
        }
    }
    assert!(lost_sum.iter().map(|x| x * x).sum::<f64>() > 0.0);
}

#[test]
fn a_refused_encode_leaves_the_residual_as_it_was() {
    let spec: CodecSpec = "topk0.05+int8".parse().unwrap();
    let parts = [600, 400];
    let mut fb = ErrorFeedback::new();
    fb.encode_parts(&spec, gaussian(1000, 1), &parts);
    let before = fb.residual().to_vec();
    let next = gaussian(1000, 2);
    let refused = fb.encode_parts_if(&spec, next.clone(), &parts, |_| Err("step dropped"));
    assert_eq!(refused.unwrap_err(), "step dropped");
    assert_eq!(fb.residual(), &before[..], "nothing moved");
    // Accepted, it is exactly what the unconditional encode gives.
    let mut plain = fb.clone();
    let accepted = fb.encode_parts_if(&spec, next.clone(), &parts, |_| Ok::<(), ()>(()));
    assert_eq!(accepted.unwrap(), plain.encode_parts(&spec, next, &parts));
    assert_eq!(fb, plain);
}

#[test]
fn compressed_sizes_are_what_the_format_says() {
    let v = gaussian(100_000, 4);
    let dense = encode(&CodecSpec::FP32, &v).len();
    let sparse = encode(&"topk0.01+int8".parse().unwrap(), &v).len();
    // 1000 values: about 1-2 bytes of index gap + 1 byte + 4 scale bytes per 256.
    assert!(sparse < 3200, "{sparse}");
    assert!(dense / sparse > 120, "{dense} / {sparse}");
}

#[test]
fn error_feedback_passes_poison_on_without_keeping_it() {
    let mut ef = ErrorFeedback::new();
    let spec: CodecSpec = "topk0.1+int8".parse().unwrap();
    let mut v = gaussian(100, 8);
    v[0] = f32::NAN;
    let (bytes, _) = ef.encode(&spec, v);
    assert!(decode(&bytes, 100).is_err());
    assert!(ef.residual().iter().all(|r| *r == 0.0));
}

#[test]
fn poisoned_updates_stay_poisoned() {
    let mut v = gaussian(1000, 5);
    v[3] = f32::NAN;
    for spec in all_specs() {
        match decode(&encode(&spec, &v), 1000) {
            Ok(out) => assert!(out.iter().any(|x| !x.is_finite()), "{spec} hid a NaN"),
            Err(CodecError::Body(_)) => {} // int8: NaN scale refused at decode
            Err(e) => panic!("{spec}: {e}"),
        }
    }
}

#[test]
fn wrong_lengths_and_headers_are_refused() {
    let v = gaussian(100, 6);
    let bytes = encode(&"topk0.1+int8".parse().unwrap(), &v);
    assert_eq!(
        decode(&bytes, 99).unwrap_err(),
        CodecError::Length { want: 99, got: 100 }
    );
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1], 100),
        Err(CodecError::Body(_))
    ));
    let mut extra = bytes.clone();
    extra.push(0);
    assert!(matches!(decode(&extra, 100), Err(CodecError::Body(_))));
    assert!(matches!(decode(b"nope", 100), Err(CodecError::Header(_))));
}

#[test]
fn parts_are_sparsified_separately() {
    let mut v = gaussian(2000, 9);
    // The second part is 1000x smaller: a joint top-k would never pick it.
    for x in &mut v[1000..] {
        *x *= 1e-3;
    }
    let spec: CodecSpec = "topk0.1+fp32".parse().unwrap();
    let out = decode_parts(&encode_parts(&spec, &v, &[1000, 1000]), &[1000, 1000]).unwrap();
    assert_eq!(out[..1000].iter().filter(|x| **x != 0.0).count(), 100);
    assert_eq!(out[1000..].iter().filter(|x| **x != 0.0).count(), 100);
    let bytes = encode_parts(&spec, &v, &[1000, 1000]);
    assert!(decode_parts(&bytes, &[1000, 999]).is_err());
    assert!(decode_parts(&bytes, &[2000]).is_err());
    assert!(decode_parts(&bytes[..bytes.len() - 3], &[1000, 1000]).is_err());
}

proptest! {
    #[test]
    fn random_bytes_never_panic_as_parts(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_parts(&bytes, &[10, 20]);
    }

    #[test]
    fn every_codec_round_trips_within_its_bound(
        v in prop::collection::vec(-10.0f32..10.0, 1..600),
        which in 0usize..11,
    ) {
        let spec = all_specs()[which];
        let out = decode(&encode(&spec, &v), v.len()).unwrap();
        prop_assert_eq!(out.len(), v.len());
        let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        // Four levels over [-s, s]: at most s/3 off.
        let bound = match spec.values {
            ValueCoding::Int2 { .. } => max / 3.0 * 1.0001,
            _ => max / 100.0,
        };
        for (a, b) in v.iter().zip(&out) {
            if *b != 0.0 || spec.topk.is_none() {
                prop_assert!((a - b).abs() <= bound + 1e-6, "{} {} {}", spec, a, b);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), want in 0usize..64) {
        let _ = decode(&bytes, want);
    }

    #[test]
    fn mutated_updates_never_panic(flip in 0usize..400, bit in 0u8..8, which in 0usize..11) {
        let v = gaussian(300, 7);
        let mut bytes = encode(&all_specs()[which], &v);
        let at = flip % bytes.len();
        bytes[at] ^= 1 << bit;
        let _ = decode(&bytes, 300);
    }
}
