//! What a worker reports about itself: its exit summary and, for `/metrics`, where it stands.

/// What a worker did, for its exit summary.
#[derive(Debug, Clone)]
pub struct WorkerSummary {
    /// Rounds whose update was acknowledged.
    pub rounds: u64,
    /// Clips trained on.
    pub samples: u64,
    /// Mean loss of the last local round (NaN before the first).
    pub last_loss: f32,
    /// Local steps taken.
    pub steps: u64,
    /// Bytes uploaded (updates).
    pub bytes_up: u64,
    /// Bytes downloaded (state, deltas, shards).
    pub bytes_down: u64,
}

impl Default for WorkerSummary {
    fn default() -> Self {
        WorkerSummary {
            rounds: 0,
            samples: 0,
            last_loss: f32::NAN,
            steps: 0,
            bytes_up: 0,
            bytes_down: 0,
        }
    }
}

/// Where a worker stands now, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerGauges {
    /// Registered with a coordinator.
    pub registered: bool,
    /// The round under way, if any.
    pub round: Option<u64>,
    /// Training throughput, clips per second: the last local round's, else the measurement at
    /// registration (0 before either).
    pub samples_per_s: f32,
}

/// `1.2 MB` style sizes.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}
