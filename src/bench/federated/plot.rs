//! The federated bench's chart: velocity R² against bytes on the wire, one point per
//! configuration, drawn with plotters (text in the font embedded in the binary).

use std::path::Path;

use anyhow::Result;

use super::runs::{FederatedReport, GroupReport};

/// Each configuration's colour in [`r2_against_bytes`], in order of first appearance: the
/// central run black, the default variant blue, the others from a small palette.
fn series_colours<'a>(
    report: &FederatedReport,
    groups: &[&'a GroupReport],
) -> Vec<(&'a str, plotters::style::RGBColor)> {
    use plotters::style::{BLACK, RGBColor};
    let default = report
        .groups
        .iter()
        .find(|g| g.name != "central")
        .map(|g| g.name.clone());
    let palette = [
        RGBColor(230, 130, 20),
        RGBColor(40, 160, 80),
        RGBColor(150, 60, 180),
        RGBColor(120, 120, 120),
    ];
    let mut names: Vec<&str> = Vec::new();
    for g in groups {
        if !names.contains(&g.name.as_str()) {
            names.push(&g.name);
        }
    }
    let mut others = 0;
    names
        .into_iter()
        .map(|name| {
            let colour = if name == "central" {
                BLACK
            } else if Some(name) == default.as_deref() {
                RGBColor(31, 100, 200)
            } else {
                others += 1;
                palette[(others - 1) % palette.len()]
            };
            (name, colour)
        })
        .collect()
}

/// The axes of [`r2_against_bytes`]: bytes (log scale, a factor 3 of room either side) and R²
/// (every error bar and the random encoder's line, with 5% of room).
fn bench_ranges(r2_random: f64, groups: &[&GroupReport]) -> ((f64, f64), (f64, f64)) {
    let (mut xlo, mut xhi) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut ylo, mut yhi) = (r2_random.min(0.0), r2_random.max(0.0));
    for g in groups {
        xlo = xlo.min(g.bytes);
        xhi = xhi.max(g.bytes);
        ylo = ylo.min(g.r2_mean - g.r2_sd);
        yhi = yhi.max(g.r2_mean + g.r2_sd);
    }
    if !xlo.is_finite() {
        (xlo, xhi) = (1.0, 10.0);
    }
    let (xlo, xhi) = (xlo / 3.0, xhi * 3.0);
    let pad = 0.05 * (yhi - ylo).max(0.05);
    let (ylo, yhi) = (ylo - pad, yhi + pad);
    ((xlo, xhi), (ylo, yhi))
}

/// `amity bench federated`'s picture: velocity-probe R² (mean over seeds, with the spread as an
/// error bar) against bytes on the wire (log scale), one point per configuration: the central
/// run at DDP fp32's bytes, the default variant, the other variants; IID filled, non-IID
/// hollow; the random encoder's R² as a dashed line.
pub fn r2_against_bytes(path: &Path, report: &FederatedReport) -> Result<()> {
    use plotters::prelude::*;
    crate::plot::register_font()?;
    let groups: Vec<_> = report
        .groups
        .iter()
        .filter(|g| g.bytes > 0.0 && g.r2_mean.is_finite())
        .collect();
    let ((xlo, xhi), (ylo, yhi)) = bench_ranges(report.r2_random, &groups);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Federated vs central: velocity-probe R² against bytes ({} seeds)",
                    report.seeds
                ),
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(70)
            .y_label_area_size(60)
            .build_cartesian_2d((xlo..xhi).log_scale(), ylo..yhi)?;
        chart
            .configure_mesh()
            .x_desc("bytes on the wire, all workers, both directions (log scale)")
            .y_desc("velocity-probe R² (held-out videos)")
            .x_label_formatter(&|x| format!("{x:.0e}"))
            .label_style(("sans-serif", 14))
            .draw()?;
        let random = report.r2_random;
        chart
            .draw_series(DashedLineSeries::new(
                [(xlo, random), (xhi, random)],
                6,
                4,
                RED.stroke_width(2),
            ))?
            .label(format!("random encoder ({random:.3})"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        for (name, colour) in series_colours(report, &groups) {
            let mine: Vec<_> = groups.iter().filter(|g| g.name == name).collect();
            chart.draw_series(mine.iter().map(|g| {
                PathElement::new(
                    [
                        (g.bytes, g.r2_mean - g.r2_sd),
                        (g.bytes, g.r2_mean + g.r2_sd),
                    ],
                    colour.stroke_width(1),
                )
            }))?;
            let label = if name == "central" {
                "central (= DDP fp32 sync every step)".to_owned()
            } else {
                format!("{name} (label: H)")
            };
            chart
                .draw_series(mine.iter().map(|g| {
                    let style = if g.split == "iid" {
                        colour.filled()
                    } else {
                        colour.stroke_width(2)
                    };
                    EmptyElement::at((g.bytes, g.r2_mean))
                        + Circle::new((0, 0), 6, style)
                        + Text::new(
                            if g.h > 0 {
                                format!("{}", g.h)
                            } else {
                                String::new()
                            },
                            (8, -16),
                            ("sans-serif", 13),
                        )
                }))?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 10, y), 6, colour.filled()));
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
        root.draw(&Text::new(
            "filled: IID, hollow: non-IID; bars: spread over seeds",
            (15, 580),
            ("sans-serif", 13),
        ))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}
