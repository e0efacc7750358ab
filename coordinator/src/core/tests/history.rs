//! The round history: what a summary reports, and old summaries thinning to counts so that
//! snapshots stay O(rounds).

use super::*;

/// After [`DETAIL_ROUNDS`] rounds a summary keeps counts instead of per-worker lists, so that
/// the history every snapshot carries grows by a few numbers per round, whatever the number of
/// workers; the counts (and what `/metrics` derives from them) are those of the lists.
#[test]
fn old_round_summaries_keep_counts_instead_of_per_worker_lists() {
    let (mut core, _) = setup(TargetPolicy::LocalEma);
    join(&mut core, 1, "a", 10.0, 0);
    join(&mut core, 2, "b", 10.0, 0);
    let mut sizes = Vec::new();
    let mut now = 10;
    for round in 0..DETAIL_ROUNDS as u64 + 3 {
        send(&mut core, 1, round, 1.0, 1 + round, now);
        let mut bad = update(&core, round, 1.0, 200 + round);
        bad.values.held_mut().unwrap()[0] = f32::NAN;
        let acts = core.handle(
            Event::Update {
                worker: WorkerId(2),
                update: bad,
            },
            now,
        );
        let closed = snapshot_stored(&acts);
        sizes.push(
            closed
                .unwrap_or_else(|| panic!("round {round} did not close: {acts:?}"))
                .len(),
        );
        now += 10;
    }
    let h = core.history();
    assert_eq!(h.len(), DETAIL_ROUNDS + 3);
    let kinds = std::collections::BTreeMap::from([("non_finite".to_owned(), 1)]);
    for (i, s) in h.iter().enumerate() {
        assert_eq!(s.accepted_count(), 1, "round {i}");
        // DDP's bytes count the model's gradients, not the target DDP computes locally.
        assert_eq!(
            s.dense_bytes,
            s.steps * core.params().model.len() as u64 * 8
        );
        assert_eq!(s.rejected_by_kind(), kinds, "round {i}");
        let thinned = i < 3;
        assert_eq!(s.thinned.is_some(), thinned, "round {i}");
        assert_eq!(s.accepted.is_empty(), thinned, "round {i}");
        assert_eq!(s.rejected.is_empty(), thinned, "round {i}");
    }
    // Once summaries thin, a round adds less to the snapshot than one with lists did.
    let grew = |i: usize| sizes[i] as i64 - sizes[i - 1] as i64;
    let (detailed, thinned) = (grew(DETAIL_ROUNDS - 1), grew(DETAIL_ROUNDS + 2));
    assert!(thinned < detailed, "{thinned} >= {detailed}");
    // Many workers thin sooner: only the newest summaries within DETAIL_ENTRIES keep lists.
    let mut big = h[h.len() - 1].clone();
    big.accepted = (0..DETAIL_ENTRIES / 2 - 10)
        .map(|i| format!("w{i}"))
        .collect();
    let mut many = vec![big.clone(); 4];
    log::thin_history(&mut many);
    let kept: Vec<bool> = many.iter().map(|s| s.thinned.is_none()).collect();
    assert_eq!(kept, [false, false, true, true]);
    assert_eq!(many[0].accepted_count(), big.accepted.len() as u64);
    // The newest keeps its lists whatever their size.
    big.accepted = (0..2 * DETAIL_ENTRIES).map(|i| format!("w{i}")).collect();
    let mut one = vec![big];
    log::thin_history(&mut one);
    assert!(one[0].thinned.is_none());
    // Thinning is idempotent and survives a snapshot.
    let mut again = h[0].clone();
    again.thin();
    assert_eq!(again, h[0]);
    let json = serde_json::to_string(&h[0]).unwrap();
    assert_eq!(serde_json::from_str::<RoundSummary>(&json).unwrap(), h[0]);
}

/// A round's loss and its predict-the-mean baseline are the sample-weighted means of the
/// accepted updates' (so `loss / baseline` can be followed across rounds), and a summary
/// written before the baseline existed reads it as not measured.
#[test]
fn a_round_reports_its_loss_beside_the_predict_the_mean_baseline() {
    let (mut core, _) = setup(TargetPolicy::LocalEma);
    join(&mut core, 1, "a", 10.0, 0);
    join(&mut core, 2, "b", 10.0, 0);
    let mut acts = Vec::new();
    for (worker, samples, mean, baseline) in [(1, 10, 0.2, 0.8), (2, 30, 0.6, 1.6)] {
        let mut u = update(&core, 0, 1.0, worker);
        u.samples = samples;
        u.loss.mean = mean;
        u.loss.baseline = baseline;
        acts = core.handle(
            Event::Update {
                worker: WorkerId(worker),
                update: u,
            },
            10,
        );
    }
    assert!(snapshot_stored(&acts).is_some(), "the round closed");
    let s = &core.history()[0];
    assert!((s.loss - 0.5).abs() < 1e-6, "{}", s.loss);
    assert!((s.baseline - 1.4).abs() < 1e-6, "{}", s.baseline);
    let mut old = serde_json::to_value(s).unwrap();
    old.as_object_mut().unwrap().remove("baseline");
    let read: RoundSummary = serde_json::from_value(old).unwrap();
    assert!(read.baseline.is_nan());
    assert_eq!(read.loss, s.loss);
}
