//! A worker's Prometheus `/metrics` (`amity worker --metrics-listen`): what it trained, what it
//! sent and received, and whether it is registered.

use std::sync::{Arc, Mutex};

use amity_protocol::metrics::{CONTENT_TYPE, Kind, MetricsText};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::core::{WorkerGauges, WorkerSummary};

/// The figures `/metrics` shows, updated by the worker after every input it handles.
#[derive(Debug, Clone)]
pub struct Board {
    /// The worker's compute backend.
    backend: String,
    now: Arc<Mutex<(WorkerSummary, WorkerGauges)>>,
}

impl Board {
    /// A board for a worker training on `backend`.
    pub fn new(backend: &str) -> Self {
        let gauges = WorkerGauges {
            registered: false,
            round: None,
            samples_per_s: 0.0,
        };
        Board {
            backend: backend.to_owned(),
            now: Arc::new(Mutex::new((WorkerSummary::default(), gauges))),
        }
    }

    /// Records where the worker stands.
    pub fn set(&self, summary: &WorkerSummary, gauges: WorkerGauges) {
        *self.now.lock().expect("metrics lock") = (summary.clone(), gauges);
    }

    /// The `/metrics` page.
    pub fn render(&self) -> String {
        let (s, g) = self.now.lock().expect("metrics lock").clone();
        let mut m = MetricsText::new();
        let name = "amity_worker_info";
        m.family(
            name,
            Kind::Gauge,
            "The worker's build and backend (always 1).",
        )
        .sample(
            name,
            &[
                ("backend", self.backend.as_str()),
                ("version", env!("CARGO_PKG_VERSION")),
            ],
            1.0,
        );
        m.single(
            "amity_worker_registered",
            Kind::Gauge,
            "1 while registered with a coordinator.",
            if g.registered { 1.0 } else { 0.0 },
        );
        m.single(
            "amity_worker_samples_per_second",
            Kind::Gauge,
            "Training throughput, clips per second: the last local round's, else the measurement at \
             registration.",
            f64::from(g.samples_per_s),
        );
        m.single(
            "amity_worker_round",
            Kind::Gauge,
            "The round being worked on (NaN between rounds).",
            g.round.map_or(f64::NAN, |r| r as f64),
        );
        m.single(
            "amity_worker_rounds_total",
            Kind::Counter,
            "Rounds whose update the coordinator acknowledged.",
            s.rounds as f64,
        );
        m.single(
            "amity_worker_steps_total",
            Kind::Counter,
            "Local optimiser steps.",
            s.steps as f64,
        );
        m.single(
            "amity_worker_samples_total",
            Kind::Counter,
            "Clips trained on.",
            s.samples as f64,
        );
        m.single(
            "amity_worker_loss",
            Kind::Gauge,
            "Mean loss of the last local round.",
            f64::from(s.last_loss),
        );
        let name = "amity_bytes_sent_total";
        m.family(
            name,
            Kind::Counter,
            "Bytes of training traffic: up = updates uploaded, down = state, deltas and shards \
             downloaded.",
        )
        .sample(name, &[("direction", "up")], s.bytes_up as f64)
        .sample(name, &[("direction", "down")], s.bytes_down as f64);
        m.finish()
    }
}

/// Serves `board` as `/metrics` on `listener` until the task is aborted.
pub fn serve(listener: tokio::net::TcpListener, board: Board) -> tokio::task::JoinHandle<()> {
    async fn page(State(board): State<Board>) -> impl IntoResponse {
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], board.render())
    }
    let app = Router::new().route("/metrics", get(page)).with_state(board);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_shows_what_was_set() {
        let board = Board::new("flex");
        let s = WorkerSummary {
            rounds: 3,
            bytes_up: 1200,
            ..Default::default()
        };
        let g = WorkerGauges {
            registered: true,
            round: Some(4),
            samples_per_s: 2.5,
        };
        board.set(&s, g);
        let page = board.render();
        for line in [
            "amity_worker_info{backend=\"flex\",version=\"0.1.0\"} 1",
            "amity_worker_registered 1",
            "amity_worker_samples_per_second 2.5",
            "amity_worker_round 4",
            "amity_worker_rounds_total 3",
            "amity_worker_loss NaN",
            "amity_bytes_sent_total{direction=\"up\"} 1200",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "{line} missing from\n{page}"
            );
        }
    }
}
