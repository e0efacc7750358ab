//! A round's life inside the core: start it (assign shards, announce the state), then close it
//! in named steps (screen and account, outer step, publish and persist).

use super::*;

impl Core {
    pub(super) fn start_round(&mut self, out: &mut Vec<Action>) {
        self.started_any = true;
        let r = self.cfg.rounds;
        let deadline_ms = self.now_ms + r.time_budget_ms() + r.grace_ms;
        let claimed: Vec<f64> = self
            .workers
            .values()
            .map(|w| w.info.samples_per_s.max(1e-3))
            .collect();
        let most = SPEED_CAP * lower_median(&claimed);
        let speed = |claim: f64| claim.max(1e-3).min(most);
        let total_speed: f64 = claimed.iter().map(|c| speed(*c)).sum();
        let flush = self.is_flush_round(self.round);
        let mut bytes_down = 0;
        let mut expected = BTreeSet::new();
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let w = self.workers.get(&id).expect("listed above");
            let share = speed(w.info.samples_per_s) / total_speed;
            let n = ((r.shards_per_round as f64 * share).round() as usize).max(1);
            bytes_down += self.announce_round(id, n, flush, out);
            expected.insert(id);
        }
        tracing::info!(
            round = self.round,
            workers = expected.len(),
            "round started"
        );
        let announced = expected
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|w| w.info.name.clone())
            .collect();
        self.phase = Phase::Running {
            deadline_ms,
            expected,
            announced,
            bytes_down,
        };
    }

    /// Announces the open round to session `id` with `n` shards from the plan; returns the bytes
    /// it will download (nothing, a delta or the whole state).
    fn announce_round(
        &mut self,
        id: WorkerId,
        n: usize,
        flush: bool,
        out: &mut Vec<Action>,
    ) -> u64 {
        let r = &self.cfg.rounds;
        let params_hash = self.params_hash;
        let state_len = 4 * (self.params.model.len() + self.params.target.len()) as u64;
        let seed = self.cfg.run.train.seed;
        let Some(w) = self.workers.get(&id) else {
            return 0;
        };
        let name = w.info.name.clone();
        let holds = w.holds;
        let shards = self.plan.take(n, &name, seed);
        let delta = self
            .last_delta
            .filter(|(base, _)| holds == Some(*base))
            .map(|(base, blob)| StateDelta {
                base,
                blob,
                target_momentum: self.last_delta_momentum,
            });
        let bytes_down = match delta {
            _ if holds == Some(params_hash) => 0,
            Some(_) => self.delta_bytes_len,
            None => state_len,
        };
        out.push(Action::Send {
            worker: id,
            msg: ServerMsg::RoundAnnounce(RoundAnnounce {
                round: self.round,
                state: self.state_blob,
                params: params_hash,
                delta,
                budget_ms: r.time_budget_ms(),
                steps: r.steps,
                planned_rounds: r.max_rounds,
                flush,
            }),
        });
        out.push(Action::Send {
            worker: id,
            msg: ServerMsg::ShardAssignment {
                round: self.round,
                shards: shards.clone(),
            },
        });
        let w = self.workers.get_mut(&id).expect("checked above");
        w.holds = Some(params_hash);
        w.assigned = shards;
        bytes_down
    }

    /// An institution the open round was announced to joins again before it delivered (it lost
    /// its connection, or a new coordinator replica leads): the round is announced to its new
    /// session too, which offers the update it trained again or trains the round, and the round
    /// waits for it as for the others.
    pub(super) fn rejoin_round(&mut self, id: WorkerId, out: &mut Vec<Action>) {
        let Phase::Running { announced, .. } = &self.phase else {
            return;
        };
        let Some(name) = self.workers.get(&id).map(|w| w.info.name.clone()) else {
            return;
        };
        let delivered = self.received.iter().any(|p| p.from == name)
            || self.refused.iter().any(|(n, _)| *n == name);
        if delivered || !announced.contains(&name) {
            return;
        }
        let n = (self.cfg.rounds.shards_per_round / announced.len().max(1)).max(1);
        let flush = self.is_flush_round(self.round);
        let bytes = self.announce_round(id, n, flush, out);
        if let Phase::Running {
            expected,
            bytes_down,
            ..
        } = &mut self.phase
        {
            expected.insert(id);
            *bytes_down += bytes;
        }
        tracing::info!(worker = id.0, %name, round = self.round, "rejoined the open round");
    }

    pub(super) fn close_round(&mut self, out: &mut Vec<Action>) {
        let Some((expected, announced, bytes_down)) = self.end_running() else {
            return;
        };
        let mut received = std::mem::take(&mut self.received);
        let refused = std::mem::take(&mut self.refused);
        let missing: Vec<String> = announced
            .into_iter()
            .filter(|name| {
                !received.iter().any(|p| p.from == *name) && !refused.iter().any(|r| r.0 == *name)
            })
            .collect();
        // Shards that no received update trained go back to the queue: those of workers that
        // did not deliver, also when another session of the same institution did.
        let trained = trained_shards(&received);
        for id in &expected {
            if let Some(w) = self.workers.get_mut(id) {
                self.plan.requeue(std::mem::take(&mut w.assigned), &trained);
            }
        }
        let bytes_up: u64 = received.iter().map(|p| p.update.bytes).sum();
        // The values move into the candidates; the rest of `received` feeds the statistics.
        let cands: Vec<Candidate> = received
            .iter_mut()
            .map(|p| {
                let values = std::mem::replace(&mut p.update.values, Vec::new().into());
                Candidate::new(p.from.clone(), values, p.weight)
            })
            .collect();
        // A flush round's updates carry every worker's error-feedback residual, so their norms
        // are compared with each other, not with ordinary rounds (nor recorded among them).
        let flush = self.is_flush_round(self.round);
        let history: &[f64] = if flush { &[] } else { &self.norm_history };
        let (accepted, screened_out, alignment) =
            aggregate::screen(cands, history, &self.outer.momentum, &self.cfg.aggregation);
        // A flush round's updates carry every residual held back over the run: applied alone
        // they are not comparable with a round's work, so they are not scored.
        let (accepted, scored_out, held_out_loss, scores) = if flush {
            (accepted, Vec::new(), None, Vec::new())
        } else {
            self.score(accepted)
        };
        let rejected = self.record_verdicts(&scores, screened_out, scored_out, refused);
        let Tally {
            samples,
            steps,
            loss_sum,
            baseline_sum,
            weighted_steps,
        } = self.count_accepted(&received, &accepted, flush);

        let mut outer_step_ratio = 0.0;
        let mut rejected = rejected;
        let mut accepted_names: Vec<String> = accepted.iter().map(|c| c.from.clone()).collect();
        if !accepted.is_empty() {
            let mean_steps = if samples > 0 {
                weighted_steps / samples as f64
            } else {
                0.0
            };
            match self.step_and_publish(&accepted, mean_steps, flush, out) {
                Ok(ratio) => outer_step_ratio = ratio,
                Err(why) => {
                    // Screening should make this unreachable; if not, the round leaves the
                    // model as it was rather than publish a broken state.
                    tracing::error!(round = self.round, "outer step dropped: {why}");
                    for from in accepted_names.drain(..) {
                        let prov = self.provenance.entry(from.clone()).or_default();
                        prov.updates -= 1;
                        prov.rejected += 1;
                        rejected.push((from, why.clone()));
                    }
                }
            }
        }
        if accepted_names.is_empty() {
            self.last_delta = None;
            self.last_delta_momentum = None;
        }
        let p = self.params.model.len() as u64; // see `RoundSummary::dense_bytes`
        let summary = RoundSummary {
            round: self.round,
            accepted: accepted_names,
            rejected,
            missing,
            samples,
            steps,
            loss: if samples > 0 {
                loss_sum / samples as f64
            } else {
                f64::NAN
            },
            baseline: if samples > 0 {
                baseline_sum / samples as f64
            } else {
                f64::NAN
            },
            bytes_up,
            bytes_down,
            dense_bytes: steps.saturating_mul(p * 4 * 2),
            params: self.params_hash,
            epoch: self.plan.epoch,
            outer_step_ratio,
            flush,
            held_out_loss,
            scores,
            alignment,
            thinned: None,
        };
        tracing::info!(
            round = self.round,
            accepted = summary.accepted.len(),
            rejected = summary.rejected.len(),
            missing = summary.missing.len(),
            loss = summary.loss,
            bytes_up,
            "round closed"
        );
        self.publish_round(summary, out);
    }

    /// Adds the scores and rejections to the provenance and logs each rejection; returns
    /// every rejected update of the round with its reason.
    fn record_verdicts(
        &mut self,
        scores: &[(String, f64)],
        screened_out: Vec<(Candidate, String)>,
        scored_out: Vec<(Candidate, String)>,
        refused: Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        for (from, change) in scores {
            let prov = self.provenance.entry(from.clone()).or_default();
            prov.scored += 1;
            prov.loss_change += change;
        }
        let rejected: Vec<(String, String)> = screened_out
            .into_iter()
            .chain(scored_out)
            .map(|(c, why)| (c.from, why))
            .chain(refused)
            .collect();
        for (from, why) in &rejected {
            tracing::warn!(round = self.round, %from, "update rejected: {why}");
            self.provenance.entry(from.clone()).or_default().rejected += 1;
        }
        rejected
    }

    /// Ends the running phase (Idle until the next round starts): the round's expected workers,
    /// everyone it was announced to and the bytes sent down; `None` when no round runs.
    fn end_running(&mut self) -> Option<(BTreeSet<WorkerId>, Vec<String>, u64)> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Running {
                expected,
                announced,
                bytes_down,
                ..
            } => Some((expected, announced, bytes_down)),
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// Adds the accepted updates' work to the provenance, their shards to the epoch's coverage
    /// and (in ordinary rounds) their norms to the history; returns the round's totals.
    fn count_accepted(
        &mut self,
        received: &[Pending],
        accepted: &[Candidate],
        flush: bool,
    ) -> Tally {
        let ok: BTreeSet<&str> = accepted.iter().map(|c| c.from.as_str()).collect();
        let mut t = Tally::default();
        // Claimed counts are bounded on arrival; the sums still saturate rather than wrap.
        for p in received.iter().filter(|p| ok.contains(p.from.as_str())) {
            t.samples = p.update.samples.saturating_add(t.samples);
            t.steps = p.update.steps.saturating_add(t.steps);
            t.loss_sum += p.update.loss.mean as f64 * p.update.samples as f64;
            t.baseline_sum += p.update.loss.baseline as f64 * p.update.samples as f64;
            t.weighted_steps += p.update.steps as f64 * p.update.samples as f64;
            let prov = self.provenance.entry(p.from.clone()).or_default();
            prov.samples = prov.samples.saturating_add(p.update.samples);
            prov.steps = prov.steps.saturating_add(p.update.steps);
            prov.updates += 1;
            prov.shards += p.shards.len() as u64;
            for s in &p.shards {
                self.plan.covered.insert(*s);
            }
        }
        if !flush {
            for c in accepted {
                self.norm_history.push(c.norm);
            }
        }
        let excess = self.norm_history.len().saturating_sub(NORM_HISTORY);
        self.norm_history.drain(..excess);
        t
    }

    /// Records the closed round and emits what follows from it: the next state, the snapshot
    /// and its log entry (with a journal), a checkpoint when due, the summary, and `Finished`
    /// after the last.
    fn publish_round(&mut self, summary: RoundSummary, out: &mut Vec<Action>) {
        self.history.push(summary.clone());
        log::thin_history(&mut self.history);
        self.round += 1;
        self.store_state(out);
        if self.cfg.journal {
            let snapshot = self.snapshot_bytes();
            let snap_id = BlobId::of(&snapshot);
            out.push(Action::StoreBlob {
                what: "snapshot",
                bytes: snapshot,
            });
            out.push(Action::Persist(LogEntry::RoundClosed {
                round: self.round - 1,
                snapshot: snap_id,
                params: summary.params,
                state: Some(self.state_blob),
            }));
        }
        let k = self.cfg.checkpoint_every;
        if k > 0 && self.round.is_multiple_of(k) {
            out.push(Action::Checkpoint {
                round: self.round - 1,
                blob: self.state_blob,
            });
        }
        out.push(Action::RoundClosed(summary));
        let max = self.cfg.rounds.max_rounds;
        if max > 0 && self.round >= max {
            self.phase = Phase::Finished;
            out.push(Action::Finished);
        }
    }

    /// Sets the scorer that measures each update on held-out clips before it is aggregated.
    pub fn set_scorer(&mut self, scorer: Box<dyn HeldOutLoss>) {
        self.scorer = Some(scorer);
    }

    /// Contribution scoring (when a scorer is set): applies each screened update alone to the
    /// model and measures the relative change of the held-out loss. An update that raises it by
    /// more than `score_tolerance` is rejected with the reason; one that raises it by less is
    /// down-weighted in proportion (by up to half). Returns the kept and rejected updates, the
    /// loss before the step and every update's change.
    #[allow(clippy::type_complexity)]
    fn score(
        &mut self,
        accepted: Vec<Candidate>,
    ) -> (
        Vec<Candidate>,
        Vec<(Candidate, String)>,
        Option<f64>,
        Vec<(String, f64)>,
    ) {
        let Some(scorer) = self.scorer.as_mut() else {
            return (accepted, Vec::new(), None, Vec::new());
        };
        let base = scorer.loss(&self.params.model, &self.params.target);
        if !(base.is_finite() && base > 0.0) {
            tracing::warn!(
                round = self.round,
                "held-out loss {base}: updates not scored"
            );
            return (accepted, Vec::new(), None, Vec::new());
        }
        let tol = self.cfg.aggregation.score_tolerance;
        let m = self.params.model.len();
        let mut model = vec![0.0f32; m];
        let (mut kept, mut out, mut scores) = (Vec::new(), Vec::new(), Vec::new());
        for mut c in accepted {
            model.copy_from_slice(&self.params.model);
            match c.values.read() {
                Ok(v) => v.for_each(|i, d| {
                    if i < m {
                        model[i] -= d * c.scale;
                    }
                }),
                Err(e) => {
                    let why = format!("the update could not be read back: {e}");
                    out.push((c, why));
                    continue;
                }
            }
            let change = (scorer.loss(&model, &self.params.target) - base) / base;
            if change.is_finite() {
                scores.push((c.from.clone(), change));
            }
            // A NaN change is a rejection too.
            if change.is_nan() || change > tol {
                let why = format!(
                    "raises the held-out loss by {:.2}% (limit {:.2}%)",
                    100.0 * change,
                    100.0 * tol
                );
                out.push((c, why));
            } else {
                if change > 0.0 {
                    c.weight *= 1.0 - 0.5 * change / tol;
                }
                kept.push(c);
            }
        }
        (kept, out, Some(base), scores)
    }

    /// Takes the round's outer step, encodes it as the state delta workers will apply (densely
    /// in a flush round; the codec's loss waits in the downlink residual), applies exactly what
    /// was encoded (and, under coordinator EMA, the target's EMA step) and stores the delta.
    /// Returns the outer step's norm over the mean pseudo-gradient's, or why the step was
    /// dropped (not finite), in which case nothing changed.
    fn step_and_publish(
        &mut self,
        accepted: &[Candidate],
        mean_steps: f64,
        flush: bool,
        out: &mut Vec<Action>,
    ) -> Result<f64, String> {
        let base_hash = self.params_hash;
        let (delta, ratio, outer_momentum) = self.outer_update(accepted)?;
        // Under coordinator EMA the delta covers the model only: the target's EMA step is
        // computed on both ends from the applied model.
        let (parts, momentum) = match self.cfg.target_policy {
            TargetPolicy::LocalEma => (self.params.parts().to_vec(), None),
            TargetPolicy::CoordinatorEma => {
                let m = self
                    .progress(self.round)
                    .target_momentum(&self.cfg.run.train, mean_steps);
                (vec![self.params.model.len()], Some(m))
            }
        };
        let spec = if flush {
            self.cfg.downlink_codec.dense()
        } else {
            self.cfg.downlink_codec
        };
        // The downlink residual moves only if the step is taken. The delta's buffer becomes the
        // next residual (one model-sized vector fewer at the round's peak).
        let params = &mut self.params;
        let len = delta.len();
        let (bytes, _) = self
            .downlink
            .encode_parts_if(&spec, delta, &parts, |sent| {
                // Checked before anything moves, without copying the state: finite parameters
                // plus a finite delta must stay finite (the coordinator-EMA target step only
                // averages finite values, so the parts the delta covers are all there is to
                // check).
                let state = params.model.iter().chain(&params.target);
                if sent.len() != len || state.zip(sent).any(|(p, d)| !(p + d).is_finite()) {
                    return Err("the new parameters would not be finite".to_owned());
                }
                params
                    .apply_state_delta(sent, momentum)
                    .map_err(|e| format!("the state delta does not apply: {e}"))
            })?;
        self.outer.momentum = outer_momentum;
        self.params_hash = self.params.hash();
        self.delta_bytes_len = bytes.len() as u64;
        self.last_delta = Some((base_hash, BlobId::of(&bytes)));
        self.last_delta_momentum = momentum;
        out.push(Action::StoreBlob {
            what: "state delta",
            bytes,
        });
        Ok(ratio)
    }

    /// The round's aggregated outer step as a delta over the model (then, under the local-EMA
    /// policy, the target; the downlink error feedback adds what earlier deltas held back), the outer step's
    /// norm over the mean pseudo-gradient's, and the outer momentum buffer to keep if the step
    /// is taken. Fails, changing nothing, when the aggregate or the step is not finite.
    fn outer_update(&self, accepted: &[Candidate]) -> Result<(Vec<f32>, f64, Vec<f32>), String> {
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        // One pass over every update for the whole state: the model's part, then (local EMA)
        // the target's. The step is then taken in place: at a thousand workers the round's
        // memory is these few model-sized vectors (`amity bench scale`).
        let mut delta = aggregate::combine(accepted, &self.cfg.aggregation)?;
        if !finite(&delta) {
            return Err("the aggregated pseudo-gradient is not finite".into());
        }
        let m = self.params.model.len().min(delta.len());
        let g_norm = aggregate::norm(&delta[..m]);
        let momentum = self.outer.step_in_place(&mut delta[..m]);
        if !finite(&delta[..m]) {
            return Err("the outer step is not finite".into());
        }
        let ratio = if g_norm > 0.0 {
            aggregate::norm(&delta[..m]) / g_norm
        } else {
            0.0
        };
        // Under the local-EMA policy the target moves by the mean of the workers' target moves
        // (the rest of the vector); under coordinator EMA the update is the model alone.
        for d in &mut delta[m..] {
            *d = -*d;
        }
        Ok((delta, ratio, momentum))
    }

    pub(super) fn store_state(&mut self, out: &mut Vec<Action>) {
        let mut meta = BTreeMap::new();
        meta.insert("round".to_owned(), self.round.to_string());
        meta.insert("params".to_owned(), self.params_hash.to_hex());
        // Who trained this state, for releases' model cards (`amity.provenance`).
        meta.insert(
            "provenance".to_owned(),
            serde_json::to_string(&self.provenance).expect("provenance serialises"),
        );
        let bytes = Checkpoint::bytes_of(
            &self.cfg.run,
            &self.params.model,
            &self.params.target,
            &meta,
        );
        self.state_blob = BlobId::of(&bytes);
        out.push(Action::StoreBlob {
            what: "global state",
            bytes,
        });
    }
}
