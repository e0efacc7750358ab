//! The coordinator's `/metrics` page: the same figures as `status.json`, in Prometheus's text
//! format. Counters summed over the round history survive restarts (the history is durable).

use std::collections::BTreeMap;

use amity_protocol::metrics::{Kind, MetricsText};

use crate::server::Status;

/// `status` as a `/metrics` page.
pub(crate) fn render(status: &Status) -> String {
    let mut m = MetricsText::new();
    run(&mut m, status);
    workers(&mut m, status);
    traffic(&mut m, status);
    updates(&mut m, status);
    model(&mut m, status);
    defence(&mut m, status);
    raft(&mut m, status);
    m.finish()
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

fn run(m: &mut MetricsText, s: &Status) {
    m.single(
        "amity_round",
        Kind::Gauge,
        "The next round to run.",
        s.round as f64,
    );
    m.single(
        "amity_rounds_closed_total",
        Kind::Counter,
        "Rounds closed since the run began.",
        s.history.len() as f64,
    );
    m.single(
        "amity_round_running",
        Kind::Gauge,
        "1 while a round is under way.",
        flag(s.running),
    );
    m.single(
        "amity_paused",
        Kind::Gauge,
        "1 while an operator has paused the run (no new round starts).",
        flag(s.operator.paused),
    );
    m.single(
        "amity_finished",
        Kind::Gauge,
        "1 once max_rounds are done.",
        flag(s.finished),
    );
    m.single("amity_epoch", Kind::Gauge, "Corpus epoch.", s.epoch as f64);
    m.single(
        "amity_shards",
        Kind::Gauge,
        "Shards scheduled.",
        s.shards as f64,
    );
    m.single(
        "amity_shards_covered",
        Kind::Gauge,
        "Shards trained this epoch.",
        s.covered as f64,
    );
    m.single(
        "amity_releases",
        Kind::Gauge,
        "Releases published here.",
        s.releases.len() as f64,
    );
    m.single(
        "amity_store_bytes",
        Kind::Gauge,
        "Bytes in the content store after the last retention sweep.",
        s.storage.bytes as f64,
    );
}

fn workers(m: &mut MetricsText, s: &Status) {
    m.single(
        "amity_workers",
        Kind::Gauge,
        "Worker sessions connected.",
        s.workers.len() as f64,
    );
    let ids: Vec<String> = s.workers.iter().map(|w| w.id.0.to_string()).collect();
    let name = "amity_worker_samples_per_second";
    m.family(
        name,
        Kind::Gauge,
        "Training throughput each worker measured, clips per second.",
    );
    for (w, id) in s.workers.iter().zip(&ids) {
        let labels = [("worker", id.as_str()), ("institution", w.name.as_str())];
        m.sample(name, &labels, w.samples_per_s);
    }
    let name = "amity_worker_last_seen_seconds";
    m.family(
        name,
        Kind::Gauge,
        "Seconds since each worker was last heard from.",
    );
    for (w, id) in s.workers.iter().zip(&ids) {
        let labels = [("worker", id.as_str()), ("institution", w.name.as_str())];
        m.sample(name, &labels, w.silent_ms as f64 / 1000.0);
    }
}

fn traffic(m: &mut MetricsText, s: &Status) {
    let up: u64 = s.history.iter().map(|r| r.bytes_up).sum();
    let down: u64 = s.history.iter().map(|r| r.bytes_down).sum();
    let name = "amity_bytes_sent_total";
    m.family(
        name,
        Kind::Counter,
        "Bytes of training traffic over closed rounds: up = workers' updates, down = state sent \
         to workers.",
    )
    .sample(name, &[("direction", "up")], up as f64)
    .sample(name, &[("direction", "down")], down as f64);
    m.single(
        "amity_dense_bytes_total",
        Kind::Counter,
        "Bytes that dense fp32 synchronisation of every local step would have moved.",
        s.history.iter().map(|r| r.dense_bytes).sum::<u64>() as f64,
    );
    m.single(
        "amity_samples_total",
        Kind::Counter,
        "Clips trained on over closed rounds.",
        s.history.iter().map(|r| r.samples).sum::<u64>() as f64,
    );
    m.single(
        "amity_steps_total",
        Kind::Counter,
        "Local optimiser steps over closed rounds, summed over workers.",
        s.history.iter().map(|r| r.steps).sum::<u64>() as f64,
    );
}

fn updates(m: &mut MetricsText, s: &Status) {
    let name = "amity_updates_accepted_total";
    m.family(name, Kind::Counter, "Updates aggregated, by institution.");
    for (inst, p) in &s.provenance {
        m.sample(name, &[("institution", inst)], p.updates as f64);
    }
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for (kind, n) in s.history.iter().flat_map(|r| r.rejected_by_kind()) {
        *by_reason.entry(kind).or_default() += n;
    }
    let name = "amity_updates_rejected_total";
    m.family(
        name,
        Kind::Counter,
        "Updates rejected at a round's close, by reason.",
    );
    for (reason, n) in by_reason {
        m.sample(name, &[("reason", reason.as_str())], n as f64);
    }
    let name = "amity_updates_refused_total";
    m.family(
        name,
        Kind::Counter,
        "Updates refused before or while they were fetched, by institution (since start-up).",
    );
    for (inst, n) in &s.defence.updates_refused {
        m.sample(name, &[("institution", inst)], *n as f64);
    }
}

fn model(m: &mut MetricsText, s: &Status) {
    let last = s.history.last();
    m.single(
        "amity_loss",
        Kind::Gauge,
        "The last closed round's sample-weighted mean of the workers' losses.",
        last.map_or(f64::NAN, |r| r.loss),
    );
    m.single(
        "amity_loss_baseline",
        Kind::Gauge,
        "The last closed round's sample-weighted mean of what predicting the mean target scores \
         (amity_loss over it: the share of the target's spread the predictor leaves unexplained).",
        last.map_or(f64::NAN, |r| r.baseline),
    );
    m.single(
        "amity_outer_step_ratio",
        Kind::Gauge,
        "The last round's outer step norm over the mean pseudo-gradient's norm.",
        last.map_or(f64::NAN, |r| r.outer_step_ratio),
    );
    if let Some(t) = s.telemetry.last() {
        m.single(
            "amity_feature_std",
            Kind::Gauge,
            "Mean per-dimension std of the target encoder's features on held-out clips.",
            t.feature_std,
        );
        m.single(
            "amity_feature_std_min",
            Kind::Gauge,
            "Smallest per-dimension std of the target encoder's features on held-out clips.",
            t.feature_std_min,
        );
        m.single(
            "amity_rankme",
            Kind::Gauge,
            "RankMe effective rank of the target encoder's clip embeddings (1 = collapsed).",
            t.rankme,
        );
        m.single(
            "amity_rankme_centred",
            Kind::Gauge,
            "RankMe of the clip embeddings less their mean: the directions clips differ in \
             (1 = collapsed; a mean every clip shares lowers amity_rankme, not this).",
            t.rankme_centred,
        );
    }
}

fn defence(m: &mut MetricsText, s: &Status) {
    let d = &s.defence;
    let name = "amity_turned_away_total";
    m.family(
        name,
        Kind::Counter,
        "Peers turned away since start-up, by why.",
    );
    for (why, n) in [
        ("connections_over_cap", d.connections_refused),
        ("anonymous_over_cap", d.anonymous_over_cap),
        ("hello_timeout", d.hello_timeouts),
        ("registration_without_certificate", d.registrations_refused),
    ] {
        m.sample(name, &[("why", why)], n as f64);
    }
    m.single(
        "amity_storage_faults_total",
        Kind::Counter,
        "Store or journal writes that failed and were retried since start-up.",
        d.storage_faults as f64,
    );
}

fn raft(m: &mut MetricsText, s: &Status) {
    let Some(r) = &s.replica else {
        return;
    };
    m.single(
        "amity_raft_term",
        Kind::Gauge,
        "The replica's Raft term.",
        r.term as f64,
    );
    m.single(
        "amity_raft_leader",
        Kind::Gauge,
        "The leader's replica id (0: none known).",
        r.leader.unwrap_or(0) as f64,
    );
    m.single(
        "amity_raft_is_leader",
        Kind::Gauge,
        "1 on the leader.",
        flag(r.leader == Some(r.id)),
    );
    m.single(
        "amity_raft_commit_index",
        Kind::Gauge,
        "Highest log index known committed.",
        r.commit as f64,
    );
    m.single(
        "amity_raft_applied_index",
        Kind::Gauge,
        "Last log index applied.",
        r.applied as f64,
    );
    m.single(
        "amity_raft_apply_lag",
        Kind::Gauge,
        "Committed entries not applied yet here.",
        r.commit.saturating_sub(r.applied) as f64,
    );
    m.single(
        "amity_raft_voters",
        Kind::Gauge,
        "Voting replicas.",
        r.voters.len() as f64,
    );
    m.single(
        "amity_raft_learners",
        Kind::Gauge,
        "Replicas catching up without a vote.",
        r.learners.len() as f64,
    );
    let name = "amity_raft_follower_lag";
    m.family(
        name,
        Kind::Gauge,
        "On the leader: entries each replica's log is behind the commit index.",
    );
    for (id, lag) in &r.lag {
        m.sample(name, &[("replica", &id.to_string())], *lag as f64);
    }
    m.single(
        "amity_raft_sent_bytes_total",
        Kind::Counter,
        "Raft message bytes sent to peers since start-up.",
        r.bytes_sent as f64,
    );
}
