//! The Prometheus text exposition format (version 0.0.4), which `/metrics` serves on the
//! coordinator and on each worker.
//!
//! A [`MetricsText`] collects families (a `# HELP` and `# TYPE` line, then one sample line per
//! label set). Names follow Prometheus's conventions: `amity_` prefix, base units (seconds,
//! bytes), `_total` for counters.

use std::fmt::Write as _;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that only goes up (reset when the process restarts).
    Counter,
    /// A value that goes up and down.
    Gauge,
}

/// A `/metrics` page being written.
#[derive(Debug, Default)]
pub struct MetricsText {
    out: String,
}

impl MetricsText {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its help text and kind. Samples of it follow with [`MetricsText::sample`].
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample of the family just started, with its labels (name, value).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A value as the format writes it (`NaN`, `+Inf`, `-Inf` for the special ones).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_labels_and_special_values_are_written_as_the_format_says() {
        let mut m = MetricsText::new();
        m.single("amity_round", Kind::Gauge, "Next round.", 3.0);
        m.family(
            "amity_rejected_total",
            Kind::Counter,
            "Rejected.\nTwo lines.",
        )
        .sample("amity_rejected_total", &[("reason", "a \"b\"\\c")], 2.0)
        .sample(
            "amity_rejected_total",
            &[("reason", "x"), ("k", "v")],
            f64::NAN,
        );
        m.single("amity_inf", Kind::Gauge, "h", f64::NEG_INFINITY);
        assert_eq!(
            m.finish(),
            "# HELP amity_round Next round.\n# TYPE amity_round gauge\namity_round 3\n\
             # HELP amity_rejected_total Rejected.\\nTwo lines.\n\
             # TYPE amity_rejected_total counter\n\
             amity_rejected_total{reason=\"a \\\"b\\\"\\\\c\"} 2\n\
             amity_rejected_total{reason=\"x\",k=\"v\"} NaN\n\
             # HELP amity_inf h\n# TYPE amity_inf gauge\namity_inf -Inf\n"
        );
    }
}
