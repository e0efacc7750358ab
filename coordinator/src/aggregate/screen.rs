//! The screens (see the module docs of [`crate::aggregate`]), streamed: each pass reads one
//! update at a time and keeps scalars, so memory does not grow with the number of updates.

use amity_shared::federated::codec::Entries;
use amity_shared::stats::lower_median;
use serde::{Deserialize, Serialize};

use super::{AggregationConfig, Candidate};

/// How one update points relative to the run's recent direction and to the other updates of
/// its round (cosine similarities over the whole update; `None` where there is nothing to
/// compare with). Honest pseudo-gradients point roughly with both; a sign-flipped one against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alignment {
    /// Sender.
    pub from: String,
    /// Cosine with the outer optimiser's momentum buffer (the recent global steps).
    pub with_history: Option<f64>,
    /// Cosine with the sum of the round's other updates.
    pub with_others: Option<f64>,
}

/// `ab / sqrt(aa * bb)`, `None` when not finite (a zero vector).
fn cosine_of(ab: f64, aa: f64, bb: f64) -> Option<f64> {
    let c = ab / (aa.max(0.0) * bb.max(0.0)).sqrt();
    c.is_finite().then_some(c)
}

/// What the first pass measures of one update.
#[derive(Debug, Clone, Copy)]
struct Measure {
    finite: bool,
    /// Sum of squares (`c.c`).
    sq: f64,
    /// Cosine with the recent direction, where there is one and the update covers it.
    with_history: Option<f64>,
}

fn measure(v: &Entries, direction: &[f32], direction_sq: f64) -> Measure {
    let (mut finite, mut sq, mut dot, mut own_sq) = (true, 0.0, 0.0, 0.0);
    let d = direction.len();
    v.for_each(|i, x| {
        finite &= x.is_finite();
        let x = x as f64;
        sq += x * x;
        if i < d {
            dot += x * direction[i] as f64;
            own_sq += x * x;
        }
    });
    Measure {
        finite,
        sq,
        with_history: (d > 0 && v.len() >= d)
            .then(|| cosine_of(dot, own_sq, direction_sq))
            .flatten(),
    }
}

/// Splits candidates into accepted and rejected (with the reason), caps the accepted ones'
/// weights and sets their clipping `scale` and `norm`. `history` holds the norms of recently
/// accepted updates; the reference norm is the lower median of those and this round's norms.
/// `direction` is the recent global step (the outer momentum; empty before the first), for the
/// alignments reported. An update that cannot be read back is rejected with the reason.
pub fn screen(
    cands: Vec<Candidate>,
    history: &[f64],
    direction: &[f32],
    cfg: &AggregationConfig,
) -> (Vec<Candidate>, Vec<(Candidate, String)>, Vec<Alignment>) {
    let direction_sq: f64 = direction.iter().map(|h| (*h as f64).powi(2)).sum();
    let mut rejected = Vec::new();
    let mut finite = Vec::new();
    for c in cands {
        let m = match c.read() {
            Ok(v) => measure(&v, direction, direction_sq),
            Err(why) => {
                rejected.push((c, why));
                continue;
            }
        };
        if !m.finite {
            rejected.push((c, "contains NaN or infinite values".to_owned()));
            continue;
        }
        let rms = m.sq.sqrt() / (c.values.len().max(1) as f64).sqrt();
        if rms > cfg.max_rms {
            let why = format!(
                "root-mean-square value {rms:.3e} exceeds the cap {:.3e}",
                cfg.max_rms
            );
            rejected.push((c, why));
        } else {
            finite.push((c, m));
        }
    }
    let mut pool: Vec<f64> = finite.iter().map(|(_, m)| m.sq.sqrt()).collect();
    pool.extend_from_slice(history);
    let reference = lower_median(&pool);
    let mut accepted = Vec::new();
    for (c, m) in finite {
        let n = m.sq.sqrt();
        if reference > 0.0 && n > cfg.reject_ratio * reference {
            let why = format!(
                "norm {n:.3e} is {:.0}x the reference {reference:.3e} (limit {}x)",
                n / reference,
                cfg.reject_ratio
            );
            rejected.push((c, why));
        } else {
            accepted.push((c, m));
        }
    }
    // How the updates that passed the norm screens point, as the agreement screen first sees
    // them (and against the recent global steps, `direction`).
    let alignment = agreement_screen(&mut accepted, &mut rejected, cfg.min_agreement);
    let mut accepted: Vec<(Candidate, f64)> = accepted
        .into_iter()
        .map(|(c, m)| (c, m.sq.sqrt()))
        .collect();
    cap_weights(&mut accepted, cfg.weight_cap);
    // Clipping is relative to this round's accepted norms only: against the history, which
    // records clipped norms, the limit would ratchet down round after round (measured: at
    // H = 20 the run stopped learning).
    let round_norms: Vec<f64> = accepted.iter().map(|(_, n)| *n).collect();
    let round_reference = lower_median(&round_norms);
    let limit = cfg.clip_ratio * round_reference;
    let accepted = accepted
        .into_iter()
        .map(|(mut c, n)| {
            c.scale = 1.0;
            c.norm = n;
            if cfg.clip_ratio > 0.0 && round_reference > 0.0 && n > limit {
                c.scale = (limit / n) as f32;
                c.norm = limit;
            }
            c
        })
        .collect();
    (accepted, rejected, alignment)
}

/// Cuts every claimed weight above `cap` times the lower median weight to that.
fn cap_weights(accepted: &mut [(Candidate, f64)], cap: f64) {
    let weights: Vec<f64> = accepted.iter().map(|(c, _)| c.weight).collect();
    let most = cap * lower_median(&weights);
    if most > 0.0 {
        for (c, _) in accepted.iter_mut() {
            if c.weight > most {
                tracing::warn!(
                    from = %c.from,
                    "claimed weight {:.3e} cut to {most:.3e} ({cap}x the lower median)",
                    c.weight,
                );
                c.weight = most;
            }
        }
    }
}

/// The sum of all updates (`t`, `f32`: it only orients cosines, and at the scale of a thousand
/// workers its size counts), its squared norm (`t.t`) and each update's dot product with it
/// (`c.t`): two passes, one model-sized vector. `Err` names the update that could not be read
/// back.
struct Totals {
    total: Vec<f32>,
    tt: f64,
    dots: Vec<f64>,
}

impl Totals {
    fn of(accepted: &[(Candidate, Measure)]) -> Result<Totals, (usize, String)> {
        let len = accepted.first().map_or(0, |(c, _)| c.values.len());
        let mut total = vec![0.0f32; len];
        for (k, (c, _)) in accepted.iter().enumerate() {
            let v = c.read().map_err(|e| (k, e))?;
            v.for_each(|i, x| total[i] += x);
        }
        let tt = total.iter().map(|t| (*t as f64).powi(2)).sum();
        let mut dots = Vec::with_capacity(accepted.len());
        for (k, (c, _)) in accepted.iter().enumerate() {
            let v = c.read().map_err(|e| (k, e))?;
            let mut ct = 0.0;
            v.for_each(|i, x| ct += x as f64 * total[i] as f64);
            dots.push(ct);
        }
        Ok(Totals { total, tt, dots })
    }

    /// Takes update `j` (already removed from `accepted`, which held it at index `j`) out of
    /// the sums: one pass over the others for their dot products with it.
    fn remove(
        &mut self,
        gone: &Candidate,
        j: usize,
        accepted: &[(Candidate, Measure)],
    ) -> Result<(), (usize, String)> {
        let mut u = vec![0.0f32; self.total.len()];
        gone.read()
            .map_err(|e| (usize::MAX, e))?
            .for_each(|i, x| u[i] = x);
        self.dots.remove(j);
        for (k, ((c, _), dot)) in accepted.iter().zip(&mut self.dots).enumerate() {
            let mut cu = 0.0;
            c.read()
                .map_err(|e| (k, e))?
                .for_each(|i, x| cu += x as f64 * u[i] as f64);
            *dot -= cu;
        }
        for (t, x) in self.total.iter_mut().zip(&u) {
            *t -= x;
        }
        self.tt = self.total.iter().map(|t| (*t as f64).powi(2)).sum();
        Ok(())
    }
}

/// The agreement screen: while three or more updates remain, rejects the one that agrees least
/// with the sum of the others if its cosine is below `min`. One at a time, because a hostile
/// update also lowers the agreement of the honest ones with "the others" it is part of. With `t`
/// the sum of all, `c . (t - c) = c.t - c.c` and `|t - c|^2 = t.t - 2 c.t + c.c`; a rejection
/// takes its update out of `t` and of every `c.t` (one more pass). Returns the alignments as the
/// screen first saw them.
fn agreement_screen(
    accepted: &mut Vec<(Candidate, Measure)>,
    rejected: &mut Vec<(Candidate, String)>,
    min: f64,
) -> Vec<Alignment> {
    let mut first: Option<Vec<Alignment>> = None;
    let mut totals: Option<Totals> = None;
    loop {
        let t = match totals.take().map_or_else(|| Totals::of(accepted), Ok) {
            Ok(t) => t,
            Err((k, why)) => {
                // Unreadable now (the store failed): rejected, and the sums start over.
                rejected.push((accepted.remove(k).0, why));
                continue;
            }
        };
        let n = accepted.len();
        let others: Vec<Option<f64>> = accepted
            .iter()
            .zip(&t.dots)
            .map(|((_, m), &ct)| {
                (n > 1)
                    .then(|| cosine_of(ct - m.sq, m.sq, t.tt - 2.0 * ct + m.sq))
                    .flatten()
            })
            .collect();
        if first.is_none() {
            first = Some(
                accepted
                    .iter()
                    .zip(&others)
                    .map(|((c, m), o)| Alignment {
                        from: c.from.clone(),
                        with_history: m.with_history,
                        with_others: *o,
                    })
                    .collect(),
            );
        }
        if n < 3 {
            break;
        }
        let worst = others
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.map(|c| (i, c)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match worst {
            Some((i, cos)) if cos < min => {
                let (c, _) = accepted.remove(i);
                let mut t = t;
                // A failed read leaves `totals` empty: they are recomputed from the rest.
                if t.remove(&c, i, accepted).is_ok() {
                    totals = Some(t);
                }
                let why = format!(
                    "points away from the other updates (cosine {cos:+.2} with their sum, \
                     limit {min:+.2})"
                );
                rejected.push((c, why));
            }
            _ => break,
        }
    }
    first.unwrap_or_default()
}
